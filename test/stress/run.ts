// The stress scripts by hand, in the large dose by default (an argument is required):
//   node dist/test/stress/run.js fuzz|kill|diskfull [count]
// (BLOCKFERRY_STRESS=large sets the large dose in `npm test` too.)
import { fuzzFrameDecoder, fuzzMessages, fuzzSession } from './fuzz.js';
import { killResume } from './kill.js';
import { diskFull } from './diskfull.js';

// `node --test dist/test/` loads every file here: with no argument this does nothing
// (the small dose runs from test/stress.test.ts).
const what = process.argv[2];
if (!what) {
  console.log('usage: node dist/test/stress/run.js fuzz|kill|diskfull [count]');
  process.exit(0);
}
const count = process.argv[3] ? Number(process.argv[3]) : undefined;
const log = (s: string) => process.stderr.write(`${s}\n`);
const t0 = performance.now();
if (what === 'fuzz') {
  console.log('frame decoder', JSON.stringify(fuzzFrameDecoder(count ?? 200_000)));
  console.log('messages', JSON.stringify(fuzzMessages(count ?? 200_000)));
  console.log('session', JSON.stringify(await fuzzSession(count ?? 1_000_000, 3, log)));
} else if (what === 'kill') {
  console.log('kill -9 and resume', JSON.stringify(await killResume(count ?? 100, log)));
} else if (what === 'diskfull') {
  console.log('disk full', JSON.stringify(await diskFull(log)));
}
console.log(`${((performance.now() - t0) / 1000).toFixed(1)} s`);
