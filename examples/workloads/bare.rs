//! Bare hand-written loops for the workloads: what this machine's memory
//! system gives when nothing but the workload's own traffic is done, the
//! yardstick embtable is measured against in the same run (`--bound`).
//!
//! Each is the loop a careful C programmer writes for one workload and
//! nothing else: inputs checked once up front, then no validation of
//! values, software prefetch of upcoming rows into L2, and non-temporal
//! stores for outputs larger than the cache. A W5 step has two: the bound,
//! [`coalesced_update`], does the defined work (each row's gradient rows
//! summed, then one update, as embtable's step: a test proves the same
//! weights); [`update`] applies each position's gradient row as it comes,
//! as TensorFlow's raw sparse ops do: less work (no grouping, and a
//! different result), so only a lower reference. With AVX2 and FMA the whole
//! loop is compiled for them, 8 lanes a vector; elsewhere plain loops the
//! compiler vectorises. Several threads split the work as embtable does:
//! gathers and bags by position, updates by row (a row's positions all go
//! to one thread, so no row is written by two).

use embtable::AlignedBuf;
use rayon::prelude::*;

/// Rows prefetched ahead of the one being read.
const AHEAD: usize = 8;
/// Rows prefetched ahead by the pooled loop: 8 KiB of 128-float rows, as
/// embtable's kernels (on the 2-core Zen 3, 10 to 24 rows ran within noise
/// of each other, 6 and 40 slower). The pooled loop prefetches the first
/// line of every 512 bytes of a row only, as embtable's pooled kernel does:
/// on that machine it beat prefetching every line by 7-15%
/// (`examples/bag_limit`).
const POOL_AHEAD: usize = 16;
/// Positions per parallel task.
const TASK: usize = 2048;

/// Whether the AVX2+FMA loops can run here.
fn fast_isa() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A table's rows: `dim` floats each (a multiple of 16), `stride` apart.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub values: &'a [f32],
    pub stride: usize,
    pub dim: usize,
}

impl Rows<'_> {
    /// Checks that every id names a whole row, so the loops need not.
    fn check(&self, ids: &[i64]) {
        assert!(self.dim.is_multiple_of(16) && self.dim <= self.stride);
        let fits = |&r: &i64| r >= 0 && (r as usize + 1) * self.stride <= self.values.len();
        assert!(ids.iter().all(fits), "an id beyond the table");
    }
}

/// A pointer that parallel tasks use at disjoint rows.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every use writes rows no other task touches, as each says.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// The float at `i` (a method, so closures capture the whole `Shared`).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `out[j] = table[ids[j]]`, streamed past the caches when `out` is large
/// and 64-byte aligned.
pub fn gather(table: Rows<'_>, ids: &[i64], out: &mut [f32]) {
    table.check(ids);
    assert_eq!(out.len(), ids.len() * table.dim);
    let stream = out.len() * 4 >= 16 << 20 && (out.as_ptr() as usize).is_multiple_of(64);
    let (out, fast) = (Shared(out.as_mut_ptr()), fast_isa());
    ids.par_chunks(TASK).enumerate().for_each(|(t, ids)| {
        let out = out.at(t * TASK * table.dim);
        // SAFETY: the ids were checked; this task's `ids.len()` rows of
        // `out` are its own; AVX2+FMA was detected where it is used.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if fast {
                return x86::gather(table, ids, out, stream);
            }
            let _ = (fast, stream);
            portable::gather(table, ids, out)
        }
    });
}

/// Bag `b` of `bag` ids: `out[b] = scale · Σ w[i]·table[ids[i]]` (weights 1
/// if `None`; `scale` is 1/len for a mean).
pub fn bag_sum(
    table: Rows<'_>,
    ids: &[i64],
    bag: usize,
    weights: Option<&[f32]>,
    scale: f32,
    out: &mut [f32],
) {
    table.check(ids);
    assert!(table.dim <= 512 && out.len() * bag == ids.len() * table.dim);
    assert!(weights.is_none_or(|w| w.len() == ids.len()));
    let bags_per_task = (TASK / bag).max(1);
    let fast = fast_isa();
    out.par_chunks_mut(table.dim * bags_per_task)
        .zip(ids.par_chunks(bags_per_task * bag))
        .enumerate()
        .for_each(|(t, (out, ids))| {
            let first = t * bags_per_task * bag;
            let weights = weights.map(|w| &w[first..first + ids.len()]);
            let task = BagTask {
                table,
                ids,
                bag,
                weights,
                scale,
            };
            // SAFETY: the ids were checked, `out` holds this task's bags,
            // AVX2+FMA was detected where it is used.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                if fast {
                    return x86::bag_sum(task, out);
                }
                let _ = fast;
                portable::bag_sum(task, out)
            }
        });
}

/// One task's bags.
#[derive(Clone, Copy)]
struct BagTask<'a> {
    table: Rows<'a>,
    ids: &'a [i64],
    bag: usize,
    weights: Option<&'a [f32]>,
    scale: f32,
}

/// The update of one W5 step, per position, without coalescing.
#[derive(Clone, Copy, Debug)]
pub enum Update {
    /// `w -= lr·g`.
    Sgd,
    /// `h += g²; w -= lr·g/(√h + ε)` (Adagrad, and RMSprop's traffic).
    OneState,
    /// `m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²; w -= lr·m/(√v + ε)` (Adam, FTRL's traffic).
    TwoStates,
}

impl Update {
    /// State arrays the update keeps beside the weights.
    pub fn arrays(self) -> usize {
        match self {
            Update::Sgd => 0,
            Update::OneState => 1,
            Update::TwoStates => 2,
        }
    }
}

/// Applies `grad_out[j]` to row `ids[j]` of `weights` and of each state
/// array (rows of `stride` floats, the first `dim` used), position after
/// position. Thread `t` of `T` takes the rows with `row % T == t`.
pub fn update(
    update: Update,
    weights: &mut [f32],
    states: &mut [AlignedBuf],
    stride: usize,
    dim: usize,
    ids: &[i64],
    grad_out: &[f32],
) {
    let table = Rows {
        values: weights,
        stride,
        dim,
    };
    table.check(ids);
    assert_eq!(grad_out.len(), ids.len() * dim);
    assert_eq!(states.len(), update.arrays());
    assert!(states.iter().all(|s| s.len() == weights.len()));
    let mut bufs = vec![Shared(weights.as_mut_ptr())];
    bufs.extend(states.iter_mut().map(|s| Shared(s.as_mut_ptr())));
    let threads = rayon::current_num_threads();
    let fast = fast_isa();
    (0..threads).into_par_iter().for_each(|t| {
        let task = UpdateTask {
            update,
            bufs: &bufs,
            stride,
            dim,
            ids,
            grad_out,
            threads,
            mine: t,
        };
        // SAFETY: the ids were checked against every buffer (all of the
        // weights' length), and thread `t` writes only rows `r % threads
        // == t`; AVX2+FMA was detected where it is used.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if fast {
                return x86::update(task);
            }
            let _ = fast;
            portable::update(task)
        }
    });
}

/// One thread's share of an update.
#[derive(Clone, Copy)]
struct UpdateTask<'a> {
    update: Update,
    /// The weights, then the state arrays.
    bufs: &'a [Shared],
    stride: usize,
    dim: usize,
    ids: &'a [i64],
    grad_out: &'a [f32],
    threads: usize,
    mine: usize,
}

/// The loops in plain Rust, for CPUs without AVX2+FMA.
mod portable {
    use super::{BagTask, UpdateTask};

    /// # Safety
    /// The ids were checked; `out` holds `ids.len()` rows.
    pub unsafe fn gather(table: super::Rows<'_>, ids: &[i64], out: *mut f32) {
        for (i, &r) in ids.iter().enumerate() {
            let src = &table.values[r as usize * table.stride..][..table.dim];
            // SAFETY: row `i` of this task's output (caller).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add(i * table.dim), table.dim) };
            dst.copy_from_slice(src);
        }
    }

    /// # Safety
    /// None beyond the checks made (kept `unsafe` to match the fast loop).
    pub unsafe fn bag_sum(t: BagTask<'_>, out: &mut [f32]) {
        let dim = t.table.dim;
        let mut acc = vec![0.0f32; dim];
        for (b, out) in out.chunks_exact_mut(dim).enumerate() {
            acc.fill(0.0);
            for i in b * t.bag..(b + 1) * t.bag {
                let w = t.weights.map_or(1.0, |w| w[i]);
                let row = &t.table.values[t.ids[i] as usize * t.table.stride..][..dim];
                for (a, x) in acc.iter_mut().zip(row) {
                    *a += w * x;
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = a * t.scale;
            }
        }
    }

    /// # Safety
    /// As [`super::update`] says of its tasks.
    pub unsafe fn update(t: UpdateTask<'_>) {
        for (j, &r) in t.ids.iter().enumerate() {
            if r as usize % t.threads != t.mine {
                continue;
            }
            let g = &t.grad_out[j * t.dim..][..t.dim];
            // SAFETY: row `r` lies in every buffer and is this thread's.
            let row = |k: usize| unsafe {
                std::slice::from_raw_parts_mut(t.bufs[k].at(r as usize * t.stride), t.dim)
            };
            let w = row(0);
            for l in 0..t.dim {
                match t.update {
                    super::Update::Sgd => w[l] -= 0.01 * g[l],
                    super::Update::OneState => {
                        let h = &mut row(1)[l];
                        *h += g[l] * g[l];
                        w[l] -= 0.01 * g[l] / (h.sqrt() + 1e-10);
                    }
                    super::Update::TwoStates => {
                        let (m, v) = (&mut row(1)[l], &mut row(2)[l]);
                        *m = 0.9 * *m + 0.1 * g[l];
                        *v = 0.999 * *v + 0.001 * g[l] * g[l];
                        w[l] -= 0.01 * *m / (v.sqrt() + 1e-8);
                    }
                }
            }
        }
    }
}

/// The loops compiled for AVX2+FMA, 8 lanes a vector.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{AHEAD, BagTask, ChainTask, POOL_AHEAD, Rows, Update, UpdateTask};

    /// Prefetches the `len` floats from `p` into L2 (a hint: never faults).
    #[inline(always)]
    fn prefetch(p: *const f32, len: usize) {
        for line in (0..len).step_by(16) {
            // SAFETY: a prefetch cannot fault, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line).cast()) };
        }
    }

    /// Prefetches the first line of every 512 bytes of the `len` floats
    /// from `p` into L2, leaving the other lines to the hardware.
    #[inline(always)]
    fn prefetch_heads(p: *const f32, len: usize) {
        for line in (0..len).step_by(128) {
            // SAFETY: a prefetch cannot fault, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line).cast()) };
        }
    }

    /// # Safety
    /// AVX2+FMA is available; the ids were checked; `out` holds
    /// `ids.len()` rows, 64-byte aligned when `stream`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gather(table: Rows<'_>, ids: &[i64], out: *mut f32, stream: bool) {
        let (base, stride, dim) = (table.values.as_ptr(), table.stride, table.dim);
        for (i, &r) in ids.iter().enumerate() {
            if let Some(&ahead) = ids.get(i + AHEAD) {
                prefetch(base.wrapping_add(ahead as usize * stride), dim);
            }
            // SAFETY: row `r` was checked, row `i` of `out` is ours (caller).
            unsafe {
                let (src, dst) = (base.add(r as usize * stride), out.add(i * dim));
                for v in (0..dim).step_by(8) {
                    let x = _mm256_loadu_ps(src.add(v));
                    if stream {
                        _mm256_stream_ps(dst.add(v), x);
                    } else {
                        _mm256_storeu_ps(dst.add(v), x);
                    }
                }
            }
        }
        if stream {
            _mm_sfence();
        }
    }

    /// Each bag reduced a block of columns at a time with the accumulators
    /// in `ymm` registers: 16 of them for a plain sum (a whole 128-float
    /// row, one walk over the bag, as FBGEMM's AVX2 kernel), 8 when each
    /// row is multiplied by its weight (the weight takes a register), then
    /// times `scale` and stored once. Rows are prefetched [`POOL_AHEAD`]
    /// ahead, their first line of every 512 bytes. (Accumulating a whole
    /// row of any width in a stack array, as the portable loop does, ran
    /// slower than the library here.)
    ///
    /// # Safety
    /// AVX2+FMA is available; the ids were checked.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bag_sum(t: BagTask<'_>, out: &mut [f32]) {
        let (base, stride, dim) = (t.table.values.as_ptr(), t.table.stride, t.table.dim);
        for &id in t.ids.iter().take(POOL_AHEAD) {
            prefetch_heads(base.wrapping_add(id as usize * stride), dim);
        }
        for (b, out) in out.chunks_exact_mut(dim).enumerate() {
            let bag = b * t.bag..(b + 1) * t.bag;
            let mut col = 0;
            while col < dim {
                let at = (bag.clone(), col);
                // SAFETY: as this function's contract; `dim` is a multiple
                // of 16, so every block ends at or before it.
                col += unsafe {
                    match ((dim - col) / 8, t.weights) {
                        (16.., None) => block::<16>(t, out, at),
                        (8.., _) => block::<8>(t, out, at),
                        _ => block::<2>(t, out, at),
                    }
                };
            }
        }
    }

    /// Columns `col..col + 8 * V` of one bag into `out`; returns how many.
    /// Only the first block prefetches: later ones read rows it fetched.
    ///
    /// # Safety
    /// As [`bag_sum`], and `col + 8 * V <= dim`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const V: usize>(
        t: BagTask<'_>,
        out: &mut [f32],
        (bag, col): (std::ops::Range<usize>, usize),
    ) -> usize {
        let (base, stride, dim) = (t.table.values.as_ptr(), t.table.stride, t.table.dim);
        let mut acc = [_mm256_setzero_ps(); V];
        for i in bag {
            if col == 0
                && let Some(&ahead) = t.ids.get(i + POOL_AHEAD)
            {
                prefetch_heads(base.wrapping_add(ahead as usize * stride), dim);
            }
            // SAFETY: the id was checked: its row has `dim` floats, and
            // `col + 8 * V <= dim`.
            let row = unsafe { base.add(t.ids[i] as usize * stride + col) };
            match t.weights {
                None => {
                    for (v, a) in acc.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *a = _mm256_add_ps(*a, unsafe { _mm256_loadu_ps(row.add(8 * v)) });
                    }
                }
                Some(w) => {
                    let w = _mm256_set1_ps(w[i]);
                    for (v, a) in acc.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(row.add(8 * v)) }, *a);
                    }
                }
            }
        }
        let scale = _mm256_set1_ps(t.scale);
        let out = &mut out[col..col + 8 * V];
        for (v, a) in acc.into_iter().enumerate() {
            // SAFETY: `out` holds `8 * V` floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * v), _mm256_mul_ps(a, scale)) };
        }
        8 * V
    }

    /// [`super::chain::update`] compiled for AVX2+FMA.
    ///
    /// # Safety
    /// AVX2+FMA is available, and as [`super::coalesced_update`] says of
    /// its tasks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chain_update(t: ChainTask<'_>, mine: &mut Vec<u32>, heads: &mut Vec<u32>) {
        // SAFETY: as the caller promises.
        unsafe { super::chain::update(t, mine, heads) }
    }

    /// # Safety
    /// AVX2+FMA is available, and as [`super::update`] says of its tasks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn update(t: UpdateTask<'_>) {
        let (lr, eps1, eps2) = (
            _mm256_set1_ps(0.01),
            _mm256_set1_ps(1e-10),
            _mm256_set1_ps(1e-8),
        );
        let (b1, c1) = (_mm256_set1_ps(0.9), _mm256_set1_ps(0.1));
        let (b2, c2) = (_mm256_set1_ps(0.999), _mm256_set1_ps(0.001));
        let mine = |r: i64| r as usize % t.threads == t.mine;
        let mut ahead = t.ids.iter().filter(|&&r| mine(r)).skip(AHEAD);
        for (j, &r) in t.ids.iter().enumerate() {
            if !mine(r) {
                continue;
            }
            if let Some(&next) = ahead.next() {
                for b in t.bufs {
                    prefetch(b.at(next as usize * t.stride), t.dim);
                }
            }
            let at = r as usize * t.stride;
            // SAFETY: row `r` lies in every buffer and is this thread's
            // (caller); `grad_out` has `dim` floats at `j * dim`; every
            // offset below is `v + 8 <= dim`.
            unsafe {
                let g = t.grad_out.as_ptr().add(j * t.dim);
                let w = t.bufs[0].at(at);
                for v in (0..t.dim).step_by(8) {
                    let gv = _mm256_loadu_ps(g.add(v));
                    let wv = _mm256_loadu_ps(w.add(v));
                    let wv = match t.update {
                        Update::Sgd => _mm256_sub_ps(wv, _mm256_mul_ps(lr, gv)),
                        Update::OneState => {
                            let h = t.bufs[1].at(at + v);
                            let hv = _mm256_fmadd_ps(gv, gv, _mm256_loadu_ps(h));
                            _mm256_storeu_ps(h, hv);
                            let d = _mm256_add_ps(_mm256_sqrt_ps(hv), eps1);
                            _mm256_sub_ps(wv, _mm256_div_ps(_mm256_mul_ps(lr, gv), d))
                        }
                        Update::TwoStates => {
                            let (m, s) = (t.bufs[1].at(at + v), t.bufs[2].at(at + v));
                            let mv = _mm256_fmadd_ps(b1, _mm256_loadu_ps(m), _mm256_mul_ps(c1, gv));
                            let g2 = _mm256_mul_ps(gv, gv);
                            let sv = _mm256_fmadd_ps(b2, _mm256_loadu_ps(s), _mm256_mul_ps(c2, g2));
                            _mm256_storeu_ps(m, mv);
                            _mm256_storeu_ps(s, sv);
                            let d = _mm256_add_ps(_mm256_sqrt_ps(sv), eps2);
                            _mm256_sub_ps(wv, _mm256_div_ps(_mm256_mul_ps(lr, mv), d))
                        }
                    };
                    _mm256_storeu_ps(w.add(v), wv);
                }
            }
        }
    }
}

/// A W5 optimizer, for the coalescing loop ([`coalesced_update`]), with
/// WORKLOADS.md's settings (lr 0.01, ε 1e-10, state from 0).
#[derive(Clone, Copy, Debug)]
pub enum Rule {
    /// `w -= lr·g`.
    Sgd,
    /// `h += g²; w -= lr·g/(√h + ε)`.
    Adagrad,
    /// `h += mean(g²)` (one float per row); `w -= lr·g/(√h + ε)`.
    RowWiseAdagrad,
    /// `ms = ρ·ms + (1−ρ)·g²; w -= lr·g/√(ms + ε)` (ρ 0.9).
    RmsProp,
    /// `m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²; w -= lr·m/(√v + ε)`: Adam
    /// without its bias correction (the traffic of Adam and FTRL).
    TwoStates,
}

impl Rule {
    /// State arrays the rule keeps beside the weights.
    pub fn arrays(self) -> usize {
        match self {
            Rule::Sgd => 0,
            Rule::Adagrad | Rule::RowWiseAdagrad | Rule::RmsProp => 1,
            Rule::TwoStates => 2,
        }
    }

    /// Floats per row of each state array, for rows of `stride` floats.
    pub fn state_width(self, stride: usize) -> usize {
        match self {
            Rule::RowWiseAdagrad => 1,
            _ => stride,
        }
    }
}

/// "None": no position, an unseen row.
const NO: u32 = u32::MAX;

/// Working memory of [`coalesced_update`], kept from one step to the next
/// as a training loop keeps it.
#[derive(Default)]
pub struct Coalescer {
    /// Per table row: `first << 32 | last`, its first and last position
    /// in the batch, or all ones (between steps, every entry).
    ends: Vec<u64>,
    /// Per position: the next position of its row, or [`NO`].
    next: Vec<u32>,
    /// Per thread: its rows in first-seen order, and their first positions.
    lists: Vec<(Vec<u32>, Vec<u32>)>,
}

/// The W5 step as defined: each distinct row of `ids` gets the sum of its
/// positions' rows of `grad_out`, in batch order, then one update. Thread
/// `t` of `T` takes the rows `t·R/T ≤ r < (t+1)·R/T` (`R` table rows):
/// it walks all ids and chains each of its rows' positions, first to last,
/// through a direct per-row array (no hashing, no sort); then, row after
/// row in first-seen order, sums the chain's gradient rows in registers
/// and updates weights and state, prefetching rows a few groups ahead
/// (the weights', the state's, and every gradient row of the chain).
#[allow(clippy::too_many_arguments)]
pub fn coalesced_update(
    rule: Rule,
    c: &mut Coalescer,
    weights: &mut [f32],
    states: &mut [AlignedBuf],
    stride: usize,
    dim: usize,
    ids: &[i64],
    grad_out: &[f32],
) {
    let table = Rows {
        values: weights,
        stride,
        dim,
    };
    table.check(ids);
    let rows = weights.len() / stride;
    assert!(dim.is_multiple_of(chain::BLOCK));
    assert_eq!(grad_out.len(), ids.len() * dim);
    assert!(ids.len() < NO as usize);
    assert_eq!(states.len(), rule.arrays());
    let width = rule.state_width(stride);
    assert!(states.iter().all(|s| s.len() == rows * width));
    if c.ends.len() != rows {
        c.ends = vec![u64::MAX; rows];
    }
    c.next.resize(ids.len(), NO);
    let threads = rayon::current_num_threads();
    c.lists.resize_with(threads, Default::default);
    let mut bufs = vec![Shared(weights.as_mut_ptr())];
    bufs.extend(states.iter_mut().map(|s| Shared(s.as_mut_ptr())));
    let (ends, next) = (
        Shared(c.ends.as_mut_ptr().cast()),
        Shared(c.next.as_mut_ptr().cast()),
    );
    let fast = fast_isa();
    c.lists
        .par_iter_mut()
        .enumerate()
        .for_each(|(t, (mine, heads))| {
            let task = ChainTask {
                rule,
                bufs: &bufs,
                stride,
                dim,
                ids,
                grad_out,
                rows: rows * t / threads..rows * (t + 1) / threads,
                ends: ends.at(0).cast(),
                next: next.at(0).cast(),
            };
            // SAFETY: the ids were checked against the weights (and so
            // every state array), every position fits `u32`, and thread
            // `t` touches only the rows of its range: their entries of
            // `ends`, the entries of `next` at their positions, their rows
            // of every buffer. AVX2+FMA was detected where it is used.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                if fast {
                    return x86::chain_update(task, mine, heads);
                }
                let _ = fast;
                chain::update(task, mine, heads)
            }
        });
}

/// One thread's share of a coalesced update.
#[derive(Clone)]
struct ChainTask<'a> {
    rule: Rule,
    /// The weights, then the state arrays.
    bufs: &'a [Shared],
    stride: usize,
    dim: usize,
    ids: &'a [i64],
    grad_out: &'a [f32],
    /// This thread's rows.
    rows: std::ops::Range<usize>,
    ends: *mut u64,
    next: *mut u32,
}

/// The coalescing loop, written once over plain arrays of one block of
/// columns (the compiler vectorises them for the target it is inlined into).
mod chain {
    use super::{AHEAD, ChainTask, NO, Rule};

    /// Columns summed and updated at a time: 8 AVX2 vectors.
    pub const BLOCK: usize = 64;
    /// Groups ahead whose rows are prefetched.
    const GROUPS_AHEAD: usize = AHEAD;
    /// Ids ahead whose `ends` entry is prefetched.
    const IDS_AHEAD: usize = 32;

    #[inline(always)]
    fn prefetch<T>(p: *const T) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch cannot fault, whatever the address.
        unsafe {
            use std::arch::x86_64::*;
            _mm_prefetch::<_MM_HINT_T1>(p.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }

    #[inline(always)]
    fn prefetch_row(p: *const f32, len: usize) {
        for line in (0..len).step_by(16) {
            prefetch(p.wrapping_add(line));
        }
    }

    /// # Safety
    /// As [`super::coalesced_update`] says of its tasks.
    #[inline(always)]
    pub unsafe fn update(t: ChainTask<'_>, mine: &mut Vec<u32>, heads: &mut Vec<u32>) {
        // SAFETY: (all below) the entries of `ends` and `next` used are
        // those of this thread's rows and their positions (caller).
        unsafe {
            mine.clear();
            heads.clear();
            let ids = t.ids;
            for (j, &r) in ids.iter().enumerate() {
                if let Some(&ahead) = ids.get(j + IDS_AHEAD)
                    && t.rows.contains(&(ahead as usize))
                {
                    prefetch(t.ends.add(ahead as usize));
                }
                let r = r as usize;
                if !t.rows.contains(&r) {
                    continue;
                }
                let j = j as u32;
                let end = t.ends.add(r);
                *t.next.add(j as usize) = NO;
                if *end == u64::MAX {
                    *end = (j as u64) << 32 | j as u64;
                    mine.push(r as u32);
                    heads.push(j);
                } else {
                    *t.next.add(*end as u32 as usize) = j;
                    *end = (*end & !(u32::MAX as u64)) | j as u64;
                }
            }
            for k in 0..mine.len() {
                if k + GROUPS_AHEAD < mine.len() {
                    let (r, mut j) = (mine[k + GROUPS_AHEAD] as usize, heads[k + GROUPS_AHEAD]);
                    prefetch_row(t.bufs[0].at(r * t.stride), t.dim);
                    for b in &t.bufs[1..] {
                        let width = t.rule.state_width(t.stride);
                        prefetch_row(b.at(r * width), width.min(t.dim));
                    }
                    while j != NO {
                        prefetch_row(t.grad_out.as_ptr().add(j as usize * t.dim), t.dim);
                        j = *t.next.add(j as usize);
                    }
                }
                row(&t, mine[k] as usize, heads[k]);
            }
            // Every entry back to unseen for the next step (a pass of its
            // own: resetting each in the update loop kept fewer rows in
            // flight there).
            for &r in mine.iter() {
                *t.ends.add(r as usize) = u64::MAX;
            }
        }
    }

    /// Sums the gradient rows of the chain from `head` into `g`, columns
    /// `col..col + BLOCK`.
    ///
    /// # Safety
    /// The chain's entries of `next` are this thread's.
    #[inline(always)]
    unsafe fn sum(t: &ChainTask<'_>, head: u32, col: usize, g: &mut [f32; BLOCK]) {
        let at = |j: u32| &t.grad_out[j as usize * t.dim + col..][..BLOCK];
        g.copy_from_slice(at(head));
        // SAFETY: as the caller promises.
        let mut j = unsafe { *t.next.add(head as usize) };
        while j != NO {
            for (g, x) in g.iter_mut().zip(at(j)) {
                *g += x;
            }
            // SAFETY: as above.
            j = unsafe { *t.next.add(j as usize) };
        }
    }

    /// Updates row `r`, whose positions' chain starts at `head`.
    ///
    /// # Safety
    /// Row `r` is this thread's, in every buffer.
    #[inline(always)]
    unsafe fn row(t: &ChainTask<'_>, r: usize, head: u32) {
        let (lr, eps) = (0.01f32, 1e-10f32);
        // SAFETY: row `r` of each buffer is this thread's (caller), and
        // every block below ends within the row's `dim` floats.
        let block = |k: usize, col: usize| unsafe {
            &mut *t.bufs[k].at(r * t.stride + col).cast::<[f32; BLOCK]>()
        };
        let mut g = [0.0f32; BLOCK];
        if let Rule::RowWiseAdagrad = t.rule {
            // The mean of the squares needs the whole row first: 16
            // partial sums, lane by lane (vectorised), then added up.
            let mut partial = [0.0f32; 16];
            for col in (0..t.dim).step_by(BLOCK) {
                // SAFETY: the chain is this thread's.
                unsafe { sum(t, head, col, &mut g) };
                for part in g.chunks_exact(16) {
                    for (p, x) in partial.iter_mut().zip(part) {
                        *p += x * x;
                    }
                }
            }
            let squares: f32 = partial.iter().sum();
            // SAFETY: the accumulator of row `r` is this thread's.
            let h = unsafe { &mut *t.bufs[1].at(r) };
            *h += squares / t.dim as f32;
            let factor = lr / (h.sqrt() + eps);
            for col in (0..t.dim).step_by(BLOCK) {
                // SAFETY: as above.
                unsafe { sum(t, head, col, &mut g) };
                for (w, g) in block(0, col).iter_mut().zip(&g) {
                    *w -= factor * g;
                }
            }
            return;
        }
        for col in (0..t.dim).step_by(BLOCK) {
            // SAFETY: the chain is this thread's.
            unsafe { sum(t, head, col, &mut g) };
            let w = block(0, col);
            match t.rule {
                Rule::Sgd => {
                    for (w, g) in w.iter_mut().zip(&g) {
                        *w -= lr * g;
                    }
                }
                Rule::Adagrad => {
                    for ((w, h), g) in w.iter_mut().zip(block(1, col)).zip(&g) {
                        *h += g * g;
                        *w -= lr * g / (h.sqrt() + eps);
                    }
                }
                Rule::RmsProp => {
                    for ((w, ms), g) in w.iter_mut().zip(block(1, col)).zip(&g) {
                        *ms = 0.9 * *ms + 0.1 * (g * g);
                        *w -= lr * g / (*ms + eps).sqrt();
                    }
                }
                Rule::TwoStates => {
                    let (m, v) = (block(1, col), block(2, col));
                    for (((w, m), v), g) in w.iter_mut().zip(m).zip(v).zip(&g) {
                        *m = 0.9 * *m + 0.1 * g;
                        *v = 0.999 * *v + 0.001 * (g * g);
                        *w -= lr * *m / (v.sqrt() + 1e-8);
                    }
                }
                Rule::RowWiseAdagrad => unreachable!("updated above"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The coalescing loop does the work embtable's fused step does: the
    //! same weights after the same steps; the bag loop sums the bags
    //! embtable's pooled lookup sums.

    use embtable::{Adagrad, AdagradConfig, Bags, EmbeddingTable, Init, Pooling, SparseOptimizer};

    use super::*;

    const ROWS: usize = 200;

    /// Two steps of `opt` and of `rule` from the same weights, on batches
    /// with rows repeated up to a dozen times, near and far apart, on
    /// `threads` threads; the weights after each, as (library, bare).
    fn both(
        mut opt: impl SparseOptimizer + Send,
        rule: Rule,
        threads: usize,
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        let dim = 128;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut table = EmbeddingTable::new(ROWS, dim, Init::default(), 3).unwrap();
        let stride = table.stride();
        let mut weights = AlignedBuf::zeroed(ROWS * stride, "weights").unwrap();
        weights.as_mut_slice().copy_from_slice(table.as_padded());
        let width = rule.state_width(stride);
        let mut states: Vec<AlignedBuf> = (0..rule.arrays())
            .map(|_| AlignedBuf::zeroed(ROWS * width, "state").unwrap())
            .collect();
        let mut scratch = Coalescer::default();
        let mut after = Vec::new();
        for seed in [1, 2] {
            let ids: Vec<i64> = workloads::uniform(seed, 700, ROWS / 2)
                .iter()
                .map(|&r| r * 2 + seed as i64 % 2)
                .collect();
            let grad_out = workloads::values(seed + 10, ids.len() * dim, -1.0, 1.0);
            pool.install(|| {
                opt.step_lookup(&mut table, &ids, &grad_out).unwrap();
                let w = weights.as_mut_slice();
                coalesced_update(
                    rule,
                    &mut scratch,
                    w,
                    &mut states,
                    stride,
                    dim,
                    &ids,
                    &grad_out,
                );
            });
            after.push((table.as_padded().to_vec(), weights.as_slice().to_vec()));
        }
        after
    }

    #[test]
    fn sgd_and_adagrad_match_bit_for_bit() {
        for threads in [1, 2, 3] {
            for (library, bare) in both(crate::w5_sgd(), Rule::Sgd, threads) {
                assert_eq!(library, bare, "SGD, {threads} threads");
            }
            let adagrad = Adagrad::new(AdagradConfig::torch());
            for (library, bare) in both(adagrad, Rule::Adagrad, threads) {
                assert_eq!(library, bare, "Adagrad, {threads} threads");
            }
        }
    }

    /// Within `1e-5` of each weight's change, plus two of the weight's
    /// last places (the sums of squares are reduced in another order, and
    /// RMSprop's ε is added differently), so no more than rounding.
    fn close(library: &[f32], bare: &[f32], before: &[f32], what: &str) {
        for (j, ((l, b), w)) in library.iter().zip(bare).zip(before).enumerate() {
            let tolerance = 1e-5 * (l - w).abs() + 2.0 * f32::EPSILON * l.abs();
            assert!((l - b).abs() <= tolerance, "{what}: weight {j}: {l} vs {b}");
        }
    }

    #[test]
    fn row_wise_adagrad_and_rmsprop_match_closely() {
        let before = EmbeddingTable::new(ROWS, 128, Init::default(), 3).unwrap();
        for threads in [1, 2] {
            let rowwise = crate::w5_rowwise_adagrad();
            for (library, bare) in both(rowwise, Rule::RowWiseAdagrad, threads) {
                close(&library, &bare, before.as_padded(), "row-wise Adagrad");
            }
            for (library, bare) in both(crate::w5_rmsprop(), Rule::RmsProp, threads) {
                close(&library, &bare, before.as_padded(), "RMSprop");
            }
        }
    }

    /// The bare bag sum is embtable's `Pooling::Sum` bit for bit (the same
    /// rows added in the same order), on one thread and on tasks split
    /// across three; the weighted one (a fused multiply-add per row) is
    /// within rounding of it.
    #[test]
    fn bag_sum_matches_the_pooled_lookup() {
        let (dim, bag) = (128, 32);
        let table = EmbeddingTable::new(ROWS, dim, Init::default(), 5).unwrap();
        let rows = Rows {
            values: table.as_padded(),
            stride: table.stride(),
            dim,
        };
        let ids = workloads::uniform(4, 300 * bag, ROWS);
        let weights = workloads::weights(40, ids.len());
        let plain = Bags::fixed(&ids, bag).unwrap();
        let weighted = Bags::fixed_weighted(&ids, &weights, bag).unwrap();
        let expected = table.pooled_lookup_vec(&plain, Pooling::Sum).unwrap();
        let expected_weighted = table.pooled_lookup_vec(&weighted, Pooling::Sum).unwrap();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![f32::NAN; expected.len()];
            pool.install(|| bag_sum(rows, &ids, bag, None, 1.0, &mut out));
            assert_eq!(out, expected, "{threads} threads");
            pool.install(|| bag_sum(rows, &ids, bag, Some(&weights), 1.0, &mut out));
            for (j, (b, l)) in out.iter().zip(&expected_weighted).enumerate() {
                assert!((b - l).abs() <= 1e-5, "weighted, float {j}: {b} vs {l}");
            }
        }
    }
}
