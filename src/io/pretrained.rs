//! `Pretrained`: words and their vectors; building a table for a user's own
//! vocabulary from them.

use std::borrow::Borrow;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use super::text::check_room;
use super::{Duplicate, LoadReport, UnicodeErrors, Vocab, format_error, show};
use crate::{EmbeddingTable, Error, Init, Result};

/// Pretrained vectors: a vocabulary and the table whose row `i` is the
/// vector of word `i`.
///
/// Returned by the readers ([`read_word2vec`](super::read_word2vec),
/// [`read_glove`](super::read_glove), …). Use the table as it is, or build a
/// table for your own vocabulary with [`table_for`](Self::table_for).
///
/// # Examples
/// ```
/// use embtable::io::Pretrained;
/// use embtable::{EmbeddingTable, Vocab};
/// let vocab = Vocab::from_words(["cat", "dog"])?;
/// let table = EmbeddingTable::from_rows(2, 2, &[1., 2., 3., 4.])?;
/// let pretrained = Pretrained::new(vocab, table)?;
/// assert_eq!(pretrained.vector("dog"), Some(&[3., 4.][..]));
/// assert_eq!(pretrained.vector("cow"), None);
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Pretrained {
    /// The words; word `i` names row `i` of `table`.
    pub vocab: Vocab,
    /// The vectors, one row per word.
    pub table: EmbeddingTable,
}

/// How [`Pretrained::table_for`] fills the rows it has no vector for.
///
/// Every row starts as `missing` draws it from `seed` (a function of the
/// row number only, see [`Init`]); rows of words found in the pretrained
/// vocabulary are then overwritten by their vectors, and the padding row, if
/// any, is set to zeros. The default, all zeros, is the common Keras recipe
/// (`embedding_matrix = np.zeros((num_tokens, dim))`, then fill the hits).
///
/// # Examples
/// ```
/// use embtable::io::TableOptions;
/// use embtable::Init;
/// let options = TableOptions {
///     missing: Init::Uniform { low: -0.05, high: 0.05 },
///     seed: 7,
///     padding_idx: Some(0),
/// };
/// assert_eq!(TableOptions::default().missing, Init::Zeros);
/// # let _ = options;
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TableOptions {
    /// Initialiser of rows without a pretrained vector (words not found, and
    /// rows no word maps to). Default [`Init::Zeros`].
    pub missing: Init,
    /// Seed of `missing`. Default 0.
    pub seed: u64,
    /// A row kept at zeros whatever maps to it: Keras' index 0 (reserved by
    /// `Tokenizer`, `""` in `TextVectorization`), PyTorch's `padding_idx`.
    /// Default `None`.
    pub padding_idx: Option<usize>,
}

impl Default for TableOptions {
    fn default() -> Self {
        Self {
            missing: Init::Zeros,
            seed: 0,
            padding_idx: None,
        }
    }
}

/// How much of a vocabulary [`Pretrained::table_for`] found vectors for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Words whose pretrained vector was copied.
    pub found: usize,
    /// Words with no pretrained vector: their rows hold `missing`.
    pub missing: usize,
    /// `(row, word)` of the missing words with the lowest rows, in row order
    /// (at most [`Coverage::SHOWN`]). With a frequency-ordered word index, as
    /// Keras' `Tokenizer` builds, these are the most frequent missing words.
    pub first_missing: Vec<(usize, String)>,
    /// Rows no word maps to (the padding row not counted).
    pub unnamed_rows: usize,
}

impl Coverage {
    /// How many missing words [`first_missing`](Self::first_missing) keeps.
    pub const SHOWN: usize = 20;

    /// `found / (found + missing)`, or 0 for an empty word index.
    pub fn ratio(&self) -> f64 {
        let total = self.found + self.missing;
        if total == 0 {
            0.0
        } else {
            self.found as f64 / total as f64
        }
    }
}

/// Row markers of `table_for`'s bookkeeping (any other value is the
/// pretrained row copied there).
const UNNAMED: usize = usize::MAX;
const MISSING: usize = usize::MAX - 1;

impl Pretrained {
    /// Pairs a vocabulary with its table.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `vocab.len() != table.rows()`.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Pretrained;
    /// use embtable::{EmbeddingTable, Vocab};
    /// let table = EmbeddingTable::zeros(2, 4)?;
    /// assert!(Pretrained::new(Vocab::from_words(["a", "b"])?, table.clone()).is_ok());
    /// assert!(Pretrained::new(Vocab::from_words(["a"])?, table).is_err());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn new(vocab: Vocab, table: EmbeddingTable) -> Result<Self> {
        if vocab.len() != table.rows() {
            return Err(Error::ShapeMismatch {
                what: "vocabulary length (table rows)",
                expected: table.rows(),
                got: vocab.len(),
            });
        }
        Ok(Self { vocab, table })
    }

    /// The vector of `word`, if present.
    pub fn vector(&self, word: &str) -> Option<&[f32]> {
        self.vocab.get(word).map(|r| self.table.row(r))
    }

    /// Floats per vector.
    pub fn dim(&self) -> usize {
        self.table.dim()
    }

    /// A table of `rows` rows for your own vocabulary: row `i` holds the
    /// pretrained vector of the word mapped to `i`, when there is one.
    ///
    /// `word_index` maps words to rows: Keras' `tokenizer.word_index` (index
    /// 0 reserved for padding), a `TextVectorization` vocabulary enumerated,
    /// a [`Vocab`] (`&vocab` or `vocab.iter()`), any `&HashMap<String,
    /// usize>` or iterator of `(word, row)` pairs. Rows
    /// without a vector are filled as [`TableOptions`] says (zeros by
    /// default). Words mapped to the padding row are not counted in the
    /// [`Coverage`].
    ///
    /// # Errors
    /// Nothing is returned but the error if:
    /// - [`Error::InvalidConfig`]: `rows` is 0, the `missing` initialiser is
    ///   invalid, `padding_idx >= rows`, a word maps to a row `>= rows`, two
    ///   words found in the pretrained vocabulary map to the same row (which
    ///   vector wins would depend on the iteration order of a hash map), or a
    ///   found word maps to the padding row;
    /// - [`Error::Alloc`]: the table does not fit in memory.
    ///
    /// # Examples
    /// ```
    /// use std::collections::HashMap;
    /// use embtable::io::{Pretrained, TableOptions};
    /// use embtable::{EmbeddingTable, Vocab};
    ///
    /// let pretrained = Pretrained::new(
    ///     Vocab::from_words(["the", "cat", "sat"])?,
    ///     EmbeddingTable::from_rows(3, 2, &[1., 1., 2., 2., 3., 3.])?,
    /// )?;
    /// // A Keras Tokenizer's word_index: 0 is padding, "zyx" is not pretrained.
    /// let word_index: HashMap<String, usize> =
    ///     [("cat", 1), ("zyx", 2), ("the", 3)].map(|(w, i)| (w.to_string(), i)).into();
    /// let options = TableOptions { padding_idx: Some(0), ..Default::default() };
    /// let (table, coverage) = pretrained.table_for(&word_index, 5, &options)?;
    ///
    /// assert_eq!(table.to_vec(), [0., 0., 2., 2., 0., 0., 1., 1., 0., 0.]);
    /// assert_eq!((coverage.found, coverage.missing), (2, 1));
    /// assert_eq!(coverage.first_missing, [(2, "zyx".to_string())]);
    /// assert_eq!(coverage.unnamed_rows, 1); // row 4
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn table_for<W, S, N>(
        &self,
        word_index: W,
        rows: usize,
        options: &TableOptions,
    ) -> Result<(EmbeddingTable, Coverage)>
    where
        W: IntoIterator<Item = (S, N)>,
        S: AsRef<str>,
        N: Borrow<usize>,
    {
        if let Some(p) = options.padding_idx
            && p >= rows
        {
            return Err(Error::InvalidConfig {
                field: "padding_idx",
                reason: format!("{p} is not below the {rows} rows of the table"),
            });
        }
        let mut table = EmbeddingTable::new(rows, self.dim(), options.missing, options.seed)?;
        if let Some(p) = options.padding_idx {
            table.row_mut(p).fill(0.0);
        }
        let mut owner = vec![UNNAMED; rows];
        let mut coverage = Coverage::default();
        // Max-heap on the row: keeps the SHOWN lowest rows seen so far.
        let mut first_missing = BinaryHeap::with_capacity(Coverage::SHOWN + 1);
        for (word, row) in word_index {
            let (word, row) = (word.as_ref(), *row.borrow());
            if row >= rows {
                return Err(Error::InvalidConfig {
                    field: "word_index",
                    reason: format!(
                        "word {word:?} maps to row {row}, but the table has {rows} rows"
                    ),
                });
            }
            let padding = options.padding_idx == Some(row);
            match self.vocab.get(word) {
                Some(_) if padding => {
                    return Err(Error::InvalidConfig {
                        field: "word_index",
                        reason: format!(
                            "word {word:?} has a pretrained vector but maps to the padding row {row}"
                        ),
                    });
                }
                Some(src) => {
                    if owner[row] < MISSING && owner[row] != src {
                        let other = self.vocab.word(owner[row]).unwrap_or_default();
                        return Err(Error::InvalidConfig {
                            field: "word_index",
                            reason: format!(
                                "words {other:?} and {word:?} both have pretrained vectors \
                                 and both map to row {row}"
                            ),
                        });
                    }
                    owner[row] = src;
                    table.row_mut(row).copy_from_slice(self.table.row(src));
                    coverage.found += 1;
                }
                None if padding => {}
                None => {
                    if owner[row] == UNNAMED {
                        owner[row] = MISSING;
                    }
                    coverage.missing += 1;
                    let keep = first_missing.len() < Coverage::SHOWN
                        || first_missing.peek().is_some_and(|&(top, _)| row < top);
                    if keep {
                        first_missing.push((row, word.to_string()));
                        if first_missing.len() > Coverage::SHOWN {
                            first_missing.pop();
                        }
                    }
                }
            }
        }
        coverage.first_missing = first_missing.into_sorted_vec();
        coverage.unnamed_rows = owner
            .iter()
            .enumerate()
            .filter(|&(r, &o)| o == UNNAMED && options.padding_idx != Some(r))
            .count();
        Ok((table, coverage))
    }
}

/// Where the vectors of a file being read go.
enum Storage {
    /// A table for a file whose size is known. It starts with the rows the
    /// caller's byte budget holds and doubles as vectors arrive, up to
    /// `cap` rows (what the header and the file's size allow).
    Table { table: EmbeddingTable, cap: usize },
    /// Rows gathered in chunks, for a stream whose size is unknown; copied
    /// into a table at the end.
    Chunks { dim: usize, chunks: Vec<Vec<f32>> },
}

/// Floats per chunk of [`Storage::Chunks`] (at least one row). Chunks grow
/// as rows arrive, never ahead of them.
const CHUNK_FLOATS: usize = 1 << 20;

/// Builds a [`Pretrained`] record by record (or batch by batch), in file
/// order: decodes the word, parses the vector straight into the next free
/// row, and resolves duplicates as gensim does (the first occurrence wins).
pub(crate) struct Builder {
    vocab: Vocab,
    storage: Storage,
    report: LoadReport,
    unicode: UnicodeErrors,
    /// Where a record beyond the table's rows is parsed (see `record`).
    scratch: Vec<f32>,
}

impl Builder {
    /// A builder writing into a table of at most `cap × dim`, for a file
    /// whose size is known. The table starts with the rows `budget` bytes
    /// hold (at least one; the caller passes a small multiple of the bytes
    /// left to read) and doubles as vectors are read, so that a header or
    /// a line count promising more vectors than the file holds costs no
    /// more than the file's size.
    pub(crate) fn with_table(
        cap: usize,
        dim: usize,
        declared: Option<usize>,
        unicode: UnicodeErrors,
        budget: u64,
    ) -> Result<Self> {
        let row_bytes = crate::aligned::checked_stride(dim)
            .and_then(|s| s.checked_mul(size_of::<f32>()))
            .unwrap_or(usize::MAX);
        let first = usize::try_from(budget / row_bytes as u64)
            .unwrap_or(usize::MAX)
            .clamp(1, cap.max(1));
        Ok(Self {
            vocab: Vocab::with_capacity(first),
            storage: Storage::Table {
                table: EmbeddingTable::zeros(first, dim)?,
                cap,
            },
            report: LoadReport {
                declared,
                ..LoadReport::default()
            },
            unicode,
            scratch: Vec::new(),
        })
    }

    /// A builder for a stream of unknown length.
    pub(crate) fn growing(dim: usize, declared: Option<usize>, unicode: UnicodeErrors) -> Self {
        Self {
            vocab: Vocab::new(),
            storage: Storage::Chunks {
                dim,
                chunks: Vec::new(),
            },
            report: LoadReport {
                declared,
                ..LoadReport::default()
            },
            unicode,
            scratch: Vec::new(),
        }
    }

    /// Floats per vector.
    pub(crate) fn dim(&self) -> usize {
        match &self.storage {
            Storage::Table { table, .. } => table.dim(),
            Storage::Chunks { dim, .. } => *dim,
        }
    }

    /// Vectors read so far, duplicates included.
    pub(crate) fn records(&self) -> usize {
        self.report.records
    }

    /// Adds the vector of `word`, read at `line`: `fill` writes its `dim`
    /// values into the row it is given (and may fail). `values`, the text of
    /// the values in a text file, is first checked to be long enough for
    /// `dim` values, so that a short line never costs a row.
    pub(crate) fn record(
        &mut self,
        word: &[u8],
        line: usize,
        values: Option<&[u8]>,
        fill: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<()> {
        let dim = self.dim();
        let decoded = decode(word, line, self.unicode, &mut self.report)?;
        if let Some(values) = values {
            check_room(values, dim, word, line)?;
        }
        let word = decoded;
        let row = self.vocab.len();
        // A duplicate's values are parsed too (a malformed one is an error,
        // as in gensim) into the next free row, which the next new word
        // overwrites.
        let mut overflow = false;
        let slot = match &mut self.storage {
            Storage::Table { table, cap } if row < *cap => {
                if row == table.rows() {
                    grow(table, *cap, row + 1)?;
                }
                table.row_mut(row)
            }
            Storage::Table { .. } => {
                // The table may hold what the file's size can hold, so only
                // a malformed or changing file gets here: parse into scratch
                // space to report what is wrong with this record.
                overflow = true;
                self.scratch.resize(dim, 0.0);
                &mut self.scratch[..]
            }
            Storage::Chunks { chunks, .. } => {
                let rows_per_chunk = (CHUNK_FLOATS / dim.max(1)).max(1);
                let (c, within) = (row / rows_per_chunk, row % rows_per_chunk);
                if c == chunks.len() {
                    chunks.push(Vec::new());
                }
                let chunk = &mut chunks[c];
                chunk.resize((within + 1) * dim, 0.0);
                &mut chunk[within * dim..]
            }
        };
        fill(slot)?;
        self.report.records += 1;
        match self.vocab.get(&word) {
            Some(first_row) => self.report.duplicates.push(Duplicate {
                word,
                line,
                first_row,
            }),
            None if overflow => return Err(no_row_left(line, row)),
            None => {
                self.vocab.push_new(word);
            }
        }
        Ok(())
    }

    /// Adds a batch of records in file order: the words are resolved one
    /// after the other, then the values are parsed in parallel, new words'
    /// straight into their rows. The outcome, errors and report included, is
    /// that of calling [`record`](Self::record) for each record in turn: the
    /// error reported is the one of the earliest record that has one.
    pub(crate) fn record_batch<P>(&mut self, records: &[Record<'_>], parse: P) -> Result<()>
    where
        P: Fn(&[u8], &mut [f32], &[u8], usize) -> Result<()> + Sync,
    {
        let (table, cap) = match &mut self.storage {
            Storage::Table { table, cap } => (table, *cap),
            Storage::Chunks { .. } => {
                for r in records {
                    self.record(r.word, r.line, Some(r.values), |row| {
                        parse(r.values, row, r.word, r.line)
                    })?;
                }
                return Ok(());
            }
        };
        let dim = table.dim();

        // Words, in file order. Record `new[k]` holds the word of row
        // `base + k`. Resolution stops at the first bad word or line too
        // short for `dim` values (so no row is set aside for it), or at the
        // first new word with no row left (`overflow`, see `record`).
        let base = self.vocab.len();
        let mut new = Vec::with_capacity(records.len());
        let mut dups = Vec::new();
        let mut stop = None;
        for (i, r) in records.iter().enumerate() {
            let checked = decode(r.word, r.line, self.unicode, &mut self.report)
                .and_then(|word| check_room(r.values, dim, r.word, r.line).map(|()| word));
            let word = match checked {
                Ok(word) => word,
                Err(e) => {
                    stop = Some((i, Some(e)));
                    break;
                }
            };
            match self.vocab.get(&word) {
                Some(first_row) => dups.push((
                    i,
                    Duplicate {
                        word,
                        line: r.line,
                        first_row,
                    },
                )),
                None if self.vocab.len() >= cap => {
                    stop = Some((i, None));
                    break;
                }
                None => {
                    self.vocab.push_new(word);
                    new.push(i);
                }
            }
        }

        // Rows for the new words: each was checked to have the bytes of
        // `dim` values, so growing here follows what was read.
        if self.vocab.len() > table.rows() {
            grow(table, cap, self.vocab.len())?;
        }
        let stride = table.stride();

        // Values, in parallel. Rows of distinct records are disjoint chunks
        // of the table; duplicates are parsed into scratch space (checked,
        // then dropped).
        let parse_record = |i: usize, row: &mut [f32]| {
            let r = &records[i];
            parse(r.values, row, r.word, r.line).err().map(|e| (i, e))
        };
        let new_rows = &mut table.as_padded_mut()[base * stride..(base + new.len()) * stride];
        let bad_new = new_rows
            .par_chunks_mut(stride)
            .zip(new.par_iter())
            .with_min_len(64)
            .filter_map(|(row, &i)| parse_record(i, &mut row[..dim]))
            .min_by_key(|&(i, _)| i);
        let bad_dup = dups
            .par_iter()
            .filter_map(|&(i, _)| parse_record(i, &mut vec![0.0; dim]))
            .min_by_key(|&(i, _)| i);
        // Every record seen is before `stop`, so its error comes first.
        if let Some((_, e)) = bad_new.into_iter().chain(bad_dup).min_by_key(|&(i, _)| i) {
            return Err(e);
        }
        match stop {
            Some((_, Some(e))) => return Err(e),
            Some((i, None)) => {
                let r = &records[i];
                self.scratch.resize(dim, 0.0);
                parse(r.values, &mut self.scratch, r.word, r.line)?;
                return Err(no_row_left(r.line, cap));
            }
            None => {}
        }
        self.report.records += records.len();
        self.report
            .duplicates
            .extend(dups.into_iter().map(|(_, d)| d));
        Ok(())
    }

    /// The vectors read, in a table of exactly one row per distinct word.
    ///
    /// `line` is where a missing vector would have been, for the error when
    /// nothing was read.
    pub(crate) fn finish(self, line: usize) -> Result<(Pretrained, LoadReport)> {
        let n = self.vocab.len();
        if n == 0 {
            return Err(format_error(line, "the file holds no vectors"));
        }
        let table = match self.storage {
            Storage::Table { table, .. } if table.rows() == n => table,
            Storage::Table { table, .. } => {
                // Duplicates (or doubling) left rows unused: copy into a
                // table of `n` rows.
                let mut small = EmbeddingTable::zeros(n, table.dim())?;
                let len = small.as_padded().len();
                small
                    .as_padded_mut()
                    .copy_from_slice(&table.as_padded()[..len]);
                small
            }
            Storage::Chunks { dim, mut chunks } => {
                let mut table = EmbeddingTable::zeros(n, dim)?;
                let stride = table.stride();
                let mut dst_rows = table.as_padded_mut().chunks_exact_mut(stride);
                // Free each chunk once copied, so the peak is the table plus
                // the chunks, not more.
                chunks.reverse();
                while let Some(chunk) = chunks.pop() {
                    for (src, dst) in chunk.chunks_exact(dim).zip(&mut dst_rows) {
                        dst[..dim].copy_from_slice(src);
                    }
                }
                table
            }
        };
        Ok((
            Pretrained {
                vocab: self.vocab,
                table,
            },
            self.report,
        ))
    }
}

/// One vector line of a text file: its number, its word and the text of
/// its values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Record<'a> {
    pub(crate) line: usize,
    pub(crate) word: &'a [u8],
    pub(crate) values: &'a [u8],
}

/// The word of a record as a `String`, invalid UTF-8 handled as `unicode`
/// says (replacements are noted in `report`).
fn decode(
    word: &[u8],
    line: usize,
    unicode: UnicodeErrors,
    report: &mut LoadReport,
) -> Result<String> {
    if word.is_empty() {
        return Err(format_error(line, "empty word"));
    }
    match String::from_utf8(word.to_vec()) {
        Ok(word) => Ok(word),
        Err(_) if unicode == UnicodeErrors::Replace => {
            report.replaced_words.push(line);
            Ok(String::from_utf8_lossy(word).into_owned())
        }
        Err(e) => Err(format_error(
            line,
            format!(
                "word {} is not valid UTF-8 (invalid byte at offset {}); \
                 UnicodeErrors::Replace reads it lossily",
                show(word),
                e.utf8_error().valid_up_to()
            ),
        )),
    }
}

/// Grows `table` to hold at least `rows` rows (at most `cap`): to twice its
/// rows, so that a file read row by row is copied a bounded number of
/// times, but never beyond `cap`. The rows kept are copied whole.
fn grow(table: &mut EmbeddingTable, cap: usize, rows: usize) -> Result<()> {
    let rows = table.rows().saturating_mul(2).clamp(rows, cap.max(rows));
    let mut bigger = EmbeddingTable::zeros(rows, table.dim())?;
    let kept = table.as_padded();
    bigger.as_padded_mut()[..kept.len()].copy_from_slice(kept);
    *table = bigger;
    Ok(())
}

/// A new word at `line` found every one of the `rows` rows taken: the
/// table was sized to what the file could hold, so the file changed.
fn no_row_left(line: usize, rows: usize) -> Error {
    format_error(
        line,
        format!(
            "more vectors than the file's size could hold when reading began ({rows}); \
             was it changed while being read?"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill_with(v: f32) -> impl FnOnce(&mut [f32]) -> Result<()> {
        move |row| {
            row.fill(v);
            Ok(())
        }
    }

    #[test]
    fn duplicates_keep_the_first_and_shrink_the_table() {
        for mut b in [
            Builder::with_table(4, 3, Some(4), UnicodeErrors::Strict, 0).unwrap(),
            Builder::with_table(4, 3, Some(4), UnicodeErrors::Strict, 1 << 20).unwrap(),
            Builder::growing(3, Some(4), UnicodeErrors::Strict),
        ] {
            b.record(b"a", 2, None, fill_with(1.0)).unwrap();
            b.record(b"b", 3, None, fill_with(2.0)).unwrap();
            b.record(b"a", 4, None, fill_with(9.0)).unwrap();
            b.record(b"c", 5, None, fill_with(3.0)).unwrap();
            assert_eq!(b.records(), 4);
            let (p, report) = b.finish(6).unwrap();
            assert_eq!(p.vocab.words(), ["a", "b", "c"]);
            assert_eq!(p.table.to_vec(), [1., 1., 1., 2., 2., 2., 3., 3., 3.]);
            assert_eq!(
                report.duplicates,
                [Duplicate {
                    word: "a".into(),
                    line: 4,
                    first_row: 0
                }]
            );
        }
    }

    #[test]
    fn growing_storage_spans_chunks() {
        let per_chunk = CHUNK_FLOATS / 2;
        let n = per_chunk * 2 + 5;
        for mut b in [
            Builder::growing(2, None, UnicodeErrors::Strict),
            Builder::with_table(n, 2, None, UnicodeErrors::Strict, 0).unwrap(),
        ] {
            for i in 0..n {
                b.record(format!("w{i}").as_bytes(), i + 1, None, fill_with(i as f32))
                    .unwrap();
            }
            let (p, _) = b.finish(n + 1).unwrap();
            assert_eq!(p.table.rows(), n);
            for i in [0, per_chunk - 1, per_chunk, n - 1] {
                assert_eq!(p.table.row(i), [i as f32; 2]);
            }
        }
    }

    #[test]
    fn more_records_than_rows_is_an_error() {
        let mut b = Builder::with_table(1, 2, Some(1), UnicodeErrors::Strict, 1 << 20).unwrap();
        b.record(b"a", 2, None, fill_with(0.0)).unwrap();
        let err = b.record(b"b", 3, None, fill_with(0.0)).unwrap_err();
        assert!(matches!(err, Error::Format { line: 3, .. }), "{err}");
    }

    #[test]
    fn a_line_too_short_for_its_values_costs_no_row() {
        let mut b = Builder::with_table(100, 1000, None, UnicodeErrors::Strict, 0).unwrap();
        b.record(b"a", 1, Some(&[b' '; 2000]), fill_with(0.0))
            .unwrap();
        // 1999 bytes cannot hold 1000 values: refused before a row is taken.
        let err = b
            .record(b"b", 2, Some(&[b' '; 1999]), fill_with(0.0))
            .unwrap_err();
        assert!(err.to_string().contains("expected 1000 values"), "{err}");
        match &b.storage {
            Storage::Table { table, .. } => assert_eq!(table.rows(), 1),
            Storage::Chunks { .. } => unreachable!(),
        }
    }
}
