import { BlockSizeError, InvalidArgumentError, OutOfMemoryError } from '../errors.js';
import { createHash } from 'node:crypto';
import { instantiateCore, wasmModule, type WasmCore } from './wasm.js';
import { chooseBackend, type BackendChoice, type BackendName } from './backend.js';

/** Smallest block size the block-level kernels accept: one disk sector. */
export const MIN_BLOCK_SIZE = 512;
/** Largest block size: beyond 1 MiB, dedup finds almost nothing in VM images. */
export const MAX_BLOCK_SIZE = 1 << 20;
/** Bytes in one SHA-1 digest. */
export const DIGEST_BYTES = 20;

const PAGE = 65536;
/** wasm32 addresses stop at 4 GiB (65536 pages). */
const MAX_PAGES = 65536;
/** Low memory kept for the SHA-1 scratch area; address 0 is never handed out. */
const RESERVED = 1024;

/** A byte range of an engine's linear memory: stable across memory growth. */
export interface Region {
  readonly ptr: number;
  readonly length: number;
}

export interface EngineOptions {
  /** Initial size of the linear memory in bytes (rounded up to 64 KiB pages). */
  initialBytes?: number;
  /** A precompiled core module (workers receive it to skip compilation). */
  module?: WebAssembly.Module;
  /** Force a backend (default: BLOCKFERRY_BACKEND, else the fastest available; src/engine/backend.ts). */
  backend?: BackendName;
}

/** Throws unless bs is a power of two in [MIN_BLOCK_SIZE, MAX_BLOCK_SIZE]. */
export function checkBlockSize(bs: unknown): asserts bs is number {
  if (typeof bs !== 'number' || !Number.isInteger(bs) || bs < MIN_BLOCK_SIZE || bs > MAX_BLOCK_SIZE || (bs & (bs - 1)) !== 0) {
    throw new BlockSizeError(bs, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE);
  }
}

/** Number of blocks of bs bytes that cover len bytes (the last may be short). */
export function blockCount(len: number, bs: number): number {
  return Math.ceil(len / bs);
}

const align = (n: number, a: number) => Math.ceil(n / a) * a;

/**
 * One instance of the WASM core over its own linear memory, and the memory
 * layout that TypeScript owns: a bump allocator for long-lived regions (read
 * windows, result arrays) and a transient area above them for the copying
 * convenience calls. Kernels take addresses; nothing is allocated inside WASM.
 *
 * Two kinds of calls:
 * - `...At(ptr, ...)`: zero-copy, on data the caller placed in a region
 *   (e.g. `fs.readSync(fd, engine.view(window))`). These are the hot paths.
 * - `sha1(data)`, `fingerprints(data, bs)`, ...: copy the input in and the
 *   results out. For tests, small inputs and programs that hold a Buffer.
 */
export class Engine {
  readonly memory: WebAssembly.Memory;
  readonly core: WasmCore;
  /** Which implementation runs SHA-1, and the native addon for system calls (or null). */
  readonly backend: BackendChoice;
  private top = RESERVED;
  private u8: Uint8Array;

  constructor(options: EngineOptions = {}) {
    const pages = Math.max(1, Math.ceil((options.initialBytes ?? 1 << 20) / PAGE));
    if (pages > MAX_PAGES) throw new OutOfMemoryError(options.initialBytes ?? 0, MAX_PAGES * PAGE);
    this.memory = new WebAssembly.Memory({ initial: pages, maximum: MAX_PAGES });
    this.core = instantiateCore(this.memory, options.module ?? wasmModule());
    this.u8 = new Uint8Array(this.memory.buffer);
    this.backend = chooseBackend(options.backend);
  }

  /** A view of all of linear memory; re-read after anything that may grow it. */
  get bytes(): Uint8Array {
    if (this.u8.buffer !== this.memory.buffer) this.u8 = new Uint8Array(this.memory.buffer);
    return this.u8;
  }

  /** A Uint8Array over (part of) a region; valid until memory grows. */
  view(region: Region, offset = 0, length = region.length - offset): Uint8Array {
    if (offset < 0 || length < 0 || offset + length > region.length) {
      throw new InvalidArgumentError('view', `a range inside the region's ${region.length} bytes`, `${offset}+${length}`);
    }
    return new Uint8Array(this.memory.buffer, region.ptr + offset, length);
  }

  /** A BigUint64Array over a region (8-byte aligned by alloc). */
  view64(region: Region): BigUint64Array {
    return new BigUint64Array(this.memory.buffer, region.ptr, Math.floor(region.length / 8));
  }

  /** Grows linear memory so that [0, end) exists. */
  ensure(end: number): void {
    const have = this.memory.buffer.byteLength;
    if (end <= have) return;
    const pages = Math.ceil(end / PAGE);
    if (pages > MAX_PAGES) throw new OutOfMemoryError(end, MAX_PAGES * PAGE);
    // Grow geometrically so that a series of small growths stays linear.
    const want = Math.min(MAX_PAGES, Math.max(pages, Math.ceil((have / PAGE) * 1.25)));
    this.memory.grow(want - have / PAGE);
  }

  /** A long-lived region of size bytes (64-byte aligned, zero-filled on first use). */
  alloc(size: number, alignment = 64): Region {
    if (!Number.isInteger(size) || size < 0) throw new InvalidArgumentError('size', 'a byte count', size);
    const ptr = align(this.top, alignment);
    this.ensure(ptr + size);
    this.top = ptr + size;
    return { ptr, length: size };
  }

  /** Bytes handed out by alloc so far. */
  get allocated(): number {
    return this.top;
  }

  /** A transient area of size bytes above every region: valid until the next alloc or temp. */
  private temp(size: number): number {
    const ptr = align(this.top, 64);
    this.ensure(ptr + size + 64);
    return ptr;
  }

  private checkRange(what: string, ptr: number, len: number): void {
    if (!Number.isInteger(ptr) || !Number.isInteger(len) || ptr < RESERVED || len < 0 || ptr + len > this.memory.buffer.byteLength) {
      throw new InvalidArgumentError(what, `a range inside linear memory (${this.memory.buffer.byteLength} bytes)`, `${ptr}+${len}`);
    }
  }

  // --- zero-copy kernels -------------------------------------------------

  /** SHA-1 of [ptr, ptr+len) to out (20 bytes). */
  sha1At(ptr: number, len: number, out: number): void {
    this.checkRange('data', ptr, len);
    this.checkRange('out', out, DIGEST_BYTES);
    this.sha1Raw(ptr, len, out);
  }

  private sha1Raw(ptr: number, len: number, out: number): void {
    const buf = this.memory.buffer;
    if (this.backend.sha1 === 'native') this.backend.native!.sha1(new Uint8Array(buf, ptr, len), new Uint8Array(buf, out, DIGEST_BYTES));
    else if (this.backend.sha1 === 'js') new Uint8Array(buf, out, DIGEST_BYTES).set(createHash('sha1').update(new Uint8Array(buf, ptr, len)).digest());
    else this.core.sha1(ptr, len, out, 0);
  }

  private sha1BlocksRaw(ptr: number, len: number, bs: number, out: number): number {
    const buf = this.memory.buffer;
    const n = blockCount(len, bs);
    if (this.backend.sha1 === 'native') {
      return this.backend.native!.sha1Blocks(new Uint8Array(buf, ptr, len), bs, new Uint8Array(buf, out, n * DIGEST_BYTES));
    }
    if (this.backend.sha1 === 'js') {
      const u8 = new Uint8Array(buf);
      for (let i = 0; i < n; i++) {
        const start = ptr + i * bs;
        u8.set(createHash('sha1').update(u8.subarray(start, Math.min(ptr + len, start + bs))).digest(), out + i * DIGEST_BYTES);
      }
      return n;
    }
    return this.core.sha1Blocks(ptr, len, bs, out, 0);
  }

  /** SHA-1 of every block of [ptr, ptr+len) to out (20 bytes each). Returns the block count. */
  sha1BlocksAt(ptr: number, len: number, bs: number, out: number): number {
    checkBlockSize(bs);
    this.checkRange('data', ptr, len);
    this.checkRange('out', out, blockCount(len, bs) * DIGEST_BYTES);
    return this.sha1BlocksRaw(ptr, len, bs, out);
  }

  /** Fingerprint and signature of every block, as u64 arrays at outFp and outSig (0 to skip one). */
  fingerprintBlocksAt(ptr: number, len: number, bs: number, outFp: number, outSig: number): number {
    checkBlockSize(bs);
    this.checkRange('data', ptr, len);
    const n = blockCount(len, bs);
    if (outFp) this.checkRange('outFp', outFp, n * 8);
    if (outSig) this.checkRange('outSig', outSig, n * 8);
    if ((outFp | outSig) & 7) throw new InvalidArgumentError('outFp/outSig', '8-byte aligned addresses', `${outFp}/${outSig}`);
    return this.core.fingerprintBlocks(ptr, len, bs, outFp, outSig);
  }

  /** One flag byte per block at outFlags (1 = all zero). Returns the number of zero blocks. */
  zeroFlagsAt(ptr: number, len: number, bs: number, outFlags: number): number {
    checkBlockSize(bs);
    this.checkRange('data', ptr, len);
    this.checkRange('outFlags', outFlags, blockCount(len, bs));
    return this.core.zeroFlags(ptr, len, bs, outFlags);
  }

  /**
   * Runs of set (non-zero) flags among n at flags, or of clear ones with
   * set = false, as (first, count) u32 pairs at out. Returns the run count.
   */
  flagRunsAt(flags: number, n: number, out: number, set = true): number {
    this.checkRange('flags', flags, n);
    this.checkRange('out', out, Math.ceil(n / 2) * 8);
    if (out & 3) throw new InvalidArgumentError('out', 'a 4-byte aligned address', out);
    return this.core.flagRuns(flags, n, out, set ? 1 : 0);
  }

  // --- copying conveniences ------------------------------------------------

  private copyIn(data: Uint8Array, extra: number): number {
    if (!(data instanceof Uint8Array)) throw new InvalidArgumentError('data', 'a Uint8Array or Buffer', data);
    const ptr = this.temp(align(data.length, 64) + extra);
    this.bytes.set(data, ptr);
    return ptr;
  }

  /** SHA-1 of data (20 bytes). */
  sha1(data: Uint8Array): Uint8Array {
    const p = this.copyIn(data, DIGEST_BYTES);
    const out = p + align(data.length, 64);
    this.sha1Raw(p, data.length, out);
    return this.bytes.slice(out, out + DIGEST_BYTES);
  }

  /** SHA-1 of each block of data: blockCount × 20 bytes. */
  sha1Blocks(data: Uint8Array, bs: number): Uint8Array {
    checkBlockSize(bs);
    const n = blockCount(data.length, bs);
    const p = this.copyIn(data, n * DIGEST_BYTES);
    const out = p + align(data.length, 64);
    this.sha1BlocksRaw(p, data.length, bs, out);
    return this.bytes.slice(out, out + n * DIGEST_BYTES);
  }

  /** XXH3-64 (seed 0) of data. */
  xxh3(data: Uint8Array): bigint {
    const p = this.copyIn(data, 0);
    return BigInt.asUintN(64, this.core.xxh3(p, data.length));
  }

  /** Fingerprint (XXH3-64) and signature (bytes 8..15, LE) of each block of data. */
  fingerprints(data: Uint8Array, bs: number): { fingerprints: BigUint64Array; signatures: BigUint64Array } {
    checkBlockSize(bs);
    const n = blockCount(data.length, bs);
    const p = this.copyIn(data, n * 16);
    const fp = p + align(data.length, 64);
    this.core.fingerprintBlocks(p, data.length, bs, fp, fp + n * 8);
    const all = new BigUint64Array(this.memory.buffer.slice(fp, fp + n * 16));
    return { fingerprints: all.subarray(0, n), signatures: all.subarray(n) };
  }

  /** One flag per block of data: 1 when the block is all zero. */
  zeroFlags(data: Uint8Array, bs: number): Uint8Array {
    checkBlockSize(bs);
    const n = blockCount(data.length, bs);
    const p = this.copyIn(data, n);
    const out = p + align(data.length, 64);
    this.core.zeroFlags(p, data.length, bs, out);
    return this.bytes.slice(out, out + n);
  }

  /** The runs of set (non-zero) flag bytes, or of clear ones, as [first, count] pairs. */
  flagRuns(flags: Uint8Array, set = true): Array<[number, number]> {
    const n = flags.length;
    const p = this.copyIn(flags, Math.ceil(n / 2) * 8 + 64);
    const runs = p + align(n, 64);
    const count = this.core.flagRuns(p, n, runs, set ? 1 : 0);
    const u32 = new Uint32Array(this.memory.buffer, runs, count * 2);
    const out: Array<[number, number]> = [];
    for (let i = 0; i < count; i++) out.push([u32[2 * i]!, u32[2 * i + 1]!]);
    return out;
  }

  /** The runs of zero blocks of data, as [first block, count] pairs. */
  zeroRuns(data: Uint8Array, bs: number): Array<[number, number]> {
    return this.flagRuns(this.zeroFlags(data, bs));
  }
}
