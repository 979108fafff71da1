import { readFileSync } from 'node:fs';
import { createHash, randomBytes, hash } from 'node:crypto';
const mem = new WebAssembly.Memory({ initial: 16384 });
const { instance } = await WebAssembly.instantiate(readFileSync('build/blockferry.wasm'), { env: { memory: mem } });
const x = instance.exports;
const u8 = new Uint8Array(mem.buffer);
const N = 16 << 20, base = 1 << 20, out = 64 << 20;
u8.set(randomBytes(N), base);
function t(name, f, bytes, reps = 10) { f(); const s = performance.now(); for (let i = 0; i < reps; i++) f(); const ms = (performance.now() - s) / reps; console.log(name, (bytes / ms / 1e3).toFixed(0), 'MB/s'); }
t('wasm sha1 4K', () => x.sha1Blocks(base, N, 4096, out, 512), N, 5);
const buf = Buffer.from(u8.subarray(base, base + N));
t('createHash 4K', () => { for (let o = 0; o < N; o += 4096) createHash('sha1').update(buf.subarray(o, o + 4096)).digest(); }, N, 5);
t('crypto.hash 4K', () => { for (let o = 0; o < N; o += 4096) hash('sha1', buf.subarray(o, o + 4096), 'buffer'); }, N, 5);
t('wasm xxh3 4K', () => x.fingerprintBlocks(base, N, 4096, out, out + (1 << 20)), N);
u8.fill(0, base, base + N);
t('wasm zero 4K', () => x.zeroFlags(base, N, 4096, out), N, 20);
