// The frame every blockferry file shares (docs/FORMATS.md): 8 magic bytes, a
// u32 format version at offset 8, the format's own header fields, its
// content, and an 8-byte tree checksum of everything before it. One place
// writes and checks that frame, with the stable FormatError codes, so a new
// format (the migration journal, say) declares its magic and version and
// deals only with its own fields.
import { readFileSync } from 'node:fs';
import { TreeChecksum } from '../engine/checksum.js';
import { writeFileAtomic, writeFileAtomicAsync } from './atomic.js';
import { BlockferryError, ErrorCode, FormatError } from '../errors.js';

/** Bytes of the checksum trailer. */
export const TRAILER_BYTES = 8;

export class FileFormat {
  readonly magic: Buffer;

  /**
   * @param magic 8 ASCII bytes
   * @param version the one version this build writes and reads
   * @param headerBytes the fixed header, magic and version included
   * @param what what the file is, for messages ("block map")
   */
  constructor(magic: string, readonly version: number, readonly headerBytes: number, readonly what: string) {
    this.magic = Buffer.from(magic, 'latin1');
    if (this.magic.length !== 8) throw new Error(`magic must be 8 bytes: ${magic}`);
    if (headerBytes < 12) throw new Error('a header holds at least magic and version');
  }

  /** A zeroed header with magic and version in place; the caller fills its own fields. */
  header(): Buffer {
    const h = Buffer.alloc(this.headerBytes);
    this.magic.copy(h, 0);
    h.writeUInt32LE(this.version, 8);
    return h;
  }

  /** The checksum trailer for content given in parts. */
  trailer(parts: Iterable<Uint8Array>): Buffer {
    const sum = new TreeChecksum();
    for (const p of parts) sum.update(p);
    const t = Buffer.alloc(TRAILER_BYTES);
    t.writeBigUInt64LE(sum.digest());
    return t;
  }

  /** Writes header and content parts plus the trailer atomically (temporary file, fsync, rename). */
  write(file: string, parts: Uint8Array[], mode?: number): void {
    writeFileAtomic(file, [...parts, this.trailer(parts)], this.what, mode);
  }

  /** write() without blocking the event loop. */
  writeAsync(file: string, parts: Uint8Array[], mode?: number): Promise<void> {
    return writeFileAtomicAsync(file, [...parts, this.trailer(parts)], this.what, mode);
  }

  /** Reads a whole file; a missing or unreadable one is FILE_NOT_FOUND or FILE_UNREADABLE. */
  read(file: string): Buffer {
    try {
      return readFileSync(file);
    } catch (cause) {
      const code = (cause as NodeJS.ErrnoException).code === 'ENOENT' ? ErrorCode.FILE_NOT_FOUND : ErrorCode.FILE_UNREADABLE;
      throw new BlockferryError(code, `cannot read ${this.what} ${file}: ${(cause as Error).message}`, { cause });
    }
  }

  /**
   * Checks what can be checked before any field is trusted: room for the
   * header and the trailer, the magic, the version. Returns a Buffer view of
   * the bytes (no copy) for reading the header fields.
   */
  open(bytes: Uint8Array): Buffer {
    if (bytes.length < this.headerBytes + TRAILER_BYTES) {
      throw new FormatError(ErrorCode.TRUNCATED, this.what, `${bytes.length} bytes is shorter than the ${this.headerBytes + TRAILER_BYTES}-byte header and checksum`);
    }
    const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
    if (!this.magic.equals(b.subarray(0, 8))) throw new FormatError(ErrorCode.BAD_MAGIC, this.what, `not a blockferry ${this.what} (bad magic)`);
    const version = b.readUInt32LE(8);
    if (version !== this.version) {
      throw new FormatError(ErrorCode.UNSUPPORTED_VERSION, this.what, `format version ${version}; this build reads version ${this.version}`);
    }
    return b;
  }

  /**
   * Checks the length the header declares (trailer included) against the
   * bytes present. Call it before allocating anything the header sizes: a
   * hostile count then fails here, not in an allocation. Declared sizes may
   * be bigints (u64 fields) so that no product overflows.
   */
  checkLength(b: Uint8Array, expected: bigint | number): void {
    const want = BigInt(expected);
    const have = BigInt(b.length);
    if (want > have) throw new FormatError(ErrorCode.TRUNCATED, this.what, `${have} bytes, the header promises ${want}`);
    if (want < have) throw new FormatError(ErrorCode.CORRUPT, this.what, `${have - want} bytes after the declared end`);
  }

  /** Checks the trailer against everything before it. */
  checkChecksum(b: Uint8Array): void {
    const end = b.length - TRAILER_BYTES;
    const stored = Buffer.from(b.buffer, b.byteOffset + end, TRAILER_BYTES).readBigUInt64LE(0);
    if (new TreeChecksum().update(b.subarray(0, end)).digest() !== stored) {
      throw new FormatError(ErrorCode.CHECKSUM_MISMATCH, this.what, 'checksum mismatch: the file is damaged');
    }
  }

  /** A FormatError CORRUPT about this format. */
  corrupt(detail: string): FormatError {
    return new FormatError(ErrorCode.CORRUPT, this.what, detail);
  }
}

/** Zero bytes that pad n up to a multiple of 8. */
export function pad8(n: number): Uint8Array {
  return new Uint8Array((8 - (n % 8)) % 8);
}

/** n rounded up to a multiple of 8. */
export const align8 = (n: number): number => Math.ceil(n / 8) * 8;

/** The bytes of a typed array, without a copy. */
export function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}
