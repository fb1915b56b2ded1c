//! Gradient clipping on a [`SparseGrad`], before an optimizer step: by
//! value, by the norm of each row, and by a global norm that includes the
//! model's other gradients. Each equals the same operation on the dense
//! gradient `grad.to_dense(rows)` (rows without a gradient are zero, and
//! stay zero).

use rayon::prelude::*;

use super::engine::check_finite;
use crate::parallel::PARALLEL_MIN_FLOATS;
use crate::{Error, Result, SparseGrad};

fn positive(what: &'static str, v: f32) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field: what,
            reason: format!("must be positive and finite, got {v}"),
        })
    }
}

/// The squared L2 norm of a row, summed in `f64` in lane order (each
/// square of an `f32` is exact in `f64`).
fn row_squares(row: &[f32]) -> f64 {
    row.iter().map(|&x| x as f64 * x as f64).sum()
}

impl SparseGrad {
    /// Clips every value to `[-max, max]`: Keras' `clipvalue`, PyTorch's
    /// `clip_grad_value_`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `max`) unless `max` is positive and
    /// finite; [`Error::NonFinite`] if a summed value overflowed (its
    /// position as [`SparseOptimizer::step`](crate::SparseOptimizer::step)
    /// reports it). Nothing is changed then.
    ///
    /// # Examples
    /// ```
    /// use embtable::SparseGrad;
    /// let mut grad = SparseGrad::new(2);
    /// grad.accumulate_lookup(&[4u32], &[3.0, -0.5])?;
    /// grad.clip_by_value(1.0)?;
    /// assert_eq!(grad.row_grad(0), &[1.0, -0.5]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn clip_by_value(&mut self, max: f32) -> Result<()> {
        positive("max", max)?;
        self.check_sums()?;
        let clip = |c: &mut [f32]| c.iter_mut().for_each(|x| *x = x.max(-max).min(max));
        let values = self.as_padded_mut();
        if values.len() < PARALLEL_MIN_FLOATS {
            clip(values);
        } else {
            values.par_chunks_mut(PARALLEL_MIN_FLOATS).for_each(clip);
        }
        Ok(())
    }

    /// Scales each row whose L2 norm `n` exceeds `max_norm` by
    /// `max_norm / n`, so every row's norm is at most `max_norm`; rows
    /// within it are left bit for bit (TensorFlow's `clip_by_norm` along the
    /// rows, up to rounding). The norm is summed in `f64`.
    ///
    /// # Errors
    /// As [`clip_by_value`](Self::clip_by_value) (field `max_norm`).
    ///
    /// # Examples
    /// ```
    /// use embtable::SparseGrad;
    /// let mut grad = SparseGrad::new(2);
    /// grad.accumulate_lookup(&[0u32, 1], &[3.0, 4.0, 0.3, 0.4])?;
    /// grad.clip_by_row_norm(1.0)?;
    /// assert_eq!(grad.row_grad(0), &[0.6, 0.8]); // norm 5 -> 1
    /// assert_eq!(grad.row_grad(1), &[0.3, 0.4]); // norm 0.5: kept
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn clip_by_row_norm(&mut self, max_norm: f32) -> Result<()> {
        positive("max_norm", max_norm)?;
        self.check_sums()?;
        let stride = self.stride();
        let clip = |row: &mut [f32]| {
            let norm = row_squares(row).sqrt();
            if norm > max_norm as f64 {
                let scale = (max_norm as f64 / norm) as f32;
                row.iter_mut().for_each(|x| *x *= scale);
            }
        };
        let values = self.as_padded_mut();
        if values.len() < PARALLEL_MIN_FLOATS || stride == 0 {
            values.chunks_exact_mut(stride.max(1)).for_each(clip);
        } else {
            values
                .par_chunks_exact_mut(stride)
                .with_min_len(PARALLEL_MIN_FLOATS / stride)
                .for_each(clip);
        }
        Ok(())
    }

    /// The L2 norm of the whole gradient (as of the dense one), for a
    /// global norm over several tables: the squares are summed in `f64`,
    /// each row's in lane order, rows in increasing row order, so the
    /// result does not depend on the order rows were accumulated in.
    ///
    /// # Errors
    /// [`Error::NonFinite`] if a summed value overflowed.
    ///
    /// # Examples
    /// ```
    /// use embtable::SparseGrad;
    /// let mut grad = SparseGrad::new(2);
    /// grad.accumulate_lookup(&[7u32], &[3.0, 4.0])?;
    /// assert_eq!(grad.norm()?, 5.0);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn norm(&self) -> Result<f32> {
        self.check_sums()?;
        Ok(self.squared_norm().sqrt() as f32)
    }

    /// Scales the whole gradient by `max_norm / n` if the global norm
    /// `n = √(‖self‖² + other_norm²)` exceeds `max_norm`, and returns `n`:
    /// Keras' `global_clipnorm` and PyTorch's `clip_grad_norm_` (which
    /// returns the norm too) up to rounding, where `other_norm` is the norm
    /// of the model's other gradients (0 for this table alone, which is
    /// Keras' per-variable `clipnorm`). Every gradient of the model must
    /// then be scaled by the same factor: [`norm`](Self::norm) gives each
    /// table's part. Within the norm, nothing changes.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `max_norm`, or `other_norm` unless
    /// it is `>= 0` and finite); [`Error::NonFinite`] if a summed value
    /// overflowed. Nothing is changed then.
    ///
    /// # Examples
    /// ```
    /// use embtable::SparseGrad;
    /// let mut grad = SparseGrad::new(1);
    /// grad.accumulate_lookup(&[0u32], &[3.0])?;
    /// // The rest of the model's gradient has norm 4: the global norm is 5.
    /// assert_eq!(grad.clip_by_global_norm(1.0, 4.0)?, 5.0);
    /// assert_eq!(grad.row_grad(0), &[0.6]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn clip_by_global_norm(&mut self, max_norm: f32, other_norm: f32) -> Result<f32> {
        positive("max_norm", max_norm)?;
        if !(other_norm.is_finite() && other_norm >= 0.0) {
            return Err(Error::InvalidConfig {
                field: "other_norm",
                reason: format!("must be non-negative and finite, got {other_norm}"),
            });
        }
        self.check_sums()?;
        let other = other_norm as f64;
        let norm = (self.squared_norm() + other * other).sqrt();
        if norm > max_norm as f64 {
            let scale = (max_norm as f64 / norm) as f32;
            let values = self.as_padded_mut();
            let apply = |c: &mut [f32]| c.iter_mut().for_each(|x| *x *= scale);
            if values.len() < PARALLEL_MIN_FLOATS {
                apply(values);
            } else {
                values.par_chunks_mut(PARALLEL_MIN_FLOATS).for_each(apply);
            }
        }
        Ok(norm as f32)
    }

    /// `Σ g²` over every value, in `f64`, rows in increasing row order.
    fn squared_norm(&self) -> f64 {
        let stride = self.stride().max(1);
        let values = self.as_padded();
        let per_row: Vec<f64> = if values.len() < PARALLEL_MIN_FLOATS {
            values.chunks_exact(stride).map(row_squares).collect()
        } else {
            values.par_chunks_exact(stride).map(row_squares).collect()
        };
        let mut order: Vec<usize> = (0..per_row.len()).collect();
        let rows = self.rows();
        order.sort_unstable_by_key(|&k| rows[k]);
        order.iter().map(|&k| per_row[k]).sum()
    }

    /// `Err(NonFinite)` if a summed value overflowed.
    fn check_sums(&self) -> Result<()> {
        if self.is_proven_finite() {
            Ok(())
        } else {
            check_finite(self)
        }
    }
}
