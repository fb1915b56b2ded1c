//! The sparse optimizers against plain dense optimizers written here for
//! obviousness: full matrices, one loop per formula, the dense gradient
//! `onehot(ids)ᵀ · G` every step.
//!
//! - `Semantics::Lazy`: after every step, the rows of the batch equal the
//!   dense update applied to those rows only, and every other row (weights
//!   and state) is bitwise unchanged.
//! - `Semantics::DenseExact`: after every step the rows of the batch equal
//!   the fully dense optimizer, and after `flush` every row does.
//! - Every tier and thread count gives bitwise the same table and state.

mod common;

use common::{assert_bits_eq, assert_close, each_config, matmul, onehot, transpose};
use embtable::workloads::values;
use embtable::{
    Adagrad, AdagradConfig, EmbeddingTable, EpsPlacement, Error, OptimizerState, RmsProp,
    RmsPropConfig, RowWiseAdagrad, RowWiseAdagradConfig, Semantics, Sgd, SgdConfig, SgdStyle,
    SparseGrad, SparseOptimizer, StateArray,
};
use proptest::prelude::*;

const REL: f32 = 1e-5;

// ---------------------------------------------------------------- configs

/// One optimizer configuration under test.
#[derive(Clone, Copy, Debug)]
enum Cfg {
    Sgd(SgdConfig),
    RmsProp(RmsPropConfig),
    Adagrad(AdagradConfig),
    RowWise(RowWiseAdagradConfig),
}

impl Cfg {
    fn optimizer(&self) -> Box<dyn SparseOptimizer + Send> {
        match *self {
            Cfg::Sgd(c) => Box::new(Sgd::new(c)),
            Cfg::RmsProp(c) => Box::new(RmsProp::new(c)),
            Cfg::Adagrad(c) => Box::new(Adagrad::new(c)),
            Cfg::RowWise(c) => Box::new(RowWiseAdagrad::new(c)),
        }
    }

    fn dense_exact(&self) -> bool {
        match self {
            Cfg::Sgd(c) => c.semantics == Semantics::DenseExact,
            Cfg::RmsProp(c) => c.semantics == Semantics::DenseExact,
            Cfg::Adagrad(_) | Cfg::RowWise(_) => false,
        }
    }
}

fn semantics() -> impl Strategy<Value = Semantics> {
    prop_oneof![Just(Semantics::Lazy), Just(Semantics::DenseExact)]
}

fn placement() -> impl Strategy<Value = EpsPlacement> {
    prop_oneof![
        Just(EpsPlacement::InsideSqrt),
        Just(EpsPlacement::OutsideSqrt)
    ]
}

/// Off half of the time, else in `range`.
fn maybe(range: std::ops::Range<f32>) -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), range]
}

fn epsilon() -> impl Strategy<Value = f32> {
    (-8i32..=-2).prop_map(|e| 10f32.powi(e))
}

fn sgd() -> impl Strategy<Value = Cfg> {
    (
        0.001f32..0.2,
        maybe(0.1..0.95),
        any::<bool>(),
        maybe(0.001..1.0),
        semantics(),
        prop_oneof![Just(SgdStyle::Keras), Just(SgdStyle::Torch)],
    )
        .prop_map(|(lr, momentum, nesterov, weight_decay, semantics, style)| {
            Cfg::Sgd(SgdConfig {
                lr,
                momentum,
                nesterov,
                weight_decay,
                semantics,
                style,
            })
        })
}

// Adaptive optimizers move every weight by about lr whatever the gradient's
// scale; lr stays small next to the weights (in [-1, 1]) so that rounding
// differences of the update stay below `assert_close`'s absolute floor
// where a weight cancels to near zero.
fn rmsprop() -> impl Strategy<Value = Cfg> {
    (
        0.001f32..0.05,
        0.5f32..0.99,
        maybe(0.1..0.95),
        epsilon(),
        any::<bool>(),
        placement(),
        semantics(),
    )
        .prop_map(
            |(lr, rho, momentum, epsilon, centered, eps_placement, semantics)| {
                Cfg::RmsProp(RmsPropConfig {
                    lr,
                    rho,
                    momentum,
                    epsilon,
                    centered,
                    eps_placement,
                    semantics,
                })
            },
        )
}

fn adagrad() -> impl Strategy<Value = Cfg> {
    (0.001f32..0.05, maybe(0.01..1.0), epsilon(), placement()).prop_map(
        |(lr, initial_accumulator_value, epsilon, eps_placement)| {
            Cfg::Adagrad(AdagradConfig {
                lr,
                initial_accumulator_value,
                epsilon,
                eps_placement,
            })
        },
    )
}

fn rowwise() -> impl Strategy<Value = Cfg> {
    (0.001f32..0.05, maybe(0.01..1.0), epsilon()).prop_map(
        |(lr, initial_accumulator_value, epsilon)| {
            Cfg::RowWise(RowWiseAdagradConfig {
                lr,
                initial_accumulator_value,
                epsilon,
            })
        },
    )
}

// ---------------------------------------------------------------- the dense reference

/// A dense optimizer: the weights and every state array as full
/// `rows × dim` matrices (row-wise Adagrad: `rows`), updated with plain loops.
struct Dense {
    cfg: Cfg,
    dim: usize,
    /// Named state arrays, as the sparse optimizers export them.
    arrays: Vec<(&'static str, Vec<f32>)>,
}

impl Dense {
    fn new(cfg: Cfg, rows: usize, dim: usize) -> Self {
        let full = |init: f32| vec![init; rows * dim];
        let arrays = match cfg {
            Cfg::Sgd(c) if c.momentum > 0.0 => vec![("momentum", full(0.0))],
            Cfg::Sgd(_) => vec![],
            Cfg::RmsProp(c) => {
                let mut a = vec![("square_avg", full(0.0))];
                if c.centered {
                    a.push(("grad_avg", full(0.0)));
                }
                if c.momentum > 0.0 {
                    a.push(("momentum", full(0.0)));
                }
                a
            }
            Cfg::Adagrad(c) => vec![("accumulator", full(c.initial_accumulator_value))],
            Cfg::RowWise(c) => vec![("accumulator", vec![c.initial_accumulator_value; rows])],
        };
        Self { cfg, dim, arrays }
    }

    fn array(&mut self, name: &str) -> &mut Vec<f32> {
        &mut self.arrays.iter_mut().find(|(n, _)| *n == name).unwrap().1
    }

    /// One step with the dense gradient `g`, on the rows where `active`.
    fn step(&mut self, w: &mut [f32], g: &[f32], active: &[bool]) {
        let dim = self.dim;
        let elems = (0..w.len()).filter(|i| active[i / dim]);
        match self.cfg {
            Cfg::Sgd(c) => {
                let (lr, mu, wd) = (c.lr, c.momentum, c.weight_decay);
                let mut v = if mu > 0.0 {
                    std::mem::take(self.array("momentum"))
                } else {
                    vec![]
                };
                for i in elems {
                    match c.style {
                        SgdStyle::Keras => {
                            w[i] -= w[i] * (lr * wd); // decoupled decay
                            if mu > 0.0 {
                                v[i] = mu * v[i] - lr * g[i];
                                if c.nesterov {
                                    w[i] += mu * v[i] - lr * g[i];
                                } else {
                                    w[i] += v[i];
                                }
                            } else {
                                w[i] -= lr * g[i];
                            }
                        }
                        SgdStyle::Torch => {
                            let mut d = g[i] + wd * w[i]; // coupled decay
                            if mu > 0.0 {
                                v[i] = mu * v[i] + d;
                                d = if c.nesterov { d + mu * v[i] } else { v[i] };
                            }
                            w[i] -= lr * d;
                        }
                    }
                }
                if mu > 0.0 {
                    *self.array("momentum") = v;
                }
            }
            Cfg::RmsProp(c) => {
                let (lr, rho, mu, eps) = (c.lr, c.rho, c.momentum, c.epsilon);
                let mut s = std::mem::take(self.array("square_avg"));
                let mut m = if c.centered {
                    std::mem::take(self.array("grad_avg"))
                } else {
                    vec![]
                };
                let mut b = if mu > 0.0 {
                    std::mem::take(self.array("momentum"))
                } else {
                    vec![]
                };
                for i in elems {
                    s[i] = rho * s[i] + (1.0 - rho) * (g[i] * g[i]);
                    let d = if c.centered {
                        m[i] = rho * m[i] + (1.0 - rho) * g[i];
                        s[i] - m[i] * m[i]
                    } else {
                        s[i]
                    };
                    let den = match c.eps_placement {
                        EpsPlacement::InsideSqrt => (d + eps).sqrt(),
                        EpsPlacement::OutsideSqrt => d.sqrt() + eps,
                    };
                    let delta = lr * g[i] / den;
                    if mu > 0.0 {
                        b[i] = mu * b[i] + delta;
                        w[i] -= b[i];
                    } else {
                        w[i] -= delta;
                    }
                }
                *self.array("square_avg") = s;
                if c.centered {
                    *self.array("grad_avg") = m;
                }
                if mu > 0.0 {
                    *self.array("momentum") = b;
                }
            }
            Cfg::Adagrad(c) => {
                let a = self.array("accumulator");
                for i in elems {
                    a[i] += g[i] * g[i];
                    let den = match c.eps_placement {
                        EpsPlacement::InsideSqrt => (a[i] + c.epsilon).sqrt(),
                        EpsPlacement::OutsideSqrt => a[i].sqrt() + c.epsilon,
                    };
                    w[i] -= c.lr * g[i] / den;
                }
            }
            Cfg::RowWise(c) => {
                let h = self.array("accumulator");
                for (r, _) in active.iter().enumerate().filter(|(_, a)| **a) {
                    let row = r * dim..(r + 1) * dim;
                    let mean = g[row.clone()].iter().map(|x| x * x).sum::<f32>() / dim as f32;
                    h[r] += mean;
                    let factor = c.lr / (h[r].sqrt() + c.epsilon);
                    for i in row {
                        w[i] -= factor * g[i];
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- cases

/// A random run: a table and a few steps, each a batch of ids drawn from a
/// window of the rows (duplicates are common; rows past the window miss
/// the step) with gradients drawn from a seed.
#[derive(Clone, Debug)]
struct Run {
    rows: usize,
    dim: usize,
    seed: u64,
    steps: Vec<(Vec<usize>, u64)>,
}

fn run(
    rows: std::ops::RangeInclusive<usize>,
    dims: std::ops::RangeInclusive<usize>,
    steps: std::ops::RangeInclusive<usize>,
    max_batch: usize,
) -> impl Strategy<Value = Run> {
    (rows, dims, any::<u64>()).prop_flat_map(move |(rows, dim, seed)| {
        let step = (1..=rows, 0..=max_batch, any::<u64>())
            .prop_flat_map(|(w, n, seed)| (proptest::collection::vec(0..w, n), Just(seed)));
        proptest::collection::vec(step, steps.clone()).prop_map(move |steps| Run {
            rows,
            dim,
            seed,
            steps,
        })
    })
}

impl Run {
    fn table(&self) -> EmbeddingTable {
        let init = values(self.seed, self.rows * self.dim, -1.0, 1.0);
        EmbeddingTable::from_rows(self.rows, self.dim, &init).unwrap()
    }

    /// The gradient of step `t`'s lookup output (`ids × dim`).
    fn grad_out(&self, t: usize) -> Vec<f32> {
        let (ids, seed) = &self.steps[t];
        values(*seed, ids.len() * self.dim, -1.0, 1.0)
    }

    /// Step `t`'s sparse gradient, alternating u32 and i64 ids.
    fn sparse_grad(&self, t: usize) -> SparseGrad {
        let ids = &self.steps[t].0;
        let mut grad = SparseGrad::new(self.dim);
        if t.is_multiple_of(2) {
            let ids: Vec<u32> = ids.iter().map(|&r| r as u32).collect();
            grad.accumulate_lookup(&ids, &self.grad_out(t)).unwrap();
        } else {
            let ids: Vec<i64> = ids.iter().map(|&r| r as i64).collect();
            grad.accumulate_lookup(&ids, &self.grad_out(t)).unwrap();
        }
        grad
    }

    /// Step `t`'s dense gradient, `onehot(ids)ᵀ · G`.
    fn dense_grad(&self, t: usize) -> Vec<f32> {
        let ids = &self.steps[t].0;
        let n = ids.len();
        let ot = transpose(&onehot(ids, self.rows), n, self.rows);
        matmul(&ot, &self.grad_out(t), self.rows, n, self.dim)
    }

    fn touched(&self, t: usize) -> Vec<bool> {
        let mut touched = vec![false; self.rows];
        for &r in &self.steps[t].0 {
            touched[r] = true;
        }
        touched
    }

    /// Runs every step sparse and dense, checking after each step; flushes
    /// at the end and checks every row.
    fn check_against_dense(&self, cfg: Cfg) {
        let mut table = self.table();
        let mut w = table.to_vec();
        let mut opt = cfg.optimizer();
        let mut dense = Dense::new(cfg, self.rows, self.dim);
        let all = vec![true; self.rows];
        for t in 0..self.steps.len() {
            let touched = self.touched(t);
            let (before_w, before_state) = (table.to_vec(), opt.state());
            opt.step(&mut table, &self.sparse_grad(t)).unwrap();
            dense.step(
                &mut w,
                &self.dense_grad(t),
                if cfg.dense_exact() { &all } else { &touched },
            );
            let after = opt.state();
            assert_eq!(after.steps, t as u64 + 1);
            let what = format!("step {t}");
            compare(self, &table.to_vec(), &w, &after, &dense, &touched, &what);
            if !cfg.dense_exact() {
                assert_rows_unchanged(self, &before_w, &table.to_vec(), &touched, "weights");
                for (b, a) in before_state.arrays.iter().zip(&after.arrays) {
                    assert_rows_unchanged(self, &b.values, &a.values, &touched, b.name.as_str());
                }
            }
        }
        opt.flush(&mut table).unwrap();
        let state = opt.state();
        compare(
            self,
            &table.to_vec(),
            &w,
            &state,
            &dense,
            &all,
            "after flush",
        );
        if cfg.dense_exact() {
            assert!(state.last_step.iter().all(|&l| l == state.steps));
        } else {
            assert!(state.last_step.is_empty());
        }
    }
}

/// Compares the `rows` where `which` of the sparse result with the dense one.
fn compare(
    run: &Run,
    table: &[f32],
    w: &[f32],
    state: &OptimizerState,
    dense: &Dense,
    which: &[bool],
    what: &str,
) {
    let pick = |values: &[f32]| -> Vec<f32> {
        let width = values.len() / run.rows;
        values
            .chunks(width.max(1))
            .zip(which)
            .filter(|(_, w)| **w)
            .flat_map(|(row, _)| row.to_vec())
            .collect()
    };
    assert_close_scaled(&pick(table), &pick(w), &format!("weights, {what}"));
    let names: Vec<&str> = state.arrays.iter().map(|a| a.name.as_str()).collect();
    let want: Vec<&str> = dense.arrays.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, want, "state arrays");
    for (got, (name, values)) in state.arrays.iter().zip(&dense.arrays) {
        let shape = if let Cfg::RowWise(_) = dense.cfg {
            vec![run.rows]
        } else {
            vec![run.rows, run.dim]
        };
        assert_eq!(got.shape, shape, "{name} shape");
        assert_close_scaled(
            &pick(&got.values),
            &pick(values),
            &format!("{name}, {what}"),
        );
    }
}

/// [`assert_close`] at relative `REL`, where values that cancel to below a
/// tenth of their array's largest magnitude are compared relative to that
/// tenth: a weight that momentum or an adaptive step brought near zero
/// carries the rounding of the (larger) terms that cancelled, and the
/// dense reference rounds once per step where the catch-up rounds once.
/// Everywhere else the bound is element-wise.
#[track_caller]
fn assert_close_scaled(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let floor = want.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 10.0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        // As `assert_close`, with |w| raised to the floor.
        let tol = REL * w.abs().max(floor).max(1e-6) + 1e-7;
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

/// Rows not in `touched` are bitwise the same.
#[track_caller]
fn assert_rows_unchanged(run: &Run, before: &[f32], after: &[f32], touched: &[bool], what: &str) {
    let width = before.len() / run.rows;
    for (r, (b, a)) in before.chunks(width).zip(after.chunks(width)).enumerate() {
        if !touched[r] {
            assert_bits_eq(a, b, &format!("untouched row {r} of {what}"));
        }
    }
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sgd_equals_dense(cfg in sgd(), run in run(1..=300, 1..=136, 1..=20, 40)) {
        run.check_against_dense(cfg);
    }

    #[test]
    fn rmsprop_equals_dense(cfg in rmsprop(), run in run(1..=300, 1..=136, 1..=20, 40)) {
        run.check_against_dense(cfg);
    }

    #[test]
    fn adagrad_equals_dense(cfg in adagrad(), run in run(1..=300, 1..=136, 1..=20, 40)) {
        run.check_against_dense(cfg);
    }

    #[test]
    fn rowwise_adagrad_equals_dense(cfg in rowwise(), run in run(1..=300, 1..=136, 1..=20, 40)) {
        run.check_against_dense(cfg);
    }

    /// k copies of an id with gradients g₁…g_k == one occurrence with Σg.
    #[test]
    fn duplicates_equal_their_sum(
        cfg in prop_oneof![sgd(), rmsprop(), adagrad(), rowwise()],
        dim in 1usize..=70,
        k in 1usize..=6,
        seed in any::<u64>(),
    ) {
        let rows = 5;
        let g = values(seed, k * dim, -1.0, 1.0);
        let mut summed = vec![0.0f32; dim];
        for copy in g.chunks(dim) {
            for (s, x) in summed.iter_mut().zip(copy) {
                *s += x;
            }
        }
        let mut copies = SparseGrad::new(dim);
        copies.accumulate_lookup(&vec![3u32; k], &g).unwrap();
        let mut once = SparseGrad::new(dim);
        once.accumulate_lookup(&[3i64], &summed).unwrap();
        let results: Vec<_> = [copies, once]
            .iter()
            .map(|grad| {
                let mut table = EmbeddingTable::from_rows(rows, dim, &values(seed ^ 1, rows * dim, -1.0, 1.0)).unwrap();
                let mut opt = cfg.optimizer();
                for _ in 0..2 {
                    opt.step(&mut table, grad).unwrap();
                }
                (table.to_vec(), opt.state())
            })
            .collect();
        assert_bits_eq(&results[0].0, &results[1].0, "weights");
        prop_assert_eq!(&results[0].1, &results[1].1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Bitwise the same table and state for every tier and thread count,
    /// on batches large enough for the parallel path.
    #[test]
    fn every_tier_and_thread_count_agree(
        cfg in prop_oneof![sgd(), rmsprop(), adagrad(), rowwise()],
        run in run(400..=3000, 33..=70, 1..=6, 1500),
    ) {
        let results = each_config(|| {
            let mut table = run.table();
            let mut opt = cfg.optimizer();
            for t in 0..run.steps.len() {
                opt.step(&mut table, &run.sparse_grad(t)).unwrap();
            }
            opt.flush(&mut table).unwrap();
            (table.to_vec(), opt.state())
        });
        let (tier0, threads0, (want_w, want_state)) = &results[0];
        for (tier, threads, (w, state)) in &results[1..] {
            let what = format!("{tier}/{threads} vs {tier0}/{threads0}");
            assert_bits_eq(w, want_w, &what);
            for (a, b) in state.arrays.iter().zip(&want_state.arrays) {
                assert_bits_eq(&a.values, &b.values, &format!("{} {what}", a.name));
            }
            prop_assert_eq!(state, want_state);
        }
    }
}

// ---------------------------------------------------------------- fused step_lookup

/// A concrete optimizer of the kind `Cfg` names, for the generic
/// `step_lookup` (which a `dyn SparseOptimizer` does not have).
enum Concrete {
    Sgd(Sgd),
    RmsProp(RmsProp),
    Adagrad(Adagrad),
    RowWise(RowWiseAdagrad),
}

impl Concrete {
    fn new(cfg: Cfg) -> Self {
        match cfg {
            Cfg::Sgd(c) => Concrete::Sgd(Sgd::new(c)),
            Cfg::RmsProp(c) => Concrete::RmsProp(RmsProp::new(c)),
            Cfg::Adagrad(c) => Concrete::Adagrad(Adagrad::new(c)),
            Cfg::RowWise(c) => Concrete::RowWise(RowWiseAdagrad::new(c)),
        }
    }

    fn get(&mut self) -> &mut dyn SparseOptimizer {
        match self {
            Concrete::Sgd(o) => o,
            Concrete::RmsProp(o) => o,
            Concrete::Adagrad(o) => o,
            Concrete::RowWise(o) => o,
        }
    }

    fn step_lookup<I: embtable::Index>(
        &mut self,
        table: &mut EmbeddingTable,
        ids: &[I],
        grad_out: &[f32],
    ) -> embtable::Result<()> {
        match self {
            Concrete::Sgd(o) => o.step_lookup(table, ids, grad_out),
            Concrete::RmsProp(o) => o.step_lookup(table, ids, grad_out),
            Concrete::Adagrad(o) => o.step_lookup(table, ids, grad_out),
            Concrete::RowWise(o) => o.step_lookup(table, ids, grad_out),
        }
    }
}

impl Run {
    /// Step `t` through `step_lookup`, with u32 ids at even steps and i64
    /// at odd ones (as `sparse_grad`).
    fn step_lookup(&self, opt: &mut Concrete, table: &mut EmbeddingTable, t: usize) {
        let ids = &self.steps[t].0;
        let g = self.grad_out(t);
        if t.is_multiple_of(2) {
            let ids: Vec<u32> = ids.iter().map(|&r| r as u32).collect();
            opt.step_lookup(table, &ids, &g).unwrap();
        } else {
            let ids: Vec<i64> = ids.iter().map(|&r| r as i64).collect();
            opt.step_lookup(table, &ids, &g).unwrap();
        }
    }

    /// Trains with `step_lookup` at the steps where `fused(t)`, else with
    /// `accumulate_lookup` + `step`; the weights and state after every
    /// step, then after a flush.
    fn train(&self, cfg: Cfg, fused: impl Fn(usize) -> bool) -> Vec<(Vec<f32>, OptimizerState)> {
        let mut table = self.table();
        let mut opt = Concrete::new(cfg);
        let mut after = Vec::new();
        for t in 0..self.steps.len() {
            if fused(t) {
                self.step_lookup(&mut opt, &mut table, t);
            } else {
                opt.get().step(&mut table, &self.sparse_grad(t)).unwrap();
            }
            after.push((table.as_padded().to_vec(), opt.get().state()));
        }
        opt.get().flush(&mut table).unwrap();
        after.push((table.as_padded().to_vec(), opt.get().state()));
        after
    }
}

/// Bitwise equality of states (config values, arrays and all; NaN too).
#[track_caller]
fn assert_state_bits(got: &OptimizerState, want: &OptimizerState, what: &str) {
    assert_eq!(got.arrays.len(), want.arrays.len(), "{what}: arrays");
    for (a, b) in got.arrays.iter().zip(&want.arrays) {
        assert_eq!((&a.name, &a.shape), (&b.name, &b.shape), "{what}");
        assert_bits_eq(&a.values, &b.values, &format!("{} {what}", a.name));
    }
    let strip = |s: &OptimizerState| OptimizerState {
        arrays: vec![],
        ..s.clone()
    };
    assert_state_eq(&strip(got), &strip(want), what);
}

/// `step_lookup` (fused at the steps `pattern` picks, mixed with plain
/// steps elsewhere) equals `accumulate_lookup` + `step` after every step,
/// for every tier and thread count.
///
/// Also checked with `dim` rounded up to whole cache lines, where rows
/// looked up once are used in place.
fn check_step_lookup(cfg: Cfg, run: &Run, pattern: u8) {
    let whole_lines = Run {
        dim: run.dim.div_ceil(16) * 16,
        ..run.clone()
    };
    for run in [run, &whole_lines] {
        let want = run.train(cfg, |_| false);
        let fused = |t: usize| pattern == 0 || (pattern >> (t % 8)) & 1 == 1;
        for (tier, threads, got) in each_config(|| run.train(cfg, fused)) {
            for (t, ((w, state), (want_w, want_state))) in got.iter().zip(&want).enumerate() {
                let what = format!("{cfg:?}, dim {}, {tier}/{threads}, after step {t}", run.dim);
                assert_bits_eq(w, want_w, &what);
                assert_state_bits(state, want_state, &what);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn step_lookup_equals_accumulate_then_step(
        cfg in prop_oneof![sgd(), rmsprop(), adagrad(), rowwise()],
        run in run(1..=300, 1..=136, 1..=10, 40),
        pattern in any::<u8>(),
    ) {
        check_step_lookup(cfg, &run, pattern);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Batches large enough for the parallel paths.
    #[test]
    fn step_lookup_equals_accumulate_then_step_on_large_batches(
        cfg in prop_oneof![sgd(), rmsprop(), adagrad(), rowwise()],
        run in run(400..=3000, 33..=136, 1..=4, 1500),
        pattern in any::<u8>(),
    ) {
        check_step_lookup(cfg, &run, pattern);
    }
}

#[test]
fn step_lookup_of_every_kind_equals_accumulate_then_step() {
    let run = example_run();
    for cfg in every_kind() {
        check_step_lookup(cfg, &run, 0);
        check_step_lookup(cfg, &run, 0b1010_0110);
    }
}

/// A batch whose gradient (20 MB) is too large for the caches, as in
/// WORKLOADS.md's W5: the later occurrences' rows are streamed to scratch.
#[test]
fn step_lookup_on_a_large_batch_equals_accumulate_then_step() {
    let (rows, dim, n) = (60_000, 128, 40_000);
    let ids = embtable::workloads::uniform(9, n, rows);
    let run = Run {
        rows,
        dim,
        seed: 3,
        steps: vec![
            (ids.iter().map(|&r| r as usize).collect(), 4),
            (ids.iter().rev().map(|&r| r as usize).collect(), 5),
        ],
    };
    for cfg in every_kind() {
        let want = run.train(cfg, |_| false);
        for (tier, threads, got) in each_config(|| run.train(cfg, |_| true)) {
            for (t, ((w, state), (want_w, want_state))) in got.iter().zip(&want).enumerate() {
                let what = format!("{cfg:?}, {tier}/{threads}, after step {t}");
                assert_bits_eq(w, want_w, &what);
                assert_state_bits(state, want_state, &what);
            }
        }
    }
}

/// An optimizer that only forwards the required methods, so it gets the
/// provided `step_lookup`.
struct Forward(Adagrad);

impl SparseOptimizer for Forward {
    fn step(&mut self, table: &mut EmbeddingTable, grad: &SparseGrad) -> embtable::Result<()> {
        self.0.step(table, grad)
    }
    fn flush(&mut self, table: &mut EmbeddingTable) -> embtable::Result<()> {
        self.0.flush(table)
    }
    fn state(&self) -> OptimizerState {
        self.0.state()
    }
    fn load_state(&mut self, state: OptimizerState) -> embtable::Result<()> {
        self.0.load_state(state)
    }
}

#[test]
fn provided_step_lookup_equals_the_fused_one() {
    let run = example_run();
    let cfg = AdagradConfig::default();
    let (mut a, mut b) = (run.table(), run.table());
    let mut fused = Adagrad::new(cfg);
    let mut provided = Forward(Adagrad::new(cfg));
    for t in 0..run.steps.len() {
        let ids: Vec<i64> = run.steps[t].0.iter().map(|&r| r as i64).collect();
        fused.step_lookup(&mut a, &ids, &run.grad_out(t)).unwrap();
        provided
            .step_lookup(&mut b, &ids, &run.grad_out(t))
            .unwrap();
    }
    assert_bits_eq(&b.to_vec(), &a.to_vec(), "weights");
    assert_state_bits(&provided.state(), &fused.state(), "state");
}

/// Gradients too large for the sums to be proven finite take the stored
/// path inside `step_lookup`: same results, and an overflowing sum is refused.
#[test]
fn step_lookup_of_huge_gradients_equals_accumulate_then_step() {
    let (rows, dim) = (6, 5);
    let ids = [1u32, 4, 1, 0];
    let mut g = values(9, ids.len() * dim, -1.0, 1.0);
    g[3] = 1.5e38; // max |g| · 4 ids > f32::MAX, but every sum is finite
    for cfg in every_kind() {
        let mut want =
            EmbeddingTable::from_rows(rows, dim, &values(8, rows * dim, -1.0, 1.0)).unwrap();
        let mut got = want.clone();
        let mut reference = cfg.optimizer();
        let mut grad = SparseGrad::new(dim);
        grad.accumulate_lookup(&ids, &g).unwrap();
        reference.step(&mut want, &grad).unwrap();
        let mut opt = Concrete::new(cfg);
        opt.step_lookup(&mut got, &ids, &g).unwrap();
        assert_bits_eq(&got.to_vec(), &want.to_vec(), &format!("{cfg:?}"));
        assert_state_bits(&opt.get().state(), &reference.state(), &format!("{cfg:?}"));
    }
}

/// A gradient of `-0.0` sums to `+0.0` in a `SparseGrad` (its slots start
/// at `+0.0`); the fused sum must too, which shows on `-0.0` weights.
#[test]
fn step_lookup_sums_negative_zeros_as_the_stored_gradient() {
    let rows = 3;
    let ids = [2u32, 0, 2];
    // dim 32: rows are whole padded rows, which may be used in place.
    for (cfg, dim) in every_kind().into_iter().flat_map(|c| [(c, 17), (c, 32)]) {
        let mut g = vec![-0.0f32; ids.len() * dim];
        g[dim + 1] = 0.25; // not all -0.0
        let mut want = EmbeddingTable::from_rows(rows, dim, &vec![-0.0; rows * dim]).unwrap();
        let mut got = want.clone();
        let mut reference = cfg.optimizer();
        let mut grad = SparseGrad::new(dim);
        grad.accumulate_lookup(&ids, &g).unwrap();
        reference.step(&mut want, &grad).unwrap();
        let mut opt = Concrete::new(cfg);
        opt.step_lookup(&mut got, &ids, &g).unwrap();
        assert_bits_eq(&got.to_vec(), &want.to_vec(), &format!("{cfg:?}"));
        assert_state_bits(&opt.get().state(), &reference.state(), &format!("{cfg:?}"));
    }
}

#[test]
fn step_lookup_refuses_bad_input_and_changes_nothing() {
    let run = example_run();
    for cfg in every_kind() {
        let mut table = run.table();
        let mut opt = Concrete::new(cfg);
        for t in 0..3 {
            run.step_lookup(&mut opt, &mut table, t);
        }
        let before = snapshot(&table, opt.get());
        let what = format!("{cfg:?}");
        let dim = run.dim;

        // Ids beyond the table or negative: the position in ids.
        let g = vec![0.5; 3 * dim];
        match opt.step_lookup(&mut table, &[2u32, 5, 30], &g) {
            Err(Error::IndexOutOfRange {
                position,
                index,
                rows,
            }) => assert_eq!((position, index, rows), (2, 30, 30), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        match opt.step_lookup(&mut table, &[2i64, -1, 3], &g) {
            Err(Error::IndexOutOfRange {
                position, index, ..
            }) => assert_eq!((position, index), (1, -1), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        assert_same(&table, opt.get(), &before, &what);

        // A NaN or infinite gradient value: its position in grad_out.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut g = vec![0.5; 3 * dim];
            g[dim + 4] = bad;
            match opt.step_lookup(&mut table, &[2u32, 5, 2], &g) {
                Err(Error::NonFinite { position, .. }) => assert_eq!(position, dim + 4),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert_same(&table, opt.get(), &before, &what);

        // A sum that overflows (as `step` reports it: slot 1, column 2).
        let mut g = vec![0.5; 3 * dim];
        g[dim + 2] = 3e38;
        g[2 * dim + 2] = 3e38;
        match opt.step_lookup(&mut table, &[1u32, 4, 4], &g) {
            Err(Error::NonFinite { position, .. }) => assert_eq!(position, dim + 2),
            other => panic!("{what}: {other:?}"),
        }
        assert_same(&table, opt.get(), &before, &what);

        // A gradient of the wrong length.
        assert!(matches!(
            opt.step_lookup(&mut table, &[1u32, 4], &vec![0.5; 2 * dim + 1]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert_same(&table, opt.get(), &before, &what);

        // A table of another shape than the state's.
        for (rows, other_dim) in [(run.rows + 1, dim), (run.rows, dim + 3)] {
            let mut other = EmbeddingTable::zeros(rows, other_dim).unwrap();
            assert!(
                matches!(
                    opt.step_lookup(&mut other, &[0u32], &vec![0.5; other_dim]),
                    Err(Error::ShapeMismatch { .. })
                ),
                "{what}"
            );
            assert_eq!(other.to_vec(), vec![0.0; rows * other_dim]);
        }
        assert_same(&table, opt.get(), &before, &what);
    }
}

#[test]
fn step_lookup_refuses_a_bad_config_before_any_write() {
    let run = example_run();
    let cfg = Cfg::RmsProp(RmsPropConfig {
        rho: 1.5,
        ..Default::default()
    });
    let mut table = run.table();
    let mut opt = Concrete::new(cfg);
    let before = snapshot(&table, opt.get());
    let ids: Vec<u32> = run.steps[0].0.iter().map(|&r| r as u32).collect();
    match opt.step_lookup(&mut table, &ids, &run.grad_out(0)) {
        Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "rho"),
        other => panic!("{other:?}"),
    }
    assert_same(&table, opt.get(), &before, "bad config");
    assert_eq!(opt.get().state().shape, None);
}

// ---------------------------------------------------------------- state, catch-up

fn example_run() -> Run {
    Run {
        rows: 30,
        dim: 21,
        seed: 7,
        steps: (0..8)
            .map(|t| {
                (
                    (0..12).map(|j| (j * 7 + t * 3) % (10 + t)).collect(),
                    t as u64,
                )
            })
            .collect(),
    }
}

fn every_kind() -> Vec<Cfg> {
    let dense = Semantics::DenseExact;
    vec![
        Cfg::Sgd(SgdConfig {
            momentum: 0.9,
            weight_decay: 0.1,
            semantics: dense,
            ..SgdConfig::default()
        }),
        Cfg::Sgd(SgdConfig {
            momentum: 0.5,
            nesterov: true,
            weight_decay: 0.3,
            ..SgdConfig::torch()
        }),
        Cfg::RmsProp(RmsPropConfig {
            momentum: 0.8,
            centered: true,
            semantics: dense,
            ..RmsPropConfig::torch()
        }),
        Cfg::Adagrad(AdagradConfig::default()),
        Cfg::RowWise(RowWiseAdagradConfig::default()),
    ]
}

#[test]
fn state_round_trip_resumes_bit_for_bit() {
    let run = example_run();
    for cfg in every_kind() {
        let mut table = run.table();
        let mut opt = cfg.optimizer();
        for t in 0..4 {
            opt.step(&mut table, &run.sparse_grad(t)).unwrap();
        }
        let saved = opt.state();
        // A fresh optimizer of the same kind with a different config: the
        // config comes from the state.
        let mut resumed = match cfg {
            Cfg::Sgd(_) => Cfg::Sgd(SgdConfig::default()),
            Cfg::RmsProp(_) => Cfg::RmsProp(RmsPropConfig::default()),
            Cfg::Adagrad(_) => Cfg::Adagrad(AdagradConfig::torch()),
            Cfg::RowWise(_) => Cfg::RowWise(RowWiseAdagradConfig {
                lr: 0.5,
                ..Default::default()
            }),
        }
        .optimizer();
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

/// The state, weights and snapshot helpers for the "nothing written" tests.
fn snapshot(table: &EmbeddingTable, opt: &dyn SparseOptimizer) -> (Vec<f32>, OptimizerState) {
    (table.as_padded().to_vec(), opt.state())
}

#[track_caller]
fn assert_same(
    table: &EmbeddingTable,
    opt: &dyn SparseOptimizer,
    before: &(Vec<f32>, OptimizerState),
    what: &str,
) {
    let now = snapshot(table, opt);
    assert_bits_eq(&now.0, &before.0, what);
    assert_state_eq(&now.1, &before.1, what);
}

/// Equality of states, with config values compared bitwise (a bad config may hold NaN).
#[track_caller]
fn assert_state_eq(got: &OptimizerState, want: &OptimizerState, what: &str) {
    let bits = |s: &OptimizerState| -> Vec<(String, u64)> {
        s.config
            .iter()
            .map(|(n, v)| (n.clone(), v.to_bits()))
            .collect()
    };
    assert_eq!(bits(got), bits(want), "{what}: config");
    let strip = |s: &OptimizerState| OptimizerState {
        config: vec![],
        ..s.clone()
    };
    assert_eq!(strip(got), strip(want), "{what}");
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
        dense.step(&mut w, &run.dense_grad(t), &all);
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
    assert!(s.last_step.is_empty());
    let a: &StateArray = &s.arrays[0];
    assert_eq!(&a.values[..3], &[0.0; 3]); // row 0 untouched
}
