// The destination's side of a base-image repository: one more fill source.
// For the blocks of a BLOCK_INFO run still missing after the neighbours, it
// asks the repository for their contents by fingerprint and signature,
// checks each block it gets against what the source sent, and writes those
// that match. A repository that is down, slow, or lying costs at most a
// timeout: its blocks are then simply asked from the source.
import { ErrorCode, ProtocolError } from '../../errors.js';
import { IntervalSet, blockLength } from '../../blocks/intervals.js';
import { Channel } from '../../protocol/channel.js';
import { CAP_REPOSITORY, clientHandshake, type AuthOptions } from '../../protocol/handshake.js';
import { FETCH, FETCH_RESULT, MAX_FETCH_BLOCKS, MAX_FETCH_BYTES, type FetchResult } from '../../protocol/messages.js';
import { connect, parseTarget } from '../../transport/tcp.js';
import { connect as connectTls, securityFrom, type TlsOptions } from '../../transport/tls.js';
import type { Logger } from '../../log.js';
import type { FillContext, FillRequest, FillSource } from '../fill-source.js';

/** Milliseconds a repository has to connect, or to answer one FETCH, before the session stops asking it. */
export const DEFAULT_REPOSITORY_TIMEOUT_MS = 5000;

/** FETCHes in flight at once, per session. */
const WINDOW = 4;

/** One distinct content asked for, and the blocks of the run that hold it. */
interface Wanted {
  fp: bigint;
  sig: bigint;
  blocks: number[];
}

/** Where a destination's repository is, and how to authenticate to it (the destination's own key or certificates, by default). */
export interface RepositoryLink {
  to: string;
  auth: AuthOptions;
  tls?: TlsOptions;
  timeout?: number;
  logger?: Logger;
  /** Shared by the sessions of one service: an unreachable repository is logged once, until it answers again. */
  state?: { down: boolean };
}

/** One session's connection to the repository, opened at its first fill. */
export class RepositoryFills implements FillSource {
  readonly name = 'repository';
  private ch: Channel | undefined;
  private opening: Promise<Channel> | undefined;
  /** Set on the first failure: this session asks the source for everything from then on. */
  private gaveUp = false;
  private closed = false;
  /** Blocks written from the repository, and blocks it returned that did not match (wrong bytes for a fingerprint). */
  readonly counts = { filled: 0, rejected: 0, requests: 0 };

  constructor(private readonly link: RepositoryLink) {}

  private get timeout(): number {
    return this.link.timeout ?? DEFAULT_REPOSITORY_TIMEOUT_MS;
  }

  /** Resolves with p, or rejects with ERR_BF_TIMEOUT after the repository's timeout. */
  private async bounded<T>(p: Promise<T>, what: string): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([p, new Promise<never>((_, rej) => {
        timer = setTimeout(() => rej(new ProtocolError(ErrorCode.TIMEOUT, `the repository did not ${what} within ${this.timeout} ms`)), this.timeout);
      })]);
    } finally {
      clearTimeout(timer);
    }
  }

  private channel(): Promise<Channel> {
    // The repository ends connections idle for its idle deadline (a live migration's rounds ask nothing): open a new one.
    if (this.ch?.failed) {
      this.ch = undefined;
      this.opening = undefined;
    }
    this.opening ??= (async () => {
      const l = this.link;
      const security = securityFrom(l.auth, l.tls);
      const target = parseTarget(l.to);
      const socket = await (security.mode === 'insecure' ? connect(target) : connectTls(target, security));
      if (this.closed || this.gaveUp) {
        socket.destroy(); // opened after the session stopped waiting for it
        throw new ProtocolError(ErrorCode.CONNECTION, 'no longer needed');
      }
      const ch = new Channel(socket);
      this.ch = ch;
      const caps = await clientHandshake(ch, { ...l.auth, certificates: security.mode === 'cert' }, CAP_REPOSITORY);
      if (!(caps & CAP_REPOSITORY)) throw new ProtocolError(ErrorCode.REFUSED, `${l.to} is not a blockferry repository`);
      return ch;
    })();
    return this.opening;
  }

  async fill(req: FillRequest, ctx: FillContext): Promise<IntervalSet> {
    const filled = new IntervalSet();
    if (this.gaveUp) return filled;
    const bs = ctx.blockSize;
    // Each distinct content is asked for once; every block that holds it is written from the one answer.
    const wanted = new Map<string, Wanted>();
    for (const iv of req.missing) {
      for (let b = iv.start; b < iv.start + iv.count; b++) {
        const fp = req.fingerprints[b - req.start]!, sig = req.signatures[b - req.start]!;
        const k = `${fp}:${sig}`;
        const w = wanted.get(k);
        if (w) w.blocks.push(b);
        else wanted.set(k, { fp, sig, blocks: [b] });
      }
    }
    const all = [...wanted.values()];
    const per = Math.max(1, Math.min(MAX_FETCH_BLOCKS, Math.floor(MAX_FETCH_BYTES / bs)));
    // A few FETCHes in flight: over a long link the repository's round trips overlap (bounded: WINDOW MiB of answers at most).
    const inflight: Array<{ batch: Wanted[]; answer: Promise<FetchResult> }> = [];
    let next = 0;
    const launch = () => {
      const batch = all.slice(next, next + per);
      next += batch.length;
      const answer = this.ask(batch, bs);
      answer.catch(() => {}); // the first failure, in order, is the one acted on
      inflight.push({ batch, answer });
    };
    while (next < all.length && inflight.length < WINDOW) launch();
    while (inflight.length) {
      const { batch, answer } = inflight.shift()!;
      let res: FetchResult;
      try {
        res = await answer;
      } catch (e) {
        this.giveUp(e as Error);
        break;
      }
      if (this.link.state?.down) {
        this.link.state.down = false;
        this.link.logger?.info(`repository ${this.link.to} answers again`);
      }
      await this.apply(batch, res, ctx, filled);
      if (next < all.length) launch();
    }
    return filled;
  }

  /** One FETCH for a batch of distinct contents; rejects on any failure, a timeout included. */
  private async ask(batch: Wanted[], bs: number): Promise<FetchResult> {
    const ch = await this.bounded(this.channel(), 'connect and authenticate');
    this.counts.requests++;
    const fingerprints = BigUint64Array.from(batch, (w) => w.fp), signatures = BigUint64Array.from(batch, (w) => w.sig);
    const res = await this.bounded(ch.request(FETCH, { blockSize: bs, fingerprints, signatures }, FETCH_RESULT), 'answer a FETCH');
    if (res.lengths.length !== batch.length) throw new ProtocolError(ErrorCode.PROTOCOL, `FETCH_RESULT: ${res.lengths.length} entries for ${batch.length} blocks asked`);
    return res;
  }

  /** Checks each returned block against the source's fingerprint and signature, and writes it where it belongs. */
  private async apply(batch: Wanted[], res: FetchResult, ctx: FillContext, filled: IntervalSet): Promise<void> {
    const bs = ctx.blockSize;
    const writes: Array<{ block: number; data: Buffer }> = [];
    for (let j = 0, off = 0; j < batch.length; j++) {
      const len = res.lengths[j]!;
      if (len === 0) continue;
      const data = res.data.subarray(off, off + len);
      off += len;
      const w = batch[j]!;
      const got = len <= bs ? ctx.engine.fingerprints(data, bs) : undefined;
      if (!got || got.fingerprints.length !== 1 || got.fingerprints[0] !== w.fp || got.signatures[0] !== w.sig) {
        this.counts.rejected++; // wrong bytes for this content: the source sends it
        continue;
      }
      // Only a block of the same length holds the same content (a short block is the image's last).
      for (const b of w.blocks) if (blockLength(ctx.size, bs, b) === len) writes.push({ block: b, data });
    }
    writes.sort((a, b) => a.block - b.block);
    // Consecutive blocks go in one write.
    for (let x = 0; x < writes.length; ) {
      let y = x + 1;
      while (y < writes.length && writes[y]!.block === writes[y - 1]!.block + 1 && writes[y - 1]!.data.length === bs) y++;
      const run = writes.slice(x, y);
      await ctx.sink.write(run[0]!.block * bs, run.length === 1 ? run[0]!.data : Buffer.concat(run.map((r) => r.data)));
      filled.add(run[0]!.block, run.length);
      this.counts.filled += run.length;
      x = y;
    }
  }

  private giveUp(e: Error): void {
    this.gaveUp = true;
    this.ch?.close();
    this.ch?.socket.destroy();
    const state = this.link.state;
    if (state?.down) return; // said already
    if (state) state.down = true;
    this.link.logger?.warn({ code: (e as { code?: string }).code ?? ErrorCode.INTERNAL }, `repository ${this.link.to} unusable (${(e as { code?: string }).code ?? ErrorCode.INTERNAL}: ${e.message}); its blocks are asked from the source`);
  }

  close(): void {
    if (this.counts.requests) this.link.logger?.info({ filled: this.counts.filled, requests: this.counts.requests, rejected: this.counts.rejected }, `repository ${this.link.to}: ${this.counts.filled} blocks filled in ${this.counts.requests} requests${this.counts.rejected ? `, ${this.counts.rejected} returned blocks rejected (wrong content)` : ''}`);
    this.closed = true;
    this.ch?.close();
  }
}
