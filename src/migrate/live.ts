// What a live migration measures to keep its downtime promise (paper 004:
// forced stop-and-copy, re-sends, LRU reordering; paper 002: write-count
// ordering): the rate rounds drain dirty blocks at, the rate the writer
// dirties them at, and the fixed cost of a cutover, from which it predicts
// the downtime of cutting over now; the order blocks go out in within a
// round (cold first, hot last); and a bounded cache of the versions last
// sent, for delta compression of re-sent blocks.
import type { Interval } from '../blocks/intervals.js';

/** Default downtime budget (QEMU's default downtime limit): 300 ms. */
export const DEFAULT_MAX_DOWNTIME_MS = 300;
/** Default time an unconvergeable migration keeps trying under `onStall: 'wait'` (and after throttling): 60 s. */
export const DEFAULT_STALL_TIMEOUT_MS = 60_000;

export type StallPolicy = 'wait' | 'force' | 'postcopy' | 'throttle';
export const STALL_POLICIES: readonly StallPolicy[] = ['wait', 'force', 'postcopy', 'throttle'];
export type SendOrder = 'hot-last' | 'address' | 'hot-first';

/** Why the rounds ended. */
export type CutoverReason = 'budget' | 'threshold' | 'max-rounds' | 'stall-force' | 'quiet' | 'switch';

/** What a throttle hook is told: slow the writer to `wantedRate` bytes/s (or lift the limit: `release`). */
export interface ThrottleInfo {
  round: number;
  /** Dirty bytes per second wanted from the writer (Infinity with release). */
  wantedRate: number;
  /** The writer's measured dirty rate and the rounds' drain rate, bytes per second. */
  dirtyRate: number;
  drainRate: number;
  /** 1 for the first request, 2 for the next (halved again), ... */
  step: number;
  /** The migration ended: lift the limit. */
  release?: boolean;
}

export interface StallReport {
  /** The round after which the stall was reported (0: right after the first pass). */
  round: number;
  dirtyRate: number;
  drainRate: number;
  /** Predicted downtime when the stall was reported, seconds, and the budget. */
  predictedSeconds: number;
  budgetSeconds: number;
  /**
   * What made it a stall: the writer outruns the rounds (dirty-rate), the
   * cutover's fixed cost alone exceeds the budget (fixed-cost), the rounds
   * converge to a dirty set that still does not fit (floor), or two rounds
   * gained less than 10 % each (no-progress).
   */
  cause: 'dirty-rate' | 'fixed-cost' | 'floor' | 'no-progress';
  action: StallPolicy;
}

export interface ThrottleReport {
  calls: number;
  /** Last rate asked for, bytes/s. */
  wantedRate: number;
  /** The writer's dirty rate before the first call and over the rounds after the last one, bytes/s. */
  dirtyRateBefore: number;
  dirtyRateAfter: number;
  /** 1 − after ÷ before: how far the writer was slowed (0.4 = 40 % slower). */
  slowedBy: number;
}

/** Rates from samples of (bytes, seconds), older samples weighing half as much at each new one. */
class Rate {
  private bytes = 0;
  private seconds = 0;
  samples = 0;
  add(bytes: number, seconds: number): void {
    if (!(seconds > 0)) return;
    this.bytes = 0.5 * this.bytes + bytes;
    this.seconds = 0.5 * this.seconds + seconds;
    this.samples++;
  }
  get value(): number {
    return this.seconds > 0 ? this.bytes / this.seconds : 0;
  }
  reset(): void {
    this.bytes = this.seconds = this.samples = 0;
  }
}

/** Verify rate assumed before one is measured, bytes/s. */
const DEFAULT_VERIFY_RATE = 200e6;

/**
 * The downtime model: downtime of a cutover now = the longer of the last
 * take's cost (the rescan or bitmap read the pause repeats, which runs while
 * the dirty blocks go out) and dirty bytes ÷ drain rate, + bytes to check ÷
 * verify rate + two round trips (the check's answer and COMMIT's). Each term
 * is measured as the migration goes.
 */
export class DowntimeModel {
  readonly drain = new Rate();
  readonly dirty = new Rate();
  readonly verifyRate = new Rate();
  /** Round trip of a SYNC (which includes the destination's journal save), seconds; smallest-recent. */
  rtt = 0;
  /** Seconds the last dirty-set take cost. */
  takeSeconds = 0;
  private rttSamples: number[] = [];
  private lastTakeAt: number | undefined;

  constructor(readonly budgetSeconds: number) {}

  /** Writes count from `at` (ms): the first take's dirty rate is measured from there. */
  startAt(at: number): void {
    this.lastTakeAt = at;
  }

  addRtt(seconds: number): void {
    this.rttSamples.push(seconds);
    if (this.rttSamples.length > 5) this.rttSamples.shift();
    // The median of the last few: one slow journal save does not swing the model.
    const s = [...this.rttSamples].sort((a, b) => a - b);
    this.rtt = s[Math.floor(s.length / 2)]!;
  }

  /** A take of the dirty set ended at `at` (ms) after `seconds`, finding `bytes`. */
  addTake(bytes: number, seconds: number, at: number): void {
    this.takeSeconds = seconds;
    if (this.lastTakeAt !== undefined) this.dirty.add(bytes, (at - this.lastTakeAt) / 1000);
    this.lastTakeAt = at;
  }

  /** Rounds measured (the first pass aside). */
  rounds = 0;

  /** A round (or the first pass) moved `bytes` of dirty blocks in `seconds`, SYNC included. */
  addRound(bytes: number, seconds: number, pass = false): void {
    if (bytes <= 0) return;
    // The pass only stands in until a round is measured: rounds re-send
    // scattered blocks, deltas and all, as the cutover will; the pass
    // streams runs beside the fingerprint exchange.
    if (!pass && this.rounds++ === 0) this.drain.reset();
    // The SYNC's round trip is in the round's time but not in the rate: it is a fixed cost of its own.
    this.drain.add(bytes, Math.max(seconds - this.rtt, 0.2 * seconds));
  }

  addVerify(bytes: number, seconds: number): void {
    if (bytes <= 0) return;
    this.verifyRate.add(bytes, Math.max(seconds - this.rtt, 0.2 * seconds));
  }

  /** Whether the drain rate is known well enough to promise anything. */
  get calibrated(): boolean {
    return this.drain.samples > 0 && this.drain.value > 0;
  }

  /** The fixed part of a cutover: what it costs with nothing dirty. */
  get fixedSeconds(): number {
    return this.takeSeconds + 2 * this.rtt;
  }

  /** Predicted downtime, seconds, of a cutover with `dirtyBytes` to send and `checkBytes` to verify. */
  predict(dirtyBytes: number, checkBytes = dirtyBytes): number {
    const drain = this.drain.value;
    // Until a check was timed: SHA-1 on both sides, one after the other, at a modest 200 MB/s.
    const verify = this.verifyRate.value || DEFAULT_VERIFY_RATE;
    // The take overlaps sending what was dirty before it (precopy's cutover): the longer of the two counts.
    return Math.max(this.takeSeconds, drain > 0 ? dirtyBytes / drain : 0) + 2 * this.rtt + checkBytes / verify;
  }
}

/**
 * Stall detection: the rounds cannot bring the prediction within the budget.
 * Called after each take with the prediction; answers the cause once it is
 * one (at the latest after the third round: two rounds without a 10 % gain).
 */
export class StallDetector {
  private history: number[] = [];
  check(model: DowntimeModel, predicted: number): StallReport['cause'] | undefined {
    this.history.push(predicted);
    // No verdict on the first pass's figures alone: one round is measured first.
    if (predicted <= model.budgetSeconds || !model.calibrated || model.rounds === 0) return undefined;
    if (model.fixedSeconds > model.budgetSeconds) return 'fixed-cost';
    if (model.dirty.samples > 0 && model.dirty.value >= model.drain.value) return 'dirty-rate';
    // Where the rounds converge to: each round also spends the take and two
    // round trips, during which the writer goes on, so the dirty set
    // shrinks towards dirty × overhead ÷ (1 − dirty ÷ drain), not to zero.
    if (model.dirty.samples > 1) {
      const r = model.dirty.value / model.drain.value;
      const floor = (model.dirty.value * model.fixedSeconds) / (1 - r);
      if (model.predict(floor) > model.budgetSeconds) return 'floor';
    }
    const h = this.history;
    const n = h.length;
    if (n >= 3 && h[n - 1]! > 0.9 * h[n - 2]! && h[n - 2]! > 0.9 * h[n - 3]!) return 'no-progress';
    return undefined;
  }
  /** Forget the history (after a throttle: the writer changed). */
  reset(): void {
    this.history = [];
  }
}

/**
 * The order blocks go out in within a round: by write count, cold first and
 * hot last (paper 004's LRU reordering, paper 002's write counts), address
 * order within a class so reads stay sequential. A hot block sent last is
 * less likely to be dirtied again before the next take. Counts come from a
 * tracked image's writeCounts, or are built from how often takes found a
 * block dirty (decayed, so the map holds only the last takes' dirty sets).
 */
export class HotOrder {
  private readonly seen = new Map<number, number>();

  constructor(private readonly counts?: ReadonlyMap<number, number>) {}

  /** Record a take (rescans): blocks found dirty gain one; others halve and go below a quarter. */
  observe(list: readonly Interval[]): void {
    if (this.counts) return;
    const now = new Set<number>();
    for (const iv of list) for (let b = iv.start; b < iv.start + iv.count; b++) now.add(b);
    for (const [b, c] of this.seen) {
      if (now.has(b)) continue;
      if (c / 2 < 0.5) this.seen.delete(b);
      else this.seen.set(b, c / 2);
    }
    for (const b of now) this.seen.set(b, (this.seen.get(b) ?? 0) + 1);
  }

  count(b: number): number {
    return (this.counts ?? this.seen).get(b) ?? 0;
  }

  /**
   * The intervals in sending order: classes by ⌊log2(count)⌋, coldest first
   * (or, `hottestFirst`, hottest first: paper 000's snapshot scheduling, the
   * VM's working set before the rest); address order inside a class.
   */
  arrange(list: readonly Interval[], hottestFirst = false): Interval[] {
    const classes: Interval[][] = [];
    for (const iv of list) {
      for (let b = iv.start; b < iv.start + iv.count; b++) {
        const c = this.count(b);
        const k = c <= 1 ? 0 : Math.min(31, Math.floor(Math.log2(c)));
        const cls = (classes[k] ??= []);
        const last = cls[cls.length - 1];
        if (last && last.start + last.count === b) last.count++;
        else cls.push({ start: b, count: 1 });
      }
    }
    return (hottestFirst ? [...classes].reverse() : classes).flatMap((c) => c ?? []);
  }

  /** Whether any block has a count (write counts given, or takes observed). */
  get known(): boolean {
    return (this.counts ?? this.seen).size > 0;
  }
}

/**
 * Versions of blocks last sent in this migration, for delta compression:
 * a bounded byte budget, least recently sent evicted first. Slots live in
 * slabs allocated as the cache fills, so an unused cache costs nothing.
 */
export class DeltaCache {
  private readonly slabs: Buffer[] = [];
  private readonly slotsPerSlab: number;
  private readonly capacity: number;
  private used = 0;
  private readonly free: number[] = [];
  /** block → slot, fingerprint, signature, length; Map order is the LRU order (oldest first). */
  private readonly entries = new Map<number, { slot: number; fp: bigint; sig: bigint; len: number }>();
  /** Tries and deltas that paid: the cache stops being consulted where deltas do not pay (random data). */
  tries = 0;
  hits = 0;

  constructor(budgetBytes: number, private readonly bs: number) {
    this.capacity = Math.max(0, Math.floor(budgetBytes / bs));
    this.slotsPerSlab = Math.max(1, Math.floor((1 << 20) / bs));
  }

  get size(): number {
    return this.entries.size;
  }

  /** Off once 1024 tries paid less than 2 % of the time: random rewrites gain nothing and cost a pass over each block. */
  get paying(): boolean {
    return this.capacity > 0 && (this.tries < 1024 || this.hits >= 0.02 * this.tries);
  }

  private bytesOf(slot: number, len: number): Buffer {
    const s = this.slabs[Math.floor(slot / this.slotsPerSlab)]!;
    const at = (slot % this.slotsPerSlab) * this.bs;
    return s.subarray(at, at + len);
  }

  /** The version of b last sent, if cached and still of content (fp, sig) there. */
  get(b: number): { fp: bigint; sig: bigint; bytes: Buffer } | undefined {
    const e = this.entries.get(b);
    return e ? { fp: e.fp, sig: e.sig, bytes: this.bytesOf(e.slot, e.len) } : undefined;
  }

  /** Records the version of b just sent (most recently used). */
  put(b: number, fp: bigint, sig: bigint, bytes: Uint8Array): void {
    if (this.capacity === 0) return;
    let e = this.entries.get(b);
    if (e) this.entries.delete(b);
    else {
      let slot = this.free.pop();
      if (slot === undefined) {
        if (this.used < this.capacity) {
          slot = this.used++;
          if (slot >= this.slabs.length * this.slotsPerSlab) this.slabs.push(Buffer.allocUnsafe(this.slotsPerSlab * this.bs));
        } else {
          const [oldest, old] = this.entries.entries().next().value as [number, { slot: number }];
          this.entries.delete(oldest);
          slot = old.slot;
        }
      }
      e = { slot, fp, sig, len: bytes.length };
    }
    e.fp = fp;
    e.sig = sig;
    e.len = bytes.length;
    this.bytesOf(e.slot, e.len).set(bytes);
    this.entries.set(b, e);
  }

  /** Forgets b (its content at the destination is not what was sent). */
  drop(b: number): void {
    const e = this.entries.get(b);
    if (!e) return;
    this.entries.delete(b);
    this.free.push(e.slot);
  }
}
