// An NBD export of a raw image file: what `blockferry export` serves. Every
// operation is an asynchronous file system call (libuv's pool), so a slow
// disk delays only the requests that touch it. Holes are real: block status
// comes from SEEK_DATA/SEEK_HOLE and zeroing punches holes when the native
// addon is loaded; without it the file reads as all data and zeros are
// written out.
import { constants, promises as fsp, type Stats } from 'node:fs';
import { ImageError, ErrorCode, isNoSpace } from '../errors.js';
import { chooseBackend } from '../engine/backend.js';
import type { NativeAddon } from 'blockferry/native';
import { NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP, NBD_STATE_HOLE, NBD_STATE_ZERO, NbdExportError, type NbdExport, type StatusExtent } from './protocol.js';

export interface FileExportOptions {
  /** The export's name (default: the file name without its extension). */
  name?: string;
  description?: string;
  /** Opened read-only; clients cannot write, trim or zero. */
  readOnly?: boolean;
  /** The addon for extents and hole punching (default: chooseBackend's; null: the portable fallbacks). */
  native?: NativeAddon | null;
}

/** Zeros written where a hole cannot be punched, a MiB at a time. */
const ZEROS = Buffer.alloc(1 << 20);

export class FileExport implements NbdExport {
  private closed = false;
  readonly fastZero: boolean;

  private constructor(
    private readonly fh: fsp.FileHandle,
    readonly path: string,
    readonly name: string,
    readonly size: number,
    readonly readOnly: boolean,
    private readonly native: NativeAddon | null,
    readonly description: string | undefined,
  ) {
    // Punching a hole is a metadata change: faster than writing zeros, which is what FAST_ZERO asks.
    this.fastZero = !readOnly && native !== null;
  }

  /** Opens a raw image file (a regular file; its size is fixed while served). */
  static async open(path: string, options: FileExportOptions = {}): Promise<FileExport> {
    const readOnly = !!options.readOnly;
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(path, readOnly ? constants.O_RDONLY : constants.O_RDWR);
    } catch (cause) {
      const code = (cause as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw new ImageError(ErrorCode.IMAGE_NOT_FOUND, path, 'does not exist', { cause });
      if (code === 'EISDIR') throw new ImageError(ErrorCode.NOT_AN_IMAGE, path, 'is a directory, not a raw image file', { cause });
      throw new ImageError(ErrorCode.IMAGE_UNREADABLE, path, `cannot be opened${readOnly ? '' : ' for writing (export it --read-only?)'}: ${code ?? (cause as Error).message}`, { cause });
    }
    let st: Stats;
    try {
      st = await fh.stat();
    } catch (cause) {
      await fh.close();
      throw new ImageError(ErrorCode.IMAGE_UNREADABLE, path, `cannot be examined: ${(cause as Error).message}`, { cause });
    }
    if (!st.isFile()) {
      await fh.close();
      throw new ImageError(ErrorCode.NOT_AN_IMAGE, path, 'is not a regular file');
    }
    const name = options.name ?? path.replace(/^.*\//, '').replace(/\.[^.]*$/, '');
    const native = options.native === undefined ? chooseBackend().native : options.native;
    return new FileExport(fh, path, name, st.size, readOnly, native, options.description);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = Buffer.allocUnsafe(length);
    for (let at = 0; at < length; ) {
      const { bytesRead } = await this.fh.read(buf, at, length - at, offset + at);
      // The file shrank under us: an error, never stale memory sent as data.
      if (bytesRead === 0) throw new NbdExportError(NBD_EIO, `${this.path} ended at byte ${offset + at}`);
      at += bytesRead;
    }
    return buf;
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    try {
      for (let at = 0; at < data.length; ) {
        const { bytesWritten } = await this.fh.write(data, at, data.length - at, offset + at);
        at += bytesWritten;
      }
      if (fua) await this.fh.datasync();
    } catch (e) {
      throw noSpace(e);
    }
  }

  async zero(offset: number, length: number, punch: boolean, fua: boolean, fast = false): Promise<void> {
    if (punch && this.native) {
      this.native.punchHole(this.fh.fd, offset, length);
    } else if (fast) {
      throw new NbdExportError(NBD_ENOTSUP, 'zeroing without a hole means writing zeros: not fast');
    } else {
      await this.writeZeros(offset, length);
    }
    if (fua) await this.flush();
  }

  async trim(offset: number, length: number): Promise<void> {
    if (this.native) this.native.punchHole(this.fh.fd, offset, length);
    else await this.writeZeros(offset, length);
  }

  private async writeZeros(offset: number, length: number): Promise<void> {
    for (let at = 0; at < length; at += ZEROS.length) await this.write(offset + at, ZEROS.subarray(0, Math.min(ZEROS.length, length - at)), false);
  }

  async flush(): Promise<void> {
    try {
      await this.fh.datasync();
    } catch (e) {
      throw noSpace(e);
    }
  }

  /** Data extents from SEEK_DATA/SEEK_HOLE and holes between them (HOLE|ZERO); without the addon, all data. */
  async allocation(offset: number, length: number): Promise<StatusExtent[]> {
    const end = Math.min(offset + length, this.size);
    if (end <= offset) return [];
    if (!this.native) return [{ length: end - offset, flags: 0 }];
    const flat = this.native.extents(this.fh.fd, offset, end - offset);
    const out: StatusExtent[] = [];
    let at = offset;
    for (let i = 0; i < flat.length; i += 2) {
      const start = Math.max(flat[i]!, at);
      const stop = Math.min(flat[i]! + flat[i + 1]!, end);
      if (stop <= start) continue;
      if (start > at) out.push({ length: start - at, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
      out.push({ length: stop - start, flags: 0 });
      at = stop;
    }
    if (at < end) out.push({ length: end - at, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
    return out;
  }

  async close(): Promise<void> {
    // Exactly once: a second close could hit a descriptor number reused meanwhile.
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }
}

/** A full disk or quota is ENOSPC on the wire (the specification asks EDQUOT and EFBIG to be mapped so); the rest goes up as is. */
function noSpace(e: unknown): unknown {
  if (isNoSpace(e) || (e as NodeJS.ErrnoException).code === 'EFBIG') return new NbdExportError(NBD_ENOSPC, 'no space left on the device holding the image');
  return e;
}
