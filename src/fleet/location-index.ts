// The fleet's location index (paper 003's "index server"): which node holds
// the block with a given SHA-1 digest, and which digest each (image, block)
// had when it was scattered. Scatter-gather asks it before sending anything
// (a block already held by an intermediary or the destination is not sent
// again, whichever VM it belongs to) and the destination asks it where to
// gather from.
//
// Every call is batched: digests travel as one packed buffer of 20-byte
// SHA-1s, and an implementation answers a batch in a bounded number of round
// trips (the Redis Cluster one pipelines per hash slot), never one per block.
// Locations are short node names chosen by the caller ("dst", "im1"). The
// embedded implementation below is the default; `redis://HOST:PORT` names a
// Redis Cluster (src/fleet/redis-index.ts).
import { BlockferryError, ErrorCode } from '../errors.js';

export const DIGEST_BYTES = 20;

export interface LocationIndex {
  /** For each digest in `digests` (n × 20 bytes), the locations that hold it (empty: nobody). */
  locate(digests: Uint8Array): Promise<string[][]>;
  /**
   * Claim each digest for `location` where nobody holds or claimed it yet, atomically
   * per digest (two sources racing for one digest: exactly one wins). Returns, per
   * digest, true where this call claimed it (the caller must now send it there).
   */
  claim(location: string, digests: Uint8Array): Promise<boolean[]>;
  /** Record that `location` holds these digests. */
  record(location: string, digests: Uint8Array): Promise<void>;
  /** Forget that `location` holds these digests (evicted), or everything it holds (digests omitted: it died). */
  forget(location: string, digests?: Uint8Array): Promise<void>;
  /** Record (image, first + i) → digest i, for the n digests given. */
  setBlocks(image: string, first: number, digests: Uint8Array): Promise<void>;
  /** The digests of (image, first .. first+count-1), packed; a block never set reads as 20 zero bytes. */
  getBlocks(image: string, first: number, count: number): Promise<Uint8Array>;
  /** Entries held (digest → location pairs), for metrics. */
  size(): Promise<number>;
  close(): Promise<void>;
}

export function digestCount(digests: Uint8Array): number {
  if (digests.length % DIGEST_BYTES !== 0) {
    throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `a packed digest buffer of ${digests.length} bytes is not a multiple of ${DIGEST_BYTES}`);
  }
  return digests.length / DIGEST_BYTES;
}

function key(digests: Uint8Array, i: number): string {
  return Buffer.from(digests.buffer, digests.byteOffset + i * DIGEST_BYTES, DIGEST_BYTES).toString('latin1');
}

/** A single-process index: the default when no cluster is named. */
export class EmbeddedLocationIndex implements LocationIndex {
  private readonly holders = new Map<string, Set<string>>();
  private readonly byLocation = new Map<string, Set<string>>();
  private readonly blocks = new Map<string, Map<number, string>>();

  async locate(digests: Uint8Array): Promise<string[][]> {
    const n = digestCount(digests);
    const out: string[][] = new Array(n);
    for (let i = 0; i < n; i++) out[i] = [...(this.holders.get(key(digests, i)) ?? [])];
    return out;
  }

  async claim(location: string, digests: Uint8Array): Promise<boolean[]> {
    const n = digestCount(digests);
    const out = new Array<boolean>(n);
    for (let i = 0; i < n; i++) {
      const k = key(digests, i);
      const held = this.holders.get(k);
      out[i] = !held || held.size === 0;
      if (out[i]) this.add(location, k);
    }
    return out;
  }

  async record(location: string, digests: Uint8Array): Promise<void> {
    const n = digestCount(digests);
    for (let i = 0; i < n; i++) this.add(location, key(digests, i));
  }

  async forget(location: string, digests?: Uint8Array): Promise<void> {
    const mine = this.byLocation.get(location);
    if (!mine) return;
    const keys = digests ? Array.from({ length: digestCount(digests) }, (_, i) => key(digests, i)) : [...mine];
    for (const k of keys) {
      mine.delete(k);
      const h = this.holders.get(k);
      if (h) {
        h.delete(location);
        if (h.size === 0) this.holders.delete(k);
      }
    }
    if (mine.size === 0) this.byLocation.delete(location);
  }

  async setBlocks(image: string, first: number, digests: Uint8Array): Promise<void> {
    const n = digestCount(digests);
    let m = this.blocks.get(image);
    if (!m) this.blocks.set(image, (m = new Map()));
    for (let i = 0; i < n; i++) m.set(first + i, key(digests, i));
  }

  async getBlocks(image: string, first: number, count: number): Promise<Uint8Array> {
    const out = new Uint8Array(count * DIGEST_BYTES);
    const m = this.blocks.get(image);
    if (!m) return out;
    for (let i = 0; i < count; i++) {
      const k = m.get(first + i);
      if (k !== undefined) out.set(Buffer.from(k, 'latin1'), i * DIGEST_BYTES);
    }
    return out;
  }

  async size(): Promise<number> {
    let n = 0;
    for (const s of this.byLocation.values()) n += s.size;
    return n;
  }

  async close(): Promise<void> {}

  private add(location: string, k: string): void {
    let h = this.holders.get(k);
    if (!h) this.holders.set(k, (h = new Set()));
    h.add(location);
    let mine = this.byLocation.get(location);
    if (!mine) this.byLocation.set(location, (mine = new Set()));
    mine.add(k);
  }
}

/** Options of the Redis Cluster index (src/fleet/redis-index.ts). */
export interface RedisIndexOptions {
  /** Key namespace, so that several fleets (or tests) share one cluster. Default "bf". */
  namespace?: string;
  /**
   * How long one round (≤ 65,536 digests) may keep retrying through failovers, redirections and
   * lost connections before ERR_BF_INDEX; also the deadline to reach the cluster at open. Default 30 s.
   */
  deadlineMs?: number;
}
