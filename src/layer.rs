//! `Embedding`: a table, its optimizer and its gradient, with the options
//! users of Keras' `Embedding` and PyTorch's `nn.Embedding` expect.
//!
//! The layer ties the lower layers together: `forward` looks rows up,
//! `backward` accumulates the sparse gradient (several forward/backward
//! pairs may share one step, as two features sharing a table do), `step`
//! applies it with the optimizer and clears it.

use std::any::Any;
use std::borrow::Borrow;

use crate::grad::check_finite;
use crate::index::Index;
use crate::io::{Coverage, Pretrained, TableOptions};
use crate::kernels;
use crate::optim::{OptimizerState, SparseOptimizer};
use crate::pool::{check_coefficients, check_max_weights};
use crate::tensor::Tensor;
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
    /// change nothing. [`Embedding::set_trainable`] changes it later, as
    /// Keras' `layer.trainable = True` does for fine-tuning.
    pub trainable: bool,
    /// Rows whose L2 norm exceeds this are rescaled to it, when
    /// [`max_norm_at`](Self::max_norm_at) says: after each step (the
    /// default) or when looked up.
    pub max_norm: Option<f32>,
    /// When `max_norm` applies. Default [`MaxNormAt::Step`].
    pub max_norm_at: MaxNormAt,
}

/// When an [`Embedding`]'s `max_norm` rescales rows. Either way a row
/// whose L2 norm exceeds `max_norm` is multiplied by
/// `max_norm / (norm + 1e-7)` (see [`EmbeddingTable::renorm_rows`]), and
/// only rows the batch touches are visited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MaxNormAt {
    /// After each [`step`](Embedding::step), the rows just updated: Keras'
    /// `embeddings_constraint=MaxNorm(max_value)`, which Keras applies to
    /// the weights after each optimizer update (here to the updated rows
    /// only, which are the only ones a step can push past the bound).
    /// Lookups never write to the table.
    #[default]
    Step,
    /// In every forward pass, the rows about to be looked up, before they
    /// are read: PyTorch's `nn.Embedding(max_norm=…)` and
    /// `EmbeddingBag(max_norm=…)`. **This writes to the table** during
    /// `forward`, `forward_into` and `forward_pooled`, as PyTorch does in
    /// place, even on a frozen layer; nothing happens after a step.
    Lookup,
}

impl Default for EmbeddingOptions {
    fn default() -> Self {
        Self {
            padding_idx: None,
            out_of_range: OutOfRange::Error,
            trainable: true,
            max_norm: None,
            max_norm_at: MaxNormAt::Step,
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
        check_options(&options, table.rows())?;
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

    /// The table, to edit rows in place: PyTorch's
    /// `with torch.no_grad(): emb.weight[i] = v`, Keras' `set_weights`.
    ///
    /// The padding row stays a padding row whatever is written to it:
    /// lookups of `padding_idx` still give zeros and it never trains. Under
    /// `Semantics::DenseExact`, call [`flush`](Self::flush) before editing
    /// rows, or the steps a row missed before the edit would still be
    /// applied to it afterwards.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Embedding, EmbeddingTable, Sgd};
    /// let mut layer = Embedding::new(EmbeddingTable::zeros(4, 2)?, Sgd::default());
    /// layer.table_mut().row_mut(3).copy_from_slice(&[0.5, -0.5]);
    /// assert_eq!(layer.forward(&[3u32])?, [0.5, -0.5]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn table_mut(&mut self) -> &mut EmbeddingTable {
        &mut self.table
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The optimizer, to change its settings between steps (its learning
    /// rate, say) or replace it.
    ///
    /// Under `Semantics::DenseExact`, [`flush`](Self::flush) before
    /// replacing the optimizer: the rows that lag behind catch up only
    /// through the optimizer that saw their missed steps.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Adagrad, AdagradConfig, Embedding, EmbeddingTable};
    /// let mut layer = Embedding::new(EmbeddingTable::zeros(4, 2)?, Adagrad::default());
    /// *layer.optimizer_mut() = Adagrad::new(AdagradConfig { lr: 0.1, ..Default::default() });
    /// assert_eq!(layer.optimizer().config().lr, 0.1);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    /// The options.
    pub fn options(&self) -> &EmbeddingOptions {
        &self.options
    }

    /// Changes the options of a built layer, as Keras lets a user set
    /// `layer.trainable` between fits.
    ///
    /// A new padding row is set to zeros, its optimizer state too (under
    /// `Semantics::DenseExact` every row is first brought current), so that
    /// it stays zero from then on.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`], with the layer unchanged, if the options
    /// are invalid (as [`with_options`](Self::with_options) checks them),
    /// if `trainable` is set on a layer whose optimizer is [`Frozen`] (give
    /// it one with [`Embedding::unfreeze`]), or if a pending gradient
    /// would be lost or misapplied: freezing a layer whose gradient is not
    /// stepped yet, or making padding a row that gradient names. Call
    /// [`step`](Self::step) or [`clear_grad`](Self::clear_grad) first.
    /// The errors of the optimizer's `flush` and `load_state` when a new
    /// padding row must be made current.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Embedding, EmbeddingOptions, EmbeddingTable, Init, Sgd};
    /// let table = EmbeddingTable::new(10, 4, Init::default(), 1)?;
    /// let mut layer = Embedding::new(table, Sgd::default());
    /// layer.set_options(EmbeddingOptions { padding_idx: Some(0), max_norm: Some(1.0), ..Default::default() })?;
    /// assert_eq!(layer.table().row(0), &[0.0; 4]);
    /// assert!(layer.set_options(EmbeddingOptions { padding_idx: Some(10), ..Default::default() }).is_err());
    /// assert_eq!(layer.options().max_norm, Some(1.0)); // unchanged by the refused call
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn set_options(&mut self, options: EmbeddingOptions) -> Result<()>
    where
        O: 'static,
    {
        check_options(&options, self.table.rows())?;
        if options.trainable && (&self.optimizer as &dyn Any).is::<Frozen>() {
            return Err(Error::InvalidConfig {
                field: "trainable",
                reason: "true, but the layer's optimizer is Frozen; give it an optimizer \
                         with Embedding::unfreeze"
                    .into(),
            });
        }
        let new_padding = options
            .padding_idx
            .filter(|&p| Some(p) != self.options.padding_idx);
        if !self.grad.is_empty() {
            let pending = |field, what: &str| Error::InvalidConfig {
                field,
                reason: format!(
                    "{what} while a gradient for {} is pending; call step() to apply it \
                     or clear_grad() to drop it first",
                    crate::error::count(self.grad.len(), "row")
                ),
            };
            if self.options.trainable && !options.trainable {
                return Err(pending("trainable", "cannot freeze the layer"));
            }
            if let Some(p) = new_padding.filter(|p| self.grad.rows().contains(p)) {
                return Err(pending(
                    "padding_idx",
                    &format!("cannot make row {p} padding"),
                ));
            }
        }
        if let Some(p) = new_padding {
            self.zero_row_and_state(p)?;
        }
        self.options = options;
        Ok(())
    }

    /// Freezes or unfreezes the table: Keras' `layer.trainable = …`,
    /// PyTorch's `weight.requires_grad_(…)`. A shorthand for
    /// [`set_options`](Self::set_options) with only `trainable` changed.
    ///
    /// # Errors
    /// As [`set_options`](Self::set_options): freezing a layer with a
    /// pending gradient, or unfreezing one whose optimizer is [`Frozen`].
    ///
    /// # Examples
    /// Train a few steps frozen (nothing changes), then fine-tune:
    /// ```
    /// use embtable::{Adagrad, Embedding, EmbeddingTable, Init};
    /// let table = EmbeddingTable::new(10, 4, Init::default(), 1)?;
    /// let before = table.clone();
    /// let mut layer = Embedding::new(table, Adagrad::default());
    /// layer.set_trainable(false)?;
    /// layer.backward(&[3u32], &[1.0; 4])?;
    /// layer.step()?;
    /// assert_eq!(layer.table(), &before);
    ///
    /// layer.set_trainable(true)?;
    /// layer.backward(&[3u32], &[1.0; 4])?;
    /// assert!(layer.set_trainable(false).is_err()); // the gradient would be lost
    /// layer.step()?;
    /// assert_ne!(layer.table().row(3), before.row(3));
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn set_trainable(&mut self, trainable: bool) -> Result<()>
    where
        O: 'static,
    {
        self.set_options(EmbeddingOptions {
            trainable,
            ..self.options
        })
    }

    /// The gradient accumulated since the last step.
    pub fn grad(&self) -> &SparseGrad {
        &self.grad
    }

    /// The table, the optimizer and the gradient not stepped yet (empty
    /// after a [`step`](Self::step)), for checkpoints or reuse. The
    /// gradient is handed back rather than dropped: apply it with
    /// `optimizer.step(&mut table, &grad)` or drop it knowingly.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Embedding, EmbeddingTable, Sgd, SparseOptimizer};
    /// let mut layer = Embedding::new(EmbeddingTable::zeros(4, 2)?, Sgd::default());
    /// layer.backward(&[1u32], &[1.0, 1.0])?;
    /// let (mut table, mut sgd, grad) = layer.into_parts();
    /// assert_eq!(grad.rows(), &[1]);
    /// sgd.step(&mut table, &grad)?;
    /// assert_eq!(table.row(1), &[-0.01, -0.01]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn into_parts(self) -> (EmbeddingTable, O, SparseGrad) {
        (self.table, self.optimizer, self.grad)
    }

    /// The rows of an n-d batch of ids: a tensor of shape
    /// `ids.shape() + [dim]`, as `keras.layers.Embedding` and
    /// `nn.Embedding` return for a `(batch, seq_len)` input.
    ///
    /// # Errors
    /// As [`forward_into`](Self::forward_into), with positions counted in
    /// the ids' row-major order.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Embedding, EmbeddingTable, Init, Sgd, Tensor};
    /// let table = EmbeddingTable::new(1000, 64, Init::default(), 7)?;
    /// let mut layer = Embedding::new(table, Sgd::default());
    /// let ids = Tensor::new((0..32 * 10).collect::<Vec<i64>>(), [32, 10])?;
    /// let out = layer.forward_nd(&ids)?;
    /// assert_eq!(out.shape(), &[32, 10, 64]);
    /// assert_eq!(out.at(&[3, 4]), layer.table().row(34));
    /// let mask = layer.mask_nd(&ids); // Keras' mask_zero
    /// assert_eq!((mask.shape(), mask.at(&[0, 0])), (&[32, 10][..], &[false][..]));
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn forward_nd<I: Index>(&mut self, ids: &Tensor<I>) -> Result<Tensor<f32>> {
        let out = self.forward(ids.as_slice())?;
        Tensor::new(out, [ids.shape(), &[self.table.dim()]].concat())
    }

    /// Accumulates the gradient of [`forward_nd`](Self::forward_nd) given
    /// `grad_out`, the gradient of its output, of the same shape.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `grad_out`'s shape is not
    /// `ids.shape() + [dim]` (naming the first axis that differs, or the
    /// rank); as [`backward`](Self::backward) otherwise. Nothing is
    /// accumulated on error.
    pub fn backward_nd<I: Index>(&mut self, ids: &Tensor<I>, grad_out: &Tensor<f32>) -> Result<()> {
        let want = [ids.shape(), &[self.table.dim()]].concat();
        check_shape(&want, grad_out.shape())?;
        self.backward(ids.as_slice(), grad_out.as_slice())
    }

    /// Keras' `mask_zero` over an n-d batch: `true` where the id is not 0,
    /// in a tensor of the ids' shape.
    pub fn mask_nd<I: Index>(&self, ids: &Tensor<I>) -> Tensor<bool> {
        Tensor::new(self.mask(ids.as_slice()), ids.shape()).expect("one mask value per id")
    }

    /// Saves the whole layer to `path`: the table, the optimizer's state and
    /// config, and the options, as a [`Checkpoint`](crate::io::Checkpoint)
    /// holding one layer named `embedding`. [`load`](Self::load) gives it
    /// back; training then resumes bit for bit.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `grad`) if a gradient is pending (it
    /// would be lost: [`step`](Self::step) or [`clear_grad`](Self::clear_grad)
    /// first); the errors of [`Checkpoint::save`](crate::io::Checkpoint::save).
    /// `path` is unchanged on error.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Adagrad, Embedding, EmbeddingOptions, EmbeddingTable, Init};
    /// let table = EmbeddingTable::new(50, 4, Init::default(), 3)?;
    /// let options = EmbeddingOptions { padding_idx: Some(0), max_norm: Some(1.0), ..Default::default() };
    /// let mut layer = Embedding::with_options(table, Adagrad::default(), options)?;
    /// layer.backward(&[7u32], &[0.5; 4])?;
    /// layer.step()?;
    /// let path = std::env::temp_dir().join("embtable-doc-layer-save.safetensors");
    /// layer.save(&path)?;
    /// let loaded = Embedding::load(&path, Adagrad::default())?;
    /// assert_eq!(loaded.table(), layer.table());
    /// assert_eq!(loaded.options(), layer.options());
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::io::Checkpoint::new()
            .with_layer("embedding", self)?
            .save(path)
    }

    /// Loads a layer saved by [`save`](Self::save) (or a checkpoint of one
    /// table), with `optimizer` taking the saved optimizer state and
    /// config: a fresh optimizer of the saved kind will do ([`Frozen`] for
    /// a frozen layer built without one).
    ///
    /// # Errors
    /// The errors of [`Checkpoint::load`](crate::io::Checkpoint::load);
    /// [`Error::InvalidConfig`] (field `name`) if the file holds several
    /// tables (load it with `Checkpoint::load` and
    /// [`restore_layer`](crate::io::Checkpoint::restore_layer) each);
    /// (field `kind`) if `optimizer` is not of the saved kind.
    pub fn load(path: impl AsRef<std::path::Path>, optimizer: O) -> Result<Self> {
        let mut ckpt = crate::io::Checkpoint::load(path)?;
        let names: Vec<String> = ckpt.names().map(str::to_owned).collect();
        match names.as_slice() {
            [name] => ckpt.restore_layer(name, optimizer),
            _ => Err(Error::InvalidConfig {
                field: "name",
                reason: format!(
                    "the checkpoint holds {} tables {names:?}, not one; use \
                     Checkpoint::load and restore_layer each by name",
                    names.len()
                ),
            }),
        }
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
    /// As [`forward_into`](Self::forward_into); [`Error::Alloc`] if
    /// `ids.len() * dim` floats overflow.
    pub fn forward<I: Index>(&mut self, ids: &[I]) -> Result<Vec<f32>> {
        let len = Error::checked_product(ids.len(), self.table.dim(), "forward output")?;
        let mut out = vec![0.0; len];
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
        self.prepare_rows(&resolved)?;
        match resolved {
            Resolved::Direct(ids) => {
                // SAFETY: `resolve` validated every id against the table's
                // rows, and `out` holds `ids.len() * dim` floats (checked
                // above). (`lookup` would validate the ids a second time.)
                unsafe { self.table.gather_unchecked(kernels::current(), ids, out) };
                Ok(())
            }
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
                // `resolve` validated the ids: the rest of `check_pooled`.
                check_max_weights(bags, pooling)?;
                check_coefficients(bags, pooling)?;
                self.prepare_rows(&resolved)?;
                // SAFETY: every id is a row of the table (`resolve`), `out`
                // holds `bags.len() * dim` floats (checked above), and the
                // other checks of `check_pooled` passed just above.
                unsafe {
                    self.table
                        .pool_unchecked(kernels::current(), bags, pooling, out)
                };
                Ok(())
            }
            Resolved::Mapped(rows) => {
                let kept = KeptBags::new(bags, rows);
                let kept = kept.bags()?;
                self.table.check_pooled(&kept, pooling)?;
                self.prepare_rows(&resolved)?;
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
    /// updated rows to `max_norm` if set (under [`MaxNormAt::Step`]), and
    /// clears the gradient.
    ///
    /// # Errors
    /// As the optimizer's `step`, among them [`Error::NonFinite`] when
    /// finite gradients summed to infinity (two of `3e38` for one row). The
    /// table and optimizer are then unchanged and the gradient is kept, to
    /// be looked at through [`grad`](Self::grad); call
    /// [`clear_grad`](Self::clear_grad) to drop it and go on with the next
    /// batch (as PyTorch's `GradScaler` skips a step whose gradients
    /// overflowed), or every later step fails the same way.
    pub fn step(&mut self) -> Result<()> {
        if self.options.trainable {
            self.optimizer.step(&mut self.table, &self.grad)?;
            if let Some(max_norm) = self
                .options
                .max_norm
                .filter(|_| self.options.max_norm_at == MaxNormAt::Step)
            {
                self.table.renorm_rows(self.grad.rows(), max_norm)?;
            }
        }
        self.grad.clear();
        Ok(())
    }

    /// Drops the gradient accumulated since the last step, without applying
    /// it: the way out after a [`step`](Self::step) that failed (PyTorch's
    /// `zero_grad`).
    pub fn clear_grad(&mut self) {
        self.grad.clear();
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

    /// Sets row `p` and its optimizer state to zero, every row current
    /// first, so that no later catch-up moves it (a zero-gradient step maps
    /// an all-zero row and state to zero).
    ///
    /// Only an optimizer whose rows can lag (`Semantics::DenseExact`) moves
    /// a row it is not given a gradient for, so only its state is zeroed;
    /// other optimizers' state (an Adagrad accumulator) is left as it is, so
    /// the row trains as before if it stops being padding. (FTRL's zeroed
    /// accumulators give a zero weight: its formula sets a lane whose `z`
    /// is within the L1 strength, here 0, to exactly 0.)
    fn zero_row_and_state(&mut self, p: usize) -> Result<()> {
        if self.optimizer.has_lagging_rows() {
            self.optimizer.flush(&mut self.table)?;
            let mut state = self.optimizer.state();
            if let Some((_, dim)) = state.shape {
                for array in &mut state.arrays {
                    let width = if array.shape.len() == 2 { dim } else { 1 };
                    array.values[p * width..][..width].fill(0.0);
                }
                self.optimizer.load_state(state)?;
            }
        }
        self.table.row_mut(p).fill(0.0);
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

    /// Readies the rows about to be looked up: brings them current
    /// (DenseExact), then rescales them to `max_norm` under
    /// [`MaxNormAt::Lookup`].
    fn prepare_rows<I: Index>(&mut self, resolved: &Resolved<'_, I>) -> Result<()> {
        let lagging = self.options.trainable && self.optimizer.has_lagging_rows();
        let renorm = self
            .options
            .max_norm
            .filter(|_| self.options.max_norm_at == MaxNormAt::Lookup);
        if !lagging && renorm.is_none() {
            return Ok(());
        }
        let rows: Vec<usize> = match resolved {
            // Direct ids were validated by `resolve`.
            Resolved::Direct(ids) => ids.iter().filter_map(|id| id.row()).collect(),
            Resolved::Mapped(rows) => rows.iter().copied().filter(|&r| r != DROPPED).collect(),
        };
        if lagging {
            self.optimizer.catch_up(&mut self.table, &rows)?;
        }
        if let Some(max_norm) = renorm {
            self.table.renorm_rows(&rows, max_norm)?;
        }
        Ok(())
    }
}

/// `Err` unless an n-d buffer's shape is `want`, naming the rank or the
/// first axis that differs.
fn check_shape(want: &[usize], got: &[usize]) -> Result<()> {
    Error::check_len("gradient rank (ids rank + 1)", want.len(), got.len())?;
    for (&w, &g) in want.iter().zip(got) {
        Error::check_len(
            "gradient shape (ids.shape + [dim]), first axis that differs",
            w,
            g,
        )?;
    }
    Ok(())
}

#[cfg(feature = "ndarray")]
impl<O: SparseOptimizer> Embedding<O> {
    /// [`forward_nd`](Self::forward_nd) for an `ndarray` array or view of
    /// ids of any dimension `D`: an array of dimension `D + 1`, the last
    /// axis of length `dim` (feature `ndarray`). Ids are read in logical
    /// order whatever the view's layout.
    ///
    /// # Errors
    /// As [`forward_into`](Self::forward_into).
    ///
    /// # Examples
    /// ```
    /// use embtable::{Embedding, EmbeddingTable, Init, Sgd};
    /// let table = EmbeddingTable::new(100, 8, Init::default(), 7)?;
    /// let mut layer = Embedding::new(table, Sgd::default());
    /// let ids = ndarray::Array2::from_shape_fn((4, 5), |(b, t)| (b * 5 + t) as i64);
    /// let out = layer.forward_array(&ids)?;
    /// assert_eq!(out.shape(), &[4, 5, 8]);
    /// assert_eq!(out[[1, 2, 3]], layer.table().row(7)[3]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn forward_array<I, S, D>(
        &mut self,
        ids: &ndarray::ArrayBase<S, D>,
    ) -> Result<ndarray::Array<f32, D::Larger>>
    where
        I: Index,
        S: ndarray::Data<Elem = I>,
        D: ndarray::Dimension,
    {
        let out = self.forward_nd(&Tensor::from_array(ids.view()))?;
        out.into_array()
    }

    /// [`backward_nd`](Self::backward_nd) for `ndarray` ids and an output
    /// gradient of the shape [`forward_array`](Self::forward_array) gave
    /// (feature `ndarray`).
    ///
    /// # Errors
    /// As [`backward_nd`](Self::backward_nd).
    pub fn backward_array<I, S, T, D>(
        &mut self,
        ids: &ndarray::ArrayBase<S, D>,
        grad_out: &ndarray::ArrayBase<T, D::Larger>,
    ) -> Result<()>
    where
        I: Index,
        S: ndarray::Data<Elem = I>,
        T: ndarray::Data<Elem = f32>,
        D: ndarray::Dimension,
    {
        self.backward_nd(
            &Tensor::from_array(ids.view()),
            &Tensor::from_array(grad_out.view()),
        )
    }

    /// Keras' `mask_zero` over `ndarray` ids: `true` where the id is not 0,
    /// in an array of the ids' shape (feature `ndarray`).
    pub fn mask_array<I, S, D>(&self, ids: &ndarray::ArrayBase<S, D>) -> ndarray::Array<bool, D>
    where
        I: Index,
        S: ndarray::Data<Elem = I>,
        D: ndarray::Dimension,
    {
        ids.map(|id| id.widen() != 0)
    }
}

/// `Err` unless `options` suit a table of `rows` rows.
pub(crate) fn check_options(options: &EmbeddingOptions, rows: usize) -> Result<()> {
    if let Some(p) = options.padding_idx.filter(|&p| p >= rows) {
        return Err(Error::InvalidConfig {
            field: "padding_idx",
            reason: format!(
                "row {p} is not below the table's {}",
                crate::error::count(rows, "row")
            ),
        });
    }
    if let OutOfRange::DefaultRow(r) = options.out_of_range
        && r >= rows
    {
        return Err(Error::InvalidConfig {
            field: "out_of_range",
            reason: format!(
                "default row {r} is not below the table's {}",
                crate::error::count(rows, "row")
            ),
        });
    }
    if let Some(m) = options.max_norm.filter(|m| !(m.is_finite() && *m > 0.0)) {
        return Err(Error::InvalidConfig {
            field: "max_norm",
            reason: format!("{m} is not a finite positive number"),
        });
    }
    Ok(())
}

/// The optimizer of a layer built without one: a frozen layer, such as
/// [`Embedding::frozen`] and [`Embedding::from_pretrained`] build (PyTorch's
/// `from_pretrained(freeze=True)`, Keras' `trainable=False`), which never
/// needs an optimizer until it is [unfrozen](Embedding::unfreeze).
///
/// Stepping it with a non-empty gradient is an [`Error::InvalidConfig`]
/// (field `optimizer`); an empty step and [`flush`](SparseOptimizer::flush)
/// do nothing. Its [`state`](SparseOptimizer::state) is kind `"frozen"`,
/// with no config, arrays or steps, so a frozen layer's checkpoint holds
/// no optimizer state to speak of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frozen;

impl SparseOptimizer for Frozen {
    fn step(&mut self, _table: &mut EmbeddingTable, grad: &SparseGrad) -> Result<()> {
        if grad.is_empty() {
            return Ok(());
        }
        Err(Error::InvalidConfig {
            field: "optimizer",
            reason: format!(
                "Frozen cannot apply a gradient (for {}); give the layer an optimizer with \
                 Embedding::unfreeze",
                crate::error::count(grad.len(), "row")
            ),
        })
    }

    fn flush(&mut self, _table: &mut EmbeddingTable) -> Result<()> {
        Ok(())
    }

    /// 0: a frozen layer applies no rate.
    fn lr(&self) -> f32 {
        0.0
    }

    /// Always an [`Error::InvalidConfig`] (field `lr`): there is no rate to
    /// set until the layer is unfrozen with an optimizer.
    fn set_lr(&mut self, lr: f32) -> Result<()> {
        Err(Error::InvalidConfig {
            field: "lr",
            reason: format!(
                "cannot set {lr} on Frozen, which never steps; give the layer an optimizer \
                 with Embedding::unfreeze"
            ),
        })
    }

    /// Ignored: a frozen layer never steps.
    fn set_schedule(&mut self, _schedule: Option<std::sync::Arc<dyn crate::optim::LrSchedule>>) {}

    fn steps(&self) -> u64 {
        0
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            kind: Frozen::KIND.into(),
            ..OptimizerState::default()
        }
    }

    fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        if state.kind != Frozen::KIND {
            return Err(Error::InvalidConfig {
                field: "kind",
                reason: format!(
                    "the saved optimizer is {:?}, not {:?}; load it into that optimizer",
                    state.kind,
                    Frozen::KIND
                ),
            });
        }
        if state != Frozen.state() {
            return Err(Error::InvalidConfig {
                field: "config",
                reason: "a frozen optimizer's state holds no config, steps or arrays".into(),
            });
        }
        Ok(())
    }
}

impl Frozen {
    /// The [`OptimizerState::kind`] of `Frozen`.
    pub const KIND: &str = "frozen";
}

impl Embedding<Frozen> {
    /// A frozen layer over `table`, with no optimizer: lookups only, until
    /// [`unfreeze`](Self::unfreeze)d (Keras' `trainable=False`).
    ///
    /// # Examples
    /// ```
    /// use embtable::{Embedding, EmbeddingTable};
    /// let mut layer = Embedding::frozen(EmbeddingTable::from_rows(2, 2, &[1., 2., 3., 4.])?);
    /// assert_eq!(layer.forward(&[1u32])?, [3., 4.]);
    /// assert!(!layer.options().trainable);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn frozen(table: EmbeddingTable) -> Self {
        let mut layer = Self::new(table, Frozen);
        layer.options.trainable = false;
        layer
    }

    /// A frozen layer over pretrained `table`: PyTorch's
    /// `nn.Embedding.from_pretrained(weights, padding_idx=…)` (whose
    /// default is `freeze=True`) and Keras' `Embedding(…, weights=[matrix],
    /// trainable=False)`. Chain [`unfreeze`](Self::unfreeze) to fine-tune
    /// (`freeze=False`).
    ///
    /// The padding row, if any, is set to zeros (PyTorch keeps the given
    /// row but never trains it; here a padding id looks up zeros either
    /// way). For pretrained word vectors and your own vocabulary, see
    /// [`from_vectors`](Self::from_vectors).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `padding_idx` is not a row of `table`.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Adagrad, Embedding, EmbeddingTable};
    /// let weights = EmbeddingTable::from_rows(3, 2, &[0.5, 0.5, 1., 2., 3., 4.])?;
    /// // nn.Embedding.from_pretrained(weights, freeze=False, padding_idx=0)
    /// let mut layer = Embedding::from_pretrained(weights, Some(0))?.unfreeze(Adagrad::default());
    /// assert_eq!(layer.forward(&[0u32, 2])?, [0., 0., 3., 4.]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn from_pretrained(table: EmbeddingTable, padding_idx: Option<usize>) -> Result<Self> {
        Self::with_options(
            table,
            Frozen,
            EmbeddingOptions {
                padding_idx,
                trainable: false,
                ..EmbeddingOptions::default()
            },
        )
    }

    /// A frozen layer of `rows` rows for your vocabulary `word_index`,
    /// row `i` holding the pretrained vector of the word mapped to `i`
    /// ([`Pretrained::table_for`]), with the padding row of `options` as
    /// the layer's `padding_idx`; and how many of your words had a vector.
    /// The whole Keras recipe (`embedding_matrix` filled from GloVe, then
    /// `Embedding(…, trainable=False)`) in one call. Chain
    /// [`unfreeze`](Self::unfreeze) to fine-tune.
    ///
    /// # Errors
    /// As [`Pretrained::table_for`]; nothing is built then.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::{Pretrained, TableOptions};
    /// use embtable::{Embedding, EmbeddingTable, Vocab};
    /// let glove = Pretrained::new(
    ///     Vocab::from_words(["the", "cat"])?,
    ///     EmbeddingTable::from_rows(2, 2, &[1., 1., 2., 2.])?,
    /// )?;
    /// // Row 0 is padding, as a Keras Tokenizer leaves it; "dog" has no vector.
    /// let mine = Vocab::from_words(["<pad>", "cat", "dog"])?;
    /// let options = TableOptions { padding_idx: Some(0), ..Default::default() };
    /// let (mut layer, coverage) = Embedding::from_vectors(&glove, &mine, mine.len(), &options)?;
    /// assert_eq!((coverage.found, coverage.missing), (1, 1));
    /// assert_eq!(layer.forward(&[1u32, 2, 0])?, [2., 2., 0., 0., 0., 0.]);
    /// assert_eq!(layer.options().padding_idx, Some(0));
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn from_vectors<W, S, N>(
        pretrained: &Pretrained,
        word_index: W,
        rows: usize,
        options: &TableOptions,
    ) -> Result<(Self, Coverage)>
    where
        W: IntoIterator<Item = (S, N)>,
        S: AsRef<str>,
        N: Borrow<usize>,
    {
        let (table, coverage) = pretrained.table_for(word_index, rows, options)?;
        Ok((Self::from_pretrained(table, options.padding_idx)?, coverage))
    }

    /// The same layer (table, options) with `optimizer`, made trainable:
    /// fine-tuning pretrained vectors, as PyTorch's
    /// `from_pretrained(…, freeze=False)` or Keras' `trainable = True`.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Adagrad, Embedding, EmbeddingTable};
    /// let frozen = Embedding::frozen(EmbeddingTable::zeros(3, 2)?);
    /// let mut layer = frozen.unfreeze(Adagrad::default());
    /// layer.backward(&[2u32], &[1.0, 1.0])?;
    /// layer.step()?;
    /// assert_ne!(layer.table().row(2), &[0.0, 0.0]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn unfreeze<P: SparseOptimizer>(self, optimizer: P) -> Embedding<P> {
        Embedding {
            table: self.table,
            optimizer,
            // A frozen layer accumulates nothing, so this is empty.
            grad: self.grad,
            options: EmbeddingOptions {
                trainable: true,
                ..self.options
            },
        }
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
