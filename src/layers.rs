//! `EmbeddingLayer`: the calls the fixed [`Embedding`] and the
//! [`DynamicEmbedding`](crate::dynamic::DynamicEmbedding) share, so a model
//! can be written once for either.

use crate::optim::SparseOptimizer;
use crate::{Bags, Embedding, Index, Pooling, Result};

/// An embedding layer: forward passes that look rows up (plain or pooled),
/// backward passes that accumulate their sparse gradient, and a step that
/// applies it. Implemented by [`Embedding`] (rows named by ids below its
/// row count) and [`DynamicEmbedding`](crate::dynamic::DynamicEmbedding)
/// (rows named by any 64-bit key).
///
/// Each method is the layer's inherent method of the same name; see those
/// for the details and errors.
///
/// # Examples
/// One training step, written once for both kinds of table:
/// ```
/// use embtable::dynamic::{DynamicConfig, DynamicEmbedding, DynamicTable};
/// use embtable::{Adagrad, Embedding, EmbeddingLayer, EmbeddingTable, Init};
///
/// fn train_once(layer: &mut impl EmbeddingLayer, ids: &[u64]) -> embtable::Result<Vec<f32>> {
///     let out = layer.forward(ids)?;
///     layer.backward(ids, &vec![0.01; out.len()])?;
///     layer.step()?;
///     Ok(out)
/// }
///
/// let mut fixed = Embedding::new(EmbeddingTable::new(100, 8, Init::default(), 3)?, Adagrad::default());
/// let mut dynamic = DynamicEmbedding::new(
///     DynamicTable::new(8, DynamicConfig { seed: 3, ..Default::default() })?,
///     Adagrad::default(),
/// )?;
/// // Key k of the dynamic table starts as row k of the fixed one, and trains alike.
/// assert_eq!(train_once(&mut fixed, &[5, 9, 5])?, train_once(&mut dynamic, &[5, 9, 5])?);
/// assert_eq!(fixed.table().row(5), dynamic.table().get(5u64).unwrap());
/// # Ok::<(), embtable::Error>(())
/// ```
pub trait EmbeddingLayer {
    /// Floats per row.
    fn dim(&self) -> usize;

    /// Writes the rows of `ids` to `out` (`ids.len() * dim` floats).
    fn forward_into<I: Index>(&mut self, ids: &[I], out: &mut [f32]) -> Result<()>;

    /// The rows of `ids`, `ids.len() * dim` floats.
    fn forward<I: Index>(&mut self, ids: &[I]) -> Result<Vec<f32>> {
        let len = crate::Error::checked_product(ids.len(), self.dim(), "forward output")?;
        let mut out = vec![0.0; len];
        self.forward_into(ids, &mut out)?;
        Ok(out)
    }

    /// Accumulates the gradient of a forward pass over `ids`.
    fn backward<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()>;

    /// Pools the rows of each bag into `out` (`bags.len() * dim` floats).
    fn forward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()>;

    /// Accumulates the gradient of a pooled forward pass.
    fn backward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
    ) -> Result<()>;

    /// Applies the accumulated gradient and clears it.
    fn step(&mut self) -> Result<()>;

    /// Brings every row current (`Semantics::DenseExact`).
    fn flush(&mut self) -> Result<()>;
}

impl<O: SparseOptimizer> EmbeddingLayer for Embedding<O> {
    fn dim(&self) -> usize {
        self.table().dim()
    }
    fn forward_into<I: Index>(&mut self, ids: &[I], out: &mut [f32]) -> Result<()> {
        Embedding::forward_into(self, ids, out)
    }
    fn backward<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()> {
        Embedding::backward(self, ids, grad_out)
    }
    fn forward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()> {
        Embedding::forward_pooled(self, bags, pooling, out)
    }
    fn backward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
    ) -> Result<()> {
        Embedding::backward_pooled(self, bags, pooling, grad_out)
    }
    fn step(&mut self) -> Result<()> {
        Embedding::step(self)
    }
    fn flush(&mut self) -> Result<()> {
        Embedding::flush(self)
    }
}
