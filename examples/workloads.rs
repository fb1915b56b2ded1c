//! Runs one workload of `WORKLOADS.md` through embtable's public API and
//! prints its median time, so it can be compared with another system
//! measured in the same run.
//!
//! ```sh
//! cargo run --release --example workloads -- W1 --threads 2
//! ```
//!
//! Workloads: W1, W1-d32, W1-d512, W2, W3, W4-sum, W4-mean, W4-wsum, and
//! W5-sgd, W5-adagrad, W5-rowwise-adagrad, W5-rmsprop, W5-adam (lazy, as
//! PyTorch's `SparseAdam`), W5-ftrl (lazy, as TensorFlow's sparse FTRL) (one
//! sparse optimizer step with WORKLOADS.md's settings, through the fused
//! `SparseOptimizer::step_lookup`; the table and the optimizer state persist
//! across runs, as in a training loop). Options: `--threads N` (default
//! 1), `--runs R` timed runs after warm-up (default 15, at least 15),
//! `--tier T` to force a kernel tier. The last line is
//! `<W> threads=<N> median_ms=<x>`.

use std::process::ExitCode;
use std::time::Instant;

use embtable::kernels::{self, Tier};
use embtable::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AlignedBuf, Bags, EmbeddingTable, EpsPlacement, Ftrl,
    FtrlConfig, Init, Pooling, RmsProp, RmsPropConfig, RowWiseAdagrad, RowWiseAdagradConfig,
    Semantics, Sgd, SgdConfig, SparseOptimizer,
};
use workloads::{self, BAG_LEN, BAGS, BATCH, BIG_ROWS, SMALL_ROWS};

struct Args {
    workload: String,
    threads: usize,
    runs: usize,
    tier: Tier,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let workload = args
        .next()
        .ok_or("usage: workloads <W> [--threads N] [--runs R] [--tier T]")?;
    let mut parsed = Args {
        workload,
        threads: 1,
        runs: 15,
        tier: kernels::default_tier(),
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--threads" => {
                parsed.threads = value
                    .parse()
                    .map_err(|e| format!("--threads {value}: {e}"))?
            }
            "--runs" => parsed.runs = value.parse().map_err(|e| format!("--runs {value}: {e}"))?,
            "--tier" => {
                parsed.tier = Tier::from_name(&value)
                    .filter(|t| t.is_available())
                    .ok_or(format!("--tier {value}: not an available tier"))?
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if parsed.runs < 15 {
        return Err(format!("--runs {}: at least 15 timed runs", parsed.runs));
    }
    Ok(parsed)
}

/// A prepared workload: `run` performs one timed operation on buffers made
/// outside the timed region.
type Prepared = Box<dyn FnMut()>;

fn gather(rows: usize, dim: usize, ids: Vec<i64>) -> Prepared {
    let table = EmbeddingTable::new(rows, dim, Init::default(), 7).expect("table");
    // 64-byte aligned, as PyTorch allocates tensors: a lookup streams a
    // large output only when every row starts a cache line.
    let mut out = AlignedBuf::zeroed(ids.len() * dim, "output").expect("output");
    Box::new(move || table.lookup(&ids, out.as_mut_slice()).expect("lookup"))
}

/// W4: 16,384 bags of 32 ids over the 1M × 128 table, pooled.
fn pooled(pooling: Pooling, weighted: bool) -> Prepared {
    let table = EmbeddingTable::new(BIG_ROWS, 128, Init::default(), 7).expect("table");
    let ids = workloads::uniform(4, BAGS * BAG_LEN, BIG_ROWS);
    let weights = weighted.then(|| workloads::weights(40, ids.len()));
    let offsets: Vec<usize> = (0..=BAGS).map(|b| b * BAG_LEN).collect();
    let mut out = vec![0.0f32; BAGS * 128];
    Box::new(move || {
        let bags = Bags::new(&ids, &offsets, weights.as_deref()).expect("bags");
        table
            .pooled_lookup(&bags, pooling, &mut out)
            .expect("pooled lookup")
    })
}

/// W5: one step of `opt` on the 1,000,000 × 128 table with the gradient
/// of a lookup of 262,144 `uniform(5)` ids; ids and gradient are made once.
fn update(mut opt: impl SparseOptimizer + 'static) -> Prepared {
    let ids = workloads::uniform(5, BATCH, BIG_ROWS);
    let grad_out = workloads::values(50, BATCH * 128, -0.01, 0.01);
    let mut table = EmbeddingTable::new(BIG_ROWS, 128, Init::default(), 51).expect("table");
    Box::new(move || opt.step_lookup(&mut table, &ids, &grad_out).expect("step"))
}

fn prepare(name: &str) -> Option<Prepared> {
    let w1 = || workloads::uniform(1, BATCH, BIG_ROWS);
    Some(match name {
        "W1" => gather(BIG_ROWS, 128, w1()),
        "W1-d32" => gather(BIG_ROWS, 32, w1()),
        "W1-d512" => gather(BIG_ROWS, 512, w1()),
        "W2" => gather(SMALL_ROWS, 64, workloads::uniform(2, BATCH, SMALL_ROWS)),
        "W3" => gather(BIG_ROWS, 128, workloads::zipf(3, BATCH, BIG_ROWS, 1.05)),
        "W4-sum" => pooled(Pooling::Sum, false),
        "W4-mean" => pooled(Pooling::Mean, false),
        "W4-wsum" => pooled(Pooling::Sum, true),
        // WORKLOADS.md's W5: lr 0.01, ε 1e-10, state from 0.
        "W5-sgd" => update(Sgd::new(SgdConfig {
            lr: 0.01,
            ..SgdConfig::torch()
        })),
        "W5-adagrad" => update(Adagrad::new(AdagradConfig::torch())),
        "W5-rowwise-adagrad" => update(RowWiseAdagrad::new(RowWiseAdagradConfig {
            lr: 0.01,
            initial_accumulator_value: 0.0,
            epsilon: 1e-10,
        })),
        "W5-rmsprop" => update(RmsProp::new(RmsPropConfig {
            lr: 0.01,
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-10,
            centered: false,
            eps_placement: EpsPlacement::InsideSqrt,
            weight_decay: 0.0,
            semantics: Semantics::Lazy,
        })),
        // torch.optim.SparseAdam(lr=0.01): lazy, ε 1e-8.
        "W5-adam" => update(Adam::new(AdamConfig {
            lr: 0.01,
            ..AdamConfig::torch_sparse()
        })),
        // Keras' FTRL defaults at lr 0.01, lazy (TensorFlow's sparse FTRL).
        "W5-ftrl" => update(Ftrl::new(FtrlConfig {
            lr: 0.01,
            ..FtrlConfig::keras_lazy()
        })),
        _ => return None,
    })
}

fn median_ms(mut run: Prepared, runs: usize) -> f64 {
    for _ in 0..3 {
        run(); // warm-up: page faults, caches, thread wake-up
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .expect("thread pool");
    let median = pool.install(|| {
        kernels::with_tier(args.tier, || {
            prepare(&args.workload).map(|run| median_ms(run, args.runs))
        })
    });
    match median {
        Some(ms) => {
            println!(
                "{} threads={} median_ms={ms:.2}",
                args.workload, args.threads
            );
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("error: unknown workload {:?}", args.workload);
            ExitCode::FAILURE
        }
    }
}
