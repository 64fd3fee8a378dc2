//! Exact cosine top-k search over a gallery of embeddings.
//!
//! Never materialises the Q×N score matrix. Few queries stream the gallery once, in blocks
//! of rows small enough to stay in L2 while the row norms and every query read them (the
//! search is then bound by memory bandwidth); many queries use GEMM
//! tiles of the gallery against all queries, selecting from each tile while it is in cache.
//! Rows are split across threads and the per-thread top-k lists merged, so a single query
//! uses every core. Ties go to the lower index; results do not depend on the thread count.

pub mod file;
pub mod gallery;
mod ids;
mod int8;
pub mod journal;
pub mod topk;

use crate::error::{unnormalisable, Error, Result};
use crate::gemm::Side;
use crate::kernels;
use crate::real::Real;
use ndarray::{s, Array2, ArrayView2, Axis};
use rayon::prelude::*;
use topk::{Hit, TopK};

/// Up to this many queries stream the gallery; more use GEMM tiles.
const STREAM_MAX_QUERIES: usize = 8;
/// Gallery rows per parallel job on the streaming path.
const STREAM_ROWS: usize = 4096;
/// Gallery rows scored together on the streaming path (128 KiB at D=512 f32: stays in L2).
const BLOCK_ROWS: usize = 64;
/// Most gallery rows per GEMM tile.
const TILE_ROWS: usize = 1024;
/// From this many queries the int8 first pass pays for quantising every gallery tile: on
/// the AVX2 pass it overtook the float tiles between 32 and 64 queries (100k and 1M rows,
/// D=512, AMD Zen 3); the VNNI pass keeps the threshold it was measured at, 256.
fn int8_min_queries(pass: int8::Pass) -> usize {
    match pass {
        int8::Pass::Avx2 => 48,
        int8::Pass::Vnni => 256,
    }
}
/// Bound on one thread's tile of scores, so many queries cannot grow it without limit.
const TILE_SCRATCH_BYTES: usize = 8 << 20;

/// Best-first results; rows beyond the gallery size are padded with score -inf, index -1.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult<T> {
    /// In the inputs' dtype.
    pub scores: Array2<T>,
    pub indices: Array2<i64>,
}

/// Gallery row `row` with squared norm `sumsq`, as the error to report if it is unusable.
fn bad_row(row: usize, sumsq: f64) -> Option<(usize, Error)> {
    unnormalisable("gallery", row, sumsq).map(|e| (row, e))
}

pub(crate) fn first_bad(
    a: Option<(usize, Error)>,
    b: Option<(usize, Error)>,
) -> Option<(usize, Error)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if x.0 <= y.0 { x } else { y }),
        (x, y) => x.or(y),
    }
}

/// Gallery rows as the search reads them: stored as `T` or compressed.
pub(crate) trait Rows<T>: Sync {
    fn len(&self) -> usize;
    fn dim(&self) -> usize;
    /// In `mult`, the factor that turns the dot product of each row `lo..hi` with a unit
    /// query into its cosine. An unusable row (NaN/inf, zero) is recorded in `bad` if it is
    /// the first one this caller has seen.
    fn mults(&self, lo: usize, hi: usize, mult: &mut [T], bad: &mut Option<(usize, Error)>);
    /// `out[r] = query · row(lo + r)`, before the factor.
    fn dots(&self, query: &[T], lo: usize, hi: usize, out: &mut [T]);
    /// `mults` and `dots` for one query, in one read of the rows where the storage allows.
    fn dots_and_mults(
        &self,
        query: &[T],
        lo: usize,
        hi: usize,
        dots: &mut [T],
        mult: &mut [T],
        bad: &mut Option<(usize, Error)>,
    ) {
        self.mults(lo, hi, mult, bad);
        self.dots(query, lo, hi, dots);
    }
    /// Rows `lo..hi` as `T` values, borrowed or decoded into `scratch`.
    fn decoded<'a>(&'a self, lo: usize, hi: usize, scratch: &'a mut Vec<T>) -> &'a [T];
    /// `mults` for the rows at `positions` (a subset of the rows).
    fn mults_at(&self, positions: &[usize], mult: &mut [T], bad: &mut Option<(usize, Error)>) {
        for (m, &p) in mult.iter_mut().zip(positions) {
            self.mults(p, p + 1, std::slice::from_mut(m), bad);
        }
    }
    /// `dots` for the rows at `positions`.
    fn dots_at(&self, query: &[T], positions: &[usize], out: &mut [T]) {
        for (o, &p) in out.iter_mut().zip(positions) {
            self.dots(query, p, p + 1, std::slice::from_mut(o));
        }
    }
    /// Whether row `row` may be a result (an allow- or deny-list; every row by default).
    /// Asked only of rows whose score reaches a query's running threshold, so a filter
    /// costs next to nothing where the scan is bound by reading the rows.
    #[inline(always)]
    fn allowed(&self, _row: usize) -> bool {
        true
    }
}

/// The rows of `R` at `positions` (ascending), as a gallery of their own: a search over
/// them reads only those rows.
pub(crate) struct Subset<'a, R> {
    pub rows: &'a R,
    pub positions: &'a [usize],
}

impl<T: Copy, R: Rows<T>> Rows<T> for Subset<'_, R> {
    fn len(&self) -> usize {
        self.positions.len()
    }
    fn dim(&self) -> usize {
        self.rows.dim()
    }
    fn mults(&self, lo: usize, hi: usize, mult: &mut [T], bad: &mut Option<(usize, Error)>) {
        self.rows.mults_at(&self.positions[lo..hi], mult, bad)
    }
    fn dots(&self, query: &[T], lo: usize, hi: usize, out: &mut [T]) {
        self.rows.dots_at(query, &self.positions[lo..hi], out)
    }
    fn decoded<'a>(&'a self, lo: usize, hi: usize, scratch: &'a mut Vec<T>) -> &'a [T] {
        let mut one = Vec::new();
        let mut gathered = Vec::with_capacity((hi - lo) * self.dim());
        for &p in &self.positions[lo..hi] {
            gathered.extend_from_slice(self.rows.decoded(p, p + 1, &mut one));
        }
        *scratch = gathered;
        scratch
    }
}

/// Rows of `R` restricted to those whose id is (`allow`) or is not (deny) in `list`.
pub(crate) struct Filtered<'a, R> {
    pub rows: &'a R,
    /// Each row's id.
    pub ids: &'a [i64],
    /// Sorted, deduplicated ids.
    pub list: Vec<i64>,
    pub allow: bool,
}

// Forwards the trait to the wrapped rows method by method (Rust has no delegation): only
// `allowed` differs.
impl<T, R: Rows<T>> Rows<T> for Filtered<'_, R> {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn dim(&self) -> usize {
        self.rows.dim()
    }
    fn mults(&self, lo: usize, hi: usize, mult: &mut [T], bad: &mut Option<(usize, Error)>) {
        self.rows.mults(lo, hi, mult, bad)
    }
    fn dots(&self, query: &[T], lo: usize, hi: usize, out: &mut [T]) {
        self.rows.dots(query, lo, hi, out)
    }
    fn dots_and_mults(
        &self,
        query: &[T],
        lo: usize,
        hi: usize,
        dots: &mut [T],
        mult: &mut [T],
        bad: &mut Option<(usize, Error)>,
    ) {
        self.rows.dots_and_mults(query, lo, hi, dots, mult, bad)
    }
    fn decoded<'a>(&'a self, lo: usize, hi: usize, scratch: &'a mut Vec<T>) -> &'a [T] {
        self.rows.decoded(lo, hi, scratch)
    }
    #[inline]
    fn allowed(&self, row: usize) -> bool {
        self.list.binary_search(&self.ids[row]).is_ok() == self.allow
    }
}

/// A dense row-major array, checked and normalised as it is read.
pub(crate) struct Dense<'a, T> {
    flat: &'a [T],
    d: usize,
    normalized: bool,
}

impl<T: Real> Rows<T> for Dense<'_, T> {
    fn len(&self) -> usize {
        self.flat.len() / self.d
    }

    fn dim(&self) -> usize {
        self.d
    }

    fn mults(&self, lo: usize, hi: usize, mult: &mut [T], bad: &mut Option<(usize, Error)>) {
        kernels::dots_self(&self.flat[lo * self.d..hi * self.d], self.d, mult);
        self.squares_to_mults(lo, mult, bad);
    }

    fn dots(&self, query: &[T], lo: usize, hi: usize, out: &mut [T]) {
        kernels::dots(query, &self.flat[lo * self.d..hi * self.d], out);
    }

    fn dots_and_mults(
        &self,
        query: &[T],
        lo: usize,
        hi: usize,
        dots: &mut [T],
        mult: &mut [T],
        bad: &mut Option<(usize, Error)>,
    ) {
        kernels::dots_and_squares(query, &self.flat[lo * self.d..hi * self.d], dots, mult);
        self.squares_to_mults(lo, mult, bad);
    }

    fn decoded<'a>(&'a self, lo: usize, hi: usize, _scratch: &'a mut Vec<T>) -> &'a [T] {
        &self.flat[lo * self.d..hi * self.d]
    }
}

impl<T: Real> Dense<'_, T> {
    /// Squared norms of rows from `lo` on to their factors (1 when normalised), checking
    /// each row.
    fn squares_to_mults(&self, lo: usize, mult: &mut [T], bad: &mut Option<(usize, Error)>) {
        let d = self.d;
        let rows = &self.flat[lo * d..(lo + mult.len()) * d];
        for (r, m) in mult.iter_mut().enumerate() {
            let fast = m.f64().sqrt();
            if kernels::norm_in_safe_range::<T>(fast) {
                *m = if self.normalized {
                    T::one()
                } else {
                    T::of(1.0 / fast)
                };
                continue;
            }
            // Rare: a zero, non-finite, tiny or huge row (its squares in T may have under-
            // or overflowed, so its norm is taken again carefully).
            let norm = kernels::norm(&rows[r * d..(r + 1) * d]);
            if bad.is_none() {
                *bad = bad_row(lo + r, norm);
                if bad.is_none() && !self.normalized {
                    // Not wrong, but its products would leave T's normal range: the caller
                    // searches again over a rescaled copy (see `cosine_topk`).
                    *bad = Some((lo + r, Error::invalid("gallery", "row needs rescaling")));
                }
            }
            *m = T::one();
        }
    }
}

/// Checks the queries and returns them as unit rows (as given when `normalized`).
pub(crate) fn unit_queries<T: Real>(
    queries: ArrayView2<T>,
    d: usize,
    normalized: bool,
) -> Result<Array2<T>> {
    if queries.nrows() == 0 {
        return Err(Error::invalid("queries", "empty: need at least one query"));
    }
    if queries.ncols() != d {
        return Err(Error::invalid(
            "queries",
            format!(
                "have {} columns but the gallery's embedding size is {d}",
                queries.ncols()
            ),
        ));
    }
    let queries = queries.as_standard_layout();
    let mut qhat = Array2::zeros(queries.dim());
    for (i, (row, mut out)) in queries
        .axis_iter(Axis(0))
        .zip(qhat.axis_iter_mut(Axis(0)))
        .enumerate()
    {
        let row = row.to_slice().expect("standard layout");
        let out = out.as_slice_mut().expect("standard layout");
        let norm = kernels::norm(row);
        if let Some(e) = unnormalisable("queries", i, norm) {
            return Err(e);
        }
        if normalized {
            out.copy_from_slice(row);
        } else {
            kernels::unit_into(row, norm, out);
        }
    }
    Ok(qhat)
}

/// Exact top-`k` gallery rows by cosine similarity for every query.
///
/// `normalized = true` promises unit-norm rows and queries and skips the division (rows are
/// still checked for NaN/inf and zeros in the same pass).
pub fn cosine_topk<T: Real>(
    queries: ArrayView2<T>,
    gallery: ArrayView2<T>,
    k: usize,
    normalized: bool,
) -> Result<SearchResult<T>> {
    let d = queries.ncols();
    let (n, dg) = gallery.dim();
    if queries.nrows() == 0 {
        return Err(Error::invalid("queries", "empty: need at least one query"));
    }
    if d == 0 {
        return Err(Error::invalid("queries", "embedding size is 0"));
    }
    if dg != d {
        return Err(Error::invalid(
            "gallery",
            format!("has {dg} columns but queries have {d}: embedding sizes differ"),
        ));
    }
    if k == 0 {
        return Err(Error::invalid("k", "must be >= 1"));
    }
    crate::limits::check_results("k", k, queries.nrows(), std::mem::size_of::<T>() + 8)?;
    let qhat = unit_queries(queries, d, normalized)?;
    if n == 0 {
        return Ok(collect(vec![TopK::new(0); qhat.nrows()], k, |i| i as i64));
    }
    let gallery = gallery.as_standard_layout();
    let flat = gallery.as_slice().expect("standard layout");
    let rows = Dense {
        flat,
        d,
        normalized,
    };
    let (mut tops, bad) = search_rows(qhat.view(), &rows, k.min(n));
    if bad.is_some() {
        // A row that cannot be normalised, or one whose products would leave T's normal
        // range (denormal or overflowing). The first is an error; the second is searched
        // again as a copy rescaled by powers of two, so every finite non-zero row counts.
        let rescued = rescaled_copy(flat, d)?;
        let rows = Dense {
            flat: &rescued,
            d,
            normalized,
        };
        let (again, bad) = search_rows(qhat.view(), &rows, k.min(n));
        if let Some((_, e)) = bad {
            return Err(e);
        }
        tops = again;
    }
    Ok(collect(tops, k, |i| i as i64))
}

/// A copy of `flat` whose rows outside the safe norm range are scaled by a power of two
/// towards norm 1; the first row that cannot be normalised (NaN, inf, zeros) is an error.
fn rescaled_copy<T: Real>(flat: &[T], d: usize) -> Result<Vec<T>> {
    let norms: Vec<f64> = flat.par_chunks(d).map(kernels::norm).collect();
    if let Some(e) = norms
        .iter()
        .enumerate()
        .find_map(|(i, &n)| unnormalisable("gallery", i, n))
    {
        return Err(e);
    }
    let mut copy = flat.to_vec();
    copy.par_chunks_mut(d).zip(&norms).for_each(|(row, &n)| {
        if !kernels::norm_in_safe_range::<T>(n) {
            kernels::rescale_row(row, n);
        }
    });
    Ok(copy)
}

/// The per-query top lists as padded (Q, k) arrays, rows mapped to the ids returned.
pub(crate) fn collect<T: Real>(
    tops: Vec<TopK>,
    k: usize,
    id_of: impl Fn(usize) -> i64,
) -> SearchResult<T> {
    let q = tops.len();
    let mut scores = Array2::from_elem((q, k), T::neg_infinity());
    let mut indices = Array2::from_elem((q, k), -1i64);
    for (i, top) in tops.into_iter().enumerate() {
        for (j, hit) in top.into_sorted().into_iter().enumerate() {
            // A cosine is never above 1 nor below -1: rounding may overshoot by an ulp,
            // and a self-match must still meet a threshold of exactly 1.0.
            scores[[i, j]] = T::of(hit.score.clamp(-1.0, 1.0));
            indices[[i, j]] = id_of(hit.index);
        }
    }
    SearchResult { scores, indices }
}

pub(crate) type Partial = (Vec<TopK>, Option<(usize, Error)>);

/// Top `k` (at most the row count) of `rows` for every unit query, by the path that suits
/// the query count.
pub(crate) fn search_rows<T: Real, R: Rows<T>>(qhat: ArrayView2<T>, rows: &R, k: usize) -> Partial {
    if qhat.nrows() <= STREAM_MAX_QUERIES {
        stream(qhat, rows, k)
    } else if let Some(pass) = int8::available().filter(|&p| qhat.nrows() >= int8_min_queries(p)) {
        int8::search(qhat, rows, k, pass)
    } else {
        tiled(qhat, rows, k)
    }
}

fn merge_partials(a: Partial, b: Partial) -> Partial {
    let tops = a.0.into_iter().zip(b.0).map(|(x, y)| x.merge(y)).collect();
    (tops, first_bad(a.1, b.1))
}

/// Offers rows `first..` with these dot products and factors to one query's top list.
#[inline]
fn offer<T: Real, R: Rows<T>>(
    rows: &R,
    top: &mut TopK,
    threshold: &mut f64,
    dots: &[T],
    mult: &[T],
    first: usize,
) {
    for (r, (&dot, &m)) in dots.iter().zip(mult).enumerate() {
        let score = (dot * m).f64();
        if score >= *threshold && rows.allowed(first + r) {
            top.push(Hit {
                score,
                index: first + r,
            });
            *threshold = top.threshold();
        }
    }
}

/// One pass over the gallery: each block of rows scored against every query while in L2.
fn stream<T: Real, R: Rows<T>>(qhat: ArrayView2<T>, rows: &R, k: usize) -> Partial {
    let q = qhat.nrows();
    let (n, d) = (rows.len(), rows.dim());
    let queries: Vec<&[T]> = qhat
        .axis_iter(Axis(0))
        .map(|r| r.to_slice().expect("standard layout"))
        .collect();
    let empty = || (vec![TopK::new(k); q], None);
    let jobs: Vec<usize> = (0..n).step_by(STREAM_ROWS).collect();
    jobs.par_iter()
        .fold(empty, |(mut tops, mut bad), &job| {
            let mut thresholds: Vec<f64> = tops.iter().map(TopK::threshold).collect();
            let (mut mult, mut dots) = ([T::zero(); BLOCK_ROWS], [T::zero(); BLOCK_ROWS]);
            for first in (job..(job + STREAM_ROWS).min(n)).step_by(BLOCK_ROWS) {
                let count = BLOCK_ROWS.min(n - first);
                let last = first + count;
                if let [query] = queries[..] {
                    // one query: its dots and the rows' norms in one read of the block
                    let (dots, mult) = (&mut dots[..count], &mut mult[..count]);
                    rows.dots_and_mults(query, first, last, dots, mult, &mut bad);
                    offer(rows, &mut tops[0], &mut thresholds[0], dots, mult, first);
                    continue;
                }
                rows.mults(first, last, &mut mult[..count], &mut bad);
                for (j, query) in queries.iter().enumerate() {
                    debug_assert_eq!(query.len(), d);
                    rows.dots(query, first, last, &mut dots[..count]);
                    offer(
                        rows,
                        &mut tops[j],
                        &mut thresholds[j],
                        &dots[..count],
                        &mult[..count],
                        first,
                    );
                }
            }
            (tops, bad)
        })
        .reduce(empty, merge_partials)
}

/// GEMM tiles of gallery rows against all queries; selection from each tile in cache.
fn tiled<T: Real, R: Rows<T>>(qhat: ArrayView2<T>, rows: &R, k: usize) -> Partial {
    let q = qhat.nrows();
    let (n, d) = (rows.len(), rows.dim());
    let empty = || (vec![TopK::new(k); q], None);
    let tile_rows = (TILE_SCRATCH_BYTES / (q * std::mem::size_of::<T>())).clamp(16, TILE_ROWS);
    let tiles: Vec<usize> = (0..n).step_by(tile_rows).collect();
    // every tile multiplies by the same queries: packed once
    let queries = T::pack(qhat.reversed_axes(), Side::Right);
    tiles
        .par_iter()
        .fold(
            || {
                let scratch = (
                    Array2::<T>::zeros((tile_rows, q)),
                    Vec::new(),
                    vec![T::zero(); tile_rows],
                );
                (empty(), scratch)
            },
            |((mut tops, mut bad), (mut scores, mut decoded, mut mult)), &lo| {
                let count = tile_rows.min(n - lo);
                rows.mults(lo, lo + count, &mut mult[..count], &mut bad);
                let block = rows.decoded(lo, lo + count, &mut decoded);
                let tile = ArrayView2::from_shape((count, d), block).expect("block of whole rows");
                let mut tile_scores = scores.slice_mut(s![..count, ..]);
                T::gemm_packed_right(T::one(), &tile, &queries, T::zero(), &mut tile_scores);
                // Thresholds in T: every score is a T value, so comparing in T is exact.
                let mut thresholds: Vec<T> = tops.iter().map(|t| T::of(t.threshold())).collect();
                for (r, row) in tile_scores.axis_iter(Axis(0)).enumerate() {
                    let index = lo + r;
                    let m = mult[r];
                    let row = row.to_slice().expect("standard layout");
                    // Most scores beat no threshold: test 16 at a time without branches and
                    // look at single scores only in the rare group that has a candidate.
                    for (c, (dots, thr)) in
                        row.chunks(16).zip(thresholds.chunks_mut(16)).enumerate()
                    {
                        let any = dots
                            .iter()
                            .zip(thr.iter())
                            .fold(false, |a, (&dot, &t)| a | (dot * m >= t));
                        if !any {
                            continue;
                        }
                        for (i, (&dot, t)) in dots.iter().zip(thr.iter_mut()).enumerate() {
                            let score = dot * m;
                            if score >= *t && rows.allowed(index) {
                                let top = &mut tops[c * 16 + i];
                                top.push(Hit {
                                    score: score.f64(),
                                    index,
                                });
                                *t = T::of(top.threshold());
                            }
                        }
                    }
                }
                ((tops, bad), (scores, decoded, mult))
            },
        )
        .map(|(partial, _)| partial)
        .reduce(empty, merge_partials)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(queries: &Array2<f64>, gallery: &Array2<f64>, k: usize) -> Vec<Vec<usize>> {
        queries
            .axis_iter(Axis(0))
            .map(|qr| {
                let qn = qr.dot(&qr).sqrt();
                let mut scored: Vec<(f64, usize)> = gallery
                    .axis_iter(Axis(0))
                    .enumerate()
                    .map(|(i, g)| (qr.dot(&g) / (qn * g.dot(&g).sqrt()), i))
                    .collect();
                scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                scored.iter().take(k).map(|x| x.1).collect()
            })
            .collect()
    }

    fn data(rows: usize, d: usize, seed: u64) -> Array2<f64> {
        let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        Array2::from_shape_fn((rows, d), |_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
    }

    #[test]
    fn both_paths_match_brute_force() {
        let gallery = data(9000, 33, 1);
        for q in [1, 3, 8, 9, 40] {
            let queries = data(q, 33, q as u64 + 7);
            let got = cosine_topk(queries.view(), gallery.view(), 12, false).unwrap();
            let want = brute(&queries, &gallery, 12);
            for (i, w) in want.iter().enumerate() {
                let g: Vec<usize> = got.indices.row(i).iter().map(|&x| x as usize).collect();
                assert_eq!(&g, w, "q={q} row {i}");
            }
        }
    }

    #[test]
    fn float_tiles_and_int8_pass_agree_with_brute_force() {
        // Both many-query paths, whichever the CPU would pick: ties (duplicated rows), k
        // beyond the survivors of the int8 bounds, odd dimensions.
        let mut gallery = data(3000, 33, 11);
        for r in (0..3000).step_by(7) {
            let src = gallery.row(r / 2).to_owned();
            gallery.row_mut(r).assign(&src);
        }
        let queries = data(37, 33, 12);
        let qhat = unit_queries(queries.view(), 33, false).unwrap();
        let rows = Dense {
            flat: gallery.as_slice().unwrap(),
            d: 33,
            normalized: false,
        };
        for k in [1, 10, 64] {
            let want = brute(&queries, &gallery, k);
            let mut results = vec![tiled(qhat.view(), &rows, k)];
            if let Some(pass) = int8::available() {
                results.push(int8::search(qhat.view(), &rows, k, pass));
            }
            for (tops, bad) in results {
                assert!(bad.is_none());
                for (i, (top, w)) in tops.into_iter().zip(&want).enumerate() {
                    let got: Vec<usize> = top.into_sorted().iter().map(|h| h.index).collect();
                    assert_eq!(&got, w, "k={k} query {i}");
                }
            }
        }
    }

    #[test]
    fn rows_closer_than_the_int8_step_are_still_ranked_exactly() {
        // Every row is one base vector plus noise far below the int8 step: the estimates
        // cannot tell the rows apart, so the bounds must let them all through to their
        // exact scores.
        let base = data(1, 64, 21);
        let noise = data(4000, 64, 22);
        let gallery =
            Array2::from_shape_fn((4000, 64), |(r, j)| base[[0, j]] + 1e-5 * noise[[r, j]]);
        let queries = Array2::from_shape_fn((12, 64), |(i, j)| {
            base[[0, j]] + 1e-5 * noise[[i, (j + 5) % 64]]
        });
        let got = cosine_topk(queries.view(), gallery.view(), 10, false).unwrap();
        let want = brute(&queries, &gallery, 10);
        let cos = |i: usize, r: usize| {
            let (q, g) = (queries.row(i), gallery.row(r));
            q.dot(&g) / (q.dot(&q).sqrt() * g.dot(&g).sqrt())
        };
        for (i, w) in want.iter().enumerate() {
            // the same ranking up to the last bits of float64 (rows differ by ~1e-11 here)
            for (j, &r) in w.iter().enumerate() {
                let g = got.indices[[i, j]] as usize;
                assert!(
                    (cos(i, g) - cos(i, r)).abs() < 1e-14,
                    "query {i} rank {j}: {g} vs {r}"
                );
            }
        }
    }

    #[test]
    fn k_beyond_gallery_pads_and_ties_go_to_the_lower_index() {
        let gallery = Array2::from_shape_vec((3, 2), vec![1.0, 0.0, 2.0, 0.0, 0.0, 1.0]).unwrap();
        let queries = Array2::from_shape_vec((1, 2), vec![1.0f64, 0.0]).unwrap();
        let r = cosine_topk(queries.view(), gallery.view(), 5, false).unwrap();
        assert_eq!(r.indices.row(0).to_vec(), vec![0, 1, 2, -1, -1]);
        assert_eq!(r.scores[[0, 3]], f64::NEG_INFINITY);
        assert_eq!(r.scores[[0, 0]], 1.0);
    }

    #[test]
    fn extreme_rows_rank_as_their_unit_rows() {
        let gallery = data(300, 16, 31);
        let queries = data(12, 16, 32);
        let want = brute(&queries, &gallery, 7);
        for scale in [1e-310, 1e-250, 1e250] {
            let mut g = gallery.clone();
            for r in (0..300).step_by(3) {
                g.row_mut(r).mapv_inplace(|v| v * scale);
            }
            let q = queries.mapv(|v| v * scale);
            for nq in [1, 12] {
                let got = cosine_topk(q.slice(s![..nq, ..]), g.view(), 7, false).unwrap();
                for (i, w) in want.iter().take(nq).enumerate() {
                    let ids: Vec<usize> = got.indices.row(i).iter().map(|&x| x as usize).collect();
                    assert_eq!(&ids, w, "scale {scale}, {nq} queries, query {i}");
                }
                assert!(got.scores.iter().all(|s| s.abs() <= 1.0));
            }
        }
    }

    #[test]
    fn bad_rows_are_reported_lowest_first() {
        let mut gallery = data(10_000, 8, 3);
        gallery.row_mut(9000).fill(0.0);
        gallery[[7000, 2]] = f64::NAN;
        let queries = data(1, 8, 4);
        let err = cosine_topk(queries.view(), gallery.view(), 3, false).unwrap_err();
        assert_eq!(err.arg, "gallery");
        assert!(err.message.contains("row 7000"), "{err}");
        let many = data(20, 8, 5);
        let err = cosine_topk(many.view(), gallery.view(), 3, false).unwrap_err();
        assert!(err.message.contains("row 7000"), "{err}");
    }
}
