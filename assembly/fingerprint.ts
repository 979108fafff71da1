// Per-block fingerprint (XXH3-64, seed 0) and signature (bytes 8..15 of the
// block as a little-endian u64; the 9th to 16th byte of seed paper 001).
import { xxh3 } from './xxh3.gen';

/**
 * The signature of the len bytes at p: bytes 8..15 as a little-endian u64.
 * A block shorter than 16 bytes contributes the bytes it has; the missing
 * high bytes are zero.
 */
export function signature(p: usize, len: u32): u64 {
  if (len >= 16) return load<u64>(p, 8);
  let s: u64 = 0;
  for (let i: u32 = 8; i < len; i++) s |= <u64>load<u8>(p + i) << ((i - 8) << 3);
  return s;
}

/**
 * Fingerprint and signature of every block of [p, p + len) (blocks of
 * blockSize bytes, a shorter final block when len is not a multiple), as u64
 * arrays at outFp and outSig (either may be 0 to skip it). Returns the count.
 */
export function fingerprintBlocks(p: usize, len: u32, blockSize: u32, outFp: usize, outSig: usize): u32 {
  let n: u32 = 0;
  for (let off: u64 = 0; off < <u64>len; off += blockSize, n++) {
    const m = <u32>min(<u64>blockSize, <u64>len - off);
    const q = p + <usize>off;
    if (outFp) store<u64>(outFp + (<usize>n << 3), xxh3(q, m));
    if (outSig) store<u64>(outSig + (<usize>n << 3), signature(q, m));
  }
  return n;
}
