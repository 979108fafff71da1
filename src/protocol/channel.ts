import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, ProtocolError } from '../errors.js';
import { encodeHeader, FrameDecoder, HEADER_BYTES, Msg, msgName, Reader, Writer, type Frame, type MsgType } from './frame.js';

/** What a frame carries, for the accounting every migration reports. */
export type TrafficKind = 'control' | 'fingerprints' | 'data' | 'verify';
export type Traffic = Record<TrafficKind, number>;

const KIND: Partial<Record<number, TrafficKind>> = {
  [Msg.BLOCK_INFO]: 'fingerprints',
  [Msg.BLOCKS]: 'data',
  [Msg.VERIFY]: 'verify',
  [Msg.VERIFY_RESULT]: 'verify',
};

/** Frames received but not yet consumed before the socket is paused: bounds memory when the reader is slower than the link. */
const MAX_QUEUED_BYTES = 32 << 20;

export interface ChannelOptions {
  /** Bandwidth limit for what this side sends, bytes per second (0 or undefined: none). */
  bwlimit?: number;
}

/**
 * A framed, flow-controlled connection. send() resolves when the frame is
 * handed to the kernel without overfilling the socket's buffer (it waits for
 * 'drain'), so a producer that awaits it never buffers more than a frame
 * ahead of the link. Incoming frames queue up to MAX_QUEUED_BYTES, then the
 * socket is paused until the consumer catches up.
 */
export class Channel {
  readonly sent: Traffic = { control: 0, fingerprints: 0, data: 0, verify: 0 };
  readonly received: Traffic = { control: 0, fingerprints: 0, data: 0, verify: 0 };
  private readonly decoder = new FrameDecoder();
  private readonly queue: Frame[] = [];
  private queuedBytes = 0;
  private waiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;
  private nextSendAt = 0;
  private readonly rate: number;

  constructor(readonly socket: Socket, options: ChannelOptions = {}) {
    this.rate = options.bwlimit ?? 0;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = this.decoder.push(chunk);
      } catch (e) {
        this.fail(e as Error);
        socket.destroy();
        return;
      }
      for (const f of frames) {
        this.received[KIND[f.type] ?? 'control'] += f.payload.length + HEADER_BYTES;
        if (this.waiter) {
          const w = this.waiter;
          this.waiter = undefined;
          w.resolve(f);
        } else {
          this.queue.push(f);
          this.queuedBytes += f.payload.length;
        }
      }
      if (this.queuedBytes > MAX_QUEUED_BYTES) socket.pause();
    });
    socket.on('end', () => {
      const truncated = this.decoder.pending > 0;
      this.fail(new ProtocolError(truncated ? ErrorCode.PROTOCOL : ErrorCode.CONNECTION, truncated ? 'connection closed in the middle of a frame' : 'connection closed by the peer'));
    });
    socket.on('error', (e) => this.fail(new ProtocolError(ErrorCode.CONNECTION, `connection failed: ${e.message}`, undefined, { cause: e })));
    socket.on('close', () => this.fail(new ProtocolError(ErrorCode.CONNECTION, 'connection closed')));
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(e);
    }
  }

  /** Sends one frame; waits while the socket's buffer is full or the bandwidth limit says so. */
  async send(type: MsgType, payload: Buffer = Buffer.alloc(0)): Promise<void> {
    if (this.failure) throw this.failure;
    const bytes = payload.length + HEADER_BYTES;
    if (this.rate > 0) {
      const now = performance.now();
      const start = Math.max(now, this.nextSendAt);
      this.nextSendAt = start + (bytes / this.rate) * 1000;
      if (start - now > 1) await sleep(start - now);
    }
    // The connection may have failed while we were pacing.
    if (this.failure) throw this.failure;
    if (this.socket.destroyed) throw new ProtocolError(ErrorCode.CONNECTION, 'connection closed');
    this.sent[KIND[type] ?? 'control'] += bytes;
    const header = encodeHeader(type, payload.length);
    this.socket.write(header);
    const ok = this.socket.write(payload);
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
  }

  /** Sends an ERROR frame (best effort) and closes. */
  async sendError(code: string, message: string): Promise<void> {
    try {
      await this.send(Msg.ERROR, new Writer().str(code).str(message.slice(0, 1000)).done());
    } catch {
      // the peer is gone already
    }
    this.socket.end();
  }

  /** The next frame; an ERROR frame becomes a thrown ProtocolError, an unexpected type too. */
  async recv(...expect: MsgType[]): Promise<Frame> {
    let f: Frame;
    const queued = this.queue.shift();
    if (queued) {
      this.queuedBytes -= queued.payload.length;
      if (this.socket.isPaused() && this.queuedBytes < MAX_QUEUED_BYTES / 2) this.socket.resume();
      f = queued;
    } else {
      if (this.failure) throw this.failure;
      f = await new Promise<Frame>((resolve, reject) => { this.waiter = { resolve, reject }; });
    }
    if (f.type === Msg.ERROR) {
      const r = new Reader(f.payload, 'ERROR');
      const code = r.str();
      const message = r.str();
      const local = code === ErrorCode.AUTH_FAILED || code === ErrorCode.PROTOCOL_VERSION || code === ErrorCode.PROTOCOL ? code : ErrorCode.REFUSED;
      throw new ProtocolError(local as ProtocolError['code'], `peer: ${message}`, code);
    }
    if (expect.length && !expect.includes(f.type)) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `expected ${expect.map(msgName).join(' or ')}, got ${msgName(f.type)}`);
    }
    return f;
  }

  close(): void {
    this.socket.end();
  }
}
