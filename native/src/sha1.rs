//! SHA-1 of many equal blocks. With the x86 SHA extensions (SHA-NI) two
//! blocks are compressed at once, their instruction streams interleaved:
//! `sha1rnds4` has a latency of several cycles and one stream alone leaves
//! the unit idle between dependent rounds. Without SHA-NI a portable scalar
//! compressor does the work. The choice is made once, at load time.

const IV: [u32; 5] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0];
pub const DIGEST: usize = 20;

/// True when this CPU has the SHA extensions (and SSE4.1/SSSE3 they need).
pub fn has_sha_ni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("sha") && std::is_x86_feature_detected!("sse4.1") && std::is_x86_feature_detected!("ssse3")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

// ---- portable ----------------------------------------------------------------

fn compress_portable(h: &mut [u32; 5], chunk: &[u8]) {
    let mut w = [0u32; 80];
    for i in 0..16 {
        w[i] = u32::from_be_bytes([chunk[4 * i], chunk[4 * i + 1], chunk[4 * i + 2], chunk[4 * i + 3]]);
    }
    for i in 16..80 {
        w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
    }
    let (mut a, mut b, mut c, mut d, mut e) = (h[0], h[1], h[2], h[3], h[4]);
    for (i, wi) in w.iter().enumerate() {
        let (f, k) = match i / 20 {
            0 => ((b & c) | (!b & d), 0x5a827999),
            1 => (b ^ c ^ d, 0x6ed9eba1),
            2 => ((b & c) | (b & d) | (c & d), 0x8f1bbcdc),
            _ => (b ^ c ^ d, 0xca62c1d6),
        };
        let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
        e = d;
        d = c;
        c = b.rotate_left(30);
        b = a;
        a = t;
    }
    h[0] = h[0].wrapping_add(a);
    h[1] = h[1].wrapping_add(b);
    h[2] = h[2].wrapping_add(c);
    h[3] = h[3].wrapping_add(d);
    h[4] = h[4].wrapping_add(e);
}

/// The one or two padding chunks that end a message of `len` bytes whose
/// last `tail.len() < 64` bytes are `tail`. Returns the chunks and how many.
fn padding(tail: &[u8], len: u64) -> ([u8; 128], usize) {
    let mut buf = [0u8; 128];
    buf[..tail.len()].copy_from_slice(tail);
    buf[tail.len()] = 0x80;
    let n = if tail.len() < 56 { 64 } else { 128 };
    buf[n - 8..n].copy_from_slice(&(len * 8).to_be_bytes());
    (buf, n / 64)
}

fn store(h: &[u32; 5], out: &mut [u8]) {
    for i in 0..5 {
        out[4 * i..4 * i + 4].copy_from_slice(&h[i].to_be_bytes());
    }
}

fn sha1_portable(msg: &[u8], out: &mut [u8]) {
    let mut h = IV;
    let full = msg.len() / 64 * 64;
    for chunk in msg[..full].chunks_exact(64) {
        compress_portable(&mut h, chunk);
    }
    let (pad, n) = padding(&msg[full..], msg.len() as u64);
    for chunk in pad[..64 * n].chunks_exact(64) {
        compress_portable(&mut h, chunk);
    }
    store(&h, out);
}

// ---- SHA-NI --------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod ni {
    use core::arch::x86_64::*;

    /// Compresses `chunks` 64-byte chunks of two messages at once into two
    /// states. `abcd` holds A in lane 3 (reversed word order), `e` holds E in
    /// lane 3, as the SHA instructions expect.
    #[target_feature(enable = "sha,sse4.1,ssse3")]
    #[allow(unused_assignments)] // the last schedule words written are not read again
    pub unsafe fn compress2(st: &mut [(__m128i, __m128i); 2], p: [*const u8; 2], chunks: usize) {
        let mask = _mm_set_epi64x(0x0001_0203_0405_0607, 0x0809_0a0b_0c0d_0e0f);
        let (mut abcd0, mut e0) = st[0];
        let (mut abcd1, mut e1) = st[1];
        for c in 0..chunks {
            let q0 = p[0].add(64 * c);
            let q1 = p[1].add(64 * c);
            let (save_a0, save_e0, save_a1, save_e1) = (abcd0, e0, abcd1, e1);
            // Message words, W0 in lane 3.
            let mut m0 = [
                _mm_shuffle_epi8(_mm_loadu_si128(q0 as *const __m128i), mask),
                _mm_shuffle_epi8(_mm_loadu_si128(q0.add(16) as *const __m128i), mask),
                _mm_shuffle_epi8(_mm_loadu_si128(q0.add(32) as *const __m128i), mask),
                _mm_shuffle_epi8(_mm_loadu_si128(q0.add(48) as *const __m128i), mask),
            ];
            let mut m1 = [
                _mm_shuffle_epi8(_mm_loadu_si128(q1 as *const __m128i), mask),
                _mm_shuffle_epi8(_mm_loadu_si128(q1.add(16) as *const __m128i), mask),
                _mm_shuffle_epi8(_mm_loadu_si128(q1.add(32) as *const __m128i), mask),
                _mm_shuffle_epi8(_mm_loadu_si128(q1.add(48) as *const __m128i), mask),
            ];
            // Group 0 (rounds 0..3): E plus the first four words.
            let mut prev0 = abcd0;
            let mut prev1 = abcd1;
            abcd0 = _mm_sha1rnds4_epu32(abcd0, _mm_add_epi32(e0, m0[0]), 0);
            abcd1 = _mm_sha1rnds4_epu32(abcd1, _mm_add_epi32(e1, m1[0]), 0);
            // Groups 1..19: the E of group i comes from A four rounds back
            // (sha1nexte), the schedule from sha1msg1/xor/sha1msg2.
            macro_rules! group {
                ($i:expr, $f:expr) => {{
                    let w0 = if $i < 4 { m0[$i % 4] } else {
                        let w = _mm_sha1msg2_epu32(_mm_xor_si128(_mm_sha1msg1_epu32(m0[$i % 4], m0[($i + 1) % 4]), m0[($i + 2) % 4]), m0[($i + 3) % 4]);
                        m0[$i % 4] = w;
                        w
                    };
                    let w1 = if $i < 4 { m1[$i % 4] } else {
                        let w = _mm_sha1msg2_epu32(_mm_xor_si128(_mm_sha1msg1_epu32(m1[$i % 4], m1[($i + 1) % 4]), m1[($i + 2) % 4]), m1[($i + 3) % 4]);
                        m1[$i % 4] = w;
                        w
                    };
                    let x0 = _mm_sha1nexte_epu32(prev0, w0);
                    let x1 = _mm_sha1nexte_epu32(prev1, w1);
                    prev0 = abcd0;
                    prev1 = abcd1;
                    abcd0 = _mm_sha1rnds4_epu32(abcd0, x0, $f);
                    abcd1 = _mm_sha1rnds4_epu32(abcd1, x1, $f);
                }};
            }
            group!(1, 0); group!(2, 0); group!(3, 0); group!(4, 0);
            group!(5, 1); group!(6, 1); group!(7, 1); group!(8, 1); group!(9, 1);
            group!(10, 2); group!(11, 2); group!(12, 2); group!(13, 2); group!(14, 2);
            group!(15, 3); group!(16, 3); group!(17, 3); group!(18, 3); group!(19, 3);
            e0 = _mm_sha1nexte_epu32(prev0, save_e0);
            e1 = _mm_sha1nexte_epu32(prev1, save_e1);
            abcd0 = _mm_add_epi32(abcd0, save_a0);
            abcd1 = _mm_add_epi32(abcd1, save_a1);
        }
        st[0] = (abcd0, e0);
        st[1] = (abcd1, e1);
    }

    #[target_feature(enable = "sha,sse4.1,ssse3")]
    pub unsafe fn init(h: &[u32; 5]) -> (__m128i, __m128i) {
        let abcd = _mm_set_epi32(h[0] as i32, h[1] as i32, h[2] as i32, h[3] as i32);
        (abcd, _mm_set_epi32(h[4] as i32, 0, 0, 0))
    }

    #[target_feature(enable = "sha,sse4.1,ssse3")]
    pub unsafe fn finish(s: (__m128i, __m128i)) -> [u32; 5] {
        [
            _mm_extract_epi32(s.0, 3) as u32,
            _mm_extract_epi32(s.0, 2) as u32,
            _mm_extract_epi32(s.0, 1) as u32,
            _mm_extract_epi32(s.0, 0) as u32,
            _mm_extract_epi32(s.1, 3) as u32,
        ]
    }
}

/// Hashes two messages of equal length with SHA-NI (message a and b may be the same).
#[cfg(target_arch = "x86_64")]
unsafe fn sha1_pair_ni(a: &[u8], b: &[u8], out_a: &mut [u8], out_b: &mut [u8]) {
    debug_assert_eq!(a.len(), b.len());
    let len = a.len();
    let full = len / 64;
    let mut st = [ni::init(&IV), ni::init(&IV)];
    ni::compress2(&mut st, [a.as_ptr(), b.as_ptr()], full);
    let (pa, n) = padding(&a[full * 64..], len as u64);
    let (pb, _) = padding(&b[full * 64..], len as u64);
    ni::compress2(&mut st, [pa.as_ptr(), pb.as_ptr()], n);
    store(&ni::finish(st[0]), out_a);
    store(&ni::finish(st[1]), out_b);
}

/// Which compressor this process uses, fixed at load time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Impl {
    ShaNi,
    Portable,
}

pub fn detect() -> Impl {
    if has_sha_ni() { Impl::ShaNi } else { Impl::Portable }
}

/// SHA-1 of one message.
pub fn sha1(imp: Impl, msg: &[u8], out: &mut [u8]) {
    match imp {
        #[cfg(target_arch = "x86_64")]
        Impl::ShaNi => {
            let mut spare = [0u8; DIGEST];
            unsafe { sha1_pair_ni(msg, msg, out, &mut spare) }
        }
        _ => sha1_portable(msg, out),
    }
}

/// SHA-1 of every block of `data` (blocks of `bs` bytes, a shorter final
/// block), 20 bytes each into `out`. Returns the block count. The caller
/// has checked that out holds them all.
pub fn sha1_blocks(imp: Impl, data: &[u8], bs: usize, out: &mut [u8]) -> usize {
    let n = (data.len() + bs - 1) / bs;
    let full = data.len() / bs;
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if imp == Impl::ShaNi {
        while i + 2 <= full {
            let (o1, o2) = out[i * DIGEST..(i + 2) * DIGEST].split_at_mut(DIGEST);
            unsafe { sha1_pair_ni(&data[i * bs..(i + 1) * bs], &data[(i + 1) * bs..(i + 2) * bs], o1, o2) };
            i += 2;
        }
    }
    while i < n {
        let end = ((i + 1) * bs).min(data.len());
        sha1(imp, &data[i * bs..end], &mut out[i * DIGEST..(i + 1) * DIGEST]);
        i += 1;
    }
    n
}
