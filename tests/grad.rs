//! `SparseGrad` against the dense formulation: the gradient of `lookup(ids)`
//! given `G` is `onehot(ids)ᵀ · G`, bitwise, for every tier and thread count.

mod common;

use common::{assert_bits_eq, each_config, matmul, onehot, transpose};
use embtable::{EmbeddingTable, Error, Index, SparseGrad};
use proptest::prelude::*;
use workloads::values;

/// Converts row numbers to the index type under test.
trait FromRow: Index {
    fn from_row(r: usize) -> Self;
}
macro_rules! from_row {
    ($($t:ty),*) => {$(
        impl FromRow for $t {
            fn from_row(r: usize) -> Self {
                r as $t
            }
        }
    )*};
}
from_row!(u32, u64, usize, i32, i64);

/// The dense gradient of all `batches` (accumulated in order): `onehot(ids)ᵀ · G`
/// over the concatenated batch, which sums each row in batch order.
fn dense_reference(rows: usize, dim: usize, batches: &[(Vec<usize>, Vec<f32>)]) -> Vec<f32> {
    let ids: Vec<usize> = batches.iter().flat_map(|(ids, _)| ids.clone()).collect();
    let g: Vec<f32> = batches.iter().flat_map(|(_, g)| g.clone()).collect();
    let n = ids.len();
    matmul(&transpose(&onehot(&ids, rows), n, rows), &g, rows, n, dim)
}

/// Accumulates every batch with ids of type `I`; returns the dense gradient,
/// checking the coalesced view (distinct rows in first-seen order, zero pads).
fn sparse<I: FromRow>(rows: usize, dim: usize, batches: &[(Vec<usize>, Vec<f32>)]) -> Vec<f32> {
    let mut grad = SparseGrad::new(dim);
    for (ids, g) in batches {
        let ids: Vec<I> = ids.iter().map(|&r| I::from_row(r)).collect();
        grad.accumulate_lookup(&ids, g).expect("valid batch");
    }
    let mut first_seen = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (ids, _) in batches {
        for &r in ids {
            if seen.insert(r) {
                first_seen.push(r);
            }
        }
    }
    assert_eq!(grad.rows(), &first_seen[..]);
    assert_eq!(grad.len(), first_seen.len());
    assert_eq!(grad.is_empty(), first_seen.is_empty());
    let stride = grad.stride();
    assert_eq!(grad.as_padded().len(), grad.len() * stride);
    for (k, slot) in grad.as_padded().chunks(stride.max(1)).enumerate() {
        assert_eq!(&slot[..dim], grad.row_grad(k));
        assert!(slot[dim..].iter().all(|x| x.to_bits() == 0), "pad lanes");
    }
    grad.to_dense(rows)
}

/// Batches of `(ids, gradient of the lookup output)`.
type Batches = Vec<(Vec<usize>, Vec<f32>)>;

/// `(rows, dim, batches)`: each batch's ids drawn from a window of the rows
/// (so duplicates are common), gradients from a seed.
fn batches(
    max_batch: usize,
    dims: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = (usize, usize, Batches)> {
    (1usize..=300, dims).prop_flat_map(move |(rows, dim)| {
        let window = 1usize..=rows;
        let batch = (window, 0..=max_batch, any::<u64>()).prop_flat_map(move |(w, n, seed)| {
            (proptest::collection::vec(0..w, n), Just(seed)).prop_map(move |(ids, seed)| {
                let g = values(seed, ids.len() * dim, -1.0, 1.0);
                (ids, g)
            })
        });
        (
            Just(rows),
            Just(dim),
            proptest::collection::vec(batch, 1..=3),
        )
    })
}

fn check_all_configs(rows: usize, dim: usize, batches: &[(Vec<usize>, Vec<f32>)]) {
    let want = dense_reference(rows, dim, batches);
    for (tier, threads, (a, b)) in each_config(|| {
        (
            sparse::<u32>(rows, dim, batches),
            sparse::<i64>(rows, dim, batches),
        )
    }) {
        assert_bits_eq(&a, &want, &format!("u32 ids, {tier}, {threads} threads"));
        assert_bits_eq(&b, &want, &format!("i64 ids, {tier}, {threads} threads"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Small batches (the serial path), several accumulations adding up.
    #[test]
    fn lookup_grad_is_onehot_transpose_times_g((rows, dim, batches) in batches(200, 1..=70)) {
        check_all_configs(rows, dim, &batches);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Batches large enough for the parallel path (ids × dim ≥ 2^15).
    #[test]
    fn large_batches_are_bitwise_equal_too((rows, dim, batches) in batches(1500, 40..=70)) {
        check_all_configs(rows, dim, &batches);
    }
}

/// `(rows, dim, batches)` above the size where ids are grouped by row in
/// parallel shards: many distinct rows (up to 200,000), runs of
/// neighbouring rows, rows 64 and 4,096 apart (which share low bits), and
/// hot rows repeated thousands of times.
fn sharded_batches() -> impl Strategy<Value = (usize, usize, Batches)> {
    (1usize..=200_000, 1usize..=6).prop_flat_map(|(rows, dim)| {
        let batch =
            (16_384usize..=40_000, 0u8..4, any::<u64>()).prop_map(move |(n, kind, seed)| {
                let ids: Vec<usize> = workloads::uniform(seed, n, rows)
                    .into_iter()
                    .enumerate()
                    .map(|(j, r)| {
                        let r = r as usize;
                        match kind {
                            0 => r,
                            1 => (r / 64 * 64 + j % 64) % rows,
                            2 => r / 64 * 64,
                            _ => [r % 7, r / 4096 * 4096][j % 2],
                        }
                    })
                    .collect();
                let g = values(seed ^ 7, ids.len() * dim, -1.0, 1.0);
                (ids, g)
            });
        (
            Just(rows),
            Just(dim),
            proptest::collection::vec(batch, 1..=2),
        )
    })
}

/// The dense gradient summed by a plain loop over positions in batch
/// order: `onehot(ids)ᵀ · G` without the matrices, for batches too large
/// for them.
fn summed_reference(rows: usize, dim: usize, batches: &[(Vec<usize>, Vec<f32>)]) -> Vec<f32> {
    let mut dense = vec![0.0f32; rows * dim];
    for (ids, g) in batches {
        for (&r, g) in ids.iter().zip(g.chunks(dim)) {
            for (d, &x) in dense[r * dim..][..dim].iter_mut().zip(g) {
                *d += x;
            }
        }
    }
    dense
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Batches grouped in parallel shards (on four threads) give
    /// the same slots, in first-seen order, and the same bits.
    #[test]
    fn sharded_batches_are_bitwise_equal((rows, dim, batches) in sharded_batches()) {
        let want = summed_reference(rows, dim, &batches);
        for (tier, threads, (a, b)) in each_config(|| {
            (
                sparse::<u32>(rows, dim, &batches),
                sparse::<i64>(rows, dim, &batches),
            )
        }) {
            assert_bits_eq(&a, &want, &format!("u32 ids, {tier}, {threads} threads"));
            assert_bits_eq(&b, &want, &format!("i64 ids, {tier}, {threads} threads"));
        }
    }
}

#[test]
fn every_index_type_gives_the_same_gradient() {
    let (rows, dim) = (50, 19);
    let ids: Vec<usize> = (0..300).map(|j| (j * 7919) % rows).collect();
    let batches = [(ids.clone(), values(3, ids.len() * dim, -1.0, 1.0))];
    let want = dense_reference(rows, dim, &batches);
    assert_bits_eq(&sparse::<u32>(rows, dim, &batches), &want, "u32");
    assert_bits_eq(&sparse::<u64>(rows, dim, &batches), &want, "u64");
    assert_bits_eq(&sparse::<usize>(rows, dim, &batches), &want, "usize");
    assert_bits_eq(&sparse::<i32>(rows, dim, &batches), &want, "i32");
    assert_bits_eq(&sparse::<i64>(rows, dim, &batches), &want, "i64");
}

/// A gradient with something in it, and a snapshot to compare against.
fn started(dim: usize) -> (SparseGrad, Vec<usize>, Vec<f32>) {
    let mut grad = SparseGrad::new(dim);
    grad.accumulate_lookup(&[4i64, 1, 4], &values(1, 3 * dim, -1.0, 1.0))
        .unwrap();
    let (rows, padded) = (grad.rows().to_vec(), grad.as_padded().to_vec());
    (grad, rows, padded)
}

#[track_caller]
fn assert_unchanged(grad: &SparseGrad, rows: &[usize], padded: &[f32]) {
    assert_eq!(grad.rows(), rows);
    assert_bits_eq(grad.as_padded(), padded, "gradient after an error");
}

#[test]
fn non_finite_gradient_is_refused_with_its_position() {
    let dim = 5;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for position in [0, 7, 14] {
            let (mut grad, rows, padded) = started(dim);
            let mut g = values(2, 3 * dim, -1.0, 1.0);
            g[position] = bad;
            // New rows (9) and known ones (1, 4) alike: nothing is accumulated.
            let err = grad.accumulate_lookup(&[9u32, 1, 4], &g).unwrap_err();
            match err {
                Error::NonFinite {
                    position: p, value, ..
                } => {
                    assert_eq!(p, position);
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("{other:?}"),
            }
            assert_unchanged(&grad, &rows, &padded);
        }
    }
}

#[test]
fn negative_id_is_out_of_range() {
    let dim = 3;
    let (mut grad, rows, padded) = started(dim);
    let g = values(2, 4 * dim, -1.0, 1.0);
    match grad.accumulate_lookup(&[2i64, 0, -7, 1], &g).unwrap_err() {
        Error::IndexOutOfRange {
            position, index, ..
        } => assert_eq!((position, index), (2, -7)),
        other => panic!("{other:?}"),
    }
    match grad.accumulate_lookup(&[-1i32, 0, 3, 1], &g).unwrap_err() {
        Error::IndexOutOfRange {
            position, index, ..
        } => assert_eq!((position, index), (0, -1)),
        other => panic!("{other:?}"),
    }
    assert_unchanged(&grad, &rows, &padded);
}

#[test]
fn for_table_checks_ids_against_the_rows() {
    let table = EmbeddingTable::zeros(10, 2).unwrap();
    let mut grad = SparseGrad::for_table(&table);
    assert_eq!(grad.dim(), 2);
    match grad
        .accumulate_lookup(&[3u32, 9, 10], &[0.0; 6])
        .unwrap_err()
    {
        Error::IndexOutOfRange {
            position,
            index,
            rows,
        } => assert_eq!((position, index, rows), (2, 10, 10)),
        other => panic!("{other:?}"),
    }
    assert!(grad.is_empty());
    grad.accumulate_lookup(&[3u32, 9], &[1.0; 4]).unwrap();
    assert_eq!(grad.rows(), &[3, 9]);
}

#[test]
fn wrong_length_is_a_shape_mismatch() {
    let dim = 4;
    let (mut grad, rows, padded) = started(dim);
    for len in [0, 7, 9, 100] {
        match grad
            .accumulate_lookup(&[1u32, 2], &vec![1.0; len])
            .unwrap_err()
        {
            Error::ShapeMismatch { expected, got, .. } => assert_eq!((expected, got), (8, len)),
            other => panic!("{other:?}"),
        }
    }
    assert_unchanged(&grad, &rows, &padded);
}

#[test]
fn clear_forgets_everything_and_keeps_working() {
    let (rows, dim) = (40, 21);
    let first = [(vec![3, 30, 3, 7], values(5, 4 * dim, -1.0, 1.0))];
    let second = [(vec![7, 1, 1, 39, 0], values(6, 5 * dim, -1.0, 1.0))];
    let mut grad = SparseGrad::new(dim);
    grad.accumulate_lookup(&[3u32, 30, 3, 7], &first[0].1)
        .unwrap();
    grad.clear();
    assert!(grad.is_empty());
    assert_eq!(grad.len(), 0);
    assert!(grad.as_padded().is_empty());
    assert_eq!(grad.to_dense(rows), vec![0.0; rows * dim]);
    grad.accumulate_lookup(&[7u64, 1, 1, 39, 0], &second[0].1)
        .unwrap();
    assert_eq!(grad.rows(), &[7, 1, 39, 0]);
    assert_bits_eq(
        &grad.to_dense(rows),
        &dense_reference(rows, dim, &second),
        "after clear",
    );
    // An empty batch is fine and adds nothing.
    grad.accumulate_lookup::<u32>(&[], &[]).unwrap();
    assert_eq!(grad.len(), 4);
}

/// A gradient too large for the caches (20 MB of slots) is written with
/// streaming stores: still each row's sum in batch order, first-seen rows.
#[test]
fn large_gradients_are_summed_in_batch_order() {
    let (rows, dim, n) = (50_000, 128, 40_000);
    let ids: Vec<usize> = workloads::uniform(7, n, rows)
        .into_iter()
        .map(|r| r as usize)
        .collect();
    let g = values(8, n * dim, -1.0, 1.0);
    // Plain sums in batch order, rows in first-seen order.
    let mut slot = vec![usize::MAX; rows];
    let mut first_seen = Vec::new();
    let mut sums: Vec<Vec<f32>> = Vec::new();
    for (j, &r) in ids.iter().enumerate() {
        if slot[r] == usize::MAX {
            slot[r] = first_seen.len();
            first_seen.push(r);
            sums.push(vec![0.0; dim]);
        }
        for (s, x) in sums[slot[r]].iter_mut().zip(&g[j * dim..][..dim]) {
            *s += x;
        }
    }
    for (tier, threads, grad) in each_config(|| {
        let mut grad = SparseGrad::new(dim);
        grad.accumulate_lookup(&ids, &g).unwrap();
        grad
    }) {
        let what = format!("{tier}, {threads} threads");
        assert_eq!(grad.rows(), &first_seen[..], "{what}");
        for (k, want) in sums.iter().enumerate() {
            assert_bits_eq(grad.row_grad(k), want, &what);
        }
    }
}
