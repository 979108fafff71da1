// What blockferry reads an image through: the contract every source
// implements (raw files and block devices in source.ts, NBD exports in
// nbd.ts), apart from the table that opens them.

/** A byte range [offset, offset + length) of an image. */
export interface Extent {
  offset: number;
  length: number;
}

/**
 * What identifies one version of an image: a block map records it, and is
 * stale when the image's identity no longer matches.
 */
export interface ImageIdentity {
  size: number;
  /** Modification time in nanoseconds since the epoch (a decimal string: it exceeds 2^53). */
  mtimeNs: string;
  ino: number;
  dev: number;
}

/**
 * An image that blockferry reads: the operations a scanner (or a migration
 * source) needs, each with its contract. Raw files and block devices
 * implement it here; an NBD client or a qcow2 reader implements the same four
 * operations, and the scanner does not change.
 *
 * Sources are synchronous on purpose: each worker thread reads its own range
 * straight into WASM memory and has nothing else to do meanwhile.
 */
export interface ImageSource {
  /** Where the image lives (a path, or an NBD URI); used in messages and block maps. */
  readonly path: string;
  /** Logical size in bytes. Fixed for as long as the source is open. */
  readonly size: number;
  /**
   * Fills buf[0, length) with the image's bytes at [offset, offset + length).
   * Requires offset + length <= size. Holes read as zeros. Reads the whole
   * range or throws: a short read (the image shrank underneath) throws
   * IMAGE_CHANGED, never returns partial data.
   */
  readInto(buf: Uint8Array, offset: number, length: number): void;
  /**
   * The allocated extents inside [offset, offset + length), sorted and not
   * overlapping. Everything else in the range is a hole that reads as zeros
   * and need not be read. A source that cannot tell returns the whole range
   * as one extent (always correct, never faster).
   */
  extents(offset: number, length: number): Extent[];
  /** Releases the source. Further calls are errors. */
  close(): void;
}
