// Post-copy and hybrid (paper 002, and the post-copy and hybrid sections of
// paper 004). The source pauses, the destination takes over at once
// (SWITCH) and serves the image while the source pushes what it lacks; a
// read there of a block that has not arrived is PULLed ahead of the push.
// Hybrid first runs pre-copy (the first pass and rounds of cold blocks:
// blocks written Threshold times or more wait, they would be dirtied
// again), then switches, and pushes the rest hottest first (the VM at the
// destination will touch them soonest).
import { IntervalSet, split, type Interval } from '../blocks/intervals.js';
import { BlockferryError, ErrorCode } from '../errors.js';
import { Msg } from '../protocol/frame.js';
import { COMMIT, DONE, FILL_NEIGHBOURS, FILL_REPOSITORY, MISSING, OWNED, PROBE, PROBE_OK, PULL, ROUND, SWITCH, SWITCH_OK, ZERO, decode, trafficTotal } from '../protocol/messages.js';
import { firstPass, phaseClock, precopyParts, type PrecopyParts } from './pass.js';
import { countingDirty, dirtySourceFor, type DirtySource } from './rounds.js';
import { CAP_POSTCOPY, CAP_SIMILARITY } from '../protocol/handshake.js';
import type { MigrationContext, Strategy, StrategyOutcome } from './strategy.js';
import { DEFAULT_MAX_DOWNTIME_MS, type StallReport } from './live.js';

/** Blocks per push step: small, so that a demand read waits behind little. */
const PUSH_BLOCKS = 2;
/**
 * Bytes pushed between two PROBEs, and PROBEs unanswered at most: at most
 * (PROBES_IN_FLIGHT + 1) × PROBE_EVERY bytes of pushed data queue ahead of
 * a PULL's answer (in socket buffers and on the link). 24 KiB is 2 ms at
 * 100 Mbit/s, and still well above a LAN's bandwidth-delay product: the
 * bench pushes at line rate with it.
 */
const PROBE_EVERY = 8 << 10;
const PROBES_IN_FLIGHT = 2;
/** Intervals per MISSING frame. */
const MISSING_BATCH = 65536;
/** Default Threshold (paper 002): blocks written this many times or more are hot. */
export const DEFAULT_HOT_THRESHOLD = 2;

const blocksIn = (list: Iterable<Interval>) => { let n = 0; for (const iv of list) n += iv.count; return n; };

/** Strategy "postcopy": switch at once, then push everything while demand reads pull. */
export const postcopy: Strategy = { name: 'postcopy', fills: 0, requires: CAP_POSTCOPY, postcopyOnStall: true, run: (ctx) => run(ctx, false) };
/** Strategy "hybrid" (paper 002): pre-copy of cold blocks with the neighbourhood's fills, then post-copy of the rest, hottest first. */
export const hybrid: Strategy = { name: 'hybrid', fills: FILL_NEIGHBOURS | FILL_REPOSITORY, requires: CAP_POSTCOPY | CAP_SIMILARITY, postcopyOnStall: true, run: (ctx) => run(ctx, true) };

async function run(ctx: MigrationContext, withPrecopy: boolean): Promise<StrategyOutcome> {
  const { ch, map, blockSize: bs, live } = ctx;
  const { phases, lap } = phaseClock();
  const parts = precopyParts(ctx);
  const { view, sender, sync } = parts;
  const counts = new Map<number, number>();
  const dirty = countingDirty(dirtySourceFor({ dirty: ctx.dirty, tracked: live.tracked, rescan: live.rescan, scanner: ctx.scanner, path: ctx.path, blockSize: ctx.blockSize, format: ctx.format }, view), counts);
  const writes = (b: number) => live.tracked?.writeCounts.get(b) ?? counts.get(b) ?? 0;
  const threshold = live.hotThreshold ?? DEFAULT_HOT_THRESHOLD;
  const resumedSwitch = ctx.begin.switched;

  // Blocks the destination must not take as the source's: the pre-copy's
  // leftovers (hybrid), or everything (post-copy).
  const stale = new IntervalSet();
  let rounds = 0;
  let drainRate = 0, dirtyRate = 0;
  const verifyNow = new IntervalSet();
  if (withPrecopy && !resumedSwitch) {
    const t0 = performance.now(), sent0 = trafficTotal(ch.sent), written0 = live.tracked?.bytesWritten ?? 0;
    const hotInPass = new IntervalSet();
    const stream = await firstPass(ctx, parts, { hot: (b) => writes(b) >= threshold, into: hotInPass });
    lap('transfer');
    // Rounds of cold blocks: hot ones are left for after the switch. When the
    // writer wrote during the first pass at half the rate the link drained or
    // more, rounds would chase it: switch at once instead.
    const seconds = Math.max(1e-3, (performance.now() - t0) / 1000);
    const drain = (trafficTotal(ch.sent) - sent0) / seconds;
    drainRate = drain;
    let pending = await dirty.take();
    // The writer's rate: bytes written (rewrites count: they are what rounds chase), or distinct blocks dirtied.
    dirtyRate = Math.max(blocksIn(pending) * bs, (live.tracked?.bytesWritten ?? 0) - written0) / seconds;
    let maxRounds = live.maxRounds ?? 8;
    if (dirtyRate >= drain / 2) {
      ctx.event('stall', { dirtyRate, drain, action: 'switch' });
      maxRounds = 0;
    }
    // Every block dirtied since it was sent waits for the switch, unless a round sends it again.
    const deferred = IntervalSet.of(pending);
    for (const iv of hotInPass) deferred.add(iv.start, iv.count);
    while (rounds < maxRounds) {
      const cold = new IntervalSet();
      for (const iv of pending) for (let b = iv.start; b < iv.start + iv.count; b++) if (writes(b) < threshold) cold.add(b, 1);
      if (cold.size <= (live.dirtyThreshold ?? 256)) break;
      for (const iv of cold) deferred.delete(iv.start, iv.count);
      rounds++;
      ctx.event('round', { round: rounds, dirty: cold.size, deferred: deferred.size });
      await ch.send(ROUND, { round: rounds });
      await sender.send(cold);
      await sync();
      pending = await dirty.take();
      for (const iv of pending) deferred.add(iv.start, iv.count);
    }
    lap('rounds');
    // Extents the first pass's check found different hold blocks written since
    // they were sent: those are in the dirty set; the final check covers the rest.
    for (const x of await stream.finish()) verifyNow.add(x.start, x.count);
    for (const iv of sender.takeTouched()) verifyNow.add(iv.start, iv.count);
    for (const iv of deferred) stale.add(iv.start, iv.count);
  } else if (!resumedSwitch) {
    stale.add(0, map.count);
  }

  return switchOver(ctx, parts, { stale, verify: verifyNow, dirty, writes: withPrecopy ? writes : undefined, rounds, drainRate, dirtyRate, phases, lap });
}

/** Where a migration stands when it switches to post-copy. */
export interface SwitchState {
  /** Blocks the destination must not take as the source's (the dirty set taken at the pause is added). */
  stale: IntervalSet;
  /** Blocks to check end to end after the push, beside what it sends. */
  verify: IntervalSet;
  dirty: DirtySource;
  /** Write counts: the push goes hottest first; without them, in address order. */
  writes: ((b: number) => number) | undefined;
  rounds: number;
  drainRate: number;
  dirtyRate: number;
  phases: Record<string, number>;
  lap: (name: string) => void;
  stall?: StallReport;
}

/**
 * The switch and the post-copy phase: pause, MISSING and SWITCH, resume (the
 * destination serves the image from then on), the push with demand pulls
 * first, the end-to-end check, COMMIT. Post-copy and hybrid end here, and
 * pre-copy when its rounds stall with --on-stall postcopy.
 */
export async function switchOver(ctx: MigrationContext, parts: PrecopyParts, st: SwitchState): Promise<StrategyOutcome> {
  const { ch, map, blockSize: bs, live } = ctx;
  const { view, sender, check, sync } = parts;
  const { stale, dirty, lap, rounds } = st;
  const resumedSwitch = ctx.begin.switched;
  sender.deltasAllowed = false;
  // The switch: pause here, the destination serves from now on. Its cost is
  // about two round trips (MISSING and SWITCH) and the pause itself.
  const tRtt = performance.now();
  await ch.request(PROBE, undefined, PROBE_OK); // answered at once (a SYNC would wait for a journal save)
  const rtt = (performance.now() - tRtt) / 1000;
  const predicted = 2 * rtt;
  ctx.event('cutover', { missing: stale.size, predictedDowntime: predicted });
  const tPause = performance.now();
  await live.pause?.();
  const tTake = performance.now();
  for (const iv of await dirty.take()) stale.add(iv.start, iv.count);
  const tSwitch = performance.now();
  if (!resumedSwitch) {
    const list = [...stale];
    for (let i = 0; i < list.length; i += MISSING_BATCH) await ch.send(MISSING, list.slice(i, i + MISSING_BATCH));
  }
  for (const iv of stale) view.forget(iv.start, iv.count);
  const held = await ch.request(SWITCH, undefined, SWITCH_OK);
  const remaining = new IntervalSet();
  remaining.add(0, map.count);
  for (const iv of held) remaining.delete(iv.start, iv.count);
  const missingAtSwitch = remaining.size;
  const tResume = performance.now();
  await live.resume?.();
  const tEnd = performance.now();
  const downtime = (tEnd - tPause) / 1000;
  lap('cutover');

  // Post-copy: demand pulls first, then the background push.
  const push = new Pusher(ctx, parts, remaining, resumedSwitch ? [] : order(remaining, st.writes));
  await push.run();
  lap('postcopy');

  // The end-to-end check of everything the destination changed since the
  // first pass's check, or of all of it after a resumed switch; blocks its
  // clients wrote are theirs and not checked.
  ctx.event('verify');
  const ranges = new IntervalSet();
  if (resumedSwitch) ranges.add(0, map.count);
  for (const iv of st.verify) ranges.add(iv.start, iv.count);
  for (const iv of sender.takeTouched()) ranges.add(iv.start, iv.count);
  for (const iv of push.zeroed) ranges.add(iv.start, iv.count);
  await check.repairing(push.withoutOwned(ranges), sync, (r) => push.withoutOwned(IntervalSet.of(r)), (x) => push.owned.intersects(x.start, x.count));
  const destination = await ch.request(COMMIT, undefined, DONE);
  push.stop();
  lap('verify');
  const c = sender.counters;
  return {
    rounds,
    // The switch is downtime with or without a pause hook: neither side serves the image's writes meanwhile.
    downtimeSeconds: downtime,
    phases: st.phases,
    sent: c.sent,
    copied: c.copied,
    resent: c.resent,
    resentBytes: c.resent * bs,
    repaired: check.repaired,
    destination,
    live: {
      maxDowntimeSeconds: (live.maxDowntime ?? DEFAULT_MAX_DOWNTIME_MS) / 1000,
      predictedDowntimeSeconds: predicted,
      cutoverReason: 'switch',
      drainRate: st.drainRate,
      dirtyRate: st.dirtyRate,
      fixedSeconds: predicted,
      pauseSeconds: (tTake - tPause) / 1000,
      resumeSeconds: (tEnd - tResume) / 1000,
      cutoverSeconds: { take: (tSwitch - tTake) / 1000, send: (tResume - tSwitch) / 1000, check: 0, commit: 0 },
      cutoverBytes: 0,
      order: st.writes ? 'hot-last' : 'address',
      hotBlocksResent: 0,
      ...(st.stall ? { stall: st.stall } : {}),
    },
    delta: { enabled: false, blocks: 0, rawBytes: 0, wireBytes: 0, savedBytes: 0 },
    postcopy: { missingAtSwitch, pulls: push.pulls, pulledBlocks: push.pulledBlocks, owned: push.owned.size },
  };
}

/**
 * The background order: holes first (intervals, no reads: the destination
 * knows at once that they read as zeros), then the other blocks: with write
 * counts, hottest first, then the rest in address order.
 */
function order(remaining: IntervalSet, writes: ((b: number) => number) | undefined): Interval[] {
  const out: Interval[] = [];
  if (writes) {
    const hot: Array<[number, number]> = [];
    for (const iv of remaining) for (let b = iv.start; b < iv.start + iv.count; b++) { const w = writes(b); if (w > 0) hot.push([b, w]); }
    hot.sort((a, b) => b[1] - a[1] || a[0] - b[0]);
    for (const [b] of hot) out.push({ start: b, count: 1 });
  }
  for (const iv of remaining) out.push(iv); // (a spread of a fragmented set would overflow the stack)
  return out;
}

class Pusher {
  /** Blocks the destination's clients wrote (OWNED): never pushed, never checked. */
  readonly owned = new IntervalSet();
  readonly zeroed = new IntervalSet();
  pulls = 0;
  pulledBlocks = 0;
  private readonly pulled: Interval[] = [];
  private wake: (() => void) | undefined;
  private stopped = false;
  private failure: Error | undefined;
  private readonly receiving: Promise<void>;

  constructor(
    private readonly ctx: MigrationContext,
    private readonly parts: PrecopyParts,
    private readonly remaining: IntervalSet,
    private readonly background: Interval[],
  ) {
    this.receiving = this.receive();
    this.receiving.catch(() => {});
  }

  /** PULL and OWNED from the destination, until the migration ends. */
  private async receive(): Promise<void> {
    const { ch } = this.ctx;
    try {
      while (!this.stopped) {
        const f = await ch.next();
        if (f.type === Msg.PULL) {
          const list = decode(PULL, f.payload);
          this.pulls++;
          for (const iv of list) this.pulled.push(iv); // up to a frame's worth: no spread
        } else if (f.type === Msg.OWNED) {
          for (const iv of decode(OWNED, f.payload)) {
            this.owned.add(iv.start, iv.count);
            this.remaining.delete(iv.start, iv.count);
            this.parts.view.forget(iv.start, iv.count);
          }
        } else {
          throw new BlockferryError(ErrorCode.PROTOCOL, `unexpected ${f.type} from the destination during post-copy`);
        }
        this.wake?.();
      }
    } catch (e) {
      if (!this.stopped) this.failure = e as Error;
      this.wake?.();
    }
  }

  stop(): void {
    this.stopped = true;
  }

  withoutOwned(ranges: IntervalSet): IntervalSet {
    for (const iv of this.owned) ranges.delete(iv.start, iv.count);
    return ranges;
  }

  async run(): Promise<void> {
    const { ch, src, blockSize: bs } = this.ctx;
    const { sender } = this.parts;
    const holes = holesOf(this.ctx);
    let cursor = 0;
    let next = this.background[0] ? { ...this.background[0] } : undefined;
    let sinceProbe = 0;
    const probes: Promise<unknown>[] = [];
    while (this.remaining.size > 0) {
      if (this.failure) throw this.failure;
      let batch: Interval[] = [];
      if (this.pulled.length) {
        const want = IntervalSet.of(this.pulled.splice(0));
        for (const iv of want) for (const r of this.remaining.within(iv.start, iv.count)) batch.push(r);
        this.pulledBlocks += blocksIn(batch);
      } else if (holes.length) {
        const h = holes.shift()!;
        const list = [...this.remaining.within(h.start, h.count)];
        for (const iv of list) { this.remaining.delete(iv.start, iv.count); this.parts.view.setZero(iv.start, iv.count); this.zeroed.add(iv.start, iv.count); }
        if (list.length) await ch.send(ZERO, list);
        continue;
      } else {
        // The next PUSH_BLOCKS blocks of the background order still to send.
        let room = PUSH_BLOCKS;
        while (room > 0 && next) {
          const take = Math.min(room, next.count);
          for (const r of this.remaining.within(next.start, take)) batch.push(r);
          room -= take;
          next.start += take;
          next.count -= take;
          if (next.count === 0) { cursor++; next = this.background[cursor] ? { ...this.background[cursor]! } : undefined; }
        }
        if (!next && batch.length === 0) {
          // The order is used up while blocks remain (a resumed switch has no order): address order.
          for (const r of split(this.remaining, PUSH_BLOCKS)) { batch.push(r); break; }
        }
      }
      for (const iv of batch) this.remaining.delete(iv.start, iv.count);
      if (batch.length === 0) continue;
      await sender.send(batch, true);
      sinceProbe += blocksIn(batch) * bs;
      if (sinceProbe >= PROBE_EVERY) {
        sinceProbe = 0;
        const p = ch.request(PROBE, undefined, PROBE_OK);
        p.catch(() => {});
        probes.push(p);
      }
      // The window is full: wait for the destination to catch up, unless a reader pulls (pulls do not wait).
      while (probes.length > PROBES_IN_FLIGHT && !this.pulled.length && !this.failure) {
        const oldest = probes[0]!;
        const woken = new Promise<void>((r) => { this.wake = r; });
        if (await Promise.race([oldest.then(() => true), woken.then(() => false)])) probes.shift();
        this.wake = undefined;
      }
      this.ctx.progress({ phase: 'transfer', round: 0, done: src.size - this.remaining.size * bs, total: src.size });
    }
    await Promise.all(probes);
    if (this.failure) throw this.failure;
  }
}

/** The image's holes as block intervals (blocks wholly inside a hole), from the source's extents. */
function holesOf(ctx: MigrationContext): Interval[] {
  const { src, blockSize: bs } = ctx;
  const out: Interval[] = [];
  let at = 0;
  const gap = (from: number, to: number) => {
    const s = Math.ceil(from / bs), e = to >= src.size ? Math.ceil(to / bs) : Math.floor(to / bs);
    if (e > s) out.push({ start: s, count: e - s });
  };
  for (const x of src.extents(0, src.size)) {
    gap(at, x.offset);
    at = x.offset + x.length;
  }
  gap(at, src.size);
  return out;
}
