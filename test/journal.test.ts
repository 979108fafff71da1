// The migration journal: intervals of checked blocks, by round trip and by damage.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Journal } from '../src/roles/destination/journal.js';
import { IntervalSet } from '../src/blocks/intervals.js';
import { ErrorCode } from '../src/index.js';

describe('migration journal', () => {
  it('round-trips its intervals, costs 48 bytes when empty, and refuses every kind of damage', () => {
    const dir = mkdtempSync(join(tmpdir(), 'bf-journal-'));
    try {
      const file = join(dir, 'x.img.journal');
      const size = 2 ** 40 + 1000, bs = 4096;
      Journal.fresh(size, bs).save(file);
      assert.equal(statSync(file).size, 48, 'an attempt that received nothing');
      const written = IntervalSet.of([{ start: 0, count: 3 }, { start: 1 << 20, count: 70 }, { start: Math.ceil(size / bs) - 1, count: 1 }]);
      new Journal(size, bs, written).save(file);
      const back = Journal.load(file)!;
      assert.deepEqual([...back.written], [...written]);
      assert.equal(back.size, size);
      assert.equal(back.blockSize, bs);
      assert.equal(Journal.load(join(dir, 'none')), undefined);
      const good = readFileSync(file);
      const damaged: Array<[string, Buffer, string]> = [
        ['cut short', good.subarray(0, good.length - 5), ErrorCode.TRUNCATED],
        ['a flipped bit', Buffer.from(good).fill(good[50]! ^ 1, 50, 51), ErrorCode.CHECKSUM_MISMATCH],
        ['bad magic', Buffer.concat([Buffer.from('NOTAJRNL'), good.subarray(8)]), ErrorCode.BAD_MAGIC],
        ['another version', Buffer.from(good).fill(9, 8, 9), ErrorCode.UNSUPPORTED_VERSION],
        ['bytes after the end', Buffer.concat([good, Buffer.alloc(16)]), ErrorCode.CORRUPT],
      ];
      for (const [what, bytes, code] of damaged) {
        writeFileSync(file, bytes);
        assert.throws(() => Journal.load(file), { code }, what);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
