//! The dynamic table against the fixed table on `WORKLOADS.md`'s W1 and
//! W5, measured in the same run, in interleaved rounds (the machine is
//! shared and noisy: only ratios within a run mean something).
//!
//! ```sh
//! cargo run --release --example dynamic_workloads -- --threads 1 --optimizer adagrad
//! ```
//!
//! Per round, each timed once:
//! - `W1 fixed`: `EmbeddingTable::lookup` of W1's 262,144 ids (1,000,000 × 128);
//! - `W1 dynamic lookup`: `DynamicTable::lookup` of the same ids as keys
//!   (hashed) in a table holding 1,000,000 keys: translation and gather;
//! - `W1 dynamic translate+gather`: the training forward pass,
//!   `DynamicTable::translate` (recording uses) then the gather;
//! - `W5 fixed`: `SparseOptimizer::step_lookup` of W5's ids;
//! - `W5 dynamic`: `DynamicTable::step_lookup` of W5's ids as keys, 10 %
//!   of the positions replaced by keys never seen, in a table full at
//!   1,000,000 keys (LRU): each step admits 26,214 keys and evicts as many;
//! - `admit+evict`: `translate` alone of such a batch, for keys/s.
//!
//! Options: `--threads N` (1), `--rounds R` timed rounds after 3 warm-up
//! rounds (15), `--optimizer sgd|adagrad` (sgd; WORKLOADS.md's settings).
//! Built with `--features phase-times`, it also prints the median of each
//! phase of the dynamic W5 step (translation and fused step).
//! Prints the median and the mean of each and the ratios to the fixed
//! table, in wall time and in CPU time (user + system of the whole process
//! during the call, rayon's waiting workers included): on a machine shared
//! with other work, the CPU time is what the call itself took.

use std::process::ExitCode;
use std::time::Instant;

use embtable::dynamic::{Capacity, DynamicConfig, DynamicTable, Eviction};
use embtable::{
    Adagrad, AdagradConfig, AlignedBuf, EmbeddingTable, Init, Sgd, SgdConfig, SparseOptimizer,
};
use workloads::{self, BATCH, BIG_ROWS, cpu_ms, median};

const DIM: usize = 128;
/// One position in ten names a key the table has never seen.
const NEW_EVERY: usize = 10;

/// A 64-bit key for an id (recommender features are hashes of ids).
fn key(id: u64) -> u64 {
    (id ^ 0x5bd1_e995).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

struct Args {
    threads: usize,
    rounds: usize,
    optimizer: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        threads: 1,
        rounds: 15,
        optimizer: "sgd".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--threads" => args.threads = value.parse().map_err(|e| format!("--threads: {e}"))?,
            "--rounds" => args.rounds = value.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--optimizer" if ["sgd", "adagrad"].contains(&value.as_str()) => args.optimizer = value,
            _ => return Err(format!("unknown option {flag} {value}")),
        }
    }
    if args.rounds < 15 {
        return Err(format!("--rounds {}: at least 15", args.rounds));
    }
    Ok(args)
}

fn optimizer(name: &str) -> Box<dyn SparseOptimizer + Send> {
    match name {
        "adagrad" => Box::new(Adagrad::new(AdagradConfig::torch())),
        _ => Box::new(Sgd::new(SgdConfig {
            lr: 0.01,
            ..SgdConfig::torch()
        })),
    }
}

/// W5's ids as keys, every `NEW_EVERY`-th position a key never seen
/// (numbered from `*fresh` on).
fn w5_keys(ids: &[i64], fresh: &mut u64) -> Vec<u64> {
    ids.iter()
        .enumerate()
        .map(|(j, &id)| {
            if j % NEW_EVERY == 0 {
                *fresh += 1;
                key(*fresh)
            } else {
                key(id as u64)
            }
        })
        .collect()
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
    pool.install(|| run(&args));
    ExitCode::SUCCESS
}

fn run(args: &Args) {
    // The fixed tables, and a dynamic table holding a key for each of their rows.
    let fixed = EmbeddingTable::new(BIG_ROWS, DIM, Init::default(), 7).expect("table");
    let mut fixed_w5 = EmbeddingTable::new(BIG_ROWS, DIM, Init::default(), 51).expect("table");
    let config = DynamicConfig {
        capacity: Capacity::Rows(BIG_ROWS),
        eviction: Eviction::Lru,
        seed: 7,
        ..Default::default()
    };
    let mut dynamic = DynamicTable::new(DIM, config).expect("dynamic table");
    let mut dyn_opt = optimizer(&args.optimizer);
    let all: Vec<u64> = (0..BIG_ROWS as u64).map(key).collect();
    for chunk in all.chunks(BATCH) {
        dynamic.translate(chunk, &mut dyn_opt).expect("fill");
        dynamic.advance(&mut dyn_opt).expect("advance");
    }
    let mut fixed_opt = optimizer(&args.optimizer);

    let w1_ids = workloads::uniform(1, BATCH, BIG_ROWS);
    let w1_keys: Vec<u64> = w1_ids.iter().map(|&id| key(id as u64)).collect();
    let w5_ids = workloads::uniform(5, BATCH, BIG_ROWS);
    let grad_out = workloads::values(50, BATCH * DIM, -0.01, 0.01);
    let mut out = AlignedBuf::zeroed(BATCH * DIM, "output").expect("output");
    let mut rows = Vec::new();
    let mut fresh = BIG_ROWS as u64;
    // Key batches made outside the timed region, one per round and use.
    let rounds = 3 + args.rounds;
    let step_batches: Vec<Vec<u64>> = (0..rounds).map(|_| w5_keys(&w5_ids, &mut fresh)).collect();
    let admit_batches: Vec<Vec<u64>> = (0..rounds).map(|_| w5_keys(&w5_ids, &mut fresh)).collect();

    let names = [
        "W1 fixed",
        "W1 dynamic lookup",
        "W1 dynamic translate+gather",
        "W5 fixed",
        "W5 dynamic (10% new keys)",
        "admit+evict (translate, 10% new)",
    ];
    let mut times = vec![Vec::new(); names.len()];
    let mut cpu_times = vec![Vec::new(); names.len()];
    let time = |f: &mut dyn FnMut()| {
        let (start, cpu) = (Instant::now(), cpu_ms());
        f();
        (start.elapsed().as_secs_f64() * 1e3, cpu_ms() - cpu)
    };
    // The phases of the dynamic step (a build with `--features phase-times`).
    let mut step_phases = Vec::new();
    let mut phases: Vec<(&str, Vec<f64>, Vec<f64>)> = Vec::new();
    let before = *dynamic.stats();
    for round in 0..rounds {
        let t = [
            time(&mut || fixed.lookup(&w1_ids, out.as_mut_slice()).expect("lookup")),
            time(&mut || {
                dynamic
                    .lookup(&w1_keys, out.as_mut_slice())
                    .expect("lookup")
            }),
            time(&mut || {
                let rows = dynamic
                    .translate(&w1_keys, &mut dyn_opt)
                    .expect("translate");
                dynamic
                    .weights()
                    .lookup(&rows, out.as_mut_slice())
                    .expect("gather");
            }),
            time(&mut || {
                fixed_opt
                    .step_lookup(&mut fixed_w5, &w5_ids, &grad_out)
                    .expect("step")
            }),
            time(&mut || {
                embtable::phases::take();
                dynamic
                    .step_lookup(&mut dyn_opt, &step_batches[round], &grad_out)
                    .expect("step");
                step_phases = embtable::phases::take();
            }),
            time(&mut || {
                dynamic
                    .translate_into(&admit_batches[round], &mut dyn_opt, &mut rows)
                    .expect("translate");
            }),
        ];
        dynamic.advance(&mut dyn_opt).expect("advance");
        if round >= 3 {
            for p in step_phases.drain(..) {
                match phases.iter_mut().find(|(name, ..)| *name == p.name) {
                    Some((_, wall, cpu)) => {
                        wall.push(p.wall_ms);
                        cpu.push(p.cpu_ms);
                    }
                    None => phases.push((p.name, vec![p.wall_ms], vec![p.cpu_ms])),
                }
            }
            for ((all, cpu), (t, c)) in times.iter_mut().zip(&mut cpu_times).zip(t) {
                all.push(t);
                cpu.push(c);
            }
        }
    }
    let after = *dynamic.stats();
    let mean = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
    let means: Vec<f64> = times.iter().map(|t| mean(t)).collect();
    let cpu_means: Vec<f64> = cpu_times.iter().map(|t| mean(t)).collect();
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    let cpu: Vec<f64> = cpu_times.iter_mut().map(|t| median(t)).collect();
    println!(
        "threads={} optimizer={} rounds={} (ms; ratios within this run; CPU = user+sys)",
        args.threads, args.optimizer, args.rounds
    );
    // Means too: the eviction order's occasional compaction lands in some
    // rounds only, which medians hide.
    for (label, wall, cpu) in [("median", &medians, &cpu), ("mean", &means, &cpu_means)] {
        println!("{label}s:");
        for (i, name) in names.iter().enumerate() {
            let base = if i < 3 { 0 } else { 3 };
            println!(
                "{name:<34} {:>8.2} ms  {:>5.2}x fixed   CPU {:>8.2} ms  {:>5.2}x fixed",
                wall[i],
                wall[i] / wall[base],
                cpu[i],
                cpu[i] / cpu[base]
            );
        }
    }
    for (name, wall, cpu) in &mut phases {
        println!(
            "  W5 dynamic phase {name:<28} median {:>7.2} ms  CPU {:>7.2} ms",
            median(wall),
            median(cpu)
        );
    }
    let new_per_batch = (BATCH / NEW_EVERY) as f64;
    let (admitted, evicted) = (
        after.admitted - before.admitted,
        after.evicted - before.evicted,
    );
    println!(
        "admitted {admitted} and evicted {evicted} keys in {} batches; admit+evict (median): \
         {:.2} M keys/s admitted and {:.2} M keys/s evicted",
        2 * rounds,
        new_per_batch / medians[5] / 1e3,
        new_per_batch * evicted as f64 / admitted.max(1) as f64 / medians[5] / 1e3
    );
    let memory = dynamic.memory();
    println!(
        "dynamic table: {} keys, {:.1} MiB bounded ({:?})",
        dynamic.len(),
        memory.bounded() as f64 / (1 << 20) as f64,
        memory
    );
}
