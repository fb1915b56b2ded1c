//! The yardstick of `--bench`: skip-gram with negative sampling trained the
//! way the classic C word2vec tool trains it, on one thread, written here in
//! plain Rust loops.
//!
//! What makes it "classic": two flat `f32` arrays updated in place after
//! every (word, context) pair; scalar loops over the dimension (the dot
//! product is one sequential sum, as a C compiler must keep it without
//! `-ffast-math`; the `+=` loops vectorise); the sigmoid read from a
//! 1000-entry table over `[-6, 6]`, with the gradient clipped outside it;
//! negatives from a unigram table (10⁷ entries here, as fastText has; the C
//! tool's has 10⁸ and misses the cache more); a linear congruential
//! generator; the learning rate decaying linearly every 10,000 words; the
//! same subsampling formula. Where the CPU has AVX2 and FMA the loop is
//! compiled for them, as a C build with `-march=native` would be.
//!
//! [`Classic::epoch_hogwild`] is the same loop on several threads, as the C
//! tool and gensim run it ("Hogwild"): each thread trains its own contiguous
//! range of the sentences and updates the shared tables in place without
//! locks, its learning rate decaying with the word count of all threads. It
//! is the reference for the speed-up from one to two threads because it is
//! what users compare with; its vectors depend on how the threads interleave,
//! while embtable's trainer stays deterministic. Rust forbids the plain
//! unsynchronised float writes that C allows, so the shared rows are
//! `AtomicU32` bits read and written with `Ordering::Relaxed`: plain loads
//! and stores on x86, but the compiler cannot vectorise them, so `--bench`
//! times the Hogwild loop on one thread too and compares its thread counts
//! with each other, beside the (vectorised) one-thread loop.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::sgns::SgnsConfig;

const EXP_TABLE_SIZE: usize = 1000;
const MAX_EXP: f32 = 6.0;
const TABLE_SIZE: usize = 10_000_000;

/// The classic loop's model and state.
pub struct Classic {
    /// Input vectors, `words × dim`.
    pub syn0: Vec<f32>,
    syn1neg: Vec<f32>,
    sampling: Sampling,
    next_random: u64,
}

/// What every thread of the classic loop reads and never writes.
struct Sampling {
    dim: usize,
    unigram: Vec<u32>,
    exp_table: Vec<f32>,
    /// Keep probability of each word, as the C tool computes it.
    keep: Vec<f32>,
    cfg: SgnsConfig,
}

/// What an epoch of the classic loop trained.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClassicStats {
    /// Words read.
    pub words: u64,
    /// Words kept by subsampling.
    pub kept: u64,
}

impl Classic {
    /// Fresh vectors for words of `counts` (input uniform in `±0.5/dim`,
    /// output zero) and the tables.
    pub fn new(counts: &[u64], cfg: SgnsConfig, seed: u64) -> Self {
        let (words, dim) = (counts.len(), cfg.dim);
        let mut next_random = seed;
        let mut lcg = || {
            next_random = next_random.wrapping_mul(25_214_903_917).wrapping_add(11);
            next_random
        };
        let syn0 = (0..words * dim)
            .map(|_| (((lcg() & 0xFFFF) as f32 / 65536.0) - 0.5) / dim as f32)
            .collect();
        // Word w owns a share of the table proportional to count^0.75.
        let pow: Vec<f64> = counts.iter().map(|&c| (c as f64).powf(0.75)).collect();
        let total: f64 = pow.iter().sum();
        let mut unigram = Vec::with_capacity(TABLE_SIZE);
        let (mut w, mut reached) = (0usize, pow[0] / total);
        for a in 0..TABLE_SIZE {
            unigram.push(w as u32);
            if a as f64 / TABLE_SIZE as f64 > reached && w + 1 < words {
                w += 1;
                reached += pow[w] / total;
            }
        }
        let exp_table = (0..EXP_TABLE_SIZE)
            .map(|i| {
                let e = ((i as f32 / EXP_TABLE_SIZE as f32 * 2.0 - 1.0) * MAX_EXP).exp();
                e / (e + 1.0)
            })
            .collect();
        let train_words: u64 = counts.iter().sum();
        let t = cfg.subsample as f32 * train_words as f32;
        let keep = counts
            .iter()
            .map(|&c| {
                if cfg.subsample > 0.0 {
                    ((c as f32 / t).sqrt() + 1.0) * t / c as f32
                } else {
                    1.0
                }
            })
            .collect();
        Classic {
            syn0,
            syn1neg: vec![0.0; words * dim],
            sampling: Sampling {
                dim,
                unigram,
                exp_table,
                keep,
                cfg,
            },
            next_random,
        }
    }

    /// One pass over `sentences` on this thread with learning rate `alpha0`
    /// decaying linearly over `total` words, `done` of which were trained
    /// before.
    pub fn epoch(
        &mut self,
        sentences: &[Vec<u32>],
        alpha0: f32,
        done: u64,
        total: u64,
    ) -> ClassicStats {
        let mut tables = Plain {
            syn0: &mut self.syn0,
            syn1: &mut self.syn1neg,
        };
        let words_done = AtomicU64::new(done);
        let lr = (alpha0, &words_done, total);
        self.sampling
            .train(&mut tables, sentences, lr, &mut self.next_random)
    }

    /// [`Classic::epoch`] on `threads` threads at once, Hogwild (see the
    /// module's comment): thread `i` trains the `i`-th contiguous range of
    /// about `sentences.len() / threads` sentences. On one thread it trains
    /// exactly as [`Classic::epoch`] does.
    pub fn epoch_hogwild(
        &mut self,
        sentences: &[Vec<u32>],
        threads: usize,
        alpha0: f32,
        done: u64,
        total: u64,
    ) -> ClassicStats {
        let syn0 = shared(&mut self.syn0);
        let syn1 = shared(&mut self.syn1neg);
        let words_done = AtomicU64::new(done);
        let sampling = &self.sampling;
        let ranges = sentences.chunks(sentences.len().div_ceil(threads.max(1)).max(1));
        let seed = self.next_random;
        let results: Vec<(ClassicStats, u64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranges
                .enumerate()
                .map(|(i, range)| {
                    let words_done = &words_done;
                    scope.spawn(move || {
                        let mut tables = Shared { syn0, syn1 };
                        // As the C tool does, each thread its own generator.
                        let mut next_random = seed.wrapping_add(i as u64);
                        let lr = (alpha0, words_done, total);
                        let s = sampling.train(&mut tables, range, lr, &mut next_random);
                        (s, next_random)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a Hogwild thread panicked"))
                .collect()
        });
        if let Some(&(_, next_random)) = results.first() {
            self.next_random = next_random;
        }
        results
            .iter()
            .fold(ClassicStats::default(), |a, (s, _)| ClassicStats {
                words: a.words + s.words,
                kept: a.kept + s.kept,
            })
    }
}

/// `xs` as atomics, for threads to share while `xs` is borrowed.
fn shared(xs: &mut [f32]) -> &[AtomicU32] {
    const {
        assert!(size_of::<f32>() == size_of::<AtomicU32>());
        assert!(align_of::<f32>() == align_of::<AtomicU32>());
    }
    // SAFETY: `AtomicU32` has the size of `f32` and (checked above) its
    // alignment, and every bit pattern is valid for both; the exclusive
    // borrow keeps every other access away while the atomic view lives.
    unsafe { std::slice::from_raw_parts(xs.as_mut_ptr().cast::<AtomicU32>(), xs.len()) }
}

/// The float arithmetic of the loop on its two tables, which only this
/// thread ([`Plain`]) or all threads ([`Shared`]) touch.
trait Tables {
    /// `syn0[l1] · syn1[l2]`, summed in order.
    fn dot(&self, l1: usize, l2: usize, dim: usize) -> f32;
    /// `neu1e += g syn1[l2]`, then `syn1[l2] += g syn0[l1]`.
    fn update_output(&mut self, l1: usize, l2: usize, g: f32, neu1e: &mut [f32]);
    /// `syn0[l1] += neu1e`.
    fn update_input(&mut self, l1: usize, neu1e: &[f32]);
}

struct Plain<'a> {
    syn0: &'a mut [f32],
    syn1: &'a mut [f32],
}

impl Tables for Plain<'_> {
    #[inline(always)]
    fn dot(&self, l1: usize, l2: usize, dim: usize) -> f32 {
        let mut f = 0.0f32;
        for (x, y) in self.syn0[l1..l1 + dim].iter().zip(&self.syn1[l2..l2 + dim]) {
            f += x * y;
        }
        f
    }

    #[inline(always)]
    fn update_output(&mut self, l1: usize, l2: usize, g: f32, neu1e: &mut [f32]) {
        let dim = neu1e.len();
        let syn0 = &self.syn0[l1..l1 + dim];
        let syn1 = &mut self.syn1[l2..l2 + dim];
        for (e, y) in neu1e.iter_mut().zip(syn1.iter()) {
            *e += g * y;
        }
        for (y, x) in syn1.iter_mut().zip(syn0) {
            *y += g * x;
        }
    }

    #[inline(always)]
    fn update_input(&mut self, l1: usize, neu1e: &[f32]) {
        for (x, e) in self.syn0[l1..l1 + neu1e.len()].iter_mut().zip(neu1e) {
            *x += e;
        }
    }
}

struct Shared<'a> {
    syn0: &'a [AtomicU32],
    syn1: &'a [AtomicU32],
}

fn get(x: &AtomicU32) -> f32 {
    f32::from_bits(x.load(Relaxed))
}

fn set(x: &AtomicU32, v: f32) {
    x.store(v.to_bits(), Relaxed);
}

impl Tables for Shared<'_> {
    #[inline(always)]
    fn dot(&self, l1: usize, l2: usize, dim: usize) -> f32 {
        let mut f = 0.0f32;
        for (x, y) in self.syn0[l1..l1 + dim].iter().zip(&self.syn1[l2..l2 + dim]) {
            f += get(x) * get(y);
        }
        f
    }

    #[inline(always)]
    fn update_output(&mut self, l1: usize, l2: usize, g: f32, neu1e: &mut [f32]) {
        let dim = neu1e.len();
        let syn0 = &self.syn0[l1..l1 + dim];
        let syn1 = &self.syn1[l2..l2 + dim];
        for (e, y) in neu1e.iter_mut().zip(syn1) {
            *e += g * get(y);
        }
        // Another thread's write between this read and write is lost, as
        // in the C tool.
        for (y, x) in syn1.iter().zip(syn0) {
            set(y, get(y) + g * get(x));
        }
    }

    #[inline(always)]
    fn update_input(&mut self, l1: usize, neu1e: &[f32]) {
        for (x, e) in self.syn0[l1..l1 + neu1e.len()].iter().zip(neu1e) {
            set(x, get(x) + e);
        }
    }
}

/// The learning rate's schedule: the starting rate, the words trained so
/// far by all threads, and the words of the whole training.
type Schedule<'a> = (f32, &'a AtomicU64, u64);

impl Sampling {
    /// Trains `tables` on `sentences`, drawing from `next_random`.
    fn train<T: Tables>(
        &self,
        tables: &mut T,
        sentences: &[Vec<u32>],
        lr: Schedule,
        next_random: &mut u64,
    ) -> ClassicStats {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { self.train_avx2(tables, sentences, lr, next_random) };
        }
        self.train_body(tables, sentences, lr, next_random)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn train_avx2<T: Tables>(
        &self,
        tables: &mut T,
        sentences: &[Vec<u32>],
        lr: Schedule,
        next_random: &mut u64,
    ) -> ClassicStats {
        self.train_body(tables, sentences, lr, next_random)
    }

    #[inline(always)]
    fn train_body<T: Tables>(
        &self,
        tables: &mut T,
        sentences: &[Vec<u32>],
        (alpha0, words_done, total): Schedule,
        next_random_out: &mut u64,
    ) -> ClassicStats {
        let (dim, window, negative) = (self.dim, self.cfg.window, self.cfg.negatives);
        let mut stats = ClassicStats::default();
        let mut alpha = alpha0;
        let mut last_update = 0u64;
        let mut sen: Vec<u32> = Vec::with_capacity(1000);
        let mut neu1e = vec![0.0f32; dim];
        let mut next_random = *next_random_out;
        for sentence in sentences {
            for chunk in sentence.chunks(1000) {
                sen.clear();
                for &w in chunk {
                    stats.words += 1;
                    next_random = next_random.wrapping_mul(25_214_903_917).wrapping_add(11);
                    if self.keep[w as usize] < (next_random & 0xFFFF) as f32 / 65536.0 {
                        continue;
                    }
                    sen.push(w);
                }
                stats.kept += sen.len() as u64;
                if stats.words - last_update > 10_000 {
                    // The rate follows every thread's words, as in the C tool.
                    let new = stats.words - last_update;
                    last_update = stats.words;
                    let all = words_done.fetch_add(new, Relaxed) + new;
                    let progress = all as f32 / (total + 1) as f32;
                    alpha = (alpha0 * (1.0 - progress)).max(alpha0 * 1e-4);
                }
                for pos in 0..sen.len() {
                    let word = sen[pos] as usize;
                    next_random = next_random.wrapping_mul(25_214_903_917).wrapping_add(11);
                    let b = (next_random % window as u64) as usize;
                    for a in b..window * 2 + 1 - b {
                        if a == window {
                            continue;
                        }
                        let Some(c) = (pos + a).checked_sub(window) else {
                            continue;
                        };
                        if c >= sen.len() {
                            continue;
                        }
                        let l1 = sen[c] as usize * dim;
                        neu1e.fill(0.0);
                        for d in 0..=negative {
                            let (target, label) = if d == 0 {
                                (word, 1.0)
                            } else {
                                next_random =
                                    next_random.wrapping_mul(25_214_903_917).wrapping_add(11);
                                let t = self.unigram
                                    [((next_random >> 16) % TABLE_SIZE as u64) as usize]
                                    as usize;
                                if t == word {
                                    continue;
                                }
                                (t, 0.0)
                            };
                            let l2 = target * dim;
                            let f = tables.dot(l1, l2, dim);
                            let g = if f > MAX_EXP {
                                (label - 1.0) * alpha
                            } else if f < -MAX_EXP {
                                label * alpha
                            } else {
                                let i = ((f + MAX_EXP) * (EXP_TABLE_SIZE as f32 / MAX_EXP / 2.0))
                                    as usize;
                                (label - self.exp_table[i]) * alpha
                            };
                            tables.update_output(l1, l2, g, &mut neu1e);
                        }
                        tables.update_input(l1, &neu1e);
                    }
                }
            }
        }
        *next_random_out = next_random;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{self, CorpusConfig, Source};

    /// The clustered corpus, its sentences and a small model's settings.
    fn clustered() -> (corpus::Corpus, SgnsConfig) {
        let corpus = corpus::generate(
            &CorpusConfig {
                topics: 6,
                words_per_topic: 20,
                sentences: 3_000,
                ..CorpusConfig::default()
            },
            7,
        )
        .to_ids()
        .unwrap();
        let cfg = SgnsConfig {
            dim: 16,
            ..SgnsConfig::default()
        };
        (corpus, cfg)
    }

    /// Three epochs on `threads` threads (`None`: [`Classic::epoch`]); the
    /// share of same-cluster nearest neighbours and its chance level.
    fn train(
        corpus: &corpus::Corpus,
        cfg: SgnsConfig,
        threads: Option<usize>,
    ) -> (Classic, f64, f64) {
        let Source::Ids(sentences) = &corpus.source else {
            unreachable!()
        };
        let mut classic = Classic::new(&corpus.counts, cfg, 7);
        let total = 3 * corpus.tokens();
        let mut done = 0;
        for _ in 0..3 {
            let s = match threads {
                None => classic.epoch(sentences, 0.025, done, total),
                Some(t) => classic.epoch_hogwild(sentences, t, 0.025, done, total),
            };
            assert_eq!(s.words, corpus.tokens());
            assert!(s.kept < s.words && s.kept > s.words / 3, "{s:?}");
            done += s.words;
        }
        let table = embtable::EmbeddingTable::from_rows(corpus.vocab.len(), cfg.dim, &classic.syn0)
            .unwrap();
        let clusters = corpus.clusters.as_ref().unwrap();
        let (fraction, chance) = crate::sgns::cluster_fraction(&table, clusters, 10);
        (classic, fraction, chance)
    }

    /// The yardstick must itself learn, or its speed would mean nothing.
    #[test]
    fn classic_loop_recovers_clusters() {
        let (corpus, cfg) = clustered();
        let (_, fraction, chance) = train(&corpus, cfg, None);
        assert!(fraction > 0.8, "same-cluster {fraction} vs chance {chance}");
    }

    /// On one thread the Hogwild loop (atomic rows) is the classic loop.
    #[test]
    fn hogwild_on_one_thread_trains_as_the_classic_loop() {
        let (corpus, cfg) = clustered();
        let (plain, _, _) = train(&corpus, cfg, None);
        let (hogwild, _, _) = train(&corpus, cfg, Some(1));
        assert!(plain.syn0 == hogwild.syn0 && plain.syn1neg == hogwild.syn1neg);
        assert_eq!(plain.next_random, hogwild.next_random);
    }

    /// Two threads racing on the shared rows learn as well as one: the
    /// speed-up `--bench` reports is for the same quality.
    #[test]
    fn hogwild_on_two_threads_recovers_clusters_as_well() {
        let (corpus, cfg) = clustered();
        let (_, one, _) = train(&corpus, cfg, None);
        let (hogwild, two, chance) = train(&corpus, cfg, Some(2));
        assert!(
            two > 0.8 && two > one - 0.05,
            "same-cluster {two} on two threads, {one} on one, chance {chance}"
        );
        assert!(hogwild.syn0.iter().all(|x| x.is_finite()));
    }
}
