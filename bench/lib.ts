import { Bench } from 'tinybench';
import Table from 'cli-table3';
import os from 'node:os';

export interface Task {
  name: string;
  fn: () => unknown;
  /** Untimed setup before each run of fn (re-seeding a destination, say). */
  beforeEach?: () => unknown | Promise<unknown>;
  /** The blockferry task the ratios are taken from. */
  ours?: boolean;
}

export interface Goal {
  /** The peer the ratio is taken against. */
  vs: string;
  /** Required ratio (ours ÷ peer throughput). */
  min: number;
}

export interface GroupResult {
  title: string;
  unit: string;
  rows: Array<{ name: string; perSecond: number; rme: number; samples: number; ratio: number | null }>;
  goals: Array<Goal & { ratio: number; met: boolean }>;
  floor?: { min: number; value: number; met: boolean };
}

export interface GroupSpec {
  title: string;
  /** Work per call of fn, in units (bytes for MB/s, items for M/s). */
  workPerOp: number;
  unit: 'MB/s' | 'GB/s' | 'M/s' | 'Gbit/s';
  tasks: Task[];
  goals?: Goal[];
  /** An absolute goal for the blockferry task, in `unit`. */
  floor?: number;
  /** Time budget per task in ms (tinybench `time`). */
  time?: number;
  iterations?: number;
  /** Warm-up iterations (default tinybench's); 0 for ops that take seconds. */
  warmupIterations?: number;
}

const scale = { 'MB/s': 1e6, 'GB/s': 1e9, 'M/s': 1e6, 'Gbit/s': 1e9 } as const;

/** Runs the peers of one group in this process, prints a table with ratios, returns the figures. */
export async function runGroup(spec: GroupSpec): Promise<GroupResult> {
  const bench = new Bench({
    time: spec.time ?? 800,
    warmupTime: spec.warmupIterations === 0 ? 0 : 100,
    ...(spec.warmupIterations !== undefined ? { warmupIterations: spec.warmupIterations } : {}),
    iterations: spec.iterations ?? 5,
    throws: true,
  });
  for (const t of spec.tasks) bench.add(t.name, t.fn, t.beforeEach ? { beforeEach: t.beforeEach as () => Promise<void> } : {});
  await bench.run();
  const perSecond = new Map<string, { v: number; rme: number; samples: number }>();
  for (const task of bench.tasks) {
    const r = task.result;
    if (r.state !== 'completed') throw new Error(`${spec.title}: ${task.name} ${r.state}`);
    perSecond.set(task.name, {
      v: (spec.workPerOp / (r.period / 1000)) / scale[spec.unit],
      rme: r.latency.rme,
      samples: r.latency.samplesCount,
    });
  }
  const ours = spec.tasks.find((t) => t.ours) ?? spec.tasks[0]!;
  const oursV = perSecond.get(ours.name)!.v;
  const rows = spec.tasks.map((t) => {
    const p = perSecond.get(t.name)!;
    return { name: t.name, perSecond: p.v, rme: p.rme, samples: p.samples, ratio: t === ours ? null : oursV / p.v };
  });
  const goals = (spec.goals ?? []).map((g) => {
    const ratio = oursV / perSecond.get(g.vs)!.v;
    return { ...g, ratio, met: ratio >= g.min };
  });
  const table = new Table({ head: ['task', spec.unit, '±%', `${ours.name} ÷ task`], style: { head: [], border: [] } });
  for (const r of rows) table.push([r.name, fmt(r.perSecond), r.rme.toFixed(1), r.ratio === null ? '—' : `${r.ratio.toFixed(2)}×`]);
  console.log(`\n## ${spec.title}`);
  console.log(table.toString());
  if (spec.floor !== undefined) console.log(`  goal: ${ours.name} ≥ ${spec.floor} ${spec.unit}: ${fmt(oursV)} ${oursV >= spec.floor ? 'met' : 'MISSED'}`);
  for (const g of goals) console.log(`  goal: ${ours.name} ≥ ${g.min}× ${g.vs}: ${g.ratio.toFixed(2)}× ${g.met ? 'met' : 'MISSED'}`);
  const floor = spec.floor === undefined ? undefined : { min: spec.floor, value: oursV, met: oursV >= spec.floor };
  return { title: spec.title, unit: spec.unit, rows, goals, ...(floor ? { floor } : {}) };
}

const fmt = (v: number) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));

/** Fails the bench run when a peer disagrees with the reference: never time a wrong answer. */
export function check(what: string, ok: boolean, detail = ''): void {
  if (!ok) throw new Error(`bench check failed: ${what} ${detail}`);
}

export function machineLine(): string {
  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  return `${cpu}, ${os.cpus().length} cores, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, Node ${process.version} (V8 ${process.versions.v8}), ${os.platform()} ${os.release()}`;
}

/** Deterministic pseudo-random bytes (fast enough for hundreds of MiB). */
export function randomFill(u8: Uint8Array, seed = 1): void {
  const u32 = new Uint32Array(u8.buffer, u8.byteOffset, u8.byteLength >>> 2);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < u32.length; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    u32[i] = x;
  }
  for (let i = u32.length * 4; i < u8.length; i++) u8[i] = i;
}
