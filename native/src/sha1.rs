//! SHA-1 of many equal blocks. With the x86 SHA extensions (SHA-NI) several
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

    /// Compresses `chunks` 64-byte chunks of N messages at once into N
    /// states, their instruction streams interleaved. `abcd` holds A in lane
    /// 3 (reversed word order), `e` holds E in lane 3, as the SHA
    /// instructions expect.
    #[target_feature(enable = "sha,sse4.1,ssse3")]
    #[allow(unused_assignments)] // the last schedule words written are not read again
    pub unsafe fn compress<const N: usize>(st: &mut [(__m128i, __m128i); N], p: [*const u8; N], chunks: usize) {
        let mask = _mm_set_epi64x(0x0001_0203_0405_0607, 0x0809_0a0b_0c0d_0e0f);
        let mut abcd = [_mm_setzero_si128(); N];
        let mut e = [_mm_setzero_si128(); N];
        for k in 0..N {
            abcd[k] = st[k].0;
            e[k] = st[k].1;
        }
        for c in 0..chunks {
            let save_a = abcd;
            let save_e = e;
            // Message words, W0 in lane 3.
            let mut m = [[_mm_setzero_si128(); 4]; N];
            for k in 0..N {
                let q = p[k].add(64 * c);
                for j in 0..4 {
                    m[k][j] = _mm_shuffle_epi8(_mm_loadu_si128(q.add(16 * j) as *const __m128i), mask);
                }
            }
            // Group 0 (rounds 0..3): E plus the first four words.
            let mut prev = abcd;
            for k in 0..N {
                abcd[k] = _mm_sha1rnds4_epu32(abcd[k], _mm_add_epi32(e[k], m[k][0]), 0);
            }
            // Groups 1..19: the E of group i comes from A four rounds back
            // (sha1nexte), the schedule from sha1msg1 / xor / sha1msg2.
            macro_rules! group {
                ($i:expr, $f:expr) => {{
                    for k in 0..N {
                        let w = if $i < 4 {
                            m[k][$i % 4]
                        } else {
                            let w = _mm_sha1msg2_epu32(
                                _mm_xor_si128(_mm_sha1msg1_epu32(m[k][$i % 4], m[k][($i + 1) % 4]), m[k][($i + 2) % 4]),
                                m[k][($i + 3) % 4],
                            );
                            m[k][$i % 4] = w;
                            w
                        };
                        let x = _mm_sha1nexte_epu32(prev[k], w);
                        prev[k] = abcd[k];
                        abcd[k] = _mm_sha1rnds4_epu32(abcd[k], x, $f);
                    }
                }};
            }
            group!(1, 0); group!(2, 0); group!(3, 0); group!(4, 0);
            group!(5, 1); group!(6, 1); group!(7, 1); group!(8, 1); group!(9, 1);
            group!(10, 2); group!(11, 2); group!(12, 2); group!(13, 2); group!(14, 2);
            group!(15, 3); group!(16, 3); group!(17, 3); group!(18, 3); group!(19, 3);
            for k in 0..N {
                e[k] = _mm_sha1nexte_epu32(prev[k], save_e[k]);
                abcd[k] = _mm_add_epi32(abcd[k], save_a[k]);
            }
        }
        for k in 0..N {
            st[k] = (abcd[k], e[k]);
        }
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

/// Hashes N messages of equal length with SHA-NI, digests to outs.
#[cfg(target_arch = "x86_64")]
unsafe fn sha1_group_ni<const N: usize>(msgs: [&[u8]; N], outs: &mut [u8]) {
    let len = msgs[0].len();
    let full = len / 64;
    let mut st = [ni::init(&IV); N];
    ni::compress::<N>(&mut st, msgs.map(|m| m.as_ptr()), full);
    let pads = msgs.map(|m| padding(&m[full * 64..], len as u64));
    let n = pads[0].1;
    ni::compress::<N>(&mut st, std::array::from_fn(|k| pads[k].0.as_ptr()), n);
    for k in 0..N {
        store(&ni::finish(st[k]), &mut outs[k * DIGEST..(k + 1) * DIGEST]);
    }
}

/// Messages compressed together by sha1_blocks: enough independent streams
/// to cover the latency of sha1rnds4.
pub const STREAMS: usize = 4;

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
        Impl::ShaNi => unsafe { sha1_group_ni::<1>([msg], out) },
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
        while i + STREAMS <= full {
            let msgs: [&[u8]; STREAMS] = std::array::from_fn(|k| &data[(i + k) * bs..(i + k + 1) * bs]);
            unsafe { sha1_group_ni::<STREAMS>(msgs, &mut out[i * DIGEST..(i + STREAMS) * DIGEST]) };
            i += STREAMS;
        }
        if i + 2 <= full {
            unsafe { sha1_group_ni::<2>([&data[i * bs..(i + 1) * bs], &data[(i + 1) * bs..(i + 2) * bs]], &mut out[i * DIGEST..(i + 2) * DIGEST]) };
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
