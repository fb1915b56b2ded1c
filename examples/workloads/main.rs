//! Runs one workload of `WORKLOADS.md` through embtable's public API and
//! prints its median time, so it can be compared with another system
//! measured in the same run.
//!
//! ```sh
//! cargo run --release --example workloads -- W1 --threads 2
//! cargo run --release --example workloads -- W5-adagrad --threads 1,2,4,8,16 --bound
//! ```
//!
//! Workloads: W1, W1-d32, W1-d512, W2, W3, W4-sum, W4-mean, W4-wsum, and
//! W5-sgd, W5-adagrad, W5-rowwise-adagrad, W5-rmsprop, W5-adam (lazy, as
//! PyTorch's `SparseAdam`), W5-ftrl (lazy, as TensorFlow's sparse FTRL) (one
//! sparse optimizer step with WORKLOADS.md's settings, through the fused
//! `SparseOptimizer::step_lookup`; the table and the optimizer state persist
//! across runs, as in a training loop), each also with `-finite`
//! (`W5-sgd-finite`, …: the same through `step_lookup_finite`, which skips
//! the check that the gradient is finite), and W5-coalesce (W5's gradient
//! summed into a `SparseGrad`: `clear` and `accumulate_lookup`).
//!
//! Options: `--threads N[,N…]` (default 1): one line per thread count, the
//! workload prepared once; `--runs R` timed runs after warm-up (default 15,
//! at least 15); `--tier T` to force a kernel tier; `--bound`: also time the
//! bare hand-written loop of the workload (`bare.rs`) in the same process,
//! in `--rounds K` interleaved rounds (default 3; medians of the rounds'
//! medians). Each line is `<W> threads=<N> median_ms=<x> cpu_ms=<c>`
//! (CPU time of the process, every thread, user + system), with
//! ` bare_ms=<y> ratio=<x/y>` and `bare_cpu_ms` under `--bound`. A W5
//! step's bound is the bare loop that coalesces repeated ids as the step
//! does (sums each row's gradient rows, then updates the row once); the
//! loop that applies each position as it comes, which is less work, is
//! printed beside it as `uncoalesced_ms` (a lower reference, not the same
//! work). `--phases` (in a build with `--features phase-times`): after
//! each line, the median wall and CPU time of each phase of the step
//! (`embtable::phases`), one line each, over as many further calls.

mod bare;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use embtable::kernels::{self, Tier};
use embtable::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AlignedBuf, Bags, EmbeddingTable, EpsPlacement, Ftrl,
    FtrlConfig, Init, Pooling, RmsProp, RmsPropConfig, RowWiseAdagrad, RowWiseAdagradConfig,
    Semantics, Sgd, SgdConfig, SparseGrad, SparseOptimizer,
};
use workloads::{self, BAG_LEN, BAGS, BATCH, BIG_ROWS, SMALL_ROWS, cpu_ms, median};

struct Args {
    workload: String,
    threads: Vec<usize>,
    runs: usize,
    tier: Tier,
    bound: bool,
    rounds: usize,
    phases: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let workload = args.next().ok_or(
        "usage: workloads <W> [--threads N[,N...]] [--runs R] [--tier T] [--bound] [--rounds K] \
         [--phases]",
    )?;
    let mut parsed = Args {
        workload,
        threads: vec![1],
        runs: 15,
        tier: kernels::default_tier(),
        bound: false,
        rounds: 3,
        phases: false,
    };
    while let Some(flag) = args.next() {
        if flag == "--bound" {
            parsed.bound = true;
            continue;
        }
        if flag == "--phases" {
            if !cfg!(feature = "phase-times") {
                return Err("--phases needs a build with --features phase-times".into());
            }
            parsed.phases = true;
            continue;
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("{flag} {value}: not a positive integer"))
        };
        match flag.as_str() {
            "--threads" => {
                parsed.threads = value.split(',').map(number).collect::<Result<_, _>>()?
            }
            "--runs" => parsed.runs = number(&value)?,
            "--rounds" => parsed.rounds = number(&value)?,
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

/// One timed operation on buffers made outside the timed region.
type Run = Box<dyn FnMut() + Send>;

/// A prepared workload, and its bare loop under `--bound` (with, for W5,
/// the lower reference that skips the coalescing).
struct Workload {
    run: Run,
    bare: Option<Run>,
    lower: Option<Run>,
}

fn gather(rows: usize, dim: usize, ids: Vec<i64>, bound: bool) -> Workload {
    let table = Arc::new(EmbeddingTable::new(rows, dim, Init::default(), 7).expect("table"));
    // 64-byte aligned, as PyTorch allocates tensors: a lookup streams a
    // large output only when every row starts a cache line.
    let output = || AlignedBuf::zeroed(ids.len() * dim, "output").expect("output");
    let bare = bound.then(|| {
        let (table, ids, mut out) = (Arc::clone(&table), ids.clone(), output());
        Box::new(move || {
            let rows = bare::Rows {
                values: table.as_padded(),
                stride: table.stride(),
                dim,
            };
            bare::gather(rows, &ids, out.as_mut_slice())
        }) as Run
    });
    let mut out = output();
    Workload {
        run: Box::new(move || table.lookup(&ids, out.as_mut_slice()).expect("lookup")),
        bare,
        lower: None,
    }
}

/// W4: 16,384 bags of 32 ids over the 1M × 128 table, pooled.
fn pooled(pooling: Pooling, weighted: bool, bound: bool) -> Workload {
    let table = Arc::new(EmbeddingTable::new(BIG_ROWS, 128, Init::default(), 7).expect("table"));
    let ids = workloads::uniform(4, BAGS * BAG_LEN, BIG_ROWS);
    let weights = weighted.then(|| workloads::weights(40, ids.len()));
    let offsets: Vec<usize> = (0..=BAGS).map(|b| b * BAG_LEN).collect();
    let bare = bound.then(|| {
        let (table, ids, weights) = (Arc::clone(&table), ids.clone(), weights.clone());
        let scale = if pooling == Pooling::Mean {
            1.0 / BAG_LEN as f32
        } else {
            1.0
        };
        let mut out = vec![0.0f32; BAGS * 128];
        Box::new(move || {
            let rows = bare::Rows {
                values: table.as_padded(),
                stride: table.stride(),
                dim: 128,
            };
            bare::bag_sum(rows, &ids, BAG_LEN, weights.as_deref(), scale, &mut out)
        }) as Run
    });
    let mut out = vec![0.0f32; BAGS * 128];
    Workload {
        run: Box::new(move || {
            let bags = Bags::new(&ids, &offsets, weights.as_deref()).expect("bags");
            table
                .pooled_lookup(&bags, pooling, &mut out)
                .expect("pooled lookup")
        }),
        bare,
        lower: None,
    }
}

/// W5: one step of `opt` on the 1,000,000 × 128 table with the gradient
/// of a lookup of 262,144 `uniform(5)` ids; ids and gradient are made
/// once. `checked`: through `step_lookup`, else `step_lookup_finite`.
/// Under `--bound` the bound is the coalescing bare loop of `rule`, and
/// the loop that applies each position as it comes (`update`) the lower
/// reference.
fn update<O: SparseOptimizer + Send + 'static>(
    mut opt: O,
    checked: bool,
    (rule, update): (bare::Rule, bare::Update),
    bound: bool,
) -> Workload {
    let ids = Arc::new(workloads::uniform(5, BATCH, BIG_ROWS));
    let grad_out = Arc::new(workloads::values(50, BATCH * 128, -0.01, 0.01));
    let buf = |len| AlignedBuf::zeroed(len, "bare table").expect("bare table");
    let bare = bound.then(|| {
        let (ids, grad_out) = (Arc::clone(&ids), Arc::clone(&grad_out));
        let mut weights = buf(BIG_ROWS * 128);
        let width = rule.state_width(128);
        let mut states: Vec<AlignedBuf> =
            (0..rule.arrays()).map(|_| buf(BIG_ROWS * width)).collect();
        let mut scratch = bare::Coalescer::default();
        Box::new(move || {
            let weights = weights.as_mut_slice();
            let (ids, grad_out) = (&ids[..], &grad_out[..]);
            bare::coalesced_update(
                rule,
                &mut scratch,
                weights,
                &mut states,
                128,
                128,
                ids,
                grad_out,
            )
        }) as Run
    });
    let lower = bound.then(|| {
        let (ids, grad_out) = (Arc::clone(&ids), Arc::clone(&grad_out));
        let mut weights = buf(BIG_ROWS * 128);
        let mut states: Vec<AlignedBuf> =
            (0..update.arrays()).map(|_| buf(BIG_ROWS * 128)).collect();
        Box::new(move || {
            let weights = weights.as_mut_slice();
            bare::update(update, weights, &mut states, 128, 128, &ids, &grad_out)
        }) as Run
    });
    let mut table = EmbeddingTable::new(BIG_ROWS, 128, Init::default(), 51).expect("table");
    Workload {
        run: Box::new(move || {
            if checked {
                opt.step_lookup(&mut table, &ids, &grad_out)
            } else {
                opt.step_lookup_finite(&mut table, &ids, &grad_out)
            }
            .expect("step")
        }),
        bare,
        lower,
    }
}

/// W5's gradient coalesced: `SparseGrad::clear` and `accumulate_lookup`
/// (no bare loop).
fn coalesce() -> Workload {
    let ids = workloads::uniform(5, BATCH, BIG_ROWS);
    let grad_out = workloads::values(50, BATCH * 128, -0.01, 0.01);
    let mut grad = SparseGrad::new(128);
    Workload {
        run: Box::new(move || {
            grad.clear();
            grad.accumulate_lookup(&ids, &grad_out).expect("accumulate")
        }),
        bare: None,
        lower: None,
    }
}

/// W5's SGD: lr 0.01, PyTorch's defaults otherwise.
fn w5_sgd() -> Sgd {
    Sgd::new(SgdConfig {
        lr: 0.01,
        ..SgdConfig::torch()
    })
}

/// W5's row-wise Adagrad (FBGEMM's `EXACT_ROWWISE_ADAGRAD`): lr 0.01, ε 1e-10.
fn w5_rowwise_adagrad() -> RowWiseAdagrad {
    RowWiseAdagrad::new(RowWiseAdagradConfig {
        lr: 0.01,
        initial_accumulator_value: 0.0,
        epsilon: 1e-10,
    })
}

/// W5's RMSprop: lr 0.01, ρ 0.9, no momentum, ε 1e-10 inside the root, lazy.
fn w5_rmsprop() -> RmsProp {
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
}

/// The W5 step `name` (`W5-sgd`, …) with WORKLOADS.md's settings (lr
/// 0.01, ε 1e-10, state from 0), through `step_lookup` if `checked`, else
/// `step_lookup_finite`.
fn w5(name: &str, checked: bool, bound: bool) -> Option<Workload> {
    use bare::Rule;
    use bare::Update::{OneState, Sgd as Plain, TwoStates};
    Some(match name {
        "W5-sgd" => update(w5_sgd(), checked, (Rule::Sgd, Plain), bound),
        "W5-adagrad" => update(
            Adagrad::new(AdagradConfig::torch()),
            checked,
            (Rule::Adagrad, OneState),
            bound,
        ),
        // One accumulator per row: the weights' traffic.
        "W5-rowwise-adagrad" => update(
            w5_rowwise_adagrad(),
            checked,
            (Rule::RowWiseAdagrad, Plain),
            bound,
        ),
        "W5-rmsprop" => update(w5_rmsprop(), checked, (Rule::RmsProp, OneState), bound),
        // torch.optim.SparseAdam(lr=0.01): lazy, ε 1e-8.
        "W5-adam" => update(
            Adam::new(AdamConfig {
                lr: 0.01,
                ..AdamConfig::torch_sparse()
            }),
            checked,
            (Rule::TwoStates, TwoStates),
            bound,
        ),
        // Keras' FTRL defaults at lr 0.01, lazy (TensorFlow's sparse FTRL).
        "W5-ftrl" => update(
            Ftrl::new(FtrlConfig {
                lr: 0.01,
                ..FtrlConfig::keras_lazy()
            }),
            checked,
            (Rule::TwoStates, TwoStates),
            bound,
        ),
        _ => return None,
    })
}

fn prepare(name: &str, bound: bool) -> Option<Workload> {
    let w1 = || workloads::uniform(1, BATCH, BIG_ROWS);
    Some(match name {
        "W1" => gather(BIG_ROWS, 128, w1(), bound),
        "W1-d32" => gather(BIG_ROWS, 32, w1(), bound),
        "W1-d512" => gather(BIG_ROWS, 512, w1(), bound),
        "W2" => gather(
            SMALL_ROWS,
            64,
            workloads::uniform(2, BATCH, SMALL_ROWS),
            bound,
        ),
        "W3" => gather(
            BIG_ROWS,
            128,
            workloads::zipf(3, BATCH, BIG_ROWS, 1.05),
            bound,
        ),
        "W5-coalesce" => coalesce(),
        "W4-sum" => pooled(Pooling::Sum, false, bound),
        "W4-mean" => pooled(Pooling::Mean, false, bound),
        "W4-wsum" => pooled(Pooling::Sum, true, bound),
        _ => {
            // A W5 step; with `-finite`, through `step_lookup_finite`.
            let (step, checked) = match name.strip_suffix("-finite") {
                Some(step) => (step, false),
                None => (name, true),
            };
            w5(step, checked, bound)?
        }
    })
}

/// Median wall and CPU time of `runs` calls, in ms.
fn median_ms(run: &mut Run, runs: usize) -> Timing {
    for _ in 0..3 {
        run(); // warm-up: page faults, caches, thread wake-up
    }
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (start, start_cpu) = (Instant::now(), cpu_ms());
        run();
        wall.push(start.elapsed().as_secs_f64() * 1e3);
        cpu.push(cpu_ms() - start_cpu);
    }
    Timing {
        wall: median(&mut wall),
        cpu: median(&mut cpu),
    }
}

/// Median times of one workload, in ms.
#[derive(Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

/// Median wall and CPU time of each phase the library logs
/// (`embtable::phases`) over `runs` calls, in the order first logged.
fn phase_medians(run: &mut Run, runs: usize) -> Vec<(&'static str, Timing)> {
    run(); // warm-up
    embtable::phases::take();
    let mut by_name: Vec<(&'static str, Vec<f64>, Vec<f64>)> = Vec::new();
    for _ in 0..runs {
        run();
        for p in embtable::phases::take() {
            let k = match by_name.iter().position(|(name, ..)| *name == p.name) {
                Some(k) => k,
                None => {
                    by_name.push((p.name, Vec::new(), Vec::new()));
                    by_name.len() - 1
                }
            };
            by_name[k].1.push(p.wall_ms);
            by_name[k].2.push(p.cpu_ms);
        }
    }
    by_name
        .into_iter()
        .map(|(name, mut wall, mut cpu)| {
            let t = Timing {
                wall: median(&mut wall),
                cpu: median(&mut cpu),
            };
            (name, t)
        })
        .collect()
}

/// The medians of rounds' medians.
fn medians(rounds: &mut [Timing]) -> Timing {
    let mut wall: Vec<f64> = rounds.iter().map(|t| t.wall).collect();
    let mut cpu: Vec<f64> = rounds.iter().map(|t| t.cpu).collect();
    Timing {
        wall: median(&mut wall),
        cpu: median(&mut cpu),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(mut workload) = prepare(&args.workload, args.bound) else {
        eprintln!("error: unknown workload {:?}", args.workload);
        return ExitCode::FAILURE;
    };
    for &threads in &args.threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let (runs, rounds) = (args.runs, args.rounds);
        let line = pool.install(|| {
            kernels::with_tier(args.tier, || match &mut workload.bare {
                None => {
                    let t = median_ms(&mut workload.run, runs);
                    format!("median_ms={:.2} cpu_ms={:.2}", t.wall, t.cpu)
                }
                Some(bare) => {
                    // Interleaved rounds, so all see the same load.
                    let (mut ours, mut theirs, mut lower) = (Vec::new(), Vec::new(), Vec::new());
                    for _ in 0..rounds {
                        ours.push(median_ms(&mut workload.run, runs));
                        theirs.push(median_ms(bare, runs));
                        if let Some(run) = &mut workload.lower {
                            lower.push(median_ms(run, runs));
                        }
                    }
                    let (ours, theirs) = (medians(&mut ours), medians(&mut theirs));
                    let mut line = format!(
                        "median_ms={:.2} bare_ms={:.2} ratio={:.2} cpu_ms={:.2} bare_cpu_ms={:.2}",
                        ours.wall,
                        theirs.wall,
                        ours.wall / theirs.wall,
                        ours.cpu,
                        theirs.cpu
                    );
                    if !lower.is_empty() {
                        let lower = medians(&mut lower);
                        line += &format!(
                            " uncoalesced_ms={:.2} uncoalesced_ratio={:.2} uncoalesced_cpu_ms={:.2}",
                            lower.wall,
                            ours.wall / lower.wall,
                            lower.cpu
                        );
                    }
                    line
                }
            })
        });
        println!("{} threads={threads} {line}", args.workload);
        if args.phases {
            let run = &mut workload.run;
            let phases =
                pool.install(|| kernels::with_tier(args.tier, || phase_medians(run, runs)));
            for (name, t) in phases {
                println!(
                    "  phase {name:?} median_ms={:.2} cpu_ms={:.2}",
                    t.wall, t.cpu
                );
            }
        }
    }
    ExitCode::SUCCESS
}
