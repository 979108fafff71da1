// What the pre-copy strategies and post-copy's hybrid share: the parts a
// migration works with (the picture of the destination, the sender, the
// end-to-end check), the first pass (paper 001's phases 1-3, overlapped),
// and a timer of the phases.
import { IntervalSet, split, type Interval } from '../blocks/intervals.js';
import { BLOCK_INFO, INFO_END, NEED, SYNC, SYNC_OK } from '../protocol/messages.js';
import { BlockSender } from './sender.js';
import type { DeltaCache } from './live.js';
import { EndToEndCheck, type VerifyStream } from './verify.js';
import { DestinationView } from './view.js';
import type { MigrationContext } from './strategy.js';

/** Blocks per BLOCK_INFO frame (64 Ki: 1 MiB of fingerprints and signatures). */
const INFO_BATCH = 4096;
/**
 * The first BLOCK_INFO runs are smaller, doubling up to INFO_BATCH: the
 * destination answers a run with NEED only after its fill sources have read
 * and checked what they hold of it (a neighbour fill of a 64 Ki-block run is
 * hundreds of MB of disk), and the source sends no block data before the
 * first NEED. A small first run starts the data flowing within milliseconds.
 */
const FIRST_INFO_BATCH = 512;
/** BLOCK_INFO runs sent ahead of the NEED answers received. */
const INFO_AHEAD = 8;

/** split(), but the pieces grow from `first` blocks, doubling, up to `max`. */
export function* splitGrowing(intervals: Iterable<Interval>, first: number, max: number): Generator<Interval> {
  let size = Math.min(first, max);
  for (const iv of intervals) {
    for (let s = iv.start; s < iv.start + iv.count; ) {
      const count = Math.min(size, iv.start + iv.count - s);
      yield { start: s, count };
      s += count;
      size = Math.min(max, size * 2);
    }
  }
}

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
/**
 * `hold`: the pass's blocks are not sent as each NEED comes but gathered
 * until the destination has answered every BLOCK_INFO, then sent in the
 * order `hold` gives (hot-first: the blocks written most, first) and
 * checked after; BLOCK_INFO must go in address order, the data need not.
 */
export async function firstPass(ctx: MigrationContext, { view, sender, check, sync }: PrecopyParts, defer?: { hot: (b: number) => boolean; into: IntervalSet }, hold?: (list: Interval[]) => Interval[]): Promise<VerifyStream> {
  const { ch, map, blockSize: bs } = ctx;
  ctx.event('fingerprints');
  const sendInfo = async () => {
    const runs = ctx.scatter ? split(map.runs(), ctx.scatter.infoBatch) : splitGrowing(map.runs(), FIRST_INFO_BATCH, INFO_BATCH);
    for (const r of runs) {
      // Not too far ahead of the answers: the destination applies frames in
      // order, so block data queued behind many BLOCK_INFO runs would wait
      // for all their fills; a few runs ahead keeps both going.
      while (infoSent - needsSeen >= INFO_AHEAD && !needsDone) await new Promise<void>((res) => { wakeInfo = res; });
      infoSent++;
      await ctx.scatter?.beforeInfo(ch, r.start, r.count);
      const i = map.indexOf(r.start);
      await ch.send(BLOCK_INFO, { start: r.start, count: r.count, fingerprints: map.fingerprints.subarray(i, i + r.count), signatures: map.signatures.subarray(i, i + r.count) });
    }
    await ch.send(INFO_END, undefined);
  };
  let infoSent = 0, needsSeen = 0, needsDone = false;
  let wakeInfo: (() => void) | undefined;
  const seen = (last: boolean) => {
    needsSeen++;
    if (last) needsDone = true;
    wakeInfo?.();
    wakeInfo = undefined;
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
      const need = await ch.recv(NEED).catch((e: Error) => { seen(true); throw e; });
      seen(need.last);
      if (need.last) return;
      if (!announced) { announced = true; ctx.event('transfer'); }
      view.heldRun(need.start, need.count, need.missing);
      let missing = need.missing;
      if (held) {
        for (const iv of missing) held.add(iv.start, iv.count);
        continue;
      }
      if (defer) {
        // Hybrid: blocks already written Threshold times wait for the switch (they would be sent again).
        const send = new IntervalSet();
        for (const iv of missing) for (let b = iv.start; b < iv.start + iv.count; b++) (defer.hot(b) ? defer.into : send).add(b, 1);
        missing = [...send];
      }
      // Progress inside a long run: what is sent of it so far (the run's held blocks count once it is done).
      let inRun = 0;
      sender.onBatch = (iv) => {
        inRun += iv.count * bs;
        ctx.progress({ phase: 'transfer', round: 0, done: Math.min(done + Math.min(inRun, need.count * bs), total), total });
      };
      await sender.send(missing);
      sender.onBatch = undefined;
      await checkUpTo(need.start + need.count);
      done += need.count * bs;
      ctx.progress({ phase: 'transfer', round: 0, done: Math.min(done, total), total });
    }
  };
  const held = hold ? new IntervalSet() : undefined;
  await Promise.all([sendInfo(), receiveNeeds()]);
  if (held && hold) {
    sender.onBatch = (iv) => {
      done += iv.count * bs;
      ctx.progress({ phase: 'transfer', round: 0, done: Math.min(done, total), total });
    };
    await sender.send(hold([...held]));
    sender.onBatch = undefined;
  }
  await checkUpTo(map.count);
  await sync();
  sender.takeTouched(); // what the transfer changed is covered by the stream
  return stream;
}
