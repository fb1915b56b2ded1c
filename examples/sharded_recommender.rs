//! The recommender of `examples/recommender`, trained data-parallel on the
//! ranks of an MPI job with both of its tables row-sharded over them
//! ([`embtable::shard::ShardedTable`]).
//!
//! ```sh
//! cargo build --release --features mpi --example sharded_recommender
//! mpirun -np 4 target/release/examples/sharded_recommender
//! mpirun -np 2 target/release/examples/sharded_recommender --epochs 2 --check-one-process
//! ```
//!
//! Every rank generates the same data. Each global batch of `--batch`
//! examples (the same batches, in the same order, as the one-process
//! recommender) is cut into one contiguous part per rank; every rank draws
//! the batch's shared negatives from the same seed, so the ranks together
//! compute what one process computes on the whole batch. Each rank looks
//! its ids up in the sharded tables (rows of any rank), does the dense
//! maths of its examples (the recommender's own code), and sends the
//! gradients back to the rows' owners, which step their rows. The only
//! difference from one process is the order in which the ranks' partial
//! gradients of a shared negative are added (each rank sums over its own
//! examples), so the recall is the one-process recall up to rounding:
//! `--check-one-process` trains one process on rank 0 as well and fails
//! unless the two recalls agree.
//!
//! After each epoch the tables are gathered on every rank and rank 0
//! evaluates recall@10 and NDCG@10 as the recommender does; it also prints
//! the bytes each rank sent per step.

// The recommender's modules, shared as they are; this example uses part of
// each.
#[allow(dead_code)]
#[path = "recommender/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "recommender/dense.rs"]
mod dense;
#[allow(dead_code)]
#[path = "recommender/metrics.rs"]
mod metrics;
#[allow(dead_code)]
#[path = "recommender/model.rs"]
mod model;
#[path = "recommender/rng.rs"]
mod rng;

use std::error::Error;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use embtable::shard::{ShardedTable, Sharding, Traffic};
use embtable::{Adagrad, AdagradConfig, EpsPlacement, Init, Pooling};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::data::{Dataset, GenConfig, Split};
use crate::metrics::Metrics;
use crate::model::{Model, ModelConfig, Negatives, StepIds, StepRows};
use crate::rng::Rng;

/// Ranking cut-off of the reported metrics.
const K: usize = 10;

#[derive(Parser, Debug)]
#[command(
    about = "Train the two-tower recommender data-parallel over MPI ranks, its tables row-sharded"
)]
struct Args {
    /// Passes over the training interactions.
    #[arg(long, default_value_t = 6)]
    epochs: u64,
    /// Training examples per step, over all ranks.
    #[arg(long, default_value_t = 2048)]
    batch: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = 32)]
    dim: usize,
    /// Adagrad's learning rate (the recommender's default optimizer).
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// Users of the generated data set.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Items of the generated data set.
    #[arg(long, default_value_t = 50_000)]
    items: usize,
    /// Users evaluated after each epoch (a fixed random sample; 0: all).
    #[arg(long, default_value_t = 5_000)]
    eval_users: usize,
    /// How the rows are split over the ranks.
    #[arg(long, value_enum, default_value_t = ShardingName::Modulo)]
    sharding: ShardingName,
    /// Seed of the data, the tables, the negatives and the shuffles.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Also train one process on rank 0 and fail unless the final recalls
    /// agree (within 0.01, and within 5 %).
    #[arg(long)]
    check_one_process: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ShardingName {
    /// Contiguous blocks of rows.
    Range,
    /// Row `r` on rank `r mod world`: spreads the items, whose ids carry
    /// no order, and the users alike.
    Modulo,
}

fn adagrad(lr: f32) -> Adagrad {
    // The recommender's Adagrad.
    Adagrad::new(AdagradConfig {
        lr,
        initial_accumulator_value: 0.0,
        epsilon: 1e-8,
        eps_placement: EpsPlacement::OutsideSqrt,
        ..AdagradConfig::torch()
    })
}

/// The model's two tables, sharded, with the recommender's step buffers.
struct ShardedModel {
    items: ShardedTable<Adagrad>,
    users: ShardedTable<Adagrad>,
    cfg: ModelConfig,
    negatives: Negatives,
    ids: StepIds,
    rows: StepRows,
}

impl ShardedModel {
    /// The recommender's initial tables (the same rows, drawn the same
    /// way), split over the ranks of `comm`.
    fn new(
        comm: &SimpleCommunicator,
        data: &Dataset,
        cfg: ModelConfig,
        args: &Args,
    ) -> embtable::Result<Self> {
        let sharding = match args.sharding {
            ShardingName::Range => Sharding::Range,
            ShardingName::Modulo => Sharding::Modulo,
        };
        let init = Init::Normal {
            mean: 0.0,
            std: cfg.init_std,
        };
        let user_init = Init::Normal {
            mean: 0.0,
            std: cfg.user_init_std,
        };
        let seed = args.seed;
        Ok(ShardedModel {
            items: ShardedTable::new(
                comm,
                data.items,
                cfg.dim,
                sharding,
                init,
                seed,
                adagrad(args.lr),
            )?,
            users: ShardedTable::new(
                comm,
                data.users,
                cfg.dim,
                sharding,
                user_init,
                seed ^ 0x5eed,
                adagrad(args.lr),
            )?,
            cfg,
            negatives: Negatives::new(data, cfg.negative_power),
            ids: StepIds::default(),
            rows: StepRows::default(),
        })
    }

    /// This rank's part of one step: the examples `part` of the global
    /// batch, the batch's negatives drawn from `rng`. Returns the loss sum
    /// of `part`. Collective.
    fn train_part(
        &mut self,
        data: &Dataset,
        owner: &[u32],
        part: &[u32],
        rng: &mut Rng,
    ) -> embtable::Result<f64> {
        let (cfg, ids, rows) = (&self.cfg, &mut self.ids, &mut self.rows);
        ids.assemble(cfg, &self.negatives, data, owner, part, rng);
        rows.resize(cfg, part.len());
        let bags = ids.bags(cfg)?;
        self.items
            .pooled_lookup(&bags, Pooling::Mean, &mut rows.pooled)?;
        self.users.lookup(&ids.user_ids, &mut rows.user_rows)?;
        self.items.lookup(&ids.cand_ids, &mut rows.cand_rows)?;
        let loss = rows.gradients(cfg, &self.negatives, &ids.cand_ids);
        self.items
            .backward_pooled(&bags, Pooling::Mean, &rows.grad_user)?;
        self.items.backward(&ids.cand_ids, &rows.grad_cand)?;
        self.users.backward(&ids.user_ids, &rows.grad_user)?;
        self.items.step()?;
        self.users.step()?;
        Ok(loss)
    }

    /// Bytes this rank has sent through both tables.
    fn traffic(&self) -> Traffic {
        let (a, b) = (self.items.traffic(), self.users.traffic());
        Traffic {
            ids: a.ids + b.ids,
            rows: a.rows + b.rows,
            exchanges: a.exchanges + b.exchanges,
        }
    }
}

/// The part of `batch` that rank `rank` of `world` trains.
fn part_of(batch: &[u32], rank: usize, world: usize) -> &[u32] {
    let n = batch.len();
    &batch[rank * n / world..(rank + 1) * n / world]
}

/// The global batches of `epoch`, as the recommender draws them: a fresh
/// order from `(seed, epoch)`, batch `b` drawing its negatives from
/// `(seed, epoch, b)`.
fn epoch_order(data: &Dataset, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..data.train_len() as u32).collect();
    Rng::derive(seed, &[3, epoch]).shuffle(&mut order);
    order
}

/// Recall@10 and NDCG@10 of the model made of the two tables, as the
/// recommender evaluates it.
fn evaluate(
    data: &Dataset,
    cfg: ModelConfig,
    items: embtable::EmbeddingTable,
    users: embtable::EmbeddingTable,
    eval: &[usize],
) -> embtable::Result<Metrics> {
    let model = Model::from_parts(data, items, adagrad(0.1), users, adagrad(0.1), cfg)?;
    let items_t = model.items_transposed();
    Ok(metrics::evaluate(
        eval,
        data.items,
        K,
        |block, out| model.score_block(data, block, Split::Test, &items_t, out),
        |u| data.known(u, Split::Test),
        |u| data.held(u, Split::Test).into_iter().collect(),
    ))
}

/// A fixed sample of `n` users with a held-out item, as the recommender draws it.
fn eval_sample(data: &Dataset, n: usize, seed: u64) -> Vec<usize> {
    let mut users = data.eval_users(Split::Test);
    if n > 0 && n < users.len() {
        Rng::derive(seed, &[5]).shuffle(&mut users);
        users.truncate(n);
        users.sort_unstable();
    }
    users
}

/// One process training the recommender's model on the same batches.
fn one_process(
    data: &Dataset,
    cfg: ModelConfig,
    args: &Args,
    eval: &[usize],
) -> Result<Metrics, Box<dyn Error>> {
    let mut model = Model::new(data, cfg, || adagrad(args.lr), args.seed)?;
    let owner = data.owners();
    for epoch in 0..args.epochs {
        let order = epoch_order(data, args.seed, epoch);
        for (b, batch) in order.chunks(args.batch).enumerate() {
            let mut rng = Rng::derive(args.seed, &[4, epoch, b as u64]);
            model.train_batch(data, &owner, batch, &mut rng)?;
        }
    }
    let (items, users) = (model.items.table().clone(), model.users.table().clone());
    Ok(evaluate(data, cfg, items, users, eval)?)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let rank = world.rank();
    match run(&world, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rank {rank}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(world: &SimpleCommunicator, args: &Args) -> Result<(), Box<dyn Error>> {
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    if args.batch == 0 || args.dim == 0 {
        return Err("--batch and --dim must be positive".into());
    }
    let gen_cfg = GenConfig {
        users: args.users,
        items: args.items,
        ..GenConfig::default()
    };
    if gen_cfg.users == 0 || gen_cfg.items <= gen_cfg.max_len {
        return Err(format!(
            "--users must be positive and --items above {}",
            gen_cfg.max_len
        )
        .into());
    }
    let data = data::generate(&gen_cfg, args.seed);
    let owner = data.owners();
    let eval = eval_sample(&data, args.eval_users, args.seed);
    // The recommender's defaults: its negatives are drawn ∝ √(count + 1).
    let cfg = ModelConfig {
        dim: args.dim,
        negative_power: 0.5,
        ..ModelConfig::default()
    };
    let mut model = ShardedModel::new(world, &data, cfg, args)?;
    if rank == 0 {
        println!(
            "{size} ranks, {:?} sharding: {} users and {} items ({} training interactions), dim {}, global batch {} ({} per rank)",
            args.sharding,
            data.users,
            data.items,
            data.train_len(),
            cfg.dim,
            args.batch,
            args.batch / size
        );
    }
    let mut last = None;
    for epoch in 0..args.epochs {
        let order = epoch_order(&data, args.seed, epoch);
        let (t0, before) = (Instant::now(), model.traffic());
        let (mut loss, mut steps) = (0.0, 0u64);
        for (b, batch) in order.chunks(args.batch).enumerate() {
            let mut rng = Rng::derive(args.seed, &[4, epoch, b as u64]);
            loss += model.train_part(&data, &owner, part_of(batch, rank, size), &mut rng)?;
            steps += 1;
        }
        let train = t0.elapsed();
        let sent = model.traffic() - before;
        let mut loss_all = 0.0;
        world.all_reduce_into(
            &loss,
            &mut loss_all,
            mpi::collective::SystemOperation::sum(),
        );
        let mut slowest = 0.0;
        world.all_reduce_into(
            &train.as_secs_f64(),
            &mut slowest,
            mpi::collective::SystemOperation::max(),
        );
        let items = model.items.gather_table()?;
        let users = model.users.gather_table()?;
        if rank == 0 {
            let m = evaluate(&data, cfg, items, users, &eval)?;
            println!(
                "epoch {}/{}  loss {:.4}  {:.1}s ({:.0} ex/s) | recall@{K} {:.4}  NDCG@{K} {:.4} | rank 0 sent {:.1} KB/step ({:.1} ids, {:.1} rows)",
                epoch + 1,
                args.epochs,
                loss_all / data.train_len() as f64,
                slowest,
                data.train_len() as f64 / slowest,
                m.recall,
                m.ndcg,
                sent.bytes() as f64 / steps as f64 / 1e3,
                sent.ids as f64 / steps as f64 / 1e3,
                sent.rows as f64 / steps as f64 / 1e3,
            );
            last = Some(m);
        }
    }
    if args.check_one_process {
        let mut failed = 0i32;
        if rank == 0 {
            let sharded = last.ok_or("--check-one-process needs at least one epoch")?;
            let one = one_process(&data, cfg, args, &eval)?;
            let close = (sharded.recall - one.recall).abs() <= 0.01_f64.min(0.05 * one.recall);
            println!(
                "one process: recall@{K} {:.4}  NDCG@{K} {:.4}; {size} ranks: {:.4} / {:.4}: {}",
                one.recall,
                one.ndcg,
                sharded.recall,
                sharded.ndcg,
                if close { "the same" } else { "DIFFERENT" }
            );
            failed = i32::from(!close);
        }
        world.process_at_rank(0).broadcast_into(&mut failed);
        if failed != 0 {
            return Err("the sharded recall differs from the one-process recall".into());
        }
    }
    Ok(())
}
