//! gensim's `most_similar` over 1,000,000 × 300 vectors (the size of the
//! GoogleNews word2vec file, 1.2 GB): one query word, top 10, at 1 and 2
//! threads, beside the obvious code (one thread, a scalar dot product and
//! norm per row, every score stored, then a sort of the scores) measured
//! in the same run.
//!
//! Bench ids: `most_similar/1Mx300/<how>/t<threads>`. Throughput counts the
//! table's bytes, read once per query, so it compares with the machine's
//! copy bandwidth (`cargo bench --bench lookup -- bandwidth`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use embtable::io::Pretrained;
use embtable::{EmbeddingTable, Init, Vocab};

const ROWS: usize = 1_000_000;
const DIM: usize = 300;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// The obvious code: score every row, sort, take the best 10 others.
fn naive(table: &EmbeddingTable, query: usize) -> Vec<(usize, f32)> {
    let q = table.row(query);
    let qn = q.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut scores: Vec<(usize, f32)> = (0..table.rows())
        .map(|r| {
            let row = table.row(r);
            let dot: f32 = row.iter().zip(q).map(|(a, b)| a * b).sum();
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            (r, dot / (n * qn))
        })
        .collect();
    scores.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    scores.retain(|&(r, _)| r != query);
    scores.truncate(10);
    scores
}

fn most_similar(c: &mut Criterion) {
    let words: Vec<String> = (0..ROWS).map(|i| format!("w{i}")).collect();
    let table = EmbeddingTable::new(
        ROWS,
        DIM,
        Init::Normal {
            mean: 0.0,
            std: 1.0,
        },
        1,
    )
    .expect("table");
    let vectors =
        Pretrained::new(Vocab::from_words(words).expect("vocab"), table).expect("vectors");

    let mut group = c.benchmark_group("most_similar/1Mx300");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .throughput(Throughput::Bytes((ROWS * DIM * 4) as u64));
    for threads in [1, 2] {
        let pool = pool(threads);
        group.bench_function(format!("embtable/t{threads}"), |b| {
            pool.install(|| {
                b.iter(|| black_box(vectors.most_similar(black_box(&["w12345"]), &[], 10)))
            })
        });
    }
    group.bench_function("naive/t1", |b| {
        b.iter(|| black_box(naive(&vectors.table, black_box(12345))))
    });
    group.finish();
}

criterion_group!(benches, most_similar);
criterion_main!(benches);
