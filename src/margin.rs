//! The margin functions: target logit `psi(c)` and its derivative `psi'(c)` for every head.
//!
//! Scalar math in `f64`, no arrays. A head turns the target cosine `c` into `scale * psi(c)`
//! and every other cosine into `scale * c`.

use crate::error::{Error, Result};
use std::f64::consts::PI;

/// psi' is evaluated with theta clamped to `[THETA_EPS, pi - THETA_EPS]`.
///
/// The exact derivative of an angular margin, `m1 sin(m1 theta + m2) / sin theta`, is infinite
/// at `c = +-1`. What reaches the embedding is `psi'(c) * dc/dx`, and `|dc/dx|` shrinks like
/// `sin theta`, so the product stays bounded; clamping keeps each factor finite too. Below
/// `THETA_EPS` (|c| > 0.9999995) ArcFace m=0.5 gives psi' <= 480 instead of infinity.
pub const THETA_EPS: f64 = 1e-3;

/// How logits are scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale {
    /// Every logit is `s * f(c)`.
    Fixed(f64),
    /// Original A-Softmax: the logit is `||x|| * f(c)` with the unnormalised feature norm.
    FeatureNorm,
}

/// A margin-softmax head's target-logit function. Build with the validating constructors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Margin {
    /// Normalised softmax: psi(c) = c.
    Softmax { s: f64 },
    /// Additive angular margin: psi = cos(theta + m). `easy_margin` keeps psi = c for c <= 0
    /// (InsightFace's option), which makes psi jump up at theta = pi/2.
    ArcFace { s: f64, m: f64, easy_margin: bool },
    /// Additive cosine margin: psi = c - m.
    CosFace { s: f64, m: f64 },
    /// Multiplicative angular margin (A-Softmax) with integer m, blended with c by lambda.
    SphereFace { m: u32, s: Option<f64>, lambda: f64 },
    /// psi = cos(m1 theta + m2) - m3.
    Combined { s: f64, m1: f64, m2: f64, m3: f64 },
}

fn check_scale(s: f64) -> Result<f64> {
    if s.is_finite() && s > 0.0 {
        Ok(s)
    } else {
        Err(Error::invalid(
            "s",
            format!("must be a finite number > 0, got {s}"),
        ))
    }
}

fn check_range(arg: &'static str, v: f64, lo: f64, hi: f64, what: &str) -> Result<f64> {
    if v.is_finite() && v >= lo && v < hi {
        Ok(v)
    } else {
        Err(Error::invalid(arg, format!("must be {what}, got {v}")))
    }
}

impl Margin {
    pub fn softmax(s: f64) -> Result<Self> {
        Ok(Margin::Softmax { s: check_scale(s)? })
    }

    pub fn arcface(s: f64, m: f64, easy_margin: bool) -> Result<Self> {
        Ok(Margin::ArcFace {
            s: check_scale(s)?,
            m: check_range("m", m, 0.0, PI, "in [0, pi)")?,
            easy_margin,
        })
    }

    pub fn cosface(s: f64, m: f64) -> Result<Self> {
        Ok(Margin::CosFace {
            s: check_scale(s)?,
            m: check_range("m", m, 0.0, f64::INFINITY, "a finite number >= 0")?,
        })
    }

    pub fn sphereface(m: i64, s: Option<f64>, lambda: f64) -> Result<Self> {
        if !(1..=4).contains(&m) {
            return Err(Error::invalid(
                "m",
                format!("must be an integer in 1..=4, got {m}"),
            ));
        }
        let s = s.map(check_scale).transpose()?;
        let lambda = check_range(
            "lambda_",
            lambda,
            0.0,
            f64::INFINITY,
            "a finite number >= 0",
        )?;
        Ok(Margin::SphereFace {
            m: m as u32,
            s,
            lambda,
        })
    }

    pub fn combined(s: f64, m1: f64, m2: f64, m3: f64) -> Result<Self> {
        Ok(Margin::Combined {
            s: check_scale(s)?,
            m1: check_range(
                "m1",
                m1,
                f64::MIN_POSITIVE,
                f64::INFINITY,
                "a finite number > 0",
            )?,
            m2: check_range("m2", m2, 0.0, PI, "in [0, pi)")?,
            m3: check_range("m3", m3, 0.0, f64::INFINITY, "a finite number >= 0")?,
        })
    }

    pub fn scale(&self) -> Scale {
        match *self {
            Margin::Softmax { s }
            | Margin::ArcFace { s, .. }
            | Margin::CosFace { s, .. }
            | Margin::Combined { s, .. } => Scale::Fixed(s),
            Margin::SphereFace { s, .. } => s.map_or(Scale::FeatureNorm, Scale::Fixed),
        }
    }

    /// Target logit before scaling. `c` is clamped to [-1, 1] first.
    pub fn psi(&self, c: f64) -> f64 {
        self.psi_dpsi(c).0
    }

    /// d psi / d c, finite for every c in [-1, 1] (see [`THETA_EPS`]).
    pub fn dpsi(&self, c: f64) -> f64 {
        self.psi_dpsi(c).1
    }

    /// `(psi(c), psi'(c))` in one call.
    pub fn psi_dpsi(&self, c: f64) -> (f64, f64) {
        let c = if c.is_nan() { c } else { c.clamp(-1.0, 1.0) };
        match *self {
            Margin::Softmax { .. } => (c, 1.0),
            Margin::CosFace { m, .. } => (c - m, 1.0),
            Margin::ArcFace { m, easy_margin, .. } => {
                if easy_margin && c <= 0.0 {
                    (c, 1.0)
                } else {
                    angular(c, 1.0, m, 0.0)
                }
            }
            Margin::Combined { m1, m2, m3, .. } => angular(c, m1, m2, m3),
            Margin::SphereFace { m, lambda, .. } => {
                let (psi, dpsi) = sphere(c, m);
                (
                    (lambda * c + psi) / (1.0 + lambda),
                    (lambda + dpsi) / (1.0 + lambda),
                )
            }
        }
    }
}

/// cos(m1 theta + m2) - m3 while m1 theta + m2 <= pi; beyond, `c - m3 - k` with slope 1.
///
/// The shift `k = max(m2 sin m2, 1 + cos theta*)`: the first term is the ArcFace reference
/// fallback (`c - m sin m`), the second guarantees the jump at theta* goes down, so psi is
/// non-increasing in theta for any margins.
fn angular(c: f64, m1: f64, m2: f64, m3: f64) -> (f64, f64) {
    let theta = c.acos();
    let theta_star = (PI - m2) / m1;
    if theta > theta_star {
        let k = (m2 * m2.sin()).max(1.0 + theta_star.cos());
        return (c - m3 - k, 1.0);
    }
    let psi = (m1 * theta + m2).cos() - m3;
    let t = theta.clamp(THETA_EPS, PI - THETA_EPS);
    let dpsi = m1 * (m1 * t + m2).sin() / t.sin();
    (psi, dpsi)
}

/// A-Softmax: psi = (-1)^k T_m(c) - 2k, k = floor(m theta / pi); psi' = (-1)^k m U_{m-1}(c).
fn sphere(c: f64, m: u32) -> (f64, f64) {
    let theta = c.acos();
    let k = ((m as f64 * theta / PI).floor() as u32).min(m - 1);
    let sign = if k.is_multiple_of(2) { 1.0 } else { -1.0 };
    let (t, u) = match m {
        1 => (c, 1.0),
        2 => (2.0 * c * c - 1.0, 2.0 * c),
        3 => (4.0 * c * c * c - 3.0 * c, 4.0 * c * c - 1.0),
        _ => {
            let c2 = c * c;
            (8.0 * c2 * c2 - 8.0 * c2 + 1.0, 8.0 * c2 * c - 4.0 * c)
        }
    };
    (sign * t - 2.0 * k as f64, sign * m as f64 * u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_margins() -> Vec<Margin> {
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
            assert_eq!(af.psi_dpsi(c), combined.psi_dpsi(c));
        }
    }

    #[test]
    fn psi_non_increasing_and_dpsi_finite_on_dense_grid() {
        // easy_margin is psi = c for c <= 0 by definition, which jumps up at theta = pi/2
        let monotone = |m: &Margin| {
            !matches!(
                m,
                Margin::ArcFace {
                    easy_margin: true,
                    ..
                }
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
                let (psi, dpsi) = margin.psi_dpsi(c);
                assert!(psi.is_finite() && dpsi.is_finite(), "{margin:?} at c={c}");
                if monotone(&margin) {
                    assert!(psi <= prev + 1e-12, "{margin:?} increases at theta={theta}");
                }
                prev = psi;
            }
        }
    }

    #[test]
    fn dpsi_matches_finite_differences_away_from_kinks() {
        for margin in all_margins() {
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
}
