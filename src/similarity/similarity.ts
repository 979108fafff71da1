import { BlockMap } from '../blockmap/blockmap.js';
import { NO_REF, refBlock } from '../table/table.js';
import { InvalidArgumentError } from '../errors.js';

export interface SimilarityImage {
  path: string;
  size: number;
  nonZeroBlocks: number;
  distinctBlocks: number;
}

/**
 * The similarity matrix of seed paper 001 (Table 3) at one block size.
 * similarity[b][t] = percentage of target t's non-zero blocks whose content
 * (fingerprint and signature) occurs anywhere in base b. bytesToSend[b][t] =
 * bytes a deduplicating transfer of t must still send when the destination
 * holds b: each distinct non-zero content of t that b lacks, once, at its
 * real length. Zero blocks cost nothing (they travel as intervals).
 */
export interface SimilarityMatrix {
  blockSize: number;
  images: SimilarityImage[];
  /** Rows are bases, columns targets; the diagonal is 100. */
  similarity: number[][];
  bytesToSend: number[][];
  /** Per base: the mean similarity over the other images (the paper's "average" column). */
  average: number[];
}

interface Distinct {
  fps: BigUint64Array;
  sigs: BigUint64Array;
  /** How many non-zero blocks of the image carry each distinct content. */
  weight: Uint32Array;
  length: Uint32Array;
}

/** The distinct non-zero contents of a map, with their multiplicity. */
function distinct(map: BlockMap): Distinct {
  const table = map.distinctTable();
  const n = table.size;
  const fps = new BigUint64Array(n), sigs = new BigUint64Array(n), weight = new Uint32Array(n), length = new Uint32Array(n);
  // Where each distinct content lands: look every column up in its own table
  // (the first block wins, so a content's first column is where it is new).
  const firsts = table.lookupColumns(map.fingerprints, map.signatures);
  const slot = new Map<number, number>();
  for (let k = 0; k < firsts.length; k++) {
    const first = refBlock(firsts[k]!);
    let s = slot.get(first);
    if (s === undefined) {
      s = slot.size;
      slot.set(first, s);
      fps[s] = map.fingerprints[k]!;
      sigs[s] = map.signatures[k]!;
      length[s] = map.blockLength(first);
    }
    weight[s]!++;
  }
  return { fps, sigs, weight, length };
}

export function similarityMatrix(maps: BlockMap[]): SimilarityMatrix {
  if (maps.length === 0) throw new InvalidArgumentError('maps', 'at least one block map', 0);
  const blockSize = maps[0]!.blockSize;
  for (const m of maps) {
    if (m.blockSize !== blockSize) throw new InvalidArgumentError('maps', `block maps of one block size (${blockSize})`, m.blockSize);
  }
  const d = maps.map(distinct);
  const images = maps.map((m, i) => ({
    path: m.imagePath,
    size: m.imageSize,
    nonZeroBlocks: d[i]!.weight.reduce((a, b) => a + b, 0),
    distinctBlocks: d[i]!.fps.length,
  }));
  const k = maps.length;
  const similarity = Array.from({ length: k }, () => new Array<number>(k).fill(100));
  const bytesToSend = Array.from({ length: k }, () => new Array<number>(k).fill(0));
  for (let b = 0; b < k; b++) {
    const table = maps[b]!.distinctTable();
    for (let t = 0; t < k; t++) {
      if (t === b) continue;
      const dt = d[t]!;
      const refs = table.lookupColumns(dt.fps, dt.sigs);
      let found = 0, missing = 0;
      for (let i = 0; i < refs.length; i++) {
        if (refs[i] !== NO_REF) found += dt.weight[i]!;
        else missing += dt.length[i]!;
      }
      similarity[b]![t] = images[t]!.nonZeroBlocks ? (100 * found) / images[t]!.nonZeroBlocks : 100;
      bytesToSend[b]![t] = missing;
    }
  }
  const average = similarity.map((row, b) => (k === 1 ? 100 : row.reduce((s, v, t) => (t === b ? s : s + v), 0) / (k - 1)));
  return { blockSize, images, similarity, bytesToSend, average };
}
