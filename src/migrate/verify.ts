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
const IN_FLIGHT = 64;
/** Data extents this close (in blocks) are read in one read with what lies between (as the sender's spans). */
const READ_GAP = 16;
/** Attempts at repairing extents the check finds different. */
const VERIFY_ATTEMPTS = 3;
/** Re-checks of extents that differ only where the destination's clients wrote (post-copy). */
const MAX_RECHECKS = 64;

type Extent = Interval & { data: boolean };

export class VerifyStream {
  private readonly bad: Extent[] = [];
  private readonly inflight: Promise<void>[] = [];

  constructor(private readonly check: EndToEndCheck) {}

  /** Sends the extents of these ranges now (in VERIFY frames of at most VERIFY_BATCH extents). */
  async add(ranges: Iterable<Interval>): Promise<void> {
    let batch: Extent[] = [];
    for (const x of this.check.extents(ranges)) {
      batch.push(x);
      if (batch.length === VERIFY_BATCH) { await this.send(batch); batch = []; }
    }
    if (batch.length) await this.send(batch);
  }

  private async send(list: Extent[]): Promise<void> {
    const p = this.check.request(list).then((bad) => { for (const x of bad) this.bad.push(x); });
    p.catch(() => {}); // reported by finish() (or by the wait below)
    this.inflight.push(p);
    if (this.inflight.length >= IN_FLIGHT) await this.inflight.shift();
  }

  async finish(): Promise<Extent[]> {
    await Promise.all(this.inflight.splice(0));
    return this.bad;
  }
}

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
  *extents(ranges: Iterable<Interval>): Generator<Extent> {
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

  /**
   * SHA-1 of each data extent of the list (undefined for zero ones). Data
   * extents that follow each other closely (scattered dirty blocks) are read
   * together, one read for up to EXTENT_BYTES_MAX: an NBD source pays a round
   * trip per read.
   */
  private digestsOf(list: Extent[]): (Uint8Array | undefined)[] {
    const out: (Uint8Array | undefined)[] = new Array(list.length);
    for (let i = 0; i < list.length; ) {
      if (!list[i]!.data) { i++; continue; }
      const start = list[i]!.start;
      let end = start + list[i]!.count, j = i + 1;
      for (; j < list.length; j++) {
        const x = list[j]!;
        if (!x.data || x.start < end || x.start - end > READ_GAP || x.start + x.count - start > this.per) break;
        end = x.start + x.count;
      }
      const len = intervalBytes(this.src.size, this.bs, start, end - start);
      this.src.readInto(this.engine.view(this.buf, 0, len), start * this.bs, len);
      for (let k = i; k < j; k++) {
        const x = list[k]!;
        this.engine.sha1At(this.buf.ptr + (x.start - start) * this.bs, intervalBytes(this.src.size, this.bs, x.start, x.count), this.digest.ptr);
        out[k] = this.engine.view(this.digest).slice();
      }
      i = j;
    }
    return out;
  }

  /** Checks the ranges once; returns the extents that differ. */
  async once(ranges: Iterable<Interval>): Promise<Extent[]> {
    const stream = this.stream();
    await stream.add(ranges);
    return stream.finish();
  }

  /**
   * A check that goes out piece by piece: add() sends VERIFY requests for
   * ranges as they become ready (during the transfer, right after each run's
   * blocks), up to IN_FLIGHT unanswered; finish() collects the extents that
   * differ. Hashing on both sides then overlaps the transfer.
   */
  stream(): VerifyStream {
    return new VerifyStream(this);
  }

  /** Sends one VERIFY request for a list of extents; resolves with those that differ. */
  request(list: Extent[]): Promise<Extent[]> {
    const digests = this.digestsOf(list);
    const msg: VerifyExtent[] = list.map((x, i) => (x.data ? { start: x.start, count: x.count, digest: digests[i]! } : { start: x.start, count: x.count }));
    return this.ch.request(VERIFY, msg, VERIFY_RESULT).then((idx) => idx.map((i) => {
      const x = list[i];
      if (!x) throw new BlockferryError(ErrorCode.PROTOCOL, `VERIFY_RESULT names extent ${i} of ${list.length}`);
      return x;
    }));
  }

  /**
   * The check with repairs (the image paused): extents that differ are sent
   * again (data) or zeroed (zero intervals), and checked again, up to
   * VERIFY_ATTEMPTS times, else ERR_BF_VERIFY_FAILED. Post-copy passes
   * `narrow` (takes out of a range the blocks the destination's clients
   * wrote: they are theirs) and `excused` (an extent that differs because
   * such a block is in it is checked again narrowed, not re-sent).
   */
  async repairing(
    ranges: Iterable<Interval>,
    sync: () => Promise<void>,
    narrow: (r: Interval[]) => Iterable<Interval> = (r) => r,
    excused: (x: Interval) => boolean = () => false,
  ): Promise<void> {
    let todo: Interval[] = [...ranges];
    // Re-checks of excused extents do not count as repairs; each one narrows
    // them by the blocks found written, so they end (bounded all the same).
    for (let attempt = 0, rechecks = 0; todo.length; attempt++) {
      const differ = await this.once(todo);
      if (!differ.length) return;
      const bad = differ.filter((x) => !excused(x));
      const recheck = differ.filter((x) => excused(x)).map(({ start, count }) => ({ start, count }));
      if (attempt === VERIFY_ATTEMPTS || rechecks === MAX_RECHECKS) {
        throw new BlockferryError(ErrorCode.VERIFY_FAILED, `${differ.length} extents still differ after ${VERIFY_ATTEMPTS} repairs; the destination image is not complete`);
      }
      if (!bad.length) { rechecks++; attempt--; todo = [...narrow(recheck)]; continue; }
      this.onRepair(bad.length);
      const zero = bad.filter((x) => !x.data);
      const data = IntervalSet.of(bad.filter((x) => x.data));
      if (zero.length) await this.ch.send(ZERO, zero.map(({ start, count }) => ({ start, count })));
      for (const iv of data) this.view.forget(iv.start, iv.count);
      const before = this.sender.counters.sent + this.sender.counters.copied;
      await this.sender.send(data, true);
      this.repaired += this.sender.counters.sent + this.sender.counters.copied - before;
      await sync();
      todo = [...narrow([...bad.map(({ start, count }) => ({ start, count })), ...recheck])];
    }
  }
}
