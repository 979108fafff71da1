// SnapMig and FullMig into a destination that writes qcow2 (serve
// --image-format qcow2), every party a separate blockferry process on
// loopback: the chain arrives as one qcow2 file per layer, each backed by
// the one below. qemu's own tools judge the result: `info --backing-chain`
// (the structure, relative backing names, format qcow2), `check` on every
// layer, `compare` of every layer (read as a chain) against the source's
// same layer and of the top against the flattened source, and `map` (each
// layer holds exactly the clusters its source layer holds; a cluster the
// layer zeroes over data below is a zero cluster, not a hole).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { backupCopies as sharedBackupCopies, haveTools, io, makeChain, run, spawnServe, type ServeProcess } from './snapmig-fixtures.js';
import type { ChainMigrationResult } from '../src/snapmig/migrate-chain.js';
import { snapHosts } from '../bench/snapmig-hosts.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const LAYERS = ['vm.L0.qcow2', 'vm.L1.qcow2', 'vm.L2.qcow2', 'vm.qcow2'];
let dir: string;
let keyFile: string;
let files: string[];
/** Where snapshot 1 holds a pattern that the active layer zeroes (half of it). */
const ZEROED_AT = 20 << 20;

before(() => {
  if (!haveTools) return;
  dir = mkdtempSync(join(tmpdir(), 'c11-snapq-'));
  keyFile = join(dir, 'key');
  writeFileSync(keyFile, 'snapmig-qcow2-key-0123456789abcdef\n');
  files = makeChain(dir, 'src-');
  io(files[1]!, `write -P 0x33 ${ZEROED_AT} 256k`);
  io(files[3]!, `write -z ${ZEROED_AT} 128k`);
  // 8 MiB more of the base's own data (random: every block its own), so that its send outlasts the destination's first journal save.
  writeFileSync(join(dir, 'random8m'), randomBytes(8 << 20));
  io(files[0]!, `write -s ${join(dir, 'random8m')} 24M 8M`);
});
after(() => { if (dir) rmSync(dir, { recursive: true, force: true }); });

type Server = ServeProcess;

async function serve(args: string[], onLine?: (l: string) => void, prefix: string[] = [], listen = '127.0.0.1:0'): Promise<Server> {
  return spawnServe([...(prefix.length ? prefix : []), process.execPath, bin, 'serve', '--listen', listen, ...args, '--key-file', keyFile, '--progress', 'none'], onLine);
}

async function migrateCli(args: string[], prefix: string[] = []): Promise<{ code: number | null; out: string; err: string }> {
  const p = spawn(prefix[0] ?? process.execPath, [...prefix.slice(1), ...(prefix.length ? [process.execPath] : []), bin, 'migrate', files[3]!, '--name', 'vm', ...args, '--key-file', keyFile, '--json', '--progress', 'none'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout!.on('data', (d) => { out += d; });
  p.stderr!.on('data', (d) => { err += d; });
  const code = await new Promise<number | null>((r) => p.once('exit', (c) => r(c)));
  return { code, out, err };
}

async function migrate(args: string[], prefix: string[] = []): Promise<ChainMigrationResult> {
  const r = await migrateCli(args, prefix);
  assert.equal(r.code, 0, `migrate failed: ${r.err}`);
  return JSON.parse(r.out) as ChainMigrationResult;
}

/** The backup system's copies of this suite's chain (snapmig-fixtures.ts). */
function backupCopies(sub: string): string[] {
  return sharedBackupCopies(files, dir, sub);
}

interface MapEntry { start: number; length: number; depth: number; zero: boolean; data: boolean }
const map = (file: string) => JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'qcow2', file])) as MapEntry[];

/** The ranges a layer holds itself (data or zero clusters: depth 0 in its chain), coalesced. */
function ownRanges(file: string): string[] {
  const out: { start: number; end: number }[] = [];
  for (const e of map(file)) {
    if (e.depth !== 0) continue;
    const last = out[out.length - 1];
    if (last && last.end === e.start) last.end = e.start + e.length;
    else out.push({ start: e.start, end: e.start + e.length });
  }
  return out.map((r) => `${r.start}-${r.end}`);
}

function checkQcow2Chain(dataDir: string): void {
  const p = (f: string) => join(dataDir, f);
  for (const f of LAYERS) assert.ok(existsSync(p(f)), `${f} written`);
  assert.deepEqual(readdirSync(dataDir).filter((f) => f.includes('.partial')), [], 'nothing half-written left');
  // The structure: the top's backing chain is the four layers, each backed by the one below by its relative name, as qcow2.
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', '--backing-chain', p('vm.qcow2')])) as { filename: string; format: string; 'backing-filename'?: string; 'backing-filename-format'?: string; 'full-backing-filename'?: string }[];
  assert.deepEqual(info.map((i) => [i.filename, i.format, i['backing-filename'] ?? null, i['backing-filename-format'] ?? null]), [
    [p('vm.qcow2'), 'qcow2', 'vm.L2.qcow2', 'qcow2'],
    [p('vm.L2.qcow2'), 'qcow2', 'vm.L1.qcow2', 'qcow2'],
    [p('vm.L1.qcow2'), 'qcow2', 'vm.L0.qcow2', 'qcow2'],
    [p('vm.L0.qcow2'), 'qcow2', null, null],
  ]);
  for (const [k, f] of LAYERS.entries()) {
    run('qemu-img', ['check', '-q', '-f', 'qcow2', p(f)]);
    // Layer k read as a chain (with what lies below it) is the source's layer k read as a chain.
    run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', p(f), files[k]!]);
    // It holds exactly the clusters the source's layer holds: nothing below is copied up, nothing it holds is left to fall through.
    if (k > 0) assert.deepEqual(ownRanges(p(f)), ownRanges(files[k]!), `layer ${k} holds the clusters its source layer holds`);
  }
  // The top against the source read through and flattened.
  const flat = join(dataDir, '..', `${dataDir.split('/').pop()}-flat.raw`);
  run('qemu-img', ['convert', '-O', 'raw', files[3]!, flat]);
  run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', p('vm.qcow2'), flat]);
  rmSync(flat);
  // The active layer zeroes half of snapshot 1's pattern: a zero cluster in the top, the pattern still in layer 1.
  const zeroed = map(p('vm.qcow2')).filter((e) => e.start < ZEROED_AT + (128 << 10) && e.start + e.length > ZEROED_AT);
  assert.ok(zeroed.length > 0 && zeroed.every((e) => e.depth === 0 && e.zero && !e.data), `the zeroed range is zero clusters of the top: ${JSON.stringify(zeroed)}`);
  io(p('vm.qcow2'), `read -P 0 ${ZEROED_AT} 128k`);
  io(p('vm.qcow2'), `read -P 0x33 ${ZEROED_AT + (128 << 10)} 128k`);
  io(p('vm.L1.qcow2'), `read -P 0x33 ${ZEROED_AT} 256k`);
}

const senders = (r: ChainMigrationResult) => r.sends.slice().sort((a, b) => a.layers[0]! - b.layers[0]!).map((s) => `${s.layers.join('+')}:${s.sender === 'source' ? 'source' : 'backup'}${s.skipped ? ':held' : ''}`);

describe('SnapMig into a destination that writes qcow2', { skip: haveTools ? false : 'mkfs.ext4, debugfs, qemu-img or qemu-io missing (.ci/run installs them)' }, () => {
  it('SnapMig between processes: one qcow2 file per layer, backed by the one below, each layer as qemu reads the source\'s; a repeated migration sends only the active layer and replaces its own chain', async () => {
    const dataDir = join(dir, 'dq1');
    const dst = await serve(['--data-dir', dataDir, '--image-format', 'qcow2']);
    const bk = await serve(['--role', 'backup', '--data-dir', join(dir, 'bk1'), ...backupCopies('bk1-img').flatMap((f) => ['--image', f])]);
    try {
      const r = await migrate(['--strategy', 'snapmig', '--to', `127.0.0.1:${dst.port}`, '--backup', `127.0.0.1:${bk.port}`]);
      assert.deepEqual(senders(r), ['0:backup', '1:backup', '2:backup', '3:source']);
      assert.equal(r.written, true);
      checkQcow2Chain(dataDir);
      const manifest = JSON.parse(readFileSync(join(dataDir, 'vm.chain.json'), 'utf8')) as { format: string; layers: { file: string; backing: string | null }[] };
      assert.equal(manifest.format, 'qcow2');
      assert.deepEqual(manifest.layers.map((l) => l.file), LAYERS);
      // Again, without --overwrite: the layers are held, the chain's own files are replaced.
      const again = await migrate(['--strategy', 'snapmig', '--to', `127.0.0.1:${dst.port}`, '--backup', `127.0.0.1:${bk.port}`]);
      assert.deepEqual(senders(again), ['0:backup:held', '1:backup:held', '2:backup:held', '3:source']);
      checkQcow2Chain(dataDir);
    } finally {
      await bk.stop();
      await dst.stop();
    }
  });

  it('FullMig: an image of that name already there is not overwritten (ERR_BF_IMAGE_EXISTS); with --overwrite the held layers are kept and the chain is written', async () => {
    const dataDir = join(dir, 'dq2');
    mkdirSync(dataDir, { recursive: true });
    const foreign = Buffer.from('not this chain\n');
    writeFileSync(join(dataDir, 'vm.qcow2'), foreign);
    const dst = await serve(['--data-dir', dataDir, '--image-format', 'qcow2']);
    try {
      const refused = await migrateCli(['--strategy', 'fullmig', '--to', `127.0.0.1:${dst.port}`]);
      assert.notEqual(refused.code, 0);
      assert.match(refused.err + refused.out, /ERR_BF_IMAGE_EXISTS/);
      assert.ok(readFileSync(join(dataDir, 'vm.qcow2')).equals(foreign), 'the image that was there is untouched');
      for (const f of LAYERS.slice(0, 3)) assert.ok(!existsSync(join(dataDir, f)), `${f} not written`);
      const r = await migrate(['--strategy', 'fullmig', '--to', `127.0.0.1:${dst.port}`, '--overwrite']);
      assert.deepEqual(senders(r), ['0:source:held', '1:source:held', '2:source:held', '3:source']);
      checkQcow2Chain(dataDir);
    } finally {
      await dst.stop();
    }
  });

  it('SnapMig --flatten into a qcow2 destination: one NAME.qcow2 without a backing file, the source read through', async () => {
    const dataDir = join(dir, 'dq4');
    const dst = await serve(['--data-dir', dataDir, '--image-format', 'qcow2']);
    const bk = await serve(['--role', 'backup', '--data-dir', join(dir, 'bk4'), ...backupCopies('bk4-img').flatMap((f) => ['--image', f])]);
    try {
      const r = await migrate(['--strategy', 'snapmig', '--flatten', '--to', `127.0.0.1:${dst.port}`, '--backup', `127.0.0.1:${bk.port}`]);
      assert.deepEqual(senders(r), ['0+1+2:backup', '3:source']);
      const info = JSON.parse(run('qemu-img', ['info', '--output=json', '--backing-chain', join(dataDir, 'vm.qcow2')])) as { format: string; 'backing-filename'?: string }[];
      assert.deepEqual(info.map((i) => [i.format, i['backing-filename'] ?? null]), [['qcow2', null]]);
      run('qemu-img', ['check', '-q', '-f', 'qcow2', join(dataDir, 'vm.qcow2')]);
      run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', join(dataDir, 'vm.qcow2'), files[3]!]);
      assert.ok(!existsSync(join(dataDir, 'vm.img')) && !existsSync(join(dataDir, 'vm.L0.qcow2')));
    } finally {
      await bk.stop();
      await dst.stop();
    }
  });

  it('across three network namespaces (source uplink 100 Mbit/s): the backup server\'s link carries base and snapshots, the destination writes the qcow2 chain', async (t) => {
    const hosts = snapHosts('c11', 211);
    if (!hosts) return t.skip('cannot create network namespaces here (not root, or no iproute2)');
    try {
      assert.ok(hosts.shapeSource('100mbit') && hosts.shapeBackup('1gbit'));
      const dataDir = join(dir, 'dq5');
      const dst = await serve(['--data-dir', dataDir, '--image-format', 'qcow2'], undefined, hosts.inDst, `${hosts.dst}:0`);
      const bk = await serve(['--role', 'backup', '--data-dir', join(dir, 'bk5'), ...backupCopies('bk5-img').flatMap((f) => ['--image', f])], undefined, hosts.inBak, '0.0.0.0:0');
      try {
        const before = hosts.bytes();
        const r = await migrate(['--strategy', 'snapmig', '--to', `${hosts.dst}:${dst.port}`, '--backup', `${hosts.bak}:${bk.port}`], hosts.inSrc);
        const after = hosts.bytes();
        assert.deepEqual(senders(r), ['0:backup', '1:backup', '2:backup', '3:source']);
        const active = r.activeLayerBytes;
        assert.ok(after.srcToDst - before.srcToDst <= 1.1 * active + (1 << 20), `source→destination link: ${after.srcToDst - before.srcToDst} bytes for ${active}`);
        assert.ok(after.bakToDst - before.bakToDst > after.srcToDst - before.srcToDst, 'the backup server\'s link carried more');
        checkQcow2Chain(dataDir);
      } finally {
        await bk.stop();
        await dst.stop();
      }
    } finally {
      hosts.drop();
    }
  });

  it('a destination killed mid-migration and started again: the migration resumes (what had arrived is kept) and the chain is written as qcow2', async () => {
    const dataDir = join(dir, 'dq3');
    const journal = join(dataDir, 'vm.L0.img.journal');
    const dst = await serve(['--data-dir', dataDir, '--image-format', 'qcow2']);
    const first = migrateCli(['--strategy', 'fullmig', '--to', `127.0.0.1:${dst.port}`, '--bwlimit', '1MiB']);
    // Killed once the base's journal records blocks that arrived (its first periodic save: it grows past its empty start).
    let empty: number | undefined;
    for (let i = 0; i < 1200; i++) {
      const size = existsSync(journal) ? statSync(journal).size : undefined;
      if (size !== undefined && empty !== undefined && size > empty) break;
      if (size !== undefined) empty ??= size;
      await new Promise((r) => setTimeout(r, 50));
    }
    dst.proc.kill('SIGKILL');
    const failed = await first;
    assert.notEqual(failed.code, 0, 'the first attempt fails with its destination gone');
    assert.ok(existsSync(join(dataDir, 'vm.L0.img.partial')), 'layer 0 was arriving');
    assert.ok(!existsSync(join(dataDir, 'vm.qcow2')));
    const dst2 = await serve(['--data-dir', dataDir, '--image-format', 'qcow2']);
    try {
      const r = await migrate(['--strategy', 'fullmig', '--to', `127.0.0.1:${dst2.port}`]);
      const bySend = r.sends.slice().sort((a, b) => a.layers[0]! - b.layers[0]!);
      assert.ok(bySend[0]!.resumedBlocks! > 0, 'layer 0 resumes from what had arrived');
      checkQcow2Chain(dataDir);
    } finally {
      await dst2.stop();
    }
  });
});
