//! `Margin`: the validated margin object each Python margin class holds.

use super::convert::to_py_err;
use crate::margin::{Margin, Margins, RowContext, Scale, Target, PARAMS_LEN};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArray2, PyReadonlyArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The margins of a call: `margin` for every row, or one decoded block per row of
/// `row_margins` ((B, MARGIN_PARAMS) float64), each of `margin`'s kind and scale.
pub(super) fn row_margins(
    margin: &PyMargin,
    row_margins: Option<PyReadonlyArray2<'_, f64>>,
) -> PyResult<Option<Vec<Margin>>> {
    let Some(blocks) = row_margins else {
        return Ok(None);
    };
    let blocks = blocks.as_array();
    if blocks.ncols() != PARAMS_LEN {
        return Err(PyValueError::new_err(format!(
            "row_margins: must have {PARAMS_LEN} columns (one parameter block per row), got {}",
            blocks.ncols()
        )));
    }
    let rows: Vec<Margin> = blocks
        .rows()
        .into_iter()
        .map(|b| Margin::decode(&b.to_vec()))
        .collect::<crate::Result<_>>()
        .map_err(to_py_err)?;
    if let Some(i) = rows
        .iter()
        .position(|m| m.kind() != margin.0.kind() || m.scale() != margin.0.scale())
    {
        return Err(PyValueError::new_err(format!(
            "row_margins: row {i} has another kind or scale than margin"
        )));
    }
    Ok(Some(rows))
}

/// [`Margins`] over the result of [`row_margins`].
pub(super) fn margins<'a>(margin: &'a PyMargin, rows: &'a Option<Vec<Margin>>) -> Margins<'a> {
    match rows {
        Some(rows) => Margins::PerRow(rows),
        None => Margins::Same(&margin.0),
    }
}

impl PyMargin {
    /// `pick` of the margin's [`Target`] at each cosine of `c`, for rows of feature norm
    /// `norm` (1 when None).
    fn each<'py>(
        &self,
        py: Python<'py>,
        c: PyReadonlyArrayDyn<'py, f64>,
        norm: Option<f64>,
        pick: impl Fn(Target) -> f64,
    ) -> Bound<'py, PyArrayDyn<f64>> {
        let row = norm.map_or_else(RowContext::default, |norm| RowContext { norm });
        c.as_array()
            .mapv(|v| pick(self.0.target(v, row)))
            .into_pyarray(py)
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
        Margin::softmax(s).map(PyMargin).map_err(to_py_err)
    }

    /// ArcFace: psi = cos(theta + m).
    #[staticmethod]
    fn arcface(s: f64, m: f64, easy_margin: bool) -> PyResult<Self> {
        Margin::arcface(s, m, easy_margin)
            .map(PyMargin)
            .map_err(to_py_err)
    }

    /// CosFace: psi = cos(theta) - m.
    #[staticmethod]
    fn cosface(s: f64, m: f64) -> PyResult<Self> {
        Margin::cosface(s, m).map(PyMargin).map_err(to_py_err)
    }

    /// SphereFace (A-Softmax) with integer m; s=None scales by the feature norm.
    #[staticmethod]
    #[pyo3(signature = (m, s, lambda_))]
    fn sphereface(m: i64, s: Option<f64>, lambda_: f64) -> PyResult<Self> {
        Margin::sphereface(m, s, lambda_)
            .map(PyMargin)
            .map_err(to_py_err)
    }

    /// Combined margin: psi = cos(m1 theta + m2) - m3.
    #[staticmethod]
    fn combined(s: f64, m1: f64, m2: f64, m3: f64) -> PyResult<Self> {
        Margin::combined(s, m1, m2, m3)
            .map(PyMargin)
            .map_err(to_py_err)
    }

    /// AdaFace with margin m and a row's margin scaler z in [-1, 1].
    #[staticmethod]
    fn adaface(s: f64, m: f64, z: f64) -> PyResult<Self> {
        Margin::adaface(s, m, z).map(PyMargin).map_err(to_py_err)
    }

    /// MagFace: ArcFace with a margin that follows the feature norm, and its regulariser.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn magface(
        s: f64,
        l_a: f64,
        u_a: f64,
        l_m: f64,
        u_m: f64,
        easy_margin: bool,
        lambda_g: f64,
    ) -> PyResult<Self> {
        Margin::magface(s, (l_a, u_a), (l_m, u_m), easy_margin, lambda_g)
            .map(PyMargin)
            .map_err(to_py_err)
    }

    /// CurricularFace with margin m and the running mean target cosine t.
    #[staticmethod]
    fn curricularface(s: f64, m: f64, t: f64) -> PyResult<Self> {
        Margin::curricularface(s, m, t)
            .map(PyMargin)
            .map_err(to_py_err)
    }

    /// MV-Softmax with margin m (angular when arc) and non-target weight t >= 1.
    #[staticmethod]
    fn mvsoftmax(s: f64, m: f64, t: f64, arc: bool) -> PyResult<Self> {
        Margin::mvsoftmax(s, m, t, arc)
            .map(PyMargin)
            .map_err(to_py_err)
    }

    /// This margin with the straight-through gradient on or off (ArcFace, Combined).
    fn with_straight_through(&self, on: bool) -> PyResult<Self> {
        self.0
            .with_straight_through(on)
            .map(PyMargin)
            .map_err(to_py_err)
    }

    /// The margin a parameter block of `encode` describes, validated.
    #[staticmethod]
    fn decode(block: Vec<f64>) -> PyResult<Self> {
        Margin::decode(&block).map(PyMargin).map_err(to_py_err)
    }

    /// The parameter block `[kind, s, p0, ...]` (length `MARGIN_PARAMS`, kinds in
    /// `MARGIN_KINDS`) that the CUDA kernels, the torch ops and the plain path read.
    fn encode(&self) -> [f64; PARAMS_LEN] {
        self.0.encode()
    }

    /// The fixed logit scale, or None when logits scale by the feature norm.
    #[getter]
    fn scale(&self) -> Option<f64> {
        match self.0.scale() {
            Scale::Fixed(s) => Some(s),
            Scale::FeatureNorm => None,
        }
    }

    /// psi(c) elementwise over a float64 array of cosines, for rows of feature norm
    /// `norm` (read by MagFace only; 1 when None).
    #[pyo3(signature = (c, norm=None))]
    fn psi<'py>(
        &self,
        py: Python<'py>,
        c: PyReadonlyArrayDyn<'py, f64>,
        norm: Option<f64>,
    ) -> Bound<'py, PyArrayDyn<f64>> {
        self.each(py, c, norm, |t| t.psi)
    }

    /// psi'(c) elementwise over a float64 array of cosines (`norm` as for `psi`).
    #[pyo3(signature = (c, norm=None))]
    fn dpsi<'py>(
        &self,
        py: Python<'py>,
        c: PyReadonlyArrayDyn<'py, f64>,
        norm: Option<f64>,
    ) -> Bound<'py, PyArrayDyn<f64>> {
        self.each(py, c, norm, |t| t.dpsi)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.0)
    }
}
