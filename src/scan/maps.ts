// Block maps of several images for one call (similarity, index building):
// one scanner for all of them, closed at the end whatever happens, and one
// progress stream and one signal across the images.
import { checkAborted } from '../errors.js';
import { Scanner, blockMapsFor, type MapOptions, type MapResult } from './scanner.js';

export interface ImagesOptions extends MapOptions {
  /** A scanner to use (kept open); default: one made for this call and closed after it. */
  scanner?: Scanner;
  /** Worker threads of the scanner made for this call (default: one per core). */
  workers?: number;
}

/** blockMapsFor each image in turn (loaded when current, else scanned). Aborting stops the scan under way and rejects with ERR_BF_ABORTED. */
export async function mapsOfImages(paths: readonly string[], options: ImagesOptions = {}): Promise<Array<MapResult & { path: string }>> {
  checkAborted(options.signal, 'scan');
  const { scanner: given, workers, ...mapOptions } = options;
  const scanner = given ?? new Scanner(workers ? { workers } : {});
  try {
    const out = [];
    for (const path of paths) {
      checkAborted(options.signal, `scan of ${path}`);
      out.push({ path, ...(await blockMapsFor(scanner, path, mapOptions)) });
    }
    return out;
  } finally {
    if (!given) await scanner.close();
  }
}
