//! `DynamicTable`: rows created for keys as they arrive, in one aligned
//! [`EmbeddingTable`] that every kernel and optimizer works on unchanged.

use rayon::prelude::*;

use super::admission::{Admission, Pending};
use super::changes::ChangeLog;
use super::eviction::{Eviction, Order, RowMeta};
use super::fill::Filler;
use super::keymap::KeyMap;
use super::{Capacity, DynamicConfig, Memory, Stats};
use crate::aligned::{SendPtr, checked_stride};
use crate::index::Index;
use crate::kernels;
use crate::optim::SparseOptimizer;
use crate::optim::engine::{self, Check, Finite, Fresh, TakenGrouping};
use crate::phases::time;
use crate::{Bags, EmbeddingTable, Error, Pooling, Result, SparseGrad};

/// The row every unknown key reads: zeros (or the default set with
/// [`DynamicTable::set_default_row`]), never a key's, never trained.
pub(crate) const DEFAULT_ROW: u32 = 0;

/// The most keys a table can hold: rows are `u32`, and row 0 is the
/// default row.
pub const MAX_KEYS: usize = u32::MAX as usize - 1;

/// Rows of a new table (the default row and the first keys' rows).
const FIRST_ROWS: usize = 16;

/// Ids this far ahead have their key's slot prefetched: far enough for a
/// DRAM fetch to land while the ids in between are probed.
const PROBE_AHEAD: usize = 32;

/// Positions this far ahead have their row's bookkeeping prefetched.
const META_AHEAD: usize = 32;

/// Evicted and admitted keys this far ahead have their map slot prefetched.
const ADMIT_AHEAD: usize = 8;

/// Fresh rows filled per task.
const FILL_TASK_ROWS: usize = 256;

/// Below this many ids, a batch is translated on the calling thread.
const PARALLEL_MIN_IDS: usize = 1 << 12;

/// The key of an id: its bits as a 64-bit two's complement integer, so
/// `-1i64` and `u64::MAX` are the same key and every `u64` is one.
#[inline(always)]
pub(crate) fn key_of<I: Index>(id: I) -> u64 {
    id.widen() as u64
}

/// A table of rows for keys that arrive over time (see the [module
/// docs](super)).
#[derive(Clone, Debug)]
pub struct DynamicTable {
    pub(crate) config: DynamicConfig,
    /// Row 0 is the default row; the others belong to keys or are free.
    pub(crate) weights: EmbeddingTable,
    /// The default row's values, to restore row 0 after a flush moved it.
    pub(crate) default: Vec<f32>,
    pub(crate) map: KeyMap,
    /// One per row of `weights`.
    pub(crate) meta: Vec<RowMeta>,
    /// Rows without a key, taken from the end.
    pub(crate) free: Vec<u32>,
    pub(crate) order: Order,
    pub(crate) pending: Pending,
    /// Steps ended so far: the step now under way.
    pub(crate) step: u64,
    /// Translating calls so far.
    pub(crate) call: u64,
    /// The most keys the capacity allows.
    pub(crate) limit: usize,
    /// Optimizer bytes per row counted against a byte capacity.
    pub(crate) state_bytes: usize,
    pub(crate) stats: Stats,
    pub(crate) changes: Option<ChangeLog>,
    scratch: Scratch,
}

/// A key the batch being translated names and the table has no row for.
#[derive(Clone, Copy, Debug)]
struct NewKey {
    key: u64,
    occurrences: u32,
    admit: bool,
    row: u32,
}

/// Working memory of a translation, kept between calls.
#[derive(Clone, Debug, Default)]
struct Scratch {
    /// The new keys, in the order of their first position.
    news: Vec<NewKey>,
    /// Each new key's place in `news`, plus one.
    index: KeyMap,
    /// `(position, new key)` of every position naming a new key.
    positions: Vec<(usize, usize)>,
    /// Rows that already had a key and were used, in first-use order.
    touched: Vec<u32>,
    /// Rows given to new keys.
    fresh: Vec<usize>,
    /// `(row, key)` of the rows taken from keys for new ones.
    evicted: Vec<(usize, u64)>,
    /// The rows of a fused step's batch.
    rows: Vec<u32>,
    /// Per position, what the fused step's grouping beside the admission
    /// groups by: its row, or for a new key a number past the rows.
    labels: Vec<u32>,
    /// The fused step's groups of admitted keys, ascending, and their
    /// keys: the step draws their rows.
    fresh_groups: Vec<u32>,
    fresh_keys: Vec<u64>,
}

impl Scratch {
    fn bytes(&self) -> usize {
        self.news.capacity() * size_of::<NewKey>()
            + self.index.bytes()
            + self.positions.capacity() * size_of::<(usize, usize)>()
            + self.touched.capacity() * size_of::<u32>()
            + self.fresh.capacity() * size_of::<usize>()
            + self.evicted.capacity() * size_of::<(usize, u64)>()
            + self.rows.capacity() * size_of::<u32>()
            + self.labels.capacity() * size_of::<u32>()
            + self.fresh_groups.capacity() * size_of::<u32>()
            + self.fresh_keys.capacity() * size_of::<u64>()
    }
}

impl DynamicTable {
    /// An empty table of rows of `dim` floats.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `dim` 0, an invalid `init`, admission
    /// or eviction, or a capacity of 0 rows, above [`MAX_KEYS`], or of
    /// fewer bytes than one row takes.
    ///
    /// # Examples
    /// ```
    /// use embtable::dynamic::{Capacity, DynamicConfig, DynamicTable};
    /// let table = DynamicTable::new(16, DynamicConfig { capacity: Capacity::Rows(1000), ..Default::default() })?;
    /// assert_eq!((table.dim(), table.len(), table.capacity()), (16, 0, 1000));
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn new(dim: usize, config: DynamicConfig) -> Result<Self> {
        config.init.validate()?;
        config.admission.validate()?;
        config.eviction.validate()?;
        if dim == 0 {
            return Err(Error::InvalidConfig {
                field: "dim",
                reason: "a table needs at least one column".into(),
            });
        }
        let limit = row_limit(&config, dim, 0)?;
        let rows = FIRST_ROWS.min(limit + 1);
        let weights = EmbeddingTable::zeros(rows, dim)?;
        let mut table = Self {
            config,
            weights,
            default: vec![0.0; dim],
            map: KeyMap::default(),
            meta: vec![RowMeta::default(); rows],
            free: Vec::new(),
            order: Order::new(config.eviction),
            pending: Pending::default(),
            step: 0,
            call: 0,
            limit,
            state_bytes: 0,
            stats: Stats::default(),
            changes: config.track_changes.then(ChangeLog::default),
            scratch: Scratch::default(),
        };
        table.free_new_rows(1);
        Ok(table)
    }

    /// Floats per row.
    pub fn dim(&self) -> usize {
        self.weights.dim()
    }

    /// The settings.
    pub fn config(&self) -> &DynamicConfig {
        &self.config
    }

    /// Keys that have a row.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key has a row.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The most keys the table holds at once (its capacity in rows, or what
    /// its capacity in bytes allows; [`MAX_KEYS`] when unbounded).
    pub fn capacity(&self) -> usize {
        self.limit
    }

    /// Steps ended so far (by [`step`](Self::step) or
    /// [`advance`](Self::advance)).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// What the table has done so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The storage every kernel and optimizer works on: row 0 is the
    /// default row, the others belong to keys ([`row_of`](Self::row_of))
    /// or are free. Its row count grows as keys arrive.
    pub fn weights(&self) -> &EmbeddingTable {
        &self.weights
    }

    /// The row of `key` in [`weights`](Self::weights), if it has one.
    pub fn row_of<I: Index>(&self, key: I) -> Option<usize> {
        self.map.get(key_of(key)).map(|r| r as usize)
    }

    /// The values of `key`'s row, if it has one.
    ///
    /// # Examples
    /// ```
    /// use embtable::dynamic::{DynamicConfig, DynamicTable};
    /// use embtable::Frozen;
    /// let mut table = DynamicTable::new(4, DynamicConfig::default())?;
    /// table.translate(&[42u64], &mut Frozen)?;
    /// assert_eq!(table.get(42u64), Some(&table.initial_row(42u64)[..]));
    /// assert_eq!(table.get(7u64), None);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn get<I: Index>(&self, key: I) -> Option<&[f32]> {
        self.row_of(key).map(|r| self.weights.row(r))
    }

    /// The values `key`'s row starts with when it is admitted: the table's
    /// `Init` drawn from its seed and the key, so the same whatever the
    /// order of arrival or the thread count. (Key `k` starts as row `k` of
    /// `EmbeddingTable::new(rows, dim, init, seed)`.)
    pub fn initial_row<I: Index>(&self, key: I) -> Vec<f32> {
        let mut row = vec![0.0; self.dim()];
        self.config
            .init
            .fill_key_row(self.config.seed, key_of(key), &mut row);
        row
    }

    /// Every key with its row in [`weights`](Self::weights), in row order.
    pub fn keys(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.meta
            .iter()
            .enumerate()
            .filter(|(_, m)| m.occupied())
            .map(|(r, m)| (m.key, r))
    }

    /// What unknown keys read (zeros unless set).
    pub fn default_row(&self) -> &[f32] {
        &self.default
    }

    /// Makes unknown keys (not admitted, or unseen by a read-only table)
    /// read `values` instead of zeros. They still receive no gradient.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless `values.len() == dim`;
    /// [`Error::NonFinite`] for a NaN or infinite value.
    pub fn set_default_row(&mut self, values: &[f32]) -> Result<()> {
        Error::check_len("default row length (dim)", self.dim(), values.len())?;
        crate::grad::check_finite("default row", values)?;
        self.default.copy_from_slice(values);
        self.weights
            .row_mut(DEFAULT_ROW as usize)
            .copy_from_slice(values);
        Ok(())
    }

    /// The memory the table holds, by part (see [`Memory`]).
    pub fn memory(&self) -> Memory {
        Memory {
            weights: size_of_val(self.weights.as_padded()),
            optimizer: self.weights.rows().saturating_mul(self.state_bytes),
            keys: self.map.bytes(),
            bookkeeping: self.meta.capacity() * size_of::<RowMeta>()
                + self.free.capacity() * size_of::<u32>()
                + self.order.bytes()
                + self.pending.bytes(),
            changes: self.changes.as_ref().map_or(0, ChangeLog::bytes),
            scratch: self.scratch.bytes(),
        }
    }

    /// Counts `bytes` of optimizer state per row against a capacity in
    /// bytes (a [`DynamicEmbedding`](super::DynamicEmbedding) does this for
    /// its optimizer with [`SparseOptimizer::state_bytes_per_row`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `capacity`) if the table then holds
    /// more keys, or more rows, than the capacity allows; it is unchanged.
    pub fn count_state_bytes(&mut self, bytes: usize) -> Result<()> {
        let limit = row_limit(&self.config, self.dim(), bytes)?;
        if self.map.len() > limit || self.weights.rows() > limit + 1 {
            return Err(Error::InvalidConfig {
                field: "capacity",
                reason: format!(
                    "with {bytes} bytes of optimizer state per row the capacity holds {limit} \
                     keys, but the table has {} rows for {} keys",
                    self.weights.rows(),
                    self.map.len()
                ),
            });
        }
        self.limit = limit;
        self.state_bytes = bytes;
        Ok(())
    }

    /// The rows of `ids` in [`weights`](Self::weights), read-only: an
    /// unknown key gives row 0, the default row. Nothing is admitted and no
    /// use is recorded.
    pub fn rows_of<I: Index>(&self, ids: &[I]) -> Vec<u32> {
        let mut rows = vec![0; ids.len()];
        self.probe(ids, &mut rows);
        rows
    }

    /// Copies the row of each key of `ids` to `out` (`ids.len() * dim`
    /// floats), read-only: an unknown key reads the default row. Nothing is
    /// admitted and no use is recorded (serving; the training path is
    /// [`translate`](Self::translate)). The keys are translated and the
    /// rows gathered by the fixed table's kernel in the same parallel
    /// tasks.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `out.len() != ids.len() * dim`.
    ///
    /// # Examples
    /// ```
    /// use embtable::dynamic::{DynamicConfig, DynamicTable};
    /// use embtable::Frozen;
    /// let mut table = DynamicTable::new(2, DynamicConfig::default())?;
    /// table.translate(&[10u64, 20], &mut Frozen)?;
    /// let mut out = vec![0.0; 3 * 2];
    /// table.lookup(&[20u64, 99, 10], &mut out)?;
    /// assert_eq!(&out[..2], table.get(20u64).unwrap());
    /// assert_eq!(&out[2..4], &[0.0, 0.0]); // 99 is unknown
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn lookup<I: Index>(&self, ids: &[I], out: &mut [f32]) -> Result<()> {
        let dim = self.dim();
        Error::check_len(
            "lookup output length (ids * dim)",
            ids.len().saturating_mul(dim),
            out.len(),
        )?;
        let tier = kernels::current();
        let stream = crate::table::streams_output(out, dim);
        let per_task = (TASK_FLOATS / dim).clamp(256, TASK_IDS);
        let task = |ids: &[I], out: &mut [f32]| {
            let mut rows = [0u32; TASK_IDS];
            let rows = &mut rows[..ids.len()];
            probe_run(&self.map, ids, rows);
            // SAFETY: every row comes from the map or is row 0, so it is
            // below `weights.rows()`, and `out` holds `ids.len()` rows.
            unsafe { self.weights.gather_serial(tier, rows, out, stream) };
        };
        if ids.len() < PARALLEL_MIN_IDS {
            ids.chunks(per_task)
                .zip(out.chunks_mut(per_task * dim))
                .for_each(|(ids, out)| task(ids, out));
        } else {
            ids.par_chunks(per_task)
                .zip(out.par_chunks_mut(per_task * dim))
                .for_each(|(ids, out)| task(ids, out));
        }
        Ok(())
    }

    /// [`lookup`](Self::lookup) into a new vector.
    ///
    /// # Errors
    /// [`Error::Alloc`] if `ids.len() * dim` floats overflow.
    pub fn lookup_vec<I: Index>(&self, ids: &[I]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; Error::checked_product(ids.len(), self.dim(), "lookup output")?];
        self.lookup(ids, &mut out)?;
        Ok(out)
    }

    /// Pools the rows of each bag of keys into `out` (`bags.len() * dim`
    /// floats), read-only, as [`EmbeddingTable::pooled_lookup`] pools rows:
    /// an unknown key takes part with the default row (it counts in `Mean`
    /// and `SqrtN`).
    ///
    /// # Errors
    /// As [`EmbeddingTable::pooled_lookup`] (ids are never out of range).
    pub fn pooled_lookup<I: Index>(
        &self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()> {
        let rows = self.rows_of(bags.ids());
        let bags = Bags::new(&rows, bags.offsets(), bags.weights())?;
        self.weights.pooled_lookup(&bags, pooling, out)
    }

    /// The rows of `ids` for training: keys without a row are admitted as
    /// the [`Admission`] policy says (taking a free row, growing the
    /// storage, or evicting a key as the [`Eviction`] policy says, when the
    /// table is full), the others' uses are recorded. A key that gets no
    /// row reads row 0 (the default row); drop it from the gradient
    /// ([`step`](Self::step) does).
    ///
    /// `optimizer` is the one that trains [`weights`](Self::weights): the
    /// state of a row given to a new key starts afresh
    /// ([`SparseOptimizer::reset_rows`]), grows with the storage, and under
    /// `DenseExact` an evicted row is brought current before it is logged
    /// ([`DynamicConfig::track_changes`]). Pass
    /// [`Frozen`](crate::Frozen) when nothing trains.
    ///
    /// Every key used in this call keeps its row until the step ends
    /// ([`step`](Self::step) or [`advance`](Self::advance)), so its
    /// gradient reaches it: translate, then look up, accumulate and step.
    ///
    /// # Errors
    /// [`Error::Alloc`] if the storage, the key map or the optimizer state
    /// cannot grow; the errors of the optimizer's `reset_rows` and
    /// `catch_up` (checked before anything changes). Nothing changes on
    /// error.
    ///
    /// # Examples
    /// ```
    /// use embtable::dynamic::{Admission, DynamicConfig, DynamicTable};
    /// use embtable::Frozen;
    /// let config = DynamicConfig { admission: Admission::AfterSightings(2), ..Default::default() };
    /// let mut table = DynamicTable::new(8, config)?;
    /// assert_eq!(table.translate(&[5u64, 6], &mut Frozen)?, [0, 0]); // seen once: no row
    /// let rows = table.translate(&[5u64, 7, 5], &mut Frozen)?;     // 5 seen 3 times
    /// assert_eq!((rows[0], rows[1], rows[2]), (rows[2], 0, rows[0]));
    /// assert_eq!(table.row_of(5u64), Some(rows[0] as usize));
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn translate<I: Index>(
        &mut self,
        ids: &[I],
        optimizer: &mut dyn SparseOptimizer,
    ) -> Result<Vec<u32>> {
        let mut rows = Vec::new();
        self.translate_into(ids, optimizer, &mut rows)?;
        Ok(rows)
    }

    /// [`translate`](Self::translate) into `rows` (resized to `ids.len()`),
    /// so that a training loop reuses one buffer.
    ///
    /// # Errors
    /// As [`translate`](Self::translate).
    pub fn translate_into<I: Index>(
        &mut self,
        ids: &[I],
        optimizer: &mut dyn SparseOptimizer,
        rows: &mut Vec<u32>,
    ) -> Result<()> {
        self.translate_grouping(ids, optimizer, rows, false)
            .map(|_| ())
    }

    /// [`translate_into`](Self::translate_into); if `group`, and every new
    /// key is to be admitted, with the positions grouped by row for
    /// `optimizer`'s fused step meanwhile, on another thread when one is
    /// free (the uses and admissions are sequential): `None` if the
    /// optimizer has no fused step or a key got no row.
    ///
    /// With a grouping, the admitted keys' rows are not drawn yet: the
    /// caller's step draws them ([`step_grouped`](Self::step_grouped)).
    fn translate_grouping<I: Index>(
        &mut self,
        ids: &[I],
        optimizer: &mut dyn SparseOptimizer,
        rows: &mut Vec<u32>,
        group: bool,
    ) -> Result<Option<TakenGrouping>> {
        if ids.len() >= u32::MAX as usize {
            return Err(Error::ShapeMismatch {
                what: "ids in one translation (at most u32::MAX - 1)",
                expected: u32::MAX as usize - 1,
                got: ids.len(),
            });
        }
        rows.clear();
        rows.resize(ids.len(), DEFAULT_ROW);
        time("translate: probe", || self.probe(ids, rows));
        let call = self.call + 1;
        let now = self.step;
        // Which new keys would be admitted: decided from the stream alone.
        time("translate: new keys", || self.collect_new_keys(ids, rows));
        let admission = self.config.admission;
        let mut wanted = 0;
        for new in &mut self.scratch.news {
            let seen = self.pending.seen(new.key);
            new.admit = admission.admits(new.key, seen, new.occurrences, call);
            wanted += new.admit as usize;
        }
        if wanted > 0 {
            time("translate: make room", || self.make_room(wanted, optimizer))?;
        }
        // The grouping's labels: a known key's row, a new key's number
        // from `base` on. Rows given to new keys are never rows the batch
        // names already (those are in use), so labels and the rows after
        // admission are one to one, and grouping by either gives the same
        // groups in the same order.
        let base = self.weights.rows();
        let bound = base + self.scratch.news.len();
        let mut grouped = None;
        if group && wanted == self.scratch.news.len() && bound <= u32::MAX as usize {
            grouped = engine::take_grouping(optimizer, ids.len());
        }
        let positions = std::mem::take(&mut self.scratch.positions);
        let mut labels = std::mem::take(&mut self.scratch.labels);
        {
            let rows: &[u32] = rows;
            let (positions, labels) = (&positions, &mut labels);
            let mut build = |grouped: &mut TakenGrouping| {
                labels.clear();
                labels.extend_from_slice(rows);
                for &(j, k) in positions {
                    labels[j] = (base + k) as u32;
                }
                grouped.build(labels, bound);
            };
            // Nothing can fail from here on: record uses, admit, evict.
            let mut translate = || {
                time("translate: uses", || self.touch(rows, call, now));
                time("translate: admit", || self.admit(admission, call, now));
            };
            match &mut grouped {
                Some(grouped) => {
                    rayon::join(translate, || {
                        time("group beside admission", || build(grouped))
                    });
                }
                None => translate(),
            }
        }
        self.scratch.positions = positions;
        self.scratch.labels = labels;
        let Self {
            scratch,
            order,
            meta,
            map,
            ..
        } = self;
        for &(j, k) in &scratch.positions {
            rows[j] = scratch.news[k].row;
        }
        // Known keys count as used first (`touch`), then the admitted ones.
        let live = map.len();
        for &r in &scratch.fresh {
            order.used(r as u32, meta[r], meta, live);
        }
        order.settle();
        self.call = call;
        self.stats.lookups += ids.len() as u64;
        if self.scratch.news.iter().any(|new| new.row == DEFAULT_ROW)
            && let Some(grouped) = grouped.take()
        {
            // Refused: the step drops its positions and groups the rest.
            engine::give_back(optimizer, grouped);
        }
        let draw = grouped.is_none();
        time("translate: fill", || self.settle_rows(optimizer, draw))?;
        let Some(mut grouped) = grouped else {
            return Ok(None);
        };
        let Scratch {
            news,
            fresh_groups,
            fresh_keys,
            ..
        } = &mut self.scratch;
        fresh_groups.clear();
        fresh_keys.clear();
        grouped.relabel(|group, l| match l.checked_sub(base) {
            Some(k) => {
                // Fits: there are fewer groups than ids.
                fresh_groups.push(group as u32);
                fresh_keys.push(news[k].key);
                news[k].row as usize
            }
            None => l,
        });
        Ok(Some(grouped))
    }

    /// The rows a gradient over `ids` goes to: each key's row now (the
    /// default row for a key without one). A key not used yet in this step
    /// is used now, so that it keeps its row until the step ends; keys used
    /// already are left as they are (a backward pass after its forward pass
    /// changes nothing).
    pub(crate) fn rows_for_gradient<I: Index>(&mut self, ids: &[I]) -> Vec<u32> {
        let mut rows = self.rows_of(ids);
        let now = self.step;
        let in_use = |r: &u32| *r == DEFAULT_ROW || self.meta[*r as usize].step == now;
        if rows.iter().all(in_use) {
            return rows;
        }
        let call = self.call + 1;
        let mut used = Vec::new();
        for r in &mut rows {
            let m = &mut self.meta[*r as usize];
            if *r == DEFAULT_ROW || (m.step == now && m.call != call) {
                continue;
            }
            if m.call != call {
                (m.call, m.step) = (call, now);
                used.push(*r);
            }
            m.count += 1;
        }
        let live = self.map.len();
        for r in used {
            self.order.used(r, self.meta[r as usize], &self.meta, live);
        }
        self.call = call;
        rows
    }

    /// The row of every id, or [`DEFAULT_ROW`].
    fn probe<I: Index>(&self, ids: &[I], rows: &mut [u32]) {
        let map = &self.map;
        if ids.len() < PARALLEL_MIN_IDS {
            probe_run(map, ids, rows);
        } else {
            rows.par_chunks_mut(TASK_IDS)
                .zip(ids.par_chunks(TASK_IDS))
                .for_each(|(rows, ids)| probe_run(map, ids, rows));
        }
    }

    /// Fills `scratch.news` and `scratch.positions` from the positions
    /// whose key has no row. The new keys are numbered in a scratch map
    /// sized for this batch's misses, each probe prefetched a few ahead.
    fn collect_new_keys<I: Index>(&mut self, ids: &[I], rows: &[u32]) {
        let Scratch {
            news,
            index,
            positions,
            ..
        } = &mut self.scratch;
        news.clear();
        positions.clear();
        positions.extend(
            rows.iter()
                .enumerate()
                .filter(|&(_, &row)| row == DEFAULT_ROW)
                .map(|(j, _)| (j, 0)),
        );
        index.clear_for(positions.len());
        for i in 0..positions.len() {
            if let Some(&(ahead, _)) = positions.get(i + PROBE_AHEAD) {
                index.prefetch(key_of(ids[ahead]));
            }
            let key = key_of(ids[positions[i].0]);
            // Fits: a batch has fewer than `u32::MAX` ids (`translate_into`).
            let k = index.get_or_insert(key, news.len() as u32 + 1) as usize - 1;
            if k == news.len() {
                news.push(NewKey {
                    key,
                    occurrences: 0,
                    admit: false,
                    row: DEFAULT_ROW,
                });
            }
            news[k].occurrences = news[k].occurrences.saturating_add(1);
            positions[i].1 = k;
        }
    }

    /// Makes sure `wanted` admissions cannot fail: grows the storage (and
    /// the optimizer state with it) toward the capacity, and the key map.
    fn make_room(&mut self, wanted: usize, optimizer: &mut dyn SparseOptimizer) -> Result<()> {
        let rows = self.weights.rows();
        let short = wanted.saturating_sub(self.free.len());
        let most = self.limit + 1;
        let grown = if short > 0 && rows < most {
            rows.saturating_add(short)
                .max(rows.saturating_mul(2))
                .min(most)
        } else {
            rows
        };
        let new_keys = wanted.min(self.limit - self.map.len().min(self.limit));
        self.map.reserve(new_keys)?;
        if grown > rows {
            let mut weights = EmbeddingTable::zeros(grown, self.dim())?;
            let old = self.weights.as_padded();
            weights.as_padded_mut()[..old.len()].copy_from_slice(old);
            // Grows the optimizer state and checks that it can reset rows.
            optimizer.reset_rows(&weights, &[DEFAULT_ROW as usize])?;
            optimizer.catch_up(&mut weights, &[])?;
            let more = grown - rows;
            try_reserve(&mut self.meta, more, "dynamic table row bookkeeping")?;
            super::advise_huge(&mut self.meta);
            let free_more = grown - self.free.len();
            try_reserve(&mut self.free, free_more, "dynamic table free rows")?;
            if let Some(changes) = &mut self.changes {
                changes.reserve_rows(grown)?;
            }
            self.weights = weights;
            self.meta.resize(grown, RowMeta::default());
            self.free_new_rows(rows);
            self.stats.grown += 1;
        } else {
            optimizer.reset_rows(&self.weights, &[DEFAULT_ROW as usize])?;
            optimizer.catch_up(&mut self.weights, &[])?;
        }
        Ok(())
    }

    /// Puts rows `first..` of the storage on the free list, lowest on top.
    fn free_new_rows(&mut self, first: usize) {
        let rows = self.weights.rows() as u32;
        self.free.extend((first as u32..rows).rev());
    }

    /// Records the use of every row the batch names (`rows[j] != 0`), in
    /// batch order, each row in the eviction order once (LFU: in
    /// `scratch.touched`, entered once the call's counts are known).
    fn touch(&mut self, rows: &[u32], call: u64, now: u64) {
        let meta = &mut self.meta[..];
        let touched = &mut self.scratch.touched;
        touched.clear();
        let by_frequency = self.order.by_frequency();
        let live = self.map.len();
        for (j, &r) in rows.iter().enumerate() {
            if let Some(&ahead) = rows.get(j + META_AHEAD) {
                kernels::prefetch(meta.as_ptr().wrapping_add(ahead as usize).cast());
            }
            if r == DEFAULT_ROW {
                continue;
            }
            let m = &mut meta[r as usize];
            m.count += 1;
            if m.call != call {
                m.call = call;
                m.step = now;
                if by_frequency {
                    touched.push(r);
                } else {
                    let m = *m;
                    self.order.used(r, m, meta, live);
                }
            }
        }
        for &r in touched.iter() {
            self.order.used(r, meta[r as usize], meta, live);
        }
    }

    /// Gives rows to the new keys that are admitted, in first-position
    /// order, evicting when the table is full; counts the others'
    /// sightings. The rows are chosen first, then the key map changes in
    /// two runs, the evicted keys out and the admitted ones in, each probe
    /// prefetched a few keys ahead: the same keys end with the same rows as
    /// when each key is removed and inserted in turn, without each
    /// admission waiting on two probes of a map far larger than the caches.
    fn admit(&mut self, admission: Admission, call: u64, now: u64) {
        let counting = matches!(admission, Admission::AfterSightings(_));
        let pending_limit = self.limit;
        let Scratch {
            news,
            fresh,
            evicted,
            ..
        } = &mut self.scratch;
        fresh.clear();
        evicted.clear();
        let mut keys = self.map.len();
        for new in news.iter_mut() {
            if !new.admit {
                if counting {
                    self.pending
                        .sight(new.key, new.occurrences, call, pending_limit);
                }
                continue;
            }
            let free = if keys >= self.limit {
                None
            } else {
                self.free.pop()
            };
            keys += free.is_some() as usize;
            let row = free.or_else(|| {
                let victim = self.order.victim(self.config.eviction, &self.meta, now)?;
                evicted.push((victim as usize, self.meta[victim as usize].key));
                self.stats.evicted += 1;
                Some(victim)
            });
            let Some(row) = row else {
                self.stats.refused += 1;
                if counting {
                    self.pending
                        .sight(new.key, new.occurrences, call, pending_limit);
                }
                continue;
            };
            if counting {
                self.pending.remove(new.key);
            }
            self.meta[row as usize] = RowMeta {
                key: new.key,
                count: u64::from(new.occurrences),
                call,
                step: now,
            };
            new.row = row;
            fresh.push(row as usize);
            self.stats.admitted += 1;
        }
        for (i, &(_, key)) in evicted.iter().enumerate() {
            if let Some(&(_, ahead)) = evicted.get(i + ADMIT_AHEAD) {
                self.map.prefetch(ahead);
            }
            self.map.remove(key);
        }
        for (i, &row) in fresh.iter().enumerate() {
            if let Some(&ahead) = fresh.get(i + ADMIT_AHEAD) {
                self.map.prefetch(self.meta[ahead].key);
            }
            self.map.insert(self.meta[row].key, row as u32);
        }
    }

    /// After admission: logs the evicted rows (brought current first),
    /// fills the new keys' rows if `draw` and starts their optimizer state
    /// afresh. The optimizer calls were checked by `make_room`.
    fn settle_rows(&mut self, optimizer: &mut dyn SparseOptimizer, draw: bool) -> Result<()> {
        let Scratch { fresh, evicted, .. } = &self.scratch;
        if let Some(changes) = &mut self.changes
            && !evicted.is_empty()
        {
            if optimizer.has_lagging_rows() {
                let rows: Vec<usize> = evicted.iter().map(|&(r, _)| r).collect();
                optimizer.catch_up(&mut self.weights, &rows)?;
            }
            for &(r, key) in evicted {
                changes.evicted(key, self.weights.row(r));
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        if draw {
            self.draw_fresh_rows();
        }
        if let Some(changes) = &mut self.changes {
            changes.mark(self.scratch.fresh.iter().copied());
        }
        // The state alone: the rows' values are not read.
        let reset = optimizer.reset_rows(&self.weights, &self.scratch.fresh);
        if reset.is_err() && !draw {
            self.draw_fresh_rows(); // the keys keep their rows
        }
        reset
    }

    /// Fills the rows given to new keys with their initial values.
    fn draw_fresh_rows(&mut self) {
        let fresh = &self.scratch.fresh;
        let filler = Filler::new(self.config.init, self.config.seed);
        let (dim, stride) = (self.dim(), self.weights.stride());
        let meta = &self.meta;
        let base = SendPtr(self.weights.as_padded_mut().as_mut_ptr());
        fresh.par_chunks(FILL_TASK_ROWS).for_each(|rows| {
            for &r in rows {
                // SAFETY: `r` is a row of the storage, and `fresh` holds
                // each row once (a row given to a new key is pinned for the
                // rest of the call, so it is never given again), so this
                // task alone writes its padded row, which starts a cache
                // line (the storage is 64-byte aligned, strides whole lines).
                let row =
                    unsafe { std::slice::from_raw_parts_mut(base.get().add(r * stride), stride) };
                filler.fill(meta[r].key, row, dim);
            }
            filler.finish();
        });
    }

    /// Applies `grad` (over rows of [`weights`](Self::weights), from rows
    /// [`translate`](Self::translate) gave in this step) with `optimizer`,
    /// then ends the step ([`advance`](Self::advance)). The default row's
    /// gradient, if any, is dropped from `grad` first: unknown keys are
    /// not trained.
    ///
    /// # Errors
    /// The optimizer's; nothing is applied then and the step does not end.
    pub fn step(
        &mut self,
        optimizer: &mut dyn SparseOptimizer,
        grad: &mut SparseGrad,
    ) -> Result<()> {
        self.apply(optimizer, grad, None)?;
        self.advance(optimizer)
    }

    /// [`step`](Self::step) without ending the step, and with the rows it
    /// updated rescaled to at most `max_norm` (as
    /// [`EmbeddingTable::renorm_rows`]) if given.
    pub(crate) fn apply(
        &mut self,
        optimizer: &mut dyn SparseOptimizer,
        grad: &mut SparseGrad,
        max_norm: Option<f32>,
    ) -> Result<()> {
        grad.remove_row(DEFAULT_ROW as usize);
        optimizer.step(&mut self.weights, grad)?;
        if let Some(max_norm) = max_norm {
            self.weights.renorm_rows(grad.rows(), max_norm)?;
        }
        if let Some(changes) = &mut self.changes {
            changes.mark(grad.rows().iter().copied());
        }
        Ok(())
    }

    /// One training step from a lookup's output gradient: translates `ids`
    /// (admitting new keys), applies the gradient of their rows with the
    /// optimizer's fused `step_lookup`, and ends the step. The same as
    /// `translate`, a `SparseGrad` of the rows and [`step`](Self::step),
    /// bit for bit.
    ///
    /// # Errors
    /// As [`translate`](Self::translate) and
    /// [`SparseOptimizer::step_lookup`]. If the step fails after the
    /// translation, the keys admitted keep their rows.
    pub fn step_lookup<I: Index, O: SparseOptimizer>(
        &mut self,
        optimizer: &mut O,
        ids: &[I],
        grad_out: &[f32],
    ) -> Result<()> {
        let dim = self.dim();
        Error::check_len(
            "gradient length (ids * dim)",
            ids.len().saturating_mul(dim),
            grad_out.len(),
        )?;
        let mut rows = std::mem::take(&mut self.scratch.rows);
        let result = self.translate_and_step(optimizer, ids, grad_out, &mut rows);
        self.scratch.rows = rows;
        result
    }

    /// [`step_lookup`](Self::step_lookup) once `grad_out`'s length is
    /// checked. On several threads, with one of this crate's optimizers,
    /// one thread checks `grad_out` finite while the batch is translated
    /// (the fixed table's `step_lookup` checks it beside its grouping, which
    /// takes less time than a translation), and the step uses that check.
    fn translate_and_step<I: Index, O: SparseOptimizer>(
        &mut self,
        optimizer: &mut O,
        ids: &[I],
        grad_out: &[f32],
        rows: &mut Vec<u32>,
    ) -> Result<()> {
        let dim = self.dim();
        let fused = optimizer.fused().is_some();
        let (scan, grouped) = if rayon::current_num_threads() > 1 && fused {
            let tier = kernels::current();
            let mut scan = None;
            let grouped = time("translate beside scan", || {
                rayon::in_place_scope(|s| {
                    s.spawn(|_| {
                        scan = Some(time("scan", || crate::grad::scan_all(tier, grad_out)))
                    });
                    self.translate_grouping(ids, optimizer, rows, true)
                })
            })?;
            (scan, grouped)
        } else if fused {
            // Grouped as the fused step would, so that the step draws the
            // admitted rows.
            let grouped = time("translate", || {
                self.translate_grouping(ids, optimizer, rows, true)
            })?;
            (None, grouped)
        } else {
            time("translate", || self.translate_into(ids, optimizer, rows))?;
            (None, None)
        };
        if let Some(grouped) = grouped {
            let check = scan.map_or(Check::Scan, Check::Scanned);
            self.step_grouped(optimizer, rows, grad_out, grouped, check)?;
        } else if rows.contains(&DEFAULT_ROW) {
            // The scan covered the positions dropped here: not used.
            let (rows, grad) = known_positions(rows, grad_out, dim);
            optimizer.step_lookup(&mut self.weights, &rows, &grad)?;
        } else if let Some(found) = scan {
            let finite = Finite::Scanned(found);
            engine::step_lookup(optimizer, &mut self.weights, rows, grad_out, finite)?;
        } else {
            optimizer.step_lookup(&mut self.weights, rows, grad_out)?;
        }
        self.mark_changed(rows);
        self.advance(optimizer)
    }

    /// The fused step of a batch grouped by its translation, which draws
    /// the admitted keys' rows right before their update (in the task that
    /// updates them: each row crosses memory once). If the step writes
    /// nothing (an error, or sums that might overflow), they are drawn
    /// here: the keys keep their rows.
    fn step_grouped<O: SparseOptimizer>(
        &mut self,
        optimizer: &mut O,
        rows: &[u32],
        grad_out: &[f32],
        grouped: TakenGrouping,
        check: Check,
    ) -> Result<()> {
        let filler = Filler::new(self.config.init, self.config.seed);
        let dim = self.dim();
        let keys = &self.scratch.fresh_keys;
        let fill = |n: usize, row: &mut [f32]| filler.fill_cached(keys[n], row, dim);
        let fresh = Fresh {
            at: &self.scratch.fresh_groups,
            fill: &fill,
        };
        let weights = &mut self.weights;
        let stepped =
            engine::step_lookup_grouped(optimizer, weights, rows, grad_out, grouped, check, fresh);
        if !matches!(stepped, Ok(true)) {
            self.draw_fresh_rows();
        }
        if !stepped? {
            let mut grad = SparseGrad::for_table(&self.weights);
            grad.accumulate_lookup(rows, grad_out)?;
            optimizer.step(&mut self.weights, &grad)?;
        }
        Ok(())
    }

    fn mark_changed(&mut self, rows: &[u32]) {
        if let Some(changes) = &mut self.changes {
            changes.mark(rows.iter().map(|&r| r as usize));
        }
    }

    /// Ends the step: under [`Eviction::Ttl`], keys unused for the TTL's
    /// steps lose their row (logged, brought current first, with
    /// [`DynamicConfig::track_changes`]). [`step`](Self::step) calls this;
    /// call it directly to end a step that trained nothing (an evaluation
    /// pass over a table that admits keys).
    ///
    /// # Errors
    /// The optimizer's `catch_up` errors, before anything changes.
    pub fn advance(&mut self, optimizer: &mut dyn SparseOptimizer) -> Result<()> {
        let now = self.step + 1;
        if let Eviction::Ttl { steps } = self.config.eviction
            && let Some(before) = now.checked_sub(steps)
        {
            self.expire(before, optimizer)?;
        }
        self.step = now;
        Ok(())
    }

    /// Frees the rows of the keys last used before step `before`, logging
    /// them (brought current first) if changes are tracked.
    fn expire(&mut self, before: u64, optimizer: &mut dyn SparseOptimizer) -> Result<()> {
        let mut expired = Vec::new();
        while let Some(r) = self.order.expired(&self.meta, before) {
            expired.push(r as usize);
        }
        if let Some(changes) = &mut self.changes
            && !expired.is_empty()
        {
            if optimizer.has_lagging_rows()
                && let Err(e) = optimizer.catch_up(&mut self.weights, &expired)
            {
                // Nothing changes on error: the rows keep their place.
                self.order.restore_expired(&expired, &self.meta);
                return Err(e);
            }
            for &r in &expired {
                changes.evicted(self.meta[r].key, self.weights.row(r));
            }
        }
        for &r in &expired {
            self.map.remove(self.meta[r].key);
            self.meta[r] = RowMeta::default();
            self.free.push(r as u32);
        }
        self.stats.expired += expired.len() as u64;
        Ok(())
    }

    /// Brings every row current under `DenseExact` (the optimizer's
    /// `flush`), keeping the default row as it is.
    ///
    /// # Errors
    /// The optimizer's `flush` and `reset_rows` errors.
    pub fn flush(&mut self, optimizer: &mut dyn SparseOptimizer) -> Result<()> {
        if !optimizer.has_lagging_rows() {
            return Ok(());
        }
        optimizer.flush(&mut self.weights)?;
        // A zero-gradient step may move any row, the default one too: it
        // goes back to its values and its state starts again.
        self.weights
            .row_mut(DEFAULT_ROW as usize)
            .copy_from_slice(&self.default);
        optimizer.reset_rows(&self.weights, &[DEFAULT_ROW as usize])?;
        let occupied: Vec<usize> = self.keys().map(|(_, r)| r).collect();
        if let Some(changes) = &mut self.changes {
            changes.mark(occupied);
        }
        Ok(())
    }
}

/// Output floats per translate-and-gather task of a read-only lookup.
const TASK_FLOATS: usize = 1 << 16;

/// Ids per probing task (and the most a lookup task takes).
const TASK_IDS: usize = 4096;

/// Probes `ids` one after the other, each key's slot prefetched
/// [`PROBE_AHEAD`] ids ahead. Each key is hashed once: its home slot waits
/// in a ring from its prefetch to its probe.
fn probe_run<I: Index>(map: &KeyMap, ids: &[I], rows: &mut [u32]) {
    let mut homes = [0usize; PROBE_AHEAD];
    for (home, &id) in homes.iter_mut().zip(ids) {
        *home = map.home_of(key_of(id));
        map.prefetch_home(*home);
    }
    for (j, (row, &id)) in rows.iter_mut().zip(ids).enumerate() {
        let home = &mut homes[j % PROBE_AHEAD];
        let here = *home;
        if let Some(&ahead) = ids.get(j + PROBE_AHEAD) {
            *home = map.home_of(key_of(ahead));
            map.prefetch_home(*home);
        }
        *row = map.get_from(key_of(id), here).unwrap_or(DEFAULT_ROW);
    }
}

/// The positions whose row is not the default row: their rows, and their
/// rows of `grad_out`.
pub(crate) fn known_positions(rows: &[u32], grad_out: &[f32], dim: usize) -> (Vec<u32>, Vec<f32>) {
    let mut kept_rows = Vec::with_capacity(rows.len());
    let mut kept_grad = Vec::with_capacity(grad_out.len());
    for (&r, g) in rows.iter().zip(grad_out.chunks_exact(dim.max(1))) {
        if r != DEFAULT_ROW {
            kept_rows.push(r);
            kept_grad.extend_from_slice(g);
        }
    }
    (kept_rows, kept_grad)
}

fn try_reserve<T>(v: &mut Vec<T>, more: usize, what: &'static str) -> Result<()> {
    v.try_reserve_exact(more).map_err(|_| Error::Alloc {
        what,
        bytes: more.saturating_mul(size_of::<T>()),
    })
}

/// The most keys a table of `config` with rows of `dim` floats and
/// `state_bytes` of optimizer state per row may hold.
pub(crate) fn row_limit(config: &DynamicConfig, dim: usize, state_bytes: usize) -> Result<usize> {
    let bad = |reason: String| {
        Err(Error::InvalidConfig {
            field: "capacity",
            reason,
        })
    };
    match config.capacity {
        Capacity::Unbounded => Ok(MAX_KEYS),
        Capacity::Rows(0) => bad("Rows(0): a table needs room for one key".into()),
        Capacity::Rows(n) if n > MAX_KEYS => bad(format!("Rows({n}) is above {MAX_KEYS}")),
        Capacity::Rows(n) => Ok(n),
        Capacity::Bytes(bytes) => {
            let fits = |n: usize| max_bytes(config, dim, state_bytes, n) <= bytes;
            if !fits(1) {
                return bad(format!(
                    "Bytes({bytes}) cannot hold one key: that takes {} bytes",
                    max_bytes(config, dim, state_bytes, 1)
                ));
            }
            // The largest n that fits: max_bytes grows with n.
            let (mut lo, mut hi) = (1usize, MAX_KEYS);
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if fits(mid) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            Ok(lo)
        }
    }
}

/// The most bytes a table holding at most `keys` keys takes (what
/// [`Memory::bounded`] is kept under): the storage, optimizer state,
/// bookkeeping and free list of `keys + 1` rows, the key map at its
/// largest, the eviction order and the sighting counts at theirs.
pub(crate) fn max_bytes(
    config: &DynamicConfig,
    dim: usize,
    state_bytes: usize,
    keys: usize,
) -> usize {
    let rows = keys.saturating_add(1);
    let stride = checked_stride(dim).unwrap_or(usize::MAX);
    let per_row = stride
        .saturating_mul(size_of::<f32>())
        .saturating_add(state_bytes)
        .saturating_add(size_of::<RowMeta>() + size_of::<u32>());
    let pending = match config.admission {
        Admission::AfterSightings(_) => Pending::max_bytes(keys),
        _ => 0,
    };
    rows.saturating_mul(per_row)
        .saturating_add(KeyMap::slots_for(keys).saturating_mul(KeyMap::SLOT_BYTES))
        .saturating_add(Order::max_bytes(config.eviction, keys))
        .saturating_add(pending)
}
