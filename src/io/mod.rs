//! Reading and writing the files users already have: pretrained word vectors
//! (word2vec text and binary, GloVe, fastText `.vec`) and tables as NumPy
//! `.npy` arrays.
//!
//! | format | read | write |
//! |---|---|---|
//! | word2vec text (`count dim` header, `word v1 … vdim` lines) | [`read_word2vec`] `Text` | [`write_word2vec`] `Text` |
//! | word2vec binary (header line, `word` + space + `dim` little-endian `f32`) | [`read_word2vec`] `Binary` | [`write_word2vec`] `Binary` |
//! | fastText `.vec` (word2vec text) | [`read_fasttext_vec`] | [`write_word2vec`] `Text` |
//! | GloVe (word2vec text without the header) | [`read_glove`] | [`write_glove`] |
//! | `.npy`, `(rows, dim)` `float32` | [`load_npy`] | [`save_npy`] |
//! | safetensors, one `[rows, dim]` tensor by name (`F32`; reads `F16`, `BF16`, `F64` too) | [`load_table_safetensors`] | [`save_table_safetensors`] |
//! | checkpoint: tables and their optimizers' full state, as safetensors | [`Checkpoint::load`], [`load_checkpoint`] | [`Checkpoint::save`], [`save_checkpoint`] |
//!
//! # Reading
//! Files are streamed through a buffered reader straight into the rows of
//! the table. word2vec and fastText files declare their size in the
//! header; a GloVe file is counted in a first cheap pass over its bytes, as
//! gensim does.
//!
//! **Memory follows the bytes, never a claim.** A corrupt header cannot ask
//! for terabytes: the table is capped at the vectors the file's size can
//! hold, starts with the rows that twice the bytes left to read would take,
//! and doubles only as vectors are read. (In practice a table is allocated
//! once and the vectors are never held twice: a value takes four bytes in
//! the table and a binary file, and a few characters in a text file; only
//! files of very short vectors, whose rows are padded to a cache line,
//! grow.) A text line too short for the declared number of
//! values is refused before a row is set aside for it. A stream whose size
//! is unknown (a pipe) is gathered as it is read: rows as they are parsed,
//! `.npy` data in chunks before the header's shape is allocated. So junk
//! after a header promising millions of vectors costs what the junk's
//! bytes cost; `tests/io_memory.rs` bounds the peak on mangled files of
//! every format. Text is parsed in batches of a few MiB:
//! the words of a batch are resolved in file order, then its values are
//! parsed in parallel (rayon) straight into their rows; the result, errors
//! included, does not depend on the thread count.
//!
//! Words repeated in a file are resolved as gensim does: the first
//! occurrence is kept and later ones are skipped (their values are still
//! checked). The `_with` readers take [`ReadOptions`] (read only the first
//! `limit` vectors; replace invalid UTF-8 in words, as gensim's
//! `unicode_errors='replace'`) and return a [`LoadReport`] listing the
//! skipped duplicates with their line numbers. When duplicates were skipped
//! the table is copied once into a smaller one, since a table cannot shrink
//! in place.
//!
//! Text lines are split on runs of spaces and tabs; a trailing space (as
//! fastText writes) or `\r\n` line ends are fine, blank lines are skipped,
//! and a UTF-8 byte order mark at the start is ignored. Values are parsed
//! with Rust's correctly rounded `f32` parser (`nan` and `inf` are
//! accepted). Data after the vectors a header declares is ignored, as gensim
//! and fastText do. Every line must end with a newline, as every writer
//! ends them: a file whose last line does not may have been cut inside its
//! last number, which would read as a shorter one (`0.125` as `0.12`), so
//! it is an [`Error::Format`] naming the line.
//!
//! # Errors and line numbers
//! A malformed file gives [`Error::Format`] with the line at fault and what
//! is wrong with it, never a panic. Lines are 1-based and physical in text
//! files. In binary files the header is line 1 and the `k`-th vector
//! (1-based) is line `k + 1`, so a vector has the same number in both
//! formats; in `.npy` files the header is line 1 and row `k` (0-based) is
//! line `k + 2`. Operating-system failures give [`Error::Io`] whose context
//! names the path.
//!
//! # Writing
//! Every writer writes to a temporary file in the target's directory,
//! flushes and syncs it to disk, then renames it over the target: a crash
//! mid-write leaves the previous file intact. A target that is a symbolic
//! link is followed, so the file it names is replaced and the link stays;
//! the new file keeps the permissions of the one it replaces. Temporary
//! names (`.{name}.embtable-{pid}-{n}.tmp`) are cut to fit the 255-byte
//! limit on names. A save holds a lock on its temporary file; the next
//! save to the same file removes the temporary files nobody holds, those
//! of saves that were killed. Text formats write each `f32`
//! in the shortest decimal that parses back to the same value, so a
//! write–read round trip is exact (NaN payloads aside); binary formats and
//! `.npy` are bit for bit.
//!
//! # Checkpoints
//! [`save_checkpoint`] and [`Checkpoint`] (several named tables) save tables
//! with their optimizers' whole state, lagging `DenseExact` rows included,
//! in a safetensors file that PyTorch and NumPy read; [`load_checkpoint`]
//! and [`Checkpoint::restore`] load them into fresh optimizers so training
//! resumes bit for bit. The [`checkpoint` module docs](checkpoint) name the
//! tensors and metadata. Errors in a safetensors file are
//! [`Error::Format`] with `line` 0 (the file has no lines) and a reason
//! naming the tensor or metadata key.
//!
//! # Examples
//! ```
//! use embtable::io::{self, Word2VecFormat};
//! use embtable::{EmbeddingTable, Vocab};
//!
//! let vocab = Vocab::from_words(["king", "queen"])?;
//! let table = EmbeddingTable::from_rows(2, 3, &[0.1, 0.2, 0.3, -1.0, 0.0, 2.5e-9])?;
//! let path = std::env::temp_dir().join("embtable-io-doc-module.txt");
//! io::write_word2vec(&path, &vocab, &table, Word2VecFormat::Text)?;
//!
//! let pretrained = io::read_word2vec(&path, Word2VecFormat::Text)?;
//! assert_eq!(pretrained.vocab, vocab);
//! assert_eq!(pretrained.table, table);
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), embtable::Error>(())
//! ```

use std::fs::File;
use std::path::Path;

use crate::{Error, Result};

mod atomic;
pub mod checkpoint;
mod glove;
mod npy;
mod pretrained;
pub(crate) mod safetensors;
mod text;
mod vocab;
mod word2vec;

pub use self::safetensors::{load_table_safetensors, save_table_safetensors};
pub(crate) use atomic::write_atomic;
pub use checkpoint::{Checkpoint, load_checkpoint, save_checkpoint};
pub use glove::{read_glove, read_glove_with, write_glove};
pub use npy::{load_npy, save_npy};
pub use pretrained::{Coverage, Pretrained, TableOptions};
pub use vocab::Vocab;
pub use word2vec::{
    Word2VecFormat, read_fasttext_vec, read_fasttext_vec_with, read_word2vec, read_word2vec_with,
    write_word2vec,
};

/// Options of the `_with` readers.
///
/// # Examples
/// ```
/// use embtable::io::{ReadOptions, UnicodeErrors};
/// let options = ReadOptions { limit: Some(100_000), ..Default::default() };
/// assert_eq!(options.unicode_errors, UnicodeErrors::Strict);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Read only the first `limit` vectors of the file (gensim's `limit`),
    /// counting skipped duplicates; `None` reads them all. `Some(0)` is
    /// rejected, since a table holds at least one row.
    pub limit: Option<usize>,
    /// What to do with a word that is not valid UTF-8.
    pub unicode_errors: UnicodeErrors,
    /// Text formats: a line with more than `dim` values takes all but the
    /// last `dim` tokens as its word, instead of being an error. Needed for
    /// `glove.840B.300d.txt`, which has a few words holding spaces (`. . .`,
    /// `at name@domain.com`). The dimension still comes from the header, or
    /// for GloVe from the first line, which must not be such a line. The
    /// writers refuse such words, since they cannot be read back without this
    /// option. Default `false`.
    pub words_with_spaces: bool,
}

/// What to do with a word that is not valid UTF-8.
///
/// The original word2vec tool truncates long words at a byte count, which
/// can cut a multi-byte character in half; such files need `Replace`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UnicodeErrors {
    /// An [`Error::Format`] naming the line (gensim's `'strict'`).
    #[default]
    Strict,
    /// Replace each invalid sequence by U+FFFD (gensim's `'replace'`). The
    /// [`LoadReport`] lists the lines where this happened.
    Replace,
}

/// What a reader met on the way, besides the vectors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The number of vectors the header declares (`None` for GloVe).
    pub declared: Option<usize>,
    /// Vectors read, duplicates included (at most the `limit`).
    pub records: usize,
    /// Words met again after their first occurrence, in file order. Their
    /// vectors were skipped: the first occurrence wins, as in gensim.
    pub duplicates: Vec<Duplicate>,
    /// Lines whose word held invalid UTF-8 that was replaced by U+FFFD
    /// (only with [`UnicodeErrors::Replace`]).
    pub replaced_words: Vec<usize>,
}

/// A word met again in a file: its vector was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    /// The word.
    pub word: String,
    /// Line of the skipped occurrence (numbered as in [`Error::Format`]).
    pub line: usize,
    /// Row of the table holding the first occurrence's vector.
    pub first_row: usize,
}

/// `Error::Io` for reading `path`.
pub(crate) fn read_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        context: format!("reading {}", path.display()),
        source,
    }
}

/// `Error::Format` at `line`.
pub(crate) fn format_error(line: usize, reason: impl Into<String>) -> Error {
    Error::Format {
        line,
        reason: reason.into(),
    }
}

/// Opens `path` for reading. Returns the file and, for a regular file, its
/// length in bytes (used to cap allocations a corrupt header asks for).
pub(crate) fn open(path: &Path) -> Result<(File, Option<u64>)> {
    let file = File::open(path).map_err(|e| read_error(path, e))?;
    let meta = file.metadata().map_err(|e| read_error(path, e))?;
    let len = meta.is_file().then_some(meta.len());
    Ok((file, len))
}

/// Checks `options.limit` and returns the number of vectors to read from a
/// file declaring `declared` (`usize::MAX`: unknown).
pub(crate) fn vectors_to_read(options: &ReadOptions, declared: usize) -> Result<usize> {
    match options.limit {
        Some(0) => Err(Error::InvalidConfig {
            field: "limit",
            reason: "0: a table holds at least one row; use None to read every vector".into(),
        }),
        Some(limit) => Ok(limit.min(declared)),
        None => Ok(declared),
    }
}

/// Up to 40 characters of `bytes`, quoted, for an error message.
pub(crate) fn show(bytes: &[u8]) -> String {
    const MAX_CHARS: usize = 40;
    let text = String::from_utf8_lossy(bytes);
    let mut shown: String = text.chars().take(MAX_CHARS).collect();
    if text.chars().nth(MAX_CHARS).is_some() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// Checks that `vocab` names exactly the rows of `table` and that every word
/// can be written in a whitespace-separated format.
pub(crate) fn check_words(vocab: &Vocab, rows: usize, format: &str) -> Result<()> {
    if vocab.len() != rows {
        return Err(Error::ShapeMismatch {
            what: "vocabulary length (table rows)",
            expected: rows,
            got: vocab.len(),
        });
    }
    for (word, row) in vocab.iter() {
        if word.is_empty() || word.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(Error::InvalidConfig {
                field: "vocab",
                reason: format!(
                    "word {word:?} of row {row} is empty or holds whitespace, \
                     which the {format} format cannot store"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("embtable-io-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// What a read gave, comparable: words, value bits and report, or the
    /// error's message.
    fn outcome(
        result: Result<(Pretrained, LoadReport)>,
    ) -> Result<(Vec<String>, Vec<u32>, LoadReport), String> {
        result
            .map(|(p, report)| {
                let bits = p.table.to_vec().iter().map(|x| x.to_bits()).collect();
                (p.vocab.into_words(), bits, report)
            })
            .map_err(|e| format!("{e:?}"))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

        /// Parsing batches of lines in parallel gives what parsing line by
        /// line gives, errors included, on files full of duplicates, blank
        /// lines, bad values and bad words.
        #[test]
        fn parallel_text_parsing_equals_serial(
            lines in proptest::collection::vec(
                (0usize..12, 0usize..12, proptest::array::uniform4(0usize..8)), 0..40),
            count in 1usize..45,
            dim in 1usize..4,
            limit in proptest::option::of(1usize..45),
            replace in proptest::bool::ANY,
            spaced in proptest::bool::ANY,
            clean in proptest::bool::ANY,
        ) {
            // Good words and lines of `dim` numbers, and unless `clean`,
            // bad ones now and then.
            const WORDS: [&[u8]; 12] =
                [b"a", b"b", b"c", "東".as_bytes(), b"a", b"b", b"e", b"f", b"g", b"\xff", b"", b"d d"];
            const VALUES: [&str; 8] = ["1", "-2.5", "x", "nan", "1e3", "0", " ", "7"];
            const GOOD: [&str; 8] = ["1", "-2.5", "0.5", "nan", "1e3", "0", "-0", "7"];
            let mut text = Vec::new();
            for &(w, kind, vals) in &lines {
                let (w, kind) = if clean { (w % 9, 3) } else { (w, kind) };
                text.extend_from_slice(WORDS[w]);
                let (n, table) = match kind {
                    0 => (vals[0] % 5, &VALUES),
                    1 => (dim + 1, &GOOD),
                    2 => (dim, &VALUES),
                    _ => (dim, &GOOD),
                };
                for v in vals.iter().cycle().take(n) {
                    text.push(b' ');
                    text.extend_from_slice(table[*v].as_bytes());
                }
                text.push(b'\n');
            }
            let dir = scratch_dir("parallel");
            let options = ReadOptions {
                limit,
                unicode_errors: if replace { UnicodeErrors::Replace } else { UnicodeErrors::Strict },
                words_with_spaces: spaced,
            };
            let glove = dir.join("g.txt");
            fs::write(&glove, &text).unwrap();
            for two_pass in [true, false] {
                proptest::prop_assert_eq!(
                    outcome(glove::read(&glove, &options, two_pass, true)),
                    outcome(glove::read(&glove, &options, two_pass, false))
                );
            }
            let w2v = dir.join("w.txt");
            let mut with_header = format!("{count} {dim}\n").into_bytes();
            with_header.extend_from_slice(&text);
            fs::write(&w2v, &with_header).unwrap();
            proptest::prop_assert_eq!(
                outcome(word2vec::read(&w2v, Word2VecFormat::Text, &options, true)),
                outcome(word2vec::read(&w2v, Word2VecFormat::Text, &options, false))
            );
        }
    }

    #[test]
    fn show_quotes_and_truncates() {
        assert_eq!(show(b"abc"), "\"abc\"");
        assert_eq!(show(&[b'x'; 100]).chars().count(), 2 + 40 + 1);
        assert_eq!(show(b"\xff"), "\"\u{fffd}\"");
    }
}
