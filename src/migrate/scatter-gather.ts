// Scatter-gather (paper 003): evict several images from this host as fast as
// its own link allows, whatever the destination's pace. Each image is
// scanned (with a SHA-1 per block); every distinct non-zero content across
// all of them is claimed in the location index (a content someone already
// holds, or another source is sending, is not sent again) and streamed once,
// at full rate, to the destination's stage or an intermediary: one sender per
// store, each taking the next batch as soon as its link has room, so the
// split follows each link's measured throughput and a store that says it is
// full gets nothing more. Beside that, each image runs a pre-copy migration
// to the destination whose BLOCK_INFO runs are each preceded by SG_PLACE
// (each block's SHA-1 and holder), sent once every content of the run is
// held somewhere: the destination gathers them at its own pace (its
// --bwlimit) and asks this side (NEED) only for what no holder gave it, which
// is also what happens when an intermediary dies mid-gather.
//
// Eviction is the moment every content the destination still needs is held
// by the destination or an intermediary: from then on this host holds
// nothing the destination needs (it keeps answering NEED, should a holder
// fail, until the last image is committed).
import { hostname } from 'node:os';
import { BlockferryError, ErrorCode, InvalidArgumentError } from '../errors.js';
import { Channel } from '../protocol/channel.js';
import { CAP_SCATTER, CAP_ZSTD, clientHandshake, type AuthOptions } from '../protocol/handshake.js';
import { decompressorFor } from '../protocol/compression.js';
import {
  DIGEST_BYTES, HOLDER_SOURCE, HOLDER_STAGE, MAX_SG_PEERS, MAX_STASH_BLOCKS, MAX_STASH_BYTES, SG_PLACE, STASH, STASH_FULL, STASH_HELD, STASH_OK, STASH_STORED,
  trafficTotal, type StashOk,
} from '../protocol/messages.js';
import { connect, parseTarget } from '../transport/tcp.js';
import { connect as connectTls, securityFrom, type TlsOptions } from '../transport/tls.js';
import { openSource, sourceName, specFor } from '../image/source.js';
import type { ImageSource } from '../image/image.js';
import { blockLength } from '../blocks/intervals.js';
import type { BlockMap } from '../blockmap/blockmap.js';
import { Scanner } from '../scan/scanner.js';
import type { LocationIndex } from '../fleet/location-index.js';
import { openLocationIndex } from '../fleet/open.js';
import { checkBlockSize } from '../engine/engine.js';
import { migrate, type MigrationResult } from './migrate.js';
import type { MigrationEvent } from './strategy.js';

/** Blocks per BLOCK_INFO run (and SG_PLACE): 8 MiB at 4 KiB, so the destination starts gathering soon after the scatter starts. */
export const SCATTER_INFO_BATCH = 2048;
/** STASH requests in flight per store: enough to keep a long link busy, few enough that the split follows each link's rate. */
const STASH_WINDOW = 4;
/** Digests per claim or locate call to the index. */
const INDEX_BATCH = 8192;
/** How long a content another source claimed may stay unplaced before this source sends it itself (ms). */
const FOREIGN_CLAIM_WAIT_MS = 30_000;

export interface ScatterGatherOptions {
  /** The destination, HOST:PORT (its stage takes the direct share). */
  to: string;
  /** Intermediaries, HOST:PORT each (`serve --role intermediary`), as the destination reaches them too. */
  via: string[];
  auth: AuthOptions;
  tls?: TlsOptions;
  /** Names at the destination, one per image (default: each file's name without extension). */
  names?: string[];
  blockSize?: number;
  /** The location index: a LocationIndex, `redis://HOST:PORT[,...]`, or none (embedded, this process only). */
  index?: string | LocationIndex;
  overwrite?: boolean;
  /** The source's scatter rate, bytes per second over all stores (0: its full rate). */
  bwlimit?: number;
  scanner?: Scanner;
  onEvent?: (e: MigrationEvent) => void;
}

/** Bytes one peer's link carried from this side's point of view. */
export interface LinkBytes { sent: number; received: number; stashedBlocks: number; stashedBytes: number; refusedBlocks: number; failed?: string }

export interface ScatterGatherImage {
  name: string;
  path: string;
  dataBlocks: number;
  /** Data blocks by where the destination was told to gather them: `dst` (its stage), an intermediary's address, `source`. */
  placed: Record<string, number>;
  /** Blocks the destination asked this side for (no holder gave them: a failed intermediary, a wrong byte). */
  fromSource: number;
  /** Blocks the destination gathered (data blocks not sent by this side, not copied, not resumed). */
  gathered: number;
  migration: MigrationResult;
}

export interface ScatterGatherResult {
  blockSize: number;
  /** From the call to the moment this host held nothing the destination still needs (seconds). */
  evictionSeconds: number;
  /** From the call to the last image committed at the destination, verified (seconds). */
  seconds: number;
  scanSeconds: number;
  /** Per peer (`dst` HOST:PORT, each intermediary): bytes this side sent and received on its links, STASH included. */
  links: Record<string, LinkBytes>;
  dedup: {
    /** Non-zero blocks of all images together, and their bytes. */
    dataBlocks: number;
    dataBytes: number;
    /** Distinct contents among them. */
    distinctBlocks: number;
    /** Contents this side stashed (each once), and their bytes. */
    stashedBlocks: number;
    stashedBytes: number;
    /** Contents already held (or sent by another source sharing the index): not sent by this side. */
    alreadyHeldBlocks: number;
    /** Bytes not sent because of cross-VM deduplication (repeats across and within the images, and contents already held). */
    savedBytes: number;
  };
  images: ScatterGatherImage[];
}

/** What one distinct content is and where it went. */
interface Content {
  img: number;
  block: number;
  len: number;
  /** Peer index once held (0: the destination's stage), -1 while unplaced, -2 when only the source has it. */
  holder: number;
  /** A peer name from the index this process does not send to, when holder is -3 (a foreign holder). */
  foreign?: string;
}

const UNPLACED = -1;
const SOURCE_ONLY = -2;
const FOREIGN = -3;

/** A promise that resolves at the next notify(). */
class Changes {
  private waiters: Array<() => void> = [];
  notify(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  next(): Promise<void> {
    return new Promise((r) => this.waiters.push(r));
  }
}

const keyAt = (digests: Uint8Array, k: number) => Buffer.from(digests.buffer, digests.byteOffset + k * DIGEST_BYTES, DIGEST_BYTES).toString('latin1');

/** Evicts the images at `paths` to the destination through intermediaries; resolves once every image is committed there, verified. */
export async function scatterGather(paths: string[], options: ScatterGatherOptions): Promise<ScatterGatherResult> {
  const t0 = performance.now();
  if (paths.length === 0) throw new InvalidArgumentError('images', 'at least one image', paths.length);
  const bs = options.blockSize ?? 4096;
  checkBlockSize(bs);
  const names = options.names ?? paths.map((p) => sourceName(p));
  if (names.length !== paths.length) throw new InvalidArgumentError('names', `one name per image (${paths.length})`, names.length);
  if (new Set(names).size !== names.length) throw new InvalidArgumentError('names', 'distinct names', names.join(','));
  if (options.via.length + 1 > MAX_SG_PEERS) throw new InvalidArgumentError('via', `at most ${MAX_SG_PEERS - 1} intermediaries`, options.via.length);
  const peers = [options.to, ...options.via];
  for (const p of peers) parseTarget(p);
  if (new Set(peers).size !== peers.length) throw new InvalidArgumentError('via', 'distinct addresses, none the destination', options.via.join(','));
  const location = (i: number) => (i === 0 ? `dst:${peers[0]}` : `im:${peers[i]}`);
  const event = (phase: string, detail?: unknown) => options.onEvent?.({ phase, detail });
  const ownIndex = typeof options.index !== 'object';
  const index = typeof options.index === 'object' ? options.index : await openLocationIndex(options.index);
  const ownScanner = !options.scanner;
  const scanner = options.scanner ?? new Scanner();
  const sources: ImageSource[] = [];
  const claimer = `src:${hostname()}:${process.pid}:${Math.random().toString(36).slice(2, 8)}`;
  try {
    for (const p of paths) sources.push(openSource(specFor(p)));
    // 1. Scan, with a SHA-1 per block.
    event('scan');
    const maps: BlockMap[] = [];
    for (const p of paths) {
      const [m] = await scanner.scan(p, { blockSize: bs, sha1: true });
      maps.push(m!);
    }
    const scanSeconds = (performance.now() - t0) / 1000;
    // 2. Distinct contents across every image; (image, block) → SHA-1 into the index.
    const contents = new Map<string, Content>();
    let dataBlocks = 0, dataBytes = 0;
    for (let i = 0; i < maps.length; i++) {
      const m = maps[i]!;
      const digests = m.digests!;
      let k = 0;
      for (const r of m.runs()) {
        await index.setBlocks(names[i]!, r.start, digests.subarray(k * DIGEST_BYTES, (k + r.count) * DIGEST_BYTES));
        for (let b = r.start; b < r.start + r.count; b++, k++) {
          const len = blockLength(m.imageSize, bs, b);
          dataBlocks++;
          dataBytes += len;
          const key = keyAt(digests, k);
          if (!contents.has(key)) contents.set(key, { img: i, block: b, len, holder: UNPLACED });
        }
      }
    }
    // 3. Claim: what nobody holds or sends is this side's to send; the rest is located (or waited for).
    event('claim', { distinct: contents.size });
    const keys = [...contents.keys()];
    const mine: string[] = [];
    const foreignClaims: string[] = [];
    for (let j = 0; j < keys.length; j += INDEX_BATCH) {
      const batch = keys.slice(j, j + INDEX_BATCH);
      const packed = Buffer.from(batch.join(''), 'latin1');
      const won = await index.claim(claimer, packed);
      const lost = batch.filter((_, x) => !won[x]);
      batch.forEach((k, x) => { if (won[x]) mine.push(k); });
      if (lost.length) {
        const where = await index.locate(Buffer.from(lost.join(''), 'latin1'));
        lost.forEach((k, x) => { if (!place(k, where[x]!)) foreignClaims.push(k); });
      }
    }
    /** Marks a content held where the index says (one of this call's stores first); false while only a source claims it. */
    function place(k: string, holders: string[]): boolean {
      const c = contents.get(k)!;
      for (const h of holders) {
        if (h === `dst:${peers[0]}`) { c.holder = 0; return true; }
        const i = h.startsWith('im:') ? peers.indexOf(h.slice(3)) : -1;
        if (i > 0) { c.holder = i; return true; }
      }
      for (const h of holders) {
        if (h.startsWith('im:') || h.startsWith('dst:')) { c.holder = FOREIGN; c.foreign = h.slice(h.indexOf(':') + 1); return true; }
      }
      return false;
    }
    // The order the destination needs them: the images' data blocks interleaved, first to last.
    const order = mine.map((k) => contents.get(k)!);
    order.sort((a, b) => a.block - b.block || a.img - b.img);
    const changes = new Changes();
    let evictedAt: number | undefined;

    // 4. Scatter: one sender per store, each at its own link's pace.
    const links: Record<string, LinkBytes> = {};
    for (const p of peers) links[p] = { sent: 0, received: 0, stashedBlocks: 0, stashedBytes: 0, refusedBlocks: 0 };
    const queue = { items: order, next: 0, requeued: [] as Content[], inflight: 0 };
    const take = (max: number, room: number): Content[] => {
      const out: Content[] = [];
      let bytes = 0;
      while (out.length < max) {
        const c = queue.requeued.pop() ?? (queue.next < queue.items.length ? queue.items[queue.next++] : undefined);
        if (!c) break;
        if (c.holder !== UNPLACED) continue;
        if (bytes + c.len > Math.min(room, MAX_STASH_BYTES)) { queue.requeued.push(c); break; }
        out.push(c);
        bytes += c.len;
      }
      return out;
    };
    const remaining = () => queue.requeued.some((c) => c.holder === UNPLACED) || queue.next < queue.items.length;
    const per = Math.max(1, Math.min(MAX_STASH_BLOCKS, Math.floor(MAX_STASH_BYTES / bs)));
    const paceAt = { at: performance.now() };
    const pace = async (bytes: number) => {
      const rate = options.bwlimit ?? 0;
      if (!(rate > 0)) return;
      const now = performance.now();
      paceAt.at = Math.max(paceAt.at, now) + (bytes / rate) * 1000;
      const wait = paceAt.at - now - 50;
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    };
    const security = securityFrom(options.auth, options.tls);
    const channels: Channel[] = [];
    const sender = async (pi: number) => {
      const peer = peers[pi]!;
      const link = links[peer]!;
      let ch: Channel | undefined;
      const inflight: Array<{ batch: Content[]; answer: Promise<StashOk> }> = [];
      let free = Infinity;
      const settle = async () => {
        const { batch, answer } = inflight.shift()!;
        const ok = await answer;
        free = ok.free;
        const placed: string[] = [];
        batch.forEach((c, x) => {
          const s = ok.status[x];
          if (s === STASH_STORED || s === STASH_HELD) {
            c.holder = pi;
            placed.push(keyOf(c));
            if (s === STASH_STORED) { link.stashedBlocks++; link.stashedBytes += c.len; }
          } else {
            if (s === STASH_FULL) link.refusedBlocks++;
            queue.requeued.push(c); // another store takes it, or the source keeps it
          }
        });
        queue.inflight -= batch.length;
        if (placed.length) {
          const packed = Buffer.from(placed.join(''), 'latin1');
          await index.record(location(pi), packed);
          await index.forget(claimer, packed);
        }
        changes.notify();
      };
      try {
        const socket = await (security.mode === 'insecure' ? connect(parseTarget(peer)) : connectTls(parseTarget(peer), security));
        ch = new Channel(socket);
        channels.push(ch);
        const caps = await clientHandshake(ch, { ...options.auth, certificates: security.mode === 'cert' }, CAP_SCATTER | CAP_ZSTD);
        // Nothing is compressed towards the stores (the source's link is the fast one; its CPU goes to sending),
        // but a store may compress what it sends (the gather's link is the slow one).
        ch.setCodec(undefined, decompressorFor(caps));
        if (!(caps & CAP_SCATTER)) throw new BlockferryError(ErrorCode.REFUSED, `${peer} takes no scattered blocks (not an intermediary, or a destination without a stage)`);
        free = (await ch.request(STASH, { digests: Buffer.alloc(0), lengths: [], data: Buffer.alloc(0) }, STASH_OK)).free;
        for (;;) {
          const batch = free >= bs ? take(per, free) : [];
          if (batch.length === 0) {
            if (inflight.length) { await settle(); continue; }
            if (free < bs || (!remaining() && queue.inflight === 0)) break;
            await changes.next(); // others' answers may put blocks back
            continue;
          }
          queue.inflight += batch.length;
          free -= batch.reduce((a, c) => a + c.len + 24, 0);
          const data = Buffer.allocUnsafe(batch.reduce((a, c) => a + c.len, 0));
          let at = 0;
          // Consecutive blocks of one image are read with one call.
          for (let x = 0; x < batch.length;) {
            const c = batch[x]!;
            let y = x + 1, len = c.len;
            while (y < batch.length && batch[y]!.img === c.img && batch[y]!.block === c.block + (y - x) && batch[y - 1]!.len === bs) len += batch[y++]!.len;
            sources[c.img]!.readInto(data.subarray(at, at + len), c.block * bs, len);
            at += len;
            x = y;
          }
          await pace(data.length);
          const answer = ch.request(STASH, { digests: Buffer.from(batch.map(keyOf).join(''), 'latin1'), lengths: batch.map((c) => c.len), data }, STASH_OK);
          answer.catch(() => {});
          inflight.push({ batch, answer });
          if (inflight.length >= STASH_WINDOW) await settle();
        }
      } catch (e) {
        link.failed = `${(e as { code?: string }).code ?? ErrorCode.INTERNAL}: ${(e as Error).message}`;
        event('store-failed', { peer, error: link.failed });
        for (const x of inflight) { queue.inflight -= x.batch.length; for (const c of x.batch) if (c.holder === UNPLACED) queue.requeued.push(c); }
        inflight.length = 0;
        changes.notify();
      } finally {
        if (ch) { link.sent += trafficTotal(ch.sent); link.received += trafficTotal(ch.received); ch.close(); }
      }
    };
    const keyOf = (c: Content) => keyAt(maps[c.img]!.digests!, maps[c.img]!.indexOf(c.block));
    // Contents another source claimed: placed once it records a holder; sent from here after a while otherwise.
    const awaitForeign = async () => {
      const deadline = performance.now() + FOREIGN_CLAIM_WAIT_MS;
      let left = foreignClaims;
      while (left.length) {
        const where = await index.locate(Buffer.from(left.join(''), 'latin1'));
        left = left.filter((k, x) => !place(k, where[x]!));
        changes.notify();
        if (!left.length) break;
        if (performance.now() > deadline) {
          for (const k of left) { queue.requeued.push(contents.get(k)!); }
          changes.notify();
          break;
        }
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    event('scatter', { contents: order.length, stores: peers.length });
    const scatter = (async () => {
      await Promise.all([awaitForeign(), ...peers.map((_, i) => sender(i))]);
      // Whatever no store took stays here: the destination asks for it.
      for (const c of contents.values()) if (c.holder === UNPLACED) c.holder = SOURCE_ONLY;
      const sourceOnly = [...contents.values()].some((c) => c.holder === SOURCE_ONLY);
      if (!sourceOnly) evictedAt = performance.now();
      event('evicted', { seconds: evictedAt !== undefined ? (evictedAt - t0) / 1000 : undefined, sourceOnly });
      changes.notify();
    })();

    // 5. The migrations: each BLOCK_INFO run waits until all its contents are held, then SG_PLACE names where.
    const placedBy = names.map(() => ({} as Record<string, number>));
    const hook = (i: number) => ({
      map: maps[i]!,
      infoBatch: SCATTER_INFO_BATCH,
      beforeInfo: async (ch: Channel, start: number, count: number) => {
        const m = maps[i]!;
        const k0 = m.indexOf(start);
        const digests = m.digests!.subarray(k0 * DIGEST_BYTES, (k0 + count) * DIGEST_BYTES);
        // Blocks are placed in about the order runs need them: resume the check where the last one stopped.
        for (let x = 0; x < count;) {
          if (contents.get(keyAt(digests, x))!.holder !== UNPLACED) { x++; continue; }
          await changes.next();
        }
        const extra: string[] = [];
        const holders = new Uint8Array(count);
        for (let x = 0; x < count; x++) {
          const c = contents.get(keyAt(digests, x))!;
          let h: number;
          let label: string;
          if (c.holder === 0) { h = HOLDER_STAGE; label = 'dst'; } else if (c.holder > 0) { h = c.holder - 1; label = peers[c.holder]!; } else if (c.holder === FOREIGN && c.foreign) {
            let e = extra.indexOf(c.foreign);
            if (e < 0 && options.via.length + extra.length < MAX_SG_PEERS) { extra.push(c.foreign); e = extra.length - 1; }
            h = e < 0 ? HOLDER_SOURCE : options.via.length + e;
            label = e < 0 ? 'source' : c.foreign;
          } else { h = HOLDER_SOURCE; label = 'source'; }
          holders[x] = h;
          placedBy[i]![label] = (placedBy[i]![label] ?? 0) + 1;
        }
        await ch.send(SG_PLACE, { start, count, peers: [...options.via, ...extra], digests: Buffer.from(digests), holders });
      },
    });
    const migrations = await Promise.all(paths.map((p, i) => migrate(p, {
      to: options.to, name: names[i]!, auth: options.auth, ...(options.tls ? { tls: options.tls } : {}), blockSize: bs, scanner,
      ...(options.overwrite ? { overwrite: true } : {}), scatter: hook(i),
      ...(options.onEvent ? { onEvent: (e: MigrationEvent) => options.onEvent!({ phase: `${names[i]}:${e.phase}`, detail: e.detail }) } : {}),
    })));
    await scatter;
    const t1 = performance.now();
    for (const r of migrations) { links[peers[0]!]!.sent += trafficTotal(r.wire.sent); links[peers[0]!]!.received += trafficTotal(r.wire.received); }
    const stashedBlocks = Object.values(links).reduce((a, l) => a + l.stashedBlocks, 0);
    const stashedBytes = Object.values(links).reduce((a, l) => a + l.stashedBytes, 0);
    const sourceOnly = [...contents.values()].filter((c) => c.holder === SOURCE_ONLY).length;
    const alreadyHeld = contents.size - stashedBlocks - sourceOnly;
    return {
      blockSize: bs,
      evictionSeconds: ((evictedAt ?? t1) - t0) / 1000,
      seconds: (t1 - t0) / 1000,
      scanSeconds,
      links,
      dedup: { dataBlocks, dataBytes, distinctBlocks: contents.size, stashedBlocks, stashedBytes, alreadyHeldBlocks: alreadyHeld, savedBytes: dataBytes - stashedBytes },
      images: migrations.map((r, i) => ({
        name: names[i]!, path: paths[i]!, dataBlocks: maps[i]!.dataBlocks, placed: placedBy[i]!,
        fromSource: r.blocks.sent, gathered: maps[i]!.dataBlocks - r.blocks.sent - r.blocks.copied - r.blocks.resumed - r.blocks.filledFromNeighbours,
        migration: r,
      })),
    };
  } finally {
    for (const s of sources) s.close();
    if (ownScanner) await scanner.close();
    await index.forget(claimer).catch(() => {});
    if (ownIndex) await index.close();
  }
}
