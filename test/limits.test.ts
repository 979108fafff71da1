// The service's limits before and after authentication, each reached while
// an honest client is served: the handshake deadline, the caps on
// unauthenticated connections (per address, in total), the frame limit
// before authentication (the old 60 × 16 MiB HELLO finding), and the memory
// an authenticated client that floods BLOCKS without reading can make it use.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { ErrorCode } from '../src/index.js';
import { seededBytes } from './util.js';
import { blocksFlood, closedWithin, helloFlood, idle, rss } from './stress/attacks.js';

const key = Buffer.from('blockferry-limits-test-key-0123456789');
const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
let dir: string;
let image: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bf-limits-'));
  image = join(dir, 'src.img');
  writeFileSync(image, seededBytes(3, 256 * 4096));
});
after(() => rmSync(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 }));

let n = 0;
const start = (o: Partial<Parameters<typeof DestinationService.start>[0]>) => DestinationService.start({ dataDir: join(dir, `dst${n++}`), auth: { key }, ...o });
const honest = (port: number, name: string, extra = {}) => migrate(image, { to: `127.0.0.1:${port}`, name, auth: { key }, ...extra });

describe('limits before authentication', () => {
  it('closes connections that do not authenticate within handshakeTimeout, while serving an honest client', async () => {
    const svc = await start({ handshakeTimeout: 400 });
    try {
      const idlers = await Promise.all([1, 2, 3].map(() => idle(svc.address.port, '127.0.0.2')));
      const closed = Promise.all(idlers.map(closedWithin));
      await honest(svc.address.port, 'a');
      await closed;
      assert.equal(svc.limited.deadline, 3, 'closed by the handshake deadline');
      assert.deepEqual(readFileSync(join(svc.options.dataDir, 'a.img')), readFileSync(image));
    } finally {
      await svc.close();
    }
  });

  it('caps unauthenticated connections per address: the ones beyond are closed at once; another address is served', async () => {
    const svc = await start({ maxUnauthenticatedPerAddress: 4, handshakeTimeout: 20_000 });
    try {
      const conns = [];
      for (let i = 0; i < 6; i++) conns.push(await idle(svc.address.port, '127.0.0.2'));
      await Promise.all(conns.slice(4).map(closedWithin));
      // Closed by the cap, not by the (20 s) handshake deadline.
      assert.equal(svc.limited.overCap, 2);
      assert.equal(svc.limited.deadline, 0);
      assert.ok(conns.slice(0, 4).every((c) => !c.destroyed), 'the first four are still open');
      await honest(svc.address.port, 'b');
      for (const c of conns) c.destroy();
    } finally {
      await svc.close();
    }
  });

  it('caps unauthenticated connections in total, without disturbing an authenticated migration', async () => {
    const svc = await start({ maxUnauthenticated: 6, maxUnauthenticatedPerAddress: 2, handshakeTimeout: 20_000 });
    try {
      let begun!: () => void;
      const started = new Promise<void>((r) => (begun = r));
      const slow = honest(svc.address.port, 'slow', { bwlimit: 1 << 20, strategy: 'full', compress: { mode: 'none' }, onEvent: (e: { phase: string }) => { if (e.phase === 'scan') begun(); } });
      await started; // authenticated: it holds no slot now
      const conns = [];
      for (let a = 2; a <= 6; a++) for (let i = 0; i < 2; i++) conns.push(await idle(svc.address.port, `127.0.0.${a}`));
      await Promise.all(conns.slice(6).map(closedWithin));
      assert.equal(svc.limited.overCap, 4);
      // Full: a new client is refused at once, with a connection error, not a hang.
      await assert.rejects(honest(svc.address.port, 'refused'), (e: Error & { code?: string }) => e.code === ErrorCode.CONNECTION || e.code === ErrorCode.AUTH_FAILED);
      await slow;
      assert.deepEqual(readFileSync(join(svc.options.dataDir, 'slow.img')), readFileSync(image));
      for (const c of conns) c.destroy();
      await new Promise((r) => setTimeout(r, 100));
      await honest(svc.address.port, 'after');
    } finally {
      await svc.close();
    }
  });
});

/** Ends a serve process and waits for it (it writes into its data directory until it exits). */
async function stop(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const exited = new Promise((r) => p.once('exit', r));
  p.kill('SIGTERM');
  await exited;
}

/** `blockferry serve` in its own process, for its RSS. */
async function serveProcess(args: string[]): Promise<{ p: ChildProcess; port: number }> {
  const p = spawn(process.execPath, [bin, 'serve', '--listen', '127.0.0.1:0', '--data-dir', join(dir, `proc${n++}`), ...args], { stdio: ['ignore', 'pipe', 'ignore'] });
  const port = await new Promise<number>((res, rej) => {
    p.stdout!.once('data', (d: Buffer) => res(JSON.parse(d.toString()).port));
    p.once('exit', (c) => rej(new Error(`serve exited ${c}`)));
  });
  await new Promise((r) => setTimeout(r, 300));
  return { p, port };
}

describe('memory', () => {
  it('stays near its baseline under 60 connections each declaring a 16 MiB HELLO and sending 15 MiB (insecure: the worst case)', async () => {
    const { p, port } = await serveProcess(['--insecure']);
    try {
      const base = rss(p.pid!);
      // From 8 addresses so that the per-address cap is not what stops them.
      const socks = await Promise.all(Array.from({ length: 60 }, (_, i) => helloFlood(port, 16 << 20, 15 << 20, `127.0.1.${1 + (i % 8)}`)));
      const peak = rss(p.pid!).peak;
      for (const s of socks) s.destroy();
      assert.ok(peak - base.rss < 64 << 20, `RSS ${base.rss >> 20} MiB before, peak ${peak >> 20} MiB`);
    } finally {
      await stop(p);
    }
  });

  it('bounds what an authenticated client flooding BLOCKS without reading replies makes it hold, while an honest client is served', async () => {
    const keyFile = join(dir, 'key');
    writeFileSync(keyFile, key);
    const { p, port } = await serveProcess(['--key-file', keyFile]);
    try {
      const base = rss(p.pid!);
      const flood = blocksFlood(port, key, 512 << 20);
      await honest(port, 'honest');
      await flood;
      const peak = rss(p.pid!).peak;
      assert.ok(peak - base.rss < 256 << 20, `RSS ${base.rss >> 20} MiB before, peak ${peak >> 20} MiB`);
    } finally {
      await stop(p);
    }
  });
});
