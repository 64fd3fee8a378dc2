use super::*;

#[test]
fn the_simd_cap_parses_and_refuses_what_the_cpu_lacks() {
    let best = SimdLevel::detected();
    assert_eq!(SimdLevel::from_env(None), Ok(best));
    assert_eq!(SimdLevel::from_env(Some("")), Ok(best));
    assert_eq!(SimdLevel::from_env(Some("scalar")), Ok(SimdLevel::Scalar));
    assert_eq!(
        SimdLevel::from_env(Some(" AVX2 ")).is_ok(),
        best >= SimdLevel::Avx2
    );
    let err = SimdLevel::from_env(Some("sse9")).unwrap_err();
    assert!(err.contains(best.name()), "{err}");
    if best < SimdLevel::Avx512 {
        let err = SimdLevel::from_env(Some("avx512")).unwrap_err();
        assert!(
            err.contains("lacks avx512") && err.contains(best.name()),
            "{err}"
        );
    }
    // NEON is aarch64's and only aarch64's
    let neon = SimdLevel::from_env(Some("neon"));
    if cfg!(target_arch = "aarch64") {
        assert_eq!((best, neon), (SimdLevel::Neon, Ok(SimdLevel::Neon)));
        assert!(SimdLevel::from_env(Some("avx2")).is_err());
    } else {
        assert!(neon.unwrap_err().contains("lacks neon"));
    }
}

#[test]
fn norm_is_accurate_for_every_finite_row() {
    let base = [3.0f64, -4.0, 12.0]; // norm 13
    for scale in [1e-320, 1e-310, 1e-200, 1.0, 1e150, 1e200, 1e307] {
        let row: Vec<f64> = base.iter().map(|v| v * scale).collect();
        let got = norm(&row);
        let rel = (got / scale - 13.0).abs() / 13.0;
        // denormal entries carry few digits of their own
        assert!(
            rel < if scale < 1e-300 { 1e-3 } else { 1e-15 },
            "{scale}: {got}"
        );
    }
    let tiny: Vec<f32> = [1e-45f32, 0.0, 2e-45].to_vec();
    assert!(norm(&tiny) > 0.0);
    assert_eq!(norm(&[0.0f64; 4]), 0.0);
    assert!(norm(&[1.0, f64::NAN]).is_nan());
    assert!(norm(&[1.0, f64::INFINITY]).is_nan());
    let mut out = [0.0f64; 3];
    let row: Vec<f64> = base.iter().map(|v| v * 1e-310).collect();
    unit_into(&row, norm(&row), &mut out);
    assert!((out[2] - 12.0 / 13.0).abs() < 1e-3, "{out:?}");
}

#[test]
fn exp_f32_is_accurate_over_the_range_used() {
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let want = (x as f64).exp();
        let got = exp_f32(x) as f64;
        worst = worst.max(((got - want) / want).abs());
        x += 0.0137;
    }
    assert!(worst < 4e-7, "worst relative error {worst}");
    assert!(exp_f32(-1000.0) > 0.0 && exp_f32(-1000.0) < 1.3e-38);
    assert_eq!(exp_f32(0.0), 1.0);
}

#[test]
fn kernels_match_scalar_loops() {
    for n in [0usize, 1, 15, 16, 17, 100, 515] {
        let z: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let inv: Vec<f32> = (0..n).map(|i| 0.5 + (i % 5) as f32 * 0.1).collect();
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&z), m);
        let want: f64 = z.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let want_ez: f64 = z.iter().map(|&v| ((v - m) as f64).exp() * v as f64).sum();
        let mut e = z.clone();
        let (sum, sum_ez) = exp_in_place(&mut e, m);
        assert!((sum as f64 - want).abs() <= 1e-5 * want.max(1.0));
        assert!((sum_ez as f64 - want_ez).abs() <= 1e-4 * (1.0 + want_ez.abs()));
        for j in 0..n {
            let p = ((z[j] - m) as f64).exp();
            assert!((e[j] as f64 - p).abs() <= 4e-7 * p);
        }
        let want_dot: f64 = z.iter().zip(&inv).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((dot(&z, &inv) as f64 - want_dot).abs() < 1e-3);
        let mut g = vec![0.0f32; n];
        scale_mul(&e, 2.0, &inv, &mut g);
        for j in 0..n {
            assert_eq!(g[j], 2.0 * e[j] * inv[j]);
        }
        let mut s = z.clone();
        scale_clamp(&mut s, &inv, 3.0);
        for j in 0..n {
            assert_eq!(s[j], 3.0 * (z[j] * inv[j]).clamp(-1.0, 1.0));
        }
    }
}

#[test]
fn project_out_leaves_no_component_along_w() {
    let w: Vec<f64> = (0..37).map(|i| (i as f64).sin() * 3.0).collect();
    let inv = 1.0 / w.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mut g: Vec<f64> = (0..37).map(|i| (i as f64 * 0.7).cos()).collect();
    project_out(&mut g, &w, inv);
    assert!(dot(&g, &w).abs() < 1e-12);
}

#[test]
fn decoders_are_exact_for_every_code() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let mut out = vec![0.0f32; all.len()];
    decode_f16(&all, &mut out);
    for (&h, &got) in all.iter().zip(&out) {
        let want = half::f16::from_bits(h).to_f32();
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{h:#x}"
        );
    }
    decode_bf16(&all, &mut out);
    for (&h, &got) in all.iter().zip(&out) {
        let want = half::bf16::from_bits(h).to_f32();
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{h:#x}"
        );
    }
    let codes: Vec<i8> = (-128..=127).collect();
    decode_i8(&codes, &mut out[..256]);
    for (&c, &got) in codes.iter().zip(&out) {
        assert_eq!(got, c as f32);
    }
}

#[test]
fn fused_dots_match_decode_then_dot() {
    for d in [1usize, 15, 16, 33, 64, 100] {
        let query: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let f16s: Vec<u16> = (0..3 * d)
            .map(|i| half::f16::from_f32((i as f32 * 0.11).cos()).to_bits())
            .collect();
        let bf16s: Vec<u16> = (0..3 * d)
            .map(|i| half::bf16::from_f32((i as f32 * 0.13).cos()).to_bits())
            .collect();
        let i8s: Vec<i8> = (0..3 * d).map(|i| ((i * 37) % 255) as i8).collect();
        let mut decoded = vec![0.0f32; 3 * d];
        let (mut want, mut got) = (vec![0.0f32; 3], vec![0.0f32; 3]);
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + x.abs()))
        };
        decode_f16(&f16s, &mut decoded);
        dots(&query, &decoded, &mut want);
        dots_f16(&query, &f16s, &mut got);
        assert!(close(&want, &got), "f16 d={d} {want:?} {got:?}");
        decode_bf16(&bf16s, &mut decoded);
        dots(&query, &decoded, &mut want);
        dots_bf16(&query, &bf16s, &mut got);
        assert!(close(&want, &got), "bf16 d={d}");
        dots_f32(&query, &decoded, &mut got);
        assert!(close(&want, &got), "f32 d={d}");
        decode_i8(&i8s, &mut decoded);
        dots(&query, &decoded, &mut want);
        dots_i8(&query, &i8s, &mut got);
        assert!(close(&want, &got), "i8 d={d}");
    }
}

#[test]
fn hardest_similarities_match_a_plain_scan() {
    // lengths around the 16 lanes, labels with -1 and repeated values (ties), every anchor
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    for b in [1usize, 2, 15, 16, 17, 33, 50] {
        let labels: Vec<i64> = (0..b).map(|_| next() as i64 % 4 - 1).collect();
        // few distinct values, so extremes tie across lanes and the tail
        let sims: Vec<f32> = (0..b).map(|_| (next() % 5) as f32 * 0.25 - 0.5).collect();
        for a in 0..b {
            let ya = labels[a];
            let (mut want_p, mut want_n) = (f32::INFINITY, f32::NEG_INFINITY);
            for j in 0..b {
                if labels[j] == ya && j != a {
                    want_p = want_p.min(sims[j]);
                }
                if labels[j] != ya && labels[j] != -1 {
                    want_n = want_n.max(sims[j]);
                }
            }
            let got = hardest_similarities(&sims, &labels, a);
            assert_eq!(got, (want_p, want_n), "b={b} a={a}");
        }
    }
}
