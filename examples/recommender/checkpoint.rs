//! `--save` / `--resume`: the model's two tables with their optimizers'
//! whole state, and where training stopped, in one embtable checkpoint
//! (`embtable::io::Checkpoint`, a safetensors file PyTorch can read).
//!
//! Tables `items` and `users`; the run's position and settings are the
//! checkpoint's own metadata (`epoch`, `data_fingerprint`, `seed`,
//! `settings` as `name=value` pairs).

use std::error::Error;
use std::path::Path;

use embtable::io;
use embtable::{Embedding, EmbeddingTable, OptimizerState, SparseOptimizer};

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

/// Where training stopped, saved beside the tables.
pub struct Position<'a> {
    /// Epochs completed.
    pub epoch: u64,
    /// Fingerprint of the training data.
    pub data_fingerprint: u64,
    /// The `--seed`.
    pub seed: u64,
    /// The settings, as [`Checkpoint::settings`].
    pub settings: &'a [(String, f64)],
}

/// Writes the model and `at` to `path` (atomically).
pub fn save<O: SparseOptimizer>(
    path: &Path,
    items: &Embedding<O>,
    users: &Embedding<O>,
    at: &Position<'_>,
) -> embtable::Result<()> {
    // f64's Display is the shortest decimal that parses back exactly.
    let settings: Vec<String> = at
        .settings
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    io::Checkpoint::new()
        .with("items", items.table(), items.optimizer())
        .with("users", users.table(), users.optimizer())
        .with_metadata("epoch", at.epoch.to_string())
        .with_metadata("data_fingerprint", at.data_fingerprint.to_string())
        .with_metadata("seed", at.seed.to_string())
        .with_metadata("settings", settings.join(","))
        .save(path)
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint, Box<dyn Error>> {
    let mut file = io::Checkpoint::load(path)?;
    let number = |key: &str| -> Result<u64, Box<dyn Error>> {
        let value = file.metadata(key).ok_or(format!("{key} is missing"))?;
        Ok(value.parse().map_err(|e| format!("{key} {value:?}: {e}"))?)
    };
    let (epoch, data_fingerprint, seed) = (
        number("epoch")?,
        number("data_fingerprint")?,
        number("seed")?,
    );
    let mut settings = Vec::new();
    for pair in file
        .metadata("settings")
        .ok_or("settings are missing")?
        .split(',')
    {
        let (name, value) = pair
            .split_once('=')
            .ok_or(format!("setting {pair:?} has no value"))?;
        let value = value
            .parse()
            .map_err(|e| format!("setting {name} {value:?}: {e}"))?;
        settings.push((name.to_owned(), value));
    }
    let state = |name: &str| {
        file.optimizer_state(name)
            .cloned()
            .ok_or(format!("table {name:?} has no optimizer state"))
    };
    let states = [state("items")?, state("users")?];
    let tables = [file.take_table("items")?, file.take_table("users")?];
    Ok(Checkpoint {
        epoch,
        data_fingerprint,
        seed,
        settings,
        tables,
        states,
    })
}
