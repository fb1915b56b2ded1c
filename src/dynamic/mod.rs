//! Dynamic tables: rows for keys that keep arriving (64-bit hashes of user
//! ids, item ids, queries and their crosses), with admission of new keys,
//! eviction of stale ones and a memory bound.
//!
//! A [`DynamicTable`] maps each key to a row of one aligned
//! [`EmbeddingTable`](crate::EmbeddingTable), its [`weights`](DynamicTable::weights).
//! A batch of keys is translated to rows once ([`DynamicTable::translate`]),
//! and from there the fixed table's kernels and every optimizer run on the
//! rows unchanged: lookups, pooled lookups, [`SparseGrad`](crate::SparseGrad),
//! `step` and the fused `step_lookup`, in both semantics, with each row's
//! optimizer state at the same index. [`DynamicEmbedding`] is the layer
//! (table, optimizer, gradient) with the fixed [`Embedding`](crate::Embedding)'s
//! calls; the [`EmbeddingLayer`](crate::EmbeddingLayer) trait lets code
//! take either.
//!
//! # Example
//!
//! Hashed user ids, no vocabulary: rows appear as ids do, and the table
//! never holds more than 100,000 of them.
//!
//! ```
//! use embtable::dynamic::{Admission, Capacity, DynamicConfig, DynamicEmbedding, DynamicTable, Eviction};
//! use embtable::{Adagrad, EmbeddingLayer};
//!
//! let config = DynamicConfig {
//!     admission: Admission::AfterSightings(2), // a row once an id was seen twice
//!     eviction: Eviction::Lru,
//!     capacity: Capacity::Rows(100_000),
//!     seed: 42,
//!     ..Default::default()
//! };
//! let mut users = DynamicEmbedding::new(DynamicTable::new(16, config)?, Adagrad::default())?;
//! let batch: [u64; 4] = [0x9e37_79b9_7f4a_7c15, 17, 17, 0xdead_beef];
//! let out = users.forward(&batch)?;           // 17 was seen twice: it has a row
//! assert_eq!(out.len(), 4 * 16);
//! assert_eq!(&out[..16], &[0.0; 16]);         // the others read zeros, for now
//! users.backward(&batch, &vec![0.1; out.len()])?;
//! users.step()?;                              // only 17's row trains
//! assert_eq!(users.table().len(), 1);
//! # Ok::<(), embtable::Error>(())
//! ```
//!
//! # Keys
//!
//! Keys are `u64`; ids of the other [`Index`](crate::Index) types are
//! taken by their bits as 64-bit two's complement integers (`-1i64` is
//! `u64::MAX`), so negative hashes are keys like any other.
//!
//! # Rows
//!
//! Row 0 of the storage is the *default row*: what a key without a row
//! reads (zeros, or [`DynamicTable::set_default_row`]); it receives no
//! gradient. A key's row is created when the key is admitted and filled by
//! the table's [`Init`] from its seed and the key, so a key
//! starts with the same values whatever the order of arrival, the batch
//! it arrives in or the thread count (key `k` starts as row `k` of
//! `EmbeddingTable::new(rows, dim, init, seed)`). Its optimizer state
//! starts afresh ([`SparseOptimizer::reset_rows`](crate::SparseOptimizer::reset_rows));
//! under `DenseExact`, a row starts when its key is admitted and has
//! missed no step. The storage grows by doubling up to the capacity (the
//! optimizer state with it); a row freed by an evicted key is reused.
//! Growing and evicting never move a key to another row nor change
//! another key's row or state.
//!
//! # Policies
//!
//! [`Admission`]: always, after `n` sightings, with a probability per
//! sighting, or never (read-only). [`Eviction`], when the table is full:
//! least recently used, least frequently used, or older than a TTL in
//! steps. A key used in the current step is never evicted (its gradient is
//! on its way), so a batch with more new keys than the table can make
//! room for leaves the rest unknown ([`Stats::refused`]). Every decision
//! depends only on the sequence of calls, never on timing or threads.
//!
//! # Memory
//!
//! A [`Capacity`] in rows or in bytes bounds what the table holds:
//! [`Memory::bounded`] (storage, optimizer state when a layer counts it,
//! key map, bookkeeping, sighting counts) never exceeds a byte capacity,
//! whatever the stream of keys. Memory is counted from the allocations'
//! sizes, not measured.
//!
//! # Changes and checkpoints
//!
//! With [`DynamicConfig::track_changes`], evicted keys and their last
//! values, and the rows changed since the last export, are reported by
//! [`DynamicTable::export_changes`] for a serving store.
//! [`DynamicEmbedding::save`] writes keys, rows, optimizer state, counters
//! and recency to one file atomically; [`DynamicEmbedding::load`] restores
//! them bit for bit, so training resumes as if never stopped.

mod admission;
mod changes;
mod checkpoint;
mod eviction;
mod fill;
mod keymap;
mod layer;
mod table;

pub use admission::Admission;
pub use changes::Changes;
pub use eviction::Eviction;
pub use layer::DynamicEmbedding;
pub use table::{DynamicTable, MAX_KEYS};

use crate::Init;
use crate::aligned::{HUGE_PAGE_BYTES, advise_huge_pages};

/// Asks for huge pages under the whole 2 MiB pages of `v`'s allocation,
/// before they are first written. The key map and the row bookkeeping
/// are read at random, one cache line per key, like the storage (which
/// asks the same): with 4 KiB pages each of those reads would also miss
/// the TLB once they span more than it maps.
pub(crate) fn advise_huge<T>(v: &mut Vec<T>) {
    let start = v.as_mut_ptr() as usize;
    let end = start + v.capacity() * size_of::<T>();
    let first = start.next_multiple_of(HUGE_PAGE_BYTES);
    let last = end / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    if last > first {
        advise_huge_pages(first as *mut u8, last - first);
    }
}

/// How much a [`DynamicTable`] may hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Capacity {
    /// As many keys as arrive (up to [`MAX_KEYS`]); nothing is evicted
    /// except by a TTL.
    #[default]
    Unbounded,
    /// At most this many keys.
    Rows(usize),
    /// At most this many bytes of [`Memory::bounded`]: the most keys that
    /// fit with every structure at its largest (the storage, the key map
    /// at its largest load, the eviction order and the sighting counts at
    /// their bounds; with a layer, the optimizer state too).
    Bytes(usize),
}

/// The settings of a [`DynamicTable`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DynamicConfig {
    /// How a key's row starts (Keras' `Uniform(-0.05, 0.05)` by default).
    pub init: Init,
    /// The seed of the rows' initial values.
    pub seed: u64,
    /// Which new keys get a row.
    pub admission: Admission,
    /// Which key gives up its row when the table is full.
    pub eviction: Eviction,
    /// The bound on keys, or bytes.
    pub capacity: Capacity,
    /// Whether to log evicted keys with their values and the rows changed,
    /// for [`DynamicTable::export_changes`]. The log grows until exported,
    /// outside the capacity's bound.
    pub track_changes: bool,
}

/// What a [`DynamicTable`] has done since it was created (kept in
/// checkpoints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Ids translated by training calls.
    pub lookups: u64,
    /// Keys given a row.
    pub admitted: u64,
    /// Keys that lost their row to a new key.
    pub evicted: u64,
    /// Keys that lost their row to the TTL.
    pub expired: u64,
    /// Admissions refused because the table was full of keys used in the
    /// current step (or, under a TTL, full).
    pub refused: u64,
    /// Times the storage grew.
    pub grown: u64,
}

/// The bytes a [`DynamicTable`] holds, by part, counted from the sizes of
/// its allocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// The storage: every row, padded (the default row and free rows too).
    pub weights: usize,
    /// Optimizer state, as counted with
    /// [`DynamicTable::count_state_bytes`] (0 for a bare table).
    pub optimizer: usize,
    /// The key → row map.
    pub keys: usize,
    /// Per-row bookkeeping, free list, eviction order, sighting counts.
    pub bookkeeping: usize,
    /// The change log ([`DynamicConfig::track_changes`]).
    pub changes: usize,
    /// Working memory sized by the last batch.
    pub scratch: usize,
}

impl Memory {
    /// What a [`Capacity::Bytes`] bounds: everything but the change log
    /// and the batch's working memory.
    pub fn bounded(&self) -> usize {
        self.weights + self.optimizer + self.keys + self.bookkeeping
    }
}
