import { basename } from 'node:path';
import { closeSync, fstatSync, openSync, readFileSync, readSync, statSync, type Stats } from 'node:fs';
import { ErrorCode, ImageError, InvalidArgumentError, BlockferryError } from '../errors.js';
import { chooseBackend } from '../engine/backend.js';
import type { NativeAddon } from 'blockferry/native';
import { isUri, parseNbdUri } from '../nbd/uri.js';
import { NbdImageSource } from './nbd.js';
import { MAX_CHAIN_DEPTH, Qcow2ImageSource, isQcow2File, qcow2Identity } from './qcow2.js';

export type { Extent, ImageIdentity, ImageSource } from './image.js';
import type { Extent, ImageIdentity, ImageSource } from './image.js';

/** What a raw image is and how big, with a clear error for anything else. */
export function statImage(path: string, native: NativeAddon | null = chooseBackend().native): { stats: Stats; size: number; kind: 'file' | 'block-device' } {
  let stats: Stats;
  try {
    stats = statSync(path);
  } catch (cause) {
    const code = (cause as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') throw new ImageError(ErrorCode.IMAGE_NOT_FOUND, path, 'no such file', { cause });
    throw new ImageError(ErrorCode.IMAGE_UNREADABLE, path, `cannot stat (${code ?? 'error'})`, { cause });
  }
  if (stats.isFile()) return { stats, size: stats.size, kind: 'file' };
  if (stats.isBlockDevice()) return { stats, size: blockDeviceSize(path, stats, native), kind: 'block-device' };
  const what = stats.isDirectory() ? 'a directory' : 'not a regular file or block device';
  throw new ImageError(ErrorCode.NOT_AN_IMAGE, path, `${what}, not an image`);
}

/**
 * Size of a block device: the BLKGETSIZE64 ioctl through the native addon,
 * or without it /sys/dev/block/MAJ:MIN/size (512-byte sectors), which Linux
 * publishes for every block device.
 */
function blockDeviceSize(path: string, stats: Stats, native: NativeAddon | null): number {
  if (native) {
    let fd: number | undefined;
    try {
      fd = openSync(path, 'r');
      return native.blockDeviceSize(fd).size;
    } catch {
      // fall through to /sys
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
  }
  const major = Math.floor(stats.rdev / 256) & 0xfff;
  const minor = (stats.rdev & 0xff) | ((stats.rdev >> 12) & 0xfff00);
  try {
    return Number(readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim()) * 512;
  } catch (cause) {
    throw new ImageError(ErrorCode.IMAGE_UNREADABLE, path, 'cannot read the block device size from /sys', { cause });
  }
}

export function identityOf(stats: Stats, size: number): ImageIdentity {
  const big = stats as unknown as { mtimeNs?: bigint };
  const mtimeNs = big.mtimeNs ?? BigInt(Math.round(stats.mtimeMs * 1e6));
  return { size, mtimeNs: mtimeNs.toString(), ino: stats.ino, dev: stats.dev };
}

/** The identity of the image at path now (nanosecond mtime). */
export function currentIdentity(path: string): ImageIdentity {
  const { size } = statImage(path);
  const stats = statSync(path, { bigint: true });
  return { size, mtimeNs: stats.mtimeNs.toString(), ino: Number(stats.ino), dev: Number(stats.dev) };
}

/**
 * A raw image file or block device, read with pread. Extents come from
 * SEEK_DATA/SEEK_HOLE through the native addon when it is available (holes
 * are then never read); without it the whole range is reported as data.
 */
export class FileImageSource implements ImageSource {
  readonly path: string;
  readonly size: number;
  readonly kind: 'file' | 'block-device';
  private fd: number | undefined;
  private readonly native: NativeAddon | null;

  constructor(path: string, native: NativeAddon | null = chooseBackend().native) {
    this.native = native;
    const { size, kind } = statImage(path, native);
    this.path = path;
    this.size = size;
    this.kind = kind;
    try {
      this.fd = openSync(path, 'r');
    } catch (cause) {
      const code = (cause as NodeJS.ErrnoException).code;
      throw new ImageError(ErrorCode.IMAGE_UNREADABLE, path, `cannot open for reading (${code ?? 'error'})`, { cause });
    }
    if (kind === 'file' && fstatSync(this.fd).size !== size) {
      this.close();
      throw new ImageError(ErrorCode.IMAGE_CHANGED, path, 'size changed while opening');
    }
  }

  readInto(buf: Uint8Array, offset: number, length: number): void {
    if (this.fd === undefined) throw new InvalidArgumentError('source', 'an open source', 'a closed one');
    if (offset < 0 || length < 0 || offset + length > this.size || length > buf.length) {
      throw new InvalidArgumentError('range', `inside the image (${this.size} bytes) and the buffer`, `${offset}+${length}`);
    }
    let done = 0;
    while (done < length) {
      let n: number;
      try {
        n = readSync(this.fd, buf, done, length - done, offset + done);
      } catch (cause) {
        const code = (cause as NodeJS.ErrnoException).code;
        throw new ImageError(ErrorCode.IMAGE_UNREADABLE, this.path, `read failed at byte ${offset + done} (${code ?? 'error'})`, { cause });
      }
      if (n === 0) throw new ImageError(ErrorCode.IMAGE_CHANGED, this.path, `ended at byte ${offset + done}, expected ${this.size}: it shrank while being read`);
      done += n;
    }
  }

  extents(offset: number, length: number): Extent[] {
    if (length <= 0) return [];
    if (!this.native || this.kind !== 'file' || this.fd === undefined) return [{ offset, length }];
    let flat: number[];
    try {
      flat = this.native.extents(this.fd, offset, length);
    } catch (cause) {
      if (cause instanceof BlockferryError) throw cause;
      throw new ImageError(ErrorCode.IMAGE_UNREADABLE, this.path, `cannot list extents (${(cause as Error).message})`, { cause });
    }
    const out: Extent[] = [];
    for (let i = 0; i < flat.length; i += 2) out.push({ offset: flat[i]!, length: flat[i + 1]! });
    return out;
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}

/**
 * How to open an image, as plain data that crosses to a worker thread. One
 * kind per source implementation; a new one adds a kind here and a line in
 * OPENERS.
 */
export type SourceSpec = { kind: 'file'; path: string } | { kind: 'nbd'; uri: string } | { kind: 'qcow2'; path: string; depth?: number };

/** A qcow2 chain's raw backing file is read like any raw image. */
const openRaw = (path: string, native: NativeAddon | null) => new FileImageSource(path, native);

type Opener<K extends SourceSpec['kind']> = (spec: Extract<SourceSpec, { kind: K }>, native: NativeAddon | null) => ImageSource;

const OPENERS: { [K in SourceSpec['kind']]: Opener<K> } = {
  file: (spec, native) => new FileImageSource(spec.path, native),
  nbd: (spec) => new NbdImageSource(spec.uri),
  qcow2: (spec, native) => new Qcow2ImageSource(spec.path, native, openRaw, spec.depth),
};

/**
 * How a file is read: 'auto' probes for the qcow2 magic. Probing trusts the
 * file's first bytes: a raw image whose guest wrote a qcow2 header at its
 * start (naming any host file as its backing) would be read as that qcow2.
 * Whoever knows a file is raw (a destination's own images, say) passes
 * 'raw'; a file given as 'qcow2' without the magic fails with BAD_MAGIC.
 */
export type ImageFormat = 'auto' | 'raw' | 'qcow2' | StackFormat;

/**
 * `qcow2-stack:N`: the file's own top N layers of its qcow2 chain and nothing
 * below (what they leave unallocated reads as zeros; the files further down
 * are never opened). `qcow2-stack:1` is one layer's own clusters: how
 * SnapMig (src/snapmig/) sends one snapshot, or several merged.
 */
export type StackFormat = `qcow2-stack:${number}`;

/** The depth of a `qcow2-stack:N` format, or undefined for any other format. */
export function stackDepth(format: ImageFormat | undefined): number | undefined {
  if (typeof format !== 'string' || !format.startsWith('qcow2-stack:')) return undefined;
  const n = Number(format.slice('qcow2-stack:'.length));
  if (!Number.isInteger(n) || n < 1 || n > MAX_CHAIN_DEPTH) throw new InvalidArgumentError('format', `qcow2-stack:N with N from 1 to ${MAX_CHAIN_DEPTH}`, format);
  return n;
}

/**
 * Where an image is, as given on a command line or to migrate(): a URI
 * (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH) or a path: a
 * regular file that starts with the qcow2 magic is read as qcow2 (with its
 * backing chain), anything else as raw. The one place that tells them apart.
 */
export function specFor(location: string, options: { format?: ImageFormat } = {}): SourceSpec {
  const format = options.format ?? 'auto';
  if (!isUri(location)) {
    if (format === 'raw') return { kind: 'file', path: location };
    const depth = stackDepth(format);
    if (depth !== undefined) return isQcow2File(location) ? { kind: 'qcow2', path: location, depth } : { kind: 'file', path: location };
    if (format === 'qcow2' || isQcow2File(location)) return { kind: 'qcow2', path: location };
    return { kind: 'file', path: location };
  }
  parseNbdUri(location); // any other scheme, or a malformed URI, is an INVALID_ARGUMENT here
  return { kind: 'nbd', uri: location };
}

/**
 * The identity of the image a spec names, as it is now; undefined for a
 * source that has none (an NBD export: no mtime, no inode). Nothing can tell
 * a later version of such a source from this one, so no block map is cached
 * for it, and a scan cannot notice that it changed underneath. A qcow2
 * chain's identity covers every file of the chain (qcow2Identity), with the
 * virtual size as its size.
 */
export function sourceIdentity(spec: SourceSpec, native: NativeAddon | null = chooseBackend().native): ImageIdentity | undefined {
  if (spec.kind === 'file') return currentIdentity(spec.path);
  if (spec.kind === 'qcow2') return qcow2Identity(spec.path, native, openRaw, spec.depth);
  return undefined;
}

/** The size of the image a spec names (an NBD export is asked: one connection). */
export function sourceSize(spec: SourceSpec, native: NativeAddon | null = chooseBackend().native): number {
  const identity = sourceIdentity(spec, native);
  if (identity) return identity.size;
  const src = openSource(spec, native);
  try {
    return src.size;
  } finally {
    src.close();
  }
}

/** An image as a table or a progress bar shows it: a file's name, a URI whole. */
export function displayName(location: string): string {
  return isUri(location) ? location : basename(location);
}

/** A short name for an image: a file's name without its extension, an export's name (or "nbd" when it has none). */
export function sourceName(location: string): string {
  const spec = specFor(location);
  if (spec.kind === 'nbd') return parseNbdUri(spec.uri).exportName.split('/').pop() || 'nbd';
  return basename(spec.path).replace(/\.[^.]*$/, '');
}

/** Opens the source a spec describes. */
export function openSource(spec: SourceSpec, native: NativeAddon | null = chooseBackend().native): ImageSource {
  const open = OPENERS[spec.kind] as Opener<SourceSpec['kind']> | undefined;
  if (!open) throw new InvalidArgumentError('source', `a source kind (${Object.keys(OPENERS).join(', ')})`, (spec as { kind: unknown }).kind);
  return open(spec, native);
}
