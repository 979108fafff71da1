// The destination service: receives migrations into its data directory and
// keeps the block index of the images it holds (its neighbourhood).
import type { Socket } from 'node:net';
import { closeSync, constants as fsc, existsSync, lstatSync, mkdirSync, openSync, rmSync, statfsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { BlockferryError, ErrorCode, InvalidArgumentError, ProtocolError, checkAborted } from '../../errors.js';
import type { Interval } from '../../blocks/intervals.js';
import { escapeForLog } from '../../util/sanitize.js';
import { DEFAULT_PARTIAL_TTL_MS, NAME_RE, prunePartials } from './partials.js';
import { Channel } from '../../protocol/channel.js';
import { CAPABILITIES, CAP_SNAPMIG, CAP_ZSTD, serverHandshake, type AuthOptions } from '../../protocol/handshake.js';
import { serverTls, securityFrom, type ServerTls, type TlsOptions } from '../../transport/tls.js';
import { BEGIN, BEGIN_OVERWRITE, decode, type Begin } from '../../protocol/messages.js';
import { Msg, msgName } from '../../protocol/frame.js';
import { isChainLayer, serveChain } from './chain.js';
import { ContentStore } from '../intermediary/store.js';
import { GatherPool } from '../intermediary/gather.js';
import { newStoreStats, serveStore } from '../intermediary/serve.js';
import { listen, parseTarget, type Listener } from '../../transport/tcp.js';
import { Neighbourhood } from '../../blockindex/neighbourhood.js';
import { Scanner } from '../../scan/scanner.js';
import { specFor } from '../../image/source.js';
import type { ImageSink } from '../../image/sink.js';
import { IMAGE_EXTENSION, OUTPUT_FORMATS, imageFiles, openExport, openSink, type ImageFiles, type OutputFormat } from './image-files.js';
import { FILL_SOURCES, type FillSource } from '../fills.js';
import { Gate, type ListenOptions } from '../gate.js';
import type { RepositoryLink } from '../repository/fills.js';
import { serviceLogger, type Logger } from '../../log.js';
import type { Progress } from '../../progress.js';
import { closeOnAbort, type Role } from '../role.js';
import { Journal } from './journal.js';
import { Session, type SessionStats } from './session.js';
import { ArrivingImage } from './arriving.js';
import type { NbdExport } from '../../nbd/protocol.js';
import { NbdServer, type NbdAddress } from '../../nbd/server.js';
import { readdirSync } from 'node:fs';
import { compressorFor, decompressorFor } from '../../protocol/compression.js';

export type { SessionStats } from './session.js';

export const INDEX_FILE = 'neighbourhood.bfidx';
/** Defaults of the limits (docs/PROTOCOL.md, "Limits"). */
export const DEFAULT_IDLE_TIMEOUT_MS = 60_000;
export const DEFAULT_TAKEOVER_GRACE_MS = 5_000;

export interface DestinationOptions extends ListenOptions {
  dataDir: string;
  /** Milliseconds a connection has to authenticate (TLS and the protocol's handshake) before it is closed. Default 5000. */
  handshakeTimeout?: number;
  /** Connections not yet authenticated, at most, from one remote address (default 8) and in total (default 64); beyond, new ones are closed at once. */
  maxUnauthenticatedPerAddress?: number;
  maxUnauthenticated?: number;
  /** Block size of the neighbourhood index (migrations must use it). Default 4096. */
  blockSize?: number;
  /** Images to add to the neighbourhood at start. */
  neighbours?: string[];
  /** Accept compressed frames (default true). */
  compression?: boolean;
  /** Where the service logs (levels and fields; a pino logger works). Default: nowhere. */
  logger?: Logger;
  /** Older form: each entry as one line of text. Ignored when logger is given. */
  log?: (line: string) => void;
  /** Largest image (declared size, bytes) a migration may bring: larger ones are refused with ERR_BF_IMAGE_TOO_LARGE. Default: no limit. */
  maxImageSize?: number;
  /** Bytes of the data directory's file system to leave free: data that would eat into them is refused (ERR_BF_NO_SPACE). Default 0. */
  reserveBytes?: number;
  /** A connection that sends nothing for this long while the service waits for it ends with ERR_BF_TIMEOUT (ms; 0: never). Default 60 s. */
  idleTimeout?: number;
  /** A new attempt at a name takes it over from a session whose peer has been silent this long (ms). Default 5 s. */
  takeoverGrace?: number;
  /** Partial images and journals untouched this long are removed (ms; 0: never). Default 7 days. */
  partialTtl?: number;
  /**
   * Serve the images over NBD here (TCP or a Unix socket): complete ones, and
   * those a post-copy took over while they arrive. Default: no NBD.
   */
  nbd?: NbdAddress;
  /**
   * A base-image repository (`serve --role repository`) to fill from, HOST:PORT,
   * asked after the neighbours when a migration's strategy allows it
   * (FILL_REPOSITORY). Authenticated like this service's own clients (its key
   * or certificates) unless auth/tls are given here.
   */
  repository?: { to: string; auth?: AuthOptions; tls?: TlsOptions; timeout?: number };
  /**
   * Stops the service when aborted, as close() does: running migrations
   * save their journals (their sources can resume them later) and every
   * socket and worker is released. Aborted during start(), start() rejects
   * with an AbortError (ERR_BF_ABORTED).
   */
  signal?: AbortSignal;
  /** Each running migration's progress (operation 'receive'), at most every 200 ms and once when it completes. */
  onProgress?: (p: Progress) => void;
  /** Each run of blocks a migration's BLOCKS frames carry, by image, in arrival order (tests and traces: which blocks crossed, in which order). */
  onBlocks?: (image: string, start: number, count: number) => void;
  /**
   * What received images are written as: 'raw' (NAME.img, the default) or
   * 'qcow2' (NAME.qcow2: a standalone qcow2 v3 image, src/image/qcow2-writer.ts).
   * With `nbd`, qcow2 images are served through the writer (SinkExport),
   * while they arrive (post-copy) and once complete.
   */
  imageFormat?: OutputFormat;
  /**
   * Scatter-gather: the stage, a content store in DATA_DIR/stage that sources
   * STASH blocks into directly (default capacity 1 GiB; false: none, and no
   * gathering), and the rate at which the destination gathers from
   * intermediaries (bytes per second, 0: unlimited).
   */
  stage?: { capacity: number; memoryBytes?: number } | false;
  gatherBwlimit?: number;
}

/** Default capacity of a destination's stage: 1 GiB. */
export const DEFAULT_STAGE_CAPACITY = 1 << 30;

/** An image the destination took over (post-copy): served while it arrives, and after. */
interface Taken {
  image: ArrivingImage;
  journal: Journal;
  journalFile: string;
}

interface ActiveSession {
  ch: Channel;
  /** Settles once the session has saved its journal and released the name. */
  done: Promise<void>;
}

/**
 * Accepts migrations over TCP. One failing migration never stops the
 * service; several may run at once (into different names). An image is only
 * visible under its name once complete and verified: until then it is
 * NAME.img.partial with NAME.img.journal beside it.
 */
export class DestinationService implements Role {
  readonly name = 'destination';
  private listener: Listener | undefined;
  private readonly active = new Map<string, ActiveSession>();
  /** Images taken over by a post-copy, by name: served over NBD while they arrive and after. */
  private readonly taken = new Map<string, Taken>();
  /** Complete images served over NBD (with options.nbd), by name. */
  private readonly served = new Map<string, NbdExport & { close(): Promise<void> }>();
  private nbd: NbdServer | undefined;
  private pruneTimer: NodeJS.Timeout | undefined;
  private free: { at: number; bytes: number } | undefined;
  readonly neighbourhood: Neighbourhood;
  private readonly scanner: Scanner;
  readonly completed: SessionStats[] = [];
  private indexing: Promise<void> = Promise.resolve();
  private readonly gate: Gate;
  private readonly repository: RepositoryLink | undefined;
  /** Scatter-gather: the stage (STASH from sources) and the gather's connections to intermediaries. */
  readonly stage: ContentStore | undefined;
  readonly gatherPool: GatherPool | undefined;
  readonly stageStats = newStoreStats();

  private constructor(readonly options: DestinationOptions, neighbourhood: Neighbourhood, scanner: Scanner, tls: ServerTls | undefined) {
    this.neighbourhood = neighbourhood;
    this.scanner = scanner;
    this.logger = serviceLogger(options, { role: 'destination' });
    this.gate = new Gate(options, tls, this.logger, 'migration');
    const r = options.repository;
    this.repository = r && {
      to: r.to, auth: r.auth ?? options.auth, ...(r.tls ?? options.tls ? { tls: (r.tls ?? options.tls)! } : {}), ...(r.timeout !== undefined ? { timeout: r.timeout } : {}),
      logger: this.logger.child({ repository: r.to }), state: { down: false },
    };
    if (options.stage !== false) {
      const st = options.stage ?? { capacity: DEFAULT_STAGE_CAPACITY };
      this.stage = ContentStore.open(join(options.dataDir, 'stage'), st);
      this.gatherPool = new GatherPool({
        auth: options.auth, ...(options.tls ? { tls: options.tls } : {}), stage: this.stage, bwlimit: options.gatherBwlimit ?? 0, log: (l) => this.logger.warn(l),
      });
    }
  }

  /** The open connections (tests drop them to play a failing network). */
  get sockets(): ReadonlySet<Socket> {
    return this.gate.sockets;
  }

  /** Connections closed by the limits before authentication: over a cap, or past the handshake deadline. */
  get limited(): { overCap: number; deadline: number } {
    return this.gate.limited;
  }

  static async start(options: DestinationOptions): Promise<DestinationService> {
    const signal = options.signal;
    checkAborted(signal, 'destination service');
    checkDataDir(options.dataDir);
    const security = securityFrom(options.auth, options.tls);
    const tls = security.mode === 'insecure' ? undefined : serverTls(security);
    for (const k of ['handshakeTimeout', 'maxUnauthenticatedPerAddress', 'maxUnauthenticated'] as const) {
      const v = options[k];
      if (v !== undefined && !(Number.isSafeInteger(v) && v >= 1)) throw new InvalidArgumentError(k, 'a positive integer', v);
    }
    const fmt = options.imageFormat ?? 'raw';
    if (!OUTPUT_FORMATS.includes(fmt)) throw new InvalidArgumentError('imageFormat', OUTPUT_FORMATS.join(' or '), fmt);
    // A repository address that cannot work is the caller's mistake, said now (not logged at the first migration).
    if (options.repository) parseTarget(options.repository.to);
    const bs = options.blockSize ?? 4096;
    const indexFile = join(options.dataDir, INDEX_FILE);
    let n = existsSync(indexFile) ? Neighbourhood.load(indexFile) : new Neighbourhood(bs);
    if (n.blockSize !== bs) n = new Neighbourhood(bs);
    const scanner = new Scanner({ workers: 1 });
    try {
      for (const p of options.neighbours ?? []) {
        if (n.images.some((i) => i.path === resolve(p))) continue;
        const [map] = await scanner.scan(p, { blockSize: bs, ...(signal ? { signal } : {}) });
        n.add(map!, specFor(p).kind === 'qcow2' ? 'qcow2' : 'raw');
      }
    } catch (e) {
      await scanner.close();
      throw e;
    }
    n.save(indexFile);
    const svc = new DestinationService(options, n, scanner, tls);
    if (options.nbd) {
      try {
        await svc.startNbd(options.nbd);
      } catch (e) {
        await svc.close();
        throw e;
      }
    }
    try {
      svc.listener = await listen(options.host ?? '127.0.0.1', options.port ?? 0, (s) => svc.accept(s));
    } catch (e) {
      await svc.close();
      throw e;
    }
    svc.startPruning();
    svc.unlisten = await closeOnAbort(svc, signal, 'destination service');
    return svc;
  }

  private unlisten: (() => void) | undefined;
  private closing: Promise<void> | undefined;

  /** Expires abandoned partial images now and then (never one a session is using). */
  private startPruning(): void {
    const ttl = this.options.partialTtl ?? DEFAULT_PARTIAL_TTL_MS;
    if (!(ttl > 0)) return;
    const prune = () => {
      try {
        for (const p of prunePartials(this.options.dataDir, ttl, new Set(this.active.keys()))) {
          this.logger.info({ image: p.name, idleSeconds: Math.round(p.ageMs / 1000) }, `removed the partial image of ${p.name}: untouched for ${Math.round(p.ageMs / 1000)} s (partial TTL ${Math.round(ttl / 1000)} s)`);
        }
      } catch (e) {
        this.logger.error({ error: e }, `pruning partial images failed: ${(e as Error).message}`);
      }
    };
    prune();
    this.pruneTimer = setInterval(prune, Math.max(1000, Math.min(ttl / 4, 3600_000)));
    this.pruneTimer.unref();
  }

  /** Bytes the data directory can still take, minus the reserve (statfs, at most every 100 ms). */
  private freeBytes(): number {
    const now = performance.now();
    if (!this.free || now - this.free.at > 100) {
      const st = statfsSync(this.options.dataDir);
      this.free = { at: now, bytes: Number(st.bavail) * Number(st.bsize) };
    }
    return this.free.bytes - (this.options.reserveBytes ?? 0);
  }

  get address(): { host: string; port: number } {
    return this.listener!.address;
  }

  /** Every entry has its control characters escaped and its length capped (peer text: names, messages, strategies): see src/log.ts. */
  private readonly logger: Logger;

  /** A new TCP connection: through the gate (limits, TLS, deadline) to serve(). */
  private accept(raw: Socket): void {
    this.gate.accept(raw, (ch, authenticated) => this.serve(ch, authenticated));
  }

  /** Stops the service: no new connections; running migrations end, saving their journals (resumable). Idempotent. */
  close(): Promise<void> {
    return (this.closing ??= this.shutdown());
  }

  private async shutdown(): Promise<void> {
    this.unlisten?.();
    if (this.pruneTimer) clearInterval(this.pruneTimer);
    // server.close() waits for the open connections: they are ended first.
    const listening = this.listener?.close();
    this.gate.destroyAll();
    await listening;
    // Each session saves its journal as its connection ends: a later attempt resumes from it.
    await Promise.allSettled([...this.active.values()].map((a) => a.done));
    // Taken-over images first: a read waiting for a block that will not come now fails, and the NBD server can finish.
    for (const t of this.taken.values()) await t.image.close().catch(() => {});
    this.taken.clear();
    await this.nbd?.close();
    for (const e of this.served.values()) await e.close().catch(() => {});
    this.served.clear();
    await this.indexing;
    await this.scanner.close();
    this.gatherPool?.close();
    this.stage?.close();
  }

  /** One connection: handshake, BEGIN, the session, then the new image into the neighbourhood. */
  async serve(ch: Channel, authenticated?: () => void): Promise<void> {
    ch.setIdleTimeout(this.options.idleTimeout ?? DEFAULT_IDLE_TIMEOUT_MS);
    const auth = { ...this.options.auth, certificates: !!this.options.tls };
    const offered = CAPABILITIES | CAP_SNAPMIG;
    const caps = await serverHandshake(ch, auth, this.options.compression === false ? offered & ~CAP_ZSTD : offered);
    authenticated?.();
    // Decompression from the first frame on: a scatter-gather source's first STASH may already be compressed.
    const decompressor = decompressorFor(caps);
    ch.setCodec(undefined, decompressor);
    const first = await ch.next();
    if (first.type === Msg.STASH || first.type === Msg.GATHER) {
      // A source scattering into the stage (or a peer gathering from it): a content-store connection, not a migration.
      if (!this.stage) throw new ProtocolError(ErrorCode.REFUSED, 'this destination has no stage (scatter-gather is off)');
      ch.setCodec(compressorFor(caps, { mode: 'auto' }), decompressor);
      await serveStore(ch, this.stage, this.stageStats, first);
      return;
    }
    // SnapMig: a coordinator's connection says what chain the layers (each an ordinary migration) make (roles/destination/chain.ts).
    if ((first.type === Msg.CHAIN_BEGIN || first.type === Msg.CHAIN_COMMIT) && caps & CAP_SNAPMIG) {
      // The layers arrive raw (NAME.Ln.img, see isChainLayer); the chain is written in this destination's format at CHAIN_COMMIT.
      return serveChain(ch, first, { dataDir: this.options.dataDir, scanner: this.scanner, busy: (image) => this.active.has(image), log: (l) => this.logger.info(l), format: this.options.imageFormat ?? 'raw' });
    }
    if (first.type !== Msg.BEGIN) throw new ProtocolError(ErrorCode.PROTOCOL, `expected BEGIN, got ${msgName(first.type)}`);
    const begin = decode(BEGIN, first.payload);
    this.logger.info({ image: begin.name, peer: ch.socket.remoteAddress, size: begin.size, strategy: begin.strategy }, `migration into ${begin.name} from ${ch.socket.remoteAddress}: ${begin.size} bytes, strategy ${begin.strategy}`);
    this.check(begin);
    await this.claim(begin.name);
    // A layer of a SnapMig chain arrives raw whatever this destination writes: the chain handler reads it at CHAIN_COMMIT.
    const layer = isChainLayer(this.options.dataDir, begin.name);
    const files = imageFiles(this.options.dataDir, begin.name, layer ? 'raw' : this.options.imageFormat ?? 'raw');
    const final = files.final;
    // A name is one image, whatever format it was written in (a chain's layer: its raw file only; the chain's own output files are its handler's).
    const others = layer ? [] : OUTPUT_FORMATS.filter((f) => f !== files.format).map((f) => imageFiles(this.options.dataDir, begin.name, f).final);
    if ([final, ...others].some((f) => existsSync(f)) && !(begin.flags & BEGIN_OVERWRITE)) throw new BlockferryError(ErrorCode.IMAGE_EXISTS, `${begin.name} exists at the destination (migrate with --overwrite to replace it)`);
    let release!: () => void;
    this.active.set(begin.name, { ch, done: new Promise<void>((r) => { release = r; }) });
    let stats: SessionStats;
    try {
      stats = await new Session(ch, await this.open(begin, files)).run();
    } catch (e) {
      const missing = this.taken.get(begin.name)?.image;
      if (missing && !missing.isComplete) this.logger.warn({ image: begin.name, missingBlocks: missing.stale.size }, `${begin.name}: the source went away during post-copy with ${missing.stale.size} blocks missing; reads of them fail until the migration is resumed`);
      throw e;
    } finally {
      this.active.delete(begin.name);
      release();
    }
    this.completed.push(stats);
    for (const f of others) if (existsSync(f)) rmSync(f, { force: true }); // replaced (--overwrite) by the image in the other format
    this.logger.info({ image: begin.name, stats }, `migration into ${begin.name} complete: ${JSON.stringify(stats)}`);
    if (!this.taken.has(begin.name)) await this.serveComplete(begin.name, files.format).catch((e: Error) => this.logger.error({ image: begin.name, error: e }, `cannot serve ${begin.name} over NBD: ${e.message}`));
    // After DONE and outside the busy window: indexing is not part of the
    // migration, and the complete image is no longer "being migrated".
    this.indexing = this.indexing.then(() => this.indexImage(final)).catch((e: Error) => this.logger.error({ image: begin.name, error: e }, `indexing ${final} failed: ${e.message}`));
    await this.indexing;
  }

  private check(b: Begin): void {
    if (!NAME_RE.test(b.name) || b.name.includes('..')) throw new BlockferryError(ErrorCode.NAME_INVALID, `image name ${JSON.stringify(escapeForLog(b.name, 140))} is not a plain file name`);
    if (b.blockSize !== this.neighbourhood.blockSize) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `this destination works at ${this.neighbourhood.blockSize}-byte blocks, not ${b.blockSize}`);
    if (!Number.isSafeInteger(b.size) || b.size < 0) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `image size ${b.size}`);
    const max = this.options.maxImageSize;
    if (max !== undefined && b.size > max) throw new BlockferryError(ErrorCode.IMAGE_TOO_LARGE, `an image of ${b.size} bytes is larger than this destination accepts (${max} bytes)`);
  }

  /**
   * The name for a new session. A name in use is BUSY, unless the session
   * holding it has heard nothing from its peer for takeoverGrace: then that
   * session is ended (ERR_BF_TIMEOUT; it saves its journal) and this one
   * resumes from what it kept.
   */
  private async claim(name: string): Promise<void> {
    const old = this.active.get(name);
    if (!old) return;
    if (old.ch.failed) {
      // Ending already (its connection failed or timed out): wait for it to save its journal.
      await old.done;
      if (this.active.has(name)) throw new BlockferryError(ErrorCode.BUSY, `a migration into ${name} is already running`);
      return;
    }
    const grace = this.options.takeoverGrace ?? DEFAULT_TAKEOVER_GRACE_MS;
    const idle = old.ch.idleFor();
    if (idle < grace) throw new BlockferryError(ErrorCode.BUSY, `a migration into ${name} is already running`);
    this.logger.warn({ image: name, idleMs: Math.round(idle) }, `a new attempt takes over ${name}: the running one has heard nothing from its source for ${Math.round(idle)} ms`);
    old.ch.abort(new ProtocolError(ErrorCode.TIMEOUT, `taken over by a new attempt at ${name} after ${Math.round(idle)} ms of silence`));
    await old.done;
    if (this.active.has(name)) throw new BlockferryError(ErrorCode.BUSY, `a migration into ${name} is already running`);
  }

  /** The partial image and journal: an earlier attempt's when they match, else fresh. */
  private async open(b: Begin, files: ImageFiles): Promise<ConstructorParameters<typeof Session>[1]> {
    const { partial, journal: journalFile } = files;
    const taken = this.taken.get(b.name);
    if (taken && !taken.image.isComplete) {
      // A post-copy whose source went away: the image is still served here, and this attempt resumes it.
      const img = taken.image;
      if (img.size !== b.size || img.blockSize !== b.blockSize) {
        throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `${b.name} was taken over as ${img.size} bytes in ${img.blockSize}-byte blocks; this attempt says ${b.size} and ${b.blockSize}`);
      }
      return {
        name: b.name, size: b.size, blockSize: b.blockSize, sink: img.sink, journal: taken.journal, journalFile, resumed: true, fills: [],
        freeBytes: () => this.freeBytes(), arriving: img, ...this.progressOption(b.name),
      };
    }
    if (taken) this.taken.delete(b.name); // complete, and replaced (--overwrite)
    // Links planted at either name are refused, never followed nor silently replaced.
    for (const [p, what] of [[partial, 'partial image'], [journalFile, 'journal']] as const) {
      let st;
      try { st = lstatSync(p); } catch { continue; }
      if (st.isSymbolicLink()) throw new BlockferryError(ErrorCode.UNSAFE_PATH, `the ${what} of ${b.name} (${p}) is a symbolic link; refusing to use it (remove it: blockferry partial remove ${b.name})`);
      if (!st.isFile()) throw new BlockferryError(ErrorCode.UNSAFE_PATH, `the ${what} of ${b.name} (${p}) is not a regular file; refusing to use it`);
    }
    let journal: Journal | undefined;
    try {
      journal = existsSync(partial) ? Journal.load(journalFile) : undefined;
    } catch (e) {
      if (e instanceof BlockferryError && e.code === ErrorCode.UNSAFE_PATH) throw e;
      journal = undefined; // a damaged journal: start over, never trust it
    }
    if (journal && (journal.size !== b.size || journal.blockSize !== b.blockSize)) journal = undefined;
    let sink: ImageSink | undefined;
    if (journal) {
      try {
        sink = await openSink(files, b.size, true);
      } catch (e) {
        if (e instanceof BlockferryError && (e.code === ErrorCode.WRITE_FAILED || e.code === ErrorCode.UNSAFE_PATH)) throw e; // a planted link: refuse, loudly
        journal = undefined;
      }
    }
    const resumed = !!journal;
    if (!journal) {
      journal = Journal.fresh(b.size, b.blockSize);
      sink = await openSink(files, b.size, false);
      journal.save(journalFile);
    }
    const fills: FillSource[] = [];
    for (const f of FILL_SOURCES) {
      if (!(b.fills & f.bit)) continue;
      const src = f.open({ neighbourhood: this.neighbourhood, ...(this.repository ? { repository: this.repository } : {}), ...(this.gatherPool ? { gather: this.gatherPool } : {}) });
      if (src) fills.push(src);
    }
    const j = journal;
    const takeOver = (s: ImageSink) => {
      const image = new ArrivingImage(b.name, b.size, b.blockSize, s, () => openExport(files, b.name, `blockferry: ${b.name}`));
      this.taken.set(b.name, { image, journal: j, journalFile });
      this.logger.info({ image: b.name }, `${b.name}: taken over (post-copy); served while it arrives`);
      return image;
    };
    return { name: b.name, size: b.size, blockSize: b.blockSize, sink: sink!, journal, journalFile, resumed, fills, freeBytes: () => this.freeBytes(), takeOver, ...this.progressOption(b.name) };
  }

  private progressOption(name?: string): { onProgress?: (p: Progress) => void; onBlocks?: (start: number, count: number) => void } {
    const cb = this.options.onProgress, blocks = this.options.onBlocks;
    return { ...(cb ? { onProgress: cb } : {}), ...(blocks && name !== undefined ? { onBlocks: (start: number, count: number) => blocks(name, start, count) } : {}) };
  }

  /** What the service serves under a name over NBD: an image taken over (arriving or complete), else a complete image of the data directory. */
  exportOf(name: string): NbdExport | undefined {
    return this.taken.get(name)?.image ?? this.served.get(name);
  }

  /** The NBD URI of an image (with options.nbd). */
  nbdUri(name: string): string | undefined {
    return this.nbd?.uri(name);
  }

  /** Serves every complete image of the data directory over NBD, and each one completed later. */
  private async startNbd(at: NbdAddress): Promise<void> {
    for (const f of readdirSync(this.options.dataDir)) {
      for (const format of OUTPUT_FORMATS) {
        const name = f.endsWith(IMAGE_EXTENSION[format]) ? f.slice(0, -IMAGE_EXTENSION[format].length) : '';
        if (name && NAME_RE.test(name)) await this.serveComplete(name, format);
      }
    }
    this.nbd = await NbdServer.listen({
      listen: at,
      exports: (name) => this.exportOf(name),
      list: () => new Set([...this.served.keys(), ...this.taken.keys()]),
      logger: this.logger.child({ nbd: true }),
      onError: (e, w) => this.logger.error({ export: w.export, command: w.command, offset: w.offset, length: w.length, error: e }, `nbd: ${w.export}: ${w.command} ${w.offset}+${w.length} failed: ${(e as Error)?.message ?? String(e)}`),
    });
  }

  /** (Re)opens a complete image for NBD clients; those of a replaced version keep the old one until they disconnect. */
  private async serveComplete(name: string, format: OutputFormat = this.options.imageFormat ?? 'raw'): Promise<void> {
    if (!this.options.nbd && !this.nbd) return;
    const exp = await openExport(imageFiles(this.options.dataDir, name, format), name, `blockferry: ${name}`);
    const old = this.served.get(name);
    this.served.set(name, exp);
    if (old) old.close().catch(() => {});
  }

  /** The blocks a taken-over image still lacks (empty once complete). */
  missingOf(name: string): Interval[] | undefined {
    return this.taken.get(name)?.image.missing();
  }


  /** Adds a completed image to the neighbourhood (once; re-scanned when replaced) and saves the index. */
  async indexImage(path: string): Promise<void> {
    // What a source sent is raw bytes: a qcow2 header a guest wrote at the start of a raw image must not be
    // followed (its backing file could name any host file). A NAME.qcow2 is this service's own qcow2 (no backing file).
    const format = path.endsWith(IMAGE_EXTENSION.qcow2) ? 'qcow2' : 'raw';
    const [map] = await this.scanner.scan(path, { blockSize: this.neighbourhood.blockSize, format });
    const existing = this.neighbourhood.images.find((i) => i.path === resolve(path));
    if (!existing) this.neighbourhood.add(map!, format);
    this.neighbourhood.save(join(this.options.dataDir, INDEX_FILE));
  }
}

/** The data directory exists (or is made) and takes files: else ERR_BF_DATA_DIR. */
export function checkDataDir(dir: string): void {
  try {
    // Level by level (Node's recursive mkdir can spin on /proc and the like).
    const missing: string[] = [];
    for (let d = resolve(dir); !existsSync(d); d = dirname(d)) {
      missing.unshift(d);
      if (dirname(d) === d) break;
    }
    for (const d of missing) mkdirSync(d);
    const probe = join(dir, `.bf-probe-${process.pid}-${Date.now()}`);
    closeSync(openSync(probe, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600));
    rmSync(probe, { force: true });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'EEXIST' || code === 'ENOTDIR' ? 'it (or a parent) is not a directory' : code === 'EACCES' || code === 'EPERM' || code === 'EROFS' ? 'it cannot be written' : (e as Error).message;
    throw new BlockferryError(ErrorCode.DATA_DIR, `data directory ${dir}: ${why}`, { cause: e });
  }
}
