//! W4 of WORKLOADS.md: pooled lookups of 16,384 bags × 32 ids from a
//! 1,000,000 × 128 table (sum, mean, weighted sum), at 1 and 2 threads,
//! plus a naive unfused baseline (gather every row into an `ids × dim`
//! buffer, then reduce each bag) that shows what fusing saves.
//!
//! Bench ids: `w4/<op>/<tier>/t<threads>`. Inputs and output buffers are
//! built outside the timed region. Peers (same machine class, median ms,
//! 1 / 2 threads): torch `embedding_bag` sum 29.5 / 14.9, mean (FBGEMM TBE)
//! 31.9 / 15.8, weighted sum 29.8 / 14.8.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use embtable::kernels::{self, Tier};
use embtable::{Bags, EmbeddingTable, Pooling};
use workloads::{self, BAG_LEN, BAGS, BIG_ROWS};

const DIM: usize = 128;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// The unfused baseline: a plain lookup of every id, then a serial-order
/// sum of each bag's rows (parallel over bags, like the fused kernel).
fn unfused_sum(table: &EmbeddingTable, ids: &[i64], rows: &mut [f32], out: &mut [f32]) {
    use rayon::prelude::*;
    table.lookup(ids, rows).expect("valid ids");
    out.par_chunks_mut(DIM)
        .zip(rows.par_chunks(BAG_LEN * DIM))
        .with_min_len(16)
        .for_each(|(acc, bag)| {
            acc.fill(0.0);
            for row in bag.chunks_exact(DIM) {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += x;
                }
            }
        });
}

fn w4(c: &mut Criterion) {
    let n = BAGS * BAG_LEN;
    let table = {
        let values = workloads::values(0, BIG_ROWS * DIM, -0.05, 0.05);
        EmbeddingTable::from_rows(BIG_ROWS, DIM, &values).expect("table")
    };
    let ids = workloads::uniform(4, n, BIG_ROWS);
    let weights = workloads::weights(40, n);
    let plain = Bags::fixed(&ids, BAG_LEN).expect("bags");
    let weighted = Bags::fixed_weighted(&ids, &weights, BAG_LEN).expect("bags");
    let mut out = vec![0.0f32; BAGS * DIM];
    let mut rows = vec![0.0f32; n * DIM];

    let best = Tier::best();
    let mut group = c.benchmark_group("w4");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for threads in [1, 2] {
        let pool = pool(threads);
        let cases: [(&str, &Bags<'_, i64>, Pooling, Tier); 4] = [
            ("sum", &plain, Pooling::Sum, best),
            ("mean", &plain, Pooling::Mean, best),
            ("weighted_sum", &weighted, Pooling::Sum, best),
            // The scalar tier on the same memory-bound loop: what SIMD adds.
            ("sum", &plain, Pooling::Sum, Tier::Scalar),
        ];
        for (op, bags, pooling, tier) in cases {
            let bytes = workloads::pooled_bytes(n, BAGS, DIM, bags.weights().is_some());
            group.throughput(Throughput::Bytes(bytes));
            group.bench_function(format!("{op}/{tier}/t{threads}"), |b| {
                pool.install(|| {
                    kernels::with_tier(tier, || {
                        b.iter(|| {
                            table
                                .pooled_lookup(black_box(bags), pooling, black_box(&mut out))
                                .expect("valid bags")
                        })
                    })
                })
            });
        }
        group.throughput(Throughput::Bytes(workloads::pooled_bytes(
            n, BAGS, DIM, false,
        )));
        group.bench_function(format!("unfused_sum/{best}/t{threads}"), |b| {
            pool.install(|| {
                b.iter(|| unfused_sum(&table, black_box(&ids), &mut rows, black_box(&mut out)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, w4);
criterion_main!(benches);
