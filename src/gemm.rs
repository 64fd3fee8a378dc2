//! `C = alpha·A·B + beta·C` for the head's tiles and the search's many-query tiles.
//!
//! float32 on a CPU with AVX-512 runs the project's own kernel ([`avx512`]); everything else
//! (float64, AVX2, NEON, scalar, `ARCFACE_RS_SIMD` below avx512, small products) runs
//! matrixmultiply through ndarray, as before. matrixmultiply 0.3.11 has an AVX-512 kernel
//! of its own (16×16); the one here (12×32, panels packed with in-register transposes) is
//! faster on the head's forward shape and close on the two backward ones (benches/
//! bench_gemm.py; benches/README.md).
//!
//! Every call is single-threaded: the callers already run one GEMM per class tile (or
//! gallery tile) on each rayon thread. An operand that every tile shares (the head's rows
//! of X̂, the search's queries) is packed once into a [`Packed`] instead of once per tile.

use ndarray::linalg::general_mat_mul;
use ndarray::{s, ArrayView2, ArrayViewMut2};

/// Below this many multiply-adds the packing does not pay for itself: matrixmultiply.
const SMALL: usize = 16 * 16 * 16;

/// `c = alpha·a·b + beta·c` in float32 (`beta = 0`: `c` is overwritten, never read).
pub fn sgemm(
    alpha: f32,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert!(
        k == k2 && c.dim() == (m, n),
        "gemm shapes: ({m}, {k}) · ({k2}, {n}) into {:?}",
        c.dim()
    );
    #[cfg(target_arch = "x86_64")]
    if k > 0
        && m.saturating_mul(n).saturating_mul(k) >= SMALL
        && crate::kernels::simd_in_use() == crate::kernels::SimdLevel::Avx512
    {
        // SAFETY: the CPU has AVX-512F (the level says so); the views describe in-bounds
        // matrices through their pointers and strides, and `c` is borrowed mutably.
        unsafe {
            avx512::gemm(
                (m, n, k),
                alpha,
                avx512::Source::Strided(Strided::of(a)),
                avx512::Source::Strided(Strided::of(b)),
                beta,
                c,
            )
        };
        return;
    }
    general_mat_mul(alpha, a, b, beta, c);
}

/// Which operand of the products a [`Packed`] matrix is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A in `A·B`.
    Left,
    /// B in `A·B`.
    Right,
}

/// A matrix that is the same operand of many products, packed once into the kernel's
/// panels (float32 with the AVX-512 kernel); otherwise just the view, and every product
/// reads it as [`sgemm`] would.
pub struct Packed<'a, T> {
    view: ArrayView2<'a, T>,
    side: Side,
    /// The panels of every depth block, one block after the other; empty when unpacked.
    panels: Vec<f32>,
}

impl<'a, T> Packed<'a, T> {
    /// The view unpacked: products read it directly.
    pub fn plain(view: ArrayView2<'a, T>, side: Side) -> Self {
        Packed {
            view,
            side,
            panels: Vec::new(),
        }
    }

    /// The matrix.
    pub fn view(&self) -> ArrayView2<'a, T> {
        self.view
    }
}

impl<'a> Packed<'a, f32> {
    /// The panels as the kernel reads them.
    #[cfg(target_arch = "x86_64")]
    fn source(&self) -> avx512::Source {
        let padded = match self.side {
            Side::Left => self.view.nrows().div_ceil(avx512::MR) * avx512::MR,
            Side::Right => self.view.ncols().div_ceil(avx512::NR) * avx512::NR,
        };
        avx512::Source::Packed {
            panels: self.panels.as_ptr(),
            padded,
        }
    }

    /// `view` packed for the side it will be on, where the AVX-512 kernel runs.
    pub fn new(view: ArrayView2<'a, f32>, side: Side) -> Self {
        #[cfg(target_arch = "x86_64")]
        if !view.is_empty() && crate::kernels::simd_in_use() == crate::kernels::SimdLevel::Avx512 {
            // SAFETY: the CPU has AVX-512F; the view is in bounds for its strides.
            let panels = unsafe { avx512::pack_whole(Strided::of(&view), view.dim(), side) };
            return Packed { view, side, panels };
        }
        Packed::plain(view, side)
    }
}

/// [`sgemm`] with a left operand packed once for many products: `c` takes the product of
/// the first `c.nrows()` rows of `a` (all of them, or a leading block).
pub fn sgemm_packed_left(
    alpha: f32,
    a: &Packed<f32>,
    b: &ArrayView2<f32>,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    assert_eq!(a.side, Side::Left, "a right operand used on the left");
    let m = c.nrows().min(a.view.nrows());
    let ((k, k2), n) = ((a.view.ncols(), b.nrows()), b.ncols());
    #[cfg(target_arch = "x86_64")]
    if !a.panels.is_empty() && k == k2 && c.dim() == (m, n) {
        // SAFETY: the panels exist, so the CPU has AVX-512F; they hold the whole of `a`
        // (checked shapes; the first m rows are read); `b` and `c` are in bounds for their
        // strides.
        unsafe {
            avx512::gemm(
                (m, n, k),
                alpha,
                a.source(),
                avx512::Source::Strided(Strided::of(b)),
                beta,
                c,
            )
        };
        return;
    }
    sgemm(alpha, &a.view.slice(s![..m, ..]), b, beta, c);
}

/// [`sgemm`] with a right operand packed once for many products: `c` takes the product
/// with the first `c.ncols()` columns of `b` (all of them, or a leading block).
pub fn sgemm_packed_right(
    alpha: f32,
    a: &ArrayView2<f32>,
    b: &Packed<f32>,
    beta: f32,
    c: &mut ArrayViewMut2<f32>,
) {
    assert_eq!(b.side, Side::Right, "a left operand used on the right");
    let n = c.ncols().min(b.view.ncols());
    let ((m, k), k2) = (a.dim(), b.view.nrows());
    #[cfg(target_arch = "x86_64")]
    if !b.panels.is_empty() && k == k2 && c.dim() == (m, n) {
        // SAFETY: as in sgemm_packed_left, with the sides swapped.
        unsafe {
            avx512::gemm(
                (m, n, k),
                alpha,
                avx512::Source::Strided(Strided::of(a)),
                b.source(),
                beta,
                c,
            )
        };
        return;
    }
    sgemm(alpha, a, &b.view.slice(s![.., ..n]), beta, c);
}

/// A matrix read through its first element and its (row, column) strides in elements.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Strided {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Strided {
    fn of(m: &ArrayView2<f32>) -> Self {
        Strided {
            ptr: m.as_ptr(),
            rs: m.strides()[0],
            cs: m.strides()[1],
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! A packed GEMM around a 12×32 register tile.
    //!
    //! The micro-kernel keeps a 12×32 block of C in 24 zmm accumulators (two registers of
    //! 16 floats per row); each step of k loads one 32-float row of a packed B panel and
    //! broadcasts the 12 values of a packed A column into 24 FMAs. Panels are packed so both
    //! are read contiguously whatever the caller's strides: B in KC×NR panels of a KC×NC
    //! block (kept in L2), A in MR×KC panels of an MC×KC block. Unlike BLIS, which sweeps
    //! the A panels under one B panel, each A panel (12 KB, in L1) sweeps the B panels: C
    //! is then written 12 whole rows at a time, front to back, which the stores' prefetch
    //! follows (the head's dW tiles land in a fresh (C, D) gradient; the column-strip order
    //! cost it ~10%, benches/bench_gemm.py). Ragged edges are packed with zeros and written
    //! back through a small buffer.

    use super::{Side, Strided};
    use ndarray::ArrayViewMut2;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    pub(super) const MR: usize = 12;
    pub(super) const NR: usize = 32;
    /// Depth of one pass: with D = 512 the head's forward GEMM is one pass over C instead
    /// of two (measured 384 against 512: ~3% faster forward, the rest the same).
    const KC: usize = 512;
    /// Rows of A packed at once (MC×KC floats, 384 KB).
    const MC: usize = MR * 16;
    /// Columns of B packed at once: the KC×NC block (1 MB) stays in a server core's L2
    /// while every A panel sweeps it.
    const NC: usize = NR * 16;

    thread_local! {
        /// Packing buffers, kept per thread across calls (the head calls once per tile).
        static PACKS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// An operand as the products read it: strided (packed per product into the thread's
    /// buffers) or packed whole by [`pack_whole`].
    #[derive(Clone, Copy)]
    pub(super) enum Source {
        Strided(Strided),
        /// `padded`: the packed matrix's rows (A) or columns (B), rounded up to panels; a
        /// product may read a leading block of them.
        Packed {
            panels: *const f32,
            padded: usize,
        },
    }

    /// `a` (m×k) or `b` (k×n) packed whole: for each depth block of KC (the last may be
    /// shorter), the panels `pack_a` / `pack_b` would make of all its rows / columns. Block
    /// `pc` starts at `pc × padded` (`padded`: the rows or columns rounded up to panels).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `m` is in bounds for `dim` and its strides.
    pub(super) unsafe fn pack_whole(m: Strided, dim: (usize, usize), side: Side) -> Vec<f32> {
        let (rows, cols) = dim;
        let (k, padded) = match side {
            Side::Left => (cols, rows.div_ceil(MR) * MR),
            Side::Right => (rows, cols.div_ceil(NR) * NR),
        };
        let mut out = vec![0.0f32; k * padded];
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let block = &mut out[pc * padded..];
            match side {
                Side::Left => pack_a(rows, kc, m, 0, pc, block),
                Side::Right => pack_b(kc, cols, m, pc, 0, block),
            }
        }
        out
    }

    /// See [`super::sgemm`]; `dims` is (m, n, k).
    ///
    /// # Safety
    /// The CPU has AVX-512F; strided operands are valid for their strides, packed ones hold
    /// the whole operand of these dims ([`pack_whole`]); `c` does not overlap them.
    pub(super) unsafe fn gemm(
        dims: (usize, usize, usize),
        alpha: f32,
        a: Source,
        b: Source,
        beta: f32,
        c: &mut ArrayViewMut2<f32>,
    ) {
        let (m, n, k) = dims;
        let (rsc, csc) = (c.strides()[0], c.strides()[1]);
        let c = c.as_mut_ptr();
        PACKS.with(|packs| {
            let mut packs = packs.borrow_mut();
            let (pa, pb) = &mut *packs;
            if let Source::Strided(_) = a {
                pa.resize(MC * KC, 0.0);
            }
            if let Source::Strided(_) = b {
                pb.resize(NC * KC, 0.0);
            }
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                for pc in (0..k).step_by(KC) {
                    let kc = KC.min(k - pc);
                    // the first pass over k applies beta; the others add to it
                    let beta = if pc == 0 { beta } else { 1.0 };
                    let b_block = match b {
                        Source::Strided(b) => {
                            pack_b(kc, nc, b, pc, jc, pb);
                            pb.as_ptr()
                        }
                        Source::Packed { panels, padded } => panels.add(pc * padded + jc * kc),
                    };
                    for ic in (0..m).step_by(MC) {
                        let mc = MC.min(m - ic);
                        let a_block = match a {
                            Source::Strided(a) => {
                                pack_a(mc, kc, a, ic, pc, pa);
                                pa.as_ptr()
                            }
                            Source::Packed { panels, padded } => panels.add(pc * padded + ic * kc),
                        };
                        for ir in (0..mc).step_by(MR) {
                            let mr = MR.min(mc - ir);
                            let ap = a_block.add(ir * kc);
                            for jr in (0..nc).step_by(NR) {
                                let nr = NR.min(nc - jr);
                                let bp = b_block.add(jr * kc);
                                let ct =
                                    c.offset((ic + ir) as isize * rsc + (jc + jr) as isize * csc);
                                tile(kc, ap, bp, ct, rsc, csc, mr, nr, alpha, beta);
                            }
                        }
                    }
                }
            }
        });
    }

    /// Packs rows `ic..ic+mc`, columns `pc..pc+kc` of A as MR-row panels: panel p holds, for
    /// each of the kc columns, its MR values (rows past `mc` are zeros).
    unsafe fn pack_a(mc: usize, kc: usize, a: Strided, ic: usize, pc: usize, out: &mut [f32]) {
        if a.rs == 1 {
            let first = a.ptr.offset(ic as isize + pc as isize * a.cs);
            return pack_segments::<MR>(out, kc, mc, first, a.cs);
        }
        for (p, panel) in out[..mc.div_ceil(MR) * MR * kc]
            .chunks_exact_mut(MR * kc)
            .enumerate()
        {
            let rows = MR.min(mc - p * MR);
            let first = a
                .ptr
                .offset((ic + p * MR) as isize * a.rs + pc as isize * a.cs);
            gather::<MR>(panel, kc, rows, first, a.rs, a.cs);
        }
    }

    /// Packs rows `pc..pc+kc`, columns `jc..jc+nc` of B as NR-column panels: panel p holds,
    /// for each of the kc rows, its NR values (columns past `nc` are zeros).
    unsafe fn pack_b(kc: usize, nc: usize, b: Strided, pc: usize, jc: usize, out: &mut [f32]) {
        if b.cs == 1 {
            let first = b.ptr.offset(pc as isize * b.rs + jc as isize);
            return pack_segments::<NR>(out, kc, nc, first, b.rs);
        }
        for (p, panel) in out[..nc.div_ceil(NR) * NR * kc]
            .chunks_exact_mut(NR * kc)
            .enumerate()
        {
            let cols = NR.min(nc - p * NR);
            let first = b
                .ptr
                .offset(pc as isize * b.rs + (jc + p * NR) as isize * b.cs);
            gather::<NR>(panel, kc, cols, first, b.cs, b.rs);
        }
    }

    /// Packs `lanes` lanes into W-wide panels when each step of k is one contiguous segment
    /// (`first + l·step`, lanes side by side): the segment is read once, front to back, and
    /// cut into the panels' groups. Packing panel after panel instead would revisit every
    /// segment once per panel, a few floats at a time, and segments a power-of-two stride
    /// apart (the head's 512- and 2048-float rows) fall into the same few L1 sets.
    #[inline(always)]
    unsafe fn pack_segments<const W: usize>(
        out: &mut [f32],
        kc: usize,
        lanes: usize,
        first: *const f32,
        step: isize,
    ) {
        let panels = lanes.div_ceil(W);
        let out = out.as_mut_ptr();
        for l in 0..kc {
            let src = first.offset(l as isize * step);
            for p in 0..panels {
                let dst = out.add(p * W * kc + l * W);
                let n = W.min(lanes - p * W);
                if n == W {
                    // a constant length: inlined as a few vector moves, not a memmove call
                    std::ptr::copy_nonoverlapping(src.add(p * W), dst, W);
                    continue;
                }
                std::ptr::copy_nonoverlapping(src.add(p * W), dst, n);
                // zeros, not stale values (which could be denormals that slow the FMAs)
                std::ptr::write_bytes(dst.add(n), 0, W - n);
            }
        }
    }

    /// Fills `panel` (`kc` groups of `W` values) with `lanes` strands of a matrix: value `l`
    /// of group lane `j` is `first[j·lane_stride + l·step]`; lanes past `lanes` are zeros.
    /// The panel is written in order (one cache line after another) and the strands are
    /// read side by side, each moving forward: far cheaper than scattering each strand
    /// across the panel when the strands are the matrix's contiguous rows.
    #[inline(always)]
    unsafe fn gather<const W: usize>(
        panel: &mut [f32],
        kc: usize,
        lanes: usize,
        first: *const f32,
        lane_stride: isize,
        step: isize,
    ) {
        if lane_stride == 1 && lanes == W {
            // each group is W contiguous values: a copy per group
            for (l, group) in panel.chunks_exact_mut(W).take(kc).enumerate() {
                let src = first.offset(l as isize * step);
                group.copy_from_slice(std::slice::from_raw_parts(src, W));
            }
            return;
        }
        let mut strands = [first; W];
        for (j, s) in strands.iter_mut().enumerate().take(lanes) {
            *s = first.offset(j as isize * lane_stride);
        }
        let mut done = 0;
        if step == 1 {
            // contiguous strands (row-major A, B = Wᵀ): 16×16 blocks transposed in registers
            done = kc / 16 * 16;
            // every lane is written, the ones past `lanes` with zeros (stale values could be
            // denormals, which slow the FMAs down)
            for j0 in (0..W).step_by(16) {
                transposed_blocks::<W>(panel, done, &strands, j0, lanes.saturating_sub(j0).min(16));
            }
        }
        for (l, group) in panel.chunks_exact_mut(W).take(kc).enumerate().skip(done) {
            let at = l as isize * step;
            for (j, v) in group.iter_mut().enumerate() {
                *v = if j < lanes {
                    *strands[j].offset(at)
                } else {
                    0.0
                };
            }
        }
    }

    /// Groups `0..kc` (a multiple of 16) of lanes `j0..j0 + n` of the panel from strands
    /// `j0..j0 + n`: each 16×16 block (16 values of up to 16 strands) is loaded as rows,
    /// transposed with shuffles and stored as 16 groups' lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transposed_blocks<const W: usize>(
        panel: &mut [f32],
        kc: usize,
        strands: &[*const f32; W],
        j0: usize,
        n: usize,
    ) {
        // the lanes a group holds from j0 on: 16, or what is left of it (12-wide A panels)
        let store_mask: __mmask16 = if W - j0 >= 16 {
            0xffff
        } else {
            (1u16 << (W - j0)) - 1
        };
        let out = panel.as_mut_ptr();
        for l in (0..kc).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, row) in r.iter_mut().enumerate().take(n) {
                *row = _mm512_loadu_ps(strands[j0 + j].add(l));
            }
            let t = transpose16(r);
            for (e, v) in t.iter().enumerate() {
                _mm512_mask_storeu_ps(out.add((l + e) * W + j0), store_mask, *v);
            }
        }
    }

    /// The transpose of a 16×16 block of floats held as 16 rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        // 32-bit interleave of row pairs, within each 128-bit lane
        let mut a = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // 64-bit interleave: b[4q + e], lane k = element 4k + e of rows 4q..4q+4
        let mut b = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let (x0, x1, x2, x3) = (
                pd(a[4 * q]),
                pd(a[4 * q + 1]),
                pd(a[4 * q + 2]),
                pd(a[4 * q + 3]),
            );
            b[4 * q] = ps(_mm512_unpacklo_pd(x0, x2));
            b[4 * q + 1] = ps(_mm512_unpackhi_pd(x0, x2));
            b[4 * q + 2] = ps(_mm512_unpacklo_pd(x1, x3));
            b[4 * q + 3] = ps(_mm512_unpackhi_pd(x1, x3));
        }
        // gather lane k of b[e], b[4 + e], b[8 + e], b[12 + e] into output row 4k + e
        let mut out = [_mm512_setzero_ps(); 16];
        for e in 0..4 {
            let c = _mm512_shuffle_f32x4::<0x88>(b[e], b[4 + e]);
            let d = _mm512_shuffle_f32x4::<0xdd>(b[e], b[4 + e]);
            let c2 = _mm512_shuffle_f32x4::<0x88>(b[8 + e], b[12 + e]);
            let d2 = _mm512_shuffle_f32x4::<0xdd>(b[8 + e], b[12 + e]);
            out[e] = _mm512_shuffle_f32x4::<0x88>(c, c2);
            out[8 + e] = _mm512_shuffle_f32x4::<0xdd>(c, c2);
            out[4 + e] = _mm512_shuffle_f32x4::<0x88>(d, d2);
            out[12 + e] = _mm512_shuffle_f32x4::<0xdd>(d, d2);
        }
        out
    }

    /// One MR×NR tile: the packed panels' product, written into the `mr`×`nr` corner of C.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
        mr: usize,
        nr: usize,
        alpha: f32,
        beta: f32,
    ) {
        if beta != 0.0 && csc == 1 {
            // C's rows are read back after the product: ask for them while it runs
            for i in 0..mr {
                let row = c.offset(i as isize * rsc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.add(64));
            }
        }
        let acc = kernel(kc, a, b);
        let valpha = _mm512_set1_ps(alpha);
        if mr == MR && nr == NR && csc == 1 {
            for (i, pair) in acc.chunks_exact(2).enumerate() {
                let row = c.offset(i as isize * rsc);
                let (lo, hi) = (
                    _mm512_mul_ps(pair[0], valpha),
                    _mm512_mul_ps(pair[1], valpha),
                );
                if beta == 0.0 {
                    _mm512_storeu_ps(row, lo);
                    _mm512_storeu_ps(row.add(16), hi);
                } else {
                    let vbeta = _mm512_set1_ps(beta);
                    _mm512_storeu_ps(row, _mm512_fmadd_ps(_mm512_loadu_ps(row), vbeta, lo));
                    let row16 = row.add(16);
                    _mm512_storeu_ps(row16, _mm512_fmadd_ps(_mm512_loadu_ps(row16), vbeta, hi));
                }
            }
            return;
        }
        // a ragged edge (or a strided C): through a buffer, writing only the tile's corner
        let mut buf = [0.0f32; MR * NR];
        for (i, pair) in acc.chunks_exact(2).enumerate() {
            _mm512_storeu_ps(buf.as_mut_ptr().add(i * NR), pair[0]);
            _mm512_storeu_ps(buf.as_mut_ptr().add(i * NR + 16), pair[1]);
        }
        for i in 0..mr {
            for j in 0..nr {
                let dst = c.offset(i as isize * rsc + j as isize * csc);
                let v = alpha * buf[i * NR + j];
                *dst = if beta == 0.0 { v } else { v + beta * *dst };
            }
        }
    }

    /// The 12×32 product of a packed A panel (kc × 12) and a packed B panel (kc × 32), as
    /// 24 registers: row i's columns 0..16 in `[2i]`, 16..32 in `[2i + 1]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel(kc: usize, a: *const f32, b: *const f32) -> [__m512; 2 * MR] {
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            // fully unrolled over the 12 rows: each broadcast feeds two FMAs
            macro_rules! row {
                ($($i:literal)*) => {$(
                    let ai = _mm512_set1_ps(*a.add($i));
                    acc[2 * $i] = _mm512_fmadd_ps(ai, b0, acc[2 * $i]);
                    acc[2 * $i + 1] = _mm512_fmadd_ps(ai, b1, acc[2 * $i + 1]);
                )*};
            }
            row!(0 1 2 3 4 5 6 7 8 9 10 11);
            a = a.add(MR);
            b = b.add(NR);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2};

    fn filled(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        Array2::from_shape_fn((rows, cols), |_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
    }

    /// alpha·A·B + beta·C in float64, the reference.
    fn reference(
        alpha: f32,
        a: &ArrayView2<f32>,
        b: &ArrayView2<f32>,
        beta: f32,
        c: &Array2<f32>,
    ) -> Array2<f64> {
        let (m, k) = a.dim();
        let n = b.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| {
            let dot: f64 = (0..k).map(|l| a[[i, l]] as f64 * b[[l, j]] as f64).sum();
            alpha as f64 * dot
                + if beta == 0.0 {
                    0.0
                } else {
                    beta as f64 * c[[i, j]] as f64
                }
        })
    }

    fn check(m: usize, n: usize, k: usize, alpha: f32, beta: f32, layout: usize) {
        let a_store = filled(m + 3, k + 5, (m * 31 + k) as u64);
        let a_store_t = filled(k + 5, m + 3, (m * 29 + k) as u64);
        let b_store = filled(n + 2, k + 7, (n * 17 + k) as u64);
        let c0 = filled(m, n, 99);
        // A row-major, a strided window, and column-major (a transposed view)
        let a = match layout % 3 {
            0 => a_store.slice(s![..m, ..k]),
            1 => a_store.slice(s![1..m + 1, 2..k + 2]),
            _ => a_store_t.slice(s![..k, ..m]).reversed_axes(),
        };
        let bt = b_store.slice(s![..n, ..k]); // n×k
        let b_owned = bt.t().to_owned(); // k×n row-major
        let b = if layout.is_multiple_of(2) {
            bt.t()
        } else {
            b_owned.view()
        };
        let want = reference(alpha, &a, &b, beta, &c0);
        // C row-major, and C transposed (column stride != 1)
        let mut c = c0.clone();
        sgemm(alpha, &a, &b, beta, &mut c.view_mut());
        let mut ct = c0.t().to_owned();
        sgemm(alpha, &a, &b, beta, &mut ct.view_mut().reversed_axes());
        // the same products with either operand packed once beforehand
        let mut c_left = c0.clone();
        let packed_a = Packed::new(a, Side::Left);
        sgemm_packed_left(alpha, &packed_a, &b, beta, &mut c_left.view_mut());
        let mut c_right = c0.clone();
        let packed_b = Packed::new(b, Side::Right);
        sgemm_packed_right(alpha, &a, &packed_b, beta, &mut c_right.view_mut());
        // and with a leading block of the packed operand (the first rows / columns)
        let (mh, nh) = (m.div_ceil(2), n.div_ceil(2));
        let mut c_top = c0.slice(s![..mh, ..]).to_owned();
        sgemm_packed_left(alpha, &packed_a, &b, beta, &mut c_top.view_mut());
        let mut c_leftmost = c0.slice(s![.., ..nh]).to_owned();
        sgemm_packed_right(alpha, &a, &packed_b, beta, &mut c_leftmost.view_mut());
        let block_err = |got: &Array2<f32>| {
            got.indexed_iter()
                .map(|((i, j), &g)| (g as f64 - want[[i, j]]).abs())
                .fold(0.0, f64::max)
        };
        let scale = (k as f64).sqrt() + 1.0;
        for (got, what) in [
            (&c_top, "leading rows of packed A"),
            (&c_leftmost, "leading columns of packed B"),
        ] {
            let err = block_err(got);
            assert!(
                err < 1e-5 * scale,
                "{what}: m={m} n={n} k={k} layout={layout}: {err}"
            );
        }
        for (got, what) in [
            (c, "row-major C"),
            (ct.t().to_owned(), "transposed C"),
            (c_left, "packed A"),
            (c_right, "packed B"),
        ] {
            let err = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(
                err < 1e-5 * scale,
                "{what}: m={m} n={n} k={k} alpha={alpha} beta={beta} layout={layout}: {err}"
            );
        }
    }

    #[test]
    fn matches_a_float64_reference_over_ragged_shapes_and_strides() {
        // edges of every panel (MR = 12, NR = 32, KC = 512, MC = 192, NC = 512), k not a
        // multiple of anything, tiny and one-row/one-column products
        let shapes = [
            (1, 1, 1),
            (1, 40, 3),
            (13, 1, 7),
            (12, 32, 256),
            (11, 31, 255),
            (13, 33, 257),
            (25, 65, 300),
            (193, 70, 513),
            (37, 1025, 19),
            (200, 97, 600),
        ];
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            for (alpha, beta) in [(1.0, 0.0), (1.0, 1.0), (-0.5, 2.0)] {
                check(m, n, k, alpha, beta, i);
                check(m, n, k, alpha, beta, i + 1);
            }
        }
    }

    #[test]
    fn beta_zero_never_reads_c() {
        let a = filled(20, 40, 1);
        let b = filled(40, 50, 2);
        let mut c = Array2::from_elem((20, 50), f32::NAN);
        sgemm(1.0, &a.view(), &b.view(), 0.0, &mut c.view_mut());
        assert!(c.iter().all(|v| v.is_finite()));
    }
}
