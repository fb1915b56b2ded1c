//! word2vec (skip-gram with negative sampling) on embtable: two embedding
//! tables, sparse updates, batches of sentences in parallel.
//!
//! ```sh
//! cargo run --release --example word2vec
//! cargo run --release --example word2vec -- --corpus text8 --min-count 5 --epochs 1
//! ```
//!
//! By default it trains on a generated corpus with planted word clusters
//! (`corpus.rs`) and reports how many of each word's nearest neighbours come
//! from its own cluster. The vectors are written in word2vec text format,
//! which gensim reads with `KeyedVectors.load_word2vec_format(path)`.
//!
//! Run with `--help` for the options.

mod corpus;
#[path = "../recommender/rng.rs"]
mod rng;
mod sgns;

use std::error::Error;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use embtable::io::{self, Word2VecFormat};
use embtable::{Adagrad, AdagradConfig, EpsPlacement};
use indicatif::{ProgressBar, ProgressStyle};

use crate::corpus::{Corpus, CorpusConfig};
use crate::rng::Rng;
use crate::sgns::{Sgns, SgnsConfig, StepStats};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "Train skip-gram word vectors with embtable", long_about = None)]
struct Args {
    /// A text file, one sentence per line [default: a generated corpus with planted clusters].
    #[arg(long, value_name = "FILE")]
    corpus: Option<PathBuf>,
    /// Where to write the vectors (word2vec text format)
    /// [default: target/word2vec.txt, or the temp dir without ./target].
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Vector dimension.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Largest context window radius.
    #[arg(long, default_value_t = 5)]
    window: usize,
    /// Negatives per (centre, context) pair.
    #[arg(long, default_value_t = 5)]
    negatives: usize,
    /// Subsampling threshold of frequent words (0: off).
    #[arg(long, default_value_t = 1e-3)]
    subsample: f64,
    /// Drop words seen fewer times than this (files only).
    #[arg(long, default_value_t = 5)]
    min_count: u64,
    /// Passes over the corpus.
    #[arg(long, default_value_t = 5)]
    epochs: u64,
    /// Sentences per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Adagrad learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// Words whose nearest neighbours to print, comma-separated
    /// [default: a few words of the corpus].
    #[arg(long, value_delimiter = ',')]
    words: Vec<String>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Generated corpus: number of planted clusters (topics, at most 16).
    #[arg(long, default_value_t = CorpusConfig::default().topics)]
    topics: usize,
    /// Generated corpus: words per cluster.
    #[arg(long, default_value_t = CorpusConfig::default().words_per_topic)]
    words_per_topic: usize,
    /// Generated corpus: number of sentences.
    #[arg(long, default_value_t = CorpusConfig::default().sentences)]
    sentences: usize,
    /// Generated corpus: share of words drawn from another cluster.
    #[arg(long, default_value_t = CorpusConfig::default().noise)]
    noise: f64,
    /// Seed of the corpus, the vectors and the sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// The optimizer of both tables: Adagrad with PyTorch's accumulator start
/// and ε placement, which adapts the step to each word's frequency.
fn adagrad(lr: f32) -> Adagrad {
    Adagrad::new(AdagradConfig {
        lr,
        initial_accumulator_value: 0.0,
        epsilon: 1e-8,
        eps_placement: EpsPlacement::OutsideSqrt,
        ..AdagradConfig::torch()
    })
}

/// Trains `epochs` passes, each over the sentences in a fresh order drawn
/// from `(seed, epoch)`; `progress` sees every step.
///
/// # Errors
/// From the layers.
pub fn train(
    model: &mut Sgns<Adagrad>,
    corpus: &Corpus,
    epoch: u64,
    batch: usize,
    seed: u64,
    mut progress: impl FnMut(&StepStats),
) -> embtable::Result<StepStats> {
    let mut order: Vec<usize> = (0..corpus.sentences.len()).collect();
    Rng::derive(seed, &[21, epoch]).shuffle(&mut order);
    let mut total = StepStats::default();
    let mut sentences: Vec<&[u32]> = Vec::with_capacity(batch);
    for (b, chunk) in order.chunks(batch.max(1)).enumerate() {
        sentences.clear();
        sentences.extend(chunk.iter().map(|&i| corpus.sentences[i].as_slice()));
        let stats = model.train_batch(&sentences, seed, epoch, b * batch)?;
        total.loss_sum += stats.loss_sum;
        total.pairs += stats.pairs;
        total.words += stats.words;
        progress(&stats);
    }
    Ok(total)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
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
    if args.dim == 0 || args.window == 0 {
        return Err("--dim and --window must be positive".into());
    }
    let started = Instant::now();
    let corpus = match &args.corpus {
        Some(path) => {
            let file =
                File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            corpus::read_text(BufReader::new(file), args.min_count)
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => {
            let cfg = CorpusConfig {
                topics: args.topics,
                words_per_topic: args.words_per_topic,
                sentences: args.sentences,
                noise: args.noise,
                ..CorpusConfig::default()
            };
            if !(1..=16).contains(&cfg.topics) || cfg.words_per_topic == 0 {
                return Err("--topics must be in 1..=16 and --words-per-topic positive".into());
            }
            if !(0.0..=1.0 - cfg.function_share).contains(&cfg.noise) {
                return Err(format!("--noise must be in 0..={}", 1.0 - cfg.function_share).into());
            }
            corpus::generate(&cfg, args.seed)
        }
    };
    let source = match &args.corpus {
        Some(p) => p.display().to_string(),
        None => format!("generated, planted clusters (seed {})", args.seed),
    };
    println!(
        "corpus: {source}: {} sentences, {} words, vocabulary {} [{:.1}s]",
        thousands(corpus.sentences.len()),
        thousands(corpus.tokens()),
        thousands(corpus.vocab.len()),
        started.elapsed().as_secs_f64()
    );

    let cfg = SgnsConfig {
        dim: args.dim,
        window: args.window,
        negatives: args.negatives,
        subsample: args.subsample,
    };
    let mut model = Sgns::new(&corpus, cfg, || adagrad(args.lr), args.seed)?;
    println!(
        "skip-gram: dim {}, window {}, {} negatives, subsample {}, Adagrad lr {}, {} sentences per step, {} threads",
        cfg.dim,
        cfg.window,
        cfg.negatives,
        cfg.subsample,
        args.lr,
        args.batch,
        rayon::current_num_threads()
    );

    let style = ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {percent:>3}% {msg} ({elapsed}<{eta})",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut train_time = Duration::ZERO;
    let mut words = 0usize;
    for epoch in 0..args.epochs {
        let bar = ProgressBar::new(corpus.tokens() as u64)
            .with_style(style.clone())
            .with_prefix(format!("{}/{}", epoch + 1, args.epochs));
        let t0 = Instant::now();
        let (mut loss, mut pairs, mut seen) = (0.0, 0usize, 0usize);
        let result = train(&mut model, &corpus, epoch, args.batch, args.seed, |s| {
            loss += s.loss_sum;
            pairs += s.pairs;
            seen += s.words;
            bar.inc(s.words as u64);
            bar.set_message(format!(
                "loss {:.4}  {:.0}k words/s",
                loss / pairs.max(1) as f64,
                seen as f64 / t0.elapsed().as_secs_f64() / 1e3
            ));
        });
        let dt = t0.elapsed();
        bar.finish_and_clear();
        let stats = result?;
        train_time += dt;
        words += stats.words;
        let clusters = corpus
            .clusters
            .as_ref()
            .map(|c| sgns::cluster_fraction(model.input.table(), c, 10));
        println!(
            "epoch {}/{}  loss {:.4}  {:.0}k words/s  {} pairs  {:.1}s{}",
            epoch + 1,
            args.epochs,
            stats.loss_sum / stats.pairs.max(1) as f64,
            stats.words as f64 / dt.as_secs_f64() / 1e3,
            thousands(stats.pairs),
            dt.as_secs_f64(),
            clusters.map_or(String::new(), |(f, _)| format!(
                " | same-cluster neighbours {:.1}%",
                100.0 * f
            )),
        );
    }

    // Nearest neighbours of a few words.
    let queries: Vec<usize> = if args.words.is_empty() {
        default_queries(&corpus)
    } else {
        args.words
            .iter()
            .map(|w| {
                corpus
                    .vocab
                    .get(w)
                    .ok_or_else(|| format!("--words: `{w}` is not in the vocabulary"))
            })
            .collect::<Result<_, _>>()?
    };
    let table = model.input.table();
    let unit = sgns::normalized(table);
    for &q in &queries {
        let near = sgns::nearest(&unit, table.dim(), q, 8);
        let list: Vec<String> = near
            .iter()
            .map(|&(w, sim)| format!("{} {sim:.2}", corpus.vocab.words()[w]))
            .collect();
        println!("  {:>10}: {}", corpus.vocab.words()[q], list.join(", "));
    }
    if let Some(clusters) = &corpus.clusters {
        let (fraction, chance) = sgns::cluster_fraction(table, clusters, 10);
        println!(
            "same-cluster share of the 10 nearest neighbours: {:.1}% (chance: {:.1}%)",
            100.0 * fraction,
            100.0 * chance
        );
    }

    let output = args.output.clone().unwrap_or_else(|| {
        let target = PathBuf::from("target");
        if target.is_dir() {
            target.join("word2vec.txt")
        } else {
            std::env::temp_dir().join("word2vec.txt")
        }
    });
    io::write_word2vec(&output, &corpus.vocab, table, Word2VecFormat::Text)?;
    println!(
        "done in {:.1}s: {} words trained in {:.1}s ({:.0}k words/s); vectors written to {} (gensim: KeyedVectors.load_word2vec_format)",
        started.elapsed().as_secs_f64(),
        thousands(words),
        train_time.as_secs_f64(),
        words as f64 / train_time.as_secs_f64().max(1e-9) / 1e3,
        output.display()
    );
    Ok(())
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

/// Query words when none are given: the most frequent word of the first
/// four planted clusters, or words of ranks 100, 200, 400 and 800.
fn default_queries(corpus: &Corpus) -> Vec<usize> {
    match &corpus.clusters {
        Some(clusters) => (0..4)
            .filter_map(|t| clusters.iter().position(|c| *c == Some(t)))
            .collect(),
        None => [100, 200, 400, 800]
            .into_iter()
            .filter(|&r| r < corpus.vocab.len())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny run: the loss falls and the neighbours come from the planted
    /// clusters far more often than chance.
    #[test]
    fn tiny_training_recovers_clusters() {
        let corpus = corpus::generate(
            &CorpusConfig {
                topics: 6,
                words_per_topic: 20,
                sentences: 3_000,
                ..CorpusConfig::default()
            },
            7,
        );
        let cfg = SgnsConfig {
            dim: 16,
            ..SgnsConfig::default()
        };
        let mut model = Sgns::new(&corpus, cfg, || adagrad(0.2), 7).unwrap();
        let clusters = corpus.clusters.as_ref().unwrap();
        let mut losses = Vec::new();
        for epoch in 0..3 {
            let s = train(&mut model, &corpus, epoch, 64, 7, |_| {}).unwrap();
            losses.push(s.loss_sum / s.pairs as f64);
        }
        assert!(losses[2] < losses[0], "{losses:?}");
        let (fraction, chance) = sgns::cluster_fraction(model.input.table(), clusters, 10);
        assert!(chance < 0.2, "{chance}");
        assert!(fraction > 0.8, "same-cluster {fraction} vs chance {chance}");
    }

    /// The same seed gives the same vectors whatever the thread count.
    #[test]
    fn training_does_not_depend_on_threads() {
        let corpus = corpus::generate(
            &CorpusConfig {
                topics: 3,
                words_per_topic: 10,
                sentences: 300,
                ..CorpusConfig::default()
            },
            1,
        );
        let cfg = SgnsConfig {
            dim: 8,
            ..SgnsConfig::default()
        };
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let mut m = Sgns::new(&corpus, cfg, || adagrad(0.1), 1).unwrap();
                    train(&mut m, &corpus, 0, 16, 1, |_| {}).unwrap();
                    m.input.table().to_vec()
                })
        };
        assert_eq!(run(1), run(2));
    }
}
