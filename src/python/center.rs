//! Center loss: the loss, its gradient and the centres' update.

use super::convert::{labels_vec, run, same_dtype_error, same_floats, to_py_err, Floats};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// Center loss: (loss, grad_emb, classes int64, delta): add `delta` to the rows `classes`
/// of the centres to apply the paper's update.
#[pyfunction]
#[pyo3(signature = (emb, centers, labels, lambda_c, alpha))]
pub(super) fn center_loss<'py>(
    py: Python<'py>,
    emb: &Bound<'py, PyAny>,
    centers: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    lambda_c: f64,
    alpha: f64,
) -> PyResult<Bound<'py, PyTuple>> {
    let labels = labels_vec(labels);
    let arrays = (
        Floats::extract(emb, "emb")?,
        Floats::extract(centers, "centers")?,
    );
    same_floats!("emb and centers", arrays, |e, c| {
        let (e, c) = (e.as_array(), c.as_array());
        let out = run(py, || {
            crate::center::center_loss(e, c, &labels, lambda_c, alpha)
        })?
        .map_err(to_py_err)?;
        (
            out.loss,
            out.grad_emb.into_pyarray(py),
            PyArray1::from_vec(py, out.classes),
            out.delta.into_pyarray(py),
        )
            .into_pyobject(py)
    })
}
