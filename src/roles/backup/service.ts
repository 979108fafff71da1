// The backup-server role (paper 000): holds base images and snapshots (the
// qcow2 overlays a backup system keeps) and sends any of them, or a merged
// stack of them, to a destination when a SnapMig coordinator asks. It
// indexes what it holds by layer identity (src/snapmig/identity.ts): every
// file's own layer and, where the file's backing chain is here too, the
// merged stacks down to its base, so that a production server's
// consolidated base (snapshots committed into it) is recognised.
//
// It is trusted with nothing: it sends through an ordinary migration (the
// destination checks the blocks against what this server itself says), and
// the destination then checks the whole layer against the identity the
// coordinator took from the source's own chain (docs/SECURITY.md, "Backup
// servers"). A layer it sends wrongly is sent again by the source.
import type { Socket } from 'node:net';
import { BlockferryError, ErrorCode, ProtocolError } from '../../errors.js';
import type { Channel } from '../../protocol/channel.js';
import { CAP_SNAPMIG, serverHandshake, type AuthOptions } from '../../protocol/handshake.js';
import { decode, LAYERS_RESULT, SEND_LAYER, SEND_LAYER_RESULT, SEND_OVERWRITE, type HeldLayer } from '../../protocol/messages.js';
import { trafficTotal } from '../../protocol/messages.js';
import { Msg, msgName } from '../../protocol/frame.js';
import { serverTls, securityFrom, type TlsOptions } from '../../transport/tls.js';
import { listen, parseTarget, type Listener } from '../../transport/tcp.js';
import { Scanner } from '../../scan/scanner.js';
import { Qcow2ImageSource, isQcow2File, MAX_CHAIN_DEPTH } from '../../image/qcow2.js';
import { FileImageSource } from '../../image/source.js';
import { escapeForLog } from '../../util/sanitize.js';
import { Gate, type GateOptions, type ListenOptions } from '../gate.js';
import { checkDataDir, DEFAULT_IDLE_TIMEOUT_MS } from '../destination/service.js';
import { NAME_RE } from '../destination/partials.js';
import { layerIdentity, type LayerIdentity } from '../../snapmig/identity.js';
import { migrate } from '../../migrate/migrate.js';
import { serviceLogger, type Logger } from '../../log.js';
import type { Role } from '../role.js';

/** A backup server's options; `auth` and `tls` are how coordinators authenticate to it. */
export interface BackupOptions extends GateOptions, ListenOptions {
  /** Where the identity cache lives (layer-ids.json). */
  dataDir: string;
  /** The layers it holds: qcow2 overlays (with or without their backing files here) and raw or qcow2 bases. */
  images: string[];
  /** How this server authenticates to destinations (default: the same key or certificates). */
  destinationAuth?: AuthOptions;
  destinationTls?: TlsOptions;
  /** Bandwidth limit of each send, bytes per second (default none). */
  bwlimit?: number;
  /** A coordinator connection silent this long ends (ms; 0: never). Default 60 s; a SEND_LAYER in progress keeps it. */
  idleTimeout?: number;
  /** Where the service logs (levels and fields; a pino logger works). Default: nowhere. */
  logger?: Logger;
  /** Older form: each entry as one line of text. Ignored when logger is given. */
  log?: (line: string) => void;
}

/** A stack this server can send: the top `depth` layers of `path`'s chain. */
interface Stack { path: string; depth: number; layer: LayerIdentity }

export class BackupService implements Role {
  readonly name = 'backup';
  private listener: Listener | undefined;
  private readonly gate: Gate;
  private readonly sends = new Set<AbortController>();
  /** Sends asked for, finished, failed; bytes sent on the wire. */
  readonly stats = { asked: 0, sent: 0, failed: 0, wireBytes: 0 };

  private constructor(readonly options: BackupOptions, private readonly held: Map<string, Stack>, private readonly scanner: Scanner, tls: ReturnType<typeof serverTls> | undefined) {
    this.logger = serviceLogger(options, { role: 'backup' });
    this.gate = new Gate(options, tls, this.logger, 'backup');
  }

  /** Indexes the images (cached identities are not scanned again), then listens. */
  static async start(options: BackupOptions): Promise<BackupService> {
    checkDataDir(options.dataDir);
    const security = securityFrom(options.auth, options.tls);
    securityFrom(options.destinationAuth ?? options.auth, options.destinationTls ?? options.tls);
    const tls = security.mode === 'insecure' ? undefined : serverTls(security);
    const scanner = new Scanner({ workers: 1 });
    const held = new Map<string, Stack>();
    try {
      for (const path of options.images) {
        for (let depth = 1; depth <= stackDepthHere(path); depth++) {
          const layer = await layerIdentity(path, depth, { scanner, cacheDir: options.dataDir });
          if (!held.has(layer.id)) held.set(layer.id, { path, depth, layer });
        }
      }
      const svc = new BackupService(options, held, scanner, tls);
      svc.listener = await listen(options.host ?? '127.0.0.1', options.port ?? 0, (s: Socket) => svc.gate.accept(s, (ch, ok) => svc.serve(ch, ok)));
      return svc;
    } catch (e) {
      await scanner.close();
      throw e;
    }
  }

  get address(): { host: string; port: number } {
    return this.listener!.address;
  }

  /** What it holds, as LAYERS_RESULT lists it. */
  get layers(): HeldLayer[] {
    return [...this.held.values()].map((s) => ({ identity: s.layer.id, depth: s.depth, dataBytes: s.layer.dataBytes, size: s.layer.size }));
  }

  /** Every entry escaped and capped: see src/log.ts. */
  readonly logger: Logger;
  private log(line: string): void {
    this.logger.info(line);
  }

  /** One coordinator connection: the handshake, then LAYERS and SEND_LAYER requests until it closes. */
  async serve(ch: Channel, authenticated?: () => void): Promise<void> {
    ch.setIdleTimeout(this.options.idleTimeout ?? DEFAULT_IDLE_TIMEOUT_MS);
    await serverHandshake(ch, { ...this.options.auth, certificates: !!this.options.tls }, CAP_SNAPMIG);
    authenticated?.();
    for (;;) {
      const f = await ch.nextOrEnd();
      if (!f) return;
      if (f.id === 0 || (f.type !== Msg.LAYERS && f.type !== Msg.SEND_LAYER)) {
        throw new ProtocolError(ErrorCode.PROTOCOL, `a backup server answers LAYERS and SEND_LAYER requests, not ${msgName(f.type)}${f.id === 0 ? ' without a request id' : ''}`);
      }
      if (f.type === Msg.LAYERS) {
        if (f.payload.length) throw new ProtocolError(ErrorCode.PROTOCOL, 'LAYERS carries no payload');
        await ch.reply(f, LAYERS_RESULT, this.layers);
        continue;
      }
      const m = decode(SEND_LAYER, f.payload);
      ch.setIdleTimeout(0); // a send may take long; the destination's own deadline watches it
      try {
        await ch.reply(f, SEND_LAYER_RESULT, await this.send(m.identity, m.to, m.name, !!(m.flags & SEND_OVERWRITE)));
      } finally {
        ch.setIdleTimeout(this.options.idleTimeout ?? DEFAULT_IDLE_TIMEOUT_MS);
      }
    }
  }

  /** Sends the stack of that identity to a destination under a name: an ordinary migration of the stack's view. */
  async send(identity: string, to: string, name: string, overwrite: boolean): Promise<{ blocksSent: number; wireBytes: number; milliseconds: number }> {
    this.stats.asked++;
    const stack = this.held.get(identity);
    if (!stack) throw new BlockferryError(ErrorCode.LAYER_NOT_HELD, `this backup server holds no layer ${identity.slice(0, 16)}…`);
    if (!NAME_RE.test(name) || name.includes('..')) throw new BlockferryError(ErrorCode.NAME_INVALID, `image name ${JSON.stringify(escapeForLog(name, 140))} is not a plain file name`);
    parseTarget(to);
    const abort = new AbortController();
    this.sends.add(abort);
    this.log(`sending layer ${identity.slice(0, 16)} (${stack.path}, ${stack.depth} layer${stack.depth > 1 ? 's merged' : ''}) to ${to} as ${name}`);
    try {
      const r = await migrate(stack.path, {
        to, name, strategy: 'full', format: `qcow2-stack:${stack.depth}`, overwrite, scanner: this.scanner, signal: abort.signal,
        auth: this.options.destinationAuth ?? this.options.auth,
        ...(this.options.destinationTls ?? this.options.tls ? { tls: (this.options.destinationTls ?? this.options.tls)! } : {}),
        ...(this.options.bwlimit ? { bwlimit: this.options.bwlimit } : {}),
      });
      this.stats.sent++;
      this.stats.wireBytes += r.wire.total;
      return { blocksSent: r.blocks.sent, wireBytes: trafficTotal(r.wire.sent), milliseconds: Math.round(r.seconds * 1000) };
    } catch (e) {
      this.stats.failed++;
      throw e;
    } finally {
      this.sends.delete(abort);
    }
  }

  async close(): Promise<void> {
    // Sends in flight end first (a listener's close waits for its connections).
    for (const a of this.sends) a.abort(new Error('the backup server is closing'));
    this.gate.destroyAll();
    await this.listener?.close();
    await this.scanner.close();
  }
}

/** How many layers of path's chain are here to read (1 for a raw file; a qcow2 file's chain down to the first backing file missing here). */
function stackDepthHere(path: string): number {
  if (!isQcow2File(path)) {
    new FileImageSource(path).close(); // exists and is readable, or a typed error now
    return 1;
  }
  let depth = 1;
  for (; depth < MAX_CHAIN_DEPTH; depth++) {
    let n: number;
    try {
      const s = new Qcow2ImageSource(path, null, (p) => new FileImageSource(p), depth + 1);
      n = s.layers.length;
      s.close();
    } catch {
      break; // the next backing file is not here
    }
    if (n <= depth) break;
  }
  return depth;
}
