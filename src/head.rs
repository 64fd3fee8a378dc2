//! Fused forward and backward passes of the margin-softmax head.
//!
//! Notation: `x` embeddings (B, D), `w` class centres (C, D), `c_ij = x̂_i · ŵ_j`, logits
//! `z_ij = scale_i * f(c_ij)` with `f = psi` on the target column and the identity elsewhere.
//!
//! The loss never holds the whole B×C logits. Classes are cut into tiles of `ct` columns,
//! processed in parallel. Pass 1 writes a tile's logits and folds them into a running
//! (max, sum-exp) per row. Pass 2 turns the stored logits into `G = dL/dc`, adds `G·Ŵ` into
//! `dX̂` and writes the tile's rows of `dW` (tiles own disjoint rows: no atomics).
//!
//! Where the logits of pass 1 wait for pass 2: when B <= D, a tile's B×ct logits fit inside
//! that tile's own ct×D rows of the weight gradient, which pass 2 overwrites only after it
//! has read them. So the stash costs no memory at all, and pass 2 needs no second forward
//! GEMM (a fourth GEMM would cost a third more time). When B > D the rows are cut into
//! chunks whose stash fits [`STASH_BUDGET_BYTES`].

use crate::error::{unnormalisable, Error, Result};
use crate::kernels::{self, NonTarget};
use crate::limits;
use crate::margin::{HardRule, Margins, RowContext, Scale};
use crate::pool::fold_in_groups;
use crate::real::Real;
use ndarray::parallel::prelude::*;
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;
use std::ops::Range;

/// Most memory the loss may spend on stashed logits when they cannot live in the gradient.
pub const STASH_BUDGET_BYTES: usize = 256 << 20;

/// Slack allowed on cosines passed to `apply_margin` (rounding of a GEMM); they are clamped.
pub const COS_TOLERANCE: f64 = 1e-3;

/// How per-row losses are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over rows whose label is not -1 (0 when every row is ignored).
    Mean,
    Sum,
    /// Per-row losses; gradients are those of their sum.
    None,
}

/// Most centres per class ([`HeadOptions::sub_centers`]): arg-maxes are kept in a byte.
pub const MAX_SUB_CENTERS: usize = 255;

/// How the class centres are laid out and which non-target cosines are filtered: the same
/// for every entry point of the head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadOptions {
    /// Centres per class K (sub-center ArcFace): the weight has C·K rows, class j owns rows
    /// j·K .. j·K + K - 1, its cosine is the largest of theirs and its gradient goes to that
    /// arg-max centre only. 1 for a plain head.
    pub sub_centers: usize,
    /// InsightFace's inter-class filtering: non-target cosines above this become 0, without
    /// gradient, before the margin. None: no filtering.
    pub interclass_filter: Option<f64>,
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions {
            sub_centers: 1,
            interclass_filter: None,
        }
    }
}

impl HeadOptions {
    /// Refuses a sub-centre count outside 1..=[`MAX_SUB_CENTERS`] and a filter that is not a
    /// cosine.
    pub fn check(&self) -> Result<()> {
        if !(1..=MAX_SUB_CENTERS).contains(&self.sub_centers) {
            return Err(Error::invalid(
                "sub_centers",
                format!(
                    "must be an integer in 1..={MAX_SUB_CENTERS}, got {}",
                    self.sub_centers
                ),
            ));
        }
        if let Some(f) = self.interclass_filter {
            if !(f.is_finite() && (-1.0..=1.0).contains(&f)) {
                return Err(Error::invalid(
                    "interclass_filter",
                    format!("must be None or a cosine in [-1, 1], got {f}"),
                ));
            }
        }
        Ok(())
    }
}

/// Which entries of dL/dc the backward keeps. The loss is always exact (the forward reads
/// every logit); only gradient entries below the filter are dropped.
///
/// An entry is dropped when its softmax probability `p_ij` (times `|h'(c_ij)|` for a margin
/// that re-weights non-targets) is below `f`; the target's entry is always kept. A dropped
/// entry's `|dL/dc_ij|` is below `w_i * s * f` (`w_i` the row's weight in the reduction), so
/// the change to row i of dL/dc is at most (its dropped entries) × `w_i s f`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GradFilter {
    /// Every entry.
    Exact,
    /// Entries with p below this (in [0, 1)).
    Below(f64),
    /// `Below(eps / 32)` of the dtype: 2^-28 for float32, 2^-57 for float64 (the choice of
    /// Apple's Cut Cross-Entropy). Each dropped entry is below rounding next to an entry of
    /// order s; rows classified with great confidence have no such entry, and there the
    /// dropped ones are a visible share of a small gradient.
    Auto,
}

impl GradFilter {
    /// The probability floor in `T`, None for the exact gradient.
    fn floor<T: Real>(self) -> Result<Option<f64>> {
        match self {
            GradFilter::Exact => Ok(None),
            GradFilter::Auto => Ok(Some(T::epsilon().f64() / 32.0)),
            GradFilter::Below(f) if f.is_finite() && (0.0..1.0).contains(&f) => Ok(Some(f)),
            GradFilter::Below(f) => Err(Error::invalid(
                "grad_filter",
                format!("must be None, 'auto' or a probability in [0, 1), got {f}"),
            )),
        }
    }
}

/// A tile's backward runs sparse (one axpy per kept entry) when at most this share of its
/// entries survive the gradient filter, else as dense GEMMs.
const SPARSE_SHARE: f64 = 1.0 / 8.0;

/// What [`margin_loss_with`] computes.
#[derive(Clone, Copy, Debug)]
pub struct LossOptions<'a> {
    pub reduction: Reduction,
    /// Per-row factors on the gradients, e.g. the upstream gradient of `Reduction::None`'s
    /// row losses; None means all ones.
    pub upstream: Option<&'a [f64]>,
    /// Skipping a gradient skips its GEMM; skipping both skips pass 2 entirely.
    pub grad_emb: bool,
    pub grad_weight: bool,
    pub head: HeadOptions,
    pub grad_filter: GradFilter,
}

impl LossOptions<'_> {
    pub fn new(reduction: Reduction) -> Self {
        LossOptions {
            reduction,
            upstream: None,
            grad_emb: true,
            grad_weight: true,
            head: HeadOptions::default(),
            grad_filter: GradFilter::Exact,
        }
    }
}

/// Result of [`margin_loss`] and [`margin_loss_with`].
#[derive(Debug)]
pub struct LossOutput<T> {
    /// Mean or sum of the row losses (the sum for `Reduction::None`).
    pub loss: f64,
    /// Loss of every row, 0 for ignored rows.
    pub row_losses: Vec<f64>,
    /// None when not asked for.
    pub grad_emb: Option<Array2<T>>,
    pub grad_weight: Option<Array2<T>>,
    /// The share of the backward GEMMs' multiply-adds the gradient filter skipped (0 for
    /// the exact gradient).
    pub backward_skipped: f64,
}

/// Everything the entry points derive from (emb, weight, labels, margin) before any GEMM.
struct Prepared<T> {
    /// Classes (the weight has `c * k` rows).
    c: usize,
    d: usize,
    /// Centres per class.
    k: usize,
    /// Whether logits need more than `scale * c` with the target replaced: sub-centres, a
    /// filter or hard negatives. Such tiles stash cosines instead of `exp(z - max)`.
    general: bool,
    filter: Option<f64>,
    /// Whether the margin re-weights hard negatives (CurricularFace, MV-Softmax).
    hard_negatives: bool,
    /// Each row's rule for its non-targets (only read when `general`).
    rules: Vec<NonTarget<T>>,
    /// The arg-max centre (0..k) of each row's target class.
    target_sub: Vec<u8>,
    xhat: Array2<T>,
    x_norm: Vec<f64>,
    row_scale: Vec<f64>,
    feature_norm_scale: bool,
    /// Target column of each row in this weight, None for ignored rows and for rows whose
    /// target lives in another shard of the classes.
    target: Vec<Option<usize>>,
    /// Rows that have a loss (label not -1), wherever their target lives.
    valid: Vec<bool>,
    target_logit: Vec<f64>,
    target_dpsi: Vec<f64>,
    /// d psi / d ||x|| of each row's target (MagFace), 0 for the others.
    target_dnorm: Vec<f64>,
    /// Each valid row's loss term besides the softmax and its d / d ||x|| (MagFace's
    /// regulariser), (0, 0) for the others.
    penalty: Vec<(f64, f64)>,
}

/// The kernels' form of a row's non-target rule.
fn nontarget_rule<T: Real>(
    filter: Option<f64>,
    hard: Option<crate::margin::HardNegatives>,
) -> NonTarget<T> {
    let none = T::of(f64::INFINITY);
    NonTarget {
        filter: filter.map_or(none, T::of),
        above: hard.map_or(none, |h| T::of(h.above)),
        t: T::of(hard.map_or(0.0, |h| h.t)),
        curricular: hard.is_some_and(|h| h.rule == HardRule::Curricular),
    }
}

/// Columns per class tile: large enough for an efficient GEMM, small enough to give every
/// thread several tiles.
fn tile_width(c: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per = c.div_ceil(4 * threads).clamp(32, 512);
    per.div_ceil(16) * 16
}

fn row_norm<T: Real>(row: ndarray::ArrayView1<T>) -> f64 {
    match row.as_slice() {
        Some(r) => kernels::norm(r),
        None => kernels::norm(&row.to_vec()),
    }
}

/// `a · b` accumulated in f64 (for the few per-row dot products outside the GEMMs).
fn dot_f64<T: Real>(a: ndarray::ArrayView1<T>, b: ndarray::ArrayView1<T>) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.f64() * y.f64()).sum()
}

fn row_norms<T: Real>(m: ArrayView2<T>, arg: &'static str) -> Result<Vec<f64>> {
    let norms: Vec<f64> = m.axis_iter(Axis(0)).into_par_iter().map(row_norm).collect();
    match norms
        .iter()
        .enumerate()
        .find_map(|(i, &n)| unnormalisable(arg, i, n))
    {
        Some(e) => Err(e),
        None => Ok(norms),
    }
}

/// `v` as `T`, kept finite (for the rare gradient rows of tiny or huge input rows).
fn saturate<T: Real>(v: f64) -> T {
    T::of(v.clamp(-T::MAX, T::MAX))
}

/// The class centres as the GEMMs read them: the weight in row-major order, validated, with
/// `inv[j] = 1/||w_j||`. A row whose norm lies outside the safe range of `T` (its products
/// would be denormal or overflow) is scaled by a power of two in a copy, so every finite
/// non-zero row gives exact cosines; its gradient row is scaled back at the end.
struct Centres<'a, T> {
    rows: ndarray::CowArray<'a, T, ndarray::Ix2>,
    inv: Vec<T>,
    /// (row, factor): the gradient computed over the rescaled row times `factor` is the
    /// gradient of the given row (`||w'|| / max(||w||, GRAD_NORM_MIN)`).
    rescaled: Vec<(usize, f64)>,
}

impl<'a, T: Real> Centres<'a, T> {
    fn new(weight: ArrayView2<'a, T>) -> Result<Self> {
        let rows: ndarray::CowArray<'a, T, ndarray::Ix2> = if weight.is_standard_layout() {
            weight.into()
        } else {
            weight.as_standard_layout().into_owned().into()
        };
        let norms = row_norms(rows.view(), "weight")?;
        let outside: Vec<usize> = (0..norms.len())
            .filter(|&j| !kernels::norm_in_safe_range::<T>(norms[j]))
            .collect();
        if outside.is_empty() {
            let inv = norms.iter().map(|n| T::of(1.0 / n)).collect();
            return Ok(Centres {
                rows,
                inv,
                rescaled: Vec::new(),
            });
        }
        let mut owned = rows.into_owned();
        let mut inv: Vec<T> = norms.iter().map(|n| T::of(1.0 / n)).collect();
        let mut rescaled = Vec::with_capacity(outside.len());
        for j in outside {
            let mut row = owned.row_mut(j);
            let row = row.as_slice_mut().expect("standard layout");
            kernels::rescale_row(row, norms[j]);
            let scaled_norm = kernels::norm(row);
            inv[j] = T::of(1.0 / scaled_norm);
            rescaled.push((j, scaled_norm / norms[j].max(T::GRAD_NORM_MIN)));
        }
        Ok(Centres {
            rows: owned.into(),
            inv,
            rescaled,
        })
    }

    fn view(&self) -> ArrayView2<'_, T> {
        self.rows.view()
    }

    /// Turns gradient rows computed over the rescaled rows into those of the given rows.
    fn fix_gradient(&self, grad: &mut [T], d: usize) {
        for &(j, factor) in &self.rescaled {
            for v in &mut grad[j * d..(j + 1) * d] {
                *v = saturate(v.f64() * factor);
            }
        }
    }
}

/// Refuses a scale that would make logits (or the gradient's products) overflow `T`:
/// `scale * max|psi|` must stay below `T::MAX / (256 SAFE_SCALE^3)` (about 1.2e18 for
/// float32, 1.7e125 for float64), so that the gradient's products over rows of any norm in
/// the safe range stay finite.
fn check_logit_range<T: Real>(margin: Margins, scale: f64, arg: &'static str) -> Result<()> {
    let peak = margin.peak();
    let limit = T::MAX / (256.0 * T::SAFE_SCALE.powi(3));
    let logits = scale * peak;
    if logits.is_nan() || logits > limit {
        let what = if arg == "s" {
            format!("s = {scale}")
        } else {
            format!("a feature norm of {scale:e} (the scale of SphereFace(s=None))")
        };
        return Err(Error::invalid(
            arg,
            format!(
                "{what} makes logits up to {:e}, too large for {} (at most {limit:e}); use a \
                 smaller scale or float64",
                scale * peak,
                T::NAME
            ),
        ));
    }
    Ok(())
}

/// Label value of a row whose target class is held by another shard (sharded loss only).
pub const REMOTE_TARGET: i64 = -2;

fn check_labels(labels: &[i64], b: usize, c: usize) -> Result<Vec<Option<usize>>> {
    check_targets(labels, b, c, false)
}

/// Target columns; `remote` also accepts [`REMOTE_TARGET`] (mapped to None, like -1).
fn check_targets(labels: &[i64], b: usize, c: usize, remote: bool) -> Result<Vec<Option<usize>>> {
    if labels.len() != b {
        return Err(Error::invalid(
            "labels",
            format!("has {} entries but emb has {b} rows", labels.len()),
        ));
    }
    labels
        .iter()
        .enumerate()
        .map(|(i, &y)| match y {
            -1 => Ok(None),
            REMOTE_TARGET if remote => Ok(None),
            y if y >= 0 && (y as u64) < c as u64 => Ok(Some(y as usize)),
            y => Err(Error::invalid(
                "labels",
                format!("value {y} at index {i} is outside [-1, {c}) (-1 marks an ignored row)"),
            )),
        })
        .collect()
}

fn check_finite<T: Real>(m: ArrayView2<T>, arg: &'static str) -> Result<()> {
    let bad = m
        .axis_iter(Axis(0))
        .into_par_iter()
        .position_first(|row| row.iter().any(|v| !v.is_finite()));
    match bad {
        Some(i) => Err(Error::invalid(arg, format!("row {i} contains NaN or inf"))),
        None => Ok(()),
    }
}

fn check_shape(arg: &'static str, got: (usize, usize), want: (usize, usize)) -> Result<()> {
    if got != want {
        return Err(Error::invalid(
            arg,
            format!("has shape {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}

impl<T: Real> Prepared<T> {
    fn new(
        emb: ArrayView2<T>,
        weight: ArrayView2<T>,
        labels: &[i64],
        margin: Margins,
        head: HeadOptions,
    ) -> Result<Self> {
        Self::new_shard(emb, weight, labels, margin, false, head)
    }

    /// `sharded`: `labels` may hold [`REMOTE_TARGET`] for rows whose target class is in
    /// another shard of the weight.
    fn new_shard(
        emb: ArrayView2<T>,
        weight: ArrayView2<T>,
        labels: &[i64],
        margin: Margins,
        sharded: bool,
        head: HeadOptions,
    ) -> Result<Self> {
        head.check()?;
        let (b, d) = emb.dim();
        let (rows, dw) = weight.dim();
        let k = head.sub_centers;
        if rows % k != 0 {
            return Err(Error::invalid(
                "weight",
                format!("has {rows} rows, not a multiple of sub_centers = {k}"),
            ));
        }
        let c = rows / k;
        if b == 0 {
            return Err(Error::invalid("emb", "empty batch: need at least one row"));
        }
        if d == 0 {
            return Err(Error::invalid("emb", "embedding size is 0"));
        }
        if c == 0 {
            return Err(Error::invalid("weight", "has no classes (0 rows)"));
        }
        if dw != d {
            return Err(Error::invalid(
                "weight",
                format!("has {dw} columns but emb has {d}: embedding sizes differ"),
            ));
        }
        // Buffers sized by the caller (a broadcast array can claim terabytes without holding
        // them): the unit rows and gradient of the embeddings, the class centres' row-major
        // copy and gradient. Refused before anything is allocated.
        let size = std::mem::size_of::<T>() as u128;
        limits::check_memory(
            "emb",
            2 * b as u128 * d as u128 * size,
            "the embeddings' unit rows and gradient",
        )?;
        limits::check_memory(
            "weight",
            2 * rows as u128 * d as u128 * size,
            "the class centres' copy and gradient",
        )?;
        let target = check_targets(labels, b, c, sharded)?;
        let valid = labels.iter().map(|&y| y != -1).collect();
        let x_norm = row_norms(emb, "emb")?;
        let emb = emb.as_standard_layout();
        let mut xhat = Array2::zeros((b, d));
        for ((row, mut out), &n) in emb
            .axis_iter(Axis(0))
            .zip(xhat.axis_iter_mut(Axis(0)))
            .zip(&x_norm)
        {
            let row = row.to_slice().expect("standard layout");
            kernels::unit_into(row, n, out.as_slice_mut().expect("standard layout"));
        }
        let (row_scale, feature_norm_scale) = match margin.check(b)? {
            Scale::Fixed(s) => {
                check_logit_range::<T>(margin, s, "s")?;
                (vec![s; b], false)
            }
            Scale::FeatureNorm => {
                let peak = x_norm.iter().fold(0.0f64, |m, &n| m.max(n));
                check_logit_range::<T>(margin, peak, "emb")?;
                (x_norm.clone(), true)
            }
        };
        let hard = margin.row(0).hard_negatives(0.0).is_some();
        Ok(Prepared {
            c,
            d,
            k,
            general: k > 1 || head.interclass_filter.is_some() || hard,
            hard_negatives: hard,
            filter: head.interclass_filter,
            rules: vec![nontarget_rule(head.interclass_filter, None); b],
            target_sub: vec![0; b],
            xhat,
            x_norm,
            row_scale,
            feature_norm_scale,
            target,
            valid,
            target_logit: vec![0.0; b],
            target_dpsi: vec![0.0; b],
            target_dnorm: vec![0.0; b],
            penalty: vec![(0.0, 0.0); b],
        })
    }

    /// Every row's target logit and psi' (and its non-target rule), from the class centres
    /// as the GEMMs see them. `remote_cos`: the target cosines of rows whose target another
    /// shard holds (needed by hard-negative margins only).
    fn set_targets(
        &mut self,
        centres: &Centres<T>,
        margin: Margins,
        remote_cos: Option<&[f64]>,
    ) -> Result<()> {
        let weight = centres.view();
        for i in 0..self.b() {
            if let Some(y) = self.target[i] {
                // the class's cosine: its closest centre's
                let (mut cos, mut sub) = (f64::NEG_INFINITY, 0);
                for a in 0..self.k {
                    let j = y * self.k + a;
                    let c = dot_f64(self.xhat.row(i), weight.row(j)) * centres.inv[j].f64();
                    if c > cos {
                        (cos, sub) = (c, a);
                    }
                }
                let cos = cos.clamp(-1.0, 1.0);
                self.target_sub[i] = sub as u8;
                let rule = margin.row(i).hard_negatives(cos);
                self.rules[i] = nontarget_rule(self.filter, rule);
                let row = RowContext {
                    norm: self.x_norm[i],
                };
                let target = margin.row(i).target(cos, row);
                // Rounded to T: the stash holds it in T, and loss and gradient must see the
                // same value the softmax statistics saw (float32 logits of 1e15 differ by 1e7).
                self.target_logit[i] = T::of(self.row_scale[i] * target.psi).f64();
                self.target_dpsi[i] = target.dpsi;
                self.target_dnorm[i] = target.dpsi_dnorm;
            } else if self.hard_negatives && self.valid[i] {
                // the target lives in another shard: its cosine comes from the caller
                let cos = remote_cos
                    .and_then(|cs| cs.get(i))
                    .copied()
                    .ok_or_else(|| {
                        Error::invalid(
                            "target_cos",
                            "hard-negative margins need every row's target cosine when targets \
                         live in other shards",
                        )
                    })?;
                if !cos.is_finite() {
                    return Err(Error::invalid(
                        "target_cos",
                        format!("entry {i} is NaN or inf"),
                    ));
                }
                let rule = margin.row(i).hard_negatives(cos);
                self.rules[i] = nontarget_rule(self.filter, rule);
            }
            if self.valid[i] {
                let row = RowContext {
                    norm: self.x_norm[i],
                };
                self.penalty[i] = margin.row(i).penalty(row);
            }
        }
        Ok(())
    }

    fn b(&self) -> usize {
        self.x_norm.len()
    }

    /// Logits of rows `rows` against the class tile starting at `lo` (`w_tile` its rows of W).
    fn logits_tile(
        &self,
        rows: Range<usize>,
        lo: usize,
        w_tile: ArrayView2<T>,
        inv: &[T],
        mut out: ArrayViewMut2<T>,
    ) {
        let ct = w_tile.nrows();
        T::gemm(
            T::one(),
            &self.xhat.slice(s![rows.clone(), ..]),
            &w_tile.t(),
            T::zero(),
            &mut out,
        );
        for (local, i) in rows.enumerate() {
            let mut row = out.row_mut(local);
            let z = row.as_slice_mut().expect("logit rows are contiguous");
            kernels::scale_clamp(z, inv, T::of(self.row_scale[i]));
            if let Some(y) = self.target[i] {
                if (lo..lo + ct).contains(&y) {
                    row[y - lo] = T::of(self.target_logit[i]);
                }
            }
        }
    }

    /// Class cosines of rows `rows` against the class tile starting at `lo` (`w_tile` its
    /// `k` centres per class, `inv` their 1/||w||) into `out` (rows × classes). With
    /// sub-centres a class's cosine is its closest centre's, whose index goes to `sub`
    /// (rows × classes; the target class gets the centre `set_targets` chose) and `scratch`
    /// holds every centre's cosine.
    #[allow(clippy::too_many_arguments)]
    fn cosines_tile(
        &self,
        rows: Range<usize>,
        lo: usize,
        w_tile: ArrayView2<T>,
        inv: &[T],
        mut out: ArrayViewMut2<T>,
        scratch: &mut Vec<T>,
        sub: &mut [u8],
    ) {
        let (nr, k) = (rows.len(), self.k);
        let x = self.xhat.slice(s![rows.clone(), ..]);
        if k == 1 {
            T::gemm(T::one(), &x, &w_tile.t(), T::zero(), &mut out);
            for mut row in out.rows_mut() {
                let row = row.as_slice_mut().expect("cosine rows are contiguous");
                kernels::scale_clamp(row, inv, T::one());
            }
            return;
        }
        let kw = w_tile.nrows();
        let width = kw / k;
        scratch.resize(nr * kw, T::zero());
        {
            let mut all =
                ArrayViewMut2::from_shape((nr, kw), &mut scratch[..nr * kw]).expect("tile");
            T::gemm(T::one(), &x, &w_tile.t(), T::zero(), &mut all);
        }
        for (local, i) in rows.enumerate() {
            let centres = &mut scratch[local * kw..(local + 1) * kw];
            kernels::scale_clamp(centres, inv, T::one());
            let mut o = out.row_mut(local);
            let subs = &mut sub[local * width..(local + 1) * width];
            for (j, class) in centres.chunks_exact(k).enumerate() {
                let (mut best, mut arg) = (class[0], 0);
                for (a, &v) in class.iter().enumerate().skip(1) {
                    if v > best {
                        (best, arg) = (v, a);
                    }
                }
                o[j] = best;
                subs[j] = arg as u8;
            }
            if let Some(y) = self.target[i] {
                if (lo..lo + width).contains(&y) {
                    let a = self.target_sub[i];
                    subs[y - lo] = a;
                    o[y - lo] = centres[(y - lo) * k + a as usize];
                }
            }
        }
    }

    /// [`Prepared::cosines_tile`] of every row, in new buffers: (cosines, arg-max centres).
    fn all_rows_cosines(
        &self,
        lo: usize,
        w_tile: ArrayView2<T>,
        inv: &[T],
    ) -> (Array2<T>, Vec<u8>) {
        let (b, width) = (self.b(), w_tile.nrows() / self.k);
        let mut cos = Array2::zeros((b, width));
        let mut sub = vec![0u8; if self.k > 1 { b * width } else { 0 }];
        let mut scratch = Vec::new();
        self.cosines_tile(
            0..b,
            lo,
            w_tile,
            inv,
            cos.view_mut(),
            &mut scratch,
            &mut sub,
        );
        (cos, sub)
    }

    /// Row `i`'s logits from its class cosines `cos` of the tile starting at class `lo`: its
    /// non-target rule, scaled, and the target logit in the target's column.
    fn general_logits_row(&self, i: usize, lo: usize, cos: &[T], z: &mut [T]) {
        kernels::nontarget_logits(cos, self.rules[i], T::of(self.row_scale[i]), z);
        if let Some(y) = self.target[i] {
            if (lo..lo + cos.len()).contains(&y) {
                z[y - lo] = T::of(self.target_logit[i]);
            }
        }
    }

    /// dx = (dx̂ - x̂ (x̂·dx̂)) / ||x|| + x̂ * norm_term (the last only when scale = ||x||).
    fn finish_grad_emb(&self, mut dxhat: Array2<T>, norm_term: &[f64]) -> Array2<T> {
        for (i, mut g) in dxhat.axis_iter_mut(Axis(0)).enumerate() {
            let xh = self.xhat.row(i);
            let dot = dot_f64(xh, g.view());
            let inv = 1.0 / self.x_norm[i].max(T::GRAD_NORM_MIN);
            // dL/d||x_i||: the feature-norm scale's, MagFace's margin and regulariser
            let extra = norm_term[i];
            if inv <= T::SAFE_SCALE && extra.abs() <= T::SAFE_SCALE {
                let (dot, inv, extra) = (T::of(dot), T::of(inv), T::of(extra));
                for (gv, &xv) in g.iter_mut().zip(xh) {
                    *gv = (*gv - xv * dot) * inv + xv * extra;
                }
            } else {
                // a tiny row: its gradient is large, computed in f64 and kept finite
                for (gv, &xv) in g.iter_mut().zip(xh) {
                    let (gf, xf) = (gv.f64(), xv.f64());
                    *gv = saturate((gf - xf * dot) * inv + xf * extra);
                }
            }
        }
        dxhat
    }
}

/// Given `g` = dL/dc of a tile with column j already divided by ||w_j||, adds `g·W_t` (= G·Ŵ_t)
/// into `dxhat` and sets `grad_tile = P(beta·grad_tile + gᵀ·X̂)`, where P removes from each
/// row its component along ŵ_j (the normalisation's Jacobian; P is linear and idempotent,
/// so accumulating over row chunks with beta = 1 stays exact). A None output is skipped.
fn backprop_tile<T: Real>(
    g: ArrayView2<T>,
    xhat_rows: ArrayView2<T>,
    w_tile: ArrayView2<T>,
    w_inv: &[T],
    beta: T,
    grad_tile: Option<ArrayViewMut2<T>>,
    dxhat: Option<&mut Array2<T>>,
) {
    if let Some(dxhat) = dxhat {
        T::gemm(T::one(), &g, &w_tile, T::one(), dxhat);
    }
    if let Some(mut grad_tile) = grad_tile {
        T::gemm(T::one(), &g.t(), &xhat_rows, beta, &mut grad_tile);
        for ((mut gw, w), &inv) in grad_tile
            .axis_iter_mut(Axis(0))
            .zip(w_tile.axis_iter(Axis(0)))
            .zip(w_inv)
        {
            let g = gw.as_slice_mut().expect("gradient rows are contiguous");
            kernels::project_out(g, w.as_slice().expect("weight rows are contiguous"), inv);
        }
    }
}

/// [`backprop_tile`] for a tile whose `g` is mostly zeros (the gradient filter dropped
/// them): one axpy per non-zero entry into `dxhat` and into the tile's gradient rows, and
/// the normalisation's Jacobian on the rows that got any. `beta = 0` clears the rows first
/// (they may hold the stash). `nz` is scratch for the entries.
#[allow(clippy::too_many_arguments)]
fn sparse_backprop_tile<T: Real>(
    g: ArrayView2<T>,
    xhat_rows: ArrayView2<T>,
    w_tile: ArrayView2<T>,
    w_inv: &[T],
    beta: T,
    grad_tile: Option<ArrayViewMut2<T>>,
    dxhat: Option<&mut Array2<T>>,
    nz: &mut Vec<(u32, u32, T)>,
) {
    nz.clear();
    for (i, grow) in g.axis_iter(Axis(0)).enumerate() {
        let grow = grow.to_slice().expect("g rows are contiguous");
        kernels::nonzeros(grow, |j, v| nz.push((i as u32, j as u32, v)));
    }
    if let Some(dxhat) = dxhat {
        for &(i, j, v) in nz.iter() {
            let mut out = dxhat.row_mut(i as usize);
            let out = out.as_slice_mut().expect("gradient rows are contiguous");
            kernels::axpy(v, row(w_tile, j as usize), out);
        }
    }
    if let Some(mut grad_tile) = grad_tile {
        if beta == T::zero() {
            grad_tile.fill(T::zero());
        }
        let mut touched = vec![false; grad_tile.nrows()];
        for &(i, j, v) in nz.iter() {
            let mut out = grad_tile.row_mut(j as usize);
            let out = out.as_slice_mut().expect("gradient rows are contiguous");
            kernels::axpy(v, row(xhat_rows, i as usize), out);
            touched[j as usize] = true;
        }
        for (j, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
            let mut gw = grad_tile.row_mut(j);
            let gw = gw.as_slice_mut().expect("gradient rows are contiguous");
            kernels::project_out(gw, row(w_tile, j), w_inv[j]);
        }
    }
}

/// Row `i` of a standard-layout view, as a slice.
fn row<'a, T>(m: ArrayView2<'a, T>, i: usize) -> &'a [T] {
    let r = m.index_axis_move(Axis(0), i);
    r.to_slice()
        .expect("rows of standard-layout views are contiguous")
}

/// A zeroed buffer that Linux backs with 2 MiB pages where it can.
///
/// The weight gradient is hundreds of MB, freshly allocated per call; with 4 KiB pages the
/// first touch of each page is a fault that cost ~10% of the whole head in profiles.
///
/// Above glibc's largest mmap threshold (32 MiB) calloc hands out fresh pages that are
/// zero already, so nothing is written here and the first touches are spread over the
/// threads of pass 1. Below it the block may come from the heap, where calloc would clear
/// it on this one thread while the others wait (1.5 ms of a 65 ms step at 10k classes), so
/// the zeros are written in parallel instead.
///
/// The allocation is fallible: a gradient the system cannot give is a `MemoryError` naming
/// `weight`, not an abort.
///
/// A large buffer a caller has dropped since (see [`crate::pages::give_back`]) is reused
/// when one fits: its pages are mapped already, so the zeros are a parallel memset instead
/// of the kernel's zeroing of fresh pages inside the GEMMs.
fn zeroed_for_huge_pages<T: Real>(n: usize) -> Result<Vec<T>> {
    use crate::pages::FRESH_PAGES_FROM;
    const WHAT: &str = "the class centres' gradient";
    if n.saturating_mul(std::mem::size_of::<T>()) >= FRESH_PAGES_FROM {
        if let Some(mut buf) = crate::pages::take::<T>(n) {
            buf.par_extend(rayon::iter::repeat_n(T::zero(), n));
            return Ok(buf);
        }
        let buf = limits::filled("weight", n, T::zero(), WHAT)?;
        crate::pages::advise_huge(&buf);
        return Ok(buf);
    }
    let mut buf = Vec::new();
    limits::reserve("weight", &mut buf, n, WHAT)?;
    crate::pages::advise_huge(&buf);
    buf.par_extend(rayon::iter::repeat_n(T::zero(), n));
    Ok(buf)
}

/// Scratch one rayon job reuses across the tiles it processes in pass 2.
struct Pass2<T> {
    dxhat: Array2<T>,
    /// dL/dc of a tile, per centre (rows × ct·k).
    g: Vec<T>,
    /// With sub-centres: one row's dL/dc per class, and the 1/||w|| of its arg-max centres.
    g_class: Vec<T>,
    inv_sel: Vec<T>,
    /// Σ_j p_ij z_ij per row: the feature-norm scale's extra gradient term.
    pz: Vec<f64>,
    /// Entries of the backward GEMMs done and in all (the gradient filter's savings).
    work_done: f64,
    work_full: f64,
    /// A sparse tile's kept entries (row, column, value).
    nonzeros: Vec<(u32, u32, T)>,
}

impl<T: Real> Pass2<T> {
    fn new(rows: usize, d: usize, ct: usize, k: usize) -> Self {
        let per_class = if k > 1 { ct } else { 0 };
        Pass2 {
            dxhat: Array2::zeros((rows, d)),
            g: vec![T::zero(); rows * ct * k],
            g_class: vec![T::zero(); per_class],
            inv_sel: vec![T::zero(); per_class],
            pz: vec![0.0; rows],
            work_done: 0.0,
            work_full: 0.0,
            nonzeros: Vec::new(),
        }
    }

    /// Row `i`'s per-class gradient buffer of a tile of `width` classes: its row of `g`
    /// without sub-centres, else `g_class`.
    fn g_class_row(&mut self, i: usize, width: usize, k: usize) -> &mut [T] {
        if k == 1 {
            &mut self.g[i * width..(i + 1) * width]
        } else {
            &mut self.g_class[..width]
        }
    }

    /// Divides row `i`'s per-class gradient by its centres' norms (`inv`, k per class) and,
    /// with sub-centres, puts each class's on its arg-max centre (`sub`) in `g`.
    fn spread_row(&mut self, i: usize, width: usize, k: usize, sub: &[u8], inv: &[T]) {
        if k == 1 {
            for (gv, &iv) in self.g[i * width..(i + 1) * width].iter_mut().zip(inv) {
                *gv *= iv;
            }
            return;
        }
        let full = &mut self.g[i * width * k..(i + 1) * width * k];
        full.fill(T::zero());
        for (j, &v) in self.g_class[..width].iter().enumerate() {
            let centre = j * k + sub[i * width + j] as usize;
            full[centre] = v * inv[centre];
        }
    }

    fn add(mut self, o: Pass2<T>) -> Self {
        self.dxhat += &o.dxhat;
        self.work_done += o.work_done;
        self.work_full += o.work_full;
        for (a, b) in self.pz.iter_mut().zip(&o.pz) {
            *a += b;
        }
        self
    }
}

/// Per-row constants of pass 2.
struct LossRows<'a> {
    rows: Range<usize>,
    lse: &'a [f64],
    /// d loss / d row loss: 1/n_valid for the mean, 1 otherwise, 0 for ignored rows.
    row_weight: &'a [f64],
    /// The gradient filter's probability floor, None for the exact gradient.
    floor: Option<f64>,
}

impl LossRows<'_> {
    /// The floor on a tile's stash `e = exp(z - tile_max)` of row `local` that keeps
    /// `p = e exp(tile_max - lse) >= floor`.
    fn stash_floor<T: Real>(&self, local: usize, tile_max: T) -> Option<T> {
        self.floor
            .map(|f| T::of(f * (self.lse[local] - tile_max.f64()).exp()))
    }
}

impl<T: Real> Prepared<T> {
    /// Fills `acc.g` (rows × ct) with dL/dc_ij / ||w_j||, from the tile's stash
    /// `e = exp(z - tile_max)` of pass 1: `p = e * exp(tile_max - lse)`, one multiply per
    /// element instead of a second exp.
    ///
    /// Returns how many entries are non-zero (at most; every one without a filter).
    fn loss_grad_tile(
        &self,
        lr: &LossRows,
        lo: usize,
        e: &[T],
        tile_max: &[T],
        inv: &[T],
        acc: &mut Pass2<T>,
    ) -> usize {
        let ct = e.len() / lr.rows.len();
        let mut kept = 0;
        for (local, i) in lr.rows.clone().enumerate() {
            let erow = &e[local * ct..(local + 1) * ct];
            let grow = &mut acc.g[local * ct..(local + 1) * ct];
            if lr.row_weight[local] == 0.0 {
                grow.fill(T::zero());
                continue;
            }
            kept += self.grad_row(lr, local, i, lo, tile_max[local], erow, inv, grow);
        }
        kept
    }

    /// Row `local` (batch row `i`) of dL/dc / ||w_j|| over the classes from `lo`, from its
    /// stash `erow`: `p = e exp(tile_max - lse)` times the row's weight and scale, dropped
    /// where the gradient filter says, and the target's entry, `(p - 1) psi'` in f64 from
    /// the f64 logits (no cancellation in float32). Returns how many entries it kept.
    #[allow(clippy::too_many_arguments)]
    fn grad_row(
        &self,
        lr: &LossRows,
        local: usize,
        i: usize,
        lo: usize,
        tile_max: T,
        erow: &[T],
        inv: &[T],
        grow: &mut [T],
    ) -> usize {
        let scale = lr.row_weight[local] * self.row_scale[i];
        let coef = T::of(scale * (tile_max.f64() - lr.lse[local]).exp());
        // (+ 1: the target's entry, set below whatever the filter said)
        let kept = match lr.stash_floor(local, tile_max) {
            Some(floor) => kernels::scale_mul_above(erow, coef, inv, floor, grow) + 1,
            None => {
                kernels::scale_mul(erow, coef, inv, grow);
                erow.len()
            }
        };
        if let Some(y) = self.target[i] {
            if (lo..lo + erow.len()).contains(&y) {
                let p = (self.target_logit[i] - lr.lse[local]).exp();
                let g = scale * (p - 1.0) * self.target_dpsi[i];
                grow[y - lo] = T::of(g * inv[y - lo].f64());
            }
        }
        kept
    }

    /// [`Prepared::loss_grad_tile`] for a tile with sub-centres: each class's gradient,
    /// divided by its arg-max centre's norm (`sub`: the arg-maxes, `inv`: the tile's centres'
    /// 1/||w||), lands on that centre; the other centres get 0.
    #[allow(clippy::too_many_arguments)]
    fn sub_centre_grad_tile(
        &self,
        lr: &LossRows,
        lo: usize,
        e: &[T],
        tile_max: &[T],
        sub: &[u8],
        inv: &[T],
        acc: &mut Pass2<T>,
    ) -> usize {
        let (nr, k) = (lr.rows.len(), self.k);
        let width = e.len() / nr;
        let mut kept = 0;
        let Pass2 {
            g,
            g_class,
            inv_sel,
            ..
        } = acc;
        for (local, i) in lr.rows.clone().enumerate() {
            let full = &mut g[local * width * k..(local + 1) * width * k];
            full.fill(T::zero());
            if lr.row_weight[local] == 0.0 {
                continue;
            }
            let subs = &sub[local * width..(local + 1) * width];
            for (j, v) in inv_sel[..width].iter_mut().enumerate() {
                *v = inv[j * k + subs[j] as usize];
            }
            let (erow, grow) = (
                &e[local * width..(local + 1) * width],
                &mut g_class[..width],
            );
            let inv_row = &inv_sel[..width];
            kept += self.grad_row(lr, local, i, lo, tile_max[local], erow, inv_row, grow);
            for (j, &v) in grow.iter().enumerate() {
                full[j * k + subs[j] as usize] = v;
            }
        }
        kept
    }
}

/// Loss and both gradients of the margin-softmax head, fused (see the module docs).
pub fn margin_loss<'m, T: Real>(
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
    reduction: Reduction,
) -> Result<LossOutput<T>> {
    margin_loss_with(emb, weight, labels, margin, LossOptions::new(reduction))
}

/// [`margin_loss`] with a choice of gradients and per-row upstream factors.
pub fn margin_loss_with<'m, T: Real>(
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
    options: LossOptions,
) -> Result<LossOutput<T>> {
    fused_loss(
        emb,
        weight,
        labels,
        margin.into(),
        options,
        STASH_BUDGET_BYTES,
        None,
    )
}

/// One row's softmax statistics over a set of classes (a tile, a shard, or all of them),
/// merged in f64: `sum = Σ exp(z - max)`, `sum_ez = Σ exp(z - max) z` (so `Σ p z =
/// sum_ez / sum`), and the target logit if the set holds the target (else 0). Tiles merge
/// into a shard's part in pass 1; shards merge theirs in `ShardOptions::combine`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowPart {
    pub max: f64,
    pub sum: f64,
    pub sum_ez: f64,
    pub target_logit: f64,
}

impl RowPart {
    /// The statistics of no classes at all.
    pub const EMPTY: RowPart = RowPart {
        max: f64::NEG_INFINITY,
        sum: 0.0,
        sum_ez: 0.0,
        target_logit: 0.0,
    };

    /// The statistics of the union of two disjoint sets of classes.
    pub fn merge(self, o: RowPart) -> RowPart {
        let target_logit = self.target_logit + o.target_logit;
        if o.sum == 0.0 {
            return RowPart {
                target_logit,
                ..self
            };
        }
        if self.sum == 0.0 {
            return RowPart { target_logit, ..o };
        }
        let max = self.max.max(o.max);
        let (a, b) = ((self.max - max).exp(), (o.max - max).exp());
        RowPart {
            max,
            sum: self.sum * a + o.sum * b,
            sum_ez: self.sum_ez * a + o.sum_ez * b,
            target_logit,
        }
    }

    /// Turns a row of logits into `exp(z - max)` in place and returns its statistics (the
    /// target logit is filled in by the caller).
    fn exp_row<T: Real>(z: &mut [T]) -> RowPart {
        let m = kernels::max(z);
        let (sum, sum_ez) = kernels::exp_in_place(z, m);
        RowPart {
            max: m.f64(),
            sum: sum.f64(),
            sum_ez: sum_ez.f64(),
            target_logit: 0.0,
        }
    }
}

/// How one shard of a model-parallel head meets the others.
pub struct ShardOptions<'a> {
    /// Every shard must cut the batch into the same row chunks (each chunk is one call to
    /// `combine`): the chunks are sized for this many classes, the largest shard's count.
    pub stash_classes: usize,
    /// Exactly one shard adds the terms that do not split over classes (the gradient through
    /// the feature-norm scale).
    pub first_shard: bool,
    /// Replaces each row's statistics by those over all shards (a collective: every shard
    /// calls it the same number of times). The flag says this shard has failed; `combine`
    /// must return an error if any shard has, so that all stop together.
    pub combine: &'a mut dyn FnMut(&mut [RowPart], bool) -> Result<()>,
    /// Every row's target cosine (whichever shard holds the target): hard-negative margins
    /// (CurricularFace, MV-Softmax) threshold each row's non-targets on it. None otherwise.
    pub target_cos: Option<&'a [f64]>,
}

/// The loss of a head whose classes are split across shards (processes), for this shard's
/// rows of the weight. `labels` are this shard's target columns, -1 for ignored rows and
/// [`REMOTE_TARGET`] for rows whose target another shard holds. The loss and row losses are
/// those of the whole head (every shard returns the same); `grad_weight` is this shard's;
/// `grad_emb` is this shard's share of the embeddings' gradient: the sum over shards is the
/// whole.
pub fn margin_loss_shard<'m, T: Real>(
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
    options: LossOptions,
    shard: &mut ShardOptions,
) -> Result<LossOutput<T>> {
    fused_loss(
        emb,
        weight,
        labels,
        margin.into(),
        options,
        STASH_BUDGET_BYTES,
        Some(shard),
    )
}

/// How the rows are cut so that the stash of pass 1 fits: when B <= D a tile's logits wait
/// inside that tile's rows of the weight gradient (no stash at all), else row chunks whose
/// stash fits the budget.
struct ChunkPlan {
    /// Classes per tile.
    ct: usize,
    stash_in_grad: bool,
    chunk_rows: usize,
}

impl ChunkPlan {
    /// `chunk_classes`: the classes one chunk's stash holds (every shard must cut the batch
    /// alike, so shards size it for the largest shard).
    fn new<T>(b: usize, c: usize, d: usize, chunk_classes: usize, budget_bytes: usize) -> Self {
        let stash_in_grad = b <= d;
        let chunk_rows = if stash_in_grad {
            b
        } else {
            (budget_bytes / chunk_classes.saturating_mul(std::mem::size_of::<T>()))
                .max(8)
                .min(b)
        };
        ChunkPlan {
            ct: tile_width(c),
            stash_in_grad,
            chunk_rows,
        }
    }
}

/// d loss / d row loss for every row (0 for ignored rows, times `upstream` when given) and
/// the factor of the mean (1/valid rows; 1 for sum and none).
fn row_weights(
    valid: &[bool],
    reduction: Reduction,
    upstream: Option<&[f64]>,
) -> Result<(Vec<f64>, f64)> {
    let b = valid.len();
    let n_valid = valid.iter().filter(|&&v| v).count();
    let mean_factor = match reduction {
        Reduction::Mean if n_valid > 0 => 1.0 / n_valid as f64,
        Reduction::Mean => 0.0,
        Reduction::Sum | Reduction::None => 1.0,
    };
    if let Some(up) = upstream {
        if up.len() != b {
            return Err(Error::invalid(
                "upstream",
                format!("has {} entries but emb has {b} rows", up.len()),
            ));
        }
        if let Some(i) = up.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "upstream",
                format!("entry {i} is NaN or inf"),
            ));
        }
    }
    let weights = valid
        .iter()
        .enumerate()
        .map(|(i, &v)| match (v, upstream) {
            (false, _) => 0.0,
            (true, None) => mean_factor,
            (true, Some(up)) => mean_factor * up[i],
        })
        .collect();
    Ok((weights, mean_factor))
}

/// The class tiles of one head call: the prepared rows, the class centres as the GEMMs read
/// them, and the tile width.
struct Tiles<'a, T> {
    p: &'a Prepared<T>,
    weight: ArrayView2<'a, T>,
    inv: &'a [T],
    ct: usize,
}

impl<T: Real> Tiles<'_, T> {
    /// Class tile `t`: its first class, its rows of W (k per class) and their 1/||w||.
    fn tile(&self, t: usize) -> (usize, ArrayView2<'_, T>, &[T]) {
        let (c, k) = (self.p.c, self.p.k);
        let lo = t * self.ct;
        let hi = (lo + self.ct).min(c);
        let w_tile = self.weight.slice(s![lo * k..hi * k, ..]);
        (lo, w_tile, &self.inv[lo * k..hi * k])
    }

    /// Bytes per tile of the arg-max buffer `subs` of a chunk of `nr` rows: one per class
    /// with sub-centres; without, one per tile (unused, but it keeps the zips aligned).
    fn sub_chunk(&self, nr: usize) -> usize {
        if self.p.k > 1 {
            nr * self.ct
        } else {
            1
        }
    }

    /// Pass 1 over `rows`: every tile's logits, turned into `exp(z - tile_max)` in its slot
    /// of `slots` (`slot_len` values each), and the rows' statistics merged across tiles
    /// (the target logits filled in).
    ///
    /// A general tile (see [`Prepared::general`]) computes its logits from the class cosines
    /// in a copy of each row, and stashes `exp(z - tile_max) h'(c)` (and the arg-max centres
    /// in `subs`): pass 2 is then the same multiply as for plain tiles.
    fn pass1(
        &self,
        rows: Range<usize>,
        slots: &mut [T],
        slot_len: usize,
        tile_max: &mut [T],
        subs: &mut [u8],
    ) -> Vec<RowPart> {
        let nr = rows.len();
        let k = self.p.k;
        let tiles = slots
            .par_chunks_mut(slot_len)
            .zip(tile_max.par_chunks_mut(nr))
            .zip(subs.par_chunks_mut(self.sub_chunk(nr)))
            .enumerate();
        let (mut stats, _, _) = fold_in_groups(
            tiles,
            || (vec![RowPart::EMPTY; nr], Vec::new(), Vec::new()),
            |(mut acc, mut scratch, mut zrow): (Vec<RowPart>, Vec<T>, Vec<T>),
             (t, ((slot, tmax), sub))| {
                let (lo, w_tile, inv) = self.tile(t);
                let width = w_tile.nrows() / k;
                let z = &mut slot[..nr * width];
                let view = ArrayViewMut2::from_shape((nr, width), &mut *z).expect("tile shape");
                if !self.p.general {
                    self.p.logits_tile(rows.clone(), lo, w_tile, inv, view);
                    for (r, zrow) in z.chunks_exact_mut(width).enumerate() {
                        let st = RowPart::exp_row(zrow);
                        tmax[r] = T::of(st.max);
                        acc[r] = acc[r].merge(st);
                    }
                    return (acc, scratch, zrow);
                }
                self.p
                    .cosines_tile(rows.clone(), lo, w_tile, inv, view, &mut scratch, sub);
                zrow.resize(width, T::zero());
                for ((r, i), cos) in rows.clone().enumerate().zip(z.chunks_exact_mut(width)) {
                    self.p.general_logits_row(i, lo, cos, &mut zrow[..width]);
                    let st = RowPart::exp_row(&mut zrow[..width]);
                    tmax[r] = T::of(st.max);
                    acc[r] = acc[r].merge(st);
                    kernels::nontarget_stash(cos, &zrow[..width], self.p.rules[i]);
                }
                (acc, scratch, zrow)
            },
            |(a, scratch, zrow), (b, _, _)| {
                let merged = a.iter().zip(&b).map(|(x, y)| x.merge(*y)).collect();
                (merged, scratch, zrow)
            },
        );
        for (st, i) in stats.iter_mut().zip(rows) {
            st.target_logit = self.p.target_logit[i];
        }
        stats
    }

    /// Pass 2 over the rows of `lr`: G from the stash (`stash`, or the tiles' own rows of
    /// `grad_w` when None), `dX̂ += G·Ŵ` (returned for these rows), and each tile's rows of
    /// dW written (over the stash) or accumulated over row chunks.
    #[allow(clippy::too_many_arguments)]
    fn pass2(
        &self,
        lr: &LossRows,
        xhat_rows: ArrayView2<T>,
        tile_max: &[T],
        stash: Option<&[T]>,
        subs: &[u8],
        grad_w: &mut [T],
        want_emb: bool,
        want_weight: bool,
    ) -> Pass2<T> {
        let (nr, d, ct, k) = (lr.rows.len(), self.p.d, self.ct, self.p.k);
        // `own_stash` is None when the stash lives in `grad_tile` itself.
        let step = |mut acc: Pass2<T>, t: usize, own_stash: Option<&[T]>, grad_tile: &mut [T]| {
            let (lo, w_tile, inv) = self.tile(t);
            let w_rows = w_tile.nrows();
            let width = w_rows / k;
            let tmax = &tile_max[t * nr..(t + 1) * nr];
            let sub = &subs[(t * self.sub_chunk(nr)).min(subs.len())..];
            let e = match own_stash {
                Some(e) => e,
                None => &grad_tile[..nr * width],
            };
            let kept = if k > 1 {
                self.p
                    .sub_centre_grad_tile(lr, lo, e, tmax, sub, inv, &mut acc)
            } else {
                self.p.loss_grad_tile(lr, lo, e, tmax, inv, &mut acc)
            };
            let entries = (nr * w_rows) as f64;
            let sparse = lr.floor.is_some() && (kept as f64) <= SPARSE_SHARE * entries;
            acc.work_full += entries;
            acc.work_done += if sparse { kept as f64 } else { entries };
            // Overwrite the tile's gradient rows when they held the stash, else accumulate
            // over row chunks.
            let beta = if own_stash.is_some() {
                T::one()
            } else {
                T::zero()
            };
            let g = ArrayView2::from_shape((nr, w_rows), &acc.g[..nr * w_rows]).expect("tile");
            let grad_view = ArrayViewMut2::from_shape((w_rows, d), grad_tile).expect("tile");
            let mut dx = std::mem::take(&mut acc.dxhat);
            let dx_out = want_emb.then_some(&mut dx);
            let grad_out = want_weight.then_some(grad_view);
            if sparse {
                let nz = &mut acc.nonzeros;
                sparse_backprop_tile(g, xhat_rows, w_tile, inv, beta, grad_out, dx_out, nz);
            } else {
                backprop_tile(g, xhat_rows, w_tile, inv, beta, grad_out, dx_out);
            }
            acc.dxhat = dx;
            acc
        };
        let new_acc = || Pass2::new(nr, d, ct, k);
        match stash {
            None => fold_in_groups(
                grad_w.par_chunks_mut(ct * k * d).enumerate(),
                new_acc,
                |acc, (t, grad_tile)| step(acc, t, None, grad_tile),
                Pass2::add,
            ),
            Some(stash) => fold_in_groups(
                stash
                    .par_chunks(nr * ct)
                    .zip(grad_w.par_chunks_mut(ct * k * d))
                    .enumerate(),
                new_acc,
                |acc, (t, (e, grad_tile))| step(acc, t, Some(e), grad_tile),
                Pass2::add,
            ),
        }
    }
}

fn fused_loss<T: Real>(
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: Margins,
    options: LossOptions,
    stash_budget_bytes: usize,
    mut shard: Option<&mut ShardOptions>,
) -> Result<LossOutput<T>> {
    let reduction = options.reduction;
    let floor = options.grad_filter.floor::<T>()?;
    let mut p = Prepared::new_shard(emb, weight, labels, margin, shard.is_some(), options.head)?;
    let (b, c, d, k) = (p.b(), p.c, p.d, p.k);
    let chunk_classes = shard.as_ref().map_or(c, |sh| sh.stash_classes.max(1));
    let plan = ChunkPlan::new::<T>(b, c, d, chunk_classes, stash_budget_bytes);
    let centres = match Centres::new(weight) {
        Ok(centres) => centres,
        Err(e) => {
            if let Some(sh) = shard.as_mut() {
                // The other shards wait in the first chunk's collective: join it as failed,
                // so that they stop too.
                let _ = (sh.combine)(&mut vec![RowPart::EMPTY; plan.chunk_rows], true);
            }
            return Err(e);
        }
    };
    let remote_cos = shard.as_ref().and_then(|sh| sh.target_cos);
    if let Err(e) = p.set_targets(&centres, margin, remote_cos) {
        if let Some(sh) = shard.as_mut() {
            let _ = (sh.combine)(&mut vec![RowPart::EMPTY; plan.chunk_rows], true);
        }
        return Err(e);
    }
    let (row_weight, mean_factor) = row_weights(&p.valid, reduction, options.upstream)?;
    let (want_emb, want_weight) = (options.grad_emb, options.grad_weight);

    let mut grad_w = zeroed_for_huge_pages::<T>(c * k * d)?;
    if !p.valid.iter().any(|&v| v) {
        // Every row ignored: nothing to compute, and the stash must not leak into grad_w.
        return Ok(LossOutput {
            loss: 0.0,
            row_losses: vec![0.0; b],
            grad_emb: want_emb.then(|| Array2::zeros((b, d))),
            grad_weight: want_weight
                .then(|| Array2::from_shape_vec((c * k, d), grad_w).expect("gradient shape")),
            backward_skipped: 0.0,
        });
    }
    let tiles = Tiles {
        p: &p,
        weight: centres.view(),
        inv: &centres.inv,
        ct: plan.ct,
    };
    let ct = plan.ct;
    let mut dxhat = Array2::<T>::zeros((b, d));
    let mut row_losses = vec![0.0; b];
    let mut norm_term = vec![0.0; b];
    let mut stash = if plan.stash_in_grad {
        Vec::new()
    } else {
        vec![T::zero(); plan.chunk_rows * c]
    };
    let mut tile_max = vec![T::zero(); c.div_ceil(ct) * plan.chunk_rows];
    let mut work = (0.0, 0.0); // backward entries done, in all
    let mut subs = vec![0u8; tiles.sub_chunk(plan.chunk_rows) * c.div_ceil(ct)];

    for start in (0..b).step_by(plan.chunk_rows) {
        let rows = start..(start + plan.chunk_rows).min(b);
        let nr = rows.len();
        let mut stats = if plan.stash_in_grad {
            tiles.pass1(
                rows.clone(),
                &mut grad_w,
                ct * k * d,
                &mut tile_max,
                &mut subs,
            )
        } else {
            let stash = &mut stash[..nr * c];
            tiles.pass1(rows.clone(), stash, nr * ct, &mut tile_max, &mut subs)
        };
        // Shard combine: every shard's statistics merged into those of the whole head.
        if let Some(sh) = shard.as_mut() {
            (sh.combine)(&mut stats, false)?;
        }
        let first_shard = shard.as_ref().is_none_or(|sh| sh.first_shard);
        let lse: Vec<f64> = stats.iter().map(|st| st.max + st.sum.ln()).collect();
        for (local, i) in rows.clone().enumerate() {
            if p.valid[i] {
                let target_logit = stats[local].target_logit;
                let (penalty, dpenalty) = p.penalty[i];
                // every shard returns the whole loss; one shard adds the norm's gradient
                row_losses[i] = lse[local] - target_logit + penalty;
                if first_shard {
                    if p.feature_norm_scale {
                        let pz = stats[local].sum_ez / stats[local].sum;
                        norm_term[i] += row_weight[i] * (pz - target_logit) / p.row_scale[i];
                    }
                    norm_term[i] += row_weight[i] * dpenalty;
                }
                if p.target[i].is_some() && p.target_dnorm[i] != 0.0 {
                    // the margin moves with the norm (MagFace): through the target logit
                    let prob = (p.target_logit[i] - lse[local]).exp();
                    norm_term[i] +=
                        row_weight[i] * p.row_scale[i] * (prob - 1.0) * p.target_dnorm[i];
                }
            }
        }
        if !want_emb && !want_weight {
            continue;
        }
        let lr = LossRows {
            rows: rows.clone(),
            lse: &lse,
            row_weight: &row_weight[rows.clone()],
            floor,
        };
        let xhat_rows = p.xhat.slice(s![rows.clone(), ..]);
        // (lazily: when the stash lives in grad_w, `stash` is empty)
        let own_stash = (!plan.stash_in_grad).then(|| &stash[..nr * c]);
        let dx = tiles.pass2(
            &lr,
            xhat_rows,
            &tile_max,
            own_stash,
            &subs,
            &mut grad_w,
            want_emb,
            want_weight,
        );
        dxhat.slice_mut(s![rows, ..]).assign(&dx.dxhat);
        work = (work.0 + dx.work_done, work.1 + dx.work_full);
    }

    let grad_emb = want_emb.then(|| p.finish_grad_emb(dxhat, &norm_term));
    if want_weight {
        centres.fix_gradient(&mut grad_w, d);
    }
    let grad_weight =
        want_weight.then(|| Array2::from_shape_vec((c * k, d), grad_w).expect("gradient shape"));
    let total: f64 = row_losses.iter().sum();
    let loss = match reduction {
        Reduction::Mean => total * mean_factor,
        Reduction::Sum | Reduction::None => total,
    };
    Ok(LossOutput {
        loss,
        row_losses,
        grad_emb,
        grad_weight,
        backward_skipped: if work.1 > 0.0 {
            1.0 - work.0 / work.1
        } else {
            0.0
        },
    })
}

/// The (B, C) logits: `scale * c_ij`, with `scale * psi(c_iy)` on each row's target.
/// Rows labelled -1 get no margin.
pub fn margin_logits<'m, T: Real>(
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
) -> Result<Array2<T>> {
    margin_logits_with(emb, weight, labels, margin, HeadOptions::default())
}

/// [`margin_logits`] with sub-centres, inter-class filtering (and any margin's non-target
/// rule): the logits the fused loss takes the softmax of.
pub fn margin_logits_with<'m, T: Real>(
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
    head: HeadOptions,
) -> Result<Array2<T>> {
    let margin = margin.into();
    let mut p = Prepared::new(emb, weight, labels, margin, head)?;
    let centres = Centres::new(weight)?;
    p.set_targets(&centres, margin, None)?;
    let (b, c) = (p.b(), p.c);
    let tiles = Tiles {
        p: &p,
        weight: centres.view(),
        inv: &centres.inv,
        ct: tile_width(c),
    };
    let mut out =
        Array2::from_shape_vec((b, c), logits_buffer("weight", b, c)?).expect("logits shape");
    out.axis_chunks_iter_mut(Axis(1), tiles.ct)
        .into_par_iter()
        .enumerate()
        .for_each(|(t, mut tile)| {
            let (lo, w_tile, inv) = tiles.tile(t);
            if !p.general {
                p.logits_tile(0..b, lo, w_tile, inv, tile);
                return;
            }
            let width = tile.ncols();
            let (cos, _) = p.all_rows_cosines(lo, w_tile, inv);
            let mut z = vec![T::zero(); width];
            for (i, crow) in cos.axis_iter(Axis(0)).enumerate() {
                let crow = crow.to_slice().expect("standard layout");
                p.general_logits_row(i, lo, crow, &mut z);
                tile.row_mut(i).assign(&ndarray::ArrayView1::from(&z[..]));
            }
        });
    Ok(out)
}

/// Gradients of any loss of [`margin_logits`]' output, given `grad_logits` = dL/dlogits.
pub fn margin_logits_backward<'m, T: Real>(
    grad_logits: ArrayView2<T>,
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
) -> Result<(Array2<T>, Array2<T>)> {
    margin_logits_backward_with(
        grad_logits,
        emb,
        weight,
        labels,
        margin,
        HeadOptions::default(),
    )
}

/// Gradients of any loss of [`margin_logits_with`]' output.
pub fn margin_logits_backward_with<'m, T: Real>(
    grad_logits: ArrayView2<T>,
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
    head: HeadOptions,
) -> Result<(Array2<T>, Array2<T>)> {
    let margin = margin.into();
    let mut p = Prepared::new(emb, weight, labels, margin, head)?;
    let centres = Centres::new(weight)?;
    p.set_targets(&centres, margin, None)?;
    let (b, c, d, k) = (p.b(), p.c, p.d, p.k);
    check_shape("grad_logits", grad_logits.dim(), (b, c))?;
    check_finite(grad_logits, "grad_logits")?;
    let tiles = Tiles {
        p: &p,
        weight: centres.view(),
        inv: &centres.inv,
        ct: tile_width(c),
    };
    let ct = tiles.ct;
    let mut grad_w = Array2::from_shape_vec((c * k, d), zeroed_for_huge_pages::<T>(c * k * d)?)
        .expect("gradient shape");
    let new_acc = || Pass2::new(b, d, ct, k);
    let tiles_of_grad = grad_w
        .axis_chunks_iter_mut(Axis(0), ct * k)
        .into_par_iter()
        .enumerate();
    let acc = fold_in_groups(
        tiles_of_grad,
        new_acc,
        |mut acc, (t, grad_tile)| {
            let (lo, w_tile, inv) = tiles.tile(t);
            let w_rows = w_tile.nrows();
            let width = w_rows / k;
            let upstream = grad_logits.slice(s![.., lo..lo + width]);
            // the tile's class cosines (and arg-max centres) when the logits need them
            let (cos, sub) = if p.general || p.feature_norm_scale {
                p.all_rows_cosines(lo, w_tile, inv)
            } else {
                (Array2::zeros((b, width)), Vec::new())
            };
            let mut z = vec![T::zero(); width];
            for i in 0..b {
                let scale = p.row_scale[i];
                let crow = cos.row(i);
                let crow = crow.as_slice().expect("standard layout");
                if p.feature_norm_scale {
                    // The logits scale by ||x||, so dL/d||x_i|| = Σ_j grad_ij z_ij / ||x_i||.
                    p.general_logits_row(i, lo, crow, &mut z);
                    let zrow = ndarray::ArrayView1::from(&z[..]);
                    acc.pz[i] += dot_f64(upstream.row(i), zrow) / scale;
                }
                // dL/dc_ij / ||w||, per class
                let g_row = &mut acc.g_class_row(i, width, k);
                for (j, (gv, &u)) in g_row.iter_mut().zip(upstream.row(i)).enumerate() {
                    let dh = if p.general {
                        p.rules[i].apply(crow[j]).1
                    } else {
                        T::one()
                    };
                    *gv = u * T::of(scale) * dh;
                }
                if let Some(y) = p.target[i] {
                    if (lo..lo + width).contains(&y) {
                        let up = upstream[[i, y - lo]].f64();
                        g_row[y - lo] = T::of(up * scale * p.target_dpsi[i]);
                        // MagFace: the target logit moves with the norm too
                        acc.pz[i] += up * scale * p.target_dnorm[i];
                    }
                }
                acc.spread_row(i, width, k, &sub, inv);
            }
            let g = ArrayView2::from_shape((b, w_rows), &acc.g[..b * w_rows]).expect("tile");
            let mut dx = std::mem::take(&mut acc.dxhat);
            backprop_tile(
                g,
                p.xhat.view(),
                w_tile,
                inv,
                T::zero(),
                Some(grad_tile),
                Some(&mut dx),
            );
            acc.dxhat = dx;
            acc
        },
        Pass2::add,
    );
    let grad_emb = p.finish_grad_emb(acc.dxhat, &acc.pz);
    centres.fix_gradient(grad_w.as_slice_mut().expect("gradient is contiguous"), d);
    Ok((grad_emb, grad_w))
}

/// A zeroed (B, C) logits buffer, allocated fallibly; `arg` sized C (the weight's classes,
/// or a cosine matrix's columns).
fn logits_buffer<T: Real>(arg: &'static str, b: usize, c: usize) -> Result<Vec<T>> {
    let n = b.checked_mul(c).ok_or_else(|| {
        Error::out_of_memory(arg, "the (B, C) logits", b as u128 * c as u128, None)
    })?;
    limits::filled(arg, n, T::zero(), "the (B, C) logits")
}

fn fixed_scale(margin: Margins, rows: usize) -> Result<f64> {
    let scale = margin.check(rows)?;
    if (0..rows).any(|i| margin.row(i).reads_norm()) {
        return Err(Error::invalid(
            "margin",
            "MagFace's margin follows the feature norm, which a cosine matrix does not carry; \
             use margin_loss or margin_logits",
        ));
    }
    match scale {
        Scale::Fixed(s) => Ok(s),
        Scale::FeatureNorm => Err(Error::invalid(
            "margin",
            "SphereFace(s=None) scales logits by the feature norm, which a cosine matrix does \
             not carry; give SphereFace a fixed s or use margin_logits",
        )),
    }
}

fn check_cos<T: Real>(cos: ArrayView2<T>) -> Result<()> {
    if cos.nrows() == 0 {
        return Err(Error::invalid("cos", "empty batch: need at least one row"));
    }
    let limit = 1.0 + COS_TOLERANCE;
    let bad = cos
        .axis_iter(Axis(0))
        .into_par_iter()
        .position_first(|row| row.iter().any(|v| v.is_nan() || v.f64().abs() > limit));
    match bad {
        Some(i) => Err(Error::invalid(
            "cos",
            format!("row {i} has a value that is NaN, inf or outside [-1, 1]"),
        )),
        None => Ok(()),
    }
}

/// `s * cos` with `s * psi(cos_iy)` on each row's target (and a hard-negative margin's
/// `s * h(cos)` on its non-targets): the margin on a cosine matrix computed by any GEMM.
pub fn apply_margin<'m, T: Real>(
    cos: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
) -> Result<Array2<T>> {
    let margin = margin.into();
    let out = logits_buffer("cos", cos.nrows(), cos.ncols())?;
    check_cos(cos)?;
    let s = fixed_scale(margin, cos.nrows())?;
    check_logit_range::<T>(margin, s, "s")?;
    let target = check_labels(labels, cos.nrows(), cos.ncols())?;
    let st = T::of(s);
    let mut out = Array2::from_shape_vec(cos.dim(), out).expect("logits shape");
    out.zip_mut_with(&cos, |o, &v| *o = st * v.max(-T::one()).min(T::one()));
    for (i, y) in target.iter().enumerate() {
        if let Some(y) = *y {
            let cy = cos[[i, y]].f64();
            if let Some(hard) = margin.row(i).hard_negatives(cy) {
                let rule = nontarget_rule::<f64>(None, Some(hard));
                for (o, &c) in out.row_mut(i).iter_mut().zip(cos.row(i)) {
                    *o = T::of(s * rule.apply(c.f64().clamp(-1.0, 1.0)).0);
                }
            }
            out[[i, y]] = T::of(s * margin.row(i).psi(cy));
        }
    }
    Ok(out)
}

/// Backward of [`apply_margin`]: dL/dcos from dL/dlogits.
pub fn apply_margin_backward<'m, T: Real>(
    grad_logits: ArrayView2<T>,
    cos: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
) -> Result<Array2<T>> {
    let margin = margin.into();
    let out = logits_buffer("cos", cos.nrows(), cos.ncols())?;
    check_cos(cos)?;
    let s = fixed_scale(margin, cos.nrows())?;
    check_logit_range::<T>(margin, s, "s")?;
    check_shape("grad_logits", grad_logits.dim(), cos.dim())?;
    check_finite(grad_logits, "grad_logits")?;
    let target = check_labels(labels, cos.nrows(), cos.ncols())?;
    let st = T::of(s);
    let mut out = Array2::from_shape_vec(cos.dim(), out).expect("gradient shape");
    out.zip_mut_with(&grad_logits, |o, &g| *o = g * st);
    for (i, y) in target.iter().enumerate() {
        if let Some(y) = *y {
            if let Some(hard) = margin.row(i).hard_negatives(cos[[i, y]].f64()) {
                let rule = nontarget_rule::<f64>(None, Some(hard));
                for (o, &c) in out.row_mut(i).iter_mut().zip(cos.row(i)) {
                    *o *= T::of(rule.apply(c.f64().clamp(-1.0, 1.0)).1);
                }
            }
            let d = s * margin.row(i).dpsi(cos[[i, y]].f64());
            out[[i, y]] = T::of(grad_logits[[i, y]].f64() * d);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::margin::Margin;

    fn problem(b: usize, d: usize, c: usize, seed: u64) -> (Array2<f64>, Array2<f64>, Vec<i64>) {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        let emb = Array2::from_shape_fn((b, d), |_| next());
        let weight = Array2::from_shape_fn((c, d), |_| next());
        let labels = (0..b)
            .map(|i| {
                if i % 7 == 3 {
                    -1
                } else {
                    ((next() + 1.0) * 0.5 * c as f64) as i64 % c as i64
                }
            })
            .collect();
        (emb, weight, labels)
    }

    /// Loss and gradients through the unfused path: logits, an explicit softmax, and
    /// margin_logits_backward.
    fn unfused(
        emb: &Array2<f64>,
        weight: &Array2<f64>,
        labels: &[i64],
        margin: &Margin,
    ) -> (f64, Array2<f64>, Array2<f64>) {
        unfused_with(emb, weight, labels, margin, HeadOptions::default())
    }

    /// The loss from the whole logits and its gradients through their backward.
    fn unfused_with(
        emb: &Array2<f64>,
        weight: &Array2<f64>,
        labels: &[i64],
        margin: &Margin,
        head: HeadOptions,
    ) -> (f64, Array2<f64>, Array2<f64>) {
        let z = margin_logits_with(emb.view(), weight.view(), labels, margin, head).unwrap();
        let n = labels.iter().filter(|&&y| y >= 0).count() as f64;
        let mut grad = Array2::zeros(z.dim());
        let mut loss = 0.0;
        for (i, &y) in labels.iter().enumerate() {
            if y < 0 {
                continue;
            }
            let row = z.row(i);
            let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            loss += (lse - row[y as usize]) / n;
            for j in 0..z.ncols() {
                grad[[i, j]] = (row[j] - lse).exp() / n;
            }
            grad[[i, y as usize]] -= 1.0 / n;
        }
        let (ge, gw) = margin_logits_backward_with(
            grad.view(),
            emb.view(),
            weight.view(),
            labels,
            margin,
            head,
        )
        .unwrap();
        (loss, ge, gw)
    }

    /// The heads whose tiles stash cosines: hard negatives, filtering, sub-centres, alone
    /// and together, with a fixed and a feature-norm scale.
    fn general_cases() -> Vec<(Margin, HeadOptions)> {
        let head = |k: usize, f: Option<f64>| HeadOptions {
            sub_centers: k,
            interclass_filter: f,
        };
        let arc = Margin::arcface(30.0, 0.5, false).unwrap();
        let curricular = Margin::curricularface(30.0, 0.5, 0.2).unwrap();
        let mv = Margin::mvsoftmax(20.0, 0.35, 1.12, false).unwrap();
        let mv_arc = Margin::mvsoftmax(20.0, 0.4, 1.2, true).unwrap();
        let sphere = Margin::sphereface(4, None, 1.0).unwrap();
        vec![
            (curricular, head(1, None)),
            (mv, head(1, None)),
            (mv_arc, head(1, None)),
            (arc, head(1, Some(0.1))),
            (arc, head(3, None)),
            (curricular, head(2, Some(0.2))),
            (sphere, head(2, None)),
        ]
    }

    #[test]
    fn general_heads_match_unfused_on_every_stash_layout() {
        for (margin, head) in general_cases() {
            let k = head.sub_centers;
            for (b, d, c, budget) in [
                (12, 16, 300, STASH_BUDGET_BYTES),
                (40, 8, 300, STASH_BUDGET_BYTES),
                (40, 8, 300, 1),
            ] {
                let (emb, weight, labels) = problem(b, d, c * k, (b * d + c) as u64);
                let labels: Vec<i64> = labels.iter().map(|&y| y.min(c as i64 - 1)).collect();
                let options = LossOptions {
                    head,
                    ..LossOptions::new(Reduction::Mean)
                };
                let out = fused_loss(
                    emb.view(),
                    weight.view(),
                    &labels,
                    (&margin).into(),
                    options,
                    budget,
                    None,
                )
                .unwrap();
                let (loss, ge, gw) = unfused_with(&emb, &weight, &labels, &margin, head);
                let what = format!("{margin:?} {head:?} {b}x{d} budget {budget}");
                assert!((out.loss - loss).abs() < 1e-10 * loss.abs(), "{what}");
                assert!(max_rel(&out.grad_emb.unwrap(), &ge) < 1e-10, "{what}");
                assert!(max_rel(&out.grad_weight.unwrap(), &gw) < 1e-10, "{what}");
            }
        }
    }

    #[test]
    fn general_heads_match_finite_differences() {
        for (margin, head) in general_cases() {
            let k = head.sub_centers;
            let (emb, weight, labels) = problem(6, 8, 13 * k, 91);
            let labels: Vec<i64> = labels.iter().map(|&y| y.min(12)).collect();
            let options = LossOptions {
                head,
                ..LossOptions::new(Reduction::Mean)
            };
            let loss = |e: &Array2<f64>, w: &Array2<f64>| {
                margin_loss_with(e.view(), w.view(), &labels, &margin, options)
                    .unwrap()
                    .loss
            };
            let out =
                margin_loss_with(emb.view(), weight.view(), &labels, &margin, options).unwrap();
            let (ge, gw) = (out.grad_emb.unwrap(), out.grad_weight.unwrap());
            let h = 1e-6;
            for i in 0..6 {
                for j in [0, 5] {
                    let (mut up, mut down) = (emb.clone(), emb.clone());
                    up[[i, j]] += h;
                    down[[i, j]] -= h;
                    let fd = (loss(&up, &weight) - loss(&down, &weight)) / (2.0 * h);
                    let what = format!("{margin:?} {head:?} emb[{i},{j}]");
                    assert!((fd - ge[[i, j]]).abs() < 1e-6 * (1.0 + fd.abs()), "{what}");
                }
            }
            for r in [0, 7, 13 * k - 1] {
                let (mut up, mut down) = (weight.clone(), weight.clone());
                up[[r, 3]] += h;
                down[[r, 3]] -= h;
                let fd = (loss(&emb, &up) - loss(&emb, &down)) / (2.0 * h);
                let what = format!("{margin:?} {head:?} weight[{r},3]");
                assert!((fd - gw[[r, 3]]).abs() < 1e-6 * (1.0 + fd.abs()), "{what}");
            }
        }
    }

    #[test]
    fn head_options_are_checked() {
        let (emb, weight, labels) = problem(4, 8, 10, 3);
        let margin = Margin::arcface(30.0, 0.5, false).unwrap();
        for (head, arg) in [
            ((3, None), "weight"),
            ((0, None), "sub_centers"),
            ((256, None), "sub_centers"),
            ((1, Some(f64::NAN)), "interclass_filter"),
            ((1, Some(1.5)), "interclass_filter"),
        ] {
            let options = LossOptions {
                head: HeadOptions {
                    sub_centers: head.0,
                    interclass_filter: head.1,
                },
                ..LossOptions::new(Reduction::Mean)
            };
            let err =
                margin_loss_with(emb.view(), weight.view(), &labels, &margin, options).unwrap_err();
            assert_eq!(err.arg, arg);
        }
    }

    /// Per-row margins: each row's loss and gradient row are those of a batch of that row
    /// alone with its own margin, and the weight gradient is their sum.
    #[test]
    fn per_row_margins_equal_one_call_per_row() {
        let (emb, weight, labels) = problem(6, 8, 13, 41);
        let per_row: Vec<Margin> = (0..6)
            .map(|i| Margin::arcface(30.0, 0.1 * i as f64, false).unwrap())
            .collect();
        let out =
            margin_loss(emb.view(), weight.view(), &labels, &per_row, Reduction::Sum).unwrap();
        let mut grad_weight = Array2::<f64>::zeros(weight.dim());
        for i in 0..6 {
            let one = margin_loss(
                emb.slice(s![i..i + 1, ..]),
                weight.view(),
                &labels[i..i + 1],
                &per_row[i],
                Reduction::Sum,
            )
            .unwrap();
            assert!((out.row_losses[i] - one.row_losses[0]).abs() < 1e-12);
            let (ge, ge1) = (out.grad_emb.as_ref().unwrap(), one.grad_emb.unwrap());
            let diff = (&ge.slice(s![i..i + 1, ..]) - &ge1).mapv(f64::abs);
            assert!(diff.iter().all(|&v| v < 1e-12), "row {i}: {diff}");
            grad_weight += &one.grad_weight.unwrap();
        }
        assert!(max_rel(out.grad_weight.as_ref().unwrap(), &grad_weight) < 1e-12);
        // per-row logits carry each row's own margin on the target
        let z = margin_logits(emb.view(), weight.view(), &labels, &per_row).unwrap();
        for (i, &y) in labels.iter().enumerate() {
            let zi = margin_logits(
                emb.slice(s![i..i + 1, ..]),
                weight.view(),
                &labels[i..i + 1],
                &per_row[i],
            )
            .unwrap();
            assert!(
                max_rel(&z.slice(s![i..i + 1, ..]).to_owned(), &zi) < 1e-12,
                "row {i} y {y}"
            );
        }
        let err = margin_loss(
            emb.view(),
            weight.view(),
            &labels,
            &per_row[..5],
            Reduction::Sum,
        )
        .unwrap_err();
        assert_eq!(err.arg, "margin");
    }

    fn max_rel(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    #[test]
    fn fused_matches_unfused_on_every_stash_layout() {
        let margins = [
            Margin::arcface(64.0, 0.5, false).unwrap(),
            Margin::sphereface(4, None, 1.0).unwrap(),
            Margin::combined(30.0, 1.2, 0.3, 0.1).unwrap(),
        ];
        // (B <= D: stash in the gradient), (B > D: own stash, one chunk), (B > D, many chunks)
        for (b, d, c, budget) in [
            (12, 16, 300, STASH_BUDGET_BYTES),
            (40, 8, 300, STASH_BUDGET_BYTES),
            (40, 8, 300, 1),
        ] {
            let (emb, weight, labels) = problem(b, d, c, (b * d + c) as u64);
            for margin in &margins {
                let out = fused_loss(
                    emb.view(),
                    weight.view(),
                    &labels,
                    margin.into(),
                    LossOptions::new(Reduction::Mean),
                    budget,
                    None,
                )
                .unwrap();
                let (out_emb, out_w) = (out.grad_emb.unwrap(), out.grad_weight.unwrap());
                let (loss, ge, gw) = unfused(&emb, &weight, &labels, margin);
                assert!(
                    (out.loss - loss).abs() < 1e-10 * loss.abs(),
                    "{margin:?} {b}x{d}"
                );
                assert!(
                    max_rel(&out_emb, &ge) < 1e-10,
                    "{margin:?} {b}x{d} budget {budget}"
                );
                assert!(
                    max_rel(&out_w, &gw) < 1e-10,
                    "{margin:?} {b}x{d} budget {budget}"
                );
            }
        }
    }

    /// The loss as a function of the embeddings, for central differences.
    fn loss_at(emb: &Array2<f64>, weight: &Array2<f64>, labels: &[i64], margin: &Margin) -> f64 {
        margin_loss(emb.view(), weight.view(), labels, margin, Reduction::Mean)
            .unwrap()
            .loss
    }

    /// MagFace's margin and regulariser follow the norm: the embeddings' gradient (with its
    /// radial part) against central differences of the fused loss, and the logits' backward
    /// against those of the logits.
    #[test]
    fn norm_dependent_margins_match_finite_differences() {
        let (emb, weight, labels) = problem(6, 8, 13, 77);
        let margins = [
            Margin::magface(30.0, (1.0, 5.0), (0.45, 0.8), false, 35.0).unwrap(),
            Margin::magface(30.0, (1.0, 5.0), (0.45, 0.8), true, 3.0).unwrap(),
            Margin::adaface(30.0, 0.4, -0.6).unwrap(),
            Margin::arcface(30.0, 0.5, false)
                .unwrap()
                .with_straight_through(false)
                .unwrap(),
        ];
        for margin in &margins {
            let out =
                margin_loss(emb.view(), weight.view(), &labels, margin, Reduction::Mean).unwrap();
            let ge = out.grad_emb.unwrap();
            let h = 1e-6;
            for i in 0..6 {
                for j in 0..8 {
                    let (mut up, mut down) = (emb.clone(), emb.clone());
                    up[[i, j]] += h;
                    down[[i, j]] -= h;
                    let fd = (loss_at(&up, &weight, &labels, margin)
                        - loss_at(&down, &weight, &labels, margin))
                        / (2.0 * h);
                    assert!(
                        (fd - ge[[i, j]]).abs() < 1e-6 * (1.0 + fd.abs()),
                        "{margin:?} [{i},{j}]: {fd} vs {}",
                        ge[[i, j]]
                    );
                }
            }
            // sum of the logits against their backward with an all-ones upstream
            let ones = Array2::<f64>::ones((6, 13));
            let (gl, _) =
                margin_logits_backward(ones.view(), emb.view(), weight.view(), &labels, margin)
                    .unwrap();
            let sum_at = |e: &Array2<f64>| {
                margin_logits(e.view(), weight.view(), &labels, margin)
                    .unwrap()
                    .sum()
            };
            for i in 0..6 {
                let (mut up, mut down) = (emb.clone(), emb.clone());
                up[[i, 0]] += h;
                down[[i, 0]] -= h;
                let fd = (sum_at(&up) - sum_at(&down)) / (2.0 * h);
                assert!(
                    (fd - gl[[i, 0]]).abs() < 1e-5 * (1.0 + fd.abs()),
                    "{margin:?} logits row {i}: {fd} vs {}",
                    gl[[i, 0]]
                );
            }
        }
        // the regulariser is in the loss of every valid row
        let mag = &margins[0];
        let plain = Margin::magface(30.0, (1.0, 5.0), (0.45, 0.8), false, 0.0).unwrap();
        let with = margin_loss(emb.view(), weight.view(), &labels, mag, Reduction::None).unwrap();
        let without =
            margin_loss(emb.view(), weight.view(), &labels, &plain, Reduction::None).unwrap();
        for (i, &y) in labels.iter().enumerate() {
            let a = emb.row(i).dot(&emb.row(i)).sqrt().clamp(1.0, 5.0);
            let g = if y < 0 {
                0.0
            } else {
                35.0 * (a / 25.0 + 1.0 / a)
            };
            assert!((with.row_losses[i] - without.row_losses[i] - g).abs() < 1e-10);
        }
        let cos = Array2::<f64>::zeros((6, 13));
        let err = apply_margin(cos.view(), &labels, mag).unwrap_err();
        assert_eq!(err.arg, "margin");
    }

    #[test]
    fn float32_fused_is_close_to_float64() {
        let (emb, weight, labels) = problem(64, 32, 1000, 7);
        let margin = Margin::arcface(64.0, 0.5, false).unwrap();
        let f64_out =
            margin_loss(emb.view(), weight.view(), &labels, &margin, Reduction::Mean).unwrap();
        let (e32, w32) = (emb.mapv(|v| v as f32), weight.mapv(|v| v as f32));
        let f32_out =
            margin_loss(e32.view(), w32.view(), &labels, &margin, Reduction::Mean).unwrap();
        assert!((f32_out.loss - f64_out.loss).abs() < 1e-5 * f64_out.loss);
        assert!(
            max_rel(
                &f32_out.grad_emb.unwrap().mapv(|v| v as f64),
                f64_out.grad_emb.as_ref().unwrap()
            ) < 1e-3
        );
        assert!(
            max_rel(
                &f32_out.grad_weight.unwrap().mapv(|v| v as f64),
                f64_out.grad_weight.as_ref().unwrap()
            ) < 1e-3
        );
    }

    #[test]
    fn skipped_gradients_and_upstream_weights() {
        let (emb, weight, labels) = problem(10, 12, 90, 3);
        let m = Margin::arcface(30.0, 0.4, false).unwrap();
        let full = margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::None).unwrap();
        let (ge, gw) = (full.grad_emb.unwrap(), full.grad_weight.unwrap());
        for (want_emb, want_weight) in [(true, false), (false, true), (false, false)] {
            let opts = LossOptions {
                grad_emb: want_emb,
                grad_weight: want_weight,
                ..LossOptions::new(Reduction::None)
            };
            let out = margin_loss_with(emb.view(), weight.view(), &labels, &m, opts).unwrap();
            assert_eq!(out.row_losses, full.row_losses);
            assert_eq!(out.grad_emb.is_some(), want_emb);
            assert_eq!(out.grad_weight.is_some(), want_weight);
            if let Some(g) = out.grad_emb {
                assert!(max_rel(&g, &ge) < 1e-12);
            }
            if let Some(g) = out.grad_weight {
                assert!(max_rel(&g, &gw) < 1e-12);
            }
        }
        // upstream factors: the gradient of sum_i u_i loss_i, by linearity from single rows
        let up: Vec<f64> = (0..10).map(|i| (i as f64 - 4.5) / 3.0).collect();
        let opts = LossOptions {
            upstream: Some(&up),
            ..LossOptions::new(Reduction::None)
        };
        let weighted = margin_loss_with(emb.view(), weight.view(), &labels, &m, opts).unwrap();
        let mut want = Array2::<f64>::zeros(weight.dim());
        for i in 0..10 {
            let mut only = vec![-1i64; 10];
            only[i] = labels[i];
            let one = margin_loss(emb.view(), weight.view(), &only, &m, Reduction::Sum).unwrap();
            want.scaled_add(up[i], &one.grad_weight.unwrap());
        }
        if want.iter().any(|v| *v != 0.0) {
            assert!(max_rel(&weighted.grad_weight.unwrap(), &want) < 1e-10);
        }
        let bad = LossOptions {
            upstream: Some(&up[..3]),
            ..LossOptions::new(Reduction::None)
        };
        let err = margin_loss_with(emb.view(), weight.view(), &labels, &m, bad).unwrap_err();
        assert_eq!(err.arg, "upstream");
    }

    #[test]
    fn errors_name_the_argument() {
        let (emb, mut weight, labels) = problem(4, 8, 50, 1);
        let m = Margin::cosface(64.0, 0.35).unwrap();
        weight.row_mut(30).fill(0.0);
        let err = margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::Mean).unwrap_err();
        assert_eq!(err.arg, "weight");
        assert!(err.message.contains("row 30"), "{err}");
        weight.row_mut(20)[3] = f64::NAN;
        let err = margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::Sum).unwrap_err();
        assert!(err.message.contains("row 20 contains NaN"), "{err}");
        let bad_labels = vec![0, 1, 50, 2];
        let err = margin_logits(emb.view(), weight.view(), &bad_labels, &m).unwrap_err();
        assert_eq!(err.arg, "labels");
    }

    #[test]
    fn rows_of_any_magnitude_give_the_loss_of_the_unit_rows() {
        let (emb, weight, labels) = problem(6, 8, 40, 4);
        let m = Margin::arcface(32.0, 0.5, false).unwrap();
        let want = margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::Mean).unwrap();
        for scale in [1e-310, 1e-200, 1e200, 1e300] {
            let (mut e, mut w) = (emb.clone(), weight.clone());
            e.row_mut(1).mapv_inplace(|v| v * scale);
            w.row_mut(labels[2] as usize).mapv_inplace(|v| v * scale);
            w.row_mut(7).mapv_inplace(|v| v * scale);
            let got = margin_loss(e.view(), w.view(), &labels, &m, Reduction::Mean).unwrap();
            assert!((got.loss - want.loss).abs() < 1e-9 * want.loss, "{scale}");
            // gradients scale by 1/scale on the scaled rows, exactly where representable
            let (ge, gw) = (got.grad_emb.unwrap(), got.grad_weight.unwrap());
            let (we, ww) = (
                want.grad_emb.as_ref().unwrap(),
                want.grad_weight.as_ref().unwrap(),
            );
            assert!(ge.iter().chain(gw.iter()).all(|v| v.is_finite()), "{scale}");
            if scale >= 1e-300 {
                let back = ge.row(1).mapv(|v| v * scale);
                assert!(
                    max_rel(
                        &back.insert_axis(Axis(0)),
                        &we.row(1).to_owned().insert_axis(Axis(0))
                    ) < 1e-9
                );
                let back = gw.row(7).mapv(|v| v * scale);
                assert!(
                    max_rel(
                        &back.insert_axis(Axis(0)),
                        &ww.row(7).to_owned().insert_axis(Axis(0))
                    ) < 1e-9
                );
            }
        }
    }

    #[test]
    fn denormal_float32_rows_are_finite() {
        let (emb, weight, labels) = problem(4, 8, 10, 5);
        let (mut e, mut w) = (emb.mapv(|v| v as f32), weight.mapv(|v| v as f32));
        e.row_mut(0).mapv_inplace(|v| v * 1e-39);
        w.row_mut(3).mapv_inplace(|v| v * 1e-41);
        let m = Margin::cosface(64.0, 0.35).unwrap();
        let got = margin_loss(e.view(), w.view(), &labels, &m, Reduction::Sum).unwrap();
        assert!(got.loss.is_finite());
        let (ge, gw) = (got.grad_emb.unwrap(), got.grad_weight.unwrap());
        assert!(ge.iter().chain(gw.iter()).all(|v| v.is_finite()));
    }

    #[test]
    fn a_scale_beyond_the_dtype_is_refused() {
        let (emb, weight, labels) = problem(3, 4, 5, 6);
        let (e, w) = (emb.mapv(|v| v as f32), weight.mapv(|v| v as f32));
        let m = Margin::arcface(1e39, 0.5, false).unwrap();
        let err = margin_loss(e.view(), w.view(), &labels, &m, Reduction::Mean).unwrap_err();
        assert_eq!(err.arg, "s");
        assert!(err.message.contains("float32"), "{err}");
        assert!(margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::Mean).is_ok());
    }

    /// Runs the shards of `weight` on threads that meet in `combine` (as processes would in
    /// an all-reduce), returning (loss, Σ grad_emb shares, stacked grad_weight).
    fn sharded(
        emb: &Array2<f64>,
        weight: &Array2<f64>,
        labels: &[i64],
        margin: &Margin,
        bounds: &[usize],
        budget: usize,
        broken_shard: Option<usize>,
    ) -> Vec<Result<LossOutput<f64>>> {
        use std::sync::{Barrier, Mutex};
        let world = bounds.len() - 1;
        let slots: Mutex<Vec<(Vec<RowPart>, bool)>> = Mutex::new(vec![(Vec::new(), false); world]);
        let barrier = Barrier::new(world);
        let widest = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    let (slots, barrier) = (&slots, &barrier);
                    scope.spawn(move || {
                        let (lo, hi) = (bounds[r], bounds[r + 1]);
                        let mut w = weight.slice(s![lo..hi, ..]).to_owned();
                        if broken_shard == Some(r) {
                            w.row_mut(0).fill(0.0);
                        }
                        let local: Vec<i64> = labels
                            .iter()
                            .map(|&y| match y {
                                -1 => -1,
                                y if (lo as i64..hi as i64).contains(&y) => y - lo as i64,
                                _ => REMOTE_TARGET,
                            })
                            .collect();
                        let mut combine = |parts: &mut [RowPart], failed: bool| -> Result<()> {
                            slots.lock().unwrap()[r] = (parts.to_vec(), failed);
                            barrier.wait();
                            let all = slots.lock().unwrap().clone();
                            barrier.wait();
                            if all.iter().any(|(_, f)| *f) {
                                return Err(Error::invalid("weight", "a shard failed"));
                            }
                            for (i, part) in parts.iter_mut().enumerate() {
                                let max =
                                    all.iter().map(|(p, _)| p[i].max).fold(f64::MIN, f64::max);
                                let scaled = |f: fn(&RowPart) -> f64| -> f64 {
                                    all.iter()
                                        .map(|(p, _)| f(&p[i]) * (p[i].max - max).exp())
                                        .sum()
                                };
                                *part = RowPart {
                                    max,
                                    sum: scaled(|p| p.sum),
                                    sum_ez: scaled(|p| p.sum_ez),
                                    target_logit: all.iter().map(|(p, _)| p[i].target_logit).sum(),
                                };
                            }
                            Ok(())
                        };
                        let mut options = ShardOptions {
                            stash_classes: widest,
                            first_shard: r == 0,
                            combine: &mut combine,
                            target_cos: None,
                        };
                        fused_loss(
                            emb.view(),
                            w.view(),
                            &local,
                            margin.into(),
                            LossOptions::new(Reduction::Mean),
                            budget,
                            Some(&mut options),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn shards_together_equal_the_whole_head() {
        let margins = [
            Margin::arcface(64.0, 0.5, false).unwrap(),
            Margin::sphereface(4, None, 1.0).unwrap(),
            Margin::cosface(30.0, 0.35).unwrap(),
            Margin::adaface(64.0, 0.4, 0.5).unwrap(),
            Margin::magface(64.0, (1.0, 5.0), (0.45, 0.8), false, 35.0).unwrap(),
        ];
        // stash in the gradient (B <= D), own stash, and many row chunks (uneven shards)
        for (b, d, c, budget, bounds) in [
            (12, 16, 301, STASH_BUDGET_BYTES, vec![0, 100, 301]),
            (40, 8, 300, STASH_BUDGET_BYTES, vec![0, 100, 200, 300]),
            (40, 8, 301, 1, vec![0, 7, 150, 301]),
        ] {
            let (emb, weight, labels) = problem(b, d, c, (b + c) as u64);
            for margin in &margins {
                let whole =
                    margin_loss(emb.view(), weight.view(), &labels, margin, Reduction::Mean)
                        .unwrap();
                let parts = sharded(&emb, &weight, &labels, margin, &bounds, budget, None);
                let mut grad_emb = Array2::<f64>::zeros(emb.dim());
                for (r, part) in parts.into_iter().enumerate() {
                    let part = part.unwrap();
                    assert!((part.loss - whole.loss).abs() < 1e-12 * whole.loss.abs());
                    grad_emb += part.grad_emb.as_ref().unwrap();
                    let want = whole
                        .grad_weight
                        .as_ref()
                        .unwrap()
                        .slice(s![bounds[r]..bounds[r + 1], ..])
                        .to_owned();
                    assert!(
                        max_rel(part.grad_weight.as_ref().unwrap(), &want) < 1e-10,
                        "{margin:?}"
                    );
                }
                assert!(
                    max_rel(&grad_emb, whole.grad_emb.as_ref().unwrap()) < 1e-10,
                    "{margin:?} {b}x{d}"
                );
            }
        }
    }

    #[test]
    fn a_failing_shard_stops_every_shard() {
        let (emb, weight, labels) = problem(6, 8, 60, 3);
        let m = Margin::arcface(64.0, 0.5, false).unwrap();
        let out = sharded(
            &emb,
            &weight,
            &labels,
            &m,
            &[0, 30, 60],
            STASH_BUDGET_BYTES,
            Some(1),
        );
        assert_eq!(out[0].as_ref().unwrap_err().message, "a shard failed");
        assert!(out[1]
            .as_ref()
            .unwrap_err()
            .message
            .contains("row 0 is all zeros"));
    }
}
