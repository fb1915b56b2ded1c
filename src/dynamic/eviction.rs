//! Which key loses its row: the eviction policies, and the order in which
//! they give up rows.
//!
//! Every row knows its key, when it was last used and how often
//! ([`RowMeta`]). A *use* is one translating call that names the key (a
//! forward pass, a lookup that may admit): calls are numbered, and within
//! one call the keys that already had a row count as used first, in the
//! order of their first position in the batch, then the keys the call
//! admitted, in the same order. A key used in the current step is never
//! evicted: its gradient may still be on its way.
//!
//! The orders are kept lazily: each use appends an entry, and entries whose
//! row was used again since are skipped when met (and dropped in bulk once
//! they outnumber the live ones), so a use costs O(1) (LRU, TTL) or
//! O(log n) (LFU) and no entry is ever searched for.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::{Error, Result};

/// Which key gives up its row when the table is full.
///
/// A *use* of a key is a translating call that names it (a forward pass, a
/// [`translate`](super::DynamicTable::translate)): calls are numbered, and
/// within one call the keys that already had a row count as used first,
/// in the order of their first position in the batch, then the keys the
/// call admitted, in the same order. A key used in the current step is
/// never evicted: its gradient may still be on its way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Eviction {
    /// The least recently used key (TensorFlow Recommenders-Addons'
    /// timestamp restriction, with uses counted in calls rather than
    /// seconds). Ties (keys last used in the same call) go in the order of
    /// use above.
    #[default]
    Lru,
    /// The least frequently used key: the fewest positions naming it since
    /// it got its row (TensorFlow Recommenders-Addons' frequency
    /// restriction); ties go to the one whose last use came in the earliest
    /// call, then to the smallest key.
    Lfu,
    /// Keys not used in the last `steps` steps lose their row when the
    /// step that makes them that old ends (Monolith's expire time, counted
    /// in steps); a full table admits no new key until one expires.
    Ttl {
        /// Steps a key keeps its row without being used, at least 1.
        steps: u64,
    },
}

impl Eviction {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `eviction`) for a TTL of 0 steps.
    pub fn validate(&self) -> Result<()> {
        match self {
            Eviction::Ttl { steps: 0 } => Err(Error::InvalidConfig {
                field: "eviction",
                reason: "Ttl { steps: 0 }: a key must live at least one step".into(),
            }),
            _ => Ok(()),
        }
    }
}

/// What a table knows about one of its rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RowMeta {
    /// The key the row belongs to.
    pub(crate) key: u64,
    /// Positions that named the key since it got the row; 0 for a free row.
    pub(crate) count: u64,
    /// The call that last used it.
    pub(crate) call: u64,
    /// The step during which it was last used.
    pub(crate) step: u64,
}

impl RowMeta {
    /// Whether a key holds the row.
    pub(crate) fn occupied(&self) -> bool {
        self.count > 0
    }
}

/// Entries this far ahead have their row's meta prefetched while compacting
/// or walking to the oldest live entry.
const COMPACT_AHEAD: usize = 64;

/// An LFU entry: `(count, call, key, row)`, the first to go the least.
type Ranked = (u64, u64, u64, u32);

/// Rows in the order a policy gives them up.
#[derive(Clone, Debug)]
pub(crate) enum Order {
    /// Least recently used first (LRU and TTL): `(call, row)` per use.
    Recency(VecDeque<(u64, u32)>),
    /// Least frequently used first (LFU): `(count, call, key, row)` per
    /// use, with the entries met pinned during the current call set aside.
    Frequency(BinaryHeap<Reverse<Ranked>>, Vec<Ranked>),
}

impl Order {
    pub(crate) fn new(eviction: Eviction) -> Self {
        match eviction {
            Eviction::Lru | Eviction::Ttl { .. } => Order::Recency(VecDeque::new()),
            Eviction::Lfu => Order::Frequency(BinaryHeap::new(), Vec::new()),
        }
    }

    /// Whether the order is by frequency, which needs a row's count once
    /// the whole call is counted.
    pub(crate) fn by_frequency(&self) -> bool {
        matches!(self, Order::Frequency(..))
    }

    /// Records a use of `row`, whose meta (updated) is `m`; `meta` is every
    /// row's, for dropping stale entries, and `live` the rows with a key.
    #[inline]
    pub(crate) fn used(&mut self, row: u32, m: RowMeta, meta: &[RowMeta], live: usize) {
        let entries = match self {
            Order::Recency(queue) => {
                queue.push_back((m.call, row));
                queue.len()
            }
            Order::Frequency(heap, _) => {
                heap.push(Reverse((m.count, m.call, m.key, row)));
                heap.len()
            }
        };
        if entries > 2 * live + 64 {
            self.compact(meta);
        }
    }

    /// The next row to give up to a new key during step `now`, removed from
    /// the order; `None` if every occupied row was used during `now`. Under
    /// TTL rows are never given up on demand.
    pub(crate) fn victim(&mut self, eviction: Eviction, meta: &[RowMeta], now: u64) -> Option<u32> {
        match (self, eviction) {
            (_, Eviction::Ttl { .. }) => None,
            (Order::Recency(queue), _) => {
                // Calls, hence steps, only grow along the queue: once the
                // oldest live row is pinned, all are.
                let row = oldest(queue, meta)?;
                (meta[row as usize].step < now).then(|| {
                    queue.pop_front();
                    row
                })
            }
            (Order::Frequency(heap, aside), _) => {
                while let Some(Reverse(entry @ (count, call, _, row))) = heap.pop() {
                    let m = meta[row as usize];
                    if !(m.occupied() && m.count == count && m.call == call) {
                        continue; // stale
                    }
                    if m.step >= now {
                        aside.push(entry); // pinned: back once the call is done
                        continue;
                    }
                    return Some(row);
                }
                None
            }
        }
    }

    /// The next row whose last use was before step `before`, removed from
    /// the order (TTL's expiry).
    pub(crate) fn expired(&mut self, meta: &[RowMeta], before: u64) -> Option<u32> {
        let Order::Recency(queue) = self else {
            return None;
        };
        let row = oldest(queue, meta)?;
        (meta[row as usize].step < before).then(|| {
            queue.pop_front();
            row
        })
    }

    /// Puts `rows`, which [`expired`](Self::expired) gave in this order,
    /// back at the front of the order, as they were.
    pub(crate) fn restore_expired(&mut self, rows: &[usize], meta: &[RowMeta]) {
        if let Order::Recency(queue) = self {
            for &r in rows.iter().rev() {
                queue.push_front((meta[r].call, r as u32));
            }
        }
    }

    /// Ends a call: the pinned entries set aside go back.
    pub(crate) fn settle(&mut self) {
        if let Order::Frequency(heap, aside) = self {
            heap.extend(aside.drain(..).map(Reverse));
        }
    }

    /// Drops the stale entries: a recency queue's by [`compact_recency`];
    /// a heap's in one pass over its entries, with each one's row
    /// prefetched a few entries ahead (the rows are scattered: without it
    /// the pass waits on memory for every entry).
    fn compact(&mut self, meta: &[RowMeta]) {
        fn keep<T: Copy>(
            items: &mut [T],
            meta: &[RowMeta],
            row: impl Fn(T) -> u32,
            current: impl Fn(T, RowMeta) -> bool,
        ) -> usize {
            let mut kept = 0;
            for i in 0..items.len() {
                if let Some(&ahead) = items.get(i + COMPACT_AHEAD) {
                    crate::kernels::prefetch(
                        meta.as_ptr().wrapping_add(row(ahead) as usize).cast(),
                    );
                }
                let item = items[i];
                if current(item, meta[row(item) as usize]) {
                    items[kept] = item;
                    kept += 1;
                }
            }
            kept
        }
        match self {
            Order::Recency(queue) => compact_recency(queue, meta.len()),
            Order::Frequency(heap, _) => {
                let mut entries = std::mem::take(heap).into_vec();
                let kept = keep(
                    &mut entries,
                    meta,
                    |Reverse((.., row))| row,
                    |Reverse((count, call, _, _)), m| {
                        m.occupied() && m.call == call && m.count == count
                    },
                );
                entries.truncate(kept);
                *heap = BinaryHeap::from(entries);
            }
        }
    }

    /// The occupied rows, first to be given up first (what a checkpoint
    /// keeps of the order; LFU's order follows from the rows' meta, so the
    /// rows come in row order).
    pub(crate) fn live_rows(&self, meta: &[RowMeta]) -> Vec<u32> {
        match self {
            Order::Recency(queue) => queue
                .iter()
                .filter(|&&(call, row)| {
                    let m = meta[row as usize];
                    m.occupied() && m.call == call
                })
                .map(|&(_, row)| row)
                .collect(),
            Order::Frequency(..) => (0..meta.len() as u32)
                .filter(|&r| meta[r as usize].occupied())
                .collect(),
        }
    }

    /// The order of `eviction` holding `rows` (from
    /// [`live_rows`](Self::live_rows)).
    pub(crate) fn from_rows(eviction: Eviction, rows: &[u32], meta: &[RowMeta]) -> Self {
        let mut order = Self::new(eviction);
        match &mut order {
            Order::Recency(queue) => {
                queue.extend(rows.iter().map(|&r| (meta[r as usize].call, r)));
            }
            Order::Frequency(heap, _) => heap.extend(rows.iter().map(|&r| {
                let m = meta[r as usize];
                Reverse((m.count, m.call, m.key, r))
            })),
        }
        order
    }

    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Order::Recency(queue) => queue.capacity() * size_of::<(u64, u32)>(),
            Order::Frequency(heap, aside) => {
                (heap.capacity() + aside.capacity()) * size_of::<Ranked>()
            }
        }
    }

    /// The most bytes the order of `eviction` takes for `rows` live rows:
    /// at most `2 * rows + 65` entries (plus as many set aside), each
    /// allocation at most twice its length.
    pub(crate) fn max_bytes(eviction: Eviction, rows: usize) -> usize {
        let entries = rows.saturating_mul(2).saturating_add(65);
        match eviction {
            Eviction::Lru | Eviction::Ttl { .. } => {
                entries.saturating_mul(2 * size_of::<(u64, u32)>())
            }
            Eviction::Lfu => entries
                .saturating_add(rows)
                .saturating_mul(2 * size_of::<Ranked>()),
        }
    }
}

/// Drops the stale entries of an LRU or TTL queue over `rows` rows without
/// reading any row's meta: a row's current entry is its last in the queue.
/// (Each use of a row appends an entry, and only the current entry of a row
/// ever leaves from the front, when the row is given up: by then the row's
/// earlier entries have left, so a row without a key has none.) One pass
/// from the back keeps the first entry met of each row, with a bit per row
/// saying whether it was met: 128 KiB for a million rows, which stay in the
/// caches, where reading each entry's meta waited on memory.
fn compact_recency(queue: &mut VecDeque<(u64, u32)>, rows: usize) {
    let mut met = vec![0u64; rows.div_ceil(64)];
    let items = queue.make_contiguous();
    let mut kept = items.len();
    for i in (0..items.len()).rev() {
        let row = items[i].1 as usize;
        let (word, bit) = (&mut met[row / 64], 1u64 << (row % 64));
        if *word & bit == 0 {
            *word |= bit;
            kept -= 1;
            items[kept] = items[i];
        }
    }
    queue.drain(..kept);
}

/// The front row of `queue` that is still current, dropping stale entries.
/// Most entries met at the front are stale (their row was used again
/// since): each one's row is prefetched [`COMPACT_AHEAD`] entries ahead,
/// as in a compaction, so that the walk does not wait on each.
fn oldest(queue: &mut VecDeque<(u64, u32)>, meta: &[RowMeta]) -> Option<u32> {
    while let Some(&(call, row)) = queue.front() {
        if let Some(&(_, ahead)) = queue.get(COMPACT_AHEAD) {
            crate::kernels::prefetch(meta.as_ptr().wrapping_add(ahead as usize).cast());
        }
        let m = meta[row as usize];
        if m.occupied() && m.call == call {
            return Some(row);
        }
        queue.pop_front();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::mix;

    /// What the meta says a queue keeps: entries whose row has a key and
    /// was last used in the entry's call.
    fn current(queue: &VecDeque<(u64, u32)>, meta: &[RowMeta]) -> Vec<(u64, u32)> {
        let current = |&&(call, row): &&(u64, u32)| {
            let m = meta[row as usize];
            m.occupied() && m.call == call
        };
        queue.iter().filter(current).copied().collect()
    }

    #[test]
    fn a_rows_last_entry_is_its_current_one() {
        let rows = 48;
        let mut meta = vec![RowMeta::default(); rows];
        let mut order = Order::new(Eviction::Lru);
        let mut free: Vec<u32> = (1..rows as u32).collect();
        let mut draw = 0u64;
        let mut next = |n: usize| {
            draw += 1;
            (mix(draw) % n as u64) as usize
        };
        let (mut step, mut compared) = (0, 0);
        for call in 1..4_000u64 {
            step += (next(3) == 0) as u64;
            for _ in 0..next(8) {
                let live = rows - 1 - free.len();
                match next(10) {
                    // Uses of rows with a key, most of the time.
                    0..6 => {
                        let r = 1 + next(rows - 1);
                        let m = &mut meta[r];
                        if m.occupied() && m.call != call {
                            (m.call, m.step, m.count) = (call, step, m.count + 1);
                            order.used(r as u32, *m, &meta, live);
                        }
                    }
                    // An admission into a free row.
                    6..8 => {
                        if let Some(r) = free.pop() {
                            let m = RowMeta {
                                key: mix(call),
                                count: 1,
                                call,
                                step,
                            };
                            meta[r as usize] = m;
                            order.used(r, m, &meta, live + 1);
                        }
                    }
                    // An eviction, or an expiry, freeing the row.
                    8 => {
                        if let Some(r) = order.victim(Eviction::Lru, &meta, step) {
                            meta[r as usize] = RowMeta::default();
                            free.push(r);
                        }
                    }
                    _ => {
                        if let Some(r) = order.expired(&meta, step.saturating_sub(2)) {
                            meta[r as usize] = RowMeta::default();
                            free.push(r);
                        }
                    }
                }
            }
            let Order::Recency(queue) = &order else {
                unreachable!("an LRU order")
            };
            let want = current(queue, &meta);
            // Every row with a key has its current entry (the compactions
            // inside `used` dropped none).
            assert_eq!(want.len(), rows - 1 - free.len(), "call {call}");
            let mut got = queue.clone();
            compact_recency(&mut got, rows);
            assert_eq!(got.into_iter().collect::<Vec<_>>(), want, "call {call}");
            compared += (want.len() < queue.len()) as usize;
        }
        assert!(
            compared > 1_000,
            "stale entries met in only {compared} calls"
        );
    }
}
