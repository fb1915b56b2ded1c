//! What every optimizer shares: validation, the state tables, the
//! parallel walk over the rows of a batch, the `DenseExact` catch-up, the
//! learning rate and its history, and the state export.
//!
//! An optimizer is a config plus a [`Core`]. The config describes the
//! update as a [`Rule`]: which state arrays it keeps, the scalars of step
//! `t`, how a row catches up the steps it missed, and the update of one
//! row, written once over [`Simd`]. The core does the rest:
//!
//! ```text
//! step(table, grad):
//!     lr = schedule(steps) or the config's; validate config, shapes, rows,   (nothing written yet)
//!          gradient finite
//!     allocate the state on the first step
//!     scalars of this step: rule.step(steps + 1, lr)
//!     DenseExact: for each grad row r: missed steps last[r]..steps; last[r] = steps + 1
//!     for each grad row r, in parallel (each row by exactly one task):
//!         catch up its missed steps (a linear map's power, or a replay); apply the update
//!     steps += 1
//! ```
//!
//! Only the grouping of a lookup's ids ([`step_lookup`]) is generic over
//! the id type: everything after it is compiled once, in this crate, for
//! each optimizer, so a crate calling `step_lookup` does not compile the
//! update paths again.

use std::marker::PhantomData;
use std::sync::Arc;

use hashbrown::HashMap;
use rayon::prelude::*;

use super::config::{Export, Import, Names, Visit as VisitFields};
use super::groups::Groups;
use super::linear::{Coefs, Map};
use super::{LrSchedule, OptimizerState, Semantics, SparseOptimizer, StateArray};
use crate::aligned::{AlignedBuf, LANES_PER_LINE, SendPtr};
use crate::grad::ScanPart;
use crate::index::Index;
use crate::kernels::{self, BLOCK_VECTORS, Kernel, Simd, Tier};
use crate::parallel::PARALLEL_MIN_FLOATS;
use crate::phases::time;
use crate::{EmbeddingTable, Error, Result, SparseGrad};

/// Floats (weights and state) per parallel task.
const TASK_FLOATS: usize = kernels::parallel_size(1 << 15);

/// Rows prefetched ahead of the one being updated: rows are scattered over
/// the table, and each costs a DRAM round trip without a prefetch. They
/// are prefetched into L2, not L1: on the 2-core Zen 4 of WORKLOADS.md
/// that made the fused W5 SGD step 1.3x faster (L1 prefetches of 8 rows
/// of 8 lines fill the L1's few miss buffers and stall); distances of 4
/// to 64 rows all measured the same.
const PREFETCH_AHEAD: usize = 8;

/// "No catch-up needed" in a row's catch-up plan.
const CURRENT: u64 = u64::MAX;

/// Steps an optimizer may take: the counters are saved as `i64` in
/// checkpoints, and a step beyond this is refused.
pub(crate) const MAX_STEPS: u64 = i64::MAX as u64;

/// Replayed steps whose scalars are computed once per call and shared by
/// all rows; the scalars of steps further back are computed per row.
const REPLAY_TABLE: u64 = 4096;

/// One state array of a rule: its name, initial value and least value.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StateSpec {
    /// The name in an [`OptimizerState`].
    pub(crate) name: &'static str,
    /// Every real lane starts at this value.
    pub(crate) init: f32,
    /// The least value a state may hold (0 for accumulators and second
    /// moments, whose roots the updates take); a saved state below it is
    /// refused.
    pub(crate) min: f32,
}

impl StateSpec {
    /// An array of any finite values, starting at 0 (momenta, averages).
    pub(crate) const fn signed(name: &'static str) -> Self {
        Self {
            name,
            init: 0.0,
            min: f32::MIN,
        }
    }

    /// An array of values at least `min`, starting at `init`.
    pub(crate) const fn at_least(name: &'static str, init: f32, min: f32) -> Self {
        Self { name, init, min }
    }
}

/// How a row that missed steps catches up under `Semantics::DenseExact`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Missed {
    /// A step with a zero gradient changes nothing (Adagrad, plain SGD):
    /// both semantics agree, and no per-row step counts are kept.
    Nothing,
    /// A zero-gradient step is the linear map [`Rule::zero_grad_map`]:
    /// `k` missed steps are its `k`-th power, applied once.
    Linear,
    /// A zero-gradient step is not linear (Adam's `√v`, FTRL's clip): the
    /// missed steps are replayed one by one with a zero gradient, which is
    /// bitwise what the dense optimizer computes. `Some(n)`: only the last
    /// `n` missed steps can change the row (earlier ones are overwritten).
    Replay(Option<u64>),
}

/// The update of one optimizer, as its core needs it.
pub(crate) trait Rule: Sync {
    /// The scalars of one step (bias corrections, the decayed learning
    /// rate…), computed once per step, not per lane.
    type Step: Copy + Send + Sync;

    /// The state arrays, in tuple order after the weight.
    fn arrays(&self) -> &[StateSpec];

    /// Whether the state arrays hold one float per row (else one per lane).
    fn per_row(&self) -> bool {
        false
    }

    /// How missed steps are caught up under `DenseExact`.
    fn missed(&self) -> Missed;

    /// Under [`Missed::Linear`], the zero-gradient step with learning rate
    /// `lr` on a lane's `(weight, state…)` tuple.
    fn zero_grad_map(&self, lr: f32) -> Map {
        let _ = lr;
        Map::identity(1 + self.arrays().len())
    }

    /// The scalars of step number `t` (the first step is 1) at learning rate `lr`.
    fn step(&self, t: u64, lr: f32) -> Self::Step;

    /// Updates one row (its weights, then its state arrays, from `rows`;
    /// all padded rows of `stride` floats, or one float for per-row state)
    /// with its summed gradient `g` (read a block at a time, pad lanes
    /// zero) and the step's scalars; the row has `dim` real lanes.
    ///
    /// Implementations must map zero pads (weight, state, gradient) to zero
    /// pads, compute lane `j` from lane `j` only (a reduction over the row,
    /// as row-wise Adagrad takes, must use a fixed order), and store only
    /// finite values ([`saturate`]).
    fn update<S: Simd>(
        &self,
        s: S,
        step: &Self::Step,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
        dim: usize,
    );
}

/// `x` with infinities (and NaN) brought to `±f32::MAX`: every value an
/// update stores goes through this, so no step ever stores a non-finite
/// weight or state value. A finite `x` is returned bit for bit.
#[inline(always)]
pub(crate) fn saturate<S: Simd>(s: S, x: S::V) -> S::V {
    s.min(s.max(x, s.splat(f32::MIN)), s.splat(f32::MAX))
}

/// [`saturate`] for values that are never negative (accumulators, second
/// moments): one comparison.
#[inline(always)]
pub(crate) fn saturate_up<S: Simd>(s: S, x: S::V) -> S::V {
    s.min(x, s.splat(f32::MAX))
}

/// The rows that one visited row owns in the weights and in each state
/// array, for its rule to [`take`](Self::take).
pub(crate) struct RowSet<'a> {
    bufs: &'a [DisjointRows<'a>],
    row: usize,
}

impl<'a> RowSet<'a> {
    /// The row in the weights and the first `K - 1` state arrays (`K` is
    /// the rule's count: every array it keeps).
    ///
    /// The rule knows `K` at compile time where the visit does not: taking
    /// the rows there, not in a loop over the arrays in the visit, made the
    /// W5 steps 3-6% faster on one thread.
    #[inline(always)]
    pub(crate) fn take<const K: usize>(self) -> [&'a mut [f32]; K] {
        debug_assert_eq!(K, self.bufs.len());
        let bufs = &self.bufs[..K];
        // SAFETY: `row < rows` of every buffer and no other reference to
        // it is alive: [`Visit`] makes one `RowSet` per row it owns at a
        // time, and `take` consumes it.
        std::array::from_fn(|k| unsafe { bufs[k].row(self.row) })
    }
}

/// The summed gradient of the row being updated, read a block of vectors
/// at a time.
///
/// The sum is formed as each block is read, in registers: a row with
/// repeated ids is never summed into memory first (summing into a scratch
/// row and reading it back made the W5 update 1.2x slower).
pub(crate) trait GradRow<S: Simd> {
    /// Lanes `i..i + V * S::N` as `V` vectors (`i` a multiple of `S::N`,
    /// the block inside the row's stride); pad lanes are zero. Reading a
    /// lane twice gives the same bits.
    fn block<const V: usize>(&self, s: S, i: usize) -> [S::V; V];
}

/// `0 + first + later[0] + later[1] + … + more[0] + more[1] + …`, lane by
/// lane: `first` and each of `more` hold the row's `dim` real lanes (or a
/// whole padded row), `later` whole padded rows of `stride` floats. This
/// is bitwise what [`SparseGrad`] stores, whose slot starts at `+0.0` (so
/// a `-0.0` sum comes out `+0.0` in both) and adds `1 · g` (`1 · x == x`).
///
/// The one gradient every update reads (a stored slot, a lookup's grouped
/// rows, a caller's parts, a replayed step's zero row), so that each
/// rule's update is compiled once per tier and setting.
#[derive(Clone, Copy)]
pub(crate) struct GradSum<'a> {
    first: &'a [f32],
    later: &'a [f32],
    stride: usize,
    more: &'a [&'a [f32]],
}

impl<'a> GradSum<'a> {
    /// The sum of `first` and the padded rows of `later`.
    pub(crate) fn new(first: &'a [f32], later: &'a [f32], stride: usize) -> Self {
        Self {
            first,
            later,
            stride,
            more: &[],
        }
    }

    /// The sum of `first` and the rows of `more` (each as long as `first`).
    fn parts(first: &'a [f32], more: &'a [&'a [f32]]) -> Self {
        Self {
            first,
            later: &[],
            stride: first.len(),
            more,
        }
    }
}

/// Vectors `i..i + V * S::N` of `row`'s real lanes, zero past them.
#[inline(always)]
fn load_real<S: Simd, const V: usize>(s: S, row: &[f32], i: usize) -> [S::V; V] {
    let (dim, zero) = (row.len(), s.splat(0.0));
    let mut out = [zero; V];
    if i + V * S::N <= dim {
        let row = &row[i..i + V * S::N];
        for (v, out) in out.iter_mut().enumerate() {
            *out = s.load(&row[v * S::N..]);
        }
    } else {
        // The block holding the row's last real lane (and pads).
        for (v, out) in out.iter_mut().enumerate() {
            let at = i + v * S::N;
            if at + S::N <= dim {
                *out = s.load(&row[at..]);
            } else if at < dim {
                *out = s.load_partial(&row[at..]);
            }
        }
    }
    out
}

impl<S: Simd> GradRow<S> for GradSum<'_> {
    #[inline(always)]
    fn block<const V: usize>(&self, s: S, i: usize) -> [S::V; V] {
        let zero = s.splat(0.0);
        let mut sum = load_real::<S, V>(s, self.first, i);
        for sum in &mut sum {
            *sum = s.add(zero, *sum);
        }
        for row in self.later.chunks_exact(self.stride) {
            let later = &row[i..i + V * S::N];
            for (v, sum) in sum.iter_mut().enumerate() {
                *sum = s.add(*sum, s.load(&later[v * S::N..]));
            }
        }
        for row in self.more {
            let more = load_real::<S, V>(s, row, i);
            for (sum, x) in sum.iter_mut().zip(more) {
                *sum = s.add(*sum, x);
            }
        }
        sum
    }
}

/// Replaces every vector `i` of `K` padded rows of equal length (`xs`:
/// the weights, then the rule's per-lane state) with
/// `f([xs[0][i], …, xs[K-1][i]], g[i])`, where `g[i]` is the gradient's.
///
/// Rows go in fully unrolled blocks of up to [`BLOCK_VECTORS`] vectors
/// (half that with more than two rows, so a block's `K + 1` vectors per
/// lane stay in registers): every load of a block is issued before its
/// first store. Against a loop of one vector at a time over a row length
/// known only at run time, this made the W5 steps faster on one thread:
/// Adagrad 1.08x, row-wise Adagrad 1.13x, RMSprop 1.07x (SGD the same).
///
/// The blocks are filled by plain loops, not `std::array::from_fn`: that
/// one was not inlined into the tier's `#[target_feature]` body, so every
/// load became a call (W5 SGD 1.6x slower).
#[inline(always)]
pub(crate) fn map_vectors<S: Simd, const K: usize>(
    s: S,
    mut xs: [&mut [f32]; K],
    g: &impl GradRow<S>,
    mut f: impl FnMut([S::V; K], S::V) -> [S::V; K],
) {
    let len = xs[0].len();
    debug_assert!(len.is_multiple_of(S::N) && xs.iter().all(|x| x.len() == len));
    let vectors = len / S::N;
    let widest = if K <= 2 {
        BLOCK_VECTORS
    } else {
        BLOCK_VECTORS / 2
    };
    let mut done = 0;
    while done < vectors {
        let at = done * S::N;
        done += match (vectors - done).min(widest) {
            BLOCK_VECTORS.. => map_block::<S, K, BLOCK_VECTORS>(s, &mut xs, at, g, &mut f),
            4.. => map_block::<S, K, 4>(s, &mut xs, at, g, &mut f),
            2.. => map_block::<S, K, 2>(s, &mut xs, at, g, &mut f),
            _ => map_block::<S, K, 1>(s, &mut xs, at, g, &mut f),
        };
    }
}

/// [`map_vectors`] on the `V` vectors from lane `at`; returns `V`.
#[inline(always)]
fn map_block<S: Simd, const K: usize, const V: usize>(
    s: S,
    xs: &mut [&mut [f32]; K],
    at: usize,
    g: &impl GradRow<S>,
    f: &mut impl FnMut([S::V; K], S::V) -> [S::V; K],
) -> usize {
    // Vector `v` of row `k` is `x[v][k]`.
    let mut x = [[s.splat(0.0); K]; V];
    for (k, row) in xs.iter().enumerate() {
        let row = &row[at..at + V * S::N];
        for (v, x) in x.iter_mut().enumerate() {
            x[k] = s.load(&row[v * S::N..]);
        }
    }
    let gv = g.block::<V>(s, at);
    for (x, gv) in x.iter_mut().zip(gv) {
        *x = f(*x, gv);
    }
    for (k, row) in xs.iter_mut().enumerate() {
        let row = &mut row[at..at + V * S::N];
        for (v, x) in x.iter().enumerate() {
            s.store(x[k], &mut row[v * S::N..]);
        }
    }
    V
}

/// An optimizer config, as the shared code needs it.
pub(crate) trait Config: Copy + Default + std::fmt::Debug {
    /// The rule this config describes.
    type Rule: Rule;
    /// The `kind` of its `OptimizerState`.
    const KIND: &'static str;
    /// Fields added since states of this kind were first saved, with the
    /// value a state saved without them implies, so older checkpoints load.
    const ADDED: &'static [(&'static str, f64)] = &[];
    /// Walks every field, by the name it is saved under: the one place a
    /// config's field names are written.
    fn fields(&mut self, v: &mut impl VisitFields);
    /// Checks every field (the public `validate`).
    fn check(&self) -> Result<()>;
    /// The update rule (the config's constants; the learning rate comes per step).
    fn rule(&self) -> Self::Rule;
    /// The learning rate field.
    fn lr_mut(&mut self) -> &mut f32;
    /// The learning rate.
    fn lr(&self) -> f32 {
        *(*self).clone().lr_mut()
    }
    /// What happens to rows absent from a batch.
    fn semantics(&self) -> Semantics;

    /// The field names, in saved order.
    fn names() -> Vec<&'static str> {
        let mut names = Names::default();
        Self::default().fields(&mut names);
        names.0
    }

    /// Every field, by name, as `f64`.
    fn to_fields(&self) -> Vec<(String, f64)> {
        let mut export = Export::default();
        let mut copy = *self;
        copy.fields(&mut export);
        export.0
    }

    /// The config back from [`to_fields`](Self::to_fields)'s output.
    fn from_fields(saved: &[(String, f64)]) -> Result<Self> {
        let mut import = Import::new(Self::KIND, saved, &Self::names(), Self::ADDED)?;
        let mut config = Self::default();
        config.fields(&mut import);
        match import.error {
            Some(e) => Err(e),
            None => Ok(config),
        }
    }
}

/// Whether rows lag and catch up under this rule and semantics.
fn tracks_missed_steps<R: Rule>(rule: &R, semantics: Semantics) -> bool {
    semantics == Semantics::DenseExact && rule.missed() != Missed::Nothing
}

/// The padded stride of rows of `dim` floats, or `None` if it overflows.
fn checked_stride(dim: usize) -> Option<usize> {
    dim.checked_next_multiple_of(LANES_PER_LINE)
}

/// The state arrays of an optimizer, bound to one table shape.
#[derive(Clone, Debug)]
struct StateTables {
    rows: usize,
    dim: usize,
    stride: usize,
    per_row: bool,
    arrays: Vec<AlignedBuf>,
    /// `DenseExact` (when missed steps matter): row `r` has seen the first `last[r]` steps.
    last: Option<Vec<u64>>,
}

impl StateTables {
    /// Fresh state for a `rows × dim` table (`dim > 0`, `rows > 0`).
    fn new<R: Rule>(rule: &R, track: bool, rows: usize, dim: usize) -> Result<Self> {
        let too_big = Error::Alloc {
            what: "optimizer state",
            bytes: usize::MAX,
        };
        let stride = checked_stride(dim).ok_or(too_big)?;
        let per_row = rule.per_row();
        let width = if per_row { 1 } else { stride };
        let len = rows.checked_mul(width).ok_or(Error::Alloc {
            what: "optimizer state",
            bytes: usize::MAX,
        })?;
        let mut arrays = Vec::with_capacity(rule.arrays().len());
        for spec in rule.arrays() {
            let mut buf = AlignedBuf::zeroed(len, "optimizer state")?;
            if spec.init != 0.0 && len > 0 {
                // Real lanes only: pad lanes of state stay zero like the weights'.
                buf.as_mut_slice()
                    .par_chunks_mut(width)
                    .with_min_len(1024)
                    .for_each(|row| row[..width.min(dim)].fill(spec.init));
            }
            arrays.push(buf);
        }
        let last = if track {
            let mut last = Vec::new();
            last.try_reserve_exact(rows).map_err(|_| Error::Alloc {
                what: "optimizer step counters",
                bytes: rows.saturating_mul(8),
            })?;
            last.resize(rows, 0);
            Some(last)
        } else {
            None
        };
        Ok(Self {
            rows,
            dim,
            stride,
            per_row,
            arrays,
            last,
        })
    }

    /// The same state for a table of `rows >= self.rows` rows: the rows
    /// added start fresh (initial values; under `DenseExact`, current at
    /// step `now`). Allocates everything before changing anything.
    fn grow<R: Rule>(&mut self, rule: &R, rows: usize, now: u64) -> Result<()> {
        let mut grown = Self::new(rule, self.last.is_some(), rows, self.dim)?;
        for (new, old) in grown.arrays.iter_mut().zip(&self.arrays) {
            new.as_mut_slice()[..old.len()].copy_from_slice(old.as_slice());
        }
        if let (Some(new), Some(old)) = (&mut grown.last, &self.last) {
            new[..old.len()].copy_from_slice(old);
            new[old.len()..].fill(now);
        }
        *self = grown;
        Ok(())
    }

    /// Gives `rows` (each `< self.rows`) their initial state; under
    /// `DenseExact` they count as current at step `now`.
    fn reset<R: Rule>(&mut self, rule: &R, rows: &[usize], now: u64) {
        let width = if self.per_row { 1 } else { self.stride };
        let real = width.min(self.dim);
        for (spec, buf) in rule.arrays().iter().zip(&mut self.arrays) {
            let buf = buf.as_mut_slice();
            for &r in rows {
                // Real lanes only: the pad lanes are zero and stay so.
                buf[r * width..][..real].fill(spec.init);
            }
        }
        if let Some(last) = &mut self.last {
            for &r in rows {
                last[r] = now;
            }
        }
    }

    fn check_table(&self, table: &EmbeddingTable) -> Result<()> {
        Error::check_len(
            "table rows (the optimizer state's)",
            self.rows,
            table.rows(),
        )?;
        Error::check_len("table dim (the optimizer state's)", self.dim, table.dim())
    }
}

/// Per-call working memory of the catch-up, kept between calls.
#[derive(Clone, Debug, Default)]
struct Catch {
    /// Per visited row: index into `coefs` (Linear) or the first step to
    /// replay (Replay); `CURRENT` if the row is current.
    plan: Vec<u64>,
    /// `Mᵏ` for each distinct `k` of this call.
    coefs: Vec<Coefs>,
    by_k: HashMap<u64, u64>,
    /// Rows to visit (flush and catch-up).
    targets: Vec<usize>,
}

/// Where a row's missed steps come from, for the visit.
enum CatchUp<'a, St> {
    /// Rows are current.
    None,
    /// `coefs[plan[i]]`.
    Linear(&'a [Coefs]),
    /// Steps `plan[i]..now`, with the scalars of steps `from..now` in
    /// `table` and those of earlier steps computed on the way.
    Replay(Replayed<'a, St>),
}

impl<St> Clone for CatchUp<'_, St> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<St> Copy for CatchUp<'_, St> {}

/// The scalars of the steps a replay goes through.
struct Replayed<'a, St> {
    now: u64,
    from: u64,
    table: &'a [St],
    lrs: LrAt<'a>,
}

impl<St> Clone for Replayed<'_, St> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<St> Copy for Replayed<'_, St> {}

/// The learning rate each past step used: the history's stretches, then
/// the current rate.
#[derive(Clone, Copy, Debug)]
struct LrAt<'a> {
    history: &'a [(u64, f32)],
    current: f32,
}

impl LrAt<'_> {
    /// The rate of step index `t` (0-based).
    fn at(&self, t: u64) -> f32 {
        let i = self.history.partition_point(|&(until, _)| until <= t);
        self.history.get(i).map_or(self.current, |&(_, lr)| lr)
    }

    /// The stretches of one rate covering steps `from..to`, oldest first:
    /// `(steps, lr)`.
    fn stretches(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, f32)> + '_ {
        let first = self.history.partition_point(|&(until, _)| until <= from);
        let ends = self.history[first..]
            .iter()
            .copied()
            .chain(std::iter::once((u64::MAX, self.current)));
        let mut start = from;
        ends.map_while(move |(until, lr)| {
            if start >= to {
                return None;
            }
            let end = until.min(to);
            let n = end - start;
            start = end;
            Some((n, lr))
        })
    }
}

/// The state every optimizer keeps, and the algorithms on it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Core {
    steps: u64,
    tables: Option<StateTables>,
    /// `DenseExact` with lagging rows: `(until, lr)`, the rate steps
    /// `previous until..until` used, while some row may still have to catch
    /// them up. Steps from the last `until` on used the config's rate.
    lr_history: Vec<(u64, f32)>,
    schedule: Option<Arc<dyn LrSchedule>>,
    catch: Catch,
    /// A lookup's positions grouped by row (`step_lookup`).
    groups: Groups,
    /// One bit per table row, all clear between steps: the rows a
    /// [`step_rows`](Self::step_rows) has seen, to refuse a repeated one.
    seen: Vec<u64>,
}

impl Core {
    /// Steps taken so far.
    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    /// Whether rows may lag behind the step counter, so that `catch_up`
    /// has work to do.
    pub(crate) fn has_lagging_rows(&self) -> bool {
        self.tables.as_ref().is_some_and(|t| t.last.is_some())
    }

    /// The learning rate the next step will use.
    pub(crate) fn lr<C: Config>(&self, config: &C) -> f32 {
        match &self.schedule {
            Some(s) => s.lr(self.steps),
            None => config.lr(),
        }
    }

    /// The grouping of a fused lookup's ids.
    pub(crate) fn groups(&mut self) -> &mut Groups {
        &mut self.groups
    }

    /// Replaces the schedule.
    pub(crate) fn set_schedule(&mut self, schedule: Option<Arc<dyn LrSchedule>>) {
        self.schedule = schedule;
    }

    /// Removes the schedule and returns it.
    pub(crate) fn take_schedule(&mut self) -> Option<Arc<dyn LrSchedule>> {
        self.schedule.take()
    }

    /// Sets the learning rate of the next steps (after checking the config
    /// with it).
    pub(crate) fn set_lr<C: Config>(&mut self, config: &mut C, lr: f32) -> Result<()> {
        let mut next = *config;
        *next.lr_mut() = lr;
        next.check()?;
        self.change_lr(config, lr);
        Ok(())
    }

    /// Makes `lr` the config's rate, remembering the old one while lagging
    /// rows may need it to catch up.
    fn change_lr<C: Config>(&mut self, config: &mut C, lr: f32) {
        let old = config.lr();
        if old.to_bits() == lr.to_bits() {
            return;
        }
        *config.lr_mut() = lr;
        if !self.has_lagging_rows() {
            return;
        }
        let rule = config.rule();
        let matters = match rule.missed() {
            Missed::Nothing => false,
            Missed::Linear => rule.zero_grad_map(old) != rule.zero_grad_map(lr),
            Missed::Replay(_) => true,
        };
        // The old rate was used for steps since the last change (if any).
        let since = self.lr_history.last().map_or(0, |&(until, _)| until);
        if matters && self.steps > since {
            self.lr_history.push((self.steps, old));
        }
    }

    /// The config a step taken now uses (the schedule's rate, if any), once
    /// everything but the gradient is checked.
    fn prepare<C: Config>(&self, config: &C, table: &EmbeddingTable) -> Result<C> {
        let mut next = *config;
        if let Some(schedule) = &self.schedule {
            *next.lr_mut() = schedule.lr(self.steps);
        }
        next.check()?;
        if let Some(tables) = &self.tables {
            tables.check_table(table)?;
        }
        if self.steps >= MAX_STEPS {
            return Err(Error::InvalidConfig {
                field: "steps",
                reason: format!("the step counter is at its limit, {}", self.steps),
            });
        }
        Ok(next)
    }

    /// One step (see the module docs).
    pub(crate) fn step<C: Config>(
        &mut self,
        config: &mut C,
        table: &mut EmbeddingTable,
        grad: &SparseGrad,
    ) -> Result<()> {
        // Validate everything before writing anything.
        let next = self.prepare(config, table)?;
        if grad.dim() != table.dim() {
            return Err(Error::ShapeMismatch {
                what: "gradient dim (the table's)",
                expected: table.dim(),
                got: grad.dim(),
            });
        }
        if let Some(position) = grad.rows().iter().position(|&r| r >= table.rows()) {
            return Err(Error::IndexOutOfRange {
                position,
                index: grad.rows()[position] as i128,
                rows: table.rows(),
            });
        }
        if !grad.is_proven_finite() {
            check_finite(grad)?;
        }
        let grads = Grads::Grouped(Grouped::stored(grad));
        let tier = kernels::current();
        self.apply(config, next, table, grad.rows(), &grads, tier, Fresh::NONE)
    }

    /// A step on the distinct `rows`, whose gradient `grads` gives row by
    /// row when the update reaches each (the caller promises finite values,
    /// as for a trusted `step_lookup`).
    ///
    /// ```text
    /// validate config, shapes, rows < table.rows() and distinct
    /// DenseExact: catch-up plan per row, as step
    /// for each row r, in parallel (each row by exactly one task):
    ///     g = 0 + its parts from grads, in part order (summed in registers,
    ///         block by block); catch up; apply the update
    /// ```
    pub(crate) fn step_rows<C: Config>(
        &mut self,
        config: &mut C,
        table: &mut EmbeddingTable,
        rows: &[usize],
        grads: &dyn super::RowGradients,
    ) -> Result<()> {
        let next = self.prepare(config, table)?;
        check_row_step(rows, table, grads, &mut self.seen)?;
        let grads = Grads::Rows(grads);
        let tier = kernels::current();
        self.apply(config, next, table, rows, &grads, tier, Fresh::NONE)
    }

    /// The checks of a fused `step_lookup` before its ids are looked at.
    pub(crate) fn check_lookup<C: Config>(
        &self,
        config: &C,
        table: &EmbeddingTable,
        ids: usize,
        grad_len: usize,
    ) -> Result<()> {
        self.prepare(config, table)?;
        let expected = ids.saturating_mul(table.dim());
        Error::check_len("gradient length (ids * dim)", expected, grad_len)
    }

    /// A fused step whose ids [`Groups`] holds, grouped for `table`: checks
    /// `grad_out` as `check` says (by default while copying the later
    /// positions' rows next to each other), then applies, writing the
    /// `fresh` rows' values first. `Ok(false)`: the sums might overflow,
    /// nothing was written, and the caller must step with a stored gradient
    /// (which checks the sums). On `Err` or `Ok(false)` no row was written,
    /// the fresh ones neither.
    ///
    /// ```text
    /// check grad_out finite, copying the later positions' rows to scratch (groups.rs)
    /// for each row r, in parallel (each row by exactly one task):
    ///     r fresh: write its values
    ///     g = 0 + grad_out[first position of r] + scratch rows of its later positions, in order
    ///     catch up; apply the rule's update with g
    /// ```
    pub(crate) fn step_grouped<C: Config>(
        &mut self,
        config: &mut C,
        table: &mut EmbeddingTable,
        grad_out: &[f32],
        check: Check,
        fresh: Fresh<'_>,
    ) -> Result<bool> {
        let next = self.prepare(config, table)?;
        let (dim, ids) = (table.dim(), grad_out.len() / table.dim().max(1));
        let tier = kernels::current();
        let stride = table.stride();
        let groups = &mut self.groups;
        let mut copy = |scan| groups.copy_later(tier, grad_out, dim, stride, scan);
        let found = match check {
            Check::Scanned(found) => {
                time("copy", || copy(false));
                Some(found)
            }
            Check::Scan => Some(time("check and copy", || copy(true))),
            Check::Skip => {
                time("copy", || copy(false));
                None
            }
        };
        if let Some(found) = found {
            let scanned = found.finish("gradient", grad_out)?;
            let bound = scanned.max_abs as f64 * ids as f64;
            if !crate::grad::sums_proven_finite(bound, ids as u64) {
                // Sums of huge values may overflow. (Rare: the sums are
                // proven finite unless `max|g| · ids.len()` nears f32::MAX.)
                return Ok(false);
            }
        }
        let groups = std::mem::take(&mut self.groups);
        let grads = Grads::Grouped(Grouped {
            grad_out,
            pitch: dim,
            dim,
            stride: table.stride(),
            heads: Some(groups.heads()),
            later: groups.later(),
            scratch: groups.scratch(),
        });
        let update = || self.apply(config, next, table, groups.rows(), &grads, tier, fresh);
        let applied = time("update", update);
        self.groups = groups;
        applied.map(|()| true)
    }

    /// Applies a validated step to `rows` with gradients `grads` (their
    /// rows are distinct and `< table.rows()`), writing the `fresh` ones'
    /// values first. On `Err` nothing was written.
    #[allow(clippy::too_many_arguments)]
    fn apply<C: Config>(
        &mut self,
        config: &mut C,
        next: C,
        table: &mut EmbeddingTable,
        rows: &[usize],
        grads: &Grads<'_>,
        tier: Tier,
        fresh: Fresh<'_>,
    ) -> Result<()> {
        let rule = next.rule();
        if self.tables.is_none() {
            let track = tracks_missed_steps(&rule, next.semantics());
            self.tables = Some(StateTables::new(&rule, track, table.rows(), table.dim())?);
        }
        // Nothing can fail from here on.
        let lr = next.lr();
        self.change_lr(config, lr);
        let now = self.steps;
        let step = rule.step(now + 1, lr);
        let lrs = LrAt {
            history: &self.lr_history,
            current: lr,
        };
        let tables = self.tables.as_mut().expect("allocated above");
        let catch = &mut self.catch;
        let mut replay_table = Vec::new();
        let plan = match &mut tables.last {
            Some(last) => {
                let planned = plan_catch_up(&rule, catch, lrs, now, rows.iter().map(|&r| last[r]));
                for &r in rows {
                    last[r] = now + 1;
                }
                planned.map(|kind| kind.resolve(&rule, catch, &mut replay_table, lrs, now))
            }
            None => None,
        };
        visit(
            tier,
            &rule,
            Some(&step),
            table,
            tables,
            rows,
            Some(grads),
            plan,
            fresh,
        );
        self.steps = now + 1;
        Ok(())
    }

    /// Brings `rows` (all rows if `None`) current under `DenseExact`.
    pub(crate) fn catch_up<C: Config>(
        &mut self,
        config: &C,
        table: &mut EmbeddingTable,
        rows: Option<&[usize]>,
    ) -> Result<()> {
        config.check()?;
        if let Some(rows) = rows
            && let Some(position) = rows.iter().position(|&r| r >= table.rows())
        {
            return Err(Error::IndexOutOfRange {
                position,
                index: rows[position] as i128,
                rows: table.rows(),
            });
        }
        let Some(tables) = &mut self.tables else {
            return Ok(()); // no step yet: nothing was missed
        };
        tables.check_table(table)?;
        let Some(last) = &mut tables.last else {
            return Ok(()); // nothing lags
        };
        let rule = config.rule();
        let lrs = LrAt {
            history: &self.lr_history,
            current: config.lr(),
        };
        let now = self.steps;
        let catch = &mut self.catch;
        // Setting last[r] on the first visit makes a duplicate current, so
        // each row enters `targets` at most once.
        let mut targets = std::mem::take(&mut catch.targets);
        let mut seen = Vec::new();
        let all = last.len();
        targets.clear();
        let mut lagging = |r: usize| {
            if last[r] < now {
                targets.push(r);
                seen.push(last[r]);
                last[r] = now;
            }
        };
        match rows {
            Some(rows) => rows.iter().for_each(|&r| lagging(r)),
            None => (0..all).for_each(lagging),
        }
        let planned = plan_catch_up(&rule, catch, lrs, now, seen.into_iter());
        let mut replay_table = Vec::new();
        let plan = planned.map(|kind| kind.resolve(&rule, catch, &mut replay_table, lrs, now));
        visit(
            kernels::current(),
            &rule,
            None,
            table,
            tables,
            &targets,
            None,
            plan,
            Fresh::NONE,
        );
        catch.targets = targets;
        if rows.is_none() {
            // Every row is current: no earlier rate is needed any more.
            self.lr_history.clear();
        }
        Ok(())
    }

    /// Starts `rows` of `table` afresh (see
    /// [`SparseOptimizer::reset_rows`]), growing the state first if the
    /// table has more rows than it.
    pub(crate) fn reset_rows<C: Config>(
        &mut self,
        config: &C,
        table: &EmbeddingTable,
        rows: &[usize],
    ) -> Result<()> {
        if let Some(position) = rows.iter().position(|&r| r >= table.rows()) {
            return Err(Error::IndexOutOfRange {
                position,
                index: rows[position] as i128,
                rows: table.rows(),
            });
        }
        let Some(tables) = &mut self.tables else {
            return Ok(()); // no state yet: the first step allocates it fresh
        };
        Error::check_len("table dim (the optimizer state's)", tables.dim, table.dim())?;
        if table.rows() < tables.rows {
            return Err(Error::ShapeMismatch {
                what: "table rows (at least the optimizer state's)",
                expected: tables.rows,
                got: table.rows(),
            });
        }
        let rule = config.rule();
        if table.rows() > tables.rows {
            tables.grow(&rule, table.rows(), self.steps)?;
        }
        tables.reset(&rule, rows, self.steps);
        Ok(())
    }

    /// Bytes of state kept per table row of `dim` floats (the state
    /// arrays, the `DenseExact` step counts and `step_lookup`'s grouping).
    pub(crate) fn state_bytes_per_row<C: Config>(&self, config: &C, dim: usize) -> usize {
        let rule = config.rule();
        let width = if rule.per_row() {
            1
        } else {
            checked_stride(dim).unwrap_or(usize::MAX)
        };
        let track = tracks_missed_steps(&rule, config.semantics());
        rule.arrays()
            .len()
            .saturating_mul(width)
            .saturating_mul(size_of::<f32>())
            .saturating_add(if track { size_of::<u64>() } else { 0 })
            .saturating_add(size_of::<u32>())
    }

    /// The whole state, for a checkpoint.
    pub(crate) fn export<C: Config>(&self, config: &C) -> OptimizerState {
        let rule = config.rule();
        let mut state = OptimizerState {
            kind: C::KIND.to_owned(),
            config: config.to_fields(),
            steps: self.steps,
            lr_history: self.lr_history.clone(),
            ..OptimizerState::default()
        };
        let Some(t) = &self.tables else {
            return state;
        };
        state.shape = Some((t.rows, t.dim));
        for (spec, buf) in rule.arrays().iter().zip(&t.arrays) {
            let (shape, values) = if t.per_row {
                (vec![t.rows], buf.as_slice().to_vec())
            } else {
                let mut values = Vec::with_capacity(t.rows * t.dim);
                for row in buf.as_slice().chunks_exact(t.stride) {
                    values.extend_from_slice(&row[..t.dim]);
                }
                (vec![t.rows, t.dim], values)
            };
            state.arrays.push(StateArray {
                name: spec.name.to_owned(),
                shape,
                values,
            });
        }
        state.last_step = t.last.clone().unwrap_or_default();
        state
    }

    /// A config and core from a saved state, checked against each other.
    /// Everything is checked before anything is allocated.
    pub(crate) fn import<C: Config>(state: &OptimizerState) -> Result<(C, Core)> {
        if state.kind != C::KIND {
            return Err(Error::InvalidConfig {
                field: "kind",
                reason: format!("expected {:?}, got {:?}", C::KIND, state.kind),
            });
        }
        let config = C::from_fields(&state.config)?;
        config.check()?;
        let rule = config.rule();
        if state.steps > MAX_STEPS {
            return Err(Error::InvalidConfig {
                field: "steps",
                reason: format!("{} is above the limit {MAX_STEPS}", state.steps),
            });
        }
        let Some((rows, dim)) = state.shape else {
            if state.steps != 0
                || !state.arrays.is_empty()
                || !state.last_step.is_empty()
                || !state.lr_history.is_empty()
            {
                return Err(Error::InvalidConfig {
                    field: "shape",
                    reason: format!(
                        "a state without a table shape must be empty, got {} and {}",
                        crate::error::count(state.steps, "step"),
                        crate::error::count(state.arrays.len(), "array")
                    ),
                });
            }
            return Ok((config, Core::default()));
        };
        if rows == 0 || dim == 0 || checked_stride(dim).is_none() {
            return Err(Error::InvalidConfig {
                field: "shape",
                reason: format!("({rows}, {dim}) is not a table's shape"),
            });
        }
        let track = tracks_missed_steps(&rule, config.semantics());
        check_saved_arrays::<C>(&rule, state, rows, dim)?;
        check_saved_counters(state, rows, track)?;
        // Only now, with every length checked against data that exists, allocate.
        let mut tables = StateTables::new(&rule, track, rows, dim)?;
        for (saved, buf) in state.arrays.iter().zip(&mut tables.arrays) {
            if tables.per_row {
                buf.as_mut_slice().copy_from_slice(&saved.values);
            } else {
                for (dst, src) in buf
                    .as_mut_slice()
                    .chunks_exact_mut(tables.stride)
                    .zip(saved.values.chunks_exact(dim))
                {
                    dst[..dim].copy_from_slice(src);
                }
            }
        }
        if let Some(last) = &mut tables.last {
            last.copy_from_slice(&state.last_step);
        }
        let core = Core {
            steps: state.steps,
            tables: Some(tables),
            lr_history: state.lr_history.clone(),
            ..Core::default()
        };
        Ok((config, core))
    }
}

/// A saved state's arrays: names, shapes, lengths, values finite and in
/// each array's range.
fn check_saved_arrays<C: Config>(
    rule: &C::Rule,
    state: &OptimizerState,
    rows: usize,
    dim: usize,
) -> Result<()> {
    let expected: Vec<&str> = rule.arrays().iter().map(|a| a.name).collect();
    let got: Vec<&str> = state.arrays.iter().map(|a| a.name.as_str()).collect();
    if got != expected {
        return Err(Error::InvalidConfig {
            field: "arrays",
            reason: format!(
                "{} with this config keeps arrays {expected:?}, got {got:?}",
                C::KIND
            ),
        });
    }
    let want_shape = if rule.per_row() {
        vec![rows]
    } else {
        vec![rows, dim]
    };
    for (saved, spec) in state.arrays.iter().zip(rule.arrays()) {
        Error::check_len("state array rank", want_shape.len(), saved.shape.len())?;
        for (what, (&want, &got)) in ["state array rows", "state array columns"]
            .into_iter()
            .zip(want_shape.iter().zip(&saved.shape))
        {
            Error::check_len(what, want, got)?;
        }
        // rows * dim may overflow for a claimed shape; the values cannot.
        let len = want_shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        Error::check_len(
            "state array values",
            len.unwrap_or(usize::MAX),
            saved.values.len(),
        )?;
        crate::grad::check_finite("optimizer state", &saved.values)?;
        if let Some(position) = saved.values.iter().position(|&x| x < spec.min) {
            return Err(Error::InvalidConfig {
                field: "arrays",
                reason: format!(
                    "{:?} holds {} at position {position}; its values are at least {}",
                    spec.name, saved.values[position], spec.min
                ),
            });
        }
    }
    Ok(())
}

/// A saved state's per-row step counts and learning-rate history.
fn check_saved_counters(state: &OptimizerState, rows: usize, track: bool) -> Result<()> {
    if track {
        Error::check_len("last_step length", rows, state.last_step.len())?;
        if let Some(bad) = state.last_step.iter().find(|&&l| l > state.steps) {
            return Err(Error::InvalidConfig {
                field: "last_step",
                reason: format!(
                    "a row's last step is {bad}, but the state has taken only {}",
                    crate::error::count(state.steps, "step")
                ),
            });
        }
    } else {
        Error::check_len(
            "last_step length (empty unless rows lag under DenseExact)",
            0,
            state.last_step.len(),
        )?;
        Error::check_len(
            "lr_history length (empty unless rows lag under DenseExact)",
            0,
            state.lr_history.len(),
        )?;
    }
    let mut since = 0;
    for &(until, lr) in &state.lr_history {
        if until <= since || until > state.steps || !(lr.is_finite() && lr > 0.0) {
            return Err(Error::InvalidConfig {
                field: "lr_history",
                reason: format!(
                    "({until}, {lr}) is not a positive rate used until a step after {since} \
                     and at most {}",
                    state.steps
                ),
            });
        }
        since = until;
    }
    Ok(())
}

/// What [`plan_catch_up`] filled in.
#[derive(Clone, Copy)]
enum Planned {
    Linear,
    Replay { from: u64 },
}

impl Planned {
    /// The visit's view of the plan, the replay's shared scalars computed.
    fn resolve<'a, R: Rule>(
        self,
        rule: &R,
        catch: &'a Catch,
        replay_table: &'a mut Vec<R::Step>,
        lrs: LrAt<'a>,
        now: u64,
    ) -> (&'a [u64], CatchUp<'a, R::Step>) {
        let kind = match self {
            Planned::Linear => CatchUp::Linear(&catch.coefs),
            Planned::Replay { from } => {
                let from = from.max(now.saturating_sub(REPLAY_TABLE));
                replay_table.extend((from..now).map(|t| rule.step(t + 1, lrs.at(t))));
                let table: &'a [R::Step] = replay_table;
                CatchUp::Replay(Replayed {
                    now,
                    from,
                    table,
                    lrs,
                })
            }
        };
        (&catch.plan, kind)
    }
}

/// Fills `catch.plan` for rows that have seen `seen` steps each (in visit
/// order): the coefficients of their missed steps (Linear, memoised per
/// count) or the first step to replay. `None` when no row lags.
fn plan_catch_up<R: Rule>(
    rule: &R,
    catch: &mut Catch,
    lrs: LrAt<'_>,
    now: u64,
    seen: impl Iterator<Item = u64>,
) -> Option<Planned> {
    catch.plan.clear();
    catch.coefs.clear();
    catch.by_k.clear();
    let mut any = false;
    match rule.missed() {
        Missed::Nothing => None,
        Missed::Linear => {
            for last in seen {
                let k = now - last;
                let c = if k == 0 {
                    CURRENT
                } else {
                    let Catch { coefs, by_k, .. } = catch;
                    *by_k.entry(k).or_insert_with(|| {
                        coefs.push(linear_catch_up(rule, lrs, now - k, now));
                        (coefs.len() - 1) as u64
                    })
                };
                any |= c != CURRENT;
                catch.plan.push(c);
            }
            any.then_some(Planned::Linear)
        }
        Missed::Replay(limit) => {
            let mut from = now;
            for last in seen {
                let start = match limit {
                    Some(n) => last.max(now.saturating_sub(n)),
                    None => last,
                };
                let c = if start < now { start } else { CURRENT };
                from = from.min(start);
                any |= c != CURRENT;
                catch.plan.push(c);
            }
            any.then_some(Planned::Replay { from })
        }
    }
}

/// The product of the zero-gradient maps of steps `from..to`, one power
/// per stretch of one learning rate, in `f64`, rounded once.
fn linear_catch_up<R: Rule>(rule: &R, lrs: LrAt<'_>, from: u64, to: u64) -> Coefs {
    let n = 1 + rule.arrays().len();
    let mut total = Map::identity(n);
    for (steps, lr) in lrs.stretches(from, to) {
        total = rule.zero_grad_map(lr).power(steps).mul(&total);
    }
    total.coefs()
}

/// `Err(NonFinite)` for the first NaN or infinite summed gradient value,
/// positioned as `slot * dim + column`. (A `SparseGrad` holds only finite
/// inputs, but their sums may overflow; it skips this pass when it can
/// prove they did not.)
pub(crate) fn check_finite(grad: &SparseGrad) -> Result<()> {
    let all = grad.as_padded();
    let finite = |c: &[f32]| c.iter().fold(true, |ok, x| ok & x.is_finite());
    let ok = if all.len() < PARALLEL_MIN_FLOATS {
        finite(all)
    } else {
        all.par_chunks(TASK_FLOATS).all(finite)
    };
    if ok {
        return Ok(());
    }
    let Err(Error::NonFinite {
        value, position, ..
    }) = crate::grad::check_finite("", all)
    else {
        unreachable!("a value is not finite");
    };
    // Pad lanes are zero, so the position is a real lane.
    let (slot, column) = (position / grad.stride(), position % grad.stride());
    Err(Error::NonFinite {
        what: "summed gradient",
        position: slot * grad.dim() + column,
        value,
    })
}

/// A buffer of rows handed out to parallel tasks, each of which writes
/// rows that no other task touches.
#[derive(Clone, Copy)]
struct DisjointRows<'a> {
    ptr: SendPtr,
    len: usize,
    width: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

impl<'a> DisjointRows<'a> {
    fn new(buf: &'a mut [f32], width: usize) -> Self {
        Self {
            ptr: SendPtr(buf.as_mut_ptr()),
            len: buf.len(),
            width,
            _buf: PhantomData,
        }
    }

    /// Start of row `r`, for a prefetch (never dereferenced here).
    #[inline(always)]
    fn start(self, r: usize) -> *const f32 {
        self.ptr.get().wrapping_add(r * self.width)
    }

    /// Row `r`.
    ///
    /// # Safety
    /// `(r + 1) * width <= len`, and no other reference to row `r` is alive
    /// while the returned one is.
    #[inline(always)]
    unsafe fn row(self, r: usize) -> &'a mut [f32] {
        debug_assert!((r + 1) * self.width <= self.len);
        // SAFETY: in bounds of the borrowed buffer (caller), and unaliased
        // (caller), for the lifetime of that borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.get().add(r * self.width), self.width) }
    }
}

/// The summed gradient of each visited row: a stored gradient's slot, or
/// a lookup's positions grouped but not summed, whose sum is taken in
/// batch order as [`SparseGrad`] sums it: the first position's row from
/// `grad_out`, the later ones' from the groups' scratch.
///
/// One type for both, so that each rule's update is compiled once per tier
/// for the gradients it reads, not once per source.
struct Grouped<'a> {
    grad_out: &'a [f32],
    /// Floats from one row of `grad_out` to the next.
    pitch: usize,
    /// Real lanes of a row.
    dim: usize,
    stride: usize,
    /// Each visited row's first position; `None`: visited row `i` is row
    /// `i` of `grad_out` (a stored gradient's slots).
    heads: Option<&'a [u32]>,
    /// Visited row `i`'s later rows are scratch rows
    /// `later[i]..later[i + 1]`; empty: no row has any.
    later: &'a [u32],
    scratch: &'a [f32],
}

impl<'a> Grouped<'a> {
    /// The slots of a stored gradient, which are summed already.
    fn stored(grad: &'a SparseGrad) -> Self {
        Self {
            grad_out: grad.as_padded(),
            pitch: grad.stride(),
            dim: grad.dim(),
            stride: grad.stride(),
            heads: None,
            later: &[],
            scratch: &[],
        }
    }

    /// Starts loading what [`update`](Self::update) of visited row `i` will read.
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        // Rows looked up once come in batch order, but the hardware
        // prefetcher stops at each 4 KiB page of `grad_out`: without this
        // the update waits for them. (The scratch is read in order too;
        // prefetching it made no difference. Stored slots are read in order.)
        if let Some(heads) = self.heads {
            let head = self
                .grad_out
                .as_ptr()
                .wrapping_add(heads[i] as usize * self.pitch);
            kernels::prefetch_lines_l2(head, self.dim);
        }
    }

    /// The gradient of visited row `i`.
    #[inline(always)]
    fn row(&self, i: usize) -> GradSum<'_> {
        let head = self.heads.map_or(i, |h| h[i] as usize);
        let first = &self.grad_out[head * self.pitch..][..self.pitch];
        let later = match self.later.get(i..i + 2) {
            Some(&[a, b]) => a as usize..b as usize,
            _ => 0..0,
        };
        GradSum::new(
            first,
            &self.scratch[later.start * self.stride..later.end * self.stride],
            self.stride,
        )
    }
}

/// The gradient of each visited row.
enum Grads<'a> {
    /// Stored or grouped by the engine.
    Grouped(Grouped<'a>),
    /// A caller's parts of each row ([`Core::step_rows`]).
    Rows(&'a dyn super::RowGradients),
}

/// The checks of [`SparseOptimizer::step_rows_finite`] before anything is
/// written: `Err` naming the first row of `rows` that is `>= table.rows()`,
/// else the first that repeats an earlier one, else the first part of
/// `grads` that is not `table.dim()` floats long. `seen` (one bit per table
/// row) is all clear before and after.
pub(crate) fn check_row_step(
    rows: &[usize],
    table: &EmbeddingTable,
    grads: &dyn super::RowGradients,
    seen: &mut Vec<u64>,
) -> Result<()> {
    let table_rows = table.rows();
    crate::index::validate_ids(rows, table_rows)?;
    seen.resize(seen.len().max(table_rows.div_ceil(64)), 0);
    let mut repeated = None;
    for (position, &r) in rows.iter().enumerate() {
        let (word, bit) = (r / 64, 1u64 << (r % 64));
        if seen[word] & bit != 0 {
            repeated = Some(position);
            break;
        }
        seen[word] |= bit;
    }
    let marked = repeated.unwrap_or(rows.len());
    for &r in &rows[..marked] {
        seen[r / 64] = 0;
    }
    if let Some(position) = repeated {
        return Err(Error::InvalidConfig {
            field: "rows",
            reason: format!(
                "row {} at position {position} is named earlier too: a step's rows must be \
                 distinct",
                rows[position]
            ),
        });
    }
    let dim = table.dim();
    for (position, &r) in rows.iter().enumerate() {
        for k in 0..grads.parts() {
            match grads.part(r, k) {
                Some(part) if part.len() != dim => {
                    return Err(Error::InvalidConfig {
                        field: "grads",
                        reason: format!(
                            "part {k} of row {r} (position {position}) holds {} floats, not \
                             the table's dim {dim}",
                            part.len()
                        ),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Visits `rows` (distinct, each `< table.rows()`): writes row `i`'s
/// values if `fresh` names it, catches it up as `plan` says, then applies
/// `rule` with gradient `i` of `grads` if any. Parallel over rows above a
/// size threshold.
#[allow(clippy::too_many_arguments)]
fn visit<R: Rule>(
    tier: Tier,
    rule: &R,
    step: Option<&R::Step>,
    table: &mut EmbeddingTable,
    tables: &mut StateTables,
    rows: &[usize],
    grads: Option<&Grads<'_>>,
    plan: Option<(&[u64], CatchUp<'_, R::Step>)>,
    fresh: Fresh<'_>,
) {
    let (stride, table_dim) = (table.stride(), table.dim());
    let state_width = if tables.per_row { 1 } else { stride };
    let floats_per_row = stride + tables.arrays.len() * state_width;
    let mut bufs = Vec::with_capacity(1 + tables.arrays.len());
    bufs.push(DisjointRows::new(table.as_padded_mut(), stride));
    for a in &mut tables.arrays {
        bufs.push(DisjointRows::new(a.as_mut_slice(), state_width));
    }
    let bufs = &bufs[..];
    let (plan, catch) = match plan {
        Some((plan, catch)) => (Some(plan), catch),
        None => (None, CatchUp::None),
    };
    let zeros = match catch {
        CatchUp::Replay(_) => vec![0.0; stride],
        _ => Vec::new(),
    };
    let zeros = &zeros[..];
    let run = |start: usize, rows: &[usize]| {
        kernels::dispatch(
            tier,
            Visit {
                rule,
                step,
                rows,
                start,
                grads,
                plan: plan.map(|p| &p[start..start + rows.len()]),
                catch,
                fresh,
                zeros,
                bufs,
                dim: table_dim,
                stride,
            },
        )
    };
    if rows.len() * floats_per_row < PARALLEL_MIN_FLOATS {
        run(0, rows);
    } else {
        // Each task gets a run of distinct rows (SparseGrad's rows and a
        // lookup's grouped rows are distinct; flush and catch-up dedupe
        // theirs), so no row of the weights or of any state array is
        // written by two tasks, and each row's result is the same whichever
        // task computes it.
        let per_task = (TASK_FLOATS / floats_per_row).max(1);
        rows.par_chunks(per_task)
            .enumerate()
            .for_each(|(t, chunk)| run(t * per_task, chunk));
    }
}

/// The body of [`visit`] for one run of rows, compiled per tier.
struct Visit<'a, R: Rule> {
    rule: &'a R,
    step: Option<&'a R::Step>,
    rows: &'a [usize],
    /// Index of `rows[0]` among all visited rows (for `grads`).
    start: usize,
    grads: Option<&'a Grads<'a>>,
    plan: Option<&'a [u64]>,
    catch: CatchUp<'a, R::Step>,
    fresh: Fresh<'a>,
    /// A padded row of zeros: the gradient of a replayed step.
    zeros: &'a [f32],
    /// The weights, then each state array.
    bufs: &'a [DisjointRows<'a>],
    dim: usize,
    stride: usize,
}

impl<R: Rule> Kernel for Visit<'_, R> {
    type Output = ();

    /// Per row: a linear catch-up, then every update the row is due (the
    /// replayed missed steps, each with a zero gradient, and this step's),
    /// through one call of the rule's update, so it is compiled once.
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        // A row's parts from a caller's `RowGradients`, and a zero row for
        // a row that has none.
        let (mut parts, no_part) = match self.grads {
            Some(Grads::Rows(g)) => (Vec::with_capacity(g.parts()), vec![0.0f32; self.dim]),
            _ => (Vec::new(), Vec::new()),
        };
        // The next fresh row among these: `fresh.at[next]`.
        let at = self.fresh.at;
        let mut next = at.partition_point(|&v| (v as usize) < self.start);
        for (i, &r) in self.rows.iter().enumerate() {
            if let Some(&ahead) = self.rows.get(i + PREFETCH_AHEAD) {
                for b in self.bufs {
                    kernels::prefetch_lines_l2(b.start(ahead), b.width);
                }
                match self.grads {
                    Some(Grads::Grouped(g)) => g.prefetch(self.start + i + PREFETCH_AHEAD),
                    Some(Grads::Rows(g)) => g.prefetch(ahead),
                    None => {}
                }
            }
            if at.get(next).is_some_and(|&v| v as usize == self.start + i) {
                // SAFETY: `r < rows` of the weights (validated by the
                // caller of `visit`), and rows are distinct across all
                // tasks, so this task holds the only reference to row `r`
                // (it ends before the update's).
                (self.fresh.fill)(next, unsafe { self.bufs[0].row(r) });
                next += 1;
            }
            let mut replay = 0..0;
            if let Some(p) = self.plan.map(|p| p[i])
                && p != CURRENT
            {
                match self.catch {
                    CatchUp::None => {}
                    CatchUp::Linear(coefs) => {
                        let mut lanes: [&mut [f32]; super::linear::MAX_TUPLE] =
                            [&mut [], &mut [], &mut [], &mut []];
                        for (lane, b) in lanes.iter_mut().zip(self.bufs) {
                            // SAFETY: `r < rows` of every buffer (validated
                            // by the caller of `visit`), and rows are
                            // distinct across all tasks, so this task holds
                            // the only reference to row `r` (these end
                            // before the update's).
                            *lane = unsafe { b.row(r) };
                        }
                        coefs[p as usize].apply(s, &mut lanes);
                    }
                    CatchUp::Replay(replayed) => replay = p..replayed.now,
                }
            }
            let this = match (self.grads, self.step) {
                (Some(Grads::Grouped(g)), Some(&step)) => Some((step, g.row(self.start + i))),
                (Some(Grads::Rows(g)), Some(&step)) => {
                    parts.clear();
                    for k in 0..g.parts() {
                        if let Some(part) = g.part(r, k) {
                            assert_eq!(part.len(), self.dim, "part {k} of row {r}: its length");
                            parts.push(part);
                        }
                    }
                    let (first, more): (&[f32], &[&[f32]]) = match parts.split_first() {
                        Some((first, more)) => (first, more),
                        None => (&no_part, &[]),
                    };
                    Some((step, GradSum::parts(first, more)))
                }
                _ => None,
            };
            let due = (replay.end - replay.start) + this.is_some() as u64;
            for k in 0..due {
                let t = replay.start + k;
                let (step, g) = match (&this, self.catch) {
                    (_, CatchUp::Replay(replayed)) if t < replay.end => {
                        let step = match t.checked_sub(replayed.from) {
                            Some(j) => replayed.table[j as usize],
                            None => self.rule.step(t + 1, replayed.lrs.at(t)),
                        };
                        (step, GradSum::new(self.zeros, &[], self.stride))
                    }
                    (Some((step, g)), _) => (*step, *g),
                    _ => unreachable!("due counts this step only when there is one"),
                };
                let rows = RowSet {
                    bufs: self.bufs,
                    row: r,
                };
                self.rule.update(s, &step, rows, &g, self.dim);
            }
        }
    }
}

/// A fused `step_lookup` of one optimizer, compiled in this crate (see
/// [`step_lookup`]).
pub(crate) trait Fused {
    /// Checks config, lengths and state before the ids are looked at.
    fn check_lookup(&self, table: &EmbeddingTable, ids: usize, grad_len: usize) -> Result<()>;
    /// The grouping of the lookup's ids.
    fn groups(&mut self) -> &mut Groups;
    /// The rest of the step, once the ids are grouped (`Ok(false)`: step
    /// with a stored gradient instead; nothing was written).
    fn step_grouped(
        &mut self,
        table: &mut EmbeddingTable,
        grad_out: &[f32],
        check: Check,
        fresh: Fresh<'_>,
    ) -> Result<bool>;
    /// [`SparseOptimizer::step_rows_finite`].
    fn step_rows(
        &mut self,
        table: &mut EmbeddingTable,
        rows: &[usize],
        grads: &dyn super::RowGradients,
    ) -> Result<()>;
}

/// Rows of a fused step whose values it writes right before their update
/// (a dynamic table's newly admitted rows: drawn by the task that updates
/// them, each crosses memory once, and the drawing runs in parallel).
#[derive(Clone, Copy)]
pub(crate) struct Fresh<'a> {
    /// Indices into the step's rows (its groups), ascending.
    pub(crate) at: &'a [u32],
    /// Writes the values of fresh row `n` (`at[n]`) into its whole padded
    /// row (pads zero).
    pub(crate) fill: &'a (dyn Fn(usize, &mut [f32]) + Sync),
}

impl Fresh<'_> {
    /// No fresh rows.
    pub(crate) const NONE: Fresh<'static> = Fresh {
        at: &[],
        fill: &|_, _| {},
    };
}

/// How a fused step checks that `grad_out` is finite.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Check {
    /// While copying the later positions' rows (one pass over `grad_out`).
    Scan,
    /// Already done, with this result.
    Scanned(ScanPart),
    /// Not at all ([`SparseOptimizer::step_lookup_finite`]).
    Skip,
}

/// How [`step_lookup`] knows that `grad_out` is finite.
pub(crate) enum Finite {
    /// It checks (and refuses a non-finite value, changing nothing).
    Check,
    /// The caller checked it, with this result, on the same `grad_out`.
    Scanned(ScanPart),
    /// The caller guarantees it ([`SparseOptimizer::step_lookup_finite`]).
    Trusted,
}

/// A fused step's grouping taken out of its optimizer ([`take_grouping`]),
/// to group a batch beside other work: a dynamic table groups its
/// positions by labels (a key's row, or a number standing for a key not
/// yet given one) while it admits keys on another thread, then relabels
/// the groups with their rows and steps ([`step_lookup_grouped`]).
pub(crate) struct TakenGrouping(Groups);

impl TakenGrouping {
    /// Groups the positions of `labels`, each below `bound` (checked):
    /// positions of one label share a group, groups in first-seen order.
    pub(crate) fn build(&mut self, labels: &[u32], bound: usize) {
        assert!(
            Groups::fits(labels.len()) && labels.iter().all(|&l| (l as usize) < bound),
            "grouping labels out of bounds"
        );
        // SAFETY: just checked.
        unsafe { self.0.build(labels, bound) };
    }

    /// Replaces each group `k`'s label `l` by `row(k, l)`, group after
    /// group. The labels must stand one to one for rows.
    pub(crate) fn relabel(&mut self, row: impl FnMut(usize, usize) -> usize) {
        self.0.relabel(row);
    }
}

/// The grouping of `opt`'s fused step, for a batch of `n` ids, if it has
/// a fused step and the batch fits it. Hand it back with
/// [`step_lookup_grouped`] or [`give_back`] (else the optimizer allocates
/// a new one).
pub(crate) fn take_grouping<O: SparseOptimizer + ?Sized>(
    opt: &mut O,
    n: usize,
) -> Option<TakenGrouping> {
    let FusedStep(fused) = opt.fused()?;
    Groups::fits(n).then(|| TakenGrouping(std::mem::take(fused.groups())))
}

/// Returns a grouping unused to its optimizer.
pub(crate) fn give_back<O: SparseOptimizer + ?Sized>(opt: &mut O, grouped: TakenGrouping) {
    if let Some(FusedStep(fused)) = opt.fused() {
        *fused.groups() = grouped.0;
    }
}

/// [`step_lookup`] of `rows`, checking `grad_out` as `check` says, whose
/// positions `grouped` (from [`take_grouping`] on `opt`) groups by row
/// already: the same step, bit for bit, without grouping them again; the
/// `fresh` rows' values are written right before their update.
/// `Ok(false)`: the sums might overflow, and the caller must step with a
/// stored gradient. On `Err` and `Ok(false)` nothing was written, the
/// fresh rows neither.
///
/// # Panics
/// If a group's row is not below `table.rows()` (the caller's grouping
/// is not of `rows`).
pub(crate) fn step_lookup_grouped<O: SparseOptimizer + ?Sized>(
    opt: &mut O,
    table: &mut EmbeddingTable,
    rows: &[u32],
    grad_out: &[f32],
    grouped: TakenGrouping,
    check: Check,
    fresh: Fresh<'_>,
) -> Result<bool> {
    let Some(FusedStep(fused)) = opt.fused() else {
        unreachable!("a grouping is taken from a fused step only")
    };
    let groups = fused.groups();
    *groups = grouped.0;
    debug_assert!(
        (groups.rows().iter().zip(groups.heads())).all(|(&r, &h)| rows[h as usize] as usize == r)
    );
    // The update reads and writes the groups' rows unchecked.
    assert!(
        groups.rows().iter().all(|&r| r < table.rows()),
        "a grouping's row out of bounds"
    );
    let groups_len = groups.rows().len();
    assert!(
        fresh.at.is_sorted_by(|a, b| a < b)
            && fresh.at.last().is_none_or(|&v| (v as usize) < groups_len),
        "fresh rows out of order or bounds"
    );
    time("check", || {
        fused.check_lookup(table, rows.len(), grad_out.len())?;
        crate::index::validate_ids(rows, table.rows())
    })?;
    fused.step_grouped(table, grad_out, check, fresh)
}

/// An optimizer's fused lookup step, handed to the provided
/// [`SparseOptimizer::step_lookup`].
#[doc(hidden)]
pub struct FusedStep<'a>(pub(crate) &'a mut dyn Fused);

/// [`SparseOptimizer::step_lookup`]: the fused step when the optimizer
/// has one, else a stored gradient and [`SparseOptimizer::step`].
///
/// ```text
/// validate config, shapes, ids < table.rows()
/// group the positions by row (groups.rs): rows in first-seen order   (generic over the id type)
///     on several threads, the others check grad_out finite meanwhile
/// copy the later positions' rows to scratch (checking grad_out in the same pass on one thread)
/// if the sums might overflow: accumulate a SparseGrad and step (it checks the sums)
/// DenseExact: catch-up plan per row, as step
/// update each row with 0 + its positions' gradient rows, in batch order
/// ```
///
/// `Finite::Trusted` ([`SparseOptimizer::step_lookup_finite`]) skips the
/// check of `grad_out` and the proof that the sums stay finite;
/// `Finite::Scanned` hands over a check the caller ran beside other work.
pub(crate) fn step_lookup<O: SparseOptimizer + ?Sized, I: Index>(
    opt: &mut O,
    table: &mut EmbeddingTable,
    ids: &[I],
    grad_out: &[f32],
    finite: Finite,
) -> Result<()> {
    if let Some(FusedStep(fused)) = opt.fused() {
        time("check", || {
            fused.check_lookup(table, ids.len(), grad_out.len())?;
            crate::index::validate_ids(ids, table.rows())
        })?;
        if Groups::fits(ids.len()) {
            let (rows, groups) = (table.rows(), fused.groups());
            // SAFETY: ids were validated against `table.rows()` and fit.
            let mut group = || time("group", || unsafe { groups.build(ids, rows) });
            let check = match finite {
                Finite::Trusted => {
                    group();
                    Check::Skip
                }
                Finite::Scanned(found) => {
                    group();
                    Check::Scanned(found)
                }
                // The grouping runs on one thread below SHARD_MIN_THREADS:
                // the others scan the gradient meanwhile.
                Finite::Check if rayon::current_num_threads() > 1 => {
                    let tier = kernels::current();
                    let scan = || {
                        time("scan beside group", || {
                            crate::grad::scan_all(tier, grad_out)
                        })
                    };
                    Check::Scanned(rayon::join(group, scan).1)
                }
                // On one thread the scan is fused with the copy of the
                // later rows, which it brings into the cache.
                Finite::Check => {
                    group();
                    Check::Scan
                }
            };
            if fused.step_grouped(table, grad_out, check, Fresh::NONE)? {
                return Ok(());
            }
        }
    }
    let mut grad = SparseGrad::for_table(table);
    grad.accumulate_lookup(ids, grad_out)?;
    opt.step(table, &grad)
}
