//! The margin functions: target logit `psi(c)` and its derivative `psi'(c)` for every head.
//!
//! This enum is the one definition of every margin. [`Margin::encode`] turns it into the
//! parameter block that everything else reads: the CUDA kernels (`kernels.cu`'s one switch
//! over [`kind`]), the PyTorch ops (the block crosses the op boundary as `float[]`) and the
//! plain-PyTorch path. [`Margin::decode`] validates a block back into a margin.
//!
//! Scalar math in `f64`, no arrays. A head turns the target cosine `c` into `scale * psi(c)`
//! and every other cosine into `scale * c`. What psi may read besides `c` is the row's
//! [`RowContext`]; a margin that differs per row (a per-row m, a per-sample draw) is one
//! margin per row.

use crate::error::{Error, Result};
use std::f64::consts::PI;

/// psi' is evaluated with theta clamped to `[THETA_EPS, pi - THETA_EPS]`.
///
/// The exact derivative of an angular margin, `m1 sin(m1 theta + m2) / sin theta`, is infinite
/// at `c = +-1`. What reaches the embedding is `psi'(c) * dc/dx`, and `|dc/dx|` shrinks like
/// `sin theta`, so the product stays bounded; clamping keeps each factor finite too. Below
/// `THETA_EPS` (|c| > 0.9999995) ArcFace m=0.5 gives psi' <= 480 instead of infinity.
pub const THETA_EPS: f64 = 1e-3;

/// Numbers in a parameter block: `[kind, s, p0, p1, ...]`, zero-padded (see [`kind`]).
pub const PARAMS_LEN: usize = 8;

/// The kind codes, the first number of a parameter block. Each kind's parameters follow the
/// scale `s` (`0` for SphereFace's feature-norm scale):
///
/// | kind | block |
/// |---|---|
/// | `SOFTMAX` | `[0, s]` |
/// | `COSFACE` | `[1, s, m]` |
/// | `ARCFACE` | `[2, s, m, easy_margin (0/1)]` |
/// | `COMBINED` | `[3, s, m1, m2, m3]` |
/// | `SPHEREFACE` | `[4, s or 0, m, lambda]` |
pub mod kind {
    pub const SOFTMAX: u32 = 0;
    pub const COSFACE: u32 = 1;
    pub const ARCFACE: u32 = 2;
    pub const COMBINED: u32 = 3;
    pub const SPHEREFACE: u32 = 4;
    /// Every kind with its name, as Python sees them.
    pub const NAMES: &[(&str, u32)] = &[
        ("softmax", SOFTMAX),
        ("cosface", COSFACE),
        ("arcface", ARCFACE),
        ("combined", COMBINED),
        ("sphereface", SPHEREFACE),
    ];
}

/// What psi may depend on besides the target cosine: quantities of the row itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowContext {
    /// `||x_i||`, the row's unnormalised feature norm.
    pub norm: f64,
}

impl Default for RowContext {
    fn default() -> Self {
        RowContext { norm: 1.0 }
    }
}

/// A row's target logit before scaling and its derivatives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    pub psi: f64,
    /// d psi / d c.
    pub dpsi: f64,
    /// d psi / d ||x|| at fixed c: zero unless the margin reads the feature norm.
    pub dpsi_dnorm: f64,
}

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

    /// The kind code of this margin (see [`kind`]).
    pub fn kind(&self) -> u32 {
        match self {
            Margin::Softmax { .. } => kind::SOFTMAX,
            Margin::CosFace { .. } => kind::COSFACE,
            Margin::ArcFace { .. } => kind::ARCFACE,
            Margin::Combined { .. } => kind::COMBINED,
            Margin::SphereFace { .. } => kind::SPHEREFACE,
        }
    }

    /// The parameter block `[kind, s, p0, ...]` (layout in [`kind`]).
    pub fn encode(&self) -> [f64; PARAMS_LEN] {
        let s = match self.scale() {
            Scale::Fixed(s) => s,
            Scale::FeatureNorm => 0.0,
        };
        let params: &[f64] = match *self {
            Margin::Softmax { .. } => &[],
            Margin::CosFace { m, .. } => &[m],
            Margin::ArcFace { m, easy_margin, .. } => &[m, f64::from(u8::from(easy_margin))],
            Margin::Combined { m1, m2, m3, .. } => &[m1, m2, m3],
            Margin::SphereFace { m, lambda, .. } => &[f64::from(m), lambda],
        };
        let mut block = [0.0; PARAMS_LEN];
        block[0] = f64::from(self.kind());
        block[1] = s;
        block[2..2 + params.len()].copy_from_slice(params);
        block
    }

    /// The margin a parameter block encodes, validated as the constructors validate.
    pub fn decode(block: &[f64]) -> Result<Self> {
        if block.len() != PARAMS_LEN {
            return Err(Error::invalid(
                "margin",
                format!(
                    "a parameter block has {PARAMS_LEN} numbers, got {}",
                    block.len()
                ),
            ));
        }
        let (code, s, p) = (block[0], block[1], &block[2..]);
        let flag = |v: f64, arg: &'static str| match v {
            0.0 => Ok(false),
            1.0 => Ok(true),
            _ => Err(Error::invalid(arg, format!("must be 0 or 1, got {v}"))),
        };
        let integer = |v: f64| {
            if v.fract() == 0.0 && v.abs() < 1e9 {
                Some(v as i64)
            } else {
                None
            }
        };
        match integer(code).and_then(|k| u32::try_from(k).ok()) {
            Some(kind::SOFTMAX) => Margin::softmax(s),
            Some(kind::COSFACE) => Margin::cosface(s, p[0]),
            Some(kind::ARCFACE) => Margin::arcface(s, p[0], flag(p[1], "easy_margin")?),
            Some(kind::COMBINED) => Margin::combined(s, p[0], p[1], p[2]),
            Some(kind::SPHEREFACE) => {
                let m = integer(p[0]).ok_or_else(|| {
                    Error::invalid("m", format!("must be an integer in 1..=4, got {}", p[0]))
                })?;
                Margin::sphereface(m, (s != 0.0).then_some(s), p[1])
            }
            _ => Err(Error::invalid(
                "margin",
                format!("unknown margin kind {code} in a parameter block"),
            )),
        }
    }

    /// Target logit before scaling, for a row with no context. `c` is clamped to [-1, 1].
    pub fn psi(&self, c: f64) -> f64 {
        self.target(c, RowContext::default()).psi
    }

    /// d psi / d c, finite for every c in [-1, 1] (see [`THETA_EPS`]).
    pub fn dpsi(&self, c: f64) -> f64 {
        self.target(c, RowContext::default()).dpsi
    }

    /// psi and its derivatives at target cosine `c` (clamped to [-1, 1]) for a row.
    pub fn target(&self, c: f64, _row: RowContext) -> Target {
        let c = if c.is_nan() { c } else { c.clamp(-1.0, 1.0) };
        let (psi, dpsi) = match *self {
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
        };
        Target {
            psi,
            dpsi,
            dpsi_dnorm: 0.0,
        }
    }

    /// The largest `|psi|` over c in [-1, 1] for any row (bounds the logits).
    pub fn peak(&self) -> f64 {
        self.psi(1.0).abs().max(self.psi(-1.0).abs()).max(1.0)
    }
}

/// The margin of each row of a batch: one for all, or one per row (per-row margin values,
/// per-sample draws). Every row's margin has the same kind and scale.
#[derive(Clone, Copy, Debug)]
pub enum Margins<'a> {
    Same(&'a Margin),
    PerRow(&'a [Margin]),
}

impl<'a> From<&'a Margin> for Margins<'a> {
    fn from(margin: &'a Margin) -> Self {
        Margins::Same(margin)
    }
}

impl<'a> From<&'a [Margin]> for Margins<'a> {
    fn from(margins: &'a [Margin]) -> Self {
        Margins::PerRow(margins)
    }
}

impl<'a> From<&'a Vec<Margin>> for Margins<'a> {
    fn from(margins: &'a Vec<Margin>) -> Self {
        Margins::PerRow(margins)
    }
}

impl Margins<'_> {
    /// Row `i`'s margin.
    pub fn row(&self, i: usize) -> &Margin {
        match self {
            Margins::Same(m) => m,
            Margins::PerRow(ms) => &ms[i],
        }
    }

    /// The margin whose scale every row shares (the first row's for per-row margins).
    fn first(&self) -> Option<&Margin> {
        match self {
            Margins::Same(m) => Some(m),
            Margins::PerRow(ms) => ms.first(),
        }
    }

    /// The shared logit scale, after checking there is one margin per row (of `rows`) and
    /// that every row has the first row's kind and scale.
    pub fn check(&self, rows: usize) -> Result<Scale> {
        if let Margins::PerRow(ms) = self {
            if ms.len() != rows {
                return Err(Error::invalid(
                    "margin",
                    format!("has {} per-row margins but emb has {rows} rows", ms.len()),
                ));
            }
            let differs = |m: &Margin| {
                ms.first()
                    .is_some_and(|f| m.kind() != f.kind() || m.scale() != f.scale())
            };
            if let Some(i) = ms.iter().position(differs) {
                return Err(Error::invalid(
                    "margin",
                    format!("row {i} has another kind or scale than row 0"),
                ));
            }
        }
        Ok(self.first().map_or(Scale::Fixed(1.0), Margin::scale))
    }

    /// The largest [`Margin::peak`] over the rows.
    pub fn peak(&self) -> f64 {
        match self {
            Margins::Same(m) => m.peak(),
            Margins::PerRow(ms) => ms.iter().fold(1.0, |p, m| p.max(m.peak())),
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
            let row = RowContext::default();
            assert_eq!(af.target(c, row), combined.target(c, row));
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
}
