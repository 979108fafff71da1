// An NBD export over any ImageSink: what the destination serves a complete
// qcow2 image through (the writer opened in place on NAME.qcow2), where a
// raw image is served by FileExport. Reads, writes, zeroing and flush go
// through the sink; base:allocation is its extents, everything else a hole
// that reads as zeros (true of a standalone image: no backing file).
import { isNoSpace } from '../errors.js';
import { copyOf } from '../io/bytes.js';
import type { ImageSink } from '../image/sink.js';
import { NBD_ENOSPC, NBD_STATE_HOLE, NBD_STATE_ZERO, NbdExportError, type NbdExport, type StatusExtent } from './protocol.js';

export class SinkExport implements NbdExport {
  readonly readOnly = false;
  readonly size: number;

  constructor(
    readonly name: string,
    private readonly sink: ImageSink,
    readonly description?: string,
  ) {
    this.size = sink.size;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = Buffer.allocUnsafe(length);
    await this.sink.read(buf, offset, length);
    return buf;
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    // The server may reuse its buffer; the sink writes behind.
    await noSpace(this.sink.write(offset, copyOf(data)));
    if (fua) await this.flush();
  }

  async zero(offset: number, length: number, _punch: boolean, fua: boolean): Promise<void> {
    await noSpace(this.sink.zero(offset, length));
    if (fua) await this.flush();
  }

  async trim(offset: number, length: number): Promise<void> {
    await noSpace(this.sink.zero(offset, length));
  }

  async flush(): Promise<void> {
    await noSpace(this.sink.flush());
  }

  async allocation(offset: number, length: number): Promise<StatusExtent[]> {
    const end = Math.min(offset + length, this.size);
    const out: StatusExtent[] = [];
    let at = offset;
    for (const x of this.sink.extents(offset, end - offset)) {
      if (x.offset > at) out.push({ length: x.offset - at, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
      const stop = Math.min(end, x.offset + x.length);
      if (stop > Math.max(at, x.offset)) out.push({ length: stop - Math.max(at, x.offset), flags: 0 });
      at = stop;
    }
    if (at < end) out.push({ length: end - at, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
    return out;
  }

  async close(): Promise<void> {
    await this.sink.close();
  }
}

/** A full disk is ENOSPC on the wire. */
async function noSpace<T>(p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (e) {
    if (isNoSpace(e)) throw new NbdExportError(NBD_ENOSPC, 'no space left on the device holding the image');
    throw e;
  }
}
