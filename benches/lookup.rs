//! Gather workloads W1, W1-d32, W1-d512, W2 and W3 of `WORKLOADS.md`, for
//! every kernel tier and 1 and 2 threads, beside a naive loop and (W2) the
//! dense one-hot product. Throughput counts WORKLOADS.md's useful bytes.
//!
//! Bench ids are `lookup/<workload>/<impl>/t<threads>`.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use embtable::kernels::{Tier, with_tier};
use embtable::{AlignedBuf, EmbeddingTable, Init};
use workloads::{self, BATCH, BIG_ROWS, SMALL_ROWS};

struct Workload {
    name: &'static str,
    rows: usize,
    dim: usize,
    ids: Vec<i64>,
}

fn workloads() -> Vec<Workload> {
    let w1 = workloads::uniform(1, BATCH, BIG_ROWS);
    vec![
        Workload {
            name: "W1",
            rows: BIG_ROWS,
            dim: 128,
            ids: w1.clone(),
        },
        Workload {
            name: "W1-d32",
            rows: BIG_ROWS,
            dim: 32,
            ids: w1.clone(),
        },
        Workload {
            name: "W1-d512",
            rows: BIG_ROWS,
            dim: 512,
            ids: w1,
        },
        Workload {
            name: "W2",
            rows: SMALL_ROWS,
            dim: 64,
            ids: workloads::uniform(2, BATCH, SMALL_ROWS),
        },
        Workload {
            name: "W3",
            rows: BIG_ROWS,
            dim: 128,
            ids: workloads::zipf(3, BATCH, BIG_ROWS, 1.05),
        },
    ]
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// The loop a user would write first: bounds-checked row copies from a Vec.
fn naive_gather(table: &[f32], dim: usize, ids: &[i64], out: &mut [f32]) {
    for (j, &id) in ids.iter().enumerate() {
        let id = id as usize;
        for k in 0..dim {
            out[j * dim + k] = table[id * dim + k];
        }
    }
}

/// The dense formulation: `onehot(ids) · W`, a (n × rows) · (rows × dim) product.
fn onehot_matmul(
    onehot: &[f32],
    table: &[f32],
    n: usize,
    rows: usize,
    dim: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    for j in 0..n {
        for r in 0..rows {
            let x = onehot[j * rows + r];
            for k in 0..dim {
                out[j * dim + k] += x * table[r * dim + k];
            }
        }
    }
}

fn bench_workload(group: &mut BenchmarkGroup<WallTime>, w: &Workload) {
    let table = EmbeddingTable::new(w.rows, w.dim, Init::default(), 7).expect("table");
    // 64-byte aligned like a PyTorch tensor, so large outputs are streamed;
    // `vec-out` measures the same lookup into a 16-byte aligned `Vec`.
    let mut aligned = AlignedBuf::zeroed(w.ids.len() * w.dim, "output").expect("output");
    let mut out = vec![0.0f32; w.ids.len() * w.dim];
    group.throughput(Throughput::Bytes(workloads::gather_bytes(
        w.ids.len(),
        w.dim,
    )));
    for threads in [1, 2] {
        let pool = pool(threads);
        for tier in Tier::available() {
            group.bench_function(format!("{}/{tier}/t{threads}", w.name), |b| {
                b.iter(|| {
                    pool.install(|| {
                        with_tier(tier, || {
                            table.lookup(black_box(&w.ids), aligned.as_mut_slice())
                        })
                    })
                    .expect("lookup")
                })
            });
        }
        group.bench_function(format!("{}/vec-out/t{threads}", w.name), |b| {
            b.iter(|| {
                pool.install(|| table.lookup(black_box(&w.ids), &mut out))
                    .expect("lookup")
            })
        });
    }
    let dense = table.to_vec();
    group.bench_function(format!("{}/naive/t1", w.name), |b| {
        b.iter(|| naive_gather(black_box(&dense), w.dim, black_box(&w.ids), &mut out))
    });
}

/// STREAM-convention copy bandwidth (regular stores; bytes read + written),
/// the ceiling the gathers are compared against.
fn copy_bandwidth(c: &mut Criterion) {
    use rayon::prelude::*;
    let floats = 64 << 20; // 256 MB each way: far beyond the caches
    let src = vec![1.0f32; floats];
    let mut dst = vec![0.0f32; floats];
    let mut group = c.benchmark_group("bandwidth");
    group
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes((2 * floats * 4) as u64));
    for threads in [1, 2] {
        let pool = pool(threads);
        group.bench_function(format!("copy/t{threads}"), |b| {
            b.iter(|| {
                pool.install(|| {
                    dst.par_chunks_mut(1 << 16)
                        .zip(src.par_chunks(1 << 16))
                        .for_each(|(d, s)| d.copy_from_slice(black_box(s)))
                })
            })
        });
    }
    group.finish();
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    group
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for w in workloads() {
        bench_workload(&mut group, &w);
        if w.name == "W2" {
            // The one-hot product costs n·rows·dim multiply-adds, so it runs
            // on the first 256 ids only; compare it by throughput.
            let n = 256;
            let table = EmbeddingTable::new(w.rows, w.dim, Init::default(), 7).expect("table");
            let dense = table.to_vec();
            let mut onehot = vec![0.0f32; n * w.rows];
            for (j, &id) in w.ids[..n].iter().enumerate() {
                onehot[j * w.rows + id as usize] = 1.0;
            }
            let mut out = vec![0.0f32; n * w.dim];
            group.throughput(Throughput::Bytes(workloads::gather_bytes(n, w.dim)));
            group.bench_function("W2/onehot-matmul-256/t1", |b| {
                b.iter(|| onehot_matmul(black_box(&onehot), &dense, n, w.rows, w.dim, &mut out))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, copy_bandwidth, lookup);
criterion_main!(benches);
