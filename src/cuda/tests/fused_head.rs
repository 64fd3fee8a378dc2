//! The fused head on the emulator against the CPU head: margins, filters, sub-centres,
//! per-row margins, shards, bad rows (how a call is cut: `tiling`).

use super::*;

/// The fused head on the emulator, as one shard of a sharded head when `shard` is given.
#[allow(clippy::too_many_arguments)]
pub(super) fn emulate<T: Real>(
    emb: &Array2<T>,
    weight: &Array2<T>,
    labels: &[i64],
    margin: Margins,
    filter: HeadOptions,
    row_weight: &[f64],
    want: (bool, bool),
    tiling: Tiling,
    shard: Option<&mut head::ShardHooks>,
) -> Emulated<T> {
    let blocks: Vec<f64> = match margin {
        Margins::Same(m) => m.encode().to_vec(),
        Margins::PerRow(ms) => ms.iter().flat_map(Margin::encode).collect(),
    };
    let ((b, d), c) = (emb.dim(), weight.nrows());
    let elem = if std::mem::size_of::<T>() == 8 {
        Elem::F64
    } else {
        Elem::F32
    };
    let shape = HeadShape {
        k: filter.sub_centers,
        ..HeadShape::exact(b, c, d, elem)
    };
    let mut row_loss = vec![f64::NAN; b];
    // garbage in the outputs must not leak into the results
    let mut grad_emb = Array2::from_elem((b, d), T::of(f64::NAN));
    let mut grad_weight = Array2::from_elem((c, d), T::of(f64::NAN));
    let mut bad = [0i32; 3]; // the caller zeroes the flags
    let stash_classes = shard.as_ref().map_or(c, |sh| sh.stash_classes);
    let mut workspace =
        vec![u64::MAX; head::workspace_bytes_shard(shape, want.1, tiling, stash_classes) / 8 + 1];
    let addr = |p: *const T| p as u64;
    let buffers = HeadBuffers {
        emb: addr(emb.as_ptr()),
        weight: addr(weight.as_ptr()),
        labels: labels.as_ptr() as u64,
        row_weight: row_weight.as_ptr() as u64,
        margins: blocks.as_ptr() as u64,
        per_row_margins: matches!(margin, Margins::PerRow(_)),
        row_loss: row_loss.as_mut_ptr() as u64,
        grad_emb: if want.0 {
            addr(grad_emb.as_mut_ptr())
        } else {
            0
        },
        grad_weight: if want.1 {
            addr(grad_weight.as_mut_ptr())
        } else {
            0
        },
        bad: bad.as_mut_ptr() as u64,
        workspace: workspace.as_mut_ptr() as u64,
    };
    match shard {
        None => head::margin_loss(
            Emulator::get(),
            shape,
            margin.row(0),
            filter,
            &buffers,
            tiling,
        ),
        Some(sh) => head::margin_loss_shard(
            Emulator::get(),
            shape,
            margin.row(0),
            filter,
            &buffers,
            tiling,
            sh,
        ),
    }
    .unwrap();
    Emulated {
        row_loss,
        grad_emb: want.0.then_some(grad_emb),
        grad_weight: want.1.then_some(grad_weight),
        bad,
    }
}

fn assert_close<T: Real>(what: &str, got: &Array2<T>, want: &Array2<T>, tol: f64) {
    let scale = want
        .iter()
        .fold(0.0f64, |m, v| m.max(v.f64().abs()))
        .max(1e-12);
    for ((i, g), w) in got.indexed_iter().zip(want) {
        let err = (g.f64() - w.f64()).abs() / scale;
        assert!(
            err <= tol,
            "{what}{i:?}: {} vs {} (error {err:e})",
            g.f64(),
            w.f64()
        );
    }
}

/// The emulated GPU head equals the CPU head: row losses, both gradients.
pub(super) fn check<'m, T: Real>(
    b: usize,
    c: usize,
    d: usize,
    margin: impl Into<Margins<'m>>,
    tiling: Tiling,
    tol: f64,
) {
    check_with::<T>(b, c, d, margin.into(), HeadOptions::default(), tiling, tol)
}

/// [`check`] with an inter-class filter.
fn check_with<T: Real>(
    b: usize,
    c: usize,
    d: usize,
    margin: Margins,
    head: HeadOptions,
    tiling: Tiling,
    tol: f64,
) {
    let classes = c / head.sub_centers;
    let mut labels: Vec<i64> = (0..b).map(|i| ((i * 7 + 3) % classes) as i64).collect();
    labels[b / 2] = -1;
    check_labels::<T>(&labels, c, d, margin, head, tiling, tol)
}

/// [`check_with`] with these labels (one per row).
fn check_labels<T: Real>(
    labels: &[i64],
    c: usize,
    d: usize,
    margin: Margins,
    head: HeadOptions,
    tiling: Tiling,
    tol: f64,
) {
    let b = labels.len();
    let emb = matrix::<T>(1 + b as u64, b, d).mapv(|v| v * T::of(3.0));
    let weight = matrix::<T>(2 + c as u64, c, d);
    check_problem(&emb, &weight, labels, margin, head, tiling, tol)
}

/// [`check_labels`] on these embeddings and class centres.
fn check_problem<T: Real>(
    emb: &Array2<T>,
    weight: &Array2<T>,
    labels: &[i64],
    margin: Margins,
    head: HeadOptions,
    tiling: Tiling,
    tol: f64,
) {
    let (b, c, d) = (emb.nrows(), weight.nrows(), emb.ncols());
    let up: Vec<f64> = noise(5, b).iter().map(|v| 1.5 + v).collect();
    let row_weight: Vec<f64> = labels
        .iter()
        .zip(&up)
        .map(|(&y, &u)| if y < 0 { 0.0 } else { u })
        .collect();
    let options = LossOptions {
        reduction: Reduction::None,
        upstream: Some(&up),
        grad_emb: true,
        grad_weight: true,
        head,
        grad_filter: crate::head::GradFilter::Exact,
    };
    let cpu = margin_loss_with(emb.view(), weight.view(), labels, margin, options).unwrap();
    for want in [(true, true), (true, false), (false, true), (false, false)] {
        let gpu = emulate(
            emb,
            weight,
            labels,
            margin,
            head,
            &row_weight,
            want,
            tiling,
            None,
        );
        let ctx = format!("{margin:?} {head:?} b={b} c={c} d={d} {tiling:?} {want:?}: ");
        assert_eq!(gpu.bad, [0, 0, 0], "{ctx}");
        for (i, (g, w)) in gpu.row_loss.iter().zip(&cpu.row_losses).enumerate() {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "{ctx}row {i}: {g} vs {w}"
            );
        }
        if let Some(g) = &gpu.grad_emb {
            assert_close(
                &format!("{ctx}grad_emb"),
                g,
                cpu.grad_emb.as_ref().unwrap(),
                tol,
            );
        }
        if let Some(g) = &gpu.grad_weight {
            assert_close(
                &format!("{ctx}grad_weight"),
                g,
                cpu.grad_weight.as_ref().unwrap(),
                tol,
            );
        }
    }
}

pub(super) fn margins() -> Vec<Margin> {
    vec![
        Margin::arcface(64.0, 0.5, false).unwrap(),
        Margin::arcface(30.0, 0.5, true).unwrap(),
        Margin::cosface(64.0, 0.35).unwrap(),
        Margin::sphereface(4, None, 5.0).unwrap(),
        Margin::combined(64.0, 1.0, 0.3, 0.2).unwrap(),
        Margin::softmax(30.0).unwrap(),
        Margin::adaface(64.0, 0.4, -0.5).unwrap(),
        Margin::magface(30.0, (1.0, 8.0), (0.45, 0.8), false, 3.0).unwrap(),
        Margin::magface(30.0, (1.0, 8.0), (0.45, 0.8), true, 35.0).unwrap(),
        Margin::curricularface(30.0, 0.5, 0.4).unwrap(),
        Margin::mvsoftmax(30.0, 0.2, 1.2, false).unwrap(),
        Margin::mvsoftmax(30.0, 0.4, 1.12, true).unwrap(),
    ]
}

#[test]
fn head_equals_the_cpu_head_with_interclass_filtering() {
    let tiling = Tiling {
        class_tile: 7,
        stash_budget_bytes: 1 << 20,
        ..Tiling::default()
    };
    let filter = HeadOptions {
        sub_centers: 1,
        interclass_filter: Some(0.05),
    };
    let arc = Margin::arcface(64.0, 0.5, false).unwrap();
    let curricular = Margin::curricularface(30.0, 0.5, 0.4).unwrap();
    for margin in [&arc, &curricular] {
        check_with::<f64>(5, 23, 8, margin.into(), filter, tiling, 1e-10);
        check_with::<f32>(5, 23, 8, margin.into(), filter, tiling, 2e-4);
        check_with::<f64>(
            11,
            19,
            4,
            margin.into(),
            filter,
            Tiling {
                class_tile: 5,
                stash_budget_bytes: 3 * 19 * 8,
                ..Tiling::default()
            },
            1e-10,
        );
    }
    // one centre per class only
    let emb = matrix::<f64>(3, 4, 8);
    let weight = matrix::<f64>(4, 10, 8);
    let k2 = HeadOptions {
        sub_centers: 2,
        interclass_filter: None,
    };
    let shape = HeadShape::exact(4, 10, 8, Elem::F64);
    let buffers = HeadBuffers {
        emb: emb.as_ptr() as u64,
        weight: weight.as_ptr() as u64,
        labels: 0,
        row_weight: 0,
        margins: 0,
        per_row_margins: false,
        row_loss: 0,
        grad_emb: 0,
        grad_weight: 0,
        bad: 0,
        workspace: 0,
    };
    let err = head::margin_loss(Emulator::get(), shape, &arc, k2, &buffers, tiling).unwrap_err();
    assert_eq!(err.arg, "sub_centers");
}

#[test]
fn head_equals_the_cpu_head_with_sub_centres() {
    // a class's cosine is its closest centre's; only that centre gets a gradient. Tiles of 7
    // weight rows round down to whole classes (6 rows for K = 2 and 3); B <= D keeps the
    // stash in dW, B > D cuts rows into chunks.
    let arc = Margin::arcface(32.0, 0.5, false).unwrap();
    let curricular = Margin::curricularface(30.0, 0.5, 0.4).unwrap();
    for k in [2, 3] {
        for filter in [None, Some(0.05)] {
            let head = HeadOptions {
                sub_centers: k,
                interclass_filter: filter,
            };
            for margin in [&arc, &curricular] {
                for (b, d, budget) in [(5, 8, 1 << 20), (11, 4, 3 * 12 * 3 * 8)] {
                    let tiling = Tiling {
                        class_tile: 7,
                        stash_budget_bytes: budget,
                        ..Tiling::default()
                    };
                    check_with::<f64>(b, 12 * k, d, margin.into(), head, tiling, 1e-10);
                }
                let tiling = Tiling {
                    class_tile: 7,
                    stash_budget_bytes: 1 << 20,
                    ..Tiling::default()
                };
                check_with::<f32>(5, 12 * k, 8, margin.into(), head, tiling, 2e-4);
            }
        }
    }
}

#[test]
fn head_equals_the_cpu_head_with_rows_sharing_a_target() {
    // 12 rows over 3 or 5 classes: several rows of a chunk share a target centre, whose
    // dW terms one block adds for all of them (target_grads); with sub-centres they may
    // share the class but not the centre. B <= D (stash in dW) and B > D (row chunks).
    for (k, c) in [(1, 3), (1, 5), (2, 10)] {
        let head = HeadOptions {
            sub_centers: k,
            interclass_filter: None,
        };
        // every margin's target term is covered by the others; these are ones whose ψ' or
        // scale differs per row (sphere, MagFace's feature norm) or that add hard negatives
        let all = margins();
        for margin in [0, 3, 7, 9].map(|i| all[i]) {
            for (d, budget) in [(16, 1 << 20), (6, 5 * c * 8)] {
                let tiling = Tiling {
                    class_tile: 2 * k,
                    stash_budget_bytes: budget,
                    ..Tiling::default()
                };
                check_with::<f64>(12, c, d, (&margin).into(), head, tiling, 1e-10);
            }
        }
    }
}

#[test]
fn head_equals_the_cpu_head_with_four_columns_a_load() {
    // Tiles of 8 classes: the logits and gradient passes take four columns per access (the
    // last tile of 23 classes, 7 wide, and sub-centres' logits go one by one); the targets
    // fall at every position of a quad. B <= D (stash in dW) and B > D (row chunks).
    for (b, d, budget) in [(5, 8, 1 << 20), (11, 4, 3 * 8 * 24)] {
        let tiling = Tiling {
            class_tile: 8,
            stash_budget_bytes: budget,
            ..Tiling::default()
        };
        // the margins' math is shared with the one-by-one loops: a plain, a feature-norm
        // and two hard-negative rules cover what the quads change
        let some = [
            Margin::arcface(64.0, 0.5, false).unwrap(),
            Margin::sphereface(4, None, 5.0).unwrap(),
            Margin::curricularface(30.0, 0.5, 0.4).unwrap(),
            Margin::mvsoftmax(30.0, 0.4, 1.12, true).unwrap(),
        ];
        for margin in &some {
            check::<f64>(b, 23, d, margin, tiling, 1e-10);
            check::<f64>(b, 24, d, margin, tiling, 1e-10);
            check::<f32>(b, 24, d, margin, tiling, 2e-4);
        }
        let head = HeadOptions {
            sub_centers: 2,
            interclass_filter: Some(0.05),
        };
        let arc = Margin::arcface(32.0, 0.5, false).unwrap();
        check_with::<f64>(b, 24, d, (&arc).into(), head, tiling, 1e-10);
    }
}

#[test]
fn head_equals_the_cpu_head_with_tiles_wider_than_a_block_s_loads() {
    // A thread of the logits pass loads four quads (block size apart) before it uses any:
    // tiles of 4616 classes (1154 quads) take one full step of 1024 quads and a partial
    // one; the last tile is 24 wide. Targets sit in each of a thread's four quads, in the
    // second step, in the last quad and in the short tile.
    let tiling = Tiling {
        class_tile: 4616,
        stash_budget_bytes: 1 << 20,
        ..Tiling::default()
    };
    let c = 2 * 4616 + 24;
    let labels = [1030, 3001, -1, 4100, 4615, 4616 + 3502, 2 * 4616 + 21];
    let none = HeadOptions::default();
    let arc = Margin::arcface(64.0, 0.5, false).unwrap();
    // B <= D: the stash in dW; B > D: row chunks
    for d in [8, 4] {
        check_labels::<f32>(&labels, c, d, (&arc).into(), none, tiling, 2e-4);
    }
    let curricular = Margin::curricularface(30.0, 0.5, 0.4).unwrap();
    check_labels::<f64>(&labels, c, 8, (&curricular).into(), none, tiling, 1e-10);
}

#[test]
fn a_target_logit_far_above_its_tile_s_others_sets_the_tile_max() {
    // cos = 1 at the target and -1 at the seven other classes: the target logit (64 cos 0.5,
    // 56) is 120 above the others, past float32's exp range, so a tile max that missed it
    // would overflow (a plain row's max is taken over its non-target cosines, then the
    // target logit). Tiles of 4: the target's and one without it.
    let x = matrix::<f32>(7, 1, 8);
    let weight = Array2::from_shape_fn(
        (8, 8),
        |(j, col)| {
            if j == 1 {
                x[[0, col]]
            } else {
                -x[[0, col]]
            }
        },
    );
    let tiling = Tiling {
        class_tile: 4,
        stash_budget_bytes: 1 << 20,
        ..Tiling::default()
    };
    let arc = Margin::arcface(64.0, 0.5, false).unwrap();
    let none = HeadOptions::default();
    check_problem(&x, &weight, &[1], (&arc).into(), none, tiling, 2e-4);
}

#[test]
fn head_equals_the_cpu_head_over_weight_row_lengths() {
    // The passes over the weight (inverse norms, the projection of dW) move 16 bytes a lane
    // where a row is a whole number of such accesses and keep a row of up to 8 of them a lane
    // in registers; other lengths go element by element: d = 3 and 6 (float32) and 3
    // (float64) one by one, 12 by vectors, 1030 and 2052 by vectors but projected from
    // memory (float32's 1030 one by one). B > D for d = 3 (row chunks), else B <= D.
    let arc = Margin::arcface(64.0, 0.5, false).unwrap();
    let tiling = Tiling {
        class_tile: 8,
        stash_budget_bytes: 1 << 20,
        ..Tiling::default()
    };
    for d in [3, 6, 12, 1030, 2052] {
        check::<f64>(4, 13, d, &arc, tiling, 1e-10);
        check::<f32>(4, 13, d, &arc, tiling, 2e-4);
    }
}

#[test]
fn head_equals_the_cpu_head_with_one_margin_per_row() {
    let tiling = Tiling {
        class_tile: 7,
        stash_budget_bytes: 1 << 20,
        ..Tiling::default()
    };
    let arc: Vec<Margin> = (0..5)
        .map(|i| Margin::arcface(64.0, 0.15 * i as f64, false).unwrap())
        .collect();
    let cos: Vec<Margin> = (0..11)
        .map(|i| Margin::cosface(30.0, 0.05 * i as f64).unwrap())
        .collect();
    check::<f64>(5, 23, 8, &arc, tiling, 1e-10);
    check::<f32>(5, 23, 8, &arc, tiling, 2e-4);
    check::<f64>(11, 19, 4, &cos, tiling, 1e-10);
}

/// The margins' switch in kernels.cu equals margin.rs on a dense grid of cosines (the
/// margin-grid agreement test; the plain-PyTorch side is tests/core/test_margin_grid.py).
#[test]
fn kernel_margins_equal_the_core_on_a_dense_grid() {
    // every margin of margin.rs's own tests, the head tests' list, and a steeper MagFace
    let mut every = crate::margin::tests::all_margins();
    every.extend(margins());
    every.push(Margin::magface(64.0, (10.0, 60.0), (0.45, 1.2), false, 35.0).unwrap());
    for &(_, code) in kind::NAMES {
        assert!(
            every.iter().any(|m| m.kind() == code),
            "kind {code} untested"
        );
    }
    let n = 4001;
    let mut c: Vec<f64> = (0..n)
        .map(|i| (std::f64::consts::PI * i as f64 / (n - 1) as f64).cos())
        .collect();
    c.extend([1.0, -1.0, 0.0, 1e-300, -1e-300, 1.0 - 1e-16, -1.0 + 1e-16]);
    let norms: Vec<f64> = (0..c.len()).map(|i| 0.5 + (i % 127) as f64).collect();
    for margin in every {
        let block = margin.encode();
        assert_eq!(block.len(), PARAMS_LEN);
        let (mut psi, mut dpsi) = (vec![f64::NAN; c.len()], vec![f64::NAN; c.len()]);
        let mut dnorm = vec![f64::NAN; c.len()];
        use crate::cuda::device::Arg::{Ptr, I32};
        Emulator::get()
            .launch(
                "margin_grid",
                c.len().div_ceil(128),
                128,
                &[
                    Ptr(block.as_ptr() as u64),
                    Ptr(c.as_ptr() as u64),
                    Ptr(norms.as_ptr() as u64),
                    I32(c.len() as i32),
                    Ptr(psi.as_mut_ptr() as u64),
                    Ptr(dpsi.as_mut_ptr() as u64),
                    Ptr(dnorm.as_mut_ptr() as u64),
                ],
            )
            .unwrap();
        for i in 0..c.len() {
            let want = margin.target(c[i], RowContext { norm: norms[i] });
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
            assert!(
                close(psi[i], want.psi)
                    && close(dpsi[i], want.dpsi)
                    && close(dnorm[i], want.dpsi_dnorm),
                "{margin:?} at c={} norm={}: kernel ({}, {}, {}) core {want:?}",
                c[i],
                norms[i],
                psi[i],
                dpsi[i],
                dnorm[i],
            );
        }
    }
}

/// The classes of `weight` cut into the shards `bounds`, each run by one thread on the
/// emulator as one rank of a sharded head, meeting in `combine` as ranks would in a
/// collective; returns each shard's result.
fn emulate_shards<T: Real>(
    emb: &Array2<T>,
    weight: &Array2<T>,
    labels: &[i64],
    margin: Margins,
    row_weight: &[f64],
    bounds: &[usize],
    tiling: Tiling,
) -> Vec<Emulated<T>> {
    use crate::head::{RowPart, REMOTE_TARGET};
    use std::sync::{Barrier, Mutex};
    let shards = bounds.len() - 1;
    let largest = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    // every row's target cosine, as the sharded head gathers it (hard negatives)
    let xhat = emb.mapv(|v| v.f64());
    let target_cos: Vec<f64> = labels
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            if y < 0 {
                return f64::NAN;
            }
            let (x, w) = (xhat.row(i), weight.row(y as usize).mapv(|v| v.f64()));
            x.dot(&w) / (x.dot(&x).sqrt() * w.dot(&w).sqrt())
        })
        .collect();
    let slots = Mutex::new(vec![Vec::<RowPart>::new(); shards]);
    let barrier = Barrier::new(shards);
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..shards)
            .map(|r| {
                let (lo, hi) = (bounds[r], bounds[r + 1]);
                let (slots, barrier, target_cos) = (&slots, &barrier, &target_cos);
                scope.spawn(move || {
                    let local: Vec<i64> = labels
                        .iter()
                        .map(|&y| match y {
                            -1 => -1,
                            y if (lo as i64..hi as i64).contains(&y) => y - lo as i64,
                            _ => REMOTE_TARGET,
                        })
                        .collect();
                    let mut parts = vec![f64::NAN; 4 * labels.len()];
                    let parts_at = parts.as_mut_ptr() as u64;
                    let mut combine = |start: usize, rows: usize| -> crate::Result<()> {
                        // SAFETY: `parts` outlives the call and nothing else touches these
                        // rows while the (emulated, synchronous) stream waits for us.
                        let mine = unsafe {
                            std::slice::from_raw_parts_mut(
                                (parts_at as *mut f64).add(4 * start),
                                4 * rows,
                            )
                        };
                        let as_part = |p: &[f64]| RowPart {
                            max: p[0],
                            sum: p[1],
                            sum_ez: p[2],
                            target_logit: p[3],
                        };
                        slots.lock().unwrap()[r] = mine.chunks(4).map(as_part).collect();
                        barrier.wait();
                        let all = slots.lock().unwrap().clone();
                        barrier.wait();
                        for (i, out) in mine.chunks_mut(4).enumerate() {
                            let m = all
                                .iter()
                                .fold(RowPart::EMPTY, |acc, shard| acc.merge(shard[i]));
                            out.copy_from_slice(&[m.max, m.sum, m.sum_ez, m.target_logit]);
                        }
                        Ok(())
                    };
                    let mut hooks = head::ShardHooks {
                        stash_classes: largest,
                        first_shard: r == 0,
                        target_cos: target_cos.as_ptr() as u64,
                        parts: parts_at,
                        combine: &mut combine,
                    };
                    let w = weight.slice(ndarray::s![lo..hi, ..]).to_owned();
                    emulate(
                        emb,
                        &w,
                        &local,
                        margin,
                        HeadOptions::default(),
                        row_weight,
                        (true, true),
                        tiling,
                        Some(&mut hooks),
                    )
                })
            })
            .collect();
        runs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn sharded_head_equals_the_whole_cpu_head() {
    // uneven shards; the stash in the gradient (B <= D) and many row chunks (B > D)
    for (b, d, budget) in [(9, 12, 1 << 20), (11, 4, 3 * 8 * 8)] {
        let c = 23;
        let tiling = Tiling {
            class_tile: 5,
            stash_budget_bytes: budget,
            ..Tiling::default()
        };
        let emb = matrix::<f64>(7, b, d).mapv(|v| v * 3.0);
        let weight = matrix::<f64>(8, c, d);
        let mut labels: Vec<i64> = (0..b).map(|i| ((i * 5 + 2) % c) as i64).collect();
        labels[1] = -1;
        let up: Vec<f64> = noise(9, b).iter().map(|v| 1.5 + v).collect();
        let row_weight: Vec<f64> = labels
            .iter()
            .zip(&up)
            .map(|(&y, &u)| if y < 0 { 0.0 } else { u })
            .collect();
        // (SphereFace's scale is the feature norm: the first shard's term)
        for margin in &margins() {
            let options = LossOptions {
                reduction: Reduction::None,
                upstream: Some(&up),
                grad_emb: true,
                grad_weight: true,
                head: HeadOptions::default(),
                grad_filter: crate::head::GradFilter::Exact,
            };
            let cpu =
                margin_loss_with(emb.view(), weight.view(), &labels, margin, options).unwrap();
            for bounds in [vec![0, 9, c], vec![0, 4, 15, c]] {
                let ctx = format!("{margin:?} b={b} d={d} shards {bounds:?}: ");
                let shards = emulate_shards(
                    &emb,
                    &weight,
                    &labels,
                    margin.into(),
                    &row_weight,
                    &bounds,
                    tiling,
                );
                let mut grad_emb = Array2::<f64>::zeros((b, d));
                for (r, shard) in shards.iter().enumerate() {
                    assert_eq!(shard.bad, [0, 0, 0], "{ctx}");
                    for (i, (g, w)) in shard.row_loss.iter().zip(&cpu.row_losses).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-10 * w.abs().max(1.0),
                            "{ctx}row {i}: {g} vs {w}"
                        );
                    }
                    grad_emb += shard.grad_emb.as_ref().unwrap();
                    let want = cpu
                        .grad_weight
                        .as_ref()
                        .unwrap()
                        .slice(ndarray::s![bounds[r]..bounds[r + 1], ..])
                        .to_owned();
                    assert_close(
                        &format!("{ctx}grad_weight {r}"),
                        shard.grad_weight.as_ref().unwrap(),
                        &want,
                        1e-10,
                    );
                }
                assert_close(
                    &format!("{ctx}grad_emb"),
                    &grad_emb,
                    cpu.grad_emb.as_ref().unwrap(),
                    1e-10,
                );
            }
        }
    }
}

#[test]
fn head_flags_bad_rows_instead_of_failing() {
    let mut emb = matrix::<f64>(3, 4, 8);
    let mut weight = matrix::<f64>(4, 9, 8);
    emb.row_mut(2).fill(0.0);
    weight[[5, 1]] = f64::NAN;
    let labels = [0i64, 1, 2, 3];
    let margin = Margin::arcface(64.0, 0.5, false).unwrap();
    let gpu = emulate(
        &emb,
        &weight,
        &labels,
        (&margin).into(),
        HeadOptions::default(),
        &[1.0; 4],
        (true, true),
        Tiling::default(),
        None,
    );
    assert_eq!(gpu.bad, [3, 6, 0]);
}

#[test]
fn head_refuses_empty_shapes_before_any_launch() {
    let margin = Margin::arcface(64.0, 0.5, false).unwrap();
    for (b, c, d) in [(0, 5, 4), (3, 0, 4), (3, 5, 0)] {
        let shape = HeadShape::exact(b, c, d, Elem::F32);
        // sizing the workspace of such a call must not panic either
        let _ = head::workspace_bytes(shape, true, Tiling::default());
        let buffers = HeadBuffers {
            emb: 0,
            weight: 0,
            labels: 0,
            row_weight: 0,
            margins: 0,
            per_row_margins: false,
            row_loss: 0,
            grad_emb: 0,
            grad_weight: 0,
            bad: 0,
            workspace: 0,
        };
        let err = head::margin_loss(
            Emulator::get(),
            shape,
            &margin,
            Default::default(),
            &buffers,
            Tiling::default(),
        );
        assert_eq!(err.unwrap_err().arg, "emb", "{b} {c} {d}");
    }
}
