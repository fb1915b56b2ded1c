//! word2vec (skip-gram with negative sampling) on embtable: two embedding
//! tables, sparse optimizer steps, batches of sentences split across threads.
//!
//! ```sh
//! cargo run --release --example word2vec
//! cargo run --release --example word2vec -- --corpus text8 --min-count 5 --epochs 1
//! cargo run --release --example word2vec -- --bench --threads 2
//! ```
//!
//! By default it trains on a generated corpus with planted clusters
//! (`corpus.rs`) and reports how many of each word's nearest neighbours come
//! from its own cluster. The vectors are written in word2vec text (or
//! `--binary`) format, which gensim reads with
//! `KeyedVectors.load_word2vec_format(path, binary=…)`.
//!
//! Run with `--help` for the options.

mod bench;
mod classic;
mod corpus;
mod out;
#[path = "../recommender/rng.rs"]
mod rng;
mod sampling;
mod sgns;

use std::error::Error;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use embtable::io::{self, Pretrained, Word2VecFormat};
use embtable::{Adagrad, AdagradConfig, EpsPlacement, Sgd, SgdConfig, SparseOptimizer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::bench::BenchConfig;
use crate::corpus::{Corpus, CorpusConfig, Tokenizer};
use crate::out::{Out, say};
use crate::sgns::{LrDecay, Sgns, SgnsConfig};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    about = "Train skip-gram word vectors with embtable",
    long_about = "Train skip-gram word vectors (word2vec's SGNS) with embtable.\n\n\
        Each step takes --batch sentences, splits them into --shards parts \
        trained in parallel into per-shard sparse gradients, and applies one \
        fused optimizer step per table (Adagrad by default; --optimizer sgd \
        for word2vec's SGD with a linearly decaying rate). The corpus is \
        streamed: memory holds the vocabulary, the two tables, the optimizer \
        state and small per-shard buffers, whatever the corpus length.\n\n\
        Words per second are printed as effective (words kept by \
        subsampling, as word2vec tools report them) and raw (all words \
        read). --bench times the trainer against a classic single-threaded \
        C-style loop, and that loop run Hogwild on each thread count as the \
        C tool and gensim run it, on the same corpus and settings.\n\n\
        Standard output may be closed early (`| head`): the run goes on and \
        still writes the vectors."
)]
struct Args {
    /// A text file, one sentence per line, read again every epoch
    /// [default: a generated corpus with planted clusters].
    #[arg(long, value_name = "FILE")]
    corpus: Option<PathBuf>,
    /// Fold the corpus file's words to lower case.
    #[arg(long)]
    lowercase: bool,
    /// Drop punctuation and symbols from the corpus file's words (keeping
    /// `don't`, `e-mail`, `3.14`), so that `end.` and `end` are one word.
    #[arg(long)]
    strip_punctuation: bool,
    /// Where to write the vectors
    /// [default: target/word2vec.txt (.bin), or the temp dir without ./target].
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Write the vectors in word2vec's binary format instead of text.
    #[arg(long)]
    binary: bool,
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
    /// Sentences per step [default: 256 with Adagrad, 64 with SGD]. Threads
    /// meet twice a step, so larger steps waste less of a second
    /// thread; SGD puts all of a step's gradient of a word into one update,
    /// so frequent words take larger steps, which diverge sooner (at 512 on
    /// the generated corpus).
    #[arg(long)]
    batch: Option<usize>,
    /// The optimizer of both tables.
    #[arg(long, value_enum, default_value_t = Optimizer::Adagrad)]
    optimizer: Optimizer,
    /// Learning rate [default: 0.1 for Adagrad, 0.025 for SGD].
    #[arg(long)]
    lr: Option<f32>,
    /// Learning-rate schedule (linear: SGD only) [default: none for
    /// Adagrad, linear for SGD].
    #[arg(long, value_enum)]
    lr_decay: Option<LrDecay>,
    /// Words whose nearest neighbours to print, comma-separated
    /// [default: a few words of the corpus].
    #[arg(long, value_delimiter = ',')]
    words: Vec<String>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Parts of each batch trained in parallel; the vectors depend on this,
    /// not on --threads [default: the number of threads].
    #[arg(long)]
    shards: Option<usize>,
    /// Benchmark instead of training: one epoch per thread count of
    /// --bench-threads, of the classic loop and of the classic loop run
    /// Hogwild on each of those thread counts, in interleaved rounds,
    /// printing effective and raw words/s and their medians.
    #[arg(long)]
    bench: bool,
    /// Thread counts for --bench, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    bench_threads: Vec<usize>,
    /// Rounds of --bench.
    #[arg(long, default_value_t = 5)]
    bench_rounds: usize,
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

/// The optimizers on offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Optimizer {
    /// Adagrad (PyTorch's accumulator start and ε placement): adapts each
    /// word's step to its frequency.
    Adagrad,
    /// Plain SGD, as word2vec trains.
    Sgd,
}

/// Adagrad with PyTorch's accumulator start and ε placement, which adapts
/// the step to each word's frequency.
fn adagrad(lr: f32) -> Adagrad {
    Adagrad::new(AdagradConfig {
        lr,
        initial_accumulator_value: 0.0,
        epsilon: 1e-8,
        eps_placement: EpsPlacement::OutsideSqrt,
        ..AdagradConfig::torch()
    })
}

/// Plain SGD (the schedule scales the gradients).
fn sgd(lr: f32) -> Sgd {
    Sgd::new(SgdConfig {
        lr,
        ..SgdConfig::default()
    })
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
    if args.shards == Some(0) || args.bench_threads.contains(&0) || args.bench_rounds == 0 {
        return Err("--shards, --bench-threads and --bench-rounds must be positive".into());
    }
    let decay = args.lr_decay.unwrap_or(match args.optimizer {
        Optimizer::Adagrad => LrDecay::None,
        Optimizer::Sgd => LrDecay::Linear,
    });
    if args.optimizer == Optimizer::Adagrad && decay == LrDecay::Linear {
        return Err(
            "--lr-decay linear is for --optimizer sgd (Adagrad shrinks each word's steps itself)"
                .into(),
        );
    }
    let mut out = Out::stdout();
    let started = Instant::now();
    let corpus = load_corpus(&args)?;
    let source = match &args.corpus {
        Some(p) => p.display().to_string(),
        None => format!("generated, planted clusters (seed {})", args.seed),
    };
    say!(
        out,
        "corpus: {source}: {} sentences, {} words, vocabulary {} [{:.1}s]",
        thousands(corpus.sentences),
        thousands(corpus.tokens()),
        thousands(corpus.vocab.len() as u64),
        started.elapsed().as_secs_f64()
    );
    match args.optimizer {
        Optimizer::Adagrad => {
            let lr = args.lr.unwrap_or(0.1);
            train(
                &args,
                &corpus,
                || adagrad(lr),
                (lr, decay),
                started,
                &mut out,
            )
        }
        Optimizer::Sgd => {
            let lr = args.lr.unwrap_or(0.025);
            train(&args, &corpus, || sgd(lr), (lr, decay), started, &mut out)
        }
    }
}

/// The file of `--corpus`, or a generated corpus.
fn load_corpus(args: &Args) -> Result<Corpus, Box<dyn Error>> {
    Ok(match &args.corpus {
        Some(path) => {
            let tokenizer = Tokenizer {
                lowercase: args.lowercase,
                strip_punctuation: args.strip_punctuation,
            };
            corpus::read_text(path, tokenizer, args.min_count)?
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
    })
}

/// Trains (or benchmarks) with optimizers from `make`, prints what was
/// learnt and writes the vectors.
fn train<O: SparseOptimizer + Send>(
    args: &Args,
    corpus: &Corpus,
    make: impl Fn() -> O + Sync,
    (lr, decay): (f32, LrDecay),
    started: Instant,
    out: &mut Out<impl Write>,
) -> Result<(), Box<dyn Error>> {
    let queries = query_words(args, corpus)?;
    let threads = rayon::current_num_threads();
    let batch = args.batch.unwrap_or(match args.optimizer {
        Optimizer::Adagrad => 256,
        Optimizer::Sgd => 64,
    });
    let cfg = SgnsConfig {
        dim: args.dim,
        window: args.window,
        negatives: args.negatives,
        subsample: args.subsample,
        shards: args.shards.unwrap_or(threads),
    };
    let optimizer = format!(
        "{:?} lr {lr}{}",
        args.optimizer,
        if decay == LrDecay::Linear {
            " decaying linearly"
        } else {
            ""
        }
    );
    if args.bench {
        say!(
            out,
            "bench: skip-gram, dim {}, window {}, {} negatives, subsample {}, {optimizer}, {} sentences per step; classic loop (one thread, and Hogwild on each thread count): SGD lr 0.025 decaying linearly",
            cfg.dim,
            cfg.window,
            cfg.negatives,
            cfg.subsample,
            batch
        );
        let bench = BenchConfig {
            threads: args.bench_threads.clone(),
            rounds: args.bench_rounds,
            shards: args.shards,
            batch,
            decay,
            classic_lr: 0.025,
            seed: args.seed,
        };
        return bench::run(corpus, cfg, make, &bench, out);
    }
    let mut model = Sgns::new(corpus, cfg, make, args.seed)?;
    say!(
        out,
        "skip-gram: dim {}, window {}, {} negatives, subsample {}, {optimizer}, {} sentences per step, {}, {}",
        cfg.dim,
        cfg.window,
        cfg.negatives,
        cfg.subsample,
        batch,
        if cfg.shards == 1 {
            "1 shard".to_owned()
        } else {
            format!("{} shards", cfg.shards)
        },
        if threads == 1 {
            "1 thread".to_owned()
        } else {
            format!("{threads} threads")
        },
    );

    let style = ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {percent:>3}% {msg} ({elapsed}<{eta})",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut train_time = Duration::ZERO;
    let mut total = sgns::StepStats::default();
    let all_words = args.epochs * corpus.tokens();
    for epoch in 0..args.epochs {
        let bar = ProgressBar::new(corpus.tokens())
            .with_style(style.clone())
            .with_prefix(format!("{}/{}", epoch + 1, args.epochs));
        let t0 = Instant::now();
        let mut seen = sgns::StepStats::default();
        let result = model.train_epoch(
            corpus,
            epoch,
            batch,
            args.seed,
            (decay, total.words, all_words),
            |s| {
                seen += *s;
                bar.inc(s.words);
                bar.set_message(format!(
                    "loss {:.4}  {:.0}k words/s",
                    seen.loss_sum / seen.pairs.max(1) as f64,
                    seen.kept as f64 / t0.elapsed().as_secs_f64() / 1e3
                ));
            },
        );
        let dt = t0.elapsed();
        bar.finish_and_clear();
        let stats = result?;
        train_time += dt;
        total += stats;
        let clusters = corpus
            .clusters
            .as_ref()
            .map(|c| sgns::cluster_fraction(&model.input, c, 10));
        say!(
            out,
            "epoch {}/{}  loss {:.4}  {:.0}k effective words/s ({:.0}k raw)  {} pairs  {:.1}s{}",
            epoch + 1,
            args.epochs,
            stats.loss_sum / stats.pairs.max(1) as f64,
            stats.kept as f64 / dt.as_secs_f64() / 1e3,
            stats.words as f64 / dt.as_secs_f64() / 1e3,
            thousands(stats.pairs),
            dt.as_secs_f64(),
            clusters.map_or(String::new(), |(f, _)| format!(
                " | same-cluster neighbours {:.1}%",
                100.0 * f
            )),
        );
    }

    if let Some(clusters) = &corpus.clusters {
        let (fraction, chance) = sgns::cluster_fraction(&model.input, clusters, 10);
        say!(
            out,
            "same-cluster share of the 10 nearest neighbours: {:.1}% (chance: {:.1}%); same-cluster pairs ranked above others (AUC): {:.3}",
            100.0 * fraction,
            100.0 * chance,
            sgns::pair_auc(&model.input, clusters, 20_000, 1)
        );
    }

    // Nearest neighbours of a few words, as gensim's `most_similar` gives them.
    let vectors = Pretrained::new(corpus.vocab.clone(), model.input)?;
    for word in &queries {
        let near = match vectors.most_similar(&[word], &[], 8) {
            Ok(near) => near
                .iter()
                .map(|(w, sim)| format!("{w} {sim:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => e.to_string(),
        };
        say!(out, "  {word:>10}: {near}");
    }

    let (format, ext) = if args.binary {
        (Word2VecFormat::Binary, "bin")
    } else {
        (Word2VecFormat::Text, "txt")
    };
    let output = args.output.clone().unwrap_or_else(|| {
        let target = PathBuf::from("target");
        let name = format!("word2vec.{ext}");
        if target.is_dir() {
            target.join(name)
        } else {
            std::env::temp_dir().join(name)
        }
    });
    io::write_word2vec(&output, &vectors.vocab, &vectors.table, format)?;
    say!(
        out,
        "done in {:.1}s: {} words trained in {:.1}s ({:.0}k effective words/s, {:.0}k raw){}; vectors written to {} (gensim: KeyedVectors.load_word2vec_format(path, binary={}))",
        started.elapsed().as_secs_f64(),
        thousands(total.words),
        train_time.as_secs_f64(),
        total.kept as f64 / train_time.as_secs_f64().max(1e-9) / 1e3,
        total.words as f64 / train_time.as_secs_f64().max(1e-9) / 1e3,
        peak_memory().map_or(String::new(), |m| format!(", peak memory {m}")),
        output.display(),
        if args.binary { "True" } else { "False" }
    );
    Ok(())
}

/// The process's peak resident memory, as Linux reports it (`VmHWM`).
fn peak_memory() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(format!("{:.1} MB", kb as f64 / 1024.0))
}

/// `1234567` → `"1,234,567"`.
fn thousands(n: u64) -> String {
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

/// The words of `--words`, each checked against the vocabulary before
/// training starts; without `--words`, the most frequent word of the first
/// four planted clusters, or the words of ranks 100, 200, 400 and 800.
fn query_words(args: &Args, corpus: &Corpus) -> Result<Vec<String>, String> {
    let words = corpus.vocab.words();
    if let Some(w) = args.words.iter().find(|w| corpus.vocab.get(w).is_none()) {
        return Err(format!("--words: `{w}` is not in the vocabulary"));
    }
    if !args.words.is_empty() {
        return Ok(args.words.clone());
    }
    let ranks: Vec<usize> = match &corpus.clusters {
        Some(clusters) => (0..4)
            .filter_map(|t| clusters.iter().position(|c| *c == Some(t)))
            .collect(),
        None => [100, 200, 400, 800]
            .into_iter()
            .filter(|&r| r < words.len())
            .collect(),
    };
    Ok(ranks.into_iter().map(|r| words[r].clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny run: the loss falls and the neighbours come from the planted
    /// clusters far more often than chance, with Adagrad and with SGD whose
    /// rate decays linearly.
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
        let clusters = corpus.clusters.as_ref().unwrap();
        let check = |table: &embtable::EmbeddingTable, losses: &[f64]| {
            assert!(losses[2] < losses[0], "{losses:?}");
            let (fraction, chance) = sgns::cluster_fraction(table, clusters, 10);
            assert!(chance < 0.2, "{chance}");
            assert!(fraction > 0.8, "same-cluster {fraction} vs chance {chance}");
            let auc = sgns::pair_auc(table, clusters, 5_000, 1);
            assert!(auc > 0.9, "{auc}");
        };
        for shards in [1, 2] {
            let cfg = SgnsConfig {
                dim: 16,
                shards,
                ..SgnsConfig::default()
            };
            let mut model = Sgns::new(&corpus, cfg, || adagrad(0.2), 7).unwrap();
            let losses: Vec<f64> = (0..3)
                .map(|epoch| {
                    let s = model
                        .train_epoch(&corpus, epoch, 64, 7, (LrDecay::None, 0, 1), |_| {})
                        .unwrap();
                    s.loss_sum / s.pairs as f64
                })
                .collect();
            check(&model.input, &losses);

            let mut model = Sgns::new(&corpus, cfg, || sgd(0.025), 7).unwrap();
            let total = 3 * corpus.tokens();
            let mut done = 0;
            let losses: Vec<f64> = (0..3)
                .map(|epoch| {
                    let s = model
                        .train_epoch(
                            &corpus,
                            epoch,
                            64,
                            7,
                            (LrDecay::Linear, done, total),
                            |_| {},
                        )
                        .unwrap();
                    done += s.words;
                    s.loss_sum / s.pairs as f64
                })
                .collect();
            check(&model.input, &losses);
        }
    }

    /// The options parse as documented, and `--help` names each of them.
    #[test]
    fn options_parse_and_help_documents_them() {
        let args = Args::try_parse_from([
            "word2vec",
            "--binary",
            "--lowercase",
            "--strip-punctuation",
            "--optimizer",
            "sgd",
            "--lr-decay",
            "linear",
            "--bench",
            "--bench-threads",
            "1,2,4",
            "--shards",
            "3",
        ])
        .unwrap();
        assert!(args.binary && args.lowercase && args.strip_punctuation && args.bench);
        assert_eq!(args.optimizer, Optimizer::Sgd);
        assert_eq!(args.lr_decay, Some(LrDecay::Linear));
        assert_eq!(args.bench_threads, [1, 2, 4]);
        assert_eq!(args.shards, Some(3));
        assert!(Args::try_parse_from(["word2vec", "--optimizer", "adam"]).is_err());

        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for option in [
            "--binary",
            "--lowercase",
            "--strip-punctuation",
            "--optimizer",
            "--lr-decay",
            "--bench",
            "--bench-threads",
            "--bench-rounds",
            "--shards",
            "--threads",
            "effective",
            "| head",
        ] {
            assert!(help.contains(option), "--help lacks {option}");
        }
    }

    /// Adagrad with a linear decay is refused with a reason.
    #[test]
    fn adagrad_refuses_linear_decay() {
        let args = Args::try_parse_from(["word2vec", "--lr-decay", "linear"]).unwrap();
        let err = run(args).unwrap_err().to_string();
        assert!(err.contains("--optimizer sgd"), "{err}");
    }

    /// A `--words` word outside the vocabulary is refused before training.
    #[test]
    fn unknown_query_word_is_refused_before_training() {
        let args =
            Args::try_parse_from(["word2vec", "--sentences", "50", "--words", "zebra"]).unwrap();
        let corpus = load_corpus(&args).unwrap();
        let mut out = Out::new(Vec::new());
        let lr = (0.1, LrDecay::None);
        let err = train(
            &args,
            &corpus,
            || adagrad(0.1),
            lr,
            Instant::now(),
            &mut out,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`zebra` is not in the vocabulary"), "{err}");
        assert!(out.into_inner().is_empty(), "nothing trained or printed");
    }

    /// A whole run on a small text file with the tokeniser writes binary
    /// vectors that read back with the file's cleaned words.
    #[test]
    fn run_writes_binary_vectors_of_a_tokenised_file() {
        let dir = std::env::temp_dir();
        let id = std::process::id();
        let text = dir.join(format!("embtable-w2v-run-{id}.txt"));
        let vectors = dir.join(format!("embtable-w2v-run-{id}.bin"));
        let mut corpus = String::new();
        for i in 0..200 {
            corpus += &format!("The Cat, the dog. A cat? {} dog!\n", ["Red", "blue"][i % 2]);
        }
        std::fs::write(&text, corpus).unwrap();
        let args = Args::try_parse_from([
            "word2vec".as_ref(),
            "--corpus".as_ref(),
            text.as_os_str(),
            "--output".as_ref(),
            vectors.as_os_str(),
            "--binary".as_ref(),
            "--lowercase".as_ref(),
            "--strip-punctuation".as_ref(),
            "--epochs".as_ref(),
            "1".as_ref(),
            "--dim".as_ref(),
            "8".as_ref(),
            "--words".as_ref(),
            "cat,red".as_ref(),
        ])
        .unwrap();
        let mut out = Out::new(Vec::new());
        let corpus = load_corpus(&args).unwrap();
        let lr = (0.1, LrDecay::None);
        train(
            &args,
            &corpus,
            || adagrad(0.1),
            lr,
            Instant::now(),
            &mut out,
        )
        .unwrap();
        let back = io::read_word2vec(&vectors, Word2VecFormat::Binary).unwrap();
        let mut words = back.vocab.words().to_vec();
        words.sort();
        assert_eq!(words, ["a", "blue", "cat", "dog", "red", "the"]);
        assert_eq!(back.table.dim(), 8);
        let printed = String::from_utf8(out.into_inner()).unwrap();
        assert!(printed.contains("effective words/s"), "{printed}");
        // The neighbours of each --words word, from Pretrained::most_similar:
        // the other five words, the query itself left out.
        for query in ["cat", "red"] {
            let line = printed
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{query}: ")))
                .unwrap_or_else(|| panic!("no neighbours of {query} in {printed}"));
            let listed = line.split(": ").nth(1).unwrap().split(", ").count();
            assert_eq!(listed, 5, "{line}");
            assert!(!line.split(": ").nth(1).unwrap().contains(query), "{line}");
        }
        std::fs::remove_file(&text).ok();
        std::fs::remove_file(&vectors).ok();
    }
}
