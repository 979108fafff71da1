// A layer's identity (paper 000's snapshot index keys on it): a digest of
// what the layer says, not of where it lives. Two files that cover the same
// guest ranges with the same bytes are the same layer, whatever their names,
// cluster sizes or host layout, so the nightly overlay a backup system copied
// under another name is recognised, and a base image that a production
// server consolidated (qemu-img commit of snapshots 1–4, paper 000 Table 1)
// matches the backup server's merged stack of base, 1, 2, 3 and 4.
//
// What a layer says: the ranges it covers (its data and zero clusters; the
// rest shows its backing file) and the bytes there. A bottom layer (no
// backing) covers everything: holes and zero clusters read as zeros either
// way. The digest is SHA-256 over the size, the bottom flag, the covered
// ranges, and the scanner's block map at 64 KiB blocks (runs of non-zero
// blocks and their SHA-1 digests), so the bytes are read once by the scan
// workers (src/scan) and never by this thread.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, realpathSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlockferryError, ErrorCode, ImageError } from '../errors.js';
import { Qcow2ImageSource, isQcow2File, type LayerRun } from '../image/qcow2.js';
import { FileImageSource, sourceIdentity, specFor, type Extent } from '../image/source.js';
import type { BlockMap } from '../blockmap/blockmap.js';
import type { Scanner } from '../scan/scanner.js';

/** Block size of the identity's scan: coarse enough to be cheap, fine enough that a changed cluster changes a digest. */
export const IDENTITY_BLOCK = 64 << 10;
const DOMAIN = 'blockferry layer identity v1\0';

/** One layer (or a merged stack of layers) as the index knows it. */
export interface LayerIdentity {
  /** SHA-256, 64 hex digits. */
  id: string;
  /** Guest size of the layer (its own virtual size). */
  size: number;
  /** No backing below it: it covers the whole range. */
  bottom: boolean;
  /** Guest byte ranges it covers (data and zero clusters), sorted, coalesced; [0, size) for a bottom layer. */
  covered: Extent[];
  /** Bytes of its data clusters: what sending it moves at most. */
  dataBytes: number;
}

/** What a stack of layers covers, without reading data: the allocation maps of the top `depth` files of path's chain, merged. */
export interface StackMap {
  size: number;
  bottom: boolean;
  covered: Extent[];
  dataBytes: number;
}

const openRaw = (p: string) => new FileImageSource(p);

/**
 * The merged map of the top `depth` layers of the chain at path (a raw file
 * is one bottom layer). Costs the layers' metadata, not their data.
 */
export function stackMap(path: string, depth: number): StackMap {
  if (!isQcow2File(path)) {
    const f = new FileImageSource(path);
    try {
      const dataBytes = f.extents(0, f.size).reduce((n, e) => n + e.length, 0);
      return { size: f.size, bottom: true, covered: f.size ? [{ offset: 0, length: f.size }] : [], dataBytes };
    } finally {
      f.close();
    }
  }
  const src = new Qcow2ImageSource(path, null, openRaw, depth);
  let bottom: boolean;
  const merged: LayerRun[] = [];
  try {
    const n = src.layers.length;
    bottom = n < depth || !hasBacking(path, depth);
    const walk = (i: number, offset: number, length: number) => {
      if (i >= n || length <= 0) return;
      for (const r of src.layerMap(i, offset, length)) {
        if (r.kind === 'unallocated') walk(i + 1, r.offset, r.length);
        else merged.push(r);
      }
    };
    walk(0, 0, src.size);
    const size = src.size;
    merged.sort((a, b) => a.offset - b.offset);
    const dataBytes = merged.reduce((s, r) => s + (r.kind === 'data' ? r.length : 0), 0);
    const covered: Extent[] = bottom ? (size ? [{ offset: 0, length: size }] : []) : coalesce(merged);
    return { size, bottom, covered, dataBytes };
  } finally {
    src.close();
  }
}

/** Whether the file `depth` layers down path's chain has a backing file (named, even when it is not there). */
function hasBacking(path: string, depth: number): boolean {
  try {
    const deeper = new Qcow2ImageSource(path, null, openRaw, depth + 1);
    const n = deeper.layers.length;
    deeper.close();
    return n > depth;
  } catch (e) {
    if (e instanceof ImageError && e.code === ErrorCode.IMAGE_NOT_FOUND) return true; // named, absent here: still not a bottom layer
    throw e;
  }
}

function coalesce(runs: readonly Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last && last.offset + last.length === r.offset) last.length += r.length;
    else out.push({ offset: r.offset, length: r.length });
  }
  return out;
}

/** The digest itself: pure, over a map's facts and a block map of the layer's bytes (64 KiB blocks, with SHA-1 digests). */
export function digestLayer(m: { size: number; bottom: boolean; covered: readonly Extent[] }, map: BlockMap): string {
  if (map.blockSize !== IDENTITY_BLOCK || !map.digests) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `a layer identity needs a block map at ${IDENTITY_BLOCK}-byte blocks with SHA-1 digests`);
  if (map.imageSize !== m.size) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `block map of ${map.imageSize} bytes for a layer of ${m.size}`);
  const h = createHash('sha256');
  const head = Buffer.alloc(8 + 1 + 4 + 4);
  head.writeBigUInt64LE(BigInt(m.size), 0);
  head.writeUInt8(m.bottom ? 1 : 0, 8);
  head.writeUInt32LE(IDENTITY_BLOCK, 9);
  head.writeUInt32LE(m.bottom ? 0 : m.covered.length, 13);
  h.update(DOMAIN).update(head);
  if (!m.bottom) {
    const b = Buffer.alloc(16 * m.covered.length);
    m.covered.forEach((e, i) => { b.writeBigUInt64LE(BigInt(e.offset), 16 * i); b.writeBigUInt64LE(BigInt(e.length), 16 * i + 8); });
    h.update(b);
  }
  const runs = Buffer.alloc(8 * map.dataRuns.length);
  map.dataRuns.forEach((v, i) => runs.writeBigUInt64LE(BigInt(v), 8 * i));
  h.update(runs).update(map.digests);
  return h.digest('hex');
}

interface CacheFile { version: 1; entries: Record<string, LayerIdentity> }

/**
 * The identity of the top `depth` layers of path's chain, merged
 * (`depth` 1: the file's own layer). The one place identities are
 * computed: scanned by the scanner's workers (format `qcow2-stack:N`), and
 * cached in `cacheDir` (layer-ids.json) by the files' own identity (path,
 * size, mtime, inode, device of every file of the stack), so an unchanged
 * snapshot is scanned once. A block-map cache can later answer the scan.
 */
export async function layerIdentity(path: string, depth: number, o: { scanner: Scanner; cacheDir?: string | undefined }): Promise<LayerIdentity> {
  const format = `qcow2-stack:${depth}` as const;
  const fileId = sourceIdentity(specFor(path, { format }));
  const key = fileId ? `${realpathSync(path)}\0${depth}\0${fileId.size}\0${fileId.mtimeNs}\0${fileId.ino}\0${fileId.dev}` : undefined;
  const cacheFile = o.cacheDir ? join(o.cacheDir, 'layer-ids.json') : undefined;
  let cache: CacheFile = { version: 1, entries: {} };
  if (cacheFile && existsSync(cacheFile)) {
    try {
      const c = JSON.parse(readFileSync(cacheFile, 'utf8')) as CacheFile;
      if (c.version === 1 && c.entries && typeof c.entries === 'object') cache = c;
    } catch {
      // a damaged cache is recomputed
    }
  }
  const hit = key ? cache.entries[key] : undefined;
  if (hit) return hit;
  const m = stackMap(path, depth);
  const [map] = await o.scanner.scan(path, { blockSize: IDENTITY_BLOCK, sha1: true, format });
  const out: LayerIdentity = { id: digestLayer(m, map!), ...m };
  if (key && cacheFile) {
    cache.entries[key] = out;
    mkdirSync(o.cacheDir!, { recursive: true });
    const tmp = `${cacheFile}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(cache));
    renameSync(tmp, cacheFile);
  }
  return out;
}

/** The identity of a raw file holding a layer's bytes (what a destination received), with the layer's map as the source declared it. */
export async function rawLayerDigest(path: string, m: { size: number; bottom: boolean; covered: readonly Extent[] }, scanner: Scanner): Promise<string> {
  const [map] = await scanner.scan(path, { blockSize: IDENTITY_BLOCK, sha1: true, format: 'raw' });
  return digestLayer(m, map!);
}

/** Bytes of a list of extents. */
export function extentBytes(list: readonly Extent[]): number {
  return list.reduce((n, e) => n + e.length, 0);
}
