// The location index a spec names. Apart from both implementations so that
// the Redis one (and ioredis with it) is loaded only when a cluster is named.
import { BlockferryError, ErrorCode } from '../errors.js';
import { EmbeddedLocationIndex, type LocationIndex, type RedisIndexOptions } from './location-index.js';

/** The index a spec names: none → embedded; `redis://HOST:PORT[,HOST:PORT...]` → Redis Cluster. */
export async function openLocationIndex(spec?: string, options?: RedisIndexOptions): Promise<LocationIndex> {
  if (!spec) return new EmbeddedLocationIndex();
  if (/^rediss?:\/\//i.test(spec)) {
    // Loaded only here, so that the embedded default never loads ioredis.
    const { RedisLocationIndex } = await import('./redis-index.js');
    return RedisLocationIndex.open(spec, options);
  }
  throw new BlockferryError(ErrorCode.INVALID_ARGUMENT, `--index takes redis://HOST:PORT, not ${JSON.stringify(spec)}`);
}
