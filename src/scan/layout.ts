// The layout of one scan task's results: one ArrayBuffer per task, moved
// (not copied) from the worker to the main thread. For each block size, in
// order: zero flags (1 byte a block, padded to 8), fingerprints (u64),
// signatures (u64), and, when asked for, SHA-1 digests (20 bytes).
import { DIGEST_BYTES } from '../engine/engine.js';

export interface ScanTask {
  path: string;
  /** Byte offset of the range; a multiple of every block size. */
  offset: number;
  length: number;
  blockSizes: number[];
  sha1: boolean;
  /** The image size the main thread saw: a worker that sees another refuses. */
  imageSize: number;
  /** Ask the source for extents and skip holes (false: read everything). */
  extents: boolean;
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
