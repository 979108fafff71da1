// SnapMig's messages (70–77) against docs/PROTOCOL.md: every decoder's
// limits (counts, lengths, flags, order of ranges, identity size), random
// corruption of valid payloads (a ProtocolError or a valid message, never
// another exception), and the phases: each message refused where it does
// not belong, with the documented code, and the service still serving.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { DestinationService } from '../src/roles/destination/service.js';
import { BackupService } from '../src/roles/backup/service.js';
import { Channel } from '../src/protocol/channel.js';
import { CAP_SNAPMIG, CAPABILITIES, clientHandshake } from '../src/protocol/handshake.js';
import { connect as tlsConnect } from '../src/transport/tls.js';
import { Msg } from '../src/protocol/frame.js';
import {
  BEGIN, BEGIN_OK, CHAIN_BEGIN, CHAIN_BEGIN_OK, CHAIN_COMMIT, CHAIN_DONE, LAYERS, LAYERS_RESULT, SEND_LAYER, SEND_LAYER_RESULT,
  MAX_CHAIN_LAYERS, MAX_LAYERS_LISTED, decode, encode, type MessageDef,
} from '../src/protocol/messages.js';
import { ErrorCode, ProtocolError } from '../src/errors.js';
import { seededBytes } from './util.js';

const key = randomBytes(32);
const ID = 'ab'.repeat(32);
let dir: string;
let dst: DestinationService;
let bk: BackupService;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'bfF-proto-'));
  writeFileSync(join(dir, 'base.raw'), seededBytes(7, 1 << 20));
  dst = await DestinationService.start({ dataDir: join(dir, 'dst'), auth: { key } });
  bk = await BackupService.start({ dataDir: join(dir, 'bk'), images: [join(dir, 'base.raw')], auth: { key } });
});
after(async () => { await bk.close(); await dst.close(); rmSync(dir, { recursive: true, force: true }); });

async function client(port: number, caps = CAPABILITIES | CAP_SNAPMIG): Promise<Channel> {
  const s = await tlsConnect({ host: '127.0.0.1', port }, { mode: 'psk', key });
  s.on('error', () => {});
  const ch = new Channel(s);
  await clientHandshake(ch, { key }, caps);
  return ch;
}

async function refused(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => (e as { remoteCode?: string }).remoteCode === code || (e as { code?: string }).code === code);
}

const samples: [MessageDef<any>, unknown][] = [ // eslint-disable-line @typescript-eslint/no-explicit-any
  [LAYERS_RESULT, [{ identity: ID, depth: 2, dataBytes: 4096, size: 1 << 20 }]],
  [SEND_LAYER, { identity: ID, to: '10.0.0.1:4000', name: 'vm.L0', flags: 1 }],
  [SEND_LAYER_RESULT, { blocksSent: 3, wireBytes: 5000, milliseconds: 12 }],
  [CHAIN_BEGIN, { name: 'vm', layers: [{ image: 'vm.L0', identity: ID }, { image: 'vm.L1', identity: '0'.repeat(64) }] }],
  [CHAIN_BEGIN_OK, [0, 1, 2]],
  [CHAIN_COMMIT, { name: 'vm', size: 1 << 20, flags: 1, layers: [{ image: 'vm.L0', identity: ID, check: true, bottom: true, size: 1 << 20, covered: [{ offset: 0, length: 65536 }, { offset: 131072, length: 65536 }] }] }],
  [CHAIN_DONE, { verdicts: [0, 1, 2], written: false }],
];

describe('SnapMig messages: layouts and limits', () => {
  it('round-trips every message', () => {
    for (const [d, m] of samples) assert.deepEqual(decode(d, encode(d, m)), m, d.name);
  });

  it('refuses short and long payloads, over-large counts, unknown flags, bad identities and disordered ranges', () => {
    const bad = (d: MessageDef<unknown>, b: Buffer, why: string) => assert.throws(() => decode(d, b), (e: unknown) => e instanceof ProtocolError && e.code === ErrorCode.PROTOCOL, `${d.name}: ${why}`);
    for (const [d, m] of samples) {
      const b = encode(d, m);
      bad(d, b.subarray(0, b.length - 1), 'short');
      bad(d, Buffer.concat([b, Buffer.alloc(1)]), 'long');
    }
    const u32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(n); return b; };
    bad(LAYERS_RESULT, Buffer.concat([u32(MAX_LAYERS_LISTED + 1), Buffer.alloc((MAX_LAYERS_LISTED + 1) * 49)]), 'too many stacks');
    bad(LAYERS_RESULT, u32(0xffffffff), 'a count the payload cannot hold');
    const depth0 = encode(LAYERS_RESULT, [{ identity: ID, depth: 1, dataBytes: 0, size: 10 }]); depth0[4 + 32] = 0;
    bad(LAYERS_RESULT, depth0, 'depth 0');
    const moreData = encode(LAYERS_RESULT, [{ identity: ID, depth: 1, dataBytes: 11, size: 10 }]);
    bad(LAYERS_RESULT, moreData, 'more data than the layer');
    const flags = encode(SEND_LAYER, { identity: ID, to: 'h:1', name: 'n', flags: 1 }); flags.writeUInt32LE(2, flags.length - 4);
    bad(SEND_LAYER, flags, 'unknown flag');
    bad(SEND_LAYER, encode(SEND_LAYER, { identity: ID, to: 'h:1'.padEnd(300, '1'), name: 'n', flags: 0 }), 'target over 255 bytes');
    bad(SEND_LAYER, Buffer.alloc(31), 'identity short');
    assert.throws(() => encode(SEND_LAYER, { identity: 'abcd', to: 'h:1', name: 'n', flags: 0 }), ProtocolError);
    bad(CHAIN_BEGIN, encode(CHAIN_BEGIN, { name: 'vm', layers: [] } as never), 'no layers');
    const many = { name: 'vm', layers: Array.from({ length: MAX_CHAIN_LAYERS + 1 }, (_, i) => ({ image: `v${i}`, identity: ID })) };
    bad(CHAIN_BEGIN, encode(CHAIN_BEGIN, many), 'more layers than a chain has');
    bad(CHAIN_BEGIN_OK, encode(CHAIN_BEGIN_OK, [3]), 'state 3');
    const layer = { image: 'vm.L0', identity: ID, check: true, bottom: false, size: 1 << 20 };
    bad(CHAIN_COMMIT, encode(CHAIN_COMMIT, { name: 'vm', size: 1, flags: 0, layers: [{ ...layer, covered: [{ offset: 65536, length: 10 }, { offset: 0, length: 10 }] }] }), 'ranges out of order');
    bad(CHAIN_COMMIT, encode(CHAIN_COMMIT, { name: 'vm', size: 1, flags: 0, layers: [{ ...layer, covered: [{ offset: 0, length: 0 }] }] }), 'an empty range');
    bad(CHAIN_COMMIT, encode(CHAIN_COMMIT, { name: 'vm', size: 1, flags: 0, layers: [{ ...layer, covered: [{ offset: (1 << 20) - 10, length: 11 }] }] }), 'a range past the layer');
    bad(CHAIN_COMMIT, encode(CHAIN_COMMIT, { name: 'vm', size: 1, flags: 8, layers: [{ ...layer, covered: [] }] }), 'unknown flag');
    bad(CHAIN_DONE, encode(CHAIN_DONE, { verdicts: [3], written: false }), 'verdict 3');
  });

  it('random corruption of valid payloads gives a ProtocolError or a message, never another exception', () => {
    let seed = 1;
    const rnd = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed; };
    for (const [d, m] of samples) {
      const good = encode(d, m);
      for (let k = 0; k < 2000; k++) {
        const b = Buffer.from(good);
        for (let f = 0; f <= rnd() % 3; f++) b[rnd() % b.length] = rnd() & 255;
        try { decode(d, b.subarray(0, rnd() % 8 === 0 ? rnd() % b.length : b.length)); } catch (e) { assert.ok(e instanceof ProtocolError, `${d.name}: ${(e as Error).message}`); }
      }
    }
  });
});

describe('SnapMig messages: phases', () => {
  it('a destination refuses SnapMig messages from a peer without capability 128, and inside a migration', async () => {
    const a = await client(dst.address.port, CAPABILITIES);
    await refused(a.request(CHAIN_BEGIN, { name: 'vm', layers: [{ image: 'vm.L0', identity: ID }] }, CHAIN_BEGIN_OK), ErrorCode.PROTOCOL);
    const b = await client(dst.address.port);
    await b.send(BEGIN, { name: 'inside', size: 4096, blockSize: 4096, flags: 0, fills: 0, strategy: 't' });
    await b.recv(BEGIN_OK);
    await refused(b.request(CHAIN_COMMIT, { name: 'vm', size: 1, flags: 0, layers: [{ image: 'vm.L0', identity: ID, check: false, bottom: true, size: 1, covered: [] }] }, CHAIN_DONE), ErrorCode.PROTOCOL);
    const c = await client(dst.address.port);
    await refused(c.request(LAYERS, undefined, LAYERS_RESULT), ErrorCode.PROTOCOL);
    // Still serving: a chain connection works.
    const d = await client(dst.address.port);
    assert.deepEqual(await d.request(CHAIN_BEGIN, { name: 'vm', layers: [{ image: 'vm.L0', identity: ID }] }, CHAIN_BEGIN_OK), [0]);
    d.close();
  });

  it('a destination refuses chain and layer names that are not plain file names, and says a missing layer is missing', async () => {
    const a = await client(dst.address.port);
    await refused(a.request(CHAIN_BEGIN, { name: '../etc', layers: [{ image: 'vm.L0', identity: ID }] }, CHAIN_BEGIN_OK), ErrorCode.NAME_INVALID);
    const b = await client(dst.address.port);
    await refused(b.request(CHAIN_BEGIN, { name: 'vm', layers: [{ image: 'x/../../y', identity: ID }] }, CHAIN_BEGIN_OK), ErrorCode.NAME_INVALID);
    const c = await client(dst.address.port);
    const done = await c.request(CHAIN_COMMIT, { name: 'vm2', size: 4096, flags: 1, layers: [{ image: 'vm2.L0', identity: ID, check: true, bottom: true, size: 4096, covered: [{ offset: 0, length: 4096 }] }] }, CHAIN_DONE);
    assert.deepEqual(done, { verdicts: [2], written: false });
    assert.equal(existsSync(join(dir, 'dst', 'vm2.img')), false);
    c.close();
  });

  it('a backup server answers LAYERS and SEND_LAYER only, refuses a layer it does not hold, and keeps serving', async () => {
    const a = await client(bk.address.port, CAP_SNAPMIG);
    const held = await a.request(LAYERS, undefined, LAYERS_RESULT);
    assert.equal(held.length, 1);
    assert.equal(held[0]!.size, 1 << 20);
    await refused(a.request(SEND_LAYER, { identity: 'cd'.repeat(32), to: `127.0.0.1:${dst.address.port}`, name: 'x', flags: 0 }, SEND_LAYER_RESULT), ErrorCode.LAYER_NOT_HELD);
    const b = await client(bk.address.port, CAP_SNAPMIG);
    await b.send(BEGIN, { name: 'vm', size: 4096, blockSize: 4096, flags: 0, fills: 0, strategy: 't' });
    await refused(b.next(), ErrorCode.PROTOCOL);
    const c = await client(bk.address.port, CAP_SNAPMIG);
    await refused(c.request(SEND_LAYER, { identity: held[0]!.identity, to: `127.0.0.1:${dst.address.port}`, name: '../escape', flags: 0 }, SEND_LAYER_RESULT), ErrorCode.NAME_INVALID);
    const d = await client(bk.address.port, CAP_SNAPMIG);
    const r = await d.request(SEND_LAYER, { identity: held[0]!.identity, to: `127.0.0.1:${dst.address.port}`, name: 'sent', flags: 0 }, SEND_LAYER_RESULT);
    assert.equal(r.blocksSent, 256);
    d.close();
    void Msg;
  });
});
