// One migration into one image: a table from message type to handler, each
// handler checking the message against the session's phase and the image.
// State is kept as intervals (what holds checked data, what the source said
// is data), so memory follows the data received, never the declared size.
import type { Progress } from '../../progress.js';
import { rmSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { Engine } from '../../engine/engine.js';
import { BlockferryError, ErrorCode, ProtocolError, isNoSpace } from '../../errors.js';
import { IntervalSet, blockCount, blockLength, intervalBytes, type Interval } from '../../blocks/intervals.js';
import type { Channel } from '../../protocol/channel.js';
import { Msg, type Frame } from '../../protocol/frame.js';
import {
  BEGIN_OK, BLOCK_INFO, BLOCKS, BLOCKS_DELTA, COMMIT, COPY, DONE, INFO_END, MISSING, NEED, OWNED, PROBE, PROBE_OK, PULL, ROUND, SWITCH, SWITCH_OK, SYNC, SYNC_OK, VERIFY, VERIFY_RESULT, ZERO,
  SG_PLACE, decode, trafficTotal, type BlockInfo, type Done, type VerifyExtent,
} from '../../protocol/messages.js';
import type { GatherFills } from '../intermediary/gather.js';
import type { ImageSink } from '../../image/sink.js';
import type { FillSource } from '../fills.js';
import { Journal } from './journal.js';
import type { ArrivingImage } from './arriving.js';
import { applyDelta } from '../../protocol/delta.js';

/**
 * When the journal is saved during a transfer: a second after the last save
 * once JOURNAL_MIN_BYTES are new, or after JOURNAL_MAX_BYTES. Each save
 * fsyncs the image first, which stalls writing; a killed destination loses
 * about a second of work.
 */
const JOURNAL_INTERVAL_MS = 1000;
const JOURNAL_MIN_BYTES = 4 << 20;
const JOURNAL_MAX_BYTES = 64 << 20;
/** COPY entries whose reads are in flight at once. */
const COPY_BATCH = 32;
/** Bytes read per step when re-checking kept blocks or verifying: bounded work per await. */
const READ_BYTES = 1 << 20;
/** Largest data extent a VERIFY may name (the work one entry costs). */
export const MAX_VERIFY_EXTENT_BYTES = 16 << 20;
/** Entries (zero extents, copies, zero intervals) handled between two turns of the event loop. */
const ENTRIES_PER_TURN = 512;

export interface SessionStats {
  name: string;
  neighbourBlocks: number;
  /** Blocks filled from the base-image repository. */
  repositoryBlocks: number;
  resumedBlocks: number;
  receivedBlocks: number;
  copiedBlocks: number;
  zeroedBlocks: number;
  /** BLOCKS_DELTA entries whose result did not have its fingerprint (a wrong base): left for the end-to-end check. */
  deltaRejected?: number;
  /** Scatter-gather: blocks gathered from intermediaries and the destination's stage. */
  gatheredBlocks?: number;
}

export interface SessionInit {
  name: string;
  size: number;
  blockSize: number;
  sink: ImageSink;
  journal: Journal;
  journalFile: string;
  /** True when the journal (and the partial image) come from an earlier attempt. */
  resumed: boolean;
  fills: FillSource[];
  /** Bytes the data directory can still take (statfs); checked against what BLOCK_INFO announces. */
  freeBytes?: () => number;
  /** Post-copy: the image was already taken over by an earlier attempt, which this one resumes. */
  arriving?: ArrivingImage;
  /** Post-copy: makes the image one the destination serves while it arrives (absent: SWITCH is refused). */
  takeOver?: (sink: ImageSink) => ArrivingImage;
  /** Where the migration stands, at most every PROGRESS_INTERVAL_MS and once at the end (operation 'receive'). */
  onProgress?: (p: Progress) => void;
  /** Each run of a BLOCKS frame as it is written, in arrival order (which blocks crossed, and when). */
  onBlocks?: (start: number, count: number) => void;
}

/** Receive progress is reported at most this often: a frame loop must not pay for a callback per frame. */
const PROGRESS_INTERVAL_MS = 200;

/** info: BLOCK_INFO runs; transfer: blocks after INFO_END; postcopy: after SWITCH, the destination serves the image. */
type Phase = 'info' | 'transfer' | 'postcopy';

export class Session {
  readonly stats: SessionStats;
  private readonly engine = new Engine({ initialBytes: 4 << 20 });
  private readonly bs: number;
  private readonly size: number;
  private readonly blocks: number;
  /** Where blocks are written: the partial image, or after SWITCH the arriving image's view of it for the source. */
  private sink: ImageSink;
  private readonly journal: Journal;
  /** Blocks holding data that was checked (received, filled, copied or kept): the journal's content. */
  private readonly written: IntervalSet;
  /** Blocks the source says hold data (BLOCK_INFO, then BLOCKS, COPY and ZERO as they come). */
  private readonly expected = new IntervalSet();
  private phase: Phase = 'info';
  /** End of the last BLOCK_INFO run: runs come in increasing order. */
  private infoEnd = 0;
  private sinceSave = 0;
  /** A periodic journal save in progress, and the failure of the last one. */
  private saving: Promise<void> | undefined;
  private backgroundFailure: Error | undefined;
  private savedAt = performance.now();
  private readonly handlers: Partial<Record<number, (f: Frame) => Promise<void>>>;
  /**
   * Blocks written (received, copied, filled, zeroed) or found different
   * since a VERIFY extent last passed over them: COMMIT needs none.
   */
  private readonly unchecked = new IntervalSet();
  /** VERIFY requests answered. */
  private verifies = 0;
  /** Bytes NEED asked for, and bytes that arrived (BLOCKS, COPY): what can still arrive is the difference. */
  private askedBytes = 0;
  private arrivedBytes = 0;
  private entries = 0;
  /** Post-copy: blocks the source named MISSING before SWITCH, and the image once taken over. */
  private readonly missing = new IntervalSet();
  private arriving: ArrivingImage | undefined;

  constructor(private readonly ch: Channel, private readonly init: SessionInit) {
    this.bs = init.blockSize;
    this.size = init.size;
    this.blocks = blockCount(init.size, init.blockSize);
    this.sink = init.sink;
    this.journal = init.journal;
    this.written = init.journal.written;
    this.stats = { name: init.name, neighbourBlocks: 0, repositoryBlocks: 0, resumedBlocks: 0, receivedBlocks: 0, copiedBlocks: 0, zeroedBlocks: 0 };
    this.handlers = {
      [Msg.BLOCK_INFO]: (f) => this.blockInfo(decode(BLOCK_INFO, f.payload)),
      [Msg.INFO_END]: (f) => this.infoDone(decode(INFO_END, f.payload)),
      [Msg.BLOCKS]: (f) => this.blocksFrame(f),
      [Msg.COPY]: (f) => this.copies(f),
      [Msg.ZERO]: (f) => this.zeros(f),
      [Msg.BLOCKS_DELTA]: (f) => this.deltas(f),
      [Msg.ROUND]: async (f) => { this.round = decode(ROUND, f.payload).round; this.report(true); },
      [Msg.SYNC]: async (f) => { decode(SYNC, f.payload); await this.saveJournal(); await this.ch.reply(f, SYNC_OK, undefined); },
      [Msg.VERIFY]: async (f) => this.ch.reply(f, VERIFY_RESULT, await this.verify(decode(VERIFY, f.payload))),
      [Msg.MISSING]: async (f) => this.missingFrame(decode(MISSING, f.payload)),
      [Msg.SWITCH]: async (f) => { decode(SWITCH, f.payload); await this.switchOver(f); },
      [Msg.PROBE]: async (f) => { decode(PROBE, f.payload); await this.ch.reply(f, PROBE_OK, undefined); },
      [Msg.SG_PLACE]: async (f) => this.placement(f),
    };
    if (init.arriving) this.phase = 'postcopy';
  }

  /** Runs the session to COMMIT; resolves with its stats once the image is in place. */
  async run(): Promise<SessionStats> {
    try {
      await this.ch.send(BEGIN_OK, { resumed: this.init.resumed, keptBlocks: this.written.size, switched: this.init.arriving !== undefined });
      for (;;) {
        const f = await this.ch.next();
        if (f.type === Msg.COMMIT) {
          decode(COMMIT, f.payload);
          await this.commit();
          this.report(true);
          await this.ch.reply(f, DONE, this.done());
          this.ch.close();
          return this.stats;
        }
        const h = this.handlers[f.type];
        if (!h) throw new ProtocolError(ErrorCode.PROTOCOL, `unexpected message type ${f.type} during a migration`);
        await h(f);
        this.report(false);
      }
    } catch (e) {
      // Keep what was checked: a migration run again resumes from it.
      try { await this.saveJournal(); } catch { /* the disk may be the problem */ }
      // A taken-over image stays served; reads of what is missing fail until a resume.
      if (this.arriving && !this.arriving.isComplete) this.arriving.detach(e as Error);
      throw noSpace(e);
    } finally {
      await this.sink.close();
      for (const fs of this.init.fills) fs.close();
    }
  }

  /** ROUND frames seen: the source's live rounds (the first pass is round 0). */
  private round = 0;
  private readonly startedAt = performance.now();
  private reportedAt = 0;

  /** A receive progress update (throttled unless final): blocks written of the blocks the source said hold data. */
  private report(final: boolean): void {
    const cb = this.init.onProgress;
    if (!cb) return;
    const now = performance.now();
    if (!final && now - this.reportedAt < PROGRESS_INTERVAL_MS) return;
    this.reportedAt = now;
    const elapsed = (now - this.startedAt) / 1000;
    const receivedBytes = trafficTotal(this.ch.received);
    const totalBlocks = Math.max(this.expected.size, this.written.size);
    const doneBlocks = final ? totalBlocks : Math.min(this.written.size, totalBlocks);
    cb({
      operation: 'receive', phase: this.round ? 'rounds' : 'transfer', path: this.init.name, round: this.round,
      done: doneBlocks * this.bs, total: totalBlocks * this.bs, blocksLeft: totalBlocks - doneBlocks,
      receivedBytes, rate: receivedBytes / Math.max(1e-3, elapsed), elapsed,
    });
  }

  private done(): Done {
    const s = this.stats;
    return { neighbour: s.neighbourBlocks, resumed: s.resumedBlocks, received: s.receivedBlocks, copied: s.copiedBlocks, zeroed: s.zeroedBlocks, repository: s.repositoryBlocks };
  }

  private inImage(start: number, count: number, what: string): void {
    if (!(count > 0) || start + count > this.blocks) throw new ProtocolError(ErrorCode.PROTOCOL, `${what} ${start}+${count} outside the image's ${this.blocks} blocks`);
  }

  /** Lets other connections run between bounded steps of a long list. */
  private async step(): Promise<void> {
    if (++this.entries % ENTRIES_PER_TURN === 0) await yieldToLoop();
  }

  /** Blocks changed: they need a passing VERIFY before COMMIT. */
  private touched(start: number, count: number): void {
    this.unchecked.add(start, count);
    // Blocks the destination's clients own were not written by the source (the arriving image skips them).
    if (this.arriving) for (const o of [...this.arriving.owned.within(start, count)]) this.unchecked.delete(o.start, o.count);
  }

  /** Saves the journal now, with everything written so far durable first. */
  private async saveJournal(): Promise<void> {
    await this.saving;
    this.checkBackground();
    await this.sink.flush();
    this.journal.save(this.init.journalFile);
    this.sinceSave = 0;
    this.savedAt = performance.now();
  }

  /**
   * The periodic save runs beside the frame loop: a snapshot of what is
   * written, then fsync (which covers at least the snapshot's writes), then
   * the snapshot is saved. Frames keep being applied meanwhile; one save at a
   * time. A resumed attempt re-reads what the journal lists, so a block
   * changed after its snapshot is found, never trusted.
   */
  private async maybeSaveJournal(): Promise<void> {
    this.checkBackground();
    const due = this.sinceSave >= JOURNAL_MAX_BYTES || (this.sinceSave >= JOURNAL_MIN_BYTES && performance.now() - this.savedAt >= JOURNAL_INTERVAL_MS);
    if (!due || this.saving) return;
    const snapshot = [...this.written];
    this.sinceSave = 0;
    this.savedAt = performance.now();
    this.saving = (async () => {
      await this.sink.flush();
      await this.journal.saveAsync(this.init.journalFile, snapshot);
    })()
      .catch((e: Error) => { this.backgroundFailure ??= e; })
      .finally(() => { this.saving = undefined; });
  }

  private checkBackground(): void {
    if (this.backgroundFailure) throw this.backgroundFailure;
  }

  /** Blocks [start, start + count) must read as zeros: forget them, punch what the file holds there. */
  private async zeroRange(start: number, count: number): Promise<void> {
    const off = start * this.bs;
    const len = intervalBytes(this.size, this.bs, start, count);
    await this.sink.zero(off, len);
    this.written.delete(start, count);
    this.touched(start, count);
  }

  /**
   * Phase 1: one run of non-zero blocks. A resumed attempt keeps the blocks
   * it holds whose bytes still have the source's fingerprint (it reads them:
   * the journal stores no fingerprints); blocks in the gap before the run
   * are zero at the source, so anything there is punched out. The rest is
   * offered to the fill sources, and what they cannot fill is asked for.
   */
  private async blockInfo(m: BlockInfo): Promise<void> {
    if (this.phase !== 'info') throw new ProtocolError(ErrorCode.PROTOCOL, this.phase === 'postcopy' ? 'BLOCK_INFO after SWITCH (a taken-over image resumes with post-copy only)' : 'BLOCK_INFO after INFO_END');
    this.inImage(m.start, m.count, 'BLOCK_INFO');
    if (m.start < this.infoEnd) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCK_INFO ${m.start} overlaps or precedes the previous run (ending at ${this.infoEnd})`);
    if (this.init.resumed && m.start > this.infoEnd) await this.zeroRange(this.infoEnd, m.start - this.infoEnd);
    this.infoEnd = m.start + m.count;
    this.gather?.take(m.start, m.count);
    const missing = new IntervalSet();
    missing.add(m.start, m.count);
    if (this.init.resumed) {
      for (const iv of [...this.written.within(m.start, m.count)]) {
        const kept = await this.keep(iv, m);
        for (const k of kept) { missing.delete(k.start, k.count); this.stats.resumedBlocks += k.count; }
      }
      // Blocks that were written but no longer match are not "written" any more.
      for (const iv of [...missing]) this.written.delete(iv.start, iv.count);
    }
    for (const fs of this.init.fills) {
      if (missing.runs === 0) break;
      const filled = await fs.fill({ start: m.start, fingerprints: m.fingerprints, signatures: m.signatures, missing: [...missing] }, this.fillContext());
      for (const iv of filled) {
        missing.delete(iv.start, iv.count);
        this.written.add(iv.start, iv.count);
        this.touched(iv.start, iv.count);
        if (fs.name === 'repository') this.stats.repositoryBlocks += iv.count;
        else if (fs.name === 'gather') this.stats.gatheredBlocks = (this.stats.gatheredBlocks ?? 0) + iv.count;
        else this.stats.neighbourBlocks += iv.count;
        this.sinceSave += iv.count * this.bs;
      }
    }
    this.expected.add(m.start, m.count);
    this.askedBytes += missing.size * this.bs;
    this.checkSpace();
    await this.ch.send(NEED, { start: m.start, count: m.count, last: false, missing: [...missing] });
    await this.maybeSaveJournal();
  }

  /** The gather fill source, when the migration asked for one (BEGIN's FILL_SCATTER) and this destination offers it. */
  private get gather(): GatherFills | undefined {
    return this.init.fills.find((f) => f.name === 'gather') as GatherFills | undefined;
  }

  /** SG_PLACE: where the next BLOCK_INFO run's blocks are staged; only in the info phase of a scatter-gather migration. */
  private async placement(f: Frame): Promise<void> {
    const m = decode(SG_PLACE, f.payload);
    if (this.phase !== 'info') throw new ProtocolError(ErrorCode.PROTOCOL, 'SG_PLACE after INFO_END');
    const g = this.gather;
    if (!g) throw new ProtocolError(ErrorCode.PROTOCOL, 'SG_PLACE in a migration that is not scatter-gather (or at a destination that does not gather)');
    this.inImage(m.start, m.count, 'SG_PLACE');
    if (m.start < this.infoEnd) throw new ProtocolError(ErrorCode.PROTOCOL, `SG_PLACE ${m.start} precedes the end of the previous run (${this.infoEnd})`);
    g.place(m);
  }

  /** What can still arrive must fit in what the disk has free (sparse images: only announced data counts). */
  private checkSpace(): void {
    if (!this.init.freeBytes) return;
    const coming = this.askedBytes - this.arrivedBytes;
    const free = this.init.freeBytes();
    if (coming > free) {
      throw new BlockferryError(ErrorCode.NO_SPACE, `${this.init.name}: ${coming} bytes of data are still to arrive, but the destination has ${free} bytes free; the journal is kept (free space and migrate again to resume)`);
    }
  }

  private fillContext() {
    return { sink: this.sink, size: this.size, blockSize: this.bs, engine: this.engine };
  }

  /** The blocks of iv (held from an earlier attempt) whose bytes have the fingerprints of m. */
  private async keep(iv: Interval, m: BlockInfo): Promise<IntervalSet> {
    const kept = new IntervalSet();
    const per = Math.max(1, Math.floor(READ_BYTES / this.bs));
    const buf = Buffer.allocUnsafe(per * this.bs);
    for (let s = iv.start; s < iv.start + iv.count; s += per) {
      const n = Math.min(per, iv.start + iv.count - s);
      const len = intervalBytes(this.size, this.bs, s, n);
      await this.sink.read(buf, s * this.bs, len);
      const got = this.engine.fingerprints(buf.subarray(0, len), this.bs);
      for (let i = 0; i < n; i++) {
        const k = s + i - m.start;
        if (got.fingerprints[i] === m.fingerprints[k] && got.signatures[i] === m.signatures[k]) kept.add(s + i);
      }
    }
    return kept;
  }

  private async infoDone(_: void): Promise<void> {
    if (this.phase !== 'info') throw new ProtocolError(ErrorCode.PROTOCOL, this.phase === 'postcopy' ? 'INFO_END after SWITCH' : 'a second INFO_END');
    if (this.gather?.pending) throw new ProtocolError(ErrorCode.PROTOCOL, 'INFO_END with an SG_PLACE that no BLOCK_INFO followed');
    if (this.init.resumed && this.infoEnd < this.blocks) await this.zeroRange(this.infoEnd, this.blocks - this.infoEnd);
    this.phase = 'transfer';
    await this.saveJournal();
    await this.ch.send(NEED, { start: 0, count: 0, last: true, missing: [] });
  }

  /**
   * BLOCKS: every block is checked against its fingerprint before anything
   * of the frame is written; the frame is fingerprinted in one kernel call
   * and each run written with one write.
   */
  private async blocksFrame(f: Frame): Promise<void> {
    const m = decode(BLOCKS, f.payload);
    let bytes = 0;
    const n = m.fingerprints.length;
    let seen = 0;
    for (const iv of m.runs) {
      this.inImage(iv.start, iv.count, 'BLOCKS');
      if (this.phase === 'info' && !this.expected.covers(iv.start, iv.count)) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCKS ${iv.start}+${iv.count} before its BLOCK_INFO`);
      seen += iv.count;
      const len = intervalBytes(this.size, this.bs, iv.start, iv.count);
      if (len < iv.count * this.bs && seen !== n) throw new ProtocolError(ErrorCode.PROTOCOL, 'a short block must come last in a BLOCKS frame');
      bytes += len;
    }
    if (m.data.length !== bytes) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCKS: ${m.data.length} bytes of data for ${n} blocks (${bytes} expected)`);
    const got = this.engine.fingerprints(m.data, this.bs);
    for (let i = 0; i < n; i++) {
      if (got.fingerprints[i] !== m.fingerprints[i]) throw new ProtocolError(ErrorCode.PROTOCOL, `block ${i} of a BLOCKS frame does not match its fingerprint: corrupted in transit`);
    }
    let at = 0;
    for (const iv of m.runs) {
      const len = intervalBytes(this.size, this.bs, iv.start, iv.count);
      await this.sink.write(iv.start * this.bs, m.data.subarray(at, at + len));
      at += len;
      this.written.add(iv.start, iv.count);
      this.expected.add(iv.start, iv.count);
      this.touched(iv.start, iv.count);
      this.init.onBlocks?.(iv.start, iv.count);
    }
    this.stats.receivedBlocks += n;
    this.arrivedBytes += bytes;
    this.sinceSave += bytes;
    await this.maybeSaveJournal();
  }

  /** COPY: dst ← src, where src holds content this migration put there; checked against the fingerprint after the read. */
  private async copies(f: Frame): Promise<void> {
    const list = decode(COPY, f.payload);
    // Reads go out in batches (up to COPY_BATCH at once on the thread pool);
    // a batch ends before an entry that reads a block an earlier entry of it writes.
    for (let i = 0; i < list.length; ) {
      const batch: Array<{ c: (typeof list)[number]; len: number; buf: Buffer | undefined }> = [];
      const dsts = new Set<number>();
      for (; i < list.length && batch.length < COPY_BATCH && !dsts.has(list[i]!.src); i++) {
        const c = list[i]!;
        await this.step();
        this.inImage(c.dst, 1, 'COPY destination');
        this.inImage(c.src, 1, 'COPY source');
        if (this.phase === 'info' && !this.expected.has(c.dst)) throw new ProtocolError(ErrorCode.PROTOCOL, `COPY into ${c.dst} before its BLOCK_INFO`);
        const len = blockLength(this.size, this.bs, c.dst);
        const readable = this.written.has(c.src) && blockLength(this.size, this.bs, c.src) === len;
        batch.push({ c, len, buf: readable ? Buffer.allocUnsafe(len) : undefined });
        dsts.add(c.dst);
      }
      await Promise.all(batch.map((x) => (x.buf ? this.sink.read(x.buf, x.c.src * this.bs, x.len) : undefined)));
      for (const { c, len, buf } of batch) {
        const ok = buf !== undefined && this.engine.fingerprints(buf, this.bs).fingerprints[0] === c.fingerprint;
        if (!ok) {
          // Not what the source believes is here: leave the block unchecked; the end-to-end check finds it.
          this.written.delete(c.dst, 1);
          this.touched(c.dst, 1);
          continue;
        }
        await this.sink.write(c.dst * this.bs, buf);
        this.written.add(c.dst, 1);
        this.expected.add(c.dst, 1);
        this.touched(c.dst, 1);
        this.arrivedBytes += len;
        this.stats.copiedBlocks++;
      }
    }
    this.sinceSave += list.length * this.bs;
    await this.maybeSaveJournal();
  }

  // --- BLOCKS_DELTA (CAP_DELTA) ---------------------------------------------
  /**
   * Re-sent blocks as XOR deltas against what this side holds: read the
   * block, apply the code, write it only if the result has the fingerprint.
   * A wrong base (this side does not hold what the source believes) is
   * handled as a COPY's: the block is left unchecked and not counted as
   * written, so the end-to-end check finds it and the source sends it whole.
   */
  private async deltas(f: Frame): Promise<void> {
    if (this.phase !== 'transfer') throw new ProtocolError(ErrorCode.PROTOCOL, 'BLOCKS_DELTA before INFO_END');
    const m = decode(BLOCKS_DELTA, f.payload);
    const codes: Buffer[] = [];
    let at = 0;
    for (const e of m.entries) {
      this.inImage(e.block, 1, 'BLOCKS_DELTA');
      codes.push(m.codes.subarray(at, at + e.length));
      at += e.length;
    }
    // Reads go out COPY_BATCH at a time (as COPY's do); a batch ends before
    // an entry for a block already in it, so each applies to what the one
    // before wrote.
    for (let i = 0; i < m.entries.length; ) {
      const batch: { e: (typeof m.entries)[number]; code: Buffer; block: Buffer; held: boolean }[] = [];
      const inBatch = new Set<number>();
      for (; i < m.entries.length && batch.length < COPY_BATCH && !inBatch.has(m.entries[i]!.block); i++) {
        const e = m.entries[i]!;
        inBatch.add(e.block);
        // One buffer per entry: the sink writes behind, from it.
        batch.push({ e, code: codes[i]!, block: Buffer.allocUnsafe(blockLength(this.size, this.bs, e.block)), held: this.written.has(e.block) });
      }
      await Promise.all(batch.map((x) => (x.held ? this.sink.read(x.block, x.e.block * this.bs, x.block.length) : undefined)));
      for (const { e, code, block, held } of batch) {
        await this.step();
        let ok = held;
        if (ok) {
          applyDelta(block, code);
          ok = this.engine.fingerprints(block, this.bs).fingerprints[0] === e.fingerprint;
        }
        this.touched(e.block, 1);
        if (!ok) { this.written.delete(e.block, 1); this.stats.deltaRejected = (this.stats.deltaRejected ?? 0) + 1; continue; }
        await this.sink.write(e.block * this.bs, block);
        this.stats.receivedBlocks++;
        this.sinceSave += block.length;
      }
    }
    await this.maybeSaveJournal();
  }
  // --- end BLOCKS_DELTA ------------------------------------------------------

  private async zeros(f: Frame): Promise<void> {
    for (const iv of decode(ZERO, f.payload)) {
      await this.step();
      this.inImage(iv.start, iv.count, 'ZERO');
      await this.zeroRange(iv.start, iv.count);
      this.expected.delete(iv.start, iv.count);
      this.stats.zeroedBlocks += iv.count;
    }
  }

  /**
   * VERIFY: a zero extent passes when this side holds no data there (its
   * own record, no read); a data extent when the SHA-1 of its bytes matches.
   * The bytes are read through the thread pool and hashed in READ_BYTES
   * slices, and long lists yield to the event loop: one VERIFY never holds
   * up other connections for longer than a slice.
   */
  private async verify(list: VerifyExtent[]): Promise<number[]> {
    const bad: number[] = [];
    const buf = Buffer.allocUnsafe(Math.min(READ_BYTES, MAX_VERIFY_EXTENT_BYTES));
    for (let i = 0; i < list.length; i++) {
      await this.step();
      const x = list[i]!;
      this.inImage(x.start, x.count, 'VERIFY extent');
      let ok: boolean;
      // Blocks the destination's clients wrote are theirs: no digest of the source's applies.
      if (this.arriving?.owned.covers(x.start, x.count)) ok = true;
      else if (!x.digest) ok = !this.written.intersects(x.start, x.count);
      else {
        const len = intervalBytes(this.size, this.bs, x.start, x.count);
        if (len > MAX_VERIFY_EXTENT_BYTES) throw new ProtocolError(ErrorCode.PROTOCOL, `VERIFY extent of ${len} bytes (at most ${MAX_VERIFY_EXTENT_BYTES})`);
        ok = this.written.covers(x.start, x.count) && Buffer.from(await this.sha1Of(x.start * this.bs, len, buf)).equals(x.digest);
      }
      if (ok) this.unchecked.delete(x.start, x.count);
      else {
        this.touched(x.start, x.count); // owned blocks in it stay checked: they are the destination's
        bad.push(i);
      }
    }
    this.verifies++;
    return bad;
  }

  private async sha1Of(offset: number, len: number, buf: Buffer): Promise<Buffer> {
    const h = createHash('sha1');
    for (let at = 0; at < len; ) {
      const n = Math.min(buf.length, len - at);
      await this.sink.read(buf, offset + at, n);
      h.update(buf.subarray(0, n));
      at += n;
    }
    return h.digest();
  }

  /** MISSING: blocks whose content here is not the source's; they become the taken-over image's missing blocks. */
  private async missingFrame(list: Interval[]): Promise<void> {
    if (this.phase === 'postcopy') return; // a resumed post-copy: the image's own record of what arrived holds
    for (const iv of list) {
      await this.step();
      this.inImage(iv.start, iv.count, 'MISSING');
      this.missing.add(iv.start, iv.count);
      this.written.delete(iv.start, iv.count);
    }
  }

  /**
   * SWITCH: the source is paused and the destination takes over. The image
   * is served from now on (the service exports it); blocks named MISSING
   * are pulled on demand and pushed in the background. SWITCH_OK lists the
   * blocks the source need not push.
   */
  private async switchOver(f: Frame): Promise<void> {
    if (this.arriving) throw new ProtocolError(ErrorCode.PROTOCOL, 'a second SWITCH');
    let img = this.init.arriving;
    if (!img) {
      if (!this.init.takeOver) throw new ProtocolError(ErrorCode.PROTOCOL, 'SWITCH: this destination does not serve images (post-copy is not offered)');
      img = this.init.takeOver(this.sink);
      for (const iv of this.missing) img.stale.add(iv.start, iv.count);
    }
    this.missing.clear();
    this.arriving = img;
    this.phase = 'postcopy';
    this.sink = img.fromSource;
    const ch = this.ch;
    img.attach({
      pull: (list) => { ch.send(PULL, list).catch(() => {}); },
      owned: (list) => {
        for (const iv of list) { this.written.add(iv.start, iv.count); this.unchecked.delete(iv.start, iv.count); }
        ch.send(OWNED, list).catch(() => {});
      },
    });
    for (const iv of img.owned) { this.written.add(iv.start, iv.count); this.unchecked.delete(iv.start, iv.count); }
    // No journal save here: the switch is the VM's downtime; the periodic saves go on.
    const held = new IntervalSet();
    held.add(0, this.blocks);
    for (const iv of img.stale) held.delete(iv.start, iv.count);
    await this.ch.reply(f, SWITCH_OK, [...held]);
  }

  /**
   * COMMIT: only an image whose every data block is accounted for, and only
   * after the end-to-end check: a VERIFY has been answered, and every block
   * written (or found different) since passed a later VERIFY.
   */
  private async commit(): Promise<void> {
    if (this.phase === 'info') throw new ProtocolError(ErrorCode.PROTOCOL, 'COMMIT before INFO_END');
    if (this.blocks > 0 && this.verifies === 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'COMMIT before any VERIFY: the image was never checked end to end');
    const first = this.unchecked[Symbol.iterator]().next().value as Interval | undefined;
    if (first) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `COMMIT of an unchecked image: blocks from ${first.start} (${this.unchecked.size} in all) were written or differed after the last VERIFY that covered them`);
    }
    if (this.arriving && !this.arriving.arrived) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `COMMIT of an incomplete image: ${this.arriving.stale.size} blocks never arrived`);
    }
    for (const iv of this.arriving ? [] : this.expected) {
      if (!this.written.covers(iv.start, iv.count)) {
        throw new ProtocolError(ErrorCode.PROTOCOL, `COMMIT of an incomplete image: blocks from ${iv.start} were announced and never received`);
      }
    }
    await this.saving; // a periodic save must not write the journal after it is removed
    this.checkBackground();
    await this.sink.commit();
    rmSync(this.init.journalFile, { force: true });
  }
}

/** ENOSPC and EDQUOT from anywhere below (a sink, a fill) as the stable NO_SPACE. */
function noSpace(e: unknown): unknown {
  if (e instanceof BlockferryError) return e;
  if (isNoSpace(e)) return new BlockferryError(ErrorCode.NO_SPACE, `no space left on the destination's disk: ${(e as Error).message}; the journal is kept`, { cause: e });
  return e;
}
