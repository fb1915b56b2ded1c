//! Sparse optimizers: SGD, RMSprop, Adagrad, row-wise Adagrad, Adam,
//! AdamW and FTRL, with Keras 3's and PyTorch's formulas and defaults;
//! learning-rate changes and schedules; gradient clipping.
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
//! | [`Adagrad`] | `accumulator` | a += g²; w −= ηₜg/√(a+ε) (or ηₜg/(√a+ε)) |
//! | [`RowWiseAdagrad`] | one float per row | h += mean(g²); w −= η/(√h+ε) · g |
//! | [`Adam`], [`AdamW`] | `momentum`, `velocity`, [`velocity_hat`] | m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²; w −= η·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v+ε), see [`AdamStyle`] |
//! | [`Ftrl`] | `accumulator`, `linear` | Keras' FTRL-Proximal, see [`Ftrl`] |
//!
//! Each config's `::keras()` (its `Default`) and `::torch()` presets give
//! that framework's defaults and numbers, `::keras_lazy()` Keras' formulas
//! with lazy semantics (TensorFlow's sparse ops), and
//! [`AdamConfig::torch_sparse`] PyTorch's `SparseAdam`. Weight decay in
//! SGD's Torch style, RMSprop, Adagrad and Adam's PyTorch styles is
//! PyTorch's coupled form (`g += λ·w`); Keras' `weight_decay` (and AdamW's)
//! is decoupled (`w −= ηλ·w`).
//!
//! # Semantics
//!
//! [`Semantics::Lazy`] leaves the rows absent from a batch, and their
//! state, bit for bit as they were: TensorFlow's sparse ops, PyTorch's
//! `SparseAdam` and sparse Adagrad, and FBGEMM work this way.
//!
//! [`Semantics::DenseExact`] gives what the dense optimizer computes when
//! it sees the dense gradient every step (zeros for the absent rows), as
//! Keras 3 does, while the work stays proportional to the batch. Each row
//! remembers the last step it saw; when it is touched again (or on
//! [`SparseOptimizer::flush`] or [`SparseOptimizer::catch_up`]) it catches
//! up the steps it missed, in one of two ways:
//!
//! - Where a step with a zero gradient is a fixed linear map on each
//!   lane's tuple `(weight, state…)` (SGD's momentum and weight decay,
//!   RMSprop's moving averages and momentum), the `k` missed steps are
//!   applied at once as the `k`-th power of that map, computed in `f64` by
//!   repeated squaring once per distinct `k` and applied in `f32`. The
//!   caught-up row equals the dense result up to rounding (one rounding per
//!   product instead of one per missed step).
//! - Where it is not (Adam's `√v`, FTRL's clip, a coupled weight decay's
//!   gradient `λ·w` in an adaptive optimizer), the missed steps are replayed
//!   one by one with a zero gradient and each step's own scalars: bitwise
//!   the dense result, at the cost of one row update per missed step (what
//!   the dense optimizer spends on the row anyway, paid only when the row
//!   is next needed). FTRL without L2 shrinkage replays only the last one:
//!   earlier missed steps leave nothing behind.
//!
//! Adagrad without weight decay, row-wise Adagrad and SGD without momentum
//! or weight decay do nothing to an absent row: both semantics agree for
//! them, and no per-row step counts are kept.
//!
//! # Learning rates
//!
//! [`SparseOptimizer::set_lr`] changes the rate of the next steps;
//! [`SparseOptimizer::set_schedule`] plugs in a [`LrSchedule`]
//! ([`ExponentialDecay`], [`StepLr`], or one of your own) that sets it
//! before each step from the step count. Under `DenseExact`, rows that lag
//! catch up each missed step with the rate that step used. Checkpoints
//! keep the rate (the config's `lr`), the step count and, while rows lag,
//! the earlier rates.
//!
//! # Clipping
//!
//! [`SparseGrad::clip_by_value`], [`SparseGrad::clip_by_row_norm`] and
//! [`SparseGrad::clip_by_global_norm`] (with [`SparseGrad::norm`] for the
//! norms of several tables) clip the gradient before a step, as Keras'
//! `clipvalue` and `global_clipnorm` and PyTorch's `clip_grad_value_` and
//! `clip_grad_norm_` do, each equal to the same operation on the dense
//! gradient.
//!
//! # Numerics
//!
//! Every update is computed with IEEE `f32` add, sub, mul, div, sqrt, min
//! and max, never fused multiply-adds, and lane `j` of a row is computed
//! from lane `j` of its inputs only (row-wise Adagrad's mean is summed in a
//! fixed order of 16 partial sums; FTRL with a power other than −0.5 uses
//! `f32::powf` lane by lane). The results are therefore bitwise the same
//! for every kernel tier and every thread count. Scalars of a step (bias
//! corrections, decayed rates) are computed once per step, in `f32` or
//! `f64` as the framework the formula comes from computes them. Where ε
//! goes is chosen by [`EpsPlacement`] or [`AdamStyle`].
//!
//! Gradients must be finite: a step whose gradient holds a NaN or an
//! infinity (a sum that overflowed) is refused. No step stores a NaN or an
//! infinity: a value that would overflow saturates at `±f32::MAX` (an
//! Adagrad accumulator fed gradients of 1e20, where Keras and PyTorch store
//! `inf`), and the centred RMSprop variance `s − m²`, which rounding can
//! make slightly negative, is clamped at 0 (where Keras and PyTorch take a
//! NaN root). Every state a step produces can therefore be saved and
//! loaded back bit for bit; [`SparseOptimizer::load_state`] refuses values
//! no step produces and an update could not take (non-finite ones, a
//! negative accumulator or second moment). Step counters stop at `i64::MAX`, what a
//! checkpoint stores: the next step is refused.
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
//! # Adding an optimizer
//!
//! One file, `src/optim/<name>.rs`, holds all of it; the engine
//! (`engine.rs`) does validation, state allocation, the parallel walk over
//! rows, the fused `step_lookup`, dense-exact catch-up, learning rates and
//! checkpoints. In that file:
//!
//! 1. A config: a plain struct with `pub` fields named as Keras names the
//!    options (`lr` first), `Default` (= `keras()`), presets, and
//!    `validate()` that names the field and value it refuses.
//! 2. The optimizer: `pub struct Name { config: NameConfig, core: Core }`
//!    with its docs (formulas, state arrays, example), then
//!    `super::sparse_optimizer!(Name, NameConfig);`, which implements
//!    [`SparseOptimizer`], `new` and `config`.
//! 3. `impl Config for NameConfig`: its `KIND` (the checkpoint's name),
//!    `fields` (every field, once, by its saved name: the list the
//!    checkpoint encoding and the import are made from), `check`, `lr_mut`,
//!    `semantics`, and `rule()`.
//! 4. The rule: `impl Rule` with its state arrays (name, start, least
//!    value a saved state may hold), `missed()` (`Nothing`, `Linear` with `zero_grad_map`, or
//!    `Replay`), `step(t, lr)` for the scalars
//!    of step `t`, and `update`, the maths of one lane written once over
//!    [`Simd`](crate::kernels::Simd) inside `map_vectors`, every stored
//!    value through `saturate`. Keep the compiled variants few: branch on
//!    a setting outside the loop (a const parameter) only where the
//!    benchmarks show it pays.
//!
//! Then: `mod`/`pub use` lines here and the re-export in `lib.rs`; the
//! optimizer's dense formula in the tests' reference
//! (`tests/common/optim.rs`: `Cfg`, a strategy, `Dense::step`, and an
//! entry in `every_kind`); its row in this module's table, in
//! [`OptimizerState`]'s kinds, in the checkpoint docs and in the README;
//! and, if it has a framework counterpart, a case in
//! `scripts/make_optim_trajectories.py`.
//!
//! [`grad_avg`]: RmsPropConfig::centered
//! [`momentum`]: RmsPropConfig::momentum
//! [`velocity_hat`]: AdamConfig::amsgrad
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

/// Implements [`SparseOptimizer`] (and `new`, `config`) for an optimizer
/// struct with fields `config` (its [`engine::Config`]) and `core` (an
/// [`engine::Core`]).
macro_rules! sparse_optimizer {
    ($ty:ident, $config:ty) => {
        impl $ty {
            /// An optimizer with `config` (checked on every step).
            pub fn new(config: $config) -> Self {
                Self {
                    config,
                    core: $crate::optim::engine::Core::default(),
                }
            }

            /// The settings (`lr` is the rate of the last step, or the one
            /// last set with [`set_lr`](crate::SparseOptimizer::set_lr)).
            pub fn config(&self) -> &$config {
                &self.config
            }
        }

        impl $crate::optim::engine::Fused for $ty {
            fn check_lookup(
                &self,
                table: &$crate::EmbeddingTable,
                ids: usize,
                grad_len: usize,
            ) -> $crate::Result<()> {
                self.core.check_lookup(&self.config, table, ids, grad_len)
            }

            fn groups(&mut self) -> &mut $crate::optim::groups::Groups {
                self.core.groups()
            }

            fn step_grouped(
                &mut self,
                table: &mut $crate::EmbeddingTable,
                grad_out: &[f32],
                check: $crate::optim::engine::Check,
                fresh: $crate::optim::engine::Fresh<'_>,
            ) -> $crate::Result<bool> {
                self.core
                    .step_grouped(&mut self.config, table, grad_out, check, fresh)
            }

            fn step_rows(
                &mut self,
                table: &mut $crate::EmbeddingTable,
                rows: &[usize],
                grads: &dyn $crate::optim::RowGradients,
            ) -> $crate::Result<()> {
                self.core.step_rows(&mut self.config, table, rows, grads)
            }
        }

        impl $crate::optim::SparseOptimizer for $ty {
            fn step(
                &mut self,
                table: &mut $crate::EmbeddingTable,
                grad: &$crate::SparseGrad,
            ) -> $crate::Result<()> {
                self.core.step(&mut self.config, table, grad)
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

            fn lr(&self) -> f32 {
                self.core.lr(&self.config)
            }

            fn set_lr(&mut self, lr: f32) -> $crate::Result<()> {
                self.core.set_lr(&mut self.config, lr)
            }

            fn set_schedule(
                &mut self,
                schedule: Option<std::sync::Arc<dyn $crate::optim::LrSchedule>>,
            ) {
                self.core.set_schedule(schedule)
            }

            fn steps(&self) -> u64 {
                self.core.steps()
            }

            fn state(&self) -> $crate::optim::OptimizerState {
                self.core.export(&self.config)
            }

            fn load_state(&mut self, state: $crate::optim::OptimizerState) -> $crate::Result<()> {
                let (config, core) = $crate::optim::engine::Core::import(&state)?;
                let schedule = self.core.take_schedule();
                self.config = config;
                self.core = core;
                self.core.set_schedule(schedule);
                Ok(())
            }

            fn fused(&mut self) -> Option<$crate::optim::engine::FusedStep<'_>> {
                Some($crate::optim::engine::FusedStep(self))
            }

            fn reset_rows(
                &mut self,
                table: &$crate::EmbeddingTable,
                rows: &[usize],
            ) -> $crate::Result<()> {
                self.core.reset_rows(&self.config, table, rows)
            }

            fn state_bytes_per_row(&self, dim: usize) -> usize {
                self.core.state_bytes_per_row(&self.config, dim)
            }
        }
    };
}
use sparse_optimizer;

mod adagrad;
mod adam;
mod adamw;
mod clip;
mod config;
pub(crate) mod engine;
mod ftrl;
mod groups;
mod linear;
mod rmsprop;
mod rowwise_adagrad;
mod schedule;
mod sgd;

pub use adagrad::{Adagrad, AdagradConfig};
pub use adam::{Adam, AdamConfig, AdamStyle};
pub use adamw::{AdamW, AdamWConfig};
pub use ftrl::{Ftrl, FtrlConfig};
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use rowwise_adagrad::{RowWiseAdagrad, RowWiseAdagradConfig};
pub use schedule::{ExponentialDecay, LrSchedule, StepLr};
pub use sgd::{Sgd, SgdConfig, SgdStyle};

use std::sync::Arc;

use crate::{EmbeddingTable, Index, Result, SparseGrad};

/// An optimizer that updates the rows of a table named by a sparse gradient.
///
/// Implemented by [`Sgd`], [`RmsProp`], [`Adagrad`], [`RowWiseAdagrad`],
/// [`Adam`], [`AdamW`] and [`Ftrl`].
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
    /// bit for bit. Every optimizer of this crate fuses the two instead:
    /// each distinct row's gradient is summed (in batch order, as
    /// `SparseGrad` sums it) right before the row is updated, so the
    /// weights and the state are read and written once and no coalesced
    /// gradient is stored. This is the fastest way to train a table whose
    /// gradient comes from one lookup per step. For grouping the ids, the
    /// optimizer keeps 4 bytes per table row and scratch proportional to
    /// the batch (up to 36 bytes an id, 88 when a large batch is grouped on
    /// several threads, and the gradient rows of ids that repeat in the
    /// batch). Only the grouping of the ids is generic over
    /// `I`; the update itself is compiled once, in this crate, so calling
    /// this does not recompile the optimizers in the caller's crate.
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
        engine::step_lookup(self, table, ids, grad_out, engine::Finite::Check)
    }

    /// [`step_lookup`](Self::step_lookup) for a caller that guarantees that
    /// every value of `grad_out` is finite, as PyTorch, TensorFlow and
    /// FBGEMM assume of every gradient: it skips the pass that checks
    /// `grad_out` before anything is written, a full read of it that the
    /// update then repeats (on the W5 workload of 262,144 ids × 128 on two
    /// cores, about a fifth of an SGD step).
    ///
    /// If the promise is broken, nothing unsafe happens, but the step is
    /// not refused: a row whose gradient holds a NaN or an infinity, or
    /// sums of huge values that overflow, gets meaningless weights and
    /// state (saturated at `±f32::MAX`, never NaN or infinite, as every
    /// value a step stores); other rows are updated as usual. An optimizer
    /// without a fused step (not one of this crate's) checks anyway.
    ///
    /// # Errors
    /// As [`step_lookup`](Self::step_lookup), without
    /// [`Error::NonFinite`](crate::Error::NonFinite) from this crate's
    /// optimizers.
    ///
    /// # Examples
    /// ```
    /// use embtable::{EmbeddingTable, SparseOptimizer, Sgd, SgdConfig};
    /// let mut table = EmbeddingTable::from_rows(3, 2, &[1., 1., 2., 2., 3., 3.])?;
    /// let mut sgd = Sgd::new(SgdConfig { lr: 0.5, ..SgdConfig::default() });
    /// // A gradient from a loss known to be finite (it was checked upstream).
    /// sgd.step_lookup_finite(&mut table, &[2u32, 0, 2], &[1., 2., 0., 0., 3., 4.])?;
    /// assert_eq!(table.to_vec(), [1., 1., 2., 2., 1., 0.]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    fn step_lookup_finite<I: Index>(
        &mut self,
        table: &mut EmbeddingTable,
        ids: &[I],
        grad_out: &[f32],
    ) -> Result<()>
    where
        Self: Sized,
    {
        engine::step_lookup(self, table, ids, grad_out, engine::Finite::Trusted)
    }

    /// One step whose gradient has the distinct `rows`, the gradient of
    /// each the sum of its parts in `grads`: the same, bit for bit, as
    ///
    /// ```text
    /// let mut grad = SparseGrad::for_table(table);
    /// for r in rows, for k in 0..grads.parts(), if let Some(g) = grads.part(r, k):
    ///     grad.accumulate_lookup(&[r], g)?
    /// self.step(table, &grad)
    /// ```
    ///
    /// for a caller that guarantees finite gradient values, as
    /// [`step_lookup_finite`](Self::step_lookup_finite) does (a broken
    /// promise gives saturated rows, never an error or NaN weights). For a
    /// gradient that is a sum of parts held elsewhere (per-thread
    /// gradients, say): this crate's optimizers ask `grads` for a row's
    /// parts on the thread that updates it, right before the update, and
    /// sum them in registers, so no summed gradient is stored or copied.
    /// `grads` is asked from several threads at once. An optimizer of
    /// another crate stores the gradient and calls [`step`](Self::step)
    /// (which checks it).
    ///
    /// # Errors
    /// As [`step`](Self::step), without
    /// [`Error::NonFinite`](crate::Error::NonFinite) from this crate's
    /// optimizers; [`Error::IndexOutOfRange`](crate::Error::IndexOutOfRange)
    /// names the first row `>= table.rows()` (`position` in `rows`), and
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) the first row
    /// that repeats an earlier one (field `rows`), then the first part that
    /// is not `table.dim()` floats long (field `grads`), each with its
    /// position. These are checked before anything is written.
    ///
    /// # Examples
    /// ```
    /// use embtable::{EmbeddingTable, RowGradients, SparseOptimizer, Sgd, SgdConfig};
    /// // Two workers' gradients of a 2-float table, summed row by row.
    /// struct Parts([[f32; 6]; 2]);
    /// impl RowGradients for Parts {
    ///     fn parts(&self) -> usize {
    ///         2
    ///     }
    ///     fn part(&self, row: usize, k: usize) -> Option<&[f32]> {
    ///         Some(&self.0[k][2 * row..2 * row + 2])
    ///     }
    /// }
    /// let parts = Parts([[1., 2., 0., 0., 3., 4.], [1., 0., 0., 0., 1., 0.]]);
    /// let mut table = EmbeddingTable::from_rows(3, 2, &[1., 1., 2., 2., 3., 3.])?;
    /// let mut sgd = Sgd::new(SgdConfig { lr: 0.5, ..SgdConfig::default() });
    /// sgd.step_rows_finite(&mut table, &[2, 0], &parts)?;
    /// assert_eq!(table.to_vec(), [0., 0., 2., 2., 1., 1.]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    fn step_rows_finite(
        &mut self,
        table: &mut EmbeddingTable,
        rows: &[usize],
        grads: &dyn RowGradients,
    ) -> Result<()> {
        if let Some(engine::FusedStep(fused)) = self.fused() {
            return fused.step_rows(table, rows, grads);
        }
        engine::check_row_step(rows, table, grads, &mut Vec::new())?;
        let dim = table.dim();
        let len = crate::Error::checked_product(rows.len(), dim, "gradient rows")?;
        let mut written = Vec::new();
        written
            .try_reserve_exact(len)
            .map_err(|_| crate::Error::Alloc {
                what: "gradient rows",
                bytes: len.saturating_mul(4),
            })?;
        written.resize(len, 0.0);
        if dim > 0 {
            for (&r, into) in rows.iter().zip(written.chunks_exact_mut(dim)) {
                for part in (0..grads.parts()).filter_map(|k| grads.part(r, k)) {
                    assert_eq!(part.len(), dim, "a part of row {r}: its length");
                    for (sum, g) in into.iter_mut().zip(part) {
                        *sum += g;
                    }
                }
            }
        }
        let mut grad = SparseGrad::for_table(table);
        grad.accumulate_lookup(rows, &written)?;
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

    /// The learning rate the next step will use: the schedule's, if one is
    /// set, else the config's `lr`.
    fn lr(&self) -> f32;

    /// Sets the learning rate of the next steps (the config's `lr`), as
    /// Keras' `optimizer.learning_rate = x` or a PyTorch scheduler does.
    ///
    /// Under [`Semantics::DenseExact`], rows that lag behind still catch up
    /// the steps they missed with the rate those steps used: the optimizer
    /// keeps the earlier rates (a few bytes per change, saved in
    /// [`OptimizerState::lr_history`]) until [`flush`](Self::flush) brings
    /// every row current. A schedule set with
    /// [`set_schedule`](Self::set_schedule) overrides this at the next step.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) (field `lr`,
    /// or another field the rate is checked with, as `weight_decay` for
    /// `lr * weight_decay < 1`) if the config with this rate is invalid;
    /// nothing changes then.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Adagrad, AdagradConfig, SparseOptimizer};
    /// let mut opt = Adagrad::new(AdagradConfig::torch());
    /// opt.set_lr(0.5)?;
    /// assert_eq!((opt.lr(), opt.config().lr), (0.5, 0.5));
    /// assert!(opt.set_lr(-1.0).is_err());
    /// assert_eq!(opt.lr(), 0.5);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    fn set_lr(&mut self, lr: f32) -> Result<()>;

    /// Plugs in a learning-rate schedule (see [`LrSchedule`]), or removes it
    /// with `None`: before each step the rate becomes `schedule.lr(steps)`,
    /// as if set with [`set_lr`](Self::set_lr). Kept across
    /// [`load_state`](Self::load_state).
    fn set_schedule(&mut self, schedule: Option<Arc<dyn LrSchedule>>);

    /// Steps taken so far (empty ones included), as Keras'
    /// `optimizer.iterations`.
    fn steps(&self) -> u64;

    /// The fused [`step_lookup`](Self::step_lookup) of the optimizers of
    /// this crate; `None` for others.
    #[doc(hidden)]
    fn fused(&mut self) -> Option<engine::FusedStep<'_>> {
        None
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

    /// Starts `rows` of `table` afresh: their state goes back to its
    /// initial values and, under [`Semantics::DenseExact`], they count as
    /// current (they missed no step). If `table` has more rows than the
    /// state (it grew), the state grows with it, the new rows fresh. Other
    /// rows keep their state bit for bit. Before the first step there is
    /// no state, and nothing to do.
    ///
    /// A table whose rows change meaning calls this: the
    /// [`DynamicTable`](crate::dynamic::DynamicTable) gives a row freed by
    /// an evicted key to a new key, whose training starts from nothing.
    ///
    /// The provided method accepts an optimizer whose
    /// [`state`](Self::state) holds no arrays and no step counts (nothing
    /// to reset) and refuses any other: an optimizer of another crate that
    /// keeps per-row state must implement this to serve a dynamic table.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`](crate::Error::IndexOutOfRange) for a row
    /// `>= table.rows()` (`position` in `rows`);
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) if the state
    /// belongs to a table of another dim or of more rows;
    /// [`Error::Alloc`](crate::Error::Alloc) if the grown state does not
    /// fit; [`Error::InvalidConfig`](crate::Error::InvalidConfig) (field
    /// `optimizer`) from the provided method. Nothing changes on error.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Adagrad, AdagradConfig, EmbeddingTable, SparseGrad, SparseOptimizer};
    /// let mut table = EmbeddingTable::zeros(2, 1)?;
    /// let mut opt = Adagrad::new(AdagradConfig { initial_accumulator_value: 0.5, ..AdagradConfig::keras() });
    /// let mut grad = SparseGrad::new(1);
    /// grad.accumulate_lookup(&[0u32, 1], &[1.0, 2.0])?;
    /// opt.step(&mut table, &grad)?;
    /// opt.reset_rows(&table, &[1])?;
    /// assert_eq!(opt.state().arrays[0].values, [1.5, 0.5]); // row 1 starts again from 0.5
    /// # Ok::<(), embtable::Error>(())
    /// ```
    fn reset_rows(&mut self, table: &EmbeddingTable, rows: &[usize]) -> Result<()> {
        let _ = table;
        let state = self.state();
        if rows.is_empty() || (state.arrays.is_empty() && state.last_step.is_empty()) {
            return Ok(());
        }
        Err(crate::Error::InvalidConfig {
            field: "optimizer",
            reason: format!(
                "optimizer {:?} keeps per-row state but does not implement reset_rows, which a \
                 table that reuses rows needs",
                state.kind
            ),
        })
    }

    /// Bytes of state this optimizer keeps per table row of `dim` floats
    /// once it has stepped (state arrays, per-row step counts, scratch
    /// sized by the table), so a memory bound can count them: Adagrad on
    /// rows of 128 floats keeps 516 (a 512-byte accumulator row and 4
    /// bytes of `step_lookup` grouping). The provided method says 0.
    fn state_bytes_per_row(&self, dim: usize) -> usize {
        let _ = dim;
        0
    }
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
    fn lr(&self) -> f32 {
        (**self).lr()
    }
    fn set_lr(&mut self, lr: f32) -> Result<()> {
        (**self).set_lr(lr)
    }
    fn set_schedule(&mut self, schedule: Option<Arc<dyn LrSchedule>>) {
        (**self).set_schedule(schedule)
    }
    fn steps(&self) -> u64 {
        (**self).steps()
    }
    fn fused(&mut self) -> Option<engine::FusedStep<'_>> {
        (**self).fused()
    }
    fn reset_rows(&mut self, table: &EmbeddingTable, rows: &[usize]) -> Result<()> {
        (**self).reset_rows(table, rows)
    }
    fn state_bytes_per_row(&self, dim: usize) -> usize {
        (**self).state_bytes_per_row(dim)
    }
}

/// The gradient of a step given row by row, for
/// [`SparseOptimizer::step_rows_finite`]: each row's gradient is the sum of
/// up to [`parts`](Self::parts) rows held by the caller (per-thread
/// gradients, say), asked for by the thread that updates the row, right
/// before the update.
pub trait RowGradients: Sync {
    /// How many parts a row's gradient is summed from.
    fn parts(&self) -> usize;

    /// Part `k` (below [`parts`](Self::parts)) of the gradient of table
    /// row `row`: `dim` floats, or `None` where that part holds nothing
    /// for the row. The step refuses a part of another length before it
    /// writes anything, and panics if a later call gives another length.
    fn part(&self, row: usize, k: usize) -> Option<&[f32]>;

    /// Starts loading what [`part`](Self::part) of `row` will read: the
    /// step calls it a few rows ahead. The provided method does nothing.
    fn prefetch(&self, row: usize) {
        let _ = row;
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
/// - `kind`: `"sgd"`, `"rmsprop"`, `"adagrad"`, `"rowwise_adagrad"`, `"adam"`,
///   `"adamw"` or `"ftrl"`.
/// - `config`: every config field by its Rust name, as `f64` (an `f32`
///   converts exactly). Booleans are `0` or `1`; [`EpsPlacement`] is `0`
///   for `InsideSqrt`, `1` for `OutsideSqrt`; [`Semantics`] is `0` for
///   `Lazy`, `1` for `DenseExact`; [`SgdStyle`] is `0` for `Keras`, `1`
///   for `Torch`; [`AdamStyle`] is `0` for `Keras`, `1` for `Torch`, `2`
///   for `TorchSparse`. The current learning rate is `lr`.
/// - `steps`: steps taken so far, empty ones included.
/// - `shape`: `(rows, dim)` of the table the state belongs to, `None`
///   before the first step.
/// - `arrays`: the state arrays by name, row-major without padding:
///   shape `[rows, dim]`, or `[rows]` for row-wise Adagrad. Which arrays
///   exist depends on the config (see each optimizer).
/// - `last_step`: under [`Semantics::DenseExact`], for each row the number
///   of steps it has seen (row `r` lags `steps - last_step[r]` steps);
///   empty otherwise (and where absent rows never change).
/// - `lr_history`: the earlier learning rates lagging rows will catch up
///   with (see the field).
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
    /// Which optimizer: `"sgd"`, `"rmsprop"`, `"adagrad"`, `"rowwise_adagrad"`,
    /// `"adam"`, `"adamw"` or `"ftrl"`.
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
    /// Under [`Semantics::DenseExact`], the learning rates that rows still
    /// lagging behind will catch up with: `(until, lr)` pairs, increasing
    /// in `until`, meaning that the steps from the previous `until` (or 0)
    /// to `until` used `lr`; steps after the last used the config's `lr`.
    /// Empty unless the rate changed while rows lagged (see
    /// [`SparseOptimizer::set_lr`]).
    pub lr_history: Vec<(u64, f32)>,
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
