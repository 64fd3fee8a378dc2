use super::*;

/// The (B, C) logits: `scale * c_ij`, with `scale * psi(c_iy)` on each row's target.
/// Rows labelled -1 get no margin.
pub fn margin_logits<'m, T: Real>(
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
) -> Result<Array2<T>> {
    margin_logits_with(emb, weight, labels, margin, HeadOptions::default())
}

/// [`margin_logits`] with sub-centres, inter-class filtering (and any margin's non-target
/// rule): the logits the fused loss takes the softmax of.
pub fn margin_logits_with<'m, T: Real>(
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
    head: HeadOptions,
) -> Result<Array2<T>> {
    let margin = margin.into();
    let mut p = Prepared::new(emb, weight, labels, margin, head)?;
    let centres = Centres::new(weight)?;
    p.set_targets(&centres, margin, None)?;
    let (b, c) = (p.b(), p.c);
    let tiles = Tiles {
        p: &p,
        weight: centres.view(),
        inv: &centres.inv,
        ct: tile_width(c),
    };
    let mut out =
        Array2::from_shape_vec((b, c), logits_buffer("weight", b, c)?).expect("logits shape");
    let x = p.packed_rows(0..b);
    out.axis_chunks_iter_mut(Axis(1), tiles.ct)
        .into_par_iter()
        .enumerate()
        .for_each(|(t, mut tile)| {
            let (lo, w_tile, inv) = tiles.tile(t);
            if !p.general {
                p.logits_tile(0..b, &x, lo, w_tile, inv, tile);
                return;
            }
            let width = tile.ncols();
            let (cos, _) = p.all_rows_cosines(&x, lo, w_tile, inv);
            let mut z = vec![T::zero(); width];
            for (i, crow) in cos.axis_iter(Axis(0)).enumerate() {
                let crow = crow.to_slice().expect("standard layout");
                p.general_logits_row(i, lo, crow, &mut z);
                tile.row_mut(i).assign(&ndarray::ArrayView1::from(&z[..]));
            }
        });
    Ok(out)
}

/// Gradients of any loss of [`margin_logits`]' output, given `grad_logits` = dL/dlogits.
pub fn margin_logits_backward<'m, T: Real>(
    grad_logits: ArrayView2<T>,
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
) -> Result<(Array2<T>, Array2<T>)> {
    margin_logits_backward_with(
        grad_logits,
        emb,
        weight,
        labels,
        margin,
        HeadOptions::default(),
    )
}

/// Gradients of any loss of [`margin_logits_with`]' output.
pub fn margin_logits_backward_with<'m, T: Real>(
    grad_logits: ArrayView2<T>,
    emb: ArrayView2<T>,
    weight: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
    head: HeadOptions,
) -> Result<(Array2<T>, Array2<T>)> {
    let margin = margin.into();
    let mut p = Prepared::new(emb, weight, labels, margin, head)?;
    let centres = Centres::new(weight)?;
    p.set_targets(&centres, margin, None)?;
    let (b, c, d, k) = (p.b(), p.c, p.d, p.k);
    check_shape("grad_logits", grad_logits.dim(), (b, c))?;
    check_finite(grad_logits, "grad_logits")?;
    let tiles = Tiles {
        p: &p,
        weight: centres.view(),
        inv: &centres.inv,
        ct: tile_width(c),
    };
    let ct = tiles.ct;
    let mut grad_w = Array2::from_shape_vec((c * k, d), zeroed_for_huge_pages::<T>(c * k * d)?)
        .expect("gradient shape");
    let new_acc = || Pass2::new(b, d, ct, k);
    let (x_left, x_right) = (p.packed_rows(0..b), T::pack(p.xhat.view(), Side::Right));
    let tiles_of_grad = grad_w
        .axis_chunks_iter_mut(Axis(0), ct * k)
        .into_par_iter()
        .enumerate();
    let acc = fold_in_groups(
        tiles_of_grad,
        new_acc,
        |mut acc, (t, grad_tile)| {
            let (lo, w_tile, inv) = tiles.tile(t);
            let w_rows = w_tile.nrows();
            let width = w_rows / k;
            let upstream = grad_logits.slice(s![.., lo..lo + width]);
            // the tile's class cosines (and arg-max centres) when the logits need them
            let (cos, sub) = if p.general || p.feature_norm_scale {
                p.all_rows_cosines(&x_left, lo, w_tile, inv)
            } else {
                (Array2::zeros((b, width)), Vec::new())
            };
            let mut z = vec![T::zero(); width];
            for i in 0..b {
                let scale = p.row_scale[i];
                let crow = cos.row(i);
                let crow = crow.as_slice().expect("standard layout");
                if p.feature_norm_scale {
                    // The logits scale by ||x||, so dL/d||x_i|| = Σ_j grad_ij z_ij / ||x_i||.
                    p.general_logits_row(i, lo, crow, &mut z);
                    let zrow = ndarray::ArrayView1::from(&z[..]);
                    acc.pz[i] += dot_f64(upstream.row(i), zrow) / scale;
                }
                // dL/dc_ij / ||w||, per class
                let g_row = &mut acc.g_class_row(i, width, k);
                for (j, (gv, &u)) in g_row.iter_mut().zip(upstream.row(i)).enumerate() {
                    let dh = if p.general {
                        p.rules[i].apply(crow[j]).1
                    } else {
                        T::one()
                    };
                    *gv = u * T::of(scale) * dh;
                }
                if let Some(y) = p.target[i] {
                    if (lo..lo + width).contains(&y) {
                        let up = upstream[[i, y - lo]].f64();
                        g_row[y - lo] = T::of(up * scale * p.target_dpsi[i]);
                        // MagFace: the target logit moves with the norm too
                        acc.pz[i] += up * scale * p.target_dnorm[i];
                    }
                }
                acc.spread_row(i, width, k, &sub, inv);
            }
            let g = ArrayView2::from_shape((b, w_rows), &acc.g[..b * w_rows]).expect("tile");
            let mut dx = std::mem::take(&mut acc.dxhat);
            backprop_tile(
                g,
                &x_right,
                w_tile,
                inv,
                T::zero(),
                Some(grad_tile),
                Some(&mut dx),
            );
            acc.dxhat = dx;
            acc
        },
        Pass2::add,
    );
    let grad_emb = p.finish_grad_emb(acc.dxhat, &acc.pz);
    centres.fix_gradient(grad_w.as_slice_mut().expect("gradient is contiguous"), d);
    Ok((grad_emb, grad_w))
}

/// A zeroed (B, C) logits buffer, allocated fallibly; `arg` sized C (the weight's classes,
/// or a cosine matrix's columns).
pub(super) fn logits_buffer<T: Real>(arg: &'static str, b: usize, c: usize) -> Result<Vec<T>> {
    let n = b.checked_mul(c).ok_or_else(|| {
        Error::out_of_memory(arg, "the (B, C) logits", b as u128 * c as u128, None)
    })?;
    limits::filled(arg, n, T::zero(), "the (B, C) logits")
}

pub(super) fn fixed_scale(margin: Margins, rows: usize) -> Result<f64> {
    let scale = margin.check(rows)?;
    if (0..rows).any(|i| margin.row(i).reads_norm()) {
        return Err(Error::invalid(
            "margin",
            "MagFace's margin follows the feature norm, which a cosine matrix does not carry; \
             use margin_loss or margin_logits",
        ));
    }
    match scale {
        Scale::Fixed(s) => Ok(s),
        Scale::FeatureNorm => Err(Error::invalid(
            "margin",
            "SphereFace(s=None) scales logits by the feature norm, which a cosine matrix does \
             not carry; give SphereFace a fixed s or use margin_logits",
        )),
    }
}

pub(super) fn check_cos<T: Real>(cos: ArrayView2<T>) -> Result<()> {
    if cos.nrows() == 0 {
        return Err(Error::invalid("cos", "empty batch: need at least one row"));
    }
    let limit = 1.0 + COS_TOLERANCE;
    let bad = cos
        .axis_iter(Axis(0))
        .into_par_iter()
        .position_first(|row| row.iter().any(|v| v.is_nan() || v.f64().abs() > limit));
    match bad {
        Some(i) => Err(Error::invalid(
            "cos",
            format!("row {i} has a value that is NaN, inf or outside [-1, 1]"),
        )),
        None => Ok(()),
    }
}

/// What [`apply_margin`] and its backward check first: a (B, C) output the size of `cos`
/// (allocated fallibly), `cos` itself, and the margin's fixed scale `s`.
fn cos_output<T: Real>(cos: ArrayView2<T>, margin: Margins) -> Result<(Array2<T>, f64)> {
    let out = logits_buffer("cos", cos.nrows(), cos.ncols())?;
    check_cos(cos)?;
    let s = fixed_scale(margin, cos.nrows())?;
    check_logit_range::<T>(margin, s, "s")?;
    let out = Array2::from_shape_vec(cos.dim(), out).expect("output shape");
    Ok((out, s))
}

/// `s * cos` with `s * psi(cos_iy)` on each row's target (and a hard-negative margin's
/// `s * h(cos)` on its non-targets): the margin on a cosine matrix computed by any GEMM.
pub fn apply_margin<'m, T: Real>(
    cos: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
) -> Result<Array2<T>> {
    let margin = margin.into();
    let (mut out, s) = cos_output(cos, margin)?;
    let target = check_labels(labels, cos.nrows(), cos.ncols())?;
    let st = T::of(s);
    out.zip_mut_with(&cos, |o, &v| *o = st * v.max(-T::one()).min(T::one()));
    for (i, y) in target.iter().enumerate() {
        if let Some(y) = *y {
            let cy = cos[[i, y]].f64();
            if let Some(hard) = margin.row(i).hard_negatives(cy) {
                let rule = nontarget_rule::<f64>(None, Some(hard));
                for (o, &c) in out.row_mut(i).iter_mut().zip(cos.row(i)) {
                    *o = T::of(s * rule.apply(c.f64().clamp(-1.0, 1.0)).0);
                }
            }
            out[[i, y]] = T::of(s * margin.row(i).psi(cy));
        }
    }
    Ok(out)
}

/// Backward of [`apply_margin`]: dL/dcos from dL/dlogits.
pub fn apply_margin_backward<'m, T: Real>(
    grad_logits: ArrayView2<T>,
    cos: ArrayView2<T>,
    labels: &[i64],
    margin: impl Into<Margins<'m>>,
) -> Result<Array2<T>> {
    let margin = margin.into();
    let (mut out, s) = cos_output(cos, margin)?;
    check_shape("grad_logits", grad_logits.dim(), cos.dim())?;
    check_finite(grad_logits, "grad_logits")?;
    let target = check_labels(labels, cos.nrows(), cos.ncols())?;
    let st = T::of(s);
    out.zip_mut_with(&grad_logits, |o, &g| *o = g * st);
    for (i, y) in target.iter().enumerate() {
        if let Some(y) = *y {
            if let Some(hard) = margin.row(i).hard_negatives(cos[[i, y]].f64()) {
                let rule = nontarget_rule::<f64>(None, Some(hard));
                for (o, &c) in out.row_mut(i).iter_mut().zip(cos.row(i)) {
                    *o *= T::of(rule.apply(c.f64().clamp(-1.0, 1.0)).1);
                }
            }
            let d = s * margin.row(i).dpsi(cos[[i, y]].f64());
            out[[i, y]] = T::of(grad_logits[[i, y]].f64() * d);
        }
    }
    Ok(out)
}
