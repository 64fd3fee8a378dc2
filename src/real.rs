//! The two float types the heads run in.

use ndarray::LinalgScalar;
use num_traits::Float;
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

/// `f32` or `f64`: what the GEMMs and the elementwise kernels are generic over.
pub trait Real:
    Float + LinalgScalar + Send + Sync + Debug + Default + Sum + AddAssign + SubAssign + MulAssign
{
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
    /// exp that vectorises (see `kernels::exp_f32`); plain `exp` for f64.
    fn fast_exp(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        crate::kernels::exp_f32(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
    }
}
