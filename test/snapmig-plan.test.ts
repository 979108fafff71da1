// SnapMig's pure parts against chains made by qemu itself: layer identities
// (by content, not by name; a consolidated base equals the merged stack it
// came from), the snapshot index and the plan (hits, misses, the active
// layer, consolidation only when it moves fewer bytes, a vanished server).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Scanner } from '../src/scan/scanner.js';
import { layerIdentity, stackMap } from '../src/snapmig/identity.js';
import { SnapshotIndex, planMigration, replan, type ChainLayer } from '../src/snapmig/plan.js';
import { openSource, specFor } from '../src/image/source.js';

let dir: string;
let scanner: Scanner;
before(() => { dir = mkdtempSync(join(tmpdir(), 'bfF-plan-')); scanner = new Scanner({ workers: 1 }); });
after(async () => { await scanner.close(); rmSync(dir, { recursive: true, force: true }); });

const p = (n: string) => join(dir, n);
const run = (cmd: string, args: string[]) => execFileSync(cmd, args, { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const io = (file: string, ...cmds: string[]) => run('qemu-io', [...cmds.flatMap((c) => ['-c', c]), file]);
function chain(prefix: string): string[] {
  // base ← s1 ← s2 ← active, 4 MiB, patterns per layer; s2 declares a zero cluster over base data.
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p(`${prefix}base.qcow2`), '4M']);
  io(p(`${prefix}base.qcow2`), 'write -P 0x11 0 2M');
  const names = [`${prefix}base.qcow2`];
  for (const [k, cmds] of [['s1', ['write -P 0x22 64k 128k']], ['s2', ['write -P 0x33 1M 64k', 'write -z 1536k 64k']], ['act', ['write -P 0x44 3M 64k']]] as const) {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', names[names.length - 1]!, '-F', 'qcow2', p(`${prefix}${k}.qcow2`)]);
    io(p(`${prefix}${k}.qcow2`), ...cmds);
    names.push(`${prefix}${k}.qcow2`);
  }
  return names.map(p);
}

describe('layer identity', () => {
  it('is the same for a copy under another name, differs when one byte differs, and keeps zero clusters apart from holes', async () => {
    const [base, s1, s2] = chain('a-');
    copyFileSync(s1!, p('nightly-copy.qcow2'));
    const a = await layerIdentity(s1!, 1, { scanner });
    const b = await layerIdentity(p('nightly-copy.qcow2'), 1, { scanner });
    assert.equal(a.id, b.id);
    assert.equal(a.bottom, false);
    assert.deepEqual(a.covered, [{ offset: 64 << 10, length: 128 << 10 }]);
    assert.equal(a.dataBytes, 128 << 10);
    const z = stackMap(s2!, 1);
    assert.deepEqual(z.covered, [{ offset: 1 << 20, length: 64 << 10 }, { offset: 1536 << 10, length: 64 << 10 }]);
    assert.equal(z.dataBytes, 64 << 10);
    io(p('nightly-copy.qcow2'), 'write -P 0x23 100k 1');
    const c = await layerIdentity(p('nightly-copy.qcow2'), 1, { scanner });
    assert.notEqual(c.id, a.id);
    const bottom = await layerIdentity(base!, 1, { scanner });
    assert.equal(bottom.bottom, true);
    assert.deepEqual(bottom.covered, [{ offset: 0, length: 4 << 20 }]);
  });

  it('of a merged stack equals the base a production server consolidated (qemu-img commit), and the view reads what qemu reads', async () => {
    const [base, s1, s2] = chain('b-');
    const merged = await layerIdentity(s2!, 3, { scanner });
    // The production server's copy: base' = base + s1 + s2 committed.
    for (const f of [base, s1, s2]) copyFileSync(f!, p(`prod-${f!.split('/').pop()}`));
    run('qemu-img', ['rebase', '-u', '-b', p('prod-b-s1.qcow2'), '-F', 'qcow2', p('prod-b-s2.qcow2')]);
    run('qemu-img', ['rebase', '-u', '-b', p('prod-b-base.qcow2'), '-F', 'qcow2', p('prod-b-s1.qcow2')]);
    run('qemu-img', ['commit', '-q', '-b', p('prod-b-base.qcow2'), p('prod-b-s2.qcow2')]);
    const consolidated = await layerIdentity(p('prod-b-base.qcow2'), 1, { scanner });
    assert.equal(consolidated.id, merged.id);
    // The stack view reads the top layers only: s2's own view has base data hidden under zeros.
    const view = openSource(specFor(s2!, { format: 'qcow2-stack:1' }));
    const buf = Buffer.alloc(4 << 20);
    view.readInto(buf, 0, buf.length);
    view.close();
    assert.equal(buf.subarray(1 << 20, (1 << 20) + (64 << 10)).every((x) => x === 0x33), true);
    assert.equal(buf.subarray(0, 1 << 20).every((x) => x === 0), true);
  });

  it('is cached by the files themselves and recomputed when a file changes', async () => {
    const [, s1] = chain('c-');
    const cacheDir = p('cache');
    const first = await layerIdentity(s1!, 1, { scanner, cacheDir });
    assert.equal(existsSync(join(cacheDir, 'layer-ids.json')), true);
    assert.deepEqual(await layerIdentity(s1!, 1, { scanner, cacheDir }), first);
    io(s1!, 'write -P 0x99 0 4k');
    assert.notEqual((await layerIdentity(s1!, 1, { scanner, cacheDir })).id, first.id);
  });
});

describe('plan', () => {
  const chainOf = (bytes: number[]): ChainLayer[] => bytes.map((b, i) => ({ index: i, identity: i < bytes.length - 1 ? `id${i}` : undefined, dataBytes: b }));

  it('sends hits from their backup server, misses and the active layer from the source, balanced over servers', () => {
    const index = new SnapshotIndex();
    index.add({ server: 'bk1', identity: 'id0', depth: 1, dataBytes: 1000 });
    index.add({ server: 'bk2', identity: 'id0', depth: 1, dataBytes: 1000 });
    index.add({ server: 'bk1', identity: 'id1', depth: 1, dataBytes: 300 });
    index.add({ server: 'bk2', identity: 'id2', depth: 1, dataBytes: 200 });
    const plan = planMigration({ strategy: 'snapmig', chain: chainOf([1000, 300, 200, 100, 50]), index });
    assert.deepEqual(plan.sends.map((s) => [s.layers, s.sender, s.reason]), [
      [[0], 'bk1', 'hit'], [[1], 'bk1', 'hit'], [[2], 'bk2', 'hit'], [[3], 'source', 'miss'], [[4], 'source', 'active'],
    ]);
    assert.deepEqual(plan.bytesBySender, { bk1: 1300, bk2: 200, source: 150 });
    // bk1 disappears: its layers are the source's now.
    const after = replan(plan, new Set(['bk1']), chainOf([1000, 300, 200, 100, 50]));
    assert.deepEqual(after.sends.map((s) => s.sender), ['source', 'source', 'bk2', 'source', 'source']);
    assert.equal(after.bytesBySender.source, 1450);
  });

  it('FullMig sends everything from the source; SelectiveMig the merged latest state only', () => {
    const index = new SnapshotIndex();
    index.add({ server: 'bk', identity: 'id0', depth: 1, dataBytes: 1000 });
    const full = planMigration({ strategy: 'fullmig', chain: chainOf([1000, 300, 50]), index });
    assert.deepEqual(full.sends.map((s) => [s.layers, s.sender]), [[[0], 'source'], [[1], 'source'], [[2], 'source']]);
    const sel = planMigration({ strategy: 'selectivemig', chain: chainOf([1000, 300, 50]), index });
    assert.deepEqual(sel.sends.map((s) => [s.layers, s.sender, s.depth]), [[[0, 1, 2], 'source', 3]]);
    assert.equal(sel.flatten, true);
  });

  it('consolidates a held bottom run only under flatten and only when the merge moves fewer bytes', () => {
    const index = new SnapshotIndex();
    for (const id of ['id0', 'id1', 'id2']) index.add({ server: 'bk', identity: id, depth: 1, dataBytes: 0 });
    index.add({ server: 'bk', identity: 'm2', depth: 3, dataBytes: 1100 });
    index.add({ server: 'bk', identity: 'm1', depth: 2, dataBytes: 1300 });
    const c = chainOf([1000, 300, 200, 50]);
    const prefixes = [{ top: 1, identity: 'm1', dataBytes: 1300 }, { top: 2, identity: 'm2', dataBytes: 1100 }];
    const kept = planMigration({ strategy: 'snapmig', chain: c, index, prefixes });
    assert.equal(kept.sends.length, 4, 'snapshots kept apart: no merge');
    const flat = planMigration({ strategy: 'snapmig', chain: c, index, prefixes, flatten: true });
    assert.deepEqual(flat.sends.map((s) => [s.layers, s.sender, s.reason]), [[[0, 1, 2], 'bk', 'consolidated'], [[3], 'source', 'active']]);
    // A merge that saves nothing (m1: 1300 = 1000 + 300) is not chosen on its own.
    const only1 = planMigration({ strategy: 'snapmig', chain: c, index, prefixes: [prefixes[0]!], flatten: true });
    assert.equal(only1.sends.length, 4);
  });

  it('a server stack of several layers equal to one source layer is a consolidated hit', () => {
    const index = new SnapshotIndex();
    index.add({ server: 'bk', identity: 'id0', depth: 5, dataBytes: 900 });
    const plan = planMigration({ strategy: 'snapmig', chain: chainOf([900, 40]), index });
    assert.deepEqual(plan.sends.map((s) => [s.layers, s.sender, s.reason, s.depth]), [[[0], 'bk', 'consolidated', 5], [[1], 'source', 'active', 1]]);
  });
});
