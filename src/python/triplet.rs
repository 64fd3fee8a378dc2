//! Triplet loss with batch mining: the loss, each anchor's loss and the gradient.

use super::convert::{labels_vec, run, to_py_err, Floats};
use crate::triplet::{Mining, PairMeasure, TripletReduction};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

fn mining(name: &str) -> PyResult<Mining> {
    match name {
        "batch_hard" => Ok(Mining::BatchHard),
        "semi_hard" => Ok(Mining::SemiHard),
        "all" => Ok(Mining::All),
        other => Err(PyValueError::new_err(format!(
            "mining: must be 'batch_hard', 'semi_hard' or 'all', got {other:?}"
        ))),
    }
}

fn measure(name: &str) -> PyResult<PairMeasure> {
    match name {
        "cosine" => Ok(PairMeasure::Cosine),
        "euclidean" => Ok(PairMeasure::Euclidean),
        other => Err(PyValueError::new_err(format!(
            "distance: must be 'cosine' or 'euclidean', got {other:?}"
        ))),
    }
}

fn reduction(name: &str) -> PyResult<TripletReduction> {
    match name {
        "mean" => Ok(TripletReduction::Mean),
        "mean_nonzero" => Ok(TripletReduction::MeanNonzero),
        "sum" => Ok(TripletReduction::Sum),
        "none" => Ok(TripletReduction::PerAnchor),
        other => Err(PyValueError::new_err(format!(
            "reduction: must be 'mean', 'mean_nonzero', 'sum' or 'none', got {other:?}"
        ))),
    }
}

/// Triplet loss: (loss float, per-anchor losses float64 (B,), grad_emb (B, D) in emb's
/// dtype, mined triplets, triplets with a positive loss). `upstream` (reduction "none"):
/// one weight per anchor for the gradient.
#[pyfunction]
#[pyo3(signature = (emb, labels, margin, mining, distance, reduction, upstream=None))]
#[allow(clippy::too_many_arguments)]
pub(super) fn triplet_loss<'py>(
    py: Python<'py>,
    emb: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: f64,
    mining: &str,
    distance: &str,
    reduction: &str,
    upstream: Option<PyReadonlyArray1<'py, f64>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (how, measure, reduce) = (
        self::mining(mining)?,
        self::measure(distance)?,
        self::reduction(reduction)?,
    );
    let labels = labels_vec(labels);
    let upstream: Option<Vec<f64>> = upstream.map(|u| u.as_array().to_vec());
    macro_rules! go {
        ($e:expr) => {{
            let e = $e.as_array();
            let out = run(py, || {
                crate::triplet::triplet_loss(
                    e,
                    &labels,
                    margin,
                    how,
                    measure,
                    reduce,
                    upstream.as_deref(),
                )
            })?
            .map_err(to_py_err)?;
            (
                out.loss,
                PyArray1::from_vec(py, out.per_anchor),
                out.grad_emb.into_pyarray(py),
                out.triplets,
                out.active,
            )
                .into_pyobject(py)
        }};
    }
    match Floats::extract(emb, "emb")? {
        Floats::F32(e) => go!(e),
        Floats::F64(e) => go!(e),
    }
}
