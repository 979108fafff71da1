// Holding back what is already dirty (issue 18, src/migrate/hold.ts): where
// takes are cheap, blocks dirtied since their round began wait for the next
// round. Deterministic writers (a tracked image written as frames go out,
// peeks before every batch) prove the copy stays exact under every stall
// policy and that fewer blocks are sent twice; a real one (fio's nbd engine
// writing through qemu-storage-daemon, rounds from QEMU's dirty bitmaps)
// proves it against QEMU. No assertion depends on speed.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate, type MigrateOptions, type MigrationResult } from '../src/migrate/migrate.js';
import { TrackedImage } from '../src/image/tracked.js';
import { ErrorCode } from '../src/errors.js';
import { seededBytes } from './util.js';
import { fioThroughNbd, startStorageDaemon } from './qsd.js';

const BS = 4096;
const MiB = 1 << 20;
let dir: string;
let svc: DestinationService;
const auth = { insecure: true };
const children: ChildProcess[] = [];
const daemons: string[] = [];
const hasFio = spawnSync('fio', ['--version']).status === 0;
const hasQsd = spawnSync('qemu-storage-daemon', ['--version']).status === 0;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'l18-hold-'));
  svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth });
});
after(async () => {
  for (const c of children) c.kill('SIGKILL');
  for (const pidFile of daemons) {
    try { process.kill(Number(readFileSync(pidFile, 'utf8').trim()), 'SIGTERM'); } catch { /* gone */ }
  }
  await svc.close();
  rmSync(dir, { recursive: true, force: true });
});

/**
 * 64 MiB of seeded data through a tracked image. After every BLOCKS frame
 * sent, while live, the writer rewrites `perFrame` blocks of the hot set
 * [8192, 8192 + 512) in turn (the pass reaches it halfway, after about 32
 * frames: by then every hot block was rewritten at least once), until
 * `writing` says no more. Each write carries a counter, so no two versions of a
 * block are alike.
 */
async function heldRun(name: string, o: Partial<MigrateOptions> & { perFrame?: number; writing?: (frames: number) => boolean }): Promise<MigrationResult> {
  const p = join(dir, `${name}.img`);
  writeFileSync(p, seededBytes(18, 64 * MiB));
  const tracked = new TrackedImage(p);
  let live = true, frames = 0, k = 0;
  const rec = Buffer.alloc(BS);
  const perFrame = o.perFrame ?? 16;
  try {
    const r = await migrate(p, {
      to: `127.0.0.1:${svc.address.port}`, name, auth, strategy: 'full', overwrite: true, tracked, peekInterval: 0,
      onFrame: (f) => {
        if (!live || f.direction !== 'sent' || f.type !== 'BLOCKS' || !(o.writing?.(frames++) ?? true)) return;
        for (let i = 0; i < perFrame; i++, k++) { rec.writeUInt32LE(k, 0); rec.writeUInt32LE(frames, 4); tracked.write((8192 + (k % 512)) * BS, rec); }
      },
      pause: () => { live = false; },
      ...o,
    });
    assert.ok(readFileSync(join(dir, 'dst', `${name}.img`)).equals(readFileSync(p)), `${name}: the destination equals the image at the pause, byte for byte`);
    assert.equal(r.verified, true);
    return r;
  } finally {
    tracked.close();
    rmSync(p, { force: true });
    rmSync(join(dir, 'dst', `${name}.img`), { force: true });
  }
}

describe('holding back blocks dirtied since their round began', () => {
  it('sends fewer blocks twice than sending them anyway, and the copy is exact both ways', async () => {
    const without = await heldRun('hold-off', { holdDirty: false, maxDowntime: 0, maxRounds: 3 });
    const withHold = await heldRun('hold-on', { maxDowntime: 0, maxRounds: 3 });
    assert.equal(without.live.held, undefined, 'nothing held when turned off');
    assert.ok(withHold.live.held && withHold.live.held.blocks >= 256, `most of the hot set was held back from the pass (${JSON.stringify(withHold.live.held)})`);
    assert.ok(withHold.live.held.peeks > 0);
    assert.equal(withHold.rounds, without.rounds);
    assert.ok(withHold.blocks.resent < 0.5 * without.blocks.resent, `re-sent: held ${withHold.blocks.resent}, not held ${without.blocks.resent}`);
  });

  it('a rescan is no cheap take: nothing is held with --rescan', async () => {
    const p = join(dir, 'rescan.img');
    writeFileSync(p, seededBytes(19, 4 * MiB));
    const r = await migrate(p, { to: `127.0.0.1:${svc.address.port}`, name: 'rescan', auth, strategy: 'full', rescan: true, overwrite: true, peekInterval: 0 });
    assert.equal(r.live.held, undefined);
    assert.ok(readFileSync(join(dir, 'dst', 'rescan.img')).equals(readFileSync(p)));
  });

  it('force: the stall cuts over with what was held, exact', async () => {
    const events: string[] = [];
    const r = await heldRun('hold-force', { maxDowntime: 0, onStall: 'force', onEvent: (e) => events.push(e.phase) });
    assert.equal(r.live.cutoverReason, 'stall-force');
    assert.ok(events.includes('stall'));
    assert.ok((r.live.held?.blocks ?? 0) > 0);
  });

  it('postcopy: the stall switches, the held blocks follow after the switch, exact', async () => {
    const r = await heldRun('hold-switch', { maxDowntime: 0, onStall: 'postcopy' });
    assert.equal(r.live.cutoverReason, 'switch');
    assert.ok(r.postcopy && r.postcopy.missingAtSwitch > 0);
  });

  it('throttle: the writer stops when asked; the rounds then converge, exact', async () => {
    let calls = 0;
    const r = await heldRun('hold-throttle', {
      maxDowntime: 0, onStall: 'throttle', stallTimeout: 60_000,
      throttle: (t) => { if (!t.release) calls++; },
      writing: () => calls === 0, // the writer obeys the throttle: no writes after the first call
    });
    assert.ok(calls >= 1);
    assert.equal(r.live.cutoverReason, 'budget');
  });

  it('wait: the writer stops by itself; the rounds drain what was held, exact', async () => {
    const r = await heldRun('hold-wait', { maxDowntime: 0, onStall: 'wait', writing: (f) => f < 40 });
    assert.equal(r.live.cutoverReason, 'budget');
    assert.ok((r.live.held?.blocks ?? 0) > 0);
  });

  it('peekInterval must be a number ≥ 0', async () => {
    const p = join(dir, 'small.img');
    writeFileSync(p, seededBytes(21, MiB));
    await assert.rejects(migrate(p, { to: `127.0.0.1:${svc.address.port}`, auth, rescan: true, peekInterval: -5 }), { code: ErrorCode.INVALID_ARGUMENT });
  });
});

/** fio through the NBD export (qsd.ts), stopped with the other children at the end. */
function fioNbd(uri: string, offset: number, size: number, rate: string): ChildProcess {
  const c = fioThroughNbd(uri, offset, size, rate, 300);
  children.push(c);
  return c;
}

describe('a writer QEMU tracks: fio through qemu-storage-daemon, rounds from its dirty bitmaps', () => {
  it('holds back what fio dirtied and the destination equals the image at the pause, byte for byte', { skip: (!hasFio || !hasQsd) && 'fio or qemu-storage-daemon not installed' }, async () => {
    const image = join(dir, 'qsd.raw');
    writeFileSync(image, seededBytes(20, 24 * MiB));
    const { uri, qmp, pidFile } = startStorageDaemon(dir, image, 'q1');
    daemons.push(pidFile);
    const w = fioNbd(uri, 0, 4 * MiB, '2m');
    await new Promise((r) => setTimeout(r, 300));
    const r = await migrate(uri, {
      to: `127.0.0.1:${svc.address.port}`, name: 'qsd', auth, strategy: 'full', overwrite: true, qmp: { socket: qmp, node: 'disk0' },
      bwlimit: 8e6, maxDowntime: 2000, onStall: 'force', peekInterval: 100,
      // The pause ends fio. SIGSTOP would not do: stopped halfway through
      // sending a write, fio would keep that request in QEMU's NBD server
      // open, and the drain of the cutover's QMP transaction would wait for
      // it forever. Killed, its half-sent request fails; what it sent whole
      // is drained into the bitmap by that transaction.
      pause: () => { w.kill('SIGKILL'); },
    });
    w.kill('SIGKILL');
    assert.ok(r.live.held && r.live.held.peeks > 0, 'peeks were made');
    assert.ok(readFileSync(join(dir, 'dst', 'qsd.img')).equals(readFileSync(image)), 'the destination equals the image at the pause');
    assert.equal(r.verified, true);
  });
});
