// One content-store connection: STASH and GATHER answered from a
// ContentStore until the peer closes. The intermediary serves every
// connection this way; a destination serves its stage this way.
import { ErrorCode, ProtocolError } from '../../errors.js';
import type { Channel } from '../../protocol/channel.js';
import { decode, DIGEST_BYTES, GATHER, GATHER_RESULT, MAX_STASH_BYTES, STASH, STASH_FULL, STASH_HELD, STASH_OK, STASH_STORED, type FetchResult } from '../../protocol/messages.js';
import { Msg, msgName, type Frame } from '../../protocol/frame.js';
import type { ContentStore } from './store.js';

/** What a store served and took, since start. */
export interface StoreStats { stashed: number; stashedBytes: number; held: number; refused: number; bad: number; gathered: number; gatheredBytes: number; missed: number }
export const newStoreStats = (): StoreStats => ({ stashed: 0, stashedBytes: 0, held: 0, refused: 0, bad: 0, gathered: 0, gatheredBytes: 0, missed: 0 });

/** Answers one STASH or GATHER frame from the store (the intermediary's loop, and a destination's stage). */
export async function answerStore(ch: Channel, f: Frame, store: ContentStore, stats: StoreStats): Promise<void> {
  if (f.id === 0) throw new ProtocolError(ErrorCode.PROTOCOL, `${msgName(f.type)} without a request id`);
  if (f.type === Msg.STASH) {
    const m = decode(STASH, f.payload);
    const blocks: Buffer[] = [];
    for (let i = 0, at = 0; i < m.lengths.length; i++) { blocks.push(m.data.subarray(at, at + m.lengths[i]!)); at += m.lengths[i]!; }
    const status = store.put(m.digests, blocks);
    for (let i = 0; i < status.length; i++) {
      const s = status[i]!;
      if (s === STASH_STORED) { stats.stashed++; stats.stashedBytes += m.lengths[i]!; } else if (s === STASH_HELD) stats.held++; else if (s === STASH_FULL) stats.refused++; else stats.bad++;
    }
    await ch.reply(f, STASH_OK, { status, free: store.free });
    return;
  }
  if (f.type === Msg.GATHER) {
    const digests = decode(GATHER, f.payload);
    const n = digests.length / DIGEST_BYTES;
    const res: FetchResult = { lengths: new Array<number>(n).fill(0), data: Buffer.alloc(0) };
    const parts: Buffer[] = [];
    let total = 0;
    for (let i = 0; i < n; i++) {
      const b = store.get(digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES));
      if (!b || total + b.length > MAX_STASH_BYTES) { stats.missed++; continue; }
      res.lengths[i] = b.length;
      parts.push(b);
      total += b.length;
      stats.gathered++;
      stats.gatheredBytes += b.length;
    }
    res.data = Buffer.concat(parts);
    await ch.reply(f, GATHER_RESULT, res);
    return;
  }
  throw new ProtocolError(ErrorCode.PROTOCOL, `expected STASH or GATHER, got ${msgName(f.type)}`);
}

/** Serves STASH and GATHER until the peer closes. */
export async function serveStore(ch: Channel, store: ContentStore, stats: StoreStats, first?: Frame): Promise<void> {
  if (first) await answerStore(ch, first, store, stats);
  for (;;) {
    const f = await ch.nextOrEnd();
    if (!f) return; // the peer is done with us
    await answerStore(ch, f, store, stats);
  }
}

