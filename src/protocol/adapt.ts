/**
 * Adaptive compression level, like `zstd --adapt`: pure decisions from
 * measurements, no clock and no I/O of its own.
 *
 * The sender compresses frame n+1 while frame n drains, so the transfer runs
 * at min(compressor speed, link rate ÷ ratio) input bytes per second. The level
 * is chosen so that the compressor is never the slower side:
 * - the sender waits on the link (drain time, or compression time per byte
 *   well below the link's time per compressed byte): raise the level;
 * - compression takes longer per input byte than the link takes to send its
 *   output: lower the level;
 * - at the lowest level and still slower than the link (loopback), or the
 *   data does not compress (ratio above `storeRatio`): store, i.e. send the
 *   frame uncompressed with codec none. While storing, one frame in
 *   `probeEvery` is compressed at the lowest level to see whether that changed.
 *
 * A frame once handed to the compressor must be sent compressed (the stream's
 * history has it), so the decision to store is taken before a frame, from the
 * frames before it: `decide()` then `record()`, once per frame.
 */

export interface FrameSample {
  /** Payload bytes of the frame. */
  bytesIn: number;
  /** Bytes on the wire for it (bytesIn when stored). */
  bytesOut: number;
  /** CPU seconds compress() took (0 when stored). */
  compressSeconds: number;
  /** The link's measured send rate, wire bytes per second (0 or absent when not known yet). */
  linkBytesPerSecond?: number;
  /** Seconds the sender waited for the socket to drain since the previous frame. */
  drainWaitSeconds?: number;
  /**
   * The last measuring window found the sender held back by the link (it
   * waited for 'drain' a fair part of the time): the compressor kept up, so
   * the level is not lowered whatever single frames' timings say.
   */
  linkBound?: boolean;
}

export interface AdaptDecision {
  /** 'store' sends the frame uncompressed (codec none). */
  codec: 'zstd' | 'store';
  /** The zstd level to compress at (the lowest level when probing). */
  level: number;
}

export interface AdaptOptions {
  minLevel?: number;
  maxLevel?: number;
  startLevel?: number;
  /** Store when compressed ÷ input exceeds this (default 0.97). */
  storeRatio?: number;
  /** While storing, compress one frame in this many to re-measure (default 16). */
  probeEvery?: number;
  /** Frames to stay at a level before raising it again (default 4): a level change restarts the zstd window. */
  dwell?: number;
  /** Required headroom: raise only when the compressor would stay this much faster than the link (default 1.3). */
  headroom?: number;
  /** EWMA weight of a new sample (default 0.5). */
  alpha?: number;
}

/** Levels above this one compress at roughly 1/STEP_SLOWDOWN the speed, until measured. */
const STEP_SLOWDOWN = 1.5;
/** Store when the compressor at the lowest level moves input slower than the link times this. */
const STORE_MARGIN = 1.0;

export class AdaptiveLevel {
  readonly minLevel: number;
  readonly maxLevel: number;
  private readonly storeRatio: number;
  private readonly probeEvery: number;
  private readonly dwell: number;
  private readonly headroom: number;
  private readonly alpha: number;

  private level: number;
  private storing = false;
  private storedFrames = 0;
  private sinceChange = 0;
  /** Measured compression speed per level, input bytes per CPU second (EWMA). */
  private readonly speed = new Map<number, number>();
  /** Measured ratio per level (EWMA). */
  private readonly ratio = new Map<number, number>();
  private linkRate = 0;
  private last: AdaptDecision;

  constructor(opts: AdaptOptions = {}) {
    this.minLevel = opts.minLevel ?? 1;
    this.maxLevel = opts.maxLevel ?? 9;
    this.level = Math.min(this.maxLevel, Math.max(this.minLevel, opts.startLevel ?? 3));
    this.storeRatio = opts.storeRatio ?? 0.97;
    this.probeEvery = opts.probeEvery ?? 16;
    this.dwell = opts.dwell ?? 4;
    this.headroom = opts.headroom ?? 1.3;
    this.alpha = opts.alpha ?? 0.5;
    this.last = { codec: 'zstd', level: this.level };
  }

  /** What to do with the next frame. */
  decide(): AdaptDecision {
    if (this.storing) {
      const probe = this.storedFrames > 0 && this.storedFrames % this.probeEvery === 0;
      this.last = probe ? { codec: 'zstd', level: this.minLevel } : { codec: 'store', level: this.level };
    } else {
      this.last = { codec: 'zstd', level: this.level };
    }
    return this.last;
  }

  /** The measurements of the frame `decide()` was last asked about. */
  record(s: FrameSample): void {
    if (s.linkBytesPerSecond && s.linkBytesPerSecond > 0) this.linkRate = this.ewma(this.linkRate || undefined, s.linkBytesPerSecond);
    const d = this.last;
    this.sinceChange++;
    if (d.codec === 'store') {
      this.storedFrames++;
      return;
    }
    if (s.bytesIn <= 0) return;
    const r = s.bytesOut / s.bytesIn;
    this.ratio.set(d.level, this.ewma(this.ratio.get(d.level), r));
    if (s.compressSeconds > 0) this.speed.set(d.level, this.ewma(this.speed.get(d.level), s.bytesIn / s.compressSeconds));

    if (this.storing) {
      // A probe at the lowest level: leave storing when it is worth it again.
      this.storedFrames++;
      if (r <= this.storeRatio && !this.storeBeats(d.level)) this.setLevel(this.minLevel);
      return;
    }
    // Incompressible data: on the level's ratio so far, not on one frame (an image holds compressed files among the rest).
    if (this.ratio.get(d.level)! > this.storeRatio) return this.store();

    const waitedOnLink = s.linkBound === true || (s.drainWaitSeconds ?? 0) > 0.1 * Math.max(s.compressSeconds, 1e-6);
    if (!s.linkBound && this.compressorSlowerThanLink(d.level, r)) {
      // Lower the level; at the lowest, store only when storing actually moves input faster.
      if (this.level > this.minLevel) this.setLevel(this.level - 1);
      else if (this.storeBeats(d.level)) this.store();
      return;
    }
    if (this.level < this.maxLevel && this.sinceChange >= this.dwell && (waitedOnLink || this.linkRate > 0)) {
      const next = this.level + 1;
      const nextSpeed = this.speed.get(next) ?? (this.speed.get(this.level) ?? 0) / STEP_SLOWDOWN;
      const nextRatio = this.ratio.get(next) ?? r;
      // Link time per input byte at the next level: ratio ÷ link rate; compression time: 1 ÷ speed.
      const linkBound = this.linkRate > 0 ? nextSpeed > this.headroom * this.linkRate / nextRatio : waitedOnLink;
      if (linkBound) this.setLevel(next);
    }
  }

  /** The current level and whether frames are being stored (for logs and tests). */
  state(): { level: number; storing: boolean; linkBytesPerSecond: number } {
    return { level: this.level, storing: this.storing, linkBytesPerSecond: this.linkRate };
  }

  private compressorSlowerThanLink(level: number, r: number): boolean {
    const speed = this.speed.get(level);
    if (!speed || !(this.linkRate > 0)) return false;
    // Compression time per input byte (1 / speed) above the link's time for the bytes it makes (r / linkRate).
    return 1 / speed > r / this.linkRate;
  }

  /**
   * Storing moves input at the link's rate; compressing at `level` moves it at
   * min(speed, link ÷ ratio). Storing wins only when the compressor is slower
   * than the link itself (with a margin): a loopback, or a very fast network.
   */
  private storeBeats(level: number): boolean {
    const speed = this.speed.get(level);
    if (!speed || !(this.linkRate > 0)) return false;
    return speed < STORE_MARGIN * this.linkRate;
  }

  private store(): void {
    this.storing = true;
    this.storedFrames = 0;
    this.sinceChange = 0;
  }

  private setLevel(level: number): void {
    this.storing = false;
    if (level !== this.level) this.sinceChange = 0;
    this.level = level;
  }

  private ewma(prev: number | undefined, v: number): number {
    return prev === undefined ? v : prev + this.alpha * (v - prev);
  }
}
