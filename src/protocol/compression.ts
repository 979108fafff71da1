// Glue between the codecs (codec.ts, adapt.ts) and a channel: which frames
// a sender compresses and at which level, once the handshake agreed on
// compression. docs/PROTOCOL.md, "Compression".
import { CAP_ZSTD } from './handshake.js';
import { CodecId, ZSTD_DEFAULT_LEVEL, createCompressor, createDecompressor, type Compressor, type Decompressor } from './codec.js';
import { AdaptiveLevel } from './adapt.js';
import { Worker } from 'node:worker_threads';
import { ErrorCode, ProtocolError } from '../errors.js';
import type { FrameCompressor, FrameDecompressor, FrameSample } from './channel.js';

/** offThread: false compresses on the calling thread (default: on a worker thread, pipelined with the channel's writes). */
export type CompressMode = { mode: 'auto' | 'none' | 'zstd'; level?: number; offThread?: boolean };

/** Payloads smaller than this go as they are: a frame header costs more than it would save. */
const MIN_BYTES = 512;
/** A link-rate window: at least this many frames and this many seconds. */
const WINDOW_FRAMES = 8;
const WINDOW_SECONDS = 0.2;
/** A window whose 'drain' waits take this share of its time was held back by the link. */
const LINK_BOUND_WAIT = 0.1;
/** Frames at least this large measure the compressor's speed. */
const SPEED_SAMPLE_BYTES = 64 << 10;

/** The decompressor a receiver installs for the capabilities agreed (none: compressed frames are a protocol error). */
export function decompressorFor(caps: number): FrameDecompressor | undefined {
  if (!(caps & CAP_ZSTD)) return undefined;
  let d: Decompressor | undefined;
  return {
    decompress: (data, size) => (d ??= createDecompressor(CodecId.ZSTD)).decompress(data, size),
    close: () => d?.close(),
  };
}

/** The compressor a sender installs: none unless both sides can and the user did not say none. */
export function compressorFor(caps: number, mode: CompressMode): FrameCompressor | undefined {
  if (!(caps & CAP_ZSTD) || mode.mode === 'none') return undefined;
  return new ZstdFrames(mode);
}

/**
 * The connection's zstd stream on a worker thread (compress-worker.ts):
 * jobs go in order, answers come back in order. It never keeps the process
 * alive; close() ends it and fails what was still queued.
 */
class OffThreadZstd {
  private readonly worker: Worker;
  private readonly waiting: Array<{ resolve: (r: { data: Buffer; seconds: number }) => void; reject: (e: Error) => void }> = [];
  private failure: Error | undefined;

  constructor(level: number) {
    this.worker = new Worker(new URL('./compress-worker.js', import.meta.url), { workerData: { level } });
    this.worker.unref();
    this.worker.on('message', (m: { ok: true; out: ArrayBuffer; seconds: number } | { ok: false; message: string }) => {
      const w = this.waiting.shift();
      if (!w) return;
      if (m.ok) w.resolve({ data: Buffer.from(m.out), seconds: m.seconds });
      else w.reject(this.stop(new ProtocolError(ErrorCode.PROTOCOL, `compression failed: ${m.message}`)));
    });
    this.worker.on('error', (e) => this.stop(new ProtocolError(ErrorCode.PROTOCOL, `compression thread failed: ${e.message}`, undefined, { cause: e })));
    this.worker.on('exit', () => this.stop(new ProtocolError(ErrorCode.CONNECTION, 'compression thread ended')));
  }

  compress(payload: Uint8Array, level: number): Promise<{ data: Buffer; seconds: number }> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.worker.postMessage({ payload, level }); // copied now: the caller may reuse payload
    });
  }

  /** Fails what is queued with e (the stream is broken from here on). */
  private stop(e: Error): Error {
    this.failure ??= e;
    for (const w of this.waiting.splice(0)) w.reject(this.failure);
    return this.failure;
  }

  close(): void {
    this.stop(new ProtocolError(ErrorCode.CONNECTION, 'connection closed'));
    void this.worker.terminate();
  }
}

/**
 * zstd on block data and fingerprints: a fixed level (`zstd:LEVEL`), or
 * `auto`, which raises the level while the link is the bottleneck, lowers it
 * when compressing becomes one, and stores frames (sends them as they are)
 * on a link faster than the compressor or for data that does not compress.
 */
class ZstdFrames implements FrameCompressor {
  private z: Compressor | undefined;
  /** The stream on its own thread (the channel then pipelines); undefined: compress() on this thread. */
  private off: OffThreadZstd | undefined;
  private closed = false;
  private readonly adapt: AdaptiveLevel | undefined;
  private readonly fixedLevel: number;
  /**
   * Link rate estimate, from windows of frames (at least WINDOW_FRAMES and
   * WINDOW_SECONDS): a window in which the sender waited for 'drain' a fair
   * part of the time was held back by the link, and its wire bytes over its
   * wall time are the link's rate; a window without such waits only says the
   * link is faster than that (twice, as a guess, so that a compressor that
   * cannot keep up lowers its level). Waits alone are no measure: the
   * socket's and the qdisc's buffers take megabytes before the first wait.
   */
  private link = 0;
  private linkBound = false;
  private winBytes = 0;
  private winWait = 0;
  private winFrames = 0;
  private winStart = performance.now();
  private compressedFrames = 0;
  private storedFrames = 0;
  private current: number;
  /** Whether the adaptive level decided the frame being sent (small frames are not its business). */
  private decided = false;

  constructor(mode: CompressMode) {
    this.fixedLevel = mode.level ?? ZSTD_DEFAULT_LEVEL;
    this.adapt = mode.mode === 'auto' ? new AdaptiveLevel({ startLevel: mode.level ?? ZSTD_DEFAULT_LEVEL }) : undefined;
    this.current = this.adapt ? this.adapt.decide().level : this.fixedLevel;
    if (mode.offThread !== false) {
      // One stream per direction: with the thread there is no compress() on this one. The thread
      // starts with the first frame to compress (a destination's connection may never send one).
      this.compressAsync = (payload: Buffer) => {
        if (this.closed) return Promise.reject(new ProtocolError(ErrorCode.CONNECTION, 'connection closed'));
        return (this.off ??= new OffThreadZstd(this.current)).compress(payload, this.current);
      };
    } else {
      // Made now, not on the first frame: creating the context would be charged to that frame's speed.
      this.z = createCompressor(CodecId.ZSTD, this.current);
    }
  }

  compressAsync: ((payload: Buffer) => Promise<{ data: Buffer; seconds: number }>) | undefined;

  wants(kind: string, length: number): boolean {
    this.decided = false;
    if ((kind !== 'data' && kind !== 'fingerprints') || length < MIN_BYTES) return false;
    if (!this.adapt) {
      this.current = this.fixedLevel;
      return true;
    }
    this.decided = true;
    const d = this.adapt.decide();
    if (d.codec === 'store') return false;
    this.current = d.level;
    return true;
  }

  compress(payload: Buffer): Buffer {
    if (this.compressAsync) throw new Error('this stream compresses on its thread (compressAsync)');
    if (!this.z) this.z = createCompressor(CodecId.ZSTD, this.current);
    else if (this.z.level !== this.current) this.z.setLevel(this.current);
    return this.z.compress(payload);
  }

  observe(s: FrameSample): void {
    if (s.compressed) this.compressedFrames++;
    else this.storedFrames++;
    this.winBytes += s.wireBytes;
    this.winWait += s.waitSeconds;
    this.winFrames++;
    const now = performance.now();
    const elapsed = (now - this.winStart) / 1000;
    let linkSample = 0;
    if (this.winFrames >= WINDOW_FRAMES && elapsed >= WINDOW_SECONDS) {
      const rate = this.winBytes / elapsed;
      this.linkBound = this.winWait >= LINK_BOUND_WAIT * elapsed;
      linkSample = this.linkBound ? rate : Math.max(this.link, 2 * rate);
      this.link = linkSample;
      this.winBytes = this.winWait = this.winFrames = 0;
      this.winStart = now;
    }
    if (!this.adapt || !this.decided) return;
    this.adapt.record({
      bytesIn: s.rawBytes,
      bytesOut: s.wireBytes,
      // Speed from small frames is mostly per-call overhead: only frames of 64 KiB or more measure it.
      compressSeconds: s.rawBytes >= SPEED_SAMPLE_BYTES ? s.compressSeconds : 0,
      linkBytesPerSecond: Math.min(1e10, linkSample),
      drainWaitSeconds: s.waitSeconds,
      linkBound: this.linkBound,
    });
  }

  close(): void {
    this.z?.close();
    this.z = undefined;
    this.off?.close();
    this.closed = true;
  }

  stats(): { compressedFrames: number; storedFrames: number; level: number } {
    return { compressedFrames: this.compressedFrames, storedFrames: this.storedFrames, level: this.current };
  }
}
