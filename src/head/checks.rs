use super::*;

/// Refuses a scale that would make logits (or the gradient's products) overflow `T`:
/// `scale * max|psi|` must stay below `T::MAX / (256 SAFE_SCALE^3)` (about 1.2e18 for
/// float32, 1.7e125 for float64), so that the gradient's products over rows of any norm in
/// the safe range stay finite.
pub(super) fn check_logit_range<T: Real>(
    margin: Margins,
    scale: f64,
    arg: &'static str,
) -> Result<()> {
    let peak = margin.peak();
    let limit = T::MAX / (256.0 * T::SAFE_SCALE.powi(3));
    let logits = scale * peak;
    if logits.is_nan() || logits > limit {
        let what = if arg == "s" {
            format!("s = {scale}")
        } else {
            format!("a feature norm of {scale:e} (the scale of SphereFace(s=None))")
        };
        return Err(Error::invalid(
            arg,
            format!(
                "{what} makes logits up to {:e}, too large for {} (at most {limit:e}); use a \
                 smaller scale or float64",
                scale * peak,
                T::NAME
            ),
        ));
    }
    Ok(())
}

/// Label value of a row whose target class is held by another shard (sharded loss only).
pub const REMOTE_TARGET: i64 = -2;

pub(super) fn check_labels(labels: &[i64], b: usize, c: usize) -> Result<Vec<Option<usize>>> {
    check_targets(labels, b, c, false)
}

/// Target columns; `remote` also accepts [`REMOTE_TARGET`] (mapped to None, like -1).
pub(super) fn check_targets(
    labels: &[i64],
    b: usize,
    c: usize,
    remote: bool,
) -> Result<Vec<Option<usize>>> {
    if labels.len() != b {
        return Err(Error::invalid(
            "labels",
            format!("has {} entries but emb has {b} rows", labels.len()),
        ));
    }
    labels
        .iter()
        .enumerate()
        .map(|(i, &y)| match y {
            -1 => Ok(None),
            REMOTE_TARGET if remote => Ok(None),
            y if y >= 0 && (y as u64) < c as u64 => Ok(Some(y as usize)),
            y => Err(Error::invalid(
                "labels",
                format!("value {y} at index {i} is outside [-1, {c}) (-1 marks an ignored row)"),
            )),
        })
        .collect()
}

pub(super) fn check_finite<T: Real>(m: ArrayView2<T>, arg: &'static str) -> Result<()> {
    let bad = m
        .axis_iter(Axis(0))
        .into_par_iter()
        .position_first(|row| row.iter().any(|v| !v.is_finite()));
    match bad {
        Some(i) => Err(Error::invalid(arg, format!("row {i} contains NaN or inf"))),
        None => Ok(()),
    }
}

pub(super) fn check_shape(
    arg: &'static str,
    got: (usize, usize),
    want: (usize, usize),
) -> Result<()> {
    if got != want {
        return Err(Error::invalid(
            arg,
            format!("has shape {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}
