//! The gallery's stored rows: float16/bfloat16/int8 decoders and the dot products of a
//! float32 query with stored rows, decoded in registers.
//!
//! The fused dots have one loop per instruction set (NEON, AVX2, AVX-512) that differ only
//! in register width, intrinsics and accumulator count: copies by choice, since each names
//! its own instructions (a 16-bit load widened in one conversion, the FMA of that width),
//! which the generic `multiversion!` loops above cannot.

use super::*;

/// IEEE half-precision bits to f32, exactly, without branches so that loops vectorise on
/// every instruction set (no F16C needed).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    // Exponent and mantissa moved to their f32 positions; the exponent is still biased by 15.
    let em = (h & 0x7fff) << 13;
    let exponent = em & (0x1f << 23);
    let normal = em + ((127 - 15) << 23);
    // Subnormal halves are m * 2^-24: build 2^-14 * (1 + m/1024) and subtract 2^-14.
    let subnormal = (f32::from_bits(em + (113 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let inf_nan = em | (0xff << 23);
    let bits = if exponent == 0 {
        subnormal
    } else if exponent == 0x1f << 23 {
        inf_nan
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// bfloat16 bits to f32 (they are the top half of an f32).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// An int8 code as f32 (the per-row scale is applied to dot products, not here).
#[inline(always)]
fn i8_to_f32(c: i8) -> f32 {
    c as f32
}

#[inline(always)]
fn decode_with<S: Copy>(src: &[S], dst: &mut [f32], decode: impl Fn(S) -> f32) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = decode(s);
    }
}

#[inline(always)]
fn decode_f16_impl(src: &[u16], dst: &mut [f32]) {
    decode_with(src, dst, f16_to_f32)
}

#[inline(always)]
fn decode_bf16_impl(src: &[u16], dst: &mut [f32]) {
    decode_with(src, dst, bf16_to_f32)
}

#[inline(always)]
fn decode_i8_impl(src: &[i8], dst: &mut [f32]) {
    decode_with(src, dst, i8_to_f32)
}

multiversion! {
    /// float16 bits to float32.
    pub fn decode_f16(src: &[u16], dst: &mut [f32]) = decode_f16_impl;
}

multiversion! {
    /// bfloat16 bits to float32.
    pub fn decode_bf16(src: &[u16], dst: &mut [f32]) = decode_bf16_impl;
}

multiversion! {
    /// int8 codes to float32 (unscaled).
    pub fn decode_i8(src: &[i8], dst: &mut [f32]) = decode_i8_impl;
}

/// Dot products of a float32 query with rows of stored values, decoded on the fly: the
/// decode happens in registers, so the search reads each stored byte once and writes nothing.
#[inline(always)]
fn dots_decoded_impl<'r, S: Copy + 'r>(
    query: &[f32],
    rows: impl Iterator<Item = &'r [S]>,
    out: &mut [f32],
    decode: impl Fn(S) -> f32,
) {
    let d = query.len();
    for (row, o) in rows.zip(out) {
        let mut acc = [0.0f32; LANES];
        let body = d / LANES * LANES;
        for (q, r) in query[..body]
            .chunks_exact(LANES)
            .zip(row[..body].chunks_exact(LANES))
        {
            for k in 0..LANES {
                acc[k] += q[k] * decode(r[k]);
            }
        }
        let tail: f32 = query[body..]
            .iter()
            .zip(&row[body..])
            .map(|(&q, &r)| q * decode(r))
            .sum();
        *o = acc.iter().sum::<f32>() + tail;
    }
}

/// `out[r] = query · rows[r]` for rows of stored values: the AVX-512 loop where the CPU
/// has it (`avx512` turns 16 stored values at `p` into a vector), the AVX2 loop (`avx2`: 8
/// values) where it has that, inside functions compiled for those features so that their
/// intrinsics inline; the portable `decode` loop elsewhere.
macro_rules! stored_dots {
    ($(#[$doc:meta])* pub fn $name:ident(rows: &[$s:ty]), at: $at:ident, $decode:ident,
     avx512: |$p:ident| $load:expr, avx2: |$p3:ident| $load3:expr,
     neon: |$pn:ident| $loadn:expr) => {
        $(#[$doc])*
        pub fn $name(query: &[f32], rows: &[$s], out: &mut [f32]) {
            let d = query.len();
            $at(query, rows, d, &mut (0..rows.len() / d.max(1)), out)
        }

        /// The same for the rows of `rows` (consecutive rows of `d` values) at `positions`,
        /// in one dispatch (a subset of a gallery).
        pub fn $at(
            query: &[f32],
            rows: &[$s],
            d: usize,
            positions: &mut dyn Iterator<Item = usize>,
            out: &mut [f32],
        ) {
            let picked = positions.map(|p| &rows[p * d..(p + 1) * d]);
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,fma")]
                fn v4<'r>(q: &[f32], rows: impl Iterator<Item = &'r [$s]>, out: &mut [f32]) {
                    use std::arch::x86_64::*;
                    // SAFETY: reads 16 values, which dots_avx512 guarantees are in bounds.
                    let load = |$p: *const $s| unsafe { $load };
                    dots_avx512(q, rows, out, load, $decode)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                fn v3<'r>(q: &[f32], rows: impl Iterator<Item = &'r [$s]>, out: &mut [f32]) {
                    use std::arch::x86_64::*;
                    // SAFETY: reads 8 values, which dots_avx2 guarantees are in bounds.
                    let load = |$p3: *const $s| unsafe { $load3 };
                    dots_avx2(q, rows, out, load, $decode)
                }
                match simd_level() {
                    // SAFETY: simd_level() confirmed the CPU has these features.
                    4 => return unsafe { v4(query, picked, out) },
                    3 => return unsafe { v3(query, picked, out) },
                    _ => {}
                }
            }
            #[cfg(target_arch = "aarch64")]
            if simd_level() == SimdLevel::Neon as u8 {
                #[allow(unused_imports)]
                use std::arch::aarch64::*;
                // SAFETY: reads 4 values, which dots_neon guarantees are in bounds (NEON is
                // part of every aarch64 CPU).
                let load = |$pn: *const $s| unsafe { $loadn };
                return dots_neon(query, picked, out, load, $decode);
            }
            dots_decoded_impl(query, picked, out, $decode);
        }
    };
}

#[inline(always)]
fn f32_as_is(x: f32) -> f32 {
    x
}

stored_dots! {
    /// `out[r] = query · rows[r]` for float32 rows (the stored-row loop without a decode:
    /// its four accumulators keep a single query at the memory bandwidth).
    pub fn dots_f32(rows: &[f32]), at: dots_f32_at, f32_as_is,
    avx512: |p| _mm512_loadu_ps(p),
    avx2: |p| _mm256_loadu_ps(p),
    neon: |p| vld1q_f32(p)
}

stored_dots! {
    /// `out[r] = query · rows[r]` for rows stored as float16 bits.
    pub fn dots_f16(rows: &[u16]), at: dots_f16_at, f16_to_f32,
    avx512: |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
    avx2: |p| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    neon: |p| f16x4_to_f32(vld1_u16(p))
}

stored_dots! {
    /// `out[r] = query · rows[r]` for rows stored as bfloat16 bits.
    pub fn dots_bf16(rows: &[u16]), at: dots_bf16_at, bf16_to_f32,
    avx512: |p| {
        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
    },
    avx2: |p| {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    },
    neon: |p| vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p)))
}

stored_dots! {
    /// `out[r] = query · rows[r]` for rows of int8 codes (unscaled).
    pub fn dots_i8(rows: &[i8]), at: dots_i8_at, i8_to_f32,
    avx512: |p| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))),
    avx2: |p| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))),
    neon: |p| {
        // 4 codes in the low lanes: int8 -> int16 -> int32 -> float32
        let four = vreinterpret_s8_u32(vdup_n_u32((p as *const u32).read_unaligned()));
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(four))))
    }
}

/// Four float16 values (bits) to float32 with one `fcvtl` (Rust's NEON float16 types are
/// not stable yet, hence the instruction itself).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn f16x4_to_f32(bits: std::arch::aarch64::uint16x4_t) -> std::arch::aarch64::float32x4_t {
    let out;
    // SAFETY: fcvtl reads and writes registers only; every aarch64 CPU has it.
    unsafe {
        std::arch::asm!("fcvtl {o:v}.4s, {i:v}.4h", o = out(vreg) out, i = in(vreg) bits,
                        options(pure, nomem, nostack))
    };
    out
}

/// The NEON loop of the fused dots: `load` decodes 4 stored values into a register, four
/// accumulators hide the FMA latency, `decode` handles the tail.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn dots_neon<'r, S: Copy + 'r>(
    query: &[f32],
    rows: impl Iterator<Item = &'r [S]>,
    out: &mut [f32],
    load: impl Fn(*const S) -> std::arch::aarch64::float32x4_t,
    decode: impl Fn(S) -> f32,
) {
    use std::arch::aarch64::*;
    let d = query.len();
    let body = d / 16 * 16;
    for (row, o) in rows.zip(out) {
        // SAFETY: j + 16 <= d, the length of both `row` and `query`.
        unsafe {
            let (q, r) = (query.as_ptr(), row.as_ptr());
            let mut acc = [vdupq_n_f32(0.0); 4];
            let mut j = 0;
            while j < body {
                for (k, a) in acc.iter_mut().enumerate() {
                    let off = j + 4 * k;
                    *a = vfmaq_f32(*a, vld1q_f32(q.add(off)), load(r.add(off)));
                }
                j += 16;
            }
            let sum = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
            let tail: f32 = query[body..]
                .iter()
                .zip(&row[body..])
                .map(|(&q, &r)| q * decode(r))
                .sum();
            *o = vaddvq_f32(sum) + tail;
        }
    }
}

/// The AVX2 loop of the fused dots: `load` decodes 8 stored values into a register, four
/// accumulators hide the FMA latency, `decode` handles the tail.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dots_avx2<'r, S: Copy + 'r>(
    query: &[f32],
    rows: impl Iterator<Item = &'r [S]>,
    out: &mut [f32],
    load: impl Fn(*const S) -> std::arch::x86_64::__m256,
    decode: impl Fn(S) -> f32,
) {
    use std::arch::x86_64::*;
    let d = query.len();
    let body = d / 32 * 32;
    for (row, o) in rows.zip(out) {
        // SAFETY: j + 32 <= d, the length of both `row` and `query`; the caller enabled
        // AVX2 and FMA.
        unsafe {
            let q = query.as_ptr();
            let r = row.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut j = 0;
            while j < body {
                for (k, a) in acc.iter_mut().enumerate() {
                    let off = j + 8 * k;
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(off)), load(r.add(off)), *a);
                }
                j += 32;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
            let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
            let one = _mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair));
            let tail: f32 = query[body..]
                .iter()
                .zip(&row[body..])
                .map(|(&q, &r)| q * decode(r))
                .sum();
            *o = _mm_cvtss_f32(one) + tail;
        }
    }
}

/// The AVX-512 loop of the fused dots: `load` decodes 16 stored values into a register,
/// two accumulators hide the FMA latency, `decode` handles the tail.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dots_avx512<'r, S: Copy + 'r>(
    query: &[f32],
    rows: impl Iterator<Item = &'r [S]>,
    out: &mut [f32],
    load: impl Fn(*const S) -> std::arch::x86_64::__m512,
    decode: impl Fn(S) -> f32,
) {
    use std::arch::x86_64::*;
    let d = query.len();
    let body = d / 32 * 32;
    for (row, o) in rows.zip(out) {
        // SAFETY: j + 32 <= d, the length of both `row` and `query`; the caller enabled
        // AVX-512F.
        unsafe {
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut j = 0;
            while j < body {
                let q0 = _mm512_loadu_ps(query.as_ptr().add(j));
                let q1 = _mm512_loadu_ps(query.as_ptr().add(j + 16));
                a0 = _mm512_fmadd_ps(q0, load(row.as_ptr().add(j)), a0);
                a1 = _mm512_fmadd_ps(q1, load(row.as_ptr().add(j + 16)), a1);
                j += 32;
            }
            let tail: f32 = query[body..]
                .iter()
                .zip(&row[body..])
                .map(|(&q, &r)| q * decode(r))
                .sum();
            *o = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + tail;
        }
    }
}
