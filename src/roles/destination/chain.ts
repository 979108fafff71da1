// SnapMig at the destination (paper 000's VM_Construction): the layers of a
// chain arrive as ordinary migrations, each into its own image and from
// whichever sender the plan chose; a coordinator connection then says what
// the chain is (CHAIN_BEGIN, CHAIN_COMMIT). The destination keeps a progress
// log per chain (NAME.snapmig.json) so that an interrupted migration resumes
// whichever sender was interrupted (each layer's own partial image and
// journal resume as any migration does), checks every layer a backup server
// sent against the identity the source's chain gave (a backup server is not
// trusted with content), and writes the result through a LayerSink: the
// chain (one file per layer and a manifest) or the flattened image.
import { existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
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
 * `finish` once after the last. The chain sink keeps the raw files and writes
 * a manifest; the flat sink merges the layers into NAME.img.
 *
 * With a qcow2 writer (an ImageSink that writes qcow2 with a backing file),
 * the chain sink becomes: per layer, `Qcow2ImageSink.create(NAME.L<i>.qcow2,
 * { size, backing: the previous layer's file })`, then `copyCovered(layer,
 * sink, false)` and `sink.commit()`: the one function LAYER_SINKS.chain.
 */
export interface LayerSink {
  add(layer: ReceivedLayer): Promise<void>;
  /** Returns the files written (for the log). */
  finish(): Promise<string[]>;
}
export type LayerSinkFactory = (o: { dataDir: string; name: string; size: number; overwrite: boolean }) => LayerSink;

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

/** The chain merged into one raw image, NAME.img (what a VM started without its snapshots needs). */
export const flatSink: LayerSinkFactory = ({ dataDir, name, size, overwrite }) => {
  const final = join(dataDir, `${name}.img`);
  if (existsSync(final) && !overwrite) throw new BlockferryError(ErrorCode.IMAGE_EXISTS, `${name} exists at the destination (migrate with --overwrite to replace it)`);
  let sink: FileImageSink | undefined;
  let first = true;
  return {
    async add(l) {
      sink ??= await FileImageSink.create(`${final}.partial`, final, size);
      await copyCovered(l, sink, first);
      first = false;
    },
    async finish() {
      if (!sink) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, 'a chain without layers');
      await sink.commit();
      return [`${name}.img`];
    },
  };
};

/** The sinks by output kind: the lead plugs the qcow2 writer in here (LAYER_SINKS.chain). */
export const LAYER_SINKS: { chain: LayerSinkFactory; flat: LayerSinkFactory } = { chain: chainSink, flat: flatSink };

interface Progress {
  version: 1;
  name: string;
  /** Per layer: its image, identity, and whether it was checked (and against which identity). */
  layers: { image: string; identity: string; checked: boolean }[];
  written?: string[];
}

export interface ChainHost {
  dataDir: string;
  scanner: Scanner;
  /** Whether a migration into this image name is running now (its image is not complete). */
  busy(image: string): boolean;
  log(line: string): void;
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
  saveProgress(host.dataDir, { version: 1, name: m.name, layers });
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
  const sink = (m.flags & CHAIN_FLATTEN ? sinks.flat : sinks.chain)({ dataDir: host.dataDir, name: m.name, size: m.size, overwrite: !!(m.flags & CHAIN_OVERWRITE) });
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
