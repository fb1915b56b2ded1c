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

use super::linear::{Coefs, MAX_TUPLE, Map};
use super::{OptimizerState, StateArray};
use crate::aligned::{AlignedBuf, SendPtr, stride_for};
use crate::kernels::{self, Kernel, Simd, Tier};
use crate::{EmbeddingTable, Error, Result, SparseGrad};

/// Below this many floats of rows to update, a pass runs on the calling
/// thread: waking rayon's workers would cost more than the work.
const PARALLEL_MIN_FLOATS: usize = 1 << 15;

/// Floats (weights and state) per parallel task.
const TASK_FLOATS: usize = 1 << 15;

/// Rows prefetched ahead of the one being updated: rows are scattered over
/// the table, and each costs a DRAM round trip without a prefetch.
const PREFETCH_AHEAD: usize = 8;

/// "No catch-up needed" in a per-row coefficient index.
const CURRENT: u32 = u32::MAX;

/// One row of the weights and of each state array (in that order); the
/// entries past the rule's tuple are empty.
pub(crate) type Lanes<'r> = [&'r mut [f32]; MAX_TUPLE];

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

    /// Updates one row (`lanes[0]` the weights, then the state arrays; all
    /// padded rows of `stride` floats, or one float for per-row state) with
    /// its summed gradient `g` (`stride` floats, pad lanes zero); the row
    /// has `dim` real lanes.
    ///
    /// Implementations must map zero pads (weight, state, gradient) to zero
    /// weight pads, and compute lane `j` from lane `j` only (a reduction
    /// over the row, as row-wise Adagrad takes, must use a fixed order).
    fn update<S: Simd>(&self, s: S, lanes: &mut Lanes<'_>, g: &[f32], dim: usize);
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

/// Calls `f(i)` for every vector `i..i + S::N` of a padded row of `len`
/// floats (`len` is a multiple of 16, so of `S::N`: there is no tail).
#[inline(always)]
pub(crate) fn each_vector<S: Simd>(len: usize, mut f: impl FnMut(usize)) {
    debug_assert_eq!(len % S::N, 0);
    let mut i = 0;
    while i < len {
        f(i);
        i += S::N;
    }
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
        if k == 0 {
            return CURRENT;
        }
        let coefs = &mut self.coefs;
        *self.by_k.entry(k).or_insert_with(|| {
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
        if self.tables.is_none() {
            self.tables = Some(StateTables::new(&rule, table.rows(), table.dim())?);
        }
        let Self {
            steps,
            tables,
            scratch,
        } = self;
        let tables = tables.as_mut().expect("allocated above");

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
            Some(grad.as_padded()),
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
            None,
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
            check_len("state array rank", want_shape.len(), saved.shape.len())?;
            for (what, (&want, &got)) in ["state array rows", "state array columns"]
                .into_iter()
                .zip(want_shape.iter().zip(&saved.shape))
            {
                check_len(what, want, got)?;
            }
            check_len(
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
                check_len("last_step length", rows, state.last_step.len())?;
                if let Some(bad) = state.last_step.iter().find(|&&l| l > state.steps) {
                    return Err(Error::InvalidConfig {
                        field: "last_step",
                        reason: format!("a row has seen {bad} steps of {}", state.steps),
                    });
                }
                last.copy_from_slice(&state.last_step);
            }
            None => check_len(
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

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            expected,
            got,
        })
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

/// Visits `rows` (distinct, each `< table.rows()`): catches up row `i` with
/// `coefs[coef_of[i]]` if any, then applies `rule` with gradient slot `i`
/// of `grads` if any. Parallel over rows above a size threshold.
#[allow(clippy::too_many_arguments)]
fn visit<R: Rule>(
    tier: Tier,
    rule: &R,
    table: &mut EmbeddingTable,
    tables: &mut StateTables,
    rows: &[usize],
    grads: Option<&[f32]>,
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
        let end = start + rows.len();
        kernels::dispatch(
            tier,
            Visit {
                rule,
                rows,
                grads: grads.map(|g| &g[start * stride..end * stride]),
                coef_of: coef_of.map(|c| &c[start..end]),
                coefs,
                bufs,
                stride,
                dim: table_dim,
            },
        )
    };
    if rows.len() * floats_per_row < PARALLEL_MIN_FLOATS {
        run(0, rows);
    } else {
        // Each task gets a run of distinct rows (SparseGrad's rows are
        // distinct; flush and catch-up dedupe theirs), so no row of the
        // weights or of any state array is written by two tasks, and each
        // row's result is the same whichever task computes it.
        let per_task = (TASK_FLOATS / floats_per_row).max(1);
        rows.par_chunks(per_task)
            .enumerate()
            .for_each(|(t, chunk)| run(t * per_task, chunk));
    }
}

/// The body of [`visit`] for one run of rows, compiled per tier.
struct Visit<'a, R> {
    rule: &'a R,
    rows: &'a [usize],
    /// Gradient slots of these rows, `stride` floats each.
    grads: Option<&'a [f32]>,
    coef_of: Option<&'a [u32]>,
    coefs: &'a [Coefs],
    /// The weights, then each state array.
    bufs: &'a [DisjointRows<'a>],
    stride: usize,
    dim: usize,
}

impl<R: Rule> Kernel for Visit<'_, R> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        for (i, &r) in self.rows.iter().enumerate() {
            if let Some(&ahead) = self.rows.get(i + PREFETCH_AHEAD) {
                for b in self.bufs {
                    kernels::prefetch_row(b.start(ahead), b.width);
                }
            }
            let mut lanes: Lanes<'_> = [&mut [], &mut [], &mut [], &mut []];
            for (lane, b) in lanes.iter_mut().zip(self.bufs) {
                // SAFETY: `r < rows` of every buffer (validated by the
                // caller of `visit`), and rows are distinct across all
                // tasks, so this task holds the only reference to row `r`.
                *lane = unsafe { b.row(r) };
            }
            if let Some(c) = self.coef_of.map(|c| c[i])
                && c != CURRENT
            {
                self.coefs[c as usize].apply(s, &mut lanes);
            }
            if let Some(g) = self.grads {
                let g = &g[i * self.stride..][..self.stride];
                self.rule.update(s, &mut lanes, g, self.dim);
            }
        }
    }
}
