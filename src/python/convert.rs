//! What every binding shares: the error mapping, running work without the GIL in the
//! library's thread pool, and reading NumPy arrays of either float dtype.

use crate::head::Reduction;
use numpy::{PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    _core,
    GalleryFileError,
    PyValueError,
    "A gallery file is damaged, truncated, of another format version, or not a gallery file."
);

/// The core's error as the Python exception of its kind: ValueError for bad arguments,
/// an OSError subclass chosen by errno (FileNotFoundError, PermissionError, ...) for the
/// file system, GalleryFileError for damaged files, RuntimeError for the device.
pub(super) fn to_py_err(e: crate::Error) -> PyErr {
    use crate::error::ErrorKind;
    let message = e.to_string();
    match e.kind {
        ErrorKind::InvalidArgument => PyValueError::new_err(message),
        ErrorKind::CorruptFile => GalleryFileError::new_err(message),
        ErrorKind::Device => pyo3::exceptions::PyRuntimeError::new_err(message),
        ErrorKind::OutOfMemory => pyo3::exceptions::PyMemoryError::new_err(message),
        // OSError(errno, strerror) constructs the subclass that errno names
        ErrorKind::Io {
            errno: Some(errno), ..
        } => pyo3::exceptions::PyOSError::new_err((errno, message)),
        ErrorKind::Io { io, errno: None } => match io {
            std::io::ErrorKind::NotFound => pyo3::exceptions::PyFileNotFoundError::new_err(message),
            std::io::ErrorKind::PermissionDenied => {
                pyo3::exceptions::PyPermissionError::new_err(message)
            }
            _ => pyo3::exceptions::PyOSError::new_err(message),
        },
    }
}

/// Runs the core's work without the GIL, in the library's fork-safe thread pool; a Rust
/// panic comes back as a RuntimeError with its message (pyo3's PanicException derives from
/// BaseException, which `except Exception` does not catch).
pub(super) fn run<R: Send>(py: Python<'_>, work: impl FnOnce() -> R + Send) -> PyResult<R> {
    detached(py, || crate::pool::install(work))
}

/// `work` without the GIL on this thread, a panic mapped as in [`run`]. Work that must wait
/// for a lock takes it here, outside the pool, and runs the rest through `pool::install`:
/// a pool thread waiting for its parallel jobs may pick up another caller's job, so a job
/// that blocked on a lock could wait for a lock held further down its own stack.
pub(super) fn detached<R: Send>(py: Python<'_>, work: impl FnOnce() -> R + Send) -> PyResult<R> {
    py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)))
        .map_err(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|m| m.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            pyo3::exceptions::PyRuntimeError::new_err(format!(
                "arcface_rs internal error (please report it): {message}"
            ))
        })
}

/// A 2-D float array of either supported dtype.
pub(super) enum Floats<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

impl<'py> Floats<'py> {
    pub(super) fn extract(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
            Ok(Floats::F32(a))
        } else if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f64>>() {
            Ok(Floats::F64(a))
        } else {
            Err(PyTypeError::new_err(format!(
                "{arg} must be a 2-D numpy array of float32 or float64"
            )))
        }
    }
}

pub(super) fn same_dtype_error(args: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "{args} must share one dtype (float32 or float64); cast one of them first"
    ))
}

/// Runs `$body` with the arrays bound to `$x` (and `$y`) at one shared float dtype; a dtype
/// mix is a TypeError naming `$what`.
macro_rules! same_floats {
    ($what:literal, $pair:expr, |$x:ident, $y:ident| $body:expr) => {
        match $pair {
            (Floats::F32($x), Floats::F32($y)) => $body,
            (Floats::F64($x), Floats::F64($y)) => $body,
            _ => Err(same_dtype_error($what)),
        }
    };
}
pub(super) use same_floats;

pub(super) fn labels_vec(labels: PyReadonlyArray1<'_, i64>) -> Vec<i64> {
    labels.as_array().iter().copied().collect()
}

pub(super) fn parse_reduction(reduction: &str) -> PyResult<Reduction> {
    match reduction {
        "mean" => Ok(Reduction::Mean),
        "sum" => Ok(Reduction::Sum),
        "none" => Ok(Reduction::None),
        other => Err(PyValueError::new_err(format!(
            "reduction: must be 'mean', 'sum' or 'none', got {other:?}"
        ))),
    }
}

/// The memory of a large output array handed to NumPy: when the array (or a tensor sharing
/// it) is freed, the buffer goes back to [`crate::pages`]' shelf for the next call to
/// reuse, instead of to the system (whose fresh pages the next call would fault in again).
#[pyclass(frozen, name = "_RecycledBuffer", module = "arcface_rs._core")]
pub(super) struct RecycledBuffer {
    data: Recycle,
}

pub(super) enum Recycle {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Gone,
}

impl Drop for RecycledBuffer {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.data, Recycle::Gone) {
            Recycle::F32(v) => crate::pages::give_back(v),
            Recycle::F64(v) => crate::pages::give_back(v),
            Recycle::Gone => {}
        }
    }
}

/// The float types whose large outputs are recycled.
pub(super) trait Recyclable: numpy::Element + crate::real::Real {
    fn wrap(v: Vec<Self>) -> Recycle;
}

impl Recyclable for f32 {
    fn wrap(v: Vec<Self>) -> Recycle {
        Recycle::F32(v)
    }
}

impl Recyclable for f64 {
    fn wrap(v: Vec<Self>) -> Recycle {
        Recycle::F64(v)
    }
}

/// `a` as a NumPy array; a large one keeps its buffer for reuse once NumPy frees it.
pub(super) fn recycled_array<T: Recyclable>(
    py: Python<'_>,
    a: ndarray::Array2<T>,
) -> PyResult<Bound<'_, numpy::PyArray2<T>>> {
    use numpy::IntoPyArray;
    if a.len() * std::mem::size_of::<T>() < crate::pages::FRESH_PAGES_FROM
        || !a.is_standard_layout()
    {
        return Ok(a.into_pyarray(py));
    }
    let dim = a.raw_dim();
    let (vec, offset) = a.into_raw_vec_and_offset();
    if offset != Some(0) {
        let a = ndarray::Array2::from_shape_vec(dim, vec).expect("same shape");
        return Ok(a.into_pyarray(py));
    }
    // SAFETY: the view covers the vector's `dim` values in row-major order; the vector lives
    // inside `holder`, is never reallocated, and `holder` outlives the array (it is its base).
    let view = unsafe { ndarray::ArrayView2::from_shape_ptr(dim, vec.as_ptr()) };
    let holder = Bound::new(py, RecycledBuffer { data: T::wrap(vec) })?;
    Ok(unsafe { numpy::PyArray2::borrow_from_array(&view, holder.into_any()) })
}
