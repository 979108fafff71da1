// Conformance of the destination to docs/PROTOCOL.md, driven by raw frames:
// one test per rule of "A migration" and of the frame rules. After every
// violation the peer gets an ERROR frame with the documented code, an
// existing image of the same name is untouched, and the service keeps
// serving.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { removePartial } from '../src/roles/destination/partials.js';
import { migrate } from '../src/migrate/migrate.js';
import { Channel } from '../src/protocol/channel.js';
import { Msg, Writer, type MsgType } from '../src/protocol/frame.js';
import {
  BEGIN, BEGIN_OK, BEGIN_OVERWRITE, BLOCK_INFO, BLOCKS, COMMIT, COPY, DONE, INFO_END, NEED, ROUND, SYNC, SYNC_OK, VERIFY, VERIFY_RESULT, ZERO,
  encode, type VerifyExtent,
} from '../src/protocol/messages.js';
import { Engine } from '../src/engine/engine.js';
import { ErrorCode } from '../src/index.js';
import { seededBytes } from './util.js';
import { rawClient as connectRaw } from './raw-client.js';

const BS = 4096;
const key = Buffer.from('blockferry-conformance-key-01234');
const engine = new Engine();
let dir: string;
let data: string;
let svc: DestinationService;
let original: Buffer;

const rawClient = (port: number) => connectRaw(port, { key });

/** BEGIN for name; resolves once BEGIN_OK came back. */
async function begin(ch: Channel, name: string, size: number, flags = BEGIN_OVERWRITE): Promise<void> {
  await ch.send(BEGIN, { name, size, blockSize: BS, flags, fills: 0, strategy: 'conformance' });
  await ch.recv(BEGIN_OK);
}

const info = (start: number, bytes: Buffer) => ({ start, count: Math.ceil(bytes.length / BS), ...engine.fingerprints(bytes, BS) });
const blocksMsg = (start: number, bytes: Buffer) => ({ runs: [{ start, count: Math.ceil(bytes.length / BS) }], fingerprints: engine.fingerprints(bytes, BS).fingerprints, data: bytes });
const sha1 = (b: Uint8Array) => createHash('sha1').update(b).digest();

/** The next frame must be an ERROR with this code (the peer's code, as the protocol promises), then the connection closes. */
async function expectError(ch: Channel, code: string): Promise<void> {
  for (;;) {
    let f;
    try {
      f = await ch.next();
    } catch (e) {
      assert.equal((e as { remoteCode?: string }).remoteCode, code, `expected an ERROR frame ${code}, got ${(e as Error).message}`);
      await new Promise<void>((r) => { if (ch.socket.destroyed || ch.socket.readableEnded) r(); else { ch.socket.once('close', () => r()); ch.socket.resume(); } });
      return;
    }
    // NEEDs answering what was sent before the violation may come first.
    assert.equal(f.type, Msg.NEED, `expected ERROR ${code}, got frame type ${f.type}`);
  }
}

/** The existing image is untouched, the name is released, and the service still answers. */
async function stillFine(): Promise<void> {
  const active = (svc as unknown as { active: Map<string, unknown> }).active;
  for (let i = 0; i < 200 && active.size; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(active.size, 0, 'the session released its name');
  assert.deepEqual(readFileSync(join(data, 'keep.img')), original, 'the existing image is untouched');
  removePartial(data, 'keep');
  const ch = await rawClient(svc.address.port);
  await begin(ch, 'probe', BS, BEGIN_OVERWRITE);
  ch.close();
  for (let i = 0; i < 200 && active.size; i++) await new Promise((r) => setTimeout(r, 10));
}

/** A session on 'keep' (overwriting the complete image) up to BEGIN_OK. */
async function session(size = 16 * BS): Promise<Channel> {
  const ch = await rawClient(svc.address.port);
  await begin(ch, 'keep', size);
  return ch;
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'bf-conf-'));
  data = join(dir, 'dst');
  svc = await DestinationService.start({ dataDir: data, auth: { key } });
  const src = join(dir, 'keep.img');
  writeFileSync(src, seededBytes(9, 16 * BS));
  await migrate(src, { to: `127.0.0.1:${svc.address.port}`, name: 'keep', auth: { key } });
  original = readFileSync(join(data, 'keep.img'));
});
after(async () => { await svc.close(); rmSync(dir, { recursive: true, force: true }); });

describe('A migration: COMMIT', () => {
  it('commits an image that is all zeros (no BLOCK_INFO) once a VERIFY of its zero extent passed', async () => {
    const ch = await rawClient(svc.address.port);
    const size = 1 << 30;
    await begin(ch, 'zeros', size, 0);
    await ch.send(INFO_END, undefined);
    assert.equal((await ch.recv(NEED)).last, true);
    assert.deepEqual(await ch.request(VERIFY, [{ start: 0, count: size / BS }], VERIFY_RESULT), []);
    const done = await ch.request(COMMIT, undefined, DONE);
    assert.equal(done.received, 0);
    const st = statSync(join(data, 'zeros.img'));
    assert.equal(st.size, size);
    assert.ok(st.blocks * 512 < 1 << 20, 'sparse: nothing was written');
    ch.close();
  });

  it('refuses COMMIT before any VERIFY (an all-zero image too)', async () => {
    const ch = await session();
    await ch.send(INFO_END, undefined);
    await ch.recv(NEED);
    await ch.sendFrame(Msg.COMMIT, Buffer.alloc(0), 7);
    await expectError(ch, ErrorCode.PROTOCOL);
    await stillFine();
  });

  it('refuses COMMIT of blocks announced by BLOCK_INFO and never received, even after a passing zero VERIFY', async () => {
    const ch = await session();
    await ch.send(BLOCK_INFO, info(0, Buffer.from(seededBytes(1, 4 * BS))));
    await ch.send(INFO_END, undefined);
    assert.deepEqual(await ch.request(VERIFY, [{ start: 0, count: 16 }], VERIFY_RESULT), []);
    await ch.sendFrame(Msg.COMMIT, Buffer.alloc(0), 99);
    await expectError(ch, ErrorCode.PROTOCOL);
    await stillFine();
  });

  it('refuses COMMIT when something was written after the last VERIFY', async () => {
    const ch = await session();
    const b = Buffer.from(seededBytes(2, 2 * BS));
    await ch.send(BLOCK_INFO, info(0, b));
    await ch.send(BLOCKS, blocksMsg(0, b));
    await ch.send(INFO_END, undefined);
    assert.deepEqual(await ch.request(VERIFY, [{ start: 0, count: 2, digest: sha1(b) }, { start: 2, count: 14 }], VERIFY_RESULT), []);
    await ch.send(ZERO, [{ start: 1, count: 1 }]);
    await ch.sendFrame(Msg.COMMIT, Buffer.alloc(0), 99);
    await expectError(ch, ErrorCode.PROTOCOL);
    await stillFine();
  });

  it('refuses COMMIT after a VERIFY with differing extents, even when a later VERIFY of other extents passed', async () => {
    const ch = await session();
    const b = Buffer.from(seededBytes(3, 2 * BS));
    await ch.send(BLOCK_INFO, info(0, b));
    await ch.send(BLOCKS, blocksMsg(0, b));
    await ch.send(INFO_END, undefined);
    const [r1, r2] = await Promise.all([
      ch.request(VERIFY, [{ start: 0, count: 2, digest: Buffer.alloc(20) }], VERIFY_RESULT),
      ch.request(VERIFY, [{ start: 2, count: 14 }], VERIFY_RESULT),
    ]);
    assert.deepEqual([r1, r2], [[0], []]);
    await ch.sendFrame(Msg.COMMIT, Buffer.alloc(0), 99);
    await expectError(ch, ErrorCode.PROTOCOL);
    await stillFine();
  });
});

describe('A migration: fingerprints, transfer and VERIFY', () => {
  const cases: Array<[string, (ch: Channel) => Promise<void>]> = [
    ['BLOCK_INFO after INFO_END', async (ch) => { await ch.send(INFO_END, undefined); await ch.send(BLOCK_INFO, info(0, Buffer.from(seededBytes(4, BS)))); }],
    ['BLOCK_INFO runs out of order', async (ch) => { await ch.send(BLOCK_INFO, info(8, Buffer.from(seededBytes(4, BS)))); await ch.send(BLOCK_INFO, info(2, Buffer.from(seededBytes(5, BS)))); }],
    ['BLOCK_INFO runs overlapping', async (ch) => { await ch.send(BLOCK_INFO, info(2, Buffer.from(seededBytes(4, 4 * BS)))); await ch.send(BLOCK_INFO, info(5, Buffer.from(seededBytes(5, BS)))); }],
    ['BLOCK_INFO past the end', async (ch) => { await ch.send(BLOCK_INFO, info(14, Buffer.from(seededBytes(4, 4 * BS)))); }],
    ['BLOCK_INFO of more than 64 Ki blocks', async (ch) => {
      const n = 65537;
      await ch.sendFrame(Msg.BLOCK_INFO, new Writer().u64(0).u32(n).bytes(Buffer.alloc(16 * n)).done());
    }],
    ['BLOCKS outside the image', async (ch) => { await ch.send(INFO_END, undefined); await ch.send(BLOCKS, blocksMsg(16, Buffer.from(seededBytes(4, BS)))); }],
    ['COPY outside the image', async (ch) => { await ch.send(INFO_END, undefined); await ch.send(COPY, [{ dst: 100, src: 0, fingerprint: 0n }]); }],
    ['ZERO outside the image', async (ch) => { await ch.send(INFO_END, undefined); await ch.send(ZERO, [{ start: 10, count: 7 }]); }],
    ['VERIFY outside the image', async (ch) => { await ch.send(INFO_END, undefined); await ch.send(VERIFY, [{ start: 15, count: 2 }], 5); }],
    ['BLOCKS before its BLOCK_INFO', async (ch) => { await ch.send(BLOCKS, blocksMsg(0, Buffer.from(seededBytes(4, BS)))); }],
    ['COPY before its BLOCK_INFO', async (ch) => { await ch.send(COPY, [{ dst: 3, src: 0, fingerprint: 0n }]); }],
    ['a fingerprint mismatch', async (ch) => {
      const b = Buffer.from(seededBytes(6, BS));
      await ch.send(BLOCK_INFO, info(0, b));
      const m = blocksMsg(0, b);
      m.fingerprints[0]! ^= 1n;
      await ch.send(BLOCKS, m);
    }],
    ['a VERIFY data extent over 16 MiB', async (ch) => {
      await ch.send(INFO_END, undefined);
      await ch.send(VERIFY, [{ start: 0, count: (16 << 20) / BS + 1, digest: Buffer.alloc(20) }], 5);
    }],
    ['a VERIFY of more than 64 Ki extents', async (ch) => {
      await ch.send(INFO_END, undefined);
      await ch.send(VERIFY, Array.from({ length: 65537 }, (): VerifyExtent => ({ start: 0, count: 1 })), 5);
    }],
    ['ROUND with a payload longer than its message', async (ch) => { await ch.sendFrame(Msg.ROUND, Buffer.concat([encode(ROUND, { round: 1 }), Buffer.from([0])])); }],
    ['SYNC with a payload', async (ch) => { await ch.sendFrame(Msg.SYNC, Buffer.from([1]), 5); }],
    ['COMMIT with a payload', async (ch) => { await ch.send(INFO_END, undefined); await ch.sendFrame(Msg.COMMIT, Buffer.from([1]), 5); }],
    ['an empty SYNC is fine, then INFO_END twice', async (ch) => { assert.deepEqual(await ch.request(SYNC, undefined, SYNC_OK), undefined); await ch.send(INFO_END, undefined); await ch.send(INFO_END, undefined); }],
    ['an unknown message type (ERROR before the close, from the framing layer)', async (ch) => { await ch.sendFrame(99 as MsgType, Buffer.from([1, 2, 3])); }],
    ['a frame with unknown flags', async (ch) => { ch.socket.write(Buffer.from([0, 0, 0, 0, Msg.SYNC, 0x40, 0, 0, 0, 0, 0, 0])); }],
  ];
  for (const [rule, act] of cases) {
    it(`answers ${rule} with ERROR ${ErrorCode.PROTOCOL}, keeps the image and keeps serving`, async () => {
      const ch = await session();
      await act(ch);
      await expectError(ch, ErrorCode.PROTOCOL);
      await stillFine();
    });
  }

  it('refuses a short block that is not last in its BLOCKS frame', async () => {
    const size = 4 * BS + 100;
    const ch = await rawClient(svc.address.port);
    await begin(ch, 'keep', size);
    const all = Buffer.from(seededBytes(7, size));
    await ch.send(BLOCK_INFO, info(0, all));
    const short = all.subarray(4 * BS), first = all.subarray(0, BS);
    await ch.send(BLOCKS, {
      runs: [{ start: 4, count: 1 }, { start: 0, count: 1 }],
      fingerprints: BigUint64Array.from([engine.fingerprints(short, BS).fingerprints[0]!, engine.fingerprints(first, BS).fingerprints[0]!]),
      data: Buffer.concat([short, first]),
    });
    await expectError(ch, ErrorCode.PROTOCOL);
    await stillFine();
  });

  it('a complete raw migration that keeps every rule is committed', async () => {
    const ch = await session();
    const b = Buffer.from(seededBytes(8, 16 * BS));
    await ch.send(BLOCK_INFO, info(0, b));
    await ch.send(BLOCKS, blocksMsg(0, b));
    await ch.send(INFO_END, undefined);
    assert.deepEqual(await ch.request(SYNC, undefined, SYNC_OK), undefined);
    assert.deepEqual(await ch.request(VERIFY, [{ start: 0, count: 16, digest: sha1(b) }], VERIFY_RESULT), []);
    await ch.request(COMMIT, undefined, DONE);
    ch.close();
    assert.deepEqual(readFileSync(join(data, 'keep.img')), b);
    assert.equal(existsSync(join(data, 'keep.img.journal')), false);
    original = b;
  });
});
