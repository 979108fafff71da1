// The repository role (paper 002's base images): a content store that any
// destination fills from by fingerprint and signature. It indexes the images
// it holds (a Neighbourhood, as a destination indexes its neighbours) and
// answers FETCH with the contents it has. It trusts nothing it is asked and
// is trusted by no one: a destination checks every block it gets against the
// fingerprint and signature the source sent before writing it.
import { open, type FileHandle } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Socket } from 'node:net';
import { BlockferryError, ErrorCode, ProtocolError, checkAborted } from '../../errors.js';
import type { Channel } from '../../protocol/channel.js';
import { CAP_REPOSITORY, serverHandshake } from '../../protocol/handshake.js';
import { decode, FETCH, FETCH_RESULT, MAX_FETCH_BYTES, type FetchResult } from '../../protocol/messages.js';
import { Msg, msgName } from '../../protocol/frame.js';
import { serverTls, securityFrom } from '../../transport/tls.js';
import { listen, type Listener } from '../../transport/tcp.js';
import { Neighbourhood } from '../../blockindex/neighbourhood.js';
import { NO_REF, refBlock, refImage } from '../../table/table.js';
import { Scanner } from '../../scan/scanner.js';
import { Engine } from '../../engine/engine.js';
import { Gate, type GateOptions, type ListenOptions } from '../gate.js';
import { checkDataDir, DEFAULT_IDLE_TIMEOUT_MS } from '../destination/service.js';
import { serviceLogger, type Logger } from '../../log.js';
import { closeOnAbort, type Role } from '../role.js';

export const REPOSITORY_INDEX_FILE = 'repository.bfidx';

export interface RepositoryOptions extends GateOptions, ListenOptions {
  /** Where the index of the images lives (repository.bfidx). */
  dataDir: string;
  /** The images it serves blocks of (base images): indexed at start. */
  images: string[];
  /** Block size of the index; destinations must ask at it. Default 4096. */
  blockSize?: number;
  /** A connection that sends nothing for this long ends with ERR_BF_TIMEOUT (ms; 0: never). Default 60 s. */
  idleTimeout?: number;
  /** Where the service logs (levels and fields; a pino logger works). Default: nowhere. */
  logger?: Logger;
  /** Older form: each entry as one line of text. Ignored when logger is given. */
  log?: (line: string) => void;
  /** Stops the service when aborted, as close() does; aborted during start(), start() rejects with ERR_BF_ABORTED. */
  signal?: AbortSignal;
}

interface Held {
  fh: FileHandle;
  size: number;
}

export class RepositoryService implements Role {
  readonly name = 'repository';
  private listener: Listener | undefined;
  private readonly gate: Gate;
  private readonly engine = new Engine();
  private readonly files = new Map<number, Promise<Held | null>>();
  /** Blocks asked for and blocks served, since start. */
  readonly stats = { requests: 0, asked: 0, served: 0 };

  private constructor(readonly options: RepositoryOptions, readonly neighbourhood: Neighbourhood, tls: ReturnType<typeof serverTls> | undefined) {
    this.logger = serviceLogger(options, { role: 'repository' });
    this.gate = new Gate(options, tls, this.logger, 'fetch');
  }

  static async start(options: RepositoryOptions): Promise<RepositoryService> {
    const signal = options.signal;
    checkAborted(signal, 'repository service');
    checkDataDir(options.dataDir);
    const security = securityFrom(options.auth, options.tls);
    const tls = security.mode === 'insecure' ? undefined : serverTls(security);
    const bs = options.blockSize ?? 4096;
    const indexFile = join(options.dataDir, REPOSITORY_INDEX_FILE);
    let n = existsSync(indexFile) ? Neighbourhood.load(indexFile) : new Neighbourhood(bs);
    if (n.blockSize !== bs) n = new Neighbourhood(bs);
    const scanner = new Scanner({ workers: 1 });
    try {
      for (const p of options.images) {
        if (n.images.some((i) => i.path === resolve(p))) continue;
        const [map] = await scanner.scan(p, { blockSize: bs, ...(signal ? { signal } : {}) });
        n.add(map!);
      }
    } finally {
      await scanner.close();
    }
    n.save(indexFile);
    const svc = new RepositoryService(options, n, tls);
    svc.listener = await listen(options.host ?? '127.0.0.1', options.port ?? 0, (s: Socket) => svc.gate.accept(s, (ch, ok) => svc.serve(ch, ok)));
    svc.unlisten = await closeOnAbort(svc, signal, 'repository service');
    return svc;
  }

  private unlisten: (() => void) | undefined;
  private closing: Promise<void> | undefined;

  get address(): { host: string; port: number } {
    return this.listener!.address;
  }

  get limited(): { overCap: number; deadline: number } {
    return this.gate.limited;
  }

  /** Every entry escaped and capped: see src/log.ts. */
  readonly logger: Logger;

  /** One connection: the handshake, then FETCH after FETCH until the peer closes. */
  async serve(ch: Channel, authenticated?: () => void): Promise<void> {
    ch.setIdleTimeout(this.options.idleTimeout ?? DEFAULT_IDLE_TIMEOUT_MS);
    await serverHandshake(ch, { ...this.options.auth, certificates: !!this.options.tls }, CAP_REPOSITORY);
    authenticated?.();
    for (;;) {
      // The destination is done with us: the ordinary end of a connection.
      const f = await ch.nextOrEnd();
      if (!f) return;
      if (f.type !== Msg.FETCH || f.id === 0) throw new ProtocolError(ErrorCode.PROTOCOL, `expected a FETCH request, got ${msgName(f.type)}${f.id === 0 ? ' without a request id' : ''}`);
      await ch.reply(f, FETCH_RESULT, await this.fetch(decode(FETCH, f.payload)));
    }
  }

  /** The contents held for each (fingerprint, signature), read from the images and checked again (an image may have changed since it was indexed). */
  async fetch(m: { blockSize: number; fingerprints: BigUint64Array; signatures: BigUint64Array }): Promise<FetchResult> {
    const bs = this.neighbourhood.blockSize;
    const n = m.fingerprints.length;
    if (m.blockSize !== bs) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `this repository holds ${bs}-byte blocks, not ${m.blockSize}`);
    if (n > 1 && n * bs > MAX_FETCH_BYTES) throw new ProtocolError(ErrorCode.PROTOCOL, `FETCH: ${n} blocks of ${bs} bytes (at most ${MAX_FETCH_BYTES} bytes a request)`);
    this.stats.requests++;
    this.stats.asked += n;
    const refs = this.neighbourhood.lookupColumns(m.fingerprints, m.signatures);
    const lengths = new Array<number>(n).fill(0);
    const parts: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      if (refs[i] === NO_REF) continue;
      const held = await this.file(refImage(refs[i]!));
      const at = refBlock(refs[i]!) * bs;
      if (!held || at >= held.size) continue;
      const len = Math.min(bs, held.size - at);
      const buf = Buffer.allocUnsafe(len);
      let got = 0;
      try {
        while (got < len) {
          const { bytesRead } = await held.fh.read(buf, got, len - got, at + got);
          if (bytesRead === 0) break;
          got += bytesRead;
        }
      } catch {
        continue; // an unreadable image: not held
      }
      if (got < len) continue;
      const fp = this.engine.fingerprints(buf, bs);
      if (fp.fingerprints[0] !== m.fingerprints[i] || fp.signatures[0] !== m.signatures[i]) continue; // the image changed since it was indexed
      lengths[i] = len;
      parts.push(buf);
    }
    this.stats.served += parts.length;
    return { lengths, data: Buffer.concat(parts) };
  }

  private file(id: number): Promise<Held | null> {
    let f = this.files.get(id);
    if (f === undefined) {
      const im = this.neighbourhood.images[id];
      f = im ? (async () => { const fh = await open(im.path, 'r'); return { fh, size: (await fh.stat()).size }; })().catch(() => null) : Promise.resolve(null);
      this.files.set(id, f);
    }
    return f;
  }

  /** Stops the service (idempotent). */
  close(): Promise<void> {
    return (this.closing ??= this.shutdown());
  }

  private async shutdown(): Promise<void> {
    this.unlisten?.();
    // server.close() waits for the open connections: they are ended first.
    const listening = this.listener?.close();
    this.gate.destroyAll();
    await listening;
    for (const f of this.files.values()) await f.then((h) => h?.fh.close()).catch(() => {});
    this.files.clear();
  }
}

