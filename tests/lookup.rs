//! Lookup (gather) equals the dense formulation `onehot(ids) · W`, bitwise,
//! for every index type, kernel tier and thread count; bad ids are `Err`
//! with nothing written; seeded initialisation is reproducible.

mod common;

use common::{assert_bits_eq, each_config, matmul, onehot};
use embtable::{AlignedBuf, EmbeddingTable, Error, Index, Init};
use proptest::prelude::*;

/// A table with distinct, exactly representable values, so any misplaced
/// copy shows.
fn table_of(rows: usize, dim: usize) -> EmbeddingTable {
    let values: Vec<f32> = (0..rows * dim).map(|i| i as f32 * 0.5 - 7.0).collect();
    EmbeddingTable::from_rows(rows, dim, &values).unwrap()
}

fn check_lookup<I: Index + TryFrom<usize>>(rows: usize, dim: usize, ids: &[usize]) {
    let table = table_of(rows, dim);
    let typed: Vec<I> = ids
        .iter()
        .map(|&i| I::try_from(i).ok().expect("id fits"))
        .collect();
    // Dense reference: onehot(ids) · W. Every product is 1·w or 0·w and the
    // sum has one non-zero term, so it is exact and comparable bitwise.
    let want = matmul(&onehot(ids, rows), &table.to_vec(), ids.len(), rows, dim);
    for (tier, threads, got) in each_config(|| {
        let mut out = vec![f32::NAN; ids.len() * dim];
        table.lookup(&typed, &mut out).unwrap();
        out
    }) {
        assert_bits_eq(&got, &want, &format!("lookup {tier} x{threads}"));
    }
    assert_bits_eq(&table.lookup_vec(&typed).unwrap(), &want, "lookup_vec");
}

fn shape() -> impl Strategy<Value = (usize, usize, Vec<usize>)> {
    (1usize..=300, 1usize..=70).prop_flat_map(|(rows, dim)| {
        (
            Just(rows),
            Just(dim),
            prop::collection::vec(0..rows, 0..=200),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn lookup_equals_onehot_matmul((rows, dim, ids) in shape()) {
        check_lookup::<u32>(rows, dim, &ids);
        check_lookup::<i64>(rows, dim, &ids);
        check_lookup::<usize>(rows, dim, &ids);
    }

    #[test]
    fn bad_id_is_named_and_nothing_is_written(
        (rows, dim, ids) in shape(),
        at in any::<prop::sample::Index>(),
        negative in any::<bool>(),
        excess in 0i64..1000,
    ) {
        let table = table_of(rows, dim);
        let mut ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        ids.push(0);
        let position = at.index(ids.len());
        let bad = if negative { -1 - excess } else { rows as i64 + excess };
        ids[position] = bad;
        let mut out = vec![1.25f32; ids.len() * dim];
        for (_, _, err) in each_config(|| table.lookup(&ids, &mut out.clone()).unwrap_err()) {
            match err {
                Error::IndexOutOfRange { position: p, index, rows: r } => {
                    prop_assert_eq!((p, index, r), (position, bad as i128, rows));
                }
                other => prop_assert!(false, "unexpected error {other}"),
            }
        }
        prop_assert!(table.lookup(&ids, &mut out).is_err());
        prop_assert!(out.iter().all(|&x| x == 1.25), "out was written");
    }
}

#[test]
fn every_dim_from_zero_pad_to_three_lines() {
    // Head, body and tail paths of every vector width: dims 1..=49.
    for dim in 1..=3 * 16 + 1 {
        check_lookup::<i32>(5, dim, &[4, 0, 4, 2, 1, 3, 0]);
    }
}

#[test]
fn large_batch_takes_the_parallel_path() {
    // Above the parallel threshold, and an odd batch so chunks are uneven.
    let (rows, dim) = (1000, 33);
    let ids: Vec<usize> = (0..4001).map(|i| (i * 7919) % rows).collect();
    check_lookup::<u64>(rows, dim, &ids);
}

#[test]
fn large_aligned_outputs_are_streamed_exactly() {
    // Past 16 MiB into a 64-byte aligned buffer with rows of whole cache
    // lines, rows are written with non-temporal stores; the same lookup
    // into a misaligned slice of the buffer is not. Both must be the rows.
    let (rows, dim) = (1000, 32);
    let table = table_of(rows, dim);
    let ids: Vec<i64> = (0..140_001).map(|i| (i * 7919 % rows) as i64).collect();
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&id| table.row(id as usize).to_vec())
        .collect();
    assert!(want.len() * 4 >= 16 << 20, "large enough to stream");
    for offset in [0, 4] {
        for (tier, threads, got) in each_config(|| {
            let mut out = AlignedBuf::zeroed(want.len() + offset, "out").unwrap();
            out.as_mut_slice().fill(f32::NAN);
            table
                .lookup(&ids, &mut out.as_mut_slice()[offset..])
                .unwrap();
            out.as_slice()[offset..].to_vec()
        }) {
            assert_bits_eq(&got, &want, &format!("offset {offset}, {tier} x{threads}"));
        }
    }
}

#[test]
fn wrong_output_length_is_a_shape_error() {
    let table = table_of(4, 3);
    let mut out = vec![0.0; 5];
    let err = table.lookup(&[1u32, 2], &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(out, [0.0; 5]);
}

#[test]
fn empty_batch_is_ok() {
    let table = table_of(4, 3);
    table.lookup::<u32>(&[], &mut []).unwrap();
    assert!(table.lookup_vec::<i64>(&[]).unwrap().is_empty());
}

#[test]
fn bad_shapes_are_errors() {
    let zero_rows = EmbeddingTable::new(0, 4, Init::default(), 1).unwrap_err();
    assert!(matches!(
        zero_rows,
        Error::InvalidConfig { field: "rows", .. }
    ));
    let zero_dim = EmbeddingTable::new(4, 0, Init::default(), 1).unwrap_err();
    assert!(matches!(
        zero_dim,
        Error::InvalidConfig { field: "dim", .. }
    ));
    let short = EmbeddingTable::from_rows(2, 3, &[1.0; 5]).unwrap_err();
    assert!(matches!(
        short,
        Error::ShapeMismatch {
            expected: 6,
            got: 5,
            ..
        }
    ));
    let huge = EmbeddingTable::new(usize::MAX / 8, 16, Init::Zeros, 1).unwrap_err();
    assert!(matches!(huge, Error::Alloc { .. }), "{huge}");
}

#[test]
fn padding_lanes_are_zero() {
    let table = EmbeddingTable::new(50, 19, Init::Constant(3.0), 9).unwrap();
    assert_eq!(table.stride(), 32);
    for row in table.as_padded().chunks(table.stride()) {
        assert!(row[..19].iter().all(|&x| x == 3.0));
        assert!(row[19..].iter().all(|&x| x.to_bits() == 0));
    }
}

fn init_on_threads(init: Init, threads: usize) -> Vec<f32> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(|| EmbeddingTable::new(3000, 37, init, 1234).unwrap().to_vec())
}

#[test]
fn seeded_init_is_reproducible_across_thread_counts() {
    for init in [
        Init::default(),
        Init::Normal {
            mean: 0.0,
            std: 1.0,
        },
        Init::TruncatedNormal {
            mean: 0.5,
            std: 0.1,
        },
    ] {
        let one = init_on_threads(init, 1);
        assert_bits_eq(&init_on_threads(init, 2), &one, "2 threads");
        assert_bits_eq(&init_on_threads(init, 1), &one, "rerun");
        let other_seed = EmbeddingTable::new(3000, 37, init, 1235).unwrap().to_vec();
        assert_ne!(other_seed, one, "the seed must matter");
    }
}

#[test]
fn uniform_values_lie_in_the_half_open_range() {
    let (low, high) = (-0.05f32, 0.05f32);
    let values = init_on_threads(Init::Uniform { low, high }, 2);
    assert!(values.iter().all(|&x| (low..high).contains(&x)));
    // Spread over the range, not clustered: both tenths at the ends occur.
    assert!(values.iter().any(|&x| x < low + 0.01));
    assert!(values.iter().any(|&x| x > high - 0.01));
    let mean = values.iter().map(|&x| x as f64).sum::<f64>() / values.len() as f64;
    assert!(mean.abs() < 1e-3, "mean {mean}");
}

#[test]
fn truncated_normal_stays_within_two_std() {
    let (mean, std) = (1.0f32, 0.5f32);
    let values = init_on_threads(Init::TruncatedNormal { mean, std }, 2);
    assert!(values.iter().all(|&x| (x - mean).abs() <= 2.0 * std + 1e-6));
    // Truncation, not clamping: no pile-up at the bounds.
    let at_bound = values
        .iter()
        .filter(|&&x| (x - mean).abs() > 2.0 * std - 1e-3)
        .count();
    assert!(
        at_bound < values.len() / 500,
        "{at_bound} values at the bounds"
    );
}
