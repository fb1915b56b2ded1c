//! embtable's errors as the standard Python exceptions.
//!
//! | Rust | Python |
//! |---|---|
//! | `IndexOutOfRange` | `IndexError` |
//! | `ShapeMismatch`, `NonFinite`, `InvalidConfig`, `InvalidOffsets`, `Format` | `ValueError` |
//! | `Io` | `OSError` (its subclass for the kind: `FileNotFoundError`, `PermissionError`, …) |
//! | `Alloc` | `MemoryError` |
//!
//! The message is the library's, which names the position and the value.

use std::io::ErrorKind;
use std::path::Path;

use embtable::Error;
use pyo3::PyErr;
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIndexError, PyIsADirectoryError, PyMemoryError,
    PyNotADirectoryError, PyOSError, PyPermissionError, PyValueError,
};

/// The Python exception for an embtable error.
pub fn to_py(e: Error) -> PyErr {
    match &e {
        Error::IndexOutOfRange { .. } => PyIndexError::new_err(e.to_string()),
        Error::Alloc { .. } => PyMemoryError::new_err(e.to_string()),
        Error::Io { source, .. } => {
            let message = e.to_string();
            // OSError(errno, strerror) sets `.errno`, as Python's own errors do.
            let args = (source.raw_os_error().unwrap_or(0), message.clone());
            match source.kind() {
                ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                ErrorKind::AlreadyExists => PyFileExistsError::new_err(args),
                ErrorKind::IsADirectory => PyIsADirectoryError::new_err(args),
                ErrorKind::NotADirectory => PyNotADirectoryError::new_err(args),
                _ if source.raw_os_error().is_some() => PyOSError::new_err(args),
                _ => PyOSError::new_err(message),
            }
        }
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// As [`to_py`], naming the file a format error was found in (the
/// library's message gives the line only).
pub fn in_file(path: &Path) -> impl FnOnce(Error) -> PyErr + '_ {
    move |e| match e {
        Error::Format { .. } => PyValueError::new_err(format!("{}: {e}", path.display())),
        e => to_py(e),
    }
}

/// `Result<T, embtable::Error>` to `PyResult<T>`.
pub trait IntoPy<T> {
    /// Converts the error with [`to_py`].
    fn py(self) -> pyo3::PyResult<T>;
}

impl<T> IntoPy<T> for embtable::Result<T> {
    fn py(self) -> pyo3::PyResult<T> {
        self.map_err(to_py)
    }
}

/// A `ValueError` with `message`.
pub fn value_error(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}
