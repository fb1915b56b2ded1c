//! Skip-gram with negative sampling (Mikolov et al., 2013), on two
//! embedding tables trained with sparse optimizer steps.
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
//! `dℓ/d out[t] = g · in[c]`. Frequent words are subsampled as in word2vec.
//!
//! # A step
//!
//! A step takes a batch of sentences and cuts it into `shards` runs of
//! about equal size. Each shard runs on a worker thread: it tokenises its
//! sentences, subsamples them, draws windows and negatives, and for every
//! pair reads the rows it needs in place from the two tables (no lookup
//! copies), computes the `1 + K` dot products and adds the gradients into
//! the shard's [`Accumulator`]s, one per table: one gradient row per
//! distinct word, so a shard's memory is bounded by the vocabulary and the
//! batch's pairs and per-pair gradients are never stored. Then each table
//! takes one optimizer step ([`SparseOptimizer::step_rows_finite`]) on the
//! words any shard touched: the thread that updates a word sums its
//! shards' rows right before the update, so no merged gradient is stored
//! and the words are shared among the threads.
//!
//! Every random draw of a sentence comes from a stream derived from
//! `(seed, epoch, sentence)`, and a word's rows are added in shard order,
//! so the vectors depend on the number of shards, never on the number of
//! threads that run them.

use embtable::kernels::{self, Kernel, Simd};
use embtable::{EmbeddingTable, Error, Init, Result, RowGradients, SparseOptimizer};
use rayon::prelude::*;
use std::time::Instant;

use crate::corpus::{Batch, Corpus, MAX_SENTENCE, Reader};
use crate::rng::Rng;
use crate::sampling::{Alias, Keep, Logistic};

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
    /// Parts of each batch trained in parallel, each into its own
    /// gradient (the result depends on this, not on the thread count).
    pub shards: usize,
}

impl Default for SgnsConfig {
    fn default() -> Self {
        SgnsConfig {
            dim: 64,
            window: 5,
            negatives: 5,
            subsample: 1e-3,
            shards: 1,
        }
    }
}

/// How the learning rate changes over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LrDecay {
    /// Constant.
    None,
    /// Falls linearly from `lr` to `lr · 10⁻⁴` over all epochs, as in
    /// word2vec (SGD only: Adagrad shrinks each word's steps itself).
    Linear,
}

impl LrDecay {
    /// The factor on the learning rate after `done` of `total` words.
    pub fn factor(self, done: u64, total: u64) -> f32 {
        match self {
            LrDecay::None => 1.0,
            LrDecay::Linear => (1.0 - done as f64 / total.max(1) as f64).max(1e-4) as f32,
        }
    }
}

/// The two tables, their optimizers and what sampling needs.
#[derive(Clone, Debug)]
pub struct Sgns<O> {
    /// Input (centre) vectors: the word vectors one keeps.
    pub input: EmbeddingTable,
    /// Output (context) vectors.
    pub output: EmbeddingTable,
    /// The optimizers of `input` and `output`.
    optimizers: [O; 2],
    /// Settings.
    pub cfg: SgnsConfig,
    negatives: Alias,
    keep: Keep,
    logistic: Logistic,
    shards: Vec<Shard>,
    /// Each table's rows of a step.
    rows: [Vec<usize>; 2],
    /// Each table's words of a step as bits, while its rows are listed.
    seen: [Vec<u64>; 2],
}

/// What training did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Sum of the pairs' losses.
    pub loss_sum: f64,
    /// (centre, context) pairs trained.
    pub pairs: u64,
    /// Vocabulary words read, before subsampling.
    pub words: u64,
    /// Words kept by subsampling (word2vec's "effective words").
    pub kept: u64,
    /// Wall seconds of the shards' phase (pairs, dot products, gradients).
    pub shard_secs: f64,
    /// Seconds the shards ran, summed over the shards: with `t` threads,
    /// `t · shard_secs − busy_secs` is the threads' time idle (or not
    /// scheduled) in that phase, waiting for the last shard.
    pub busy_secs: f64,
    /// Wall seconds of the second phase: the shards' rows summed and both
    /// tables' optimizer steps.
    pub merge_secs: f64,
}

impl std::ops::AddAssign for StepStats {
    fn add_assign(&mut self, o: StepStats) {
        self.loss_sum += o.loss_sum;
        self.pairs += o.pairs;
        self.words += o.words;
        self.kept += o.kept;
        self.shard_secs += o.shard_secs;
        self.busy_secs += o.busy_secs;
        self.merge_secs += o.merge_secs;
    }
}

/// Marks a word without a slot in [`Accumulator::slot_of`].
const NONE: u32 = u32::MAX;

/// Largest accumulator laid out by word (floats): 16 MiB.
const BY_WORD_MAX_FLOATS: usize = 1 << 22;

/// The gradient of one table from one shard: a row per distinct word
/// (`dim` floats each). When the last step touched at least half of the
/// table (as the output table's negatives do) and the table is small
/// enough, row `w` lies at slot `w`, so that the optimizer step, which
/// visits the words in ascending order, reads the rows in address order
/// too; otherwise the rows lie in order of first appearance, so that
/// memory follows the batch, not the vocabulary.
#[derive(Clone, Debug, Default)]
struct Accumulator {
    /// Slot of each word, or [`NONE`]: 4 bytes a word, reset row by row.
    slot_of: Vec<u32>,
    rows: Vec<u32>,
    grads: Vec<f32>,
    /// Whether row `w` lies at slot `w`.
    by_word: bool,
}

impl Accumulator {
    /// Empties the accumulator for a table of `words` rows of `dim`.
    fn reset(&mut self, words: usize, dim: usize) {
        if self.slot_of.len() == words {
            for &r in &self.rows {
                self.slot_of[r as usize] = NONE;
            }
        } else {
            self.slot_of = vec![NONE; words];
        }
        self.by_word = self.rows.len() * 2 >= words && words * dim <= BY_WORD_MAX_FLOATS;
        self.rows.clear();
        if self.by_word {
            // Rows are zeroed when first touched (stale values elsewhere).
            self.grads.resize(words * dim, 0.0);
        } else {
            self.grads.clear();
        }
    }

    /// The slot of `word`, a zero row added the first time.
    #[inline(always)]
    fn slot(&mut self, word: u32, dim: usize) -> usize {
        let slot = self.slot_of[word as usize];
        if slot != NONE {
            return slot as usize;
        }
        self.rows.push(word);
        let slot = if self.by_word {
            self.grads[word as usize * dim..][..dim].fill(0.0);
            word as usize
        } else {
            self.grads.resize(self.grads.len() + dim, 0.0);
            self.rows.len() - 1
        };
        self.slot_of[word as usize] = slot as u32;
        slot
    }
}

/// The gradient of one table summed over the shards, row by row, for
/// [`SparseOptimizer::step_rows_finite`]: each row is the sum of its
/// shards' rows in shard order, so it depends on the shards alone.
struct ShardSums<'a> {
    parts: &'a [&'a Accumulator],
    dim: usize,
}

impl ShardSums<'_> {
    /// The words of the parts, each once, in ascending order, so that the
    /// step reads and writes the table and its state in address order
    /// (`seen`: one bit per word, all clear before and after).
    fn rows(&self, seen: &mut Vec<u64>, rows: &mut Vec<usize>) {
        let words = self.parts.first().map_or(0, |p| p.slot_of.len());
        seen.resize(words.div_ceil(64), 0);
        for part in self.parts {
            for &w in &part.rows {
                seen[w as usize / 64] |= 1 << (w % 64);
            }
        }
        rows.clear();
        for (i, bits) in seen.iter_mut().enumerate() {
            let mut b = std::mem::take(bits);
            while b != 0 {
                rows.push(i * 64 + b.trailing_zeros() as usize);
                b &= b - 1;
            }
        }
    }
}

impl RowGradients for ShardSums<'_> {
    fn parts(&self) -> usize {
        self.parts.len()
    }

    #[inline]
    fn part(&self, row: usize, k: usize) -> Option<&[f32]> {
        let part = self.parts[k];
        let slot = part.slot_of[row];
        (slot != NONE).then(|| &part.grads[slot as usize * self.dim..][..self.dim])
    }

    /// The parts' rows of a word lie anywhere in their buffers: loading
    /// them a few words ahead halved the time of the sums.
    #[inline]
    fn prefetch(&self, row: usize) {
        for part in self.parts {
            let slot = part.slot_of[row];
            if slot != NONE {
                prefetch(&part.grads[slot as usize * self.dim..][..self.dim]);
            }
        }
    }
}

/// A worker's state, kept from step to step.
#[derive(Clone, Debug, Default)]
struct Shard {
    input: Accumulator,
    output: Accumulator,
    /// The current sentence, then its subsampled words.
    words: Vec<u32>,
    kept: Vec<u32>,
    /// A centre's targets (per context: the context, then the negatives)
    /// and their slots in `output`.
    targets: Vec<u32>,
    slots: Vec<u32>,
    /// A pair's gradient factors.
    g: Vec<f32>,
    text: String,
    stats: StepStats,
}

/// What every shard of a step reads.
struct Shared<'a> {
    corpus: &'a Corpus,
    batch: &'a Batch,
    input: &'a EmbeddingTable,
    output: &'a EmbeddingTable,
    cfg: SgnsConfig,
    negatives: &'a Alias,
    keep: &'a Keep,
    logistic: &'a Logistic,
    seed: u64,
    epoch: u64,
    /// Factor on every gradient (the linear decay of SGD's rate).
    scale: f32,
}

impl<O: SparseOptimizer + Send> Sgns<O> {
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
        let noise: Vec<f64> = corpus
            .counts
            .iter()
            .map(|&c| (c as f64).powf(0.75))
            .collect();
        Ok(Sgns {
            input,
            output,
            optimizers: [make(), make()],
            cfg,
            negatives: Alias::new(&noise),
            keep: Keep::new(&corpus.counts, cfg.subsample),
            logistic: Logistic::new(),
            shards: vec![Shard::default(); cfg.shards.max(1)],
            rows: Default::default(),
            seen: Default::default(),
        })
    }

    /// One pass over `corpus`, `batch` sentences a step. The learning rate
    /// follows `decay` over `total` words, of which `done` were trained
    /// before this pass; `progress` sees every step.
    ///
    /// # Errors
    /// Reading the corpus, and from the optimizers.
    #[allow(clippy::too_many_arguments)]
    pub fn train_epoch(
        &mut self,
        corpus: &Corpus,
        epoch: u64,
        batch: usize,
        seed: u64,
        (decay, done, total): (LrDecay, u64, u64),
        mut progress: impl FnMut(&StepStats),
    ) -> std::result::Result<StepStats, Box<dyn std::error::Error>> {
        let mut reader: Reader<'_> = corpus.reader()?;
        let mut sentences = Batch::default();
        let mut sum = StepStats::default();
        while reader.fill(&mut sentences, batch.max(1))? {
            let scale = decay.factor(done + sum.words, total);
            let stats = self.train_step(corpus, &sentences, seed, epoch, scale)?;
            sum += stats;
            progress(&stats);
        }
        Ok(sum)
    }

    /// One step on `batch`; its sentence `i` draws from the stream
    /// `(seed, epoch, batch.first + i)`. Gradients are multiplied by `scale`.
    ///
    /// # Errors
    /// [`Error::NonFinite`] if the step's loss is not (training diverged;
    /// nothing is written then); from the optimizers (a bug if it happens:
    /// every id comes from the corpus).
    pub fn train_step(
        &mut self,
        corpus: &Corpus,
        batch: &Batch,
        seed: u64,
        epoch: u64,
        scale: f32,
    ) -> Result<StepStats> {
        let mut stats = self.run_shards(corpus, batch, seed, epoch, scale);
        if !stats.loss_sum.is_finite() {
            return Err(diverged(stats.loss_sum));
        }
        let merge = Instant::now();
        self.step_tables()?;
        stats.merge_secs = merge.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// The shards' phase of a step: each shard's gradients, in parallel.
    fn run_shards(
        &mut self,
        corpus: &Corpus,
        batch: &Batch,
        seed: u64,
        epoch: u64,
        scale: f32,
    ) -> StepStats {
        let shared = Shared {
            corpus,
            batch,
            input: &self.input,
            output: &self.output,
            cfg: self.cfg,
            negatives: &self.negatives,
            keep: &self.keep,
            logistic: &self.logistic,
            seed,
            epoch,
            scale,
        };
        // Read once here: the workers must not each pick their own.
        let tier = kernels::current();
        let count = self.shards.len();
        let (in_rows, out_rows, dim) = (self.input.rows(), self.output.rows(), self.cfg.dim);
        let start = Instant::now();
        self.shards
            .par_iter_mut()
            .enumerate()
            .for_each(|(k, shard)| {
                let busy = Instant::now();
                shard.input.reset(in_rows, dim);
                shard.output.reset(out_rows, dim);
                shard.stats = StepStats::default();
                kernels::dispatch(
                    tier,
                    Train {
                        shard,
                        shared: &shared,
                        sentences: batch.shard(k, count),
                    },
                );
                shard.stats.busy_secs = busy.elapsed().as_secs_f64();
            });
        let mut stats = StepStats {
            shard_secs: start.elapsed().as_secs_f64(),
            ..StepStats::default()
        };
        for s in &self.shards {
            stats += s.stats;
        }
        stats
    }

    /// The second phase of a step: one optimizer step per table with the
    /// shards' gradients.
    fn step_tables(&mut self) -> Result<()> {
        let Sgns {
            input,
            output,
            optimizers: [in_opt, out_opt],
            cfg,
            shards,
            rows: [in_rows, out_rows],
            seen: [in_seen, out_seen],
            ..
        } = self;
        let parts_in: Vec<&Accumulator> = shards.iter().map(|s| &s.input).collect();
        let parts_out: Vec<&Accumulator> = shards.iter().map(|s| &s.output).collect();
        let sums_in = ShardSums {
            parts: &parts_in,
            dim: cfg.dim,
        };
        let sums_out = ShardSums {
            parts: &parts_out,
            dim: cfg.dim,
        };
        // Each table steps once with one row per word, the shards' rows
        // summed by the thread that updates the word (no merged copy, no
        // pass on one thread). The two tables' steps are independent: one
        // fork for both, whose threads share their rows.
        let (a, b) = rayon::join(
            || {
                sums_in.rows(in_seen, in_rows);
                in_opt.step_rows_finite(input, in_rows, &sums_in)
            },
            || {
                sums_out.rows(out_seen, out_rows);
                out_opt.step_rows_finite(output, out_rows, &sums_out)
            },
        );
        a.and(b)
    }
}

/// The error of a step whose loss is not finite: its scores overflowed.
/// Checked before the optimizer steps, which trust the gradient to be
/// finite: every gradient value is a score's `σ(s) − label` (in `[−1, 1]`)
/// times a row of the other table, so finite scores keep it finite short
/// of weights near `f32::MAX`.
fn diverged(loss: f64) -> Error {
    Error::NonFinite {
        what: "the loss of a step (training diverged: lower --lr)",
        position: 0,
        value: loss as f32,
    }
}

/// A shard's work on `sentences` of the batch, compiled for each kernel tier.
struct Train<'a> {
    shard: &'a mut Shard,
    shared: &'a Shared<'a>,
    sentences: std::ops::Range<usize>,
}

impl Kernel for Train<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let Train {
            shard,
            shared: sh,
            sentences,
        } = self;
        for i in sentences {
            let mut rng = Rng::derive(sh.seed, &[20, sh.epoch, sh.batch.first + i as u64]);
            sh.corpus
                .sentence(sh.batch, i, &mut shard.text, &mut shard.words);
            shard.stats.words += shard.words.len() as u64;
            for part in 0..shard.words.len().div_ceil(MAX_SENTENCE) {
                let end = ((part + 1) * MAX_SENTENCE).min(shard.words.len());
                shard.kept.clear();
                for k in part * MAX_SENTENCE..end {
                    let w = shard.words[k];
                    if sh.keep.keep(w, &mut rng) {
                        shard.kept.push(w);
                    }
                }
                shard.stats.kept += shard.kept.len() as u64;
                for centre in 0..shard.kept.len() {
                    shard.centre(s, sh, centre, &mut rng);
                }
            }
        }
    }
}

impl Shard {
    /// Trains the pairs of the subsampled word `kept[i]` with the words of
    /// a random window around it.
    #[inline(always)]
    fn centre<S: Simd>(&mut self, s: S, sh: &Shared<'_>, i: usize, rng: &mut Rng) {
        let (dim, k) = (sh.cfg.dim, sh.cfg.negatives);
        let radius = 1 + rng.below(sh.cfg.window);
        let lo = i.saturating_sub(radius);
        let hi = (i + radius + 1).min(self.kept.len());
        if hi - lo < 2 {
            return;
        }
        // Draw every target of this centre first and start loading their
        // rows, so that the misses overlap with each other and with the
        // arithmetic of the first pairs.
        self.targets.clear();
        self.slots.clear();
        for j in (lo..hi).filter(|&j| j != i) {
            let context = self.kept[j];
            self.targets.push(context);
            for _ in 0..k {
                let mut n = sh.negatives.sample(rng);
                if n == context {
                    n = sh.negatives.sample(rng);
                }
                self.targets.push(n);
            }
        }
        for &t in &self.targets {
            prefetch(sh.output.row(t as usize));
            self.slots.push(self.output.slot(t, dim) as u32);
        }
        let c = self.kept[i];
        let slot = self.input.slot(c, dim);
        let v = sh.input.row(c as usize);
        let grad_in = &mut self.input.grads[slot * dim..][..dim];
        let grad_out = &mut self.output.grads[..];
        self.g.resize(1 + k, 0.0);
        let mut loss = 0.0f32;
        for (targets, slots) in self
            .targets
            .chunks_exact(1 + k)
            .zip(self.slots.chunks_exact(1 + k))
        {
            // The scores first: independent dot products, overlapped.
            for (g, &t) in self.g.iter_mut().zip(targets) {
                *g = dot(s, v, sh.output.row(t as usize));
            }
            for (n, g) in self.g.iter_mut().enumerate() {
                let (sigma, softplus) = sh.logistic.eval(*g);
                if n == 0 {
                    // −log σ(s) = softplus(−s) = softplus(s) − s
                    loss += softplus - *g;
                    *g = (sigma - 1.0) * sh.scale;
                } else {
                    loss += softplus;
                    *g = sigma * sh.scale;
                }
            }
            for ((&g, &t), &slot) in self.g.iter().zip(targets).zip(slots) {
                let o = sh.output.row(t as usize);
                let gout = &mut grad_out[slot as usize * dim..][..dim];
                update(s, g, o, v, grad_in, gout);
            }
        }
        self.stats.pairs += (self.targets.len() / (1 + k)) as u64;
        self.stats.loss_sum += f64::from(loss);
    }
}

/// `Σ aᵢbᵢ` (equal lengths), in vectors of the tier, the lanes summed
/// pairwise at the end. One accumulator: the `1 + K` dot products of a pair
/// are independent, so the CPU overlaps their chains.
///
/// The loops run over `chunks_exact` of one vector, so the loads need no
/// bounds checks (indexing `a[i..]` per vector cost a third of the time).
#[inline(always)]
fn dot<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let whole = a.len() - a.len() % S::N;
    let ((a, a_tail), (b, b_tail)) = (a.split_at(whole), b.split_at(whole.min(b.len())));
    let mut acc = s.splat(0.0);
    for (x, y) in a.chunks_exact(S::N).zip(b.chunks_exact(S::N)) {
        acc = s.add(acc, s.mul(s.load(x), s.load(y)));
    }
    if !a_tail.is_empty() {
        acc = s.add(acc, s.mul(s.load_partial(a_tail), s.load_partial(b_tail)));
    }
    let mut lanes = [0.0f32; 16];
    s.store(acc, &mut lanes);
    let mut width = S::N;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

/// `grad_in += g·o` and `grad_out += g·v` in one pass (equal lengths): the
/// two gradient contributions of one target.
#[inline(always)]
fn update<S: Simd>(s: S, g: f32, o: &[f32], v: &[f32], grad_in: &mut [f32], grad_out: &mut [f32]) {
    let n = o.len();
    let whole = n - n % S::N;
    let (o, o_tail) = o.split_at(whole);
    let (v, v_tail) = v.split_at(whole);
    let (gi, gi_tail) = grad_in.split_at_mut(whole);
    let (go, go_tail) = grad_out.split_at_mut(whole);
    let gv = s.splat(g);
    let rows = o.chunks_exact(S::N).zip(v.chunks_exact(S::N));
    let grads = gi.chunks_exact_mut(S::N).zip(go.chunks_exact_mut(S::N));
    for ((o, v), (gi, go)) in rows.zip(grads) {
        s.store(s.add(s.load(gi), s.mul(gv, s.load(o))), gi);
        s.store(s.add(s.load(go), s.mul(gv, s.load(v))), go);
    }
    if !o_tail.is_empty() {
        let x = s.add(s.load_partial(gi_tail), s.mul(gv, s.load_partial(o_tail)));
        s.store_partial(x, gi_tail);
        let y = s.add(s.load_partial(go_tail), s.mul(gv, s.load_partial(v_tail)));
        s.store_partial(y, go_tail);
    }
}

/// Asks the CPU to start loading `row` into the caches: a step's target
/// rows are scattered over the output table, each a DRAM round trip
/// unless it is on its way before the dot products need it. Table rows
/// start on cache lines, so 16 floats apart is one prefetch a line.
#[inline(always)]
fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch is a hint that never faults, whatever the
        // address, and SSE is part of the x86-64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// [`dot`] on the given tier (for tests).
#[cfg(test)]
fn dot_on(tier: kernels::Tier, a: &[f32], b: &[f32]) -> f32 {
    struct Dot<'a>(&'a [f32], &'a [f32]);
    impl Kernel for Dot<'_> {
        type Output = f32;
        #[inline(always)]
        fn run<S: Simd>(self, s: S) -> f32 {
            dot(s, self.0, self.1)
        }
    }
    kernels::dispatch(tier, Dot(a, b))
}

/// [`update`] on the given tier (for tests).
#[cfg(test)]
fn update_on(tier: kernels::Tier, g: f32, o: &[f32], v: &[f32], gi: &mut [f32], go: &mut [f32]) {
    struct Update<'a>(f32, &'a [f32], &'a [f32], &'a mut [f32], &'a mut [f32]);
    impl Kernel for Update<'_> {
        type Output = ();
        #[inline(always)]
        fn run<S: Simd>(self, s: S) {
            update(s, self.0, self.1, self.2, self.3, self.4)
        }
    }
    kernels::dispatch(tier, Update(g, o, v, gi, go))
}

/// How well the vectors recover planted clusters: over every word that has
/// a cluster, the share of its `n` nearest neighbours from the same
/// cluster, and the share expected by chance (a random neighbour).
pub fn cluster_fraction(
    table: &EmbeddingTable,
    clusters: &[Option<usize>],
    n: usize,
) -> (f64, f64) {
    let words: Vec<usize> = (0..clusters.len())
        .filter(|&w| clusters[w].is_some())
        .collect();
    let rows = clusters.len();
    let (same, total, chance) = words
        .par_iter()
        .map(|&w| {
            // A word whose vector is all zeros has no direction, so no
            // neighbours: it counts as no hit.
            let near = table
                .most_similar_rows(table.row(w), n, &[w])
                .unwrap_or_default();
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

/// A word-pair similarity score for planted clusters: the probability that
/// a random pair of words from one cluster has a higher cosine similarity
/// than a random pair from two clusters (the area under the ROC curve of
/// ranking pairs by similarity; 0.5 is chance, 1 a perfect ranking).
/// `pairs` pairs of each kind are drawn from `seed`.
pub fn pair_auc(
    table: &EmbeddingTable,
    clusters: &[Option<usize>],
    pairs: usize,
    seed: u64,
) -> f64 {
    let words: Vec<usize> = (0..clusters.len())
        .filter(|&w| clusters[w].is_some())
        .collect();
    let mut rng = Rng::new(seed);
    let (mut same, mut different) = (Vec::new(), Vec::new());
    while (same.len() < pairs || different.len() < pairs) && words.len() > 1 {
        let a = words[rng.below(words.len())];
        let b = words[rng.below(words.len())];
        if a == b {
            continue;
        }
        let sim = table.cosine(a, b);
        if clusters[a] == clusters[b] {
            if same.len() < pairs {
                same.push(sim);
            }
        } else if different.len() < pairs {
            different.push(sim);
        }
    }
    // Mann–Whitney: for each same-cluster pair, count the different-cluster
    // pairs below it (ties count half).
    different.sort_by(f32::total_cmp);
    let wins: f64 = same
        .iter()
        .map(|&x| {
            let below = different.partition_point(|&d| d < x);
            let not_above = different.partition_point(|&d| d <= x);
            below as f64 + 0.5 * (not_above - below) as f64
        })
        .sum();
    wins / (same.len() * different.len()).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{self, CorpusConfig};
    use embtable::{Adagrad, AdagradConfig, Sgd, SgdConfig};

    fn adagrad() -> Adagrad {
        Adagrad::new(AdagradConfig {
            lr: 0.1,
            initial_accumulator_value: 0.0,
            ..AdagradConfig::torch()
        })
    }

    #[test]
    fn update_adds_both_contributions_on_every_tier() {
        for n in [0usize, 1, 7, 16, 17, 33, 100] {
            let o: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let start: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            for tier in kernels::Tier::available() {
                let (mut gi, mut go) = (start.clone(), start.clone());
                update_on(tier, 0.25, &o, &v, &mut gi, &mut go);
                for l in 0..n {
                    assert_eq!(gi[l], start[l] + 0.25 * o[l], "{tier} n {n}");
                    assert_eq!(go[l], start[l] + 0.25 * v[l], "{tier} n {n}");
                }
            }
        }
    }

    #[test]
    fn dot_is_the_same_on_every_tier_and_close_to_f64() {
        for n in [0usize, 1, 7, 15, 16, 17, 31, 33, 64, 100, 129] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            for tier in kernels::Tier::available() {
                let d = dot_on(tier, &a, &b);
                assert!(
                    (f64::from(d) - exact).abs() < 1e-4,
                    "{tier} n {n}: {d} vs {exact}"
                );
            }
        }
    }

    /// A step equals the gradient computed pair by pair in plain loops:
    /// the accumulators and their hand-over to the optimizer lose nothing.
    #[test]
    fn a_step_applies_the_pairwise_gradient() {
        let sentences = vec![vec![0u32, 1, 2, 3, 1, 0, 4], vec![2, 2, 3], vec![4, 1]];
        let words: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
        let corpus = corpus::Corpus::from_sentences(&words, &sentences, 1);
        // Ids renumbered by count.
        let corpus::Source::Ids(sentences) = &corpus.source else {
            unreachable!()
        };
        let cfg = SgnsConfig {
            dim: 19,
            window: 2,
            negatives: 3,
            subsample: 0.0,
            shards: 1,
        };
        let sgd = || {
            Sgd::new(SgdConfig {
                lr: 0.5,
                ..SgdConfig::default()
            })
        };
        for shards in [1, 2, 3] {
            let cfg = SgnsConfig { shards, ..cfg };
            let mut model = Sgns::new(&corpus, cfg, sgd, 5).unwrap();
            // Make the output table non-zero so that every term matters.
            let mut warm = Sgns::new(&corpus, cfg, sgd, 5).unwrap();
            warm.train_epoch(&corpus, 9, 2, 1, (LrDecay::None, 0, 1), |_| {})
                .unwrap();
            model.output = warm.output.clone();
            let (w_in, w_out) = (model.input.to_vec(), model.output.to_vec());

            // The same pairs, replayed from the same streams.
            let mut reader = corpus.reader().unwrap();
            let mut batch = Batch::default();
            assert!(reader.fill(&mut batch, 10).unwrap());
            let d = cfg.dim;
            let (mut g_in, mut g_out) = (vec![0f64; w_in.len()], vec![0f64; w_out.len()]);
            let logistic = Logistic::new();
            for (i, s) in sentences.iter().enumerate() {
                let s: &[u32] = s;
                let mut rng = Rng::derive(3, &[20, 0, i as u64]);
                // subsample 0 keeps all, but the coin is still drawn.
                let kept: Vec<u32> = s
                    .iter()
                    .copied()
                    .filter(|&w| model.keep.keep(w, &mut rng))
                    .collect();
                for c in 0..kept.len() {
                    let radius = 1 + rng.below(cfg.window);
                    let (lo, hi) = (c.saturating_sub(radius), (c + radius + 1).min(kept.len()));
                    if hi - lo < 2 {
                        continue;
                    }
                    let mut targets = Vec::new();
                    for j in (lo..hi).filter(|&j| j != c) {
                        targets.push(kept[j]);
                        for _ in 0..cfg.negatives {
                            let mut n = model.negatives.sample(&mut rng);
                            if n == kept[j] {
                                n = model.negatives.sample(&mut rng);
                            }
                            targets.push(n);
                        }
                    }
                    let v = &w_in[kept[c] as usize * d..][..d];
                    for (t, &o) in targets.iter().enumerate() {
                        let out = &w_out[o as usize * d..][..d];
                        let score: f32 = v.iter().zip(out).map(|(x, y)| x * y).sum();
                        let sigma = logistic.eval(score).0;
                        let g = f64::from(if t % (1 + cfg.negatives) == 0 {
                            sigma - 1.0
                        } else {
                            sigma
                        });
                        for l in 0..d {
                            g_in[kept[c] as usize * d + l] += g * f64::from(out[l]);
                            g_out[o as usize * d + l] += g * f64::from(v[l]);
                        }
                    }
                }
            }
            let stats = model.train_step(&corpus, &batch, 3, 0, 1.0).unwrap();
            assert!(stats.pairs > 10);
            assert_eq!(stats.words, 12);
            let check = |after: Vec<f32>, before: &[f32], grad: &[f64]| {
                for ((a, b), g) in after.iter().zip(before).zip(grad) {
                    let expected = f64::from(*b) - 0.5 * g;
                    assert!(
                        (f64::from(*a) - expected).abs() < 1e-4,
                        "{shards} shards: {a} vs {expected}"
                    );
                }
            };
            check(model.input.to_vec(), &w_in, &g_in);
            check(model.output.to_vec(), &w_out, &g_out);
        }
    }

    /// Panics naming the first value whose bits differ.
    fn assert_same_bits(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
            panic!("{what}: value {i} is {} against {}", a[i], b[i]);
        }
    }

    /// The second phase as it was before `step_rows_finite`, kept as the
    /// reference: the later shards' rows added into the first shard's, row
    /// by row in shard order (a word new to the first shard gets a zero
    /// row first), then one `step_lookup` per table.
    fn merge_then_step_lookup<O: SparseOptimizer + Send>(m: &mut Sgns<O>) -> Result<()> {
        let merged = |parts: Vec<&Accumulator>| {
            let dim = m.cfg.dim;
            fn row(part: &Accumulator, w: u32, dim: usize) -> &[f32] {
                &part.grads[part.slot_of[w as usize] as usize * dim..][..dim]
            }
            let mut ids = parts[0].rows.clone();
            let mut grads: Vec<f32> = ids
                .iter()
                .flat_map(|&w| row(parts[0], w, dim))
                .copied()
                .collect();
            let mut slot_of = vec![NONE; parts[0].slot_of.len()];
            for (i, &w) in ids.iter().enumerate() {
                slot_of[w as usize] = i as u32;
            }
            for part in &parts[1..] {
                for &w in &part.rows {
                    if slot_of[w as usize] == NONE {
                        slot_of[w as usize] = ids.len() as u32;
                        ids.push(w);
                        grads.resize(grads.len() + dim, 0.0);
                    }
                    let slot = slot_of[w as usize] as usize;
                    let sum = &mut grads[slot * dim..][..dim];
                    for (s, g) in sum.iter_mut().zip(row(part, w, dim)) {
                        *s += g;
                    }
                }
            }
            (ids, grads)
        };
        let (in_ids, in_grads) = merged(m.shards.iter().map(|s| &s.input).collect());
        let (out_ids, out_grads) = merged(m.shards.iter().map(|s| &s.output).collect());
        let [in_opt, out_opt] = &mut m.optimizers;
        in_opt.step_lookup(&mut m.input, &in_ids, &in_grads)?;
        out_opt.step_lookup(&mut m.output, &out_ids, &out_grads)
    }

    /// Summing each word's shard rows on the thread that updates it gives
    /// bit for bit the tables and optimizer state of merging the shards'
    /// rows into the first shard's and stepping with `step_lookup`, for
    /// Adagrad and SGD on 1 to 3 shards.
    #[test]
    fn the_row_step_equals_merging_shards_then_step_lookup() {
        let corpus = corpus::generate(
            &CorpusConfig {
                topics: 3,
                words_per_topic: 10,
                sentences: 160,
                ..CorpusConfig::default()
            },
            1,
        );
        fn check<O: SparseOptimizer + Send + Clone>(corpus: &Corpus, make: impl Fn() -> O) {
            for shards in [1, 2, 3] {
                let cfg = SgnsConfig {
                    dim: 19,
                    shards,
                    ..SgnsConfig::default()
                };
                let mut model = Sgns::new(corpus, cfg, &make, 1).unwrap();
                let mut reference = model.clone();
                let mut reader = corpus.reader().unwrap();
                let mut batch = Batch::default();
                let mut steps = 0;
                while reader.fill(&mut batch, 24).unwrap() {
                    model.train_step(corpus, &batch, 1, 0, 0.5).unwrap();
                    reference.run_shards(corpus, &batch, 1, 0, 0.5);
                    merge_then_step_lookup(&mut reference).unwrap();
                    steps += 1;
                }
                assert!(steps > 5);
                // The first step lays the rows out by first appearance,
                // the later ones the output table's by word: both checked.
                assert!(model.shards.iter().all(|s| s.output.by_word));
                let what = format!("{shards} shards");
                let (m, r) = (&model, &reference);
                assert_same_bits(
                    &m.input.to_vec(),
                    &r.input.to_vec(),
                    &format!("{what}: input"),
                );
                assert_same_bits(
                    &m.output.to_vec(),
                    &r.output.to_vec(),
                    &format!("{what}: output"),
                );
                for (a, b) in model.optimizers.iter().zip(&reference.optimizers) {
                    let (a, b) = (a.state(), b.state());
                    assert_eq!(a.steps, b.steps, "{what}");
                    for (x, y) in a.arrays.iter().zip(&b.arrays) {
                        assert_same_bits(&x.values, &y.values, &format!("{what}: {}", x.name));
                    }
                }
            }
        }
        check(&corpus, adagrad);
        check(&corpus, || {
            Sgd::new(SgdConfig {
                lr: 0.05,
                ..SgdConfig::default()
            })
        });
    }

    /// A run that diverges stops with an error at the first step whose
    /// loss is not finite, before that step writes anything.
    #[test]
    fn a_diverging_step_is_refused_before_it_writes() {
        let corpus = corpus::generate(
            &CorpusConfig {
                topics: 3,
                words_per_topic: 10,
                sentences: 400,
                ..CorpusConfig::default()
            },
            1,
        );
        let cfg = SgnsConfig {
            dim: 8,
            shards: 2,
            ..SgnsConfig::default()
        };
        let sgd = || {
            Sgd::new(SgdConfig {
                lr: 1e30,
                ..SgdConfig::default()
            })
        };
        let mut model = Sgns::new(&corpus, cfg, sgd, 1).unwrap();
        let mut reader = corpus.reader().unwrap();
        let mut batch = Batch::default();
        while reader.fill(&mut batch, 8).unwrap() {
            let before = (model.input.to_vec(), model.output.to_vec());
            match model.train_step(&corpus, &batch, 1, 0, 1.0) {
                Ok(stats) => assert!(stats.loss_sum.is_finite()),
                Err(e) => {
                    assert!(e.to_string().contains("training diverged"), "{e}");
                    assert_same_bits(&model.input.to_vec(), &before.0, "input");
                    assert_same_bits(&model.output.to_vec(), &before.1, "output");
                    return;
                }
            }
        }
        panic!("a learning rate of 1e30 did not diverge");
    }

    /// The same seed and shards give the same vectors whatever the thread count.
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
            shards: 3,
            ..SgnsConfig::default()
        };
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let mut m = Sgns::new(&corpus, cfg, adagrad, 1).unwrap();
                    m.train_epoch(&corpus, 0, 16, 1, (LrDecay::None, 0, 1), |_| {})
                        .unwrap();
                    m.input.to_vec()
                })
        };
        assert_eq!(run(1), run(2));
    }

    #[test]
    fn linear_decay_falls_to_a_floor() {
        assert_eq!(LrDecay::None.factor(5, 10), 1.0);
        assert_eq!(LrDecay::Linear.factor(0, 10), 1.0);
        assert_eq!(LrDecay::Linear.factor(5, 10), 0.5);
        assert_eq!(LrDecay::Linear.factor(10, 10), 1e-4);
        assert_eq!(LrDecay::Linear.factor(12, 10), 1e-4);
    }

    #[test]
    fn pair_auc_ranks_clustered_vectors_above_random_ones() {
        // Two clusters on two axes, and the same words at random.
        let clusters: Vec<Option<usize>> = (0..40).map(|w| Some(w % 2)).collect();
        let planted: Vec<f32> = (0..40)
            .flat_map(|w| {
                let x = 1.0 + (w as f32 * 0.1).sin() * 0.2;
                if w % 2 == 0 { [x, 0.1] } else { [0.1, x] }
            })
            .collect();
        let table = EmbeddingTable::from_rows(40, 2, &planted).unwrap();
        assert_eq!(pair_auc(&table, &clusters, 500, 1), 1.0);
        let random = EmbeddingTable::new(
            40,
            2,
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
            3,
        )
        .unwrap();
        let auc = pair_auc(&random, &clusters, 2000, 1);
        assert!((0.4..0.6).contains(&auc), "{auc}");
    }
}
