//! What every optimizer shares: validation, the state tables, the
//! parallel walk over the rows of a batch, the `DenseExact` catch-up and
//! the state export.
//!
//! An optimizer is a config plus a [`Core`]. The config describes the
//! update as a [`Rule`]: which state arrays it keeps, its zero-gradient map
//! (for `DenseExact`) and the update of one row, written once over
//! [`Simd`]. The core does the rest:
//!
//! ```text
//! step(table, grad):
//!     validate config, shapes, rows < table.rows(), gradient finite   (nothing written yet)
//!     allocate the state on the first step
//!     DenseExact: for each grad row r: k = steps − last[r]; last[r] = steps + 1
//!                 coefficients Mᵏ, once per distinct k
//!     for each grad row r, in parallel (each row by exactly one task):
//!         catch up k missed steps; apply the rule's update
//!     steps += 1
//! ```

use std::marker::PhantomData;

use hashbrown::HashMap;
use rayon::prelude::*;

use super::groups::Groups;
use super::linear::{Coefs, MAX_TUPLE, Map};
use super::{OptimizerState, StateArray};
use crate::aligned::{AlignedBuf, SendPtr, stride_for};
use crate::index::Index;
use crate::kernels::{self, BLOCK_VECTORS, Kernel, Simd, Tier};
use crate::{EmbeddingTable, Error, Result, SparseGrad};

/// Below this many floats of rows to update, a pass runs on the calling
/// thread: waking rayon's workers would cost more than the work.
const PARALLEL_MIN_FLOATS: usize = 1 << 15;

/// Floats (weights and state) per parallel task.
const TASK_FLOATS: usize = 1 << 15;

/// Rows prefetched ahead of the one being updated: rows are scattered over
/// the table, and each costs a DRAM round trip without a prefetch. They
/// are prefetched into L2, not L1: on the 2-core Zen 4 of WORKLOADS.md
/// that made the fused W5 SGD step 1.3x faster (L1 prefetches of 8 rows
/// of 8 lines fill the L1's few miss buffers and stall); distances of 4
/// to 64 rows all measured the same.
const PREFETCH_AHEAD: usize = 8;

/// "No catch-up needed" in a per-row coefficient index.
const CURRENT: u32 = u32::MAX;

/// One row of the weights and of each state array (in that order); the
/// entries past the rule's tuple are empty.
type Lanes<'r> = [&'r mut [f32]; MAX_TUPLE];

/// The update of one optimizer, as its core needs it.
pub(crate) trait Rule: Sync {
    /// The state arrays, in tuple order after the weight: name and initial value.
    fn arrays(&self) -> &[(&'static str, f32)];

    /// Whether the state arrays hold one float per row (else one per lane).
    fn per_row(&self) -> bool {
        false
    }

    /// Whether absent rows catch up the steps they missed (`DenseExact`).
    fn dense_exact(&self) -> bool {
        false
    }

    /// The zero-gradient step on a lane's `(weight, state…)` tuple.
    fn zero_grad_map(&self) -> Map {
        Map::identity(1 + self.arrays().len())
    }

    /// Updates one row (its weights, then its state arrays, from `rows`;
    /// all padded rows of `stride` floats, or one float for per-row state)
    /// with its summed gradient `g` (read a block at a time, pad lanes
    /// zero); the row has `dim` real lanes.
    ///
    /// Implementations must map zero pads (weight, state, gradient) to zero
    /// weight pads, and compute lane `j` from lane `j` only (a reduction
    /// over the row, as row-wise Adagrad takes, must use a fixed order).
    fn update<S: Simd>(&self, s: S, rows: RowSet<'_>, g: &impl GradRow<S>, dim: usize);
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
        // it is alive: [`Visit`] makes one `RowSet` per row it owns, and
        // `take` consumes it.
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

/// A summed gradient that lies in memory as a padded row (pads zero).
pub(crate) struct Padded<'a>(pub(crate) &'a [f32]);

impl<S: Simd> GradRow<S> for Padded<'_> {
    #[inline(always)]
    fn block<const V: usize>(&self, s: S, i: usize) -> [S::V; V] {
        let lanes = &self.0[i..i + V * S::N];
        let mut block = [s.splat(0.0); V];
        for (v, x) in block.iter_mut().enumerate() {
            *x = s.load(&lanes[v * S::N..]);
        }
        block
    }
}

/// `0 + first + later[0] + later[1] + …`, lane by lane: `first` holds the
/// row's `dim` real lanes, `later` whole padded rows of `stride` floats.
/// This is bitwise what [`SparseGrad`] stores, whose slot starts at `+0.0`
/// (so a `-0.0` sum comes out `+0.0` in both) and adds `1 · g` (`1 · x == x`).
struct Summed<'a> {
    first: &'a [f32],
    later: &'a [f32],
    stride: usize,
}

impl<S: Simd> GradRow<S> for Summed<'_> {
    #[inline(always)]
    fn block<const V: usize>(&self, s: S, i: usize) -> [S::V; V] {
        let (dim, zero) = (self.first.len(), s.splat(0.0));
        let mut sum = [zero; V];
        if i + V * S::N <= dim {
            let first = &self.first[i..i + V * S::N];
            for (v, sum) in sum.iter_mut().enumerate() {
                *sum = s.add(zero, s.load(&first[v * S::N..]));
            }
        } else {
            // The block holding the row's last real lane (and pads).
            for (v, sum) in sum.iter_mut().enumerate() {
                let at = i + v * S::N;
                let first = if at + S::N <= dim {
                    s.load(&self.first[at..])
                } else if at < dim {
                    s.load_partial(&self.first[at..])
                } else {
                    zero
                };
                *sum = s.add(zero, first);
            }
        }
        for row in self.later.chunks_exact(self.stride) {
            let later = &row[i..i + V * S::N];
            for (v, sum) in sum.iter_mut().enumerate() {
                *sum = s.add(*sum, s.load(&later[v * S::N..]));
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
pub(crate) trait Config: Copy {
    /// The rule this config describes.
    type Rule: Rule;
    /// The `kind` of its `OptimizerState`.
    const KIND: &'static str;
    /// The config field names, as saved.
    const FIELDS: &'static [&'static str];
    /// Checks every field.
    fn check(&self) -> Result<()>;
    /// The update rule (precomputed scalars).
    fn rule(&self) -> Self::Rule;
    /// Every field, by name, as `f64`.
    fn to_fields(&self) -> Vec<(String, f64)>;
    /// The config back from [`to_fields`](Self::to_fields)'s output.
    fn from_fields(fields: &super::config::Fields<'_>) -> Result<Self>;
}

/// The state arrays of an optimizer, bound to one table shape.
#[derive(Clone, Debug)]
struct StateTables {
    rows: usize,
    dim: usize,
    stride: usize,
    per_row: bool,
    arrays: Vec<AlignedBuf>,
    /// `DenseExact`: row `r` has seen the first `last[r]` steps.
    last: Option<Vec<u64>>,
}

impl StateTables {
    fn new<R: Rule>(rule: &R, rows: usize, dim: usize) -> Result<Self> {
        let stride = stride_for(dim);
        let per_row = rule.per_row();
        let len = if per_row {
            rows
        } else {
            rows.checked_mul(stride).ok_or(Error::Alloc {
                what: "optimizer state",
                bytes: usize::MAX,
            })?
        };
        let mut arrays = Vec::with_capacity(rule.arrays().len());
        for &(_, init) in rule.arrays() {
            let mut buf = AlignedBuf::zeroed(len, "optimizer state")?;
            if init != 0.0 {
                let width = if per_row { 1 } else { stride };
                // Real lanes only: pad lanes of state stay zero like the weights'.
                buf.as_mut_slice()
                    .par_chunks_mut(width)
                    .with_min_len(1024)
                    .for_each(|row| row[..width.min(dim)].fill(init));
            }
            arrays.push(buf);
        }
        let last = if rule.dense_exact() {
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

    fn check_table(&self, table: &EmbeddingTable) -> Result<()> {
        if table.rows() != self.rows {
            return Err(Error::ShapeMismatch {
                what: "table rows (the optimizer state's)",
                expected: self.rows,
                got: table.rows(),
            });
        }
        if table.dim() != self.dim {
            return Err(Error::ShapeMismatch {
                what: "table dim (the optimizer state's)",
                expected: self.dim,
                got: table.dim(),
            });
        }
        Ok(())
    }
}

/// Per-call working memory of the catch-up, kept between calls.
#[derive(Clone, Debug, Default)]
struct Scratch {
    /// Per visited row: index into `coefs`, or `CURRENT`.
    coef_of: Vec<u32>,
    /// `Mᵏ` for each distinct `k` of this call.
    coefs: Vec<Coefs>,
    by_k: HashMap<u64, u32>,
    /// Rows to visit (flush and catch-up).
    targets: Vec<usize>,
    /// A lookup's positions grouped by row (`step_lookup`).
    groups: Groups,
}

impl Scratch {
    fn reset(&mut self) {
        self.coef_of.clear();
        self.coefs.clear();
        self.by_k.clear();
        self.targets.clear();
    }

    /// The coefficients bringing a row from `last` to `now`, memoised per `k`.
    fn coef_index(&mut self, map: &Map, k: u64) -> u32 {
        Self::coef_index_in(&mut self.coefs, &mut self.by_k, map, k)
    }

    /// [`coef_index`](Self::coef_index) on the two fields it uses, so the
    /// other fields may stay borrowed.
    fn coef_index_in(
        coefs: &mut Vec<Coefs>,
        by_k: &mut HashMap<u64, u32>,
        map: &Map,
        k: u64,
    ) -> u32 {
        if k == 0 {
            return CURRENT;
        }
        *by_k.entry(k).or_insert_with(|| {
            coefs.push(map.power(k));
            (coefs.len() - 1) as u32
        })
    }
}

/// The state every optimizer keeps, and the algorithms on it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Core {
    steps: u64,
    tables: Option<StateTables>,
    scratch: Scratch,
}

impl Core {
    /// The step counter, the state tables (allocated for `table` on the
    /// first step) and the scratch, borrowed apart.
    fn parts<R: Rule>(
        &mut self,
        rule: &R,
        table: &EmbeddingTable,
    ) -> Result<(&mut u64, &mut StateTables, &mut Scratch)> {
        if self.tables.is_none() {
            self.tables = Some(StateTables::new(rule, table.rows(), table.dim())?);
        }
        let Self {
            steps,
            tables,
            scratch,
        } = self;
        Ok((steps, tables.as_mut().expect("allocated above"), scratch))
    }

    /// Whether rows may lag behind the step counter (`DenseExact` after
    /// the first step), so that `catch_up` has work to do.
    pub(crate) fn has_lagging_rows(&self) -> bool {
        self.tables.as_ref().is_some_and(|t| t.last.is_some())
    }

    /// One step (see the module docs).
    pub(crate) fn step<C: Config>(
        &mut self,
        config: &C,
        table: &mut EmbeddingTable,
        grad: &SparseGrad,
    ) -> Result<()> {
        // Validate everything before writing anything.
        config.check()?;
        if grad.dim() != table.dim() {
            return Err(Error::ShapeMismatch {
                what: "gradient dim (the table's)",
                expected: table.dim(),
                got: grad.dim(),
            });
        }
        if let Some(tables) = &self.tables {
            tables.check_table(table)?;
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
        let rule = config.rule();
        let (steps, tables, scratch) = self.parts(&rule, table)?;

        // DenseExact: how far behind each touched row is. Rows of a
        // SparseGrad are distinct, so each is seen once here.
        scratch.reset();
        let mut coef_of = None;
        if let Some(last) = &mut tables.last {
            let map = rule.zero_grad_map();
            let identity = map.is_identity();
            for &r in grad.rows() {
                let k = if identity { 0 } else { *steps - last[r] };
                last[r] = *steps + 1;
                let c = scratch.coef_index(&map, k);
                scratch.coef_of.push(c);
            }
            if !scratch.coefs.is_empty() {
                coef_of = Some(&scratch.coef_of[..]);
            }
        }
        visit(
            kernels::current(),
            &rule,
            table,
            tables,
            grad.rows(),
            Some(&Slots {
                grads: grad.as_padded(),
                stride: grad.stride(),
            }),
            coef_of,
            &scratch.coefs,
        );
        *steps += 1;
        Ok(())
    }

    /// One step with the gradient of `table.lookup(ids)` given `grad_out`,
    /// fused: each distinct row's gradient is summed right before its
    /// update, so weights and state are read and written once and no
    /// coalesced gradient is stored. Bitwise the same as accumulating a
    /// [`SparseGrad`] and calling [`step`](Self::step).
    ///
    /// ```text
    /// validate config, shapes, ids < table.rows()
    /// group the positions by row (groups.rs): rows in first-seen order
    /// check grad_out finite, copying the later positions' rows to scratch
    /// if the sums might overflow: accumulate a SparseGrad and step (it checks the sums)
    ///                                                   (nothing written until here)
    /// DenseExact: catch-up coefficients per row, as step
    /// for each row r, in parallel (each row by exactly one task):
    ///     g = 0 + grad_out[first position of r] + scratch rows of its later positions, in order
    ///     catch up; apply the rule's update with g
    /// ```
    pub(crate) fn step_lookup<C: Config, I: Index>(
        &mut self,
        config: &C,
        table: &mut EmbeddingTable,
        ids: &[I],
        grad_out: &[f32],
    ) -> Result<()> {
        // Validate everything before writing anything.
        config.check()?;
        let dim = table.dim();
        let expected = ids.len().saturating_mul(dim);
        if grad_out.len() != expected {
            return Err(Error::ShapeMismatch {
                what: "gradient length (ids * dim)",
                expected,
                got: grad_out.len(),
            });
        }
        if let Some(tables) = &self.tables {
            tables.check_table(table)?;
        }
        crate::index::validate_ids(ids, table.rows())?;
        // Group the ids, then check the gradient while copying the rows of
        // the ids' later occurrences next to each other. Nothing outside
        // this optimizer's scratch is written until the check has passed.
        let tier = kernels::current();
        let groups = &mut self.scratch.groups;
        let fused = Groups::fits(ids.len());
        let scanned = if fused {
            // SAFETY: ids were validated against `table.rows()` and fit.
            unsafe { groups.build(ids, table.rows()) };
            groups
                .copy_later(tier, grad_out, dim, table.stride())
                .finish("gradient", grad_out)?
        } else {
            crate::grad::scan("gradient", grad_out)?
        };
        let (bound, terms) = (scanned.max_abs as f64 * ids.len() as f64, ids.len() as u64);
        if !fused || !crate::grad::sums_proven_finite(bound, terms) {
            // Sums of huge values may overflow: let the stored gradient
            // check them before anything is written. (Rare: the sums
            // are proven finite unless `max|g| · ids.len()` nears f32::MAX.)
            let mut grad = SparseGrad::for_table(table);
            grad.accumulate_lookup(ids, grad_out)?;
            return self.step(config, table, &grad);
        }
        let rule = config.rule();
        let (steps, tables, scratch) = self.parts(&rule, table)?;
        scratch.reset();
        let rows = scratch.groups.rows();

        // DenseExact: as in `step` (the grouped rows are distinct).
        let mut coef_of = None;
        if let Some(last) = &mut tables.last {
            let map = rule.zero_grad_map();
            let identity = map.is_identity();
            for &r in rows {
                let k = if identity { 0 } else { *steps - last[r] };
                last[r] = *steps + 1;
                let c = Scratch::coef_index_in(&mut scratch.coefs, &mut scratch.by_k, &map, k);
                scratch.coef_of.push(c);
            }
            if !scratch.coefs.is_empty() {
                coef_of = Some(&scratch.coef_of[..]);
            }
        }
        let grads = Grouped {
            grad_out,
            dim,
            stride: table.stride(),
            heads: scratch.groups.heads(),
            later: scratch.groups.later(),
            scratch: scratch.groups.scratch(),
            direct: dim == table.stride() && !scanned.negative_zero,
        };
        visit(
            tier,
            &rule,
            table,
            tables,
            rows,
            Some(&grads),
            coef_of,
            &scratch.coefs,
        );
        *steps += 1;
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
            return Ok(()); // Lazy
        };
        let rule = config.rule();
        let map = rule.zero_grad_map();
        let now = self.steps;
        let scratch = &mut self.scratch;
        scratch.reset();
        if map.is_identity() {
            match rows {
                Some(rows) => rows.iter().for_each(|&r| last[r] = now),
                None => last.fill(now),
            }
            return Ok(());
        }
        // Setting last[r] on the first visit makes a duplicate's k zero, so
        // each row enters `targets` at most once.
        let mut plan = |r: usize, last: &mut [u64]| {
            let c = scratch.coef_index(&map, now - last[r]);
            last[r] = now;
            if c != CURRENT {
                scratch.targets.push(r);
                scratch.coef_of.push(c);
            }
        };
        match rows {
            Some(rows) => rows.iter().for_each(|&r| plan(r, last)),
            None => (0..last.len()).for_each(|r| plan(r, last)),
        }
        visit(
            kernels::current(),
            &rule,
            table,
            tables,
            &scratch.targets,
            None::<&Slots<'_>>,
            Some(&scratch.coef_of),
            &scratch.coefs,
        );
        Ok(())
    }

    /// The whole state, for a checkpoint.
    pub(crate) fn export<C: Config>(&self, config: &C) -> OptimizerState {
        let rule = config.rule();
        let mut state = OptimizerState {
            kind: C::KIND.to_owned(),
            config: config.to_fields(),
            steps: self.steps,
            ..OptimizerState::default()
        };
        let Some(t) = &self.tables else {
            return state;
        };
        state.shape = Some((t.rows, t.dim));
        for (&(name, _), buf) in rule.arrays().iter().zip(&t.arrays) {
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
                name: name.to_owned(),
                shape,
                values,
            });
        }
        state.last_step = t.last.clone().unwrap_or_default();
        state
    }

    /// A config and core from a saved state, checked against each other.
    pub(crate) fn import<C: Config>(state: &OptimizerState) -> Result<(C, Core)> {
        if state.kind != C::KIND {
            return Err(Error::InvalidConfig {
                field: "kind",
                reason: format!("expected {:?}, got {:?}", C::KIND, state.kind),
            });
        }
        let fields = super::config::Fields::new(C::KIND, &state.config, C::FIELDS)?;
        let config = C::from_fields(&fields)?;
        config.check()?;
        let rule = config.rule();
        let Some((rows, dim)) = state.shape else {
            if state.steps != 0 || !state.arrays.is_empty() || !state.last_step.is_empty() {
                return Err(Error::InvalidConfig {
                    field: "shape",
                    reason: format!(
                        "a state without a table shape must be empty, got {} steps, {} arrays",
                        state.steps,
                        state.arrays.len()
                    ),
                });
            }
            return Ok((config, Core::default()));
        };
        let mut tables = StateTables::new(&rule, rows, dim)?;
        let expected: Vec<&str> = rule.arrays().iter().map(|&(n, _)| n).collect();
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
        let want_shape = if tables.per_row {
            vec![rows]
        } else {
            vec![rows, dim]
        };
        for (saved, buf) in state.arrays.iter().zip(&mut tables.arrays) {
            Error::check_len("state array rank", want_shape.len(), saved.shape.len())?;
            for (what, (&want, &got)) in ["state array rows", "state array columns"]
                .into_iter()
                .zip(want_shape.iter().zip(&saved.shape))
            {
                Error::check_len(what, want, got)?;
            }
            Error::check_len(
                "state array values",
                want_shape.iter().product(),
                saved.values.len(),
            )?;
            crate::grad::check_finite("optimizer state", &saved.values)?;
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
        match &mut tables.last {
            Some(last) => {
                Error::check_len("last_step length", rows, state.last_step.len())?;
                if let Some(bad) = state.last_step.iter().find(|&&l| l > state.steps) {
                    return Err(Error::InvalidConfig {
                        field: "last_step",
                        reason: format!("a row has seen {bad} steps of {}", state.steps),
                    });
                }
                last.copy_from_slice(&state.last_step);
            }
            None => Error::check_len(
                "last_step length (empty unless DenseExact)",
                0,
                state.last_step.len(),
            )?,
        }
        let core = Core {
            steps: state.steps,
            tables: Some(tables),
            scratch: Scratch::default(),
        };
        Ok((config, core))
    }
}

/// `Err(NonFinite)` for the first NaN or infinite summed gradient value,
/// positioned as `slot * dim + column`. (A `SparseGrad` holds only finite
/// inputs, but their sums may overflow; it skips this pass when it can
/// prove they did not.)
fn check_finite(grad: &SparseGrad) -> Result<()> {
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

/// Where the gradient of each visited row comes from.
pub(crate) trait RowGrads: Sync {
    /// Starts loading what [`update`](Self::update) of visited row `i` will read.
    fn prefetch(&self, i: usize);

    /// Applies `rule` to `rows` with the gradient of visited row `i`.
    fn update<S: Simd, R: Rule>(&self, s: S, rule: &R, i: usize, rows: RowSet<'_>, dim: usize);
}

/// The summed gradients of a [`SparseGrad`]: visited row `i` is slot `i`.
pub(crate) struct Slots<'a> {
    grads: &'a [f32],
    stride: usize,
}

impl RowGrads for Slots<'_> {
    #[inline(always)]
    fn prefetch(&self, _i: usize) {
        // Slots are read in order: the hardware prefetcher follows them.
    }

    #[inline(always)]
    fn update<S: Simd, R: Rule>(&self, s: S, rule: &R, i: usize, rows: RowSet<'_>, dim: usize) {
        let g = Padded(&self.grads[i * self.stride..][..self.stride]);
        rule.update(s, rows, &g, dim);
    }
}

/// The gradient of a lookup, grouped but not summed: visited row `i` is
/// group `i` of [`Groups`], and its gradient is the sum of its positions'
/// rows of `grad_out`, taken in batch order, as [`SparseGrad`] sums them:
/// the first position's row from `grad_out`, the later ones' from the
/// groups' scratch.
pub(crate) struct Grouped<'a> {
    grad_out: &'a [f32],
    dim: usize,
    stride: usize,
    heads: &'a [u32],
    later: &'a [u32],
    scratch: &'a [f32],
    /// Whether a row looked up once may be handed over as it lies in
    /// `grad_out`: its rows are whole padded rows (`dim == stride`) and hold
    /// no `-0.0` (which the stored gradient's `+0.0 + x` turns into `+0.0`).
    direct: bool,
}

impl RowGrads for Grouped<'_> {
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        // Rows looked up once come in batch order, but the hardware
        // prefetcher stops at each 4 KiB page of `grad_out`: without this
        // the update waits for them. (The scratch is read in order too;
        // prefetching it made no difference.)
        let head = self
            .grad_out
            .as_ptr()
            .wrapping_add(self.heads[i] as usize * self.dim);
        kernels::prefetch_lines_l2(head, self.dim);
    }

    #[inline(always)]
    fn update<S: Simd, R: Rule>(&self, s: S, rule: &R, i: usize, rows: RowSet<'_>, dim: usize) {
        let first = &self.grad_out[self.heads[i] as usize * self.dim..][..self.dim];
        let later = self.later[i] as usize..self.later[i + 1] as usize;
        if later.is_empty() && self.direct {
            // `0 + x == x` bitwise unless `x` is `-0.0`, which `direct` excludes.
            rule.update(s, rows, &Padded(first), dim);
        } else {
            let g = Summed {
                first,
                later: &self.scratch[later.start * self.stride..later.end * self.stride],
                stride: self.stride,
            };
            rule.update(s, rows, &g, dim);
        }
    }
}

/// Visits `rows` (distinct, each `< table.rows()`): catches up row `i` with
/// `coefs[coef_of[i]]` if any, then applies `rule` with gradient `i` of
/// `grads` if any. Parallel over rows above a size threshold.
#[allow(clippy::too_many_arguments)]
fn visit<R: Rule, G: RowGrads>(
    tier: Tier,
    rule: &R,
    table: &mut EmbeddingTable,
    tables: &mut StateTables,
    rows: &[usize],
    grads: Option<&G>,
    coef_of: Option<&[u32]>,
    coefs: &[Coefs],
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
    let run = |start: usize, rows: &[usize]| {
        kernels::dispatch(
            tier,
            Visit {
                rule,
                rows,
                start,
                grads,
                coef_of: coef_of.map(|c| &c[start..start + rows.len()]),
                coefs,
                bufs,
                dim: table_dim,
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
struct Visit<'a, R, G> {
    rule: &'a R,
    rows: &'a [usize],
    /// Index of `rows[0]` among all visited rows (for `grads`).
    start: usize,
    grads: Option<&'a G>,
    coef_of: Option<&'a [u32]>,
    coefs: &'a [Coefs],
    /// The weights, then each state array.
    bufs: &'a [DisjointRows<'a>],
    dim: usize,
}

impl<R: Rule, G: RowGrads> Kernel for Visit<'_, R, G> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        for (i, &r) in self.rows.iter().enumerate() {
            if let Some(&ahead) = self.rows.get(i + PREFETCH_AHEAD) {
                for b in self.bufs {
                    kernels::prefetch_lines_l2(b.start(ahead), b.width);
                }
                if let Some(g) = self.grads {
                    g.prefetch(self.start + i + PREFETCH_AHEAD);
                }
            }
            if let Some(c) = self.coef_of.map(|c| c[i])
                && c != CURRENT
            {
                let mut lanes: Lanes<'_> = [&mut [], &mut [], &mut [], &mut []];
                for (lane, b) in lanes.iter_mut().zip(self.bufs) {
                    // SAFETY: `r < rows` of every buffer (validated by the
                    // caller of `visit`), and rows are distinct across all
                    // tasks, so this task holds the only reference to row
                    // `r` (these end before the update's).
                    *lane = unsafe { b.row(r) };
                }
                self.coefs[c as usize].apply(s, &mut lanes);
            }
            if let Some(g) = self.grads {
                let rows = RowSet {
                    bufs: self.bufs,
                    row: r,
                };
                g.update(s, self.rule, self.start + i, rows, self.dim);
            }
        }
    }
}
