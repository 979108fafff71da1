// SHA-1 and fingerprint per 4 KiB block: the WASM core against its peers.
import { createHash, hash as cryptoHash } from 'node:crypto';
import { createSHA1, createXXHash3, createXXHash64 } from 'hash-wasm';
import xxhashWasm from 'xxhash-wasm';
import { xxh3 as nodeRsXxh3, xxh64 as nodeRsXxh64 } from '@node-rs/xxhash';
import { Engine } from '../src/index.js';
import { check, randomFill, runGroup, type GroupResult } from './lib.js';

const BS = 4096;
const DATA = 8 << 20; // 2048 blocks: fits in L3 on most machines, like a scan window being hashed right after its read
const N = DATA / BS;

export async function benchHash(): Promise<GroupResult[]> {
  const engine = new Engine({ initialBytes: DATA + (4 << 20), backend: 'wasm' }); // the WASM kernels themselves; native has its own group
  const data = engine.alloc(DATA);
  const digests = engine.alloc(N * 20);
  const fps = engine.alloc(N * 8);
  const sigs = engine.alloc(N * 8);
  randomFill(engine.view(data), 42);
  const buf = Buffer.from(engine.view(data)); // the peers hash a Buffer copy: JS-heap data is their home ground
  const block = (i: number) => buf.subarray(i * BS, (i + 1) * BS);

  // --- SHA-1 ---------------------------------------------------------------
  engine.sha1BlocksAt(data.ptr, DATA, BS, digests.ptr);
  const ours = Buffer.from(engine.view(digests));
  const hw = await createSHA1();
  const hwDigest = (b: Uint8Array) => { hw.init(); hw.update(b); return hw.digest('binary'); };
  for (let i = 0; i < N; i++) {
    const ref = createHash('sha1').update(block(i)).digest();
    check('sha1 createHash', ref.equals(ours.subarray(i * 20, i * 20 + 20)), `block ${i}`);
    check('sha1 crypto.hash', Buffer.from(cryptoHash('sha1', block(i), 'buffer')).equals(ref), `block ${i}`);
    check('sha1 hash-wasm', Buffer.from(hwDigest(block(i))).equals(ref), `block ${i}`);
  }
  const sha1 = await runGroup({
    title: 'SHA-1 per 4 KiB block (8 MiB per op, one core)',
    workPerOp: DATA,
    unit: 'MB/s',
    tasks: [
      { name: 'blockferry wasm', ours: true, fn: () => engine.sha1BlocksAt(data.ptr, DATA, BS, digests.ptr) },
      { name: 'node createHash', fn: () => { for (let i = 0; i < N; i++) createHash('sha1').update(block(i)).digest(); } },
      { name: 'node crypto.hash', fn: () => { for (let i = 0; i < N; i++) cryptoHash('sha1', block(i), 'buffer'); } },
      { name: 'hash-wasm', fn: () => { for (let i = 0; i < N; i++) hwDigest(block(i)); } },
    ],
    goals: [
      { vs: 'node createHash', min: 1.6 },
      { vs: 'node crypto.hash', min: 1.25 },
      { vs: 'hash-wasm', min: 2.4 },
    ],
  });

  // --- fingerprint -----------------------------------------------------------
  engine.fingerprintBlocksAt(data.ptr, DATA, BS, fps.ptr, sigs.ptr);
  const ourFps = engine.view64(fps).slice();
  const hw3 = await createXXHash3(0, 0);
  const hw64 = await createXXHash64(0, 0);
  const hw3Digest = (b: Uint8Array) => { hw3.init(); hw3.update(b); return hw3.digest('binary'); };
  const hw64Digest = (b: Uint8Array) => { hw64.init(); hw64.update(b); return hw64.digest('binary'); };
  const { h64Raw } = await xxhashWasm();
  for (let i = 0; i < N; i++) {
    const want = ourFps[i]!;
    check('xxh3 hash-wasm', Buffer.from(hw3Digest(block(i))).readBigUInt64BE(0) === want, `block ${i}`);
    check('xxh3 @node-rs/xxhash', nodeRsXxh3.xxh64(block(i)) === want, `block ${i}`);
    // The XXH64 peers compute another function: they must agree with each other.
    const x64 = h64Raw(block(i));
    check('xxh64 peers agree', Buffer.from(hw64Digest(block(i))).readBigUInt64BE(0) === x64 && nodeRsXxh64(block(i)) === x64, `block ${i}`);
  }
  const fingerprint = await runGroup({
    title: 'Fingerprint per 4 KiB block (8 MiB per op, one core)',
    workPerOp: DATA,
    unit: 'MB/s',
    tasks: [
      { name: 'blockferry wasm xxh3+sig', ours: true, fn: () => engine.fingerprintBlocksAt(data.ptr, DATA, BS, fps.ptr, sigs.ptr) },
      { name: 'hash-wasm xxhash3', fn: () => { for (let i = 0; i < N; i++) hw3Digest(block(i)); } },
      { name: 'hash-wasm xxhash64', fn: () => { for (let i = 0; i < N; i++) hw64Digest(block(i)); } },
      { name: 'xxhash-wasm h64Raw', fn: () => { for (let i = 0; i < N; i++) h64Raw(block(i)); } },
      { name: '@node-rs/xxhash xxh3 (native)', fn: () => { for (let i = 0; i < N; i++) nodeRsXxh3.xxh64(block(i)); } },
      { name: '@node-rs/xxhash xxh64 (native)', fn: () => { for (let i = 0; i < N; i++) nodeRsXxh64(block(i)); } },
    ],
    goals: [
      { vs: 'xxhash-wasm h64Raw', min: 1.5 },
      { vs: '@node-rs/xxhash xxh3 (native)', min: 0 },
    ],
  });
  return [sha1, fingerprint];
}
