//! GloVe text files: `word v1 … vdim` per line, no header. The dimension is
//! that of the first line; every line must agree.

use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::Path;

use super::pretrained::Builder;
use super::text::{
    Lines, count_lines, is_blank, parse_values, read_vector_lines, split_word, tokens, write_line,
};
use super::{
    LoadReport, Pretrained, ReadOptions, Vocab, check_words, format_error, open, read_error, show,
    vectors_to_read, write_atomic,
};
use crate::{EmbeddingTable, Result};

/// Reads a GloVe file: every vector, strict UTF-8.
///
/// Same as [`read_glove_with`] with default [`ReadOptions`], without the
/// report.
///
/// # Errors
/// As [`read_glove_with`].
///
/// # Examples
/// ```
/// use embtable::io;
/// let path = std::env::temp_dir().join("embtable-doc-read-glove.txt");
/// std::fs::write(&path, "the 0.418 0.24968 -0.41242\n, 0.013441 0.23682 -0.16899\n")?;
/// let pretrained = io::read_glove(&path)?;
/// assert_eq!(pretrained.vocab.words(), ["the", ","]);
/// assert_eq!(pretrained.table.dim(), 3);
/// assert_eq!(pretrained.vector(","), Some(&[0.013441, 0.23682, -0.16899][..]));
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_glove(path: impl AsRef<Path>) -> Result<Pretrained> {
    read_glove_with(path, &ReadOptions::default()).map(|(p, _)| p)
}

/// Reads a GloVe file with options, and reports what was skipped.
///
/// A GloVe file has no header, so a regular file is read twice, as gensim's
/// `no_header=True` does: a first pass counts the (non-blank) lines without
/// keeping anything, then the table is allocated once and the second pass
/// parses straight into its rows. A stream that cannot be read twice (a
/// named pipe) is gathered in chunks of rows and copied into the table at
/// the end, so it briefly needs twice the memory. Duplicates and `limit`
/// are handled as in [`read_word2vec_with`](super::read_word2vec_with).
///
/// GloVe's `glove.840B.300d.txt` has a few words holding spaces (`. . .`);
/// by default their lines are errors (too many values), as in gensim. Set
/// [`ReadOptions::words_with_spaces`] to read them.
///
/// # Errors
/// [`Error::Format`](crate::Error::Format) naming the line for: a file with
/// no vectors; a first line that is a word2vec header (read that file with
/// [`read_word2vec`](super::read_word2vec)); a first line with a word and no
/// values; a line whose number of values differs from the first line's; a
/// value that is not a number; a word that is not valid UTF-8 with
/// [`UnicodeErrors::Strict`](super::UnicodeErrors::Strict).
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for `limit:
/// Some(0)`; [`Error::Io`](crate::Error::Io) if the file cannot be read;
/// [`Error::Alloc`](crate::Error::Alloc) if the table does not fit in
/// memory.
///
/// # Examples
/// ```
/// use embtable::io::{self, ReadOptions};
/// let path = std::env::temp_dir().join("embtable-doc-read-glove-with.txt");
/// std::fs::write(&path, "a 1 2\nb 3 4\na 5 6\nc 7 8 9\n")?;
///
/// // The first three lines: "a" again on line 3 is skipped.
/// let options = ReadOptions { limit: Some(3), ..Default::default() };
/// let (pretrained, report) = io::read_glove_with(&path, &options)?;
/// assert_eq!(pretrained.table.to_vec(), [1., 2., 3., 4.]);
/// assert_eq!((report.duplicates[0].line, report.duplicates[0].first_row), (3, 0));
///
/// // Line 4 has three values where line 1 has two.
/// let err = io::read_glove(&path).unwrap_err();
/// assert!(matches!(err, embtable::Error::Format { line: 4, .. }), "{err}");
///
/// // ... unless words may hold spaces: then its word is "c 7".
/// let options = ReadOptions { words_with_spaces: true, ..Default::default() };
/// let (pretrained, _) = io::read_glove_with(&path, &options)?;
/// assert_eq!(pretrained.vector("c 7"), Some(&[8., 9.][..]));
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_glove_with(
    path: impl AsRef<Path>,
    options: &ReadOptions,
) -> Result<(Pretrained, LoadReport)> {
    read(path.as_ref(), options, true, true)
}

/// Reads a GloVe file; `two_pass` allows counting a regular file first,
/// `parallel` parsing batches of lines in parallel.
pub(crate) fn read(
    path: &Path,
    options: &ReadOptions,
    two_pass: bool,
    parallel: bool,
) -> Result<(Pretrained, LoadReport)> {
    let limit = vectors_to_read(options, usize::MAX)?;
    let (mut file, file_len) = open(path)?;
    let count = match file_len {
        Some(_) if two_pass => Some(count_and_rewind(&mut file, path, limit)?),
        _ => None,
    };
    let no_vectors = || format_error(1, "the file holds no vectors");
    if count == Some(0) {
        return Err(no_vectors());
    }
    let mut lines = Lines::new(BufReader::with_capacity(1 << 20, file), path);
    // The first non-blank line gives the dimension.
    let mut builder = loop {
        // Bytes read before this line.
        let before = lines.consumed();
        let Some((n, line)) = lines.next_line()? else {
            return Err(no_vectors());
        };
        if is_blank(line) {
            continue;
        }
        let dim = first_line_dim(line, n)?;
        let mut builder = match (count, file_len) {
            (Some(count), Some(len)) => {
                // Lines after this one hold vectors of `dim` values, each a
                // word then a separator and a character per value at least:
                // more lines than that are junk, and cost no memory.
                let left = len.saturating_sub(before);
                let fit = left / (dim as u64).saturating_mul(2).saturating_add(1);
                let cap = count.min(usize::try_from(fit).unwrap_or(usize::MAX).max(1));
                let budget = left.saturating_mul(2);
                Builder::with_table(cap, dim, None, options.unicode_errors, budget)?
            }
            _ => Builder::growing(dim, None, options.unicode_errors),
        };
        let (word, values) = split_word(line, dim, options.words_with_spaces);
        builder.record(word, n, Some(values), |row| {
            parse_values(values, row, word, n)
        })?;
        break builder;
    };
    let stop = count.unwrap_or(limit);
    read_vector_lines(
        &mut lines,
        &mut builder,
        stop,
        options.words_with_spaces,
        parallel,
    )?;
    builder.finish(1)
}

/// Counts the vectors of a regular file (up to `limit`) and rewinds it.
fn count_and_rewind(file: &mut File, path: &Path, limit: usize) -> Result<usize> {
    let count = count_lines(&mut BufReader::with_capacity(1 << 20, &*file), limit)
        .map_err(|e| read_error(path, e))?;
    file.rewind().map_err(|e| read_error(path, e))?;
    Ok(count)
}

/// The dimension of a GloVe file, from its first non-blank line.
fn first_line_dim(line: &[u8], n: usize) -> Result<usize> {
    let toks: Vec<&[u8]> = tokens(line).take(3).collect();
    let is_int = |t: &[u8]| !t.is_empty() && t.iter().all(u8::is_ascii_digit);
    match toks[..] {
        [count, dim] if is_int(count) && is_int(dim) => Err(format_error(
            n,
            format!(
                "{} looks like a word2vec header `count dim`, which GloVe files do not \
                 have: read this file with read_word2vec or read_fasttext_vec",
                show(line)
            ),
        )),
        [word] => Err(format_error(
            n,
            format!("word {} has no values", show(word)),
        )),
        _ => Ok(tokens(line).count() - 1),
    }
}

/// Writes `vocab` and `table` as a GloVe file: per row the word and its
/// values (the shortest decimals that parse back to the same `f32`), no
/// header.
///
/// The file is written atomically (a temporary file in the same directory,
/// synced, then renamed over `path`).
///
/// # Errors
/// Before anything is written: [`Error::ShapeMismatch`](crate::Error::ShapeMismatch)
/// if `vocab.len() != table.rows()`; [`Error::InvalidConfig`](crate::Error::InvalidConfig)
/// if a word is empty or holds whitespace. [`Error::Io`](crate::Error::Io)
/// if writing fails; `path` is then unchanged.
///
/// # Examples
/// ```
/// use embtable::io;
/// use embtable::{EmbeddingTable, Vocab};
/// let vocab = Vocab::from_words(["a", "b"])?;
/// let table = EmbeddingTable::from_rows(2, 2, &[0.1, 2.0, -3.5, 1e-7])?;
/// let path = std::env::temp_dir().join("embtable-doc-write-glove.txt");
/// io::write_glove(&path, &vocab, &table)?;
/// assert_eq!(std::fs::read_to_string(&path)?, "a 0.1 2\nb -3.5 1e-7\n");
/// assert_eq!(io::read_glove(&path)?.table, table);
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_glove(path: impl AsRef<Path>, vocab: &Vocab, table: &EmbeddingTable) -> Result<()> {
    check_words(vocab, table.rows(), "GloVe")?;
    write_atomic(path.as_ref(), |out| {
        for (word, r) in vocab.iter() {
            write_line(out, word, table.row(r))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_and_two_pass_agree() {
        let path =
            std::env::temp_dir().join(format!("embtable-glove-passes-{}.txt", std::process::id()));
        let mut text = String::new();
        for i in 0..40_000 {
            text.push_str(&format!("w{} {} {}\n", i % 39_000, i, -(i as f32) / 8.0));
        }
        std::fs::write(&path, text).unwrap();
        for limit in [None, Some(1), Some(39_500)] {
            let options = ReadOptions {
                limit,
                ..Default::default()
            };
            let two = read(&path, &options, true, true).unwrap();
            for (two_pass, parallel) in [(true, false), (false, true), (false, false)] {
                assert_eq!(read(&path, &options, two_pass, parallel).unwrap(), two);
            }
            let rows = limit.unwrap_or(40_000).min(39_000);
            assert_eq!(two.0.table.rows(), rows);
            assert_eq!(
                two.0.table.row(rows - 1),
                [(rows - 1) as f32, -((rows - 1) as f32) / 8.0]
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
}
