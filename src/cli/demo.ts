import { mkdtempSync, rmSync, openSync, writeSync, closeSync, mkdirSync, readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { DestinationService } from '../roles/destination/service.js';
import { migrate } from '../migrate/migrate.js';
import { TrackedImage } from '../image/tracked.js';
import { describeMigration } from './describe.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Scanner, blockMapsFor } from '../scan/scanner.js';
import { similarityMatrix } from '../similarity/similarity.js';
import { createProgress, human, type ProgressMode } from './progress.js';
import Table from 'cli-table3';
import { basename } from 'node:path';

const MiB = 1 << 20;

/** Deterministic pseudo-random bytes: the same seed gives the same image everywhere. */
export function fillRandom(buf: Uint8Array, seed: number): void {
  const u32 = new Uint32Array(buf.buffer, buf.byteOffset, buf.byteLength >>> 2);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < u32.length; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    u32[i] = x;
  }
}

/**
 * Three images like a small fleet's disks: "base" (an OS, free space, user
 * data), "clone" (base after a few days of use: 6 % of its blocks rewritten,
 * a file copied elsewhere on the disk) and "sibling" (another VM installed
 * from half the same OS files).
 */
export function makeDemoImages(dir: string): string[] {
  const os = new Uint8Array(40 * MiB); fillRandom(os, 1);
  const user = new Uint8Array(32 * MiB); fillRandom(user, 2);
  const free = new Uint8Array(24 * MiB);
  const base = Buffer.concat([os, free, user]);
  const clone = Buffer.from(base);
  let x = 7;
  for (let i = 0; i < clone.length / 4096 * 0.06; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    const b = (x >>> 0) % (clone.length / 4096);
    fillRandom(clone.subarray(b * 4096, b * 4096 + 4096), x);
  }
  clone.set(os.subarray(8 * MiB, 12 * MiB), 50 * MiB); // a copied file lands in free space
  const other = new Uint8Array(96 * MiB); fillRandom(other, 3);
  other.set(os.subarray(0, 20 * MiB), 0);
  other.fill(0, 60 * MiB, 80 * MiB);
  const out: string[] = [];
  for (const [name, data] of [['base.img', base], ['clone.img', clone], ['sibling.img', other]] as const) {
    const p = join(dir, name);
    const fd = openSync(p, 'w');
    for (let at = 0; at < data.length; ) at += writeSync(fd, data, at, data.length - at);
    closeSync(fd);
    out.push(p);
  }
  return out;
}

export async function runDemo(o: { dir?: string; progress: ProgressMode }): Promise<string> {
  const dir = o.dir ?? mkdtempSync(join(tmpdir(), 'blockferry-demo-'));
  if (o.dir) mkdirSync(dir, { recursive: true });
  const scanner = new Scanner();
  const progress = createProgress(o.progress);
  let svc: DestinationService | undefined;
  let writer: NodeJS.Timeout | undefined;
  try {
    const [base, clone, sibling] = makeDemoImages(dir) as [string, string, string];
    const maps = [];
    for (const p of [base, clone, sibling]) {
      const r = await blockMapsFor(scanner, p, { blockSize: 4096, rescan: true, cache: false, onProgress: (u) => progress.update(u) });
      maps.push(r.maps[0]!);
    }
    progress.stop();
    const m = similarityMatrix(maps);
    const names = m.images.map((i) => basename(i.path));
    const sim = new Table({ head: ['base \\ target', ...names], style: { head: [], border: [] } });
    m.similarity.forEach((row, b) => sim.push([names[b]!, ...row.map((v) => `${v.toFixed(1)} %`)]));

    // A destination on loopback that already holds base.img and sibling.img.
    const key = randomBytes(32);
    svc = await DestinationService.start({ dataDir: join(dir, 'destination'), auth: { key }, neighbours: [base, sibling] });
    // clone.img is a running VM's disk: a writer rewrites random blocks until cutover pauses it.
    const tracked = new TrackedImage(clone);
    let writes = 0, seed = 99;
    const block = new Uint8Array(4096);
    writer = setInterval(() => {
      for (let k = 0; k < 4; k++) {
        seed = (seed * 1103515245 + 12345) >>> 0;
        fillRandom(block, seed);
        tracked.write((seed % tracked.blocks) * 4096, block);
        writes++;
      }
    }, 2);
    const r = await migrate(clone, {
      to: `127.0.0.1:${svc.address.port}`, name: 'clone', strategy: 'similarity', auth: { key }, tracked, scanner, dirtyThreshold: 16,
      pause: () => { clearInterval(writer); writer = undefined; },
    });
    tracked.close();
    const same = readFileSync(clone).equals(readFileSync(join(dir, 'destination', 'clone.img')));
    const nonZero = maps[1]!.dataBlocks * 4096;
    return [
      `blockferry demo: three 96 MiB images in ${o.dir ?? 'a temporary directory'}; base.img and sibling.img already sit at the destination.`,
      '',
      'Similarity: % of the target\'s non-zero blocks found in the base',
      sim.toString(),
      '',
      `Live migration of clone.img to a destination service on 127.0.0.1:${svc.address.port} (pre-shared key), strategy similarity,`,
      `while a writer rewrote ${writes} random 4 KiB blocks until cutover paused it:`,
      describeMigration(r),
      '',
      `Destination image byte-identical to the source: ${same ? 'yes' : 'NO'}. A full copy would have sent ${human(nonZero)} of block data; this one sent ${human(r.wire.sent.data)}.`,
    ].join('\n');
  } finally {
    if (writer) clearInterval(writer);
    progress.stop();
    await svc?.close();
    await scanner.close();
    if (!o.dir) rmSync(dir, { recursive: true, force: true });
  }
}
