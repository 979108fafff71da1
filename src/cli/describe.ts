// A migration's result as a table for people (the CLI prints it; --json prints the object).
import Table from 'cli-table3';
import { human } from './progress.js';
import type { MigrationResult } from '../migrate/migrate.js';

export function describeMigration(r: MigrationResult): string {
  const t = new Table({ style: { head: [], border: [] } });
  const sentTotal = Object.values(r.wire.sent).reduce((a, b) => a + b, 0);
  t.push(
    { image: `${r.name}: ${human(r.imageSize)}, ${r.blocks.total} blocks of ${r.blockSize} B` },
    { strategy: r.strategy },
    { time: `${r.seconds.toFixed(2)} s total, downtime ${(r.downtimeSeconds * 1000).toFixed(0)} ms, ${r.rounds} round${r.rounds === 1 ? '' : 's'}` },
    { phases: Object.entries(r.phases).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(', ') },
    { 'sent on the wire': `${human(sentTotal)}: data ${human(r.wire.sent.data)}, fingerprints ${human(r.wire.sent.fingerprints)}, verification ${human(r.wire.sent.verify)}, control ${human(r.wire.sent.control)}` },
    ...(r.wire.sentRaw.data > r.wire.sent.data ? [{ compression: `block data ${human(r.wire.sentRaw.data)} before compression, ${human(r.wire.sent.data)} on the wire (${(r.wire.sentRaw.data / Math.max(1, r.wire.sent.data)).toFixed(2)}x)` }] : []),
    { 'received': human(Object.values(r.wire.received).reduce((a, b) => a + b, 0)) },
    { 'blocks sent': `${r.blocks.sent} (${r.blocks.resent} of them again after being dirtied, ${r.blocks.repaired} repaired)` },
    { 'filled at the destination': `${r.blocks.filledFromNeighbours} from neighbour images, ${r.blocks.copied} copied from blocks already sent, ${r.blocks.resumed} kept from an earlier attempt, ${r.blocks.zero} zero` },
    { verified: r.verified ? 'yes: every extent\'s SHA-1 matches the source' : 'NO' },
  );
  return t.toString();
}
