// A content store: blocks keyed by the SHA-1 of their bytes, for paper 003's
// intermediaries (and a destination's stage). Every block is appended to a
// segment file (a log: 20-byte SHA-1, u32 length, the bytes) before it is
// acknowledged, so what the store acknowledged survives a restart of its
// process; the file is fsynced in the background within a second (on the
// thread pool: an fsync per request would cap a store at a few MB/s on a
// busy disk), so a crash of the machine itself may lose the last second,
// which the destination then asks the source for. The most recent blocks, up to a
// memory limit, are also kept in memory and served from there. The index
// (SHA-1 → segment, offset, length) is rebuilt at open by reading the
// segments' record headers; a torn last record (a crash mid-append) is cut
// off. Nothing read back is trusted: every block served is hashed again, and
// one whose bytes no longer have its SHA-1 (a damaged disk, an edited file)
// is dropped and counted, never served.
//
// Capacity is the bytes of the segments (records included): a block that
// would go past it is refused (STASH_FULL), and the source sends it
// elsewhere. Cost follows the data: the index holds one entry per block held.
import { fsync } from 'node:fs';
import { closeSync, existsSync, fstatSync, fsyncSync, ftruncateSync, mkdirSync, openSync, readdirSync, readSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { BlockferryError, ErrorCode } from '../../errors.js';
import { DIGEST_BYTES, STASH_BAD, STASH_FULL, STASH_HELD, STASH_STORED } from '../../protocol/messages.js';

/** A record's header: the SHA-1, then the length (u32 LE). */
const RECORD_HEADER = DIGEST_BYTES + 4;
/** A segment is closed and a new one started past this size: a damaged file costs at most one segment's reads. */
const SEGMENT_BYTES = 64 << 20;
/** Largest block a record may hold (the protocol's largest block size). */
const MAX_RECORD = 1 << 20;
/** Default memory tier: 64 MiB of the most recent blocks. */
export const DEFAULT_MEMORY_BYTES = 64 << 20;

interface Entry {
  seg: number;
  /** Offset of the block's bytes in its segment. */
  off: number;
  len: number;
}

export interface StoreOptions {
  /** Bytes of segments the store may hold (records included). */
  capacity: number;
  /** Bytes of recent blocks also kept in memory. Default 64 MiB. */
  memoryBytes?: number;
}

const keyOf = (digest: Uint8Array) => Buffer.from(digest.buffer, digest.byteOffset, DIGEST_BYTES).toString('latin1');
export const sha1 = (data: Uint8Array): Buffer => createHash('sha1').update(data).digest();

export class ContentStore {
  private readonly index = new Map<string, Entry>();
  private readonly memory = new Map<string, Buffer>();
  private memoryUsed = 0;
  private readonly fds = new Map<number, number>();
  private seg = 0;
  private segSize = 0;
  private used = 0;
  private dirty = false;
  /** Blocks dropped because their bytes on disk no longer had their SHA-1; records cut off at open (a torn tail). */
  readonly damage = { corrupt: 0, truncated: 0 };

  private constructor(readonly dir: string, readonly options: StoreOptions) {}

  /** Opens (or creates) the store in dir, rebuilding its index from the segments. */
  static open(dir: string, options: StoreOptions): ContentStore {
    if (!(Number.isSafeInteger(options.capacity) && options.capacity > 0)) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `a store's capacity must be a positive number of bytes, not ${options.capacity}`);
    try {
      mkdirSync(dir, { recursive: true });
    } catch (e) {
      throw new BlockferryError(ErrorCode.DATA_DIR, `cannot create the store's directory ${dir}: ${(e as Error).message}`, { cause: e });
    }
    const s = new ContentStore(dir, options);
    const segs = readdirSync(dir).filter((f) => /^\d{8}\.seg$/.test(f)).map((f) => Number(f.slice(0, 8))).sort((a, b) => a - b);
    for (const n of segs) s.load(n);
    s.seg = segs.length ? segs[segs.length - 1]! : 0;
    s.segSize = segs.length ? fstatSync(s.fd(s.seg)).size : 0;
    return s;
  }

  private path(n: number): string {
    return join(this.dir, `${String(n).padStart(8, '0')}.seg`);
  }

  private fd(n: number): number {
    let fd = this.fds.get(n);
    if (fd === undefined) {
      fd = openSync(this.path(n), existsSync(this.path(n)) ? 'r+' : 'w+');
      this.fds.set(n, fd);
    }
    return fd;
  }

  /** Reads a segment's record headers into the index; a record that does not fit (a torn append) ends the segment there. */
  private load(n: number): void {
    const fd = this.fd(n);
    const size = fstatSync(fd).size;
    const header = Buffer.allocUnsafe(RECORD_HEADER);
    let at = 0;
    while (at < size) {
      if (at + RECORD_HEADER > size || readSync(fd, header, 0, RECORD_HEADER, at) !== RECORD_HEADER) break;
      const len = header.readUInt32LE(DIGEST_BYTES);
      if (len === 0 || len > MAX_RECORD || at + RECORD_HEADER + len > size) break;
      const k = keyOf(header);
      if (!this.index.has(k)) {
        this.index.set(k, { seg: n, off: at + RECORD_HEADER, len });
      }
      this.used += RECORD_HEADER + len;
      at += RECORD_HEADER + len;
    }
    if (at < size) {
      this.damage.truncated++;
      ftruncateSync(fd, at);
    }
  }

  /** Bytes it can still take. */
  get free(): number {
    return Math.max(0, this.options.capacity - this.used);
  }

  get blocks(): number {
    return this.index.size;
  }

  has(digest: Uint8Array): boolean {
    return this.index.has(keyOf(digest));
  }

  /**
   * Stores each block under its SHA-1 (digests: n × 20 bytes): STASH_STORED,
   * STASH_HELD (already here), STASH_FULL (no room) or STASH_BAD (the bytes
   * are not that SHA-1's). In the file before it returns (fsynced within a
   * second). `hashed`: the caller checked every block's SHA-1 already (the
   * gather keeps what it verified), so it is not hashed again.
   */
  put(digests: Uint8Array, blocks: Uint8Array[], hashed = false): number[] {
    const out = new Array<number>(blocks.length);
    // The records of one call are appended with one write (a segment boundary may split them in two).
    let pending: Buffer[] = [];
    let pendingAt = this.segSize;
    const flush = () => {
      if (!pending.length) return;
      const buf = pending.length === 1 ? pending[0]! : Buffer.concat(pending);
      writeSync(this.fd(this.seg), buf, 0, buf.length, pendingAt);
      pending = [];
    };
    try {
      for (let i = 0; i < blocks.length; i++) {
        const d = digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
        const data = blocks[i]!;
        const k = keyOf(d);
        if (this.index.has(k)) { out[i] = STASH_HELD; continue; }
        if (data.length === 0 || data.length > MAX_RECORD || (!hashed && !sha1(data).equals(d))) { out[i] = STASH_BAD; continue; }
        if (this.used + RECORD_HEADER + data.length > this.options.capacity) { out[i] = STASH_FULL; continue; }
        if (this.segSize + RECORD_HEADER + data.length > SEGMENT_BYTES && this.segSize > 0) {
          flush();
          this.seg++;
          this.segSize = 0;
          pendingAt = 0;
        }
        const header = Buffer.allocUnsafe(RECORD_HEADER);
        header.set(d, 0);
        header.writeUInt32LE(data.length, DIGEST_BYTES);
        pending.push(header, Buffer.from(data.buffer, data.byteOffset, data.length));
        this.index.set(k, { seg: this.seg, off: this.segSize + RECORD_HEADER, len: data.length });
        this.segSize += RECORD_HEADER + data.length;
        this.used += RECORD_HEADER + data.length;
        this.dirty = true;
        this.remember(k, data);
        out[i] = STASH_STORED;
      }
      flush();
    } catch (e) {
      // Not written: forget what this call added, so nothing unwritten is ever served.
      for (let i = 0; i < blocks.length; i++) if (out[i] === STASH_STORED) this.index.delete(keyOf(digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES)));
      throw e;
    }
    this.syncSoon();
    return out;
  }

  private syncTimer: NodeJS.Timeout | undefined;
  /** An fsync of the segments written, within a second, on the thread pool. */
  private syncSoon(): void {
    if (!this.dirty || this.syncTimer) return;
    this.syncTimer = setTimeout(() => {
      this.syncTimer = undefined;
      if (!this.dirty) return;
      this.dirty = false;
      for (const fd of this.fds.values()) fsync(fd, () => {});
    }, 1000);
    this.syncTimer.unref();
  }

  private remember(k: string, bytes: Uint8Array): void {
    const limit = this.options.memoryBytes ?? DEFAULT_MEMORY_BYTES;
    if (bytes.length > limit) return;
    const data = Buffer.from(bytes); // a copy: the caller's buffer (a frame) is not kept alive
    this.memory.set(k, data);
    this.memoryUsed += data.length;
    for (const [old, b] of this.memory) {
      if (this.memoryUsed <= limit) break;
      this.memory.delete(old);
      this.memoryUsed -= b.length;
    }
  }

  /** The block with this SHA-1, checked again; undefined when not held (or found damaged: then dropped and counted). */
  get(digest: Uint8Array): Buffer | undefined {
    try {
      return this.read(digest);
    } catch (e) {
      if (e instanceof BlockferryError && e.code === ErrorCode.STORE_CORRUPT) return undefined;
      throw e;
    }
  }

  /**
   * The block with this SHA-1, checked again; undefined when not held. Bytes
   * on disk that no longer have their SHA-1 (or cannot be read) throw
   * ERR_BF_STORE_CORRUPT, and the entry is dropped: never served.
   */
  read(digest: Uint8Array): Buffer | undefined {
    const k = keyOf(digest);
    const m = this.memory.get(k);
    if (m) return m;
    const e = this.index.get(k);
    if (!e) return undefined;
    const buf = Buffer.allocUnsafe(e.len);
    let got = 0;
    try {
      got = readSync(this.fd(e.seg), buf, 0, e.len, e.off);
    } catch { /* unreadable: treated as damaged */ }
    if (got !== e.len || !sha1(buf).equals(Buffer.from(digest.buffer, digest.byteOffset, DIGEST_BYTES))) {
      this.damage.corrupt++;
      this.index.delete(k); // its bytes stay counted in `used` until the segment goes
      throw new BlockferryError(ErrorCode.STORE_CORRUPT, `${this.path(e.seg)}: the block at offset ${e.off} (${e.len} bytes) is not what it is stored under (${Buffer.from(digest).toString('hex')}); dropped`);
    }
    return buf;
  }

  /** Makes every append durable now. */
  sync(): void {
    if (this.syncTimer) { clearTimeout(this.syncTimer); this.syncTimer = undefined; }
    if (!this.dirty) return;
    for (const fd of this.fds.values()) fsyncSync(fd);
    this.dirty = false;
  }

  close(): void {
    this.sync();
    for (const fd of this.fds.values()) closeSync(fd);
    this.fds.clear();
  }

  /** Drops everything (a finished migration's stage). */
  clear(): void {
    this.close();
    for (const f of readdirSync(this.dir)) if (/^\d{8}\.seg$/.test(f)) rmSync(join(this.dir, f), { force: true });
    this.index.clear();
    this.memory.clear();
    this.memoryUsed = 0;
    this.used = 0;
    this.seg = 0;
    this.segSize = 0;
  }
}
