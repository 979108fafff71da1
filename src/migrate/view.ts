// The source's picture of the destination: which blocks hold data there and
// with which content, and an index of contents the destination holds (for
// copies). It starts as the block map itself (the destination will hold
// what the source had at the scan) and records only where the two differ,
// so its memory follows the data (and the writes made since the scan).
import { IntervalSet, type Interval } from '../blocks/intervals.js';
import { BlockIndexTable, makeRef, refBlock } from '../table/table.js';
import type { BlockMap } from '../blockmap/blockmap.js';

/** Content of a block: fingerprint and signature, or null for zeros. */
export type Content = readonly [bigint, bigint] | null;
/** Content that matches nothing: the destination's block is not known to hold anything in particular. */
const UNKNOWN: Content = [-1n, -1n];

export class DestinationView {
  /** Blocks that hold data at the destination (once everything sent has arrived). */
  readonly data: IntervalSet;
  /** Content at the destination where it differs from the block map. */
  private readonly changed = new Map<number, Content>();
  /** Blocks whose content at the destination is not known (asked for and not yet sent, or to be repaired). */
  private readonly unknown = new IntervalSet();
  /** Contents the destination holds: (fingerprint, signature) → a block holding it there. */
  private readonly held: BlockIndexTable;

  /**
   * `maxHeld` bounds the copy index (about 30 bytes an entry): past it, new
   * contents are not indexed and a later repeat of them goes as data.
   */
  constructor(private readonly map: BlockMap, private readonly maxHeld = Infinity) {
    this.data = IntervalSet.of([...map.runs()]);
    this.held = new BlockIndexTable({ expectedEntries: Math.min(map.dataBlocks, maxHeld) });
  }

  content(b: number): Content {
    if (this.unknown.has(b)) return UNKNOWN;
    const c = this.changed.get(b);
    if (c !== undefined) return c;
    const i = this.map.indexOf(b);
    return i < 0 ? null : [this.map.fingerprints[i]!, this.map.signatures[i]!];
  }

  holds(b: number, fp: bigint, sig: bigint): boolean {
    const c = this.content(b);
    return c !== null && c[0] === fp && c[1] === sig;
  }

  /** Records that block b now holds (fp, sig) at the destination (data sent, copied or kept). */
  set(b: number, fp: bigint, sig: bigint, index = true): void {
    if (this.unknown.has(b)) this.unknown.delete(b, 1);
    const i = this.map.indexOf(b);
    if (i >= 0 && this.map.fingerprints[i] === fp && this.map.signatures[i] === sig) this.changed.delete(b);
    else this.changed.set(b, [fp, sig]);
    this.data.add(b, 1);
    if (index && this.held.size < this.maxHeld) this.held.insert(fp, sig, makeRef(0, b));
  }

  /** Records that [start, start + count) reads as zeros at the destination. */
  setZero(start: number, count: number): void {
    for (const r of [...this.data.within(start, count)]) {
      for (let b = r.start; b < r.start + r.count; b++) {
        if (this.map.indexOf(b) < 0) this.changed.delete(b);
        else this.changed.set(b, null);
      }
    }
    this.data.delete(start, count);
    this.unknown.delete(start, count);
  }

  /** Forget what we believe about [start, start + count): it will be sent again whatever it holds. */
  forget(start: number, count: number): void {
    this.unknown.add(start, count);
  }

  /**
   * The blocks of a BLOCK_INFO run the destination did not ask for: it holds
   * them as the map says, so their contents can be copied from.
   */
  heldRun(start: number, count: number, missing: Interval[]): void {
    const room = Math.max(0, Math.min(count, this.maxHeld - this.held.size));
    const entries = new BigUint64Array(3 * room);
    let m = 0;
    let at = start;
    const flush = (s: number, e: number) => {
      if (e <= s) return;
      for (const r of this.map.runsWithin(s, e - s)) {
        for (let j = 0; j < r.count && m < room; j++, m++) {
          entries[3 * m] = this.map.fingerprints[r.index + j]!;
          entries[3 * m + 1] = this.map.signatures[r.index + j]!;
          entries[3 * m + 2] = makeRef(0, r.start + j);
        }
      }
    };
    for (const iv of missing) {
      flush(at, iv.start);
      at = iv.start + iv.count;
    }
    flush(at, start + count);
    if (m) this.held.insertMany(entries.subarray(0, 3 * m));
    for (const iv of missing) this.unknown.add(iv.start, iv.count);
  }

  /** A block at the destination that holds (fp, sig) and has length len, other than b; or -1. */
  copySource(b: number, fp: bigint, sig: bigint, sameLength: (hb: number) => boolean): number {
    const ref = this.held.lookup(fp, sig);
    if (ref === undefined) return -1;
    const hb = refBlock(ref);
    return hb !== b && this.holds(hb, fp, sig) && sameLength(hb) ? hb : -1;
  }
}
