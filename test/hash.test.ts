// SHA-1 and XXH3 of the WASM core against two independent oracles each:
// node:crypto and hash-wasm for SHA-1, hash-wasm's xxhash3 (and golden
// vectors) for the fingerprint.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { sha1 as hwSha1, xxhash3 } from 'hash-wasm';
import { Engine, DIGEST_BYTES, ErrorCode } from '../src/index.js';
import { seededBytes, testBackends } from './util.js';

const wasmEngine = new Engine({ initialBytes: 8 << 20, backend: 'wasm' });
const nodeSha1 = (d: Uint8Array) => createHash('sha1').update(d).digest('hex');
const hex = (d: Uint8Array) => Buffer.from(d).toString('hex');
const xxh = async (d: Uint8Array) => BigInt('0x' + (await xxhash3(d, 0, 0)));

// One suite, every backend: native (when built), WASM, node:crypto.
for (const backend of testBackends()) {
const engine = new Engine({ initialBytes: 8 << 20, backend });
describe(`SHA-1 on the ${backend} backend`, () => {
  it('matches the FIPS 180 examples', () => {
    assert.equal(hex(engine.sha1(Buffer.from('abc'))), 'a9993e364706816aba3e25717850c26c9cd0d89d');
    assert.equal(hex(engine.sha1(new Uint8Array(0))), 'da39a3ee5e6b4b0d3255bfef95601890afd80709');
    const two = Buffer.from('abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq');
    assert.equal(hex(engine.sha1(two)), '84983e441c3bd26ebaae4aa1f95129e5e54670f1');
  });

  it('equals node:crypto and hash-wasm for every length 0..300 and past chunk edges', async () => {
    const data = seededBytes(1, 70_000);
    const lengths = [...Array(301).keys(), 447, 448, 511, 512, 513, 4095, 4096, 4097, 65_535, 65_536, 65_537];
    for (const len of lengths) {
      const d = data.subarray(3, 3 + len);
      const mine = hex(engine.sha1(d));
      assert.equal(mine, nodeSha1(d), `length ${len} vs node:crypto`);
      assert.equal(mine, await hwSha1(d), `length ${len} vs hash-wasm`);
    }
  });

  it('hashes data at every alignment in place (zero-copy path)', () => {
    const region = engine.alloc(8192 + 64);
    const out = engine.alloc(DIGEST_BYTES);
    const data = seededBytes(2, 8192);
    for (let shift = 0; shift < 64; shift++) {
      engine.view(region, shift, 8192).set(data);
      for (const len of [0, 1, 55, 56, 64, 119, 4096, 8192]) {
        engine.sha1At(region.ptr + shift, len, out.ptr);
        assert.equal(hex(engine.view(out)), nodeSha1(data.subarray(0, len)), `shift ${shift} length ${len}`);
      }
    }
  });

  it('hashes many blocks per call for every block size 512 B..1 MiB, any count, short final block', async () => {
    for (let bs = 512; bs <= 1 << 20; bs *= 2) {
      const counts = bs <= 65536 ? [1, 2, 3, 4, 5, 6, 7, 8, 9, 13] : [1, 3, 5];
      for (const n of counts) {
        for (const tail of [0, 1, 63, 64, 65, bs - 1]) {
          if (bs > 65536 && tail !== 0 && tail !== 65) continue;
          const data = seededBytes(bs + n + tail, n * bs + tail);
          const digests = engine.sha1Blocks(data, bs);
          const blocks = n + (tail ? 1 : 0);
          assert.equal(digests.length, blocks * DIGEST_BYTES);
          for (let i = 0; i < blocks; i++) {
            const block = data.subarray(i * bs, Math.min(data.length, (i + 1) * bs));
            const mine = hex(digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES));
            assert.equal(mine, nodeSha1(block), `bs ${bs} n ${n} tail ${tail} block ${i}`);
            if (i === blocks - 1) assert.equal(mine, await hwSha1(block));
          }
        }
      }
    }
  });

  it('gives each lane its own message: blocks that differ in one byte get different digests', () => {
    const bs = 4096;
    const data = new Uint8Array(8 * bs);
    for (let i = 0; i < 8; i++) data[i * bs + bs - 1] = i;
    const digests = engine.sha1Blocks(data, bs);
    const seen = new Set<string>();
    for (let i = 0; i < 8; i++) {
      const d = hex(digests.subarray(i * 20, i * 20 + 20));
      assert.equal(d, nodeSha1(data.subarray(i * bs, (i + 1) * bs)));
      seen.add(d);
    }
    assert.equal(seen.size, 8);
  });

  it('rejects bad block sizes and ranges with stable codes', () => {
    for (const bs of [0, 256, 511, 513, 3000, 2 << 20, NaN, -4096, '4096']) {
      assert.throws(() => engine.sha1Blocks(new Uint8Array(10), bs as number), { code: ErrorCode.BAD_BLOCK_SIZE });
    }
    assert.throws(() => engine.sha1At(0, 10, 2048), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => engine.sha1At(2048, engine.memory.buffer.byteLength, 4096), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => engine.sha1('abc' as unknown as Uint8Array), { code: ErrorCode.INVALID_ARGUMENT });
  });
});

}

const engine = wasmEngine;
describe('XXH3-64 fingerprint', () => {
  it('matches the reference golden values', () => {
    assert.equal(engine.xxh3(new Uint8Array(0)), 0x2d06800538d394c2n);
    assert.equal(engine.xxh3(Buffer.from('a')), 0xe6c632b61e964e1fn);
  });

  it('equals hash-wasm xxhash3 for every length 0..300 and around every path edge', async () => {
    const data = seededBytes(3, 1 << 17);
    const lengths = [...Array(301).keys()];
    for (const edge of [1024, 2048, 4096, 8192, 65536]) lengths.push(edge - 65, edge - 64, edge - 1, edge, edge + 1, edge + 63, edge + 64);
    for (const len of lengths) {
      for (const shift of [0, 5]) {
        const d = data.subarray(shift, shift + len);
        assert.equal(engine.xxh3(d), await xxh(d), `length ${len} shift ${shift}`);
      }
    }
  });

  it('fingerprints and signs every block of a region, short final block included', async () => {
    for (const bs of [512, 1024, 4096, 65536]) {
      for (const tail of [0, 1, 8, 15, 16, 17, 240, 241]) {
        const n = 5;
        const data = seededBytes(bs ^ tail, n * bs + tail);
        const { fingerprints, signatures } = engine.fingerprints(data, bs);
        const blocks = n + (tail ? 1 : 0);
        assert.equal(fingerprints.length, blocks);
        for (let i = 0; i < blocks; i++) {
          const block = Buffer.from(data.subarray(i * bs, Math.min(data.length, (i + 1) * bs)));
          assert.equal(fingerprints[i], await xxh(block), `bs ${bs} tail ${tail} block ${i}`);
          const padded = Buffer.alloc(16);
          block.copy(padded, 0, 0, Math.min(16, block.length));
          assert.equal(signatures[i], padded.readBigUInt64LE(8), `signature bs ${bs} tail ${tail} block ${i}`);
        }
      }
    }
  });

  it('writes fingerprints and signatures in place at unaligned data offsets', async () => {
    const bs = 4096, n = 7;
    const data = seededBytes(9, n * bs + 100);
    const region = engine.alloc(data.length + 64);
    const fps = engine.alloc(8 * (n + 1));
    const sigs = engine.alloc(8 * (n + 1));
    for (const shift of [1, 3, 7, 13]) {
      engine.view(region, shift, data.length).set(data);
      const count = engine.fingerprintBlocksAt(region.ptr + shift, data.length, bs, fps.ptr, sigs.ptr);
      assert.equal(count, n + 1);
      const got = engine.view64(fps);
      for (let i = 0; i <= n; i++) assert.equal(got[i], await xxh(data.subarray(i * bs, Math.min(data.length, (i + 1) * bs))));
    }
    assert.throws(() => engine.fingerprintBlocksAt(region.ptr, data.length, bs, fps.ptr + 4, 0), { code: ErrorCode.INVALID_ARGUMENT });
  });
});
