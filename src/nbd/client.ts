// An NBD client: blockferry reads what QEMU (qemu-nbd, qemu-storage-daemon,
// a running VM's NBD server) or nbdkit exports. Fixed newstyle negotiation,
// structured replies, metadata contexts (base:allocation, QEMU's dirty
// bitmaps), NBD_OPT_GO; then READ, BLOCK_STATUS, FLUSH and DISC with many
// requests in flight on one connection, matched to their replies by cookie.
//
// The server is not trusted: every magic, length, offset and context id it
// sends is checked against what was asked, every length it declares is
// capped before anything is allocated, and a server that stops answering
// fails what is outstanding after the idle deadline. Any breach ends the
// connection and fails every request on it with ERR_BF_NBD.
import net from 'node:net';
import { BlockferryError, ErrorCode, InvalidArgumentError } from '../errors.js';
import { escapeForLog } from '../util/sanitize.js';
import {
  BASE_ALLOCATION, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_FLAG_SEND_FLUSH, NBD_IHAVEOPT, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_MAGIC,
  NBD_MAX_PAYLOAD, NBD_MAX_STRING, NBD_OLDSTYLE_MAGIC, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK,
  NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REP_META_CONTEXT, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, OPTION_HEADER_BYTES, OPTION_REPLY_HEADER_BYTES, REQUEST_HEADER_BYTES,
  SIMPLE_REPLY_BYTES, STRUCTURED_REPLY_HEADER_BYTES, encodeRequest, nbdErrnoName, nbdRepErrorName, type NbdRequest,
} from './protocol.js';
import { formatNbdUri, parseNbdUri, type NbdTarget } from './uri.js';

/** Default idle deadline: a server silent this long while a request is outstanding has failed. */
export const NBD_DEFAULT_TIMEOUT_MS = 30_000;
/** Longest option reply read during negotiation (names and descriptions are at most 4 KiB). */
const MAX_OPTION_REPLY = NBD_MAX_STRING + 64;
/** Longest BLOCK_STATUS chunk accepted: a context id and 128 Ki extents (QEMU sends at most that many). */
const MAX_STATUS_CHUNK = 4 + 8 * (1 << 17);
/** Longest ERROR chunk: errno, message length, a 4 KiB message and an offset. */
const MAX_ERROR_CHUNK = 6 + NBD_MAX_STRING + 8;
/** Longest BLOCK_STATUS request: 1 GiB, far below the 32-bit field, and a round number for any block size. */
const MAX_STATUS_REQUEST = 1 << 30;

export interface NbdClientOptions {
  /** Metadata contexts to ask for, e.g. base:allocation or qemu:dirty-bitmap:NAME (default: base:allocation). */
  contexts?: string[];
  /** A server that sends nothing for this long while something is outstanding has failed (default 30 s). */
  timeoutMs?: number;
}

/** A run of bytes with the same status in one metadata context. */
export interface NbdExtent {
  offset: number;
  length: number;
  flags: number;
}

/** An NBD error: the server refused something or broke the protocol. */
export function nbdError(message: string, cause?: unknown): BlockferryError {
  return new BlockferryError(ErrorCode.NBD, message, cause === undefined ? undefined : { cause });
}

type Waiter = {
  request: NbdRequest;
  resolve: () => void;
  reject: (e: Error) => void;
  /** READ: where the bytes go, and the ranges chunks have covered (relative to the request). */
  dst?: Uint8Array;
  covered?: Array<[number, number]>;
  /** BLOCK_STATUS: the context asked about, and its extents as they arrive. */
  contextId?: number;
  extents?: NbdExtent[];
  /** The first error chunk; the request fails with it once the server says DONE. */
  error?: BlockferryError;
};

/**
 * The bytes a socket delivers, consumed in order by one reader at a time:
 * negotiation first, then the reply loop. A failure (connection lost, idle
 * deadline) reaches whichever read is waiting.
 */
class Incoming {
  private chunks: Buffer[] = [];
  private available = 0;
  private wake: (() => void) | undefined;
  failure: Error | undefined;

  push(b: Buffer): void {
    this.chunks.push(b);
    this.available += b.length;
    this.wake?.();
  }

  fail(e: Error): void {
    this.failure ??= e;
    this.wake?.();
  }

  private async atLeast(n: number): Promise<void> {
    while (this.available < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve) => { this.wake = resolve; });
      this.wake = undefined;
    }
  }

  /** The next n bytes (a view when they sit in one chunk). */
  async take(n: number): Promise<Buffer> {
    if (n === 0) return Buffer.alloc(0);
    await this.atLeast(n);
    const first = this.chunks[0]!;
    if (first.length >= n) {
      this.consume(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    for (let at = 0; at < n; ) at += this.copyOut(out.subarray(at));
    return out;
  }

  /** The next dst.length bytes, copied into dst as they arrive (a 32 MiB read is never held twice). */
  async into(dst: Uint8Array): Promise<void> {
    for (let at = 0; at < dst.length; ) {
      await this.atLeast(1);
      at += this.copyOut(dst.subarray(at));
    }
  }

  async skip(n: number): Promise<void> {
    for (let left = n; left > 0; ) {
      await this.atLeast(1);
      const k = Math.min(left, this.chunks[0]!.length);
      this.consume(k);
      left -= k;
    }
  }

  private copyOut(dst: Uint8Array): number {
    const first = this.chunks[0]!;
    const k = Math.min(dst.length, first.length);
    dst.set(first.subarray(0, k));
    this.consume(k);
    return k;
  }

  private consume(n: number): void {
    const first = this.chunks[0]!;
    if (n === first.length) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.available -= n;
  }
}

/** One connection to one export of an NBD server. */
export class NbdClient {
  /** The export's size in bytes. */
  size = 0;
  /** Its transmission flags (NBD_FLAG_*). */
  flags = 0;
  /** Block size constraints (NBD_INFO_BLOCK_SIZE; 1, 4096, 32 MiB when the server gives none). */
  minBlock = 1;
  preferredBlock = 4096;
  maxBlock = NBD_MAX_PAYLOAD;
  /** Whether the server agreed to structured replies (needed for block status). */
  structured = false;
  /** The metadata contexts the server agreed to, by name, with their ids. */
  readonly contexts = new Map<string, number>();

  private readonly incoming = new Incoming();
  private readonly waiters = new Map<bigint, Waiter>();
  private nextCookie = 1n;
  private negotiating = true;
  private failure: BlockferryError | undefined;

  private constructor(private readonly socket: net.Socket, readonly target: NbdTarget) {}

  /** Connects to an export (an NBD URI or a target) and negotiates; the client is ready for commands. */
  static async connect(target: NbdTarget | string, options: NbdClientOptions = {}): Promise<NbdClient> {
    const t = typeof target === 'string' ? parseNbdUri(target) : target;
    const timeoutMs = options.timeoutMs ?? NBD_DEFAULT_TIMEOUT_MS;
    if (!Number.isInteger(timeoutMs) || timeoutMs < 1) throw new InvalidArgumentError('timeoutMs', 'a positive integer', timeoutMs);
    const contexts = options.contexts ?? [BASE_ALLOCATION];
    for (const c of contexts) {
      if (!c || Buffer.byteLength(c) > NBD_MAX_STRING) throw new InvalidArgumentError('contexts', `names of 1 to ${NBD_MAX_STRING} bytes`, c);
    }
    const where = formatNbdUri(t);
    const socket = t.transport === 'unix' ? net.connect({ path: t.socket }) : net.connect({ host: t.host, port: t.port });
    const client = new NbdClient(socket, t);
    socket.setNoDelay?.(true);
    socket.setTimeout(timeoutMs);
    socket.on('data', (b: Buffer) => client.incoming.push(b));
    socket.on('timeout', () => {
      if (client.negotiating || client.waiters.size) {
        client.fail(new BlockferryError(ErrorCode.TIMEOUT, `NBD server ${where} sent nothing for ${timeoutMs} ms`));
      }
    });
    socket.on('error', (e: NodeJS.ErrnoException) => client.fail(nbdError(`NBD connection to ${where} failed (${e.code ?? e.message})`, e)));
    socket.on('close', () => client.fail(nbdError(`NBD server ${where} closed the connection`)));
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
        socket.once('timeout', () => reject(new BlockferryError(ErrorCode.TIMEOUT, `no connection to NBD server ${where} within ${timeoutMs} ms`)));
      });
      await client.negotiate(contexts);
    } catch (e) {
      client.fail(e instanceof BlockferryError ? e : nbdError(`cannot connect to NBD server ${where} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, e));
      throw client.failure;
    }
    client.negotiating = false;
    client.receive().catch((e) => client.fail(e instanceof BlockferryError ? e : nbdError(`NBD client failed: ${(e as Error).message}`, e)));
    return client;
  }

  private get where(): string {
    return formatNbdUri(this.target);
  }

  /** Ends the connection and fails everything outstanding with e (the first failure wins). */
  private fail(e: BlockferryError): void {
    this.failure ??= e;
    this.incoming.fail(this.failure);
    for (const w of this.waiters.values()) w.reject(this.failure);
    this.waiters.clear();
    this.socket.destroy();
  }

  private violation(what: string): BlockferryError {
    return nbdError(`NBD server ${this.where} broke the protocol: ${what}`);
  }

  // --- negotiation ---------------------------------------------------------

  private async negotiate(contexts: string[]): Promise<void> {
    const magic = (await this.incoming.take(8)).readBigUInt64BE(0);
    if (magic !== NBD_MAGIC) throw nbdError(`${this.where} is not an NBD server (greeting 0x${magic.toString(16)})`);
    const style = (await this.incoming.take(8)).readBigUInt64BE(0);
    if (style === NBD_OLDSTYLE_MAGIC) throw nbdError(`NBD server ${this.where} speaks oldstyle negotiation only; newstyle is required`);
    if (style !== NBD_IHAVEOPT) throw this.violation(`unknown negotiation magic 0x${style.toString(16)}`);
    const hflags = (await this.incoming.take(2)).readUInt16BE(0);
    if (!(hflags & NBD_FLAG_FIXED_NEWSTYLE)) throw nbdError(`NBD server ${this.where} lacks fixed newstyle negotiation`);
    const cflags = Buffer.alloc(4);
    cflags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (hflags & NBD_FLAG_NO_ZEROES ? NBD_FLAG_C_NO_ZEROES : 0));
    this.socket.write(cflags);

    this.sendOption(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0));
    const sr = await this.optionReply(NBD_OPT_STRUCTURED_REPLY);
    this.structured = sr.type === NBD_REP_ACK;
    if (!this.structured && !(sr.type & NBD_REP_FLAG_ERROR)) throw this.violation(`reply type ${sr.type} to NBD_OPT_STRUCTURED_REPLY`);

    const name = Buffer.from(this.target.exportName);
    // Block status needs structured replies: without them, no contexts.
    if (this.structured && contexts.length) {
      const queries = contexts.map((c) => Buffer.from(c));
      const body = Buffer.alloc(8 + name.length + queries.reduce((n, q) => n + 4 + q.length, 0));
      let at = body.writeUInt32BE(name.length, 0);
      at += name.copy(body, at);
      at = body.writeUInt32BE(queries.length, at);
      for (const q of queries) { at = body.writeUInt32BE(q.length, at); at += q.copy(body, at); }
      this.sendOption(NBD_OPT_SET_META_CONTEXT, body);
      for (;;) {
        const r = await this.optionReply(NBD_OPT_SET_META_CONTEXT);
        if (r.type === NBD_REP_ACK) break;
        if (r.type & NBD_REP_FLAG_ERROR) break; // no contexts: block status then reports the whole range as data
        if (r.type !== NBD_REP_META_CONTEXT || r.data.length < 5) throw this.violation(`reply type ${r.type} (${r.data.length} bytes) to NBD_OPT_SET_META_CONTEXT`);
        const ctx = r.data.subarray(4).toString();
        if (!contexts.includes(ctx)) throw this.violation(`a metadata context that was not asked for (${escapeForLog(ctx)})`);
        this.contexts.set(ctx, r.data.readUInt32BE(0));
      }
    }

    const go = Buffer.alloc(4 + name.length + 4);
    let at = go.writeUInt32BE(name.length, 0);
    at += name.copy(go, at);
    at = go.writeUInt16BE(1, at);
    go.writeUInt16BE(NBD_INFO_BLOCK_SIZE, at);
    this.sendOption(NBD_OPT_GO, go);
    let haveExport = false;
    for (;;) {
      const r = await this.optionReply(NBD_OPT_GO);
      if (r.type === NBD_REP_ACK) break;
      if (r.type & NBD_REP_FLAG_ERROR) {
        const what = r.data.length ? `: ${escapeForLog(r.data.toString())}` : '';
        throw nbdError(`NBD server ${this.where} refused export "${escapeForLog(this.target.exportName)}" (${nbdRepErrorName(r.type)}${what})`);
      }
      if (r.type !== NBD_REP_INFO || r.data.length < 2) throw this.violation(`reply type ${r.type} to NBD_OPT_GO`);
      const info = r.data.readUInt16BE(0);
      if (info === NBD_INFO_EXPORT) {
        if (r.data.length !== 12) throw this.violation(`NBD_INFO_EXPORT of ${r.data.length} bytes`);
        const size = r.data.readBigUInt64BE(2);
        if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw this.violation(`an export size of ${size} bytes`);
        this.size = Number(size);
        this.flags = r.data.readUInt16BE(10);
        haveExport = true;
      } else if (info === NBD_INFO_BLOCK_SIZE) {
        if (r.data.length !== 14) throw this.violation(`NBD_INFO_BLOCK_SIZE of ${r.data.length} bytes`);
        const min = r.data.readUInt32BE(2), preferred = r.data.readUInt32BE(6), max = r.data.readUInt32BE(10);
        const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
        if (!pow2(min) || min > 65536 || !pow2(preferred) || preferred < min || max < min) {
          throw this.violation(`block sizes min ${min}, preferred ${preferred}, max ${max}`);
        }
        this.minBlock = min;
        this.preferredBlock = preferred;
        this.maxBlock = max;
      }
      // Other information (name, description) is not needed.
    }
    if (!haveExport) throw this.violation('NBD_OPT_GO succeeded without NBD_INFO_EXPORT');
  }

  private sendOption(option: number, data: Buffer): void {
    const h = Buffer.alloc(OPTION_HEADER_BYTES);
    h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.socket.write(data.length ? Buffer.concat([h, data]) : h);
  }

  private async optionReply(option: number): Promise<{ type: number; data: Buffer }> {
    const h = await this.incoming.take(OPTION_REPLY_HEADER_BYTES);
    if (h.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw this.violation('bad option reply magic');
    const echoed = h.readUInt32BE(8);
    if (echoed !== option) throw this.violation(`a reply to option ${echoed} while option ${option} was asked`);
    const type = h.readUInt32BE(12), length = h.readUInt32BE(16);
    if (length > MAX_OPTION_REPLY) throw this.violation(`an option reply of ${length} bytes`);
    return { type, data: Buffer.from(await this.incoming.take(length)) };
  }

  // --- transmission --------------------------------------------------------

  private request(type: number, offset: number, length: number, extra: Partial<Waiter> = {}): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const cookie = this.nextCookie++;
    const request: NbdRequest = { flags: 0, type, cookie, offset, length };
    return new Promise<void>((resolve, reject) => {
      this.waiters.set(cookie, { request, resolve, reject, ...extra });
      this.socket.write(encodeRequest(request, Buffer.allocUnsafe(REQUEST_HEADER_BYTES)));
    });
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new InvalidArgumentError('range', `inside the export (${this.size} bytes)`, `${offset}+${length}`);
    }
  }

  /** Reads [offset, offset + length) into `into` (or a new buffer), in requests of at most the server's maximum. */
  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    this.checkRange(offset, length);
    const dst = into ?? Buffer.allocUnsafe(length);
    if (dst.length < length) throw new InvalidArgumentError('into', `a buffer of at least ${length} bytes`, dst.length);
    const piece = Math.max(this.minBlock, Math.min(this.maxBlock, NBD_MAX_PAYLOAD));
    const pending: Promise<void>[] = [];
    for (let at = 0; at < length; at += piece) {
      const n = Math.min(piece, length - at);
      pending.push(this.request(NBD_CMD_READ, offset + at, n, { dst: dst.subarray(at, at + n), covered: [] }));
    }
    await Promise.all(pending);
    return dst.subarray(0, length);
  }

  /**
   * The extents of one metadata context covering exactly [offset, offset + length),
   * in order (several requests when the server answers for less than asked).
   */
  async blockStatus(offset: number, length: number, context = BASE_ALLOCATION): Promise<NbdExtent[]> {
    this.checkRange(offset, length);
    const contextId = this.contexts.get(context);
    if (contextId === undefined) throw nbdError(`NBD server ${this.where} did not agree to metadata context ${escapeForLog(context)}`);
    const out: NbdExtent[] = [];
    for (let at = offset; at < offset + length; ) {
      const n = Math.min(offset + length - at, MAX_STATUS_REQUEST);
      const extents: NbdExtent[] = [];
      await this.request(NBD_CMD_BLOCK_STATUS, at, n, { contextId, extents });
      for (const x of extents) {
        const last = out[out.length - 1];
        if (last && last.flags === x.flags && last.offset + last.length === x.offset) last.length += x.length;
        else out.push(x);
      }
      at = extents[extents.length - 1]!.offset + extents[extents.length - 1]!.length;
    }
    return out;
  }

  /** NBD_CMD_FLUSH (a no-op when the export does not offer it). */
  async flush(): Promise<void> {
    if (this.flags & NBD_FLAG_SEND_FLUSH) await this.request(NBD_CMD_FLUSH, 0, 0);
  }

  /** Sends NBD_CMD_DISC and closes; requests still in flight fail (wait for them first). */
  async disconnect(): Promise<void> {
    if (this.failure) return;
    const h = encodeRequest({ flags: 0, type: NBD_CMD_DISC, cookie: this.nextCookie++, offset: 0, length: 0 });
    await new Promise<void>((resolve) => this.socket.end(h, resolve));
    this.destroy();
  }

  /** Closes at once; anything outstanding fails. */
  destroy(): void {
    this.fail(nbdError(`NBD connection to ${this.where} closed`));
  }

  /** The reply loop: one reply or chunk at a time, each checked against its request. */
  private async receive(): Promise<void> {
    for (;;) {
      const magic = (await this.incoming.take(4)).readUInt32BE(0);
      if (magic === NBD_SIMPLE_REPLY_MAGIC) await this.simpleReply();
      else if (magic === NBD_STRUCTURED_REPLY_MAGIC) await this.chunk();
      else throw this.violation(`bad reply magic 0x${magic.toString(16)}`);
    }
  }

  private waiterFor(cookie: bigint): Waiter {
    const w = this.waiters.get(cookie);
    if (!w) throw this.violation(`a reply for cookie ${cookie}, which is not outstanding`);
    return w;
  }

  private commandError(w: Waiter, errno: number, message: string): BlockferryError {
    const what = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'][w.request.type] ?? String(w.request.type);
    return nbdError(`NBD server ${this.where} failed ${what} of ${w.request.length} bytes at ${w.request.offset}: ${nbdErrnoName(errno)}${message ? ` (${escapeForLog(message)})` : ''}`);
  }

  private async simpleReply(): Promise<void> {
    const h = await this.incoming.take(SIMPLE_REPLY_BYTES - 4);
    const errno = h.readUInt32BE(0);
    const w = this.waiterFor(h.readBigUInt64BE(4));
    // A violation leaves the waiter in the map: fail() rejects it with the rest.
    if (!errno && w.request.type === NBD_CMD_BLOCK_STATUS) throw this.violation('a simple reply to BLOCK_STATUS');
    if (!errno && w.request.type === NBD_CMD_READ) {
      if (this.structured) throw this.violation('a simple reply with data to READ after structured replies were agreed');
      await this.incoming.into(w.dst!);
    }
    this.waiters.delete(w.request.cookie);
    if (errno) w.reject(this.commandError(w, errno, ''));
    else w.resolve();
  }

  private async chunk(): Promise<void> {
    const h = await this.incoming.take(STRUCTURED_REPLY_HEADER_BYTES - 4);
    const flags = h.readUInt16BE(0), type = h.readUInt16BE(2), length = h.readUInt32BE(12);
    const w = this.waiterFor(h.readBigUInt64BE(4));
    if (!this.structured) throw this.violation('a structured reply that was not agreed');
    const { offset: reqOffset, length: reqLength } = w.request;
    const isRead = w.request.type === NBD_CMD_READ;
    const inside = (o: number, n: number) => o >= reqOffset && n > 0 && o + n <= reqOffset + reqLength;
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (length !== 0 || !(flags & NBD_REPLY_FLAG_DONE)) throw this.violation('an NBD_REPLY_TYPE_NONE chunk with a payload or without DONE');
        break;
      case NBD_REPLY_TYPE_OFFSET_DATA: {
        if (!isRead || length <= 8 || length - 8 > reqLength) throw this.violation(`an OFFSET_DATA chunk of ${length} bytes for a ${reqLength}-byte ${isRead ? 'READ' : 'non-READ'}`);
        const offset = this.safeOffset((await this.incoming.take(8)).readBigUInt64BE(0));
        const n = length - 8;
        if (!inside(offset, n)) throw this.violation(`data at ${offset}+${n}, outside the READ of ${reqOffset}+${reqLength}`);
        await this.incoming.into(w.dst!.subarray(offset - reqOffset, offset - reqOffset + n));
        w.covered!.push([offset - reqOffset, n]);
        break;
      }
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (!isRead || length !== 12) throw this.violation(`an OFFSET_HOLE chunk of ${length} bytes`);
        const b = await this.incoming.take(12);
        const offset = this.safeOffset(b.readBigUInt64BE(0)), n = b.readUInt32BE(8);
        if (!inside(offset, n)) throw this.violation(`a hole at ${offset}+${n}, outside the READ of ${reqOffset}+${reqLength}`);
        w.dst!.fill(0, offset - reqOffset, offset - reqOffset + n);
        w.covered!.push([offset - reqOffset, n]);
        break;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (w.request.type !== NBD_CMD_BLOCK_STATUS || length < 12 || (length - 4) % 8 || length > MAX_STATUS_CHUNK) {
          throw this.violation(`a BLOCK_STATUS chunk of ${length} bytes`);
        }
        const b = await this.incoming.take(length);
        const id = b.readUInt32BE(0);
        // Only the context asked about is recorded; a server may not answer with one it was never asked for.
        if (![...this.contexts.values()].includes(id)) throw this.violation(`block status for context id ${id}, never agreed`);
        if (id !== w.contextId) break;
        if (w.extents!.length) throw this.violation('two BLOCK_STATUS chunks for one context');
        let at = reqOffset;
        const end = reqOffset + reqLength;
        for (let p = 4; p < length && at < end; p += 8) {
          const n = b.readUInt32BE(p);
          if (n === 0) throw this.violation('an extent of length 0');
          // The last extent may reach past the request; what lies beyond is not asked for.
          const take = Math.min(n, end - at);
          w.extents!.push({ offset: at, length: take, flags: b.readUInt32BE(p + 4) });
          at += take;
        }
        break;
      }
      case NBD_REPLY_TYPE_ERROR:
      case NBD_REPLY_TYPE_ERROR_OFFSET: {
        if (length < 6 || length > MAX_ERROR_CHUNK) throw this.violation(`an error chunk of ${length} bytes`);
        const b = await this.incoming.take(length);
        const errno = b.readUInt32BE(0), mlen = b.readUInt16BE(4);
        const tail = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
        if (6 + mlen + tail !== length) throw this.violation(`an error chunk of ${length} bytes with a ${mlen}-byte message`);
        if (errno === 0) throw this.violation('an error chunk with error 0');
        if (tail) {
          const offset = this.safeOffset(b.readBigUInt64BE(6 + mlen));
          if (!inside(offset, 1)) throw this.violation(`an error at ${offset}, outside the request ${reqOffset}+${reqLength}`);
        }
        w.error ??= this.commandError(w, errno, b.subarray(6, 6 + mlen).toString());
        break;
      }
      default:
        // Unknown error types are still errors (bit 15); any other type was never negotiated.
        if (type & 0x8000 && length <= MAX_ERROR_CHUNK) {
          await this.incoming.skip(length);
          w.error ??= this.commandError(w, 5, `unknown error chunk type ${type}`);
          break;
        }
        throw this.violation(`unknown chunk type ${type}`);
    }
    if (!(flags & NBD_REPLY_FLAG_DONE)) return;
    // A violation leaves the waiter in the map: fail() rejects it with the rest.
    if (!w.error && isRead && !covers(w.covered!, reqLength)) throw this.violation(`a READ of ${reqOffset}+${reqLength} answered with gaps or overlaps`);
    if (!w.error && w.request.type === NBD_CMD_BLOCK_STATUS && !w.extents!.length) throw this.violation('BLOCK_STATUS done without extents for the context asked');
    this.waiters.delete(w.request.cookie);
    if (w.error) w.reject(w.error);
    else w.resolve();
  }

  private safeOffset(o: bigint): number {
    if (o > BigInt(Number.MAX_SAFE_INTEGER)) throw this.violation(`offset ${o}`);
    return Number(o);
  }
}

/** Whether ranges [start, length] tile [0, total) exactly: no gap, no overlap. */
function covers(ranges: Array<[number, number]>, total: number): boolean {
  ranges.sort((a, b) => a[0] - b[0]);
  let at = 0;
  for (const [s, n] of ranges) {
    if (s !== at) return false;
    at += n;
  }
  return at === total;
}
