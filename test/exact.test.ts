// The first pass is exact: with nothing writing to the image, every block is
// accounted for once (filled, sent, or copied from content the destination
// already holds) and the end-to-end check finds nothing to repair. Real
// filesystems hold many duplicate blocks close together (the fixture's newer
// image repeats content within a 1 MiB batch thousands of times): this is
// where a COPY naming content not yet applied at the destination would show.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DestinationService } from '../src/roles/destination/service.js';
import { migrate } from '../src/migrate/migrate.js';
import { duplicateHeavyPair, type ImagePair } from './fixtures.js';

const BS = 4096;
let pair: ImagePair;
let dir: string;

/** Per 4 KiB block: its content digest, or undefined for an all-zero block (node:crypto, independent of blockferry). */
function digests(path: string): Array<string | undefined> {
  const b = readFileSync(path);
  const out: Array<string | undefined> = [];
  const zero = Buffer.alloc(BS);
  for (let at = 0; at < b.length; at += BS) {
    const blk = b.subarray(at, at + BS);
    out.push(blk.equals(zero.subarray(0, blk.length)) ? undefined : createHash('sha1').update(blk).digest('hex'));
  }
  return out;
}

before(async () => {
  pair = await duplicateHeavyPair();
  dir = mkdtempSync(join(tmpdir(), 'bf-exact-'));
});
after(() => rmSync(dir, { recursive: true, force: true }));

describe('an exact first pass on a real filesystem image with many duplicate blocks', () => {
  for (const strategy of ['similarity', 'full'] as const) {
    it(`${strategy}: nothing repaired or resent; each distinct missing content crosses once`, async () => {
      const svc = await DestinationService.start({ dataDir: join(dir, strategy), auth: { insecure: true }, neighbours: [pair.older] });
      try {
        const r = await migrate(pair.newer, { to: `127.0.0.1:${svc.address.port}`, name: 'vm', strategy, auth: { insecure: true } });
        assert.deepEqual(readFileSync(join(dir, strategy, 'vm.img')), readFileSync(pair.newer), 'byte-identical');
        assert.equal(r.blocks.repaired, 0, 'the end-to-end check repaired nothing');
        assert.equal(r.blocks.resent, 0, 'no block content went twice');
        const mine = digests(pair.newer);
        const theirs = new Set(strategy === 'similarity' ? digests(pair.older).filter((d) => d !== undefined) : []);
        const data = mine.filter((d) => d !== undefined) as string[];
        const missing = data.filter((d) => !theirs.has(d));
        assert.equal(r.blocks.filledFromNeighbours, data.length - missing.length, 'every block whose content the neighbour holds is filled there');
        assert.equal(r.blocks.sent, new Set(missing).size, 'each distinct missing content is sent once');
        assert.equal(r.blocks.copied, missing.length - new Set(missing).size, 'its repeats are copied at the destination');
        assert.equal(r.blocks.zero, mine.length - data.length);
      } finally {
        await svc.close();
      }
    });
  }
});
