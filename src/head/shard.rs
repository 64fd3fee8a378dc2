use super::*;

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
    pub(super) fn exp_row<T: Real>(z: &mut [T]) -> RowPart {
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
