//! Files: pretrained vectors (word2vec, GloVe, fastText `.vec`) with their
//! vocabulary as a Python mapping, `.npy`, safetensors tables and
//! checkpoints holding tables with their optimizers' state.

use std::path::PathBuf;

use embtable::io::{
    self, Checkpoint, LoadReport, Pretrained as RustPretrained, ReadOptions, TableOptions,
    UnicodeErrors, Word2VecFormat,
};
use embtable::{Init, Vocab as RustVocab};
use pyo3::exceptions::{PyKeyError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::errors::{IntoPy, in_file, value_error};
use crate::layer::Layer;
use embtable::SparseOptimizer;

use crate::optim::{AnyOptimizer, Optimizer};
use crate::table::Table;
use crate::threads::run;

/// Words in row order: a read-only mapping from word to row
/// (`vocab["king"]`, `"king" in vocab`, `len(vocab)`, iteration over words).
#[pyclass(name = "Vocab", module = "embtable._embtable", frozen, sequence)]
pub struct Vocab {
    inner: RustVocab,
}

#[pymethods]
impl Vocab {
    /// A vocabulary of distinct `words`, word `i` naming row `i`.
    #[new]
    fn new(words: Vec<String>) -> PyResult<Self> {
        Ok(Self {
            inner: RustVocab::from_words(words).py()?,
        })
    }

    fn __getitem__(&self, word: &str) -> PyResult<usize> {
        self.inner
            .get(word)
            .ok_or_else(|| PyKeyError::new_err(word.to_owned()))
    }

    fn __contains__(&self, word: &Bound<'_, PyAny>) -> bool {
        word.extract::<String>()
            .is_ok_and(|w| self.inner.contains(&w))
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyList::new(py, self.inner.words())?
            .try_iter()
            .map(Bound::into_any)
    }

    /// The row of `word`, or `default`.
    #[pyo3(signature = (word, default = None))]
    fn get(&self, py: Python<'_>, word: &str, default: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        match self.inner.get(word) {
            Some(r) => Ok(r.into_pyobject(py)?.into_any().unbind()),
            None => Ok(default.unwrap_or_else(|| py.None())),
        }
    }

    /// The words, in row order.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.inner.words())
    }

    /// The rows, `0..len`.
    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, 0..self.inner.len())
    }

    /// `(word, row)` pairs in row order.
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.inner.iter())
    }

    /// The words, in row order.
    #[getter]
    fn words<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.keys(py)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Vocab>()
            .is_ok_and(|o| o.get().inner.words() == self.inner.words())
    }

    fn __repr__(&self) -> String {
        format!("Vocab({} words)", self.inner.len())
    }
}

/// A vocabulary from a `Vocab`, a sequence of words, or a mapping from
/// word to row covering `0..len` once each.
fn vocab_from(obj: &Bound<'_, PyAny>) -> PyResult<RustVocab> {
    if let Ok(v) = obj.cast::<Vocab>() {
        return Ok(v.get().inner.clone());
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        let mut words: Vec<Option<String>> = vec![None; dict.len()];
        for (word, row) in dict.iter() {
            let word: String = word.extract()?;
            let row: usize = row.extract()?;
            match words.get_mut(row) {
                Some(slot @ None) => *slot = Some(word),
                _ => {
                    return Err(value_error(format!(
                        "vocabulary maps {word:?} to row {row}: rows must be 0..{} once each",
                        words.len()
                    )));
                }
            }
        }
        return RustVocab::from_words(words.into_iter().map(|w| w.expect("every row filled"))).py();
    }
    let words: Vec<String> = obj.extract().map_err(|_| {
        PyTypeError::new_err("vocab must be a Vocab, a list of words or a dict word -> row")
    })?;
    RustVocab::from_words(words).py()
}

/// Pretrained vectors: `vocab` (word -> row) and `table`.
#[pyclass(name = "Pretrained", module = "embtable._embtable")]
pub struct Pretrained {
    inner: RustPretrained,
    report: LoadReport,
}

#[pymethods]
impl Pretrained {
    /// The words, as a mapping from word to row.
    #[getter]
    fn vocab(&self) -> Vocab {
        Vocab {
            inner: self.inner.vocab.clone(),
        }
    }

    /// The vectors, one row per word (a copy).
    #[getter]
    fn table(&self) -> Table {
        Table {
            inner: self.inner.table.clone(),
        }
    }

    /// Floats per vector.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// The vector of `word` as an array, or `None`.
    fn vector<'py>(&self, py: Python<'py>, word: &str) -> Option<Bound<'py, numpy::PyArray1<f32>>> {
        self.inner
            .vector(word)
            .map(|v| numpy::PyArray1::from_slice(py, v))
    }

    /// Words met again in the file, whose vectors were skipped (the first
    /// occurrence wins): `(word, line, first_row)` tuples.
    #[getter]
    fn duplicates(&self) -> Vec<(String, usize, usize)> {
        self.report
            .duplicates
            .iter()
            .map(|d| (d.word.clone(), d.line, d.first_row))
            .collect()
    }

    /// A table of `num_rows` rows for your own vocabulary (`word_index`:
    /// word -> row, e.g. a Keras tokenizer's): rows of words with a
    /// pretrained vector get it; the others are drawn by `missing`
    /// (`"zeros"`, `"uniform"`: U(-0.05, 0.05), `"normal"`: N(0, 1)) from
    /// `seed`; `padding_idx` stays zero. Returns `(table, coverage)`,
    /// coverage a dict with `found`, `missing`, `first_missing` and
    /// `unnamed_rows`.
    #[pyo3(signature = (word_index, num_rows = None, *, missing = "zeros", seed = 0, padding_idx = None))]
    fn table_for<'py>(
        &self,
        py: Python<'py>,
        word_index: &Bound<'py, PyAny>,
        num_rows: Option<usize>,
        missing: &str,
        seed: u64,
        padding_idx: Option<usize>,
    ) -> PyResult<(Table, Bound<'py, PyDict>)> {
        let missing = match missing {
            "zeros" => Init::Zeros,
            "uniform" => Init::default(),
            "normal" => Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
            other => {
                return Err(value_error(format!(
                    "missing must be \"zeros\", \"uniform\" or \"normal\", got {other:?}"
                )));
            }
        };
        let pairs: Vec<(String, usize)> = word_index
            .call_method0("items")?
            .try_iter()?
            .map(|item| item?.extract::<(String, usize)>())
            .collect::<PyResult<_>>()?;
        let rows = match num_rows {
            Some(n) => n,
            None => pairs
                .iter()
                .map(|(_, r)| r + 1)
                .max()
                .unwrap_or(0)
                .max(padding_idx.map_or(0, |p| p + 1)),
        };
        let options = TableOptions {
            missing,
            seed,
            padding_idx,
        };
        let inner = &self.inner;
        let (table, coverage) = run(py, move || inner.table_for(pairs, rows, &options)).py()?;
        let dict = PyDict::new(py);
        dict.set_item("found", coverage.found)?;
        dict.set_item("missing", coverage.missing)?;
        dict.set_item("first_missing", coverage.first_missing)?;
        dict.set_item("unnamed_rows", coverage.unnamed_rows)?;
        Ok((Table { inner: table }, dict))
    }

    /// Unpacks as `vocab, table = pretrained`.
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let pair = PyTuple::new(
            py,
            [
                Bound::new(py, self.vocab())?.into_any(),
                Bound::new(py, self.table())?.into_any(),
            ],
        )?;
        pair.try_iter().map(Bound::into_any)
    }

    fn __repr__(&self) -> String {
        format!(
            "Pretrained({} words, dim {})",
            self.inner.vocab.len(),
            self.inner.dim()
        )
    }
}

fn read_options(
    limit: Option<usize>,
    unicode_errors: &str,
    words_with_spaces: bool,
) -> PyResult<ReadOptions> {
    let unicode_errors = match unicode_errors {
        "strict" => UnicodeErrors::Strict,
        "replace" => UnicodeErrors::Replace,
        other => {
            return Err(value_error(format!(
                "unicode_errors must be \"strict\" or \"replace\", got {other:?}"
            )));
        }
    };
    Ok(ReadOptions {
        limit,
        unicode_errors,
        words_with_spaces,
    })
}

fn pretrained(result: (RustPretrained, LoadReport)) -> Pretrained {
    Pretrained {
        inner: result.0,
        report: result.1,
    }
}

/// Reads a word2vec file (text, or `binary=True`).
#[pyfunction]
#[pyo3(signature = (path, *, binary = false, limit = None, unicode_errors = "strict", words_with_spaces = false))]
pub fn read_word2vec(
    py: Python<'_>,
    path: PathBuf,
    binary: bool,
    limit: Option<usize>,
    unicode_errors: &str,
    words_with_spaces: bool,
) -> PyResult<Pretrained> {
    let options = read_options(limit, unicode_errors, words_with_spaces)?;
    let format = if binary {
        Word2VecFormat::Binary
    } else {
        Word2VecFormat::Text
    };
    let p = &path;
    run(py, move || io::read_word2vec_with(p, format, &options))
        .map(pretrained)
        .map_err(in_file(&path))
}

/// Reads a fastText `.vec` file.
#[pyfunction]
#[pyo3(signature = (path, *, limit = None, unicode_errors = "strict", words_with_spaces = false))]
pub fn read_fasttext_vec(
    py: Python<'_>,
    path: PathBuf,
    limit: Option<usize>,
    unicode_errors: &str,
    words_with_spaces: bool,
) -> PyResult<Pretrained> {
    let options = read_options(limit, unicode_errors, words_with_spaces)?;
    let p = &path;
    run(py, move || io::read_fasttext_vec_with(p, &options))
        .map(pretrained)
        .map_err(in_file(&path))
}

/// Reads a GloVe file (`glove.840B.300d.txt` needs `words_with_spaces=True`).
#[pyfunction]
#[pyo3(signature = (path, *, limit = None, unicode_errors = "strict", words_with_spaces = false))]
pub fn read_glove(
    py: Python<'_>,
    path: PathBuf,
    limit: Option<usize>,
    unicode_errors: &str,
    words_with_spaces: bool,
) -> PyResult<Pretrained> {
    let options = read_options(limit, unicode_errors, words_with_spaces)?;
    let p = &path;
    run(py, move || io::read_glove_with(p, &options))
        .map(pretrained)
        .map_err(in_file(&path))
}

/// Writes vectors in word2vec format (text, or `binary=True`), atomically.
#[pyfunction]
#[pyo3(signature = (path, vocab, table, *, binary = false))]
pub fn write_word2vec(
    py: Python<'_>,
    path: PathBuf,
    vocab: &Bound<'_, PyAny>,
    table: PyRef<'_, Table>,
    binary: bool,
) -> PyResult<()> {
    let vocab = vocab_from(vocab)?;
    let format = if binary {
        Word2VecFormat::Binary
    } else {
        Word2VecFormat::Text
    };
    let table = &table.inner;
    run(py, || io::write_word2vec(&path, &vocab, table, format)).py()
}

/// Writes vectors in GloVe format, atomically.
#[pyfunction]
pub fn write_glove(
    py: Python<'_>,
    path: PathBuf,
    vocab: &Bound<'_, PyAny>,
    table: PyRef<'_, Table>,
) -> PyResult<()> {
    let vocab = vocab_from(vocab)?;
    let table = &table.inner;
    run(py, || io::write_glove(&path, &vocab, table)).py()
}

/// Saves a table as a `(num_rows, dim)` float32 `.npy` file, atomically.
#[pyfunction]
pub fn save_npy(py: Python<'_>, path: PathBuf, table: PyRef<'_, Table>) -> PyResult<()> {
    let table = &table.inner;
    run(py, || io::save_npy(&path, table)).py()
}

/// Loads a table from a 2-D `.npy` file (float32, or float16/float64 converted).
#[pyfunction]
pub fn load_npy(py: Python<'_>, path: PathBuf) -> PyResult<Table> {
    let p = &path;
    let inner = run(py, move || io::load_npy(p)).map_err(in_file(&path))?;
    Ok(Table { inner })
}

/// Saves a table as one safetensors tensor called `name`.
#[pyfunction]
pub fn save_table_safetensors(
    py: Python<'_>,
    path: PathBuf,
    name: &str,
    table: PyRef<'_, Table>,
) -> PyResult<()> {
    let table = &table.inner;
    run(py, || io::save_table_safetensors(&path, name, table)).py()
}

/// Loads the safetensors tensor `name` as a table.
#[pyfunction]
pub fn load_table_safetensors(py: Python<'_>, path: PathBuf, name: &str) -> PyResult<Table> {
    let p = &path;
    let inner = run(py, move || io::load_table_safetensors(p, name)).map_err(in_file(&path))?;
    Ok(Table { inner })
}

/// One entry of `save_checkpoint`'s mapping, borrowed from Python objects.
enum Entry<'py> {
    Layer(PyRef<'py, Layer>),
    Table(PyRef<'py, Table>, Option<PyRef<'py, Optimizer>>),
}

/// Saves tables with their optimizers' whole state in one safetensors
/// file, atomically. `tables` maps each name to an `Embedding` layer, a
/// `Table`, or a `(Table, Optimizer)` pair; `metadata` holds your own
/// string entries.
#[pyfunction]
#[pyo3(signature = (path, tables, *, metadata = None))]
pub fn save_checkpoint(
    py: Python<'_>,
    path: PathBuf,
    tables: &Bound<'_, PyDict>,
    metadata: Option<std::collections::BTreeMap<String, String>>,
) -> PyResult<()> {
    let mut entries: Vec<(String, Entry<'_>)> = Vec::new();
    for (name, value) in tables.iter() {
        let name: String = name.extract()?;
        let entry = if let Ok(layer) = value.cast::<Layer>() {
            Entry::Layer(layer.borrow())
        } else if let Ok(table) = value.cast::<Table>() {
            Entry::Table(table.borrow(), None)
        } else if let Ok((table, optimizer)) =
            value.extract::<(PyRef<'_, Table>, PyRef<'_, Optimizer>)>()
        {
            Entry::Table(table, Some(optimizer))
        } else {
            return Err(PyTypeError::new_err(format!(
                "checkpoint entry {name:?} must be an Embedding, a Table or a (Table, Optimizer) \
                 pair, got {}",
                value.get_type().name()?
            )));
        };
        entries.push((name, entry));
    }
    let mut ckpt = Checkpoint::new();
    for (name, entry) in &entries {
        ckpt = match entry {
            // The options too, so that `take_layer` gives the same layer back.
            Entry::Layer(layer) => ckpt.with_layer(name.clone(), layer.inner()).py()?,
            Entry::Table(table, Some(optimizer)) => {
                ckpt.with(name.clone(), &table.inner, &*optimizer.lock())
            }
            Entry::Table(table, None) => ckpt.with_table(name.clone(), &table.inner),
        };
    }
    for (key, value) in metadata.unwrap_or_default() {
        ckpt = ckpt.with_metadata(key, value);
    }
    run(py, || ckpt.save(&path)).py()
}

/// A checkpoint read back: tables by name with their optimizers.
#[pyclass(name = "Checkpoint", module = "embtable._embtable")]
pub struct LoadedCheckpoint {
    inner: Checkpoint<'static>,
}

#[pymethods]
impl LoadedCheckpoint {
    /// The table names, in the order they were saved.
    #[getter]
    fn names(&self) -> Vec<String> {
        self.inner.names().map(str::to_owned).collect()
    }

    /// `(table, optimizer)` saved under `name` (`optimizer` is `None` for a
    /// table saved without one).
    fn __getitem__(&self, py: Python<'_>, name: &str) -> PyResult<(Table, Option<Py<PyAny>>)> {
        let table = self
            .inner
            .table(name)
            .ok_or_else(|| PyKeyError::new_err(name.to_owned()))?
            .clone();
        let optimizer = match self.inner.optimizer_state(name) {
            Some(state) if state.kind != embtable::Frozen::KIND => {
                let mut fresh = AnyOptimizer::for_kind(&state.kind)?;
                let state = state.clone();
                run(py, || fresh.load_state(state)).py()?;
                Some(Optimizer::wrap(py, fresh)?)
            }
            _ => None,
        };
        Ok((Table { inner: table }, optimizer))
    }

    /// Removes layer `name` from this checkpoint and returns it as an
    /// `Embedding`: its table, a fresh optimizer of the saved kind holding
    /// the saved state, and the saved options (padding row, max_norm, ...).
    fn take_layer(&mut self, py: Python<'_>, name: &str) -> PyResult<Layer> {
        if self.inner.table(name).is_none() {
            return Err(PyKeyError::new_err(name.to_owned()));
        }
        let ckpt = &mut self.inner;
        py.detach(|| Layer::restore(ckpt, name))
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.table(name).is_some()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyList::new(py, self.names())?
            .try_iter()
            .map(Bound::into_any)
    }

    /// Your metadata entry `key`, or `None`.
    fn metadata(&self, key: &str) -> Option<String> {
        self.inner.metadata(key).map(str::to_owned)
    }

    /// `{"weight": array, "optimizer": state dict or None}` of table
    /// `name`, as `Embedding.load_state_dict` takes it.
    fn state_dict<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
        let table = self
            .inner
            .table(name)
            .ok_or_else(|| PyKeyError::new_err(name.to_owned()))?;
        let dict = PyDict::new(py);
        dict.set_item("weight", crate::table::to_numpy(py, table)?)?;
        match self.inner.optimizer_state(name) {
            Some(state) if state.kind != embtable::Frozen::KIND => {
                dict.set_item("optimizer", crate::optim::state_to_py(py, state.clone())?)?
            }
            _ => dict.set_item("optimizer", py.None())?,
        }
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!("Checkpoint({})", self.names().join(", "))
    }
}

/// Reads a checkpoint written by `save_checkpoint` (or the Rust library).
#[pyfunction]
pub fn load_checkpoint(py: Python<'_>, path: PathBuf) -> PyResult<LoadedCheckpoint> {
    let p = &path;
    let inner = run(py, move || Checkpoint::load(p)).map_err(in_file(&path))?;
    Ok(LoadedCheckpoint { inner })
}
