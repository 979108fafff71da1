// Scatter-gather vs direct pre-copy (issue 12, paper 003's Fig. 9 and 13):
// four similar VMs evicted together from a source whose uplink is 1 Gbit/s
// to a destination whose downlink is 100 Mbit/s (tbf on each veth), through
// two intermediaries. Five network namespaces on one bridge; every host is
// its own blockferry process. The VMs: the corpus's older and newer images,
// and one variant of each with 32 MiB of its own data. Direct: the four
// migrated one after another with similarity (each later one fills from the
// ones already there: direct's best case). Every destination image is
// compared byte for byte with its source before a figure is printed.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import Table from 'cli-table3';
import { benchCorpus } from './corpus.js';
import { check } from './lib.js';
import type { ScatterGatherResult } from '../src/migrate/scatter-gather.js';
import type { MigrationResult } from '../src/migrate/migrate.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const MB = 1e6;
const MiB = 1 << 20;
const KEY = 'bench-key-0123456789abcdef-0123';
const HOSTS = ['src', 'im1', 'im2', 'dst'] as const;
type Host = (typeof HOSTS)[number];
const ns = (h: string) => `bfDb${h}`;
const SW = 'bfDbsw';
const NET = '10.213.252';
const ipOf = (h: Host) => `${NET}.${HOSTS.indexOf(h) + 1}`;
const veth = (h: Host) => `bfDb${h}`;

function sh(args: string[]): boolean {
  return spawnSync(args[0]!, args.slice(1), { stdio: 'ignore' }).status === 0;
}
function drop(): void {
  for (const h of HOSTS) sh(['ip', 'netns', 'del', ns(h)]);
  sh(['ip', 'netns', 'del', SW]);
}
function makeNet(): boolean {
  if (process.getuid?.() !== 0) return false;
  drop();
  if (!sh(['ip', 'netns', 'add', SW])) return false;
  let ok = sh(['ip', '-n', SW, 'link', 'add', 'br0', 'type', 'bridge']) && sh(['ip', '-n', SW, 'link', 'set', 'br0', 'up']);
  for (const h of HOSTS) {
    ok = ok && sh(['ip', 'netns', 'add', ns(h)]) &&
      sh(['ip', 'link', 'add', veth(h), 'netns', ns(h), 'type', 'veth', 'peer', 'name', `${veth(h)}p`, 'netns', SW]) &&
      sh(['ip', '-n', SW, 'link', 'set', `${veth(h)}p`, 'master', 'br0']) && sh(['ip', '-n', SW, 'link', 'set', `${veth(h)}p`, 'up']) &&
      sh(['ip', '-n', ns(h), 'addr', 'add', `${ipOf(h)}/24`, 'dev', veth(h)]) && sh(['ip', '-n', ns(h), 'link', 'set', veth(h), 'up']) &&
      sh(['ip', '-n', ns(h), 'link', 'set', 'lo', 'up']);
  }
  // The source's uplink: 1 Gbit/s; the destination's downlink (the switch port towards it): 100 Mbit/s.
  ok = ok && sh(['ip', 'netns', 'exec', ns('src'), 'tc', 'qdisc', 'add', 'dev', veth('src'), 'root', 'tbf', 'rate', '1gbit', 'burst', '1mb', 'latency', '50ms']) &&
    sh(['ip', 'netns', 'exec', SW, 'tc', 'qdisc', 'add', 'dev', `${veth('dst')}p`, 'root', 'tbf', 'rate', '100mbit', 'burst', '256kb', 'latency', '200ms']);
  if (!ok) drop();
  return ok;
}

/** Bytes each host's veth sent and received so far (headers included). */
function counters(): Record<Host, { tx: number; rx: number }> {
  const out = {} as Record<Host, { tx: number; rx: number }>;
  for (const h of HOSTS) {
    const r = spawnSync('ip', ['netns', 'exec', ns(h), 'cat', `/sys/class/net/${veth(h)}/statistics/tx_bytes`, `/sys/class/net/${veth(h)}/statistics/rx_bytes`], { encoding: 'utf8' });
    const [tx, rx] = r.stdout.trim().split(/\s+/).map(Number);
    out[h] = { tx: tx!, rx: rx! };
  }
  return out;
}
const diff = (a: ReturnType<typeof counters>, b: ReturnType<typeof counters>) =>
  Object.fromEntries(HOSTS.map((h) => [h, { tx: b[h].tx - a[h].tx, rx: b[h].rx - a[h].rx }])) as Record<Host, { tx: number; rx: number }>;

interface Proc { proc: ChildProcess; port: number; stop(): Promise<void> }
async function serveIn(h: Host, args: string[], keyFile: string): Promise<Proc> {
  const proc = spawn('ip', ['netns', 'exec', ns(h), process.execPath, bin, 'serve', ...args, '--key-file', keyFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d) => { stderr += d; });
  const line = await new Promise<string>((res, rej) => {
    createInterface({ input: proc.stdout! }).once('line', res);
    proc.once('exit', (c) => rej(new Error(`serve exited with ${c}: ${stderr}`)));
  });
  return { proc, port: (JSON.parse(line) as { port: number }).port, stop: () => new Promise<void>((r) => { if (proc.exitCode !== null || proc.signalCode) return r(); proc.once('exit', () => r()); proc.kill('SIGTERM'); }) };
}
async function runIn(h: Host, args: string[]): Promise<string> {
  const p = spawn('ip', ['netns', 'exec', ns(h), process.execPath, bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout!.on('data', (d) => { out += d; });
  p.stderr!.on('data', (d) => { err += d; });
  const code = await new Promise<number | null>((r) => p.once('exit', (c) => r(c)));
  check(`blockferry ${args[0]} exited 0`, code === 0, err.slice(-2000));
  return out;
}
const same = (a: string, b: string) => spawnSync('cmp', ['-s', a, b]).status === 0;

export interface ScatterGatherBench {
  vms: string[];
  direct: { seconds: number; evictionSeconds: number; links: Record<Host, { tx: number; rx: number }>; perImage: Array<{ name: string; seconds: number; sent: number; filled: number }> };
  scatterGather: { seconds: number; evictionSeconds: number; scanSeconds: number; links: Record<Host, { tx: number; rx: number }>; result: ScatterGatherResult };
  goals: Array<{ goal: string; value: string; met: boolean }>;
}

export async function benchScatterGather(): Promise<ScatterGatherBench | undefined> {
  const corpus = await benchCorpus();
  if (!makeNet()) {
    console.log('\n(scatter-gather bench: needs root and iproute2 for network namespaces; skipped)');
    return undefined;
  }
  const dir = mkdtempSync(join(tmpdir(), 'bfD-bench-sg-'));
  const procs: Proc[] = [];
  try {
    const keyFile = join(dir, 'key');
    const fd = openSync(keyFile, 'w');
    writeSync(fd, KEY);
    closeSync(fd);
    // Four similar VMs: the two corpus images and a variant of each with 32 MiB of its own (in free space near 1.5 GiB).
    const vms = ['vm0', 'vm1', 'vm2', 'vm3'].map((n) => join(dir, `${n}.img`));
    spawnSync('cp', ['--sparse=always', corpus.older, vms[0]!]);
    spawnSync('cp', ['--sparse=always', corpus.newer, vms[1]!]);
    spawnSync('cp', ['--sparse=always', corpus.older, vms[2]!]);
    spawnSync('cp', ['--sparse=always', corpus.newer, vms[3]!]);
    for (const [i, seed] of [[2, 7], [3, 8]] as const) {
      const f = openSync(vms[i]!, 'r+');
      const buf = Buffer.alloc(MiB);
      for (let k = 0; k < 32; k++) { buf.fill(seed * 64 + k); buf.writeUInt32LE(k, 0); for (let o = 4096; o < MiB; o += 4096) buf.writeUInt32LE(o ^ (seed << 20), o); writeSync(f, buf, 0, MiB, 1536 * MiB + k * MiB); }
      closeSync(f);
    }
    const to = (p: Proc) => `${ipOf('dst')}:${p.port}`;
    console.log('\nFive namespaces on a bridge: source uplink 1 Gbit/s, destination downlink 100 Mbit/s (tbf); two intermediaries; four VMs (corpus older, newer, and a 32 MiB variant of each)');

    // Direct: one after another, similarity (each later VM fills from the ones already there).
    const dDir = join(dir, 'direct');
    const dst1 = await serveIn('dst', ['--listen', `${ipOf('dst')}:0`, '--data-dir', dDir, '--stage', '0'], keyFile);
    procs.push(dst1);
    const c0 = counters();
    const t0 = performance.now();
    const perImage: ScatterGatherBench['direct']['perImage'] = [];
    for (const vm of vms) {
      const r = JSON.parse(await runIn('src', ['migrate', vm, '--to', to(dst1), '--strategy', 'similarity', '--key-file', keyFile, '--json', '--progress', 'none'])) as MigrationResult;
      perImage.push({ name: r.name, seconds: r.seconds, sent: r.blocks.sent, filled: r.blocks.filledFromNeighbours });
      console.log(`  direct ${r.name}: ${r.seconds.toFixed(2)} s, ${r.blocks.sent} blocks sent, ${r.blocks.filledFromNeighbours} filled from neighbours`);
    }
    const directSeconds = (performance.now() - t0) / 1000;
    const directLinks = diff(c0, counters());
    await dst1.stop();
    for (const vm of vms) check(`direct: ${vm} arrived byte for byte`, same(vm, join(dDir, vm.split('/').pop()!)));

    // Scatter-gather: all four at once.
    const im1 = await serveIn('im1', ['--role', 'intermediary', '--listen', `${ipOf('im1')}:0`, '--data-dir', join(dir, 'im1'), '--capacity', '2G'], keyFile);
    procs.push(im1);
    const im2 = await serveIn('im2', ['--role', 'intermediary', '--listen', `${ipOf('im2')}:0`, '--data-dir', join(dir, 'im2'), '--capacity', '2G'], keyFile);
    procs.push(im2);
    const sDir = join(dir, 'sg');
    const dst2 = await serveIn('dst', ['--listen', `${ipOf('dst')}:0`, '--data-dir', sDir, '--stage', '2G'], keyFile);
    procs.push(dst2);
    const c1 = counters();
    const result = JSON.parse(await runIn('src', ['migrate', '--strategy', 'scatter-gather', ...vms, '--to', to(dst2), '--via', `${ipOf('im1')}:${im1.port}`, '--via', `${ipOf('im2')}:${im2.port}`, '--key-file', keyFile, '--json'])) as ScatterGatherResult;
    const sgLinks = diff(c1, counters());
    for (const vm of vms) check(`scatter-gather: ${vm} arrived byte for byte`, same(vm, join(sDir, vm.split('/').pop()!)));
    for (const p of procs) await p.stop();

    const t = new Table({ head: ['', 'eviction s', 'total s', 'src tx MB', 'dst rx MB', 'im1 rx/tx MB', 'im2 rx/tx MB'], style: { head: [], border: [] } });
    const mb = (b: number) => (b / MB).toFixed(1);
    t.push(['direct (similarity, one after another)', directSeconds.toFixed(2), directSeconds.toFixed(2), mb(directLinks.src.tx), mb(directLinks.dst.rx), `${mb(directLinks.im1.rx)} / ${mb(directLinks.im1.tx)}`, `${mb(directLinks.im2.rx)} / ${mb(directLinks.im2.tx)}`]);
    t.push(['scatter-gather (all four at once)', result.evictionSeconds.toFixed(2), result.seconds.toFixed(2), mb(sgLinks.src.tx), mb(sgLinks.dst.rx), `${mb(sgLinks.im1.rx)} / ${mb(sgLinks.im1.tx)}`, `${mb(sgLinks.im2.rx)} / ${mb(sgLinks.im2.tx)}`]);
    console.log('\n## Scatter-gather vs direct: four similar VMs evicted (1 Gbit/s source, 100 Mbit/s destination)');
    console.log(t.toString());
    const d = result.dedup;
    console.log(`  data ${mb(d.dataBytes)} MB in ${d.dataBlocks} blocks; ${d.distinctBlocks} distinct (${mb(d.stashedBytes)} MB stashed, once each); saved by cross-VM dedup ${mb(d.savedBytes)} MB; scan ${result.scanSeconds.toFixed(2)} s of the eviction`);
    for (const [peer, l] of Object.entries(result.links)) console.log(`  source → ${peer}: ${mb(l.sent)} MB sent, ${l.stashedBlocks} blocks stashed${l.refusedBlocks ? `, ${l.refusedBlocks} refused` : ''}`);
    for (const im of result.images) console.log(`  ${im.name}: ${im.gathered} of ${im.dataBlocks} blocks gathered, ${im.fromSource} from the source; placed ${JSON.stringify(im.placed)}`);
    const goals: ScatterGatherBench['goals'] = [];
    const goal = (text: string, value: string, met: boolean) => { goals.push({ goal: text, value, met }); console.log(`  goal: ${text}: ${value} ${met ? 'met' : 'MISSED'}`); };
    const ev = result.evictionSeconds / directSeconds;
    goal('eviction time ≤ 0.2 × direct', `${ev.toFixed(3)}× (${result.evictionSeconds.toFixed(2)} s vs ${directSeconds.toFixed(2)} s)`, ev <= 0.2);
    const tot = result.seconds / directSeconds;
    goal('total migration time ≤ 1.1 × direct', `${tot.toFixed(3)}× (${result.seconds.toFixed(2)} s vs ${directSeconds.toFixed(2)} s)`, tot <= 1.1);
    const once = d.stashedBytes / (d.distinctBlocks * result.blockSize);
    const srcRatio = sgLinks.src.tx / d.stashedBytes;
    goal('each distinct block crosses the source\'s link once', `${d.stashedBlocks} stashed of ${d.distinctBlocks} distinct, ${result.images.reduce((a, im) => a + im.fromSource, 0)} re-sent; source veth sent ${srcRatio.toFixed(3)}× the distinct bytes`, once <= 1.0001 && d.stashedBlocks === d.distinctBlocks && result.images.every((im) => im.fromSource === 0));
    return {
      vms: vms.map((v) => v.split('/').pop()!),
      direct: { seconds: directSeconds, evictionSeconds: directSeconds, links: directLinks, perImage },
      scatterGather: { seconds: result.seconds, evictionSeconds: result.evictionSeconds, scanSeconds: result.scanSeconds, links: sgLinks, result },
      goals,
    };
  } finally {
    for (const p of procs) await p.stop();
    drop();
    rmSync(dir, { recursive: true, force: true });
  }
}
