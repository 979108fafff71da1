// Glue between the codecs (codec.ts, adapt.ts) and a channel: which frames
// a sender compresses and at which level, once the handshake agreed on
// compression. docs/PROTOCOL.md, "Compression".
import { CAP_ZSTD } from './handshake.js';
import { CodecId, ZSTD_DEFAULT_LEVEL, createCompressor, createDecompressor, type Compressor, type Decompressor } from './codec.js';
import { AdaptiveLevel } from './adapt.js';
import type { FrameCompressor, FrameDecompressor, FrameSample } from './channel.js';

export type CompressMode = { mode: 'auto' | 'none' | 'zstd'; level?: number };

/** Payloads smaller than this go as they are: a frame header costs more than it would save. */
const MIN_BYTES = 512;
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
 * zstd on block data and fingerprints: a fixed level (`zstd:LEVEL`), or
 * `auto`, which raises the level while the link is the bottleneck, lowers it
 * when compressing becomes one, and stores frames (sends them as they are)
 * on a link faster than the compressor or for data that does not compress.
 */
class ZstdFrames implements FrameCompressor {
  private z: Compressor | undefined;
  private readonly adapt: AdaptiveLevel | undefined;
  private readonly fixedLevel: number;
  /** Link rate estimate: wire bytes over the time frames took to leave (pacing, write, drain), decayed. */
  private bytes = 0;
  private seconds = 0;
  private compressedFrames = 0;
  private storedFrames = 0;
  private current: number;
  /** Whether the adaptive level decided the frame being sent (small frames are not its business). */
  private decided = false;

  constructor(mode: CompressMode) {
    this.fixedLevel = mode.level ?? ZSTD_DEFAULT_LEVEL;
    this.adapt = mode.mode === 'auto' ? new AdaptiveLevel({ startLevel: mode.level ?? 1 }) : undefined;
    this.current = this.adapt ? this.adapt.decide().level : this.fixedLevel;
    // Made now, not on the first frame: creating the context would be charged to that frame's speed.
    this.z = createCompressor(CodecId.ZSTD, this.current);
  }

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
    if (!this.z) this.z = createCompressor(CodecId.ZSTD, this.current);
    else if (this.z.level !== this.current) this.z.setLevel(this.current);
    return this.z.compress(payload);
  }

  observe(s: FrameSample): void {
    if (s.compressed) this.compressedFrames++;
    else this.storedFrames++;
    this.bytes = 0.8 * this.bytes + s.wireBytes;
    this.seconds = 0.8 * this.seconds + Math.max(s.waitSeconds, 1e-6);
    if (!this.adapt || !this.decided) return;
    this.adapt.record({
      bytesIn: s.rawBytes,
      bytesOut: s.wireBytes,
      // Speed from small frames is mostly per-call overhead: only frames of 64 KiB or more measure it.
      compressSeconds: s.rawBytes >= SPEED_SAMPLE_BYTES ? s.compressSeconds : 0,
      linkBytesPerSecond: Math.min(1e10, this.bytes / this.seconds),
      drainWaitSeconds: s.waitSeconds,
    });
  }

  close(): void {
    this.z?.close();
    this.z = undefined;
  }

  stats(): { compressedFrames: number; storedFrames: number; level: number } {
    return { compressedFrames: this.compressedFrames, storedFrames: this.storedFrames, level: this.current };
  }
}
