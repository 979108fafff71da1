import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, ProtocolError } from '../errors.js';
import { encodeHeader, FLAG_COMPRESSED, FrameDecoder, HEADER_BYTES, Msg, msgName, Reader, type Frame, type MsgType } from './frame.js';
import { decode, encode, ERROR, kindOf, type MessageDef, type Traffic, type TrafficKind } from './messages.js';
import { tlsError } from '../transport/tls.js';

export type { Traffic, TrafficKind } from './messages.js';

/** Frames received but not yet consumed before the socket is paused: bounds memory when the reader is slower than the link. */
export const MAX_QUEUED_BYTES = 32 << 20;

/** What one frame cost to send, for a compressor that adapts. */
export interface FrameSample {
  compressed: boolean;
  /** Payload bytes before compression, and bytes on the wire (header included). */
  rawBytes: number;
  wireBytes: number;
  compressSeconds: number;
  /** From the end of compression until the socket took the frame: pacing, write, and waiting for 'drain'. */
  waitSeconds: number;
}

/** Compresses frame payloads on one side of a connection (one stream for the whole connection). */
export interface FrameCompressor {
  /** Whether this payload should go compressed; decided before compressing (the stream's state must match what the peer sees). */
  wants(kind: string, length: number): boolean;
  compress(payload: Buffer): Buffer;
  /**
   * Compresses off the main thread: called in stream order, resolves in that
   * order with the compressed bytes and the CPU seconds they took. The
   * payload is copied before this returns (the caller may reuse it). When
   * present, the channel pipelines: it returns from send() while the frame
   * is being compressed, so the caller prepares the next one meanwhile.
   */
  compressAsync?(payload: Buffer): Promise<{ data: Buffer; seconds: number }>;
  /** Told what each frame it was asked about cost. */
  observe?(s: FrameSample): void;
  close?(): void;
}

export interface FrameDecompressor {
  /** Decompresses one frame's payload into exactly `size` bytes; anything else is a ProtocolError. */
  decompress(data: Buffer, size: number): Buffer;
  close?(): void;
}

/** One frame as it crossed: for diagnostics and tests (a frame log). */
export interface FrameRecord {
  direction: 'sent' | 'received';
  type: string;
  id: number;
  /** Bytes on the wire, header included. */
  bytes: number;
  compressed: boolean;
}

export interface ChannelOptions {
  /** Called for every frame sent and received. */
  onFrame?: (f: FrameRecord) => void;
  /** Bandwidth limit for what this side sends, bytes per second (0 or undefined: none). */
  bwlimit?: number;
  /** Largest frame accepted until setFrameLimit() raises it (handshake messages are small). */
  frameLimit?: number;
}

interface Waiter {
  resolve: (f: Frame) => void;
  reject: (e: Error) => void;
}

const zeroTraffic = (): Traffic => ({ control: 0, fingerprints: 0, data: 0, verify: 0 });

/**
 * A framed, flow-controlled connection. send() resolves when the frame is
 * handed to the kernel without overfilling the socket's buffer (it waits for
 * 'drain'), so a producer that awaits it never buffers more than a frame
 * ahead of the link. Incoming frames queue up to MAX_QUEUED_BYTES, then the
 * socket is paused until the consumer catches up.
 *
 * Requests carry ids: request() sends a frame with a fresh id and resolves
 * with the reply that carries it, so several requests can be in flight while
 * other frames stream past (next() sees only frames that answer nothing).
 */
export class Channel {
  readonly sent: Traffic = zeroTraffic();
  readonly received: Traffic = zeroTraffic();
  /** Payload bytes before compression, by kind (equal to the wire figures minus headers when nothing is compressed). */
  readonly sentRaw: Traffic = zeroTraffic();
  private readonly decoder = new FrameDecoder();
  private readonly queue: Frame[] = [];
  private queuedBytes = 0;
  private readonly waiters: Waiter[] = [];
  private readonly pending = new Map<number, Waiter>();
  private nextId = 1;
  private failure: Error | undefined;
  private nextSendAt = 0;
  private readonly rate: number;
  private compressor: FrameCompressor | undefined;
  private decompressor: FrameDecompressor | undefined;
  private readonly onFrame: ((f: FrameRecord) => void) | undefined;
  /** When the peer last showed life: bytes arrived, or it drained what this side wrote. */
  private lastHeard = performance.now();
  /** Since when this side has waited for a frame (next()) or for 'drain' (send()); undefined while it is busy itself. */
  private waitingSince: number | undefined;
  private sendBlockedSince: number | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  private errorSent = false;
  /** When this side last sent a frame (a source sends a heartbeat when it has been quiet). */
  lastSentAt = performance.now();
  /**
   * Frames go to the socket in the order send() was called. With an
   * off-thread compressor, a compressed frame's write waits here for its
   * compression and for the frames before it; `tail` is the last write, and
   * `inPipe` the writes send() has returned before (at most PIPE_DEPTH).
   */
  private tail: Promise<void> = Promise.resolve();
  private readonly inPipe: Promise<void>[] = [];

  constructor(readonly socket: Socket, options: ChannelOptions = {}) {
    this.rate = options.bwlimit ?? 0;
    this.onFrame = options.onFrame;
    if (options.frameLimit) this.decoder.limit = options.frameLimit;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      this.lastHeard = performance.now();
      // After a failure nothing more is read: the socket stops reading (a
      // hostile peer that keeps sending fills its own kernel buffers, not this
      // process's memory) until the close that follows destroys it.
      if (this.failure) { socket.pause(); return; }
      try {
        for (const f of this.decoder.push(chunk)) this.deliver(f);
      } catch (e) {
        // The peer broke the framing: tell it why (ERROR, as the protocol promises), then close.
        this.abort(e as Error);
        return;
      }
      if (this.queuedBytes > MAX_QUEUED_BYTES) socket.pause();
    });
    socket.on('end', () => {
      const truncated = this.decoder.pending > 0;
      this.fail(new ProtocolError(truncated ? ErrorCode.PROTOCOL : ErrorCode.CONNECTION, truncated ? 'connection closed in the middle of a frame' : 'connection closed by the peer'));
    });
    socket.on('error', (e) => this.fail(tlsError(e) ?? new ProtocolError(ErrorCode.CONNECTION, `connection failed: ${e.message}`, undefined, { cause: e })));
    socket.on('close', () => { this.fail(new ProtocolError(ErrorCode.CONNECTION, 'connection closed')); this.stopIdle(); });
    socket.on('drain', () => { this.lastHeard = performance.now(); });
  }

  /**
   * How long the peer has been silent while this side waited for it (for a
   * frame, or for room to write): 0 while this side is busy itself, so slow
   * local work never counts against the peer.
   */
  idleFor(now = performance.now()): number {
    const since = this.waitingSince ?? this.sendBlockedSince;
    if (since === undefined) return 0;
    return Math.max(0, now - Math.max(this.lastHeard, since));
  }

  /** Ends the connection with ERR_BF_TIMEOUT once the peer has been idle (idleFor) for ms. 0 turns it off. */
  setIdleTimeout(ms: number): void {
    this.stopIdle();
    if (!(ms > 0)) return;
    const check = () => {
      const idle = this.idleFor();
      if (idle >= ms) {
        this.abort(new ProtocolError(ErrorCode.TIMEOUT, `nothing received for ${Math.round(idle)} ms (idle deadline ${ms} ms)`));
        return;
      }
      this.idleTimer = setTimeout(check, Math.max(10, Math.min(ms - idle, 1000)));
      this.idleTimer.unref();
    };
    this.idleTimer = setTimeout(check, Math.min(ms, 1000));
    this.idleTimer.unref();
  }

  private stopIdle(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
  }

  /**
   * Ends the connection from this side because of e: everything waiting on
   * the channel fails with e, the peer gets an ERROR frame with e's code (best
   * effort), and the socket is closed (destroyed shortly after, even if the
   * peer does not read).
   */
  abort(e: Error): void {
    this.fail(e);
    this.stopIdle();
    const code = (e as { code?: string }).code ?? ErrorCode.PROTOCOL;
    void this.sendError(code.startsWith('ERR_BF_') ? code : ErrorCode.PROTOCOL, e.message);
    setTimeout(() => this.socket.destroy(), 500).unref();
  }

  /** Raises (or lowers) the largest frame this side accepts: after authentication, the protocol's limit. */
  setFrameLimit(bytes: number): void {
    this.decoder.limit = bytes;
  }

  /** Turns on compression of what this side sends, and/or acceptance of compressed frames from the peer. */
  setCodec(compressor: FrameCompressor | undefined, decompressor: FrameDecompressor | undefined): void {
    this.compressor = compressor;
    this.decompressor = decompressor;
  }

  private deliver(raw: Frame): void {
    const wire = raw.payload.length + HEADER_BYTES;
    this.received[kindOf(raw.type)] += wire;
    this.onFrame?.({ direction: 'received', type: msgName(raw.type), id: raw.id, bytes: wire, compressed: (raw.flags & FLAG_COMPRESSED) !== 0 });
    let f = raw;
    if (raw.flags & FLAG_COMPRESSED) {
      if (!this.decompressor) throw new ProtocolError(ErrorCode.PROTOCOL, `a compressed ${msgName(raw.type)} frame, but no compression was agreed`);
      if (raw.payload.length < 4) throw new ProtocolError(ErrorCode.PROTOCOL, 'a compressed frame without its length');
      const size = raw.payload.readUInt32LE(0);
      if (size > this.decoder.limit) throw new ProtocolError(ErrorCode.PROTOCOL, `a compressed frame declaring ${size} bytes, over the ${this.decoder.limit}-byte limit`);
      f = { ...raw, payload: this.decompressor.decompress(raw.payload.subarray(4), size) };
    }
    if (f.type === Msg.ERROR && f.id === 0) {
      // The peer's last word, before it closes: what every wait on this
      // channel ends with (a sender blocked on 'drain' too), not "closed".
      try { checkError(f); } catch (e) { queueMicrotask(() => this.fail(e as Error)); }
    }
    const w = f.id !== 0 ? this.pending.get(f.id) : undefined;
    if (w) {
      this.pending.delete(f.id);
      w.resolve(f);
      return;
    }
    const next = this.waiters.shift();
    if (next) next.resolve(f);
    else {
      this.queue.push(f);
      this.queuedBytes += f.payload.length;
    }
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    this.compressor?.close?.();
    this.decompressor?.close?.();
    for (const w of this.waiters.splice(0)) w.reject(e);
    for (const w of this.pending.values()) w.reject(e);
    this.pending.clear();
  }

  get failed(): Error | undefined {
    return this.failure;
  }

  /** Sends a message; waits while the socket's buffer is full or the bandwidth limit says so. */
  async send<T>(d: MessageDef<T>, m: T, id = 0): Promise<void> {
    await this.sendFrame(d.type, encode(d, m), id);
  }

  /** Sends one frame of raw bytes (tests use it to play a broken peer). */
  async sendFrame(type: MsgType, payload: Buffer = Buffer.alloc(0), id = 0): Promise<void> {
    if (this.failure) throw this.failure;
    const kind = kindOf(type);
    const c = this.compressor;
    const asked = c !== undefined && (kind === 'data' || kind === 'fingerprints');
    const compress = asked && c.wants(kind, payload.length);
    if (compress && c.compressAsync) {
      // Pipelined: compression starts now (stream order is call order), the
      // write follows the frames before it; the caller goes on preparing the
      // next frame while at most PIPE_DEPTH frames are on their way.
      const job = c.compressAsync(payload);
      job.catch(() => {}); // reported by the write below
      const rawBytes = payload.length;
      const write = this.tail.then(async () => {
        const z = await job;
        await this.writeFrame(type, kind, rawBytes, compressedBody(rawBytes, z.data), FLAG_COMPRESSED, id, c, z.seconds);
      });
      this.tail = write.catch(() => {});
      write.catch((e: Error) => this.fail(e));
      this.inPipe.push(write);
      while (this.inPipe.length > PIPE_DEPTH) await this.inPipe.shift();
      if (this.failure) throw this.failure;
      return;
    }
    let body = payload;
    let flags = 0;
    let compressSeconds = 0;
    if (compress) {
      const t = performance.now();
      const z = c.compress(payload);
      compressSeconds = (performance.now() - t) / 1000;
      body = compressedBody(payload.length, z);
      flags = FLAG_COMPRESSED;
    }
    // Every write goes through the chain, so frames leave in the order send() was called.
    const write = this.tail.then(() => this.writeFrame(type, kind, payload.length, body, flags, id, asked ? c : undefined, compressSeconds));
    this.tail = write.catch(() => {});
    this.inPipe.length = 0; // this write comes after all of them
    await write;
  }

  /** Writes one frame (pacing, then header and body), waits for 'drain' if the socket's buffer is full, and tells the compressor. */
  private async writeFrame(type: MsgType, kind: TrafficKind, rawBytes: number, body: Buffer, flags: number, id: number, c: FrameCompressor | undefined, compressSeconds: number): Promise<void> {
    if (this.failure) throw this.failure;
    const bytes = body.length + HEADER_BYTES;
    const t0 = performance.now();
    if (this.rate > 0) {
      const now = performance.now();
      const start = Math.max(now, this.nextSendAt);
      this.nextSendAt = start + (bytes / this.rate) * 1000;
      if (start - now > 1) await sleep(start - now);
    }
    // The connection may have failed while we were pacing.
    if (this.failure) throw this.failure;
    if (this.socket.destroyed) throw new ProtocolError(ErrorCode.CONNECTION, 'connection closed');
    this.sent[kind] += bytes;
    this.lastSentAt = performance.now();
    this.sentRaw[kind] += rawBytes + HEADER_BYTES;
    this.onFrame?.({ direction: 'sent', type: msgName(type), id, bytes, compressed: flags !== 0 });
    this.socket.write(encodeHeader(type, body.length, id, flags));
    const ok = this.socket.write(body);
    if (!ok) {
      if (this.failure) throw this.failure;
      if (this.socket.destroyed) throw new ProtocolError(ErrorCode.CONNECTION, 'connection closed');
      this.sendBlockedSince = performance.now();
      await new Promise<void>((resolve, reject) => {
        const onDrain = () => { cleanup(); resolve(); };
        const onClose = () => { cleanup(); reject(this.failure ?? new ProtocolError(ErrorCode.CONNECTION, 'connection closed')); };
        const cleanup = () => { this.sendBlockedSince = undefined; this.socket.off('drain', onDrain); this.socket.off('close', onClose); this.socket.off('error', onClose); };
        this.socket.on('drain', onDrain);
        this.socket.on('close', onClose);
        this.socket.on('error', onClose);
      });
    }
    c?.observe?.({ compressed: flags !== 0, rawBytes, wireBytes: bytes, compressSeconds, waitSeconds: (performance.now() - t0) / 1000 });
  }

  /**
   * Sends an ERROR frame (best effort, at most once per connection, also
   * after the channel failed) and closes.
   */
  async sendError(code: string, message: string): Promise<void> {
    if (!this.errorSent && !this.socket.destroyed && this.socket.writable) {
      this.errorSent = true;
      try {
        const payload = encode(ERROR, { code, message });
        this.sent.control += payload.length + HEADER_BYTES;
        this.onFrame?.({ direction: 'sent', type: 'ERROR', id: 0, bytes: payload.length + HEADER_BYTES, compressed: false });
        this.socket.write(encodeHeader(Msg.ERROR, payload.length, 0, 0));
        this.socket.write(payload);
      } catch {
        // the peer is gone already
      }
    }
    this.stopIdle();
    this.socket.end();
  }

  /** The next frame that answers no request; an ERROR frame becomes a thrown ProtocolError. */
  /** The next frame, or undefined once the peer has closed the connection (the ordinary end of a service's connection). */
  async nextOrEnd(): Promise<Frame | undefined> {
    try {
      return await this.next();
    } catch (e) {
      if (e instanceof ProtocolError && e.code === ErrorCode.CONNECTION) return undefined;
      throw e;
    }
  }

  async next(): Promise<Frame> {
    let f: Frame;
    const queued = this.queue.shift();
    if (queued) {
      this.queuedBytes -= queued.payload.length;
      if (this.socket.isPaused() && this.queuedBytes < MAX_QUEUED_BYTES / 2) this.socket.resume();
      f = queued;
    } else {
      if (this.failure) throw this.failure;
      this.waitingSince = performance.now();
      try {
        f = await new Promise<Frame>((resolve, reject) => { this.waiters.push({ resolve, reject }); });
      } finally {
        this.waitingSince = undefined;
      }
    }
    return checkError(f);
  }

  /** The next frame, which must be message d. */
  async recv<T>(d: MessageDef<T>): Promise<T> {
    const f = await this.next();
    if (f.type !== d.type) throw new ProtocolError(ErrorCode.PROTOCOL, `expected ${d.name}, got ${msgName(f.type)}`);
    return decode(d, f.payload);
  }

  /** Sends a request and waits for the reply that carries its id. */
  async request<Q, A>(d: MessageDef<Q>, m: Q, answer: MessageDef<A>): Promise<A> {
    if (this.failure) throw this.failure;
    const id = this.nextId++;
    if (this.nextId > 0xffffffff) this.nextId = 1;
    const reply = new Promise<Frame>((resolve, reject) => this.pending.set(id, { resolve, reject }));
    reply.catch(() => {}); // a send failure below is the one reported
    await this.send(d, m, id);
    const f = checkError(await reply);
    if (f.type !== answer.type) throw new ProtocolError(ErrorCode.PROTOCOL, `expected ${answer.name} in reply to ${d.name}, got ${msgName(f.type)}`);
    return decode(answer, f.payload);
  }

  /** Answers the request frame `to`. */
  async reply<T>(to: Frame, d: MessageDef<T>, m: T): Promise<void> {
    await this.send(d, m, to.id);
  }

  /** Ends the connection once every frame sent so far is written. */
  close(): void {
    this.stopIdle();
    this.inPipe.length = 0;
    void this.tail.then(() => this.socket.end());
  }
}

/** Frames a pipelined sender may have handed over before send() waits: enough to overlap reading and compressing. */
const PIPE_DEPTH = 2;

/** A compressed frame's body: the payload's size before compression (u32), then the compressed bytes. */
function compressedBody(rawBytes: number, z: Buffer): Buffer {
  const body = Buffer.allocUnsafe(4 + z.length);
  body.writeUInt32LE(rawBytes, 0);
  body.set(z, 4);
  return body;
}

function checkError(f: Frame): Frame {
  if (f.type === Msg.ERROR) {
    const r = new Reader(f.payload, 'ERROR');
    const code = r.str();
    const message = r.str();
    const local = code === ErrorCode.AUTH_FAILED || code === ErrorCode.PROTOCOL_VERSION || code === ErrorCode.PROTOCOL || code === ErrorCode.TLS_CERT || code === ErrorCode.LIMIT ? code : ErrorCode.REFUSED;
    throw new ProtocolError(local as ProtocolError['code'], `peer: ${message}`, code);
  }
  return f;
}
