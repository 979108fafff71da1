// The source side of a migration, orchestration only: connect,
// authenticate, BEGIN, scan, then the chosen strategy does the rest. One
// call for programs; `blockferry migrate` is a thin shell over it.
import { checkBlockSize } from '../engine/engine.js';
import { AbortError, BlockferryError, ErrorCode, InvalidArgumentError, checkAborted } from '../errors.js';
import { Channel, type FrameRecord, type Traffic } from '../protocol/channel.js';
import { clientHandshake, type AuthOptions } from '../protocol/handshake.js';
import { BEGIN, BEGIN_OK, BEGIN_OVERWRITE, SYNC, SYNC_OK, trafficTotal } from '../protocol/messages.js';

/** A source that has sent nothing for this long sends SYNC (the destination's idle deadline defaults to 60 s). */
export const HEARTBEAT_MS = 10_000;
import { compressorFor, type CompressMode } from '../protocol/compression.js';
import { connect, parseTarget } from '../transport/tcp.js';
import { connect as connectTls, securityFrom, type TlsOptions } from '../transport/tls.js';
import { openSource, sourceName, specFor, type ImageFormat } from '../image/source.js';
import { Scanner } from '../scan/scanner.js';
import { QmpDirty } from './rounds.js';
import { STRATEGIES, type StrategyName } from './strategies.js';
import type { DeltaReport, LiveOptions, LiveReport, MigrationEvent, MigrationProgress, PostcopyCounts, ScatterHook, StrategyProgress, Strategy as StrategyDef } from './strategy.js';
import { precopy } from './precopy.js';
import { CAP_SCATTER } from '../protocol/handshake.js';
import { FILL_SCATTER } from '../protocol/messages.js';

/** Scatter-gather's per-image migration: pre-copy whose BLOCK_INFO runs the destination fills from where SG_PLACE says. Only scatterGather() starts it. */
const SCATTER_GATHER: StrategyDef = { name: 'scatter-gather', fills: FILL_SCATTER, requires: CAP_SCATTER, run: precopy };
import { STALL_POLICIES } from './live.js';

export type Strategy = StrategyName | 'scatter-gather';

export interface MigrateOptions extends LiveOptions {
  /** The destination, "host:port". */
  to: string;
  /** Name at the destination (default: the image's file name without extension). */
  name?: string;
  strategy?: Strategy;
  /** A pre-shared key (TLS 1.3 with that PSK), or insecure (plain TCP); with `tls`, the key is optional. */
  auth: AuthOptions;
  /** Certificates: mutual TLS 1.3; the server's certificate must name the host dialled (or `tls.servername`). */
  tls?: TlsOptions;
  blockSize?: number;
  /** Bandwidth limit in bytes per second. */
  bwlimit?: number;
  /** Compression of block data on the wire (default auto: on where it pays, if the destination agrees). */
  compress?: CompressMode;
  /**
   * Memory for per-block state beyond fixed buffers, in bytes (default 256 MiB):
   * bounds the index of contents the destination holds (for copies).
   */
  memoryBudget?: number;
  /** Replace a complete image of the same name at the destination. */
  overwrite?: boolean;
  scanner?: Scanner;
  onEvent?: (e: MigrationEvent) => void;
  /** Where the migration stands, at most every few hundred milliseconds per phase and at each phase's start and end. */
  onProgress?: (p: MigrationProgress) => void;
  /**
   * Cancels the migration: the scan stops, the destination is told
   * (ERR_BF_ABORTED) and keeps its partial image and journal, and migrate()
   * rejects with an AbortError (ERR_BF_ABORTED). The same call again resumes.
   * After a post-copy switch the destination goes on serving what arrived.
   */
  signal?: AbortSignal;
  /** How the image is read: auto (default) probes the qcow2 magic; give raw for a disk whose guest is not trusted. */
  format?: ImageFormat;
  /** Every frame this side sends and receives (a frame log, for diagnostics). */
  onFrame?: (f: FrameRecord) => void;
  /** Set by scatterGather() (scatter-gather.ts) for each image it evicts: the strategy becomes scatter-gather's pre-copy with SG_PLACE. */
  scatter?: ScatterHook;
}

export interface MigrationResult {
  name: string;
  strategy: Strategy;
  imageSize: number;
  blockSize: number;
  seconds: number;
  /** From pause to the destination's verified commit and the resume action (0 when nothing was paused). */
  downtimeSeconds: number;
  /** The downtime predicted when the cutover started (seconds): side by side with downtimeSeconds. */
  predictedDowntimeSeconds: number;
  /** The downtime budget and how it was kept: rates, cutover reason, stall and throttle reports. */
  live: LiveReport;
  /** Re-sent blocks sent as deltas, and the bytes that saved. */
  delta: DeltaReport;
  /** Seconds per phase: scan, transfer (fingerprints and data, overlapped), rounds, verify, cutover. */
  phases: Record<string, number>;
  rounds: number;
  /** Bytes this side sent and received, by kind, frame headers included; `sentRaw` before compression. */
  wire: { sent: Traffic; received: Traffic; sentRaw: Traffic; total: number };
  blocks: {
    total: number;
    zero: number;
    /** Blocks the destination filled itself: from its neighbour images and, where it has one, its base-image repository. */
    filledFromNeighbours: number;
    /** Blocks the destination filled from its base-image repository. */
    filledFromRepository: number;
    resumed: number;
    /** Block contents sent over the wire. */
    sent: number;
    /** Blocks the destination copied from content this migration already put there. */
    copied: number;
    /** Blocks sent more than once (dirty rounds, repairs). */
    resent: number;
    /** Bytes those re-sends cost before frame compression (a delta counts its code). */
    resentBytes: number;
    /** Blocks repaired after the end-to-end check. */
    repaired: number;
  };
  verified: boolean;
  /** Post-copy and hybrid: what was missing at the switch, what readers at the destination pulled, what its clients wrote first. */
  postcopy?: PostcopyCounts;
}

/** Default memory budget for per-block state: 256 MiB. */
export const DEFAULT_MEMORY_BUDGET = 256 << 20;


/** Migrates the image at path to a destination service; resolves once the destination holds it, verified. */
export async function migrate(path: string, options: MigrateOptions): Promise<MigrationResult> {
  const t0 = performance.now();
  const strategyName = options.scatter ? ('scatter-gather' as Strategy) : options.strategy ?? 'similarity';
  const strategy = options.scatter ? SCATTER_GATHER : STRATEGIES[strategyName];
  if (!strategy || (!options.scatter && !Object.hasOwn(STRATEGIES, strategyName))) throw new InvalidArgumentError('strategy', Object.keys(STRATEGIES).join(' or '), strategyName);
  const bs = options.blockSize ?? options.tracked?.blockSize ?? 4096;
  checkBlockSize(bs);
  const name = options.name ?? sourceName(path);
  const target = parseTarget(options.to);
  if (options.memoryBudget !== undefined && !(Number.isSafeInteger(options.memoryBudget) && options.memoryBudget >= 16 << 20)) {
    throw new InvalidArgumentError('memoryBudget', 'at least 16 MiB, in bytes', options.memoryBudget);
  }
  const signal = options.signal;
  checkAborted(signal, 'migration');
  // Opened first: a missing or unusable image (or NBD export) is reported before any connection is made.
  const src = openSource(specFor(path, options.format ? { format: options.format } : {}));
  const ownScanner = !options.scanner;
  const scanner = options.scanner ?? new Scanner();
  const event = (phase: string, detail?: unknown) => options.onEvent?.({ phase, detail });
  let scannerOpen = true;
  const closeScanner = async () => { if (scannerOpen && ownScanner) { scannerOpen = false; await scanner.close(); } };
  let dirty: QmpDirty | undefined;
  const abandon = async (e: unknown) => { await dirty?.close().catch(() => {}); src.close(); await closeScanner(); throw e; };

  try {
    checkLive(options, strategy.postcopyOnStall === true);
  } catch (e) {
    await closeScanner();
    throw e;
  }

  let security;
  try {
    security = securityFrom(options.auth, options.tls);
    // QEMU's bitmap starts before anything else: every write from here on is in a round
    // (one the scan already saw is merely sent again), and a bad --qmp fails before BEGIN.
    if (options.qmp) dirty = await QmpDirty.start(options.qmp, path, bs);
  } catch (e) {
    return abandon(e);
  }
  const socket = await (security.mode === 'insecure' ? connect(target) : connectTls(target, security)).catch(abandon);
  const ch = new Channel(socket, { bwlimit: options.bwlimit ?? 0, ...(options.onFrame ? { onFrame: options.onFrame } : {}) });
  let heartbeat: NodeJS.Timeout | undefined;
  // Cancelling fails the channel (every wait on it ends) and tells the destination why.
  let aborted: AbortError | undefined;
  const onAbort = () => {
    aborted = new AbortError('migration', signal!.reason);
    ch.abort(aborted);
  };
  signal?.addEventListener('abort', onAbort, { once: true });
  if (signal?.aborted) onAbort();
  try {
    const caps = await clientHandshake(ch, { ...options.auth, certificates: security.mode === 'cert' });
    const lacking = strategy.requires & ~caps;
    if (lacking) throw new BlockferryError(ErrorCode.REFUSED, `the destination does not offer what strategy ${strategy.name} needs (capabilities 0x${lacking.toString(16)})`);
    ch.setCodec(compressorFor(caps, options.compress ?? { mode: 'auto' }), undefined);
    // Ask first: a refused migration (name, existing image, busy) costs no scan.
    await ch.send(BEGIN, { name, size: src.size, blockSize: bs, flags: options.overwrite ? BEGIN_OVERWRITE : 0, fills: strategy.fills, strategy: strategy.name });
    const begun = await ch.recv(BEGIN_OK);
    // A heartbeat: SYNC when nothing was sent for a while (a long scan or
    // rescan), so the destination's idle deadline only ends sources that
    // are really gone.
    heartbeat = setInterval(() => {
      if (performance.now() - ch.lastSentAt >= HEARTBEAT_MS && !ch.failed) ch.request(SYNC, undefined, SYNC_OK).catch(() => {});
    }, HEARTBEAT_MS / 4);
    heartbeat.unref();
    options.tracked?.takeDirty(); // writes from here on are this migration's business
    event('scan');
    const tScan = performance.now();
    const progress = (p: StrategyProgress) => {
      if (!options.onProgress) return;
      const sentBytes = trafficTotal(ch.sent);
      const elapsed = (performance.now() - t0) / 1000;
      options.onProgress({
        operation: 'migrate', path, ...p, sentBytes, rate: sentBytes / Math.max(1e-3, elapsed), elapsed,
        blocksLeft: Math.ceil(Math.max(0, p.total - p.done) / bs),
      });
    };
    const live = !!options.tracked || !!options.rescan || !!options.qmp;
    const [map] = options.scatter ? [options.scatter.map] : await scanner.scan(path, { blockSize: bs, live, ...(signal ? { signal } : {}), ...(options.format ? { format: options.format } : {}), onProgress: (s) => progress({ phase: 'scan', round: 0, done: s.done, total: s.total }) });
    const scanSeconds = (performance.now() - tScan) / 1000;
    // A migration that is not live scans once: its workers need not idle through the transfer.
    if (!live && ownScanner) await closeScanner();
    const out = await strategy.run({
      ch, src, path, map: map!, blockSize: bs, capabilities: caps, begin: begun, ...(options.format ? { format: options.format } : {}), scanner: scannerOpen ? scanner : undefined, live: options, event, progress,
      ...(dirty ? { dirty } : {}),
      ...(options.scatter ? { scatter: options.scatter } : {}),
      memoryBudget: options.memoryBudget ?? DEFAULT_MEMORY_BUDGET,
    });
    event('done');
    return {
      name,
      strategy: strategyName,
      imageSize: src.size,
      blockSize: bs,
      seconds: (performance.now() - t0) / 1000,
      downtimeSeconds: out.downtimeSeconds,
      predictedDowntimeSeconds: out.live.predictedDowntimeSeconds,
      live: out.live,
      delta: out.delta,
      phases: { scan: scanSeconds, ...out.phases },
      rounds: out.rounds,
      wire: { sent: { ...ch.sent }, received: { ...ch.received }, sentRaw: { ...ch.sentRaw }, total: trafficTotal(ch.sent) + trafficTotal(ch.received) },
      blocks: {
        total: map!.count,
        zero: map!.count - map!.dataBlocks,
        filledFromNeighbours: out.destination.neighbour,
        filledFromRepository: out.destination.repository,
        resumed: out.destination.resumed,
        sent: out.sent,
        copied: out.copied,
        resent: out.resent,
        resentBytes: out.resentBytes,
        repaired: out.repaired,
      },
      verified: true,
      ...(out.postcopy ? { postcopy: out.postcopy } : {}),
    };
  } catch (e) {
    // Whatever failed first because of the cancellation, the caller learns it was cancelled.
    throw aborted ?? (signal?.aborted ? new AbortError('migration', signal.reason) : e);
  } finally {
    signal?.removeEventListener('abort', onAbort);
    if (heartbeat) clearInterval(heartbeat);
    await dirty?.close().catch(() => {}); // a bitmap QEMU could not remove must not hide the migration's own outcome
    src.close();
    socket.destroy();
    await closeScanner();
  }
}

/** The live options' ranges, checked before anything connects. */
function checkLive(o: LiveOptions, postcopy: boolean): void {
  const nonNegative = (name: string, v: number | undefined, what: string) => {
    if (v !== undefined && !(typeof v === 'number' && Number.isFinite(v) && v >= 0)) throw new InvalidArgumentError(name, what, v);
  };
  nonNegative('maxDowntime', o.maxDowntime, 'milliseconds, a finite number ≥ 0');
  nonNegative('stallTimeout', o.stallTimeout, 'milliseconds, a finite number ≥ 0');
  nonNegative('maxRounds', o.maxRounds, 'a number of rounds ≥ 0');
  nonNegative('dirtyThreshold', o.dirtyThreshold, 'a number of blocks ≥ 0');
  nonNegative('peekInterval', o.peekInterval, 'milliseconds, a finite number ≥ 0');
  if (o.onStall !== undefined && !STALL_POLICIES.includes(o.onStall)) throw new InvalidArgumentError('onStall', STALL_POLICIES.join(', '), o.onStall);
  // The hook for post-copy: the policy exists, the strategy that can switch to it does not yet.
  if (o.onStall === 'postcopy' && !postcopy) throw new InvalidArgumentError('onStall', 'wait, force or throttle (postcopy needs a strategy that can switch to post-copy, --strategy hybrid)', o.onStall);
  if (o.onStall === 'throttle' && typeof o.throttle !== 'function') throw new InvalidArgumentError('throttle', "a function (onStall: 'throttle' calls it with the rate wanted)", o.throttle);
  if (o.order !== undefined && o.order !== 'hot-last' && o.order !== 'address' && o.order !== 'hot-first') throw new InvalidArgumentError('order', 'hot-last, hot-first or address', o.order);
}
