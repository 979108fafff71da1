// The blockferry WASM core: one export list, the ABI that src/engine/wasm.ts
// types. Kernels only: they take addresses that TypeScript chose, allocate
// nothing and keep no mutable static data, so that one compiled module can
// be instantiated by several workers over one shared memory.
export { sha1, sha1Blocks } from './sha1';
export { xxh3 } from './xxh3.gen';
export { signature, fingerprintBlocks } from './fingerprint';
export { isZero, zeroFlags, flagRuns } from './zero';
export { bitmapFill, bitmapCount, bitmapRuns } from './bitmap';
export {
  indexClear,
  indexInsert,
  indexLookup,
  indexInsertMany,
  indexLookupMany,
  indexLookupColumns,
  indexEntries,
  indexRehash,
} from './blockindex';
