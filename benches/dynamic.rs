//! The dynamic table on W1 and W5 of `WORKLOADS.md`, beside the fixed
//! table in the same run, at 1 and 2 threads. (For ratios from
//! interleaved rounds, run `examples/dynamic_workloads.rs`.)
//!
//! Ids are `dynamic/<workload>/<impl>/t<threads>`:
//! - `W1/fixed`: `EmbeddingTable::lookup` of W1's ids (1,000,000 × 128);
//! - `W1/lookup`: `DynamicTable::lookup` of the same ids as hashed keys in
//!   a table of 1,000,000 keys (read-only: translation and gather);
//! - `W1/translate-gather`: the training forward pass, `translate_into`
//!   then the gather;
//! - `W5-<opt>/fixed`: `step_lookup` of W5's ids;
//! - `W5-<opt>/new10`: `DynamicTable::step_lookup` with 10 % of the
//!   positions naming keys never seen, in a table full at 1,000,000 keys
//!   (each step admits 26,214 keys and evicts as many, LRU).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use embtable::dynamic::{Capacity, DynamicConfig, DynamicTable};
use embtable::{
    Adagrad, AdagradConfig, AlignedBuf, EmbeddingTable, Init, Sgd, SgdConfig, SparseOptimizer,
};
use workloads::{BATCH, BIG_ROWS, uniform, values};

const DIM: usize = 128;

/// Makes a fresh optimizer with WORKLOADS.md's settings.
type MakeOptimizer = fn() -> Box<dyn SparseOptimizer + Send>;

fn key(id: u64) -> u64 {
    (id ^ 0x5bd1_e995).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// A dynamic table holding a key for each of the 1,000,000 rows.
fn full_table(opt: &mut dyn SparseOptimizer) -> DynamicTable {
    let config = DynamicConfig {
        capacity: Capacity::Rows(BIG_ROWS),
        seed: 7,
        ..Default::default()
    };
    let mut table = DynamicTable::new(DIM, config).expect("table");
    let keys: Vec<u64> = (0..BIG_ROWS as u64).map(key).collect();
    for chunk in keys.chunks(BATCH) {
        table.translate(chunk, opt).expect("fill");
        table.advance(opt).expect("advance");
    }
    table
}

fn w1(c: &mut Criterion) {
    let mut group = c.benchmark_group("dynamic");
    group
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let fixed = EmbeddingTable::new(BIG_ROWS, DIM, Init::default(), 7).expect("table");
    let mut opt = Sgd::default();
    let mut dynamic = full_table(&mut opt);
    let ids = uniform(1, BATCH, BIG_ROWS);
    let keys: Vec<u64> = ids.iter().map(|&id| key(id as u64)).collect();
    let mut out = AlignedBuf::zeroed(BATCH * DIM, "output").expect("output");
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let pool = pool(threads);
        group.bench_function(format!("W1/fixed/t{threads}"), |b| {
            b.iter(|| pool.install(|| fixed.lookup(black_box(&ids), out.as_mut_slice())))
        });
        group.bench_function(format!("W1/lookup/t{threads}"), |b| {
            b.iter(|| pool.install(|| dynamic.lookup(black_box(&keys), out.as_mut_slice())))
        });
        group.bench_function(format!("W1/translate-gather/t{threads}"), |b| {
            b.iter(|| {
                pool.install(|| {
                    dynamic.translate_into(black_box(&keys), &mut opt, &mut rows)?;
                    dynamic.weights().lookup(&rows, out.as_mut_slice())
                })
            })
        });
    }
    group.finish();
}

fn w5(c: &mut Criterion) {
    let mut group = c.benchmark_group("dynamic");
    group
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let ids = uniform(5, BATCH, BIG_ROWS);
    let grad_out = values(50, BATCH * DIM, -0.01, 0.01);
    let optimizers: [(&str, MakeOptimizer); 2] = [
        ("sgd", || {
            Box::new(Sgd::new(SgdConfig {
                lr: 0.01,
                ..SgdConfig::torch()
            }))
        }),
        ("adagrad", || Box::new(Adagrad::new(AdagradConfig::torch()))),
    ];
    for (name, make) in optimizers {
        let mut fixed = EmbeddingTable::new(BIG_ROWS, DIM, Init::default(), 51).expect("table");
        let mut fixed_opt = make();
        let mut opt = make();
        let mut dynamic = full_table(&mut opt);
        let mut fresh = BIG_ROWS as u64;
        for threads in [1, 2] {
            let pool = pool(threads);
            group.bench_function(format!("W5-{name}/fixed/t{threads}"), |b| {
                b.iter(|| pool.install(|| fixed_opt.step_lookup(&mut fixed, &ids, &grad_out)))
            });
            group.bench_function(format!("W5-{name}/new10/t{threads}"), |b| {
                b.iter_batched(
                    || {
                        let keys: Vec<u64> = ids
                            .iter()
                            .enumerate()
                            .map(|(j, &id)| {
                                if j % 10 == 0 {
                                    fresh += 1;
                                    key(fresh)
                                } else {
                                    key(id as u64)
                                }
                            })
                            .collect();
                        keys
                    },
                    |keys| pool.install(|| dynamic.step_lookup(&mut opt, &keys, &grad_out)),
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, w1, w5);
criterion_main!(benches);
