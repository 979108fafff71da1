// The destination service: receives migrations into its data directory and
// keeps the block index of the images it holds (its neighbourhood).
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readSync, renameSync, rmSync, ftruncateSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { write as writeCb } from 'node:fs';
import { promisify } from 'node:util';

const writeAt = promisify(writeCb) as (fd: number, buf: Uint8Array, off: number, len: number, pos: number) => Promise<{ bytesWritten: number }>;
import { Engine, DIGEST_BYTES } from '../engine/engine.js';
import { BlockferryError, ErrorCode, ProtocolError } from '../errors.js';
import { Channel } from '../protocol/channel.js';
import { Msg, Reader, Writer } from '../protocol/frame.js';
import { serverHandshake, type AuthOptions } from '../protocol/handshake.js';
import { Neighbourhood } from '../blockindex/neighbourhood.js';
import { NO_REF, refBlock, refImage } from '../table/table.js';
import { Scanner } from '../scan/scanner.js';
import { FileImageSource } from '../image/source.js';
import { BlockState, Journal } from './journal.js';

export const INDEX_FILE = 'neighbourhood.bfidx';
/** Image names: a plain file name, no path, no leading dot. */
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/**
 * When the journal is saved during a transfer: a second after the last save
 * once JOURNAL_MIN_BYTES are new, or after JOURNAL_MAX_BYTES (or 4x the
 * journal's own size, when larger). Each save fsyncs the image first, which
 * stalls writing: every 8 MiB cost a fifth of a loopback copy's time, every
 * second costs little and a killed destination loses about a second of work.
 * (An append-only journal would remove the size bound; the rewrite keeps the
 * format simple for now.)
 */
const JOURNAL_INTERVAL_MS = 1000;
const JOURNAL_MIN_BYTES = 4 << 20;
const JOURNAL_MAX_BYTES = 64 << 20;

export interface DestinationOptions {
  dataDir: string;
  host?: string;
  port?: number;
  auth: AuthOptions;
  /** Block size of the neighbourhood index (migrations must use it). Default 4096. */
  blockSize?: number;
  /** Images to add to the neighbourhood at start. */
  neighbours?: string[];
  log?: (line: string) => void;
}

export interface SessionStats {
  name: string;
  neighbourBlocks: number;
  resumedBlocks: number;
  receivedBlocks: number;
  copiedBlocks: number;
  zeroedBlocks: number;
}

/**
 * Accepts migrations over TCP. One failing migration never stops the
 * service; several may run at once (into different names). An image is only
 * visible under its name once complete and verified: until then it is
 * NAME.img.partial with NAME.img.journal beside it.
 */
export class DestinationService {
  private readonly server: Server;
  private readonly active = new Set<string>();
  private readonly sockets = new Set<Socket>();
  readonly neighbourhood: Neighbourhood;
  private readonly scanner: Scanner;
  readonly completed: SessionStats[] = [];

  private constructor(readonly options: DestinationOptions, neighbourhood: Neighbourhood, scanner: Scanner) {
    this.neighbourhood = neighbourhood;
    this.scanner = scanner;
    this.server = createServer((s) => this.accept(s));
  }

  static async start(options: DestinationOptions): Promise<DestinationService> {
    mkdirSync(options.dataDir, { recursive: true });
    const bs = options.blockSize ?? 4096;
    const indexFile = join(options.dataDir, INDEX_FILE);
    let n = existsSync(indexFile) ? Neighbourhood.load(indexFile) : new Neighbourhood(bs);
    if (n.blockSize !== bs) n = new Neighbourhood(bs);
    const scanner = new Scanner({ workers: 1 });
    for (const p of options.neighbours ?? []) {
      if (n.images.some((i) => i.path === resolve(p))) continue;
      const [map] = await scanner.scan(p, { blockSize: bs });
      n.add(map!);
    }
    n.save(indexFile);
    const svc = new DestinationService(options, n, scanner);
    await new Promise<void>((res, rej) => {
      svc.server.once('error', rej);
      svc.server.listen(options.port ?? 0, options.host ?? '127.0.0.1', () => res());
    });
    return svc;
  }

  get address(): { host: string; port: number } {
    const a = this.server.address() as AddressInfo;
    return { host: a.address, port: a.port };
  }

  private log(line: string): void {
    this.options.log?.(line);
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    const ch = new Channel(socket);
    this.session(ch).catch((e: Error) => {
      const code = e instanceof BlockferryError ? e.code : 'ERR_BF_INTERNAL';
      this.log(`migration from ${socket.remoteAddress} failed: ${code}: ${e.message}`);
      void ch.sendError(code, e.message);
    });
  }

  async close(): Promise<void> {
    await new Promise<void>((res) => {
      this.server.close(() => res());
      for (const s of this.sockets) s.destroy();
    });
    await this.scanner.close();
  }

  private async session(ch: Channel): Promise<void> {
    await serverHandshake(ch, this.options.auth);
    const begin = new Reader((await ch.recv(Msg.BEGIN)).payload, 'BEGIN');
    const name = begin.str();
    const size = begin.u64();
    const bs = begin.u32();
    const strategy = begin.u8();
    const flags = begin.u8();
    begin.end();
    if (!NAME_RE.test(name) || name.includes('..')) throw new BlockferryError(ErrorCode.NAME_INVALID, `image name ${JSON.stringify(name)} is not a plain file name`);
    if (bs !== this.neighbourhood.blockSize) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `this destination works at ${this.neighbourhood.blockSize}-byte blocks, not ${bs}`);
    if (strategy > 1) throw new ProtocolError(ErrorCode.PROTOCOL, `unknown strategy ${strategy}`);
    if (this.active.has(name)) throw new BlockferryError(ErrorCode.BUSY, `a migration into ${name} is already running`);
    const overwrite = (flags & 1) !== 0;
    const final = join(this.options.dataDir, `${name}.img`);
    if (existsSync(final) && !overwrite) throw new BlockferryError(ErrorCode.IMAGE_EXISTS, `${name} exists at the destination (migrate with --overwrite to replace it)`);
    this.active.add(name);
    let stats: SessionStats;
    try {
      stats = await new Session(this, ch, name, size, bs, strategy === 1, final).run();
    } finally {
      this.active.delete(name);
    }
    this.completed.push(stats);
    this.log(`migration into ${name} complete: ${JSON.stringify(stats)}`);
    // After DONE and outside the busy window: indexing is not part of the
    // migration, and the complete image is no longer "being migrated".
    try {
      await this.indexImage(final);
    } catch (e) {
      this.log(`indexing ${final} failed: ${(e as Error).message}`);
    }
  }

  /** Adds a completed image to the neighbourhood and saves the index. */
  async indexImage(path: string): Promise<void> {
    const [map] = await this.scanner.scan(path, { blockSize: this.neighbourhood.blockSize });
    const existing = this.neighbourhood.images.find((i) => i.path === resolve(path));
    if (!existing) this.neighbourhood.add(map!);
    this.neighbourhood.save(join(this.options.dataDir, INDEX_FILE));
  }
}

/** A block the neighbourhood may hold: destination block, neighbour image and block, expected fingerprint and signature. */
interface Hit {
  block: number;
  image: number;
  nb: number;
  fp: bigint;
  sig: bigint;
}

/** Bytes read from a neighbour per run: 1 MiB, like the source's batches. */
const NEIGHBOUR_RUN_BYTES = 1 << 20;

/** One migration into one image. */
class Session {
  private readonly partial: string;
  private readonly journalFile: string;
  private readonly journal: Journal;
  private readonly fd: number;
  private readonly engine = new Engine({ initialBytes: 8 << 20 });
  private readonly fresh: boolean;
  private sinceSave = 0;
  private savedAt = performance.now();
  private closed = false;
  private readonly stats: SessionStats;
  private readonly sources = new Map<number, FileImageSource | null>();

  constructor(
    private readonly svc: DestinationService,
    private readonly ch: Channel,
    name: string,
    private readonly size: number,
    private readonly bs: number,
    private readonly similarity: boolean,
    private readonly final: string,
  ) {
    this.partial = `${final}.partial`;
    this.journalFile = `${final}.journal`;
    this.stats = { name, neighbourBlocks: 0, resumedBlocks: 0, receivedBlocks: 0, copiedBlocks: 0, zeroedBlocks: 0 };
    let j: Journal | undefined;
    try {
      j = existsSync(this.partial) ? Journal.load(this.journalFile) : undefined;
    } catch {
      j = undefined; // a damaged journal: start over, never trust it
    }
    if (j && (j.size !== size || j.blockSize !== bs)) j = undefined;
    this.fresh = !j;
    if (!j) rmSync(this.partial, { force: true });
    this.journal = j ?? Journal.fresh(size, bs);
    this.fd = openSync(this.partial, this.fresh ? 'w+' : 'r+', 0o644);
    if (this.fresh) ftruncateSync(this.fd, size);
  }

  private len(block: number): number {
    return Math.min(this.bs, this.size - block * this.bs);
  }

  async run(): Promise<SessionStats> {
    const ch = this.ch;
    try {
      const verified = this.journal.state.reduce((n, s) => n + (s === BlockState.Verified ? 1 : 0), 0);
      await ch.send(Msg.BEGIN_OK, new Writer().u8(this.fresh ? 0 : 1).u64(verified).done());
      await this.blockInfo();
      for (;;) {
        const f = await ch.recv();
        switch (f.type) {
          case Msg.BLOCKS: await this.blocks(f.payload); break;
          case Msg.COPY: this.copies(f.payload); break;
          case Msg.ZERO: this.zeros(new Reader(f.payload, 'ZERO')); break;
          case Msg.ROUND: break;
          case Msg.SYNC:
            this.saveJournal();
            await ch.send(Msg.SYNC_OK);
            break;
          case Msg.VERIFY: await ch.send(Msg.VERIFY_RESULT, this.verify(f.payload)); break;
          case Msg.COMMIT:
            this.commit();
            await ch.send(Msg.DONE, new Writer().u64(this.stats.neighbourBlocks).u64(this.stats.resumedBlocks).u64(this.stats.receivedBlocks).u64(this.stats.copiedBlocks).u64(this.stats.zeroedBlocks).done());
            ch.close();
            return this.stats;
          default:
            throw new ProtocolError(ErrorCode.PROTOCOL, `unexpected message type ${f.type} during a migration`);
        }
      }
    } catch (e) {
      // Keep what was verified: a migration run again resumes from it.
      try { this.saveJournal(); } catch { /* the disk may be the problem */ }
      throw e;
    } finally {
      // Exactly once: a second close could hit a descriptor number another
      // thread (a scan worker's event loop) has been given meanwhile.
      this.closeImage();
      for (const s of this.sources.values()) s?.close();
    }
  }

  private saveJournal(): void {
    fsyncSync(this.fd);
    this.journal.save(this.journalFile);
    this.sinceSave = 0;
    this.savedAt = performance.now();
  }

  private maybeSaveJournal(): void {
    const due = this.sinceSave >= Math.max(JOURNAL_MAX_BYTES, 4 * 17 * this.journal.count) ||
      (this.sinceSave >= JOURNAL_MIN_BYTES && performance.now() - this.savedAt >= JOURNAL_INTERVAL_MS);
    if (due) this.saveJournal();
  }

  /**
   * Like write(), on libuv's thread pool: while the disk works, the event loop
   * keeps reading the socket (up to the channel's queue limit), so the source
   * is not stalled by the destination's disk. Frames are still applied in
   * order: the session awaits each one.
   */
  private async writeAsync(block: number, data: Uint8Array): Promise<void> {
    for (let at = 0; at < data.length; ) {
      const { bytesWritten } = await writeAt(this.fd, data, at, data.length - at, block * this.bs + at);
      at += bytesWritten;
    }
    this.sinceSave += data.length;
  }

  private write(block: number, data: Uint8Array): void {
    for (let at = 0; at < data.length; ) at += writeSync(this.fd, data, at, data.length - at, block * this.bs + at);
    this.sinceSave += data.length;
  }

  /** Phase 1: the source's fingerprints. Keep what the journal has, fill from neighbours, ask for the rest. */
  private async blockInfo(): Promise<void> {
    const needed = new Uint8Array(this.journal.count);
    const toZero = new Uint8Array(this.journal.count);
    for (;;) {
      const f = await this.ch.recv(Msg.BLOCK_INFO, Msg.INFO_END);
      if (f.type === Msg.INFO_END) break;
      const r = new Reader(f.payload, 'BLOCK_INFO');
      const first = r.u64();
      const count = r.u32();
      if (first + count > this.journal.count) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCK_INFO for blocks ${first}+${count} past the image's ${this.journal.count}`);
      const zero = r.bytes(count);
      const nonZero = zero.reduce((n, z) => n + (z ? 0 : 1), 0);
      const fps = new BigUint64Array(nonZero), sigs = new BigUint64Array(nonZero);
      for (let i = 0; i < nonZero; i++) { fps[i] = r.big(); sigs[i] = r.big(); }
      r.end();
      const refs = this.similarity ? this.svc.neighbourhood.lookupColumns(fps, sigs) : undefined;
      const hits: Hit[] = [];
      let k = 0;
      for (let i = 0; i < count; i++) {
        const b = first + i;
        const st = this.journal.state[b]!;
        if (zero[i]) {
          if (st !== BlockState.Zero && !this.fresh) toZero[b] = 1;
          this.journal.state[b] = BlockState.Zero;
          continue;
        }
        const fp = fps[k]!, sig = sigs[k]!, ref = refs?.[k];
        k++;
        if (st === BlockState.Verified && this.journal.fps[b] === fp && this.journal.sigs[b] === sig) {
          this.stats.resumedBlocks++;
          continue;
        }
        this.journal.state[b] = BlockState.Unknown;
        if (ref !== undefined && ref !== NO_REF) hits.push({ block: b, image: refImage(ref), nb: refBlock(ref), fp, sig });
        else needed[b] = 1;
      }
      this.fillFromNeighbours(hits, needed);
    }
    if (!this.fresh) for (const [b, n] of this.engine.flagRuns(toZero)) this.zeroRange(b, n);
    if (this.sinceSave > 0 || !this.fresh) this.saveJournal();
    const need = this.engine.flagRuns(needed);
    // NEED frames: (first u64, count u32) pairs, 64 Ki intervals a frame; the last frame has flag 1.
    for (let i = 0; i === 0 || i < need.length; i += 65536) {
      const part = need.slice(i, i + 65536);
      const w = new Writer().u8(i + 65536 >= need.length ? 1 : 0).u32(part.length);
      for (const [b, n] of part) w.u64(b).u32(n);
      await this.ch.send(Msg.NEED, w.done());
    }
  }

  private source(id: number): FileImageSource | null {
    let src = this.sources.get(id);
    if (src === undefined) {
      const im = this.svc.neighbourhood.images[id];
      try {
        src = im ? new FileImageSource(im.path) : null;
      } catch {
        src = null; // the neighbour went away: its blocks are just not there
      }
      this.sources.set(id, src);
    }
    return src;
  }

  /**
   * Fills blocks from neighbour images, keeping each only if the data read
   * has the fingerprint and signature the source sent (a stale index or a
   * fingerprint collision never puts a wrong block in place). Runs of
   * consecutive blocks that map to consecutive blocks of one neighbour take
   * one read, one fingerprint call and one write. Blocks that fail go to
   * `needed`.
   */
  private fillFromNeighbours(hits: Hit[], needed: Uint8Array): void {
    const maxRun = Math.max(1, Math.floor(NEIGHBOUR_RUN_BYTES / this.bs));
    for (let i = 0; i < hits.length; ) {
      let j = i + 1;
      const h0 = hits[i]!;
      while (j < hits.length && j - i < maxRun && hits[j]!.block === h0.block + (j - i) && hits[j]!.image === h0.image && hits[j]!.nb === h0.nb + (j - i)) j++;
      const run = hits.slice(i, j);
      i = j;
      const src = this.source(h0.image);
      const len = run.reduce((n, h) => n + this.len(h.block), 0);
      if (!src || h0.nb * this.bs + len > src.size || run.some((h, x) => x < run.length - 1 && this.len(h.block) < this.bs)) {
        for (const h of run) needed[h.block] = 1;
        continue;
      }
      const buf = Buffer.allocUnsafe(len);
      try {
        src.readInto(buf, h0.nb * this.bs, len);
      } catch {
        for (const h of run) needed[h.block] = 1;
        continue;
      }
      const got = this.engine.fingerprints(buf, this.bs);
      let allGood = true;
      run.forEach((h, x) => {
        if (got.fingerprints[x] !== h.fp || got.signatures[x] !== h.sig) { allGood = false; needed[h.block] = 1; }
      });
      run.forEach((h, x) => {
        if (needed[h.block]) return;
        if (!allGood) this.write(h.block, buf.subarray(x * this.bs, x * this.bs + this.len(h.block)));
        this.journal.state[h.block] = BlockState.Verified;
        this.journal.fps[h.block] = h.fp;
        this.journal.sigs[h.block] = h.sig;
        this.stats.neighbourBlocks++;
      });
      if (allGood) this.write(h0.block, buf);
    }
    this.maybeSaveJournal();
  }

  /**
   * BLOCKS: count u32, (block u64, fp u64) per block, then the blocks' data.
   * Every block is checked against its fingerprint before anything of the
   * frame is written; the frame is fingerprinted in one kernel call and each
   * run of consecutive blocks written with one pwrite.
   */
  private async blocks(payload: Buffer): Promise<void> {
    const r = new Reader(payload, 'BLOCKS');
    const count = r.u32();
    if (count > 65536) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCKS with ${count} blocks`);
    const ids: number[] = [], fps: bigint[] = [];
    let bytes = 0;
    for (let i = 0; i < count; i++) {
      const b = r.u64();
      if (b >= this.journal.count) throw new ProtocolError(ErrorCode.PROTOCOL, `block ${b} is past the end of the image`);
      ids.push(b);
      fps.push(r.big());
      const len = this.len(b);
      if (len < this.bs && i !== count - 1) throw new ProtocolError(ErrorCode.PROTOCOL, 'a short block must come last in a BLOCKS frame');
      bytes += len;
    }
    const data = r.bytes(bytes);
    r.end();
    const got = this.engine.fingerprints(data, this.bs);
    for (let i = 0; i < count; i++) {
      if (got.fingerprints[i] !== fps[i]) throw new ProtocolError(ErrorCode.PROTOCOL, `block ${ids[i]} does not match its fingerprint: corrupted in transit`);
    }
    for (let i = 0; i < count; ) {
      let j = i + 1;
      while (j < count && ids[j] === ids[j - 1]! + 1) j++;
      await this.writeAsync(ids[i]!, data.subarray(i * this.bs, Math.min(data.length, j * this.bs)));
      for (let k = i; k < j; k++) {
        const b = ids[k]!;
        this.journal.state[b] = BlockState.Verified;
        this.journal.fps[b] = got.fingerprints[k]!;
        this.journal.sigs[b] = got.signatures[k]!;
      }
      i = j;
    }
    this.stats.receivedBlocks += count;
    this.maybeSaveJournal();
  }

  /** COPY: count u32, (dst u64, src u64, fp u64) each: the source already sent src's content. */
  private copies(payload: Buffer): void {
    const r = new Reader(payload, 'COPY');
    const count = r.u32();
    const buf = Buffer.allocUnsafe(this.bs);
    for (let i = 0; i < count; i++) {
      const dst = r.u64(), src = r.u64(), fp = r.big();
      if (dst >= this.journal.count || src >= this.journal.count) throw new ProtocolError(ErrorCode.PROTOCOL, `COPY ${src} -> ${dst} outside the image`);
      const len = this.len(dst);
      if (this.journal.state[src] !== BlockState.Verified || this.journal.fps[src] !== fp || this.len(src) !== len) {
        this.journal.state[dst] = BlockState.Unknown; // the end-to-end check will find it and the source resend it
        continue;
      }
      readSync(this.fd, buf, 0, len, src * this.bs);
      this.write(dst, buf.subarray(0, len));
      this.journal.state[dst] = BlockState.Verified;
      this.journal.fps[dst] = fp;
      this.journal.sigs[dst] = this.journal.sigs[src]!;
      this.stats.copiedBlocks++;
    }
    r.end();
  }

  /** ZERO: count u32, (first u64, count u32) intervals that must read as zeros. */
  private zeros(r: Reader): void {
    const count = r.u32();
    for (let i = 0; i < count; i++) {
      const first = r.u64(), n = r.u32();
      if (first + n > this.journal.count) throw new ProtocolError(ErrorCode.PROTOCOL, `ZERO ${first}+${n} outside the image`);
      this.zeroRange(first, n);
      this.journal.state.fill(BlockState.Zero, first, first + n);
    }
    r.end();
  }

  private zeroRange(first: number, n: number): void {
    const off = first * this.bs;
    const len = Math.min(n * this.bs, this.size - off);
    const native = this.engine.backend.native;
    if (native) {
      native.punchHole(this.fd, off, len);
    } else {
      const z = Buffer.alloc(Math.min(len, 1 << 20));
      for (let at = 0; at < len; at += z.length) writeSync(this.fd, z, 0, Math.min(z.length, len - at), off + at);
    }
    this.stats.zeroedBlocks += n;
  }

  /**
   * VERIFY: first u32 (extent index), extentBlocks u32, count u32, then per
   * extent a kind byte (0 = all zero, 1 = data) and for data its SHA-1.
   * Answer: VERIFY_RESULT with the indexes of the extents that differ.
   */
  private verify(payload: Buffer): Buffer {
    const r = new Reader(payload, 'VERIFY');
    const first = r.u32(), per = r.u32(), count = r.u32();
    if (per === 0 || per > 65536) throw new ProtocolError(ErrorCode.PROTOCOL, `VERIFY extent of ${per} blocks`);
    const bad: number[] = [];
    const buf = Buffer.allocUnsafe(per * this.bs);
    if (ZEROS.length < buf.length) ZEROS = Buffer.alloc(buf.length);
    for (let i = 0; i < count; i++) {
      const e = first + i;
      const kind = r.u8();
      const digest = kind === 1 ? r.bytes(DIGEST_BYTES) : undefined;
      const off = e * per * this.bs;
      const len = Math.min(per * this.bs, this.size - off);
      if (len <= 0) throw new ProtocolError(ErrorCode.PROTOCOL, `VERIFY extent ${e} outside the image`);
      const data = buf.subarray(0, len);
      for (let at = 0; at < len; ) at += readSync(this.fd, data, at, len - at, off + at);
      const ok = digest ? Buffer.from(this.engine.sha1(data)).equals(digest) : data.equals(ZEROS.subarray(0, len));
      if (!ok) bad.push(e);
    }
    r.end();
    const w = new Writer().u32(bad.length);
    for (const e of bad) w.u32(e);
    return w.done();
  }

  private closeImage(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
  }

  private commit(): void {
    fsyncSync(this.fd);
    this.closeImage();
    renameSync(this.partial, this.final);
    rmSync(this.journalFile, { force: true });
  }
}

let ZEROS = Buffer.alloc(1 << 20);
