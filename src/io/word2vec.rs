//! word2vec text and binary files, and fastText `.vec` files (word2vec text).
//!
//! Both formats start with a header line `count dim`. Text: one line per
//! vector, `word v1 … vdim`. Binary (the original C tool's `-binary 1`):
//! per vector the word, one space, then `dim` little-endian `f32`; the C
//! tool writes a newline after each vector, gensim does not. The reader
//! accepts both (newlines before a word are skipped, as gensim does); the
//! writer writes as gensim does.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use super::pretrained::Builder;
use super::text::{Lines, read_vector_lines, tokens, write_line};
use super::{
    LoadReport, Pretrained, ReadOptions, Vocab, check_words, format_error, open, read_error, show,
    vectors_to_read, write_atomic,
};
use crate::{EmbeddingTable, Result};

/// Longest word of a binary file: a record without a space this far is an
/// error rather than a buffer that grows with a corrupt file.
const MAX_WORD_BYTES: u64 = 1 << 20;

/// Which word2vec file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Word2VecFormat {
    /// `count dim` header, then `word v1 … vdim` per line (gensim's
    /// `binary=False`; also fastText's `.vec`).
    Text,
    /// `count dim` header line, then per vector `word`, a space and `dim`
    /// little-endian `f32` (gensim's `binary=True`, the C tool's `-binary 1`).
    Binary,
}

/// Reads a word2vec file (text or binary): every vector, strict UTF-8.
///
/// Same as [`read_word2vec_with`] with default [`ReadOptions`], without the
/// report. fastText's `.vec` files are word2vec text ([`read_fasttext_vec`]).
///
/// # Errors
/// [`Error::Format`](crate::Error::Format) naming the line for a malformed
/// file (see [`read_word2vec_with`]); [`Error::Io`](crate::Error::Io) if the
/// file cannot be read; [`Error::Alloc`](crate::Error::Alloc) if the table
/// does not fit in memory.
///
/// # Examples
/// ```
/// use embtable::io::{self, Word2VecFormat};
/// let path = std::env::temp_dir().join("embtable-doc-read-w2v.txt");
/// std::fs::write(&path, "2 3\nking 0.5 -1 2e-3\nqueen 0.25 0 1\n")?;
///
/// let pretrained = io::read_word2vec(&path, Word2VecFormat::Text)?;
/// assert_eq!(pretrained.vocab.words(), ["king", "queen"]);
/// assert_eq!(pretrained.vector("king"), Some(&[0.5, -1.0, 2e-3][..]));
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_word2vec(path: impl AsRef<Path>, format: Word2VecFormat) -> Result<Pretrained> {
    read_word2vec_with(path, format, &ReadOptions::default()).map(|(p, _)| p)
}

/// Reads a word2vec file (text or binary) with options, and reports what
/// was skipped.
///
/// The file is streamed into a table of `min(count, limit)` rows allocated
/// once (capped by what the file's size can hold). A word met again is
/// skipped, keeping the first occurrence, and listed in the report; the
/// table then has fewer rows than vectors read. Data after the declared
/// vectors is ignored, as gensim and the C tool do.
///
/// # Errors
/// [`Error::Format`](crate::Error::Format) (line numbers as in the
/// [module docs](super)) for: a header that is not two positive integers
/// `count dim`; a vector line with a number of values other than `dim` or a
/// value that is not a number (text); a record cut short by the end of the
/// file, or a record without a space within 1 MiB (binary); fewer vectors
/// than declared (gensim's "unexpected end of input"); an empty word; a word
/// that is not valid UTF-8 with [`UnicodeErrors::Strict`](super::UnicodeErrors::Strict).
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for `limit:
/// Some(0)`; [`Error::Io`](crate::Error::Io) if the file cannot be read;
/// [`Error::Alloc`](crate::Error::Alloc) if the table does not fit in
/// memory.
///
/// # Examples
/// ```
/// use embtable::io::{self, ReadOptions, UnicodeErrors, Word2VecFormat};
/// let path = std::env::temp_dir().join("embtable-doc-read-w2v-with.txt");
/// // "caf\xE9" is Latin-1, not UTF-8; "the" appears twice.
/// let file = b"4 2\nthe 1 2\ncaf\xE9 3 4\nthe 5 6\nend 7 8\n".to_vec();
/// std::fs::write(&path, file)?;
///
/// let options = ReadOptions {
///     limit: Some(3),
///     unicode_errors: UnicodeErrors::Replace,
///     ..Default::default()
/// };
/// let (pretrained, report) = io::read_word2vec_with(&path, Word2VecFormat::Text, &options)?;
/// assert_eq!(pretrained.vocab.words(), ["the", "caf\u{FFFD}"]); // "end" is past the limit
/// assert_eq!(pretrained.vector("the"), Some(&[1.0, 2.0][..]));  // the first "the" wins
/// assert_eq!((report.records, report.declared), (3, Some(4)));
/// assert_eq!(report.duplicates[0].line, 4);
/// assert_eq!(report.replaced_words, [3]);
///
/// // Strict UTF-8 (the default) names the line.
/// let err = io::read_word2vec(&path, Word2VecFormat::Text).unwrap_err();
/// assert!(matches!(err, embtable::Error::Format { line: 3, .. }), "{err}");
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_word2vec_with(
    path: impl AsRef<Path>,
    format: Word2VecFormat,
    options: &ReadOptions,
) -> Result<(Pretrained, LoadReport)> {
    read(path.as_ref(), format, options, true)
}

/// Reads a word2vec file; `parallel` parses batches of text lines in parallel.
pub(crate) fn read(
    path: &Path,
    format: Word2VecFormat,
    options: &ReadOptions,
    parallel: bool,
) -> Result<(Pretrained, LoadReport)> {
    let (file, file_len) = open(path)?;
    let mut lines = Lines::new(BufReader::with_capacity(1 << 20, file), path);
    let Some((_, header)) = lines.next_line()? else {
        return Err(format_error(
            1,
            "the file is empty: expected a header `count dim`",
        ));
    };
    let (count, dim) = parse_header(header)?;
    let needed = vectors_to_read(options, count)?;
    // A vector takes at least this many bytes: a one-byte word, then a
    // separator and a digit per value (text) or a space and 4 bytes per
    // value (binary).
    let min_record = match format {
        Word2VecFormat::Text => (dim as u64).saturating_mul(2).saturating_add(1),
        Word2VecFormat::Binary => (dim as u64).saturating_mul(4).saturating_add(2),
    };
    // Trust the size only if it is consistent with what was read (files in
    // /proc report 0). A table starts with at most twice the bytes left and
    // grows as vectors are read, up to what those bytes can hold; from a
    // stream of unknown size, rows are gathered as they are read.
    let remaining = file_len.and_then(|len| len.checked_sub(lines.consumed()));
    let mut builder = match remaining {
        Some(remaining) => {
            let fit = remaining / min_record;
            if fit == 0 {
                return Err(format_error(
                    2,
                    format!(
                        "the file ends before its first vector: a vector of {} needs \
                         at least {}, and {} left",
                        crate::error::count(dim, "value"),
                        crate::error::count(min_record, "byte"),
                        crate::error::count(remaining, "byte")
                    ),
                ));
            }
            let cap = needed.min(usize::try_from(fit).unwrap_or(usize::MAX));
            let budget = remaining.saturating_mul(2);
            Builder::with_table(cap, dim, Some(count), options.unicode_errors, budget)?
        }
        None => Builder::growing(dim, Some(count), options.unicode_errors),
    };
    match format {
        Word2VecFormat::Text => read_text(
            &mut lines,
            &mut builder,
            (needed, count),
            options.words_with_spaces,
            parallel,
        )?,
        Word2VecFormat::Binary => {
            read_binary(lines.into_inner(), path, &mut builder, needed, count, dim)?
        }
    }
    builder.finish(2)
}

/// Reads a fastText `.vec` file: word2vec text (a `count dim` header, then
/// `word v1 … vdim ` lines, each with a trailing space).
///
/// Same as [`read_word2vec`] with [`Word2VecFormat::Text`]. fastText's
/// binary `.bin` models (with subword n-grams) are a different format and
/// are not read.
///
/// # Errors
/// As [`read_word2vec_with`].
///
/// # Examples
/// ```
/// use embtable::io;
/// let path = std::env::temp_dir().join("embtable-doc-read-vec.vec");
/// std::fs::write(&path, "2 2\n</s> 0.1 -0.2 \n, 1.5e-05 3 \n")?;
/// let pretrained = io::read_fasttext_vec(&path)?;
/// assert_eq!(pretrained.vocab.words(), ["</s>", ","]);
/// assert_eq!(pretrained.table.row(1), [1.5e-5, 3.0]);
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_fasttext_vec(path: impl AsRef<Path>) -> Result<Pretrained> {
    read_word2vec(path, Word2VecFormat::Text)
}

/// Reads a fastText `.vec` file with options: [`read_word2vec_with`] with
/// [`Word2VecFormat::Text`].
///
/// # Errors
/// As [`read_word2vec_with`].
///
/// # Examples
/// ```
/// use embtable::io::{self, ReadOptions};
/// let path = std::env::temp_dir().join("embtable-doc-read-vec-with.vec");
/// std::fs::write(&path, "3 1\na 1 \nb 2 \nc 3 \n")?;
/// let options = ReadOptions { limit: Some(2), ..Default::default() };
/// let (pretrained, _) = io::read_fasttext_vec_with(&path, &options)?;
/// assert_eq!(pretrained.vocab.words(), ["a", "b"]);
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_fasttext_vec_with(
    path: impl AsRef<Path>,
    options: &ReadOptions,
) -> Result<(Pretrained, LoadReport)> {
    read_word2vec_with(path, Word2VecFormat::Text, options)
}

/// Writes `vocab` and `table` as a word2vec file, as gensim's
/// `save_word2vec_format` does: a `rows dim` header, then per row the word
/// and its values (text: the shortest decimals that parse back to the same
/// `f32`; binary: little-endian `f32`, no newline after the vector).
///
/// The file is written atomically (a temporary file in the same directory,
/// synced, then renamed over `path`).
///
/// # Errors
/// Before anything is written: [`Error::ShapeMismatch`](crate::Error::ShapeMismatch)
/// if `vocab.len() != table.rows()`; [`Error::InvalidConfig`](crate::Error::InvalidConfig)
/// if a word is empty or holds whitespace (it could not be read back).
/// [`Error::Io`](crate::Error::Io) if writing fails; `path` is then unchanged.
///
/// # Examples
/// ```
/// use embtable::io::{self, Word2VecFormat};
/// use embtable::{EmbeddingTable, Init, Vocab};
///
/// let vocab = Vocab::from_words(["naïve", "東京", "x"])?;
/// let table = EmbeddingTable::new(3, 5, Init::Normal { mean: 0.0, std: 1.0 }, 1)?;
/// let path = std::env::temp_dir().join("embtable-doc-write-w2v.bin");
/// io::write_word2vec(&path, &vocab, &table, Word2VecFormat::Binary)?;
///
/// let back = io::read_word2vec(&path, Word2VecFormat::Binary)?;
/// assert_eq!((back.vocab, back.table), (vocab, table)); // bit for bit
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), embtable::Error>(())
/// ```
pub fn write_word2vec(
    path: impl AsRef<Path>,
    vocab: &Vocab,
    table: &EmbeddingTable,
    format: Word2VecFormat,
) -> Result<()> {
    check_words(vocab, table.rows(), "word2vec")?;
    write_atomic(path.as_ref(), |out| {
        writeln!(out, "{} {}", table.rows(), table.dim())?;
        let mut record = Vec::new();
        for (word, r) in vocab.iter() {
            let row = table.row(r);
            match format {
                Word2VecFormat::Text => write_line(out, word, row)?,
                Word2VecFormat::Binary => {
                    record.clear();
                    record.extend_from_slice(word.as_bytes());
                    record.push(b' ');
                    record.extend(row.iter().flat_map(|x| x.to_le_bytes()));
                    out.write_all(&record)?;
                }
            }
        }
        Ok(())
    })
}

/// Parses the header line `count dim` (both positive integers).
fn parse_header(line: &[u8]) -> Result<(usize, usize)> {
    let toks: Vec<&[u8]> = tokens(line).take(3).collect();
    let number = |t: &[u8]| std::str::from_utf8(t).ok()?.parse::<usize>().ok();
    let (count, dim) = match toks[..] {
        [c, d] => (number(c), number(d)),
        _ => (None, None),
    };
    let (Some(count), Some(dim)) = (count, dim) else {
        let hint = if toks.len() > 2 {
            "; a file without a header is GloVe: read it with read_glove"
        } else {
            ""
        };
        return Err(format_error(
            1,
            format!(
                "expected a header `count dim` of two integers, found {}{hint}",
                show(line)
            ),
        ));
    };
    if count == 0 {
        return Err(format_error(1, "the header declares 0 vectors"));
    }
    if dim == 0 {
        return Err(format_error(1, "the header declares vectors of 0 values"));
    }
    Ok((count, dim))
}

fn end_of_file(line: usize, read: usize, declared: usize) -> crate::Error {
    format_error(
        line,
        format!(
            "the file ends after {}, but its header declares {declared}",
            crate::error::count(read, "vector")
        ),
    )
}

/// Reads `needed` vectors of word2vec text.
fn read_text<R: BufRead>(
    lines: &mut Lines<'_, R>,
    builder: &mut Builder,
    (needed, declared): (usize, usize),
    words_with_spaces: bool,
    parallel: bool,
) -> Result<()> {
    let ended = read_vector_lines(lines, builder, needed, words_with_spaces, parallel)?;
    if ended && builder.records() < needed {
        return Err(end_of_file(lines.line() + 1, builder.records(), declared));
    }
    Ok(())
}

/// Reads `needed` binary vectors of `dim` floats.
fn read_binary<R: BufRead>(
    mut reader: R,
    path: &Path,
    builder: &mut Builder,
    needed: usize,
    declared: usize,
    dim: usize,
) -> Result<()> {
    let bytes = dim
        .checked_mul(4)
        .ok_or_else(|| format_error(1, format!("dimension {dim} is too large")))?;
    let mut word = Vec::new();
    let mut vector = Vec::new();
    while builder.records() < needed {
        let line = builder.records() + 2;
        skip_newlines(&mut reader).map_err(|e| read_error(path, e))?;
        word.clear();
        let n = (&mut reader)
            .take(MAX_WORD_BYTES + 1)
            .read_until(b' ', &mut word)
            .map_err(|e| read_error(path, e))?;
        if n == 0 {
            return Err(end_of_file(line, builder.records(), declared));
        }
        if word.last() != Some(&b' ') {
            let reason = if n as u64 > MAX_WORD_BYTES {
                format!(
                    "no space in the first {MAX_WORD_BYTES} bytes of the record: \
                     is this a binary word2vec file?"
                )
            } else {
                format!("the file ends inside the word {} of a record", show(&word))
            };
            return Err(format_error(line, reason));
        }
        word.pop();
        // The vector's bytes are read before a row is set aside for it, so
        // a header promising long vectors costs only what the file holds.
        // (`read_to_end` grows the buffer as bytes arrive.)
        vector.clear();
        let got = (&mut reader)
            .take(bytes as u64)
            .read_to_end(&mut vector)
            .map_err(|e| read_error(path, e))?;
        if got < bytes {
            return Err(format_error(
                line,
                format!(
                    "the vector of word {} is cut short: {got} of {bytes} bytes",
                    show(&word)
                ),
            ));
        }
        builder.record(&word, line, None, |row| {
            for (x, b) in row.iter_mut().zip(vector.chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Skips the newlines the C tool writes after each vector.
fn skip_newlines(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        let n = buf.iter().take_while(|&&b| b == b'\n').count();
        let more = n == buf.len() && n > 0;
        reader.consume(n);
        if !more {
            return Ok(());
        }
    }
}
