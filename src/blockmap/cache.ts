// Block maps are a cache, kept where the user's caches go, never beside the
// images they describe.
//
// Where. $BLOCKFERRY_CACHE_DIR when set, else $XDG_CACHE_HOME/blockferry
// (the XDG base directory spec: only an absolute XDG_CACHE_HOME counts),
// else ~/.cache/blockferry. A directory the caller names (the `mapDir`
// option, `--map-dir`, BLOCKFERRY_CACHE_DIR) must work: a failure to create
// or write it is WRITE_FAILED. The default one need not: a read-only home or
// no home at all turns caching off for the rest of the process, said once,
// and every scan still works. The directory is made 0700 and entries 0600:
// a map lists the content fingerprints of someone's disk.
//
// Keys. An entry's name is the identity of the image version it describes
// (how the image is read, device, inode, size, modification time in ns) and
// the block size: `raw-d2049-i131075-s100663296-m1764662400123456789-b4096.bfmap`
// (a qcow2 chain's "modification time" is the hash of every layer's identity,
// qcow2Identity). Two images never share a name; a changed image has a new
// name, so it is a miss, never a stale hit. The header inside records the same
// identity and is checked again on load (a renamed or damaged entry is a miss
// and is rewritten). When a map is saved, the entries of older versions of the
// same file (same kind, device, inode and block size) are removed.
//
// What is not cached. A source without identity (an NBD export) and a block
// device: a device node's identity (its inode, its size, the node's mtime)
// stays the same while the data under it changes: a write to a loop device's
// backing file, to an LV through another node, or a device detached and
// attached to another file of the same size. A map keyed by it could be
// served for different contents, so devices are scanned every time.
//
// Size and recency. The cache holds at most maxBytes (default 1 GiB,
// BLOCKFERRY_CACHE_MAX, the `cacheMaxBytes` option, `--cache-max`); after each
// save the least recently used entries are removed until it fits. Recency is
// each entry's mtime, set when it is written and again at every hit: atime
// cannot be used, since most file systems are mounted relatime or noatime
// (relatime updates atime at most once a day once it is newer than mtime), and
// an index file beside the entries would need locking between concurrent
// scanners. An entry's own mtime is free, per file, and needs no lock: two
// processes touching or trimming at once at worst evict a map early.
//
// Concurrency. Entries are written to a unique temporary name and renamed
// (io/atomic.ts): concurrent scanners of one image each write a complete map
// of the same version and the last rename wins; a reader sees one or the
// other whole. A file removed under a reader (trimmed, cleared) is a miss.
import { parseByteSize } from '../io/units.js';
import { existsSync, lstatSync, mkdirSync, readdirSync, rmSync, statSync, utimesSync, type Stats } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { BlockMap } from './blockmap.js';
import { BlockferryError, ErrorCode, InvalidArgumentError } from '../errors.js';
import type { ImageIdentity, SourceSpec } from '../image/source.js';

/**
 * Default bound on the cache, 1 GiB: at 16 bytes per non-zero 4 KiB block
 * (36 with SHA-1 digests) it holds the maps of about 256 GiB of image data
 * (114 GiB with digests), the disks of a few dozen VMs, while staying a
 * small fraction of the disk those images sit on.
 */
export const DEFAULT_CACHE_MAX_BYTES = 1 << 30;

/** How a cached map's image is read: the kind of its SourceSpec that has an identity. */
export type CachedKind = 'raw' | 'qcow2';

/** What a cache entry describes: one version of one image, read one way, at one block size. */
export interface CacheKey {
  kind: CachedKind;
  identity: ImageIdentity;
  blockSize: number;
}

export interface MapCacheOptions {
  /**
   * The directory (default: defaultCacheDir()). A directory named here is
   * the caller's: when it cannot be created or written, saving fails with
   * WRITE_FAILED instead of turning the cache off.
   */
  dir?: string;
  /** Bytes the cache may hold before the least recently used entries are removed (default: BLOCKFERRY_CACHE_MAX, else 1 GiB). */
  maxBytes?: number;
}

export interface CacheInfo {
  /** The directory; undefined when there is none (no home directory). */
  dir: string | undefined;
  entries: number;
  bytes: number;
  maxBytes: number;
  /** Modification (last use) time of the least and most recently used entries, ISO 8601. */
  oldest: string | undefined;
  newest: string | undefined;
  /** Why this process does not write to the cache, when it does not. */
  disabled: string | undefined;
}

/** A cache entry as listed: its name (the key), path, size and last use. */
interface Entry {
  name: string;
  file: string;
  bytes: number;
  mtimeMs: number;
}

/** An entry's name (the mtime is negative for a file dated before 1970). */
const ENTRY = /^(raw|qcow2)-d(\d+)-i(\d+)-s(\d+)-m(-?\d+)-b(\d+)\.bfmap$/;
/** A temporary file of io/atomic.ts for an entry (a crashed writer leaves one). */
const TEMP = /^(?:raw|qcow2)-d\d+-i\d+-s\d+-m-?\d+-b\d+\.bfmap\.tmp-\d+-[0-9a-f]+$/;
/** A temporary file older than this belongs to a writer that died; the trim removes it. */
const TEMP_STALE_MS = 3600_000;

/**
 * The cache directory this process uses by default, and whether it was
 * named (BLOCKFERRY_CACHE_DIR) rather than derived; undefined when there is
 * no home directory to put it in.
 */
export function defaultCacheDir(env: NodeJS.ProcessEnv = process.env): { dir: string; named: boolean } | undefined {
  if (env.BLOCKFERRY_CACHE_DIR) return { dir: resolve(env.BLOCKFERRY_CACHE_DIR), named: true };
  const xdg = env.XDG_CACHE_HOME;
  if (xdg && isAbsolute(xdg)) return { dir: join(xdg, 'blockferry'), named: false };
  let home = env.HOME;
  if (!home) {
    try {
      home = homedir(); // the password database when HOME is unset
    } catch {
      return undefined;
    }
  }
  return home && isAbsolute(home) ? { dir: join(home, '.cache', 'blockferry'), named: false } : undefined;
}

function defaultMaxBytes(): number {
  const v = process.env.BLOCKFERRY_CACHE_MAX;
  if (v === undefined || v === '') return DEFAULT_CACHE_MAX_BYTES;
  const n = parseByteSize(v);
  if (n === undefined) throw new InvalidArgumentError('BLOCKFERRY_CACHE_MAX', 'a size like 512M or 2G', v);
  return n;
}

/**
 * Makes dir and its missing parents (0700, as the XDG spec asks of a cache
 * home), level by level: Node's recursive mkdir reports ENOENT where the
 * truth is EROFS or EACCES, and the notice should say which.
 */
function makeDir(dir: string): void {
  const missing: string[] = [];
  for (let d = dir; !existsSync(d); d = dirname(d)) {
    missing.unshift(d);
    if (dirname(d) === d) break;
  }
  for (const d of missing) {
    try {
      mkdirSync(d, { mode: 0o700 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e; // another scanner made it first
    }
  }
}

/** The key of the map a spec's image has now, or why it has none worth caching. */
export function cacheKeyOf(spec: SourceSpec, identity: ImageIdentity | undefined, blockSize: number): CacheKey | string {
  if (!identity || spec.kind === 'nbd') return 'no mtime or inode to tell its versions apart (an NBD export): block map not cached';
  let st: Stats;
  try {
    st = statSync(spec.path);
  } catch {
    return 'the image could not be examined: block map not cached';
  }
  if (st.isBlockDevice()) return 'a block device: its data can change with no change to its identity (node, size, mtime), so its block map is not cached';
  return { kind: spec.kind === 'qcow2' ? 'qcow2' : 'raw', identity, blockSize };
}

/**
 * A directory of block maps keyed by image identity, bounded in size with
 * least-recently-used eviction. See the top of this file for the design.
 * One instance per directory per process is enough (MapCache.default()).
 */
export class MapCache {
  readonly dir: string | undefined;
  /** The caller named the directory: failures to write it are errors, not notices. */
  readonly named: boolean;
  readonly maxBytes: number;
  private off: string | undefined;
  /** The reason it is off was given (it is given once per instance). */
  private told = false;

  constructor(options: MapCacheOptions = {}) {
    const d = options.dir !== undefined ? { dir: resolve(options.dir), named: true } : defaultCacheDir();
    this.dir = d?.dir;
    this.named = d?.named ?? false;
    this.maxBytes = options.maxBytes ?? defaultMaxBytes();
    if (!Number.isSafeInteger(this.maxBytes) || this.maxBytes < 0) throw new InvalidArgumentError('maxBytes', 'a number of bytes', this.maxBytes);
    if (!this.dir) this.off = 'no home directory (set XDG_CACHE_HOME or BLOCKFERRY_CACHE_DIR): block maps are not cached';
  }

  private static readonly defaults = new Map<string, MapCache>();

  /**
   * The process's cache in the default directory (as the environment says
   * now), one instance per directory and limit, so that a default directory
   * found unusable is reported once and not tried again.
   */
  static default(): MapCache {
    const fresh = new MapCache();
    const id = `${fresh.dir ?? ''}\0${fresh.maxBytes}`;
    const known = MapCache.defaults.get(id);
    if (known) return known;
    MapCache.defaults.set(id, fresh);
    return fresh;
  }

  /** Why this process does not write to the cache (undefined while it does). */
  get disabled(): string | undefined {
    return this.off;
  }

  /** The file of the entry for key (whether or not it exists); undefined without a directory. */
  fileFor(key: CacheKey): string | undefined {
    if (!this.dir) return undefined;
    const id = key.identity;
    return join(this.dir, `${key.kind}-d${id.dev}-i${id.ino}-s${id.size}-m${id.mtimeNs}-b${key.blockSize}.bfmap`);
  }

  /**
   * The cached map for key, or undefined on a miss. A damaged entry, or one
   * whose header does not record this identity, is a miss too (notice says
   * why; the next save replaces it). A hit marks the entry used (its mtime).
   */
  load(key: CacheKey, imagePath: string, notice?: (why: string) => void): BlockMap | undefined {
    const file = this.fileFor(key);
    if (!file) return undefined;
    let map: BlockMap;
    try {
      map = BlockMap.load(file, imagePath);
    } catch (e) {
      if (!(e instanceof BlockferryError)) throw e;
      // No entry, or no directory to hold one (it cannot be made: save says so, once).
      if (e.code === ErrorCode.FILE_NOT_FOUND || (e.cause as NodeJS.ErrnoException | undefined)?.code === 'ENOTDIR') return undefined;
      notice?.(`cached block map ${file}: ${e.code}: ${e.message}; scanning again`);
      return undefined;
    }
    if (!map.matches(key.identity) || map.blockSize !== key.blockSize) {
      notice?.(`cached block map ${file} describes another image version; scanning again`);
      return undefined;
    }
    const now = new Date();
    try {
      utimesSync(file, now, now);
    } catch {
      // A read-only cache still serves hits; it only cannot keep their order.
    }
    return map;
  }

  /**
   * Saves map as the entry for its key, removes the entries of older
   * versions of the same file, then trims the cache to maxBytes. Returns the
   * entry's file, or undefined when it was not saved (caching is off, or
   * the map alone is larger than the limit; notice says why). A failure to
   * write a named directory throws WRITE_FAILED; the default directory
   * instead turns the cache off for the process, with one notice.
   */
  save(map: BlockMap, kind: CachedKind, notice?: (why: string) => void): string | undefined {
    if (this.off) {
      if (!this.told) notice?.(this.off);
      this.told = true;
      return undefined;
    }
    const key: CacheKey = { kind, identity: map.identity, blockSize: map.blockSize };
    const file = this.fileFor(key)!;
    const bytes = map.fileBytes;
    if (bytes > this.maxBytes) {
      notice?.(`its block map (${bytes} bytes) is larger than the cache's limit (${this.maxBytes} bytes): not cached`);
      return undefined;
    }
    try {
      makeDir(this.dir!);
      map.save(file, 0o600);
    } catch (e) {
      const why = (e as Error).message;
      if (this.named) throw e instanceof BlockferryError ? e : new BlockferryError(ErrorCode.WRITE_FAILED, `cannot write the block map cache ${this.dir}: ${why}`, { cause: e });
      this.off = `the block map cache ${this.dir} cannot be written (${why}); block maps are not cached in this process (set BLOCKFERRY_CACHE_DIR or --map-dir)`;
      return this.save(map, kind, notice);
    }
    // One listing serves both: the older versions of this file go, then the least recently used.
    this.trimEntries(this.dropOlderVersions(this.entries(), key, file), this.maxBytes);
    return file;
  }

  /** Entries of the cache, least recently used first. */
  private entries(): Entry[] {
    if (!this.dir) return [];
    let names: string[];
    try {
      names = readdirSync(this.dir);
    } catch {
      return [];
    }
    const out: Entry[] = [];
    const now = Date.now();
    for (const name of names) {
      const file = join(this.dir, name);
      const temp = TEMP.test(name);
      if (!temp && !ENTRY.test(name)) continue;
      let st: Stats;
      try {
        st = lstatSync(file);
      } catch {
        continue; // removed meanwhile
      }
      if (!st.isFile()) continue;
      if (temp) {
        if (now - st.mtimeMs > TEMP_STALE_MS) rmSync(file, { force: true });
        continue;
      }
      out.push({ name, file, bytes: st.size, mtimeMs: st.mtimeMs });
    }
    return out.sort((a, b) => a.mtimeMs - b.mtimeMs || (a.name < b.name ? -1 : 1));
  }

  /** Removes the entries of other versions of the file key describes (same kind, device, inode, block size); returns the others. */
  private dropOlderVersions(entries: Entry[], key: CacheKey, keep: string): Entry[] {
    return entries.filter((e) => {
      const m = ENTRY.exec(e.name)!;
      const older = e.file !== keep && m[1] === key.kind && m[2] === String(key.identity.dev) && m[3] === String(key.identity.ino) && m[6] === String(key.blockSize);
      if (older) rmSync(e.file, { force: true });
      return !older;
    });
  }

  /**
   * Removes least recently used entries until the cache holds at most
   * maxBytes (and temporary files of writers that died). Returns what went.
   */
  trim(maxBytes = this.maxBytes): { removed: number; bytes: number } {
    return this.trimEntries(this.entries(), maxBytes);
  }

  private trimEntries(entries: Entry[], maxBytes: number): { removed: number; bytes: number } {
    let total = entries.reduce((n, e) => n + e.bytes, 0);
    let removed = 0, freed = 0;
    for (const e of entries) {
      if (total <= maxBytes) break;
      try {
        rmSync(e.file);
      } catch {
        continue; // another process removed it, or the directory is read-only
      }
      total -= e.bytes;
      freed += e.bytes;
      removed++;
    }
    return { removed, bytes: freed };
  }

  /** Removes every entry. */
  clear(): { removed: number; bytes: number } {
    return this.trim(-1);
  }

  info(): CacheInfo {
    const entries = this.entries();
    const iso = (e: { mtimeMs: number } | undefined) => (e ? new Date(e.mtimeMs).toISOString() : undefined);
    return {
      dir: this.dir, entries: entries.length, bytes: entries.reduce((n, e) => n + e.bytes, 0), maxBytes: this.maxBytes,
      oldest: iso(entries[0]), newest: iso(entries[entries.length - 1]), disabled: this.off,
    };
  }
}
