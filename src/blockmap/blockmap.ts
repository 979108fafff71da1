import { readFileSync } from 'node:fs';
import { DIGEST_BYTES, checkBlockSize, blockCount } from '../engine/engine.js';
import { writeFileAtomic } from '../io/atomic.js';
import { TreeChecksum } from '../engine/checksum.js';
import { BlockIndexTable, makeRef } from '../table/table.js';
import { BlockferryError, ErrorCode, FormatError } from '../errors.js';
import type { ImageIdentity } from '../image/source.js';

/** File layout: docs/FORMATS.md, "Block map". */
export const BLOCKMAP_MAGIC = Buffer.from('BFBLKMAP', 'latin1');
export const BLOCKMAP_VERSION = 1;
const HEADER = 64;
const TRAILER = 8;
const FLAG_DIGESTS = 1;
const WHAT = 'block map';

const pad8 = (n: number) => Math.ceil(n / 8) * 8;

export interface BlockMapStats {
  blocks: number;
  zeroBlocks: number;
  nonZeroBlocks: number;
  /** Non-zero blocks with distinct content (fingerprint and signature). */
  distinctBlocks: number;
  /** Non-zero blocks whose content occurs earlier in the same image. */
  duplicateBlocks: number;
}

/**
 * The per-block facts of one image at one block size: zero flag,
 * fingerprint, signature and (optionally) SHA-1 digest. Block i covers bytes
 * [i * blockSize, min(size, (i + 1) * blockSize)): the last block is short
 * when the size is not a multiple, and is hashed over its real length, so it
 * matches only an identical short block. For zero blocks the fingerprint,
 * signature and digest are 0 and mean nothing: check `zero` first.
 */
export class BlockMap {
  constructor(
    readonly imagePath: string,
    readonly identity: ImageIdentity,
    readonly blockSize: number,
    /** 1 for an all-zero block (holes included), else 0. */
    readonly zero: Uint8Array,
    readonly fingerprints: BigUint64Array,
    readonly signatures: BigUint64Array,
    readonly digests: Uint8Array | undefined,
  ) {}

  get imageSize(): number {
    return this.identity.size;
  }

  get count(): number {
    return this.zero.length;
  }

  /** Length of block i in bytes (blockSize, or less for a short last block). */
  blockLength(i: number): number {
    return Math.min(this.blockSize, this.imageSize - i * this.blockSize);
  }

  digest(i: number): Uint8Array | undefined {
    return this.digests?.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
  }

  /** True when this map describes the image as identity says it is now. */
  matches(identity: ImageIdentity): boolean {
    const a = this.identity;
    return a.size === identity.size && a.mtimeNs === identity.mtimeNs && a.ino === identity.ino && a.dev === identity.dev;
  }

  /** Indexes of the non-zero blocks. */
  nonZeroBlocks(): Uint32Array {
    let n = 0;
    for (let i = 0; i < this.count; i++) n += this.zero[i] ? 0 : 1;
    const out = new Uint32Array(n);
    for (let i = 0, k = 0; i < this.count; i++) if (!this.zero[i]) out[k++] = i;
    return out;
  }

  stats(): BlockMapStats {
    const nz = this.nonZeroBlocks();
    const table = this.distinctTable(nz);
    return {
      blocks: this.count,
      zeroBlocks: this.count - nz.length,
      nonZeroBlocks: nz.length,
      distinctBlocks: table.size,
      duplicateBlocks: nz.length - table.size,
    };
  }

  /** A table of the distinct non-zero blocks: (fp, sig) -> (imageId, first block with that content). */
  distinctTable(nonZero = this.nonZeroBlocks(), imageId = 0): BlockIndexTable {
    const table = new BlockIndexTable({ expectedEntries: nonZero.length });
    const batch = 1 << 16;
    const entries = new BigUint64Array(3 * Math.min(batch, nonZero.length));
    for (let k = 0; k < nonZero.length; k += batch) {
      const m = Math.min(batch, nonZero.length - k);
      for (let j = 0; j < m; j++) {
        const b = nonZero[k + j]!;
        entries[3 * j] = this.fingerprints[b]!;
        entries[3 * j + 1] = this.signatures[b]!;
        entries[3 * j + 2] = makeRef(imageId, b);
      }
      table.insertMany(entries.subarray(0, 3 * m));
    }
    return table;
  }

  /** Writes the map to file atomically: a temporary file, fsync, rename. Never leaves a half-written map. */
  save(file: string): void {
    const header = Buffer.alloc(HEADER);
    BLOCKMAP_MAGIC.copy(header, 0);
    header.writeUInt32LE(BLOCKMAP_VERSION, 8);
    header.writeUInt32LE(this.digests ? FLAG_DIGESTS : 0, 12);
    header.writeUInt32LE(this.blockSize, 16);
    header.writeBigUInt64LE(BigInt(this.imageSize), 24);
    header.writeBigUInt64LE(BigInt(this.count), 32);
    header.writeBigUInt64LE(BigInt(this.identity.ino), 40);
    header.writeBigUInt64LE(BigInt(this.identity.dev), 48);
    header.writeBigUInt64LE(BigInt(this.identity.mtimeNs), 56);
    const parts: Uint8Array[] = [
      header,
      this.zero,
      new Uint8Array(pad8(this.count) - this.count),
      new Uint8Array(this.fingerprints.buffer, this.fingerprints.byteOffset, this.fingerprints.byteLength),
      new Uint8Array(this.signatures.buffer, this.signatures.byteOffset, this.signatures.byteLength),
    ];
    if (this.digests) parts.push(this.digests, new Uint8Array(pad8(this.digests.length) - this.digests.length));
    const sum = new TreeChecksum();
    for (const p of parts) sum.update(p);
    const trailer = Buffer.alloc(TRAILER);
    trailer.writeBigUInt64LE(sum.digest());
    parts.push(trailer);
    writeFileAtomic(file, parts, 'block map');
  }

  /** Reads a map written by save(); a damaged file throws a FormatError with a stable code. */
  static load(file: string, imagePath = file.replace(/\.\d+\.bfmap$/, '')): BlockMap {
    let bytes: Buffer;
    try {
      bytes = readFileSync(file);
    } catch (cause) {
      const code = (cause as NodeJS.ErrnoException).code === 'ENOENT' ? ErrorCode.IMAGE_NOT_FOUND : ErrorCode.IMAGE_UNREADABLE;
      throw new BlockferryError(code, `cannot read block map ${file}: ${(cause as Error).message}`, { cause });
    }
    return BlockMap.fromBytes(bytes, imagePath);
  }

  static fromBytes(bytes: Uint8Array, imagePath: string): BlockMap {
    if (bytes.length < HEADER + TRAILER) throw new FormatError(ErrorCode.TRUNCATED, WHAT, `${bytes.length} bytes is shorter than the header`);
    const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
    if (!BLOCKMAP_MAGIC.equals(b.subarray(0, 8))) throw new FormatError(ErrorCode.BAD_MAGIC, WHAT, 'not a blockferry block map (bad magic)');
    const version = b.readUInt32LE(8);
    if (version !== BLOCKMAP_VERSION) throw new FormatError(ErrorCode.UNSUPPORTED_VERSION, WHAT, `format version ${version}; this build reads ${BLOCKMAP_VERSION}`);
    const flags = b.readUInt32LE(12);
    if (flags & ~FLAG_DIGESTS) throw new FormatError(ErrorCode.CORRUPT, WHAT, `unknown flags 0x${flags.toString(16)}`);
    const blockSize = b.readUInt32LE(16);
    try {
      checkBlockSize(blockSize);
    } catch {
      throw new FormatError(ErrorCode.CORRUPT, WHAT, `invalid block size ${blockSize}`);
    }
    const size = Number(b.readBigUInt64LE(24));
    const count = b.readBigUInt64LE(32);
    if (!Number.isSafeInteger(size) || count !== BigInt(blockCount(size, blockSize))) {
      throw new FormatError(ErrorCode.CORRUPT, WHAT, `${count} blocks do not cover an image of ${size} bytes at ${blockSize}-byte blocks`);
    }
    const n = Number(count);
    const digestBytes = flags & FLAG_DIGESTS ? pad8(n * DIGEST_BYTES) : 0;
    const expected = HEADER + pad8(n) + 16 * n + digestBytes + TRAILER;
    if (b.length < expected) throw new FormatError(ErrorCode.TRUNCATED, WHAT, `${b.length} bytes, the header promises ${expected}`);
    if (b.length > expected) throw new FormatError(ErrorCode.CORRUPT, WHAT, `${b.length - expected} bytes after the declared end`);
    const stored = b.readBigUInt64LE(expected - TRAILER);
    if (new TreeChecksum().update(b.subarray(0, expected - TRAILER)).digest() !== stored) {
      throw new FormatError(ErrorCode.CHECKSUM_MISMATCH, WHAT, 'checksum mismatch: the file is damaged');
    }
    // Typed arrays need 8-byte alignment: copy the columns out once (fast next to any rescan).
    let at = HEADER;
    const column = (from: number, bytes: number) => b.buffer.slice(b.byteOffset + from, b.byteOffset + from + bytes);
    const zero = new Uint8Array(column(at, n));
    at += pad8(n);
    const fps = new BigUint64Array(column(at, 8 * n));
    at += 8 * n;
    const sigs = new BigUint64Array(column(at, 8 * n));
    at += 8 * n;
    const digests = flags & FLAG_DIGESTS ? new Uint8Array(column(at, n * DIGEST_BYTES)) : undefined;
    for (let i = 0; i < n; i++) {
      if (zero[i]! > 1) throw new FormatError(ErrorCode.CORRUPT, WHAT, `zero flag of block ${i} is ${zero[i]}`);
    }
    const identity: ImageIdentity = {
      size,
      ino: Number(b.readBigUInt64LE(40)),
      dev: Number(b.readBigUInt64LE(48)),
      mtimeNs: b.readBigUInt64LE(56).toString(),
    };
    return new BlockMap(imagePath, identity, blockSize, zero, fps, sigs, digests);
  }
}

/** Where a block map for imagePath at blockSize lives by default: beside the image, or in dir. */
export function blockMapPath(imagePath: string, blockSize: number, dir?: string): string {
  if (!dir) return `${imagePath}.${blockSize}.bfmap`;
  const flat = imagePath.replace(/^\/+/, '').replace(/[/\\]/g, '_');
  return `${dir}/${flat}.${blockSize}.bfmap`;
}
