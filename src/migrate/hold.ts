// Holding back what is already dirty (issue 18). A block sent while the
// writer is still writing it goes again next round; a block found dirty
// since its round began is better sent next round, once, with its newer
// content. Where a take of the dirty set is cheap (QEMU's bitmaps, a tracked
// image: milliseconds, not a rescan of the image), the sender asks for one
// every PEEK_MS while a round (or the first pass) goes out, and skips, for
// the rest of the round, every block a peek found dirty. What the peeks find
// is carried into the next round's dirty set (the source forgot it when it
// answered), so nothing written is lost: a held block is sent in a later
// round, or at the cutover, where nothing is held. The hot set is learned
// while the pass goes, not after it.
import { IntervalSet, type Interval } from '../blocks/intervals.js';
import type { DirtySource } from './rounds.js';

/**
 * How often a round peeks at the dirty set: 250 ms. A QMP take costs a few
 * milliseconds (a transaction, a temporary export, one BLOCK_STATUS); at
 * 100 Mbit/s, 250 ms is 3 MiB sent between peeks, and a block dirtied
 * longer ago than that is no longer sent in its round.
 */
export const PEEK_MS = 250;

export interface HoldReport {
  /** Takes made inside rounds (and the first pass). */
  peeks: number;
  /** Blocks due in a round that were skipped because a peek found them dirty (counted once a round). */
  blocks: number;
}

/** The held set of the current round, and the peeks that fill it. */
export class DirtyHold {
  private held = new IntervalSet();
  private lastAt: number;
  private inFlight: Promise<void> | undefined;
  private failure: unknown;
  readonly report: HoldReport = { peeks: 0, blocks: 0 };

  constructor(private readonly source: DirtySource, private readonly everyMs = PEEK_MS, private readonly now = () => performance.now()) {
    this.lastAt = now();
  }

  /**
   * Called before each batch of a send: starts a peek when one is due. The
   * peek runs beside the send (a QMP round trip need not stall the link);
   * what it finds is held from the batch after it answers.
   */
  tick(): void {
    if (this.failure !== undefined) throw this.failure;
    if (this.inFlight || this.now() - this.lastAt < this.everyMs) return;
    this.lastAt = this.now();
    this.inFlight = this.source.take().then(
      (list) => { for (const iv of list) this.held.add(iv.start, iv.count); this.report.peeks++; },
      (e) => { this.failure = e; },
    ).finally(() => { this.inFlight = undefined; });
  }

  /** The parts of [start, start + count) not held (taken now: a peek may answer while they go); counts the blocks held back. */
  pass(iv: Interval): Interval[] {
    const parts = [...this.held.gaps(iv.start, iv.count)];
    this.report.blocks += iv.count - parts.reduce((a, g) => a + g.count, 0);
    return parts;
  }

  /**
   * The round ends: waits for a peek still in flight (takes of one source
   * never overlap), and returns what the round's peeks found, which the
   * next round must send (the source does not report it again).
   */
  async settle(): Promise<Interval[]> {
    await this.inFlight;
    if (this.failure !== undefined) throw this.failure;
    const out = [...this.held];
    this.held = new IntervalSet();
    this.lastAt = this.now();
    return out;
  }
}
