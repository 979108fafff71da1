// The destination service: receives migrations into its data directory and
// keeps the block index of the images it holds (its neighbourhood).
import type { Socket } from 'node:net';
import { existsSync, mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { BlockferryError, ErrorCode } from '../../errors.js';
import { Channel } from '../../protocol/channel.js';
import { CAPABILITIES, CAP_ZSTD, serverHandshake, type AuthOptions } from '../../protocol/handshake.js';
import { BEGIN, BEGIN_OVERWRITE, type Begin } from '../../protocol/messages.js';
import { listen, type Listener } from '../../transport/tcp.js';
import { Neighbourhood } from '../../blockindex/neighbourhood.js';
import { Scanner } from '../../scan/scanner.js';
import { FileImageSink, type ImageSink } from '../../image/sink.js';
import { FILL_SOURCES, type FillSource } from '../fills.js';
import type { Role } from '../role.js';
import { Journal } from './journal.js';
import { Session, type SessionStats } from './session.js';
import { decompressorFor } from '../../protocol/compression.js';

export type { SessionStats } from './session.js';

export const INDEX_FILE = 'neighbourhood.bfidx';
/** Image names: a plain file name, no path, no leading dot. */
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export interface DestinationOptions {
  dataDir: string;
  host?: string;
  port?: number;
  auth: AuthOptions;
  /** Block size of the neighbourhood index (migrations must use it). Default 4096. */
  blockSize?: number;
  /** Images to add to the neighbourhood at start. */
  neighbours?: string[];
  /** Accept compressed frames (default true). */
  compression?: boolean;
  log?: (line: string) => void;
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
  private readonly active = new Set<string>();
  private readonly sockets = new Set<Socket>();
  readonly neighbourhood: Neighbourhood;
  private readonly scanner: Scanner;
  readonly completed: SessionStats[] = [];
  private indexing: Promise<void> = Promise.resolve();

  private constructor(readonly options: DestinationOptions, neighbourhood: Neighbourhood, scanner: Scanner) {
    this.neighbourhood = neighbourhood;
    this.scanner = scanner;
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
    try {
      svc.listener = await listen(options.host ?? '127.0.0.1', options.port ?? 0, (s) => svc.accept(s));
    } catch (e) {
      await scanner.close();
      throw e;
    }
    return svc;
  }

  get address(): { host: string; port: number } {
    return this.listener!.address;
  }

  private log(line: string): void {
    this.options.log?.(line);
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    const ch = new Channel(socket);
    this.serve(ch).catch((e: Error) => {
      const code = e instanceof BlockferryError ? e.code : ErrorCode.INTERNAL;
      this.log(`migration from ${socket.remoteAddress} failed: ${code}: ${e.message}`);
      void ch.sendError(code, e.message);
    });
  }

  async close(): Promise<void> {
    await this.listener?.close();
    for (const s of this.sockets) s.destroy();
    await this.indexing;
    await this.scanner.close();
  }

  /** One connection: handshake, BEGIN, the session, then the new image into the neighbourhood. */
  async serve(ch: Channel): Promise<void> {
    const caps = await serverHandshake(ch, this.options.auth, this.options.compression === false ? CAPABILITIES & ~CAP_ZSTD : CAPABILITIES);
    const begin = await ch.recv(BEGIN);
    this.check(begin);
    const final = join(this.options.dataDir, `${begin.name}.img`);
    this.active.add(begin.name);
    let stats: SessionStats;
    try {
      ch.setCodec(undefined, decompressorFor(caps));
      stats = await new Session(ch, await this.open(begin, final)).run();
    } finally {
      this.active.delete(begin.name);
    }
    this.completed.push(stats);
    this.log(`migration into ${begin.name} complete: ${JSON.stringify(stats)}`);
    // After DONE and outside the busy window: indexing is not part of the
    // migration, and the complete image is no longer "being migrated".
    this.indexing = this.indexing.then(() => this.indexImage(final)).catch((e: Error) => this.log(`indexing ${final} failed: ${e.message}`));
    await this.indexing;
  }

  private check(b: Begin): void {
    if (!NAME_RE.test(b.name) || b.name.includes('..')) throw new BlockferryError(ErrorCode.NAME_INVALID, `image name ${JSON.stringify(b.name)} is not a plain file name`);
    if (b.blockSize !== this.neighbourhood.blockSize) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `this destination works at ${this.neighbourhood.blockSize}-byte blocks, not ${b.blockSize}`);
    if (!Number.isSafeInteger(b.size) || b.size < 0) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `image size ${b.size}`);
    if (this.active.has(b.name)) throw new BlockferryError(ErrorCode.BUSY, `a migration into ${b.name} is already running`);
    const final = join(this.options.dataDir, `${b.name}.img`);
    if (existsSync(final) && !(b.flags & BEGIN_OVERWRITE)) throw new BlockferryError(ErrorCode.IMAGE_EXISTS, `${b.name} exists at the destination (migrate with --overwrite to replace it)`);
  }

  /** The partial image and journal: an earlier attempt's when they match, else fresh. */
  private async open(b: Begin, final: string): Promise<ConstructorParameters<typeof Session>[1]> {
    const partial = `${final}.partial`;
    const journalFile = `${final}.journal`;
    let journal: Journal | undefined;
    try {
      journal = existsSync(partial) ? Journal.load(journalFile) : undefined;
    } catch {
      journal = undefined; // a damaged journal: start over, never trust it
    }
    if (journal && (journal.size !== b.size || journal.blockSize !== b.blockSize)) journal = undefined;
    let sink: ImageSink | undefined;
    if (journal) {
      try {
        sink = await FileImageSink.reopen(partial, final, b.size);
      } catch (e) {
        if (e instanceof BlockferryError && e.code === ErrorCode.WRITE_FAILED) throw e; // a planted link: refuse, loudly
        journal = undefined;
      }
    }
    const resumed = !!journal;
    if (!journal) {
      journal = Journal.fresh(b.size, b.blockSize);
      sink = await FileImageSink.create(partial, final, b.size);
      journal.save(journalFile);
    }
    const fills: FillSource[] = [];
    for (const f of FILL_SOURCES) {
      if (!(b.fills & f.bit)) continue;
      const src = f.open({ neighbourhood: this.neighbourhood });
      if (src) fills.push(src);
    }
    return { name: b.name, size: b.size, blockSize: b.blockSize, sink: sink!, journal, journalFile, resumed, fills };
  }

  /** Adds a completed image to the neighbourhood (once; re-scanned when replaced) and saves the index. */
  async indexImage(path: string): Promise<void> {
    const [map] = await this.scanner.scan(path, { blockSize: this.neighbourhood.blockSize });
    const existing = this.neighbourhood.images.find((i) => i.path === resolve(path));
    if (!existing) this.neighbourhood.add(map!);
    this.neighbourhood.save(join(this.options.dataDir, INDEX_FILE));
  }
}
