// Bitmap kernels against a plain boolean-array model, on random operations.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { Bitmap, ErrorCode, type Run } from '../src/index.js';

function modelRuns(bits: boolean[], value: boolean, from = 0): Run[] {
  const runs: Run[] = [];
  let i = from;
  while (i < bits.length) {
    if (bits[i] !== value) { i++; continue; }
    const start = i;
    while (i < bits.length && bits[i] === value) i++;
    runs.push({ start, length: i - start });
  }
  return runs;
}

const op = (nbits: number) =>
  fc.record({
    set: fc.boolean(),
    start: fc.nat({ max: nbits }),
    count: fc.nat({ max: nbits }),
  }).map(({ set, start, count }) => ({ set, start: Math.min(start, nbits), count: Math.min(count, nbits - Math.min(start, nbits)) }));

describe('bitmap', () => {
  it('matches a boolean-array model for fills, counts and runs', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 3000 }).chain((nbits) => fc.tuple(fc.constant(nbits), fc.array(op(nbits), { maxLength: 25 }), fc.nat({ max: nbits - 1 }))),
        ([nbits, ops, from]) => {
          const bm = new Bitmap(nbits);
          const model = new Array<boolean>(nbits).fill(false);
          for (const o of ops) {
            if (o.set) bm.setRange(o.start, o.count);
            else bm.clearRange(o.start, o.count);
            model.fill(o.set, o.start, o.start + o.count);
          }
          assert.equal(bm.count(), model.filter(Boolean).length);
          assert.equal(bm.count(from), model.slice(from).filter(Boolean).length);
          assert.deepEqual([...bm.allRuns(true)], modelRuns(model, true));
          assert.deepEqual([...bm.allRuns(false)], modelRuns(model, false));
          assert.deepEqual([...bm.allRuns(true, from)], modelRuns(model, true, from));
          assert.deepEqual(bm.nextRun(from, true), modelRuns(model, true, from)[0]);
          assert.deepEqual(bm.nextRun(from, false), modelRuns(model, false, from)[0]);
          for (let i = 0; i < nbits; i += 97) assert.equal(bm.get(i), model[i]);
        },
      ),
      { numRuns: 400, seed: 7 },
    );
  });

  it('finds runs touching the first and the last bit', () => {
    for (const nbits of [1, 63, 64, 65, 127, 128, 129, 511, 512, 513, 4097]) {
      const bm = new Bitmap(nbits);
      bm.set(0);
      bm.set(nbits - 1);
      const expected = nbits === 1 ? [{ start: 0, length: 1 }] : [{ start: 0, length: 1 }, { start: nbits - 1, length: 1 }];
      assert.deepEqual([...bm.allRuns(true)], expected, `nbits ${nbits}`);
      bm.setRange(0, nbits);
      assert.deepEqual([...bm.allRuns(true)], [{ start: 0, length: nbits }]);
      assert.deepEqual([...bm.allRuns(false)], []);
      bm.clearRange(0, nbits);
      assert.deepEqual([...bm.allRuns(false)], [{ start: 0, length: nbits }]);
      assert.equal(bm.count(), 0);
    }
  });

  it('scans a 256 Mi-bit bitmap: far-apart runs, a run at the very end, more runs than one batch', () => {
    const nbits = 2 ** 28;
    const bm = new Bitmap(nbits);
    const expected: Run[] = [];
    for (let i = 0; i < 10_000; i++) {
      const start = 5 + i * 26_843 + (i % 64);
      const length = 1 + (i % 130);
      bm.setRange(start, length);
      expected.push({ start, length });
    }
    bm.setRange(nbits - 70, 70);
    expected.push({ start: nbits - 70, length: 70 });
    assert.deepEqual([...bm.allRuns(true)], expected);
    assert.equal(bm.count(), expected.reduce((s, r) => s + r.length, 0));
    const clear = [...bm.allRuns(false)];
    assert.equal(clear.length, expected.length, "one clear run before each set run");
    assert.deepEqual(clear[0], { start: 0, length: expected[0]!.start });
  });

  it('rejects out-of-range bits with a stable code', () => {
    const bm = new Bitmap(100);
    assert.throws(() => bm.set(100), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => bm.setRange(90, 11), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => bm.count(-1, 5), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => new Bitmap(-1), { code: ErrorCode.INVALID_ARGUMENT });
    assert.throws(() => new Bitmap(2 ** 32), { code: ErrorCode.INVALID_ARGUMENT });
    assert.equal(bm.nextRun(100), undefined);
  });
});
