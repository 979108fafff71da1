// Run scan of a 1 Gi-bit dirty bitmap with 1 % of its bits set in runs.
import { Bitmap } from '../src/index.js';
import { check, runGroup, type GroupResult } from './lib.js';

const NBITS = 2 ** 30;

/** The peer: a plain JS run finder over 32-bit words, lowest set bit via Math.clz32. */
function jsRuns(words: Int32Array, nbits: number, starts: Uint32Array, lens: Uint32Array): number {
  let n = 0, inRun = false, start = 0;
  for (let wi = 0; wi < words.length; wi++) {
    const w = words[wi]!;
    if (w === (inRun ? -1 : 0)) continue; // nothing changes in this word
    let pos = 0;
    while (pos < 32) {
      const x = (inRun ? ~w : w) & (-1 << pos);
      if (x === 0) break;
      const t = 31 - Math.clz32(x & -x);
      const abs = wi * 32 + t;
      if (inRun) { lens[n] = abs - start; n++; inRun = false; } else { start = abs; inRun = true; starts[n] = abs; }
      pos = t + 1;
    }
  }
  if (inRun) { lens[n] = nbits - start; n++; }
  return n;
}

export async function benchBitmap(): Promise<GroupResult[]> {
  const bm = new Bitmap(NBITS);
  // Runs of 1..64 bits, gaps averaging 99x the mean run: 1 % of bits set.
  let x = 12345, pos = 0, set = 0, runs = 0;
  const rnd = () => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; return x >>> 0; };
  for (;;) {
    pos += rnd() % 6435;
    const len = 1 + (rnd() % 64);
    if (pos + len >= NBITS) break;
    bm.setRange(pos, len);
    set += len; runs++;
    pos += len + 1;
  }
  const engine = bm.engine;
  const out = engine.alloc((runs + 1) * 8);
  const bytes = bm.bytes();
  const words = new Int32Array(bytes.buffer, bytes.byteOffset, NBITS / 32);
  const starts = new Uint32Array(runs + 1), lens = new Uint32Array(runs + 1);
  const region = (bm as unknown as { region: { ptr: number } }).region;
  const ours = () => engine.core.bitmapRuns(region.ptr, NBITS, 0, 1, out.ptr, runs + 1);
  check('run count', ours() === runs && jsRuns(words, NBITS, starts, lens) === runs, `${runs}`);
  const got = new Uint32Array(engine.memory.buffer, out.ptr, 2 * runs);
  for (let i = 0; i < runs; i++) check('runs agree', got[2 * i] === starts[i] && got[2 * i + 1] === lens[i], `run ${i}`);
  console.log(`\n(bitmap: ${runs} runs, ${(100 * set / NBITS).toFixed(2)} % of ${NBITS} bits set)`);
  return [
    await runGroup({
      title: 'Run scan of a 1 Gi-bit bitmap, 1 % set in runs of 1..64 bits',
      workPerOp: NBITS,
      unit: 'Gbit/s',
      tasks: [
        { name: 'blockferry wasm bitmapRuns', ours: true, fn: ours },
        { name: 'JS Math.clz32 run finder', fn: () => jsRuns(words, NBITS, starts, lens) },
      ],
      goals: [{ vs: 'JS Math.clz32 run finder', min: 3 }],
    }),
  ];
}
