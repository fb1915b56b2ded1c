//! The safetensors format, apart from what a checkpoint stores in it: a
//! writer that lays out the header and streams the tensors (tables row by
//! row, unpadded) without copying them, and a reader over the `safetensors`
//! crate's header checks; and single tables as plain safetensors files, as
//! PyTorch and Hugging Face tools write and read them.
//!
//! A file is an 8-byte little-endian header length, a JSON header (padded
//! with spaces to a multiple of 8 bytes) naming each tensor's dtype, shape
//! and byte range and holding a `__metadata__` string map, then the
//! tensors' little-endian data, packed with no padding. The checkpoint
//! schema on top of it is [`checkpoint`](super::checkpoint)'s.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use super::{format_error, read_error, write_atomic};
use crate::{EmbeddingTable, Error, Result};

/// Values converted per write while saving.
const CHUNK: usize = 1 << 14;

/// Writes `table` as a safetensors file holding one `F32 [rows, dim]`
/// tensor named `name`, without metadata: what PyTorch's
/// `safetensors.torch.save_file({name: weight}, path)` writes. With `name`
/// `"weight"`, `nn.Embedding.load_state_dict(load_file(path))` takes it as
/// is. The file is written atomically.
///
/// # Errors
/// [`Error::InvalidConfig`] (field `name`) if `name` is empty or has a
/// character outside ASCII letters, digits and `_ - . /`; [`Error::Io`] if
/// writing fails, `path` being then unchanged.
///
/// # Examples
/// ```
/// use embtable::io;
/// use embtable::{EmbeddingTable, Init};
/// let table = EmbeddingTable::new(10, 3, Init::default(), 1)?;
/// let path = std::env::temp_dir().join("embtable-doc-table.safetensors");
/// io::save_table_safetensors(&path, "weight", &table)?;
/// assert_eq!(io::load_table_safetensors(&path, "weight")?, table);
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), embtable::Error>(())
/// ```
pub fn save_table_safetensors(
    path: impl AsRef<Path>,
    name: &str,
    table: &EmbeddingTable,
) -> Result<()> {
    check_name("name", "tensor name", name)?;
    let plan = Plan::new(
        None,
        vec![Tensor {
            name: name.to_owned(),
            shape: vec![table.rows(), table.dim()],
            data: Data::Table(table),
        }],
    )?;
    write_atomic(path.as_ref(), |out| plan.write(out))
}

/// Reads the 2-D tensor `name` of a safetensors file as a table: a table
/// saved by [`save_table_safetensors`], a table of a checkpoint
/// (`"item.weight"`), or an embedding of a PyTorch or Hugging Face model
/// (`"model.embed_tokens.weight"`). Other tensors in the file are ignored.
///
/// `F32` values are read bit for bit; `F16` and `BF16` widen to `f32`
/// exactly (as `tensor.float()` does); `F64` rounds to the nearest `f32`.
/// The whole file is read into memory.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::Format`] (line 0) if
/// it is not a valid safetensors file, holds no tensor `name`, or that
/// tensor is not 2-D with at least one row and one column, or of another
/// dtype; [`Error::Alloc`] if the table does not fit in memory.
///
/// # Examples
/// The weights of a checkpoint, without its optimizer:
/// ```
/// use embtable::io;
/// use embtable::{EmbeddingTable, Error, Init, Sgd};
/// let table = EmbeddingTable::new(10, 3, Init::default(), 1)?;
/// let path = std::env::temp_dir().join("embtable-doc-table-load.safetensors");
/// io::save_checkpoint(&path, &table, &Sgd::default())?;
/// assert_eq!(io::load_table_safetensors(&path, "embedding.weight")?, table);
/// let err = io::load_table_safetensors(&path, "weight").unwrap_err();
/// assert!(err.to_string().contains("no tensor \"weight\""), "{err}");
/// # std::fs::remove_file(&path).ok();
/// # Ok::<(), embtable::Error>(())
/// ```
pub fn load_table_safetensors(path: impl AsRef<Path>, name: &str) -> Result<EmbeddingTable> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| read_error(path, e))?;
    let file = Parsed::parse(&bytes)?;
    let (info, data) = file.get(name)?;
    let (rows, dim) = matrix_shape(name, &info.shape)?;
    let (width, widen): (usize, fn(&[u8]) -> f32) = match info.dtype {
        Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F64 => (8, |b| {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
        }),
        Dtype::F16 => (2, |b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))),
        Dtype::BF16 => (2, |b| {
            f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
        }),
        other => {
            return Err(format_error(
                0,
                format!("tensor {name:?} is {other}; a table must be F32, F16, BF16 or F64"),
            ));
        }
    };
    table_from_bytes(name, rows, dim, data, width, widen)
}

/// Checks a name that goes into tensor names or metadata lists.
pub(crate) fn check_name(field: &'static str, what: &str, name: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/');
    if !name.is_empty() && name.chars().all(ok) {
        return Ok(());
    }
    Err(Error::InvalidConfig {
        field,
        reason: format!(
            "{what} {name:?} must be non-empty and made of ASCII letters, digits and _ - . /"
        ),
    })
}

// ---------------------------------------------------------------- writing

/// A tensor to write.
pub(crate) struct Tensor<'s> {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Data<'s>,
}

/// Where a tensor's values come from.
pub(crate) enum Data<'s> {
    /// A table's rows, unpadded: `F32`.
    Table(&'s EmbeddingTable),
    /// `F32` values.
    F32(&'s [f32]),
    /// Step counts, checked to fit: `I64`.
    I64(&'s [u64]),
    /// `U64` values (a dynamic table's keys and counters).
    U64(&'s [u64]),
    /// `U32` values (a dynamic table's rows).
    U32(&'s [u32]),
}

impl Data<'_> {
    fn dtype(&self) -> &'static str {
        match self {
            Data::Table(_) | Data::F32(_) => "F32",
            Data::I64(_) => "I64",
            Data::U64(_) => "U64",
            Data::U32(_) => "U32",
        }
    }

    fn width(&self) -> usize {
        match self {
            Data::Table(_) | Data::F32(_) | Data::U32(_) => 4,
            Data::I64(_) | Data::U64(_) => 8,
        }
    }

    fn len(&self) -> usize {
        match self {
            Data::Table(t) => t.rows() * t.dim(),
            Data::F32(v) => v.len(),
            Data::I64(v) | Data::U64(v) => v.len(),
            Data::U32(v) => v.len(),
        }
    }
}

/// A file laid out: its header, then its tensors in order.
pub(crate) struct Plan<'s> {
    header: Vec<u8>,
    tensors: Vec<Tensor<'s>>,
}

impl<'s> Plan<'s> {
    /// Orders the tensors as the `safetensors` crate does (wider dtypes
    /// first, so every tensor is aligned to its element size when the file
    /// is mapped; then by name) and writes the header: the 8-byte length,
    /// then the JSON padded with spaces to a multiple of 8 bytes.
    pub(crate) fn new(
        metadata: Option<Vec<(String, String)>>,
        mut tensors: Vec<Tensor<'s>>,
    ) -> Result<Self> {
        tensors.sort_by(|a, b| {
            b.data
                .width()
                .cmp(&a.data.width())
                .then_with(|| a.name.cmp(&b.name))
        });
        let mut names = BTreeSet::new();
        if let Some(t) = tensors.iter().find(|t| !names.insert(t.name.as_str())) {
            return Err(Error::InvalidConfig {
                field: "name",
                reason: format!("two tensors would be named {:?}; rename a table", t.name),
            });
        }
        let mut json = String::from("{");
        if let Some(mut metadata) = metadata {
            metadata.sort();
            if let Some(w) = metadata.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(Error::InvalidConfig {
                    field: "name",
                    reason: format!("two metadata keys would be {:?}; rename a table", w[0].0),
                });
            }
            json.push_str("\"__metadata__\":{");
            for (i, (key, value)) in metadata.iter().enumerate() {
                if i > 0 {
                    json.push(',');
                }
                push_json_string(&mut json, key);
                json.push(':');
                push_json_string(&mut json, value);
            }
            json.push('}');
        }
        let mut offset = 0usize;
        for (i, t) in tensors.iter().enumerate() {
            let end = t
                .data
                .len()
                .checked_mul(t.data.width())
                .and_then(|n| n.checked_add(offset))
                .ok_or(Error::Alloc {
                    what: "checkpoint",
                    bytes: usize::MAX,
                })?;
            if i > 0 || json.len() > 1 {
                json.push(',');
            }
            push_json_string(&mut json, &t.name);
            let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
            json.push_str(&format!(
                ":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
                t.data.dtype(),
                dims.join(",")
            ));
            offset = end;
        }
        json.push('}');
        let len = json.len().next_multiple_of(8);
        let mut header = Vec::with_capacity(8 + len);
        header.extend_from_slice(&(len as u64).to_le_bytes());
        header.extend_from_slice(json.as_bytes());
        header.resize(8 + len, b' ');
        Ok(Self { header, tensors })
    }

    pub(crate) fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&self.header)?;
        let mut buf = Vec::with_capacity(CHUNK * 8);
        for t in &self.tensors {
            match t.data {
                Data::Table(table) => {
                    let rows_per_chunk = (CHUNK / table.dim()).max(1);
                    for first in (0..table.rows()).step_by(rows_per_chunk) {
                        buf.clear();
                        for r in first..(first + rows_per_chunk).min(table.rows()) {
                            buf.extend(table.row(r).iter().flat_map(|x| x.to_le_bytes()));
                        }
                        out.write_all(&buf)?;
                    }
                }
                Data::F32(values) => {
                    for chunk in values.chunks(CHUNK) {
                        buf.clear();
                        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                        out.write_all(&buf)?;
                    }
                }
                Data::I64(values) => {
                    for chunk in values.chunks(CHUNK) {
                        buf.clear();
                        // The writer's caller checked that they fit (a checkpoint's `check_state`).
                        buf.extend(chunk.iter().flat_map(|&x| (x as i64).to_le_bytes()));
                        out.write_all(&buf)?;
                    }
                }
                Data::U64(values) => {
                    for chunk in values.chunks(CHUNK) {
                        buf.clear();
                        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                        out.write_all(&buf)?;
                    }
                }
                Data::U32(values) => {
                    for chunk in values.chunks(CHUNK) {
                        buf.clear();
                        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                        out.write_all(&buf)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Appends `s` as a JSON string. Names are checked to need no escapes, but
/// the header stays valid JSON whatever it is given.
fn push_json_string(json: &mut String, s: &str) {
    json.push('"');
    for c in s.chars() {
        match c {
            '"' => json.push_str("\\\""),
            '\\' => json.push_str("\\\\"),
            c if u32::from(c) < 0x20 => json.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => json.push(c),
        }
    }
    json.push('"');
}

// ---------------------------------------------------------------- reading

/// `Error::Format` for a safetensors file, which has no lines.
pub(crate) fn bad(reason: impl Into<String>) -> Error {
    format_error(0, reason)
}

/// A safetensors file read into memory, its header checked.
pub(crate) struct Parsed<'b> {
    pub(crate) meta: Metadata,
    data: &'b [u8],
}

impl<'b> Parsed<'b> {
    pub(crate) fn parse(bytes: &'b [u8]) -> Result<Self> {
        let (n, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        // `read_metadata` checked that the header and the data fill the
        // buffer exactly.
        let data = bytes
            .get(8 + n..)
            .ok_or_else(|| bad("not a valid safetensors file: truncated"))?;
        Ok(Self { meta, data })
    }

    /// The tensor `name` and its bytes.
    pub(crate) fn get(&self, name: &str) -> Result<(&TensorInfo, &'b [u8])> {
        let Some(info) = self.meta.info(name) else {
            let mut names = self.meta.offset_keys();
            names.sort();
            let more = names.len().saturating_sub(10);
            names.truncate(10);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            return Err(bad(format!(
                "no tensor {name:?} in the file; it holds {names:?}{more}"
            )));
        };
        let (start, end) = info.data_offsets;
        let data = self
            .data
            .get(start..end)
            .ok_or_else(|| bad(format!("tensor {name:?} lies outside the file")))?;
        Ok((info, data))
    }

    /// The names of every tensor in the file.
    pub(crate) fn tensor_names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    /// The metadata value of `key`.
    pub(crate) fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .map(String::as_str)
    }

    pub(crate) fn require(&self, key: &str) -> Result<&str> {
        self.meta(key)
            .ok_or_else(|| bad(format!("metadata {key:?} is missing")))
    }
}

pub(crate) fn check_dtype(name: &str, info: &TensorInfo, want: Dtype) -> Result<()> {
    if info.dtype == want {
        Ok(())
    } else {
        Err(bad(format!(
            "tensor {name:?} is {}; expected {want}",
            info.dtype
        )))
    }
}

/// `(rows, dim)` of a tensor that must be a non-empty matrix.
pub(crate) fn matrix_shape(name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [rows, dim] if rows > 0 && dim > 0 => Ok((rows, dim)),
        _ => Err(bad(format!(
            "tensor {name:?} has shape {shape:?}; a table is [rows, dim] with both above 0"
        ))),
    }
}

/// A `rows × dim` table from `data`, `width` bytes per value, each
/// converted by `read`. `data` holds exactly `rows * dim` values (checked
/// by the `safetensors` crate against the dtype; checked again here).
pub(crate) fn table_from_bytes(
    name: &str,
    rows: usize,
    dim: usize,
    data: &[u8],
    width: usize,
    read: fn(&[u8]) -> f32,
) -> Result<EmbeddingTable> {
    let row_bytes = dim * width;
    if Some(data.len()) != rows.checked_mul(row_bytes) {
        return Err(bad(format!(
            "tensor {name:?} holds {} bytes, not {rows} × {dim} values",
            data.len()
        )));
    }
    let mut table = EmbeddingTable::zeros(rows, dim)?;
    let stride = table.stride();
    table
        .as_padded_mut()
        .par_chunks_mut(stride)
        .zip(data.par_chunks(row_bytes))
        .with_min_len(256)
        .for_each(|(row, src)| {
            for (x, b) in row[..dim].iter_mut().zip(src.chunks_exact(width)) {
                *x = read(b);
            }
        });
    Ok(table)
}

/// IEEE half precision to `f32`, exactly (every `f16` is an `f32`); NaN
/// payloads are kept, as NumPy's `astype(np.float32)` keeps them.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let magnitude = match exp {
        // Zero and subnormals: man · 2⁻²⁴, exact in f32.
        0 => (man as f32 * (1.0 / 16_777_216.0)).to_bits(),
        // Infinities and NaNs.
        31 => 0x7f80_0000 | (man << 13),
        // Normal: rebias the exponent from 15 to 127.
        _ => ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(sign | magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_matches_the_definition() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            let exp = i32::from((h >> 10) & 0x1f);
            let man = f64::from(h & 0x3ff);
            let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
            let want = match exp {
                0 => sign * man * 2f64.powi(-24),
                31 if man == 0.0 => sign * f64::INFINITY,
                31 => {
                    assert!(x.is_nan(), "{h:#06x}");
                    assert_eq!(x.to_bits() >> 31, u32::from(h >> 15));
                    assert_eq!(x.to_bits() & 0x7f_ffff, u32::from(h & 0x3ff) << 13);
                    continue;
                }
                _ => sign * (1.0 + man / 1024.0) * 2f64.powi(exp - 15),
            };
            assert_eq!(f64::from(x), want, "{h:#06x}");
            assert_eq!(x.is_sign_negative(), h & 0x8000 != 0, "{h:#06x}");
        }
    }

    #[test]
    fn header_is_valid_safetensors_and_padded() {
        let table = EmbeddingTable::from_rows(2, 3, &[1., 2., 3., 4., 5., 6.]).unwrap();
        let last = [1u64, 2];
        let values = [0.5f32; 2];
        let plan = Plan::new(
            Some(vec![("k\"ey".into(), "v\\al\n".into())]),
            vec![
                Tensor {
                    name: "w".into(),
                    shape: vec![2, 3],
                    data: Data::Table(&table),
                },
                Tensor {
                    name: "a".into(),
                    shape: vec![2],
                    data: Data::F32(&values),
                },
                Tensor {
                    name: "z".into(),
                    shape: vec![2],
                    data: Data::I64(&last),
                },
            ],
        )
        .unwrap();
        let mut bytes = Vec::new();
        plan.write(&mut bytes).unwrap();
        assert_eq!(plan.header.len() % 8, 0);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        // The 8-byte tensor comes first, so it is 8-byte aligned.
        let (n, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.offset_keys(), ["z", "a", "w"]);
        assert_eq!((8 + n) % 8, 0);
        assert_eq!(
            meta.metadata().as_ref().unwrap().get("k\"ey").unwrap(),
            "v\\al\n"
        );
        let w = st.tensor("w").unwrap();
        assert_eq!((w.dtype(), w.shape()), (Dtype::F32, &[2, 3][..]));
        let want: Vec<u8> = table
            .to_vec()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(w.data(), &want[..]);
        let z = st.tensor("z").unwrap();
        assert_eq!(z.dtype(), Dtype::I64);
        assert_eq!(z.data(), [1i64.to_le_bytes(), 2i64.to_le_bytes()].concat());
    }
}
