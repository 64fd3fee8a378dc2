//! The two float types the heads run in.

use crate::gemm::{Packed, Side};
use ndarray::linalg::general_mat_mul;
use ndarray::{s, ArrayBase, ArrayView2, ArrayViewMut2, Data, DataMut, Ix2, LinalgScalar};
use num_traits::Float;
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

/// `f32` or `f64`: what the GEMMs and the elementwise kernels are generic over.
pub trait Real:
    Float
    + LinalgScalar
    + Send
    + Sync
    + Debug
    + Default
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + crate::pages::Recycled
{
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
    /// exp that vectorises (see `kernels::exp_f32`); plain `exp` for f64.
    fn fast_exp(self) -> Self;
    /// Name of the dtype, as NumPy spells it.
    const NAME: &'static str;
    /// Norms (and reciprocals) in `[1/SAFE_SCALE, SAFE_SCALE]` keep every product of the
    /// head and the search well inside the normal range of `T`: rows outside it are rescaled
    /// by a power of two first (exactly), so that denormals and overflow never arise.
    const SAFE_SCALE: f64;
    /// The largest finite value, as f64.
    const MAX: f64;
    /// Gradients divide by a row's norm; below this norm they divide by this instead, so
    /// that a tiny (but valid) row cannot make them overflow (2^-100 for f32, 2^-1000 for
    /// f64). The forward pass is exact for every finite non-zero row regardless.
    const GRAD_NORM_MIN: f64;

    /// `c = alpha·a·b + beta·c` (`beta = 0` overwrites `c`): the project's AVX-512 kernel
    /// for f32 where the CPU has it ([`crate::gemm`]), else matrixmultiply.
    fn gemm<S1, S2, S3>(
        alpha: Self,
        a: &ArrayBase<S1, Ix2>,
        b: &ArrayBase<S2, Ix2>,
        beta: Self,
        c: &mut ArrayBase<S3, Ix2>,
    ) where
        S1: Data<Elem = Self>,
        S2: Data<Elem = Self>,
        S3: DataMut<Elem = Self>,
    {
        general_mat_mul(alpha, a, b, beta, c);
    }

    /// `m` as the same operand of many products: packed once where [`crate::gemm`]'s
    /// kernel runs, else the view.
    fn pack(m: ArrayView2<'_, Self>, side: Side) -> Packed<'_, Self> {
        Packed::plain(m, side)
    }

    /// [`Real::gemm`] with a left operand from [`Real::pack`], of which `c` takes the
    /// first `c.nrows()` rows.
    fn gemm_packed_left(
        alpha: Self,
        a: &Packed<Self>,
        b: &ArrayView2<Self>,
        beta: Self,
        c: &mut ArrayViewMut2<Self>,
    ) {
        general_mat_mul(alpha, &a.view().slice(s![..c.nrows(), ..]), b, beta, c);
    }

    /// [`Real::gemm`] with a right operand from [`Real::pack`], of which `c` takes the
    /// first `c.ncols()` columns.
    fn gemm_packed_right(
        alpha: Self,
        a: &ArrayView2<Self>,
        b: &Packed<Self>,
        beta: Self,
        c: &mut ArrayViewMut2<Self>,
    ) {
        general_mat_mul(alpha, a, &b.view().slice(s![.., ..c.ncols()]), beta, c);
    }
}

impl Real for f32 {
    const NAME: &'static str = "float32";
    const SAFE_SCALE: f64 = (1u64 << 20) as f64;
    const MAX: f64 = f32::MAX as f64;
    const GRAD_NORM_MIN: f64 = 7.888609052210118e-31; // 2^-100
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
    // the trait's signatures again (an override must restate them): f32 goes to crate::gemm
    fn gemm<S1, S2, S3>(
        alpha: Self,
        a: &ArrayBase<S1, Ix2>,
        b: &ArrayBase<S2, Ix2>,
        beta: Self,
        c: &mut ArrayBase<S3, Ix2>,
    ) where
        S1: Data<Elem = Self>,
        S2: Data<Elem = Self>,
        S3: DataMut<Elem = Self>,
    {
        crate::gemm::sgemm(alpha, &a.view(), &b.view(), beta, &mut c.view_mut());
    }

    fn pack(m: ArrayView2<'_, Self>, side: Side) -> Packed<'_, Self> {
        Packed::new(m, side)
    }

    fn gemm_packed_left(
        alpha: Self,
        a: &Packed<Self>,
        b: &ArrayView2<Self>,
        beta: Self,
        c: &mut ArrayViewMut2<Self>,
    ) {
        crate::gemm::sgemm_packed_left(alpha, a, b, beta, c);
    }

    fn gemm_packed_right(
        alpha: Self,
        a: &ArrayView2<Self>,
        b: &Packed<Self>,
        beta: Self,
        c: &mut ArrayViewMut2<Self>,
    ) {
        crate::gemm::sgemm_packed_right(alpha, a, b, beta, c);
    }
}

impl Real for f64 {
    const NAME: &'static str = "float64";
    const SAFE_SCALE: f64 = 1.6069380442589903e60; // 2^200
    const MAX: f64 = f64::MAX;
    const GRAD_NORM_MIN: f64 = 9.332636185032189e-302; // 2^-1000
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
