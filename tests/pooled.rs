//! Pooled lookups and their gradients against the dense reference:
//! `pooled == B · onehot(ids) · W` and `grad == (B · onehot(ids))ᵀ · G`,
//! for every pooling, with and without weights, on every kernel tier and
//! thread count; and bad input rejected with nothing written.

mod common;

use common::{assert_bits_eq, each_config, matmul, onehot, transpose};
use embtable::{Bags, EmbeddingTable, Error, Pooling, SparseGrad};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use workloads::values;

const WEIGHTED: [Pooling; 3] = [Pooling::Sum, Pooling::Mean, Pooling::SqrtN];

/// A random batch of bags over a random table.
#[derive(Clone, Debug)]
struct Case {
    rows: usize,
    dim: usize,
    /// Seed of the table values and of the output gradient.
    seed: u64,
    /// Table values on a coarse grid (many ties for Max) instead of uniform.
    coarse: bool,
    ids: Vec<usize>,
    offsets: Vec<usize>,
    weights: Vec<f32>,
}

impl Case {
    fn bags(&self) -> usize {
        self.offsets.len() - 1
    }

    fn table(&self) -> EmbeddingTable {
        let mut v = values(self.seed, self.rows * self.dim, -1.0, 1.0);
        if self.coarse {
            v.iter_mut().for_each(|x| *x = (*x * 4.0).round() / 4.0);
        }
        EmbeddingTable::from_rows(self.rows, self.dim, &v).unwrap()
    }

    fn grad_out(&self) -> Vec<f32> {
        values(self.seed ^ 0xABCD, self.bags() * self.dim, -1.0, 1.0)
    }

    fn ids_i64(&self) -> Vec<i64> {
        self.ids.iter().map(|&i| i as i64).collect()
    }

    fn ids_u32(&self) -> Vec<u32> {
        self.ids.iter().map(|&i| i as u32).collect()
    }

    fn weights(&self, weighted: bool) -> Option<&[f32]> {
        weighted.then_some(&self.weights[..])
    }

    /// The dense `bags × n` matrix B of the documented coefficients:
    /// `B[b, j] = w_j / d_b` rounded once to f32, where `d_b` is 1 (Sum),
    /// `Σ w` (Mean) or `√Σ w²` (SqrtN) in f64, and 0 when `d_b == 0`.
    fn coefficient_matrix(&self, pooling: Pooling, weighted: bool) -> Vec<f32> {
        let n = self.ids.len();
        let mut b_mat = vec![0.0; self.bags() * n];
        for b in 0..self.bags() {
            let range = self.offsets[b]..self.offsets[b + 1];
            let w: Vec<f64> = range
                .clone()
                .map(|j| {
                    if weighted {
                        self.weights[j] as f64
                    } else {
                        1.0
                    }
                })
                .collect();
            let d = match pooling {
                Pooling::Sum => 1.0,
                Pooling::Mean => w.iter().sum::<f64>(),
                Pooling::SqrtN => w.iter().map(|w| w * w).sum::<f64>().sqrt(),
                Pooling::Max => unreachable!(),
            };
            for (k, j) in range.enumerate() {
                b_mat[b * n + j] = if d == 0.0 { 0.0 } else { (w[k] / d) as f32 };
            }
        }
        b_mat
    }
}

/// Bag lengths 0..=max_len (empty bags included), ids from a pool of
/// `1..=rows` hot rows (duplicates inside and across bags), weights either
/// on a grid of quarters (so bags whose weights sum to exactly zero occur)
/// or arbitrary in [-2, 2].
fn case(max_bags: usize, max_len: usize, max_dim: usize) -> impl Strategy<Value = Case> {
    (
        1usize..=300,
        1usize..=max_dim,
        any::<u64>(),
        any::<bool>(),
        prop::collection::vec(0usize..=max_len, 0..=max_bags),
        any::<bool>(),
    )
        .prop_flat_map(|(rows, dim, seed, coarse, lens, grid)| {
            let n: usize = lens.iter().sum();
            let offsets: Vec<usize> = std::iter::once(0)
                .chain(lens.iter().scan(0, |acc, &l| {
                    *acc += l;
                    Some(*acc)
                }))
                .collect();
            let weight = if grid {
                (-8i32..=8).prop_map(|k| k as f32 / 4.0).boxed()
            } else {
                (-2.0f32..=2.0).boxed()
            };
            (1usize..=rows).prop_flat_map(move |hot| {
                (
                    prop::collection::vec(0..hot, n),
                    prop::collection::vec(weight.clone(), n),
                )
                    .prop_map({
                        let offsets = offsets.clone();
                        move |(ids, weights)| Case {
                            rows,
                            dim,
                            seed,
                            coarse,
                            ids,
                            offsets: offsets.clone(),
                            weights,
                        }
                    })
            })
        })
}

/// Asserts that every configuration produced the same bits, and returns them.
#[track_caller]
fn same_everywhere(results: Vec<(embtable::kernels::Tier, usize, Vec<f32>)>) -> Vec<f32> {
    let (_, _, first) = &results[0];
    for (tier, threads, r) in &results {
        assert_bits_eq(r, first, &format!("{tier} × {threads} threads vs first"));
    }
    results.into_iter().next().unwrap().2
}

/// `|got - want| <= rel * scale` element-wise, where `scale` is the sum of
/// the absolute values of the terms (so `rel` bounds the rounding error of
/// any summation order, cancellation included).
#[track_caller]
fn assert_close_scaled(got: &[f32], want: &[f32], scale: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!(
            (g - w).abs() <= rel * m,
            "{what}[{i}]: got {g}, want {w} (scale {m})"
        );
    }
}

/// The relative tolerance of two sums of `terms` rounded products, each in
/// its own order: `(2 · terms + 2) · 2^-24`, and never below 1e-5.
fn tolerance(terms: usize) -> f32 {
    ((2 * terms + 2) as f32 * f32::EPSILON / 2.0).max(1e-5)
}

/// The most ids in one bag.
fn max_bag_len(c: &Case) -> usize {
    c.offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

/// The most times one id occurs in the batch.
fn max_count(ids: &[usize]) -> usize {
    let mut count = std::collections::HashMap::new();
    ids.iter()
        .for_each(|&id| *count.entry(id).or_insert(0) += 1);
    count.into_values().max().unwrap_or(0)
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// Checks the forward pass of every weighted-sum pooling.
fn check_forward(c: &Case) {
    let table = c.table();
    let w = table.to_vec();
    let (n, bags, rows, dim) = (c.ids.len(), c.bags(), c.rows, c.dim);
    let (ids64, ids32) = (c.ids_i64(), c.ids_u32());
    let gathered = matmul(&onehot(&c.ids, rows), &w, n, rows, dim);
    for pooling in WEIGHTED {
        for weighted in [false, true] {
            let what = format!("{pooling:?} weighted={weighted}");
            let bags64 = Bags::new(&ids64, &c.offsets, c.weights(weighted)).unwrap();
            let got = same_everywhere(each_config(|| {
                table.pooled_lookup_vec(&bags64, pooling).unwrap()
            }));
            let bags32 = Bags::new(&ids32, &c.offsets, c.weights(weighted)).unwrap();
            let mut out32 = vec![f32::NAN; bags * dim];
            table.pooled_lookup(&bags32, pooling, &mut out32).unwrap();
            assert_bits_eq(&out32, &got, &format!("{what}: u32 ids vs i64 ids"));

            // Exactly the documented arithmetic: B · (onehot · W), in-order sums.
            let b_mat = c.coefficient_matrix(pooling, weighted);
            let in_order = matmul(&b_mat, &gathered, bags, n, dim);
            assert_bits_eq(&got, &in_order, &format!("{what}: B · (onehot · W)"));

            // The matrix identity, summed in another order (duplicates merged).
            let bo = matmul(&b_mat, &onehot(&c.ids, rows), bags, n, rows);
            let dense = matmul(&bo, &w, bags, rows, dim);
            let scale = matmul(&abs(&b_mat), &abs(&gathered), bags, n, dim);
            let rel = tolerance(max_bag_len(c));
            assert_close_scaled(
                &got,
                &dense,
                &scale,
                rel,
                &format!("{what}: (B · onehot) · W"),
            );

            for b in 0..bags {
                let (lo, hi) = (c.offsets[b], c.offsets[b + 1]);
                let out_row = &got[b * dim..][..dim];
                if lo == hi {
                    assert_bits_eq(out_row, &vec![0.0; dim], &format!("{what}: empty bag {b}"));
                } else if hi - lo == 1 && !weighted {
                    // Coefficient 1: the row itself.
                    assert_eq!(out_row, table.row(c.ids[lo]), "{what}: bag {b} of one id");
                }
                assert!(out_row.iter().all(|x| x.is_finite()), "{what}: bag {b}");
            }
        }
    }
}

/// Checks max pooling against a dense per-lane max.
fn check_max_forward(c: &Case) {
    let table = c.table();
    let ids = c.ids_i64();
    let bags = Bags::new(&ids, &c.offsets, None).unwrap();
    let got = same_everywhere(each_config(|| {
        table.pooled_lookup_vec(&bags, Pooling::Max).unwrap()
    }));
    let dim = c.dim;
    for b in 0..c.bags() {
        let bag = &c.ids[c.offsets[b]..c.offsets[b + 1]];
        let want: Vec<f32> = (0..dim)
            .map(|l| {
                bag.iter()
                    .map(|&r| table.row(r)[l])
                    .reduce(f32::max)
                    .unwrap_or(0.0)
            })
            .collect();
        assert_eq!(&got[b * dim..][..dim], &want[..], "max of bag {b}");
    }
}

/// Runs `accumulate_pooled` under every configuration and checks they agree
/// bitwise; returns the dense gradient and the slot rows.
fn grad_everywhere(
    table: &EmbeddingTable,
    bags: &Bags<'_, i64>,
    pooling: Pooling,
    grad_out: &[f32],
) -> (Vec<f32>, Vec<usize>) {
    let results = each_config(|| {
        let mut grad = SparseGrad::for_table(table);
        grad.accumulate_pooled(table, bags, pooling, grad_out)
            .unwrap();
        (grad.to_dense(table.rows()), grad.rows().to_vec())
    });
    let (_, _, (dense0, rows0)) = &results[0];
    for (tier, threads, (dense, rows)) in &results {
        assert_eq!(rows, rows0, "{pooling:?}: slots, {tier} × {threads}");
        assert_bits_eq(dense, dense0, &format!("{pooling:?}: {tier} × {threads}"));
    }
    results.into_iter().next().unwrap().2
}

/// The distinct ids in order of first appearance.
fn first_seen(ids: &[usize]) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    ids.iter().copied().filter(|&id| seen.insert(id)).collect()
}

/// Checks the gradient of every weighted-sum pooling.
fn check_backward(c: &Case) {
    let table = c.table();
    let (n, bags, rows, dim) = (c.ids.len(), c.bags(), c.rows, c.dim);
    let ids = c.ids_i64();
    let g = c.grad_out();
    let onehot_t = transpose(&onehot(&c.ids, rows), n, rows);
    for pooling in WEIGHTED {
        for weighted in [false, true] {
            let what = format!("{pooling:?} weighted={weighted}");
            let b = Bags::new(&ids, &c.offsets, c.weights(weighted)).unwrap();
            let (got, slots) = grad_everywhere(&table, &b, pooling, &g);
            assert_eq!(slots, first_seen(&c.ids), "{what}: slots");

            // Exactly: onehotᵀ · (Bᵀ · G), in-order sums.
            let b_mat = c.coefficient_matrix(pooling, weighted);
            let b_t = transpose(&b_mat, bags, n);
            let per_position = matmul(&b_t, &g, n, bags, dim);
            let in_order = matmul(&onehot_t, &per_position, rows, n, dim);
            assert_bits_eq(&got, &in_order, &format!("{what}: onehotᵀ · (Bᵀ · G)"));

            // (B · onehot)ᵀ · G, summed in another order.
            let bo_t = transpose(
                &matmul(&b_mat, &onehot(&c.ids, rows), bags, n, rows),
                bags,
                rows,
            );
            let dense = matmul(&bo_t, &g, rows, bags, dim);
            let scale = matmul(
                &onehot_t,
                &matmul(&abs(&b_t), &abs(&g), n, bags, dim),
                rows,
                n,
                dim,
            );
            let rel = tolerance(max_count(&c.ids));
            assert_close_scaled(
                &got,
                &dense,
                &scale,
                rel,
                &format!("{what}: (B · onehot)ᵀ · G"),
            );
        }
    }
}

/// Checks the max gradient against the gradient of the dense max: lane `l`
/// of bag `b`'s gradient goes to the first id of the bag holding the max.
fn check_max_backward(c: &Case) {
    let table = c.table();
    let (rows, dim) = (c.rows, c.dim);
    let ids = c.ids_i64();
    let g = c.grad_out();
    let bags = Bags::new(&ids, &c.offsets, None).unwrap();
    let (got, slots) = grad_everywhere(&table, &bags, Pooling::Max, &g);
    assert_eq!(slots, first_seen(&c.ids), "max: slots");
    let mut want = vec![0.0f32; rows * dim];
    for b in 0..c.bags() {
        let bag = &c.ids[c.offsets[b]..c.offsets[b + 1]];
        for l in 0..dim {
            let Some(max) = bag.iter().map(|&r| table.row(r)[l]).reduce(f32::max) else {
                continue;
            };
            let winner = bag.iter().find(|&&r| table.row(r)[l] == max).unwrap();
            want[winner * dim + l] += g[b * dim + l];
        }
    }
    assert_bits_eq(&got, &want, "max gradient");
}

/// The dims at which the kernels change how they block a row's columns
/// (AVX2 sums hold 16 vectors, 128 floats, in registers; other folds and
/// tiers 8), with bags of 0, 1, 2 and many ids and NaN-free values of
/// every sign: every pooling equals the in-order dense product bit for bit
/// on every tier and thread count, large batches included (parallel path).
#[test]
fn block_boundary_dims_match_dense() {
    for dim in [8, 120, 127, 128, 129, 136, 248, 255, 256, 257] {
        for bags in [5, 400] {
            let lens = [0usize, 1, 2, 33, 7];
            let offsets: Vec<usize> = std::iter::once(0)
                .chain((0..bags).scan(0, |acc, b| {
                    *acc += lens[b % lens.len()];
                    Some(*acc)
                }))
                .collect();
            let n = *offsets.last().unwrap();
            let rows = 97;
            let case = Case {
                rows,
                dim,
                seed: dim as u64,
                coarse: false,
                ids: (0..n).map(|j| (j * 31 + dim) % rows).collect(),
                offsets,
                weights: values(dim as u64 + 1, n, -2.0, 2.0),
            };
            check_forward(&case);
            check_max_forward(&case);
        }
    }
}

/// `cases` cases; failures are saved where an integration test can find them.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/pooled.txt",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    // Dims past 240 so every tier reduces rows in blocks of 8, 4, 2 and 1 vectors.
    #[test]
    fn forward_is_b_onehot_w(c in case(24, 10, 260)) {
        check_forward(&c);
        check_max_forward(&c);
    }

    #[test]
    fn backward_is_b_onehot_transposed_g(c in case(24, 10, 70)) {
        check_backward(&c);
        check_max_backward(&c);
    }
}

proptest! {
    // Batches large enough for the parallel paths (forward and gradient).
    #![proptest_config(config(12))]

    #[test]
    fn large_batches_match_dense_on_every_config(c in case(300, 40, 70)
        .prop_filter("above the parallel threshold", |c| c.ids.len() * c.dim >= 1 << 16)) {
        check_forward(&c);
        check_max_forward(&c);
        check_backward(&c);
        check_max_backward(&c);
    }
}

proptest! {
    #![proptest_config(config(6))]

    /// Batches whose ids are grouped in parallel shards on four threads:
    /// every configuration gives the one-thread gradient bitwise,
    /// slots in first-seen order. (The one-thread path is checked against
    /// the dense formulation above.)
    #[test]
    fn sharded_gradients_equal_the_serial_ones(c in case(1500, 40, 5)
        .prop_filter("above the sharding threshold", |c| c.ids.len() >= 16_384)) {
        let table = c.table();
        let ids = c.ids_i64();
        let g = c.grad_out();
        for pooling in [Pooling::Sum, Pooling::Mean, Pooling::SqrtN, Pooling::Max] {
            let bags = Bags::new(&ids, &c.offsets, c.weights(pooling != Pooling::Max)).unwrap();
            let (_, slots) = grad_everywhere(&table, &bags, pooling, &g);
            assert_eq!(slots, first_seen(&c.ids), "{pooling:?}: slots");
        }
    }
}

fn small_table() -> EmbeddingTable {
    EmbeddingTable::from_rows(
        4,
        3,
        &[1., -2., 3., 4., 5., -6., -7., 8., 9., 0.5, 0.25, -0.125],
    )
    .unwrap()
}

#[test]
fn zero_normaliser_gives_zero_rows_and_no_gradient() {
    let table = small_table();
    let ids = [0u32, 1, 2, 3];
    // Bag 0: weights sum to zero (Mean's d = 0); bag 1: all weights zero.
    let weights = [0.5, -0.5, 0.0, 0.0];
    let bags = Bags::new(&ids, &[0, 2, 4], Some(&weights)).unwrap();
    for pooling in WEIGHTED {
        let out = table.pooled_lookup_vec(&bags, pooling).unwrap();
        let zero_bags: &[usize] = match pooling {
            Pooling::Sum => &[1],
            Pooling::Mean => &[0, 1],
            _ => &[1],
        };
        for &b in zero_bags {
            assert_bits_eq(
                &out[b * 3..][..3],
                &[0.0; 3],
                &format!("{pooling:?} bag {b}"),
            );
        }
        assert!(out.iter().all(|x| x.is_finite()), "{pooling:?}: {out:?}");
        let mut grad = SparseGrad::for_table(&table);
        grad.accumulate_pooled(&table, &bags, pooling, &[1.0; 6])
            .unwrap();
        let dense = grad.to_dense(4);
        assert!(
            dense.iter().all(|x| x.is_finite()),
            "{pooling:?}: {dense:?}"
        );
        for &b in zero_bags {
            for r in [2 * b, 2 * b + 1] {
                assert_eq!(&dense[r * 3..][..3], &[0.0; 3], "{pooling:?} row {r}");
            }
        }
    }
    // Sum and SqrtN of bag 0 are not zero: ±0.5 · (row 0 − row 1).
    let sum = table.pooled_lookup_vec(&bags, Pooling::Sum).unwrap();
    assert_eq!(&sum[..3], &[-1.5, -3.5, 4.5]);
}

#[test]
fn empty_bags_and_empty_batches() {
    let table = small_table();
    let ids: [i64; 0] = [];
    for offsets in [&[0usize][..], &[0, 0, 0]] {
        let bags = Bags::new(&ids, offsets, Some(&[])).unwrap();
        assert_eq!(bags.len(), offsets.len() - 1);
        for pooling in WEIGHTED {
            let mut out = vec![f32::NAN; bags.len() * 3];
            table.pooled_lookup(&bags, pooling, &mut out).unwrap();
            assert_bits_eq(&out, &vec![0.0; out.len()], "empty bags");
        }
        let unweighted = Bags::new(&ids, offsets, None).unwrap();
        let out = table.pooled_lookup_vec(&unweighted, Pooling::Max).unwrap();
        assert_bits_eq(&out, &vec![0.0; out.len()], "empty max bags");
        let mut grad = SparseGrad::for_table(&table);
        grad.accumulate_pooled(&table, &unweighted, Pooling::Max, &vec![1.0; out.len()])
            .unwrap();
        assert!(grad.is_empty());
    }
}

#[test]
fn unit_weights_equal_no_weights_bitwise() {
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 4) as u32).collect();
    let ones = vec![1.0; ids.len()];
    let offsets = [0, 1, 4, 4, 11, 40];
    let table = small_table();
    for pooling in WEIGHTED {
        let plain = Bags::new(&ids, &offsets, None).unwrap();
        let weighted = Bags::new(&ids, &offsets, Some(&ones)).unwrap();
        assert_bits_eq(
            &table.pooled_lookup_vec(&weighted, pooling).unwrap(),
            &table.pooled_lookup_vec(&plain, pooling).unwrap(),
            &format!("{pooling:?}"),
        );
    }
}

#[test]
fn max_ties_go_to_the_first_occurrence() {
    // Rows 0 and 1 tie in lane 0; row 1 is repeated.
    let table = EmbeddingTable::from_rows(3, 2, &[5., 1., 5., 2., 0., 2.]).unwrap();
    let ids = [1u32, 0, 1, 2];
    let bags = Bags::new(&ids, &[0, 4], None).unwrap();
    assert_eq!(
        table.pooled_lookup_vec(&bags, Pooling::Max).unwrap(),
        [5., 2.]
    );
    let mut grad = SparseGrad::for_table(&table);
    grad.accumulate_pooled(&table, &bags, Pooling::Max, &[10., 20.])
        .unwrap();
    // Lane 0: row 1 (position 0) beats the equal row 0; lane 1: row 1 again,
    // ahead of row 2's equal 2.
    assert_eq!(grad.to_dense(3), [0., 0., 10., 20., 0., 0.]);
    assert_eq!(grad.rows(), &[1, 0, 2]);
}

#[test]
fn gradients_add_up_across_calls() {
    let table = small_table();
    let ids = [3i64, 1, 3, 0];
    let weights = [0.5, 2.0, -1.0, 3.0];
    let bags = Bags::new(&ids, &[0, 3, 4], Some(&weights)).unwrap();
    let g = [1., 2., 3., -4., 5., 0.25];
    for pooling in WEIGHTED {
        let mut once = SparseGrad::for_table(&table);
        once.accumulate_pooled(&table, &bags, pooling, &g).unwrap();
        let mut twice = SparseGrad::for_table(&table);
        twice.accumulate_pooled(&table, &bags, pooling, &g).unwrap();
        twice.accumulate_pooled(&table, &bags, pooling, &g).unwrap();
        let doubled: Vec<f32> = once.to_dense(4).iter().map(|x| 2.0 * x).collect();
        assert_bits_eq(&twice.to_dense(4), &doubled, &format!("{pooling:?}"));
    }
}

#[test]
fn fixed_bags_equal_explicit_offsets() {
    let ids = [3u64, 1, 2, 2, 0, 1];
    let weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let fixed = Bags::fixed(&ids, 2).unwrap();
    let explicit = Bags::new(&ids, &[0, 2, 4, 6], None).unwrap();
    assert_eq!(fixed.offsets(), explicit.offsets());
    assert_eq!((fixed.len(), fixed.is_empty()), (3, false));
    assert_eq!(fixed.bag(1), &[2, 2]);
    assert_eq!(fixed.range(2), 4..6);
    assert_eq!(fixed.weights(), None);
    let fw = Bags::fixed_weighted(&ids, &weights, 3).unwrap();
    assert_eq!(fw.offsets(), &[0, 3, 6]);
    assert_eq!(fw.bag_weights(1), Some(&[4.0, 5.0, 6.0][..]));
    assert_eq!(fw.ids(), &ids);
    let table = small_table();
    for pooling in [Pooling::Sum, Pooling::Mean, Pooling::SqrtN, Pooling::Max] {
        assert_bits_eq(
            &table.pooled_lookup_vec(&fixed, pooling).unwrap(),
            &table.pooled_lookup_vec(&explicit, pooling).unwrap(),
            &format!("{pooling:?}"),
        );
    }
    let lengths = Bags::from_lengths(&ids, &[2, 2, 2], None).unwrap();
    assert_eq!(lengths.offsets(), explicit.offsets());
    let ragged = Bags::from_lengths(&ids, &[0, 5, 0, 1], Some(&weights)).unwrap();
    assert_eq!(ragged.offsets(), &[0, 0, 5, 5, 6]);
    assert_eq!(ragged.bag_weights(3), Some(&[6.0][..]));
    let err = Bags::from_lengths(&ids, &[2, 2, 1], None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{err:?}"
    );
    let err = Bags::from_lengths(&ids, &[usize::MAX, 7], None).unwrap_err();
    assert!(
        matches!(err, Error::ShapeMismatch { expected: 6, .. }),
        "{err:?}"
    );
    let err = Bags::from_lengths(&ids, &[6], Some(&weights[..5])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{err:?}"
    );
    let debug = format!("{:?}", fixed.clone());
    assert!(debug.contains("ids: [3, 1, 2, 2, 0, 1]"), "{debug}");
    assert_eq!(Pooling::default(), Pooling::Mean);
}

#[test]
fn bad_offsets_are_rejected() {
    let ids = [0u32, 1, 2, 3];
    let bad = |offsets: &[usize]| Bags::new(&ids, offsets, None).unwrap_err();
    assert!(
        matches!(
            bad(&[]),
            Error::ShapeMismatch {
                expected: 1,
                got: 0,
                ..
            }
        ),
        "{:?}",
        bad(&[])
    );
    let cases: [(&[usize], usize, usize); 5] = [
        (&[1, 2, 4], 0, 1),    // first offset not 0
        (&[0, 3, 2, 4], 2, 2), // decreasing
        (&[0, 2, 3], 2, 3),    // last is not ids.len()
        (&[0, 5, 4], 1, 5),    // beyond ids.len()
        (&[0], 0, 0),          // no bags but 4 ids
    ];
    for (offsets, position, value) in cases {
        let err = bad(offsets);
        assert!(
            matches!(err, Error::InvalidOffsets { position: p, value: v, .. } if p == position && v == value),
            "{offsets:?}: {err:?}"
        );
        assert!(
            err.to_string().contains(&format!("position {position}")),
            "{err}"
        );
    }
    assert!(matches!(
        Bags::fixed(&ids, 0),
        Err(Error::InvalidConfig {
            field: "bag_len",
            ..
        })
    ));
    assert!(matches!(
        Bags::fixed(&ids, 3),
        Err(Error::InvalidConfig {
            field: "bag_len",
            ..
        })
    ));
}

#[test]
fn bad_weights_are_rejected() {
    let ids = [0u32, 1, 2, 3];
    let offsets = [0, 2, 4];
    let err = Bags::new(&ids, &offsets, Some(&[1.0, 2.0, 3.0])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{err:?}"
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let weights = [1.0, 2.0, bad, 3.0];
        let err = Bags::new(&ids, &offsets, Some(&weights)).unwrap_err();
        assert!(
            matches!(err, Error::NonFinite { position: 2, .. }),
            "{err:?}"
        );
        let err = Bags::fixed_weighted(&ids, &weights, 2).unwrap_err();
        assert!(
            matches!(err, Error::NonFinite { position: 2, .. }),
            "{err:?}"
        );
    }
}

/// A gradient with something in it, and a snapshot to compare against.
fn used_grad(table: &EmbeddingTable) -> (SparseGrad, Vec<usize>, Vec<f32>) {
    let mut grad = SparseGrad::for_table(table);
    grad.accumulate_lookup(&[2u32, 0], &[1., 2., 3., 4., 5., 6.])
        .unwrap();
    let (rows, padded) = (grad.rows().to_vec(), grad.as_padded().to_vec());
    (grad, rows, padded)
}

#[test]
fn bad_input_writes_nothing() {
    let table = small_table();
    let g = [0.5f32; 6];
    let ids = [0i64, 3, 1, 2];
    let offsets = [0, 2, 4];
    let weights = [1.0, 2.0, 3.0, 4.0];
    let good = Bags::new(&ids, &offsets, None).unwrap();
    let weighted = Bags::new(&ids, &offsets, Some(&weights)).unwrap();
    // Weights that cancel to a normaliser far smaller than one weight.
    let wild_w = [3.0e38, -3.0e38, 1.0e-38, 1.0];
    let wild = Bags::new(&ids, &[0, 3, 4], Some(&wild_w)).unwrap();
    let too_big = [0i64, 3, 4, 2];
    let too_big = Bags::new(&too_big, &offsets, None).unwrap();
    let negative = [0i64, 3, 1, -1];
    let negative = Bags::new(&negative, &offsets, None).unwrap();

    let check = |what: &str,
                 bags: &Bags<'_, i64>,
                 pooling: Pooling,
                 out_len: usize,
                 g: &[f32],
                 want: &dyn Fn(&Error) -> bool| {
        let mut out = vec![7.0f32; out_len];
        let err = table.pooled_lookup(bags, pooling, &mut out).unwrap_err();
        assert!(want(&err), "{what}: forward: {err:?}");
        assert_eq!(out, vec![7.0; out_len], "{what}: out written");
        let (mut grad, rows, padded) = used_grad(&table);
        let err = grad
            .accumulate_pooled(&table, bags, pooling, g)
            .unwrap_err();
        assert!(want(&err), "{what}: backward: {err:?}");
        assert_eq!(grad.rows(), &rows[..], "{what}: grad rows changed");
        assert_bits_eq(grad.as_padded(), &padded, &format!("{what}: grad changed"));
    };
    check("out too short", &good, Pooling::Sum, 5, &g[..5], &|e| {
        matches!(
            e,
            Error::ShapeMismatch {
                expected: 6,
                got: 5,
                ..
            }
        )
    });
    check("max with weights", &weighted, Pooling::Max, 6, &g, &|e| {
        matches!(
            e,
            Error::InvalidConfig {
                field: "pooling",
                ..
            }
        )
    });
    check("id too large", &too_big, Pooling::Mean, 6, &g, &|e| {
        matches!(
            e,
            Error::IndexOutOfRange {
                position: 2,
                index: 4,
                rows: 4
            }
        )
    });
    check("negative id", &negative, Pooling::Max, 6, &g, &|e| {
        matches!(
            e,
            Error::IndexOutOfRange {
                position: 3,
                index: -1,
                ..
            }
        )
    });
    check(
        "overflowing coefficient",
        &wild,
        Pooling::Mean,
        6,
        &g,
        &|e| matches!(e, Error::NonFinite { position: 0, .. }),
    );
    // SqrtN's coefficients are at most 1 in magnitude: the same bags pool fine.
    let out = table.pooled_lookup_vec(&wild, Pooling::SqrtN).unwrap();
    assert!(out.iter().all(|x| x.is_finite()), "{out:?}");

    // Gradient-only errors.
    let (mut grad, rows, padded) = used_grad(&table);
    let mut nan = g;
    nan[4] = f32::NAN;
    let err = grad
        .accumulate_pooled(&table, &good, Pooling::Sum, &nan)
        .unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { position: 4, .. }),
        "{err:?}"
    );
    let err = grad
        .accumulate_pooled(&table, &good, Pooling::Max, &g[..5])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{err:?}"
    );
    let wide = EmbeddingTable::zeros(4, 5).unwrap();
    let err = grad
        .accumulate_pooled(&wide, &good, Pooling::Sum, &[0.0; 10])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 5,
                got: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(grad.rows(), &rows[..]);
    assert_bits_eq(grad.as_padded(), &padded, "grad changed");
}
