// SnapMig (paper 000, issue 11): a chain of a base and three snapshots with
// real file-system data (the bench corpus: base = the older Debian root,
// snapshot 1 = the newer one, snapshots 2 and 3 = files written into it with
// debugfs), migrated between three network namespaces: the source's uplink
// shaped to 100 Mbit/s, the backup server's to 1 Gbit/s, the destination's
// unlimited. SnapMig, FullMig and SelectiveMig in one run: total time,
// bytes the source sent, bytes on every link, and how much a writer on the
// source (a co-located VM's I/O, its own process) slowed down meanwhile.
// Each result is checked before it is reported: every layer the destination
// holds has the identity of the source's layer (SHA-1 of every 64 KiB
// block), the flattened image is compared with qemu-img compare.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import Table from 'cli-table3';
import { benchCorpus } from './corpus.js';
import { overlayOf } from '../test/snapmig-fixtures.js';
import { snapHosts, type SnapHosts } from './snapmig-hosts.js';
import { Scanner } from '../src/scan/scanner.js';
import { layerIdentity, rawLayerDigest, stackMap } from '../src/snapmig/identity.js';
import type { ChainMigrationResult } from '../src/snapmig/migrate-chain.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const MB = 1e6;
const WORK = process.env.BLOCKFERRY_SNAPMIG_DIR ?? '/var/tmp/blockferry-snapmig-bench';
const KEY = 'snapmig-bench-key-0123456789abcdef';

export interface SnapmigRow {
  strategy: string;
  /** The run with the co-located writer (its slowdown), or without (the clean time and bytes). */
  writer: boolean;
  seconds: number;
  sourceSentBytes: number;
  activeLayerBytes: number;
  links: { srcToDst: number; bakToDst: number; srcToBak: number };
  bySender: Record<string, number>;
  writerAloneMBs: number;
  writerDuringMBs: number;
  writerSlowdownPercent: number;
  checked: boolean;
}

const run = (cmd: string, args: string[]) => {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
};

/** base ← s1 ← s2 ← act from the corpus, cached in WORK (a recipe version in a stamp file). */
function buildChain(older: string, newer: string): string[] {
  const f = (n: string) => join(WORK, n);
  const files = ['base', 's1', 's2', 'act'].map((n) => f(`${n}.qcow2`));
  const stamp = f('CHAIN-v3');
  if (existsSync(stamp) && files.every(existsSync)) return files;
  rmSync(WORK, { recursive: true, force: true });
  mkdirSync(WORK, { recursive: true });
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', older, files[0]!]);
  // Each snapshot holds only the clusters that differ from the chain below it.
  overlayOf(newer, files[0]!, files[1]!);
  // Snapshots 2 and 3: real files of the newer root written into it again under new names (a package cache, a build tree).
  const big = ['/usr/lib/x86_64-linux-gnu/libasan.so.8.0.0', '/usr/lib/x86_64-linux-gnu/libtsan.so.2.0.0', '/usr/lib/x86_64-linux-gnu/libc.a', '/usr/lib/x86_64-linux-gnu/libcrypto.so.3', '/usr/lib/x86_64-linux-gnu/libperl.so.5.36.0'];
  let raw = f('state.raw');
  run('cp', ['--sparse=always', newer, raw]);
  for (const [k, name] of [[2, 's2'], [3, 'act']] as const) {
    for (const [i, src] of big.entries()) {
      const out = f(`dump-${k}-${i}`);
      run('debugfs', ['-R', `dump ${src} ${out}`, newer]);
      const b = readFileSync(out);
      b.writeUInt32LE(k * 1000 + i, 0); // distinct files per snapshot
      writeFileSync(out, b);
      for (let copy = 0; copy < (k === 2 ? 2 : 1); copy++) run('debugfs', ['-w', '-R', `write ${out} snap${k}-${i}-${copy}`, raw]);
    }
    overlayOf(raw, files[k - 1]!, f(`${name}.qcow2`));
  }
  rmSync(raw, { force: true });
  raw = '';
  // The backup server's copies (last night's backup: base, s1, s2), under other names, chained to each other.
  mkdirSync(f('backup'), { recursive: true });
  for (let i = 0; i < 3; i++) {
    run('cp', ['--sparse=always', files[i]!, f(`backup/nightly-${i}.qcow2`)]);
    if (i) run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', f(`backup/nightly-${i - 1}.qcow2`), '-F', 'qcow2', f(`backup/nightly-${i}.qcow2`)]);
  }
  writeFileSync(stamp, 'v3\n');
  return files;
}

interface Server { proc: ChildProcess; port: number; stop(): Promise<void> }
async function serveIn(prefix: string[], args: string[], keyFile: string): Promise<Server> {
  const proc = spawn(prefix[0]!, [...prefix.slice(1), process.execPath, bin, 'serve', ...args, '--key-file', keyFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (d) => { err += d; });
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: proc.stdout! }).once('line', resolve);
    proc.once('exit', (c) => reject(new Error(`serve exited with ${c}: ${err}`)));
  });
  return { proc, port: (JSON.parse(line) as { port: number }).port, stop: () => new Promise<void>((r) => { if (proc.exitCode !== null) return r(); proc.once('exit', () => r()); proc.kill('SIGTERM'); }) };
}

/** The co-located VM: a process rewriting 1 MiB pieces of its own 256 MiB file with O_DSYNC, as fast as it can. */
function writer(file: string): ChildProcess {
  const script = `const fs=require('node:fs');const fd=fs.openSync(${JSON.stringify(file)},fs.constants.O_RDWR|fs.constants.O_CREAT|fs.constants.O_DSYNC);
    const b=Buffer.alloc(1<<20,7);let i=0;for(;;){b.writeUInt32LE(i,0);fs.writeSync(fd,b,0,b.length,(i%256)*(1<<20));i++;}`;
  return spawn(process.execPath, ['-e', script], { stdio: 'ignore' });
}
const wchar = (pid: number) => Number(/wchar:\s*(\d+)/.exec(readFileSync(`/proc/${pid}/io`, 'utf8'))?.[1] ?? 0);

export async function benchSnapmig(): Promise<{ rows: SnapmigRow[]; chain: { layer: string; dataBytes: number }[] } | undefined> {
  console.log('\n## snapmig: SnapMig vs FullMig vs SelectiveMig (paper 000), three namespaces: source uplink 100 Mbit/s, backup server 1 Gbit/s');
  let corpus;
  try {
    corpus = await benchCorpus();
  } catch (e) {
    console.log(`skipped: ${(e as Error).message}`);
    return undefined;
  }
  const files = buildChain(corpus.older, corpus.newer);
  const chain = files.map((f, i) => ({ layer: ['base', 'snapshot 1', 'snapshot 2', 'active'][i]!, dataBytes: stackMap(f, 1).dataBytes }));
  const total = chain.reduce((n, l) => n + l.dataBytes, 0);
  console.log(chain.map((l) => `${l.layer} ${(l.dataBytes / MB).toFixed(0)} MB`).join(', ') + `; active layer ${(100 * chain[3]!.dataBytes / total).toFixed(1)} % of the chain's data`);
  // BLOCKFERRY_NETNS_PREFIX / _OCTET: names and subnets of its own, for a run beside other benches on one machine.
  const hosts: SnapHosts | undefined = snapHosts(process.env.BLOCKFERRY_NETNS_PREFIX ?? 'bfF', Number(process.env.BLOCKFERRY_NETNS_OCTET ?? 217));
  if (!hosts) { console.log('skipped: cannot create network namespaces (needs root and iproute2)'); return undefined; }
  const keyFile = join(WORK, 'key');
  writeFileSync(keyFile, `${KEY}\n`);
  const cache = join(WORK, 'ids');
  const scanner = new Scanner();
  const rows: SnapmigRow[] = [];
  try {
    // Identities are computed once (a backup system does it when it takes the snapshot): timed here, cached for the runs.
    let t = performance.now();
    const ids = [];
    for (const f of files.slice(0, 3)) ids.push(await layerIdentity(f, 1, { scanner, cacheDir: cache }));
    console.log(`layer identities of base and snapshots at the source: ${((performance.now() - t) / 1000).toFixed(1)} s (0 when cached)`);
    if (!(hosts.shapeSource('100mbit') && hosts.shapeBackup('1gbit'))) throw new Error('tbf refused');
    t = performance.now();
    const bk = await serveIn(hosts.inBak, ['--role', 'backup', '--listen', '0.0.0.0:0', '--data-dir', join(WORK, 'bk-data'), ...[0, 1, 2].flatMap((i) => ['--image', join(WORK, `backup/nightly-${i}.qcow2`)])], keyFile);
    console.log(`backup server indexed its layers in ${((performance.now() - t) / 1000).toFixed(1)} s (cached in its data directory after the first run)`);
    const wfile = join(WORK, 'colocated.img');
    const measure = (w: ChildProcess, seconds: number) => new Promise<number>((res) => { const a = wchar(w.pid!); setTimeout(() => res((wchar(w.pid!) - a) / seconds / MB), seconds * 1000); });
    // Two passes: without a writer (time and bytes), then with the co-located writer (its slowdown).
    // snapmig-parallel: SnapMig with the backup server's layers side by side (--backup-parallel 3), against the default one after another.
    for (const withWriter of [false, true]) for (const strategy of withWriter ? ['snapmig', 'fullmig', 'selectivemig'] : ['snapmig', 'snapmig-parallel', 'fullmig', 'selectivemig']) {
      const data = join(WORK, `dst-${strategy}`);
      rmSync(data, { recursive: true, force: true });
      const dst = await serveIn(hosts.inDst, ['--listen', `${hosts.dst}:0`, '--data-dir', data], keyFile);
      const w = withWriter ? writer(wfile) : undefined;
      try {
        let alone = 0;
        if (w) {
          await new Promise((r) => setTimeout(r, 1000));
          alone = await measure(w, 4);
        }
        const before = hosts.bytes();
        const a0 = w ? wchar(w.pid!) : 0;
        const t0 = performance.now();
        const snap = strategy.startsWith('snapmig');
        const args = [files[3]!, '--strategy', snap ? 'snapmig' : strategy, '--to', `${hosts.dst}:${dst.port}`, '--name', 'vm', '--cache-dir', cache, '--json', '--key-file', keyFile,
          ...(snap ? ['--backup', `${hosts.bak}:${bk.port}`] : []), ...(strategy === 'snapmig-parallel' ? ['--backup-parallel', '3'] : [])];
        const out = run(hosts.inSrc[0]!, [...hosts.inSrc.slice(1), process.execPath, bin, 'migrate', ...args]);
        const seconds = (performance.now() - t0) / 1000;
        const during = w ? (wchar(w.pid!) - a0) / seconds / MB : 0;
        const after = hosts.bytes();
        const r = JSON.parse(out) as ChainMigrationResult;
        // Check before reporting.
        let checked: boolean;
        if (strategy === 'selectivemig') {
          checked = spawnSync('qemu-img', ['compare', '-q', '-f', 'raw', join(data, 'vm.img'), files[3]!]).status === 0;
        } else {
          const m = JSON.parse(readFileSync(join(data, 'vm.chain.json'), 'utf8')) as { layers: { file: string; bottom: boolean; size: number; covered: { offset: number; length: number }[] }[] };
          checked = m.layers.length === 4;
          for (const [i, l] of m.layers.entries()) {
            const want = i < 3 ? ids[i]!.id : (await layerIdentity(files[3]!, 1, { scanner })).id;
            checked &&= (await rawLayerDigest(join(data, l.file), l, scanner)) === want;
          }
        }
        if (!checked) throw new Error(`${strategy}: the destination's result is not the source's chain`);
        // Where the time went: each send (who, how long), in the order they ended.
        console.log(`${strategy}${withWriter ? ' (writer)' : ''}: ${seconds.toFixed(1)} s; sends ${r.sends.map((s) => `L${s.layers.join('+')} ${s.sender === 'source' ? 'source' : 'backup'} ${s.seconds.toFixed(1)} s`).join(', ')}`);
        rows.push({
          strategy, writer: withWriter, seconds, sourceSentBytes: r.bytesBySender.source ?? 0, activeLayerBytes: r.activeLayerBytes,
          links: { srcToDst: after.srcToDst - before.srcToDst, bakToDst: after.bakToDst - before.bakToDst, srcToBak: after.srcToBak - before.srcToBak },
          bySender: r.bytesBySender, writerAloneMBs: alone, writerDuringMBs: during, writerSlowdownPercent: w ? 100 * (1 - during / alone) : 0, checked,
        });
      } finally {
        w?.kill('SIGKILL');
        await dst.stop();
        rmSync(data, { recursive: true, force: true });
      }
    }
    await bk.stop();
  } finally {
    await scanner.close();
    hosts.drop();
  }
  const table = new Table({ head: ['strategy', 'writer', 'total s', 'source sent MB', 'src→dst link MB', 'backup→dst link MB', 'src→backup MB', 'writer MB/s alone → during', 'writer slowdown'] });
  for (const r of rows) {
    table.push([r.strategy, r.writer ? 'yes' : 'no', r.seconds.toFixed(1), (r.sourceSentBytes / MB).toFixed(1), (r.links.srcToDst / MB).toFixed(1), (r.links.bakToDst / MB).toFixed(1), (r.links.srcToBak / MB).toFixed(3),
      r.writer ? `${r.writerAloneMBs.toFixed(0)} → ${r.writerDuringMBs.toFixed(0)}` : '—', r.writer ? `${r.writerSlowdownPercent.toFixed(0)} %` : '—']);
  }
  console.log(table.toString());
  const clean = rows.filter((r) => !r.writer);
  const snap = clean.find((r) => r.strategy === 'snapmig')!, full = clean.find((r) => r.strategy === 'fullmig')!, sel = clean.find((r) => r.strategy === 'selectivemig')!;
  const ratio = snap.sourceSentBytes / snap.activeLayerBytes;
  console.log(`goal: SnapMig's source sends ≤ 1.05 × its active layer's changes: ${ratio.toFixed(3)} × (${(snap.sourceSentBytes / MB).toFixed(1)} MB for ${(snap.activeLayerBytes / MB).toFixed(1)} MB) ${ratio <= 1.05 ? 'met' : 'NOT met'}`);
  const tr = snap.seconds / full.seconds;
  console.log(`goal: SnapMig's total time ≤ 0.3 × FullMig's (active layer ${(100 * chain[3]!.dataBytes / total).toFixed(1)} % of the data): ${tr.toFixed(3)} × (${snap.seconds.toFixed(1)} s vs ${full.seconds.toFixed(1)} s) ${tr <= 0.3 ? 'met' : 'NOT met'}`);
  console.log(`vs SelectiveMig: ${(snap.seconds / sel.seconds).toFixed(3)} ×. Paper 000 reports 619 → 313 s for one VM (0.51 ×, 1.89× faster) and 2,028 → 694 s for two (0.34 ×) on a shared 1 Gbit/s network.`);
  return { rows, chain };
}
