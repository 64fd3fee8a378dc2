//! The one error type of the core. The bindings map it to Python's `ValueError`.

use std::fmt;

/// An argument the caller passed is not acceptable; `arg` names it as the Python API does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub arg: &'static str,
    pub message: String,
}

impl Error {
    pub fn invalid(arg: &'static str, message: impl Into<String>) -> Self {
        Error {
            arg,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.arg, self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The error for row `row` of `arg` whose norm (or squared norm) cannot normalise it.
pub(crate) fn unnormalisable(arg: &'static str, row: usize, norm: f64) -> Option<Error> {
    if !norm.is_finite() {
        Some(Error::invalid(
            arg,
            format!("row {row} contains NaN or inf"),
        ))
    } else if norm == 0.0 {
        Some(Error::invalid(
            arg,
            format!("row {row} is all zeros; a zero vector has no direction to normalise"),
        ))
    } else {
        None
    }
}
