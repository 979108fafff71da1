// Scatter-gather fixtures: four ext4 images built from one base, the
// distinct contents they hold, and a destination with two intermediaries.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { IntermediaryService } from '../src/roles/intermediary/service.js';
import { DestinationService } from '../src/roles/destination/service.js';
import { seededBytes } from './util.js';

const sha1 = (b: Uint8Array) => createHash('sha1').update(b).digest();

/** Four ext4 images from one base: shared system files, a few of each image's own. */
export function images(dir: string, tag: string): string[] {
  const base: Record<string, Uint8Array> = {};
  for (let i = 0; i < 12; i++) base[`lib${i}.so`] = seededBytes(100 + i, 400_000 + i * 10_000);
  return [0, 1, 2, 3].map((v) => {
    const root = join(dir, `${tag}-${v}.d`);
    mkdirSync(root);
    for (const [f, data] of Object.entries(base)) writeFileSync(join(root, f), data);
    writeFileSync(join(root, `own-${v}.dat`), seededBytes(1000 + v, 600_000));
    if (v % 2) writeFileSync(join(root, 'lib3.so'), seededBytes(2000 + v, 300_000)); // an upgraded library
    const img = join(dir, `${tag}-${v}.img`);
    execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', root, '-E', 'lazy_itable_init=0,nodiscard', '-U', `00000000-0000-0000-0000-00000000000${v}`, img, '24M'], { stdio: 'pipe' });
    return img;
  });
}

/** SHA-1 of every distinct non-zero 4 KiB block over all images, and their count: what must leave the source, once each. */
export function distinct(imgs: string[]): { blocks: number; bytes: number; dataBlocks: number } {
  const seen = new Set<string>();
  let dataBlocks = 0;
  const zero = Buffer.alloc(4096);
  for (const p of imgs) {
    const b = readFileSync(p);
    for (let at = 0; at < b.length; at += 4096) {
      const x = b.subarray(at, at + 4096);
      if (x.equals(zero.subarray(0, x.length))) continue;
      dataBlocks++;
      seen.add(sha1(x).toString('hex'));
    }
  }
  return { blocks: seen.size, bytes: seen.size * 4096, dataBlocks };
}

export async function services(dir: string, tag: string, gatherBwlimit = 0) {
  const auth = { insecure: true };
  const dst = await DestinationService.start({ dataDir: join(dir, `${tag}-dst`), auth, gatherBwlimit, stage: { capacity: 8 << 20 } });
  const ims = [
    await IntermediaryService.start({ dataDir: join(dir, `${tag}-im1`), capacity: 64 << 20, auth }),
    await IntermediaryService.start({ dataDir: join(dir, `${tag}-im2`), capacity: 64 << 20, auth }),
  ];
  const addr = (s: { address: { host: string; port: number } }) => `${s.address.host}:${s.address.port}`;
  return { auth, dst, ims, to: addr(dst), via: ims.map(addr) };
}
