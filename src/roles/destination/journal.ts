import { closeSync, constants, fstatSync, openSync, readSync } from 'node:fs';
import { FileFormat, TRAILER_BYTES } from '../../io/format.js';
import { BlockferryError, ErrorCode, FormatError } from '../../errors.js';
import { IntervalSet, type Interval } from '../../blocks/intervals.js';

/** File layout: docs/FORMATS.md, "Migration journal". */
const HEADER = 40;
const WHAT = 'migration journal';
const FORMAT = new FileFormat('BFJOURNL', 2, HEADER, WHAT);

/**
 * What the destination knows to be right in a partial image: the intervals
 * of blocks that hold data it received or filled and checked. Everything
 * else reads as zeros (the partial image is sparse; holes are never
 * recorded). Its size follows the number of runs written, so an attempt that
 * received nothing leaves a 48-byte journal. Saved after the image's data is
 * fsynced; a resumed migration re-checks the kept blocks against the
 * source's fingerprints by reading them, so the journal holds no
 * fingerprints at all.
 */
export class Journal {
  constructor(
    readonly size: number,
    readonly blockSize: number,
    readonly written: IntervalSet,
  ) {}

  static fresh(size: number, blockSize: number): Journal {
    return new Journal(size, blockSize, new IntervalSet());
  }

  /** Saves the journal (or, given, a snapshot of the written set taken earlier). */
  save(file: string, written: Iterable<Interval> = this.written): void {
    FORMAT.write(file, this.encode(written), 0o600);
  }

  /** save() on libuv's pool, the event loop free meanwhile (the destination's periodic saves). */
  saveAsync(file: string, written: Iterable<Interval> = this.written): Promise<void> {
    return FORMAT.writeAsync(file, this.encode(written), 0o600);
  }

  private encode(written: Iterable<Interval>): Buffer[] {
    const runs = [...written];
    const header = FORMAT.header();
    header.writeUInt32LE(this.blockSize, 12);
    header.writeBigUInt64LE(BigInt(this.size), 16);
    header.writeBigUInt64LE(BigInt(runs.length), 24);
    const body = Buffer.alloc(16 * runs.length);
    runs.forEach((iv, i) => { body.writeBigUInt64LE(BigInt(iv.start), 16 * i); body.writeBigUInt64LE(BigInt(iv.count), 16 * i + 8); });
    return [header, body];
  }

  /**
   * The journal at file, or undefined when there is none. A damaged one
   * throws a FormatError; a symbolic link (or anything but a regular file)
   * at its name is never followed: UNSAFE_PATH.
   */
  static load(file: string): Journal | undefined {
    const bytes = readNoFollow(file);
    if (!bytes) return undefined;
    const b = FORMAT.open(bytes);
    const bs = b.readUInt32LE(12);
    const size = Number(b.readBigUInt64LE(16));
    const n = b.readBigUInt64LE(24);
    FORMAT.checkLength(b, BigInt(HEADER + TRAILER_BYTES) + 16n * n);
    FORMAT.checkChecksum(b);
    if (!(bs > 0) || !Number.isSafeInteger(size)) throw FORMAT.corrupt(`block size ${bs}, image size ${size}`);
    const blocks = Math.ceil(size / bs);
    const written = new IntervalSet();
    let prevEnd = -1;
    for (let i = 0; i < Number(n); i++) {
      const iv: Interval = { start: Number(b.readBigUInt64LE(HEADER + 16 * i)), count: Number(b.readBigUInt64LE(HEADER + 16 * i + 8)) };
      if (iv.count <= 0 || iv.start <= prevEnd || iv.start + iv.count > blocks) throw new FormatError(ErrorCode.CORRUPT, WHAT, `interval ${iv.start}+${iv.count} out of order or outside the image`);
      prevEnd = iv.start + iv.count;
      written.add(iv.start, iv.count);
    }
    return new Journal(size, bs, written);
  }
}

/** The bytes of a regular file, opened with O_NOFOLLOW; undefined when there is no file. */
function readNoFollow(file: string): Buffer | undefined {
  let fd: number;
  try {
    fd = openSync(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    if (code === 'ELOOP') throw new BlockferryError(ErrorCode.UNSAFE_PATH, `${WHAT} ${file} is a symbolic link; refusing to follow it`, { cause: e });
    throw new BlockferryError(ErrorCode.WRITE_FAILED, `cannot open ${WHAT} ${file}: ${(e as Error).message}`, { cause: e });
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new BlockferryError(ErrorCode.UNSAFE_PATH, `${WHAT} ${file} is not a regular file`);
    // A journal is 48 bytes plus 16 per run; anything near the limit is not one.
    if (st.size > 1 << 30) throw new FormatError(ErrorCode.CORRUPT, WHAT, `${st.size} bytes`);
    const b = Buffer.alloc(st.size);
    for (let at = 0; at < b.length; ) {
      const n = readSync(fd, b, at, b.length - at, at);
      if (n === 0) return b.subarray(0, at);
      at += n;
    }
    return b;
  } finally {
    closeSync(fd);
  }
}
