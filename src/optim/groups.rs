//! The positions of a batch of ids grouped by row, for the fused
//! coalesce-and-update of [`step_lookup`](super::SparseOptimizer::step_lookup).
//!
//! A lookup's gradient gives position `j` of the batch the gradient row
//! `grad_out[j]`, and row `ids[j]` of the table gets the sum of its
//! positions' rows, in batch order. Instead of summing into a coalesced
//! copy (as [`SparseGrad`](crate::SparseGrad) does), the fused step records
//! which positions belong together, in one pass over the ids:
//!
//! ```text
//! for j in 0..n (in batch order):
//!     r = ids[j]
//!     if r has no group yet: k = new group; rows[k] = r; heads[k] = j   (first position)
//!     else:                  k = group of r; j is the later[k]-th later position of k
//!                            later[k] += 1
//! ```
//!
//! Then [`copy_later`](Groups::copy_later), during the pass that checks
//! the gradient, copies the gradient rows of the later positions (about
//! one in eight for a uniform batch) into a scratch buffer, group after
//! group, each group's in batch order. The update then reads each group's
//! first row from `grad_out` and its later rows from the scratch, both in
//! increasing address order: no gradient row is fetched from a random
//! place of `grad_out` (whose 4 KiB pages make that slow).
//!
//! The group of a row is found in a direct array with one entry per table
//! row (4 bytes a row), allocated once and left all-none between batches:
//! only the entries of the batch's rows are touched, so the work stays
//! proportional to the batch. That is cheaper than hashing (no hash, no
//! probing, and the entry of an id a few positions ahead can be
//! prefetched).

use rayon::prelude::*;

use crate::aligned::{LANES_PER_LINE, SendPtr};
use crate::grad::{self, Line, ScanPart};
use crate::index::{Index, row_unchecked};
use crate::kernels::{self, Kernel, Simd, Tier};
use crate::parallel::PARALLEL_MIN_FLOATS;

/// "None": a row without a group yet, or a first position.
pub(crate) const NONE: u32 = u32::MAX;

/// Ids this many positions ahead have their group entry prefetched (16
/// left the W5 build waiting on the entries; 32 and 64 measured the same).
const PREFETCH_AHEAD: usize = 32;

/// Ids this many positions ahead whose row already has a group get that
/// group's count prefetched (their group entry is in cache by then): the
/// count of a random earlier group was a third of the build's time.
const LATER_AHEAD: usize = 8;

/// Positions ahead whose later occurrence is prefetched by [`Groups::copy_later`]
/// (about one in eight positions is a later occurrence).
const COPY_AHEAD: usize = 64;

/// Positions per task of [`Groups::copy_later`].
const CHUNK: usize = 256;

/// Positions of a batch grouped by row (see the module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct Groups {
    /// Per table row: its group in the batch being grouped, or [`NONE`].
    /// All [`NONE`] outside [`build`](Self::build).
    group_of: Vec<u32>,
    /// Per group: the row, in first-seen order.
    rows: Vec<usize>,
    /// Per group: its first position.
    heads: Vec<u32>,
    /// Per group `k`: its later positions' rows are scratch rows
    /// `later[k]..later[k + 1]` (one more entry than groups).
    later: Vec<u32>,
    /// Per position: its group if it is a later position, else [`NONE`].
    group_at: Vec<u32>,
    /// Per later position: how many later positions of its group precede it.
    rank_at: Vec<u32>,
    /// The later positions' gradient rows, `stride` floats each (pads zero).
    scratch: Vec<Line>,
}

impl Groups {
    /// Whether a batch of `n` ids fits the 32-bit positions.
    pub(crate) fn fits(n: usize) -> bool {
        n < NONE as usize
    }

    /// Groups the positions of `ids`, for a table of `table_rows` rows.
    ///
    /// # Safety
    /// Every id was checked to name a row below `table_rows`, and
    /// `Self::fits(ids.len())`.
    pub(crate) unsafe fn build<I: Index>(&mut self, ids: &[I], table_rows: usize) {
        debug_assert!(Self::fits(ids.len()));
        if self.group_of.len() != table_rows {
            self.group_of.clear();
            self.group_of.resize(table_rows, NONE);
        }
        self.rows.clear();
        self.heads.clear();
        self.later.clear();
        // Every position's entry of `group_at` is written below; `rank_at`
        // only for later positions, which are the only ones read, so
        // neither is cleared first (that was 1% of a W5 step).
        self.group_at.resize(ids.len(), NONE);
        self.rank_at.resize(ids.len(), 0);
        let Self {
            group_of,
            rows,
            heads,
            later,
            group_at,
            rank_at,
            ..
        } = self;
        for (j, &id) in ids.iter().enumerate() {
            if let Some(&ahead) = ids.get(j + PREFETCH_AHEAD) {
                // SAFETY: validated by the caller.
                let r = unsafe { row_unchecked(ahead) };
                kernels::prefetch(group_of.as_ptr().wrapping_add(r).cast());
            }
            if let Some(&near) = ids.get(j + LATER_AHEAD) {
                // SAFETY: validated by the caller.
                let k = group_of[unsafe { row_unchecked(near) }];
                if k != NONE {
                    kernels::prefetch(later.as_ptr().wrapping_add(k as usize).cast());
                }
            }
            // SAFETY: validated by the caller.
            let r = unsafe { row_unchecked(id) };
            let k = group_of[r];
            if k == NONE {
                group_of[r] = rows.len() as u32; // fits: groups <= positions
                group_at[j] = NONE;
                rows.push(r);
                heads.push(j as u32);
                later.push(0);
            } else {
                group_at[j] = k;
                rank_at[j] = later[k as usize];
                later[k as usize] += 1;
            }
        }
        // Back to all-none for the next batch: only this batch's rows moved.
        for (i, &r) in rows.iter().enumerate() {
            if let Some(&ahead) = rows.get(i + PREFETCH_AHEAD) {
                kernels::prefetch(group_of.as_ptr().wrapping_add(ahead).cast());
            }
            group_of[r] = NONE;
        }
        // Counts to offsets: group k's later rows start after those of 0..k.
        let mut total = 0;
        for n in later.iter_mut() {
            total += std::mem::replace(n, total);
        }
        later.push(total);
    }

    /// Copies the gradient row of every later position into the scratch
    /// (in parallel over positions), while scanning every row of
    /// `grad_out` (`dim` floats each) as [`grad::scan`] does. The copy is
    /// made whatever the scan finds; the caller decides afterwards whether
    /// the batch may be applied.
    pub(crate) fn copy_later(
        &mut self,
        tier: Tier,
        grad_out: &[f32],
        dim: usize,
        stride: usize,
    ) -> ScanPart {
        let n = self.group_at.len();
        debug_assert_eq!(grad_out.len(), n * dim);
        let total = *self.later.last().unwrap_or(&0) as usize;
        let lines = total * stride / LANES_PER_LINE;
        self.scratch.clear();
        self.scratch.reserve(lines);
        let scratch = SendPtr(self.scratch.as_mut_ptr().cast());
        let (group_at, rank_at, later) = (&self.group_at[..], &self.rank_at[..], &self.later[..]);
        // The update reads the scratch only after the whole gradient has
        // gone through the caches: unless that is small, the scratch would
        // not stay there anyway, and streaming saves reading each line
        // before it is overwritten.
        let stream = size_of_val(grad_out) >= STREAM_MIN_BYTES;
        let task = |c: usize| {
            let positions = c * CHUNK..((c + 1) * CHUNK).min(n);
            let rows = &grad_out[positions.start * dim..positions.end * dim];
            let found = grad::scan_part(tier, rows);
            kernels::dispatch(
                tier,
                CopyLater {
                    positions,
                    grad_out,
                    dim,
                    stride,
                    group_at,
                    rank_at,
                    later,
                    scratch,
                    stream,
                },
            );
            found
        };
        let chunks = n.div_ceil(CHUNK);
        let found = if n * dim < PARALLEL_MIN_FLOATS {
            (0..chunks)
                .map(task)
                .fold(ScanPart::default(), ScanPart::merge)
        } else {
            (0..chunks)
                .into_par_iter()
                .map(task)
                .reduce(ScanPart::default, ScanPart::merge)
        };
        // SAFETY: every later position has its own scratch row
        // (`later[k] + rank`, below `total`), and each was written whole
        // (all `stride` floats) by the one task that holds its position.
        unsafe { self.scratch.set_len(lines) };
        found
    }

    /// The distinct rows, in first-seen order.
    #[inline]
    pub(crate) fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// The first position of each group.
    #[inline]
    pub(crate) fn heads(&self) -> &[u32] {
        &self.heads
    }

    /// Group `k`'s later rows are scratch rows `later()[k]..later()[k + 1]`.
    #[inline]
    pub(crate) fn later(&self) -> &[u32] {
        &self.later
    }

    /// The later positions' gradient rows (after
    /// [`copy_later`](Self::copy_later)), `stride` floats each.
    #[inline]
    pub(crate) fn scratch(&self) -> &[f32] {
        let lines = &self.scratch[..];
        // SAFETY: a `Line` is 16 `f32`s with no padding, so the lines are
        // `16 * len` initialised floats, borrowed as `self`.
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * LANES_PER_LINE) }
    }
}

/// Scratch rows are streamed past the caches for gradients of this size on.
const STREAM_MIN_BYTES: usize = 16 << 20;

/// The body of [`Groups::copy_later`] for one run of positions.
struct CopyLater<'a> {
    positions: std::ops::Range<usize>,
    grad_out: &'a [f32],
    dim: usize,
    stride: usize,
    group_at: &'a [u32],
    rank_at: &'a [u32],
    later: &'a [u32],
    scratch: SendPtr,
    stream: bool,
}

impl Kernel for CopyLater<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let (dim, stride) = (self.dim, self.stride);
        let end = self.positions.end;
        for j in self.positions {
            // A later position's group offset lies anywhere in `later`, and
            // its row is one of a few scattered ones of `grad_out` (unless
            // a scan just read them).
            if j + COPY_AHEAD < end {
                let k = self.group_at[j + COPY_AHEAD];
                if k != NONE {
                    kernels::prefetch(self.later.as_ptr().wrapping_add(k as usize).cast());
                    let row = self.grad_out.as_ptr().wrapping_add((j + COPY_AHEAD) * dim);
                    kernels::prefetch_row_l2(row, dim);
                }
            }
            let k = self.group_at[j];
            if k == NONE {
                continue;
            }
            let q = (self.later[k as usize] + self.rank_at[j]) as usize;
            // SAFETY: scratch row `q` lies within the capacity reserved
            // for every later position, and only position `j` maps to it
            // (ranks within a group are distinct), so this task alone
            // writes it.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.scratch.get().add(q * stride), stride)
            };
            let src = &self.grad_out[j * dim..][..dim];
            if self.stream && dim == stride {
                kernels::copy_row_streaming(s, src, dst);
            } else {
                kernels::copy_row(s, src, &mut dst[..dim]);
                dst[dim..].fill(0.0);
            }
        }
        if self.stream {
            // Make the streamed rows visible before the task ends.
            s.fence();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each group's row, first position and later positions' values.
    fn groups(g: &Groups, grad_out: &[f32], stride: usize) -> Vec<(usize, u32, Vec<f32>)> {
        (0..g.rows().len())
            .map(|k| {
                let later = g.later()[k] as usize..g.later()[k + 1] as usize;
                let values = later.map(|q| g.scratch()[q * stride]).collect();
                (g.rows()[k], g.heads()[k], values)
            })
            .inspect(|(_, h, _)| assert!((*h as usize) < grad_out.len()))
            .collect()
    }

    #[test]
    fn groups_positions_by_row_in_batch_order() {
        let mut g = Groups::default();
        for tier in Tier::available() {
            let ids = [5u32, 2, 5, 0, 2, 5, 9];
            // One column: position j's gradient is j.
            let grad_out: Vec<f32> = (0..ids.len()).map(|j| j as f32).collect();
            // SAFETY: every id is below 10, and 7 positions fit.
            unsafe { g.build(&ids, 10) };
            let found = g.copy_later(tier, &grad_out, 1, 16);
            let scanned = found.finish("g", &grad_out).unwrap();
            assert_eq!(scanned.max_abs, 6.0, "every row scanned");
            assert_eq!(
                groups(&g, &grad_out, 16),
                [
                    (5, 0, vec![2.0, 5.0]),
                    (2, 1, vec![4.0]),
                    (0, 3, vec![]),
                    (9, 6, vec![])
                ]
            );
            assert!(g.scratch()[1..16].iter().all(|&x| x == 0.0), "pad lanes");
            assert!(
                g.group_of.iter().all(|&l| l == NONE),
                "reset after the batch"
            );
            // A second batch reuses the buffers and starts afresh.
            // SAFETY: as above.
            unsafe { g.build(&[9i64, 9], 10) };
            g.copy_later(tier, &[1.0, 2.0], 1, 16);
            assert_eq!(groups(&g, &[1.0, 2.0], 16), [(9, 0, vec![2.0])]);
            // SAFETY: an empty batch is trivially valid.
            unsafe { g.build::<u32>(&[], 10) };
            g.copy_later(tier, &[], 1, 16);
            assert!(g.rows().is_empty());
        }
    }
}
