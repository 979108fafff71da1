// Regenerates the README's pictures of the two pages (docs/img/similarity.png,
// docs/img/migration-report.png): real ext4 images made by mkfs.ext4 -d from
// seeded file trees, the similarity page as `blockferry similarity --html`
// writes it, the report of a live migration (a tracked image written to all
// along, in-process destination), both photographed in headless Chromium.
// Needs a build (npm run build), mkfs.ext4 and chromium (BLOCKFERRY_CHROMIUM
// to point elsewhere). Usage: node scripts/screenshots.mjs [OUT_DIR]
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import puppeteer from 'puppeteer-core';
import { DestinationService, TimelineRecorder, TrackedImage, migrate, migrationReport, writePage } from '../dist/src/index.js';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const out = process.argv[2] ?? join(root, 'docs', 'img');
const chromium = process.env.BLOCKFERRY_CHROMIUM ?? '/usr/bin/chromium';
const dir = mkdtempSync(join(tmpdir(), 'bf-shots-'));

/** xorshift32 bytes, as test/util.ts's seededBytes. */
function seeded(seed, n) {
  const b = new Uint8Array(n);
  let x = (seed * 2654435761) >>> 0 || 0x9e3779b9;
  for (let i = 0; i < n; i++) { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; b[i] = x; }
  return b;
}

function ext4(name, files, size = '32M') {
  const tree = join(dir, `${name}.d`);
  mkdirSync(tree);
  for (const [f, data] of Object.entries(files)) writeFileSync(join(tree, f), data);
  const img = join(dir, `${name}.img`);
  execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', tree, '-E', 'lazy_itable_init=0,nodiscard', img, size], { stdio: 'pipe' });
  return img;
}

// A system (many files of odd sizes), its update (a fifth of the files
// rewritten, some grown), and a second system sharing a third of the files.
const system = Object.fromEntries(Array.from({ length: 60 }, (_, i) => [`f${String(i).padStart(2, '0')}`, seeded(100 + i, 20_000 + ((i * 7919) % 160) * 1000 + i * 37)]));
const update = { ...system };
for (let i = 0; i < 60; i += 5) update[`f${String(i).padStart(2, '0')}`] = seeded(500 + i, system[`f${String(i).padStart(2, '0')}`].length + 3000);
const sibling = Object.fromEntries(Object.entries(system).filter((_, i) => i % 3 === 0));
for (let i = 0; i < 25; i++) sibling[`own${i}`] = seeded(900 + i, 50_000 + i * 4321);
const images = [ext4('system', system), ext4('system-update', update), ext4('sibling', sibling)];

try {
  const bin = join(root, 'bin', 'blockferry.js');
  const simPage = join(dir, 'similarity.html');
  const sim = spawnSync(process.execPath, [bin, 'similarity', '--block-size', '1k-16k', '--progress', 'none', '--html', simPage, ...images], { encoding: 'utf8' });
  if (sim.status !== 0) throw new Error(`similarity failed: ${sim.stderr}`);
  process.stdout.write(sim.stdout);

  // A live migration: a tracked image written to all along, three rounds, then the cutover.
  const svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth: { insecure: true } });
  const live = ext4('vm-disk', Object.fromEntries(Object.entries(system).slice(0, 40)), '48M');
  const tracked = new TrackedImage(live, 4096);
  let n = 0;
  const write = () => { tracked.write((((n * 7919) % 6000) + 300) * 4096 + 64, seeded(1000 + n, 3000)); n++; };
  const timer = setInterval(() => { for (let i = 0; i < 4; i++) write(); }, 2);
  const recorder = new TimelineRecorder({ intervalMs: 100 });
  let result, timeline;
  try {
    result = await migrate(live, recorder.attach({
      to: `127.0.0.1:${svc.address.port}`, name: 'vm-disk', auth: { insecure: true }, tracked, maxRounds: 3, maxDowntime: 0, bwlimit: 8e6,
      pause: () => clearInterval(timer), resume: () => {},
    }));
    timeline = recorder.stop();
  } finally {
    clearInterval(timer);
    tracked.close();
    await svc.close();
  }
  const reportPage = join(dir, 'migration-report.html');
  writePage(reportPage, migrationReport(result, timeline, { to: '127.0.0.1' }));

  const browser = await puppeteer.launch({ executablePath: chromium, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
  try {
    mkdirSync(out, { recursive: true });
    for (const [file, png, height] of [[simPage, 'similarity.png', 1180], [reportPage, 'migration-report.png', 1060]]) {
      const page = await browser.newPage();
      await page.setViewport({ width: 1040, height, deviceScaleFactor: 1 });
      await page.goto(pathToFileURL(file).href, { waitUntil: 'load' });
      await page.screenshot({ path: join(out, png), ...(process.env.FULL ? { fullPage: true } : { clip: { x: 0, y: 0, width: 1040, height } }) });
      await page.close();
      console.log(`wrote ${join(out, png)}`);
    }
  } finally {
    await browser.close();
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
