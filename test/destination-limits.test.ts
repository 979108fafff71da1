// The destination keeps its promises under pressure: other connections are
// served while a long VERIFY runs, resources follow what arrives, silent
// peers time out and lose their name to a new attempt, planted links are
// refused, and peer text reaches the log escaped and capped.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statfsSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { listPartials } from '../src/roles/destination/partials.js';
import { Session } from '../src/roles/destination/session.js';
import { Journal } from '../src/roles/destination/journal.js';
import { FileImageSink } from '../src/image/sink.js';
import { migrate } from '../src/migrate/migrate.js';
import { Channel } from '../src/protocol/channel.js';
import { Msg, Writer } from '../src/protocol/frame.js';
import { BEGIN, BEGIN_OK, BLOCK_INFO, BLOCKS, INFO_END, NEED, VERIFY, VERIFY_RESULT } from '../src/protocol/messages.js';
import { writeFileAtomic } from '../src/io/atomic.js';
import { escapeForLog } from '../src/util/sanitize.js';
import { Engine } from '../src/engine/engine.js';
import { ErrorCode } from '../src/index.js';
import { seededBytes } from './util.js';
import { rawClient as connectRaw } from './raw-client.js';

const BS = 4096;
const key = Buffer.from('blockferry-limits-test-key-01234');
const engine = new Engine();
let dir: string;

const rawClient = (port: number) => connectRaw(port, { key });
const begin = (ch: Channel, name: string, size: number, strategy = 'test') => ch.send(BEGIN, { name, size, blockSize: BS, flags: 1, fills: 0, strategy });
const info = (start: number, bytes: Buffer) => ({ start, count: Math.ceil(bytes.length / BS), ...engine.fingerprints(bytes, BS) });
const blocksMsg = (start: number, bytes: Buffer) => ({ runs: [{ start, count: Math.ceil(bytes.length / BS) }], fingerprints: engine.fingerprints(bytes, BS).fingerprints, data: bytes });
const remoteCode = (e: unknown) => (e as { remoteCode?: string }).remoteCode;

before(() => { dir = mkdtempSync(join(tmpdir(), 'bf-limits-')); });
after(() => rmSync(dir, { recursive: true, force: true }));

describe('no work on the event loop that grows with the input', () => {
  it('a second client connects, authenticates and gets BEGIN_OK while a large VERIFY is still being worked on', async () => {
    // On tmpfs when there is one: the measurement is about the event loop, not the disk's fsync.
    const shm = existsSync('/dev/shm') ? mkdtempSync('/dev/shm/bf-busy-') : join(dir, 'busy');
    const svc = await DestinationService.start({ dataDir: shm, auth: { key } });
    try {
      const a = await rawClient(svc.address.port);
      const size = 32 << 20;
      await begin(a, 'big', size);
      await a.recv(BEGIN_OK);
      const img = Buffer.from(seededBytes(11, size));
      for (let at = 0; at < size; at += 1 << 20) {
        const part = img.subarray(at, at + (1 << 20));
        await a.send(BLOCK_INFO, info(at / BS, part));
        await a.send(BLOCKS, blocksMsg(at / BS, part));
      }
      await a.send(INFO_END, undefined);
      // Thousands of extents: every 16 MiB extent many times, and every block on its own.
      const big = [0, 1].map((k) => ({ start: k * 4096, count: 4096, digest: createHash('sha1').update(img.subarray(k * (16 << 20), (k + 1) * (16 << 20))).digest() }));
      const list = [...Array.from({ length: 12 }, () => big).flat(), ...Array.from({ length: size / BS }, (_, i) => ({ start: i, count: 1, digest: Buffer.alloc(20) }))];
      let verified = false;
      const verifying = Promise.all([a.request(VERIFY, list, VERIFY_RESULT)]).then((r) => { verified = true; return r; });
      await new Promise((r) => setTimeout(r, 100)); // the VERIFYs are being worked on
      assert.equal(verified, false);
      const b = await rawClient(svc.address.port);
      await begin(b, 'other', BS);
      await b.recv(BEGIN_OK);
      // Answered before the VERIFY finished: the verification did not hold the event loop. (How
      // fast the answer comes is a speed figure, for a bench on a quiet machine, not for a test.)
      assert.equal(verified, false, 'the VERIFY was still running when the second client was answered');
      const results = await verifying;
      assert.equal(results[0]!.length, size / BS, 'the single-block extents with a wrong digest differ, the 16 MiB ones match');
      a.close(); b.close();
    } finally {
      await svc.close();
      if (shm.startsWith('/dev/shm/')) rmSync(shm, { recursive: true, force: true });
    }
  });
});

describe('resources bounded by what is received', () => {
  it('refuses an image over maxImageSize, but accepts a large sparse image under it', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'max'), auth: { key }, maxImageSize: 1 << 30 });
    try {
      const ch = await rawClient(svc.address.port);
      await begin(ch, 'huge', (1 << 30) + BS);
      await assert.rejects(ch.next(), (e) => remoteCode(e) === ErrorCode.IMAGE_TOO_LARGE);
      const ok = await rawClient(svc.address.port);
      await begin(ok, 'fits', 1 << 30);
      assert.equal((await ok.recv(BEGIN_OK)).resumed, false);
      ok.close();
    } finally {
      await svc.close();
    }
  });

  it('refuses data that cannot fit in the free space (ERR_BF_NO_SPACE), keeping the journal', async () => {
    const data = join(dir, 'full');
    mkdirSync(data);
    const st = statfsSync(data);
    const free = Number(st.bavail) * Number(st.bsize);
    // Leave 64 MiB usable: 2 GiB of announced data cannot arrive; a 1 TiB sparse image with 64 KiB of data can.
    // (Wide margins both ways: other tests write and delete files on the same disk meanwhile.)
    const svc = await DestinationService.start({ dataDir: data, auth: { key }, reserveBytes: free - (64 << 20) });
    try {
      const sparse = await rawClient(svc.address.port);
      await begin(sparse, 'sparse', 2 ** 40);
      await sparse.recv(BEGIN_OK);
      await sparse.send(BLOCK_INFO, info(1000, Buffer.from(seededBytes(1, 64 << 10))));
      assert.equal((await sparse.recv(NEED)).missing[0]!.count, 16);
      sparse.close();
      const ch = await rawClient(svc.address.port);
      await begin(ch, 'nospace', 4 * 2 ** 30);
      await ch.recv(BEGIN_OK);
      // 8 runs of 64 Ki blocks (fingerprints of no real data: nothing at the destination has them, so all are needed).
      // The refusal may arrive while the runs are still being sent: it ends the send, or the next receive.
      const refused = (async () => {
        for (let k = 0; k < 8; k++) {
          const n = 65536;
          const fingerprints = BigUint64Array.from({ length: n }, (_, i) => BigInt(k * n + i + 1));
          await ch.send(BLOCK_INFO, { start: k * (n + 1), count: n, fingerprints, signatures: fingerprints });
        }
        await ch.next();
      })();
      await assert.rejects(refused, (e) => remoteCode(e) === ErrorCode.NO_SPACE);
      await new Promise((r) => setTimeout(r, 100));
      assert.ok(existsSync(join(data, 'nospace.img.journal')), 'the journal is kept');
    } finally {
      await svc.close();
    }
  });

  it('turns ENOSPC while writing into ERR_BF_NO_SPACE and saves the journal', async () => {
    const d = join(dir, 'enospc');
    mkdirSync(d);
    const [s1, s2] = await socketPair();
    const sink = await FileImageSink.create(join(d, 'x.img.partial'), join(d, 'x.img'), 16 * BS);
    const failing = Object.assign(Object.create(Object.getPrototypeOf(sink)), sink, {
      write: async () => { throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC', errno: -28 }); },
    });
    const journal = Journal.fresh(16 * BS, BS);
    const session = new Session(new Channel(s1), { name: 'x', size: 16 * BS, blockSize: BS, sink: failing, journal, journalFile: join(d, 'x.img.journal'), resumed: false, fills: [] });
    const run = session.run();
    const peer = new Channel(s2);
    await peer.recv(BEGIN_OK);
    const b = Buffer.from(seededBytes(3, BS));
    await peer.send(BLOCK_INFO, info(0, b));
    await peer.send(BLOCKS, blocksMsg(0, b));
    await assert.rejects(run, { code: ErrorCode.NO_SPACE });
    assert.ok(existsSync(join(d, 'x.img.journal')));
    s1.destroy(); s2.destroy();
  });

  it('expires partial images untouched for partialTtl, and not the others', async () => {
    const data = join(dir, 'ttl');
    mkdirSync(data);
    writeFileSync(join(data, 'old.img.partial'), 'x');
    writeFileSync(join(data, 'old.img.journal'), 'x');
    writeFileSync(join(data, 'new.img.partial'), 'x');
    const past = new Date(Date.now() - 3 * 86400_000);
    utimesSync(join(data, 'old.img.partial'), past, past);
    utimesSync(join(data, 'old.img.journal'), past, past);
    const log: string[] = [];
    const svc = await DestinationService.start({ dataDir: data, auth: { key }, partialTtl: 86400_000, log: (l) => log.push(l) });
    await svc.close();
    assert.deepEqual(listPartials(data).map((p) => p.name), ['new']);
    assert.ok(log.some((l) => /removed the partial image of old/.test(l)));
  });
});

/** Two connected sockets on loopback. */
async function socketPair(): Promise<[import('node:net').Socket, import('node:net').Socket]> {
  const { createServer } = await import('node:net');
  return new Promise((resolve) => {
    const srv = createServer((s) => { srv.close(); resolve([s, c]); });
    let c: import('node:net').Socket;
    srv.listen(0, '127.0.0.1', () => { c = connect((srv.address() as { port: number }).port, '127.0.0.1'); });
  });
}

describe('liveness', () => {
  it('ends a session that receives nothing for idleTimeout with ERR_BF_TIMEOUT and releases its name', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'idle'), auth: { key }, idleTimeout: 300 });
    try {
      const ch = await rawClient(svc.address.port);
      await begin(ch, 'quiet', 16 * BS);
      await ch.recv(BEGIN_OK);
      // Not before the deadline: the destination's own account of the silence it waited through.
      await assert.rejects(ch.next(), (e: Error) => remoteCode(e) === ErrorCode.TIMEOUT && Number(/nothing received for (\d+) ms \(idle deadline 300 ms\)/.exec(e.message)?.[1]) >= 300);
      // The name is free again, and resumes from the journal the timed-out session saved.
      const again = await rawClient(svc.address.port);
      await begin(again, 'quiet', 16 * BS);
      assert.equal((await again.recv(BEGIN_OK)).resumed, true);
      again.close();
    } finally {
      await svc.close();
    }
  });

  it('a new attempt takes over a name whose session went silent, and resumes from its journal', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'takeover'), auth: { key }, takeoverGrace: 200 });
    try {
      const src = join(dir, 'takeover.img');
      const img = Buffer.from(seededBytes(6, 64 * BS));
      writeFileSync(src, img);
      const old = await rawClient(svc.address.port);
      await begin(old, 'tk', img.length);
      await old.recv(BEGIN_OK);
      await old.send(BLOCK_INFO, info(0, img));
      await old.recv(NEED);
      await old.send(BLOCKS, blocksMsg(0, img.subarray(0, 32 * BS)));
      // ...and then the old source goes silent. A second attempt within the grace is BUSY.
      await assert.rejects(migrate(src, { to: `127.0.0.1:${svc.address.port}`, name: 'tk', auth: { key }, overwrite: true }), (e) => remoteCode(e) === ErrorCode.BUSY);
      await new Promise((r) => setTimeout(r, 300));
      const oldEnd = assert.rejects(old.next(), (e) => remoteCode(e) === ErrorCode.TIMEOUT);
      const r = await migrate(src, { to: `127.0.0.1:${svc.address.port}`, name: 'tk', auth: { key }, overwrite: true, strategy: 'full' });
      await oldEnd;
      assert.equal(r.blocks.resumed, 32, 'the blocks the silent session had received and journaled');
      assert.deepEqual(readFileSync(join(dir, 'takeover', 'tk.img')), img);
    } finally {
      await svc.close();
    }
  });

  it('times out a source process that was stopped (SIGSTOP) mid-migration', async () => {
    const log: string[] = [];
    const svc = await DestinationService.start({ dataDir: join(dir, 'stopped'), auth: { key }, idleTimeout: 400, log: (l) => log.push(l) });
    try {
      const src = join(dir, 'stopped.img');
      writeFileSync(src, seededBytes(7, 4096 * BS));
      const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
      const child = spawn(process.execPath, [bin, 'migrate', src, '--to', `127.0.0.1:${svc.address.port}`, '--name', 'stopped', '--bwlimit', '1M', '--progress=none', '--strategy', 'full'], { env: { ...process.env, BLOCKFERRY_KEY: key.toString() }, stdio: 'ignore' });
      const active = (svc as unknown as { active: Map<string, unknown> }).active;
      for (let i = 0; i < 500 && !active.has('stopped'); i++) await new Promise((r) => setTimeout(r, 10));
      assert.ok(active.has('stopped'), 'the migration started');
      child.kill('SIGSTOP');
      for (let i = 0; i < 300 && active.has('stopped'); i++) await new Promise((r) => setTimeout(r, 10));
      child.kill('SIGKILL');
      assert.equal(active.has('stopped'), false, 'the stopped source lost its session');
      assert.ok(log.some((l) => l.includes(ErrorCode.TIMEOUT)), log.join('\n'));
      assert.ok(existsSync(join(dir, 'stopped', 'stopped.img.journal')));
    } finally {
      await svc.close();
    }
  });
});

describe('files', () => {
  for (const which of ['partial', 'journal'] as const) {
    it(`refuses a symbolic link planted at NAME.img.${which}, and writes nothing through it`, async () => {
      const data = join(dir, `link-${which}`);
      mkdirSync(data);
      const target = join(dir, `target-${which}`);
      writeFileSync(target, 'precious');
      symlinkSync(target, join(data, `v.img.${which}`));
      if (which === 'journal') writeFileSync(join(data, 'v.img.partial'), Buffer.alloc(16 * BS));
      const svc = await DestinationService.start({ dataDir: data, auth: { key } });
      try {
        const ch = await rawClient(svc.address.port);
        await begin(ch, 'v', 16 * BS);
        await assert.rejects(ch.next(), (e) => remoteCode(e) === ErrorCode.UNSAFE_PATH && /symbolic link/.test((e as Error).message));
        assert.equal(readFileSync(target, 'utf8'), 'precious');
      } finally {
        await svc.close();
      }
    });
  }

  it('writeFileAtomic refuses a link at the final name and never writes through a planted temporary name', () => {
    const target = join(dir, 'atomic-target');
    writeFileSync(target, 'precious');
    const file = join(dir, 'atomic-file');
    symlinkSync(target, file);
    assert.throws(() => writeFileAtomic(file, [Buffer.from('new')], 'test file'), { code: ErrorCode.UNSAFE_PATH });
    assert.equal(readFileSync(target, 'utf8'), 'precious');
    // The old predictable temporary name is no longer used: a link there is never followed.
    const f2 = join(dir, 'atomic-2');
    symlinkSync(target, `${f2}.tmp-${process.pid}`);
    writeFileAtomic(f2, [Buffer.from('new')], 'test file');
    assert.equal(readFileSync(f2, 'utf8'), 'new');
    assert.equal(readFileSync(target, 'utf8'), 'precious');
    assert.throws(() => Journal.load(file), { code: ErrorCode.UNSAFE_PATH });
  });
});

describe('logs', () => {
  it('escapes control characters and caps the length of anything a peer sent', async () => {
    const log: string[] = [];
    const svc = await DestinationService.start({ dataDir: join(dir, 'logs'), auth: { key }, log: (l) => log.push(l) });
    try {
      const evilName = 'x\n2099-01-01 forged line\x1b[31m' + 'A'.repeat(5000);
      const ch = await rawClient(svc.address.port);
      await begin(ch, evilName, BS, 'strat\r\negy\u202e' + 'B'.repeat(60000));
      await assert.rejects(ch.next(), (e) => remoteCode(e) === ErrorCode.NAME_INVALID);
      const ch2 = await rawClient(svc.address.port);
      await begin(ch2, 'ok', BS);
      await ch2.recv(BEGIN_OK);
      await ch2.sendFrame(Msg.ERROR, new Writer().str('ERR_BF_PROTOCOL').str('\x1b]0;pwned\x07\n' + 'C'.repeat(9000)).done());
      await new Promise((r) => setTimeout(r, 200));
      assert.ok(log.length >= 3, log.join('\n'));
      for (const l of log) {
        assert.doesNotMatch(l, /[\u0000-\u001f\u007f-\u009f\u202e]/, `control characters in ${JSON.stringify(l.slice(0, 200))}`);
        assert.ok(l.length <= 2100, `a log line of ${l.length} characters`);
      }
      assert.ok(log.some((l) => l.includes('x\\x0a2099-01-01 forged line\\x1b[31m')));
      assert.ok(log.some((l) => l.includes('\\x1b]0;pwned\\x07\\x0a')));
      assert.equal(escapeForLog('a'.repeat(300), 10), 'aaaaaaaaaa…(290 more)');
    } finally {
      await svc.close();
    }
  });
});
