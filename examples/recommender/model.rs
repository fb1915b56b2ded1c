//! A two-tower retrieval model whose only parameters are embedding tables,
//! trained with BPR on sampled negatives.
//!
//! * **User tower**: the mean of the item embeddings of the user's recent
//!   history (a pooled lookup, [`Pooling::Mean`]) plus a user-id embedding:
//!   `u = mean(E[h₁..h_L]) + U[user]`.
//! * **Item tower**: the candidate's row of the *same* item table `E`.
//! * **Score**: `s(user, item) = u · E[item]`.
//! * **Loss** (BPR, averaged over `K` sampled negatives `n_k`):
//!   `ℓ = (1/K) Σ_k −log σ(s⁺ − s⁻_k)`, with `s⁺ = u · E[pos]`,
//!   `s⁻_k = u · E[n_k]`.
//!
//! The gradients are written out by hand. With `x_k = s⁺ − s⁻_k` and
//! `c_k = (σ(x_k) − 1) / K` (note `dℓ/dx_k = c_k`):
//!
//! ```text
//! dℓ/du      = Σ_k c_k (E[pos] − E[n_k])
//! dℓ/dE[pos] = (Σ_k c_k) u
//! dℓ/dE[n_k] = −c_k u
//! ```
//!
//! and `dℓ/du` flows unchanged to the user row and, through the mean, to
//! every history row (the layer's `backward_pooled` divides by the bag
//! length). The item table therefore gets two backward passes per batch,
//! one pooled (history) and one plain (candidates), that add up into one
//! sparse gradient before its single `step()`: the layer coalesces the rows
//! both passes touch.
//!
//! Training examples are the positions of the users' training sequences:
//! the item at position `t` is the positive, the (up to) `L` items before
//! it are the history. Evaluation scores every item against the user vector
//! built from the last `L` training items.

use embtable::{Bags, Embedding, EmbeddingTable, Init, Pooling, Result, SparseOptimizer};
use rayon::prelude::*;

use crate::data::Dataset;
use crate::rng::Rng;

/// Shape and training settings of the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    /// Embedding dimension.
    pub dim: usize,
    /// History items pooled into the user vector (the most recent `L`).
    pub history: usize,
    /// Negatives sampled per positive.
    pub negatives: usize,
    /// Standard deviation of the initial embeddings (normal, mean 0).
    pub init_std: f32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dim: 32,
            history: 20,
            negatives: 4,
            init_std: 0.1,
        }
    }
}

/// The model: an item table shared by the history and the candidates, and
/// a user-id table, each in an [`Embedding`] layer with its own optimizer.
#[derive(Clone, Debug)]
pub struct Model<O> {
    /// Item embeddings `E` (`items × dim`).
    pub items: Embedding<O>,
    /// User-id embeddings `U` (`users × dim`).
    pub users: Embedding<O>,
    /// Settings.
    pub cfg: ModelConfig,
    scratch: Scratch,
}

/// Buffers reused from batch to batch.
#[derive(Clone, Debug, Default)]
struct Scratch {
    hist_ids: Vec<u32>,
    hist_offsets: Vec<usize>,
    user_ids: Vec<u32>,
    cand_ids: Vec<u32>,
    pooled: Vec<f32>,
    user_rows: Vec<f32>,
    cand_rows: Vec<f32>,
    grad_user: Vec<f32>,
    grad_cand: Vec<f32>,
    loss: Vec<f32>,
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchStats {
    /// Sum of the examples' losses.
    pub loss_sum: f64,
    /// Number of examples.
    pub examples: usize,
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

impl<O: SparseOptimizer + Send> Model<O> {
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
        let users = EmbeddingTable::new(data.users, cfg.dim, init, seed ^ 0x5eed)?;
        Ok(Self::from_parts(
            Embedding::new(items, make_optimizer()),
            Embedding::new(users, make_optimizer()),
            cfg,
        ))
    }

    /// A model from trained layers (e.g. a checkpoint).
    pub fn from_parts(items: Embedding<O>, users: Embedding<O>, cfg: ModelConfig) -> Self {
        Model {
            items,
            users,
            cfg,
            scratch: Scratch::default(),
        }
    }

    /// One step of BPR on the training examples `batch` (indices into
    /// `data.train_items`, whose owners are `owner`), with negatives drawn
    /// from `rng`.
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
        let ModelConfig {
            dim: d,
            history,
            negatives: k,
            ..
        } = self.cfg;
        let n = batch.len();
        let s = &mut self.scratch;

        // Assemble ids: history bags (CSR), users, [positive, negatives…] per example.
        s.hist_ids.clear();
        s.hist_offsets.clear();
        s.hist_offsets.push(0);
        s.user_ids.clear();
        s.cand_ids.clear();
        for &j in batch {
            let j = j as usize;
            let u = owner[j] as usize;
            let from = data.train_offsets[u].max(j.saturating_sub(history));
            s.hist_ids.extend_from_slice(&data.train_items[from..j]);
            s.hist_offsets.push(s.hist_ids.len());
            s.user_ids.push(u as u32);
            let pos = data.train_items[j];
            s.cand_ids.push(pos);
            for _ in 0..k {
                let mut neg = rng.below(data.items) as u32;
                if neg == pos {
                    neg = rng.below(data.items) as u32;
                }
                s.cand_ids.push(neg);
            }
        }
        let bags = Bags::new(&s.hist_ids, &s.hist_offsets, None)?;

        // Forward: the two towers (the item table is read twice).
        s.pooled.resize(n * d, 0.0);
        s.user_rows.resize(n * d, 0.0);
        s.cand_rows.resize(n * (1 + k) * d, 0.0);
        self.items
            .forward_pooled(&bags, Pooling::Mean, &mut s.pooled)?;
        self.users.forward_into(&s.user_ids, &mut s.user_rows)?;
        self.items.forward_into(&s.cand_ids, &mut s.cand_rows)?;

        // Scores, loss and gradients by hand, in parallel over examples.
        s.grad_user.resize(n * d, 0.0);
        s.grad_cand.resize(n * (1 + k) * d, 0.0);
        s.loss.resize(n, 0.0);
        let (pooled, user_rows, cand_rows) = (&s.pooled, &s.user_rows, &s.cand_rows);
        s.grad_user
            .par_chunks_mut(d)
            .zip(s.grad_cand.par_chunks_mut((1 + k) * d))
            .zip(s.loss.par_iter_mut())
            .enumerate()
            .with_min_len(64)
            .for_each_init(
                || vec![0.0f32; d],
                |u, (b, ((gu, gc), loss))| {
                    for ((u, p), e) in u
                        .iter_mut()
                        .zip(&pooled[b * d..][..d])
                        .zip(&user_rows[b * d..][..d])
                    {
                        *u = p + e;
                    }
                    let cands = &cand_rows[b * (1 + k) * d..][..(1 + k) * d];
                    let (pos, negs) = cands.split_at(d);
                    let s_pos = dot(u, pos);
                    gu.fill(0.0);
                    let mut c_pos = 0.0;
                    let mut l = 0.0;
                    for (q, neg) in negs.chunks_exact(d).enumerate() {
                        let x = s_pos - dot(u, neg);
                        l += neg_log_sigmoid(x);
                        let c = (sigmoid(x) - 1.0) / k as f32;
                        c_pos += c;
                        for ((g, p), m) in gu.iter_mut().zip(pos).zip(neg) {
                            *g += c * (p - m);
                        }
                        for (g, x) in gc[(1 + q) * d..][..d].iter_mut().zip(u.iter()) {
                            *g = -c * x;
                        }
                    }
                    for (g, x) in gc[..d].iter_mut().zip(u.iter()) {
                        *g = c_pos * x;
                    }
                    *loss = l / k as f32;
                },
            );

        // Backward: two passes into the item table's one gradient, one step each table.
        self.items
            .backward_pooled(&bags, Pooling::Mean, &s.grad_user)?;
        self.items.backward(&s.cand_ids, &s.grad_cand)?;
        self.users.backward(&s.user_ids, &s.grad_user)?;
        self.items.step()?;
        self.users.step()?;

        Ok(BatchStats {
            loss_sum: s.loss.iter().map(|&l| f64::from(l)).sum(),
            examples: n,
        })
    }

    /// Writes user `u`'s vector (`dim` floats): the mean of its last `L`
    /// training items plus its user-id row.
    pub fn user_vector(&self, data: &Dataset, u: usize, out: &mut [f32]) {
        let h = data.history(u);
        let recent = &h[h.len().saturating_sub(self.cfg.history)..];
        out.copy_from_slice(self.users.table().row(u));
        if !recent.is_empty() {
            let mut sum = vec![0.0f32; out.len()];
            for &i in recent {
                for (s, x) in sum.iter_mut().zip(self.items.table().row(i as usize)) {
                    *s += x;
                }
            }
            let inv = 1.0 / recent.len() as f32;
            for (o, s) in out.iter_mut().zip(&sum) {
                *o += s * inv;
            }
        }
    }

    /// Scores every item for each of `users`: `out` is `users.len() × items`,
    /// row-major. Each item row is read once per block of users.
    pub fn score_block(&self, data: &Dataset, users: &[usize], out: &mut [f32]) {
        let d = self.cfg.dim;
        let items = self.items.table();
        let n = items.rows();
        let mut vecs = vec![0.0f32; users.len() * d];
        for (v, &u) in vecs.chunks_exact_mut(d).zip(users) {
            self.user_vector(data, u, v);
        }
        let stride = items.stride();
        let rows = items.as_padded();
        for i in 0..n {
            let row = &rows[i * stride..][..d];
            for (b, v) in vecs.chunks_exact(d).enumerate() {
                out[b * n + i] = dot(v, row);
            }
        }
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
    }

    /// The hand-written gradient equals a central difference of the loss:
    /// one SGD step with `lr = 1` moves each row by minus its gradient.
    #[test]
    fn gradient_matches_finite_differences() {
        let data = generate(&GenConfig::tiny(), 3);
        let owner = data.owners();
        let cfg = ModelConfig {
            dim: 5,
            negatives: 3,
            init_std: 0.5,
            ..ModelConfig::default()
        };
        let sgd = || {
            Sgd::new(SgdConfig {
                lr: 1.0,
                ..Default::default()
            })
        };
        let batch = [40u32, 41, 300];
        let model = Model::new(&data, cfg, sgd, 9).unwrap();
        let loss_at = |m: &Model<Sgd>| {
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
                    "{table} row {row} lane {lane}: numeric {numeric} analytic {analytic}"
                );
            }
        }
    }
}
