//! Sparse optimizers: SGD, RMSprop, Adagrad and row-wise Adagrad.
//!
//! An optimizer sees an [`EmbeddingTable`] and a [`SparseGrad`] and updates
//! only the rows the gradient names (duplicate ids were already summed by
//! `SparseGrad`, so each row is updated once per step, as PyTorch's
//! coalesce, TensorFlow's deduplicating optimizers and FBGEMM's "exact"
//! optimizers do).
//!
//! | optimizer | state per row | update of a row with summed gradient g |
//! |---|---|---|
//! | [`Sgd`] | momentum (if μ > 0) | see [`SgdStyle`] |
//! | [`RmsProp`] | `square_avg`, [`grad_avg`], [`momentum`] | s = ρs + (1−ρ)g²; [m = ρm + (1−ρ)g; d = s − m²] else d = s; Δ = ηg/√(d+ε) (or ηg/(√d+ε)); [b = μb + Δ; w −= b] else w −= Δ |
//! | [`Adagrad`] | `accumulator` | a += g²; w −= ηg/√(a+ε) (or ηg/(√a+ε)) |
//! | [`RowWiseAdagrad`] | one float per row | h += mean(g²); w −= η/(√h+ε) · g |
//!
//! # Semantics
//!
//! [`Semantics::Lazy`] (the default) leaves the rows absent from a batch,
//! and their state, bit for bit as they were: TensorFlow's sparse ops,
//! PyTorch's sparse Adagrad and FBGEMM work this way.
//!
//! [`Semantics::DenseExact`] gives what the dense optimizer computes when
//! it sees the dense gradient every step (zeros for the absent rows), as
//! Keras 3 does, while the work stays proportional to the batch. A step
//! with a zero gradient is a fixed linear map on each lane's tuple
//! `(weight, state…)` (momentum decays, weight decay shrinks the weight,
//! moving averages shrink). Each row remembers the last step it saw; when
//! it is touched again (or on [`SparseOptimizer::flush`] or
//! [`SparseOptimizer::catch_up`]) the `k` steps it missed are applied at
//! once as the `k`-th power of that map, computed in `f64` by repeated
//! squaring once per distinct `k` and applied in `f32`. The caught-up row
//! equals the dense result up to rounding (one rounding per product
//! instead of one per missed step). Adagrad, row-wise Adagrad and SGD
//! without momentum or weight decay do nothing to an absent row, so both
//! semantics agree for them.
//!
//! # Numerics
//!
//! Every update is computed with IEEE `f32` add, sub, mul, div and sqrt,
//! never fused multiply-adds, and lane `j` of a row is computed from lane
//! `j` of its inputs only (row-wise Adagrad's mean is summed in a fixed
//! order of 16 partial sums). The results are therefore bitwise the same
//! for every kernel tier and every thread count. Where ε goes is chosen by
//! [`EpsPlacement`]. Gradients must be finite: a step whose gradient holds
//! a NaN or an infinity (a sum that overflowed) is refused.
//!
//! # State layout
//!
//! State arrays are allocated on the first step, in the table's padded
//! layout (`rows × stride` floats, 64-byte aligned; row-wise Adagrad: one
//! float per row), so row `r` of the weights and of every state array is
//! addressed with the same index. The state is then bound to that table
//! shape: a step on a table of another shape is refused. [`OptimizerState`]
//! exports and imports it for checkpoints.
//!
//! # Errors
//!
//! Every method validates everything (config, shapes, rows, finiteness)
//! before writing anything: on `Err`, the table and the optimizer state are
//! bitwise unchanged.
//!
//! [`grad_avg`]: RmsPropConfig::centered
//! [`momentum`]: RmsPropConfig::momentum
//!
//! # Examples
//! ```
//! use embtable::{Adagrad, AdagradConfig, EmbeddingTable, SparseGrad, SparseOptimizer};
//! let mut table = EmbeddingTable::from_rows(3, 2, &[1., 1., 2., 2., 3., 3.])?;
//! let mut grad = SparseGrad::new(2);
//! grad.accumulate_lookup(&[2u32, 2], &[0.5, 0.5, 0.5, 0.5])?; // row 2: g = 1
//! let mut opt = Adagrad::new(AdagradConfig::torch()); // lr 0.01, a₀ 0, ε outside
//! opt.step(&mut table, &grad)?;
//! // a = 1, so w = 3 − 0.01 · 1 / (1 + 1e-10)
//! assert_eq!(table.row(2), &[2.99, 2.99]);
//! assert_eq!(table.row(0), &[1., 1.]); // untouched
//! # Ok::<(), embtable::Error>(())
//! ```

/// Implements [`SparseOptimizer`] for an optimizer struct with fields
/// `config` (a `core::Config`) and `core` (a `core::Core`).
macro_rules! sparse_optimizer_impl {
    ($ty:ty) => {
        impl $crate::optim::SparseOptimizer for $ty {
            fn step(
                &mut self,
                table: &mut $crate::EmbeddingTable,
                grad: &$crate::SparseGrad,
            ) -> $crate::Result<()> {
                self.core.step(&self.config, table, grad)
            }

            fn step_lookup<I: $crate::Index>(
                &mut self,
                table: &mut $crate::EmbeddingTable,
                ids: &[I],
                grad_out: &[f32],
            ) -> $crate::Result<()> {
                self.core.step_lookup(&self.config, table, ids, grad_out)
            }

            fn flush(&mut self, table: &mut $crate::EmbeddingTable) -> $crate::Result<()> {
                self.core.catch_up(&self.config, table, None)
            }

            fn catch_up(
                &mut self,
                table: &mut $crate::EmbeddingTable,
                rows: &[usize],
            ) -> $crate::Result<()> {
                self.core.catch_up(&self.config, table, Some(rows))
            }

            fn has_lagging_rows(&self) -> bool {
                self.core.has_lagging_rows()
            }

            fn state(&self) -> $crate::optim::OptimizerState {
                self.core.export(&self.config)
            }

            fn load_state(&mut self, state: $crate::optim::OptimizerState) -> $crate::Result<()> {
                let (config, core) = $crate::optim::engine::Core::import(&state)?;
                self.config = config;
                self.core = core;
                Ok(())
            }
        }
    };
}
use sparse_optimizer_impl;

mod adagrad;
mod config;
mod engine;
mod groups;
mod linear;
mod rmsprop;
mod rowwise_adagrad;
mod sgd;

pub use adagrad::{Adagrad, AdagradConfig};
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use rowwise_adagrad::{RowWiseAdagrad, RowWiseAdagradConfig};
pub use sgd::{Sgd, SgdConfig, SgdStyle};

use crate::{EmbeddingTable, Index, Result, SparseGrad};

/// An optimizer that updates the rows of a table named by a sparse gradient.
///
/// Implemented by [`Sgd`], [`RmsProp`], [`Adagrad`] and [`RowWiseAdagrad`].
/// The trait is object safe, so a layer may hold a `Box<dyn SparseOptimizer>`.
pub trait SparseOptimizer {
    /// Applies one step with `grad` to the rows it names.
    ///
    /// Under [`Semantics::DenseExact`] each touched row first catches up the
    /// steps it missed. An empty gradient is a valid step (under
    /// `DenseExact` it still counts as a step every row will catch up).
    /// State is allocated on the first step and bound to `table`'s shape.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for a bad
    /// config; [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) if
    /// `grad.dim() != table.dim()` or the state belongs to a table of another
    /// shape; [`Error::IndexOutOfRange`](crate::Error::IndexOutOfRange) if a
    /// gradient row is `>= table.rows()` (`position` is the row's slot in
    /// [`SparseGrad::rows`]); [`Error::NonFinite`](crate::Error::NonFinite)
    /// if a summed gradient value is NaN or infinite (`position` is
    /// `slot * dim + column`); [`Error::Alloc`](crate::Error::Alloc) if the
    /// state does not fit in memory. On error nothing is written.
    fn step(&mut self, table: &mut EmbeddingTable, grad: &SparseGrad) -> Result<()>;

    /// One step with the gradient of `table.lookup(ids)`, given `grad_out`,
    /// the gradient of the lookup's output (`ids.len() * dim` floats,
    /// row-major): the same as
    ///
    /// ```text
    /// let mut grad = SparseGrad::for_table(table);
    /// grad.accumulate_lookup(ids, grad_out)?;
    /// self.step(table, &grad)
    /// ```
    ///
    /// bit for bit, which is what the provided method does. [`Sgd`],
    /// [`RmsProp`], [`Adagrad`] and [`RowWiseAdagrad`] fuse the two
    /// instead: each distinct row's gradient is summed (in batch order, as
    /// `SparseGrad` sums it) right before the row is updated, so the
    /// weights and the state are read and written once and no coalesced
    /// gradient is stored. This is the fastest way to train a table whose
    /// gradient comes from one lookup per step. For grouping the ids, the
    /// optimizer keeps 4 bytes per table row and scratch proportional to
    /// the batch (up to 24 bytes an id, and the gradient rows of ids that
    /// repeat in the batch).
    ///
    /// Only for sized types (it is generic over the id type); through a
    /// `dyn SparseOptimizer`, accumulate a [`SparseGrad`] and call
    /// [`step`](Self::step).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for a bad
    /// config; [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) if
    /// `grad_out.len() != ids.len() * table.dim()` or the state belongs to
    /// a table of another shape;
    /// [`Error::IndexOutOfRange`](crate::Error::IndexOutOfRange) for a
    /// negative id or one `>= table.rows()` (`position` in `ids`);
    /// [`Error::NonFinite`](crate::Error::NonFinite) for a NaN or infinite
    /// value of `grad_out` (`position` in `grad_out`), or a sum of them
    /// that overflowed (as [`step`](Self::step) reports it);
    /// [`Error::Alloc`](crate::Error::Alloc). Checked in that order; on
    /// error nothing is written.
    ///
    /// # Examples
    /// ```
    /// use embtable::{EmbeddingTable, SparseOptimizer, Sgd, SgdConfig};
    /// let mut table = EmbeddingTable::from_rows(3, 2, &[1., 1., 2., 2., 3., 3.])?;
    /// let mut sgd = Sgd::new(SgdConfig { lr: 0.5, ..SgdConfig::default() });
    /// // Row 2 is looked up twice: its gradients are summed, (1, 2) + (3, 4).
    /// sgd.step_lookup(&mut table, &[2u32, 0, 2], &[1., 2., 0., 0., 3., 4.])?;
    /// assert_eq!(table.to_vec(), [1., 1., 2., 2., 1., 0.]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    fn step_lookup<I: Index>(
        &mut self,
        table: &mut EmbeddingTable,
        ids: &[I],
        grad_out: &[f32],
    ) -> Result<()>
    where
        Self: Sized,
    {
        let mut grad = SparseGrad::for_table(table);
        grad.accumulate_lookup(ids, grad_out)?;
        self.step(table, &grad)
    }

    /// Brings every row current: under [`Semantics::DenseExact`], applies
    /// the steps each row missed since it was last touched, so the whole
    /// table equals the dense optimizer's. Call it before a checkpoint or an
    /// evaluation. A no-op under [`Semantics::Lazy`] and before the first step.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for a bad
    /// config; [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) if the
    /// state belongs to a table of another shape. Nothing is written then.
    fn flush(&mut self, table: &mut EmbeddingTable) -> Result<()>;

    /// Brings `rows` current (see [`flush`](Self::flush)), for a layer that
    /// is about to read them under [`Semantics::DenseExact`]. Duplicates
    /// are fine. The provided method does nothing, which is right for every
    /// optimizer whose absent rows never change.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`](crate::Error::IndexOutOfRange) for a row
    /// `>= table.rows()` (`position` is its index in `rows`), and the errors
    /// of [`flush`](Self::flush). Nothing is written then.
    fn catch_up(&mut self, table: &mut EmbeddingTable, rows: &[usize]) -> Result<()> {
        let _ = (table, rows);
        Ok(())
    }

    /// Whether some rows may lag behind (see [`catch_up`](Self::catch_up)),
    /// so a caller can skip collecting rows to catch up when none can lag.
    /// The provided method says `false`, matching the provided `catch_up`.
    fn has_lagging_rows(&self) -> bool {
        false
    }

    /// A copy of the whole optimizer state (config, step counter, state
    /// arrays without their padding, per-row last steps), for a checkpoint.
    ///
    /// Under [`Semantics::DenseExact`] rows may lag behind; the copy records
    /// how far, so [`load_state`](Self::load_state) resumes bit for bit.
    /// Call [`flush`](Self::flush) first to save every row current.
    fn state(&self) -> OptimizerState;

    /// Replaces the whole optimizer (config and state) with `state`, as
    /// exported by [`state`](Self::state) of the same kind of optimizer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if `state.kind`
    /// is not this optimizer's, a config field is missing, unknown or
    /// invalid, or the step counters are inconsistent;
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) if an array's
    /// shape or length is wrong; [`Error::NonFinite`](crate::Error::NonFinite)
    /// for a NaN or infinite state value; [`Error::Alloc`](crate::Error::Alloc).
    /// On error the optimizer is unchanged.
    fn load_state(&mut self, state: OptimizerState) -> Result<()>;
}

/// A boxed optimizer is an optimizer, so the choice can be made at run time
/// (`Embedding<Box<dyn SparseOptimizer>>`).
impl<O: SparseOptimizer + ?Sized> SparseOptimizer for Box<O> {
    fn step(&mut self, table: &mut EmbeddingTable, grad: &SparseGrad) -> Result<()> {
        (**self).step(table, grad)
    }
    fn flush(&mut self, table: &mut EmbeddingTable) -> Result<()> {
        (**self).flush(table)
    }
    fn catch_up(&mut self, table: &mut EmbeddingTable, rows: &[usize]) -> Result<()> {
        (**self).catch_up(table, rows)
    }
    fn has_lagging_rows(&self) -> bool {
        (**self).has_lagging_rows()
    }
    fn state(&self) -> OptimizerState {
        (**self).state()
    }
    fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        (**self).load_state(state)
    }
}

/// Where ε goes in the denominator of RMSprop and Adagrad.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EpsPlacement {
    /// `√(x + ε)`: Keras 3 and TensorFlow.
    #[default]
    InsideSqrt,
    /// `√x + ε`: PyTorch and FBGEMM.
    OutsideSqrt,
}

/// What happens to the rows absent from a batch (see the [module docs](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Semantics {
    /// Absent rows and their state stay bit for bit as they are (TensorFlow
    /// sparse ops, PyTorch sparse optimizers, FBGEMM).
    #[default]
    Lazy,
    /// The result equals the dense optimizer run on the dense gradient
    /// every step (Keras 3): absent rows catch up the zero-gradient steps
    /// they missed, in closed form, when next touched or flushed.
    DenseExact,
}

/// The whole state of an optimizer, for checkpoints.
///
/// Everything is plain data so that a checkpoint writer can store it in any
/// format:
///
/// - `kind`: `"sgd"`, `"rmsprop"`, `"adagrad"` or `"rowwise_adagrad"`.
/// - `config`: every config field by its Rust name, as `f64` (an `f32`
///   converts exactly). Booleans are `0` or `1`; [`EpsPlacement`] is `0`
///   for `InsideSqrt`, `1` for `OutsideSqrt`; [`Semantics`] is `0` for
///   `Lazy`, `1` for `DenseExact`; [`SgdStyle`] is `0` for `Keras`, `1`
///   for `Torch`.
/// - `steps`: steps taken so far, empty ones included.
/// - `shape`: `(rows, dim)` of the table the state belongs to, `None`
///   before the first step.
/// - `arrays`: the state arrays by name, row-major without padding:
///   shape `[rows, dim]`, or `[rows]` for row-wise Adagrad. Which arrays
///   exist depends on the config (see each optimizer).
/// - `last_step`: under [`Semantics::DenseExact`], for each row the number
///   of steps it has seen (row `r` lags `steps - last_step[r]` steps);
///   empty otherwise.
///
/// # Examples
/// ```
/// use embtable::{EmbeddingTable, SparseGrad, SparseOptimizer, Sgd, SgdConfig};
/// let mut table = EmbeddingTable::from_rows(2, 1, &[1., 2.])?;
/// let mut grad = SparseGrad::new(1);
/// grad.accumulate_lookup(&[1u32], &[1.0])?;
/// let mut opt = Sgd::new(SgdConfig { momentum: 0.9, ..SgdConfig::default() });
/// opt.step(&mut table, &grad)?;
///
/// let saved = opt.state();
/// assert_eq!((saved.kind.as_str(), saved.steps, saved.shape), ("sgd", 1, Some((2, 1))));
/// assert_eq!(saved.arrays[0].name, "momentum");
/// assert_eq!(saved.arrays[0].values, [0.0, -0.01]); // v = μ·0 − η·g
///
/// let mut resumed = Sgd::default(); // config comes from the state
/// resumed.load_state(saved)?;
/// assert_eq!(resumed.config().momentum, 0.9);
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    /// Which optimizer: `"sgd"`, `"rmsprop"`, `"adagrad"` or `"rowwise_adagrad"`.
    pub kind: String,
    /// Every config field by name, as `f64` (see the type docs for the encoding).
    pub config: Vec<(String, f64)>,
    /// Steps taken so far.
    pub steps: u64,
    /// `(rows, dim)` of the table the state belongs to; `None` before the first step.
    pub shape: Option<(usize, usize)>,
    /// The state arrays, unpadded.
    pub arrays: Vec<StateArray>,
    /// Under [`Semantics::DenseExact`], steps seen by each row; else empty.
    pub last_step: Vec<u64>,
}

/// One named state array of an [`OptimizerState`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateArray {
    /// The array's name, e.g. `"accumulator"`.
    pub name: String,
    /// `[rows, dim]`, or `[rows]` for per-row state.
    pub shape: Vec<usize>,
    /// Row-major values, `shape.iter().product()` of them.
    pub values: Vec<f32>,
}
