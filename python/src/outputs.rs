//! New output arrays of lookups, recycled when large.
//!
//! A lookup's output is written in full by the library (every row of
//! `lookup`, every bag of `pooled_lookup`, empty ones as zeros), so it need
//! not be zeroed first. A fresh multi-megabyte array from NumPy is worse
//! than an unneeded memset: above glibc's mmap threshold (a 128 MiB W5
//! output) it is new pages, tens of thousands of page faults a call. So
//! outputs of [`RECYCLE_MIN_BYTES`] or more live in the library's aligned
//! buffers (huge pages from 32 MiB on), owned by an [`OutputBuffer`] that
//! is the NumPy array's base. When the last reference to the array goes
//! (the array, its views, a torch tensor made with `from_numpy`), the
//! buffer goes back to a short list of spares, and the next output of
//! about its size reuses it: a training loop that drops each step's output
//! allocates two buffers in all. A buffer is only reused after Python has
//! released every reference to it, so no output ever changes under its
//! holder.

use std::sync::{Mutex, PoisonError};

use embtable::AlignedBuf;
use numpy::PyArrayDyn;
use numpy::ndarray::{ArrayViewMutD, IxDyn};
use pyo3::prelude::*;

use crate::arrays;
use crate::errors::{IntoPy, value_error};
use crate::threads::run;

/// Smaller outputs are plain zeroed NumPy arrays: the memset is cheap there
/// and glibc reuses their memory.
const RECYCLE_MIN_BYTES: usize = 1 << 20;

/// Freed buffers kept for reuse. A loop holding one output while it makes
/// the next needs one; two also cover two tables of different sizes.
const SPARES_KEPT: usize = 2;

/// Freed buffers, oldest first.
static SPARES: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());

/// The memory of an output array (its NumPy base object). Holds the buffer
/// until Python drops the last array viewing it, then returns it to
/// [`SPARES`].
#[pyclass(module = "embtable._embtable", frozen)]
pub struct OutputBuffer {
    buf: Option<AlignedBuf>,
}

impl Drop for OutputBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let evicted = {
                let mut spares = SPARES.lock().unwrap_or_else(PoisonError::into_inner);
                spares.push(buf);
                (spares.len() > SPARES_KEPT).then(|| spares.remove(0))
            };
            drop(evicted); // freed outside the lock
        }
    }
}

/// A spare of `len` floats up to twice that (so a reused buffer wastes at
/// most half of itself), else a new zeroed one.
fn take(len: usize) -> embtable::Result<AlignedBuf> {
    let reused = {
        let mut spares = SPARES.lock().unwrap_or_else(PoisonError::into_inner);
        let fits = spares
            .iter()
            .position(|b| b.len() >= len && b.len() / 2 <= len);
        fits.map(|i| spares.remove(i))
    };
    match reused {
        Some(buf) => Ok(buf),
        None => AlignedBuf::zeroed(len, "lookup output"),
    }
}

/// A new C-contiguous `float32` array of `shape` for the library to
/// overwrite in full: its values are unspecified (zeros, or a freed
/// output's values).
pub fn uninit_output<'py>(
    py: Python<'py>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let len = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n.checked_mul(size_of::<f32>()).is_some())
        .ok_or_else(|| {
            value_error(format!(
                "an output of shape {} is too large",
                arrays::tuple(shape)
            ))
        })?;
    if len * size_of::<f32>() < RECYCLE_MIN_BYTES {
        return Ok(arrays::zeros(py, shape));
    }
    let mut buf = run(py, move || take(len)).py()?;
    let ptr = buf.as_mut_ptr();
    // SAFETY: `ptr` points to `buf.len() >= len` initialised floats, 64-byte
    // aligned; the view covers the first `len` of them, C-contiguous.
    let view = unsafe { ArrayViewMutD::from_shape_ptr(IxDyn(shape), ptr) };
    let owner = Bound::new(py, OutputBuffer { buf: Some(buf) })?;
    // SAFETY: the heap memory of `buf` does not move when `buf` moves into
    // `owner`, and `owner` (made the array's base) keeps it until NumPy
    // drops the array and its views; nothing else reaches the buffer until
    // then (it is in no spare list), and `ptr` came from `&mut` access.
    Ok(unsafe { PyArrayDyn::borrow_from_array(&view, owner.into_any()) })
}
