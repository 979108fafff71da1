// The native addon: SHA-NI SHA-1 against WASM, node:crypto, hash-wasm and
// openssl's streaming speed; and a sparse-image scan with and without native
// extents.
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { createHash, hash as cryptoHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createSHA1 } from 'hash-wasm';
import { addon, loadError } from 'blockferry/native';
import { Engine } from '../src/index.js';
import { Scanner } from '../src/scan/scanner.js';
import { check, randomFill, runGroup, type GroupResult } from './lib.js';

const BS = 4096;
const SIZE = 256 << 20;

export async function benchNative(): Promise<GroupResult[]> {
  if (!addon) {
    console.log(`\n(native addon not loaded: ${loadError}; native benchmarks skipped)`);
    return [];
  }
  const a = addon;
  const engine = new Engine({ initialBytes: SIZE + (16 << 20), backend: 'wasm' });
  const region = engine.alloc(SIZE);
  const out = engine.alloc((SIZE / BS) * 20);
  randomFill(engine.view(region), 5);
  const buf = Buffer.from(engine.view(region));
  const n = SIZE / BS;
  const nativeOut = Buffer.alloc(n * 20);
  const file = join(tmpdir(), 'blockferry-bench-sha1.img');
  writeFileSync(file, buf);
  const hw = await createSHA1();
  try {
    a.sha1Blocks(buf, BS, nativeOut);
    engine.sha1BlocksAt(region.ptr, SIZE, BS, out.ptr);
    check('native = wasm', nativeOut.equals(engine.view(out)));
    for (const i of [0, 1, n / 2, n - 1]) check('native = node:crypto', createHash('sha1').update(buf.subarray(i * BS, (i + 1) * BS)).digest().equals(nativeOut.subarray(i * 20, i * 20 + 20)));
    const whole = createHash('sha1').update(buf).digest('hex');
    check('openssl', execFileSync('openssl', ['dgst', '-sha1', '-r', file], { encoding: 'utf8' }).startsWith(whole));
    const sha1 = await runGroup({
      title: 'SHA-1 per 4 KiB block, native SHA-NI (256 MiB per op, one core)',
      workPerOp: SIZE,
      unit: 'MB/s',
      time: 1,
      iterations: 4,
      warmupIterations: 1,
      tasks: [
        { name: 'blockferry native (SHA-NI, 4 streams)', ours: true, fn: () => a.sha1Blocks(buf, BS, nativeOut) },
        { name: 'blockferry wasm', fn: () => engine.sha1BlocksAt(region.ptr, SIZE, BS, out.ptr) },
        { name: 'node createHash', fn: () => { for (let i = 0; i < n; i++) createHash('sha1').update(buf.subarray(i * BS, (i + 1) * BS)).digest(); } },
        { name: 'node crypto.hash', fn: () => { for (let i = 0; i < n; i++) cryptoHash('sha1', buf.subarray(i * BS, (i + 1) * BS), 'buffer'); } },
        { name: 'hash-wasm', fn: () => { for (let i = 0; i < n; i++) { hw.init(); hw.update(buf.subarray(i * BS, (i + 1) * BS)); hw.digest('binary'); } } },
        { name: 'openssl dgst -sha1 (streaming, page-cached file)', fn: () => execFileSync('openssl', ['dgst', '-sha1', file]) },
      ],
      goals: [
        { vs: 'node createHash', min: 2.8 },
        { vs: 'openssl dgst -sha1 (streaming, page-cached file)', min: 1.6 },
      ],
    });
    return [sha1, await sparseScan()];
  } finally {
    rmSync(file, { force: true });
  }
}

/** A 4 GiB sparse image holding 400 MiB of data in 100 extents of 4 MiB. */
async function sparseScan(): Promise<GroupResult> {
  const path = join(tmpdir(), 'blockferry-bench-sparse.img');
  const size = 4 * 2 ** 30;
  writeFileSync(path, '');
  truncateSync(path, size);
  const fd = openSync(path, 'r+');
  const chunk = new Uint8Array(4 << 20);
  for (let i = 0; i < 100; i++) {
    randomFill(chunk, 100 + i);
    writeSync(fd, chunk, 0, chunk.length, i * (size / 100) - ((i * (size / 100)) % 4096));
  }
  closeSync(fd);
  const scanner = new Scanner({ workers: 2 });
  try {
    const [x] = await scanner.scan(path, { extents: true });
    const [y] = await scanner.scan(path, { extents: false });
    check('sparse maps agree', Buffer.from(x!.fingerprints.buffer).equals(Buffer.from(y!.fingerprints.buffer)) && Buffer.from(x!.dataRuns.buffer).equals(Buffer.from(y!.dataRuns.buffer)) && x!.dataBlocks === 100 * 1024);
    return await runGroup({
      title: 'Scan of a 4 GiB sparse image holding 400 MiB of data (2 workers, page-cached data)',
      workPerOp: size,
      unit: 'MB/s',
      time: 1,
      iterations: 3,
      warmupIterations: 1,
      tasks: [
        { name: 'with native extents (holes skipped)', ours: true, fn: () => scanner.scan(path, { extents: true }) },
        { name: 'without extents (holes read)', fn: () => scanner.scan(path, { extents: false }) },
      ],
      goals: [{ vs: 'without extents (holes read)', min: 5 }],
    });
  } finally {
    await scanner.close();
    rmSync(path, { force: true });
  }
}
