// Deterministic test data: a fixed seed gives the same bytes on every run and
// machine, so a failure can be replayed.

/** n bytes from a xorshift32 generator seeded with seed (any integer). */
export function seededBytes(seed: number, n: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = (seed * 2654435761) >>> 0 || 0x9e3779b9;
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    out[i] = x; out[i + 1] = x >>> 8; out[i + 2] = x >>> 16; out[i + 3] = x >>> 24;
  }
  for (; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    out[i] = x;
  }
  return out;
}

/** A xorshift generator of u32 values, for choosing sizes and positions. */
export function rng(seed: number): () => number {
  let x = (seed * 2654435761) >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x;
  };
}

import { nativeStatus, type BackendName } from '../src/engine/backend.js';

/** The backends to run a suite on: native when the addon is built, always WASM and node:crypto. */
export function testBackends(): BackendName[] {
  return nativeStatus().loaded ? ['native', 'wasm', 'js'] : ['wasm', 'js'];
}
