//! The launch sequences, run on the CPU emulator of the kernels and checked against the CPU
//! implementation; and every kernel compiled with NVRTC.

use super::device::{Device, Elem, RowMajorGemm};
use super::emulator::Emulator;
use super::head::{self, HeadBuffers, HeadShape, Tiling};
use super::search::{self, SearchBuffers, SearchShape, SearchTiling, Stored};
use super::{available, compile, ENTRY_POINTS};
use crate::head::{margin_loss_with, HeadOptions, LossOptions, Reduction};
use crate::margin::{kind, Margin, Margins, RowContext, PARAMS_LEN};
use crate::real::Real;
use ndarray::Array2;

/// Fails on any compile error; needs libnvrtc (no GPU). scripts/test.sh points
/// LD_LIBRARY_PATH at the NVRTC that PyTorch's CUDA wheels install.
#[test]
fn every_kernel_compiles_with_nvrtc() {
    for arch in [None, Some("compute_80"), Some("compute_90")] {
        let ptx = compile(arch).unwrap_or_else(|log| panic!("NVRTC ({arch:?}): {log}"));
        for name in ENTRY_POINTS {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} missing from the PTX for {arch:?}"
            );
        }
    }
}

/// Also holds the kernels to a clean build: no compiler warning, and no register spilled
/// to local memory on the GPUs the head is tuned for (a spill in a pass over the logits or
/// the weight would add memory traffic that the GPU benchmark alone would reveal).
#[test]
fn every_kernel_compiles_to_machine_code_with_nvrtc() {
    for arch in ["sm_80", "sm_90"] {
        let (cubin, log) = super::compile_cubin_with(arch, &["--ptxas-options=-v"])
            .unwrap_or_else(|log| panic!("NVRTC ({arch}): {log}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}");
        assert!(
            !log.to_lowercase().contains("warning"),
            "NVRTC warned ({arch}):\n{log}"
        );
        let spills = spills_by_kernel(&log);
        for name in ENTRY_POINTS {
            let found = cubin
                .windows(name.len() + 1)
                .any(|w| w[..name.len()] == *name.as_bytes() && w[name.len()] == 0);
            assert!(found, "{name} missing from the {arch} CUBIN");
            match spills.iter().find(|(kernel, _)| kernel == name) {
                Some((_, Some(bytes))) => {
                    assert_eq!(*bytes, 0, "{name} spills registers ({arch})")
                }
                _ => panic!("no readable assembler report for {name} ({arch}):\n{log}"),
            }
        }
    }
}

/// (kernel, bytes of spill stores and loads; None where unreadable) from ptxas's verbose
/// report, whose lines run "Function properties for NAME" then "N bytes stack frame, S
/// bytes spill stores, L bytes spill loads".
fn spills_by_kernel(log: &str) -> Vec<(String, Option<usize>)> {
    let mut out = Vec::new();
    let mut lines = log.lines();
    while let Some(line) = lines.next() {
        let Some(kernel) = line.split("Function properties for ").nth(1) else {
            continue;
        };
        let report = lines.next().unwrap_or_default();
        let bytes_before = |what: &str| -> Option<usize> {
            let (head, _) = report.split_once(what)?;
            head.rsplit([' ', ',']).next()?.parse().ok()
        };
        let spilled = bytes_before(" bytes spill stores")
            .zip(bytes_before(" bytes spill loads"))
            .map(|(stores, loads)| stores + loads);
        out.push((kernel.trim().to_string(), spilled));
    }
    out
}

#[test]
fn the_assembler_report_is_read_per_kernel() {
    let log = "ptxas info    : Function properties for a\n\
               ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
               ptxas info    : Used 32 registers\n\
               ptxas info    : Function properties for b\n\
               ptxas         .     8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n";
    assert_eq!(
        spills_by_kernel(log),
        vec![("a".to_string(), Some(0)), ("b".to_string(), Some(12))]
    );
}

#[test]
fn no_device_is_not_an_error() {
    // On a machine without a driver this must be false, not a panic; with a GPU, true.
    let _ = available();
}

#[test]
fn the_emulator_runs_every_entry_point() {
    let emu = Emulator::get();
    for name in ENTRY_POINTS {
        assert!(emu.has(name), "{name} is not in emulator.cpp's table");
    }
    assert!(emu.launch("no_such_kernel", 1, 32, &[]).is_err());
}

#[test]
fn the_emulator_runs_threads_and_blocks_in_permuted_orders() {
    // Index order alone hides the races in which the writer comes first; the scheduler
    // draws a permutation at every turn, which must be one (every thread runs once) and
    // must vary: not index order, and not one order for every draw.
    let emu = Emulator::get();
    for n in [1usize, 2, 3, 32, 96, 256, 1000, 4099] {
        let orders: Vec<Vec<usize>> = (0..16).map(|seed| emu.order(n, seed)).collect();
        for order in &orders {
            let mut seen = order.clone();
            seen.sort_unstable();
            assert_eq!(
                seen,
                (0..n).collect::<Vec<_>>(),
                "n = {n}: not a permutation"
            );
        }
        if n >= 32 {
            let index_order = (0..n).collect::<Vec<_>>();
            let in_index_order = orders.iter().filter(|o| **o == index_order).count();
            assert!(
                in_index_order <= 1,
                "n = {n}: {in_index_order} of 16 in index order"
            );
            let distinct: std::collections::HashSet<_> = orders.iter().collect();
            assert!(
                distinct.len() >= 12,
                "n = {n}: only {} distinct orders",
                distinct.len()
            );
        }
    }
}

/// A small deterministic generator (the tests need no rand crate).
fn noise(seed: u64, n: usize) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

fn matrix<T: Real>(seed: u64, rows: usize, cols: usize) -> Array2<T> {
    Array2::from_shape_vec(
        (rows, cols),
        noise(seed, rows * cols).into_iter().map(T::of).collect(),
    )
    .unwrap()
}

/// Launches and GEMMs per class tile of a head call that `run` makes over 40 classes with
/// the class tile it is given: what 8 tiles cost beyond 5, a third of it.
fn calls_per_class_tile(run: impl Fn(Tiling)) -> usize {
    let calls = |class_tile| {
        let before = Emulator::calls_on_this_thread();
        run(Tiling {
            class_tile,
            stash_budget_bytes: 1 << 20,
            ..Tiling::default()
        });
        Emulator::calls_on_this_thread() - before
    };
    let (five_tiles, eight_tiles) = (calls(8), calls(5));
    assert_eq!(
        (eight_tiles - five_tiles) % 3,
        0,
        "{five_tiles} {eight_tiles}"
    );
    (eight_tiles - five_tiles) / 3
}

struct Emulated<T> {
    row_loss: Vec<f64>,
    grad_emb: Option<Array2<T>>,
    grad_weight: Option<Array2<T>>,
    bad: [i32; 3],
}

mod fused_head;
mod half_precision;
mod tiling;
mod top_k;
