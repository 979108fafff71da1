// Sends blocks as they are now: zero runs as intervals, content the
// destination already holds as copies, the rest as data with the
// fingerprint of the bytes read (the destination checks it). Frames go out
// in an order the destination can apply one after another: a COPY only ever
// names content whose BLOCKS frame went before it.
import { Engine } from '../engine/engine.js';
import { IntervalSet, blockLength, intervalBytes, split, type Interval } from '../blocks/intervals.js';
import type { Channel } from '../protocol/channel.js';
import { BLOCKS, COPY, ZERO, type Copy } from '../protocol/messages.js';
import type { ImageSource } from '../image/source.js';
import type { DestinationView } from './view.js';

/** Bytes of block data per BLOCKS frame: 1 MiB keeps frames far under the limit and the pipe full. */
export const DATA_BATCH = 1 << 20;

export interface SendCounters {
  /** Block contents sent over the wire. */
  sent: number;
  /** Blocks the destination copied from content it already holds. */
  copied: number;
  /** Blocks sent more than once. */
  resent: number;
}

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
  readonly counters: SendCounters = { sent: 0, copied: 0, resent: 0 };

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
  ) {
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
    for (const iv of split(intervals, per)) {
      const len = intervalBytes(this.src.size, this.bs, iv.start, iv.count);
      const view = this.engine.view(this.window, 0, len);
      this.src.readInto(view, iv.start * this.bs, len);
      this.engine.zeroFlagsAt(this.window.ptr, len, this.bs, this.flags.ptr);
      this.engine.fingerprintBlocksAt(this.window.ptr, len, this.bs, this.fps.ptr, this.sigs.ptr);
      const flags = this.engine.view(this.flags, 0, iv.count);
      const fps = new BigUint64Array(this.engine.memory.buffer, this.fps.ptr, iv.count);
      const sigs = new BigUint64Array(this.engine.memory.buffer, this.sigs.ptr, iv.count);
      let dataStart = -1;
      const closeData = (end: number) => {
        if (dataStart < 0) return;
        const off = (dataStart - iv.start) * this.bs;
        const bytes = intervalBytes(this.src.size, this.bs, dataStart, end - dataStart);
        this.runs.push({ start: dataStart, count: end - dataStart });
        this.frameData.set(view.subarray(off, off + bytes), this.frameBytes); // the window is reused
        this.frameBytes += bytes;
        dataStart = -1;
      };
      for (let k = 0; k < iv.count; k++) {
        const b = iv.start + k;
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
        if (dataStart < 0) dataStart = b;
        this.frameFps.push(fp);
        this.view.set(b, fp, sig);
        this.touched.add(b, 1);
        if (this.everSent.has(b)) this.counters.resent++;
        this.everSent.add(b, 1);
        this.counters.sent++;
      }
      closeData(iv.start + iv.count);
      // A frame is full, or it holds the image's last block (a short block must end its frame).
      const atEnd = (iv.start + iv.count) * this.bs >= this.src.size;
      if (atEnd || this.frameBytes >= DATA_BATCH || this.copies.length >= 16384 || this.zeros.runs >= 16384) await this.flush();
    }
    await this.flush();
  }

  /** Sends what is pending: the data first, then the copies (which may name it), then the zero runs. */
  async flush(): Promise<void> {
    if (this.runs.length) {
      const data = this.frameData.subarray(0, this.frameBytes);
      const m = { runs: this.runs, fingerprints: BigUint64Array.from(this.frameFps), data };
      this.runs = [];
      this.frameFps = [];
      this.frameBytes = 0;
      await this.ch.send(BLOCKS, m);
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
