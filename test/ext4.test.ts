// Similarity of real ext4 filesystem images made by mkfs.ext4 -d from two
// folders with overlapping files, against an independent count with
// node:crypto SHA-1 over every 4 KiB block.
import { after, before, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { Scanner } from '../src/scan/scanner.js';
import { similarityMatrix } from '../src/similarity/similarity.js';
import { seededBytes } from './util.js';

const haveMkfs = (() => { try { execFileSync('mkfs.ext4', ['-V'], { stdio: 'ignore' }); return true; } catch { return false; } })();
let dir: string;
before(() => { dir = mkdtempSync(join(tmpdir(), 'bf-ext4-')); });
after(() => rmSync(dir, { recursive: true, force: true }));

function mkfs(name: string, files: Record<string, Uint8Array>): string {
  const root = join(dir, `${name}.d`);
  mkdirSync(root);
  for (const [f, data] of Object.entries(files)) writeFileSync(join(root, f), data);
  const img = join(dir, `${name}.img`);
  execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', root, '-E', 'lazy_itable_init=0,nodiscard', img, '48M'], { stdio: 'pipe' });
  return img;
}

/** The independent answer: SHA-1 of every non-zero 4 KiB block. */
function digests(img: string): string[] {
  const data = readFileSync(img);
  const zero = Buffer.alloc(4096);
  const out: string[] = [];
  for (let o = 0; o < data.length; o += 4096) {
    const b = data.subarray(o, o + 4096);
    if (!b.equals(zero.subarray(0, b.length))) out.push(createHash('sha1').update(b).digest('hex'));
  }
  return out;
}

it('similarity of two ext4 images equals a node:crypto count of shared blocks', { skip: haveMkfs ? false : 'mkfs.ext4 is not installed (.ci/run installs e2fsprogs)' }, async () => {
  const shared = Object.fromEntries(Array.from({ length: 6 }, (_, i) => [`lib${i}.so`, seededBytes(100 + i, (1 + i) * 300_000 + 17)]));
  const a = mkfs('a', { ...shared, 'a-only.dat': seededBytes(1, 2_000_000) });
  const changed = Object.fromEntries(Object.entries(shared).slice(0, 4));
  const b = mkfs('b', { ...changed, 'lib5.so': seededBytes(999, 1_000_000), 'b-only.dat': seededBytes(2, 3_000_000) });
  const scanner = new Scanner({ workers: 2 });
  try {
    const maps = [(await scanner.scan(a, { blockSize: 4096 }))[0]!, (await scanner.scan(b, { blockSize: 4096 }))[0]!];
    const m = similarityMatrix(maps);
    const [da, db] = [digests(a), digests(b)];
    const sa = new Set(da), sb = new Set(db);
    const expectAB = (100 * db.filter((d) => sa.has(d)).length) / db.length;
    const expectBA = (100 * da.filter((d) => sb.has(d)).length) / da.length;
    assert.equal(m.images[0]!.nonZeroBlocks, da.length);
    assert.equal(m.images[1]!.nonZeroBlocks, db.length);
    assert.ok(Math.abs(m.similarity[0]![1]! - expectAB) < 1e-9, `a -> b: ${m.similarity[0]![1]} vs ${expectAB}`);
    assert.ok(Math.abs(m.similarity[1]![0]! - expectBA) < 1e-9, `b -> a: ${m.similarity[1]![0]} vs ${expectBA}`);
    const missing = new Set(db.filter((d) => !sa.has(d)));
    assert.equal(m.bytesToSend[0]![1], missing.size * 4096);
    // The shared files really are found: well above zero, well below everything.
    assert.ok(expectAB > 30 && expectAB < 95, `similarity ${expectAB}`);
  } finally {
    await scanner.close();
  }
});
