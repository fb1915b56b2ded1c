//! A two-tower retrieval model whose only parameters are embedding tables,
//! trained against sampled negatives shared by the batch.
//!
//! * **User tower**: the mean of the item embeddings of the user's recent
//!   history (a pooled lookup, [`Pooling::Mean`]) plus a user-id embedding:
//!   `u = mean(E[h₁..h_L]) + U[user]`.
//! * **Item tower**: the candidate's row of the *same* item table `E`.
//! * **Score**: `s(user, item) = u · E[item]`.
//! * **Negatives**: `K` items drawn uniformly per batch and shared by all of
//!   its examples (a negative equal to an example's positive is skipped for
//!   that example), so a batch looks up `batch + K` candidate rows and the
//!   scores are one matrix product ([`dense`](crate::dense)).
//! * **Loss** per example, with `s⁺ = u · E[pos]` and `s_k = u · E[n_k]`:
//!   - sampled softmax (default): `ℓ = −s⁺ + log(e^{s⁺} + Σ_k e^{s_k})`.
//!     Uniform sampling needs no log-Q correction (every logit would get
//!     the same shift).
//!   - BPR: `ℓ = (1/K) Σ_k −log σ(s⁺ − s_k)`.
//!
//! The gradients are written out by hand. Both losses give `dℓ/ds⁺ = g₀`
//! and `dℓ/ds_k = p_k`: softmax `p = softmax(s⁺, s_1..s_K)`,
//! `g₀ = p₀ − 1`; BPR `p_k = (1 − σ(s⁺ − s_k)) / K`, `g₀ = −Σ_k p_k`. Then
//!
//! ```text
//! dℓ/du      = g₀ E[pos] + Σ_k p_k E[n_k]      (batch: G_U = g₀ ∘ E[pos] + P · N)
//! dℓ/dE[pos] = g₀ u
//! dℓ/dE[n_k] = Σ_examples p_k u                (batch: G_N = Pᵀ · U)
//! ```
//!
//! and `dℓ/du` flows unchanged to the user row and, through the mean, to
//! every history row (the layer's `backward_pooled` divides by the bag
//! length). The item table therefore gets two backward passes per batch,
//! one pooled (history) and one plain (positives and negatives), that add
//! up into one sparse gradient before its single `step()`: the layer
//! coalesces the rows both passes touch. The loss is summed over the batch
//! (each example contributes its own gradient, as in word2vec).
//!
//! Training examples are the positions of the users' training sequences:
//! the item at position `t` is the positive, the (up to) `L` items before
//! it are the history. Evaluation scores every item against the user vector
//! built from the last `L` training items.

use embtable::{
    Bags, Embedding, EmbeddingLayer, EmbeddingOptions, EmbeddingTable, Init, Pooling, Result,
    SparseOptimizer,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::data::{Dataset, Split};
use crate::dense::Layout::{RowMajor, Transposed};
use crate::dense::{matmul, transpose};
use crate::rng::{Rng, Weighted};

/// The training loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Softmax over the positive and the sampled negatives.
    Softmax,
    /// Bayesian personalised ranking, averaged over the negatives.
    Bpr,
}

/// Shape and training settings of the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    /// Embedding dimension.
    pub dim: usize,
    /// History items pooled into the user vector (the most recent `L`).
    pub history: usize,
    /// Negatives sampled per batch, shared by its examples.
    pub negatives: usize,
    /// The loss.
    pub loss: Loss,
    /// Weight of a history item relative to the next more recent one (1:
    /// the plain mean; below 1: recent items count more, through the bags'
    /// per-sample weights).
    pub recency: f32,
    /// Standard deviation of the initial user-id embeddings (0: zeros, so
    /// the history alone speaks at first).
    pub user_init_std: f32,
    /// Negatives are drawn with probability proportional to
    /// `(training count + 1)^power`: 0 is uniform, 1 follows popularity.
    pub negative_power: f64,
    /// Standard deviation of the initial embeddings (normal, mean 0).
    pub init_std: f32,
    /// Rows of both tables are rescaled to at most this L2 norm after each
    /// step (the layer's `max_norm` option), which keeps rare items from
    /// being pushed far out by a few examples.
    pub max_norm: Option<f32>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dim: 32,
            history: 20,
            negatives: 256,
            loss: Loss::Softmax,
            negative_power: 0.0,
            recency: 1.0,
            user_init_std: 0.1,
            init_std: 0.1,
            max_norm: None,
        }
    }
}

/// What the model needs of its two embedding layers: embtable's
/// [`EmbeddingLayer`] calls to train, read-only lookups by id to evaluate,
/// and a copy of the weights to keep the best epoch's. Implemented by the
/// fixed [`Embedding`] (an id is a row) and by the recommender's `Hashed`
/// (an id is hashed to a key of a dynamic table, which has no vocabulary).
pub trait Tower: EmbeddingLayer + Clone + Send + Sync {
    /// What [`snapshot`](Self::snapshot) keeps.
    type Snapshot: Clone + Send + Sync;
    /// The rows of `ids` into `out` (`ids.len() × dim`), changing nothing.
    fn read(&self, ids: &[u32], out: &mut [f32]);
    /// The mean of each bag's rows (`bags.len() × dim`), changing nothing.
    fn read_mean(&self, bags: &Bags<'_, u32>) -> Vec<f32>;
    /// The weights as they are now.
    fn snapshot(&self) -> Self::Snapshot;
    /// Puts back weights from [`snapshot`](Self::snapshot), to evaluate
    /// them (training need not go on from there).
    fn restore(&mut self, snapshot: Self::Snapshot);
    /// A line about the table worth printing, if any.
    fn summary(&self) -> Option<String> {
        None
    }
}

impl<O: SparseOptimizer + Clone + Send + Sync> Tower for Embedding<O> {
    type Snapshot = EmbeddingTable;

    fn read(&self, ids: &[u32], out: &mut [f32]) {
        self.table()
            .lookup(ids, out)
            .expect("ids come from the data set, which sized the table");
    }

    fn read_mean(&self, bags: &Bags<'_, u32>) -> Vec<f32> {
        self.table()
            .pooled_lookup_vec(bags, Pooling::Mean)
            .expect("ids come from the data set, which sized the table")
    }

    fn snapshot(&self) -> EmbeddingTable {
        self.table().clone()
    }

    fn restore(&mut self, table: EmbeddingTable) {
        *self.table_mut() = table;
    }
}

/// The model: an item table shared by the history and the candidates, and
/// a user-id table, each in an embedding layer (a [`Tower`]) with its own
/// optimizer.
#[derive(Clone, Debug)]
pub struct Model<L> {
    /// Item embeddings `E` (a row per item).
    pub items: L,
    /// User-id embeddings `U` (a row per user).
    pub users: L,
    /// Settings.
    pub cfg: ModelConfig,
    negatives: Negatives,
    ids: StepIds,
    rows: StepRows,
}

/// The distribution negatives are drawn from, and `log q` of every item
/// for the softmax's correction (`s − log q`: sampled softmax then
/// estimates the full softmax whatever the proposal).
#[derive(Clone, Debug)]
pub struct Negatives {
    sampler: Weighted,
    log_q: Vec<f32>,
}

impl Negatives {
    /// Negatives for `data`, drawn ∝ `(training count + 1)^power`.
    pub fn new(data: &Dataset, power: f64) -> Self {
        let weights: Vec<f64> = data
            .item_counts(Split::Validation)
            .iter()
            .map(|&c| (f64::from(c) + 1.0).powf(power))
            .collect();
        let total: f64 = weights.iter().sum();
        Negatives {
            sampler: Weighted::new(weights.iter().copied()),
            log_q: weights.iter().map(|w| (w / total).ln() as f32).collect(),
        }
    }
}

/// The ids of one step, reused from batch to batch: what the model looks
/// up, whatever holds its tables (layers here, tables sharded over MPI
/// ranks in the `sharded_recommender` example).
#[derive(Clone, Debug, Default)]
pub struct StepIds {
    /// History items of every example, bag after bag.
    pub hist_ids: Vec<u32>,
    /// CSR offsets of the history bags.
    pub hist_offsets: Vec<usize>,
    /// Recency weights of the history items (empty when `recency` is 1).
    pub hist_weights: Vec<f32>,
    /// The user of every example.
    pub user_ids: Vec<u32>,
    /// Every example's positive, then the `K` shared negatives.
    pub cand_ids: Vec<u32>,
}

/// The rows and gradients of one step, reused from batch to batch.
#[derive(Clone, Debug, Default)]
pub struct StepRows {
    /// The pooled histories (`batch × dim`); the user vectors once
    /// [`gradients`](Self::gradients) has added the user rows.
    pub pooled: Vec<f32>,
    /// The user-id rows (`batch × dim`).
    pub user_rows: Vec<f32>,
    /// The candidates' rows (`(batch + K) × dim`).
    pub cand_rows: Vec<f32>,
    scores: Vec<f32>,
    /// Gradient of the user vectors: of the pooled histories and of the
    /// user rows alike (`batch × dim`).
    pub grad_user: Vec<f32>,
    /// Gradient of the candidates' rows (`(batch + K) × dim`).
    pub grad_cand: Vec<f32>,
    loss: Vec<f32>,
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchStats {
    /// Sum of the examples' losses.
    pub loss_sum: f64,
    /// Number of examples.
    pub examples: usize,
    /// Where the time went.
    pub time: Phases,
}

impl BatchStats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &BatchStats) {
        self.loss_sum += other.loss_sum;
        self.examples += other.examples;
        self.time.add(&other.time);
    }
}

/// Time spent in each phase of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Phases {
    /// Building the id lists and drawing negatives.
    pub batch: Duration,
    /// embtable: `forward_pooled` and `forward_into` (the lookups).
    pub forward: Duration,
    /// Scores, losses and gradients by hand (matrix products, softmax).
    pub dense: Duration,
    /// embtable: `backward_pooled` and `backward` (sparse gradients).
    pub backward: Duration,
    /// embtable: the optimizers' `step`.
    pub step: Duration,
}

impl Phases {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Phases) {
        self.batch += other.batch;
        self.forward += other.forward;
        self.dense += other.dense;
        self.backward += other.backward;
        self.step += other.step;
    }

    /// Total time.
    pub fn total(&self) -> Duration {
        self.batch + self.forward + self.dense + self.backward + self.step
    }
}

/// A stopwatch that hands out the time since its last lap.
struct Laps(Instant);

impl Laps {
    fn lap(&mut self) -> Duration {
        let now = Instant::now();
        now - std::mem::replace(&mut self.0, now)
    }
}

/// Appends the weights of a history of `len` items, oldest first:
/// `decay^(len − 1), …, decay, 1`.
fn push_recency_weights(weights: &mut Vec<f32>, len: usize, decay: f32) {
    let start = weights.len();
    let mut w = 1.0f32;
    weights.resize(start + len, 0.0);
    for x in weights[start..].iter_mut().rev() {
        *x = w;
        w *= decay;
    }
}

/// `Σ a_i b_i` with eight independent partial sums, which the compiler
/// turns into SIMD lanes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
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

/// `−log σ(x) = log(1 + e^{−x})`, stable for large `|x|`.
fn neg_log_sigmoid(x: f32) -> f32 {
    (-x).max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Sampled softmax over `[s⁺, scores…]` (the negatives at `hits` left
/// out): returns `(loss, g₀)` and overwrites `scores` with `p_k`.
///
/// The loops are written in eight lanes so that they vectorise.
fn softmax_coefficients(s_pos: f32, scores: &mut [f32], hits: &[usize]) -> (f32, f32) {
    // Any bound at least the largest logit keeps the exponentials finite.
    let mut lanes = [s_pos; 8];
    let (body, tail) = scores.split_at_mut(scores.len() / 8 * 8);
    for chunk in body.chunks_exact(8) {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = tail
        .iter()
        .chain(&lanes)
        .fold(s_pos, |m, &x| if x > m { x } else { m });
    let mut sums = [0.0f32; 8];
    for chunk in body.chunks_exact_mut(8) {
        for (sum, x) in sums.iter_mut().zip(chunk) {
            *x = exp_nonpositive(*x - max);
            *sum += *x;
        }
    }
    for x in tail.iter_mut() {
        *x = exp_nonpositive(*x - max);
        sums[0] += *x;
    }
    let mut removed = 0.0;
    for &q in hits {
        removed += scores[q];
        scores[q] = 0.0;
    }
    let e_pos = exp_nonpositive(s_pos - max);
    let sum = e_pos + (sums.iter().sum::<f32>() - removed).max(0.0);
    let inv = 1.0 / sum;
    for x in scores.iter_mut() {
        *x *= inv;
    }
    (sum.ln() + max - s_pos, e_pos * inv - 1.0)
}

/// `e^x` for `x <= 0`, within 2 ulp of `f32::exp` (Cephes' `expf`: `x =
/// n ln2 + r`, a degree-5 polynomial for `e^r`, `2^n` by building the
/// exponent bits). Branch-free and free of float-to-int conversions, so a
/// loop over a slice vectorises at the baseline instruction set, unlike
/// calls to the libm `expf`.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let x = if x > -87.0 { x } else { -87.0 }; // e^-87 is still a normal f32
    // n = round(x / ln 2), with the 1.5·2²³ trick (round to nearest even).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = (x - n * 0.693_359_4) + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * r * r + r + 1.0;
    // 2^n: the low bits of 2²³ + 127 + n are n + 127, the biased exponent.
    let two_n = f32::from_bits((n + 8_388_735.0).to_bits() << 23);
    y * two_n
}

/// BPR against each negative (those at `hits` left out), averaged:
/// returns `(loss, g₀)` and overwrites `scores` with `p_k`.
fn bpr_coefficients(s_pos: f32, scores: &mut [f32], hits: &[usize]) -> (f32, f32) {
    let hit = |q: usize| hits.contains(&q);
    let used = (scores.len() - hits.len()).max(1) as f32;
    let (mut loss, mut g0) = (0.0, 0.0);
    for (q, x) in scores.iter_mut().enumerate() {
        if hit(q) {
            *x = 0.0;
            continue;
        }
        let margin = s_pos - *x;
        loss += neg_log_sigmoid(margin);
        *x = (1.0 - sigmoid(margin)) / used;
        g0 -= *x;
    }
    (loss / used, g0)
}

impl StepIds {
    /// The ids of one step on the training examples `batch` (indices into
    /// `data.train_items`, whose owners are `owner`): history bags (CSR),
    /// users, then the candidates: every example's positive followed by
    /// the K shared negatives, drawn from `rng`.
    pub fn assemble(
        &mut self,
        cfg: &ModelConfig,
        negatives: &Negatives,
        data: &Dataset,
        owner: &[u32],
        batch: &[u32],
        rng: &mut Rng,
    ) {
        self.hist_ids.clear();
        self.hist_offsets.clear();
        self.hist_offsets.push(0);
        self.hist_weights.clear();
        self.user_ids.clear();
        self.cand_ids.clear();
        for &j in batch {
            let j = j as usize;
            let u = owner[j] as usize;
            let from = data.train_offsets[u].max(j.saturating_sub(cfg.history));
            self.hist_ids.extend_from_slice(&data.train_items[from..j]);
            self.hist_offsets.push(self.hist_ids.len());
            if cfg.recency != 1.0 {
                push_recency_weights(&mut self.hist_weights, j - from, cfg.recency);
            }
            self.user_ids.push(u as u32);
            self.cand_ids.push(data.train_items[j]);
        }
        for _ in 0..cfg.negatives {
            self.cand_ids.push(negatives.sampler.sample(rng) as u32);
        }
    }

    /// The history bags, weighted when `recency` is below 1.
    ///
    /// # Errors
    /// A bug if it happens: [`assemble`](Self::assemble) makes valid bags.
    pub fn bags(&self, cfg: &ModelConfig) -> Result<Bags<'_, u32>> {
        let weights = (cfg.recency != 1.0).then_some(self.hist_weights.as_slice());
        Bags::new(&self.hist_ids, &self.hist_offsets, weights)
    }
}

impl StepRows {
    /// Sizes the buffers for `n` examples.
    pub fn resize(&mut self, cfg: &ModelConfig, n: usize) {
        let (d, k) = (cfg.dim, cfg.negatives);
        self.pooled.resize(n * d, 0.0);
        self.user_rows.resize(n * d, 0.0);
        self.cand_rows.resize((n + k) * d, 0.0);
    }

    /// From the forward rows (`pooled`, `user_rows`, `cand_rows`, the
    /// candidates being `cand_ids`) to the gradients `grad_user` and
    /// `grad_cand`: scores, losses and their derivatives by hand (module
    /// docs). Returns the sum of the examples' losses.
    pub fn gradients(&mut self, cfg: &ModelConfig, negatives: &Negatives, cand_ids: &[u32]) -> f64 {
        let ModelConfig {
            dim: d,
            negatives: k,
            loss: loss_kind,
            ..
        } = *cfg;
        let n = cand_ids.len() - k;
        let s = self;
        // u = pooled history + user row (kept in `pooled`).
        for (p, e) in s.pooled.iter_mut().zip(&s.user_rows) {
            *p += e;
        }
        let u_rows = &s.pooled;
        let (pos_rows, neg_rows) = s.cand_rows.split_at(n * d);

        // Scores of the shared negatives: S = U · Nᵀ (batch × K).
        s.scores.resize(n * k, 0.0);
        matmul(
            u_rows,
            RowMajor,
            &transpose(neg_rows, k, d),
            d,
            k,
            &mut s.scores,
        );

        // Per example, in parallel: the positive's score, the loss, and the
        // coefficients g₀ (into `g0`) and p_k (over the scores, so `coef`
        // below is the batch × K matrix P). The softmax scores the logits
        // minus log q, the log-probability that the proposal draws the item.
        let neg_ids = &cand_ids[n..];
        let pos_ids = &cand_ids[..n];
        let log_q = &negatives.log_q;
        let neg_log_q: Vec<f32> = neg_ids.iter().map(|&i| log_q[i as usize]).collect();
        // Where each negative item sits among the negatives (accidental hits).
        let mut slots: HashMap<u32, Vec<usize>> = HashMap::with_capacity(k);
        for (q, &i) in neg_ids.iter().enumerate() {
            slots.entry(i).or_default().push(q);
        }
        s.loss.resize(n, 0.0);
        let mut g0 = vec![0.0f32; n];
        s.scores
            .par_chunks_mut(k)
            .zip(s.loss.par_iter_mut())
            .zip(g0.par_iter_mut())
            .enumerate()
            .with_min_len(32)
            .for_each(|(b, ((p, loss), g0))| {
                let s_pos = dot(&u_rows[b * d..][..d], &pos_rows[b * d..][..d]);
                let hits = slots.get(&pos_ids[b]).map_or(&[][..], Vec::as_slice);
                (*loss, *g0) = match loss_kind {
                    Loss::Softmax => {
                        for (x, lq) in p.iter_mut().zip(&neg_log_q) {
                            *x -= lq;
                        }
                        let z_pos = s_pos - log_q[pos_ids[b] as usize];
                        softmax_coefficients(z_pos, p, hits)
                    }
                    Loss::Bpr => bpr_coefficients(s_pos, p, hits),
                };
            });
        let coef = &s.scores;

        // Gradients: G_U = g₀ ∘ E[pos] + P · N;  G_pos = g₀ ∘ U;  G_N = Pᵀ · U.
        s.grad_user.resize(n * d, 0.0);
        matmul(coef, RowMajor, neg_rows, k, d, &mut s.grad_user);
        s.grad_cand.resize((n + k) * d, 0.0);
        let (grad_pos, grad_neg) = s.grad_cand.split_at_mut(n * d);
        s.grad_user
            .par_chunks_mut(d)
            .zip(grad_pos.par_chunks_mut(d))
            .enumerate()
            .with_min_len(256)
            .for_each(|(b, (gu, gp))| {
                let (u, pos) = (&u_rows[b * d..][..d], &pos_rows[b * d..][..d]);
                let g = g0[b];
                for l in 0..d {
                    gu[l] += g * pos[l];
                    gp[l] = g * u[l];
                }
            });
        matmul(coef, Transposed, u_rows, n, d, grad_neg);
        s.loss.iter().map(|&l| f64::from(l)).sum()
    }
}

/// The initialiser of the user table: normal, or zeros.
pub fn user_init(cfg: &ModelConfig) -> Init {
    if cfg.user_init_std > 0.0 {
        Init::Normal {
            mean: 0.0,
            std: cfg.user_init_std,
        }
    } else {
        Init::Zeros
    }
}

impl<O: SparseOptimizer + Clone + Send + Sync> Model<Embedding<O>> {
    /// A model for `data` with freshly initialised tables; `make_optimizer`
    /// gives each table its own optimizer.
    ///
    /// # Errors
    /// As [`EmbeddingTable::new`].
    pub fn new(
        data: &Dataset,
        cfg: ModelConfig,
        make_optimizer: impl Fn() -> O,
        seed: u64,
    ) -> Result<Self> {
        let init = Init::Normal {
            mean: 0.0,
            std: cfg.init_std,
        };
        let items = EmbeddingTable::new(data.items, cfg.dim, init, seed)?;
        let users = EmbeddingTable::new(data.users, cfg.dim, user_init(&cfg), seed ^ 0x5eed)?;
        Self::from_parts(data, items, make_optimizer(), users, make_optimizer(), cfg)
    }

    /// A model from tables and optimizers (e.g. a checkpoint's).
    ///
    /// # Errors
    /// [`embtable::Error::InvalidConfig`] for a bad `max_norm`.
    pub fn from_parts(
        data: &Dataset,
        items: EmbeddingTable,
        items_optimizer: O,
        users: EmbeddingTable,
        users_optimizer: O,
        cfg: ModelConfig,
    ) -> Result<Self> {
        let options = EmbeddingOptions {
            max_norm: cfg.max_norm,
            ..EmbeddingOptions::default()
        };
        Ok(Model::from_layers(
            data,
            Embedding::with_options(items, items_optimizer, options)?,
            Embedding::with_options(users, users_optimizer, options)?,
            cfg,
        ))
    }
}

impl<L: Tower> Model<L> {
    /// A model for `data` over two layers.
    pub fn from_layers(data: &Dataset, items: L, users: L, cfg: ModelConfig) -> Self {
        Model {
            items,
            users,
            cfg,
            negatives: Negatives::new(data, cfg.negative_power),
            ids: StepIds::default(),
            rows: StepRows::default(),
        }
    }

    /// One step on the training examples `batch` (indices into
    /// `data.train_items`, whose owners are `owner`), with the negatives
    /// drawn from `rng`.
    ///
    /// # Errors
    /// From the layers (a bug if it happens: every id comes from `data`).
    pub fn train_batch(
        &mut self,
        data: &Dataset,
        owner: &[u32],
        batch: &[u32],
        rng: &mut Rng,
    ) -> Result<BatchStats> {
        let (cfg, ids, rows) = (&self.cfg, &mut self.ids, &mut self.rows);
        let mut time = Phases::default();
        let mut clock = Laps(Instant::now());
        ids.assemble(cfg, &self.negatives, data, owner, batch, rng);
        rows.resize(cfg, batch.len());
        let bags = ids.bags(cfg)?;
        time.batch = clock.lap();

        // Forward: the two towers (the item table is read twice).
        self.items
            .forward_pooled(&bags, Pooling::Mean, &mut rows.pooled)?;
        self.users
            .forward_into(&ids.user_ids, &mut rows.user_rows)?;
        self.items
            .forward_into(&ids.cand_ids, &mut rows.cand_rows)?;
        time.forward = clock.lap();
        let loss_sum = rows.gradients(cfg, &self.negatives, &ids.cand_ids);
        time.dense = clock.lap();

        // Backward: two passes into the item table's one gradient, one step per table.
        self.items
            .backward_pooled(&bags, Pooling::Mean, &rows.grad_user)?;
        self.items.backward(&ids.cand_ids, &rows.grad_cand)?;
        self.users.backward(&ids.user_ids, &rows.grad_user)?;
        time.backward = clock.lap();
        self.items.step()?;
        self.users.step()?;
        time.step = clock.lap();

        Ok(BatchStats {
            loss_sum,
            examples: batch.len(),
            time,
        })
    }

    /// The vectors of `users` (`users.len() × dim`) for predicting their
    /// held-out items of `split`: the (weighted) mean of each one's last `L`
    /// known items, a pooled lookup as in training, plus its user-id row.
    pub fn user_vectors(&self, data: &Dataset, users: &[usize], split: Split) -> Vec<f32> {
        let (mut ids, mut offsets, mut weights) = (Vec::new(), vec![0], Vec::new());
        for &u in users {
            let h = data.known(u, split);
            let recent = &h[h.len().saturating_sub(self.cfg.history)..];
            ids.extend_from_slice(recent);
            offsets.push(ids.len());
            push_recency_weights(&mut weights, recent.len(), self.cfg.recency);
        }
        let weights = (self.cfg.recency != 1.0).then_some(weights.as_slice());
        let bags = Bags::new(&ids, &offsets, weights).expect("offsets and weights are consistent");
        let mut out = self.items.read_mean(&bags);
        let user_ids: Vec<u32> = users.iter().map(|&u| u as u32).collect();
        let mut user_rows = vec![0.0; users.len() * self.cfg.dim];
        self.users.read(&user_ids, &mut user_rows);
        for (x, e) in out.iter_mut().zip(&user_rows) {
            *x += e;
        }
        out
    }

    /// The vectors of every item transposed (`dim × items`), the
    /// right-hand side of [`score_block`](Self::score_block).
    pub fn items_transposed(&self) -> Vec<f32> {
        let items = self.negatives.log_q.len(); // one per item of the data
        let ids: Vec<u32> = (0..items as u32).collect();
        let mut rows = vec![0.0; items * self.cfg.dim];
        self.items.read(&ids, &mut rows);
        transpose(&rows, items, self.cfg.dim)
    }

    /// Scores every item for each of `users` against their held-out items
    /// of `split`: `out` is `users.len() × items`, row-major; `items_t` is
    /// [`items_transposed`](Self::items_transposed).
    pub fn score_block(
        &self,
        data: &Dataset,
        users: &[usize],
        split: Split,
        items_t: &[f32],
        out: &mut [f32],
    ) {
        let vecs = self.user_vectors(data, users, split);
        matmul(&vecs, RowMajor, items_t, self.cfg.dim, data.items, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{GenConfig, generate};
    use embtable::{Sgd, SgdConfig};

    #[test]
    fn dot_and_losses() {
        let a: Vec<f32> = (0..19).map(|x| x as f32).collect();
        let b = vec![1.0f32; 19];
        assert_eq!(dot(&a, &b), 171.0);
        assert!((neg_log_sigmoid(0.0) - std::f32::consts::LN_2).abs() < 1e-6);
        assert!(neg_log_sigmoid(-100.0).is_finite() && neg_log_sigmoid(100.0) >= 0.0);
        assert!((sigmoid(2.0) + sigmoid(-2.0) - 1.0).abs() < 1e-6);
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!((got - want).abs() <= 2.5e-7 * want, "{x}: {got} vs {want}");
        }
        assert_eq!(exp_nonpositive(-1e9), exp_nonpositive(-87.0));
    }

    /// The hand-written gradient equals a central difference of the loss:
    /// one SGD step with `lr = 1` moves each row by minus its gradient.
    #[test]
    fn gradient_matches_finite_differences() {
        for (loss, power) in [
            (Loss::Softmax, 0.0),
            (Loss::Softmax, 0.75),
            (Loss::Bpr, 0.5),
        ] {
            check_gradient(ModelConfig {
                dim: 5,
                negatives: 3,
                init_std: 0.5,
                loss,
                negative_power: power,
                ..ModelConfig::default()
            });
        }
    }

    fn check_gradient(cfg: ModelConfig) {
        let data = generate(&GenConfig::tiny(), 3);
        let owner = data.owners();
        let sgd = || {
            Sgd::new(SgdConfig {
                lr: 1.0,
                ..Default::default()
            })
        };
        let batch = [40u32, 41, 300];
        let model = Model::new(&data, cfg, sgd, 9).unwrap();
        let loss_at = |m: &Model<Embedding<Sgd>>| {
            let mut m = m.clone();
            m.train_batch(&data, &owner, &batch, &mut Rng::new(1))
                .unwrap()
                .loss_sum
        };
        let mut stepped = model.clone();
        stepped
            .train_batch(&data, &owner, &batch, &mut Rng::new(1))
            .unwrap();
        let u = owner[40] as usize;
        // A positive item row, a history row, and the user row.
        let checks = [
            ("item", data.train_items[41] as usize),
            ("item", data.train_items[39] as usize),
            ("user", u),
        ];
        for (table, row) in checks {
            for lane in 0..cfg.dim {
                let h = 1e-2f32;
                let nudged = |delta: f32| {
                    let mut m = model.clone();
                    let layer = if table == "item" {
                        &mut m.items
                    } else {
                        &mut m.users
                    };
                    let mut t = layer.table().clone();
                    t.row_mut(row)[lane] += delta;
                    *layer = Embedding::new(t, sgd());
                    m
                };
                let numeric = (loss_at(&nudged(h)) - loss_at(&nudged(-h))) / (2.0 * f64::from(h));
                let (before, after) = if table == "item" {
                    (model.items.table(), stepped.items.table())
                } else {
                    (model.users.table(), stepped.users.table())
                };
                let analytic = f64::from(before.row(row)[lane] - after.row(row)[lane]);
                assert!(
                    (numeric - analytic).abs() < 2e-3 * (1.0 + analytic.abs()),
                    "{cfg:?}: {table} row {row} lane {lane}: numeric {numeric} analytic {analytic}"
                );
            }
        }
    }
}
