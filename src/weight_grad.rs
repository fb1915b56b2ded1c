//! The gradient of a pooled lookup with respect to its per-sample weights
//! (PyTorch's `per_sample_weights.grad`), for models that learn the weight
//! of each id in its bag.
//!
//! Write `e_j` for the row of id `j` of a bag, `w_j` for its weight, `g` for
//! the bag's output gradient and `s_j = e_j · g`. The pooled row is
//! `Σ w_j e_j / d` (module [`pool`](crate::pool)), so
//!
//! | pooling | `d` | `∂L/∂w_k` |
//! |---|---|---|
//! | `Sum` | 1 | `s_k` |
//! | `Mean` | `Σ w_j` | `(s_k − Σ_j w_j s_j / d) / d` |
//! | `SqrtN` | `√Σ w_j²` | `s_k / d − w_k · Σ_j w_j s_j / d³` |
//!
//! A bag whose normaliser is zero has a zero row and a zero gradient.
//! `Max` takes no weights and has none. Without weights every `w_j` is 1
//! (the gradient at weights of one).
//!
//! Dot products and sums are taken in `f64`, lane by lane and position by
//! position in order, and rounded once to `f32`: the result does not depend
//! on the thread count or the kernel tier.

use rayon::prelude::*;

use crate::grad::check_finite;
use crate::index::{Index, row_unchecked, validate_ids};
use crate::{Bags, EmbeddingTable, Error, Pooling, Result};

/// Below this many ids the gradient is computed on the calling thread.
const PARALLEL_MIN_IDS: usize = 1 << 12;

impl EmbeddingTable {
    /// Writes into `out` (one float per id of `bags`) the gradient of a
    /// loss with respect to each per-sample weight, given `grad_out`, the
    /// gradient of [`pooled_lookup`](Self::pooled_lookup)'s output
    /// (`bags.len() * dim` floats). With `s_j = e_j · g` for the row `e_j`
    /// of id `j` and the bag's output gradient `g`: `Sum` gives `s_k`,
    /// `Mean` and `SqrtN` the derivative of `Σ w_j e_j / d` through their
    /// divisor `d` too. The table must be the one of the forward pass.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for [`Pooling::Max`];
    /// [`Error::ShapeMismatch`] if `grad_out` is not `bags.len() * dim`
    /// floats or `out` not one per id; [`Error::NonFinite`] for a NaN or
    /// infinite gradient value; [`Error::IndexOutOfRange`] for a bad id.
    /// On error `out` is untouched.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Bags, EmbeddingTable, Pooling};
    /// let table = EmbeddingTable::from_rows(2, 2, &[1., 2., 3., 4.])?;
    /// let (ids, weights) = ([0u32, 1], [0.5, 2.0]);
    /// let bags = Bags::new(&ids, &[0, 2], Some(&weights))?;
    /// let mut dw = [0.0; 2];
    /// table.pooled_weight_grad(&bags, Pooling::Sum, &[1., 10.], &mut dw)?;
    /// assert_eq!(dw, [21., 43.]); // row · gradient
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn pooled_weight_grad<I: Index>(
        &self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        if pooling == Pooling::Max {
            return Err(Error::InvalidConfig {
                field: "pooling",
                reason: "max pooling takes no per-sample weights, so it has no weight gradient"
                    .into(),
            });
        }
        let dim = self.dim();
        Error::check_len(
            "pooled gradient length (bags * dim)",
            bags.len().saturating_mul(dim),
            grad_out.len(),
        )?;
        Error::check_len("weight gradient length (ids)", bags.ids().len(), out.len())?;
        check_finite("gradient", grad_out)?;
        validate_ids(bags.ids(), self.rows())?;

        // One mutable slice of `out` per bag, so bags run in parallel.
        let mut per_bag = Vec::with_capacity(bags.len());
        let mut rest = out;
        for b in 0..bags.len() {
            let (head, tail) = rest.split_at_mut(bags.range(b).len());
            per_bag.push((b, head));
            rest = tail;
        }
        let bag = |(b, out): (usize, &mut [f32])| {
            let ids = bags.bag(b);
            let weights = bags.bag_weights(b);
            let g = &grad_out[b * dim..][..dim];
            let dot = |id: I| -> f64 {
                // SAFETY: every id was validated above, so `row()` is `Some`.
                let r = unsafe { row_unchecked(id) };
                let row = self.row(r);
                row.iter()
                    .zip(g)
                    .fold(0.0, |acc, (&e, &g)| acc + f64::from(e) * f64::from(g))
            };
            let w = |k: usize| weights.map_or(1.0, |w| f64::from(w[k]));
            for (o, &id) in out.iter_mut().zip(ids) {
                *o = dot(id) as f32;
            }
            if pooling == Pooling::Sum {
                return;
            }
            // s_k is in `out` rounded to f32; recompute it in f64 for the sums.
            let s: Vec<f64> = ids.iter().map(|&id| dot(id)).collect();
            let weighted: f64 = (0..ids.len()).map(|k| w(k) * s[k]).sum();
            let (d, d3) = match pooling {
                Pooling::Mean => {
                    let d: f64 = (0..ids.len()).map(w).sum();
                    (d, 0.0)
                }
                _ => {
                    let d2: f64 = (0..ids.len()).map(|k| w(k) * w(k)).sum();
                    (d2.sqrt(), d2 * d2.sqrt())
                }
            };
            for (k, o) in out.iter_mut().enumerate() {
                *o = if d == 0.0 {
                    0.0
                } else if pooling == Pooling::Mean {
                    ((s[k] - weighted / d) / d) as f32
                } else {
                    (s[k] / d - w(k) * weighted / d3) as f32
                };
            }
        };
        if bags.ids().len() < PARALLEL_MIN_IDS {
            per_bag.into_iter().for_each(bag);
        } else {
            per_bag.into_par_iter().with_min_len(64).for_each(bag);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pooled row of bag `b` with weights `w`, in f64.
    fn pooled(table: &EmbeddingTable, ids: &[u32], w: &[f64], pooling: Pooling) -> Vec<f64> {
        let d = match pooling {
            Pooling::Sum => 1.0,
            Pooling::Mean => w.iter().sum(),
            _ => w.iter().map(|x| x * x).sum::<f64>().sqrt(),
        };
        let mut out = vec![0.0; table.dim()];
        for (&id, &wj) in ids.iter().zip(w) {
            for (o, &e) in out.iter_mut().zip(table.row(id as usize)) {
                *o += wj * f64::from(e) / d;
            }
        }
        out
    }

    /// Each weight's gradient equals a central finite difference of
    /// `g · pooled(w)` in f64.
    #[test]
    fn matches_finite_differences() {
        let table = EmbeddingTable::new(5, 3, crate::Init::default(), 3).unwrap();
        let ids = [0u32, 3, 3, 1, 4];
        let weights = [0.5f32, 2.0, 1.5, 0.25, 3.0];
        let offsets = [0usize, 3, 3, 5];
        let grad_out = [0.3f32, -1.0, 2.0, 9.0, 9.0, 9.0, -0.5, 0.25, 1.0];
        let bags = Bags::new(&ids, &offsets, Some(&weights)).unwrap();
        for pooling in [Pooling::Sum, Pooling::Mean, Pooling::SqrtN] {
            let mut dw = [0.0f32; 5];
            table
                .pooled_weight_grad(&bags, pooling, &grad_out, &mut dw)
                .unwrap();
            for (b, range) in [(0usize, 0..3), (2, 3..5)] {
                let loss = |w: &[f64]| -> f64 {
                    let row = pooled(&table, &ids[range.clone()], w, pooling);
                    row.iter()
                        .zip(&grad_out[b * 3..][..3])
                        .map(|(r, &g)| r * f64::from(g))
                        .sum()
                };
                let w0: Vec<f64> = weights[range.clone()]
                    .iter()
                    .map(|&w| f64::from(w))
                    .collect();
                for k in 0..w0.len() {
                    let h = 1e-6;
                    let (mut up, mut down) = (w0.clone(), w0.clone());
                    up[k] += h;
                    down[k] -= h;
                    let numeric = (loss(&up) - loss(&down)) / (2.0 * h);
                    let got = f64::from(dw[range.start + k]);
                    assert!(
                        (numeric - got).abs() <= 1e-5 * (1.0 + numeric.abs()),
                        "{pooling:?} bag {b} weight {k}: {got} vs {numeric}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_bags_zero_normalisers_and_errors() {
        let table = EmbeddingTable::from_rows(2, 1, &[1.0, 2.0]).unwrap();
        let ids = [0u32, 1];
        let weights = [0.0f32, 0.0];
        let bags = Bags::new(&ids, &[0, 0, 2], Some(&weights)).unwrap();
        let mut dw = [7.0f32; 2];
        table
            .pooled_weight_grad(&bags, Pooling::Mean, &[5.0, 1.0], &mut dw)
            .unwrap();
        assert_eq!(dw, [0.0, 0.0]);
        table
            .pooled_weight_grad(&bags, Pooling::Sum, &[5.0, 1.0], &mut dw)
            .unwrap();
        assert_eq!(dw, [1.0, 2.0]);

        let mut dw = [7.0f32; 2];
        let err = table.pooled_weight_grad(&bags, Pooling::Max, &[5.0, 1.0], &mut dw);
        assert!(matches!(err, Err(Error::InvalidConfig { .. })));
        let err = table.pooled_weight_grad(&bags, Pooling::Sum, &[5.0, f32::NAN], &mut dw);
        assert!(matches!(err, Err(Error::NonFinite { position: 1, .. })));
        let bad = [0u32, 2];
        let bags = Bags::new(&bad, &[0, 2], None).unwrap();
        let err = table.pooled_weight_grad(&bags, Pooling::Sum, &[5.0], &mut dw);
        assert!(matches!(
            err,
            Err(Error::IndexOutOfRange { position: 1, .. })
        ));
        assert_eq!(dw, [7.0, 7.0]);
    }
}
