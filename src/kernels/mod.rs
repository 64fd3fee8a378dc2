//! Row kernels of the head (scale, max, exp and sums, dot, projection), vectorised.
//!
//! Each kernel is written once, generically, with independent accumulator lanes so the
//! compiler can vectorise the reductions, and compiled three times: AVX-512, AVX2+FMA and the
//! baseline (on aarch64 the baseline has NEON; the stored-row dots also have NEON loops);
//! the best one the CPU supports is picked at run time, so one binary runs everywhere.
//! float32 uses a branch-free exp (below) that vectorises; float64 uses `exp`.

use crate::real::Real;

/// Accumulator lanes: enough independent chains to fill a 512-bit register of f32.
const LANES: usize = 16;

/// The instruction sets the kernels are compiled for, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// The portable loops (any CPU).
    Scalar = 1,
    /// aarch64's Advanced SIMD (every aarch64 CPU has it): the stored-row dots' NEON loops.
    Neon = 2,
    /// AVX2 + FMA.
    Avx2 = 3,
    /// AVX-512 F/VL/BW/DQ + FMA.
    Avx512 = 4,
}

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Neon => "neon",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "neon" => Some(SimdLevel::Neon),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// The best level this CPU supports.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("fma")
            {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return SimdLevel::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        return SimdLevel::Neon;
        #[allow(unreachable_code)]
        SimdLevel::Scalar
    }

    /// Whether this CPU can run the level (the portable loops run everywhere; NEON only on
    /// aarch64; AVX2 and AVX-512 only on x86-64 CPUs that have them).
    fn available(self) -> bool {
        let best = SimdLevel::detected();
        match self {
            SimdLevel::Scalar => true,
            SimdLevel::Neon => best == SimdLevel::Neon,
            SimdLevel::Avx2 | SimdLevel::Avx512 => best >= self, // (Neon ranks below both)
        }
    }

    /// The level `ARCFACE_RS_SIMD` asks for (unset: the best detected). A level this CPU
    /// lacks, or an unknown name, is an error naming what the CPU can do.
    pub fn from_env(value: Option<&str>) -> Result<Self, String> {
        let best = SimdLevel::detected();
        let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
            return Ok(best);
        };
        match SimdLevel::parse(value) {
            None => Err(format!(
                "ARCFACE_RS_SIMD={value:?}: must be avx512, avx2, neon or scalar (this CPU's \
                 best level is {})",
                best.name()
            )),
            Some(asked) if !asked.available() => Err(format!(
                "ARCFACE_RS_SIMD={value:?}: this CPU lacks {}; its best level is {}",
                asked.name(),
                best.name()
            )),
            Some(asked) => Ok(asked),
        }
    }
}

/// The level in force: the best the CPU has, capped by `ARCFACE_RS_SIMD` (read once, at
/// first use). An invalid value falls back to the best level here; [`simd_check`] reports
/// it (the Python module refuses to import with it).
pub fn simd_in_use() -> SimdLevel {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let value = std::env::var("ARCFACE_RS_SIMD").ok();
        SimdLevel::from_env(value.as_deref()).unwrap_or_else(|_| SimdLevel::detected())
    })
}

/// The error of an invalid `ARCFACE_RS_SIMD`, if it is set to one.
pub fn simd_check() -> Result<(), String> {
    let value = std::env::var("ARCFACE_RS_SIMD").ok();
    SimdLevel::from_env(value.as_deref()).map(|_| ())
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline]
fn simd_level() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(0);
    let cached = LEVEL.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let level = simd_in_use() as u8;
    LEVEL.store(level, Ordering::Relaxed);
    level
}

/// Defines `pub fn $name` that runs `$imp` compiled for the best instruction set available
/// (generic over `T: Real` or not: the gallery's storage decoders are plain).
macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident $(<$g:ident: Real>)? ($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $imp:ident;) => {
        $(#[$doc])*
        pub fn $name $(<$g: Real>)? ($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                fn v4 $(<$g: Real>)? ($($a: $t),*) $(-> $r)? {
                    $imp($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3 $(<$g: Real>)? ($($a: $t),*) $(-> $r)? {
                    $imp($($a),*)
                }
                match simd_level() {
                    // SAFETY: simd_level() confirmed the CPU has these features.
                    4 => return unsafe { v4($($a),*) },
                    3 => return unsafe { v3($($a),*) },
                    _ => {}
                }
            }
            $imp($($a),*)
        }
    };
}

#[inline(always)]
fn fmax<T: Real>(a: T, b: T) -> T {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn scale_clamp_impl<T: Real>(z: &mut [T], inv: &[T], scale: T) {
    let (one, minus_one) = (T::one(), -T::one());
    for (v, &i) in z.iter_mut().zip(inv) {
        let c = *v * i;
        let c = if c > one { one } else { c };
        let c = if c < minus_one { minus_one } else { c };
        *v = scale * c;
    }
}

multiversion! {
    /// `z[j] = scale * clamp(z[j] * inv[j], -1, 1)`: raw dot products to scaled cosines.
    pub fn scale_clamp<T: Real>(z: &mut [T], inv: &[T], scale: T) -> () = scale_clamp_impl;
}

#[inline(always)]
fn max_impl<T: Real>(z: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = z.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = fmax(acc[k], c[k]);
        }
    }
    let m = acc.iter().fold(T::neg_infinity(), |a, &b| fmax(a, b));
    rest.iter().fold(m, |a, &b| fmax(a, b))
}

multiversion! {
    /// Largest element (-inf for an empty slice).
    pub fn max<T: Real>(z: &[T]) -> T = max_impl;
}

/// Over row `sims` of anchor `a`'s similarities (`labels[j]` the label of row j, -1 for
/// none): the least similar positive's value and the most similar negative's, +inf / -inf
/// when there is none. LANES independent minima and maxima: the comparisons form no chain
/// and the loop vectorises.
#[inline(always)]
fn hardest_similarities_impl<T: Real>(sims: &[T], labels: &[i64], a: usize) -> (T, T) {
    const LANES: usize = 16;
    let ya = labels[a];
    let (mut least_pos, mut most_neg) = ([T::infinity(); LANES], [T::neg_infinity(); LANES]);
    let whole = sims.len().min(labels.len()) / LANES * LANES;
    for (c, (sv, lv)) in sims[..whole]
        .chunks_exact(LANES)
        .zip(labels[..whole].chunks_exact(LANES))
        .enumerate()
    {
        for l in 0..LANES {
            let (v, y) = (sv[l], lv[l]);
            let pos = y == ya && c * LANES + l != a;
            let neg = y != ya && y != -1;
            let lp = if pos { v } else { T::infinity() };
            let mn = if neg { v } else { T::neg_infinity() };
            least_pos[l] = if lp < least_pos[l] { lp } else { least_pos[l] };
            most_neg[l] = if mn > most_neg[l] { mn } else { most_neg[l] };
        }
    }
    for (j, (&v, &y)) in sims.iter().zip(labels).enumerate().skip(whole) {
        if y == ya && j != a && v < least_pos[0] {
            least_pos[0] = v;
        }
        if y != ya && y != -1 && v > most_neg[0] {
            most_neg[0] = v;
        }
    }
    (
        least_pos.iter().fold(T::infinity(), |m, &v| m.min(v)),
        most_neg.iter().fold(T::neg_infinity(), |m, &v| m.max(v)),
    )
}

multiversion! {
    /// The batch-hard miner's extremes of one anchor (see `hardest_similarities_impl`).
    pub fn hardest_similarities<T: Real>(sims: &[T], labels: &[i64], a: usize) -> (T, T) = hardest_similarities_impl;
}

#[inline(always)]
fn exp_in_place_impl<T: Real>(z: &mut [T], shift: T) -> (T, T) {
    let mut sum = [T::zero(); LANES];
    let mut sum_ez = [T::zero(); LANES];
    let n = z.len() / LANES * LANES;
    let (body, rest) = z.split_at_mut(n);
    for c in body.chunks_exact_mut(LANES) {
        for k in 0..LANES {
            let e = T::fast_exp(c[k] - shift);
            sum[k] += e;
            sum_ez[k] += e * c[k];
            c[k] = e;
        }
    }
    let (mut s, mut sz): (T, T) = (sum.iter().copied().sum(), sum_ez.iter().copied().sum());
    for v in rest {
        let e = T::fast_exp(*v - shift);
        s += e;
        sz += e * *v;
        *v = e;
    }
    (s, sz)
}

multiversion! {
    /// Replaces `z[j]` by `e[j] = exp(z[j] - shift)`; returns `(Σ e[j], Σ e[j] z[j])`.
    pub fn exp_in_place<T: Real>(z: &mut [T], shift: T) -> (T, T) = exp_in_place_impl;
}

#[inline(always)]
fn scale_mul_impl<T: Real>(e: &[T], k: T, inv: &[T], g: &mut [T]) {
    for ((gv, &ev), &iv) in g.iter_mut().zip(e).zip(inv) {
        *gv = k * ev * iv;
    }
}

multiversion! {
    /// `g[j] = k * e[j] * inv[j]`.
    pub fn scale_mul<T: Real>(e: &[T], k: T, inv: &[T], g: &mut [T]) -> () = scale_mul_impl;
}

#[inline(always)]
fn scale_mul_above_impl<T: Real>(e: &[T], k: T, inv: &[T], floor: T, g: &mut [T]) -> usize {
    let mut kept = [0u32; LANES];
    let n = e.len().min(g.len()).min(inv.len()) / LANES * LANES;
    for ((gc, ec), ic) in g[..n]
        .chunks_exact_mut(LANES)
        .zip(e[..n].chunks_exact(LANES))
        .zip(inv[..n].chunks_exact(LANES))
    {
        for l in 0..LANES {
            let keep = ec[l].abs() >= floor;
            gc[l] = if keep { k * ec[l] * ic[l] } else { T::zero() };
            kept[l] += u32::from(keep);
        }
    }
    let mut total: usize = kept.iter().map(|&c| c as usize).sum();
    for ((gv, &ev), &iv) in g[n..].iter_mut().zip(&e[n..]).zip(&inv[n..]) {
        let keep = ev.abs() >= floor;
        *gv = if keep { k * ev * iv } else { T::zero() };
        total += usize::from(keep);
    }
    total
}

multiversion! {
    /// `g[j] = k * e[j] * inv[j]` where `|e[j]| >= floor`, else 0; returns how many were kept
    /// (the gradient filter: entries whose softmax probability rounds to nothing).
    pub fn scale_mul_above<T: Real>(e: &[T], k: T, inv: &[T], floor: T, g: &mut [T]) -> usize = scale_mul_above_impl;
}

/// Calls `f(j, v)` for every non-zero `v = g[j]`, in order; blocks of zeros are skipped
/// with one test (a filtered gradient row is mostly zeros).
#[inline]
pub fn nonzeros<T: Real>(g: &[T], mut f: impl FnMut(usize, T)) {
    const BLOCK: usize = 16;
    for (b, block) in g.chunks(BLOCK).enumerate() {
        // all-zero test without branches per element (vectorises)
        let any = block.iter().fold(T::zero(), |acc, v| acc + v.abs());
        if any == T::zero() {
            continue;
        }
        for (k, &v) in block.iter().enumerate() {
            if v != T::zero() {
                f(b * BLOCK + k, v);
            }
        }
    }
}

#[inline(always)]
fn axpy_impl<T: Real>(a: T, x: &[T], y: &mut [T]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

multiversion! {
    /// `y += a * x`.
    pub fn axpy<T: Real>(a: T, x: &[T], y: &mut [T]) -> () = axpy_impl;
}

/// A row's rule for its non-target cosines, as the kernels apply it: a cosine above
/// `filter` becomes 0 with no gradient (inter-class filtering, `+inf` for none), then one
/// above `above` (a hard negative, `+inf` for none) becomes `c (t + c)` (`curricular`) or
/// `t c + t - 1` (MV-Softmax): the one definition of these rules (margin.rs's
/// `HardNegatives` says where each row's hard negatives start and what its t is).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonTarget<T> {
    pub filter: T,
    pub above: T,
    pub t: T,
    pub curricular: bool,
}

impl<T: Real> NonTarget<T> {
    /// `(h(c), h'(c))` of one non-target cosine.
    #[inline(always)]
    pub fn apply(&self, c: T) -> (T, T) {
        let (c, d) = if c > self.filter {
            (T::zero(), T::zero())
        } else {
            (c, T::one())
        };
        if c <= self.above {
            (c, d)
        } else if self.curricular {
            (c * (self.t + c), d * (self.t + c + c))
        } else {
            (self.t * c + self.t - T::one(), d * self.t)
        }
    }
}

#[inline(always)]
fn nontarget_logits_impl<T: Real>(cos: &[T], rule: NonTarget<T>, scale: T, z: &mut [T]) {
    for (zv, &c) in z.iter_mut().zip(cos) {
        *zv = scale * rule.apply(c).0;
    }
}

multiversion! {
    /// `z[j] = scale * h(cos[j])` under a row's [`NonTarget`] rule.
    pub fn nontarget_logits<T: Real>(cos: &[T], rule: NonTarget<T>, scale: T, z: &mut [T]) -> () = nontarget_logits_impl;
}

#[inline(always)]
fn nontarget_stash_impl<T: Real>(cos: &mut [T], e: &[T], rule: NonTarget<T>) {
    for (c, &ev) in cos.iter_mut().zip(e) {
        *c = ev * rule.apply(*c).1;
    }
}

multiversion! {
    /// `cos[j] = e[j] * h'(cos[j])` in place: the stash of a tile under a [`NonTarget`]
    /// rule, so that pass 2 turns it into the gradient with one multiply, as for plain tiles.
    pub fn nontarget_stash<T: Real>(cos: &mut [T], e: &[T], rule: NonTarget<T>) -> () = nontarget_stash_impl;
}

#[inline(always)]
fn dot_impl<T: Real>(a: &[T], b: &[T]) -> T {
    // Two registers of partial sums: one chain of FMAs would wait on its own latency.
    const W: usize = 2 * LANES;
    let mut acc = [T::zero(); W];
    let n = a.len().min(b.len()) / W * W;
    for (ac, bc) in a[..n].chunks_exact(W).zip(b[..n].chunks_exact(W)) {
        for k in 0..W {
            acc[k] += ac[k] * bc[k];
        }
    }
    let s: T = acc.iter().copied().sum();
    s + a[n..].iter().zip(&b[n..]).map(|(&x, &y)| x * y).sum::<T>()
}

multiversion! {
    /// `Σ a[j] b[j]`.
    pub fn dot<T: Real>(a: &[T], b: &[T]) -> T = dot_impl;
}

#[inline(always)]
fn dots_impl<T: Real>(query: &[T], rows: &[T], out: &mut [T]) {
    let d = query.len();
    for (row, o) in rows.chunks_exact(d).zip(out) {
        *o = dot_impl(query, row);
    }
}

#[inline(always)]
fn dots_self_impl<T: Real>(rows: &[T], d: usize, out: &mut [T]) {
    for (row, o) in rows.chunks_exact(d).zip(out) {
        *o = dot_impl(row, row);
    }
}

#[inline(always)]
fn dots_and_squares_impl<T: Real>(query: &[T], rows: &[T], dots: &mut [T], squares: &mut [T]) {
    let d = query.len();
    for ((row, o), sq) in rows.chunks_exact(d).zip(dots).zip(squares) {
        let (mut acc, mut acc_sq) = ([T::zero(); LANES], [T::zero(); LANES]);
        let n = d / LANES * LANES;
        for (qc, rc) in query[..n]
            .chunks_exact(LANES)
            .zip(row[..n].chunks_exact(LANES))
        {
            for k in 0..LANES {
                acc[k] += qc[k] * rc[k];
                acc_sq[k] += rc[k] * rc[k];
            }
        }
        let tail = query[n..].iter().zip(&row[n..]);
        *o = acc.iter().copied().sum::<T>() + tail.clone().map(|(&a, &b)| a * b).sum::<T>();
        *sq = acc_sq.iter().copied().sum::<T>() + tail.map(|(_, &b)| b * b).sum::<T>();
    }
}

multiversion! {
    /// `dots[r] = query · rows[r]` and `squares[r] = rows[r] · rows[r]` in one read of the
    /// rows (one query against rows that still need their norms).
    pub fn dots_and_squares<T: Real>(query: &[T], rows: &[T], dots: &mut [T], squares: &mut [T]) -> () = dots_and_squares_impl;
}

multiversion! {
    /// `out[r] = rows[r] · rows[r]` (squared norms) for consecutive rows of `d` values.
    pub fn dots_self<T: Real>(rows: &[T], d: usize, out: &mut [T]) -> () = dots_self_impl;
}

multiversion! {
    /// `out[r] = query · rows[r]` for consecutive rows of `query.len()` values: one dispatch
    /// for a whole block of rows.
    pub fn dots<T: Real>(query: &[T], rows: &[T], out: &mut [T]) -> () = dots_impl;
}

#[inline(always)]
fn sum_squares_impl<T: Real>(a: &[T]) -> f64 {
    // f64 accumulation: a float32 row's squared norm can neither overflow nor lose digits.
    let mut acc = [0.0f64; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            let v = c[k].f64();
            acc[k] += v * v;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|v| v.f64() * v.f64()).sum::<f64>()
}

multiversion! {
    /// `Σ a[j]^2`, accumulated in f64.
    pub fn sum_squares<T: Real>(a: &[T]) -> f64 = sum_squares_impl;
}

/// Below this a squared norm summed in f64 may have lost digits to underflow (only float64
/// rows this tiny get here: a float32 row's squares cannot underflow in f64).
const SUMSQ_MIN: f64 = 1e-280;

/// `||a||`, accurate for every finite row: NaN for a row with NaN or inf, 0 only for a row
/// of zeros. The squares are summed in f64; a float64 row whose squares over- or underflow
/// there (entries beyond ~1e154 or below ~1e-140) is summed again scaled by its largest
/// entry, as BLAS nrm2 does.
pub fn norm<T: Real>(a: &[T]) -> f64 {
    let sumsq = sum_squares(a);
    if sumsq.is_finite() && sumsq >= SUMSQ_MIN {
        return sumsq.sqrt();
    }
    if sumsq.is_nan() {
        return f64::NAN;
    }
    let peak = a.iter().fold(0.0f64, |m, v| m.max(v.f64().abs()));
    if !peak.is_finite() || a.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    if peak == 0.0 {
        return 0.0;
    }
    let scaled: f64 = a.iter().map(|v| (v.f64() / peak).powi(2)).sum();
    peak * scaled.sqrt()
}

/// Whether products over a row of this norm stay normal numbers of `T` (see
/// `Real::SAFE_SCALE`); rows outside are rescaled with [`rescale_row`] first. NaN is not.
#[inline]
pub fn norm_in_safe_range<T: Real>(norm: f64) -> bool {
    norm <= T::SAFE_SCALE && norm >= 1.0 / T::SAFE_SCALE
}

/// `row` scaled by a power of two so that its norm is about 1 (exact: only the exponent
/// changes, up to the rounding of entries that leave the denormal range).
pub fn rescale_row<T: Real>(row: &mut [T], norm: f64) {
    let e = -(norm.log2().round() as i32);
    // in two steps: 2^e itself need not be a normal f64
    let (lo, hi) = (2f64.powi(e / 2), 2f64.powi(e - e / 2));
    for v in row.iter_mut() {
        *v = T::of(v.f64() * lo * hi);
    }
}

/// `out = a / norm` (the unit row), exact to rounding for any finite non-zero norm:
/// multiplies by the reciprocal where it is representable in `T`, else divides in f64.
pub fn unit_into<T: Real>(a: &[T], norm: f64, out: &mut [T]) {
    let inv = 1.0 / norm;
    if inv.is_finite() && inv <= T::SAFE_SCALE && inv >= 1.0 / T::SAFE_SCALE {
        let inv = T::of(inv);
        for (o, &v) in out.iter_mut().zip(a) {
            *o = v * inv;
        }
    } else {
        for (o, &v) in out.iter_mut().zip(a) {
            *o = T::of(v.f64() / norm);
        }
    }
}

#[inline(always)]
fn project_out_impl<T: Real>(g: &mut [T], w: &[T], inv: T) {
    let k = dot_impl(g, w) * inv * inv;
    for (gv, &wv) in g.iter_mut().zip(w) {
        *gv -= wv * k;
    }
}

multiversion! {
    /// Removes from `g` its component along `w` (`inv` = 1/||w||): `g -= ŵ (ŵ·g)`.
    pub fn project_out<T: Real>(g: &mut [T], w: &[T], inv: T) -> () = project_out_impl;
}

/// exp for float32 without branches, so loops over it vectorise.
///
/// exp(x) = 2^n e^r with n = round(x log2 e) and |r| <= ln2/2; e^r by its degree-7 Taylor
/// polynomial (truncation error < 5e-9, below float32 rounding). Inputs are clamped to
/// [-87.3, 88.7] so 2^n stays a normal number: exp(x < -87.3) returns ~1.2e-38 instead of
/// a denormal or 0, an absolute error far below anything the head adds it to.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let pow2 = f32::from_bits(((ni + 127) as u32) << 23);
    p * pow2
}

mod stored;
pub use stored::*;

#[cfg(test)]
mod tests;
