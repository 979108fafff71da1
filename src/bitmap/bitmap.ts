import { Engine, type Region } from '../engine/engine.js';
import { InvalidArgumentError } from '../errors.js';

/** A run of equal bits: [start, start + length). */
export interface Run {
  start: number;
  length: number;
}

/** Runs fetched from WASM per call while iterating. */
const RUN_BATCH = 4096;
/** wasm32 bit positions are u32. */
export const MAX_BITS = 2 ** 32 - 1;

/**
 * A bitmap in WASM memory: the dirty bitmap of a tracked image, the "blocks
 * still to send" set of a migration round. Bit i is bit (i & 7) of byte i >> 3.
 * Range operations and run scans are WASM kernels; get/set of one bit are
 * plain JS on the same bytes.
 */
export class Bitmap {
  readonly nbits: number;
  readonly engine: Engine;
  private readonly region: Region;
  private readonly runs: Region;

  constructor(nbits: number, engine?: Engine) {
    if (!Number.isInteger(nbits) || nbits < 0 || nbits > MAX_BITS) {
      throw new InvalidArgumentError('nbits', `an integer from 0 to ${MAX_BITS}`, nbits);
    }
    this.nbits = nbits;
    // Whole words, plus 64 bytes so that 64-byte vector loads near the end stay in bounds.
    const bytes = Math.ceil(nbits / 64) * 8 + 64;
    this.engine = engine ?? new Engine({ initialBytes: bytes + RUN_BATCH * 8 + 4096 });
    this.region = this.engine.alloc(bytes);
    this.runs = this.engine.alloc(RUN_BATCH * 8);
  }

  /** The bitmap's bytes (ceil(nbits / 8) of them), a live view: valid until memory grows. */
  bytes(): Uint8Array {
    return this.engine.view(this.region, 0, Math.ceil(this.nbits / 8));
  }

  private checkRange(start: number, count: number): void {
    if (!Number.isInteger(start) || !Number.isInteger(count) || start < 0 || count < 0 || start + count > this.nbits) {
      throw new InvalidArgumentError('range', `bits inside [0, ${this.nbits})`, `${start}+${count}`);
    }
  }

  get(i: number): boolean {
    this.checkRange(i, 1);
    return ((this.engine.bytes[this.region.ptr + (i >>> 3)]! >>> (i & 7)) & 1) === 1;
  }

  set(i: number): void {
    this.checkRange(i, 1);
    this.engine.bytes[this.region.ptr + (i >>> 3)]! |= 1 << (i & 7);
  }

  clear(i: number): void {
    this.checkRange(i, 1);
    this.engine.bytes[this.region.ptr + (i >>> 3)]! &= ~(1 << (i & 7));
  }

  setRange(start: number, count: number): void {
    this.checkRange(start, count);
    this.engine.core.bitmapFill(this.region.ptr, start, count, 1);
  }

  clearRange(start: number, count: number): void {
    this.checkRange(start, count);
    this.engine.core.bitmapFill(this.region.ptr, start, count, 0);
  }

  /** Set bits among [start, start + count) (all bits by default). */
  count(start = 0, count = this.nbits - start): number {
    this.checkRange(start, count);
    return this.engine.core.bitmapCount(this.region.ptr, start, count);
  }

  /** The first run of set (or clear) bits starting at or after from, or undefined. */
  nextRun(from = 0, set = true): Run | undefined {
    if (from >= this.nbits) return undefined;
    this.checkRange(from, 0);
    const n = this.engine.core.bitmapRuns(this.region.ptr, this.nbits, from, set ? 1 : 0, this.runs.ptr, 1);
    if (n === 0) return undefined;
    const u32 = new Uint32Array(this.engine.memory.buffer, this.runs.ptr, 2);
    return { start: u32[0]!, length: u32[1]! };
  }

  /** Every run of set (or clear) bits from `from` on, in order. Do not resize the bitmap meanwhile. */
  *allRuns(set = true, from = 0): Generator<Run> {
    this.checkRange(Math.min(from, this.nbits), 0);
    let pos = from;
    while (pos < this.nbits) {
      const n = this.engine.core.bitmapRuns(this.region.ptr, this.nbits, pos, set ? 1 : 0, this.runs.ptr, RUN_BATCH);
      if (n === 0) return;
      const u32 = new Uint32Array(this.engine.memory.buffer, this.runs.ptr, 2 * n).slice();
      for (let i = 0; i < n; i++) yield { start: u32[2 * i]!, length: u32[2 * i + 1]! };
      pos = u32[2 * n - 2]! + u32[2 * n - 1]!;
      if (n < RUN_BATCH) return;
    }
  }

  /** Copies bits from a byte array in this bitmap's layout (e.g. one saved with bytes()). */
  load(bytes: Uint8Array): void {
    const need = Math.ceil(this.nbits / 8);
    if (bytes.length !== need) throw new InvalidArgumentError('bytes', `${need} bytes`, `${bytes.length} bytes`);
    this.engine.bytes.set(bytes, this.region.ptr);
  }
}
