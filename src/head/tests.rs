use super::*;
use crate::margin::Margin;

fn problem(b: usize, d: usize, c: usize, seed: u64) -> (Array2<f64>, Array2<f64>, Vec<i64>) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let emb = Array2::from_shape_fn((b, d), |_| next());
    let weight = Array2::from_shape_fn((c, d), |_| next());
    let labels = (0..b)
        .map(|i| {
            if i % 7 == 3 {
                -1
            } else {
                ((next() + 1.0) * 0.5 * c as f64) as i64 % c as i64
            }
        })
        .collect();
    (emb, weight, labels)
}

/// Loss and gradients through the unfused path: logits, an explicit softmax, and
/// margin_logits_backward.
fn unfused(
    emb: &Array2<f64>,
    weight: &Array2<f64>,
    labels: &[i64],
    margin: &Margin,
) -> (f64, Array2<f64>, Array2<f64>) {
    unfused_with(emb, weight, labels, margin, HeadOptions::default())
}

/// The loss from the whole logits and its gradients through their backward.
fn unfused_with(
    emb: &Array2<f64>,
    weight: &Array2<f64>,
    labels: &[i64],
    margin: &Margin,
    head: HeadOptions,
) -> (f64, Array2<f64>, Array2<f64>) {
    let z = margin_logits_with(emb.view(), weight.view(), labels, margin, head).unwrap();
    let n = labels.iter().filter(|&&y| y >= 0).count() as f64;
    let mut grad = Array2::zeros(z.dim());
    let mut loss = 0.0;
    for (i, &y) in labels.iter().enumerate() {
        if y < 0 {
            continue;
        }
        let row = z.row(i);
        let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss += (lse - row[y as usize]) / n;
        for j in 0..z.ncols() {
            grad[[i, j]] = (row[j] - lse).exp() / n;
        }
        grad[[i, y as usize]] -= 1.0 / n;
    }
    let (ge, gw) =
        margin_logits_backward_with(grad.view(), emb.view(), weight.view(), labels, margin, head)
            .unwrap();
    (loss, ge, gw)
}

/// The heads whose tiles stash cosines: hard negatives, filtering, sub-centres, alone
/// and together, with a fixed and a feature-norm scale.
fn general_cases() -> Vec<(Margin, HeadOptions)> {
    let head = |k: usize, f: Option<f64>| HeadOptions {
        sub_centers: k,
        interclass_filter: f,
    };
    let arc = Margin::arcface(30.0, 0.5, false).unwrap();
    let curricular = Margin::curricularface(30.0, 0.5, 0.2).unwrap();
    let mv = Margin::mvsoftmax(20.0, 0.35, 1.12, false).unwrap();
    let mv_arc = Margin::mvsoftmax(20.0, 0.4, 1.2, true).unwrap();
    let sphere = Margin::sphereface(4, None, 1.0).unwrap();
    vec![
        (curricular, head(1, None)),
        (mv, head(1, None)),
        (mv_arc, head(1, None)),
        (arc, head(1, Some(0.1))),
        (arc, head(3, None)),
        (curricular, head(2, Some(0.2))),
        (sphere, head(2, None)),
    ]
}

#[test]
fn general_heads_match_unfused_on_every_stash_layout() {
    for (margin, head) in general_cases() {
        let k = head.sub_centers;
        for (b, d, c, budget) in [
            (12, 16, 300, STASH_BUDGET_BYTES),
            (40, 8, 300, STASH_BUDGET_BYTES),
            (40, 8, 300, 1),
        ] {
            let (emb, weight, labels) = problem(b, d, c * k, (b * d + c) as u64);
            let labels: Vec<i64> = labels.iter().map(|&y| y.min(c as i64 - 1)).collect();
            let options = LossOptions {
                head,
                ..LossOptions::new(Reduction::Mean)
            };
            let out = fused_loss(
                emb.view(),
                weight.view(),
                &labels,
                (&margin).into(),
                options,
                budget,
                None,
            )
            .unwrap();
            let (loss, ge, gw) = unfused_with(&emb, &weight, &labels, &margin, head);
            let what = format!("{margin:?} {head:?} {b}x{d} budget {budget}");
            assert!((out.loss - loss).abs() < 1e-10 * loss.abs(), "{what}");
            assert!(max_rel(&out.grad_emb.unwrap(), &ge) < 1e-10, "{what}");
            assert!(max_rel(&out.grad_weight.unwrap(), &gw) < 1e-10, "{what}");
        }
    }
}

#[test]
fn general_heads_match_finite_differences() {
    for (margin, head) in general_cases() {
        let k = head.sub_centers;
        let (emb, weight, labels) = problem(6, 8, 13 * k, 91);
        let labels: Vec<i64> = labels.iter().map(|&y| y.min(12)).collect();
        let options = LossOptions {
            head,
            ..LossOptions::new(Reduction::Mean)
        };
        let loss = |e: &Array2<f64>, w: &Array2<f64>| {
            margin_loss_with(e.view(), w.view(), &labels, &margin, options)
                .unwrap()
                .loss
        };
        let out = margin_loss_with(emb.view(), weight.view(), &labels, &margin, options).unwrap();
        let (ge, gw) = (out.grad_emb.unwrap(), out.grad_weight.unwrap());
        let h = 1e-6;
        for i in 0..6 {
            for j in [0, 5] {
                let (mut up, mut down) = (emb.clone(), emb.clone());
                up[[i, j]] += h;
                down[[i, j]] -= h;
                let fd = (loss(&up, &weight) - loss(&down, &weight)) / (2.0 * h);
                let what = format!("{margin:?} {head:?} emb[{i},{j}]");
                assert!((fd - ge[[i, j]]).abs() < 1e-6 * (1.0 + fd.abs()), "{what}");
            }
        }
        for r in [0, 7, 13 * k - 1] {
            let (mut up, mut down) = (weight.clone(), weight.clone());
            up[[r, 3]] += h;
            down[[r, 3]] -= h;
            let fd = (loss(&emb, &up) - loss(&emb, &down)) / (2.0 * h);
            let what = format!("{margin:?} {head:?} weight[{r},3]");
            assert!((fd - gw[[r, 3]]).abs() < 1e-6 * (1.0 + fd.abs()), "{what}");
        }
    }
}

#[test]
fn head_options_are_checked() {
    let (emb, weight, labels) = problem(4, 8, 10, 3);
    let margin = Margin::arcface(30.0, 0.5, false).unwrap();
    for (head, arg) in [
        ((3, None), "weight"),
        ((0, None), "sub_centers"),
        ((256, None), "sub_centers"),
        ((1, Some(f64::NAN)), "interclass_filter"),
        ((1, Some(1.5)), "interclass_filter"),
    ] {
        let options = LossOptions {
            head: HeadOptions {
                sub_centers: head.0,
                interclass_filter: head.1,
            },
            ..LossOptions::new(Reduction::Mean)
        };
        let err =
            margin_loss_with(emb.view(), weight.view(), &labels, &margin, options).unwrap_err();
        assert_eq!(err.arg, arg);
    }
}

/// Per-row margins: each row's loss and gradient row are those of a batch of that row
/// alone with its own margin, and the weight gradient is their sum.
#[test]
fn per_row_margins_equal_one_call_per_row() {
    let (emb, weight, labels) = problem(6, 8, 13, 41);
    let per_row: Vec<Margin> = (0..6)
        .map(|i| Margin::arcface(30.0, 0.1 * i as f64, false).unwrap())
        .collect();
    let out = margin_loss(emb.view(), weight.view(), &labels, &per_row, Reduction::Sum).unwrap();
    let mut grad_weight = Array2::<f64>::zeros(weight.dim());
    for i in 0..6 {
        let one = margin_loss(
            emb.slice(s![i..i + 1, ..]),
            weight.view(),
            &labels[i..i + 1],
            &per_row[i],
            Reduction::Sum,
        )
        .unwrap();
        assert!((out.row_losses[i] - one.row_losses[0]).abs() < 1e-12);
        let (ge, ge1) = (out.grad_emb.as_ref().unwrap(), one.grad_emb.unwrap());
        let diff = (&ge.slice(s![i..i + 1, ..]) - &ge1).mapv(f64::abs);
        assert!(diff.iter().all(|&v| v < 1e-12), "row {i}: {diff}");
        grad_weight += &one.grad_weight.unwrap();
    }
    assert!(max_rel(out.grad_weight.as_ref().unwrap(), &grad_weight) < 1e-12);
    // per-row logits carry each row's own margin on the target
    let z = margin_logits(emb.view(), weight.view(), &labels, &per_row).unwrap();
    for (i, &y) in labels.iter().enumerate() {
        let zi = margin_logits(
            emb.slice(s![i..i + 1, ..]),
            weight.view(),
            &labels[i..i + 1],
            &per_row[i],
        )
        .unwrap();
        assert!(
            max_rel(&z.slice(s![i..i + 1, ..]).to_owned(), &zi) < 1e-12,
            "row {i} y {y}"
        );
    }
    let err = margin_loss(
        emb.view(),
        weight.view(),
        &labels,
        &per_row[..5],
        Reduction::Sum,
    )
    .unwrap_err();
    assert_eq!(err.arg, "margin");
}

fn max_rel(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn fused_matches_unfused_on_every_stash_layout() {
    let margins = [
        Margin::arcface(64.0, 0.5, false).unwrap(),
        Margin::sphereface(4, None, 1.0).unwrap(),
        Margin::combined(30.0, 1.2, 0.3, 0.1).unwrap(),
    ];
    // (B <= D: stash in the gradient), (B > D: own stash, one chunk), (B > D, many chunks)
    for (b, d, c, budget) in [
        (12, 16, 300, STASH_BUDGET_BYTES),
        (40, 8, 300, STASH_BUDGET_BYTES),
        (40, 8, 300, 1),
    ] {
        let (emb, weight, labels) = problem(b, d, c, (b * d + c) as u64);
        for margin in &margins {
            let out = fused_loss(
                emb.view(),
                weight.view(),
                &labels,
                margin.into(),
                LossOptions::new(Reduction::Mean),
                budget,
                None,
            )
            .unwrap();
            let (out_emb, out_w) = (out.grad_emb.unwrap(), out.grad_weight.unwrap());
            let (loss, ge, gw) = unfused(&emb, &weight, &labels, margin);
            assert!(
                (out.loss - loss).abs() < 1e-10 * loss.abs(),
                "{margin:?} {b}x{d}"
            );
            assert!(
                max_rel(&out_emb, &ge) < 1e-10,
                "{margin:?} {b}x{d} budget {budget}"
            );
            assert!(
                max_rel(&out_w, &gw) < 1e-10,
                "{margin:?} {b}x{d} budget {budget}"
            );
        }
    }
}

/// The loss as a function of the embeddings, for central differences.
fn loss_at(emb: &Array2<f64>, weight: &Array2<f64>, labels: &[i64], margin: &Margin) -> f64 {
    margin_loss(emb.view(), weight.view(), labels, margin, Reduction::Mean)
        .unwrap()
        .loss
}

/// MagFace's margin and regulariser follow the norm: the embeddings' gradient (with its
/// radial part) against central differences of the fused loss, and the logits' backward
/// against those of the logits.
#[test]
fn norm_dependent_margins_match_finite_differences() {
    let (emb, weight, labels) = problem(6, 8, 13, 77);
    let margins = [
        Margin::magface(30.0, (1.0, 5.0), (0.45, 0.8), false, 35.0).unwrap(),
        Margin::magface(30.0, (1.0, 5.0), (0.45, 0.8), true, 3.0).unwrap(),
        Margin::adaface(30.0, 0.4, -0.6).unwrap(),
        Margin::arcface(30.0, 0.5, false)
            .unwrap()
            .with_straight_through(false)
            .unwrap(),
    ];
    for margin in &margins {
        let out = margin_loss(emb.view(), weight.view(), &labels, margin, Reduction::Mean).unwrap();
        let ge = out.grad_emb.unwrap();
        let h = 1e-6;
        for i in 0..6 {
            for j in 0..8 {
                let (mut up, mut down) = (emb.clone(), emb.clone());
                up[[i, j]] += h;
                down[[i, j]] -= h;
                let fd = (loss_at(&up, &weight, &labels, margin)
                    - loss_at(&down, &weight, &labels, margin))
                    / (2.0 * h);
                assert!(
                    (fd - ge[[i, j]]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{margin:?} [{i},{j}]: {fd} vs {}",
                    ge[[i, j]]
                );
            }
        }
        // sum of the logits against their backward with an all-ones upstream
        let ones = Array2::<f64>::ones((6, 13));
        let (gl, _) =
            margin_logits_backward(ones.view(), emb.view(), weight.view(), &labels, margin)
                .unwrap();
        let sum_at = |e: &Array2<f64>| {
            margin_logits(e.view(), weight.view(), &labels, margin)
                .unwrap()
                .sum()
        };
        for i in 0..6 {
            let (mut up, mut down) = (emb.clone(), emb.clone());
            up[[i, 0]] += h;
            down[[i, 0]] -= h;
            let fd = (sum_at(&up) - sum_at(&down)) / (2.0 * h);
            assert!(
                (fd - gl[[i, 0]]).abs() < 1e-5 * (1.0 + fd.abs()),
                "{margin:?} logits row {i}: {fd} vs {}",
                gl[[i, 0]]
            );
        }
    }
    // the regulariser is in the loss of every valid row
    let mag = &margins[0];
    let plain = Margin::magface(30.0, (1.0, 5.0), (0.45, 0.8), false, 0.0).unwrap();
    let with = margin_loss(emb.view(), weight.view(), &labels, mag, Reduction::None).unwrap();
    let without = margin_loss(emb.view(), weight.view(), &labels, &plain, Reduction::None).unwrap();
    for (i, &y) in labels.iter().enumerate() {
        let a = emb.row(i).dot(&emb.row(i)).sqrt().clamp(1.0, 5.0);
        let g = if y < 0 {
            0.0
        } else {
            35.0 * (a / 25.0 + 1.0 / a)
        };
        assert!((with.row_losses[i] - without.row_losses[i] - g).abs() < 1e-10);
    }
    let cos = Array2::<f64>::zeros((6, 13));
    let err = apply_margin(cos.view(), &labels, mag).unwrap_err();
    assert_eq!(err.arg, "margin");
}

#[test]
fn float32_fused_is_close_to_float64() {
    let (emb, weight, labels) = problem(64, 32, 1000, 7);
    let margin = Margin::arcface(64.0, 0.5, false).unwrap();
    let f64_out =
        margin_loss(emb.view(), weight.view(), &labels, &margin, Reduction::Mean).unwrap();
    let (e32, w32) = (emb.mapv(|v| v as f32), weight.mapv(|v| v as f32));
    let f32_out = margin_loss(e32.view(), w32.view(), &labels, &margin, Reduction::Mean).unwrap();
    assert!((f32_out.loss - f64_out.loss).abs() < 1e-5 * f64_out.loss);
    assert!(
        max_rel(
            &f32_out.grad_emb.unwrap().mapv(|v| v as f64),
            f64_out.grad_emb.as_ref().unwrap()
        ) < 1e-3
    );
    assert!(
        max_rel(
            &f32_out.grad_weight.unwrap().mapv(|v| v as f64),
            f64_out.grad_weight.as_ref().unwrap()
        ) < 1e-3
    );
}

#[test]
fn skipped_gradients_and_upstream_weights() {
    let (emb, weight, labels) = problem(10, 12, 90, 3);
    let m = Margin::arcface(30.0, 0.4, false).unwrap();
    let full = margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::None).unwrap();
    let (ge, gw) = (full.grad_emb.unwrap(), full.grad_weight.unwrap());
    for (want_emb, want_weight) in [(true, false), (false, true), (false, false)] {
        let opts = LossOptions {
            grad_emb: want_emb,
            grad_weight: want_weight,
            ..LossOptions::new(Reduction::None)
        };
        let out = margin_loss_with(emb.view(), weight.view(), &labels, &m, opts).unwrap();
        assert_eq!(out.row_losses, full.row_losses);
        assert_eq!(out.grad_emb.is_some(), want_emb);
        assert_eq!(out.grad_weight.is_some(), want_weight);
        if let Some(g) = out.grad_emb {
            assert!(max_rel(&g, &ge) < 1e-12);
        }
        if let Some(g) = out.grad_weight {
            assert!(max_rel(&g, &gw) < 1e-12);
        }
    }
    // upstream factors: the gradient of sum_i u_i loss_i, by linearity from single rows
    let up: Vec<f64> = (0..10).map(|i| (i as f64 - 4.5) / 3.0).collect();
    let opts = LossOptions {
        upstream: Some(&up),
        ..LossOptions::new(Reduction::None)
    };
    let weighted = margin_loss_with(emb.view(), weight.view(), &labels, &m, opts).unwrap();
    let mut want = Array2::<f64>::zeros(weight.dim());
    for i in 0..10 {
        let mut only = vec![-1i64; 10];
        only[i] = labels[i];
        let one = margin_loss(emb.view(), weight.view(), &only, &m, Reduction::Sum).unwrap();
        want.scaled_add(up[i], &one.grad_weight.unwrap());
    }
    if want.iter().any(|v| *v != 0.0) {
        assert!(max_rel(&weighted.grad_weight.unwrap(), &want) < 1e-10);
    }
    let bad = LossOptions {
        upstream: Some(&up[..3]),
        ..LossOptions::new(Reduction::None)
    };
    let err = margin_loss_with(emb.view(), weight.view(), &labels, &m, bad).unwrap_err();
    assert_eq!(err.arg, "upstream");
}

#[test]
fn errors_name_the_argument() {
    let (emb, mut weight, labels) = problem(4, 8, 50, 1);
    let m = Margin::cosface(64.0, 0.35).unwrap();
    weight.row_mut(30).fill(0.0);
    let err = margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::Mean).unwrap_err();
    assert_eq!(err.arg, "weight");
    assert!(err.message.contains("row 30"), "{err}");
    weight.row_mut(20)[3] = f64::NAN;
    let err = margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::Sum).unwrap_err();
    assert!(err.message.contains("row 20 contains NaN"), "{err}");
    let bad_labels = vec![0, 1, 50, 2];
    let err = margin_logits(emb.view(), weight.view(), &bad_labels, &m).unwrap_err();
    assert_eq!(err.arg, "labels");
}

#[test]
fn rows_of_any_magnitude_give_the_loss_of_the_unit_rows() {
    let (emb, weight, labels) = problem(6, 8, 40, 4);
    let m = Margin::arcface(32.0, 0.5, false).unwrap();
    let want = margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::Mean).unwrap();
    for scale in [1e-310, 1e-200, 1e200, 1e300] {
        let (mut e, mut w) = (emb.clone(), weight.clone());
        e.row_mut(1).mapv_inplace(|v| v * scale);
        w.row_mut(labels[2] as usize).mapv_inplace(|v| v * scale);
        w.row_mut(7).mapv_inplace(|v| v * scale);
        let got = margin_loss(e.view(), w.view(), &labels, &m, Reduction::Mean).unwrap();
        assert!((got.loss - want.loss).abs() < 1e-9 * want.loss, "{scale}");
        // gradients scale by 1/scale on the scaled rows, exactly where representable
        let (ge, gw) = (got.grad_emb.unwrap(), got.grad_weight.unwrap());
        let (we, ww) = (
            want.grad_emb.as_ref().unwrap(),
            want.grad_weight.as_ref().unwrap(),
        );
        assert!(ge.iter().chain(gw.iter()).all(|v| v.is_finite()), "{scale}");
        if scale >= 1e-300 {
            let back = ge.row(1).mapv(|v| v * scale);
            assert!(
                max_rel(
                    &back.insert_axis(Axis(0)),
                    &we.row(1).to_owned().insert_axis(Axis(0))
                ) < 1e-9
            );
            let back = gw.row(7).mapv(|v| v * scale);
            assert!(
                max_rel(
                    &back.insert_axis(Axis(0)),
                    &ww.row(7).to_owned().insert_axis(Axis(0))
                ) < 1e-9
            );
        }
    }
}

#[test]
fn denormal_float32_rows_are_finite() {
    let (emb, weight, labels) = problem(4, 8, 10, 5);
    let (mut e, mut w) = (emb.mapv(|v| v as f32), weight.mapv(|v| v as f32));
    e.row_mut(0).mapv_inplace(|v| v * 1e-39);
    w.row_mut(3).mapv_inplace(|v| v * 1e-41);
    let m = Margin::cosface(64.0, 0.35).unwrap();
    let got = margin_loss(e.view(), w.view(), &labels, &m, Reduction::Sum).unwrap();
    assert!(got.loss.is_finite());
    let (ge, gw) = (got.grad_emb.unwrap(), got.grad_weight.unwrap());
    assert!(ge.iter().chain(gw.iter()).all(|v| v.is_finite()));
}

#[test]
fn a_scale_beyond_the_dtype_is_refused() {
    let (emb, weight, labels) = problem(3, 4, 5, 6);
    let (e, w) = (emb.mapv(|v| v as f32), weight.mapv(|v| v as f32));
    let m = Margin::arcface(1e39, 0.5, false).unwrap();
    let err = margin_loss(e.view(), w.view(), &labels, &m, Reduction::Mean).unwrap_err();
    assert_eq!(err.arg, "s");
    assert!(err.message.contains("float32"), "{err}");
    assert!(margin_loss(emb.view(), weight.view(), &labels, &m, Reduction::Mean).is_ok());
}

/// Runs the shards of `weight` on threads that meet in `combine` (as processes would in
/// an all-reduce), returning (loss, Σ grad_emb shares, stacked grad_weight).
fn sharded(
    emb: &Array2<f64>,
    weight: &Array2<f64>,
    labels: &[i64],
    margin: &Margin,
    bounds: &[usize],
    budget: usize,
    broken_shard: Option<usize>,
) -> Vec<Result<LossOutput<f64>>> {
    use std::sync::{Barrier, Mutex};
    let world = bounds.len() - 1;
    let slots: Mutex<Vec<(Vec<RowPart>, bool)>> = Mutex::new(vec![(Vec::new(), false); world]);
    let barrier = Barrier::new(world);
    let widest = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (slots, barrier) = (&slots, &barrier);
                scope.spawn(move || {
                    let (lo, hi) = (bounds[r], bounds[r + 1]);
                    let mut w = weight.slice(s![lo..hi, ..]).to_owned();
                    if broken_shard == Some(r) {
                        w.row_mut(0).fill(0.0);
                    }
                    let local: Vec<i64> = labels
                        .iter()
                        .map(|&y| match y {
                            -1 => -1,
                            y if (lo as i64..hi as i64).contains(&y) => y - lo as i64,
                            _ => REMOTE_TARGET,
                        })
                        .collect();
                    let mut combine = |parts: &mut [RowPart], failed: bool| -> Result<()> {
                        slots.lock().unwrap()[r] = (parts.to_vec(), failed);
                        barrier.wait();
                        let all = slots.lock().unwrap().clone();
                        barrier.wait();
                        if all.iter().any(|(_, f)| *f) {
                            return Err(Error::invalid("weight", "a shard failed"));
                        }
                        for (i, part) in parts.iter_mut().enumerate() {
                            let max = all.iter().map(|(p, _)| p[i].max).fold(f64::MIN, f64::max);
                            let scaled = |f: fn(&RowPart) -> f64| -> f64 {
                                all.iter()
                                    .map(|(p, _)| f(&p[i]) * (p[i].max - max).exp())
                                    .sum()
                            };
                            *part = RowPart {
                                max,
                                sum: scaled(|p| p.sum),
                                sum_ez: scaled(|p| p.sum_ez),
                                target_logit: all.iter().map(|(p, _)| p[i].target_logit).sum(),
                            };
                        }
                        Ok(())
                    };
                    let mut options = ShardOptions {
                        stash_classes: widest,
                        first_shard: r == 0,
                        combine: &mut combine,
                        target_cos: None,
                    };
                    fused_loss(
                        emb.view(),
                        w.view(),
                        &local,
                        margin.into(),
                        LossOptions::new(Reduction::Mean),
                        budget,
                        Some(&mut options),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn shards_together_equal_the_whole_head() {
    let margins = [
        Margin::arcface(64.0, 0.5, false).unwrap(),
        Margin::sphereface(4, None, 1.0).unwrap(),
        Margin::cosface(30.0, 0.35).unwrap(),
        Margin::adaface(64.0, 0.4, 0.5).unwrap(),
        Margin::magface(64.0, (1.0, 5.0), (0.45, 0.8), false, 35.0).unwrap(),
    ];
    // stash in the gradient (B <= D), own stash, and many row chunks (uneven shards)
    for (b, d, c, budget, bounds) in [
        (12, 16, 301, STASH_BUDGET_BYTES, vec![0, 100, 301]),
        (40, 8, 300, STASH_BUDGET_BYTES, vec![0, 100, 200, 300]),
        (40, 8, 301, 1, vec![0, 7, 150, 301]),
    ] {
        let (emb, weight, labels) = problem(b, d, c, (b + c) as u64);
        for margin in &margins {
            let whole =
                margin_loss(emb.view(), weight.view(), &labels, margin, Reduction::Mean).unwrap();
            let parts = sharded(&emb, &weight, &labels, margin, &bounds, budget, None);
            let mut grad_emb = Array2::<f64>::zeros(emb.dim());
            for (r, part) in parts.into_iter().enumerate() {
                let part = part.unwrap();
                assert!((part.loss - whole.loss).abs() < 1e-12 * whole.loss.abs());
                grad_emb += part.grad_emb.as_ref().unwrap();
                let want = whole
                    .grad_weight
                    .as_ref()
                    .unwrap()
                    .slice(s![bounds[r]..bounds[r + 1], ..])
                    .to_owned();
                assert!(
                    max_rel(part.grad_weight.as_ref().unwrap(), &want) < 1e-10,
                    "{margin:?}"
                );
            }
            assert!(
                max_rel(&grad_emb, whole.grad_emb.as_ref().unwrap()) < 1e-10,
                "{margin:?} {b}x{d}"
            );
        }
    }
}

#[test]
fn a_failing_shard_stops_every_shard() {
    let (emb, weight, labels) = problem(6, 8, 60, 3);
    let m = Margin::arcface(64.0, 0.5, false).unwrap();
    let out = sharded(
        &emb,
        &weight,
        &labels,
        &m,
        &[0, 30, 60],
        STASH_BUDGET_BYTES,
        Some(1),
    );
    assert_eq!(out[0].as_ref().unwrap_err().message, "a shard failed");
    assert!(out[1]
        .as_ref()
        .unwrap_err()
        .message
        .contains("row 0 is all zeros"));
}
