//! Many-query search with an int8 first pass whose survivors are scored exactly: the same
//! results as the float GEMM path, several times the arithmetic throughput (AVX-512 VNNI
//! `vpdpbusd` does 64 int8 multiply-adds per instruction, a float32 FMA 16). On AVX2
//! without VNNI, `vpmaddubsw` + `vpmaddwd` do 32 multiply-adds in two multiplying
//! instructions where float32 FMAs take four; there the queries are quantised to 63 levels
//! each side so that the 16-bit pair sums of `vpmaddubsw` can never saturate (see [`Pass`]).
//!
//! Queries and gallery rows are quantised per vector to int8: `q = q~ + e_q`, `g = g~ + e_g`
//! with `q~ = sq * codes` and the rounding errors `e` known exactly. The int8 estimate
//! `q~ . g~` differs from the exact score by `q . e_g + e_q . g~`, so by at most
//! `eps = |q| |e_g| + |e_q| |g~|` (Cauchy-Schwarz), plus the rounding of the float score
//! computed for the rows that survive. So every row has an upper bound `ub = est + eps` on
//! its computed score, and a row with `ub < L`, where `L` is the k-th largest score computed
//! so far (or, before there are k, a lower bound `est - eps` from a sample), can never be
//! among the k best. The scan scores the rows with `ub >= L` exactly on the spot, while the
//! tile's rows are still in cache (a few dozen per query: the bounds are tight next to the
//! spread of scores), so the result is the exact top k whatever the data: the quantisation
//! decides how much work is skipped, never the answer.

// The int8 pass has x86 kernels only; elsewhere `available()` is None and nothing calls it.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use super::topk::{Hit, TopK};
use super::{first_bad, Partial, Rows};
use crate::error::Error;
use crate::kernels;
use crate::real::Real;
use ndarray::{ArrayView2, Axis};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// Gallery rows quantised together (their codes, 256 KiB at D=512, stay in L2 while every
/// query block reads them).
const TILE_ROWS: usize = 512;
/// Rows per micro-kernel panel (two 16-lane registers) and queries per block.
const PANEL: usize = 32;
const QBLOCK: usize = 8;

/// The instructions an int8 pass runs on. The queries' codes and their offset differ:
/// `vpdpbusd` takes unsigned codes `q + 128` of up to 127 levels each side; `vpmaddubsw`
/// adds two products into 16 bits with saturation, so a pair `(q + 64) * g` with
/// `|q| <= 63`, `|g| <= 127` stays below 32767: at most `2 * 127 * 127 = 32258`. (31 levels,
/// which would let two outputs add in 16 bits, made the bounds so loose that five times as
/// many rows needed an exact score: slower overall.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    Vnni,
    Avx2,
}

impl Pass {
    /// Query code levels on each side of zero.
    fn levels(self) -> f32 {
        match self {
            Pass::Vnni => 127.0,
            Pass::Avx2 => 63.0,
        }
    }

    /// What is added to each query code to make it unsigned.
    fn offset(self) -> i32 {
        match self {
            Pass::Vnni => 128,
            Pass::Avx2 => 64,
        }
    }
}

/// The int8 pass this CPU runs at the SIMD level in use, if any.
pub(crate) fn available() -> Option<Pass> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::{simd_in_use, SimdLevel};
        use std::sync::OnceLock;
        static PASS: OnceLock<Option<Pass>> = OnceLock::new();
        *PASS.get_or_init(|| match simd_in_use() {
            SimdLevel::Avx512
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni") =>
            {
                Some(Pass::Vnni)
            }
            SimdLevel::Avx512 | SimdLevel::Avx2 => Some(Pass::Avx2),
            SimdLevel::Scalar | SimdLevel::Neon => None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Per-vector quantisation of `v` (as float32) into codes in -127..=127: returns the step,
/// the norm of the rounding error `|v - step * codes|` and the norm `|step * codes|`.
/// (Sums in float32 lanes: their relative error, ~1e-5 at worst, moves the bounds by far
/// less than `SLACK`.)
#[inline(always)]
fn quantise(v: &[f32], out: &mut [i8]) -> (f64, f64, f64) {
    quantise_to(v, out, 127.0)
}

/// [`quantise`] to codes in `-levels..=levels`.
#[inline(always)]
fn quantise_to(v: &[f32], out: &mut [i8], levels: f32) -> (f64, f64, f64) {
    // Written in 16-lane blocks with plain comparisons so that every loop vectorises
    // (f32::max and `as i8` from a float would keep them scalar).
    const L: usize = 16;
    let body = v.len() / L * L;
    let mut peak = [0.0f32; L];
    for c in v[..body].chunks_exact(L) {
        for k in 0..L {
            let a = c[k].abs();
            peak[k] = if a > peak[k] { a } else { peak[k] };
        }
    }
    let max = v[body..]
        .iter()
        .chain(&peak)
        .fold(0.0f32, |m, x| if x.abs() > m { x.abs() } else { m });
    let step = if max > 0.0 && max.is_finite() {
        max / levels
    } else {
        1.0
    };
    let inv = 1.0 / step;
    // Rounding to an integer by adding 1.5 * 2^23 (ties to even, as the FPU rounds): the sum
    // holds the integer in its low mantissa bits, which the compiler vectorises, where
    // `round_ties_even` and `as i32` (NaN and saturation checks) stayed scalar.
    const MAGIC: f32 = 12_582_912.0;
    let code = |x: f32| {
        let biased = (x * inv).clamp(-levels, levels) + MAGIC;
        let int = (biased.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
        (int as i8, biased - MAGIC)
    };
    let (mut err, mut norm) = ([0.0f32; L], [0.0f32; L]);
    for (o, c) in out[..body]
        .chunks_exact_mut(L)
        .zip(v[..body].chunks_exact(L))
    {
        for k in 0..L {
            let (int, q) = code(c[k]);
            o[k] = int;
            let back = q * step;
            err[k] += (c[k] - back) * (c[k] - back);
            norm[k] += back * back;
        }
    }
    let (mut err, mut norm): (f32, f32) = (err.iter().sum(), norm.iter().sum());
    for (o, &x) in out[body..v.len()].iter_mut().zip(&v[body..]) {
        let (int, q) = code(x);
        *o = int;
        let back = q * step;
        err += (x - back) * (x - back);
        norm += back * back;
    }
    (step as f64, (err as f64).sqrt(), (norm as f64).sqrt())
}

/// Slack on every bound: float32 rounding of the unit vectors before quantisation and of the
/// estimates in the scan (all far below 1e-5 for unit vectors).
const SLACK: f64 = 1e-5;

/// The queries as unsigned codes (code + the pass's offset), padded to whole blocks of
/// queries and to a multiple of 8 dimensions with code 0.
struct Queries {
    codes: Vec<u8>,
    step: Vec<f64>,
    /// |q| and |e_q| per query.
    norm: Vec<f64>,
    err: Vec<f64>,
    dpad: usize,
    pass: Pass,
}

fn quantise_queries<T: Real>(qhat: ArrayView2<T>, dpad: usize, pass: Pass) -> Queries {
    let q = qhat.nrows();
    let qpad = q.div_ceil(QBLOCK) * QBLOCK;
    let offset = pass.offset();
    let mut codes = vec![offset as u8; qpad * dpad];
    // (step, |e_q|, |q|) per query; padding queries keep code 0 and zeros
    let mut stats = vec![(0.0, 0.0, 0.0); qpad];
    codes
        .par_chunks_mut(dpad)
        .zip(stats.par_iter_mut())
        .zip(qhat.axis_iter(Axis(0)).into_par_iter())
        .for_each(|((out, stat), row)| {
            let v: Vec<f32> = row.iter().map(|x| x.f64() as f32).collect();
            let mut signed = vec![0i8; dpad];
            let (s, e, _) = quantise_to(&v, &mut signed, pass.levels());
            let norm = row.iter().map(|x| x.f64() * x.f64()).sum::<f64>().sqrt();
            *stat = (s, e, norm);
            for (o, &c) in out.iter_mut().zip(&signed) {
                *o = (c as i16 + offset as i16) as u8;
            }
        });
    let step = stats.iter().map(|s| s.0).collect();
    let err = stats.iter().map(|s| s.1).collect();
    let norm = stats.iter().map(|s| s.2).collect();
    Queries {
        codes,
        step,
        norm,
        err,
        dpad,
        pass,
    }
}

/// One tile of gallery rows, quantised and packed for the micro-kernel: panels of 32 rows,
/// within a panel for each group of 4 dimensions the 4 codes of row 0, row 1, ... row 31.
struct Tile {
    panels: Vec<i8>,
    /// Per row (0 for padding rows): the step, the codes' sum (to take the queries' +128
    /// back out), |e_g| and |g~|.
    step: Vec<f32>,
    sums: Vec<i32>,
    err: Vec<f32>,
    norm: Vec<f32>,
    rows: usize,
    /// Whether each row may be a result (see `Rows::allowed`).
    allowed: Vec<bool>,
    unit: Vec<f32>,
    codes: Vec<i8>,
}

impl Tile {
    fn new(d: usize, dpad: usize) -> Self {
        Tile {
            panels: vec![0; TILE_ROWS * dpad],
            step: vec![0.0; TILE_ROWS],
            sums: vec![0; TILE_ROWS],
            err: vec![0.0; TILE_ROWS],
            norm: vec![0.0; TILE_ROWS],
            rows: 0,
            allowed: vec![true; TILE_ROWS],
            unit: vec![0.0; d],
            codes: vec![0; dpad],
        }
    }

    /// Quantises `mult.len()` unit rows (`block` times `mult`) of `d` values, compiled for
    /// the pass's instruction set.
    fn fill<T: Real>(&mut self, pass: Pass, block: &[T], mult: &[T], d: usize, dpad: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw")]
            fn v4<T: Real>(t: &mut Tile, block: &[T], mult: &[T], d: usize, dpad: usize) {
                t.fill_impl(block, mult, d, dpad)
            }
            #[target_feature(enable = "avx2,fma")]
            fn v3<T: Real>(t: &mut Tile, block: &[T], mult: &[T], d: usize, dpad: usize) {
                t.fill_impl(block, mult, d, dpad)
            }
            // SAFETY: available() chose the pass from the CPU's features.
            match pass {
                Pass::Vnni => unsafe { v4(self, block, mult, d, dpad) },
                Pass::Avx2 => unsafe { v3(self, block, mult, d, dpad) },
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = pass;
            self.fill_impl(block, mult, d, dpad)
        }
    }

    #[inline(always)]
    fn fill_impl<T: Real>(&mut self, block: &[T], mult: &[T], d: usize, dpad: usize) {
        let rows = mult.len();
        self.rows = rows;
        let padded = rows.div_ceil(PANEL) * PANEL;
        self.panels[..padded * dpad].fill(0);
        for v in [&mut self.step, &mut self.err, &mut self.norm] {
            v[..padded].fill(0.0);
        }
        self.sums[..padded].fill(0);
        for r in 0..rows {
            let m = mult[r];
            for (u, &x) in self.unit.iter_mut().zip(&block[r * d..(r + 1) * d]) {
                *u = (x * m).f64() as f32;
            }
            let (step, err, norm) = quantise(&self.unit, &mut self.codes[..d]);
            self.step[r] = step as f32;
            self.err[r] = err as f32;
            self.norm[r] = norm as f32;
            self.sums[r] = self.codes[..d].iter().map(|&c| c as i32).sum();
            let (panel, lane) = (r / PANEL, r % PANEL);
            let base = panel * PANEL * dpad;
            for (quad, four) in self.codes.chunks_exact(4).enumerate() {
                let at = base + quad * PANEL * 4 + lane * 4;
                self.panels[at..at + 4].copy_from_slice(four);
            }
        }
    }
}

/// Per query, the largest k-th lower bound any thread has reached: a valid floor for every
/// thread (a subset's k-th largest lower bound never exceeds the whole's), so a thread that
/// starts on a new stretch of the gallery does not admit everything until it has k rows.
struct Floors(Vec<AtomicU64>);

impl Floors {
    fn new(q: usize) -> Self {
        Floors(
            (0..q)
                .map(|_| AtomicU64::new(f64::NEG_INFINITY.to_bits()))
                .collect(),
        )
    }

    fn get(&self, i: usize) -> f64 {
        f64::from_bits(self.0[i].load(Ordering::Relaxed))
    }

    fn raise(&self, i: usize, v: f64) {
        let mut cur = self.0[i].load(Ordering::Relaxed);
        while v > f64::from_bits(cur) {
            match self.0[i].compare_exchange_weak(
                cur,
                v.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }
}

/// What one thread has found: per query, the k best rows by exact score (or, in a scan
/// that only seeds the floors, by lower bound).
struct Scan {
    top: Vec<TopK>,
    bad: Option<(usize, Error)>,
}

impl Scan {
    fn new(q: usize, k: usize) -> Self {
        Scan {
            top: vec![TopK::new(k); q],
            bad: None,
        }
    }

    fn merge(self, o: Scan) -> Scan {
        Scan {
            top: self
                .top
                .into_iter()
                .zip(o.top)
                .map(|(a, b)| a.merge(b))
                .collect(),
            bad: first_bad(self.bad, o.bad),
        }
    }
}

/// The exact score of (query, row of the tile), computed the way every other search path
/// computes it, so that each level and path ranks the same rows with the same scores.
type Exact<'a> = &'a dyn Fn(usize, usize) -> f64;

/// Top `k` rows for many unit queries: an int8 scan that scores its survivors exactly.
pub(crate) fn search<T: Real, R: Rows<T>>(
    qhat: ArrayView2<T>,
    rows: &R,
    k: usize,
    pass: Pass,
) -> Partial {
    let (q, n, d) = (qhat.nrows(), rows.len(), rows.dim());
    let dpad = d.div_ceil(8) * 8;
    let queries = quantise_queries(qhat, dpad, pass);
    // A survivor's computed score differs from its true one by less than this.
    let rounding = 4.0 * d as f64 * T::epsilon().f64() + 1e-6;
    let tiles: Vec<usize> = (0..n).step_by(TILE_ROWS).collect();
    let floors = Floors::new(q);
    seed_floors(q, k, rows, &queries, rounding, &floors);
    let unit: Vec<&[T]> = qhat
        .axis_iter(Axis(0))
        .map(|r| r.to_slice().expect("standard layout"))
        .collect();
    let scan = tiles
        .par_iter()
        .fold(
            || {
                (
                    Scan::new(q, k),
                    Tile::new(d, dpad),
                    Vec::new(),
                    vec![T::zero(); TILE_ROWS],
                )
            },
            |(mut scan, mut tile, mut scratch, mut mult), &lo| {
                let count = TILE_ROWS.min(n - lo);
                rows.mults(lo, lo + count, &mut mult[..count], &mut scan.bad);
                let block = rows.decoded(lo, lo + count, &mut scratch);
                tile.fill(pass, block, &mult[..count], d, dpad);
                for (r, a) in tile.allowed[..count].iter_mut().enumerate() {
                    *a = rows.allowed(lo + r);
                }
                let exact = |i: usize, r: usize| {
                    (kernels::dot(unit[i], &block[r * d..(r + 1) * d]) * mult[r]).f64()
                };
                scan_tile(
                    &tile,
                    &queries,
                    q,
                    lo,
                    rounding,
                    &floors,
                    &mut scan,
                    Some(&exact),
                );
                (scan, tile, scratch, mult)
            },
        )
        .map(|(scan, ..)| scan)
        .reduce(|| Scan::new(q, k), Scan::merge);
    (scan.top, scan.bad)
}

/// Raises the floors from an evenly spread sample of rows before the real scan, so that no
/// thread starts with a floor of -inf and admits a whole tile of candidates per query.
fn seed_floors<T: Real, R: Rows<T>>(
    q: usize,
    k: usize,
    rows: &R,
    queries: &Queries,
    rounding: f64,
    floors: &Floors,
) {
    let (n, d) = (rows.len(), rows.dim());
    let samples = (2 * TILE_ROWS).min(n / 8);
    if samples < k.max(PANEL) {
        return;
    }
    // only rows that may be results can raise a floor
    let picks: Vec<usize> = (0..samples)
        .map(|s| s * n / samples)
        .filter(|&r| rows.allowed(r))
        .collect();
    if picks.len() < k.max(PANEL) {
        return;
    }
    picks.par_chunks(TILE_ROWS).for_each(|chunk| {
        let (mut block, mut mult, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        let (mut m, mut bad) = ([T::zero()], None);
        for &r in chunk {
            rows.mults(r, r + 1, &mut m, &mut bad);
            block.extend_from_slice(rows.decoded(r, r + 1, &mut scratch));
            mult.push(m[0]);
        }
        let mut tile = Tile::new(d, queries.dpad);
        tile.fill(queries.pass, &block, &mult, d, queries.dpad);
        // lower bounds are valid floors: no exact scores needed for the sample
        let mut scan = Scan::new(q, k);
        scan_tile(&tile, queries, q, 0, rounding, floors, &mut scan, None);
    });
}

/// Every query block against every panel of the tile, selecting as the sums come out: a
/// row whose upper bound reaches a query's floor gets its `exact` score (its lower bound
/// where `exact` is None, which only raises the floors).
///
/// The two wrappers inside restate the arguments by necessity: each is a function of its
/// own compiled for its target features, so that the panel kernel it calls inlines.
#[allow(clippy::too_many_arguments)]
fn scan_tile(
    tile: &Tile,
    queries: &Queries,
    q: usize,
    lo: usize,
    rounding: f64,
    floors: &Floors,
    scan: &mut Scan,
    exact: Option<Exact>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        #[allow(clippy::too_many_arguments)]
        fn vnni(
            tile: &Tile,
            queries: &Queries,
            q: usize,
            lo: usize,
            rounding: f64,
            floors: &Floors,
            scan: &mut Scan,
            exact: Option<Exact>,
        ) {
            // (this function's features are those dots_panel_vnni needs)
            let dots = |p: &[i8], c: &[u8], d: usize, s: &mut Sums| dots_panel_vnni(p, c, d, s);
            scan_tile_with(dots, tile, queries, q, lo, rounding, floors, scan, exact)
        }
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        fn avx2(
            tile: &Tile,
            queries: &Queries,
            q: usize,
            lo: usize,
            rounding: f64,
            floors: &Floors,
            scan: &mut Scan,
            exact: Option<Exact>,
        ) {
            // (this function's features are those dots_panel_avx2 needs)
            let dots = |p: &[i8], c: &[u8], d: usize, s: &mut Sums| dots_panel_avx2(p, c, d, s);
            scan_tile_with(dots, tile, queries, q, lo, rounding, floors, scan, exact)
        }
        // SAFETY: search() runs only with the pass available() chose from the CPU.
        match queries.pass {
            Pass::Vnni => unsafe { vnni(tile, queries, q, lo, rounding, floors, scan, exact) },
            Pass::Avx2 => unsafe { avx2(tile, queries, q, lo, rounding, floors, scan, exact) },
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the int8 pass needs AVX2 or AVX-512 VNNI")
}

/// Per query of a block and row of a panel, the sum of code products.
type Sums = [[i32; PANEL]; QBLOCK];

/// [`scan_tile`] with the panel dot products of `dots` (inlined into its caller's
/// instruction set).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scan_tile_with(
    dots: impl Fn(&[i8], &[u8], usize, &mut Sums),
    tile: &Tile,
    queries: &Queries,
    q: usize,
    lo: usize,
    rounding: f64,
    floors: &Floors,
    scan: &mut Scan,
    exact: Option<Exact>,
) {
    let dpad = queries.dpad;
    let offset = queries.pass.offset();
    let panels = tile.rows.div_ceil(PANEL);
    let slack = rounding + SLACK;
    let mut sums = [[0i32; PANEL]; QBLOCK];
    for qb in (0..q).step_by(QBLOCK) {
        let codes = &queries.codes[qb * dpad..(qb + QBLOCK) * dpad];
        for p in 0..panels {
            let panel = &tile.panels[p * PANEL * dpad..(p + 1) * PANEL * dpad];
            dots(panel, codes, dpad, &mut sums);
            let rows = p * PANEL..(p + 1) * PANEL;
            let step: &[f32; PANEL] = tile.step[rows.clone()].try_into().expect("panel");
            let tsum: &[i32; PANEL] = tile.sums[rows.clone()].try_into().expect("panel");
            let err: &[f32; PANEL] = tile.err[rows.clone()].try_into().expect("panel");
            let norm: &[f32; PANEL] = tile.norm[rows].try_into().expect("panel");
            for (j, row_sums) in sums.iter().enumerate().take(q - qb) {
                let i = qb + j;
                let floor = scan.top[i].threshold().max(floors.get(i));
                let (sq, qn, qe) = (
                    queries.step[i] as f32,
                    queries.norm[i] as f32,
                    queries.err[i] as f32,
                );
                // Branch-free upper bounds of the 32 rows in float32 (`SLACK` covers its
                // rounding) as a bit mask; single rows are looked at only where a bit is set.
                let (slack32, floor32) = (slack as f32, floor as f32);
                let mut hits = 0u32;
                for l in 0..PANEL {
                    let est = (row_sums[l] - offset * tsum[l]) as f32 * (sq * step[l]);
                    let ub = est + qn * err[l] + qe * norm[l] + slack32;
                    hits |= ((ub >= floor32) as u32) << l;
                }
                while hits != 0 {
                    let l = hits.trailing_zeros() as usize;
                    hits &= hits - 1;
                    let r = p * PANEL + l;
                    if r >= tile.rows {
                        break;
                    }
                    if !tile.allowed[r] {
                        continue;
                    }
                    let dot = (row_sums[l] - offset * tsum[l]) as f64;
                    let est = dot * queries.step[i] * step[l] as f64;
                    let eps =
                        queries.norm[i] * err[l] as f64 + queries.err[i] * norm[l] as f64 + slack;
                    let floor = scan.top[i].threshold().max(floors.get(i));
                    if est + eps >= floor {
                        let score = exact.map_or(est - eps, |f| f(i, r));
                        scan.top[i].push(Hit {
                            score,
                            index: lo + r,
                        });
                        floors.raise(i, scan.top[i].threshold());
                    }
                }
            }
        }
    }
}

/// `sums[j][r]` = Σ_d query_j[d] * row_r[d] over a panel of 32 rows and 8 queries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn dots_panel_vnni(panel: &[i8], queries: &[u8], dpad: usize, sums: &mut [[i32; PANEL]; QBLOCK]) {
    use std::arch::x86_64::*;
    assert!(panel.len() >= PANEL * dpad && queries.len() >= QBLOCK * dpad);
    // SAFETY: the loads stay inside `panel` (PANEL * dpad bytes) and `queries` (QBLOCK *
    // dpad bytes), as asserted; the stores write whole rows of `sums`.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); 2]; QBLOCK];
        let (mut g, q) = (panel.as_ptr(), queries.as_ptr());
        for quad in 0..dpad / 4 {
            let g0 = _mm512_loadu_si512(g as *const _);
            let g1 = _mm512_loadu_si512(g.add(64) as *const _);
            g = g.add(PANEL * 4);
            for (j, a) in acc.iter_mut().enumerate() {
                let four = (q.add(j * dpad + quad * 4) as *const i32).read_unaligned();
                let b = _mm512_set1_epi32(four);
                a[0] = _mm512_dpbusd_epi32(a[0], b, g0);
                a[1] = _mm512_dpbusd_epi32(a[1], b, g1);
            }
        }
        for (out, a) in sums.iter_mut().zip(acc) {
            _mm512_storeu_si512(out.as_mut_ptr() as *mut _, a[0]);
            _mm512_storeu_si512(out.as_mut_ptr().add(16) as *mut _, a[1]);
        }
    }
}

/// `sums[j][r]` = Σ_d query_j[d] * row_r[d] over a panel of 32 rows and 8 queries, with
/// `vpmaddubsw` (two products into 16 bits, which the codes' bounds keep from saturating,
/// see [`Pass`]) and `vpmaddwd` (pairs into 32 bits). Two queries at a time, so that the
/// accumulators stay in registers. `dpad` is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dots_panel_avx2(panel: &[i8], queries: &[u8], dpad: usize, sums: &mut Sums) {
    use std::arch::x86_64::*;
    assert!(
        panel.len() >= PANEL * dpad && queries.len() >= QBLOCK * dpad && dpad.is_multiple_of(8)
    );
    // SAFETY: the loads stay inside `panel` (PANEL * dpad bytes: dpad / 4 quads of 128) and
    // `queries` (QBLOCK * dpad bytes), as asserted; the stores write whole rows of `sums`.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        for pair in 0..QBLOCK / 2 {
            let (j0, j1) = (2 * pair, 2 * pair + 1);
            let mut acc = [[_mm256_setzero_si256(); 4]; 2];
            let (q0, q1) = (
                queries.as_ptr().add(j0 * dpad),
                queries.as_ptr().add(j1 * dpad),
            );
            for quad in (0..dpad / 4).step_by(2) {
                let g = panel.as_ptr().add(quad * PANEL * 4);
                let read = |p: *const u8| (p as *const i32).read_unaligned();
                let a0 = _mm256_set1_epi32(read(q0.add(quad * 4)));
                let a1 = _mm256_set1_epi32(read(q0.add(quad * 4 + 4)));
                let b0 = _mm256_set1_epi32(read(q1.add(quad * 4)));
                let b1 = _mm256_set1_epi32(read(q1.add(quad * 4 + 4)));
                #[allow(clippy::needless_range_loop)] // r picks both the rows and two accumulators
                for r in 0..4 {
                    // rows 8r..8r+8 of this quad, and of the next (128 bytes on)
                    let g0 = _mm256_loadu_si256(g.add(32 * r) as *const __m256i);
                    let g1 = _mm256_loadu_si256(g.add(PANEL * 4 + 32 * r) as *const __m256i);
                    let m = |a, g| _mm256_madd_epi16(_mm256_maddubs_epi16(a, g), ones);
                    let p0 = _mm256_add_epi32(m(a0, g0), m(a1, g1));
                    let p1 = _mm256_add_epi32(m(b0, g0), m(b1, g1));
                    acc[0][r] = _mm256_add_epi32(acc[0][r], p0);
                    acc[1][r] = _mm256_add_epi32(acc[1][r], p1);
                }
            }
            for (j, a) in [(j0, acc[0]), (j1, acc[1])] {
                for (r, v) in a.iter().enumerate() {
                    _mm256_storeu_si256(sums[j].as_mut_ptr().add(8 * r) as *mut __m256i, *v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised rounding of [`quantise_to`] against `round_ties_even`, on values
    /// exactly halfway between two codes (the step is a power of two, so the halves are
    /// exact ties: they go to the even code), and with a tail shorter than one block.
    #[test]
    fn quantise_rounds_ties_to_even_and_reports_its_error() {
        for levels in [63.0f32, 127.0] {
            let step = 1.0 / 128.0;
            for d in [1usize, 16, 37, 512] {
                let v: Vec<f32> = (0..d)
                    .map(|i| match i % 4 {
                        0 => levels * step, // the peak: sets the step
                        1 => -((i % 9) as f32 + 0.5) * step,
                        2 => ((i % 13) as f32 + 0.5) * step,
                        _ => ((i * 7919) % 1000) as f32 / 4000.0 - 0.125,
                    })
                    .collect();
                let mut out = vec![0i8; d];
                let (got_step, err, norm) = quantise_to(&v, &mut out, levels);
                assert_eq!(got_step, step as f64);
                let (mut e, mut n) = (0.0f64, 0.0f64);
                for (&x, &c) in v.iter().zip(&out) {
                    let want = (x / step).round_ties_even().clamp(-levels, levels);
                    assert_eq!(c as f32, want, "x={x} levels={levels}");
                    let back = c as f64 * step as f64;
                    e += (x as f64 - back).powi(2);
                    n += back * back;
                }
                assert!(
                    (err - e.sqrt()).abs() <= 1e-6 * (1.0 + n.sqrt()),
                    "{err} {}",
                    e.sqrt()
                );
                assert!(
                    (norm - n.sqrt()).abs() <= 1e-5 * n.sqrt(),
                    "{norm} vs {}",
                    n.sqrt()
                );
            }
        }
    }

    /// The panel kernels against plain i32 sums, at the codes' extremes (where a 16-bit
    /// pair sum would saturate if the bounds of [`Pass`] did not hold).
    #[test]
    fn panel_dots_equal_integer_sums_at_the_extreme_codes() {
        let dpad = 24;
        let mut state = 3u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as i64
        };
        for pass in [Pass::Vnni, Pass::Avx2] {
            #[cfg(target_arch = "x86_64")]
            let runs = match pass {
                Pass::Vnni => is_x86_feature_detected!("avx512vnni"),
                Pass::Avx2 => is_x86_feature_detected!("avx2"),
            };
            #[cfg(not(target_arch = "x86_64"))]
            let runs = false;
            if !runs {
                continue;
            }
            let levels = pass.levels() as i64;
            for round in 0..3 {
                // round 0: every code at its extreme, same signs (the largest pair sums)
                let g_code = |r: usize, j: usize, x: i64| match round {
                    0 => 127,
                    1 => {
                        if (r + j).is_multiple_of(2) {
                            127
                        } else {
                            -127
                        }
                    }
                    _ => x % 255 - 127,
                } as i8;
                let q_code = |x: i64| match round {
                    0 | 1 => levels,
                    _ => x % (2 * levels + 1) - levels,
                };
                let rows: Vec<Vec<i8>> = (0..PANEL)
                    .map(|r| (0..dpad).map(|j| g_code(r, j, next())).collect())
                    .collect();
                let queries: Vec<Vec<i64>> = (0..QBLOCK)
                    .map(|_| (0..dpad).map(|_| q_code(next())).collect())
                    .collect();
                let mut panel = vec![0i8; PANEL * dpad];
                for (r, row) in rows.iter().enumerate() {
                    for (quad, four) in row.chunks_exact(4).enumerate() {
                        let at = quad * PANEL * 4 + r * 4;
                        panel[at..at + 4].copy_from_slice(four);
                    }
                }
                let codes: Vec<u8> = queries
                    .iter()
                    .flat_map(|q| q.iter().map(|&c| (c + pass.offset() as i64) as u8))
                    .collect();
                let mut sums = [[0i32; PANEL]; QBLOCK];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has the pass's features (checked above).
                unsafe {
                    match pass {
                        Pass::Vnni => dots_panel_vnni(&panel, &codes, dpad, &mut sums),
                        Pass::Avx2 => dots_panel_avx2(&panel, &codes, dpad, &mut sums),
                    }
                }
                for (j, q) in queries.iter().enumerate() {
                    for (r, row) in rows.iter().enumerate() {
                        let want: i64 = q
                            .iter()
                            .zip(row)
                            .map(|(&a, &b)| (a + pass.offset() as i64) * b as i64)
                            .sum();
                        assert_eq!(sums[j][r] as i64, want, "{pass:?} round {round} q{j} r{r}");
                    }
                }
            }
        }
    }
}
