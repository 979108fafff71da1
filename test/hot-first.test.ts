// Hot blocks first (paper 000's snapshot scheduling: the blocks of the VM's
// working set cross before the others). With write counts known (a tracked
// image's, or a hypervisor's record handed in as writeCounts), --order
// hot-first sends the first pass's blocks by write count, hottest first;
// SnapMig sends its active layer that way. The order is read from the
// destination's own record of the BLOCKS runs it wrote, in arrival order.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { DestinationService } from '../src/roles/destination/service.js';
import { TrackedImage } from '../src/image/tracked.js';
import { migrate } from '../src/migrate/migrate.js';
import { migrateChain } from '../src/snapmig/migrate-chain.js';
import { stackMap } from '../src/snapmig/identity.js';
import { Scanner } from '../src/scan/scanner.js';
import { seededBytes } from './util.js';
import { destinationState, haveTools, makeChain, qemuRaw } from './snapmig-fixtures.js';

const BS = 4096;
const auth = { key: randomBytes(32) };
let dir: string;
let dst: DestinationService;
const crossed = new Map<string, number[]>();

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'c11-hotfirst-'));
  dst = await DestinationService.start({
    dataDir: join(dir, 'dst'), auth,
    onBlocks: (image, start, count) => { const l = crossed.get(image) ?? []; for (let b = start; b < start + count; b++) l.push(b); crossed.set(image, l); },
  });
});
after(async () => { await dst?.close(); if (dir) rmSync(dir, { recursive: true, force: true }); });

const range = (a: number, n: number) => Array.from({ length: n }, (_, i) => a + i);

describe('hot blocks first', () => {
  it('--order hot-first: the blocks a tracked image saw written most cross first, hottest class first, then the rest in address order; the image arrives exact', async () => {
    const run = async (order: 'hot-first' | 'hot-last') => {
      const p = join(dir, `img-${order}.raw`);
      writeFileSync(p, seededBytes(7, 1024 * BS)); // 4 MiB of data, every block non-zero
      const tracked = new TrackedImage(p, BS);
      try {
        // The working set: blocks 900-919 written 8 times, 500-509 twice, 100 once (all with the same content: the image is unchanged).
        const hot: [number, number, number][] = [[900, 20, 8], [500, 10, 2], [100, 1, 1]];
        const content = readFileSync(p);
        for (const [start, n, times] of hot) for (let t = 0; t < times; t++) tracked.write(start * BS, content.subarray(start * BS, (start + n) * BS));
        await migrate(p, { to: `127.0.0.1:${dst.address.port}`, name: `img-${order}`, auth, strategy: 'full', tracked, order, maxRounds: 0 });
        assert.ok(readFileSync(join(dir, 'dst', `img-${order}.img`)).equals(content));
        return crossed.get(`img-${order}`)!;
      } finally {
        tracked.close();
      }
    };
    const first = await run('hot-first');
    assert.equal(first.length, 1024, 'every block crossed once');
    assert.deepEqual(first.slice(0, 30), [...range(900, 20), ...range(500, 10)], 'the class written 8 times, then the one written twice');
    // Written once is the coldest class (as never): address order with the rest.
    assert.deepEqual(first.slice(30), range(0, 1024).filter((b) => !(b >= 900 && b < 920) && !(b >= 500 && b < 510)));
    // The default (cold first, hot last) sends the first pass in address order.
    const last = await run('hot-last');
    assert.deepEqual(last, range(0, 1024));
  });

  it('SnapMig sends its active layer hot blocks first (write counts handed in), the older layers as before', { skip: haveTools ? false : 'mkfs.ext4, debugfs, qemu-img or qemu-io missing' }, async () => {
    const files = makeChain(dir, 'chain-');
    const scanner = new Scanner({ workers: 1 });
    try {
      // The working set: the last 32 blocks the active layer holds whose content is its own alone (not zeros, not
      // repeated: a repeated block crosses once and is copied at the destination), counted 6 writes each.
      const raw = qemuRaw(files[3]!);
      const seen = new Map<string, number>();
      const own: number[] = [];
      for (const c of stackMap(files[3]!, 1).covered) for (let b = c.offset / BS; b < (c.offset + c.length) / BS; b++) {
        const block = raw.subarray(b * BS, (b + 1) * BS);
        const key = createHash('sha1').update(block).digest('hex');
        seen.set(key, (seen.get(key) ?? 0) + 1);
        own.push(b);
      }
      const unique = own.filter((b) => { const block = raw.subarray(b * BS, (b + 1) * BS); return block.some((x) => x !== 0) && seen.get(createHash('sha1').update(block).digest('hex')) === 1; });
      const hot = unique.slice(-32);
      const hotN = hot.length;
      assert.equal(hotN, 32);
      const writeCounts = new Map(hot.map((b) => [b, 6] as [number, number]));
      await migrateChain(files[3]!, { to: `127.0.0.1:${dst.address.port}`, strategy: 'fullmig', auth, scanner, name: 'vm', live: { writeCounts } });
      const act = crossed.get('vm.L3')!;
      assert.ok(act.length > hotN && act.length <= own.length, `${act.length} blocks of the active layer crossed`);
      assert.deepEqual(act.slice(0, hotN), hot, 'the working set crossed first');
      assert.deepEqual(act.slice(hotN), [...act.slice(hotN)].sort((a, b) => a - b), 'the rest in address order');
      // An older layer, no counts: address order.
      const base = crossed.get('vm.L0')!;
      assert.deepEqual(base, [...base].sort((a, b) => a - b));
      for (let k = 0; k < 4; k++) assert.ok(destinationState(join(dir, 'dst'), 'vm', k).equals(qemuRaw(files[k]!)), `layer ${k} arrived as qemu reads the source's`);
    } finally {
      await scanner.close();
    }
  });
});
