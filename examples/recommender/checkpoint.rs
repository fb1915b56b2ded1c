//! `--save` / `--resume`: the model's two tables with their optimizers'
//! whole state, and where training stopped, in one embtable checkpoint
//! (`embtable::io::Checkpoint`, a safetensors file PyTorch can read).
//!
//! Tables `items` and `users`, and `best_items` and `best_users`, the
//! tables of the best validation epoch when it is an earlier one; the run's
//! position and settings are the checkpoint's own metadata (`epoch`,
//! `data_fingerprint`, `seed`, `best_epoch`, `best_ndcg`, `settings` as
//! `name=value` pairs).

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
    /// The best validation epoch so far (0: none) and its NDCG@10.
    pub best_epoch: u64,
    /// The validation NDCG@10 of `best_epoch`.
    pub best_ndcg: f64,
    /// The item and user tables of `best_epoch` (`None` before any).
    pub best_tables: Option<[EmbeddingTable; 2]>,
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
    /// The best validation epoch so far and its NDCG@10.
    pub best: (u64, f64),
    /// Its item and user tables, if it is not `epoch`.
    pub best_tables: Option<[&'a EmbeddingTable; 2]>,
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
    let mut file = io::Checkpoint::new()
        .with("items", items.table(), items.optimizer())
        .with("users", users.table(), users.optimizer())
        .with_metadata("epoch", at.epoch.to_string())
        .with_metadata("data_fingerprint", at.data_fingerprint.to_string())
        .with_metadata("seed", at.seed.to_string())
        .with_metadata("best_epoch", at.best.0.to_string())
        .with_metadata("best_ndcg", at.best.1.to_string())
        .with_metadata("settings", settings.join(","));
    if let Some([best_items, best_users]) = at.best_tables.filter(|_| at.best.0 != at.epoch) {
        file = file
            .with_table("best_items", best_items)
            .with_table("best_users", best_users);
    }
    file.save(path)
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
    let best_epoch = number("best_epoch")?;
    let best_ndcg = file.metadata("best_ndcg").ok_or("best_ndcg is missing")?;
    let best_ndcg: f64 = best_ndcg
        .parse()
        .map_err(|e| format!("best_ndcg {best_ndcg:?}: {e}"))?;
    let states = [state("items")?, state("users")?];
    let tables = [file.take_table("items")?, file.take_table("users")?];
    let best_tables = if best_epoch == 0 {
        None
    } else if best_epoch == epoch {
        Some(tables.clone())
    } else if best_epoch < epoch {
        Some([
            file.take_table("best_items")?,
            file.take_table("best_users")?,
        ])
    } else {
        return Err(format!("best_epoch {best_epoch} is after epoch {epoch}").into());
    };
    Ok(Checkpoint {
        epoch,
        data_fingerprint,
        seed,
        settings,
        tables,
        states,
        best_epoch,
        best_ndcg,
        best_tables,
    })
}
