// Pre-copy (paper 001's phases, paper 004's live rounds): fingerprints of
// the data runs go out while the destination's NEED answers come back and
// the blocks it lacks are sent; then rounds of dirty blocks while the image
// is live; then the end-to-end check, the cutover and COMMIT.
import { IntervalSet, split, type Interval } from '../blocks/intervals.js';
import { BLOCK_INFO, COMMIT, DONE, INFO_END, NEED, ROUND, SYNC, SYNC_OK } from '../protocol/messages.js';
import { BlockSender } from './sender.js';
import { EndToEndCheck, type VerifyStream } from './verify.js';
import { DestinationView } from './view.js';
import { dirtySourceFor } from './rounds.js';
import type { MigrationContext, StrategyOutcome } from './strategy.js';

/** Blocks per BLOCK_INFO frame (64 Ki: 1 MiB of fingerprints and signatures). */
const INFO_BATCH = 65536;

const blocksIn = (list: Interval[]) => list.reduce((a, iv) => a + iv.count, 0);

/** What every pre-copy phase works with: the picture of the destination, the sender, the end-to-end check. */
export interface PrecopyParts {
  view: DestinationView;
  sender: BlockSender;
  check: EndToEndCheck;
  sync: () => Promise<void>;
}

export function precopyParts(ctx: MigrationContext): PrecopyParts {
  const { ch, src, map, blockSize: bs } = ctx;
  // The copy index takes at most an eighth of the budget (about 30 bytes an entry).
  const view = new DestinationView(map, Math.floor(ctx.memoryBudget / 8 / 30));
  const sender = new BlockSender(ch, src, view, bs);
  const check = new EndToEndCheck(ch, src, view, bs, sender, (n) => ctx.event('repair', { extents: n }));
  return { view, sender, check, sync: async () => { await ch.request(SYNC, undefined, SYNC_OK); } };
}

/**
 * Phases 1-3, overlapped: BLOCK_INFO runs stream out while NEED answers come
 * back and what they name is sent. Returns the end-to-end check of what was
 * sent, still collecting its answers.
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
  const phases: Record<string, number> = {};
  let t = performance.now();
  const lap = (name: string) => {
    const now = performance.now();
    phases[name] = (phases[name] ?? 0) + (now - t) / 1000;
    t = now;
  };
  const parts = precopyParts(ctx);
  const { view, sender, check, sync } = parts;
  const total = map.dataBlocks * bs;
  const stream = await firstPass(ctx, parts);
  lap('transfer');

  // Pre-copy rounds while the image is live.
  const dirty = dirtySourceFor({ dirty: ctx.dirty, tracked: live.tracked, rescan: live.rescan, scanner: ctx.scanner, path: ctx.path, blockSize: ctx.blockSize }, view);
  const maxRounds = live.maxRounds ?? 8;
  const threshold = live.dirtyThreshold ?? 256;
  let rounds = 0;
  let pending = await dirty.take();
  while (blocksIn(pending) > threshold && rounds < maxRounds) {
    rounds++;
    ctx.event('round', { round: rounds, dirty: blocksIn(pending) });
    ctx.progress({ phase: 'rounds', round: rounds, done: 0, total: blocksIn(pending) * bs });
    await ch.send(ROUND, { round: rounds });
    await sender.send(pending);
    await sync();
    ctx.progress({ phase: 'rounds', round: rounds, done: blocksIn(pending) * bs, total: blocksIn(pending) * bs });
    pending = await dirty.take();
  }
  lap('rounds');

  // The check's answers, and a check of what the rounds changed, while the
  // image is still live: the destination only changes when told to, so after
  // the pause only what the last round touches (and what differed here)
  // needs checking again.
  ctx.event('verify');
  ctx.progress({ phase: 'verify', round: rounds, done: 0, total });
  const differ = await stream.finish();
  const recheck = IntervalSet.of(differ);
  const changedInRounds = sender.takeTouched();
  if (changedInRounds.runs) for (const x of await check.once(changedInRounds)) recheck.add(x.start, x.count);
  lap('verify');

  // Cutover: pause, last round, check what it touched, commit, resume.
  const tPause = performance.now();
  const paused = live.pause !== undefined;
  ctx.event('cutover', { dirty: blocksIn(pending) });
  ctx.progress({ phase: 'cutover', round: rounds + 1, done: 0, total: blocksIn(pending) * bs });
  await live.pause?.();
  const last = IntervalSet.of(pending);
  for (const iv of await dirty.take()) last.add(iv.start, iv.count);
  rounds++;
  await ch.send(ROUND, { round: rounds });
  await sender.send(last);
  for (const iv of sender.takeTouched()) recheck.add(iv.start, iv.count);
  await check.repairing(recheck, sync);
  const destination = await ch.request(COMMIT, undefined, DONE);
  await live.resume?.();
  const tEnd = performance.now();
  lap('cutover');
  const c = sender.counters;
  return {
    rounds,
    downtimeSeconds: paused ? (tEnd - tPause) / 1000 : 0,
    phases,
    sent: c.sent,
    copied: c.copied,
    resent: c.resent,
    repaired: check.repaired,
    destination,
  };
}
