//! NumPy `.npy` files holding a table as a `(rows, dim)` `float32` array,
//! what `np.save(path, layer.get_weights()[0])` and
//! `np.save(path, emb.weight.detach().numpy())` write.
//!
//! Layout (NumPy's `format` module): the magic `\x93NUMPY`, a version byte
//! pair, the header length (`u16` little-endian for version 1.0, `u32` for
//! 2.0 and 3.0), a Python dict literal `{'descr': '<f4', 'fortran_order':
//! False, 'shape': (rows, dim), }` padded with spaces and ended by `\n` so
//! the data starts at a multiple of 64 bytes, then the data.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use super::{format_error, open, read_error, write_atomic};
use crate::{EmbeddingTable, Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The data starts at a multiple of this many bytes (NumPy's `ARRAY_ALIGN`).
const ALIGN: usize = 64;

/// Longest header accepted. NumPy writes about 128 bytes for a 2-D array and
/// itself refuses headers over 10 000 bytes by default.
const MAX_HEADER_BYTES: usize = 1 << 16;

/// Floats converted per read while loading.
const CHUNK_FLOATS: usize = 1 << 16;

/// Writes `table` as a `.npy` file: a `(rows, dim)` array of little-endian
/// `float32` in C order, format version 1.0, as `np.save` writes it.
/// `np.load(path)` gives the table back, and so do
/// `layer.set_weights([np.load(path)])` in Keras and
/// `torch.from_numpy(np.load(path))` in PyTorch.
///
/// The file is written atomically (a temporary file in the same directory,
/// synced, then renamed over `path`).
///
/// # Errors
/// [`Error::Io`] if writing fails; `path` is then unchanged.
///
/// # Examples
/// ```
/// use embtable::io;
/// use embtable::{EmbeddingTable, Init};
/// let table = EmbeddingTable::new(100, 17, Init::default(), 3)?;
/// let path = std::env::temp_dir().join("embtable-doc-save.npy");
/// io::save_npy(&path, &table)?;
/// let bytes = std::fs::read(&path)?;
/// assert_eq!(&bytes[..6], b"\x93NUMPY");
/// assert_eq!(bytes.len(), 128 + 100 * 17 * 4); // header, then the data
/// assert_eq!(io::load_npy(&path)?, table);
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn save_npy(path: impl AsRef<Path>, table: &EmbeddingTable) -> Result<()> {
    let header = header_bytes(table.rows(), table.dim());
    write_atomic(path.as_ref(), |out| {
        out.write_all(&header)?;
        let mut bytes = Vec::with_capacity(table.dim() * 4);
        for r in 0..table.rows() {
            bytes.clear();
            bytes.extend(table.row(r).iter().flat_map(|x| x.to_le_bytes()));
            out.write_all(&bytes)?;
        }
        Ok(())
    })
}

/// Magic, version, header length and the padded header of a `(rows, dim)`
/// `<f4` C-order array.
fn header_bytes(rows: usize, dim: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    // Version 1.0 has a u16 length; a 2-D shape never needs more, but stay
    // correct: version 2.0 has a u32.
    let (version, len_bytes) = if dict.len() + 1 + 10 <= usize::from(u16::MAX) {
        (1u8, 2)
    } else {
        (2u8, 4)
    };
    let prefix = MAGIC.len() + 2 + len_bytes;
    let header_len = (prefix + dict.len() + 1).next_multiple_of(ALIGN) - prefix;
    let mut out = Vec::with_capacity(prefix + header_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(prefix + header_len - 1, b' ');
    out.push(b'\n');
    out
}

/// Reads a `.npy` file holding a 2-D `float32` array as a table of
/// `(rows, dim)`: what `np.save` writes for Keras' `get_weights()[0]` or a
/// PyTorch weight.
///
/// Accepted: format versions 1.0, 2.0 and 3.0; dtype `<f4`, and `>f4`
/// (byte-swapped) and `<f8` / `>f8` (rounded to the nearest `f32`, as
/// Keras' `set_weights` does: `np.zeros((n, d))`, the usual start of an
/// embedding matrix, is `float64`); C order, and Fortran order (`fortran_order: True`, as
/// `np.save(np.asfortranarray(w))` writes), which is read column by column
/// into the same `(rows, dim)` table, i.e. the logical array, not its
/// transpose. The data is streamed into the table; its length is checked
/// against the shape before the table is allocated.
///
/// # Errors
/// [`Error::Format`] (the header is line 1, row `k` line `k + 2`) for: a
/// wrong magic string; an unsupported version; a header that is not the
/// dict NumPy writes (exactly the keys `descr`, `fortran_order`, `shape`);
/// a dtype other than `float32` or `float64` (convert with
/// `w.astype('<f4')`); a shape
/// that is not 2-D or has a zero side; data shorter or longer than the
/// shape says. [`Error::Io`] if the file cannot be read; [`Error::Alloc`]
/// if the table does not fit in memory.
///
/// # Examples
/// ```
/// use embtable::io;
/// use embtable::EmbeddingTable;
/// let table = EmbeddingTable::from_rows(2, 3, &[1., 2., 3., 4., 5., 6.])?;
/// let path = std::env::temp_dir().join("embtable-doc-load.npy");
/// io::save_npy(&path, &table)?;
/// assert_eq!(io::load_npy(&path)?.row(1), [4., 5., 6.]);
///
/// std::fs::write(&path, b"not numpy")?;
/// assert!(matches!(io::load_npy(&path), Err(embtable::Error::Format { line: 1, .. })));
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_npy(path: impl AsRef<Path>) -> Result<EmbeddingTable> {
    let path = path.as_ref();
    let (file, file_len) = open(path)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let (header, data_start) = read_header(&mut reader, path)?;
    let Header {
        dtype,
        fortran_order,
        rows,
        dim,
    } = header;
    let size = dtype.size();
    let bytes = rows
        .checked_mul(dim)
        .and_then(|n| n.checked_mul(size))
        .ok_or_else(|| format_error(1, format!("shape ({rows}, {dim}) is too large")))?
        as u64;
    let Some(len) = file_len else {
        return load_stream(reader, path, &header, bytes);
    };
    {
        let have = len.saturating_sub(data_start);
        if have < bytes {
            let line = if fortran_order {
                2
            } else {
                2 + (have / (dim * size) as u64) as usize
            };
            return Err(format_error(
                line,
                format!("the data is cut short: {have} of {bytes} bytes for shape ({rows}, {dim})"),
            ));
        }
        if have > bytes {
            return Err(trailing(rows, have - bytes));
        }
    }
    let mut table = EmbeddingTable::zeros(rows, dim)?;
    let stride = table.stride();
    let data = table.as_padded_mut();
    if fortran_order {
        // Column j holds element (i, j) for every i, in row order.
        let mut buf = vec![0u8; CHUNK_FLOATS.min(rows) * size];
        for j in 0..dim {
            let mut i = 0;
            while i < rows {
                let n = (rows - i).min(CHUNK_FLOATS);
                let chunk = &mut buf[..n * size];
                read_data(&mut reader, path, chunk, 2)?;
                for (k, b) in chunk.chunks_exact(size).enumerate() {
                    data[(i + k) * stride + j] = dtype.decode(b);
                }
                i += n;
            }
        }
    } else {
        let rows_per_chunk = (CHUNK_FLOATS / dim).max(1);
        let mut buf = vec![0u8; rows_per_chunk.min(rows) * dim * size];
        let mut i = 0;
        while i < rows {
            let n = (rows - i).min(rows_per_chunk);
            let chunk = &mut buf[..n * dim * size];
            read_data(&mut reader, path, chunk, i + 2)?;
            for (k, src) in chunk.chunks_exact(dim * size).enumerate() {
                let dst = &mut data[(i + k) * stride..][..dim];
                for (x, b) in dst.iter_mut().zip(src.chunks_exact(size)) {
                    *x = dtype.decode(b);
                }
            }
            i += n;
        }
    }
    Ok(table)
}

/// Bytes of a stream's data read per chunk (a multiple of every element
/// size, so no element straddles two chunks).
const STREAM_CHUNK: usize = 1 << 20;

/// Loads the data of a stream whose length is unknown (a pipe): the
/// header's shape is not trusted with an allocation until the data is
/// there. The data is read into chunks as it arrives (at most the
/// shape's byte count and one byte more, to see whether anything
/// follows), its length checked, and only then is the table allocated and
/// filled; this briefly needs the data's size on top of the table.
fn load_stream(
    mut reader: BufReader<File>,
    path: &Path,
    header: &Header,
    bytes: u64,
) -> Result<EmbeddingTable> {
    let &Header {
        dtype,
        fortran_order,
        rows,
        dim,
    } = header;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut have = 0u64;
    loop {
        let want = (bytes.saturating_add(1) - have).min(STREAM_CHUNK as u64);
        let mut chunk = Vec::new();
        let got = (&mut reader)
            .take(want)
            .read_to_end(&mut chunk)
            .map_err(|e| read_error(path, e))?;
        have += got as u64;
        chunks.push(chunk);
        if (got as u64) < want || have > bytes {
            break;
        }
    }
    if have < bytes {
        let line = if fortran_order {
            2
        } else {
            2 + (have / (dim * dtype.size()) as u64) as usize
        };
        return Err(format_error(
            line,
            format!("the data is cut short: {have} of {bytes} bytes for shape ({rows}, {dim})"),
        ));
    }
    if have > bytes {
        // Count what follows, up to 1 MiB, to say how much.
        let extra = (&mut reader)
            .take(1 << 20)
            .bytes()
            .try_fold(have - bytes, |n, b| b.map(|_| n + 1))
            .map_err(|e| read_error(path, e))?;
        return Err(trailing(rows, extra));
    }
    let size = dtype.size();
    let element = |e: usize| {
        let at = e * size;
        &chunks[at / STREAM_CHUNK][at % STREAM_CHUNK..][..size]
    };
    let mut table = EmbeddingTable::zeros(rows, dim)?;
    let stride = table.stride();
    for (i, row) in table.as_padded_mut().chunks_exact_mut(stride).enumerate() {
        for (j, x) in row[..dim].iter_mut().enumerate() {
            // Column j holds element (i, j) for every i, in row order.
            let e = if fortran_order {
                j * rows + i
            } else {
                i * dim + j
            };
            *x = dtype.decode(element(e));
        }
    }
    Ok(table)
}

/// The element types `load_npy` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    /// `<f4`
    F32Le,
    /// `>f4`
    F32Be,
    /// `<f8`, rounded to the nearest `f32`
    F64Le,
    /// `>f8`, rounded to the nearest `f32`
    F64Be,
}

impl Dtype {
    fn parse(descr: &str) -> Option<Self> {
        match descr {
            "<f4" => Some(Self::F32Le),
            ">f4" => Some(Self::F32Be),
            "<f8" => Some(Self::F64Le),
            ">f8" => Some(Self::F64Be),
            _ => None,
        }
    }

    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            Self::F32Le | Self::F32Be => 4,
            Self::F64Le | Self::F64Be => 8,
        }
    }

    /// The element in `b` (exactly `size()` bytes) as an `f32`.
    #[inline]
    fn decode(self, b: &[u8]) -> f32 {
        let four = |b: &[u8]| [b[0], b[1], b[2], b[3]];
        let eight = |b: &[u8]| [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
        match self {
            Self::F32Le => f32::from_le_bytes(four(b)),
            Self::F32Be => f32::from_be_bytes(four(b)),
            Self::F64Le => f64::from_le_bytes(eight(b)) as f32,
            Self::F64Be => f64::from_be_bytes(eight(b)) as f32,
        }
    }
}

fn trailing(rows: usize, extra: u64) -> Error {
    format_error(
        rows + 2,
        format!(
            "{} after the data of the {} the shape declares",
            crate::error::count(extra, "byte"),
            crate::error::count(rows, "row")
        ),
    )
}

/// Fills `buf` from the data; a short read is a truncated file at `line`.
fn read_data(reader: &mut BufReader<File>, path: &Path, buf: &mut [u8], line: usize) -> Result<()> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format_error(line, "the data is cut short")
        } else {
            read_error(path, e)
        }
    })
}

/// What the header says about the array.
#[derive(Debug, PartialEq)]
struct Header {
    dtype: Dtype,
    fortran_order: bool,
    rows: usize,
    dim: usize,
}

/// Reads and checks the preamble and header; returns the header and the
/// offset of the data.
fn read_header(reader: &mut impl Read, path: &Path) -> Result<(Header, u64)> {
    let mut read = |buf: &mut [u8], what: &str| {
        reader.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                format_error(1, format!("the file ends inside the {what}"))
            } else {
                read_error(path, e)
            }
        })
    };
    let mut preamble = [0u8; 8];
    read(&mut preamble, "magic string and version")?;
    if &preamble[..6] != MAGIC {
        return Err(format_error(
            1,
            format!(
                "not a .npy file: it starts with {:?}, not \\x93NUMPY",
                String::from_utf8_lossy(&preamble[..6])
            ),
        ));
    }
    let (major, minor) = (preamble[6], preamble[7]);
    let len_bytes = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => {
            return Err(format_error(
                1,
                format!(".npy format version {major}.{minor} is not supported (1.0, 2.0, 3.0 are)"),
            ));
        }
    };
    let mut len = [0u8; 4];
    read(&mut len[..len_bytes], "header length")?;
    let header_len = u32::from_le_bytes(len) as usize;
    if header_len > MAX_HEADER_BYTES {
        return Err(format_error(
            1,
            format!("header length {header_len} is over the {MAX_HEADER_BYTES} bytes accepted"),
        ));
    }
    let mut header = vec![0u8; header_len];
    read(&mut header, "header")?;
    // Versions 1.0 and 2.0 are Latin-1, 3.0 is UTF-8; a dict of the keys
    // NumPy writes is ASCII either way.
    let text = std::str::from_utf8(&header)
        .map_err(|_| format_error(1, "the header is not ASCII or UTF-8 text"))?;
    let header = parse_header(text).map_err(|reason| format_error(1, reason))?;
    Ok((header, (8 + len_bytes + header_len) as u64))
}

/// Parses the header dict and checks it describes a 2-D `float32` array.
fn parse_header(text: &str) -> Result<Header, String> {
    let mut p = DictParser {
        s: text.as_bytes(),
        i: 0,
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    p.expect(b'{')?;
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.skip_ws();
        p.expect(b':')?;
        p.skip_ws();
        let slot_taken = match key.as_str() {
            "descr" => descr.replace(p.string()?).is_some(),
            "fortran_order" => fortran.replace(p.boolean()?).is_some(),
            "shape" => shape.replace(p.tuple()?).is_some(),
            other => return Err(format!("unexpected key {other:?} in the header")),
        };
        if slot_taken {
            return Err(format!("key {key:?} appears twice in the header"));
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.skip_ws();
            p.expect(b'}')?;
            break;
        }
    }
    if !p.s[p.i..].iter().all(u8::is_ascii_whitespace) {
        return Err("the header has text after the dict".into());
    }
    let (Some(descr), Some(fortran_order), Some(shape)) = (descr, fortran, shape) else {
        return Err("the header lacks one of the keys descr, fortran_order, shape".into());
    };
    let Some(dtype) = Dtype::parse(&descr) else {
        return Err(format!(
            "dtype '{descr}' is not supported: save float32, e.g. np.save(path, w.astype('<f4'))"
        ));
    };
    let [rows, dim] = shape[..] else {
        return Err(format!(
            "shape {shape:?} is not 2-D: a table is a (rows, dim) array"
        ));
    };
    if rows == 0 || dim == 0 {
        return Err(format!(
            "shape ({rows}, {dim}) is empty: a table has at least one row and one column"
        ));
    }
    Ok(Header {
        dtype,
        fortran_order,
        rows,
        dim,
    })
}

/// A cursor over the header's Python dict literal.
struct DictParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl DictParser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.s.get(self.i) == Some(&b);
        self.i += usize::from(hit);
        hit
    }

    fn expect(&mut self, b: u8) -> Result<(), String> {
        if self.eat(b) {
            Ok(())
        } else {
            Err(format!(
                "malformed header: expected {:?} at byte {}",
                b as char, self.i
            ))
        }
    }

    /// A quoted string without escapes (`'<f4'`, `"shape"`).
    fn string(&mut self) -> Result<String, String> {
        let quote = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(format!(
                    "malformed header: expected a string at byte {}",
                    self.i
                ));
            }
        };
        let start = self.i + 1;
        let len = self.s[start..]
            .iter()
            .position(|&b| b == quote)
            .ok_or("malformed header: unterminated string")?;
        self.i = start + len + 1;
        Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
    }

    fn boolean(&mut self) -> Result<bool, String> {
        for (word, value) in [(&b"True"[..], true), (b"False", false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(value);
            }
        }
        Err(format!(
            "malformed header: expected True or False at byte {}",
            self.i
        ))
    }

    /// A tuple of non-negative integers: `()`, `(3,)`, `(3, 4)`, `(3L, 4L)`.
    fn tuple(&mut self) -> Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(items);
            }
            let start = self.i;
            while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or_default();
            let n = digits.parse::<usize>().map_err(|_| {
                format!("malformed header: expected a dimension size at byte {start}")
            })?;
            items.push(n);
            self.eat(b'L'); // Python 2 longs
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Ok(items);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_parses_back() {
        for (rows, dim) in [(1, 1), (7, 6), (123_456_789, 300)] {
            let h = header_bytes(rows, dim);
            assert_eq!(h.len() % ALIGN, 0);
            assert_eq!(*h.last().unwrap(), b'\n');
            let (header, start) = read_header(&mut &h[..], Path::new("mem")).unwrap();
            assert_eq!(start, h.len() as u64);
            assert_eq!((header.rows, header.dim), (rows, dim));
            assert!(!header.fortran_order);
            assert_eq!(header.dtype, Dtype::F32Le);
        }
        let h = header_bytes(7, 6);
        assert_eq!(
            std::str::from_utf8(&h[10..]).unwrap().trim_end(),
            "{'descr': '<f4', 'fortran_order': False, 'shape': (7, 6), }"
        );
    }

    #[test]
    fn headers_numpy_may_write_parse() {
        let ok = [
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }",
            "{'shape': (3L, 4L), 'fortran_order': True, 'descr': '>f4'}",
            "{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":(3,4,)}  \n",
        ];
        for h in ok {
            let parsed = parse_header(h).unwrap_or_else(|e| panic!("{h}: {e}"));
            assert_eq!((parsed.rows, parsed.dim), (3, 4));
        }
        let bad = [
            "{'descr': '<f2', 'fortran_order': False, 'shape': (3, 4), }",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (3, 4), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4, 5), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }",
            "{'descr': '<f4', 'fortran_order': False}",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (3, 4)}",
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (3, 4)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), 'x': 1}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4)} junk",
            "{'descr': '<f4, 'fortran_order': False, 'shape': (3, 4)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, -4)}",
            "",
        ];
        for h in bad {
            assert!(parse_header(h).is_err(), "{h}");
        }
    }
}
