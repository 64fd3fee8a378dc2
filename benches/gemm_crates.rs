//! The project's GEMM (`arcface_rs::gemm::sgemm`: its own AVX-512 kernel where the CPU has
//! it, else matrixmultiply), matrixmultiply (through ndarray) and the `gemm` crate on the
//! head's three GEMM shapes.
//!
//! Run: `cargo bench --bench gemm_crates` (RAYON_NUM_THREADS=2 on the reference machine);
//! `python benches/bench_gemm.py` runs it beside PyTorch's `torch.mm` (MKL) on the same
//! shapes and threads. The head cuts C=100k classes into tiles of 512 and runs one
//! single-threaded GEMM per tile on each rayon thread, so that is what this measures:
//! B=256, D=512, C=100k, f32.

#[cfg(target_arch = "x86_64")]
mod on_x86 {
    use arcface_rs::gemm::sgemm;
    use ndarray::linalg::general_mat_mul;
    use ndarray::{s, Array2, Axis};
    use rayon::prelude::*;
    use std::time::Instant;

    const B: usize = 256;
    const D: usize = 512;
    const C: usize = 100_000;
    const CT: usize = 512;

    fn fill(rows: usize, cols: usize, seed: u32) -> Array2<f32> {
        let mut state = seed.wrapping_mul(2654435761).max(1);
        Array2::from_shape_fn((rows, cols), |_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) - 0.5
        })
    }

    fn best_of<F: FnMut()>(mut f: F) -> f64 {
        f();
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// dst (m×n, row stride rs) = alpha? lhs (m×k) · rhs (k×n), all given as strides.
    #[allow(clippy::too_many_arguments)]
    fn gemm_crate(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: isize,
        dst_cs: isize,
        lhs: *const f32,
        lhs_rs: isize,
        lhs_cs: isize,
        rhs: *const f32,
        rhs_rs: isize,
        rhs_cs: isize,
    ) {
        // SAFETY: callers pass pointers and strides that describe in-bounds matrices.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                dst_cs,
                dst_rs,
                false,
                lhs,
                lhs_cs,
                lhs_rs,
                rhs,
                rhs_cs,
                rhs_rs,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }

    pub fn main() {
        let x = fill(B, D, 1);
        let w = fill(C, D, 2);
        // G as the head holds it: one contiguous B×ct block per tile
        let g = fill(B, CT, 3);
        let flops = 2.0 * (B * D * C) as f64;
        let tiles: Vec<usize> = (0..C).step_by(CT).collect();

        // Shape 1: cos tile (B×ct) = X (B×D) · W_tᵀ
        let mm1 = best_of(|| {
            tiles.par_iter().for_each_init(
                || Array2::<f32>::zeros((B, CT)),
                |out, &lo| {
                    let wt = w.slice(s![lo..(lo + CT).min(C), ..]);
                    let mut o = out.slice_mut(s![.., ..wt.nrows()]);
                    general_mat_mul(1.0, &x, &wt.t(), 0.0, &mut o);
                },
            )
        });
        let gm1 = best_of(|| {
            tiles.par_iter().for_each_init(
                || Array2::<f32>::zeros((B, CT)),
                |out, &lo| {
                    let n = CT.min(C - lo);
                    let wt = w.slice(s![lo..lo + n, ..]);
                    gemm_crate(
                        B,
                        n,
                        D,
                        out.as_mut_ptr(),
                        CT as isize,
                        1,
                        x.as_ptr(),
                        D as isize,
                        1,
                        wt.as_ptr(),
                        1,
                        D as isize,
                    );
                },
            )
        });
        let own1 = best_of(|| {
            tiles.par_iter().for_each_init(
                || Array2::<f32>::zeros((B, CT)),
                |out, &lo| {
                    let wt = w.slice(s![lo..(lo + CT).min(C), ..]);
                    let mut o = out.slice_mut(s![.., ..wt.nrows()]);
                    sgemm(1.0, &x.view(), &wt.t(), 0.0, &mut o);
                },
            )
        });
        // Shape 2: dX (B×D) += G_t (B×ct) · W_t (ct×D), accumulated per thread
        let mm2 = best_of(|| {
            tiles.par_iter().for_each_init(
                || Array2::<f32>::zeros((B, D)),
                |acc, &lo| {
                    let wt = w.slice(s![lo..(lo + CT).min(C), ..]);
                    let gt = g.slice(s![.., ..wt.nrows()]);
                    general_mat_mul(1.0, &gt, &wt, 1.0, acc);
                },
            )
        });
        let own2 = best_of(|| {
            tiles.par_iter().for_each_init(
                || Array2::<f32>::zeros((B, D)),
                |acc, &lo| {
                    let wt = w.slice(s![lo..(lo + CT).min(C), ..]);
                    let gt = g.slice(s![.., ..wt.nrows()]);
                    sgemm(1.0, &gt, &wt, 1.0, &mut acc.view_mut());
                },
            )
        });
        // Shape 3: dW_t (ct×D) = G_tᵀ (ct×B) · X (B×D)
        let mut dw = Array2::<f32>::zeros((C, D));
        let mm3 = best_of(|| {
            dw.axis_chunks_iter_mut(Axis(0), CT)
                .into_par_iter()
                .enumerate()
                .for_each(|(_, mut out)| {
                    let gt = g.slice(s![.., ..out.nrows()]);
                    general_mat_mul(1.0, &gt.t(), &x, 0.0, &mut out);
                })
        });
        let own3 = best_of(|| {
            dw.axis_chunks_iter_mut(Axis(0), CT)
                .into_par_iter()
                .for_each(|mut out| {
                    let gt = g.slice(s![.., ..out.nrows()]);
                    sgemm(1.0, &gt.t(), &x.view(), 0.0, &mut out);
                })
        });
        let gm3 = best_of(|| {
            dw.axis_chunks_iter_mut(Axis(0), CT)
                .into_par_iter()
                .enumerate()
                .for_each(|(_, mut out)| {
                    let n = out.nrows();
                    let gt = g.slice(s![.., ..n]);
                    gemm_crate(
                        n,
                        D,
                        B,
                        out.as_mut_ptr(),
                        D as isize,
                        1,
                        gt.as_ptr(),
                        1,
                        CT as isize,
                        x.as_ptr(),
                        D as isize,
                        1,
                    );
                })
        });
        println!(
            "cpu={:?} level={} threads={} B={B} D={D} C={C} tile={CT} (GFLOP/s, higher is better)",
            cpu_model(),
            arcface_rs::kernels::simd_in_use().name(),
            rayon::current_num_threads()
        );
        println!("| GEMM | arcface_rs | matrixmultiply | gemm crate |");
        println!("| --- | --- | --- | --- |");
        let rate = |t: f64| flops / t / 1e9;
        println!(
            "| X·W_tᵀ (forward) | {:.0} | {:.0} | {:.0} |",
            rate(own1),
            rate(mm1),
            rate(gm1)
        );
        println!(
            "| G_t·W_t (dX) | {:.0} | {:.0} | n/a |",
            rate(own2),
            rate(mm2)
        );
        println!(
            "| G_tᵀ·X (dW) | {:.0} | {:.0} | {:.0} |",
            rate(own3),
            rate(mm3),
            rate(gm3)
        );
    }

    /// The CPU's model name (Linux), for the table's caption.
    fn cpu_model() -> String {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into())
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    on_x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("gemm_crates compares with the gemm crate on x86-64 only");
}
