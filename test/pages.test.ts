// The pages a person looks at (issue 14), loaded in a real headless Chromium
// (Debian's chromium, driven by puppeteer-core): the similarity heatmaps of
// real ext4 images and the report of a real live migration. Every page must
// load with no console error, no failed request and no request at all
// beyond itself (the Content-Security-Policy forbids them; requests are also
// intercepted and counted), show exactly the library's numbers, and keep
// hostile image names as text.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Browser, Page } from 'puppeteer-core';
import { Scanner } from '../src/scan/scanner.js';
import { similarityMatrix, type SimilarityMatrix } from '../src/similarity/similarity.js';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate, type MigrationResult } from '../src/migrate/migrate.js';
import { TrackedImage } from '../src/image/tracked.js';
import { ErrorCode } from '../src/errors.js';
import { TimelineRecorder, migrationReport, similarityPage, timelineRounds, type Timeline } from '../src/report/index.js';
import { seededBytes } from './util.js';

const CHROMIUM = process.env.BLOCKFERRY_CHROMIUM ?? '/usr/bin/chromium';
const haveChromium = existsSync(CHROMIUM);
const haveMkfs = (() => { try { execFileSync('mkfs.ext4', ['-V'], { stdio: 'ignore' }); return true; } catch { return false; } })();
const skip = !haveChromium ? `no ${CHROMIUM} (.ci/run installs Debian's chromium)` : !haveMkfs ? 'mkfs.ext4 is not installed (.ci/run installs e2fsprogs)' : false;
const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const BS = 4096;

let dir: string;
let shots: string;
let browser: Browser;
const scanner = new Scanner({ workers: 2 });

/** An ext4 image of a file tree (mkfs.ext4 -d), as a real VM disk would hold one. */
function ext4(name: string, files: Record<string, Uint8Array>, size = '16M'): string {
  const root = join(dir, `${name}.d`);
  mkdirSync(root);
  for (const [f, data] of Object.entries(files)) writeFileSync(join(root, f), data);
  const img = join(dir, `${name}.img`);
  execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', root, '-E', 'lazy_itable_init=0,nodiscard', img, size], { stdio: 'pipe' });
  return img;
}

/** Three images: a base system, an update of it (some files changed), and a different system sharing a library or two. */
function threeImages(): string[] {
  const libs = Object.fromEntries(Array.from({ length: 5 }, (_, i) => [`lib${i}.so`, seededBytes(10 + i, 200_000 + 70_000 * i)]));
  return [
    ext4('base', { ...libs, 'app.bin': seededBytes(1, 900_000) }),
    ext4('update', { ...libs, 'lib4.so': seededBytes(99, 480_000), 'app.bin': seededBytes(2, 950_000) }),
    ext4('other', { 'lib0.so': libs['lib0.so']!, 'lib1.so': libs['lib1.so']!, 'data.db': seededBytes(3, 1_500_000) }),
  ];
}

interface Loaded {
  page: Page;
  errors: string[];
  /** Requests for anything but the page itself: aborted, and a failure of the test. */
  external: string[];
  failed: string[];
}

/** Opens a page file in Chromium, recording console errors, page errors and every request that is not the page. */
async function load(file: string): Promise<Loaded> {
  const page = await browser.newPage();
  await page.setViewport({ width: 1200, height: 900 });
  const errors: string[] = [], external: string[] = [], failed: string[] = [];
  const url = pathToFileURL(file).href;
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warn') errors.push(`${m.type()}: ${m.text()}`); });
  page.on('pageerror', (e) => errors.push(`pageerror: ${(e as Error).message}`));
  page.on('requestfailed', (r) => { if (!external.includes(r.url())) failed.push(r.url()); });
  page.on('dialog', (d) => { errors.push(`dialog: ${d.message()}`); void d.dismiss(); });
  await page.setRequestInterception(true);
  page.on('request', (r) => {
    if (r.url() === url) void r.continue();
    else { external.push(r.url()); void r.abort(); }
  });
  await page.goto(url, { waitUntil: 'load' });
  return { page, errors, external, failed };
}

function assertClean(l: Loaded): void {
  assert.deepEqual(l.errors, [], 'console errors');
  assert.deepEqual(l.external, [], 'requests beyond the page');
  assert.deepEqual(l.failed, [], 'failed requests');
}

/** Every heatmap cell of one kind and block size, as the page shows it. */
async function cells(page: Page, kind: 'similarity' | 'bytes', blockSize: number) {
  return page.$$eval(`figure.heatmap[data-kind="${kind}"][data-block-size="${blockSize}"] td.cell`, (tds) =>
    tds.map((td) => ({ base: Number(td.getAttribute('data-base')), target: Number(td.getAttribute('data-target')), value: Number(td.getAttribute('data-value')), text: td.textContent ?? '' })));
}

/** Asserts the page's heatmaps hold exactly the matrix: N×N cells, each with its value. */
async function assertHeatmaps(page: Page, m: SimilarityMatrix): Promise<void> {
  const n = m.images.length;
  for (const kind of ['similarity', 'bytes'] as const) {
    const got = await cells(page, kind, m.blockSize);
    assert.equal(got.length, n * n, `${kind} heatmap at ${m.blockSize} B has N×N cells`);
    const want = kind === 'similarity' ? m.similarity : m.bytesToSend;
    for (const c of got) assert.equal(c.value, want[c.base]![c.target], `${kind}[${c.base}][${c.target}] at ${m.blockSize} B`);
    assert.deepEqual(new Set(got.map((c) => `${c.base},${c.target}`)).size, n * n, 'every (base, target) once');
    if (kind === 'similarity') for (const c of got) assert.equal(c.text, want[c.base]![c.target]!.toFixed(1));
  }
}

async function screenshot(page: Page, name: string): Promise<void> {
  const file = join(shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  const png = readFileSync(file);
  assert.deepEqual([...png.subarray(1, 4)], [0x50, 0x4e, 0x47], `${name}.png is a PNG`);
  assert.ok(png.length > 5000, `${name}.png shows something (${png.length} bytes)`);
}

interface ChartData { t: number[]; rates: Record<string, number[]>; first: Record<string, number> }
const chartData = (page: Page) => page.evaluate(() => JSON.parse(document.getElementById('report-data')!.textContent!) as ChartData);

/** The throughput series integrated over time, plus the first sample, equal the result's bytes sent of each kind. */
function assertChartAddsUp(data: ChartData, result: MigrationResult): void {
  for (const k of ['control', 'fingerprints', 'data', 'verify'] as const) {
    let sum = data.first[k]!;
    for (let i = 1; i < data.t.length; i++) sum += data.rates[k]![i]! * (data.t[i]! - data.t[i - 1]!);
    assert.ok(Math.abs(sum - result.wire.sent[k]) < 1e-6 * Math.max(1, result.wire.sent[k]), `${k}: chart ${sum} vs result ${result.wire.sent[k]}`);
  }
}

const freePort = () => new Promise<number>((resolve) => {
  const s = createServer().listen(0, '127.0.0.1', () => { const p = (s.address() as { port: number }).port; s.close(() => resolve(p)); });
});

const runCli = (...args: string[]) => new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
  const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout.on('data', (d) => { out += d; });
  p.stderr.on('data', (d) => { err += d; });
  p.on('close', (code) => resolve({ code, out, err }));
});

describe('pages in headless Chromium', { skip }, () => {
  let images: string[];
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'bfB-pages-'));
    shots = join(dir, 'screenshots');
    mkdirSync(shots);
    images = threeImages();
    const { default: puppeteer } = await import('puppeteer-core');
    browser = await puppeteer.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
  });
  after(async () => {
    await browser?.close();
    await scanner.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const matrices = async (sizes: number[]) => {
    const maps = await Promise.all(images.map((p) => scanner.scan(p, { blockSize: sizes })));
    return sizes.map((_, k) => similarityMatrix(maps.map((m) => m[k]!)));
  };

  it('the similarity page shows the library\'s matrix as N×N heatmaps, the value on hover, and no sweep for one block size', async () => {
    const [m] = await matrices([BS]);
    const file = join(dir, 'similarity.html');
    writeFileSync(file, similarityPage([m!]));
    const l = await load(file);
    try {
      await assertHeatmaps(l.page, m!);
      // The images share blocks, and not all: the page has something to show.
      assert.ok(m!.similarity[0]![1]! > 10 && m!.similarity[0]![1]! < 100);
      assert.equal(await l.page.$('#sweep'), null, 'no sweep chart with one block size');
      const tipBefore = await l.page.$eval('#tip', (e) => getComputedStyle(e).display);
      assert.equal(tipBefore, 'none');
      await l.page.hover('figure.heatmap[data-kind="similarity"] td.cell[data-base="0"][data-target="1"]');
      const tip = await l.page.$eval('#tip', (e) => ({ display: getComputedStyle(e).display, text: e.textContent ?? '' }));
      assert.equal(tip.display, 'block');
      assert.ok(tip.text.includes(`${m!.similarity[0]![1]!.toFixed(2)} %`), tip.text);
      assert.ok(tip.text.includes(`(${m!.bytesToSend[0]![1]} bytes)`), tip.text);
      assert.ok(tip.text.includes('base.img') && tip.text.includes('update.img'), tip.text);
      await screenshot(l.page, 'similarity');
      assertClean(l);
    } finally {
      await l.page.close();
    }
  });

  it('with several block sizes the page draws the sweep chart and a heatmap pair per size, each equal to the library\'s', async () => {
    const sizes = [1024, 4096, 16384];
    const ms = await matrices(sizes);
    const file = join(dir, 'sweep.html');
    writeFileSync(file, similarityPage(ms));
    const l = await load(file);
    try {
      for (const m of ms) await assertHeatmaps(l.page, m);
      // uPlot drew the chart: a canvas and one legend entry per base → target pair (3 × 2) besides x.
      assert.equal(await l.page.$$eval('#sweep canvas', (c) => c.length), 1);
      assert.equal(await l.page.$$eval('#sweep .u-legend .u-series', (s) => s.length), 1 + 6);
      // Paper 001's Fig. 6 shape: at 16 KiB blocks (beyond ext4's 4 KiB) the update shares less than at 4 KiB.
      assert.ok(ms[2]!.similarity[0]![1]! < ms[1]!.similarity[0]![1]!);
      await screenshot(l.page, 'similarity-sweep');
      assertClean(l);
    } finally {
      await l.page.close();
    }
  });

  it('blockferry similarity --html writes the page (atomically, beside the usual output), and it loads clean', async () => {
    const file = join(dir, 'cli-similarity.html');
    const r = await runCli('similarity', '--block-size', '4k,8k', '--html', file, '--json', ...images.slice(0, 2), '--progress', 'none');
    assert.equal(r.code, 0, r.err);
    const printed = JSON.parse(r.out) as SimilarityMatrix[];
    assert.equal(printed.length, 2);
    const l = await load(file);
    try {
      for (const m of printed) await assertHeatmaps(l.page, m);
      assert.equal(await l.page.$$eval('#sweep canvas', (c) => c.length), 1);
      assertClean(l);
    } finally {
      await l.page.close();
    }
  });

  it('hostile image names stay text: no script runs, no handler fires, the name is shown as written', async () => {
    const hostileFile = '<img src=x onerror="window.__pwned=1">.img';
    const p = join(dir, hostileFile);
    writeFileSync(p, readFileSync(images[0]!));
    const maps = await Promise.all([p, images[1]!].map((x) => scanner.scan(x, { blockSize: BS })));
    const m = similarityMatrix(maps.map((x) => x[0]!));
    const evil = '</script><script>window.__pwned=2</script><!--';
    m.images[1]!.path = `/images/${evil}`; // a path as a program could hand it (an NBD URI's export name, say)
    const file = join(dir, 'hostile.html');
    writeFileSync(file, similarityPage([m], { title: `<b>${evil}</b>` }));
    const l = await load(file);
    try {
      assert.equal(await l.page.evaluate(() => (window as unknown as { __pwned?: number }).__pwned), undefined);
      const heads = await l.page.$$eval('figure.heatmap[data-kind="similarity"] tbody th', (th) => th.map((t) => t.textContent));
      assert.deepEqual(heads, [hostileFile, basename(m.images[1]!.path)]);
      assert.equal(await l.page.$eval('h1', (h) => h.textContent), `<b>${evil}</b>`);
      assert.equal(await l.page.$$eval('img, b', (e) => e.length), 0, 'no element made from a name');
      await assertHeatmaps(l.page, m);
      await l.page.hover('td.cell[data-base="1"][data-target="0"]');
      assert.ok((await l.page.$eval('#tip', (e) => e.textContent ?? '')).includes(evil));
      assertClean(l);
    } finally {
      await l.page.close();
    }
    // The migration report: the name at the destination and an error message are untrusted too.
    const timeline: Timeline = new TimelineRecorder().stop();
    const report = join(dir, 'hostile-report.html');
    writeFileSync(report, migrationReport(undefined, timeline, { name: evil, to: hostileFile, error: new Error(evil) }));
    const r = await load(report);
    try {
      assert.equal(await r.page.evaluate(() => (window as unknown as { __pwned?: number }).__pwned), undefined);
      assert.equal(await r.page.$eval('h1', (h) => h.textContent), `Migration of ${evil} to ${hostileFile}`);
      assert.ok((await r.page.$eval('#status', (e) => e.textContent ?? '')).includes(evil));
      assert.equal(await r.page.$$eval('img', (e) => e.length), 0);
      assertClean(r);
    } finally {
      await r.page.close();
    }
  });

  it('the report of a live migration shows every round with its dirty count, and bytes that add up to the result\'s', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth: { insecure: true } });
    const path = ext4('live', Object.fromEntries(Array.from({ length: 6 }, (_, i) => [`f${i}.bin`, seededBytes(200 + i, 600_000)])), '24M');
    const tracked = new TrackedImage(path, BS);
    // The guest writes all along, and a few blocks more at each round's start:
    // every round finds blocks dirty, so the migration runs its three rounds.
    let n = 0;
    const write = () => { tracked.write(((n * 7919) % 4000 + 200) * BS + 64, seededBytes(1000 + n, 3000)); n++; };
    const timer = setInterval(write, 2);
    const recorder = new TimelineRecorder({ intervalMs: 50 });
    let result: MigrationResult;
    try {
      result = await migrate(path, recorder.attach({
        to: `127.0.0.1:${svc.address.port}`, name: 'live', auth: { insecure: true }, tracked, maxRounds: 3, maxDowntime: 0, bwlimit: 12e6,
        onEvent: (e) => { if (e.phase === 'round') for (let i = 0; i < 5; i++) write(); },
        pause: () => clearInterval(timer),
        resume: () => {},
      }));
    } finally {
      clearInterval(timer);
      tracked.close();
      await svc.close();
    }
    const timeline = recorder.stop();
    assert.deepEqual(readFileSync(join(dir, 'dst', 'live.img')), readFileSync(path));
    assert.equal(result.live.cutoverReason, 'max-rounds');
    assert.equal(result.rounds, 4, 'three live rounds and the cutover');
    // The recorder counted exactly what the channel did.
    const last = timeline.samples[timeline.samples.length - 1]!;
    assert.deepEqual(last.sent, result.wire.sent);
    assert.deepEqual(last.received, result.wire.received);
    const rounds = timelineRounds(timeline);
    assert.equal(rounds.length, result.rounds);
    assert.ok(rounds.slice(0, 3).every((r) => r.dirty > 0), 'every live round had dirty blocks');

    const file = join(dir, 'report.html');
    writeFileSync(file, migrationReport(result, timeline, { to: '127.0.0.1' }));
    const l = await load(file);
    try {
      assert.equal(await l.page.$eval('#status', (e) => e.getAttribute('data-status')), 'ok');
      const rows = await l.page.$$eval('#rounds tbody tr', (tr) => tr.map((r) => ({ round: Number(r.getAttribute('data-round')), dirty: Number(r.getAttribute('data-dirty')), cutover: r.classList.contains('cutover') })));
      assert.equal(rows.length, result.rounds, 'as many rounds as the result says');
      assert.deepEqual(rows.map((r) => r.round), [1, 2, 3, 4]);
      assert.deepEqual(rows.map((r) => r.dirty), rounds.map((r) => r.dirty));
      assert.deepEqual(rows.map((r) => r.cutover), [false, false, false, true]);
      const shown = await l.page.$$eval('#traffic tbody tr', (tr) => Object.fromEntries(tr.map((r) => [r.getAttribute('data-kind'), Number(r.querySelector('td.sent')!.getAttribute('data-bytes'))])));
      for (const k of ['control', 'fingerprints', 'data', 'verify'] as const) assert.equal(shown[k], result.wire.sent[k], `${k} bytes sent`);
      assert.equal(shown.total, result.wire.sent.control + result.wire.sent.fingerprints + result.wire.sent.data + result.wire.sent.verify);
      // The throughput chart's series, integrated over time, give back the bytes sent of each kind.
      const data = await chartData(l.page);
      assertChartAddsUp(data, result);
      assert.ok(data.t.length >= 3, 'the chart has samples over time');
      assert.equal(await l.page.$$eval('#throughput canvas, #dirty canvas', (c) => c.length), 2, 'both charts drawn');
      await screenshot(l.page, 'migration-report');
      assertClean(l);
    } finally {
      await l.page.close();
    }
  });

  it('the report of a post-copy migration shows the switch, and only the rounds the result counts', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst-postcopy'), auth: { insecure: true } });
    const recorder = new TimelineRecorder({ intervalMs: 50 });
    let result: MigrationResult;
    try {
      result = await migrate(images[1]!, recorder.attach({ to: `127.0.0.1:${svc.address.port}`, name: 'pc', strategy: 'postcopy', auth: { insecure: true } }));
    } finally {
      await svc.close();
    }
    const timeline = recorder.stop();
    assert.deepEqual(readFileSync(join(dir, 'dst-postcopy', 'pc.img')), readFileSync(images[1]!));
    const rounds = timelineRounds(timeline);
    assert.equal(rounds.filter((r) => r.kind !== 'switch').length, result.rounds);
    assert.equal(rounds.filter((r) => r.kind === 'switch').length, 1);
    const file = join(dir, 'postcopy.html');
    writeFileSync(file, migrationReport(result, timeline));
    const l = await load(file);
    try {
      assert.equal(await l.page.$$eval('#rounds tbody tr:not(.switch)', (tr) => tr.length), result.rounds);
      assert.equal(await l.page.$$eval('#rounds tbody tr.switch', (tr) => tr.length), 1);
      const missing = await l.page.$eval('#rounds tbody tr.switch', (tr) => Number(tr.getAttribute('data-dirty')));
      assert.equal(missing, rounds.find((r) => r.kind === 'switch')!.dirty);
      assert.equal(missing, result.postcopy!.missingAtSwitch);
      assertClean(l);
    } finally {
      await l.page.close();
    }
  });

  it('the checks can fail: a page that tries to fetch anything is caught', async () => {
    const [m] = await matrices([BS]);
    const file = join(dir, 'fetching.html');
    writeFileSync(file, similarityPage([m!]).replace('</body>', '<img src="http://127.0.0.1:9/beacon.png"></body>'));
    const l = await load(file);
    try {
      assert.throws(() => assertClean(l), assert.AssertionError);
      assert.ok(l.errors.some((e) => e.includes('Content Security Policy')), l.errors.join('\n'));
    } finally {
      await l.page.close();
    }
  });

  it('blockferry migrate --report against blockferry serve: the page of a finished migration agrees with its --json result', async () => {
    const server = spawn(process.execPath, [bin, 'serve', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'dst-cli'), '--insecure'], { stdio: ['ignore', 'pipe', 'pipe'] });
    try {
      const port = await new Promise<number>((res) => server.stdout!.once('data', (d: Buffer) => res(JSON.parse(d.toString()).port)));
      const file = join(dir, 'cli-report.html');
      const r = await runCli('migrate', images[2]!, '--to', `127.0.0.1:${port}`, '--insecure', '--report', file, '--json', '--progress', 'none');
      assert.equal(r.code, 0, r.err);
      const result = JSON.parse(r.out) as MigrationResult;
      const l = await load(file);
      try {
        assert.equal(await l.page.$eval('#status', (e) => e.getAttribute('data-status')), 'ok');
        assert.equal(await l.page.$eval('h1', (h) => h.textContent), `Migration of other to 127.0.0.1:${port}`);
        assert.equal(await l.page.$$eval('#rounds tbody tr:not(.switch)', (tr) => tr.length), result.rounds);
        const shown = await l.page.$$eval('#traffic tbody tr', (tr) => Object.fromEntries(tr.map((x) => [x.getAttribute('data-kind'), Number(x.querySelector('td.sent')!.getAttribute('data-bytes'))])));
        for (const k of ['control', 'fingerprints', 'data', 'verify'] as const) assert.equal(shown[k], result.wire.sent[k], `${k} bytes sent`);
        // The chart comes from the recorder the CLI attached: it adds up to the result's bytes.
        assertChartAddsUp(await chartData(l.page), result);
        assertClean(l);
      } finally {
        await l.page.close();
      }
    } finally {
      server.kill();
    }
  });

  it('blockferry migrate --report writes the page also when the migration fails, and the page says it failed', async () => {
    const port = await freePort(); // nothing listens there
    const file = join(dir, 'failed.html');
    const r = await runCli('migrate', images[0]!, '--to', `127.0.0.1:${port}`, '--insecure', '--report', file, '--progress', 'none');
    assert.equal(r.code, 1);
    assert.match(r.err, new RegExp(ErrorCode.CONNECTION));
    const l = await load(file);
    try {
      assert.equal(await l.page.$eval('#status', (e) => e.getAttribute('data-status')), 'failed');
      assert.ok((await l.page.$eval('#status', (e) => e.textContent ?? '')).includes(ErrorCode.CONNECTION));
      assert.equal(await l.page.$eval('h1', (h) => h.textContent), `Migration of base to 127.0.0.1:${port}`);
      assertClean(l);
    } finally {
      await l.page.close();
    }
  });
});

describe('TimelineRecorder', () => {
  it('keeps its samples bounded on a long run: thins the timer samples, doubles the interval, loses no byte and no event sample', async () => {
    const recorder = new TimelineRecorder({ intervalMs: 10, maxSamples: 16 });
    const hooks = recorder.attach({});
    let frames = 0, events = 0;
    // Feed frames until the recorder has thinned twice (whatever the machine's speed).
    while (recorder.sampleIntervalMs < 40) {
      hooks.onFrame!({ direction: 'sent', type: 'BLOCKS', id: 0, bytes: 4108, compressed: false });
      hooks.onFrame!({ direction: 'received', type: 'NEED', id: 0, bytes: 20, compressed: false });
      if (++frames % 7 === 0) hooks.onEvent!({ phase: 'round', detail: { round: ++events, dirty: events } });
      await new Promise((r) => setTimeout(r, 1));
    }
    const t = recorder.stop();
    assert.equal(t.intervalMs, 40);
    // At most maxSamples timer samples, plus one per event, plus the first and the last.
    assert.ok(t.samples.length <= 16 + events + 2, `${t.samples.length} samples for ${events} events`);
    assert.equal(t.events.length, events);
    for (const e of t.events) assert.ok(t.samples.some((s) => s.t <= e.t && e.t - s.t < 0.01), 'the sample taken at each event is kept');
    for (let i = 1; i < t.samples.length; i++) assert.ok(t.samples[i]!.t >= t.samples[i - 1]!.t, 'in time order');
    const last = t.samples[t.samples.length - 1]!;
    // BLOCKS is data, NEED control (the kinds of src/protocol/messages.ts): every byte is in the last sample.
    assert.deepEqual(last.sent, { control: 0, fingerprints: 0, data: 4108 * frames, verify: 0 });
    assert.deepEqual(last.received, { control: 20 * frames, fingerprints: 0, data: 0, verify: 0 });
  });
});
