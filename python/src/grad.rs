//! `SparseGrad`: the gradient of a table, one row per distinct id.

use embtable::{EmbeddingTable, SparseGrad};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;

use crate::arrays;
use crate::bags::{BagArgs, with_bags};
use crate::errors::{IntoPy, value_error};
use crate::table::Table;
use crate::threads::run;

/// The sparse gradient of a table: distinct rows (in the order first
/// seen) and the summed gradient of each.
#[pyclass(name = "SparseGrad", module = "embtable._embtable")]
pub struct Grad {
    pub inner: SparseGrad,
}

impl Grad {
    pub fn add_lookup(
        &mut self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        grad_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let ids = arrays::ids(ids, "ids")?;
        let grad_out = arrays::floats(grad_out, "grad_out")?;
        arrays::check_rows_of(&grad_out, ids.shape(), self.inner.dim(), "grad_out")?;
        let values = grad_out.as_slice()?;
        let grad = &mut self.inner;
        let ids = ids.slice();
        run(py, move || grad.accumulate_lookup(ids, values)).py()
    }

    pub fn add_pooled(
        &mut self,
        py: Python<'_>,
        table: &EmbeddingTable,
        args: &BagArgs<'_>,
        grad_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let grad_out = arrays::floats(grad_out, "grad_out")?;
        check_bag_grad(&grad_out, args.bags(), table.dim())?;
        let values = grad_out.as_slice()?;
        let grad = &mut self.inner;
        let view = args.view();
        run(py, move || {
            with_bags!(view, |bags| grad.accumulate_pooled(
                table,
                &bags,
                view.pooling,
                values
            ))
        })
        .py()
    }
}

/// Checks that a pooled gradient has shape `(bags, dim)`.
pub fn check_bag_grad(
    grad_out: &numpy::PyReadonlyArrayDyn<'_, f32>,
    bags: usize,
    dim: usize,
) -> PyResult<()> {
    use numpy::PyUntypedArrayMethods;
    if grad_out.shape() == [bags, dim] {
        Ok(())
    } else {
        Err(value_error(format!(
            "grad_out has shape {}; expected {} (bags, dim)",
            crate::arrays::tuple(grad_out.shape()),
            crate::arrays::tuple(&[bags, dim])
        )))
    }
}

#[pymethods]
impl Grad {
    /// An empty gradient for a table of `dim` columns.
    #[new]
    fn new(dim: usize) -> Self {
        Self {
            inner: SparseGrad::new(dim),
        }
    }

    /// Adds the gradient of `table.lookup(ids)` given `grad_out`.
    fn accumulate_lookup(
        &mut self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        grad_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.add_lookup(py, ids, grad_out)
    }

    /// Adds the gradient of `table.pooled_lookup(...)` given `grad_out`.
    #[pyo3(signature = (table, input, offsets = None, *, grad_out, mode = "mean",
                        per_sample_weights = None, include_last_offset = false))]
    #[allow(clippy::too_many_arguments)]
    fn accumulate_pooled(
        &mut self,
        py: Python<'_>,
        table: PyRef<'_, Table>,
        input: &Bound<'_, PyAny>,
        offsets: Option<&Bound<'_, PyAny>>,
        grad_out: &Bound<'_, PyAny>,
        mode: &str,
        per_sample_weights: Option<&Bound<'_, PyAny>>,
        include_last_offset: bool,
    ) -> PyResult<()> {
        let args = BagArgs::new(
            input,
            offsets,
            per_sample_weights,
            mode,
            include_last_offset,
        )?;
        self.add_pooled(py, &table.inner, &args, grad_out)
    }

    /// Floats per row.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// The distinct rows, in the order first seen (int64).
    #[getter]
    fn rows<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        let rows: Vec<i64> = self.inner.rows().iter().map(|&r| r as i64).collect();
        PyArray1::from_vec(py, rows)
    }

    /// The summed gradient of each row of `rows`: `(len(rows), dim)`.
    #[getter]
    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let dim = self.inner.dim();
        let out = arrays::zeros(py, &[self.inner.len(), dim]);
        {
            let mut guard = out.readwrite();
            let dst = guard.as_slice_mut()?;
            if dim > 0 {
                for (k, row) in dst.chunks_exact_mut(dim).enumerate() {
                    row.copy_from_slice(self.inner.row_grad(k));
                }
            }
        }
        Ok(out)
    }

    /// The gradient as a dense `(num_rows, dim)` array.
    fn to_dense<'py>(
        &self,
        py: Python<'py>,
        num_rows: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        if let Some(&r) = self.inner.rows().iter().find(|&&r| r >= num_rows) {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "the gradient has row {r}, beyond num_rows {num_rows}"
            )));
        }
        let dense = self.inner.to_dense(num_rows);
        PyArray1::from_vec(py, dense).reshape(vec![num_rows, self.inner.dim()])
    }

    /// Forgets every row.
    fn clear(&mut self) {
        self.inner.clear();
    }

    /// Number of distinct rows.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "SparseGrad(dim={}, rows={})",
            self.inner.dim(),
            self.inner.len()
        )
    }
}
