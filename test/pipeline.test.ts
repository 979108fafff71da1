// The channel's pipelined compression (compression on a worker thread): over
// a real TCP connection, data frames compressed off-thread and control frames
// sent plainly arrive in the order they were sent, byte for byte, from
// several senders at once; close() ends the connection only after every
// frame queued before it; a compressor whose thread is gone fails the send
// with a typed error instead of hanging.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, type Socket } from 'node:net';
import { randomBytes } from 'node:crypto';
import { Channel } from '../src/protocol/channel.js';
import { CAP_ZSTD } from '../src/protocol/handshake.js';
import { compressorFor, decompressorFor } from '../src/protocol/compression.js';
import { FLAG_COMPRESSED, Msg } from '../src/protocol/frame.js';
import { ErrorCode } from '../src/index.js';

async function pairOfChannels(): Promise<{ a: Channel; b: Channel; records: Array<{ type: string; compressed: boolean }>; done: () => void }> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  const accepted = new Promise<Socket>((r) => server.once('connection', r));
  const s1 = connect(port, '127.0.0.1');
  await new Promise<void>((r) => s1.once('connect', r));
  const s2 = await accepted;
  const records: Array<{ type: string; compressed: boolean }> = [];
  const a = new Channel(s1);
  const b = new Channel(s2, { onFrame: (f) => { if (f.direction === 'received') records.push({ type: f.type, compressed: f.compressed }); } });
  b.setFrameLimit(64 << 20);
  a.setCodec(compressorFor(CAP_ZSTD, { mode: 'zstd', level: 3 }), undefined);
  b.setCodec(undefined, decompressorFor(CAP_ZSTD));
  return { a, b, records, done: () => { s1.destroy(); s2.destroy(); server.close(); } };
}

/** A payload that compresses (repeated text with some random bytes), tagged with its index. */
function payload(i: number, size: number): Buffer {
  const p = Buffer.alloc(size, `frame ${i} `);
  randomBytes(64).copy(p, 16);
  p.writeUInt32LE(i, 0);
  return p;
}

describe('pipelined compression', () => {
  it('frames arrive in send order and byte for byte, compressed and plain, from two senders at once; close() waits for them', async () => {
    const { a, b, records, done } = await pairOfChannels();
    try {
      const sent: Array<{ type: number; bytes: Buffer }> = [];
      const blocks = (async () => {
        for (let i = 0; i < 40; i++) {
          const p = payload(i, i % 5 === 0 ? 300 : (1 << 20) - i * 1000); // some under the compression threshold
          sent.push({ type: Msg.BLOCKS, bytes: Buffer.from(p) });
          await a.sendFrame(Msg.BLOCKS, p);
          if (p.length >= 512) p.fill(0); // a frame handed to the compressor is copied: the caller may reuse its buffer
        }
      })();
      const control = (async () => {
        for (let i = 0; i < 40; i++) {
          const p = Buffer.from(`sync ${i}`);
          sent.push({ type: Msg.ROUND, bytes: Buffer.from(p) });
          await a.sendFrame(Msg.ROUND, p);
        }
      })();
      await Promise.all([blocks, control]);
      a.close();
      const got: Array<{ type: number; bytes: Buffer }> = [];
      for (;;) {
        const f = await b.nextOrEnd();
        if (!f) break;
        got.push({ type: f.type, bytes: Buffer.from(f.payload) });
      }
      assert.equal(got.length, sent.length, 'every frame, then the end');
      for (let i = 0; i < sent.length; i++) {
        assert.equal(got[i]!.type, sent[i]!.type, `frame ${i}: type`);
        assert.ok(got[i]!.bytes.equals(sent[i]!.bytes), `frame ${i}: bytes ${got[i]!.bytes.length} ${sent[i]!.bytes.length} ${got[i]!.bytes.subarray(0, 24).toString("hex")} ${sent[i]!.bytes.subarray(0, 24).toString("hex")}`);
      }
      // The large data frames went compressed, the small ones and the control frames plain.
      const data = records.filter((r) => r.type === 'BLOCKS');
      assert.equal(data.filter((r) => r.compressed).length, 32);
      assert.ok(records.filter((r) => r.type === 'ROUND').every((r) => !r.compressed));
      assert.ok(a.sent.data < a.sentRaw.data / 4, `compressed: ${a.sent.data} of ${a.sentRaw.data}`);
      assert.equal(FLAG_COMPRESSED, 1);
    } finally {
      done();
    }
  });

  it('a send after the channel failed rejects with ERR_BF_CONNECTION; nothing hangs', async () => {
    const { a, b, done } = await pairOfChannels();
    try {
      await a.sendFrame(Msg.BLOCKS, payload(1, 1 << 20));
      b.socket.destroy();
      await assert.rejects(async () => {
        for (let i = 0; i < 200; i++) await a.sendFrame(Msg.BLOCKS, payload(i, 1 << 20));
      }, (e: Error & { code?: string }) => e.code === ErrorCode.CONNECTION);
    } finally {
      done();
    }
  });
});
