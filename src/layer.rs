//! `Embedding`: a table, its optimizer and its gradient, with the options
//! users of Keras' `Embedding` and PyTorch's `nn.Embedding` expect.
//!
//! The layer ties the lower layers together: `forward` looks rows up,
//! `backward` accumulates the sparse gradient (several forward/backward
//! pairs may share one step, as two features sharing a table do), `step`
//! applies it with the optimizer and clears it.

use crate::grad::check_finite;
use crate::index::Index;
use crate::optim::SparseOptimizer;
use crate::{Bags, EmbeddingTable, Error, Pooling, Result, SparseGrad};

/// What a lookup does with an id outside `0..rows`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutOfRange {
    /// Return [`Error::IndexOutOfRange`] naming the position, the id and the
    /// row count (the default: a wrong id is a bug to report, not to hide).
    #[default]
    Error,
    /// Look up a zero vector that receives no gradient (old Keras and
    /// TensorFlow-on-GPU behaviour). In pooled lookups the id is left out of
    /// its bag, as a padding id is.
    Zero,
    /// Use `id mod rows` (the hashing trick). Negative ids are still errors.
    Modulo,
    /// Use this row instead, which is trained like any other (TensorFlow's
    /// `safe_embedding_lookup_sparse` `default_id`).
    DefaultRow(usize),
}

/// Options of an [`Embedding`] layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmbeddingOptions {
    /// A row that is zero, contributes nothing to pooled outputs, receives
    /// no gradient and never changes, nor does its optimizer state
    /// (PyTorch's `padding_idx`). Any row may be the padding row.
    pub padding_idx: Option<usize>,
    /// What to do with ids outside the table.
    pub out_of_range: OutOfRange,
    /// `false` freezes the table (Keras `trainable=False`, PyTorch
    /// `freeze=True`): `backward` and `step` validate their input and then
    /// change nothing.
    pub trainable: bool,
    /// After each step, rows just updated whose L2 norm exceeds this are
    /// rescaled to it (Keras' `MaxNorm` constraint applied sparsely;
    /// PyTorch's `max_norm`, but never written by a lookup).
    pub max_norm: Option<f32>,
}

impl Default for EmbeddingOptions {
    fn default() -> Self {
        Self {
            padding_idx: None,
            out_of_range: OutOfRange::Error,
            trainable: true,
            max_norm: None,
        }
    }
}

/// An embedding layer: a table, an optimizer, and the gradient pending
/// for the next [`step`](Self::step).
///
/// # Examples
/// ```
/// use embtable::{Adagrad, Embedding, EmbeddingTable, Init};
/// let table = EmbeddingTable::new(1000, 64, Init::default(), 7)?;
/// let mut layer = Embedding::new(table, Adagrad::default());
/// let ids: Vec<i64> = (0..32 * 10).map(|i| i % 1000).collect(); // a (32, 10) batch
/// let out = layer.forward(&ids)?;
/// assert_eq!(out.len(), 32 * 10 * 64);
/// layer.backward(&ids, &vec![0.1; out.len()])?;
/// layer.step()?;
/// assert_ne!(layer.table().row(0), &out[..64]); // row 0 was trained
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Embedding<O> {
    table: EmbeddingTable,
    optimizer: O,
    grad: SparseGrad,
    options: EmbeddingOptions,
}

/// Ids after the out-of-range policy: either the ids as given (all valid,
/// none to drop) or one row per position, `DROPPED` where the position
/// looks up zeros and gets no gradient.
enum Resolved<'a, I> {
    Direct(&'a [I]),
    Mapped(Vec<usize>),
}

/// A position whose id looks up a zero vector and receives no gradient.
const DROPPED: usize = usize::MAX;

impl<O: SparseOptimizer> Embedding<O> {
    /// A trainable layer with default options.
    pub fn new(table: EmbeddingTable, optimizer: O) -> Self {
        let grad = SparseGrad::for_table(&table);
        Self {
            table,
            optimizer,
            grad,
            options: EmbeddingOptions::default(),
        }
    }

    /// A layer with `options`. The padding row, if any, is zeroed.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `padding_idx` or `DefaultRow` is not a
    /// row of the table, or `max_norm` is not finite and positive.
    pub fn with_options(
        mut table: EmbeddingTable,
        optimizer: O,
        options: EmbeddingOptions,
    ) -> Result<Self> {
        let rows = table.rows();
        if let Some(p) = options.padding_idx.filter(|&p| p >= rows) {
            return Err(Error::InvalidConfig {
                field: "padding_idx",
                reason: format!("row {p} is not below the table's {rows} rows"),
            });
        }
        if let OutOfRange::DefaultRow(r) = options.out_of_range
            && r >= rows
        {
            return Err(Error::InvalidConfig {
                field: "out_of_range",
                reason: format!("default row {r} is not below the table's {rows} rows"),
            });
        }
        if let Some(m) = options.max_norm.filter(|m| !(m.is_finite() && *m > 0.0)) {
            return Err(Error::InvalidConfig {
                field: "max_norm",
                reason: format!("{m} is not a finite positive number"),
            });
        }
        if let Some(p) = options.padding_idx {
            table.row_mut(p).fill(0.0);
        }
        Ok(Self {
            options,
            ..Self::new(table, optimizer)
        })
    }

    /// The table. Under `Semantics::DenseExact`, rows not looked up since
    /// they last missed steps are behind until [`flush`](Self::flush).
    pub fn table(&self) -> &EmbeddingTable {
        &self.table
    }

    /// The table, to edit rows in place (PyTorch's
    /// `with torch.no_grad(): emb.weight[i] = …`, or loading saved weights).
    ///
    /// The padding row stays a padding row whatever is written to it:
    /// lookups of `padding_idx` still give zeros and it never trains.
    pub fn table_mut(&mut self) -> &mut EmbeddingTable {
        &mut self.table
    }

    /// Drops the gradient accumulated since the last step, e.g. after a
    /// step failed and the batch is to be skipped.
    pub fn clear_grad(&mut self) {
        self.grad.clear();
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The options.
    pub fn options(&self) -> &EmbeddingOptions {
        &self.options
    }

    /// The gradient accumulated since the last step.
    pub fn grad(&self) -> &SparseGrad {
        &self.grad
    }

    /// The table and the optimizer, for checkpoints or reuse.
    pub fn into_parts(self) -> (EmbeddingTable, O) {
        (self.table, self.optimizer)
    }

    /// Keras' `mask_zero`: `true` where the id is not 0.
    ///
    /// A mask for downstream layers (RNNs, attention, pooling); it does not
    /// change what the lookup returns.
    pub fn mask<I: Index>(&self, ids: &[I]) -> Vec<bool> {
        ids.iter().map(|id| id.widen() != 0).collect()
    }

    /// The rows of `ids`: `ids.len() * dim` floats, row-major.
    ///
    /// # Errors
    /// As [`forward_into`](Self::forward_into).
    pub fn forward<I: Index>(&mut self, ids: &[I]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; ids.len() * self.table.dim()];
        self.forward_into(ids, &mut out)?;
        Ok(out)
    }

    /// Writes the rows of `ids` to `out` (`ids.len() * dim` floats).
    ///
    /// Under `Semantics::DenseExact` the looked-up rows are first brought
    /// current, so outputs equal the dense optimizer's at every step.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a wrong `out` length;
    /// [`Error::IndexOutOfRange`] for an id the policy rejects. Nothing is
    /// written on error.
    pub fn forward_into<I: Index>(&mut self, ids: &[I], out: &mut [f32]) -> Result<()> {
        let dim = self.table.dim();
        let expected = ids.len().saturating_mul(dim);
        Error::check_len("forward output length (ids * dim)", expected, out.len())?;
        let resolved = self.resolve(ids)?;
        self.catch_up(&resolved)?;
        match resolved {
            Resolved::Direct(ids) => self.table.lookup(ids, out),
            Resolved::Mapped(rows) => {
                let rows_or_zero: Vec<usize> = rows
                    .iter()
                    .map(|&r| if r == DROPPED { 0 } else { r })
                    .collect();
                self.table.lookup(&rows_or_zero, out)?;
                for (j, _) in rows.iter().enumerate().filter(|(_, r)| **r == DROPPED) {
                    out[j * dim..][..dim].fill(0.0);
                }
                Ok(())
            }
        }
    }

    /// Accumulates the gradient of [`forward`](Self::forward) given
    /// `grad_out`, the gradient of its output. Calls add up until
    /// [`step`](Self::step). Padding and dropped ids receive nothing.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::IndexOutOfRange`],
    /// [`Error::NonFinite`]; nothing is accumulated on error.
    pub fn backward<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()> {
        let dim = self.table.dim();
        let expected = ids.len().saturating_mul(dim);
        Error::check_len("gradient length (ids * dim)", expected, grad_out.len())?;
        check_finite("gradient", grad_out)?;
        let resolved = self.resolve(ids)?;
        if !self.options.trainable {
            return Ok(());
        }
        match resolved {
            Resolved::Direct(ids) => self.grad.accumulate_lookup(ids, grad_out),
            Resolved::Mapped(rows) => {
                let mut kept_rows = Vec::with_capacity(rows.len());
                let mut kept_grad = Vec::with_capacity(grad_out.len());
                for (j, &r) in rows.iter().enumerate() {
                    if r != DROPPED {
                        kept_rows.push(r);
                        kept_grad.extend_from_slice(&grad_out[j * dim..][..dim]);
                    }
                }
                self.grad.accumulate_lookup(&kept_rows, &kept_grad)
            }
        }
    }

    /// Pools the rows of each bag into `out` (`bags.len() * dim` floats).
    /// Padding ids (and ids dropped by `OutOfRange::Zero`) are left out of
    /// their bags: they add nothing and do not count in `Mean`/`SqrtN`.
    ///
    /// # Errors
    /// As [`EmbeddingTable::pooled_lookup`], with ids resolved by the
    /// out-of-range policy first. Nothing is written on error.
    pub fn forward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()> {
        let expected = bags.len().saturating_mul(self.table.dim());
        Error::check_len("pooled output length (bags * dim)", expected, out.len())?;
        // Everything is checked before the catch-up writes to the table.
        let resolved = self.resolve(bags.ids())?;
        match &resolved {
            Resolved::Direct(_) => {
                self.table.check_pooled(bags, pooling)?;
                self.catch_up(&resolved)?;
                self.table.pooled_lookup(bags, pooling, out)
            }
            Resolved::Mapped(rows) => {
                let kept = KeptBags::new(bags, rows);
                let kept = kept.bags()?;
                self.table.check_pooled(&kept, pooling)?;
                self.catch_up(&resolved)?;
                self.table.pooled_lookup(&kept, pooling, out)
            }
        }
    }

    /// Accumulates the gradient of [`forward_pooled`](Self::forward_pooled)
    /// given `grad_out` (`bags.len() * dim` floats).
    ///
    /// # Errors
    /// As [`SparseGrad::accumulate_pooled`]; nothing is accumulated on error.
    pub fn backward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
    ) -> Result<()> {
        let expected = bags.len().saturating_mul(self.table.dim());
        Error::check_len(
            "pooled gradient length (bags * dim)",
            expected,
            grad_out.len(),
        )?;
        check_finite("gradient", grad_out)?;
        let resolved = self.resolve(bags.ids())?;
        if !self.options.trainable {
            return Ok(());
        }
        match resolved {
            Resolved::Direct(_) => {
                self.grad
                    .accumulate_pooled(&self.table, bags, pooling, grad_out)
            }
            Resolved::Mapped(rows) => {
                let kept = KeptBags::new(bags, &rows);
                self.grad
                    .accumulate_pooled(&self.table, &kept.bags()?, pooling, grad_out)
            }
        }
    }

    /// Applies the accumulated gradient with the optimizer, rescales the
    /// updated rows to `max_norm` if set, and clears the gradient.
    ///
    /// # Errors
    /// As the optimizer's `step`; the gradient is kept on error.
    pub fn step(&mut self) -> Result<()> {
        if self.options.trainable {
            self.optimizer.step(&mut self.table, &self.grad)?;
            if let Some(max_norm) = self.options.max_norm {
                self.table.renorm_rows(self.grad.rows(), max_norm)?;
            }
        }
        self.grad.clear();
        Ok(())
    }

    /// Brings every row current (`Semantics::DenseExact`), e.g. before
    /// reading the whole table or saving a checkpoint.
    ///
    /// # Errors
    /// As the optimizer's `flush`.
    pub fn flush(&mut self) -> Result<()> {
        if self.options.trainable {
            self.optimizer.flush(&mut self.table)?;
        }
        Ok(())
    }

    /// Applies the out-of-range policy and finds padding ids.
    fn resolve<'a, I: Index>(&self, ids: &'a [I]) -> Result<Resolved<'a, I>> {
        let rows = self.table.rows();
        let padding = self.options.padding_idx;
        if self.options.out_of_range == OutOfRange::Error {
            crate::index::validate_ids(ids, rows)?;
            let has_padding = padding.is_some_and(|p| ids.iter().any(|id| id.row() == Some(p)));
            if !has_padding {
                return Ok(Resolved::Direct(ids));
            }
        }
        let mut mapped = Vec::with_capacity(ids.len());
        for (position, &id) in ids.iter().enumerate() {
            let out_of_range = || Error::IndexOutOfRange {
                position,
                index: id.widen(),
                rows,
            };
            let row = match (id.row(), self.options.out_of_range) {
                (Some(r), _) if r < rows => r,
                (_, OutOfRange::Error) => return Err(out_of_range()),
                (_, OutOfRange::Zero) => DROPPED,
                (Some(r), OutOfRange::Modulo) => r % rows,
                (None, OutOfRange::Modulo) => return Err(out_of_range()),
                (_, OutOfRange::DefaultRow(d)) => d,
            };
            mapped.push(if Some(row) == padding { DROPPED } else { row });
        }
        Ok(Resolved::Mapped(mapped))
    }

    /// Brings the rows about to be looked up current (DenseExact).
    fn catch_up<I: Index>(&mut self, resolved: &Resolved<'_, I>) -> Result<()> {
        if !self.options.trainable || !self.optimizer.has_lagging_rows() {
            return Ok(());
        }
        let rows: Vec<usize> = match resolved {
            // Direct ids were validated by `resolve`.
            Resolved::Direct(ids) => ids.iter().filter_map(|id| id.row()).collect(),
            Resolved::Mapped(rows) => rows.iter().copied().filter(|&r| r != DROPPED).collect(),
        };
        self.optimizer.catch_up(&mut self.table, &rows)
    }
}

/// Bags with the dropped positions (padding, `OutOfRange::Zero`) removed.
struct KeptBags {
    ids: Vec<usize>,
    offsets: Vec<usize>,
    weights: Option<Vec<f32>>,
}

impl KeptBags {
    fn new<I: Index>(bags: &Bags<'_, I>, rows: &[usize]) -> Self {
        let mut kept = KeptBags {
            ids: Vec::with_capacity(rows.len()),
            offsets: Vec::with_capacity(bags.len() + 1),
            weights: bags.weights().map(|_| Vec::with_capacity(rows.len())),
        };
        kept.offsets.push(0);
        for b in 0..bags.len() {
            for j in bags.range(b) {
                if rows[j] != DROPPED {
                    kept.ids.push(rows[j]);
                    if let (Some(w), Some(all)) = (kept.weights.as_mut(), bags.weights()) {
                        w.push(all[j]);
                    }
                }
            }
            kept.offsets.push(kept.ids.len());
        }
        kept
    }

    fn bags(&self) -> Result<Bags<'_, usize>> {
        Bags::new(&self.ids, &self.offsets, self.weights.as_deref())
    }
}
