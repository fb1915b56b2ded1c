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

use super::keymap::{KeyMap, Uses};
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

/// What a table keeps per row beside the key map: the row's key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RowMeta {
    /// The key the row belongs to; 0 for a free row.
    pub(crate) key: u64,
}

/// One use of a row by its key: the call, and the step it came in. The
/// step is kept here rather than with the key's uses in the key map: only
/// a row's current entry is ever asked for it (is it pinned, has it
/// expired, what does a checkpoint save), and leaving it out keeps a key's
/// slot, which a translation writes once per key, to 32 bytes. The key
/// says where the map keeps the uses that tell whether the entry is
/// current.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Use {
    pub(crate) call: u64,
    pub(crate) step: u64,
    pub(crate) key: u64,
    pub(crate) row: u32,
}

impl Use {
    /// Whether this is the last use of the row by its key.
    #[inline(always)]
    fn current(&self, map: &KeyMap) -> bool {
        map.uses_of(self.key)
            .is_some_and(|(row, uses)| row == self.row && uses.call == self.call)
    }
}

/// Entries this far ahead have their key's slot prefetched while
/// compacting or walking to the oldest live entry: the slots are
/// scattered, and without it the pass waits on memory for every entry.
const COMPACT_AHEAD: usize = 64;

/// An LFU entry: `(count, call, key, row, step)`, the first to go the
/// least (the step only rides along: the first four fields are unique).
type Ranked = (u64, u64, u64, u32, u64);

/// Rows in the order a policy gives them up.
#[derive(Clone, Debug)]
pub(crate) enum Order {
    /// Least recently used first (LRU and TTL): one entry per use.
    Recency(VecDeque<Use>),
    /// Least frequently used first (LFU): `(count, call, key, row, step)`
    /// per use, with the entries met pinned during the current call set
    /// aside.
    Frequency(BinaryHeap<Reverse<Ranked>>, Vec<Ranked>),
}

impl Order {
    pub(crate) fn new(eviction: Eviction) -> Self {
        match eviction {
            Eviction::Lru | Eviction::Ttl { .. } => Order::Recency(VecDeque::new()),
            Eviction::Lfu => Order::Frequency(BinaryHeap::new(), Vec::new()),
        }
    }

    /// Records `u`; `count` gives the key's count of uses (what LFU orders
    /// by, asked only then: a read far away in memory); `map` holds every
    /// key's uses, for dropping stale entries, `live` is the number of rows
    /// with a key and `rows` the number of rows.
    #[inline]
    pub(crate) fn used(
        &mut self,
        u: Use,
        count: impl FnOnce() -> u64,
        map: &KeyMap,
        live: usize,
        rows: usize,
    ) {
        let entries = match self {
            Order::Recency(queue) => {
                queue.push_back(u);
                queue.len()
            }
            Order::Frequency(heap, _) => {
                heap.push(Reverse((count(), u.call, u.key, u.row, u.step)));
                heap.len()
            }
        };
        if entries > 2 * live + 64 {
            self.compact(map, rows);
        }
    }

    /// The next row to give up to a new key during step `now`, with its
    /// key, removed from the order; `None` if every occupied row was used
    /// during `now`. Under TTL rows are never given up on demand.
    pub(crate) fn victim(
        &mut self,
        eviction: Eviction,
        map: &KeyMap,
        now: u64,
    ) -> Option<(u32, u64)> {
        match (self, eviction) {
            (_, Eviction::Ttl { .. }) => None,
            (Order::Recency(queue), _) => {
                // Calls, hence steps, only grow along the queue: once the
                // oldest live row is pinned, all are.
                let u = oldest(queue, map)?;
                (u.step < now).then(|| {
                    queue.pop_front();
                    (u.row, u.key)
                })
            }
            (Order::Frequency(heap, aside), _) => {
                while let Some(Reverse(entry @ (count, call, key, row, step))) = heap.pop() {
                    if map.uses_of(key) != Some((row, Uses { count, call })) {
                        continue; // stale
                    }
                    if step >= now {
                        aside.push(entry); // pinned: back once the call is done
                        continue;
                    }
                    return Some((row, key));
                }
                None
            }
        }
    }

    /// The next row whose last use was before step `before`, with its
    /// key, removed from the order (TTL's expiry).
    pub(crate) fn expired(&mut self, map: &KeyMap, before: u64) -> Option<(u32, u64)> {
        let Order::Recency(queue) = self else {
            return None;
        };
        let u = oldest(queue, map)?;
        (u.step < before).then(|| {
            queue.pop_front();
            (u.row, u.key)
        })
    }

    /// Ends a call: the pinned entries set aside go back.
    pub(crate) fn settle(&mut self) {
        if let Order::Frequency(heap, aside) = self {
            heap.extend(aside.drain(..).map(Reverse));
        }
    }

    /// Drops the stale entries: a recency queue's by [`compact_recency`];
    /// a heap's in one pass over its entries, each one's uses prefetched
    /// ahead.
    fn compact(&mut self, map: &KeyMap, rows: usize) {
        match self {
            Order::Recency(queue) => compact_recency(queue, rows),
            Order::Frequency(heap, _) => {
                let mut entries = std::mem::take(heap).into_vec();
                let mut kept = 0;
                for i in 0..entries.len() {
                    if let Some(Reverse(ahead)) = entries.get(i + COMPACT_AHEAD) {
                        map.prefetch(ahead.2);
                    }
                    let Reverse((count, call, key, row, _)) = entries[i];
                    if map.uses_of(key) == Some((row, Uses { count, call })) {
                        entries[kept] = entries[i];
                        kept += 1;
                    }
                }
                entries.truncate(kept);
                *heap = BinaryHeap::from(entries);
            }
        }
    }

    /// Each occupied row's last use, first to be given up first (what a
    /// checkpoint keeps of the order; LFU's order follows from the rows'
    /// uses, so its rows come in row order).
    pub(crate) fn live(&self, map: &KeyMap) -> Vec<Use> {
        match self {
            Order::Recency(queue) => queue.iter().filter(|u| u.current(map)).copied().collect(),
            Order::Frequency(heap, aside) => {
                let mut live: Vec<Use> = heap
                    .iter()
                    .map(|Reverse(entry)| entry)
                    .chain(aside)
                    .filter(|&&(count, call, key, row, _)| {
                        map.uses_of(key) == Some((row, Uses { count, call }))
                    })
                    .map(|&(_, call, key, row, step)| Use {
                        call,
                        step,
                        key,
                        row,
                    })
                    .collect();
                live.sort_unstable_by_key(|u| u.row);
                live
            }
        }
    }

    /// The order of `eviction` holding the rows of `live` (from
    /// [`live`](Self::live)), whose keys' uses `map` holds.
    pub(crate) fn from_live(eviction: Eviction, live: &[Use], map: &KeyMap) -> Self {
        let mut order = Self::new(eviction);
        match &mut order {
            Order::Recency(queue) => queue.extend(live),
            Order::Frequency(heap, _) => heap.extend(live.iter().map(|u| {
                let count = map.uses_of(u.key).map_or(0, |(_, uses)| uses.count);
                Reverse((count, u.call, u.key, u.row, u.step))
            })),
        }
        order
    }

    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Order::Recency(queue) => queue.capacity() * size_of::<Use>(),
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
            Eviction::Lru | Eviction::Ttl { .. } => entries.saturating_mul(2 * size_of::<Use>()),
            Eviction::Lfu => entries
                .saturating_add(rows)
                .saturating_mul(2 * size_of::<Ranked>()),
        }
    }
}

/// Drops the stale entries of an LRU or TTL queue over `rows` rows without
/// reading any row's uses: a row's current entry is its last in the queue.
/// (Each use of a row appends an entry, and only the current entry of a row
/// ever leaves from the front, when the row is given up: by then the row's
/// earlier entries have left, so a row without a key has none.) One pass
/// from the back keeps the first entry met of each row, with a bit per row
/// saying whether it was met: 128 KiB for a million rows, which stay in the
/// caches, where reading each entry's uses waited on memory.
fn compact_recency(queue: &mut VecDeque<Use>, rows: usize) {
    let mut met = vec![0u64; rows.div_ceil(64)];
    let items = queue.make_contiguous();
    let mut kept = items.len();
    for i in (0..items.len()).rev() {
        let row = items[i].row as usize;
        let (word, bit) = (&mut met[row / 64], 1u64 << (row % 64));
        if *word & bit == 0 {
            *word |= bit;
            kept -= 1;
            items[kept] = items[i];
        }
    }
    queue.drain(..kept);
}

/// The front entry of `queue` that is still current, dropping stale ones.
/// Most entries met at the front are stale (their row was used again
/// since): each one's uses are prefetched ahead, as in a compaction, so
/// that the walk does not wait on each.
fn oldest(queue: &mut VecDeque<Use>, map: &KeyMap) -> Option<Use> {
    while let Some(&u) = queue.front() {
        if let Some(ahead) = queue.get(COMPACT_AHEAD) {
            // Two lines: an entry met here is most often a victim, whose
            // removal shifts back the rest of its key's run.
            map.prefetch_run(ahead.key);
        }
        if u.current(map) {
            return Some(u);
        }
        queue.pop_front();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::mix;

    /// What the map says a queue keeps: entries whose row has a key and
    /// was last used in the entry's call.
    fn current(queue: &VecDeque<Use>, map: &KeyMap) -> Vec<Use> {
        queue.iter().filter(|u| u.current(map)).copied().collect()
    }

    #[test]
    fn a_rows_last_entry_is_its_current_one() {
        let rows = 48;
        let mut map = KeyMap::default();
        map.reserve(rows).unwrap();
        let mut keys = vec![0u64; rows];
        let mut order = Order::new(Eviction::Lru);
        let mut free: Vec<u32> = (1..rows as u32).collect();
        let mut draw = 0u64;
        let mut next = |n: usize| {
            draw += 1;
            (mix(draw) % n as u64) as usize
        };
        let (mut step, mut compared, mut admitted) = (0, 0, 0u64);
        for call in 1..4_000u64 {
            step += (next(3) == 0) as u64;
            for _ in 0..next(8) {
                let live = rows - 1 - free.len();
                match next(10) {
                    // Uses of rows with a key, most of the time.
                    0..6 => {
                        let r = 1 + next(rows - 1) as u32;
                        let key = keys[r as usize];
                        if let Some(i) = map.find(key)
                            && map.row_at(i) == r
                            && map.record_use(i, call).is_some()
                        {
                            let u = Use {
                                call,
                                step,
                                key,
                                row: r,
                            };
                            order.used(u, || map.uses_at(i).count, &map, live, rows);
                        }
                    }
                    // An admission into a free row.
                    6..8 => {
                        if let Some(r) = free.pop() {
                            admitted += 1;
                            let key = mix(admitted);
                            keys[r as usize] = key;
                            map.insert(key, r, Uses { count: 1, call });
                            let u = Use {
                                call,
                                step,
                                key,
                                row: r,
                            };
                            order.used(u, || 1, &map, live + 1, rows);
                        }
                    }
                    // An eviction, or an expiry, freeing the row.
                    8 => {
                        if let Some((r, key)) = order.victim(Eviction::Lru, &map, step) {
                            assert_eq!(map.remove(key), Some(r));
                            free.push(r);
                        }
                    }
                    _ => {
                        if let Some((r, key)) = order.expired(&map, step.saturating_sub(2)) {
                            assert_eq!(map.remove(key), Some(r));
                            free.push(r);
                        }
                    }
                }
            }
            let Order::Recency(queue) = &order else {
                unreachable!("an LRU order")
            };
            let want = current(queue, &map);
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
