// The block index: lookups need fingerprint AND signature; forced collisions;
// growth; serialisation round trip; every kind of damaged file refused.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  BlockIndexTable, Engine, ErrorCode, makeRef, refBlock, refImage, NO_REF, MAX_LOAD, MAX_IMAGE_ID, MAX_BLOCK_NUMBER,
} from '../src/index.js';
import { rng } from './util.js';

/** n entries with random 64-bit fingerprints and signatures, ref = (1, i). */
function randomEntries(seed: number, n: number): BigUint64Array {
  const r = rng(seed);
  const e = new BigUint64Array(3 * n);
  const u64 = () => (BigInt(r()) << 32n) | BigInt(r());
  for (let i = 0; i < n; i++) {
    e[3 * i] = u64();
    e[3 * i + 1] = u64();
    e[3 * i + 2] = makeRef(1, i);
  }
  return e;
}

const checksum = (bytes: Uint8Array) => {
  // Re-seal a deliberately altered file, to test the checks behind the checksum.
  const body = bytes.subarray(0, bytes.length - 8);
  const sum = new Engine().xxh3(body);
  new DataView(bytes.buffer, bytes.byteOffset + bytes.length - 8).setBigUint64(0, sum, true);
  return bytes;
};

describe('block index', () => {
  it('stores and finds two million entries; a wrong signature or unknown fingerprint misses', () => {
    const n = 2_000_000;
    const entries = randomEntries(1, n);
    const t = new BlockIndexTable();
    assert.equal(t.insertMany(entries), n);
    assert.equal(t.size, n);
    const fps = new BigUint64Array(n), sigs = new BigUint64Array(n);
    for (let i = 0; i < n; i++) { fps[i] = entries[3 * i]!; sigs[i] = entries[3 * i + 1]!; }
    const refs = t.lookupColumns(fps, sigs);
    for (let i = 0; i < n; i++) if (refs[i] !== entries[3 * i + 2]) assert.fail(`entry ${i}: got ${refs[i]}`);
    // Same fingerprints, signatures off by one: all must miss.
    for (let i = 0; i < n; i++) sigs[i] = sigs[i]! ^ 1n;
    assert.ok(t.lookupColumns(fps, sigs).every((r) => r === NO_REF), 'wrong signature must miss');
    // Fresh random keys: misses (a 2^-64 chance each of a real collision).
    const other = randomEntries(2, 200_000);
    const keys = new BigUint64Array(2 * 200_000);
    for (let i = 0; i < 200_000; i++) { keys[2 * i] = other[3 * i]!; keys[2 * i + 1] = other[3 * i + 1]!; }
    assert.ok(t.lookupPairs(keys).every((r) => r === NO_REF));
    const s = t.stats();
    assert.ok(s.load <= MAX_LOAD && s.load > MAX_LOAD / 1.5 - 0.01, `load ${s.load}`);
  });

  it('keeps entries that share a fingerprint apart by signature', () => {
    const t = new BlockIndexTable();
    const fp = 0xdead_beef_0000_0001n;
    for (let i = 0; i < 1000; i++) assert.equal(t.insert(fp, BigInt(i) * 7919n, makeRef(2, i)), true);
    // Homes collide too: different fingerprints with the same top 32 bits.
    for (let i = 0; i < 1000; i++) t.insert(0xdead_beef_0000_0000n + BigInt(i) + 2n, 5n, makeRef(3, i));
    assert.equal(t.size, 2000);
    for (let i = 0; i < 1000; i++) {
      assert.equal(t.lookup(fp, BigInt(i) * 7919n), makeRef(2, i));
      assert.equal(t.lookup(0xdead_beef_0000_0000n + BigInt(i) + 2n, 5n), makeRef(3, i));
    }
    assert.equal(t.lookup(fp, 3n), undefined, 'same fingerprint, unknown signature: a miss, never a wrong block');
    assert.equal(t.lookup(fp + 5000n, 0n), undefined);
  });

  it('keeps the first reference when the same pair is inserted again', () => {
    const t = new BlockIndexTable();
    assert.equal(t.insert(1n, 2n, makeRef(1, 1)), true);
    assert.equal(t.insert(1n, 2n, makeRef(9, 9)), false);
    assert.equal(t.size, 1);
    assert.equal(t.lookup(1n, 2n), makeRef(1, 1));
  });

  it('grows one insert at a time without losing entries and stays under its maximum load', () => {
    const t = new BlockIndexTable();
    const e = randomEntries(3, 60_000);
    let growths = 0, cap = t.capacity;
    for (let i = 0; i < 60_000; i++) {
      t.insert(e[3 * i]!, e[3 * i + 1]!, e[3 * i + 2]!);
      if (t.capacity !== cap) { growths++; cap = t.capacity; }
      assert.ok(t.size <= t.capacity * MAX_LOAD);
    }
    assert.ok(growths >= 5, `${growths} growths`);
    for (let i = 0; i < 60_000; i++) assert.equal(t.lookup(e[3 * i]!, e[3 * i + 1]!), e[3 * i + 2]);
  });

  it('costs at most 32 bytes per entry when full to its normal load', () => {
    const n = 500_000;
    const t = new BlockIndexTable({ expectedEntries: n });
    t.insertMany(randomEntries(4, n));
    const s = t.stats();
    assert.ok(s.bytesPerEntry <= 32, `${s.bytesPerEntry} bytes per entry`);
  });

  it('round-trips through serialize/deserialize', () => {
    const e = randomEntries(5, 100_000);
    const t = new BlockIndexTable();
    t.insertMany(e);
    const bytes = t.serialize();
    assert.equal(bytes.length, 24 + 100_000 * 24 + 8);
    const u = BlockIndexTable.deserialize(bytes);
    assert.equal(u.size, t.size);
    for (let i = 0; i < 100_000; i += 7) assert.equal(u.lookup(e[3 * i]!, e[3 * i + 1]!), e[3 * i + 2]);
    assert.deepEqual(Buffer.from(u.serialize()), Buffer.from(BlockIndexTable.deserialize(u.serialize()).serialize()));
    assert.equal(BlockIndexTable.deserialize(new BlockIndexTable().serialize()).size, 0);
  });

  it('refuses truncated, damaged and hostile files with stable codes', () => {
    const t = new BlockIndexTable();
    t.insertMany(randomEntries(6, 1000));
    const good = t.serialize();
    const copy = () => new Uint8Array(good);
    for (const len of [0, 1, 8, 23, 31, 32, 100, good.length - 9, good.length - 1]) {
      assert.throws(() => BlockIndexTable.deserialize(good.subarray(0, len)), { code: ErrorCode.TRUNCATED }, `prefix ${len}`);
    }
    const magic = copy(); magic[0] = 0x00;
    assert.throws(() => BlockIndexTable.deserialize(magic), { code: ErrorCode.BAD_MAGIC });
    const version = copy(); version[8] = 2;
    assert.throws(() => BlockIndexTable.deserialize(version), { code: ErrorCode.UNSUPPORTED_VERSION });
    for (const at of [16, 24, 500, good.length - 9, good.length - 1]) {
      const flipped = copy(); flipped[at] = flipped[at]! ^ 0x10;
      assert.throws(() => BlockIndexTable.deserialize(flipped), { code: at === 16 ? ErrorCode.TRUNCATED : ErrorCode.CHECKSUM_MISMATCH }, `byte ${at}`);
    }
    const longer = new Uint8Array(good.length + 24); longer.set(good);
    assert.throws(() => BlockIndexTable.deserialize(longer), { code: ErrorCode.CORRUPT });
    const huge = copy(); new DataView(huge.buffer).setBigUint64(16, 0xffff_ffff_ffffn, true);
    assert.throws(() => BlockIndexTable.deserialize(huge), { code: ErrorCode.TRUNCATED });
    const entrySize = copy(); entrySize[12] = 16;
    assert.throws(() => BlockIndexTable.deserialize(entrySize), { code: ErrorCode.CORRUPT });
    // Behind a valid checksum: a reserved reference, and a duplicated entry.
    const reserved = copy(); reserved.fill(0xff, 24 + 16, 24 + 24);
    assert.throws(() => BlockIndexTable.deserialize(checksum(reserved)), { code: ErrorCode.CORRUPT });
    const dup = copy(); dup.copyWithin(24 + 24, 24, 48);
    assert.throws(() => BlockIndexTable.deserialize(checksum(dup)), { code: ErrorCode.CORRUPT });
  });

  it('packs references and refuses out-of-range parts', () => {
    const ref = makeRef(MAX_IMAGE_ID, MAX_BLOCK_NUMBER);
    assert.notEqual(ref, NO_REF);
    assert.equal(refImage(ref), MAX_IMAGE_ID);
    assert.equal(refBlock(ref), MAX_BLOCK_NUMBER);
    assert.equal(refBlock(makeRef(7, 123456789)), 123456789);
    assert.throws(() => makeRef(MAX_IMAGE_ID + 1, 0), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => makeRef(0, MAX_BLOCK_NUMBER + 1), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => new BlockIndexTable().insert(1n, 1n, NO_REF), { code: ErrorCode.INVALID_ARGUMENT });
    const t = new BlockIndexTable();
    const bad = randomEntries(8, 10); bad[3 * 9 + 2] = NO_REF;
    assert.throws(() => t.insertMany(bad), { code: ErrorCode.INVALID_ARGUMENT });
    assert.equal(t.size, 0, 'a refused batch inserts nothing');
  });
});
