// The migration report: a page with the migration's timeline (throughput
// over time by kind of traffic, the phases, the rounds and their dirty
// counts, the pause and the resume) beside the result's numbers. Also made
// for a migration that failed, from what the recorder saw, and says so.
import type { MigrationResult } from '../migrate/migrate.js';
import { trafficTotal as total, type TrafficKind } from '../protocol/messages.js';
import { BlockferryError } from '../errors.js';
import { escapeHtml, humanBytes, page } from './html.js';
import type { Timeline, TimelineSample } from './timeline.js';

export interface MigrationReportOptions {
  /** The image's name at the destination (the result's, when there is one). */
  name?: string;
  /** The destination, as given (shown only). */
  to?: string;
  /** Why the migration failed: the page says it failed, and shows this. */
  error?: unknown;
  /** When the page was made (default: now). */
  generatedAt?: Date;
}

const KINDS: TrafficKind[] = ['data', 'fingerprints', 'verify', 'control'];
const KIND_COLOURS: Record<TrafficKind, string> = { data: '#2f6fde', fingerprints: '#e8590c', verify: '#2b8a3e', control: '#868e96' };

/** One pre-copy round, the cutover's last round, or a post-copy switch, as the timeline saw it. */
export interface ReportRound {
  /**
   * `round`: a round while live; `cutover`: pre-copy's last round, sent
   * while paused (the result counts it among its rounds); `switch`: the
   * post-copy switch (not a round: the blocks missing then follow on demand).
   */
  kind: 'round' | 'cutover' | 'switch';
  /** The round's number (a switch carries the number of the round before it). */
  round: number;
  /** Seconds since the start: when the round began and when the next step began. */
  start: number;
  end: number;
  /** Blocks the round had to send (dirty), or, for a switch, the blocks missing at the switch. */
  dirty: number;
  /** Bytes this side sent during the round, all kinds. */
  sentBytes: number;
  /** The downtime predicted when the round began (seconds), where the strategy says. */
  predictedDowntime?: number;
}

/** The last sample taken at or before t (samples are in time order). */
function sampleAt(samples: TimelineSample[], t: number): TimelineSample {
  let lo = 0, hi = samples.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (samples[mid]!.t <= t) lo = mid; else hi = mid - 1;
  }
  return samples[lo]!;
}

/** The rounds in a timeline: each `round` event, then the `cutover` (pre-copy: the last round, sent while paused; post-copy: the switch). */
export function timelineRounds(timeline: Timeline): ReportRound[] {
  const ev = timeline.events;
  const out: ReportRound[] = [];
  let last = 0;
  for (let i = 0; i < ev.length; i++) {
    const e = ev[i]!;
    if (e.phase !== 'round' && e.phase !== 'cutover') continue;
    const d = (e.detail ?? {}) as { round?: number; dirty?: number; missing?: number; predictedDowntime?: number };
    // Post-copy's cutover event tells the blocks missing at the switch; pre-copy's the dirty blocks of its last round.
    const kind = e.phase === 'round' ? 'round' : d.missing !== undefined ? 'switch' : 'cutover';
    const round = kind === 'switch' ? last : kind === 'cutover' ? last + 1 : d.round ?? last + 1;
    last = round;
    // The round lasts until the next phase event (the next round, verify, the cutover's COMMIT: done).
    const next = ev.slice(i + 1).find((x) => x.phase !== 'pause' && x.phase !== 'paused' && x.phase !== 'stall' && x.phase !== 'throttle' && x.phase !== 'repair');
    const end = next?.t ?? timeline.seconds;
    out.push({
      kind, round, start: e.t, end,
      dirty: d.dirty ?? d.missing ?? 0,
      sentBytes: total(sampleAt(timeline.samples, end).sent) - total(sampleAt(timeline.samples, e.t).sent),
      ...(typeof d.predictedDowntime === 'number' ? { predictedDowntime: d.predictedDowntime } : {}),
    });
  }
  return out;
}

/** Samples with strictly increasing times (1 ms apart at least; the first is always kept). */
function distinctTimes(samples: TimelineSample[]): TimelineSample[] {
  const out: TimelineSample[] = [];
  for (const s of samples) {
    if (out.length > 1 && s.t - out[out.length - 1]!.t < 0.001) out[out.length - 1] = s;
    else if (out.length === 1 && s.t - out[0]!.t < 0.001) continue;
    else out.push(s);
  }
  if (samples.length > 1 && out[out.length - 1] !== samples[samples.length - 1]) out.push(samples[samples.length - 1]!);
  return out;
}

const ms = (s: number) => `${(s * 1000).toFixed(0)} ms`;
const secs = (s: number) => `${s.toFixed(2)} s`;

function errorText(e: unknown): { code: string; message: string } {
  if (e instanceof BlockferryError) return { code: e.code, message: e.message };
  if (e instanceof Error) return { code: (e as NodeJS.ErrnoException).code ?? 'ERR_BF_INTERNAL', message: e.message };
  return { code: 'ERR_BF_INTERNAL', message: String(e) };
}

const CSS = `
.chart{margin:4px 0 12px}
table.rounds td.num,table.traffic td.num{text-align:right}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:baseline}
.phases{display:flex;height:22px;border-radius:3px;overflow:hidden;font-size:11px;margin:6px 0 2px;max-width:960px;box-sizing:border-box}
.phases div{color:#fff;white-space:nowrap;overflow:hidden;text-overflow:clip;padding:3px 0;text-indent:4px;min-width:0}
`;

const PHASE_COLOURS: Record<string, string> = {
  scan: '#845ef7', fingerprints: '#e8590c', transfer: '#2f6fde', round: '#1098ad', verify: '#2b8a3e', cutover: '#c92a2a', done: '#495057',
};

/**
 * The report page of one migration: from its result (when it finished) and
 * the timeline a TimelineRecorder took. With options.error, or without a
 * result, the page says the migration failed.
 */
export function migrationReport(result: MigrationResult | undefined, timeline: Timeline, options: MigrationReportOptions = {}): string {
  const name = result?.name ?? options.name ?? 'image';
  const failed = !result || options.error !== undefined;
  const when = (options.generatedAt ?? new Date()).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  const rounds = timelineRounds(timeline);
  const samples = distinctTimes(timeline.samples);
  const lastSample = timeline.samples[timeline.samples.length - 1]!;
  const sent = result?.wire.sent ?? lastSample.sent;
  const received = result?.wire.received ?? lastSample.received;
  const bs = result?.blockSize;

  // Phases: from each phase event to the next.
  const phaseEvents = timeline.events.filter((e) => ['scan', 'fingerprints', 'transfer', 'round', 'verify', 'cutover', 'done'].includes(e.phase));
  const span = Math.max(1e-6, timeline.seconds);
  const phases = phaseEvents.map((e, i) => {
    const end = phaseEvents[i + 1]?.t ?? timeline.seconds;
    return { phase: e.phase, label: e.phase === 'round' ? `round ${(e.detail as { round?: number } | undefined)?.round ?? ''}` : e.phase, start: e.t, end };
  }).filter((p) => p.phase !== 'done');
  const blank = (seconds: number) => `<div style="flex:${Math.max(0, seconds / span).toFixed(4)};background:#e9ecef"></div>`;
  // Connecting (before the first phase) and after the last (until the recorder stopped) are blank.
  const phaseStrip = blank(phases[0]?.start ?? 0) + phases.map((p) =>
    `<div style="flex:${Math.max(0.002, (p.end - p.start) / span).toFixed(4)};background:${PHASE_COLOURS[p.phase] ?? '#495057'}" title="${escapeHtml(`${p.label}: ${secs(p.start)} – ${secs(p.end)}`)}">${escapeHtml(p.label)}</div>`).join('') +
    blank(timeline.seconds - (phases[phases.length - 1]?.end ?? timeline.seconds));

  const err = options.error !== undefined ? errorText(options.error) : undefined;
  const banner = failed
    ? `<div class="banner failed" id="status" data-status="failed">The migration failed${err ? `: ${escapeHtml(err.code)}: ${escapeHtml(err.message)}` : ''}. Below is what was recorded up to then (${escapeHtml(secs(timeline.seconds))}).</div>`
    : `<div class="banner ok" id="status" data-status="ok">Migrated and verified: ${result!.rounds} round${result!.rounds === 1 ? '' : 's'}, downtime ${escapeHtml(ms(result!.downtimeSeconds))} (predicted ${escapeHtml(ms(result!.predictedDowntimeSeconds))}, budget ${escapeHtml(ms(result!.live.maxDowntimeSeconds))}).</div>`;

  const facts: [string, string][] = result ? [
    ['strategy', result.strategy],
    ['image', `${humanBytes(result.imageSize)} in ${result.blockSize} B blocks (${result.blocks.total} blocks, ${result.blocks.zero} zero)`],
    ['time', secs(result.seconds)],
    ['downtime', `${ms(result.downtimeSeconds)} measured, ${ms(result.predictedDowntimeSeconds)} predicted, budget ${ms(result.live.maxDowntimeSeconds)}`],
    ['cutover reason', result.live.cutoverReason],
    ['rounds', String(result.rounds)],
    ['blocks', `${result.blocks.sent} sent, ${result.blocks.copied} copied at the destination, ${result.blocks.filledFromNeighbours} filled from its neighbours, ${result.blocks.resumed} resumed, ${result.blocks.resent} re-sent`],
    ['phases', Object.entries(result.phases).map(([k, v]) => `${k} ${secs(v)}`).join(', ')],
  ] : [
    ['recorded', `${secs(timeline.seconds)}, ${rounds.filter((r) => r.kind !== 'switch').length} round(s) begun`],
  ];
  const factRows = facts.map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(v)}</td></tr>`).join('\n');
  const trafficRows = KINDS.map((k) =>
    `<tr data-kind="${k}"><th><span class="swatch" style="background:${KIND_COLOURS[k]}"></span>${k}</th><td class="num sent" data-bytes="${sent[k]}">${escapeHtml(humanBytes(sent[k]))}</td><td class="num received" data-bytes="${received[k]}">${escapeHtml(humanBytes(received[k]))}</td></tr>`).join('\n');
  const roundRows = rounds.map((r) =>
    `<tr class="${r.kind}" data-round="${r.round}" data-dirty="${r.dirty}"><td class="num">${r.kind === 'switch' ? 'switch to post-copy' : `${r.round}${r.kind === 'cutover' ? ' (cutover)' : ''}`}</td><td class="num">${escapeHtml(secs(r.start))}</td><td class="num">${escapeHtml(secs(r.end - r.start))}</td>` +
    `<td class="num">${r.dirty}</td><td class="num">${bs ? escapeHtml(humanBytes(r.dirty * bs)) : '—'}</td><td class="num">${escapeHtml(humanBytes(r.sentBytes))}</td>` +
    `<td class="num">${r.predictedDowntime !== undefined ? escapeHtml(ms(r.predictedDowntime)) : '—'}</td></tr>`).join('\n');

  const body = `<h1>Migration of ${escapeHtml(name)}${options.to ? ` to ${escapeHtml(options.to)}` : ''}</h1>
<p class="meta">started ${escapeHtml(timeline.startedAt.replace('T', ' ').replace(/\.\d+Z$/, ' UTC'))}; page made ${escapeHtml(when)}; samples every ${timeline.intervalMs} ms</p>
${banner}
<div class="row">
<table class="facts summary"><tbody>
${factRows}
</tbody></table>
<table class="facts traffic" id="traffic"><thead><tr><th>traffic</th><th>sent</th><th>received</th></tr></thead><tbody>
${trafficRows}
<tr data-kind="total"><th>total</th><td class="num sent" data-bytes="${total(sent)}">${escapeHtml(humanBytes(total(sent)))}</td><td class="num received" data-bytes="${total(received)}">${escapeHtml(humanBytes(total(received)))}</td></tr>
</tbody></table>
</div>
<h2>Throughput over time, sent, by kind of traffic</h2>
<div class="phases" id="phases">${phaseStrip}</div>
<div class="chart" id="throughput"></div>
<h2>Rounds: blocks dirty at each round's start</h2>
<p class="meta">${result ? `${result.rounds} round${result.rounds === 1 ? '' : 's'} (the result's count)` : `${rounds.filter((r) => r.kind !== 'switch').length} begun`}${rounds.some((r) => r.kind === 'switch') ? '; then the switch to post-copy, with the blocks missing at the switch' : ''}.</p>
<div class="chart" id="dirty"></div>
<table class="facts rounds" id="rounds"><thead><tr><th>round</th><th>began at</th><th>took</th><th>dirty blocks</th><th>dirty bytes</th><th>sent</th><th>predicted downtime</th></tr></thead><tbody>
${roundRows}
</tbody></table>`;

  // Rates between samples (bytes/s), each held over the interval it was measured in.
  const t = samples.map((s) => s.t);
  const rate = (k: TrafficKind, i: number) => {
    const dt = samples[i]!.t - samples[i - 1]!.t;
    return dt > 0 ? (samples[i]!.sent[k] - samples[i - 1]!.sent[k]) / dt : 0;
  };
  const rates = Object.fromEntries(KINDS.map((k) => [k, samples.map((_, i) => (i === 0 ? 0 : rate(k, i)))]));
  const marks = timeline.events
    .filter((e) => ['round', 'cutover', 'pause', 'resumed', 'done', 'stall'].includes(e.phase))
    .map((e) => ({ t: e.t, phase: e.phase, round: (e.detail as { round?: number } | undefined)?.round ?? null }));
  const data = {
    kinds: KINDS, colours: KIND_COLOURS, t, rates, first: samples[0]?.sent ?? null, marks,
    phases: phases.map((p) => ({ label: p.label, phase: p.phase, start: p.start, end: p.end, colour: PHASE_COLOURS[p.phase] ?? '#495057' })),
    rounds: rounds.map((r) => ({ label: r.kind === 'switch' ? 'switch' : String(r.round), dirty: r.dirty, kind: r.kind })),
    totals: { sent, received }, failed, seconds: timeline.seconds,
  };
  return page({ title: `blockferry migration: ${name}`, body, css: CSS, data, script: SCRIPT });
}

const SCRIPT = `
var width = Math.min(960, document.body.clientWidth - 64);
var MARK_COLOURS = { round: '#1098ad', cutover: '#c92a2a', pause: '#c92a2a', resumed: '#2b8a3e', done: '#495057', stall: '#f08c00' };
function marksPlugin(){
  return { hooks: { draw: function(u){
    var c = u.ctx, top = u.bbox.top, h = u.bbox.height, dpr = devicePixelRatio || 1, rows = [];
    c.save(); c.font = (11 * dpr) + 'px sans-serif'; c.textBaseline = 'top';
    DATA.marks.forEach(function(m){
      var x = Math.round(u.valToPos(m.t, 'x', true)) + 0.5;
      c.strokeStyle = MARK_COLOURS[m.phase] || '#495057'; c.fillStyle = c.strokeStyle;
      c.setLineDash(m.phase === 'round' ? [3 * dpr, 3 * dpr] : []); c.lineWidth = (m.phase === 'pause' || m.phase === 'resumed' ? 2 : 1) * dpr;
      c.beginPath(); c.moveTo(x, top); c.lineTo(x, top + h); c.stroke();
      // Labels go in the first row where they do not overlap the one before.
      var label = m.phase === 'round' ? 'R' + m.round : m.phase, w = c.measureText(label).width, row = 0;
      while (rows[row] !== undefined && rows[row] > x) row++;
      rows[row] = x + w + 8 * dpr;
      c.fillText(label, x + 3 * dpr, top + 2 * dpr + row * 13 * dpr);
    });
    c.restore();
  } } };
}
function alignStrip(u){
  // The phase strip above the chart spans the plot area exactly (same time scale).
  var strip = document.getElementById('phases'), dpr = devicePixelRatio || 1;
  strip.style.marginLeft = (u.bbox.left / dpr) + 'px'; strip.style.width = (u.bbox.width / dpr) + 'px';
}
var mbs = function(u, v){ return v == null ? '' : (v / 1e6).toFixed(2) + ' MB/s'; };
var series = [{ label: 'time', value: function(u, v){ return v == null ? '' : v.toFixed(2) + ' s'; } }];
var data = [DATA.t];
DATA.kinds.forEach(function(k){
  series.push({ label: k, stroke: DATA.colours[k], fill: DATA.colours[k] + '22', width: 1.5, value: mbs, paths: uPlot.paths.stepped({ align: -1 }), points: { show: false } });
  data.push(DATA.rates[k]);
});
if (DATA.t.length > 1) new uPlot({
  width: width, height: 300, plugins: [marksPlugin(), { hooks: { ready: alignStrip } }],
  scales: { x: { time: false, range: [0, DATA.seconds] } },
  axes: [{ label: 'seconds since the start' }, { label: 'MB/s sent', size: 60, values: function(u, vals){ return vals.map(function(v){ return (v / 1e6).toFixed(v >= 1e7 ? 0 : 1); }); } }],
  series: series,
}, data, document.getElementById('throughput'));
if (DATA.rounds.length) new uPlot({
  width: width, height: 200,
  scales: { x: { time: false, range: [0.5, DATA.rounds.length + 0.5] }, y: { range: function(u, min, max){ return [0, Math.max(1, max) * 1.1]; } } },
  axes: [{ label: 'round (the last one is the cutover, or the switch to post-copy)', splits: function(){ return DATA.rounds.map(function(r, i){ return i + 1; }); },
    values: function(u, vals){ return vals.map(function(v){ var r = DATA.rounds[v - 1]; return r ? r.label : ''; }); } }, { label: 'dirty blocks', size: 60 }],
  series: [{ label: 'round', value: function(u, v){ var r = DATA.rounds[v - 1]; return r ? r.label : '--'; } }, { label: 'dirty blocks', stroke: '#1098ad', fill: '#1098ad99', paths: uPlot.paths.bars({ size: [0.6, 60] }), points: { show: false } }],
}, [DATA.rounds.map(function(r, i){ return i + 1; }), DATA.rounds.map(function(r){ return r.dirty; })], document.getElementById('dirty'));
`;
