//! The `Embedding` layer: a shared table trained through the layer equals
//! the dense computation; padding, out-of-range policies, frozen tables,
//! max_norm and masks behave as Keras and PyTorch users expect.

mod common;

use common::{assert_bits_eq, assert_close, assert_close_scaled, matmul, onehot, transpose};
use embtable::{
    Adagrad, AdagradConfig, Bags, Embedding, EmbeddingOptions, EmbeddingTable, Error, Init,
    OutOfRange, Pooling, Semantics, Sgd, SgdConfig, SparseOptimizer,
};
use proptest::prelude::*;

/// The dense optimizers, written for obviousness over whole matrices.
#[derive(Clone, Copy)]
enum Dense {
    /// Keras Adagrad: a += g²; w -= lr·g/√(a + ε).
    Adagrad { lr: f32, init: f32, eps: f32 },
    /// Keras SGD with momentum: v = μv − ηg; w += v.
    Momentum { lr: f32, mu: f32 },
}

impl Dense {
    fn state(self, len: usize) -> Vec<f32> {
        match self {
            Dense::Adagrad { init, .. } => vec![init; len],
            Dense::Momentum { .. } => vec![0.0; len],
        }
    }

    fn step(self, w: &mut [f32], state: &mut [f32], g: &[f32]) {
        for ((w, s), &g) in w.iter_mut().zip(state.iter_mut()).zip(g) {
            match self {
                Dense::Adagrad { lr, eps, .. } => {
                    *s += g * g;
                    *w -= lr * g / (*s + eps).sqrt();
                }
                Dense::Momentum { lr, mu } => {
                    *s = mu * *s - lr * g;
                    *w += *s;
                }
            }
        }
    }
}

/// The magnitude of the targets and updates: weights that cancel below it
/// are compared at this scale.
const SCALE: f32 = 0.1;

/// Trains a two-feature model that shares one table: each feature's output
/// is pulled towards a target (loss ½‖out − target‖², so G = out − target),
/// through the layer and densely, and compares outputs at every step and
/// the whole table at the end.
fn shared_table_equals_dense<O: SparseOptimizer>(
    optimizer: O,
    dense: Dense,
    rows: usize,
    dim: usize,
    batches: &[(Vec<u32>, Vec<u32>)],
) {
    let table = EmbeddingTable::new(rows, dim, Init::default(), 3).unwrap();
    let mut w = table.to_vec();
    let mut state = dense.state(rows * dim);
    let mut layer = Embedding::new(table, optimizer);
    let target = |n: usize, salt: f32| -> Vec<f32> {
        (0..n * dim)
            .map(|i| ((i as f32 * 0.37 + salt).sin()) * 0.1)
            .collect()
    };
    for (step, (a, b)) in batches.iter().enumerate() {
        let out_a = layer.forward(a).unwrap();
        let out_b = layer.forward(b).unwrap();
        let ids_a: Vec<usize> = a.iter().map(|&i| i as usize).collect();
        let ids_b: Vec<usize> = b.iter().map(|&i| i as usize).collect();
        let (oh_a, oh_b) = (onehot(&ids_a, rows), onehot(&ids_b, rows));
        let dense_a = matmul(&oh_a, &w, a.len(), rows, dim);
        let dense_b = matmul(&oh_b, &w, b.len(), rows, dim);
        assert_close_scaled(
            &out_a,
            &dense_a,
            1e-5,
            SCALE,
            &format!("step {step} feature a"),
        );
        assert_close_scaled(
            &out_b,
            &dense_b,
            1e-5,
            SCALE,
            &format!("step {step} feature b"),
        );

        let (t_a, t_b) = (target(a.len(), 0.5), target(b.len(), 1.5));
        let g_a: Vec<f32> = out_a.iter().zip(&t_a).map(|(o, t)| o - t).collect();
        let g_b: Vec<f32> = out_b.iter().zip(&t_b).map(|(o, t)| o - t).collect();
        layer.backward(a, &g_a).unwrap();
        layer.backward(b, &g_b).unwrap();
        layer.step().unwrap();

        let mut g = matmul(&transpose(&oh_a, a.len(), rows), &g_a, rows, a.len(), dim);
        let g2 = matmul(&transpose(&oh_b, b.len(), rows), &g_b, rows, b.len(), dim);
        g.iter_mut().zip(&g2).for_each(|(x, y)| *x += y);
        dense.step(&mut w, &mut state, &g);
    }
    layer.flush().unwrap();
    assert_close_scaled(
        &layer.table().to_vec(),
        &w,
        1e-5,
        SCALE,
        "table after training",
    );
}

fn two_feature_batches(rows: usize) -> impl Strategy<Value = Vec<(Vec<u32>, Vec<u32>)>> {
    let ids = prop::collection::vec(0..rows as u32, 0..24);
    prop::collection::vec((ids.clone(), ids), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn shared_table_with_adagrad_equals_dense(
        (rows, dim, batches) in (1usize..40, 1usize..20)
            .prop_flat_map(|(r, d)| (Just(r), Just(d), two_feature_batches(r)))
    ) {
        let config = AdagradConfig { lr: 0.1, ..AdagradConfig::keras() };
        let dense = Dense::Adagrad { lr: 0.1, init: config.initial_accumulator_value, eps: config.epsilon };
        shared_table_equals_dense(Adagrad::new(config), dense, rows, dim, &batches);
    }

    #[test]
    fn shared_table_with_dense_exact_momentum_equals_dense(
        (rows, dim, batches) in (1usize..40, 1usize..20)
            .prop_flat_map(|(r, d)| (Just(r), Just(d), two_feature_batches(r)))
    ) {
        // Rows absent from a batch keep moving with their momentum, so the
        // outputs only match if `forward` catches rows up first.
        let config = SgdConfig { lr: 0.1, momentum: 0.9, semantics: Semantics::DenseExact, ..SgdConfig::keras() };
        shared_table_equals_dense(Sgd::new(config), Dense::Momentum { lr: 0.1, mu: 0.9 }, rows, dim, &batches);
    }
}

fn layer_with(options: EmbeddingOptions) -> Embedding<Adagrad> {
    let table = EmbeddingTable::new(10, 4, Init::default(), 11).unwrap();
    let optimizer = Adagrad::new(AdagradConfig {
        lr: 0.5,
        ..AdagradConfig::keras()
    });
    Embedding::with_options(table, optimizer, options).unwrap()
}

fn state_row(layer: &Embedding<Adagrad>, row: usize) -> Vec<f32> {
    let state = layer.optimizer().state();
    let acc = &state.arrays[0];
    let dim = layer.table().dim();
    acc.values[row * dim..][..dim].to_vec()
}

#[test]
fn padding_row_never_changes() {
    let padding = 7;
    let mut layer = layer_with(EmbeddingOptions {
        padding_idx: Some(padding),
        ..Default::default()
    });
    assert!(layer.table().row(padding).iter().all(|&x| x == 0.0));
    let ids: Vec<i64> = vec![7, 1, 7, 2, 3, 7];
    for _ in 0..20 {
        let out = layer.forward(&ids).unwrap();
        assert!(out[..4].iter().all(|&x| x == 0.0), "padding looks up zeros");
        layer.backward(&ids, &vec![1.0; out.len()]).unwrap();
        assert!(!layer.grad().rows().contains(&padding));
        layer.step().unwrap();
    }
    assert_bits_eq(layer.table().row(padding), &[0.0; 4], "padding row");
    assert_bits_eq(&state_row(&layer, padding), &[0.1; 4], "padding state");
    assert_ne!(state_row(&layer, 1), vec![0.1; 4], "other rows train");

    // A batch of only padding ids is an Ok no-op.
    let before = layer.table().clone();
    let only: Vec<i64> = vec![7, 7];
    let out = layer.forward(&only).unwrap();
    layer.backward(&only, &out).unwrap();
    layer.step().unwrap();
    assert_eq!(layer.table(), &before);
}

#[test]
fn pooled_outputs_ignore_padding_ids() {
    let mut layer = layer_with(EmbeddingOptions {
        padding_idx: Some(0),
        ..Default::default()
    });
    let with_padding: Vec<u32> = vec![0, 3, 4, 0, 0, 5, 0];
    let offsets = [0, 3, 4, 7];
    let without: Vec<u32> = vec![3, 4, 5];
    let offsets_without = [0, 2, 2, 3];
    for pooling in [Pooling::Sum, Pooling::Mean, Pooling::SqrtN, Pooling::Max] {
        let mut got = vec![9.0; 3 * 4];
        let bags = Bags::new(&with_padding, &offsets, None).unwrap();
        layer.forward_pooled(&bags, pooling, &mut got).unwrap();
        let want = layer
            .table()
            .pooled_lookup_vec(
                &Bags::new(&without, &offsets_without, None).unwrap(),
                pooling,
            )
            .unwrap();
        assert_bits_eq(&got, &want, &format!("{pooling:?}"));
        // The bag of padding only is a zero row, not NaN.
        assert!(got[4..8].iter().all(|&x| x == 0.0));
    }
    let bags = Bags::new(&with_padding, &offsets, None).unwrap();
    layer
        .backward_pooled(&bags, Pooling::Mean, &[1.0; 12])
        .unwrap();
    let mut rows = layer.grad().rows().to_vec();
    rows.sort();
    assert_eq!(rows, [3, 4, 5]);
}

#[test]
fn out_of_range_error_names_the_id_and_changes_nothing() {
    let mut layer = layer_with(EmbeddingOptions::default());
    let before = layer.table().clone();
    let ids: Vec<i64> = vec![1, 10, 2];
    let mut out = vec![5.0; 12];
    let err = layer.forward_into(&ids, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            Error::IndexOutOfRange {
                position: 1,
                index: 10,
                rows: 10
            }
        ),
        "{err}"
    );
    assert!(out.iter().all(|&x| x == 5.0));
    let err = layer.backward(&ids, &[1.0; 12]).unwrap_err();
    assert!(matches!(err, Error::IndexOutOfRange { position: 1, .. }));
    let bags = Bags::new(&ids, &[0, 3], None).unwrap();
    assert!(
        layer
            .forward_pooled(&bags, Pooling::Sum, &mut out[..4])
            .is_err()
    );
    assert!(
        layer
            .backward_pooled(&bags, Pooling::Sum, &[1.0; 4])
            .is_err()
    );
    assert!(layer.grad().is_empty());
    layer.step().unwrap();
    assert_eq!(layer.table(), &before);
}

#[test]
fn out_of_range_zero_looks_up_zeros_without_gradient() {
    let mut layer = layer_with(EmbeddingOptions {
        out_of_range: OutOfRange::Zero,
        ..Default::default()
    });
    let ids: Vec<i64> = vec![2, -5, 12, 3];
    let out = layer.forward(&ids).unwrap();
    assert_eq!(&out[..4], layer.table().row(2));
    assert!(out[4..12].iter().all(|&x| x == 0.0));
    assert_eq!(&out[12..], layer.table().row(3));
    layer.backward(&ids, &[1.0; 16]).unwrap();
    assert_eq!(layer.grad().rows(), &[2, 3]);
    // Pooled: the out-of-range ids are left out of the bag (Mean over 2).
    let bags = Bags::new(&ids, &[0, 4], None).unwrap();
    let mut pooled = vec![0.0; 4];
    layer
        .forward_pooled(&bags, Pooling::Mean, &mut pooled)
        .unwrap();
    let want: Vec<f32> = (0..4)
        .map(|k| (layer.table().row(2)[k] + layer.table().row(3)[k]) * 0.5)
        .collect();
    assert_close(&pooled, &want, 1e-6, "mean without the dropped ids");
}

#[test]
fn out_of_range_modulo_hashes_and_rejects_negatives() {
    let mut layer = layer_with(EmbeddingOptions {
        out_of_range: OutOfRange::Modulo,
        ..Default::default()
    });
    let out = layer.forward(&[23u64, 4]).unwrap();
    assert_eq!(&out[..4], layer.table().row(3));
    layer.backward(&[23u64, 13], &[1.0; 8]).unwrap();
    assert_eq!(layer.grad().rows(), &[3]);
    assert_eq!(layer.grad().row_grad(0), &[2.0; 4]);
    let err = layer.forward(&[1i32, -3]).unwrap_err();
    assert!(matches!(
        err,
        Error::IndexOutOfRange {
            position: 1,
            index: -3,
            ..
        }
    ));
    let bags = Bags::new(&[23u64, 4], &[0, 2], None).unwrap();
    let mut pooled = vec![0.0; 4];
    layer
        .forward_pooled(&bags, Pooling::Sum, &mut pooled)
        .unwrap();
    let want: Vec<f32> = (0..4)
        .map(|k| layer.table().row(3)[k] + layer.table().row(4)[k])
        .collect();
    assert_bits_eq(&pooled, &want, "pooled modulo");
}

#[test]
fn out_of_range_default_row_is_used_and_trained() {
    let mut layer = layer_with(EmbeddingOptions {
        out_of_range: OutOfRange::DefaultRow(9),
        ..Default::default()
    });
    let ids: Vec<i64> = vec![-1, 100, 5];
    let out = layer.forward(&ids).unwrap();
    assert_eq!(&out[..4], layer.table().row(9));
    assert_eq!(&out[4..8], layer.table().row(9));
    layer.backward(&ids, &[1.0; 12]).unwrap();
    assert_eq!(layer.grad().rows(), &[9, 5]);
    assert_eq!(layer.grad().row_grad(0), &[2.0; 4]);
    let bad = Embedding::with_options(
        EmbeddingTable::zeros(3, 2).unwrap(),
        Sgd::default(),
        EmbeddingOptions {
            out_of_range: OutOfRange::DefaultRow(3),
            ..Default::default()
        },
    );
    assert!(matches!(bad, Err(Error::InvalidConfig { .. })));
}

#[test]
fn frozen_layer_never_changes() {
    let mut layer = layer_with(EmbeddingOptions {
        trainable: false,
        ..Default::default()
    });
    let before = layer.table().clone();
    let ids: Vec<u32> = vec![1, 2, 3, 1];
    for _ in 0..5 {
        let out = layer.forward(&ids).unwrap();
        layer.backward(&ids, &out).unwrap();
        let bags = Bags::fixed(&ids, 2).unwrap();
        layer
            .backward_pooled(&bags, Pooling::Sum, &[1.0; 8])
            .unwrap();
        layer.step().unwrap();
    }
    assert_eq!(layer.table(), &before);
    // Bad input is still reported.
    assert!(layer.backward(&[1u32], &[f32::NAN; 4]).is_err());
}

#[test]
fn max_norm_bounds_updated_rows_only() {
    let max_norm = 0.05;
    let table = EmbeddingTable::new(
        20,
        8,
        Init::Normal {
            mean: 0.0,
            std: 1.0,
        },
        5,
    )
    .unwrap();
    let before = table.clone();
    let mut layer = Embedding::with_options(
        table,
        Sgd::new(SgdConfig {
            lr: 0.01,
            ..SgdConfig::keras()
        }),
        EmbeddingOptions {
            max_norm: Some(max_norm),
            ..Default::default()
        },
    )
    .unwrap();
    let ids: Vec<u32> = vec![1, 4, 4, 9];
    let out = layer.forward(&ids).unwrap();
    // A lookup never writes: the rows are still above the bound here.
    assert_eq!(layer.table(), &before);
    layer.backward(&ids, &out).unwrap();
    layer.step().unwrap();
    for r in 0..20 {
        let row = layer.table().row(r);
        let norm = row.iter().map(|&x| x * x).sum::<f32>().sqrt();
        if [1, 4, 9].contains(&r) {
            assert!(norm <= max_norm * 1.0001, "row {r} norm {norm}");
        } else {
            assert_eq!(row, before.row(r), "untouched row {r}");
        }
    }
}

#[test]
fn invalid_options_are_rejected() {
    let table = || EmbeddingTable::zeros(3, 2).unwrap();
    for options in [
        EmbeddingOptions {
            padding_idx: Some(3),
            ..Default::default()
        },
        EmbeddingOptions {
            max_norm: Some(0.0),
            ..Default::default()
        },
        EmbeddingOptions {
            max_norm: Some(f32::NAN),
            ..Default::default()
        },
    ] {
        let err = Embedding::with_options(table(), Sgd::default(), options).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{options:?}");
    }
}

#[test]
fn mask_marks_nonzero_ids() {
    let layer = layer_with(EmbeddingOptions::default());
    assert_eq!(layer.mask(&[0i64, 3, 0, 9]), [false, true, false, true]);
}

#[test]
fn keras_embedding_1000_by_64_over_a_32_by_10_batch() {
    // keras.layers.Embedding(1000, 64) on a (32, 10) integer batch.
    let table = EmbeddingTable::new(1000, 64, Init::default(), 0).unwrap();
    let mut layer = Embedding::new(table, Sgd::default());
    let batch: Vec<i64> = (0..32 * 10).map(|i| (i * 37) % 1000).collect();
    let out = layer.forward(&batch).unwrap();
    assert_eq!(out.len(), 32 * 10 * 64);
    assert!(out.iter().all(|x| (-0.05..0.05).contains(x)));
}

#[test]
fn keras_embedding_from_a_given_matrix() {
    // Embedding(3, 2, embeddings_initializer=Constant(matrix)).
    let matrix = [0.0, 0.1, 1.0, 1.1, 2.0, 2.1];
    let table = EmbeddingTable::from_rows(3, 2, &matrix).unwrap();
    let mut layer = Embedding::new(table, Sgd::default());
    let out = layer.forward(&[1u32, 2, 2, 1, 2, 0]).unwrap();
    assert_eq!(
        out,
        [1.0, 1.1, 2.0, 2.1, 2.0, 2.1, 1.0, 1.1, 2.0, 2.1, 0.0, 0.1]
    );
}

#[test]
fn every_policy_routes_pooled_gradients_to_the_rows_it_looked_up() {
    // Bag 0: [4, 23, -2]; bag 1: [7]. Rows 10.
    let ids: Vec<i64> = vec![4, 23, -2, 7];
    let offsets = [0, 3, 4];
    let cases: [(OutOfRange, &[usize]); 3] = [
        (OutOfRange::Zero, &[4, 7]),
        (OutOfRange::DefaultRow(0), &[4, 0, 7]),
        (OutOfRange::Modulo, &[]), // -2 is an error even under Modulo
    ];
    for (policy, want_rows) in cases {
        let mut layer = layer_with(EmbeddingOptions {
            out_of_range: policy,
            ..Default::default()
        });
        let bags = Bags::new(&ids, &offsets, None).unwrap();
        let result = layer.backward_pooled(&bags, Pooling::Sum, &[1.0; 8]);
        if want_rows.is_empty() {
            assert!(matches!(
                result,
                Err(Error::IndexOutOfRange { position: 2, .. })
            ));
            assert!(layer.grad().is_empty());
            continue;
        }
        result.unwrap();
        assert_eq!(layer.grad().rows(), want_rows, "{policy:?}");
        if let OutOfRange::DefaultRow(_) = policy {
            // Two ids of bag 0 fell back to row 0: it gets both gradients.
            assert_eq!(layer.grad().row_grad(1), &[2.0; 4]);
        }
    }
}

#[test]
fn a_boxed_optimizer_chosen_at_run_time_trains() {
    use embtable::{RmsProp, SparseOptimizer};
    for name in ["sgd", "adagrad", "rmsprop"] {
        let optimizer: Box<dyn SparseOptimizer> = match name {
            "sgd" => Box::new(Sgd::default()),
            "adagrad" => Box::new(Adagrad::default()),
            _ => Box::new(RmsProp::default()),
        };
        let table = EmbeddingTable::new(5, 3, Init::default(), 1).unwrap();
        let before = table.clone();
        let mut layer = Embedding::new(table, optimizer);
        layer.backward(&[2u32], &[1.0; 3]).unwrap();
        layer.step().unwrap();
        assert_ne!(layer.table().row(2), before.row(2), "{name}");
        assert_eq!(layer.table().row(1), before.row(1), "{name}");
    }
}

#[test]
fn rejected_pooled_forward_does_not_catch_rows_up() {
    let config = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        semantics: Semantics::DenseExact,
        ..SgdConfig::keras()
    };
    let table = EmbeddingTable::new(6, 3, Init::default(), 2).unwrap();
    let mut layer = Embedding::new(table, Sgd::new(config));
    layer.backward(&[1u32, 2], &[1.0; 6]).unwrap();
    layer.step().unwrap();
    layer.backward(&[3u32], &[1.0; 3]).unwrap();
    layer.step().unwrap(); // rows 1 and 2 now lag one step
    let before = layer.table().clone();
    let ids = [1u32, 2];
    let weights = [0.5f32, 0.5];
    let bags = Bags::new(&ids, &[0, 2], Some(&weights)).unwrap();
    let mut out = vec![0.0; 3];
    assert!(layer.forward_pooled(&bags, Pooling::Max, &mut out).is_err());
    assert!(
        layer
            .forward_pooled(&bags, Pooling::Sum, &mut out[..2])
            .is_err()
    );
    assert_eq!(layer.table(), &before, "a rejected call wrote the table");
    layer.forward_pooled(&bags, Pooling::Sum, &mut out).unwrap();
    assert_ne!(
        layer.table(),
        &before,
        "a valid call catches rows 1 and 2 up"
    );
}
