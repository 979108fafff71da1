/** The native addon's functions (native/src/lib.rs). Every argument is checked. */
export interface NativeAddon {
  /** SHA-1 of every block of data (power-of-two blockSize, 512 B..1 MiB) into out, 20 bytes each; returns the count. */
  sha1Blocks(data: ArrayBufferView, blockSize: number, out: ArrayBufferView): number;
  /** SHA-1 of all of data into out[0..20]. */
  sha1(data: ArrayBufferView, out: ArrayBufferView): void;
  /** Allocated extents of the open file within [offset, offset + length), as [offset, length, offset, length, ...]. */
  extents(fd: number, offset: number, length: number): number[];
  /** Makes a range read as zeros without changing the file size; says how. */
  punchHole(fd: number, offset: number, length: number): 'punched' | 'zero-range' | 'written';
  /** Size and logical sector size of an open block device. */
  blockDeviceSize(fd: number): { size: number; logicalSectorSize: number };
  info(): { sha1: 'sha-ni' | 'portable'; shaNi: boolean; version: string };
}
/** The loaded addon, or null when it was not built or does not load. */
export const addon: NativeAddon | null;
/** Why the addon is not loaded (null when it is). */
export const loadError: string | null;
/** Where the addon is looked for. */
export const addonPath: string;
