// Zero detection must be exact: a block whose only non-zero byte is its first
// or last, or sits on a vector-lane boundary, is not zero.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { Engine, ErrorCode } from '../src/index.js';

const engine = new Engine({ initialBytes: 4 << 20 });

describe('zero detection', () => {
  it('isZero sees a single non-zero byte at every position of every length 0..300', () => {
    const region = engine.alloc(512);
    const mem = () => engine.view(region);
    mem().fill(0);
    for (let len = 0; len <= 300; len++) {
      assert.equal(engine.core.isZero(region.ptr + 1, len), 1, `all-zero length ${len}`);
      for (let pos = 0; pos < len; pos++) {
        mem()[1 + pos] = 0x01;
        assert.equal(engine.core.isZero(region.ptr + 1, len), 0, `length ${len}, byte ${pos}`);
        mem()[1 + pos] = 0;
      }
      // A non-zero byte just outside the range must not count.
      mem()[1 + len] = 0xff;
      mem()[0] = 0xff;
      assert.equal(engine.core.isZero(region.ptr + 1, len), 1, `neighbours of length ${len}`);
      mem()[1 + len] = 0;
      mem()[0] = 0;
    }
  });

  it('flags only the block holding the one non-zero byte, for every position in a 4 KiB block', () => {
    const bs = 4096;
    const region = engine.alloc(3 * bs);
    const flags = engine.alloc(3);
    engine.view(region).fill(0);
    for (let pos = 0; pos < bs; pos++) {
      for (const value of [0x01, 0x80]) {
        engine.view(region)[bs + pos] = value;
        const zeros = engine.zeroFlagsAt(region.ptr, 3 * bs, bs, flags.ptr);
        const f = engine.view(flags);
        assert.deepEqual([f[0], f[1], f[2], zeros], [1, 0, 1, 2], `byte ${pos} = ${value}`);
        engine.view(region)[bs + pos] = 0;
      }
    }
  });

  it('checks first, last and lane-boundary bytes for every block size 512 B..1 MiB', () => {
    for (let bs = 512; bs <= 1 << 20; bs *= 2) {
      const data = new Uint8Array(2 * bs);
      const positions = new Set([0, 1, 7, 8, 15, 16, 17, 31, 32, 63, 64, 65, 127, 128, 129, bs / 2 - 1, bs / 2, bs - 129, bs - 128, bs - 17, bs - 16, bs - 2, bs - 1]);
      for (const pos of positions) {
        data[bs + pos] = 1;
        assert.deepEqual([...engine.zeroFlags(data, bs)], [1, 0], `bs ${bs} byte ${pos}`);
        data[bs + pos] = 0;
      }
      assert.deepEqual([...engine.zeroFlags(data, bs)], [1, 1]);
    }
  });

  it('handles a short final block of every length, non-zero only in its last byte', () => {
    const bs = 512;
    for (let tail = 1; tail <= 300; tail++) {
      const data = new Uint8Array(2 * bs + tail);
      assert.deepEqual([...engine.zeroFlags(data, bs)], [1, 1, 1]);
      data[data.length - 1] = 9;
      assert.deepEqual([...engine.zeroFlags(data, bs)], [1, 1, 0], `tail ${tail}`);
    }
  });

  it('reports zero runs as (first block, count) like a plain JS scan', () => {
    fc.assert(
      fc.property(fc.array(fc.boolean(), { minLength: 0, maxLength: 200 }), (zeroBlocks) => {
        const bs = 512;
        const data = new Uint8Array(zeroBlocks.length * bs);
        zeroBlocks.forEach((z, i) => { if (!z) data[i * bs + ((i * 37) % bs)] = 1; });
        const expected: Array<[number, number]> = [];
        for (let i = 0; i < zeroBlocks.length; i++) {
          if (!zeroBlocks[i]) continue;
          const last = expected[expected.length - 1];
          if (last && last[0] + last[1] === i) last[1]++;
          else expected.push([i, 1]);
        }
        assert.deepEqual(engine.zeroRuns(data, bs), expected);
      }),
      { numRuns: 300, seed: 42 },
    );
  });

  it('rejects a flags buffer that would run past memory', () => {
    const end = engine.memory.buffer.byteLength;
    assert.throws(() => engine.zeroFlagsAt(2048, 4096, 512, end - 4), { code: ErrorCode.INVALID_ARGUMENT });
  });
});

describe('flag runs', () => {
  it('finds runs of set and of clear bytes for any byte values, like a plain JS scan', () => {
    const engine2 = new Engine();
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }).map((a) => a.map((b) => (b < 100 ? 0 : b))), fc.boolean(), (flags, set) => {
        const f = engine2.alloc(flags.length + 16);
        const out = engine2.alloc(Math.ceil(flags.length / 2) * 8 + 8);
        engine2.view(f, 0, flags.length).set(flags);
        const n = engine2.flagRunsAt(f.ptr, flags.length, out.ptr, set);
        const got = [...new Uint32Array(engine2.memory.buffer, out.ptr, 2 * n)];
        const want: number[] = [];
        for (let i = 0; i < flags.length; ) {
          if ((flags[i] !== 0) !== set) { i++; continue; }
          const s = i;
          while (i < flags.length && (flags[i] !== 0) === set) i++;
          want.push(s, i - s);
        }
        assert.deepEqual(got, want);
      }),
      { numRuns: 500, seed: 3 },
    );
  });
});
