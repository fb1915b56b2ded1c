//! `Table`: an embedding table as a Python object.

use embtable::{EmbeddingTable, Init, SparseGrad};
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays;
use crate::bags::{BagArgs, with_bags};
use crate::errors::{IntoPy, value_error};
use crate::grad::Grad;
use crate::outputs;
use crate::threads::run;

/// A `num_rows × dim` float32 table (64-byte aligned rows, one allocation).
#[pyclass(module = "embtable._embtable")]
pub struct Table {
    pub inner: EmbeddingTable,
}

impl Table {
    fn init(py: Python<'_>, rows: usize, dim: usize, init: Init, seed: u64) -> PyResult<Self> {
        let inner = run(py, move || EmbeddingTable::new(rows, dim, init, seed)).py()?;
        Ok(Self { inner })
    }

    /// A table holding the values of a 2-D float array (copied).
    pub fn from_array(
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        what: &str,
    ) -> PyResult<EmbeddingTable> {
        let values = arrays::floats(array, what)?;
        let &[rows, dim] = values.shape() else {
            return Err(value_error(format!(
                "{what} must be 2-D (num_rows, dim), got shape {:?}",
                values.shape()
            )));
        };
        let values = values.as_slice()?;
        run(py, move || EmbeddingTable::from_rows(rows, dim, values)).py()
    }
}

/// The values of `table` as a new `(num_rows, dim)` float32 array.
pub fn to_numpy<'py>(
    py: Python<'py>,
    table: &EmbeddingTable,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let out = arrays::zeros(py, &[table.rows(), table.dim()]);
    let mut guard = out.readwrite();
    let dst = guard.as_slice_mut()?;
    let dim = table.dim();
    run(py, move || {
        use rayon::prelude::*;
        dst.par_chunks_mut(dim)
            .enumerate()
            .with_min_len(1024)
            .for_each(|(r, row)| row.copy_from_slice(table.row(r)));
    });
    drop(guard);
    Ok(out)
}

/// Where a lookup writes its output: the caller's `out` or a new array of
/// `shape` (not zeroed: the library writes every value).
pub fn output<'py>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    match out {
        Some(out) if !out.is_none() => arrays::out_array(out, shape),
        _ => outputs::uninit_output(py, shape),
    }
}

#[pymethods]
impl Table {
    /// `num_rows × dim` values drawn uniformly from [-0.05, 0.05), Keras'
    /// `Embedding` default, from `seed`.
    #[new]
    #[pyo3(signature = (num_rows, dim, *, seed = 0))]
    fn new(py: Python<'_>, num_rows: usize, dim: usize, seed: u64) -> PyResult<Self> {
        Self::init(py, num_rows, dim, Init::default(), seed)
    }

    /// Values drawn uniformly from `[low, high)`.
    #[staticmethod]
    #[pyo3(signature = (num_rows, dim, low = -0.05, high = 0.05, *, seed = 0))]
    fn uniform(
        py: Python<'_>,
        num_rows: usize,
        dim: usize,
        low: f32,
        high: f32,
        seed: u64,
    ) -> PyResult<Self> {
        Self::init(py, num_rows, dim, Init::Uniform { low, high }, seed)
    }

    /// Values drawn from a normal distribution (PyTorch's default: N(0, 1)).
    #[staticmethod]
    #[pyo3(signature = (num_rows, dim, mean = 0.0, std = 1.0, *, seed = 0))]
    fn normal(
        py: Python<'_>,
        num_rows: usize,
        dim: usize,
        mean: f32,
        std: f32,
        seed: u64,
    ) -> PyResult<Self> {
        Self::init(py, num_rows, dim, Init::Normal { mean, std }, seed)
    }

    /// Normal values, re-drawn beyond two standard deviations (Keras'
    /// `TruncatedNormal`, default std 0.05).
    #[staticmethod]
    #[pyo3(signature = (num_rows, dim, mean = 0.0, std = 0.05, *, seed = 0))]
    fn truncated_normal(
        py: Python<'_>,
        num_rows: usize,
        dim: usize,
        mean: f32,
        std: f32,
        seed: u64,
    ) -> PyResult<Self> {
        Self::init(py, num_rows, dim, Init::TruncatedNormal { mean, std }, seed)
    }

    /// All zeros.
    #[staticmethod]
    fn zeros(py: Python<'_>, num_rows: usize, dim: usize) -> PyResult<Self> {
        Self::init(py, num_rows, dim, Init::Zeros, 0)
    }

    /// Every value `value`.
    #[staticmethod]
    fn full(py: Python<'_>, num_rows: usize, dim: usize, value: f32) -> PyResult<Self> {
        Self::init(py, num_rows, dim, Init::Constant(value), 0)
    }

    /// A table holding a copy of a 2-D float array (converted to float32).
    #[staticmethod]
    fn from_numpy(py: Python<'_>, array: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Self {
            inner: Self::from_array(py, array, "array")?,
        })
    }

    /// The values as a new `(num_rows, dim)` float32 array.
    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        to_numpy(py, &self.inner)
    }

    #[pyo3(signature = (dtype = None, copy = None))]
    fn __array__<'py>(
        &self,
        py: Python<'py>,
        dtype: Option<&Bound<'py, PyAny>>,
        copy: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = copy; // always a copy: the table's rows are padded
        let array = self.to_numpy(py)?.into_any();
        match dtype {
            Some(dtype) if !dtype.is_none() => array.call_method1(intern!(py, "astype"), (dtype,)),
            _ => Ok(array),
        }
    }

    /// Number of rows.
    #[getter]
    fn num_rows(&self) -> usize {
        self.inner.rows()
    }

    /// Floats per row.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// `(num_rows, dim)`.
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.rows(), self.inner.dim())
    }

    fn __len__(&self) -> usize {
        self.inner.rows()
    }

    /// The rows of `ids` (any integer array of any shape): an array of
    /// shape `ids.shape + (dim,)`, written into `out` if given.
    #[pyo3(signature = (ids, *, out = None))]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let ids = arrays::ids(ids, "ids")?;
        let shape = [ids.shape(), &[self.inner.dim()]].concat();
        let out = output(py, out, &shape)?;
        let mut guard = out.readwrite();
        let dst = guard.as_slice_mut()?;
        let table = &self.inner;
        let ids = ids.slice();
        run(py, move || table.lookup(ids, dst)).py()?;
        drop(guard);
        Ok(out)
    }

    /// Each bag of ids pooled to one row (PyTorch's `embedding_bag`):
    /// `(bags, dim)`.
    #[pyo3(signature = (input, offsets = None, *, mode = "mean", per_sample_weights = None,
                        include_last_offset = false, out = None))]
    #[allow(clippy::too_many_arguments)] // PyTorch's embedding_bag arguments
    fn pooled_lookup<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        offsets: Option<&Bound<'py, PyAny>>,
        mode: &str,
        per_sample_weights: Option<&Bound<'py, PyAny>>,
        include_last_offset: bool,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let args = BagArgs::new(
            input,
            offsets,
            per_sample_weights,
            mode,
            include_last_offset,
        )?;
        let out = output(py, out, &[args.bags(), self.inner.dim()])?;
        let mut guard = out.readwrite();
        let dst = guard.as_slice_mut()?;
        let table = &self.inner;
        let view = args.view();
        run(py, move || {
            with_bags!(view, |bags| table.pooled_lookup(&bags, view.pooling, dst))
        })
        .py()?;
        drop(guard);
        Ok(out)
    }

    /// The gradient of `lookup(ids)` given `grad_out` (shape
    /// `ids.shape + (dim,)`): a `SparseGrad` with one row per distinct id.
    fn lookup_grad(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        grad_out: &Bound<'_, PyAny>,
    ) -> PyResult<Grad> {
        let mut grad = Grad {
            inner: SparseGrad::for_table(&self.inner),
        };
        grad.add_lookup(py, ids, grad_out)?;
        Ok(grad)
    }

    /// The gradient of `pooled_lookup(...)` given `grad_out` (`(bags, dim)`).
    #[pyo3(signature = (input, offsets = None, *, grad_out, mode = "mean",
                        per_sample_weights = None, include_last_offset = false))]
    #[allow(clippy::too_many_arguments)]
    fn pooled_lookup_grad(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        offsets: Option<&Bound<'_, PyAny>>,
        grad_out: &Bound<'_, PyAny>,
        mode: &str,
        per_sample_weights: Option<&Bound<'_, PyAny>>,
        include_last_offset: bool,
    ) -> PyResult<Grad> {
        let mut grad = Grad {
            inner: SparseGrad::for_table(&self.inner),
        };
        let args = BagArgs::new(
            input,
            offsets,
            per_sample_weights,
            mode,
            include_last_offset,
        )?;
        grad.add_pooled(py, &self.inner, &args, grad_out)?;
        Ok(grad)
    }

    /// Row `i` as a new array.
    fn row<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        if i >= self.inner.rows() {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "row {i} is out of range for a table of {} rows",
                self.inner.rows()
            )));
        }
        let out = arrays::zeros(py, &[self.inner.dim()]);
        out.readwrite()
            .as_slice_mut()?
            .copy_from_slice(self.inner.row(i));
        Ok(out)
    }

    /// Rescales the rows of `ids` whose L2 norm exceeds `max_norm` to
    /// `max_norm` (PyTorch's `max_norm`: `row *= max_norm / (norm + 1e-7)`).
    fn renorm_rows(
        &mut self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        max_norm: f32,
    ) -> PyResult<()> {
        let ids = arrays::ids(ids, "ids")?;
        let table = &mut self.inner;
        let ids = ids.slice();
        run(py, move || table.renorm_rows(ids, max_norm)).py()
    }

    /// An independent copy.
    fn copy(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }

    fn __copy__(&self) -> Self {
        self.copy()
    }

    fn __deepcopy__(&self, _memo: &Bound<'_, PyAny>) -> Self {
        self.copy()
    }

    /// Bitwise equality of shapes and values.
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Table>()
            .is_ok_and(|o| o.borrow().inner == self.inner)
    }

    /// Pickles as `Table.from_numpy(values)`.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let rebuild = slf.get_type().getattr(intern!(py, "from_numpy"))?;
        let args = PyTuple::new(py, [slf.borrow().to_numpy(py)?])?;
        PyTuple::new(py, [rebuild, args.into_any()])
    }

    fn __repr__(&self) -> String {
        format!(
            "Table(num_rows={}, dim={})",
            self.inner.rows(),
            self.inner.dim()
        )
    }
}
