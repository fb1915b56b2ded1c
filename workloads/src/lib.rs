//! The benchmark workloads of embtable's `WORKLOADS.md`, generated
//! bit-exactly: the ids, values and byte counts that `benches/`, the
//! `workloads` example and the tests use.
//!
//! Bench support, not part of the published library: embtable's
//! dev-dependency only. The same generators were used to measure PyTorch,
//! FBGEMM and TensorFlow, so a port that reproduces the checksums (see
//! `tests/workloads.rs` in the repository) measures the same lookups.
//! Indices are `i64`, as those systems use.

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Element `i` of the SplitMix64 stream of `seed`.
#[inline]
fn stream(seed: u64, i: u64) -> u64 {
    mix(seed.wrapping_add((i + 1).wrapping_mul(GAMMA)))
}

/// SplitMix64's finaliser, as `WORKLOADS.md` states it.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` indices uniform in `0..rows` (Lemire's multiply-shift on the high 32 bits).
///
/// # Panics
/// If `rows >= 2^32`.
pub fn uniform(seed: u64, n: usize, rows: usize) -> Vec<i64> {
    assert!(rows < 1 << 32, "rows must be below 2^32");
    (0..n as u64)
        .map(|i| (((stream(seed, i) >> 32) * rows as u64) >> 32) as i64)
        .collect()
}

/// `n` indices from a Zipf law of exponent `s` over ranks `0..rows`, with
/// hot rows scattered by `rank * 999983 mod rows`.
///
/// # Panics
/// If `rows` is 0 or not below 2^32.
pub fn zipf(seed: u64, n: usize, rows: usize, s: f64) -> Vec<i64> {
    assert!(
        (1..1 << 32).contains(&rows),
        "rows must be in 1..2^32, not {rows}"
    );
    let mut cdf: Vec<f64> = Vec::with_capacity(rows);
    let mut total = 0.0;
    for k in 1..=rows {
        total += (k as f64).powf(-s);
        cdf.push(total);
    }
    let last = cdf[rows - 1];
    for c in &mut cdf {
        *c /= last;
    }
    (0..n as u64)
        .map(|i| {
            let u = (stream(seed, i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            let rank = cdf.partition_point(|&c| c <= u).min(rows - 1);
            ((rank as u64 * 999_983) % rows as u64) as i64
        })
        .collect()
}

/// `n` per-sample weights in `[0, 1)` with 24 random bits.
pub fn weights(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| (stream(seed, i) >> 40) as f32 * (1.0 / (1u64 << 24) as f32))
        .collect()
}

/// `n` values uniform in `[low, high)`, for tables and gradients (values do
/// not affect timing; only finiteness matters).
pub fn values(seed: u64, n: usize, low: f32, high: f32) -> Vec<f32> {
    weights(seed, n)
        .into_iter()
        .map(|u| low + (high - low) * u)
        .collect()
}

/// Rows of the large tables (W1, W3, W4, W5).
pub const BIG_ROWS: usize = 1_000_000;
/// Rows of the cache-resident table (W2).
pub const SMALL_ROWS: usize = 10_000;
/// Lookups per batch in W1, W2, W3 and W5.
pub const BATCH: usize = 262_144;
/// Bags in W4.
pub const BAGS: usize = 16_384;
/// Ids per bag in W4.
pub const BAG_LEN: usize = 32;

/// The "useful bytes" of a gather of `n` rows of `dim` floats: ids read,
/// rows read, output written. Saturates at `u64::MAX`, as do the other
/// byte counts here.
pub fn gather_bytes(n: usize, dim: usize) -> u64 {
    bytes([(n, 8), (n, 2 * 4 * dim as u128)])
}

/// The "useful bytes" of a pooled lookup: ids, offsets, rows read, output
/// written, and per-sample weights if any.
pub fn pooled_bytes(n: usize, bags: usize, dim: usize, weighted: bool) -> u64 {
    let weight_bytes = if weighted { 4 } else { 0 };
    bytes([
        (n, 8 + 4 * dim as u128 + weight_bytes),
        (bags, 8 + 4 * dim as u128),
    ])
}

/// The "useful bytes" of a sparse update: ids and gradient read, then the
/// unique rows' weights and `state_arrays` state arrays read and written.
pub fn update_bytes(n: usize, unique: usize, dim: usize, state_arrays: usize) -> u64 {
    let row_bytes = 4 * dim as u128;
    bytes([
        (n, 8 + row_bytes),
        (
            unique,
            row_bytes.saturating_mul(2 * (1 + state_arrays as u128)),
        ),
    ])
}

/// `Σ count * bytes_each`, saturating, in `u128`, then saturated to `u64`.
fn bytes<const N: usize>(terms: [(usize, u128); N]) -> u64 {
    let total = terms.iter().fold(0u128, |sum, &(count, each)| {
        sum.saturating_add((count as u128).saturating_mul(each))
    });
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// The median of `values` (not empty; the upper middle of an even count),
/// as the benchmark programs report their timings. Sorts `values`.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// CPU time of the whole process so far (user + system, every thread), in
/// ms; NaN where the OS does not say. On a shared machine it is what the
/// load cannot stretch (unlike wall time), though rayon's workers spinning
/// for work count too.
pub fn cpu_ms() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: `rusage` is integers only, so all zeros is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `getrusage` writes one `rusage` into the one it is given;
        // RUSAGE_SELF is a valid `who`.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
            return ms(usage.ru_utime) + ms(usage.ru_stime);
        }
    }
    f64::NAN
}
