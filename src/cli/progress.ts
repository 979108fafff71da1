import cliProgress from 'cli-progress';
import type { Progress } from '../progress.js';
import { displayName } from '../image/source.js';

export type ProgressMode = 'auto' | 'json' | 'none';

export interface ProgressDisplay {
  update(p: Progress): void;
  stop(): void;
}

const JSON_INTERVAL_MS = 200;

/**
 * Progress on stderr: a bar with bytes, MB/s and ETA when stderr is a
 * terminal (auto), one JSON object per line (json) for programs that run the
 * CLI, or nothing. stdout stays for results.
 */
export function createProgress(mode: ProgressMode): ProgressDisplay {
  if (mode === 'none' || (mode === 'auto' && !process.stderr.isTTY)) return { update() {}, stop() {} };
  if (mode === 'json') return jsonProgress();
  return barProgress();
}

function rate(done: number, t0: number): number {
  const s = (performance.now() - t0) / 1000;
  return s > 0 ? done / s : 0;
}

function jsonProgress(): ProgressDisplay {
  let last = 0;
  const starts = new Map<string, number>();
  return {
    update(p) {
      const key = `${p.operation}:${p.phase}:${p.round}:${p.path}`;
      if (!starts.has(key)) starts.set(key, performance.now());
      const now = performance.now();
      if (p.done !== 0 && p.done !== p.total && now - last < JSON_INTERVAL_MS) return;
      last = now;
      // mbps and eta: of this phase's own bytes (rate is the call's, on the wire for a migration).
      const bps = rate(p.done, starts.get(key)!);
      const eta = bps > 0 ? (p.total - p.done) / bps : null;
      process.stderr.write(
        JSON.stringify({ event: 'progress', ...p, rate: Math.round(p.rate), elapsed: +p.elapsed.toFixed(3), mbps: +(bps / 1e6).toFixed(1), eta: eta === null ? null : +eta.toFixed(1) }) + '\n',
      );
    },
    stop() {},
  };
}

function barProgress(): ProgressDisplay {
  const bar = new cliProgress.SingleBar(
    {
      format: '{phase} {name} |{bar}| {percentage}% {doneH}/{totalH} {mbps} MB/s ETA {eta_formatted}',
      hideCursor: true,
      clearOnComplete: true,
      stream: process.stderr,
      etaBuffer: 50,
    },
    cliProgress.Presets.shades_classic,
  );
  let current = '';
  let t0 = 0;
  return {
    update(p) {
      const phase = p.round ? `${p.phase} ${p.round}` : p.phase;
      const key = `${p.operation}:${phase}:${p.path}`;
      const payload = (done: number) => ({
        phase,
        name: displayName(p.path).split('/').pop(),
        doneH: human(done),
        totalH: human(p.total),
        mbps: (rate(done, t0) / 1e6).toFixed(0),
      });
      if (key !== current) {
        if (current) bar.stop();
        current = key;
        t0 = performance.now();
        bar.start(Math.max(1, p.total), p.done, payload(p.done));
      } else {
        bar.update(p.done, payload(p.done));
      }
    },
    stop() {
      if (current) bar.stop();
      current = '';
    },
  };
}

/** Bytes for people: 1.5 GiB, 512 KiB, 37 B. */
export function human(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return `${u === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}
