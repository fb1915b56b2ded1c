//! NumPy arrays in and out: ids of any integer dtype and shape, floats
//! converted to `float32`, outputs allocated by NumPy.
//!
//! An array already in the layout the library reads (C-contiguous, aligned,
//! native byte order, `int32`/`int64`/`uint32`/`uint64` ids or `float32`
//! values) is read in place through a read-only borrow; anything else
//! (other integer widths, non-contiguous views, `float64`, Python lists) is
//! converted once with `numpy.asarray(..., order="C")`. Numbers of the wrong
//! kind (float ids, integer gradients) are refused with a `ValueError`, what
//! is not numbers at all (`None`, strings, objects) with a `TypeError`;
//! nothing is ever reinterpreted.

use numpy::{
    PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;

use crate::errors::value_error;

/// A batch of ids as `int64`, read in place when they already are.
///
/// Every id type is converted to `i64` at the boundary: each id type would
/// instantiate the library's generic kernels (lookups, bags, gradients,
/// fused optimizer steps) once more, multiplying the binding's compile
/// time, while widening `int32` ids costs a copy of 8 bytes per id, small
/// beside the rows each id moves.
pub struct Ids<'py> {
    array: PyReadonlyArrayDyn<'py, i64>,
}

impl Ids<'_> {
    pub fn shape(&self) -> &[usize] {
        self.array.shape()
    }

    pub fn len(&self) -> usize {
        self.array.len()
    }

    pub fn slice(&self) -> &[i64] {
        // Only C-contiguous arrays are kept (see `ids`).
        self.array.as_slice().expect("ids are C-contiguous")
    }
}

/// `obj` as an ndarray: itself, or `numpy.asarray(obj)`.
fn ndarray<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyUntypedArray>> {
    if let Ok(array) = obj.cast::<PyUntypedArray>() {
        return Ok(array.clone());
    }
    let py = obj.py();
    let numpy = py.import(intern!(py, "numpy"))?;
    Ok(numpy
        .call_method1(intern!(py, "asarray"), (obj,))?
        .cast_into::<PyUntypedArray>()?)
}

/// `numpy.asarray(array, dtype=dtype, order="C")`: a C-contiguous copy in
/// `dtype` (0-d arrays stay 0-d, unlike `ascontiguousarray`).
fn contiguous<'py>(
    array: &Bound<'py, PyUntypedArray>,
    dtype: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = array.py();
    let numpy = py.import(intern!(py, "numpy"))?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item(intern!(py, "dtype"), dtype)?;
    kwargs.set_item(intern!(py, "order"), "C")?;
    Ok(numpy
        .call_method(intern!(py, "asarray"), (array,), Some(&kwargs))?
        .cast_into::<PyUntypedArray>()?)
}

/// A read-only borrow of `array` if it already is a C-contiguous, aligned
/// array of native `T`.
fn borrow_as<'py, T: numpy::Element>(
    array: &Bound<'py, PyUntypedArray>,
) -> Option<PyReadonlyArrayDyn<'py, T>> {
    let typed = array.cast::<PyArrayDyn<T>>().ok()?;
    if !(typed.is_c_contiguous() && typed.is_aligned()) {
        return None;
    }
    typed.try_readonly().ok()
}

fn dtype_name(array: &Bound<'_, PyUntypedArray>) -> String {
    array
        .dtype()
        .str()
        .map_or_else(|_| "?".into(), |s| s.to_string())
}

/// The error for an array that is not of the kind `what` needs (`want`):
/// `TypeError` when it does not hold numbers at all, else `ValueError`.
fn wrong_kind(array: &Bound<'_, PyUntypedArray>, what: &str, want: &str) -> PyErr {
    let message = format!(
        "{what} must be {want}, got an array of {}",
        dtype_name(array)
    );
    match array.dtype().kind() {
        // Objects (None, Python ints beyond 64 bits), strings, bytes, records.
        b'O' | b'U' | b'S' | b'V' => PyTypeError::new_err(message),
        _ => value_error(message),
    }
}

/// Ids from any integer array-like of any shape.
///
/// # Errors
/// `ValueError` naming `what` and the dtype for a non-integer array (an
/// empty one of any dtype is fine: `[]` is `float64` in NumPy);
/// `IndexError` naming the position of a `uint64` id too large for any
/// table (beyond `i64::MAX`), which widening would wrap.
pub fn ids<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Ids<'py>> {
    let array = ndarray(obj)?;
    if let Some(a) = borrow_as::<i64>(&array) {
        return Ok(Ids { array: a });
    }
    match array.dtype().kind() {
        b'i' | b'u' => {}
        _ if array.is_empty() => {}
        _ => return Err(wrong_kind(&array, what, "integers")),
    }
    if array.dtype().kind() == b'u' && array.dtype().itemsize() == 8 {
        let wide = contiguous(&array, "uint64")?;
        let wide = borrow_as::<u64>(&wide).expect("a C-contiguous uint64 array");
        let values = wide.as_slice().expect("C-contiguous");
        if let Some(position) = values.iter().position(|&v| i64::try_from(v).is_err()) {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "{what}: id {} at position {position} is out of range",
                values[position]
            )));
        }
    }
    let converted = contiguous(&array, "int64")?;
    borrow_as::<i64>(&converted)
        .map(|array| Ids { array })
        .ok_or_else(|| value_error(format!("{what}: cannot read the array as int64")))
}

/// `float32` values from any floating-point array-like.
///
/// # Errors
/// `ValueError` naming `what` and the dtype for an array that is not of
/// floating point (integers, booleans, complex, objects).
pub fn floats<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let array = ndarray(obj)?;
    if let Some(a) = borrow_as::<f32>(&array) {
        return Ok(a);
    }
    if array.dtype().kind() != b'f' && !array.is_empty() {
        return Err(wrong_kind(&array, what, "floating point numbers"));
    }
    let converted = contiguous(&array, "float32")?;
    borrow_as::<f32>(&converted)
        .ok_or_else(|| value_error(format!("{what}: cannot read the array as float32")))
}

/// Checks that `values` has shape `ids_shape + (dim,)`, or `(n, dim)` with
/// `n` ids: one row of `dim` per id, never the same count laid out otherwise.
pub fn check_rows_of(
    values: &PyReadonlyArrayDyn<'_, f32>,
    ids_shape: &[usize],
    dim: usize,
    what: &str,
) -> PyResult<()> {
    let shape = values.shape();
    let n: usize = ids_shape.iter().product();
    let nested = shape.len() == ids_shape.len() + 1
        && shape[..ids_shape.len()] == *ids_shape
        && shape[ids_shape.len()] == dim;
    let flat = shape == [n, dim];
    if nested || flat {
        Ok(())
    } else {
        let or_flat = if ids_shape.len() == 1 {
            String::new()
        } else {
            format!(" or {}", tuple(&[n, dim]))
        };
        Err(value_error(format!(
            "{what} has shape {}; expected {} (the ids' shape {} plus the table's dim \
             {dim}){or_flat}",
            tuple(shape),
            tuple(&[ids_shape, &[dim]].concat()),
            tuple(ids_shape),
        )))
    }
}

/// A new `float32` array of `shape`, zero-filled (`numpy.zeros`). Outputs
/// the library overwrites in full come from `outputs::uninit_output`.
pub fn zeros<'py>(py: Python<'py>, shape: &[usize]) -> Bound<'py, PyArrayDyn<f32>> {
    PyArrayDyn::zeros(py, shape.to_vec(), false)
}

/// The caller's `out=` array, if it is a writable, C-contiguous `float32`
/// array of exactly `shape`; otherwise a `ValueError` saying what it is.
pub fn out_array<'py>(
    out: &Bound<'py, PyAny>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let fits = out
        .cast::<PyArrayDyn<f32>>()
        .ok()
        .filter(|a| a.is_c_contiguous() && a.is_aligned() && a.shape() == shape);
    match fits {
        Some(a) => Ok(a.clone()),
        None => Err(value_error(format!(
            "out must be a C-contiguous float32 array of shape {}, got {}",
            tuple(shape),
            out.repr().map_or_else(|_| "?".into(), |r| r.to_string())
        ))),
    }
}

/// Offsets (any integer array-like) as `usize`.
///
/// # Errors
/// `ValueError` naming the position of the first negative offset.
pub fn offsets(obj: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let ids = ids(obj, "offsets")?;
    if ids.shape().len() != 1 {
        return Err(value_error(format!(
            "offsets must be 1-D, got shape {}",
            tuple(ids.shape())
        )));
    }
    let mut out = Vec::with_capacity(ids.len() + 1);
    for (position, &v) in ids.slice().iter().enumerate() {
        match usize::try_from(v) {
            Ok(v) => out.push(v),
            Err(_) => {
                return Err(value_error(format!(
                    "offset {v} at position {position} is invalid: it is negative"
                )));
            }
        }
    }
    Ok(out)
}

/// A shape as Python writes it: `(3, 5)`, `(3,)`, `()`.
pub fn tuple(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", parts.join(", "))
        }
    }
}
