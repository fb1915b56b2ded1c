//! `--bench`: the trainer's words per second on each thread count beside
//! the classic single-threaded loop ([`crate::classic`]) and the classic
//! loop run Hogwild on each thread count (its speed-up from one to two
//! threads is what the established tools get on this machine), on the same
//! corpus with the same settings, in interleaved rounds (so a noisy
//! neighbour slows every contender alike), reported as medians.
//!
//! The corpus is read into memory as word ids first, so both loops are
//! timed on training alone. Each measurement is one epoch from fresh
//! vectors; "effective" words are those kept by subsampling (what word2vec
//! tools report), "raw" all words read.
//!
//! The speed-up between thread counts is also given on each step's fastest
//! round: every round trains the same steps, so summing each step's
//! shortest time estimates an epoch undisturbed by other processes, which
//! on a busy machine rarely leave two cores free for a whole epoch. The
//! CPU time (user + system, all threads) of each epoch and the load
//! average before and after say how busy the machine was: an epoch on two
//! threads that got both cores runs about half as long as it used CPU.

use std::error::Error;
use std::io::Write;
use std::time::Instant;

use embtable::SparseOptimizer;

use crate::classic::Classic;
use crate::corpus::{Corpus, Source};
use crate::out::{Out, say};
use crate::sgns::{self, LrDecay, Sgns, SgnsConfig};

/// What `--bench` runs.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Thread counts of the trainer.
    pub threads: Vec<usize>,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Shards of the trainer; `None`: one per thread.
    pub shards: Option<usize>,
    /// Sentences per step of the trainer.
    pub batch: usize,
    /// The trainer's learning-rate schedule.
    pub decay: LrDecay,
    /// The classic loop's starting learning rate (SGD, linear decay).
    pub classic_lr: f32,
    /// Seed of the vectors and the sampling.
    pub seed: u64,
}

/// One timed epoch.
#[derive(Clone, Copy, Debug)]
struct Timing {
    secs: f64,
    /// CPU seconds of the process meanwhile (NaN where unknown).
    cpu: f64,
    words: u64,
    kept: u64,
    /// The trainer's phases (zero for the classic loops).
    phases: Phases,
}

/// Where a trainer's epoch went: wall seconds of the shards' phase, of
/// the merge-and-step phase and between steps (reading the next batch),
/// and the threads' idle share of the shards' phase.
#[derive(Clone, Copy, Debug, Default)]
struct Phases {
    shards: f64,
    idle: f64,
    merge: f64,
    between: f64,
}

impl Timing {
    fn effective(self) -> f64 {
        self.kept as f64 / self.secs
    }
    fn raw(self) -> f64 {
        self.words as f64 / self.secs
    }
}

/// CPU seconds (user + system) of the process so far, all threads.
fn cpu_seconds() -> f64 {
    workloads::cpu_ms() / 1e3
}

/// The one-minute load average (Linux), or a dash.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "-".to_owned())
}

/// The median of `xs` (not empty).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Runs the benchmark on `corpus` and prints it to `out`.
///
/// # Errors
/// Reading the corpus, building thread pools, training, printing.
pub fn run<O: SparseOptimizer + Send>(
    corpus: &Corpus,
    cfg: SgnsConfig,
    make: impl Fn() -> O + Sync,
    bench: &BenchConfig,
    out: &mut Out<impl Write>,
) -> Result<(), Box<dyn Error>> {
    let corpus = corpus.to_ids()?;
    let Source::Ids(sentences) = &corpus.source else {
        unreachable!("to_ids gives ids");
    };
    let k = bench.threads.len();
    // timings[i] for i < k: the trainer on threads[i]; timings[k]: classic;
    // timings[k + 1 + i]: classic Hogwild on threads[i].
    let mut timings: Vec<Vec<Timing>> = vec![Vec::new(); 2 * k + 1];
    let mut last: Vec<Option<embtable::EmbeddingTable>> = vec![None; 2 * k + 1];
    // fastest[i][s]: the trainer on threads[i], step s's shortest time over
    // the rounds. Every round runs the same steps, so on a shared machine
    // their sum estimates an undisturbed epoch.
    let mut fastest: Vec<Vec<f64>> = vec![Vec::new(); k];
    let load_before = load_average();
    let pools = bench
        .threads
        .iter()
        .map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build())
        .collect::<Result<Vec<_>, _>>()?;
    for round in 0..bench.rounds {
        let mut line = format!("round {}/{}:", round + 1, bench.rounds);
        for (i, (&t, pool)) in bench.threads.iter().zip(&pools).enumerate() {
            let cfg = SgnsConfig {
                shards: bench.shards.unwrap_or(t),
                ..cfg
            };
            let (timing, table, steps) = pool.install(|| -> Result<_, String> {
                let mut model =
                    Sgns::new(&corpus, cfg, &make, bench.seed).map_err(|e| e.to_string())?;
                let (start, cpu) = (Instant::now(), cpu_seconds());
                let mut steps = Vec::new();
                let mut at = start;
                let s = model
                    .train_epoch(
                        &corpus,
                        0,
                        bench.batch,
                        bench.seed,
                        (bench.decay, 0, corpus.tokens()),
                        |_| {
                            let now = Instant::now();
                            steps.push((now - at).as_secs_f64());
                            at = now;
                        },
                    )
                    .map_err(|e| e.to_string())?;
                let secs = start.elapsed().as_secs_f64();
                Ok((
                    Timing {
                        secs,
                        cpu: cpu_seconds() - cpu,
                        words: s.words,
                        kept: s.kept,
                        phases: Phases {
                            shards: s.shard_secs,
                            idle: 1.0 - s.busy_secs / (t as f64 * s.shard_secs),
                            merge: s.merge_secs,
                            between: secs - s.shard_secs - s.merge_secs,
                        },
                    },
                    model.input,
                    steps,
                ))
            })?;
            if fastest[i].is_empty() {
                fastest[i] = steps;
            } else {
                for (f, s) in fastest[i].iter_mut().zip(steps) {
                    *f = f.min(s);
                }
            }
            line += &format!(" embtable×{t} {:.0}k", timing.effective() / 1e3);
            timings[i].push(timing);
            last[i] = Some(table);
        }
        // None: the one-thread loop; Some(t): Hogwild on t threads.
        for (i, hogwild) in std::iter::once(None)
            .chain(bench.threads.iter().map(|&t| Some(t)))
            .enumerate()
        {
            let mut classic = Classic::new(&corpus.counts, cfg, bench.seed);
            let (start, cpu) = (Instant::now(), cpu_seconds());
            let (lr, total) = (bench.classic_lr, corpus.tokens());
            let s = match hogwild {
                None => classic.epoch(sentences, lr, 0, total),
                Some(t) => classic.epoch_hogwild(sentences, t, lr, 0, total),
            };
            let timing = Timing {
                secs: start.elapsed().as_secs_f64(),
                cpu: cpu_seconds() - cpu,
                words: s.words,
                kept: s.kept,
                phases: Phases::default(),
            };
            line += &match hogwild {
                None => format!(" classic {:.0}k", timing.effective() / 1e3),
                Some(t) => format!(" hogwild×{t} {:.0}k", timing.effective() / 1e3),
            };
            timings[k + i].push(timing);
            last[k + i] = Some(embtable::EmbeddingTable::from_rows(
                corpus.vocab.len(),
                cfg.dim,
                &classic.syn0,
            )?);
        }
        say!(out, "{line} effective words/s");
    }

    let classic = &timings[k];
    say!(
        out,
        "medians of {} rounds (one epoch each, same corpus and settings; load average {load_before} before, {} after):",
        bench.rounds,
        load_average()
    );
    say!(
        out,
        "  {:<22} {:>16} {:>16} {:>12} {:>9} {:>9}{}",
        "loop",
        "effective w/s",
        "raw w/s",
        "vs classic",
        "wall s",
        "CPU s",
        if corpus.clusters.is_some() {
            "   same-cluster  pair AUC"
        } else {
            ""
        }
    );
    let threads = |t: &usize| format!("{t} thread{}", if *t == 1 { "" } else { "s" });
    for (i, name) in bench
        .threads
        .iter()
        .map(|t| format!("embtable, {}", threads(t)))
        .chain(["classic, 1 thread".to_owned()])
        .chain(
            bench
                .threads
                .iter()
                .map(|t| format!("Hogwild, {}", threads(t))),
        )
        .enumerate()
    {
        let ts = &timings[i];
        // Per-round ratios: both sides of a ratio ran in the same minute.
        let ratio = median(
            ts.iter()
                .zip(classic)
                .map(|(a, c)| a.effective() / c.effective())
                .collect(),
        );
        let quality = match (&corpus.clusters, &last[i]) {
            (Some(clusters), Some(table)) => {
                let (f, _) = sgns::cluster_fraction(table, clusters, 10);
                format!(
                    "   {:>11.1}%  {:>8.3}",
                    100.0 * f,
                    sgns::pair_auc(table, clusters, 20_000, 1)
                )
            }
            _ => String::new(),
        };
        say!(
            out,
            "  {:<22} {:>16.0} {:>16.0} {:>11.2}x {:>9.3} {:>9.3}{quality}",
            name,
            median(ts.iter().map(|t| t.effective()).collect()),
            median(ts.iter().map(|t| t.raw()).collect()),
            ratio,
            median(ts.iter().map(|t| t.secs).collect()),
            median(ts.iter().map(|t| t.cpu).collect()),
        );
    }
    for (t, ts) in bench.threads.iter().zip(&timings) {
        let phase = |f: fn(&Phases) -> f64| median(ts.iter().map(|t| f(&t.phases)).collect());
        say!(
            out,
            "  embtable, {:<12} shards' phase {:.0} ms (threads idle {:.0} % of it), merge and steps {:.0} ms, between steps {:.0} ms (medians)",
            threads(t),
            phase(|p| p.shards) * 1e3,
            phase(|p| p.idle) * 1e2,
            phase(|p| p.merge) * 1e3,
            phase(|p| p.between) * 1e3,
        );
    }
    let undisturbed: Vec<f64> = fastest.iter().map(|f| f.iter().sum()).collect();
    for (i, &t) in bench.threads.iter().enumerate().skip(1) {
        let base = bench.threads[0];
        let (ratio, cpu) = speed_up(&timings[i], &timings[0]);
        say!(
            out,
            "speed-up from {base} to {t} threads: {ratio}; \
             {:.2}x on each step's fastest round ({:.0} vs {:.0} ms an epoch); \
             CPU time per word {cpu:.2}x",
            undisturbed[0] / undisturbed[i],
            undisturbed[0] * 1e3,
            undisturbed[i] * 1e3
        );
        let (ratio, cpu) = speed_up(&timings[k + 1 + i], &timings[k + 1]);
        say!(
            out,
            "  Hogwild from {base} to {t} threads: {ratio}; CPU time per word {cpu:.2}x"
        );
    }
    Ok(())
}

/// The speed-up of `many` threads over `few` (median of the per-round
/// ratios and their range, printed) and the CPU time per effective word of
/// `many` relative to `few`: what the extra threads cost in work (waiting
/// threads spin a while).
fn speed_up(many: &[Timing], few: &[Timing]) -> (String, f64) {
    let mut ratios: Vec<f64> = many
        .iter()
        .zip(few)
        .map(|(a, b)| a.effective() / b.effective())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let cpu = median(
        many.iter()
            .zip(few)
            .map(|(a, b)| (a.cpu / a.kept as f64) / (b.cpu / b.kept as f64))
            .collect(),
    );
    let ratio = format!(
        "{:.2}x (median of per-round ratios, {:.2}-{:.2}x)",
        median(ratios.clone()),
        ratios[0],
        ratios[ratios.len() - 1]
    );
    (ratio, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{self, CorpusConfig};
    use embtable::{Sgd, SgdConfig};

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    /// A tiny bench prints a row per contender and the speed-up.
    #[test]
    fn bench_prints_every_contender() {
        let corpus = corpus::generate(
            &CorpusConfig {
                topics: 2,
                words_per_topic: 10,
                sentences: 200,
                ..CorpusConfig::default()
            },
            1,
        );
        let cfg = SgnsConfig {
            dim: 8,
            ..SgnsConfig::default()
        };
        let bench = BenchConfig {
            threads: vec![1, 2],
            rounds: 3,
            shards: None,
            batch: 32,
            decay: LrDecay::Linear,
            classic_lr: 0.025,
            seed: 1,
        };
        let mut out = Out::new(Vec::new());
        let sgd = || {
            Sgd::new(SgdConfig {
                lr: 0.025,
                ..SgdConfig::default()
            })
        };
        run(&corpus, cfg, sgd, &bench, &mut out).unwrap();
        let text = String::from_utf8(out.into_inner()).unwrap();
        let rounds = text.lines().filter(|l| l.starts_with("round ")).count();
        assert_eq!(rounds, 3, "{text}");
        for row in [
            "embtable, 1 thread ",
            "embtable, 2 threads",
            "classic, 1 thread",
            "Hogwild, 1 thread ",
            "Hogwild, 2 threads",
            "Hogwild from 1 to 2 threads",
            "speed-up from 1 to 2 threads",
            "on each step's fastest round",
            "CPU time per word",
            "CPU s",
            "load average",
            "shards' phase",
            "merge and steps",
        ] {
            assert!(text.contains(row), "{row} missing in\n{text}");
        }
    }
}
