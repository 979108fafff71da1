// A scan worker: reads its task's extents, packed one after the other,
// straight into WASM memory, finds the zero blocks, and hashes only the runs
// of non-zero blocks (fingerprint, signature and, on request, SHA-1). What
// leaves the worker is compact, like the block map it feeds: the runs of
// non-zero blocks and their columns, in one ArrayBuffer that is moved, not
// copied (src/scan/layout.ts).
import { workerData } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { DIGEST_BYTES, Engine, type Region } from '../engine/engine.js';
import { openSource, type ImageSource } from '../image/source.js';
import { ErrorCode, ImageError, InvalidArgumentError } from '../errors.js';
import { resultBytes, resultOffsets, taskBytes, taskLayout, type ScanTask, type Section } from './layout.js';
import type { BackendName } from '../engine/backend.js';

/** The read window: 16 MiB, the largest task size, so a task is one read per extent and one hashing pass. */
export const WINDOW = 16 << 20;

const data = workerData as { wasmModule?: WebAssembly.Module; backend?: BackendName } | undefined;
let engine: Engine | undefined;
let window: Region;
let results: Region;
let runs: Region;

function setup(resultBytes: number): Engine {
  if (!engine) {
    engine = new Engine({
      initialBytes: WINDOW + (4 << 20),
      ...(data?.wasmModule ? { module: data.wasmModule } : {}),
      ...(data?.backend ? { backend: data.backend } : {}),
    });
    window = engine.alloc(WINDOW);
    runs = engine.alloc((WINDOW / 512 / 2 + 1) * 8);
    results = engine.alloc(Math.max(resultBytes, 1 << 20));
  } else if (results.length < resultBytes) {
    results = engine.alloc(resultBytes);
  }
  return engine;
}

/**
 * Opens the image for one task. Not cached across tasks: a path can be
 * renamed over (a destination replacing an image) and a cached descriptor
 * would read the old file. One open per task costs nothing measurable.
 */
function openTaskSource(task: ScanTask): ImageSource {
  const source = openSource(task.source, engine!.backend.native);
  if (source.size !== task.imageSize) {
    source.close();
    throw new ImageError(ErrorCode.IMAGE_CHANGED, source.path, `size is now ${source.size}, was ${task.imageSize} when the scan began`);
  }
  return source;
}

/** One block size's outcome: absolute runs of non-zero blocks, and how many blocks they hold. */
interface Found {
  runs: number[];
  blocks: number;
}

export default function scanRange(task: ScanTask): ArrayBuffer {
  const total = taskBytes(task);
  if (total > WINDOW) throw new InvalidArgumentError('task', `extents of at most ${WINDOW} bytes in all`, total);
  const layout = taskLayout(total, task.blockSizes, task.sha1);
  const e = setup(layout.bytes);
  const src = openTaskSource(task);
  try {
    // Packed: extent k lands right after extent k-1. Every extent but one at
    // the image's end is a whole number of blocks of every size, so block
    // boundaries in the window are block boundaries of the image.
    const view = e.view(window, 0, total);
    let at = 0;
    for (const x of task.extents) {
      src.readInto(view.subarray(at, at + x.length), x.offset, x.length);
      at += x.length;
    }
  } finally {
    src.close();
  }
  const found = layout.sections.map((s) => hashSection(e, task, s, total));
  return Piscina.move(pack(e, layout.sections, found, task.sha1)) as unknown as ArrayBuffer;
}

/** Zero flags for every block in the window, then hashes only the runs of non-zero blocks, into packed columns. */
function hashSection(e: Engine, task: ScanTask, s: Section, total: number): Found {
  const bs = s.blockSize;
  const base = results.ptr;
  const zeros = e.zeroFlagsAt(window.ptr, total, bs, base + s.flags);
  const out: Found = { runs: [], blocks: 0 };
  if (zeros === s.blocks) return out;
  const nruns = zeros === 0 ? 1 : e.flagRunsAt(base + s.flags, s.blocks, runs.ptr, false);
  const pairs = zeros === 0 ? [0, s.blocks] : new Uint32Array(e.memory.buffer, runs.ptr, 2 * nruns).slice();
  let x = 0, xFirst = 0; // the extent holding window block p, and its first window block
  const xBlocks = (i: number) => Math.ceil(task.extents[i]!.length / bs);
  for (let r = 0; r < nruns; r++) {
    const b0 = pairs[2 * r]!, nb = pairs[2 * r + 1]!;
    const ptr = window.ptr + b0 * bs;
    const bytes = Math.min(nb * bs, total - b0 * bs);
    const k = out.blocks;
    e.fingerprintBlocksAt(ptr, bytes, bs, base + s.fps + 8 * k, base + s.sigs + 8 * k);
    if (task.sha1) e.sha1BlocksAt(ptr, bytes, bs, base + s.digests + DIGEST_BYTES * k);
    out.blocks += nb;
    // Window blocks to image blocks: a run ends where its extent does.
    for (let p = b0; p < b0 + nb; ) {
      while (xFirst + xBlocks(x) <= p) xFirst += xBlocks(x++);
      const take = Math.min(b0 + nb, xFirst + xBlocks(x)) - p;
      const start = task.extents[x]!.offset / bs + (p - xFirst);
      const n = out.runs.length;
      if (n && out.runs[n - 2]! + out.runs[n - 1]! === start) out.runs[n - 1]! += take;
      else out.runs.push(start, take);
      p += take;
    }
  }
  return out;
}

/** The result buffer: counts, runs, then each section's columns copied out of WASM memory. */
function pack(e: Engine, sections: Section[], found: Found[], sha1: boolean): ArrayBuffer {
  const counts = found.map((f) => ({ runs: f.runs.length / 2, blocks: f.blocks }));
  const buf = new ArrayBuffer(resultBytes(counts, sha1));
  const head = new Float64Array(buf, 0, 2 * counts.length);
  const u8 = new Uint8Array(buf);
  const mem = e.bytes;
  const base = results.ptr;
  resultOffsets(counts, sha1).forEach((o, k) => {
    const s = sections[k]!, f = found[k]!;
    head[2 * k] = counts[k]!.runs;
    head[2 * k + 1] = f.blocks;
    new Float64Array(buf, o.runs, f.runs.length).set(f.runs);
    u8.set(mem.subarray(base + s.fps, base + s.fps + 8 * f.blocks), o.fps);
    u8.set(mem.subarray(base + s.sigs, base + s.sigs + 8 * f.blocks), o.sigs);
    if (sha1) u8.set(mem.subarray(base + s.digests, base + s.digests + DIGEST_BYTES * f.blocks), o.digests);
  });
  return buf;
}
