//! Checkpoints of sharded tables: one safetensors file per rank, and the
//! reassembly of any rank's rows of any new layout from them.
//!
//! A checkpoint is a directory holding `shard-KKKKK-of-NNNNN.safetensors`
//! for every rank `K` of the `N` that wrote it. Each file is an ordinary
//! embtable checkpoint ([`Checkpoint`]) of that rank's shard (table
//! `embedding` with its optimizer state, rows in local order), written
//! atomically, whose metadata says how the whole table was split:
//!
//! | key (`user:` in the file) | value |
//! |---|---|
//! | `shard.rows`, `shard.dim` | shape of the whole table |
//! | `shard.world`, `shard.rank` | `N`, and `K` |
//! | `shard.sharding` | `range` or `modulo` ([`Sharding::name`]) |
//! | `shard.id` | one value shared by the `N` files of one save |
//!
//! Loading reads every file once, one at a time, and copies out the rows
//! (and their optimizer state) that the loading rank holds under its own
//! layout, so `N` ranks' files load on `M` ranks, or into one ordinary
//! table with [`load_sharded_checkpoint`]. Every value is copied, so the
//! result is bit for bit the saved table and state.

use std::fs;
use std::path::{Path, PathBuf};

use super::{ShardLayout, Sharding};
use crate::io::Checkpoint;
use crate::optim::{OptimizerState, SparseOptimizer, StateArray};
use crate::{EmbeddingTable, Error, Result};

/// The table name inside each shard file.
const NAME: &str = "embedding";

/// The file rank `rank` of `world` writes: `shard-00002-of-00004.safetensors`.
pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("shard-{rank:05}-of-{world:05}.safetensors")
}

/// `(rank, world)` of a shard file name, if it is one.
fn parse_file_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("shard-")?.strip_suffix(".safetensors")?;
    let (rank, world) = rest.split_once("-of-")?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(rank) || !digits(world) {
        return None;
    }
    Some((rank.parse().ok()?, world.parse().ok()?))
}

/// The staged name of rank `rank`'s file of save `id`: hidden, and never
/// taken for a shard file.
fn staged_name(rank: usize, world: usize, id: &str) -> String {
    format!(".{}.{id}.staged", shard_file_name(rank, world))
}

/// Writes rank `rank`'s shard of `layout` (its table and optimizer),
/// tagged with the save's `id`, atomically, under a staged name in `dir`
/// that loading ignores, and returns its path. Staged files this rank
/// left behind in `dir` (of saves killed before they committed) are
/// removed first. The first phase of a sharded save: [`commit_shard`]
/// is the second.
// Only the sharded table (feature `mpi`) saves; the tests of this module
// write checkpoints too.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn stage_shard<O: SparseOptimizer + ?Sized>(
    dir: &Path,
    layout: &ShardLayout,
    rank: usize,
    id: &str,
    shard: &EmbeddingTable,
    optimizer: &O,
) -> Result<PathBuf> {
    let prefix = format!(".{}.", shard_file_name(rank, layout.world()));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".staged") {
                let _ = fs::remove_file(entry.path()); // best effort: it is garbage either way
            }
        }
    }
    let path = dir.join(staged_name(rank, layout.world(), id));
    Checkpoint::new()
        .with(NAME, shard, optimizer)
        .with_metadata("shard.rows", layout.rows().to_string())
        .with_metadata("shard.dim", layout.dim().to_string())
        .with_metadata("shard.world", layout.world().to_string())
        .with_metadata("shard.rank", rank.to_string())
        .with_metadata("shard.sharding", layout.sharding().name())
        .with_metadata("shard.id", id)
        .save(&path)?;
    Ok(path)
}

/// Renames a file [`stage_shard`] wrote to its shard name: atomic, within
/// one directory.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn commit_shard(dir: &Path, staged: &Path, rank: usize, world: usize) -> Result<()> {
    let target = dir.join(shard_file_name(rank, world));
    fs::rename(staged, &target).map_err(|source| Error::Io {
        context: format!("renaming {} to {}", staged.display(), target.display()),
        source,
    })
}

/// Removes the shard files in `dir` that a save by another number of
/// ranks than `world` left there, so that the save just committed is the
/// only one.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn remove_other_saves(dir: &Path, world: usize) -> Result<()> {
    let io = |source| Error::Io {
        context: format!("removing stale shards from {}", dir.display()),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if let Some((_, w)) = entry.file_name().to_str().and_then(parse_file_name)
            && w != world
        {
            fs::remove_file(entry.path()).map_err(io)?;
        }
    }
    Ok(())
}

/// A format error about the checkpoint directory `dir`.
fn bad(dir: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Format {
        line: 0,
        reason: format!("sharded checkpoint {}: {reason}", dir.display()),
    }
}

/// The shard files of the one save in `dir`, in rank order.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).map_err(|source| Error::Io {
        context: format!("reading the directory {}", dir.display()),
        source,
    })?;
    let mut found: Vec<(usize, usize, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            context: format!("reading the directory {}", dir.display()),
            source,
        })?;
        if let Some((rank, world)) = entry.file_name().to_str().and_then(parse_file_name) {
            found.push((world, rank, entry.path()));
        }
    }
    found.sort();
    let Some(&(world, _, _)) = found.first() else {
        return Err(bad(dir, "holds no shard-KKKKK-of-NNNNN.safetensors file"));
    };
    if let Some((other, _, path)) = found.iter().find(|(w, _, _)| *w != world) {
        return Err(bad(
            dir,
            format!(
                "holds the shards of saves by {world} and by {other} ranks ({}); remove the stale ones",
                path.display()
            ),
        ));
    }
    if let Some((_, rank, path)) = found.iter().find(|(_, rank, _)| *rank >= world) {
        return Err(bad(
            dir,
            format!(
                "{} names rank {rank}, beyond the world of {world}",
                path.display()
            ),
        ));
    }
    if let Some(missing) = (0..world).find(|&k| found.get(k).is_none_or(|f| f.1 != k)) {
        return Err(bad(
            dir,
            format!("shard {} is missing", shard_file_name(missing, world)),
        ));
    }
    Ok(found.into_iter().map(|(_, _, path)| path).collect())
}

/// A metadata value of a shard file, parsed.
fn meta<T: std::str::FromStr>(ckpt: &Checkpoint<'_>, path: &Path, key: &str) -> Result<T> {
    let value = ckpt
        .metadata(key)
        .ok_or_else(|| bad(path, format!("metadata {key:?} is missing")))?;
    value.parse().map_err(|_| {
        bad(
            path,
            format!("metadata {key:?} is {value:?}, not a valid value"),
        )
    })
}

/// What one save says about the whole table, read from each of its files.
#[derive(Debug, PartialEq)]
struct Saved {
    rows: usize,
    dim: usize,
    world: usize,
    sharding: String,
    id: String,
}

impl Saved {
    fn read(ckpt: &Checkpoint<'_>, path: &Path) -> Result<Self> {
        Ok(Saved {
            rows: meta(ckpt, path, "shard.rows")?,
            dim: meta(ckpt, path, "shard.dim")?,
            world: meta(ckpt, path, "shard.world")?,
            sharding: meta(ckpt, path, "shard.sharding")?,
            id: meta(ckpt, path, "shard.id")?,
        })
    }
}

/// Rank `rank`'s shard of the table saved in `dir`, split over `world`
/// ranks by `sharding`: its table, the optimizer state of its rows (`None`
/// for a save without optimizer), and the new layout.
pub(crate) fn read_shard(
    dir: &Path,
    sharding: Sharding,
    world: usize,
    rank: usize,
) -> Result<(ShardLayout, EmbeddingTable, Option<OptimizerState>)> {
    let files = shard_files(dir)?;
    let mut first: Option<Saved> = None;
    let mut old = None;
    let mut new = None;
    let mut sources: Vec<(usize, usize)> = Vec::new();
    let mut table: Option<EmbeddingTable> = None;
    let mut state: Option<OptimizerState> = None;
    for (k, path) in files.iter().enumerate() {
        let mut ckpt = Checkpoint::load(path)?;
        let saved = Saved::read(&ckpt, path)?;
        let file_rank: usize = meta(&ckpt, path, "shard.rank")?;
        if file_rank != k || saved.world != files.len() {
            return Err(bad(
                path,
                format!(
                    "the file's metadata says rank {file_rank} of {}, its name rank {k} of {}",
                    saved.world,
                    files.len()
                ),
            ));
        }
        match &first {
            None => {
                let saved_sharding = Sharding::from_name(&saved.sharding)
                    .ok_or_else(|| bad(path, format!("unknown sharding {:?}", saved.sharding)))?;
                let o = ShardLayout::new(saved.rows, saved.dim, saved.world, saved_sharding)?;
                let n = ShardLayout::new(saved.rows, saved.dim, world, sharding)?;
                // Metadata cannot ask for more memory than the files hold:
                // the claimed table takes 2 bytes a value at the least (F16).
                let held = bytes_held(&files)?;
                if held / 2 / (saved.dim as u64) < saved.rows as u64 {
                    return Err(bad(
                        dir,
                        format!(
                            "its {} files hold {}, which cannot hold a {}x{} table",
                            files.len(),
                            crate::error::count(held, "byte"),
                            saved.rows,
                            saved.dim
                        ),
                    ));
                }
                sources = (0..n.shard_rows(rank))
                    .map(|l| o.locate(n.global(rank, l)))
                    .collect();
                table = Some(EmbeddingTable::zeros(n.shard_rows(rank), saved.dim)?);
                old = Some(o);
                new = Some(n);
                first = Some(saved);
            }
            Some(f) if *f != saved => {
                return Err(bad(
                    path,
                    format!(
                        "belongs to another save than shard 0 (id {:?} of a {}x{} table over {} ranks, \
                         against id {:?} of {}x{} over {})",
                        saved.id, saved.rows, saved.dim, saved.world, f.id, f.rows, f.dim, f.world
                    ),
                ));
            }
            Some(_) => {}
        }
        let (old, table) = (
            old.as_ref().expect("set on shard 0"),
            table.as_mut().expect("set"),
        );
        let part = ckpt
            .table(NAME)
            .ok_or_else(|| bad(path, "holds no table \"embedding\""))?;
        Error::check_len("rows of a saved shard", old.shard_rows(k), part.rows())?;
        let part_state = ckpt.optimizer_state(NAME).cloned();
        for (l, &(owner, local)) in sources.iter().enumerate() {
            if owner == k {
                table.row_mut(l).copy_from_slice(part.row(local));
            }
        }
        state = merge_state(path, k, state, part_state, &sources)?;
        drop(ckpt.take_table(NAME));
    }
    let new = new.expect("a save has at least one shard");
    Ok((new, table.expect("set on shard 0"), state))
}

/// The bytes `files` hold together (their sizes, links followed).
fn bytes_held(files: &[PathBuf]) -> Result<u64> {
    files.iter().try_fold(0u64, |sum, path| {
        let meta = fs::metadata(path).map_err(|source| Error::Io {
            context: format!("reading the size of {}", path.display()),
            source,
        })?;
        Ok(sum.saturating_add(meta.len()))
    })
}

/// Adds shard `k`'s optimizer state to the state of the new shard being
/// assembled (`acc`, started from shard 0): the rows of `sources` that
/// shard `k` held. Every shard must have saved the same kind, config,
/// step count and rate history.
fn merge_state(
    path: &Path,
    k: usize,
    acc: Option<OptimizerState>,
    part: Option<OptimizerState>,
    sources: &[(usize, usize)],
) -> Result<Option<OptimizerState>> {
    let (acc, part) = match (acc, part) {
        (None, None) => return Ok(None),
        (None, Some(part)) if k == 0 => {
            let rows = sources.len();
            let start = OptimizerState {
                shape: part.shape.map(|(_, dim)| (rows, dim)),
                arrays: part
                    .arrays
                    .iter()
                    .map(|a| StateArray {
                        name: a.name.clone(),
                        shape: std::iter::once(rows)
                            .chain(a.shape.iter().skip(1).copied())
                            .collect(),
                        values: vec![0.0; rows * a.shape.iter().skip(1).product::<usize>()],
                    })
                    .collect(),
                last_step: if part.last_step.is_empty() {
                    Vec::new()
                } else {
                    vec![0; rows]
                },
                ..part.clone()
            };
            (start, part)
        }
        (Some(acc), Some(part)) => (acc, part),
        _ => {
            return Err(bad(
                path,
                "some shards hold optimizer state and others none",
            ));
        }
    };
    let same = acc.kind == part.kind
        && acc.config == part.config
        && acc.steps == part.steps
        && acc.lr_history == part.lr_history
        && acc.shape.is_some() == part.shape.is_some()
        && acc.arrays.len() == part.arrays.len()
        && acc.last_step.is_empty() == part.last_step.is_empty();
    if !same {
        return Err(bad(
            path,
            format!(
                "its optimizer ({} after {} steps) differs from shard 0's ({} after {} steps) in kind, \
                 config, steps, rate history or arrays",
                part.kind, part.steps, acc.kind, acc.steps
            ),
        ));
    }
    let mut acc = acc;
    for (into, from) in acc.arrays.iter_mut().zip(&part.arrays) {
        let width: usize = from.shape.iter().skip(1).product();
        if into.name != from.name || into.shape[1..] != from.shape[1..] {
            return Err(bad(
                path,
                format!("optimizer array {:?} differs from shard 0's", from.name),
            ));
        }
        for (l, &(owner, local)) in sources.iter().enumerate() {
            if owner == k {
                let src = from
                    .values
                    .get(local * width..(local + 1) * width)
                    .ok_or_else(|| {
                        bad(
                            path,
                            format!("optimizer array {:?} is shorter than its shard", from.name),
                        )
                    })?;
                into.values[l * width..][..width].copy_from_slice(src);
            }
        }
    }
    if !part.last_step.is_empty() {
        for (l, &(owner, local)) in sources.iter().enumerate() {
            if owner == k {
                acc.last_step[l] = *part
                    .last_step
                    .get(local)
                    .ok_or_else(|| bad(path, "optimizer last_step is shorter than its shard"))?;
            }
        }
    }
    Ok(Some(acc))
}

/// Loads a sharded checkpoint (written by any number of ranks) into one
/// ordinary table and `optimizer`, in a single process without MPI: the
/// table and state are bit for bit those the ranks saved.
///
/// # Errors
/// [`Error::Io`] if `dir` or a file cannot be read; [`Error::Format`] if
/// a shard is missing, the files come from different saves, or a file is
/// not a valid shard checkpoint; [`Error::InvalidConfig`] if the files
/// hold no optimizer state; `optimizer`'s
/// [`load_state`](SparseOptimizer::load_state) errors (another kind of
/// optimizer). On error `optimizer` is unchanged.
///
/// # Examples
/// ```no_run
/// use embtable::shard::load_sharded_checkpoint;
/// use embtable::Adagrad;
/// // Written by `ShardedTable::save` on 4 ranks.
/// let mut optimizer = Adagrad::default();
/// let table = load_sharded_checkpoint("checkpoints/epoch-3", &mut optimizer)?;
/// # Ok::<(), embtable::Error>(())
/// ```
pub fn load_sharded_checkpoint<O: SparseOptimizer + ?Sized>(
    dir: impl AsRef<Path>,
    optimizer: &mut O,
) -> Result<EmbeddingTable> {
    let (_, table, state) = read_shard(dir.as_ref(), Sharding::Range, 1, 0)?;
    let state = state.ok_or_else(|| Error::InvalidConfig {
        field: "optimizer",
        reason: format!(
            "the checkpoint in {} holds no optimizer state",
            dir.as_ref().display()
        ),
    })?;
    optimizer.load_state(state)?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Adagrad, RmsProp, RmsPropConfig, Semantics, SparseGrad, SparseOptimizer};

    /// Both phases of a save of one rank's shard.
    fn write_shard(
        dir: &Path,
        layout: &ShardLayout,
        rank: usize,
        id: &str,
        shard: &EmbeddingTable,
        opt: &dyn SparseOptimizer,
    ) -> Result<()> {
        let staged = stage_shard(dir, layout, rank, id, shard, opt)?;
        commit_shard(dir, &staged, rank, layout.world())
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("embtable-shard-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Splits a trained table and its state the way N ranks would save
    /// them, then loads them on M ranks (and one process): the rows and
    /// state come back bit for bit.
    #[test]
    fn n_shards_load_on_m_ranks_bit_for_bit() {
        let (rows, dim) = (23, 5);
        let mut table = EmbeddingTable::new(rows, dim, crate::Init::default(), 3).unwrap();
        let mut opt = RmsProp::new(RmsPropConfig {
            momentum: 0.9,
            semantics: Semantics::DenseExact,
            ..RmsPropConfig::default()
        });
        let mut grad = SparseGrad::new(dim);
        for step in 0..3u32 {
            grad.clear();
            let ids = [step, 7, 20 - step];
            grad.accumulate_lookup(&ids, &vec![0.25; 3 * dim]).unwrap();
            opt.step(&mut table, &grad).unwrap();
        }
        let full = opt.state();
        for sharding in [Sharding::Range, Sharding::Modulo] {
            for n in 1..=4 {
                let dir = temp_dir(&format!("{}-{n}", sharding.name()));
                let layout = ShardLayout::new(rows, dim, n, sharding).unwrap();
                for k in 0..n {
                    let globals: Vec<usize> = (0..layout.shard_rows(k))
                        .map(|l| layout.global(k, l))
                        .collect();
                    let values: Vec<f32> = globals
                        .iter()
                        .flat_map(|&g| table.row(g).to_vec())
                        .collect();
                    let shard = EmbeddingTable::from_rows(globals.len(), dim, &values).unwrap();
                    let mut part = full.clone();
                    part.shape = Some((globals.len(), dim));
                    for a in &mut part.arrays {
                        a.shape[0] = globals.len();
                        a.values = globals
                            .iter()
                            .flat_map(|&g| {
                                full.arrays
                                    .iter()
                                    .find(|f| f.name == a.name)
                                    .unwrap()
                                    .values[g * dim..][..dim]
                                    .to_vec()
                            })
                            .collect();
                    }
                    part.last_step = globals.iter().map(|&g| full.last_step[g]).collect();
                    let mut shard_opt = RmsProp::default();
                    shard_opt.load_state(part).unwrap();
                    write_shard(&dir, &layout, k, "test", &shard, &shard_opt).unwrap();
                }
                let mut one = RmsProp::default();
                let loaded = load_sharded_checkpoint(&dir, &mut one).unwrap();
                assert_eq!(loaded.to_vec(), table.to_vec(), "{sharding:?} {n} -> 1");
                assert_eq!(one.state(), full, "{sharding:?} {n} -> 1");
                for m in 1..=3 {
                    for r in 0..m {
                        let (new, part, state) = read_shard(&dir, Sharding::Modulo, m, r).unwrap();
                        let state = state.unwrap();
                        for l in 0..new.shard_rows(r) {
                            let g = new.global(r, l);
                            assert_eq!(part.row(l), table.row(g));
                            assert_eq!(state.last_step[l], full.last_step[g]);
                            assert_eq!(
                                state.arrays[0].values[l * dim..][..dim],
                                full.arrays[0].values[g * dim..][..dim]
                            );
                        }
                    }
                }
                fs::remove_dir_all(&dir).unwrap();
            }
        }
    }

    #[test]
    fn incomplete_or_mixed_saves_are_refused() {
        let dir = temp_dir("mixed");
        let table = EmbeddingTable::zeros(4, 2).unwrap();
        let layout = ShardLayout::new(8, 2, 2, Sharding::Range).unwrap();
        write_shard(&dir, &layout, 0, "a", &table, &Adagrad::default()).unwrap();
        let err = load_sharded_checkpoint(&dir, &mut Adagrad::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("shard-00001-of-00002.safetensors is missing"),
            "{err}"
        );
        write_shard(&dir, &layout, 1, "b", &table, &Adagrad::default()).unwrap();
        let err = load_sharded_checkpoint(&dir, &mut Adagrad::default()).unwrap_err();
        assert!(err.to_string().contains("another save"), "{err}");
        write_shard(&dir, &layout, 1, "a", &table, &Adagrad::default()).unwrap();
        assert!(load_sharded_checkpoint(&dir, &mut Adagrad::default()).is_ok());
        let three = ShardLayout::new(8, 2, 3, Sharding::Range).unwrap();
        write_shard(
            &dir,
            &three,
            2,
            "a",
            &EmbeddingTable::zeros(3, 2).unwrap(),
            &Adagrad::default(),
        )
        .unwrap();
        let err = load_sharded_checkpoint(&dir, &mut Adagrad::default()).unwrap_err();
        assert!(err.to_string().contains("by 2 and by 3 ranks"), "{err}");
        remove_other_saves(&dir, 2).unwrap();
        assert!(load_sharded_checkpoint(&dir, &mut Adagrad::default()).is_ok());
        // A staged file (of a save that failed on another rank) is never
        // loaded, and the rank's next save removes it.
        let staged = stage_shard(&dir, &layout, 1, "c", &table, &Adagrad::default()).unwrap();
        let err = load_sharded_checkpoint(&dir, &mut Adagrad::default());
        assert!(
            err.is_ok(),
            "the staged file was taken for a shard: {err:?}"
        );
        let again = stage_shard(&dir, &layout, 1, "d", &table, &Adagrad::default()).unwrap();
        assert!(!staged.exists() && again.exists());
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            parse_file_name("shard-00001-of-00002.safetensors"),
            Some((1, 2))
        );
        assert_eq!(parse_file_name("shard-1-of-2.safetensors"), None);
    }
}
