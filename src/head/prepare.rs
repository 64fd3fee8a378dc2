use super::*;

/// Everything the entry points derive from (emb, weight, labels, margin) before any GEMM.
pub(super) struct Prepared<T> {
    /// Classes (the weight has `c * k` rows).
    pub(super) c: usize,
    pub(super) d: usize,
    /// Centres per class.
    pub(super) k: usize,
    /// Whether logits need more than `scale * c` with the target replaced: sub-centres, a
    /// filter or hard negatives. Such tiles stash cosines instead of `exp(z - max)`.
    pub(super) general: bool,
    pub(super) filter: Option<f64>,
    /// Whether the margin re-weights hard negatives (CurricularFace, MV-Softmax).
    pub(super) hard_negatives: bool,
    /// Each row's rule for its non-targets (only read when `general`).
    pub(super) rules: Vec<NonTarget<T>>,
    /// The arg-max centre (0..k) of each row's target class.
    pub(super) target_sub: Vec<u8>,
    pub(super) xhat: Array2<T>,
    pub(super) x_norm: Vec<f64>,
    pub(super) row_scale: Vec<f64>,
    pub(super) feature_norm_scale: bool,
    /// Target column of each row in this weight, None for ignored rows and for rows whose
    /// target lives in another shard of the classes.
    pub(super) target: Vec<Option<usize>>,
    /// Rows that have a loss (label not -1), wherever their target lives.
    pub(super) valid: Vec<bool>,
    pub(super) target_logit: Vec<f64>,
    pub(super) target_dpsi: Vec<f64>,
    /// d psi / d ||x|| of each row's target (MagFace), 0 for the others.
    pub(super) target_dnorm: Vec<f64>,
    /// Each valid row's loss term besides the softmax and its d / d ||x|| (MagFace's
    /// regulariser), (0, 0) for the others.
    pub(super) penalty: Vec<(f64, f64)>,
}

/// The kernels' form of a row's non-target rule.
pub(super) fn nontarget_rule<T: Real>(
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
pub(super) fn tile_width(c: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per = c.div_ceil(4 * threads).clamp(32, 512);
    per.div_ceil(16) * 16
}

pub(super) fn row_norm<T: Real>(row: ndarray::ArrayView1<T>) -> f64 {
    match row.as_slice() {
        Some(r) => kernels::norm(r),
        None => kernels::norm(&row.to_vec()),
    }
}

/// `a · b` accumulated in f64 (for the few per-row dot products outside the GEMMs).
pub(super) fn dot_f64<T: Real>(a: ndarray::ArrayView1<T>, b: ndarray::ArrayView1<T>) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.f64() * y.f64()).sum()
}

pub(super) fn row_norms<T: Real>(m: ArrayView2<T>, arg: &'static str) -> Result<Vec<f64>> {
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
pub(super) fn saturate<T: Real>(v: f64) -> T {
    T::of(v.clamp(-T::MAX, T::MAX))
}

/// The class centres as the GEMMs read them: the weight in row-major order, validated, with
/// `inv[j] = 1/||w_j||`. A row whose norm lies outside the safe range of `T` (its products
/// would be denormal or overflow) is scaled by a power of two in a copy, so every finite
/// non-zero row gives exact cosines; its gradient row is scaled back at the end.
pub(super) struct Centres<'a, T> {
    pub(super) rows: ndarray::CowArray<'a, T, ndarray::Ix2>,
    pub(super) inv: Vec<T>,
    /// (row, factor): the gradient computed over the rescaled row times `factor` is the
    /// gradient of the given row (`||w'|| / max(||w||, GRAD_NORM_MIN)`).
    pub(super) rescaled: Vec<(usize, f64)>,
}

impl<'a, T: Real> Centres<'a, T> {
    pub(super) fn new(weight: ArrayView2<'a, T>) -> Result<Self> {
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

    pub(super) fn view(&self) -> ArrayView2<'_, T> {
        self.rows.view()
    }

    /// Turns gradient rows computed over the rescaled rows into those of the given rows.
    pub(super) fn fix_gradient(&self, grad: &mut [T], d: usize) {
        for &(j, factor) in &self.rescaled {
            for v in &mut grad[j * d..(j + 1) * d] {
                *v = saturate(v.f64() * factor);
            }
        }
    }
}

impl<T: Real> Prepared<T> {
    pub(super) fn new(
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
    pub(super) fn new_shard(
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
    pub(super) fn set_targets(
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

    pub(super) fn b(&self) -> usize {
        self.x_norm.len()
    }

    /// Logits of rows `rows` against the class tile starting at `lo` (`w_tile` its rows of W);
    /// `x` is those rows of X̂, packed for every tile ([`Prepared::packed_rows`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn logits_tile(
        &self,
        rows: Range<usize>,
        x: &Packed<T>,
        lo: usize,
        w_tile: ArrayView2<T>,
        inv: &[T],
        mut out: ArrayViewMut2<T>,
    ) {
        let ct = w_tile.nrows();
        T::gemm_packed_left(T::one(), x, &w_tile.t(), T::zero(), &mut out);
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
    pub(super) fn cosines_tile(
        &self,
        rows: Range<usize>,
        x: &Packed<T>,
        lo: usize,
        w_tile: ArrayView2<T>,
        inv: &[T],
        mut out: ArrayViewMut2<T>,
        scratch: &mut Vec<T>,
        sub: &mut [u8],
    ) {
        let (nr, k) = (rows.len(), self.k);
        if k == 1 {
            T::gemm_packed_left(T::one(), x, &w_tile.t(), T::zero(), &mut out);
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
            T::gemm_packed_left(T::one(), x, &w_tile.t(), T::zero(), &mut all);
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

    /// Rows `rows` of X̂ as the left operand of every tile's GEMM, packed once.
    pub(super) fn packed_rows(&self, rows: Range<usize>) -> Packed<'_, T> {
        T::pack(self.xhat.slice(s![rows, ..]), Side::Left)
    }

    /// [`Prepared::cosines_tile`] of every row (`x`: [`Prepared::packed_rows`] of them all),
    /// in new buffers: (cosines, arg-max centres).
    pub(super) fn all_rows_cosines(
        &self,
        x: &Packed<T>,
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
            x,
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
    pub(super) fn general_logits_row(&self, i: usize, lo: usize, cos: &[T], z: &mut [T]) {
        kernels::nontarget_logits(cos, self.rules[i], T::of(self.row_scale[i]), z);
        if let Some(y) = self.target[i] {
            if (lo..lo + cos.len()).contains(&y) {
                z[y - lo] = T::of(self.target_logit[i]);
            }
        }
    }

    /// dx = (dx̂ - x̂ (x̂·dx̂)) / ||x|| + x̂ * norm_term (the last only when scale = ||x||).
    pub(super) fn finish_grad_emb(&self, mut dxhat: Array2<T>, norm_term: &[f64]) -> Array2<T> {
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
