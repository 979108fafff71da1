// Regenerates the README's pictures of the two pages (docs/img/similarity.png,
// docs/img/migration-report.png): real ext4 images made by mkfs.ext4 -d from
// this machine's own file trees (Python's), the similarity page as `blockferry similarity --html`
// writes it, the report of a live migration (a tracked image written to all
// along, in-process destination), both photographed in headless Chromium.
// Needs a build (npm run build), mkfs.ext4 and chromium (BLOCKFERRY_CHROMIUM
// to point elsewhere). Usage: node scripts/screenshots.mjs [OUT_DIR]
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import puppeteer from 'puppeteer-core';
import { DestinationService, TimelineRecorder, TrackedImage, migrate, migrationReport, writePage } from '../dist/src/index.js';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const out = process.argv[2] ?? join(root, 'docs', 'img');
const chromium = process.env.BLOCKFERRY_CHROMIUM ?? '/usr/bin/chromium';
const dir = mkdtempSync(join(tmpdir(), 'bf-shots-'));

/** xorshift32 bytes, as test/util.ts's seededBytes: what the live migration's writer writes. */
function seeded(seed, n) {
  const b = new Uint8Array(n);
  let x = (seed * 2654435761) >>> 0 || 0x9e3779b9;
  for (let i = 0; i < n; i++) { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; b[i] = x; }
  return b;
}

/** An ext4 image (mkfs.ext4 -d) of a tree made by copying system folders: [source, name inside] pairs, and paths to leave out. */
function ext4(name, parts, drop = [], size = '128M') {
  const tree = join(dir, `${name}.d`);
  mkdirSync(tree);
  for (const [from, to] of parts) cpSync(from, join(tree, to), { recursive: true, verbatimSymlinks: true });
  for (const d of drop) rmSync(join(tree, d), { recursive: true, force: true });
  const img = join(dir, `${name}.img`);
  execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', tree, '-E', 'lazy_itable_init=0,nodiscard', img, size], { stdio: 'pipe' });
  return img;
}

// Real file trees from this machine: the Python standard library, an
// "update" of it (two packages gone, the locale sources added), and the
// Debian Python packages with the same locale sources.
const python = readdirSync('/usr/lib').filter((d) => /^python3\.\d+$/.test(d)).sort().map((d) => join('/usr/lib', d))[0];
if (!python) throw new Error('no /usr/lib/python3.N on this machine to build images from');
const images = [
  ext4('python', [[python, 'python']]),
  ext4('python-update', [[python, 'python'], ['/usr/share/i18n', 'i18n']], ['python/test', 'python/email']),
  ext4('dist-packages', [['/usr/lib/python3/dist-packages', 'dist-packages'], ['/usr/share/i18n', 'i18n']]),
];

try {
  const bin = join(root, 'bin', 'blockferry.js');
  const simPage = join(dir, 'similarity.html');
  const args = ['similarity', '--block-size', '1k-16k', '--markdown', '--html', simPage, ...images];
  const sim = spawnSync(process.execPath, [bin, ...args, '--progress', 'none'], { cwd: dir, encoding: 'utf8' });
  if (sim.status !== 0) throw new Error(`similarity failed: ${sim.stderr}`);
  process.stdout.write(`$ blockferry ${args.map((a) => a.replace(dir + '/', '')).join(' ')}\n${sim.stdout}`);

  // A live migration: a tracked image written to all along, three rounds, then the cutover.
  const svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth: { insecure: true } });
  const live = ext4('vm-disk', [[python, 'python']]);
  const tracked = new TrackedImage(live, 4096);
  let n = 0;
  const write = () => { tracked.write((((n * 7919) % 20000) + 300) * 4096 + 64, seeded(1000 + n, 3000)); n++; };
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
    for (const [file, png, height] of [[simPage, 'similarity.png', 1180], [reportPage, 'migration-report.png', 0]]) {
      const page = await browser.newPage();
      // The similarity page is cut after its first pair of heatmaps; the report is shown whole (height 0).
      await page.setViewport({ width: 1040, height: height || 900, deviceScaleFactor: 1 });
      await page.goto(pathToFileURL(file).href, { waitUntil: 'load' });
      await page.screenshot({ path: join(out, png), ...(process.env.FULL || !height ? { fullPage: true } : { clip: { x: 0, y: 0, width: 1040, height } }) });
      await page.close();
      console.log(`wrote ${join(out, png)}`);
    }
  } finally {
    await browser.close();
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
