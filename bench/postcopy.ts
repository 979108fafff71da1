// Pre-copy, post-copy and hybrid side by side under a write-heavy workload
// (issue 10; paper 002's comparison, paper 004's yardsticks). The source and
// the destination are separate processes in two network namespaces joined by
// a 100 Mbit/s tbf link; the destination holds the corpus's older image as a
// neighbour; the source migrates a copy of the newer one while its writer
// dirties a 64 MiB hot set at 16 MB/s (faster than the link drains) and the
// rest at 1 MB/s. After the switch, the VM's load runs at the destination:
// reads of random blocks (70 % in the hot set), timed and classed by whether
// the block had arrived, and writes into the hot set. Every destination image
// is checked byte for byte against the source as paused plus the
// destination's own writes before a figure is printed.
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import Table from 'cli-table3';
import { benchCorpus } from './corpus.js';
import { check } from './lib.js';
import { twoHosts } from './netns.js';
import { DestinationService, INDEX_FILE } from '../src/roles/destination/service.js';
import type { MigrationResult } from '../src/migrate/migrate.js';

const here = new URL('.', import.meta.url).pathname;
const MiB = 1 << 20;
const MB = 1e6;
const KEY = 'bench-key-0123456789abcdef-0123';
const HOT = { offset: 512 * MiB, bytes: 64 * MiB, rate: 16e6 };
const COLD_RATE = 1e6;
const LINK = 12.5e6;

interface Latency { n: number; mean: number; p99: number }
interface DstReport { same: boolean; demand: Latency | null; arrived: Latency | null; writes: number; eventLoop: { p99: number; max: number } }
interface SrcReport { result: MigrationResult; writer: { writes: number; seconds: number } }
export interface PostcopyRow { strategy: string; wireBytes: number; src: SrcReport; dst: DstReport }

function lines(proc: ReturnType<typeof spawn>): AsyncIterator<string> {
  return createInterface({ input: proc.stdout! })[Symbol.asyncIterator]();
}

export async function benchPostcopy(): Promise<{ rows: PostcopyRow[]; goals: Array<{ goal: string; value: string; met: boolean }> } | undefined> {
  const corpus = await benchCorpus();
  const hosts = twoHosts('bfp', 215);
  if (!hosts || !hosts.shape('100mbit', '256kb')) {
    hosts?.drop();
    console.log('\n(post-copy bench: needs root and iproute2 for network namespaces; skipped)');
    return undefined;
  }
  const dir = mkdtempSync(join(tmpdir(), 'bf-bench-pc-'));
  const rows: PostcopyRow[] = [];
  const goals: Array<{ goal: string; value: string; met: boolean }> = [];
  try {
    // The destination's neighbourhood index of older.img, made once.
    const seed = join(dir, 'seed');
    const s = await DestinationService.start({ dataDir: seed, auth: { key: Buffer.from(KEY) }, neighbours: [corpus.older] });
    await s.close();
    const rttMs = tcpRtt(hosts);
    console.log(`\n100 Mbit/s tbf link; RTT ${rttMs.toFixed(3)} ms (TCP connect, median of 20); writer: 64 MiB hot set at 16 MB/s, the rest at 1 MB/s`);
    const only = process.env.BF_BENCH_STRATEGIES?.split(',');
    // Pre-copy cuts over when its rounds stall (--on-stall force: the classic behaviour), or switches (--on-stall postcopy).
    const runs = [
      { label: 'similarity', strategy: 'similarity', onStall: 'force' },
      { label: 'similarity, on stall postcopy', strategy: 'similarity', onStall: 'postcopy' },
      { label: 'postcopy', strategy: 'postcopy' },
      { label: 'hybrid', strategy: 'hybrid' },
    ] as const;
    for (const { label, strategy, ...rest } of runs.filter((x) => !only || only.includes(x.label))) {
      const tag = label.replace(/[^a-z]+/g, '-');
      const dataDir = join(dir, `dst-${tag}`);
      mkdirSync(dataDir);
      copyFileSync(join(seed, INDEX_FILE), join(dataDir, INDEX_FILE));
      const image = join(dir, `src-${tag}.img`);
      spawnSync('cp', ['--sparse=always', corpus.newer, image]);
      const dcfg = { dataDir, key: KEY, neighbours: [corpus.older], source: image, hot: HOT, readsPerSecond: 200, writeRate: 1e6, seed: 11 };
      const dst = spawn(hosts.inDst[0]!, [...hosts.inDst.slice(1), 'env', 'UV_THREADPOOL_SIZE=16', process.execPath, join(here, 'postcopy-dst.js'), JSON.stringify(dcfg)], { stdio: ['ignore', 'pipe', 'inherit'] });
      const dl = lines(dst);
      const { port } = JSON.parse((await dl.next()).value as string) as { port: number };
      const before = hosts.bytes();
      const scfg = { image, to: `${hosts.host}:${port}`, key: KEY, strategy, ...rest, hot: HOT, coldRate: COLD_RATE, seed: 5 };
      const src = spawn(hosts.inSrc[0]!, [...hosts.inSrc.slice(1), process.execPath, join(here, 'postcopy-src.js'), JSON.stringify(scfg)], { stdio: ['ignore', 'pipe', 'inherit'] });
      const sl = lines(src);
      const srcOut = (await sl.next()).value as string | undefined;
      if (srcOut === undefined) dst.kill('SIGKILL');
      check(`${label}: the source finished`, srcOut !== undefined);
      const wireBytes = hosts.bytes() - before;
      const dstOut = (await dl.next()).value as string | undefined;
      check(`${label}: the destination reported`, dstOut !== undefined);
      const row: PostcopyRow = { strategy: label, wireBytes, src: JSON.parse(srcOut!) as SrcReport, dst: JSON.parse(dstOut!) as DstReport };
      check(`${label}: the destination holds the source as paused plus its own writes`, row.dst.same);
      rows.push(row);
      const r = row.src.result;
      console.log(`  ${label}: ${r.seconds.toFixed(2)} s, downtime ${(r.downtimeSeconds * 1000).toFixed(1)} ms, ${(wireBytes / MB).toFixed(1)} MB on the veth, ${r.blocks.resent} blocks re-sent, ${r.rounds} rounds; destination event loop held p99 ${row.dst.eventLoop.p99.toFixed(1)} ms, max ${row.dst.eventLoop.max.toFixed(1)} ms`);
      rmSync(image, { force: true });
      rmSync(dataDir, { recursive: true, force: true });
    }
    const t = new Table({ head: ['strategy', 'total s', 'downtime ms', 'veth MB', 'blocks re-sent', 'rounds', 'demand reads (mean / p99 ms)', 'arrived reads (mean / p99 ms)', 'pulled', 'dst writes'], style: { head: [], border: [] } });
    const lat = (l: Latency | null) => (l ? `${l.n}: ${l.mean.toFixed(2)} / ${l.p99.toFixed(2)}` : '—');
    for (const row of rows) {
      const r = row.src.result;
      t.push([row.strategy, r.seconds.toFixed(2), (r.downtimeSeconds * 1000).toFixed(1), (row.wireBytes / MB).toFixed(1), String(r.blocks.resent), String(r.rounds),
        lat(row.dst.demand), lat(row.dst.arrived), r.postcopy ? String(r.postcopy.pulledBlocks) : '—', String(row.dst.writes)]);
    }
    console.log('\n## Pre-copy, post-copy and hybrid under a hot-set writer (100 Mbit/s)');
    console.log(t.toString());
    const by = (s: string) => rows.find((r) => r.strategy === s) ?? rows[0]!;
    const goal = (text: string, value: string, met: boolean) => { goals.push({ goal: text, value, met }); console.log(`  goal: ${text}: ${value} ${met ? 'met' : 'MISSED'}`); };
    const ratio = by('hybrid').wireBytes / by('similarity').wireBytes;
    goal('hybrid bytes ≤ 0.5 × pre-copy (similarity)', `${ratio.toFixed(2)}×`, ratio <= 0.5);
    for (const s of ['postcopy', 'hybrid']) {
      const d = by(s).src.result.downtimeSeconds * 1000;
      goal(`${s} downtime ≤ 100 ms`, `${d.toFixed(1)} ms`, d <= 100);
    }
    const bound = 2 * rttMs + (4096 / LINK) * 1000;
    for (const s of ['postcopy', 'hybrid']) {
      const p = by(s).dst.demand?.p99;
      goal(`${s} p99 demand-read latency ≤ 2 RTT + one block at line rate (${bound.toFixed(2)} ms)`, p === undefined ? 'no demand reads' : `${p.toFixed(2)} ms`, p !== undefined && p <= bound);
    }
    return { rows, goals };
  } finally {
    hosts.drop();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The link's round trip: TCP connects from the source host to a listener on the destination host (SYN, SYN-ACK). */
function tcpRtt(hosts: NonNullable<ReturnType<typeof twoHosts>>): number {
  const server = spawn(hosts.inDst[0]!, [...hosts.inDst.slice(1), process.execPath, '-e', "require('net').createServer((s)=>s.destroy()).listen(7999,'0.0.0.0',()=>console.log('up'))"], { stdio: ['ignore', 'pipe', 'ignore'] });
  try {
    spawnSync('sleep', ['0.5']);
    const probe = `const net=require('net');const t=[];(async()=>{for(let i=0;i<20;i++){const a=performance.now();await new Promise((r,j)=>{const s=net.connect(7999,'${hosts.host}',()=>{t.push(performance.now()-a);s.destroy();r()});s.on('error',j)})}t.sort((a,b)=>a-b);console.log(t[10])})()`;
    const r = spawnSync(hosts.inSrc[0]!, [...hosts.inSrc.slice(1), process.execPath, '-e', probe], { encoding: 'utf8' });
    const v = Number(r.stdout.trim());
    check('RTT measured', Number.isFinite(v), r.stderr);
    return v;
  } finally {
    server.kill('SIGKILL');
  }
}

