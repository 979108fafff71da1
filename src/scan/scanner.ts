import type { Progress } from '../progress.js';
import os from 'node:os';
import { Piscina } from 'piscina';
import { DIGEST_BYTES, checkBlockSize, MAX_BLOCK_SIZE } from '../engine/engine.js';
import { wasmModule } from '../engine/wasm.js';
import { chooseBackend, type BackendChoice, type BackendName } from '../engine/backend.js';
import { openSource, sourceIdentity, sourceSize, specFor, type Extent, type ImageFormat, type ImageIdentity, type SourceSpec } from '../image/source.js';
import { IntervalSet } from '../blocks/intervals.js';
import { BlockMap } from '../blockmap/blockmap.js';
import { MapCache, cacheKeyOf, type CacheKey } from '../blockmap/cache.js';
import { setMaxListeners } from 'node:events';
import { BlockferryError, ErrorCode, ImageError, InvalidArgumentError, checkAborted } from '../errors.js';
import { readResult, taskBytes, type ScanTask, type TaskPiece } from './layout.js';
import { WINDOW } from './worker.js';

/**
 * Bytes of data per scan task (extents are coalesced up to it). 8 MiB:
 * large enough that a task's fixed costs (a message each way, an open)
 * vanish next to hashing it, small enough that two workers stay evenly
 * loaded to the end of a small image.
 */
export const DEFAULT_RANGE = 8 << 20;

/** A scan's progress: the shape every long call reports (src/progress.ts), with operation 'scan'. */
export type ScanProgress = Progress;

export interface ScanOptions {
  /** Cancels the scan: the workers stop, and it rejects with ERR_BF_ABORTED. */
  signal?: AbortSignal;
  /** One block size, or several scanned in the same pass (one read). Default 4096. */
  blockSize?: number | number[];
  /** Also compute the SHA-1 digest of every non-zero block. */
  sha1?: boolean;
  /** Bytes per task (4..16 MiB, a multiple of the largest block size). */
  rangeBytes?: number;
  onProgress?: (p: ScanProgress) => void;
  /** Skip holes using the file's extents when the native addon can list them (default true). */
  extents?: boolean;
  /**
   * Coalesce small extents into tasks of up to rangeBytes (default true).
   * false gives one task per extent (or per rangeBytes of one): the same map,
   * slower on fragmented files; kept for comparison and tests.
   */
  coalesce?: boolean;
  /**
   * The image is being written (a live migration): do not fail when it
   * changes during the scan. The caller catches the changes itself (dirty
   * bitmap or rescan rounds).
   */
  live?: boolean;
  /** How to read a file: 'auto' (default) probes for qcow2, 'raw' never does (image/source.ts, ImageFormat). */
  format?: ImageFormat;
}

export interface ScannerOptions {
  /** Worker threads; default one per core. */
  workers?: number;
  /** Force a backend in the workers (default: BLOCKFERRY_BACKEND, else the fastest). */
  backend?: BackendName;
}

/**
 * A pool of scan workers. Each worker reads its ranges straight into its own
 * WASM memory; only per-block results come back. Reuse one Scanner for many
 * images; close() it when done.
 */
export class Scanner {
  private readonly pool: Piscina;
  private poolError: Error | undefined;
  readonly workers: number;
  /** What the workers use (resolved here, so a bad BLOCKFERRY_BACKEND fails before any work). */
  readonly backend: BackendChoice;

  constructor(options: ScannerOptions = {}) {
    const workers = options.workers ?? os.availableParallelism();
    if (!Number.isInteger(workers) || workers < 1 || workers > 256) throw new InvalidArgumentError('workers', 'an integer from 1 to 256', workers);
    this.workers = workers;
    this.backend = chooseBackend(options.backend);
    this.pool = new Piscina({
      filename: new URL('./worker-entry.cjs', import.meta.url).href,
      // Threads start with the first task, not here: a pool closed before any
      // task would otherwise terminate workers still loading their modules,
      // which can abort the process (seen with Node 20).
      minThreads: 0,
      maxThreads: workers,
      idleTimeout: 60_000,
      workerData: { wasmModule: wasmModule(), backend: options.backend ?? process.env.BLOCKFERRY_BACKEND },
    });
    // A worker that dies outside a task (it could not load, say) must not take
    // the process down: its tasks fail with the error instead.
    this.pool.on('error', (e: Error) => { this.poolError = e; });
  }

  /** Scans one image at one or more block sizes; one BlockMap per block size, in the order asked. */
  async scan(path: string, options: ScanOptions = {}): Promise<BlockMap[]> {
    const sizes = [options.blockSize ?? 4096].flat();
    if (sizes.length === 0) throw new InvalidArgumentError('blockSize', 'at least one block size', sizes);
    for (const bs of sizes) checkBlockSize(bs);
    const maxBs = Math.max(...sizes);
    const range = options.rangeBytes ?? Math.max(DEFAULT_RANGE, maxBs);
    if (!Number.isInteger(range) || range < maxBs || range % maxBs || range > WINDOW || range < Math.min(4 << 20, MAX_BLOCK_SIZE)) {
      throw new InvalidArgumentError('rangeBytes', `a multiple of ${maxBs} from 4 MiB to ${WINDOW}`, range);
    }
    const sha1 = options.sha1 ?? false;
    const source = specFor(path, options.format ? { format: options.format } : {});
    const before = sourceIdentity(source);
    const size = before?.size ?? sourceSize(source, this.backend.native);
    // Plan the work: with extents, only the data regions (rounded out to the
    // largest block size) are read; holes are zero blocks without a read.
    // Small extents are coalesced into tasks of about `range` bytes, so that
    // a fragmented file costs what its data costs, not a message per extent.
    const useExtents = options.extents ?? true;
    const regions = useExtents ? dataRegions(source, size, maxBs, this.backend) : size ? [{ offset: 0, length: size }] : [];
    const plan = (options.coalesce ?? true) ? planTasks(regions, range) : regions.flatMap((r) => planTasks([r], range));
    const tasks = plan.map((extents): ScanTask => ({ source, extents, blockSizes: sizes, sha1, imageSize: size }));
    let done = size - regions.reduce((n, r) => n + r.length, 0);
    const t0 = performance.now();
    const report = () => {
      const elapsed = (performance.now() - t0) / 1000;
      options.onProgress?.({ operation: 'scan', phase: 'scan', path, done, total: size, rate: elapsed > 0 ? done / elapsed : 0, elapsed, round: 0 });
    };
    report();
    // Tasks finish in any order: each keeps its pieces in its slot, and the
    // map is assembled in offset order at the end.
    const pieces: TaskPiece[][] = new Array(tasks.length);
    const signal = options.signal;
    checkAborted(signal, `scan of ${path}`);
    // The caller's signal gets one listener; the tasks listen to this scan's own
    // (one each: as many as the scan has tasks, so the listener warning is raised to that).
    const cancel = signal ? new AbortController() : undefined;
    const onAbort = () => cancel!.abort(signal!.reason);
    if (cancel) {
      setMaxListeners(tasks.length + 8, cancel.signal);
      signal!.addEventListener('abort', onAbort, { once: true });
    }
    const running = tasks.map((task, i) =>
      // An aborted signal rejects the tasks not yet done and ends the workers running them (piscina).
      (this.pool.run(task, cancel ? { signal: cancel.signal } : {}) as Promise<ArrayBuffer>).then((buf) => {
        pieces[i] = readResult(buf, sizes.length, sha1);
        done += taskBytes(task);
        report();
      }),
    );
    try {
      await settleAll(running);
    } catch (e) {
      checkAborted(signal, `scan of ${path}`);
      throw e;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    if (this.poolError) throw new BlockferryError(ErrorCode.WASM_LOAD, `a scan worker failed: ${this.poolError.message}`, { cause: this.poolError });
    const after = sourceIdentity(source);
    if (before && after && (!options.live || after.size !== before.size)) {
      if (after.size !== before.size || after.mtimeNs !== before.mtimeNs || after.ino !== before.ino) {
        throw new ImageError(ErrorCode.IMAGE_CHANGED, path, 'was modified while it was scanned; scan it again when it is quiet');
      }
    }
    // A source without identity gets one that no image on disk has (mtime 0, inode 0).
    const identity = before ?? { size, mtimeNs: '0', ino: 0, dev: 0 };
    return sizes.map((bs, k) => assemble(path, identity, bs, pieces.map((p) => p[k]!), sha1));
  }

  async close(): Promise<void> {
    await this.pool.destroy();
  }
}

/**
 * The parts of the image that hold data, as byte ranges aligned to the
 * block size (the last one may end at the image's end), merged where the
 * rounding makes them touch. A source that cannot tell (no native addon, a
 * block device) reports the whole image.
 */
function dataRegions(spec: SourceSpec, size: number, bs: number, backend: BackendChoice): Extent[] {
  if (size === 0) return [];
  const src = openSource(spec, backend.native);
  let extents: Extent[];
  try {
    extents = src.extents(0, size);
  } finally {
    src.close();
  }
  const out: Extent[] = [];
  for (const x of extents) {
    const start = Math.floor(x.offset / bs) * bs;
    const end = Math.min(size, Math.ceil((x.offset + x.length) / bs) * bs);
    const last = out[out.length - 1];
    if (last && start <= last.offset + last.length) last.length = Math.max(last.length, end - last.offset);
    else out.push({ offset: start, length: end - start });
  }
  return out;
}

/**
 * Groups block-aligned regions into tasks of at most `range` bytes each:
 * a long region is cut into range-sized pieces, short ones share a task.
 * `range` is a multiple of the largest block size, so every cut is on a
 * block boundary.
 */
export function planTasks(regions: Extent[], range: number): Extent[][] {
  const tasks: Extent[][] = [];
  let current: Extent[] = [], bytes = 0;
  for (const r of regions) {
    for (let offset = r.offset; offset < r.offset + r.length; ) {
      const length = Math.min(range - bytes, r.offset + r.length - offset);
      current.push({ offset, length });
      bytes += length;
      offset += length;
      if (bytes === range) { tasks.push(current); current = []; bytes = 0; }
    }
  }
  if (current.length) tasks.push(current);
  return tasks;
}

/** One block size's map from the pieces of every task, in offset order: runs merged where tasks meet, columns concatenated. */
function assemble(path: string, identity: ImageIdentity, bs: number, pieces: TaskPiece[], sha1: boolean): BlockMap {
  const runs = new IntervalSet();
  let blocks = 0;
  for (const p of pieces) {
    for (let i = 0; i < p.runs.length; i += 2) runs.add(p.runs[i]!, p.runs[i + 1]!);
    blocks += p.fingerprints.length;
  }
  const dataRuns = new Float64Array(2 * runs.runs);
  let r = 0;
  for (const iv of runs) { dataRuns[r++] = iv.start; dataRuns[r++] = iv.count; }
  const fps = new BigUint64Array(blocks), sigs = new BigUint64Array(blocks);
  const digests = sha1 ? new Uint8Array(blocks * DIGEST_BYTES) : undefined;
  let k = 0;
  for (const p of pieces) {
    fps.set(p.fingerprints, k);
    sigs.set(p.signatures, k);
    if (digests) digests.set(p.digests!, k * DIGEST_BYTES);
    k += p.fingerprints.length;
  }
  return new BlockMap(path, identity, bs, dataRuns, fps, sigs, digests);
}

/** Waits for every task, then throws the first failure (no task is left running behind an error). */
async function settleAll(tasks: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(tasks);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason instanceof BlockferryError ? failed.reason : rehydrate(failed.reason);
}

/** Errors cross the thread boundary as plain objects: give them back their class and code. */
function rehydrate(e: unknown): Error {
  const err = e as { code?: string; message?: string; path?: string };
  if (err && typeof err.code === 'string' && err.code.startsWith('ERR_BF_')) {
    return new BlockferryError(err.code as BlockferryError['code'], err.message ?? 'scan failed', { cause: e });
  }
  return e instanceof Error ? e : new Error(String(e));
}

export interface MapOptions extends ScanOptions {
  /**
   * Keep block maps in this directory (a MapCache over it; the caller's
   * directory, so a failure to write it is WRITE_FAILED). Default: the
   * user's cache, $XDG_CACHE_HOME/blockferry or ~/.cache/blockferry
   * (BLOCKFERRY_CACHE_DIR overrides). Nothing is ever written beside an image.
   */
  mapDir?: string;
  /** A cache to use (shared between calls), or false: neither load nor save maps. */
  cache?: MapCache | false;
  /** The cache's size limit in bytes, with mapDir or the default cache (default: BLOCKFERRY_CACHE_MAX, else 1 GiB). */
  cacheMaxBytes?: number;
  /** Rescan even when a current block map exists. */
  rescan?: boolean;
  /** Do not write block maps (cached ones are still used). */
  noSave?: boolean;
  /** Told when a cached map is damaged (and rebuilt), or a map could not be cached, and why. */
  onNotice?: (path: string, reason: string) => void;
  /** Called when a map cannot be saved in a named directory (default: throw it). */
  onSaveError?: (e: BlockferryError) => void;
}

export interface MapResult {
  maps: BlockMap[];
  /** 'loaded' when every map came from the cache, 'scanned' otherwise. */
  source: 'loaded' | 'scanned';
  seconds: number;
  /** The cache files holding the maps (loaded from or saved to), in block size order; empty when they were not cached. */
  files: string[];
  /** Why the maps are not in the cache, when they are not: caching off, no identity, a block device, the cache unusable. */
  notCached?: string;
}

/** The cache a call uses: its own, one over mapDir, the process's default, or none. */
function cacheFor(options: MapOptions): MapCache | undefined {
  if (options.cache === false) return undefined;
  if (options.cache) return options.cache;
  const max = options.cacheMaxBytes !== undefined ? { maxBytes: options.cacheMaxBytes } : {};
  if (options.mapDir !== undefined) return new MapCache({ dir: options.mapDir, ...max });
  return options.cacheMaxBytes !== undefined ? new MapCache(max) : MapCache.default();
}

/**
 * The block maps of an image: loaded from the block map cache
 * (blockmap/cache.ts) when it holds maps of the image as it is now, else
 * scanned (and cached). A damaged cached map is never used: it is rebuilt.
 */
export async function blockMapsFor(scanner: Scanner, path: string, options: MapOptions = {}): Promise<MapResult> {
  const t0 = performance.now();
  const sizes = [options.blockSize ?? 4096].flat();
  const spec = specFor(path, options.format ? { format: options.format } : {});
  const cache = cacheFor(options);
  // A source without identity (an NBD export) or a block device is always scanned, its maps never cached.
  const identity = sourceIdentity(spec);
  const keys = sizes.map((bs) => cacheKeyOf(spec, identity, bs));
  const uncacheable = keys.find((k): k is string => typeof k === 'string');
  const notice = (why: string) => options.onNotice?.(path, why);
  if (cache && !uncacheable && !options.rescan) {
    const loaded: BlockMap[] = [];
    for (const key of keys as CacheKey[]) {
      const map = cache.load(key, path, notice);
      if (!map || (options.sha1 && !map.digests)) break;
      loaded.push(map);
    }
    if (loaded.length === sizes.length) {
      return { maps: loaded, source: 'loaded', seconds: (performance.now() - t0) / 1000, files: (keys as CacheKey[]).map((k) => cache.fileFor(k)!) };
    }
  }
  const maps = await scanner.scan(path, options);
  const files: string[] = [];
  let notCached: string | undefined;
  if (!cache) notCached = 'caching is off';
  else if (uncacheable) {
    notCached = uncacheable;
    if (!options.noSave) notice(uncacheable);
  } else if (options.noSave) notCached = 'not saved (noSave)';
  else {
    const kind = (keys[0] as CacheKey).kind;
    for (const m of maps) {
      let file: string | undefined;
      try {
        file = cache.save(m, kind, notice);
      } catch (e) {
        if (!(e instanceof BlockferryError) || !options.onSaveError) throw e;
        options.onSaveError(e);
      }
      if (file) files.push(file);
    }
    if (files.length < maps.length) notCached = cache.disabled ?? 'not cached';
  }
  return { maps, source: 'scanned', seconds: (performance.now() - t0) / 1000, files, ...(notCached ? { notCached } : {}) };
}
