// What a scan task is, and the two layouts of its results: the worker's
// scratch area in WASM memory (per block size: zero flags, then the columns
// of the non-zero blocks, packed), and the one ArrayBuffer moved (not copied)
// back to the main thread, compact like the block map it feeds:
//
//   per block size: run count R (f64), non-zero block count D (f64)
//   per block size: runs (2R f64: absolute start, count), fingerprints
//                   (D u64), signatures (D u64), SHA-1 digests (20D bytes,
//                   padded to 8) when asked for
//
// Its size follows the task's non-zero blocks, not its length.
import { DIGEST_BYTES } from '../engine/engine.js';
import type { Extent, SourceSpec } from '../image/source.js';

export interface ScanTask {
  /** How the worker opens the image. */
  source: SourceSpec;
  /**
   * The byte ranges to scan, sorted and disjoint. Each starts at a multiple
   * of every block size and is a whole number of the largest block size long,
   * except one that ends at the image's end. Their total is at most the
   * worker's read window: the task is one read per extent, hashed in one go.
   */
  extents: Extent[];
  blockSizes: number[];
  sha1: boolean;
  /** The image size the main thread saw: a worker that sees another refuses. */
  imageSize: number;
}

/** Bytes a task covers. */
export function taskBytes(task: ScanTask): number {
  let n = 0;
  for (const x of task.extents) n += x.length;
  return n;
}

export interface Section {
  blockSize: number;
  blocks: number;
  flags: number;
  fps: number;
  sigs: number;
  digests: number;
}

export interface TaskLayout {
  sections: Section[];
  bytes: number;
}

const pad8 = (n: number) => Math.ceil(n / 8) * 8;

/** The worker's scratch layout for `length` bytes of extents: room for every block of every size. */
export function taskLayout(length: number, blockSizes: number[], sha1: boolean): TaskLayout {
  let at = 0;
  const sections = blockSizes.map((blockSize) => {
    const blocks = Math.ceil(length / blockSize);
    const s: Section = { blockSize, blocks, flags: at, fps: 0, sigs: 0, digests: 0 };
    at += pad8(blocks);
    s.fps = at;
    at += 8 * blocks;
    s.sigs = at;
    at += 8 * blocks;
    s.digests = at;
    if (sha1) at += pad8(DIGEST_BYTES * blocks);
    return s;
  });
  return { sections, bytes: at };
}

/** One block size's results of one task: views into the moved buffer. */
export interface TaskPiece {
  /** [start, count, ...] in absolute block numbers, sorted, disjoint. */
  runs: Float64Array;
  fingerprints: BigUint64Array;
  signatures: BigUint64Array;
  digests: Uint8Array | undefined;
}

/** Size of a result buffer for sections of (runs, non-zero blocks). */
export function resultBytes(counts: Array<{ runs: number; blocks: number }>, sha1: boolean): number {
  let at = 16 * counts.length;
  for (const c of counts) at += 16 * c.runs + 16 * c.blocks + (sha1 ? pad8(DIGEST_BYTES * c.blocks) : 0);
  return at;
}

/** Where each column of each section sits in a result buffer. */
export function resultOffsets(counts: Array<{ runs: number; blocks: number }>, sha1: boolean): Array<{ runs: number; fps: number; sigs: number; digests: number }> {
  let at = 16 * counts.length;
  return counts.map((c) => {
    const o = { runs: at, fps: at + 16 * c.runs, sigs: 0, digests: 0 };
    o.sigs = o.fps + 8 * c.blocks;
    o.digests = o.sigs + 8 * c.blocks;
    at = o.digests + (sha1 ? pad8(DIGEST_BYTES * c.blocks) : 0);
    return o;
  });
}

/** Reads a result buffer (no copy). */
export function readResult(buf: ArrayBuffer, sections: number, sha1: boolean): TaskPiece[] {
  const head = new Float64Array(buf, 0, 2 * sections);
  const counts = Array.from({ length: sections }, (_, k) => ({ runs: head[2 * k]!, blocks: head[2 * k + 1]! }));
  if (resultBytes(counts, sha1) !== buf.byteLength) throw new Error(`scan result of ${buf.byteLength} bytes does not match its counts`);
  return resultOffsets(counts, sha1).map((o, k) => ({
    runs: new Float64Array(buf, o.runs, 2 * counts[k]!.runs),
    fingerprints: new BigUint64Array(buf, o.fps, counts[k]!.blocks),
    signatures: new BigUint64Array(buf, o.sigs, counts[k]!.blocks),
    digests: sha1 ? new Uint8Array(buf, o.digests, DIGEST_BYTES * counts[k]!.blocks) : undefined,
  }));
}
