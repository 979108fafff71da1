// The block index table: fingerprint + signature -> block reference.
//
// Design
// ------
// The table is one flat array of 24-byte slots in linear memory, owned and
// placed by the TypeScript side (src/blockindex/table.ts), which passes its
// address and capacity to every call. A slot holds the fingerprint (u64, the
// XXH3-64 of the block), the signature (u64, bytes 8..15 of the block) and the
// block reference (u64: image id in the top 24 bits, block number in the low
// 40). An empty slot has the reference EMPTY (all ones), which no real
// reference may take; empty slots cost no extra byte and no side array.
//
// Placement is open addressing with linear probing, kept in Robin Hood order.
// A key's home slot is fastrange(fp >> 32, capacity) = ((fp >> 32) * cap) >> 32:
// any capacity works (not only powers of two), so the table can grow by 1.5x
// and sit close to its maximum load. The fingerprint is already a
// well-mixed 64-bit hash, so its top 32 bits are a fair slot choice.
//
// Robin Hood order: while probing, an entry that is closer to its home than
// the one being inserted gives up its slot and moves on. Entries therefore
// sit in order of home slot along every cluster, and a lookup can stop as
// soon as it meets an entry that is nearer its home than the probe is to
// the key's home: the key would have been placed before it. This keeps
// misses (the common case when a scan looks up blocks the neighbourhood does
// not hold) about as cheap as hits even at a load of 0.8, where plain linear
// probing would walk about 13 slots per miss.
//
// At the maximum load of 0.8 a slot costs 24 / 0.8 = 30 bytes per entry.
//
// A hit needs the fingerprint AND the signature to match. Two different
// blocks with the same fingerprint but different signatures are two entries;
// a lookup with the wrong signature misses instead of returning a block with
// other contents. (fp, sig) pairs are unique: inserting an existing pair
// keeps the first reference, which is what a neighbourhood needs: any one
// copy of a block will do.
//
// The table keeps no state of its own (count and capacity live in
// TypeScript), so one compiled module serves any number of tables.

/** The reference of an empty slot. */
export const EMPTY: u64 = 0xFFFFFFFFFFFFFFFF;
/** Bytes per slot, and per entry in a dense entry list. */
export const SLOT: u32 = 24;

// @ts-ignore: decorator
@inline function home(fp: u64, cap: u32): u32 {
  return <u32>(((fp >>> 32) * <u64>cap) >>> 32);
}

// @ts-ignore: decorator
@inline function slot(t: usize, i: u32): usize {
  return t + <usize>i * SLOT;
}

/**
 * Keys per group in the batch calls. A random slot in a large table is a
 * cache and TLB miss (about 150 ns here); one at a time, a lookup costs that
 * much. The batch calls first load the home slot of every key of a group
 * with independent loads, so that the misses overlap (WASM has no prefetch
 * instruction: a plain load does the job), then probe them from cache.
 */
// @ts-ignore: decorator
@inline const GROUP: u32 = 16;

/**
 * Loads the home slot of each of the keys [k0, k1) (fingerprints at fps,
 * stride bytes apart) and returns the XOR of what it read. Loads may trap,
 * so the optimizer keeps them even where the result is unused.
 */
// @ts-ignore: decorator
@inline function touchHomes(t: usize, cap: u32, fps: usize, stride: usize, k0: u32, k1: u32): u64 {
  let x: u64 = 0;
  for (let k = k0; k < k1; k++) x ^= load<u64>(slot(t, home(load<u64>(fps + <usize>k * stride), cap)), 16);
  return x;
}

/** Marks all cap slots of the table at t empty. */
export function indexClear(t: usize, cap: u32): void {
  memory.fill(t, 0xFF, <usize>cap * SLOT);
}

/**
 * Inserts (fp, sig) -> ref. Returns 1 when it was added, 0 when the pair was
 * already present (its reference is kept). The caller guarantees a free slot.
 */
export function indexInsert(t: usize, cap: u32, fp: u64, sig: u64, ref: u64): i32 {
  let i = home(fp, cap);
  let dist: u32 = 0;
  // Phase 1: look for the pair until the Robin Hood order says it is absent.
  while (true) {
    const s = slot(t, i);
    const r = load<u64>(s, 16);
    if (r == EMPTY) {
      store<u64>(s, fp);
      store<u64>(s, sig, 8);
      store<u64>(s, ref, 16);
      return 1;
    }
    const sfp = load<u64>(s);
    if (sfp == fp && load<u64>(s, 8) == sig) return 0;
    const h = home(sfp, cap);
    const sdist = i >= h ? i - h : i + cap - h;
    if (sdist < dist) break;
    dist++;
    i = i + 1 == cap ? 0 : i + 1;
  }
  // Phase 2: displace richer entries until an empty slot ends the chain.
  while (true) {
    const s = slot(t, i);
    const r = load<u64>(s, 16);
    if (r == EMPTY) {
      store<u64>(s, fp);
      store<u64>(s, sig, 8);
      store<u64>(s, ref, 16);
      return 1;
    }
    const sfp = load<u64>(s);
    const h = home(sfp, cap);
    const sdist = i >= h ? i - h : i + cap - h;
    if (sdist < dist) {
      const ssig = load<u64>(s, 8);
      store<u64>(s, fp);
      store<u64>(s, sig, 8);
      store<u64>(s, ref, 16);
      fp = sfp;
      sig = ssig;
      ref = r;
      dist = sdist;
    }
    dist++;
    i = i + 1 == cap ? 0 : i + 1;
  }
}

/** The reference stored for (fp, sig), or EMPTY. */
export function indexLookup(t: usize, cap: u32, fp: u64, sig: u64): u64 {
  let i = home(fp, cap);
  let dist: u32 = 0;
  while (true) {
    const s = slot(t, i);
    const r = load<u64>(s, 16);
    if (r == EMPTY) return EMPTY;
    const sfp = load<u64>(s);
    if (sfp == fp && load<u64>(s, 8) == sig) return r;
    const h = home(sfp, cap);
    const sdist = i >= h ? i - h : i + cap - h;
    if (sdist < dist) return EMPTY;
    dist++;
    i = i + 1 == cap ? 0 : i + 1;
  }
}

/**
 * Inserts n dense entries (fp, sig, ref: 24 bytes each) from src. When an
 * entry's reference is EMPTY nothing is inserted and the result is
 * -(its index) - 1; otherwise the result is how many entries were new.
 */
export function indexInsertMany(t: usize, cap: u32, src: usize, n: u32): i32 {
  for (let k: u32 = 0; k < n; k++) {
    if (load<u64>(src + <usize>k * SLOT, 16) == EMPTY) return -<i32>k - 1;
  }
  let added: i32 = 0;
  for (let k0: u32 = 0; k0 < n; k0 += GROUP) {
    const k1 = min(k0 + GROUP, n);
    touchHomes(t, cap, src, SLOT, k0, k1);
    for (let k = k0; k < k1; k++) {
      const e = src + <usize>k * SLOT;
      added += indexInsert(t, cap, load<u64>(e), load<u64>(e, 8), load<u64>(e, 16));
    }
  }
  return added;
}

/**
 * Looks up n keys (fp, sig: 16 bytes each) from keys and writes one u64
 * reference per key to out (EMPTY for a miss). Returns the number of hits.
 */
export function indexLookupMany(t: usize, cap: u32, keys: usize, n: u32, out: usize): u32 {
  let hits: u32 = 0;
  for (let k0: u32 = 0; k0 < n; k0 += GROUP) {
    const k1 = min(k0 + GROUP, n);
    store<u64>(out + (<usize>k0 << 3), touchHomes(t, cap, keys, 16, k0, k1));
    for (let k = k0; k < k1; k++) {
      const q = keys + (<usize>k << 4);
      const r = indexLookup(t, cap, load<u64>(q), load<u64>(q, 8));
      store<u64>(out + (<usize>k << 3), r);
      hits += <u32>(r != EMPTY);
    }
  }
  return hits;
}

/**
 * Looks up the blocks whose fingerprints and signatures are the parallel u64
 * arrays fps and sigs (the layout a scan writes), n of them, references to
 * out. Returns the number of hits.
 */
export function indexLookupColumns(t: usize, cap: u32, fps: usize, sigs: usize, n: u32, out: usize): u32 {
  let hits: u32 = 0;
  for (let k0: u32 = 0; k0 < n; k0 += GROUP) {
    const k1 = min(k0 + GROUP, n);
    // The touch result lands in out[k0], which the probe loop overwrites: a real use of every load.
    store<u64>(out + (<usize>k0 << 3), touchHomes(t, cap, fps, 8, k0, k1));
    for (let k = k0; k < k1; k++) {
      const o = <usize>k << 3;
      const r = indexLookup(t, cap, load<u64>(fps + o), load<u64>(sigs + o));
      store<u64>(out + o, r);
      hits += <u32>(r != EMPTY);
    }
  }
  return hits;
}

/** Writes the occupied slots of the table as dense entries to out; returns their count. */
export function indexEntries(t: usize, cap: u32, out: usize): u32 {
  let n: u32 = 0;
  for (let i: u32 = 0; i < cap; i++) {
    const s = slot(t, i);
    if (load<u64>(s, 16) == EMPTY) continue;
    memory.copy(out + <usize>n * SLOT, s, SLOT);
    n++;
  }
  return n;
}

/** Moves every entry of the table (from, fromCap) into the empty table (to, toCap). */
export function indexRehash(from: usize, fromCap: u32, to: usize, toCap: u32): void {
  for (let i: u32 = 0; i < fromCap; i++) {
    const s = slot(from, i);
    const r = load<u64>(s, 16);
    if (r != EMPTY) indexInsert(to, toCap, load<u64>(s), load<u64>(s, 8), r);
  }
}
