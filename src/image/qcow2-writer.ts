// A qcow2 version 3 image written as an ImageSink: what a destination writes
// when it keeps images (or the layers of a chain) as qcow2.
//
// Layout. Cluster 0 holds the header (104 bytes plus the compression-type
// byte, header_length 112), the backing-format extension when there is a
// backing file, the end marker and the backing file's name. The refcount
// table follows, sized once at creation for every cluster the image could
// ever need (twice its data and L2 tables, so that clusters freed and not
// yet reused never run it out), then the L1 table, sized for the virtual
// size. Neither moves nor grows afterwards, so the header is written once.
// Everything else is allocated on demand from the end of the file (or from
// clusters freed earlier): refcount blocks (16-bit refcounts; a new block is
// placed at the first cluster it covers, so it counts itself), L2 tables,
// and data clusters. Nothing is compressed, encrypted, snapshotted or
// bitmapped, and no feature bit is set: any qemu since 1.1 opens the file.
//
// What a cluster is. An L2 entry is unallocated (the backing file shows
// through, or zeros without one), a zero cluster (v3 flag bit 0, host
// offset 0: reads as zeros and hides the backing file), or data at a host
// cluster with refcount 1 (so with QCOW_OFLAG_COPIED, bit 63, set as qemu
// expects). Writes never allocate a data cluster for all-zero content
// (detected by the engine's WASM kernel): such a cluster becomes a zero
// cluster over a backing file and stays unallocated without one. A write
// that covers part of a cluster not yet allocated here reads the rest from
// the backing chain (or zeros) first; a write into a data cluster goes in
// place. Zeroing a whole data cluster drops it (its host cluster is freed).
//
// Order of writes, for crash safety. Data and metadata changes are made in
// memory and in the file's data clusters at once, but L2 tables, the L1
// table, refcount blocks and the refcount table reach the file only at a
// checkpoint (flush, commit, close, and whenever a bounded cache must drop a
// changed table), in this order, each step made durable (fdatasync) before
// the next begins:
//   1. data writes in flight finish; the file is extended over every
//      allocated cluster; changed refcount blocks are written; fdatasync.
//   2. the refcount table (entries for new refcount blocks) and changed L2
//      tables are written; fdatasync.
//   3. changed L1 entries (pointing to new L2 tables) are written; fdatasync.
//   4. clusters freed since the last checkpoint (no longer referenced by
//      anything written in 2 and 3) get refcount 0; fdatasync; only now may
//      they be reused.
// So every reference that reaches the disk points to a cluster whose
// content and refcount are already durable: this is the order qemu keeps
// (refcounts before L2 tables, data before the L2 entry that points to it).
// A crash (kill -9, power loss) at any point leaves the metadata of the last
// checkpoint, perhaps with clusters whose refcount is 1 but that nothing
// references yet (leaks: `qemu-img check` reports them, never an error) and
// never a reference to a cluster with refcount 0 or to data not written.
// resume() repairs such leaks (it walks the tables and sets the refcount of
// every unreferenced cluster to 0, which makes it reusable), so an image
// resumed after a crash and committed checks clean.
//
// Memory. L2 tables and refcount blocks are held in two bounded LRU caches
// (L2_CACHE_BYTES, REFCOUNT_CACHE_BYTES); dropping a changed one costs a
// checkpoint. The L1 table (8 bytes per L2 table: 4 KiB for 256 GiB at
// 64 KiB clusters) and the refcount table stay in memory, as in qemu. So
// memory and file size follow what was written, not the declared size: a
// 256 GiB image with a few MiB written is a file of a few MiB.
//
// The sink writes behind (as FileImageSink): a data write returns once it is
// under way, at most MAX_PENDING_WRITES / MAX_PENDING_BYTES in flight; a
// read waits for the writes it overlaps; a failed write is reported by the
// next call, ENOSPC as ERR_BF_NO_SPACE. Metadata work is serialised (one
// operation at a time holds the image's lock).
import { constants, promises as fsp } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { readSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { BlockferryError, ErrorCode, ImageError, InvalidArgumentError } from '../errors.js';
import { checkRegularOrAbsent } from '../io/atomic.js';
import { Engine, MAX_BLOCK_SIZE, type Region } from '../engine/engine.js';
import { WriteQueue, ioError, openChecked, type ImageSink } from './sink.js';
import { FileImageSource, openSource } from './source.js';
import type { Extent, ImageSource } from './image.js';
import { QCOW2_MAGIC } from './qcow2.js';

/** qemu's default cluster size: one L2 table maps 512 MiB, a refcount block counts 2 GiB of file. */
export const DEFAULT_CLUSTER_SIZE = 65536;
/**
 * Cluster sizes written: 4 KiB (the smallest that keeps the refcount table
 * of a large image small) to 2 MiB (qemu's largest).
 */
export const MIN_CLUSTER_SIZE = 4096;
export const MAX_CLUSTER_SIZE = 2 << 20;
/** qemu refuses L1 tables over 32 MiB; so do we, before allocating one. */
const MAX_L1_BYTES = 32 << 20;
/** L2 tables cached: 4 MiB, 64 tables of 64 KiB (32 GiB of guest space); a sequential transfer touches one at a time. */
const L2_CACHE_BYTES = 4 << 20;
/** Refcount blocks cached: 1 MiB (16 blocks of 64 KiB count 32 GiB of file); allocation is mostly at the end of the file. */
const REFCOUNT_CACHE_BYTES = 1 << 20;

const HEADER_LENGTH = 112;
const EXT_BACKING_FORMAT = 0xe2792aca;
/** L1/L2 entry flag: refcount is exactly 1 (QCOW_OFLAG_COPIED, bit 63). */
const COPIED_HI = 0x80000000;
/** L2 entry flag: compressed (bit 62); never written, refused on resume. */
const COMPRESSED_HI = 0x40000000;
/** L2 entry flag: reads as zeros (bit 0, v3). */
const ZERO_LO = 1;

export interface Qcow2SinkOptions {
  /** Virtual size in bytes (a multiple of 512: qemu reads whole sectors). */
  size: number;
  /** Bytes per cluster, a power of two from 4 KiB to 2 MiB. Default 64 KiB. */
  clusterSize?: number;
  /**
   * The layer below: its name is written into the header as given (a
   * relative name is relative to the image's directory, as qemu reads it)
   * and its content is what unallocated clusters read as.
   */
  backing?: { path: string; format: 'qcow2' | 'raw' };
  /** Where the image is written until commit. Default FINAL.partial. */
  partial?: string;
}

interface Cached {
  buf: Buffer;
  dirty: boolean;
}

const enum Kind { UNALLOCATED, ZERO, DATA }

interface State {
  kind: Kind;
  host: number;
}

function hostOf(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
}

function put64(b: Buffer, at: number, hi: number, lo: number): void {
  b.writeUInt32BE(hi >>> 0, at);
  b.writeUInt32BE(lo >>> 0, at + 4);
}

/** An L1 or data L2 entry for a host cluster with refcount 1. */
function putRef(b: Buffer, at: number, host: number): void {
  put64(b, at, COPIED_HI | Math.floor(host / 2 ** 32), host >>> 0);
}

function checkOptions(o: Qcow2SinkOptions): { cs: number; bits: number } {
  const cs = o.clusterSize ?? DEFAULT_CLUSTER_SIZE;
  if (!Number.isInteger(cs) || cs < MIN_CLUSTER_SIZE || cs > MAX_CLUSTER_SIZE || (cs & (cs - 1)) !== 0) {
    throw new InvalidArgumentError('clusterSize', `a power of two from ${MIN_CLUSTER_SIZE} to ${MAX_CLUSTER_SIZE}`, cs);
  }
  if (!Number.isSafeInteger(o.size) || o.size < 0) throw new InvalidArgumentError('size', 'a byte count', o.size);
  if (o.size % 512) throw new BlockferryError(ErrorCode.UNSUPPORTED_FEATURE, `a qcow2 image of ${o.size} bytes: qemu reads qcow2 in whole 512-byte sectors, so the virtual size must be a multiple of 512 (write this image raw)`);
  return { cs, bits: Math.log2(cs) };
}

/** Where the backing file is for reading it now: a relative name is relative to the final image's directory. */
function backingLocation(final: string, name: string): string {
  return isAbsolute(name) ? name : resolve(dirname(final), name);
}

function openBacking(final: string, b: NonNullable<Qcow2SinkOptions['backing']>): ImageSource {
  const at = backingLocation(final, b.path);
  return b.format === 'qcow2' ? openSource({ kind: 'qcow2', path: at }) : new FileImageSource(at);
}

/** The geometry every table size follows from. */
class Geometry {
  readonly cs: number;
  readonly l2Entries: number;
  /** Refcounts per refcount block (16 bits each). */
  readonly epb: number;
  readonly l1Size: number;
  readonly l1Clusters: number;
  readonly rtClusters: number;

  constructor(readonly size: number, readonly bits: number) {
    this.cs = 2 ** bits;
    this.l2Entries = this.cs / 8;
    this.epb = this.cs / 2;
    const dataClusters = Math.ceil(size / this.cs);
    this.l1Size = Math.ceil(dataClusters / this.l2Entries);
    if (this.l1Size * 8 > MAX_L1_BYTES) throw new BlockferryError(ErrorCode.IMAGE_TOO_LARGE, `a qcow2 image of ${size} bytes at ${this.cs}-byte clusters needs an L1 table over ${MAX_L1_BYTES} bytes (use larger clusters)`);
    this.l1Clusters = Math.max(1, Math.ceil((this.l1Size * 8) / this.cs));
    // Every cluster the file could hold at once, twice over (freed clusters wait for a checkpoint before reuse).
    const live = 1 + this.l1Clusters + this.l1Size + dataClusters;
    const budget = 2 * live + 64;
    const blocks = Math.ceil(budget / this.epb) + 2;
    this.rtClusters = Math.max(1, Math.ceil((blocks * 8) / this.cs));
  }

  /** Clusters the refcount table can count. */
  get capacity(): number {
    return (this.rtClusters * this.cs) / 8 * this.epb;
  }
}

/**
 * A qcow2 v3 image written into `partial` and renamed to its final name on
 * commit (created with O_EXCL | O_NOFOLLOW, reopened with O_NOFOLLOW, as
 * FileImageSink). See the top of this file for the design.
 */
export class Qcow2ImageSink implements ImageSink {
  readonly size: number;
  readonly clusterSize: number;
  readonly final: string;
  readonly partial: string;
  private readonly g: Geometry;
  private readonly l1: Buffer;
  private readonly l1Offset: number;
  private readonly l1Dirty = new Set<number>();
  private readonly rt: Buffer;
  private readonly rtOffset: number;
  private readonly rtDirty = new Set<number>();
  /** First cluster past everything allocated (the file is extended to it at checkpoints). */
  private next: number;
  private fileLength: number;
  /** Clusters with refcount 0 that may be reused, and those freed since the last checkpoint (not yet). */
  private free: number[] = [];
  private pendingFree: number[] = [];
  private readonly l2Cache = new Map<number, Cached>();
  private readonly refCache = new Map<number, Cached>();
  private readonly l2Max: number;
  private readonly refMax: number;
  /** Data writes behind the caller (bounded), shared with FileImageSink; metadata goes through writeAt at checkpoints. */
  private readonly writes: WriteQueue;
  private closing: Promise<void> | undefined;
  private lock: Promise<unknown> = Promise.resolve();
  private readonly engine = new Engine({ initialBytes: 2 * MAX_BLOCK_SIZE });
  private readonly scratch: Region;
  private readonly flags: Region;
  /** Checkpoints done (tests and benches read it). */
  checkpoints = 0;

  private constructor(
    private readonly fh: fsp.FileHandle,
    final: string,
    partial: string,
    g: Geometry,
    private readonly backing: ImageSource | undefined,
    state: { l1: Buffer; l1Offset: number; rt: Buffer; rtOffset: number; next: number; fileLength: number },
  ) {
    this.final = final;
    this.partial = partial;
    this.writes = new WriteQueue(fh, partial);
    this.g = g;
    this.size = g.size;
    this.clusterSize = g.cs;
    this.l1 = state.l1;
    this.l1Offset = state.l1Offset;
    this.rt = state.rt;
    this.rtOffset = state.rtOffset;
    this.next = state.next;
    this.fileLength = state.fileLength;
    this.l2Max = Math.max(4, Math.floor(L2_CACHE_BYTES / g.cs));
    this.refMax = Math.max(4, Math.floor(REFCOUNT_CACHE_BYTES / g.cs));
    this.scratch = this.engine.alloc(MAX_BLOCK_SIZE);
    this.flags = this.engine.alloc(64);
  }

  /** A new, empty image at `partial` (an existing partial file is replaced; a link planted there is refused). */
  static async create(final: string, options: Qcow2SinkOptions): Promise<Qcow2ImageSink> {
    const { bits } = checkOptions(options);
    const g = new Geometry(options.size, bits);
    const partial = options.partial ?? `${final}.partial`;
    const backingName = options.backing?.path;
    if (backingName !== undefined && (Buffer.byteLength(backingName) === 0 || Buffer.byteLength(backingName) > 1023)) {
      throw new InvalidArgumentError('backing.path', 'a file name of 1 to 1023 bytes', backingName);
    }
    const backing = options.backing ? openBacking(final, options.backing) : undefined;
    let fh: fsp.FileHandle | undefined;
    try {
      checkRegularOrAbsent(partial, 'partial image');
      await rm(partial, { force: true });
      fh = await openChecked(partial, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW);
      const rtOffset = g.cs;
      const l1Offset = (1 + g.rtClusters) * g.cs;
      const sink = new Qcow2ImageSink(fh, final, partial, g, backing, {
        l1: Buffer.alloc(g.l1Size * 8), l1Offset, rt: Buffer.alloc(g.rtClusters * g.cs), rtOffset,
        next: 1 + g.rtClusters + g.l1Clusters, fileLength: 0,
      });
      const header = headerCluster(g, l1Offset, rtOffset, options.backing);
      await sink.run(async () => {
        for (let c = 0; c < 1 + g.rtClusters + g.l1Clusters; c++) await sink.setRefcount(c, 1);
        await sink.writeAt(header, 0);
        await sink.checkpoint();
      });
      return sink;
    } catch (e) {
      backing?.close();
      await fh?.close().catch(() => {});
      throw ioError(e, partial, 'create');
    }
  }

  /**
   * The partial image of an earlier attempt: it must be a qcow2 v3 image
   * this writer made (same virtual size, cluster size and backing file).
   * Every table is read and checked, and clusters that a crash left
   * referenced by nothing (leaks) are given refcount 0, so they are reused
   * and the committed image checks clean. Anything else wrong with it is
   * IMAGE_CHANGED or CORRUPT: start over.
   */
  static async resume(final: string, options: Qcow2SinkOptions): Promise<Qcow2ImageSink> {
    checkOptions(options);
    const partial = options.partial ?? `${final}.partial`;
    const fh = await openChecked(partial, constants.O_RDWR | constants.O_NOFOLLOW);
    let backing: ImageSource | undefined;
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw new ImageError(ErrorCode.IMAGE_CHANGED, partial, 'is not a regular file');
      const fileLength = st.size;
      const head = Buffer.alloc(Math.min(fileLength, MAX_CLUSTER_SIZE));
      await readExact(fh, head, 0, partial);
      const bad = (detail: string): never => { throw new ImageError(ErrorCode.IMAGE_CHANGED, partial, `is not the qcow2 partial image of an earlier attempt: ${detail}`); };
      if (head.length < HEADER_LENGTH || head.readUInt32BE(0) !== QCOW2_MAGIC) bad('no qcow2 header');
      if (head.readUInt32BE(4) !== 3) bad(`version ${head.readUInt32BE(4)}`);
      const bits = head.readUInt32BE(20);
      const want = checkOptions(options);
      if (bits !== want.bits) bad(`${2 ** bits}-byte clusters, not ${want.cs}`);
      const g = new Geometry(options.size, bits);
      const u64 = (at: number) => head.readUInt32BE(at) * 2 ** 32 + head.readUInt32BE(at + 4);
      if (u64(24) !== options.size) bad(`virtual size ${u64(24)}, not ${options.size}`);
      if (head.readUInt32BE(32) !== 0 || head.readUInt32BE(60) !== 0 || u64(72) !== 0 || head.readUInt32BE(96) !== 4) bad('features this writer never sets');
      const l1Offset = u64(40), rtOffset = u64(48);
      if (head.readUInt32BE(36) !== g.l1Size || l1Offset !== (1 + g.rtClusters) * g.cs || rtOffset !== g.cs || head.readUInt32BE(56) !== g.rtClusters) bad('tables not where this writer puts them');
      const nameAt = u64(8), nameLen = head.readUInt32BE(16);
      const name = nameAt ? head.subarray(nameAt, nameAt + nameLen).toString('utf8') : undefined;
      if (name !== options.backing?.path) bad(`backing file ${JSON.stringify(name ?? null)}, not ${JSON.stringify(options.backing?.path ?? null)}`);
      if (fileLength < l1Offset + g.l1Clusters * g.cs) bad('shorter than its tables');
      const rt = Buffer.alloc(g.rtClusters * g.cs);
      const l1 = Buffer.alloc(g.l1Size * 8);
      await readExact(fh, rt, rtOffset, partial, true);
      await readExact(fh, l1, l1Offset, partial, true);
      backing = options.backing ? openBacking(final, options.backing) : undefined;
      const next = Math.ceil(fileLength / g.cs);
      const sink = new Qcow2ImageSink(fh, final, partial, g, backing, { l1, l1Offset, rt, rtOffset, next, fileLength });
      await sink.run(() => sink.repair());
      return sink;
    } catch (e) {
      backing?.close();
      await fh.close().catch(() => {});
      if (e instanceof BlockferryError) throw e;
      throw ioError(e, partial, 'resume');
    }
  }

  /**
   * A complete standalone image this writer made, opened in place for
   * reading and writing (serving it over NBD): resume() with the file as its
   * own partial, its virtual size and cluster size read from its header.
   * commit() is then a flush.
   */
  static async open(path: string): Promise<Qcow2ImageSink> {
    const fh = await openChecked(path, constants.O_RDONLY | constants.O_NOFOLLOW);
    const head = Buffer.alloc(32);
    try {
      await readExact(fh, head, 0, path);
    } finally {
      await fh.close();
    }
    if (head.readUInt32BE(0) !== QCOW2_MAGIC) throw new ImageError(ErrorCode.BAD_MAGIC, path, 'not a qcow2 file');
    const bits = head.readUInt32BE(20);
    if (bits < 12 || bits > 21) throw new ImageError(ErrorCode.CORRUPT, path, `cluster_bits ${bits}`);
    const size = head.readUInt32BE(24) * 2 ** 32 + head.readUInt32BE(28);
    return Qcow2ImageSink.resume(path, { size, clusterSize: 2 ** bits, partial: path });
  }

  // --- Serialisation and writes in flight ------------------------------------

  /** Runs f alone: metadata changes never interleave. */
  private run<T>(f: () => Promise<T>): Promise<T> {
    return this.enqueue(() => {
      if (this.closing) throw new InvalidArgumentError('sink', 'an open sink', 'a closed one');
      this.check();
      return f();
    });
  }

  private enqueue<T>(f: () => Promise<T>): Promise<T> {
    const p = this.lock.then(f);
    this.lock = p.catch(() => {});
    return p;
  }

  private check(): void {
    this.writes.check();
  }

  private settle(start: number, end: number): Promise<void> {
    return this.writes.settle(start, end);
  }

  private drain(): Promise<void> {
    return this.writes.drain();
  }

  /** Queues a data write at a host offset (write-behind, bounded). */
  private queueWrite(host: number, data: Uint8Array): Promise<void> {
    return this.writes.queue(host, data);
  }

  private writeAt(data: Uint8Array, position: number): Promise<void> {
    return this.writes.writeNow(position, data);
  }

  private async readAt(buf: Uint8Array, position: number): Promise<void> {
    await readExact(this.fh, buf, position, this.partial, true);
  }

  // --- Tables ---------------------------------------------------------------

  /** A cached table (L2 or refcount block), read on a miss; the most recently used last. */
  private async table(cache: Map<number, Cached>, offset: number): Promise<Cached> {
    const hit = cache.get(offset);
    if (hit) {
      cache.delete(offset);
      cache.set(offset, hit);
      return hit;
    }
    const c: Cached = { buf: Buffer.alloc(this.g.cs), dirty: false };
    await this.readAt(c.buf, offset);
    cache.set(offset, c);
    return c;
  }

  /**
   * Room in both caches for what one cluster's update needs, before it
   * starts (nothing is evicted in the middle of an update): clean tables
   * are dropped, least recently used first; if every one is dirty, a
   * checkpoint writes them. Also makes sure the refcount table has room.
   */
  private async reserve(): Promise<void> {
    for (const [cache, max] of [[this.l2Cache, this.l2Max - 1], [this.refCache, this.refMax - 3]] as const) {
      if (cache.size <= max) continue;
      let clean = 0;
      for (const c of cache.values()) if (!c.dirty) clean++;
      if (cache.size - clean > max) await this.checkpoint();
      for (const [k, c] of cache) {
        if (cache.size <= max) break;
        if (!c.dirty) cache.delete(k);
      }
    }
    if (this.free.length === 0 && this.next + 8 > this.g.capacity) {
      await this.checkpoint();
      if (this.free.length === 0 && this.next + 8 > this.g.capacity) {
        throw new BlockferryError(ErrorCode.INTERNAL, `${this.partial}: the refcount table is full (${this.g.capacity} clusters)`);
      }
    }
  }

  private refblockOffset(j: number): number {
    return hostOf(this.rt.readUInt32BE(j * 8), this.rt.readUInt32BE(j * 8 + 4));
  }

  /**
   * Sets the refcount of cluster k. A refcount block that does not exist
   * yet is placed at the end of the file: in its own range it counts itself;
   * otherwise its own refcount is set first (in the block of its range).
   */
  private async setRefcount(k: number, v: number): Promise<void> {
    const j = Math.floor(k / this.g.epb);
    let rb = this.refblockOffset(j);
    if (rb === 0) {
      const n = this.next++;
      const buf = Buffer.alloc(this.g.cs);
      if (Math.floor(n / this.g.epb) === j) buf.writeUInt16BE(1, (n % this.g.epb) * 2);
      else await this.setRefcount(n, 1);
      rb = n * this.g.cs;
      this.refCache.set(rb, { buf, dirty: true });
      put64(this.rt, j * 8, Math.floor(rb / 2 ** 32), rb >>> 0);
      this.rtDirty.add(j);
    }
    const t = await this.table(this.refCache, rb);
    t.buf.writeUInt16BE(v, (k % this.g.epb) * 2);
    t.dirty = true;
  }

  /** A new cluster with refcount 1: a freed one, else the next at the end of the file. */
  private async allocate(): Promise<number> {
    const k = this.free.pop() ?? this.next++;
    await this.setRefcount(k, 1);
    return k * this.g.cs;
  }

  private l1Entry(i: number): number {
    return hostOf(this.l1.readUInt32BE(i * 8), this.l1.readUInt32BE(i * 8 + 4));
  }

  /** What guest cluster c is in this layer. */
  private async state(c: number): Promise<State> {
    const t = this.l1Entry(Math.floor(c / this.g.l2Entries));
    if (t === 0) return { kind: Kind.UNALLOCATED, host: 0 };
    const l2 = await this.table(this.l2Cache, t);
    return entryState(l2.buf, (c % this.g.l2Entries) * 8);
  }

  /** Sets guest cluster c's L2 entry (host 0: unallocated, or zero with `zero`); a missing L2 table is allocated. */
  private async setEntry(c: number, host: number, zero: boolean): Promise<void> {
    const i = Math.floor(c / this.g.l2Entries);
    let t = this.l1Entry(i);
    let l2: Cached;
    if (t === 0) {
      if (host === 0 && !zero) return; // unallocated already
      t = await this.allocate();
      l2 = { buf: Buffer.alloc(this.g.cs), dirty: true };
      this.l2Cache.set(t, l2);
      putRef(this.l1, i * 8, t);
      this.l1Dirty.add(i);
    } else l2 = await this.table(this.l2Cache, t);
    const at = (c % this.g.l2Entries) * 8;
    if (host) putRef(l2.buf, at, host);
    else put64(l2.buf, at, 0, zero ? ZERO_LO : 0);
    l2.dirty = true;
  }

  // --- Checkpoints ----------------------------------------------------------

  /** Writes every changed table in crash-safe order (see the top of this file); everything written so far is durable. */
  private async checkpoint(): Promise<void> {
    await this.drain();
    const cs = this.g.cs;
    try {
      if (this.next * cs > this.fileLength) {
        await this.fh.truncate(this.next * cs);
        this.fileLength = this.next * cs;
      }
      // 1. Data (already written) and refcounts.
      for (const [off, c] of this.refCache) if (c.dirty) { await this.writeAt(c.buf, off); c.dirty = false; }
      await this.fh.datasync();
      // 2. The refcount table's new entries and the L2 tables.
      let wrote = false;
      for (const j of this.rtDirty) { await this.writeAt(this.rt.subarray(j * 8, j * 8 + 8), this.rtOffset + j * 8); wrote = true; }
      this.rtDirty.clear();
      for (const [off, c] of this.l2Cache) if (c.dirty) { await this.writeAt(c.buf, off); c.dirty = false; wrote = true; }
      if (wrote) await this.fh.datasync();
      // 3. L1 entries of new L2 tables.
      if (this.l1Dirty.size) {
        for (const i of this.l1Dirty) await this.writeAt(this.l1.subarray(i * 8, i * 8 + 8), this.l1Offset + i * 8);
        this.l1Dirty.clear();
        await this.fh.datasync();
      }
      // 4. Clusters nothing on disk references any more: refcount 0, then reusable.
      if (this.pendingFree.length) {
        const freed = this.pendingFree;
        this.pendingFree = [];
        for (const k of freed) await this.setRefcount(k, 0);
        for (const [off, c] of this.refCache) if (c.dirty) { await this.writeAt(c.buf, off); c.dirty = false; }
        await this.fh.datasync();
        this.free.push(...freed);
      }
      this.checkpoints++;
    } catch (e) {
      this.writes.failure ??= ioError(e, this.partial, 'metadata write');
      throw this.writes.failure;
    }
  }

  /**
   * resume(): walks L1 and L2, checks every offset, counts references, and
   * sets the refcount of clusters nobody references (leaks a crash left) to
   * 0; a referenced cluster without its refcount is CORRUPT (this writer's
   * ordering never leaves one). Work follows the allocated tables.
   */
  private async repair(): Promise<void> {
    const cs = this.g.cs, n = this.next;
    const corrupt = (detail: string): never => { throw new ImageError(ErrorCode.CORRUPT, this.partial, detail); };
    const refs = new Uint8Array(n);
    const mark = (off: number, what: string) => {
      if (off % cs || off >= this.fileLength) corrupt(`${what} at ${off} is unaligned or past the end of the file`);
      if (refs[off / cs]!++) corrupt(`cluster ${off / cs} is referenced twice (${what})`);
    };
    for (let c = 0; c < 1 + this.g.rtClusters + this.g.l1Clusters; c++) mark(c * cs, 'header or table');
    for (let i = 0; i < this.g.l1Size; i++) {
      const t = this.l1Entry(i);
      if (!t) continue;
      mark(t, 'L2 table');
      const l2 = await this.table(this.l2Cache, t);
      for (let e = 0; e < this.g.l2Entries; e++) {
        if (l2.buf.readUInt32BE(e * 8) & COMPRESSED_HI) corrupt('a compressed cluster (this writer writes none)');
        const s = entryState(l2.buf, e * 8);
        if (s.kind === Kind.DATA) mark(s.host, 'data cluster');
        else if (s.host) corrupt('a zero cluster with a host cluster (this writer writes none)');
      }
      if (this.l2Cache.size > this.l2Max) this.l2Cache.delete(this.l2Cache.keys().next().value!);
    }
    const rtEntries = this.rt.length / 8;
    for (let j = 0; j < rtEntries; j++) { const rb = this.refblockOffset(j); if (rb) mark(rb, 'refcount block'); }
    for (let j = 0; j < rtEntries; j++) {
      const rb = this.refblockOffset(j);
      const first = j * this.g.epb;
      if (!rb) {
        for (let k = first; k < Math.min(n, first + this.g.epb); k++) if (refs[k]) corrupt(`cluster ${k} is referenced but has no refcount block`);
        continue;
      }
      const t = await this.table(this.refCache, rb);
      for (let x = 0; x < this.g.epb; x++) {
        const k = first + x, rc = t.buf.readUInt16BE(x * 2), want = k < n ? refs[k]! : 0;
        if (rc < want) corrupt(`cluster ${k} is referenced but its refcount is ${rc}`);
        if (rc > want) { t.buf.writeUInt16BE(want, x * 2); t.dirty = true; }
        if (k < n && want === 0) this.free.push(k);
      }
      if (t.dirty) { await this.writeAt(t.buf, rb); t.dirty = false; }
      if (this.refCache.size > this.refMax) this.refCache.delete(this.refCache.keys().next().value!);
    }
    await this.fh.datasync();
  }

  // --- Zero detection and the backing file -----------------------------------

  /** Whether data is all zero bytes: the engine's WASM kernel, 1 MiB at a time. */
  private isZero(data: Uint8Array): boolean {
    for (let at = 0; at < data.length; at += MAX_BLOCK_SIZE) {
      const piece = data.subarray(at, Math.min(data.length, at + MAX_BLOCK_SIZE));
      this.engine.view(this.scratch, 0, piece.length).set(piece);
      if (this.engine.zeroFlagsAt(this.scratch.ptr, piece.length, MAX_BLOCK_SIZE, this.flags.ptr) !== 1) return false;
    }
    return true;
  }

  /** What the layer below holds at [offset, offset + buf.length): the backing chain, zeros past its end or without one. */
  private readBelow(buf: Uint8Array, offset: number): void {
    const b = this.backing;
    const inside = b ? Math.max(0, Math.min(buf.length, b.size - offset)) : 0;
    if (inside > 0) b!.readInto(buf, offset, inside);
    buf.fill(0, inside);
  }

  // --- The sink --------------------------------------------------------------

  /** Guest bytes in cluster c (the last one may be short). */
  private limit(c: number): number {
    return Math.min(this.g.cs, this.size - c * this.g.cs);
  }

  private inImage(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new InvalidArgumentError('range', `inside the image (${this.size} bytes)`, `${offset}+${length}`);
    }
  }

  /**
   * Writes data at offset (write-behind: resolves once the data writes are
   * under way). The caller must not change data afterwards.
   */
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.inImage(offset, data.length);
    await this.run(async () => {
      const cs = this.g.cs;
      for (let at = 0; at < data.length; ) {
        const c = Math.floor((offset + at) / cs);
        const within = (offset + at) % cs;
        const n = Math.min(data.length - at, this.limit(c) - within);
        await this.writeCluster(c, within, data.subarray(at, at + n));
        at += n;
      }
    });
  }

  /** One cluster's part of a write: in place into data, else a new cluster (read-modify-write from below), never one of zeros. */
  private async writeCluster(c: number, within: number, piece: Uint8Array): Promise<void> {
    await this.reserve();
    const limit = this.limit(c);
    const s = await this.state(c);
    const whole = within === 0 && piece.length === limit;
    if (s.kind === Kind.DATA) {
      if (whole && this.isZero(piece)) return this.drop(c, s);
      return this.queueWrite(s.host + within, piece);
    }
    let content = piece;
    if (!whole) {
      content = Buffer.alloc(limit);
      if (s.kind === Kind.UNALLOCATED && this.backing) this.readBelow(content, c * this.g.cs);
      content.set(piece, within);
    }
    if (this.isZero(content)) {
      if (s.kind === Kind.UNALLOCATED && this.backing) await this.setEntry(c, 0, true);
      return;
    }
    const host = await this.allocate();
    await this.queueWrite(host, content);
    await this.setEntry(c, host, false);
  }

  /** Cluster c reads as zeros from now on: a zero cluster over a backing file, unallocated without one; its data cluster is freed. */
  private async drop(c: number, s: State): Promise<void> {
    if (s.kind === Kind.UNALLOCATED && !this.backing) return;
    if (s.kind === Kind.ZERO) return;
    await this.setEntry(c, 0, !!this.backing);
    if (s.kind === Kind.DATA) this.pendingFree.push(s.host / this.g.cs);
  }

  /** Makes [offset, offset + length) read as zeros: whole clusters become zero (or unallocated), parts are written with zeros. */
  async zero(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    this.inImage(offset, length);
    await this.run(async () => {
      const cs = this.g.cs;
      let zeros: Buffer | undefined;
      for (let at = offset; at < offset + length; ) {
        const c = Math.floor(at / cs);
        const within = at % cs;
        const n = Math.min(offset + length - at, this.limit(c) - within);
        if (within === 0 && n === this.limit(c)) {
          await this.reserve();
          await this.drop(c, await this.state(c));
        } else {
          zeros ??= Buffer.alloc(cs);
          await this.writeCluster(c, within, zeros.subarray(0, n));
        }
        at += n;
      }
    });
  }

  /** Fills buf[0, length) from offset: this layer's data, zeros, or the backing chain. */
  async read(buf: Uint8Array, offset: number, length: number): Promise<void> {
    this.inImage(offset, length);
    await this.run(async () => {
      const cs = this.g.cs;
      for (let at = 0; at < length; ) {
        const c = Math.floor((offset + at) / cs);
        const within = (offset + at) % cs;
        const n = Math.min(length - at, this.limit(c) - within);
        await this.reserve();
        const s = await this.state(c);
        const out = buf.subarray(at, at + n);
        if (s.kind === Kind.DATA) {
          await this.settle(s.host + within, s.host + within + n);
          this.check();
          await this.readAt(out, s.host + within);
        } else if (s.kind === Kind.UNALLOCATED && this.backing) this.readBelow(out, offset + at);
        else out.fill(0);
        at += n;
      }
    });
  }

  /**
   * The data clusters of this layer inside the range (zero and unallocated
   * clusters excluded), coalesced. Synchronous: tables not in the cache are
   * read without being cached.
   */
  extents(offset: number, length: number): Extent[] {
    const out: Extent[] = [];
    if (length <= 0) return out;
    const end = Math.min(this.size, offset + length);
    const cs = this.g.cs, span = this.g.l2Entries * cs;
    for (let at = offset; at < end; ) {
      const i = Math.floor(at / span);
      const tableEnd = Math.min(end, (i + 1) * span);
      const t = this.l1Entry(i);
      if (t) {
        const l2 = this.l2Cache.get(t)?.buf ?? this.readTableSync(t);
        for (let c = Math.floor(at / cs); c * cs < tableEnd; c++) {
          if (entryState(l2, (c % this.g.l2Entries) * 8).kind !== Kind.DATA) continue;
          const s = Math.max(at, c * cs), e = Math.min(tableEnd, (c + 1) * cs);
          const last = out[out.length - 1];
          if (last && last.offset + last.length === s) last.length += e - s;
          else out.push({ offset: s, length: e - s });
        }
      }
      at = tableEnd;
    }
    return out;
  }

  private readTableSync(offset: number): Buffer {
    const buf = Buffer.alloc(this.g.cs);
    for (let at = 0; at < buf.length; ) {
      const n = readSync(this.fh.fd, buf, at, buf.length - at, offset + at);
      if (n === 0) throw new ImageError(ErrorCode.IMAGE_CHANGED, this.partial, `ended at byte ${offset + at}`);
      at += n;
    }
    return buf;
  }

  /** Everything written so far is durable, with its metadata (a checkpoint). */
  async flush(): Promise<void> {
    await this.run(() => this.checkpoint());
  }

  /** Durable, then visible under its final name (replacing what was there). The sink is closed. */
  async commit(): Promise<void> {
    await this.flush();
    await this.close();
    if (this.partial !== this.final) await rename(this.partial, this.final);
  }

  /**
   * Closes without committing: a last checkpoint leaves the partial image
   * consistent (`qemu-img check`: no errors, no leaks) for a resume. After a
   * failed write no checkpoint is made: the file keeps the metadata of the
   * last one, which references nothing that failed.
   */
  close(): Promise<void> {
    this.closing ??= this.enqueue(async () => {
      try {
        if (!this.writes.failure) await this.checkpoint().catch(() => {});
        else await this.writes.idle();
      } finally {
        this.backing?.close();
        this.l2Cache.clear();
        this.refCache.clear();
        await this.fh.close();
      }
    });
    return this.closing;
  }

  /** Bytes of tables held in memory now (caches, L1, refcount table): bounded, whatever the declared size. */
  get memoryBytes(): number {
    return (this.l2Cache.size + this.refCache.size) * this.g.cs + this.l1.length + this.rt.length;
  }
}

function entryState(b: Buffer, at: number): State {
  const hi = b.readUInt32BE(at), lo = b.readUInt32BE(at + 4);
  const host = hostOf(hi, lo);
  if (lo & ZERO_LO) return { kind: Kind.ZERO, host };
  if (host) return { kind: Kind.DATA, host };
  return { kind: Kind.UNALLOCATED, host: 0 };
}

/** Cluster 0: the header, the backing-format extension, the end of extensions, the backing file's name. */
function headerCluster(g: Geometry, l1Offset: number, rtOffset: number, backing: Qcow2SinkOptions['backing']): Buffer {
  const h = Buffer.alloc(g.cs);
  h.writeUInt32BE(QCOW2_MAGIC, 0);
  h.writeUInt32BE(3, 4);
  h.writeUInt32BE(g.bits, 20);
  put64(h, 24, Math.floor(g.size / 2 ** 32), g.size >>> 0);
  h.writeUInt32BE(0, 32); // crypt_method: none
  h.writeUInt32BE(g.l1Size, 36);
  put64(h, 40, Math.floor(l1Offset / 2 ** 32), l1Offset >>> 0);
  put64(h, 48, Math.floor(rtOffset / 2 ** 32), rtOffset >>> 0);
  h.writeUInt32BE(g.rtClusters, 56);
  // nb_snapshots, snapshots_offset, incompatible/compatible/autoclear features: all 0.
  h.writeUInt32BE(4, 96); // refcount_order: 16-bit refcounts
  h.writeUInt32BE(HEADER_LENGTH, 100);
  // Byte 104: compression type 0 (deflate; nothing is compressed), then padding to 112.
  let at = HEADER_LENGTH;
  if (backing) {
    const fmt = Buffer.from(backing.format, 'latin1');
    h.writeUInt32BE(EXT_BACKING_FORMAT, at);
    h.writeUInt32BE(fmt.length, at + 4);
    fmt.copy(h, at + 8);
    at += 8 + Math.ceil(fmt.length / 8) * 8;
  }
  at += 8; // end of extensions (type 0, length 0)
  if (backing) {
    const name = Buffer.from(backing.path, 'utf8');
    name.copy(h, at);
    put64(h, 8, 0, at);
    h.writeUInt32BE(name.length, 16);
  }
  return h;
}

/** Reads buf.length bytes at position; past the end of the file reads zeros when `zerosPastEnd` (holes at the end of a sparse file). */
async function readExact(fh: fsp.FileHandle, buf: Uint8Array, position: number, path: string, zerosPastEnd = false): Promise<void> {
  for (let at = 0; at < buf.length; ) {
    let bytesRead: number;
    try {
      ({ bytesRead } = await fh.read(buf, at, buf.length - at, position + at));
    } catch (cause) {
      throw new ImageError(ErrorCode.IMAGE_UNREADABLE, path, `read failed at byte ${position + at} (${(cause as NodeJS.ErrnoException).code ?? 'error'})`, { cause });
    }
    if (bytesRead === 0) {
      if (!zerosPastEnd) throw new ImageError(ErrorCode.IMAGE_CHANGED, path, `ended at byte ${position + at}`);
      buf.fill(0, at);
      return;
    }
    at += bytesRead;
  }
}
