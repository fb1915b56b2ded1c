//! `renorm_rows`: rows above the bound are scaled to it, others untouched.

mod common;

use common::{assert_bits_eq, each_config};
use embtable::{EmbeddingTable, Error, Init};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn renorm_matches_the_definition(
        rows in 1usize..=60,
        dim in 1usize..=70,
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        max_norm in 0.05f32..2.0,
    ) {
        let start = EmbeddingTable::new(rows, dim, Init::Normal { mean: 0.0, std: 0.3 }, 5).unwrap();
        let ids: Vec<usize> = picks.iter().map(|p| p.index(rows)).collect();
        let mut want = start.to_vec();
        for r in 0..rows {
            if !ids.contains(&r) {
                continue;
            }
            let row = &mut want[r * dim..][..dim];
            let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            if norm > max_norm as f64 {
                let factor = (max_norm as f64 / (norm + 1e-7)) as f32;
                row.iter_mut().for_each(|x| *x *= factor);
            }
        }
        let results = each_config(|| {
            let mut table = start.clone();
            table.renorm_rows(&ids, max_norm).unwrap();
            table.to_vec()
        });
        for (tier, threads, got) in &results {
            // Bitwise across configurations ...
            assert_bits_eq(got, &results[0].2, &format!("{tier} x{threads}"));
        }
        // ... and equal to the definition up to the norm's summation order.
        let got = &results[0].2;
        for r in 0..rows {
            let (g, w) = (&got[r * dim..][..dim], &want[r * dim..][..dim]);
            if ids.contains(&r) {
                common::assert_close(g, w, 1e-6, &format!("row {r}"));
                let norm = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
                prop_assert!(norm <= max_norm as f64 * (1.0 + 1e-6), "row {} norm {}", r, norm);
            } else {
                assert_bits_eq(g, w, &format!("untouched row {r}"));
            }
        }
    }
}

#[test]
fn bad_input_writes_nothing() {
    let mut table = EmbeddingTable::from_rows(2, 2, &[3., 4., 6., 8.]).unwrap();
    let before = table.clone();
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let err = table.renorm_rows(&[0u32], bad).unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidConfig {
                field: "max_norm",
                ..
            }
        ));
    }
    let err = table.renorm_rows(&[0i64, 2], 1.0).unwrap_err();
    assert!(matches!(
        err,
        Error::IndexOutOfRange {
            position: 1,
            index: 2,
            rows: 2
        }
    ));
    assert_eq!(table, before);
}
