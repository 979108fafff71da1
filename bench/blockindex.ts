// Block index of 10 million entries: WASM Robin Hood table against a JS Map.
import { BlockIndexTable, makeRef } from '../src/index.js';
import { check, randomFill, runGroup, type GroupResult } from './lib.js';

const N = 10_000_000;

function heapAfterGc(): number {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc) { gc(); gc(); }
  return process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers;
}

export async function benchBlockIndex(): Promise<{ groups: GroupResult[]; memory: Record<string, number> }> {
  // Random 64-bit fingerprints and signatures from a xorshift generator.
  const fps = new BigUint64Array(N), sigs = new BigUint64Array(N);
  randomFill(new Uint8Array(fps.buffer), 11);
  randomFill(new Uint8Array(sigs.buffer), 12);
  const entries = new BigUint64Array(3 * N);
  for (let i = 0; i < N; i++) {
    entries[3 * i] = fps[i]!; entries[3 * i + 1] = sigs[i]!; entries[3 * i + 2] = makeRef(1, i);
  }
  const before = heapAfterGc();
  const map = new Map<bigint, bigint>();
  for (let i = 0; i < N; i++) map.set(fps[i]!, entries[3 * i + 2]!);
  const mapBytes = (heapAfterGc() - before) / N;

  const table = new BlockIndexTable({ expectedEntries: N });
  table.insertMany(entries);
  const out = new BigUint64Array(N);
  table.lookupColumns(fps, sigs, out);
  for (let i = 0; i < N; i += 1) if (out[i] !== entries[3 * i + 2] || map.get(fps[i]!) !== out[i]) check('lookups agree', false, `entry ${i}`);
  const stats = table.stats();
  const grown = new BlockIndexTable();
  grown.insertMany(entries);
  const grownStats = grown.stats();
  console.log(`\n(block index: ${stats.bytesPerEntry.toFixed(1)} bytes/entry sized up front, ${grownStats.bytesPerEntry.toFixed(1)} grown from empty (load ${grownStats.load.toFixed(2)}); JS Map<bigint, bigint> ${mapBytes.toFixed(1)} bytes/entry)`);

  const lookups = await runGroup({
    title: 'Block index lookups, 10 M entries, all hits',
    workPerOp: N,
    unit: 'M/s',
    time: 1,
    iterations: 3,
    warmupIterations: 0,
    tasks: [
      { name: 'blockferry wasm lookupColumns', ours: true, fn: () => table.lookupColumns(fps, sigs, out) },
      { name: 'JS Map.get', fn: () => { let h = 0; for (let i = 0; i < N; i++) if (map.get(fps[i]!) !== undefined) h++; return h; } },
    ],
    goals: [{ vs: 'JS Map.get', min: 3 }],
  });
  map.clear();
  const inserts = await runGroup({
    title: 'Block index build, 10 M entries',
    workPerOp: N,
    unit: 'M/s',
    time: 1,
    iterations: 2,
    warmupIterations: 0,
    tasks: [
      { name: 'blockferry wasm insertMany (sized)', ours: true, fn: () => new BlockIndexTable({ expectedEntries: N }).insertMany(entries) },
      { name: 'blockferry wasm insertMany (grown)', fn: () => new BlockIndexTable().insertMany(entries) },
      { name: 'JS Map.set', fn: () => { const m = new Map<bigint, bigint>(); for (let i = 0; i < N; i++) m.set(fps[i]!, entries[3 * i + 2]!); return m.size; } },
    ],
  });
  const ratio = mapBytes / stats.bytesPerEntry;
  console.log(`  goal: bytes per entry ≤ 1/3 of JS Map: ${stats.bytesPerEntry.toFixed(1)} vs ${mapBytes.toFixed(1)} (1/${ratio.toFixed(1)}) ${ratio >= 3 ? 'met' : 'MISSED'}`);
  return {
    groups: [lookups, inserts],
    memory: { blockferryBytesPerEntry: stats.bytesPerEntry, blockferryGrownBytesPerEntry: grownStats.bytesPerEntry, mapBytesPerEntry: mapBytes },
  };
}
