//! embtable's `::keras()`, `::torch()` and `::torch_sparse()` presets
//! against the weights Keras 3 and PyTorch computed for the same training
//! (tests/fixtures/optim_trajectories.txt, written by
//! scripts/make_optim_trajectories.py with the real frameworks): every
//! weight after every step, within a tolerance that covers the frameworks'
//! own roundings (fused multiply-adds in PyTorch's vector kernels, Keras'
//! torch backend folding its updates differently) and not the differences
//! of formula this crate must get right (ε's placement, `β^t` in `f32`
//! for Keras and `f64` for PyTorch, dense versus lazy rows).

mod common;

use std::sync::Arc;

use common::fixture;
use common::optim::Cfg;
use embtable::optim::{ExponentialDecay, LrSchedule, StepLr};
use embtable::{
    AdagradConfig, AdamConfig, AdamWConfig, EmbeddingTable, FtrlConfig, RmsPropConfig, Semantics,
    SgdConfig, SparseGrad, SparseOptimizer,
};

/// Largest difference allowed, relative to the larger of `|want|` and the
/// case's floor: the frameworks' own roundings reach 5e-6 over 20 steps
/// (Keras' torch backend folds SGD's Nesterov step differently).
const TOL: f64 = 1e-5;
/// Weights near zero are judged at this magnitude, unless the case says
/// `floor=…` (weights that are nothing but updates, never crossing zero,
/// where the case also says how close: `tol=…`).
const FLOOR: f64 = 0.1;

/// A case's `name=value` setting, or `default`.
fn setting(case: &Case, name: &str, default: f64) -> f64 {
    case.config
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .map_or(default, |v| v.parse().unwrap())
}

struct Case {
    name: String,
    config: String,
    rows: usize,
    dim: usize,
    table: Vec<f32>,
    steps: Vec<(Vec<u32>, Vec<f32>)>,
    weights: Vec<Vec<f32>>,
}

fn floats(words: &[&str]) -> Vec<f32> {
    words
        .iter()
        .map(|w| f32::from_bits(u32::from_str_radix(w, 16).expect("hex float")))
        .collect()
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("optim_trajectories.txt")).unwrap();
    let mut cases = Vec::new();
    let mut case: Option<Case> = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "case" => {
                case = Some(Case {
                    name: words[1].to_owned(),
                    config: words[2..].join(" "),
                    rows: 0,
                    dim: 0,
                    table: vec![],
                    steps: vec![],
                    weights: vec![],
                })
            }
            "table" => {
                let c = case.as_mut().unwrap();
                c.rows = words[1].parse().unwrap();
                c.dim = words[2].parse().unwrap();
                c.table = floats(&words[3..]);
            }
            "step" => {
                let split = words.iter().position(|&w| w == ";").unwrap();
                let ids = words[1..split].iter().map(|w| w.parse().unwrap()).collect();
                let grad = floats(&words[split + 1..]);
                case.as_mut().unwrap().steps.push((ids, grad));
            }
            "weights" => case.as_mut().unwrap().weights.push(floats(&words[1..])),
            "end" => cases.push(case.take().unwrap()),
            other => panic!("unknown record {other:?}"),
        }
    }
    cases
}

/// The embtable optimizer a case's config line names: `kind preset=p
/// field=value …`, and a schedule.
fn optimizer(config: &str) -> (Cfg, Option<Arc<dyn LrSchedule>>) {
    let mut words = config.split_whitespace();
    let kind = words.next().unwrap();
    let fields: Vec<(&str, &str)> = words.map(|w| w.split_once('=').unwrap()).collect();
    let get = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|&(_, v)| v);
    let _ = (get("floor"), get("tol")); // read by the tests
    let num = |name: &str| get(name).map(|v| v.parse::<f64>().unwrap());
    let preset = get("preset").unwrap();
    macro_rules! set {
        ($c:ident, $($field:ident: $ty:ty),*) => {
            $(if let Some(v) = num(stringify!($field)) {
                $c.$field = v as $ty;
            })*
        };
    }
    let flag = |name: &str| num(name) == Some(1.0);
    let cfg = match kind {
        "sgd" => {
            let mut c = if preset == "keras" {
                SgdConfig::keras()
            } else {
                SgdConfig::torch()
            };
            set!(c, lr: f32, momentum: f32, weight_decay: f32);
            c.nesterov = flag("nesterov");
            Cfg::Sgd(c)
        }
        "rmsprop" => {
            let mut c = if preset == "keras" {
                RmsPropConfig::keras()
            } else {
                RmsPropConfig::torch()
            };
            set!(c, lr: f32, momentum: f32, weight_decay: f32);
            c.centered = flag("centered");
            Cfg::RmsProp(c)
        }
        "adagrad" => {
            let mut c = if preset == "keras" {
                AdagradConfig::keras()
            } else {
                AdagradConfig::torch()
            };
            set!(c, lr: f32, lr_decay: f32, weight_decay: f32);
            Cfg::Adagrad(c)
        }
        "adam" => {
            let mut c = match preset {
                "keras" => AdamConfig::keras(),
                "torch" => AdamConfig::torch(),
                _ => AdamConfig::torch_sparse(),
            };
            set!(c, lr: f32, weight_decay: f32);
            c.amsgrad = flag("amsgrad");
            Cfg::Adam(c)
        }
        "adamw" => {
            let mut c = if preset == "keras" {
                AdamWConfig::keras()
            } else {
                AdamWConfig::torch()
            };
            set!(c, lr: f32, weight_decay: f32);
            Cfg::AdamW(c)
        }
        "ftrl" => {
            let mut c = FtrlConfig::keras();
            set!(c, lr: f32, learning_rate_power: f32, l1_regularization_strength: f32,
                l2_regularization_strength: f32, l2_shrinkage_regularization_strength: f32,
                beta: f32);
            Cfg::Ftrl(c)
        }
        other => panic!("unknown optimizer {other}"),
    };
    let schedule = get("schedule").map(|s| -> Arc<dyn LrSchedule> {
        let parts: Vec<&str> = s.split(':').collect();
        let n = |i: usize| parts[i].parse::<f64>().unwrap();
        match parts[0] {
            "exponential" => Arc::new(ExponentialDecay {
                initial_learning_rate: n(1) as f32,
                decay_steps: n(2) as u64,
                decay_rate: n(3) as f32,
                staircase: false,
            }),
            "steplr" => Arc::new(StepLr {
                lr: n(1),
                step_size: n(2) as u64,
                gamma: n(3),
            }),
            other => panic!("unknown schedule {other}"),
        }
    });
    (cfg, schedule)
}

/// The largest relative difference over the run, after each step with
/// every row brought current (on a copy, so lagging rows stay lagging).
fn deviation(case: &Case, cfg: Cfg, schedule: Option<Arc<dyn LrSchedule>>) -> (f64, String) {
    let floor = setting(case, "floor", FLOOR);
    let mut table = EmbeddingTable::from_rows(case.rows, case.dim, &case.table).unwrap();
    let mut opt = cfg.optimizer();
    opt.set_schedule(schedule.clone());
    let mut worst = (0.0, String::new());
    for (t, ((ids, grad_out), want)) in case.steps.iter().zip(&case.weights).enumerate() {
        let mut grad = SparseGrad::for_table(&table);
        grad.accumulate_lookup(ids, grad_out).unwrap();
        opt.step(&mut table, &grad).unwrap();
        let mut current = table.clone();
        let mut copy = cfg.optimizer();
        copy.load_state(opt.state()).unwrap();
        copy.flush(&mut current).unwrap();
        for (i, (&got, &want)) in current.to_vec().iter().zip(want).enumerate() {
            let d = (got as f64 - want as f64).abs() / (want.abs() as f64).max(floor);
            if d > worst.0 {
                worst = (d, format!("step {t}, weight {i}: got {got}, want {want}"));
            }
        }
    }
    worst
}

#[test]
fn presets_give_the_frameworks_trajectories() {
    let cases = cases();
    assert_eq!(cases.len(), 21);
    let mut failures = Vec::new();
    for case in &cases {
        let (cfg, schedule) = optimizer(&case.config);
        let (worst, at) = deviation(case, cfg, schedule);
        eprintln!(
            "{:<28} max relative difference {worst:.2e} ({at})",
            case.name
        );
        if worst > setting(case, "tol", TOL) {
            failures.push(format!("{}: {worst:.2e} at {at}", case.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The other semantics, or the other framework's rounding of the same
/// formula, would not pass: the tolerance tells them apart.
#[test]
fn the_tolerance_separates_what_the_presets_must_get_right() {
    let cases = cases();
    let find = |name: &str| cases.iter().find(|c| c.name == name).unwrap();
    let lazy = |cfg: Cfg| match cfg {
        Cfg::RmsProp(c) => Cfg::RmsProp(RmsPropConfig {
            semantics: Semantics::Lazy,
            ..c
        }),
        Cfg::Adam(c) => Cfg::Adam(AdamConfig {
            semantics: Semantics::Lazy,
            ..c
        }),
        Cfg::Ftrl(c) => Cfg::Ftrl(FtrlConfig {
            semantics: Semantics::Lazy,
            ..c
        }),
        Cfg::Sgd(c) => Cfg::Sgd(SgdConfig {
            semantics: Semantics::Lazy,
            ..c
        }),
        other => other,
    };
    // Lazy rows where the framework is dense.
    for name in [
        "keras_rmsprop_momentum",
        "keras_adam",
        "keras_ftrl",
        "torch_sgd_sparse_momentum",
    ] {
        let case = find(name);
        let (cfg, schedule) = optimizer(&case.config);
        let (worst, _) = deviation(case, lazy(cfg), schedule);
        assert!(worst > 100.0 * TOL, "{name} lazy: {worst:.2e}");
    }
    // The bias corrections' powers in float64 (PyTorch's) where Keras
    // computes them in float32: small weights show it.
    let case = find("keras_adam_from_zero");
    let (Cfg::Adam(c), _) = optimizer(&case.config) else {
        unreachable!()
    };
    let f64_powers = AdamConfig {
        style: embtable::AdamStyle::TorchSparse,
        ..c
    };
    let (worst, _) = deviation(case, Cfg::Adam(f64_powers), None);
    let tol = setting(case, "tol", TOL);
    assert!(worst > 4.0 * tol, "float64 powers: {worst:.2e}");
}
