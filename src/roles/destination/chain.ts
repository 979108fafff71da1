// SnapMig at the destination (paper 000's VM_Construction): the layers of a
// chain arrive as ordinary migrations, each into its own image and from
// whichever sender the plan chose; a coordinator connection then says what
// the chain is (CHAIN_BEGIN, CHAIN_COMMIT). The destination keeps a progress
// log per chain (NAME.snapmig.json) so that an interrupted migration resumes
// whichever sender was interrupted (each layer's own partial image and
// journal resume as any migration does), checks every layer a backup server
// sent against the identity the source's chain gave (a backup server is not
// trusted with content), and writes the result through a LayerSink: the
// chain (one file per layer and a manifest) or the flattened image, raw or
// qcow2 as the destination writes images.
//
// The layers always arrive raw (NAME.Li.img, whatever --image-format says:
// isChainLayer routes them), and stay: they are what a resumed or repeated
// migration finds held. A qcow2 destination converts them at CHAIN_COMMIT
// into one qcow2 file per layer (qcow2ChainSink), each backed by the one
// below, in a staging directory first; the files then move to their final
// names base first and the top (NAME.qcow2, what a VM opens) last, so the
// top never names a chain that is not all there.
import { existsSync, fsyncSync, lstatSync, mkdirSync, openSync, closeSync, readFileSync, renameSync, rmSync, statSync, constants } from 'node:fs';
import { join } from 'node:path';
import { Qcow2ImageSink } from '../../image/qcow2-writer.js';
import type { OutputFormat } from './image-files.js';
import { BlockferryError, ErrorCode } from '../../errors.js';
import { writeFileAtomic } from '../../io/atomic.js';
import { FileImageSink, type ImageSink } from '../../image/sink.js';
import { FileImageSource } from '../../image/source.js';
import type { Scanner } from '../../scan/scanner.js';
import type { Channel } from '../../protocol/channel.js';
import type { Frame } from '../../protocol/frame.js';
import { Msg, msgName } from '../../protocol/frame.js';
import {
  CHAIN_BEGIN, CHAIN_BEGIN_OK, CHAIN_CHECK_ONLY, CHAIN_COMMIT, CHAIN_DONE, CHAIN_FLATTEN, CHAIN_OVERWRITE, LAYER_ABSENT, LAYER_CHECKED, LAYER_COMPLETE,
  VERDICT_MISMATCH, VERDICT_MISSING, VERDICT_OK, decode, type ChainBegin, type ChainCommit, type ChainDone, type ChainLayerCommit,
} from '../../protocol/messages.js';
import { ProtocolError } from '../../errors.js';
import { rawLayerDigest } from '../../snapmig/identity.js';
import { NAME_RE } from './partials.js';

/** The identity of a layer nobody checks (the source's own sends: its session verified them end to end). */
export const NO_IDENTITY = '0'.repeat(64);

/** One layer as the destination holds it, checked, ready to be written out. */
export interface ReceivedLayer {
  /** 0 = the base. */
  index: number;
  /** The raw image its sender migrated into (the layer's own bytes: zeros outside `covered`). */
  file: string;
  identity: string;
  bottom: boolean;
  size: number;
  covered: { offset: number; length: number }[];
}

/**
 * Where a checked chain goes. `add` is called once per layer, base first;
 * `finish` once after the last. The raw chain sink keeps the raw files and
 * writes a manifest; the qcow2 chain sink writes one qcow2 file per layer;
 * the flat sinks merge the layers into NAME.img or NAME.qcow2.
 */
export interface LayerSink {
  add(layer: ReceivedLayer): Promise<void>;
  /** Returns the files written (for the log). */
  finish(): Promise<string[]>;
}
export interface LayerSinkContext {
  dataDir: string;
  name: string;
  size: number;
  overwrite: boolean;
  /** Layers add() will be given. */
  layers: number;
  /** The destination's image format (serve --image-format). */
  format: OutputFormat;
  /** Files this chain wrote before (its progress log): replaced without --overwrite, they are its own. */
  owned: readonly string[];
  /** Records files as this chain's in its progress log, before they appear under those names. */
  claim(files: string[]): void;
}
export type LayerSinkFactory = (o: LayerSinkContext) => LayerSink;

const COPY_CHUNK = 4 << 20;
/** Compared against (memcmp), not walked byte by byte in JS: a chunk of zeros hides what lies below. */
const ZERO_CHUNK = Buffer.alloc(COPY_CHUNK);

/**
 * Writes what a layer covers into a sink: its bytes where it covers (zeros
 * included: they hide what lies below), nothing elsewhere. A bottom layer
 * covers everything, but only its file's data extents are read (holes are
 * zeros already in a fresh sink): cost follows the data.
 */
export async function copyCovered(layer: ReceivedLayer, sink: ImageSink, fresh: boolean): Promise<void> {
  const src = new FileImageSource(layer.file);
  try {
    const ranges = layer.bottom && fresh ? src.extents(0, src.size) : layer.covered;
    const buf = Buffer.allocUnsafe(COPY_CHUNK);
    for (const r of ranges) {
      for (let at = r.offset; at < r.offset + r.length; at += COPY_CHUNK) {
        const n = Math.min(COPY_CHUNK, r.offset + r.length - at, sink.size - at);
        if (n <= 0) break;
        src.readInto(buf, at, n);
        if (buf.subarray(0, n).equals(ZERO_CHUNK.subarray(0, n))) await sink.zero(at, n);
        else await sink.write(at, Buffer.from(buf.subarray(0, n)));
      }
    }
  } finally {
    src.close();
  }
}

/** The chain as received: one raw file per layer and NAME.chain.json naming them in order, with what each covers. */
export const chainSink: LayerSinkFactory = ({ dataDir, name, size }) => {
  const layers: (Omit<ReceivedLayer, 'file'> & { file: string; backing: string | null })[] = [];
  return {
    async add(l) {
      layers.push({ ...l, file: l.file.slice(dataDir.length + 1), backing: layers.length ? layers[layers.length - 1]!.file : null });
    },
    async finish() {
      const manifest = join(dataDir, `${name}.chain.json`);
      writeFileAtomic(manifest, [Buffer.from(JSON.stringify({ version: 1, name, size, format: 'raw', layers }, null, 1))], 'chain manifest');
      return [...layers.map((l) => l.file), `${name}.chain.json`];
    },
  };
};

/**
 * The chain merged into one image, NAME.img or (a qcow2 destination)
 * NAME.qcow2 without a backing file: what a VM started without its
 * snapshots needs. A name is one image: the other format's file is replaced
 * too (with --overwrite).
 */
export const flatSink: LayerSinkFactory = ({ dataDir, name, size, overwrite, format, owned, claim }) => {
  const file = `${name}${format === 'qcow2' ? '.qcow2' : '.img'}`;
  const other = `${name}${format === 'qcow2' ? '.img' : '.qcow2'}`;
  refuseExisting(dataDir, name, [file, other], overwrite, owned);
  const final = join(dataDir, file);
  let sink: ImageSink | undefined;
  let first = true;
  return {
    async add(l) {
      sink ??= format === 'qcow2' ? await Qcow2ImageSink.create(final, { size }) : await FileImageSink.create(`${final}.partial`, final, size);
      await copyCovered(l, sink, first);
      first = false;
    },
    async finish() {
      if (!sink) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, 'a chain without layers');
      claim([file]);
      await sink.commit();
      rmSync(join(dataDir, other), { force: true });
      return [file];
    },
  };
};

/** The qcow2 files of a chain of n layers, base first: NAME.L0.qcow2 … NAME.L(n-2).qcow2, and the top NAME.qcow2. */
export function qcow2ChainFiles(name: string, n: number): string[] {
  return Array.from({ length: n }, (_, i) => i === n - 1 ? `${name}.qcow2` : `${name}.L${i}.qcow2`);
}

/** IMAGE_EXISTS for a file that is there and neither this chain's own (its progress log) nor to be overwritten. */
function refuseExisting(dataDir: string, name: string, files: string[], overwrite: boolean, owned: readonly string[]): void {
  const there = files.filter((f) => existsSync(join(dataDir, f)) && !owned.includes(f));
  if (there.length && !overwrite) throw new BlockferryError(ErrorCode.IMAGE_EXISTS, `${name} exists at the destination (${there.join(', ')}; migrate with --overwrite to replace it)`);
}

/**
 * The chain as qcow2, one file per layer (qcow2ChainFiles): the base
 * without a backing file, each later layer backed by the one below (its
 * file name, relative, format qcow2), each holding only the clusters its
 * layer holds: unallocated elsewhere (the layer below shows through), a zero
 * cluster where the layer holds zeros (they hide what lies below). Written
 * in NAME.chain.partial/ under their final names (so that each layer's
 * backing name resolves while it is written), then moved into the data
 * directory base first, the top last. A crash before the moves leaves the
 * staging directory, cleared by the next commit; a crash during them
 * leaves lower layers under their final names, which the progress log
 * already claims as this chain's (the next commit replaces them) and which
 * no top names: a top from before is removed before the first move.
 */
export const qcow2ChainSink: LayerSinkFactory = ({ dataDir, name, size, overwrite, layers, owned, claim }) => {
  const files = qcow2ChainFiles(name, layers);
  refuseExisting(dataDir, name, [...files, `${name}.img`], overwrite, owned);
  const staging = join(dataDir, `${name}.chain.partial`);
  const st = (() => { try { return lstatSync(staging); } catch { return undefined; } })();
  if (st && !st.isDirectory()) throw new BlockferryError(ErrorCode.UNSAFE_PATH, `${staging} is not a directory; refusing to use it`);
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(staging, { mode: 0o700 });
  const written: string[] = [];
  return {
    async add(l) {
      const file = files[written.length];
      if (!file) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `chain ${name}: more than ${layers} layers`);
      const below = written[written.length - 1];
      const sink = await Qcow2ImageSink.create(join(staging, file), { size, ...(below ? { backing: { path: below, format: 'qcow2' as const } } : {}) });
      try {
        await copyCovered(l, sink, !below);
        await sink.commit();
      } catch (e) {
        await sink.close().catch(() => {});
        throw e;
      }
      written.push(file);
    },
    async finish() {
      if (written.length !== files.length) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `chain ${name}: ${written.length} of ${layers} layers written`);
      claim(files);
      // A top there already (this chain's earlier commit, or overwritten) goes first: until the new top is in, no top
      // names a chain whose lower layers are half replaced.
      rmSync(join(dataDir, files[files.length - 1]!), { force: true });
      syncDir(dataDir);
      for (const f of files) renameSync(join(staging, f), join(dataDir, f)); // base first, the top last
      syncDir(dataDir);
      rmSync(join(dataDir, `${name}.img`), { force: true }); // a name is one image (claimed or overwritten)
      rmSync(staging, { recursive: true, force: true });
      writeFileAtomic(join(dataDir, `${name}.chain.json`), [Buffer.from(JSON.stringify({ version: 1, name, size, format: 'qcow2', layers: files.map((file, i) => ({ file, backing: i ? files[i - 1] : null })) }, null, 1))], 'chain manifest');
      return [...files, `${name}.chain.json`];
    },
  };
};

function syncDir(dir: string): void {
  const fd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try { fsyncSync(fd); } finally { closeSync(fd); }
}

/** The sinks by output kind, each for raw or qcow2 as the destination writes images. */
export const LAYER_SINKS: { chain: LayerSinkFactory; flat: LayerSinkFactory } = {
  chain: (o) => o.format === 'qcow2' ? qcow2ChainSink(o) : chainSink(o),
  flat: flatSink,
};

/** The chain a layer image name belongs to (NAME.Li or NAME.Li-j), if any. */
const chainOf = (image: string): string | undefined => /^(.+)\.L\d+(?:-\d+)?$/.exec(image)?.[1];

/**
 * Whether an image a BEGIN names is a layer of a chain in progress here (its
 * chain's progress log lists it): such a layer is received raw whatever the
 * destination's image format, for the chain handler to read.
 */
export function isChainLayer(dataDir: string, image: string): boolean {
  const chain = chainOf(image);
  if (!chain || !NAME_RE.test(chain)) return false;
  return !!loadProgress(dataDir, chain)?.layers.some((l) => l.image === image);
}

interface Progress {
  version: 1;
  name: string;
  /** Per layer: its image, identity, and whether it was checked (and against which identity). */
  layers: { image: string; identity: string; checked: boolean }[];
  written?: string[];
  /** Output files this chain wrote or is writing (replaced by its next commit without --overwrite). */
  owned?: string[];
}

export interface ChainHost {
  dataDir: string;
  scanner: Scanner;
  /** Whether a migration into this image name is running now (its image is not complete). */
  busy(image: string): boolean;
  log(line: string): void;
  /** What the chain is written as (default raw). */
  format?: OutputFormat;
}

function checkName(name: string, what: string): void {
  if (!NAME_RE.test(name) || name.includes('..')) throw new BlockferryError(ErrorCode.NAME_INVALID, `${what} ${JSON.stringify(name.slice(0, 140))} is not a plain file name`);
}

/** A coordinator's connection: CHAIN_BEGIN and CHAIN_COMMIT requests, in any order, until it closes. */
export async function serveChain(ch: Channel, first: Frame, host: ChainHost): Promise<void> {
  for (let f: Frame | undefined = first; ; f = undefined) {
    if (!f) {
      f = await ch.nextOrEnd();
      if (!f) return;
    }
    if (f.id === 0 || (f.type !== Msg.CHAIN_BEGIN && f.type !== Msg.CHAIN_COMMIT)) {
      throw new ProtocolError(ErrorCode.PROTOCOL, `a chain connection carries CHAIN_BEGIN and CHAIN_COMMIT requests, not ${msgName(f.type)}${f.id === 0 ? ' without a request id' : ''}`);
    }
    if (f.type === Msg.CHAIN_BEGIN) await ch.reply(f, CHAIN_BEGIN_OK, chainBegin(decode(CHAIN_BEGIN, f.payload), host));
    else await ch.reply(f, CHAIN_DONE, await chainCommit(decode(CHAIN_COMMIT, f.payload), host));
  }
}

const progressFile = (dir: string, name: string) => join(dir, `${name}.snapmig.json`);

function loadProgress(dir: string, name: string): Progress | undefined {
  const file = progressFile(dir, name);
  if (!existsSync(file)) return undefined;
  try {
    const p = JSON.parse(readFileSync(file, 'utf8')) as Progress;
    return p.version === 1 && p.name === name && Array.isArray(p.layers) ? p : undefined;
  } catch {
    return undefined; // damaged: nothing is trusted from it
  }
}

function saveProgress(dir: string, p: Progress): void {
  writeFileAtomic(progressFile(dir, p.name), [Buffer.from(JSON.stringify(p))], 'SnapMig progress log');
}

/** Which layers are here already: checked (by this log), complete (committed, not yet checked), or absent. */
export function chainBegin(m: ChainBegin, host: ChainHost): number[] {
  checkName(m.name, 'chain name');
  m.layers.forEach((l) => checkName(l.image, 'layer image name'));
  const old = loadProgress(host.dataDir, m.name);
  const states = m.layers.map((l) => {
    const img = join(host.dataDir, `${l.image}.img`);
    if (host.busy(l.image) || !existsSync(img)) return LAYER_ABSENT;
    const was = old?.layers.find((x) => x.image === l.image);
    if (was && was.identity !== l.identity) return LAYER_ABSENT; // another layer once had this name
    return was?.checked ? LAYER_CHECKED : LAYER_COMPLETE;
  });
  const layers = m.layers.map((l) => {
    const was = old?.layers.find((x) => x.image === l.image && x.identity === l.identity);
    return { image: l.image, identity: l.identity, checked: !!was?.checked };
  });
  saveProgress(host.dataDir, { version: 1, name: m.name, layers, ...(old?.owned ? { owned: old.owned } : {}) });
  host.log(`chain ${m.name}: ${m.layers.length} layers planned, ${states.filter((s) => s !== LAYER_ABSENT).length} here already`);
  return states;
}

/** Checks every layer (identity where a backup server sent it), then writes the chain or the flattened image. */
export async function chainCommit(m: ChainCommit, host: ChainHost, sinks = LAYER_SINKS): Promise<ChainDone> {
  checkName(m.name, 'chain name');
  m.layers.forEach((l) => checkName(l.image, 'layer image name'));
  const progress = loadProgress(host.dataDir, m.name) ?? { version: 1 as const, name: m.name, layers: [] };
  const verdicts: number[] = [];
  for (const l of m.layers) verdicts.push(await checkLayer(l, host, progress));
  saveProgress(host.dataDir, progress);
  if (verdicts.some((v) => v !== VERDICT_OK)) {
    host.log(`chain ${m.name}: not written, layers ${verdicts.map((v, i) => v === VERDICT_OK ? '' : `${i}:${v === VERDICT_MISMATCH ? 'mismatch' : 'missing'}`).filter(Boolean).join(' ')}`);
    return { verdicts, written: false };
  }
  if (m.flags & CHAIN_CHECK_ONLY) return { verdicts, written: false };
  const claim = (files: string[]) => {
    progress.owned = [...new Set([...(progress.owned ?? []), ...files])];
    saveProgress(host.dataDir, progress);
  };
  const sink = (m.flags & CHAIN_FLATTEN ? sinks.flat : sinks.chain)({
    dataDir: host.dataDir, name: m.name, size: m.size, overwrite: !!(m.flags & CHAIN_OVERWRITE), layers: m.layers.length, format: host.format ?? 'raw', owned: progress.owned ?? [], claim,
  });
  for (const [index, l] of m.layers.entries()) {
    await sink.add({ index, file: join(host.dataDir, `${l.image}.img`), identity: l.identity, bottom: l.bottom, size: l.size, covered: l.covered });
  }
  progress.written = await sink.finish();
  saveProgress(host.dataDir, progress);
  host.log(`chain ${m.name}: written (${progress.written.join(', ')})`);
  return { verdicts, written: true };
}

async function checkLayer(l: ChainLayerCommit, host: ChainHost, progress: Progress): Promise<number> {
  const img = join(host.dataDir, `${l.image}.img`);
  if (host.busy(l.image) || !existsSync(img) || statSync(img).size !== l.size) return VERDICT_MISSING;
  let rec = progress.layers.find((x) => x.image === l.image);
  if (!rec || rec.identity !== l.identity) {
    progress.layers = progress.layers.filter((x) => x.image !== l.image);
    rec = { image: l.image, identity: l.identity, checked: false };
    progress.layers.push(rec);
  }
  if (!l.check || rec.checked) return VERDICT_OK;
  const digest = await rawLayerDigest(img, l, host.scanner);
  if (digest === l.identity) {
    rec.checked = true;
    return VERDICT_OK;
  }
  // Not the layer the source's chain has: it is removed, and its sender's word is worth nothing (the source sends it again).
  host.log(`layer ${l.image}: content is not layer ${l.identity.slice(0, 16)}… (got ${digest.slice(0, 16)}…); removed`);
  rmSync(img, { force: true });
  return VERDICT_MISMATCH;
}
