//! Checkpoints: training N steps, saving, loading into a fresh table and a
//! fresh optimizer and training M more gives the same bits as N + M steps
//! without stopping, for every optimizer and semantics; the file has the
//! documented layout and Python-written files load; bad input is an error,
//! never a panic; a failed save keeps the previous file.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::{Scratch, fixture};

use embtable::io::{self, Checkpoint};
use embtable::{
    Adagrad, AdagradConfig, EmbeddingTable, EpsPlacement, Error, Init, OptimizerState, RmsProp,
    RmsPropConfig, RowWiseAdagrad, RowWiseAdagradConfig, Semantics, Sgd, SgdConfig, SgdStyle,
    SparseGrad, SparseOptimizer, StateArray,
};
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use workloads::{uniform, values};

// ---------------------------------------------------------------- helpers

fn bits(table: &EmbeddingTable) -> Vec<u32> {
    table.to_vec().iter().map(|x| x.to_bits()).collect()
}

/// Everything in a state, floats as bits (so -0.0 ≠ 0.0 and NaN == NaN).
type StateBits = (
    String,
    Vec<(String, u64)>,
    u64,
    Option<(usize, usize)>,
    Vec<(String, Vec<usize>, Vec<u32>)>,
    Vec<u64>,
    Vec<(u64, u32)>,
);

fn state_bits(s: &OptimizerState) -> StateBits {
    (
        s.kind.clone(),
        s.config
            .iter()
            .map(|(n, v)| (n.clone(), v.to_bits()))
            .collect(),
        s.steps,
        s.shape,
        s.arrays
            .iter()
            .map(|a| {
                let v = a.values.iter().map(|x| x.to_bits()).collect();
                (a.name.clone(), a.shape.clone(), v)
            })
            .collect(),
        s.last_step.clone(),
        s.lr_history
            .iter()
            .map(|&(u, lr)| (u, lr.to_bits()))
            .collect(),
    )
}

/// The batch of step `step`: ids from a window of a quarter of the rows
/// that moves with the step (so rows go missing for several steps, then come
/// back), with duplicates; every ninth step is empty.
fn batch(seed: u64, step: u64, rows: usize, dim: usize) -> (Vec<u32>, Vec<f32>) {
    if step % 9 == 4 {
        return (Vec::new(), Vec::new());
    }
    let window = (rows / 4).max(1);
    let start = (step as usize * 5) % rows;
    let n = 1 + (step as usize * 7) % 13;
    let ids: Vec<u32> = uniform(seed ^ (step << 32), n, window)
        .into_iter()
        .map(|u| ((start + u as usize) % rows) as u32)
        .collect();
    let grads = values(seed.wrapping_add(step), n * dim, -1.0, 1.0);
    (ids, grads)
}

fn train(table: &mut EmbeddingTable, opt: &mut dyn SparseOptimizer, steps: std::ops::Range<u64>) {
    let mut grad = SparseGrad::new(table.dim());
    for step in steps {
        let (ids, grads) = batch(11, step, table.rows(), table.dim());
        grad.clear();
        grad.accumulate_lookup(&ids, &grads).unwrap();
        opt.step(table, &grad).unwrap();
    }
}

/// One optimizer configuration: a name, the configured optimizer and a
/// fresh default one of the same kind.
struct Case {
    name: String,
    make: Box<dyn Fn() -> Box<dyn SparseOptimizer>>,
    fresh: fn() -> Box<dyn SparseOptimizer>,
    dense_exact: bool,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let semantics = [Semantics::Lazy, Semantics::DenseExact];
    for style in [SgdStyle::Keras, SgdStyle::Torch] {
        for sem in semantics {
            for (what, momentum, nesterov, weight_decay) in [
                ("plain", 0.0, false, 0.0),
                ("momentum", 0.9, false, 0.0),
                ("nesterov", 0.9, true, 0.0),
                ("momentum+decay", 0.8, false, 0.01),
                ("nesterov+decay", 0.7, true, 0.02),
                ("decay", 0.0, false, 0.05),
            ] {
                let cfg = SgdConfig {
                    lr: 0.05,
                    momentum,
                    nesterov,
                    weight_decay,
                    semantics: sem,
                    style,
                };
                cases.push(Case {
                    name: format!("sgd {what} {style:?} {sem:?}"),
                    make: Box::new(move || Box::new(Sgd::new(cfg))),
                    fresh: || Box::new(Sgd::default()),
                    dense_exact: sem == Semantics::DenseExact
                        && (momentum > 0.0 || weight_decay > 0.0),
                });
            }
        }
    }
    for sem in semantics {
        for eps_placement in [EpsPlacement::InsideSqrt, EpsPlacement::OutsideSqrt] {
            for (what, centered, momentum) in [
                ("plain", false, 0.0),
                ("centered+momentum", true, 0.9),
                ("momentum", false, 0.5),
            ] {
                let cfg = RmsPropConfig {
                    lr: 0.01,
                    momentum,
                    centered,
                    eps_placement,
                    semantics: sem,
                    ..RmsPropConfig::default()
                };
                cases.push(Case {
                    name: format!("rmsprop {what} {eps_placement:?} {sem:?}"),
                    make: Box::new(move || Box::new(RmsProp::new(cfg))),
                    fresh: || Box::new(RmsProp::default()),
                    dense_exact: sem == Semantics::DenseExact,
                });
            }
        }
    }
    for (what, cfg) in [
        ("keras", AdagradConfig::keras()),
        ("torch", AdagradConfig::torch()),
    ] {
        cases.push(Case {
            name: format!("adagrad {what} {:?}", cfg.eps_placement),
            make: Box::new(move || Box::new(Adagrad::new(cfg))),
            fresh: || Box::new(Adagrad::default()),
            dense_exact: false,
        });
    }
    let cfg = RowWiseAdagradConfig {
        lr: 0.1,
        initial_accumulator_value: 0.25,
        ..RowWiseAdagradConfig::default()
    };
    cases.push(Case {
        name: "rowwise_adagrad".into(),
        make: Box::new(move || Box::new(RowWiseAdagrad::new(cfg))),
        fresh: || Box::new(RowWiseAdagrad::default()),
        dense_exact: false,
    });
    cases
}

// ---------------------------------------------------------------- resuming

#[test]
fn resuming_gives_the_same_bits_as_not_stopping() {
    let dir = Scratch::new("ckpt-resume");
    let path = dir.path("ckpt.safetensors");
    let cases = cases();
    assert_eq!(cases.len(), 24 + 12 + 2 + 1);
    let mut lagging_saves = 0;
    for case in &cases {
        for (rows, dim) in [(40, 19), (9, 1)] {
            for (n, m) in [(0, 4), (1, 3), (13, 11)] {
                let what = format!("{} rows {rows} dim {dim} steps {n}+{m}", case.name);
                let mut table = EmbeddingTable::new(rows, dim, Init::default(), 5).unwrap();
                let mut opt = (case.make)();
                train(&mut table, &mut *opt, 0..n);
                let saved = opt.state();
                if case.dense_exact && n > 10 {
                    // No flush: some rows lag, and must keep lagging.
                    assert!(
                        saved.last_step.iter().any(|&l| l + 3 < saved.steps),
                        "{what}: no lagging row to exercise"
                    );
                    lagging_saves += 1;
                }
                io::save_checkpoint(&path, &table, &*opt).unwrap();
                train(&mut table, &mut *opt, n..n + m);

                let mut resumed = (case.fresh)();
                let mut table2 = io::load_checkpoint(&path, &mut *resumed).unwrap();
                assert_eq!(state_bits(&resumed.state()), state_bits(&saved), "{what}");
                train(&mut table2, &mut *resumed, n..n + m);
                assert_eq!(bits(&table2), bits(&table), "{what}");
                assert_eq!(
                    state_bits(&resumed.state()),
                    state_bits(&opt.state()),
                    "{what}"
                );

                opt.flush(&mut table).unwrap();
                resumed.flush(&mut table2).unwrap();
                assert_eq!(bits(&table2), bits(&table), "{what}: after flush");
            }
        }
    }
    assert_eq!(lagging_saves, 16 * 2);
}

#[test]
fn two_tables_and_a_frozen_one_resume_together() {
    let dir = Scratch::new("ckpt-two");
    let path = dir.path("model.safetensors");
    let mut users = EmbeddingTable::new(30, 8, Init::default(), 1).unwrap();
    let mut items = EmbeddingTable::new(70, 8, Init::default(), 2).unwrap();
    let words = EmbeddingTable::new(5, 3, Init::default(), 3).unwrap();
    let mut user_opt = Adagrad::new(AdagradConfig::torch());
    let mut item_opt = RmsProp::new(RmsPropConfig {
        momentum: 0.9,
        centered: true,
        semantics: Semantics::DenseExact,
        ..RmsPropConfig::torch()
    });
    train(&mut users, &mut user_opt, 0..6);
    train(&mut items, &mut item_opt, 0..9);
    Checkpoint::new()
        .with("model.user", &users, &user_opt)
        .with("model.item", &items, &item_opt)
        .with_table("words", &words)
        .save(&path)
        .unwrap();
    train(&mut users, &mut user_opt, 6..10);
    train(&mut items, &mut item_opt, 9..20);

    let mut ckpt = Checkpoint::load(&path).unwrap();
    assert_eq!(
        ckpt.names().collect::<Vec<_>>(),
        ["model.user", "model.item", "words"]
    );
    assert_eq!(ckpt.optimizer_state("model.item").unwrap().steps, 9);
    assert!(ckpt.optimizer_state("words").is_none());
    assert_eq!(ckpt.table("words"), Some(&words));

    // The wrong optimizer for a table: an error, and nothing changes.
    let mut wrong = Sgd::default();
    let err = ckpt.restore("model.item", &mut wrong).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "kind", .. }),
        "{err:?}"
    );
    assert_eq!(wrong.state(), Sgd::default().state());
    assert_eq!(ckpt.len(), 3);

    let mut user_opt2 = Adagrad::default();
    let mut item_opt2 = RmsProp::default();
    let mut users2 = ckpt.restore("model.user", &mut user_opt2).unwrap();
    let mut items2 = ckpt.restore("model.item", &mut item_opt2).unwrap();
    assert_eq!(item_opt2.config(), item_opt.config());
    train(&mut users2, &mut user_opt2, 6..10);
    train(&mut items2, &mut item_opt2, 9..20);
    assert_eq!(bits(&users2), bits(&users));
    assert_eq!(bits(&items2), bits(&items));
    assert_eq!(
        state_bits(&item_opt2.state()),
        state_bits(&item_opt.state())
    );

    // Restored tables are gone; the frozen one has no optimizer.
    let err = ckpt.restore("model.user", &mut user_opt2).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "name", .. }),
        "{err:?}"
    );
    let err = ckpt.restore("words", &mut Sgd::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "optimizer",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(ckpt.take_table("words").unwrap(), words);
    assert!(ckpt.is_empty());

    // load_checkpoint wants exactly one table.
    let err = io::load_checkpoint(&path, &mut Adagrad::default()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "name", .. }),
        "{err:?}"
    );
}

#[test]
fn an_optimizer_that_never_stepped_resumes() {
    let dir = Scratch::new("ckpt-fresh");
    let path = dir.path("ckpt.safetensors");
    let table = EmbeddingTable::new(4, 3, Init::default(), 9).unwrap();
    let opt = Sgd::new(SgdConfig {
        momentum: 0.5,
        ..SgdConfig::torch()
    });
    io::save_checkpoint(&path, &table, &opt).unwrap();
    let mut resumed = Sgd::default();
    assert_eq!(io::load_checkpoint(&path, &mut resumed).unwrap(), table);
    assert_eq!(resumed.config(), opt.config());
    assert_eq!(resumed.state(), opt.state());
    assert_eq!(resumed.state().shape, None);
}

// ------------------------------------------------------------- the file

fn read_st(path: &Path) -> (Vec<u8>, HashMap<String, String>) {
    let bytes = fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let map = meta.metadata().clone().unwrap_or_default();
    (bytes, map.into_iter().collect())
}

fn f32s(view: &TensorView<'_>) -> Vec<u32> {
    assert_eq!(view.dtype(), Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn the_file_has_the_documented_tensors_and_metadata() {
    let dir = Scratch::new("ckpt-layout");
    let path = dir.path("ckpt.safetensors");
    let mut table = EmbeddingTable::new(12, 5, Init::default(), 4).unwrap();
    let mut opt = Sgd::new(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        semantics: Semantics::DenseExact,
        ..SgdConfig::default()
    });
    train(&mut table, &mut opt, 0..7);
    let rowwise_table = EmbeddingTable::new(3, 2, Init::default(), 4).unwrap();
    let mut rowwise_table_trained = rowwise_table.clone();
    let mut rowwise = RowWiseAdagrad::default();
    train(&mut rowwise_table_trained, &mut rowwise, 0..2);
    Checkpoint::new()
        .with("emb", &table, &opt)
        .with("r", &rowwise_table_trained, &rowwise)
        .save(&path)
        .unwrap();

    let (bytes, meta) = read_st(&path);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "emb.optim.last_step",
            "emb.optim.momentum",
            "emb.weight",
            "r.optim.accumulator",
            "r.weight"
        ]
    );
    let weight = st.tensor("emb.weight").unwrap();
    assert_eq!(weight.shape(), [12, 5]);
    assert_eq!(f32s(&weight), bits(&table));
    let state = opt.state();
    let momentum = st.tensor("emb.optim.momentum").unwrap();
    assert_eq!(momentum.shape(), [12, 5]);
    assert_eq!(f32s(&momentum), state_bits(&state).4[0].2);
    let last = st.tensor("emb.optim.last_step").unwrap();
    assert_eq!((last.dtype(), last.shape()), (Dtype::I64, &[12][..]));
    let last: Vec<u64> = last
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u64)
        .collect();
    assert_eq!(last, state.last_step);
    assert!(last.iter().any(|&l| l < 6), "some row lags: {last:?}");
    let acc = st.tensor("r.optim.accumulator").unwrap();
    assert_eq!(acc.shape(), [3]);

    let want: HashMap<String, String> = [
        ("embtable.format", "embtable-checkpoint"),
        ("embtable.version", "1"),
        ("embtable.tables", "emb,r"),
        ("emb.optim.kind", "sgd"),
        ("emb.optim.steps", "7"),
        (
            "emb.optim.config",
            "lr=0.10000000149011612,momentum=0.8999999761581421,nesterov=0.0,\
             weight_decay=0.0,semantics=1.0,style=0.0",
        ),
        ("emb.optim.shape", "12,5"),
        ("emb.optim.arrays", "momentum"),
        ("r.optim.kind", "rowwise_adagrad"),
        ("r.optim.steps", "2"),
        (
            "r.optim.config",
            "lr=0.009999999776482582,initial_accumulator_value=0.0,epsilon=9.99999993922529e-9",
        ),
        ("r.optim.shape", "3,2"),
        ("r.optim.arrays", "accumulator"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(meta, want);
    // Wider dtypes first, so the I64 tensor is 8-byte aligned in the file.
    let (n, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.offset_keys()[0], "emb.optim.last_step");
    assert_eq!((8 + n) % 8, 0);

    // Saving the same thing again gives the same bytes.
    let again = dir.path("again.safetensors");
    Checkpoint::new()
        .with("emb", &table, &opt)
        .with("r", &rowwise_table_trained, &rowwise)
        .save(&again)
        .unwrap();
    assert_eq!(fs::read(&again).unwrap(), bytes);
}

/// A checkpoint written by the safetensors Python package from the
/// documented layout alone (scripts/make_checkpoint_fixture.py).
#[test]
fn loads_a_checkpoint_written_by_python() {
    let pattern = |rows: usize, cols: usize, scale: f32, offset: f32| -> Vec<f32> {
        (0..rows * cols)
            .map(|i| i as f32 * scale + offset)
            .collect()
    };
    let mut ckpt = Checkpoint::load(fixture("checkpoint_py.safetensors")).unwrap();
    assert_eq!(ckpt.names().collect::<Vec<_>>(), ["user", "item", "frozen"]);

    let mut sgd = Sgd::default();
    let user = ckpt.restore("user", &mut sgd).unwrap();
    assert_eq!(user.to_vec(), pattern(5, 3, 0.25, -1.0));
    assert_eq!(
        *sgd.config(),
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            semantics: Semantics::DenseExact,
            ..SgdConfig::keras()
        }
    );
    let want = OptimizerState {
        kind: "sgd".into(),
        config: sgd.state().config,
        steps: 4,
        shape: Some((5, 3)),
        arrays: vec![StateArray {
            name: "momentum".into(),
            shape: vec![5, 3],
            values: pattern(5, 3, -0.125, 0.5),
        }],
        last_step: vec![4, 2, 4, 0, 3],
        lr_history: Vec::new(),
    };
    assert_eq!(sgd.state(), want);

    let mut rowwise = RowWiseAdagrad::default();
    let item = ckpt.restore("item", &mut rowwise).unwrap();
    assert_eq!(item.to_vec(), pattern(6, 2, 0.5, -3.0));
    assert_eq!(
        *rowwise.config(),
        RowWiseAdagradConfig {
            lr: 0.01,
            initial_accumulator_value: 0.0,
            epsilon: 1e-10
        }
    );
    let state = rowwise.state();
    assert_eq!((state.steps, state.shape), (7, Some((6, 2))));
    assert_eq!(state.arrays[0].values, pattern(6, 1, 0.5, 0.125));

    assert_eq!(
        ckpt.take_table("frozen").unwrap().to_vec(),
        pattern(2, 4, 1.0, 10.0)
    );

    // It trains on from there like a state built in Rust.
    let mut sgd_rust = Sgd::default();
    sgd_rust.load_state(want).unwrap();
    let mut user_rust = EmbeddingTable::from_rows(5, 3, &pattern(5, 3, 0.25, -1.0)).unwrap();
    let mut user = user;
    train(&mut user, &mut sgd, 4..8);
    train(&mut user_rust, &mut sgd_rust, 4..8);
    assert_eq!(bits(&user), bits(&user_rust));
}

/// Tables in every float dtype, beside NumPy's float32 conversion of each.
#[test]
fn loads_tables_of_every_float_dtype_as_numpy_converts_them() {
    let path = fixture("tables.safetensors");
    let load = |name: &str| io::load_table_safetensors(&path, name);
    let f32_table = load("f32").unwrap();
    assert_eq!((f32_table.rows(), f32_table.dim()), (3, 5));
    assert_eq!(f32_table.row(0)[..2], [0.1, -0.0]);
    assert_eq!(f32_table.row(0)[1].to_bits(), (-0.0f32).to_bits());
    assert_eq!(f32_table.row(1)[0], 1.4e-45);
    assert!(f32_table.row(1)[2].is_nan());
    for name in ["f16", "bf16"] {
        // Widening is exact: every bit, NaN payloads included.
        let got = load(name).unwrap();
        let want = load(&format!("{name}_as_f32")).unwrap();
        assert_eq!(bits(&got), bits(&want), "{name}");
    }
    let got = load("f64").unwrap();
    let want = load("f64_as_f32").unwrap();
    assert_eq!(bits(&got), bits(&want));
    assert_eq!(got.row(1)[..2], [f32::INFINITY, f32::INFINITY]); // 1e300, max + half an ulp

    for (name, needle) in [
        ("vector", "shape [5]"),
        ("no_rows", "shape [0, 3]"),
        ("ids", "is I64"),
        ("missing", "no tensor \"missing\""),
    ] {
        assert_format(load(name), needle);
    }
    // A table-only file is not a checkpoint.
    assert_format(Checkpoint::load(&path), "load_table_safetensors");
}

#[test]
fn table_files_round_trip_and_read_checkpoint_tables() {
    let dir = Scratch::new("ckpt-table");
    let path = dir.path("t.safetensors");
    let table = EmbeddingTable::from_rows(2, 3, &[1.0, f32::NAN, -0.0, 1e-45, 7.5, -1.0]).unwrap();
    io::save_table_safetensors(&path, "embedding.weight", &table).unwrap();
    let (bytes, meta) = read_st(&path);
    assert!(meta.is_empty());
    assert_eq!(
        SafeTensors::deserialize(&bytes).unwrap().names(),
        ["embedding.weight"]
    );
    let back = io::load_table_safetensors(&path, "embedding.weight").unwrap();
    assert_eq!(bits(&back), bits(&table));

    let ckpt = dir.path("ckpt.safetensors");
    let opt = Adagrad::default();
    io::save_checkpoint(&ckpt, &table, &opt).unwrap();
    let back = io::load_table_safetensors(&ckpt, "embedding.weight").unwrap();
    assert_eq!(bits(&back), bits(&table));

    let err = io::save_table_safetensors(&path, "a b", &table).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "name", .. }),
        "{err:?}"
    );
}

/// Writes a checkpoint and, in `expected.txt` beside it, every tensor and
/// metadata entry as read back here, for `make_checkpoint_fixture.py
/// verify`. Into `$EMBTABLE_CHECKPOINT_OUT` when set.
#[test]
fn written_for_python() {
    let scratch = Scratch::new("ckpt-python");
    let dir = match std::env::var_os("EMBTABLE_CHECKPOINT_OUT") {
        Some(dir) => {
            fs::create_dir_all(&dir).unwrap();
            PathBuf::from(dir)
        }
        None => scratch.0.clone(),
    };
    let path = dir.join("checkpoint.safetensors");
    let mut users = EmbeddingTable::new(7, 4, Init::default(), 21).unwrap();
    let mut items = EmbeddingTable::new(11, 3, Init::default(), 22).unwrap();
    let mut user_opt = Sgd::new(SgdConfig {
        momentum: 0.9,
        nesterov: true,
        semantics: Semantics::DenseExact,
        ..SgdConfig::torch()
    });
    let mut item_opt = Adagrad::default();
    train(&mut users, &mut user_opt, 0..5);
    train(&mut items, &mut item_opt, 0..5);
    Checkpoint::new()
        .with("user", &users, &user_opt)
        .with("item", &items, &item_opt)
        .save(&path)
        .unwrap();

    let (bytes, meta) = read_st(&path);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut lines = Vec::new();
    for (key, value) in &meta {
        lines.push(format!("meta\t{key}\t{value}"));
    }
    for (name, view) in st.tensors() {
        let dims: Vec<String> = view.shape().iter().map(usize::to_string).collect();
        let values: Vec<String> = match view.dtype() {
            Dtype::F32 => f32s(&view).iter().map(|b| format!("{b:08x}")).collect(),
            Dtype::I64 => view
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()).to_string())
                .collect(),
            other => panic!("unexpected dtype {other}"),
        };
        lines.push(format!(
            "tensor\t{name}\t{}\t{}\t{}",
            view.dtype(),
            dims.join(","),
            values.join(",")
        ));
    }
    lines.sort();
    fs::write(dir.join("expected.txt"), lines.join("\n") + "\n").unwrap();
    // What Python will compare against is what was saved.
    assert_eq!(lines.len(), meta.len() + 5);
    let item_line = lines
        .iter()
        .find(|l| l.starts_with("tensor\titem.weight\t"))
        .unwrap();
    let item_hex: Vec<String> = bits(&items).iter().map(|b| format!("{b:08x}")).collect();
    assert!(item_line.ends_with(&item_hex.join(",")));
}

// ------------------------------------------------------------ bad input

fn assert_format<T: std::fmt::Debug>(result: Result<T, Error>, needle: &str) {
    match result {
        Err(Error::Format { line: 0, reason }) => {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
        }
        other => panic!("expected a format error about {needle:?}, got {other:?}"),
    }
}

/// The tensors of a safetensors file, editable.
struct Raw {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

impl Raw {
    fn read(path: &Path) -> Raw {
        let (bytes, meta) = read_st(path);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        Raw { tensors, meta }
    }

    fn write(&self, path: &Path) {
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = Some(self.meta.clone().into_iter().collect());
        let bytes =
            safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), meta).unwrap();
        fs::write(path, bytes).unwrap();
    }

    fn tensor(&mut self, name: &str) -> &mut (String, Dtype, Vec<usize>, Vec<u8>) {
        self.tensors.iter_mut().find(|t| t.0 == name).unwrap()
    }

    fn remove(&mut self, name: &str) {
        self.tensors.retain(|t| t.0 != name);
    }
}

/// A valid two-table checkpoint: "a" with SGD momentum under DenseExact
/// (4 × 3, lagging rows), "b" with Adagrad (2 × 2).
fn valid_checkpoint(path: &Path) {
    let mut a = EmbeddingTable::new(4, 3, Init::default(), 1).unwrap();
    let mut b = EmbeddingTable::new(2, 2, Init::default(), 2).unwrap();
    let mut sgd = Sgd::new(SgdConfig {
        momentum: 0.9,
        semantics: Semantics::DenseExact,
        ..SgdConfig::default()
    });
    let mut adagrad = Adagrad::default();
    train(&mut a, &mut sgd, 0..3);
    train(&mut b, &mut adagrad, 0..2);
    Checkpoint::new()
        .with("a", &a, &sgd)
        .with("b", &b, &adagrad)
        .save(path)
        .unwrap();
}

#[test]
fn corrupt_checkpoints_are_format_errors_naming_the_problem() {
    let dir = Scratch::new("ckpt-corrupt");
    let good = dir.path("good.safetensors");
    valid_checkpoint(&good);
    let bad = dir.path("bad.safetensors");
    type Edit = fn(&mut Raw);
    let edits: Vec<(&str, Edit)> = vec![
        ("\"embtable.format\" is missing", |r| {
            r.meta.remove("embtable.format");
        }),
        ("is \"other\"", |r| {
            r.meta.insert("embtable.format".into(), "other".into());
        }),
        ("version \"2\" is not supported", |r| {
            r.meta.insert("embtable.version".into(), "2".into());
        }),
        ("\"embtable.tables\" is missing", |r| {
            r.meta.remove("embtable.tables");
        }),
        ("no tensor \"c.weight\"", |r| {
            r.meta.insert("embtable.tables".into(), "a,b,c".into());
        }),
        ("listed twice", |r| {
            r.meta.insert("embtable.tables".into(), "a,a,b".into());
        }),
        ("must be non-empty", |r| {
            r.meta.insert("embtable.tables".into(), "a,,b".into());
        }),
        (
            "unexpected tensors [\"b.optim.accumulator\", \"b.weight\"]",
            |r| {
                r.meta.insert("embtable.tables".into(), "a".into());
            },
        ),
        ("unexpected tensors [\"x\"]", |r| {
            r.tensors
                .push(("x".into(), Dtype::F32, vec![1], vec![0; 4]));
        }),
        ("tensor \"a.weight\" is F64; expected F32", |r| {
            let t = r.tensor("a.weight");
            t.1 = Dtype::F64;
            t.2 = vec![2, 3];
        }),
        ("tensor \"a.weight\" has shape [12]", |r| {
            r.tensor("a.weight").2 = vec![12];
        }),
        ("no tensor \"a.optim.momentum\"", |r| {
            r.remove("a.optim.momentum")
        }),
        (
            "state array \"momentum\" has shape [3, 4]; expected [4, 3] or [4]",
            |r| {
                r.tensor("a.optim.momentum").2 = vec![3, 4];
            },
        ),
        ("a.optim.steps\" is missing", |r| {
            r.meta.remove("a.optim.steps");
        }),
        ("a.optim.steps is \"-1\"", |r| {
            r.meta.insert("a.optim.steps".into(), "-1".into());
        }),
        ("\"lr\" is not field=number", |r| {
            r.meta
                .insert("a.optim.config".into(), "lr,momentum=0.5".into());
        }),
        ("\"lr=fast\" is not field=number", |r| {
            r.meta.insert("a.optim.config".into(), "lr=fast".into());
        }),
        ("a.optim.shape is \"3,4\"; the table is 4,3", |r| {
            r.meta.insert("a.optim.shape".into(), "3,4".into());
        }),
        ("a.optim.shape is \"4\"", |r| {
            r.meta.insert("a.optim.shape".into(), "4".into());
        }),
        (
            "table \"a\": invalid shape: an optimizer state without a table shape",
            |r| {
                r.meta.insert("a.optim.shape".into(), "none".into());
            },
        ),
        ("lists \"momentum\" twice", |r| {
            r.meta
                .insert("a.optim.arrays".into(), "momentum,momentum".into());
        }),
        ("unexpected tensors [\"a.optim.momentum\"]", |r| {
            r.meta.insert("a.optim.arrays".into(), String::new());
        }),
        (
            "unexpected tensors [\"a.optim.last_step\", \"a.optim.momentum\"]",
            |r| {
                r.meta.remove("a.optim.kind");
            },
        ),
        ("holds a negative count", |r| {
            r.tensor("a.optim.last_step").3[..8].copy_from_slice(&(-1i64).to_le_bytes());
        }),
        ("last_step\" is F64; expected I64", |r| {
            r.tensor("a.optim.last_step").1 = Dtype::F64;
        }),
        ("last_step\" has shape [2, 2]", |r| {
            r.tensor("a.optim.last_step").2 = vec![2, 2];
        }),
        ("lists \"last_step\"", |r| {
            r.meta
                .insert("a.optim.arrays".into(), "momentum,last_step".into());
        }),
    ];
    for (needle, edit) in edits {
        let mut raw = Raw::read(&good);
        edit(&mut raw);
        raw.write(&bad);
        assert_format(Checkpoint::load(&bad), needle);
    }
    // Not safetensors at all.
    fs::write(&bad, b"not a checkpoint").unwrap();
    assert_format(Checkpoint::load(&bad), "not a valid safetensors file");
    assert_format(
        io::load_table_safetensors(&bad, "a.weight"),
        "not a valid safetensors file",
    );
    let err = Checkpoint::load(dir.path("missing.safetensors")).unwrap_err();
    assert!(matches!(&err, Error::Io { context, .. } if context.contains("missing.safetensors")));

    // A U64 last_step is read too.
    let mut raw = Raw::read(&good);
    raw.tensor("a.optim.last_step").1 = Dtype::U64;
    raw.write(&bad);
    assert_eq!(
        Checkpoint::load(&bad).unwrap(),
        Checkpoint::load(&good).unwrap()
    );
}

/// Files that load but hold a state the optimizer refuses: `restore` gives
/// `load_state`'s error and changes nothing.
#[test]
fn states_the_optimizer_refuses_are_errors_at_restore() {
    let dir = Scratch::new("ckpt-refused");
    let good = dir.path("good.safetensors");
    valid_checkpoint(&good);
    let bad = dir.path("bad.safetensors");
    type Edit = fn(&mut Raw);
    let edits: Vec<(&str, Edit)> = vec![
        ("lr", |r| {
            let config = r.meta["a.optim.config"].replace("lr=0.009999999776482582", "lr=-1.0");
            r.meta.insert("a.optim.config".into(), config);
        }),
        ("config", |r| {
            let config = r.meta["a.optim.config"].clone() + ",beta=0.5";
            r.meta.insert("a.optim.config".into(), config);
        }),
        ("last_step", |r| {
            r.meta.insert("a.optim.steps".into(), "1".into());
        }),
        // Issue 18: a counter the next step would overflow.
        ("18446744073709551615 is above the limit", |r| {
            r.meta.insert("a.optim.steps".into(), u64::MAX.to_string());
        }),
        ("optimizer state", |r| {
            r.tensor("a.optim.momentum").3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }),
        ("arrays", |r| {
            r.meta.insert("a.optim.arrays".into(), "velocity".into());
            r.tensor("a.optim.momentum").0 = "a.optim.velocity".into();
        }),
    ];
    for (needle, edit) in edits {
        let mut raw = Raw::read(&good);
        edit(&mut raw);
        raw.write(&bad);
        let mut ckpt = Checkpoint::load(&bad).unwrap();
        let mut opt = Sgd::default();
        let err = ckpt.restore("a", &mut opt).unwrap_err();
        assert!(format!("{err}").contains(needle), "{needle}: {err}");
        assert_eq!(opt.state(), Sgd::default().state(), "{needle}");
        assert_eq!(ckpt.len(), 2, "{needle}");
    }
}

/// An optimizer whose state is whatever the test says, to reach the
/// checks a real optimizer never fails.
#[derive(Clone, Debug)]
struct Fake(OptimizerState);

impl SparseOptimizer for Fake {
    fn step(&mut self, _: &mut EmbeddingTable, _: &SparseGrad) -> embtable::Result<()> {
        Ok(())
    }

    fn flush(&mut self, _: &mut EmbeddingTable) -> embtable::Result<()> {
        Ok(())
    }

    fn state(&self) -> OptimizerState {
        self.0.clone()
    }

    fn load_state(&mut self, state: OptimizerState) -> embtable::Result<()> {
        self.0 = state;
        Ok(())
    }

    fn lr(&self) -> f32 {
        0.5
    }

    fn set_lr(&mut self, _: f32) -> embtable::Result<()> {
        Ok(())
    }

    fn set_schedule(&mut self, _: Option<std::sync::Arc<dyn embtable::optim::LrSchedule>>) {}

    fn steps(&self) -> u64 {
        self.0.steps
    }
}

fn fake_state(rows: usize, dim: usize) -> OptimizerState {
    OptimizerState {
        kind: "fake".into(),
        config: vec![("lr".into(), 0.5)],
        steps: 3,
        shape: Some((rows, dim)),
        arrays: vec![StateArray {
            name: "acc".into(),
            shape: vec![rows, dim],
            values: vec![1.0; rows * dim],
        }],
        last_step: vec![1; rows],
        lr_history: Vec::new(),
    }
}

#[test]
fn invalid_saves_are_errors_and_leave_the_old_file() {
    let dir = Scratch::new("ckpt-invalid-save");
    let path = dir.path("ckpt.safetensors");
    valid_checkpoint(&path);
    let old = fs::read(&path).unwrap();
    let table = EmbeddingTable::zeros(3, 2).unwrap();
    let other = EmbeddingTable::zeros(4, 2).unwrap();
    let ok = Fake(fake_state(3, 2));
    let with_state = |edit: fn(&mut OptimizerState)| {
        let mut s = fake_state(3, 2);
        edit(&mut s);
        Fake(s)
    };
    let mut trained_elsewhere = Adagrad::default();
    train(&mut other.clone(), &mut trained_elsewhere, 0..1);
    let cases: Vec<(&str, Checkpoint<'_>)> = vec![
        ("name", Checkpoint::new().with("", &table, &ok)),
        ("name", Checkpoint::new().with("a,b", &table, &ok)),
        ("name", Checkpoint::new().with("naïve", &table, &ok)),
        (
            "name",
            Checkpoint::new()
                .with_table("t", &table)
                .with_table("t", &other),
        ),
        // Table "t.optim.x" would have the tensor "t.optim.x.weight", which
        // is also table "t"'s state array "x.weight".
        (
            "name",
            Checkpoint::new()
                .with(
                    "t",
                    &table,
                    &with_state(|s| s.arrays[0].name = "x.weight".into()),
                )
                .with_table("t.optim.x", &table),
        ),
        (
            "kind",
            Checkpoint::new().with("t", &table, &with_state(|s| s.kind = "my kind".into())),
        ),
        (
            "config",
            Checkpoint::new().with("t", &table, &with_state(|s| s.config[0].0 = "a=b".into())),
        ),
        (
            "arrays",
            Checkpoint::new().with("t", &table, &with_state(|s| s.arrays[0].shape = vec![2, 3])),
        ),
        (
            "arrays",
            Checkpoint::new().with("t", &table, &with_state(|s| s.arrays[0].name = "".into())),
        ),
        (
            "arrays",
            Checkpoint::new().with(
                "t",
                &table,
                &with_state(|s| s.arrays[0].name = "last_step".into()),
            ),
        ),
        (
            "shape",
            Checkpoint::new().with("t", &table, &with_state(|s| s.shape = None)),
        ),
        (
            "last_step",
            Checkpoint::new().with("t", &table, &with_state(|s| s.last_step[0] = u64::MAX)),
        ),
    ];
    for (field, ckpt) in cases {
        let err = ckpt.save(&path).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field: f, .. } if *f == field),
            "{field}: {err:?}"
        );
        assert_eq!(fs::read(&path).unwrap(), old);
    }
    let mismatched: Vec<(&str, Checkpoint<'_>)> = vec![
        (
            "optimizer state rows (the table's)",
            Checkpoint::new().with("t", &table, &trained_elsewhere),
        ),
        (
            "state array values (its shape's product)",
            Checkpoint::new().with(
                "t",
                &table,
                &with_state(|s| {
                    s.arrays[0].values.pop();
                }),
            ),
        ),
        (
            "last_step length (table rows)",
            Checkpoint::new().with("t", &table, &with_state(|s| s.last_step.push(0))),
        ),
    ];
    for (what, ckpt) in mismatched {
        let err = ckpt.save(&path).unwrap_err();
        assert!(
            matches!(&err, Error::ShapeMismatch { what: w, .. } if *w == what),
            "{what}: {err:?}"
        );
        assert_eq!(fs::read(&path).unwrap(), old);
    }
    assert_eq!(dir.entries(), ["ckpt.safetensors"]);

    // Into a directory that does not exist, or over a directory.
    let err = io::save_checkpoint(dir.path("no/such/dir.safetensors"), &table, &ok).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    fs::create_dir(dir.path("sub")).unwrap();
    let err = io::save_checkpoint(dir.path("sub"), &table, &ok).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_eq!(dir.entries(), ["ckpt.safetensors", "sub"]);
}

/// A save that runs out of room half way (the file size limit, as a full
/// disk would) fails with an I/O error and leaves the previous checkpoint
/// byte for byte, with no temporary file. The save runs in a child process
/// (this test binary again) under `RLIMIT_FSIZE`, so no other test feels
/// the limit.
#[cfg(unix)]
#[test]
fn a_save_that_runs_out_of_room_keeps_the_old_checkpoint() {
    const CHILD: &str = "EMBTABLE_TEST_FSIZE_CHILD";
    const LIMIT: u64 = 64 << 10;
    let big = EmbeddingTable::new(200, 100, Init::default(), 3).unwrap(); // 80 kB
    if let Some(path) = std::env::var_os(CHILD) {
        // SAFETY: plain libc calls with valid arguments; ignoring SIGXFSZ
        // makes a write past the limit fail with EFBIG instead of killing
        // the process.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: LIMIT as libc::rlim_t,
                rlim_max: LIMIT as libc::rlim_t,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        }
        let err = io::save_checkpoint(&path, &big, &Adagrad::default()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        println!("child saw: {err}");
        return;
    }
    let dir = Scratch::new("ckpt-fsize");
    let path = dir.path("ckpt.safetensors");
    let mut small_trained = EmbeddingTable::new(10, 4, Init::default(), 3).unwrap();
    let mut small_opt = Adagrad::default();
    train(&mut small_trained, &mut small_opt, 0..2);
    io::save_checkpoint(&path, &small_trained, &small_opt).unwrap();
    let old = fs::read(&path).unwrap();

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_save_that_runs_out_of_room_keeps_the_old_checkpoint",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child saw:"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&path).unwrap(), old);
    assert_eq!(dir.entries(), ["ckpt.safetensors"]);
    let mut resumed = Adagrad::default();
    assert_eq!(
        io::load_checkpoint(&path, &mut resumed).unwrap(),
        small_trained
    );
}

// -------------------------------------------------------------- fuzzing

/// Loads `bytes` every way; none may panic. Returns whether the checkpoint
/// loaded.
fn load_all_ways(path: &Path, bytes: &[u8]) -> bool {
    fs::write(path, bytes).unwrap();
    let _ = io::load_table_safetensors(path, "a.weight");
    let _ = io::load_checkpoint(path, &mut Sgd::default());
    match Checkpoint::load(path) {
        Ok(mut ckpt) => {
            let names: Vec<String> = ckpt.names().map(str::to_owned).collect();
            for name in names {
                let _ = ckpt.clone().restore(&name, &mut Sgd::default());
                let _ = ckpt.clone().restore(&name, &mut Adagrad::default());
                let _ = ckpt.clone().restore(&name, &mut RmsProp::default());
                let _ = ckpt.clone().restore(&name, &mut RowWiseAdagrad::default());
                let _ = ckpt.take_table(&name);
            }
            true
        }
        Err(_) => false,
    }
}

fn valid_bytes() -> Vec<u8> {
    let dir = Scratch::new("ckpt-valid-bytes");
    let path = dir.path("v.safetensors");
    valid_checkpoint(&path);
    fs::read(&path).unwrap()
}

#[test]
fn every_prefix_of_a_valid_checkpoint_is_an_error() {
    let dir = Scratch::new("ckpt-prefixes");
    let path = dir.path("cut.safetensors");
    let bytes = valid_bytes();
    for cut in 0..bytes.len() {
        assert!(
            !load_all_ways(&path, &bytes[..cut]),
            "cut at {cut} was accepted"
        );
    }
    assert!(load_all_ways(&path, &bytes));
    // And trailing garbage.
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(!load_all_ways(&path, &longer));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let dir = Scratch::new("ckpt-fuzz-random");
        let path = dir.path("f.safetensors");
        prop_assert!(!load_all_ways(&path, &bytes));
        // Behind a plausible header length and the start of a header.
        let mut framed = (bytes.len() as u64 + 2).to_le_bytes().to_vec();
        framed.extend_from_slice(b"{\"");
        framed.extend_from_slice(&bytes);
        prop_assert!(!load_all_ways(&path, &framed));
    }

    #[test]
    fn mutated_checkpoints_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let dir = Scratch::new("ckpt-fuzz-mutate");
        let path = dir.path("f.safetensors");
        let mut bytes = valid_bytes();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        load_all_ways(&path, &bytes);
    }

    /// Any optimizer state (config values of every f64 but NaN, any
    /// values) goes through a file unchanged, bit for bit.
    #[test]
    fn any_state_round_trips_exactly(
        rows in 1usize..6,
        dim in 1usize..5,
        config in prop::collection::vec(any::<f64>().prop_filter("not NaN", |v| !v.is_nan()), 0..4),
        seed in any::<u64>(),
        per_row in any::<bool>(),
        dense_exact in any::<bool>(),
    ) {
        let dir = Scratch::new("ckpt-fuzz-state");
        let path = dir.path("s.safetensors");
        let raw = |n: usize, salt: u64| -> Vec<f32> {
            (0..n as u64)
                .map(|i| f32::from_bits((seed ^ salt).wrapping_mul(i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) as u32))
                .collect()
        };
        let width = if per_row { 1 } else { dim };
        let state = OptimizerState {
            kind: "fake".into(),
            config: config.iter().enumerate().map(|(i, &v)| (format!("f{i}"), v)).collect(),
            steps: seed >> 2,
            shape: Some((rows, dim)),
            arrays: vec![StateArray {
                name: "s".into(),
                shape: if per_row { vec![rows] } else { vec![rows, dim] },
                values: raw(rows * width, 1),
            }],
            last_step: if dense_exact { (0..rows as u64).map(|r| (seed >> 2) / (r + 1)).collect() } else { Vec::new() },
            // Any finite rate round-trips through its shortest decimal.
            lr_history: raw(3, 3)
                .into_iter()
                .filter(|x| x.is_finite())
                .enumerate()
                .map(|(i, x)| (i as u64 + 1, x))
                .collect(),
        };
        let table = EmbeddingTable::from_rows(rows, dim, &raw(rows * dim, 2)).unwrap();
        Checkpoint::new().with("t", &table, &Fake(state.clone())).save(&path).unwrap();
        let mut back = Fake(OptimizerState::default());
        let table_back = io::load_checkpoint(&path, &mut back).unwrap();
        prop_assert_eq!(bits(&table_back), bits(&table));
        prop_assert_eq!(state_bits(&back.0), state_bits(&state));
    }
}

#[test]
fn user_metadata_round_trips_beside_a_table_named_user() {
    let table = EmbeddingTable::from_rows(2, 1, &[1.0, 2.0]).unwrap();
    let path = std::env::temp_dir().join(format!(
        "embtable-user-meta-{}.safetensors",
        std::process::id()
    ));
    Checkpoint::new()
        .with("user", &table, &Sgd::default())
        .with_metadata("optim.kind", "not the optimizer")
        .with_metadata("epoch", "1")
        .with_metadata("epoch", "2")
        .save(&path)
        .unwrap();
    let mut loaded = Checkpoint::load(&path).unwrap();
    assert_eq!(loaded.metadata("epoch"), Some("2"));
    assert_eq!(loaded.metadata("optim.kind"), Some("not the optimizer"));
    assert_eq!(loaded.optimizer_state("user").unwrap().kind, "sgd");
    let mut sgd = Sgd::default();
    assert_eq!(loaded.restore("user", &mut sgd).unwrap(), table);

    let err = Checkpoint::new()
        .with_table("t", &table)
        .with_metadata("bad key", "x")
        .save(&path)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "metadata",
                ..
            }
        ),
        "{err}"
    );
    std::fs::remove_file(&path).ok();
}
