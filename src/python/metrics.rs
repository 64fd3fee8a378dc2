//! Verification metrics.

use super::convert::{run, to_py_err};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

/// ROC, AUC, TAR@FAR, best threshold and fold accuracies as a dict.
#[pyfunction]
pub(super) fn verification<'py>(
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
    .map_err(to_py_err)?;
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
