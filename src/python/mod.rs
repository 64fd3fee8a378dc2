//! Thin Python bindings: take NumPy arrays, release the GIL, call the core, return arrays.
//!
//! Friendly argument checking (array-likes, dtypes, ndim) lives in the Python package; this
//! layer still refuses anything it cannot read exactly (wrong dtype or ndim -> TypeError),
//! reads every array through its strides (Fortran order and slices are never misread), and
//! maps the core's errors to Python exceptions by kind (`convert::to_py_err`). One file
//! per concept of the core: margin, head, center, search, gallery, metrics, evaluation,
//! cuda.

mod center;
mod convert;
mod cuda;
mod evaluation;
mod gallery;
mod head;
mod margin;
mod metrics;
mod search;
mod triplet;

use convert::{run, GalleryFileError};
use pyo3::prelude::*;

/// Number of threads the Rust kernels use (RAYON_NUM_THREADS, else the core count; at most
/// MAX_THREADS_PER_CPU per CPU).
#[pyfunction]
fn num_threads() -> usize {
    crate::pool::num_threads()
}

/// For the test suite: panics inside the thread pool, so that a test can check that a Rust
/// panic reaches Python as a RuntimeError (never pyo3's PanicException).
#[pyfunction]
fn _panic_for_tests(py: Python<'_>, message: String) -> PyResult<()> {
    run(py, || -> () { panic!("{message}") })
}

/// Before a fork (`os.register_at_fork`): waits for the Gallery operations running without
/// the GIL to end and holds new ones back (`crate::fork_gate`), so that no child inherits a
/// gallery's lock held by a thread it does not have.
#[pyfunction]
fn _fork_gate_close() {
    crate::fork_gate::close()
}

/// After a fork, in the parent and in the child: lets Gallery operations run again.
#[pyfunction]
fn _fork_gate_open() {
    crate::fork_gate::open()
}

/// The instruction set the kernels run: "avx512", "avx2", "neon" (aarch64) or "scalar" (the
/// best the CPU has, capped by ARCFACE_RS_SIMD).
#[pyfunction]
fn simd_level() -> &'static str {
    crate::kernels::simd_in_use().name()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // An ARCFACE_RS_SIMD the CPU cannot honour is refused at import, not silently ignored.
    crate::kernels::simd_check().map_err(pyo3::exceptions::PyValueError::new_err)?;
    // ...and so is an ARCFACE_RS_CUDA_CLASS_TILE or ARCFACE_RS_CUDA_DX_BATCH out of range:
    // every process (every rank of a sharded head) fails here, none in the middle of a
    // collective.
    #[cfg(feature = "cuda")]
    crate::cuda::head::Tiling::configured().map_err(convert::to_py_err)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(_fork_gate_close, m)?)?;
    m.add_function(wrap_pyfunction!(_fork_gate_open, m)?)?;
    m.add("GalleryFileError", m.py().get_type::<GalleryFileError>())?;
    m.add_class::<margin::PyMargin>()?;
    m.add("MARGIN_PARAMS", crate::margin::PARAMS_LEN)?;
    let kinds = pyo3::types::PyDict::new(m.py());
    for &(name, code) in crate::margin::kind::NAMES {
        kinds.set_item(name, code)?;
    }
    m.add("MARGIN_KINDS", kinds)?;
    // the label of a row whose target class another shard holds (margin_loss_shard, kernels.cu)
    m.add("REMOTE_TARGET", crate::head::REMOTE_TARGET)?;
    m.add_class::<gallery::PyGallery>()?;
    m.add("GALLERY_MAX_DIM", crate::search::gallery::MAX_DIM)?;
    m.add("MAX_THREADS_PER_CPU", crate::pool::MAX_THREADS_PER_CPU)?;
    m.add_function(wrap_pyfunction!(head::margin_loss, m)?)?;
    m.add_function(wrap_pyfunction!(head::margin_loss_shard, m)?)?;
    m.add_function(wrap_pyfunction!(head::margin_logits, m)?)?;
    m.add_function(wrap_pyfunction!(head::margin_logits_backward, m)?)?;
    m.add_function(wrap_pyfunction!(head::apply_margin, m)?)?;
    m.add_function(wrap_pyfunction!(head::apply_margin_backward, m)?)?;
    m.add_function(wrap_pyfunction!(center::center_loss, m)?)?;
    m.add_function(wrap_pyfunction!(triplet::triplet_loss, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_forked, m)?)?;
    m.add("CUDA_FORKED", cuda::FORKED)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_head_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_margin_loss, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_scale_unless_one, m)?)?;
    m.add("cuda_feature", cfg!(feature = "cuda"))?;
    m.add_function(wrap_pyfunction!(metrics::verification, m)?)?;
    m.add_function(wrap_pyfunction!(evaluation::pair_dots, m)?)?;
    m.add_function(wrap_pyfunction!(evaluation::all_pairs_tar_at_far, m)?)?;
    m.add_function(wrap_pyfunction!(search::cosine_topk, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
