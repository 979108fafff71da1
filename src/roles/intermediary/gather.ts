// The destination's side of scatter-gather: one more fill source. For the
// blocks of a BLOCK_INFO run, SG_PLACE (sent just before it) names each
// block's SHA-1 and where it is staged: an intermediary, or this
// destination's own stage. The gather takes each distinct content once per
// service (a content several images share is fetched once and kept in the
// stage for the others), paced by the destination's own gather rate limit,
// checks each block's SHA-1 and then the source's fingerprint and signature,
// and writes it. A holder that fails, is slow, or lies costs its blocks a
// trip from the source (NEED), never a wrong byte.
import { ErrorCode, ProtocolError } from '../../errors.js';
import { IntervalSet, blockLength } from '../../blocks/intervals.js';
import { Channel } from '../../protocol/channel.js';
import { CAP_SCATTER, CAP_ZSTD, clientHandshake, type AuthOptions } from '../../protocol/handshake.js';
import { compressorFor, decompressorFor } from '../../protocol/compression.js';
import { DIGEST_BYTES, GATHER, GATHER_RESULT, HOLDER_SOURCE, HOLDER_STAGE, MAX_STASH_BLOCKS, MAX_STASH_BYTES, type SgPlace } from '../../protocol/messages.js';
import { connect, parseTarget } from '../../transport/tcp.js';
import { connect as connectTls, securityFrom, type TlsOptions } from '../../transport/tls.js';
import type { FillContext, FillRequest, FillSource } from '../fill-source.js';
import { sha1, type ContentStore } from './store.js';

/** Milliseconds a failed holder is not asked again. */
const DEAD_MS = 30_000;
/** Milliseconds a holder has to connect, or to answer one GATHER, before it is given up for this service's life (until it answers a new connection). */
export const DEFAULT_GATHER_TIMEOUT_MS = 10_000;
/** GATHER requests in flight at once per fill: over a long link their round trips overlap (at most WINDOW MiB of answers). */
const WINDOW = 4;

/** Paces bytes to a rate: take(n) resolves when n more bytes fit (a token bucket of one second's depth). */
export class RateLimit {
  private tokens: number;
  private at = performance.now();
  private chain: Promise<void> = Promise.resolve();
  constructor(readonly rate: number) {
    this.tokens = rate;
  }

  take(n: number): Promise<void> {
    if (!(this.rate > 0)) return Promise.resolve();
    const next = this.chain.then(async () => {
      for (;;) {
        const now = performance.now();
        this.tokens = Math.min(this.rate, this.tokens + ((now - this.at) / 1000) * this.rate);
        this.at = now;
        if (this.tokens >= Math.min(n, this.rate)) { this.tokens -= n; return; }
        await new Promise((r) => setTimeout(r, Math.ceil(((Math.min(n, this.rate) - this.tokens) / this.rate) * 1000)));
      }
    });
    this.chain = next;
    return next;
  }
}

export interface GatherLink {
  auth: AuthOptions;
  tls?: TlsOptions;
  /** The destination's own stage (STASH from sources goes there), and where gathered blocks are kept for other images. */
  stage: ContentStore;
  /** Gather rate, bytes per second (0: unlimited). */
  bwlimit?: number;
  timeout?: number;
  log?: (line: string) => void;
}

/** Per service: connections to holders, contents being fetched, the rate limit, what came from where. */
export class GatherPool {
  private readonly channels = new Map<string, Promise<Channel>>();
  /** Holders that failed, and until when they are not asked again (then a new connection is tried). */
  private readonly deadUntil = new Map<string, number>();
  private readonly open = new Map<string, Channel>();
  private readonly inflight = new Map<string, Promise<Buffer | undefined>>();
  private readonly limit: RateLimit;
  /** Blocks (distinct contents) gathered per holder address; `stage`: found in the own stage; `rejected`: wrong bytes. */
  readonly counts = { byPeer: {} as Record<string, number>, stage: 0, rejected: 0, failedPeers: 0 };

  constructor(readonly link: GatherLink) {
    this.limit = new RateLimit(link.bwlimit ?? 0);
  }

  private get timeout(): number {
    return this.link.timeout ?? DEFAULT_GATHER_TIMEOUT_MS;
  }

  private async bounded<T>(p: Promise<T>, what: string): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([p, new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new ProtocolError(ErrorCode.TIMEOUT, `${what} within ${this.timeout} ms`)), this.timeout); })]);
    } finally {
      clearTimeout(timer);
    }
  }

  private isDead(peer: string): boolean {
    const until = this.deadUntil.get(peer);
    if (until === undefined) return false;
    if (performance.now() < until) return true;
    this.deadUntil.delete(peer);
    return false;
  }

  private channel(peer: string): Promise<Channel> {
    // A connection the holder closed meanwhile (its idle deadline between migrations): open a new one.
    if (this.open.get(peer)?.failed) { this.open.delete(peer); this.channels.delete(peer); }
    let c = this.channels.get(peer);
    if (c) return c;
    c = (async () => {
      const l = this.link;
      const security = securityFrom(l.auth, l.tls);
      const target = parseTarget(peer);
      const socket = await (security.mode === 'insecure' ? connect(target) : connectTls(target, security));
      const ch = new Channel(socket);
      const caps = await clientHandshake(ch, { ...l.auth, certificates: security.mode === 'cert' }, CAP_SCATTER | CAP_ZSTD);
      ch.setCodec(compressorFor(caps, { mode: 'auto' }), decompressorFor(caps));
      if (!(caps & CAP_SCATTER)) throw new ProtocolError(ErrorCode.REFUSED, `${peer} is not a blockferry intermediary`);
      this.open.set(peer, ch);
      return ch;
    })();
    c.catch(() => {});
    this.channels.set(peer, c);
    return c;
  }

  private fail(peer: string, e: Error): void {
    if (this.isDead(peer)) return;
    this.deadUntil.set(peer, performance.now() + DEAD_MS);
    this.counts.failedPeers++;
    void this.channels.get(peer)?.then((ch) => { ch.close(); ch.socket.destroy(); }).catch(() => {});
    this.channels.delete(peer);
    this.open.delete(peer);
    this.link.log?.(`intermediary ${peer} unusable (${(e as { code?: string }).code ?? ErrorCode.INTERNAL}: ${e.message}); its blocks are asked from the source`);
  }

  /** One GATHER to a peer; each returned block checked against its SHA-1 (a wrong one is undefined). */
  private async gather(peer: string, digests: Buffer, bs: number): Promise<(Buffer | undefined)[]> {
    const n = digests.length / DIGEST_BYTES;
    const out = new Array<Buffer | undefined>(n).fill(undefined);
    if (this.isDead(peer)) return out;
    await this.limit.take(n * bs);
    try {
      const ch = await this.bounded(this.channel(peer), `${peer} did not connect and authenticate`);
      const res = await this.bounded(ch.request(GATHER, digests, GATHER_RESULT), `${peer} did not answer a GATHER`);
      if (res.lengths.length !== n) throw new ProtocolError(ErrorCode.PROTOCOL, `GATHER_RESULT: ${res.lengths.length} entries for ${n} asked`);
      for (let i = 0, at = 0; i < n; i++) {
        const len = res.lengths[i]!;
        if (len === 0) continue;
        const b = res.data.subarray(at, at + len);
        at += len;
        const d = digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
        if (!sha1(b).equals(d)) { this.counts.rejected++; continue; }
        out[i] = b;
        this.counts.byPeer[peer] = (this.counts.byPeer[peer] ?? 0) + 1;
      }
    } catch (e) {
      this.fail(peer, e as Error);
    }
    return out;
  }

  /**
   * The contents of these digests, each fetched at most once by the whole
   * service: from the stage, from a fetch already under way, or from the
   * peer named (undefined: nowhere; the source is asked).
   */
  async obtain(wanted: Array<{ digest: Buffer; peer: string | undefined }>, bs: number): Promise<(Buffer | undefined)[]> {
    const out = new Array<Promise<Buffer | undefined> | Buffer | undefined>(wanted.length);
    const byPeer = new Map<string, number[]>();
    for (let i = 0; i < wanted.length; i++) {
      const w = wanted[i]!;
      const k = w.digest.toString('latin1');
      const local = this.link.stage.get(w.digest);
      if (local) { out[i] = local; this.counts.stage++; continue; }
      const f = this.inflight.get(k);
      if (f) { out[i] = f; continue; }
      if (w.peer === undefined || this.isDead(w.peer)) { out[i] = undefined; continue; }
      let l = byPeer.get(w.peer);
      if (!l) byPeer.set(w.peer, (l = []));
      l.push(i);
    }
    const per = Math.max(1, Math.min(MAX_STASH_BLOCKS, Math.floor(MAX_STASH_BYTES / bs)));
    const batches: Array<{ peer: string; idx: number[] }> = [];
    for (const [peer, idx] of byPeer) for (let j = 0; j < idx.length; j += per) batches.push({ peer, idx: idx.slice(j, j + per) });
    // Each batch's digests are registered as in flight before anything is awaited: another session wanting them waits for this fetch.
    const resolvers: Array<Array<(b: Buffer | undefined) => void>> = batches.map((b) => b.idx.map((i) => {
      let res!: (b: Buffer | undefined) => void;
      const p = new Promise<Buffer | undefined>((r) => { res = r; });
      const k = wanted[i]!.digest.toString('latin1');
      this.inflight.set(k, p);
      out[i] = p;
      return res;
    }));
    let next = 0;
    const worker = async () => {
      while (next < batches.length) {
        const j = next++;
        const { peer, idx } = batches[j]!;
        const digests = Buffer.concat(idx.map((i) => wanted[i]!.digest));
        const got = await this.gather(peer, digests, bs);
        // Kept in the stage: another image with the same content reads it here, not over the link again.
        const keep = got.map((b, x) => (b ? x : -1)).filter((x) => x >= 0);
        if (keep.length) {
          try { this.link.stage.put(Buffer.concat(keep.map((x) => wanted[idx[x]!]!.digest)), keep.map((x) => got[x]!), true); } catch { /* a full or failing stage only costs dedup */ }
        }
        idx.forEach((i, x) => { this.inflight.delete(wanted[i]!.digest.toString('latin1')); resolvers[j]![x]!(got[x]); });
      }
    };
    await Promise.all(Array.from({ length: Math.min(WINDOW, batches.length) }, worker));
    return Promise.all(out.map((x) => Promise.resolve(x)));
  }

  close(): void {
    for (const c of this.channels.values()) void c.then((ch) => { ch.close(); ch.socket.destroy(); }).catch(() => {});
    this.channels.clear();
    this.open.clear();
  }
}

/** One session's gather: SG_PLACE, then the fill of its BLOCK_INFO run. */
export class GatherFills implements FillSource {
  readonly name = 'gather';
  private placement: SgPlace | undefined;
  /** Blocks written from gathered contents. */
  filled = 0;

  constructor(private readonly pool: GatherPool) {}

  /** SG_PLACE: where the next run's blocks are (one placement pending at a time). */
  place(m: SgPlace): void {
    if (this.placement) throw new ProtocolError(ErrorCode.PROTOCOL, `SG_PLACE ${m.start}+${m.count} while the one for ${this.placement.start}+${this.placement.count} has no BLOCK_INFO yet`);
    this.placement = m;
  }

  private current: SgPlace | undefined;

  /** Whether an SG_PLACE waits for its BLOCK_INFO. */
  get pending(): boolean {
    return this.placement !== undefined;
  }

  /** Called at each BLOCK_INFO, before the fills: the pending placement, which must name exactly this run, becomes the run's. */
  take(start: number, count: number): void {
    const p = this.placement;
    this.current = undefined;
    if (!p) return;
    if (p.start !== start || p.count !== count) throw new ProtocolError(ErrorCode.PROTOCOL, `SG_PLACE ${p.start}+${p.count} does not name the BLOCK_INFO run ${start}+${count}`);
    this.placement = undefined;
    this.current = p;
  }

  async fill(req: FillRequest, ctx: FillContext): Promise<IntervalSet> {
    const filled = new IntervalSet();
    const p = this.current;
    this.current = undefined;
    if (!p || p.start !== req.start) return filled;
    const bs = ctx.blockSize;
    const distinct = new Map<string, { digest: Buffer; peer: string | undefined; blocks: number[] }>();
    for (const iv of req.missing) {
      for (let b = iv.start; b < iv.start + iv.count; b++) {
        const i = b - p.start;
        const h = p.holders[i]!;
        if (h === HOLDER_SOURCE) continue;
        const digest = p.digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
        const k = digest.toString('latin1');
        const d = distinct.get(k);
        if (d) d.blocks.push(b);
        else distinct.set(k, { digest, peer: h === HOLDER_STAGE ? undefined : p.peers[h], blocks: [b] });
      }
    }
    const list = [...distinct.values()];
    const got = await this.pool.obtain(list, bs);
    const writes: Array<{ block: number; data: Buffer }> = [];
    for (let j = 0; j < list.length; j++) {
      const data = got[j];
      if (!data || data.length > bs) continue;
      const fp = ctx.engine.fingerprints(data, bs);
      for (const b of list[j]!.blocks) {
        const k = b - req.start;
        if (blockLength(ctx.size, bs, b) !== data.length || fp.fingerprints[0] !== req.fingerprints[k] || fp.signatures[0] !== req.signatures[k]) continue;
        writes.push({ block: b, data });
      }
    }
    writes.sort((a, b) => a.block - b.block);
    for (let x = 0; x < writes.length; ) {
      let y = x + 1;
      while (y < writes.length && writes[y]!.block === writes[y - 1]!.block + 1 && writes[y - 1]!.data.length === bs && y - x < 256) y++;
      const run = writes.slice(x, y);
      await ctx.sink.write(run[0]!.block * bs, run.length === 1 ? run[0]!.data : Buffer.concat(run.map((r) => r.data)));
      filled.add(run[0]!.block, run.length);
      this.filled += run.length;
      x = y;
    }
    return filled;
  }

  close(): void {}
}
