//! W4 and W5 of `WORKLOADS.md` on a table sharded over the ranks of an MPI
//! job: the same global batch, split evenly over the ranks, and the bytes
//! each rank sends per step.
//!
//! ```sh
//! cargo build --release --features mpi --example sharded_workloads
//! mpirun -np 4 target/release/examples/sharded_workloads W5-adagrad
//! ```
//!
//! Workloads: W4-sum, W4-mean, W4-wsum (a pooled lookup of 16,384 bags of
//! 32 ids; rank `k` of `N` pools bags `k·16384/N ..`), and W5-sgd,
//! W5-adagrad, W5-rowwise-adagrad, W5-rmsprop (one optimizer step with the
//! gradient of a lookup of 262,144 ids, as `backward` then `step`; rank `k`
//! holds ids `k·262144/N ..`). The 1,000,000 × 128 table is split by range.
//! Options: `--runs R` timed runs after warm-up (default 15), `--threads
//! T` rayon threads per rank (default 1), `--pool-on auto|owner|caller`.
//!
//! A step's time is the slowest rank's, from a barrier to its end; the
//! median over the runs is printed with each rank's bytes sent per step
//! (ids and rows to other ranks: what a network would carry). On one rank
//! the same operation on an ordinary table and optimizer is timed in the
//! same runs, interleaved, for the cost of the sharded path itself. The
//! last line is `<W> ranks=<N> median_ms=<x> bytes_per_rank=<b>`.

use std::process::ExitCode;
use std::time::Instant;

use embtable::shard::{PoolOn, ShardedTable, Sharding};
use embtable::{
    Adagrad, AdagradConfig, Bags, EmbeddingTable, EpsPlacement, Init, Pooling, RmsProp,
    RmsPropConfig, RowWiseAdagrad, RowWiseAdagradConfig, Semantics, Sgd, SgdConfig,
    SparseOptimizer,
};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use workloads::{BAG_LEN, BAGS, BATCH, BIG_ROWS, median};

const DIM: usize = 128;

struct Args {
    workload: String,
    runs: usize,
    threads: usize,
    pool_on: PoolOn,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: sharded_workloads <W4-sum|W4-mean|W4-wsum|W5-sgd|W5-adagrad|W5-rowwise-adagrad|W5-rmsprop> [--runs R] [--threads T] [--pool-on auto|owner|caller]";
    let workload = args.next().ok_or(usage)?;
    let mut parsed = Args {
        workload,
        runs: 15,
        threads: 1,
        pool_on: PoolOn::Auto,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => parsed.runs = value.parse().map_err(|e| format!("--runs {value}: {e}"))?,
            "--threads" => {
                parsed.threads = value
                    .parse()
                    .map_err(|e| format!("--threads {value}: {e}"))?
            }
            "--pool-on" => {
                parsed.pool_on = match value.as_str() {
                    "auto" => PoolOn::Auto,
                    "owner" => PoolOn::Owner,
                    "caller" => PoolOn::Caller,
                    _ => return Err(format!("--pool-on {value}: auto, owner or caller")),
                }
            }
            _ => return Err(format!("unknown option {flag}\n{usage}")),
        }
    }
    if parsed.runs == 0 {
        return Err("--runs must be positive".into());
    }
    Ok(parsed)
}

/// A prepared workload: one timed operation on the sharded table, and on
/// one rank the same on an ordinary table.
struct Prepared {
    sharded: Box<dyn FnMut() -> u64>,
    plain: Option<Box<dyn FnMut()>>,
}

/// The part `k` of `n` of `0..len`.
fn part(len: usize, k: usize, n: usize) -> std::ops::Range<usize> {
    k * len / n..(k + 1) * len / n
}

/// W4: this rank's bags of the global batch, pooled.
fn pooled(
    world: &SimpleCommunicator,
    pooling: Pooling,
    weighted: bool,
    pool_on: PoolOn,
) -> Prepared {
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let ids = workloads::uniform(4, BAGS * BAG_LEN, BIG_ROWS);
    let weights = weighted.then(|| workloads::weights(40, ids.len()));
    let mine = part(BAGS, rank, size);
    let bag_count = mine.len();
    let ids_mine = ids[mine.start * BAG_LEN..mine.end * BAG_LEN].to_vec();
    let weights_mine = weights.map(|w| w[mine.start * BAG_LEN..mine.end * BAG_LEN].to_vec());
    let offsets: Vec<usize> = (0..=bag_count).map(|b| b * BAG_LEN).collect();
    let mut table = ShardedTable::new(
        world,
        BIG_ROWS,
        DIM,
        Sharding::Range,
        Init::default(),
        7,
        Sgd::default(),
    )
    .expect("sharded table");
    table.set_pool_on(pool_on);
    let mut out = vec![0.0f32; bag_count * DIM];
    let plain = (size == 1).then(|| {
        let one = EmbeddingTable::new(BIG_ROWS, DIM, Init::default(), 7).expect("table");
        let (ids, offsets, weights) = (ids_mine.clone(), offsets.clone(), weights_mine.clone());
        let mut out = vec![0.0f32; bag_count * DIM];
        Box::new(move || {
            let bags = Bags::new(&ids, &offsets, weights.as_deref()).expect("bags");
            one.pooled_lookup(&bags, pooling, &mut out)
                .expect("pooled lookup");
        }) as Box<dyn FnMut()>
    });
    Prepared {
        sharded: Box::new(move || {
            let before = table.traffic();
            let bags = Bags::new(&ids_mine, &offsets, weights_mine.as_deref()).expect("bags");
            table
                .pooled_lookup(&bags, pooling, &mut out)
                .expect("pooled lookup");
            (table.traffic() - before).bytes()
        }),
        plain,
    }
}

/// W5: one step of `make()` with the gradient of this rank's ids.
fn update<O: SparseOptimizer + 'static>(
    world: &SimpleCommunicator,
    make: impl Fn() -> O,
) -> Prepared {
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let mine = part(BATCH, rank, size);
    let ids = workloads::uniform(5, BATCH, BIG_ROWS)[mine.clone()].to_vec();
    let grad_out =
        workloads::values(50, BATCH * DIM, -0.01, 0.01)[mine.start * DIM..mine.end * DIM].to_vec();
    let mut table = ShardedTable::new(
        world,
        BIG_ROWS,
        DIM,
        Sharding::Range,
        Init::default(),
        51,
        make(),
    )
    .expect("sharded table");
    let plain = (size == 1).then(|| {
        let mut one = EmbeddingTable::new(BIG_ROWS, DIM, Init::default(), 51).expect("table");
        let mut opt = make();
        let (ids, grad_out) = (ids.clone(), grad_out.clone());
        Box::new(move || opt.step_lookup(&mut one, &ids, &grad_out).expect("step"))
            as Box<dyn FnMut()>
    });
    Prepared {
        sharded: Box::new(move || {
            let before = table.traffic();
            table.step_lookup(&ids, &grad_out).expect("step");
            (table.traffic() - before).bytes()
        }),
        plain,
    }
}

fn prepare(world: &SimpleCommunicator, args: &Args) -> Option<Prepared> {
    Some(match args.workload.as_str() {
        "W4-sum" => pooled(world, Pooling::Sum, false, args.pool_on),
        "W4-mean" => pooled(world, Pooling::Mean, false, args.pool_on),
        "W4-wsum" => pooled(world, Pooling::Sum, true, args.pool_on),
        // WORKLOADS.md's W5: lr 0.01, ε 1e-10, state from 0.
        "W5-sgd" => update(world, || {
            Sgd::new(SgdConfig {
                lr: 0.01,
                ..SgdConfig::torch()
            })
        }),
        "W5-adagrad" => update(world, || Adagrad::new(AdagradConfig::torch())),
        "W5-rowwise-adagrad" => update(world, || {
            RowWiseAdagrad::new(RowWiseAdagradConfig {
                lr: 0.01,
                initial_accumulator_value: 0.0,
                epsilon: 1e-10,
            })
        }),
        "W5-rmsprop" => update(world, || {
            RmsProp::new(RmsPropConfig {
                lr: 0.01,
                rho: 0.9,
                momentum: 0.0,
                epsilon: 1e-10,
                centered: false,
                eps_placement: EpsPlacement::InsideSqrt,
                weight_decay: 0.0,
                semantics: Semantics::Lazy,
            })
        }),
        _ => return None,
    })
}

fn main() -> ExitCode {
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let (rank, size) = (world.rank(), world.size());
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .expect("thread pool");
    let Some(mut prepared) = prepare(&world, &args) else {
        eprintln!("error: unknown workload {:?}", args.workload);
        return ExitCode::FAILURE;
    };
    for _ in 0..3 {
        (prepared.sharded)(); // warm-up: page faults, caches, MPI's buffers
        if let Some(plain) = &mut prepared.plain {
            plain();
        }
    }
    let (mut sharded_ms, mut plain_ms, mut bytes) = (Vec::new(), Vec::new(), 0);
    for _ in 0..args.runs {
        world.barrier();
        let start = Instant::now();
        bytes = (prepared.sharded)();
        let mine = start.elapsed().as_secs_f64() * 1e3;
        let mut slowest = 0.0;
        world.all_reduce_into(&mine, &mut slowest, SystemOperation::max());
        sharded_ms.push(slowest);
        if let Some(plain) = &mut prepared.plain {
            let start = Instant::now();
            plain();
            plain_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut all_bytes = vec![0u64; size as usize];
    world.all_gather_into(&bytes, &mut all_bytes[..]);
    if rank == 0 {
        let per_rank: Vec<String> = all_bytes
            .iter()
            .map(|b| format!("{:.2}", *b as f64 / 1e6))
            .collect();
        println!("MB sent per step by rank: {}", per_rank.join(" "));
        if !plain_ms.is_empty() {
            let (s, p) = (median(&mut sharded_ms.clone()), median(&mut plain_ms));
            println!(
                "one rank: sharded {s:.2} ms, ordinary table {p:.2} ms ({:.2}x)",
                s / p
            );
        }
        println!(
            "{} ranks={size} median_ms={:.2} bytes_per_rank={}",
            args.workload,
            median(&mut sharded_ms),
            all_bytes.iter().max().expect("a rank")
        );
    }
    ExitCode::SUCCESS
}
