//! `DynamicEmbedding`: a dynamic table, its optimizer and its gradient,
//! with the fixed [`Embedding`](crate::Embedding)'s calls.

use super::table::{DEFAULT_ROW, DynamicTable, known_positions};
use crate::grad::check_finite;
use crate::optim::SparseOptimizer;
use crate::{Bags, EmbeddingLayer, Error, Index, Pooling, Result, SparseGrad};

/// An embedding layer over a [`DynamicTable`]: `forward` translates keys to
/// rows (admitting new keys as the table's policies say) and looks them
/// up, `backward` accumulates the sparse gradient of those rows, `step`
/// applies it with the optimizer and ends the table's step.
///
/// Keys without a row read the default row and receive no gradient. A
/// backward pass sends each key's gradient to the key's row, which a key
/// used in this step keeps until the step ends (a key admitted by a later
/// forward pass of the same step gets its gradient in its new row, as
/// tables updated by key do).
///
/// # Examples
/// ```
/// use embtable::dynamic::{Capacity, DynamicConfig, DynamicEmbedding, DynamicTable};
/// use embtable::{Bags, Pooling, Sgd};
/// let config = DynamicConfig { capacity: Capacity::Rows(2), ..Default::default() };
/// let mut layer = DynamicEmbedding::new(DynamicTable::new(4, config)?, Sgd::default())?;
/// // Two bags of hashed ids, mean-pooled.
/// let ids = [11u64, 22, 11, 33];
/// let bags = Bags::new(&ids, &[0, 2, 4], None)?;
/// let mut out = vec![0.0; 2 * 4];
/// layer.forward_pooled(&bags, Pooling::Mean, &mut out)?;
/// assert_eq!(layer.table().len(), 2); // 33 found the table full of keys in use
/// layer.backward_pooled(&bags, Pooling::Mean, &[0.5; 8])?;
/// layer.step()?;
/// // A new step: 44 takes the row of the least recently used key, 11.
/// layer.forward(&[22u64, 44])?;
/// assert_eq!((layer.table().row_of(11u64), layer.table().len()), (None, 2));
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DynamicEmbedding<O> {
    table: DynamicTable,
    optimizer: O,
    grad: SparseGrad,
    /// The rows of the last forward pass (a buffer reused across calls).
    rows: Vec<u32>,
    /// Rows updated by a step are rescaled to at most this L2 norm.
    max_norm: Option<f32>,
}

impl<O: SparseOptimizer> DynamicEmbedding<O> {
    /// A layer over `table`, trained by `optimizer`, whose state per row
    /// ([`SparseOptimizer::state_bytes_per_row`]) counts against a
    /// [`Capacity::Bytes`](super::Capacity::Bytes).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `capacity`) if the table already
    /// holds more keys than its capacity allows with the optimizer state.
    pub fn new(mut table: DynamicTable, optimizer: O) -> Result<Self> {
        table.count_state_bytes(optimizer.state_bytes_per_row(table.dim()))?;
        let grad = SparseGrad::new(table.dim());
        Ok(Self {
            table,
            optimizer,
            grad,
            rows: Vec::new(),
            max_norm: None,
        })
    }

    /// Rescales the rows each step updates to at most `max_norm` (L2),
    /// after the step, as Keras' `MaxNorm` constraint and the fixed
    /// layer's `EmbeddingOptions::max_norm` do; `None` turns it off.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `max_norm`) unless it is finite and
    /// positive; nothing changes then.
    ///
    /// # Examples
    /// ```
    /// use embtable::dynamic::{DynamicConfig, DynamicEmbedding, DynamicTable};
    /// use embtable::{Sgd, SgdConfig};
    /// let sgd = Sgd::new(SgdConfig { lr: 10.0, ..SgdConfig::keras() });
    /// let mut layer = DynamicEmbedding::new(DynamicTable::new(2, DynamicConfig::default())?, sgd)?;
    /// layer.set_max_norm(Some(1.0))?;
    /// layer.forward(&[5u64])?;
    /// layer.backward(&[5u64], &[3.0, 4.0])?;
    /// layer.step()?;
    /// let row = layer.table().get(5u64).unwrap();
    /// assert!((row[0].hypot(row[1]) - 1.0).abs() < 1e-5);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn set_max_norm(&mut self, max_norm: Option<f32>) -> Result<()> {
        if let Some(m) = max_norm.filter(|m| !(m.is_finite() && *m > 0.0)) {
            return Err(Error::InvalidConfig {
                field: "max_norm",
                reason: format!("{m} is not a finite positive number"),
            });
        }
        self.max_norm = max_norm;
        Ok(())
    }

    /// The bound [`set_max_norm`](Self::set_max_norm) set, if any.
    pub fn max_norm(&self) -> Option<f32> {
        self.max_norm
    }

    /// The table.
    pub fn table(&self) -> &DynamicTable {
        &self.table
    }

    /// The table, to change its default row.
    pub fn table_mut(&mut self) -> &mut DynamicTable {
        &mut self.table
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The optimizer, to change its settings (its learning rate, say).
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    /// The gradient accumulated since the last step, over rows of the
    /// table's [`weights`](DynamicTable::weights).
    pub fn grad(&self) -> &SparseGrad {
        &self.grad
    }

    /// The table, the optimizer and the gradient not stepped yet.
    pub fn into_parts(self) -> (DynamicTable, O, SparseGrad) {
        (self.table, self.optimizer, self.grad)
    }

    /// Floats per row.
    pub fn dim(&self) -> usize {
        self.table.dim()
    }

    /// The rows of `ids`: `ids.len() * dim` floats, row-major.
    ///
    /// # Errors
    /// As [`forward_into`](Self::forward_into); [`Error::Alloc`] if
    /// `ids.len() * dim` floats overflow.
    pub fn forward<I: Index>(&mut self, ids: &[I]) -> Result<Vec<f32>> {
        EmbeddingLayer::forward(self, ids)
    }

    /// Writes the rows of `ids` to `out` (`ids.len() * dim` floats),
    /// admitting new keys ([`DynamicTable::translate`]). Under
    /// `Semantics::DenseExact` the rows are brought current first.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a wrong `out` length; the errors of
    /// [`DynamicTable::translate`] and of the optimizer's `catch_up`.
    /// Nothing is written on error.
    pub fn forward_into<I: Index>(&mut self, ids: &[I], out: &mut [f32]) -> Result<()> {
        Error::check_len(
            "forward output length (ids * dim)",
            ids.len().saturating_mul(self.dim()),
            out.len(),
        )?;
        let rows = self.translate(ids)?;
        self.catch_up(&rows)?;
        let looked_up = self.table.weights.lookup(&rows, out);
        self.rows = rows;
        looked_up
    }

    /// Reads the rows of `ids` into `out` without admitting keys or
    /// recording uses: for evaluation and serving (under
    /// `Semantics::DenseExact`, [`flush`](Self::flush) first).
    ///
    /// # Errors
    /// As [`DynamicTable::lookup`].
    pub fn lookup<I: Index>(&self, ids: &[I], out: &mut [f32]) -> Result<()> {
        self.table.lookup(ids, out)
    }

    /// Accumulates the gradient of [`forward`](Self::forward) over `ids`
    /// given `grad_out`. Calls add up until [`step`](Self::step). Keys
    /// without a row receive nothing.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::NonFinite`]; nothing is
    /// accumulated on error.
    pub fn backward<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()> {
        let dim = self.dim();
        Error::check_len(
            "gradient length (ids * dim)",
            ids.len().saturating_mul(dim),
            grad_out.len(),
        )?;
        check_finite("gradient", grad_out)?;
        let rows = self.table.rows_for_gradient(ids);
        if rows.contains(&DEFAULT_ROW) {
            let (rows, grad) = known_positions(&rows, grad_out, dim);
            self.grad.accumulate_lookup(&rows, &grad)
        } else {
            self.grad.accumulate_lookup(&rows, grad_out)
        }
    }

    /// Pools the rows of each bag into `out` (`bags.len() * dim` floats),
    /// admitting new keys; an unknown key takes part with the default row.
    ///
    /// # Errors
    /// As [`EmbeddingTable::pooled_lookup`](crate::EmbeddingTable::pooled_lookup)
    /// and [`forward_into`](Self::forward_into). Nothing is written on
    /// error.
    pub fn forward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()> {
        Error::check_len(
            "pooled output length (bags * dim)",
            bags.len().saturating_mul(self.dim()),
            out.len(),
        )?;
        // Checked before any key is admitted: the bags' weights against
        // the pooling (every row is valid, so the default row stands in).
        let default_rows = vec![DEFAULT_ROW; bags.ids().len()];
        let default_bags = Bags::new(&default_rows, bags.offsets(), bags.weights())?;
        self.table.weights.check_pooled(&default_bags, pooling)?;
        let rows = self.translate(bags.ids())?;
        let row_bags = Bags::new(&rows, bags.offsets(), bags.weights())?;
        self.catch_up(&rows)?;
        let pooled = self.table.weights.pooled_lookup(&row_bags, pooling, out);
        drop(row_bags);
        self.rows = rows;
        pooled
    }

    /// Accumulates the gradient of [`forward_pooled`](Self::forward_pooled)
    /// given `grad_out` (`bags.len() * dim` floats). The default row's
    /// share is dropped at the step.
    ///
    /// # Errors
    /// As [`SparseGrad::accumulate_pooled`]; nothing is accumulated on error.
    pub fn backward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
    ) -> Result<()> {
        Error::check_len(
            "pooled gradient length (bags * dim)",
            bags.len().saturating_mul(self.dim()),
            grad_out.len(),
        )?;
        check_finite("gradient", grad_out)?;
        let rows = self.table.rows_for_gradient(bags.ids());
        let row_bags = Bags::new(&rows, bags.offsets(), bags.weights())?;
        self.grad
            .accumulate_pooled(&self.table.weights, &row_bags, pooling, grad_out)
    }

    /// Applies the accumulated gradient with the optimizer, rescales the
    /// updated rows to the [`max_norm`](Self::set_max_norm) if set, clears
    /// the gradient, and ends the table's step ([`DynamicTable::step`]).
    ///
    /// # Errors
    /// As the optimizer's `step`; the table, the optimizer and the
    /// gradient are then unchanged (but for the default row's share).
    pub fn step(&mut self) -> Result<()> {
        self.table
            .apply(&mut self.optimizer, &mut self.grad, self.max_norm)?;
        self.grad.clear();
        self.table.advance(&mut self.optimizer)
    }

    /// Drops the gradient accumulated since the last step.
    pub fn clear_grad(&mut self) {
        self.grad.clear();
    }

    /// Brings every row current (`Semantics::DenseExact`).
    ///
    /// # Errors
    /// As [`DynamicTable::flush`].
    pub fn flush(&mut self) -> Result<()> {
        self.table.flush(&mut self.optimizer)
    }

    /// [`DynamicTable::export_changes`], with the changed rows brought
    /// current first under `Semantics::DenseExact`.
    ///
    /// # Errors
    /// As [`DynamicTable::export_changes`] and the optimizer's `catch_up`.
    pub fn export_changes(&mut self) -> Result<super::Changes> {
        if self.optimizer.has_lagging_rows()
            && let Some(log) = &self.table.changes
        {
            let rows: Vec<usize> = log
                .rows
                .iter()
                .map(|&r| r as usize)
                .filter(|&r| r != DEFAULT_ROW as usize && self.table.meta[r].occupied())
                .collect();
            self.optimizer.catch_up(&mut self.table.weights, &rows)?;
        }
        self.table.export_changes()
    }

    /// The rows of `ids`, admitting new keys (in the reused buffer).
    fn translate<I: Index>(&mut self, ids: &[I]) -> Result<Vec<u32>> {
        let mut rows = std::mem::take(&mut self.rows);
        self.table
            .translate_into(ids, &mut self.optimizer, &mut rows)?;
        Ok(rows)
    }

    /// Brings the rows about to be read current (DenseExact).
    fn catch_up(&mut self, rows: &[u32]) -> Result<()> {
        if !self.optimizer.has_lagging_rows() {
            return Ok(());
        }
        let rows: Vec<usize> = rows
            .iter()
            .filter(|&&r| r != DEFAULT_ROW)
            .map(|&r| r as usize)
            .collect();
        self.optimizer.catch_up(&mut self.table.weights, &rows)
    }
}

impl<O: SparseOptimizer> EmbeddingLayer for DynamicEmbedding<O> {
    fn dim(&self) -> usize {
        self.table.dim()
    }
    fn forward_into<I: Index>(&mut self, ids: &[I], out: &mut [f32]) -> Result<()> {
        DynamicEmbedding::forward_into(self, ids, out)
    }
    fn backward<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()> {
        DynamicEmbedding::backward(self, ids, grad_out)
    }
    fn forward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()> {
        DynamicEmbedding::forward_pooled(self, bags, pooling, out)
    }
    fn backward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
    ) -> Result<()> {
        DynamicEmbedding::backward_pooled(self, bags, pooling, grad_out)
    }
    fn step(&mut self) -> Result<()> {
        DynamicEmbedding::step(self)
    }
    fn flush(&mut self) -> Result<()> {
        DynamicEmbedding::flush(self)
    }
}
