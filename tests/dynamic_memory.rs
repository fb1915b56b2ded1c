//! The dynamic table's memory bound, measured: a counting global
//! allocator follows every live heap byte while 10⁷ distinct keys stream
//! through a trained layer under a `Capacity::Bytes`, so the bound is
//! checked against what the process holds, not only against the table's
//! own accounting (`Memory`), which this also checks.
//!
//! It runs without libtest's harness (`harness = false`): the counters are
//! process-wide, so nothing else may allocate while a stream is measured,
//! and the harness does (a test thread started beside it, the "has been
//! running for over 60 seconds" notice of a slow run under load), which
//! once left 2 bytes counted against the layer. Its streams run one after
//! the other from `main`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use embtable::dynamic::{
    Admission, Capacity, DynamicConfig, DynamicEmbedding, DynamicTable, Eviction,
};
use embtable::{Adagrad, AdagradConfig};

/// Live heap bytes and their peak since the last reset.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

fn add(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the same arguments; the
// counters are updated beside the calls and never change what they return.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller promised for `layout`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller promised for `layout`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as the caller promised for `ptr`, `layout` and `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as the old and new blocks both live for a moment (a
            // copy), then the old one freed.
            add(new_size);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const BYTES: usize = 4 << 20;
const DIM: usize = 8;

/// What one stream measured.
#[derive(Debug)]
struct Measured {
    /// The most live bytes the layer held between steps.
    held: usize,
    /// The most live bytes during a step, the batch's buffers included.
    peak: usize,
    /// The most keys held.
    keys: usize,
}

/// Streams `n` distinct keys (each twice, batches of `batch` keys) through
/// an Adagrad layer under a capacity of [`BYTES`], measuring after every
/// step what the layer holds (live bytes above those before it was made,
/// the batch's buffers made beforehand) and checking it against the bound
/// and the layer's own accounting.
fn stream(admission: Admission, eviction: Eviction, n: u64, batch: usize) -> Measured {
    // The batch's buffers and the thread pool, before the baseline.
    let mut keys = vec![0u64; 2 * batch];
    let mut out = vec![0.0f32; keys.len() * DIM];
    let grad = vec![0.01f32; out.len()];
    rayon::broadcast(|_| ());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);

    let config = DynamicConfig {
        admission,
        eviction,
        capacity: Capacity::Bytes(BYTES),
        ..Default::default()
    };
    let table = DynamicTable::new(DIM, config).unwrap();
    let opt = Adagrad::new(AdagradConfig::keras());
    let mut layer = DynamicEmbedding::new(table, opt).unwrap();
    let mut measured = Measured {
        held: 0,
        peak: 0,
        keys: 0,
    };
    for first in (0..n).step_by(batch) {
        for (j, pair) in keys.chunks_exact_mut(2).enumerate() {
            pair.fill((first + j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        layer.forward_into(&keys, &mut out).unwrap();
        layer.backward(&keys, &grad).unwrap();
        layer.step().unwrap();

        let held = LIVE.load(Ordering::Relaxed) - base;
        if std::env::var_os("SHOW").is_some() && held > measured.held {
            println!("held {held} after {first}: {:?}", layer.table().memory());
        }
        let memory = layer.table().memory();
        assert!(memory.bounded() <= BYTES, "{memory:?} after {first} keys");
        // What the accounting leaves out: the layer's gradient and rows
        // of the last batch (dim floats and a few words per position).
        let batch_work = keys.len() * (DIM * 4 + 32);
        let accounted = memory.bounded() + memory.scratch + memory.changes;
        assert!(
            held <= accounted + 2 * batch_work,
            "held {held} bytes, accounted {accounted} ({memory:?}) after {first} keys"
        );
        assert!(
            held <= BYTES + memory.scratch + 2 * batch_work,
            "held {held} bytes above the bound {BYTES} after {first} keys ({memory:?})"
        );
        measured.held = measured.held.max(held);
        measured.keys = measured.keys.max(layer.table().len());
    }
    measured.peak = PEAK.load(Ordering::Relaxed) - base;
    let stats = layer.table().stats();
    assert_eq!(stats.admitted, n);
    assert_eq!(
        stats.evicted + stats.expired,
        n - layer.table().len() as u64
    );
    match eviction {
        // Keys expire before the table fills: the last `steps` batches stay.
        Eviction::Ttl { steps } => assert_eq!(measured.keys as u64, steps * batch as u64),
        _ => assert_eq!(
            measured.keys,
            layer.table().capacity(),
            "the table fills up"
        ),
    }
    drop(layer);
    // Nothing outlives the layer.
    let left = LIVE.load(Ordering::Relaxed) as isize - base as isize;
    assert_eq!(left, 0, "{left} bytes outlive the layer");
    measured
}

fn main() {
    ten_million_distinct_keys_stay_under_the_byte_capacity();
    sightings_lfu_and_ttl_stay_under_the_byte_capacity();
    println!("dynamic_memory: 2 checks passed");
}

fn ten_million_distinct_keys_stay_under_the_byte_capacity() {
    let m = stream(Admission::Always, Eviction::Lru, 10_000_000, 10_000);
    println!("LRU, 10^7 keys: {m:?} (bound {BYTES})");
    // While the storage grows, the old and new blocks are both live: the
    // peak stays within twice the bound plus a batch's working memory.
    assert!(m.peak <= 2 * BYTES + (4 << 20), "{m:?}");
}

fn sightings_lfu_and_ttl_stay_under_the_byte_capacity() {
    // Under the TTL, three batches of keys live at once, below the capacity.
    for (admission, eviction, batch) in [
        (Admission::AfterSightings(2), Eviction::Lfu, 5_000),
        (Admission::Always, Eviction::Ttl { steps: 3 }, 1_000),
    ] {
        let m = stream(admission, eviction, 1_000_000, batch);
        println!("{admission:?} {eviction:?}, 10^6 keys: {m:?} (bound {BYTES})");
        assert!(m.peak <= 2 * BYTES + (4 << 20), "{m:?}");
    }
}
