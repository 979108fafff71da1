// The similarity matrices of images on disk: their block maps (loaded or
// scanned), then one matrix per block size.
import { BlockferryError, ErrorCode } from '../errors.js';
import { mapsOfImages, type ImagesOptions } from '../scan/maps.js';
import { similarityMatrix, type SimilarityMatrix } from './similarity.js';

/**
 * One matrix per block size asked for (`blockSize`: one, or a list for a
 * sweep). Takes `signal` and `onProgress` (the scans') like every long call.
 */
export async function similarity(paths: readonly string[], options: ImagesOptions = {}): Promise<SimilarityMatrix[]> {
  if (paths.length < 2) throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `similarity needs at least two images, not ${paths.length}`);
  const sizes = [options.blockSize ?? 4096].flat();
  const results = await mapsOfImages(paths, { ...options, blockSize: sizes });
  return sizes.map((_, k) => similarityMatrix(results.map((r) => r.maps[k]!)));
}
