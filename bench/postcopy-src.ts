// The source host of the post-copy bench (bench/postcopy.ts): a copy of the
// image written by an in-process writer (a VM's disk emulation: a hot set at
// a fixed rate, and a cold remainder) through a TrackedImage, migrated with
// the strategy asked for. The writer stops at the pause. Prints the
// migration's result and the writer's figures as one JSON line.
import { migrate } from '../src/migrate/migrate.js';
import { TrackedImage } from '../src/image/tracked.js';
import type { StrategyName } from '../src/migrate/strategies.js';

interface Config {
  image: string;
  to: string;
  key: string;
  strategy: StrategyName;
  onStall?: 'wait' | 'force' | 'throttle' | 'postcopy';
  hot: { offset: number; bytes: number; rate: number };
  coldRate: number;
  seed: number;
}

const cfg = JSON.parse(process.argv[2]!) as Config;
const BS = 4096;
const img = new TrackedImage(cfg.image, BS);
let x = cfg.seed >>> 0 || 1;
const next = () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x; };
const block = Buffer.alloc(BS);
let writes = 0;
const TICK_MS = 10;
// Fractional writes carry over, so the rates hold at any tick length.
let hotDebt = 0, coldDebt = 0;
const hotBlocks = Math.floor(cfg.hot.bytes / BS);
const allBlocks = Math.floor(img.size / BS);
const writer = setInterval(() => {
  hotDebt += (cfg.hot.rate * TICK_MS) / 1000 / BS;
  coldDebt += (cfg.coldRate * TICK_MS) / 1000 / BS;
  for (; hotDebt >= 1; hotDebt--) {
    for (let i = 0; i < BS; i += 4) block.writeUInt32LE(next(), i);
    img.write(cfg.hot.offset + (next() % hotBlocks) * BS, block);
    writes++;
  }
  for (; coldDebt >= 1; coldDebt--) {
    for (let i = 0; i < BS; i += 4) block.writeUInt32LE(next(), i);
    img.write((next() % allBlocks) * BS, block);
    writes++;
  }
}, TICK_MS);

const t0 = performance.now();
let pausedAt = 0;
const r = await migrate(cfg.image, {
  to: cfg.to, name: 'vm', strategy: cfg.strategy, auth: { key: Buffer.from(cfg.key) }, tracked: img, overwrite: true,
  ...(cfg.onStall ? { onStall: cfg.onStall } : {}),
  pause: () => { clearInterval(writer); pausedAt = performance.now(); },
});
clearInterval(writer);
img.close();
process.stdout.write(JSON.stringify({ result: r, writer: { writes, seconds: ((pausedAt || performance.now()) - t0) / 1000 } }) + '\n');
