//! Learning-rate schedules: the rate of each step as a function of the
//! steps already taken, as Keras' `LearningRateSchedule` and PyTorch's
//! `lr_scheduler` give it.

/// A learning rate for each step, plugged into an optimizer with
/// [`SparseOptimizer::set_schedule`](super::SparseOptimizer::set_schedule).
///
/// The optimizer asks for `lr(steps)` before each step, `steps` being the
/// steps taken so far (Keras' `optimizer.iterations`), and uses it as if
/// [`set_lr`](super::SparseOptimizer::set_lr) had been called: a rate
/// the config refuses makes the step fail with nothing written. A schedule
/// is a pure function of the step count, so a checkpoint (which saves the
/// step count and the rate of the last step) resumes it exactly once the
/// same schedule is set again.
///
/// # Examples
/// ```
/// use std::sync::Arc;
/// use embtable::optim::LrSchedule;
/// use embtable::{EmbeddingTable, Sgd, SgdConfig, SparseGrad, SparseOptimizer};
///
/// /// Warm-up: the rate grows linearly over the first 100 steps.
/// #[derive(Debug)]
/// struct WarmUp(f32);
/// impl LrSchedule for WarmUp {
///     fn lr(&self, steps: u64) -> f32 {
///         self.0 * ((steps + 1).min(100) as f32 / 100.0)
///     }
/// }
///
/// let mut table = EmbeddingTable::from_rows(1, 1, &[1.0])?;
/// let mut grad = SparseGrad::new(1);
/// grad.accumulate_lookup(&[0u32], &[1.0])?;
/// let mut sgd = Sgd::new(SgdConfig::keras());
/// sgd.set_schedule(Some(Arc::new(WarmUp(0.5))));
/// sgd.step(&mut table, &grad)?; // lr 0.005
/// assert_eq!(table.row(0), &[0.995]);
/// assert_eq!(sgd.lr(), 0.01); // the next step's
/// # Ok::<(), embtable::Error>(())
/// ```
pub trait LrSchedule: std::fmt::Debug + Send + Sync {
    /// The learning rate of the step taken after `steps` steps.
    fn lr(&self, steps: u64) -> f32;
}

/// Keras' `ExponentialDecay`:
/// `initial_learning_rate · decay_rate ^ (steps / decay_steps)`, with the
/// exponent floored when `staircase`.
///
/// Computed in `f32` as Keras computes it (`steps / decay_steps` as a
/// float32 division, then a float32 power).
///
/// # Examples
/// ```
/// use embtable::optim::{ExponentialDecay, LrSchedule};
/// let s = ExponentialDecay { initial_learning_rate: 0.1, decay_steps: 10, decay_rate: 0.5, staircase: true };
/// assert_eq!((s.lr(0), s.lr(9), s.lr(10), s.lr(25)), (0.1, 0.1, 0.05, 0.025));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExponentialDecay {
    /// The rate at step 0.
    pub initial_learning_rate: f32,
    /// Steps over which the rate is multiplied by `decay_rate` (Keras requires `> 0`).
    pub decay_steps: u64,
    /// The factor per `decay_steps` steps.
    pub decay_rate: f32,
    /// Decay in whole periods of `decay_steps`.
    pub staircase: bool,
}

impl LrSchedule for ExponentialDecay {
    fn lr(&self, steps: u64) -> f32 {
        let mut p = steps as f32 / self.decay_steps as f32;
        if self.staircase {
            p = p.floor();
        }
        self.initial_learning_rate * self.decay_rate.powf(p)
    }
}

/// PyTorch's `StepLR`: `lr · gamma ^ ⌊steps / step_size⌋`.
///
/// PyTorch counts `scheduler.step()` calls, usually one per epoch; here the
/// count is the optimizer's steps. For a per-epoch schedule, call
/// [`set_lr`](super::SparseOptimizer::set_lr) with [`StepLr::at`] at each
/// epoch instead. Computed in `f64`, as PyTorch keeps rates in Python
/// floats, and rounded to `f32` once.
///
/// # Examples
/// ```
/// use embtable::optim::{LrSchedule, StepLr};
/// let s = StepLr { lr: 0.1, step_size: 30, gamma: 0.1 };
/// assert_eq!((s.lr(29), s.lr(30), s.at(60)), (0.1, 0.01, 0.001));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLr {
    /// The initial rate.
    pub lr: f64,
    /// Period of the decay, in steps (or epochs with [`at`](Self::at)); `> 0`.
    pub step_size: u64,
    /// The factor per period.
    pub gamma: f64,
}

impl StepLr {
    /// The rate after `count` steps (or epochs).
    pub fn at(&self, count: u64) -> f32 {
        let periods = count / self.step_size.max(1);
        (self.lr * self.gamma.powf(periods as f64)) as f32
    }
}

impl LrSchedule for StepLr {
    fn lr(&self, steps: u64) -> f32 {
        self.at(steps)
    }
}
