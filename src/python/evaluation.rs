//! The evaluation protocols' heavy parts (the protocols themselves are evaluation.py).

use super::convert::{run, to_py_err, Floats};
use crate::evaluation;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Dot product of rows t1[p] and t2[p] of `features` for every pair p, in float64.
#[pyfunction]
pub(super) fn pair_dots<'py>(
    py: Python<'py>,
    features: &Bound<'py, PyAny>,
    t1: PyReadonlyArray1<'py, i64>,
    t2: PyReadonlyArray1<'py, i64>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (a, b) = (t1.as_array().to_vec(), t2.as_array().to_vec());
    let out = match Floats::extract(features, "features")? {
        Floats::F32(f) => {
            let f = f.as_array();
            run(py, || evaluation::pair_dots(f, &a, &b))?
        }
        Floats::F64(f) => {
            let f = f.as_array();
            run(py, || evaluation::pair_dots(f, &a, &b))?
        }
    };
    Ok(PyArray1::from_vec(py, out.map_err(to_py_err)?))
}

/// TAR at each FAR over all pairs of the rows of `features`: a dict with `tar`,
/// `thresholds`, `positives`, `negatives`.
#[pyfunction]
pub(super) fn all_pairs_tar_at_far<'py>(
    py: Python<'py>,
    features: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    fars: PyReadonlyArray1<'py, f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let (labels, fars) = (labels.as_array().to_vec(), fars.as_array().to_vec());
    let out = match Floats::extract(features, "features")? {
        Floats::F32(f) => {
            let f = f.as_array();
            run(py, || evaluation::all_pairs_tar_at_far(f, &labels, &fars))?
        }
        Floats::F64(f) => {
            let f = f.as_array();
            run(py, || evaluation::all_pairs_tar_at_far(f, &labels, &fars))?
        }
    }
    .map_err(to_py_err)?;
    let d = PyDict::new(py);
    d.set_item("tar", PyArray1::from_vec(py, out.tar))?;
    d.set_item("thresholds", PyArray1::from_vec(py, out.thresholds))?;
    d.set_item("positives", out.positives)?;
    d.set_item("negatives", out.negatives)?;
    Ok(d)
}
