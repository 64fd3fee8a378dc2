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
//!
//! The parts, one file each: this module has the options and the entry points of the loss;
//! `checks` refuses bad shapes, labels, values and scales; `prepare` turns (emb, weight,
//! labels, margin) into what both passes read (normalised rows, centres, target logits);
//! `tiles` runs the two passes over class tiles and row chunks; `shard` has a sharded
//! head's row statistics and entry point; `logits` the (B, C) logits, their backward and
//! `apply_margin`; `tests` checks them against a plain float64 reference.

use crate::error::{unnormalisable, Error, Result};
use crate::gemm::{Packed, Side};
use crate::kernels::{self, NonTarget};
use crate::limits;
use crate::margin::{HardRule, Margins, RowContext, Scale};
use crate::pool::fold_in_groups;
use crate::real::Real;
use ndarray::parallel::prelude::*;
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;
use std::ops::Range;

// The parts the module doc names, each in its own file; every part sees the others through
// this module (`use super::*`).
mod checks;
mod logits;
mod prepare;
mod shard;
#[cfg(test)]
mod tests;
mod tiles;

pub use checks::REMOTE_TARGET;
use checks::*;
pub use logits::{
    apply_margin, apply_margin_backward, margin_logits, margin_logits_backward,
    margin_logits_backward_with, margin_logits_with,
};
use prepare::*;
pub use shard::{margin_loss_shard, RowPart, ShardOptions};
use tiles::*;

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
