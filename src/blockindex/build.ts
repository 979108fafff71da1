// A block index (a neighbourhood) of images on disk: their block maps
// (loaded or scanned), added in order.
import { BlockferryError, ErrorCode } from '../errors.js';
import { mapsOfImages, type ImagesOptions } from '../scan/maps.js';
import { Neighbourhood } from './neighbourhood.js';

export interface IndexOptions extends Omit<ImagesOptions, 'blockSize'> {
  /** Block size of a new index (default 4096). */
  blockSize?: number;
  /** Add to this index instead of a new one (its block size is used). */
  into?: Neighbourhood;
}

/** The index with the images added; nothing is written (Neighbourhood.save does). Takes `signal` and `onProgress`. */
export async function buildIndex(paths: readonly string[], options: IndexOptions = {}): Promise<Neighbourhood> {
  const { into, blockSize, ...rest } = options;
  if (into && blockSize !== undefined && blockSize !== into.blockSize) {
    throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `the index has ${into.blockSize}-byte blocks, not ${blockSize}`);
  }
  const n = into ?? new Neighbourhood(blockSize ?? 4096);
  for (const r of await mapsOfImages(paths, { ...rest, blockSize: n.blockSize })) n.add(r.maps[0]!);
  return n;
}
