//! Exact cosine top-k over a gallery array.

use super::convert::{run, same_dtype_error, same_floats, to_py_err, Floats};
use crate::real::Real;
use numpy::{Element, IntoPyArray, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

fn topk_typed<'py, T: Real + Element>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, T>,
    gallery: PyReadonlyArray2<'py, T>,
    k: usize,
    normalized: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let (q, g) = (queries.as_array(), gallery.as_array());
    let r = run(py, || crate::search::cosine_topk(q, g, k, normalized))?.map_err(to_py_err)?;
    (r.scores.into_pyarray(py), r.indices.into_pyarray(py)).into_pyobject(py)
}

/// Exact cosine top-k: (scores (Q, k) best first in the inputs' dtype, indices int64; -1 pads).
#[pyfunction]
pub(super) fn cosine_topk<'py>(
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
