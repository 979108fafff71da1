// An NBD server: serves NbdExports to NBD clients (qemu, nbdcopy, nbdinfo,
// the kernel's nbd-client) over TCP or a Unix socket. It is written for an
// export whose reads may wait (post-copy: a block still on its way), so no
// request ever waits for another: every request runs as soon as its header
// (and payload) is in, replies go out in the order they complete, and the
// only thing a slow request holds is one of its connection's in-flight slots.
// Fixed newstyle negotiation only; no TLS (STARTTLS is refused: keep NBD on a
// Unix socket or a trusted network). The wire format is doc/proto.md of the
// NBD project.
import { createConnection, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { lstatSync, rmSync } from 'node:fs';
import { BlockferryError, ErrorCode, InvalidArgumentError, isNoSpace } from '../errors.js';
import { listenFailure } from '../transport/tcp.js';
import { escapeForLog } from '../util/sanitize.js';
import { serviceLogger, type Logger } from '../log.js';
import {
  BASE_ALLOCATION, decodeRequest, encodeChunkHeader, encodeOptionReply, encodeSimpleReply, EXPORT_NAME_ZEROES,
  INFO_BLOCK_SIZE_BYTES, INFO_EXPORT_BYTES, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ,
  NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP,
  NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES, NBD_IHAVEOPT, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME,
  NBD_MAGIC, NBD_MAX_PAYLOAD, NBD_MAX_STRING, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO,
  NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP,
  NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NbdExportError, OPTION_HEADER_BYTES,
  REQUEST_HEADER_BYTES, type NbdExport, type NbdRequest, type StatusExtent,
} from './protocol.js';

/** Exports by name: a fixed map, or a function asked at every negotiation (exports may appear while the server runs). */
export type NbdExports = ReadonlyMap<string, NbdExport> | ((name: string) => NbdExport | undefined);

/** Where the server listens: TCP (port 0: any free port) or a Unix socket. */
export type NbdAddress = { host: string; port: number } | { path: string };

export interface NbdServerOptions {
  listen: NbdAddress;
  exports: NbdExports;
  /** The export a client gets when it asks for the empty name "" (what `qemu-img info nbd://host` asks for). */
  defaultExport?: string;
  /** Names NBD_OPT_LIST answers with when `exports` is a function (a map lists its keys). */
  list?: () => Iterable<string>;
  /** Milliseconds a connection has from accept to the end of negotiation before it is closed. Default 10 s. */
  negotiationTimeout?: number;
  /** Connections at once; beyond, new ones are closed at once. Default 64. */
  maxConnections?: number;
  /** Options a client may send before it starts transmission; beyond, the connection is closed. Default 64. */
  maxOptions?: number;
  /** Requests in flight per connection (read, running, or with a reply not yet sent); at the cap the socket is not read. Default 16. */
  maxInFlight?: number;
  /** Payload bytes (WRITE data, READ replies) in flight per connection; at the cap the socket is not read. Default 64 MiB. */
  maxInFlightBytes?: number;
  /** An export method failed with something other than an NbdExportError (the client got EIO). */
  onError?: (error: unknown, where: { export: string; command: string; offset: number; length: number }) => void;
  /** Connections refused or closed for breaking the protocol or the limits, one line each. */
  /** Where the server logs (levels and fields; a pino logger works). */
  logger?: Logger;
  /** Older form: each entry as one line of text. Ignored when logger is given. */
  log?: (line: string) => void;
}

/** Longest option payload read; longer ones are answered NBD_REP_ERR_TOO_BIG and the connection closed (a name, a few info requests or context queries fit). */
export const MAX_OPTION_BYTES = 4 * NBD_MAX_STRING;
export const DEFAULT_NEGOTIATION_TIMEOUT_MS = 10_000;
/** Block sizes advertised (NBD_INFO_BLOCK_SIZE): any alignment works, 4 KiB is best. */
const MIN_BLOCK = 1;
const PREFERRED_BLOCK = 4096;
/** The id of base:allocation on every connection (the only context served). */
const BASE_ALLOCATION_ID = 1;
/** Extents in one BLOCK_STATUS reply at most (a 512 KiB chunk); the client asks again for the rest. */
const MAX_EXTENTS = 65536;
/** Bytes buffered from a socket when no request is being read; above it the socket is paused. */
const READ_HIGH_WATER = 256 << 10;
/** How long replies may take to leave once the connection is ending; then it is cut. */
const DRAIN_GRACE_MS = 10_000;
const KNOWN_CMD_FLAGS = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;
/** Error numbers the protocol defines; an export's other numbers go out as EIO. */
const WIRE_ERRNOS = new Set([NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN]);
const COMMAND_NAMES = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'];

/** The connection ends here: the peer broke the protocol or went away (never reported to it). */
class ConnectionEnd extends Error {}

/**
 * Reads exact byte counts from a socket. It buffers at most READ_HIGH_WATER
 * bytes (or what the pending read asks for) and pauses the socket beyond:
 * a connection that is not being read cannot make the server hold more.
 */
class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want = 0;
  private waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private ended: Error | undefined;

  constructor(private readonly socket: Socket) {
    socket.on('data', (c: Buffer) => {
      this.chunks.push(c);
      this.buffered += c.length;
      if (this.buffered >= Math.max(this.want, READ_HIGH_WATER)) socket.pause();
      this.wake();
    });
    const end = () => this.fail(new ConnectionEnd('the client closed the connection'));
    socket.on('end', end);
    socket.on('close', end);
  }

  read(n: number): Promise<Buffer> {
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.ended) return Promise.reject(this.ended);
    this.want = n;
    this.socket.resume();
    return new Promise((resolve, reject) => { this.waiter = { resolve, reject }; });
  }

  fail(e: Error): void {
    this.ended ??= e;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(this.ended);
  }

  private wake(): void {
    if (!this.waiter || this.buffered < this.want) return;
    const w = this.waiter;
    this.waiter = undefined;
    const b = this.take(this.want);
    this.want = 0;
    w.resolve(b);
  }

  private take(n: number): Buffer {
    const first = this.chunks[0];
    let out: Buffer;
    if (first && first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    return out;
  }
}

/**
 * Serves exports over NBD until close(). Any number of clients at once (up
 * to maxConnections), each with up to maxInFlight requests running
 * concurrently; a failing export method answers that one request with an
 * error and never ends the connection or the process.
 */
export class NbdServer {
  private readonly connections = new Set<Connection>();
  private closing: Promise<void> | undefined;
  /** The Unix socket file this server made (its inode), to remove it on close and never another's. */
  private socketFile: { path: string; ino: number } | undefined;
  private guardedLogger: Logger | undefined;
  /** Connections closed by the limits: over maxConnections, past the negotiation deadline, over maxOptions. */
  readonly limited = { overCap: 0, deadline: 0, options: 0 };

  private constructor(readonly options: NbdServerOptions, private readonly server: Server, private readonly bound: NbdAddress) {}

  static async listen(options: NbdServerOptions): Promise<NbdServer> {
    for (const k of ['negotiationTimeout', 'maxConnections', 'maxOptions', 'maxInFlight', 'maxInFlightBytes'] as const) {
      const v = options[k];
      if (v !== undefined && !(Number.isSafeInteger(v) && v >= 1)) throw new InvalidArgumentError(k, 'a positive integer', v);
    }
    const where = 'path' in options.listen ? options.listen.path : `${options.listen.host}:${options.listen.port}`;
    if ('path' in options.listen) await clearStaleSocket(options.listen.path);
    let self: NbdServer | undefined;
    // Half-open: a client that ends its side after its last request still gets the replies.
    const server = createServer({ allowHalfOpen: true }, (s) => self ? self.accept(s) : s.destroy());
    await new Promise<void>((res, rej) => {
      server.once('error', (e) => rej(listenFailure(e, where)));
      if ('path' in options.listen) server.listen(options.listen.path, () => res());
      else server.listen(options.listen.port, options.listen.host, () => res());
    });
    server.on('error', () => {}); // accept() failures (EMFILE): the listener goes on
    let bound: NbdAddress;
    if ('path' in options.listen) {
      bound = { path: options.listen.path };
    } else {
      const a = server.address() as AddressInfo;
      bound = { host: a.address, port: a.port };
    }
    self = new NbdServer(options, server, bound);
    if ('path' in bound) {
      try { self.socketFile = { path: bound.path, ino: lstatSync(bound.path).ino }; } catch { /* removed under us: nothing to clean up */ }
    }
    return self;
  }

  get address(): NbdAddress {
    return this.bound;
  }

  /** The NBD URI of an export here (libnbd and QEMU syntax). */
  uri(name = ''): string {
    return nbdUri(this.bound, name);
  }

  /** Connections open now (negotiating or transmitting). */
  get connectionCount(): number {
    return this.connections.size;
  }

  /** The export a client's name selects ("" the default one), or undefined (what negotiation asks). */
  resolve(name: string): NbdExport | undefined {
    const n = name === '' && this.options.defaultExport !== undefined ? this.options.defaultExport : name;
    const e = this.options.exports;
    return typeof e === 'function' ? e(n) : e.get(n);
  }

  /** The names NBD_OPT_LIST answers with. */
  listNames(): string[] {
    const e = this.options.exports;
    if (typeof e !== 'function') return [...e.keys()];
    return this.options.list ? [...this.options.list()] : [];
  }

  /** Every entry escaped and capped (peer text in it): see src/log.ts. */
  get logger(): Logger {
    return (this.guardedLogger ??= serviceLogger(this.options, { role: 'nbd' }));
  }

  private accept(socket: Socket): void {
    socket.on('error', () => {}); // a reset peer ends its connection through 'close'
    if (this.closing || this.connections.size >= (this.options.maxConnections ?? 64)) {
      if (!this.closing) {
        this.limited.overCap++;
        this.logger.warn({ peer: peerOf(socket), code: ErrorCode.LIMIT }, `connection from ${peerOf(socket)} refused: ${ErrorCode.LIMIT}: ${this.connections.size} connections already`);
      }
      socket.destroy();
      return;
    }
    if (socket.remoteAddress !== undefined) {
      // TCP: replies leave at once, and a peer that vanished is noticed (NBD connections may idle for hours).
      socket.setNoDelay(true);
      socket.setKeepAlive(true, 10_000);
    }
    const c = new Connection(this, socket);
    this.connections.add(c);
    socket.once('close', () => this.connections.delete(c));
    void c.run();
  }

  /**
   * Stops listening, lets every connection finish the requests it has
   * started (their replies are sent), then closes them; connections still
   * negotiating are closed at once. Removes the Unix socket file.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const stopped = new Promise<void>((res) => this.server.close(() => res()));
      await Promise.all([...this.connections].map((c) => c.shutdown()));
      await stopped;
      const f = this.socketFile;
      if (f) {
        try {
          const st = lstatSync(f.path);
          if (st.isSocket() && st.ino === f.ino) rmSync(f.path, { force: true });
        } catch { /* gone already (libuv unlinks it on close) */ }
      }
    })();
    return this.closing;
  }
}

/** One client: negotiation, then transmission. */
class Connection {
  private readonly reader: SocketReader;
  private readonly peer: string;
  private noZeroes = false;
  private structured = false;
  /** base:allocation selected (NBD_OPT_SET_META_CONTEXT), and for which export name. */
  private context: { name: string; allocation: boolean } | undefined;
  private exp: NbdExport | undefined;
  private expName = '';
  private flags = 0;
  private transmitting = false;
  private stopping = false;
  private inFlight = 0;
  private inFlightBytes = 0;
  /** Requests whose export work runs (the export has not answered yet). */
  private readonly working = new Set<Promise<Buffer[]>>();
  /** Requests not finished: working, or with a reply not yet sent. */
  private readonly running = new Set<Promise<void>>();
  private slotFreed: (() => void) | undefined;
  private done: Promise<void> = Promise.resolve();

  private readonly closed: Promise<void>;

  constructor(private readonly server: NbdServer, private readonly socket: Socket) {
    this.reader = new SocketReader(socket);
    this.closed = new Promise((r) => socket.once('close', () => r()));
    this.peer = peerOf(socket);
  }

  async run(): Promise<void> {
    let finished!: () => void;
    this.done = new Promise((r) => { finished = r; });
    const o = this.server.options;
    const timeout = o.negotiationTimeout ?? DEFAULT_NEGOTIATION_TIMEOUT_MS;
    const deadline = setTimeout(() => {
      this.server.limited.deadline++;
      this.server.logger.warn({ peer: this.peer, code: ErrorCode.LIMIT }, `connection from ${this.peer} closed: ${ErrorCode.LIMIT}: negotiation not finished within ${timeout} ms`);
      this.socket.destroy();
    }, timeout);
    deadline.unref();
    try {
      if (await this.negotiate()) {
        clearTimeout(deadline);
        this.transmitting = true;
        await this.transmit();
      }
    } catch (e) {
      if (!(e instanceof ConnectionEnd)) this.server.logger.info({ peer: this.peer, error: e }, `connection from ${this.peer} closed: ${(e as Error).message}`);
    } finally {
      clearTimeout(deadline);
      // Requests already read finish (DISC, close(), a client that went away)...
      await Promise.all([...this.working]);
      // ... and their replies go out, unless the client does not read them.
      const drained = Promise.all([...this.running]);
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([drained, new Promise<void>((r) => { timer = setTimeout(r, DRAIN_GRACE_MS); })]);
      clearTimeout(timer);
      this.endSocket();
      finished();
    }
  }

  /** Stops reading requests; settles once the running ones have replied and the socket is closed. */
  async shutdown(): Promise<void> {
    this.stopping = true;
    if (!this.transmitting) this.socket.destroy();
    // A request header or a payload only partly in: dropped, never started.
    this.reader.fail(new ConnectionEnd('the server is closing'));
    this.slotFreed?.();
    await this.done;
  }

  private endSocket(): void {
    if (this.socket.destroyed) return;
    // After the last reply is flushed; a peer that never reads does not keep it open.
    this.socket.end(() => this.socket.destroy());
    setTimeout(() => this.socket.destroy(), 2000).unref();
  }

  private send(parts: Buffer[]): Promise<void> {
    if (this.socket.destroyed || this.socket.writableEnded) return Promise.resolve();
    const written = new Promise<void>((res) => {
      // Written in one go: a reply's parts are never split by another reply (replies of concurrent requests interleave only whole).
      this.socket.cork();
      for (let i = 0; i < parts.length - 1; i++) this.socket.write(parts[i]!);
      this.socket.write(parts[parts.length - 1]!, () => res());
      this.socket.uncork();
    });
    // A reply to a client that went away is done too (its request must not stay in flight).
    return Promise.race([written, this.closed]);
  }

  // ---- negotiation ----

  /** Fixed newstyle negotiation; true once an export is chosen, false when the client aborted. */
  private async negotiate(): Promise<boolean> {
    const hello = Buffer.allocUnsafe(18);
    hello.writeBigUInt64BE(NBD_MAGIC, 0);
    hello.writeBigUInt64BE(NBD_IHAVEOPT, 8);
    hello.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
    void this.send([hello]);
    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    // Unknown client flags, or a client that does not speak fixed newstyle: the specification says close.
    if (!(clientFlags & NBD_FLAG_C_FIXED_NEWSTYLE) || clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
      throw new BlockferryError(ErrorCode.NBD, `client flags 0x${clientFlags.toString(16)}: fixed newstyle only`);
    }
    this.noZeroes = !!(clientFlags & NBD_FLAG_C_NO_ZEROES);
    const maxOptions = this.server.options.maxOptions ?? 64;
    for (let count = 1; ; count++) {
      if (this.stopping) throw new ConnectionEnd('the server is closing');
      const h = await this.reader.read(OPTION_HEADER_BYTES);
      if (h.readBigUInt64BE(0) !== NBD_IHAVEOPT) throw new BlockferryError(ErrorCode.NBD, 'an option without the IHAVEOPT magic');
      const option = h.readUInt32BE(8);
      const length = h.readUInt32BE(12);
      if (count > maxOptions) {
        this.server.limited.options++;
        throw new BlockferryError(ErrorCode.LIMIT, `more than ${maxOptions} options before transmission`);
      }
      if (length > MAX_OPTION_BYTES) {
        // Its data is not read (it could be 4 GiB): refused, then the connection ends.
        await this.reply(option, NBD_REP_ERR_TOO_BIG, errorText(`option of ${length} bytes, at most ${MAX_OPTION_BYTES}`));
        throw new BlockferryError(ErrorCode.NBD, `option ${option} of ${length} bytes (at most ${MAX_OPTION_BYTES})`);
      }
      const data = await this.reader.read(length);
      switch (option) {
        case NBD_OPT_EXPORT_NAME:
          this.exportName(data);
          return true;
        case NBD_OPT_GO:
        case NBD_OPT_INFO:
          if (await this.info(option, data)) return true;
          break;
        case NBD_OPT_ABORT:
          await this.reply(option, NBD_REP_ACK);
          return false;
        case NBD_OPT_LIST:
          if (length) await this.reply(option, NBD_REP_ERR_INVALID, errorText('NBD_OPT_LIST takes no data'));
          else await this.list();
          break;
        case NBD_OPT_STRUCTURED_REPLY:
          if (length) {
            await this.reply(option, NBD_REP_ERR_INVALID, errorText('NBD_OPT_STRUCTURED_REPLY takes no data'));
          } else {
            this.structured = true;
            await this.reply(option, NBD_REP_ACK);
          }
          break;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
          await this.metaContext(option, data);
          break;
        case NBD_OPT_STARTTLS:
          await this.reply(option, NBD_REP_ERR_POLICY, errorText('TLS is not offered: reach this server over a Unix socket or a trusted network'));
          break;
        default:
          await this.reply(option, NBD_REP_ERR_UNSUP, errorText(`option ${option} is not supported`));
      }
    }
  }

  private reply(option: number, type: number, payload: Buffer = EMPTY): Promise<void> {
    return this.send([encodeOptionReply(option, type, payload.length), payload]);
  }

  /** NBD_OPT_EXPORT_NAME: no way to refuse but closing (the specification's answer to an unknown name). */
  private exportName(data: Buffer): void {
    if (data.length > NBD_MAX_STRING) throw new BlockferryError(ErrorCode.NBD, `an export name of ${data.length} bytes`);
    const name = data.toString('utf8');
    const exp = this.server.resolve(name);
    if (!exp) throw new BlockferryError(ErrorCode.NBD, `no export named ${JSON.stringify(escapeForLog(name))}`);
    this.select(name, exp);
    const b = Buffer.alloc(10 + (this.noZeroes ? 0 : EXPORT_NAME_ZEROES));
    b.writeBigUInt64BE(BigInt(exp.size), 0);
    b.writeUInt16BE(this.flags, 8);
    void this.send([b]);
  }

  /** NBD_OPT_INFO and NBD_OPT_GO; true when GO chose an export. */
  private async info(option: number, data: Buffer): Promise<boolean> {
    if (data.length < 6) return this.invalid(option, 'truncated');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > NBD_MAX_STRING) {
      await this.reply(option, NBD_REP_ERR_TOO_BIG, errorText(`an export name of ${nameLength} bytes, at most ${NBD_MAX_STRING}`));
      return false;
    }
    if (data.length < 4 + nameLength + 2) return this.invalid(option, 'truncated');
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 4 + nameLength + 2 + 2 * count) return this.invalid(option, 'its length does not match its information requests');
    const wanted = new Set<number>();
    for (let i = 0; i < count; i++) wanted.add(data.readUInt16BE(4 + nameLength + 2 + 2 * i));
    const exp = this.server.resolve(name);
    if (!exp) {
      await this.reply(option, NBD_REP_ERR_UNKNOWN, errorText(`no export named ${JSON.stringify(name.slice(0, 256))}`));
      return false;
    }
    const flags = transmissionFlags(exp, this.structured);
    const e = Buffer.allocUnsafe(INFO_EXPORT_BYTES);
    e.writeUInt16BE(NBD_INFO_EXPORT, 0);
    e.writeBigUInt64BE(BigInt(exp.size), 2);
    e.writeUInt16BE(flags, 10);
    await this.reply(option, NBD_REP_INFO, e);
    // Always sent: the client learns the limits even when it did not ask (they are loose: any alignment works).
    const bs = Buffer.allocUnsafe(INFO_BLOCK_SIZE_BYTES);
    bs.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
    bs.writeUInt32BE(MIN_BLOCK, 2);
    bs.writeUInt32BE(PREFERRED_BLOCK, 6);
    bs.writeUInt32BE(NBD_MAX_PAYLOAD, 10);
    await this.reply(option, NBD_REP_INFO, bs);
    if (wanted.has(NBD_INFO_NAME)) await this.reply(option, NBD_REP_INFO, infoString(NBD_INFO_NAME, exp.name));
    if (wanted.has(NBD_INFO_DESCRIPTION) && exp.description) await this.reply(option, NBD_REP_INFO, infoString(NBD_INFO_DESCRIPTION, exp.description));
    await this.reply(option, NBD_REP_ACK);
    if (option !== NBD_OPT_GO) return false;
    this.select(name, exp);
    return true;
  }

  private select(name: string, exp: NbdExport): void {
    this.exp = exp;
    this.expName = name;
    this.flags = transmissionFlags(exp, this.structured);
    // Contexts chosen for another export name do not carry over to this one.
    if (this.context && this.context.name !== name) this.context = undefined;
  }

  private async invalid(option: number, why: string): Promise<false> {
    await this.reply(option, NBD_REP_ERR_INVALID, errorText(`option ${option}: ${why}`));
    return false;
  }

  private async list(): Promise<void> {
    for (const name of this.server.listNames()) {
      const n = Buffer.from(name, 'utf8');
      if (n.length > NBD_MAX_STRING) continue;
      const b = Buffer.allocUnsafe(4 + n.length);
      b.writeUInt32BE(n.length, 0);
      n.copy(b, 4);
      await this.reply(NBD_OPT_LIST, NBD_REP_SERVER, b);
    }
    await this.reply(NBD_OPT_LIST, NBD_REP_ACK);
  }

  /** NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: base:allocation is the one context; others are simply not selected. */
  private async metaContext(option: number, data: Buffer): Promise<void> {
    const set = option === NBD_OPT_SET_META_CONTEXT;
    if (set && !this.structured) {
      await this.reply(option, NBD_REP_ERR_INVALID, errorText('metadata contexts need structured replies (NBD_OPT_STRUCTURED_REPLY) first'));
      return;
    }
    if (data.length < 8) return void await this.invalid(option, 'truncated');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > NBD_MAX_STRING) {
      await this.reply(option, NBD_REP_ERR_TOO_BIG, errorText(`an export name of ${nameLength} bytes, at most ${NBD_MAX_STRING}`));
      return;
    }
    if (data.length < 4 + nameLength + 4) return void await this.invalid(option, 'truncated');
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt32BE(4 + nameLength);
    const queries: string[] = [];
    let at = 4 + nameLength + 4;
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) return void await this.invalid(option, 'truncated query');
      const len = data.readUInt32BE(at);
      if (len > NBD_MAX_STRING) {
        await this.reply(option, NBD_REP_ERR_TOO_BIG, errorText(`a context query of ${len} bytes, at most ${NBD_MAX_STRING}`));
        return;
      }
      if (at + 4 + len > data.length) return void await this.invalid(option, 'truncated query');
      queries.push(data.toString('utf8', at + 4, at + 4 + len));
      at += 4 + len;
    }
    if (at !== data.length) return void await this.invalid(option, 'trailing bytes after the queries');
    if (!this.server.resolve(name)) {
      await this.reply(option, NBD_REP_ERR_UNKNOWN, errorText(`no export named ${JSON.stringify(name.slice(0, 256))}`));
      return;
    }
    // LIST: no query lists everything, and a namespace ("base:") lists what is in it. SET: exact names only.
    const matches = set
      ? queries.includes(BASE_ALLOCATION)
      : queries.length === 0 || queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
    if (matches) {
      const n = Buffer.from(BASE_ALLOCATION, 'ascii');
      const b = Buffer.allocUnsafe(4 + n.length);
      // A listed context's id means nothing (the specification suggests 0).
      b.writeUInt32BE(set ? BASE_ALLOCATION_ID : 0, 0);
      n.copy(b, 4);
      await this.reply(option, NBD_REP_META_CONTEXT, b);
    }
    if (set) this.context = { name, allocation: matches };
    await this.reply(option, NBD_REP_ACK);
  }

  // ---- transmission ----

  private async transmit(): Promise<void> {
    const o = this.server.options;
    const maxInFlight = o.maxInFlight ?? 16;
    const maxBytes = o.maxInFlightBytes ?? 64 << 20;
    for (;;) {
      // At the cap nothing more is read: the client's requests wait in its socket buffer (backpressure).
      while (!this.stopping && (this.inFlight >= maxInFlight || this.inFlightBytes >= maxBytes)) {
        await new Promise<void>((r) => { this.slotFreed = r; });
        this.slotFreed = undefined;
      }
      if (this.stopping) return;
      const h = await this.reader.read(REQUEST_HEADER_BYTES);
      const req = decodeRequest(h);
      if (!req) throw new BlockferryError(ErrorCode.NBD, 'a request without the request magic');
      if (req.type === NBD_CMD_DISC) return;
      let data: Buffer | undefined;
      if (req.type === NBD_CMD_WRITE) {
        // Its payload cannot be skipped without reading it all: a length this large ends the connection.
        if (req.length > NBD_MAX_PAYLOAD) throw new BlockferryError(ErrorCode.NBD, `a WRITE of ${req.length} bytes (at most ${NBD_MAX_PAYLOAD})`);
        data = await this.reader.read(req.length);
      }
      const bytes = req.type === NBD_CMD_WRITE || (req.type === NBD_CMD_READ && req.length <= NBD_MAX_PAYLOAD) ? req.length : 0;
      this.inFlight++;
      this.inFlightBytes += bytes;
      const work: Promise<Buffer[]> = this.handle(req, data)
        .catch((e) => {
          // A bug here, not the export's failure (handle() answers those): the client still gets its reply.
          this.server.logger.error({ peer: this.peer, command: COMMAND_NAMES[req.type] ?? req.type, error: e }, `connection from ${this.peer}: ${COMMAND_NAMES[req.type] ?? req.type} failed unexpectedly: ${(e as Error).message}`);
          return this.error(req, NBD_EIO, 'internal error');
        })
        .finally(() => this.working.delete(work));
      this.working.add(work);
      // Still in flight until its reply is handed to the kernel: a client that does not read cannot make the server hold more.
      const p: Promise<void> = work.then((parts) => this.send(parts)).finally(() => {
        this.running.delete(p);
        this.inFlight--;
        this.inFlightBytes -= bytes;
        this.slotFreed?.();
      });
      this.running.add(p);
    }
  }

  /** One request: what the export answers, as the reply's parts (sent by the caller). */
  private async handle(req: NbdRequest, data: Buffer | undefined): Promise<Buffer[]> {
    const exp = this.exp!;
    const invalid = this.check(req, exp);
    if (invalid) return this.error(req, invalid.errno, invalid.message);
    try {
      switch (req.type) {
        case NBD_CMD_READ: {
          const bytes = req.length ? await exp.read(req.offset, req.length) : new Uint8Array(0);
          if (bytes.length !== req.length) throw new Error(`the export read ${bytes.length} bytes, not ${req.length}`);
          const view = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
          if (!this.structured) return [encodeSimpleReply(req.cookie, 0), view];
          if (!req.length) return [encodeChunkHeader(req.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0)];
          const off = Buffer.allocUnsafe(8);
          off.writeBigUInt64BE(BigInt(req.offset), 0);
          // One data chunk, even with DF: the whole read is in hand before anything is sent.
          return [encodeChunkHeader(req.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8 + view.length), off, view];
        }
        case NBD_CMD_WRITE:
          await exp.write!(req.offset, data!, !!(req.flags & NBD_CMD_FLAG_FUA));
          break;
        case NBD_CMD_FLUSH:
          await exp.flush!();
          break;
        case NBD_CMD_TRIM:
          if (req.length) await exp.trim!(req.offset, req.length);
          if (req.flags & NBD_CMD_FLAG_FUA && exp.flush) await exp.flush();
          break;
        case NBD_CMD_WRITE_ZEROES: {
          const fast = !!(req.flags & NBD_CMD_FLAG_FAST_ZERO);
          if (fast && !exp.fastZero) return this.error(req, NBD_ENOTSUP, 'fast zeroing is not supported');
          if (req.length) await exp.zero!(req.offset, req.length, !(req.flags & NBD_CMD_FLAG_NO_HOLE), !!(req.flags & NBD_CMD_FLAG_FUA), fast);
          break;
        }
        case NBD_CMD_BLOCK_STATUS:
          return await this.blockStatus(req, exp);
        case NBD_CMD_CACHE:
          // A hint; the export reads what it needs when asked.
          break;
      }
    } catch (e) {
      return this.error(req, ...this.failure(e, req));
    }
    return [encodeSimpleReply(req.cookie, 0)];
  }

  /** A request the server refuses before the export sees it: an errno and why, or undefined. */
  private check(req: NbdRequest, exp: NbdExport): { errno: number; message: string } | undefined {
    const f = req.flags;
    const t = req.type;
    if (t > NBD_CMD_BLOCK_STATUS) return { errno: NBD_EINVAL, message: `unknown command ${t}` };
    // Flags a command does not document are refused (the specification's SHOULD); FUA is ignored where it means nothing.
    const allowed = NBD_CMD_FLAG_FUA
      | (t === NBD_CMD_READ ? NBD_CMD_FLAG_DF : 0)
      | (t === NBD_CMD_WRITE_ZEROES ? NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO : 0)
      | (t === NBD_CMD_BLOCK_STATUS ? NBD_CMD_FLAG_REQ_ONE : 0);
    if (f & ~allowed || f & ~KNOWN_CMD_FLAGS) return { errno: NBD_EINVAL, message: `flags 0x${f.toString(16)} are not valid for ${COMMAND_NAMES[t]}` };
    const writes = t === NBD_CMD_WRITE || t === NBD_CMD_TRIM || t === NBD_CMD_WRITE_ZEROES;
    if (writes && this.flags & NBD_FLAG_READ_ONLY) return { errno: NBD_EPERM, message: 'the export is read-only' };
    const supported = t === NBD_CMD_TRIM ? exp.trim : t === NBD_CMD_WRITE_ZEROES ? exp.zero : t === NBD_CMD_FLUSH ? exp.flush : true;
    if (!supported) return { errno: NBD_EINVAL, message: `${COMMAND_NAMES[t]} is not supported by this export` };
    if (t === NBD_CMD_BLOCK_STATUS && !this.context?.allocation) return { errno: NBD_EINVAL, message: 'no metadata context was selected' };
    if (t === NBD_CMD_FLUSH) return undefined;
    if (t === NBD_CMD_READ && req.length > NBD_MAX_PAYLOAD) return { errno: NBD_EINVAL, message: `a read of ${req.length} bytes, at most ${NBD_MAX_PAYLOAD}` };
    if (t === NBD_CMD_BLOCK_STATUS && req.length === 0) return { errno: NBD_EINVAL, message: 'a block status of 0 bytes' };
    if (req.offset > exp.size || req.length > exp.size - req.offset) {
      // Writing past the end is "no space" (the specification); anything else past it is an invalid request.
      const errno = t === NBD_CMD_WRITE || t === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
      return { errno, message: `bytes ${req.offset}+${req.length} are past the end of the export (${exp.size} bytes)` };
    }
    return undefined;
  }

  /** An export method's failure as an errno: its own NbdExportError, a full disk, else EIO (reported to onError). */
  private failure(e: unknown, req: NbdRequest): [number, string] {
    if (e instanceof NbdExportError) return [WIRE_ERRNOS.has(e.errno) ? e.errno : NBD_EIO, e.message];
    if (isNoSpace(e)) return [NBD_ENOSPC, 'no space left'];
    try {
      this.server.options.onError?.(e, { export: this.expName, command: COMMAND_NAMES[req.type] ?? String(req.type), offset: req.offset, length: req.length });
    } catch { /* a throwing callback must not take the connection down */ }
    return [NBD_EIO, 'input/output error'];
  }

  private error(req: NbdRequest, errno: number, message: string): Buffer[] {
    // A READ must be answered with chunks once structured replies are on; other commands may use a simple reply.
    if (!this.structured || req.type !== NBD_CMD_READ) return [encodeSimpleReply(req.cookie, errno)];
    const m = Buffer.from(message.slice(0, 256), 'utf8');
    const p = Buffer.allocUnsafe(6 + m.length);
    p.writeUInt32BE(errno, 0);
    p.writeUInt16BE(m.length, 4);
    m.copy(p, 6);
    return [encodeChunkHeader(req.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, p.length), p];
  }

  /** base:allocation from the export, clipped to the request (one extent with REQ_ONE), merged where flags repeat. */
  private async blockStatus(req: NbdRequest, exp: NbdExport): Promise<Buffer[]> {
    const got: StatusExtent[] = await exp.allocation(req.offset, req.length);
    const one = !!(req.flags & NBD_CMD_FLAG_REQ_ONE);
    const out: StatusExtent[] = [];
    let left = req.length;
    for (const e of got) {
      if (left === 0 || out.length >= MAX_EXTENTS) break;
      const len = Math.min(Math.max(0, Math.floor(e.length)), left);
      if (len === 0) continue;
      const flags = e.flags >>> 0;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += len;
      else out.push({ length: len, flags });
      left -= len;
    }
    // Status 0 ("data, not known to read as zeros") is always true: the answer when the export has none.
    if (out.length === 0) out.push({ length: req.length, flags: 0 });
    if (one) out.length = 1;
    const p = Buffer.allocUnsafe(4 + 8 * out.length);
    p.writeUInt32BE(BASE_ALLOCATION_ID, 0);
    out.forEach((e, i) => {
      p.writeUInt32BE(e.length, 4 + 8 * i);
      p.writeUInt32BE(e.flags, 8 + 8 * i);
    });
    return [encodeChunkHeader(req.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, p.length), p];
  }
}

const EMPTY = Buffer.alloc(0);

/** What an export can do, as transmission flags; DF only once structured replies are on (the specification's rule). */
export function transmissionFlags(exp: NbdExport, structured: boolean): number {
  const writable = !exp.readOnly && !!exp.write;
  let f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;
  if (!writable) f |= NBD_FLAG_READ_ONLY;
  if (exp.flush) f |= NBD_FLAG_SEND_FLUSH;
  if (writable) f |= NBD_FLAG_SEND_FUA;
  if (writable && exp.trim) f |= NBD_FLAG_SEND_TRIM;
  if (writable && exp.zero) f |= NBD_FLAG_SEND_WRITE_ZEROES | (exp.fastZero ? NBD_FLAG_SEND_FAST_ZERO : 0);
  if (structured) f |= NBD_FLAG_SEND_DF;
  return f;
}

function infoString(type: number, s: string): Buffer {
  const v = Buffer.from(s, 'utf8').subarray(0, NBD_MAX_STRING);
  const b = Buffer.allocUnsafe(2 + v.length);
  b.writeUInt16BE(type, 0);
  v.copy(b, 2);
  return b;
}

/** An option error's payload: a message for the client's user (UTF-8, short). */
function errorText(s: string): Buffer {
  return Buffer.from(s.slice(0, 512), 'utf8');
}

function peerOf(s: Socket): string {
  return s.remoteAddress ? `${s.remoteAddress}:${s.remotePort}` : 'a Unix socket client';
}

/** nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH. */
export function nbdUri(a: NbdAddress, name = ''): string {
  const n = encodeUriPart(name);
  if ('path' in a) return `nbd+unix:///${n}?socket=${encodeUriPart(a.path)}`;
  const host = a.host.includes(':') ? `[${a.host}]` : a.host;
  return `nbd://${host}:${a.port}/${n}`;
}

function encodeUriPart(s: string): string {
  // Slashes stay: clients take the socket path and the name as written.
  return s.replace(/[^A-Za-z0-9/._~-]/g, (c) => encodeURIComponent(c));
}

/**
 * Before listening on a Unix socket path: a stale socket file (no one
 * listening) is removed; a live one is ADDRESS_IN_USE; anything else there
 * (a file, a link, a directory) is never replaced.
 */
async function clearStaleSocket(path: string): Promise<void> {
  let st;
  try { st = lstatSync(path); } catch { return; }
  if (!st.isSocket()) throw new BlockferryError(ErrorCode.UNSAFE_PATH, `${path} exists and is not a socket; refusing to replace it`);
  const live = await new Promise<boolean>((res) => {
    const s = createConnection(path);
    s.once('connect', () => { s.destroy(); res(true); });
    s.once('error', () => res(false));
  });
  if (live) throw new BlockferryError(ErrorCode.ADDRESS_IN_USE, `cannot listen on ${path}: a server is listening there`);
  rmSync(path, { force: true });
}
