//! The generators of `WORKLOADS.md` reproduce its checksums and byte
//! counts bit for bit, so the benches measure the workloads the peers were
//! measured on.

use std::collections::HashSet;
use workloads::*;

fn check(ids: &[i64], first: [i64; 5], sum: i64, unique: usize) {
    assert_eq!(&ids[..5], &first);
    assert_eq!(ids.iter().sum::<i64>(), sum);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), unique);
}

#[test]
fn checksums_match_workloads_md() {
    let w1 = uniform(1, BATCH, BIG_ROWS);
    check(
        &w1,
        [566561, 745781, 971002, 444359, 444264],
        131378383523,
        230_534,
    );
    let w2 = uniform(2, BATCH, SMALL_ROWS);
    check(&w2, [5911, 7491, 5956, 7654, 3115], 1312087075, 10_000);
    let w3 = zipf(3, BATCH, BIG_ROWS, 1.05);
    check(
        &w3,
        [999983, 929603, 981793, 0, 999915],
        204526714781,
        64_957,
    );
    let mut hits = std::collections::HashMap::new();
    for &r in &w3 {
        *hits.entry(r).or_insert(0usize) += 1;
    }
    assert_eq!(hits.values().max(), Some(&24_765));
    let w4 = uniform(4, BAGS * BAG_LEN, BIG_ROWS);
    check(
        &w4,
        [431455, 892406, 859117, 491774, 394580],
        262097025798,
        408_164,
    );
    let w5 = uniform(5, BATCH, BIG_ROWS);
    check(
        &w5,
        [386768, 752307, 232709, 99339, 187960],
        131171209585,
        230_623,
    );
}

#[test]
fn weight_checksum_matches_workloads_md() {
    let w = weights(40, BAGS * BAG_LEN);
    assert_eq!(&w[..4], &[0.21335876, 0.9724051, 0.65501803, 0.03556311]);
    let sum: f64 = w.iter().map(|&x| x as f64).sum();
    assert!((sum - 262124.0887963772).abs() < 1e-6, "{sum}");
}

#[test]
fn byte_accounting_matches_workloads_md() {
    let mb = |b: u64| (b as f64 / 1e6 * 10.0).round() / 10.0;
    assert_eq!(mb(gather_bytes(BATCH, 128)), 270.5);
    assert_eq!(mb(gather_bytes(BATCH, 32)), 69.2);
    assert_eq!(mb(update_bytes(BATCH, 230_623, 128, 0)), 372.5);
    assert_eq!(mb(update_bytes(BATCH, 230_623, 128, 1)), 608.6);
    assert_eq!(mb(pooled_bytes(BAGS * BAG_LEN, BAGS, 128, false)), 281.1);
}
