// Bitmap kernels. A bitmap is an array of little-endian u64 words at an
// 8-byte aligned address: bit i is bit (i & 63) of word i >> 6, which is also
// bit (i & 7) of byte i >> 3, so byte-wise fills and word-wise reads agree.
// Bits past nbits in the last word may hold anything: every scan clamps to
// nbits.

// @ts-ignore: decorator
@inline function word(bm: usize, wi: u32): u64 {
  return load<u64>(bm + (<usize>wi << 3));
}

/** Sets (value != 0) or clears the count bits starting at start. */
export function bitmapFill(bm: usize, start: u32, count: u32, value: i32): void {
  if (count == 0) return;
  const end: u64 = <u64>start + count; // exclusive
  let wi = start >>> 6;
  const lastWi = <u32>((end - 1) >>> 6);
  const headMask: u64 = <u64>-1 << (start & 63);
  const tailMask: u64 = <u64>-1 >>> (63 - <u64>((end - 1) & 63));
  const a = bm + (<usize>wi << 3);
  if (wi == lastWi) {
    const m = headMask & tailMask;
    store<u64>(a, value ? load<u64>(a) | m : load<u64>(a) & ~m);
    return;
  }
  store<u64>(a, value ? load<u64>(a) | headMask : load<u64>(a) & ~headMask);
  wi++;
  if (lastWi > wi) memory.fill(bm + (<usize>wi << 3), value ? 0xFF : 0, <usize>(lastWi - wi) << 3);
  const b = bm + (<usize>lastWi << 3);
  store<u64>(b, value ? load<u64>(b) | tailMask : load<u64>(b) & ~tailMask);
}

/** Number of set bits among the count bits starting at start. */
export function bitmapCount(bm: usize, start: u32, count: u32): u32 {
  if (count == 0) return 0;
  const end: u64 = <u64>start + count;
  let wi = start >>> 6;
  const lastWi = <u32>((end - 1) >>> 6);
  const headMask: u64 = <u64>-1 << (start & 63);
  const tailMask: u64 = <u64>-1 >>> (63 - <u64>((end - 1) & 63));
  if (wi == lastWi) return <u32>popcnt<u64>(word(bm, wi) & headMask & tailMask);
  let n: u64 = popcnt<u64>(word(bm, wi) & headMask);
  wi++;
  for (; wi + 4 <= lastWi; wi += 4) {
    const a = bm + (<usize>wi << 3);
    n += popcnt<u64>(load<u64>(a)) + popcnt<u64>(load<u64>(a, 8)) + popcnt<u64>(load<u64>(a, 16)) + popcnt<u64>(load<u64>(a, 24));
  }
  for (; wi < lastWi; wi++) n += popcnt<u64>(word(bm, wi));
  n += popcnt<u64>(word(bm, lastWi) & tailMask);
  return <u32>n;
}

/**
 * The first bit at or after from, below nbits, whose value differs from
 * `skip` (0 or all ones per word: looks for a set bit when skip is 0, a clear
 * bit when skip is all ones). Returns nbits when there is none.
 */
function findBit(bm: usize, nbits: u32, from: u32, skip: u64): u32 {
  if (from >= nbits) return nbits;
  const lastWi = (nbits - 1) >>> 6;
  let wi = from >>> 6;
  let w = (word(bm, wi) ^ skip) & (<u64>-1 << (from & 63));
  if (w == 0) {
    const vskip = i64x2.splat(skip);
    wi++;
    // Whole 64-byte lines of skip words are passed over 512 bits at a time.
    while (wi + 8 <= lastWi + 1) {
      const a = bm + (<usize>wi << 3);
      const v = v128.or(
        v128.or(v128.xor(v128.load(a), vskip), v128.xor(v128.load(a, 16), vskip)),
        v128.or(v128.xor(v128.load(a, 32), vskip), v128.xor(v128.load(a, 48), vskip)),
      );
      if (v128.any_true(v)) break;
      wi += 8;
    }
    for (; wi <= lastWi; wi++) {
      w = word(bm, wi) ^ skip;
      if (w != 0) break;
    }
    if (wi > lastWi) return nbits;
  }
  const pos: u64 = (<u64>wi << 6) + ctz<u64>(w);
  return pos < <u64>nbits ? <u32>pos : nbits;
}

/**
 * Finds the runs of set bits (set != 0) or of clear bits (set == 0) that
 * start at or after from, below nbits, and writes up to maxRuns of them as
 * (start, length) u32 pairs at out. Returns the number written; when it is
 * maxRuns, continue from the end of the last run.
 */
export function bitmapRuns(bm: usize, nbits: u32, from: u32, set: i32, out: usize, maxRuns: u32): u32 {
  const want: u64 = set ? 0 : <u64>-1;
  let n: u32 = 0;
  let pos = from;
  while (n < maxRuns) {
    const start = findBit(bm, nbits, pos, want);
    if (start >= nbits) break;
    const end = findBit(bm, nbits, start, ~want);
    const o = out + (<usize>n << 3);
    store<u32>(o, start);
    store<u32>(o, end - start, 4);
    n++;
    pos = end;
  }
  return n;
}
