// The block index file over many images: lookups that need both fingerprint
// and signature, persistence with the image list, damaged files refused.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { BlockMap } from '../src/blockmap/blockmap.js';
import { Neighbourhood } from '../src/blockindex/neighbourhood.js';
import { Scanner } from '../src/scan/scanner.js';
import { ErrorCode, refBlock, refImage } from '../src/index.js';
import { seededBytes } from './util.js';

let dir: string;
before(() => { dir = mkdtempSync(join(tmpdir(), 'bf-nbhd-')); });
after(() => rmSync(dir, { recursive: true, force: true }));

const identity = { size: 4 * 4096, mtimeNs: '1', ino: 1, dev: 1 };
function fakeMap(path: string, fps: bigint[], sigs: bigint[]): BlockMap {
  return new BlockMap(path, identity, 4096, Float64Array.of(0, fps.length), BigUint64Array.from(fps), BigUint64Array.from(sigs), undefined);
}

describe('neighbourhood index', () => {
  it('tells blocks with a forced fingerprint collision apart by signature', () => {
    const n = new Neighbourhood(4096);
    n.add(fakeMap('/img/a', [7n, 7n, 8n, 9n], [1n, 2n, 3n, 4n]));
    n.add(fakeMap('/img/b', [7n, 10n, 7n, 11n], [5n, 6n, 1n, 7n]));
    assert.deepEqual(n.lookup(7n, 1n), { image: n.images[0], block: 0 });
    assert.deepEqual(n.lookup(7n, 2n), { image: n.images[0], block: 1 });
    assert.deepEqual(n.lookup(7n, 5n), { image: n.images[1], block: 0 });
    assert.equal(n.lookup(7n, 99n), undefined, 'same fingerprint, other signature: no block');
    assert.equal(n.images[1]!.added, 3, 'contents already indexed are not added again');
    assert.throws(() => n.add(fakeMap('/img/a', [1n], [1n])), { code: ErrorCode.INVALID_ARGUMENT });
  });

  it('persists real images with their list and refuses damaged files', async () => {
    const a = join(dir, 'a.img'), b = join(dir, 'b.img');
    writeFileSync(a, seededBytes(1, 64 * 4096));
    writeFileSync(b, Buffer.concat([seededBytes(1, 32 * 4096), seededBytes(2, 16 * 4096)]));
    const scanner = new Scanner({ workers: 2 });
    const n = new Neighbourhood(4096);
    const maps = [];
    try {
      for (const p of [a, b]) { const [m] = await scanner.scan(p); maps.push(m!); n.add(m!); }
    } finally {
      await scanner.close();
    }
    const file = join(dir, 'n.bfidx');
    n.save(file);
    const back = Neighbourhood.load(file);
    assert.deepEqual(back.images, n.images);
    assert.equal(back.images[0]!.path, resolve(a));
    assert.equal(back.table.size, 64 + 16);
    const refs = back.lookupColumns(maps[1]!.fingerprints, maps[1]!.signatures);
    for (let i = 0; i < 48; i++) {
      assert.equal(refImage(refs[i]!), i < 32 ? 0 : 1, `block ${i}`);
      assert.equal(refBlock(refs[i]!), i, `block ${i}`);
    }
    const good = readFileSync(file);
    const bad = (f: (b: Buffer) => Buffer, code: string) => {
      writeFileSync(file, f(Buffer.from(good)));
      assert.throws(() => Neighbourhood.load(file), { code });
    };
    bad((x) => x.subarray(0, x.length - 1), ErrorCode.TRUNCATED);
    bad((x) => x.subarray(0, 10), ErrorCode.TRUNCATED);
    bad((x) => { x[0] = 0; return x; }, ErrorCode.BAD_MAGIC);
    bad((x) => { x[40] = x[40]! ^ 1; return x; }, ErrorCode.CHECKSUM_MISMATCH);
    bad((x) => { x.writeUInt32LE(0x7fffffff, 16); return x; }, ErrorCode.CORRUPT);
    bad((x) => Buffer.concat([x, Buffer.alloc(3)]), ErrorCode.CORRUPT);
    assert.throws(() => Neighbourhood.load(join(dir, 'missing')), { code: ErrorCode.FILE_NOT_FOUND });
  });
});
