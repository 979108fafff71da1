// A qcow2 image (version 2 or 3) and its backing chain as an ImageSource.
// The format is qemu's docs/interop/qcow2.txt; only what reading needs is
// implemented: the header and its extensions, the active L1 table, L2 tables
// (standard and extended entries), zero clusters, compressed clusters
// (deflate, zstd) and backing files (qcow2 or raw, relative or absolute).
// Refcounts, internal snapshots and bitmaps are never read.
//
// Everything here trusts nothing in the file: every offset is checked
// against the file's size before it is read, every table size against a
// bound, and the backing chain against loops and depth, so a damaged or
// hostile file ends in a typed ImageError (CORRUPT, TRUNCATED,
// UNSUPPORTED_FEATURE), never in a crash, a huge allocation or a loop.
import { closeSync, fstatSync, openSync, readSync, realpathSync, statSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { createRequire } from 'node:module';
import { constants as zlibConstants, inflateRawSync } from 'node:zlib';
import type * as ZstdBinding from 'zstd-napi/binding.js';
import { BlockferryError, ErrorCode, ImageError, InvalidArgumentError, type ErrorCodeValue } from '../errors.js';
import type { NativeAddon } from 'blockferry/native';
import type { Extent, ImageIdentity, ImageSource } from './image.js';

/** "QFI\xfb", the first four bytes of every qcow2 file. */
export const QCOW2_MAGIC = 0x514649fb;

/** Backing files deeper than this are refused: real chains are a handful of layers, a longer one is a mistake or an attack. */
export const MAX_CHAIN_DEPTH = 64;

/** qemu's own limit on the L1 table (32 MiB); a larger one is refused before it is allocated. */
const MAX_L1_BYTES = 32 << 20;

/**
 * Bytes of L2 tables kept per layer. An L2 table maps cluster_size / 8
 * clusters (512 MiB of image with 64 KiB clusters), so a few tables serve a
 * sequential scan; the bound keeps memory fixed whatever the image's size.
 */
const L2_CACHE_BYTES = 8 << 20;

const INCOMPAT_DIRTY = 1;
const INCOMPAT_CORRUPT = 2;
const INCOMPAT_DATA_FILE = 4;
const INCOMPAT_COMPRESSION = 8;
const INCOMPAT_EXTL2 = 16;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;

const require = createRequire(import.meta.url);
let zstd: typeof ZstdBinding | undefined;

/** What a run of a layer's guest range is. */
export type RunKind = 'data' | 'zero' | 'unallocated';

/** A run of one layer's own map: data it holds, zeros it declares (hiding its backing), or nothing (its backing shows). */
export interface LayerRun extends Extent {
  kind: RunKind;
}

/** One file of a chain, top first. */
export interface LayerInfo {
  path: string;
  format: 'qcow2' | 'raw';
  /** The layer's own virtual size (a raw file's size). */
  size: number;
}

function fail(code: ErrorCodeValue, path: string, detail: string, cause?: unknown): never {
  throw new ImageError(code, path, detail, cause === undefined ? undefined : { cause });
}

/** Reads exactly length bytes at position, or throws; `eof` names what a short read means. */
function preadExact(fd: number, path: string, buf: Uint8Array, off: number, length: number, position: number, eof: ErrorCodeValue): void {
  let done = 0;
  while (done < length) {
    let n: number;
    try {
      n = readSync(fd, buf, off + done, length - done, position + done);
    } catch (cause) {
      const code = (cause as NodeJS.ErrnoException).code;
      fail(ErrorCode.IMAGE_UNREADABLE, path, `read failed at byte ${position + done} (${code ?? 'error'})`, cause);
    }
    if (n === 0) fail(eof, path, `ends at byte ${position + done}, expected at least ${position + length}`);
    done += n;
  }
}

/** A big-endian u64 as a Number, or a CORRUPT error when it exceeds 2^53 (no file or image is that large). */
function u64(view: DataView, at: number, path: string, what: string): number {
  const hi = view.getUint32(at), lo = view.getUint32(at + 4);
  if (hi > 0x1fffff) fail(ErrorCode.CORRUPT, path, `${what} is ${(BigInt(hi) << 32n) | BigInt(lo)}, beyond any file`);
  return hi * 2 ** 32 + lo;
}

/** Whether the file at path starts with the qcow2 magic (false for anything unreadable: the caller's open reports that). */
export function isQcow2File(path: string): boolean {
  let fd: number | undefined;
  try {
    if (!statSync(path).isFile()) return false;
    fd = openSync(path, 'r');
    const b = Buffer.alloc(4);
    return readSync(fd, b, 0, 4, 0) === 4 && b.readUInt32BE(0) === QCOW2_MAGIC;
  } catch {
    return false;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

/** The parsed header of one qcow2 file: what reading needs, validated. */
interface Header {
  version: number;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1Offset: number;
  extendedL2: boolean;
  compression: 'deflate' | 'zstd';
  backing?: { name: string; format?: string };
}

function parseHeader(fd: number, path: string, fileSize: number): Header {
  if (fileSize < 72) fail(ErrorCode.TRUNCATED, path, `${fileSize} bytes, shorter than a qcow2 header (72)`);
  const first = Buffer.alloc(Math.min(fileSize, 4096));
  preadExact(fd, path, first, 0, first.length, 0, ErrorCode.IMAGE_CHANGED);
  const v = new DataView(first.buffer, first.byteOffset, first.length);
  if (v.getUint32(0) !== QCOW2_MAGIC) fail(ErrorCode.BAD_MAGIC, path, 'not a qcow2 file (no QFI\\xfb magic)');
  const version = v.getUint32(4);
  if (version !== 2 && version !== 3) fail(ErrorCode.UNSUPPORTED_VERSION, path, `qcow2 version ${version} (this build reads 2 and 3)`);
  const clusterBits = v.getUint32(20);
  if (clusterBits < 9 || clusterBits > 21) fail(ErrorCode.CORRUPT, path, `cluster_bits ${clusterBits}, outside 9..21`);
  const clusterSize = 2 ** clusterBits;
  if (version === 3 && fileSize < 104) fail(ErrorCode.TRUNCATED, path, `${fileSize} bytes, shorter than a qcow2 v3 header (104)`);
  const headerLength = version === 2 ? 72 : v.getUint32(100);
  if (version === 3 && (headerLength < 104 || headerLength % 8 || headerLength > Math.min(clusterSize, first.length))) {
    fail(ErrorCode.CORRUPT, path, `header_length ${headerLength} (at least 104, a multiple of 8, inside the first cluster)`);
  }
  // The whole first cluster holds the header, its extensions and the backing name.
  const head = clusterSize <= first.length ? first : Buffer.alloc(Math.min(clusterSize, fileSize));
  if (head !== first) preadExact(fd, path, head, 0, head.length, 0, ErrorCode.IMAGE_CHANGED);
  const h = new DataView(head.buffer, head.byteOffset, head.length);
  const cryptMethod = h.getUint32(32);
  if (cryptMethod !== 0) fail(ErrorCode.UNSUPPORTED_FEATURE, path, `encrypted (crypt_method ${cryptMethod === 1 ? 'AES' : cryptMethod === 2 ? 'LUKS' : cryptMethod}): encrypted qcow2 is not supported`);
  const size = u64(h, 24, path, 'the virtual size');
  const l1Size = h.getUint32(36);
  const l1Offset = u64(h, 40, path, 'l1_table_offset');
  const incompat = version === 3 ? (BigInt(h.getUint32(72)) << 32n) | BigInt(h.getUint32(76)) : 0n;
  const compressionType = version === 3 && headerLength > 104 ? head[104]! : 0;

  // Header extensions, from the end of the header to the end of the first cluster.
  let backingFormat: string | undefined;
  const featureNames = new Map<number, string>();
  for (let at = headerLength; at + 8 <= head.length; ) {
    const type = h.getUint32(at), len = h.getUint32(at + 4);
    if (type === EXT_END) break;
    if (len > head.length - at - 8) fail(ErrorCode.CORRUPT, path, `header extension 0x${type.toString(16)} of ${len} bytes runs past the first cluster`);
    const data = head.subarray(at + 8, at + 8 + len);
    if (type === EXT_BACKING_FORMAT) backingFormat = data.toString('latin1');
    else if (type === EXT_FEATURE_NAMES) {
      for (let i = 0; i + 48 <= data.length; i += 48) {
        if (data[i] === 0) featureNames.set(data[i + 1]!, data.subarray(i + 2, i + 48).toString('latin1').replace(/\0.*$/s, ''));
      }
    }
    // Any other extension (bitmaps, encryption pointer, unknown ones) is not needed to read: skipped.
    at += 8 + Math.ceil(len / 8) * 8;
  }

  const unknown = incompat & ~BigInt(INCOMPAT_KNOWN);
  if (unknown) {
    const bits = [...Array(64).keys()].filter((b) => (unknown >> BigInt(b)) & 1n);
    const names = bits.map((b) => featureNames.get(b) ?? `bit ${b}`);
    fail(ErrorCode.UNSUPPORTED_FEATURE, path, `unknown incompatible qcow2 feature (${names.join(', ')})`);
  }
  if (incompat & BigInt(INCOMPAT_DATA_FILE)) fail(ErrorCode.UNSUPPORTED_FEATURE, path, 'an external data file: not supported');
  let compression: Header['compression'] = 'deflate';
  if (incompat & BigInt(INCOMPAT_COMPRESSION)) {
    if (compressionType === 1) compression = 'zstd';
    else if (compressionType !== 0) fail(ErrorCode.UNSUPPORTED_FEATURE, path, `compression type ${compressionType} (this build reads deflate and zstd)`);
  } else if (compressionType !== 0) fail(ErrorCode.CORRUPT, path, `compression type ${compressionType} without its incompatible feature bit`);
  const extendedL2 = (incompat & BigInt(INCOMPAT_EXTL2)) !== 0n;
  if (extendedL2 && clusterBits < 14) fail(ErrorCode.CORRUPT, path, `extended L2 entries with cluster_bits ${clusterBits} (at least 14)`);

  // The L1 table must cover the virtual size and lie inside the file.
  const entryBytes = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / entryBytes;
  const needed = Math.ceil(Math.ceil(size / clusterSize) / l2Entries);
  if (l1Size < needed) fail(ErrorCode.CORRUPT, path, `L1 table of ${l1Size} entries, too small for a virtual size of ${size} bytes (needs ${needed})`);
  if (l1Size * 8 > MAX_L1_BYTES) fail(ErrorCode.CORRUPT, path, `L1 table of ${l1Size} entries, larger than ${MAX_L1_BYTES} bytes`);
  if (l1Size > 0 && (l1Offset % clusterSize || l1Offset === 0 || l1Offset + l1Size * 8 > fileSize)) {
    fail(ErrorCode.CORRUPT, path, `L1 table at ${l1Offset} (${l1Size * 8} bytes) is unaligned or past the end of the file (${fileSize} bytes)`);
  }

  let backing: Header['backing'];
  const backingOffset = u64(h, 8, path, 'backing_file_offset');
  if (backingOffset !== 0) {
    const len = h.getUint32(16);
    if (len === 0 || len > 1023) fail(ErrorCode.CORRUPT, path, `backing file name of ${len} bytes (1..1023)`);
    if (backingOffset + len > head.length) fail(ErrorCode.CORRUPT, path, `backing file name at ${backingOffset} runs past the first cluster`);
    backing = { name: head.subarray(backingOffset, backingOffset + len).toString('utf8') };
    if (backingFormat !== undefined) backing.format = backingFormat;
  }
  return { version, clusterBits, size, l1Size, l1Offset, extendedL2, compression, ...(backing ? { backing } : {}) };
}

/** One unit's state in an L2 table. */
const enum Unit { UNALLOCATED, ZERO, DATA, COMPRESSED }

/**
 * One qcow2 file, without its backing: header, L1 table, cached L2 tables,
 * and the map from guest offsets to what this file holds there.
 */
class Qcow2Layer {
  readonly path: string;
  readonly header: Header;
  readonly size: number;
  private fd: number | undefined;
  private readonly fileSize: number;
  private readonly clusterSize: number;
  private readonly l2Entries: number;
  /** Guest bytes one L2 table maps. */
  private readonly l2Span: number;
  /** Bytes of guest data per unit: a cluster, or a subcluster with extended L2 entries. */
  private readonly unitSize: number;
  private readonly l1: DataView;
  private readonly l2Cache = new Map<number, DataView>();
  private readonly l2CacheMax: number;
  private compressed: { desc: string; data: Buffer } | undefined;
  private dctx: InstanceType<typeof ZstdBinding.DCtx> | undefined;
  /** Size and mtime (ns) of the file when its metadata was read: a writer changing them makes the cached L1 and L2 tables stale. */
  stamp = '';

  constructor(path: string) {
    this.path = path;
    try {
      this.fd = openSync(path, 'r');
    } catch (cause) {
      const code = (cause as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') fail(ErrorCode.IMAGE_NOT_FOUND, path, 'no such file', cause);
      fail(ErrorCode.IMAGE_UNREADABLE, path, `cannot open for reading (${code ?? 'error'})`, cause);
    }
    try {
      const st = fstatSync(this.fd, { bigint: true });
      this.stamp = `${st.size}:${st.mtimeNs}`;
      this.fileSize = Number(st.size);
      this.header = parseHeader(this.fd, path, this.fileSize);
      this.size = this.header.size;
      this.clusterSize = 2 ** this.header.clusterBits;
      this.l2Entries = this.clusterSize / (this.header.extendedL2 ? 16 : 8);
      this.l2Span = this.l2Entries * this.clusterSize;
      this.unitSize = this.header.extendedL2 ? this.clusterSize / 32 : this.clusterSize;
      this.l2CacheMax = Math.max(2, Math.floor(L2_CACHE_BYTES / this.clusterSize));
      const l1 = Buffer.alloc(this.header.l1Size * 8);
      preadExact(this.fd, path, l1, 0, l1.length, this.header.l1Offset, ErrorCode.IMAGE_CHANGED);
      this.l1 = new DataView(l1.buffer, l1.byteOffset, l1.length);
    } catch (e) {
      this.close();
      throw e;
    }
  }

  private get openFd(): number {
    if (this.fd === undefined) throw new InvalidArgumentError('source', 'an open source', 'a closed one');
    return this.fd;
  }

  /** The L2 table for guest offset, or undefined where the L1 entry is empty. */
  private l2For(offset: number): DataView | undefined {
    const l1Index = Math.floor(offset / this.l2Span);
    const hi = this.l1.getUint32(l1Index * 8), lo = this.l1.getUint32(l1Index * 8 + 4);
    const tableOffset = (hi & 0x00ffffff) * 2 ** 32 + (lo & 0xfffffe00);
    if (tableOffset === 0) return undefined;
    const hit = this.l2Cache.get(tableOffset);
    if (hit) {
      // Most recently used last: Map keeps insertion order.
      this.l2Cache.delete(tableOffset);
      this.l2Cache.set(tableOffset, hit);
      return hit;
    }
    if (tableOffset % this.clusterSize || tableOffset + this.clusterSize > this.fileSize) {
      fail(ErrorCode.CORRUPT, this.path, `L2 table at ${tableOffset} (L1 entry ${l1Index}) is unaligned or past the end of the file (${this.fileSize} bytes)`);
    }
    const buf = Buffer.alloc(this.clusterSize);
    preadExact(this.openFd, this.path, buf, 0, buf.length, tableOffset, ErrorCode.IMAGE_CHANGED);
    const table = new DataView(buf.buffer, buf.byteOffset, buf.length);
    if (this.l2Cache.size >= this.l2CacheMax) this.l2Cache.delete(this.l2Cache.keys().next().value!);
    this.l2Cache.set(tableOffset, table);
    return table;
  }

  /** State and host offset of the unit `u` (a cluster or subcluster index within the L2 table's span). */
  private unit(table: DataView, u: number): { kind: Unit; host: number } {
    const ext = this.header.extendedL2;
    const entry = ext ? u >> 5 : u;
    const at = entry * (ext ? 16 : 8);
    const hi = table.getUint32(at), lo = table.getUint32(at + 4);
    if (hi & 0x40000000) return { kind: Unit.COMPRESSED, host: entry };
    const host = (hi & 0x00ffffff) * 2 ** 32 + (lo & 0xfffffe00);
    if (ext) {
      const sub = u & 31;
      const zeros = table.getUint32(at + 8), alloc = table.getUint32(at + 12);
      if ((alloc >>> sub) & 1) {
        if (host === 0 || host % this.clusterSize) fail(ErrorCode.CORRUPT, this.path, `an allocated subcluster in a cluster at ${host}, unaligned or none`);
        if ((zeros >>> sub) & 1) fail(ErrorCode.CORRUPT, this.path, `subcluster ${sub} of an L2 entry is both allocated and zero`);
        return { kind: Unit.DATA, host: host + sub * this.unitSize };
      }
      return { kind: (zeros >>> sub) & 1 ? Unit.ZERO : Unit.UNALLOCATED, host: 0 };
    }
    // Bit 0 is the zero flag from version 3 on; in version 2 it is reserved.
    if (lo & 1 && this.header.version >= 3) return { kind: Unit.ZERO, host: 0 };
    if (host === 0) return { kind: Unit.UNALLOCATED, host: 0 };
    if (host % this.clusterSize) fail(ErrorCode.CORRUPT, this.path, `a data cluster at ${host}, not aligned to the cluster size`);
    return { kind: Unit.DATA, host };
  }

  /**
   * What this layer holds at offset: the longest run of one kind starting
   * there, at most `length` bytes and inside one L2 table. Data runs are
   * host-contiguous (one pread); a compressed cluster is a run of its own.
   */
  lookup(offset: number, length: number): { kind: Unit; length: number; host: number; entry?: DataView; entryIndex?: number } {
    const tableEnd = (Math.floor(offset / this.l2Span) + 1) * this.l2Span;
    const end = Math.min(offset + length, tableEnd, this.size);
    const table = this.l2For(offset);
    if (!table) return { kind: Unit.UNALLOCATED, length: end - offset, host: 0 };
    const base = Math.floor(offset / this.l2Span) * this.l2Span;
    let u = Math.floor((offset - base) / this.unitSize);
    const first = this.unit(table, u);
    const within = offset - base - u * this.unitSize;
    if (first.kind === Unit.COMPRESSED) {
      const clusterEnd = base + (first.host + 1) * this.clusterSize;
      return { kind: Unit.COMPRESSED, length: Math.min(end, clusterEnd) - offset, host: 0, entry: table, entryIndex: first.host };
    }
    let runEnd = base + (u + 1) * this.unitSize;
    let nextHost = first.host + this.unitSize;
    while (runEnd < end) {
      const next = this.unit(table, ++u);
      if (next.kind !== first.kind || (first.kind === Unit.DATA && next.host !== nextHost)) break;
      runEnd += this.unitSize;
      nextHost += this.unitSize;
    }
    const host = first.kind === Unit.DATA ? first.host + within : 0;
    return { kind: first.kind, length: Math.min(runEnd, end) - offset, host };
  }

  /** Reads host bytes of a data run; a cluster that starts inside the file but ends past it reads zeros there, as qemu does. */
  readHost(buf: Uint8Array, off: number, length: number, host: number): void {
    const clusterStart = host - (host % this.clusterSize);
    if (clusterStart >= this.fileSize) fail(ErrorCode.CORRUPT, this.path, `a data cluster at ${clusterStart}, past the end of the file (${this.fileSize} bytes)`);
    const inFile = Math.max(0, Math.min(length, this.fileSize - host));
    preadExact(this.openFd, this.path, buf, off, inFile, host, ErrorCode.IMAGE_CHANGED);
    if (inFile < length) buf.fill(0, off + inFile, off + length);
  }

  /** The guest cluster of a compressed L2 entry, decompressed (the last one is kept: reads often come in pieces of one cluster). */
  compressedCluster(table: DataView, entryIndex: number): Buffer {
    const at = entryIndex * (this.header.extendedL2 ? 16 : 8);
    const desc = (BigInt(table.getUint32(at)) << 32n) | BigInt(table.getUint32(at + 4));
    const key = desc.toString();
    if (this.compressed?.desc === key) return this.compressed.data;
    const x = BigInt(62 - (this.header.clusterBits - 8));
    const host = Number(desc & ((1n << x) - 1n));
    const sectors = Number((desc >> x) & ((1n << BigInt(this.header.clusterBits - 8)) - 1n)) + 1;
    const csize = sectors * 512 - (host % 512);
    if (host >= this.fileSize || host < 512) fail(ErrorCode.CORRUPT, this.path, `a compressed cluster at ${host}, outside the file (${this.fileSize} bytes)`);
    // The last sectors may lie past the end of the file (qemu reads them as zeros); they are not needed.
    const input = Buffer.alloc(Math.min(csize, this.fileSize - host));
    preadExact(this.openFd, this.path, input, 0, input.length, host, ErrorCode.IMAGE_CHANGED);
    const data = this.decompress(input);
    this.compressed = { desc: key, data };
    return data;
  }

  private decompress(input: Buffer): Buffer {
    const bad = (detail: string, cause?: unknown): never => fail(ErrorCode.CORRUPT, this.path, `a compressed cluster does not decompress: ${detail}`, cause);
    if (this.header.compression === 'deflate') {
      let out: Buffer;
      try {
        // Raw deflate (no zlib header); the input may end with bytes of the next compressed cluster, which inflate ignores.
        out = inflateRawSync(input, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize });
      } catch (cause) {
        return bad((cause as Error).message, cause);
      }
      if (out.length !== this.clusterSize) bad(`${out.length} bytes, expected ${this.clusterSize}`);
      return out;
    }
    try {
      zstd ??= require('zstd-napi/binding') as typeof ZstdBinding;
      this.dctx ??= new zstd.DCtx();
      this.dctx.reset(zstd.ResetDirective.sessionOnly);
    } catch (cause) {
      if (cause instanceof BlockferryError) throw cause;
      fail(ErrorCode.UNSUPPORTED_FEATURE, this.path, `zstd-compressed clusters, and zstd is not available (${(cause as Error).message})`, cause);
    }
    const out = Buffer.alloc(this.clusterSize);
    let produced = 0, consumed = 0;
    try {
      // Streaming: decoding stops when a whole cluster came out, whatever follows in the input.
      while (produced < out.length && consumed < input.length) {
        const [, written, read] = this.dctx.decompressStream(out.subarray(produced), input.subarray(consumed));
        if (written === 0 && read === 0) break;
        produced += written;
        consumed += read;
      }
    } catch (cause) {
      return bad((cause as Error).message, cause);
    }
    if (produced !== out.length) bad(`${produced} bytes, expected ${out.length}`);
    return out;
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
    this.l2Cache.clear();
    this.compressed = undefined;
  }
}

/** A raw file at the bottom of a chain: what it holds is what SEEK_DATA says (or all of it). */
class RawLayer {
  readonly path: string;
  readonly size: number;
  private readonly src: ImageSource;
  constructor(src: ImageSource) {
    this.src = src;
    this.path = src.path;
    this.size = src.size;
  }
  read(buf: Uint8Array, off: number, offset: number, length: number): void {
    this.src.readInto(buf.subarray(off, off + length), offset, length);
  }
  extents(offset: number, length: number): Extent[] {
    return this.src.extents(offset, length);
  }
  close(): void {
    this.src.close();
  }
}

type Layer = Qcow2Layer | RawLayer;

/** How the chain's raw files are opened (image/source.ts passes FileImageSource; kept as a parameter so this module imports no opener table). */
export type RawOpener = (path: string, native: NativeAddon | null) => ImageSource;

/** Where a layer's backing file is, by the rules qemu uses for a plain file name. */
function backingPath(overlay: string, name: string): string {
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !name.startsWith('file:')) {
    fail(ErrorCode.UNSUPPORTED_FEATURE, overlay, `backing file "${name}" is not a plain file (protocols and json: names are not supported)`);
  }
  const plain = name.startsWith('file:') ? name.slice(5) : name;
  return isAbsolute(plain) ? plain : resolve(dirname(overlay), plain);
}

/**
 * The files of a chain, top first, opened and checked: loops, depth, formats.
 * With `depth`, only the top `depth` files are opened (a stack of layers:
 * below it reads as zeros), so a layer is readable without its backing file.
 */
function openChain(path: string, native: NativeAddon | null, openRaw: RawOpener, depth?: number): Layer[] {
  const layers: Layer[] = [];
  const seen = new Set<string>();
  try {
    let next: { path: string; format: string | undefined; of?: string } | undefined = { path, format: 'qcow2' };
    while (next) {
      if (layers.length >= MAX_CHAIN_DEPTH) fail(ErrorCode.CORRUPT, path, `backing chain deeper than ${MAX_CHAIN_DEPTH} files`);
      let real: string;
      try {
        real = realpathSync(next.path);
      } catch (cause) {
        const code = (cause as NodeJS.ErrnoException).code;
        const what = next.of ? `backing file of ${next.of}: ` : '';
        if (code === 'ENOENT' || code === 'ENOTDIR') fail(ErrorCode.IMAGE_NOT_FOUND, next.path, `${what}no such file`, cause);
        fail(ErrorCode.IMAGE_UNREADABLE, next.path, `${what}cannot resolve (${code ?? 'error'})`, cause);
      }
      if (seen.has(real)) fail(ErrorCode.CORRUPT, path, `backing chain loops: ${next.of} names ${next.path}, already in the chain`);
      seen.add(real);
      const format = next.format ?? (isQcow2File(next.path) ? 'qcow2' : 'raw');
      if (format === 'raw') {
        layers.push(new RawLayer(openRaw(next.path, native)));
        break;
      }
      if (format !== 'qcow2') fail(ErrorCode.UNSUPPORTED_FEATURE, next.of ?? path, `backing file format "${format}" (raw and qcow2 are supported)`);
      const layer: Qcow2Layer = new Qcow2Layer(next.path);
      layers.push(layer);
      const b: Header['backing'] = layer.header.backing;
      next = b && (depth === undefined || layers.length < depth) ? { path: backingPath(next.path, b.name), format: b.format, of: next.path } : undefined;
    }
    return layers;
  } catch (e) {
    for (const l of layers) l.close();
    throw e;
  }
}

/**
 * A qcow2 image with its backing chain. Reads resolve each cluster top
 * down: data or compressed data of the first layer that has it, zeros where
 * a layer says zero, else the next layer, else zeros (also past the end of
 * a shorter backing file).
 */
export class Qcow2ImageSource implements ImageSource {
  readonly path: string;
  readonly size: number;
  private layerList: Layer[] | undefined;

  /** With `depth`, only the top `depth` layers: what lies below them reads as zeros (image/source.ts, format `qcow2-stack:N`). */
  constructor(path: string, native: NativeAddon | null, openRaw: RawOpener, depth?: number) {
    this.path = path;
    this.layerList = openChain(path, native, openRaw, depth);
    this.size = this.layerList[0]!.size;
  }

  private get chain(): Layer[] {
    if (!this.layerList) throw new InvalidArgumentError('source', 'an open source', 'a closed one');
    const top = this.layerList[0];
    // A live migration reads the active layer while a writer (qemu-io, a VM) changes it: when its file
    // changed since its metadata was read, the top file is opened again (one fstat per call otherwise).
    if (top instanceof Qcow2Layer) {
      const st = statSync(top.path, { bigint: true });
      if (`${st.size}:${st.mtimeNs}` !== top.stamp) {
        const fresh = new Qcow2Layer(top.path);
        if (fresh.size !== top.size) { fresh.close(); fail(ErrorCode.IMAGE_CHANGED, top.path, `virtual size changed from ${top.size} to ${fresh.size} while open`); }
        top.close();
        this.layerList[0] = fresh;
      }
    }
    return this.layerList;
  }

  /** The chain's files, this image first, its base last. */
  get layers(): LayerInfo[] {
    return this.chain.map((l) => ({ path: l.path, format: l instanceof Qcow2Layer ? 'qcow2' : 'raw', size: l.size }));
  }

  readInto(buf: Uint8Array, offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size || length > buf.length) {
      throw new InvalidArgumentError('range', `inside the image (${this.size} bytes) and the buffer`, `${offset}+${length}`);
    }
    // The chain is resolved once per call: a recursion that asked again could find the top
    // reopened (a writer changed it) and go on reading through the layer just closed.
    this.readLayer(this.chain, 0, buf, 0, offset, length);
  }

  private readLayer(chain: Layer[], i: number, buf: Uint8Array, off: number, offset: number, length: number): void {
    const layer = chain[i];
    if (!layer || offset >= layer.size) { buf.fill(0, off, off + length); return; }
    // Past a shorter backing file: zeros.
    const inside = Math.min(length, layer.size - offset);
    if (inside < length) buf.fill(0, off + inside, off + length);
    if (layer instanceof RawLayer) { layer.read(buf, off, offset, inside); return; }
    for (let done = 0; done < inside; ) {
      const at = offset + done;
      const run = layer.lookup(at, inside - done);
      switch (run.kind) {
        case Unit.DATA: layer.readHost(buf, off + done, run.length, run.host); break;
        case Unit.ZERO: buf.fill(0, off + done, off + done + run.length); break;
        case Unit.UNALLOCATED: this.readLayer(chain, i + 1, buf, off + done, at, run.length); break;
        case Unit.COMPRESSED: {
          const cluster = layer.compressedCluster(run.entry!, run.entryIndex!);
          const within = at % cluster.length;
          buf.set(cluster.subarray(within, within + run.length), off + done);
          break;
        }
      }
      done += run.length;
    }
  }

  /** The data of the whole chain inside the range: what the topmost layer holding each part holds, zero clusters excluded, coalesced. */
  extents(offset: number, length: number): Extent[] {
    const out: Extent[] = [];
    if (length <= 0) return out;
    const end = Math.min(offset + length, this.size);
    this.chainExtents(this.chain, 0, offset, end - offset, out);
    return out;
  }

  private chainExtents(chain: Layer[], i: number, offset: number, length: number, out: Extent[]): void {
    const layer = chain[i];
    if (!layer || offset >= layer.size || length <= 0) return;
    length = Math.min(length, layer.size - offset);
    if (layer instanceof RawLayer) { for (const x of layer.extents(offset, length)) push(out, x.offset, x.length); return; }
    for (let done = 0; done < length; ) {
      const run = layer.lookup(offset + done, length - done);
      if (run.kind === Unit.DATA || run.kind === Unit.COMPRESSED) push(out, offset + done, run.length);
      else if (run.kind === Unit.UNALLOCATED) this.chainExtents(chain, i + 1, offset + done, run.length, out);
      done += run.length;
    }
  }

  /**
   * One layer's own map inside the range (index 0 is this image, the last
   * its base): runs of data it holds, of zeros it declares, and of nothing
   * (where its backing file shows through), coalesced. A raw base reports
   * data and unallocated (its holes). This is each layer's own allocation,
   * as a snapshot-aware migration needs it.
   */
  layerMap(index: number, offset = 0, length = this.size): LayerRun[] {
    const layer = this.chain[index];
    if (!layer) throw new InvalidArgumentError('index', `a layer from 0 to ${this.chain.length - 1}`, index);
    const out: LayerRun[] = [];
    const end = Math.min(offset + length, layer.size);
    const add = (kind: RunKind, at: number, n: number) => {
      const last = out[out.length - 1];
      if (last && last.kind === kind && last.offset + last.length === at) last.length += n;
      else out.push({ kind, offset: at, length: n });
    };
    if (layer instanceof RawLayer) {
      let at = offset;
      for (const x of layer.extents(offset, end - offset)) {
        if (x.offset > at) add('unallocated', at, x.offset - at);
        add('data', x.offset, x.length);
        at = x.offset + x.length;
      }
      if (at < end) add('unallocated', at, end - at);
      return out;
    }
    for (let at = offset; at < end; ) {
      const run = layer.lookup(at, end - at);
      add(run.kind === Unit.ZERO ? 'zero' : run.kind === Unit.UNALLOCATED ? 'unallocated' : 'data', at, run.length);
      at += run.length;
    }
    return out;
  }

  /** The data runs one layer holds itself (zero clusters are not data). */
  layerAllocation(index: number, offset = 0, length = this.size): Extent[] {
    return this.layerMap(index, offset, length).filter((r) => r.kind === 'data').map(({ offset: o, length: n }) => ({ offset: o, length: n }));
  }

  close(): void {
    for (const l of this.layerList ?? []) l.close();
    this.layerList = undefined;
  }
}

function push(out: Extent[], offset: number, length: number): void {
  const last = out[out.length - 1];
  if (last && last.offset + last.length === offset) last.length += length;
  else out.push({ offset, length });
}

/**
 * The identity of a chain as it is now: the virtual size, the top file's
 * inode and device, and in place of one mtime a 64-bit hash of every
 * layer's path, size, mtime, inode and device. A block map of the chain is
 * stale as soon as any layer changes (or the chain is re-pointed), not only
 * the top file.
 */
export function qcow2Identity(path: string, native: NativeAddon | null, openRaw: RawOpener, depth?: number): ImageIdentity {
  const src = new Qcow2ImageSource(path, native, openRaw, depth);
  let layers: LayerInfo[];
  try {
    layers = src.layers;
  } finally {
    src.close();
  }
  let hash = 0xcbf29ce484222325n; // FNV-1a, 64 bits
  const top = statSync(path, { bigint: true });
  for (const l of layers) {
    const st = statSync(l.path, { bigint: true });
    for (const ch of Buffer.from(`${realpathSync(l.path)}\0${st.size}\0${st.mtimeNs}\0${st.ino}\0${st.dev}\0`)) {
      hash = ((hash ^ BigInt(ch)) * 0x100000001b3n) & 0xffffffffffffffffn;
    }
  }
  return { size: layers[0]!.size, mtimeNs: hash.toString(), ino: Number(top.ino), dev: Number(top.dev) };
}
