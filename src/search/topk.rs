//! Bounded top-k selection: the k best (score, index) pairs, ties to the lower index.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// A candidate; greater is better: higher score, then lower index.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub score: f64,
    pub index: usize,
}

impl Eq for Hit {}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The best `k` hits seen so far (a min-heap of them, so the worst is on top).
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Hit>>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// How many hits it keeps.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The score a new hit must beat (or tie with a lower index) to enter; -inf until full.
    #[inline]
    pub fn threshold(&self) -> f64 {
        if self.heap.len() < self.k {
            f64::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f64::NEG_INFINITY, |r| r.0.score)
        }
    }

    #[inline]
    pub fn push(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(Reverse(hit));
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if hit > worst.0 {
                *worst = Reverse(hit);
            }
        }
    }

    pub fn merge(mut self, other: TopK) -> TopK {
        for Reverse(hit) in other.heap {
            self.push(hit);
        }
        self
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<Hit> {
        let mut hits: Vec<Hit> = self.heap.into_iter().map(|r| r.0).collect();
        hits.sort_unstable_by(|a, b| b.cmp(a));
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_with_ties_to_lower_index() {
        let scores = [0.5f64, 0.9, 0.5, 0.1, 0.9, 0.7, 0.5];
        let mut top = TopK::new(4);
        for (index, &score) in scores.iter().enumerate() {
            top.push(Hit { score, index });
        }
        let got: Vec<usize> = top.into_sorted().iter().map(|h| h.index).collect();
        assert_eq!(got, vec![1, 4, 5, 0]);
    }

    #[test]
    fn merge_equals_one_pass() {
        let scores: Vec<f64> = (0..100).map(|i| ((i * 37) % 11) as f64).collect();
        let mut all = TopK::new(7);
        let (mut a, mut b) = (TopK::new(7), TopK::new(7));
        for (index, &score) in scores.iter().enumerate() {
            all.push(Hit { score, index });
            if index % 3 == 0 {
                a.push(Hit { score, index })
            } else {
                b.push(Hit { score, index })
            }
        }
        assert_eq!(a.merge(b).into_sorted(), all.into_sorted());
    }
}
