//! The heavy parts of the evaluation protocols: dot products of many template pairs (IJB
//! 1:1), and TAR at given FARs over all pairs of a set (MFR style) without storing the
//! N(N-1)/2 scores.

use crate::error::{unnormalisable, Error, Result};
use crate::kernels;
use crate::limits;
use crate::real::Real;
use ndarray::{s, Array2, ArrayView2, Axis};
use rayon::prelude::*;
use std::collections::HashMap;

/// Rows per block of the all-pairs GEMM (a 512×512 score tile: 1 MiB in float32).
const BLOCK: usize = 512;

fn check_indices(arg: &'static str, idx: &[i64], rows: usize) -> Result<()> {
    match idx.iter().position(|&i| i < 0 || i as u64 >= rows as u64) {
        Some(p) => Err(Error::invalid(
            arg,
            format!("entry {p} is {}, outside [0, {rows})", idx[p]),
        )),
        None => Ok(()),
    }
}

/// `out[p] = features[first[p]] · features[second[p]]`, accumulated in f64, in parallel.
pub fn pair_dots<T: Real>(
    features: ArrayView2<T>,
    first: &[i64],
    second: &[i64],
) -> Result<Vec<f64>> {
    if first.len() != second.len() {
        return Err(Error::invalid(
            "t2",
            format!("has {} pairs but t1 has {}", second.len(), first.len()),
        ));
    }
    let rows = features.nrows();
    check_indices("t1", first, rows)?;
    check_indices("t2", second, rows)?;
    let features = features.as_standard_layout();
    let d = features.ncols();
    let flat = features.as_slice().expect("standard layout");
    let row = |i: i64| &flat[i as usize * d..(i as usize + 1) * d];
    Ok(first
        .par_iter()
        .zip(second)
        .with_min_len(4096)
        .map(|(&a, &b)| {
            row(a)
                .iter()
                .zip(row(b))
                .map(|(x, y)| x.f64() * y.f64())
                .sum()
        })
        .collect())
}

/// Result of [`all_pairs_tar_at_far`].
#[derive(Clone, Debug, PartialEq)]
pub struct AllPairs {
    /// TAR at each asked FAR.
    pub tar: Vec<f64>,
    /// The score threshold of each FAR: the (k+1)-th largest negative score, k =
    /// ⌊far·negatives⌋ (pairs scoring strictly above it are accepted: at most k negatives
    /// are); -inf when k covers every negative.
    pub thresholds: Vec<f64>,
    pub positives: u64,
    pub negatives: u64,
}

/// One thread's share of the scan: every positive score, and the negatives at or above a
/// threshold that only rises (the top `keep` of those seen are always among them).
struct Scan<T> {
    positives: Vec<T>,
    negatives: Vec<T>,
    floor: T,
    keep: usize,
}

impl<T: Real> Scan<T> {
    fn new(keep: usize) -> Self {
        Scan {
            positives: Vec::new(),
            negatives: Vec::new(),
            floor: T::of(f64::NEG_INFINITY),
            keep,
        }
    }

    /// Keeps the `keep` largest negatives and raises the floor to the smallest of them.
    fn prune(&mut self) {
        if self.negatives.len() > self.keep {
            let cut = self.negatives.len() - self.keep;
            self.negatives
                .select_nth_unstable_by(cut, |a, b| a.partial_cmp(b).expect("finite scores"));
            self.negatives.drain(..cut);
            self.floor =
                self.negatives
                    .iter()
                    .fold(T::of(f64::INFINITY), |m, &v| if v < m { v } else { m });
        }
    }

    fn merge(mut self, other: Scan<T>) -> Scan<T> {
        self.positives.extend(other.positives);
        self.negatives.extend(other.negatives);
        if other.floor > self.floor {
            self.floor = other.floor;
        }
        self.prune();
        self
    }
}

/// TAR at each FAR in `fars` over all N(N-1)/2 pairs of the L2-normalised rows of
/// `features` (cosine scores; a pair is positive when its labels are equal), exactly, in
/// memory O(N·D + k): a blocked GEMM over the upper triangle of the score matrix, every
/// positive kept, and of the negatives only the k = ⌊max(far)·negatives⌋ largest.
pub fn all_pairs_tar_at_far<T: Real>(
    features: ArrayView2<T>,
    labels: &[i64],
    fars: &[f64],
) -> Result<AllPairs> {
    let (n, d) = features.dim();
    if n < 2 || d == 0 {
        return Err(Error::invalid(
            "features",
            format!("need at least 2 rows of at least 1 value, got ({n}, {d})"),
        ));
    }
    if labels.len() != n {
        return Err(Error::invalid(
            "labels",
            format!("has {} entries for {n} rows", labels.len()),
        ));
    }
    if fars.is_empty() {
        return Err(Error::invalid("far", "give at least one FAR"));
    }
    if let Some(f) = fars
        .iter()
        .find(|f| !(f.is_finite() && **f > 0.0 && **f <= 1.0))
    {
        return Err(Error::invalid(
            "far",
            format!("every FAR must be in (0, 1], got {f}"),
        ));
    }
    let mut counts: HashMap<i64, u64> = HashMap::new();
    for &y in labels {
        *counts.entry(y).or_default() += 1;
    }
    let positives: u64 = counts.values().map(|&c| c * (c - 1) / 2).sum();
    let pairs = n as u64 * (n as u64 - 1) / 2;
    let negatives = pairs - positives;
    if positives == 0 || negatives == 0 {
        return Err(Error::invalid(
            "labels",
            format!(
                "need pairs of both kinds, got {positives} same-label and {negatives} \
                 different-label pairs"
            ),
        ));
    }
    // k = the false accepts each FAR allows (the same tolerance as `verification`'s
    // fpr <= far); the (k+1)-th largest negative is the one that must stay rejected
    let ks: Vec<u64> = fars
        .iter()
        .map(|f| ((f * (1.0 + 1e-15) * negatives as f64).floor() as u64).min(negatives))
        .collect();
    let keep = (ks.iter().copied().max().unwrap_or(0) + 1).min(negatives);
    let threads = rayon::current_num_threads().max(1) as u128;
    let size = std::mem::size_of::<T>() as u128;
    // each thread holds up to 2·keep negatives between prunes, and the merge holds them all
    limits::check_bytes(
        "far",
        (2 * threads + 1) * keep as u128 * size,
        "the largest FAR's negatives",
    )?;
    limits::check_bytes(
        "labels",
        positives as u128 * size,
        "the same-label pairs' scores",
    )?;
    let keep = keep as usize;

    // unit rows, in the features' dtype (read through one standard-layout view)
    let features = features.as_standard_layout();
    let row = |i: usize| features.row(i).to_slice().expect("standard layout");
    let mut unit = Array2::<T>::zeros((n, d));
    let norms: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| kernels::norm(row(i)))
        .collect();
    if let Some(e) = norms
        .iter()
        .enumerate()
        .find_map(|(i, &nv)| unnormalisable("features", i, nv))
    {
        return Err(e);
    }
    for (i, (mut dst, &nv)) in unit.axis_iter_mut(Axis(0)).zip(&norms).enumerate() {
        kernels::unit_into(row(i), nv, dst.as_slice_mut().expect("standard layout"));
    }

    let blocks = n.div_ceil(BLOCK);
    let tiles: Vec<(usize, usize)> = (0..blocks)
        .flat_map(|i| (i..blocks).map(move |j| (i, j)))
        .collect();
    let scan = tiles
        .par_iter()
        .fold(
            || (Scan::<T>::new(keep), Array2::<T>::zeros((BLOCK, BLOCK))),
            |(mut scan, mut buf), &(bi, bj)| {
                let (a0, b0) = (bi * BLOCK, bj * BLOCK);
                let (a1, b1) = ((a0 + BLOCK).min(n), (b0 + BLOCK).min(n));
                let (ra, rb) = (a1 - a0, b1 - b0);
                let mut tile = buf.slice_mut(s![..ra, ..rb]);
                let xa = unit.slice(s![a0..a1, ..]);
                let xb = unit.slice(s![b0..b1, ..]);
                T::gemm(T::one(), &xa, &xb.t(), T::zero(), &mut tile);
                let lb = &labels[b0..b1];
                for (r, row) in tile.axis_iter(Axis(0)).enumerate() {
                    let i = a0 + r;
                    let la = labels[i];
                    // on a diagonal tile only the pairs above the diagonal
                    let from = if bi == bj { r + 1 } else { 0 };
                    let row = row.to_slice().expect("standard layout");
                    for (&sc, &l) in row[from..].iter().zip(&lb[from..]) {
                        if l == la {
                            scan.positives.push(sc);
                        } else if sc >= scan.floor {
                            scan.negatives.push(sc);
                        }
                    }
                    if scan.negatives.len() >= 2 * keep.max(4096) {
                        scan.prune();
                    }
                }
                (scan, buf)
            },
        )
        .map(|(scan, _)| scan)
        .reduce(|| Scan::new(keep), Scan::merge);

    let mut negs = scan.negatives;
    negs.sort_unstable_by(|a, b| b.partial_cmp(a).expect("finite scores"));
    let mut pos = scan.positives;
    pos.sort_unstable_by(|a, b| a.partial_cmp(b).expect("finite scores"));
    let (mut tar, mut thresholds) = (Vec::new(), Vec::new());
    for &k in &ks {
        // The highest TPR over thresholds whose FPR <= far: accept every score above the
        // (k+1)-th largest negative (so at most k negatives, ties included, get in); with
        // k = every negative, accept everything.
        let (threshold, accepted) = match negs.get(k as usize) {
            Some(&t) => (t, pos.len() - pos.partition_point(|&p| p <= t)),
            None => (T::of(f64::NEG_INFINITY), pos.len()),
        };
        thresholds.push(threshold.f64());
        tar.push(accepted as f64 / positives as f64);
    }
    Ok(AllPairs {
        tar,
        thresholds,
        positives,
        negatives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(x: &Array2<f64>, labels: &[i64], far: f64) -> f64 {
        let n = x.nrows();
        let unit = x / &x
            .map_axis(Axis(1), |r| r.dot(&r).sqrt())
            .insert_axis(Axis(1));
        let (mut pos, mut neg) = (Vec::new(), Vec::new());
        for i in 0..n {
            for j in i + 1..n {
                let s = unit.row(i).dot(&unit.row(j));
                if labels[i] == labels[j] {
                    pos.push(s)
                } else {
                    neg.push(s)
                }
            }
        }
        // the highest TPR over every threshold (each score, accepting scores >= it) whose
        // FPR <= far, tried one by one
        neg.sort_by(|a, b| a.partial_cmp(b).unwrap());
        pos.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let mut best = 0.0f64;
        for &t in pos.iter().chain(&neg) {
            let fp = neg.len() - neg.partition_point(|&n| n < t);
            if fp as f64 <= far * neg.len() as f64 {
                let tp = pos.len() - pos.partition_point(|&p| p < t);
                best = best.max(tp as f64 / pos.len() as f64);
            }
        }
        best
    }

    #[test]
    fn all_pairs_equal_brute_force_across_blocks() {
        let n = 1100; // three blocks, the last short
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let ids = 220;
        let centres = Array2::from_shape_fn((ids, 16), |_| next());
        let labels: Vec<i64> = (0..n).map(|i| (i * 7 % ids) as i64).collect();
        let x = Array2::from_shape_fn((n, 16), |(i, j)| {
            centres[[labels[i] as usize, j]] + 0.3 * next()
        });
        let fars = [1e-6, 1e-4, 1e-3, 0.01, 0.3, 1.0];
        let got = all_pairs_tar_at_far(x.view(), &labels, &fars).unwrap();
        for (f, t) in fars.iter().zip(&got.tar) {
            assert_eq!(*t, brute(&x, &labels, *f), "far {f}");
        }
        let pairs = (n * (n - 1) / 2) as u64;
        assert_eq!(got.positives + got.negatives, pairs);
    }

    #[test]
    fn bad_arguments_are_named() {
        let x = Array2::<f64>::ones((4, 3));
        assert_eq!(
            all_pairs_tar_at_far(x.view(), &[0, 0, 1], &[0.1])
                .unwrap_err()
                .arg,
            "labels"
        );
        assert_eq!(
            all_pairs_tar_at_far(x.view(), &[0, 0, 1, 1], &[0.0])
                .unwrap_err()
                .arg,
            "far"
        );
        assert_eq!(
            all_pairs_tar_at_far(x.view(), &[0, 1, 2, 3], &[0.1])
                .unwrap_err()
                .arg,
            "labels"
        );
        assert_eq!(pair_dots(x.view(), &[0, 4], &[1, 2]).unwrap_err().arg, "t1");
        assert_eq!(pair_dots(x.view(), &[0], &[1, 2]).unwrap_err().arg, "t2");
        assert_eq!(
            pair_dots(x.view(), &[0, 1], &[3, 2]).unwrap(),
            vec![3.0, 3.0]
        );
    }
}
