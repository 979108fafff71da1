// Where the blocks of the next pre-copy round come from: a tracked image's
// dirty bitmap (exact and cheap), or a rescan compared with what the
// destination holds. Both give intervals. NBD dirty bitmaps are the next
// entry here.
import { IntervalSet, type Interval } from '../blocks/intervals.js';
import type { TrackedImage } from '../image/tracked.js';
import type { Scanner } from '../scan/scanner.js';
import type { BlockMap } from '../blockmap/blockmap.js';
import type { DestinationView } from './view.js';

export interface DirtySource {
  /** Blocks written since the last call. */
  take(): Promise<Interval[]>;
}

/** Nothing writes the image: no rounds. */
export const quiet: DirtySource = { take: async () => [] };

export function trackedDirty(t: TrackedImage): DirtySource {
  return { take: async () => t.takeDirty() };
}

/** A dirty source that also counts, per block, the rounds that found it dirty (write counts where the source keeps none). */
export function countingDirty(d: DirtySource, counts: Map<number, number>): DirtySource {
  return {
    take: async () => {
      const list = await d.take();
      for (const iv of list) for (let b = iv.start; b < iv.start + iv.count; b++) counts.set(b, (counts.get(b) ?? 0) + 1);
      return list;
    },
  };
}

/** Another process writes the image: scan it again and compare with the destination. */
export function rescanDirty(scanner: Scanner, path: string, blockSize: number, view: DestinationView): DirtySource {
  return {
    take: async () => {
      const [now] = await scanner.scan(path, { blockSize, live: true });
      return changedBlocks(now!, view);
    },
  };
}

/** Blocks whose content in `now` differs from what the destination holds (data changed, became data, or became zero). */
export function changedBlocks(now: BlockMap, view: DestinationView): Interval[] {
  const out = new IntervalSet();
  for (const r of now.runs()) {
    for (let k = 0; k < r.count; k++) {
      const b = r.start + k;
      if (!view.holds(b, now.fingerprints[r.index + k]!, now.signatures[r.index + k]!)) out.add(b, 1);
    }
  }
  // Data at the destination where the image now reads zeros.
  for (const d of view.data) {
    let at = d.start;
    for (const r of now.runsWithin(d.start, d.count)) {
      if (r.start > at) out.add(at, r.start - at);
      at = r.start + r.count;
    }
    if (at < d.start + d.count) out.add(at, d.start + d.count - at);
  }
  return [...out];
}
