//! `Embedding`: the library's layer (a table, its optimizer and the pending
//! gradient) as a Python object, with the table also visible as a
//! zero-copy NumPy view for `torch` and `keras` modules.

use std::path::PathBuf;

use embtable::io::Checkpoint;
use embtable::optim::OptimizerState;
use embtable::{EmbeddingOptions, EmbeddingTable, MaxNormAt, OutOfRange, SparseOptimizer};
use numpy::ndarray::{ArrayView2, ShapeBuilder};
use numpy::{PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays;
use crate::bags::{BagArgs, with_bags};
use crate::errors::{IntoPy, in_file, value_error};
use crate::grad::{Grad, check_bag_grad};
use crate::optim::{AnyOptimizer, Optimizer, Shared, state_from_py, state_to_py};
use crate::outputs;
use crate::table::{Table, output};
use crate::threads::run;

/// An embedding layer: a table, an optimizer and the gradient pending for
/// the next `step()`.
///
/// The table's buffer is allocated once, when the layer is built, and is
/// never replaced (loading copies into it): `weight` views of it stay valid
/// as long as the layer lives.
#[pyclass(name = "Embedding", module = "embtable._embtable")]
pub struct Layer {
    /// A frozen layer built without an optimizer holds `AnyOptimizer::Frozen`.
    inner: embtable::Embedding<Shared>,
}

fn out_of_range(value: &Bound<'_, PyAny>) -> PyResult<OutOfRange> {
    if let Ok(row) = value.extract::<usize>() {
        return Ok(OutOfRange::DefaultRow(row));
    }
    match value.extract::<String>().as_deref() {
        Ok("error") => Ok(OutOfRange::Error),
        Ok("zero") => Ok(OutOfRange::Zero),
        Ok("modulo") => Ok(OutOfRange::Modulo),
        _ => Err(value_error(format!(
            "out_of_range must be \"error\", \"zero\", \"modulo\" or a row number, got {}",
            value.repr()?
        ))),
    }
}

impl Layer {
    fn new(
        table: EmbeddingTable,
        optimizer: Option<PyRef<'_, Optimizer>>,
        options: EmbeddingOptions,
    ) -> PyResult<Self> {
        if optimizer.is_none() && options.trainable {
            return Err(PyTypeError::new_err(
                "a trainable layer needs an optimizer, e.g. embtable.Adagrad.torch(lr=0.01) \
                 (or pass trainable=False)",
            ));
        }
        let optimizer = match optimizer {
            Some(o) => o.lock().clone(),
            None => AnyOptimizer::Frozen(embtable::Frozen),
        };
        let inner =
            embtable::Embedding::with_options(table, Shared::new(optimizer), options).py()?;
        Ok(Self { inner })
    }

    /// Whether the layer has an optimizer (it is not `Frozen`).
    fn has_optimizer(&self) -> bool {
        !matches!(*self.inner.optimizer().lock(), AnyOptimizer::Frozen(_))
    }

    /// Refuses a fused backward-and-step while a gradient is pending, so
    /// that a failed step can drop exactly this call's gradient.
    fn check_nothing_pending(&self) -> PyResult<()> {
        if self.inner.grad().is_empty() {
            Ok(())
        } else {
            Err(value_error(
                "a gradient from backward() is pending; call step() (or clear_grad()) before a \
                 fused backward_step",
            ))
        }
    }

    /// Steps, dropping the gradient if the step fails (it was all this
    /// call's, see `check_nothing_pending`).
    fn step_or_drop(layer: &mut embtable::Embedding<Shared>) -> embtable::Result<()> {
        let result = layer.step();
        if result.is_err() {
            layer.clear_grad();
        }
        result
    }
}

/// Whether `backward_step` may use the optimizer's fused lookup step:
/// nothing for the layer to do besides coalescing and updating.
fn plain(o: &EmbeddingOptions) -> bool {
    o.padding_idx.is_none()
        && o.out_of_range == OutOfRange::Error
        && (o.max_norm.is_none() || o.max_norm_at == MaxNormAt::Lookup)
        && o.trainable
}

#[pymethods]
impl Layer {
    /// A layer over a copy of `table` (a `Table`, a 2-D float array, or a
    /// `(num_rows, dim)` shape for zeros) with a copy of `optimizer`.
    #[new]
    #[pyo3(signature = (table, optimizer = None, *, padding_idx = None, out_of_range = None,
                        trainable = true, max_norm = None, max_norm_at = "step"))]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        py: Python<'_>,
        table: &Bound<'_, PyAny>,
        optimizer: Option<PyRef<'_, Optimizer>>,
        padding_idx: Option<usize>,
        out_of_range: Option<&Bound<'_, PyAny>>,
        trainable: bool,
        max_norm: Option<f32>,
        max_norm_at: &str,
    ) -> PyResult<Self> {
        let table = if let Ok(t) = table.cast::<Table>() {
            t.borrow().inner.clone()
        } else if let Ok((rows, dim)) = table.extract::<(usize, usize)>() {
            run(py, move || EmbeddingTable::zeros(rows, dim)).py()?
        } else {
            Table::from_array(py, table, "table")?
        };
        let out_of_range = match out_of_range {
            Some(v) if !v.is_none() => self::out_of_range(v)?,
            _ => OutOfRange::Error,
        };
        let max_norm_at = match max_norm_at {
            "step" => MaxNormAt::Step,
            "lookup" => MaxNormAt::Lookup,
            other => {
                return Err(value_error(format!(
                    "max_norm_at must be \"step\" (Keras' MaxNorm constraint) or \"lookup\" \
                     (PyTorch's max_norm), got {other:?}"
                )));
            }
        };
        let options = EmbeddingOptions {
            padding_idx,
            out_of_range,
            trainable,
            max_norm,
            max_norm_at,
        };
        Self::new(table, optimizer, options)
    }

    /// The rows of `ids` (any integer array): shape `ids.shape + (dim,)`.
    #[pyo3(signature = (ids, *, out = None))]
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let ids = arrays::ids(ids, "ids")?;
        let shape = [ids.shape(), &[self.inner.table().dim()]].concat();
        let out = output(py, out, &shape)?;
        let mut guard = out.readwrite();
        let dst = guard.as_slice_mut()?;
        let layer = &mut self.inner;
        let ids = ids.slice();
        run(py, move || layer.forward_into(ids, dst)).py()?;
        drop(guard);
        Ok(out)
    }

    /// Accumulates the gradient of `forward(ids)` given `grad_out`.
    fn backward(
        &mut self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        grad_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let ids = arrays::ids(ids, "ids")?;
        let grad_out = arrays::floats(grad_out, "grad_out")?;
        arrays::check_rows_of(&grad_out, ids.shape(), self.inner.table().dim(), "grad_out")?;
        let values = grad_out.as_slice()?;
        let layer = &mut self.inner;
        let ids = ids.slice();
        run(py, move || layer.backward(ids, values)).py()
    }

    /// `backward(ids, grad_out)` and `step()` in one call (the fused update
    /// of a training step). On error nothing changes.
    fn backward_step(
        &mut self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        grad_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.check_nothing_pending()?;
        let ids = arrays::ids(ids, "ids")?;
        let grad_out = arrays::floats(grad_out, "grad_out")?;
        arrays::check_rows_of(&grad_out, ids.shape(), self.inner.table().dim(), "grad_out")?;
        let values = grad_out.as_slice()?;
        let layer = &mut self.inner;
        if plain(layer.options()) {
            // Coalesce and update in one pass (bitwise the same as below).
            let ids = ids.slice();
            return run(py, move || {
                let mut optimizer = layer.optimizer().clone();
                optimizer.step_lookup(layer.table_mut(), ids, values)
            })
            .py();
        }
        let ids = ids.slice();
        run(py, move || {
            layer.backward(ids, values)?;
            Self::step_or_drop(layer)
        })
        .py()
    }

    /// Each bag pooled to one row, PyTorch's `embedding_bag` inputs
    /// (padding ids are left out of their bags): `(bags, dim)`.
    #[pyo3(signature = (input, offsets = None, *, mode = "mean", per_sample_weights = None,
                        include_last_offset = false, out = None))]
    #[allow(clippy::too_many_arguments)]
    fn forward_pooled<'py>(
        &mut self,
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
        let out = output(py, out, &[args.bags(), self.inner.table().dim()])?;
        let mut guard = out.readwrite();
        let dst = guard.as_slice_mut()?;
        let layer = &mut self.inner;
        let view = args.view();
        run(py, move || {
            with_bags!(view, |bags| layer.forward_pooled(&bags, view.pooling, dst))
        })
        .py()?;
        drop(guard);
        Ok(out)
    }

    /// Accumulates the gradient of `forward_pooled(...)` given `grad_out`
    /// (`(bags, dim)`); with `step=True` also steps (fused; on error nothing
    /// changes).
    #[pyo3(signature = (input, offsets = None, *, grad_out, mode = "mean",
                        per_sample_weights = None, include_last_offset = false, step = false))]
    #[allow(clippy::too_many_arguments)]
    fn backward_pooled(
        &mut self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        offsets: Option<&Bound<'_, PyAny>>,
        grad_out: &Bound<'_, PyAny>,
        mode: &str,
        per_sample_weights: Option<&Bound<'_, PyAny>>,
        include_last_offset: bool,
        step: bool,
    ) -> PyResult<()> {
        if step {
            self.check_nothing_pending()?;
        }
        let args = BagArgs::new(
            input,
            offsets,
            per_sample_weights,
            mode,
            include_last_offset,
        )?;
        let grad_out = arrays::floats(grad_out, "grad_out")?;
        check_bag_grad(&grad_out, args.bags(), self.inner.table().dim())?;
        let values = grad_out.as_slice()?;
        let layer = &mut self.inner;
        let view = args.view();
        run(py, move || {
            with_bags!(view, |bags| {
                layer.backward_pooled(&bags, view.pooling, values)?;
                if step {
                    Self::step_or_drop(layer)
                } else {
                    Ok(())
                }
            })
        })
        .py()
    }

    /// The gradient with respect to `per_sample_weights` of
    /// `forward_pooled(...)` given `grad_out`: an array of the input's
    /// shape (zero at padding ids). Call it before the step that changes
    /// the rows.
    #[pyo3(signature = (input, offsets = None, *, grad_out, mode = "sum",
                        per_sample_weights = None, include_last_offset = false))]
    #[allow(clippy::too_many_arguments)]
    fn per_sample_weights_grad<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        offsets: Option<&Bound<'py, PyAny>>,
        grad_out: &Bound<'py, PyAny>,
        mode: &str,
        per_sample_weights: Option<&Bound<'py, PyAny>>,
        include_last_offset: bool,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        if self.inner.options().out_of_range != OutOfRange::Error {
            return Err(value_error(
                "per_sample_weights_grad needs out_of_range=\"error\"",
            ));
        }
        let ids_shape = arrays::ids(input, "input")?.shape().to_vec();
        let padding = self.inner.options().padding_idx;
        // Padding ids are out of their bags: weight 0 in the normalisers,
        // gradient 0.
        let weights = match (padding, per_sample_weights) {
            (Some(p), w) => {
                let ids = arrays::ids(input, "input")?;
                let mut weights = match w {
                    Some(w) if !w.is_none() => arrays::floats(w, "per_sample_weights")?
                        .as_slice()?
                        .to_vec(),
                    _ => vec![1.0; ids.len()],
                };
                for (w, &id) in weights.iter_mut().zip(ids.slice()) {
                    if usize::try_from(id) == Ok(p) {
                        *w = 0.0;
                    }
                }
                Some(
                    numpy::PyArray1::from_vec(py, weights)
                        .reshape(ids_shape.clone())?
                        .into_any(),
                )
            }
            (None, w) => w.cloned(),
        };
        let args = BagArgs::new(input, offsets, weights.as_ref(), mode, include_last_offset)?;
        let grad_out = arrays::floats(grad_out, "grad_out")?;
        check_bag_grad(&grad_out, args.bags(), self.inner.table().dim())?;
        let values = grad_out.as_slice()?;
        let out = outputs::uninit_output(py, &ids_shape)?; // one value per id, all written
        let mut guard = out.readwrite();
        let dst = guard.as_slice_mut()?;
        let table = self.inner.table();
        let view = args.view();
        run(py, move || {
            with_bags!(view, |bags| {
                table.pooled_weight_grad(&bags, view.pooling, values, dst)?;
                if let Some(p) = padding {
                    for (d, id) in dst.iter_mut().zip(bags.ids()) {
                        if usize::try_from(*id) == Ok(p) {
                            *d = 0.0;
                        }
                    }
                }
                Ok(())
            })
        })
        .py()?;
        drop(guard);
        Ok(out)
    }

    /// Applies the pending gradient with the optimizer and clears it. On
    /// error the table and the optimizer are unchanged and the gradient is
    /// kept.
    fn step(&mut self, py: Python<'_>) -> PyResult<()> {
        let layer = &mut self.inner;
        run(py, move || layer.step()).py()
    }

    /// Drops the pending gradient.
    fn clear_grad(&mut self) {
        self.inner.clear_grad();
    }

    /// Brings every row current (dense-exact optimizers).
    fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        let layer = &mut self.inner;
        run(py, move || layer.flush()).py()
    }

    /// Keras' `mask_zero`: a boolean array of the ids' shape, `ids != 0`.
    fn mask<'py>(&self, py: Python<'py>, ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let ids = arrays::ids(ids, "ids")?;
        let mask: Vec<bool> = self.inner.mask(ids.slice());
        Ok(numpy::PyArray1::from_vec(py, mask)
            .reshape(ids.shape().to_vec())?
            .into_any())
    }

    /// The table as a writable `(num_rows, dim)` float32 NumPy view, not a
    /// copy: it shows every update and writes go to the table. Valid as
    /// long as it exists (it keeps the layer alive).
    #[getter]
    fn weight<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (ptr, rows, dim, stride) = {
            let mut this = slf.borrow_mut();
            let table = this.inner.table_mut();
            let (rows, dim, stride) = (table.rows(), table.dim(), table.stride());
            (table.as_mut_ptr(), rows, dim, stride)
        };
        // SAFETY: `ptr` points to `rows * stride` initialised floats, and
        // row r's first `dim` of them start at `r * stride`; the view
        // covers exactly those, never the pad lanes.
        let view = unsafe { ArrayView2::from_shape_ptr((rows, dim).strides((stride, 1)), ptr) };
        // SAFETY: the view's base object is the layer, which owns the
        // buffer and never reallocates or replaces it (see `Layer`), so the
        // memory outlives the array. Python code and this crate access it
        // under the GIL, except while a call runs without the GIL; as for
        // any NumPy array passed to native code, writing it from another
        // thread during such a call is the caller's race.
        Ok(unsafe { PyArray2::borrow_from_array(&view, slf.into_any()) })
    }

    /// A copy of the table.
    #[getter]
    fn table(&self) -> Table {
        Table {
            inner: self.inner.table().clone(),
        }
    }

    /// The optimizer itself (changing it changes what the layer steps
    /// with), or `None` for a frozen layer built without one.
    #[getter]
    fn get_optimizer(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        if !self.has_optimizer() {
            return Ok(None);
        }
        Optimizer::handle(py, self.inner.optimizer()).map(Some)
    }

    /// Replaces the optimizer by a copy of `optimizer` (config and state).
    #[setter]
    fn set_optimizer(&mut self, py: Python<'_>, optimizer: PyRef<'_, Optimizer>) -> PyResult<()> {
        let new = optimizer.lock().clone();
        let table = self.inner.table();
        let shape = (table.rows(), table.dim());
        let state_shape = run(py, || new.state().shape);
        if let Some(s) = state_shape.filter(|&s| s != shape) {
            return Err(value_error(format!(
                "the optimizer's state is for a {}x{} table, this layer's is {}x{}",
                s.0, s.1, shape.0, shape.1
            )));
        }
        *self.inner.optimizer().lock() = new;
        Ok(())
    }

    /// The pending gradient, as a copy.
    #[getter]
    fn grad(&self) -> Grad {
        Grad {
            inner: self.inner.grad().clone(),
        }
    }

    #[getter]
    fn num_rows(&self) -> usize {
        self.inner.table().rows()
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.table().dim()
    }

    #[getter]
    fn padding_idx(&self) -> Option<usize> {
        self.inner.options().padding_idx
    }

    #[getter]
    fn max_norm(&self) -> Option<f32> {
        self.inner.options().max_norm
    }

    #[getter]
    fn max_norm_at(&self) -> &'static str {
        match self.inner.options().max_norm_at {
            MaxNormAt::Step => "step",
            MaxNormAt::Lookup => "lookup",
        }
    }

    /// Whether `step()` trains the table (Keras' `layer.trainable`).
    #[getter]
    fn trainable(&self) -> bool {
        self.inner.options().trainable
    }

    /// Freezes or unfreezes the table; refused while a gradient is pending
    /// (freezing would lose it) or, to unfreeze, without an optimizer.
    #[setter]
    fn set_trainable(&mut self, trainable: bool) -> PyResult<()> {
        if trainable && !self.has_optimizer() {
            return Err(PyTypeError::new_err(
                "the layer has no optimizer; set layer.optimizer = embtable.Adagrad.torch(...) \
                 first",
            ));
        }
        self.inner.set_trainable(trainable).py()
    }

    /// Saves the layer to one safetensors file: the table, the optimizer's
    /// whole state and the options, so that `Embedding.load(path)` gives the
    /// same layer back (Rust's `Embedding::save` writes the same file). A
    /// pending gradient is refused (step or clear it first), never lost.
    fn save(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let layer = &self.inner;
        let p = &path;
        run(py, move || layer.save(p)).map_err(in_file(&path))
    }

    /// The layer saved by `save(path)` (or Rust's `Embedding::save`), with
    /// a fresh optimizer of the saved kind holding the saved state.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let p = &path;
        let mut ckpt = run(py, move || Checkpoint::load(p)).map_err(in_file(&path))?;
        let names: Vec<String> = ckpt.names().map(str::to_owned).collect();
        match names.as_slice() {
            [name] => Self::restore(&mut ckpt, name),
            _ => Err(value_error(format!(
                "{} holds {} tables {names:?}, not one; use embtable.load_checkpoint(path) and \
                 take_layer(name) for each",
                path.display(),
                names.len()
            ))),
        }
    }

    /// `{"weight": (num_rows, dim) array, "optimizer": state dict or None}`,
    /// after bringing every row current.
    fn state_dict<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let layer = &mut self.inner;
        let state = run(py, move || -> embtable::Result<OptimizerState> {
            layer.flush()?;
            Ok(layer.optimizer().state())
        })
        .py()?;
        let dict = PyDict::new(py);
        dict.set_item("weight", crate::table::to_numpy(py, self.inner.table())?)?;
        if self.has_optimizer() {
            dict.set_item("optimizer", state_to_py(py, state)?)?;
        } else {
            dict.set_item("optimizer", py.None())?;
        }
        Ok(dict)
    }

    /// Loads what `state_dict()` gave: the weights are copied into the
    /// table and the optimizer state replaces the optimizer's. The pending
    /// gradient is dropped. Everything is checked first: on error nothing
    /// changes.
    fn load_state_dict(&mut self, py: Python<'_>, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let weight = state
            .get_item("weight")?
            .ok_or_else(|| value_error("state has no \"weight\" entry"))?;
        let weight = arrays::floats(&weight, "weight")?;
        let (rows, dim) = (self.inner.table().rows(), self.inner.table().dim());
        if weight.shape() != [rows, dim] {
            return Err(value_error(format!(
                "weight has shape {}, the layer's table is {}",
                arrays::tuple(weight.shape()),
                arrays::tuple(&[rows, dim])
            )));
        }
        let optimizer = match state.get_item("optimizer")? {
            // A frozen layer's state (written by Rust) holds nothing to load.
            Some(o) if !o.is_none() && !is_frozen_state(&o)? => {
                let saved = state_from_py(&o.cast_into::<PyDict>()?)?;
                if let Some(s) = saved.shape.filter(|&s| s != (rows, dim)) {
                    return Err(value_error(format!(
                        "the optimizer state is for a {}x{} table, this layer's is {rows}x{dim}",
                        s.0, s.1
                    )));
                }
                let mut fresh = AnyOptimizer::for_kind(&saved.kind)?;
                run(py, || fresh.load_state(saved)).py()?;
                Some(fresh)
            }
            _ => None,
        };
        let values = weight.as_slice()?;
        let layer = &mut self.inner;
        run(py, move || {
            let table = layer.table_mut();
            for (r, src) in values.chunks_exact(dim).enumerate() {
                table.row_mut(r).copy_from_slice(src);
            }
            if let Some(p) = layer.options().padding_idx {
                layer.table_mut().row_mut(p).fill(0.0);
            }
            layer.clear_grad();
        });
        if let Some(fresh) = optimizer {
            *self.inner.optimizer().lock() = fresh;
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        let t = self.inner.table();
        format!("Embedding(num_rows={}, dim={})", t.rows(), t.dim())
    }
}

impl Layer {
    /// The library's layer.
    pub fn inner(&self) -> &embtable::Embedding<Shared> {
        &self.inner
    }

    /// A layer from a checkpoint entry, with a fresh optimizer of the
    /// saved kind taking the saved state; a table saved without optimizer
    /// state comes back frozen.
    pub fn restore(ckpt: &mut Checkpoint<'static>, name: &str) -> PyResult<Self> {
        let optimizer = match ckpt.optimizer_state(name) {
            Some(state) if state.kind != embtable::Frozen::KIND => {
                AnyOptimizer::for_kind(&state.kind)?
            }
            _ => AnyOptimizer::Frozen(embtable::Frozen),
        };
        let frozen = matches!(optimizer, AnyOptimizer::Frozen(_));
        let mut inner = ckpt.restore_layer(name, Shared::new(optimizer)).py()?;
        if frozen && inner.options().trainable {
            inner.set_trainable(false).py()?;
        }
        Ok(Self { inner })
    }
}

/// Whether `state` (an optimizer state dict) is a frozen layer's.
fn is_frozen_state(state: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(match state.get_item("kind") {
        Ok(kind) => kind
            .extract::<String>()
            .is_ok_and(|k| k == embtable::Frozen::KIND),
        Err(_) => false,
    })
}
