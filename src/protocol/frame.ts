// Framing: every message is a 12-byte header and a payload.
//   u32 payload length | u8 message type | u8 flags | u16 reserved (0) | u32 request id
// docs/PROTOCOL.md lists every message (their byte layouts live in
// messages.ts, nowhere else). A frame longer than the receiver's limit, a
// header with unknown flags or non-zero reserved bits, or an unknown type
// ends the connection with ERR_BF_PROTOCOL before its payload is buffered.
import { ErrorCode, ProtocolError } from '../errors.js';

export const HEADER_BYTES = 12;
/** Frame flag: the payload is compressed with the codec the handshake agreed on (u32 decompressed length, then the codec's bytes). */
export const FLAG_COMPRESSED = 1;
const KNOWN_FLAGS = FLAG_COMPRESSED;
/**
 * Largest payload: one BLOCKS frame of 256 blocks of 4 KiB plus their
 * fingerprints fits in 1.1 MiB; 1 MiB blocks go one per frame. 16 MiB leaves
 * room for large block sizes and bounds what a hostile peer makes us buffer.
 */
export const MAX_PAYLOAD = 16 << 20;

export const Msg = {
  HELLO: 1,
  HELLO_ACK: 2,
  AUTH: 3,
  READY: 4,
  ERROR: 5,
  BEGIN: 16,
  BEGIN_OK: 17,
  BLOCK_INFO: 18,
  INFO_END: 19,
  NEED: 20,
  BLOCKS: 21,
  COPY: 22,
  ZERO: 23,
  ROUND: 24,
  VERIFY: 25,
  VERIFY_RESULT: 26,
  COMMIT: 27,
  DONE: 28,
  SYNC: 29,
  SYNC_OK: 30,
  BLOCKS_DELTA: 31,
  // Post-copy (CAP_POSTCOPY): the destination takes over while blocks still arrive.
  MISSING: 40,
  SWITCH: 41,
  SWITCH_OK: 42,
  PULL: 43,
  OWNED: 44,
  PROBE: 45,
  PROBE_OK: 46,
  // A base-image repository (FILL_REPOSITORY): a destination asks for blocks by content.
  FETCH: 50,
  FETCH_RESULT: 51,
  // Scatter-gather (CAP_SCATTER): blocks staged by content at intermediaries and the destination.
  STASH: 60,
  STASH_OK: 61,
  GATHER: 62,
  GATHER_RESULT: 63,
  SG_PLACE: 64,
  // SnapMig (CAP_SNAPMIG, paper 000): a coordinator asks backup servers what they hold and has them send it; the destination assembles the chain.
  LAYERS: 70,
  LAYERS_RESULT: 71,
  SEND_LAYER: 72,
  SEND_LAYER_RESULT: 73,
  CHAIN_BEGIN: 74,
  CHAIN_BEGIN_OK: 75,
  CHAIN_COMMIT: 76,
  CHAIN_DONE: 77,
} as const;
export type MsgType = (typeof Msg)[keyof typeof Msg];
const KNOWN = new Set<number>(Object.values(Msg));
export const msgName = (t: number) => Object.entries(Msg).find(([, v]) => v === t)?.[0] ?? `#${t}`;

export interface Frame {
  type: MsgType;
  payload: Buffer;
  /** Request id: a reply carries its request's id; 0 for a frame that is neither. */
  id: number;
  flags: number;
}

export function encodeHeader(type: MsgType, length: number, id = 0, flags = 0): Buffer {
  if (length > MAX_PAYLOAD) throw new ProtocolError(ErrorCode.PROTOCOL, `frame of ${length} bytes exceeds the ${MAX_PAYLOAD}-byte limit`);
  const h = Buffer.alloc(HEADER_BYTES);
  h.writeUInt32LE(length, 0);
  h.writeUInt8(type, 4);
  h.writeUInt8(flags, 5);
  h.writeUInt32LE(id, 8);
  return h;
}

const EMPTY = Buffer.alloc(0);

/** Splits a byte stream into frames; throws ProtocolError on anything malformed. */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  /** Index of the first chunk still holding unread bytes. */
  private head = 0;
  private buffered = 0;
  private need: { type: MsgType; length: number; id: number; flags: number } | undefined;
  /** Largest payload accepted: small before authentication (the handshake's messages), MAX_PAYLOAD after. */
  limit = MAX_PAYLOAD;

  push(chunk: Buffer): Frame[] {
    if (chunk.length) this.chunks.push(chunk);
    this.buffered += chunk.length;
    const out: Frame[] = [];
    for (;;) {
      if (!this.need) {
        if (this.buffered < HEADER_BYTES) break;
        const h = this.take(HEADER_BYTES);
        const length = h.readUInt32LE(0);
        const type = h.readUInt8(4);
        const flags = h.readUInt8(5);
        if (flags & ~KNOWN_FLAGS || h.readUInt16LE(6) !== 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'frame header has unknown flags or non-zero reserved bits');
        if (!KNOWN.has(type)) throw new ProtocolError(ErrorCode.PROTOCOL, `unknown message type ${type}`);
        if (length > this.limit) throw new ProtocolError(ErrorCode.PROTOCOL, `frame of ${length} bytes exceeds the ${this.limit}-byte limit`);
        this.need = { type: type as MsgType, length, id: h.readUInt32LE(8), flags };
      }
      if (this.buffered < this.need.length) break;
      out.push({ type: this.need.type, payload: this.take(this.need.length), id: this.need.id, flags: this.need.flags });
      this.need = undefined;
    }
    return out;
  }

  /** Bytes of an unfinished frame (a connection ending now is truncated). */
  get pending(): number {
    return this.buffered + (this.need ? HEADER_BYTES : 0);
  }

  /** The next n buffered bytes: a view when one chunk holds them, else exactly n bytes copied once. */
  private take(n: number): Buffer {
    if (n === 0) return EMPTY;
    const first = this.chunks[this.head]!;
    this.buffered -= n;
    if (first.length >= n) {
      this.consume(first, n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    for (let at = 0; at < n; ) {
      const c = this.chunks[this.head]!;
      const k = Math.min(c.length, n - at);
      out.set(k === c.length ? c : c.subarray(0, k), at);
      at += k;
      this.consume(c, k);
    }
    return out;
  }

  /** Drops k bytes from the head chunk c. */
  private consume(c: Buffer, k: number): void {
    if (k < c.length) {
      this.chunks[this.head] = c.subarray(k);
      return;
    }
    this.head++;
    if (this.head === this.chunks.length) {
      this.chunks = [];
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.chunks.length) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }
}

/** A cursor over a payload that throws ProtocolError instead of reading past the end. */
export class Reader {
  private at = 0;
  constructor(private readonly buf: Buffer, private readonly what: string) {}
  private need(n: number): void {
    if (this.at + n > this.buf.length) throw new ProtocolError(ErrorCode.PROTOCOL, `${this.what}: truncated payload (${this.buf.length} bytes)`);
  }
  u8(): number { this.need(1); return this.buf.readUInt8(this.at++); }
  u16(): number { this.need(2); const v = this.buf.readUInt16LE(this.at); this.at += 2; return v; }
  u32(): number { this.need(4); const v = this.buf.readUInt32LE(this.at); this.at += 4; return v; }
  u64(): number {
    this.need(8);
    const v = this.buf.readBigUInt64LE(this.at);
    this.at += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(ErrorCode.PROTOCOL, `${this.what}: value ${v} out of range`);
    return Number(v);
  }
  /** A full 64-bit value (fingerprints, signatures). */
  big(): bigint { this.need(8); const v = this.buf.readBigUInt64LE(this.at); this.at += 8; return v; }
  bytes(n: number): Buffer { this.need(n); const v = this.buf.subarray(this.at, this.at + n); this.at += n; return v; }
  str(): string { return this.bytes(this.u16()).toString('utf8'); }
  get remaining(): number { return this.buf.length - this.at; }
  end(): void {
    if (this.at !== this.buf.length) throw new ProtocolError(ErrorCode.PROTOCOL, `${this.what}: ${this.buf.length - this.at} unexpected trailing bytes`);
  }
}

/** Builds payloads field by field, in one growing buffer. */
export class Writer {
  private buf: Buffer;
  private at = 0;
  constructor(initial = 256) {
    this.buf = Buffer.allocUnsafe(initial);
  }
  private room(n: number): void {
    if (this.at + n <= this.buf.length) return;
    const next = Buffer.allocUnsafe(Math.max(this.at + n, this.buf.length * 2));
    this.buf.copy(next, 0, 0, this.at);
    this.buf = next;
  }
  u8(v: number): this { this.room(1); this.buf.writeUInt8(v, this.at); this.at += 1; return this; }
  u16(v: number): this { this.room(2); this.buf.writeUInt16LE(v, this.at); this.at += 2; return this; }
  u32(v: number): this { this.room(4); this.buf.writeUInt32LE(v, this.at); this.at += 4; return this; }
  u64(v: number): this { this.room(8); this.buf.writeBigUInt64LE(BigInt(v), this.at); this.at += 8; return this; }
  /** A full 64-bit value (fingerprints, signatures). */
  big(v: bigint): this { this.room(8); this.buf.writeBigUInt64LE(v, this.at); this.at += 8; return this; }
  bytes(b: Uint8Array): this { this.room(b.length); this.buf.set(b, this.at); this.at += b.length; return this; }
  str(s: string): this { const b = Buffer.from(s, 'utf8'); return this.u16(b.length).bytes(b); }
  get length(): number { return this.at; }
  done(): Buffer { return this.buf.subarray(0, this.at); }
}
