// Scatter-gather (paper 003): the intermediaries' content store, and
// evictions of several ext4 images built from one base through two real
// intermediaries into a real destination, over TCP. Asserted: every image
// arrives byte for byte; each distinct content leaves the source once
// (counted from what the stores took); blocks shared by the images cross
// once; an intermediary killed before the gather costs its blocks a trip
// from the source, never a wrong byte; a store hands out nothing damaged.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ContentStore } from '../src/roles/intermediary/store.js';
import { IntermediaryService } from '../src/roles/intermediary/service.js';
import { DestinationService } from '../src/roles/destination/service.js';
import { scatterGather } from '../src/migrate/scatter-gather.js';
import { STASH_BAD, STASH_FULL, STASH_HELD, STASH_STORED } from '../src/protocol/messages.js';
import { seededBytes } from './util.js';

const haveMkfs = (() => { try { execFileSync('mkfs.ext4', ['-V'], { stdio: 'ignore' }); return true; } catch { return false; } })();
let dir: string;
before(() => { dir = mkdtempSync(join(tmpdir(), 'bfD-sg-')); });
after(() => rmSync(dir, { recursive: true, force: true }));

const sha1 = (b: Uint8Array) => createHash('sha1').update(b).digest();
const block = (seed: number, n = 4096) => Buffer.from(seededBytes(seed, n));

describe('content store', () => {
  it('keeps blocks by SHA-1 across a restart, refuses what does not fit, and rejects bytes that are not their SHA-1', () => {
    const d = join(dir, 'store1');
    const blocks = [block(1), block(2), block(3)];
    const digests = Buffer.concat(blocks.map(sha1));
    const s = ContentStore.open(d, { capacity: 2 * (4096 + 24), memoryBytes: 4096 });
    assert.deepEqual(s.put(digests, blocks), [STASH_STORED, STASH_STORED, STASH_FULL]);
    assert.deepEqual(s.put(digests.subarray(0, 20), [blocks[0]!]), [STASH_HELD]);
    assert.deepEqual(s.put(sha1(block(9)), [block(10)]), [STASH_BAD]);
    assert.equal(s.free, 0);
    assert.ok(s.get(digests.subarray(0, 20))!.equals(blocks[0]!)); // from disk: the memory tier holds only the last
    assert.ok(s.get(digests.subarray(20, 40))!.equals(blocks[1]!));
    assert.equal(s.get(digests.subarray(40, 60)), undefined);
    s.close();
    const r = ContentStore.open(d, { capacity: 2 * (4096 + 24) });
    assert.equal(r.blocks, 2);
    assert.ok(r.get(digests.subarray(0, 20))!.equals(blocks[0]!));
    assert.ok(r.get(digests.subarray(20, 40))!.equals(blocks[1]!));
    assert.equal(r.free, 0);
    r.close();
  });

  it('drops a block whose bytes on disk were damaged instead of serving them, and cuts off a torn last record', () => {
    const d = join(dir, 'store2');
    const blocks = [block(4), block(5)];
    const digests = Buffer.concat(blocks.map(sha1));
    const s = ContentStore.open(d, { capacity: 1 << 20, memoryBytes: 0 });
    s.put(digests, blocks);
    s.close();
    const seg = join(d, readdirSync(d).find((f) => f.endsWith('.seg'))!);
    const fd = openSync(seg, 'r+');
    writeSync(fd, Buffer.from([0xff ^ blocks[0]![100]!]), 0, 1, 24 + 100); // one byte of the first block
    writeSync(fd, Buffer.alloc(30, 7), 0, 30, statSync(seg).size); // half a record: a crash mid-append
    closeSync(fd);
    const r = ContentStore.open(d, { capacity: 1 << 20, memoryBytes: 0 });
    assert.equal(r.damage.truncated, 1);
    assert.equal(statSync(seg).size, 2 * (4096 + 24));
    assert.equal(r.get(digests.subarray(0, 20)), undefined);
    assert.equal(r.damage.corrupt, 1);
    assert.equal(r.has(digests.subarray(0, 20)), false);
    assert.ok(r.get(digests.subarray(20, 40))!.equals(blocks[1]!));
    r.close();
  });
});

/** Four ext4 images from one base: shared system files, a few of each image's own. */
function images(tag: string): string[] {
  const base: Record<string, Uint8Array> = {};
  for (let i = 0; i < 12; i++) base[`lib${i}.so`] = seededBytes(100 + i, 400_000 + i * 10_000);
  return [0, 1, 2, 3].map((v) => {
    const root = join(dir, `${tag}-${v}.d`);
    mkdirSync(root);
    for (const [f, data] of Object.entries(base)) writeFileSync(join(root, f), data);
    writeFileSync(join(root, `own-${v}.dat`), seededBytes(1000 + v, 600_000));
    if (v % 2) writeFileSync(join(root, 'lib3.so'), seededBytes(2000 + v, 300_000)); // an upgraded library
    const img = join(dir, `${tag}-${v}.img`);
    execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', root, '-E', 'lazy_itable_init=0,nodiscard', '-U', `00000000-0000-0000-0000-00000000000${v}`, img, '24M'], { stdio: 'pipe' });
    return img;
  });
}

/** SHA-1 of every distinct non-zero 4 KiB block over all images, and their count: what must leave the source, once each. */
function distinct(imgs: string[]): { blocks: number; bytes: number; dataBlocks: number } {
  const seen = new Set<string>();
  let dataBlocks = 0;
  const zero = Buffer.alloc(4096);
  for (const p of imgs) {
    const b = readFileSync(p);
    for (let at = 0; at < b.length; at += 4096) {
      const x = b.subarray(at, at + 4096);
      if (x.equals(zero.subarray(0, x.length))) continue;
      dataBlocks++;
      seen.add(sha1(x).toString('hex'));
    }
  }
  return { blocks: seen.size, bytes: seen.size * 4096, dataBlocks };
}

async function services(tag: string, gatherBwlimit = 0) {
  const auth = { insecure: true };
  const dst = await DestinationService.start({ dataDir: join(dir, `${tag}-dst`), auth, gatherBwlimit, stage: { capacity: 8 << 20 } });
  const ims = [
    await IntermediaryService.start({ dataDir: join(dir, `${tag}-im1`), capacity: 64 << 20, auth }),
    await IntermediaryService.start({ dataDir: join(dir, `${tag}-im2`), capacity: 64 << 20, auth }),
  ];
  const addr = (s: { address: { host: string; port: number } }) => `${s.address.host}:${s.address.port}`;
  return { auth, dst, ims, to: addr(dst), via: ims.map(addr) };
}

describe('scatter-gather eviction', { skip: haveMkfs ? false : 'mkfs.ext4 is not installed (.ci/run installs e2fsprogs)' }, () => {
  it('evicts four images from one base: each arrives byte for byte, each distinct content leaves the source once', async () => {
    const imgs = images('a');
    const want = distinct(imgs);
    const s = await services('a', 20 << 20);
    try {
      const t0 = performance.now();
      const r = await scatterGather(imgs, { to: s.to, via: s.via, auth: s.auth, ...(process.env.BF_SG_TRACE ? { onEvent: (e) => console.log(((performance.now() - t0) / 1000).toFixed(2), e.phase) } : {}) });
      for (let i = 0; i < imgs.length; i++) {
        assert.ok(readFileSync(join(dir, 'a-dst', `a-${i}.img`)).equals(readFileSync(imgs[i]!)), `image ${i} differs`);
      }
      assert.equal(r.dedup.dataBlocks, want.dataBlocks);
      assert.equal(r.dedup.distinctBlocks, want.blocks);
      // Every distinct content went to exactly one store, once; none came from the source.
      assert.equal(r.dedup.stashedBlocks, want.blocks);
      assert.equal(s.ims[0]!.stats.stashed + s.ims[1]!.stats.stashed + s.dst.stageStats.stashed, want.blocks);
      for (const im of r.images) assert.equal(im.fromSource, 0, `${im.name} asked the source for blocks`);
      for (const im of r.images) assert.equal(im.gathered, im.dataBlocks);
      // Shared blocks crossed once: the source sent far less than the images' data.
      assert.ok(r.dedup.savedBytes >= (want.dataBlocks - want.blocks) * 4096);
      assert.ok(r.evictionSeconds <= r.seconds);
      // The stores were used: both intermediaries took a share.
      assert.ok(s.ims[0]!.stats.stashed > 0 && s.ims[1]!.stats.stashed > 0);
      // Gathered once per content at the destination (the stage keeps what other images share).
      const gatheredFromIms = s.ims[0]!.stats.gathered + s.ims[1]!.stats.gathered;
      assert.ok(gatheredFromIms <= s.ims[0]!.stats.stashed + s.ims[1]!.stats.stashed, `${gatheredFromIms} gathered for ${s.ims[0]!.stats.stashed + s.ims[1]!.stats.stashed} stashed`);
    } finally {
      for (const im of s.ims) await im.close();
      await s.dst.close();
    }
  });

  it('an intermediary gone before the gather: its blocks come from the source, every image still byte for byte', async () => {
    const imgs = images('b');
    const s = await services('b', 4 << 20);
    try {
      let killed = false;
      const r = await scatterGather(imgs, {
        to: s.to, via: s.via, auth: s.auth,
        onEvent: (e) => { if (e.phase === 'evicted' && !killed) { killed = true; void s.ims[0]!.close(); } },
      });
      assert.ok(killed);
      for (let i = 0; i < imgs.length; i++) {
        assert.ok(readFileSync(join(dir, 'b-dst', `b-${i}.img`)).equals(readFileSync(imgs[i]!)), `image ${i} differs`);
      }
      const fromSource = r.images.reduce((a, im) => a + im.fromSource, 0);
      assert.ok(fromSource > 0, 'nothing came from the source although an intermediary died');
    } finally {
      for (const im of s.ims) await im.close();
      await s.dst.close();
    }
  });
});
