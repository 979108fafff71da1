// Embedding blockferry: one progress shape, cancellation, structured logs.
// Run from the project root: node examples/embed.mjs
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { DestinationService, migrate, progressOf, similarity } from 'blockferry';

const dir = mkdtempSync(join(tmpdir(), 'bf-embed-'));
const base = randomBytes(32 << 20);
const vm = Buffer.concat([base.subarray(0, 24 << 20), randomBytes(8 << 20)]);
writeFileSync(join(dir, 'base.img'), base);
writeFileSync(join(dir, 'vm.img'), vm);

// A long call with its progress as an async iterator.
const sim = progressOf((onProgress) => similarity([join(dir, 'base.img'), join(dir, 'vm.img')], { noSave: true, onProgress }));
let updates = 0;
for await (const p of sim) updates++;
const [m] = await sim.result;
console.log(`similarity: vm.img finds ${m.similarity[0][1].toFixed(1)} % of its blocks in base.img (${updates} progress updates)`);

// A destination that logs pino JSON lines to stderr, and stops when its signal is aborted.
const stop = new AbortController();
const dest = await DestinationService.start({
  dataDir: join(dir, 'dst'), auth: { insecure: true }, neighbours: [join(dir, 'base.img')],
  logger: pino({ level: 'info' }, pino.destination(2)), signal: stop.signal,
});
const to = `127.0.0.1:${dest.address.port}`;

// A migration cancelled half-way, then resumed by the same call.
const cancel = new AbortController();
try {
  await migrate(join(dir, 'vm.img'), {
    to, name: 'vm', strategy: 'full', auth: { insecure: true }, bwlimit: 4e6, signal: cancel.signal,
    onProgress: (p) => { if (p.phase === 'transfer' && p.done >= 4 << 20) cancel.abort(new Error('operator cancelled')); },
  });
} catch (e) {
  console.log(`first attempt: ${e.code}: ${e.message}`);
}
const run = progressOf((onProgress) => migrate(join(dir, 'vm.img'), { to, name: 'vm', strategy: 'full', auth: { insecure: true }, onProgress }));
const phases = new Set();
for await (const p of run) phases.add(p.phase);
const r = await run.result;
console.log(`second attempt: ${r.blocks.resumed} blocks kept from the first, ${r.blocks.sent} sent, verified ${r.verified}; phases ${[...phases].join(' → ')}`);
stop.abort();     // the service stops: running migrations save their journals
await dest.close(); // resolves once it has stopped (idempotent)
rmSync(dir, { recursive: true, force: true });
