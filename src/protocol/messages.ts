// Every message of the protocol: its type, what kind of traffic it is, and
// its byte layout, encoded and decoded here and nowhere else. Every role
// (source, destination, and those to come) speaks through this table.
// docs/PROTOCOL.md describes the same layouts in prose; the conformance
// tests hold the two together.
import { ErrorCode, ProtocolError } from '../errors.js';
import type { Interval } from '../blocks/intervals.js';
import { Msg, Reader, Writer, type MsgType } from './frame.js';

export const PROTOCOL_VERSION = 2;
export const PROTOCOL_MAGIC = Buffer.from('BFRY', 'latin1');
export const NONCE_BYTES = 32;
export const PROOF_BYTES = 32;
export { DIGEST_BYTES } from '../engine/engine.js';
import { DIGEST_BYTES } from '../engine/engine.js';

/** What a frame carries, for the accounting every migration reports. */
export type TrafficKind = 'control' | 'fingerprints' | 'data' | 'verify';
export type Traffic = Record<TrafficKind, number>;

/** Bytes of every kind together. */
export function trafficTotal(t: Traffic): number {
  return t.control + t.fingerprints + t.data + t.verify;
}

export interface MessageDef<T> {
  readonly type: MsgType;
  readonly name: string;
  readonly kind: TrafficKind;
  encode(m: T, w: Writer): void;
  /** Decodes a whole payload; anything malformed (short, long, out of range) is a ProtocolError. */
  decode(r: Reader): T;
  /** The encoded size, when cheap to know: the payload is then built in one allocation. */
  size?(m: T): number;
}

function def<T>(type: MsgType, name: string, kind: TrafficKind, encode: (m: T, w: Writer) => void, decode: (r: Reader) => T, size?: (m: T) => number): MessageDef<T> {
  return size ? { type, name, kind, encode, decode, size } : { type, name, kind, encode, decode };
}

/** Bytes a message takes when encoded. */
export function encode<T>(d: MessageDef<T>, m: T): Buffer {
  const w = new Writer(d.size?.(m) ?? 256);
  d.encode(m, w);
  return w.done();
}

/** Decodes a payload as message d, requiring that nothing is left over. */
export function decode<T>(d: MessageDef<T>, payload: Buffer): T {
  const r = new Reader(payload, d.name);
  const m = d.decode(r);
  r.end();
  return m;
}

/** A count read from the wire, checked against what the rest of the payload can hold (no allocation on a lie). */
function counted(r: Reader, bytesEach: number, what: string): number {
  const n = r.u32();
  if (n * bytesEach > r.remaining) throw new ProtocolError(ErrorCode.PROTOCOL, `${what}: ${n} entries do not fit in ${r.remaining} bytes`);
  return n;
}

function writeIntervals(w: Writer, list: readonly Interval[]): void {
  w.u32(list.length);
  for (const iv of list) w.u64(iv.start).u32(iv.count);
}

function readIntervals(r: Reader, what: string): Interval[] {
  const n = counted(r, 12, what);
  const out: Interval[] = new Array(n);
  for (let i = 0; i < n; i++) {
    const start = r.u64(), count = r.u32();
    if (count === 0) throw new ProtocolError(ErrorCode.PROTOCOL, `${what}: an empty interval`);
    out[i] = { start, count };
  }
  return out;
}

/** n u64 values, copied into an aligned array. */
function readColumn(r: Reader, n: number): BigUint64Array {
  const bytes = r.bytes(8 * n);
  const out = new BigUint64Array(n);
  new Uint8Array(out.buffer).set(bytes);
  return out;
}

function writeColumn(w: Writer, col: BigUint64Array): void {
  w.bytes(new Uint8Array(col.buffer, col.byteOffset, col.byteLength));
}

const empty = def<void>(0 as MsgType, '', 'control', () => {}, () => undefined);
const emptyOf = (type: MsgType, name: string): MessageDef<void> => ({ ...empty, type, name });

// --- Handshake -------------------------------------------------------------

export interface Hello { version: number; flags: number; capabilities: number; nonce: Buffer }
export const HELLO = def<Hello>(Msg.HELLO, 'HELLO', 'control',
  (m, w) => w.bytes(PROTOCOL_MAGIC).u16(m.version).u16(m.flags).u32(m.capabilities).bytes(m.nonce),
  (r) => {
    if (!r.bytes(4).equals(PROTOCOL_MAGIC)) throw new ProtocolError(ErrorCode.PROTOCOL, 'not a blockferry client (bad magic)');
    return { version: r.u16(), flags: r.u16(), capabilities: r.u32(), nonce: r.bytes(NONCE_BYTES) };
  });

export interface HelloAck { version: number; flags: number; capabilities: number; nonce: Buffer; proof: Buffer }
export const HELLO_ACK = def<HelloAck>(Msg.HELLO_ACK, 'HELLO_ACK', 'control',
  (m, w) => w.u16(m.version).u16(m.flags).u32(m.capabilities).bytes(m.nonce).bytes(m.proof),
  (r) => ({ version: r.u16(), flags: r.u16(), capabilities: r.u32(), nonce: r.bytes(NONCE_BYTES), proof: r.bytes(PROOF_BYTES) }));

export const AUTH = def<{ proof: Buffer }>(Msg.AUTH, 'AUTH', 'control', (m, w) => w.bytes(m.proof), (r) => ({ proof: r.bytes(PROOF_BYTES) }));
export const READY = emptyOf(Msg.READY, 'READY');

export interface ErrorMessage { code: string; message: string }
export const ERROR = def<ErrorMessage>(Msg.ERROR, 'ERROR', 'control',
  (m, w) => w.str(m.code.slice(0, 64)).str(m.message.slice(0, 1000)),
  (r) => ({ code: r.str(), message: r.str() }));

// --- A migration ------------------------------------------------------------

/** BEGIN flags. */
export const BEGIN_OVERWRITE = 1;
const BEGIN_KNOWN = BEGIN_OVERWRITE;
/** Fill sources a source may ask the destination to consult (BEGIN's fills mask); roles/fills.ts implements them. */
export const FILL_NEIGHBOURS = 1;
/** The destination's base-image repository (`serve --repository`), asked with FETCH. */
export const FILL_REPOSITORY = 2;
/** Scatter-gather: SG_PLACE names, per run, where each block's content is staged; the destination gathers it from there (GATHER). */
export const FILL_SCATTER = 4;

export interface Begin {
  name: string;
  size: number;
  blockSize: number;
  flags: number;
  /** Where the destination may find blocks before asking for them (FILL_* bits). */
  fills: number;
  /** The strategy's name, for the destination's log. */
  strategy: string;
}
export const BEGIN = def<Begin>(Msg.BEGIN, 'BEGIN', 'control',
  (m, w) => w.str(m.name).u64(m.size).u32(m.blockSize).u32(m.flags).u32(m.fills).str(m.strategy),
  (r) => {
    const m = { name: r.str(), size: r.u64(), blockSize: r.u32(), flags: r.u32(), fills: r.u32(), strategy: r.str() };
    if (m.flags & ~BEGIN_KNOWN) throw new ProtocolError(ErrorCode.PROTOCOL, `BEGIN: unknown flags 0x${m.flags.toString(16)}`);
    return m;
  });

/** `switched`: the destination already took over this image (a post-copy to resume: no pre-copy phase, straight to SWITCH). */
export interface BeginOk { resumed: boolean; keptBlocks: number; switched: boolean }
export const BEGIN_OK = def<BeginOk>(Msg.BEGIN_OK, 'BEGIN_OK', 'control',
  (m, w) => w.u8((m.resumed ? 1 : 0) | (m.switched ? 2 : 0)).u64(m.keptBlocks),
  (r) => {
    const f = r.u8();
    if (f & ~3) throw new ProtocolError(ErrorCode.PROTOCOL, `BEGIN_OK: unknown flags 0x${f.toString(16)}`);
    return { resumed: (f & 1) !== 0, switched: (f & 2) !== 0, keptBlocks: r.u64() };
  });

/**
 * One run of non-zero blocks with their fingerprints and signatures. Blocks
 * that no BLOCK_INFO covers are zero: holes and zero runs cost nothing here.
 */
export interface BlockInfo { start: number; count: number; fingerprints: BigUint64Array; signatures: BigUint64Array }
/** Largest BLOCK_INFO run (1 MiB of fingerprints and signatures): bounded work per frame. */
export const MAX_INFO_BLOCKS = 65536;
export const BLOCK_INFO = def<BlockInfo>(Msg.BLOCK_INFO, 'BLOCK_INFO', 'fingerprints',
  (m, w) => { w.u64(m.start).u32(m.count); writeColumn(w, m.fingerprints); writeColumn(w, m.signatures); },
  (r) => {
    const start = r.u64();
    const count = counted(r, 16, 'BLOCK_INFO');
    if (count === 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'BLOCK_INFO: an empty run');
    if (count > MAX_INFO_BLOCKS) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCK_INFO: a run of ${count} blocks (at most ${MAX_INFO_BLOCKS} a frame)`);
    return { start, count, fingerprints: readColumn(r, count), signatures: readColumn(r, count) };
  },
  (m) => 12 + 16 * m.count);

export const INFO_END = emptyOf(Msg.INFO_END, 'INFO_END');

/** The blocks of one BLOCK_INFO run the destination still lacks; `last` answers INFO_END. */
export interface Need { start: number; count: number; last: boolean; missing: Interval[] }
export const NEED = def<Need>(Msg.NEED, 'NEED', 'control',
  (m, w) => { w.u64(m.start).u32(m.count).u8(m.last ? 1 : 0); writeIntervals(w, m.missing); },
  (r) => ({ start: r.u64(), count: r.u32(), last: r.u8() === 1, missing: readIntervals(r, 'NEED') }),
  (m) => 17 + 12 * m.missing.length);

/**
 * Block contents: runs of blocks, a fingerprint per block (the destination
 * checks each block against it before writing), then the bytes in order,
 * each block min(block size, image size − block × block size) long.
 */
export interface Blocks { runs: Interval[]; fingerprints: BigUint64Array; data: Buffer }
export const BLOCKS = def<Blocks>(Msg.BLOCKS, 'BLOCKS', 'data',
  (m, w) => { writeIntervals(w, m.runs); writeColumn(w, m.fingerprints); w.bytes(m.data); },
  (r) => {
    const runs = readIntervals(r, 'BLOCKS');
    const n = runs.reduce((a, iv) => a + iv.count, 0);
    if (8 * n > r.remaining) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCKS: ${n} fingerprints do not fit`);
    const fingerprints = readColumn(r, n);
    return { runs, fingerprints, data: r.bytes(r.remaining) };
  },
  (m) => 4 + 12 * m.runs.length + 8 * m.fingerprints.length + m.data.length);

/** Copies at the destination of content this migration already put there: dst ← src, checked against fp. */
export interface Copy { dst: number; src: number; fingerprint: bigint }
export const COPY = def<Copy[]>(Msg.COPY, 'COPY', 'data',
  (m, w) => { w.u32(m.length); for (const c of m) w.u64(c.dst).u64(c.src).big(c.fingerprint); },
  (r) => {
    const n = counted(r, 24, 'COPY');
    const out: Copy[] = new Array(n);
    for (let i = 0; i < n; i++) out[i] = { dst: r.u64(), src: r.u64(), fingerprint: r.big() };
    return out;
  },
  (m) => 4 + 24 * m.length);

/**
 * Re-sent blocks as deltas against what the destination holds (CAP_DELTA):
 * per block its number, the fingerprint of the result and the length of its
 * code (protocol/delta.ts), then the codes in order. The destination reads
 * the block, applies the code, and writes the result only when it has the
 * fingerprint (a wrong base is caught there, like a COPY's wrong source).
 */
export interface DeltaEntry { block: number; fingerprint: bigint; length: number }
export interface BlocksDelta { entries: DeltaEntry[]; codes: Buffer }
export const BLOCKS_DELTA = def<BlocksDelta>(Msg.BLOCKS_DELTA, 'BLOCKS_DELTA', 'data',
  (m, w) => { w.u32(m.entries.length); for (const e of m.entries) w.u64(e.block).big(e.fingerprint).u32(e.length); w.bytes(m.codes); },
  (r) => {
    const n = counted(r, 20, 'BLOCKS_DELTA');
    const entries: DeltaEntry[] = new Array(n);
    let total = 0;
    for (let i = 0; i < n; i++) {
      entries[i] = { block: r.u64(), fingerprint: r.big(), length: r.u32() };
      total += entries[i]!.length;
    }
    if (total !== r.remaining) throw new ProtocolError(ErrorCode.PROTOCOL, `BLOCKS_DELTA: codes of ${total} bytes declared, ${r.remaining} present`);
    return { entries, codes: r.bytes(r.remaining) };
  },
  (m) => 4 + 20 * m.entries.length + m.codes.length);

/** Intervals that must read as zeros. */
export const ZERO = def<Interval[]>(Msg.ZERO, 'ZERO', 'data', (m, w) => writeIntervals(w, m), (r) => readIntervals(r, 'ZERO'), (m) => 4 + 12 * m.length);

export const ROUND = def<{ round: number }>(Msg.ROUND, 'ROUND', 'control', (m, w) => w.u32(m.round), (r) => ({ round: r.u32() }));

/** VERIFY entry kinds. */
export const EXTENT_ZERO = 0;
export const EXTENT_DATA = 1;
/** An extent of the end-to-end check: a zero interval (any length), or data with the SHA-1 of its bytes. */
export interface VerifyExtent { start: number; count: number; digest?: Uint8Array }
/** Most extents one VERIFY may list (the source sends 4096): bounded work per frame. */
export const MAX_VERIFY_EXTENTS = 65536;
export const VERIFY = def<VerifyExtent[]>(Msg.VERIFY, 'VERIFY', 'verify',
  (m, w) => {
    w.u32(m.length);
    for (const x of m) {
      w.u64(x.start).u32(x.count).u8(x.digest ? EXTENT_DATA : EXTENT_ZERO);
      if (x.digest) w.bytes(x.digest);
    }
  },
  (r) => {
    const n = counted(r, 13, 'VERIFY');
    if (n > MAX_VERIFY_EXTENTS) throw new ProtocolError(ErrorCode.PROTOCOL, `VERIFY: ${n} extents (at most ${MAX_VERIFY_EXTENTS} a frame)`);
    const out: VerifyExtent[] = new Array(n);
    for (let i = 0; i < n; i++) {
      const start = r.u64(), count = r.u32(), kind = r.u8();
      if (count === 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'VERIFY: an empty extent');
      if (kind === EXTENT_DATA) out[i] = { start, count, digest: r.bytes(DIGEST_BYTES) };
      else if (kind === EXTENT_ZERO) out[i] = { start, count };
      else throw new ProtocolError(ErrorCode.PROTOCOL, `VERIFY: unknown extent kind ${kind}`);
    }
    return out;
  });

/** The indexes (into the VERIFY's list) of the extents that differ. */
export const VERIFY_RESULT = def<number[]>(Msg.VERIFY_RESULT, 'VERIFY_RESULT', 'verify',
  (m, w) => { w.u32(m.length); for (const i of m) w.u32(i); },
  (r) => {
    const n = counted(r, 4, 'VERIFY_RESULT');
    const out: number[] = new Array(n);
    for (let i = 0; i < n; i++) out[i] = r.u32();
    return out;
  });

export const COMMIT = emptyOf(Msg.COMMIT, 'COMMIT');

export interface Done { neighbour: number; resumed: number; received: number; copied: number; zeroed: number; repository: number }
export const DONE = def<Done>(Msg.DONE, 'DONE', 'control',
  (m, w) => w.u64(m.neighbour).u64(m.resumed).u64(m.received).u64(m.copied).u64(m.zeroed).u64(m.repository),
  (r) => ({ neighbour: r.u64(), resumed: r.u64(), received: r.u64(), copied: r.u64(), zeroed: r.u64(), repository: r.u64() }));

export const SYNC = emptyOf(Msg.SYNC, 'SYNC');
export const SYNC_OK = emptyOf(Msg.SYNC_OK, 'SYNC_OK');

// --- Post-copy ---------------------------------------------------------------

/** Blocks whose content at the destination is not (or no longer) the source's: sent before SWITCH, any number of frames. */
export const MISSING = def<Interval[]>(Msg.MISSING, 'MISSING', 'control', (m, w) => writeIntervals(w, m), (r) => readIntervals(r, 'MISSING'), (m) => 4 + 12 * m.length);
/** The source is paused: the destination takes over (a request; SWITCH_OK once it serves the image). */
export const SWITCH = emptyOf(Msg.SWITCH, 'SWITCH');
/** Blocks the source need not push: the destination holds them already (a resumed post-copy) or its clients wrote them. */
export const SWITCH_OK = def<Interval[]>(Msg.SWITCH_OK, 'SWITCH_OK', 'control', (m, w) => writeIntervals(w, m), (r) => readIntervals(r, 'SWITCH_OK'), (m) => 4 + 12 * m.length);
/** Destination to source: a reader waits for these blocks; send them before anything else. */
export const PULL = def<Interval[]>(Msg.PULL, 'PULL', 'control', (m, w) => writeIntervals(w, m), (r) => readIntervals(r, 'PULL'), (m) => 4 + 12 * m.length);
/** Destination to source: its clients wrote these blocks; they are the destination's now and are never pushed. */
export const OWNED = def<Interval[]>(Msg.OWNED, 'OWNED', 'control', (m, w) => writeIntervals(w, m), (r) => readIntervals(r, 'OWNED'), (m) => 4 + 12 * m.length);
/** A request answered as soon as the destination reaches it: the source's window on pushed data (demand reads wait behind at most a window). */
export const PROBE = emptyOf(Msg.PROBE, 'PROBE');
export const PROBE_OK = emptyOf(Msg.PROBE_OK, 'PROBE_OK');

// --- A base-image repository ------------------------------------------------

/** Most blocks, and most bytes of block data, one FETCH may ask for: bounded work and memory per request at the repository. */
export const MAX_FETCH_BLOCKS = 256;
export const MAX_FETCH_BYTES = 1 << 20;

/**
 * Destination to repository: blocks wanted by content, at a block size (the
 * repository's index must be at that size), as columns of fingerprints and
 * signatures. The reply is FETCH_RESULT with the request's id.
 */
export interface Fetch { blockSize: number; fingerprints: BigUint64Array; signatures: BigUint64Array }
export const FETCH = def<Fetch>(Msg.FETCH, 'FETCH', 'fingerprints',
  (m, w) => { w.u32(m.blockSize).u32(m.fingerprints.length); writeColumn(w, m.fingerprints); writeColumn(w, m.signatures); },
  (r) => {
    const blockSize = r.u32();
    const n = counted(r, 16, 'FETCH');
    if (n === 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'FETCH: no blocks asked for');
    if (n > MAX_FETCH_BLOCKS) throw new ProtocolError(ErrorCode.PROTOCOL, `FETCH: ${n} blocks (at most ${MAX_FETCH_BLOCKS} a request)`);
    return { blockSize, fingerprints: readColumn(r, n), signatures: readColumn(r, n) };
  },
  (m) => 8 + 16 * m.fingerprints.length);

/**
 * Repository to destination: per block asked for, in order, the length of
 * its content (0: not held), then the contents in order. Nothing in it is
 * trusted: the destination checks every block against the fingerprint and
 * signature the source sent before writing it.
 */
export interface FetchResult { lengths: number[]; data: Buffer }
export const FETCH_RESULT = def<FetchResult>(Msg.FETCH_RESULT, 'FETCH_RESULT', 'data',
  (m, w) => { w.u32(m.lengths.length); for (const l of m.lengths) w.u32(l); w.bytes(m.data); },
  (r) => {
    const n = counted(r, 4, 'FETCH_RESULT');
    if (n > MAX_FETCH_BLOCKS) throw new ProtocolError(ErrorCode.PROTOCOL, `FETCH_RESULT: ${n} entries (at most ${MAX_FETCH_BLOCKS})`);
    const lengths: number[] = new Array(n);
    let total = 0;
    for (let i = 0; i < n; i++) total += lengths[i] = r.u32();
    if (total > MAX_FETCH_BYTES) throw new ProtocolError(ErrorCode.PROTOCOL, `FETCH_RESULT: ${total} bytes of blocks (at most ${MAX_FETCH_BYTES})`);
    if (total !== r.remaining) throw new ProtocolError(ErrorCode.PROTOCOL, `FETCH_RESULT: ${total} bytes declared, ${r.remaining} present`);
    return { lengths, data: r.bytes(total) };
  },
  (m) => 4 + 4 * m.lengths.length + m.data.length);

// --- SnapMig (paper 000) ----------------------------------------------------

/** Bytes of a layer identity (SHA-256; src/snapmig/identity.ts). */
export const LAYER_ID_BYTES = 32;
/** Most stacks a backup server lists in one LAYERS_RESULT. */
export const MAX_LAYERS_LISTED = 4096;
/** Most layers of a chain (MAX_CHAIN_DEPTH of the qcow2 reader). */
export const MAX_CHAIN_LAYERS = 64;
/** Longest HOST:PORT a SEND_LAYER names. */
export const MAX_TARGET_BYTES = 255;

function layerId(r: Reader, what: string): string {
  if (r.remaining < LAYER_ID_BYTES) throw new ProtocolError(ErrorCode.PROTOCOL, `${what}: a layer identity needs ${LAYER_ID_BYTES} bytes`);
  return r.bytes(LAYER_ID_BYTES).toString('hex');
}
function writeLayerId(w: Writer, id: string): void {
  const b = Buffer.from(id, 'hex');
  if (b.length !== LAYER_ID_BYTES) throw new ProtocolError(ErrorCode.PROTOCOL, `a layer identity is ${LAYER_ID_BYTES} bytes of hex, not ${JSON.stringify(id.slice(0, 80))}`);
  w.bytes(b);
}
function boundedStr(r: Reader, max: number, what: string): string {
  const s = r.str();
  if (Buffer.byteLength(s) > max || s.length === 0) throw new ProtocolError(ErrorCode.PROTOCOL, `${what}: ${Buffer.byteLength(s)} bytes (1 to ${max})`);
  return s;
}
function chainCount(r: Reader, bytesEach: number, what: string): number {
  const n = counted(r, bytesEach, what);
  if (n < 1 || n > MAX_CHAIN_LAYERS) throw new ProtocolError(ErrorCode.PROTOCOL, `${what}: ${n} layers (1 to ${MAX_CHAIN_LAYERS})`);
  return n;
}

/** Coordinator to backup server: what do you hold? (a request, empty). */
export const LAYERS = emptyOf(Msg.LAYERS, 'LAYERS');

/** One stack a backup server holds: the top `depth` layers of one of its files, merged, by identity. */
export interface HeldLayer { identity: string; depth: number; dataBytes: number; size: number }
export const LAYERS_RESULT = def<HeldLayer[]>(Msg.LAYERS_RESULT, 'LAYERS_RESULT', 'control',
  (m, w) => { w.u32(m.length); for (const l of m) { writeLayerId(w, l.identity); w.u8(l.depth).u64(l.dataBytes).u64(l.size); } },
  (r) => {
    const n = counted(r, LAYER_ID_BYTES + 17, 'LAYERS_RESULT');
    if (n > MAX_LAYERS_LISTED) throw new ProtocolError(ErrorCode.PROTOCOL, `LAYERS_RESULT: ${n} stacks (at most ${MAX_LAYERS_LISTED})`);
    const out: HeldLayer[] = [];
    for (let i = 0; i < n; i++) {
      const identity = layerId(r, 'LAYERS_RESULT'), depth = r.u8(), dataBytes = r.u64(), size = r.u64();
      if (depth < 1 || depth > MAX_CHAIN_LAYERS) throw new ProtocolError(ErrorCode.PROTOCOL, `LAYERS_RESULT: depth ${depth} (1 to ${MAX_CHAIN_LAYERS})`);
      if (dataBytes > size) throw new ProtocolError(ErrorCode.PROTOCOL, `LAYERS_RESULT: ${dataBytes} data bytes in a layer of ${size}`);
      out.push({ identity, depth, dataBytes, size });
    }
    return out;
  },
  (m) => 4 + (LAYER_ID_BYTES + 17) * m.length);

/** SEND_LAYER flag: replace a complete image of that name at the destination. */
export const SEND_OVERWRITE = 1;
/** Coordinator to backup server: send the stack of this identity to a destination, under a name (a request; SEND_LAYER_RESULT when the destination committed it). */
export interface SendLayer { identity: string; to: string; name: string; flags: number }
export const SEND_LAYER = def<SendLayer>(Msg.SEND_LAYER, 'SEND_LAYER', 'control',
  (m, w) => { writeLayerId(w, m.identity); w.str(m.to).str(m.name).u32(m.flags); },
  (r) => {
    const identity = layerId(r, 'SEND_LAYER');
    const to = boundedStr(r, MAX_TARGET_BYTES, 'SEND_LAYER target');
    const name = boundedStr(r, 128, 'SEND_LAYER name');
    const flags = r.u32();
    if (flags & ~SEND_OVERWRITE) throw new ProtocolError(ErrorCode.PROTOCOL, `SEND_LAYER: unknown flags 0x${flags.toString(16)}`);
    return { identity, to, name, flags };
  });

/** Backup server to coordinator: the layer is at the destination, committed; what it cost the server. */
export interface SendLayerResult { blocksSent: number; wireBytes: number; milliseconds: number }
export const SEND_LAYER_RESULT = def<SendLayerResult>(Msg.SEND_LAYER_RESULT, 'SEND_LAYER_RESULT', 'control',
  (m, w) => w.u64(m.blocksSent).u64(m.wireBytes).u32(m.milliseconds),
  (r) => ({ blocksSent: r.u64(), wireBytes: r.u64(), milliseconds: r.u32() }), () => 20);

/** A layer of a chain as the destination stores it: the image its sender migrated into, and the identity it must have (all zeros: none to check). */
export interface ChainEntry { image: string; identity: string }
/** Coordinator to destination, first message of a connection: the chain about to arrive; the answer says which layers it holds already (its progress log). */
export interface ChainBegin { name: string; layers: ChainEntry[] }
export const CHAIN_BEGIN = def<ChainBegin>(Msg.CHAIN_BEGIN, 'CHAIN_BEGIN', 'control',
  (m, w) => { w.str(m.name).u32(m.layers.length); for (const l of m.layers) { w.str(l.image); writeLayerId(w, l.identity); } },
  (r) => {
    const name = boundedStr(r, 128, 'CHAIN_BEGIN name');
    const n = chainCount(r, 2 + 1 + LAYER_ID_BYTES, 'CHAIN_BEGIN');
    const layers: ChainEntry[] = [];
    for (let i = 0; i < n; i++) layers.push({ image: boundedStr(r, 128, 'CHAIN_BEGIN image'), identity: layerId(r, 'CHAIN_BEGIN') });
    return { name, layers };
  });

/** Per layer of a CHAIN_BEGIN: 0 not held, 1 held and complete (committed by its sender), 2 complete and checked. */
export const LAYER_ABSENT = 0, LAYER_COMPLETE = 1, LAYER_CHECKED = 2;
export const CHAIN_BEGIN_OK = def<number[]>(Msg.CHAIN_BEGIN_OK, 'CHAIN_BEGIN_OK', 'control',
  (m, w) => { w.u32(m.length); for (const s of m) w.u8(s); },
  (r) => {
    const n = chainCount(r, 1, 'CHAIN_BEGIN_OK');
    const out: number[] = [];
    for (let i = 0; i < n; i++) {
      const s = r.u8();
      if (s > LAYER_CHECKED) throw new ProtocolError(ErrorCode.PROTOCOL, `CHAIN_BEGIN_OK: layer state ${s}`);
      out.push(s);
    }
    return out;
  });

/** CHAIN_COMMIT flags: write the flattened image (NAME.img) instead of the chain; replace an existing NAME.img. */
export const CHAIN_FLATTEN = 1;
export const CHAIN_OVERWRITE = 2;
/** CHAIN_COMMIT flag: check the layers (and record it in the progress log) but write nothing yet: done before a live cutover, so the downtime holds no checks. */
export const CHAIN_CHECK_ONLY = 4;
/** One layer at commit: its image, the identity the destination checks it against (check: it came from a backup server), and the guest ranges it covers. */
export interface ChainLayerCommit { image: string; identity: string; check: boolean; bottom: boolean; size: number; covered: Interval64[] }
/** A byte range as u64 offset and u64 length (guest bytes, not blocks: a layer covers whole clusters). */
export interface Interval64 { offset: number; length: number }
export interface ChainCommit { name: string; size: number; flags: number; layers: ChainLayerCommit[] }
export const CHAIN_COMMIT = def<ChainCommit>(Msg.CHAIN_COMMIT, 'CHAIN_COMMIT', 'control',
  (m, w) => {
    w.str(m.name).u64(m.size).u32(m.flags).u32(m.layers.length);
    for (const l of m.layers) {
      w.str(l.image); writeLayerId(w, l.identity);
      w.u8((l.check ? 1 : 0) | (l.bottom ? 2 : 0)).u64(l.size).u32(l.covered.length);
      for (const e of l.covered) w.u64(e.offset).u64(e.length);
    }
  },
  (r) => {
    const name = boundedStr(r, 128, 'CHAIN_COMMIT name');
    const size = r.u64(), flags = r.u32();
    if (flags & ~(CHAIN_FLATTEN | CHAIN_OVERWRITE | CHAIN_CHECK_ONLY)) throw new ProtocolError(ErrorCode.PROTOCOL, `CHAIN_COMMIT: unknown flags 0x${flags.toString(16)}`);
    const n = chainCount(r, 2 + 1 + LAYER_ID_BYTES + 13, 'CHAIN_COMMIT');
    const layers: ChainLayerCommit[] = [];
    for (let i = 0; i < n; i++) {
      const image = boundedStr(r, 128, 'CHAIN_COMMIT image'), identity = layerId(r, 'CHAIN_COMMIT');
      const f = r.u8();
      if (f & ~3) throw new ProtocolError(ErrorCode.PROTOCOL, `CHAIN_COMMIT: layer flags 0x${f.toString(16)}`);
      const lsize = r.u64();
      const m = counted(r, 16, 'CHAIN_COMMIT covered');
      const covered: Interval64[] = [];
      let end = 0;
      for (let k = 0; k < m; k++) {
        const offset = r.u64(), length = r.u64();
        if (length === 0 || offset < end || offset + length > lsize) throw new ProtocolError(ErrorCode.PROTOCOL, `CHAIN_COMMIT: covered range ${offset}+${length} (sorted, disjoint, non-empty, inside ${lsize} bytes)`);
        end = offset + length;
        covered.push({ offset, length });
      }
      layers.push({ image, identity, check: !!(f & 1), bottom: !!(f & 2), size: lsize, covered });
    }
    return { name, size, flags, layers };
  });

/** Per layer: 0 as committed, 1 its content is not the identity (re-send it from the source), 2 not there. */
export const VERDICT_OK = 0, VERDICT_MISMATCH = 1, VERDICT_MISSING = 2;
export interface ChainDone { verdicts: number[]; written: boolean }
export const CHAIN_DONE = def<ChainDone>(Msg.CHAIN_DONE, 'CHAIN_DONE', 'control',
  (m, w) => { w.u32(m.verdicts.length); for (const v of m.verdicts) w.u8(v); w.u8(m.written ? 1 : 0); },
  (r) => {
    const n = chainCount(r, 1, 'CHAIN_DONE');
    const verdicts: number[] = [];
    for (let i = 0; i < n; i++) {
      const v = r.u8();
      if (v > VERDICT_MISSING) throw new ProtocolError(ErrorCode.PROTOCOL, `CHAIN_DONE: verdict ${v}`);
      verdicts.push(v);
    }
    const written = r.u8();
    if (written > 1) throw new ProtocolError(ErrorCode.PROTOCOL, `CHAIN_DONE: written ${written}`);
    return { verdicts, written: written === 1 };
  });

// --- Scatter-gather (CAP_SCATTER) --------------------------------------------

/** Most blocks, and most bytes of block data, one STASH or GATHER carries: bounded work and memory per request at the store. */
export const MAX_STASH_BLOCKS = 256;
export const MAX_STASH_BYTES = 1 << 20;
/** STASH_OK statuses, per block. */
export const STASH_STORED = 0;
export const STASH_HELD = 1;
export const STASH_FULL = 2;
export const STASH_BAD = 3;
/** Most peers one SG_PLACE may name, and the longest address. */
export const MAX_SG_PEERS = 16;
export const MAX_SG_ADDRESS = 255;
/** SG_PLACE holder values that are not peer indexes: the destination's own stage, and nobody (ask the source). */
export const HOLDER_STAGE = 0xfe;
export const HOLDER_SOURCE = 0xff;

/**
 * Source to a store (an intermediary, or a destination's stage): blocks by
 * content. Per block its SHA-1 and length, then the contents in order. No
 * block may be empty; none longer than MAX_STASH_BYTES. An empty STASH asks
 * only for the free capacity. Reply: STASH_OK with the request's id.
 */
export interface Stash { digests: Buffer; lengths: number[]; data: Buffer }
export const STASH = def<Stash>(Msg.STASH, 'STASH', 'data',
  (m, w) => { w.u32(m.lengths.length); for (let i = 0; i < m.lengths.length; i++) w.bytes(m.digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES)).u32(m.lengths[i]!); w.bytes(m.data); },
  (r) => {
    const n = counted(r, DIGEST_BYTES + 4, 'STASH');
    if (n > MAX_STASH_BLOCKS) throw new ProtocolError(ErrorCode.PROTOCOL, `STASH: ${n} blocks (at most ${MAX_STASH_BLOCKS} a request)`);
    const digests = Buffer.allocUnsafe(n * DIGEST_BYTES);
    const lengths: number[] = new Array(n);
    let total = 0;
    for (let i = 0; i < n; i++) {
      r.bytes(DIGEST_BYTES).copy(digests, i * DIGEST_BYTES);
      const len = r.u32();
      if (len === 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'STASH: an empty block');
      total += lengths[i] = len;
      if (total > MAX_STASH_BYTES) throw new ProtocolError(ErrorCode.PROTOCOL, `STASH: more than ${MAX_STASH_BYTES} bytes of blocks`);
    }
    if (total !== r.remaining) throw new ProtocolError(ErrorCode.PROTOCOL, `STASH: ${total} bytes declared, ${r.remaining} present`);
    return { digests, lengths, data: r.bytes(total) };
  },
  (m) => 4 + (DIGEST_BYTES + 4) * m.lengths.length + m.data.length);

/** Store to source: per block a status (STASH_STORED, _HELD, _FULL, _BAD), then the bytes it can still take. */
export interface StashOk { status: number[]; free: number }
export const STASH_OK = def<StashOk>(Msg.STASH_OK, 'STASH_OK', 'control',
  (m, w) => { w.u32(m.status.length); for (const s of m.status) w.u8(s); w.u64(m.free); },
  (r) => {
    const n = counted(r, 1, 'STASH_OK');
    if (n > MAX_STASH_BLOCKS) throw new ProtocolError(ErrorCode.PROTOCOL, `STASH_OK: ${n} entries (at most ${MAX_STASH_BLOCKS})`);
    const status: number[] = new Array(n);
    for (let i = 0; i < n; i++) {
      const s = r.u8();
      if (s > STASH_BAD) throw new ProtocolError(ErrorCode.PROTOCOL, `STASH_OK: unknown status ${s}`);
      status[i] = s;
    }
    return { status, free: r.u64() };
  },
  (m) => 12 + m.status.length);

/** Destination to a store: blocks wanted by SHA-1. Reply: GATHER_RESULT with the request's id. */
export const GATHER = def<Buffer>(Msg.GATHER, 'GATHER', 'control',
  (m, w) => { w.u32(m.length / DIGEST_BYTES).bytes(m); },
  (r) => {
    const n = counted(r, DIGEST_BYTES, 'GATHER');
    if (n === 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'GATHER: no blocks asked for');
    if (n > MAX_STASH_BLOCKS) throw new ProtocolError(ErrorCode.PROTOCOL, `GATHER: ${n} blocks (at most ${MAX_STASH_BLOCKS} a request)`);
    return Buffer.from(r.bytes(n * DIGEST_BYTES));
  },
  (m) => 4 + m.length);

/**
 * Store to destination: per block asked for, in order, the length of its
 * content (0: not held), then the contents. Trusted for nothing: the
 * destination checks each block's SHA-1 and the source's fingerprint and
 * signature before writing it.
 */
export const GATHER_RESULT = def<FetchResult>(Msg.GATHER_RESULT, 'GATHER_RESULT', 'data',
  (m, w) => { w.u32(m.lengths.length); for (const l of m.lengths) w.u32(l); w.bytes(m.data); },
  (r) => {
    const n = counted(r, 4, 'GATHER_RESULT');
    if (n > MAX_STASH_BLOCKS) throw new ProtocolError(ErrorCode.PROTOCOL, `GATHER_RESULT: ${n} entries (at most ${MAX_STASH_BLOCKS})`);
    const lengths: number[] = new Array(n);
    let total = 0;
    for (let i = 0; i < n; i++) total += lengths[i] = r.u32();
    if (total > MAX_STASH_BYTES) throw new ProtocolError(ErrorCode.PROTOCOL, `GATHER_RESULT: ${total} bytes of blocks (at most ${MAX_STASH_BYTES})`);
    if (total !== r.remaining) throw new ProtocolError(ErrorCode.PROTOCOL, `GATHER_RESULT: ${total} bytes declared, ${r.remaining} present`);
    return { lengths, data: r.bytes(total) };
  },
  (m) => 4 + 4 * m.lengths.length + m.data.length);

/**
 * Source to destination, in a migration's info phase, right before the
 * BLOCK_INFO of the same run: where each block's content is staged. The
 * peers (store addresses, HOST:PORT), then per block its SHA-1 and a holder:
 * a peer's index, HOLDER_STAGE (the destination's own stage) or
 * HOLDER_SOURCE (nowhere: the destination asks the source, as always).
 */
export interface SgPlace { start: number; count: number; peers: string[]; digests: Buffer; holders: Uint8Array }
export const SG_PLACE = def<SgPlace>(Msg.SG_PLACE, 'SG_PLACE', 'fingerprints',
  (m, w) => {
    w.u64(m.start).u32(m.count).u8(m.peers.length);
    for (const p of m.peers) w.str(p);
    w.bytes(m.digests).bytes(m.holders);
  },
  (r) => {
    const start = r.u64();
    const count = r.u32();
    if (count === 0) throw new ProtocolError(ErrorCode.PROTOCOL, 'SG_PLACE: an empty run');
    if (count > MAX_INFO_BLOCKS) throw new ProtocolError(ErrorCode.PROTOCOL, `SG_PLACE: a run of ${count} blocks (at most ${MAX_INFO_BLOCKS} a frame)`);
    const np = r.u8();
    if (np > MAX_SG_PEERS) throw new ProtocolError(ErrorCode.PROTOCOL, `SG_PLACE: ${np} peers (at most ${MAX_SG_PEERS})`);
    const peers: string[] = [];
    for (let i = 0; i < np; i++) {
      const p = r.str();
      if (p.length === 0 || p.length > MAX_SG_ADDRESS || !/^[A-Za-z0-9.:[\]_-]+$/.test(p)) throw new ProtocolError(ErrorCode.PROTOCOL, 'SG_PLACE: a peer address that is not HOST:PORT');
      peers.push(p);
    }
    if (count * (DIGEST_BYTES + 1) !== r.remaining) throw new ProtocolError(ErrorCode.PROTOCOL, `SG_PLACE: ${count} blocks need ${count * (DIGEST_BYTES + 1)} bytes, ${r.remaining} present`);
    const digests = Buffer.from(r.bytes(count * DIGEST_BYTES));
    const holders = new Uint8Array(r.bytes(count));
    for (const h of holders) if (h >= np && h !== HOLDER_STAGE && h !== HOLDER_SOURCE) throw new ProtocolError(ErrorCode.PROTOCOL, `SG_PLACE: holder ${h} of ${np} peers`);
    return { start, count, peers, digests, holders };
  },
  (m) => 13 + m.peers.reduce((a, p) => a + 2 + Buffer.byteLength(p), 0) + m.count * (DIGEST_BYTES + 1));

/** Every message by type. */
export const MESSAGES: ReadonlyMap<number, MessageDef<unknown>> = new Map(
  [HELLO, HELLO_ACK, AUTH, READY, ERROR, BEGIN, BEGIN_OK, BLOCK_INFO, INFO_END, NEED, BLOCKS, COPY, ZERO, ROUND, VERIFY, VERIFY_RESULT, COMMIT, DONE, SYNC, SYNC_OK, BLOCKS_DELTA,
    MISSING, SWITCH, SWITCH_OK, PULL, OWNED, PROBE, PROBE_OK, FETCH, FETCH_RESULT, STASH, STASH_OK, GATHER, GATHER_RESULT, SG_PLACE,
    LAYERS, LAYERS_RESULT, SEND_LAYER, SEND_LAYER_RESULT, CHAIN_BEGIN, CHAIN_BEGIN_OK, CHAIN_COMMIT, CHAIN_DONE]
    .map((d) => [d.type, d as MessageDef<unknown>]),
);

export function kindOf(type: number): TrafficKind {
  return MESSAGES.get(type)?.kind ?? 'control';
}
