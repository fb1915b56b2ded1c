//! Bare hand-written loops for the workloads: what this machine's memory
//! system gives when nothing but the workload's own traffic is done, the
//! yardstick embtable is measured against in the same run (`--bound`).
//!
//! Each is the loop a careful C programmer writes for one workload and
//! nothing else: inputs checked once up front, then no bounds checks, no
//! validation of values, no coalescing of repeated ids (a W5 loop applies
//! each position's gradient row as it comes, as TensorFlow's raw sparse
//! ops do), software prefetch of upcoming rows into L2, and non-temporal
//! stores for outputs larger than the cache. With AVX2 and FMA the whole
//! loop is compiled for them, 8 lanes a vector; elsewhere plain loops the
//! compiler vectorises. Several threads split the work as embtable does:
//! gathers and bags by position, updates by row (a row's positions all go
//! to one thread, so no row is written by two).

use embtable::AlignedBuf;
use rayon::prelude::*;

/// Rows prefetched ahead of the one being read.
const AHEAD: usize = 8;
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

    use super::{AHEAD, BagTask, Rows, Update, UpdateTask};

    /// Prefetches the `len` floats from `p` into L2 (a hint: never faults).
    #[inline(always)]
    fn prefetch(p: *const f32, len: usize) {
        for line in (0..len).step_by(16) {
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

    /// # Safety
    /// AVX2+FMA is available; the ids were checked.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bag_sum(t: BagTask<'_>, out: &mut [f32]) {
        let (base, stride, dim) = (t.table.values.as_ptr(), t.table.stride, t.table.dim);
        let mut acc = [_mm256_setzero_ps(); 64];
        let acc = &mut acc[..dim / 8];
        for (b, out) in out.chunks_exact_mut(dim).enumerate() {
            acc.fill(_mm256_setzero_ps());
            for i in b * t.bag..(b + 1) * t.bag {
                if let Some(&ahead) = t.ids.get(i + AHEAD) {
                    prefetch(base.wrapping_add(ahead as usize * stride), dim);
                }
                let w = _mm256_set1_ps(t.weights.map_or(1.0, |w| w[i]));
                // SAFETY: the id was checked: its row has `dim` floats.
                let row = unsafe { base.add(t.ids[i] as usize * stride) };
                for (v, a) in acc.iter_mut().enumerate() {
                    // SAFETY: `8 * v + 8 <= dim`.
                    *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(row.add(8 * v)) }, *a);
                }
            }
            let scale = _mm256_set1_ps(t.scale);
            for (v, a) in acc.iter().enumerate() {
                // SAFETY: `8 * v + 8 <= dim = out.len()`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * v), _mm256_mul_ps(*a, scale)) };
            }
        }
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
