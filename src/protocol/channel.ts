import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, ProtocolError } from '../errors.js';
import { encodeHeader, FLAG_COMPRESSED, FrameDecoder, HEADER_BYTES, Msg, msgName, Reader, type Frame, type MsgType } from './frame.js';
import { decode, encode, ERROR, kindOf, type MessageDef, type Traffic } from './messages.js';
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

  constructor(readonly socket: Socket, options: ChannelOptions = {}) {
    this.rate = options.bwlimit ?? 0;
    this.onFrame = options.onFrame;
    if (options.frameLimit) this.decoder.limit = options.frameLimit;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      try {
        for (const f of this.decoder.push(chunk)) this.deliver(f);
      } catch (e) {
        this.fail(e as Error);
        socket.destroy();
        return;
      }
      if (this.queuedBytes > MAX_QUEUED_BYTES) socket.pause();
    });
    socket.on('end', () => {
      const truncated = this.decoder.pending > 0;
      this.fail(new ProtocolError(truncated ? ErrorCode.PROTOCOL : ErrorCode.CONNECTION, truncated ? 'connection closed in the middle of a frame' : 'connection closed by the peer'));
    });
    socket.on('error', (e) => this.fail(tlsError(e) ?? new ProtocolError(ErrorCode.CONNECTION, `connection failed: ${e.message}`, undefined, { cause: e })));
    socket.on('close', () => this.fail(new ProtocolError(ErrorCode.CONNECTION, 'connection closed')));
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
    let body = payload;
    let flags = 0;
    let compressSeconds = 0;
    const c = this.compressor;
    const asked = c !== undefined && (kind === 'data' || kind === 'fingerprints');
    if (asked && c.wants(kind, payload.length)) {
      const t = performance.now();
      const z = c.compress(payload);
      compressSeconds = (performance.now() - t) / 1000;
      const len = Buffer.alloc(4);
      len.writeUInt32LE(payload.length);
      body = Buffer.concat([len, z]);
      flags = FLAG_COMPRESSED;
    }
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
    this.sentRaw[kind] += payload.length + HEADER_BYTES;
    this.onFrame?.({ direction: 'sent', type: msgName(type), id, bytes, compressed: flags !== 0 });
    this.socket.write(encodeHeader(type, body.length, id, flags));
    const ok = this.socket.write(body);
    if (!ok) {
      if (this.failure) throw this.failure;
      if (this.socket.destroyed) throw new ProtocolError(ErrorCode.CONNECTION, 'connection closed');
      await new Promise<void>((resolve, reject) => {
        const onDrain = () => { cleanup(); resolve(); };
        const onClose = () => { cleanup(); reject(this.failure ?? new ProtocolError(ErrorCode.CONNECTION, 'connection closed')); };
        const cleanup = () => { this.socket.off('drain', onDrain); this.socket.off('close', onClose); this.socket.off('error', onClose); };
        this.socket.on('drain', onDrain);
        this.socket.on('close', onClose);
        this.socket.on('error', onClose);
      });
    }
    if (asked) c.observe?.({ compressed: flags !== 0, rawBytes: payload.length, wireBytes: bytes, compressSeconds, waitSeconds: (performance.now() - t0) / 1000 });
  }

  /** Sends an ERROR frame (best effort) and closes. */
  async sendError(code: string, message: string): Promise<void> {
    try {
      await this.send(ERROR, { code, message });
    } catch {
      // the peer is gone already
    }
    this.socket.end();
  }

  /** The next frame that answers no request; an ERROR frame becomes a thrown ProtocolError. */
  async next(): Promise<Frame> {
    let f: Frame;
    const queued = this.queue.shift();
    if (queued) {
      this.queuedBytes -= queued.payload.length;
      if (this.socket.isPaused() && this.queuedBytes < MAX_QUEUED_BYTES / 2) this.socket.resume();
      f = queued;
    } else {
      if (this.failure) throw this.failure;
      f = await new Promise<Frame>((resolve, reject) => { this.waiters.push({ resolve, reject }); });
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

  close(): void {
    this.socket.end();
  }
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
