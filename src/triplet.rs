//! Triplet loss (Schroff et al., FaceNet 2015) with batch mining, fused: the pairwise
//! matrix by one GEMM, the mining, the hinge and its exact gradient by a second GEMM,
//! with O(B²) memory (never a B×B×B tensor).
//!
//! Definitions follow pytorch-metric-learning's `TripletMarginLoss`, so that results can
//! be compared with it: rows are L2-normalised; `Cosine` scores pairs by similarity
//! s = x̂ᵢ·x̂ⱼ (larger is closer) and a triplet (a, p, n) violates the margin by
//! `s(a,n) − s(a,p) + margin`; `Euclidean` uses d = ‖x̂ᵢ − x̂ⱼ‖ and `d(a,p) − d(a,n) +
//! margin`. The loss of a triplet is the violation's positive part. Mining:
//! - `BatchHard`: per anchor, its hardest positive (farthest) and hardest negative
//!   (closest): one triplet per anchor that has both (ties: the lower index);
//! - `SemiHard`: every triplet whose negative is farther than the positive but within the
//!   margin (0 < (an − ap) ≤ margin in distance; 0 < (s_ap − s_an) ≤ margin in similarity);
//! - `All`: every triplet.
//!
//! A positive is another row with the anchor's label, a negative a row with another label;
//! rows labelled -1 take no part. An anchor without a positive or without a negative forms
//! no triplet; a batch without any triplet has loss 0 and zero gradient.

use crate::error::{unnormalisable, Error, Result};
use crate::kernels;
use crate::limits;
use crate::real::Real;
use ndarray::parallel::prelude::*;
use ndarray::{Array2, ArrayView2, Axis};

/// How triplets are chosen from a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mining {
    BatchHard,
    SemiHard,
    All,
}

/// How pairs are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairMeasure {
    /// Cosine similarity of the unit rows.
    Cosine,
    /// Euclidean distance of the unit rows.
    Euclidean,
}

/// How the triplets' losses are reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TripletReduction {
    /// Over every mined triplet (pytorch-metric-learning's `MeanReducer`).
    Mean,
    /// Over the triplets with a positive loss (its default `AvgNonZeroReducer`); 0 if none.
    MeanNonzero,
    Sum,
    /// Per anchor: the sum of its triplets' losses (the gradient is that of their sum, or
    /// of their weighted sum with `upstream`).
    PerAnchor,
}

/// What [`triplet_loss`] returns.
#[derive(Clone, Debug)]
pub struct TripletOutput<T> {
    /// The reduced loss (for `PerAnchor`, their sum, or their `upstream`-weighted sum).
    pub loss: f64,
    /// Each anchor's summed triplet losses.
    pub per_anchor: Vec<f64>,
    /// dloss/demb.
    pub grad_emb: Array2<T>,
    /// Triplets mined, and those with a positive loss.
    pub triplets: u64,
    pub active: u64,
}

/// The triplet loss of `emb` (B, D) with `labels` (B,) and its gradient; see the module
/// documentation. `upstream` (with `PerAnchor` only): one weight per anchor, the gradient
/// is then that of Σₐ upstream[a]·loss[a].
pub fn triplet_loss<T: Real>(
    emb: ArrayView2<T>,
    labels: &[i64],
    margin: f64,
    mining: Mining,
    measure: PairMeasure,
    reduction: TripletReduction,
    upstream: Option<&[f64]>,
) -> Result<TripletOutput<T>> {
    let (b, d) = emb.dim();
    if b == 0 || d == 0 {
        return Err(Error::invalid(
            "emb",
            format!("must be (B >= 1, D >= 1), got ({b}, {d})"),
        ));
    }
    if labels.len() != b {
        return Err(Error::invalid(
            "labels",
            format!("has {} entries but emb has {b} rows", labels.len()),
        ));
    }
    if let Some(&y) = labels.iter().find(|&&y| y < -1) {
        return Err(Error::invalid(
            "labels",
            format!("must be >= 0, or -1 for a row that takes no part; found {y}"),
        ));
    }
    if !(margin.is_finite() && margin >= 0.0) {
        return Err(Error::invalid(
            "margin",
            format!("must be a finite number >= 0, got {margin}"),
        ));
    }
    match (reduction, upstream) {
        (TripletReduction::PerAnchor, Some(u)) if u.len() != b => {
            return Err(Error::invalid(
                "upstream",
                format!("has {} entries for {b} anchors", u.len()),
            ))
        }
        (TripletReduction::PerAnchor, _) | (_, None) => {}
        _ => {
            return Err(Error::invalid(
                "upstream",
                "per-anchor weights go with reduction='none' only",
            ))
        }
    }
    let size = std::mem::size_of::<T>() as u128;
    // the pairwise matrix, its gradient (f64) and the unit rows with their gradient
    limits::check_memory(
        "emb",
        (b as u128 * b as u128) * (size + 8) + 2 * (b as u128 * d as u128) * size,
        "the pairwise matrices",
    )?;

    // unit rows (norms taken safely, as the heads do)
    let emb = emb.as_standard_layout();
    let norms: Vec<f64> = (0..b)
        .into_par_iter()
        .map(|i| kernels::norm(emb.row(i).to_slice().expect("standard layout")))
        .collect();
    if let Some(e) = norms
        .iter()
        .enumerate()
        .find_map(|(i, &n)| unnormalisable("emb", i, n))
    {
        return Err(e);
    }
    let mut xhat = Array2::<T>::zeros((b, d));
    xhat.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(i, mut row)| {
            kernels::unit_into(
                emb.row(i).to_slice().expect("standard layout"),
                norms[i],
                row.as_slice_mut().expect("standard layout"),
            )
        });
    // squared norms of the unit rows as computed (1 up to rounding): the Euclidean distance
    // is sqrt(rᵢ + rⱼ − 2 sᵢⱼ), as torch.cdist computes it for batches (cosine reads none)
    let r: Vec<f64> = match measure {
        PairMeasure::Euclidean => xhat
            .axis_iter(Axis(0))
            .into_par_iter()
            .map(|row| kernels::sum_squares(row.to_slice().expect("standard layout")))
            .collect(),
        PairMeasure::Cosine => Vec::new(),
    };
    let sims = gram(&xhat);
    let pair = |i: usize, j: usize| -> f64 {
        let s = sims[[i, j]].f64();
        match measure {
            PairMeasure::Cosine => s,
            PairMeasure::Euclidean => (r[i] + r[j] - 2.0 * s).max(0.0).sqrt(),
        }
    };
    // a triplet's loss before the hinge, from its two pair values (larger = worse)
    let violation = |ap: f64, an: f64| -> f64 {
        match measure {
            PairMeasure::Cosine => an - ap + margin,
            PairMeasure::Euclidean => ap - an + margin,
        }
    };
    // Per anchor (in parallel, each writing only its own row of the pair gradient): its
    // triplets, their losses, and dloss/d(pair value) up to the reduction's weight.
    struct Anchor {
        loss: f64,
        triplets: u64,
        active: u64,
        /// (column, d(sum of this anchor's hinges)/d pair(a, column), pair(a, column)):
        /// the pair value is kept so that the pairwise matrix can be freed before the
        /// gradient's B×D buffer exists
        grads: Vec<(usize, f64, f64)>,
    }
    let add_triplet = |out: &mut Anchor, p: usize, n: usize, ap: f64, an: f64| {
        let v = violation(ap, an);
        out.triplets += 1;
        if v > 0.0 {
            out.loss += v;
            out.active += 1;
            // d v / d pair(a, p) and d pair(a, n)
            let (dp, dn) = match measure {
                PairMeasure::Cosine => (-1.0, 1.0),
                PairMeasure::Euclidean => (1.0, -1.0),
            };
            out.grads.push((p, dp, ap));
            out.grads.push((n, dn, an));
        }
    };
    let anchors: Vec<Anchor> = (0..b)
        .into_par_iter()
        .map(|a| {
            let mut out = Anchor {
                loss: 0.0,
                triplets: 0,
                active: 0,
                grads: Vec::new(),
            };
            let ya = labels[a];
            if ya == -1 {
                return out;
            }
            if mining == Mining::BatchHard {
                // the anchor's row of pair values, then its hardest positive and negative:
                // the extreme values first (loops without branches, which vectorise), then
                // the first row holding each (ties go to the lower index)
                let srow = sims.row(a).to_slice().expect("standard layout");
                let value = |j: usize| -> f64 {
                    let v = srow[j].f64();
                    match measure {
                        PairMeasure::Cosine => v,
                        PairMeasure::Euclidean => (r[a] + r[j] - 2.0 * v).max(0.0).sqrt(),
                    }
                };
                let is_pos = |j: usize| j != a && labels[j] == ya;
                let is_neg = |j: usize| labels[j] != ya && labels[j] != -1;
                // The hardest positive and negative: the extreme values first, then the
                // first row holding each (ties go to the lower index).
                let (hardest_pos, hardest_neg) = match measure {
                    // on the similarities themselves, in T (the least similar positive,
                    // the most similar negative)
                    PairMeasure::Cosine => {
                        let (p, n) = kernels::hardest_similarities(srow, labels, a);
                        // the value compared first: the label test runs on matches only
                        let find = |want: T, is: &dyn Fn(usize) -> bool| {
                            (0..b).find(|&j| srow[j] == want && is(j))
                        };
                        let p = (p < T::infinity()).then(|| find(p, &is_pos)).flatten();
                        let n = (n > T::neg_infinity()).then(|| find(n, &is_neg)).flatten();
                        (p, n)
                    }
                    // on the distances as computed (rounding in rᵢ + rⱼ can reorder rows
                    // whose similarities tie): the farthest positive, the nearest negative
                    PairMeasure::Euclidean => {
                        let vals: Vec<f64> = (0..b).map(value).collect();
                        let (mut far_p, mut near_n) = (f64::NEG_INFINITY, f64::INFINITY);
                        for (j, &v) in vals.iter().enumerate() {
                            far_p = if is_pos(j) && v > far_p { v } else { far_p };
                            near_n = if is_neg(j) && v < near_n { v } else { near_n };
                        }
                        let p = (0..b).find(|&j| is_pos(j) && vals[j] == far_p);
                        let n = (0..b).find(|&j| is_neg(j) && vals[j] == near_n);
                        (p, n)
                    }
                };
                let p = hardest_pos.map(|j| (j, value(j)));
                let n = hardest_neg.map(|j| (j, value(j)));
                if let (Some((p, ap)), Some((n, an))) = (p, n) {
                    add_triplet(&mut out, p, n, ap, an);
                }
                return out;
            }
            let positives: Vec<usize> = (0..b).filter(|&j| j != a && labels[j] == ya).collect();
            let negatives: Vec<usize> = (0..b)
                .filter(|&j| labels[j] != ya && labels[j] != -1)
                .collect();
            if positives.is_empty() || negatives.is_empty() {
                return out;
            }
            let mut add =
                |p: usize, n: usize, ap: f64, an: f64| add_triplet(&mut out, p, n, ap, an);
            match mining {
                Mining::BatchHard => unreachable!("mined above"),
                Mining::All | Mining::SemiHard => {
                    let neg: Vec<f64> = negatives.iter().map(|&n| pair(a, n)).collect();
                    for &p in &positives {
                        let ap = pair(a, p);
                        for (&n, &an) in negatives.iter().zip(&neg) {
                            if mining == Mining::SemiHard {
                                // how much farther the negative is than the positive
                                let gap = match measure {
                                    PairMeasure::Cosine => ap - an,
                                    PairMeasure::Euclidean => an - ap,
                                };
                                if !(gap > 0.0 && gap <= margin) {
                                    continue;
                                }
                            }
                            add(p, n, ap, an);
                        }
                    }
                }
            }
            // one entry per pair: summed over the anchor's triplets (at most B per anchor)
            if out.grads.len() > 2 * b {
                let mut row = vec![0.0f64; b];
                for &(j, g, _) in &out.grads {
                    row[j] += g;
                }
                out.grads = row
                    .into_iter()
                    .enumerate()
                    .filter(|&(_, g)| g != 0.0)
                    .map(|(j, g)| (j, g, pair(a, j)))
                    .collect();
            }
            out
        })
        .collect();

    let triplets: u64 = anchors.iter().map(|a| a.triplets).sum();
    let active: u64 = anchors.iter().map(|a| a.active).sum();
    let total: f64 = anchors.iter().map(|a| a.loss).sum();
    let per_anchor: Vec<f64> = anchors.iter().map(|a| a.loss).collect();
    // the reduction's weight of each anchor's hinges
    let weight = |a: usize| -> f64 {
        match reduction {
            TripletReduction::Mean if triplets > 0 => 1.0 / triplets as f64,
            TripletReduction::MeanNonzero if active > 0 => 1.0 / active as f64,
            TripletReduction::Sum => 1.0,
            TripletReduction::PerAnchor => upstream.map_or(1.0, |u| u[a]),
            _ => 0.0,
        }
    };
    let loss = match reduction {
        TripletReduction::Mean if triplets > 0 => total / triplets as f64,
        TripletReduction::MeanNonzero if active > 0 => total / active as f64,
        TripletReduction::Sum => total,
        TripletReduction::PerAnchor => (0..b).map(|a| weight(a) * per_anchor[a]).sum(),
        _ => 0.0,
    };

    // the pairwise matrix is not read again: freed before the gradient's buffer exists
    drop(sims);

    // dloss/d pair value, then through the pair measure to the unit rows:
    // cosine: s_ij = x̂ᵢ·x̂ⱼ, so dX̂ = (G + Gᵀ) X̂;
    // Euclidean: d_ij = ‖x̂ᵢ − x̂ⱼ‖, so with H_ij = G_ij / d_ij (0 where d_ij = 0) and
    // K = H + Hᵀ, dx̂ᵢ = (Σⱼ K_ij) x̂ᵢ − Σⱼ K_ij x̂ⱼ.
    // Each anchor's entries of K, weighted by the reduction, as (column, value).
    let k_entries = |a: usize| {
        let w = weight(a);
        anchors[a].grads.iter().filter_map(move |&(j, g, value)| {
            let g = match measure {
                PairMeasure::Cosine => g * w,
                PairMeasure::Euclidean if value > 0.0 => g * w / value,
                PairMeasure::Euclidean => 0.0,
            };
            (w != 0.0).then_some((j, g))
        })
    };
    let entry_count: usize = anchors.iter().map(|a| 2 * a.grads.len()).sum();
    let mut row_sums = vec![0.0f64; b];
    for a in 0..b {
        for (j, g) in k_entries(a) {
            row_sums[a] += g;
            row_sums[j] += g;
        }
    }
    let mut dxhat = Array2::<T>::zeros((b, d));
    if entry_count * 16 <= b * b {
        // few entries (batch-hard: at most four per anchor): both halves of K as
        // (row, column, value), sorted by row, applied one axpy each instead of a B×B GEMM
        let mut entries: Vec<(usize, usize, f64)> = Vec::with_capacity(entry_count);
        for a in 0..b {
            for (j, g) in k_entries(a) {
                entries.push((a, j, g));
                entries.push((j, a, g));
            }
        }
        entries.sort_unstable_by_key(|&(i, j, _)| (i, j));
        let starts: Vec<usize> = (0..=b)
            .map(|i| entries.partition_point(|&(r, _, _)| r < i))
            .collect();
        dxhat
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(i, mut out)| {
                let out = out.as_slice_mut().expect("standard layout");
                for &(_, j, g) in &entries[starts[i]..starts[i + 1]] {
                    let g = T::of(g);
                    let x = xhat.row(j).to_slice().expect("standard layout");
                    for (o, &x) in out.iter_mut().zip(x) {
                        *o += g * x;
                    }
                }
            });
    } else {
        // many entries: K filled directly (no list of entries beside it), then one GEMM
        let mut k = Array2::<T>::zeros((b, b));
        for a in 0..b {
            for (j, g) in k_entries(a) {
                k[[a, j]] += T::of(g);
                k[[j, a]] += T::of(g);
            }
        }
        par_gemm(&k, &xhat.view(), &mut dxhat);
    }
    if measure == PairMeasure::Euclidean {
        // dx̂ᵢ = (Σⱼ K_ij) x̂ᵢ − (K X̂)ᵢ
        dxhat
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(xhat.axis_iter(Axis(0)))
            .zip(&row_sums)
            .for_each(|((mut g, xrow), &total)| {
                let g = g.as_slice_mut().expect("standard layout");
                let xrow = xrow.to_slice().expect("standard layout");
                let total = T::of(total);
                for (gv, &xv) in g.iter_mut().zip(xrow) {
                    *gv = total * xv - *gv;
                }
            });
    }
    // through the normalisation: dx = (dx̂ − x̂ (x̂·dx̂)) / ‖x‖
    dxhat
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(i, mut g)| {
            let g = g.as_slice_mut().expect("standard layout");
            let xh = xhat.row(i).to_slice().expect("standard layout");
            let dot: f64 = xh
                .iter()
                .zip(g.iter())
                .map(|(&x, &v)| x.f64() * v.f64())
                .sum();
            let inv = 1.0 / norms[i].max(T::GRAD_NORM_MIN);
            if inv <= T::SAFE_SCALE && dot.abs() <= T::SAFE_SCALE {
                let (dot, inv) = (T::of(dot), T::of(inv));
                for (gv, &xv) in g.iter_mut().zip(xh) {
                    *gv = (*gv - xv * dot) * inv;
                }
            } else {
                // a tiny row: its gradient is large, computed in f64 and kept finite
                for (gv, &xv) in g.iter_mut().zip(xh) {
                    let v = (gv.f64() - xv.f64() * dot) * inv;
                    *gv = T::of(v.clamp(-T::MAX, T::MAX));
                }
            }
        });
    Ok(TripletOutput {
        loss,
        per_anchor,
        grad_emb: dxhat,
        triplets,
        active,
    })
}

/// `X Xᵀ`, symmetric: each block of rows is multiplied only up to the diagonal (in
/// parallel; 10 of 16 block products for four blocks), then the upper triangle is copied
/// from the lower.
fn gram<T: Real>(x: &Array2<T>) -> Array2<T> {
    let b = x.nrows();
    let bs = b.div_ceil(2 * rayon::current_num_threads()).clamp(64, 256);
    let mut g = Array2::<T>::zeros((b, b));
    g.axis_chunks_iter_mut(Axis(0), bs)
        .into_par_iter()
        .enumerate()
        .for_each(|(i, mut rows)| {
            let (lo, hi) = (i * bs, i * bs + rows.nrows());
            let xi = x.slice(ndarray::s![lo..hi, ..]);
            let mut out = rows.slice_mut(ndarray::s![.., ..hi]);
            let xt = x.slice(ndarray::s![..hi, ..]).reversed_axes();
            T::gemm(T::one(), &xi, &xt, T::zero(), &mut out);
        });
    // the upper triangle from the lower, in 32×32 blocks (a block's rows and columns stay
    // in L1, where a whole column of the lower triangle would not)
    let data = g.as_slice_mut().expect("standard layout");
    const BLOCK: usize = 32;
    for bi in (0..b).step_by(BLOCK) {
        for bj in (bi..b).step_by(BLOCK) {
            for i in bi..(bi + BLOCK).min(b) {
                for j in (i + 1).max(bj)..(bj + BLOCK).min(b) {
                    data[i * b + j] = data[j * b + i];
                }
            }
        }
    }
    g
}

/// `out = a·b`, its rows split over the pool's threads (each GEMM call is single-threaded
/// and packs `b` again, so one block of rows per thread).
fn par_gemm<T: Real>(a: &Array2<T>, b: &ArrayView2<T>, out: &mut Array2<T>) {
    let rows = a.nrows().div_ceil(rayon::current_num_threads()).max(16);
    out.axis_chunks_iter_mut(Axis(0), rows)
        .into_par_iter()
        .zip(a.axis_chunks_iter(Axis(0), rows))
        .for_each(|(mut out, a)| T::gemm(T::one(), &a, b, T::zero(), &mut out));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(b: usize, d: usize, classes: i64) -> (Array2<f64>, Vec<i64>) {
        let mut state = 12345u64;
        let emb = Array2::from_shape_fn((b, d), |_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        });
        let labels = (0..b as i64).map(|i| i % classes).collect();
        (emb, labels)
    }

    /// The loss from the definition, by brute force over every triplet.
    fn brute(
        emb: &Array2<f64>,
        labels: &[i64],
        margin: f64,
        mining: Mining,
        measure: PairMeasure,
        reduction: TripletReduction,
    ) -> f64 {
        let b = emb.nrows();
        let unit: Vec<Vec<f64>> = emb
            .axis_iter(Axis(0))
            .map(|r| {
                let n = r.dot(&r).sqrt();
                r.iter().map(|v| v / n).collect()
            })
            .collect();
        let pair = |i: usize, j: usize| {
            let s: f64 = unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum();
            match measure {
                PairMeasure::Cosine => s,
                PairMeasure::Euclidean => unit[i]
                    .iter()
                    .zip(&unit[j])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    .sqrt(),
            }
        };
        let worse = |x: f64, y: f64| match measure {
            PairMeasure::Cosine => x < y,
            PairMeasure::Euclidean => x > y,
        };
        let mut losses = Vec::new();
        for a in 0..b {
            let pos: Vec<usize> = (0..b)
                .filter(|&j| j != a && labels[j] == labels[a])
                .collect();
            let neg: Vec<usize> = (0..b).filter(|&j| labels[j] != labels[a]).collect();
            if pos.is_empty() || neg.is_empty() {
                continue;
            }
            let mut triplets = Vec::new();
            if mining == Mining::BatchHard {
                // the member of `set` that beats every other by `beats(challenger, best)`
                let pick = |set: &[usize], beats: &dyn Fn(usize, usize) -> bool| {
                    let keep = |best: usize, j: usize| if beats(j, best) { j } else { best };
                    set.iter().copied().reduce(keep).unwrap()
                };
                let p = pick(&pos, &|j, p| worse(pair(a, j), pair(a, p)));
                let n = pick(&neg, &|j, n| worse(pair(a, n), pair(a, j)));
                triplets.push((p, n));
            } else {
                for &p in &pos {
                    for &n in &neg {
                        triplets.push((p, n));
                    }
                }
            }
            for (p, n) in triplets {
                let (ap, an) = (pair(a, p), pair(a, n));
                let gap = match measure {
                    PairMeasure::Cosine => ap - an,
                    PairMeasure::Euclidean => an - ap,
                };
                if mining == Mining::SemiHard && !(gap > 0.0 && gap <= margin) {
                    continue;
                }
                losses.push((margin - gap).max(0.0));
            }
        }
        let total: f64 = losses.iter().sum();
        let nonzero = losses.iter().filter(|&&l| l > 0.0).count();
        match reduction {
            TripletReduction::Mean => total / losses.len().max(1) as f64,
            TripletReduction::MeanNonzero => total / nonzero.max(1) as f64,
            _ => total,
        }
    }

    #[test]
    fn loss_equals_brute_force_and_gradient_equals_finite_differences() {
        let (emb, labels) = batch(14, 6, 4);
        for mining in [Mining::BatchHard, Mining::SemiHard, Mining::All] {
            for measure in [PairMeasure::Cosine, PairMeasure::Euclidean] {
                for reduction in [
                    TripletReduction::Mean,
                    TripletReduction::MeanNonzero,
                    TripletReduction::Sum,
                ] {
                    let margin = 0.3;
                    let out = triplet_loss(
                        emb.view(),
                        &labels,
                        margin,
                        mining,
                        measure,
                        reduction,
                        None,
                    )
                    .unwrap();
                    let want = brute(&emb, &labels, margin, mining, measure, reduction);
                    assert!(
                        (out.loss - want).abs() < 1e-12,
                        "{mining:?} {measure:?} {reduction:?}"
                    );
                    // central differences (the mined set is stable under a small step)
                    let h = 1e-6;
                    for (i, j) in [(0, 0), (3, 2), (13, 5), (7, 1)] {
                        let mut plus = emb.clone();
                        plus[[i, j]] += h;
                        let mut minus = emb.clone();
                        minus[[i, j]] -= h;
                        let f = |e: &Array2<f64>| {
                            triplet_loss(
                                e.view(),
                                &labels,
                                margin,
                                mining,
                                measure,
                                reduction,
                                None,
                            )
                            .unwrap()
                            .loss
                        };
                        let fd = (f(&plus) - f(&minus)) / (2.0 * h);
                        let g = out.grad_emb[[i, j]];
                        assert!(
                            (fd - g).abs() < 1e-6 * (1.0 + g.abs()),
                            "{mining:?} {measure:?} {reduction:?} ({i},{j}): {g} vs {fd}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn batches_without_triplets_give_zero_and_bad_input_is_refused() {
        let (emb, _) = batch(6, 4, 3);
        for labels in [vec![1; 6], (0..6).collect::<Vec<i64>>()] {
            let out = triplet_loss(
                emb.view(),
                &labels,
                0.2,
                Mining::All,
                PairMeasure::Cosine,
                TripletReduction::Mean,
                None,
            )
            .unwrap();
            assert_eq!((out.loss, out.triplets), (0.0, 0));
            assert!(out.grad_emb.iter().all(|&g| g == 0.0));
        }
        let run = |emb: &Array2<f64>, labels: &[i64], margin: f64| {
            triplet_loss(
                emb.view(),
                labels,
                margin,
                Mining::BatchHard,
                PairMeasure::Cosine,
                TripletReduction::Mean,
                None,
            )
        };
        let labels = [0, 0, 1, 1, 2, 2];
        assert_eq!(run(&emb, &labels, -0.1).unwrap_err().arg, "margin");
        assert_eq!(run(&emb, &labels[..5], 0.1).unwrap_err().arg, "labels");
        let mut bad = emb.clone();
        bad[[2, 1]] = f64::NAN;
        assert_eq!(run(&bad, &labels, 0.1).unwrap_err().arg, "emb");
    }
}
