// The source side of a migration: strategies "full" and "similarity"
// (seed paper 001, Tables 1 and 2), live rounds, cutover and the end-to-end
// check. One call for programs; `blockferry migrate` is a thin shell over it.
import { connect } from 'node:net';
import { createHash } from 'node:crypto';
import { basename } from 'node:path';
import { Engine, DIGEST_BYTES, checkBlockSize } from '../engine/engine.js';
import { BlockIndexTable, makeRef, refBlock } from '../table/table.js';
import { BlockferryError, ErrorCode, InvalidArgumentError, ProtocolError } from '../errors.js';
import { Channel, type Traffic } from '../protocol/channel.js';
import { Msg, Reader, Writer } from '../protocol/frame.js';
import { clientHandshake, type AuthOptions } from '../protocol/handshake.js';
import { FileImageSource, statImage } from '../image/source.js';
import { Scanner } from '../scan/scanner.js';
import type { BlockMap } from '../blockmap/blockmap.js';
import type { TrackedImage } from '../image/tracked.js';

export type Strategy = 'full' | 'similarity';

/** Blocks per BLOCK_INFO frame (64 Ki: 1 MiB of fingerprints and signatures at most). */
const INFO_BATCH = 65536;
/** Bytes of block data per BLOCKS frame: 1 MiB keeps frames far under the limit and the pipe full. */
const DATA_BATCH = 1 << 20;
/** Blocks per end-to-end check extent: 256 blocks, 1 MiB at 4 KiB. */
const EXTENT_BLOCKS = 256;
/** Extents per VERIFY frame. */
const VERIFY_BATCH = 4096;
/** Attempts at repairing extents the check finds different. */
const VERIFY_ATTEMPTS = 3;

export interface MigrateOptions {
  /** The destination, "host:port". */
  to: string;
  /** Name at the destination (default: the image's file name without extension). */
  name?: string;
  strategy?: Strategy;
  auth: AuthOptions;
  blockSize?: number;
  /** Bandwidth limit in bytes per second. */
  bwlimit?: number;
  /** Replace a complete image of the same name at the destination. */
  overwrite?: boolean;
  /** Writes go through this tracked image: its dirty bitmap drives the rounds. */
  tracked?: TrackedImage;
  /** Another process writes the image: rescan each round for blocks that changed. */
  rescan?: boolean;
  /** Pre-copy rounds before cutover at most (default 8). */
  maxRounds?: number;
  /** Cut over once a round finds this many dirty blocks or fewer (default 256). */
  dirtyThreshold?: number;
  /** Cutover: called to pause the writer (a VM's suspend). */
  pause?: () => unknown;
  /** Called once the destination holds the verified image (a VM's resume there). */
  resume?: () => unknown;
  scanner?: Scanner;
  onEvent?: (e: { phase: string; detail?: unknown }) => void;
}

export interface MigrationResult {
  name: string;
  strategy: Strategy;
  imageSize: number;
  blockSize: number;
  seconds: number;
  /** From pause to the destination's verified commit (0 when nothing was paused). */
  downtimeSeconds: number;
  rounds: number;
  /** Bytes this side sent and received, by kind, frame headers included. */
  wire: { sent: Traffic; received: Traffic; total: number };
  blocks: {
    total: number;
    zero: number;
    filledFromNeighbours: number;
    resumed: number;
    /** Block contents sent over the wire. */
    sent: number;
    /** Blocks the destination copied from content this migration already sent. */
    copied: number;
    /** Blocks sent more than once (dirty rounds, repairs). */
    resent: number;
    /** Blocks repaired after the end-to-end check. */
    repaired: number;
  };
  verified: boolean;
}

function parseTarget(to: string): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(to);
  if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) throw new InvalidArgumentError('to', 'HOST:PORT', to);
  return { host: m[1]!, port: Number(m[2]) };
}

/** Migrates the image at path to a destination service; resolves once the destination holds it, verified. */
export async function migrate(path: string, options: MigrateOptions): Promise<MigrationResult> {
  const t0 = performance.now();
  const strategy = options.strategy ?? 'similarity';
  if (strategy !== 'full' && strategy !== 'similarity') throw new InvalidArgumentError('strategy', 'full or similarity', strategy);
  const bs = options.blockSize ?? options.tracked?.blockSize ?? 4096;
  checkBlockSize(bs);
  const name = options.name ?? basename(path).replace(/\.[^.]*$/, '');
  const target = parseTarget(options.to);
  statImage(path); // a missing or unusable image is reported before any connection is made
  const ownScanner = !options.scanner;
  const scanner = options.scanner ?? new Scanner();
  const ev = (phase: string, detail?: unknown) => options.onEvent?.({ phase, detail });

  const socket = connect({ host: target.host, port: target.port });
  await new Promise<void>((res, rej) => {
    socket.once('connect', () => res());
    socket.once('error', (e) => rej(new ProtocolError(ErrorCode.CONNECTION, `cannot connect to ${options.to}: ${e.message}`, undefined, { cause: e })));
  });
  const ch = new Channel(socket, { bwlimit: options.bwlimit ?? 0 });
  const src = new FileImageSource(path);
  try {
    await clientHandshake(ch, options.auth);
    // Ask first: a refused migration (name, existing image, busy) costs no scan.
    await ch.send(Msg.BEGIN, new Writer().str(name).u64(src.size).u32(bs).u8(strategy === 'similarity' ? 1 : 0).u8(options.overwrite ? 1 : 0).done());
    new Reader((await ch.recv(Msg.BEGIN_OK)).payload, 'BEGIN_OK');
    options.tracked?.takeDirty(); // writes from here on are this migration's business
    ev('scan');
    const live = !!options.tracked || !!options.rescan;
    const [map] = await scanner.scan(path, { blockSize: bs, live });
    const m = new Migration(ch, src, map!, bs, ev);
    ev('fingerprints');
    const need = await m.exchangeFingerprints();
    ev('transfer', { blocks: need.length });
    await m.sendBlocks(need);
    await m.sync();

    // Pre-copy rounds while the image is live.
    let rounds = 0;
    const dirtyNow = async (): Promise<number[]> => {
      if (options.tracked) return options.tracked.takeDirty();
      if (options.rescan) return m.rescanDirty(await scanner.scan(path, { blockSize: bs, live: true }).then((x) => x[0]!));
      return [];
    };
    const maxRounds = options.maxRounds ?? 8;
    const threshold = options.dirtyThreshold ?? 256;
    let pending = await dirtyNow();
    while (pending.length > threshold && rounds < maxRounds) {
      rounds++;
      ev('round', { round: rounds, dirty: pending.length });
      await ch.send(Msg.ROUND, new Writer().u32(rounds).done());
      await m.sendBlocks(pending);
      await m.sync();
      pending = await dirtyNow();
    }

    // The end-to-end check of every extent while the image is still live:
    // the destination only changes when we tell it to, so after the pause
    // only the extents the last round touches need checking again.
    ev('verify');
    const differ = await m.verify(undefined, false); // live: writes may still land; no repairs yet
    m.touched.clear();
    for (const e of differ) m.touched.add(e);

    // Cutover: pause, last round, check what it touched, commit, resume.
    const tPause = performance.now();
    const paused = options.pause !== undefined;
    ev('cutover', { dirty: pending.length });
    await options.pause?.();
    pending = pending.concat(await dirtyNow());
    rounds++;
    await ch.send(Msg.ROUND, new Writer().u32(rounds).done());
    await m.sendBlocks([...new Set(pending)].sort((a, b) => a - b));
    await m.verify([...m.touched].sort((a, b) => a - b));
    await ch.send(Msg.COMMIT);
    const done = new Reader((await ch.recv(Msg.DONE)).payload, 'DONE');
    const dest = { neighbour: done.u64(), resumed: done.u64(), received: done.u64(), copied: done.u64(), zeroed: done.u64() };
    await options.resume?.();
    const tEnd = performance.now();
    ev('done');
    const sent = ch.sent, received = ch.received;
    const total = Object.values(sent).reduce((a, b) => a + b, 0) + Object.values(received).reduce((a, b) => a + b, 0);
    return {
      name,
      strategy,
      imageSize: src.size,
      blockSize: bs,
      seconds: (tEnd - t0) / 1000,
      downtimeSeconds: paused ? (tEnd - tPause) / 1000 : 0,
      rounds,
      wire: { sent: { ...sent }, received: { ...received }, total },
      blocks: {
        total: map!.count,
        zero: map!.count - map!.dataBlocks,
        filledFromNeighbours: dest.neighbour,
        resumed: dest.resumed,
        sent: m.sentBlocks,
        copied: m.copiedBlocks,
        resent: m.resentBlocks,
        repaired: m.repairedBlocks,
      },
      verified: true,
    };
  } finally {
    src.close();
    socket.destroy();
    if (ownScanner) await scanner.close();
  }
}

/** The per-migration state: what the destination holds, block by block. */
class Migration {
  /** scan-v2 shim: the dense per-block columns this class was written for (see denseColumns). */
  private readonly dense: DenseColumns;
  /** What the destination holds (as far as this side knows): zero flag, fingerprint, signature. */
  private readonly atZero: Uint8Array;
  private readonly atFp: BigUint64Array;
  private readonly atSig: BigUint64Array;
  private readonly everSent: Uint8Array;
  /** Contents the destination holds: (fp, sig) -> a block that holds it there. */
  private readonly held = new BlockIndexTable();
  private readonly engine = new Engine({ initialBytes: DATA_BATCH + (8 << 20) });
  private readonly window = this.engine.alloc(DATA_BATCH);
  private readonly fps = this.engine.alloc((DATA_BATCH / 512) * 8);
  private readonly sigs = this.engine.alloc((DATA_BATCH / 512) * 8);
  private readonly flags = this.engine.alloc(DATA_BATCH / 512);
  private readonly digest = this.engine.alloc(DIGEST_BYTES);
  /** Extents (EXTENT_BLOCKS blocks each) that sendBlocks changed at the destination since the last clear. */
  readonly touched = new Set<number>();
  sentBlocks = 0;
  copiedBlocks = 0;
  resentBlocks = 0;
  repairedBlocks = 0;

  constructor(
    private readonly ch: Channel,
    private readonly src: FileImageSource,
    private readonly map: BlockMap,
    private readonly bs: number,
    private readonly ev: (phase: string, detail?: unknown) => void,
  ) {
    this.dense = denseColumns(map); // scan-v2 shim
    this.atZero = Uint8Array.from(this.dense.zero);
    this.atFp = BigUint64Array.from(this.dense.fingerprints);
    this.atSig = BigUint64Array.from(this.dense.signatures);
    this.everSent = new Uint8Array(map.count);
  }

  private len(b: number): number {
    return Math.min(this.bs, this.src.size - b * this.bs);
  }

  /** Phases 1 and 2: send every block's zero flag, fingerprint and signature; receive the intervals the destination lacks. */
  async exchangeFingerprints(): Promise<number[]> {
    const n = this.map.count;
    for (let first = 0; first < n; first += INFO_BATCH) {
      const count = Math.min(INFO_BATCH, n - first);
      // first u64 | count u32 | zero flag per block | (fp u64, sig u64) per non-zero block
      let nonZero = 0;
      for (let i = first; i < first + count; i++) if (!this.dense.zero[i]) nonZero++;
      const payload = Buffer.alloc(12 + count + 16 * nonZero);
      payload.writeBigUInt64LE(BigInt(first), 0);
      payload.writeUInt32LE(count, 8);
      payload.set(this.dense.zero.subarray(first, first + count), 12);
      let at = 12 + count;
      for (let i = first; i < first + count; i++) {
        if (this.dense.zero[i]) continue;
        payload.writeBigUInt64LE(this.dense.fingerprints[i]!, at);
        payload.writeBigUInt64LE(this.dense.signatures[i]!, at + 8);
        at += 16;
      }
      await this.ch.send(Msg.BLOCK_INFO, payload);
    }
    await this.ch.send(Msg.INFO_END);
    const need: number[] = [];
    const needSet = new Uint8Array(n);
    for (;;) {
      const r = new Reader((await this.ch.recv(Msg.NEED)).payload, 'NEED');
      const last = r.u8();
      const count = r.u32();
      for (let i = 0; i < count; i++) {
        const b = r.u64(), c = r.u32();
        if (b + c > n) throw new ProtocolError(ErrorCode.PROTOCOL, `NEED ${b}+${c} past the image's ${n} blocks`);
        for (let k = b; k < b + c; k++) { need.push(k); needSet[k] = 1; }
      }
      r.end();
      if (last) break;
    }
    // Everything non-zero the destination did not ask for, it holds.
    const entries: bigint[] = [];
    for (let b = 0; b < n; b++) {
      if (this.dense.zero[b] || needSet[b]) continue;
      entries.push(this.dense.fingerprints[b]!, this.dense.signatures[b]!, makeRef(0, b));
      if (entries.length >= 3 * 65536) { this.held.insertMany(BigUint64Array.from(entries)); entries.length = 0; }
    }
    if (entries.length) this.held.insertMany(BigUint64Array.from(entries));
    return need;
  }

  /**
   * Sends the given blocks as they are now: zero blocks as intervals, content
   * the destination already holds as copies, the rest as data, each block
   * with the fingerprint of the bytes read (the destination checks it).
   */
  async sendBlocks(blocks: number[]): Promise<void> {
    const per = Math.max(1, Math.floor(DATA_BATCH / this.bs));
    for (let i = 0; i < blocks.length; ) {
      // A run of consecutive blocks, at most `per` of them: one read.
      let j = i + 1;
      while (j < blocks.length && j - i < per && blocks[j] === blocks[j - 1]! + 1) j++;
      const first = blocks[i]!;
      const count = j - i;
      const off = first * this.bs;
      const len = Math.min(count * this.bs, this.src.size - off);
      this.src.readInto(this.engine.view(this.window, 0, len), off, len);
      this.engine.zeroFlagsAt(this.window.ptr, len, this.bs, this.flags.ptr);
      this.engine.fingerprintBlocksAt(this.window.ptr, len, this.bs, this.fps.ptr, this.sigs.ptr);
      const flags = this.engine.view(this.flags, 0, count);
      const fps = new BigUint64Array(this.engine.memory.buffer, this.fps.ptr, count).slice();
      const sigs = new BigUint64Array(this.engine.memory.buffer, this.sigs.ptr, count).slice();
      const zeros = new Writer();
      let zeroCount = 0;
      const copies = new Writer();
      let copyCount = 0;
      const dataIds: Array<[number, bigint, number]> = [];
      for (let k = 0; k < count; k++) {
        const b = first + k;
        this.touched.add(Math.floor(b / EXTENT_BLOCKS));
        if (flags[k]) {
          zeros.u64(b).u32(1);
          zeroCount++;
          this.setAt(b, true, 0n, 0n);
          continue;
        }
        const fp = fps[k]!, sig = sigs[k]!;
        const ref = this.held.lookup(fp, sig);
        if (ref !== undefined) {
          const hb = refBlock(ref);
          if (hb !== b && !this.atZero[hb] && this.atFp[hb] === fp && this.atSig[hb] === sig && this.len(hb) === this.len(b)) {
            copies.u64(b).u64(hb).bytes(u64le(fp));
            copyCount++;
            this.copiedBlocks++;
            this.setAt(b, false, fp, sig);
            continue;
          }
          if (hb === b && this.atFp[b] === fp && this.atSig[b] === sig && !this.atZero[b]) continue; // already there
        }
        dataIds.push([b, fp, k]);
        this.setAt(b, false, fp, sig);
        this.held.insert(fp, sig, makeRef(0, b));
      }
      if (zeroCount) await this.ch.send(Msg.ZERO, Buffer.concat([u32le(zeroCount), zeros.done()]));
      if (copyCount) await this.ch.send(Msg.COPY, Buffer.concat([u32le(copyCount), copies.done()]));
      if (dataIds.length) {
        const head = new Writer().u32(dataIds.length);
        for (const [b, fp] of dataIds) head.u64(b).bytes(u64le(fp));
        const parts = [head.done()];
        for (const [b, , k] of dataIds) {
          parts.push(Buffer.from(this.engine.view(this.window, k * this.bs, this.len(b)))); // a copy: the window is reused
          if (this.everSent[b]) this.resentBlocks++;
          this.everSent[b] = 1;
          this.sentBlocks++;
        }
        await this.ch.send(Msg.BLOCKS, Buffer.concat(parts));
      }
      i = j;
    }
  }

  private setAt(b: number, zero: boolean, fp: bigint, sig: bigint): void {
    this.atZero[b] = zero ? 1 : 0;
    this.atFp[b] = fp;
    this.atSig[b] = sig;
  }

  /** Blocks whose content changed since the destination got them (rescan rounds). */
  rescanDirty(map: BlockMap): number[] {
    const out: number[] = [];
    const now = denseColumns(map); // scan-v2 shim
    for (let b = 0; b < map.count; b++) {
      const z = now.zero[b]!;
      if (z !== this.atZero[b] || (!z && (now.fingerprints[b] !== this.atFp[b] || now.signatures[b] !== this.atSig[b]))) out.push(b);
    }
    return out;
  }

  /** A barrier: the destination has applied everything sent so far and saved its journal. */
  async sync(): Promise<void> {
    await this.ch.send(Msg.SYNC);
    await this.ch.recv(Msg.SYNC_OK);
  }

  /**
   * The end-to-end check of the given extents (default: all): SHA-1 of each
   * data extent (zero extents cost nothing). With repair (the image paused),
   * extents that differ are sent again and checked again; without (the image
   * still live, where a difference may just be a fresh write), it returns
   * the extents that differ.
   */
  async verify(which?: number[], repair = true): Promise<number[]> {
    const n = this.map.count;
    let extents = which ?? Array.from({ length: Math.ceil(n / EXTENT_BLOCKS) }, (_, e) => e);
    for (let attempt = 0; extents.length; attempt++) {
      if (attempt === VERIFY_ATTEMPTS) {
        throw new BlockferryError(ErrorCode.VERIFY_FAILED, `${extents.length} extents still differ after ${VERIFY_ATTEMPTS} repairs; the destination image is not complete`);
      }
      const bad: number[] = [];
      for (let i = 0; i < extents.length; ) {
        // Consecutive extents in one VERIFY frame.
        let j = i + 1;
        while (j < extents.length && j - i < VERIFY_BATCH && extents[j] === extents[j - 1]! + 1) j++;
        const w = new Writer().u32(extents[i]!).u32(EXTENT_BLOCKS).u32(j - i);
        for (let k = i; k < j; k++) w.bytes(this.extentDigest(extents[k]!));
        await this.ch.send(Msg.VERIFY, w.done());
        const r = new Reader((await this.ch.recv(Msg.VERIFY_RESULT)).payload, 'VERIFY_RESULT');
        const count = r.u32();
        for (let k = 0; k < count; k++) bad.push(r.u32());
        r.end();
        i = j;
      }
      if (!repair) return bad;
      if (bad.length) {
        this.ev('repair', { extents: bad.length });
        const blocks: number[] = [];
        for (const e of bad) for (let b = e * EXTENT_BLOCKS; b < Math.min(n, (e + 1) * EXTENT_BLOCKS); b++) blocks.push(b);
        // Forget what we thought the destination held there: send it all again.
        for (const b of blocks) { this.atZero[b] = 2; this.atFp[b] = 0n; }
        const before = this.sentBlocks;
        await this.sendBlocks(blocks);
        this.repairedBlocks += this.sentBlocks - before;
        await this.sync();
      }
      extents = bad;
    }
    return [];
  }

  /** kind byte 0 for an all-zero extent (no read), else 1 and the SHA-1 of its bytes. */
  private extentDigest(e: number): Buffer {
    const first = e * EXTENT_BLOCKS;
    const last = Math.min(this.map.count, first + EXTENT_BLOCKS);
    let allZero = true;
    for (let b = first; b < last && allZero; b++) if (this.atZero[b] !== 1) allZero = false;
    if (allZero) return Buffer.from([0]);
    const off = first * this.bs;
    const len = Math.min(EXTENT_BLOCKS * this.bs, this.src.size - off);
    const out = Buffer.alloc(1 + DIGEST_BYTES);
    out[0] = 1;
    if (len <= this.window.length) {
      // The usual case (extent <= 1 MiB): one read, SHA-1 by the engine's backend (SHA-NI when native).
      this.src.readInto(this.engine.view(this.window, 0, len), off, len);
      this.engine.sha1At(this.window.ptr, len, this.digest.ptr);
      out.set(this.engine.view(this.digest), 1);
    } else {
      const h = createHash('sha1');
      for (let at = 0; at < len; at += this.window.length) {
        const n = Math.min(this.window.length, len - at);
        this.src.readInto(this.engine.view(this.window, 0, n), off + at, n);
        h.update(this.engine.view(this.window, 0, n));
      }
      h.digest().copy(out, 1);
    }
    return out;
  }
}

// --- scan-v2 shim (TEMPORARY: goes when migrate.ts is rewritten on the compact map) ---
interface DenseColumns {
  zero: Uint8Array;
  fingerprints: BigUint64Array;
  signatures: BigUint64Array;
}

/** The dense per-block columns of the v1 block map, built from the compact one (zero blocks: flag 1, fp and sig 0). */
function denseColumns(map: BlockMap): DenseColumns {
  const zero = new Uint8Array(map.count).fill(1);
  const fingerprints = new BigUint64Array(map.count), signatures = new BigUint64Array(map.count);
  for (const run of map.runs()) {
    zero.fill(0, run.start, run.start + run.count);
    fingerprints.set(map.fingerprints.subarray(run.index, run.index + run.count), run.start);
    signatures.set(map.signatures.subarray(run.index, run.index + run.count), run.start);
  }
  return { zero, fingerprints, signatures };
}
// --- end of scan-v2 shim ---

function u64le(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
}

function u32le(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
}
