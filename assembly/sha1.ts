// SHA-1 over many equal blocks in one call: four blocks at a time in the
// four lanes of v128 values (multi-buffer), the scalar compressor for a lone
// leftover block and for the short final block.
import { sha1x4, sha1Chunks } from './sha1.gen';

/** Bytes of caller-provided scratch every SHA-1 entry point needs. */
export const SHA1_SCRATCH: u32 = 256;

/**
 * SHA-1 of the len bytes at p, digest (20 bytes, big-endian words) to out.
 * scratch: SHA1_SCRATCH bytes the caller owns; holds the padded tail chunks
 * (128 bytes) and the running state (20 bytes).
 */
export function sha1(p: usize, len: u32, out: usize, scratch: usize): void {
  const st = scratch + 128;
  store<u32>(st, 0x67452301, 0);
  store<u32>(st, 0xefcdab89, 4);
  store<u32>(st, 0x98badcfe, 8);
  store<u32>(st, 0x10325476, 12);
  store<u32>(st, 0xc3d2e1f0, 16);
  const full = len >>> 6;
  sha1Chunks(st, p, full);
  const rem = len & 63;
  memory.copy(scratch, p + (<usize>full << 6), rem);
  store<u8>(scratch + rem, 0x80);
  // 1 padding byte and the 8-byte length must fit after the remainder.
  const tail: u32 = rem < 56 ? 64 : 128;
  memory.fill(scratch + rem + 1, 0, tail - rem - 9);
  store<u64>(scratch + tail - 8, bswap<u64>(<u64>len << 3));
  sha1Chunks(st, scratch, tail >>> 6);
  for (let i: usize = 0; i < 20; i += 4) store<u32>(out + i, bswap<u32>(load<u32>(st + i)));
}

/**
 * SHA-1 of every block of [p, p + len): blocks of blockSize bytes (a multiple
 * of 64) and a shorter final block when len is not a multiple. Digests go to
 * out, 20 bytes each, in block order. Returns the number of digests written.
 */
export function sha1Blocks(p: usize, len: u32, blockSize: u32, out: usize, scratch: usize): u32 {
  const bs = <usize>blockSize;
  const full = len / blockSize;
  let i: u32 = 0;
  for (; i + 4 <= full; i += 4) {
    const q = p + <usize>i * bs;
    sha1x4(q, q + bs, q + 2 * bs, q + 3 * bs, blockSize, out + <usize>i * 20);
  }
  const left = full - i;
  if (left >= 2) {
    // Two or three blocks left: one 4-lane pass (duplicate lanes) costs less
    // than two or three scalar passes. The digests land in scratch first.
    const q = p + <usize>i * bs;
    const q2 = left == 3 ? q + 2 * bs : q;
    sha1x4(q, q + bs, q2, q, blockSize, scratch);
    memory.copy(out + <usize>i * 20, scratch, <usize>left * 20);
  } else if (left == 1) {
    sha1(p + <usize>i * bs, blockSize, out + <usize>i * 20, scratch);
  }
  const rest = len - full * blockSize;
  if (rest == 0) return full;
  sha1(p + <usize>full * bs, rest, out + <usize>full * 20, scratch);
  return full + 1;
}
