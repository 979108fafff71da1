// The stress scripts of test/stress/ in a small dose (BLOCKFERRY_STRESS=large
// for the large one: 10^6 fuzzed session frames, 100 kill -9 runs).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { fuzzFrameDecoder, fuzzMessages, fuzzSession } from './stress/fuzz.js';
import { killResume } from './stress/kill.js';
import { diskFull } from './stress/diskfull.js';

const large = process.env.BLOCKFERRY_STRESS === 'large';
const dose = large ? { decoder: 200_000, messages: 200_000, frames: 1_000_000, kills: 100 } : { decoder: 3000, messages: 3000, frames: 3000, kills: 3 };
const log = (s: string) => { if (large) process.stderr.write(`${s}\n`); };

describe(`stress (${large ? 'large' : 'small'} dose)`, () => {
  it('fuzzes the frame decoder and every message decoder: frames or ERR_BF_PROTOCOL, nothing else', () => {
    for (const c of [fuzzFrameDecoder(dose.decoder), fuzzMessages(dose.messages)]) {
      assert.equal(c.crashes, 0, c.failures.join('\n'));
    }
  });

  it('fuzzes a destination session with random frame sequences after an authenticated handshake', { timeout: large ? 3_600_000 : 120_000 }, async () => {
    const c = await fuzzSession(dose.frames, 3, log);
    assert.ok(c.frames >= dose.frames);
    assert.equal(c.crashes, 0, c.failures.join('\n'));
    assert.equal(c.hangs, 0, c.failures.join('\n'));
    assert.ok(c.rssPeakMiB - c.rssStartMiB < 256, `RSS ${c.rssStartMiB.toFixed(0)} → ${c.rssPeakMiB.toFixed(0)} MiB`);
  });

  it('kill -9 of the source or the destination, then resume: byte-identical', { timeout: large ? 3_600_000 : 180_000 }, async () => {
    const c = await killResume(dose.kills, log, large ? 16 : 8);
    assert.equal(c.identical, c.runs, c.failures.join('\n'));
  });

  it('a full disk at the destination: ERR_BF_NO_SPACE, journal kept, resume once space is freed', { timeout: 120_000 }, async (t) => {
    const r = await diskFull();
    if (r.skipped) return t.skip(r.skipped);
    assert.equal(r.error?.remoteCode, 'ERR_BF_NO_SPACE', JSON.stringify(r.error));
    assert.ok(r.journalKept && r.partialKept, 'the partial image and its journal stay');
    assert.ok(r.serviceAlive && r.identical, 'resumed to a byte-identical image');
  });
});
