// The duplicate-heavy fixture pair has the properties migration tests rely on,
// checked independently with node:crypto SHA-1 over every 4 KiB block.
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { duplicateHeavyPair } from './fixtures.js';

const haveMkfs = (() => { try { execFileSync('mkfs.ext4', ['-V'], { stdio: 'ignore' }); return true; } catch { return false; } })();
const skip = haveMkfs ? false : 'mkfs.ext4 is not installed (.ci/run installs e2fsprogs)';

/** SHA-1 (hex) of every 4 KiB block, '' for an all-zero block. */
function blockDigests(img: string): string[] {
  const data = readFileSync(img);
  const zero = Buffer.alloc(4096);
  const out: string[] = [];
  for (let o = 0; o < data.length; o += 4096) {
    const b = data.subarray(o, o + 4096);
    out.push(b.equals(zero.subarray(0, b.length)) ? '' : createHash('sha1').update(b).digest('hex'));
  }
  return out;
}

it('duplicateHeavyPair: two valid ext4 images, newer duplicate-heavy and partly shared with older', { skip, timeout: 120_000 }, async () => {
  const t0 = performance.now();
  const pair = await duplicateHeavyPair();
  const built = performance.now() - t0;
  assert.equal(pair.blockSize, 4096);
  for (const img of [pair.older, pair.newer]) {
    const r = spawnSync('e2fsck', ['-fn', img], { encoding: 'utf8' });
    assert.equal(r.status, 0, `e2fsck -fn ${img}: ${r.stdout}${r.stderr}`);
    assert.equal(statSync(img).size % 4096, 0);
  }

  const older = blockDigests(pair.older);
  const newer = blockDigests(pair.newer);
  // Duplicates within newer: blocks equal to an earlier block of the same image.
  const first = new Map<string, number>();
  let dups = 0, near = 0, nonZero = 0;
  newer.forEach((d, i) => {
    if (!d) return;
    nonZero++;
    const j = first.get(d);
    if (j === undefined) { first.set(d, i); return; }
    dups++;
    if (i - j <= 256) near++;
  });
  const olderSet = new Set(older.filter((d) => d));
  const shared = newer.filter((d) => d && olderSet.has(d)).length;
  const fraction = shared / nonZero;
  const olderNonZero = older.filter((d) => d).length;
  console.log(`fixture: older ${olderNonZero} non-zero blocks, newer ${nonZero} (${dups} duplicates, ${near} within 256 blocks), ${(100 * fraction).toFixed(1)} % of newer in older; ready in ${built.toFixed(0)} ms`);

  assert.ok(olderNonZero > 4000, `older has ${olderNonZero} non-zero blocks`);
  assert.ok(dups >= 2000, `newer has ${dups} duplicate blocks`);
  assert.ok(near >= 200, `newer has ${near} duplicates within 256 blocks of their first occurrence`);
  assert.ok(fraction >= 0.4 && fraction <= 0.95, `${(100 * fraction).toFixed(1)} % of newer's blocks are in older`);
  // Something is new in newer and something of older is gone.
  const newerSet = new Set(newer.filter((d) => d));
  assert.ok([...newerSet].some((d) => !olderSet.has(d)));
  assert.ok([...olderSet].some((d) => !newerSet.has(d)));

  // Cached: a second call returns the same paths without rebuilding.
  const again = await duplicateHeavyPair();
  assert.deepEqual(again, pair);
});
