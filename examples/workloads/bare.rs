//! Bare hand-written loops for the workloads: what this machine's memory
//! system gives when nothing but the workload's own traffic is done, the
//! yardstick embtable is measured against in the same run (`--bound`).
//!
//! Each is the loop a careful C programmer writes for one workload and
//! nothing else: no validation, no dispatch, no coalescing of repeated ids
//! (a W5 loop applies each position's gradient row as it comes), software
//! prefetch of upcoming rows and, for outputs larger than the cache,
//! non-temporal stores. With AVX-512F they use 16-lane vectors; elsewhere
//! plain loops the compiler vectorises, except the pooled loop, which with
//! AVX2 (and no AVX-512F) keeps a block of up to 16 `ymm` accumulators per
//! bag, as FBGEMM's AVX2 kernel does. Several threads split the work as
//! embtable does: gathers and bags by position, updates by row (a row's
//! positions all go to one thread, so no row is written by two).

use embtable::AlignedBuf;
use rayon::prelude::*;

/// Rows prefetched ahead (into L2) of the one being read.
const AHEAD: usize = 8;
/// Positions per parallel task.
const TASK: usize = 2048;

/// Rows prefetched ahead by the AVX2 pooled loop: 8 KiB of 128-float rows,
/// as embtable's kernels (on the 2-core Zen 3, 10 to 24 rows ran within
/// noise of each other, 6 and 40 slower).
const POOL_AHEAD: usize = 16;

/// Whether the AVX2 (with FMA) loops can run here.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512F loops can run here.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Prefetches the `len` floats from `p` into L2 (a hint: never faults).
#[inline(always)]
fn prefetch(p: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..len).step_by(16) {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        // SAFETY: a prefetch is a hint that cannot fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
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

/// A table's rows: `dim` floats each, `stride` apart in `values`.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub values: &'a [f32],
    pub stride: usize,
    pub dim: usize,
}

impl Rows<'_> {
    fn check(&self, ids: &[i64]) {
        assert!(self.dim.is_multiple_of(16) && self.dim <= self.stride);
        let fits = |&r: &i64| (r as usize + 1) * self.stride <= self.values.len();
        assert!(ids.iter().all(fits));
    }

    fn row(&self, r: i64) -> &[f32] {
        &self.values[r as usize * self.stride..][..self.dim]
    }

    fn prefetch(&self, r: i64) {
        let start = self.values.as_ptr().wrapping_add(r as usize * self.stride);
        prefetch(start, self.dim);
    }
}

/// `out[j] = table[ids[j]]`, streamed past the caches when `out` is large
/// and 64-byte aligned.
pub fn gather(table: Rows<'_>, ids: &[i64], out: &mut [f32]) {
    table.check(ids);
    let dim = table.dim;
    assert_eq!(out.len(), ids.len() * dim);
    let stream = out.len() * 4 >= 16 << 20 && (out.as_ptr() as usize).is_multiple_of(64);
    let out = Shared(out.as_mut_ptr());
    ids.par_chunks(TASK).enumerate().for_each(|(t, ids)| {
        for (i, &r) in ids.iter().enumerate() {
            if let Some(&ahead) = ids.get(i + AHEAD) {
                table.prefetch(ahead);
            }
            // SAFETY: position `t * TASK + i` is this task's alone, and its
            // `dim` floats lie in `out` (checked above).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.at((t * TASK + i) * dim), dim) };
            copy(table.row(r), dst, stream);
        }
        fence(stream);
    });
}

/// Bag `b` of `bag` ids: `out[b] = Σ w[i]·table[ids[i]]` (weights 1 if
/// `None`), times `scale` (1/len for a mean).
pub fn bag_sum(
    table: Rows<'_>,
    ids: &[i64],
    bag: usize,
    weights: Option<&[f32]>,
    scale: f32,
    out: &mut [f32],
) {
    table.check(ids);
    let dim = table.dim;
    assert!(dim <= 512 && out.len() * bag == ids.len() * dim);
    let bags_per_task = (TASK / bag).max(1);
    out.par_chunks_mut(dim * bags_per_task)
        .zip(ids.par_chunks(bags_per_task * bag))
        .enumerate()
        .for_each(|(t, (out, ids))| {
            let first = t * bags_per_task * bag;
            #[cfg(target_arch = "x86_64")]
            if avx2() && !avx512() {
                let weights = weights.map(|w| &w[first..first + ids.len()]);
                // SAFETY: AVX2 and FMA were detected; every id's row lies
                // in the table (checked above); `dim` is a multiple of 16
                // and every bag has its `dim` floats of `out`.
                return unsafe { x86::bags_avx2(table, ids, bag, weights, scale, out) };
            }
            let mut acc = [0.0f32; 512];
            for (b, out) in out.chunks_exact_mut(dim).enumerate() {
                let acc = &mut acc[..dim];
                acc.fill(0.0);
                for i in b * bag..(b + 1) * bag {
                    if let Some(&ahead) = ids.get(i + AHEAD) {
                        table.prefetch(ahead);
                    }
                    let w = weights.map_or(1.0, |w| w[first + i]);
                    add_scaled(acc, table.row(ids[i]), w);
                }
                for (o, a) in out.iter_mut().zip(acc.iter()) {
                    *o = a * scale;
                }
            }
        });
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
    assert!(dim.is_multiple_of(16) && dim <= stride && grad_out.len() == ids.len() * dim);
    assert_eq!(states.len(), update.arrays());
    let len = weights.len();
    assert!(states.iter().all(|s| s.len() == len));
    assert!(ids.iter().all(|&r| (r as usize + 1) * stride <= len));
    let w = Shared(weights.as_mut_ptr());
    let s: Vec<Shared> = states.iter_mut().map(|s| Shared(s.as_mut_ptr())).collect();
    let threads = rayon::current_num_threads();
    (0..threads).into_par_iter().for_each(|t| {
        let (w, s) = (w, &s);
        let mine = |r: i64| r as usize % threads == t;
        let mut ahead = ids
            .iter()
            .enumerate()
            .filter(|&(_, &r)| mine(r))
            .skip(AHEAD);
        for (j, &r) in ids.iter().enumerate() {
            if !mine(r) {
                continue;
            }
            if let Some((_, &next)) = ahead.next() {
                let at = next as usize * stride;
                prefetch(w.0.wrapping_add(at), dim);
                for p in s {
                    prefetch(p.0.wrapping_add(at), dim);
                }
            }
            let at = r as usize * stride;
            let g = &grad_out[j * dim..][..dim];
            // SAFETY: row `r` lies in every buffer (checked above) and only
            // thread `r % threads` touches it; the rows end before the next.
            let row = |p: Shared| unsafe { std::slice::from_raw_parts_mut(p.0.add(at), dim) };
            match update {
                Update::Sgd => add_scaled(row(w), g, -0.01),
                Update::OneState => one_state(row(w), row(s[0]), g),
                Update::TwoStates => two_states(row(w), row(s[0]), row(s[1]), g),
            }
        }
    });
}

fn copy(src: &[f32], dst: &mut [f32], stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::copy(src, dst, stream) };
    }
    let _ = stream;
    dst.copy_from_slice(src);
}

fn fence(stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if stream {
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = stream;
}

fn add_scaled(acc: &mut [f32], x: &[f32], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::add_scaled(acc, x, w) };
    }
    for (a, x) in acc.iter_mut().zip(x) {
        *a += w * x;
    }
}

fn one_state(w: &mut [f32], h: &mut [f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::one_state(w, h, g) };
    }
    for ((w, h), g) in w.iter_mut().zip(h).zip(g) {
        *h += g * g;
        *w -= 0.01 * g / (h.sqrt() + 1e-10);
    }
}

fn two_states(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::two_states(w, m, v, g) };
    }
    for (((w, m), v), g) in w.iter_mut().zip(m).zip(v).zip(g) {
        *m = 0.9 * *m + 0.1 * g;
        *v = 0.999 * *v + 0.001 * g * g;
        *w -= 0.01 * *m / (v.sqrt() + 1e-8);
    }
}

/// The same loops in 16-lane AVX-512 vectors (lengths are multiples of 16),
/// and the pooled loop in AVX2.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{POOL_AHEAD, Rows};

    /// Bags of `bag` ids, each reduced to its `dim` floats of `out`: a
    /// block of columns at a time in `ymm` registers, 16 of them for a
    /// plain sum (a whole 128-float row: one walk over the bag), 8 when
    /// each row is multiplied by its weight (the weight takes a register),
    /// then times `scale`.
    ///
    /// # Safety
    /// AVX2 and FMA are available; every id's row lies in `table`;
    /// `table.dim` is a multiple of 16; `out` holds `ids.len() / bag` rows
    /// of `dim`; `weights`, if any, holds one weight per id.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bags_avx2(
        table: Rows<'_>,
        ids: &[i64],
        bag: usize,
        weights: Option<&[f32]>,
        scale: f32,
        out: &mut [f32],
    ) {
        let dim = table.dim;
        let base = table.values.as_ptr();
        let row = |i: usize| base.wrapping_add(ids[i] as usize * table.stride);
        for &id in ids.iter().take(POOL_AHEAD) {
            table.prefetch(id);
        }
        for (b, out) in out.chunks_exact_mut(dim).enumerate() {
            let bag = b * bag..(b + 1) * bag;
            let mut col = 0;
            while col < dim {
                let first = col == 0;
                let args = (bag.clone(), col, first);
                // SAFETY: as this function's contract; blocks stay below `dim`.
                col += unsafe {
                    match ((dim - col) / 8, weights) {
                        (16.., None) => block::<16>(table, ids, &row, None, scale, out, args),
                        (8.., w) => block::<8>(table, ids, &row, w, scale, out, args),
                        (4.., w) => block::<4>(table, ids, &row, w, scale, out, args),
                        (_, w) => block::<2>(table, ids, &row, w, scale, out, args),
                    }
                };
            }
        }
    }

    /// Columns `col..col + 8 * V` of one bag; returns how many.
    ///
    /// # Safety
    /// As [`bags_avx2`], and `col + 8 * V <= dim`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const V: usize>(
        table: Rows<'_>,
        ids: &[i64],
        row: &impl Fn(usize) -> *const f32,
        weights: Option<&[f32]>,
        scale: f32,
        out: &mut [f32],
        (bag, col, prefetch): (std::ops::Range<usize>, usize, bool),
    ) -> usize {
        let mut acc = [_mm256_setzero_ps(); V];
        for i in bag {
            if prefetch && let Some(&ahead) = ids.get(i + POOL_AHEAD) {
                table.prefetch(ahead);
            }
            let r = row(i).wrapping_add(col);
            // SAFETY: `col + 8 * V <= dim` floats of a row in the table.
            unsafe {
                match weights {
                    None => {
                        for (v, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_add_ps(*acc, _mm256_loadu_ps(r.add(8 * v)));
                        }
                    }
                    Some(w) => {
                        let w = _mm256_set1_ps(w[i]);
                        for (v, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(8 * v)), *acc);
                        }
                    }
                }
            }
        }
        let scale = _mm256_set1_ps(scale);
        for (v, acc) in acc.into_iter().enumerate() {
            let dst = &mut out[col + 8 * v..col + 8 * v + 8];
            // SAFETY: `dst` holds 8 floats.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_mul_ps(acc, scale)) };
        }
        8 * V
    }

    /// # Safety
    /// AVX-512F is available; `dst` is 64-byte aligned when `stream`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn copy(src: &[f32], dst: &mut [f32], stream: bool) {
        assert_eq!(src.len(), dst.len());
        for i in (0..src.len()).step_by(16) {
            // SAFETY: `i + 16 <= len` of both (lengths are multiples of 16).
            unsafe {
                let x = _mm512_loadu_ps(src.as_ptr().add(i));
                if stream {
                    _mm512_stream_ps(dst.as_mut_ptr().add(i), x);
                } else {
                    _mm512_storeu_ps(dst.as_mut_ptr().add(i), x);
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F is available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn add_scaled(acc: &mut [f32], x: &[f32], w: f32) {
        assert_eq!(acc.len(), x.len());
        let w = _mm512_set1_ps(w);
        for i in (0..acc.len()).step_by(16) {
            // SAFETY: `i + 16 <= len` of both.
            unsafe {
                let a = _mm512_loadu_ps(acc.as_ptr().add(i));
                let x = _mm512_loadu_ps(x.as_ptr().add(i));
                _mm512_storeu_ps(acc.as_mut_ptr().add(i), _mm512_fmadd_ps(w, x, a));
            }
        }
    }

    /// # Safety
    /// AVX-512F is available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn one_state(w: &mut [f32], h: &mut [f32], g: &[f32]) {
        assert!(w.len() == h.len() && h.len() == g.len());
        let (lr, eps) = (_mm512_set1_ps(0.01), _mm512_set1_ps(1e-10));
        for i in (0..w.len()).step_by(16) {
            // SAFETY: `i + 16 <= len` of all three.
            unsafe {
                let gv = _mm512_loadu_ps(g.as_ptr().add(i));
                let hv = _mm512_fmadd_ps(gv, gv, _mm512_loadu_ps(h.as_ptr().add(i)));
                let d = _mm512_add_ps(_mm512_sqrt_ps(hv), eps);
                let wv = _mm512_sub_ps(
                    _mm512_loadu_ps(w.as_ptr().add(i)),
                    _mm512_div_ps(_mm512_mul_ps(lr, gv), d),
                );
                _mm512_storeu_ps(h.as_mut_ptr().add(i), hv);
                _mm512_storeu_ps(w.as_mut_ptr().add(i), wv);
            }
        }
    }

    /// # Safety
    /// AVX-512F is available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn two_states(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        assert!(w.len() == m.len() && m.len() == v.len() && v.len() == g.len());
        let (b1, c1) = (_mm512_set1_ps(0.9), _mm512_set1_ps(0.1));
        let (b2, c2) = (_mm512_set1_ps(0.999), _mm512_set1_ps(0.001));
        let (lr, eps) = (_mm512_set1_ps(0.01), _mm512_set1_ps(1e-8));
        for i in (0..w.len()).step_by(16) {
            // SAFETY: `i + 16 <= len` of all four.
            unsafe {
                let gv = _mm512_loadu_ps(g.as_ptr().add(i));
                let mv = _mm512_fmadd_ps(
                    b1,
                    _mm512_loadu_ps(m.as_ptr().add(i)),
                    _mm512_mul_ps(c1, gv),
                );
                let vv = _mm512_fmadd_ps(
                    b2,
                    _mm512_loadu_ps(v.as_ptr().add(i)),
                    _mm512_mul_ps(c2, _mm512_mul_ps(gv, gv)),
                );
                let d = _mm512_add_ps(_mm512_sqrt_ps(vv), eps);
                let wv = _mm512_sub_ps(
                    _mm512_loadu_ps(w.as_ptr().add(i)),
                    _mm512_div_ps(_mm512_mul_ps(lr, mv), d),
                );
                _mm512_storeu_ps(m.as_mut_ptr().add(i), mv);
                _mm512_storeu_ps(v.as_mut_ptr().add(i), vv);
                _mm512_storeu_ps(w.as_mut_ptr().add(i), wv);
            }
        }
    }
}
