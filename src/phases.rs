//! Wall and CPU time of each phase of a fused
//! [`step_lookup`](crate::SparseOptimizer::step_lookup), for profiling
//! (feature `phase-times`; without it the timers compile to nothing).
//!
//! Each phase the calling thread goes through is logged with its wall time
//! and the CPU time of the whole process meanwhile (user + system, every
//! thread, as `getrusage` counts it): a CPU time near the wall time means
//! one busy thread, near twice it two. Rayon's workers spinning while they
//! wait for work count as busy. [`take`] hands the log over and empties it.
//!
//! ```text
//! step: check            config, lengths, ids
//!       group            the ids grouped by row (sub-phases: grouping pass, map reset);
//!                        on several threads, "scan beside group" checks the
//!                        gradient finite on the others meanwhile
//!       check and copy   on one thread: the gradient checked finite while the
//!                        later positions' rows are copied to the scratch
//!       copy             the copy alone (checked beside the grouping, or not at all)
//!       update           the catch-up plan and the update pass
//! ```

#[cfg(feature = "phase-times")]
use std::sync::Mutex;
#[cfg(feature = "phase-times")]
use std::time::Instant;

/// One phase of one step.
#[derive(Clone, Copy, Debug)]
pub struct Phase {
    /// Its name (see the module docs).
    pub name: &'static str,
    /// Wall time, ms.
    pub wall_ms: f64,
    /// CPU time of the process meanwhile, ms (NaN where unknown).
    pub cpu_ms: f64,
}

#[cfg(feature = "phase-times")]
static LOG: Mutex<Vec<Phase>> = Mutex::new(Vec::new());

/// The phases logged since the last call, oldest first (always empty
/// without the feature `phase-times`).
pub fn take() -> Vec<Phase> {
    #[cfg(feature = "phase-times")]
    {
        std::mem::take(&mut *LOG.lock().unwrap_or_else(|e| e.into_inner()))
    }
    #[cfg(not(feature = "phase-times"))]
    Vec::new()
}

/// Runs `f`, logging it as phase `name` under the feature `phase-times`.
#[inline(always)]
pub(crate) fn time<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "phase-times")]
    {
        let (start, start_cpu) = (Instant::now(), cpu_ms());
        let r = f();
        let phase = Phase {
            name,
            wall_ms: start.elapsed().as_secs_f64() * 1e3,
            cpu_ms: cpu_ms() - start_cpu,
        };
        LOG.lock().unwrap_or_else(|e| e.into_inner()).push(phase);
        r
    }
    #[cfg(not(feature = "phase-times"))]
    {
        let _ = name;
        f()
    }
}

/// CPU time of the process so far, ms.
#[cfg(feature = "phase-times")]
fn cpu_ms() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: `getrusage` only writes the struct it is given.
        let usage = unsafe {
            let mut usage = std::mem::zeroed::<libc::rusage>();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        ms(usage.ru_utime) + ms(usage.ru_stime)
    }
    #[cfg(not(unix))]
    f64::NAN
}

#[cfg(all(test, feature = "phase-times"))]
mod tests {
    use crate::{EmbeddingTable, Init, Sgd, SgdConfig, SparseOptimizer};

    #[test]
    fn a_checked_step_on_one_thread_logs_each_phase_once() {
        let mut table = EmbeddingTable::new(10, 4, Init::default(), 1).unwrap();
        let mut sgd = Sgd::new(SgdConfig::default());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let names = pool.install(|| {
            super::take();
            sgd.step_lookup(&mut table, &[3u32, 1, 3], &[1.0; 12])
                .unwrap();
            super::take()
        });
        let names: Vec<&str> = names.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "check",
                "group: grouping pass",
                "group: map reset",
                "group",
                "check and copy",
                "update"
            ]
        );
        assert!(super::take().is_empty(), "taken");
    }
}
