// The contract of a fill source: a place the destination finds blocks in
// before asking the source for them. The table of them is fills.ts; each
// implementation (neighbour images there, the repository in repository/)
// depends only on this file.
import type { Engine } from '../engine/engine.js';
import type { ImageSink } from '../image/sink.js';
import type { IntervalSet, Interval } from '../blocks/intervals.js';

/** The blocks of one BLOCK_INFO run that are still missing, with the fingerprints the source sent for the whole run. */
export interface FillRequest {
  start: number;
  fingerprints: BigUint64Array;
  signatures: BigUint64Array;
  /** Sub-intervals of the run still to fill. */
  missing: Interval[];
}

export interface FillContext {
  sink: ImageSink;
  size: number;
  blockSize: number;
  engine: Engine;
}

export interface FillSource {
  readonly name: string;
  /**
   * Fills what it can of the missing blocks: each block written is first
   * checked against the source's fingerprint and signature (a stale index or
   * a collision never puts a wrong block in place). Returns the blocks filled.
   */
  fill(req: FillRequest, ctx: FillContext): Promise<IntervalSet>;
  close(): void;
}
