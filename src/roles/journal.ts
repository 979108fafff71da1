import { readFileSync } from 'node:fs';
import { writeFileAtomic } from '../io/atomic.js';
import { TreeChecksum } from '../engine/checksum.js';
import { ErrorCode, FormatError } from '../errors.js';

/** File layout: docs/FORMATS.md, "Migration journal". */
const MAGIC = Buffer.from('BFJOURNL', 'latin1');
const VERSION = 1;
const HEADER = 32;
const WHAT = 'migration journal';

/** Per-block state at the destination. */
export const enum BlockState {
  /** Not known to hold the right data. */
  Unknown = 0,
  /** Written and checked against its fingerprint and signature. */
  Verified = 1,
  /** Known to read as zeros. */
  Zero = 2,
}

/**
 * What the destination knows to be right in a partial image: one state byte
 * and the fingerprint and signature of every verified block. Saved beside the
 * partial image (after the image's data is fsynced), so that a migration run
 * again after a crash or a dropped connection keeps every verified block.
 */
export class Journal {
  constructor(
    readonly size: number,
    readonly blockSize: number,
    readonly state: Uint8Array,
    readonly fps: BigUint64Array,
    readonly sigs: BigUint64Array,
  ) {}

  static fresh(size: number, blockSize: number): Journal {
    const n = Math.ceil(size / blockSize);
    return new Journal(size, blockSize, new Uint8Array(n), new BigUint64Array(n), new BigUint64Array(n));
  }

  get count(): number {
    return this.state.length;
  }

  save(file: string): void {
    const header = Buffer.alloc(HEADER);
    MAGIC.copy(header);
    header.writeUInt32LE(VERSION, 8);
    header.writeUInt32LE(this.blockSize, 12);
    header.writeBigUInt64LE(BigInt(this.size), 16);
    header.writeBigUInt64LE(BigInt(this.count), 24);
    const pad = Buffer.alloc((8 - (this.count % 8)) % 8);
    const parts = [header, this.state, pad, new Uint8Array(this.fps.buffer, this.fps.byteOffset, this.fps.byteLength), new Uint8Array(this.sigs.buffer, this.sigs.byteOffset, this.sigs.byteLength)];
    const sum = new TreeChecksum();
    for (const p of parts) sum.update(p);
    const trailer = Buffer.alloc(8);
    trailer.writeBigUInt64LE(sum.digest());
    parts.push(trailer);
    writeFileAtomic(file, parts, 'journal', 0o600);
  }

  /** The journal at file, or undefined when there is none. A damaged one throws a FormatError. */
  static load(file: string): Journal | undefined {
    let b: Buffer;
    try {
      b = readFileSync(file);
    } catch {
      return undefined;
    }
    if (b.length < HEADER + 8) throw new FormatError(ErrorCode.TRUNCATED, WHAT, 'shorter than its header');
    if (!MAGIC.equals(b.subarray(0, 8))) throw new FormatError(ErrorCode.BAD_MAGIC, WHAT, 'bad magic');
    if (b.readUInt32LE(8) !== VERSION) throw new FormatError(ErrorCode.UNSUPPORTED_VERSION, WHAT, `version ${b.readUInt32LE(8)}`);
    const bs = b.readUInt32LE(12);
    const size = Number(b.readBigUInt64LE(16));
    const n = Number(b.readBigUInt64LE(24));
    const pad = (8 - (n % 8)) % 8;
    if (b.length !== HEADER + n + pad + 16 * n + 8) throw new FormatError(ErrorCode.CORRUPT, WHAT, 'length does not match its header');
    if (new TreeChecksum().update(b.subarray(0, b.length - 8)).digest() !== b.readBigUInt64LE(b.length - 8)) {
      throw new FormatError(ErrorCode.CHECKSUM_MISMATCH, WHAT, 'checksum mismatch');
    }
    const copy = (at: number, len: number) => b.buffer.slice(b.byteOffset + at, b.byteOffset + at + len);
    const state = new Uint8Array(copy(HEADER, n));
    const fps = new BigUint64Array(copy(HEADER + n + pad, 8 * n));
    const sigs = new BigUint64Array(copy(HEADER + n + pad + 8 * n, 8 * n));
    return new Journal(size, bs, state, fps, sigs);
  }
}
