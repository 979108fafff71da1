// The block map cache (issue 14): what a hit saves. A page-cached 512 MiB
// image of random data (every block non-zero, the worst case for a map's
// size): blockMapsFor answered from the cache (a hit: read the entry, check
// its checksum and identity, touch it) next to scanning it (cache: false),
// with and without SHA-1. Both must give the same map before anything is timed.
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Scanner, blockMapsFor } from '../src/scan/scanner.js';
import { MapCache } from '../src/blockmap/cache.js';
import { check, randomFill, runGroup, type GroupResult } from './lib.js';

const SIZE = 512 << 20;

export async function benchCache(): Promise<GroupResult[]> {
  const dir = mkdtempSync(join(tmpdir(), 'blockferry-bench-cache-'));
  const path = join(dir, 'image.img');
  const fd = openSync(path, 'w');
  const chunk = new Uint8Array(64 << 20);
  for (let at = 0, seed = 1; at < SIZE; at += chunk.length, seed++) {
    randomFill(chunk, 300 + seed);
    writeSync(fd, chunk);
  }
  closeSync(fd);
  const scanner = new Scanner({ workers: 2 });
  const cache = new MapCache({ dir: join(dir, 'cache') });
  const out: GroupResult[] = [];
  try {
    for (const sha1 of [false, true]) {
      const scanned = await blockMapsFor(scanner, path, { blockSize: 4096, sha1, cache, rescan: true });
      const hit = await blockMapsFor(scanner, path, { blockSize: 4096, sha1, cache });
      const fresh = await blockMapsFor(scanner, path, { blockSize: 4096, sha1, cache: false });
      check('a hit is loaded', hit.source === 'loaded' && scanned.source === 'scanned' && fresh.source === 'scanned');
      check('hit = scan', Buffer.from(hit.maps[0]!.fingerprints.buffer).equals(Buffer.from(fresh.maps[0]!.fingerprints.buffer))
        && Buffer.from(hit.maps[0]!.signatures.buffer).equals(Buffer.from(fresh.maps[0]!.signatures.buffer))
        && (!sha1 || Buffer.from(hit.maps[0]!.digests!).equals(Buffer.from(fresh.maps[0]!.digests!))));
      out.push(await runGroup({
        title: `block maps of a 512 MiB image (all data), ${sha1 ? 'with SHA-1' : 'fingerprints only'}: a cache hit vs a scan (2 workers)`,
        workPerOp: SIZE,
        unit: 'MB/s',
        time: 1,
        iterations: 5,
        warmupIterations: 1,
        tasks: [
          { name: 'blockMapsFor, cache hit', ours: true, fn: () => blockMapsFor(scanner, path, { blockSize: 4096, sha1, cache }) },
          { name: 'blockMapsFor, scan (cache: false)', fn: () => blockMapsFor(scanner, path, { blockSize: 4096, sha1, cache: false }) },
        ],
      }));
    }
    return out;
  } finally {
    await scanner.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
