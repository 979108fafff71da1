// TLS 1.3 on the wire: mutual certificates, the pre-shared key over TLS-PSK,
// refusals with clear codes, and what an observer of the link sees.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect as netConnect, type Server } from 'node:net';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { ErrorCode } from '../src/index.js';
import { makePki, type Pki } from './tlsfixtures.js';
import { seededBytes } from './util.js';

const key = Buffer.from('blockferry-tls-test-key-0123456789');
const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
let dir: string;
let pki: Pki;
let image: string;
let data: Buffer;

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bf-tls-'));
  pki = makePki(dir);
  // A recognisable pattern, repeated: visible on the wire unless it is encrypted (compression off).
  const pattern = Buffer.from('BLOCKFERRY-PLAINTEXT-MARKER-'.repeat(4096 / 28 + 1)).subarray(0, 4096);
  data = Buffer.concat([Buffer.from(seededBytes(7, 32 * 4096)), ...Array.from({ length: 4 }, (_, i) => { const b = Buffer.from(pattern); b.writeUInt32LE(i, 0); return b; })]);
  image = join(dir, 'src.img');
  writeFileSync(image, data);
});
after(() => rmSync(dir, { recursive: true, force: true }));

const certServer = (cert = pki.server) => DestinationService.start({ dataDir: join(dir, `dst-${Math.random().toString(36).slice(2)}`), auth: {}, tls: { ...cert, ca: pki.ca } });
const client = (c = pki.client, servername?: string) => ({ auth: {}, tls: { ...c, ca: pki.ca, ...(servername ? { servername } : {}) } });

describe('TLS with certificates', () => {
  it('migrates over mutual TLS, checking the server\'s name against the host dialled or servername', async () => {
    const svc = await certServer();
    try {
      await migrate(image, { to: `127.0.0.1:${svc.address.port}`, name: 'ip', ...client() });
      await migrate(image, { to: `localhost:${svc.address.port}`, name: 'dns', ...client() });
      await migrate(image, { to: `127.0.0.1:${svc.address.port}`, name: 'sni', ...client(pki.client, 'localhost') });
      for (const n of ['ip', 'dns', 'sni']) assert.deepEqual(readFileSync(join(svc.options.dataDir, `${n}.img`)), data);
      // The right CA, the wrong name asked for.
      await assert.rejects(migrate(image, { to: `127.0.0.1:${svc.address.port}`, name: 'x', ...client(pki.client, 'elsewhere.example') }), { code: ErrorCode.TLS_CERT });
    } finally {
      await svc.close();
    }
  });

  for (const [what, cert] of [['expired', 'expiredServer'], ['for another name', 'otherNameServer'], ['signed by another CA', 'otherCaServer']] as const) {
    it(`refuses a server certificate ${what} (ERR_BF_TLS_CERT)`, async () => {
      const svc = await certServer(pki[cert]);
      try {
        await assert.rejects(migrate(image, { to: `127.0.0.1:${svc.address.port}`, name: 'x', ...client() }), { code: ErrorCode.TLS_CERT });
      } finally {
        await svc.close();
      }
    });
  }

  it('refuses client certificates signed by another CA or expired, a PSK client and an insecure one; keeps serving', async () => {
    const logs: string[] = [];
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst-clients'), auth: {}, tls: { ...pki.server, ca: pki.ca }, log: (l) => logs.push(l) });
    const to = `127.0.0.1:${svc.address.port}`;
    try {
      for (const c of [pki.otherCaClient, pki.expiredClient]) {
        await assert.rejects(migrate(image, { to, name: 'x', ...client(c) }), { code: ErrorCode.TLS_CERT });
      }
      await assert.rejects(migrate(image, { to, name: 'x', auth: { key } }), { code: ErrorCode.AUTH_FAILED });
      await assert.rejects(migrate(image, { to, name: 'x', auth: { insecure: true } }), { code: ErrorCode.AUTH_FAILED });
      assert.ok(logs.some((l) => l.includes(ErrorCode.TLS_CERT)), logs.join('\n'));
      await migrate(image, { to, name: 'ok', ...client() });
      assert.deepEqual(readFileSync(join(dir, 'dst-clients', 'ok.img')), data);
    } finally {
      await svc.close();
    }
  });
});

/** A TCP relay that records every byte the source sends. */
async function recorder(port: number): Promise<{ server: Server; port: number; bytes: () => Buffer }> {
  const seen: Buffer[] = [];
  const server = createServer((a) => {
    const b = netConnect(port, '127.0.0.1');
    a.on('data', (d) => { seen.push(d); b.write(d); });
    b.pipe(a);
    a.on('error', () => b.destroy());
    b.on('error', () => a.destroy());
    a.on('close', () => b.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as { port: number }).port, bytes: () => Buffer.concat(seen) };
}

describe('the pre-shared key over TLS 1.3', () => {
  it('encrypts the stream: block data seen on the link only with --insecure', async () => {
    const marker = Buffer.from('BLOCKFERRY-PLAINTEXT-MARKER-');
    for (const insecure of [false, true]) {
      const auth = insecure ? { insecure: true } : { key };
      const svc = await DestinationService.start({ dataDir: join(dir, `dst-wire-${insecure}`), auth });
      const rec = await recorder(svc.address.port);
      try {
        await migrate(image, { to: `127.0.0.1:${rec.port}`, name: 'w', auth, strategy: 'full', compress: { mode: 'none' } });
        assert.equal(rec.bytes().includes(marker), insecure, insecure ? 'plain TCP carries the data as is' : 'TLS hides it');
        assert.deepEqual(readFileSync(join(dir, `dst-wire-${insecure}`, 'w.img')), data);
      } finally {
        rec.server.close();
        await svc.close();
      }
    }
  });

  it('refuses a wrong key and a certificate client with ERR_BF_AUTH_FAILED or ERR_BF_TLS_CERT', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst-psk'), auth: { key } });
    const to = `127.0.0.1:${svc.address.port}`;
    try {
      await assert.rejects(migrate(image, { to, name: 'x', auth: { key: Buffer.from('another-key-of-32-bytes-00000000') } }), { code: ErrorCode.AUTH_FAILED });
      await assert.rejects(migrate(image, { to, name: 'x', ...client() }), (e: Error & { code?: string }) => e.code === ErrorCode.AUTH_FAILED || e.code === ErrorCode.TLS_CERT);
      await migrate(image, { to, name: 'ok', auth: { key } });
    } finally {
      await svc.close();
    }
  });
});

describe('CLI', () => {
  it('serve and migrate with --cert/--key/--ca; --insecure prints a warning', async () => {
    const f = pki.files;
    const p = spawn(process.execPath, [bin, 'serve', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'dst-cli'), '--cert', f.serverCert, '--key', f.serverKey, '--ca', f.ca], { stdio: ['ignore', 'pipe', 'pipe'] });
    try {
      const port = await new Promise<number>((res, rej) => {
        p.stdout.once('data', (d: Buffer) => res(JSON.parse(d.toString()).port));
        p.once('exit', (c) => rej(new Error(`serve exited ${c}`)));
      });
      const ok = spawnSync(process.execPath, [bin, 'migrate', image, '--to', `127.0.0.1:${port}`, '--name', 'cli', '--cert', f.clientCert, '--key', f.clientKey, '--ca', f.ca, '--json', '--progress=none'], { encoding: 'utf8' });
      assert.equal(ok.status, 0, ok.stderr);
      assert.deepEqual(readFileSync(join(dir, 'dst-cli', 'cli.img')), data);
      const partial = spawnSync(process.execPath, [bin, 'migrate', image, '--to', `127.0.0.1:${port}`, '--cert', f.clientCert], { encoding: 'utf8' });
      assert.equal(partial.status, 2);
      assert.match(partial.stderr, /ERR_BF_USAGE/);
      const plain = spawnSync(process.execPath, [bin, 'migrate', image, '--to', `127.0.0.1:${port}`, '--name', 'plain', '--insecure', '--progress=none'], { encoding: 'utf8' });
      assert.equal(plain.status, 1);
      assert.match(plain.stderr, /warning: --insecure: the stream is unprotected/);
      assert.match(plain.stderr, /ERR_BF_AUTH_FAILED/);
    } finally {
      // Waited for: the service writes into a directory the suite removes at the end.
      const gone = p.exitCode !== null || p.signalCode !== null ? undefined : new Promise((r) => p.once('exit', r));
      p.kill('SIGTERM');
      await gone;
    }
  });
});
