// Live migration with a downtime budget (issue 18): real writer processes
// (fio, or a small node writer whose rate can be changed) write the image
// while it migrates with --rescan rounds; the writer is stopped (SIGSTOP) at
// the pause, so the destination must equal the image as it is afterwards,
// byte for byte, under every stall policy. No assertion depends on speed:
// budgets are generous where a test needs the cutover to be the budget's,
// and speed goes in bench/live.ts.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate, type MigrateOptions, type MigrationResult } from '../src/migrate/migrate.js';
import { ErrorCode } from '../src/errors.js';
import { applyDelta, encodeDelta } from '../src/protocol/delta.js';
import { BEGIN, BEGIN_OK, BLOCK_INFO, BLOCKS, BLOCKS_DELTA, COMMIT, DONE, INFO_END, NEED, SYNC, SYNC_OK, VERIFY, VERIFY_RESULT } from '../src/protocol/messages.js';
import { CAP_DELTA } from '../src/protocol/handshake.js';
import { Engine } from '../src/engine/engine.js';
import { TrackedImage } from '../src/image/tracked.js';
import { DeltaCache, DowntimeModel, StallDetector } from '../src/migrate/live.js';
import { seededBytes } from './util.js';
import { rawClient } from './raw-client.js';

const BS = 4096;
const MiB = 1 << 20;
const engine = new Engine();
let dir: string;
let svc: DestinationService;
const auth = { insecure: true };
const children: ChildProcess[] = [];
const hasFio = spawnSync('fio', ['--version']).status === 0;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'bf-live-'));
  svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth });
});
after(async () => {
  for (const c of children) c.kill('SIGKILL');
  await svc.close();
  rmSync(dir, { recursive: true, force: true });
});

function image(name: string, bytes: number, seed: number): string {
  const p = join(dir, `${name}.img`);
  writeFileSync(p, seededBytes(seed, bytes));
  return p;
}

interface WriterSpec {
  /** Hot blocks [start, start + count) rewritten at random, hotRate blocks a second. */
  hot?: [number, number];
  hotRate?: number;
  /** Cold blocks swept in order, coldRate blocks a second (each written once a sweep). */
  cold?: [number, number];
  coldRate?: number;
  /** `records`: 64-byte records rewritten inside the blocks; `blocks`: whole blocks of new random bytes. */
  mode?: 'records' | 'blocks';
}

/**
 * A writer in its own process: writes at the given rates, in 5 ms ticks;
 * an IPC message {hotRate, coldRate} changes the rates (the throttle hook).
 */
function startWriter(path: string, spec: WriterSpec): ChildProcess {
  const script = `
    const fs = require('node:fs'); const { randomFillSync } = require('node:crypto');
    const s = ${JSON.stringify(spec)}; const fd = fs.openSync(${JSON.stringify(path)}, 'r+');
    let hotRate = s.hotRate || 0, coldRate = s.coldRate || 0, hotDue = 0, coldDue = 0, sweep = 0, t = Date.now();
    const block = Buffer.alloc(${BS}), rec = Buffer.alloc(64);
    const write = (b) => {
      if (s.mode === 'records') { randomFillSync(rec); fs.writeSync(fd, rec, 0, 64, b * ${BS} + 64 * Math.floor(Math.random() * ${BS / 64})); }
      else { randomFillSync(block); fs.writeSync(fd, block, 0, ${BS}, b * ${BS}); }
    };
    process.on('message', (m) => { hotRate = m.hotRate; coldRate = m.coldRate; });
    setInterval(() => {
      const now = Date.now(), dt = (now - t) / 1000; t = now;
      hotDue += hotRate * dt; coldDue += coldRate * dt;
      for (; hotDue >= 1; hotDue--) write(s.hot[0] + Math.floor(Math.random() * s.hot[1]));
      for (; coldDue >= 1; coldDue--) { write(s.cold[0] + sweep); sweep = (sweep + 1) % s.cold[1]; }
    }, 5);`;
  const c = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  children.push(c);
  return c;
}

/** fio writing random 4 KiB blocks (new random bytes each) into [offset, offset + size) at rate (fio's units). */
function startFio(path: string, offset: number, size: number, rate: string): ChildProcess {
  const c = spawn('fio', [
    '--name=w', `--filename=${path}`, '--rw=randwrite', '--bs=4k', `--rate=${rate}`, `--offset=${offset}`, `--size=${size}`,
    '--time_based', '--runtime=300', '--ioengine=psync', '--refill_buffers', '--thread', '--output=/dev/null',
  ], { stdio: 'ignore' });
  children.push(c);
  return c;
}

const settle = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Migrates with the writer stopped at the pause; the destination must equal the image as it is after the pause. */
async function liveMigrate(path: string, name: string, writer: ChildProcess, o: Partial<MigrateOptions> = {}, events: { phase: string; detail?: unknown }[] = []): Promise<MigrationResult> {
  const r = await migrate(path, {
    to: `127.0.0.1:${svc.address.port}`, name, auth, strategy: 'full', rescan: true, overwrite: true,
    pause: () => { events.push({ phase: 'pause' }); writer.kill('SIGSTOP'); },
    onEvent: (e) => events.push(e),
    ...o,
  });
  writer.kill('SIGKILL');
  assert.ok(readFileSync(join(dir, 'dst', `${name}.img`)).equals(readFileSync(path)), 'the destination equals the image as paused, byte for byte');
  assert.equal(r.verified, true);
  return r;
}

describe('delta codec', () => {
  it('round-trips record rewrites and refuses what would not pay or is malformed', () => {
    const base = Buffer.from(seededBytes(1, BS));
    const now = Buffer.from(base);
    for (const at of [0, 640, 2048, 4032]) now.set(seededBytes(at + 7, 64), at);
    const out = Buffer.alloc(BS);
    const n = encodeDelta(base, now, out, BS - 84);
    assert.ok(n > 0 && n < 4 * 64 + 32, `code of ${n} bytes for 4 records`);
    const b = Buffer.from(base);
    applyDelta(b, out.subarray(0, n));
    assert.ok(b.equals(now));
    // Unchanged: a run covering the block.
    assert.ok(encodeDelta(base, base, out, BS) > 0);
    // Random: no delta.
    assert.equal(encodeDelta(base, Buffer.from(seededBytes(2, BS)), out, BS - 84), -1);
    // A code that runs past the block, or stops short of it.
    assert.throws(() => applyDelta(Buffer.from(base), Buffer.from([0x80, 0x40, 1, 7])), { code: ErrorCode.PROTOCOL });
    assert.throws(() => applyDelta(Buffer.from(base), Buffer.from([10, 1, 7])), { code: ErrorCode.PROTOCOL });
  });
});

describe('live migration with a downtime budget', () => {
  it('rejects throttle without a hook and a negative budget, before connecting', async () => {
    const p = image('args', MiB, 3);
    const to = `127.0.0.1:${svc.address.port}`;
    await assert.rejects(migrate(p, { to, auth, rescan: true, onStall: 'throttle' }), { code: ErrorCode.INVALID_ARGUMENT });
    await assert.rejects(migrate(p, { to, auth, rescan: true, maxDowntime: -1 }), { code: ErrorCode.INVALID_ARGUMENT });
  });

  it('wait: a writer slower than the link; cuts over on the prediction, reports predicted and measured downtime, exact', { skip: !hasFio && 'fio not installed' }, async () => {
    const p = image('slow', 24 * MiB, 4);
    const w = startFio(p, 0, 4 * MiB, '1m');
    await settle(300);
    const r = await liveMigrate(p, 'slow', w, { bwlimit: 16e6, maxDowntime: 2000, onStall: 'wait' });
    assert.equal(r.live.cutoverReason, 'budget');
    assert.ok(r.predictedDowntimeSeconds > 0 && r.downtimeSeconds > 0, 'both downtimes reported');
    assert.ok(r.live.drainRate > 0 && r.live.fixedSeconds > 0);
  });

  it('force: a writer faster than --bwlimit; the stall is reported within three rounds and the prediction comes before the pause', { skip: !hasFio && 'fio not installed' }, async () => {
    const p = image('fast', 12 * MiB, 5);
    const w = startFio(p, 0, 4 * MiB, '8m');
    await settle(300);
    const events: { phase: string; detail?: unknown }[] = [];
    const r = await liveMigrate(p, 'fast', w, { bwlimit: 3e6, maxDowntime: 100, onStall: 'force' }, events);
    const stall = events.find((e) => e.phase === 'stall')?.detail as { round: number; dirtyRate: number; drainRate: number } | undefined;
    assert.ok(stall, 'a stall event');
    assert.ok(stall.round <= 3, `reported after round ${stall.round}`);
    assert.ok(stall.dirtyRate > 0 && stall.drainRate > 0, 'with the rates');
    assert.equal(r.live.cutoverReason, 'stall-force');
    assert.equal(r.live.stall?.action, 'force');
    const cut = events.findIndex((e) => e.phase === 'cutover');
    assert.ok(cut >= 0 && cut < events.findIndex((e) => e.phase === 'pause'), 'the cutover event (with the prediction) comes before the pause');
    assert.ok((events[cut]!.detail as { predictedDowntime: number }).predictedDowntime > 0.1);
  });

  it('postcopy: a writer faster than --bwlimit; at the stall the destination takes over and the dirty blocks follow, exact', { skip: !hasFio && 'fio not installed' }, async () => {
    const p = image('switch', 12 * MiB, 6);
    const w = startFio(p, 0, 4 * MiB, '8m');
    await settle(300);
    const events: { phase: string; detail?: unknown }[] = [];
    const r = await liveMigrate(p, 'switch', w, { bwlimit: 3e6, maxDowntime: 100, onStall: 'postcopy' }, events);
    assert.equal(r.live.stall?.action, 'postcopy');
    assert.ok(r.live.stall.round <= 3, `reported after round ${r.live.stall.round}`);
    assert.equal(r.live.cutoverReason, 'switch', 'it switched instead of cutting over');
    assert.ok(r.postcopy && r.postcopy.missingAtSwitch > 0, 'the dirty blocks went after the switch');
    assert.ok(events.findIndex((e) => e.phase === 'stall') < events.findIndex((e) => e.phase === 'pause'));
  });

  it('wait: gives up with ERR_BF_NO_CONVERGENCE after --stall-timeout, nothing lost: the next attempt resumes', { skip: !hasFio && 'fio not installed' }, async () => {
    const p = image('never', 12 * MiB, 6);
    const w = startFio(p, 0, 4 * MiB, '8m');
    await settle(300);
    const to = `127.0.0.1:${svc.address.port}`;
    await assert.rejects(migrate(p, { to, name: 'never', auth, strategy: 'full', rescan: true, bwlimit: 3e6, maxDowntime: 50, onStall: 'wait', stallTimeout: 1000 }), { code: ErrorCode.NO_CONVERGENCE });
    w.kill('SIGSTOP');
    const r = await migrate(p, { to, name: 'never', auth, strategy: 'full', rescan: true });
    w.kill('SIGKILL');
    assert.ok(r.blocks.resumed > 1000, `resumed ${r.blocks.resumed} blocks`);
    assert.ok(readFileSync(join(dir, 'dst', 'never.img')).equals(readFileSync(p)));
  });

  it('throttle: the hook is called with the rate wanted, the writer slows, and is released at the end', async () => {
    const p = image('thr', 12 * MiB, 7);
    const w = startWriter(p, { hot: [0, 1024], hotRate: 2500, cold: [1024, 1024], coldRate: 0 });
    await settle(300);
    const calls: { wantedRate: number; release?: boolean }[] = [];
    const r = await liveMigrate(p, 'thr', w, {
      bwlimit: 4e6, maxDowntime: 400, onStall: 'throttle', stallTimeout: 60_000,
      // The writer obeys: a tenth of what is asked, in blocks a second.
      throttle: (t) => { calls.push(t); if (!t.release) w.send({ hotRate: t.wantedRate / BS / 10, coldRate: 0 }); },
    });
    assert.ok(calls.length >= 2, 'called, then released');
    assert.ok(calls[0]!.wantedRate > 0 && calls[0]!.wantedRate < 4e6, `wanted ${calls[0]!.wantedRate}`);
    assert.equal(calls.at(-1)!.release, true);
    assert.ok(r.live.throttle && r.live.throttle.calls >= 1);
    assert.ok(r.live.throttle.slowedBy > 0.3, `slowed by ${r.live.throttle.slowedBy}`);
    assert.equal(r.live.stall?.action, 'throttle');
  });

  it('hot last: the hot set is re-sent fewer times than in address order', async () => {
    // Deterministic, so in-process through a tracked image (exact write
    // counts), with writes paced by the frames sent instead of by the clock:
    // after every BLOCKS frame 32 of the 128 hot blocks at the start of the
    // image are rewritten in turn (each every 4 frames), and 256 cold blocks
    // once each, which keeps the rounds about 17 frames long. Sent first
    // (address order), the hot set is rewritten after it was read and goes
    // again every round; sent last, only what the round's last frame rewrites
    // goes in the next (the rest the round after).
    const run = async (order: 'hot-last' | 'address') => {
      const p = image(`order-${order}`, 128 * MiB, 8);
      const tracked = new TrackedImage(p);
      let live = true, rounds = false, hot = 0, cold = 128;
      const rec = Buffer.alloc(BS);
      const writeCold = (n: number) => { for (let i = 0; i < n; i++) { rec.writeUInt32LE(cold, 8); tracked.write(cold++ * BS, rec); } };
      try {
        return await migrate(p, {
          to: `127.0.0.1:${svc.address.port}`, name: `order-${order}`, auth, strategy: 'full', overwrite: true, tracked,
          maxDowntime: 0, maxRounds: 5, order,
          // Writes are paced by the frames sent: a compressor on its thread reads up to two
          // frames ahead of what onFrame reports, which would shift the pacing this test relies on.
          compress: { mode: 'zstd', level: 3, offThread: false },
          // The hot set is written from the start, the cold sweep from the first round on.
          onEvent: (e) => { if (e.phase === 'round' && !rounds) { rounds = true; writeCold(16 * 256); } },
          onFrame: (f) => {
            if (!live || f.direction !== 'sent' || f.type !== 'BLOCKS') return;
            for (let i = 0; i < 32; i++) { rec.writeUInt32LE(hot, 0); tracked.write((hot++ % 128) * BS, rec); }
            if (rounds) writeCold(256);
          },
          pause: () => { live = false; },
        });
      } finally {
        tracked.close();
        assert.ok(readFileSync(join(dir, 'dst', `order-${order}.img`)).equals(readFileSync(p)));
        rmSync(p);
      }
    };
    const addr = await run('address');
    const hot = await run('hot-last');
    assert.equal(hot.live.cutoverReason, 'max-rounds');
    assert.equal(hot.live.order, 'hot-last');
    assert.equal(hot.rounds, addr.rounds);
    assert.ok(hot.live.hotBlocksResent < 0.8 * addr.live.hotBlocksResent, `hot blocks re-sent: hot-last ${hot.live.hotBlocksResent}, address ${addr.live.hotBlocksResent} (all re-sent: ${hot.blocks.resent}, ${addr.blocks.resent})`);
  });

  it('delta: record rewrites go as deltas, decoded exactly, re-sent bytes at least 3x smaller; random rewrites never do', async () => {
    const p = image('rec', 8 * MiB, 9);
    const w = startWriter(p, { hot: [0, 512], hotRate: 1500, mode: 'records' });
    await settle(200);
    const r = await liveMigrate(p, 'rec', w, { bwlimit: 8e6, maxDowntime: 0, maxRounds: 4, compress: { mode: 'none' } });
    assert.ok(r.delta.enabled && r.delta.blocks > 100, `${r.delta.blocks} deltas`);
    assert.ok(r.delta.rawBytes >= 3 * r.delta.wireBytes, `${r.delta.rawBytes} bytes as ${r.delta.wireBytes}`);
    assert.equal(r.delta.savedBytes, r.delta.rawBytes - r.delta.wireBytes);
    assert.equal(r.blocks.repaired, 0, 'no delta was refused');

    const q = image('rnd', 8 * MiB, 10);
    const v = startWriter(q, { hot: [0, 512], hotRate: 1500, mode: 'blocks' });
    await settle(200);
    const s = await liveMigrate(q, 'rnd', v, { bwlimit: 8e6, maxDowntime: 0, maxRounds: 3, compress: { mode: 'none' } });
    assert.ok(s.blocks.resent > 100);
    assert.equal(s.delta.blocks, 0, 'random rewrites: no deltas (they would not be smaller)');
  });
});

describe('blockferry migrate, live', () => {
  it('prints the stall on the terminal, runs --throttle-cmd with the rate wanted (then "max"), and exits with ERR_BF_NO_CONVERGENCE', { skip: !hasFio && 'fio not installed' }, async () => {
    const p = image('cli', 12 * MiB, 15);
    const log = join(dir, 'throttle.log');
    const w = startFio(p, 0, 4 * MiB, '8m');
    await settle(300);
    const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
    const r = await new Promise<{ code: number | null; err: string }>((res) => {
      const c = spawn(process.execPath, [bin, 'migrate', p, '--to', `127.0.0.1:${svc.address.port}`, '--insecure', '--name', 'cli', '--strategy', 'full', '--rescan',
        '--bwlimit', '3M', '--max-downtime', '50ms', '--on-stall', 'throttle', '--stall-timeout', '2s', '--progress', 'none',
        '--throttle-cmd', `echo "$BLOCKFERRY_THROTTLE_RATE $BLOCKFERRY_THROTTLE_STEP" >> ${log}`], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      c.stderr!.on('data', (d) => { err += d; });
      c.once('exit', (code) => res({ code, err }));
    });
    w.kill('SIGKILL');
    assert.equal(r.code, 1, r.err);
    assert.match(r.err, /stall after round \d: the writer dirties [\d.]+ MB\/s, rounds drain [\d.]+ MB\/s/);
    assert.match(r.err, /throttle step 1/);
    assert.match(r.err, /ERR_BF_NO_CONVERGENCE/);
    const lines = readFileSync(log, 'utf8').trim().split('\n');
    assert.match(lines[0]!, /^\d+ 1$/, 'the rate wanted, in bytes/s, and the step');
    assert.match(lines.at(-1)!, /^max /, 'released at the end');
  });
});

describe('BLOCKS_DELTA at the destination', () => {
  const sha1 = (b: Uint8Array) => createHash('sha1').update(b).digest();

  it('applies a delta against what it holds; refuses one made against another base (fingerprint), leaving the block for the check', async () => {
    const v1 = Buffer.from(seededBytes(11, 2 * BS));
    const v2 = Buffer.from(v1);
    v2.set(seededBytes(12, 64), 128); // block 0: one record rewritten
    v2.set(seededBytes(13, 64), BS + 512); // block 1 too
    const ch = await rawClient(svc.address.port, auth);
    await ch.send(BEGIN, { name: 'delta', size: 2 * BS, blockSize: BS, flags: 1, fills: 0, strategy: 'test' });
    await ch.recv(BEGIN_OK);
    await ch.send(BLOCK_INFO, { start: 0, count: 2, ...engine.fingerprints(v1, BS) });
    await ch.recv(NEED);
    await ch.send(INFO_END, undefined);
    await ch.recv(NEED);
    await ch.send(BLOCKS, { runs: [{ start: 0, count: 2 }], fingerprints: engine.fingerprints(v1, BS).fingerprints, data: v1 });
    const fp2 = engine.fingerprints(v2, BS).fingerprints;
    // Block 0 against the right base (v1); block 1 against a wrong one.
    const out = Buffer.alloc(2 * BS);
    const n0 = encodeDelta(v1.subarray(0, BS), v2.subarray(0, BS), out, BS);
    const wrongBase = Buffer.from(seededBytes(14, BS));
    const n1 = encodeDelta(wrongBase, v2.subarray(BS), out.subarray(n0), 2 * BS);
    assert.ok(n0 > 0 && n1 > 0);
    await ch.send(BLOCKS_DELTA, { entries: [{ block: 0, fingerprint: fp2[0]!, length: n0 }, { block: 1, fingerprint: fp2[1]!, length: n1 }], codes: out.subarray(0, n0 + n1) });
    await ch.request(SYNC, undefined, SYNC_OK);
    const bad = await ch.request(VERIFY, [{ start: 0, count: 1, digest: sha1(v2.subarray(0, BS)) }, { start: 1, count: 1, digest: sha1(v2.subarray(BS)) }], VERIFY_RESULT);
    assert.deepEqual(bad, [1], 'block 0 holds the new version; block 1 was not written');
    await assert.rejects(ch.request(COMMIT, undefined, DONE), /unchecked|incomplete/);
    ch.close();
  });

  it('is announced as a capability', () => {
    assert.equal(CAP_DELTA, 8);
  });

  it('refuses BLOCKS_DELTA before INFO_END and a malformed code (ERR_BF_PROTOCOL)', async () => {
    for (const early of [true, false]) {
      const ch = await rawClient(svc.address.port, auth);
      await ch.send(BEGIN, { name: `bad-delta-${early}`, size: BS, blockSize: BS, flags: 1, fills: 0, strategy: 'test' });
      await ch.recv(BEGIN_OK);
      const v = Buffer.from(seededBytes(16, BS));
      await ch.send(BLOCK_INFO, { start: 0, count: 1, ...engine.fingerprints(v, BS) });
      await ch.recv(NEED);
      if (!early) {
        await ch.send(INFO_END, undefined);
        await ch.recv(NEED);
        await ch.send(BLOCKS, { runs: [{ start: 0, count: 1 }], fingerprints: engine.fingerprints(v, BS).fingerprints, data: v });
      }
      // A code whose run goes past the block.
      const code = Buffer.from([0x80, 0x40, 1, 7]);
      await ch.send(BLOCKS_DELTA, { entries: [{ block: 0, fingerprint: 1n, length: code.length }], codes: code });
      await assert.rejects(ch.request(SYNC, undefined, SYNC_OK), (e: Error & { remoteCode?: string }) => e.remoteCode === ErrorCode.PROTOCOL);
      ch.close();
    }
  });
});

describe('the delta cache and the downtime model', () => {
  it('keeps the cache within its byte budget, least recently sent evicted first', () => {
    const c = new DeltaCache(4 * BS, BS);
    for (let b = 0; b < 6; b++) c.put(b, BigInt(b), 0n, Buffer.alloc(BS, b));
    assert.equal(c.size, 4);
    assert.equal(c.get(0), undefined);
    assert.equal(c.get(1), undefined);
    c.put(2, 22n, 0n, Buffer.alloc(BS, 22)); // 2 is now the most recent
    c.put(6, 6n, 0n, Buffer.alloc(BS, 6)); // evicts 3
    assert.equal(c.get(3), undefined);
    assert.equal(c.get(2)!.fp, 22n);
    assert.equal(c.get(2)!.bytes[0], 22);
    assert.equal(c.get(6)!.bytes[BS - 1], 6);
  });

  it('predicts from measured rates and reports a writer that outruns the rounds', () => {
    const m = new DowntimeModel(0.3);
    m.startAt(0);
    m.addRtt(0.01);
    m.addTake(8e6, 0.05, 1000); // 8 MB dirty in the first second
    m.addRound(10e6, 1.01); // 10 MB in a second (after the round trip)
    assert.ok(Math.abs(m.drain.value - 10e6) < 1);
    assert.ok(Math.abs(m.dirty.value - 8e6) < 1);
    // 1 MB dirty: 0.1 s to send (longer than the 0.05 s take), 2 round trips, 1 MB checked at the default 200 MB/s.
    assert.ok(Math.abs(m.predict(1e6) - (0.1 + 0.02 + 0.005)) < 1e-9);
    const d = new StallDetector();
    assert.equal(d.check(m, m.predict(1e6)), undefined, 'fits');
    m.addTake(12e6, 0.05, 2000); // the writer now dirties more than the rounds drain
    assert.equal(d.check(m, m.predict(12e6)), 'dirty-rate');
  });
});
