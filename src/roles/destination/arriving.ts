// An image the destination serves before it has arrived (post-copy, paper
// 002; paper 004's post-copy and hybrid). After SWITCH the destination's
// clients (a VM, over NBD) read and write it while the source pushes what is
// still missing. A read of a block that has not arrived asks the source for
// it (PULL: ahead of the push) and waits for that block only; a write makes
// its blocks the destination's (OWNED): the source never overwrites them.
// If the source goes away, reads of missing blocks fail at once with EIO
// (never a hang) until a resumed migration attaches again.
import { IntervalSet, blockCount, type Interval } from '../../blocks/intervals.js';
import { BlockferryError, ErrorCode } from '../../errors.js';
import {
  NBD_EIO, NBD_STATE_HOLE, NBD_STATE_ZERO, NbdExportError, type NbdExport, type StatusExtent,
} from '../../nbd/protocol.js';
import { copyOf } from '../../io/bytes.js';
import type { ImageSink } from '../../image/sink.js';
import type { Extent } from '../../image/source.js';

/** What the image tells the source while a session is attached. */
export interface SourceLink {
  /** Readers wait for these blocks: send them first. */
  pull(list: Interval[]): void;
  /** The destination's clients wrote these blocks: never push them. */
  owned(list: Interval[]): void;
}

interface Waiter {
  start: number;
  count: number;
  resolve: () => void;
  reject: (e: Error) => void;
}

/** Latency of reads that had to wait for blocks from the source. */
export interface DemandStats {
  /** Reads that waited, and the blocks they pulled. */
  reads: number;
  blocks: number;
  /** Milliseconds each waiting read waited (the last 4096). */
  waits: number[];
}

const MAX_WAITS_KEPT = 4096;

export class ArrivingImage implements NbdExport {
  readonly readOnly = false;
  readonly description: string;
  readonly blocks: number;
  /** Blocks whose content here is not the source's yet. */
  readonly stale = new IntervalSet();
  /** Blocks the destination's clients wrote: they are never overwritten by the source. */
  readonly owned = new IntervalSet();
  /** Stale blocks asked for and not yet arrived. */
  private requested = new IntervalSet();
  private readonly waiters = new Set<Waiter>();
  private link: SourceLink | undefined;
  private gone: Error | undefined;
  /** Writes reach the sink one after another: a client's write and a push of the same block never race. */
  private serial: Promise<void> = Promise.resolve();
  /** Owned blocks not yet told to the source (sent together, once per turn of the event loop). */
  private ownedToTell = new IntervalSet();
  private telling = false;
  /** Once the image is complete: the committed image serves every request. */
  private delegate: NbdExport | undefined;
  private completing: Promise<void> | undefined;
  private inFlight = 0;
  private idle: (() => void) | undefined;
  readonly demand: DemandStats = { reads: 0, blocks: 0, waits: [] };

  constructor(
    readonly name: string,
    readonly size: number,
    readonly blockSize: number,
    /** The partial image (its writes are durable once flushed). */
    readonly sink: ImageSink,
    /** Opens the committed image for serving, once it is in place. */
    private readonly openComplete: () => Promise<NbdExport>,
  ) {
    this.blocks = blockCount(size, blockSize);
    this.description = `blockferry: ${name} (arriving)`;
    this.fromSource = {
      size,
      write: (offset, data) => this.sourceWrite(offset, data, false),
      zero: (offset, length) => this.sourceWrite(offset, new Uint8Array(0), true, length),
      read: (buf, offset, length) => this.sink.read(buf, offset, length),
      extents: (offset, length) => this.sink.extents(offset, length),
      flush: () => this.sink.flush(),
      commit: () => this.complete(),
      // The image outlives the session: a lost source leaves it served, waiting for a resume.
      close: async () => {},
    };
  }

  /** True once the source delivered every block the destination's clients did not write. */
  get arrived(): boolean {
    return this.stale.size === 0;
  }

  get sourceGone(): Error | undefined {
    return this.gone;
  }

  /** A session from the source serves this image (again): pulls go to it. */
  attach(link: SourceLink): void {
    this.link = link;
    this.gone = undefined;
    this.requested = new IntervalSet();
    // Readers that waited while the source was away ask again.
    const want = new IntervalSet();
    for (const w of this.waiters) for (const iv of this.stale.within(w.start, w.count)) want.add(iv.start, iv.count);
    if (want.runs) this.ask(want);
    if (this.owned.runs) link.owned([...this.owned]);
  }

  /** The source's session ended before every block arrived: waiting readers fail now, later ones at once. */
  detach(cause: Error): void {
    this.link = undefined;
    this.gone = new BlockferryError(ErrorCode.SOURCE_GONE, `${this.name}: the source went away with ${this.stale.size} blocks still missing (${cause.message}); migrate again to resume`, { cause });
    for (const w of [...this.waiters]) {
      if (this.stale.intersects(w.start, w.count)) {
        this.waiters.delete(w);
        w.reject(this.gone);
      }
    }
  }

  /** The blocks still missing, as intervals (for logs and `partial list`). */
  missing(): Interval[] {
    return [...this.stale];
  }

  // --- The source's side -----------------------------------------------------
  // fromSource (set in the constructor) is the sink the session writes
  // through after SWITCH: blocks the destination's clients own are skipped;
  // the others arrive, and readers waiting for them go on.

  readonly fromSource: ImageSink;

  private async sourceWrite(offset: number, data: Uint8Array, zero: boolean, zeroLength = 0): Promise<void> {
    const bs = this.blockSize;
    const length = zero ? zeroLength : data.length;
    const first = Math.floor(offset / bs);
    const end = Math.ceil((offset + length) / bs);
    await this.serially(async () => {
      // Decided inside the queue: a client write queued earlier has claimed its blocks by now.
      const keep = new IntervalSet();
      keep.add(first, end - first);
      for (const o of this.owned.within(first, end - first)) keep.delete(o.start, o.count);
      for (const iv of keep) {
        const off = iv.start * bs;
        const len = Math.min(offset + length, (iv.start + iv.count) * bs) - off;
        if (zero) await this.sink.zero(off, len);
        else await this.sink.write(off, data.subarray(off - offset, off - offset + len));
        this.arrive(iv.start, iv.count);
      }
    });
  }

  private arrive(start: number, count: number): void {
    this.stale.delete(start, count);
    this.requested.delete(start, count);
    for (const w of [...this.waiters]) {
      if (!this.stale.intersects(w.start, w.count)) {
        this.waiters.delete(w);
        w.resolve();
      }
    }
  }

  // --- The destination's clients (NBD) ---------------------------------------

  /** Waits until blocks [start, start + count) hold the source's content (or this side's own). */
  private async need(start: number, count: number): Promise<void> {
    if (!this.stale.intersects(start, count)) return;
    if (this.gone || !this.link) throw new NbdExportError(NBD_EIO, (this.gone ?? new Error(`${this.name}: no source attached`)).message);
    const want = new IntervalSet();
    for (const iv of this.stale.within(start, count)) want.add(iv.start, iv.count);
    for (const r of this.requested.within(start, count)) want.delete(r.start, r.count);
    const t0 = performance.now();
    this.demand.reads++;
    for (const iv of this.stale.within(start, count)) this.demand.blocks += iv.count;
    const arrived = new Promise<void>((resolve, reject) => this.waiters.add({ start, count, resolve, reject }));
    if (want.runs) this.ask(want);
    try {
      await arrived;
    } catch (e) {
      throw new NbdExportError(NBD_EIO, (e as Error).message);
    }
    if (this.demand.waits.length >= MAX_WAITS_KEPT) this.demand.waits.shift();
    this.demand.waits.push(performance.now() - t0);
  }

  private ask(want: IntervalSet): void {
    for (const iv of want) this.requested.add(iv.start, iv.count);
    this.link?.pull([...want]);
  }

  private blocksOf(offset: number, length: number): { first: number; end: number } {
    return { first: Math.floor(offset / this.blockSize), end: Math.ceil((offset + length) / this.blockSize) };
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    return this.op(async (d) => {
      if (d) return d.read(offset, length);
      const { first, end } = this.blocksOf(offset, length);
      await this.need(first, end - first);
      const buf = Buffer.allocUnsafe(length);
      await this.sink.read(buf, offset, length);
      return buf;
    });
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    const copy = copyOf(data); // the caller may reuse its buffer; the sink writes behind
    await this.op(async (d) => {
      if (d) return d.write!(offset, copy, fua);
      await this.claim(offset, data.length);
      await this.serially(() => this.sink.write(offset, copy));
      if (fua) await this.sink.flush();
    });
  }

  async zero(offset: number, length: number, _punch: boolean, fua: boolean): Promise<void> {
    await this.op(async (d) => {
      if (d) return d.zero!(offset, length, _punch, fua);
      await this.claim(offset, length);
      await this.serially(() => this.sink.zero(offset, length));
      if (fua) await this.sink.flush();
    });
  }

  /** TRIM: the blocks read as zeros afterwards (the safe meaning of "unspecified"). */
  async trim(offset: number, length: number): Promise<void> {
    return this.zero(offset, length, true, false);
  }

  async flush(): Promise<void> {
    await this.op(async (d) => (d ? d.flush!() : this.sink.flush()));
  }

  async allocation(offset: number, length: number): Promise<StatusExtent[]> {
    return this.op(async (d) => {
      if (d) return d.allocation(offset, length);
      const out: StatusExtent[] = [];
      const push = (len: number, flags: number) => {
        const last = out[out.length - 1];
        if (last && last.flags === flags) last.length += len;
        else if (len > 0) out.push({ length: len, flags });
      };
      // Missing blocks are reported as data: what they hold is not known here yet.
      const bs = this.blockSize;
      const stale = this.stale.within(Math.floor(offset / bs), Math.ceil((offset + length) / bs) - Math.floor(offset / bs));
      let at = offset;
      const end = offset + length;
      const known = (to: number) => {
        for (const e of this.sink.extents(at, to - at) as Extent[]) {
          if (e.offset > at) push(e.offset - at, NBD_STATE_HOLE | NBD_STATE_ZERO);
          push(Math.min(e.offset + e.length, to) - Math.max(e.offset, at), 0);
          at = Math.min(e.offset + e.length, to);
        }
        if (at < to) push(to - at, NBD_STATE_HOLE | NBD_STATE_ZERO);
        at = to;
      };
      for (const s of stale) {
        const sOff = Math.max(offset, s.start * bs), sEnd = Math.min(end, (s.start + s.count) * bs);
        if (sOff > at) known(sOff);
        push(sEnd - Math.max(at, sOff), 0);
        at = sEnd;
      }
      if (at < end) known(end);
      return out;
    });
  }

  /**
   * Blocks a client changes become the destination's. A block written only
   * in part must hold the source's content first (read, modify, write).
   */
  private async claim(offset: number, length: number): Promise<void> {
    const { first, end } = this.blocksOf(offset, length);
    const partial = new Set<number>();
    if (offset % this.blockSize !== 0) partial.add(first);
    if ((offset + length) % this.blockSize !== 0 && offset + length < this.size) partial.add(end - 1);
    for (const b of partial) await this.need(b, 1);
    this.owned.add(first, end - first);
    this.arrive(first, end - first);
    this.ownedToTell.add(first, end - first);
    if (!this.telling) {
      this.telling = true;
      setImmediate(() => {
        this.telling = false;
        const list = [...this.ownedToTell];
        this.ownedToTell = new IntervalSet();
        if (list.length) this.link?.owned(list);
      });
    }
  }

  private serially<T>(f: () => Promise<T>): Promise<T> {
    const p = this.serial.then(f);
    this.serial = p.then(() => {}, () => {});
    return p;
  }

  /** Runs a client's request, counted so that completion waits for it; after completion, on the committed image. */
  private async op<T>(f: (d: NbdExport | undefined) => Promise<T>): Promise<T> {
    if (this.completing) await this.completing;
    if (this.delegate) return f(this.delegate);
    this.inFlight++;
    try {
      return await f(undefined);
    } finally {
      if (--this.inFlight === 0) this.idle?.();
    }
  }

  /**
   * Every block is here: the partial image becomes the named image (the
   * sink's commit: durable, renamed) and serving goes on from it. Requests
   * that arrive meanwhile wait; those in flight finish first.
   */
  private async complete(): Promise<void> {
    if (!this.arrived) throw new BlockferryError(ErrorCode.PROTOCOL, `${this.name}: COMMIT with ${this.stale.size} blocks still missing`);
    let release!: () => void;
    this.completing = new Promise<void>((r) => { release = r; });
    try {
      if (this.inFlight > 0) await new Promise<void>((r) => { this.idle = r; });
      this.idle = undefined;
      await this.serial;
      await this.sink.commit();
      this.delegate = await this.openComplete();
    } finally {
      this.completing = undefined;
      release();
    }
  }

  /** True once the committed image serves the requests. */
  get isComplete(): boolean {
    return this.delegate !== undefined;
  }

  /** Stops serving: the service is closing (what was written stays in the partial image). */
  async close(): Promise<void> {
    for (const w of [...this.waiters]) w.reject(new BlockferryError(ErrorCode.CONNECTION, 'the destination is closing'));
    this.waiters.clear();
    if (!this.delegate) await this.sink.close();
    else await (this.delegate as NbdExport & { close?: () => Promise<void> }).close?.();
  }
}
