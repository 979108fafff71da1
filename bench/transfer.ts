// Migrations between real processes on the bench corpus (bench/corpus.ts:
// older.img and newer.img, 2 GiB ext4 images of a Debian root holding about
// 360 and 710 MB of data), one run of each peer side by side:
//
//   1. a 100 Mbit/s tbf link between two network namespaces, the destination
//      holding older.img as a neighbour, migrating newer.img: similarity with
//      --compress auto, none and zstd:3; full; rsync -z and plain rsync to a
//      daemon whose module holds a copy of older.img under newer's name;
//   2. the same at 1 Gbit/s, similarity with --compress auto;
//   3. loopback, no limit: full against `cp newer.img X && sync`, similarity
//      (destination holding older) against full, --compress none against auto;
//   4. loopback, 128 MiB of random data: full copy against a plain pipe.
//
// Bytes on the wire are counted on the source's veth (tx_bytes + rx_bytes:
// both directions, Ethernet, IP and TCP headers included); times are the wall
// time of the migrating process (or rsync client, or cp + sync), start to exit.
// Every destination image is compared byte for byte with the source (cmp)
// before any figure is printed.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import Table from 'cli-table3';
import { benchCorpus, missingDistinct } from './corpus.js';
import { check, randomFill, runGroup, type GroupResult } from './lib.js';
import { twoHosts } from './netns.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const MiB = 1 << 20;
const MB = 1e6;
const INDEX_FILE = 'neighbourhood.bfidx';
const sh = (a: string[]) => spawnSync(a[0]!, a.slice(1), { stdio: 'ignore' }).status === 0;

function run(args: string[]): { code: number | null; out: string; err: string; seconds: number } {
  const t0 = performance.now();
  const r = spawnSync(args[0]!, args.slice(1), { encoding: 'utf8', maxBuffer: 64 << 20 });
  return { code: r.status, out: r.stdout, err: r.stderr, seconds: (performance.now() - t0) / 1000 };
}

/** Byte-for-byte comparison of two files (cmp; holes read as zeros). */
function same(a: string, b: string): boolean {
  return spawnSync('cmp', ['-s', a, b]).status === 0;
}

async function startServe(prefix: string[], listen: string, dataDir: string, keyFile: string, neighbours: string[]): Promise<{ proc: ChildProcess; port: number }> {
  const args = [...prefix, process.execPath, bin, 'serve', '--listen', listen, '--data-dir', dataDir, '--key-file', keyFile, ...neighbours.flatMap((n) => ['--neighbour', n])];
  const proc = spawn(args[0]!, args.slice(1), { stdio: ['ignore', 'pipe', 'ignore'], env: { ...process.env, ...serveEnv } });
  const line = await new Promise<string>((res, rej) => {
    createInterface({ input: proc.stdout! }).once('line', res);
    proc.once('exit', (c) => rej(new Error(`serve exited (${c}) before listening`)));
  });
  return { proc, port: (JSON.parse(line) as { port: number }).port };
}

/** Extra environment for serve processes (BF_BENCH_SERVE_NODE_OPTIONS=--cpu-prof ... to profile them). */
const serveEnv: Record<string, string> = process.env.BF_BENCH_SERVE_NODE_OPTIONS ? { NODE_OPTIONS: process.env.BF_BENCH_SERVE_NODE_OPTIONS } : {};

interface MigrationJson {
  seconds: number;
  phases: Record<string, number>;
  wire: { sent: Record<string, number>; sentRaw: Record<string, number>; received: Record<string, number>; total: number };
  blocks: Record<string, number>;
}

/** One row of a section: what ran, its wall time, bytes, and for blockferry its --json result. */
interface Row {
  name: string;
  seconds: number;
  /** Bytes counted on the veth (both directions), or on loopback the migration's own count. */
  wireBytes: number;
  json?: MigrationJson;
  note?: string;
}

const mb = (n: number) => (n / MB).toFixed(1);
const phasesOf = (j: MigrationJson) => ['scan', 'transfer', 'rounds', 'verify', 'cutover'].map((p) => `${p} ${(j.phases[p] ?? 0).toFixed(2)}`).join(', ');
/** Compressed ÷ raw for block data (1.000: stored). */
const dataRatio = (j: MigrationJson) => (j.wire.sentRaw.data ? j.wire.sent.data! / j.wire.sentRaw.data : 1);

function printRows(title: string, rows: Row[], wireLabel: string): void {
  const t = new Table({ head: ['run', 'wall s', 'migrate s', `${wireLabel} MB`, 'data MB (÷ raw)', 'fingerprints MB', 'phases s'], style: { head: [], border: [] } });
  for (const r of rows) {
    const j = r.json;
    t.push([
      r.name, r.seconds.toFixed(2), j ? j.seconds.toFixed(2) : '—', mb(r.wireBytes),
      j ? `${mb(j.wire.sent.data!)} (${dataRatio(j).toFixed(3)})` : (r.note ?? '—'),
      j ? mb(j.wire.sent.fingerprints!) : '—',
      j ? phasesOf(j) : '—',
    ]);
  }
  console.log(`\n## ${title}`);
  console.log(t.toString());
}

const goalLines: Array<{ goal: string; value: string; met: boolean }> = [];
function goal(text: string, value: string, met: boolean): void {
  goalLines.push({ goal: text, value, met });
  console.log(`  goal: ${text}: ${value} ${met ? 'met' : 'MISSED'}`);
}

export interface TransferFigures {
  corpus: { older: string; newer: string; missing: { blocks: number; bytes: number; zstd3Bytes?: number } };
  sections: Record<string, Row[]>;
  goals: typeof goalLines;
}

export async function benchTransfer(): Promise<{ groups: GroupResult[]; figures?: TransferFigures }> {
  const corpus = await benchCorpus();
  const dir = mkdtempSync(join(tmpdir(), 'bf-bench-xfer-'));
  const groups: GroupResult[] = [];
  const sections: Record<string, Row[]> = {};
  try {
    const keyFile = join(dir, 'key');
    writeFileSync(keyFile, 'bench-key-0123456789abcdef-0123');
    const t0 = performance.now();
    const missing = await missingDistinct(corpus.older, corpus.newer);
    console.log(`\ncorpus: ${corpus.dir}; missing distinct (newer's 4 KiB contents older lacks): ${missing.blocks} blocks, ${mb(missing.bytes)} MB` +
      (missing.zstd3Bytes !== undefined ? `, zstd -3 ${mb(missing.zstd3Bytes)} MB` : ' (zstd CLI missing: no compressed size)') +
      ` (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
    // A destination data directory whose neighbourhood index holds older.img, made once and copied for each run
    // (a destination that finished a migration has indexed it, and would serve the next one from it).
    const seed = join(dir, 'seed');
    const s = await startServe([], '127.0.0.1:0', seed, keyFile, [corpus.older]);
    s.proc.kill('SIGTERM');
    await new Promise((r) => s.proc.once('exit', r));
    check('seed index', statSync(join(seed, INDEX_FILE)).size > 0);
    const ctx: Ctx = { dir, keyFile, older: corpus.older, newer: corpus.newer, seedIndex: join(seed, INDEX_FILE), zstd3: missing.zstd3Bytes ?? missing.bytes };
    Object.assign(sections, await wan(ctx));
    Object.assign(sections, await loopbackCorpus(ctx));
    groups.push(...(await loopbackPipe(dir, keyFile)));
    return { groups, figures: { corpus: { older: corpus.older, newer: corpus.newer, missing }, sections, goals: goalLines } };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

interface Ctx { dir: string; keyFile: string; older: string; newer: string; seedIndex: string; zstd3: number }

/**
 * A destination service per run, holding only older.img: kill the last one,
 * remove its data, start a new one from a copy of the seed index.
 */
function destinations(ctx: Ctx, prefix: string[], host: string) {
  let gen = 0;
  let cur: { proc: ChildProcess; port: number; dataDir: string } | undefined;
  const stop = async () => {
    if (!cur) return;
    if (cur.proc.exitCode === null) {
      cur.proc.kill('SIGKILL');
      await new Promise((r) => cur!.proc.once('exit', r));
    }
    rmSync(cur.dataDir, { recursive: true, force: true });
    cur = undefined;
  };
  const fresh = async () => {
    await stop();
    const dataDir = join(ctx.dir, `dst${gen++}`);
    mkdirSync(dataDir);
    copyFileSync(ctx.seedIndex, join(dataDir, INDEX_FILE));
    const s = await startServe(prefix, `${host}:0`, dataDir, ctx.keyFile, [ctx.older]);
    cur = { ...s, dataDir };
    return cur;
  };
  return { fresh, stop };
}

/** `blockferry migrate newer.img` to a fresh destination; checks the result with cmp. */
async function migration(ctx: Ctx, dests: ReturnType<typeof destinations>, prefix: string[], host: string, name: string, args: string[], counter?: () => number): Promise<Row> {
  const d = await dests.fresh();
  const before = counter?.() ?? 0;
  const r = run([...prefix, process.execPath, ...(process.env.BF_BENCH_MIGRATE_NODE_OPTIONS?.split(' ') ?? []), bin, 'migrate', ctx.newer, '--to', `${host}:${d.port}`, '--key-file', ctx.keyFile, '--name', 'newer', '--json', '--progress', 'none', ...args]);
  const after = counter?.() ?? 0;
  check(`migrate ${name}`, r.code === 0, r.err);
  const json = JSON.parse(r.out) as MigrationJson;
  // Without a veth (loopback), the migration's own count: frames, both directions.
  const wire = counter ? after - before : json.wire.total;
  check(`${name}: destination image equals newer.img`, same(join(d.dataDir, 'newer.img'), ctx.newer));
  const row: Row = { name, seconds: r.seconds, wireBytes: wire, json };
  console.log(`  ${name}: ${r.seconds.toFixed(2)} s, ${mb(wire)} MB, data ÷ raw ${dataRatio(json).toFixed(3)}; phases ${phasesOf(json)}`);
  return row;
}

async function wan(ctx: Ctx): Promise<Record<string, Row[]>> {
  const hosts = twoHosts('bfb', 214);
  if (!hosts || !hosts.shape('100mbit', '256kb')) {
    hosts?.drop();
    console.log('\n(transfer over tbf links: needs root and iproute2 for network namespaces; skipped)');
    return {};
  }
  const { DST, inSrc, inDst, host } = hosts;
  const haveRsync = sh(['rsync', '--version']);
  // Both directions on the source's veth: everything that crossed the link, headers included.
  const counter = () => hosts.bytes();
  const dests = destinations(ctx, inDst, host);
  const procs: ChildProcess[] = [];
  const out: Record<string, Row[]> = {};
  try {
    // 1. 100 Mbit/s.
    const rows: Row[] = [];
    console.log('\n100 Mbit/s tbf link, destination holding older.img, migrating newer.img:');
    const m = (name: string, args: string[]) => migration(ctx, dests, inSrc, host, name, args, counter);
    rows.push(await m('blockferry similarity (--compress auto)', ['--strategy', 'similarity']));
    rows.push(await m('blockferry similarity --compress none', ['--strategy', 'similarity', '--compress', 'none']));
    rows.push(await m('blockferry similarity --compress zstd:3', ['--strategy', 'similarity', '--compress', 'zstd:3']));
    rows.push(await m('blockferry full (--compress auto)', ['--strategy', 'full']));
    await dests.stop();
    if (haveRsync) {
      const rdir = join(ctx.dir, 'rsync');
      mkdirSync(rdir, { recursive: true });
      const conf = join(ctx.dir, 'rsyncd.conf');
      writeFileSync(conf, `uid = root\ngid = root\nuse chroot = no\n[m]\npath = ${rdir}\nread only = false\n`);
      const d = spawn('ip', ['netns', 'exec', DST, 'rsync', '--daemon', '--no-detach', '--port', '8873', '--config', conf], { stdio: 'ignore' });
      procs.push(d);
      await new Promise((r) => setTimeout(r, 500));
      const target = join(rdir, 'newer.img');
      for (const z of [true, false]) {
        // The destination holds older.img under newer's name, as a user would seed it (untimed, sparse).
        rmSync(target, { force: true });
        check('seed rsync', sh(['cp', '--sparse=always', ctx.older, target]));
        const name = z ? 'rsync -z --inplace --no-whole-file' : 'rsync --inplace --no-whole-file';
        const before = counter();
        const r = run([...inSrc, 'rsync', ...(z ? ['-z'] : []), '-I', '--inplace', '--no-whole-file', '--stats', ctx.newer, `rsync://${host}:8873/m/newer.img`]);
        const wire = counter() - before;
        check(name, r.code === 0, r.err);
        check(`${name}: destination image equals newer.img`, same(target, ctx.newer));
        const sent = Number(/Total bytes sent: ([\d,.]+)/.exec(r.out)?.[1]?.replace(/[,.]/g, '') ?? NaN);
        const literal = Number(/Literal data: ([\d,.]+)/.exec(r.out)?.[1]?.replace(/[,.]/g, '') ?? NaN);
        rows.push({ name, seconds: r.seconds, wireBytes: wire, note: `literal ${mb(literal)}, sent ${mb(sent)}` });
        console.log(`  ${name}: ${r.seconds.toFixed(2)} s, ${mb(wire)} MB on the veth (rsync: literal data ${mb(literal)} MB, total bytes sent ${mb(sent)} MB)`);
      }
      rmSync(target, { force: true });
    } else {
      console.log('  (rsync not installed: apt-get install rsync to compare against it)');
    }
    printRows('newer.img (2 GiB, 711 MB of data) to a destination holding older.img, 100 Mbit/s tbf link between namespaces', rows, 'veth');
    out.wan100 = rows;
    const sim = rows[0]!;
    const yard = ctx.zstd3 + sim.json!.wire.sent.fingerprints!;
    goal(`similarity bytes on the veth ≤ 1.10 × (zstd -3 of the missing distinct contents ${mb(ctx.zstd3)} MB + fingerprint frames ${mb(sim.json!.wire.sent.fingerprints!)} MB) = ${mb(1.1 * yard)} MB`,
      `${mb(sim.wireBytes)} MB (${(sim.wireBytes / yard).toFixed(3)}×)`, sim.wireBytes <= 1.1 * yard);
    const line100 = 100e6 / 8;
    const bound = 1.15 * (yard / line100) + 3;
    goal(`similarity time ≤ 1.15 × those ${mb(yard)} MB at line rate (${(yard / line100).toFixed(2)} s) + 3 s = ${bound.toFixed(2)} s`,
      `${sim.seconds.toFixed(2)} s (its own ${mb(sim.wireBytes)} MB at line rate: ${(sim.wireBytes / line100).toFixed(2)} s)`, sim.seconds <= bound);
    const rz = rows.find((r) => r.name.startsWith('rsync -z'));
    if (rz) {
      goal('similarity ≥ 2× faster than rsync -z', `${(rz.seconds / sim.seconds).toFixed(2)}× (${rz.seconds.toFixed(2)} s vs ${sim.seconds.toFixed(2)} s)`, rz.seconds / sim.seconds >= 2);
      goal('similarity ≥ 1.7× fewer bytes than rsync -z (veth)', `${(rz.wireBytes / sim.wireBytes).toFixed(2)}× (${mb(rz.wireBytes)} MB vs ${mb(sim.wireBytes)} MB)`, rz.wireBytes / sim.wireBytes >= 1.7);
    }

    // 2. 1 Gbit/s.
    check('tbf 1gbit', hosts.shape('1gbit', '1mb'));
    console.log('\n1 Gbit/s tbf link, same images:');
    const g = [await m('blockferry similarity (--compress auto)', ['--strategy', 'similarity'])];
    if (process.env.BF_BENCH_GBIT_ALL) {
      g.push(await m('blockferry similarity --compress none', ['--strategy', 'similarity', '--compress', 'none']));
      g.push(await m('blockferry similarity --compress zstd:3', ['--strategy', 'similarity', '--compress', 'zstd:3']));
    }
    await dests.stop();
    printRows('newer.img to a destination holding older.img, 1 Gbit/s tbf link between namespaces', g, 'veth');
    out.wan1000 = g;
    const line1000 = 1e9 / 8;
    const gb = 1.2 * (g[0]!.wireBytes / line1000) + 2;
    goal(`1 Gbit/s: similarity (auto) time ≤ 1.2 × its ${mb(g[0]!.wireBytes)} MB at line rate (${(g[0]!.wireBytes / line1000).toFixed(2)} s) + 2 s = ${gb.toFixed(2)} s`,
      `${g[0]!.seconds.toFixed(2)} s`, g[0]!.seconds <= gb);
    return out;
  } finally {
    await dests.stop();
    for (const p of procs) p.kill('SIGKILL');
    hosts.drop();
  }
}

async function loopbackCorpus(ctx: Ctx): Promise<Record<string, Row[]>> {
  const dests = destinations(ctx, [], '127.0.0.1');
  const rows: Row[] = [];
  const m = (name: string, args: string[]) => migration(ctx, dests, [], '127.0.0.1', name, args);
  try {
    console.log('\nLoopback, no limit, newer.img:');
    const x = join(ctx.dir, 'cp-newer.img');
    const cp = () => {
      rmSync(x, { force: true });
      sh(['sync']);
      const r = run(['sh', '-c', `cp '${ctx.newer}' '${x}' && sync`]);
      check('cp', r.code === 0, r.err);
      check('cp result', same(x, ctx.newer));
      rmSync(x, { force: true });
      console.log(`  cp newer.img X && sync: ${r.seconds.toFixed(2)} s`);
      return { name: 'cp newer.img X && sync', seconds: r.seconds, wireBytes: 0 } as Row;
    };
    rows.push(cp());
    rows.push(await m('blockferry full (--compress auto)', ['--strategy', 'full']));
    rows.push(await m('blockferry similarity (--compress auto)', ['--strategy', 'similarity']));
    rows.push(await m('blockferry similarity --compress none', ['--strategy', 'similarity', '--compress', 'none']));
    rows.push(await m('blockferry full --compress none', ['--strategy', 'full', '--compress', 'none']));
    await dests.stop();
    printRows('Loopback, no limit: newer.img (2 GiB, 711 MB of data), destination holding older.img', rows, 'frames');
    const [c, full, sim, simNone, fullNone] = rows as [Row, Row, Row, Row, Row];
    goal(`loopback: full ≤ 1.5 × cp newer.img X && sync (${c.seconds.toFixed(2)} s)`, `${full.seconds.toFixed(2)} s (${(full.seconds / c.seconds).toFixed(2)}×)`, full.seconds <= 1.5 * c.seconds);
    goal('loopback: similarity no slower than full', `${sim.seconds.toFixed(2)} s vs ${full.seconds.toFixed(2)} s (${(sim.seconds / full.seconds).toFixed(2)}×)`, sim.seconds <= full.seconds);
    console.log(`  (loopback --compress none vs auto: similarity ${simNone.seconds.toFixed(2)} s vs ${sim.seconds.toFixed(2)} s, full ${fullNone.seconds.toFixed(2)} s vs ${full.seconds.toFixed(2)} s)`);
    return { loopback: rows };
  } finally {
    await dests.stop();
  }
}

async function loopbackPipe(dir: string, keyFile: string): Promise<GroupResult[]> {
  // Full copy with verification on, against a plain pipe of the same bytes between two Node processes (1 MiB writes).
  const full = Buffer.alloc(128 * MiB);
  randomFill(full, 9);
  const img = join(dir, 'dense.img');
  writeFileSync(img, full);
  const serve = await startServe([], '127.0.0.1:0', join(dir, 'dst-lo'), keyFile, []);
  let k = 0;
  const pipeScript = `
    const net = require('node:net'); const fs = require('node:fs');
    const srv = net.createServer((s) => { let n = 0; s.on('data', (d) => { n += d.length; }); s.on('end', () => { process.stdout.write(String(n)); srv.close(); }); });
    srv.listen(0, '127.0.0.1', () => {
      const c = net.connect(srv.address().port, '127.0.0.1', async () => {
        const fd = fs.openSync(${JSON.stringify(img)}, 'r'); const b = Buffer.allocUnsafe(1 << 20); let r;
        while ((r = fs.readSync(fd, b, 0, b.length, null)) > 0) { if (!c.write(Buffer.from(b.subarray(0, r)))) await new Promise((x) => c.once('drain', x)); }
        c.end();
      });
    });`;
  try {
    const fullCopy = () => {
      const r = run([process.execPath, bin, 'migrate', img, '--to', `127.0.0.1:${serve.port}`, '--key-file', keyFile, '--strategy', 'full', '--name', `d${k++}`, '--json']);
      check('loopback full', r.code === 0, r.err);
    };
    fullCopy();
    check('loopback result', readFileSync(join(dir, 'dst-lo', `d${k - 1}.img`)).equals(full));
    rmSync(join(dir, 'dst-lo', `d${k - 1}.img`));
    const pipe = () => {
      const r = run([process.execPath, '-e', pipeScript]);
      check('pipe', Number(r.out) === full.length, r.err);
    };
    pipe();
    return [
      await runGroup({
        title: 'Loopback, 128 MiB of random data, no bandwidth limit',
        workPerOp: full.length,
        unit: 'MB/s',
        time: 1,
        iterations: 3,
        warmupIterations: 0,
        tasks: [
          { name: 'blockferry full copy (verified, 2 processes)', ours: true, fn: fullCopy, beforeEach: () => rmSync(join(dir, 'dst-lo', `d${k - 1}.img`), { force: true }) },
          { name: 'plain pipe of the file, 1 MiB writes', fn: pipe },
        ],
        goals: [{ vs: 'plain pipe of the file, 1 MiB writes', min: 0.6 }],
      }),
    ];
  } finally {
    serve.proc.kill('SIGKILL');
  }
}
