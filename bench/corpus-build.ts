// npm run corpus [-- --dir DIR] [-- --json FILE]
// Builds the bench corpus (or finds it cached) and prints its figures: data
// per image, distinct and duplicate 4 KiB blocks, what newer shares with
// older, and the missing distinct contents with their zstd -3 size.
import { statSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { benchCorpus, blockDigests, missingDistinct } from './corpus.js';

const { values } = parseArgs({ options: { dir: { type: 'string' }, json: { type: 'string' } } });
const t0 = performance.now();
const corpus = await benchCorpus(values.dir ? { dir: values.dir } : {});
console.log(`corpus ready in ${((performance.now() - t0) / 1000).toFixed(1)} s: ${corpus.dir}`);

const MB = 1e6;
const mb = (n: number) => `${(n / MB).toFixed(1)} MB`;
const figures: Record<string, unknown> = { dir: corpus.dir };
const t1 = performance.now();
const sets: Record<string, Set<string>> = {};
for (const [name, path] of [['older', corpus.older], ['newer', corpus.newer]] as const) {
  const st = statSync(path);
  const d = await blockDigests(path);
  const set = new Set(d);
  sets[name] = set;
  const f = { size: st.size, allocated: st.blocks * 512, nonZeroBlocks: d.length, distinctBlocks: set.size, duplicateBlocks: d.length - set.size };
  figures[name] = f;
  console.log(`${name}: ${mb(f.size)} image, ${mb(f.allocated)} allocated, ${f.nonZeroBlocks} non-zero 4 KiB blocks (${mb(f.nonZeroBlocks * 4096)}), ` +
    `${f.distinctBlocks} distinct, ${f.duplicateBlocks} duplicates of an earlier block (${(100 * f.duplicateBlocks / f.nonZeroBlocks).toFixed(1)} %)`);
}
const sharedDistinct = [...sets.newer!].filter((d) => sets.older!.has(d)).length;
figures.sharedDistinct = sharedDistinct;
console.log(`newer's distinct blocks found in older: ${sharedDistinct} of ${sets.newer!.size} (${(100 * sharedDistinct / sets.newer!.size).toFixed(1)} %)`);
const m = await missingDistinct(corpus.older, corpus.newer);
figures.missingDistinct = m;
console.log(`missing distinct (newer's contents older lacks): ${m.blocks} blocks, ${mb(m.bytes)}` +
  (m.zstd3Bytes !== undefined ? `, zstd -3 ${mb(m.zstd3Bytes)} (${(m.bytes / m.zstd3Bytes).toFixed(2)}×)` : ' (zstd not installed: no compressed size)'));
console.log(`figures in ${((performance.now() - t1) / 1000).toFixed(1)} s`);
if (values.json) writeFileSync(values.json, JSON.stringify(figures, null, 2) + '\n');
