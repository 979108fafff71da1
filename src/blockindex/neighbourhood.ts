import { resolve } from 'node:path';
import { BlockMap } from '../blockmap/blockmap.js';
import { FileFormat, TRAILER_BYTES } from '../io/format.js';
import { checkBlockSize } from '../engine/engine.js';
import { InvalidArgumentError } from '../errors.js';
import type { ImageIdentity } from '../image/source.js';
import { BlockIndexTable, MAX_IMAGE_ID, NO_REF, makeRef, refBlock, refImage } from '../table/table.js';

/** Entries per insert batch: 64 Ki (1.5 MiB). */
const INSERT_BATCH = 1 << 16;

/** File layout: docs/FORMATS.md, "Block index file". */
export const NEIGHBOURHOOD_MAGIC = Buffer.from('BFNBHOOD', 'latin1');
export const NEIGHBOURHOOD_VERSION = 1;
const HEADER = 32;
const FORMAT = new FileFormat('BFNBHOOD', NEIGHBOURHOOD_VERSION, HEADER, 'block index file');
/** A sane bound for the image list: refuse a header that claims more before parsing it. */
const MAX_LIST_BYTES = 64 << 20;

export interface NeighbourImage {
  id: number;
  path: string;
  identity: ImageIdentity;
  blocks: number;
  /** Non-zero blocks this image added to the index (contents not already held). */
  added: number;
  /** How its blocks are read: through the qcow2 reader, or (absent) as a raw file. */
  format?: 'qcow2';
}

export interface BlockLocation {
  image: NeighbourImage;
  block: number;
}

/**
 * The destination's neighbourhood: one block index over many images at one
 * block size, with the list of images its references point into. A hit says
 * "image X holds this content at block N"; the caller reads that block and
 * checks it (the index can be stale, the image can change).
 */
export class Neighbourhood {
  readonly blockSize: number;
  readonly table: BlockIndexTable;
  private readonly list: NeighbourImage[] = [];

  constructor(blockSize: number, table = new BlockIndexTable()) {
    checkBlockSize(blockSize);
    this.blockSize = blockSize;
    this.table = table;
  }

  get images(): readonly NeighbourImage[] {
    return this.list;
  }

  /** Adds the non-zero blocks of a map (of an image read as `format`); returns the image's entry. An image already listed (same path) is refused. */
  add(map: BlockMap, format: 'raw' | 'qcow2' = 'raw'): NeighbourImage {
    if (map.blockSize !== this.blockSize) throw new InvalidArgumentError('map', `a block map at ${this.blockSize}-byte blocks`, map.blockSize);
    const path = resolve(map.imagePath);
    if (this.list.some((i) => i.path === path)) throw new InvalidArgumentError('image', 'an image not yet in the index', path);
    const id = this.list.length;
    if (id > MAX_IMAGE_ID) throw new InvalidArgumentError('images', `at most ${MAX_IMAGE_ID + 1} images`, id + 1);
    const before = this.table.size;
    // Straight from the map's columns into the index, a batch at a time (the
    // first block of each content wins): no second table of the image.
    this.table.reserve(map.dataBlocks);
    const batch = new BigUint64Array(3 * Math.min(INSERT_BATCH, map.dataBlocks));
    let m = 0;
    for (const run of map.runs()) {
      for (let j = 0; j < run.count; j++) {
        batch[3 * m] = map.fingerprints[run.index + j]!;
        batch[3 * m + 1] = map.signatures[run.index + j]!;
        batch[3 * m + 2] = makeRef(id, run.start + j);
        if (++m === INSERT_BATCH) { this.table.insertMany(batch); m = 0; }
      }
    }
    if (m) this.table.insertMany(batch.subarray(0, 3 * m));
    const entry: NeighbourImage = { id, path, identity: map.identity, blocks: map.count, added: this.table.size - before, ...(format === 'qcow2' ? { format } : {}) };
    this.list.push(entry);
    return entry;
  }

  lookup(fp: bigint, sig: bigint): BlockLocation | undefined {
    const ref = this.table.lookup(fp, sig);
    if (ref === undefined) return undefined;
    return { image: this.list[refImage(ref)]!, block: refBlock(ref) };
  }

  /** References for many blocks at once (NO_REF for a miss); see refImage/refBlock. */
  lookupColumns(fps: BigUint64Array, sigs: BigUint64Array): BigUint64Array {
    return this.table.lookupColumns(fps, sigs);
  }

  imageOf(ref: bigint): NeighbourImage | undefined {
    return ref === NO_REF ? undefined : this.list[refImage(ref)];
  }

  /** Writes the index atomically (temporary file, fsync, rename). */
  save(file: string): void {
    const list = Buffer.from(JSON.stringify({ images: this.list }), 'utf8');
    const table = this.table.serializedView(); // written at once: no copy of the table
    const header = FORMAT.header();
    header.writeUInt32LE(this.blockSize, 12);
    header.writeUInt32LE(list.length, 16);
    header.writeBigUInt64LE(BigInt(table.length), 24);
    FORMAT.write(file, [header, list, table]);
  }

  static load(file: string): Neighbourhood {
    const b = FORMAT.open(FORMAT.read(file));
    const blockSize = b.readUInt32LE(12);
    const listBytes = b.readUInt32LE(16);
    const tableBytes = b.readBigUInt64LE(24);
    if (listBytes > MAX_LIST_BYTES) throw FORMAT.corrupt(`image list of ${listBytes} bytes`);
    FORMAT.checkLength(b, BigInt(HEADER + listBytes + TRAILER_BYTES) + tableBytes);
    FORMAT.checkChecksum(b);
    const end = b.length - TRAILER_BYTES;
    let images: NeighbourImage[];
    try {
      images = (JSON.parse(b.subarray(HEADER, HEADER + listBytes).toString('utf8')) as { images: NeighbourImage[] }).images;
      if (!Array.isArray(images) || images.some((im, i) => im.id !== i || typeof im.path !== 'string')) throw new Error('bad image list');
    } catch (cause) {
      throw FORMAT.corrupt(`unreadable image list (${(cause as Error).message})`);
    }
    try {
      checkBlockSize(blockSize);
    } catch {
      throw FORMAT.corrupt(`invalid block size ${blockSize}`);
    }
    const table = BlockIndexTable.deserialize(b.subarray(HEADER + listBytes, end));
    const n = new Neighbourhood(blockSize, table);
    n.list.push(...images);
    return n;
  }

  info(): { blockSize: number; images: readonly NeighbourImage[]; entries: number; bytesPerEntry: number; memoryBytes: number } {
    const s = this.table.stats();
    return { blockSize: this.blockSize, images: this.list, entries: s.entries, bytesPerEntry: s.bytesPerEntry, memoryBytes: s.memoryBytes };
  }
}
