use super::*;

/// Given `g` = dL/dc of a tile with column j already divided by ||w_j||, adds `g·W_t` (= G·Ŵ_t)
/// into `dxhat` and sets `grad_tile = P(beta·grad_tile + gᵀ·X̂)`, where P removes from each
/// row its component along ŵ_j (the normalisation's Jacobian; P is linear and idempotent,
/// so accumulating over row chunks with beta = 1 stays exact). A None output is skipped.
/// `xhat_rows` is packed as the right operand once for every tile.
pub(super) fn backprop_tile<T: Real>(
    g: ArrayView2<T>,
    xhat_rows: &Packed<T>,
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
        T::gemm_packed_right(T::one(), &g.t(), xhat_rows, beta, &mut grad_tile);
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
pub(super) fn sparse_backprop_tile<T: Real>(
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
pub(super) fn row<'a, T>(m: ArrayView2<'a, T>, i: usize) -> &'a [T] {
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
pub(super) fn zeroed_for_huge_pages<T: Real>(n: usize) -> Result<Vec<T>> {
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
pub(super) struct Pass2<T> {
    pub(super) dxhat: Array2<T>,
    /// dL/dc of a tile, per centre (rows × ct·k).
    pub(super) g: Vec<T>,
    /// With sub-centres: one row's dL/dc per class, and the 1/||w|| of its arg-max centres.
    pub(super) g_class: Vec<T>,
    pub(super) inv_sel: Vec<T>,
    /// Σ_j p_ij z_ij per row: the feature-norm scale's extra gradient term.
    pub(super) pz: Vec<f64>,
    /// Entries of the backward GEMMs done and in all (the gradient filter's savings).
    pub(super) work_done: f64,
    pub(super) work_full: f64,
    /// A sparse tile's kept entries (row, column, value).
    pub(super) nonzeros: Vec<(u32, u32, T)>,
}

impl<T: Real> Pass2<T> {
    pub(super) fn new(rows: usize, d: usize, ct: usize, k: usize) -> Self {
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
    pub(super) fn g_class_row(&mut self, i: usize, width: usize, k: usize) -> &mut [T] {
        if k == 1 {
            &mut self.g[i * width..(i + 1) * width]
        } else {
            &mut self.g_class[..width]
        }
    }

    /// Divides row `i`'s per-class gradient by its centres' norms (`inv`, k per class) and,
    /// with sub-centres, puts each class's on its arg-max centre (`sub`) in `g`.
    pub(super) fn spread_row(&mut self, i: usize, width: usize, k: usize, sub: &[u8], inv: &[T]) {
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

    pub(super) fn add(mut self, o: Pass2<T>) -> Self {
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
pub(super) struct LossRows<'a> {
    pub(super) rows: Range<usize>,
    pub(super) lse: &'a [f64],
    /// d loss / d row loss: 1/n_valid for the mean, 1 otherwise, 0 for ignored rows.
    pub(super) row_weight: &'a [f64],
    /// The gradient filter's probability floor, None for the exact gradient.
    pub(super) floor: Option<f64>,
}

impl LossRows<'_> {
    /// The floor on a tile's stash `e = exp(z - tile_max)` of row `local` that keeps
    /// `p = e exp(tile_max - lse) >= floor`.
    pub(super) fn stash_floor<T: Real>(&self, local: usize, tile_max: T) -> Option<T> {
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
    pub(super) fn loss_grad_tile(
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
    pub(super) fn grad_row(
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
    pub(super) fn sub_centre_grad_tile(
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

/// How the rows are cut so that the stash of pass 1 fits: when B <= D a tile's logits wait
/// inside that tile's rows of the weight gradient (no stash at all), else row chunks whose
/// stash fits the budget.
pub(super) struct ChunkPlan {
    /// Classes per tile.
    pub(super) ct: usize,
    pub(super) stash_in_grad: bool,
    pub(super) chunk_rows: usize,
}

impl ChunkPlan {
    /// `chunk_classes`: the classes one chunk's stash holds (every shard must cut the batch
    /// alike, so shards size it for the largest shard).
    pub(super) fn new<T>(
        b: usize,
        c: usize,
        d: usize,
        chunk_classes: usize,
        budget_bytes: usize,
    ) -> Self {
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
pub(super) fn row_weights(
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
pub(super) struct Tiles<'a, T> {
    pub(super) p: &'a Prepared<T>,
    pub(super) weight: ArrayView2<'a, T>,
    pub(super) inv: &'a [T],
    pub(super) ct: usize,
}

impl<T: Real> Tiles<'_, T> {
    /// Class tile `t`: its first class, its rows of W (k per class) and their 1/||w||.
    pub(super) fn tile(&self, t: usize) -> (usize, ArrayView2<'_, T>, &[T]) {
        let (c, k) = (self.p.c, self.p.k);
        let lo = t * self.ct;
        let hi = (lo + self.ct).min(c);
        let w_tile = self.weight.slice(s![lo * k..hi * k, ..]);
        (lo, w_tile, &self.inv[lo * k..hi * k])
    }

    /// Bytes per tile of the arg-max buffer `subs` of a chunk of `nr` rows: one per class
    /// with sub-centres; without, one per tile (unused, but it keeps the zips aligned).
    pub(super) fn sub_chunk(&self, nr: usize) -> usize {
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
    pub(super) fn pass1(
        &self,
        rows: Range<usize>,
        slots: &mut [T],
        slot_len: usize,
        tile_max: &mut [T],
        subs: &mut [u8],
    ) -> Vec<RowPart> {
        let nr = rows.len();
        let k = self.p.k;
        let x = self.p.packed_rows(rows.clone());
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
                    self.p.logits_tile(rows.clone(), &x, lo, w_tile, inv, view);
                    for (r, zrow) in z.chunks_exact_mut(width).enumerate() {
                        let st = RowPart::exp_row(zrow);
                        tmax[r] = T::of(st.max);
                        acc[r] = acc[r].merge(st);
                    }
                    return (acc, scratch, zrow);
                }
                self.p
                    .cosines_tile(rows.clone(), &x, lo, w_tile, inv, view, &mut scratch, sub);
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
    pub(super) fn pass2(
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
        let x_right = if want_weight {
            T::pack(xhat_rows, Side::Right)
        } else {
            Packed::plain(xhat_rows, Side::Right)
        };
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
                backprop_tile(g, &x_right, w_tile, inv, beta, grad_out, dx_out);
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

pub(super) fn fused_loss<T: Real>(
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
