// The end-to-end check: the SHA-1 of every data extent the destination
// should hold, and one zero marker per zero interval (no read on either
// side: the destination checks it against its own record). Its cost follows
// the data; several VERIFY requests are in flight at once, so hashing on
// this side overlaps hashing on the other.
import { Engine, DIGEST_BYTES } from '../engine/engine.js';
import { BlockferryError, ErrorCode } from '../errors.js';
import { IntervalSet, intervalBytes, type Interval } from '../blocks/intervals.js';
import type { Channel } from '../protocol/channel.js';
import { VERIFY, VERIFY_RESULT, ZERO, type VerifyExtent } from '../protocol/messages.js';
import type { ImageSource } from '../image/source.js';
import type { DestinationView } from './view.js';
import type { BlockSender } from './sender.js';

/** Blocks per data extent: 256 (1 MiB at 4 KiB), at most 16 MiB of bytes. */
export const EXTENT_BLOCKS = 256;
const EXTENT_BYTES_MAX = 16 << 20;
/** Extents per VERIFY frame, and frames in flight. */
const VERIFY_BATCH = 4096;
const IN_FLIGHT = 4;
/** Attempts at repairing extents the check finds different. */
const VERIFY_ATTEMPTS = 3;

export class EndToEndCheck {
  private readonly per: number;
  private readonly engine: Engine;
  private readonly buf;
  private readonly digest;
  repaired = 0;

  constructor(
    private readonly ch: Channel,
    private readonly src: ImageSource,
    private readonly view: DestinationView,
    private readonly bs: number,
    private readonly sender: BlockSender,
    private readonly onRepair: (extents: number) => void = () => {},
  ) {
    this.per = Math.max(1, Math.min(EXTENT_BLOCKS, Math.floor(EXTENT_BYTES_MAX / bs)));
    this.engine = new Engine({ initialBytes: this.per * bs + (1 << 16) });
    this.buf = this.engine.alloc(this.per * bs);
    this.digest = this.engine.alloc(DIGEST_BYTES);
  }

  /** The extents covering `ranges`: each zero gap as one entry, data cut at EXTENT_BLOCKS-aligned boundaries. */
  *extents(ranges: Iterable<Interval>): Generator<Interval & { data: boolean }> {
    for (const r of ranges) {
      let at = r.start;
      const end = r.start + r.count;
      for (const d of this.view.data.within(r.start, r.count)) {
        if (d.start > at) yield { start: at, count: d.start - at, data: false };
        for (let s = d.start; s < d.start + d.count; ) {
          const e = Math.min(d.start + d.count, (Math.floor(s / this.per) + 1) * this.per);
          yield { start: s, count: e - s, data: true };
          s = e;
        }
        at = d.start + d.count;
      }
      if (at < end) yield { start: at, count: end - at, data: false };
    }
  }

  private digestOf(x: Interval): Uint8Array {
    const len = intervalBytes(this.src.size, this.bs, x.start, x.count);
    this.src.readInto(this.engine.view(this.buf, 0, len), x.start * this.bs, len);
    this.engine.sha1At(this.buf.ptr, len, this.digest.ptr);
    return this.engine.view(this.digest).slice();
  }

  /** Checks the ranges once; returns the extents that differ. */
  async once(ranges: Iterable<Interval>): Promise<Array<Interval & { data: boolean }>> {
    const bad: Array<Interval & { data: boolean }> = [];
    const inflight: Promise<void>[] = [];
    let batch: Array<Interval & { data: boolean }> = [];
    const sendBatch = async () => {
      const list = batch;
      batch = [];
      const msg: VerifyExtent[] = list.map((x) => (x.data ? { start: x.start, count: x.count, digest: this.digestOf(x) } : { start: x.start, count: x.count }));
      inflight.push(this.ch.request(VERIFY, msg, VERIFY_RESULT).then((idx) => {
        for (const i of idx) {
          const x = list[i];
          if (!x) throw new BlockferryError(ErrorCode.PROTOCOL, `VERIFY_RESULT names extent ${i} of ${list.length}`);
          bad.push(x);
        }
      }));
      if (inflight.length >= IN_FLIGHT) await inflight.shift();
    };
    for (const x of this.extents(ranges)) {
      batch.push(x);
      if (batch.length === VERIFY_BATCH) await sendBatch();
    }
    if (batch.length) await sendBatch();
    await Promise.all(inflight);
    return bad;
  }

  /**
   * The check with repairs (the image paused): extents that differ are sent
   * again (data) or zeroed (zero intervals), and checked again, up to
   * VERIFY_ATTEMPTS times, else ERR_BF_VERIFY_FAILED.
   */
  async repairing(ranges: Iterable<Interval>, sync: () => Promise<void>): Promise<void> {
    let todo: Interval[] = [...ranges];
    for (let attempt = 0; todo.length; attempt++) {
      const bad = await this.once(todo);
      if (!bad.length) return;
      if (attempt === VERIFY_ATTEMPTS) {
        throw new BlockferryError(ErrorCode.VERIFY_FAILED, `${bad.length} extents still differ after ${VERIFY_ATTEMPTS} repairs; the destination image is not complete`);
      }
      this.onRepair(bad.length);
      const zero = bad.filter((x) => !x.data);
      const data = IntervalSet.of(bad.filter((x) => x.data));
      if (zero.length) await this.ch.send(ZERO, zero.map(({ start, count }) => ({ start, count })));
      for (const iv of data) this.view.forget(iv.start, iv.count);
      const before = this.sender.counters.sent + this.sender.counters.copied;
      await this.sender.send(data, true);
      this.repaired += this.sender.counters.sent + this.sender.counters.copied - before;
      await sync();
      todo = bad;
    }
  }
}
