// The destination host of the post-copy bench (bench/postcopy.ts): a
// destination service holding the older image as a neighbour and, once it
// takes an image over, a VM's load on it: reads of random blocks (most in the
// hot set) timed one by one, each classed by whether its block had arrived,
// and writes into the hot set. At the end the image is checked: the source's
// image (as paused) with this side's writes on top, byte for byte.
import { openSync, readSync, closeSync } from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { ArrivingImage } from '../src/roles/destination/arriving.js';

interface Config {
  dataDir: string;
  key: string;
  neighbours: string[];
  /** The source's image (the same file system: namespaces share it), for the final check. */
  source: string;
  hot: { offset: number; bytes: number };
  readsPerSecond: number;
  writeRate: number;
  seed: number;
}

const cfg = JSON.parse(process.argv[2]!) as Config;
const BS = 4096;
let x = cfg.seed >>> 0 || 1;
const next = () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x; };
let taken!: () => void;
const tookOver = new Promise<void>((r) => { taken = r; });
const svc = await DestinationService.start({
  dataDir: cfg.dataDir, host: '0.0.0.0', port: 0, auth: { key: Buffer.from(cfg.key) }, neighbours: cfg.neighbours,
  log: (l) => { if (l.includes('taken over')) taken(); },
});
process.stdout.write(JSON.stringify({ port: svc.address.port }) + '\n');

const demand: number[] = [];
/** The destination's event loop while the VM runs there: how long it was held at a time. */
const loopDelay = monitorEventLoopDelay({ resolution: 1 });
const arrived: number[] = [];
const mine = new Map<number, Buffer>();
let loading = true;
let done = false;
const load = (async () => {
  await Promise.race([tookOver, new Promise((r) => { const t = setInterval(() => { if (done) { clearInterval(t); r(undefined); } }, 50); })]);
  if (done) return;
  const exp = svc.exportOf('vm') as ArrivingImage;
  loopDelay.enable();
  const hotBlocks = Math.floor(cfg.hot.bytes / BS);
  const blocks = exp.blocks;
  const readEvery = 1000 / cfg.readsPerSecond;
  const writeEvery = (1000 * BS) / cfg.writeRate;
  let nextWrite = performance.now();
  const reader = async () => {
    while (loading) {
      const b = next() % 10 < 7 ? Math.floor(cfg.hot.offset / BS) + (next() % hotBlocks) : next() % blocks;
      const wasMissing = !exp.isComplete && exp.stale.intersects(b, 1);
      const t = performance.now();
      await exp.read(b * BS, BS);
      (wasMissing ? demand : arrived).push(performance.now() - t);
      if (performance.now() >= nextWrite) {
        nextWrite += writeEvery;
        const w = Math.floor(cfg.hot.offset / BS) + (next() % hotBlocks);
        const data = Buffer.alloc(BS);
        for (let i = 0; i < BS; i += 4) data.writeUInt32LE(next(), i);
        mine.set(w, data);
        await exp.write(w * BS, data, false);
      }
      await new Promise((r) => setTimeout(r, readEvery));
    }
  };
  await Promise.all([reader(), reader()]);
})();

while (svc.completed.length === 0) await new Promise((r) => setTimeout(r, 50));
loading = false;
done = true;
await load;
// The final check, a chunk at a time: the source's image with this side's writes on top.
const CHUNK = 16 << 20;
const a = openSync(join(cfg.dataDir, 'vm.img'), 'r'), b = openSync(cfg.source, 'r');
const got = Buffer.alloc(CHUNK), want = Buffer.alloc(CHUNK);
let same = true;
for (let at = 0; same; at += CHUNK) {
  const n = readSync(a, got, 0, CHUNK, at);
  const m = readSync(b, want, 0, CHUNK, at);
  if (n !== m) { same = false; break; }
  if (n === 0) break;
  for (const [blk, data] of mine) if (blk * BS >= at && blk * BS < at + n) data.copy(want, blk * BS - at);
  same = got.subarray(0, n).equals(want.subarray(0, n));
}
closeSync(a);
closeSync(b);
const stats = (a: number[]) => {
  if (!a.length) return null;
  const s = [...a].sort((p, q) => p - q);
  return { n: s.length, mean: s.reduce((p, q) => p + q, 0) / s.length, p99: s[Math.min(s.length - 1, Math.floor(s.length * 0.99))]! };
};
loopDelay.disable();
const eventLoop = { p99: loopDelay.percentile(99) / 1e6, max: loopDelay.max / 1e6 };
process.stdout.write(JSON.stringify({ same, demand: stats(demand), arrived: stats(arrived), writes: mine.size, eventLoop }) + '\n');
await svc.close();
process.exit(0);
