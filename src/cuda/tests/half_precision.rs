//! The half-precision and TF32 head on the emulator: within its rounding of float64.

use super::*;

/// A matrix in a 16-bit device type, as raw bits.
fn half_bits(m: &Array2<f64>, elem: Elem) -> Vec<u16> {
    m.iter()
        .map(|&v| match elem {
            Elem::Bf16 => half::bf16::from_f64(v).to_bits(),
            _ => half::f16::from_f64(v).to_bits(),
        })
        .collect()
}

struct EmulatedHalf {
    row_loss: Vec<f64>,
    grad_emb: Array2<f32>,
    grad_weight: Array2<f32>,
    bad: [i32; 3],
}

/// The head on the emulator with float32 embeddings: GEMM operands in `elem` (F32, with
/// `tf32` or not, or 16-bit), the weight in float32 (when `weight_f32`) or in `elem`; a
/// float32 emb gradient and the weight gradient in the weight's type (returned widened to
/// float32).
#[allow(clippy::too_many_arguments)]
fn emulate_half(
    emb: &Array2<f64>,
    weight: &Array2<f64>,
    labels: &[i64],
    margin: &Margin,
    (elem, tf32): (Elem, bool),
    weight_f32: bool,
    row_weight: &[f64],
    tiling: Tiling,
) -> EmulatedHalf {
    let ((b, d), c) = (emb.dim(), weight.nrows());
    let shape = HeadShape {
        b,
        c,
        d,
        k: 1,
        elem,
        weight: if weight_f32 { Elem::F32 } else { elem },
        tf32,
    };
    let emb32 = emb.mapv(|v| v as f32);
    let weight32 = weight.mapv(|v| v as f32);
    let weight16 = half_bits(weight, elem);
    let block = margin.encode().to_vec();
    let mut row_loss = vec![f64::NAN; b];
    let mut grad_emb = Array2::from_elem((b, d), f32::NAN);
    // dW comes in the weight's type
    let mut grad_weight = Array2::from_elem((c, d), f32::NAN);
    let mut grad_weight16 = vec![0x7fc0u16; c * d];
    let mut bad = [0i32; 3];
    let mut workspace = vec![u64::MAX; head::workspace_bytes(shape, true, tiling) / 8 + 1];
    let buffers = HeadBuffers {
        emb: emb32.as_ptr() as u64,
        weight: if weight_f32 {
            weight32.as_ptr() as u64
        } else {
            weight16.as_ptr() as u64
        },
        labels: labels.as_ptr() as u64,
        row_weight: row_weight.as_ptr() as u64,
        margins: block.as_ptr() as u64,
        per_row_margins: false,
        row_loss: row_loss.as_mut_ptr() as u64,
        grad_emb: grad_emb.as_mut_ptr() as u64,
        grad_weight: if weight_f32 {
            grad_weight.as_mut_ptr() as u64
        } else {
            grad_weight16.as_mut_ptr() as u64
        },
        bad: bad.as_mut_ptr() as u64,
        workspace: workspace.as_mut_ptr() as u64,
    };
    head::margin_loss(
        Emulator::get(),
        shape,
        margin,
        HeadOptions::default(),
        &buffers,
        tiling,
    )
    .unwrap();
    if !weight_f32 {
        let widen = |bits: u16| match elem {
            Elem::Bf16 => half::bf16::from_bits(bits).to_f32(),
            _ => half::f16::from_bits(bits).to_f32(),
        };
        grad_weight =
            Array2::from_shape_vec((c, d), grad_weight16.into_iter().map(widen).collect()).unwrap();
    }
    EmulatedHalf {
        row_loss,
        grad_emb,
        grad_weight,
        bad,
    }
}

/// Largest error over the largest magnitude of the reference.
fn relative_error<A: Real, B: Real>(got: &Array2<A>, want: &Array2<B>) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.f64().abs()));
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g.f64() - w.f64()).abs()))
        / scale.max(1e-300)
}

#[test]
fn half_precision_head_is_within_its_rounding_of_the_float64_head() {
    // 16-bit operands carry 8 (bfloat16) or 11 (float16) significant bits: the head must
    // agree with the exact one to about that, over tiles, the stash in dW (B <= D) and
    // outside it (B > D, row chunks), and a float32 or 16-bit weight.
    for (b, c, d, tiling) in [
        (
            6,
            37,
            16,
            Tiling {
                class_tile: 8,
                stash_budget_bytes: 1 << 20,
                ..Tiling::default()
            },
        ),
        (
            12,
            29,
            8,
            Tiling {
                class_tile: 7,
                stash_budget_bytes: 5 * 29 * 2,
                ..Tiling::default()
            },
        ),
        // 12 columns: a float32 weight's rows go by 16-byte accesses, a 16-bit one's
        // (8 elements an access) one element at a time
        (
            3,
            11,
            12,
            Tiling {
                class_tile: 4,
                stash_budget_bytes: 1 << 20,
                ..Tiling::default()
            },
        ),
    ] {
        let emb = matrix::<f64>(11, b, d).mapv(|v| v * 3.0);
        let weight = matrix::<f64>(12, c, d);
        let mut labels: Vec<i64> = (0..b).map(|i| ((i * 5 + 1) % c) as i64).collect();
        labels[1] = -1;
        let row_weight: Vec<f64> = labels
            .iter()
            .map(|&y| if y < 0 { 0.0 } else { 0.25 })
            .collect();
        for margin in [
            Margin::arcface(16.0, 0.5, false).unwrap(),
            Margin::cosface(16.0, 0.35).unwrap(),
            Margin::softmax(16.0).unwrap(),
        ] {
            let up: Vec<f64> = labels.iter().map(|_| 0.25).collect();
            let options = LossOptions {
                reduction: Reduction::None,
                upstream: Some(&up),
                grad_emb: true,
                grad_weight: true,
                head: HeadOptions::default(),
                grad_filter: crate::head::GradFilter::Exact,
            };
            let cpu =
                margin_loss_with(emb.view(), weight.view(), &labels, &margin, options).unwrap();
            for (elem, bound) in [(Elem::Bf16, 1.5e-2), (Elem::F16, 2e-3)] {
                for weight_f32 in [true, false] {
                    let gpu = emulate_half(
                        &emb,
                        &weight,
                        &labels,
                        &margin,
                        (elem, false),
                        weight_f32,
                        &row_weight,
                        tiling,
                    );
                    let ctx = format!("{margin:?} {elem:?} weight_f32={weight_f32} b={b}");
                    assert_eq!(gpu.bad, [0, 0, 0], "{ctx}");
                    for (g, w) in gpu.row_loss.iter().zip(&cpu.row_losses) {
                        assert!(
                            (g - w).abs() <= bound * w.abs().max(1.0),
                            "{ctx}: {g} vs {w}"
                        );
                    }
                    let e_emb = relative_error(&gpu.grad_emb, cpu.grad_emb.as_ref().unwrap());
                    let e_w = relative_error(&gpu.grad_weight, cpu.grad_weight.as_ref().unwrap());
                    assert!(e_emb <= bound && e_w <= bound, "{ctx}: {e_emb:e} {e_w:e}");
                }
            }
        }
    }
}

#[test]
fn half_precision_head_flags_bad_rows_and_labels() {
    let emb = matrix::<f64>(3, 4, 8);
    let mut weight = matrix::<f64>(4, 9, 8);
    weight[[5, 1]] = f64::NAN;
    let labels = [0i64, 9, 2, -3];
    let margin = Margin::arcface(64.0, 0.5, false).unwrap();
    for weight_f32 in [true, false] {
        let gpu = emulate_half(
            &emb,
            &weight,
            &labels,
            &margin,
            (Elem::Bf16, false),
            weight_f32,
            &[1.0; 4],
            Tiling {
                class_tile: 4,
                stash_budget_bytes: 1 << 20,
                ..Tiling::default()
            },
        );
        // row 3 (label -3) is the highest bad label row; class 5 the bad centre
        assert_eq!(gpu.bad, [0, 6, 4], "weight_f32={weight_f32}");
    }
}

#[test]
fn tf32_gemms_round_their_inputs_to_ten_bits() {
    // the emulator's TF32 (what the fake cuBLAS and the head's TF32 mode rely on): 1 + 2^-11
    // is not a TF32 number, 1 + 2^-10 is
    let a = [1.0f32 + 2f32.powi(-11), 1.0 + 2f32.powi(-10)];
    let b = [1.0f32, 1.0];
    let mut c = [0f32; 2];
    for (tf32, want) in [(false, a[0] + a[1]), (true, 1.0 + 1.0 + 2f32.powi(-10))] {
        let g = RowMajorGemm {
            elem: Elem::F32,
            out: Elem::F32,
            tf32,
            trans_a: false,
            trans_b: false,
            m: 1,
            n: 1,
            k: 2,
            alpha: 1.0,
            a: a.as_ptr() as u64,
            lda: 2,
            b: b.as_ptr() as u64,
            ldb: 1,
            beta: 0.0,
            c: c.as_mut_ptr() as u64,
            ldc: 1,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        };
        crate::cuda::device::gemm(Emulator::get(), g).unwrap();
        assert_eq!(c[0], want, "tf32={tf32}");
    }
}

#[test]
fn a_half_precision_class_tile_costs_four_launches_or_five_when_staged_in_scratch() {
    // as on the exact paths, a float32 weight's 16-bit copy made in the launch before the
    // tile's logits GEMM; but where B > D the copy is made again in scratch in the gradient
    // pass, in the launch between tiles, and does not last: each tile then takes its own
    // dX̂ GEMM
    let margin = Margin::cosface(16.0, 0.35).unwrap();
    for (b, d) in [(4, 8), (12, 8)] {
        let emb = matrix::<f64>(31, b, d);
        let weight = matrix::<f64>(32, 40, d);
        let labels: Vec<i64> = (0..b).map(|i| (i * 11 % 40) as i64).collect();
        let rows = vec![0.5; b];
        for weight_f32 in [true, false] {
            let per_tile = calls_per_class_tile(|tiling| {
                let got = emulate_half(
                    &emb,
                    &weight,
                    &labels,
                    &margin,
                    (Elem::Bf16, false),
                    weight_f32,
                    &rows,
                    tiling,
                );
                assert_eq!(got.bad, [0, 0, 0]);
            });
            let staged_in_scratch = weight_f32 && b > d;
            let want = if staged_in_scratch { 5 } else { 4 };
            assert_eq!(per_tile, want, "b={b} d={d} weight_f32={weight_f32}");
        }
    }
}

#[test]
fn tf32_head_is_within_tf32_rounding_of_the_float64_head() {
    let (b, c, d) = (6, 23, 16);
    let emb = matrix::<f64>(21, b, d).mapv(|v| v * 2.0);
    let weight = matrix::<f64>(22, c, d);
    let labels: Vec<i64> = (0..b).map(|i| ((i * 3 + 2) % c) as i64).collect();
    let margin = Margin::arcface(16.0, 0.5, false).unwrap();
    let rows = vec![0.5; b];
    let options = LossOptions {
        reduction: Reduction::None,
        upstream: Some(&rows),
        grad_emb: true,
        grad_weight: true,
        head: HeadOptions::default(),
        grad_filter: crate::head::GradFilter::Exact,
    };
    let cpu = margin_loss_with(emb.view(), weight.view(), &labels, &margin, options).unwrap();
    let tiling = Tiling {
        class_tile: 8,
        stash_budget_bytes: 1 << 20,
        ..Tiling::default()
    };
    let errors: Vec<f64> = [false, true]
        .into_iter()
        .map(|tf32| {
            let gpu = emulate_half(
                &emb,
                &weight,
                &labels,
                &margin,
                (Elem::F32, tf32),
                true,
                &rows,
                tiling,
            );
            assert_eq!(gpu.bad, [0, 0, 0]);
            relative_error(&gpu.grad_emb, cpu.grad_emb.as_ref().unwrap()).max(relative_error(
                &gpu.grad_weight,
                cpu.grad_weight.as_ref().unwrap(),
            ))
        })
        .collect();
    // TF32 keeps 10 mantissa bits: errors well above float32's, well below 1e-2
    assert!(
        errors[0] < 1e-5 && errors[0] * 10.0 < errors[1] && errors[1] < 1e-2,
        "{errors:?}"
    );
}

/// `scale_unless_one` leaves a gradient bit for bit as it was when the upstream gradient is
/// exactly 1, and otherwise multiplies every element (in the accumulator type, the scalar
/// rounded to it) in each gradient type, over more elements than its blocks' threads so
/// that the grid stride is taken.
#[test]
fn upstream_gradient_scales_in_place_unless_it_is_one() {
    let n = 2 * 2048 * 256 + 37;
    let values: Vec<f64> = (0..n)
        .map(|i| ((i * 37 % 1001) as f64 - 500.0) / 97.0)
        .collect();
    for upstream in [1.0, -3.25] {
        let scale = [upstream];
        let run = |elem: Elem, bytes: &mut [u8]| {
            head::scale_unless_one(
                Emulator::get(),
                elem,
                bytes.as_mut_ptr() as u64,
                n,
                scale.as_ptr() as u64,
            )
            .unwrap();
        };
        let mut f64s = values.clone();
        run(Elem::F64, bytemuck_slice(&mut f64s));
        let mut f32s: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let f32_before = f32s.clone();
        run(Elem::F32, bytemuck_slice(&mut f32s));
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(f64s[i], v * upstream);
            assert_eq!(f32s[i], f32_before[i] * upstream as f32);
        }
        for elem in [Elem::Bf16, Elem::F16] {
            let mut bits = half_bits(
                &Array2::from_shape_vec((1, n), values.clone()).unwrap(),
                elem,
            );
            let before = bits.clone();
            run(elem, bytemuck_slice(&mut bits));
            let widen = |b: u16| match elem {
                Elem::Bf16 => half::bf16::from_bits(b).to_f32(),
                _ => half::f16::from_bits(b).to_f32(),
            };
            let narrow = |v: f32| match elem {
                Elem::Bf16 => half::bf16::from_f32(v).to_bits(),
                _ => half::f16::from_f32(v).to_bits(),
            };
            for i in 0..n {
                let want = if upstream == 1.0 {
                    before[i]
                } else {
                    narrow(widen(before[i]) * upstream as f32)
                };
                assert_eq!(bits[i], want, "{elem:?} element {i}, upstream {upstream}");
            }
        }
    }
}

/// The bytes of a slice of plain numbers, for a kernel to write through.
fn bytemuck_slice<T: Copy>(values: &mut [T]) -> &mut [u8] {
    // SAFETY: f64 / f32 / u16 have no padding and any byte pattern the kernel writes is one
    // of their values.
    unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr() as *mut u8,
            std::mem::size_of_val(values),
        )
    }
}
