// Where a destination finds blocks before asking the source for them. Each
// fill source is one entry of FILL_SOURCES, named on the wire by a bit of
// BEGIN's fills mask: neighbour images and a base-image repository now;
// backup servers and intermediaries are further entries.
import { open } from 'node:fs/promises';
import { openSource } from '../image/source.js';
import { IntervalSet, blockLength } from '../blocks/intervals.js';
import { NO_REF, refBlock, refImage } from '../table/table.js';
import { FILL_NEIGHBOURS, FILL_REPOSITORY, FILL_SCATTER } from '../protocol/messages.js';
import type { Neighbourhood } from '../blockindex/neighbourhood.js';
import { RepositoryFills, type RepositoryLink } from './repository/fills.js';
import { GatherFills, type GatherPool } from './intermediary/gather.js';

export type { FillContext, FillRequest, FillSource } from './fill-source.js';
import type { FillContext, FillRequest, FillSource } from './fill-source.js';

/** What a destination offers to fill from, by wire bit. */
export interface FillProviders {
  neighbourhood?: Neighbourhood;
  /** The base-image repository the destination was started with (`serve --repository`). */
  repository?: RepositoryLink;
  /** Scatter-gather: the destination's stage and its connections to intermediaries. */
  gather?: GatherPool;
}

/** In the order they are consulted: local neighbour images first (a disk read), then the repository (a round trip). */
export const FILL_SOURCES: ReadonlyArray<{ bit: number; name: string; open(p: FillProviders): FillSource | undefined }> = [
  { bit: FILL_NEIGHBOURS, name: 'neighbours', open: (p) => (p.neighbourhood ? new NeighbourFills(p.neighbourhood) : undefined) },
  { bit: FILL_REPOSITORY, name: 'repository', open: (p) => (p.repository ? new RepositoryFills(p.repository) : undefined) },
  { bit: FILL_SCATTER, name: 'gather', open: (p) => (p.gather ? new GatherFills(p.gather) : undefined) },
];

/** Bytes read from a neighbour per run: 1 MiB, like the source's batches. */
const RUN_BYTES = 1 << 20;

interface Hit {
  block: number;
  image: number;
  nb: number;
  fp: bigint;
  sig: bigint;
}

interface Neighbour {
  size: number;
  /** Reads up to length bytes at position into buf; resolves with the count (0 at the end). */
  read(buf: Buffer, at: number, length: number, position: number): Promise<number>;
  close(): Promise<void> | void;
}

/** Blocks from the neighbour images of the destination's block index. */
export class NeighbourFills implements FillSource {
  readonly name = 'neighbours';
  private readonly sources = new Map<number, Promise<Neighbour | null>>();

  constructor(private readonly neighbourhood: Neighbourhood) {}

  /** A neighbour image, read through the thread pool (the event loop keeps serving while the disk works). */
  private source(id: number): Promise<Neighbour | null> {
    let src = this.sources.get(id);
    if (src === undefined) {
      const im = this.neighbourhood.images[id];
      src = im
        ? (async (): Promise<Neighbour> => {
          if (im.format === 'qcow2') {
            // A qcow2 neighbour is read through the qcow2 reader (guest offsets, not file offsets).
            const q = openSource({ kind: 'qcow2', path: im.path });
            return {
              size: q.size,
              read: async (buf, at, length, position) => { const n = Math.max(0, Math.min(length, q.size - position)); if (n > 0) q.readInto(buf.subarray(at), position, n); return n; },
              close: () => q.close(),
            };
          }
          const fh = await open(im.path, 'r');
          return { size: (await fh.stat()).size, read: async (buf, at, length, position) => (await fh.read(buf, at, length, position)).bytesRead, close: () => fh.close() };
        })().catch(() => null) // the neighbour went away: its blocks are just not there
        : Promise.resolve(null);
      this.sources.set(id, src);
    }
    return src;
  }

  async fill(req: FillRequest, ctx: FillContext): Promise<IntervalSet> {
    const filled = new IntervalSet();
    const n = req.missing.reduce((a, iv) => a + iv.count, 0);
    if (n === 0) return filled;
    const fps = new BigUint64Array(n), sigs = new BigUint64Array(n), blocks = new Float64Array(n);
    let k = 0;
    for (const iv of req.missing) {
      for (let b = iv.start; b < iv.start + iv.count; b++, k++) {
        blocks[k] = b;
        fps[k] = req.fingerprints[b - req.start]!;
        sigs[k] = req.signatures[b - req.start]!;
      }
    }
    const refs = this.neighbourhood.lookupColumns(fps, sigs);
    const hits: Hit[] = [];
    for (let i = 0; i < n; i++) {
      if (refs[i] !== NO_REF) hits.push({ block: blocks[i]!, image: refImage(refs[i]!), nb: refBlock(refs[i]!), fp: fps[i]!, sig: sigs[i]! });
    }
    const bs = ctx.blockSize;
    const len = (b: number) => blockLength(ctx.size, bs, b);
    const maxRun = Math.max(1, Math.floor(RUN_BYTES / bs));
    // Runs of consecutive blocks that map to consecutive blocks of one neighbour: one read, one fingerprint call, one write.
    for (let i = 0; i < hits.length; ) {
      const h0 = hits[i]!;
      let j = i + 1;
      while (j < hits.length && j - i < maxRun && hits[j]!.block === h0.block + (j - i) && hits[j]!.image === h0.image && hits[j]!.nb === h0.nb + (j - i)) j++;
      const run = hits.slice(i, j);
      i = j;
      const src = await this.source(h0.image);
      const bytes = run.reduce((a, h) => a + len(h.block), 0);
      // A short block (the image's last) only matches a short block of the same length, last in its run.
      if (!src || h0.nb * bs + bytes > src.size || run.some((h, x) => x < run.length - 1 && len(h.block) < bs)) continue;
      const buf = Buffer.allocUnsafe(bytes);
      try {
        for (let at = 0; at < bytes; ) {
          const bytesRead = await src.read(buf, at, bytes - at, h0.nb * bs + at);
          if (bytesRead === 0) throw new Error('short read');
          at += bytesRead;
        }
      } catch {
        continue; // a neighbour that shrank or fails to read: these blocks are asked for instead
      }
      const got = ctx.engine.fingerprints(buf, bs);
      // Write maximal sub-runs of blocks that check out.
      for (let x = 0; x < run.length; ) {
        if (got.fingerprints[x] !== run[x]!.fp || got.signatures[x] !== run[x]!.sig) { x++; continue; }
        let y = x + 1;
        while (y < run.length && got.fingerprints[y] === run[y]!.fp && got.signatures[y] === run[y]!.sig) y++;
        await ctx.sink.write(run[x]!.block * bs, buf.subarray(x * bs, Math.min(bytes, y * bs)));
        filled.add(run[x]!.block, y - x);
        x = y;
      }
    }
    return filled;
  }

  close(): void {
    for (const s of this.sources.values()) void s.then((n) => n?.close()).catch(() => {});
    this.sources.clear();
  }
}
