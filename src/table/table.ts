import { Engine } from '../engine/engine.js';
import { ErrorCode, FormatError, InvalidArgumentError } from '../errors.js';
import { FileFormat } from '../io/format.js';

// The table's design is written where it lives: assembly/blockindex.ts.
// This file owns its memory: the table sits at BASE in a private engine; a
// staging area for batches (and for serialising) sits just above it.

/** Bytes per entry: fingerprint, signature, reference (u64 each). */
export const ENTRY_BYTES = 24;
/**
 * Maximum load before the table grows. 0.8 puts a slot at 30 bytes per
 * entry; Robin Hood order keeps misses short there (assembly/blockindex.ts).
 */
export const MAX_LOAD = 0.8;
/** Growth factor: capacities need not be powers of two (fastrange homes). */
export const GROWTH = 1.5;
const MIN_CAPACITY = 1024;
/** Entries per staging batch: 64 Ki entries = 1.5 MiB, cache-friendly and cheap to copy. */
const BATCH = 1 << 16;
const BASE = 1024;
/** Largest capacity whose slots fit in wasm32 memory beside the staging area. */
const MAX_CAPACITY = Math.floor((2 ** 32 - 64 * 2 ** 20) / ENTRY_BYTES / 2);

/** The reference of "no entry" (all ones); no real reference takes this value. */
export const NO_REF = 0xffff_ffff_ffff_ffffn;
/** Image ids are 24 bits; 0xFFFFFF is reserved for NO_REF. */
export const MAX_IMAGE_ID = 0xff_fffe;
/** Block numbers are 40 bits: 2^40 blocks of 512 B is 512 TiB. */
export const MAX_BLOCK_NUMBER = 2 ** 40 - 1;

/** Packs an image id and a block number into a block reference. */
export function makeRef(imageId: number, block: number): bigint {
  if (!Number.isInteger(imageId) || imageId < 0 || imageId > MAX_IMAGE_ID) {
    throw new InvalidArgumentError('imageId', `an integer from 0 to ${MAX_IMAGE_ID}`, imageId);
  }
  if (!Number.isInteger(block) || block < 0 || block > MAX_BLOCK_NUMBER) {
    throw new InvalidArgumentError('block', `an integer from 0 to ${MAX_BLOCK_NUMBER}`, block);
  }
  return (BigInt(imageId) << 40n) | BigInt(block);
}

export function refImage(ref: bigint): number {
  return Number(ref >> 40n);
}

export function refBlock(ref: bigint): number {
  return Number(ref & 0xff_ffff_ffffn);
}

/** Serialised form: magic, version, entry size, count, entries, XXH3-64 checksum. See docs/FORMATS.md. */
export const TABLE_MAGIC = Buffer.from('BFIDXTBL', 'latin1');
export const TABLE_VERSION = 1;
const HEADER = 24;
const TRAILER = 8;

const WHAT = 'block index';
const FORMAT = new FileFormat('BFIDXTBL', TABLE_VERSION, HEADER, WHAT);

export interface TableStats {
  entries: number;
  capacity: number;
  load: number;
  /** Bytes of the slot array. */
  tableBytes: number;
  /** tableBytes / entries. */
  bytesPerEntry: number;
  /** All linear memory the table's engine holds (slots, staging, growth slack). */
  memoryBytes: number;
}

/**
 * The signature-checked block index: (fingerprint, signature) -> block
 * reference, in WASM memory. A lookup hits only when both the fingerprint
 * and the signature match.
 */
export class BlockIndexTable {
  private readonly engine: Engine;
  private cap: number;
  private count = 0;

  constructor(options: { expectedEntries?: number } = {}) {
    const expected = options.expectedEntries ?? 0;
    if (!Number.isInteger(expected) || expected < 0) throw new InvalidArgumentError('expectedEntries', 'a count', expected);
    this.cap = capacityFor(expected);
    this.engine = new Engine({ initialBytes: BASE + this.cap * ENTRY_BYTES + BATCH * ENTRY_BYTES + 4096 });
    this.engine.ensure(this.stagingPtr + BATCH * ENTRY_BYTES);
    this.engine.core.indexClear(BASE, this.cap);
  }

  get size(): number {
    return this.count;
  }

  get capacity(): number {
    return this.cap;
  }

  stats(): TableStats {
    const tableBytes = this.cap * ENTRY_BYTES;
    return {
      entries: this.count,
      capacity: this.cap,
      load: this.count / this.cap,
      tableBytes,
      bytesPerEntry: this.count ? tableBytes / this.count : 0,
      memoryBytes: this.engine.memory.buffer.byteLength,
    };
  }

  private get stagingPtr(): number {
    return Math.ceil((BASE + this.cap * ENTRY_BYTES) / 64) * 64;
  }

  /** Makes room for `more` entries beyond the current count without another growth. */
  reserve(more: number): void {
    const need = this.count + more;
    if (need <= this.cap * MAX_LOAD) return;
    // Grow by GROWTH (amortised O(1) for one-at-a-time inserts), or straight
    // to the size a known count needs when that is larger.
    this.resize(Math.max(Math.ceil(this.cap * GROWTH), capacityFor(need)));
  }

  private resize(newCap: number): void {
    if (newCap > MAX_CAPACITY) throw new InvalidArgumentError('entries', `at most ${Math.floor(MAX_CAPACITY * MAX_LOAD)} in one table`, this.count);
    const oldCap = this.cap;
    // Build the new table above the old one, then move it down to BASE.
    const to = this.stagingPtr;
    this.engine.ensure(to + newCap * ENTRY_BYTES + BATCH * ENTRY_BYTES + 64);
    this.engine.core.indexClear(to, newCap);
    this.engine.core.indexRehash(BASE, oldCap, to, newCap);
    const mem = this.engine.bytes;
    mem.copyWithin(BASE, to, to + newCap * ENTRY_BYTES);
    this.cap = newCap;
  }

  /** Adds (fp, sig) -> ref; false when the pair is already present (the first reference stays). */
  insert(fp: bigint, sig: bigint, ref: bigint): boolean {
    if (ref === NO_REF || ref < 0n || ref > NO_REF) throw new InvalidArgumentError('ref', 'a u64 other than NO_REF', ref);
    this.reserve(1);
    const added = this.engine.core.indexInsert(BASE, this.cap, fp, sig, ref) === 1;
    if (added) this.count++;
    return added;
  }

  /** The reference for (fp, sig), or undefined. */
  lookup(fp: bigint, sig: bigint): bigint | undefined {
    const r = BigInt.asUintN(64, this.engine.core.indexLookup(BASE, this.cap, fp, sig));
    return r === NO_REF ? undefined : r;
  }

  /**
   * Adds many entries: (fp, sig, ref) triples in a BigUint64Array (or the
   * same bytes little-endian). Returns how many were new.
   */
  insertMany(entries: BigUint64Array | Uint8Array): number {
    const bytes = entries instanceof BigUint64Array ? new Uint8Array(entries.buffer, entries.byteOffset, entries.byteLength) : entries;
    if (bytes.length % ENTRY_BYTES) throw new InvalidArgumentError('entries', `a multiple of ${ENTRY_BYTES} bytes`, bytes.length);
    const n = bytes.length / ENTRY_BYTES;
    let added = 0;
    for (let i = 0; i < n; i += BATCH) {
      const m = Math.min(BATCH, n - i);
      this.reserve(m);
      const st = this.stagingPtr;
      this.engine.bytes.set(bytes.subarray(i * ENTRY_BYTES, (i + m) * ENTRY_BYTES), st);
      const r = this.engine.core.indexInsertMany(BASE, this.cap, st, m);
      if (r < 0) {
        // The kernel checks a batch before inserting any of it: earlier batches stay.
        throw new InvalidArgumentError(`entries[${i - r - 1}].ref`, 'a reference other than NO_REF', NO_REF);
      }
      this.count += r;
      added += r;
    }
    return added;
  }

  /**
   * Looks up the blocks with the given fingerprints and signatures (parallel
   * arrays, the layout a scan produces). Returns one reference per block,
   * NO_REF for a miss.
   */
  lookupColumns(fps: BigUint64Array, sigs: BigUint64Array, out = new BigUint64Array(fps.length)): BigUint64Array {
    if (sigs.length !== fps.length || out.length < fps.length) {
      throw new InvalidArgumentError('lookupColumns', 'fps, sigs and out of the same length', `${fps.length}/${sigs.length}/${out.length}`);
    }
    const n = fps.length;
    const st = this.stagingPtr;
    this.engine.ensure(st + 3 * BATCH * 8);
    for (let i = 0; i < n; i += BATCH) {
      const m = Math.min(BATCH, n - i);
      const mem = this.engine.memory.buffer;
      new BigUint64Array(mem, st, m).set(fps.subarray(i, i + m));
      new BigUint64Array(mem, st + BATCH * 8, m).set(sigs.subarray(i, i + m));
      this.engine.core.indexLookupColumns(BASE, this.cap, st, st + BATCH * 8, m, st + 2 * BATCH * 8);
      out.set(new BigUint64Array(mem, st + 2 * BATCH * 8, m), i);
    }
    return out;
  }

  /** Looks up (fp, sig) pairs; one reference per pair, NO_REF for a miss. */
  lookupPairs(keys: BigUint64Array, out = new BigUint64Array(keys.length / 2)): BigUint64Array {
    if (keys.length % 2 || out.length < keys.length / 2) throw new InvalidArgumentError('keys', '(fp, sig) pairs', keys.length);
    const n = keys.length / 2;
    const st = this.stagingPtr;
    this.engine.ensure(st + 3 * BATCH * 8);
    for (let i = 0; i < n; i += BATCH) {
      const m = Math.min(BATCH, n - i);
      const mem = this.engine.memory.buffer;
      new BigUint64Array(mem, st, 2 * m).set(keys.subarray(2 * i, 2 * (i + m)));
      this.engine.core.indexLookupMany(BASE, this.cap, st, m, st + 2 * BATCH * 8);
      out.set(new BigUint64Array(mem, st + 2 * BATCH * 8, m), i);
    }
    return out;
  }

  /** All entries as (fp, sig, ref) triples, in table order. */
  entries(): BigUint64Array {
    const st = this.stagingPtr;
    this.engine.ensure(st + this.count * ENTRY_BYTES);
    const n = this.engine.core.indexEntries(BASE, this.cap, st);
    return new BigUint64Array(this.engine.memory.buffer.slice(st, st + n * ENTRY_BYTES));
  }

  /** The table as bytes (docs/FORMATS.md, "Block index table"): a copy. */
  serialize(): Uint8Array {
    return this.serializedView().slice();
  }

  /**
   * The table as bytes, as a view into the table's own memory (no copy of a
   * possibly large table): valid until the table is next changed. For
   * writing it out at once.
   */
  serializedView(): Uint8Array {
    const st = this.stagingPtr;
    const total = HEADER + this.count * ENTRY_BYTES + TRAILER;
    this.engine.ensure(st + total);
    const mem = this.engine.bytes;
    const n = this.engine.core.indexEntries(BASE, this.cap, st + HEADER);
    if (n !== this.count) throw new Error(`block index invariant broken: ${n} entries, count ${this.count}`);
    mem.set(TABLE_MAGIC, st);
    const dv = new DataView(mem.buffer, st, HEADER);
    dv.setUint32(8, TABLE_VERSION, true);
    dv.setUint32(12, ENTRY_BYTES, true);
    dv.setBigUint64(16, BigInt(n), true);
    const sum = BigInt.asUintN(64, this.engine.core.xxh3(st, total - TRAILER));
    new DataView(mem.buffer, st + total - TRAILER, TRAILER).setBigUint64(0, sum, true);
    return mem.subarray(st, st + total);
  }

  /** Reads a table written by serialize(); a damaged one throws a FormatError with a stable code. */
  static deserialize(bytes: Uint8Array): BlockIndexTable {
    if (!(bytes instanceof Uint8Array)) throw new InvalidArgumentError('bytes', 'a Uint8Array', bytes);
    // The frame (length, magic, version, declared length) is the shared one;
    // the checksum is plain XXH3-64, computed below in the table's own memory.
    const b = FORMAT.open(bytes);
    const entrySize = b.readUInt32LE(12);
    if (entrySize !== ENTRY_BYTES) throw FORMAT.corrupt(`entry size ${entrySize}, expected ${ENTRY_BYTES}`);
    const declared = b.readBigUInt64LE(16);
    FORMAT.checkLength(b, BigInt(HEADER + TRAILER) + declared * BigInt(ENTRY_BYTES));
    const n = Number(declared);
    const table = new BlockIndexTable({ expectedEntries: n });
    const st = table.stagingPtr;
    table.engine.ensure(st + bytes.length);
    table.engine.bytes.set(bytes, st);
    const sum = BigInt.asUintN(64, table.engine.core.xxh3(st, bytes.length - TRAILER));
    const stored = new DataView(bytes.buffer, bytes.byteOffset + bytes.length - TRAILER, TRAILER).getBigUint64(0, true);
    if (sum !== stored) throw new FormatError(ErrorCode.CHECKSUM_MISMATCH, WHAT, 'checksum mismatch: the file is damaged');
    const r = table.engine.core.indexInsertMany(BASE, table.cap, st + HEADER, n);
    if (r < 0) throw new FormatError(ErrorCode.CORRUPT, WHAT, `entry ${-r - 1} has the reserved reference NO_REF`);
    if (r !== n) throw new FormatError(ErrorCode.CORRUPT, WHAT, `${n - r} duplicate entries`);
    table.count = n;
    return table;
  }
}

/** The capacity that holds n entries at or under MAX_LOAD. */
function capacityFor(n: number): number {
  return Math.max(MIN_CAPACITY, Math.ceil(n / MAX_LOAD) + 1);
}
