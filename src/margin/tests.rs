use super::*;

/// One of every kind and flag, for the tests here and the CUDA kernels' grid test.
pub(crate) fn all_margins() -> Vec<Margin> {
    vec![
        Margin::softmax(64.0).unwrap(),
        Margin::arcface(64.0, 0.5, false).unwrap(),
        Margin::arcface(64.0, 0.5, true).unwrap(),
        Margin::arcface(30.0, 1.2, false).unwrap(),
        Margin::cosface(64.0, 0.35).unwrap(),
        Margin::sphereface(4, None, 0.0).unwrap(),
        Margin::sphereface(3, Some(30.0), 5.0).unwrap(),
        Margin::sphereface(2, None, 0.0).unwrap(),
        Margin::combined(64.0, 1.0, 0.3, 0.2).unwrap(),
        Margin::combined(64.0, 1.35, 0.25, 0.0).unwrap(),
        Margin::combined(64.0, 0.9, 0.4, 0.1).unwrap(),
        Margin::arcface(64.0, 0.5, false)
            .unwrap()
            .with_straight_through(true)
            .unwrap(),
        Margin::combined(64.0, 1.0, 0.3, 0.2)
            .unwrap()
            .with_straight_through(true)
            .unwrap(),
        Margin::adaface(64.0, 0.4, 0.0).unwrap(),
        Margin::adaface(64.0, 0.4, -1.0).unwrap(),
        Margin::adaface(64.0, 0.4, 0.7).unwrap(),
        Margin::magface(64.0, (10.0, 110.0), (0.45, 0.8), true, 35.0).unwrap(),
        Margin::magface(64.0, (10.0, 110.0), (0.45, 0.8), false, 35.0).unwrap(),
        Margin::curricularface(64.0, 0.5, 0.3).unwrap(),
        Margin::mvsoftmax(32.0, 0.35, 1.12, false).unwrap(),
        Margin::mvsoftmax(32.0, 0.5, 1.2, true).unwrap(),
    ]
}

#[test]
fn sphereface_reference_values() {
    let sf = Margin::sphereface(4, None, 0.0).unwrap();
    let cs = [1.0, 0.9, 0.5, 0.0, -0.5, -1.0];
    let want = [1.0, -0.2312, -1.5, -3.0, -4.5, -7.0];
    for (c, w) in cs.iter().zip(want) {
        assert!(
            (sf.psi(*c) - w).abs() < 1e-9,
            "psi({c}) = {} != {w}",
            sf.psi(*c)
        );
    }
}

#[test]
fn arcface_reference_dpsi() {
    let af = Margin::arcface(64.0, 0.5, false).unwrap();
    assert!((af.dpsi(0.6) - 1.23715).abs() < 1e-5);
    assert!((af.dpsi(0.999) - 11.59).abs() < 0.01);
}

#[test]
fn arcface_fallback_matches_reference_formula() {
    let m = 0.5f64;
    let af = Margin::arcface(64.0, m, false).unwrap();
    let c = -0.95; // theta > pi - m
    assert!((af.psi(c) - (c - m * m.sin())).abs() < 1e-12);
    assert_eq!(af.dpsi(c), 1.0);
    let combined = Margin::combined(64.0, 1.0, m, 0.0).unwrap();
    for i in 0..=200 {
        let c = -1.0 + i as f64 / 100.0;
        let row = RowContext::default();
        assert_eq!(af.target(c, row), combined.target(c, row));
    }
}

#[test]
fn psi_non_increasing_and_dpsi_finite_on_dense_grid() {
    // easy_margin is psi = c for c <= 0 by definition, which jumps up at theta = pi/2;
    // AdaFace's angle clamp at pi - eps makes psi flat, then its cosine clamp rises
    let monotone = |m: &Margin| {
        !matches!(
            m,
            Margin::ArcFace {
                easy_margin: true,
                ..
            } | Margin::MagFace {
                easy_margin: true,
                ..
            } | Margin::MvSoftmax { .. }
        )
    };
    for margin in all_margins() {
        let n = 20_000;
        let mut prev = f64::INFINITY;
        for i in 0..=n {
            let theta = PI * i as f64 / n as f64;
            let c = if i == 0 {
                1.0
            } else if i == n {
                -1.0
            } else {
                theta.cos()
            };
            let Target { psi, dpsi, .. } = margin.target(c, RowContext::default());
            assert!(psi.is_finite() && dpsi.is_finite(), "{margin:?} at c={c}");
            if monotone(&margin) {
                assert!(psi <= prev + 1e-12, "{margin:?} increases at theta={theta}");
            }
            prev = psi;
        }
    }
}

#[test]
fn straight_through_keeps_psi_and_passes_the_plain_gradient() {
    let exact = Margin::arcface(64.0, 0.5, false).unwrap();
    let st = exact.with_straight_through(true).unwrap();
    for c in [-0.99, -0.3, 0.2, 0.9] {
        assert_eq!(st.psi(c), exact.psi(c));
        assert_eq!(st.dpsi(c), 1.0);
    }
    let err = Margin::cosface(64.0, 0.3)
        .unwrap()
        .with_straight_through(true)
        .unwrap_err();
    assert_eq!(err.arg, "grad");
}

#[test]
fn adaface_follows_the_papers_formula() {
    // psi = cos(clip(theta - m z, eps, pi - eps)) - (m + m z), theta from the clamped c
    let (m, eps) = (0.4, 1e-3);
    for z in [-1.0, -0.3, 0.0, 0.6, 1.0] {
        let ada = Margin::adaface(64.0, m, z).unwrap();
        for c in [-1.0, -0.9995, -0.5, 0.0, 0.3, 0.95, 0.9995, 1.0] {
            let theta = f64::clamp(c, -1.0 + eps, 1.0 - eps).acos();
            let want = (theta - m * z).clamp(eps, PI - eps).cos() - (m + m * z);
            assert!((ada.psi(c) - want).abs() < 1e-15, "z={z} c={c}");
        }
        // no gradient where the cosine clamp holds
        assert_eq!(ada.dpsi(0.9999), 0.0);
    }
    assert_eq!(Margin::adaface(64.0, 0.4, 1.5).unwrap_err().arg, "z");
}

#[test]
fn magface_margin_and_penalty_follow_the_norm() {
    let mag = Margin::magface(64.0, (10.0, 110.0), (0.45, 0.8), false, 35.0).unwrap();
    let arc = |m: f64| Margin::arcface(64.0, m, false).unwrap();
    for (norm, m) in [
        (5.0, 0.45),
        (10.0, 0.45),
        (60.0, 0.625),
        (110.0, 0.8),
        (200.0, 0.8),
    ] {
        let row = RowContext { norm };
        for c in [-0.95, -0.2, 0.4, 0.99] {
            let t = mag.target(c, row);
            assert!((t.psi - arc(m).psi(c)).abs() < 1e-14, "norm={norm} c={c}");
            assert!((t.dpsi - arc(m).dpsi(c)).abs() < 1e-12);
        }
        let g = 35.0 * (norm.clamp(10.0, 110.0) / (110.0 * 110.0) + 1.0 / norm.clamp(10.0, 110.0));
        assert!((mag.penalty(row).0 - g).abs() < 1e-12);
    }
    // derivatives in the norm against central differences (inside (l_a, u_a))
    for norm in [12.0, 47.5, 100.0] {
        for c in [-0.95, -0.5, 0.1, 0.7] {
            let h = 1e-5;
            let at = |n: f64| mag.target(c, RowContext { norm: n }).psi;
            let fd = (at(norm + h) - at(norm - h)) / (2.0 * h);
            let got = mag.target(c, RowContext { norm }).dpsi_dnorm;
            assert!((fd - got).abs() < 1e-7, "norm={norm} c={c}: {fd} vs {got}");
            let pen = |n: f64| mag.penalty(RowContext { norm: n }).0;
            let fd = (pen(norm + h) - pen(norm - h)) / (2.0 * h);
            assert!((fd - mag.penalty(RowContext { norm }).1).abs() < 1e-6);
        }
    }
    assert_eq!(mag.target(0.3, RowContext { norm: 500.0 }).dpsi_dnorm, 0.0);
    assert_eq!(
        Margin::magface(64.0, (10.0, 5.0), (0.45, 0.8), true, 35.0)
            .unwrap_err()
            .arg,
        "u_a"
    );
}

#[test]
fn dpsi_matches_finite_differences_away_from_kinks() {
    // (straight-through's psi' is 1 by definition, not psi's derivative)
    let exact = |m: &Margin| {
        !matches!(
            m,
            Margin::ArcFace {
                straight_through: true,
                ..
            } | Margin::Combined {
                straight_through: true,
                ..
            }
        )
    };
    for margin in all_margins().into_iter().filter(exact) {
        for i in 1..40 {
            let c = -0.975 + i as f64 * 0.049;
            let h = 1e-6;
            let fd = (margin.psi(c + h) - margin.psi(c - h)) / (2.0 * h);
            let d = margin.dpsi(c);
            // skip points straddling a piecewise boundary
            let left = (margin.psi(c) - margin.psi(c - h)) / h;
            let right = (margin.psi(c + h) - margin.psi(c)) / h;
            if (left - right).abs() > 1e-3 * (1.0 + d.abs()) {
                continue;
            }
            assert!(
                (fd - d).abs() < 1e-5 * (1.0 + d.abs()),
                "{margin:?} c={c}: {fd} vs {d}"
            );
        }
    }
}

#[test]
fn constructors_reject_bad_parameters() {
    assert_eq!(Margin::arcface(0.0, 0.5, false).unwrap_err().arg, "s");
    assert_eq!(Margin::arcface(64.0, -0.1, false).unwrap_err().arg, "m");
    assert_eq!(Margin::arcface(f64::NAN, 0.5, false).unwrap_err().arg, "s");
    assert_eq!(Margin::cosface(64.0, f64::INFINITY).unwrap_err().arg, "m");
    assert_eq!(Margin::sphereface(5, None, 0.0).unwrap_err().arg, "m");
    assert_eq!(Margin::sphereface(0, None, 0.0).unwrap_err().arg, "m");
    assert_eq!(Margin::sphereface(4, Some(-1.0), 0.0).unwrap_err().arg, "s");
    assert_eq!(
        Margin::sphereface(4, None, -1.0).unwrap_err().arg,
        "lambda_"
    );
    assert_eq!(Margin::combined(64.0, 0.0, 0.5, 0.0).unwrap_err().arg, "m1");
    assert_eq!(
        Margin::combined(64.0, 1.0, 0.5, -0.2).unwrap_err().arg,
        "m3"
    );
}

#[test]
fn every_margin_survives_encode_then_decode() {
    for margin in all_margins() {
        let block = margin.encode();
        assert_eq!(block[0], f64::from(margin.kind()));
        assert_eq!(Margin::decode(&block).unwrap(), margin, "{block:?}");
    }
    assert!(kind::NAMES
        .iter()
        .all(|&(_, k)| all_margins().iter().any(|m| m.kind() == k)));
}

#[test]
fn decode_validates_like_the_constructors() {
    let arc = Margin::arcface(64.0, 0.5, false).unwrap().encode();
    let with = |i: usize, v: f64| {
        let mut b = arc;
        b[i] = v;
        Margin::decode(&b).unwrap_err().arg
    };
    assert_eq!(with(0, 9.0), "margin");
    assert_eq!(with(0, 1.5), "margin");
    assert_eq!(with(0, f64::NAN), "margin");
    assert_eq!(with(1, -1.0), "s");
    assert_eq!(with(2, 4.0), "m");
    assert_eq!(with(3, 0.5), "easy_margin");
    assert_eq!(Margin::decode(&arc[..3]).unwrap_err().arg, "margin");
    let mut sphere = Margin::sphereface(4, None, 0.0).unwrap().encode();
    sphere[2] = 2.5;
    assert_eq!(Margin::decode(&sphere).unwrap_err().arg, "m");
}

#[test]
fn per_row_margins_must_share_kind_and_scale_and_match_the_rows() {
    let a = Margin::arcface(64.0, 0.5, false).unwrap();
    let b = Margin::arcface(64.0, 0.3, false).unwrap();
    let rows = [a, b];
    assert_eq!(
        Margins::from(&rows[..]).check(2).unwrap(),
        Scale::Fixed(64.0)
    );
    assert_eq!(Margins::from(&rows[..]).check(3).unwrap_err().arg, "margin");
    let mixed = [a, Margin::cosface(64.0, 0.3).unwrap()];
    assert_eq!(
        Margins::from(&mixed[..]).check(2).unwrap_err().arg,
        "margin"
    );
    let scales = [a, Margin::arcface(30.0, 0.5, false).unwrap()];
    assert_eq!(
        Margins::from(&scales[..]).check(2).unwrap_err().arg,
        "margin"
    );
    assert_eq!(Margins::from(&rows[..]).row(1), &b);
}

#[test]
fn scale_kinds() {
    assert_eq!(
        Margin::sphereface(4, None, 0.0).unwrap().scale(),
        Scale::FeatureNorm
    );
    assert_eq!(
        Margin::sphereface(4, Some(10.0), 0.0).unwrap().scale(),
        Scale::Fixed(10.0)
    );
    assert_eq!(
        Margin::cosface(30.0, 0.2).unwrap().scale(),
        Scale::Fixed(30.0)
    );
}
