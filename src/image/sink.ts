// Where a destination writes an image. A sink takes writes and zero ranges
// at byte offsets, reads back what it holds (for copies and verification),
// reports its allocated extents (verification skips holes), and becomes the
// named image only on commit. Raw files are the first kind; a qcow2 writer
// or an NBD export of the image in flight implement the same contract.
import { constants, promises as fsp, type Stats } from 'node:fs';
import { rm, rename } from 'node:fs/promises';
import { BlockferryError, ErrorCode, ImageError, isNoSpace } from '../errors.js';
import { chooseBackend } from '../engine/backend.js';
import { checkRegularOrAbsent } from '../io/atomic.js';
import type { NativeAddon } from 'blockferry/native';
import type { Extent } from './source.js';

export interface ImageSink {
  readonly size: number;
  /** Writes data at offset; resolves once the write is under way (it may complete later: see flush). The caller must not change data afterwards. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Makes [offset, offset + length) read as zeros, punching a hole where the file system can. */
  zero(offset: number, length: number): Promise<void>;
  /** Fills buf[0, length) from offset. */
  read(buf: Uint8Array, offset: number, length: number): Promise<void>;
  /** Allocated extents inside a range (a sink that cannot tell returns the whole range). */
  extents(offset: number, length: number): Extent[];
  /** Everything written so far is durable. */
  flush(): Promise<void>;
  /** Durable, then visible under its final name (replacing what was there). The sink is closed. */
  commit(): Promise<void>;
  /** Closes without committing: what was written stays for a resume. */
  close(): Promise<void>;
}

const ZEROS = Buffer.alloc(1 << 20);

/**
 * A raw image written into `partial` and renamed to `final` on commit. Files
 * are opened with O_NOFOLLOW (a link planted at the partial's name is
 * refused, never written through), and a fresh one with O_EXCL.
 */
interface Pending {
  start: number;
  end: number;
  done: Promise<void>;
}

/** Writes in flight at most: 64, and 32 MiB. */
const MAX_PENDING_WRITES = 64;
const MAX_PENDING_BYTES = 32 << 20;

/**
 * Write-behind for a file a sink writes: a write resolves once it is queued
 * (at most MAX_PENDING_WRITES and MAX_PENDING_BYTES in flight), reads and
 * zeroing wait for the writes they overlap (settle), and the first failure
 * is kept and thrown by the next call (check). Raw and qcow2 sinks share it.
 */
export class WriteQueue {
  private readonly pending = new Set<Pending>();
  private bytes = 0;
  failure: Error | undefined;

  constructor(private readonly fh: fsp.FileHandle, private readonly path: string) {}

  /** Throws the first failure of a write behind the caller. */
  check(): void {
    if (this.failure) throw this.failure;
  }

  /** Writes data at position now (the whole of it). */
  async writeNow(position: number, data: Uint8Array): Promise<void> {
    for (let at = 0; at < data.length; ) {
      const { bytesWritten } = await this.fh.write(data, at, data.length - at, position + at);
      at += bytesWritten;
    }
  }

  /** Queues data at position, once the writes it overlaps are done and there is room in flight. The caller must not change data afterwards. */
  async queue(position: number, data: Uint8Array): Promise<void> {
    await this.settle(position, position + data.length);
    while (this.pending.size >= MAX_PENDING_WRITES || (this.pending.size > 0 && this.bytes + data.length > MAX_PENDING_BYTES)) {
      await Promise.race([...this.pending].map((p) => p.done));
    }
    this.check();
    const p: Pending = { start: position, end: position + data.length, done: Promise.resolve() };
    p.done = this.writeNow(position, data)
      .catch((e) => { this.failure ??= ioError(e, this.path, 'write'); })
      .finally(() => { this.pending.delete(p); this.bytes -= data.length; });
    this.pending.add(p);
    this.bytes += data.length;
  }

  /** Waits for the writes in flight that overlap [start, end). */
  async settle(start: number, end: number): Promise<void> {
    for (const p of [...this.pending]) if (p.start < end && start < p.end) await p.done;
  }

  /** Waits for every write in flight (without throwing their failure: check() does). */
  async idle(): Promise<void> {
    while (this.pending.size) await Promise.all([...this.pending].map((p) => p.done));
  }

  /** Waits for every write in flight, then throws the first failure. */
  async drain(): Promise<void> {
    await this.idle();
    this.check();
  }
}

export class FileImageSink implements ImageSink {
  private closed = false;
  private readonly writes: WriteQueue;

  private constructor(
    private readonly fh: fsp.FileHandle,
    readonly size: number,
    readonly partial: string,
    readonly final: string,
    private readonly native: NativeAddon | null,
  ) {
    this.writes = new WriteQueue(fh, partial);
  }

  /** A new, empty (sparse) partial image; an existing partial file is replaced. */
  static async create(partial: string, final: string, size: number, native = chooseBackend().native): Promise<FileImageSink> {
    // A leftover partial file is replaced; a symbolic link (or a directory, a fifo) planted there is refused.
    checkRegularOrAbsent(partial, 'partial image');
    await rm(partial, { force: true });
    const fh = await openChecked(partial, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW);
    try {
      await fh.truncate(size);
    } catch (cause) {
      await fh.close();
      throw new BlockferryError(ErrorCode.WRITE_FAILED, `cannot size ${partial} to ${size} bytes: ${(cause as Error).message}`, { cause });
    }
    return new FileImageSink(fh, size, partial, final, native);
  }

  /** The partial image of an earlier attempt; it must be a regular file of the expected size. */
  static async reopen(partial: string, final: string, size: number, native = chooseBackend().native): Promise<FileImageSink> {
    const fh = await openChecked(partial, constants.O_RDWR | constants.O_NOFOLLOW);
    let st: Stats;
    try {
      st = await fh.stat();
    } catch (cause) {
      await fh.close();
      throw cause;
    }
    if (!st.isFile() || st.size !== size) {
      await fh.close();
      throw new ImageError(ErrorCode.IMAGE_CHANGED, partial, `is not the ${size}-byte partial image of an earlier attempt`);
    }
    return new FileImageSink(fh, size, partial, final, native);
  }

  get fd(): number {
    return this.fh.fd;
  }

  /**
   * Queues a write and returns once it is under way (write-behind): up to
   * MAX_PENDING_BYTES in MAX_PENDING_WRITES writes are in flight on libuv's
   * pool while the caller goes on. The caller must not change `data`
   * afterwards. Writes that overlap one in flight wait for it (order is
   * kept); reads, zeroing and flush wait for what they overlap or for all.
   * A failed write is reported by the next call.
   */
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.writes.check();
    await this.writes.queue(offset, data);
  }

  async zero(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    await this.writes.settle(offset, offset + length);
    this.writes.check();
    if (this.native) {
      this.native.punchHole(this.fh.fd, offset, length);
      return;
    }
    for (let at = 0; at < length; at += ZEROS.length) await this.writes.writeNow(offset + at, ZEROS.subarray(0, Math.min(ZEROS.length, length - at))).catch((e) => { throw ioError(e, this.partial, 'write'); });
  }

  async read(buf: Uint8Array, offset: number, length: number): Promise<void> {
    await this.writes.settle(offset, offset + length);
    this.writes.check();
    for (let at = 0; at < length; ) {
      const { bytesRead } = await this.fh.read(buf, at, length - at, offset + at);
      if (bytesRead === 0) throw new ImageError(ErrorCode.IMAGE_CHANGED, this.partial, `ended at byte ${offset + at}`);
      at += bytesRead;
    }
  }

  extents(offset: number, length: number): Extent[] {
    if (length <= 0) return [];
    if (!this.native) return [{ offset, length }];
    const flat = this.native.extents(this.fh.fd, offset, length);
    const out: Extent[] = [];
    for (let i = 0; i < flat.length; i += 2) out.push({ offset: flat[i]!, length: flat[i + 1]! });
    return out;
  }

  async flush(): Promise<void> {
    await this.writes.drain();
    try {
      await this.fh.sync();
    } catch (e) {
      throw ioError(e, this.partial, 'fsync');
    }
  }

  async commit(): Promise<void> {
    await this.flush();
    await this.close();
    await rename(this.partial, this.final);
  }

  async close(): Promise<void> {
    // Exactly once: a second close could hit a descriptor number another
    // thread has been given meanwhile.
    if (this.closed) return;
    this.closed = true;
    await this.writes.idle();
    await this.fh.close();
  }
}

export async function openChecked(path: string, flags: number): Promise<fsp.FileHandle> {
  try {
    return await fsp.open(path, flags, 0o644);
  } catch (cause) {
    const code = (cause as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw new BlockferryError(ErrorCode.UNSAFE_PATH, `${path} is a symbolic link; refusing to write through it`, { cause });
    if (code === 'EEXIST') throw new BlockferryError(ErrorCode.WRITE_FAILED, `${path} appeared while it was being created`, { cause });
    throw new BlockferryError(ErrorCode.WRITE_FAILED, `cannot open ${path} (${code ?? (cause as Error).message})`, { cause });
  }
}

/** A failed write or fsync: ENOSPC and EDQUOT are NO_SPACE (the journal is kept; free space and resume), the rest WRITE_FAILED. */
export function ioError(e: unknown, path: string, what: string): BlockferryError {
  if (e instanceof BlockferryError) return e;
  if (isNoSpace(e)) return new BlockferryError(ErrorCode.NO_SPACE, `${path}: no space left on the destination's disk (${what})`, { cause: e });
  return new BlockferryError(ErrorCode.WRITE_FAILED, `${path}: ${what} failed: ${(e as Error).message}`, { cause: e });
}
