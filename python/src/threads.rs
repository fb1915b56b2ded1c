//! Where long calls run: without the GIL, on embtable's threads.
//!
//! By default the library's parallel loops use rayon's global pool (one
//! thread per core). `set_num_threads(n)` installs a pool of `n` threads
//! around every later call instead. Results never depend on the thread
//! count: the library sums in a fixed order whatever the split.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use pyo3::prelude::*;

use crate::errors::value_error;

/// The pool chosen by `set_num_threads`, or `None` for rayon's global pool.
static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

/// Nanoseconds spent in [`run`] bodies, for the benchmark's account of
/// where a step's time goes (Python or Rust).
static NATIVE_NANOS: AtomicU64 = AtomicU64::new(0);

fn current_pool() -> Option<Arc<rayon::ThreadPool>> {
    // A poisoned lock still holds a valid pool (nothing panics while it is held).
    POOL.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Runs `f` with the GIL released, on embtable's pool.
pub fn run<T, F>(py: Python<'_>, f: F) -> T
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let pool = current_pool();
    py.detach(move || {
        let start = Instant::now();
        let result = match pool {
            Some(pool) => pool.install(f),
            None => f(),
        };
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        NATIVE_NANOS.fetch_add(nanos, Ordering::Relaxed);
        result
    })
}

/// Sets the number of threads embtable's calls run on (`n >= 1`).
///
/// Results are bitwise the same for every `n`.
#[pyfunction]
pub fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(value_error("set_num_threads: n must be at least 1, got 0"));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("embtable-{i}"))
        .build()
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(pool));
    Ok(())
}

/// The number of threads embtable's calls run on.
#[pyfunction]
pub fn get_num_threads() -> usize {
    match current_pool() {
        Some(pool) => pool.current_num_threads(),
        None => rayon::current_num_threads(),
    }
}

/// Seconds spent inside embtable's native calls since the process
/// started (a benchmark's measure of the Python boundary's cost).
#[pyfunction]
pub fn native_seconds() -> f64 {
    NATIVE_NANOS.load(Ordering::Relaxed) as f64 * 1e-9
}
