//! The heads: fused loss (whole or one shard of a model-parallel head), logits and their
//! backward, and the margin on a cosine matrix.
//!
//! Each `#[pyfunction]` restates its parameter list and its dtype dispatch by necessity:
//! pyo3 reads a function's Python signature from its own Rust signature, and the typed
//! helpers are generic over the float type the arrays turn out to hold.

use super::convert::{
    labels_vec, parse_reduction, recycled_array, run, same_dtype_error, same_floats, to_py_err,
    Floats, Recyclable,
};
use super::margin::{margins, row_margins, PyMargin};
use crate::head::{self, GradFilter, HeadOptions, LossOptions, RowPart};
use crate::margin::Margins;
use crate::real::Real;
use numpy::{Element, IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// How a shard of a model-parallel head meets the others: a Python callable
/// `combine(parts (n, 4) float64 [max, sum, sum_ez, target_logit], failed) -> (n, 4)`.
struct ShardArgs {
    stash_classes: usize,
    first_shard: bool,
    combine: Py<PyAny>,
    target_cos: Option<Vec<f64>>,
}

/// `grad_filter`: None (the exact gradient), "auto" or a probability.
fn grad_filter(value: Option<&Bound<'_, PyAny>>) -> PyResult<GradFilter> {
    let Some(value) = value else {
        return Ok(GradFilter::Exact);
    };
    if value.is_none() {
        return Ok(GradFilter::Exact);
    }
    if let Ok(text) = value.extract::<String>() {
        return match text.as_str() {
            "auto" => Ok(GradFilter::Auto),
            _ => Err(PyValueError::new_err(format!(
                "grad_filter: must be None, 'auto' or a probability in [0, 1), got {text:?}"
            ))),
        };
    }
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(
            "grad_filter must be None, 'auto' or a float, got bool",
        ));
    }
    match value.extract::<f64>() {
        Ok(f) => Ok(GradFilter::Below(f)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "grad_filter must be None, 'auto' or a float, got {}",
            value.get_type().name()?
        ))),
    }
}

/// The head's class layout and filter from the keyword arguments.
fn head_options(sub_centers: usize, interclass_filter: Option<f64>) -> HeadOptions {
    HeadOptions {
        sub_centers,
        interclass_filter,
    }
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

fn loss_typed<'py, T: Real + Element + Recyclable>(
    py: Python<'py>,
    emb: PyReadonlyArray2<'py, T>,
    weight: PyReadonlyArray2<'py, T>,
    labels: &[i64],
    margin: Margins,
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
                target_cos: sh.target_cos.as_deref(),
            };
            head::margin_loss_shard(e, w, labels, margin, options, &mut opts)
        }
    })?;
    if let Some(err) = raised {
        return Err(err);
    }
    let out = out.map_err(to_py_err)?;
    (
        out.loss,
        PyArray1::from_vec(py, out.row_losses),
        out.grad_emb.map(|g| g.into_pyarray(py)),
        out.grad_weight.map(|g| recycled_array(py, g)).transpose()?,
        out.backward_skipped,
    )
        .into_pyobject(py)
}

/// Fused loss and gradients: (loss, row_losses, grad_emb, grad_weight, backward_skipped); a
/// gradient not asked for is None. `upstream` multiplies each row's gradient; `row_margins`
/// gives each row its own margin (one parameter block per row, of `margin`'s kind and
/// scale); `grad_filter` drops gradient entries below it (backward_skipped: the share of the
/// backward GEMMs' work that saved).
#[pyfunction]
#[pyo3(signature = (emb, weight, labels, margin, reduction, grad_emb=true, grad_weight=true,
    upstream=None, row_margins=None, sub_centers=1, interclass_filter=None, grad_filter=None))]
#[allow(clippy::too_many_arguments)]
pub(super) fn margin_loss<'py>(
    py: Python<'py>,
    emb: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
    reduction: &str,
    grad_emb: bool,
    grad_weight: bool,
    upstream: Option<PyReadonlyArray1<'py, f64>>,
    row_margins: Option<PyReadonlyArray2<'py, f64>>,
    sub_centers: usize,
    interclass_filter: Option<f64>,
    grad_filter: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let labels = labels_vec(labels);
    let rows = self::row_margins(margin, row_margins)?;
    let upstream: Option<Vec<f64>> = upstream.map(|u| u.as_array().to_vec());
    let options = LossOptions {
        reduction: parse_reduction(reduction)?,
        upstream: upstream.as_deref(),
        grad_emb,
        grad_weight,
        head: head_options(sub_centers, interclass_filter),
        grad_filter: self::grad_filter(grad_filter)?,
    };
    let m = margins(margin, &rows);
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
/// (loss, row_losses, grad_emb share, grad_weight of the shard). `target_cos`: every row's
/// target cosine, needed by hard-negative margins.
#[pyfunction]
#[pyo3(signature = (emb, weight, labels, margin, reduction, stash_classes, first_shard, combine,
    row_margins=None, sub_centers=1, interclass_filter=None, target_cos=None, grad_filter=None))]
#[allow(clippy::too_many_arguments)]
pub(super) fn margin_loss_shard<'py>(
    py: Python<'py>,
    emb: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
    reduction: &str,
    stash_classes: usize,
    first_shard: bool,
    combine: Py<PyAny>,
    row_margins: Option<PyReadonlyArray2<'py, f64>>,
    sub_centers: usize,
    interclass_filter: Option<f64>,
    target_cos: Option<PyReadonlyArray1<'py, f64>>,
    grad_filter: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let labels = labels_vec(labels);
    let rows = self::row_margins(margin, row_margins)?;
    let options = LossOptions {
        head: head_options(sub_centers, interclass_filter),
        grad_filter: self::grad_filter(grad_filter)?,
        ..LossOptions::new(parse_reduction(reduction)?)
    };
    let shard = ShardArgs {
        stash_classes,
        first_shard,
        combine,
        target_cos: target_cos.map(|t| t.as_array().to_vec()),
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
        margins(margin, &rows),
        options,
        Some(&shard)
    ))
}

fn logits_typed<'py, T: Real + Element>(
    py: Python<'py>,
    emb: PyReadonlyArray2<'py, T>,
    weight: PyReadonlyArray2<'py, T>,
    labels: &[i64],
    margin: Margins,
    head: HeadOptions,
) -> PyResult<Bound<'py, PyAny>> {
    let (e, w) = (emb.as_array(), weight.as_array());
    let out =
        run(py, || head::margin_logits_with(e, w, labels, margin, head))?.map_err(to_py_err)?;
    Ok(out.into_pyarray(py).into_any())
}

/// The (B, C) margin logits.
#[pyfunction]
#[pyo3(signature = (emb, weight, labels, margin, row_margins=None, sub_centers=1,
    interclass_filter=None))]
#[allow(clippy::too_many_arguments)]
pub(super) fn margin_logits<'py>(
    py: Python<'py>,
    emb: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
    row_margins: Option<PyReadonlyArray2<'py, f64>>,
    sub_centers: usize,
    interclass_filter: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let head = head_options(sub_centers, interclass_filter);
    let labels = labels_vec(labels);
    let rows = self::row_margins(margin, row_margins)?;
    let arrays = (
        Floats::extract(emb, "emb")?,
        Floats::extract(weight, "weight")?,
    );
    same_floats!("emb and weight", arrays, |e, w| logits_typed(
        py,
        e,
        w,
        &labels,
        margins(margin, &rows),
        head
    ))
}

fn logits_backward_typed<'py, T: Real + Element + Recyclable>(
    py: Python<'py>,
    grad: PyReadonlyArray2<'py, T>,
    emb: PyReadonlyArray2<'py, T>,
    weight: PyReadonlyArray2<'py, T>,
    labels: &[i64],
    margin: Margins,
    head: HeadOptions,
) -> PyResult<Bound<'py, PyTuple>> {
    let (g, e, w) = (grad.as_array(), emb.as_array(), weight.as_array());
    let (ge, gw) = run(py, || {
        head::margin_logits_backward_with(g, e, w, labels, margin, head)
    })?
    .map_err(to_py_err)?;
    (ge.into_pyarray(py), recycled_array(py, gw)?).into_pyobject(py)
}

/// (grad_emb, grad_weight) from dL/dlogits.
#[pyfunction]
#[pyo3(signature = (grad_logits, emb, weight, labels, margin, row_margins=None, sub_centers=1,
    interclass_filter=None))]
#[allow(clippy::too_many_arguments)]
pub(super) fn margin_logits_backward<'py>(
    py: Python<'py>,
    grad_logits: &Bound<'py, PyAny>,
    emb: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
    row_margins: Option<PyReadonlyArray2<'py, f64>>,
    sub_centers: usize,
    interclass_filter: Option<f64>,
) -> PyResult<Bound<'py, PyTuple>> {
    let labels = labels_vec(labels);
    let rows = self::row_margins(margin, row_margins)?;
    let m = margins(margin, &rows);
    let head = head_options(sub_centers, interclass_filter);
    match (
        Floats::extract(grad_logits, "grad_logits")?,
        Floats::extract(emb, "emb")?,
        Floats::extract(weight, "weight")?,
    ) {
        (Floats::F32(g), Floats::F32(e), Floats::F32(w)) => {
            logits_backward_typed(py, g, e, w, &labels, m, head)
        }
        (Floats::F64(g), Floats::F64(e), Floats::F64(w)) => {
            logits_backward_typed(py, g, e, w, &labels, m, head)
        }
        _ => Err(same_dtype_error("grad_logits, emb and weight")),
    }
}

/// Margin on a (B, C) cosine matrix.
#[pyfunction]
#[pyo3(signature = (cos, labels, margin, row_margins=None))]
pub(super) fn apply_margin<'py>(
    py: Python<'py>,
    cos: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
    row_margins: Option<PyReadonlyArray2<'py, f64>>,
) -> PyResult<Bound<'py, PyAny>> {
    let labels = labels_vec(labels);
    let rows = self::row_margins(margin, row_margins)?;
    let m = margins(margin, &rows);
    Ok(match Floats::extract(cos, "cos")? {
        Floats::F32(c) => {
            let c = c.as_array();
            let out = run(py, || head::apply_margin(c, &labels, m))?;
            out.map_err(to_py_err)?.into_pyarray(py).into_any()
        }
        Floats::F64(c) => {
            let c = c.as_array();
            let out = run(py, || head::apply_margin(c, &labels, m))?;
            out.map_err(to_py_err)?.into_pyarray(py).into_any()
        }
    })
}

/// dL/dcos from dL/dlogits of `apply_margin`.
#[pyfunction]
#[pyo3(signature = (grad_logits, cos, labels, margin, row_margins=None))]
pub(super) fn apply_margin_backward<'py>(
    py: Python<'py>,
    grad_logits: &Bound<'py, PyAny>,
    cos: &Bound<'py, PyAny>,
    labels: PyReadonlyArray1<'py, i64>,
    margin: &PyMargin,
    row_margins: Option<PyReadonlyArray2<'py, f64>>,
) -> PyResult<Bound<'py, PyAny>> {
    let labels = labels_vec(labels);
    let rows = self::row_margins(margin, row_margins)?;
    let m = margins(margin, &rows);
    let arrays = (
        Floats::extract(grad_logits, "grad_logits")?,
        Floats::extract(cos, "cos")?,
    );
    same_floats!("grad_logits and cos", arrays, |g, c| {
        let (g, c) = (g.as_array(), c.as_array());
        let out = run(py, || head::apply_margin_backward(g, c, &labels, m))?;
        Ok(out.map_err(to_py_err)?.into_pyarray(py).into_any())
    })
}
