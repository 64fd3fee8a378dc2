//! The optional CUDA path (cargo feature `cuda`): device discovery and the kernels.
//!
//! cudarc loads the driver, NVRTC and cuBLAS at run time, so this builds and runs on
//! machines without CUDA: [`available`] then says false instead of failing. The kernels in
//! `kernels.cu` are compiled at run time with NVRTC, once per process.
//!
//! `driver` launches them on a GPU on torch's stream; `emulator` (tests) runs the same
//! kernels on the CPU, so the launch sequences are tested on machines without one.

use crate::margin::{kind, PARAMS_LEN};
use std::sync::OnceLock;

pub mod device;
pub mod driver;
pub mod gallery;
pub mod head;
pub mod search;

#[cfg(test)]
mod emulator;
#[cfg(test)]
mod tests;

/// CUDA C source of every kernel, without the margin definitions of [`margin_defines`].
pub const KERNELS: &str = include_str!("kernels.cu");

/// The `#define`s that `kernels.cu` reads the margins' parameter blocks with, from
/// `crate::margin` (the one definition): `MARGIN_<KIND>` codes and `MARGIN_PARAMS`; and
/// `crate::head`'s `REMOTE_TARGET` label of a sharded head.
pub fn margin_defines() -> Vec<(String, i64)> {
    let mut defines: Vec<(String, i64)> = kind::NAMES
        .iter()
        .map(|&(name, code)| (format!("MARGIN_{}", name.to_uppercase()), code.into()))
        .collect();
    defines.push(("MARGIN_PARAMS".into(), PARAMS_LEN as i64));
    defines.push(("REMOTE_TARGET".into(), crate::head::REMOTE_TARGET));
    defines
}

/// The source NVRTC compiles: the margin definitions, then `kernels.cu`.
pub fn kernel_source() -> String {
    let mut src: String = margin_defines()
        .iter()
        .map(|(name, value)| format!("#define {name} {value}\n"))
        .collect();
    src.push_str(KERNELS);
    src
}

/// Kernel entry points that the head and the search launch (the `extern "C"` names).
pub const ENTRY_POINTS: &[&str] = &[
    "normalize_rows_f32",
    "normalize_rows_f64",
    "normalize_rows_bf16",
    "normalize_rows_f16",
    "logits_and_weights_f32_f32",
    "logits_and_weights_f64_f64",
    "logits_and_weights_f32_bf16",
    "logits_and_weights_bf16_bf16",
    "logits_and_weights_f32_f16",
    "logits_and_weights_f16_f16",
    "between_tiles_f32_f32",
    "between_tiles_f64_f64",
    "between_tiles_f32_bf16",
    "between_tiles_bf16_bf16",
    "between_tiles_f32_f16",
    "between_tiles_f16_f16",
    "fill_f64",
    "scale_unless_one_f32",
    "scale_unless_one_f64",
    "scale_unless_one_bf16",
    "scale_unless_one_f16",
    "row_losses",
    "targets_f32",
    "targets_f64",
    "targets_bf16",
    "targets_f16",
    "merge_stats",
    "finish_stats",
    "target_grads_f32",
    "target_grads_f64",
    "target_grads_bf16",
    "target_grads_f16",
    "finish_grad_emb_f32",
    "finish_grad_emb_f64",
    "topk_reset",
    "topk_tile",
    "topk_tile_f16",
    "topk_merge",
    "topk_tile_large",
    "topk_tile_large_f16",
    "topk_merge_large",
    "unit_queries",
    "finish_results",
    "score_rows_f32",
    "score_rows_f16",
    "score_rows_bf16",
    "score_rows_i8",
    "decode_rows_bf16",
    "decode_rows_i8",
    "round_queries_f16",
    "round_queries_bf16",
    "rescore_f32",
    "rescore_f16",
    "rescore_bf16",
    "rescore_i8",
    "redo_unsure_f32",
    "redo_unsure_f16",
    "redo_unsure_bf16",
    "redo_unsure_i8",
    "margin_grid",
];

/// Whether the CUDA path can run: a driver with at least one device, and NVRTC and cuBLAS
/// loadable. Never panics: each library is looked for before anything is called in it.
/// (arcface_rs's Python side first loads NVRTC and cuBLAS from PyTorch's wheels.)
/// False in a child forked after its parent initialised the driver ([`forked`]).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    !forked()
        && *AVAILABLE.get_or_init(|| {
            std::panic::catch_unwind(|| {
                // SAFETY: these only try to open the libraries.
                let libraries = unsafe {
                    cudarc::driver::sys::is_culib_present()
                        && cudarc::cublas::sys::is_culib_present()
                };
                libraries && nvrtc_available() && initialised() && driver_devices() > 0
            })
            .unwrap_or(false)
        })
}

/// The process that initialised the CUDA driver (`cuInit`), if one did.
static INITIALISED_BY: OnceLock<u32> = OnceLock::new();

/// Calls `cuInit` and notes this process as the one that did.
fn initialised() -> bool {
    let ok = cudarc::driver::result::init().is_ok();
    if ok {
        INITIALISED_BY.get_or_init(std::process::id);
    }
    ok
}

fn driver_devices() -> usize {
    cudarc::driver::result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

/// The CUDA devices this process can use, `cuda:0` to `cuda:{n - 1}` (0 where
/// [`available`] is false).
pub fn device_count() -> usize {
    if available() {
        driver_devices()
    } else {
        0
    }
}

/// Whether this process is a child forked after its parent (or an earlier ancestor)
/// initialised the CUDA driver. CUDA does not survive `fork()`: in such a child every
/// driver call fails, and the parent's contexts, modules and device memory are not the
/// child's. The driver code checks this first, before taking any of its locks (a lock that
/// another thread of the parent held at the fork stays held in the child).
pub fn forked() -> bool {
    INITIALISED_BY
        .get()
        .is_some_and(|&pid| pid != std::process::id())
}

/// Why a [`forked`] child cannot use CUDA, and what to do instead (Python's messages too).
pub const FORKED: &str = "CUDA was initialised before this process was forked from its \
     parent, and CUDA cannot be used after fork(): start worker processes with the 'spawn' \
     or 'forkserver' method of multiprocessing (or torch.multiprocessing)";

/// The error of a CUDA call made in a [`forked`] child.
pub fn forked_error() -> crate::Error {
    crate::Error::device(FORKED)
}

/// Whether NVRTC (the run-time compiler) can be loaded.
pub fn nvrtc_available() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// The kernels compiled to PTX (for `arch`, e.g. "compute_80"; NVRTC's default when None).
/// The error is NVRTC's log.
pub fn compile(arch: Option<&'static str>) -> Result<String, String> {
    if !nvrtc_available() {
        return Err(
            "libnvrtc cannot be loaded: install the nvidia-cuda-nvrtc wheel (PyTorch's \
                    CUDA build brings it) and put its lib folder on LD_LIBRARY_PATH"
                .into(),
        );
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch,
        name: Some("arcface_rs_kernels.cu".into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(kernel_source(), opts)
        .map(|ptx| ptx.to_src())
        .map_err(|e| format!("{e:?}"))
}

/// The kernels compiled to machine code (a CUBIN) for `arch`, e.g. "sm_90". A driver loads
/// a CUBIN from a newer minor CUDA release than its own, but not always such a release's
/// PTX (the JIT refuses a newer PTX ISA), so the driver code tries this first.
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>, String> {
    compile_cubin_with(arch, &[]).map(|(cubin, _log)| cubin)
}

/// [`compile_cubin`] with more NVRTC `options`, returning the CUBIN and NVRTC's log (its
/// warnings, and the assembler's report with `--ptxas-options=-v`).
fn compile_cubin_with(arch: &str, options: &[&str]) -> Result<(Vec<u8>, String), String> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::CString;
    if !nvrtc_available() {
        return Err("libnvrtc cannot be loaded".into());
    }
    let src = CString::new(kernel_source()).map_err(|e| e.to_string())?;
    let name = CString::new("arcface_rs_kernels.cu").expect("no NUL");
    let program = result::create_program(&src, Some(&name)).map_err(|e| format!("{e:?}"))?;
    let mut args = vec![format!("--gpu-architecture={arch}")];
    args.extend(options.iter().map(|o| o.to_string()));
    // SAFETY: `program` is alive until destroyed at the end; buffers are sized by NVRTC.
    unsafe {
        let log = || {
            let log = result::get_program_log(program).unwrap_or_default();
            let log: Vec<u8> = log.iter().map(|&c| c as u8).collect();
            String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .to_string()
        };
        let outcome = result::compile_program(program, &args)
            .map_err(|e| format!("{e:?}: {}", log()))
            .and_then(|()| {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(program, &mut size)
                    .result()
                    .map_err(|e| format!("{e:?}"))?;
                let mut cubin = vec![0u8; size];
                sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr() as *mut std::ffi::c_char)
                    .result()
                    .map_err(|e| format!("{e:?}"))?;
                Ok((cubin, log()))
            });
        let _ = result::destroy_program(program);
        outcome
    }
}
