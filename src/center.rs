//! Center loss (Wen et al., ECCV 2016): pulls each embedding towards its class centre.
//!
//! `L = lambda_c / 2 · mean_i ‖x_i − c_{y_i}‖²` over the rows whose label is not −1;
//! `dL/dx_i = lambda_c (x_i − c_{y_i}) / n`. The centres are not learned by gradient: the
//! paper moves each class seen in the batch by `Δc_j = −alpha Σ_{i: y_i = j} (c_j − x_i) /
//! (1 + n_j)`, computed from the centres as they were for the loss.

use crate::error::{Error, Result};
use crate::real::Real;
use ndarray::{Array2, ArrayView2};
use std::collections::BTreeMap;

/// Result of [`center_loss`].
#[derive(Debug)]
pub struct CenterLossOutput<T> {
    pub loss: f64,
    pub grad_emb: Array2<T>,
    /// The classes seen in the batch, ascending, and the row to add to each one's centre.
    pub classes: Vec<i64>,
    pub delta: Array2<T>,
}

/// Center loss, its embedding gradient and the centre update (see the module docs).
pub fn center_loss<T: Real>(
    emb: ArrayView2<T>,
    centers: ArrayView2<T>,
    labels: &[i64],
    lambda_c: f64,
    alpha: f64,
) -> Result<CenterLossOutput<T>> {
    let (b, d) = emb.dim();
    let (c, dc) = centers.dim();
    if b == 0 || d == 0 {
        return Err(Error::invalid(
            "emb",
            format!("must be (B >= 1, D >= 1), got ({b}, {d})"),
        ));
    }
    if dc != d {
        return Err(Error::invalid(
            "centers",
            format!("has {dc} columns but emb has {d}"),
        ));
    }
    if labels.len() != b {
        return Err(Error::invalid(
            "labels",
            format!("has {} entries for {b} rows", labels.len()),
        ));
    }
    if let Some(&y) = labels.iter().find(|&&y| y < -1 || y >= c as i64) {
        return Err(Error::invalid(
            "labels",
            format!("must be -1 (ignored) or a class in [0, {c}), found {y}"),
        ));
    }
    for (arg, v) in [("lambda_c", lambda_c), ("alpha", alpha)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::invalid(
                arg,
                format!("must be a finite number >= 0, got {v}"),
            ));
        }
    }
    let n = labels.iter().filter(|&&y| y >= 0).count();
    let mut grad_emb = Array2::<T>::zeros((b, d));
    let mut per_class: BTreeMap<i64, (Vec<f64>, usize)> = BTreeMap::new();
    let mut total = 0.0f64;
    for (i, &y) in labels.iter().enumerate() {
        if y < 0 {
            continue;
        }
        let centre = centers.row(y as usize);
        let (sum, count) = per_class.entry(y).or_insert_with(|| (vec![0.0; d], 0));
        *count += 1;
        for (j, (&x, &cv)) in emb.row(i).iter().zip(centre).enumerate() {
            let diff = x.f64() - cv.f64();
            if !diff.is_finite() {
                return Err(Error::invalid(
                    "emb",
                    format!("row {i} (or its centre) contains NaN or inf"),
                ));
            }
            total += diff * diff;
            grad_emb[[i, j]] = T::of(lambda_c * diff / n as f64);
            sum[j] += cv.f64() - x.f64();
        }
    }
    let loss = if n == 0 {
        0.0
    } else {
        lambda_c / 2.0 * total / n as f64
    };
    let classes: Vec<i64> = per_class.keys().copied().collect();
    let mut delta = Array2::<T>::zeros((classes.len(), d));
    for (row, (sum, count)) in per_class.values().enumerate() {
        for (j, s) in sum.iter().enumerate() {
            delta[[row, j]] = T::of(-alpha * s / (1.0 + *count as f64));
        }
    }
    Ok(CenterLossOutput {
        loss,
        grad_emb,
        classes,
        delta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn loss_gradient_and_update_follow_the_paper() {
        let emb: Array2<f64> = array![[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [5.0, 5.0]];
        let centers = array![[0.0, 0.0], [1.0, 1.0]];
        let labels = [0, 0, 1, -1];
        let out = center_loss(emb.view(), centers.view(), &labels, 0.5, 0.4).unwrap();
        // ‖(1,2)‖² + ‖(3,0)‖² + ‖(-1,0)‖² = 5 + 9 + 1 over 3 rows
        assert!((out.loss - 0.25 * 15.0 / 3.0).abs() < 1e-12);
        assert_eq!(out.grad_emb.row(0).to_vec(), vec![0.5 / 3.0, 1.0 / 3.0]);
        assert_eq!(out.grad_emb.row(3).to_vec(), vec![0.0, 0.0]);
        assert_eq!(out.classes, vec![0, 1]);
        // class 0: -0.4 * ((0-1)+(0-3), (0-2)+(0-0)) / 3
        assert!((out.delta[[0, 0]] - 0.4 * 4.0 / 3.0).abs() < 1e-12);
        assert!((out.delta[[0, 1]] - 0.4 * 2.0 / 3.0).abs() < 1e-12);
        assert!((out.delta[[1, 0]] + 0.4 * 1.0 / 2.0).abs() < 1e-12);
        let bad = center_loss(emb.view(), centers.view(), &[0, 2, 0, 0], 0.5, 0.4);
        assert_eq!(bad.unwrap_err().arg, "labels");
    }
}
