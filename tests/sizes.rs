//! Sizes that cannot exist: a constructor given a shape no allocation can
//! hold returns `Err`, and nothing computed from a size wraps.

use embtable::{EmbeddingTable, Error, Init, SparseGrad};

/// The dims whose stride would not fit a `usize` (it once wrapped to 0, and
/// `EmbeddingTable::zeros(1, usize::MAX)` returned an empty buffer that
/// `renorm_rows` then read out of bounds), and those just below.
fn huge_dims() -> impl Iterator<Item = usize> {
    (0..40).map(|k| usize::MAX - k).chain([
        usize::MAX / 2,
        usize::MAX / 4 + 1,
        isize::MAX as usize / 4,
        1 << 60,
    ])
}

#[test]
fn tables_too_large_for_memory_are_alloc_errors() {
    for dim in huge_dims() {
        for rows in [1, 2, 3, usize::MAX] {
            for result in [
                EmbeddingTable::zeros(rows, dim),
                EmbeddingTable::new(rows, dim, Init::default(), 1),
            ] {
                let err = result.expect_err("no table this large can exist");
                assert!(matches!(err, Error::Alloc { what: "table", .. }), "{err}");
            }
        }
    }
    for rows in [usize::MAX, usize::MAX / 16, 1 << 59] {
        let err = EmbeddingTable::zeros(rows, 16).unwrap_err();
        assert!(matches!(err, Error::Alloc { .. }), "{err}");
    }
    // `from_rows` checks the values against rows * dim first.
    let err = EmbeddingTable::from_rows(1, usize::MAX, &[1.0]).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn a_gradient_for_a_dim_no_table_has_never_panics() {
    for dim in huge_dims() {
        let mut grad = SparseGrad::new(dim);
        assert_eq!(grad.dim(), dim);
        // Never wrapped below the row (it once wrapped to 0).
        assert!(grad.stride().is_multiple_of(16));
        assert!(grad.stride() >= dim.min(usize::MAX - 15), "{dim}");
        // An empty batch adds nothing; any other cannot match its length.
        grad.accumulate_lookup::<u32>(&[], &[]).unwrap();
        let err = grad.accumulate_lookup(&[0u32], &[1.0; 4]).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        assert!(grad.is_empty());
        assert!(grad.to_dense(0).is_empty());
    }
}

#[test]
fn normal_initialisers_that_could_draw_infinity_are_refused() {
    for init in [
        Init::Normal {
            mean: 0.0,
            std: 1e38,
        },
        Init::Normal {
            mean: 3e38,
            std: 1e37,
        },
        Init::TruncatedNormal {
            mean: -1e38,
            std: 1.5e38,
        },
    ] {
        let err = init.validate().unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { field: "std", .. }),
            "{err}"
        );
        assert!(EmbeddingTable::new(2, 3, init, 0).is_err());
    }
    // Large but safe: every draw is finite.
    let init = Init::Normal {
        mean: 0.0,
        std: 3e37,
    };
    let table = EmbeddingTable::new(5000, 16, init, 3).unwrap();
    assert!(table.to_vec().iter().all(|x| x.is_finite()));
    let init = Init::TruncatedNormal {
        mean: 1e38,
        std: 1e38,
    };
    let table = EmbeddingTable::new(5000, 16, init, 3).unwrap();
    assert!(table.to_vec().iter().all(|x| x.is_finite()));
}

#[test]
fn workload_byte_counts_saturate() {
    assert_eq!(workloads::gather_bytes(usize::MAX, usize::MAX), u64::MAX);
    assert_eq!(workloads::pooled_bytes(1 << 62, 3, 1 << 62, true), u64::MAX);
    assert_eq!(
        workloads::update_bytes(1, 1, usize::MAX, usize::MAX),
        u64::MAX
    );
    assert_eq!(workloads::gather_bytes(3, 2), 3 * 8 + 2 * 3 * 2 * 4);
}

#[test]
#[should_panic(expected = "rows must be in 1..2^32")]
fn a_zipf_workload_over_no_rows_is_a_documented_panic() {
    let _ = workloads::zipf(1, 10, 0, 1.05);
}
