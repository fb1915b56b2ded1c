//! Checkpoints: tables with their optimizers' full state in one
//! [safetensors](https://huggingface.co/docs/safetensors/index) file, so
//! that training resumes bit for bit; and single tables as plain
//! safetensors tensors, the format PyTorch and Hugging Face tools read.
//!
//! # Checkpoint format (version 1)
//!
//! A safetensors file: an 8-byte little-endian header length, a JSON header
//! (padded with spaces to a multiple of 8 bytes) naming each tensor's dtype,
//! shape and byte range, then the tensors' little-endian data, packed with
//! no padding. Tensors are stored unpadded, row-major (C order). For each
//! table `{name}`:
//!
//! | tensor | dtype | shape | present |
//! |---|---|---|---|
//! | `{name}.weight` | `F32` | `[rows, dim]` | always |
//! | `{name}.optim.{array}` | `F32` | `[rows, dim]`, or `[rows]` for per-row state | one per state array of the optimizer (e.g. `momentum`, `square_avg`, `accumulator`) |
//! | `{name}.optim.last_step` | `I64` (`U64` is read too) | `[rows]` | under [`Semantics::DenseExact`]: steps each row has seen |
//!
//! The safetensors `__metadata__` string map holds:
//!
//! | key | value |
//! |---|---|
//! | `embtable.format` | `embtable-checkpoint` |
//! | `embtable.version` | `1` |
//! | `embtable.tables` | the table names, comma-separated, in the order they were added |
//! | `{name}.optim.kind` | `sgd`, `rmsprop`, `adagrad`, `rowwise_adagrad`, `adam`, `adamw` or `ftrl` (absent for a table saved without optimizer) |
//! | `{name}.optim.steps` | steps taken, in decimal |
//! | `{name}.optim.config` | `field=value` pairs, comma-separated, e.g. `lr=0.009999999776482582,momentum=0.8999999761581421,…`: every config field as an `f64` in the shortest decimal that parses back to the same value (see [`OptimizerState`] for the encoding of booleans and enums) |
//! | `{name}.optim.shape` | `rows,dim`, or `none` for an optimizer that has not stepped yet |
//! | `{name}.optim.arrays` | the state array names, comma-separated, in the optimizer's order (empty when it keeps none) |
//! | `{name}.optim.lr_history` | `until:lr` pairs, comma-separated, the rate as the shortest decimal that parses back to the same `f32`: the earlier learning rates rows that lag will catch up with ([`OptimizerState::lr_history`]); absent when there are none |
//! | `{name}.layer` | for a layer saved with [`Checkpoint::with_layer`] or [`Embedding::save`](crate::Embedding::save): its options, `padding_idx=none,out_of_range=error,trainable=1,max_norm=none,max_norm_at=step` (`padding_idx` a row or `none`; `out_of_range` one of `error`, `zero`, `modulo`, `default_row:R`; `max_norm` a number or `none`; `max_norm_at` `step` or `lookup`) |
//! | `user:{key}` | a value given to [`Checkpoint::with_metadata`] (the `:` keeps these apart from table keys) |
//!
//! Weights and state values are stored bit for bit (NaN payloads
//! included); config values round-trip exactly, except that a NaN is
//! written `NaN` and reads back as the canonical NaN.
//!
//! This is exactly [`OptimizerState`], so nothing is lost: under
//! [`Semantics::DenseExact`] rows that lag behind stay lagging, with their
//! per-row step counts, and catch up after loading exactly as they would
//! have. There is no need to [`flush`](SparseOptimizer::flush) before saving
//! (flushing first makes the saved weights current, for readers other than
//! embtable).
//!
//! Names (tables, state arrays, optimizer kinds, config fields) are made of
//! ASCII letters, digits and `_`, `-`, `.`, `/`; PyTorch's dotted module
//! paths (`model.user_emb`) fit. The header and the metadata are written in
//! a fixed order, so saving the same state twice gives the same bytes.
//!
//! In Python, `safetensors.numpy.load_file(path)` (or
//! `safetensors.torch.load_file`) gives every tensor by name, and
//! `safetensors.safe_open(path, "np").metadata()` the metadata.
//!
//! # Writing
//! Files are written atomically (a temporary file in the same directory,
//! synced, then renamed over the target): a crash or an error mid-write
//! leaves the previous checkpoint intact. Everything is validated before the
//! file is touched. The tables are streamed to the file row by row; the
//! optimizer state is copied once ([`SparseOptimizer::state`]).
//!
//! # Reading
//! The whole file is read into memory and its header checked by the
//! `safetensors` crate (offsets in range, contiguous, covering the file,
//! sizes matching shapes and dtypes), then the tensors are copied into
//! tables and states. Loading a checkpoint also checks the format name and
//! version, that every tensor it needs is there with the right dtype and a
//! shape matching its table, and that the file holds no other tensor. A file
//! that fails any check gives [`Error::Format`] with `line` 0 (a
//! safetensors file has no lines) and a reason naming the tensor or
//! metadata key; no input, however corrupt, makes it panic. Whether the
//! saved state suits the optimizer it is restored into (its kind, its
//! config values, its array shapes) is checked by
//! [`SparseOptimizer::load_state`], with that method's errors.
//!
//! [`Semantics::DenseExact`]: crate::Semantics::DenseExact

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use safetensors::Dtype;

use super::safetensors::{
    Data, Parsed, Plan, Tensor, bad, check_dtype, check_name, matrix_shape, table_from_bytes,
};
use super::{read_error, write_atomic};
use crate::layer::check_options;
use crate::optim::{OptimizerState, SparseOptimizer, StateArray};
use crate::{Embedding, EmbeddingOptions, EmbeddingTable, Error, MaxNormAt, OutOfRange, Result};

/// `embtable.format` of a checkpoint.
const FORMAT: &str = "embtable-checkpoint";
/// `embtable.version` written, and the only one read.
const VERSION: &str = "1";
const KEY_FORMAT: &str = "embtable.format";
const KEY_VERSION: &str = "embtable.version";
const KEY_TABLES: &str = "embtable.tables";
/// The table name [`save_checkpoint`] uses.
const DEFAULT_NAME: &str = "embedding";
/// The metadata key, after `{name}.`, of a layer's options.
const LAYER_KEY: &str = "layer";

// ------------------------------------------------------------------ API

/// Tables by name, each with the full state of its optimizer (or none): what
/// a model with several embedding tables (users and items, words and
/// characters) needs to resume training bit for bit.
///
/// Build one with [`new`](Self::new), [`with`](Self::with) and
/// [`with_table`](Self::with_table) and [`save`](Self::save) it; a
/// [`load`](Self::load)ed one gives the tables back with
/// [`restore`](Self::restore) (which also restores the optimizer) or
/// [`take_table`](Self::take_table). The module docs describe the file.
///
/// A checkpoint being built borrows its tables (saving copies nothing but
/// the optimizer state); a loaded one owns them.
///
/// # Examples
/// Resuming a model with two tables:
/// ```
/// use embtable::io::Checkpoint;
/// use embtable::{Adagrad, EmbeddingTable, Init, RmsProp, RmsPropConfig, Semantics};
/// use embtable::{SparseGrad, SparseOptimizer};
///
/// let mut users = EmbeddingTable::new(100, 8, Init::default(), 1)?;
/// let mut items = EmbeddingTable::new(500, 8, Init::default(), 2)?;
/// let mut user_opt = Adagrad::default();
/// let mut item_opt = RmsProp::new(RmsPropConfig {
///     momentum: 0.9,
///     semantics: Semantics::DenseExact,
///     ..RmsPropConfig::default()
/// });
/// let mut grad = SparseGrad::new(8);
/// grad.accumulate_lookup(&[3u32, 7, 3], &[0.1; 24])?;
/// user_opt.step(&mut users, &grad)?;
/// item_opt.step(&mut items, &grad)?;
///
/// let path = std::env::temp_dir().join("embtable-doc-checkpoint-two.safetensors");
/// Checkpoint::new()
///     .with("user", &users, &user_opt)
///     .with("item", &items, &item_opt)
///     .save(&path)?;
///
/// // Later: fresh optimizers; their configs come from the checkpoint.
/// let mut ckpt = Checkpoint::load(&path)?;
/// assert_eq!(ckpt.names().collect::<Vec<_>>(), ["user", "item"]);
/// let mut user_opt2 = Adagrad::default();
/// let mut item_opt2 = RmsProp::default();
/// let users2 = ckpt.restore("user", &mut user_opt2)?;
/// let items2 = ckpt.restore("item", &mut item_opt2)?;
/// assert_eq!((users2, items2), (users, items));
/// assert_eq!(item_opt2.config(), item_opt.config());
/// assert_eq!(item_opt2.state(), item_opt.state());
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint<'a> {
    entries: Vec<Entry<'a>>,
    /// The caller's own metadata, in the order given (sorted once loaded).
    user: Vec<(String, String)>,
}

/// Prefix of the caller's metadata keys in the file.
const USER_PREFIX: &str = "user:";

/// One named table of a [`Checkpoint`].
#[derive(Clone, Debug, PartialEq)]
struct Entry<'a> {
    name: String,
    table: Cow<'a, EmbeddingTable>,
    state: Option<OptimizerState>,
    /// The options of a layer saved with [`Checkpoint::with_layer`].
    options: Option<EmbeddingOptions>,
}

impl<'a> Checkpoint<'a> {
    /// An empty checkpoint.
    ///
    /// # Examples
    /// ```
    /// let ckpt = embtable::io::Checkpoint::new();
    /// assert!(ckpt.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `table` under `name`, with a copy of `optimizer`'s whole state
    /// ([`SparseOptimizer::state`]) as it is now.
    ///
    /// Names are checked by [`save`](Self::save): they must be unique and
    /// made of ASCII letters, digits and `_ - . /`.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::{EmbeddingTable, Sgd};
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// let ckpt = Checkpoint::new().with("words", &table, &Sgd::default());
    /// assert_eq!(ckpt.optimizer_state("words").unwrap().kind, "sgd");
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn with<O: SparseOptimizer + ?Sized>(
        mut self,
        name: impl Into<String>,
        table: &'a EmbeddingTable,
        optimizer: &O,
    ) -> Self {
        self.entries.push(Entry {
            name: name.into(),
            table: Cow::Borrowed(table),
            state: Some(optimizer.state()),
            options: None,
        });
        self
    }

    /// Adds an [`Embedding`] layer under `name`: its table, the whole state
    /// of its optimizer and its options (padding row, out-of-range policy,
    /// `trainable`, `max_norm` and when it applies), so that
    /// [`restore_layer`](Self::restore_layer) gives the same layer back.
    /// A layer built [`Frozen`](crate::Frozen) saves a `frozen` optimizer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `grad`) if the layer holds a
    /// gradient not stepped yet, which a checkpoint would lose: call
    /// [`Embedding::step`] or [`Embedding::clear_grad`] first.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::{Adagrad, Embedding, EmbeddingTable, Init, Sgd};
    /// let mut users = Embedding::new(EmbeddingTable::new(100, 8, Init::default(), 1)?, Adagrad::default());
    /// let items = Embedding::new(EmbeddingTable::new(500, 8, Init::default(), 2)?, Sgd::default());
    /// users.backward(&[3u32], &[0.1; 8])?;
    /// assert!(Checkpoint::new().with_layer("user", &users).is_err()); // pending gradient
    /// users.step()?;
    /// let path = std::env::temp_dir().join("embtable-doc-checkpoint-layers.safetensors");
    /// Checkpoint::new().with_layer("user", &users)?.with_layer("item", &items)?.save(&path)?;
    ///
    /// let mut ckpt = Checkpoint::load(&path)?;
    /// let users2 = ckpt.restore_layer("user", Adagrad::default())?;
    /// assert_eq!(users2.table(), users.table());
    /// assert_eq!(users2.optimizer().state(), users.optimizer().state());
    /// # use embtable::SparseOptimizer;
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn with_layer<O: SparseOptimizer>(
        mut self,
        name: impl Into<String>,
        layer: &'a Embedding<O>,
    ) -> Result<Self> {
        let name = name.into();
        if !layer.grad().is_empty() {
            return Err(Error::InvalidConfig {
                field: "grad",
                reason: format!(
                    "layer {name:?} holds a gradient for {} not stepped yet, which a \
                     checkpoint would lose; call step() or clear_grad() first",
                    crate::error::count(layer.grad().len(), "row")
                ),
            });
        }
        self.entries.push(Entry {
            name,
            table: Cow::Borrowed(layer.table()),
            state: Some(layer.optimizer().state()),
            options: Some(*layer.options()),
        });
        Ok(self)
    }

    /// Removes the layer `name` from the checkpoint and returns it with
    /// `optimizer`, into which the saved optimizer state (config included)
    /// is loaded, and the saved options. A table saved without options
    /// ([`with`](Self::with)) comes back with the default options; one
    /// saved without optimizer state keeps `optimizer` as given.
    ///
    /// # Errors
    /// As [`restore`](Self::restore): [`Error::InvalidConfig`] (field
    /// `name`) for no such table, the errors of
    /// [`SparseOptimizer::load_state`] (among them field `kind` when
    /// `optimizer` is not of the saved kind). The checkpoint is unchanged
    /// on error.
    pub fn restore_layer<O: SparseOptimizer>(
        &mut self,
        name: &str,
        mut optimizer: O,
    ) -> Result<Embedding<O>> {
        let i = self.position(name)?;
        if let Some(state) = &self.entries[i].state {
            optimizer.load_state(state.clone())?;
        }
        let options = self.entries[i].options.unwrap_or_default();
        // The options were checked against the table when the file was read.
        let table = self.entries[i].table.clone().into_owned();
        let layer = Embedding::with_options(table, optimizer, options)?;
        self.entries.remove(i);
        Ok(layer)
    }

    /// Adds `table` under `name` without optimizer state (a frozen table,
    /// or weights for evaluation).
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// let ckpt = Checkpoint::new().with_table("pretrained", &table);
    /// assert!(ckpt.optimizer_state("pretrained").is_none());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn with_table(mut self, name: impl Into<String>, table: &'a EmbeddingTable) -> Self {
        self.entries.push(Entry {
            name: name.into(),
            table: Cow::Borrowed(table),
            state: None,
            options: None,
        });
        self
    }

    /// Adds a metadata entry of the caller's own (the epoch, a data
    /// fingerprint, hyper-parameters), saved as `user:{key}`. A key given
    /// twice keeps the later value. Keys are checked by [`save`](Self::save)
    /// like table names.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// let path = std::env::temp_dir().join("embtable-doc-metadata.safetensors");
    /// Checkpoint::new()
    ///     .with_table("items", &table)
    ///     .with_metadata("epoch", "3")
    ///     .save(&path)?;
    /// let loaded = Checkpoint::load(&path)?;
    /// assert_eq!(loaded.metadata("epoch"), Some("3"));
    /// assert_eq!(loaded.metadata("seed"), None);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let (key, value) = (key.into(), value.into());
        match self.user.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.user.push((key, value)),
        }
        self
    }

    /// The value of the caller's metadata entry `key`, if any.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.user
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Number of tables.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// assert_eq!(Checkpoint::new().with_table("a", &table).with_table("b", &table).len(), 2);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the checkpoint holds no table.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// assert!(Checkpoint::new().is_empty());
    /// assert!(!Checkpoint::new().with_table("a", &table).is_empty());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The table names, in the order they were added (and saved).
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// let ckpt = Checkpoint::new().with_table("user", &table).with_table("item", &table);
    /// assert_eq!(ckpt.names().collect::<Vec<_>>(), ["user", "item"]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// The table named `name`, if there is one.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// let ckpt = Checkpoint::new().with_table("t", &table);
    /// assert_eq!(ckpt.table("t"), Some(&table));
    /// assert_eq!(ckpt.table("u"), None);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn table(&self, name: &str) -> Option<&EmbeddingTable> {
        self.entry(name).map(|e| &*e.table)
    }

    /// The optimizer state saved with the table named `name`; `None` if
    /// there is no such table or it has no optimizer state.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::{EmbeddingTable, Adagrad, SparseGrad, SparseOptimizer};
    /// let mut table = EmbeddingTable::zeros(4, 2)?;
    /// let mut opt = Adagrad::default();
    /// let mut grad = SparseGrad::new(2);
    /// grad.accumulate_lookup(&[1u32], &[1.0, 2.0])?;
    /// opt.step(&mut table, &grad)?;
    /// let ckpt = Checkpoint::new().with("t", &table, &opt);
    /// let state = ckpt.optimizer_state("t").unwrap();
    /// assert_eq!((state.kind.as_str(), state.steps), ("adagrad", 1));
    /// assert_eq!(state.arrays[0].values[2..4], [1.1, 4.1]); // a₀ + g²
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn optimizer_state(&self, name: &str) -> Option<&OptimizerState> {
        self.entry(name).and_then(|e| e.state.as_ref())
    }

    /// Loads the optimizer state saved with the table `name` into
    /// `optimizer` ([`SparseOptimizer::load_state`]: its config is replaced
    /// too, so a `Default` optimizer of the right kind will do), removes the
    /// table from the checkpoint and returns it. Training then resumes
    /// exactly where it stopped.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `name`) if there is no table `name`,
    /// (field `optimizer`) if it was saved without optimizer state; the
    /// errors of [`SparseOptimizer::load_state`], among them
    /// [`Error::InvalidConfig`] (field `kind`) if `optimizer` is not of the
    /// saved kind. On error the optimizer and the checkpoint are unchanged.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::{Adagrad, EmbeddingTable, Error, Sgd, SgdConfig};
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// let sgd = Sgd::new(SgdConfig { lr: 0.5, ..SgdConfig::default() });
    /// let path = std::env::temp_dir().join("embtable-doc-checkpoint-restore.safetensors");
    /// Checkpoint::new().with("t", &table, &sgd).save(&path)?;
    ///
    /// let mut ckpt = Checkpoint::load(&path)?;
    /// let err = ckpt.restore("t", &mut Adagrad::default()).unwrap_err();
    /// assert!(matches!(err, Error::InvalidConfig { field: "kind", .. }));
    /// let mut resumed = Sgd::default();
    /// assert_eq!(ckpt.restore("t", &mut resumed)?, table);
    /// assert_eq!(resumed.config().lr, 0.5);
    /// assert!(ckpt.is_empty()); // restored tables leave the checkpoint
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn restore<O: SparseOptimizer + ?Sized>(
        &mut self,
        name: &str,
        optimizer: &mut O,
    ) -> Result<EmbeddingTable> {
        let i = self.position(name)?;
        let Some(state) = &self.entries[i].state else {
            return Err(Error::InvalidConfig {
                field: "optimizer",
                reason: format!("table {name:?} was saved without optimizer state; use take_table"),
            });
        };
        // `load_state` consumes the state; a copy keeps the checkpoint whole
        // should it fail.
        optimizer.load_state(state.clone())?;
        Ok(self.entries.remove(i).table.into_owned())
    }

    /// Removes the table `name` from the checkpoint and returns it, leaving
    /// out its optimizer state, if any.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `name`) if there is no table `name`.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Checkpoint;
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// let path = std::env::temp_dir().join("embtable-doc-checkpoint-take.safetensors");
    /// Checkpoint::new().with_table("frozen", &table).save(&path)?;
    /// let mut ckpt = Checkpoint::load(&path)?;
    /// assert_eq!(ckpt.take_table("frozen")?, table);
    /// assert!(ckpt.take_table("frozen").is_err()); // taken
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn take_table(&mut self, name: &str) -> Result<EmbeddingTable> {
        let i = self.position(name)?;
        Ok(self.entries.remove(i).table.into_owned())
    }

    /// Writes the checkpoint to `path` atomically (see the module docs for
    /// the format). Everything is checked before the file is touched.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `name`) for an empty or repeated
    /// table name, a name with a character outside ASCII letters, digits and
    /// `_ - . /`, or names whose tensors collide (table `a` with an array
    /// `x` and table `a.optim.x`); [`Error::InvalidConfig`] (fields `kind`,
    /// `config`, `arrays`, `shape`, `last_step`) and
    /// [`Error::ShapeMismatch`] for an optimizer state that is not
    /// consistent with itself or with its table (an optimizer used on a
    /// table of another shape); [`Error::Io`] if writing fails. On error
    /// `path` is unchanged.
    ///
    /// # Examples
    /// See [`Checkpoint`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let plan = self.plan()?;
        write_atomic(path.as_ref(), |out| plan.write(out))
    }

    /// Reads a checkpoint written by [`save`](Self::save) (or by any tool
    /// that follows the format in the module docs).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`Error::Format`] (line 0)
    /// if it is not a valid safetensors file, not an embtable checkpoint,
    /// of another format version, or a tensor or metadata entry is missing,
    /// malformed, of the wrong dtype or shape, or unexpected;
    /// [`Error::Alloc`] if a table does not fit in memory.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::{self, Checkpoint};
    /// use embtable::{EmbeddingTable, Error, Sgd};
    /// let table = EmbeddingTable::zeros(4, 2)?;
    /// let path = std::env::temp_dir().join("embtable-doc-checkpoint-load.safetensors");
    /// io::save_checkpoint(&path, &table, &Sgd::default())?;
    /// let ckpt = Checkpoint::load(&path)?;
    /// assert_eq!(ckpt.names().collect::<Vec<_>>(), ["embedding"]);
    /// assert_eq!(ckpt.optimizer_state("embedding").unwrap().kind, "sgd");
    ///
    /// // A table-only file is not a checkpoint.
    /// io::save_table_safetensors(&path, "weight", &table)?;
    /// let err = Checkpoint::load(&path).unwrap_err();
    /// assert!(matches!(err, Error::Format { line: 0, .. }));
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint<'static>> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| read_error(path, e))?;
        let file = Parsed::parse(&bytes)?;
        file.checkpoint()
    }

    fn entry(&self, name: &str) -> Option<&Entry<'a>> {
        self.entries.iter().find(|e| e.name == name)
    }

    fn position(&self, name: &str) -> Result<usize> {
        self.entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| Error::InvalidConfig {
                field: "name",
                reason: format!(
                    "the checkpoint holds no table {name:?}; it holds {:?}",
                    self.names().collect::<Vec<_>>()
                ),
            })
    }

    /// Checks everything and lays out the file.
    fn plan(&self) -> Result<Plan<'_>> {
        let mut metadata = vec![
            (KEY_FORMAT.to_owned(), FORMAT.to_owned()),
            (KEY_VERSION.to_owned(), VERSION.to_owned()),
        ];
        let mut tensors = Vec::new();
        for (i, entry) in self.entries.iter().enumerate() {
            let name = &entry.name;
            check_name("name", "table name", name)?;
            if self.entries[..i].iter().any(|e| e.name == *name) {
                return Err(Error::InvalidConfig {
                    field: "name",
                    reason: format!("table name {name:?} is used twice"),
                });
            }
            let table = &*entry.table;
            tensors.push(Tensor {
                name: format!("{name}.weight"),
                shape: vec![table.rows(), table.dim()],
                data: Data::Table(table),
            });
            if let Some(state) = &entry.state {
                check_state(state, table)?;
                plan_state(name, state, &mut metadata, &mut tensors);
            }
            if let Some(options) = &entry.options {
                metadata.push((format!("{name}.{LAYER_KEY}"), encode_options(options)));
            }
        }
        let names: Vec<&str> = self.names().collect();
        metadata.push((KEY_TABLES.to_owned(), names.join(",")));
        for (key, value) in &self.user {
            check_name("metadata", "metadata key", key)?;
            metadata.push((format!("{USER_PREFIX}{key}"), value.clone()));
        }
        Plan::new(Some(metadata), tensors)
    }
}

/// Saves `table` and the whole state of its `optimizer` to `path`, as a
/// [`Checkpoint`] holding one table named `embedding` (tensors
/// `embedding.weight`, `embedding.optim.{array}`, …; see the module docs).
///
/// No [`flush`](SparseOptimizer::flush) is needed first: rows that lag
/// behind under `DenseExact` are saved with their step counts and catch up
/// after loading exactly as they would have.
///
/// # Errors
/// As [`Checkpoint::save`]: [`Error::ShapeMismatch`] if the optimizer's
/// state belongs to a table of another shape, [`Error::InvalidConfig`] for
/// an inconsistent state, [`Error::Io`] if writing fails. On error `path`
/// is unchanged.
///
/// # Examples
/// Resuming training:
/// ```
/// use embtable::io;
/// use embtable::{EmbeddingTable, Init, Semantics, Sgd, SgdConfig, SparseGrad, SparseOptimizer};
///
/// let cfg = SgdConfig { momentum: 0.9, semantics: Semantics::DenseExact, ..SgdConfig::default() };
/// let mut table = EmbeddingTable::new(1000, 16, Init::default(), 7)?;
/// let mut opt = Sgd::new(cfg);
/// let mut grad = SparseGrad::new(16);
/// let mut train = |table: &mut EmbeddingTable, opt: &mut Sgd, step: u32| {
///     grad.clear();
///     grad.accumulate_lookup(&[step % 10, 42], &[0.5; 32])?;
///     opt.step(table, &grad)
/// };
/// for step in 0..5 {
///     train(&mut table, &mut opt, step)?;
/// }
/// let path = std::env::temp_dir().join("embtable-doc-checkpoint-resume.safetensors");
/// io::save_checkpoint(&path, &table, &opt)?;
///
/// // Uninterrupted: five more steps.
/// for step in 5..10 {
///     train(&mut table, &mut opt, step)?;
/// }
///
/// // Resumed in a new process: a fresh optimizer, config from the file.
/// let mut opt2 = Sgd::default();
/// let mut table2 = io::load_checkpoint(&path, &mut opt2)?;
/// for step in 5..10 {
///     train(&mut table2, &mut opt2, step)?;
/// }
/// assert_eq!(table2, table); // bit for bit
/// assert_eq!(opt2.state(), opt.state());
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), embtable::Error>(())
/// ```
pub fn save_checkpoint<O: SparseOptimizer + ?Sized>(
    path: impl AsRef<Path>,
    table: &EmbeddingTable,
    optimizer: &O,
) -> Result<()> {
    Checkpoint::new()
        .with(DEFAULT_NAME, table, optimizer)
        .save(path)
}

/// Loads a checkpoint holding one table (as [`save_checkpoint`] writes,
/// whatever the table's name), restores its optimizer state into
/// `optimizer` (config included) and returns the table.
///
/// # Errors
/// The errors of [`Checkpoint::load`]; [`Error::InvalidConfig`] (field
/// `name`) if the file holds several tables or none (use
/// [`Checkpoint::load`] and restore each by name); the errors of
/// [`Checkpoint::restore`], among them [`Error::InvalidConfig`] (field
/// `kind`) if `optimizer` is not of the saved kind. On error `optimizer` is
/// unchanged.
///
/// # Examples
/// Resuming training: see [`save_checkpoint`]. The optimizer must be of the
/// saved kind:
/// ```
/// use embtable::io;
/// use embtable::{Adagrad, EmbeddingTable, Error, RmsProp};
/// let table = EmbeddingTable::zeros(4, 2)?;
/// let path = std::env::temp_dir().join("embtable-doc-checkpoint-kind.safetensors");
/// io::save_checkpoint(&path, &table, &Adagrad::default())?;
/// let err = io::load_checkpoint(&path, &mut RmsProp::default()).unwrap_err();
/// assert!(matches!(err, Error::InvalidConfig { field: "kind", .. }));
/// assert_eq!(io::load_checkpoint(&path, &mut Adagrad::default())?, table);
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), embtable::Error>(())
/// ```
pub fn load_checkpoint<O: SparseOptimizer + ?Sized>(
    path: impl AsRef<Path>,
    optimizer: &mut O,
) -> Result<EmbeddingTable> {
    let mut ckpt = Checkpoint::load(path)?;
    if ckpt.len() != 1 {
        return Err(Error::InvalidConfig {
            field: "name",
            reason: format!(
                "the checkpoint holds {} tables {:?}, not one; use Checkpoint::load \
                 and restore each by name",
                ckpt.len(),
                ckpt.names().collect::<Vec<_>>()
            ),
        });
    }
    let name = ckpt.entries[0].name.clone();
    ckpt.restore(&name, optimizer)
}

/// Checks that `state` can be written and read back for `table`: names the
/// file can hold, a shape that is the table's, arrays of `[rows, dim]` or
/// `[rows]` with that many values, one step count per row. Saving and
/// loading both check a state with this, and only with this: whether it
/// suits an optimizer (its kind, config, array names, values) is
/// [`SparseOptimizer::load_state`]'s to check.
pub(crate) fn check_state(state: &OptimizerState, table: &EmbeddingTable) -> Result<()> {
    check_name("kind", "optimizer kind", &state.kind)?;
    for (field, _) in &state.config {
        check_name("config", "config field", field)?;
    }
    let Some((rows, dim)) = state.shape else {
        if !state.arrays.is_empty() || !state.last_step.is_empty() {
            return Err(Error::InvalidConfig {
                field: "shape",
                reason: "an optimizer state without a table shape must hold no arrays".into(),
            });
        }
        return Ok(());
    };
    for (what, expected, got) in [
        ("optimizer state rows (the table's)", table.rows(), rows),
        ("optimizer state dim (the table's)", table.dim(), dim),
    ] {
        if expected != got {
            return Err(Error::ShapeMismatch {
                what,
                expected,
                got,
            });
        }
    }
    for array in &state.arrays {
        check_name("arrays", "state array name", &array.name)?;
        if array.name == "last_step" {
            return Err(Error::InvalidConfig {
                field: "arrays",
                reason: "a state array cannot be named \"last_step\", the name of the per-row \
                         step counts"
                    .into(),
            });
        }
        if array.shape != [rows, dim] && array.shape != [rows] {
            return Err(Error::InvalidConfig {
                field: "arrays",
                reason: format!(
                    "state array {:?} has shape {:?}; expected [{rows}, {dim}] or [{rows}]",
                    array.name, array.shape
                ),
            });
        }
        let len: usize = array.shape.iter().product();
        if array.values.len() != len {
            return Err(Error::ShapeMismatch {
                what: "state array values (its shape's product)",
                expected: len,
                got: array.values.len(),
            });
        }
    }
    if !state.last_step.is_empty() && state.last_step.len() != rows {
        return Err(Error::ShapeMismatch {
            what: "last_step length (table rows)",
            expected: rows,
            got: state.last_step.len(),
        });
    }
    if let Some(&bad) = state.last_step.iter().find(|&&s| s > i64::MAX as u64) {
        return Err(Error::InvalidConfig {
            field: "last_step",
            reason: format!("{bad} does not fit in an I64 tensor"),
        });
    }
    Ok(())
}

/// The metadata and tensors of `state`, saved for table `name`.
pub(crate) fn plan_state<'s>(
    name: &str,
    state: &'s OptimizerState,
    metadata: &mut Vec<(String, String)>,
    tensors: &mut Vec<Tensor<'s>>,
) {
    let config: Vec<String> = state
        .config
        .iter()
        .map(|(field, value)| format!("{field}={value:?}"))
        .collect();
    let shape = match state.shape {
        Some((rows, dim)) => format!("{rows},{dim}"),
        None => "none".to_owned(),
    };
    let arrays: Vec<&str> = state.arrays.iter().map(|a| a.name.as_str()).collect();
    if !state.lr_history.is_empty() {
        let history: Vec<String> = state
            .lr_history
            .iter()
            .map(|(until, lr)| format!("{until}:{lr:?}"))
            .collect();
        metadata.push((format!("{name}.optim.lr_history"), history.join(",")));
    }
    for (key, value) in [
        ("kind", state.kind.clone()),
        ("steps", state.steps.to_string()),
        ("config", config.join(",")),
        ("shape", shape),
        ("arrays", arrays.join(",")),
    ] {
        metadata.push((format!("{name}.optim.{key}"), value));
    }
    for array in &state.arrays {
        tensors.push(Tensor {
            name: format!("{name}.optim.{}", array.name),
            shape: array.shape.clone(),
            data: Data::F32(&array.values),
        });
    }
    if !state.last_step.is_empty() {
        tensors.push(Tensor {
            name: format!("{name}.optim.last_step"),
            shape: vec![state.last_step.len()],
            data: Data::I64(&state.last_step),
        });
    }
}

// ------------------------------------------------------- reading the schema

impl Parsed<'_> {
    /// The checkpoint this file holds.
    fn checkpoint(&self) -> Result<Checkpoint<'static>> {
        match self.meta(KEY_FORMAT) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(bad(format!(
                    "not an embtable checkpoint: {KEY_FORMAT} is {other:?}, not {FORMAT:?}"
                )));
            }
            None => {
                return Err(bad(format!(
                    "not an embtable checkpoint: metadata {KEY_FORMAT:?} is missing \
                     (use load_table_safetensors for a plain tensor file)"
                )));
            }
        }
        let version = self.require(KEY_VERSION)?;
        if version != VERSION {
            return Err(bad(format!(
                "checkpoint format version {version:?} is not supported; this embtable \
                 reads version {VERSION}"
            )));
        }
        let tables = self.require(KEY_TABLES)?;
        let names: Vec<&str> = if tables.is_empty() {
            Vec::new()
        } else {
            tables.split(',').collect()
        };
        let mut entries: Vec<Entry<'static>> = Vec::with_capacity(names.len());
        let mut used = BTreeSet::new();
        for name in names {
            check_name("name", "table name", name)
                .map_err(|e| bad(format!("{KEY_TABLES}: {e}")))?;
            if entries.iter().any(|e| e.name == name) {
                return Err(bad(format!("{KEY_TABLES}: table {name:?} is listed twice")));
            }
            let weight = format!("{name}.weight");
            let (info, data) = self.get(&weight)?;
            if !used.insert(weight.clone()) {
                return Err(bad(format!("tensor {weight:?} belongs to two tables")));
            }
            let (rows, dim) = matrix_shape(&weight, &info.shape)?;
            check_dtype(&weight, info, Dtype::F32)?;
            let table = table_from_bytes(&weight, rows, dim, data, 4, |b| {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            })?;
            let options = match self.meta(&format!("{name}.{LAYER_KEY}")) {
                Some(text) => Some(decode_options(name, text, rows)?),
                None => None,
            };
            let state = match self.meta(&format!("{name}.optim.kind")) {
                Some(kind) => Some(self.state(name, kind, &table, &mut used)?),
                None => None,
            };
            entries.push(Entry {
                name: name.to_owned(),
                table: Cow::Owned(table),
                state,
                options,
            });
        }
        let mut unknown: Vec<String> = self
            .meta
            .offset_keys()
            .into_iter()
            .filter(|t| !used.contains(t))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            unknown.truncate(10);
            return Err(bad(format!(
                "unexpected tensors {unknown:?}: not part of a table listed in {KEY_TABLES}"
            )));
        }
        let mut user: Vec<(String, String)> = self
            .meta
            .metadata()
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.strip_prefix(USER_PREFIX)?.to_owned(), v.clone())))
            .collect();
        user.sort();
        Ok(Checkpoint { entries, user })
    }

    /// The optimizer state saved with table `name`, which is `table`.
    pub(crate) fn state(
        &self,
        name: &str,
        kind: &str,
        table: &EmbeddingTable,
        used: &mut BTreeSet<String>,
    ) -> Result<OptimizerState> {
        let key = |k: &str| format!("{name}.optim.{k}");
        let steps_key = key("steps");
        let steps_text = self.require(&steps_key)?;
        let steps: u64 = steps_text
            .parse()
            .map_err(|_| bad(format!("{steps_key} is {steps_text:?}, not a step count")))?;
        let config_key = key("config");
        let config_text = self.require(&config_key)?;
        let mut config = Vec::new();
        for pair in config_text.split(',').filter(|p| !p.is_empty()) {
            let parsed = pair
                .split_once('=')
                .and_then(|(field, value)| Some((field.to_owned(), value.parse::<f64>().ok()?)));
            let Some(parsed) = parsed else {
                return Err(bad(format!("{config_key}: {pair:?} is not field=number")));
            };
            config.push(parsed);
        }
        let shape_key = key("shape");
        let shape_text = self.require(&shape_key)?;
        let shape = if shape_text == "none" {
            None
        } else {
            let parsed = shape_text
                .split_once(',')
                .and_then(|(r, d)| Some((r.parse::<usize>().ok()?, d.parse::<usize>().ok()?)));
            match parsed {
                Some(s) if s == (table.rows(), table.dim()) => Some(s),
                _ => {
                    return Err(bad(format!(
                        "{shape_key} is {shape_text:?}; the table is {},{}",
                        table.rows(),
                        table.dim()
                    )));
                }
            }
        };
        let arrays_text = self.require(&key("arrays"))?;
        let mut arrays = Vec::new();
        for array in arrays_text.split(',').filter(|a| !a.is_empty()) {
            check_name("arrays", "state array name", array)
                .map_err(|e| bad(format!("{name}.optim.arrays: {e}")))?;
            if array == "last_step" {
                return Err(bad(format!(
                    "{name}.optim.arrays lists \"last_step\", the name of the per-row step counts"
                )));
            }
            let tensor = key(array);
            if !used.insert(tensor.clone()) {
                return Err(bad(format!("{name}.optim.arrays lists {array:?} twice")));
            }
            let (info, data) = self.get(&tensor)?;
            check_dtype(&tensor, info, Dtype::F32)?;
            // Its shape is checked with the rest of the state, below.
            arrays.push(StateArray {
                name: array.to_owned(),
                shape: info.shape.clone(),
                values: data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            });
        }
        let last_name = key("last_step");
        let last_step = match self.meta.info(&last_name) {
            None => Vec::new(),
            Some(_) => {
                let (info, data) = self.get(&last_name)?;
                if !used.insert(last_name.clone()) {
                    return Err(bad(format!("{name}.optim.arrays lists \"last_step\"")));
                }
                if info.shape != [table.rows()] {
                    return Err(bad(format!(
                        "tensor {last_name:?} has shape {:?}; expected [{}]",
                        info.shape,
                        table.rows()
                    )));
                }
                let eight = |b: &[u8]| [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
                match info.dtype {
                    Dtype::I64 => data
                        .chunks_exact(8)
                        .map(|b| u64::try_from(i64::from_le_bytes(eight(b))))
                        .collect::<std::result::Result<Vec<u64>, _>>()
                        .map_err(|_| bad(format!("tensor {last_name:?} holds a negative count")))?,
                    Dtype::U64 => data
                        .chunks_exact(8)
                        .map(|b| u64::from_le_bytes(eight(b)))
                        .collect(),
                    other => {
                        return Err(bad(format!(
                            "tensor {last_name:?} is {other}; expected I64 (or U64)"
                        )));
                    }
                }
            }
        };
        let history_key = key("lr_history");
        let mut lr_history = Vec::new();
        for pair in self
            .meta(&history_key)
            .unwrap_or("")
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let parsed = pair.split_once(':').and_then(|(until, lr)| {
                Some((until.parse::<u64>().ok()?, lr.parse::<f32>().ok()?))
            });
            let Some(parsed) = parsed else {
                return Err(bad(format!("{history_key}: {pair:?} is not step:rate")));
            };
            lr_history.push(parsed);
        }
        let state = OptimizerState {
            kind: kind.to_owned(),
            config,
            steps,
            shape,
            arrays,
            last_step,
            lr_history,
        };
        // The one layout check of a state, as saving makes it; what suits
        // the optimizer it goes into is `load_state`'s to check.
        check_state(&state, table).map_err(|e| bad(format!("table {name:?}: {e}")))?;
        Ok(state)
    }
}

// ------------------------------------------------------------ layer options

/// A layer's options as `{name}.layer` metadata:
/// `padding_idx=3,out_of_range=error,trainable=1,max_norm=none,max_norm_at=step`
/// (`padding_idx` and `max_norm` may be `none`; `out_of_range` is `error`,
/// `zero`, `modulo` or `default_row:R`; `max_norm` is written as the
/// shortest `f64` decimal of its `f32`, so it reads back exactly).
fn encode_options(o: &EmbeddingOptions) -> String {
    let padding = o.padding_idx.map_or("none".to_owned(), |p| p.to_string());
    let out_of_range = match o.out_of_range {
        OutOfRange::Error => "error".to_owned(),
        OutOfRange::Zero => "zero".to_owned(),
        OutOfRange::Modulo => "modulo".to_owned(),
        OutOfRange::DefaultRow(r) => format!("default_row:{r}"),
    };
    let max_norm = o
        .max_norm
        .map_or("none".to_owned(), |m| format!("{:?}", f64::from(m)));
    let at = match o.max_norm_at {
        MaxNormAt::Step => "step",
        MaxNormAt::Lookup => "lookup",
    };
    format!(
        "padding_idx={padding},out_of_range={out_of_range},trainable={},max_norm={max_norm},\
         max_norm_at={at}",
        u8::from(o.trainable)
    )
}

/// The options `{name}.layer` holds, checked against a table of `rows` rows.
fn decode_options(name: &str, text: &str, rows: usize) -> Result<EmbeddingOptions> {
    let key = format!("{name}.{LAYER_KEY}");
    let fail = |what: &str| bad(format!("{key} is {text:?}: {what}"));
    let mut fields = std::collections::BTreeMap::new();
    for pair in text.split(',') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| fail(&format!("{pair:?} is not key=value")))?;
        if fields.insert(k, v).is_some() {
            return Err(fail(&format!("{k} appears twice")));
        }
    }
    let mut take = |k: &str| {
        fields
            .remove(k)
            .ok_or_else(|| fail(&format!("{k} is missing")))
    };
    let row = |v: &str| {
        v.parse::<usize>()
            .map_err(|_| fail(&format!("{v:?} is not a row")))
    };
    let padding_idx = match take("padding_idx")? {
        "none" => None,
        v => Some(row(v)?),
    };
    let out_of_range = match take("out_of_range")? {
        "error" => OutOfRange::Error,
        "zero" => OutOfRange::Zero,
        "modulo" => OutOfRange::Modulo,
        v => match v.strip_prefix("default_row:") {
            Some(r) => OutOfRange::DefaultRow(row(r)?),
            None => return Err(fail(&format!("out_of_range {v:?} is unknown"))),
        },
    };
    let trainable = match take("trainable")? {
        "0" => false,
        "1" => true,
        v => return Err(fail(&format!("trainable {v:?} is not 0 or 1"))),
    };
    let max_norm = match take("max_norm")? {
        "none" => None,
        v => {
            let m: f64 = v
                .parse()
                .map_err(|_| fail(&format!("max_norm {v:?} is not a number")))?;
            if (m as f32) as f64 != m {
                return Err(fail(&format!("max_norm {v} is not an f32 value")));
            }
            Some(m as f32)
        }
    };
    let max_norm_at = match take("max_norm_at")? {
        "step" => MaxNormAt::Step,
        "lookup" => MaxNormAt::Lookup,
        v => return Err(fail(&format!("max_norm_at {v:?} is not step or lookup"))),
    };
    if let Some(k) = fields.keys().next() {
        return Err(fail(&format!("{k} is not an option")));
    }
    let options = EmbeddingOptions {
        padding_idx,
        out_of_range,
        trainable,
        max_norm,
        max_norm_at,
    };
    check_options(&options, rows).map_err(|e| fail(&e.to_string()))?;
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A writer that fails after `left` bytes, like a full disk.
    struct FailAfter<W> {
        inner: W,
        left: usize,
    }

    impl<W: Write> Write for FailAfter<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if buf.len() > self.left {
                return Err(std::io::Error::other("disk full"));
            }
            self.left -= buf.len();
            self.inner.write(buf)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn a_save_failing_mid_write_keeps_the_old_file() {
        let dir = std::env::temp_dir().join(format!("embtable-ckpt-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ckpt.safetensors");
        let small = EmbeddingTable::from_rows(1, 1, &[1.0]).unwrap();
        Checkpoint::new()
            .with_table("t", &small)
            .save(&path)
            .unwrap();
        let old = fs::read(&path).unwrap();

        let big = EmbeddingTable::zeros(300, 200).unwrap(); // 240 kB, past the buffer
        let ckpt = Checkpoint::new().with_table("t", &big);
        let plan = ckpt.plan().unwrap();
        let err = write_atomic(&path, |out| {
            plan.write(&mut FailAfter {
                inner: out,
                left: 100_000,
            })
        })
        .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert_eq!(fs::read(&path).unwrap(), old);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary file left"
        );
        assert_eq!(Checkpoint::load(&path).unwrap().table("t"), Some(&small));
        fs::remove_dir_all(&dir).unwrap();
    }
}
