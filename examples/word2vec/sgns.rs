//! Skip-gram with negative sampling (Mikolov et al., 2013), on two
//! embedding tables trained with sparse updates.
//!
//! For every word `c` of a sentence and every context word `o` within a
//! random window of `1..=window` words around it, the model scores the pair
//! with `s = in[c] · out[o]` and `K` negatives `n_k` drawn from the unigram
//! distribution raised to the 3/4 power:
//!
//! ```text
//! ℓ = −log σ(in[c] · out[o]) − Σ_k log σ(−in[c] · out[n_k])
//! ```
//!
//! With `g = σ(s) − label` (label 1 for `o`, 0 for the negatives), the
//! gradients are `dℓ/d in[c] = Σ g · out[t]` over the `1 + K` targets and
//! `dℓ/d out[t] = g · in[c]`. Frequent words are subsampled as in word2vec:
//! a word of frequency `f` is kept with probability `(√(f/t) + 1) · t/f`.
//!
//! A step takes a batch of sentences: the pairs are drawn in parallel (one
//! random stream per sentence, so the result does not depend on the thread
//! count), both tables are looked up once for the whole batch
//! (`forward`), the gradients are computed in parallel over pairs,
//! accumulated with `backward` (rows repeated across the batch are summed
//! by the layer) and applied with one `step` per table.

use embtable::{Embedding, EmbeddingTable, Init, Result, SparseOptimizer};
use rayon::prelude::*;

use crate::corpus::Corpus;
use crate::rng::{Rng, Weighted};

/// Settings of skip-gram training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgnsConfig {
    /// Vector dimension.
    pub dim: usize,
    /// Largest window radius (each centre draws its radius from `1..=window`).
    pub window: usize,
    /// Negatives per (centre, context) pair.
    pub negatives: usize,
    /// Subsampling threshold `t` (0: keep every word).
    pub subsample: f64,
}

impl Default for SgnsConfig {
    fn default() -> Self {
        SgnsConfig {
            dim: 64,
            window: 5,
            negatives: 5,
            subsample: 1e-3,
        }
    }
}

/// The two tables and what sampling needs.
#[derive(Clone, Debug)]
pub struct Sgns<O> {
    /// Input (centre) vectors: the word vectors one keeps.
    pub input: Embedding<O>,
    /// Output (context) vectors.
    pub output: Embedding<O>,
    /// Settings.
    pub cfg: SgnsConfig,
    noise: Weighted,
    keep: Vec<f64>,
    scratch: Scratch,
}

/// Buffers reused from step to step.
#[derive(Clone, Debug, Default)]
struct Scratch {
    centres: Vec<u32>,
    targets: Vec<u32>,
    in_rows: Vec<f32>,
    out_rows: Vec<f32>,
    grad_in: Vec<f32>,
    grad_out: Vec<f32>,
}

/// What one step did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Sum of the pairs' losses.
    pub loss_sum: f64,
    /// (centre, context) pairs trained.
    pub pairs: usize,
    /// Words of the batch before subsampling.
    pub words: usize,
}

/// `σ(x)`, stable for large `|x|`.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `−log σ(x)`, stable for large `|x|`.
fn neg_log_sigmoid(x: f32) -> f32 {
    (-x).max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `Σ a_i b_i` in eight lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = a.len() / 8 * 8;
    for (x, y) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

impl<O: SparseOptimizer + Send + Sync> Sgns<O> {
    /// Fresh tables for `corpus`: input vectors uniform in `±0.5/dim` (as
    /// word2vec), output vectors zero.
    ///
    /// # Errors
    /// As [`EmbeddingTable::new`].
    pub fn new(corpus: &Corpus, cfg: SgnsConfig, make: impl Fn() -> O, seed: u64) -> Result<Self> {
        let words = corpus.vocab.len();
        let half = 0.5 / cfg.dim as f32;
        let input = EmbeddingTable::new(
            words,
            cfg.dim,
            Init::Uniform {
                low: -half,
                high: half,
            },
            seed,
        )?;
        let output = EmbeddingTable::new(words, cfg.dim, Init::Zeros, seed)?;
        let total: u64 = corpus.counts.iter().sum();
        let keep = corpus
            .counts
            .iter()
            .map(|&c| {
                let f = c as f64 / total as f64;
                if cfg.subsample > 0.0 {
                    (((f / cfg.subsample).sqrt() + 1.0) * cfg.subsample / f).min(1.0)
                } else {
                    1.0
                }
            })
            .collect();
        Ok(Sgns {
            input: Embedding::new(input, make()),
            output: Embedding::new(output, make()),
            cfg,
            noise: Weighted::new(corpus.counts.iter().map(|&c| (c as f64).powf(0.75))),
            keep,
            scratch: Scratch::default(),
        })
    }

    /// The (centre, context) pairs and negatives of one sentence, drawn
    /// from `rng`: centres, and `1 + K` targets per pair (context first).
    fn pairs(&self, sentence: &[u32], rng: &mut Rng) -> (Vec<u32>, Vec<u32>) {
        let kept: Vec<u32> = sentence
            .iter()
            .copied()
            .filter(|&w| rng.f64() < self.keep[w as usize])
            .collect();
        let (mut centres, mut targets) = (Vec::new(), Vec::new());
        for (i, &c) in kept.iter().enumerate() {
            let radius = 1 + rng.below(self.cfg.window.max(1));
            let lo = i.saturating_sub(radius);
            let hi = (i + radius + 1).min(kept.len());
            for (j, &o) in kept.iter().enumerate().take(hi).skip(lo) {
                if j == i {
                    continue;
                }
                centres.push(c);
                targets.push(o);
                for _ in 0..self.cfg.negatives {
                    let mut n = self.noise.sample(rng) as u32;
                    if n == o {
                        n = self.noise.sample(rng) as u32;
                    }
                    targets.push(n);
                }
            }
        }
        (centres, targets)
    }

    /// One step on `sentences`; sentence `i` of the batch draws from the
    /// stream `(seed, epoch, first + i)`.
    ///
    /// # Errors
    /// From the layers (a bug if it happens: every id comes from the corpus).
    pub fn train_batch(
        &mut self,
        sentences: &[&[u32]],
        seed: u64,
        epoch: u64,
        first: usize,
    ) -> Result<StepStats> {
        let (d, k) = (self.cfg.dim, self.cfg.negatives);
        let per_sentence: Vec<(Vec<u32>, Vec<u32>)> = sentences
            .par_iter()
            .enumerate()
            .map(|(i, s)| self.pairs(s, &mut Rng::derive(seed, &[20, epoch, (first + i) as u64])))
            .collect();
        let s = &mut self.scratch;
        s.centres.clear();
        s.targets.clear();
        for (c, t) in &per_sentence {
            s.centres.extend_from_slice(c);
            s.targets.extend_from_slice(t);
        }
        let words = sentences.iter().map(|s| s.len()).sum();
        if s.centres.is_empty() {
            return Ok(StepStats {
                words,
                ..StepStats::default()
            });
        }

        // Forward: one lookup per table for the whole batch.
        s.in_rows.resize(s.centres.len() * d, 0.0);
        s.out_rows.resize(s.targets.len() * d, 0.0);
        self.input.forward_into(&s.centres, &mut s.in_rows)?;
        self.output.forward_into(&s.targets, &mut s.out_rows)?;

        // Gradients by hand, in parallel over pairs.
        s.grad_in.clear();
        s.grad_in.resize(s.in_rows.len(), 0.0);
        s.grad_out.resize(s.out_rows.len(), 0.0);
        let loss_sum: f64 = s
            .grad_in
            .par_chunks_mut(d)
            .zip(s.grad_out.par_chunks_mut((1 + k) * d))
            .zip(
                s.in_rows
                    .par_chunks(d)
                    .zip(s.out_rows.par_chunks((1 + k) * d)),
            )
            .with_min_len(256)
            .map(|((gi, go), (v, outs))| {
                let mut loss = 0.0f32;
                for (t, (o, go)) in outs.chunks_exact(d).zip(go.chunks_exact_mut(d)).enumerate() {
                    let s = dot(v, o);
                    let (label, signed) = if t == 0 { (1.0, s) } else { (0.0, -s) };
                    loss += neg_log_sigmoid(signed);
                    let g = sigmoid(s) - label;
                    for l in 0..d {
                        gi[l] += g * o[l];
                        go[l] = g * v[l];
                    }
                }
                f64::from(loss)
            })
            .sum();

        // Backward and one step per table.
        self.input.backward(&s.centres, &s.grad_in)?;
        self.output.backward(&s.targets, &s.grad_out)?;
        self.input.step()?;
        self.output.step()?;
        let pairs = s.centres.len();
        Ok(StepStats {
            loss_sum,
            pairs,
            words,
        })
    }
}

/// The rows of `table` scaled to unit length (zero rows stay zero), row-major.
pub fn normalized(table: &EmbeddingTable) -> Vec<f32> {
    let mut out = Vec::with_capacity(table.rows() * table.dim());
    for r in 0..table.rows() {
        let row = table.row(r);
        let norm = dot(row, row).sqrt();
        let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        out.extend(row.iter().map(|x| x * inv));
    }
    out
}

/// The `n` nearest words of `word` by cosine similarity, best first,
/// `word` itself left out; `unit` is [`normalized`] of the table.
pub fn nearest(unit: &[f32], dim: usize, word: usize, n: usize) -> Vec<(usize, f32)> {
    let q = &unit[word * dim..][..dim];
    let mut sims: Vec<(usize, f32)> = unit
        .chunks_exact(dim)
        .enumerate()
        .filter(|&(r, _)| r != word)
        .map(|(r, row)| (r, dot(q, row)))
        .collect();
    sims.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    sims.truncate(n);
    sims
}

/// How well the vectors recover planted clusters: over every word that has
/// a cluster, the share of its `n` nearest neighbours from the same
/// cluster, and the share expected by chance (a random neighbour).
pub fn cluster_fraction(
    table: &EmbeddingTable,
    clusters: &[Option<usize>],
    n: usize,
) -> (f64, f64) {
    let unit = normalized(table);
    let words: Vec<usize> = (0..clusters.len())
        .filter(|&w| clusters[w].is_some())
        .collect();
    let rows = clusters.len();
    let (same, total, chance) = words
        .par_iter()
        .map(|&w| {
            let near = nearest(&unit, table.dim(), w, n);
            let same = near
                .iter()
                .filter(|(o, _)| clusters[*o] == clusters[w])
                .count();
            let size = clusters.iter().filter(|c| **c == clusters[w]).count();
            (
                same,
                near.len(),
                (size - 1) as f64 / (rows - 1).max(1) as f64,
            )
        })
        .reduce(|| (0, 0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    (
        same as f64 / total.max(1) as f64,
        chance / words.len().max(1) as f64,
    )
}
