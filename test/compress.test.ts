// Compression on the wire, end to end over TCP: a real ext4 image compresses
// and arrives byte-identical; a destination that refuses compression gets
// plain frames; a corrupted compressed frame and a decompression bomb are
// protocol errors that leave nothing committed, and the service keeps serving.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { Channel } from '../src/protocol/channel.js';
import { clientHandshake, CAP_ZSTD } from '../src/protocol/handshake.js';
import { BEGIN, BEGIN_OK, BLOCK_INFO, INFO_END, NEED } from '../src/protocol/messages.js';
import { encodeHeader, FLAG_COMPRESSED, Msg, Writer } from '../src/protocol/frame.js';
import { CodecId, createCompressor } from '../src/protocol/codec.js';
import { ErrorCode } from '../src/index.js';
import { duplicateHeavyPair, type ImagePair } from './fixtures.js';

let pair: ImagePair;
let dir: string;

before(async () => {
  pair = await duplicateHeavyPair();
  dir = mkdtempSync(join(tmpdir(), 'bf-zstd-'));
});
after(() => rmSync(dir, { recursive: true, force: true }));

describe('compression on the wire', () => {
  it('zstd: a real filesystem image crosses in fewer bytes and arrives byte-identical', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'a'), auth: { insecure: true } });
    try {
      const plain = await migrate(pair.newer, { to: `127.0.0.1:${svc.address.port}`, name: 'plain', strategy: 'full', auth: { insecure: true }, compress: { mode: 'none' } });
      const z = await migrate(pair.newer, { to: `127.0.0.1:${svc.address.port}`, name: 'z', strategy: 'full', auth: { insecure: true }, compress: { mode: 'zstd', level: 3 } });
      assert.deepEqual(readFileSync(join(dir, 'a', 'z.img')), readFileSync(pair.newer));
      assert.equal(plain.wire.sent.data, plain.wire.sentRaw.data, 'none: nothing compressed');
      assert.equal(z.blocks.sent, plain.blocks.sent, 'the same blocks crossed');
      assert.ok(z.wire.sent.data < 0.7 * plain.wire.sent.data, `zstd data ${z.wire.sent.data} vs ${plain.wire.sent.data}`);
      assert.equal(z.wire.sentRaw.data, plain.wire.sent.data, 'before compression, the same bytes');
      assert.equal(z.blocks.repaired, 0);
    } finally {
      await svc.close();
    }
  });

  it('a destination that refuses compression gets plain frames, and the copy is the same', async () => {
    const svc = await DestinationService.start({ dataDir: join(dir, 'b'), auth: { insecure: true }, compression: false });
    try {
      const r = await migrate(pair.older, { to: `127.0.0.1:${svc.address.port}`, name: 'o', strategy: 'full', auth: { insecure: true }, compress: { mode: 'zstd' } });
      assert.equal(r.wire.sent.data, r.wire.sentRaw.data, 'nothing was compressed');
      assert.deepEqual(readFileSync(join(dir, 'b', 'o.img')), readFileSync(pair.older));
    } finally {
      await svc.close();
    }
  });

  /** A session up to the first NEED, so that BLOCKS are allowed; returns the channel. */
  async function session(port: number, name: string): Promise<Channel> {
    const s = connect(port, '127.0.0.1');
    await new Promise((r) => s.once('connect', r));
    const ch = new Channel(s);
    const caps = await clientHandshake(ch, { insecure: true });
    assert.ok(caps & CAP_ZSTD);
    await ch.send(BEGIN, { name, size: 64 * 4096, blockSize: 4096, flags: 0, fills: 0, strategy: 'full' });
    await ch.recv(BEGIN_OK);
    await ch.send(BLOCK_INFO, { start: 0, count: 1, fingerprints: new BigUint64Array([1n]), signatures: new BigUint64Array([2n]) });
    await ch.send(INFO_END, undefined);
    await ch.recv(NEED);
    await ch.recv(NEED);
    return ch;
  }

  function compressedFrame(type: number, declared: number, body: Buffer): Buffer {
    const len = Buffer.alloc(4);
    len.writeUInt32LE(declared);
    return Buffer.concat([encodeHeader(type as never, body.length + 4, 0, FLAG_COMPRESSED), len, body]);
  }

  for (const [what, frame] of [
    ['a corrupted compressed frame', () => {
      const z = createCompressor(CodecId.ZSTD, 3).compress(new Writer().u32(1).u64(0).u32(1).u64(0).bytes(Buffer.alloc(4096, 7)).done());
      z[Math.floor(z.length / 2)]! ^= 0xff;
      z[z.length - 3]! ^= 0x55;
      return compressedFrame(Msg.BLOCKS, 4096 + 32, z);
    }],
    ['a decompression bomb (64 MiB of zeros declared as 1 MiB)', () => compressedFrame(Msg.BLOCKS, 1 << 20, createCompressor(CodecId.ZSTD, 3).compress(Buffer.alloc(64 << 20)))],
    ['a frame declaring more than the frame limit', () => compressedFrame(Msg.BLOCKS, 0xffffffff, Buffer.alloc(16))],
  ] as const) {
    it(`${what} ends the session with ERR_BF_PROTOCOL; nothing is committed; the service keeps serving`, async () => {
      const svc = await DestinationService.start({ dataDir: join(dir, 'c'), auth: { insecure: true } });
      try {
        const ch = await session(svc.address.port, 'bomb');
        const bytes = frame();
        const rss = process.memoryUsage().rss;
        ch.socket.write(bytes);
        await assert.rejects(ch.next(), (e: Error & { code?: string; remoteCode?: string }) => e.code === ErrorCode.PROTOCOL || e.code === ErrorCode.CONNECTION);
        assert.ok(process.memoryUsage().rss - rss < 48 << 20, 'the bomb was not inflated');
        assert.equal(existsSync(join(dir, 'c', 'bomb.img')), false);
        const r = await migrate(pair.older, { to: `127.0.0.1:${svc.address.port}`, name: 'after', strategy: 'full', auth: { insecure: true }, overwrite: true });
        assert.equal(r.verified, true);
      } finally {
        await svc.close();
      }
    });
  }
});
