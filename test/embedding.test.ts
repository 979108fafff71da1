// blockferry inside someone else's program (issue 14): one progress shape
// for every long call (callback or async iterator), a signal on every long
// call including the services, structured logs in pino's shape, and a
// process that aborts everything and then exits by itself.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { createInterface } from 'node:readline';
import { pino } from 'pino';
import {
  DestinationService, ErrorCode, Scanner, buildIndex, memoryLogger, migrate, progressOf, similarity, similarityMatrix,
  type LogEntry, type Logger, type Progress,
} from '../src/index.js';
import { seededBytes } from './util.js';

const MiB = 1 << 20;
const BS = 4096;
const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const distIndex = new URL('../src/index.js', import.meta.url).href;
let dir: string;
let a: string;
let b: string;

/** Image b shares its first half with a; the rest is its own, with a zero run between. */
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bf-embed-'));
  a = join(dir, 'a.img');
  b = join(dir, 'b.img');
  const da = Buffer.from(seededBytes(71, 8 * MiB));
  writeFileSync(a, da);
  writeFileSync(b, Buffer.concat([da.subarray(0, 4 * MiB), Buffer.alloc(MiB), Buffer.from(seededBytes(72, 3 * MiB))]));
});
after(() => rmSync(dir, { recursive: true, force: true }));

const insecure = { insecure: true } as const;

describe('one progress shape', () => {
  it('a migration through progressOf: every update has the shape, phases come in order, the transfer ends complete, and the iterator ends with the call', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst-progress'), auth: insecure });
    try {
      const run = progressOf((onProgress) => migrate(a, { to: `127.0.0.1:${svc.address.port}`, name: 'a', strategy: 'full', auth: insecure, onProgress }));
      const seen: Progress[] = [];
      for await (const p of run) seen.push(p);
      const r = await run.result;
      assert.ok(seen.length >= 3, `${seen.length} updates`);
      for (const p of seen) {
        assert.equal(p.operation, 'migrate');
        assert.equal(p.path, a);
        assert.ok(p.done >= 0 && p.done <= p.total, `done ${p.done} of ${p.total}`);
        assert.ok(Number.isFinite(p.rate) && p.rate >= 0 && p.elapsed >= 0);
        assert.equal(p.blocksLeft, Math.ceil((p.total - p.done) / BS));
      }
      const order = ['scan', 'transfer', 'rounds', 'verify', 'cutover'];
      const phases = seen.map((p) => order.indexOf(p.phase));
      assert.ok(phases.every((v, i) => v >= 0 && (i === 0 || v >= phases[i - 1]!)), `phases in order: ${seen.map((p) => p.phase).join(',')}`);
      const lastTransfer = seen.filter((p) => p.phase === 'transfer').at(-1)!;
      assert.equal(lastTransfer.done, lastTransfer.total);
      assert.equal(lastTransfer.blocksLeft, 0);
      // sentBytes only grows, and ends no later than what the result counts.
      const sent = seen.map((p) => p.sentBytes!);
      assert.ok(sent.every((v, i) => i === 0 || v >= sent[i - 1]!));
      assert.ok(sent.at(-1)! <= r.wire.total, `${sent.at(-1)} <= ${r.wire.total}`);
      assert.ok(readFileSync(join(dir, 'dst-progress', 'a.img')).equals(readFileSync(a)));
    } finally {
      await svc.close();
    }
  });

  it('progressOf ends its iteration with the call\'s error, and result rejects with it', async () => {
    const run = progressOf((onProgress) => migrate(a, { to: '127.0.0.1:1', auth: insecure, onProgress }));
    await assert.rejects(async () => { for await (const _ of run) { /* none */ } }, { code: ErrorCode.CONNECTION });
    await assert.rejects(run.result, { code: ErrorCode.CONNECTION });
  });

  it('a scan reports operation scan, its bytes up to the image size, and the last update complete', async () => {
    const scanner = new Scanner({ workers: 2 });
    try {
      const seen: Progress[] = [];
      await scanner.scan(b, { rangeBytes: 4 * MiB, onProgress: (p) => seen.push(p) });
      assert.ok(seen.length >= 2);
      assert.ok(seen.every((p) => p.operation === 'scan' && p.phase === 'scan' && p.path === b && p.total === 8 * MiB && p.round === 0));
      assert.equal(seen.at(-1)!.done, 8 * MiB);
    } finally {
      await scanner.close();
    }
  });

  it('the destination reports each migration it receives: operation receive, under its name, complete at the end', async () => {
    const seen: Progress[] = [];
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst-receive'), auth: insecure, onProgress: (p) => seen.push(p) });
    try {
      const r = await migrate(b, { to: `127.0.0.1:${svc.address.port}`, name: 'bee', strategy: 'full', auth: insecure });
      assert.ok(seen.length >= 1);
      assert.ok(seen.every((p) => p.operation === 'receive' && p.path === 'bee' && p.done <= p.total));
      const last = seen.at(-1)!;
      // b holds 7 MiB of data (1 MiB is a zero run): that is what arrived.
      assert.equal(last.total, 7 * MiB);
      assert.equal(last.done, last.total);
      assert.equal(last.blocksLeft, 0);
      const sent = Object.values(r.wire.sent).reduce((x, y) => x + y, 0);
      assert.ok(last.receivedBytes! >= 7 * MiB && last.receivedBytes! <= sent, `${last.receivedBytes} received, ${sent} sent`);
    } finally {
      await svc.close();
    }
  });
});

describe('signals on every long call', () => {
  it('similarity() and buildIndex(): the same results as the maps give, and an abort rejects with ERR_BF_ABORTED', async () => {
    const [m4k, m16k] = await similarity([a, b], { blockSize: [4096, 16384], noSave: true });
    const scanner = new Scanner({ workers: 1 });
    try {
      const maps = await Promise.all([a, b].map(async (p) => (await scanner.scan(p, { blockSize: 4096 }))[0]!));
      assert.deepEqual(m4k, similarityMatrix(maps));
    } finally {
      await scanner.close();
    }
    assert.equal(m16k!.blockSize, 16384);
    // b's first 4 MiB are a's: half of a's 2048 blocks are in b.
    assert.equal(m4k!.similarity[1]![0], 50);
    const n = await buildIndex([a, b], { noSave: true });
    assert.equal(n.images.length, 2);
    const ac = new AbortController();
    ac.abort(new Error('enough'));
    await assert.rejects(similarity([a, b], { signal: ac.signal, noSave: true }), { code: ErrorCode.ABORTED });
    await assert.rejects(buildIndex([a, b], { signal: ac.signal, noSave: true }), { code: ErrorCode.ABORTED });
    // Mid-scan: the first progress update aborts it.
    const mid = new AbortController();
    await assert.rejects(
      buildIndex([a, b], { rescan: true, noSave: true, rangeBytes: 4 * MiB, workers: 1, signal: mid.signal, onProgress: (p) => { if (p.done > 0) mid.abort(); } }),
      { code: ErrorCode.ABORTED },
    );
  });

  it('DestinationService: aborted before start it rejects; aborted mid-migration it stops, keeps the journal, and a new service resumes it', async () => {
    const pre = new AbortController();
    pre.abort('no');
    await assert.rejects(DestinationService.start({ dataDir: join(dir, 'dst-pre'), auth: insecure, signal: pre.signal }), { code: ErrorCode.ABORTED });
    const data = join(dir, 'dst-abort');
    const ac = new AbortController();
    const svc = await DestinationService.start({ dataDir: data, auth: insecure, signal: ac.signal });
    const to = `127.0.0.1:${svc.address.port}`;
    await assert.rejects(
      migrate(a, {
        to, name: 'a', strategy: 'full', auth: insecure, bwlimit: 2 * MiB,
        onProgress: (p) => { if (p.phase === 'transfer' && p.done >= 2 * MiB) ac.abort(new Error('host shutting down')); },
      }),
      (e: { code?: string }) => e.code === ErrorCode.CONNECTION || e.code === ErrorCode.REFUSED || e.code === ErrorCode.TIMEOUT,
    );
    await svc.close(); // already closed by the signal: resolves at once
    assert.ok(existsSync(join(data, 'a.img.journal')), 'the journal stays for a resume');
    assert.ok(!existsSync(join(data, 'a.img')), 'no image under its final name');
    const again = await DestinationService.start({ dataDir: data, auth: insecure });
    try {
      const r = await migrate(a, { to: `127.0.0.1:${again.address.port}`, name: 'a', strategy: 'full', auth: insecure });
      assert.ok(r.blocks.resumed > 0, `resumed ${r.blocks.resumed}`);
      assert.ok(readFileSync(join(data, 'a.img')).equals(readFileSync(a)));
    } finally {
      await again.close();
    }
  });

  it('a program that aborts a scan, a migration and its service mid-way exits by itself (nothing left running)', async () => {
    const script = join(dir, 'embedder.mjs');
    writeFileSync(script, `
      import { DestinationService, Scanner, migrate, similarity } from ${JSON.stringify(distIndex)};
      const [a, b, data] = process.argv.slice(2);
      const codes = [];
      const scan = new AbortController();
      await similarity([a, b], { noSave: true, rescan: true, rangeBytes: 4 << 20, workers: 2, signal: scan.signal, onProgress: (p) => { if (p.done > 0) scan.abort(); } }).catch((e) => codes.push(e.code));
      const svcStop = new AbortController();
      const svc = await DestinationService.start({ dataDir: data, auth: { insecure: true }, signal: svcStop.signal });
      const mig = new AbortController();
      await migrate(a, { to: '127.0.0.1:' + svc.address.port, name: 'x', strategy: 'full', auth: { insecure: true }, bwlimit: 2 << 20, signal: mig.signal,
        onProgress: (p) => { if (p.phase === 'transfer' && p.done > 0) mig.abort(); } }).catch((e) => codes.push(e.code));
      svcStop.abort();
      console.log(JSON.stringify(codes));
    `);
    const child = spawn(process.execPath, [script, a, b, join(dir, 'dst-embedder')], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    // A hang detector, not a timing assertion: a process with a handle left open never exits.
    const killer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((r) => child.once('exit', (c, s) => r([c, s])));
    clearTimeout(killer);
    assert.equal(signal, null, `the process had to be killed: something was left running (stderr: ${err})`);
    assert.equal(code, 0, err);
    assert.deepEqual(JSON.parse(out.trim()), [ErrorCode.ABORTED, ErrorCode.ABORTED]);
  });
});

describe('structured logging', () => {
  it('a destination logs levels and fields; peer text in them is escaped', async () => {
    const entries: LogEntry[] = [];
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst-log'), auth: insecure, logger: memoryLogger(entries) });
    try {
      await migrate(b, { to: `127.0.0.1:${svc.address.port}`, name: 'logged', strategy: 'full', auth: insecure });
      await assert.rejects(migrate(b, { to: `127.0.0.1:${svc.address.port}`, name: 'bad\nname\u001b[31m', auth: insecure }), { code: ErrorCode.REFUSED });
    } finally {
      await svc.close();
    }
    const start = entries.find((e) => e.msg.startsWith('migration into logged from'));
    assert.ok(start, entries.map((e) => e.msg).join('\n'));
    assert.equal(start.level, 'info');
    assert.equal(start.fields.role, 'destination');
    assert.equal(start.fields.image, 'logged');
    assert.equal(start.fields.strategy, 'full');
    assert.equal(start.fields.size, 8 * MiB);
    const done = entries.find((e) => e.msg.startsWith('migration into logged complete'))!;
    assert.equal((done.fields.stats as { receivedBlocks: number }).receivedBlocks, 7 * 256);
    const refused = entries.find((e) => e.level === 'warn' && e.fields.code === ErrorCode.NAME_INVALID);
    assert.ok(refused, 'the refusal is a warning with its code');
    for (const e of entries) {
      assert.ok(!/[\n\u001b]/.test(e.msg) && !/[\n\u001b]/.test(JSON.stringify(e.fields).replace(/\\[nu]/g, '')), `escaped: ${JSON.stringify(e)}`);
    }
  });

  it('a pino logger is a Logger: the service writes pino JSON lines through it', async () => {
    const lines: string[] = [];
    const stream = new Writable({ write(chunk, _enc, cb) { lines.push(...String(chunk).split('\n').filter(Boolean)); cb(); } });
    const logger: Logger = pino({ level: 'debug' }, stream);
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst-pino'), auth: insecure, logger });
    try {
      await migrate(b, { to: `127.0.0.1:${svc.address.port}`, name: 'pino', strategy: 'full', auth: insecure });
    } finally {
      await svc.close();
    }
    const parsed = lines.map((l) => JSON.parse(l) as { level: number; msg: string; role?: string; image?: string });
    const complete = parsed.find((p) => p.msg.startsWith('migration into pino complete'));
    assert.ok(complete, lines.join('\n'));
    assert.equal(complete.level, 30);
    assert.equal(complete.role, 'destination');
    assert.equal(complete.image, 'pino');
  });

  it('blockferry serve --log-format json --progress json: every stderr line is JSON; the log has pino\'s fields, the progress lines operation receive', async () => {
    const data = join(dir, 'dst-cli-json');
    const serve = spawn(process.execPath, [bin, 'serve', '--listen', '127.0.0.1:0', '--data-dir', data, '--insecure', '--log-format', 'json', '--progress', 'json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    serve.stderr!.on('data', (d) => (err += d));
    try {
      const { port } = JSON.parse(await new Promise<string>((r) => createInterface({ input: serve.stdout! }).once('line', r))) as { port: number };
      const m = spawnSync(process.execPath, [bin, 'migrate', b, '--to', `127.0.0.1:${port}`, '--insecure', '--name', 'cli', '--strategy', 'full', '--progress', 'none'], { encoding: 'utf8' });
      assert.equal(m.status, 0, m.stderr);
    } finally {
      const exited = new Promise((r) => serve.once('exit', r));
      serve.kill('SIGTERM');
      await exited;
    }
    const lines = err.split('\n').filter(Boolean);
    const objs = lines.map((l) => { try { return JSON.parse(l) as Record<string, unknown>; } catch { assert.fail(`not JSON: ${l}`); } });
    const logs = objs.filter((o) => o.event !== 'progress');
    assert.ok(logs.length >= 2 && logs.every((o) => typeof o.level === 'number' && typeof o.time === 'number' && typeof o.pid === 'number' && typeof o.hostname === 'string' && typeof o.msg === 'string' && o.name === 'blockferry'));
    const complete = logs.find((o) => String(o.msg).startsWith('migration into cli complete'));
    assert.ok(complete && complete.image === 'cli' && complete.role === 'destination', err);
    const progress = objs.filter((o) => o.event === 'progress');
    assert.ok(progress.length >= 1 && progress.every((p) => p.operation === 'receive' && p.path === 'cli'), err);
    assert.equal(progress.at(-1)!.done, progress.at(-1)!.total);
  });
});
