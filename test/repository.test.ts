// Base images from a repository (issue 18, paper 002): four clones of one
// base (a real ext4 image), the base held by a repository, each migrated to
// a destination with no neighbours. Only the blocks changed since the base
// cross from the source; the rest comes from the repository, each block
// checked against the source's fingerprint and signature. A repository that
// lies, is down, or never answers costs the copy nothing but the fill.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync, closeSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { RepositoryService } from '../src/roles/repository/service.js';
import { RepositoryFills } from '../src/roles/repository/fills.js';
import type { FillContext } from '../src/roles/fills.js';
import { migrate } from '../src/migrate/migrate.js';
import { FETCH, FETCH_RESULT, MAX_FETCH_BLOCKS, type Fetch, type FetchResult } from '../src/protocol/messages.js';
import { CAP_REPOSITORY, clientHandshake } from '../src/protocol/handshake.js';
import { Channel } from '../src/protocol/channel.js';
import { Msg } from '../src/protocol/frame.js';
import { connect as tlsConnect } from '../src/transport/tls.js';
import { Engine } from '../src/engine/engine.js';
import { duplicateHeavyPair } from './fixtures.js';
import { seededBytes } from './util.js';

const BS = 4096;
const MiB = 1 << 20;
const key = Buffer.from('blockferry-repository-test-key-0123');
const auth = { key };
let dir: string;
let base: string;
let repo: RepositoryService;
const clones: Array<{ path: string; changedBlocks: number }> = [];

/** Blocks of a and b (same size) that differ. */
function changedBlocks(a: Buffer, b: Buffer): number {
  let n = 0;
  for (let at = 0; at < a.length; at += BS) if (!a.subarray(at, at + BS).equals(b.subarray(at, at + BS))) n++;
  return n;
}

/** A clone of the base changed its own way: a few MiB of new data in one place, and 32 single blocks rewritten elsewhere. */
function makeClone(i: number): string {
  const p = join(dir, `clone${i}.img`);
  copyFileSync(base, p);
  const fd = openSync(p, 'r+');
  try {
    writeSync(fd, seededBytes(1000 + i, (2 + i) * MiB), 0, (2 + i) * MiB, (6 + 12 * i) * MiB);
    for (let k = 0; k < 32; k++) writeSync(fd, seededBytes(5000 + 100 * i + k, BS), 0, BS, ((i * 7919 + k * 104729) % 15000) * BS);
  } finally {
    closeSync(fd);
  }
  return p;
}

async function destination(name: string, repository?: { to: string; timeout?: number }): Promise<DestinationService> {
  return DestinationService.start({ dataDir: join(dir, name), auth, ...(repository ? { repository } : {}) });
}

before(async () => {
  base = (await duplicateHeavyPair()).older;
  dir = mkdtempSync(join(tmpdir(), 'bf-repo-'));
  const b = readFileSync(base);
  for (let i = 0; i < 4; i++) {
    const path = makeClone(i);
    clones.push({ path, changedBlocks: changedBlocks(b, readFileSync(path)) });
  }
  repo = await RepositoryService.start({ dataDir: join(dir, 'repo'), images: [base], auth });
});
after(async () => {
  await repo?.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('base images from a repository', () => {
  it('four clones of one base: the source sends ≤ 1.05× the data changed since the base', async () => {
    let sentData = 0, changed = 0;
    for (const [i, c] of clones.entries()) {
      // A fresh destination each time: no neighbours at all, only the repository.
      const svc = await destination(`d${i}`, { to: `127.0.0.1:${repo.address.port}` });
      try {
        const r = await migrate(c.path, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'similarity', auth });
        assert.ok(readFileSync(join(dir, `d${i}`, 'vm.img')).equals(readFileSync(c.path)), `clone ${i}: byte-identical`);
        assert.equal(r.blocks.repaired, 0);
        const ratio = r.wire.sent.data / (c.changedBlocks * BS);
        assert.ok(ratio <= 1.05, `clone ${i}: ${r.wire.sent.data} bytes of block data sent for ${c.changedBlocks * BS} bytes changed (${ratio.toFixed(4)}×)`);
        assert.ok(r.blocks.sent <= c.changedBlocks, `clone ${i}: ${r.blocks.sent} blocks sent, ${c.changedBlocks} changed`);
        assert.ok(r.blocks.filledFromRepository > 5000, `clone ${i}: ${r.blocks.filledFromRepository} blocks filled from the repository`);
        sentData += r.wire.sent.data;
        changed += c.changedBlocks * BS;
      } finally {
        await svc.close();
      }
    }
    console.log(`# repository: four clones, ${changed} bytes changed since the base, ${sentData} bytes of block data sent (${(sentData / changed).toFixed(4)}×); repository served ${repo.stats.served} blocks in ${repo.stats.requests} requests`);
    assert.ok(sentData <= 1.05 * changed);
  });

  it('hybrid fills from the repository too', async () => {
    const svc = await destination('hybrid', { to: `127.0.0.1:${repo.address.port}` });
    try {
      const c = clones[3]!;
      const r = await migrate(c.path, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'hybrid', auth });
      assert.ok(readFileSync(join(dir, 'hybrid', 'vm.img')).equals(readFileSync(c.path)), 'byte-identical');
      assert.ok(r.blocks.filledFromRepository > 5000, `${r.blocks.filledFromRepository} blocks filled`);
      assert.ok(r.wire.sent.data <= 1.05 * c.changedBlocks * BS, `${r.wire.sent.data} bytes of block data sent for ${c.changedBlocks * BS} changed`);
    } finally {
      await svc.close();
    }
  });

  it('refuses a repository address that is not HOST:PORT at start (ERR_BF_INVALID_ARGUMENT)', async () => {
    await assert.rejects(destination('bad-addr', { to: 'nowhere' }), { code: 'ERR_BF_INVALID_ARGUMENT' });
  });

  it('full ignores the repository', async () => {
    const svc = await destination('full', { to: `127.0.0.1:${repo.address.port}` });
    try {
      const before = repo.stats.requests;
      const r = await migrate(clones[0]!.path, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'full', auth });
      assert.equal(r.blocks.filledFromRepository, 0);
      assert.equal(repo.stats.requests, before, 'never asked');
    } finally {
      await svc.close();
    }
  });

  it('a repository that returns wrong bytes for a fingerprint: nothing of it is written, the source sends the blocks, the image is exact', async () => {
    const liar = await RepositoryService.start({ dataDir: join(dir, 'liar'), images: [base], auth });
    const honest = liar.fetch.bind(liar);
    // Every block it holds comes back with one byte changed.
    liar.fetch = async (m: Fetch): Promise<FetchResult> => {
      const r = await honest(m);
      for (let off = 0, j = 0; j < r.lengths.length; off += r.lengths[j]!, j++) if (r.lengths[j]) r.data[off + 100] = r.data[off + 100]! ^ 0x5a;
      return r;
    };
    const svc = await destination('lied-to', { to: `127.0.0.1:${liar.address.port}` });
    try {
      const r = await migrate(clones[1]!.path, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'similarity', auth });
      assert.ok(liar.stats.served > 5000, 'the liar answered');
      assert.equal(r.blocks.filledFromRepository, 0, 'no lie written');
      assert.ok(readFileSync(join(dir, 'lied-to', 'vm.img')).equals(readFileSync(clones[1]!.path)), 'byte-identical');
      assert.equal(r.blocks.repaired, 0, 'nothing to repair: no wrong block was ever written');
    } finally {
      await svc.close();
      await liar.close();
    }
  });

  it('a repository that is down: the migration completes from the source', async () => {
    const gone = await RepositoryService.start({ dataDir: join(dir, 'gone'), images: [base], auth });
    const port = gone.address.port;
    await gone.close();
    const lines: string[] = [];
    const svc = await DestinationService.start({ dataDir: join(dir, 'down'), auth, repository: { to: `127.0.0.1:${port}` }, log: (l) => lines.push(l) });
    try {
      const r = await migrate(clones[2]!.path, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'similarity', auth });
      assert.equal(r.blocks.filledFromRepository, 0);
      assert.ok(readFileSync(join(dir, 'down', 'vm.img')).equals(readFileSync(clones[2]!.path)));
      assert.equal(lines.filter((l) => l.includes('unusable')).length, 1, `logged once: ${lines.join(' | ')}`);
    } finally {
      await svc.close();
    }
  });

  it('a repository that never answers: the fill gives up after its timeout and the migration completes', async () => {
    const held: Socket[] = [];
    const mute: Server = createServer((s) => { held.push(s); s.on('error', () => {}); });
    await new Promise<void>((r) => mute.listen(0, '127.0.0.1', r));
    const port = (mute.address() as { port: number }).port;
    const lines: string[] = [];
    const svc = await DestinationService.start({ dataDir: join(dir, 'mute'), auth, repository: { to: `127.0.0.1:${port}`, timeout: 300 }, log: (l) => lines.push(l) });
    try {
      const r = await migrate(clones[3]!.path, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy: 'similarity', auth });
      assert.equal(r.blocks.filledFromRepository, 0);
      assert.ok(readFileSync(join(dir, 'mute', 'vm.img')).equals(readFileSync(clones[3]!.path)));
      // It gave up on the repository by its own deadline (not by the migration's idle timeout), and said so once.
      const gaveUp = lines.filter((l) => l.includes('unusable'));
      assert.equal(gaveUp.length, 1, `logged once: ${lines.join(' | ')}`);
      assert.match(gaveUp[0]!, /ERR_BF_TIMEOUT/);
    } finally {
      await svc.close();
      for (const s of held) s.destroy();
      mute.close();
    }
  });
});

describe('RepositoryFills', () => {
  it('opens a new connection when the repository ended an idle one', async () => {
    const quick = await RepositoryService.start({ dataDir: join(dir, 'quick'), images: [base], auth, idleTimeout: 200 });
    const fills = new RepositoryFills({ to: `127.0.0.1:${quick.address.port}`, auth });
    try {
      const b = readFileSync(base);
      const engine = new Engine();
      const written = new Map<number, Buffer>();
      const sink = { write: async (off: number, data: Buffer) => { written.set(off, Buffer.from(data.buffer, data.byteOffset, data.length)); } };
      const ctx = { sink: sink as unknown as FillContext['sink'], size: b.length, blockSize: BS, engine };
      // A run of 64 blocks of the base, 8 of them non-zero at least.
      const start = 1024;
      const run = b.subarray(start * BS, (start + 64) * BS);
      const { fingerprints, signatures } = engine.fingerprints(run, BS);
      const req = { start, fingerprints, signatures, missing: [{ start, count: 64 }] };
      const first = await fills.fill(req, ctx);
      await new Promise((r) => setTimeout(r, 1500));
      const second = await fills.fill(req, ctx);
      assert.ok(first.size > 0, 'filled');
      assert.equal(second.size, first.size, 'filled again after the repository closed the idle connection');
      assert.equal(quick.stats.requests, 2);
      for (const [off, data] of written) assert.ok(data.equals(b.subarray(off, off + data.length)), `block at ${off}`);
    } finally {
      fills.close();
      await quick.close();
    }
  });
});

describe('the repository protocol', () => {
  async function client(): Promise<Channel> {
    const s = await tlsConnect({ host: '127.0.0.1', port: repo.address.port }, { mode: 'psk', key });
    s.on('error', () => {});
    const ch = new Channel(s);
    const caps = await clientHandshake(ch, auth, CAP_REPOSITORY);
    assert.equal(caps, CAP_REPOSITORY);
    return ch;
  }
  const engine = new Engine();

  it('answers FETCH with the blocks it holds, in order, and 0 for the others', async () => {
    const ch = await client();
    try {
      const b = readFileSync(base);
      // Two non-zero blocks of the base (zero blocks are never indexed: they cost nothing to send).
      const zero = Buffer.alloc(BS);
      let at = 1000;
      while (b.subarray(at * BS, (at + 1) * BS).equals(zero) || b.subarray((at + 1) * BS, (at + 2) * BS).equals(zero)) at++;
      const two = b.subarray(at * BS, (at + 2) * BS);
      const known = engine.fingerprints(two, BS);
      const unknown = engine.fingerprints(Buffer.from(seededBytes(42, BS)), BS);
      const fps = BigUint64Array.of(known.fingerprints[0]!, unknown.fingerprints[0]!, known.fingerprints[1]!);
      const sigs = BigUint64Array.of(known.signatures[0]!, unknown.signatures[0]!, known.signatures[1]!);
      const r = await ch.request(FETCH, { blockSize: BS, fingerprints: fps, signatures: sigs }, FETCH_RESULT);
      assert.deepEqual(r.lengths, [BS, 0, BS]);
      assert.ok(r.data.equals(two));
    } finally {
      ch.close();
    }
  });

  for (const [what, frame, code] of [
    ['more blocks than a request may ask for', () => { const n = MAX_FETCH_BLOCKS + 1; return { blockSize: BS, fingerprints: new BigUint64Array(n), signatures: new BigUint64Array(n) }; }, 'ERR_BF_PROTOCOL'],
    ['another block size', () => ({ blockSize: 8192, fingerprints: new BigUint64Array(1), signatures: new BigUint64Array(1) }), 'ERR_BF_INVALID_ARGUMENT'],
  ] as const) {
    it(`refuses a FETCH of ${what} (${code})`, async () => {
      const ch = await client();
      await assert.rejects(ch.request(FETCH, frame(), FETCH_RESULT), (e: { remoteCode?: string }) => e.remoteCode === code);
    });
  }

  it('refuses a truncated FETCH and anything that is not a FETCH (ERR_BF_PROTOCOL), and keeps serving', async () => {
    for (const [type, payload] of [[Msg.FETCH, Buffer.from([0, 16, 0, 0, 5, 0, 0, 0, 1, 2, 3])], [Msg.BEGIN, Buffer.alloc(0)]] as const) {
      const ch = await client();
      await ch.sendFrame(type, payload, 7);
      await assert.rejects(ch.next(), (e: { remoteCode?: string }) => e.remoteCode === 'ERR_BF_PROTOCOL');
    }
    const ch = await client();
    const r = await ch.request(FETCH, { blockSize: BS, fingerprints: new BigUint64Array(1), signatures: new BigUint64Array(1) }, FETCH_RESULT);
    assert.deepEqual(r.lengths, [0]);
    ch.close();
  });

  it('refuses a client without the key', async () => {
    await assert.rejects(async () => {
      const s = await tlsConnect({ host: '127.0.0.1', port: repo.address.port }, { mode: 'psk', key: Buffer.from('a-different-key-of-32-bytes-00000') });
      s.on('error', () => {});
      await clientHandshake(new Channel(s), { key: Buffer.from('a-different-key-of-32-bytes-00000') }, CAP_REPOSITORY);
    });
  });
});
