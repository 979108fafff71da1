/**
 * Wire codecs for frame payloads: `none` and `zstd`.
 *
 * zstd runs ONE streaming context per connection direction: every frame
 * payload is compressed with ZSTD_e_flush, so each compressed payload decodes
 * given the ones before it on the same stream, and content repeated across
 * frames (the same block sent twice, a file that spans two frames) is matched
 * against the history window instead of being compressed again.
 *
 * The library is zstd-napi (libzstd 1.5.7 built from source by node-gyp at
 * install; see docs/BENCHMARKS.md, "Wire codec", for the measurements that
 * chose it over the WASM builds).
 *
 * The stream contract, which both peers must keep:
 * - every payload handed to `Compressor.compress` must reach the peer's
 *   `Decompressor.decompress`, in order (a payload sent stored, codec none,
 *   never touches either context);
 * - after an error the stream is broken: the connection must be closed.
 */
import { createRequire } from 'node:module';
import type * as ZstdBinding from 'zstd-napi/binding.js';
import { ErrorCode, InvalidArgumentError, ProtocolError } from '../errors.js';
import { copyOf } from '../io/bytes.js';

const require = createRequire(import.meta.url);
let zstd: typeof ZstdBinding | undefined;
function binding(): typeof ZstdBinding {
  zstd ??= require('zstd-napi/binding') as typeof ZstdBinding;
  return zstd;
}

/** Codec ids on the wire (one byte). */
export const CodecId = { NONE: 0, ZSTD: 1 } as const;
export type CodecIdValue = (typeof CodecId)[keyof typeof CodecId];

/** The codec table: one entry per codec, its id on the wire and its name. */
export const CODECS: ReadonlyArray<{ id: CodecIdValue; name: 'none' | 'zstd' }> = [
  { id: CodecId.NONE, name: 'none' },
  { id: CodecId.ZSTD, name: 'zstd' },
];

/** Levels the zstd codec accepts: zstd's fast levels down to -7, up to 19 (windows of at most 8 MiB). */
export const ZSTD_MIN_LEVEL = -7;
export const ZSTD_MAX_LEVEL = 19;
export const ZSTD_DEFAULT_LEVEL = 3;
/**
 * The window of every zstd stream, and the largest a decompressor accepts
 * (2^23 = 8 MiB, eight frames). A peer that declares a larger window is
 * refused instead of making us allocate it.
 */
export const ZSTD_WINDOW_LOG_MAX = 23;
/** Output the decompressor may probe past expectedSize to detect an oversized payload. */
const PROBE = 1;

export interface Compressor {
  /** Compresses one frame payload; the result must be sent, in order. */
  compress(payload: Uint8Array): Buffer;
  /** The level the next payload is compressed at. */
  readonly level: number;
  /** Takes effect from the next payload; the stream stays decodable. */
  setLevel(level: number): void;
  close(): void;
}

export interface Decompressor {
  /**
   * Decompresses one frame payload that must decode to exactly expectedSize
   * bytes. Throws ProtocolError(ErrorCode.PROTOCOL) on corrupt or truncated
   * input and on output that would exceed or fall short of expectedSize;
   * never allocates beyond expectedSize (plus a byte of probe).
   */
  decompress(data: Uint8Array, expectedSize: number): Buffer;
  close(): void;
}

export function codecName(id: number): string {
  const c = CODECS.find((e) => e.id === id);
  if (!c) throw new ProtocolError(ErrorCode.PROTOCOL, `unknown codec id ${id}`);
  return c.name;
}

function checkLevel(level: number): number {
  if (!Number.isInteger(level) || level < ZSTD_MIN_LEVEL || level > ZSTD_MAX_LEVEL) {
    throw new InvalidArgumentError('level', `an integer from ${ZSTD_MIN_LEVEL} to ${ZSTD_MAX_LEVEL}`, level);
  }
  return level;
}

export function createCompressor(id: number, level: number = ZSTD_DEFAULT_LEVEL): Compressor {
  if (id === CodecId.NONE) return new NoneCompressor();
  if (id === CodecId.ZSTD) return new ZstdCompressor(checkLevel(level));
  throw new InvalidArgumentError('codec', 'a codec id of the table (0 none, 1 zstd)', id);
}

export function createDecompressor(id: number): Decompressor {
  if (id === CodecId.NONE) return new NoneDecompressor();
  if (id === CodecId.ZSTD) return new ZstdDecompressor();
  throw new InvalidArgumentError('codec', 'a codec id of the table (0 none, 1 zstd)', id);
}

/** `auto` | `none` | `zstd` | `zstd:LEVEL` (the --compress option). */
export function parseCompress(spec: string): { mode: 'auto' | 'none' | 'zstd'; level?: number } {
  const expected = `auto, none, zstd or zstd:LEVEL with LEVEL an integer from ${ZSTD_MIN_LEVEL} to ${ZSTD_MAX_LEVEL}`;
  if (typeof spec !== 'string') throw new InvalidArgumentError('compress', expected, spec);
  if (spec === 'auto' || spec === 'none' || spec === 'zstd') return { mode: spec };
  const m = /^zstd:(-?\d{1,6})$/.exec(spec);
  if (m) {
    const level = Number(m[1]);
    if (level >= ZSTD_MIN_LEVEL && level <= ZSTD_MAX_LEVEL) return { mode: 'zstd', level };
  }
  throw new InvalidArgumentError('compress', expected, spec);
}

class NoneCompressor implements Compressor {
  level = 0;
  compress(payload: Uint8Array): Buffer {
    return Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  }
  setLevel(): void {}
  close(): void {}
}

class NoneDecompressor implements Decompressor {
  decompress(data: Uint8Array, expectedSize: number): Buffer {
    if (data.byteLength !== expectedSize) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `stored payload of ${data.byteLength} bytes, expected ${expectedSize}`);
    }
    return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  }
  close(): void {}
}

class ZstdCompressor implements Compressor {
  private cctx: ZstdBinding.CCtx | null;
  private current: number;
  private pending: number;
  private started = false;
  private scratch: Buffer;

  constructor(level: number) {
    const z = binding();
    this.cctx = new z.CCtx();
    this.current = this.pending = level;
    this.cctx.setParameter(z.CParameter.compressionLevel, level);
    // One window for every level: 8 MiB, eight 1 MiB frames of history (level
    // 1's own would be 512 KiB, less than one frame: a frame repeating the
    // previous one would not be found).
    this.cctx.setParameter(z.CParameter.windowLog, ZSTD_WINDOW_LOG_MAX);
    this.scratch = Buffer.allocUnsafe(z.compressBound(1 << 20) + 64);
  }

  get level(): number { return this.pending; }

  setLevel(level: number): void {
    this.pending = checkLevel(level);
  }

  compress(payload: Uint8Array): Buffer {
    const cctx = this.cctx;
    if (!cctx) throw new Error('compressor is closed');
    const z = binding();
    const need = z.compressBound(payload.byteLength) + 64;
    if (this.scratch.length < need) this.scratch = Buffer.allocUnsafe(need);
    const out = this.scratch;
    let pos = 0;
    if (this.pending !== this.current) {
      // libzstd applies a new level mid-frame only in multithreaded mode: end
      // the zstd frame (a few bytes; the decoder reads the next frame of the
      // same stream as is), then start the next one at the new level. The
      // history window restarts at that payload.
      if (this.started) pos += this.drain(cctx, out, pos, EMPTY, z.EndDirective.end);
      cctx.setParameter(z.CParameter.compressionLevel, this.pending);
      this.current = this.pending;
    }
    pos += this.drain(cctx, out, pos, payload, z.EndDirective.flush);
    this.started = true;
    return copyOf(out.subarray(0, pos));
  }

  /** compressStream2 until the input is consumed and the directive is complete; returns bytes written. */
  private drain(cctx: ZstdBinding.CCtx, out: Buffer, start: number, input: Uint8Array, op: ZstdBinding.EndDirective): number {
    let pos = start;
    let consumed = 0;
    for (;;) {
      if (pos === out.length) {
        const bigger = Buffer.allocUnsafe(out.length * 2);
        out.copy(bigger, 0, 0, pos);
        this.scratch = out = bigger;
      }
      const [remaining, produced, used] = cctx.compressStream2(out.subarray(pos), input.subarray(consumed), op);
      pos += produced;
      consumed += used;
      if (remaining === 0 && consumed === input.byteLength) return pos - start;
    }
  }

  close(): void {
    this.cctx = null; // the finalizer frees the native context
  }
}

const EMPTY = new Uint8Array(0);

class ZstdDecompressor implements Decompressor {
  private dctx: ZstdBinding.DCtx | null;
  private broken: ProtocolError | null = null;
  private readonly probe = Buffer.allocUnsafe(PROBE);

  constructor() {
    const z = binding();
    this.dctx = new z.DCtx();
    this.dctx.setParameter(z.DParameter.windowLogMax, ZSTD_WINDOW_LOG_MAX);
  }

  decompress(data: Uint8Array, expectedSize: number): Buffer {
    if (this.broken) throw this.broken;
    const dctx = this.dctx;
    if (!dctx) throw new Error('decompressor is closed');
    if (!Number.isSafeInteger(expectedSize) || expectedSize < 0) {
      throw new InvalidArgumentError('expectedSize', 'a non-negative integer', expectedSize);
    }
    try {
      return this.run(dctx, data, expectedSize);
    } catch (err) {
      this.broken = err instanceof ProtocolError
        ? err
        : new ProtocolError(ErrorCode.PROTOCOL, `corrupt zstd payload: ${(err as Error).message}`, undefined, { cause: err });
      throw this.broken;
    }
  }

  private run(dctx: ZstdBinding.DCtx, data: Uint8Array, expectedSize: number): Buffer {
    const out = Buffer.allocUnsafe(expectedSize);
    let pos = 0;
    let consumed = 0;
    while (pos < expectedSize) {
      const [, produced, used] = dctx.decompressStream(out.subarray(pos), data.subarray(consumed));
      pos += produced;
      consumed += used;
      if (produced === 0 && used === 0) break; // no progress: the input ends before the payload does
    }
    if (pos < expectedSize) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `zstd payload decodes to ${pos} bytes, expected ${expectedSize} (truncated or short)`);
    }
    // Full: nothing may be left, neither input nor output the context still holds.
    for (;;) {
      const [, produced, used] = dctx.decompressStream(this.probe, data.subarray(consumed));
      consumed += used;
      if (produced > 0) {
        throw new ProtocolError(ErrorCode.PROTOCOL, `zstd payload decodes to more than the expected ${expectedSize} bytes`);
      }
      if (used === 0) break;
    }
    if (consumed < data.byteLength) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `zstd payload has ${data.byteLength - consumed} bytes past its content`);
    }
    return out;
  }

  close(): void {
    this.dctx = null;
  }
}
