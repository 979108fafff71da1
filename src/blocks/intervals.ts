// Blocks and intervals: the one place that knows how long a block is and how
// runs of consecutive blocks are grouped. Every stage that handles "which
// blocks" (the block map's data runs, NEED, rounds, the journal, VERIFY)
// speaks in intervals, so that its cost follows the data and never the
// declared size of the image.

/** A run of consecutive blocks [start, start + count). */
export interface Interval {
  start: number;
  count: number;
}

export { blockCount } from '../engine/engine.js';

/** Length in bytes of block i (blockSize, or less for a short last block). */
export function blockLength(size: number, blockSize: number, i: number): number {
  return Math.min(blockSize, size - i * blockSize);
}

/** Bytes covered by blocks [start, start + count) of an image of `size` bytes. */
export function intervalBytes(size: number, blockSize: number, start: number, count: number): number {
  return Math.max(0, Math.min(count * blockSize, size - start * blockSize));
}

/**
 * Groups sorted block numbers into runs of consecutive blocks, each at most
 * `max` long. `blocks` may be any indexable sorted sequence.
 */
export function* consecutiveRuns(blocks: ArrayLike<number>, max = Infinity): Generator<Interval> {
  for (let i = 0; i < blocks.length; ) {
    let j = i + 1;
    while (j < blocks.length && j - i < max && blocks[j] === blocks[j - 1]! + 1) j++;
    yield { start: blocks[i]!, count: j - i };
    i = j;
  }
}

/** Splits intervals into pieces of at most `max` blocks (a frame's or a window's worth). */
export function* split(intervals: Iterable<Interval>, max: number): Generator<Interval> {
  for (const iv of intervals) {
    for (let s = iv.start; s < iv.start + iv.count; s += max) yield { start: s, count: Math.min(max, iv.start + iv.count - s) };
  }
}

/**
 * A set of blocks kept as sorted, disjoint, non-adjacent intervals. Its size
 * follows the number of runs, not the number of blocks: a 1 TiB image with
 * data in 64 places is 64 entries. Adding in increasing order (the common
 * case: a scan, a stream of NEED) is O(1); anything else is a binary search
 * and a splice.
 */
export class IntervalSet {
  private starts: number[] = [];
  private ends: number[] = []; // exclusive

  static of(intervals: Iterable<Interval>): IntervalSet {
    const s = new IntervalSet();
    for (const iv of intervals) s.add(iv.start, iv.count);
    return s;
  }

  /** Number of disjoint runs. */
  get runs(): number {
    return this.starts.length;
  }

  /** Number of blocks in the set. */
  get size(): number {
    let n = 0;
    for (let i = 0; i < this.starts.length; i++) n += this.ends[i]! - this.starts[i]!;
    return n;
  }

  /** First index whose end is >= b (the run that could hold or follow b). */
  private find(b: number): number {
    let lo = 0, hi = this.ends.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.ends[mid]! < b) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  add(start: number, count = 1): void {
    if (count <= 0) return;
    const end = start + count;
    const n = this.starts.length;
    if (n === 0 || start > this.ends[n - 1]!) {
      this.starts.push(start);
      this.ends.push(end);
      return;
    }
    if (start === this.ends[n - 1]! ) { this.ends[n - 1] = Math.max(end, this.ends[n - 1]!); return; }
    let i = this.find(start); // first run with end >= start: merges when touching
    let j = i;
    let s = start, e = end;
    while (j < n && this.starts[j]! <= end) {
      s = Math.min(s, this.starts[j]!);
      e = Math.max(e, this.ends[j]!);
      j++;
    }
    this.starts.splice(i, j - i, s);
    this.ends.splice(i, j - i, e);
  }

  delete(start: number, count = 1): void {
    if (count <= 0) return;
    const end = start + count;
    let i = this.find(start + 1);
    const newStarts: number[] = [], newEnds: number[] = [];
    let j = i;
    while (j < this.starts.length && this.starts[j]! < end) {
      if (this.starts[j]! < start) { newStarts.push(this.starts[j]!); newEnds.push(start); }
      if (this.ends[j]! > end) { newStarts.push(end); newEnds.push(this.ends[j]!); }
      j++;
    }
    if (j === i) return;
    this.starts.splice(i, j - i, ...newStarts);
    this.ends.splice(i, j - i, ...newEnds);
  }

  has(b: number): boolean {
    const i = this.find(b + 1);
    return i < this.starts.length && this.starts[i]! <= b && b < this.ends[i]!;
  }

  /** True when every block of [start, start + count) is in the set. */
  covers(start: number, count: number): boolean {
    const i = this.find(start + 1);
    return i < this.starts.length && this.starts[i]! <= start && start + count <= this.ends[i]!;
  }

  /** True when any block of [start, start + count) is in the set. */
  intersects(start: number, count: number): boolean {
    const i = this.find(start + 1);
    return i < this.starts.length && this.starts[i]! < start + count;
  }

  clear(): void {
    this.starts = [];
    this.ends = [];
  }

  *[Symbol.iterator](): Generator<Interval> {
    for (let i = 0; i < this.starts.length; i++) yield { start: this.starts[i]!, count: this.ends[i]! - this.starts[i]! };
  }

  /** The runs inside [start, start + count), clipped to it. */
  *within(start: number, count: number): Generator<Interval> {
    const end = start + count;
    for (let i = this.find(start + 1); i < this.starts.length && this.starts[i]! < end; i++) {
      const s = Math.max(start, this.starts[i]!), e = Math.min(end, this.ends[i]!);
      if (e > s) yield { start: s, count: e - s };
    }
  }

  /** The gaps of this set inside [start, start + count): the blocks not in it, as runs. */
  *gaps(start: number, count: number): Generator<Interval> {
    let at = start;
    for (const iv of this.within(start, count)) {
      if (iv.start > at) yield { start: at, count: iv.start - at };
      at = iv.start + iv.count;
    }
    if (at < start + count) yield { start: at, count: start + count - at };
  }
}
