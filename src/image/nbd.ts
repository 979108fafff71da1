// An NBD export as an ImageSource. Sources are synchronous (a scan worker
// reads straight into WASM memory), the NBD client is not: a dedicated
// thread runs the NbdClient, and the caller posts a request and blocks on a
// SharedArrayBuffer with Atomics.wait until that thread has answered. Bytes
// come back through one shared buffer of fixed size, reused for every read
// (a longer read is several turns); everything else (extents, errors) comes
// back as a message taken with receiveMessageOnPort, without an event loop.
import { MessageChannel, Worker, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { BlockferryError, ErrorCode, InvalidArgumentError, type ErrorCodeValue } from '../errors.js';
import { NBD_DEFAULT_TIMEOUT_MS } from '../nbd/client.js';
import { parseNbdUri } from '../nbd/uri.js';
import type { Extent, ImageSource } from './image.js';

/** Bytes per turn through the shared buffer: 8 MiB, one NBD READ each. */
export const NBD_BRIDGE_BYTES = 8 << 20;

/** What the client thread answers (nbd-worker.ts). */
export type BridgeReply =
  | { ok: true; size?: number; extents?: Extent[] }
  | { ok: false; code: ErrorCodeValue; message: string };

export type BridgeRequest =
  | { op: 'open' }
  | { op: 'read'; offset: number; length: number }
  | { op: 'extents'; offset: number; length: number }
  | { op: 'close' };

export class NbdImageSource implements ImageSource {
  readonly path: string;
  readonly size: number;
  private readonly control = new Int32Array(new SharedArrayBuffer(4));
  private readonly data = new SharedArrayBuffer(NBD_BRIDGE_BYTES);
  private readonly port: MessagePort;
  private worker: Worker | undefined;
  private readonly waitMs: number;

  constructor(uri: string, options: { timeoutMs?: number } = {}) {
    parseNbdUri(uri); // a bad URI fails here, with no thread started
    this.path = uri;
    const timeoutMs = options.timeoutMs ?? NBD_DEFAULT_TIMEOUT_MS;
    // The client thread fails a silent server after timeoutMs; this is the
    // backstop for a thread that cannot answer at all (connect plus negotiate
    // is two deadlines).
    this.waitMs = 2 * timeoutMs + 5000;
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    this.worker = new Worker(new URL('./nbd-worker.js', import.meta.url), {
      workerData: { uri, timeoutMs, control: this.control, data: this.data, port: port2 },
      transferList: [port2],
    });
    this.worker.unref();
    this.port.unref();
    try {
      this.size = this.call({ op: 'open' }).size!;
    } catch (e) {
      this.stop(); // no thread is left behind by a source that never opened
      throw e;
    }
  }

  private call(req: BridgeRequest): Extract<BridgeReply, { ok: true }> {
    if (!this.worker) throw new InvalidArgumentError('source', 'an open source', 'a closed one');
    Atomics.store(this.control, 0, 0);
    this.port.postMessage(req);
    if (Atomics.wait(this.control, 0, 0, this.waitMs) === 'timed-out') {
      this.stop();
      throw new BlockferryError(ErrorCode.TIMEOUT, `${this.path}: the NBD client thread did not answer within ${this.waitMs} ms`);
    }
    const reply = receiveMessageOnPort(this.port)?.message as BridgeReply | undefined;
    if (!reply) {
      this.stop();
      throw new BlockferryError(ErrorCode.INTERNAL, `${this.path}: the NBD client thread signalled without an answer`);
    }
    if (!reply.ok) throw new BlockferryError(reply.code, reply.message);
    return reply;
  }

  readInto(buf: Uint8Array, offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size || length > buf.length) {
      throw new InvalidArgumentError('range', `inside the image (${this.size} bytes) and the buffer`, `${offset}+${length}`);
    }
    const shared = new Uint8Array(this.data);
    for (let done = 0; done < length; ) {
      const n = Math.min(NBD_BRIDGE_BYTES, length - done);
      this.call({ op: 'read', offset: offset + done, length: n });
      buf.set(shared.subarray(0, n), done);
      done += n;
    }
  }

  extents(offset: number, length: number): Extent[] {
    if (length <= 0) return [];
    return this.call({ op: 'extents', offset, length }).extents!;
  }

  close(): void {
    if (!this.worker) return;
    try {
      this.call({ op: 'close' });
    } finally {
      this.stop();
    }
  }

  private stop(): void {
    void this.worker?.terminate();
    this.worker = undefined;
    this.port.close();
  }
}
