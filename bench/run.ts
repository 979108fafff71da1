// npm run bench [-- --only hash,zero,qcow2,bitmap,native,scan,cache,transfer,scale,codec,index,live,postcopy,fleet-index,snapmig,scatter-gather] [-- --json [FILE]]
// Every group checks its results against the reference before timing, runs
// the peers in this one process, and prints ratios against the goals.
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { machineLine, type GroupResult } from './lib.js';
import { benchHash } from './hash.js';
import { benchZero } from './zero.js';
import { benchBitmap } from './bitmap.js';
import { benchBlockIndex } from './blockindex.js';
import { benchScan } from './scan.js';
import { benchCache } from './cache.js';
import { benchNative } from './native.js';
import { benchTransfer } from './transfer.js';
import { benchCodec } from './codec.js';
import { benchScale } from './scale.js';
import { benchLive } from './live.js';
import { benchPostcopy } from './postcopy.js';
import { benchQcow2 } from './qcow2.js';
import { benchFleetIndex } from './fleet-index.js';
import { benchSnapmig } from './snapmig.js';
import { benchScatterGather } from './scatter-gather.js';

// `--json` alone writes bench-results.json; `--json FILE` or `--json=FILE` names the file.
const argv = process.argv.slice(2);
const j = argv.indexOf('--json');
if (j >= 0) argv.splice(j, argv[j + 1] && !argv[j + 1]!.startsWith('--') ? 2 : 1, `--json=${argv[j + 1] && !argv[j + 1]!.startsWith('--') ? argv[j + 1] : 'bench-results.json'}`);
const { values } = parseArgs({ options: { only: { type: 'string' }, json: { type: 'string' } }, args: argv });
const only = values.only?.split(',');
const want = (name: string) => !only || only.includes(name);

const machine = machineLine();
console.log(`# blockferry benchmarks\n${machine}`);
const groups: GroupResult[] = [];
const extra: Record<string, unknown> = {};
if (want('hash')) groups.push(...(await benchHash()));
if (want('zero')) groups.push(...(await benchZero()));
if (want('qcow2')) groups.push(...(await benchQcow2()));
if (want('bitmap')) groups.push(...(await benchBitmap()));
if (want('native')) groups.push(...(await benchNative()));
if (want('scan')) groups.push(...(await benchScan()));
if (want('cache')) groups.push(...(await benchCache()));
if (want('transfer')) {
  const r = await benchTransfer();
  groups.push(...r.groups);
  if (r.figures) extra.transfer = r.figures;
}
if (want('codec')) groups.push(...(await benchCodec()));
if (want('scale')) {
  const r = await benchScale();
  if (r) extra.scale = r;
}
if (want('index')) {
  const r = await benchBlockIndex();
  groups.push(...r.groups);
  extra.blockIndexMemory = r.memory;
}
if (want('live')) {
  const r = await benchLive();
  if (r) extra.live = r;
}
if (want('postcopy')) {
  const r = await benchPostcopy();
  if (r) extra.postcopy = r;
}
if (want('fleet-index')) {
  // Starts its own Redis Cluster (redis-server) on loopback.
  const r = await benchFleetIndex();
  groups.push(...r.groups);
  extra.fleetIndex = r.figures;
}
if (want('snapmig')) {
  const r = await benchSnapmig();
  if (r) extra.snapmig = r;
}
if (want('scatter-gather')) {
  const r = await benchScatterGather();
  if (r) extra.scatterGather = r;
}
if (values.json) {
  writeFileSync(values.json, JSON.stringify({ machine, date: new Date().toISOString(), groups, ...extra }, null, 2) + '\n');
  console.log(`\nfigures written to ${values.json}`);
}
