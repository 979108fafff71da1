// A raw NBD client for tests that play a client byte by byte: well-behaved
// (handshake, GO, requests with cookies, replies matched by cookie) or
// hostile (anything written with `socket.write`).
import { connect, type Socket } from 'node:net';
import {
  BASE_ALLOCATION, encodeRequest, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_IHAVEOPT, NBD_INFO_EXPORT,
  NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_INFO, NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_OFFSET_DATA, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC,
  type NbdRequest, type StatusExtent,
} from '../src/nbd/protocol.js';
import type { NbdAddress } from '../src/nbd/server.js';

export interface RawReply {
  cookie: bigint;
  error: number;
  data?: Buffer;
  extents?: StatusExtent[];
}

export class RawNbd {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: (() => void) | undefined;
  /** Settles when the server closes the connection. */
  readonly closed: Promise<void>;
  private isClosed = false;
  size = 0;
  flags = 0;
  structured = false;
  /** Read lengths by cookie, for simple replies (whose length the reply does not say). */
  private readonly readLengths = new Map<bigint, number>();

  private constructor(readonly socket: Socket) {
    socket.on('data', (c: Buffer) => { this.chunks.push(c); this.buffered += c.length; this.waiter?.(); });
    socket.on('error', () => {});
    this.closed = new Promise((r) => socket.once('close', () => { this.isClosed = true; this.waiter?.(); r(); }));
  }

  static async connect(a: NbdAddress): Promise<RawNbd> {
    const s = 'path' in a ? connect(a.path) : connect(a.port, a.host);
    await new Promise((res, rej) => { s.once('connect', res); s.once('error', rej); });
    return new RawNbd(s);
  }

  /** n bytes; rejects when the connection closes first. */
  async read(n: number): Promise<Buffer> {
    while (this.buffered < n) {
      if (this.isClosed) throw new Error(`connection closed with ${this.buffered} of ${n} bytes`);
      await new Promise<void>((r) => { this.waiter = r; });
      this.waiter = undefined;
    }
    const all = Buffer.concat(this.chunks);
    this.chunks = [all.subarray(n)];
    this.buffered -= n;
    return all.subarray(0, n);
  }

  /** The server's greeting and our client flags. */
  async hello(): Promise<void> {
    const g = await this.read(18);
    if (g.toString('latin1', 0, 8) !== 'NBDMAGIC') throw new Error('no NBDMAGIC');
    const f = Buffer.alloc(4);
    f.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    this.socket.write(f);
  }

  option(option: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([h, data]));
  }

  /** One option reply: its type and payload. */
  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const length = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(length) };
  }

  /** Hello, then (structured replies and base:allocation if asked) GO on name; throws on refusal. */
  static async open(a: NbdAddress, name: string, o: { structured?: boolean } = {}): Promise<RawNbd> {
    const c = await RawNbd.connect(a);
    await c.hello();
    if (o.structured) {
      c.option(NBD_OPT_STRUCTURED_REPLY);
      if ((await c.optionReply()).type !== NBD_REP_ACK) throw new Error('structured replies refused');
      c.structured = true;
      const n = Buffer.from(name);
      const q = Buffer.from(BASE_ALLOCATION);
      const d = Buffer.alloc(4 + n.length + 4 + 4 + q.length);
      d.writeUInt32BE(n.length, 0); n.copy(d, 4);
      d.writeUInt32BE(1, 4 + n.length);
      d.writeUInt32BE(q.length, 8 + n.length); q.copy(d, 12 + n.length);
      c.option(NBD_OPT_SET_META_CONTEXT, d);
      for (let r = await c.optionReply(); r.type !== NBD_REP_ACK; r = await c.optionReply()) {
        if (r.type & 0x80000000) throw new Error(`SET_META_CONTEXT refused: ${r.type}`);
      }
    }
    const n = Buffer.from(name);
    const d = Buffer.alloc(4 + n.length + 2);
    d.writeUInt32BE(n.length, 0); n.copy(d, 4);
    c.option(NBD_OPT_GO, d);
    for (;;) {
      const r = await c.optionReply();
      if (r.type === NBD_REP_ACK) break;
      if (r.type & 0x80000000) throw new Error(`GO refused: 0x${r.type.toString(16)} ${r.data.toString()}`);
      if (r.type === NBD_REP_INFO && r.data.readUInt16BE(0) === NBD_INFO_EXPORT) {
        c.size = Number(r.data.readBigUInt64BE(2));
        c.flags = r.data.readUInt16BE(10);
      }
    }
    return c;
  }

  send(r: Partial<NbdRequest> & { type: number; cookie: bigint }, data?: Uint8Array): void {
    const req = { flags: 0, offset: 0, length: data?.length ?? 0, ...r };
    if (req.type === 0) this.readLengths.set(req.cookie, req.length);
    this.socket.write(encodeRequest(req));
    if (data) this.socket.write(data);
  }

  /** The next complete reply (all chunks of a structured one; replies to different cookies are not interleaved by this server). */
  async reply(): Promise<RawReply> {
    const h = await this.read(4);
    const magic = h.readUInt32BE(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      const r = await this.read(12);
      const cookie = r.readBigUInt64BE(4);
      const error = r.readUInt32BE(0);
      const len = this.readLengths.get(cookie);
      this.readLengths.delete(cookie);
      return { cookie, error, ...(len !== undefined && !error ? { data: await this.read(len) } : {}) };
    }
    if (magic !== NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`reply magic 0x${magic.toString(16)}`);
    const out: RawReply = { cookie: 0n, error: 0 };
    for (let first = true; ; first = false) {
      const r = first ? await this.read(16) : (await this.read(20)).subarray(4);
      const flags = r.readUInt16BE(0);
      const type = r.readUInt16BE(2);
      out.cookie = r.readBigUInt64BE(4);
      const p = await this.read(r.readUInt32BE(12));
      if (type === NBD_REPLY_TYPE_OFFSET_DATA) out.data = p.subarray(8);
      else if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
        out.extents = [];
        for (let i = 4; i < p.length; i += 8) out.extents.push({ length: p.readUInt32BE(i), flags: p.readUInt32BE(i + 4) });
      } else if (type & 0x8000) out.error = p.readUInt32BE(0);
      if (flags & NBD_REPLY_FLAG_DONE) return out;
    }
  }

  close(): void {
    this.socket.destroy();
  }
}
