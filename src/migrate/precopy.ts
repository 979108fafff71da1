// Pre-copy (paper 001's phases, paper 004's live rounds): fingerprints of
// the data runs go out while the destination's NEED answers come back and
// the blocks it lacks are sent; then rounds of dirty blocks while the image
// is live, each checked end to end while still live, until the predicted
// downtime fits the budget (live.ts: the model, stall detection, hot-last
// order, delta cache); then the cutover and COMMIT.
import { IntervalSet, type Interval } from '../blocks/intervals.js';
import { BlockferryError, ErrorCode } from '../errors.js';
import { CAP_DELTA, CAP_POSTCOPY } from '../protocol/handshake.js';
import { COMMIT, DONE, ROUND } from '../protocol/messages.js';
import { firstPass, phaseClock, precopyParts } from './pass.js';
import { switchOver } from './postcopy.js';
import {
  DEFAULT_MAX_DOWNTIME_MS, DEFAULT_STALL_TIMEOUT_MS, DeltaCache, DowntimeModel, HotOrder, StallDetector,
  type CutoverReason, type StallReport, type ThrottleReport,
} from './live.js';
import { dirtySourceFor } from './rounds.js';
import { DirtyHold, PEEK_MS } from './hold.js';
import type { MigrationContext, StrategyOutcome } from './strategy.js';

const blocksIn = (list: Interval[]) => list.reduce((a, iv) => a + iv.count, 0);

/** Blocks per piece of the cutover's round, each checked as soon as it is sent: 256 (1 MiB of 4 KiB blocks). */
const CUTOVER_PIECE = 256;

/** The intervals in order, cut into lists of at most `max` blocks. */
function* pieces(list: Interval[], max: number): Generator<Interval[]> {
  let cur: Interval[] = [], n = 0;
  for (const iv of list) {
    for (let at = iv.start; at < iv.start + iv.count; ) {
      const k = Math.min(max - n, iv.start + iv.count - at);
      cur.push({ start: at, count: k });
      n += k;
      at += k;
      if (n === max) { yield cur; cur = []; n = 0; }
    }
  }
  if (n) yield cur;
}

export async function precopy(ctx: MigrationContext): Promise<StrategyOutcome> {
  const { ch, map, blockSize: bs, live } = ctx;
  const { phases, lap } = phaseClock();
  const isLive = !!live.tracked || !!ctx.dirty || (!!live.rescan && !!ctx.scanner);
  // The delta cache takes a quarter of the budget; only a live image re-sends blocks.
  const deltaOn = isLive && live.delta !== false && (ctx.capabilities & CAP_DELTA) !== 0;
  const cache = deltaOn ? new DeltaCache(Math.floor(ctx.memoryBudget / 4), bs) : undefined;
  const order = new HotOrder(live.tracked?.writeCounts ?? live.writeCounts);
  const sendOrder = live.order ?? 'hot-last';
  const tracked = live.tracked;
  const parts = precopyParts(ctx, { ...(cache ? { cache } : {}), count: (b) => order.count(b), ...(tracked ? { onRead: (iv: Interval) => tracked.clearDirty(iv.start, iv.count) } : {}) });
  const { view, sender, check, sync } = parts;
  const model = new DowntimeModel((live.maxDowntime ?? DEFAULT_MAX_DOWNTIME_MS) / 1000);
  const now = () => performance.now();
  const tPass = now();
  model.startAt(tPass);
  const total = map.dataBlocks * bs;
  const dirty = dirtySourceFor({ dirty: ctx.dirty, tracked: live.tracked, rescan: live.rescan, scanner: ctx.scanner, path: ctx.path, blockSize: ctx.blockSize, format: ctx.format }, view);
  // Where takes are cheap, blocks dirtied since their round (or the pass) began wait for the next round (hold.ts).
  const hold = isLive && dirty.cheap && live.holdDirty !== false ? new DirtyHold(dirty, live.peekInterval ?? PEEK_MS) : undefined;
  sender.hold = hold;
  // hot-first (paper 000's snapshot scheduling): with write counts known, the pass sends the hottest blocks first.
  const stream = await firstPass(ctx, parts, undefined, sendOrder === 'hot-first' && order.known ? (list) => order.arrange(list, true) : undefined);
  // The first pass is a drain sample when it moved enough to measure.
  const passBytes = sender.counters.sent * bs;
  if (passBytes >= 4 << 20) model.addRound(passBytes, (now() - tPass) / 1000, true);
  // The pass's check answers: what differed is checked again (while live, in the rounds).
  let recheck = IntervalSet.of(await stream.finish());
  if (isLive) {
    // A round trip with nothing in flight: the fixed part of a cutover's check and COMMIT.
    const tRtt = now();
    await sync();
    model.addRtt((now() - tRtt) / 1000);
    // What differed in the pass (blocks written while it ran) is checked
    // again now, while live, rather than in the pause; it is the verify
    // rate's first sample.
    if (recheck.runs) {
      const tCheck = now();
      const n = recheck.size;
      recheck = IntervalSet.of(await check.once(recheck));
      model.addVerify(n * bs, (now() - tCheck) / 1000);
    }
  }
  lap('transfer');

  // Pre-copy rounds while the image is live, until a cutover now fits the budget.
  // Rounds re-send what was written meanwhile: cold first (hot-first too: its point is the first pass), so hot blocks are less likely dirtied again.
  const arrange = (list: Interval[]) => (sendOrder === 'address' ? list : order.arrange(list));
  const maxRounds = live.maxRounds ?? Infinity;
  const threshold = live.dirtyThreshold ?? 0;
  const policy = live.onStall ?? 'wait';
  const stallTimeoutMs = live.stallTimeout ?? DEFAULT_STALL_TIMEOUT_MS;
  const detector = new StallDetector();
  let stall: StallReport | undefined;
  let stallDeadline = Infinity;
  let throttle: ThrottleReport | undefined;
  let throttleStep = 0, roundsSinceThrottle = 0, afterThrottleAt = 0, afterThrottleBytes = 0, lastTakeAt = 0;
  const take = async (): Promise<Interval[]> => {
    // What the round's peeks found (and the source forgot) goes into the next round with what the take finds.
    const held = hold ? await hold.settle() : [];
    const t0 = now();
    let list = await dirty.take();
    const t1 = now();
    if (held.length) {
      const all = IntervalSet.of(held);
      for (const iv of list) all.add(iv.start, iv.count);
      list = [...all];
    }
    const bytes = blocksIn(list) * bs;
    model.addTake(bytes, (t1 - t0) / 1000, t1);
    if (throttle) {
      afterThrottleBytes += bytes;
      throttle.dirtyRateAfter = afterThrottleBytes / Math.max(1e-3, (t1 - afterThrottleAt) / 1000);
      throttle.slowedBy = throttle.dirtyRateBefore > 0 ? Math.max(0, 1 - throttle.dirtyRateAfter / throttle.dirtyRateBefore) : 0;
    }
    lastTakeAt = t1;
    order.observe(list);
    return list;
  };
  const rates = () => ({ maxDowntime: model.budgetSeconds, dirtyRate: model.dirty.value, drainRate: model.drain.value });
  let rounds = 0;
  let pending: Interval[] = isLive ? await take() : [];
  let reason: CutoverReason = isLive ? 'budget' : 'quiet';
  // The cutover checks what it sends as it goes, then what still differs,
  // each block once. The check is counted whole: hashing on both sides
  // shares the CPU with the send, and overlaps it less than the link alone
  // would allow (measured: a prediction of the tail alone fell 25-40 % short).
  const predictNow = () => {
    const p = IntervalSet.of(pending);
    let toCheck = p.size;
    for (const iv of recheck) for (const g of p.gaps(iv.start, iv.count)) toCheck += g.count;
    return model.predict(p.size * bs, toCheck * bs);
  };
  let predicted = predictNow();
  const throttleNow = async () => {
    throttleStep++;
    const wantedRate = 0.5 * (throttle?.wantedRate ?? model.drain.value);
    throttle ??= { calls: 0, wantedRate, dirtyRateBefore: model.dirty.value, dirtyRateAfter: model.dirty.value, slowedBy: 0 };
    throttle.calls++;
    throttle.wantedRate = wantedRate;
    const info = { round: rounds, wantedRate, dirtyRate: model.dirty.value, drainRate: model.drain.value, step: throttleStep };
    ctx.event('throttle', info);
    await live.throttle?.(info);
    afterThrottleAt = lastTakeAt;
    afterThrottleBytes = 0;
    roundsSinceThrottle = 0;
    detector.reset();
  };
  try {
    while (isLive) {
      predicted = predictNow();
      const n = blocksIn(pending);
      ctx.progress({ phase: 'rounds', round: rounds, done: 0, total: n * bs, predictedDowntime: predicted, ...rates() });
      if (n === 0 || (model.calibrated && predicted <= model.budgetSeconds)) { reason = 'budget'; break; }
      if (n <= threshold) { reason = 'threshold'; break; }
      if (rounds >= maxRounds) { reason = 'max-rounds'; break; }
      const cause = detector.check(model, predicted);
      if (!stall && cause) {
        stall = { round: rounds, dirtyRate: model.dirty.value, drainRate: model.drain.value, predictedSeconds: predicted, budgetSeconds: model.budgetSeconds, cause, action: policy };
        ctx.event('stall', stall);
        if (policy === 'force') { reason = 'stall-force'; break; }
        if (policy === 'postcopy') {
          // The destination takes over now; what is dirty goes after the switch, hottest first.
          if (!(ctx.capabilities & CAP_POSTCOPY)) throw new BlockferryError(ErrorCode.REFUSED, 'the rounds stalled and --on-stall postcopy was asked, but the destination does not offer post-copy');
          lap('rounds');
          sender.hold = undefined;
          const verify = IntervalSet.of(recheck);
          for (const iv of sender.takeTouched()) verify.add(iv.start, iv.count);
          return await switchOver(ctx, parts, {
            stale: IntervalSet.of(pending), verify, dirty: { take }, writes: (b) => order.count(b), rounds,
            drainRate: model.drain.value, dirtyRate: model.dirty.value, phases, lap, stall,
          });
        }
        stallDeadline = now() + stallTimeoutMs;
        if (policy === 'throttle') await throttleNow();
      } else if (stall && policy === 'throttle' && cause && ++roundsSinceThrottle >= 2) {
        await throttleNow(); // still stalled two rounds after asking: ask for half again (QEMU's auto-converge steps)
      }
      if (now() > stallDeadline) {
        const ms = (v: number) => `${(v * 1000).toFixed(0)} ms`;
        const mbs = (v: number) => `${(v / 1e6).toFixed(1)} MB/s`;
        throw new BlockferryError(ErrorCode.NO_CONVERGENCE,
          `the rounds could not bring the predicted downtime (${ms(predicted)}) within the budget (${ms(model.budgetSeconds)}) in the ${(stallTimeoutMs / 1000).toFixed(0)} s after the stall ` +
          `(writer ${mbs(model.dirty.value)}, rounds drain ${mbs(model.drain.value)}); nothing was paused, the destination keeps what it has (migrate again resumes); ` +
          'allow more downtime, a faster link, or --on-stall force or throttle');
      }
      rounds++;
      ctx.event('round', { round: rounds, dirty: n, predictedDowntime: predicted, ...rates() });
      await ch.send(ROUND, { round: rounds });
      const tRound = now();
      const heldBefore = hold?.report.blocks ?? 0;
      await sender.send(arrange(pending));
      await sync();
      // Blocks held back did not go: the drain rate counts what did.
      model.addRound((n - ((hold?.report.blocks ?? 0) - heldBefore)) * bs, (now() - tRound) / 1000);
      // The next round's dirty set, then what the round changed is checked
      // while live (the cutover then checks only what its own round touches,
      // and what still differs). Blocks dirty again are not checked now: the
      // next round sends them and checks them then; they stay in `recheck`
      // in case it finds them unchanged.
      pending = await take();
      const dirtyAgain = IntervalSet.of(pending);
      const touched = sender.takeTouched();
      for (const iv of recheck) touched.add(iv.start, iv.count);
      const toCheck = new IntervalSet(), later = new IntervalSet();
      for (const iv of touched) {
        for (const g of dirtyAgain.gaps(iv.start, iv.count)) toCheck.add(g.start, g.count);
        for (const d of dirtyAgain.within(iv.start, iv.count)) later.add(d.start, d.count);
      }
      const tCheck = now();
      recheck = IntervalSet.of(await check.once(toCheck));
      for (const iv of later) recheck.add(iv.start, iv.count);
      model.addVerify(toCheck.size * bs, (now() - tCheck) / 1000);
      const tSync = now();
      await sync();
      model.addRtt((now() - tSync) / 1000);
      ctx.progress({ phase: 'rounds', round: rounds, done: n * bs, total: n * bs, predictedDowntime: predicted, ...rates() });
    }
    lap('rounds');

    // The pass's check when nothing was live (no rounds checked it).
    ctx.event('verify');
    ctx.progress({ phase: 'verify', round: rounds, done: 0, total });
    const changed = sender.takeTouched();
    if (changed.runs) for (const x of await check.once(changed)) recheck.add(x.start, x.count);
    lap('verify');

    // Cutover: pause, last round, check what it touched, commit, resume. Nothing is held back from it.
    sender.hold = undefined;
    if (hold) {
      const held = IntervalSet.of(pending);
      for (const iv of await hold.settle()) held.add(iv.start, iv.count);
      pending = [...held];
    }
    predicted = predictNow();
    ctx.event('cutover', { dirty: blocksIn(pending), reason, predictedDowntime: predicted, ...rates() });
    ctx.progress({ phase: 'cutover', round: rounds + 1, done: 0, total: blocksIn(pending) * bs, predictedDowntime: predicted, ...rates() });
    const tPause = now();
    const paused = live.pause !== undefined;
    await live.pause?.();
    const pauseSeconds = (now() - tPause) / 1000;
    rounds++;
    await ch.send(ROUND, { round: rounds });
    // The take the pause repeats (with --rescan a pass over the whole image,
    // on the scanner's workers) runs while the dirty set found before the
    // pause goes out: the one waits on the disk and the CPU, the other on the
    // link. What the take adds is sent after; blocks it names that just went
    // out unchanged are held at the destination and skipped.
    const tTake = now();
    let tTaken = tTake;
    const lastTake = dirty.take().then((l) => { tTaken = now(); return l; });
    lastTake.catch(() => {}); // awaited below
    // Each piece of the last round is checked right after it goes out (a
    // stream, as in the first pass): hashing overlaps the link, and only what
    // differed, and what the rounds left to check, is checked after.
    const stream = check.stream();
    const streamed = new IntervalSet();
    const sendChecked = async (list: Interval[]) => {
      for (const piece of pieces(list, CUTOVER_PIECE)) {
        await sender.send(piece);
        const touched = sender.takeTouched();
        for (const iv of touched) streamed.add(iv.start, iv.count);
        await stream.add(touched);
      }
    };
    await sendChecked(arrange(pending));
    const extra = await lastTake;
    await sendChecked(arrange(extra));
    const last = IntervalSet.of(pending);
    for (const iv of extra) last.add(iv.start, iv.count);
    const tSent = now();
    const bad = await stream.finish();
    const toRepair = new IntervalSet();
    for (const iv of recheck) for (const g of streamed.gaps(iv.start, iv.count)) toRepair.add(g.start, g.count);
    for (const x of bad) toRepair.add(x.start, x.count);
    await check.repairing(toRepair, sync);
    const tChecked = now();
    const destination = await ch.request(COMMIT, undefined, DONE);
    const tResume = now();
    const cutoverSeconds = { take: (tTaken - tTake) / 1000, send: (tSent - tTake) / 1000, check: (tChecked - tSent) / 1000, commit: (tResume - tChecked) / 1000 };
    await live.resume?.();
    const tEnd = now();
    const downtimeSeconds = paused ? (tEnd - tPause) / 1000 : 0;
    ctx.progress({ phase: 'cutover', round: rounds, done: last.size * bs, total: last.size * bs, predictedDowntime: predicted, downtime: downtimeSeconds, ...rates() });
    lap('cutover');
    const c = sender.counters;
    return {
      rounds,
      downtimeSeconds,
      phases,
      sent: c.sent,
      copied: c.copied,
      resent: c.resent,
      resentBytes: c.resentBytes - c.deltaRawBytes + c.deltaWireBytes,
      repaired: check.repaired,
      destination,
      live: {
        maxDowntimeSeconds: model.budgetSeconds,
        predictedDowntimeSeconds: predicted,
        cutoverReason: reason,
        drainRate: model.drain.value,
        dirtyRate: model.dirty.value,
        fixedSeconds: model.fixedSeconds,
        pauseSeconds,
        resumeSeconds: (tEnd - tResume) / 1000,
        cutoverSeconds,
        cutoverBytes: last.size * bs,
        order: sendOrder,
        hotBlocksResent: c.hotResent,
        ...(stall ? { stall } : {}),
        ...(throttle ? { throttle } : {}),
        ...(hold ? { held: hold.report } : {}),
      },
      delta: { enabled: deltaOn, blocks: c.deltaBlocks, rawBytes: c.deltaRawBytes, wireBytes: c.deltaWireBytes, savedBytes: c.deltaRawBytes - c.deltaWireBytes },
    };
  } finally {
    // A writer slowed for this migration is let go, whatever happened.
    if (throttle) await live.throttle?.({ round: rounds, wantedRate: Infinity, dirtyRate: model.dirty.value, drainRate: model.drain.value, step: throttleStep, release: true });
  }
}
