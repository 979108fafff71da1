// Property-based fuzzing (fast-check) of the frame decoder, every message
// decoder, and a destination session fed random frame sequences after an
// authenticated handshake. Anything a peer sends must end in frames, or a
// ProtocolError (ERR_BF_PROTOCOL); never another exception, a hang or
// unbounded memory. Run from fuzz.test.ts (a small dose) or by hand:
//   BLOCKFERRY_STRESS=large node dist/test/stress/run.js fuzz
import fc from 'fast-check';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockferryError, ErrorCode } from '../../src/errors.js';
import { FrameDecoder, Msg, HEADER_BYTES, Writer, type MsgType } from '../../src/protocol/frame.js';
import { MESSAGES, decode, encode, BEGIN, BEGIN_OK, SYNC } from '../../src/protocol/messages.js';
import { Channel } from '../../src/protocol/channel.js';
import { clientHandshake } from '../../src/protocol/handshake.js';
import { connect as tlsConnect } from '../../src/transport/tls.js';
import { DestinationService } from '../../src/roles/destination/service.js';
import { rss } from './attacks.js';

export interface FuzzCounts { cases: number; frames: number; crashes: number; hangs: number; failures: string[] }

const isProtocol = (e: unknown) => e instanceof BlockferryError && e.code === ErrorCode.PROTOCOL;

/** Random byte streams, cut into random chunks, through FrameDecoder at a random limit. */
export function fuzzFrameDecoder(runs: number, seed = 1): FuzzCounts {
  const c: FuzzCounts = { cases: 0, frames: 0, crashes: 0, hangs: 0, failures: [] };
  const header = fc.tuple(fc.nat({ max: 400 }), fc.constantFrom(...Object.values(Msg), 0, 6, 99, 255), fc.constantFrom(0, 0, 0, 1, 2, 0x80), fc.constantFrom(0, 0, 0, 1), fc.nat())
    .map(([len, type, flags, reserved, id]) => { const h = Buffer.alloc(HEADER_BYTES); h.writeUInt32LE(len, 0); h[4] = type; h[5] = flags; h[6] = reserved; h.writeUInt32LE(id, 8); return h; });
  const piece = fc.oneof(header, fc.uint8Array({ maxLength: 300 }).map((u) => Buffer.from(u)));
  fc.assert(fc.property(fc.array(piece, { maxLength: 12 }), fc.array(fc.nat({ max: 64 }), { minLength: 1, maxLength: 8 }), fc.constantFrom(256, 1024, 1 << 20), (pieces, cuts, limit) => {
    c.cases++;
    const all = Buffer.concat(pieces);
    const d = new FrameDecoder();
    d.limit = limit;
    try {
      let at = 0, k = 0;
      while (at < all.length) {
        const n = Math.max(1, cuts[k++ % cuts.length]!);
        for (const f of d.push(all.subarray(at, at + n))) {
          c.frames++;
          if (f.payload.length > limit) throw new Error('frame over the limit delivered');
        }
        at += n;
      }
    } catch (e) {
      if (!isProtocol(e)) { c.crashes++; if (c.failures.length < 5) c.failures.push(String((e as Error).stack)); }
    }
    return true;
  }), { numRuns: runs, seed });
  return c;
}

/** Every message decoder: random payloads, and valid encodings truncated, extended or with flipped bytes. */
export function fuzzMessages(runs: number, seed = 2): FuzzCounts {
  const c: FuzzCounts = { cases: 0, frames: 0, crashes: 0, hangs: 0, failures: [] };
  const defs = [...MESSAGES.values()];
  const tryDecode = (i: number, payload: Buffer) => {
    c.cases++;
    try {
      decode(defs[i]!, payload);
      c.frames++;
    } catch (e) {
      if (!isProtocol(e)) { c.crashes++; if (c.failures.length < 5) c.failures.push(`${defs[i]!.name}: ${(e as Error).stack}`); }
    }
  };
  // Structured payloads: a count then entries, as most messages are.
  const structured = fc.tuple(fc.constantFrom(0, 1, 2, 3, 0xffffffff, 0x7fffffff), fc.array(fc.oneof(fc.nat(), fc.constant(0xffffffff)), { maxLength: 16 }), fc.uint8Array({ maxLength: 64 }))
    .map(([n, words, tail]) => { const w = new Writer(); w.u32(n); for (const x of words) w.u32(x); w.bytes(tail); return w.done(); });
  fc.assert(fc.property(fc.nat({ max: defs.length - 1 }), fc.oneof(fc.uint8Array({ maxLength: 512 }).map((u) => Buffer.from(u)), structured), (i, payload) => { tryDecode(i, payload); return true; }), { numRuns: runs, seed });
  // Mutations of real encodings.
  const samples = sampleMessages();
  fc.assert(fc.property(fc.nat({ max: samples.length - 1 }), fc.nat(), fc.integer({ min: 0, max: 255 }), fc.constantFrom('flip', 'cut', 'grow'), (k, pos, byte, how) => {
    const [i, enc] = samples[k]!;
    const b = Buffer.from(enc);
    const payload = how === 'cut' ? b.subarray(0, pos % (b.length + 1)) : how === 'grow' ? Buffer.concat([b, Buffer.from([byte])]) : (b.length && (b[pos % b.length] = byte), b);
    tryDecode(i, payload);
    return true;
  }), { numRuns: runs, seed: seed + 1 });
  return c;
}

function sampleMessages(): [number, Buffer][] {
  const defs = [...MESSAGES.values()];
  const idx = (t: number) => defs.findIndex((d) => d.type === t);
  const fps = new BigUint64Array([1n, 2n, 3n]);
  const m: [number, unknown][] = [
    [Msg.HELLO, { version: 2, flags: 0, capabilities: 7, nonce: Buffer.alloc(32, 1) }],
    [Msg.HELLO_ACK, { version: 2, flags: 0, capabilities: 7, nonce: Buffer.alloc(32, 1), proof: Buffer.alloc(32, 2) }],
    [Msg.AUTH, { proof: Buffer.alloc(32, 3) }],
    [Msg.ERROR, { code: 'ERR_BF_PROTOCOL', message: 'x' }],
    [Msg.BEGIN, { name: 'vm', size: 1 << 20, blockSize: 4096, flags: 0, fills: 1, strategy: 'full' }],
    [Msg.BEGIN_OK, { resumed: true, keptBlocks: 5 }],
    [Msg.BLOCK_INFO, { start: 1, count: 3, fingerprints: fps, signatures: fps }],
    [Msg.NEED, { start: 1, count: 3, last: false, missing: [{ start: 1, count: 2 }] }],
    [Msg.BLOCKS, { runs: [{ start: 0, count: 3 }], fingerprints: fps, data: Buffer.alloc(3 * 16) }],
    [Msg.COPY, [{ dst: 1, src: 2, fingerprint: 3n }]],
    [Msg.ZERO, [{ start: 4, count: 9 }]],
    [Msg.ROUND, { round: 2 }],
    [Msg.VERIFY, [{ start: 0, count: 2 }, { start: 2, count: 1, digest: new Uint8Array(20) }]],
    [Msg.VERIFY_RESULT, [0, 1]],
    [Msg.DONE, { neighbour: 1, resumed: 2, received: 3, copied: 4, zeroed: 5 }],
  ];
  const out: [number, Buffer][] = [];
  for (const [t, v] of m) {
    try { out.push([idx(t), encode(MESSAGES.get(t)!, v)]); } catch { /* a sample this build encodes differently */ }
  }
  return out;
}

/**
 * A destination service (pre-shared key over TLS) fed random frame
 * sequences by authenticated clients, about `frames` frames in all. After
 * each sequence, a SYNC must be answered or the connection closed within
 * 10 s (else a hang). The service must log no internal error, stay up, and
 * its RSS stay bounded.
 */
export async function fuzzSession(frames: number, seed = 3, log?: (s: string) => void): Promise<FuzzCounts & { rssStartMiB: number; rssPeakMiB: number; connections: number }> {
  const c = { cases: 0, frames: 0, crashes: 0, hangs: 0, failures: [] as string[], rssStartMiB: 0, rssPeakMiB: 0, connections: 0 };
  const dir = mkdtempSync(join(tmpdir(), 'bf-fuzz-'));
  const key = Buffer.from('blockferry-fuzz-key-0123456789abcdef');
  const internal: string[] = [];
  const svc = await DestinationService.start({ dataDir: dir, auth: { key }, log: (l) => { if (/ERR_BF_INTERNAL|TypeError|RangeError/.test(l)) internal.push(l); } });
  const BLOCKS_IN_IMAGE = 96, BS = 4096;
  const rnd = fc.sample(fc.nat(), { numRuns: 1, seed })[0]!;
  let state = rnd || 1;
  const next = () => { state ^= state << 13; state >>>= 0; state ^= state >>> 17; state ^= state << 5; state >>>= 0; return state; };
  const pick = (n: number) => next() % n;
  const iv = () => { const s = pick(BLOCKS_IN_IMAGE + 4); return { start: s, count: 1 + pick(8) }; };
  const u64 = () => (BigInt(next()) << 32n) | BigInt(next());
  const frame = (): [MsgType, Buffer] => {
    const r = pick(100);
    const w = new Writer();
    if (r < 25) { const n = 1 + pick(3); w.u32(n); for (let i = 0; i < n; i++) { const v = iv(); w.u64(v.start).u32(v.count); } return [Msg.ZERO, w.done()]; }
    if (r < 40) { const v = iv(); w.u64(v.start).u32(v.count); for (let i = 0; i < 2 * v.count; i++) w.big(u64()); return [Msg.BLOCK_INFO, w.done()]; }
    if (r < 50) { const v = { start: pick(BLOCKS_IN_IMAGE), count: 1 }; w.u32(1).u64(v.start).u32(1).big(u64()).bytes(Buffer.alloc(BS, pick(256))); return [Msg.BLOCKS, w.done()]; }
    if (r < 58) { const n = 1 + pick(3); w.u32(n); for (let i = 0; i < n; i++) w.u64(pick(BLOCKS_IN_IMAGE + 4)).u64(pick(BLOCKS_IN_IMAGE + 4)).big(u64()); return [Msg.COPY, w.done()]; }
    if (r < 66) return [Msg.ROUND, new Writer().u32(pick(10)).done()];
    if (r < 72) return [Msg.INFO_END, Buffer.alloc(0)];
    if (r < 80) { const n = 1 + pick(3); w.u32(n); for (let i = 0; i < n; i++) { const v = iv(); w.u64(v.start).u32(v.count); const kind = pick(2); w.u8(kind); if (kind) w.bytes(Buffer.alloc(20, pick(256))); } return [Msg.VERIFY, w.done()]; }
    if (r < 83) return [Msg.SYNC, Buffer.alloc(0)];
    if (r < 85) return [Msg.COMMIT, Buffer.alloc(0)];
    const types = Object.values(Msg) as MsgType[];
    return [types[pick(types.length)]!, Buffer.from(Array.from({ length: pick(64) }, () => pick(256)))];
  };
  const base = rss();
  c.rssStartMiB = base.rss / 2 ** 20;
  let peak = base.rss;
  try {
    while (c.frames < frames) {
      c.connections++;
      const ch = new Channel(await tlsConnect({ host: '127.0.0.1', port: svc.address.port }, { mode: 'psk', key }));
      try {
        await clientHandshake(ch, { key });
        await ch.send(BEGIN, { name: `f${c.connections % 50}`, size: BLOCKS_IN_IMAGE * BS - pick(2) * 100, blockSize: BS, flags: 1, fills: pick(2), strategy: 'fuzz' });
        await ch.recv(BEGIN_OK);
        const len = 1 + pick(400);
        for (let i = 0; i < len && !ch.failed; i++) {
          const [t, p] = frame();
          await ch.sendFrame(t, p, t === Msg.VERIFY || t === Msg.SYNC || t === Msg.COMMIT ? 1 + pick(1000) : 0).catch(() => {});
          if (!ch.failed) c.frames++;
        }
        c.cases++;
        if (!ch.failed) {
          const answered = ch.request(SYNC, undefined, MESSAGES.get(Msg.SYNC_OK)!).then(() => 'ok', () => 'closed');
          const r = await Promise.race([answered, new Promise((res) => setTimeout(() => res('hang'), 10_000).unref())]);
          if (r === 'hang') { c.hangs++; if (c.failures.length < 5) c.failures.push(`hang after ${len} frames on connection ${c.connections}`); }
        }
      } catch {
        // refused or closed by the service: what it should do with garbage
      } finally {
        ch.socket.destroy();
      }
      if (c.connections % 200 === 0) {
        peak = Math.max(peak, rss().rss);
        log?.(`session fuzz: ${c.frames} frames, ${c.connections} connections, RSS ${(rss().rss / 2 ** 20).toFixed(0)} MiB`);
      }
    }
  } finally {
    peak = Math.max(peak, rss().rss);
    await svc.close();
    rmSync(dir, { recursive: true, force: true });
  }
  c.crashes += internal.length;
  c.failures.push(...internal.slice(0, 5));
  c.rssPeakMiB = peak / 2 ** 20;
  return c;
}
