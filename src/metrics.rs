//! Verification metrics: ROC, AUC, TAR@FAR, best threshold and k-fold (LFW protocol)
//! accuracy, from one parallel sort and one sweep.

use crate::error::{Error, Result};
use rayon::prelude::*;

/// Everything [`verification`] measures. Curves follow scikit-learn's `roc_curve` with
/// `drop_intermediate=False`: one point per distinct score (pairs scoring >= threshold are
/// predicted "same"), starting at threshold +inf.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    pub thresholds: Vec<f64>,
    pub auc: f64,
    /// Highest TPR over thresholds whose FPR <= far, per requested far; NaN where far is
    /// below 1 / negatives (too few negatives to measure it).
    pub tar_at_far: Vec<f64>,
    pub best_threshold: f64,
    pub best_accuracy: f64,
    /// Accuracy of each fold with the threshold chosen on the other folds.
    pub fold_accuracy: Vec<f64>,
}

/// ROC and accuracies of `scores` (higher = more alike) against `is_same`.
/// `folds` contiguous folds for the LFW-style accuracy (0 skips it).
pub fn verification(
    scores: &[f64],
    is_same: &[bool],
    fars: &[f64],
    folds: usize,
) -> Result<Verification> {
    let n = scores.len();
    if is_same.len() != n {
        return Err(Error::invalid(
            "is_same",
            format!("has {} entries but scores has {n}", is_same.len()),
        ));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::invalid("scores", format!("entry {i} is NaN or inf")));
    }
    let positives = is_same.iter().filter(|&&s| s).count();
    let negatives = n - positives;
    if positives == 0 || negatives == 0 {
        return Err(Error::invalid(
            "is_same",
            format!("needs both same and different pairs, got {positives} same and {negatives} different"),
        ));
    }
    if let Some(f) = fars
        .iter()
        .find(|f| !(f.is_finite() && **f >= 0.0 && **f <= 1.0))
    {
        return Err(Error::invalid(
            "far",
            format!("values must lie in [0, 1], got {f}"),
        ));
    }
    if folds == 1 || folds > n {
        return Err(Error::invalid(
            "folds",
            format!("must be 0 (none) or in 2..={n}, got {folds}"),
        ));
    }

    // Fold of pair i: contiguous blocks, the first n % folds blocks one longer.
    let fold_of = |i: usize| -> usize {
        let (base, extra) = (n / folds, n % folds);
        let cut = extra * (base + 1);
        if i < cut {
            i / (base + 1)
        } else {
            extra + (i - cut) / base
        }
    };
    let mut order: Vec<(f64, u32)> = scores
        .par_iter()
        .zip(is_same.par_iter())
        .enumerate()
        .map(|(i, (&s, &same))| {
            let fold = if folds > 0 { fold_of(i) as u32 } else { 0 };
            (s, (fold << 1) | same as u32)
        })
        .collect();
    order.par_sort_unstable_by(|a, b| b.0.total_cmp(&a.0));

    let k = folds.max(1);
    let (p, q) = (positives as f64, negatives as f64);
    // Per fold: pairs, positives; running tp/fp; best accuracy elsewhere and own tp/fp there.
    let mut fold_n = vec![0usize; k];
    let mut fold_pos = vec![0usize; k];
    for &(_, tag) in &order {
        fold_n[(tag >> 1) as usize] += 1;
        fold_pos[(tag >> 1) as usize] += (tag & 1) as usize;
    }
    let mut fold_tp = vec![0usize; k];
    let mut fold_fp = vec![0usize; k];
    let mut fold_best = vec![(f64::NEG_INFINITY, 0usize, 0usize); k];

    let mut fpr = vec![0.0];
    let mut tpr = vec![0.0];
    let mut thresholds = vec![f64::INFINITY];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best = (f64::NEG_INFINITY, f64::INFINITY);
    let mut consider = |tp: usize, fp: usize, th: f64, fold_tp: &[usize], fold_fp: &[usize]| {
        let acc = (tp + negatives - fp) as f64 / n as f64;
        if acc > best.0 {
            best = (acc, th);
        }
        if folds > 0 {
            for f in 0..k {
                let others = n - fold_n[f];
                let neg_others = negatives - (fold_n[f] - fold_pos[f]);
                let correct = (tp - fold_tp[f]) + neg_others - (fp - fold_fp[f]);
                let acc = correct as f64 / others as f64;
                if acc > fold_best[f].0 {
                    fold_best[f] = (acc, fold_tp[f], fold_fp[f]);
                }
            }
        }
    };
    consider(0, 0, f64::INFINITY, &fold_tp, &fold_fp);
    let mut i = 0;
    while i < n {
        let th = order[i].0;
        while i < n && order[i].0 == th {
            let (fold, same) = ((order[i].1 >> 1) as usize, order[i].1 & 1 == 1);
            if same {
                tp += 1;
                fold_tp[fold] += 1;
            } else {
                fp += 1;
                fold_fp[fold] += 1;
            }
            i += 1;
        }
        fpr.push(fp as f64 / q);
        tpr.push(tp as f64 / p);
        thresholds.push(th);
        consider(tp, fp, th, &fold_tp, &fold_fp);
    }

    let auc = fpr
        .windows(2)
        .zip(tpr.windows(2))
        .map(|(x, y)| (x[1] - x[0]) * (y[1] + y[0]) * 0.5)
        .sum();
    let tar_at_far = fars
        .iter()
        .map(|&far| {
            // far = 0 asks for no false accept at all, which every set of negatives can
            // measure; 0 < far < 1/negatives cannot be resolved.
            if far > 0.0 && far < 1.0 / q {
                return f64::NAN;
            }
            // fpr is non-decreasing: the last point with fpr <= far has the highest tpr
            let last = fpr.partition_point(|&f| f <= far + 1e-15 * far);
            tpr[last - 1]
        })
        .collect();
    let fold_accuracy = if folds > 0 {
        (0..k)
            .map(|f| {
                let (_, own_tp, own_fp) = fold_best[f];
                let own_neg = fold_n[f] - fold_pos[f];
                (own_tp + own_neg - own_fp) as f64 / fold_n[f] as f64
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Verification {
        fpr,
        tpr,
        thresholds,
        auc,
        tar_at_far,
        best_threshold: best.1,
        best_accuracy: best.0,
        fold_accuracy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_separation() {
        let v = verification(
            &[0.9, 0.8, 0.2, 0.1],
            &[true, true, false, false],
            &[0.5],
            2,
        )
        .unwrap();
        assert_eq!(v.auc, 1.0);
        assert_eq!(v.tar_at_far, vec![1.0]);
        assert_eq!(v.best_accuracy, 1.0);
        assert_eq!(v.best_threshold, 0.8);
        assert_eq!(v.thresholds[0], f64::INFINITY);
    }

    #[test]
    fn ties_are_one_point_and_a_diagonal_segment() {
        // all scores equal: the curve jumps from (0,0) to (1,1), AUC 0.5
        let v = verification(&[0.5; 4], &[true, false, true, false], &[], 0).unwrap();
        assert_eq!(v.fpr, vec![0.0, 1.0]);
        assert_eq!(v.tpr, vec![0.0, 1.0]);
        assert_eq!(v.auc, 0.5);
    }

    #[test]
    fn auc_is_the_probability_a_positive_outscores_a_negative() {
        let scores: Vec<f64> = (0..200).map(|i| ((i * 7919) % 97) as f64 / 10.0).collect();
        let same: Vec<bool> = (0..200).map(|i| (i * 31) % 5 < 2).collect();
        let v = verification(&scores, &same, &[], 0).unwrap();
        let (mut wins, mut pairs) = (0.0, 0.0);
        for i in 0..200 {
            for j in 0..200 {
                if same[i] && !same[j] {
                    pairs += 1.0;
                    wins += if scores[i] > scores[j] {
                        1.0
                    } else if scores[i] == scores[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        assert!((v.auc - wins / pairs).abs() < 1e-12);
    }

    #[test]
    fn bad_input() {
        assert_eq!(
            verification(&[0.1], &[true, false], &[], 0)
                .unwrap_err()
                .arg,
            "is_same"
        );
        assert_eq!(
            verification(&[0.1, 0.2], &[true, true], &[], 0)
                .unwrap_err()
                .arg,
            "is_same"
        );
        assert_eq!(
            verification(&[f64::NAN, 0.2], &[true, false], &[], 0)
                .unwrap_err()
                .arg,
            "scores"
        );
        assert_eq!(
            verification(&[0.1, 0.2], &[true, false], &[2.0], 0)
                .unwrap_err()
                .arg,
            "far"
        );
        assert_eq!(
            verification(&[0.1, 0.2], &[true, false], &[], 3)
                .unwrap_err()
                .arg,
            "folds"
        );
    }
}
