//! The margin functions: target logit `psi(c)` and its derivative `psi'(c)` for every head.
//!
//! This enum is the one definition of every margin. [`Margin::encode`] turns it into the
//! parameter block that everything else reads: the CUDA kernels (`kernels.cu`'s one switch
//! over [`kind`]), the PyTorch ops (the block crosses the op boundary as `float[]`) and the
//! plain-PyTorch path. [`Margin::decode`] validates a block back into a margin.
//!
//! Scalar math in `f64`, no arrays. A head turns the target cosine `c` into `scale * psi(c)`
//! and every other cosine into `scale * c`, or `scale * h(c)` for the margins that re-weight
//! hard negatives ([`HardNegatives`]: CurricularFace, MV-Softmax). What psi may read besides `c` is the row's
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
/// | `ARCFACE` | `[2, s, m, easy_margin, straight_through]` (flags 0/1) |
/// | `COMBINED` | `[3, s, m1, m2, m3, straight_through]` |
/// | `SPHEREFACE` | `[4, s or 0, m, lambda]` |
/// | `ADAFACE` | `[5, s, m, z]`: z is the row's margin scaler in [-1, 1] |
/// | `MAGFACE` | `[6, s, l_a, u_a, l_m, u_m, easy_margin, lambda_g]` |
/// | `CURRICULARFACE` | `[7, s, m, t]`: t is the running mean target cosine |
/// | `MVSOFTMAX` | `[8, s, m, t, arc]`: arc 0 for the cosine margin, 1 for the angular |
pub mod kind {
    pub const SOFTMAX: u32 = 0;
    pub const COSFACE: u32 = 1;
    pub const ARCFACE: u32 = 2;
    pub const COMBINED: u32 = 3;
    pub const SPHEREFACE: u32 = 4;
    pub const ADAFACE: u32 = 5;
    pub const MAGFACE: u32 = 6;
    pub const CURRICULARFACE: u32 = 7;
    pub const MVSOFTMAX: u32 = 8;
    /// Every kind with its name, as Python sees them.
    pub const NAMES: &[(&str, u32)] = &[
        ("softmax", SOFTMAX),
        ("cosface", COSFACE),
        ("arcface", ARCFACE),
        ("combined", COMBINED),
        ("sphereface", SPHEREFACE),
        ("adaface", ADAFACE),
        ("magface", MAGFACE),
        ("curricularface", CURRICULARFACE),
        ("mvsoftmax", MVSOFTMAX),
    ];
}

/// AdaFace clamps cosines to `[-1 + ADAFACE_EPS, 1 - ADAFACE_EPS]` and the shifted angle to
/// `[ADAFACE_EPS, pi - ADAFACE_EPS]`, as the AdaFace paper's head does.
pub const ADAFACE_EPS: f64 = 1e-3;

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
    /// (InsightFace's option), which makes psi jump up at theta = pi/2. `straight_through`
    /// puts the margin on without its gradient (psi' = 1), as InsightFace's arcface_torch.
    ArcFace {
        s: f64,
        m: f64,
        easy_margin: bool,
        straight_through: bool,
    },
    /// Additive cosine margin: psi = c - m.
    CosFace { s: f64, m: f64 },
    /// Multiplicative angular margin (A-Softmax) with integer m, blended with c by lambda.
    SphereFace { m: u32, s: Option<f64>, lambda: f64 },
    /// psi = cos(m1 theta + m2) - m3 (`straight_through` as ArcFace's).
    Combined {
        s: f64,
        m1: f64,
        m2: f64,
        m3: f64,
        straight_through: bool,
    },
    /// AdaFace: with c clamped to `1 -+ ADAFACE_EPS` and theta = acos(c),
    /// psi = cos(clamp(theta - m z, eps, pi - eps)) - (m + m z), where z in [-1, 1] is the
    /// row's margin scaler from its feature norm (computed by the caller, who keeps the
    /// running statistics).
    AdaFace { s: f64, m: f64, z: f64 },
    /// MagFace: ArcFace with margin m(a) = l_m + (u_m - l_m)(a - l_a)/(u_a - l_a) of the
    /// row's feature norm a = clamp(||x||, l_a, u_a) (the gradient flows through a), and the
    /// loss term lambda_g (a / u_a^2 + 1 / a) of [`Margin::penalty`].
    MagFace {
        s: f64,
        l_a: f64,
        u_a: f64,
        l_m: f64,
        u_m: f64,
        easy_margin: bool,
        lambda_g: f64,
    },
    /// CurricularFace: ArcFace's target (with its fallback), and every non-target cosine
    /// above cos(theta_y + m) becomes `c (t + c)` ([`HardNegatives`]); t is the running mean
    /// of the target cosines, kept by the caller.
    CurricularFace { s: f64, m: f64, t: f64 },
    /// MV-Softmax (FaceX-Zoo's adaptive MV-AM / MV-Arc): target `c - m` where c > m
    /// (`arc`: cos(theta + m) where c > 0), else c; every non-target cosine above the margined
    /// target (`c_y - m`, or cos(theta_y + m)) becomes `t c + t - 1`.
    MvSoftmax { s: f64, m: f64, t: f64, arc: bool },
}

/// Which rule re-weights a row's hard negatives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardRule {
    /// CurricularFace: `h(c) = c (t + c)`, `h'(c) = t + 2c`.
    Curricular,
    /// MV-Softmax: `h(c) = t c + t - 1`, `h'(c) = t`.
    MvSoftmax,
}

/// How one row's non-target cosines change before scaling: those above `above` (a function
/// of the row's target cosine, taken without gradient) are hard negatives and become
/// `h(c)` of [`HardRule`]; the others stay `c`. The head applies it with
/// `kernels::NonTarget::apply`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HardNegatives {
    pub above: f64,
    pub t: f64,
    pub rule: HardRule,
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
            straight_through: false,
        })
    }

    /// This margin with `straight_through` set: the margin shifts the target logit but its
    /// gradient is that of the plain logit (psi' = 1). ArcFace and Combined only.
    pub fn with_straight_through(self, on: bool) -> Result<Self> {
        match self {
            Margin::ArcFace {
                s, m, easy_margin, ..
            } => Ok(Margin::ArcFace {
                s,
                m,
                easy_margin,
                straight_through: on,
            }),
            Margin::Combined { s, m1, m2, m3, .. } => Ok(Margin::Combined {
                s,
                m1,
                m2,
                m3,
                straight_through: on,
            }),
            _ if !on => Ok(self),
            _ => Err(Error::invalid(
                "grad",
                "'straight_through' applies to ArcFace and CombinedMargin only",
            )),
        }
    }

    /// AdaFace with margin `m` and this row's margin scaler `z` (0 for a margin not yet
    /// given a row).
    pub fn adaface(s: f64, m: f64, z: f64) -> Result<Self> {
        Ok(Margin::AdaFace {
            s: check_scale(s)?,
            m: check_range("m", m, 0.0, PI / 2.0, "in [0, pi/2)")?,
            z: if z.is_finite() && (-1.0..=1.0).contains(&z) {
                z
            } else {
                return Err(Error::invalid("z", format!("must be in [-1, 1], got {z}")));
            },
        })
    }

    pub fn magface(
        s: f64,
        (l_a, u_a): (f64, f64),
        (l_m, u_m): (f64, f64),
        easy_margin: bool,
        lambda_g: f64,
    ) -> Result<Self> {
        let positive = "a finite number > 0";
        let l_a = check_range("l_a", l_a, f64::MIN_POSITIVE, f64::INFINITY, positive)?;
        let u_a = check_range("u_a", u_a, f64::MIN_POSITIVE, f64::INFINITY, positive)?;
        if u_a <= l_a {
            return Err(Error::invalid(
                "u_a",
                format!("must be > l_a = {l_a}, got {u_a}"),
            ));
        }
        let l_m = check_range("l_m", l_m, 0.0, PI, "in [0, pi)")?;
        let u_m = check_range("u_m", u_m, 0.0, PI, "in [0, pi)")?;
        let lambda_g = check_range(
            "lambda_g",
            lambda_g,
            0.0,
            f64::INFINITY,
            "a finite number >= 0",
        )?;
        Ok(Margin::MagFace {
            s: check_scale(s)?,
            l_a,
            u_a,
            l_m,
            u_m,
            easy_margin,
            lambda_g,
        })
    }

    /// CurricularFace with margin `m` and the running mean target cosine `t` (in [-1, 1]).
    pub fn curricularface(s: f64, m: f64, t: f64) -> Result<Self> {
        Ok(Margin::CurricularFace {
            s: check_scale(s)?,
            m: check_range("m", m, 0.0, PI, "in [0, pi)")?,
            t: if t.is_finite() && (-1.0..=1.0).contains(&t) {
                t
            } else {
                return Err(Error::invalid("t", format!("must be in [-1, 1], got {t}")));
            },
        })
    }

    /// MV-Softmax with margin `m` (cosine, or angular when `arc`) and weight `t >= 1`.
    pub fn mvsoftmax(s: f64, m: f64, t: f64, arc: bool) -> Result<Self> {
        let m = if arc {
            check_range("m", m, 0.0, PI, "in [0, pi)")?
        } else {
            check_range("m", m, 0.0, f64::INFINITY, "a finite number >= 0")?
        };
        Ok(Margin::MvSoftmax {
            s: check_scale(s)?,
            m,
            t: check_range("t", t, 1.0, f64::INFINITY, "a finite number >= 1")?,
            arc,
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
            straight_through: false,
        })
    }

    pub fn scale(&self) -> Scale {
        match *self {
            Margin::Softmax { s }
            | Margin::ArcFace { s, .. }
            | Margin::CosFace { s, .. }
            | Margin::Combined { s, .. }
            | Margin::AdaFace { s, .. }
            | Margin::MagFace { s, .. }
            | Margin::CurricularFace { s, .. }
            | Margin::MvSoftmax { s, .. } => Scale::Fixed(s),
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
            Margin::AdaFace { .. } => kind::ADAFACE,
            Margin::MagFace { .. } => kind::MAGFACE,
            Margin::CurricularFace { .. } => kind::CURRICULARFACE,
            Margin::MvSoftmax { .. } => kind::MVSOFTMAX,
        }
    }

    /// The parameter block `[kind, s, p0, ...]` (layout in [`kind`]).
    pub fn encode(&self) -> [f64; PARAMS_LEN] {
        let s = match self.scale() {
            Scale::Fixed(s) => s,
            Scale::FeatureNorm => 0.0,
        };
        let flag = |b: bool| f64::from(u8::from(b));
        let params: &[f64] = match *self {
            Margin::Softmax { .. } => &[],
            Margin::CosFace { m, .. } => &[m],
            Margin::ArcFace {
                m,
                easy_margin,
                straight_through,
                ..
            } => &[m, flag(easy_margin), flag(straight_through)],
            Margin::Combined {
                m1,
                m2,
                m3,
                straight_through,
                ..
            } => &[m1, m2, m3, flag(straight_through)],
            Margin::SphereFace { m, lambda, .. } => &[f64::from(m), lambda],
            Margin::AdaFace { m, z, .. } => &[m, z],
            Margin::MagFace {
                l_a,
                u_a,
                l_m,
                u_m,
                easy_margin,
                lambda_g,
                ..
            } => &[l_a, u_a, l_m, u_m, flag(easy_margin), lambda_g],
            Margin::CurricularFace { m, t, .. } => &[m, t],
            Margin::MvSoftmax { m, t, arc, .. } => &[m, t, flag(arc)],
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
            Some(kind::ARCFACE) => Margin::arcface(s, p[0], flag(p[1], "easy_margin")?)?
                .with_straight_through(flag(p[2], "grad")?),
            Some(kind::COMBINED) => {
                Margin::combined(s, p[0], p[1], p[2])?.with_straight_through(flag(p[3], "grad")?)
            }
            Some(kind::ADAFACE) => Margin::adaface(s, p[0], p[1]),
            Some(kind::MAGFACE) => Margin::magface(
                s,
                (p[0], p[1]),
                (p[2], p[3]),
                flag(p[4], "easy_margin")?,
                p[5],
            ),
            Some(kind::CURRICULARFACE) => Margin::curricularface(s, p[0], p[1]),
            Some(kind::MVSOFTMAX) => Margin::mvsoftmax(s, p[0], p[1], flag(p[2], "kind")?),
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
    pub fn target(&self, c: f64, row: RowContext) -> Target {
        let c = if c.is_nan() { c } else { c.clamp(-1.0, 1.0) };
        let (psi, dpsi) = match *self {
            Margin::Softmax { .. } => (c, 1.0),
            Margin::CosFace { m, .. } => (c - m, 1.0),
            Margin::ArcFace {
                m,
                easy_margin,
                straight_through,
                ..
            } => {
                let (psi, dpsi) = if easy_margin && c <= 0.0 {
                    (c, 1.0)
                } else {
                    angular(c, 1.0, m, 0.0)
                };
                (psi, if straight_through { 1.0 } else { dpsi })
            }
            Margin::Combined {
                m1,
                m2,
                m3,
                straight_through,
                ..
            } => {
                let (psi, dpsi) = angular(c, m1, m2, m3);
                (psi, if straight_through { 1.0 } else { dpsi })
            }
            Margin::AdaFace { m, z, .. } => adaface(c, m, z),
            Margin::MagFace {
                l_a,
                u_a,
                l_m,
                u_m,
                easy_margin,
                ..
            } => {
                let a = row.norm.clamp(l_a, u_a);
                let slope = (u_m - l_m) / (u_a - l_a);
                let m = l_m + slope * (a - l_a);
                let (psi, dpsi, dpsi_dm) = if easy_margin && c <= 0.0 {
                    (c, 1.0, 0.0)
                } else {
                    arc_with_dm(c, m)
                };
                // a = clamp(norm): no gradient through the norm outside [l_a, u_a] (torch's clamp)
                let inside = (l_a..=u_a).contains(&row.norm);
                return Target {
                    psi,
                    dpsi,
                    dpsi_dnorm: if inside { dpsi_dm * slope } else { 0.0 },
                };
            }
            Margin::CurricularFace { m, .. } => angular(c, 1.0, m, 0.0),
            Margin::MvSoftmax { m, arc: false, .. } => (if c > m { c - m } else { c }, 1.0),
            Margin::MvSoftmax { m, arc: true, .. } => {
                if c > 0.0 {
                    angular(c, 1.0, m, 0.0)
                } else {
                    (c, 1.0)
                }
            }
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

    /// A row's term of the loss besides the softmax, and its derivative in `||x||`:
    /// MagFace's regulariser `lambda_g g(a)`, g(a) = a / u_a^2 + 1 / a; zero for the others.
    pub fn penalty(&self, row: RowContext) -> (f64, f64) {
        match *self {
            Margin::MagFace {
                l_a, u_a, lambda_g, ..
            } => {
                let a = row.norm.clamp(l_a, u_a);
                let inside = (l_a..=u_a).contains(&row.norm);
                let value = lambda_g * (a / (u_a * u_a) + 1.0 / a);
                let slope = lambda_g * (1.0 / (u_a * u_a) - 1.0 / (a * a));
                (value, if inside { slope } else { 0.0 })
            }
            _ => (0.0, 0.0),
        }
    }

    /// The rule for a row's hard negatives given its target cosine (clamped to [-1, 1]),
    /// None for the margins that leave non-targets alone.
    pub fn hard_negatives(&self, target_cos: f64) -> Option<HardNegatives> {
        let c = target_cos.clamp(-1.0, 1.0);
        // cos(theta + m) without ArcFace's fallback, as both references threshold on it
        let shifted = |m: f64| (c.acos() + m).cos();
        match *self {
            Margin::CurricularFace { m, t, .. } => Some(HardNegatives {
                above: shifted(m),
                t,
                rule: HardRule::Curricular,
            }),
            Margin::MvSoftmax { m, t, arc, .. } => Some(HardNegatives {
                above: if arc { shifted(m) } else { c - m },
                t,
                rule: HardRule::MvSoftmax,
            }),
            _ => None,
        }
    }

    /// The largest `|h(c)|` over c in [-1, 1] of this margin's hard negatives (1 without).
    fn negatives_peak(&self) -> f64 {
        match *self {
            Margin::CurricularFace { t, .. } => 1.0 + t.abs(),
            Margin::MvSoftmax { t, .. } => 2.0 * t - 1.0,
            _ => 1.0,
        }
    }

    /// Whether psi or the loss read the feature norm (so a cosine matrix is not enough).
    pub fn reads_norm(&self) -> bool {
        matches!(self, Margin::MagFace { .. })
    }

    /// The largest `|psi|` over c in [-1, 1] for any row (bounds the logits).
    pub fn peak(&self) -> f64 {
        let at = |norm: f64| {
            let row = RowContext { norm };
            let ends = [1.0, -1.0].map(|c| self.target(c, row).psi.abs());
            ends[0].max(ends[1])
        };
        let norms = match *self {
            Margin::MagFace { l_a, u_a, .. } => [l_a, u_a],
            _ => [1.0, 1.0],
        };
        at(norms[0]).max(at(norms[1])).max(self.negatives_peak())
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

/// ArcFace's psi and psi' at margin m, and d psi / d m (MagFace's margin moves with the norm).
fn arc_with_dm(c: f64, m: f64) -> (f64, f64, f64) {
    let (psi, dpsi) = angular(c, 1.0, m, 0.0);
    let theta = c.acos();
    let dpsi_dm = if theta > PI - m {
        // the fallback c - k(m), k = max(m sin m, 1 - cos m) (theta* = pi - m)
        if m * m.sin() >= 1.0 - m.cos() {
            -(m.sin() + m * m.cos())
        } else {
            -m.sin()
        }
    } else {
        -(theta + m).sin()
    };
    (psi, dpsi, dpsi_dm)
}

/// AdaFace's psi and psi' (see [`Margin::AdaFace`]); psi' is 0 where a clamp is active.
fn adaface(c: f64, m: f64, z: f64) -> (f64, f64) {
    let eps = ADAFACE_EPS;
    let cc = c.clamp(-1.0 + eps, 1.0 - eps);
    let theta = cc.acos();
    let shifted = theta - m * z;
    let t = shifted.clamp(eps, PI - eps);
    let psi = t.cos() - (m + m * z);
    let free = cc == c && t == shifted;
    (psi, if free { t.sin() / theta.sin() } else { 0.0 })
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
pub(crate) mod tests;
