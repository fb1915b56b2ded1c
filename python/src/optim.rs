//! The optimizers as Python classes: `Sgd`, `RmsProp`, `Adagrad`,
//! `RowWiseAdagrad`, `Adam`, `AdamW`, `Ftrl`, each a subclass of
//! `Optimizer`, with the presets as static methods taking keyword overrides
//! (`Adagrad.torch(lr=0.05)`, `Adam.torch_sparse(lr=0.01)`).
//!
//! The binding knows nothing of each optimizer's fields: a config travels as
//! the library's `OptimizerState::config` (every field by name, as `f64`),
//! which `SparseOptimizer::load_state` validates. A preset is exported to
//! that list, the keyword overrides replace entries by name, and the result
//! is loaded into a fresh optimizer. Adding an optimizer is one line in the
//! `optimizers!` invocation below (and its entry in the `.pyi` stub).

use std::sync::{Arc, Mutex, MutexGuard};

use embtable::optim::{LrSchedule, OptimizerState};
use embtable::{EmbeddingTable, Index, Result, SparseGrad, SparseOptimizer, StateArray};
use numpy::{PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyAttributeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyTuple};
use pyo3::{PyClassInitializer, intern};

use crate::arrays;
use crate::errors::{IntoPy, value_error};
use crate::grad::Grad;
use crate::table::Table;
use crate::threads::run;

/// How a config field is written in Python; every other field is an `f32`.
enum Field {
    Float,
    /// Kept in `f64` by the library (Adam's β: `1 − β` needs the digits).
    Double,
    Bool,
    /// Strings whose index is the saved code (see `OptimizerState`).
    Choice(&'static [&'static str]),
}

fn field(kind: &str, name: &str) -> Field {
    match (kind, name) {
        (_, "beta_1" | "beta_2") => Field::Double,
        (_, "nesterov" | "centered" | "amsgrad") => Field::Bool,
        (_, "eps_placement") => Field::Choice(&["inside_sqrt", "outside_sqrt"]),
        (_, "semantics") => Field::Choice(&["lazy", "dense_exact"]),
        ("adam" | "adamw", "style") => Field::Choice(&["keras", "torch", "torch_sparse"]),
        (_, "style") => Field::Choice(&["keras", "torch"]),
        _ => Field::Float,
    }
}

/// A Python value of config field `name` as its saved `f64`.
fn encode(kind: &str, name: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    let wrong = |want: &str| {
        value_error(format!(
            "{kind} option {name} must be {want}, got {}",
            value.repr().map_or_else(|_| "?".into(), |r| r.to_string())
        ))
    };
    match field(kind, name) {
        Field::Bool => value
            .cast::<PyBool>()
            .map(|b| f64::from(u8::from(b.is_true())))
            .map_err(|_| wrong("True or False")),
        Field::Choice(options) => {
            let s: String = value.extract().map_err(|_| wrong(&quoted(options)))?;
            options
                .iter()
                .position(|o| *o == s)
                .map(|i| i as f64)
                .ok_or_else(|| wrong(&quoted(options)))
        }
        Field::Float | Field::Double => {
            if value.is_instance_of::<PyBool>() {
                return Err(wrong("a number"));
            }
            let v: f64 = value.extract().map_err(|_| wrong("a number"))?;
            Ok(match field(kind, name) {
                // The library accepts only exact f32 values for its f32 fields.
                Field::Float => f64::from(v as f32),
                _ => v,
            })
        }
    }
}

/// A saved config value as Python shows it.
fn decode<'py>(py: Python<'py>, kind: &str, name: &str, v: f64) -> PyResult<Bound<'py, PyAny>> {
    Ok(match field(kind, name) {
        Field::Bool => PyBool::new(py, v != 0.0).to_owned().into_any(),
        Field::Choice(options) => options
            .get(v as usize)
            .copied()
            .unwrap_or("?")
            .into_pyobject(py)?
            .into_any(),
        Field::Float => shown(v as f32).into_pyobject(py)?.into_any(),
        Field::Double => v.into_pyobject(py)?.into_any(),
    })
}

/// The shortest decimal of an `f32` (0.05, not 0.05000000074505806), as
/// a Python float; it converts back to the same `f32`.
pub fn shown(v: f32) -> f64 {
    v.to_string().parse::<f64>().unwrap_or(f64::from(v))
}

fn quoted(options: &[&str]) -> String {
    let q: Vec<String> = options.iter().map(|o| format!("{o:?}")).collect();
    format!("one of {}", q.join(", "))
}

/// Generates the optimizer enum, its `SparseOptimizer` impl, the presets
/// and one Python class per optimizer.
macro_rules! optimizers {
    ($($variant:ident($class:ident, $name:literal, $kind:literal) {
        $($preset:ident => $config:expr),+ $(,)?
    }),+ $(,)?) => {
        // The binding's own methods come after the `SparseOptimizer` impl.
        /// One of the library's optimizers, chosen at run time.
        #[derive(Clone, Debug)]
        pub enum AnyOptimizer {
            $(
                #[doc = concat!("`", $kind, "`")]
                $variant(embtable::$variant),
            )+
            /// The optimizer of a frozen layer built without one: it never steps.
            Frozen(embtable::Frozen),
        }

        impl AnyOptimizer {
            /// The optimizer `kind` with the config of `preset`.
            fn preset(kind: &str, preset: &str) -> Option<Self> {
                match (kind, preset) {
                    $($(
                        ($kind, stringify!($preset)) =>
                            Some(Self::$variant(embtable::$variant::new($config))),
                    )+)+
                    _ => None,
                }
            }

            /// The kind: `"sgd"`, `"adagrad"`, …
            pub fn kind(&self) -> &'static str {
                match self { $(Self::$variant(_) => $kind,)+ Self::Frozen(_) => embtable::Frozen::KIND }
            }

            /// The Python class name.
            fn class_name(&self) -> &'static str {
                match self { $(Self::$variant(_) => $name,)+ Self::Frozen(_) => "Frozen" }
            }

            /// The kind's presets, for an error message.
            fn presets(kind: &str) -> Option<&'static [&'static str]> {
                match kind {
                    $($kind => Some(&[$(stringify!($preset)),+]),)+
                    _ => None,
                }
            }

            /// The config as `(name, value)` pairs, without copying the state.
            fn config(&self) -> Vec<(String, f64)> {
                match self {
                    $(Self::$variant(o) => embtable::$variant::new(*o.config()).state().config,)+
                    Self::Frozen(_) => Vec::new(),
                }
            }

            /// The Python object for `optimizer`: an instance of its class.
            fn into_python(py: Python<'_>, optimizer: Optimizer) -> PyResult<Py<PyAny>> {
                let kind = optimizer.lock().kind();
                let init = PyClassInitializer::from(optimizer);
                Ok(match kind {
                    $($kind => Py::new(py, init.add_subclass($class))?.into_any(),)+
                    _ => unreachable!("no Python object holds a Frozen (see `Layer`)"),
                })
            }
        }

        impl SparseOptimizer for AnyOptimizer {
            fn step(&mut self, table: &mut EmbeddingTable, grad: &SparseGrad) -> Result<()> {
                match self { $(Self::$variant(o) => o.step(table, grad),)+ Self::Frozen(o) => o.step(table, grad) }
            }
            fn step_lookup<I: Index>(
                &mut self,
                table: &mut EmbeddingTable,
                ids: &[I],
                grad_out: &[f32],
            ) -> Result<()> {
                // The binding passes i64 ids only (see `arrays::Ids`).
                match self { $(Self::$variant(o) => o.step_lookup(table, ids, grad_out),)+ Self::Frozen(o) => o.step_lookup(table, ids, grad_out) }
            }
            fn flush(&mut self, table: &mut EmbeddingTable) -> Result<()> {
                match self { $(Self::$variant(o) => o.flush(table),)+ Self::Frozen(o) => o.flush(table) }
            }
            fn catch_up(&mut self, table: &mut EmbeddingTable, rows: &[usize]) -> Result<()> {
                match self { $(Self::$variant(o) => o.catch_up(table, rows),)+ Self::Frozen(o) => o.catch_up(table, rows) }
            }
            fn has_lagging_rows(&self) -> bool {
                match self { $(Self::$variant(o) => o.has_lagging_rows(),)+ Self::Frozen(o) => o.has_lagging_rows() }
            }
            fn state(&self) -> OptimizerState {
                match self { $(Self::$variant(o) => o.state(),)+ Self::Frozen(o) => o.state() }
            }
            fn load_state(&mut self, state: OptimizerState) -> Result<()> {
                match self { $(Self::$variant(o) => o.load_state(state),)+ Self::Frozen(o) => o.load_state(state) }
            }
            fn lr(&self) -> f32 {
                match self { $(Self::$variant(o) => o.lr(),)+ Self::Frozen(o) => o.lr() }
            }
            fn set_lr(&mut self, lr: f32) -> Result<()> {
                match self { $(Self::$variant(o) => o.set_lr(lr),)+ Self::Frozen(o) => o.set_lr(lr) }
            }
            fn set_schedule(&mut self, schedule: Option<Arc<dyn LrSchedule>>) {
                match self { $(Self::$variant(o) => o.set_schedule(schedule),)+ Self::Frozen(o) => o.set_schedule(schedule) }
            }
            fn steps(&self) -> u64 {
                match self { $(Self::$variant(o) => o.steps(),)+ Self::Frozen(o) => o.steps() }
            }
        }

        $(
            #[doc = concat!("The `", $kind, "` optimizer (see the `.pyi` stub for its options).")]
            #[pyclass(extends = Optimizer, name = $name, module = "embtable._embtable", frozen)]
            pub struct $class;

            #[pymethods]
            impl $class {
                /// Keras' defaults, with keyword overrides.
                #[new]
                #[pyo3(signature = (**config))]
                fn new(config: Option<&Bound<'_, PyDict>>) -> PyResult<PyClassInitializer<Self>> {
                    let first = AnyOptimizer::presets($kind).expect("known kind")[0];
                    Ok(PyClassInitializer::from(Optimizer::build($kind, first, config)?).add_subclass($class))
                }

                $(
                    #[doc = concat!("The `", stringify!($preset), "` preset, with keyword overrides.")]
                    #[staticmethod]
                    #[pyo3(signature = (**overrides))]
                    fn $preset(
                        py: Python<'_>,
                        overrides: Option<&Bound<'_, PyDict>>,
                    ) -> PyResult<Py<PyAny>> {
                        let optimizer = Optimizer::build($kind, stringify!($preset), overrides)?;
                        AnyOptimizer::into_python(py, optimizer)
                    }
                )+
            }
        )+

        /// Adds the optimizer classes to the module.
        pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            m.add_class::<Optimizer>()?;
            $(m.add_class::<$class>()?;)+
            Ok(())
        }
    };
}

// The first preset of each is what the class called without a preset gives.
optimizers! {
    Sgd(SgdClass, "Sgd", "sgd") {
        keras => embtable::SgdConfig::keras(),
        keras_lazy => embtable::SgdConfig::keras_lazy(),
        torch => embtable::SgdConfig::torch(),
    },
    RmsProp(RmsPropClass, "RmsProp", "rmsprop") {
        keras => embtable::RmsPropConfig::keras(),
        keras_lazy => embtable::RmsPropConfig::keras_lazy(),
        torch => embtable::RmsPropConfig::torch(),
    },
    Adagrad(AdagradClass, "Adagrad", "adagrad") {
        keras => embtable::AdagradConfig::keras(),
        torch => embtable::AdagradConfig::torch(),
    },
    RowWiseAdagrad(RowWiseAdagradClass, "RowWiseAdagrad", "rowwise_adagrad") {
        fbgemm => embtable::RowWiseAdagradConfig::default(),
    },
    Adam(AdamClass, "Adam", "adam") {
        keras => embtable::AdamConfig::keras(),
        keras_lazy => embtable::AdamConfig::keras_lazy(),
        torch => embtable::AdamConfig::torch(),
        torch_sparse => embtable::AdamConfig::torch_sparse(),
    },
    AdamW(AdamWClass, "AdamW", "adamw") {
        keras => embtable::AdamWConfig::keras(),
        keras_lazy => embtable::AdamWConfig::keras_lazy(),
        torch => embtable::AdamWConfig::torch(),
    },
    Ftrl(FtrlClass, "Ftrl", "ftrl") {
        keras => embtable::FtrlConfig::keras(),
        keras_lazy => embtable::FtrlConfig::keras_lazy(),
    },
}

/// An optimizer shared between its Python object and the layer that uses
/// it, so that changing it from Python (`module.optimizer.set(lr=…)`)
/// changes what the layer steps with.
#[derive(Clone, Debug)]
pub struct Shared(Arc<Mutex<AnyOptimizer>>);

impl Shared {
    pub fn new(optimizer: AnyOptimizer) -> Self {
        Self(Arc::new(Mutex::new(optimizer)))
    }

    /// The optimizer. Nothing panics while the lock is held, so a poisoned
    /// lock still guards a consistent optimizer.
    pub fn lock(&self) -> MutexGuard<'_, AnyOptimizer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SparseOptimizer for Shared {
    fn step(&mut self, table: &mut EmbeddingTable, grad: &SparseGrad) -> Result<()> {
        self.lock().step(table, grad)
    }
    fn step_lookup<I: Index>(
        &mut self,
        table: &mut EmbeddingTable,
        ids: &[I],
        grad_out: &[f32],
    ) -> Result<()> {
        self.lock().step_lookup(table, ids, grad_out)
    }
    fn flush(&mut self, table: &mut EmbeddingTable) -> Result<()> {
        self.lock().flush(table)
    }
    fn catch_up(&mut self, table: &mut EmbeddingTable, rows: &[usize]) -> Result<()> {
        self.lock().catch_up(table, rows)
    }
    fn has_lagging_rows(&self) -> bool {
        self.lock().has_lagging_rows()
    }
    fn state(&self) -> OptimizerState {
        self.lock().state()
    }
    fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        self.lock().load_state(state)
    }
    fn lr(&self) -> f32 {
        self.lock().lr()
    }
    fn set_lr(&mut self, lr: f32) -> Result<()> {
        self.lock().set_lr(lr)
    }
    fn set_schedule(&mut self, schedule: Option<Arc<dyn LrSchedule>>) {
        self.lock().set_schedule(schedule)
    }
    fn steps(&self) -> u64 {
        self.lock().steps()
    }
}

/// Base class of the optimizers: a config, and once it has stepped, the
/// state of the one table it steps.
#[pyclass(subclass, module = "embtable._embtable", frozen)]
pub struct Optimizer {
    shared: Shared,
}

impl Optimizer {
    /// `kind`'s `preset` with the keyword `overrides`.
    fn build(kind: &str, preset: &str, overrides: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let Some(mut optimizer) = AnyOptimizer::preset(kind, preset) else {
            return Err(match AnyOptimizer::presets(kind) {
                Some(presets) => value_error(format!(
                    "{kind} has no preset {preset:?}; its presets are {}",
                    presets.join(", ")
                )),
                None => value_error(format!("no optimizer is called {kind:?}")),
            });
        };
        let mut config = optimizer.config();
        if let Some(overrides) = overrides {
            set_fields(kind, &mut config, overrides)?;
        }
        optimizer
            .load_state(OptimizerState {
                kind: kind.into(),
                config,
                ..Default::default()
            })
            .py()?;
        Ok(Self {
            shared: Shared::new(optimizer),
        })
    }

    /// A new Python optimizer object owning `optimizer`.
    pub fn wrap(py: Python<'_>, optimizer: AnyOptimizer) -> PyResult<Py<PyAny>> {
        AnyOptimizer::into_python(
            py,
            Optimizer {
                shared: Shared::new(optimizer),
            },
        )
    }

    /// A Python object for the very optimizer `shared` (not a copy).
    pub fn handle(py: Python<'_>, shared: &Shared) -> PyResult<Py<PyAny>> {
        AnyOptimizer::into_python(
            py,
            Optimizer {
                shared: shared.clone(),
            },
        )
    }

    pub fn lock(&self) -> MutexGuard<'_, AnyOptimizer> {
        self.shared.lock()
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }
}

/// Replaces the fields named in `fields` (a dict of Python values).
fn set_fields(
    kind: &str,
    config: &mut [(String, f64)],
    fields: &Bound<'_, PyDict>,
) -> PyResult<()> {
    for (name, value) in fields.iter() {
        let name: String = name.extract()?;
        let Some(slot) = config.iter_mut().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = config.iter().map(|(n, _)| n.as_str()).collect();
            return Err(PyTypeError::new_err(format!(
                "{kind} has no option {name:?}; its options are {}",
                names.join(", ")
            )));
        };
        slot.1 = encode(kind, &name, &value)?;
    }
    Ok(())
}

#[pymethods]
impl Optimizer {
    /// Any optimizer by kind and preset (`Optimizer("adagrad", "torch", {"lr": 0.1})`).
    #[new]
    #[pyo3(signature = (kind, preset, config = None))]
    fn py_new(kind: &str, preset: &str, config: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        Self::build(kind, preset, config)
    }

    /// `"sgd"`, `"rmsprop"`, `"adagrad"` or `"rowwise_adagrad"`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.lock().kind()
    }

    /// Every option by name.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let config = self.lock().config();
        let dict = PyDict::new(py);
        let kind = self.lock().kind();
        for (name, v) in config {
            dict.set_item(&name, decode(py, kind, &name, v)?)?;
        }
        Ok(dict)
    }

    /// Config options read as attributes (`opt.lr`).
    fn __getattr__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let config = self.lock().config();
        match config.iter().find(|(n, _)| n == name) {
            Some((n, v)) => decode(py, self.lock().kind(), n, *v),
            None => Err(PyAttributeError::new_err(format!(
                "'{}' object has no attribute {name:?}",
                self.lock().class_name()
            ))),
        }
    }

    /// Config options set as attributes (`opt.lr = 0.01`); see `set`.
    fn __setattr__(&self, py: Python<'_>, name: &str, value: Bound<'_, PyAny>) -> PyResult<()> {
        let fields = PyDict::new(py);
        fields.set_item(name, value)?;
        self.set(py, Some(&fields))
    }

    /// Changes options, keeping the state (`opt.set(lr=0.01)`). Options
    /// that decide which state arrays exist (momentum, centered) cannot
    /// change after the first step. On error nothing changes.
    #[pyo3(signature = (**fields))]
    fn set(&self, py: Python<'_>, fields: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let Some(fields) = fields else { return Ok(()) };
        let mut guard = self.lock();
        let kind = guard.kind();
        let old = guard.config();
        let mut config = old.clone();
        set_fields(kind, &mut config, fields)?;
        // Check the config alone first: cheap, and names the bad field.
        let mut fresh = guard.clone_config_only();
        fresh
            .load_state(OptimizerState {
                kind: kind.into(),
                config: config.clone(),
                ..Default::default()
            })
            .py()?;
        // A new rate goes through `set_lr`, so that rows lagging behind
        // (dense-exact) catch up the steps they missed with the rates those
        // steps used; the other fields are loaded with the state.
        let lr_of = |c: &[(String, f64)]| c.iter().find(|(n, _)| n == "lr").map(|&(_, v)| v);
        let new_lr = lr_of(&config).filter(|&lr| Some(lr) != lr_of(&old));
        let others_change = config
            .iter()
            .zip(&old)
            .any(|((name, new), (_, was))| name != "lr" && new != was);
        if let (Some(_), Some(slot)) = (new_lr, config.iter_mut().find(|(n, _)| n == "lr")) {
            slot.1 = lr_of(&old).unwrap_or(slot.1);
        }
        let optimizer: &mut AnyOptimizer = &mut guard;
        run(py, move || {
            if others_change {
                let mut state = optimizer.state();
                state.config = config;
                optimizer.load_state(state)?;
            }
            match new_lr {
                Some(lr) => optimizer.set_lr(lr as f32),
                None => Ok(()),
            }
        })
        .py()
    }

    /// Sets the learning rate of the next steps, as a PyTorch scheduler or
    /// Keras' `optimizer.learning_rate = x` does (the same as `lr = x`).
    fn set_lr(&self, py: Python<'_>, lr: f32) -> PyResult<()> {
        let shared = &self.shared;
        run(py, move || shared.lock().set_lr(lr)).py()
    }

    /// Steps taken so far (Keras' `optimizer.iterations`).
    #[getter]
    fn steps(&self) -> u64 {
        self.lock().steps()
    }

    /// The rate the next step will use: the schedule's, if one is set.
    #[getter]
    fn next_lr(&self) -> f64 {
        shown(self.lock().lr())
    }

    /// Plugs in a learning-rate schedule (`embtable.ExponentialDecay`,
    /// `embtable.StepLR`), or removes it with `None`: before each step the
    /// rate becomes `schedule(steps)`. Not part of `state_dict()`: set it
    /// again after loading one.
    fn set_schedule(&self, schedule: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let schedule = crate::schedule::from_py(schedule)?;
        self.lock().set_schedule(schedule);
        Ok(())
    }

    /// One step on the rows `grad` names (`grad`: a `SparseGrad`).
    fn step(
        &self,
        py: Python<'_>,
        mut table: PyRefMut<'_, Table>,
        grad: PyRef<'_, Grad>,
    ) -> PyResult<()> {
        let table = &mut table.inner;
        let grad = &grad.inner;
        let shared = &self.shared;
        run(py, move || shared.lock().step(table, grad)).py()
    }

    /// One step with the gradient of `table.lookup(ids)`, given the gradient
    /// of its output, coalescing and updating in one pass.
    fn step_lookup(
        &self,
        py: Python<'_>,
        mut table: PyRefMut<'_, Table>,
        ids: &Bound<'_, PyAny>,
        grad_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let ids = arrays::ids(ids, "ids")?;
        let dim = table.inner.dim();
        let grad_out = arrays::floats(grad_out, "grad_out")?;
        arrays::check_rows_of(&grad_out, ids.shape(), dim, "grad_out")?;
        let grad = grad_out.as_slice()?;
        let table = &mut table.inner;
        let shared = &self.shared;
        let ids = ids.slice();
        run(py, move || shared.lock().step_lookup(table, ids, grad)).py()
    }

    /// Brings every row of `table` current (dense-exact semantics).
    fn flush(&self, py: Python<'_>, mut table: PyRefMut<'_, Table>) -> PyResult<()> {
        let table = &mut table.inner;
        let shared = &self.shared;
        run(py, move || shared.lock().flush(table)).py()
    }

    /// The whole state: kind, config, step count, table shape, state arrays
    /// and per-row step counts, as a dict of Python values and ndarrays.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shared = &self.shared;
        let state = run(py, move || shared.lock().state());
        state_to_py(py, state)
    }

    /// Replaces config and state with what `state_dict()` gave. On error
    /// nothing changes.
    fn load_state_dict(&self, py: Python<'_>, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let state = state_from_py(state)?;
        let shared = &self.shared;
        run(py, move || shared.lock().load_state(state)).py()
    }

    /// An independent copy, state included.
    fn copy(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let copy = self.lock().clone();
        Optimizer::wrap(py, copy)
    }

    fn __copy__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.copy(py)
    }

    fn __deepcopy__(&self, py: Python<'_>, _memo: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.copy(py)
    }

    /// Pickles as its state dict.
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let module = py.import(intern!(py, "embtable._embtable"))?;
        let rebuild = module.getattr(intern!(py, "optimizer_from_state_dict"))?;
        let args = PyTuple::new(py, [self.state_dict(py)?])?;
        PyTuple::new(py, [rebuild, args.into_any()])
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let guard = self.lock();
        let mut parts = Vec::new();
        for (name, v) in guard.config() {
            parts.push(format!(
                "{name}={}",
                decode(py, guard.kind(), &name, v)?.repr()?
            ));
        }
        Ok(format!("{}({})", guard.class_name(), parts.join(", ")))
    }
}

impl AnyOptimizer {
    /// A fresh optimizer of `kind` (its first preset), to load a state into.
    pub fn for_kind(kind: &str) -> PyResult<Self> {
        AnyOptimizer::presets(kind)
            .and_then(|p| AnyOptimizer::preset(kind, p[0]))
            .ok_or_else(|| value_error(format!("no optimizer is called {kind:?}")))
    }

    /// A fresh optimizer of the same kind and config, without state.
    fn clone_config_only(&self) -> AnyOptimizer {
        let mut fresh = AnyOptimizer::preset(
            self.kind(),
            AnyOptimizer::presets(self.kind()).expect("known kind")[0],
        )
        .expect("a kind's first preset exists");
        fresh
            .load_state(OptimizerState {
                kind: self.kind().into(),
                config: self.config(),
                ..Default::default()
            })
            .expect("an optimizer's own config is valid");
        fresh
    }
}

/// Rebuilds an optimizer from `Optimizer.state_dict()` (for pickle).
#[pyfunction]
pub fn optimizer_from_state_dict(py: Python<'_>, state: &Bound<'_, PyDict>) -> PyResult<Py<PyAny>> {
    let state = state_from_py(state)?;
    let mut optimizer = AnyOptimizer::for_kind(&state.kind)?;
    run(py, || optimizer.load_state(state)).py()?;
    Optimizer::wrap(py, optimizer)
}

/// An `OptimizerState` as a dict of Python values and ndarrays.
pub fn state_to_py(py: Python<'_>, state: OptimizerState) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("kind", &state.kind)?;
    let config = PyDict::new(py);
    for (name, v) in &state.config {
        config.set_item(name, decode(py, &state.kind, name, *v)?)?;
    }
    dict.set_item("config", config)?;
    dict.set_item("steps", state.steps)?;
    dict.set_item("shape", state.shape)?;
    let arrays = PyDict::new(py);
    for array in state.arrays {
        let values = PyArray1::from_vec(py, array.values);
        arrays.set_item(array.name, values.reshape(array.shape)?)?;
    }
    dict.set_item("arrays", arrays)?;
    let last_step: Vec<i64> = state
        .last_step
        .iter()
        .map(|&s| i64::try_from(s).unwrap_or(i64::MAX))
        .collect();
    dict.set_item("last_step", PyArray1::from_vec(py, last_step))?;
    dict.set_item("lr_history", state.lr_history)?;
    Ok(dict)
}

/// The inverse of [`state_to_py`]; values are checked by `load_state`.
pub fn state_from_py(dict: &Bound<'_, PyDict>) -> PyResult<OptimizerState> {
    let get = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        dict.get_item(key)?
            .ok_or_else(|| value_error(format!("optimizer state has no {key:?} entry")))
    };
    let kind: String = get("kind")?.extract()?;
    let mut config = Vec::new();
    for (name, value) in get("config")?.cast_into::<PyDict>()?.iter() {
        let name: String = name.extract()?;
        let v = encode(&kind, &name, &value)?;
        config.push((name, v));
    }
    let steps: u64 = get("steps")?.extract()?;
    let shape: Option<(usize, usize)> = get("shape")?.extract()?;
    let mut arrays = Vec::new();
    for (name, value) in get("arrays")?.cast_into::<PyDict>()?.iter() {
        let name: String = name.extract()?;
        let values = arrays::floats(&value, "optimizer state array")?;
        arrays.push(StateArray {
            shape: values.shape().to_vec(),
            values: values.as_slice()?.to_vec(),
            name,
        });
    }
    let last = arrays::ids(&get("last_step")?, "last_step")?;
    let mut last_step = Vec::with_capacity(last.len());
    for (position, &s) in last.slice().iter().enumerate() {
        let s = u64::try_from(s).map_err(|_| {
            value_error(format!("last_step {s} at position {position} is negative"))
        })?;
        last_step.push(s);
    }
    let lr_history: Vec<(u64, f32)> = get("lr_history")?.extract()?;
    Ok(OptimizerState {
        kind,
        config,
        steps,
        shape,
        arrays,
        last_step,
        lr_history,
    })
}
