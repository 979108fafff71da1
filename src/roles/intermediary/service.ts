// The intermediary role (paper 003's content server): stores the blocks a
// source scatters to it (STASH), keyed by SHA-1, up to its capacity, and
// serves them to a destination that gathers them (GATHER). It trusts nothing
// it is sent (each block is hashed before it is kept) and is trusted by no
// one: the destination checks every block's SHA-1 and the source's
// fingerprint before writing it. What it holds survives a restart.
import { serviceLogger, type Logger } from '../../log.js';
import type { Socket } from 'node:net';
import type { Channel } from '../../protocol/channel.js';
import { CAP_SCATTER, CAP_ZSTD, serverHandshake } from '../../protocol/handshake.js';
import { compressorFor, decompressorFor } from '../../protocol/compression.js';
import { serverTls, securityFrom } from '../../transport/tls.js';
import { listen, type Listener } from '../../transport/tcp.js';
import { Gate, type GateOptions, type ListenOptions } from '../gate.js';
import { checkDataDir, DEFAULT_IDLE_TIMEOUT_MS } from '../destination/service.js';
import type { Role } from '../role.js';
import { ContentStore } from './store.js';
import { newStoreStats, serveStore } from './serve.js';
export { newStoreStats, serveStore, answerStore, type StoreStats } from './serve.js';

export interface IntermediaryOptions extends GateOptions, ListenOptions {
  /** Where the segments live. */
  dataDir: string;
  /** Bytes it may hold (segments, records included). */
  capacity: number;
  /** Bytes of recent blocks also kept in memory (default 64 MiB). */
  memoryBytes?: number;
  /** A connection that sends nothing for this long ends with ERR_BF_TIMEOUT (ms; 0: never). Default 60 s. */
  idleTimeout?: number;
  /** Where the service logs (levels and fields; a pino logger works). Default: nowhere. */
  logger?: Logger;
  /** Older form: each entry as one line of text. Ignored when logger is given. */
  log?: (line: string) => void;
}

export class IntermediaryService implements Role {
  readonly name = 'intermediary';
  private listener: Listener | undefined;
  private readonly gate: Gate;
  readonly stats = newStoreStats();

  private constructor(readonly options: IntermediaryOptions, readonly store: ContentStore, tls: ReturnType<typeof serverTls> | undefined) {
    this.logger = serviceLogger(options, { role: 'intermediary' });
    this.gate = new Gate(options, tls, this.logger, 'stash or gather');
  }

  static async start(options: IntermediaryOptions): Promise<IntermediaryService> {
    checkDataDir(options.dataDir);
    const security = securityFrom(options.auth, options.tls);
    const tls = security.mode === 'insecure' ? undefined : serverTls(security);
    const store = ContentStore.open(options.dataDir, { capacity: options.capacity, ...(options.memoryBytes !== undefined ? { memoryBytes: options.memoryBytes } : {}) });
    const svc = new IntermediaryService(options, store, tls);
    if (store.damage.truncated) svc.log(`store: ${store.damage.truncated} torn record(s) cut off at open`);
    svc.listener = await listen(options.host ?? '127.0.0.1', options.port ?? 0, (s: Socket) => svc.gate.accept(s, (ch, ok) => svc.serve(ch, ok)));
    return svc;
  }

  get address(): { host: string; port: number } {
    return this.listener!.address;
  }

  /** Every entry escaped and capped: see src/log.ts. */
  readonly logger: Logger;
  private log(line: string): void {
    this.logger.info(line);
  }

  async serve(ch: Channel, authenticated?: () => void): Promise<void> {
    ch.setIdleTimeout(this.options.idleTimeout ?? DEFAULT_IDLE_TIMEOUT_MS);
    // zstd (capability bit 2) on block data both ways, where it pays (the codec's auto mode), when the peer offers it.
    const caps = await serverHandshake(ch, { ...this.options.auth, certificates: !!this.options.tls }, CAP_SCATTER | CAP_ZSTD);
    authenticated?.();
    ch.setCodec(compressorFor(caps, { mode: 'auto' }), decompressorFor(caps));
    await serveStore(ch, this.store, this.stats);
  }

  async close(): Promise<void> {
    const closing = this.listener?.close();
    this.gate.destroyAll(); // first: a gathering destination keeps its connection open between migrations
    await closing;
    this.store.close();
  }
}
