// A sparse image far beyond this machine's memory: 4 TiB + 1000 bytes
// declared, a few MiB of data at eight places. Migrated over loopback to a
// DestinationService in this process (strategies full, then similarity,
// which fills from the first copy once it is indexed), then checked: every
// allocated extent of either file byte for byte against the other, the
// destination still sparse, the metadata on the wire and the journal small,
// and this process's resident memory far below the declared size.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate, type MigrationResult } from '../src/migrate/migrate.js';
import { nativeStatus } from '../src/engine/backend.js';
import { addon } from 'blockferry/native';
import { seededBytes } from './util.js';

const KiB = 1024;
const MiB = 1 << 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const BS = 4096;
/** Not a multiple of the block size: the last block is 1000 bytes long. */
const SIZE = 4 * TiB + 1000;

/** Where data goes: [offset, length, seed]; one piece gets a zero block inside it. */
const PIECES: Array<{ at: number; length: number; seed: number; zeroBlockAt?: number }> = [
  { at: 0, length: 1 * MiB, seed: 1 },                                      // the first block
  { at: 3 * GiB + 40 * BS, length: 1 * MiB, seed: 2, zeroBlockAt: 64 * BS }, // a zero block inside data
  { at: 4 * GiB - 512 * KiB, length: 1 * MiB, seed: 3 },                    // across the 4 GiB line (2^20 blocks)
  { at: 1 * TiB + 7 * BS, length: 1 * MiB, seed: 4 },
  { at: 2 * TiB + 3, length: 1 * MiB, seed: 5 },                            // unaligned start and end
  { at: 3 * TiB - 2 * BS - 100, length: 12_345, seed: 6 },                  // small, unaligned
  { at: SIZE - 3 * MiB + 17, length: 100_000, seed: 7 },                    // unaligned, near the end
  { at: SIZE - 1 * MiB - 1000, length: 1 * MiB + 1000, seed: 8 },           // the end, with the short last block
];

const native = nativeStatus().loaded ? addon : null;

/** A directory on a file system that takes a sparse file of SIZE bytes (os.tmpdir() first). */
function sparseDir(): string | undefined {
  for (const base of [tmpdir(), '/var/tmp', process.cwd()]) {
    let d: string | undefined;
    try {
      d = mkdtempSync(join(base, 'bf-sparse-'));
      const probe = join(d, 'probe');
      const fd = openSync(probe, 'w');
      try {
        ftruncateSync(fd, SIZE);
      } finally {
        closeSync(fd);
      }
      const st = statSync(probe);
      rmSync(probe);
      if (st.size === SIZE && st.blocks * 512 < MiB) return d;
    } catch {
      // this file system cannot hold it: try the next
    }
    if (d) rmSync(d, { recursive: true, force: true });
  }
  return undefined;
}

function extentsOf(path: string): Array<[number, number]> {
  const fd = openSync(path, 'r');
  try {
    const flat = native!.extents(fd, 0, statSync(path).size);
    const out: Array<[number, number]> = [];
    for (let i = 0; i < flat.length; i += 2) out.push([flat[i]!, flat[i + 1]!]);
    return out;
  } finally {
    closeSync(fd);
  }
}

/** Compares a and b byte for byte over every allocated extent of either; returns the bytes compared. */
function compareExtents(a: string, b: string): number {
  const fa = openSync(a, 'r'), fb = openSync(b, 'r');
  const ba = Buffer.alloc(4 * MiB), bb = Buffer.alloc(4 * MiB);
  let compared = 0;
  try {
    for (const [path, list] of [[a, extentsOf(a)], [b, extentsOf(b)]] as const) {
      for (const [off, len] of list) {
        for (let at = off; at < off + len; at += ba.length) {
          const n = Math.min(ba.length, off + len - at);
          assert.equal(readSync(fa, ba, 0, n, at), n, `${a}: short read at ${at}`);
          assert.equal(readSync(fb, bb, 0, n, at), n, `${b}: short read at ${at}`);
          if (!ba.subarray(0, n).equals(bb.subarray(0, n))) {
            let i = 0;
            while (ba[i] === bb[i]) i++;
            assert.fail(`the images differ at byte ${at + i} (an extent of ${path} at ${off}+${len})`);
          }
          compared += n;
        }
      }
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
  return compared;
}

let dir: string | undefined;
let svc: DestinationService | undefined;
let image = '';
let dataBytes = 0;
const skip = !native ? 'the native addon is not loaded (no SEEK_DATA/SEEK_HOLE extents, so a 4 TiB image would be read whole)' : false;

before(async () => {
  if (skip) return;
  dir = sparseDir();
  if (!dir) throw new Error(`no file system here takes a sparse ${SIZE}-byte file (tried ${tmpdir()}, /var/tmp, ${process.cwd()})`);
  image = join(dir, 'huge.img');
  const fd = openSync(image, 'w');
  try {
    ftruncateSync(fd, SIZE);
    for (const p of PIECES) {
      const bytes = Buffer.from(seededBytes(p.seed, p.length));
      if (p.zeroBlockAt !== undefined) bytes.fill(0, p.zeroBlockAt, p.zeroBlockAt + BS);
      writeSync(fd, bytes, 0, bytes.length, p.at);
      dataBytes += p.length;
    }
  } finally {
    closeSync(fd);
  }
  svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth: { insecure: true } });
});

after(async () => {
  await svc?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Runs a migration while polling the journal's size and this process's RSS; returns both maxima. */
async function watched(name: string, run: () => Promise<MigrationResult>): Promise<{ r: MigrationResult; journalMax: number; rssMax: number }> {
  const journal = join(dir!, 'dst', `${name}.img.journal`);
  let journalMax = 0, rssMax = process.memoryUsage().rss;
  const poll = () => {
    try {
      if (existsSync(journal)) journalMax = Math.max(journalMax, statSync(journal).size);
    } catch {
      // renamed or removed between the two calls
    }
    rssMax = Math.max(rssMax, process.memoryUsage().rss);
  };
  const timer = setInterval(poll, 5);
  try {
    const r = await run();
    poll();
    return { r, journalMax, rssMax };
  } finally {
    clearInterval(timer);
  }
}

describe('a 4 TiB sparse image (a few MiB of data at eight places)', { skip }, () => {
  const rss0 = process.memoryUsage().rss;

  for (const strategy of ['full', 'similarity'] as const) {
    it(`migrates with strategy ${strategy}: extents byte-identical, destination sparse, metadata and journal small`, { timeout: 60_000 }, async (t) => {
      if (strategy === 'similarity') {
        // The first copy is indexed after its DONE: wait for it, so that this migration fills from it.
        for (let t = 0; t < 400 && svc!.neighbourhood.images.length === 0; t++) await new Promise((r) => setTimeout(r, 25));
        assert.equal(svc!.neighbourhood.images.length, 1, 'the full copy joined the neighbourhood');
      }
      const { r, journalMax, rssMax } = await watched(strategy, () => migrate(image, { to: `127.0.0.1:${svc!.address.port}`, name: strategy, strategy, auth: { insecure: true } }));
      const dst = join(dir!, 'dst', `${strategy}.img`);
      assert.equal(r.verified, true);
      assert.equal(statSync(dst).size, SIZE);

      const compared = compareExtents(image, dst);
      assert.ok(compared >= dataBytes, `compared ${compared} bytes, the data is ${dataBytes}`);

      // Still sparse: the data and its rounding to blocks, a few MiB.
      const allocated = extentsOf(dst).reduce((a, [, l]) => a + l, 0);
      const onDisk = statSync(dst).blocks * 512;
      assert.ok(allocated < 16 * MiB, `destination extents hold ${allocated} bytes`);
      assert.ok(onDisk < 16 * MiB, `destination uses ${onDisk} bytes on disk`);

      // Blocks: the data blocks (one zero block inside a piece stays a hole).
      const dataBlocks = r.blocks.total - r.blocks.zero;
      assert.equal(r.blocks.total, Math.ceil(SIZE / BS));
      assert.ok(dataBlocks >= Math.ceil(dataBytes / BS) && dataBlocks < Math.ceil(dataBytes / BS) + 32, `${dataBlocks} data blocks`);
      if (strategy === 'full') assert.equal(r.blocks.sent, dataBlocks, 'full sends every data block');
      else assert.equal(r.blocks.filledFromNeighbours, dataBlocks, 'similarity fills every data block from the full copy');

      // Metadata: 16 bytes of fingerprint and signature per data block, a SHA-1 per data extent; the 4 TiB of holes cost the rest.
      const s = r.wire.sent, rec = r.wire.received;
      const metadata = s.fingerprints! + s.control! + s.verify!;
      const received = Object.values(rec).reduce((a, b) => a + b, 0);
      const perData = 16 * dataBlocks + 32 * Math.ceil(dataBlocks / 256) * 2;
      assert.ok(metadata < 64 * KiB, `metadata sent: ${metadata} B (fingerprints ${s.fingerprints}, control ${s.control}, verify ${s.verify}); received ${received} B; ${dataBlocks} data blocks`);
      assert.ok(metadata - perData < 8 * KiB, `metadata beyond what the ${dataBlocks} data blocks need (${perData} B): ${metadata - perData} B`);
      assert.ok(received < 16 * KiB, `received ${received} B`);

      t.diagnostic(`${strategy}: ${r.seconds.toFixed(2)} s; metadata sent ${metadata} B (fingerprints ${s.fingerprints}, control ${s.control}, verify ${s.verify}), received ${received} B, data ${s.data} B; ${dataBlocks} data blocks; destination ${allocated} B allocated, ${onDisk} B on disk; journal max ${journalMax} B; RSS +${((rssMax - rss0) / MiB).toFixed(1)} MiB; compared ${compared} B`);
      assert.ok(journalMax > 0 && journalMax < 4 * KiB, `the journal reached ${journalMax} bytes`);
      assert.ok(rssMax - rss0 < 512 * MiB, `resident memory grew by ${((rssMax - rss0) / MiB).toFixed(1)} MiB for a ${SIZE}-byte image`);
    });
  }
});
