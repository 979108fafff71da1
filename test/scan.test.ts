// Scans of constructed images with known answers, sparse images past 4 GiB,
// stale and damaged block maps, and 1 vs N workers.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync, truncateSync, openSync, writeSync, closeSync, readFileSync, utimesSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { xxhash3 } from 'hash-wasm';
import { Scanner, blockMapsFor } from '../src/scan/scanner.js';
import { BlockMap, blockMapPath } from '../src/blockmap/blockmap.js';
import { similarityMatrix } from '../src/similarity/similarity.js';
import { ErrorCode } from '../src/index.js';
import { seededBytes } from './util.js';

const BS = 4096;
let dir: string;
let scanner: Scanner;
before(() => { dir = mkdtempSync(join(tmpdir(), 'bf-scan-')); scanner = new Scanner({ workers: 2 }); });
after(async () => { await scanner.close(); rmSync(dir, { recursive: true, force: true }); });

const block = (seed: number) => seededBytes(seed, BS);
const zeros = (n = 1) => new Uint8Array(n * BS);
function image(name: string, parts: Uint8Array[]): string {
  const p = join(dir, name);
  writeFileSync(p, Buffer.concat(parts));
  return p;
}

describe('scan', () => {
  it('counts zero, distinct and duplicate blocks, including a short last block', async () => {
    // blocks: A B 0 A C 0 0 B | tail of 100 bytes
    const p = image('known.img', [block(1), block(2), zeros(), block(1), block(3), zeros(2), block(2), seededBytes(9, 100)]);
    const [m] = await scanner.scan(p, { blockSize: BS, sha1: true });
    assert.equal(m!.count, 9);
    assert.deepEqual([...m!.dataRuns], [0, 2, 3, 2, 7, 2]);
    assert.deepEqual([...m!.nonZeroBlocks()], [0, 1, 3, 4, 7, 8]);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7, 8].map((b) => m!.indexOf(b)), [0, 1, -1, 2, 3, -1, -1, 4, 5]);
    assert.equal(m!.dataBlocks, 6);
    assert.equal(m!.runCount, 3);
    assert.deepEqual(m!.stats(), { blocks: 9, zeroBlocks: 3, nonZeroBlocks: 6, distinctBlocks: 4, duplicateBlocks: 2 });
    assert.equal(m!.blockLength(8), 100);
    const data = readFileSync(p);
    for (let i = 0; i < 9; i++) {
      const k = m!.indexOf(i);
      if (m!.isZero(i)) { assert.equal(m!.digest(i), undefined); continue; }
      const b = data.subarray(i * BS, Math.min(data.length, (i + 1) * BS));
      assert.equal(m!.fingerprints[k], BigInt('0x' + (await xxhash3(b))), `fingerprint ${i}`);
      assert.equal(m!.signatures[k], b.readBigUInt64LE(8));
      assert.deepEqual(Buffer.from(m!.digest(i)!), createHash('sha1').update(b).digest());
    }
  });

  it('sees a block that is zero but for its last byte as non-zero', async () => {
    const z = zeros(3);
    z[2 * BS - 1] = 1;
    const [m] = await scanner.scan(image('lastbyte.img', [z]), { blockSize: BS });
    assert.deepEqual([...m!.dataRuns], [1, 1]);
  });

  it('scans all-zero and hole-only images as all zero blocks', async () => {
    const z = image('zero.img', [zeros(300)]);
    const hole = join(dir, 'hole.img');
    writeFileSync(hole, '');
    truncateSync(hole, 40 << 20);
    for (const p of [z, hole]) {
      const [m] = await scanner.scan(p, { blockSize: BS });
      assert.equal(m!.stats().zeroBlocks, m!.count, p);
      assert.equal(m!.stats().distinctBlocks, 0);
    }
    const empty = image('empty.img', []);
    const [m] = await scanner.scan(empty, { blockSize: BS });
    assert.equal(m!.count, 0);
  });

  it('gives identical block maps with 1 and 2 workers, at several block sizes in one pass', async () => {
    const p = image('mixed.img', [seededBytes(5, 20 << 20), zeros(777), seededBytes(6, (3 << 20) + 1234)]);
    const one = new Scanner({ workers: 1 });
    try {
      const a = await one.scan(p, { blockSize: [512, 4096, 65536], sha1: true, rangeBytes: 4 << 20 });
      const b = await scanner.scan(p, { blockSize: [512, 4096, 65536], sha1: true });
      for (let k = 0; k < 3; k++) {
        assert.deepEqual(a[k]!.dataRuns, b[k]!.dataRuns);
        assert.deepEqual(a[k]!.fingerprints, b[k]!.fingerprints);
        assert.deepEqual(a[k]!.signatures, b[k]!.signatures);
        assert.deepEqual(a[k]!.digests, b[k]!.digests);
      }
      const single = await scanner.scan(p, { blockSize: 512 });
      assert.deepEqual(single[0]!.fingerprints, a[0]!.fingerprints, 'a multi-size pass equals a single-size scan');
    } finally {
      await one.close();
    }
  });

  it('scans a sparse 5 GiB image with data across the 4 GiB line', async () => {
    const p = join(dir, 'sparse5g.img');
    writeFileSync(p, '');
    const size = 5 * 2 ** 30 + 1000;
    truncateSync(p, size);
    const fd = openSync(p, 'r+');
    const d1 = seededBytes(11, BS), d2 = seededBytes(12, 3 * BS), d3 = seededBytes(13, 1000);
    writeSync(fd, d1, 0, BS, 0);
    writeSync(fd, d2, 0, 3 * BS, 4 * 2 ** 30 - BS); // straddles 4 GiB
    writeSync(fd, d3, 0, 1000, 5 * 2 ** 30);
    closeSync(fd);
    const [m] = await scanner.scan(p, { blockSize: BS });
    assert.equal(m!.count, Math.ceil(size / BS));
    const nz = [...m!.nonZeroBlocks()];
    const k = (4 * 2 ** 30) / BS;
    assert.deepEqual(nz, [0, k - 1, k, k + 1, m!.count - 1]);
    assert.deepEqual([...m!.dataRuns], [0, 1, k - 1, 3, m!.count - 1, 1]);
    assert.equal(m!.fingerprints[m!.indexOf(k)]!, BigInt('0x' + (await xxhash3(d2.subarray(BS, 2 * BS)))));
    assert.equal(m!.fingerprints[4]!, BigInt('0x' + (await xxhash3(d3))));
  });

  it('rejects missing files, directories and bad block sizes with stable codes', async () => {
    await assert.rejects(scanner.scan(join(dir, 'nope.img')), { code: ErrorCode.IMAGE_NOT_FOUND });
    await assert.rejects(scanner.scan(dir), { code: ErrorCode.NOT_AN_IMAGE });
    const p = image('small.img', [block(1)]);
    await assert.rejects(scanner.scan(p, { blockSize: 1000 }), { code: ErrorCode.BAD_BLOCK_SIZE });
    await assert.rejects(scanner.scan(p, { blockSize: [] }), { code: ErrorCode.INVALID_ARGUMENT });
  });
});

describe('block maps in the cache', () => {
  it('round-trips, and is used only while the image is unchanged', async () => {
    const p = image('maps.img', [block(1), block(2), zeros(), seededBytes(3, 10)]);
    const opts = { blockSize: BS, sha1: true, mapDir: join(dir, 'cache') };
    const first = await blockMapsFor(scanner, p, opts);
    assert.equal(first.source, 'scanned');
    const second = await blockMapsFor(scanner, p, opts);
    assert.equal(second.source, 'loaded');
    assert.deepEqual(second.maps[0]!.fingerprints, first.maps[0]!.fingerprints);
    assert.deepEqual(second.maps[0]!.digests, first.maps[0]!.digests);
    // Same size, new content and a new modification time: another key, rebuilt.
    writeFileSync(p, Buffer.concat([block(7), block(2), zeros(), seededBytes(3, 10)]));
    utimesSync(p, new Date(), new Date(Date.now() + 5000));
    const third = await blockMapsFor(scanner, p, opts);
    assert.equal(third.source, 'scanned');
    assert.notEqual(third.maps[0]!.fingerprints[0], first.maps[0]!.fingerprints[0]);
    assert.notEqual(third.files[0], first.files[0]);
  });

  it('refuses damaged map files with stable codes, and rebuilds them instead of using them', async () => {
    const p = image('damaged.img', [block(1), block(2), block(3)]);
    const mapDir = join(dir, 'cache');
    const { files: [file] } = await blockMapsFor(scanner, p, { blockSize: BS, mapDir });
    const good = readFileSync(file!);
    const FP_AT = 80 + 16 * good.readUInt32LE(64); // after the header and the one data run
    const cases: Array<[string, Buffer, string]> = [
      ['truncated', good.subarray(0, good.length - 5), ErrorCode.TRUNCATED],
      ['short header', good.subarray(0, 20), ErrorCode.TRUNCATED],
      ['bad magic', Buffer.concat([Buffer.from('XXXXXXXX'), good.subarray(8)]), ErrorCode.BAD_MAGIC],
      ['flipped fingerprint bit', Buffer.from(good).fill(0x55, FP_AT, FP_AT + 1), ErrorCode.CHECKSUM_MISMATCH],
      ['extra bytes', Buffer.concat([good, Buffer.alloc(8)]), ErrorCode.CORRUPT],
    ];
    const version = Buffer.from(good); version.writeUInt32LE(9, 8);
    cases.push(['future version', version, ErrorCode.UNSUPPORTED_VERSION]);
    for (const [what, bytes, code] of cases) {
      assert.throws(() => BlockMap.fromBytes(bytes, p), { code }, what);
      writeFileSync(file!, bytes);
      const notices: string[] = [];
      const r = await blockMapsFor(scanner, p, { blockSize: BS, mapDir, onNotice: (_, m) => notices.push(m) });
      assert.equal(r.source, 'scanned', `${what}: rebuilt, not used`);
      assert.match(notices.join(), new RegExp(code));
      assert.deepEqual(readFileSync(file!), good, `${what}: a good map replaced it`);
    }
  });

  it('saves maps in mapDir, never beside the image', async () => {
    const p = image('elsewhere.img', [block(4)]);
    const mapDir = join(dir, 'maps');
    const r = await blockMapsFor(scanner, p, { blockSize: BS, mapDir });
    assert.equal(BlockMap.load(r.files[0]!, p).count, 1);
    assert.ok(r.files[0]!.startsWith(`${mapDir}/`));
    assert.ok(!existsSync(blockMapPath(p, BS)));
  });
});

describe('similarity', () => {
  it('matches hand-counted answers on constructed images', async () => {
    // base: A B C D 0 ; t1: A B X D (75 % of 4 found) + zero; t2: D D Y 0 0 (D twice: 2 of 3)
    const base = image('s-base.img', [block(1), block(2), block(3), block(4), zeros()]);
    const t1 = image('s-t1.img', [block(1), block(2), block(20), block(4), zeros()]);
    const t2 = image('s-t2.img', [block(4), block(4), block(30), zeros(2)]);
    const maps = [];
    for (const p of [base, t1, t2]) maps.push((await scanner.scan(p, { blockSize: BS }))[0]!);
    const m = similarityMatrix(maps);
    assert.deepEqual(m.similarity[0], [100, 75, (100 * 2) / 3]);
    assert.deepEqual(m.bytesToSend[0], [0, BS, BS]);
    assert.deepEqual(m.similarity[1], [75, 100, (100 * 2) / 3]);
    assert.deepEqual(m.similarity[2], [25, 25, 100]);
    assert.deepEqual(m.bytesToSend[2], [3 * BS, 3 * BS, 0]);
    assert.equal(m.average[0], (75 + 200 / 3) / 2);
    assert.deepEqual(m.images.map((i) => i.distinctBlocks), [4, 4, 2]);
  });
});
