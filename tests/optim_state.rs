//! Optimizer state: export and import (bit-for-bit resume, refusals of
//! states no step can produce), catch-up of lagging rows, learning-rate
//! changes and schedules, and bad input refused with nothing written.

mod common;

use std::sync::Arc;

use common::optim::*;
use common::{Scratch, assert_bits_eq, assert_close};
use embtable::optim::{ExponentialDecay, LrSchedule, StepLr};
use embtable::{
    AdagradConfig, Adam, AdamConfig, AdamStyle, AdamWConfig, EmbeddingTable, Error, FtrlConfig,
    OptimizerState, RmsProp, RmsPropConfig, RowWiseAdagradConfig, Semantics, Sgd, SgdConfig,
    SparseGrad, SparseOptimizer, StateArray, io,
};
use workloads::values;

/// An optimizer of `cfg`'s kind with other settings: a state loaded into
/// it brings its own config.
fn other_of_kind(cfg: Cfg) -> Cfg {
    match cfg {
        Cfg::Sgd(_) => Cfg::Sgd(SgdConfig::default()),
        Cfg::RmsProp(_) => Cfg::RmsProp(RmsPropConfig::default()),
        Cfg::Adagrad(_) => Cfg::Adagrad(AdagradConfig::torch()),
        Cfg::RowWise(_) => Cfg::RowWise(RowWiseAdagradConfig {
            lr: 0.5,
            ..Default::default()
        }),
        Cfg::Adam(_) => Cfg::Adam(AdamConfig::torch_sparse()),
        Cfg::AdamW(_) => Cfg::AdamW(AdamWConfig::keras()),
        Cfg::Ftrl(_) => Cfg::Ftrl(FtrlConfig::keras_lazy()),
    }
}

#[test]
fn state_round_trip_resumes_bit_for_bit() {
    let run = example_run();
    for cfg in every_kind() {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        for t in 0..4 {
            if t == 2 {
                // A new rate while rows lag: kept in the state for them.
                opt.set_lr(cfg.lr() * 0.5).unwrap();
            }
            opt.step(&mut table, &run.sparse_grad(t)).unwrap();
        }
        let saved = opt.state();
        // Replayed steps use their rates; a linear catch-up only needs the
        // old rate if its map depends on it (SGD's weight decay).
        let replays = opt.has_lagging_rows() && !cfg.linear_catch_up();
        if replays || !saved.lr_history.is_empty() {
            assert_eq!(saved.lr_history, [(2, cfg.lr())], "{cfg:?}");
        }
        // A fresh optimizer of the same kind with a different config: the
        // config comes from the state.
        let mut resumed = other_of_kind(cfg).optimizer();
        resumed.load_state(saved.clone()).unwrap();
        assert_eq!(resumed.state(), saved);
        let mut table2 = table.clone();
        for t in 4..run.steps.len() {
            opt.step(&mut table, &run.sparse_grad(t)).unwrap();
            resumed.step(&mut table2, &run.sparse_grad(t)).unwrap();
        }
        opt.flush(&mut table).unwrap();
        resumed.flush(&mut table2).unwrap();
        assert_bits_eq(&table2.to_vec(), &table.to_vec(), &format!("{cfg:?}"));
        assert_eq!(resumed.state(), opt.state());
    }
}

#[test]
fn load_state_refuses_bad_states_and_changes_nothing() {
    let run = example_run();
    let mut table = run.table();
    let mut opt = Sgd::new(SgdConfig {
        momentum: 0.9,
        semantics: Semantics::DenseExact,
        ..SgdConfig::default()
    });
    opt.step(&mut table, &run.sparse_grad(0)).unwrap();
    let good = opt.state();
    let mut bad_states: Vec<(OptimizerState, &str)> = Vec::new();
    let mut s = good.clone();
    s.kind = "adagrad".into();
    bad_states.push((s, "kind"));
    let mut s = good.clone();
    s.config.retain(|(n, _)| n != "lr");
    bad_states.push((s, "missing lr"));
    let mut s = good.clone();
    s.config.push(("beta".into(), 0.5));
    bad_states.push((s, "unknown field"));
    let mut s = good.clone();
    s.config[1].1 = 1.5; // momentum
    bad_states.push((s, "invalid momentum"));
    let mut s = good.clone();
    s.arrays[0].values.pop();
    bad_states.push((s, "short array"));
    let mut s = good.clone();
    s.arrays[0].shape = vec![run.dim, run.rows];
    bad_states.push((s, "transposed shape"));
    let mut s = good.clone();
    s.arrays[0].name = "velocity".into();
    bad_states.push((s, "array name"));
    let mut s = good.clone();
    s.arrays.clear();
    bad_states.push((s, "missing array"));
    let mut s = good.clone();
    s.arrays[0].values[3] = f32::NAN;
    bad_states.push((s, "NaN state"));
    let mut s = good.clone();
    s.last_step.pop();
    bad_states.push((s, "short last_step"));
    let mut s = good.clone();
    s.last_step[0] = 99;
    bad_states.push((s, "row ahead of the counter"));
    for (bad, what) in bad_states {
        assert!(opt.load_state(bad).is_err(), "{what}");
        assert_eq!(opt.state(), good, "{what}");
    }
}

#[test]
fn bad_input_changes_nothing() {
    let run = example_run();
    for cfg in every_kind() {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        for t in 0..3 {
            opt.step(&mut table, &run.sparse_grad(t)).unwrap();
        }
        let before = snapshot(&table, opt.as_ref());
        let what = format!("{cfg:?}");

        // A summed gradient that overflowed to infinity.
        let mut grad = SparseGrad::new(run.dim);
        let mut g = vec![0.5; 3 * run.dim];
        g[run.dim + 2] = 3e38;
        g[2 * run.dim + 2] = 3e38;
        grad.accumulate_lookup(&[1u32, 4, 4], &g).unwrap();
        match opt.step(&mut table, &grad) {
            Err(Error::NonFinite { position, .. }) => assert_eq!(position, run.dim + 2),
            other => panic!("{what}: {other:?}"),
        }
        assert_same(&table, opt.as_ref(), &before, &what);

        // A row beyond the table (SparseGrad::new does not know the table).
        let mut grad = SparseGrad::new(run.dim);
        grad.accumulate_lookup(&[2u32, 30, 5], &vec![0.5; 3 * run.dim])
            .unwrap();
        match opt.step(&mut table, &grad) {
            Err(Error::IndexOutOfRange {
                position,
                index,
                rows,
            }) => assert_eq!((position, index, rows), (1, 30, 30)),
            other => panic!("{what}: {other:?}"),
        }
        assert_same(&table, opt.as_ref(), &before, &what);

        // A gradient of another width.
        let mut grad = SparseGrad::new(run.dim + 1);
        grad.accumulate_lookup(&[2u32], &vec![0.5; run.dim + 1])
            .unwrap();
        assert!(matches!(
            opt.step(&mut table, &grad),
            Err(Error::ShapeMismatch { .. })
        ));
        assert_same(&table, opt.as_ref(), &before, &what);

        // A table of another shape than the state's.
        for (rows, dim) in [(run.rows + 1, run.dim), (run.rows, run.dim + 3)] {
            let mut other = EmbeddingTable::zeros(rows, dim).unwrap();
            let other_before = other.to_vec();
            let mut grad = SparseGrad::new(dim);
            grad.accumulate_lookup(&[0u32], &vec![0.5; dim]).unwrap();
            assert!(
                matches!(
                    opt.step(&mut other, &grad),
                    Err(Error::ShapeMismatch { .. })
                ),
                "{what}"
            );
            assert!(matches!(
                opt.flush(&mut other),
                Err(Error::ShapeMismatch { .. })
            ));
            assert_eq!(other.to_vec(), other_before);
        }
        assert_same(&table, opt.as_ref(), &before, &what);

        // catch_up of a row beyond the table.
        assert!(matches!(
            opt.catch_up(&mut table, &[1, 2, 30]),
            Err(Error::IndexOutOfRange { position: 2, .. })
        ));
        assert_same(&table, opt.as_ref(), &before, &what);
    }
}

#[test]
fn bad_config_is_refused_before_any_write() {
    let run = example_run();
    let bad = [
        (
            Cfg::Sgd(SgdConfig {
                lr: -0.1,
                ..Default::default()
            }),
            "lr",
        ),
        (
            Cfg::Sgd(SgdConfig {
                momentum: 1.0,
                ..Default::default()
            }),
            "momentum",
        ),
        (
            Cfg::Sgd(SgdConfig {
                weight_decay: f32::NAN,
                ..Default::default()
            }),
            "weight_decay",
        ),
        (
            Cfg::RmsProp(RmsPropConfig {
                rho: -0.5,
                ..Default::default()
            }),
            "rho",
        ),
        (
            Cfg::RmsProp(RmsPropConfig {
                rho: f32::NAN,
                ..Default::default()
            }),
            "rho",
        ),
        (
            Cfg::RmsProp(RmsPropConfig {
                momentum: 2.0,
                ..Default::default()
            }),
            "momentum",
        ),
        (
            Cfg::RmsProp(RmsPropConfig {
                epsilon: 0.0,
                ..Default::default()
            }),
            "epsilon",
        ),
        (
            Cfg::Adagrad(AdagradConfig {
                lr: f32::INFINITY,
                ..Default::default()
            }),
            "lr",
        ),
        (
            Cfg::Adagrad(AdagradConfig {
                epsilon: -1e-7,
                ..Default::default()
            }),
            "epsilon",
        ),
        (
            Cfg::Adagrad(AdagradConfig {
                initial_accumulator_value: -0.1,
                ..Default::default()
            }),
            "initial_accumulator_value",
        ),
        (
            Cfg::RowWise(RowWiseAdagradConfig {
                lr: 0.0,
                ..Default::default()
            }),
            "lr",
        ),
        (
            Cfg::RowWise(RowWiseAdagradConfig {
                epsilon: f32::NAN,
                ..Default::default()
            }),
            "epsilon",
        ),
        (
            Cfg::Adagrad(AdagradConfig {
                lr_decay: -0.1,
                ..Default::default()
            }),
            "lr_decay",
        ),
        (
            Cfg::Adagrad(AdagradConfig {
                weight_decay: f32::INFINITY,
                ..Default::default()
            }),
            "weight_decay",
        ),
        (
            Cfg::RmsProp(RmsPropConfig {
                weight_decay: -1.0,
                ..Default::default()
            }),
            "weight_decay",
        ),
        (
            Cfg::Adam(AdamConfig {
                lr: 0.0,
                ..Default::default()
            }),
            "lr",
        ),
        (
            Cfg::Adam(AdamConfig {
                beta_1: 1.0,
                ..Default::default()
            }),
            "beta_1",
        ),
        (
            Cfg::Adam(AdamConfig {
                beta_2: -0.001,
                ..AdamConfig::torch_sparse()
            }),
            "beta_2",
        ),
        (
            Cfg::Adam(AdamConfig {
                beta_2: f64::NAN,
                ..AdamConfig::torch()
            }),
            "beta_2",
        ),
        (
            Cfg::Adam(AdamConfig {
                epsilon: 0.0,
                ..Default::default()
            }),
            "epsilon",
        ),
        (
            Cfg::Adam(AdamConfig {
                weight_decay: f32::NAN,
                ..Default::default()
            }),
            "weight_decay",
        ),
        (
            Cfg::AdamW(AdamWConfig {
                lr: 1.0,
                weight_decay: 1.0,
                ..AdamWConfig::torch()
            }),
            "weight_decay",
        ),
        (
            Cfg::AdamW(AdamWConfig {
                beta_1: 1.5,
                ..Default::default()
            }),
            "beta_1",
        ),
        (
            Cfg::Ftrl(FtrlConfig {
                learning_rate_power: 0.5,
                ..Default::default()
            }),
            "learning_rate_power",
        ),
        (
            Cfg::Ftrl(FtrlConfig {
                l1_regularization_strength: -1.0,
                ..Default::default()
            }),
            "l1_regularization_strength",
        ),
        (
            Cfg::Ftrl(FtrlConfig {
                l2_shrinkage_regularization_strength: f32::NAN,
                ..Default::default()
            }),
            "l2_shrinkage_regularization_strength",
        ),
        (
            Cfg::Ftrl(FtrlConfig {
                beta: -0.5,
                ..Default::default()
            }),
            "beta",
        ),
        (
            Cfg::Ftrl(FtrlConfig {
                initial_accumulator_value: 0.0,
                ..Default::default()
            }),
            "initial_accumulator_value",
        ),
    ];
    for (cfg, field) in bad {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        let before = snapshot(&table, opt.as_ref());
        match opt.step(&mut table, &run.sparse_grad(0)) {
            Err(Error::InvalidConfig { field: f, reason }) => {
                assert_eq!(f, field, "{cfg:?}");
                assert!(reason.contains("got"), "{reason}");
            }
            other => panic!("{cfg:?}: {other:?}"),
        }
        assert_same(&table, opt.as_ref(), &before, field);
        assert_eq!(opt.state().shape, None);
    }
}

#[test]
fn catch_up_brings_rows_current() {
    let run = example_run();
    let cfg = every_kind()[2]; // centred RMSprop with momentum, DenseExact
    let mut table = run.table();
    let mut w = table.to_vec();
    let mut opt = cfg.optimizer();
    let mut dense = Dense::new(cfg, run.rows, run.dim);
    let all = vec![true; run.rows];
    for t in 0..run.steps.len() {
        opt.step(&mut table, &run.sparse_grad(t)).unwrap();
        dense.step(&mut w, &run.dense_grad(t), &all, t as u64 + 1, cfg.lr());
    }
    // Rows 20..30 were never touched, rows 0..3 were touched at every step.
    let rows = [25, 0, 25, 17, 29];
    opt.catch_up(&mut table, &rows).unwrap();
    let mut current = vec![false; run.rows];
    for &r in &rows {
        current[r] = true;
    }
    let state = opt.state();
    compare(
        &run,
        cfg,
        &table.to_vec(),
        &w,
        &state,
        &dense,
        &current,
        "caught up",
    );
    for &r in &rows {
        assert_eq!(state.last_step[r], state.steps);
    }
    assert!(
        state.last_step[22] < state.steps,
        "other rows wait for flush"
    );
}

#[test]
fn empty_steps_count_under_dense_exact() {
    let (rows, dim) = (4, 3);
    for semantics in [Semantics::Lazy, Semantics::DenseExact] {
        let mut table = EmbeddingTable::from_rows(rows, dim, &[1.0; 12]).unwrap();
        let mut opt = Sgd::new(SgdConfig {
            lr: 0.1,
            weight_decay: 0.5,
            semantics,
            ..SgdConfig::default()
        });
        let empty = SparseGrad::new(dim);
        for _ in 0..3 {
            opt.step(&mut table, &empty).unwrap();
        }
        opt.flush(&mut table).unwrap();
        assert_eq!(opt.state().steps, 3);
        // Keras decays every weight by (1 − ηλ) per step, gradient or not.
        let want = match semantics {
            Semantics::Lazy => 1.0,
            Semantics::DenseExact => 0.95f32.powi(3),
        };
        assert_close(
            &table.to_vec(),
            &vec![want; rows * dim],
            REL,
            "decayed weights",
        );
    }
}

#[test]
fn state_export_names_shapes_and_config() {
    let mut table = EmbeddingTable::from_rows(2, 3, &[0.0; 6]).unwrap();
    let mut opt = RmsProp::new(RmsPropConfig {
        centered: true,
        momentum: 0.5,
        ..RmsPropConfig::torch()
    });
    assert_eq!(opt.state().shape, None);
    let mut grad = SparseGrad::new(3);
    grad.accumulate_lookup(&[1u32], &[1.0, 2.0, 3.0]).unwrap();
    opt.step(&mut table, &grad).unwrap();
    let s = opt.state();
    assert_eq!(s.kind, "rmsprop");
    assert_eq!(s.shape, Some((2, 3)));
    let names: Vec<&str> = s.arrays.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["square_avg", "grad_avg", "momentum"]);
    assert!(s.arrays.iter().all(|a| a.shape == [2, 3]));
    let field = |n: &str| s.config.iter().find(|(k, _)| k == n).unwrap().1;
    assert_eq!(field("rho"), 0.99f32 as f64);
    assert_eq!(field("eps_placement"), 1.0);
    assert_eq!(field("centered"), 1.0);
    assert_eq!(s.last_step, [0, 1]); // dense-exact: row 0 lags one step
    let a: &StateArray = &s.arrays[0];
    assert_eq!(&a.values[..3], &[0.0; 3]); // row 0 untouched
}

// ---------------------------------------------------------------- states no step produces

/// A state for `shape` with arrays of `values` each (shape as claimed).
fn claimed(
    kind: &str,
    cfg: &OptimizerState,
    shape: (usize, usize),
    values: usize,
) -> OptimizerState {
    OptimizerState {
        kind: kind.into(),
        shape: Some(shape),
        arrays: cfg
            .arrays
            .iter()
            .map(|a| StateArray {
                name: a.name.clone(),
                shape: vec![shape.0, shape.1],
                values: vec![0.5; values],
            })
            .collect(),
        ..cfg.clone()
    }
}

/// Issue 18: a claimed shape whose stride or size overflows, or a dim of
/// 0, is an `Err` (it used to panic: "chunk_size must not be zero", or an
/// overflow), and nothing is allocated for a shape the arrays do not fill.
#[test]
fn load_state_refuses_impossible_shapes_without_panicking_or_allocating() {
    let run = example_run();
    for cfg in every_kind() {
        let mut opt = cfg.optimizer();
        let mut table = run.table();
        opt.step(&mut table, &run.sparse_grad(0)).unwrap();
        let good = opt.state();
        let what = format!("{cfg:?}");
        for shape in [
            (1, usize::MAX),
            (5, 0),
            (0, 5),
            (usize::MAX, 16),
            (1 << 40, 64),
        ] {
            let bad = claimed(&good.kind, &good, shape, 4);
            let err = opt.load_state(bad).unwrap_err();
            assert!(
                !matches!(err, Error::Alloc { .. }),
                "{what}, {shape:?}: checked before allocating, got {err}"
            );
            assert_eq!(opt.state(), good, "{what}");
        }
    }
}

/// Issue 18: a finite gradient of 1e20 used to make an Adagrad
/// accumulator infinite, which saved but did not load. Accumulators now
/// saturate at `f32::MAX`, so the state saves, loads and resumes.
#[test]
fn huge_gradients_leave_a_state_that_saves_and_loads() {
    let dir = Scratch::new("optim-huge");
    for cfg in every_kind() {
        let mut table = EmbeddingTable::from_rows(3, 4, &values(1, 12, -1.0, 1.0)).unwrap();
        let mut opt = cfg.optimizer();
        let mut grad = SparseGrad::new(4);
        grad.accumulate_lookup(&[1u32], &[1e20, -1e20, 3e19, 1.0])
            .unwrap();
        for _ in 0..5 {
            opt.step(&mut table, &grad).unwrap();
        }
        opt.flush(&mut table).unwrap();
        let what = format!("{cfg:?}");
        assert!(table.to_vec().iter().all(|w| w.is_finite()), "{what}");
        let state = opt.state();
        for a in &state.arrays {
            assert!(a.values.iter().all(|x| x.is_finite()), "{what}: {}", a.name);
        }
        let mut back = cfg.optimizer();
        back.load_state(state.clone()).unwrap();
        assert_eq!(back.state(), state, "{what}");
        let path = dir.path("huge.safetensors");
        io::save_checkpoint(&path, &table, opt.as_ref()).unwrap();
        let mut loaded = other_of_kind(cfg).optimizer();
        let table_back = io::load_checkpoint(&path, &mut loaded).unwrap();
        assert_bits_eq(&table_back.to_vec(), &table.to_vec(), &what);
        assert_eq!(loaded.state(), state, "{what}");
    }
}

/// Issue 18: centred RMSprop turned finite gradients of 1e20 into a NaN
/// weight (∞ − ∞) with `Ok`.
#[test]
fn centred_rmsprop_stays_finite_on_huge_gradients() {
    let mut table = EmbeddingTable::from_rows(2, 3, &[0.5; 6]).unwrap();
    let mut opt = RmsProp::new(RmsPropConfig {
        centered: true,
        momentum: 0.5,
        ..RmsPropConfig::keras()
    });
    let mut grad = SparseGrad::new(3);
    grad.accumulate_lookup(&[0u32], &[1e20, 1e20, -1e20])
        .unwrap();
    for _ in 0..4 {
        opt.step(&mut table, &grad).unwrap();
        assert!(table.to_vec().iter().all(|w| w.is_finite()));
    }
    let state = opt.state();
    assert!(
        state
            .arrays
            .iter()
            .all(|a| a.values.iter().all(|x| x.is_finite()))
    );
}

/// Issue 18: a saved step counter of `u64::MAX` loaded, and the next step
/// overflowed. Counters are limited to `i64::MAX` (what a checkpoint
/// stores); the step after the limit is refused with nothing written.
#[test]
fn step_counters_stop_at_their_limit() {
    let run = example_run();
    let dir = Scratch::new("optim-steps");
    for cfg in every_kind() {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        opt.step(&mut table, &run.sparse_grad(0)).unwrap();
        let good = opt.state();
        let what = format!("{cfg:?}");
        let mut bad = good.clone();
        bad.steps = u64::MAX;
        assert!(matches!(
            opt.load_state(bad),
            Err(Error::InvalidConfig { field: "steps", .. })
        ));
        assert_eq!(opt.state(), good, "{what}");

        let mut last = good.clone();
        last.steps = i64::MAX as u64;
        opt.load_state(last.clone()).unwrap();
        let path = dir.path("last.safetensors");
        io::save_checkpoint(&path, &table, opt.as_ref()).unwrap();
        let mut loaded = cfg.optimizer();
        io::load_checkpoint(&path, &mut loaded).unwrap();
        assert_eq!(loaded.state(), last, "{what}");
        let before = snapshot(&table, opt.as_ref());
        match opt.step(&mut table, &run.sparse_grad(1)) {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "steps", "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        assert_same(&table, opt.as_ref(), &before, &what);
        let ids: Vec<u32> = run.steps[1].0.iter().map(|&r| r as u32).collect();
        let mut concrete = Concrete::new(cfg);
        concrete.get().load_state(last).unwrap();
        assert!(
            concrete
                .step_lookup(&mut table, &ids, &run.grad_out(1))
                .is_err()
        );
        assert_same(&table, opt.as_ref(), &before, &what);
    }
}

/// Issue 18: `load_state` accepted a negative Adagrad accumulator, and the
/// next step gave NaN weights with `Ok`. Values no step produces and whose
/// roots the updates take (negative accumulators and second moments) are
/// refused. (Zero is accepted: a layer zeroes a new padding row's state.)
#[test]
fn load_state_refuses_values_no_step_produces() {
    let run = example_run();
    let cases: [(Cfg, &str, f32); 6] = [
        (Cfg::Adagrad(AdagradConfig::torch()), "accumulator", -1.0),
        (
            Cfg::RowWise(RowWiseAdagradConfig::default()),
            "accumulator",
            -0.5,
        ),
        (Cfg::Adam(AdamConfig::keras()), "velocity", -1e-30),
        (
            Cfg::AdamW(AdamWConfig {
                amsgrad: true,
                ..AdamWConfig::keras()
            }),
            "velocity_hat",
            -2.0,
        ),
        (Cfg::RmsProp(RmsPropConfig::keras()), "square_avg", -0.5),
        (Cfg::Ftrl(FtrlConfig::keras()), "accumulator", -0.1),
    ];
    for (cfg, array, value) in cases {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        opt.step(&mut table, &run.sparse_grad(0)).unwrap();
        let good = opt.state();
        let mut bad = good.clone();
        let a = bad.arrays.iter_mut().find(|a| a.name == array).unwrap();
        a.values[7] = value;
        match opt.load_state(bad) {
            Err(Error::InvalidConfig { field, reason }) => {
                assert_eq!(field, "arrays");
                assert!(reason.contains("position 7"), "{reason}");
            }
            other => panic!("{cfg:?}: {other:?}"),
        }
        assert_eq!(opt.state(), good, "{cfg:?}");
    }
}

#[test]
fn load_state_refuses_bad_histories() {
    let run = example_run();
    let cfg = Cfg::Adam(AdamConfig::keras());
    let mut table = run.table();
    let mut opt = cfg.optimizer();
    for t in 0..4 {
        opt.set_lr(0.001 * (t + 1) as f32).unwrap();
        opt.step(&mut table, &run.sparse_grad(t)).unwrap();
    }
    let good = opt.state();
    assert_eq!(good.lr_history.len(), 3);
    let bad_histories = [
        vec![(2, 0.001), (1, 0.002)], // not increasing
        vec![(0, 0.001)],             // ends before any step
        vec![(9, 0.001)],             // after the last step
        vec![(2, -0.001)],            // not a rate
        vec![(2, f32::NAN)],
    ];
    for history in bad_histories {
        let mut bad = good.clone();
        bad.lr_history = history.clone();
        assert!(
            matches!(
                opt.load_state(bad),
                Err(Error::InvalidConfig {
                    field: "lr_history",
                    ..
                })
            ),
            "{history:?}"
        );
        assert_eq!(opt.state(), good);
    }
    // Lazy optimizers have no rows to catch up: no history either.
    let mut lazy = cfg_state(Cfg::Adam(AdamConfig::torch_sparse()));
    lazy.lr_history = vec![(1, 0.5)];
    assert!(Adam::default().load_state(lazy).is_err());
}

/// The state of one step of `cfg` on the example run.
fn cfg_state(cfg: Cfg) -> OptimizerState {
    let run = example_run();
    let mut table = run.table();
    let mut opt = cfg.optimizer();
    opt.step(&mut table, &run.sparse_grad(0)).unwrap();
    opt.state()
}

/// States saved before Adagrad and RMSprop had weight decay (and Adagrad
/// `lr_decay` and semantics) still load, with those off, and resume as
/// the optimizer that saved them would have.
#[test]
fn states_saved_before_the_new_fields_load() {
    let run = example_run();
    let added: [(Cfg, &[&str]); 2] = [
        (
            Cfg::Adagrad(AdagradConfig::torch()),
            &["lr_decay", "weight_decay", "semantics"],
        ),
        (Cfg::RmsProp(RmsPropConfig::keras_lazy()), &["weight_decay"]),
    ];
    for (cfg, new_fields) in added {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        opt.step(&mut table, &run.sparse_grad(0)).unwrap();
        let mut old = opt.state();
        old.config
            .retain(|(n, _)| !new_fields.contains(&n.as_str()));
        let mut loaded = other_of_kind(cfg).optimizer();
        loaded.load_state(old).unwrap();
        let mut table2 = table.clone();
        opt.step(&mut table, &run.sparse_grad(1)).unwrap();
        loaded.step(&mut table2, &run.sparse_grad(1)).unwrap();
        assert_bits_eq(&table2.to_vec(), &table.to_vec(), &format!("{cfg:?}"));
    }
}

// ---------------------------------------------------------------- learning rates

#[test]
fn set_lr_checks_the_rate_with_the_config_and_changes_nothing_on_error() {
    let run = example_run();
    for cfg in every_kind() {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        opt.step(&mut table, &run.sparse_grad(0)).unwrap();
        let before = opt.state();
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            match opt.set_lr(bad) {
                Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "lr"),
                other => panic!("{cfg:?}: {other:?}"),
            }
            assert_eq!(opt.state(), before);
            assert_eq!(opt.lr(), cfg.lr());
        }
        opt.set_lr(cfg.lr() / 2.0).unwrap();
        assert_eq!(opt.lr(), cfg.lr() / 2.0);
        assert_eq!(opt.steps(), 1);
    }
    // A rate the weight decay cannot go with.
    let mut sgd = Sgd::new(SgdConfig {
        weight_decay: 2.0,
        ..SgdConfig::keras()
    });
    assert!(matches!(
        sgd.set_lr(0.5),
        Err(Error::InvalidConfig {
            field: "weight_decay",
            ..
        })
    ));
    assert_eq!(sgd.lr(), 0.01);
}

/// A schedule gives bitwise what calling `set_lr` with its rate before
/// each step gives, survives `load_state`, and a rate it cannot take fails
/// the step with nothing written.
#[test]
fn schedules_equal_setting_the_rate_before_each_step() {
    let run = example_run();
    let schedule = ExponentialDecay {
        initial_learning_rate: 0.02,
        decay_steps: 3,
        decay_rate: 0.5,
        staircase: false,
    };
    for cfg in every_kind() {
        let (mut a, mut b) = (run.table(), run.table());
        let mut scheduled = cfg.optimizer();
        scheduled.set_schedule(Some(Arc::new(schedule)));
        let mut manual = cfg.optimizer();
        for t in 0..run.steps.len() {
            assert_eq!(scheduled.lr(), schedule.lr(t as u64));
            if t == 4 {
                // Resuming from a state keeps the schedule.
                let state = scheduled.state();
                scheduled.load_state(state).unwrap();
            }
            scheduled.step(&mut a, &run.sparse_grad(t)).unwrap();
            manual.set_lr(schedule.lr(t as u64)).unwrap();
            manual.step(&mut b, &run.sparse_grad(t)).unwrap();
        }
        scheduled.flush(&mut a).unwrap();
        manual.flush(&mut b).unwrap();
        let what = format!("{cfg:?}");
        assert_bits_eq(&a.to_vec(), &b.to_vec(), &what);
        assert_state_bits(&scheduled.state(), &manual.state(), &what);

        scheduled.set_schedule(Some(Arc::new(StepLr {
            lr: 1.0,
            step_size: 1,
            gamma: 0.0,
        })));
        let before = snapshot(&a, scheduled.as_ref());
        assert!(matches!(
            scheduled.step(&mut a, &run.sparse_grad(0)),
            Err(Error::InvalidConfig { field: "lr", .. })
        ));
        assert_same(&a, scheduled.as_ref(), &before, &what);
    }
}

/// Keras' `ExponentialDecay` and PyTorch's `StepLR`, by their formulas.
#[test]
fn schedules_follow_their_frameworks_formulas() {
    let keras = ExponentialDecay {
        initial_learning_rate: 0.1,
        decay_steps: 1000,
        decay_rate: 0.96,
        staircase: false,
    };
    for step in [0u64, 1, 999, 1000, 12345] {
        let p = step as f32 / 1000.0;
        assert_eq!(keras.lr(step), 0.1 * 0.96f32.powf(p));
    }
    let stairs = ExponentialDecay {
        staircase: true,
        ..keras
    };
    assert_eq!(stairs.lr(1999), 0.1 * 0.96f32);
    let torch = StepLr {
        lr: 0.05,
        step_size: 30,
        gamma: 0.1,
    };
    assert_eq!(torch.lr(29), 0.05);
    assert_eq!(torch.lr(30), (0.05f64 * 0.1) as f32);
    assert_eq!(torch.at(95), (0.05f64 * 0.1f64.powi(3)) as f32);
}

/// Under DenseExact a row that lagged across rate changes catches up with
/// each missed step's rate: the rates are part of the state and of a
/// checkpoint, and `flush` forgets them.
#[test]
fn earlier_rates_are_saved_until_every_row_is_current() {
    let run = example_run();
    let dir = Scratch::new("optim-history");
    for cfg in every_kind().into_iter().filter(|c| c.dense_exact()) {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        for t in 0..6 {
            opt.set_lr(cfg.lr() * (1.0 - 0.1 * t as f32)).unwrap();
            opt.step(&mut table, &run.sparse_grad(t)).unwrap();
        }
        let what = format!("{cfg:?}");
        let state = opt.state();
        let path = dir.path("h.safetensors");
        io::save_checkpoint(&path, &table, opt.as_ref()).unwrap();
        let mut loaded = other_of_kind(cfg).optimizer();
        let mut table_back = io::load_checkpoint(&path, &mut loaded).unwrap();
        assert_eq!(loaded.state(), state, "{what}");
        for t in 6..8 {
            opt.step(&mut table, &run.sparse_grad(t)).unwrap();
            loaded.step(&mut table_back, &run.sparse_grad(t)).unwrap();
        }
        opt.flush(&mut table).unwrap();
        loaded.flush(&mut table_back).unwrap();
        assert_bits_eq(&table_back.to_vec(), &table.to_vec(), &what);
        assert!(opt.state().lr_history.is_empty(), "{what}");
    }
}

// ---------------------------------------------------------------- presets

/// `::keras()` and `Default` give Keras' dense numbers wherever lazy and
/// dense differ; the lazy TensorFlow-sparse semantics are `::keras_lazy()`.
#[test]
fn presets_name_their_semantics() {
    let dense = Semantics::DenseExact;
    assert_eq!(SgdConfig::default().semantics, dense);
    assert_eq!(SgdConfig::torch().semantics, dense);
    assert_eq!(SgdConfig::keras_lazy().semantics, Semantics::Lazy);
    assert_eq!(RmsPropConfig::default().semantics, dense);
    assert_eq!(RmsPropConfig::torch().semantics, dense);
    assert_eq!(RmsPropConfig::keras_lazy().semantics, Semantics::Lazy);
    assert_eq!(AdagradConfig::default().semantics, dense);
    assert_eq!(AdamConfig::default(), AdamConfig::keras());
    assert_eq!(AdamConfig::keras().semantics, dense);
    assert_eq!(AdamConfig::torch().semantics, dense);
    let sparse = AdamConfig::torch_sparse();
    assert_eq!(
        (sparse.semantics, sparse.style),
        (Semantics::Lazy, AdamStyle::TorchSparse)
    );
    assert_eq!(AdamConfig::keras_lazy().semantics, Semantics::Lazy);
    assert_eq!(AdamWConfig::default(), AdamWConfig::keras());
    assert_eq!(AdamWConfig::torch().style, AdamStyle::Torch);
    assert_eq!(FtrlConfig::default(), FtrlConfig::keras());
    assert_eq!(FtrlConfig::keras_lazy().semantics, Semantics::Lazy);
    // Without momentum or decay, dense-exact SGD keeps no per-row counts.
    let mut table = EmbeddingTable::from_rows(2, 1, &[1.0, 2.0]).unwrap();
    let mut sgd = Sgd::default();
    let mut grad = SparseGrad::new(1);
    grad.accumulate_lookup(&[0u32], &[1.0]).unwrap();
    sgd.step(&mut table, &grad).unwrap();
    assert!(!sgd.has_lagging_rows());
    assert!(sgd.state().last_step.is_empty());
}
