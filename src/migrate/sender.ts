// Sends blocks as they are now: zero runs as intervals, content the
// destination already holds as copies, the rest as data with the
// fingerprint of the bytes read (the destination checks it). Frames go out
// in an order the destination can apply one after another: a COPY only ever
// names content whose BLOCKS frame went before it.
import { Engine } from '../engine/engine.js';
import { IntervalSet, blockLength, intervalBytes, split, type Interval } from '../blocks/intervals.js';
import type { Channel } from '../protocol/channel.js';
import { BLOCKS, BLOCKS_DELTA, COPY, ZERO, type Copy, type DeltaEntry } from '../protocol/messages.js';
import { encodeDelta } from '../protocol/delta.js';
import type { DeltaCache } from './live.js';
import type { ImageSource } from '../image/source.js';
import type { DestinationView } from './view.js';
import type { DirtyHold } from './hold.js';

/** Bytes of block data per BLOCKS frame: 1 MiB keeps frames far under the limit and the pipe full. */
export const DATA_BATCH = 1 << 20;

export interface SendCounters {
  /** Block contents sent over the wire. */
  sent: number;
  /** Blocks the destination copied from content it already holds. */
  copied: number;
  /** Blocks sent more than once. */
  resent: number;
  /** Blocks sent as deltas (BLOCKS_DELTA), their bytes, and the bytes of their codes and entries. */
  deltaBlocks: number;
  deltaRawBytes: number;
  deltaWireBytes: number;
  /** Bytes of blocks sent again (whole or as deltas), before frame compression: what re-sends cost. */
  resentBytes: number;
  /** Of the blocks sent again, those hot when sent (heat ≥ 2: written at least twice). */
  hotResent: number;
}

/**
 * Dirty blocks this close (in blocks) are read together with what lies
 * between them: 16 blocks (64 KiB) cost a local read far less than another
 * round trip to an NBD server (one is about 100 µs).
 */
const READ_GAP = 16;

/** Runs grouped into spans of at most `max` blocks, each next run starting at most `gap` blocks after the last one's end. */
function* spans(runs: Iterable<Interval>, max: number, gap: number): Generator<{ span: Interval; parts: Interval[] }> {
  let parts: Interval[] = [];
  let start = 0, end = 0;
  for (const iv of runs) {
    if (parts.length && iv.start >= end && iv.start - end <= gap && iv.start + iv.count - start <= max) {
      parts.push(iv);
      end = iv.start + iv.count;
      continue;
    }
    if (parts.length) yield { span: { start, count: end - start }, parts };
    parts = [iv];
    start = iv.start;
    end = iv.start + iv.count;
  }
  if (parts.length) yield { span: { start, count: end - start }, parts };
}

/** The smallest interval holding sorted parts. */
function cover(parts: Interval[]): Interval {
  const last = parts[parts.length - 1]!;
  return { start: parts[0]!.start, count: last.start + last.count - parts[0]!.start };
}

/** A delta entry's own bytes on the wire: block u64, fingerprint u64, length u32. */
const DELTA_ENTRY_BYTES = 20;

export class BlockSender {
  private readonly engine: Engine;
  private readonly window;
  private readonly fps;
  private readonly sigs;
  private readonly flags;
  /** Blocks whose content went over the wire at least once (for `resent`). */
  private readonly everSent = new IntervalSet();
  /** Blocks this sender changed at the destination since the last takeTouched(). */
  private touched = new IntervalSet();
  readonly counters: SendCounters = { sent: 0, copied: 0, resent: 0, deltaBlocks: 0, deltaRawBytes: 0, deltaWireBytes: 0, resentBytes: 0, hotResent: 0 };
  /** Delta entries being gathered, and their codes. */
  private deltas: DeltaEntry[] = [];
  /** Off once the destination serves the image (post-copy): a delta's base may be a block its clients rewrote. */
  deltasAllowed = true;
  /** While live: blocks found dirty since their round began are skipped (hold.ts); never for repairs (`force`). */
  hold: DirtyHold | undefined;
  private deltaBytes = 0;
  private readonly deltaData: Buffer;

  // A frame being built.
  private runs: Interval[] = [];
  private frameFps: bigint[] = [];
  /** The frame's block bytes, gathered out of the read window (reused: encoding copies it into the payload). */
  private readonly frameData = Buffer.allocUnsafe(2 * DATA_BATCH + (1 << 20));
  private frameBytes = 0;
  private copies: Copy[] = [];
  private zeros = new IntervalSet();

  constructor(
    private readonly ch: Channel,
    private readonly src: ImageSource,
    private readonly view: DestinationView,
    private readonly bs: number,
    /** Versions last sent, for BLOCKS_DELTA (undefined: no deltas). */
    private readonly cache?: DeltaCache,
    /** How hot a block is (its write count), for the hotResent counter. */
    private readonly heat?: (b: number) => number,
    /** Called right before blocks are read (a tracked image clears their dirty bits: writes after the read count). */
    private readonly beforeRead?: (iv: Interval) => void,
  ) {
    this.deltaData = cache ? Buffer.allocUnsafe(2 * DATA_BATCH + 2 * bs + 64) : Buffer.alloc(0);
    const per = Math.max(1, Math.floor(DATA_BATCH / bs));
    this.engine = new Engine({ initialBytes: per * bs + (4 << 20) });
    this.window = this.engine.alloc(per * bs);
    this.fps = this.engine.alloc(per * 8);
    this.sigs = this.engine.alloc(per * 8);
    this.flags = this.engine.alloc(per);
  }

  get readEngine(): Engine {
    return this.engine;
  }

  private len(b: number): number {
    return blockLength(this.src.size, this.bs, b);
  }

  /** The blocks changed at the destination since the last call. */
  takeTouched(): IntervalSet {
    const t = this.touched;
    this.touched = new IntervalSet();
    return t;
  }

  /**
   * Sends the given intervals as they read now. With `force`, blocks are sent
   * even where the destination is believed to hold them (repairs).
   */
  async send(intervals: Iterable<Interval>, force = false): Promise<void> {
    const per = Math.max(1, Math.floor(DATA_BATCH / this.bs));
    for (const { span, parts } of spans(split(intervals, per), per, READ_GAP)) {
      const hold = force ? undefined : this.hold;
      let wanted = parts;
      if (hold) {
        hold.tick();
        wanted = parts.flatMap((iv) => hold.pass(iv));
      }
      if (wanted.length) await this.sendSpan(wanted.length === parts.length ? span : cover(wanted), wanted, force);
      for (const iv of parts) this.onBatch?.(iv);
    }
    await this.flush();
  }

  /**
   * Reads `span` (at most DATA_BATCH of blocks) in one read and queues the
   * frames of the blocks in `parts` (sorted, inside it): scattered dirty
   * blocks cost one read per span, not one each (an NBD source pays a round
   * trip per read). The blocks between parts are read and ignored.
   */
  private async sendSpan(span: Interval, parts: Interval[], force: boolean): Promise<void> {
    const len = intervalBytes(this.src.size, this.bs, span.start, span.count);
    const view = this.engine.view(this.window, 0, len);
    for (const iv of parts) this.beforeRead?.(iv);
    this.src.readInto(view, span.start * this.bs, len);
    this.engine.zeroFlagsAt(this.window.ptr, len, this.bs, this.flags.ptr);
    this.engine.fingerprintBlocksAt(this.window.ptr, len, this.bs, this.fps.ptr, this.sigs.ptr);
    const flags = this.engine.view(this.flags, 0, span.count);
    const fps = new BigUint64Array(this.engine.memory.buffer, this.fps.ptr, span.count);
    const sigs = new BigUint64Array(this.engine.memory.buffer, this.sigs.ptr, span.count);
    let dataStart = -1;
    const closeData = (end: number) => {
      if (dataStart < 0) return;
      const off = (dataStart - span.start) * this.bs;
      const bytes = intervalBytes(this.src.size, this.bs, dataStart, end - dataStart);
      this.runs.push({ start: dataStart, count: end - dataStart });
      this.frameData.set(view.subarray(off, off + bytes), this.frameBytes); // the window is reused
      this.frameBytes += bytes;
      dataStart = -1;
    };
    for (const iv of parts) {
      for (let b = iv.start; b < iv.start + iv.count; b++) {
        const k = b - span.start;
        if (flags[k]) {
          closeData(b);
          if (force || this.view.content(b) !== null) {
            this.zeros.add(b, 1);
            this.view.setZero(b, 1);
            this.touched.add(b, 1);
          }
          continue;
        }
        const fp = fps[k]!, sig = sigs[k]!;
        if (!force && this.view.holds(b, fp, sig)) { closeData(b); continue; }
        const hb = this.view.copySource(b, fp, sig, (x) => this.len(x) === this.len(b));
        if (hb >= 0) {
          closeData(b);
          this.copies.push({ dst: b, src: hb, fingerprint: fp });
          this.view.set(b, fp, sig, false);
          this.touched.add(b, 1);
          this.counters.copied++;
          continue;
        }
        const len = this.len(b);
        const bytes = view.subarray(k * this.bs, k * this.bs + len);
        const again = this.everSent.has(b);
        if (again) {
          this.counters.resent++;
          this.counters.resentBytes += len;
          if (this.heat && this.heat(b) >= 2) this.counters.hotResent++;
        }
        this.everSent.add(b, 1);
        this.counters.sent++;
        this.touched.add(b, 1);
        if (!force && this.tryDelta(b, fp, bytes)) {
          closeData(b);
          this.view.set(b, fp, sig);
          this.cache!.put(b, fp, sig, bytes);
          continue;
        }
        if (dataStart < 0) dataStart = b;
        this.frameFps.push(fp);
        this.view.set(b, fp, sig);
        this.cache?.put(b, fp, sig, bytes);
      }
      closeData(iv.start + iv.count);
    }
    // A frame is full, or it holds the image's last block (a short block must end its frame).
    const atEnd = (span.start + span.count) * this.bs >= this.src.size;
    if (atEnd || this.frameBytes >= DATA_BATCH || this.deltaBytes >= DATA_BATCH || this.deltas.length >= 16384 || this.copies.length >= 16384 || this.zeros.runs >= 16384) await this.flush();
  }

  /** Told after each batch of blocks send() has read and queued (for progress inside a long run). */
  onBatch: ((iv: Interval) => void) | undefined;

  /**
   * Block b as a delta against the version last sent, when the destination
   * holds that version (as far as this side knows) and the code is smaller
   * than the block; the code goes into the delta frame being gathered.
   */
  private tryDelta(b: number, fp: bigint, bytes: Uint8Array): boolean {
    const cache = this.cache;
    if (!cache || !cache.paying || !this.deltasAllowed) return false;
    const prev = cache.get(b);
    if (!prev || prev.bytes.length !== bytes.length) return false;
    const c = this.view.content(b);
    if (!c || c[0] !== prev.fp || c[1] !== prev.sig) return false;
    cache.tries++;
    // Worth it only when clearly smaller than the block and its BLOCKS entry (fingerprint, run).
    const limit = bytes.length - DELTA_ENTRY_BYTES - 64;
    const n = encodeDelta(prev.bytes, bytes, this.deltaData.subarray(this.deltaBytes), limit);
    if (n < 0) return false;
    cache.hits++;
    this.deltas.push({ block: b, fingerprint: fp, length: n });
    this.deltaBytes += n;
    this.counters.deltaBlocks++;
    this.counters.deltaRawBytes += bytes.length;
    this.counters.deltaWireBytes += n + DELTA_ENTRY_BYTES;
    return true;
  }

  /** Sends what is pending: the data first, then deltas and copies (which may name it), then the zero runs. */
  async flush(): Promise<void> {
    if (this.runs.length) {
      const data = this.frameData.subarray(0, this.frameBytes);
      const m = { runs: this.runs, fingerprints: BigUint64Array.from(this.frameFps), data };
      this.runs = [];
      this.frameFps = [];
      this.frameBytes = 0;
      await this.ch.send(BLOCKS, m);
    }
    if (this.deltas.length) {
      const m = { entries: this.deltas, codes: this.deltaData.subarray(0, this.deltaBytes) };
      this.deltas = [];
      this.deltaBytes = 0;
      await this.ch.send(BLOCKS_DELTA, m); // encoding copies the codes out of the reused buffer
    }
    if (this.copies.length) {
      const c = this.copies;
      this.copies = [];
      await this.ch.send(COPY, c);
    }
    if (this.zeros.runs) {
      const z = [...this.zeros];
      this.zeros = new IntervalSet();
      await this.ch.send(ZERO, z);
    }
  }
}
