import { closeSync, fstatSync, openSync, writeSync } from 'node:fs';
import { Bitmap } from '../bitmap/bitmap.js';
import { checkBlockSize } from '../engine/engine.js';
import { InvalidArgumentError } from '../errors.js';
import type { Interval } from '../blocks/intervals.js';

/**
 * An image whose writes go through blockferry: every write sets the bits of
 * the blocks it touches in the dirty bitmap (and counts writes per block, for
 * strategies that order blocks by how hot they are). A migration takes the
 * dirty set at the start of each round; writes made meanwhile land in the
 * next one. This is the exact, cheap way to follow a running VM's disk.
 */
export class TrackedImage {
  readonly size: number;
  readonly blocks: number;
  private fd: number | undefined;
  private dirty: Bitmap;
  /** Writes seen per written block since the image was opened (only blocks written have an entry). */
  readonly writeCounts = new Map<number, number>();
  /** Bytes written through this image since it was opened (the writer's rate, rewrites included). */
  bytesWritten = 0;

  constructor(readonly path: string, readonly blockSize = 4096) {
    checkBlockSize(blockSize);
    this.fd = openSync(path, 'r+');
    this.size = fstatSync(this.fd).size;
    this.blocks = Math.ceil(this.size / blockSize);
    this.dirty = new Bitmap(this.blocks);
  }

  /** Writes data at offset (inside the image) and marks the blocks it touches dirty. */
  write(offset: number, data: Uint8Array): void {
    if (this.fd === undefined) throw new InvalidArgumentError('image', 'an open tracked image', 'a closed one');
    if (!Number.isInteger(offset) || offset < 0 || offset + data.length > this.size) {
      throw new InvalidArgumentError('offset', `a range inside the image's ${this.size} bytes`, `${offset}+${data.length}`);
    }
    if (data.length === 0) return;
    for (let at = 0; at < data.length; ) at += writeSync(this.fd, data, at, data.length - at, offset + at);
    this.bytesWritten += data.length;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + data.length - 1) / this.blockSize);
    this.dirty.setRange(first, last - first + 1);
    for (let b = first; b <= last; b++) this.writeCounts.set(b, (this.writeCounts.get(b) ?? 0) + 1);
  }

  get dirtyCount(): number {
    return this.dirty.count();
  }

  /**
   * Forgets that [start, start + count) is dirty: called right before those
   * blocks are read to be sent, so only writes made after the read make them
   * dirty again (QEMU's lazy clearing of the dirty log does the same). A
   * block written early in a round and sent late is then not sent again.
   */
  clearDirty(start: number, count: number): void {
    this.dirty.clearRange(start, Math.min(count, this.blocks - start));
  }

  /** The dirty blocks as runs, in order, and a clean bitmap for the writes to come. */
  takeDirty(): Interval[] {
    const out = [...this.dirty.allRuns(true)].map((r) => ({ start: r.start, count: r.length }));
    this.dirty.clearRange(0, this.blocks);
    return out;
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}
