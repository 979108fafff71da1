// The one place that decides which implementation runs each kernel that has
// twins. SHA-1: the native addon (SHA-NI) when it loaded, else the WASM core,
// else node:crypto. File extents, hole punching and block-device size: the
// native addon when allowed, else portable fallbacks (whole range as data,
// explicit zero writes, /sys). BLOCKFERRY_BACKEND=native|wasm|js, or the
// `backend` option, forces a choice; wasm and js also keep the addon out of
// the system-call paths, which is how the fallbacks are tested.
import { addon, addonPath, loadError, type NativeAddon } from 'blockferry/native';
import { BlockferryError, ErrorCode, InvalidArgumentError } from '../errors.js';

export type BackendName = 'native' | 'wasm' | 'js';
export const BACKENDS: readonly BackendName[] = ['native', 'wasm', 'js'];

export interface BackendChoice {
  /** Who computes SHA-1. */
  sha1: BackendName;
  /** The addon for system calls, or null (fallbacks). */
  native: NativeAddon | null;
  /** Why, in a sentence, for `blockferry doctor`. */
  reason: string;
}

/** Whether the addon loaded, and what it offers; for doctor and tests. */
export function nativeStatus(): { loaded: boolean; path: string; error: string | null; info: ReturnType<NativeAddon['info']> | null } {
  return { loaded: addon !== null, path: addonPath, error: loadError, info: addon ? addon.info() : null };
}

export function chooseBackend(forced: string | undefined = process.env.BLOCKFERRY_BACKEND || undefined): BackendChoice {
  if (forced !== undefined && !BACKENDS.includes(forced as BackendName)) {
    throw new InvalidArgumentError('BLOCKFERRY_BACKEND', `one of ${BACKENDS.join(', ')}`, forced);
  }
  if (forced === 'native') {
    if (!addon) throw new BlockferryError(ErrorCode.BACKEND_UNAVAILABLE, `the native backend was asked for but the addon did not load: ${loadError}`);
    return { sha1: 'native', native: addon, reason: `forced; SHA-1 with ${addon.info().sha1}` };
  }
  if (forced === 'wasm' || forced === 'js') return { sha1: forced, native: null, reason: 'forced; native addon not used' };
  if (addon) {
    const info = addon.info();
    // Without SHA-NI the addon's portable SHA-1 is slower than the 4-lane WASM one.
    if (info.sha1 === 'sha-ni') return { sha1: 'native', native: addon, reason: 'native addon loaded, CPU has SHA-NI' };
    return { sha1: 'wasm', native: addon, reason: 'native addon loaded, but the CPU lacks SHA-NI: SHA-1 on WASM' };
  }
  return { sha1: 'wasm', native: null, reason: `native addon not loaded (${loadError ?? 'unknown reason'})` };
}
