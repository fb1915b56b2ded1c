//! What the text formats (word2vec text, fastText `.vec`, GloVe) share:
//! reading lines, splitting them into tokens, parsing and writing values.

use std::io::{self, BufRead, Read, Write};
use std::path::Path;

use super::pretrained::{Builder, Record};
use super::{format_error, read_error, show};
use crate::Result;

/// Lines longer than this are an error rather than a buffer that grows with
/// a corrupt file. A line of a million values fits.
pub(crate) const MAX_LINE_BYTES: u64 = 64 << 20;

/// The UTF-8 byte order mark some Windows tools put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Lines of a file, one at a time, in one reused buffer.
pub(crate) struct Lines<'p, R> {
    reader: R,
    path: &'p Path,
    buf: Vec<u8>,
    /// Number of the line last returned (1-based; 0 before the first).
    line: usize,
    /// Bytes consumed so far.
    consumed: u64,
}

impl<'p, R: BufRead> Lines<'p, R> {
    pub(crate) fn new(reader: R, path: &'p Path) -> Self {
        Self {
            reader,
            path,
            buf: Vec::new(),
            line: 0,
            consumed: 0,
        }
    }

    /// Number of the line last returned (0 before the first).
    pub(crate) fn line(&self) -> usize {
        self.line
    }

    /// Bytes consumed so far, line ends included.
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The reader, positioned after the last line returned.
    pub(crate) fn into_inner(self) -> R {
        self.reader
    }

    /// The next line's number and bytes without its `\n` or `\r\n`, or
    /// `None` at the end of the file. A byte order mark at the start of the
    /// file is dropped.
    pub(crate) fn next_line(&mut self) -> Result<Option<(usize, &[u8])>> {
        self.buf.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| read_error(self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        self.consumed += n as u64;
        let mut line = &self.buf[..];
        let terminated = match line.strip_suffix(b"\n") {
            Some(rest) => {
                line = rest;
                true
            }
            None if n as u64 > MAX_LINE_BYTES => {
                return Err(format_error(
                    self.line,
                    format!(
                        "line is longer than {MAX_LINE_BYTES} bytes, starting {}",
                        show(line)
                    ),
                ));
            }
            None => false,
        };
        if let Some(rest) = line.strip_suffix(b"\r") {
            line = rest;
        }
        if self.line == 1 {
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        // Every writer (gensim, fastText, GloVe, the C tool, this crate)
        // ends each line with a newline. Without one, the file may have
        // been cut inside its last number, which would then parse as a
        // shorter one: `0.123` cut to `0.12`.
        if !terminated && !is_blank(line) {
            return Err(format_error(
                self.line,
                format!(
                    "the file ends inside this line (no newline after {}): it may have \
                     been cut short; if the file is complete, end it with a newline",
                    show(line.rsplit(|&b| is_separator(b)).next().unwrap_or(line))
                ),
            ));
        }
        Ok(Some((self.line, line)))
    }
}

/// Whether a byte separates tokens.
#[inline]
fn is_separator(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// The tokens of a line: maximal runs of bytes other than space and tab.
pub(crate) fn tokens(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&b| is_separator(b)).filter(|t| !t.is_empty())
}

/// Splits a line into its word and the rest (the values).
///
/// The word is the first token. With `words_with_spaces`, a line of more
/// than `dim + 1` tokens takes all but the last `dim` as its word, with the
/// separators between them as they are (`glove.840B.300d.txt` has words
/// such as `. . .`).
pub(crate) fn split_word(line: &[u8], dim: usize, words_with_spaces: bool) -> (&[u8], &[u8]) {
    let start = line
        .iter()
        .position(|&b| !is_separator(b))
        .unwrap_or(line.len());
    let line = &line[start..];
    let mut word_tokens = 1;
    if words_with_spaces {
        word_tokens = tokens(line).count().saturating_sub(dim).max(1);
    }
    // The end of token number `word_tokens`.
    let mut seen = 0;
    let mut in_token = false;
    for (i, &b) in line.iter().enumerate() {
        if is_separator(b) {
            if in_token {
                seen += 1;
                if seen == word_tokens {
                    return (&line[..i], &line[i..]);
                }
            }
            in_token = false;
        } else {
            in_token = true;
        }
    }
    (line, &[])
}

/// Whether a line holds nothing but separators and carriage returns.
pub(crate) fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|&b| is_separator(b) || b == b'\r')
}

/// Counts the lines that are not blank (as [`is_blank`] and [`Lines`] see
/// them), stopping at `limit`. One pass over the bytes; nothing is kept.
pub(crate) fn count_lines(reader: &mut impl BufRead, limit: usize) -> io::Result<usize> {
    let mut count = 0;
    let mut content = false;
    let mut at_start = true;
    loop {
        let mut buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let len = buf.len();
        if at_start {
            // `Lines` drops a byte order mark at the start of the file. (A
            // mark split across two buffer fills is a 1 MiB-buffer corner
            // case that would only cost a copy.)
            buf = buf.strip_prefix(BOM).unwrap_or(buf);
            at_start = false;
        }
        for &b in buf {
            if b == b'\n' {
                if content {
                    count += 1;
                    if count == limit {
                        return Ok(count);
                    }
                }
                content = false;
            } else if !(is_separator(b) || b == b'\r') {
                content = true;
            }
        }
        reader.consume(len);
    }
    Ok((count + usize::from(content)).min(limit))
}

/// `Err`, the count error [`parse_values`] would give, if `values` is too
/// short to hold `dim` values: each takes a separator and a character at
/// least. Checked before a row is set aside for a record, so that short
/// lines (junk after a header that promises long ones) never cost memory.
pub(crate) fn check_room(values: &[u8], dim: usize, word: &[u8], line: usize) -> Result<()> {
    if values.len() / 2 >= dim {
        Ok(())
    } else {
        Err(wrong_count(dim, tokens(values).count(), word, line))
    }
}

/// Parses exactly `row.len()` values from the tokens of `values` into `row`.
///
/// # Errors
/// `Error::Format` at `line` for a wrong count of values (reported first,
/// as it says more about the file) or a token that is not a number.
pub(crate) fn parse_values(values: &[u8], row: &mut [f32], word: &[u8], line: usize) -> Result<()> {
    let dim = row.len();
    let mut toks = tokens(values);
    let mut bad = None;
    for (k, slot) in row.iter_mut().enumerate() {
        let Some(token) = toks.next() else {
            return Err(wrong_count(dim, k, word, line));
        };
        match parse_f32(token) {
            Some(x) => *slot = x,
            None => {
                bad = Some((k, token));
                break;
            }
        }
    }
    // Only on the error path: count every token.
    let found = if bad.is_some() {
        tokens(values).count()
    } else {
        dim + toks.count()
    };
    if found != dim {
        return Err(wrong_count(dim, found, word, line));
    }
    match bad {
        Some((k, token)) => Err(format_error(
            line,
            format!(
                "value {} of word {} is not a number: {}",
                k + 1,
                show(word),
                show(token)
            ),
        )),
        None => Ok(()),
    }
}

fn wrong_count(dim: usize, found: usize, word: &[u8], line: usize) -> crate::Error {
    let hint = if found > dim {
        "; if words may hold spaces, set ReadOptions::words_with_spaces"
    } else {
        ""
    };
    format_error(
        line,
        format!(
            "expected {} after word {}, found {found}{hint}",
            crate::error::count(dim, "value"),
            show(word)
        ),
    )
}

/// A batch of lines is parsed in parallel once it holds this many bytes...
const BATCH_BYTES: usize = 4 << 20;
/// ... or this many lines.
const BATCH_LINES: usize = 1 << 15;

/// Reads `word v1 … vdim` lines into `builder` until it holds `stop`
/// vectors or the file ends, skipping blank lines. Returns whether the file
/// ended.
///
/// With `parallel`, lines are gathered in batches of a few MiB whose words
/// are resolved in file order and whose values are then parsed in parallel
/// ([`Builder::record_batch`]); the result, errors included, is the same as
/// line by line.
pub(crate) fn read_vector_lines<R: BufRead>(
    lines: &mut Lines<'_, R>,
    builder: &mut Builder,
    stop: usize,
    words_with_spaces: bool,
    parallel: bool,
) -> Result<bool> {
    let dim = builder.dim();
    if !parallel {
        while builder.records() < stop {
            let Some((n, line)) = lines.next_line()? else {
                return Ok(true);
            };
            if is_blank(line) {
                continue;
            }
            let (word, values) = split_word(line, dim, words_with_spaces);
            builder.record(word, n, Some(values), |row| {
                parse_values(values, row, word, n)
            })?;
        }
        return Ok(false);
    }
    let mut bytes = Vec::new();
    let mut spans = Vec::new();
    let mut ended = false;
    while builder.records() < stop && !ended {
        bytes.clear();
        spans.clear();
        let want = (stop - builder.records()).min(BATCH_LINES);
        while spans.len() < want && bytes.len() < BATCH_BYTES {
            let Some((n, line)) = lines.next_line()? else {
                ended = true;
                break;
            };
            if !is_blank(line) {
                spans.push((n, bytes.len(), bytes.len() + line.len()));
                bytes.extend_from_slice(line);
            }
        }
        let records: Vec<Record<'_>> = spans
            .iter()
            .map(|&(line, start, end)| {
                let (word, values) = split_word(&bytes[start..end], dim, words_with_spaces);
                Record { line, word, values }
            })
            .collect();
        builder.record_batch(&records, parse_values)?;
    }
    Ok(ended)
}

/// A decimal number as the nearest `f32` (correctly rounded).
#[inline]
pub(crate) fn parse_f32(token: &[u8]) -> Option<f32> {
    std::str::from_utf8(token).ok()?.parse().ok()
}

/// Writes `x` as the shortest decimal that parses back to `x`: plain
/// notation for ordinary magnitudes (`0.125`, `-3`), exponent notation below
/// `1e-4` and from `1e16` on (`2.5e-9`), as Python's `repr` does.
pub(crate) fn write_f32(out: &mut impl Write, x: f32) -> io::Result<()> {
    let a = x.abs();
    if a.is_finite() && a != 0.0 && !(1e-4..1e16).contains(&a) {
        write!(out, "{x:e}")
    } else {
        write!(out, "{x}")
    }
}

/// Writes `word v1 … vdim\n`.
pub(crate) fn write_line(out: &mut impl Write, word: &str, row: &[f32]) -> io::Result<()> {
    out.write_all(word.as_bytes())?;
    for &x in row {
        out.write_all(b" ")?;
        write_f32(out, x)?;
    }
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(x: f32) -> f32 {
        let mut s = Vec::new();
        write_f32(&mut s, x).unwrap();
        parse_f32(&s).unwrap_or_else(|| panic!("{:?} does not parse", String::from_utf8(s)))
    }

    #[test]
    fn written_floats_parse_back_bitwise() {
        let special = [
            0.0,
            -0.0,
            1.0,
            -1.5,
            0.1,
            1e-4,
            9.999999e-5,
            1e16,
            9.999999e15,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 3.0, // subnormal
            f32::from_bits(1),       // smallest subnormal
            f32::MAX,
            f32::MIN,
            f32::EPSILON,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for x in special {
            assert_eq!(roundtrip(x).to_bits(), x.to_bits(), "{x:e}");
        }
        assert!(roundtrip(f32::NAN).is_nan());
        // A spread of bit patterns over every exponent.
        for i in 0..200_000u32 {
            let bits = i.wrapping_mul(0x9E37_79B9);
            let x = f32::from_bits(bits);
            if !x.is_nan() {
                assert_eq!(roundtrip(x).to_bits(), bits, "{x:e}");
            }
        }
    }

    #[test]
    fn formatting_is_short() {
        let s = |x: f32| {
            let mut v = Vec::new();
            write_f32(&mut v, x).unwrap();
            String::from_utf8(v).unwrap()
        };
        assert_eq!(s(0.1), "0.1");
        assert_eq!(s(-3.0), "-3");
        assert_eq!(s(-0.0), "-0");
        assert_eq!(s(2.5e-9), "2.5e-9");
        assert_eq!(s(1e20), "1e20");
        assert_eq!(s(f32::MAX), "3.4028235e38");
    }

    #[test]
    fn words_with_spaces_take_the_leading_tokens() {
        let split = |line: &'static [u8], dim, spaced| {
            let (w, rest) = split_word(line, dim, spaced);
            (w, tokens(rest).count())
        };
        assert_eq!(split(b"a 1 2", 2, false), (&b"a"[..], 2));
        assert_eq!(split(b" a\t1 2 ", 2, true), (&b"a"[..], 2));
        assert_eq!(split(b". . . 1 2", 2, true), (&b". . ."[..], 2));
        assert_eq!(split(b". . . 1 2", 2, false), (&b"."[..], 4));
        assert_eq!(split(b"a 1", 2, true), (&b"a"[..], 1));
        assert_eq!(split(b"a", 2, true), (&b"a"[..], 0));
    }

    #[test]
    fn tokens_skip_runs_of_separators() {
        let t: Vec<&[u8]> = tokens(b"  a\t b  c ").collect();
        assert_eq!(t, [b"a" as &[u8], b"b", b"c"]);
        assert!(is_blank(b" \t \r"));
        assert!(!is_blank(b" x"));
    }

    #[test]
    fn lines_strip_ends_and_bom() {
        let data = b"\xEF\xBB\xBFa 1\r\nb 2\n\nc 3\n \t";
        let mut lines = Lines::new(&data[..], Path::new("mem"));
        let mut got = Vec::new();
        while let Some((n, l)) = lines.next_line().unwrap() {
            got.push((n, l.to_vec()));
        }
        assert_eq!(
            got,
            [
                (1, b"a 1".to_vec()),
                (2, b"b 2".to_vec()),
                (3, b"".to_vec()),
                (4, b"c 3".to_vec()),
                (5, b" \t".to_vec())
            ]
        );
        assert_eq!(lines.consumed(), data.len() as u64);
        // A last line without its newline may have been cut short.
        let mut lines = Lines::new(&b"a 1.25\nb 0.12"[..], Path::new("mem"));
        lines.next_line().unwrap();
        let err = lines.next_line().unwrap_err();
        assert!(matches!(err, crate::Error::Format { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("\"0.12\""), "{err}");
        assert_eq!(count_lines(&mut &data[..], usize::MAX).unwrap(), 3);
        assert_eq!(count_lines(&mut &data[..], 2).unwrap(), 2);
        assert_eq!(count_lines(&mut &b"\xEF\xBB\xBF\n \r\n"[..], 9).unwrap(), 0);
    }
}
