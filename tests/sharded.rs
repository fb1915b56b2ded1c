//! `ShardedTable` against one process, run under MPI on 1 to 4 ranks:
//!
//! ```text
//! cargo test --release --features mpi --test sharded --no-run
//! mpirun -np 3 --oversubscribe target/release/deps/sharded-<hash>
//! ```
//!
//! (`scripts/mpi_tests.sh` does this for 1, 2, 3 and 4 ranks.) Every rank
//! builds the one-process reference itself: the global batch is the ranks'
//! batches concatenated in rank order, each generated from (rank, step),
//! so every rank knows every rank's batch. Results are compared bit for
//! bit. A check that fails on any rank prints why and aborts the whole
//! job (`MPI_Abort`), so no rank is left waiting and mpirun exits non-zero.

use std::path::PathBuf;

use embtable::shard::{
    PoolOn, ShardLayout, ShardedTable, Sharding, Traffic, load_sharded_checkpoint, shard_file_name,
};
use embtable::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamW, AdamWConfig, Bags, EmbeddingTable, Error,
    Ftrl, FtrlConfig, Init, OptimizerState, Pooling, RmsProp, RmsPropConfig, RowWiseAdagrad,
    RowWiseAdagradConfig, Semantics, Sgd, SgdConfig, SparseGrad, SparseOptimizer,
};
use mpi::collective::SystemOperation;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;

type Check = fn(&SimpleCommunicator) -> Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialises");
    let world = universe.world();
    let checks: &[(&str, Check)] = &[
        ("init_matches_one_process", init_matches_one_process),
        ("lookups_equal_one_process", lookups_equal_one_process),
        (
            "pooled_lookups_equal_one_process",
            pooled_lookups_equal_one_process,
        ),
        (
            "ten_steps_of_every_optimizer_are_bitwise",
            ten_steps_of_every_optimizer_are_bitwise,
        ),
        (
            "step_lookup_equals_backward_then_step",
            step_lookup_equals_backward_then_step,
        ),
        (
            "errors_reach_every_rank_and_write_nothing",
            errors_reach_every_rank_and_write_nothing,
        ),
        (
            "checkpoints_reshard_n_to_m_bit_for_bit",
            checkpoints_reshard_n_to_m_bit_for_bit,
        ),
    ];
    let (rank, size) = (world.rank(), world.size());
    for (name, check) in checks {
        if let Err(msg) = check(&world) {
            // The other ranks may be inside a collective of this check
            // that this rank will never join: end the whole job now, with
            // the message, instead of leaving them waiting.
            eprintln!("rank {rank} of {size}: {name}: {msg}");
            eprintln!("test {name} on {size} ranks ... FAILED");
            world.abort(1);
        }
        world.barrier();
        if rank == 0 {
            println!("test {name} on {size} ranks ... ok");
        }
    }
    if rank == 0 {
        println!("{} passed on {size} ranks", checks.len());
    }
}

// ------------------------------------------------------------- batches

/// SplitMix64: every rank draws every rank's batch from the same seeds.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// In [-1, 1).
    fn value(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

const ROWS: usize = 37;
const DIM: usize = 19;

/// Rank `k`'s ids at `step`: 0 to 40 ids, skewed to low rows so rows
/// repeat within and across ranks.
fn ids_of(k: usize, step: u64, salt: u64) -> Vec<i64> {
    let mut rng = Rng::new(salt * 1_000_003 + step * 131 + k as u64);
    let n = rng.below(41);
    (0..n)
        .map(|_| {
            if rng.below(3) == 0 {
                rng.below(5) as i64
            } else {
                rng.below(ROWS) as i64
            }
        })
        .collect()
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.value()).collect()
}

/// Rank `k`'s bags at `step`: offsets (with empty bags) and weights.
fn bags_of(k: usize, step: u64, salt: u64) -> (Vec<i64>, Vec<usize>, Vec<f32>) {
    let ids = ids_of(k, step, salt + 7);
    let mut rng = Rng::new(salt * 31 + step * 7 + k as u64 + 99);
    let mut offsets = vec![0];
    while *offsets.last().unwrap() < ids.len() {
        let len = rng.below(6).min(ids.len() - offsets.last().unwrap());
        offsets.push(offsets.last().unwrap() + len);
    }
    offsets.push(ids.len()); // an empty bag at the end
    let weights = (0..ids.len()).map(|_| rng.value() + 1.5).collect();
    (ids, offsets, weights)
}

/// The ranks' batches concatenated in rank order.
fn global<T: Clone>(world: usize, of: impl Fn(usize) -> Vec<T>) -> Vec<T> {
    (0..world).flat_map(of).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn same_bits(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values, expected {}",
        got.len(),
        want.len()
    );
    if let Some(i) = bits(got).iter().zip(bits(want)).position(|(a, b)| *a != b) {
        return Err(format!(
            "{what}: value {i} is {} where one process has {}",
            got[i], want[i]
        ));
    }
    Ok(())
}

fn ctx<T>(what: &str, r: embtable::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn my(world: &SimpleCommunicator) -> (usize, usize) {
    (world.rank() as usize, world.size() as usize)
}

// -------------------------------------------------------------- checks

fn init_matches_one_process(world: &SimpleCommunicator) -> Result<(), String> {
    for sharding in [Sharding::Range, Sharding::Modulo] {
        for init in [
            Init::default(),
            Init::Normal {
                mean: 0.5,
                std: 2.0,
            },
            Init::Zeros,
        ] {
            let one = ctx("one process", EmbeddingTable::new(ROWS, DIM, init, 11))?;
            let mut sharded = ctx(
                "new",
                ShardedTable::new(world, ROWS, DIM, sharding, init, 11, Sgd::default()),
            )?;
            let whole = ctx("gather_table", sharded.gather_table())?;
            same_bits(
                &format!("{sharding:?} {init:?}"),
                &whole.to_vec(),
                &one.to_vec(),
            )?;
        }
    }
    Ok(())
}

fn lookups_equal_one_process(world: &SimpleCommunicator) -> Result<(), String> {
    let (rank, _) = my(world);
    let one = ctx("table", EmbeddingTable::new(ROWS, DIM, Init::default(), 3))?;
    for sharding in [Sharding::Range, Sharding::Modulo] {
        let mut sharded = ctx(
            "from_table",
            ShardedTable::from_table(world, &one, sharding, Sgd::default()),
        )?;
        for step in 0..6 {
            let ids = ids_of(rank, step, 1);
            let got = ctx("lookup", sharded.lookup_vec(&ids))?;
            same_bits(
                &format!("{sharding:?} lookup step {step}"),
                &got,
                &one.lookup_vec(&ids).unwrap(),
            )?;
            let ids32: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            let got = ctx("lookup u32", sharded.lookup_vec(&ids32))?;
            same_bits(
                &format!("{sharding:?} u32 lookup step {step}"),
                &got,
                &one.lookup_vec(&ids).unwrap(),
            )?;
        }
        // Nobody asks for anything: still a valid collective.
        let none: [u64; 0] = [];
        ensure!(
            ctx("empty lookup", sharded.lookup_vec(&none))?.is_empty(),
            "empty lookup"
        );
    }
    Ok(())
}

/// What pooling on the owners computes: each owner's part of a bag summed
/// in bag order from zero with the bag's coefficients, then the owners'
/// parts added in rank order from zero.
fn owner_pooled(
    one: &EmbeddingTable,
    layout: &ShardLayout,
    bags: &Bags<'_, i64>,
    pooling: Pooling,
) -> Vec<f32> {
    let dim = one.dim();
    let mut out = vec![0.0f32; bags.len() * dim];
    for b in 0..bags.len() {
        let range = bags.range(b);
        let w = bags.bag_weights(b);
        let d: f64 = match (pooling, w) {
            (Pooling::Sum, _) => 1.0,
            (Pooling::Mean, None) => range.len() as f64,
            (Pooling::Mean, Some(w)) => w.iter().map(|&x| f64::from(x)).sum(),
            (Pooling::SqrtN, None) => (range.len() as f64).sqrt(),
            (Pooling::SqrtN, Some(w)) => w
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt(),
            (Pooling::Max, _) => unreachable!(),
        };
        for owner in 0..layout.world() {
            let mut part = vec![0.0f32; dim];
            for (k, j) in range.clone().enumerate() {
                let row = bags.ids()[j] as usize;
                if layout.locate(row).0 != owner {
                    continue;
                }
                let c = if d == 0.0 {
                    0.0
                } else {
                    (f64::from(w.map_or(1.0, |w| w[k])) / d) as f32
                };
                for (p, &e) in part.iter_mut().zip(one.row(row)) {
                    *p += c * e;
                }
            }
            for (o, p) in out[b * dim..][..dim].iter_mut().zip(&part) {
                *o += *p;
            }
        }
    }
    out
}

/// Bytes all ranks sent since `before` (this rank's traffic then).
fn total_bytes<O: SparseOptimizer>(
    world: &SimpleCommunicator,
    table: &ShardedTable<O>,
    before: Traffic,
) -> u64 {
    let mine = (table.traffic() - before).bytes();
    let mut total = 0u64;
    world.all_reduce_into(&mine, &mut total, SystemOperation::sum());
    total
}

fn pooled_lookups_equal_one_process(world: &SimpleCommunicator) -> Result<(), String> {
    let (rank, size) = my(world);
    let one = ctx("table", EmbeddingTable::new(ROWS, DIM, Init::default(), 4))?;
    for sharding in [Sharding::Range, Sharding::Modulo] {
        let mut sharded = ctx(
            "from_table",
            ShardedTable::from_table(world, &one, sharding, Sgd::default()),
        )?;
        let layout = *sharded.layout();
        for step in 0..4 {
            let (ids, offsets, weights) = bags_of(rank, step, 2);
            for weighted in [false, true] {
                let bags = ctx(
                    "bags",
                    Bags::new(&ids, &offsets, weighted.then_some(&weights[..])),
                )?;
                for pooling in [Pooling::Sum, Pooling::Mean, Pooling::SqrtN, Pooling::Max] {
                    if weighted && pooling == Pooling::Max {
                        continue;
                    }
                    let want = one.pooled_lookup_vec(&bags, pooling).unwrap();
                    let what = format!("{sharding:?} step {step} weighted {weighted} {pooling:?}");
                    let mut got = vec![0.0; want.len()];
                    sharded.set_pool_on(PoolOn::Caller);
                    let before = sharded.traffic();
                    ctx(
                        "pooled on caller",
                        sharded.pooled_lookup(&bags, pooling, &mut got),
                    )?;
                    same_bits(&format!("{what} on the caller"), &got, &want)?;
                    let caller_bytes = total_bytes(world, &sharded, before);
                    let before = sharded.traffic();
                    sharded.set_pool_on(PoolOn::Owner);
                    ctx(
                        "pooled on owners",
                        sharded.pooled_lookup(&bags, pooling, &mut got),
                    )?;
                    let owner_bytes = total_bytes(world, &sharded, before);
                    let owner_got = got.clone();
                    // Auto: whichever moved fewer bytes over all ranks.
                    let before = sharded.traffic();
                    sharded.set_pool_on(PoolOn::Auto);
                    let mut auto = vec![0.0; want.len()];
                    ctx(
                        "pooled auto",
                        sharded.pooled_lookup(&bags, pooling, &mut auto),
                    )?;
                    let auto_bytes = total_bytes(world, &sharded, before);
                    ensure!(
                        auto_bytes == owner_bytes.min(caller_bytes),
                        "{what}: auto moved {auto_bytes} bytes, owners {owner_bytes}, caller {caller_bytes}"
                    );
                    let auto_is = if owner_bytes <= caller_bytes {
                        &owner_got
                    } else {
                        &want
                    };
                    same_bits(&format!("{what} auto"), &auto, auto_is)?;
                    if pooling == Pooling::Max || size == 1 {
                        same_bits(&format!("{what} on the owners"), &got, &want)?;
                    } else {
                        same_bits(
                            &format!("{what} on the owners"),
                            &got,
                            &owner_pooled(&one, &layout, &bags, pooling),
                        )?;
                        // A bag whose ids live on one rank is pooled there exactly.
                        for b in 0..bags.len() {
                            let mut owners =
                                bags.bag(b).iter().map(|&i| layout.locate(i as usize).0);
                            if let Some(first) = owners.next()
                                && owners.all(|o| o == first)
                            {
                                same_bits(
                                    &format!("{what} bag {b} on one owner"),
                                    &got[b * DIM..][..DIM],
                                    &want[b * DIM..][..DIM],
                                )?;
                            }
                        }
                        let close = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
                        ensure!(close, "{what}: owner pooling is far from one process");
                    }
                }
            }
        }
    }
    Ok(())
}

type Factory = fn() -> Box<dyn SparseOptimizer>;

fn optimizers() -> Vec<(&'static str, Factory)> {
    vec![
        ("sgd keras", || {
            Box::new(Sgd::new(SgdConfig {
                lr: 0.1,
                ..SgdConfig::keras()
            }))
        }),
        ("sgd momentum nesterov lazy", || {
            Box::new(Sgd::new(SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                ..SgdConfig::keras_lazy()
            }))
        }),
        ("sgd momentum weight decay dense", || {
            Box::new(Sgd::new(SgdConfig {
                lr: 0.1,
                momentum: 0.8,
                weight_decay: 0.01,
                semantics: Semantics::DenseExact,
                ..SgdConfig::keras()
            }))
        }),
        ("sgd torch momentum", || {
            Box::new(Sgd::new(SgdConfig {
                momentum: 0.9,
                ..SgdConfig::torch()
            }))
        }),
        ("rmsprop keras dense", || {
            Box::new(RmsProp::new(RmsPropConfig {
                lr: 0.01,
                ..RmsPropConfig::keras()
            }))
        }),
        ("rmsprop keras lazy", || {
            Box::new(RmsProp::new(RmsPropConfig::keras_lazy()))
        }),
        ("rmsprop centered momentum dense", || {
            Box::new(RmsProp::new(RmsPropConfig {
                centered: true,
                momentum: 0.9,
                semantics: Semantics::DenseExact,
                ..RmsPropConfig::keras()
            }))
        }),
        ("rmsprop torch", || {
            Box::new(RmsProp::new(RmsPropConfig::torch()))
        }),
        ("adagrad keras", || {
            Box::new(Adagrad::new(AdagradConfig {
                lr: 0.1,
                ..AdagradConfig::keras()
            }))
        }),
        ("adagrad torch", || {
            Box::new(Adagrad::new(AdagradConfig::torch()))
        }),
        ("adagrad weight decay dense", || {
            Box::new(Adagrad::new(AdagradConfig {
                weight_decay: 0.01,
                semantics: Semantics::DenseExact,
                ..AdagradConfig::torch()
            }))
        }),
        ("rowwise adagrad", || {
            Box::new(RowWiseAdagrad::new(RowWiseAdagradConfig {
                lr: 0.1,
                ..RowWiseAdagradConfig::default()
            }))
        }),
        ("adam keras dense", || {
            Box::new(Adam::new(AdamConfig {
                lr: 0.01,
                ..AdamConfig::keras()
            }))
        }),
        ("adam torch sparse lazy", || {
            Box::new(Adam::new(AdamConfig::torch_sparse()))
        }),
        ("adam amsgrad dense", || {
            Box::new(Adam::new(AdamConfig {
                amsgrad: true,
                semantics: Semantics::DenseExact,
                ..AdamConfig::torch()
            }))
        }),
        ("adamw keras dense", || {
            Box::new(AdamW::new(AdamWConfig::keras()))
        }),
        ("adamw keras lazy", || {
            Box::new(AdamW::new(AdamWConfig::keras_lazy()))
        }),
        ("ftrl keras dense", || {
            Box::new(Ftrl::new(FtrlConfig {
                lr: 0.1,
                ..FtrlConfig::keras()
            }))
        }),
        ("ftrl l2 shrinkage lazy", || {
            Box::new(Ftrl::new(FtrlConfig {
                l1_regularization_strength: 0.01,
                l2_shrinkage_regularization_strength: 0.1,
                ..FtrlConfig::keras_lazy()
            }))
        }),
    ]
}

/// One process on the global batches: forward (rows brought current, as
/// the sharded table and the layer do), backward, step.
struct Reference {
    table: EmbeddingTable,
    opt: Box<dyn SparseOptimizer>,
    grad: SparseGrad,
}

impl Reference {
    fn catch_up(&mut self, ids: &[i64]) {
        if self.opt.has_lagging_rows() {
            let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
            self.opt.catch_up(&mut self.table, &rows).unwrap();
        }
    }
}

/// The batches of one training step of rank `k`: ids with their output
/// gradient, and bags with their pooling and gradient.
struct StepBatch {
    ids: Vec<i64>,
    grad: Vec<f32>,
    bag_ids: Vec<i64>,
    offsets: Vec<usize>,
    weights: Vec<f32>,
    pooling: Pooling,
    bag_grad: Vec<f32>,
}

fn step_batch(k: usize, step: u64) -> StepBatch {
    let ids = ids_of(k, step, 5);
    let grad = values(ids.len() * DIM, 1000 + step * 17 + k as u64);
    let (bag_ids, offsets, weights) = bags_of(k, step, 6);
    let pooling = [Pooling::Sum, Pooling::Mean, Pooling::SqrtN, Pooling::Max][step as usize % 4];
    let bag_grad = values((offsets.len() - 1) * DIM, 2000 + step * 13 + k as u64);
    StepBatch {
        ids,
        grad,
        bag_ids,
        offsets,
        weights,
        pooling,
        bag_grad,
    }
}

impl StepBatch {
    fn weights(&self) -> Option<&[f32]> {
        (self.pooling != Pooling::Max).then_some(&self.weights[..])
    }
}

/// Trains `sharded` (on the ranks of its communicator) and `reference`
/// (on their global batches) for `steps` steps from `first`, comparing
/// every forward output bit for bit.
fn train<O: SparseOptimizer>(
    sharded: &mut ShardedTable<O>,
    reference: &mut Reference,
    ranks: usize,
    first: u64,
    steps: u64,
) -> Result<(), String> {
    let rank = sharded.rank();
    for step in first..first + steps {
        let mine = step_batch(rank, step);
        let all: Vec<StepBatch> = (0..ranks).map(|k| step_batch(k, step)).collect();
        let what = format!("step {step}");
        // Forward: plain and pooled.
        let out = ctx("lookup", sharded.lookup_vec(&mine.ids))?;
        let global_ids = global(ranks, |k| all[k].ids.clone());
        reference.catch_up(&global_ids);
        same_bits(
            &format!("{what} lookup"),
            &out,
            &reference.table.lookup_vec(&mine.ids).unwrap(),
        )?;
        let bags = ctx(
            "bags",
            Bags::new(&mine.bag_ids, &mine.offsets, mine.weights()),
        )?;
        sharded.set_pool_on(PoolOn::Caller);
        let pooled = ctx("pooled", {
            let mut out = vec![0.0; bags.len() * DIM];
            sharded
                .pooled_lookup(&bags, mine.pooling, &mut out)
                .map(|()| out)
        })?;
        let global_bag_ids = global(ranks, |k| all[k].bag_ids.clone());
        reference.catch_up(&global_bag_ids);
        same_bits(
            &format!("{what} pooled"),
            &pooled,
            &reference
                .table
                .pooled_lookup_vec(&bags, mine.pooling)
                .unwrap(),
        )?;
        // Backward: the lookup's, then the pooled one's, on every rank.
        ctx("backward", sharded.backward(&mine.ids, &mine.grad))?;
        ctx(
            "backward_pooled",
            sharded.backward_pooled(&bags, mine.pooling, &mine.bag_grad),
        )?;
        ctx("step", sharded.step())?;
        reference_step(reference, ranks, step);
    }
    Ok(())
}

/// This rank's rows of the one-process state.
fn state_rows(full: &OptimizerState, layout: &ShardLayout, rank: usize) -> OptimizerState {
    let rows: Vec<usize> = (0..layout.shard_rows(rank))
        .map(|l| layout.global(rank, l))
        .collect();
    let mut part = full.clone();
    part.shape = full.shape.map(|(_, dim)| (rows.len(), dim));
    for a in &mut part.arrays {
        let width: usize = a.shape[1..].iter().product();
        a.shape[0] = rows.len();
        a.values = rows
            .iter()
            .flat_map(|&r| a.values[r * width..][..width].to_vec())
            .collect();
    }
    if !full.last_step.is_empty() {
        part.last_step = rows.iter().map(|&r| full.last_step[r]).collect();
    }
    part
}

/// The table and this rank's optimizer state equal the reference's, bit
/// for bit.
fn compare<O: SparseOptimizer>(
    what: &str,
    sharded: &mut ShardedTable<O>,
    reference: &Reference,
) -> Result<(), String> {
    let whole = ctx("gather_table", sharded.gather_table())?;
    same_bits(
        &format!("{what}: table"),
        &whole.to_vec(),
        &reference.table.to_vec(),
    )?;
    let want = state_rows(&reference.opt.state(), sharded.layout(), sharded.rank());
    let got = sharded.optimizer().state();
    ensure!(
        got.steps == want.steps,
        "{what}: {} steps, one process {}",
        got.steps,
        want.steps
    );
    ensure!(got.last_step == want.last_step, "{what}: last_step differs");
    ensure!(
        got.kind == want.kind && got.config == want.config,
        "{what}: config differs"
    );
    ensure!(
        got.arrays.len() == want.arrays.len(),
        "{what}: state arrays differ"
    );
    for (g, w) in got.arrays.iter().zip(&want.arrays) {
        same_bits(&format!("{what}: state {}", g.name), &g.values, &w.values)?;
    }
    Ok(())
}

fn ten_steps_of_every_optimizer_are_bitwise(world: &SimpleCommunicator) -> Result<(), String> {
    let (_, size) = my(world);
    for (name, make) in optimizers() {
        for sharding in [Sharding::Range, Sharding::Modulo] {
            let what = format!("{name} {sharding:?}");
            let init = Init::Uniform {
                low: -0.5,
                high: 0.5,
            };
            let mut sharded = ctx(
                "new",
                ShardedTable::new(world, ROWS, DIM, sharding, init, 21, make()),
            )?;
            let mut reference = Reference {
                table: EmbeddingTable::new(ROWS, DIM, init, 21).unwrap(),
                opt: make(),
                grad: SparseGrad::new(DIM),
            };
            train(&mut sharded, &mut reference, size, 0, 10).map_err(|e| format!("{what}: {e}"))?;
            compare(&what, &mut sharded, &reference)?;
            ctx("flush", sharded.flush())?;
            reference.opt.flush(&mut reference.table).unwrap();
            compare(&format!("{what} flushed"), &mut sharded, &reference)?;
        }
    }
    Ok(())
}

/// `step_lookup` (fused on the owners when it can be) against one process
/// accumulating the global batch and stepping: the fused path, the path
/// taken when a gradient is pending, and the one taken when the sums
/// cannot be proven finite (SGD: every row once per rank, gradients up
/// to 1e37: at least 37 × 1e37 in all, beyond `f32::MAX`, though each
/// row's sum stays finite), all bit for bit.
fn step_lookup_equals_backward_then_step(world: &SimpleCommunicator) -> Result<(), String> {
    let (rank, size) = my(world);
    for (name, make) in optimizers() {
        for sharding in [Sharding::Range, Sharding::Modulo] {
            let init = Init::Uniform {
                low: -0.5,
                high: 0.5,
            };
            let mut sharded = ctx(
                "new",
                ShardedTable::new(world, ROWS, DIM, sharding, init, 22, make()),
            )?;
            let mut reference = Reference {
                table: EmbeddingTable::new(ROWS, DIM, init, 22).unwrap(),
                opt: make(),
                grad: SparseGrad::new(DIM),
            };
            for step in 0..6u64 {
                let what = format!("{name} {sharding:?} step {step}");
                // Only plain SGD takes gradients this large without its
                // state overflowing.
                let huge = step == 4 && name == "sgd keras";
                let scale = if huge { 1e37 } else { 1.0 };
                let ids_at = |k: usize| -> Vec<i64> {
                    if huge {
                        (0..ROWS as i64).collect()
                    } else {
                        ids_of(k, step, 8)
                    }
                };
                let grad_of = |k: usize, n: usize| -> Vec<f32> {
                    values(n * DIM, 3000 + step * 7 + k as u64)
                        .into_iter()
                        .map(|x| x * scale)
                        .collect()
                };
                if step == 3 {
                    // A pending gradient: the owners accumulate, then step.
                    let ids = ids_of(rank, step, 9);
                    ctx(
                        "backward",
                        sharded.backward(&ids, &grad_of(rank, ids.len())),
                    )?;
                    let global_ids = global(size, |k| ids_of(k, step, 9));
                    let global_grad = global(size, |k| grad_of(k, ids_of(k, step, 9).len()));
                    reference
                        .grad
                        .accumulate_lookup(&global_ids, &global_grad)
                        .unwrap();
                }
                let ids = ids_at(rank);
                ctx(&what, sharded.step_lookup(&ids, &grad_of(rank, ids.len())))?;
                let global_ids = global(size, ids_at);
                let global_grad = global(size, |k| grad_of(k, ids_at(k).len()));
                let Reference { table, opt, grad } = &mut reference;
                grad.accumulate_lookup(&global_ids, &global_grad).unwrap();
                opt.step(table, grad).unwrap();
                grad.clear();
                ensure!(
                    sharded.grad().is_empty(),
                    "{what}: a gradient is left pending"
                );
                compare(&what, &mut sharded, &reference)?;
            }
        }
    }
    Ok(())
}

/// `Err(Rank { rank, source })` with a source `check` accepts.
fn expect_rank_error<T: std::fmt::Debug>(
    what: &str,
    got: embtable::Result<T>,
    rank: usize,
    check: impl Fn(&Error) -> bool,
) -> Result<(), String> {
    match got {
        Err(Error::Rank { rank: r, source }) if r == rank && check(&source) => Ok(()),
        other => Err(format!(
            "{what}: expected an error of rank {rank}, got {other:?}"
        )),
    }
}

fn errors_reach_every_rank_and_write_nothing(world: &SimpleCommunicator) -> Result<(), String> {
    let (rank, size) = my(world);
    let last = size - 1;
    let one = EmbeddingTable::new(ROWS, DIM, Init::default(), 8).unwrap();
    let opt = Sgd::new(SgdConfig {
        lr: 0.5,
        momentum: 0.9,
        ..SgdConfig::keras()
    });
    let mut sharded = ctx(
        "from_table",
        ShardedTable::from_table(world, &one, Sharding::Modulo, opt),
    )?;

    // An id out of range on the last rank, at position 2.
    let mut ids = vec![1i64, 2, 3, 4];
    if rank == last {
        ids[2] = ROWS as i64 + 5;
    }
    let mut out = vec![7.0; ids.len() * DIM];
    let got = sharded.lookup(&ids, &mut out);
    expect_rank_error(
        "bad id",
        got,
        last,
        |e| matches!(e, Error::IndexOutOfRange { position: 2, index, rows: ROWS } if *index == ROWS as i128 + 5),
    )?;
    ensure!(
        out.iter().all(|&x| x == 7.0),
        "the output was written after an error"
    );
    let message = sharded.lookup(&ids, &mut out).unwrap_err().to_string();
    ensure!(
        message
            == format!(
                "on rank {last}: id {} at position 2 is out of range for a table of {ROWS} rows",
                ROWS + 5
            ),
        "message: {message}"
    );

    // A NaN gradient on rank 0 at position 3: nothing accumulated anywhere.
    let ids = [0i64, 5, 9];
    let mut grad = vec![0.25; ids.len() * DIM];
    if rank == 0 {
        grad[3] = f32::NAN;
    }
    let got = sharded.backward(&ids, &grad);
    expect_rank_error(
        "NaN gradient",
        got,
        0,
        |e| matches!(e, Error::NonFinite { position: 3, value, .. } if value.is_nan()),
    )?;
    ensure!(
        sharded.grad().is_empty(),
        "a gradient was accumulated after an error"
    );

    // Two ranks fail: every rank reports the first.
    if size >= 2 {
        let mut ids = vec![1i64, 2];
        if rank == 1 || rank == last {
            ids[0] = -1;
        }
        let got = sharded.backward(&ids, &[0.5; 2 * DIM]);
        expect_rank_error("two failures", got, 1, |e| {
            matches!(
                e,
                Error::IndexOutOfRange {
                    position: 0,
                    index: -1,
                    ..
                }
            )
        })?;
        ensure!(
            sharded.grad().is_empty(),
            "a gradient was accumulated after an error"
        );
    }

    // A bad pooling on rank 0 only.
    let ids = [1i64, 2, 3];
    let weights = [1.0, 2.0, 3.0];
    let bags = Bags::new(&ids, &[0, 3], Some(&weights)).unwrap();
    let pooling = if rank == 0 {
        Pooling::Max
    } else {
        Pooling::Sum
    };
    let got = sharded.backward_pooled(&bags, pooling, &[1.0; DIM]);
    expect_rank_error("max with weights", got, 0, |e| {
        matches!(
            e,
            Error::InvalidConfig {
                field: "pooling",
                ..
            }
        )
    })?;

    // Sums that overflow on an owner: no rank steps.
    let before = ctx("gather", sharded.gather_table())?;
    ctx("backward", sharded.backward(&[6i64, 6], &[3e38; 2 * DIM]))?;
    let owner = sharded.layout().locate(6).0;
    let got = sharded.step();
    expect_rank_error(
        "overflow",
        got,
        owner,
        |e| matches!(e, Error::NonFinite { position, value, .. } if *position == 6 * DIM && value.is_infinite()),
    )?;
    ensure!(
        sharded.optimizer().steps() == 0,
        "a rank stepped after an error"
    );
    let after = ctx("gather", sharded.gather_table())?;
    same_bits(
        "table after a refused step",
        &after.to_vec(),
        &before.to_vec(),
    )?;
    sharded.clear_grad();

    // A bad config on the last rank only.
    let lr = if rank == last { -1.0 } else { 0.1 };
    let got = ShardedTable::new(
        world,
        ROWS,
        DIM,
        Sharding::Range,
        Init::default(),
        1,
        Sgd::new(SgdConfig {
            lr,
            ..SgdConfig::keras()
        }),
    );
    expect_rank_error("bad config", got, last, |e| {
        matches!(e, Error::InvalidConfig { field: "lr", .. })
    })?;
    // Too few rows for the world (only when there are several ranks).
    if size >= 2 {
        let got = ShardedTable::new(
            world,
            size - 1,
            DIM,
            Sharding::Range,
            Init::default(),
            1,
            Sgd::default(),
        );
        expect_rank_error("too few rows", got, 0, |e| {
            matches!(e, Error::InvalidConfig { field: "rows", .. })
        })?;
    }

    if size >= 2 {
        // Different calls on valid input: the rank that differs is named,
        // nobody waits in a mismatched collective, nothing is written.
        let ids = [1i64, 2, 3];
        let bags = Bags::new(&ids, &[0, 3], None).unwrap();
        let pooling = if rank == last {
            Pooling::Mean
        } else {
            Pooling::Sum
        };
        let mut out = vec![7.0; DIM];
        let got = sharded.pooled_lookup(&bags, pooling, &mut out);
        expect_rank_error("another pooling", got, last, |e| {
            matches!(e, Error::InvalidConfig { field: "call", .. })
        })?;
        ensure!(
            out.iter().all(|&x| x == 7.0),
            "the output was written after an error"
        );
        let got = if rank == last {
            sharded.lookup(&ids, &mut vec![0.0; 3 * DIM])
        } else {
            sharded.backward(&ids, &[0.5; 3 * DIM])
        };
        expect_rank_error("another method", got, last, |e| {
            matches!(e, Error::InvalidConfig { field: "call", .. })
        })?;
        ensure!(
            sharded.grad().is_empty(),
            "a gradient was accumulated after an error"
        );
        let got = if rank == last {
            sharded.step()
        } else {
            sharded.flush()
        };
        expect_rank_error("step against flush", got, last, |e| {
            matches!(e, Error::InvalidConfig { field: "call", .. })
        })?;
        ensure!(
            sharded.optimizer().steps() == 0,
            "a rank stepped after an error"
        );
        // Ranks that disagree on the table's shape.
        let rows = if rank == last { ROWS + 1 } else { ROWS };
        let got = ShardedTable::new(
            world,
            rows,
            DIM,
            Sharding::Range,
            Init::default(),
            1,
            Sgd::default(),
        );
        expect_rank_error("other rows", got, last, |e| {
            matches!(e, Error::InvalidConfig { field: "rows", .. })
        })?;
    }

    // A save that fails on one rank leaves the previous checkpoint intact
    // on every rank: first where the directory cannot be made, then where
    // the file cannot be written (after the others have written theirs).
    let dir = checkpoint_dir(world, 0);
    ctx("save", sharded.save(&dir))?;
    let saved = ctx("gather", sharded.gather_table())?;
    ctx("a step", sharded.step_lookup(&[1i64, 2], &[1.0; 2 * DIM]))?;
    let unmakeable = dir.join(shard_file_name(0, size)).join("below-a-file");
    for (what, bad_dir) in [
        ("unmakeable directory", unmakeable),
        ("unwritable file", PathBuf::from("/proc/self")),
    ] {
        let target = if rank == last { bad_dir } else { dir.clone() };
        let got = sharded.save(&target);
        expect_rank_error(what, got, last, |e| matches!(e, Error::Io { .. }))?;
        world.barrier();
        let mut opt = Sgd::default();
        let table = ctx(
            "load after a failed save",
            load_sharded_checkpoint(&dir, &mut opt),
        )?;
        same_bits(
            &format!("{what}: the previous checkpoint"),
            &table.to_vec(),
            &saved.to_vec(),
        )?;
        let leftovers: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .map(|e| {
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .filter(|name| !name.starts_with("shard-"))
            .collect();
        ensure!(
            leftovers.is_empty(),
            "{what}: files left behind: {leftovers:?}"
        );
        world.barrier();
    }
    world.barrier();
    if rank == 0 {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }

    // Still in step with each other: a valid step works everywhere.
    ctx(
        "step after errors",
        sharded.step_lookup(&[1i64], &[1.0; DIM]),
    )?;
    ensure!(
        sharded.optimizer().steps() == 2,
        "the valid steps did not count"
    );
    Ok(())
}

/// The communicator of ranks `0..n`, on those ranks.
fn first_ranks(world: &SimpleCommunicator, n: usize) -> Option<SimpleCommunicator> {
    let color = if (world.rank() as usize) < n {
        Color::with_value(0)
    } else {
        Color::undefined()
    };
    world.split_by_color(color)
}

fn checkpoint_dir(world: &SimpleCommunicator, n: usize) -> PathBuf {
    // One name for all ranks (they share the machine), unique to the job
    // through rank 0's process id.
    let mut pid = std::process::id();
    world.process_at_rank(0).broadcast_into(&mut pid);
    std::env::temp_dir().join(format!("embtable-mpi-test-{pid}-{n}"))
}

fn checkpoints_reshard_n_to_m_bit_for_bit(world: &SimpleCommunicator) -> Result<(), String> {
    let (rank, size) = my(world);
    let make = || -> Box<dyn SparseOptimizer> {
        Box::new(Adam::new(AdamConfig {
            lr: 0.05,
            semantics: Semantics::DenseExact,
            ..AdamConfig::keras()
        }))
    };
    for n in 1..=size {
        // Train 3 steps on ranks 0..n (sharded by range) and save.
        let dir = checkpoint_dir(world, n);
        let init = Init::default();
        let mut reference = Reference {
            table: EmbeddingTable::new(ROWS, DIM, init, 5).unwrap(),
            opt: make(),
            grad: SparseGrad::new(DIM),
        };
        if let Some(sub) = first_ranks(world, n) {
            let mut sharded = ctx(
                "new",
                ShardedTable::new(&sub, ROWS, DIM, Sharding::Range, init, 5, make()),
            )?;
            train(&mut sharded, &mut reference, n, 0, 3)?;
            ctx("save", sharded.save(&dir))?;
        } else {
            // Ranks outside the save build the same reference.
            for step in 0..3 {
                reference_step(&mut reference, n, step);
            }
        }
        world.barrier();
        // One process, without MPI.
        let mut one_opt = make();
        let table = ctx(
            "load on one process",
            load_sharded_checkpoint(&dir, &mut one_opt),
        )?;
        same_bits(
            &format!("{n} -> one process: table"),
            &table.to_vec(),
            &reference.table.to_vec(),
        )?;
        ensure!(
            one_opt.state() == reference.opt.state(),
            "{n} -> one process: optimizer state differs"
        );
        // Every m ranks, with either sharding, then one more step each.
        for m in 1..=size {
            for sharding in [Sharding::Range, Sharding::Modulo] {
                if let Some(sub) = first_ranks(world, m) {
                    let what = format!("{n} -> {m} ranks {sharding:?}");
                    let mut loaded = ctx("load", ShardedTable::load(&sub, &dir, sharding, make()))?;
                    compare(&what, &mut loaded, &reference)?;
                    let mut resumed = Reference {
                        table: reference.table.clone(),
                        opt: make(),
                        grad: SparseGrad::new(DIM),
                    };
                    resumed.opt.load_state(reference.opt.state()).unwrap();
                    train(&mut loaded, &mut resumed, m, 3, 1)?;
                    compare(&format!("{what}, a step later"), &mut loaded, &resumed)?;
                }
                world.barrier();
            }
        }
        world.barrier();
        if rank == 0 {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("removing {}: {e}", dir.display()))?;
        }
    }
    Ok(())
}

/// One process's step on the global batch of `ranks` ranks at `step`:
/// rows brought current as the forward passes bring them, the lookups'
/// gradient, then the bags', then the optimizer.
fn reference_step(reference: &mut Reference, ranks: usize, step: u64) {
    let all: Vec<StepBatch> = (0..ranks).map(|k| step_batch(k, step)).collect();
    let global_ids = global(ranks, |k| all[k].ids.clone());
    reference.catch_up(&global_ids);
    let global_bag_ids = global(ranks, |k| all[k].bag_ids.clone());
    reference.catch_up(&global_bag_ids);
    let global_grad = global(ranks, |k| all[k].grad.clone());
    reference
        .grad
        .accumulate_lookup(&global_ids, &global_grad)
        .unwrap();
    let mut offsets = vec![0];
    for b in &all {
        let base = *offsets.last().unwrap();
        offsets.extend(b.offsets[1..].iter().map(|&x| x + base));
    }
    let pooling = all[0].pooling;
    let weights = global(ranks, |k| all[k].weights.clone());
    let gbags = Bags::new(
        &global_bag_ids,
        &offsets,
        (pooling != Pooling::Max).then_some(&weights[..]),
    )
    .unwrap();
    let gb_grad = global(ranks, |k| all[k].bag_grad.clone());
    let Reference { table, opt, grad } = reference;
    grad.accumulate_pooled(table, &gbags, pooling, &gb_grad)
        .unwrap();
    opt.step(table, grad).unwrap();
    grad.clear();
}
