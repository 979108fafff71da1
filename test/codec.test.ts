// The wire codecs (none, zstd on one streaming context per direction) and the
// adaptive level: round trips over many frames, the shared history, level
// changes mid-stream, corrupt, truncated and oversized payloads, and the
// level decisions on synthetic measurements.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ErrorCode } from '../src/errors.js';
import {
  CodecId, CODECS, codecName, createCompressor, createDecompressor, parseCompress, ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL,
} from '../src/protocol/codec.js';
import { AdaptiveLevel, type AdaptDecision } from '../src/protocol/adapt.js';
import { rng, seededBytes } from './util.js';

const MiB = 1 << 20;
const BS = 4096;

/** Compressible "disk" content: 4 KiB blocks of text-like records, some zero blocks, some repeated blocks. */
function diskLike(seed: number, bytes: number): Buffer {
  const out = Buffer.alloc(bytes);
  const r = rng(seed);
  const words = ['inode', 'extent', 'journal', 'superblock', 'bitmap', 'blockferry', 'zstd', 'frame', 'libc.so.6', '\n'];
  for (let b = 0; b < bytes / BS; b++) {
    const kind = r() % 8;
    const blk = out.subarray(b * BS, (b + 1) * BS);
    if (kind === 0) continue; // zero block
    if (kind === 1 && b > 0) { const src = r() % b; blk.set(out.subarray(src * BS, src * BS + blk.length)); continue; }
    let p = 0;
    while (p < blk.length) p += blk.write(`${words[r() % words.length]} ${r() % 1000} `, p) || blk.length;
  }
  return out;
}

const PROTOCOL = { code: ErrorCode.PROTOCOL };

describe('codec table', () => {
  it('names the codecs by their wire id', () => {
    assert.deepEqual(CODECS.map((c) => [c.id, c.name]), [[0, 'none'], [1, 'zstd']]);
    assert.equal(codecName(CodecId.NONE), 'none');
    assert.equal(codecName(CodecId.ZSTD), 'zstd');
    assert.throws(() => codecName(7), PROTOCOL);
    assert.throws(() => createCompressor(7), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => createDecompressor(7), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => createCompressor(CodecId.ZSTD, 23), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => createCompressor(CodecId.ZSTD, 1.5), { code: ErrorCode.INVALID_ARGUMENT });
  });

  it('none passes payloads through and checks their size', () => {
    const c = createCompressor(CodecId.NONE);
    const d = createDecompressor(CodecId.NONE);
    const p = seededBytes(1, 5000);
    assert.deepEqual(d.decompress(c.compress(p), 5000), Buffer.from(p));
    assert.throws(() => d.decompress(p, 4999), PROTOCOL);
  });
});

describe('parseCompress', () => {
  it('accepts auto, none, zstd and zstd:LEVEL', () => {
    assert.deepEqual(parseCompress('auto'), { mode: 'auto' });
    assert.deepEqual(parseCompress('none'), { mode: 'none' });
    assert.deepEqual(parseCompress('zstd'), { mode: 'zstd' });
    assert.deepEqual(parseCompress('zstd:1'), { mode: 'zstd', level: 1 });
    assert.deepEqual(parseCompress('zstd:19'), { mode: 'zstd', level: 19 });
    assert.deepEqual(parseCompress('zstd:-5'), { mode: 'zstd', level: -5 });
  });
  it('refuses anything else with INVALID_ARGUMENT', () => {
    for (const bad of ['', 'gzip', 'zstd:', 'zstd:x', 'zstd:3.5', 'zstd:20', `zstd:${ZSTD_MIN_LEVEL - 1}`, 'ZSTD', 'zstd:3 ', 'auto:3', 'none:1', 'zstd:1e3']) {
      assert.throws(() => parseCompress(bad), { code: ErrorCode.INVALID_ARGUMENT }, JSON.stringify(bad));
    }
    assert.throws(() => parseCompress(3 as unknown as string), { code: ErrorCode.INVALID_ARGUMENT });
  });
});

describe('zstd stream', () => {
  it('round-trips many frames of varied sizes on one stream', () => {
    const c = createCompressor(CodecId.ZSTD, 3);
    const d = createDecompressor(CodecId.ZSTD);
    const r = rng(5);
    let wire = 0;
    let raw = 0;
    for (let i = 0; i < 40; i++) {
      const size = i === 0 ? 0 : i % 7 === 0 ? 1 + (r() % 5000) : MiB;
      const frame = i % 5 === 4 ? Buffer.from(seededBytes(i, size)) : diskLike(i, size);
      const z = c.compress(frame);
      wire += z.length;
      raw += size;
      assert.deepEqual(d.decompress(z, size), frame, `frame ${i}`);
    }
    assert.ok(wire < raw * 0.6, `compressed ${wire} of ${raw}`);
    c.close();
    d.close();
  });

  it('shares one context across frames: a frame repeating the previous one costs almost nothing', () => {
    const c = createCompressor(CodecId.ZSTD, 1);
    const d = createDecompressor(CodecId.ZSTD);
    const frame = Buffer.from(seededBytes(9, MiB)); // incompressible on its own
    const z1 = c.compress(frame);
    const z2 = c.compress(frame);
    assert.ok(z1.length > MiB, `first frame stored: ${z1.length}`);
    assert.ok(z2.length < 1024, `second frame ${z2.length} bytes`);
    assert.deepEqual(d.decompress(z1, MiB), frame);
    assert.deepEqual(d.decompress(z2, MiB), frame);
  });

  it('keeps the stream decodable across level changes, and the new level takes effect', () => {
    const c = createCompressor(CodecId.ZSTD, 1);
    const d = createDecompressor(CodecId.ZSTD);
    const sizes = new Map<number, number>();
    const levels = [1, 1, 19, 19, -5, -5, 9, 3, ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL, 3, 3];
    levels.forEach((level, i) => {
      c.setLevel(level);
      assert.equal(c.level, level);
      const frame = diskLike(100 + i, MiB);
      const z = c.compress(frame);
      sizes.set(level, z.length);
      assert.deepEqual(d.decompress(z, MiB), frame, `frame ${i} at level ${level}`);
    });
    assert.ok(sizes.get(19)! < sizes.get(-5)!, `level 19 ${sizes.get(19)} vs level -5 ${sizes.get(-5)}`);
    assert.throws(() => c.setLevel(99), { code: ErrorCode.INVALID_ARGUMENT });
  });

  it('passes random data through at little cost', () => {
    const c = createCompressor(CodecId.ZSTD, 3);
    const d = createDecompressor(CodecId.ZSTD);
    for (let i = 0; i < 4; i++) {
      const frame = Buffer.from(seededBytes(50 + i, MiB));
      const z = c.compress(frame);
      assert.ok(z.length <= MiB * 1.001, `${z.length}`);
      assert.deepEqual(d.decompress(z, MiB), frame);
    }
  });

  it('refuses a corrupted payload with ERR_BF_PROTOCOL, and stays broken', () => {
    const c = createCompressor(CodecId.ZSTD, 3);
    const frame = diskLike(3, MiB);
    const z = c.compress(frame);
    let refused = 0;
    for (const at of [0, 1, 2, 3, 4, 5, 8, 20, 100, z.length >> 1, z.length - 3]) {
      const bad = Buffer.from(z);
      bad[at]! ^= 0xff;
      const d = createDecompressor(CodecId.ZSTD);
      try {
        const out = d.decompress(bad, MiB);
        // A flip inside a literal can decode to other bytes of the right size: the frame's digest catches those.
        assert.notDeepEqual(out, frame, `byte ${at}`);
      } catch (err) {
        assert.equal((err as { code?: string }).code, ErrorCode.PROTOCOL, `byte ${at}: ${(err as Error).message}`);
        assert.throws(() => d.decompress(z, MiB), PROTOCOL); // broken for good
        refused++;
      }
    }
    assert.ok(refused >= 6, `refused ${refused}`);
    assert.throws(() => createDecompressor(CodecId.ZSTD).decompress(Buffer.from('not zstd at all, not at all'), 100), PROTOCOL);
  });

  it('refuses a truncated payload', () => {
    const c = createCompressor(CodecId.ZSTD, 3);
    const frame = diskLike(4, MiB);
    const z = c.compress(frame);
    for (const len of [0, 3, 10, z.length >> 1, z.length - 1]) {
      assert.throws(() => createDecompressor(CodecId.ZSTD).decompress(z.subarray(0, len), MiB), PROTOCOL, `length ${len}`);
    }
  });

  it('refuses a payload that decodes to more or fewer bytes than declared', () => {
    const c = createCompressor(CodecId.ZSTD, 3);
    const z = c.compress(diskLike(6, MiB));
    assert.throws(() => createDecompressor(CodecId.ZSTD).decompress(z, MiB - 1), PROTOCOL);
    assert.throws(() => createDecompressor(CodecId.ZSTD).decompress(z, MiB + 1), PROTOCOL);
    // Two payloads glued into one: content past the declared size.
    const c2 = createCompressor(CodecId.ZSTD, 3);
    const a = c2.compress(diskLike(7, 64 * 1024));
    const b = c2.compress(diskLike(8, 64 * 1024));
    assert.throws(() => createDecompressor(CodecId.ZSTD).decompress(Buffer.concat([a, b]), 64 * 1024), PROTOCOL);
  });

  it('stops a decompression bomb at the declared size without allocating its output', () => {
    const zeros = Buffer.alloc(64 * MiB);
    const c = createCompressor(CodecId.ZSTD, 3);
    const bomb = c.compress(zeros);
    assert.ok(bomb.length < 64 * 1024, `bomb ${bomb.length} bytes`);
    globalThis.gc?.();
    const before = process.memoryUsage();
    const d = createDecompressor(CodecId.ZSTD);
    assert.throws(() => d.decompress(bomb, MiB), PROTOCOL);
    const after = process.memoryUsage();
    // The output buffer is expectedSize (1 MiB); the decoder's window is at most 8 MiB.
    assert.ok(after.arrayBuffers - before.arrayBuffers < 8 * MiB, `arrayBuffers grew ${(after.arrayBuffers - before.arrayBuffers) / MiB} MiB`);
    assert.ok(after.rss - before.rss < 32 * MiB, `rss grew ${(after.rss - before.rss) / MiB} MiB`);
  });
});

// --- adaptive level ------------------------------------------------------------

interface Sim {
  /** Link rate in wire bytes per second. */
  link: number;
  /** Compression speed in input bytes per CPU second at a level. */
  speed: (level: number) => number;
  /** Compressed ÷ input at a level. */
  ratio: (level: number) => number;
}

/** Runs n 1 MiB frames through the adapter with a pipelined sender: returns the decisions. */
function simulate(a: AdaptiveLevel, n: number, sim: Sim | ((i: number) => Sim)): AdaptDecision[] {
  const out: AdaptDecision[] = [];
  for (let i = 0; i < n; i++) {
    const s = typeof sim === 'function' ? sim(i) : sim;
    const d = a.decide();
    out.push(d);
    const bytesIn = MiB;
    if (d.codec === 'store') {
      a.record({ bytesIn, bytesOut: bytesIn, compressSeconds: 0, linkBytesPerSecond: s.link, drainWaitSeconds: 0 });
      continue;
    }
    const compressSeconds = bytesIn / s.speed(d.level);
    const bytesOut = Math.round(bytesIn * s.ratio(d.level));
    const sendSeconds = bytesOut / s.link;
    a.record({ bytesIn, bytesOut, compressSeconds, linkBytesPerSecond: s.link, drainWaitSeconds: Math.max(0, sendSeconds - compressSeconds) });
  }
  return out;
}

// Roughly libzstd on this machine: 400 MB/s at level 1, 1.6× slower per level; ratio 0.33 → 0.26.
const speedOf = (level: number) => 400e6 / 1.6 ** (level - 1);
const ratioOf = (level: number) => 0.33 - 0.008 * (level - 1);

describe('AdaptiveLevel', () => {
  it('raises the level on a slow link until the compressor would become the bottleneck', () => {
    const a = new AdaptiveLevel({ minLevel: 1, maxLevel: 19, startLevel: 3 });
    const link = 12.5e6; // 100 Mbit/s
    const d = simulate(a, 200, { link, speed: speedOf, ratio: ratioOf });
    const final = d.at(-1)!;
    assert.equal(final.codec, 'zstd');
    assert.ok(final.level > 3, `level ${final.level}`);
    // Never a level at which compression is slower than the link's time for its output.
    for (const x of d) assert.ok(speedOf(x.level) >= link / ratioOf(x.level), `level ${x.level} chosen`);
    // And not far below the best such level.
    let best = 1;
    while (speedOf(best + 1) >= 1.3 * link / ratioOf(best + 1)) best++;
    assert.ok(final.level >= best - 1, `final ${final.level}, best ${best}`);
    // Level changes are not made on every frame (each one restarts the window).
    const changes = d.filter((x, i) => i > 0 && x.level !== d[i - 1]!.level).length;
    assert.ok(changes <= 10, `${changes} level changes`);
  });

  it('keeps compressing at the lowest level while the compressor is faster than the link, even when compression is the bottleneck', () => {
    // 100 Mbit/s; level 1 compresses 20 MB/s of input to a third: compression is the bottleneck, yet it moves 20 MB/s where storing moves 12.5.
    const a = new AdaptiveLevel({ minLevel: 1, maxLevel: 9, startLevel: 1 });
    const d = simulate(a, 60, { link: 12.5e6, speed: () => 20e6, ratio: () => 0.33 });
    assert.equal(d.filter((x) => x.codec === 'store').length, 0, JSON.stringify(d.slice(0, 10)));
  });

  it('lowers the level when the link gets faster, then stores on loopback', () => {
    const a = new AdaptiveLevel({ minLevel: 1, maxLevel: 19, startLevel: 6 });
    const d = simulate(a, 60, { link: 2e9, speed: speedOf, ratio: ratioOf });
    assert.equal(d[0]!.level, 6);
    assert.ok(d.slice(1, 8).some((x) => x.level < 6), 'lowered');
    const tail = d.slice(-20);
    assert.ok(tail.filter((x) => x.codec === 'store').length >= 18, JSON.stringify(tail));
    // Probes at the lowest level now and then, so that a slower link is noticed.
    const probes = d.filter((x, i) => i > 10 && x.codec === 'zstd');
    assert.ok(probes.length >= 1 && probes.every((x) => x.level === 1), JSON.stringify(probes));
    // The link slows down to 50 MB/s: compression comes back.
    const later = simulate(a, 40, { link: 50e6, speed: speedOf, ratio: ratioOf });
    assert.equal(later.at(-1)!.codec, 'zstd');
  });

  it('stores incompressible data and compresses again when it compresses', () => {
    const a = new AdaptiveLevel();
    const d = simulate(a, 40, { link: 12.5e6, speed: () => 800e6, ratio: () => 1.0 });
    assert.equal(d[0]!.codec, 'zstd');
    assert.ok(d.slice(1).filter((x) => x.codec === 'store').length >= 35);
    const later = simulate(a, 40, { link: 12.5e6, speed: speedOf, ratio: ratioOf });
    assert.ok(later.slice(-10).every((x) => x.codec === 'zstd'), JSON.stringify(later.slice(-10)));
  });

  it('stays at its level without link measurements when the sender does not wait', () => {
    const a = new AdaptiveLevel({ startLevel: 3 });
    for (let i = 0; i < 20; i++) {
      const d = a.decide();
      assert.deepEqual(d, { codec: 'zstd', level: 3 });
      a.record({ bytesIn: MiB, bytesOut: MiB / 3, compressSeconds: 0.005, drainWaitSeconds: 0 });
    }
  });
});
