import { mkdtempSync, rmSync, openSync, writeSync, closeSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Scanner, blockMapsFor } from '../scan/scanner.js';
import { similarityMatrix } from '../similarity/similarity.js';
import { createProgress, human, type ProgressMode } from './progress.js';
import Table from 'cli-table3';
import { basename } from 'node:path';

const MiB = 1 << 20;

/** Deterministic pseudo-random bytes: the same seed gives the same image everywhere. */
function fillRandom(buf: Uint8Array, seed: number): void {
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
  try {
    const images = makeDemoImages(dir);
    const t0 = performance.now();
    const maps = [];
    let bytes = 0;
    for (const p of images) {
      const r = await blockMapsFor(scanner, p, { blockSize: 4096, rescan: true, noSave: !o.dir, onProgress: (u) => progress.update({ phase: 'scan', ...u }) });
      maps.push(r.maps[0]!);
      bytes += r.maps[0]!.imageSize;
    }
    progress.stop();
    const seconds = (performance.now() - t0) / 1000;
    const m = similarityMatrix(maps);
    const names = m.images.map((i) => basename(i.path));
    const sim = new Table({ head: ['base \\ target', ...names, 'average'], style: { head: [], border: [] } });
    m.similarity.forEach((row, b) => sim.push([names[b]!, ...row.map((v) => `${v.toFixed(1)} %`), `${m.average[b]!.toFixed(1)} %`]));
    const send = new Table({ head: ['still to send, base \\ target', ...names], style: { head: [], border: [] } });
    m.bytesToSend.forEach((row, b) => send.push([names[b]!, ...row.map((v) => human(v))]));
    const cloneIdx = 1;
    const full = m.images[cloneIdx]!.nonZeroBlocks * m.blockSize;
    return [
      `blockferry demo: 3 images of ${human(maps[0]!.imageSize)} in ${o.dir ?? 'a temporary directory'}, scanned at 4 KiB blocks with ${scanner.workers} workers in ${seconds.toFixed(2)} s (${(bytes / seconds / 1e6).toFixed(0)} MB/s)`,
      '',
      'Similarity: % of the target\'s non-zero blocks found in the base',
      sim.toString(),
      '',
      'Bytes a deduplicating transfer still sends when the destination holds the base',
      send.toString(),
      '',
      `Moving clone.img to a host that holds base.img sends ${human(m.bytesToSend[0]![cloneIdx]!)} instead of ${human(full)} of non-zero data.`,
    ].join('\n');
  } finally {
    progress.stop();
    await scanner.close();
    if (!o.dir) rmSync(dir, { recursive: true, force: true });
  }
}
