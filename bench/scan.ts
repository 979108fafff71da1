// Scan throughput of a page-cached 2 GiB image of random data: 1 and 2
// workers, with and without SHA-1, next to sha1sum, openssl and a plain read.
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Scanner } from '../src/scan/scanner.js';
import { check, randomFill, runGroup, type GroupResult } from './lib.js';

const SIZE = 2 * 2 ** 30;

function makeImage(path: string): void {
  const fd = openSync(path, 'w');
  const chunk = new Uint8Array(64 << 20);
  for (let at = 0, seed = 1; at < SIZE; at += chunk.length, seed++) {
    randomFill(chunk, seed);
    writeSync(fd, chunk);
  }
  closeSync(fd);
}

function plainRead(path: string): number {
  const fd = openSync(path, 'r');
  const buf = Buffer.allocUnsafe(16 << 20);
  let total = 0, n: number;
  while ((n = readSync(fd, buf, 0, buf.length, null)) > 0) total += n;
  closeSync(fd);
  return total;
}

export async function benchScan(): Promise<GroupResult[]> {
  const path = join(tmpdir(), 'blockferry-bench-2g.img');
  makeImage(path);
  try {
    check('plain read', plainRead(path) === SIZE); // also warms the page cache
    const one = new Scanner({ workers: 1 });
    const two = new Scanner({ workers: 2 });
    try {
      const [m] = await two.scan(path, { blockSize: 4096, sha1: true });
      const [m1] = await one.scan(path, { blockSize: 4096, sha1: true });
      check('1 and 2 workers agree', Buffer.from(m!.digests!).equals(Buffer.from(m1!.digests!)));
      const fd = openSync(path, 'r');
      const blk = Buffer.alloc(4096);
      for (const i of [0, 1, 262_143, 524_287]) {
        readSync(fd, blk, 0, 4096, i * 4096);
        check('scan digest', createHash('sha1').update(blk).digest().equals(Buffer.from(m!.digest(i)!)), `block ${i}`);
      }
      closeSync(fd);
      const whole = execFileSync('sha1sum', [path], { encoding: 'utf8' }).split(' ')[0];
      const ossl = execFileSync('openssl', ['dgst', '-sha1', '-r', path], { encoding: 'utf8' }).split(' ')[0];
      check('sha1sum and openssl agree', whole === ossl);
      return [
        await runGroup({
          title: 'Scan of a page-cached 2 GiB random image, 4 KiB blocks (zero flag, fingerprint, signature; +SHA-1 where named)',
          workPerOp: SIZE,
          unit: 'MB/s',
          time: 1,
          iterations: 3,
          warmupIterations: 1,
          tasks: [
            { name: 'blockferry scan, 2 workers, +SHA-1', ours: true, fn: () => two.scan(path, { blockSize: 4096, sha1: true }) },
            { name: 'blockferry scan, 1 worker, +SHA-1', fn: () => one.scan(path, { blockSize: 4096, sha1: true }) },
            { name: 'blockferry scan, 2 workers', fn: () => two.scan(path, { blockSize: 4096 }) },
            { name: 'blockferry scan, 1 worker', fn: () => one.scan(path, { blockSize: 4096 }) },
            { name: 'openssl dgst -sha1 (whole file)', fn: () => execFileSync('openssl', ['dgst', '-sha1', path]) },
            { name: 'sha1sum (whole file)', fn: () => execFileSync('sha1sum', [path]) },
            { name: 'plain read, 16 MiB reads', fn: () => plainRead(path) },
          ],
          goals: [
            { vs: 'blockferry scan, 1 worker, +SHA-1', min: 1.8 },
            { vs: 'openssl dgst -sha1 (whole file)', min: 2 },
            { vs: 'sha1sum (whole file)', min: 4 },
          ],
        }),
      ];
    } finally {
      await one.close();
      await two.close();
    }
  } finally {
    rmSync(path, { force: true });
  }
}
