import { readFileSync } from 'node:fs';
import { BlockferryError, ErrorCode } from '../errors.js';

/**
 * The raw exports of the WASM core (assembly/index.ts), typed in one place.
 * Pointers and lengths are u32 (wasm32); i64 values cross as BigInt (signed:
 * use BigInt.asUintN(64, v) to read them as u64).
 */
export interface WasmCore {
  readonly memory: WebAssembly.Memory;
  sha1(p: number, len: number, out: number, scratch: number): void;
  sha1Blocks(p: number, len: number, blockSize: number, out: number, scratch: number): number;
  xxh3(p: number, len: number): bigint;
  signature(p: number, len: number): bigint;
  fingerprintBlocks(p: number, len: number, blockSize: number, outFp: number, outSig: number): number;
  isZero(p: number, len: number): number;
  zeroFlags(p: number, len: number, blockSize: number, outFlags: number): number;
  flagRuns(flags: number, n: number, out: number, set: number): number;
  bitmapFill(bm: number, start: number, count: number, value: number): void;
  bitmapCount(bm: number, start: number, count: number): number;
  bitmapRuns(bm: number, nbits: number, from: number, set: number, out: number, maxRuns: number): number;
  indexClear(t: number, cap: number): void;
  indexInsert(t: number, cap: number, fp: bigint, sig: bigint, ref: bigint): number;
  indexLookup(t: number, cap: number, fp: bigint, sig: bigint): bigint;
  indexInsertMany(t: number, cap: number, src: number, n: number): number;
  indexLookupMany(t: number, cap: number, keys: number, n: number, out: number): number;
  indexLookupColumns(t: number, cap: number, fps: number, sigs: number, n: number, out: number): number;
  indexEntries(t: number, cap: number, out: number): number;
  indexRehash(from: number, fromCap: number, to: number, toCap: number): void;
}

/** Bytes of scratch memory every SHA-1 entry point needs (assembly/sha1.ts). */
export const SHA1_SCRATCH = 256;

const WASM_URL = new URL('../../../build/blockferry.wasm', import.meta.url);
let compiled: WebAssembly.Module | undefined;

/**
 * The compiled core, compiled once per process (a worker thread is its own
 * process for this purpose, or receives the module through workerData).
 */
export function wasmModule(): WebAssembly.Module {
  if (compiled) return compiled;
  let bytes: Buffer;
  try {
    bytes = readFileSync(WASM_URL);
  } catch (cause) {
    throw new BlockferryError(
      ErrorCode.WASM_LOAD,
      `cannot read the WASM core at ${WASM_URL.pathname}: run \`npm run build\``,
      { cause },
    );
  }
  try {
    compiled = new WebAssembly.Module(new Uint8Array(bytes));
  } catch (cause) {
    throw new BlockferryError(ErrorCode.WASM_LOAD, `the WASM core at ${WASM_URL.pathname} does not compile`, { cause });
  }
  return compiled;
}

/** Instantiates the core over a memory the caller owns. Cheap: the module is compiled once. */
export function instantiateCore(memory: WebAssembly.Memory, module: WebAssembly.Module = wasmModule()): WasmCore {
  const instance = new WebAssembly.Instance(module, { env: { memory } });
  return instance.exports as unknown as WasmCore;
}
