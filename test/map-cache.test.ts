// Block maps are a cache (issue 14): a program that embeds blockferry scans,
// compares and migrates its images without a single file appearing beside
// them. Real files, real CLI processes, a real loop device, a real
// read-only mount; every "nothing changed" is a byte-identical listing.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync, openSync, writeSync, closeSync, fsyncSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Scanner, blockMapsFor } from '../src/scan/scanner.js';
import { MapCache, defaultCacheDir, DEFAULT_CACHE_MAX_BYTES } from '../src/blockmap/cache.js';
import { BlockMap } from '../src/blockmap/blockmap.js';
import { DestinationService } from '../src/roles/destination/service.js';
import { similarityMatrix } from '../src/similarity/similarity.js';
import { migrate } from '../src/migrate/migrate.js';
import { currentIdentity } from '../src/image/source.js';
import { ErrorCode } from '../src/index.js';
import { seededBytes } from './util.js';

const BS = 4096;
const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
const key = Buffer.from('blockferry-test-key-0123456789ab');

let dir: string, imgs: string, xdg: string, scanner: Scanner;
const img = (name: string) => join(imgs, name);
/** The environment of a CLI process whose default cache is $XDG_CACHE_HOME/blockferry under this test's directory. */
const env = (extra: Record<string, string> = {}) => {
  const e: NodeJS.ProcessEnv = { ...process.env, XDG_CACHE_HOME: xdg, ...extra };
  if (!('BLOCKFERRY_CACHE_DIR' in extra)) delete e.BLOCKFERRY_CACHE_DIR;
  if (!('BLOCKFERRY_CACHE_MAX' in extra)) delete e.BLOCKFERRY_CACHE_MAX;
  return e;
};
const run = (args: string[], extra: Record<string, string> = {}) => {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', env: env(extra) });
  return { code: r.status, out: r.stdout, err: r.stderr };
};
const runAsync = (args: string[], extra: Record<string, string> = {}) => new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
  const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: env(extra) });
  let out = '', err = '';
  p.stdout.on('data', (d) => { out += d; });
  p.stderr.on('data', (d) => { err += d; });
  p.on('close', (code) => resolve({ code, out, err }));
});

/** Every entry of a directory with what would show a write: name, size, inode, mode, mtime in ns. */
function listing(d: string): string {
  return readdirSync(d).sort().map((n) => {
    const s = statSync(join(d, n), { bigint: true });
    return `${n} ${s.size} ${s.ino} ${s.mode.toString(8)} ${s.mtimeNs}`;
  }).join('\n');
}
/** The cache entries (not temporary files) in a directory. */
const entries = (d: string) => (existsSync(d) ? readdirSync(d).filter((n) => n.endsWith('.bfmap')).sort() : []);

/** 48 blocks: `shared` blocks of seed 1, the rest of `seed`, then 8 zero blocks. */
function writeImage(path: string, seed: number, shared = 20): void {
  writeFileSync(path, Buffer.concat([seededBytes(1, shared * BS), seededBytes(seed, (40 - shared) * BS), Buffer.alloc(8 * BS)]));
}

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'bfA-map-cache-'));
  imgs = join(dir, 'images');
  xdg = join(dir, 'xdg');
  mkdirSync(imgs);
  writeImage(img('a.img'), 2);
  writeImage(img('b.img'), 3);
  scanner = new Scanner({ workers: 2 });
});
after(async () => {
  await scanner.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('nothing beside the images', () => {
  it('scan, similarity and index build (CLI processes) keep their maps in $XDG_CACHE_HOME/blockferry, and the second scan loads them', () => {
    const before = listing(imgs);
    const cacheDir = join(xdg, 'blockferry');
    const first = run(['scan', '--json', img('a.img'), img('b.img')]);
    assert.equal(first.code, 0, first.err);
    assert.equal(first.err, '', 'no notice: the cache worked');
    const rows = JSON.parse(first.out) as Array<{ map: string; mapFile: string; blocks: number; zeroBlocks: number }>;
    assert.deepEqual(rows.map((r) => [r.map, r.blocks, r.zeroBlocks]), [['scanned', 48, 8], ['scanned', 48, 8]]);
    assert.deepEqual(rows.map((r) => r.mapFile).sort(), entries(cacheDir).map((n) => join(cacheDir, n)), 'both maps, and nothing else, in the cache');
    assert.equal(statSync(cacheDir).mode & 0o777, 0o700);
    assert.equal(statSync(rows[0]!.mapFile).mode & 0o777, 0o600);
    assert.equal(listing(imgs), before, 'scan wrote nothing beside the images');

    const second = JSON.parse(run(['scan', '--json', img('a.img'), img('b.img')]).out) as typeof rows;
    assert.deepEqual(second.map((r) => r.map), ['loaded', 'loaded']);
    assert.deepEqual(second.map((r) => r.mapFile), rows.map((r) => r.mapFile));

    const sim = run(['similarity', '--json', img('a.img'), img('b.img')]);
    assert.equal(sim.code, 0, sim.err);
    // 20 of 40 non-zero blocks shared.
    assert.deepEqual(JSON.parse(sim.out).similarity, [[100, 50], [50, 100]]);
    const idx = join(dir, 'fleet.bfidx');
    assert.equal(run(['index', 'build', '--out', idx, img('a.img'), img('b.img')]).code, 0);
    assert.equal(listing(imgs), before, 'similarity and index wrote nothing beside the images');
    assert.equal(entries(cacheDir).length, 2, 'they used the same two maps');
  });

  it('an embedding program: blockMapsFor with its defaults, similarityMatrix, and a migration (in-process destination with a neighbour in the same directory, migrate() on loopback) leave nothing beside the images', async () => {
    const mig = join(dir, 'mig');
    mkdirSync(mig);
    writeImage(join(mig, 'base.img'), 4, 0);
    const data = Buffer.concat([readFileSync(join(mig, 'base.img')).subarray(0, 30 * BS), Buffer.from(seededBytes(5, 18 * BS))]);
    writeFileSync(join(mig, 'vm.img'), data);
    const before = listing(mig);
    // The library's defaults, as the program's environment says: $XDG_CACHE_HOME/blockferry.
    const saved = { xdg: process.env.XDG_CACHE_HOME, dir: process.env.BLOCKFERRY_CACHE_DIR };
    process.env.XDG_CACHE_HOME = join(dir, 'embedder-xdg');
    delete process.env.BLOCKFERRY_CACHE_DIR;
    try {
      const maps = [];
      for (const name of ['base.img', 'vm.img']) {
        const r = await blockMapsFor(scanner, join(mig, name));
        assert.equal(r.source, 'scanned');
        assert.ok(r.files[0]!.startsWith(join(dir, 'embedder-xdg', 'blockferry') + '/'), r.files[0]);
        maps.push(r.maps[0]!);
      }
      assert.equal(similarityMatrix(maps).similarity[0]![1], 62.5, '30 of vm.img\'s 48 blocks are in base.img');
      assert.equal((await blockMapsFor(scanner, join(mig, 'vm.img'))).source, 'loaded');
    } finally {
      for (const [k, v] of [['XDG_CACHE_HOME', saved.xdg], ['BLOCKFERRY_CACHE_DIR', saved.dir]] as const) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
    assert.equal(listing(mig), before, 'the scans wrote nothing beside the images');
    const svc = await DestinationService.start({ dataDir: join(dir, 'dst'), auth: { key }, neighbours: [join(mig, 'base.img')] });
    try {
      const r = await migrate(join(mig, 'vm.img'), { to: `127.0.0.1:${svc.address.port}`, name: 'vm', auth: { key } });
      assert.equal(r.verified, true);
      assert.equal(r.blocks.filledFromNeighbours, 30, 'the neighbour was indexed and used');
      assert.deepEqual(readFileSync(join(dir, 'dst', 'vm.img')), data);
    } finally {
      await svc.close();
    }
    assert.equal(listing(mig), before, 'neither the source image nor the neighbour got a file beside it');
  });
});

describe('the cache (library)', () => {
  it('a hit is loaded, not rescanned, and marks the entry used; a modified image is a miss whose new map replaces the old', async () => {
    const maps = join(dir, 'lib-maps');
    const p = join(dir, 'hit.img');
    writeImage(p, 6);
    const first = await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps });
    assert.equal(first.source, 'scanned');
    assert.deepEqual(first.files, [join(maps, entries(maps)[0]!)]);
    const file = first.files[0]!;
    utimesSync(file, new Date(2001, 0, 1), new Date(2001, 0, 1));
    const second = await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps });
    assert.equal(second.source, 'loaded');
    assert.deepEqual(second.files, [file]);
    assert.deepEqual(second.maps[0]!.fingerprints, first.maps[0]!.fingerprints);
    assert.ok(statSync(file).mtimeMs > new Date(2002, 0, 1).getTime(), 'a hit touches the entry (its recency)');

    // One byte changes and the mtime moves: a different key, so a miss; never the stale map.
    const fd = openSync(p, 'r+');
    writeSync(fd, Buffer.from([0xee]), 0, 1, 5);
    closeSync(fd);
    utimesSync(p, new Date(), new Date(Date.now() + 5000));
    const third = await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps });
    assert.equal(third.source, 'scanned');
    assert.notEqual(third.maps[0]!.fingerprints[0], first.maps[0]!.fingerprints[0]);
    assert.notEqual(third.files[0], file);
    assert.deepEqual(entries(maps).map((n) => join(maps, n)), third.files, 'the old version\'s entry was removed');
  });

  it('keys by format and block size: the same file read raw and as qcow2-probed, at two block sizes, never share an entry', async () => {
    const maps = join(dir, 'key-maps');
    const p = join(dir, 'keys.img');
    writeImage(p, 7);
    const r = await blockMapsFor(scanner, p, { blockSize: [BS, 2 * BS], mapDir: maps, format: 'raw' });
    assert.equal(r.files.length, 2);
    assert.notEqual(r.files[0], r.files[1]);
    assert.match(r.files[0]!, /\/raw-d\d+-i\d+-s196608-m\d+-b4096\.bfmap$/);
    assert.match(r.files[1]!, /-b8192\.bfmap$/);
    assert.equal((await blockMapsFor(scanner, p, { blockSize: 2 * BS, mapDir: maps, format: 'raw' })).source, 'loaded');
    // A cached map without SHA-1 digests does not answer a request for them: rescanned, and the entry now has them.
    const withDigests = await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps, sha1: true });
    assert.equal(withDigests.source, 'scanned');
    assert.deepEqual(withDigests.files, [r.files[0]]);
    const again = await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps, sha1: true });
    assert.equal(again.source, 'loaded');
    assert.deepEqual(again.maps[0]!.digests, withDigests.maps[0]!.digests);
    assert.equal(entries(maps).length, 2);
  });

  it('an image dated before 1970 (a negative mtime) is cached, loaded and counted like any other', async () => {
    const maps = join(dir, 'old-maps');
    const p = join(dir, 'old.img');
    writeImage(p, 10);
    utimesSync(p, new Date('1960-01-01T00:00:00Z'), new Date('1960-01-01T00:00:00Z'));
    const first = await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps });
    assert.match(first.files[0] ?? '', /-m-315619200000000000-b4096\.bfmap$/);
    assert.equal((await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps })).source, 'loaded');
    assert.equal(new MapCache({ dir: maps }).info().entries, 1);
  });

  it('a damaged cache entry is a miss: rescanned and rewritten, never a crash', async () => {
    const maps = join(dir, 'bad-maps');
    const p = join(dir, 'bad.img');
    writeImage(p, 8);
    const { files: [file] } = await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps });
    const good = readFileSync(file!);
    const flipped = Buffer.from(good);
    flipped[100]! ^= 0xff;
    const otherVersion = Buffer.from(good);
    otherVersion.writeBigUInt64LE(1n, 56); // a well-formed map of another mtime, under this version's name
    const cases: Array<[string, Buffer, RegExp]> = [
      ['truncated', good.subarray(0, good.length - 3), new RegExp(ErrorCode.TRUNCATED)],
      ['empty', Buffer.alloc(0), new RegExp(ErrorCode.TRUNCATED)],
      ['flipped bit', flipped, new RegExp(ErrorCode.CHECKSUM_MISMATCH)],
      ['garbage', Buffer.from(seededBytes(9, 4096)), new RegExp(ErrorCode.BAD_MAGIC)],
    ];
    for (const [what, bytes, code] of cases) {
      writeFileSync(file!, bytes);
      const notices: string[] = [];
      const r = await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps, onNotice: (_, m) => notices.push(m) });
      assert.equal(r.source, 'scanned', what);
      assert.match(notices.join('\n'), code, what);
      assert.deepEqual(readFileSync(file!), good, `${what}: rewritten`);
    }
    // A well-formed map that records another identity (renamed, or checksum recomputed) is not trusted either.
    const { treeChecksum } = await import('../src/engine/checksum.js');
    otherVersion.writeBigUInt64LE(treeChecksum(otherVersion.subarray(0, otherVersion.length - 8)), otherVersion.length - 8);
    writeFileSync(file!, otherVersion);
    const notices: string[] = [];
    assert.equal((await blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps, onNotice: (_, m) => notices.push(m) })).source, 'scanned');
    assert.match(notices.join(), /another image version/);
    assert.deepEqual(readFileSync(file!), good);

    // A symbolic link planted at the entry's name is never written through.
    const target = join(dir, 'planted-target');
    writeFileSync(target, 'keep me');
    rmSync(file!);
    symlinkSync(target, file!);
    await assert.rejects(blockMapsFor(scanner, p, { blockSize: BS, mapDir: maps }), { code: ErrorCode.UNSAFE_PATH });
    assert.equal(readFileSync(target, 'utf8'), 'keep me');
  });

  it('trims least recently used entries first under a small limit; a map larger than the limit is not cached', async () => {
    const maps = join(dir, 'lru-maps');
    const paths = [0, 1, 2, 3].map((i) => join(dir, `lru${i}.img`));
    paths.forEach((p, i) => writeImage(p, 20 + i));
    const size = (await blockMapsFor(scanner, paths[0]!, { blockSize: BS, cache: false })).maps[0]!.fileBytes;
    const cache = new MapCache({ dir: maps, maxBytes: 3 * size });
    const fileOf: string[] = [];
    for (const [i, p] of paths.slice(0, 3).entries()) {
      const r = await blockMapsFor(scanner, p, { blockSize: BS, cache });
      fileOf[i] = r.files[0]!;
      utimesSync(fileOf[i]!, new Date(2020, 0, 1 + i), new Date(2020, 0, 1 + i)); // used on day i
    }
    assert.equal(cache.info().bytes, 3 * size);
    // lru0 is used again (a hit): now lru1 is the least recently used.
    assert.equal((await blockMapsFor(scanner, paths[0]!, { blockSize: BS, cache })).source, 'loaded');
    const r3 = await blockMapsFor(scanner, paths[3]!, { blockSize: BS, cache });
    assert.deepEqual(entries(maps).map((n) => join(maps, n)).sort(), [fileOf[0], fileOf[2], r3.files[0]].sort(), 'lru1 went');
    assert.equal(cache.info().bytes, 3 * size);
    assert.equal((await blockMapsFor(scanner, paths[1]!, { blockSize: BS, cache })).source, 'scanned', 'evicted means rescanned');
    assert.ok(!existsSync(fileOf[2]!), 'and its return evicted the next least recently used, lru2');

    const tiny = new MapCache({ dir: join(dir, 'tiny-maps'), maxBytes: size - 1 });
    const notices: string[] = [];
    const t = await blockMapsFor(scanner, paths[0]!, { blockSize: BS, cache: tiny, onNotice: (_, m) => notices.push(m) });
    assert.deepEqual(t.files, []);
    assert.match(t.notCached ?? '', /not cached/);
    assert.match(notices.join(), /larger than the cache's limit/);
    assert.deepEqual(entries(join(dir, 'tiny-maps')), []);
  });

  it('cache: false neither loads nor writes; the default directory follows BLOCKFERRY_CACHE_DIR, then an absolute XDG_CACHE_HOME, then HOME', async () => {
    const p = join(dir, 'off.img');
    writeImage(p, 30);
    const before = listing(dir);
    const r = await blockMapsFor(scanner, p, { blockSize: BS, cache: false });
    assert.deepEqual([r.source, r.files, r.notCached], ['scanned', [], 'caching is off']);
    assert.equal(listing(dir), before);
    assert.deepEqual(defaultCacheDir({ BLOCKFERRY_CACHE_DIR: '/x/y', XDG_CACHE_HOME: '/c', HOME: '/h' }), { dir: '/x/y', named: true });
    assert.deepEqual(defaultCacheDir({ XDG_CACHE_HOME: '/c', HOME: '/h' }), { dir: '/c/blockferry', named: false });
    assert.deepEqual(defaultCacheDir({ XDG_CACHE_HOME: 'relative/ignored', HOME: '/h' }), { dir: '/h/.cache/blockferry', named: false });
    assert.equal(new MapCache({ dir: join(dir, 'm') }).maxBytes, DEFAULT_CACHE_MAX_BYTES);
  });
});

describe('where the cache cannot be', () => {
  it('an unwritable default cache: every scan works without it and it is said once; a named one fails with WRITE_FAILED', () => {
    const file = join(dir, 'a-file');
    writeFileSync(file, 'not a directory');
    const r = run(['scan', '--json', img('a.img'), img('b.img')], { XDG_CACHE_HOME: join(file, 'sub') });
    assert.equal(r.code, 0, r.err);
    const rows = JSON.parse(r.out) as Array<{ map: string; mapFile: string | null; notCached?: string }>;
    assert.deepEqual(rows.map((x) => [x.map, x.mapFile]), [['scanned', null], ['scanned', null]]);
    assert.ok(rows.every((x) => /cannot be written/.test(x.notCached ?? '')));
    const lines = r.err.trim().split('\n');
    assert.equal(lines.length, 1, `one notice for two images: ${r.err}`);
    assert.match(lines[0]!, /^blockferry: notice: .*a\.img: the block map cache .* cannot be written/);

    // No home directory to put the default cache in (a HOME that is not a path, no XDG_CACHE_HOME): the same, once.
    const homeless = spawnSync(process.execPath, [bin, 'scan', '--json', img('a.img'), img('b.img')], { encoding: 'utf8', env: { ...env(), HOME: 'nowhere', XDG_CACHE_HOME: '' } });
    assert.equal(homeless.status, 0, homeless.stderr);
    assert.deepEqual((JSON.parse(homeless.stdout) as typeof rows).map((x) => [x.map, x.mapFile]), [['scanned', null], ['scanned', null]]);
    assert.equal(homeless.stderr.trim().split('\n').length, 1, homeless.stderr);
    assert.match(homeless.stderr, /no home directory/);
    assert.ok(!existsSync(join(imgs, 'nowhere')) && !existsSync('nowhere'), 'no cache made relative to anywhere');

    for (const extra of [{ BLOCKFERRY_CACHE_DIR: join(file, 'sub') }, {}] as Array<Record<string, string>>) {
      const args = 'BLOCKFERRY_CACHE_DIR' in extra ? ['scan', img('a.img')] : ['scan', '--map-dir', join(file, 'sub'), img('a.img')];
      const named = run(args, extra);
      assert.equal(named.code, 1, named.err);
      assert.match(named.err, /^blockferry: error ERR_BF_WRITE_FAILED: /m);
    }
    assert.equal(run(['scan', '--no-save', '--map-dir', join(file, 'sub'), img('a.img')]).code, 0, '--no-save writes nothing, so nothing fails');
  });

  it('images on a read-only file system scan and compare, their maps cached elsewhere', async (t) => {
    const ro = join(dir, 'ro');
    mkdirSync(ro);
    const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'bfA-ro', ro], { encoding: 'utf8' });
    if (m.status !== 0) return t.skip(`cannot mount a tmpfs here: ${m.stderr.trim()}`);
    try {
      writeImage(join(ro, 'x.img'), 40);
      writeImage(join(ro, 'y.img'), 41);
      const rm = spawnSync('mount', ['-o', 'remount,ro', ro], { encoding: 'utf8' });
      assert.equal(rm.status, 0, rm.stderr);
      assert.throws(() => writeFileSync(join(ro, 'probe'), 'x'), { code: 'EROFS' }, 'read-only even for root');
      const before = listing(ro);
      const maps = join(dir, 'ro-maps');
      const r = run(['scan', '--json', '--map-dir', maps, join(ro, 'x.img'), join(ro, 'y.img')]);
      assert.equal(r.code, 0, r.err);
      assert.equal(r.err, '');
      assert.equal(entries(maps).length, 2);
      const s = run(['similarity', '--json', '--map-dir', maps, join(ro, 'x.img'), join(ro, 'y.img')]);
      assert.equal(s.code, 0, s.err);
      assert.deepEqual(JSON.parse(s.out).similarity, [[100, 50], [50, 100]]);
      assert.equal(listing(ro), before);

      // A read-only home: the default cache on the read-only mount. Scans work, said once.
      const home = run(['scan', '--json', join(ro, 'x.img'), join(ro, 'y.img')], { XDG_CACHE_HOME: ro });
      assert.equal(home.code, 0, home.err);
      assert.equal(home.err.trim().split('\n').length, 1, home.err);
      assert.match(home.err, /cannot be written \(EROFS/);
      assert.equal(listing(ro), before);
    } finally {
      spawnSync('umount', [ro]);
    }
  });

  it('a block device (a real loop device) is scanned every time and never cached: its identity does not follow its data', async (t) => {
    const backing = join(dir, 'loop.img');
    writeImage(backing, 50);
    const l = spawnSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' });
    if (l.status !== 0) return t.skip(`losetup is not permitted here: ${l.stderr.trim()}`);
    const dev = l.stdout.trim();
    try {
      const maps = join(dir, 'dev-maps');
      const notices: string[] = [];
      const first = await blockMapsFor(scanner, dev, { blockSize: BS, mapDir: maps, onNotice: (_, m) => notices.push(m) });
      assert.equal(first.source, 'scanned');
      assert.deepEqual(first.files, []);
      assert.match(first.notCached ?? '', /block device/);
      assert.match(notices.join(), /block device/);
      assert.deepEqual(entries(maps), [], 'nothing cached, and nothing written beside /dev nodes');
      assert.ok(!existsSync(`${dev}.4096.bfmap`));
      assert.deepEqual(first.maps[0]!.fingerprints, (await blockMapsFor(scanner, backing, { blockSize: BS, cache: false })).maps[0]!.fingerprints, 'the device reads as its backing file');

      // Why: the backing file changes under the device; the device's identity does not.
      const idBefore = currentIdentity(dev);
      const fd = openSync(backing, 'r+');
      writeSync(fd, seededBytes(51, BS), 0, BS, 0);
      fsyncSync(fd);
      closeSync(fd);
      assert.deepEqual(currentIdentity(dev), idBefore, 'same node, size and mtime');
      const second = await blockMapsFor(scanner, dev, { blockSize: BS, mapDir: maps });
      assert.equal(second.source, 'scanned');
      assert.notEqual(second.maps[0]!.fingerprints[0], first.maps[0]!.fingerprints[0], 'new data seen: a cached map would have been stale');
    } finally {
      spawnSync('losetup', ['-d', dev]);
    }
  });
});

describe('concurrent scanners and the cache commands', () => {
  it('three processes scanning one image at once leave one whole entry and no temporary files', async () => {
    const maps = join(dir, 'race-maps');
    const p = join(dir, 'race.img');
    writeFileSync(p, Buffer.concat([seededBytes(60, 3000 * BS), Buffer.alloc(100 * BS)]));
    const rs = await Promise.all([0, 1, 2].map(() => runAsync(['scan', '--rescan', '--json', '--progress=none', '--sha1', '--map-dir', maps, p])));
    for (const r of rs) assert.equal(r.code, 0, r.err);
    assert.deepEqual(readdirSync(maps).length, 1, readdirSync(maps).join());
    const file = join(maps, entries(maps)[0]!);
    const cached = BlockMap.load(file, p);
    const fresh = (await blockMapsFor(scanner, p, { blockSize: BS, sha1: true, cache: false })).maps[0]!;
    assert.deepEqual(cached.fingerprints, fresh.fingerprints);
    assert.deepEqual(cached.digests, fresh.digests);
  });

  it('cache info and cache clear (CLI): entries, bytes and limit as JSON; clear removes only cache entries', () => {
    const maps = join(dir, 'cli-maps');
    assert.equal(run(['scan', '--map-dir', maps, img('a.img'), img('b.img')]).code, 0);
    mkdirSync(maps, { recursive: true });
    writeFileSync(join(maps, 'notes.txt'), 'mine');
    writeFileSync(join(maps, 'a.img.4096.bfmap'), 'an old-style name: not a cache entry');
    const bytes = entries(maps).filter((n) => n.startsWith('raw-')).reduce((s, n) => s + statSync(join(maps, n)).size, 0);
    const info = JSON.parse(run(['cache', 'info', '--json', '--map-dir', maps]).out);
    assert.deepEqual({ dir: info.dir, entries: info.entries, bytes: info.bytes, maxBytes: info.maxBytes }, { dir: maps, entries: 2, bytes, maxBytes: 1 << 30 });
    assert.equal(JSON.parse(run(['cache', 'info', '--json', '--map-dir', maps, '--cache-max', '1M']).out).maxBytes, 1 << 20);
    assert.equal(JSON.parse(run(['cache', 'info', '--json'], { BLOCKFERRY_CACHE_MAX: '2M' }).out).maxBytes, 2 << 20);
    const dflt = JSON.parse(run(['cache', 'info', '--json']).out);
    assert.equal(dflt.dir, join(xdg, 'blockferry'), 'the default: $XDG_CACHE_HOME/blockferry');
    assert.match(run(['cache', 'info']).out, /entries/);
    const bad = run(['cache', 'info', '--cache-max', 'lots']);
    assert.equal(bad.code, 2);
    assert.match(bad.err, /ERR_BF_USAGE/);

    const cleared = run(['cache', 'clear', '--map-dir', maps]);
    assert.equal(cleared.code, 0, cleared.err);
    assert.match(cleared.out, /removed 2 block maps/);
    assert.equal(JSON.parse(run(['cache', 'info', '--json', '--map-dir', maps]).out).entries, 0);
    assert.deepEqual(readdirSync(maps).sort(), ['a.img.4096.bfmap', 'notes.txt']);
  });
});
