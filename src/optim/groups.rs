//! The positions of a batch of ids grouped by row, for the fused
//! coalesce-and-update of [`step_lookup`](super::SparseOptimizer::step_lookup).
//!
//! A lookup's gradient gives position `j` of the batch the gradient row
//! `grad_out[j]`, and row `ids[j]` of the table gets the sum of its
//! positions' rows, in batch order. Instead of summing into a coalesced
//! copy (as [`SparseGrad`](crate::SparseGrad) does), the fused step groups
//! the positions by row ([`Grouping`]: groups in first-seen order, each
//! position's group and rank, in parallel for large batches), with the map
//! from row to group kept as a direct array of one entry per table row (4
//! bytes a row), allocated once and left all-none between batches: only
//! the entries of the batch's rows are touched, so the work stays
//! proportional to the batch. That is cheaper than hashing (no hash, no
//! probing, and the entry of an id a few positions ahead can be
//! prefetched).
//!
//! Then [`copy_later`](Groups::copy_later), during the pass that checks
//! the gradient, copies the gradient rows of the later positions (those
//! of rank 1 and up: about one in eight for a uniform batch) into a
//! scratch buffer, group after group, each group's in batch order. The
//! update then reads each group's first row from `grad_out` and its later
//! rows from the scratch, both in increasing address order: no gradient
//! row is fetched from a random place of `grad_out` (whose 4 KiB pages
//! make that slow).

use rayon::prelude::*;

use crate::aligned::{LANES_PER_LINE, SendPtr};
use crate::grad::{self, Line, ScanPart};
use crate::grouping::{DirectMaps, Grouping};
use crate::index::Index;
use crate::kernels::{self, Kernel, Simd, Tier};
use crate::parallel::PARALLEL_MIN_FLOATS;
use crate::phases::time;

/// Positions ahead whose later occurrence is prefetched by [`Groups::copy_later`]
/// (about one in eight positions is a later occurrence).
const COPY_AHEAD: usize = 64;

/// Positions per task of [`Groups::copy_later`].
const CHUNK: usize = 256;

/// Positions of a batch grouped by row (see the module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct Groups {
    grouping: Grouping,
    /// Per table row: its group in the batch being grouped.
    maps: DirectMaps,
    /// Per group `k`: its later positions' rows are scratch rows
    /// `later[k]..later[k + 1]` (one more entry than groups).
    later: Vec<u32>,
    /// The later positions' gradient rows, `stride` floats each (pads zero).
    scratch: Vec<Line>,
}

impl Groups {
    /// Whether a batch of `n` ids fits the 32-bit positions.
    pub(crate) fn fits(n: usize) -> bool {
        Grouping::fits(n)
    }

    /// Groups the positions of `ids`, for a table of `table_rows` rows.
    ///
    /// # Safety
    /// Every id was checked to name a row below `table_rows`, and
    /// `Self::fits(ids.len())`.
    pub(crate) unsafe fn build<I: Index>(&mut self, ids: &[I], table_rows: usize) {
        self.maps.fit(table_rows);
        time("group: grouping pass", || {
            // SAFETY: as the caller promises; the direct maps cover every
            // row below `table_rows`.
            unsafe { self.grouping.build(ids, &mut self.maps) }
        });
        // Back to all-none for the next batch: only this batch's rows moved.
        time("group: map reset", || {
            self.grouping.release(&mut self.maps, |_| 0)
        });
        // Sizes to offsets: group k's later rows start after those of 0..k.
        self.later.clear();
        let mut total = 0;
        for &size in self.grouping.sizes() {
            self.later.push(total);
            total += size - 1;
        }
        self.later.push(total);
    }

    /// Replaces each group `k`'s row `r` by `row(k, r)` (see
    /// [`Grouping::relabel`]).
    pub(crate) fn relabel(&mut self, row: impl FnMut(usize, usize) -> usize) {
        self.grouping.relabel(row);
    }

    /// Copies the gradient row of every later position into the scratch
    /// (in parallel over positions), while scanning every row of
    /// `grad_out` (`dim` floats each) as [`grad::scan`] does if `scan`
    /// (else it finds nothing). The copy is made whatever the scan finds;
    /// the caller decides afterwards whether the batch may be applied.
    pub(crate) fn copy_later(
        &mut self,
        tier: Tier,
        grad_out: &[f32],
        dim: usize,
        stride: usize,
        scan: bool,
    ) -> ScanPart {
        let n = self.grouping.group_at().len();
        debug_assert_eq!(grad_out.len(), n * dim);
        let total = *self.later.last().unwrap_or(&0) as usize;
        let lines = total * stride / LANES_PER_LINE;
        self.scratch.clear();
        self.scratch.reserve(lines);
        let scratch = SendPtr(self.scratch.as_mut_ptr().cast());
        let (group_at, rank_at) = (self.grouping.group_at(), self.grouping.rank_at());
        let later = &self.later[..];
        // The update reads the scratch only after the whole gradient has
        // gone through the caches: unless that is small, the scratch would
        // not stay there anyway, and streaming saves reading each line
        // before it is overwritten.
        let stream = size_of_val(grad_out) >= STREAM_MIN_BYTES;
        let task = |c: usize| {
            let positions = c * CHUNK..((c + 1) * CHUNK).min(n);
            let rows = &grad_out[positions.start * dim..positions.end * dim];
            let found = if scan {
                grad::scan_part(tier, rows)
            } else {
                ScanPart::default()
            };
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
        // (`later[k] + rank - 1`, below `total`), and each was written whole
        // (all `stride` floats) by the one task that holds its position.
        unsafe { self.scratch.set_len(lines) };
        found
    }

    /// The distinct rows, in first-seen order.
    #[inline]
    pub(crate) fn rows(&self) -> &[usize] {
        self.grouping.rows()
    }

    /// The first position of each group.
    #[inline]
    pub(crate) fn heads(&self) -> &[u32] {
        self.grouping.heads()
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
            if j + COPY_AHEAD < end && self.rank_at[j + COPY_AHEAD] != 0 {
                let k = self.group_at[j + COPY_AHEAD];
                kernels::prefetch(self.later.as_ptr().wrapping_add(k as usize).cast());
                let row = self.grad_out.as_ptr().wrapping_add((j + COPY_AHEAD) * dim);
                kernels::prefetch_row_l2(row, dim);
            }
            let rank = self.rank_at[j];
            if rank == 0 {
                continue; // a group's first position: the update reads it in place
            }
            let q = (self.later[self.group_at[j] as usize] + rank - 1) as usize;
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
            let found = g.copy_later(tier, &grad_out, 1, 16, true);
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
            // A second batch reuses the buffers and starts afresh.
            // SAFETY: as above.
            unsafe { g.build(&[9i64, 9], 10) };
            g.copy_later(tier, &[1.0, 2.0], 1, 16, true);
            assert_eq!(groups(&g, &[1.0, 2.0], 16), [(9, 0, vec![2.0])]);
            // SAFETY: an empty batch is trivially valid.
            unsafe { g.build::<u32>(&[], 10) };
            g.copy_later(tier, &[], 1, 16, true);
            assert!(g.rows().is_empty());
        }
    }
}
