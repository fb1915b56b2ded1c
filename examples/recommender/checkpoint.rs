//! `--save` / `--resume`: the model's tables, both optimizers' states and
//! where training stopped, in one file.
//!
//! This is a stop-gap until embtable's own checkpoint module
//! (`io::save_checkpoint`, safetensors) lands: [`save`] and [`load`] are the
//! only two functions to switch. The format is a small little-endian binary
//! one built on the public [`OptimizerState`] fields:
//!
//! ```text
//! "EMBTREC1"  meta: epoch u64, data fingerprint u64, seed u64,
//!             settings (name str, value f64)*
//! table × 2   (items, users): rows u64, dim u64, rows·dim f32
//! state × 2   kind str, config (name str, value f64)*, steps u64,
//!             shape (flag u8, rows u64, dim u64), arrays (name str,
//!             shape u64*, values f32*)*, last_step u64*
//! ```
//!
//! where `str` is a u64 length and UTF-8 bytes, and `x*` a u64 count then
//! the items. The file is written to a temporary name and renamed, so a
//! crash never leaves a torn checkpoint behind.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use embtable::{EmbeddingTable, OptimizerState, StateArray};

const MAGIC: &[u8; 8] = b"EMBTREC1";

/// Everything a resumed run needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Epochs completed.
    pub epoch: u64,
    /// [`Dataset::fingerprint`](crate::data::Dataset::fingerprint) of the training data.
    pub data_fingerprint: u64,
    /// The `--seed`.
    pub seed: u64,
    /// The other options that shape training, by option name (the
    /// optimizer as a code, see `OptName::code`).
    pub settings: Vec<(String, f64)>,
    /// Item and user tables.
    pub tables: [EmbeddingTable; 2],
    /// Item and user optimizer states.
    pub states: [OptimizerState; 2],
}

/// Writes `ckpt` to `path` (atomically: temporary file, then rename).
pub fn save(path: &Path, ckpt: &Checkpoint) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut w = BufWriter::new(File::create(&tmp)?);
        w.write_all(MAGIC)?;
        put_u64(&mut w, ckpt.epoch)?;
        put_u64(&mut w, ckpt.data_fingerprint)?;
        put_u64(&mut w, ckpt.seed)?;
        put_pairs(&mut w, &ckpt.settings)?;
        for t in &ckpt.tables {
            put_u64(&mut w, t.rows() as u64)?;
            put_u64(&mut w, t.dim() as u64)?;
            for r in 0..t.rows() {
                put_f32s(&mut w, t.row(r))?;
            }
        }
        for s in &ckpt.states {
            put_state(&mut w, s)?;
        }
        w.into_inner()?.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads a checkpoint written by [`save`].
///
/// # Errors
/// `InvalidData` for a file that is not one (wrong magic, truncated,
/// impossible sizes), naming what is wrong.
pub fn load(path: &Path) -> io::Result<Checkpoint> {
    let mut r = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("not a recommender checkpoint (wrong magic bytes)"));
    }
    let epoch = get_u64(&mut r)?;
    let data_fingerprint = get_u64(&mut r)?;
    let seed = get_u64(&mut r)?;
    let settings = get_pairs(&mut r)?;
    let mut table = || -> io::Result<EmbeddingTable> {
        let rows = get_len(&mut r)?;
        let dim = get_len(&mut r)?;
        let values = get_f32s(
            &mut r,
            rows.checked_mul(dim)
                .ok_or_else(|| bad("table too large"))?,
        )?;
        EmbeddingTable::from_rows(rows, dim, &values).map_err(|e| bad(&e.to_string()))
    };
    let tables = [table()?, table()?];
    let states = [get_state(&mut r)?, get_state(&mut r)?];
    Ok(Checkpoint {
        epoch,
        data_fingerprint,
        seed,
        settings,
        tables,
        states,
    })
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn put_u64(w: &mut impl Write, x: u64) -> io::Result<()> {
    w.write_all(&x.to_le_bytes())
}

fn put_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    put_u64(w, s.len() as u64)?;
    w.write_all(s.as_bytes())
}

fn put_f32s(w: &mut impl Write, xs: &[f32]) -> io::Result<()> {
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    w.write_all(&bytes)
}

fn put_pairs(w: &mut impl Write, pairs: &[(String, f64)]) -> io::Result<()> {
    put_u64(w, pairs.len() as u64)?;
    for (name, value) in pairs {
        put_str(w, name)?;
        w.write_all(&value.to_le_bytes())?;
    }
    Ok(())
}

fn put_state(w: &mut impl Write, s: &OptimizerState) -> io::Result<()> {
    put_str(w, &s.kind)?;
    put_pairs(w, &s.config)?;
    put_u64(w, s.steps)?;
    let (flag, (rows, dim)) = match s.shape {
        Some(shape) => (1u8, shape),
        None => (0, (0, 0)),
    };
    w.write_all(&[flag])?;
    put_u64(w, rows as u64)?;
    put_u64(w, dim as u64)?;
    put_u64(w, s.arrays.len() as u64)?;
    for a in &s.arrays {
        put_str(w, &a.name)?;
        put_u64(w, a.shape.len() as u64)?;
        for &x in &a.shape {
            put_u64(w, x as u64)?;
        }
        put_u64(w, a.values.len() as u64)?;
        put_f32s(w, &a.values)?;
    }
    put_u64(w, s.last_step.len() as u64)?;
    for &x in &s.last_step {
        put_u64(w, x)?;
    }
    Ok(())
}

fn get_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A count or size: must fit in memory terms (guards against a corrupt
/// file asking for a huge allocation before the read fails).
fn get_len(r: &mut impl Read) -> io::Result<usize> {
    let x = get_u64(r)?;
    if x > 1 << 40 {
        return Err(bad(&format!("implausible length {x}")));
    }
    Ok(x as usize)
}

fn get_str(r: &mut impl Read) -> io::Result<String> {
    let n = get_len(r)?;
    let mut b = Vec::new();
    r.take(n as u64).read_to_end(&mut b)?;
    if b.len() != n {
        return Err(bad("truncated file"));
    }
    String::from_utf8(b).map_err(|_| bad("a name is not UTF-8"))
}

fn get_f32s(r: &mut impl Read, n: usize) -> io::Result<Vec<f32>> {
    let mut bytes = Vec::new();
    r.take(n as u64 * 4).read_to_end(&mut bytes)?;
    if bytes.len() != n * 4 {
        return Err(bad("truncated file"));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

fn get_pairs(r: &mut impl Read) -> io::Result<Vec<(String, f64)>> {
    let mut pairs = Vec::new();
    for _ in 0..get_len(r)? {
        let name = get_str(r)?;
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        pairs.push((name, f64::from_le_bytes(b)));
    }
    Ok(pairs)
}

fn get_state(r: &mut impl Read) -> io::Result<OptimizerState> {
    let kind = get_str(r)?;
    let config = get_pairs(r)?;
    let steps = get_u64(r)?;
    let mut flag = [0u8];
    r.read_exact(&mut flag)?;
    let (rows, dim) = (get_len(r)?, get_len(r)?);
    let shape = (flag[0] == 1).then_some((rows, dim));
    let mut arrays = Vec::new();
    for _ in 0..get_len(r)? {
        let name = get_str(r)?;
        let mut shape = Vec::new();
        for _ in 0..get_len(r)? {
            shape.push(get_len(r)?);
        }
        let n = get_len(r)?;
        let values = get_f32s(r, n)?;
        arrays.push(StateArray {
            name,
            shape,
            values,
        });
    }
    let mut last_step = Vec::new();
    for _ in 0..get_len(r)? {
        last_step.push(get_u64(r)?);
    }
    Ok(OptimizerState {
        kind,
        config,
        steps,
        shape,
        arrays,
        last_step,
    })
}
