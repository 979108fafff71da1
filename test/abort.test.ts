// Cancellation (issue 14, first part): migrate() and scans take an
// AbortSignal. Aborting stops the work, tells the destination (which keeps
// what it has: the same call resumes), rejects with ERR_BF_ABORTED, and
// leaves nothing running (a process that aborts exits by itself).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { Scanner } from '../src/scan/scanner.js';
import { ErrorCode } from '../src/errors.js';
import { seededBytes } from './util.js';

const MiB = 1 << 20;
const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
let dir: string;
let image: string;

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bf-abort-'));
  image = join(dir, 'vm.img');
  writeFileSync(image, seededBytes(31, 24 * MiB));
});
after(() => rmSync(dir, { recursive: true, force: true }));

describe('cancelling', () => {
  it('a migration mid-transfer: rejects with ERR_BF_ABORTED and the reason; the same call again resumes and is exact', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth: { insecure: true } });
    try {
      const ac = new AbortController();
      let sent = 0;
      await assert.rejects(
        migrate(image, {
          to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'full', auth: { insecure: true }, bwlimit: 8e6, signal: ac.signal,
          onProgress: (p) => { if (p.phase === 'transfer' && p.done >= 4 * MiB && !ac.signal.aborted) { sent = p.done; ac.abort(new Error('operator said stop')); } },
        }),
        (e: Error & { code?: string; reason?: unknown }) => e.code === ErrorCode.ABORTED && e.name === 'AbortError' && /operator said stop/.test(e.message) && (e.reason as Error).message === 'operator said stop',
      );
      assert.ok(sent > 0, 'it was aborted during the transfer');
      // The destination noticed, saved its journal, and released the name.
      const r = await migrate(image, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'full', auth: { insecure: true } });
      assert.ok(r.blocks.resumed > 0, `resumed ${r.blocks.resumed} blocks`);
      assert.ok(readFileSync(join(dir, 'dst', 'vm.img')).equals(readFileSync(image)));
    } finally {
      await svc.close();
    }
  });

  it('a signal aborted before the call: rejects at once, nothing is opened', async () => {
    const ac = new AbortController();
    ac.abort('not now');
    await assert.rejects(migrate(image, { to: '127.0.0.1:9', auth: { insecure: true }, signal: ac.signal }), { code: ErrorCode.ABORTED });
  });

  it('a scan: the workers stop and it rejects with ERR_BF_ABORTED', async () => {
    const scanner = new Scanner({ workers: 2 });
    try {
      const ac = new AbortController();
      const p = scanner.scan(image, { signal: ac.signal, rangeBytes: 4 * MiB, onProgress: (s) => { if (s.done > 0) ac.abort(); } });
      ac.abort();
      await assert.rejects(p, { code: ErrorCode.ABORTED });
      // The pool still works afterwards.
      const [map] = await scanner.scan(image);
      assert.equal(map!.count, (24 * MiB) / 4096);
    } finally {
      await scanner.close();
    }
  });

  it('blockferry migrate on SIGINT: exits by itself with ERR_BF_ABORTED, and the same command resumes', async () => {
    const data = join(dir, 'dst-cli');
    const serve = spawn(process.execPath, [bin, 'serve', '--listen', '127.0.0.1:0', '--data-dir', data, '--insecure'], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      const { port } = JSON.parse(await new Promise<string>((r) => createInterface({ input: serve.stdout! }).once('line', r))) as { port: number };
      const args = [bin, 'migrate', image, '--to', `127.0.0.1:${port}`, '--insecure', '--name', 'vm', '--strategy', 'full', '--bwlimit', '4M', '--progress', 'json'];
      const m = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      let transferred!: () => void;
      const sending = new Promise<void>((r) => { transferred = r; });
      m.stderr!.on('data', (d) => {
        err += d;
        // Interrupted once data is on its way (a progress line of the transfer), whatever the machine's load.
        if (/"phase":"transfer"[^\n]*"done":[1-9]/.test(err)) transferred();
      });
      const exited = new Promise<number | null>((r) => m.once('exit', (c) => r(c)));
      await Promise.race([sending, exited]);
      m.kill('SIGINT');
      const timer = setTimeout(() => m.kill('SIGKILL'), 10_000);
      const code = await exited;
      clearTimeout(timer);
      assert.equal(code, 1, `exits with an error status by itself (stderr: ${err})`);
      assert.match(err, /ERR_BF_ABORTED.*interrupted \(SIGINT\)/);
      const again = spawnSync(process.execPath, args.filter((a) => a !== '--bwlimit' && a !== '4M').map((a) => (a === 'json' ? 'none' : a)).concat('--json'), { encoding: 'utf8' });
      assert.equal(again.status, 0, again.stderr);
      assert.ok(JSON.parse(again.stdout).blocks.resumed > 0, 'resumed');
      assert.ok(readFileSync(join(data, 'vm.img')).equals(readFileSync(image)));
    } finally {
      // Waited for: on SIGTERM the service still writes into its data directory, which after() removes.
      const gone = serve.exitCode !== null || serve.signalCode !== null ? undefined : new Promise((r) => serve.once('exit', r));
      serve.kill('SIGTERM');
      await gone;
    }
  });
});
