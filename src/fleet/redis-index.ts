// The fleet's location index on Redis Cluster (`--index redis://HOST:PORT`).
//
// Layout. A digest's holders live in a *bucket*: a Redis hash named after the
// digest's top 18 bits ("{}bf:h:" + 3 bytes: the digest's first two and the
// top two bits of its third; 262,144 buckets), whose
// field is the digest's remaining 18 bytes (bytes 2..19, binary) and whose
// value is the holders' names joined by NUL ("dst" or "dst\0im1"). A key per
// digest costs Redis its key overhead (dict entry, object, key string, the
// cluster's slot bookkeeping) on top of the 20 bytes of data: 124 bytes an
// entry measured, against 56 for these buckets at 4 entries a bucket
// (docs/BENCHMARKS.md);
// a bucket shares that overhead among its fields, and while a bucket holds at
// most 128 short fields Redis keeps it as a listpack, ~2 bytes of framing per
// field and value: about 25 bytes per entry plus the bucket's share. 2^18
// buckets keep every bucket under the listpack's 128-field limit up to ~17
// million digests (64 a bucket on average, room for the Poisson tail); a
// bigger index still works, each full bucket turning into an ordinary hash
// table (several times the bytes per entry). Each script
// call adds its change in (digest, holder) pairs to the field "" of the
// bucket it is routed by (one HINCRBY a call, not one a bucket): a bucket's
// own "" means nothing, their sum is size(), which reads ~16 counters a slot
// instead of every entry.
//
// Every key starts with "{}": Redis hashes a whole key unless it holds a
// non-empty {hash tag}, and an empty tag at the front switches tags off for
// the rest, so neither a binary digest byte nor an image name containing
// "{x}" can pin keys to one slot. The buckets spread over all 16,384 slots
// (~16 per slot) and so over every master.
//
// Batching. A batch is cut into rounds of at most CHUNK digests (memory per
// round is bounded whatever the batch size). Each digest's slot gives its
// master (the client's copy of the slot map), and each master gets ONE
// pipeline per round, the masters in parallel. In it, one script call
// (EVALSHA of SCRIPT below) carries up to CALL digests packed in one binary
// argument: a round of 65,536 digests is ~16 calls in 3 pipelines, never a
// round trip or a command per block. The script is declared
// `allow-cross-slot-keys` (Redis 7): a call names one of its buckets as its
// key, so that the cluster routes it (MOVED if that slot moved) and the
// script reaches the call's other buckets, all on that master, by name; one
// that is not local any more (a slot moved since the client's map) fails the
// call before any write (the script reads all its buckets first), and the
// call is planned again from a fresh map. A script runs alone on its master,
// so each digest's read-modify-write is atomic: `claim` sets a field only
// where it is absent (two claimers of one digest: exactly one sees it
// absent), and repeated digests within a call see the call's own writes.
//
// Forgetting a location. Each location keeps a 2 KiB bitmap of the slots where
// it ever recorded or claimed something ("{}bf:m:NAME"), OR-ed in by the
// script BEFORE the round's holder writes (a crash between the two leaves a
// stale bit, never an entry that forget cannot find). forget(location) with
// no digests reads that bitmap and runs the script over the buckets of those
// slots only (their names are known: bucket → slot is computed, not
// scanned): no KEYS or SCAN of the cluster, and its cost follows the slots
// the location used. Bits are never cleared (a stale bit costs one pass over
// ~16 small buckets). size() sums the buckets' "" counters the same way.
//
// Blocks: (image, block) → digest in strings of WINDOW (256) digests,
// "{}bf:b:" + window number + ":" + image, written with SETRANGE and read with
// GETRANGE: 20 bytes per block, a range of consecutive blocks is one command
// per window, and a block never set reads as zero bytes (SETRANGE pads with
// zeros), as the interface wants. A window exists only once one of its blocks
// is set, so the cost follows the data (at worst 5 KiB for an isolated block).
//
// Durability. After its writes each pipeline sends `WAIT 1 <WAIT_MS>`: a
// write is acknowledged once a replica has it, so killing the master loses
// nothing acknowledged (its replica takes over with it). A master with no
// replica connected (the one that took over from a dead master, until a
// replica joins it) acknowledges alone: ROLE is asked when WAIT times out.
// Failures that are about the cluster and not the request (MOVED, ASK,
// TRYAGAIN, CLUSTERDOWN, LOADING, READONLY, NOSCRIPT, lost connections,
// a WAIT that fails) retry the affected calls after refreshing the slot map,
// with backoff, until the round's deadline (deadlineMs), then ERR_BF_INDEX.
// Retried calls are idempotent: record/forget/setBlocks converge to the same
// state; a retried claim also counts a digest as won where its only holder
// is the claimer itself (the first try may have won it before its reply was
// lost), which at worst sends one block twice, never zero times.
import { createHash } from 'node:crypto';
import IORedis, { type Cluster, type Redis } from 'ioredis';
import { BlockferryError, ErrorCode } from '../errors.js';
import { DIGEST_BYTES, digestCount, type LocationIndex, type RedisIndexOptions } from './location-index.js';


/** Bits of a digest that choose its bucket (see above: 2^18 buckets, listpack up to ~33 M digests). */
const BUCKET_BITS = 18;
const BUCKETS = 1 << BUCKET_BITS;
/** Blocks per (image, window) string: 5 KiB, 1 MiB of image at 4 KiB blocks. */
const WINDOW = 256;
/** Digests per round: 1.3 MB of packed digests and a few MB of replies in flight, whatever the batch. */
const CHUNK = 1 << 16;
/**
 * Digests per script call: the call's fixed cost (EVALSHA, its arguments, its reply) is spread over
 * 4,096 digests, and a call holds its master for a few milliseconds at most (the script runs alone;
 * docs/BENCHMARKS.md has the microseconds per call that INFO commandstats reports).
 */
const CALL = 4096;
/** Slots per forget-all or size call (~1,000 buckets). */
const SLOTS_PER_CALL = 64;
const SLOTS = 16384;
/** How long a write's WAIT waits for a replica before ROLE is asked. */
const WAIT_MS = 2000;
/** Layout of the keys: a cluster written by another layout is refused rather than misread. */
const LAYOUT = `blockferry-index 1 bucket-bits=${BUCKET_BITS} window=${WINDOW}`;
const MAX_NAME = 255;

// ARGV: op, location, bucket-key prefix, data (op L/C/c/R/F: packed 20-byte
// digests; S/A: packed 3-byte bucket names; M: a slot bitmap to OR into
// KEYS[1]). Every bucket is read before anything is written.
const SCRIPT = `#!lua flags=allow-cross-slot-keys
local op, loc, prefix, data = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if op == 'M' then
  local cur = redis.call('GET', KEYS[1]) or ''
  if #cur < #data then cur = cur .. string.rep('\\0', #data - #cur) end
  local t = {}
  for i = 1, #data do t[i] = string.char(bit.bor(string.byte(cur, i), string.byte(data, i))) end
  redis.call('SET', KEYS[1], table.concat(t))
  return 1
end
local function has(v) return string.find('\\0' .. v .. '\\0', '\\0' .. loc .. '\\0', 1, true) ~= nil end
local function without(v)
  local keep = {}
  for name in string.gmatch(v, '[^%z]+') do if name ~= loc then keep[#keep + 1] = name end end
  return table.concat(keep, '\\0')
end
local function put(k, f, v) if v == '' then redis.call('HDEL', k, f) else redis.call('HSET', k, f, v) end end
-- The call's change in (digest, holder) pairs goes to the field "" of its routing bucket
-- (KEYS[1]): one HINCRBY a call; a bucket's own "" may go negative, the sum over all is exact.
local function count(d) if d ~= 0 and redis.call('HINCRBY', KEYS[1], '', d) == 0 then redis.call('HDEL', KEYS[1], '') end end
if op == 'S' or op == 'A' then
  local keys, all = {}, {}
  for at = 1, #data, 3 do
    keys[#keys + 1] = prefix .. string.sub(data, at, at + 2)
  end
  if op == 'S' then
    local t = 0
    for _, k in ipairs(keys) do t = t + (tonumber(redis.call('HGET', k, '')) or 0) end
    return t
  end
  for i, k in ipairs(keys) do all[i] = redis.call('HGETALL', k) end
  local d = 0
  for i, k in ipairs(keys) do
    local h = all[i]
    for j = 1, #h, 2 do
      if h[j] ~= '' and has(h[j + 1]) then put(k, h[j], without(h[j + 1])); d = d - 1 end
    end
  end
  count(d)
  return 1
end
local n = #data / ${DIGEST_BYTES}
local keys, fields, vals = {}, {}, {}
for i = 1, n do
  local at = (i - 1) * ${DIGEST_BYTES} + 1
  local c = string.byte(data, at + 2)
  keys[i] = prefix .. string.sub(data, at, at + 1) .. string.char(c - c % 64)
  fields[i] = string.sub(data, at + 2, at + ${DIGEST_BYTES - 1})
  vals[i] = redis.call('HGET', keys[i], fields[i])
end
if op == 'L' then return vals end
local out, cache, delta = {}, {}, 0
for i = 1, n do
  local k, f = keys[i], fields[i]
  local v = cache[k .. f]
  if v == nil then v = vals[i] or '' end
  local nv = v
  if op == 'C' or op == 'c' then
    if v == '' then nv = loc; out[i] = '1'
    elseif op == 'c' and v == loc then out[i] = '1'
    else out[i] = '0' end
  elseif op == 'R' then
    if v == '' then nv = loc elseif not has(v) then nv = v .. '\\0' .. loc end
  elseif op == 'F' then
    if v ~= '' and has(v) then nv = without(v) end
  end
  if nv ~= v then
    put(k, f, nv)
    cache[k .. f] = nv
    delta = delta + ((op == 'F') and -1 or 1)
  end
end
count(delta)
if op == 'C' or op == 'c' then return table.concat(out) end
return 1
`;

export type { RedisIndexOptions } from './location-index.js';

/** Seed nodes and credentials of `redis://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]`. */
export interface RedisUrl {
  seeds: Array<{ host: string; port: number }>;
  username?: string;
  password?: string;
}

function bad(spec: string, why: string): BlockferryError {
  // The password never goes into a message.
  const shown = spec.replace(/\/\/[^@/]*@/, '//***@');
  return new BlockferryError(ErrorCode.INVALID_ARGUMENT, `index ${JSON.stringify(shown)}: ${why}; expected redis://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]`);
}

export function parseRedisUrl(spec: string): RedisUrl {
  if (typeof spec !== 'string') throw bad(String(spec), 'not a string');
  if (/^rediss:\/\//i.test(spec)) throw bad(spec, 'TLS to Redis (rediss://) is not supported by this build');
  const m = /^redis:\/\/(?:([^@/]*)@)?([^/@]+)\/?$/i.exec(spec);
  if (!m) throw bad(spec, 'not a redis:// URL');
  const out: RedisUrl = { seeds: [] };
  if (m[1] !== undefined) {
    const colon = m[1].indexOf(':');
    try {
      const user = decodeURIComponent(colon < 0 ? m[1] : m[1].slice(0, colon));
      const pass = colon < 0 ? undefined : decodeURIComponent(m[1].slice(colon + 1));
      if (pass === undefined) out.password = user; // redis://PASSWORD@HOST:PORT
      else {
        if (user) out.username = user;
        out.password = pass;
      }
    } catch {
      throw bad(spec, 'a malformed %-escape in the credentials');
    }
  }
  for (const part of m[2]!.split(',')) {
    const hp = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(part);
    const port = hp ? Number(hp[3]) : 0;
    if (!hp || port < 1 || port > 65535) throw bad(spec, `${JSON.stringify(part)} is not HOST:PORT`);
    out.seeds.push({ host: hp[1] ?? hp[2]!, port });
  }
  return out;
}

type Arg = string | Buffer | number;

/** One command of a round, with the items (digest positions, slots, ...) it carries. */
interface Cmd {
  name: string;
  args: Arg[];
  /** Reply as Buffers (GET, GETRANGE) instead of strings. */
  buffer?: boolean;
  items: number[];
  done: (reply: unknown) => void;
}

/** Calls to plan again: the cluster's state, not the request, made them fail. */
class Retry {
  constructor(readonly cmds: Cmd[], readonly cause: unknown) {}
}

function indexError(what: string, cause?: unknown): BlockferryError {
  const why = cause instanceof Error ? `: ${cause.message}` : '';
  return new BlockferryError(ErrorCode.INDEX, `Redis Cluster index: ${what}${why}`, { cause });
}

/** Whether a failure is the cluster's state (retry elsewhere or later) rather than the request's. */
function retryable(err: Error): boolean {
  if (err.name !== 'ReplyError') return true; // connection closed, reset, timed out: the node or the path
  return /^(MOVED|ASK|TRYAGAIN|CLUSTERDOWN|LOADING|READONLY|MASTERDOWN|NOSCRIPT|NOREPLICAS|BUSY)\b/.test(err.message)
    || /non local key/.test(err.message);
}

/** CRC16-XMODEM, the polynomial Redis Cluster hashes keys with (cluster.c, crc16.c). */
const CRC16 = (() => {
  const t = new Uint16Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i << 8;
    for (let k = 0; k < 8; k++) c = c & 0x8000 ? (c << 1) ^ 0x1021 : c << 1;
    t[i] = c & 0xffff;
  }
  return t;
})();

/**
 * The slot of a key that starts with "{}" (all of ours): Redis hashes the whole key, since its
 * first {tag} is empty. (cluster-key-slot, which ioredis uses, gets such keys wrong when a
 * later "}" follows, e.g. an image named "vm-{a}"; we route by this function instead.)
 */
export function keySlot(key: string | Buffer): number {
  const b = typeof key === 'string' ? Buffer.from(key) : key;
  if (b[0] !== 0x7b || b[1] !== 0x7d) throw new Error(`keySlot: ${JSON.stringify(key)} does not start with {}`);
  let crc = 0;
  for (let i = 0; i < b.length; i++) crc = ((crc << 8) & 0xffff) ^ CRC16[((crc >> 8) ^ b[i]!) & 0xff]!;
  return crc & 0x3fff;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function checkName(what: string, name: string): void {
  if (typeof name !== 'string' || name.length === 0 || Buffer.byteLength(name) > MAX_NAME || name.includes('\0')) {
    throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `${what} must be 1..${MAX_NAME} bytes without NUL, got ${JSON.stringify(name)}`);
  }
}

function checkRange(first: number, count: number): void {
  if (!Number.isSafeInteger(first) || first < 0 || !Number.isSafeInteger(count) || count < 0 || !Number.isSafeInteger(first + count)) {
    throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `block range ${first}+${count} is not a range of non-negative integers`);
  }
}

/** A bucket's 3 name bytes: the digest bytes 0, 1 and the top two bits of byte 2. */
function writeBucket(out: Buffer, at: number, b: number): void {
  out[at] = b >> 10;
  out[at + 1] = (b >> 2) & 0xff;
  out[at + 2] = (b & 3) << 6;
}

function bucketOf(d: Uint8Array, i: number): number {
  const o = i * DIGEST_BYTES;
  return (d[o]! << 10) | (d[o + 1]! << 2) | (d[o + 2]! >> 6);
}

export class RedisLocationIndex implements LocationIndex {
  /** Pipelines sent and commands in them, for tests that prove batching. */
  readonly stats = { pipelines: 0, commands: 0 };
  private readonly cluster: Cluster;
  private readonly ns: string;
  private readonly hprefix: Buffer;
  private readonly deadlineMs: number;
  /** EVALSHA's name for SCRIPT; a master gets SCRIPT LOAD in its first pipeline (and after NOSCRIPT). */
  private readonly sha = createHash('sha1').update(SCRIPT).digest('hex');
  private readonly scriptOn = new Set<string>();
  /** Masters that had no replica connected at their last ROLE. */
  private readonly alone = new Set<string>();
  private slotOf: Uint16Array | undefined;
  private slotBuckets: { start: Uint32Array; buckets: Uint32Array } | undefined;

  private constructor(cluster: Cluster, ns: string, deadlineMs: number) {
    this.cluster = cluster;
    this.ns = ns;
    this.hprefix = Buffer.from(`{}${ns}:h:`);
    this.deadlineMs = deadlineMs;
  }

  /** Connects to the cluster a `redis://` URL names and checks (or sets) the key layout. */
  static async open(spec: string, options: RedisIndexOptions = {}): Promise<RedisLocationIndex> {
    const url = parseRedisUrl(spec);
    const ns = options.namespace ?? 'bf';
    checkName('the index namespace', ns);
    const deadlineMs = options.deadlineMs ?? 30_000;
    if (!(deadlineMs > 0)) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `deadlineMs must be positive, got ${deadlineMs}`);
    const until = Date.now() + deadlineMs;
    const cluster = new IORedis.Cluster(url.seeds, {
      lazyConnect: true,
      scaleReads: 'master',
      slotsRefreshTimeout: 2000,
      // Reconnects to the seeds until the deadline, then gives up (connect() rejects).
      clusterRetryStrategy: (times) => (Date.now() + 100 * times > until ? null : Math.min(100 * times, 1000)),
      redisOptions: {
        ...(url.username !== undefined ? { username: url.username } : {}),
        ...(url.password !== undefined ? { password: url.password } : {}),
        connectTimeout: 2000,
        // A command neither waits through reconnections nor is silently sent again: the round's
        // own retry loop decides, after refreshing the slot map.
        maxRetriesPerRequest: 1,
        autoResendUnfulfilledCommands: false,
        commandTimeout: 10_000,
      },
    });
    cluster.on('error', () => {}); // reported through the calls that fail
    cluster.on('node error', () => {});
    const index = new RedisLocationIndex(cluster, ns, deadlineMs);
    try {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        cluster.connect(),
        new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`no answer within ${deadlineMs} ms`)), deadlineMs); }),
      ]).finally(() => clearTimeout(timer));
      const meta = `{}${ns}:meta`;
      let layout: unknown;
      await index.single([{ key: meta, name: 'set', args: [meta, LAYOUT, 'NX', 'GET'], done: (r) => { layout = r; } }], true);
      if (layout !== null && layout !== LAYOUT) {
        throw new BlockferryError(ErrorCode.INDEX, `Redis Cluster index: namespace ${JSON.stringify(ns)} holds layout ${JSON.stringify(layout)}, this build writes ${JSON.stringify(LAYOUT)}`);
      }
    } catch (e) {
      cluster.disconnect();
      if (e instanceof BlockferryError) throw e;
      throw indexError(`cannot reach the cluster at ${url.seeds.map((s) => `${s.host}:${s.port}`).join(',')}`, e);
    }
    return index;
  }

  async locate(digests: Uint8Array): Promise<string[][]> {
    const n = digestCount(digests);
    const out: string[][] = new Array(n);
    for (let lo = 0; lo < n; lo += CHUNK) {
      await this.holders(digests, lo, Math.min(n, lo + CHUNK), 'L', '', false, (items, reply) => {
        const r = reply as Array<string | null>;
        for (let j = 0; j < items.length; j++) out[items[j]!] = r[j] ? r[j]!.split('\0') : [];
      });
    }
    return out;
  }

  async claim(location: string, digests: Uint8Array): Promise<boolean[]> {
    checkName('a location', location);
    const n = digestCount(digests);
    const out = new Array<boolean>(n);
    for (let lo = 0; lo < n; lo += CHUNK) {
      await this.holders(digests, lo, Math.min(n, lo + CHUNK), 'C', location, true, (items, reply) => {
        const r = reply as string;
        for (let j = 0; j < items.length; j++) out[items[j]!] = r.charCodeAt(j) === 49;
      });
    }
    return out;
  }

  async record(location: string, digests: Uint8Array): Promise<void> {
    checkName('a location', location);
    const n = digestCount(digests);
    for (let lo = 0; lo < n; lo += CHUNK) await this.holders(digests, lo, Math.min(n, lo + CHUNK), 'R', location, true, () => {});
  }

  async forget(location: string, digests?: Uint8Array): Promise<void> {
    checkName('a location', location);
    if (digests) {
      const n = digestCount(digests);
      for (let lo = 0; lo < n; lo += CHUNK) await this.holders(digests, lo, Math.min(n, lo + CHUNK), 'F', location, false, () => {});
      return;
    }
    const key = this.membershipKey(location);
    let bits: Buffer | null = null;
    await this.single([{ key, name: 'get', args: [key], buffer: true, done: (r) => { bits = r as Buffer | null; } }], false);
    const mask = bits as Buffer | null;
    if (!mask) return;
    const slots: number[] = [];
    for (let s = 0; s < SLOTS && s >> 3 < mask.length; s++) if (mask[s >> 3]! & (0x80 >> (s & 7))) slots.push(s);
    await this.perSlot(slots, 'A', location, () => {});
  }

  async setBlocks(image: string, first: number, digests: Uint8Array): Promise<void> {
    checkName('an image name', image);
    const n = digestCount(digests);
    checkRange(first, n);
    const buf = Buffer.from(digests.buffer, digests.byteOffset, digests.byteLength);
    let cmds: Array<{ key: string; name: string; args: Arg[]; done: (r: unknown) => void }> = [];
    for (let i = 0; i < n;) {
      const block = first + i;
      const w = Math.floor(block / WINDOW);
      const off = block - w * WINDOW;
      const len = Math.min(WINDOW - off, n - i);
      const key = this.windowKey(image, w);
      cmds.push({ key, name: 'setrange', args: [key, off * DIGEST_BYTES, buf.subarray(i * DIGEST_BYTES, (i + len) * DIGEST_BYTES)], done: () => {} });
      i += len;
      if (cmds.length * WINDOW >= CHUNK || i >= n) {
        await this.single(cmds, true);
        cmds = [];
      }
    }
  }

  async getBlocks(image: string, first: number, count: number): Promise<Uint8Array> {
    checkName('an image name', image);
    checkRange(first, count);
    const out = new Uint8Array(count * DIGEST_BYTES);
    let cmds: Array<{ key: string; name: string; args: Arg[]; buffer: boolean; done: (r: unknown) => void }> = [];
    for (let i = 0; i < count;) {
      const block = first + i;
      const w = Math.floor(block / WINDOW);
      const off = block - w * WINDOW;
      const len = Math.min(WINDOW - off, count - i);
      const key = this.windowKey(image, w);
      const at = i * DIGEST_BYTES;
      cmds.push({
        key, name: 'getrange', args: [key, off * DIGEST_BYTES, (off + len) * DIGEST_BYTES - 1], buffer: true,
        done: (r) => { const b = r as Buffer; if (b.length) out.set(b, at); },
      });
      i += len;
      if (cmds.length * WINDOW >= CHUNK || i >= count) {
        await this.single(cmds, false);
        cmds = [];
      }
    }
    return out;
  }

  async size(): Promise<number> {
    let total = 0;
    await this.perSlot(Array.from({ length: SLOTS }, (_, s) => s), 'S', '', (r) => { total += Number(r); });
    return total;
  }

  async close(): Promise<void> {
    try {
      await this.cluster.quit();
    } catch {
      this.cluster.disconnect();
    }
  }

  // ---- layout ----

  private bucketKey(b: number): Buffer {
    const k = Buffer.allocUnsafe(this.hprefix.length + 3);
    this.hprefix.copy(k);
    writeBucket(k, this.hprefix.length, b);
    return k;
  }

  private windowKey(image: string, w: number): string {
    return `{}${this.ns}:b:${w}:${image}`;
  }

  private membershipKey(location: string): string {
    return `{}${this.ns}:m:${location}`;
  }

  /** bucket → slot, computed once (262,144 CRC16s, a few tens of ms). */
  private slots(): Uint16Array {
    if (!this.slotOf) {
      const t = new Uint16Array(BUCKETS);
      for (let b = 0; b < BUCKETS; b++) t[b] = keySlot(this.bucketKey(b));
      this.slotOf = t;
    }
    return this.slotOf;
  }

  /** The buckets of each slot (buckets[start[s] .. start[s+1]]). */
  private bucketsBySlot(): { start: Uint32Array; buckets: Uint32Array } {
    if (!this.slotBuckets) {
      const slotOf = this.slots();
      const start = new Uint32Array(SLOTS + 1);
      for (let b = 0; b < BUCKETS; b++) start[slotOf[b]! + 1]!++;
      for (let s = 0; s < SLOTS; s++) start[s + 1]! += start[s]!;
      const fill = start.slice(0, SLOTS);
      const buckets = new Uint32Array(BUCKETS);
      for (let b = 0; b < BUCKETS; b++) buckets[fill[slotOf[b]!]!++] = b;
      this.slotBuckets = { start, buckets };
    }
    return this.slotBuckets;
  }

  // ---- the calls ----

  /**
   * Runs `op` over digests [lo, hi): per master, script calls of up to CALL digests (in batch
   * order, so repeated digests meet in order). `done` gets each call's digest positions and reply.
   */
  private async holders(digests: Uint8Array, lo: number, hi: number, op: string, location: string, write: boolean, done: (items: number[], reply: unknown) => void): Promise<void> {
    const slotOf = this.slots();
    const items: number[] = new Array(hi - lo);
    for (let i = lo; i < hi; i++) items[i - lo] = i;
    if (op === 'C' || op === 'R') {
      // The membership bitmap first: a crash after it leaves a stale bit, never a lost one.
      const mask = Buffer.alloc(SLOTS / 8);
      for (let i = lo; i < hi; i++) {
        const s = slotOf[bucketOf(digests, i)]!;
        mask[s >> 3]! |= 0x80 >> (s & 7);
      }
      const key = this.membershipKey(location);
      await this.single([{ key, name: 'evalsha', args: [this.sha, 1, key, 'M', '', '', mask], done: () => {} }], true);
    }
    await this.exec(items, (i) => slotOf[bucketOf(digests, i)]!, (mine, retry) => {
      const cmds: Cmd[] = [];
      for (let a = 0; a < mine.length; a += CALL) {
        const part = mine.slice(a, a + CALL);
        const packed = Buffer.allocUnsafe(part.length * DIGEST_BYTES);
        for (let j = 0; j < part.length; j++) packed.set(digests.subarray(part[j]! * DIGEST_BYTES, (part[j]! + 1) * DIGEST_BYTES), j * DIGEST_BYTES);
        // A claim sent again may have won its digests the first time: 'c' counts a digest held by
        // the claimer alone as won (at worst one block is sent twice, never zero times).
        const o = op === 'C' && retry ? 'c' : op;
        const route = this.bucketKey(bucketOf(digests, part[0]!));
        cmds.push({ name: 'evalsha', args: [this.sha, 1, route, o, location, this.hprefix, packed], items: part, done: (r) => done(part, r) });
      }
      return cmds;
    }, write);
  }

  /** Runs `op` (A: forget-all, S: size) over every bucket of the given slots, SLOTS_PER_CALL slots a call. */
  private async perSlot(slots: number[], op: string, location: string, done: (reply: unknown) => void): Promise<void> {
    const { start, buckets } = this.bucketsBySlot();
    await this.exec(slots, (s) => s, (mine) => {
      const cmds: Cmd[] = [];
      for (let a = 0; a < mine.length; a += SLOTS_PER_CALL) {
        const part = mine.slice(a, a + SLOTS_PER_CALL);
        const ids: number[] = [];
        for (const s of part) for (let k = start[s]!; k < start[s + 1]!; k++) ids.push(buckets[k]!);
        if (ids.length === 0) continue;
        const data = Buffer.allocUnsafe(3 * ids.length);
        ids.forEach((b, j) => writeBucket(data, 3 * j, b));
        cmds.push({ name: 'evalsha', args: [this.sha, 1, this.bucketKey(ids[0]!), op, location, this.hprefix, data], items: part, done });
      }
      return cmds;
    }, op === 'A');
  }

  /** Single-key commands, each routed by its key's slot. */
  private async single(list: Array<{ key: string; name: string; args: Arg[]; buffer?: boolean; done: (r: unknown) => void }>, write: boolean): Promise<void> {
    const slot = list.map((c) => keySlot(c.key));
    await this.exec(list.map((_, i) => i), (i) => slot[i]!, (mine) => mine.map((i) => ({ ...list[i]!, items: [i] })), write);
  }

  // ---- the round: group by master, pipeline, WAIT, retry ----

  /**
   * Sends `items` (whatever `build` turns into commands for one master) to the masters of their
   * slots, one pipeline per master, and plans the items of failed calls again from a refreshed
   * slot map, with backoff, until the deadline.
   */
  private async exec(items: number[], slotOf: (item: number) => number, build: (items: number[], retry: boolean) => Cmd[], write: boolean): Promise<void> {
    const until = Date.now() + this.deadlineMs;
    let pending = items;
    let lastError: unknown;
    for (let attempt = 0; pending.length > 0; attempt++) {
      if (attempt > 0) {
        if (Date.now() >= until) throw indexError(`${pending.length} items still failing after ${this.deadlineMs} ms`, lastError);
        await sleep(Math.min(50 * 2 ** Math.min(attempt - 1, 4), 500));
        await new Promise<void>((resolve) => this.cluster.refreshSlotsCache(() => resolve()));
      }
      const byNode = new Map<string, number[]>();
      const failed: number[] = [];
      for (const it of pending) {
        const key = this.cluster.slots[slotOf(it)]?.[0];
        if (!key) failed.push(it);
        else {
          let list = byNode.get(key);
          if (!list) byNode.set(key, (list = []));
          list.push(it);
        }
      }
      const nodes = new Map<string, Redis>();
      for (const r of this.cluster.nodes('all')) nodes.set(`${r.options.host}:${r.options.port}`, r);
      let fatal: unknown;
      await Promise.all([...byNode].map(async ([key, mine]) => {
        const node = nodes.get(key);
        if (!node) {
          failed.push(...mine);
          return;
        }
        try {
          await this.sendTo(key, node, build(mine, attempt > 0), write);
        } catch (e) {
          if (e instanceof Retry) {
            lastError = e.cause;
            for (const c of e.cmds) failed.push(...c.items);
          } else fatal ??= e;
        }
      }));
      if (fatal) throw fatal instanceof BlockferryError ? fatal : indexError('a command failed', fatal);
      if (failed.length && !lastError) lastError = new Error('slots without a master in the client\'s map');
      pending = failed;
    }
  }

  /** One pipeline to one master; throws Retry (with the calls to plan again) or a fatal error. */
  private async sendTo(key: string, node: Redis, list: Cmd[], write: boolean): Promise<void> {
    if (list.length === 0) return;
    const p = node.pipeline();
    const load = !this.scriptOn.has(key) && list.some((c) => c.name === 'evalsha');
    if (load) p.call('script', ['LOAD', SCRIPT]);
    for (const c of list) {
      if (c.buffer) p.callBuffer(c.name, c.args);
      else p.call(c.name, c.args);
    }
    // A master known to have no replica connected (it took over from a dead one) would hold
    // every WAIT for its full timeout: ask with 1 ms, then ROLE decides (replicated()).
    if (write) p.call('wait', [1, this.alone.has(key) ? 1 : WAIT_MS]);
    this.stats.pipelines++;
    this.stats.commands += list.length;
    let res: Array<[Error | null, unknown]>;
    try {
      res = (await p.exec()) as Array<[Error | null, unknown]>;
    } catch (e) {
      throw new Retry(list, e);
    }
    const off = load ? 1 : 0;
    if (load && !res[0]![0]) this.scriptOn.add(key);
    const again: Cmd[] = [];
    const ok: Array<[Cmd, unknown]> = [];
    let err: Error | undefined;
    for (let i = 0; i < list.length; i++) {
      const [e, v] = res[off + i]!;
      if (!e) ok.push([list[i]!, v]);
      else if (retryable(e)) {
        if (/^NOSCRIPT/.test(e.message)) this.scriptOn.delete(key);
        again.push(list[i]!);
        err = e;
      } else throw indexError(`${list[i]!.name} failed on ${key}`, e);
    }
    if (write && ok.length > 0) {
      const [we, wv] = res[res.length - 1]!;
      try {
        if (we || (wv as number) < 1) await this.replicated(key, node);
      } catch (e) {
        throw new Retry(list, e); // not known to be on a replica: the whole pipeline again
      }
    }
    for (const [c, v] of ok) c.done(v);
    if (again.length) throw new Retry(again, err);
  }

  /** Resolves once a replica has the node's writes, or the node has no replica connected to wait for. */
  private async replicated(key: string, node: Redis): Promise<void> {
    const until = Date.now() + this.deadlineMs;
    for (;;) {
      const role = (await node.call('role')) as [string, number, unknown[]];
      if (role[0] !== 'master') throw new Error(`the node is now a ${role[0]}`);
      if (role[2].length === 0) {
        this.alone.add(key);
        return;
      }
      this.alone.delete(key);
      if (((await node.call('wait', 1, WAIT_MS)) as number) >= 1) return;
      if (Date.now() >= until) throw new Error(`no replica acknowledged within ${this.deadlineMs} ms`);
    }
  }
}
