// Exact zero detection with v128. A block is zero only when every one of its
// bytes is zero: the scan ORs 128 bytes at a time, then 16, then single bytes
// for a tail, so the first and the last byte are always looked at.

/** True when all n bytes at p are zero. */
export function isZero(p: usize, n: usize): bool {
  const end = p + n;
  while (p + 128 <= end) {
    const v = v128.or(
      v128.or(v128.or(v128.load(p), v128.load(p, 16)), v128.or(v128.load(p, 32), v128.load(p, 48))),
      v128.or(v128.or(v128.load(p, 64), v128.load(p, 80)), v128.or(v128.load(p, 96), v128.load(p, 112))),
    );
    if (v128.any_true(v)) return false;
    p += 128;
  }
  while (p + 16 <= end) {
    if (v128.any_true(v128.load(p))) return false;
    p += 16;
  }
  while (p < end) {
    if (load<u8>(p)) return false;
    p++;
  }
  return true;
}

/**
 * One flag byte per block of [p, p + len) at outFlags: 1 when the block is
 * all zero, else 0 (blocks of blockSize bytes, a shorter final block).
 * Returns the number of zero blocks.
 */
export function zeroFlags(p: usize, len: u32, blockSize: u32, outFlags: usize): u32 {
  let zeros: u32 = 0;
  let n: usize = 0;
  for (let off: u64 = 0; off < <u64>len; off += blockSize, n++) {
    const m = <usize>min(<u64>blockSize, <u64>len - off);
    const z = isZero(p + <usize>off, m);
    store<u8>(outFlags + n, <u8>z);
    zeros += <u32>z;
  }
  return zeros;
}

/**
 * The runs of flag bytes that are set (set != 0: non-zero bytes) or clear
 * (set == 0: zero bytes) among the n at flags, as (first, count) u32 pairs at
 * out, in order. out must hold (n + 1) / 2 pairs. Returns the number of runs.
 */
export function flagRuns(flags: usize, n: u32, out: usize, set: i32): u32 {
  // run lanes: byte != 0 when set, byte == 0 when not.
  const flip = set ? i8x16.splat(-1) : i8x16.splat(0);
  const zero = i8x16.splat(0);
  let runs: u32 = 0;
  let i: u32 = 0;
  while (i < n) {
    while (i + 16 <= n && !v128.any_true(v128.xor(i8x16.eq(v128.load(flags + i), zero), flip))) i += 16;
    while (i < n && (load<u8>(flags + i) != 0) != (set != 0)) i++;
    if (i >= n) break;
    const first = i;
    while (i + 16 <= n && i8x16.all_true(v128.xor(i8x16.eq(v128.load(flags + i), zero), flip))) i += 16;
    while (i < n && (load<u8>(flags + i) != 0) == (set != 0)) i++;
    const o = out + (<usize>runs << 3);
    store<u32>(o, first);
    store<u32>(o, i - first, 4);
    runs++;
  }
  return runs;
}
