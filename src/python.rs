//! Thin Python bindings: take NumPy arrays, release the GIL, call the core, return arrays.
//!
//! Friendly argument checking (array-likes, dtypes, ndim) lives in the Python package; this
//! layer still refuses anything it cannot read exactly (wrong dtype or ndim -> TypeError),
//! reads every array through its strides (Fortran order and slices are never misread), and
//! maps the core's errors to ValueError.

use crate::head::{self, LossOptions, Reduction, RowPart};
use crate::margin::{Margin, Scale};
use crate::real::Real;
use crate::search::gallery::{Dtype, Gallery};
use numpy::{
    Element, IntoPyArray, PyArray1, PyArrayDyn, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArrayDyn,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

fn value_error(e: crate::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Runs the core's work without the GIL, in the library's fork-safe thread pool; a Rust
/// panic comes back as a RuntimeError with its message (pyo3's PanicException derives from
/// BaseException, which `except Exception` does not catch).
fn run<R: Send>(py: Python<'_>, work: impl FnOnce() -> R + Send) -> PyResult<R> {
    detached(py, || crate::pool::install(work))
}

/// `work` without the GIL on this thread, a panic mapped as in [`run`]. Work that must wait
/// for a lock takes it here, outside the pool, and runs the rest through `pool::install`:
/// a pool thread waiting for its parallel jobs may pick up another caller's job, so a job
/// that blocked on a lock could wait for a lock held further down its own stack.
fn detached<R: Send>(py: Python<'_>, work: impl FnOnce() -> R + Send) -> PyResult<R> {
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
enum Floats<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

impl<'py> Floats<'py> {
    fn extract(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Self> {
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

fn same_dtype_error(args: &str) -> PyErr {
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

fn labels_vec(labels: PyReadonlyArray1<'_, i64>) -> Vec<i64> {
    labels.as_array().iter().copied().collect()
}

fn parse_reduction(reduction: &str) -> PyResult<Reduction> {
    match reduction {
        "mean" => Ok(Reduction::Mean),
        "sum" => Ok(Reduction::Sum),
        "none" => Ok(Reduction::None),
        other => Err(PyValueError::new_err(format!(
            "reduction: must be 'mean', 'sum' or 'none', got {other:?}"
        ))),
    }
}

/// A validated margin; the Python classes `ArcFace`, `CosFace`, ... each hold one.
#[pyclass(frozen, name = "Margin", module = "arcface_rs._core")]
pub struct PyMargin(pub Margin);

#[pymethods]
impl PyMargin {
    /// Normalised softmax, no margin.
    #[staticmethod]
    fn softmax(s: f64) -> PyResult<Self> {
        Margin::softmax(s).map(PyMargin).map_err(value_error)
    }

    /// ArcFace: psi = cos(theta + m).
    #[staticmethod]
    fn arcface(s: f64, m: f64, easy_margin: bool) -> PyResult<Self> {
        Margin::arcface(s, m, easy_margin)
            .map(PyMargin)
            .map_err(value_error)
    }

    /// CosFace: psi = cos(theta) - m.
    #[staticmethod]
    fn cosface(s: f64, m: f64) -> PyResult<Self> {
        Margin::cosface(s, m).map(PyMargin).map_err(value_error)
    }

    /// SphereFace (A-Softmax) with integer m; s=None scales by the feature norm.
    #[staticmethod]
    #[pyo3(signature = (m, s, lambda_))]
    fn sphereface(m: i64, s: Option<f64>, lambda_: f64) -> PyResult<Self> {
        Margin::sphereface(m, s, lambda_)
            .map(PyMargin)
            .map_err(value_error)
    }

    /// Combined margin: psi = cos(m1 theta + m2) - m3.
    #[staticmethod]
    fn combined(s: f64, m1: f64, m2: f64, m3: f64) -> PyResult<Self> {
        Margin::combined(s, m1, m2, m3)
            .map(PyMargin)
            .map_err(value_error)
    }

    /// The fixed logit scale, or None when logits scale by the feature norm.
    #[getter]
    fn scale(&self) -> Option<f64> {
        match self.0.scale() {
            Scale::Fixed(s) => Some(s),
            Scale::FeatureNorm => None,
        }
    }

    /// psi(c) elementwise over a float64 array of cosines.
    fn psi<'py>(
        &self,
        py: Python<'py>,
        c: PyReadonlyArrayDyn<'py, f64>,
    ) -> Bound<'py, PyArrayDyn<f64>> {
        c.as_array().mapv(|v| self.0.psi(v)).into_pyarray(py)
    }

    /// psi'(c) elementwise over a float64 array of cosines.
    fn dpsi<'py>(
        &self,
        py: Python<'py>,
        c: PyReadonlyArrayDyn<'py, f64>,
    ) -> Bound<'py, PyArrayDyn<f64>> {
        c.as_array().mapv(|v| self.0.dpsi(v)).into_pyarray(py)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.0)
    }
}

/// How a shard of a model-parallel head meets the others: a Python callable
/// `combine(parts (n, 4) float64 [max, sum, sum_ez, target_logit], failed) -> (n, 4)`.
struct ShardArgs {
    stash_classes: usize,
    first_shard: bool,
    combine: Py<PyAny>,
}

/// Calls the Python `combine` with the GIL, writing its answer over `parts`.
fn call_combine(combine: &Py<PyAny>, parts: &mut [RowPart], failed: bool) -> PyResult<()> {
    Python::attach(|py| {
        let n = parts.len();
        let flat: Vec<f64> = parts
            .iter()
            .flat_map(|p| [p.max, p.sum, p.sum_ez, p.target_logit])
            .collect();
        let arr = ndarray::Array2::from_shape_vec((n, 4), flat)
            .expect("n rows of 4")
            .into_pyarray(py);
        let out = combine.call1(py, (arr, failed))?;
        let out: PyReadonlyArray2<'_, f64> = out.bind(py).extract().map_err(|_| {
            PyTypeError::new_err("combine must return a (n, 4) float64 numpy array")
        })?;
        let out = out.as_array();
        if out.dim() != (n, 4) {
            return Err(PyValueError::new_err(format!(
                "combine returned shape {:?}, expected ({n}, 4)",
                out.dim()
            )));
        }
        for (p, row) in parts.iter_mut().zip(out.rows()) {
            *p = RowPart {
                max: row[0],
                sum: row[1],
                sum_ez: row[2],
                target_logit: row[3],
            };
        }
        Ok(())
    })
}

fn loss_typed<'py, T: Real + Element>(
    py: Python<'py>,
    emb: PyReadonlyArray2<'py, T>,
    weight: PyReadonlyArray2<'py, T>,
    labels: &[i64],
    margin: &Margin,
    options: LossOptions,
    shard: Option<&ShardArgs>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (e, w) = (emb.as_array(), weight.as_array());
    // An exception raised by `combine` is kept and re-raised as it was.
    let mut raised: Option<PyErr> = None;
    let out = run(py, || match shard {
        None => head::margin_loss_with(e, w, labels, margin, options),
        Some(sh) => {
            let mut combine = |parts: &mut [RowPart], failed: bool| {
                call_combine(&sh.combine, parts, failed).map_err(|err| {
                    raised = Some(err);
                    crate::Error::invalid("combine", "raised an exception")
                })
            };
            let mut opts = head::ShardOptions {
                stash_classes: sh.stash_classes,
                first_shard: sh.first_shard,
                combine: &mut combine,
            };
            head::margin_loss_shard(e, w, labels, margin, options, &mut opts)
        }
    })?;
    if let Some(err) = raised {
        return Err(err);
    }
    let out = out.map_err(value_error)?;
    (
        out.loss,
        PyArray1::from_vec(py, out.row_losses),
        out.grad_emb.map(|g| g.into_pyarray(py)),
        out.grad_weight.map(|g| g.into_pyarray(py)),
    )
        .into_pyobject(py)
}

/// Fused loss and gradients: (loss, row_losses, grad_emb, grad_weight); a gradient not
/// asked for is None. `upstream` multiplies each row's gradient.
#[pyfunction]
#[pyo3(signature = (emb, weight, labels, margin, reduction, grad_emb=true, grad_weight=true, upstream=None))]
#[allow(clippy::too_many_arguments)]
fn margin_loss<'py>(
    py: Python<'py>,
    emb: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
    reduction: &str,
    grad_emb: bool,
    grad_weight: bool,
    upstream: Option<PyReadonlyArray1<'py, f64>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let labels = labels_vec(labels);
    let upstream: Option<Vec<f64>> = upstream.map(|u| u.as_array().to_vec());
    let options = LossOptions {
        reduction: parse_reduction(reduction)?,
        upstream: upstream.as_deref(),
        grad_emb,
        grad_weight,
    };
    let m = &margin.0;
    let arrays = (
        Floats::extract(emb, "emb")?,
        Floats::extract(weight, "weight")?,
    );
    same_floats!("emb and weight", arrays, |e, w| loss_typed(
        py, e, w, &labels, m, options, None
    ))
}

/// One shard of a model-parallel fused loss: `labels` are this shard's target columns, -1
/// (ignored) or -2 (target in another shard); `combine(parts, failed)` must return the
/// per-row [max, sum, sum_ez, target_logit] combined over all shards (a collective). Returns
/// (loss, row_losses, grad_emb share, grad_weight of the shard).
#[pyfunction]
#[pyo3(signature = (emb, weight, labels, margin, reduction, stash_classes, first_shard, combine))]
#[allow(clippy::too_many_arguments)]
fn margin_loss_shard<'py>(
    py: Python<'py>,
    emb: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
    reduction: &str,
    stash_classes: usize,
    first_shard: bool,
    combine: Py<PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let labels = labels_vec(labels);
    let options = LossOptions::new(parse_reduction(reduction)?);
    let shard = ShardArgs {
        stash_classes,
        first_shard,
        combine,
    };
    let arrays = (
        Floats::extract(emb, "emb")?,
        Floats::extract(weight, "weight")?,
    );
    same_floats!("emb and weight", arrays, |e, w| loss_typed(
        py,
        e,
        w,
        &labels,
        &margin.0,
        options,
        Some(&shard)
    ))
}

fn logits_typed<'py, T: Real + Element>(
    py: Python<'py>,
    emb: PyReadonlyArray2<'py, T>,
    weight: PyReadonlyArray2<'py, T>,
    labels: &[i64],
    margin: &Margin,
) -> PyResult<Bound<'py, PyAny>> {
    let (e, w) = (emb.as_array(), weight.as_array());
    let out = run(py, || head::margin_logits(e, w, labels, margin))?.map_err(value_error)?;
    Ok(out.into_pyarray(py).into_any())
}

/// The (B, C) margin logits.
#[pyfunction]
fn margin_logits<'py>(
    py: Python<'py>,
    emb: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
) -> PyResult<Bound<'py, PyAny>> {
    let labels = labels_vec(labels);
    let arrays = (
        Floats::extract(emb, "emb")?,
        Floats::extract(weight, "weight")?,
    );
    same_floats!("emb and weight", arrays, |e, w| logits_typed(
        py, e, w, &labels, &margin.0
    ))
}

fn logits_backward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    grad: PyReadonlyArray2<'py, T>,
    emb: PyReadonlyArray2<'py, T>,
    weight: PyReadonlyArray2<'py, T>,
    labels: &[i64],
    margin: &Margin,
) -> PyResult<Bound<'py, PyTuple>> {
    let (g, e, w) = (grad.as_array(), emb.as_array(), weight.as_array());
    let (ge, gw) =
        run(py, || head::margin_logits_backward(g, e, w, labels, margin))?.map_err(value_error)?;
    (ge.into_pyarray(py), gw.into_pyarray(py)).into_pyobject(py)
}

/// (grad_emb, grad_weight) from dL/dlogits.
#[pyfunction]
fn margin_logits_backward<'py>(
    py: Python<'py>,
    grad_logits: &Bound<'py, PyAny>,
    emb: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
) -> PyResult<Bound<'py, PyTuple>> {
    let labels = labels_vec(labels);
    let m = &margin.0;
    match (
        Floats::extract(grad_logits, "grad_logits")?,
        Floats::extract(emb, "emb")?,
        Floats::extract(weight, "weight")?,
    ) {
        (Floats::F32(g), Floats::F32(e), Floats::F32(w)) => {
            logits_backward_typed(py, g, e, w, &labels, m)
        }
        (Floats::F64(g), Floats::F64(e), Floats::F64(w)) => {
            logits_backward_typed(py, g, e, w, &labels, m)
        }
        _ => Err(same_dtype_error("grad_logits, emb and weight")),
    }
}

/// Margin on a (B, C) cosine matrix.
#[pyfunction]
fn apply_margin<'py>(
    py: Python<'py>,
    cos: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
) -> PyResult<Bound<'py, PyAny>> {
    let labels = labels_vec(labels);
    let m = &margin.0;
    Ok(match Floats::extract(cos, "cos")? {
        Floats::F32(c) => {
            let c = c.as_array();
            let out = run(py, || head::apply_margin(c, &labels, m))?;
            out.map_err(value_error)?.into_pyarray(py).into_any()
        }
        Floats::F64(c) => {
            let c = c.as_array();
            let out = run(py, || head::apply_margin(c, &labels, m))?;
            out.map_err(value_error)?.into_pyarray(py).into_any()
        }
    })
}

/// dL/dcos from dL/dlogits of `apply_margin`.
#[pyfunction]
fn apply_margin_backward<'py>(
    py: Python<'py>,
    grad_logits: &Bound<'py, PyAny>,
    cos: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
) -> PyResult<Bound<'py, PyAny>> {
    let labels = labels_vec(labels);
    let m = &margin.0;
    let arrays = (
        Floats::extract(grad_logits, "grad_logits")?,
        Floats::extract(cos, "cos")?,
    );
    same_floats!("grad_logits and cos", arrays, |g, c| {
        let (g, c) = (g.as_array(), c.as_array());
        let out = run(py, || head::apply_margin_backward(g, c, &labels, m))?;
        Ok(out.map_err(value_error)?.into_pyarray(py).into_any())
    })
}

fn topk_typed<'py, T: Real + Element>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, T>,
    gallery: PyReadonlyArray2<'py, T>,
    k: usize,
    normalized: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let (q, g) = (queries.as_array(), gallery.as_array());
    let r = run(py, || crate::search::cosine_topk(q, g, k, normalized))?.map_err(value_error)?;
    (r.scores.into_pyarray(py), r.indices.into_pyarray(py)).into_pyobject(py)
}

/// Exact cosine top-k: (scores (Q, k) best first in the inputs' dtype, indices int64; -1 pads).
#[pyfunction]
fn cosine_topk<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    gallery: &Bound<'py, PyAny>,
    k: usize,
    normalized: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let arrays = (
        Floats::extract(queries, "queries")?,
        Floats::extract(gallery, "gallery")?,
    );
    same_floats!("queries and gallery", arrays, |q, g| topk_typed(
        py, q, g, k, normalized
    ))
}

/// ROC, AUC, TAR@FAR, best threshold and fold accuracies as a dict.
#[pyfunction]
fn verification<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray1<'py, f64>,
    is_same: PyReadonlyArray1<'py, bool>,
    fars: PyReadonlyArray1<'py, f64>,
    folds: usize,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let scores = scores.as_array();
    let scores = scores.as_standard_layout();
    let is_same: Vec<bool> = is_same.as_array().to_vec();
    let fars: Vec<f64> = fars.as_array().to_vec();
    let s = scores.as_slice().expect("standard layout");
    let v = run(py, || {
        crate::metrics::verification(s, &is_same, &fars, folds)
    })?
    .map_err(value_error)?;
    let out = pyo3::types::PyDict::new(py);
    out.set_item("fpr", PyArray1::from_vec(py, v.fpr))?;
    out.set_item("tpr", PyArray1::from_vec(py, v.tpr))?;
    out.set_item("thresholds", PyArray1::from_vec(py, v.thresholds))?;
    out.set_item("auc", v.auc)?;
    out.set_item("tar_at_far", PyArray1::from_vec(py, v.tar_at_far))?;
    out.set_item("best_threshold", v.best_threshold)?;
    out.set_item("best_accuracy", v.best_accuracy)?;
    out.set_item("fold_accuracy", PyArray1::from_vec(py, v.fold_accuracy))?;
    Ok(out)
}

/// The core gallery behind a lock: searches share it, add/remove take it alone. Every call
/// releases the GIL before waiting for the lock, so Python threads never deadlock on it.
#[pyclass(frozen, name = "Gallery", module = "arcface_rs._core")]
pub struct PyGallery {
    gallery: RwLock<Gallery>,
    /// Counts changes, so that a GPU copy of the rows knows when it is stale.
    generation: AtomicU64,
    #[cfg(feature = "cuda")]
    gpu: crate::cuda::gallery::GpuSearch,
}

impl PyGallery {
    fn wrap(gallery: Gallery) -> Self {
        PyGallery {
            gallery: RwLock::new(gallery),
            generation: AtomicU64::new(0),
            #[cfg(feature = "cuda")]
            gpu: Default::default(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Gallery> {
        // A panic cannot leave a gallery half-changed (changes are validated first), so a
        // poisoned lock still guards a consistent gallery.
        self.gallery.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The gallery for a change; the generation moves on with it.
    fn write(&self) -> RwLockWriteGuard<'_, Gallery> {
        let guard = self.gallery.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        guard
    }

    /// `work` on the gallery under its read lock, taken without the GIL and outside the
    /// thread pool (see [`detached`]).
    fn reading<R: Send>(
        &self,
        py: Python<'_>,
        work: impl FnOnce(&Gallery) -> R + Send,
    ) -> PyResult<R> {
        detached(py, || {
            let guard = self.read();
            let gallery: &Gallery = &guard;
            crate::pool::install(|| work(gallery))
        })
    }

    /// `work` on the gallery under its write lock, as [`PyGallery::reading`].
    fn writing<R: Send>(
        &self,
        py: Python<'_>,
        work: impl FnOnce(&mut Gallery) -> R + Send,
    ) -> PyResult<R> {
        detached(py, || {
            let mut guard = self.write();
            let gallery: &mut Gallery = &mut guard;
            crate::pool::install(|| work(gallery))
        })
    }
}

#[pymethods]
impl PyGallery {
    #[new]
    fn new(dim: usize, dtype: &str) -> PyResult<Self> {
        let dtype = Dtype::parse(dtype).map_err(value_error)?;
        Ok(PyGallery::wrap(
            Gallery::new(dim, dtype).map_err(value_error)?,
        ))
    }

    /// Adds float32 rows (normalised here); returns their int64 ids.
    #[pyo3(signature = (emb, ids=None))]
    fn add<'py>(
        &self,
        py: Python<'py>,
        emb: PyReadonlyArray2<'py, f32>,
        ids: Option<PyReadonlyArray1<'py, i64>>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let emb = emb.as_array();
        let ids = ids.as_ref().map(|i| i.as_array());
        let out = self
            .writing(py, |g| g.add(emb, ids))?
            .map_err(value_error)?;
        Ok(out.into_pyarray(py))
    }

    /// Removes the rows with these ids (all must be present); returns how many.
    fn remove(&self, py: Python<'_>, ids: PyReadonlyArray1<'_, i64>) -> PyResult<usize> {
        let ids = ids.as_array();
        self.writing(py, |g| g.remove(ids))?.map_err(value_error)
    }

    /// (scores float32 (Q, k) best first, ids int64 (Q, k)); -1 / -inf pad when k > len.
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let q = queries.as_array();
        let r = self.reading(py, |g| g.search(q, k))?.map_err(value_error)?;
        (r.scores.into_pyarray(py), r.indices.into_pyarray(py)).into_pyobject(py)
    }

    /// `search` on CUDA device `device` (a copy of the rows stays there until the gallery
    /// changes). k above 64 runs on the CPU, with the same results.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn search_cuda<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        device: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        #[cfg(feature = "cuda")]
        {
            let q = queries.as_array();
            let generation = &self.generation;
            let r = self
                .reading(py, |gallery| {
                    let generation = generation.load(Ordering::SeqCst);
                    self.gpu.search(gallery, generation, q, k, device)
                })?
                .map_err(cuda_failure)?;
            (r.scores.into_pyarray(py), r.indices.into_pyarray(py)).into_pyobject(py)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(no_cuda_feature())
        }
    }

    /// (ids int64 (Q,), scores float32 (Q,)): the best id, -1 below the threshold.
    fn identify<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        threshold: f32,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let q = queries.as_array();
        let (ids, scores) = self
            .reading(py, |g| g.identify(q, threshold))?
            .map_err(value_error)?;
        (ids.into_pyarray(py), scores.into_pyarray(py)).into_pyobject(py)
    }

    /// The ids in gallery order.
    fn ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, self.read().ids())
    }

    /// The stored rows decoded to float32 unit vectors, in gallery order.
    fn vectors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        Ok(self.reading(py, |g| g.vectors())?.into_pyarray(py))
    }

    /// (ids, vectors) read under one lock: they match even while other threads change the
    /// gallery.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let (ids, vectors) = self.reading(py, |g| (g.ids().to_vec(), g.vectors()))?;
        (PyArray1::from_vec(py, ids), vectors.into_pyarray(py)).into_pyobject(py)
    }

    /// Writes the gallery to `path` (safetensors) atomically.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        self.reading(py, |g| crate::search::file::save(g, &path))?
            .map_err(value_error)
    }

    /// Reads a gallery written by `save`; a damaged file is a ValueError. `mmap`: leave the
    /// vectors in a read-only mapping of the file (copied only when the gallery changes).
    #[staticmethod]
    #[pyo3(signature = (path, mmap=false))]
    fn load(py: Python<'_>, path: PathBuf, mmap: bool) -> PyResult<Self> {
        let g = run(py, || {
            if mmap {
                crate::search::file::load_mapped(&path)
            } else {
                crate::search::file::load(&path)
            }
        })?
        .map_err(value_error)?;
        Ok(PyGallery::wrap(g))
    }

    #[getter]
    fn dim(&self) -> usize {
        self.read().dim()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.read().dtype().name()
    }

    /// Bytes held by the stored vectors (and int8 scales).
    #[getter]
    fn nbytes(&self) -> usize {
        self.read().vector_bytes()
    }

    /// Whether the vectors are read from a mapping of the file they were loaded from.
    #[getter]
    fn mapped(&self) -> bool {
        self.read().codes().is_mapped()
    }

    fn __len__(&self) -> usize {
        self.read().len()
    }
}

/// Whether the CUDA path can run here: built with the `cuda` feature, a driver and a device
/// present. False (never an error) on machines without CUDA.
#[pyfunction]
fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[cfg(feature = "cuda")]
fn cuda_elem(dtype: &str) -> PyResult<crate::cuda::device::Elem> {
    use crate::cuda::device::Elem;
    match dtype {
        "float32" => Ok(Elem::F32),
        "float64" => Ok(Elem::F64),
        other => Err(PyTypeError::new_err(format!(
            "dtype: the CUDA head computes in 'float32' or 'float64', got {other:?}"
        ))),
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda_feature() -> PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(
        "arcface_rs was built without the `cuda` feature; rebuild with \
         MATURIN_PEP517_ARGS=\"--features python,cuda\" pip install .",
    )
}

/// Driver, NVRTC and cuBLAS failures are not bad arguments: RuntimeError.
#[cfg(feature = "cuda")]
fn cuda_failure(e: crate::Error) -> PyErr {
    if e.arg == "cuda" {
        pyo3::exceptions::PyRuntimeError::new_err(e.to_string())
    } else {
        value_error(e)
    }
}

/// Bytes of device workspace `cuda_margin_loss` needs for B rows, C classes, D dims.
#[pyfunction]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
#[pyo3(signature = (b, c, d, dtype, grad_weight))]
fn cuda_head_workspace_bytes(
    b: usize,
    c: usize,
    d: usize,
    dtype: &str,
    grad_weight: bool,
) -> PyResult<usize> {
    #[cfg(feature = "cuda")]
    {
        use crate::cuda::head::{workspace_bytes, HeadShape, Tiling};
        let shape = HeadShape {
            b,
            c,
            d,
            elem: cuda_elem(dtype)?,
        };
        Ok(workspace_bytes(shape, grad_weight, Tiling::default()))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(no_cuda_feature())
    }
}

/// Queues the fused head on CUDA stream `stream` of device `device`, over device addresses
/// of contiguous tensors that the caller (arcface_rs.torch) allocated and keeps alive: see
/// `cuda::head::HeadBuffers` for each one's shape and meaning. Addresses of 0 skip a
/// gradient.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
#[pyo3(signature = (device, stream, b, c, d, dtype, margin, emb, weight, labels, row_weight,
                    row_loss, grad_emb, grad_weight, bad, workspace))]
fn cuda_margin_loss(
    py: Python<'_>,
    device: usize,
    stream: u64,
    b: usize,
    c: usize,
    d: usize,
    dtype: &str,
    margin: PyRef<'_, PyMargin>,
    emb: u64,
    weight: u64,
    labels: u64,
    row_weight: u64,
    row_loss: u64,
    grad_emb: u64,
    grad_weight: u64,
    bad: u64,
    workspace: u64,
) -> PyResult<()> {
    #[cfg(feature = "cuda")]
    {
        use crate::cuda::head::{margin_loss, HeadBuffers, HeadShape, Tiling};
        let shape = HeadShape {
            b,
            c,
            d,
            elem: cuda_elem(dtype)?,
        };
        let buffers = HeadBuffers {
            emb,
            weight,
            labels,
            row_weight,
            row_loss,
            grad_emb,
            grad_weight,
            bad,
            workspace,
        };
        let margin = margin.0;
        run(py, || {
            crate::cuda::driver::with_stream(device, stream, |s| {
                margin_loss(s, shape, &margin, &buffers, Tiling::default())
            })
        })?
        .map_err(cuda_failure)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(no_cuda_feature())
    }
}

/// Number of threads the Rust kernels use (RAYON_NUM_THREADS, else the core count).
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_class::<PyMargin>()?;
    m.add_class::<PyGallery>()?;
    m.add_function(wrap_pyfunction!(margin_loss, m)?)?;
    m.add_function(wrap_pyfunction!(margin_loss_shard, m)?)?;
    m.add_function(wrap_pyfunction!(margin_logits, m)?)?;
    m.add_function(wrap_pyfunction!(margin_logits_backward, m)?)?;
    m.add_function(wrap_pyfunction!(apply_margin, m)?)?;
    m.add_function(wrap_pyfunction!(apply_margin_backward, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_head_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_margin_loss, m)?)?;
    m.add("cuda_feature", cfg!(feature = "cuda"))?;
    m.add_function(wrap_pyfunction!(verification, m)?)?;
    m.add_function(wrap_pyfunction!(cosine_topk, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
