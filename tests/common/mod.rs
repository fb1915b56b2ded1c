//! Helpers shared by the integration tests: every kernel tier × 1, 2, 3
//! and 4 threads, and the plain dense reference (one-hot matrices; the
//! optimizers' in `optim`).
#![allow(dead_code)]

pub mod optim;

use std::sync::OnceLock;

use embtable::kernels::{self, Tier};

/// The thread counts every property is checked at: one (the serial
/// paths), two, an odd count whose tasks split work unevenly, and four
/// (from which large batches' ids are grouped in parallel shards).
pub const THREADS: [usize; 4] = [1, 2, 3, 4];

fn pools() -> &'static [rayon::ThreadPool] {
    static POOLS: OnceLock<Vec<rayon::ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        THREADS
            .iter()
            .map(|&n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .expect("thread pool")
            })
            .collect()
    })
}

/// The tiers to test: every tier this CPU runs. If `EMBTABLE_REQUIRE_TIER`
/// names a tier this CPU lacks, fail rather than silently skip it.
pub fn tiers() -> Vec<Tier> {
    if let Ok(name) = std::env::var("EMBTABLE_REQUIRE_TIER") {
        let tier = Tier::from_name(&name).expect("EMBTABLE_REQUIRE_TIER names a tier");
        assert!(tier.is_available(), "required tier {tier} is not available");
    }
    Tier::available()
}

/// Runs `f` under every (tier, thread count) and returns the results with
/// their configuration.
pub fn each_config<R: Send>(f: impl Fn() -> R + Sync) -> Vec<(Tier, usize, R)> {
    let mut results = Vec::new();
    for tier in tiers() {
        for (pool, &threads) in pools().iter().zip(&THREADS) {
            let r = pool.install(|| kernels::with_tier(tier, &f));
            results.push((tier, threads, r));
        }
    }
    results
}

/// The dense one-hot matrix of `ids` over `rows` rows: `ids.len() × rows`.
pub fn onehot(ids: &[usize], rows: usize) -> Vec<f32> {
    let mut m = vec![0.0; ids.len() * rows];
    for (j, &id) in ids.iter().enumerate() {
        m[j * rows + id] = 1.0;
    }
    m
}

/// Dense `a (n×k) · b (k×m)`, summing over k in order.
pub fn matmul(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut c = vec![0.0; n * m];
    for i in 0..n {
        for p in 0..k {
            let x = a[i * k + p];
            if x == 0.0 {
                continue; // skipping exact zeros keeps 0 · inf out of the sum
            }
            for j in 0..m {
                c[i * m + j] += x * b[p * m + j];
            }
        }
    }
    c
}

/// Dense transpose of an `n × m` matrix.
pub fn transpose(a: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut t = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            t[j * n + i] = a[i * m + j];
        }
    }
    t
}

/// Asserts `got` equals `want` within a relative tolerance, naming the index.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1e-6) + 1e-7;
        assert!(
            (g - w).abs() <= tol || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// As [`assert_close`], but each |want| is raised to `scale` first: values
/// that cancelled down to near zero carry the rounding of the larger terms
/// they came from, so they are judged at the magnitude of those terms.
#[track_caller]
pub fn assert_close_scaled(got: &[f32], want: &[f32], rel: f32, scale: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(scale).max(1e-6) + 1e-7;
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

/// Bitwise equality of float slices (distinguishes -0.0 and NaN payloads).
#[track_caller]
pub fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g}, want {w}");
    }
}

/// A fixture committed under `tests/fixtures/`.
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A scratch directory, unique to this process and `name`, removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    /// A fresh, empty directory.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("embtable-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }

    /// Writes `bytes` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> std::path::PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// The names of the files in the directory, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
