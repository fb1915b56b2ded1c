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

use crate::sgns::SgnsConfig;

const EXP_TABLE_SIZE: usize = 1000;
const MAX_EXP: f32 = 6.0;
const TABLE_SIZE: usize = 10_000_000;

/// The classic loop's model and state.
pub struct Classic {
    dim: usize,
    /// Input vectors, `words × dim`.
    pub syn0: Vec<f32>,
    syn1neg: Vec<f32>,
    unigram: Vec<u32>,
    exp_table: Vec<f32>,
    /// Keep probability of each word, as the C tool computes it.
    keep: Vec<f32>,
    cfg: SgnsConfig,
    next_random: u64,
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
            dim,
            syn0,
            syn1neg: vec![0.0; words * dim],
            unigram,
            exp_table,
            keep,
            cfg,
            next_random,
        }
    }

    /// One pass over `sentences` with learning rate `alpha0` decaying
    /// linearly over `total` words, `done` of which were trained before.
    pub fn epoch(
        &mut self,
        sentences: &[Vec<u32>],
        alpha0: f32,
        done: u64,
        total: u64,
    ) -> ClassicStats {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { self.epoch_avx2(sentences, alpha0, done, total) };
        }
        self.epoch_body(sentences, alpha0, done, total)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn epoch_avx2(
        &mut self,
        sentences: &[Vec<u32>],
        alpha0: f32,
        done: u64,
        total: u64,
    ) -> ClassicStats {
        self.epoch_body(sentences, alpha0, done, total)
    }

    #[inline(always)]
    fn epoch_body(
        &mut self,
        sentences: &[Vec<u32>],
        alpha0: f32,
        done: u64,
        total: u64,
    ) -> ClassicStats {
        let (dim, window, negative) = (self.dim, self.cfg.window, self.cfg.negatives);
        let mut stats = ClassicStats::default();
        let mut alpha = alpha0;
        let mut last_update = 0u64;
        let mut sen: Vec<u32> = Vec::with_capacity(1000);
        let mut neu1e = vec![0.0f32; dim];
        let mut next_random = self.next_random;
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
                    last_update = stats.words;
                    let progress = (done + stats.words) as f32 / (total + 1) as f32;
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
                            let syn0 = &self.syn0[l1..l1 + dim];
                            let syn1 = &mut self.syn1neg[l2..l2 + dim];
                            let mut f = 0.0f32;
                            for (x, y) in syn0.iter().zip(syn1.iter()) {
                                f += x * y;
                            }
                            let g = if f > MAX_EXP {
                                (label - 1.0) * alpha
                            } else if f < -MAX_EXP {
                                label * alpha
                            } else {
                                let i = ((f + MAX_EXP) * (EXP_TABLE_SIZE as f32 / MAX_EXP / 2.0))
                                    as usize;
                                (label - self.exp_table[i]) * alpha
                            };
                            for (e, y) in neu1e.iter_mut().zip(syn1.iter()) {
                                *e += g * y;
                            }
                            for (y, x) in syn1.iter_mut().zip(syn0) {
                                *y += g * x;
                            }
                        }
                        for (x, e) in self.syn0[l1..l1 + dim].iter_mut().zip(&neu1e) {
                            *x += e;
                        }
                    }
                }
            }
        }
        self.next_random = next_random;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{self, CorpusConfig, Source};

    /// The yardstick must itself learn, or its speed would mean nothing.
    #[test]
    fn classic_loop_recovers_clusters() {
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
        let Source::Ids(sentences) = &corpus.source else {
            unreachable!()
        };
        let cfg = SgnsConfig {
            dim: 16,
            ..SgnsConfig::default()
        };
        let mut classic = Classic::new(&corpus.counts, cfg, 7);
        let total = 3 * corpus.tokens();
        let mut done = 0;
        for _ in 0..3 {
            let s = classic.epoch(sentences, 0.025, done, total);
            assert_eq!(s.words, corpus.tokens());
            assert!(s.kept < s.words && s.kept > s.words / 3, "{s:?}");
            done += s.words;
        }
        let table =
            embtable::EmbeddingTable::from_rows(corpus.vocab.len(), 16, &classic.syn0).unwrap();
        let clusters = corpus.clusters.as_ref().unwrap();
        let (fraction, chance) = crate::sgns::cluster_fraction(&table, clusters, 10);
        assert!(fraction > 0.8, "same-cluster {fraction} vs chance {chance}");
    }
}
