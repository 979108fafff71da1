// A migration's result as a table for people (the CLI prints it; --json prints the object).
import Table from 'cli-table3';
import { human } from './progress.js';
import type { MigrationResult } from '../migrate/migrate.js';
import { trafficTotal } from '../protocol/messages.js';

const ms = (s: number) => `${(s * 1000).toFixed(0)} ms`;
const mbs = (v: number) => `${(v / 1e6).toFixed(1)} MB/s`;
const REASONS: Record<MigrationResult['live']['cutoverReason'], string> = {
  budget: 'the prediction fit the budget',
  threshold: 'the dirty set reached --dirty-threshold',
  'max-rounds': 'the --max-rounds limit',
  'stall-force': 'forced after a stall (--on-stall force)',
  quiet: 'nothing writes the image',
  switch: 'post-copy: the destination took over at once',
};

export function describeMigration(r: MigrationResult): string {
  const t = new Table({ style: { head: [], border: [] } });
  const sentTotal = trafficTotal(r.wire.sent);
  t.push(
    { image: `${r.name}: ${human(r.imageSize)}, ${r.blocks.total} blocks of ${r.blockSize} B` },
    { strategy: r.strategy },
    { time: `${r.seconds.toFixed(2)} s total, downtime ${ms(r.downtimeSeconds)}, ${r.rounds} round${r.rounds === 1 ? '' : 's'}` },
    ...(r.downtimeSeconds > 0 && r.live.cutoverReason !== 'switch' ? [{ downtime: `measured ${ms(r.downtimeSeconds)}, predicted ${ms(r.predictedDowntimeSeconds)}, budget ${ms(r.live.maxDowntimeSeconds)}; cutover: ${REASONS[r.live.cutoverReason]}` }] : []),
    ...(r.live.cutoverReason === 'switch' ? [{ switch: `the destination took over in ${ms(r.downtimeSeconds)} (predicted ${ms(r.predictedDowntimeSeconds)}: two round trips); it served the image from then on` }] : []),
    ...(r.live.cutoverReason !== 'quiet' && r.live.cutoverReason !== 'switch' ? [{ rates: `rounds drained ${mbs(r.live.drainRate)}, the writer dirtied ${mbs(r.live.dirtyRate)}; fixed cost of a cutover ${ms(r.live.fixedSeconds)}; order ${r.live.order}` }] : []),
    ...(r.live.stall ? [{ stall: `after round ${r.live.stall.round} (${r.live.stall.cause}): predicted ${ms(r.live.stall.predictedSeconds)}; --on-stall ${r.live.stall.action}` }] : []),
    ...(r.live.throttle ? [{ throttle: `${r.live.throttle.calls} request${r.live.throttle.calls === 1 ? '' : 's'}, last ${mbs(r.live.throttle.wantedRate)}; writer ${mbs(r.live.throttle.dirtyRateBefore)} before, ${mbs(r.live.throttle.dirtyRateAfter)} after (${(r.live.throttle.slowedBy * 100).toFixed(0)} % slower)` }] : []),
    ...(r.postcopy ? [{ 'post-copy': `${r.postcopy.missingAtSwitch} blocks missing at the switch; ${r.postcopy.pulls} demand pulls (${r.postcopy.pulledBlocks} blocks) ahead of the push; ${r.postcopy.owned} blocks written first at the destination (theirs: never pushed)` }] : []),
    ...(r.live.held ? [{ 'held back': `${r.live.held.blocks} blocks found dirty since their round began waited for the next (${r.live.held.peeks} peeks at the dirty set)` }] : []),
    ...(r.delta.blocks ? [{ delta: `${r.delta.blocks} re-sent blocks as deltas: ${human(r.delta.rawBytes)} as ${human(r.delta.wireBytes)} (${human(r.delta.savedBytes)} saved)` }] : []),
    { phases: Object.entries(r.phases).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(', ') },
    { 'sent on the wire': `${human(sentTotal)}: data ${human(r.wire.sent.data)}, fingerprints ${human(r.wire.sent.fingerprints)}, verification ${human(r.wire.sent.verify)}, control ${human(r.wire.sent.control)}` },
    ...(r.wire.sentRaw.data > r.wire.sent.data ? [{ compression: `block data ${human(r.wire.sentRaw.data)} before compression, ${human(r.wire.sent.data)} on the wire (${(r.wire.sentRaw.data / Math.max(1, r.wire.sent.data)).toFixed(2)}x)` }] : []),
    { 'received': human(trafficTotal(r.wire.received)) },
    { 'blocks sent': `${r.blocks.sent} (${r.blocks.resent} of them again after being dirtied${r.blocks.resent ? `: ${human(r.blocks.resentBytes)}` : ''}, ${r.blocks.repaired} repaired)` },
    { 'filled at the destination': `${r.blocks.filledFromNeighbours} from neighbour images, ${r.blocks.filledFromRepository ? `${r.blocks.filledFromRepository} from the repository, ` : ''}${r.blocks.copied} copied from blocks already sent, ${r.blocks.resumed} kept from an earlier attempt, ${r.blocks.zero} zero` },
    { verified: r.verified ? 'yes: every extent\'s SHA-1 matches the source' : 'NO' },
  );
  return t.toString();
}
