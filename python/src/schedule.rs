//! Learning-rate schedules as Python classes, for `Optimizer.set_schedule`:
//! Keras' `ExponentialDecay` and PyTorch's `StepLR` (counted in optimizer
//! steps). A schedule runs inside the step, without the GIL, so it is one
//! of the library's, not a Python callable.

use std::sync::Arc;

use embtable::optim::LrSchedule;
use pyo3::prelude::*;

use crate::errors::value_error;

/// `initial_learning_rate * decay_rate ** (steps / decay_steps)`, the
/// exponent floored when `staircase`: Keras' `ExponentialDecay`.
#[pyclass(name = "ExponentialDecay", module = "embtable._embtable", frozen)]
pub struct ExponentialDecay {
    inner: embtable::optim::ExponentialDecay,
}

#[pymethods]
impl ExponentialDecay {
    #[new]
    #[pyo3(signature = (initial_learning_rate, decay_steps, decay_rate, staircase = false))]
    fn new(
        initial_learning_rate: f32,
        decay_steps: u64,
        decay_rate: f32,
        staircase: bool,
    ) -> PyResult<Self> {
        if decay_steps == 0 {
            return Err(value_error(
                "ExponentialDecay: decay_steps must be positive, got 0",
            ));
        }
        Ok(Self {
            inner: embtable::optim::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            },
        })
    }

    /// The rate of the step taken after `steps` steps.
    fn __call__(&self, steps: u64) -> f64 {
        crate::optim::shown(self.inner.lr(steps))
    }

    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "ExponentialDecay(initial_learning_rate={}, decay_steps={}, decay_rate={}, \
             staircase={})",
            s.initial_learning_rate,
            s.decay_steps,
            s.decay_rate,
            if s.staircase { "True" } else { "False" }
        )
    }
}

/// `lr * gamma ** (steps // step_size)`: PyTorch's `StepLR`, counting
/// optimizer steps (for a per-epoch schedule, call `set_lr` each epoch).
#[pyclass(name = "StepLR", module = "embtable._embtable", frozen)]
pub struct StepLr {
    inner: embtable::optim::StepLr,
}

#[pymethods]
impl StepLr {
    #[new]
    #[pyo3(signature = (lr, step_size, gamma = 0.1))]
    fn new(lr: f64, step_size: u64, gamma: f64) -> PyResult<Self> {
        if step_size == 0 {
            return Err(value_error("StepLR: step_size must be positive, got 0"));
        }
        Ok(Self {
            inner: embtable::optim::StepLr {
                lr,
                step_size,
                gamma,
            },
        })
    }

    /// The rate of the step taken after `steps` steps.
    fn __call__(&self, steps: u64) -> f64 {
        crate::optim::shown(self.inner.lr(steps))
    }

    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "StepLR(lr={}, step_size={}, gamma={})",
            s.lr, s.step_size, s.gamma
        )
    }
}

/// The library schedule behind a Python schedule object, or `None` for `None`.
pub fn from_py(schedule: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Arc<dyn LrSchedule>>> {
    let Some(schedule) = schedule.filter(|s| !s.is_none()) else {
        return Ok(None);
    };
    if let Ok(s) = schedule.cast::<ExponentialDecay>() {
        return Ok(Some(Arc::new(s.get().inner)));
    }
    if let Ok(s) = schedule.cast::<StepLr>() {
        return Ok(Some(Arc::new(s.get().inner)));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "a schedule must be embtable.ExponentialDecay, embtable.StepLR or None, got {}",
        schedule.get_type().name()?
    )))
}
