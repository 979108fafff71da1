// Pre-copy (paper 001's phases, paper 004's live rounds): fingerprints of
// the data runs go out while the destination's NEED answers come back and
// the blocks it lacks are sent; then rounds of dirty blocks while the image
// is live, each checked end to end while still live, until the predicted
// downtime fits the budget (live.ts: the model, stall detection, hot-last
// order, delta cache); then the cutover and COMMIT.
import { IntervalSet, split, type Interval } from '../blocks/intervals.js';
import { BlockferryError, ErrorCode } from '../errors.js';
import { CAP_DELTA } from '../protocol/handshake.js';
import { BLOCK_INFO, COMMIT, DONE, INFO_END, NEED, ROUND, SYNC, SYNC_OK } from '../protocol/messages.js';
import { BlockSender } from './sender.js';
import {
  DEFAULT_MAX_DOWNTIME_MS, DEFAULT_STALL_TIMEOUT_MS, DeltaCache, DowntimeModel, HotOrder, StallDetector,
  type CutoverReason, type StallReport, type ThrottleReport,
} from './live.js';
import { EndToEndCheck, type VerifyStream } from './verify.js';
import { DestinationView } from './view.js';
import { dirtySourceFor } from './rounds.js';
import type { MigrationContext, StrategyOutcome } from './strategy.js';

/** Blocks per BLOCK_INFO frame (64 Ki: 1 MiB of fingerprints and signatures). */
const INFO_BATCH = 65536;

const blocksIn = (list: Interval[]) => list.reduce((a, iv) => a + iv.count, 0);

/** Seconds per phase: lap(name) adds the time since the previous lap to that phase. */
export function phaseClock(): { phases: Record<string, number>; lap: (name: string) => void } {
  const phases: Record<string, number> = {};
  let t = performance.now();
  return {
    phases,
    lap: (name) => {
      const now = performance.now();
      phases[name] = (phases[name] ?? 0) + (now - t) / 1000;
      t = now;
    },
  };
}

/** What every pre-copy phase works with: the picture of the destination, the sender, the end-to-end check. */
export interface PrecopyParts {
  view: DestinationView;
  sender: BlockSender;
  check: EndToEndCheck;
  sync: () => Promise<void>;
}

/** Options of the sender: the delta cache, the hot-last write counts, and a hook told of every range read for sending. */
export function precopyParts(ctx: MigrationContext, send: { cache?: DeltaCache; count?: (b: number) => number; onRead?: (iv: Interval) => void } = {}): PrecopyParts {
  const { ch, src, map, blockSize: bs } = ctx;
  // The copy index takes at most an eighth of the budget (about 30 bytes an entry).
  const view = new DestinationView(map, Math.floor(ctx.memoryBudget / 8 / 30));
  const sender = new BlockSender(ch, src, view, bs, send.cache, send.count, send.onRead);
  const check = new EndToEndCheck(ch, src, view, bs, sender, (n) => ctx.event('repair', { extents: n }));
  return { view, sender, check, sync: async () => { await ch.request(SYNC, undefined, SYNC_OK); } };
}

/**
 * Phases 1-3, overlapped: BLOCK_INFO runs stream out while NEED answers come
 * back and what they name is sent. Returns the end-to-end check of what was
 * sent, still collecting its answers. With `defer`, blocks it calls hot are
 * not sent but put in `defer.into` (hybrid: they wait for the switch).
 */
export async function firstPass(ctx: MigrationContext, { view, sender, check, sync }: PrecopyParts, defer?: { hot: (b: number) => boolean; into: IntervalSet }): Promise<VerifyStream> {
  const { ch, map, blockSize: bs } = ctx;
  ctx.event('fingerprints');
  const sendInfo = async () => {
    for (const r of split(map.runs(), INFO_BATCH)) {
      const i = map.indexOf(r.start);
      await ch.send(BLOCK_INFO, { start: r.start, count: r.count, fingerprints: map.fingerprints.subarray(i, i + r.count), signatures: map.signatures.subarray(i, i + r.count) });
    }
    await ch.send(INFO_END, undefined);
  };
  let announced = false;
  const total = map.dataBlocks * bs;
  let done = 0;
  // The end-to-end check goes out as the transfer goes: each run, right after
  // its blocks (and the zero gap before it), is checked while later runs are
  // still being sent; the destination applies frames in order.
  const stream = check.stream();
  let checkedTo = 0;
  const checkUpTo = async (end: number) => {
    if (end > checkedTo) await stream.add([{ start: checkedTo, count: end - checkedTo }]);
    checkedTo = Math.max(checkedTo, end);
  };
  const receiveNeeds = async () => {
    for (;;) {
      const need = await ch.recv(NEED);
      if (need.last) return;
      if (!announced) { announced = true; ctx.event('transfer'); }
      view.heldRun(need.start, need.count, need.missing);
      let missing = need.missing;
      if (defer) {
        // Hybrid: blocks already written Threshold times wait for the switch (they would be sent again).
        const send = new IntervalSet();
        for (const iv of missing) for (let b = iv.start; b < iv.start + iv.count; b++) (defer.hot(b) ? defer.into : send).add(b, 1);
        missing = [...send];
      }
      await sender.send(missing);
      await checkUpTo(need.start + need.count);
      done += need.count * bs;
      ctx.progress({ phase: 'transfer', round: 0, done: Math.min(done, total), total });
    }
  };
  await Promise.all([sendInfo(), receiveNeeds()]);
  await checkUpTo(map.count);
  await sync();
  sender.takeTouched(); // what the transfer changed is covered by the stream
  return stream;
}

export async function precopy(ctx: MigrationContext): Promise<StrategyOutcome> {
  const { ch, map, blockSize: bs, live } = ctx;
  const { phases, lap } = phaseClock();
  const isLive = !!live.tracked || !!ctx.dirty || (!!live.rescan && !!ctx.scanner);
  // The delta cache takes a quarter of the budget; only a live image re-sends blocks.
  const deltaOn = isLive && live.delta !== false && (ctx.capabilities & CAP_DELTA) !== 0;
  const cache = deltaOn ? new DeltaCache(Math.floor(ctx.memoryBudget / 4), bs) : undefined;
  const order = new HotOrder(live.tracked?.writeCounts);
  const tracked = live.tracked;
  const parts = precopyParts(ctx, { ...(cache ? { cache } : {}), count: (b) => order.count(b), ...(tracked ? { onRead: (iv: Interval) => tracked.clearDirty(iv.start, iv.count) } : {}) });
  const { view, sender, check, sync } = parts;
  const model = new DowntimeModel((live.maxDowntime ?? DEFAULT_MAX_DOWNTIME_MS) / 1000);
  const now = () => performance.now();
  const tPass = now();
  model.startAt(tPass);
  const total = map.dataBlocks * bs;
  const stream = await firstPass(ctx, parts);
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
  const dirty = dirtySourceFor({ dirty: ctx.dirty, tracked: live.tracked, rescan: live.rescan, scanner: ctx.scanner, path: ctx.path, blockSize: ctx.blockSize }, view);
  const sendOrder = live.order ?? 'hot-last';
  const arrange = (list: Interval[]) => (sendOrder === 'hot-last' ? order.arrange(list) : list);
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
    const t0 = now();
    const list = await dirty.take();
    const t1 = now();
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
  const predictNow = () => model.predict(blocksIn(pending) * bs, (blocksIn(pending) + recheck.size) * bs);
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
        // 'postcopy' never gets here: migrate() accepts it only for strategies that handle it themselves (Strategy.postcopy).
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
      await sender.send(arrange(pending));
      await sync();
      model.addRound(n * bs, (now() - tRound) / 1000);
      // What the round changed is checked now, while live: the cutover then
      // checks only what its own round touches (and what still differs).
      const toCheck = sender.takeTouched();
      for (const iv of recheck) toCheck.add(iv.start, iv.count);
      const tCheck = now();
      recheck = IntervalSet.of(await check.once(toCheck));
      model.addVerify(toCheck.size * bs, (now() - tCheck) / 1000);
      const tSync = now();
      await sync();
      model.addRtt((now() - tSync) / 1000);
      ctx.progress({ phase: 'rounds', round: rounds, done: n * bs, total: n * bs, predictedDowntime: predicted, ...rates() });
      pending = await take();
    }
    lap('rounds');

    // The pass's check when nothing was live (no rounds checked it).
    ctx.event('verify');
    ctx.progress({ phase: 'verify', round: rounds, done: 0, total });
    const changed = sender.takeTouched();
    if (changed.runs) for (const x of await check.once(changed)) recheck.add(x.start, x.count);
    lap('verify');

    // Cutover: pause, last round, check what it touched, commit, resume.
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
    await sender.send(arrange(pending));
    const extra = await lastTake;
    await sender.send(arrange(extra));
    const last = IntervalSet.of(pending);
    for (const iv of extra) last.add(iv.start, iv.count);
    const tSent = now();
    for (const iv of sender.takeTouched()) recheck.add(iv.start, iv.count);
    await check.repairing(recheck, sync);
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
      },
      delta: { enabled: deltaOn, blocks: c.deltaBlocks, rawBytes: c.deltaRawBytes, wireBytes: c.deltaWireBytes, savedBytes: c.deltaRawBytes - c.deltaWireBytes },
    };
  } finally {
    // A writer slowed for this migration is let go, whatever happened.
    if (throttle) await live.throttle?.({ round: rounds, wantedRate: Infinity, dirtyRate: model.dirty.value, drainRate: model.drain.value, step: throttleStep, release: true });
  }
}
