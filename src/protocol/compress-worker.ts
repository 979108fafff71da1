// The compressing half of a connection's zstd stream, on its own thread
// (compression.ts, OffThreadZstd): payloads arrive in order with the level
// to use, each is compressed with ZSTD_e_flush on the one stream context and
// sent back in the same order, with the CPU seconds it took. The main thread
// meanwhile reads and hashes the next frame's blocks and writes the frames
// before it. The stream contract of codec.ts holds: one context, payloads in
// order, each answer sent.
import { parentPort, workerData } from 'node:worker_threads';
import { CodecId, createCompressor } from './codec.js';

interface Job { payload: Uint8Array; level: number }

const port = parentPort!;
const z = createCompressor(CodecId.ZSTD, (workerData as { level: number }).level);
port.on('message', (job: Job) => {
  try {
    if (z.level !== job.level) z.setLevel(job.level);
    const t = performance.now();
    const out = z.compress(job.payload);
    const seconds = (performance.now() - t) / 1000;
    // out is a fresh copy (codec.ts copyOf): its memory moves to the main thread.
    const ab = new Uint8Array(out).buffer;
    port.postMessage({ ok: true, out: ab, seconds }, [ab]);
  } catch (e) {
    port.postMessage({ ok: false, message: (e as Error).message });
  }
});
