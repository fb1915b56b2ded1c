//! Every `unsafe` block of the library, run at sizes small enough for Miri
//! (`.ci/run` runs this file under Miri, where the scalar and portable
//! tiers are the ones available) and checked against safe code.
//!
//! Sizes are picked to reach each branch: rows whose dim is below, at and
//! above a vector and a cache line; batches under and over the parallel
//! thresholds (32 768 floats, 32 under Miri), on one and two threads.

mod common;

use embtable::kernels::{self, Tier};
use embtable::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AlignedBuf, Bags, Embedding, EmbeddingOptions,
    EmbeddingTable, Init, OutOfRange, Pooling, RmsProp, RmsPropConfig, RowWiseAdagrad,
    RowWiseAdagradConfig, Semantics, Sgd, SgdConfig, SparseGrad, SparseOptimizer,
};

/// Dims around the vector widths (8, 16) and a cache line. Under Miri,
/// whose interpreter is thousands of times slower, one shorter than a
/// vector and one past a line reach the same branches (whole vectors, a
/// tail, more than a line).
const DIMS: &[usize] = if cfg!(miri) {
    &[7, 17]
} else {
    &[1, 7, 16, 17, 33]
};

/// Floats past which lookups, gradients and pooling go parallel (2^15, or
/// 32 under Miri), enough for several tasks.
const PARALLEL: usize = if cfg!(miri) { 160 } else { (1 << 15) + 16 };

fn table(rows: usize, dim: usize) -> EmbeddingTable {
    let values: Vec<f32> = (0..rows * dim)
        .map(|i| (i % 97) as f32 * 0.25 - 3.0)
        .collect();
    EmbeddingTable::from_rows(rows, dim, &values).unwrap()
}

/// `n` ids over `rows` rows, with repeats.
fn ids(n: usize, rows: usize) -> Vec<u32> {
    (0..n).map(|j| ((j * 7 + j / 3) % rows) as u32).collect()
}

/// The tiers to run. Under Miri, the portable one only: the library's
/// `unsafe` blocks are the same whatever the tier (the x86 tiers' own
/// intrinsics, which Miri does not run, are checked by AddressSanitizer
/// instead), and portable reaches them with whole vectors and tails.
fn tiers() -> Vec<Tier> {
    if cfg!(miri) {
        vec![Tier::Portable]
    } else {
        common::tiers()
    }
}

/// A pool of two threads, built once (under Miri, starting threads is
/// slow).
fn two_threads() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
    })
}

/// `f` on every tier with two threads. On one thread the parallel paths
/// run the same code, so for them this stands in for [`configs`]' every
/// tier and thread count.
fn each_tier_on_two_threads<R: Send>(f: impl Fn() -> R + Sync) -> Vec<(String, R)> {
    let pool = two_threads();
    tiers()
        .into_iter()
        .map(|tier: Tier| {
            (
                tier.to_string(),
                pool.install(|| kernels::with_tier(tier, &f)),
            )
        })
        .collect()
}

/// `f` on every tier and thread count, each result with its
/// configuration's name. Under Miri, on the calling thread only: the inputs
/// passed here are below the parallel thresholds, so a pool would only add
/// its threads' idling to the interpreter's work.
fn configs<R: Send>(f: impl Fn() -> R + Sync) -> Vec<(String, R)> {
    if cfg!(miri) {
        return tiers()
            .into_iter()
            .map(|tier| (tier.to_string(), kernels::with_tier(tier, &f)))
            .collect();
    }
    common::each_config(f)
        .into_iter()
        .map(|(tier, threads, r)| (format!("{tier} {threads}"), r))
        .collect()
}

/// Asserts that every configuration gave the first one's result.
#[track_caller]
fn assert_all_equal<R: PartialEq + std::fmt::Debug>(results: &[(String, R)], what: &str) {
    for (config, r) in results {
        assert_eq!(
            r, &results[0].1,
            "{what}: {config} differs from {}",
            results[0].0
        );
    }
}

#[test]
fn aligned_buffers() {
    // Past one parallel zeroing chunk (2^20 floats): sampled, not scanned.
    let len = (1 << 20) + 3;
    let mut buf = AlignedBuf::zeroed(len, "test").unwrap();
    assert_eq!(buf.as_ptr() as usize % AlignedBuf::ALIGN, 0);
    let probes = [0, (1 << 20) - 1, 1 << 20, len - 1];
    assert!(probes.iter().all(|&i| buf.as_slice()[i] == 0.0));
    buf.as_mut_slice()[len - 1] = 2.0;
    let copy = buf.try_clone().unwrap();
    assert!(
        probes
            .iter()
            .all(|&i| copy.as_slice()[i] == buf.as_slice()[i])
    );
    for len in [1, 15, 16, 17] {
        let mut buf = AlignedBuf::zeroed(len, "test").unwrap();
        assert!(buf.as_slice().iter().all(|&x| x == 0.0));
        buf.as_mut_slice()[len - 1] = 2.0;
        assert_eq!(buf.try_clone().unwrap(), buf);
    }
    assert!(AlignedBuf::zeroed(0, "test").unwrap().is_empty());
}

#[test]
fn lookups_and_renorm() {
    for &dim in DIMS {
        let t = table(40, dim);
        let batch = ids(9, 40);
        let want: Vec<f32> = batch
            .iter()
            .flat_map(|&i| t.row(i as usize).to_vec())
            .collect();
        for (config, got) in configs(|| t.lookup_vec(&batch).unwrap()) {
            assert_eq!(got, want, "{config}");
        }
        let mut out = vec![0.0; 5 * dim];
        t.lookup(&batch[..5], &mut out).unwrap();
        assert_eq!(out, want[..5 * dim]);
        // SAFETY: 39 < rows.
        assert_eq!(unsafe { t.row_unchecked(39) }, t.row(39));

        let mut renormed = t.clone();
        renormed.renorm_rows(&[3u32, 3, 0], 1.0).unwrap();
        for r in 0..40 {
            let norm = renormed.row(r).iter().map(|x| x * x).sum::<f32>().sqrt();
            if r == 3 || r == 0 {
                assert!(norm <= 1.0 + 1e-5, "row {r}: {norm}");
            } else {
                assert_eq!(renormed.row(r), t.row(r));
            }
        }
    }
    // In parallel tasks.
    let t = table(40, 16);
    let batch = ids(PARALLEL / 16, 40);
    for (config, got) in each_tier_on_two_threads(|| t.lookup_vec(&batch).unwrap()) {
        for (j, &id) in batch.iter().enumerate().step_by(7) {
            assert_eq!(&got[j * 16..][..16], t.row(id as usize), "{config}");
        }
    }
}

/// The dense sum of `grad_out`'s rows by id, in batch order.
fn dense_grad(batch: &[u32], grad_out: &[f32], rows: usize, dim: usize) -> Vec<f32> {
    let mut want = vec![0.0f32; rows * dim];
    for (j, &id) in batch.iter().enumerate() {
        for l in 0..dim {
            want[id as usize * dim + l] += grad_out[j * dim + l];
        }
    }
    want
}

/// Accumulates in two calls (the second adds to slots the first made).
fn accumulate(batch: &[u32], grad_out: &[f32], rows: usize, dim: usize) -> Vec<f32> {
    let mut grad = SparseGrad::new(dim);
    let half = batch.len() / 2;
    grad.accumulate_lookup(&batch[..half], &grad_out[..half * dim])
        .unwrap();
    grad.accumulate_lookup(&batch[half..], &grad_out[half * dim..])
        .unwrap();
    assert_eq!(grad.as_padded().len(), grad.len() * grad.stride());
    grad.to_dense(rows)
}

#[test]
fn gradients_serial_and_parallel() {
    let rows = 50;
    for &dim in DIMS {
        let batch = ids(7, rows);
        let grad_out: Vec<f32> = (0..7 * dim).map(|i| (i % 13) as f32 - 6.0).collect();
        let want = dense_grad(&batch, &grad_out, rows, dim);
        for (config, dense) in configs(|| accumulate(&batch, &grad_out, rows, dim)) {
            assert_eq!(dense, want, "{config} dim {dim}");
        }
    }
    // Each half over the parallel threshold.
    let n = 2 * PARALLEL / 16;
    let batch = ids(n, rows);
    let grad_out: Vec<f32> = (0..n * 16).map(|i| (i % 13) as f32 - 6.0).collect();
    let want = dense_grad(&batch, &grad_out, rows, 16);
    for (config, dense) in each_tier_on_two_threads(|| accumulate(&batch, &grad_out, rows, 16)) {
        assert_eq!(dense, want, "{config}");
    }
}

/// A pooled lookup, and the gradient of its output taken as `grad_out`.
/// A pooled lookup, the gradient of its output taken as `grad_out`, and
/// the gradient of the per-sample weights (none for `Max`).
fn pool_and_back(
    t: &EmbeddingTable,
    bags: &Bags<'_, u32>,
    pooling: Pooling,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let out = t.pooled_lookup_vec(bags, pooling).unwrap();
    let mut grad = SparseGrad::for_table(t);
    grad.accumulate_pooled(t, bags, pooling, &out).unwrap();
    let mut weight_grad = vec![0.0; bags.ids().len()];
    if pooling != Pooling::Max {
        t.pooled_weight_grad(bags, pooling, &out, &mut weight_grad)
            .unwrap();
    }
    (out, grad.to_dense(t.rows()), weight_grad)
}

#[test]
fn pooled_lookups_and_their_gradients() {
    // Under Miri, Mean stands for the poolings that scale rows (Sum, SqrtN
    // take its path with other factors), and Max takes its own.
    let poolings: &[Pooling] = if cfg!(miri) {
        &[Pooling::Mean, Pooling::Max]
    } else {
        &[Pooling::Sum, Pooling::Mean, Pooling::SqrtN, Pooling::Max]
    };
    // Small bags (one empty) on every configuration, every dim.
    for &dim in DIMS {
        let t = table(30, dim);
        let lens = [2, 0, 3, 1, 4];
        let batch = ids(10, 30);
        let weights: Vec<f32> = (0..10).map(|j| 0.5 + (j % 3) as f32).collect();
        for weighted in [false, true] {
            let bags = Bags::from_lengths(&batch, &lens, weighted.then_some(&weights[..])).unwrap();
            for &pooling in poolings {
                if weighted && pooling == Pooling::Max {
                    continue; // Max takes no weights
                }
                if cfg!(miri) && weighted && pooling != Pooling::Mean {
                    continue; // the weights take the same path in each
                }
                let results = configs(|| pool_and_back(&t, &bags, pooling));
                assert_all_equal(&results, &format!("{pooling:?} dim {dim}"));
                if pooling == Pooling::Sum && !weighted {
                    // Bag 2 holds ids 2..5, summed by hand.
                    for l in 0..dim {
                        let s: f32 = batch[2..5].iter().map(|&i| t.row(i as usize)[l]).sum();
                        assert_eq!(results[0].1.0[2 * dim + l], s);
                    }
                    // Id 2's weight gradient: its row · its bag's gradient.
                    let (out, _, weight_grad) = &results[0].1;
                    let dot: f64 = (0..dim)
                        .map(|l| {
                            f64::from(t.row(batch[2] as usize)[l]) * f64::from(out[2 * dim + l])
                        })
                        .sum();
                    assert_eq!(weight_grad[2], dot as f32);
                }
            }
        }
    }
    // Outputs and gradients over the parallel threshold.
    let t = table(30, 16);
    let batch = ids(2 * PARALLEL / 16, 30);
    let bags = Bags::fixed(&batch, 2).unwrap();
    for &pooling in poolings {
        let results = each_tier_on_two_threads(|| pool_and_back(&t, &bags, pooling));
        assert_all_equal(&results, &format!("{pooling:?}"));
    }
}

/// A batch past the grouping's sharded threshold (16 384 ids, 16 under
/// Miri, where 48 make 8 shards) on four threads, the fewest it shards on: the sharded grouping's
/// unsafe scatter and writes, under an accumulated gradient and a fused
/// step, against the dense sum and the unfused step.
#[test]
fn grouping_in_shards_on_four_threads() {
    let (rows, dim) = (300, 7);
    let n = if cfg!(miri) { 48 } else { 2 * (1 << 14) + 77 };
    let batch: Vec<u32> = (0..n)
        .map(|j| match j % 3 {
            0 => (j / 3 % 40) as u32,
            1 => ((j * 7919) % rows) as u32,
            _ => (64 * (j % 4)) as u32,
        })
        .collect();
    let grad_out: Vec<f32> = (0..n * dim).map(|i| (i % 13) as f32 - 6.0).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let want = dense_grad(&batch, &grad_out, rows, dim);
    let (dense, fused, unfused) = pool.install(|| {
        let dense = accumulate(&batch, &grad_out, rows, dim);
        let opt = Adagrad::default();
        let (mut fused, mut unfused) = (table(rows, dim), table(rows, dim));
        opt.clone()
            .step_lookup(&mut fused, &batch, &grad_out)
            .unwrap();
        let mut grad = SparseGrad::for_table(&unfused);
        grad.accumulate_lookup(&batch, &grad_out).unwrap();
        opt.clone().step(&mut unfused, &grad).unwrap();
        (dense, fused, unfused)
    });
    assert_eq!(dense, want);
    assert_eq!(fused, unfused);
}

/// The dynamic table's unsafe blocks: the key map's probe, a lookup's
/// gather (serial; from 4096 ids in parallel, running the same task), and
/// the parallel fill of the rows given to new keys, with evictions.
#[test]
fn dynamic_table_admissions_and_lookups() {
    use embtable::Frozen;
    use embtable::dynamic::{Capacity, DynamicConfig, DynamicTable};
    let lookups = if cfg!(miri) { 100 } else { 5000 };
    let keys: Vec<u64> = (0..300u64).map(|k| k * 0x9E37_79B9 + 1).collect();
    for &dim in DIMS {
        let results = each_tier_on_two_threads(|| {
            let config = DynamicConfig {
                capacity: Capacity::Rows(200),
                ..Default::default()
            };
            let mut table = DynamicTable::new(dim, config).unwrap();
            // 150 new keys, then 150 more of which 100 take evicted rows.
            for half in keys.chunks(150) {
                table.translate(half, &mut Frozen).unwrap();
                table.advance(&mut Frozen).unwrap();
            }
            assert_eq!(table.len(), 200);
            let ids: Vec<u64> = (0..lookups).map(|j| keys[j * 7 % 300]).collect();
            let mut out = vec![f32::NAN; lookups * dim];
            table.lookup(&ids, &mut out).unwrap();
            for (j, &key) in ids.iter().enumerate() {
                let want = match table.get(key) {
                    Some(row) => {
                        assert_eq!(row, table.initial_row(key), "key {key}");
                        row
                    }
                    None => table.default_row(),
                };
                assert_eq!(&out[j * dim..][..dim], want, "key {key}");
            }
            out
        });
        assert_all_equal(&results, &format!("dynamic dim {dim}"));
    }
}

/// The dynamic table's fused step, which draws each admitted key's row in
/// the task that updates it (the engine writes that row through its raw
/// base pointer): on every tier, on two threads, with evictions, equal to
/// translate, accumulate and step.
#[test]
fn dynamic_fused_step_draws_admitted_rows() {
    use embtable::dynamic::{Capacity, DynamicConfig, DynamicTable};
    let n = if cfg!(miri) { 24 } else { 3000 };
    for &dim in DIMS {
        let results = each_tier_on_two_threads(|| {
            let config = DynamicConfig {
                capacity: Capacity::Rows(n),
                ..Default::default()
            };
            let mut fused = DynamicTable::new(dim, config).unwrap();
            let mut reference = DynamicTable::new(dim, config).unwrap();
            let sgd = || Sgd::new(SgdConfig::default());
            let (mut fused_opt, mut reference_opt) = (sgd(), sgd());
            // Each step: known keys (repeated) and new ones; the third
            // step's new keys take evicted rows.
            for step in 0..3u64 {
                let keys: Vec<u64> = (0..n as u64)
                    .map(|j| {
                        if j % 3 == 0 {
                            (step + 1) << 32 | j
                        } else {
                            j % 40
                        }
                    })
                    .collect();
                let grad_out: Vec<f32> = (0..n * dim).map(|i| (i % 13) as f32 - 6.0).collect();
                fused.step_lookup(&mut fused_opt, &keys, &grad_out).unwrap();
                let rows = reference.translate(&keys, &mut reference_opt).unwrap();
                let mut grad = SparseGrad::for_table(reference.weights());
                grad.accumulate_lookup(&rows, &grad_out).unwrap();
                reference.step(&mut reference_opt, &mut grad).unwrap();
            }
            assert!(fused.stats().evicted > 0, "{:?}", fused.stats());
            let (got, want) = (fused.weights().as_padded(), reference.weights().as_padded());
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            got.to_vec()
        });
        assert_all_equal(&results, &format!("dynamic fused step dim {dim}"));
    }
}

/// Three steps and three fused steps of `opt` then a flush, on every
/// configuration (on two threads only if the batch is over the parallel
/// threshold): tables and states must agree bitwise.
fn train<O: SparseOptimizer + Clone + Sync>(opt: &O, rows: usize, dim: usize, n: usize) {
    let batch = ids(2 * n, rows);
    let grad_out: Vec<f32> = (0..2 * n * dim)
        .map(|i| ((i % 11) as f32 - 5.0) * 0.1)
        .collect();
    let run = || {
        let mut t = table(rows, dim);
        let mut o = opt.clone();
        // Two steps under Miri: enough for rows to miss one and catch up.
        for step in 0..if cfg!(miri) { 2 } else { 3 } {
            let k = n / 4 + step * n / 4;
            let mut grad = SparseGrad::for_table(&t);
            grad.accumulate_lookup(&batch[..k], &grad_out[..k * dim])
                .unwrap();
            o.step(&mut t, &grad).unwrap();
            o.step_lookup(&mut t, &batch[k..k + n], &grad_out[k * dim..(k + n) * dim])
                .unwrap();
        }
        o.flush(&mut t).unwrap();
        let state: Vec<f32> = o
            .state()
            .arrays
            .iter()
            .flat_map(|a| a.values.clone())
            .collect();
        (t, state)
    };
    let results = if n * dim < PARALLEL {
        configs(run)
    } else {
        each_tier_on_two_threads(run)
    };
    assert_all_equal(&results, &format!("{} rows of {dim}", rows));
}

/// Trains one optimizer on `(rows, dim, batch)`.
type Run = Box<dyn Fn(usize, usize, usize)>;

/// Whether an optimizer catches rows up by replaying their missed steps.
#[derive(PartialEq)]
enum CatchUp {
    Replay,
    Other,
}

/// Every optimizer, lazy and dense-exact where they differ. Under Miri,
/// which checks the engine's paths rather than the rules' arithmetic, one
/// optimizer per path: SGD dense-exact (rows catch up in closed form),
/// Adam dense-exact (rows catch up by replaying the steps they missed) and
/// row-wise Adagrad (lazy, one state value per row).
fn optimizers() -> Vec<(CatchUp, Run)> {
    fn run<O: SparseOptimizer + Clone + Sync + 'static>(opt: O) -> (CatchUp, Run) {
        (
            CatchUp::Other,
            Box::new(move |r, d, n| train(&opt, r, d, n)),
        )
    }
    fn replaying<O: SparseOptimizer + Clone + Sync + 'static>(opt: O) -> (CatchUp, Run) {
        (CatchUp::Replay, run(opt).1)
    }
    let sgd = |semantics| {
        Sgd::new(SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
            semantics,
            ..SgdConfig::default()
        })
    };
    let mut all = vec![
        run(sgd(Semantics::DenseExact)),
        replaying(Adam::new(AdamConfig::keras())),
        run(RowWiseAdagrad::new(RowWiseAdagradConfig::default())),
    ];
    if !cfg!(miri) {
        for semantics in [Semantics::Lazy, Semantics::DenseExact] {
            all.push(run(RmsProp::new(RmsPropConfig {
                momentum: 0.5,
                centered: true,
                semantics,
                ..RmsPropConfig::default()
            })));
        }
        all.push(run(sgd(Semantics::Lazy)));
        all.push(run(Adam::new(AdamConfig::torch_sparse())));
        all.push(run(Adagrad::new(AdagradConfig::torch())));
    }
    all
}

#[test]
fn optimizer_steps() {
    // A row past a line (outside Miri, also one shorter than a vector and
    // exactly a line).
    if cfg!(miri) {
        for (_, run) in optimizers() {
            run(12, 17, 8);
        }
        return;
    }
    for (_, run) in optimizers() {
        for dim in [1, 16, 17] {
            run(20, dim, 16);
        }
    }
}

#[test]
fn optimizer_steps_in_parallel() {
    // Fused steps over the parallel threshold (32 768 floats, 32 under
    // Miri), on distinct rows. Under Miri, without the replaying optimizer:
    // its catch-up is a body of each row that `optimizer_steps` checks, and
    // the split into parallel tasks is the same as the others'.
    for (catch_up, run) in optimizers() {
        if cfg!(miri) && catch_up == CatchUp::Replay {
            continue;
        }
        run(3 * PARALLEL / 16, 16, PARALLEL / 16);
    }
}

#[test]
fn layer_with_every_option() {
    let options = EmbeddingOptions {
        padding_idx: Some(2),
        out_of_range: OutOfRange::Modulo,
        max_norm: Some(1.5),
        ..EmbeddingOptions::default()
    };
    let t = EmbeddingTable::new(10, 17, Init::default(), 3).unwrap();
    let mut layer = Embedding::with_options(t, Adagrad::default(), options).unwrap();
    let batch: Vec<i64> = vec![1, 2, 12, 9, 1];
    let out = layer.forward(&batch).unwrap();
    assert!(out[17..34].iter().all(|&x| x == 0.0)); // padding row
    assert_eq!(out[34..51], out[17..34]); // 12 mod 10 == 2
    layer.backward(&batch, &vec![1.0; out.len()]).unwrap();
    let bags = Bags::new(&batch, &[0, 2, 5], None).unwrap();
    let mut pooled = vec![0.0; 2 * 17];
    layer
        .forward_pooled(&bags, Pooling::Mean, &mut pooled)
        .unwrap();
    layer
        .backward_pooled(&bags, Pooling::Mean, &pooled)
        .unwrap();
    layer.step().unwrap();
    assert!(layer.table().row(2).iter().all(|&x| x == 0.0));
}

#[test]
fn layer_direct_paths_match_the_table() {
    // Default options: the layer checks the ids once, then runs the
    // unchecked gather and pooling kernels; under and over the parallel
    // threshold, into outputs full of NaN (every value must be written).
    let (rows, dim) = (40, 17);
    let t = table(rows, dim);
    let mut layer = Embedding::new(t.clone(), Adagrad::default());
    for n in [5, PARALLEL / dim + 3] {
        let batch = ids(n, rows);
        let mut expected = vec![0.0; n * dim];
        t.lookup(&batch, &mut expected).unwrap();
        let mut out = vec![f32::NAN; n * dim];
        layer.forward_into(&batch, &mut out).unwrap();
        assert_eq!(out, expected);

        // An empty bag first, then bags of 3 (the last shorter).
        let offsets: Vec<usize> = [0]
            .into_iter()
            .chain((0..n).step_by(3))
            .chain([n])
            .collect();
        let bags = Bags::new(&batch, &offsets, None).unwrap();
        for pooling in [Pooling::Sum, Pooling::Mean, Pooling::Max] {
            let mut expected = vec![0.0; bags.len() * dim];
            t.pooled_lookup(&bags, pooling, &mut expected).unwrap();
            let mut out = vec![f32::NAN; bags.len() * dim];
            layer.forward_pooled(&bags, pooling, &mut out).unwrap();
            assert_eq!(out, expected, "{pooling:?}");
            assert!(out[..dim].iter().all(|&x| x == 0.0), "the empty bag");
        }
    }
    let mut out = vec![f32::NAN; 2 * dim];
    assert!(layer.forward_into(&[0u32, 40], &mut out).is_err());
    assert!(out.iter().all(|x| x.is_nan()), "nothing written on error");
}
