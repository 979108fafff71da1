// A scan worker: reads its range of the image straight into WASM memory and
// computes, per block, the zero flag, fingerprint, signature and (on request)
// SHA-1. Only the per-block results (37 bytes per block at most) leave the
// worker, in one ArrayBuffer that is moved, not copied.
import { workerData } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { Engine, type Region } from '../engine/engine.js';
import { FileImageSource } from '../image/source.js';
import { ErrorCode, ImageError } from '../errors.js';
import { taskLayout, type ScanTask } from './layout.js';
import type { BackendName } from '../engine/backend.js';

/** The read window: 16 MiB, the largest task size, so a task is one read per extent. */
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
 * would read the old file. One open per 8 MiB task costs nothing measurable.
 */
function openSource(task: ScanTask): FileImageSource {
  const source = new FileImageSource(task.path, engine!.backend.native);
  if (source.size !== task.imageSize) {
    source.close();
    throw new ImageError(ErrorCode.IMAGE_CHANGED, task.path, `size is now ${source.size}, was ${task.imageSize} when the scan began`);
  }
  return source;
}

export default function scanRange(task: ScanTask): ArrayBuffer {
  const layout = taskLayout(task.length, task.blockSizes, task.sha1);
  const e = setup(layout.bytes);
  const src = openSource(task);
  try {
    return scanWith(e, src, task, layout);
  } finally {
    src.close();
  }
}

function scanWith(e: Engine, src: FileImageSource, task: ScanTask, layout: ReturnType<typeof taskLayout>): ArrayBuffer {
  const base = results.ptr;
  // Results of zero blocks are defined as 0: clear the area once per task.
  e.bytes.fill(0, base, base + layout.bytes);
  for (let done = 0; done < task.length; done += WINDOW) {
    const len = Math.min(WINDOW, task.length - done);
    const view = e.view(window, 0, len);
    // Holes are never read: zero them in memory, read only the data extents.
    const extents = task.extents ? src.extents(task.offset + done, len) : [{ offset: task.offset + done, length: len }];
    let at = 0;
    for (const x of extents) {
      const rel = x.offset - (task.offset + done);
      if (rel > at) view.fill(0, at, rel);
      src.readInto(view.subarray(rel, rel + x.length), x.offset, x.length);
      at = rel + x.length;
    }
    if (at < len) view.fill(0, at, len);
    for (const s of layout.sections) hashWindow(e, task, s, done, len, base);
  }
  const out = e.memory.buffer.slice(base, base + layout.bytes);
  return Piscina.move(out) as unknown as ArrayBuffer;
}

/** Zero flags for every block of the window, then hashes only the runs of non-zero blocks. */
function hashWindow(
  e: Engine,
  task: ScanTask,
  s: ReturnType<typeof taskLayout>['sections'][number],
  done: number,
  len: number,
  base: number,
): void {
  const bs = s.blockSize;
  const first = done / bs; // windows are multiples of every block size
  const blocks = Math.ceil(len / bs);
  const flags = base + s.flags + first;
  const zeros = e.zeroFlagsAt(window.ptr, len, bs, flags);
  if (zeros === blocks) return;
  const nruns = zeros === 0 ? 1 : e.flagRunsAt(flags, blocks, runs.ptr, false);
  const pairs = zeros === 0 ? [0, blocks] : new Uint32Array(e.memory.buffer, runs.ptr, 2 * nruns).slice();
  for (let r = 0; r < nruns; r++) {
    const b0 = pairs[2 * r]!, nb = pairs[2 * r + 1]!;
    const ptr = window.ptr + b0 * bs;
    const bytes = Math.min(nb * bs, len - b0 * bs);
    const bi = first + b0;
    e.fingerprintBlocksAt(ptr, bytes, bs, base + s.fps + 8 * bi, base + s.sigs + 8 * bi);
    if (task.sha1) e.sha1BlocksAt(ptr, bytes, bs, base + s.digests + 20 * bi);
  }
}
