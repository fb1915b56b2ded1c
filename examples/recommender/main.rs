//! The main demo: a two-tower recommender trained with embtable.
//!
//! ```sh
//! cargo run --release --example recommender
//! cargo run --release --example recommender -- --optimizer rmsprop --epochs 5
//! cargo run --release --example recommender -- --data ml-latest-small/ratings.csv
//! ```
//!
//! By default it generates 20,000 users and 50,000 items with Zipf
//! popularity and hidden topics (`data.rs`); `--data` reads a file of real
//! interactions instead (`csv.rs`: MovieLens, Amazon-style string ids, ISO
//! dates). Each user's last interaction is held out for the test, the one
//! before it for validation. It trains a model whose only parameters are
//! two embedding tables (`model.rs`: the user vector is the mean of the
//! user's recent items plus a user-id embedding, the item vector a row of
//! the same item table, a sampled softmax over negatives shared by the
//! batch, or BPR), after each epoch reports recall@10 and NDCG@10 on the
//! validation items beside a most-popular baseline (`metrics.rs`), stops
//! when they stop improving (`stopping.rs`) and scores the test items once,
//! with the best epoch's tables. The dense maths of a step is a few matrix
//! products (`dense.rs`); `--save`/`--resume` use `checkpoint.rs`.
//!
//! Run with `--help` for the options, the file formats and the split.

mod checkpoint;
mod csv;
mod data;
mod date;
mod dense;
mod hashed;
mod metrics;
mod model;
mod rng;
mod stopping;

use std::cell::RefCell;
use std::error::Error;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use embtable::dynamic::Capacity;
use embtable::{
    Adagrad, AdagradConfig, Embedding, EpsPlacement, RmsProp, RmsPropConfig, RowWiseAdagrad,
    RowWiseAdagradConfig, Sgd, SgdConfig, SparseOptimizer,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::Checkpoint;
use crate::csv::{Columns, CsvOptions, FileInfo, Header};
use crate::data::{Dataset, GenConfig, Split};
use crate::hashed::Hashed;
use crate::metrics::Metrics;
use crate::model::{BatchStats, Loss, Model, ModelConfig, Phases, Tower};
use crate::rng::Rng;
use crate::stopping::EarlyStop;

/// Ranking cut-off of the reported metrics.
const K: usize = 10;

/// Command-line options. Those that shape training are saved in
/// checkpoints: on `--resume` they come from the checkpoint, and giving a
/// different value is an error.
#[derive(Parser, Debug)]
#[command(
    about = "Train a two-tower recommender whose only parameters are embtable embedding tables",
    long_about = "Train a two-tower recommender whose only parameters are embtable \
        embedding tables, on a generated data set or on a file of real interactions \
        (--data).\n\n\
        After each epoch it prints recall@10 and NDCG@10 on the validation items \
        beside a most-popular baseline, and stops once validation NDCG@10 has not \
        improved for --patience epochs (or after --epochs), keeping the tables of \
        the best epoch: the number of epochs follows the data. The test items are \
        scored once, at the end. -h gives a summary of the options.",
    after_long_help = csv::FORMAT_HELP
)]
struct Args {
    /// Sparse optimizer of both tables [default: adagrad].
    #[arg(long, value_enum)]
    optimizer: Option<OptName>,
    /// Learning rate [default: tuned per optimizer, see the --optimizer values].
    #[arg(long)]
    lr: Option<f32>,
    /// Embedding dimension [default: 32].
    #[arg(long)]
    dim: Option<usize>,
    /// Most passes over the training interactions, resumed ones included;
    /// early stopping (--patience) usually ends training sooner.
    #[arg(long, default_value_t = 50)]
    epochs: u64,
    /// Stop once validation NDCG@10 has not improved for this many epochs
    /// and keep the tables of the best epoch (0: train all --epochs and
    /// keep the last).
    #[arg(long, default_value_t = 5)]
    patience: u64,
    /// Training examples per step [default: 2048].
    #[arg(long)]
    batch: Option<usize>,
    /// Recent items pooled into the user vector [default: 20].
    #[arg(long)]
    history: Option<usize>,
    /// Negatives sampled per step, shared by its examples [default: 256].
    #[arg(long)]
    negatives: Option<usize>,
    /// Training loss [default: softmax].
    #[arg(long, value_enum)]
    loss: Option<LossName>,
    /// Draw negatives ∝ (count + 1)^POWER: 0 uniform, 1 by popularity [default: 0.5].
    #[arg(long)]
    negative_power: Option<f64>,
    /// Weight of each history item relative to the next more recent one
    /// (1: plain mean) [default: 1].
    #[arg(long)]
    recency: Option<f32>,
    /// Standard deviation of the initial user-id embeddings (0: zeros) [default: 0.1].
    #[arg(long)]
    user_init_std: Option<f32>,
    /// Rescale updated rows to at most this L2 norm (0: off) [default: 3 for sgd, else 0].
    #[arg(long)]
    max_norm: Option<f32>,
    /// Seed of the data, the initial tables, the negatives and the shuffles [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// A file of interactions, `user,item[,rating[,time]]` per line
    /// (MovieLens, Amazon-style ids, ISO dates: see below), instead of the
    /// generated data.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// With --data: what each column holds, comma-separated, from user,
    /// item, rating, time and _ (a column to skip), e.g.
    /// item,user,rating,time [default: user,item[,rating[,time]]].
    #[arg(long, value_name = "LIST", value_parser = Columns::parse)]
    columns: Option<Columns>,
    /// With --data: whether the first line is a header (auto: see below).
    #[arg(long, value_enum, default_value_t = Header::Auto)]
    header: Header,
    /// With --data: keep interactions rated at least this.
    #[arg(long)]
    min_rating: Option<f32>,
    /// Users of the generated data set.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Items of the generated data set.
    #[arg(long, default_value_t = 50_000)]
    items: usize,
    /// Validation users scored after each epoch (a fixed random sample; 0:
    /// all). The final test scores every user.
    #[arg(long, default_value_t = 5_000)]
    eval_users: usize,
    /// Write a checkpoint here after every epoch.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
    /// Continue from this checkpoint: its tables, optimizer states and
    /// settings, on the same data, up to --epochs.
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    /// Dynamic tables keyed by 64-bit hashes of the user and item ids:
    /// no table is sized by the data, rows are created as ids arrive
    /// (embtable::dynamic). Not with --save / --resume.
    #[arg(long)]
    dynamic: bool,
    /// With --dynamic: each table keeps at most this many ids, evicting
    /// the least recently used [default: unbounded].
    #[arg(long, value_name = "ROWS")]
    capacity: Option<usize>,
}

/// The `--loss` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LossName {
    /// Sampled softmax over the positive and the shared negatives.
    Softmax,
    /// BPR: −log σ(s⁺ − s⁻), averaged over the negatives.
    Bpr,
}

/// The `--optimizer` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OptName {
    /// Adagrad (one accumulator per weight), lr 0.1.
    Adagrad,
    /// FBGEMM's row-wise Adagrad (one accumulator per row), lr 0.1.
    RowwiseAdagrad,
    /// RMSprop, lr 0.01.
    Rmsprop,
    /// Plain SGD, lr 0.02, with rows kept within norm 3.
    Sgd,
}

impl OptName {
    fn name(self) -> &'static str {
        match self {
            OptName::Adagrad => "adagrad",
            OptName::RowwiseAdagrad => "rowwise-adagrad",
            OptName::Rmsprop => "rmsprop",
            OptName::Sgd => "sgd",
        }
    }

    /// The learning rate each optimizer was tuned to on the default data.
    fn default_lr(self) -> f32 {
        match self {
            OptName::Adagrad => 0.1,
            OptName::RowwiseAdagrad => 0.1,
            OptName::Rmsprop => 0.01,
            OptName::Sgd => 0.02,
        }
    }

    /// The row norm bound each optimizer trains best with: plain SGD needs
    /// one (the summed gradient of a popular row is large), the adaptive
    /// optimizers do not.
    fn default_max_norm(self) -> f32 {
        match self {
            OptName::Sgd => 3.0,
            _ => 0.0,
        }
    }

    /// The code of the optimizer in saved settings.
    fn code(self) -> f64 {
        match self {
            OptName::Adagrad => 0.0,
            OptName::RowwiseAdagrad => 1.0,
            OptName::Rmsprop => 2.0,
            OptName::Sgd => 3.0,
        }
    }
}

/// Settings of one training run (the options once defaults are filled in).
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Model shape.
    pub model: ModelConfig,
    /// Total epochs.
    pub epochs: u64,
    /// Examples per step.
    pub batch: usize,
    /// Seed.
    pub seed: u64,
}

/// Everything that shapes training, resolved from the options, their
/// defaults and a checkpoint being resumed.
#[derive(Clone, Debug)]
struct Settings {
    opt: OptName,
    lr: f32,
    run: RunConfig,
}

impl Settings {
    /// Fills in defaults; with a checkpoint, takes its settings and refuses
    /// options that contradict them.
    fn resolve(args: &Args, ckpt: Option<&Checkpoint>) -> Result<Settings, String> {
        let saved = ckpt.map(|c| c.settings.as_slice());
        let get = |name: &str, given: Option<f64>, default: f64| -> Result<f64, String> {
            let stored = saved.and_then(|s| s.iter().find(|(n, _)| n == name).map(|p| p.1));
            match (stored, given) {
                (Some(s), Some(g)) if s != g => Err(format!(
                    "--{name} {g} differs from the checkpoint's {s}; leave it out to resume"
                )),
                (Some(s), _) => Ok(s),
                (None, Some(g)) => Ok(g),
                (None, None) if saved.is_some() => {
                    Err(format!("the checkpoint does not record --{name}"))
                }
                (None, None) => Ok(default),
            }
        };
        let opt = match get("optimizer", args.optimizer.map(OptName::code), 0.0)? {
            0.0 => OptName::Adagrad,
            1.0 => OptName::RowwiseAdagrad,
            2.0 => OptName::Rmsprop,
            3.0 => OptName::Sgd,
            x => return Err(format!("unknown optimizer code {x} in the checkpoint")),
        };
        let loss = match args.loss {
            Some(LossName::Softmax) => Some(0.0),
            Some(LossName::Bpr) => Some(1.0),
            None => None,
        };
        let size = |name: &str, given: Option<usize>, default: usize| -> Result<usize, String> {
            let x = get(name, given.map(|g| g as f64), default as f64)?;
            if x >= 1.0 && x.fract() == 0.0 {
                Ok(x as usize)
            } else {
                Err(format!("--{name} must be a positive integer, got {x}"))
            }
        };
        let f32_of = |name: &str, given: Option<f32>, default: f32| {
            get(name, given.map(f64::from), f64::from(default)).map(|x| x as f32)
        };
        let max_norm = f32_of("max-norm", args.max_norm, opt.default_max_norm())?;
        let model = ModelConfig {
            dim: size("dim", args.dim, 32)?,
            history: size("history", args.history, 20)?,
            negatives: size("negatives", args.negatives, 256)?,
            loss: if get("loss", loss, 0.0)? == 0.0 {
                Loss::Softmax
            } else {
                Loss::Bpr
            },
            negative_power: get("negative-power", args.negative_power, 0.5)?,
            recency: f32_of("recency", args.recency, 1.0)?,
            user_init_std: f32_of("user-init-std", args.user_init_std, 0.1)?,
            max_norm: (max_norm > 0.0).then_some(max_norm),
            ..ModelConfig::default()
        };
        if !(model.recency > 0.0 && model.recency <= 1.0) {
            return Err(format!(
                "--recency must be in (0, 1], got {}",
                model.recency
            ));
        }
        let seed = match (ckpt.map(|c| c.seed), args.seed) {
            (Some(s), Some(g)) if s != g => {
                return Err(format!(
                    "--seed {g} differs from the checkpoint's {s}; leave it out to resume"
                ));
            }
            (Some(s), _) => s,
            (None, given) => given.unwrap_or(42),
        };
        Ok(Settings {
            opt,
            lr: f32_of("lr", args.lr, opt.default_lr())?,
            run: RunConfig {
                model,
                epochs: args.epochs,
                batch: size("batch", args.batch, 2048)?,
                seed,
            },
        })
    }

    /// The settings as saved in a checkpoint.
    fn to_pairs(&self) -> Vec<(String, f64)> {
        let m = &self.run.model;
        [
            ("optimizer", self.opt.code()),
            ("lr", f64::from(self.lr)),
            ("dim", m.dim as f64),
            ("history", m.history as f64),
            ("negatives", m.negatives as f64),
            ("loss", if m.loss == Loss::Softmax { 0.0 } else { 1.0 }),
            ("negative-power", m.negative_power),
            ("recency", f64::from(m.recency)),
            ("user-init-std", f64::from(m.user_init_std)),
            ("max-norm", f64::from(m.max_norm.unwrap_or(0.0))),
            ("batch", self.run.batch as f64),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect()
    }
}

/// Trains one epoch: the training examples in a fresh order drawn from
/// `(seed, epoch)`, batch `b` drawing its negatives from `(seed, epoch, b)`,
/// so a resumed run repeats exactly what an uninterrupted one does.
/// `progress` sees every batch's stats.
///
/// # Errors
/// From the layers (a summed gradient that overflowed, say), and when the
/// loss stops being finite: the learning rate is too high.
pub fn train_epoch<L: Tower>(
    model: &mut Model<L>,
    data: &Dataset,
    owner: &[u32],
    run: &RunConfig,
    epoch: u64,
    mut progress: impl FnMut(BatchStats),
) -> Result<BatchStats, Box<dyn Error>> {
    let mut order: Vec<u32> = (0..data.train_len() as u32).collect();
    Rng::derive(run.seed, &[3, epoch]).shuffle(&mut order);
    let mut total = BatchStats::default();
    for (b, batch) in order.chunks(run.batch.max(1)).enumerate() {
        let mut rng = Rng::derive(run.seed, &[4, epoch, b as u64]);
        let stats = model
            .train_batch(data, owner, batch, &mut rng)
            .map_err(|e| {
                let hint = match e {
                    embtable::Error::NonFinite { .. } => " (training diverged: try a lower --lr)",
                    _ => "",
                };
                format!("epoch {}, step {b}: {e}{hint}", epoch + 1)
            })?;
        if !stats.loss_sum.is_finite() {
            return Err(format!(
                "epoch {}, step {b}: the loss is {} (training diverged: try a lower --lr)",
                epoch + 1,
                stats.loss_sum
            )
            .into());
        }
        total.add(&stats);
        progress(stats);
    }
    Ok(total)
}

/// Recall@10 and NDCG@10 of `model` on the held-out items of `split` of
/// `users`.
pub fn evaluate_model<L: Tower>(
    model: &Model<L>,
    data: &Dataset,
    users: &[usize],
    split: Split,
) -> Metrics {
    let items_t = model.items_transposed();
    metrics::evaluate(
        users,
        data.items,
        K,
        |block, out| model.score_block(data, block, split, &items_t, out),
        |u| data.known(u, split),
        |u| data.held(u, split).into_iter().collect(),
    )
}

/// The most-popular baseline: every user gets the items seen most often
/// before `split`'s held-out items, minus the user's own. All users share
/// one ranking, so each user's top 10 is read off it, skipping the user's
/// items.
pub fn evaluate_popular(data: &Dataset, users: &[usize], split: Split) -> Metrics {
    let counts = data.item_counts(split);
    let mut ranking: Vec<u32> = (0..data.items as u32).collect();
    // Most seen first; equal counts by id, as `top_k` breaks ties.
    ranking.sort_by_key(|&i| (std::cmp::Reverse(counts[i as usize]), i));
    metrics::evaluate_ranking(
        users,
        &ranking,
        K,
        |u| data.known(u, split),
        |u| data.held(u, split).into_iter().collect(),
    )
}

/// A fixed sample of `n` users with a validation item (all of them if `n`
/// is 0 or too large), drawn from `seed`.
fn eval_sample(data: &Dataset, n: usize, seed: u64) -> Vec<usize> {
    let mut users = data.eval_users(Split::Validation);
    if n > 0 && n < users.len() {
        Rng::derive(seed, &[5]).shuffle(&mut users);
        users.truncate(n);
        users.sort_unstable();
    }
    users
}

/// What one epoch did, for the report.
pub struct EpochReport {
    /// The epoch, 1-based.
    pub epoch: u64,
    /// Its training stats.
    pub stats: BatchStats,
    /// Time spent training.
    pub train_time: Duration,
    /// Validation metrics after it.
    pub valid: Metrics,
    /// Time spent on the validation.
    pub eval_time: Duration,
    /// Whether its validation NDCG@10 is the best so far.
    pub improved: bool,
}

/// Where training is: the model, the early-stopping state and the tables of
/// the best validation epoch.
pub struct Fit<L: Tower> {
    /// The model as the last epoch left it.
    pub model: Model<L>,
    /// Epochs trained so far.
    pub epoch: u64,
    /// Early stopping.
    pub stop: EarlyStop,
    /// Item and user tables of `stop.best_epoch`.
    pub best_tables: Option<[L::Snapshot; 2]>,
}

impl<L: Tower> Fit<L> {
    /// Trains epoch after epoch until `run.epochs` or early stopping,
    /// scoring the validation items of `eval_users` after each epoch;
    /// `progress` sees every batch and `after_epoch` every epoch (and may
    /// save a checkpoint).
    ///
    /// # Errors
    /// From [`train_epoch`] and `after_epoch`.
    pub fn run(
        &mut self,
        data: &Dataset,
        run: &RunConfig,
        eval_users: &[usize],
        mut progress: impl FnMut(u64, &BatchStats),
        mut after_epoch: impl FnMut(&Self, &EpochReport) -> Result<(), Box<dyn Error>>,
    ) -> Result<(), Box<dyn Error>> {
        let owner = data.owners();
        while self.epoch < run.epochs && !self.stop.should_stop(self.epoch) {
            let t0 = Instant::now();
            let epoch = self.epoch;
            let stats = train_epoch(&mut self.model, data, &owner, run, epoch, |s| {
                progress(epoch + 1, &s)
            })?;
            let train_time = t0.elapsed();
            self.epoch += 1;
            let t1 = Instant::now();
            let valid = evaluate_model(&self.model, data, eval_users, Split::Validation);
            let improved = self.stop.observe(self.epoch, valid.ndcg);
            if improved {
                self.best_tables = Some([self.model.items.snapshot(), self.model.users.snapshot()]);
            }
            let report = EpochReport {
                epoch: self.epoch,
                stats,
                train_time,
                valid,
                eval_time: t1.elapsed(),
                improved,
            };
            after_epoch(self, &report)?;
        }
        Ok(())
    }

    /// The model to report: with early stopping, the one of the best
    /// validation epoch; else the last.
    pub fn into_final_model(self) -> Model<L> {
        let mut model = self.model;
        if let Some([items, users]) = self.best_tables.filter(|_| self.stop.keeps_best()) {
            model.items.restore(items);
            model.users.restore(users);
        }
        model
    }
}

/// `1234567` → `"1,234,567"`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `a / b` as `"1.93x"`, or `"n/a"` when `b` is zero.
fn times(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "n/a".to_owned()
    }
}

/// `1.23M` style rate.
fn rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2}M", per_s / 1e6)
    } else {
        format!("{:.0}k", per_s / 1e3)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    let started = Instant::now();
    if args.dynamic && (args.save.is_some() || args.resume.is_some()) {
        return Err("--save and --resume are not available with --dynamic".into());
    }
    if args.capacity.is_some() && !args.dynamic {
        return Err("--capacity applies to --dynamic only".into());
    }

    // Settings, from the options or the checkpoint being resumed.
    let resumed = match &args.resume {
        Some(path) => Some(
            checkpoint::load(path)
                .map_err(|e| format!("cannot resume from {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let settings = Settings::resolve(&args, resumed.as_ref())?;
    let seed = settings.run.seed;

    let (data, info) = load_data(&args, seed)?;
    let source = match &args.data {
        Some(p) => p.display().to_string(),
        None => format!("generated (seed {seed})"),
    };
    let eval_users = eval_sample(&data, args.eval_users, seed);
    println!(
        "data: {source}: {}, {}, {}, {} and {} (last two of each user{}) [{:.1}s]",
        plural(thousands(data.users), "user"),
        plural(thousands(data.items), "item"),
        plural(thousands(data.train_len()), "training interaction"),
        plural(
            thousands(data.eval_users(Split::Validation).len()),
            "validation item"
        ),
        plural(thousands(data.eval_users(Split::Test).len()), "test item"),
        if args.data.is_some() && !info.has_time {
            ", drawn at random: no time column"
        } else {
            ", in time order"
        },
        started.elapsed().as_secs_f64()
    );
    if let Some(header) = &info.header {
        println!("  header: {header}");
    }
    if info.below_min_rating > 0 || info.repeats > 0 {
        println!(
            "  dropped {} rated below --min-rating and {}",
            plural(thousands(info.below_min_rating), "interaction"),
            plural(thousands(info.repeats), "repeated (user, item) pair")
        );
    }
    if eval_users.is_empty() {
        return Err("no user has three interactions: nothing to validate on".into());
    }

    let lr = settings.lr;
    let ctx = Context {
        args: &args,
        data: &data,
        eval_users: &eval_users,
        settings: &settings,
        resumed,
        started,
    };
    match settings.opt {
        OptName::Adagrad => ctx.train(|| adagrad(lr)),
        OptName::RowwiseAdagrad => ctx.train(|| rowwise_adagrad(lr)),
        OptName::Rmsprop => ctx.train(|| rmsprop(lr)),
        OptName::Sgd => ctx.train(|| sgd(lr)),
    }
}

/// The file of `--data`, or the generated data set.
fn load_data(args: &Args, seed: u64) -> Result<(Dataset, FileInfo), Box<dyn Error>> {
    let Some(path) = &args.data else {
        if args.min_rating.is_some() || args.columns.is_some() || args.header != Header::Auto {
            return Err("--min-rating, --columns and --header apply to --data only".into());
        }
        let cfg = GenConfig {
            users: args.users,
            items: args.items,
            ..GenConfig::default()
        };
        if cfg.users == 0 || cfg.items <= cfg.max_len {
            return Err(
                format!("--users must be positive and --items above {}", cfg.max_len).into(),
            );
        }
        return Ok((data::generate(&cfg, seed), FileInfo::default()));
    };
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let opts = CsvOptions {
        min_rating: args.min_rating,
        columns: args.columns.clone(),
        header: args.header,
    };
    Ok(csv::read_interactions(BufReader::new(file), &opts, seed)
        .map_err(|e| format!("{}: {e}", path.display()))?)
}

/// Adagrad with PyTorch's accumulator start (0) and ε placement: the
/// first step of a row moves it by about `lr` per lane.
fn adagrad(lr: f32) -> Adagrad {
    Adagrad::new(AdagradConfig {
        lr,
        initial_accumulator_value: 0.0,
        epsilon: 1e-8,
        eps_placement: EpsPlacement::OutsideSqrt,
        ..AdagradConfig::torch()
    })
}

/// FBGEMM's row-wise Adagrad (one accumulator per row).
fn rowwise_adagrad(lr: f32) -> RowWiseAdagrad {
    RowWiseAdagrad::new(RowWiseAdagradConfig {
        lr,
        ..RowWiseAdagradConfig::default()
    })
}

/// RMSprop with Keras' defaults besides the learning rate.
fn rmsprop(lr: f32) -> RmsProp {
    RmsProp::new(RmsPropConfig {
        lr,
        ..RmsPropConfig::default()
    })
}

/// Plain SGD.
fn sgd(lr: f32) -> Sgd {
    Sgd::new(SgdConfig {
        lr,
        ..SgdConfig::default()
    })
}

/// Rebuilds the training state saved in `ckpt`: the model (tables and
/// optimizer states), the epochs done, early stopping with `patience`, and
/// the best epoch's tables.
///
/// # Errors
/// If the checkpoint was trained on other data, or a state does not load.
fn restore<O: SparseOptimizer + Clone + Send + Sync>(
    ckpt: Checkpoint,
    data: &Dataset,
    cfg: ModelConfig,
    patience: u64,
    make: impl Fn() -> O,
) -> Result<Fit<Embedding<O>>, Box<dyn Error>> {
    if ckpt.data_fingerprint != data.fingerprint() {
        return Err("the checkpoint was trained on other data (or another --seed)".into());
    }
    let [items, users] = ckpt.tables;
    let [items_state, users_state] = ckpt.states;
    let (mut items_opt, mut users_opt) = (make(), make());
    items_opt.load_state(items_state)?;
    users_opt.load_state(users_state)?;
    let model = Model::from_parts(data, items, items_opt, users, users_opt, cfg)?;
    let stop = EarlyStop {
        patience,
        best_epoch: ckpt.best_epoch,
        best: ckpt.best_ndcg,
    };
    Ok(Fit {
        model,
        epoch: ckpt.epoch,
        stop,
        best_tables: ckpt.best_tables,
    })
}

/// Everything `train` needs besides the optimizer type.
struct Context<'a> {
    args: &'a Args,
    data: &'a Dataset,
    eval_users: &'a [usize],
    settings: &'a Settings,
    resumed: Option<Checkpoint>,
    started: Instant,
}

impl Context<'_> {
    /// Builds the model (the fixed tables, resumed from a checkpoint if
    /// asked, or `--dynamic` ones) and trains it.
    fn train<O: SparseOptimizer + Clone + Send + Sync>(
        mut self,
        make: impl Fn() -> O,
    ) -> Result<(), Box<dyn Error>> {
        let settings = self.settings;
        let run = &settings.run;
        if self.args.dynamic {
            let capacity = self
                .args
                .capacity
                .map_or(Capacity::Unbounded, Capacity::Rows);
            let model = Model::new_dynamic(self.data, run.model, &make, run.seed, capacity)?;
            let fit = Fit {
                model,
                epoch: 0,
                stop: EarlyStop::new(self.args.patience),
                best_tables: None,
            };
            return self.fit_and_report(fit, |_: &Path, _: &Fit<Hashed<O>>| {
                Err("--save is not available with --dynamic".into())
            });
        }
        let fit = match self.resumed.take() {
            Some(c) => {
                let fit = restore(c, self.data, run.model, self.args.patience, &make)?;
                println!(
                    "resumed from {} after epoch {}",
                    self.args.resume.as_ref().expect("resumed").display(),
                    fit.epoch
                );
                fit
            }
            None => Fit {
                model: Model::new(self.data, run.model, &make, run.seed)?,
                epoch: 0,
                stop: EarlyStop::new(self.args.patience),
                best_tables: None,
            },
        };
        let fingerprint = self.data.fingerprint();
        self.fit_and_report(fit, |path: &Path, fit: &Fit<Embedding<O>>| {
            save(path, fit, settings, fingerprint)
        })
    }

    /// Trains `fit` epoch after epoch with the progress and the reports,
    /// `save` writing the checkpoint of `--save` after each epoch, then
    /// scores the test items.
    fn fit_and_report<L: Tower>(
        self,
        mut fit: Fit<L>,
        save: impl Fn(&Path, &Fit<L>) -> Result<(), Box<dyn Error>>,
    ) -> Result<(), Box<dyn Error>> {
        let Context {
            args,
            data,
            eval_users,
            settings,
            started,
            ..
        } = self;
        let (run, opt, lr) = (&settings.run, settings.opt, settings.lr);

        let popular = evaluate_popular(data, eval_users, Split::Validation);
        println!(
            "model: dim {}, history {}, {} loss with {} shared negatives, optimizer {} (lr {lr}{}), batch {}, {}",
            run.model.dim,
            run.model.history,
            match run.model.loss {
                Loss::Softmax => "softmax",
                Loss::Bpr => "BPR",
            },
            run.model.negatives,
            opt.name(),
            run.model
                .max_norm
                .map_or(String::new(), |m| format!(", max_norm {m}")),
            run.batch,
            plural(rayon::current_num_threads(), "thread")
        );
        if args.dynamic {
            println!(
                "tables: dynamic, keyed by 64-bit hashes of the ids, no vocabulary{}",
                args.capacity.map_or(String::new(), |c| format!(
                    ", at most {} each (LRU)",
                    plural(thousands(c), "id")
                ))
            );
        }
        println!(
            "most-popular on the validation items of {}: recall@{K} {:.4}  NDCG@{K} {:.4}",
            plural(thousands(popular.users), "user"),
            popular.recall,
            popular.ndcg
        );
        println!(
            "training up to {}{}",
            plural(run.epochs, "epoch"),
            if fit.stop.keeps_best() {
                format!(
                    ", stopping once validation NDCG@{K} has not improved for {} (*: best so far)",
                    plural(fit.stop.patience, "epoch")
                )
            } else {
                String::new()
            }
        );

        let style = ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {percent:>3}% {msg} ({elapsed}<{eta})",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let mut train_time = Duration::ZERO;
        let mut trained = 0usize;
        let mut phases = Phases::default();
        // The epoch's bar, its start, loss sum and examples, shared by the
        // two callbacks.
        let bar: RefCell<Option<(ProgressBar, Instant, f64, usize)>> = RefCell::new(None);
        fit.run(
            data,
            run,
            eval_users,
            |epoch, s| {
                let mut bar = bar.borrow_mut();
                let (bar, t0, loss, seen) = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(data.train_len() as u64)
                        .with_style(style.clone())
                        .with_prefix(format!("{epoch}/{}", run.epochs));
                    (b, Instant::now(), 0.0, 0)
                });
                *loss += s.loss_sum;
                *seen += s.examples;
                bar.inc(s.examples as u64);
                bar.set_message(format!(
                    "loss {:.4}  {} ex/s",
                    *loss / *seen as f64,
                    rate(*seen as f64 / t0.elapsed().as_secs_f64())
                ));
            },
            |fit, r| {
                if let Some((b, ..)) = bar.borrow_mut().take() {
                    b.finish_and_clear();
                }
                train_time += r.train_time;
                trained += r.stats.examples;
                phases.add(&r.stats.time);
                let dt = r.train_time.as_secs_f64();
                println!(
                    "epoch {:>2}/{}  loss {:.4}  {:>6} ex/s  {dt:.1}s | validation recall@{K} {:.4}  NDCG@{K} {:.4}  ({} / {} most-popular) [eval {:.1}s]{}",
                    r.epoch,
                    run.epochs,
                    r.stats.loss_sum / r.stats.examples.max(1) as f64,
                    rate(r.stats.examples as f64 / dt),
                    r.valid.recall,
                    r.valid.ndcg,
                    times(r.valid.recall, popular.recall),
                    times(r.valid.ndcg, popular.ndcg),
                    r.eval_time.as_secs_f64(),
                    if r.improved { " *" } else { "" },
                );
                if let Some(path) = &args.save {
                    save(path, fit)?;
                }
                Ok(())
            },
        )?;

        let (epochs, stop) = (fit.epoch, fit.stop);
        if stop.should_stop(epochs) {
            println!(
                "stopped after epoch {epochs}: validation NDCG@{K} has not improved for {}; keeping epoch {} ({:.4})",
                plural(stop.patience, "epoch"),
                stop.best_epoch,
                stop.best
            );
        } else if stop.keeps_best() && stop.best_epoch > 0 {
            println!(
                "trained {}; keeping epoch {}, the best on validation NDCG@{K} ({:.4})",
                plural(epochs, "epoch"),
                stop.best_epoch,
                stop.best
            );
        }
        let model = fit.into_final_model();
        for (name, tower) in [("items", &model.items), ("users", &model.users)] {
            if let Some(summary) = tower.summary() {
                println!("{name} table: {summary}");
            }
        }

        // The test items of every user, scored once.
        let test_users = data.eval_users(Split::Test);
        let m = evaluate_model(&model, data, &test_users, Split::Test);
        let popular = evaluate_popular(data, &test_users, Split::Test);
        println!(
            "done in {:.1}s: {} trained in {:.1}s ({} ex/s)",
            started.elapsed().as_secs_f64(),
            plural(thousands(trained), "example"),
            train_time.as_secs_f64(),
            rate(trained as f64 / train_time.as_secs_f64().max(1e-9)),
        );
        println!(
            "test items of {}: recall@{K} {:.4} vs {:.4} most-popular ({}), NDCG@{K} {:.4} vs {:.4} ({})",
            plural(thousands(m.users), "user"),
            m.recall,
            popular.recall,
            times(m.recall, popular.recall),
            m.ndcg,
            popular.ndcg,
            times(m.ndcg, popular.ndcg),
        );
        let share = |d: Duration| 100.0 * d.as_secs_f64() / phases.total().as_secs_f64().max(1e-9);
        println!(
            "training time: embtable {:.0}% (lookups {:.0}%, sparse backward {:.0}%, optimizer steps {:.0}%), dense maths {:.0}%, batch assembly {:.0}%",
            share(phases.forward + phases.backward + phases.step),
            share(phases.forward),
            share(phases.backward),
            share(phases.step),
            share(phases.dense),
            share(phases.batch),
        );
        if let Some(path) = &args.save {
            println!("checkpoint: {}", path.display());
        }
        Ok(())
    }
}

/// `1 epoch`, `3 epochs`, `1,024 users`: `n` (a number, or one formatted
/// by [`thousands`]) and `what`, plural unless `n` is 1.
fn plural(n: impl std::fmt::Display, what: &str) -> String {
    let n = n.to_string();
    if n == "1" {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Writes a checkpoint of `fit` (see [`checkpoint`]).
fn save<O: SparseOptimizer + Clone + Send + Sync>(
    path: &Path,
    fit: &Fit<Embedding<O>>,
    settings: &Settings,
    data_fingerprint: u64,
) -> Result<(), Box<dyn Error>> {
    let at = checkpoint::Position {
        epoch: fit.epoch,
        data_fingerprint,
        seed: settings.run.seed,
        settings: &settings.to_pairs(),
        best: (fit.stop.best_epoch, fit.stop.best),
        best_tables: fit.best_tables.as_ref().map(|[i, u]| [i, u]),
    };
    checkpoint::save(path, &fit.model.items, &fit.model.users, &at)
        .map_err(|e| format!("cannot save {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_run() -> (Dataset, RunConfig) {
        let data = data::generate(&GenConfig::tiny(), 11);
        let run = RunConfig {
            model: ModelConfig {
                dim: 16,
                negatives: 64,
                ..ModelConfig::default()
            },
            epochs: 4,
            batch: 256,
            seed: 11,
        };
        (data, run)
    }

    /// A fit of `epochs` epochs at most on the tiny data.
    fn fit<O: SparseOptimizer + Clone + Send + Sync>(
        data: &Dataset,
        run: &RunConfig,
        patience: u64,
        make: impl Fn() -> O,
    ) -> Fit<Embedding<O>> {
        Fit {
            model: Model::new(data, run.model, make, run.seed).unwrap(),
            epoch: 0,
            stop: EarlyStop::new(patience),
            best_tables: None,
        }
    }

    /// The smoke test of the demo: a few epochs on a tiny data set lower
    /// the loss and rank the test items far above random and above the
    /// most-popular baseline.
    #[test]
    fn tiny_recommender_learns() {
        let (data, run) = tiny_run();
        let owner = data.owners();
        let users = data.eval_users(Split::Test);
        let mut model = Model::new(&data, run.model, || adagrad(0.1), run.seed).unwrap();
        let mut losses = Vec::new();
        for epoch in 0..run.epochs {
            let s = train_epoch(&mut model, &data, &owner, &run, epoch, |_| {}).unwrap();
            losses.push(s.loss_sum / s.examples as f64);
        }
        assert!(losses[3] < 0.9 * losses[0], "{losses:?}");
        let m = evaluate_model(&model, &data, &users, Split::Test);
        let random = K as f64 / data.items as f64;
        let popular = evaluate_popular(&data, &users, Split::Test);
        assert!(m.recall > 5.0 * random, "{m:?} vs random {random}");
        assert!(m.recall > popular.recall, "{m:?} vs {popular:?}");
        assert!(m.ndcg > 0.0 && m.ndcg <= m.recall);
    }

    /// `--dynamic`: tables keyed by hashed ids, sized by nothing, learn as
    /// well as the fixed ones (the same data, settings and seed; only the
    /// rows' initial draws differ, being drawn from the hashes), and hold
    /// a row per id met; with a capacity they hold no more.
    #[test]
    fn dynamic_tables_learn_like_fixed_ones() {
        let (data, run) = tiny_run();
        let users = data.eval_users(Split::Test);
        fn train<L: Tower>(model: &mut Model<L>, data: &Dataset, run: &RunConfig) {
            let owner = data.owners();
            for epoch in 0..run.epochs {
                train_epoch(model, data, &owner, run, epoch, |_| {}).unwrap();
            }
        }
        let mut fixed = Model::new(&data, run.model, || adagrad(0.1), run.seed).unwrap();
        train(&mut fixed, &data, &run);
        let fixed = evaluate_model(&fixed, &data, &users, Split::Test);
        let unbounded = Capacity::Unbounded;
        let mut dynamic =
            Model::new_dynamic(&data, run.model, || adagrad(0.1), run.seed, unbounded).unwrap();
        train(&mut dynamic, &data, &run);
        let m = evaluate_model(&dynamic, &data, &users, Split::Test);
        let popular = evaluate_popular(&data, &users, Split::Test);
        assert!(m.recall > popular.recall, "{m:?} vs {popular:?}");
        assert!(
            (0.8..1.25).contains(&(m.recall / fixed.recall)),
            "dynamic {m:?} vs fixed {fixed:?}"
        );
        // Items get a row as positives, history or sampled negatives.
        let seen: std::collections::HashSet<u32> = data.train_items.iter().copied().collect();
        assert!((seen.len()..=data.items).contains(&dynamic.items.table().len()));
        let cap = Capacity::Rows(100);
        let mut small =
            Model::new_dynamic(&data, run.model, || adagrad(0.1), run.seed, cap).unwrap();
        train(&mut small, &data, &run);
        assert_eq!(small.items.table().len(), 100);
        assert!(small.items.table().stats().evicted > 0);
    }

    /// Early stopping ends training `patience` epochs after the best
    /// validation epoch, each epoch reports the validation metrics of the
    /// model it left, and the final model has the tables of the best epoch,
    /// bit for bit those of a run that trains that many epochs.
    #[test]
    fn early_stopping_keeps_the_best_epoch() {
        let (data, mut run) = tiny_run();
        run.epochs = 60;
        let make = || adagrad(0.3);
        let users = data.eval_users(Split::Validation);
        let mut fit = fit(&data, &run, 2, make);
        let mut scores = Vec::new();
        fit.run(
            &data,
            &run,
            &users,
            |_, _| {},
            |fit, r| {
                let again = evaluate_model(&fit.model, &data, &users, Split::Validation);
                assert_eq!(r.valid, again, "epoch {}", r.epoch);
                scores.push(r.valid.ndcg);
                Ok(())
            },
        )
        .unwrap();
        let (epochs, stop) = (fit.epoch, fit.stop);
        assert!(epochs < run.epochs, "ran all {epochs} epochs: {scores:?}");
        assert_eq!(epochs, stop.best_epoch + 2, "{scores:?}");
        let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(scores[stop.best_epoch as usize - 1], best);
        assert!(
            scores[..stop.best_epoch as usize - 1]
                .iter()
                .all(|&s| s < best)
        );

        let kept = fit.into_final_model();
        let mut again = Model::new(&data, run.model, make, run.seed).unwrap();
        let owner = data.owners();
        for epoch in 0..stop.best_epoch {
            train_epoch(&mut again, &data, &owner, &run, epoch, |_| {}).unwrap();
        }
        assert_eq!(kept.items.table(), again.items.table());
        assert_eq!(kept.users.table(), again.users.table());

        // --patience 0: every epoch, the last tables.
        run.epochs = 3;
        let mut all = fit_with_patience_zero(&data, &run, make);
        assert_eq!(all.epoch, 3);
        let last = all.model.items.table().clone();
        all.stop.best_epoch = 1; // whatever was best, the last is kept
        assert_eq!(all.into_final_model().items.table(), &last);
    }

    fn fit_with_patience_zero<O: SparseOptimizer + Clone + Send + Sync>(
        data: &Dataset,
        run: &RunConfig,
        make: impl Fn() -> O,
    ) -> Fit<Embedding<O>> {
        let users = data.eval_users(Split::Validation);
        let mut f = fit(data, run, 0, make);
        f.run(data, run, &users, |_, _| {}, |_, _| Ok(())).unwrap();
        f
    }

    /// Training three epochs, saving after the first, loading and training
    /// on gives the tables, optimizer states, early-stopping state and best
    /// tables of the uninterrupted run, bit for bit.
    #[test]
    fn resume_equals_uninterrupted_training() {
        let (data, mut run) = tiny_run();
        run.epochs = 3;
        let make = || rmsprop(0.003);
        let users = data.eval_users(Split::Validation);
        let mut straight = fit(&data, &run, 5, make);
        straight
            .run(&data, &run, &users, |_, _| {}, |_, _| Ok(()))
            .unwrap();

        let path = std::env::temp_dir().join(format!("embtable-rec-{}.ckpt", std::process::id()));
        let settings = Settings {
            opt: OptName::Rmsprop,
            lr: 0.003,
            run: run.clone(),
        };
        let mut one = run.clone();
        one.epochs = 1;
        let mut first = fit(&data, &one, 5, make);
        first
            .run(&data, &one, &users, |_, _| {}, |_, _| Ok(()))
            .unwrap();
        save(&path, &first, &settings, data.fingerprint()).unwrap();
        let ckpt = checkpoint::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(
            (ckpt.seed, ckpt.settings.clone(), ckpt.best_epoch),
            (run.seed, settings.to_pairs(), 1)
        );

        // The settings come back from the checkpoint; contradicting them is refused.
        let args = Args::parse_from(["recommender", "--epochs", "3"]);
        let back = Settings::resolve(&args, Some(&ckpt)).unwrap();
        assert_eq!(
            (back.opt, back.lr, back.run.batch),
            (OptName::Rmsprop, 0.003, 256)
        );
        assert_eq!(back.run.model, run.model);
        let args = Args::parse_from(["recommender", "--dim", "8"]);
        let e = Settings::resolve(&args, Some(&ckpt)).unwrap_err();
        assert!(
            e.contains("--dim 8 differs from the checkpoint's 16"),
            "{e}"
        );
        let mut resumed = restore(ckpt, &data, run.model, 5, make).unwrap();
        assert_eq!(resumed.epoch, 1);
        resumed
            .run(&data, &run, &users, |_, _| {}, |_, _| Ok(()))
            .unwrap();

        assert_eq!(resumed.epoch, 3);
        assert_eq!(resumed.stop, straight.stop);
        assert_eq!(resumed.best_tables, straight.best_tables);
        assert_eq!(resumed.model.items.table(), straight.model.items.table());
        assert_eq!(resumed.model.users.table(), straight.model.users.table());
        assert_eq!(
            resumed.model.items.optimizer().state(),
            straight.model.items.optimizer().state()
        );

        // A checkpoint whose best epoch is an earlier one carries its tables.
        let mut later = straight;
        later.stop.best_epoch = 2;
        let best = [
            first.model.items.table().clone(),
            first.model.users.table().clone(),
        ];
        later.best_tables = Some(best.clone());
        save(&path, &later, &settings, data.fingerprint()).unwrap();
        let ckpt = checkpoint::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!((ckpt.epoch, ckpt.best_epoch), (3, 2));
        assert_eq!(ckpt.best_tables, Some(best));

        // Other data is refused.
        let other = data::generate(&GenConfig::tiny(), 12);
        save(&path, &first, &settings, data.fingerprint()).unwrap();
        let ckpt = checkpoint::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert!(restore(ckpt, &other, run.model, 5, make).is_err());
    }

    /// Training gives the same tables bit for bit on any thread count.
    #[test]
    fn training_does_not_depend_on_threads() {
        let (data, mut run) = tiny_run();
        run.batch = 4096; // large enough for embtable's parallel paths
        run.model.dim = 32;
        let owner = data.owners();
        let train = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let mut m = Model::new(&data, run.model, || adagrad(0.1), run.seed).unwrap();
                    train_epoch(&mut m, &data, &owner, &run, 0, |_| {}).unwrap();
                    (m.items.table().clone(), m.users.table().clone())
                })
        };
        assert!(train(1) == train(3));
    }

    #[test]
    fn checkpoint_rejects_garbage() {
        let path =
            std::env::temp_dir().join(format!("embtable-rec-bad-{}.ckpt", std::process::id()));
        std::fs::write(&path, b"\x02\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
        assert!(checkpoint::load(&path).is_err());
        std::fs::write(&path, b"not a checkpoint").unwrap();
        let e = checkpoint::load(&path).unwrap_err();
        assert!(e.to_string().contains("safetensors"), "{e}");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn settings_defaults_per_optimizer() {
        let args = Args::parse_from(["recommender"]);
        assert_eq!(
            (args.epochs, args.patience, args.header),
            (50, 5, Header::Auto)
        );
        let s = Settings::resolve(&args, None).unwrap();
        assert_eq!(
            (s.opt, s.lr, s.run.model.max_norm),
            (OptName::Adagrad, 0.1, None)
        );
        assert_eq!((s.run.model.dim, s.run.batch, s.run.seed), (32, 2048, 42));
        let args = Args::parse_from(["recommender", "--optimizer", "sgd"]);
        let s = Settings::resolve(&args, None).unwrap();
        assert_eq!((s.lr, s.run.model.max_norm), (0.02, Some(3.0)));
        let args = Args::parse_from(["recommender", "--optimizer", "sgd", "--max-norm", "0"]);
        assert_eq!(
            Settings::resolve(&args, None).unwrap().run.model.max_norm,
            None
        );
        let args = Args::parse_from(["recommender", "--dim", "0"]);
        assert!(Settings::resolve(&args, None).is_err());
    }

    #[test]
    fn number_formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(668_593), "668,593");
        assert_eq!(thousands(12_345_678), "12,345,678");
        assert_eq!(rate(1_234_567.0), "1.23M");
        assert_eq!(rate(456_789.0), "457k");
        assert_eq!(times(0.3, 0.2), "1.50x");
        assert_eq!(times(0.3, 0.0), "n/a");
        assert_eq!(plural(1, "epoch"), "1 epoch");
        assert_eq!(plural(5, "epoch"), "5 epochs");
        assert_eq!(plural(thousands(1_024), "user"), "1,024 users");
        assert_eq!(plural(thousands(1), "test item"), "1 test item");
    }

    /// `--help` gives every option with what it does, the file formats and
    /// the split; --columns, --header and --min-rating need --data.
    #[test]
    fn help_documents_every_option_the_formats_and_the_split() {
        use clap::CommandFactory;
        let mut cmd = Args::command();
        let help = cmd.render_long_help().to_string();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            assert!(help.contains(&format!("--{long}")), "--help lacks --{long}");
            assert!(
                arg.get_help().is_some_and(|h| h.to_string().len() > 20),
                "--{long} has no description"
            );
        }
        for needle in [
            "ratings.csv",
            "u.data",
            "ratings.dat",
            "Amazon",
            "ISO 8601",
            "2019-03-01T12:34:56Z",
            "Header:",
            "--header yes",
            "Split:",
            "the test item",
            "validation item",
            "--patience",
            "keeping the tables of the best epoch",
        ] {
            assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
        }
        for extra in [
            ["--columns", "item,user"],
            ["--header", "yes"],
            ["--min-rating", "4"],
        ] {
            let args = Args::parse_from(["recommender", extra[0], extra[1]]);
            let e = load_data(&args, 1).unwrap_err().to_string();
            assert!(e.contains("apply to --data only"), "{e}");
        }
        assert!(Args::try_parse_from(["recommender", "--columns", "user,user"]).is_err());
    }

    /// The generated data written as a file of string ids and ISO dates,
    /// lines shuffled, reads back as the same split; and the demo runs on
    /// it end to end.
    #[test]
    fn demo_reads_string_ids_and_iso_dates_from_a_file() {
        let data = data::generate(&GenConfig::tiny(), 3);
        let mut lines = vec!["user_id,product,stars,when".to_owned()];
        for u in 0..data.users {
            let mut items: Vec<u32> = data.known(u, Split::Test).into_owned();
            items.extend(data.test[u]);
            for (t, i) in items.iter().enumerate() {
                // One interaction a day from 2020-01-01, at 09:00 local, UTC+2.
                let day = 1 + t % 28;
                let month = 1 + t / 28;
                lines.push(format!(
                    "U{u:05}X,\"B{i:07}\",4.0,2020-{month:02}-{day:02}T09:00:00+02:00"
                ));
            }
        }
        Rng::new(5).shuffle(&mut lines[1..]);
        let path = std::env::temp_dir().join(format!("embtable-rec-{}.csv", std::process::id()));
        std::fs::write(&path, lines.join("\n")).unwrap();
        let args = Args::parse_from([
            "recommender".as_ref(),
            "--data".as_ref(),
            path.as_os_str(),
            "--epochs".as_ref(),
            "1".as_ref(),
            "--dim".as_ref(),
            "8".as_ref(),
        ]);
        let (back, info) = load_data(&args, 1).unwrap();
        assert_eq!(info.header.as_deref(), Some("user_id,product,stars,when"));
        assert!(info.has_time);
        assert_eq!((back.users, back.items), (data.users, data.items));
        let name = |d: &Dataset, u: usize| -> Vec<String> {
            let mut items: Vec<u32> = d.known(u, Split::Test).into_owned();
            items.extend(d.test[u]);
            items
                .iter()
                .map(|&i| d.item_ids[i as usize].clone())
                .collect()
        };
        for b in 0..back.users {
            let u: usize = back.user_ids[b][1..6].parse().unwrap();
            let want: Vec<String> = name(&data, u)
                .iter()
                .map(|i| format!("B{:07}", i.parse::<u32>().unwrap()))
                .collect();
            assert_eq!(name(&back, b), want, "user {}", back.user_ids[b]);
            assert_eq!(back.valid[b].is_some(), data.valid[u].is_some());
        }
        run(args).unwrap();
        std::fs::remove_file(&path).ok();
    }
}
