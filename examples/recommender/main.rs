//! The main demo: a two-tower recommender trained with embtable.
//!
//! ```sh
//! cargo run --release --example recommender
//! cargo run --release --example recommender -- --optimizer rmsprop --epochs 5
//! cargo run --release --example recommender -- --data ml-latest-small/ratings.csv
//! ```
//!
//! By default it generates 20,000 users and 50,000 items with Zipf
//! popularity and hidden topics (`data.rs`), trains a model whose only
//! parameters are two embedding tables (`model.rs`: the user vector is the
//! mean of the user's recent items plus a user-id embedding, the item
//! vector a row of the same item table, a sampled softmax over negatives
//! shared by the batch, or BPR), and after each epoch reports recall@10 and
//! NDCG@10 on the users' held-out interactions beside a most-popular
//! baseline (`metrics.rs`). The dense maths of a step is a few matrix
//! products (`dense.rs`); `--save`/`--resume` use `checkpoint.rs`.
//!
//! Run with `--help` for the options.

mod checkpoint;
mod data;
mod dense;
mod metrics;
mod model;
mod rng;

use std::error::Error;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use embtable::{
    Adagrad, AdagradConfig, EpsPlacement, RmsProp, RmsPropConfig, RowWiseAdagrad,
    RowWiseAdagradConfig, Sgd, SgdConfig, SparseOptimizer,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::Checkpoint;
use crate::data::{CsvOptions, Dataset, GenConfig};
use crate::metrics::Metrics;
use crate::model::{BatchStats, Loss, Model, ModelConfig, Phases};
use crate::rng::Rng;

/// Ranking cut-off of the reported metrics.
const K: usize = 10;

/// Command-line options. Those that shape training are saved in
/// checkpoints: on `--resume` they come from the checkpoint, and giving a
/// different value is an error.
#[derive(Parser, Debug)]
#[command(
    about = "Train a two-tower recommender whose only parameters are embtable embedding tables",
    long_about = None
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
    /// Passes over the training interactions (in all, resumed ones included).
    #[arg(long, default_value_t = 6)]
    epochs: u64,
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
    /// Interactions CSV `user,item[,rating[,timestamp]]` (MovieLens
    /// `ratings.csv`) instead of the generated data.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// With --data: keep interactions rated at least this.
    #[arg(long)]
    min_rating: Option<f32>,
    /// Users of the generated data set.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Items of the generated data set.
    #[arg(long, default_value_t = 50_000)]
    items: usize,
    /// Users evaluated after each epoch (a fixed random sample; 0: all).
    #[arg(long, default_value_t = 5_000)]
    eval_users: usize,
    /// Write a checkpoint here after every epoch.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
    /// Continue from this checkpoint: its tables, optimizer states and
    /// settings, on the same data, up to --epochs.
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
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
pub fn train_epoch<O: SparseOptimizer + Send>(
    model: &mut Model<O>,
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

/// Recall@10 and NDCG@10 of `model` on the held-out items of `users`.
pub fn evaluate_model<O: SparseOptimizer + Send + Sync>(
    model: &Model<O>,
    data: &Dataset,
    users: &[usize],
) -> Metrics {
    let items_t = model.items_transposed();
    metrics::evaluate(
        users,
        data.items,
        K,
        |block, out| model.score_block(data, block, &items_t, out),
        |u| data.history(u),
        |u| data.test[u].into_iter().collect(),
    )
}

/// The most-popular baseline: every user gets the items seen most often in
/// training, minus its own training items. All users share one ranking, so
/// each user's top 10 is read off it, skipping the user's items.
pub fn evaluate_popular(data: &Dataset, users: &[usize]) -> Metrics {
    let counts = data.item_counts();
    let mut ranking: Vec<u32> = (0..data.items as u32).collect();
    // Most seen first; equal counts by id, as `top_k` breaks ties.
    ranking.sort_by_key(|&i| (std::cmp::Reverse(counts[i as usize]), i));
    metrics::evaluate_ranking(
        users,
        &ranking,
        K,
        |u| data.history(u),
        |u| data.test[u].into_iter().collect(),
    )
}

/// A fixed sample of `n` users with a held-out item (all of them if `n` is
/// 0 or too large), drawn from `seed`.
fn eval_sample(data: &Dataset, n: usize, seed: u64) -> Vec<usize> {
    let mut users = data.test_users();
    if n > 0 && n < users.len() {
        Rng::derive(seed, &[5]).shuffle(&mut users);
        users.truncate(n);
        users.sort_unstable();
    }
    users
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

    // Data.
    let data = match &args.data {
        Some(path) => {
            let file =
                File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let opts = CsvOptions {
                min_rating: args.min_rating,
            };
            data::read_interactions(BufReader::new(file), opts, seed)
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => {
            if args.min_rating.is_some() {
                return Err("--min-rating applies to --data only".into());
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
            data::generate(&cfg, seed)
        }
    };
    let source = match &args.data {
        Some(p) => p.display().to_string(),
        None => format!("generated (seed {seed})"),
    };
    let eval_users = eval_sample(&data, args.eval_users, seed);
    println!(
        "data: {source}: {} users, {} items, {} training interactions, {} held out ({} evaluated) [{:.1}s]",
        thousands(data.users),
        thousands(data.items),
        thousands(data.train_len()),
        thousands(data.test_users().len()),
        thousands(eval_users.len()),
        started.elapsed().as_secs_f64()
    );
    if eval_users.is_empty() {
        return Err("no user has two interactions: nothing to hold out".into());
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

/// Rebuilds the model saved in `ckpt` (tables and optimizer states) and
/// returns it with the number of epochs it had trained.
///
/// # Errors
/// If the checkpoint was trained on other data, or a state does not load.
fn restore<O: SparseOptimizer + Send>(
    ckpt: Checkpoint,
    data: &Dataset,
    cfg: ModelConfig,
    make: impl Fn() -> O,
) -> Result<(Model<O>, u64), Box<dyn Error>> {
    if ckpt.data_fingerprint != data.fingerprint() {
        return Err("the checkpoint was trained on other data (or another --seed)".into());
    }
    let [items, users] = ckpt.tables;
    let [items_state, users_state] = ckpt.states;
    let (mut items_opt, mut users_opt) = (make(), make());
    items_opt.load_state(items_state)?;
    users_opt.load_state(users_state)?;
    let model = Model::from_parts(data, items, items_opt, users, users_opt, cfg)?;
    Ok((model, ckpt.epoch))
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
    fn train<O: SparseOptimizer + Send + Sync>(
        self,
        make: impl Fn() -> O,
    ) -> Result<(), Box<dyn Error>> {
        let Context {
            args,
            data,
            eval_users,
            settings,
            resumed,
            started,
        } = self;
        let (run, opt, lr) = (&settings.run, settings.opt, settings.lr);
        let fingerprint = data.fingerprint();
        let (mut model, first_epoch) = match resumed {
            Some(c) => {
                let (model, epoch) = restore(c, data, run.model, &make)?;
                println!(
                    "resumed from {} after epoch {epoch}",
                    args.resume.as_ref().expect("resumed").display(),
                );
                (model, epoch)
            }
            None => (Model::new(data, run.model, &make, run.seed)?, 0),
        };
        let owner = data.owners();

        let popular = evaluate_popular(data, eval_users);
        println!(
            "model: dim {}, history {}, {} loss with {} shared negatives, optimizer {} (lr {lr}{}), batch {}, {} threads",
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
            rayon::current_num_threads()
        );
        println!(
            "most-popular baseline on the {} evaluated users: recall@{K} {:.4}  NDCG@{K} {:.4}",
            thousands(popular.users),
            popular.recall,
            popular.ndcg
        );

        let style = ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {percent:>3}% {msg} ({elapsed}<{eta})",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let mut train_time = Duration::ZERO;
        let mut trained = 0usize;
        let mut phases = Phases::default();
        let mut last = None;
        for epoch in first_epoch..run.epochs {
            let bar = ProgressBar::new(data.train_len() as u64)
                .with_style(style.clone())
                .with_prefix(format!("{}/{}", epoch + 1, run.epochs));
            let t0 = Instant::now();
            let (mut loss, mut seen) = (0.0, 0usize);
            let result = train_epoch(&mut model, data, &owner, run, epoch, |s| {
                loss += s.loss_sum;
                seen += s.examples;
                bar.inc(s.examples as u64);
                bar.set_message(format!(
                    "loss {:.4}  {} ex/s",
                    loss / seen as f64,
                    rate(seen as f64 / t0.elapsed().as_secs_f64())
                ));
            });
            let dt = t0.elapsed();
            bar.finish_and_clear();
            let stats = result?;
            train_time += dt;
            trained += stats.examples;
            phases.add(&stats.time);
            let t1 = Instant::now();
            let m = evaluate_model(&model, data, eval_users);
            println!(
                "epoch {:>2}/{}  loss {:.4}  {:>6} ex/s  {:.1}s | recall@{K} {:.4}  NDCG@{K} {:.4}  ({} / {} most-popular) [eval {:.1}s]",
                epoch + 1,
                run.epochs,
                stats.loss_sum / stats.examples.max(1) as f64,
                rate(stats.examples as f64 / dt.as_secs_f64()),
                dt.as_secs_f64(),
                m.recall,
                m.ndcg,
                times(m.recall, popular.recall),
                times(m.ndcg, popular.ndcg),
                t1.elapsed().as_secs_f64(),
            );
            last = Some(m);
            if let Some(path) = &args.save {
                save(path, &model, settings, epoch + 1, fingerprint)?;
            }
        }
        // The final numbers on every user with a held-out item.
        let all_users = data.test_users();
        let (m, popular) = if all_users.len() > eval_users.len() {
            (
                evaluate_model(&model, data, &all_users),
                evaluate_popular(data, &all_users),
            )
        } else {
            let m = last.unwrap_or_else(|| evaluate_model(&model, data, eval_users));
            (m, popular)
        };
        println!(
            "done in {:.1}s: {} examples trained in {:.1}s ({} ex/s)",
            started.elapsed().as_secs_f64(),
            thousands(trained),
            train_time.as_secs_f64(),
            rate(trained as f64 / train_time.as_secs_f64().max(1e-9)),
        );
        println!(
            "held-out items of all {} users: recall@{K} {:.4} vs {:.4} most-popular ({}), NDCG@{K} {:.4} vs {:.4} ({})",
            thousands(m.users),
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

/// Writes a checkpoint (see [`checkpoint`]).
fn save<O: SparseOptimizer>(
    path: &Path,
    model: &Model<O>,
    settings: &Settings,
    epoch: u64,
    data_fingerprint: u64,
) -> Result<(), Box<dyn Error>> {
    let at = checkpoint::Position {
        epoch,
        data_fingerprint,
        seed: settings.run.seed,
        settings: &settings.to_pairs(),
    };
    checkpoint::save(path, &model.items, &model.users, &at)
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

    /// The smoke test of the demo: a few epochs on a tiny data set lower
    /// the loss and rank held-out items far above random and above the
    /// most-popular baseline.
    #[test]
    fn tiny_recommender_learns() {
        let (data, run) = tiny_run();
        let owner = data.owners();
        let users = data.test_users();
        let mut model = Model::new(&data, run.model, || adagrad(0.1), run.seed).unwrap();
        let mut losses = Vec::new();
        for epoch in 0..run.epochs {
            let s = train_epoch(&mut model, &data, &owner, &run, epoch, |_| {}).unwrap();
            losses.push(s.loss_sum / s.examples as f64);
        }
        assert!(losses[3] < 0.9 * losses[0], "{losses:?}");
        let m = evaluate_model(&model, &data, &users);
        let random = K as f64 / data.items as f64;
        let popular = evaluate_popular(&data, &users);
        assert!(m.recall > 5.0 * random, "{m:?} vs random {random}");
        assert!(m.recall > popular.recall, "{m:?} vs {popular:?}");
        assert!(m.ndcg > 0.0 && m.ndcg <= m.recall);
    }

    /// Training one epoch, saving, loading and training another gives the
    /// tables of two uninterrupted epochs, bit for bit.
    #[test]
    fn resume_equals_uninterrupted_training() {
        let (data, run) = tiny_run();
        let owner = data.owners();
        let make = || rmsprop(0.003);
        let mut straight = Model::new(&data, run.model, make, run.seed).unwrap();
        for epoch in 0..2 {
            train_epoch(&mut straight, &data, &owner, &run, epoch, |_| {}).unwrap();
        }

        let mut first = Model::new(&data, run.model, make, run.seed).unwrap();
        train_epoch(&mut first, &data, &owner, &run, 0, |_| {}).unwrap();
        let path = std::env::temp_dir().join(format!("embtable-rec-{}.ckpt", std::process::id()));
        let settings = Settings {
            opt: OptName::Rmsprop,
            lr: 0.003,
            run: run.clone(),
        };
        save(&path, &first, &settings, 1, data.fingerprint()).unwrap();
        let ckpt = checkpoint::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(
            (ckpt.seed, ckpt.settings.clone()),
            (run.seed, settings.to_pairs())
        );

        // The settings come back from the checkpoint; contradicting them is refused.
        let args = Args::parse_from(["recommender", "--epochs", "2"]);
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
        let (mut resumed, epoch) = restore(ckpt, &data, run.model, make).unwrap();
        assert_eq!(epoch, 1);
        train_epoch(&mut resumed, &data, &owner, &run, 1, |_| {}).unwrap();

        assert_eq!(resumed.items.table(), straight.items.table());
        assert_eq!(resumed.users.table(), straight.users.table());
        assert_eq!(
            resumed.items.optimizer().state(),
            straight.items.optimizer().state()
        );

        // Other data is refused.
        let other = data::generate(&GenConfig::tiny(), 12);
        save(&path, &first, &settings, 1, data.fingerprint()).unwrap();
        let ckpt = checkpoint::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert!(restore(ckpt, &other, run.model, make).is_err());
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
        let s = Settings::resolve(&Args::parse_from(["recommender"]), None).unwrap();
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
    }
}
