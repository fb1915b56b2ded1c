//! Everyday Keras and PyTorch scenarios ported to embtable, written as their
//! users would write them: a layer changed after it is built, pretrained
//! vectors, n-d batches, PyTorch's pooled conventions and `max_norm`.

mod common;

use std::collections::HashMap;

use common::{Scratch, assert_bits_eq, fixture};
use embtable::io::{self, Pretrained, TableOptions};
use embtable::{
    Adagrad, AdagradConfig, Bags, Embedding, EmbeddingOptions, EmbeddingTable, Error, Frozen, Init,
    MaxNormAt, Pooling, Semantics, Sgd, SgdConfig, SparseOptimizer, Tensor, Vocab,
};

fn table(rows: usize, dim: usize) -> EmbeddingTable {
    EmbeddingTable::new(
        rows,
        dim,
        Init::Normal {
            mean: 0.0,
            std: 0.5,
        },
        3,
    )
    .unwrap()
}

// ------------------------------------------- a layer changed after it is built

#[test]
fn keras_fine_tuning_unfreezes_a_frozen_layer() {
    // layer.trainable = False; model.fit(...); layer.trainable = True; model.fit(...)
    let start = table(20, 4);
    let mut layer = Embedding::new(start.clone(), Adagrad::default());
    layer.set_trainable(false).unwrap();
    let ids: Vec<i64> = vec![3, 5, 3];
    for _ in 0..3 {
        let out = layer.forward(&ids).unwrap();
        layer.backward(&ids, &out).unwrap();
        layer.step().unwrap();
    }
    assert_eq!(layer.table(), &start, "a frozen layer trained");

    layer.set_trainable(true).unwrap();
    let out = layer.forward(&ids).unwrap();
    layer.backward(&ids, &out).unwrap();
    layer.step().unwrap();
    assert_ne!(layer.table().row(3), start.row(3));
    assert_ne!(layer.table().row(5), start.row(5));
    assert_eq!(layer.table().row(4), start.row(4));
}

#[test]
fn freezing_with_a_pending_gradient_is_refused_not_lost() {
    let mut layer = Embedding::new(table(10, 2), Sgd::default());
    layer.backward(&[1u32, 2], &[1.0; 4]).unwrap();
    let err = layer.set_trainable(false).unwrap_err();
    assert!(
        err.to_string().contains("gradient for 2 rows is pending"),
        "{err}"
    );
    assert!(
        layer.options().trainable,
        "the refused call changed the layer"
    );
    assert_eq!(layer.grad().len(), 2);
    // Dropping it is a choice the user makes.
    layer.clear_grad();
    layer.set_trainable(false).unwrap();
    assert!(!layer.options().trainable);
}

#[test]
fn rows_are_edited_in_place() {
    // with torch.no_grad(): emb.weight[3] = v
    let mut layer = Embedding::with_options(
        table(6, 3),
        Sgd::default(),
        EmbeddingOptions {
            padding_idx: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    layer
        .table_mut()
        .row_mut(3)
        .copy_from_slice(&[1.0, 2.0, 3.0]);
    layer
        .table_mut()
        .row_mut(0)
        .copy_from_slice(&[9.0, 9.0, 9.0]);
    let out = layer.forward(&[3u32, 0]).unwrap();
    assert_eq!(
        out,
        [1.0, 2.0, 3.0, 0.0, 0.0, 0.0],
        "padding still looks up zeros"
    );
}

#[test]
fn the_learning_rate_changes_between_steps() {
    let mut layer = Embedding::new(
        EmbeddingTable::zeros(3, 1).unwrap(),
        Sgd::new(SgdConfig {
            lr: 0.1,
            ..Default::default()
        }),
    );
    layer.backward(&[1u32], &[1.0]).unwrap();
    layer.step().unwrap();
    assert_eq!(layer.table().row(1), &[-0.1]);
    *layer.optimizer_mut() = Sgd::new(SgdConfig {
        lr: 0.5,
        ..Default::default()
    });
    layer.backward(&[1u32], &[1.0]).unwrap();
    layer.step().unwrap();
    assert_eq!(layer.table().row(1), &[-0.6]);
}

#[test]
fn into_parts_hands_back_the_pending_gradient() {
    let mut layer = Embedding::new(EmbeddingTable::zeros(4, 2).unwrap(), Sgd::default());
    layer.backward(&[2u32, 2], &[1.0; 4]).unwrap();
    let (mut table, mut sgd, grad) = layer.into_parts();
    assert_eq!(grad.rows(), &[2]);
    assert_eq!(grad.row_grad(0), &[2.0, 2.0]);
    sgd.step(&mut table, &grad).unwrap();
    assert_eq!(table.row(2), &[-0.02, -0.02]);
}

#[test]
fn options_change_after_building_and_bad_ones_change_nothing() {
    let mut layer = Embedding::new(table(8, 4), Adagrad::default());
    let before = layer.table().clone();
    for (bad, field) in [
        (
            EmbeddingOptions {
                padding_idx: Some(8),
                ..Default::default()
            },
            "padding_idx",
        ),
        (
            EmbeddingOptions {
                max_norm: Some(-1.0),
                ..Default::default()
            },
            "max_norm",
        ),
    ] {
        let err = layer.set_options(bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { field: f, .. } if f == field),
            "{err}"
        );
        assert_eq!(layer.options(), &EmbeddingOptions::default());
        assert_eq!(layer.table(), &before);
    }
    // A pending gradient on the row about to become padding is refused.
    layer.backward(&[5u32], &[1.0; 4]).unwrap();
    let padding_5 = EmbeddingOptions {
        padding_idx: Some(5),
        ..Default::default()
    };
    let err = layer.set_options(padding_5).unwrap_err();
    assert!(
        err.to_string().contains("gradient for 1 row is pending"),
        "{err}"
    );
    layer.step().unwrap();
    layer.set_options(padding_5).unwrap();
    assert_eq!(layer.table().row(5), &[0.0; 4]);
    assert_eq!(layer.mask(&[5u32]), [true], "mask_zero is about id 0 only");
}

#[test]
fn a_row_made_padding_stays_zero_under_dense_exact_momentum() {
    let config = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        semantics: Semantics::DenseExact,
        ..Default::default()
    };
    let mut layer = Embedding::new(table(6, 3), Sgd::new(config));
    layer.backward(&[2u32, 4], &[1.0; 6]).unwrap();
    layer.step().unwrap(); // row 2 now has momentum
    layer.backward(&[4u32], &[1.0; 3]).unwrap();
    layer.step().unwrap(); // and lags one step
    layer
        .set_options(EmbeddingOptions {
            padding_idx: Some(2),
            ..Default::default()
        })
        .unwrap();
    for _ in 0..3 {
        layer.backward(&[4u32, 2], &[1.0; 6]).unwrap();
        layer.step().unwrap();
    }
    layer.flush().unwrap();
    assert_bits_eq(layer.table().row(2), &[0.0; 3], "padding row after flush");
}

/// Every optimizer whose rows lag: the row made padding stays exactly zero
/// through later steps and the catch-up (FTRL recomputes a row from its
/// accumulators, so its padding state must be the state that gives 0).
#[test]
fn a_row_made_padding_stays_zero_under_every_lagging_optimizer() {
    use embtable::{
        Adam, AdamConfig, AdamW, AdamWConfig, Ftrl, FtrlConfig, RmsProp, RmsPropConfig,
        SparseOptimizer,
    };
    let optimizers: Vec<(&str, Box<dyn SparseOptimizer>)> = vec![
        ("adam", Box::new(Adam::new(AdamConfig::keras()))),
        ("adamw", Box::new(AdamW::new(AdamWConfig::keras()))),
        (
            "rmsprop",
            Box::new(RmsProp::new(RmsPropConfig {
                momentum: 0.9,
                centered: true,
                ..RmsPropConfig::keras()
            })),
        ),
        ("ftrl", Box::new(Ftrl::new(FtrlConfig::keras()))),
        (
            "ftrl shrinkage",
            Box::new(Ftrl::new(FtrlConfig {
                l2_shrinkage_regularization_strength: 0.1,
                l1_regularization_strength: 0.01,
                ..FtrlConfig::keras()
            })),
        ),
    ];
    for (name, optimizer) in optimizers {
        let mut layer = Embedding::new(table(6, 3), optimizer);
        layer.backward(&[2u32, 4], &[1.0; 6]).unwrap();
        layer.step().unwrap();
        layer.backward(&[4u32], &[1.0; 3]).unwrap();
        layer.step().unwrap(); // row 2 has state and lags one step
        layer
            .set_options(EmbeddingOptions {
                padding_idx: Some(2),
                ..Default::default()
            })
            .unwrap();
        for _ in 0..3 {
            layer.backward(&[4u32, 2], &[1.0; 6]).unwrap();
            layer.step().unwrap();
        }
        layer.flush().unwrap();
        assert_bits_eq(layer.table().row(2), &[0.0; 3], name);
        assert!(
            layer.table().to_vec().iter().all(|x| x.is_finite()),
            "{name}"
        );
    }
}

// ------------------------------------------------- a layer without optimizer

#[test]
fn a_frozen_layer_needs_no_optimizer() {
    let start = table(10, 4);
    let mut layer = Embedding::frozen(start.clone());
    let ids: Vec<i64> = vec![1, 9, 1];
    let out = layer.forward(&ids).unwrap();
    assert_eq!(&out[4..8], start.row(9));
    layer.backward(&ids, &out).unwrap();
    layer.step().unwrap();
    assert_eq!(layer.table(), &start);
    // Bad input is still an error.
    assert!(layer.forward(&[10u32]).is_err());

    // Unfreezing needs an optimizer: set_trainable alone says how.
    let err = layer.set_trainable(true).unwrap_err();
    assert!(err.to_string().contains("Embedding::unfreeze"), "{err}");

    let mut layer = layer.unfreeze(Adagrad::new(AdagradConfig {
        lr: 0.1,
        ..Default::default()
    }));
    layer.backward(&ids, &out).unwrap();
    layer.step().unwrap();
    assert_ne!(layer.table().row(1), start.row(1));
    assert_eq!(layer.table().row(2), start.row(2));
}

#[test]
fn training_with_the_frozen_optimizer_is_an_error_that_keeps_the_gradient() {
    let mut layer = Embedding::new(table(4, 2), Frozen);
    layer.backward(&[1u32], &[1.0; 2]).unwrap();
    let err = layer.step().unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "optimizer",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("for 1 row"), "{err}");
    assert_eq!(layer.grad().len(), 1);
}

// ------------------------------------------------------- pretrained vectors

#[test]
fn torch_from_pretrained_freezes_by_default() {
    // emb = nn.Embedding.from_pretrained(weight)
    let weight = EmbeddingTable::from_rows(2, 3, &[1.0, 2.3, 3.0, 4.0, 5.1, 6.3]).unwrap();
    let mut emb = Embedding::from_pretrained(weight.clone(), None).unwrap();
    assert_eq!(emb.forward(&[1i64]).unwrap(), [4.0, 5.1, 6.3]);
    emb.backward(&[1i64], &[1.0; 3]).unwrap();
    emb.step().unwrap();
    assert_eq!(emb.table(), &weight);

    // nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=0)
    let mut emb = Embedding::from_pretrained(weight.clone(), Some(0))
        .unwrap()
        .unfreeze(Sgd::default());
    assert_eq!(emb.forward(&[0i64]).unwrap(), [0.0; 3]);
    emb.backward(&[0i64, 1], &[1.0; 6]).unwrap();
    emb.step().unwrap();
    assert_eq!(emb.table().row(0), &[0.0; 3], "padding never trains");
    assert_ne!(emb.table().row(1), weight.row(1));

    let err = Embedding::from_pretrained(weight, Some(2)).unwrap_err();
    assert!(
        err.to_string()
            .contains("row 2 is not below the table's 2 rows"),
        "{err}"
    );
}

#[test]
fn keras_glove_recipe_in_one_call() {
    // embeddings_index = {word: vector for line in open("glove.txt")}
    // embedding_matrix = zeros((num_tokens, dim)); fill the hits;
    // Embedding(num_tokens, dim, weights=[embedding_matrix], trainable=False)
    let glove = io::read_glove(fixture("glove.txt")).unwrap();
    let known: Vec<String> = glove.vocab.words()[..3].to_vec();
    let mut word_index: HashMap<String, usize> = HashMap::new();
    word_index.insert(known[1].clone(), 1);
    word_index.insert("qwzx-not-in-glove".into(), 2);
    word_index.insert(known[0].clone(), 3);
    let options = TableOptions {
        padding_idx: Some(0),
        ..Default::default()
    };
    let (mut layer, coverage) = Embedding::from_vectors(&glove, &word_index, 5, &options).unwrap();
    assert_eq!(
        (coverage.found, coverage.missing, coverage.unnamed_rows),
        (2, 1, 1)
    );
    assert_eq!(
        coverage.first_missing,
        [(2, "qwzx-not-in-glove".to_string())]
    );
    assert!(!layer.options().trainable);
    assert_eq!(layer.options().padding_idx, Some(0));
    let out = layer.forward(&[3u32, 1, 2, 0]).unwrap();
    let dim = glove.dim();
    assert_eq!(&out[..dim], glove.vector(&known[0]).unwrap());
    assert_eq!(&out[dim..2 * dim], glove.vector(&known[1]).unwrap());
    assert!(out[2 * dim..].iter().all(|&x| x == 0.0));
}

#[test]
fn vocab_iter_feeds_table_for_in_the_same_order() {
    let pretrained = io::read_word2vec(fixture("w2v.txt"), io::Word2VecFormat::Text).unwrap();
    let n = pretrained.vocab.len();
    let (same, coverage) = pretrained
        .table_for(pretrained.vocab.iter(), n, &TableOptions::default())
        .unwrap();
    assert_eq!(same, pretrained.table);
    assert_eq!((coverage.found, coverage.missing), (n, 0));
    for (word, row) in &pretrained.vocab {
        assert_eq!(pretrained.vocab.word(row), Some(word));
    }

    // My own vocabulary, in another order, with a word the vectors lack.
    let mut words: Vec<&str> = pretrained
        .vocab
        .words()
        .iter()
        .map(String::as_str)
        .collect();
    words.reverse();
    words.push("zzz-unknown");
    let mine = Vocab::from_words(words.iter().copied()).unwrap();
    let (table, coverage) = pretrained
        .table_for(&mine, mine.len(), &TableOptions::default())
        .unwrap();
    assert_eq!((coverage.found, coverage.missing), (n, 1));
    for (word, row) in mine.iter().take(n) {
        assert_eq!(Some(table.row(row)), pretrained.vector(word), "{word}");
    }
}

#[test]
fn a_frozen_pretrained_layer_saved_as_a_plain_tensor_loads_back() {
    let dir = Scratch::new("porting-pretrained");
    let weight = table(5, 3);
    let path = dir.path("weight.safetensors");
    io::save_table_safetensors(&path, "weight", &weight).unwrap();
    let loaded = io::load_table_safetensors(&path, "weight").unwrap();
    let mut layer = Embedding::from_pretrained(loaded, None).unwrap();
    assert_eq!(layer.forward(&[4u8 as u32]).unwrap(), weight.row(4));
    let pretrained = Pretrained::new(
        Vocab::from_words(["a", "b", "c", "d", "e"]).unwrap(),
        weight,
    )
    .unwrap();
    assert_eq!(pretrained.vector("e"), Some(layer.table().row(4)));
}

// ------------------------------------------------ PyTorch pooled conventions

#[test]
fn embedding_bag_offsets_without_the_last_one() {
    // EmbeddingBag(10, 3, mode="sum")(input, offsets) with torch's default
    // include_last_offset=False: one start per bag.
    let table = table(10, 3);
    let input: Vec<i64> = vec![1, 2, 4, 5, 4, 3, 2, 9];
    let starts = [0, 4];
    let bags = Bags::from_starts(&input, &starts, None).unwrap();
    assert_eq!(bags.len(), 2);
    let got = table.pooled_lookup_vec(&bags, Pooling::Sum).unwrap();
    let csr = Bags::new(&input, &[0, 4, 8], None).unwrap();
    assert_eq!(got, table.pooled_lookup_vec(&csr, Pooling::Sum).unwrap());

    // The same offsets given to the CSR constructor: the error says what to do.
    let err = Bags::new(&input, &starts, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("Bags::from_starts"), "{msg}");
    assert!(msg.contains("include_last_offset=False"), "{msg}");

    // Bad starts are named by position and value.
    let err = Bags::from_starts(&input, &[0, 9], None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidOffsets {
                position: 1,
                value: 9,
                ..
            }
        ),
        "{err}"
    );
    let err = Bags::from_starts(&input, &[1, 4], None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidOffsets {
                position: 0,
                value: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(Bags::from_starts(&input, &[], None).is_err());
    assert_eq!(
        Bags::from_starts(&[] as &[i64], &[], None).unwrap().len(),
        0
    );
    // Weighted, with an empty bag in the middle and at the end.
    let w = [0.5f32; 8];
    let bags = Bags::from_starts(&input, &[0, 3, 3, 8], Some(&w)).unwrap();
    assert_eq!(bags.offsets(), &[0, 3, 3, 8, 8]);
}

// ---------------------------------------------------------------- max_norm

fn norm(row: &[f32]) -> f32 {
    row.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[test]
fn torch_max_norm_renormalises_looked_up_rows_in_forward() {
    // nn.Embedding(20, 8, max_norm=1.0): forward rescales the rows it looks
    // up, in the weight itself; other rows are left alone.
    let start = EmbeddingTable::new(
        20,
        8,
        Init::Normal {
            mean: 0.0,
            std: 2.0,
        },
        9,
    )
    .unwrap();
    let mut layer = Embedding::with_options(
        start.clone(),
        Sgd::default(),
        EmbeddingOptions {
            max_norm: Some(1.0),
            max_norm_at: MaxNormAt::Lookup,
            ..Default::default()
        },
    )
    .unwrap();
    let ids: Vec<i64> = vec![3, 7, 3];
    let out = layer.forward(&ids).unwrap();
    for (j, &id) in ids.iter().enumerate() {
        let row = &out[j * 8..][..8];
        assert!(norm(row) <= 1.0 + 1e-5, "output {j}");
        assert_eq!(row, layer.table().row(id as usize), "the table was written");
        let scale = row[0] / start.row(id as usize)[0];
        for (k, &x) in row.iter().enumerate() {
            assert!(
                (x - start.row(id as usize)[k] * scale).abs() < 1e-6,
                "direction kept"
            );
        }
    }
    for r in (0..20).filter(|r| ![3, 7].contains(r)) {
        assert_eq!(layer.table().row(r), start.row(r));
    }
    // Pooled too (EmbeddingBag(max_norm=...)), and on a frozen layer.
    layer.set_trainable(false).unwrap();
    let bag_ids = [11u32, 12];
    let bags = Bags::new(&bag_ids, &[0, 2], None).unwrap();
    let mut pooled = vec![0.0; 8];
    layer
        .forward_pooled(&bags, Pooling::Sum, &mut pooled)
        .unwrap();
    assert!(norm(layer.table().row(11)) <= 1.0 + 1e-5);
    assert!(norm(layer.table().row(12)) <= 1.0 + 1e-5);
}

#[test]
fn keras_max_norm_constraint_applies_after_the_step_only() {
    // Embedding(20, 8, embeddings_constraint=MaxNorm(1.0))
    let start = EmbeddingTable::new(
        20,
        8,
        Init::Normal {
            mean: 0.0,
            std: 2.0,
        },
        9,
    )
    .unwrap();
    let mut layer = Embedding::with_options(
        start.clone(),
        Sgd::default(),
        EmbeddingOptions {
            max_norm: Some(1.0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(layer.options().max_norm_at, MaxNormAt::Step);
    let out = layer.forward(&[3u32]).unwrap();
    assert_eq!(out, start.row(3), "a Keras lookup writes nothing");
    layer.backward(&[3u32], &[0.0; 8]).unwrap();
    layer.step().unwrap();
    assert!(norm(layer.table().row(3)) <= 1.0 + 1e-5);
    assert_eq!(layer.table().row(4), start.row(4));
}

// ------------------------------------------------------------ n-d batches

#[test]
fn a_batch_by_seq_len_batch_keeps_its_shape() {
    // keras: Embedding(1000, 64, mask_zero=True)(x) with x of shape (32, 10):
    // output (32, 10, 64), mask (32, 10).
    let mut layer = Embedding::new(table(1000, 64), Sgd::default());
    let sequences: Vec<Vec<i64>> = (0..32)
        .map(|b| {
            (0..10)
                .map(|t| {
                    if t < 3 + b % 7 {
                        (b * 10 + t + 1) as i64
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect();
    let ids = Tensor::from_rows(&sequences).unwrap();
    let out = layer.forward_nd(&ids).unwrap();
    assert_eq!(out.shape(), &[32, 10, 64]);
    for b in [0, 5, 31] {
        for t in [0, 2, 9] {
            let id = sequences[b][t] as usize;
            assert_eq!(out.at(&[b, t]), layer.table().row(id), "({b}, {t})");
        }
    }
    let mask = layer.mask_nd(&ids);
    assert_eq!(mask.shape(), &[32, 10]);
    assert_eq!(
        mask.at(&[4]),
        &[
            true, true, true, true, true, true, true, false, false, false
        ]
    );

    // The gradient comes back in the output's shape; another shape is refused.
    let grad = Tensor::new(vec![0.1; out.len()], out.shape()).unwrap();
    layer.backward_nd(&ids, &grad).unwrap();
    assert_eq!(
        layer.grad().len(),
        32 * 10 - sequences.iter().flatten().filter(|&&i| i == 0).count() + 1
    );
    layer.clear_grad();
    let wrong = Tensor::new(vec![0.1; out.len()], [32, 640]).unwrap();
    let err = layer.backward_nd(&ids, &wrong).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 3,
                got: 2,
                ..
            }
        ),
        "{err}"
    );
    let wrong = Tensor::new(vec![0.1; 32 * 10 * 63], [32, 10, 63]).unwrap();
    let err = layer.backward_nd(&ids, &wrong).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 64,
                got: 63,
                ..
            }
        ),
        "{err}"
    );
    assert!(layer.grad().is_empty());

    // Ragged sequences must be padded first.
    let err = Tensor::from_rows(&[vec![1i64, 2], vec![3]]).unwrap_err();
    assert!(
        err.to_string()
            .contains("row 1 holds 1 value and row 0 holds 2"),
        "{err}"
    );
}

#[test]
fn a_three_d_batch_and_an_error_at_a_flat_position() {
    let mut layer = Embedding::new(table(50, 3), Sgd::default());
    let ids = Tensor::new((0..2 * 3 * 4).map(|i| i as u32).collect(), [2, 3, 4]).unwrap();
    let out = layer.forward_nd(&ids).unwrap();
    assert_eq!(out.shape(), &[2, 3, 4, 3]);
    assert_eq!(out.at(&[1, 2, 3]), layer.table().row(23));
    let mut bad = ids.clone();
    bad.as_mut_slice()[13] = 50;
    let err = layer.forward_nd(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            Error::IndexOutOfRange {
                position: 13,
                index: 50,
                ..
            }
        ),
        "{err}"
    );
}

// ------------------------------------------------------- layer checkpoints

#[test]
fn a_saved_layer_resumes_bit_for_bit_with_its_options() {
    let dir = Scratch::new("porting-layer-ckpt");
    let path = dir.path("layer.safetensors");
    let options = EmbeddingOptions {
        padding_idx: Some(0),
        out_of_range: embtable::OutOfRange::DefaultRow(9),
        max_norm: Some(0.7),
        max_norm_at: MaxNormAt::Lookup,
        ..Default::default()
    };
    let config = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        semantics: Semantics::DenseExact,
        ..Default::default()
    };
    let mut layer = Embedding::with_options(table(12, 5), Sgd::new(config), options).unwrap();
    let batches: Vec<Vec<i64>> = (0..8)
        .map(|s| vec![s % 12, (s * 5 + 3) % 12, 40, 0])
        .collect();
    let train = |layer: &mut Embedding<Sgd>, ids: &[i64]| {
        let out = layer.forward(ids).unwrap();
        layer.backward(ids, &out).unwrap();
        layer.step().unwrap();
    };
    for ids in &batches[..4] {
        train(&mut layer, ids);
    }
    // A pending gradient is refused, and the file is not written.
    layer.backward(&batches[4], &[0.1; 20]).unwrap();
    let err = layer.save(&path).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "grad", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("gradient for 3 rows"), "{err}");
    assert!(!path.exists());
    layer.clear_grad();
    layer.save(&path).unwrap();

    let mut resumed = Embedding::load(&path, Sgd::default()).unwrap();
    assert_eq!(resumed.options(), layer.options());
    assert_eq!(resumed.optimizer().config(), layer.optimizer().config());
    for ids in &batches[4..] {
        train(&mut layer, ids);
        train(&mut resumed, ids);
    }
    layer.flush().unwrap();
    resumed.flush().unwrap();
    assert_bits_eq(
        &resumed.table().to_vec(),
        &layer.table().to_vec(),
        "resumed table",
    );
    assert_eq!(resumed.optimizer().state(), layer.optimizer().state());

    // The wrong optimizer kind is named.
    let err = Embedding::load(&path, Adagrad::default()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "kind", .. }),
        "{err}"
    );
}

#[test]
fn a_frozen_layer_round_trips_and_two_layers_share_a_file() {
    let dir = Scratch::new("porting-layer-ckpt2");
    let path = dir.path("model.safetensors");
    let words = Embedding::from_pretrained(table(6, 3), Some(0)).unwrap();
    let mut users = Embedding::new(table(4, 3), Adagrad::default());
    users.backward(&[1u32], &[1.0; 3]).unwrap();
    users.step().unwrap();
    io::Checkpoint::new()
        .with_layer("words", &words)
        .unwrap()
        .with_layer("users", &users)
        .unwrap()
        .save(&path)
        .unwrap();
    let mut ckpt = io::Checkpoint::load(&path).unwrap();
    let words2 = ckpt.restore_layer("words", Frozen).unwrap();
    assert_eq!(words2.table(), words.table());
    assert!(!words2.options().trainable);
    assert_eq!(words2.options().padding_idx, Some(0));
    let users2 = ckpt.restore_layer("users", Adagrad::default()).unwrap();
    assert_eq!(users2.optimizer().state(), users.optimizer().state());
    // Fine-tune the frozen one after loading.
    let mut words3 = words2.unfreeze(Sgd::default());
    words3.backward(&[2u32], &[1.0; 3]).unwrap();
    words3.step().unwrap();
    assert_ne!(words3.table().row(2), words.table().row(2));
    // Embedding::load wants a file of one layer.
    let err = Embedding::load(&path, Frozen).unwrap_err();
    assert!(err.to_string().contains("restore_layer"), "{err}");
}
