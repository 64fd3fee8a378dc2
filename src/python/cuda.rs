//! The entry points of the `cuda` feature; built without it, each says how to rebuild.
//! Device failures come back as RuntimeError (`ErrorKind::Device`).

#[cfg(feature = "cuda")]
use super::convert::run;
#[cfg(feature = "cuda")]
use super::convert::to_py_err;
use super::margin::PyMargin;
use pyo3::prelude::*;

/// Whether the CUDA path can run here: built with the `cuda` feature, a driver and a device
/// present. False (never an error) on machines without CUDA.
#[pyfunction]
pub(super) fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The CUDA devices this process can use (0 without a usable driver or the `cuda` feature).
#[pyfunction]
pub(super) fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Why a child forked after CUDA was initialised cannot use it (`crate::cuda::FORKED`).
#[cfg(feature = "cuda")]
pub(super) const FORKED: &str = crate::cuda::FORKED;
#[cfg(not(feature = "cuda"))]
pub(super) const FORKED: &str = "built without the cuda feature, this module never uses CUDA";

/// Whether this process was forked after it (or an ancestor) initialised CUDA, which a
/// child cannot use. False built without the `cuda` feature.
#[pyfunction]
pub(super) fn cuda_forked() -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::forked()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[cfg(feature = "cuda")]
fn cuda_elem(name: &str, dtype: &str) -> PyResult<crate::cuda::device::Elem> {
    use crate::cuda::device::Elem;
    match dtype {
        "float32" => Ok(Elem::F32),
        "float64" => Ok(Elem::F64),
        "bfloat16" => Ok(Elem::Bf16),
        "float16" => Ok(Elem::F16),
        other => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{name}: the CUDA head computes in 'float32', 'float64', 'bfloat16' or \
             'float16', got {other:?}"
        ))),
    }
}

/// The call's sizes and types (`cuda::head::HeadShape`): `dtype` the GEMM operands',
/// `weight_dtype` the weight's (None: `dtype`), `tf32` float32 GEMMs as TF32.
#[cfg(feature = "cuda")]
fn cuda_shape(
    (b, c, d, k): (usize, usize, usize, usize),
    dtype: &str,
    weight_dtype: Option<&str>,
    tf32: bool,
) -> PyResult<crate::cuda::head::HeadShape> {
    let elem = cuda_elem("dtype", dtype)?;
    let weight = weight_dtype.map_or(Ok(elem), |w| cuda_elem("weight_dtype", w))?;
    let shape = crate::cuda::head::HeadShape {
        b,
        c,
        d,
        k,
        elem,
        weight,
        tf32,
    };
    shape.check().map_err(to_py_err)?;
    Ok(shape)
}

/// A device address the caller passed: aligned to `align` bytes, and not 0 when `required`
/// (0 means "not wanted" for the optional ones).
#[cfg(feature = "cuda")]
fn check_address(name: &str, address: u64, align: u64, required: bool) -> PyResult<()> {
    if (required && address == 0) || !address.is_multiple_of(align) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{name}: device address {address:#x} is null or not aligned to {align} bytes"
        )));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub(super) fn no_cuda_feature() -> PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(
        "arcface_rs was built without the `cuda` feature; rebuild with \
         MATURIN_PEP517_ARGS=\"--features python,cuda\" pip install .",
    )
}

/// Bytes of device workspace `cuda_margin_loss` needs for B rows, C classes, D dims (for one
/// shard of a sharded head, C is the shard's and `stash_classes` the largest shard's).
#[pyfunction]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
#[pyo3(signature = (b, c, d, dtype, grad_weight, stash_classes=None, weight_dtype=None,
        sub_centers=1))]
pub(super) fn cuda_head_workspace_bytes(
    b: usize,
    c: usize,
    d: usize,
    dtype: &str,
    grad_weight: bool,
    stash_classes: Option<usize>,
    weight_dtype: Option<&str>,
    sub_centers: usize,
) -> PyResult<usize> {
    #[cfg(feature = "cuda")]
    {
        use crate::cuda::head::{workspace_bytes_shard, Tiling};
        let shape = cuda_shape((b, c, d, sub_centers), dtype, weight_dtype, false)?;
        let stash_classes = stash_classes.unwrap_or(c);
        Ok(workspace_bytes_shard(
            shape,
            grad_weight,
            Tiling::configured().map_err(to_py_err)?,
            stash_classes,
        ))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(no_cuda_feature())
    }
}

/// Private (`_core._cuda_margin_loss`, called by `arcface_rs._torch_cuda` only): queues the
/// fused head on CUDA stream `stream` of device `device`, over device addresses of
/// contiguous tensors that the caller allocated and keeps alive: see
/// `cuda::head::HeadBuffers` for each one's shape and meaning. Addresses of 0 skip a
/// gradient; the others must be non-zero and aligned to their element type, and the shape
/// non-empty (checked before anything is queued). `margins` holds `margin.encode()` (one
/// block) or, with `per_row_margins`, B blocks of margins of `margin`'s kind and scale.
/// `dtype` is the GEMM operands' type ('float32', 'float64', or 'bfloat16' / 'float16' for
/// the half-precision path: float32 emb and gradients, a `weight_dtype` weight); `tf32` runs
/// float32 GEMMs as TF32; `sub_centers` centres per class (c is then classes × that).
/// `bad` ((3,) int32, zeroed by the caller) is raised, never read: nothing here waits for
/// the GPU.
///
/// One shard of a sharded head (`cuda::head::ShardHooks`) when `combine` is given:
/// `combine(first_row, rows)` must queue on the stream the merge of those rows of `parts`
/// ((B, 4) float64 [max, sum, sum_ez, target_logit]) over all shards; labels may be
/// `REMOTE_TARGET`; `target_cos` ((B,) float64, or 0) serves hard-negative margins.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
#[pyo3(name = "_cuda_margin_loss", signature = (device, stream, b, c, d, dtype, margin,
        margins, per_row_margins, emb, weight, labels, row_weight, row_loss, grad_emb,
        grad_weight, bad, workspace, interclass_filter=None, combine=None, first_shard=true,
        stash_classes=None, parts=0, target_cos=0, weight_dtype=None, tf32=false,
        sub_centers=1))]
pub(super) fn cuda_margin_loss(
    py: Python<'_>,
    device: usize,
    stream: u64,
    b: usize,
    c: usize,
    d: usize,
    dtype: &str,
    margin: PyRef<'_, PyMargin>,
    margins: u64,
    per_row_margins: bool,
    emb: u64,
    weight: u64,
    labels: u64,
    row_weight: u64,
    row_loss: u64,
    grad_emb: u64,
    grad_weight: u64,
    bad: u64,
    workspace: u64,
    interclass_filter: Option<f64>,
    combine: Option<Py<PyAny>>,
    first_shard: bool,
    stash_classes: Option<usize>,
    parts: u64,
    target_cos: u64,
    weight_dtype: Option<&str>,
    tf32: bool,
    sub_centers: usize,
) -> PyResult<()> {
    #[cfg(feature = "cuda")]
    {
        use crate::cuda::head::{margin_loss, margin_loss_shard, HeadBuffers, Tiling};
        let shape = cuda_shape((b, c, d, sub_centers), dtype, weight_dtype, tf32)?;
        if b == 0 || c == 0 || d == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "shape: b, c and d must be >= 1, got ({b}, {c}, {d})"
            )));
        }
        let real = shape.acc().size() as u64;
        for (name, address, align, required) in [
            ("emb", emb, real, true),
            ("weight", weight, shape.weight.size() as u64, true),
            ("labels", labels, 8, true),
            ("row_weight", row_weight, 8, true),
            ("margins", margins, 8, true),
            ("row_loss", row_loss, 8, true),
            ("grad_emb", grad_emb, real, false),
            (
                "grad_weight",
                grad_weight,
                shape.weight.size() as u64,
                false,
            ),
            ("bad", bad, 4, true),
            ("parts", parts, 8, combine.is_some()),
            ("target_cos", target_cos, 8, false),
        ] {
            check_address(name, address, align, required)?;
        }
        let buffers = HeadBuffers {
            emb,
            weight,
            labels,
            row_weight,
            margins,
            per_row_margins,
            row_loss,
            grad_emb,
            grad_weight,
            bad,
            workspace,
        };
        let margin = margin.0;
        let head = crate::head::HeadOptions {
            sub_centers,
            interclass_filter,
        };
        // An exception raised by `combine` is kept and re-raised as it was.
        let mut raised: Option<PyErr> = None;
        let out = run(py, || {
            crate::cuda::driver::with_stream(device, stream, |s| match &combine {
                None => margin_loss(s, shape, &margin, head, &buffers, Tiling::configured()?),
                Some(callback) => {
                    let mut combine = |start: usize, rows: usize| {
                        Python::attach(|py| callback.call1(py, (start, rows)).map(drop)).map_err(
                            |err| {
                                raised.get_or_insert(err);
                                crate::Error::invalid("combine", "raised an exception")
                            },
                        )
                    };
                    let mut hooks = crate::cuda::head::ShardHooks {
                        stash_classes: stash_classes.unwrap_or(c),
                        first_shard,
                        target_cos,
                        parts,
                        combine: &mut combine,
                    };
                    margin_loss_shard(
                        s,
                        shape,
                        &margin,
                        head,
                        &buffers,
                        Tiling::configured()?,
                        &mut hooks,
                    )
                }
            })
        })?;
        if let Some(err) = raised {
            return Err(err);
        }
        out.map_err(to_py_err)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(no_cuda_feature())
    }
}

/// Multiplies `n` elements of a gradient at device address `grad` (`dtype`) in place by the
/// float64 scalar at device address `scale` unless it is exactly 1
/// (`cuda::head::scale_unless_one`), queued on `stream`; the host never reads the scalar.
#[pyfunction]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
#[pyo3(name = "_cuda_scale_unless_one")]
pub(super) fn cuda_scale_unless_one(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    grad: u64,
    n: usize,
    scale: u64,
) -> PyResult<()> {
    #[cfg(feature = "cuda")]
    {
        let elem = cuda_elem("dtype", dtype)?;
        check_address("grad", grad, elem.size() as u64, true)?;
        check_address("scale", scale, 8, true)?;
        run(py, || {
            crate::cuda::driver::with_stream(device, stream, |s| {
                crate::cuda::head::scale_unless_one(s, elem, grad, n, scale)
            })
        })?
        .map_err(to_py_err)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(no_cuda_feature())
    }
}
