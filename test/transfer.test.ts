// Migrations over real TCP sockets on loopback, destination service in this
// process: byte-for-byte results, which blocks crossed the network, live
// writes, resume after a dropped connection, and hostile peers.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect as tlsConnect } from '../src/transport/tls.js';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { TrackedImage } from '../src/image/tracked.js';
import { Channel } from '../src/protocol/channel.js';
import { FrameDecoder, Msg, encodeHeader, MAX_PAYLOAD, Writer } from '../src/protocol/frame.js';
import { clientHandshake } from '../src/protocol/handshake.js';
import { BEGIN, BEGIN_OK, HELLO } from '../src/protocol/messages.js';
import { ErrorCode } from '../src/index.js';
import { seededBytes } from './util.js';

const BS = 4096;
const key = Buffer.from('blockferry-test-key-0123456789ab');
let dir: string;
let svc: DestinationService;
let to: string;
const neighbour = () => join(dir, 'neighbour.img');

/** 64 blocks from the neighbour, 16 new, 8 zero, 8 repeating block 70 (new content, sent once). */
function makeSource(name: string): { path: string; data: Buffer } {
  const n = readFileSync(neighbour());
  const parts = [n.subarray(0, 64 * BS), Buffer.from(seededBytes(500, 16 * BS)), Buffer.alloc(8 * BS)];
  for (let i = 0; i < 8; i++) parts.push(Buffer.from(seededBytes(500, 16 * BS).subarray(6 * BS, 7 * BS)));
  const data = Buffer.concat(parts);
  const path = join(dir, name);
  writeFileSync(path, data);
  return { path, data };
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'bf-xfer-'));
  writeFileSync(neighbour(), seededBytes(1, 128 * BS));
  svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth: { key }, neighbours: [neighbour()] });
  to = `127.0.0.1:${svc.address.port}`;
});
after(async () => { await svc.close(); rmSync(dir, { recursive: true, force: true }); });

describe('migration over TCP', () => {
  it('similarity: fills from the neighbour, sends only the missing contents once, ends byte-identical', async () => {
    const { path, data } = makeSource('a.img');
    const log: string[] = [];
    const r = await migrate(path, { to, name: 'a', strategy: 'similarity', auth: { key }, onFrame: (f) => log.push(`${f.direction === 'sent' ? '>' : '<'}${f.type}`) });
    assert.deepEqual(readFileSync(join(dir, 'dst', 'a.img')), data);
    // The frames that crossed. Fingerprints stream out while NEEDs come back, so the two
    // interleave; each direction's own order is fixed. Two runs of data (blocks 0..79 and the
    // 8 repeats at 88..95; the zero run between costs nothing): two BLOCK_INFO, three NEED.
    // The 16 new blocks go in one BLOCKS frame, the repeats as one COPY naming content sent before it.
    const sent = log.filter((t) => t[0] === '>'), received = log.filter((t) => t[0] === '<');
    assert.deepEqual(sent.filter((t) => t !== '>BLOCK_INFO' && t !== '>INFO_END'), ['>HELLO', '>AUTH', '>BEGIN', '>BLOCKS', '>VERIFY', '>COPY', '>VERIFY', '>SYNC', '>ROUND', '>COMMIT']);
    assert.deepEqual(sent.filter((t) => t === '>BLOCK_INFO' || t === '>INFO_END'), ['>BLOCK_INFO', '>BLOCK_INFO', '>INFO_END']);
    assert.ok(sent.indexOf('>INFO_END') < sent.indexOf('>SYNC'));
    // Each run is checked right after its blocks: VERIFY follows BLOCKS, and the second follows COPY.
    assert.deepEqual(received.slice(0, 3), ['<HELLO_ACK', '<READY', '<BEGIN_OK']);
    assert.deepEqual(received.slice(-2), ['<SYNC_OK', '<DONE']);
    assert.deepEqual(received.slice(3, -2).sort(), ['<NEED', '<NEED', '<NEED', '<VERIFY_RESULT', '<VERIFY_RESULT']);
    assert.equal(r.blocks.filledFromNeighbours, 64);
    assert.equal(r.blocks.sent, 16, 'the 16 new blocks; the 8 repeats of block 70 are copied');
    assert.equal(r.blocks.copied, 8);
    assert.equal(r.blocks.zero, 8);
    assert.ok(r.wire.sent.data < 17 * (BS + 16) + 64, `data bytes ${r.wire.sent.data}`);
    assert.equal(r.verified, true);
  });

  it('full: sends every non-zero block content, ignores the neighbourhood', async () => {
    const { path, data } = makeSource('b.img');
    const r = await migrate(path, { to, name: 'b', strategy: 'full', auth: { key } });
    assert.deepEqual(readFileSync(join(dir, 'dst', 'b.img')), data);
    assert.equal(r.blocks.filledFromNeighbours, 0);
    assert.equal(r.blocks.sent, 64 + 16);
    assert.equal(r.blocks.copied, 8);
  });

  it('keeps up with live writes through a tracked image and cuts over with pause/resume', async () => {
    const { path } = makeSource('live.img');
    const tracked = new TrackedImage(path);
    let writes = 0;
    const timer = setInterval(() => { tracked.write(((writes * 13) % 90) * BS + 100, seededBytes(writes, 5000)); writes++; }, 1);
    const events: string[] = [];
    const r = await migrate(path, {
      to, name: 'live', auth: { key }, tracked, dirtyThreshold: 2,
      pause: () => { clearInterval(timer); events.push('pause'); },
      resume: () => { events.push('resume'); },
    });
    tracked.close();
    assert.deepEqual(events, ['pause', 'resume']);
    assert.ok(writes > 0);
    assert.ok(r.rounds >= 1);
    assert.ok(r.downtimeSeconds > 0 && r.downtimeSeconds <= r.seconds);
    assert.deepEqual(readFileSync(join(dir, 'dst', 'live.img')), readFileSync(path));
  });

  it('resumes after a dropped connection without resending verified blocks', async () => {
    const path = join(dir, 'big.img');
    writeFileSync(path, seededBytes(77, 2048 * BS));
    // Slow link; drop the connection once some data has arrived.
    let dropped = false;
    const first = migrate(path, { to, name: 'big', strategy: 'full', auth: { key }, bwlimit: 4 << 20, onEvent: (e) => {
      if (e.phase === 'transfer' && !dropped) {
        dropped = true;
        setTimeout(() => { for (const s of (svc as unknown as { sockets: Set<{ destroy(): void }> }).sockets) s.destroy(); }, 600);
      }
    } });
    await assert.rejects(first, (e: Error & { code?: string }) => e.code === ErrorCode.CONNECTION || e.code === ErrorCode.REFUSED || e.code === ErrorCode.PROTOCOL);
    assert.ok(existsSync(join(dir, 'dst', 'big.img.partial')), 'the partial image stays');
    assert.ok(existsSync(join(dir, 'dst', 'big.img.journal')), 'with its journal');
    assert.equal(existsSync(join(dir, 'dst', 'big.img')), false, 'an incomplete image is never presented as complete');
    // Meanwhile the source's first 64 blocks (verified in the first attempt) became zero:
    // the destination must zero them, not keep what it has.
    const img = readFileSync(path);
    img.fill(0, 0, 64 * BS);
    writeFileSync(path, img);
    const r = await migrate(path, { to, name: 'big', strategy: 'full', auth: { key } });
    assert.ok(r.blocks.resumed > 100, `resumed ${r.blocks.resumed}`);
    assert.equal(r.blocks.zero, 64);
    assert.equal(r.blocks.repaired, 0, 'zeroed at the fingerprint phase, not repaired by the end-to-end check');
    assert.equal(r.blocks.sent + r.blocks.resumed, 2048 - 64);
    assert.deepEqual(readFileSync(join(dir, 'dst', 'big.img')), readFileSync(path));
    assert.equal(existsSync(join(dir, 'dst', 'big.img.journal')), false);
  });

  it('refuses names that escape the data directory, and does not overwrite unless asked', async () => {
    const { path } = makeSource('c.img');
    for (const name of ['../evil', '/etc/passwd', '.hidden', 'a/b', '', 'x'.repeat(200)]) {
      await assert.rejects(migrate(path, { to, name, auth: { key } }), (e: Error & { remoteCode?: string }) => e.remoteCode === ErrorCode.NAME_INVALID, name);
    }
    assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith('evil')), []);
    await migrate(path, { to, name: 'c', auth: { key } });
    await assert.rejects(migrate(path, { to, name: 'c', auth: { key } }), (e: Error & { remoteCode?: string }) => e.remoteCode === ErrorCode.IMAGE_EXISTS);
    writeFileSync(path, seededBytes(3, 100 * BS));
    await migrate(path, { to, name: 'c', auth: { key }, overwrite: true });
    assert.deepEqual(readFileSync(join(dir, 'dst', 'c.img')), readFileSync(path));
  });

  it('refuses a wrong key, an insecure client and a bad version, and keeps serving', async () => {
    const { path, data } = makeSource('d.img');
    await assert.rejects(migrate(path, { to, auth: { key: Buffer.from('another-key-of-32-bytes-00000000') } }), { code: ErrorCode.AUTH_FAILED });
    await assert.rejects(migrate(path, { to, auth: { insecure: true } }), { code: ErrorCode.AUTH_FAILED });
    const s = await tlsConnect({ host: '127.0.0.1', port: svc.address.port }, { mode: 'psk', key });
    const ch = new Channel(s);
    await ch.send(HELLO, { version: 99, flags: 0, capabilities: 0, nonce: Buffer.alloc(32) });
    await assert.rejects(ch.next(), { code: ErrorCode.PROTOCOL_VERSION });
    await migrate(path, { to, name: 'd', auth: { key } });
    assert.deepEqual(readFileSync(join(dir, 'dst', 'd.img')), data);
  });

  it('closes connections that send oversized, unknown or malformed frames, and keeps serving', async () => {
    const hostile = [
      encodeHeader(Msg.HELLO, 10).fill(0xff, 0, 4), // declared length past the limit
      Buffer.from([4, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]), // unknown type
      Buffer.from([0, 0, 0, 0, Msg.HELLO, 0, 7, 0, 0, 0, 0, 0]), // reserved bits set
      Buffer.from([0, 0, 0, 0, Msg.HELLO, 0x80, 0, 0, 0, 0, 0, 0]), // unknown flag
      Buffer.concat([encodeHeader(Msg.HELLO, 1000), Buffer.alloc(1000)]), // far larger than a HELLO: past the handshake limit
      Buffer.concat([encodeHeader(Msg.HELLO, 3), Buffer.from([1, 2, 3])]), // HELLO too short
    ];
    for (const bytes of hostile) {
      // Inside TLS (the key is known): the frame layer is what is under test.
      const s = await tlsConnect({ host: '127.0.0.1', port: svc.address.port }, { mode: 'psk', key });
      s.write(bytes);
      await new Promise<void>((resolve) => { s.on('close', () => resolve()); s.on('error', () => {}); s.resume(); });
    }
    // A handshaken client that then sends garbage mid-migration.
    const s = await tlsConnect({ host: '127.0.0.1', port: svc.address.port }, { mode: 'psk', key });
    const ch = new Channel(s);
    await clientHandshake(ch, { key });
    await ch.send(BEGIN, { name: 'garbage', size: 10 * BS, blockSize: BS, flags: 0, fills: 0, strategy: 'full' });
    await ch.recv(BEGIN_OK);
    await ch.sendFrame(Msg.BLOCKS, new Writer().u32(1).u64(999).u32(1).u64(0).done());
    await assert.rejects(ch.next(), (e: Error & { code?: string }) => e.code === ErrorCode.PROTOCOL || e.code === ErrorCode.CONNECTION);
    assert.equal(existsSync(join(dir, 'dst', 'garbage.img')), false);
    const { path, data } = makeSource('e.img');
    await migrate(path, { to, name: 'e', auth: { key } });
    assert.deepEqual(readFileSync(join(dir, 'dst', 'e.img')), data);
  });
});

describe('neighbourhood and concurrency', () => {
  it('never fills a block from a neighbour whose data no longer matches the index', async () => {
    const stale = join(dir, 'stale-neighbour.img');
    writeFileSync(stale, seededBytes(42, 64 * BS));
    const own = await DestinationService.start({ dataDir: join(dir, 'dst-stale'), auth: { key }, neighbours: [stale] });
    try {
      const src = join(dir, 'stale-src.img');
      const data = Buffer.from(seededBytes(42, 64 * BS));
      writeFileSync(src, data);
      // The neighbour changes after it was indexed: its first 16 blocks now hold other bytes.
      const changed = Buffer.from(data);
      changed.set(seededBytes(43, 16 * BS), 0);
      writeFileSync(stale, changed);
      const r = await migrate(src, { to: `127.0.0.1:${own.address.port}`, name: 'stale', auth: { key } });
      assert.equal(r.blocks.filledFromNeighbours, 48, 'only the blocks whose data still matches');
      assert.equal(r.blocks.sent, 16, 'the others are asked for and sent');
      assert.deepEqual(readFileSync(join(dir, 'dst-stale', 'stale.img')), data);
    } finally {
      await own.close();
    }
  });

  it('runs several migrations at once, and refuses a second one into the same name', async () => {
    const images = [0, 1, 2].map((i) => { const p = join(dir, `par${i}.img`); writeFileSync(p, seededBytes(600 + i, 512 * BS)); return p; });
    const slow = { bwlimit: 2 << 20 };
    const both = await Promise.allSettled([
      migrate(images[0]!, { to, name: 'par0', auth: { key }, ...slow }),
      migrate(images[1]!, { to, name: 'par1', auth: { key }, ...slow }),
      new Promise((r) => setTimeout(r, 150)).then(() => migrate(images[2]!, { to, name: 'par0', auth: { key } })),
    ]);
    assert.equal(both[0].status, 'fulfilled');
    assert.equal(both[1].status, 'fulfilled');
    assert.equal(both[2].status, 'rejected');
    assert.equal(((both[2] as PromiseRejectedResult).reason as { remoteCode?: string }).remoteCode, ErrorCode.BUSY);
    assert.deepEqual(readFileSync(join(dir, 'dst', 'par0.img')), readFileSync(images[0]!));
    assert.deepEqual(readFileSync(join(dir, 'dst', 'par1.img')), readFileSync(images[1]!));
  });
});

describe('frame decoder', () => {
  it('splits frames across any chunking and rejects what is past the limits', () => {
    const frames = [encodeHeader(Msg.READY, 0), Buffer.concat([encodeHeader(Msg.SYNC, 5), Buffer.from('hello')])];
    const all = Buffer.concat(frames);
    for (let cut = 0; cut <= all.length; cut++) {
      const d = new FrameDecoder();
      const got = [...d.push(all.subarray(0, cut)), ...d.push(all.subarray(cut))];
      assert.deepEqual(got.map((f) => [f.type, f.payload.toString()]), [[Msg.READY, ''], [Msg.SYNC, 'hello']]);
    }
    // Many frames of mixed sizes (0 bytes to 1 MiB), cut into random chunks of 1 byte to 200 KiB.
    const sizes = [0, 1, 12, 4096, 1 << 20, 0, 77, 65536 + 3];
    const many = Buffer.concat(sizes.map((n, i) => Buffer.concat([encodeHeader(Msg.BLOCKS, n, i), Buffer.alloc(n, i + 1)])));
    let seed = 7;
    const rnd = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
    for (let trial = 0; trial < 20; trial++) {
      const d = new FrameDecoder();
      const got: Array<{ id: number; n: number; ok: boolean }> = [];
      for (let at = 0; at < many.length; ) {
        const k = Math.max(1, Math.floor(rnd() ** 3 * 200_000));
        for (const f of d.push(many.subarray(at, at + k))) got.push({ id: f.id, n: f.payload.length, ok: f.payload.every((b) => b === f.id + 1) });
        at += k;
      }
      assert.deepEqual(got, sizes.map((n, i) => ({ id: i, n, ok: true })));
      assert.equal(d.pending, 0);
    }
    const big = Buffer.alloc(12); big.writeUInt32LE(MAX_PAYLOAD + 1, 0); big[4] = Msg.BLOCKS;
    assert.throws(() => new FrameDecoder().push(big), { code: ErrorCode.PROTOCOL });
    assert.throws(() => encodeHeader(Msg.BLOCKS, MAX_PAYLOAD + 1), { code: ErrorCode.PROTOCOL });
    const partial = new FrameDecoder();
    partial.push(frames[1]!.subarray(0, 10));
    assert.ok(partial.pending > 0, 'a connection closing now is mid-frame');
  });
});
