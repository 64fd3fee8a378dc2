//! The one error type of the core: what went wrong ([`ErrorKind`]), which argument it is
//! about, and a message. The bindings map each kind to its own Python exception.

use std::fmt;
use std::path::Path;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An argument the caller passed is not acceptable (Python: `ValueError`).
    InvalidArgument,
    /// The file system refused a read or write. `io` is the operating system's kind and
    /// `errno` its error number, kept so that Python raises the matching `OSError` subclass
    /// (`FileNotFoundError`, `PermissionError`, ...).
    Io {
        io: std::io::ErrorKind,
        errno: Option<i32>,
    },
    /// A file that is damaged, truncated or not a gallery file of this version (Python:
    /// `arcface_rs.GalleryFileError`, a `ValueError`).
    CorruptFile,
    /// The CUDA driver, NVRTC or cuBLAS failed (Python: `RuntimeError`).
    Device,
    /// A buffer sized by the caller (or by a file) cannot be allocated: it exceeds the
    /// memory available or the address space left (Python: `MemoryError`).
    OutOfMemory,
}

/// A failure of the core; `arg` names the argument (or path) it concerns as the Python API
/// spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub arg: &'static str,
    pub message: String,
}

impl Error {
    /// An argument is not acceptable.
    pub fn invalid(arg: &'static str, message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::InvalidArgument,
            arg,
            message: message.into(),
        }
    }

    /// The file system refused `what` on `path`.
    pub fn io(path: &Path, what: &str, e: &std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io {
                io: e.kind(),
                errno: e.raw_os_error(),
            },
            arg: "path",
            message: format!("{}: {what}: {e}", path.display()),
        }
    }

    /// The file at `path` is not a valid gallery file.
    pub fn corrupt(path: &Path, why: impl fmt::Display) -> Self {
        Error {
            kind: ErrorKind::CorruptFile,
            arg: "path",
            message: format!(
                "{}: not a valid arcface_rs gallery file: {why}",
                path.display()
            ),
        }
    }

    /// `bytes` for `what`, sized by the argument `arg`, cannot be allocated (`limit`: the
    /// bytes that could be, when known).
    pub fn out_of_memory(arg: &'static str, what: &str, bytes: u128, limit: Option<u128>) -> Self {
        let limit = limit.map_or(String::new(), |l| {
            format!(
                ", more than this process can allocate now ({:.3e} bytes)",
                l as f64
            )
        });
        Error {
            kind: ErrorKind::OutOfMemory,
            arg,
            message: format!("{what} would need {:.3e} bytes{limit}", bytes as f64),
        }
    }

    /// A device call failed.
    pub fn device(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Device,
            arg: "cuda",
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
