// SnapMig end to end on loopback (paper 000): a source, a backup server and
// a destination, real TCP (TLS with a PSK), real chains made by qemu-img and
// qemu-io over real ext4 data. Every layer the destination holds is checked
// byte for byte against qemu's reading of the same layer of the source's
// chain; the chain rebuilt from it as qcow2 passes `qemu-img check`, `info
// --backing-chain` and `compare`; which sender sent what is asserted.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { DestinationService } from '../src/roles/destination/service.js';
import { BackupService } from '../src/roles/backup/service.js';
import { migrateChain, type ChainMigrationResult } from '../src/snapmig/migrate-chain.js';
import { stackMap } from '../src/snapmig/identity.js';
import { Scanner } from '../src/scan/scanner.js';

import { spawn } from 'node:child_process';
import { backupCopies as sharedBackupCopies, destinationState, haveTools, io, makeChain, qemuRaw, run } from './snapmig-fixtures.js';

const auth = { key: randomBytes(32) };
let dir: string;
let files: string[];
let scanner: Scanner;
const skip = haveTools ? false : 'mkfs.ext4, debugfs, qemu-img or qemu-io missing (.ci/run installs them)';

before(() => {
  if (!haveTools) return;
  dir = mkdtempSync(join(tmpdir(), 'bfF-snapmig-'));
  files = makeChain(dir, 'src-');
  scanner = new Scanner({ workers: 1 });
});
after(async () => { await scanner?.close(); if (dir) rmSync(dir, { recursive: true, force: true }); });

/** The backup server's copies of base, s1, s2 under other names, re-pointed at each other (what a backup system keeps). */
/** The backup system's copies of this suite's chain (snapmig-fixtures.ts). */
function backupCopies(sub: string, n = 3): string[] {
  return sharedBackupCopies(files, dir, sub, n);
}

async function destination(sub: string): Promise<DestinationService> {
  return DestinationService.start({ dataDir: join(dir, sub), auth });
}


/** The destination's chain rebuilt as qcow2 overlays with qemu's own tools: base converted, each layer's covered ranges written into an overlay. */
function rebuildQcow2(dataDir: string, name: string): string[] {
  const m = JSON.parse(readFileSync(join(dataDir, `${name}.chain.json`), 'utf8')) as { size: number; layers: { file: string; covered: { offset: number; length: number }[] }[] };
  const out: string[] = [];
  for (const [i, l] of m.layers.entries()) {
    const q = join(dataDir, `${name}.check${i}.qcow2`);
    if (i === 0) run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', join(dataDir, l.file), q]);
    else {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', out[i - 1]!, '-F', 'qcow2', q, String(m.size)]);
      const raw = readFileSync(join(dataDir, l.file));
      const cmds: string[] = [];
      for (const [k, c] of l.covered.entries()) {
        const piece = raw.subarray(c.offset, c.offset + c.length);
        if (piece.every((x) => x === 0)) { cmds.push(`write -z ${c.offset} ${c.length}`); continue; }
        const pf = join(dataDir, `piece${i}-${k}`);
        writeFileSync(pf, piece);
        cmds.push(`write -s ${pf} ${c.offset} ${c.length}`);
      }
      for (let k = 0; k < cmds.length; k += 50) io(q, ...cmds.slice(k, k + 50));
    }
    out.push(q);
  }
  return out;
}

function checkChainAtDestination(dataDir: string, name: string, chain = files): void {
  const files = chain;
  for (let k = 0; k < files.length; k++) assert.ok(destinationState(dataDir, name, k).equals(qemuRaw(files[k]!)), `layer ${k} as the destination holds it reads as the source's`);
  const rebuilt = rebuildQcow2(dataDir, name);
  run('qemu-img', ['check', '-q', rebuilt[rebuilt.length - 1]!]);
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', '--backing-chain', rebuilt[rebuilt.length - 1]!])) as unknown[];
  assert.equal(info.length, files.length);
  for (let k = 0; k < files.length; k++) run('qemu-img', ['compare', '-q', rebuilt[k]!, files[k]!]);
}

const senders = (r: ChainMigrationResult) => r.sends.slice().sort((a, b) => a.layers[0]! - b.layers[0]!).map((s) => `${s.layers.join('+')}:${s.sender === 'source' ? 'source' : 'backup'}${s.skipped ? ':held' : ''}`);

describe('SnapMig on loopback', { skip }, () => {
  it('SnapMig: the backup server sends base and snapshots, the source only its active layer; every layer arrives as qemu reads it', async () => {
    const dst = await destination('d1');
    const bk = await BackupService.start({ dataDir: join(dir, 'bk1'), images: backupCopies('bk1-img'), auth });
    try {
      const r = await migrateChain(files[3]!, { to: `127.0.0.1:${dst.address.port}`, backups: [`127.0.0.1:${bk.address.port}`], strategy: 'snapmig', auth, scanner, name: 'vm' });
      assert.deepEqual(senders(r), ['0:backup', '1:backup', '2:backup', '3:source']);
      assert.equal(r.activeLayerBytes, stackMap(files[3]!, 1).dataBytes);
      // The source sent its active layer's changes and little else (fingerprints, checks, frames).
      assert.ok(r.bytesBySender.source! <= 1.05 * r.activeLayerBytes, `source sent ${r.bytesBySender.source} for ${r.activeLayerBytes} bytes of changes`);
      assert.ok(r.bytesBySender.source! >= r.activeLayerBytes * 0.5);
      assert.equal(bk.stats.sent, 3);
      checkChainAtDestination(join(dir, 'd1'), 'vm');
      // Run again: the progress log says what is held; only the active layer is sent again.
      const again = await migrateChain(files[3]!, { to: `127.0.0.1:${dst.address.port}`, backups: [`127.0.0.1:${bk.address.port}`], strategy: 'snapmig', auth, scanner, name: 'vm' });
      assert.deepEqual(senders(again), ['0:backup:held', '1:backup:held', '2:backup:held', '3:source']);
      assert.equal(bk.stats.sent, 3);
      checkChainAtDestination(join(dir, 'd1'), 'vm');
    } finally {
      await bk.close();
      await dst.close();
    }
  });

  it('FullMig: the source sends every layer; the same chain arrives', async () => {
    const dst = await destination('d2');
    try {
      const r = await migrateChain(files[3]!, { to: `127.0.0.1:${dst.address.port}`, strategy: 'fullmig', auth, scanner, name: 'vm' });
      assert.deepEqual(senders(r), ['0:source', '1:source', '2:source', '3:source']);
      const all = files.reduce((n, f) => n + stackMap(f, 1).dataBytes, 0);
      // Every layer crossed from the source (block data compressed where it pays: patterns shrink).
      assert.ok(r.bytesBySender.source! > 0.3 * all, `source sent ${r.bytesBySender.source} of ${all}`);
      checkChainAtDestination(join(dir, 'd2'), 'vm');
    } finally {
      await dst.close();
    }
  });

  it('SelectiveMig: the source sends the latest state only, as one image', async () => {
    const dst = await destination('d3');
    try {
      const r = await migrateChain(files[3]!, { to: `127.0.0.1:${dst.address.port}`, strategy: 'selectivemig', auth, scanner, name: 'vm' });
      assert.deepEqual(senders(r), ['0+1+2+3:source']);
      run('qemu-img', ['compare', '-q', '-f', 'raw', join(dir, 'd3', 'vm.img'), files[3]!]);
      assert.equal(existsSync(join(dir, 'd3', 'vm.chain.json')), false);
    } finally {
      await dst.close();
    }
  });

  it('SnapMig --flatten consolidates the backup server\'s base and snapshots into one send and writes the merged image', async () => {
    const dst = await destination('d4');
    const bk = await BackupService.start({ dataDir: join(dir, 'bk4'), images: backupCopies('bk4-img'), auth });
    try {
      const r = await migrateChain(files[3]!, { to: `127.0.0.1:${dst.address.port}`, backups: [`127.0.0.1:${bk.address.port}`], strategy: 'snapmig', flatten: true, auth, scanner, name: 'vm' });
      assert.deepEqual(senders(r), ['0+1+2:backup', '3:source']);
      assert.equal(r.sends.find((s) => s.layers.length === 3)!.reason, 'consolidated');
      run('qemu-img', ['compare', '-q', '-f', 'raw', join(dir, 'd4', 'vm.img'), files[3]!]);
    } finally {
      await bk.close();
      await dst.close();
    }
  });

  it('a layer a backup server sends with other content is refused by its identity and sent again by the source', async () => {
    const dst = await destination('d5');
    const copies = backupCopies('bk5-img');
    const bk = await BackupService.start({ dataDir: join(dir, 'bk5'), images: copies, auth });
    try {
      // After indexing, snapshot 1's copy changes under the server: it still claims the old identity.
      io(copies[1]!, 'write -P 0xee 8M 64k');
      const r = await migrateChain(files[3]!, { to: `127.0.0.1:${dst.address.port}`, backups: [`127.0.0.1:${bk.address.port}`], strategy: 'snapmig', auth, scanner, name: 'vm' });
      const redo = r.sends.filter((s) => s.fallbackFrom);
      assert.deepEqual(redo.map((s) => [s.layers, s.sender, s.fallbackReason]), [[[1], 'source', 'content did not match the layer identity']]);
      checkChainAtDestination(join(dir, 'd5'), 'vm');
    } finally {
      await bk.close();
      await dst.close();
    }
  });

  it('a backup server that goes away mid-send costs the source its layers, resumed from what arrived', async () => {
    // The backup server goes away once the destination has written 256 blocks of the base it sends
    // (not after a fixed delay: on a loaded machine that came before anything had arrived).
    let closing: Promise<void> | undefined;
    let baseBlocks = 0;
    let bk: BackupService | undefined;
    const dst = await DestinationService.start({
      dataDir: join(dir, 'd6'), auth,
      onBlocks: (image, _start, count) => {
        if (!image.startsWith('vm.L0')) return;
        baseBlocks += count;
        if (baseBlocks >= 256 && !closing) closing = bk!.close();
      },
    });
    bk = await BackupService.start({ dataDir: join(dir, 'bk6'), images: backupCopies('bk6-img'), auth, bwlimit: 4 << 20 });
    try {
      const r = await migrateChain(files[3]!, {
        to: `127.0.0.1:${dst.address.port}`, backups: [`127.0.0.1:${bk.address.port}`], strategy: 'snapmig', auth, scanner, name: 'vm',
      });
      assert.ok(closing, 'the backup server was closed mid-send');
      await closing;
      assert.deepEqual(r.backupsLost, [`127.0.0.1:${bk.address.port}`]);
      const fromBackup = r.sends.filter((s) => s.sender !== 'source');
      const fellBack = r.sends.filter((s) => s.fallbackFrom);
      assert.ok(fellBack.length >= 1, 'the source sent what the backup server did not');
      assert.equal(fromBackup.length + fellBack.length, 3);
      assert.ok(fellBack[0]!.resumedBlocks! > 0, 'the first layer the source took over was resumed from what the backup server had sent');
      checkChainAtDestination(join(dir, 'd6'), 'vm');
    } finally {
      await bk.close().catch(() => {});
      await dst.close();
    }
  });

  it('live: qemu-io keeps writing the active layer during the migration; rescan rounds, pause at the cutover, the chain arrives as it was at the pause', async () => {
    const live = makeChain(dir, 'live-');
    const dst = await destination('d7');
    const copies = join(dir, 'bk7-img');
    mkdirSync(copies, { recursive: true });
    const held = live.slice(0, 3).map((f, i) => { const c = join(copies, `n${i}.qcow2`); copyFileSync(f, c); return c; });
    for (let i = 1; i < 3; i++) run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', held[i - 1]!, '-F', 'qcow2', held[i]!]);
    const bk = await BackupService.start({ dataDir: join(dir, 'bk7'), images: held, auth });
    const stop = join(dir, 'live-STOP'), stopped = join(dir, 'live-STOPPED'), count = join(dir, 'live-COUNT');
    // A writer in its own process: 64 KiB writes of changing patterns all over the active layer until told to stop.
    const writer = spawn('sh', ['-c', `i=0; while [ ! -e ${stop} ]; do qemu-io -c "write -P $((i % 200 + 1)) $(( (i * 7919 % 700) * 65536 )) 64k" ${live[3]} >/dev/null || exit 1; i=$((i+1)); echo $i > ${count}; done; touch ${stopped}`], { stdio: 'ignore' });
    try {
      let writesAtPause = 0;
      const r = await migrateChain(live[3]!, {
        to: `127.0.0.1:${dst.address.port}`, backups: [`127.0.0.1:${bk.address.port}`], strategy: 'snapmig', auth, scanner, name: 'vm',
        live: {
          rescan: true, maxDowntime: 2000, maxRounds: 4,
          pause: async () => {
            writeFileSync(stop, '');
            while (!existsSync(stopped)) await new Promise((res) => setTimeout(res, 20));
            writesAtPause = Number(readFileSync(count, 'utf8'));
          },
        },
      });
      assert.ok(writesAtPause > 0, 'the writer wrote during the migration');
      const act = r.sends.find((s) => s.reason === 'active')!;
      assert.equal(act.sender, 'source');
      assert.ok(act.rounds! >= 1, 'the active layer went through rescan rounds');
      assert.ok(r.downtimeSeconds > 0);
      checkChainAtDestination(join(dir, 'd7'), 'vm', live);
    } finally {
      writeFileSync(stop, '');
      if (writer.exitCode === null) await new Promise((res) => writer.once('exit', res));
      await bk.close();
      await dst.close();
    }
  });
});
