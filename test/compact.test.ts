// The compact block map: cost follows the data. A 1 TiB sparse image is
// scanned with map and memory sized by its few data regions; zero blocks
// inside data extents, blocks straddling extent boundaries and a short last
// block land in the right runs; coalesced tasks, 1 or 2 workers and one task
// per extent give the same map; v1 and damaged files are refused and rebuilt;
// the worker's result buffer is moved, not copied.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Piscina } from 'piscina';
import { Scanner, blockMapsFor, planTasks } from '../src/scan/scanner.js';
import { BlockMap } from '../src/blockmap/blockmap.js';
import { MapCache } from '../src/blockmap/cache.js';
import { currentIdentity } from '../src/image/source.js';
import { Engine } from '../src/engine/engine.js';
import { treeChecksum } from '../src/engine/checksum.js';
import { nativeStatus } from '../src/engine/backend.js';
import { readResult, type ScanTask } from '../src/scan/layout.js';
import { ErrorCode } from '../src/index.js';
import { seededBytes } from './util.js';

const KiB = 1024, MiB = 1 << 20, GiB = 2 ** 30, TiB = 2 ** 40;
const native = nativeStatus().loaded;
let dir: string;
let scanner: Scanner;
const engine = new Engine({ initialBytes: 8 * MiB });
before(() => { dir = mkdtempSync(join(tmpdir(), 'bf-compact-')); scanner = new Scanner({ workers: 2 }); });
after(async () => { await scanner.close(); rmSync(dir, { recursive: true, force: true }); });

/** A sparse file of `size` bytes with data written at the given offsets. */
function sparse(name: string, size: number, writes: Array<[number, Uint8Array]>): string {
  const p = join(dir, name);
  writeFileSync(p, '');
  truncateSync(p, size);
  const fd = openSync(p, 'r+');
  for (const [at, d] of writes) writeSync(fd, d, 0, d.length, at);
  closeSync(fd);
  return p;
}

/**
 * The map a scan must produce, computed independently: read the block-aligned
 * ranges around every write (everything else is a hole), zero-test and
 * fingerprint them with the engine's copying calls, no scanner code.
 */
function reference(path: string, size: number, writes: Array<[number, Uint8Array]>, bs: number) {
  const ranges: Array<[number, number]> = [];
  for (const [at, d] of [...writes].sort((a, b) => a[0] - b[0])) {
    const s = Math.floor(at / bs), e = Math.ceil((at + d.length) / bs);
    const last = ranges[ranges.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else ranges.push([s, e]);
  }
  const runs: number[] = [];
  const fps: bigint[] = [], sigs: bigint[] = [];
  const fd = openSync(path, 'r');
  for (const [s, e] of ranges) {
    const len = Math.min(e * bs, size) - s * bs;
    const buf = Buffer.alloc(len);
    readSync(fd, buf, 0, len, s * bs);
    const zero = engine.zeroFlags(buf, bs);
    const f = engine.fingerprints(buf, bs);
    for (let i = 0; i < zero.length; i++) {
      if (zero[i]) continue;
      const b = s + i, n = runs.length;
      if (n && runs[n - 2]! + runs[n - 1]! === b) runs[n - 1]!++;
      else runs.push(b, 1);
      fps.push(f.fingerprints[i]!);
      sigs.push(f.signatures[i]!);
    }
  }
  closeSync(fd);
  return { runs, fps, sigs };
}

function assertSameMap(a: BlockMap, b: BlockMap, what: string): void {
  assert.deepEqual([...a.dataRuns], [...b.dataRuns], `${what}: runs`);
  assert.deepEqual(a.fingerprints, b.fingerprints, `${what}: fingerprints`);
  assert.deepEqual(a.signatures, b.signatures, `${what}: signatures`);
  assert.deepEqual(a.digests, b.digests, `${what}: digests`);
}

describe('compact block map of a sparse image far beyond memory', () => {
  // 1 TiB + 1000 bytes: a short last block. Data: 5 blocks with a zero block
  // inside the written extent; 3 blocks straddling the 4 GiB line (and, at
  // 64 KiB blocks, an extent boundary inside a block); an unaligned write at
  // 300 GiB + 12345; and the short last block.
  const size = TiB + 1000;
  const five = Buffer.concat([seededBytes(1, 3 * 4096), new Uint8Array(4096), seededBytes(2, 4096)]);
  const writes: Array<[number, Uint8Array]> = [
    [0, five],
    [4 * GiB - 4096, seededBytes(3, 3 * 4096)],
    [300 * GiB + 12345, seededBytes(4, 10000)],
    [TiB, seededBytes(5, 1000)],
  ];
  let path: string;
  before(() => { path = sparse('1t.img', size, writes); });

  it('scans with the map, its file and the process memory following the data', { skip: !native && 'needs the native addon (SEEK_DATA)' }, async () => {
    global.gc?.();
    const rss0 = process.memoryUsage().rss;
    const maps = await scanner.scan(path, { blockSize: [4096, 65536], sha1: true });
    const grew = process.memoryUsage().rss - rss0;
    for (const m of maps) {
      const bs = m.blockSize;
      const ref = reference(path, size, writes, bs);
      assert.equal(m.count, Math.ceil(size / bs), `${bs}: count`);
      assert.deepEqual([...m.dataRuns], ref.runs, `${bs}: runs`);
      assert.equal(m.dataBlocks, ref.fps.length);
      assert.equal(m.runCount, ref.runs.length / 2);
      assert.deepEqual([...m.fingerprints], ref.fps, `${bs}: fingerprints`);
      assert.deepEqual([...m.signatures], ref.sigs, `${bs}: signatures`);
      assert.equal(m.blockLength(m.count - 1), bs === 4096 ? 1000 : (TiB + 1000) % bs);
    }
    const m4 = maps[0]!;
    // 4 KiB: [0,3] [4,1] (a zero block inside the extent), 3 across 4 GiB, 3 blocks at 300 GiB (unaligned), the last.
    assert.deepEqual([...m4.dataRuns].slice(0, 4), [0, 3, 4, 1]);
    assert.equal(m4.runCount, 5);
    assert.equal(m4.dataBlocks, 4 + 3 + 3 + 1);
    assert.ok(m4.isZero(3) && !m4.isZero(4) && m4.indexOf(4) === 3);
    assert.equal(m4.indexOf(m4.count - 1), m4.dataBlocks - 1);
    assert.equal(m4.digest(m4.count - 2), undefined);
    assert.deepEqual([...m4.runsWithin(1, 4)], [{ start: 1, count: 2, index: 1 }, { start: 4, count: 1, index: 3 }]);
    const file = join(dir, '1t.4096.bfmap');
    m4.save(file);
    assert.ok(statSync(file).size < 2 * KiB, `map file of ${statSync(file).size} bytes`);
    assertSameMap(BlockMap.load(file, path), m4, 'saved and loaded');
    // A dense map would hold 17 bytes x 268 M blocks = 4.5 GB; allow the workers' windows and slack.
    assert.ok(grew < 256 * MiB, `the process grew by ${grew} bytes`);
  });

  it('gives the same maps with 1 and 2 workers, and with one task per extent', { skip: !native && 'needs the native addon (SEEK_DATA)' }, async () => {
    const one = new Scanner({ workers: 1 });
    try {
      const a = await one.scan(path, { blockSize: [512, 4096, 65536], sha1: true });
      const b = await scanner.scan(path, { blockSize: [512, 4096, 65536], sha1: true });
      const c = await scanner.scan(path, { blockSize: [512, 4096, 65536], sha1: true, coalesce: false, rangeBytes: 4 * MiB });
      for (let k = 0; k < 3; k++) {
        assertSameMap(a[k]!, b[k]!, `1 vs 2 workers, size ${k}`);
        assertSameMap(a[k]!, c[k]!, `coalesced vs one task per extent, size ${k}`);
      }
    } finally {
      await one.close();
    }
  });
});

describe('coalesced scan tasks', () => {
  it('groups small extents into tasks of the target size and cuts long ones on block boundaries', () => {
    const small = Array.from({ length: 3277 }, (_, i) => ({ offset: i * 16 * KiB, length: 4 * KiB }));
    const tasks = planTasks(small, 8 * MiB);
    assert.equal(tasks.length, Math.ceil((3277 * 4 * KiB) / (8 * MiB)));
    assert.deepEqual(tasks.flat(), small);
    const long = planTasks([{ offset: 0, length: 20 * MiB + 100 }, { offset: 30 * MiB, length: 64 * KiB }], 8 * MiB);
    assert.deepEqual(long.map((t) => t.map((x) => [x.offset, x.length])), [
      [[0, 8 * MiB]], [[8 * MiB, 8 * MiB]], [[16 * MiB, 4 * MiB + 100], [30 * MiB, 64 * KiB]],
    ]);
  });

  it('gives the map of a file with thousands of small extents whatever the task plan, and of reading it whole', async () => {
    // 3000 extents of 4 KiB, one every 20 KiB, some all zero (written zeros: data extents holding zero blocks).
    const writes: Array<[number, Uint8Array]> = [];
    for (let i = 0; i < 3000; i++) writes.push([i * 20 * KiB + (i % 3) * 4096, i % 7 === 0 ? new Uint8Array(4096) : seededBytes(100 + i, 4096)]);
    const size = 3000 * 20 * KiB + 777;
    const p = sparse('fragmented.img', size, writes);
    const opts = { blockSize: [4096, 65536], sha1: true };
    const coalesced = await scanner.scan(p, opts);
    const perExtent = await scanner.scan(p, { ...opts, coalesce: false });
    const whole = await scanner.scan(p, { ...opts, extents: false });
    for (let k = 0; k < 2; k++) {
      assertSameMap(coalesced[k]!, perExtent[k]!, 'coalesced vs per extent');
      assertSameMap(coalesced[k]!, whole[k]!, 'coalesced vs read whole');
      const ref = reference(p, size, writes, coalesced[k]!.blockSize);
      assert.deepEqual([...coalesced[k]!.dataRuns], ref.runs);
      assert.deepEqual([...coalesced[k]!.fingerprints], ref.fps);
    }
  });
});

describe('block map v2 files', () => {
  const BS = 4096;
  /** Rewrites the checksum trailer, so that only the field under test is wrong. */
  const resum = (b: Buffer) => { b.writeBigUInt64LE(treeChecksum(b.subarray(0, b.length - 8)), b.length - 8); return b; };

  it('refuses a v1 file with UNSUPPORTED_VERSION, and blockMapsFor rebuilds it', async () => {
    const p = join(dir, 'old.img');
    writeFileSync(p, Buffer.concat([seededBytes(1, BS), new Uint8Array(BS), seededBytes(2, BS)]));
    // A well-formed version 1 map (docs/FORMATS.md before v2): dense zero flags and columns.
    const st = statSync(p, { bigint: true });
    const n = 3;
    const v1 = Buffer.alloc(64 + 8 + 16 * n + 8);
    v1.write('BFBLKMAP', 0, 'latin1');
    v1.writeUInt32LE(1, 8);
    v1.writeUInt32LE(BS, 16);
    v1.writeBigUInt64LE(BigInt(3 * BS), 24);
    v1.writeBigUInt64LE(BigInt(n), 32);
    v1.writeBigUInt64LE(st.ino, 40);
    v1.writeBigUInt64LE(st.dev, 48);
    v1.writeBigUInt64LE(st.mtimeNs, 56);
    v1[64 + 1] = 1;
    resum(v1);
    assert.throws(() => BlockMap.fromBytes(v1, p), { code: ErrorCode.UNSUPPORTED_VERSION });
    const cache = new MapCache({ dir: join(dir, 'v1-cache') });
    const file = cache.fileFor({ kind: 'raw', identity: currentIdentity(p), blockSize: BS })!;
    mkdirSync(cache.dir!, { recursive: true });
    writeFileSync(file, v1);
    const notices: string[] = [];
    const r = await blockMapsFor(scanner, p, { blockSize: BS, cache, onNotice: (_, m) => notices.push(m) });
    assert.equal(r.source, 'scanned');
    assert.match(notices.join(), new RegExp(ErrorCode.UNSUPPORTED_VERSION));
    assert.deepEqual(r.files, [file]);
    assert.equal(readFileSync(file).readUInt32LE(8), 2, 'rewritten as version 2');
    assert.deepEqual([...BlockMap.load(file, p).dataRuns], [0, 1, 2, 1]);
    assert.equal((await blockMapsFor(scanner, p, { blockSize: BS, cache })).source, 'loaded');
  });

  it('refuses runs and counts that break the invariants, and hostile sizes before allocating', async () => {
    // blocks: A 0 B 0 0 -> runs [0,1] [2,1], two columns
    const p = join(dir, 'fields.img');
    writeFileSync(p, Buffer.concat([seededBytes(1, BS), new Uint8Array(BS), seededBytes(2, BS), new Uint8Array(2 * BS)]));
    const [m] = await scanner.scan(p, { blockSize: BS, sha1: true });
    const file = join(dir, 'fields.bfmap');
    m!.save(file);
    const good = readFileSync(file);
    assert.equal(good.length, 80 + 2 * 16 + 2 * 16 + 40 + 8);
    assertSameMap(BlockMap.fromBytes(good, p), m!, 'round trip');
    const RUNS = 80;
    const edit = (f: (b: Buffer) => void) => { const b = Buffer.from(good); f(b); return b; };
    const cases: Array<[string, Buffer, string]> = [
      ['runs out of order', resum(edit((b) => { b.writeBigUInt64LE(2n, RUNS); b.writeBigUInt64LE(0n, RUNS + 16); })), ErrorCode.CORRUPT],
      ['touching runs (not maximal)', resum(edit((b) => b.writeBigUInt64LE(1n, RUNS + 16))), ErrorCode.CORRUPT],
      ['run past the image', resum(edit((b) => b.writeBigUInt64LE(4n, RUNS + 16 + 8))), ErrorCode.CORRUPT],
      ['empty run', resum(edit((b) => b.writeBigUInt64LE(0n, RUNS + 8))), ErrorCode.CORRUPT],
      ['run counts do not match the columns', resum(edit((b) => b.writeBigUInt64LE(2n, RUNS + 16 + 8))), ErrorCode.CORRUPT],
      ['run number past 2^53', resum(edit((b) => b.writeBigUInt64LE(2n ** 60n, RUNS + 16))), ErrorCode.CORRUPT],
      ['unknown flag', resum(edit((b) => b.writeUInt32LE(3, 12))), ErrorCode.CORRUPT],
      ['block count that does not cover the size', resum(edit((b) => b.writeBigUInt64LE(6n, 32))), ErrorCode.CORRUPT],
      ['hostile run count', edit((b) => b.writeBigUInt64LE(2n ** 62n, 64)), ErrorCode.TRUNCATED],
      ['hostile block count', edit((b) => b.writeBigUInt64LE(2n ** 63n, 72)), ErrorCode.TRUNCATED],
      ['one run fewer than the file holds', edit((b) => b.writeBigUInt64LE(1n, 64)), ErrorCode.CORRUPT],
      ['flipped digest bit', edit((b) => { b[b.length - 20]! ^= 1; }), ErrorCode.CHECKSUM_MISMATCH],
    ];
    for (const [what, bytes, code] of cases) assert.throws(() => BlockMap.fromBytes(bytes, p), { code }, what);
    // More runs than non-zero blocks (two runs, one column), framed consistently.
    const twoRunsOneBlock = Buffer.concat([good.subarray(0, RUNS + 32 + 8), good.subarray(RUNS + 32 + 16, RUNS + 32 + 24), Buffer.alloc(24), Buffer.alloc(8)]);
    twoRunsOneBlock.writeBigUInt64LE(1n, 72);
    assert.throws(() => BlockMap.fromBytes(resum(twoRunsOneBlock), p), { code: ErrorCode.CORRUPT });
  });
});

describe('scan worker results', () => {
  it('are moved to the main thread, not copied: the worker\'s buffer is detached after the send', async () => {
    const p = join(dir, 'moved.img');
    writeFileSync(p, Buffer.concat([seededBytes(1, 64 * KiB), new Uint8Array(64 * KiB), seededBytes(2, 64 * KiB)]));
    const pool = new Piscina({ filename: new URL('./fixtures/transfer-probe.cjs', import.meta.url).href, minThreads: 1, maxThreads: 1 });
    try {
      const task: ScanTask = { source: { kind: 'file', path: p }, extents: [{ offset: 0, length: 192 * KiB }], blockSizes: [4096], sha1: false, imageSize: 192 * KiB };
      const got = (await pool.run({ task })) as ArrayBuffer;
      assert.ok(got instanceof ArrayBuffer && got.byteLength > 0);
      const [piece] = readResult(got, 1, false);
      assert.deepEqual([...piece!.runs], [0, 16, 32, 16]);
      const probe = (await pool.run({ probe: true })) as { before: number; after: number };
      assert.equal(probe.before, got.byteLength, 'the worker held the buffer it returned');
      assert.equal(probe.after, 0, 'the worker\'s buffer is detached: it was transferred');
    } finally {
      await pool.destroy();
    }
  });
});
