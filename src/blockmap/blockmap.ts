import { DIGEST_BYTES, checkBlockSize, blockCount } from '../engine/engine.js';
import { blockLength } from '../blocks/intervals.js';
import { FileFormat, bytesOf, pad8, TRAILER_BYTES } from '../io/format.js';
import { BlockIndexTable, makeRef } from '../table/table.js';
import { InvalidArgumentError } from '../errors.js';
import type { ImageIdentity } from '../image/source.js';

/**
 * The 64 bits of the header's modification time: nanoseconds since the
 * epoch, two's complement for a file dated before 1970; a qcow2 chain's is
 * an unsigned 64-bit hash of its layers (qcow2Identity). Compared as such.
 */
function mtimeField(mtimeNs: string): bigint {
  return BigInt.asUintN(64, BigInt(mtimeNs));
}

/** File layout: docs/FORMATS.md, "Block map". */
export const BLOCKMAP_MAGIC = Buffer.from('BFBLKMAP', 'latin1');
export const BLOCKMAP_VERSION = 2;
const HEADER = 80;
const FLAG_DIGESTS = 1;
const FORMAT = new FileFormat('BFBLKMAP', BLOCKMAP_VERSION, HEADER, 'block map');
/** Entries per batch when filling a table: 64 Ki triples = 1.5 MiB. */
const TABLE_BATCH = 1 << 16;

export interface BlockMapStats {
  blocks: number;
  zeroBlocks: number;
  nonZeroBlocks: number;
  /** Non-zero blocks with distinct content (fingerprint and signature). */
  distinctBlocks: number;
  /** Non-zero blocks whose content occurs earlier in the same image. */
  duplicateBlocks: number;
}

/** A run of non-zero blocks [start, start + count) and the column index of its first block. */
export interface DataRun {
  start: number;
  count: number;
  index: number;
}

/**
 * Why runs cannot describe the non-zero blocks of an image of `blocks`
 * blocks holding `columns` column entries, or undefined when they can:
 * pairs of integers, each run non-empty, sorted, disjoint and not touching
 * (maximal), inside the image, and their counts summing to `columns`.
 */
export function checkDataRuns(runs: Float64Array, blocks: number, columns: number): string | undefined {
  if (runs.length % 2) return `${runs.length} run numbers is not a list of (start, count) pairs`;
  let end = -1, total = 0;
  for (let r = 0; r < runs.length; r += 2) {
    const s = runs[r]!, c = runs[r + 1]!;
    if (!Number.isSafeInteger(s) || !Number.isSafeInteger(c) || s < 0 || c < 1) return `run ${r / 2} is ${s}+${c}`;
    if (s <= end) return `run ${r / 2} (${s}+${c}) is not after the end of the one before (${end})`;
    if (s + c > blocks) return `run ${r / 2} (${s}+${c}) ends past the image's ${blocks} blocks`;
    end = s + c;
    total += c;
  }
  if (total !== columns) return `the runs hold ${total} blocks, the columns ${columns}`;
  return undefined;
}

/**
 * The per-block facts of one image at one block size, compact: the non-zero
 * blocks as maximal runs, and for them only the fingerprint, signature and
 * (optionally) SHA-1 digest, in block order. Everything outside the runs
 * (holes and zero blocks alike) is zero and costs nothing: a 1 TiB image
 * with 1 GiB of data is 256 Ki column entries plus one run per data region.
 *
 * Block i covers bytes [i * blockSize, min(size, (i + 1) * blockSize)): the
 * last block is short when the size is not a multiple, and is hashed over its
 * real length, so it matches only an identical short block.
 *
 * Column k belongs to the k-th non-zero block; indexOf(block) maps a block
 * number to its column (a binary search over the runs, with a prefix count).
 */
export class BlockMap {
  /** Column index of each run's first block (prefix sums of the counts). */
  private readonly firstIndex: Float64Array;
  private readonly blocks: number;

  constructor(
    readonly imagePath: string,
    readonly identity: ImageIdentity,
    readonly blockSize: number,
    /** [start0, count0, start1, count1, ...]: maximal runs of non-zero blocks, sorted, disjoint, non-adjacent. */
    readonly dataRuns: Float64Array,
    /** One per non-zero block, in block order. */
    readonly fingerprints: BigUint64Array,
    readonly signatures: BigUint64Array,
    /** 20 bytes per non-zero block, same order, when scanned with SHA-1. */
    readonly digests: Uint8Array | undefined,
  ) {
    checkBlockSize(blockSize);
    this.blocks = blockCount(identity.size, blockSize);
    const why = checkDataRuns(dataRuns, this.blocks, fingerprints.length);
    if (why) throw new InvalidArgumentError('dataRuns', 'maximal sorted runs of non-zero blocks inside the image', why);
    if (signatures.length !== fingerprints.length) throw new InvalidArgumentError('signatures', `${fingerprints.length} entries`, signatures.length);
    if (digests && digests.length !== fingerprints.length * DIGEST_BYTES) {
      throw new InvalidArgumentError('digests', `${fingerprints.length * DIGEST_BYTES} bytes`, digests.length);
    }
    this.firstIndex = new Float64Array(dataRuns.length / 2);
    for (let r = 0, k = 0; r < this.firstIndex.length; r++) {
      this.firstIndex[r] = k;
      k += dataRuns[2 * r + 1]!;
    }
  }

  get imageSize(): number {
    return this.identity.size;
  }

  /** All blocks of the image, ceil(size / blockSize). */
  get count(): number {
    return this.blocks;
  }

  /** Non-zero blocks (= fingerprints.length). */
  get dataBlocks(): number {
    return this.fingerprints.length;
  }

  get runCount(): number {
    return this.firstIndex.length;
  }

  /** Length of block i in bytes (blockSize, or less for a short last block). */
  blockLength(i: number): number {
    return blockLength(this.imageSize, this.blockSize, i);
  }

  /** The data runs with the column index of each run's first block. */
  *runs(): Generator<DataRun> {
    for (let r = 0; r < this.firstIndex.length; r++) {
      yield { start: this.dataRuns[2 * r]!, count: this.dataRuns[2 * r + 1]!, index: this.firstIndex[r]! };
    }
  }

  /** The data runs clipped to blocks [start, start + count), with the column index of each piece's first block. */
  *runsWithin(start: number, count: number): Generator<DataRun> {
    const end = start + count;
    for (let r = Math.max(0, this.runAtOrBefore(start)); r < this.firstIndex.length; r++) {
      const s = this.dataRuns[2 * r]!, e = s + this.dataRuns[2 * r + 1]!;
      if (s >= end) break;
      const a = Math.max(s, start), b = Math.min(e, end);
      if (b > a) yield { start: a, count: b - a, index: this.firstIndex[r]! + (a - s) };
    }
  }

  /** The last run starting at or before block, or -1. */
  private runAtOrBefore(block: number): number {
    let lo = 0, hi = this.firstIndex.length; // first run with start > block
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.dataRuns[2 * mid]! <= block) lo = mid + 1;
      else hi = mid;
    }
    return lo - 1;
  }

  /** The column index of block, or -1 for a zero block (or one outside the image). */
  indexOf(block: number): number {
    const r = this.runAtOrBefore(block);
    if (r < 0) return -1;
    const s = this.dataRuns[2 * r]!;
    return block < s + this.dataRuns[2 * r + 1]! ? this.firstIndex[r]! + (block - s) : -1;
  }

  isZero(block: number): boolean {
    return this.indexOf(block) < 0;
  }

  /** The SHA-1 digest of a block by block number; undefined for a zero block or a map without digests. */
  digest(block: number): Uint8Array | undefined {
    if (!this.digests) return undefined;
    const k = this.indexOf(block);
    return k < 0 ? undefined : this.digests.subarray(k * DIGEST_BYTES, (k + 1) * DIGEST_BYTES);
  }

  /** True when this map describes the image as identity says it is now. */
  matches(identity: ImageIdentity): boolean {
    const a = this.identity;
    return a.size === identity.size && mtimeField(a.mtimeNs) === mtimeField(identity.mtimeNs) && a.ino === identity.ino && a.dev === identity.dev;
  }

  /** Block numbers of the non-zero blocks, in order (column k is block nonZeroBlocks()[k]). */
  nonZeroBlocks(): Float64Array {
    const out = new Float64Array(this.dataBlocks);
    for (let r = 0, k = 0; r < this.firstIndex.length; r++) {
      const s = this.dataRuns[2 * r]!, c = this.dataRuns[2 * r + 1]!;
      for (let j = 0; j < c; j++) out[k++] = s + j;
    }
    return out;
  }

  stats(): BlockMapStats {
    const distinct = this.distinctTable().size;
    return {
      blocks: this.count,
      zeroBlocks: this.count - this.dataBlocks,
      nonZeroBlocks: this.dataBlocks,
      distinctBlocks: distinct,
      duplicateBlocks: this.dataBlocks - distinct,
    };
  }

  /** A table of the distinct non-zero blocks: (fp, sig) -> (imageId, first block with that content). */
  distinctTable(imageId = 0): BlockIndexTable {
    const table = new BlockIndexTable({ expectedEntries: this.dataBlocks });
    const entries = new BigUint64Array(3 * Math.min(TABLE_BATCH, this.dataBlocks));
    let m = 0;
    for (const run of this.runs()) {
      for (let j = 0; j < run.count; j++) {
        const k = run.index + j;
        entries[3 * m] = this.fingerprints[k]!;
        entries[3 * m + 1] = this.signatures[k]!;
        entries[3 * m + 2] = makeRef(imageId, run.start + j);
        if (++m === TABLE_BATCH) { table.insertMany(entries); m = 0; }
      }
    }
    if (m) table.insertMany(entries.subarray(0, 3 * m));
    return table;
  }

  /** Bytes of the map's file (docs/FORMATS.md): header, runs, columns, checksum. */
  get fileBytes(): number {
    return HEADER + 16 * this.runCount + 16 * this.dataBlocks + (this.digests ? Math.ceil(this.digests.length / 8) * 8 : 0) + TRAILER_BYTES;
  }

  /** Writes the map to file atomically: a temporary file, fsync, rename. Never leaves a half-written map. */
  save(file: string, mode?: number): void {
    const header = FORMAT.header();
    header.writeUInt32LE(this.digests ? FLAG_DIGESTS : 0, 12);
    header.writeUInt32LE(this.blockSize, 16);
    header.writeBigUInt64LE(BigInt(this.imageSize), 24);
    header.writeBigUInt64LE(BigInt(this.count), 32);
    header.writeBigUInt64LE(BigInt(this.identity.ino), 40);
    header.writeBigUInt64LE(BigInt(this.identity.dev), 48);
    header.writeBigUInt64LE(mtimeField(this.identity.mtimeNs), 56);
    header.writeBigUInt64LE(BigInt(this.runCount), 64);
    header.writeBigUInt64LE(BigInt(this.dataBlocks), 72);
    const runs = new BigUint64Array(this.dataRuns.length);
    for (let i = 0; i < runs.length; i++) runs[i] = BigInt(this.dataRuns[i]!);
    const parts: Uint8Array[] = [header, bytesOf(runs), bytesOf(this.fingerprints), bytesOf(this.signatures)];
    if (this.digests) parts.push(this.digests, pad8(this.digests.length));
    FORMAT.write(file, parts, mode);
  }

  /** Reads a map written by save(); a damaged file throws a FormatError with a stable code. */
  static load(file: string, imagePath = file.replace(/\.\d+\.bfmap$/, '')): BlockMap {
    return BlockMap.fromBytes(FORMAT.read(file), imagePath);
  }

  static fromBytes(bytes: Uint8Array, imagePath: string): BlockMap {
    const b = FORMAT.open(bytes);
    const flags = b.readUInt32LE(12);
    const blockSize = b.readUInt32LE(16);
    const size = b.readBigUInt64LE(24);
    const count = b.readBigUInt64LE(32);
    const runCount = b.readBigUInt64LE(64);
    const dataBlocks = b.readBigUInt64LE(72);
    // The length first, in bigints: no count from the header is trusted
    // (or used to allocate) before the file is known to hold that much.
    const digestBytes = flags & FLAG_DIGESTS ? ((dataBlocks * BigInt(DIGEST_BYTES) + 7n) / 8n) * 8n : 0n;
    FORMAT.checkLength(b, BigInt(HEADER + TRAILER_BYTES) + 16n * runCount + 16n * dataBlocks + digestBytes);
    FORMAT.checkChecksum(b);
    if (flags & ~FLAG_DIGESTS) throw FORMAT.corrupt(`unknown flags 0x${flags.toString(16)}`);
    try {
      checkBlockSize(blockSize);
    } catch {
      throw FORMAT.corrupt(`invalid block size ${blockSize}`);
    }
    if (size > BigInt(Number.MAX_SAFE_INTEGER) || count !== BigInt(blockCount(Number(size), blockSize))) {
      throw FORMAT.corrupt(`${count} blocks do not cover an image of ${size} bytes at ${blockSize}-byte blocks`);
    }
    if (dataBlocks > count) throw FORMAT.corrupt(`${dataBlocks} non-zero blocks in an image of ${count}`);
    if (runCount > dataBlocks) throw FORMAT.corrupt(`${runCount} runs for ${dataBlocks} non-zero blocks`);
    const n = Number(dataBlocks), r = Number(runCount);
    // Typed arrays need 8-byte alignment: copy the columns out once (fast next to any rescan).
    let at = HEADER;
    const column = (bytes: number) => b.buffer.slice(b.byteOffset + at, b.byteOffset + (at += bytes));
    const rawRuns = new BigUint64Array(column(16 * r));
    const fps = new BigUint64Array(column(8 * n));
    const sigs = new BigUint64Array(column(8 * n));
    const digests = flags & FLAG_DIGESTS ? new Uint8Array(column(n * DIGEST_BYTES)) : undefined;
    const runs = new Float64Array(2 * r);
    for (let i = 0; i < runs.length; i++) {
      if (rawRuns[i]! > BigInt(Number.MAX_SAFE_INTEGER)) throw FORMAT.corrupt(`run ${i >> 1} has a number past 2^53`);
      runs[i] = Number(rawRuns[i]!);
    }
    const why = checkDataRuns(runs, Number(count), n);
    if (why) throw FORMAT.corrupt(why);
    const identity: ImageIdentity = {
      size: Number(size),
      ino: Number(b.readBigUInt64LE(40)),
      dev: Number(b.readBigUInt64LE(48)),
      mtimeNs: b.readBigUInt64LE(56).toString(),
    };
    return new BlockMap(imagePath, identity, blockSize, runs, fps, sigs, digests);
  }
}

/**
 * The name a block map had beside its image (or flattened into dir) before
 * maps became a cache (blockmap/cache.ts). Nothing in blockferry writes
 * there any more; kept for programs that save maps themselves.
 */
export function blockMapPath(imagePath: string, blockSize: number, dir?: string): string {
  if (!dir) return `${imagePath}.${blockSize}.bfmap`;
  const flat = imagePath.replace(/^\/+/, '').replace(/[/\\]/g, '_');
  return `${dir}/${flat}.${blockSize}.bfmap`;
}
