// SnapMig between real hosts: the source, a backup server and the
// destination are separate blockferry processes in three Linux network
// namespaces (bench/snapmig-hosts.ts), the source's uplink shaped to
// 100 Mbit/s and the backup server's to 1 Gbit/s. The bytes on every link
// are read from the veth counters. Then a backup server killed mid-send:
// its layers come from the source. Without root the test is skipped.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { snapHosts, type SnapHosts } from '../bench/snapmig-hosts.js';
import { backupCopies as sharedBackupCopies, destinationState, haveTools, makeChain, qemuRaw, spawnServe, type ServeProcess } from './snapmig-fixtures.js';
import { stackMap } from '../src/snapmig/identity.js';
import type { ChainMigrationResult } from '../src/snapmig/migrate-chain.js';

const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
let hosts: SnapHosts | undefined;
let dir: string;
let keyFile: string;
let files: string[];

before(() => {
  if (!haveTools) return;
  hosts = snapHosts('bfF', 217);
  dir = mkdtempSync(join(tmpdir(), 'bfF-netns-'));
  keyFile = join(dir, 'key');
  writeFileSync(keyFile, 'snapmig-netns-key-0123456789abcdef\n');
  files = makeChain(dir, 'src-', 6);
});
after(() => { hosts?.drop(); if (dir) rmSync(dir, { recursive: true, force: true }); });

type Server = ServeProcess;

async function serveIn(prefix: string[], args: string[], onLine?: (l: string) => void): Promise<Server> {
  return spawnServe([...prefix, process.execPath, bin, 'serve', ...args, '--key-file', keyFile], onLine);
}

async function migrateIn(prefix: string[], args: string[]): Promise<ChainMigrationResult> {
  const p = spawn(prefix[0]!, [...prefix.slice(1), process.execPath, bin, 'migrate', ...args, '--key-file', keyFile, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  p.stdout!.on('data', (d) => { out += d; });
  p.stderr!.on('data', (d) => { err += d; });
  const code = await new Promise<number | null>((r) => p.once('exit', (c) => r(c)));
  assert.equal(code, 0, `migrate failed: ${err}`);
  return JSON.parse(out) as ChainMigrationResult;
}

/** The backup system's copies of this suite's chain (snapmig-fixtures.ts). */
function backupCopies(sub: string): string[] {
  return sharedBackupCopies(files, dir, sub);
}

function checkChain(dataDir: string, name: string): void {
  for (let k = 0; k < files.length; k++) assert.ok(destinationState(dataDir, name, k).equals(qemuRaw(files[k]!)), `layer ${k} at the destination reads as the source's`);
}

describe('SnapMig across three network namespaces', { skip: !haveTools ? 'qemu-img, qemu-io, mkfs.ext4 or debugfs missing' : false }, () => {
  it('the backup server sends base and snapshots over its own link, the source only its active layer over its 100 Mbit/s uplink', { skip: false }, async (t) => {
    if (!hosts) return t.skip('cannot create network namespaces here (not root, or no iproute2)');
    assert.ok(hosts.shapeSource('100mbit') && hosts.shapeBackup('1gbit'));
    const dst = await serveIn(hosts.inDst, ['--listen', `${hosts.dst}:0`, '--data-dir', join(dir, 'dst1')]);
    const bk = await serveIn(hosts.inBak, ['--role', 'backup', '--listen', '0.0.0.0:0', '--data-dir', join(dir, 'bk1'), ...backupCopies('bk1-img').flatMap((f) => ['--image', f])]);
    try {
      const before = hosts.bytes();
      const r = await migrateIn(hosts.inSrc, [files[3]!, '--strategy', 'snapmig', '--to', `${hosts.dst}:${dst.port}`, '--backup', `${hosts.bak}:${bk.port}`, '--name', 'vm']);
      const after = hosts.bytes();
      assert.deepEqual(r.sends.map((s) => s.sender === 'source' ? 'source' : 'backup').sort(), ['backup', 'backup', 'backup', 'source']);
      const older = files.slice(0, 3).reduce((n, f) => n + stackMap(f, 1).dataBytes, 0);
      const active = stackMap(files[3]!, 1).dataBytes;
      assert.ok(r.bytesBySender.source! <= 1.05 * active, `the source sent ${r.bytesBySender.source} bytes for ${active} bytes of changes`);
      // On the wire, headers included: the source's link carried its active layer and the control traffic, the backup server's the rest.
      const srcLink = after.srcToDst - before.srcToDst, bakLink = after.bakToDst - before.bakToDst;
      assert.ok(srcLink <= 1.1 * active + (1 << 20), `source→destination link: ${srcLink} bytes for ${active}`);
      // What the backup server sent (compressed as its link allows) crossed its own link, and it was base and snapshots.
      const backupWire = Object.entries(r.bytesBySender).filter(([k]) => k !== 'source').reduce((n, [, v]) => n + v, 0);
      const backupData = r.sends.filter((s) => s.sender !== 'source').reduce((n, s) => n + s.dataBytes, 0);
      assert.ok(backupData >= 0.9 * older, `the backup server sent ${backupData} bytes of data for ${older} bytes of base and snapshots`);
      assert.ok(backupWire > 0 && bakLink >= 0.9 * backupWire, `backup→destination link: ${bakLink} bytes for the ${backupWire} bytes the backup server sent`);
      assert.ok(after.srcToBak - before.srcToBak < 64 << 10, 'the coordinator\'s requests to the backup server are small');
      checkChain(join(dir, 'dst1'), 'vm');
    } finally {
      await bk.stop();
      await dst.stop();
    }
  });

  it('a backup server killed mid-send: its layers come from the source, resumed from what had arrived', async (t) => {
    if (!hosts) return t.skip('cannot create network namespaces here (not root, or no iproute2)');
    // A slow backup link, so that the kill lands inside a send.
    assert.ok(hosts.shapeSource('100mbit') && hosts.shapeBackup('20mbit'));
    const dst = await serveIn(hosts.inDst, ['--listen', `${hosts.dst}:0`, '--data-dir', join(dir, 'dst2')]);
    let killed = false;
    const bk: Server = await serveIn(hosts.inBak, ['--role', 'backup', '--listen', '0.0.0.0:0', '--data-dir', join(dir, 'bk2'), ...backupCopies('bk2-img').flatMap((f) => ['--image', f])], (l) => {
      if (!killed && l.includes('sending layer')) { killed = true; setTimeout(() => bk.proc.kill('SIGKILL'), 800); }
    });
    try {
      const r = await migrateIn(hosts.inSrc, [files[3]!, '--strategy', 'snapmig', '--to', `${hosts.dst}:${dst.port}`, '--backup', `${hosts.bak}:${bk.port}`, '--name', 'vm']);
      assert.ok(killed);
      assert.deepEqual(r.backupsLost, [`${hosts.bak}:${bk.port}`]);
      const fellBack = r.sends.filter((s) => s.fallbackFrom);
      assert.ok(fellBack.length >= 1);
      assert.ok(fellBack.every((s) => s.sender === 'source'));
      assert.ok(fellBack[0]!.resumedBlocks! > 0, 'the destination kept what the backup server had sent of its first layer');
      checkChain(join(dir, 'dst2'), 'vm');
    } finally {
      await bk.stop();
      await dst.stop();
    }
  });
});
