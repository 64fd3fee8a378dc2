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
    let (positives, negatives) = check(scores, is_same, fars, folds)?;
    let order = sorted_pairs(scores, is_same, folds);
    let mut folds = (folds > 0).then(|| FoldSweep::new(folds, &order, n, negatives));
    let mut roc = Roc::default();
    let mut best = (f64::NEG_INFINITY, f64::INFINITY); // (accuracy, threshold)
    let mut consider = |roc: &Roc, folds: &mut Option<FoldSweep>| {
        let acc = (roc.tp + negatives - roc.fp) as f64 / n as f64;
        if acc > best.0 {
            best = (acc, roc.threshold());
        }
        if let Some(f) = folds {
            f.consider(roc.tp, roc.fp);
        }
    };
    roc.point(positives, negatives, f64::INFINITY);
    consider(&roc, &mut folds);
    // Lower the threshold one distinct score at a time: every pair with that score is then
    // predicted "same".
    let mut i = 0;
    while i < n {
        let threshold = order[i].score;
        while i < n && order[i].score == threshold {
            roc.count(order[i].same);
            if let Some(f) = &mut folds {
                f.count(order[i].fold, order[i].same);
            }
            i += 1;
        }
        roc.point(positives, negatives, threshold);
        consider(&roc, &mut folds);
    }
    let tar_at_far = fars
        .iter()
        .map(|&far| roc.tar_at_far(far, negatives))
        .collect();
    Ok(Verification {
        auc: roc.auc(),
        tar_at_far,
        best_threshold: best.1,
        best_accuracy: best.0,
        fold_accuracy: folds.map_or_else(Vec::new, |f| f.accuracies()),
        fpr: roc.fpr,
        tpr: roc.tpr,
        thresholds: roc.thresholds,
    })
}

/// The arguments' errors; (positives, negatives).
fn check(scores: &[f64], is_same: &[bool], fars: &[f64], folds: usize) -> Result<(usize, usize)> {
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
    Ok((positives, negatives))
}

/// One pair, as the sweep reads it.
#[derive(Clone, Copy)]
struct Pair {
    score: f64,
    fold: u32,
    same: bool,
}

/// The pairs by descending score (one parallel sort), each with its fold: contiguous
/// blocks, the first `n % folds` one pair longer (scikit-learn's KFold without shuffling).
fn sorted_pairs(scores: &[f64], is_same: &[bool], folds: usize) -> Vec<Pair> {
    let n = scores.len();
    let fold_of = |i: usize| -> u32 {
        if folds == 0 {
            return 0;
        }
        let (base, extra) = (n / folds, n % folds);
        let cut = extra * (base + 1);
        let fold = if i < cut {
            i / (base + 1)
        } else {
            extra + (i - cut) / base
        };
        fold as u32
    };
    let mut order: Vec<Pair> = scores
        .par_iter()
        .zip(is_same.par_iter())
        .enumerate()
        .map(|(i, (&score, &same))| Pair {
            score,
            fold: fold_of(i),
            same,
        })
        .collect();
    order.par_sort_unstable_by(|a, b| b.score.total_cmp(&a.score));
    order
}

/// The ROC as the threshold sweeps down, with the running true/false positive counts.
#[derive(Default)]
struct Roc {
    fpr: Vec<f64>,
    tpr: Vec<f64>,
    thresholds: Vec<f64>,
    tp: usize,
    fp: usize,
}

impl Roc {
    fn count(&mut self, same: bool) {
        if same {
            self.tp += 1;
        } else {
            self.fp += 1;
        }
    }

    /// Records the point of the counts so far at `threshold`.
    fn point(&mut self, positives: usize, negatives: usize, threshold: f64) {
        self.fpr.push(self.fp as f64 / negatives as f64);
        self.tpr.push(self.tp as f64 / positives as f64);
        self.thresholds.push(threshold);
    }

    fn threshold(&self) -> f64 {
        *self.thresholds.last().expect("a point was recorded")
    }

    /// Trapezoidal area under the curve.
    fn auc(&self) -> f64 {
        self.fpr
            .windows(2)
            .zip(self.tpr.windows(2))
            .map(|(x, y)| (x[1] - x[0]) * (y[1] + y[0]) * 0.5)
            .sum()
    }

    /// The highest TPR at FPR <= far. far = 0 asks for no false accept at all, which every
    /// set of negatives can measure; 0 < far < 1/negatives cannot be resolved (NaN).
    fn tar_at_far(&self, far: f64, negatives: usize) -> f64 {
        if far > 0.0 && far < 1.0 / negatives as f64 {
            return f64::NAN;
        }
        // fpr is non-decreasing: the last point with fpr <= far has the highest tpr
        let last = self.fpr.partition_point(|&f| f <= far + 1e-15 * far);
        self.tpr[last - 1]
    }
}

/// The LFW protocol's k folds: for each fold, the accuracy on the other folds at every
/// threshold of the sweep, and the fold's own counts at the threshold best elsewhere.
struct FoldSweep {
    n: usize,
    negatives: usize,
    size: Vec<usize>,
    positives: Vec<usize>,
    tp: Vec<usize>,
    fp: Vec<usize>,
    /// (accuracy on the other folds, this fold's tp, this fold's fp) at the best threshold
    best: Vec<(f64, usize, usize)>,
}

impl FoldSweep {
    fn new(k: usize, order: &[Pair], n: usize, negatives: usize) -> Self {
        let (mut size, mut positives) = (vec![0usize; k], vec![0usize; k]);
        for p in order {
            size[p.fold as usize] += 1;
            positives[p.fold as usize] += p.same as usize;
        }
        FoldSweep {
            n,
            negatives,
            size,
            positives,
            tp: vec![0; k],
            fp: vec![0; k],
            best: vec![(f64::NEG_INFINITY, 0, 0); k],
        }
    }

    fn count(&mut self, fold: u32, same: bool) {
        let f = fold as usize;
        if same {
            self.tp[f] += 1;
        } else {
            self.fp[f] += 1;
        }
    }

    /// The current threshold, with `tp`/`fp` pairs predicted "same" over all folds.
    fn consider(&mut self, tp: usize, fp: usize) {
        for f in 0..self.size.len() {
            let others = self.n - self.size[f];
            let negatives_elsewhere = self.negatives - (self.size[f] - self.positives[f]);
            let correct = (tp - self.tp[f]) + negatives_elsewhere - (fp - self.fp[f]);
            let acc = correct as f64 / others as f64;
            if acc > self.best[f].0 {
                self.best[f] = (acc, self.tp[f], self.fp[f]);
            }
        }
    }

    /// Each fold's accuracy at the threshold that was best on the other folds.
    fn accuracies(&self) -> Vec<f64> {
        (0..self.size.len())
            .map(|f| {
                let (_, tp, fp) = self.best[f];
                let negatives = self.size[f] - self.positives[f];
                (tp + negatives - fp) as f64 / self.size[f] as f64
            })
            .collect()
    }
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
