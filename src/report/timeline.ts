// A migration's timeline, recorded while it runs, for the report page (or
// any program's own charts). The recorder knows nothing of the CLI: it wraps
// the hooks migrate() already offers. onFrame counts every frame's bytes by
// kind of traffic (the same bytes, by the same kinds, as the result's
// `wire.sent` and `wire.received`: the channel calls onFrame with exactly
// what it adds to its counters); a timer copies the counts into a sample
// every `intervalMs`; onEvent marks the phases and rounds (with their dirty
// counts); pause and resume mark the cutover's instants.
//
//   const rec = new TimelineRecorder();
//   const result = await migrate(path, rec.attach({ to, auth }));
//   const html = migrationReport(result, rec.stop());
import type { FrameRecord } from '../protocol/channel.js';
import { Msg } from '../protocol/frame.js';
import { kindOf, type Traffic, type TrafficKind } from '../protocol/messages.js';
import type { MigrationEvent } from '../migrate/strategy.js';

/** Default sampling interval: fine enough to see a round of a second. */
export const DEFAULT_SAMPLE_MS = 200;
/**
 * Timer samples kept at most: past this, every other one is dropped and the
 * interval doubles, so a migration of a day costs what one of an hour does
 * (about 4096 samples: 14 min at 200 ms, then 400 ms, ...). The samples taken
 * at events are always kept; counts are cumulative, so dropping a sample
 * loses no byte, only detail.
 */
export const MAX_TIMER_SAMPLES = 4096;

/** Byte counts so far (cumulative), at t seconds after the recorder was attached. */
export interface TimelineSample {
  t: number;
  sent: Traffic;
  received: Traffic;
}

/** A migration event (phase change, round, stall, cutover) or a pause/resume instant, at t seconds. */
export interface TimelineEvent {
  t: number;
  phase: string;
  detail?: unknown;
}

export interface Timeline {
  /** Wall-clock time of t = 0 (ISO 8601). */
  startedAt: string;
  /** Seconds from t = 0 to stop(). */
  seconds: number;
  /** The sampling interval at the end (doubled each time the samples were thinned). */
  intervalMs: number;
  samples: TimelineSample[];
  events: TimelineEvent[];
}

/** The hooks the recorder wraps; a MigrateOptions has them all. */
export interface RecordableOptions {
  onFrame?: (f: FrameRecord) => void;
  onEvent?: (e: MigrationEvent) => void;
  pause?: () => unknown;
  resume?: () => unknown;
}

const zero = (): Traffic => ({ control: 0, fingerprints: 0, data: 0, verify: 0 });
/** Frame names (as FrameRecord carries them) to kinds of traffic; anything unknown is control, as in the channel. */
const KIND_BY_NAME = new Map<string, TrafficKind>(Object.entries(Msg).map(([name, type]) => [name, kindOf(type)]));

export class TimelineRecorder {
  private intervalMs: number;
  private readonly t0 = performance.now();
  private readonly startedAt = new Date();
  private readonly sent = zero();
  private readonly received = zero();
  /** Samples in time order; `timer` marks the ones thinning may drop. */
  private samples: (TimelineSample & { timer?: boolean })[] = [];
  private timerSamples = 0;
  private readonly events: TimelineEvent[] = [];
  private timer: NodeJS.Timeout | undefined;
  private stoppedAt: number | undefined;

  private readonly maxTimerSamples: number;

  /** intervalMs: the sampling interval (at least 10); maxSamples: timer samples kept before thinning (at least 8). */
  constructor(options: { intervalMs?: number; maxSamples?: number } = {}) {
    const ms = options.intervalMs ?? DEFAULT_SAMPLE_MS;
    if (!(Number.isFinite(ms) && ms >= 10)) throw new RangeError(`intervalMs must be at least 10, got ${ms}`);
    const max = options.maxSamples ?? MAX_TIMER_SAMPLES;
    if (!(Number.isInteger(max) && max >= 8)) throw new RangeError(`maxSamples must be an integer of at least 8, got ${max}`);
    this.intervalMs = ms;
    this.maxTimerSamples = max;
    this.sample();
  }

  /** The sampling interval now (milliseconds): doubled at each thinning. */
  get sampleIntervalMs(): number {
    return this.intervalMs;
  }

  private now(): number {
    return (performance.now() - this.t0) / 1000;
  }

  private sample(timer = false): void {
    this.samples.push({ t: this.now(), sent: { ...this.sent }, received: { ...this.received }, ...(timer ? { timer } : {}) });
    if (timer && ++this.timerSamples > this.maxTimerSamples) this.thin();
  }

  /** Drops every other timer sample and doubles the interval. */
  private thin(): void {
    let k = 0;
    this.samples = this.samples.filter((s, i) => !s.timer || i === this.samples.length - 1 || k++ % 2 === 1);
    this.timerSamples = this.samples.filter((s) => s.timer).length;
    this.intervalMs *= 2;
    if (this.timer) {
      clearInterval(this.timer);
      this.startTimer();
    }
  }

  private startTimer(): void {
    this.timer = setInterval(() => this.sample(true), this.intervalMs);
    this.timer.unref();
  }

  /** Records an event now (migrate's own events arrive here through attach). */
  mark(phase: string, detail?: unknown): void {
    if (this.stoppedAt !== undefined) return;
    this.sample(); // the counts at the event: a round's bytes are exact, not ± one interval
    this.events.push({ t: this.now(), phase, ...(detail !== undefined ? { detail } : {}) });
  }

  /**
   * The options with the recorder's hooks around the caller's own (each of
   * the caller's hooks still runs, after the recorder's), and sampling
   * started. Attach to one migration.
   */
  attach<T extends object>(options: T & RecordableOptions): T & Required<Pick<RecordableOptions, 'onFrame' | 'onEvent'>> {
    if (this.timer || this.stoppedAt !== undefined) throw new RangeError('a TimelineRecorder records one migration');
    this.startTimer();
    const { onFrame, onEvent, pause, resume } = options;
    return {
      ...options,
      onFrame: (f: FrameRecord) => {
        (f.direction === 'sent' ? this.sent : this.received)[KIND_BY_NAME.get(f.type) ?? 'control'] += f.bytes;
        onFrame?.(f);
      },
      onEvent: (e: MigrationEvent) => {
        this.mark(e.phase, e.detail);
        onEvent?.(e);
      },
      // pause and resume keep their absence: migrate() measures downtime only when something is paused.
      ...(pause ? { pause: async () => { this.mark('pause'); const r = await pause(); this.mark('paused'); return r; } } : {}),
      ...(resume ? { resume: async () => { this.mark('resume'); const r = await resume(); this.mark('resumed'); return r; } } : {}),
    };
  }

  /** Stops sampling (a last sample is taken) and returns the timeline; later calls return the same. */
  stop(): Timeline {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    if (this.stoppedAt === undefined) {
      this.sample();
      this.stoppedAt = this.now();
    }
    return {
      startedAt: this.startedAt.toISOString(),
      seconds: this.stoppedAt,
      intervalMs: this.intervalMs,
      samples: this.samples.map((s) => ({ t: s.t, sent: { ...s.sent }, received: { ...s.received } })),
      events: this.events.map((e) => ({ ...e })),
    };
  }
}
