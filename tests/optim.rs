//! The sparse optimizers against plain dense optimizers (tests/common/optim.rs):
//! full matrices, one loop per formula, the dense gradient
//! `onehot(ids)ᵀ · G` every step.
//!
//! - `Semantics::Lazy`: after every step, the rows of the batch equal the
//!   dense update applied to those rows only, and every other row (weights
//!   and state) is bitwise unchanged.
//! - `Semantics::DenseExact`: after every step the rows of the batch equal
//!   the fully dense optimizer, and after `flush` every row does: bitwise
//!   where rows catch up by replaying their missed steps (Adam, AdamW,
//!   FTRL, weight decay), within 1e-5 where a linear map's power does it.
//! - Learning rates changed between steps, as `set_lr` changes them.
//! - Every tier and thread count gives bitwise the same table and state,
//!   and the fused `step_lookup` and `step_rows_finite` the same as
//!   accumulate + step.

mod common;

use common::assert_bits_eq;
use common::each_config;
use common::optim::*;
use embtable::{
    Adagrad, AdagradConfig, EmbeddingTable, Error, OptimizerState, RmsPropConfig, RowGradients,
    SparseGrad, SparseOptimizer,
};
use proptest::prelude::*;
use workloads::values;

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

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

    #[test]
    fn adam_equals_dense(cfg in adam(), run in run(1..=300, 1..=136, 1..=20, 40)) {
        run.check_against_dense(cfg);
    }

    #[test]
    fn adamw_equals_dense(cfg in adamw(), run in run(1..=300, 1..=136, 1..=20, 40)) {
        run.check_against_dense(cfg);
    }

    #[test]
    fn ftrl_equals_dense(cfg in ftrl(), run in run(1..=300, 1..=136, 1..=20, 40)) {
        run.check_against_dense(cfg);
    }

    /// `set_lr` between steps: rows that lag catch up with the rates their
    /// missed steps used.
    #[test]
    fn changed_learning_rates_equal_dense(
        cfg in any_cfg(),
        run in run_with_lr_changes(1..=120, 1..=40, 2..=16, 30),
    ) {
        run.check_against_dense(cfg);
    }

    /// k copies of an id with gradients g₁…g_k == one occurrence with Σg.
    #[test]
    fn duplicates_equal_their_sum(
        cfg in any_cfg(),
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
        cfg in any_cfg(),
        run in run_with_lr_changes(400..=3000, 33..=70, 1..=6, 1500),
    ) {
        let results = each_config(|| {
            let mut table = run.table();
            let mut opt = cfg.optimizer();
            for t in 0..run.steps.len() {
                if run.lr_scale[t].is_some() {
                    opt.set_lr(run.lr_at(cfg.lr(), t)).unwrap();
                }
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

impl Run {
    /// Step `t` through `step_lookup`, with u32 ids at even steps and i64
    /// at odd ones (as `sparse_grad`); every third step through
    /// `step_lookup_finite` (all gradients here are finite).
    fn step_lookup(&self, opt: &mut Concrete, table: &mut EmbeddingTable, t: usize) {
        let ids = &self.steps[t].0;
        let g = self.grad_out(t);
        let trust = t % 3 == 2;
        if t.is_multiple_of(2) {
            let ids: Vec<u32> = ids.iter().map(|&r| r as u32).collect();
            if trust {
                opt.step_lookup_finite(table, &ids, &g).unwrap();
            } else {
                opt.step_lookup(table, &ids, &g).unwrap();
            }
        } else {
            let ids: Vec<i64> = ids.iter().map(|&r| r as i64).collect();
            if trust {
                opt.step_lookup_finite(table, &ids, &g).unwrap();
            } else {
                opt.step_lookup(table, &ids, &g).unwrap();
            }
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
            if self.lr_scale[t].is_some() {
                opt.get().set_lr(self.lr_at(cfg.lr(), t)).unwrap();
            }
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
        check_against_reference(cfg, run, pattern, |run, fused| run.train(cfg, fused));
    }
}

/// Trains `run` with `train`, which takes the path under test at the steps
/// it is told to (those `pattern` picks; every step for 0), on every tier
/// and thread count, and asserts weights and state equal, bit for bit,
/// those of the reference path (no step picked) after every step.
fn check_against_reference(
    cfg: Cfg,
    run: &Run,
    pattern: u8,
    train: impl Fn(&Run, &(dyn Fn(usize) -> bool + Sync)) -> Vec<(Vec<f32>, OptimizerState)> + Sync,
) {
    let want = train(run, &|_| false);
    let picked = |t: usize| pattern == 0 || (pattern >> (t % 8)) & 1 == 1;
    for (tier, threads, got) in each_config(|| train(run, &picked)) {
        for (t, ((w, state), (want_w, want_state))) in got.iter().zip(&want).enumerate() {
            let what = format!("{cfg:?}, dim {}, {tier}/{threads}, after step {t}", run.dim);
            assert_bits_eq(w, want_w, &what);
            assert_state_bits(state, want_state, &what);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn step_lookup_equals_accumulate_then_step(
        cfg in any_cfg(),
        run in run_with_lr_changes(1..=300, 1..=136, 1..=10, 40),
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
        cfg in any_cfg(),
        run in run_with_lr_changes(400..=3000, 33..=136, 1..=4, 1500),
        pattern in any::<u8>(),
    ) {
        check_step_lookup(cfg, &run, pattern);
    }
}

// ---------------------------------------------------------------- step_rows_finite

/// A lookup's gradient given row by row: part `k` of a row is the
/// gradient row of its `k`-th position in the batch, so the parts summed in
/// order give what `SparseGrad` sums. The parts of a row are read from
/// wherever they lie, as per-thread gradients would be.
struct LookupRows<'a> {
    positions: std::collections::HashMap<usize, Vec<usize>>,
    grad_out: &'a [f32],
    dim: usize,
}

impl<'a> LookupRows<'a> {
    fn new(ids: &[usize], grad_out: &'a [f32], dim: usize) -> Self {
        let mut positions = std::collections::HashMap::<usize, Vec<usize>>::new();
        for (j, &r) in ids.iter().enumerate() {
            positions.entry(r).or_default().push(j);
        }
        Self {
            positions,
            grad_out,
            dim,
        }
    }
}

impl RowGradients for LookupRows<'_> {
    fn parts(&self) -> usize {
        self.positions.values().map(Vec::len).max().unwrap_or(0)
    }

    fn part(&self, row: usize, k: usize) -> Option<&[f32]> {
        let j = *self.positions.get(&row)?.get(k)?;
        Some(&self.grad_out[j * self.dim..][..self.dim])
    }
}

impl Run {
    /// Trains with `step_rows_finite` at the steps where `rows(t)` (the
    /// distinct rows of the batch, newest first: the order must not
    /// matter), else with `accumulate_lookup` + `step`; the weights and
    /// state after every step, then after a flush.
    fn train_rows(
        &self,
        cfg: Cfg,
        rows: impl Fn(usize) -> bool,
    ) -> Vec<(Vec<f32>, OptimizerState)> {
        let mut table = self.table();
        let mut opt = cfg.optimizer();
        let mut after = Vec::new();
        for t in 0..self.steps.len() {
            if self.lr_scale[t].is_some() {
                opt.set_lr(self.lr_at(cfg.lr(), t)).unwrap();
            }
            if rows(t) {
                let ids = &self.steps[t].0;
                let mut distinct: Vec<usize> = Vec::new();
                for &r in ids.iter().rev() {
                    if !distinct.contains(&r) {
                        distinct.push(r);
                    }
                }
                let g = self.grad_out(t);
                let grads = LookupRows::new(ids, &g, self.dim);
                opt.step_rows_finite(&mut table, &distinct, &grads).unwrap();
            } else {
                opt.step(&mut table, &self.sparse_grad(t)).unwrap();
            }
            after.push((table.as_padded().to_vec(), opt.state()));
        }
        opt.flush(&mut table).unwrap();
        after.push((table.as_padded().to_vec(), opt.state()));
        after
    }
}

/// `step_rows_finite` (at the steps `pattern` picks) equals
/// `accumulate_lookup` + `step` after every step, for every tier and thread
/// count.
fn check_step_rows(cfg: Cfg, run: &Run, pattern: u8) {
    check_against_reference(cfg, run, pattern, |run, by_rows| {
        run.train_rows(cfg, by_rows)
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn step_rows_equals_accumulate_then_step(
        cfg in any_cfg(),
        run in run_with_lr_changes(1..=300, 1..=70, 1..=8, 40),
        pattern in any::<u8>(),
    ) {
        check_step_rows(cfg, &run, pattern);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Steps large enough for the parallel update.
    #[test]
    fn step_rows_equals_accumulate_then_step_on_large_steps(
        cfg in any_cfg(),
        run in run_with_lr_changes(400..=3000, 33..=100, 1..=3, 1500),
        pattern in any::<u8>(),
    ) {
        check_step_rows(cfg, &run, pattern);
    }
}

/// Rows out of range or named twice are refused before anything is written
/// or any gradient asked for, and a part of the wrong length before anything
/// is written, by the fused step and by the provided one.
#[test]
fn step_rows_refuses_bad_rows_and_writes_nothing() {
    /// Two parts a row, the second one float short for row 9.
    struct ShortAt9(Vec<f32>);
    impl RowGradients for ShortAt9 {
        fn parts(&self) -> usize {
            2
        }
        fn part(&self, row: usize, k: usize) -> Option<&[f32]> {
            let short = usize::from(row == 9 && k == 1);
            Some(&self.0[..self.0.len() - short])
        }
    }
    struct Never;
    impl RowGradients for Never {
        fn parts(&self) -> usize {
            1
        }
        fn part(&self, row: usize, _: usize) -> Option<&[f32]> {
            panic!("gradient of row {row} asked for");
        }
    }
    let run = example_run();
    let cfg = AdagradConfig::default();
    let mut fused = Adagrad::new(cfg);
    let mut provided = Forward(Adagrad::new(cfg));
    let opts: [&mut dyn SparseOptimizer; 2] = [&mut fused, &mut provided];
    for opt in opts {
        let mut table = run.table();
        let g = run.grad_out(0);
        let ids = &run.steps[0].0;
        let grads = LookupRows::new(ids, &g, run.dim);
        opt.step_rows_finite(&mut table, &[3, 1], &grads).unwrap();
        let (before, state) = (table.to_vec(), opt.state());
        let err = opt
            .step_rows_finite(&mut table, &[2, 30, 5], &Never)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::IndexOutOfRange {
                    position: 1,
                    index: 30,
                    rows: 30
                }
            ),
            "{err}"
        );
        let err = opt
            .step_rows_finite(&mut table, &[2, 7, 9, 7], &Never)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid rows: row 7 at position 3 is named earlier too: a step's rows must be distinct"
        );
        let short = ShortAt9(vec![0.5; run.dim]);
        let err = opt
            .step_rows_finite(&mut table, &[2, 9], &short)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "invalid grads: part 1 of row 9 (position 1) holds {} floats, not the table's dim {}",
                run.dim - 1,
                run.dim
            )
        );
        assert_bits_eq(&table.to_vec(), &before, "weights");
        assert_state_bits(&opt.state(), &state, "state");
        assert_eq!(opt.steps(), 1);
        // The refused rows left nothing behind: a step naming them again works.
        opt.step_rows_finite(&mut table, &[7, 2, 9], &grads)
            .unwrap();
    }
}

/// The provided `step_rows_finite` (an optimizer without the fused step)
/// equals the fused one.
#[test]
fn provided_step_rows_equals_the_fused_one() {
    let run = example_run();
    let cfg = AdagradConfig::default();
    let (mut a, mut b) = (run.table(), run.table());
    let mut fused = Adagrad::new(cfg);
    let mut provided = Forward(Adagrad::new(cfg));
    for t in 0..run.steps.len() {
        let ids = &run.steps[t].0;
        let mut distinct = ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let g = run.grad_out(t);
        let grads = LookupRows::new(ids, &g, run.dim);
        fused.step_rows_finite(&mut a, &distinct, &grads).unwrap();
        provided
            .step_rows_finite(&mut b, &distinct, &grads)
            .unwrap();
    }
    assert_bits_eq(&b.to_vec(), &a.to_vec(), "weights");
    assert_state_bits(&provided.state(), &fused.state(), "state");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Batches whose ids are grouped in parallel shards on four threads
    /// (16,384 ids and up), over tables of up to 50,000 rows.
    #[test]
    fn step_lookup_equals_accumulate_then_step_on_sharded_batches(
        cfg in any_cfg(),
        run in run_with_lr_changes(1..=50_000, 1..=20, 1..=3, 40_000),
        pattern in any::<u8>(),
    ) {
        check_step_lookup(cfg, &run, pattern);
    }
}

/// `step_lookup_finite` given NaN, infinite and overflowing gradients:
/// `Ok`, no NaN or infinity stored anywhere, and every row those values
/// do not reach exactly as if the positions reaching the bad rows were
/// not in the batch.
#[test]
fn step_lookup_finite_confines_bad_gradients_to_their_rows() {
    let (rows, dim) = (40, 21);
    let ids: Vec<u32> = (0..300).map(|j| (j * 7) % rows as u32).collect();
    let mut g = values(5, ids.len() * dim, -1.0, 1.0);
    // Row 7 gets a NaN, row 14 an infinity, row 21 two values whose sum overflows.
    let bad = |r: u32| [7, 14, 21].contains(&r);
    let at = |r: u32, k: usize| {
        ids.iter()
            .enumerate()
            .filter(|&(_, &x)| x == r)
            .nth(k)
            .unwrap()
            .0
    };
    g[at(7, 1) * dim + 3] = f32::NAN;
    g[at(14, 0) * dim] = f32::NEG_INFINITY;
    g[at(21, 0) * dim + 20] = 3e38;
    g[at(21, 2) * dim + 20] = 3e38;
    let (good_ids, good_g): (Vec<u32>, Vec<f32>) = {
        let keep: Vec<usize> = (0..ids.len()).filter(|&j| !bad(ids[j])).collect();
        (
            keep.iter().map(|&j| ids[j]).collect(),
            keep.iter()
                .flat_map(|&j| g[j * dim..][..dim].to_vec())
                .collect(),
        )
    };
    let start = values(6, rows * dim, -1.0, 1.0);
    for cfg in every_kind() {
        for (tier, threads, (got, want)) in each_config(|| {
            let run = |ids: &[u32], g: &[f32], trust: bool| {
                let mut table = EmbeddingTable::from_rows(rows, dim, &start).unwrap();
                let mut opt = Concrete::new(cfg);
                for _ in 0..3 {
                    if trust {
                        opt.step_lookup_finite(&mut table, ids, g).unwrap();
                    } else {
                        opt.step_lookup(&mut table, ids, g).unwrap();
                    }
                }
                opt.get().flush(&mut table).unwrap();
                (table.to_vec(), opt.get().state())
            };
            (run(&ids, &g, true), run(&good_ids, &good_g, false))
        }) {
            let what = format!("{cfg:?}, {tier}/{threads}");
            assert!(got.0.iter().all(|x| x.is_finite()), "{what}: weights");
            for (a, b) in got.1.arrays.iter().zip(&want.1.arrays) {
                assert!(a.values.iter().all(|x| x.is_finite()), "{what}: {}", a.name);
                let width = a.values.len() / rows;
                for r in (0..rows).filter(|&r| !bad(r as u32)) {
                    let row = r * width..(r + 1) * width;
                    assert_bits_eq(
                        &a.values[row.clone()],
                        &b.values[row],
                        &format!("{what}: {} row {r}", a.name),
                    );
                }
            }
            for r in (0..rows).filter(|&r| !bad(r as u32)) {
                let row = r * dim..(r + 1) * dim;
                assert_bits_eq(
                    &got.0[row.clone()],
                    &want.0[row],
                    &format!("{what}: row {r}"),
                );
            }
        }
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
    let ids = workloads::uniform(9, n, rows);
    let run = Run {
        rows,
        dim,
        seed: 3,
        steps: vec![
            (ids.iter().map(|&r| r as usize).collect(), 4),
            (ids.iter().rev().map(|&r| r as usize).collect(), 5),
        ],
        lr_scale: vec![None, Some(0.5)],
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
    fn lr(&self) -> f32 {
        self.0.lr()
    }
    fn set_lr(&mut self, lr: f32) -> embtable::Result<()> {
        self.0.set_lr(lr)
    }
    fn set_schedule(&mut self, schedule: Option<std::sync::Arc<dyn embtable::optim::LrSchedule>>) {
        self.0.set_schedule(schedule)
    }
    fn steps(&self) -> u64 {
        self.0.steps()
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
