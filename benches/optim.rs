//! W5 of WORKLOADS.md: one sparse optimizer step on a 1,000,000 × 128 table
//! with a batch of 262,144 ids (`uniform(5, …)`, 230,623 distinct rows) and
//! a dense `262,144 × 128` gradient of the lookup output, at 1 and 2 threads.
//!
//! Ids are `w5/<op>/<tier>-t<threads>`:
//! - `coalesce`: `SparseGrad::clear` + `accumulate_lookup` (duplicates summed);
//! - `sgd`, `adagrad`, `rowwise_adagrad`, `rmsprop`, `adam` (lazy, as
//!   PyTorch's `SparseAdam`), `ftrl` (lazy, Keras' defaults): coalesce + step;
//! - `fused_<optimizer>`: the same step through `SparseOptimizer::step_lookup`,
//!   which sums each row's gradient right before updating it (bitwise the
//!   same result): the figure to set beside the peers in WORKLOADS.md;
//! - `finite_sgd`, `finite_adagrad`: the fused step through
//!   `SparseOptimizer::step_lookup_finite`, without the check that the
//!   gradient is finite;
//! - `step_<optimizer>`: the step alone, on an already coalesced gradient.
//!
//! Maths as WORKLOADS.md: lr 0.01, ε 1e-10, state from 0; Adagrad and
//! row-wise Adagrad put ε outside the root, RMSprop (ρ 0.9, no momentum)
//! inside; Adam is `SparseAdam(lr=0.01)`, FTRL Keras' at lr 0.01.
//! Throughput is WORKLOADS.md's "useful bytes" (`update_bytes`;
//! RMSprop counts TensorFlow's two state arrays although this RMSprop
//! without momentum keeps one). Inputs and optimizer state are prepared
//! outside the timed region.

use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use embtable::kernels;
use embtable::{
    Adagrad, AdagradConfig, Adam, AdamConfig, EmbeddingTable, EpsPlacement, Ftrl, FtrlConfig, Init,
    RmsProp, RmsPropConfig, RowWiseAdagrad, RowWiseAdagradConfig, Semantics, Sgd, SgdConfig,
    SparseGrad, SparseOptimizer,
};
use workloads::{BATCH, BIG_ROWS, uniform, update_bytes, values};

const DIM: usize = 128;
/// Distinct rows of W5's batch (WORKLOADS.md's checksum).
const UNIQUE: usize = 230_623;

/// The optimizers with WORKLOADS.md's settings, and their state arrays as
/// WORKLOADS.md counts them (boxed: `step_lookup` works through a box).
fn optimizers() -> Vec<(&'static str, usize, Box<dyn SparseOptimizer + Send>)> {
    vec![
        (
            "sgd",
            0,
            Box::new(Sgd::new(SgdConfig {
                lr: 0.01,
                ..SgdConfig::torch()
            })),
        ),
        (
            "adagrad",
            1,
            Box::new(Adagrad::new(AdagradConfig::torch())), // lr 0.01, ε 1e-10 outside, a₀ 0
        ),
        (
            "rowwise_adagrad",
            0,
            Box::new(RowWiseAdagrad::new(RowWiseAdagradConfig {
                lr: 0.01,
                initial_accumulator_value: 0.0,
                epsilon: 1e-10,
            })),
        ),
        (
            "rmsprop",
            2,
            Box::new(RmsProp::new(RmsPropConfig {
                lr: 0.01,
                rho: 0.9,
                momentum: 0.0,
                epsilon: 1e-10,
                centered: false,
                eps_placement: EpsPlacement::InsideSqrt,
                weight_decay: 0.0,
                semantics: Semantics::Lazy,
            })),
        ),
        (
            "adam",
            2,
            Box::new(Adam::new(AdamConfig {
                lr: 0.01,
                ..AdamConfig::torch_sparse()
            })),
        ),
        (
            "ftrl",
            2,
            Box::new(Ftrl::new(FtrlConfig {
                lr: 0.01,
                ..FtrlConfig::keras_lazy()
            })),
        ),
    ]
}

fn w5(c: &mut Criterion) {
    let ids = uniform(5, BATCH, BIG_ROWS);
    let grad_out = values(50, BATCH * DIM, -0.01, 0.01);
    let mut table = EmbeddingTable::new(BIG_ROWS, DIM, Init::default(), 51).expect("table");
    let tier = kernels::current();

    let mut group = c.benchmark_group("w5");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let config = format!("{tier}-t{threads}");
        let mut grad = SparseGrad::new(DIM);
        let coalesce = |grad: &mut SparseGrad| {
            grad.clear();
            grad.accumulate_lookup(&ids, &grad_out)
                .expect("valid batch");
        };
        pool.install(|| coalesce(&mut grad));
        assert_eq!(grad.len(), UNIQUE);

        group.throughput(Throughput::Bytes((BATCH * 8 + BATCH * DIM * 4) as u64));
        group.bench_function(BenchmarkId::new("coalesce", &config), |b| {
            b.iter(|| pool.install(|| coalesce(&mut grad)))
        });

        for (name, state_arrays, mut opt) in optimizers() {
            // The first step allocates the state: keep it out of the timing.
            pool.install(|| opt.step(&mut table, &grad).expect("step"));
            let extra = if name == "rowwise_adagrad" {
                UNIQUE * 4 * 2 // one accumulator per row, read and written
            } else {
                0
            };
            group.throughput(Throughput::Bytes(
                update_bytes(BATCH, UNIQUE, DIM, state_arrays) + extra as u64,
            ));
            group.bench_function(BenchmarkId::new(name, &config), |b| {
                b.iter(|| {
                    pool.install(|| {
                        coalesce(&mut grad);
                        opt.step(&mut table, &grad).expect("step");
                    })
                })
            });
            // The first fused step sizes the grouping scratch: untimed too.
            let mut fused = |opt: &mut Box<dyn SparseOptimizer + Send>| {
                opt.step_lookup(&mut table, &ids, &grad_out)
                    .expect("step_lookup")
            };
            pool.install(|| fused(&mut opt));
            group.bench_function(BenchmarkId::new(format!("fused_{name}"), &config), |b| {
                b.iter(|| pool.install(|| fused(&mut opt)))
            });
            if ["sgd", "adagrad"].contains(&name) {
                let id = BenchmarkId::new(format!("finite_{name}"), &config);
                group.bench_function(id, |b| {
                    b.iter(|| {
                        pool.install(|| {
                            opt.step_lookup_finite(&mut table, &ids, &grad_out)
                                .expect("step_lookup_finite")
                        })
                    })
                });
            }
            pool.install(|| coalesce(&mut grad));
            group.bench_function(BenchmarkId::new(format!("step_{name}"), &config), |b| {
                b.iter(|| pool.install(|| opt.step(&mut table, &grad).expect("step")))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, w5);
criterion_main!(benches);
