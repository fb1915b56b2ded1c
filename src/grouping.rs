//! A batch's positions grouped by the row each names, on every thread.
//!
//! Both ways a lookup's gradient reaches an optimizer start here: a
//! [`SparseGrad`](crate::SparseGrad) sums each row's positions into a slot,
//! and the fused `step_lookup` sums them right before it updates the row.
//! The grouping is the same whichever way it is computed and whatever the
//! thread count:
//!
//! - groups `k = 0, 1, …` in the order their rows first appear in the
//!   batch, each with its row, its first position, its size and a tag the
//!   row map gives it (a [`SparseGrad`](crate::SparseGrad)'s earlier slot);
//! - for every position `j`, its group and its rank: how many earlier
//!   positions name the same row.
//!
//! On few threads, or for a batch too small to share, one pass does it:
//!
//! ```text
//! for j in 0..n: r = row of ids[j]
//!     r has no group yet: k = next group; rows[k] = r; heads[k] = j; sizes[k] = 1; rank 0
//!     else:               k = group of r;  rank sizes[k]; sizes[k] += 1
//! ```
//!
//! Otherwise rows are split into shards by [`lane`] (six mixed low bits of
//! the row, so that neighbouring rows, and rows 64 or 4,096 apart, land in
//! different shards), and every row's positions lie in one shard:
//!
//! ```text
//! count:   per chunk of positions (parallel): its ids per shard
//! scatter: per chunk (parallel): each position to its shard's list, batch order kept
//! group:   per shard (parallel): the one pass above over the shard's positions
//! number:  per chunk (parallel): the groups whose first position lies in the chunk,
//!          from every shard, in position order, take the next numbers
//! gather:  per chunk (parallel): each position's group number and rank
//! ```
//!
//! The numbers are the first-seen order because groups are numbered by
//! their first position, and a rank counts earlier positions of one row,
//! which its shard saw in batch order. So nothing depends on the shard
//! count, and the shard count depends on the batch (one shard per
//! [`SHARD_IDS`] ids, at most [`LANES`]) and on whether there are enough
//! threads to share the sharded passes' extra work
//! ([`SHARD_MIN_THREADS`]), never on how many more.

use std::mem::MaybeUninit;

use hashbrown::HashMap;
use hashbrown::hash_map::Entry;
use rayon::prelude::*;

use crate::index::{Index, row_unchecked};
use crate::kernels;

/// "None": a row without a group, a position that is not a later one.
pub(crate) const NONE: u32 = u32::MAX;

/// Shards a row can fall in: `lane(row) < LANES`.
pub(crate) const LANES: usize = 1 << LANE_BITS;
const LANE_BITS: u32 = 6;

/// Ids per shard (4 under Miri, so that its runs reach the sharded passes).
pub(crate) const SHARD_IDS: usize = kernels::parallel_size(4096);

/// Below this many ids a batch is grouped in one pass on the calling
/// thread: waking rayon's workers for each sharded pass costs microseconds.
pub(crate) const PARALLEL_MIN_IDS: usize = 4 * SHARD_IDS;

/// With fewer threads than this a batch is grouped in one pass: the
/// sharded passes take about 2.5 times the CPU time of the one pass
/// (perf samples of W5's grouping on one thread: 1,690-1,880 against
/// 700-720), so they only pay where at least three threads share them,
/// and four leave a margin.
pub(crate) const SHARD_MIN_THREADS: usize = 4;

/// Positions per task of the count, scatter, number and gather passes.
const CHUNK: usize = 4096;

/// Ids this many positions ahead have their map entry prefetched (16
/// left the W5 grouping waiting on the entries; 32 and 64 measured the same).
const PREFETCH_AHEAD: usize = 32;

/// Ids this many positions ahead whose row already has a group get that
/// group's size prefetched (their map entry is in cache by then): the size
/// of a random earlier group was a third of the W5 grouping's time.
const SIZE_AHEAD: usize = 8;

/// The shard lane of `row`: its low six bits mixed with the next twelve.
/// The map from `row` to `(lane(row), row >> 6)` is one to one.
#[inline(always)]
pub(crate) fn lane(row: usize) -> usize {
    (row ^ (row >> LANE_BITS) ^ (row >> (2 * LANE_BITS))) & (LANES - 1)
}

/// The shard of `row` among `1 << bits`: lanes split into equal runs.
#[inline(always)]
fn shard_of(row: usize, bits: u32) -> usize {
    lane(row) >> (LANE_BITS - bits)
}

/// What [`RowMap::group`] found.
pub(crate) enum Found {
    /// The row has this group already.
    Old(u32),
    /// The row had no group: it has `next` now, with this tag.
    New(usize),
}

/// The map of one shard from a row to its group in the batch.
pub(crate) trait RowMap: Send {
    /// Whether [`Found::New`]'s tags mean something (else they are not kept).
    const TAGGED: bool;
    /// The group of `row`, or [`Found::New`] after making `next` its group.
    fn group(&mut self, row: usize, next: u32) -> Found;
    /// Starts loading the entry of `row`.
    #[inline(always)]
    fn prefetch(&self, row: usize) {
        let _ = row;
    }
    /// The group of `row` if it has one and finding it is cheap, for a prefetch.
    #[inline(always)]
    fn peek(&self, row: usize) -> u32 {
        let _ = row;
        NONE
    }
    /// Forgets the group of `row`, leaving `tag` for the next batch.
    fn release(&mut self, row: usize, tag: usize);
}

/// Row maps split by lane, so each shard gets its own.
pub(crate) trait RowMaps {
    /// The map of one shard.
    type Shard<'a>: RowMap
    where
        Self: 'a;
    /// The `1 << bits` shards' maps, shard `s` holding the rows whose
    /// [`shard_of`] is `s`.
    fn shards(&mut self, bits: u32) -> Vec<Self::Shard<'_>>;
}

/// Groups of one batch, or one shard of it, in first-seen order.
#[derive(Clone, Debug, Default)]
struct GroupList {
    rows: Vec<usize>,
    heads: Vec<u32>,
    sizes: Vec<u32>,
    tags: Vec<usize>,
}

impl GroupList {
    fn clear(&mut self) {
        self.rows.clear();
        self.heads.clear();
        self.sizes.clear();
        self.tags.clear();
    }
}

/// A batch's positions grouped by row (see the module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct Grouping {
    groups: GroupList,
    /// Per position: its group.
    group_at: Vec<u32>,
    /// Per position: earlier positions of its group.
    rank_at: Vec<u32>,
    /// The shard count of the last batch, as `1 << bits`.
    bits: u32,
    shards: Shards,
}

/// Working memory of the sharded passes, kept between batches.
#[derive(Clone, Debug, Default)]
struct Shards {
    /// `[chunk][shard]`: the chunk's ids in the shard, then where they go.
    counts: Vec<usize>,
    /// Per shard: its first entry (one more than shards).
    start: Vec<usize>,
    /// Per entry (positions by shard, batch order within one): position, row.
    position: Vec<u32>,
    row: Vec<usize>,
    /// Per position: its entry.
    entry_of: Vec<u32>,
    /// Per entry: its group in its shard, and its rank.
    group: Vec<u32>,
    rank: Vec<u32>,
    /// Per entry, once numbered: its group's number (high half) and its
    /// rank (low half), so that the gather reads one value per position.
    placed: Vec<u64>,
    /// Per shard: its groups, their numbers, and `[chunk + 1]` how many of
    /// its groups start before the chunk.
    lists: Vec<GroupList>,
    number: Vec<Vec<u32>>,
    heads_before: Vec<Vec<u32>>,
}

/// A raw pointer that parallel tasks write through at distinct indices.
struct Scatter<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for Scatter<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Scatter<T> {}
// SAFETY: tasks write distinct elements (each use says why); `T: Send`
// values may be written from another thread.
unsafe impl<T: Send> Send for Scatter<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Scatter<T> {}

impl<T> Scatter<T> {
    fn new(slice: &mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// Writes `value` at `i`.
    ///
    /// # Safety
    /// `i` is in bounds of the slice this was made from, that slice outlives
    /// the write, and no other thread reads or writes element `i` meanwhile.
    #[inline(always)]
    unsafe fn write(self, i: usize, value: T) {
        debug_assert!(i < self.len);
        // SAFETY: as the caller promises.
        unsafe { self.ptr.add(i).write(value) }
    }
}

impl Grouping {
    /// Whether a batch of `n` ids fits the 32-bit positions.
    pub(crate) fn fits(n: usize) -> bool {
        n < NONE as usize
    }

    /// Groups the positions of `ids` with the row maps `maps`. The maps
    /// hold this batch's groups until [`release`](Self::release).
    ///
    /// # Safety
    /// Every id was checked to name a row (`row()` is `Some`), and
    /// `Self::fits(ids.len())`.
    pub(crate) unsafe fn build<I: Index, M: RowMaps>(&mut self, ids: &[I], maps: &mut M) {
        debug_assert!(Self::fits(ids.len()));
        let n = ids.len();
        self.group_at.resize(n, 0);
        self.rank_at.resize(n, 0);
        self.groups.clear();
        self.bits = shard_bits(n);
        if n == 0 {
            return; // (a table of no rows has no maps to split)
        }
        if self.bits == 0 {
            let mut shards = maps.shards(0);
            // SAFETY: the caller validated the ids.
            let row = |e: usize| unsafe { row_unchecked(ids[e]) };
            let pos = |e: usize| e as u32; // fits: n < u32::MAX
            group_entries(
                &mut shards[0],
                n,
                row,
                pos,
                &mut self.group_at,
                &mut self.rank_at,
                &mut self.groups,
            );
        } else {
            // SAFETY: as the caller promises.
            unsafe { self.build_sharded(ids, maps) };
        }
    }

    /// [`build`](Self::build) over `1 << self.bits` shards.
    ///
    /// # Safety
    /// As [`build`](Self::build).
    unsafe fn build_sharded<I: Index, M: RowMaps>(&mut self, ids: &[I], maps: &mut M) {
        let (n, bits) = (ids.len(), self.bits);
        let shard_count = 1 << bits;
        let chunks = n.div_ceil(CHUNK);
        let sh = &mut self.shards;
        // SAFETY: the caller validated the ids.
        let row_at = |j: usize| unsafe { row_unchecked(ids[j]) };

        // Count: each chunk's ids per shard.
        sh.counts.clear();
        sh.counts.resize(chunks * shard_count, 0);
        sh.counts
            .par_chunks_mut(shard_count)
            .enumerate()
            .for_each(|(c, counts)| {
                for j in c * CHUNK..((c + 1) * CHUNK).min(n) {
                    counts[shard_of(row_at(j), bits)] += 1;
                }
            });
        // Where each chunk's ids of each shard go: shard by shard, and
        // within a shard chunk by chunk, so batch order is kept.
        sh.start.clear();
        let mut next = 0;
        for s in 0..shard_count {
            sh.start.push(next);
            for c in 0..chunks {
                let count = std::mem::replace(&mut sh.counts[c * shard_count + s], next);
                next += count;
            }
        }
        sh.start.push(next);

        // Scatter: each position to its shard's entries.
        sh.position.resize(n, 0);
        sh.row.resize(n, 0);
        sh.entry_of.resize(n, 0);
        let (position, row) = (Scatter::new(&mut sh.position), Scatter::new(&mut sh.row));
        sh.counts
            .par_chunks_mut(shard_count)
            .zip(sh.entry_of.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (next, entry_of))| {
                for (j, entry) in (c * CHUNK..).zip(entry_of) {
                    let r = row_at(j);
                    let e = &mut next[shard_of(r, bits)];
                    // SAFETY: entry `*e` lies in the run the prefix sums
                    // gave this chunk in this shard (below `n`), which no
                    // other chunk writes, and each position takes the
                    // next one.
                    unsafe {
                        position.write(*e, j as u32);
                        row.write(*e, r);
                    }
                    *entry = *e as u32;
                    *e += 1;
                }
            });

        // Group each shard's entries.
        sh.group.resize(n, 0);
        sh.rank.resize(n, 0);
        sh.lists.resize_with(shard_count, GroupList::default);
        sh.heads_before.resize_with(shard_count, Vec::new);
        sh.number.resize_with(shard_count, Vec::new);
        let mut maps = maps.shards(bits);
        {
            let mut group = &mut sh.group[..];
            let mut rank = &mut sh.rank[..];
            let mut tasks = Vec::with_capacity(shard_count);
            for (s, (((map, list), heads_before), number)) in maps
                .iter_mut()
                .zip(&mut sh.lists)
                .zip(&mut sh.heads_before)
                .zip(&mut sh.number)
                .enumerate()
            {
                let entries = sh.start[s]..sh.start[s + 1];
                let (g, rest_g) = std::mem::take(&mut group).split_at_mut(entries.len());
                let (r, rest_r) = std::mem::take(&mut rank).split_at_mut(entries.len());
                (group, rank) = (rest_g, rest_r);
                tasks.push((map, list, heads_before, number, entries, g, r));
            }
            let (position, row) = (&sh.position[..], &sh.row[..]);
            tasks.into_par_iter().for_each(
                |(map, list, heads_before, number, entries, group, rank)| {
                    list.clear();
                    let first = entries.start;
                    group_entries(
                        map,
                        entries.len(),
                        |e| row[first + e],
                        |e| position[first + e],
                        group,
                        rank,
                        list,
                    );
                    // How many of the shard's groups start before each chunk.
                    heads_before.clear();
                    heads_before.resize(chunks + 1, 0);
                    for &h in &list.heads {
                        heads_before[h as usize / CHUNK + 1] += 1;
                    }
                    for c in 0..chunks {
                        heads_before[c + 1] += heads_before[c];
                    }
                    number.resize(list.rows.len(), 0);
                },
            );
        }

        // Number: chunk by chunk, the groups starting in the chunk in
        // position order.
        let mut first_number = Vec::with_capacity(chunks + 1);
        let mut total = 0;
        for c in 0..chunks {
            first_number.push(total);
            total += (0..shard_count)
                .map(|s| (sh.heads_before[s][c + 1] - sh.heads_before[s][c]) as usize)
                .sum::<usize>();
        }
        first_number.push(total);
        // Written below, every number once, then set to their lengths.
        let out = &mut self.groups;
        let tagged = <M::Shard<'_> as RowMap>::TAGGED;
        let tags_len = if tagged { total } else { 0 };
        out.rows.reserve(total);
        out.heads.reserve(total);
        out.sizes.reserve(total);
        out.tags.reserve(tags_len);
        let rows_out = Scatter::new(&mut out.rows.spare_capacity_mut()[..total]);
        let heads_out = Scatter::new(&mut out.heads.spare_capacity_mut()[..total]);
        let sizes_out = Scatter::new(&mut out.sizes.spare_capacity_mut()[..total]);
        let tags_out = Scatter::new(&mut out.tags.spare_capacity_mut()[..tags_len]);
        let numbers: Vec<Scatter<u32>> = sh
            .number
            .iter_mut()
            .map(|v| Scatter::new(&mut v[..]))
            .collect();
        let (lists, heads_before) = (&sh.lists[..], &sh.heads_before[..]);
        (0..chunks).into_par_iter().for_each_init(
            || vec![u64::MAX; CHUNK],
            |mark, c| {
                // mark[j - c * CHUNK] = (shard, group) of the group starting at j.
                for (s, list) in lists.iter().enumerate() {
                    let groups = heads_before[s][c] as usize..heads_before[s][c + 1] as usize;
                    for g in groups {
                        mark[list.heads[g] as usize - c * CHUNK] = ((s as u64) << 32) | g as u64;
                    }
                }
                let mut k = first_number[c];
                for (t, m) in mark.iter_mut().enumerate() {
                    if *m == u64::MAX {
                        continue;
                    }
                    let (s, g) = ((*m >> 32) as usize, *m as u32 as usize);
                    *m = u64::MAX;
                    let list = &lists[s];
                    // SAFETY: `k` runs over this chunk's numbers
                    // `first_number[c]..first_number[c + 1]` (below the
                    // outputs' length `total`), which no other chunk
                    // takes; group `g` of shard `s` starts in this chunk
                    // only, so only this task numbers it.
                    unsafe {
                        rows_out.write(k, MaybeUninit::new(list.rows[g]));
                        heads_out.write(k, MaybeUninit::new((c * CHUNK + t) as u32));
                        sizes_out.write(k, MaybeUninit::new(list.sizes[g]));
                        if tagged {
                            tags_out.write(k, MaybeUninit::new(list.tags[g]));
                        }
                        numbers[s].write(g, k as u32);
                    }
                    k += 1;
                }
            },
        );

        // SAFETY: every number below `total` went to exactly one group
        // above (the chunks' runs of numbers cover `0..total`, each taken
        // by one group starting in the chunk), which wrote each output at
        // it, within the capacity reserved.
        unsafe {
            out.rows.set_len(total);
            out.heads.set_len(total);
            out.sizes.set_len(total);
            out.tags.set_len(tags_len);
        }

        // Each entry's number and rank, shard by shard (entries in order,
        // the shard's numbers at hand).
        sh.placed.resize(n, 0);
        {
            let mut placed = &mut sh.placed[..];
            let mut tasks = Vec::with_capacity(shard_count);
            for (s, number) in sh.number.iter().enumerate() {
                let entries = sh.start[s]..sh.start[s + 1];
                let (p, rest) = std::mem::take(&mut placed).split_at_mut(entries.len());
                placed = rest;
                tasks.push((number, entries, p));
            }
            let (group, rank) = (&sh.group[..], &sh.rank[..]);
            tasks.into_par_iter().for_each(|(number, entries, placed)| {
                for (p, e) in placed.iter_mut().zip(entries) {
                    *p = ((number[group[e] as usize] as u64) << 32) | rank[e] as u64;
                }
            });
        }

        // Gather: each position's group number and rank.
        let sh = &self.shards;
        self.group_at
            .par_chunks_mut(CHUNK)
            .zip(self.rank_at.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (group_at, rank_at))| {
                let entries = &sh.entry_of[c * CHUNK..][..group_at.len()];
                for ((g, r), &e) in group_at.iter_mut().zip(rank_at).zip(entries) {
                    let placed = sh.placed[e as usize];
                    (*g, *r) = ((placed >> 32) as u32, placed as u32);
                }
            });
    }

    /// Hands every row of the last batch back to `maps` with the tag
    /// `tag(k)` of its group `k`, ready for the next batch.
    pub(crate) fn release<M: RowMaps>(&self, maps: &mut M, tag: impl Fn(usize) -> usize + Sync) {
        let mut shards = maps.shards(self.bits);
        if self.bits == 0 {
            let Some(map) = shards.first_mut() else {
                return; // no rows, no batch
            };
            let rows = &self.groups.rows;
            for (k, &r) in rows.iter().enumerate() {
                if let Some(&ahead) = rows.get(k + PREFETCH_AHEAD) {
                    map.prefetch(ahead);
                }
                map.release(r, tag(k));
            }
            return;
        }
        let sh = &self.shards;
        shards
            .par_iter_mut()
            .zip(&sh.lists)
            .zip(&sh.number)
            .for_each(|((map, list), number)| {
                for (&r, &k) in list.rows.iter().zip(number) {
                    map.release(r, tag(k as usize));
                }
            });
    }

    /// Replaces each group `k`'s row `r` by `row(k, r)`, group after
    /// group, once the batch is grouped and released: a batch grouped by
    /// labels that stand one to one for rows is then grouped by those rows.
    pub(crate) fn relabel(&mut self, mut row: impl FnMut(usize, usize) -> usize) {
        for (k, r) in self.groups.rows.iter_mut().enumerate() {
            *r = row(k, *r);
        }
    }

    /// Per group: its row, in first-seen order.
    #[inline]
    pub(crate) fn rows(&self) -> &[usize] {
        &self.groups.rows
    }

    /// Per group: its first position.
    #[inline]
    pub(crate) fn heads(&self) -> &[u32] {
        &self.groups.heads
    }

    /// Per group: how many positions it has.
    #[inline]
    pub(crate) fn sizes(&self) -> &[u32] {
        &self.groups.sizes
    }

    /// Per group: the tag its row map gave it (empty for maps without
    /// tags).
    #[inline]
    pub(crate) fn tags(&self) -> &[usize] {
        &self.groups.tags
    }

    /// Per position: its group.
    #[inline]
    pub(crate) fn group_at(&self) -> &[u32] {
        &self.group_at
    }

    /// Per position: how many earlier positions share its group.
    #[inline]
    pub(crate) fn rank_at(&self) -> &[u32] {
        &self.rank_at
    }
}

/// The shard count for a batch of `n` ids, as `1 << bits`: 1 below
/// [`PARALLEL_MIN_IDS`] or [`SHARD_MIN_THREADS`], else one per [`SHARD_IDS`].
fn shard_bits(n: usize) -> u32 {
    if n < PARALLEL_MIN_IDS || rayon::current_num_threads() < SHARD_MIN_THREADS {
        return 0;
    }
    (n / SHARD_IDS).ilog2().min(LANE_BITS)
}

/// The one pass over entries `0..len` (rows `row(e)`, positions `pos(e)`,
/// in batch order): `groups` gets the new groups, `group[e]` and `rank[e]`
/// each entry's group and rank.
#[inline(always)]
fn group_entries<M: RowMap>(
    map: &mut M,
    len: usize,
    row: impl Fn(usize) -> usize,
    pos: impl Fn(usize) -> u32,
    group: &mut [u32],
    rank: &mut [u32],
    groups: &mut GroupList,
) {
    let (group, rank) = (&mut group[..len], &mut rank[..len]);
    for e in 0..len {
        if e + PREFETCH_AHEAD < len {
            map.prefetch(row(e + PREFETCH_AHEAD));
        }
        if e + SIZE_AHEAD < len {
            let k = map.peek(row(e + SIZE_AHEAD));
            if k != NONE {
                kernels::prefetch(groups.sizes.as_ptr().wrapping_add(k as usize).cast());
            }
        }
        let r = row(e);
        match map.group(r, groups.rows.len() as u32) {
            Found::New(tag) => {
                group[e] = groups.rows.len() as u32; // fits: groups <= entries
                rank[e] = 0;
                groups.rows.push(r);
                groups.heads.push(pos(e));
                groups.sizes.push(1);
                if M::TAGGED {
                    groups.tags.push(tag);
                }
            }
            Found::Old(k) => {
                let size = &mut groups.sizes[k as usize];
                group[e] = k;
                rank[e] = *size;
                *size += 1;
            }
        }
    }
}

/// Row maps as one array entry per table row (4 bytes a row), laid out
/// lane by lane so that each shard owns one run: no hashing, and the
/// entry of an id a few positions ahead can be prefetched. Entries are
/// all [`NONE`] between batches.
#[derive(Clone, Debug, Default)]
pub(crate) struct DirectMaps {
    group_of: Vec<u32>,
    per_lane: usize,
}

impl DirectMaps {
    /// Makes room for the rows of a table of `rows` rows. The map only
    /// grows: its entries are all [`NONE`] between batches, so a larger
    /// layout serves a smaller table, and a dynamic table's batches, which
    /// group up to a batch's worth of labels beyond its rows, do not
    /// reallocate it at each step.
    pub(crate) fn fit(&mut self, rows: usize) {
        let per_lane = rows.div_ceil(LANES);
        if per_lane > self.per_lane || self.group_of.is_empty() {
            self.per_lane = per_lane;
            self.group_of.clear();
            self.group_of.resize(per_lane * LANES, NONE);
        }
    }
}

/// The entries of one shard's lanes, or of every row.
pub(crate) struct DirectShard<'a> {
    group_of: &'a mut [u32],
    first_lane: usize,
    per_lane: usize,
    /// The one shard of the one-pass grouping: row `r`'s entry is entry `r`
    /// (no lane to compute; every entry is [`NONE`] between batches, so
    /// the layout of one batch need not be the next one's).
    whole: bool,
}

impl DirectShard<'_> {
    #[inline(always)]
    fn index(&self, row: usize) -> usize {
        if self.whole {
            row
        } else {
            (lane(row) - self.first_lane) * self.per_lane + (row >> LANE_BITS)
        }
    }
}

impl RowMap for DirectShard<'_> {
    const TAGGED: bool = false;

    #[inline(always)]
    fn group(&mut self, row: usize, next: u32) -> Found {
        let i = self.index(row);
        match self.group_of[i] {
            NONE => {
                self.group_of[i] = next;
                Found::New(0)
            }
            k => Found::Old(k),
        }
    }

    #[inline(always)]
    fn prefetch(&self, row: usize) {
        let i = self.index(row);
        kernels::prefetch(self.group_of.as_ptr().wrapping_add(i).cast());
    }

    #[inline(always)]
    fn peek(&self, row: usize) -> u32 {
        self.group_of[self.index(row)]
    }

    #[inline(always)]
    fn release(&mut self, row: usize, _tag: usize) {
        let i = self.index(row);
        self.group_of[i] = NONE;
    }
}

impl RowMaps for DirectMaps {
    type Shard<'a> = DirectShard<'a>;

    fn shards(&mut self, bits: u32) -> Vec<DirectShard<'_>> {
        let lanes = LANES >> bits;
        let per_lane = self.per_lane;
        self.group_of
            .chunks_mut((lanes * per_lane).max(1))
            .enumerate()
            .map(|(s, group_of)| DirectShard {
                group_of,
                first_lane: s * lanes,
                per_lane,
                whole: bits == 0,
            })
            .collect()
    }
}

/// A row's entry in [`HashMaps`]: the tag it keeps between batches, and
/// its group in the batch being grouped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tagged {
    tag: usize,
    group: u32,
}

/// Row maps as one hash map per lane, for rows of any size, whose entries
/// outlive a batch with a tag each (a [`SparseGrad`](crate::SparseGrad)
/// keeps its slots there).
#[derive(Clone, Debug)]
pub(crate) struct HashMaps {
    maps: Vec<HashMap<usize, Tagged>>,
}

impl Default for HashMaps {
    fn default() -> Self {
        Self {
            maps: vec![HashMap::new(); LANES],
        }
    }
}

impl HashMaps {
    /// The tag of `row`, if it has an entry.
    #[cfg(test)]
    fn tag(&self, row: usize) -> Option<usize> {
        self.maps[lane(row)].get(&row).map(|t| t.tag)
    }

    /// Removes `row`'s entry between batches, returning its tag.
    pub(crate) fn remove(&mut self, row: &usize) -> Option<usize> {
        self.maps[lane(*row)].remove(row).map(|t| t.tag)
    }

    /// Every entry's tag, to renumber them between batches.
    pub(crate) fn tags_mut(&mut self) -> impl Iterator<Item = &mut usize> {
        self.maps
            .iter_mut()
            .flat_map(|map| map.values_mut())
            .map(|entry| &mut entry.tag)
    }

    /// Forgets every row, keeping the allocations.
    pub(crate) fn clear(&mut self) {
        for map in &mut self.maps {
            map.clear();
        }
    }
}

/// The maps of one shard's lanes.
pub(crate) struct HashShard<'a> {
    maps: &'a mut [HashMap<usize, Tagged>],
    first_lane: usize,
}

impl RowMap for HashShard<'_> {
    const TAGGED: bool = true;

    #[inline(always)]
    fn group(&mut self, row: usize, next: u32) -> Found {
        match self.maps[lane(row) - self.first_lane].entry(row) {
            Entry::Vacant(v) => {
                v.insert(Tagged {
                    tag: usize::MAX,
                    group: next,
                });
                Found::New(usize::MAX)
            }
            Entry::Occupied(mut o) => {
                let entry = o.get_mut();
                if entry.group == NONE {
                    entry.group = next;
                    Found::New(entry.tag)
                } else {
                    Found::Old(entry.group)
                }
            }
        }
    }

    fn release(&mut self, row: usize, tag: usize) {
        let entry = self.maps[lane(row) - self.first_lane]
            .get_mut(&row)
            .expect("a row of the batch has an entry");
        *entry = Tagged { tag, group: NONE };
    }
}

impl RowMaps for HashMaps {
    type Shard<'a> = HashShard<'a>;

    fn shards(&mut self, bits: u32) -> Vec<HashShard<'_>> {
        let lanes = LANES >> bits;
        self.maps
            .chunks_mut(lanes)
            .enumerate()
            .map(|(s, maps)| HashShard {
                maps,
                first_lane: s * lanes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows, heads and sizes of the groups; each position's group and rank.
    type Grouped = (Vec<usize>, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>);

    /// The one-pass grouping, written plainly.
    fn reference(ids: &[usize]) -> Grouped {
        let (mut rows, mut heads, mut sizes) = (Vec::new(), Vec::new(), Vec::<u32>::new());
        let (mut group_at, mut rank_at) = (Vec::new(), Vec::new());
        let mut group_of = std::collections::HashMap::new();
        for (j, &r) in ids.iter().enumerate() {
            match group_of.get(&r) {
                Some(&k) => {
                    group_at.push(k as u32);
                    rank_at.push(sizes[k]);
                    sizes[k] += 1;
                }
                None => {
                    group_of.insert(r, rows.len());
                    group_at.push(rows.len() as u32);
                    rank_at.push(0);
                    rows.push(r);
                    heads.push(j as u32);
                    sizes.push(1);
                }
            }
        }
        (rows, heads, sizes, group_at, rank_at)
    }

    fn check<M: RowMaps>(g: &mut Grouping, maps: &mut M, ids: &[usize]) {
        // SAFETY: usize ids always name a row, and the batches are small.
        unsafe { g.build(ids, maps) };
        let (rows, heads, sizes, group_at, rank_at) = reference(ids);
        assert_eq!(g.rows(), &rows[..]);
        assert_eq!(g.heads(), &heads[..]);
        assert_eq!(g.sizes(), &sizes[..]);
        assert_eq!(g.group_at(), &group_at[..]);
        assert_eq!(g.rank_at(), &rank_at[..]);
        g.release(maps, |k| k);
    }

    #[test]
    fn every_shard_count_groups_as_one_pass() {
        // Rows in lanes 0..64 and beyond, contiguous and strided runs,
        // repeats near and far.
        let n = 2 * PARALLEL_MIN_IDS + 77;
        let ids: Vec<usize> = (0..n)
            .map(|j| match j % 4 {
                0 => j / 4 % 700,
                1 => (j * 7919) % 50_000,
                2 => 64 * (j % 333),
                _ => 4096 * (j % 41) + 3,
            })
            .collect();
        for threads in [1, 2, 3, SHARD_MIN_THREADS] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut g = Grouping::default();
                let mut direct = DirectMaps::default();
                direct.fit(50_000 * 4);
                let mut hashed = HashMaps::default();
                for len in [0, 1, PARALLEL_MIN_IDS - 1, PARALLEL_MIN_IDS, n] {
                    check(&mut g, &mut direct, &ids[..len]);
                    assert!(direct.group_of.iter().all(|&e| e == NONE), "released");
                    check(&mut g, &mut hashed, &ids[..len]);
                }
                // Tags given at release come back with the rows.
                let (rows, ..) = reference(&ids);
                for k in [0, 5, rows.len() - 1] {
                    assert_eq!(hashed.tag(rows[k]), Some(k));
                }
                assert_eq!(hashed.tag(1 << 40), None);
            });
        }
    }

    /// Grouping by labels that stand one to one for rows, then relabelling,
    /// gives the grouping by the rows (on one pass and in shards).
    #[test]
    fn relabelled_groups_are_the_rows_groups() {
        let n = 2 * PARALLEL_MIN_IDS + 5;
        let rows: Vec<usize> = (0..n).map(|j| (j * 7919) % 30_011).collect();
        // Labels: the rows reversed within 0..30_011, a one-to-one map.
        let labels: Vec<usize> = rows.iter().map(|&r| 30_010 - r).collect();
        for threads in [1, SHARD_MIN_THREADS] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut g = Grouping::default();
                let mut maps = DirectMaps::default();
                maps.fit(30_011);
                // SAFETY: usize labels always name a row; the batch fits.
                unsafe { g.build(&labels, &mut maps) };
                g.release(&mut maps, |_| 0);
                g.relabel(|_, l| 30_010 - l);
                let (want_rows, heads, sizes, group_at, rank_at) = reference(&rows);
                assert_eq!(g.rows(), &want_rows[..]);
                assert_eq!(g.heads(), &heads[..]);
                assert_eq!(g.sizes(), &sizes[..]);
                assert_eq!(g.group_at(), &group_at[..]);
                assert_eq!(g.rank_at(), &rank_at[..]);
            });
        }
    }

    #[test]
    fn a_direct_map_only_grows() {
        let mut maps = DirectMaps::default();
        maps.fit(10_000);
        let len = maps.group_of.len();
        maps.fit(5_000);
        assert_eq!(maps.group_of.len(), len);
        maps.fit(20_000);
        assert!(maps.group_of.len() >= 20_000);
        assert!(maps.group_of.iter().all(|&e| e == NONE));
    }

    #[test]
    fn lanes_spread_runs_and_strides() {
        for stride in [1, 64, 4096] {
            let mut seen = [false; LANES];
            for i in 0..LANES {
                seen[lane(i * stride)] = true;
            }
            assert!(seen.iter().all(|&s| s), "stride {stride}");
        }
    }
}
