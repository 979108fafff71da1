// The native addon: its SHA-1 against node:crypto on every kind of view, its
// system calls against files made sparse on purpose, bad arguments for every
// function, and blockferry's behaviour when the addon is missing.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, statSync, writeFileSync, writeSync, readFileSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { addon, loadError } from 'blockferry/native';
import { chooseBackend } from '../src/engine/backend.js';
import { FileImageSource } from '../src/image/source.js';
import { Scanner } from '../src/scan/scanner.js';
import { seededBytes } from './util.js';

const haveCargo = spawnSync('cargo', ['--version'], { stdio: 'ignore' }).status === 0;
const sha1 = (d: Uint8Array) => createHash('sha1').update(d).digest();

it('is built and loaded wherever cargo is installed', { skip: haveCargo ? false : 'cargo is not installed: the addon is optional' }, () => {
  assert.equal(loadError, null);
  assert.ok(addon);
  assert.equal(chooseBackend().native, addon);
});

const native = addon;
describe('native addon', { skip: native ? false : `addon not loaded (${loadError})` }, () => {
  const a = native!;
  let dir: string;
  before(() => { dir = mkdtempSync(join(tmpdir(), 'bf-native-')); });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('hashes every length 0..999, at unaligned offsets and over a SharedArrayBuffer', () => {
    const data = seededBytes(1, 1100);
    const shared = new Uint8Array(new SharedArrayBuffer(1200));
    shared.set(data, 3);
    const out = new Uint8Array(new SharedArrayBuffer(64));
    for (let len = 0; len <= 999; len++) {
      const want = sha1(data.subarray(0, len));
      const o = Buffer.alloc(20);
      a.sha1(data.subarray(0, len), o);
      assert.deepEqual(o, want, `length ${len}`);
      a.sha1(shared.subarray(3, 3 + len), out.subarray(7, 27));
      assert.deepEqual(Buffer.from(out.subarray(7, 27)), want, `shared, length ${len}`);
    }
  });

  it('hashes many blocks: every block size 512 B..1 MiB, counts that are not multiples of the 4-way interleave, short tails, other array types', () => {
    for (let bs = 512; bs <= 1 << 20; bs *= 2) {
      for (const n of bs <= 65536 ? [1, 2, 3, 5, 8] : [1, 3]) {
        for (const tail of [0, 1, 63, 64, 65]) {
          const data = seededBytes(bs + n + tail, n * bs + tail);
          const blocks = n + (tail ? 1 : 0);
          const out = new Uint8Array(blocks * 20 + 5);
          assert.equal(a.sha1Blocks(data, bs, out.subarray(5)), blocks);
          for (let i = 0; i < blocks; i++) {
            assert.deepEqual(Buffer.from(out.subarray(5 + 20 * i, 25 + 20 * i)), sha1(data.subarray(i * bs, Math.min(data.length, (i + 1) * bs))), `bs ${bs} n ${n} tail ${tail} block ${i}`);
          }
        }
      }
    }
    // A Uint32Array view counts in bytes, not elements.
    const words = new Uint32Array(seededBytes(9, 4096 * 3).buffer);
    const out = new Uint8Array(60);
    assert.equal(a.sha1Blocks(words, 4096, out), 3);
    assert.deepEqual(Buffer.from(out.subarray(40, 60)), sha1(new Uint8Array(words.buffer, 8192, 4096)));
  });

  it('refuses bad arguments with a TypeError and a stable code, never crashing', () => {
    const d = new Uint8Array(4096), o = new Uint8Array(20);
    const bad: Array<[() => unknown, string]> = [
      [() => a.sha1Blocks('x' as unknown as Uint8Array, 4096, o), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.sha1Blocks(d, 4096, new Uint8Array(19)), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.sha1Blocks(d, 1000, o), 'ERR_BF_BAD_BLOCK_SIZE'],
      [() => a.sha1Blocks(d, 256, o), 'ERR_BF_BAD_BLOCK_SIZE'],
      [() => a.sha1Blocks(d, -4096, o), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.sha1Blocks(d, NaN, o), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.sha1Blocks(d, 4096, d), 'ERR_BF_INVALID_ARGUMENT'],
      [() => (a.sha1Blocks as unknown as () => number)(), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.sha1(d, new Uint8Array(10)), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.sha1({} as Uint8Array, o), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.extents(-1, 0, 10), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.extents(0, 1.5, 10), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.extents(0, 2 ** 62, 2 ** 62), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.punchHole('3' as unknown as number, 0, 1), 'ERR_BF_INVALID_ARGUMENT'],
      [() => a.blockDeviceSize(2 ** 40), 'ERR_BF_INVALID_ARGUMENT'],
    ];
    for (const [f, code] of bad) {
      assert.throws(f, (e: Error & { code?: string }) => e.code === code && e instanceof Error, f.toString());
    }
    assert.throws(() => a.sha1Blocks(d, 4096, new Uint8Array(19)), TypeError);
  });

  it('turns failed system calls into errors with errno and the call name', () => {
    const f = join(dir, 'plain');
    writeFileSync(f, 'x');
    const fd = openSync(f, 'r');
    closeSync(fd); // now a closed descriptor: EBADF
    for (const call of [() => a.extents(fd, 0, 10), () => a.punchHole(fd, 0, 10), () => a.blockDeviceSize(fd)]) {
      assert.throws(call, (e: Error & { code?: string; errno?: number; syscall?: string }) => e.code === 'ERR_BF_SYSCALL' && e.errno === 9 && typeof e.syscall === 'string');
    }
    const rfd = openSync(f, 'r');
    try {
      assert.throws(() => a.blockDeviceSize(rfd), (e: Error & { errno?: number }) => e.errno === 25, 'a regular file is not a block device (ENOTTY)');
    } finally {
      closeSync(rfd);
    }
  });

  /** A file of `size` bytes with data at the given [offset, length) ranges and holes elsewhere. */
  function sparse(name: string, size: number, data: Array<[number, number]>): string {
    const p = join(dir, name);
    writeFileSync(p, '');
    truncateSync(p, size);
    const fd = openSync(p, 'r+');
    for (const [o, l] of data) writeSync(fd, seededBytes(o + 1, l), 0, l, o);
    closeSync(fd);
    return p;
  }
  const MiB = 1 << 20;
  const extentsOf = (p: string, off = 0, len = statSync(p).size) => {
    const fd = openSync(p, 'r');
    try { return a.extents(fd, off, len); } finally { closeSync(fd); }
  };

  it('lists the data extents of files made sparse on purpose', () => {
    assert.deepEqual(extentsOf(sparse('middle', 8 * MiB, [[3 * MiB, MiB]])), [3 * MiB, MiB]);
    assert.deepEqual(extentsOf(sparse('start-end', 8 * MiB, [[0, MiB], [7 * MiB, MiB]])), [0, MiB, 7 * MiB, MiB]);
    assert.deepEqual(extentsOf(sparse('hole-at-start', 4 * MiB, [[2 * MiB, 2 * MiB]])), [2 * MiB, 2 * MiB]);
    assert.deepEqual(extentsOf(sparse('all-hole', 16 * MiB, [])), []);
    assert.deepEqual(extentsOf(sparse('dense', 2 * MiB, [[0, 2 * MiB]])), [0, 2 * MiB]);
    // A window cuts extents to its range.
    assert.deepEqual(extentsOf(sparse('window', 8 * MiB, [[MiB, 4 * MiB]]), 2 * MiB, MiB), [2 * MiB, MiB]);
    assert.deepEqual(extentsOf(join(dir, 'window'), 6 * MiB, MiB), []);
    // FileImageSource reports the same, as Extent objects.
    const src = new FileImageSource(join(dir, 'start-end'), a);
    try {
      assert.deepEqual(src.extents(0, 8 * MiB), [{ offset: 0, length: MiB }, { offset: 7 * MiB, length: MiB }]);
    } finally {
      src.close();
    }
  });

  it('punches holes: the range reads back as zeros, the size stays, the allocation shrinks', () => {
    const p = sparse('punch', 8 * MiB, [[0, 8 * MiB]]);
    const before = statSync(p).blocks;
    const fd = openSync(p, 'r+');
    try {
      assert.equal(a.punchHole(fd, 2 * MiB, 3 * MiB), 'punched');
      assert.equal(a.punchHole(fd, 0, 0), 'punched');
    } finally {
      closeSync(fd);
    }
    const st = statSync(p);
    assert.equal(st.size, 8 * MiB);
    assert.ok(st.blocks <= before - (3 * MiB) / 512 + 16, `allocated ${st.blocks} 512-byte blocks, was ${before}`);
    const back = readFileSync(p);
    assert.ok(back.subarray(2 * MiB, 5 * MiB).every((x) => x === 0));
    assert.deepEqual(back.subarray(0, 2 * MiB), Buffer.from(seededBytes(1, 8 * MiB).subarray(0, 2 * MiB)));
    assert.deepEqual(extentsOf(p), [0, 2 * MiB, 5 * MiB, 3 * MiB]);
  });

  it('makes the scanner skip holes, with the same block map as reading them', async () => {
    const p = sparse('scan-sparse', 64 * MiB, [[MiB, 3 * MiB], [40 * MiB + 100, 5000]]);
    const withNative = new Scanner({ workers: 2 });
    const wasmOnly = new Scanner({ workers: 2, backend: 'wasm' });
    try {
      const [x] = await withNative.scan(p, { sha1: true });
      const [y] = await wasmOnly.scan(p, { sha1: true });
      assert.deepEqual(x!.dataRuns, y!.dataRuns);
      assert.deepEqual(x!.fingerprints, y!.fingerprints);
      assert.deepEqual(x!.digests, y!.digests);
      assert.equal(x!.stats().nonZeroBlocks, 768 + 2);
    } finally {
      await withNative.close();
      await wasmOnly.close();
    }
  });
});

describe('without the native addon', () => {
  it('runs on WASM when the addon is hidden, and says why', () => {
    const script = `
      const { chooseBackend, nativeStatus } = await import(${JSON.stringify(new URL('../src/engine/backend.js', import.meta.url).href)});
      const { Engine } = await import(${JSON.stringify(new URL('../src/index.js', import.meta.url).href)});
      const e = new Engine();
      const d = Buffer.from(e.sha1(new Uint8Array([97, 98, 99]))).toString('hex');
      console.log(JSON.stringify({ choice: chooseBackend().sha1, native: nativeStatus().loaded, reason: chooseBackend().reason, d }));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
      encoding: 'utf8',
      env: { ...process.env, BLOCKFERRY_NATIVE_PATH: '/nonexistent/blockferry.node', BLOCKFERRY_BACKEND: '' },
    });
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.deepEqual([out.choice, out.native, out.d], ['wasm', false, 'a9993e364706816aba3e25717850c26c9cd0d89d']);
    assert.match(out.reason, /not loaded/);
  });

  it('refuses BLOCKFERRY_BACKEND=native when the addon is missing, and a bogus backend', () => {
    const bin = new URL('../../bin/blockferry.js', import.meta.url).pathname;
    const r = spawnSync(process.execPath, [bin, 'doctor'], { encoding: 'utf8', env: { ...process.env, BLOCKFERRY_NATIVE_PATH: '/nonexistent.node', BLOCKFERRY_BACKEND: 'native' } });
    assert.equal(r.status, 1);
    assert.match(r.stderr, /ERR_BF_BACKEND_UNAVAILABLE/);
    assert.throws(() => chooseBackend('gpu'), { code: 'ERR_BF_INVALID_ARGUMENT' });
  });

  it('installs without cargo: the build script prints one notice and succeeds', () => {
    const r = spawnSync(process.execPath, [new URL('../../scripts/build-native.mjs', import.meta.url).pathname], {
      encoding: 'utf8',
      env: { ...process.env, PATH: '/nonexistent' },
      cwd: new URL('../../', import.meta.url).pathname,
    });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1);
    assert.match(r.stderr, /cargo not found.*WASM core/);
  });
});
