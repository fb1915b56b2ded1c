//! Dynamic checkpoints: a dynamic table (keys, rows, counters, recency,
//! sighting counts, change log) and its optimizer's whole state in one
//! safetensors file, written atomically and read back bit for bit.
//!
//! # Format (version 1)
//!
//! A safetensors file (see [`io::checkpoint`](crate::io::checkpoint)) with
//! these tensors, all prefixed `dynamic.`:
//!
//! | tensor | dtype | shape | holds |
//! |---|---|---|---|
//! | `weight` | `F32` | `[rows, dim]` | the storage; row 0 is the default row |
//! | `rows` | `U64` | `[rows, 4]` | per row: key, uses since admitted (0: free), last call, last step |
//! | `free` | `U32` | `[n]` | the free rows, the next to be taken last |
//! | `order` | `U32` | `[keys]` | the rows with a key, first to be evicted first (LFU: in row order) |
//! | `pending` | `U64` | `[p, 3]` | keys counted for admission: key, sightings, last call; least recently seen first |
//! | `changed` | `U32` | `[c]` | with `track_changes`: rows changed since the last export |
//! | `evicted` | `U64` | `[e]` | with `track_changes`: keys evicted since the last export |
//! | `evicted_values` | `F32` | `[e, dim]` | their values |
//! | `optim.{array}`, `optim.last_step` | | | the optimizer's state, as in a [`Checkpoint`](crate::io::Checkpoint) |
//!
//! and this metadata: `embtable.format` = `embtable-dynamic-checkpoint`,
//! `embtable.version` = `1`; `dynamic.config` (e.g.
//! `dim=16,init=uniform:-0.05:0.05,seed=42,admission=after_sightings:2,eviction=lru,capacity=rows:1000,track_changes=0`;
//! `init` is `uniform:low:high`, `normal:mean:std`,
//! `truncated_normal:mean:std`, `zeros` or `constant:c`; `admission` is
//! `always`, `after_sightings:n`, `probability:p:seed` or `read_only`;
//! `eviction` is `lru`, `lfu` or `ttl:steps`; `capacity` is `unbounded`,
//! `rows:n` or `bytes:n`), `dynamic.clock` (`step=S,call=C`),
//! `dynamic.stats` (`lookups=…,admitted=…,evicted=…,expired=…,refused=…,grown=…`),
//! `dynamic.state_bytes` (optimizer bytes per row counted in a byte
//! capacity), and for a layer the optimizer's `dynamic.optim.*` keys as a
//! checkpoint writes them and `dynamic.max_norm` (`none` or the bound).
//!
//! Loading checks everything a file could get wrong (shapes, dtypes, a key
//! held by two rows, a row both free and held, counters from the future, a
//! capacity the rows exceed) and gives [`Error::Format`] naming the
//! tensor or key; the optimizer state is checked by
//! [`SparseOptimizer::load_state`].

use std::collections::BTreeSet;
use std::path::Path;

use safetensors::Dtype;

use super::admission::{Admission, Pending, Sighting};
use super::changes::ChangeLog;
use super::eviction::{Eviction, Order, RowMeta};
use super::keymap::KeyMap;
use super::table::{DEFAULT_ROW, row_limit};
use super::{Capacity, DynamicConfig, DynamicEmbedding, DynamicTable, Stats};
use crate::io::checkpoint::{check_state, plan_state};
use crate::io::safetensors::{
    Data, Parsed, Plan, Tensor, bad, check_dtype, matrix_shape, table_from_bytes,
};
use crate::io::{read_error, write_atomic};
use crate::optim::{OptimizerState, SparseOptimizer};
use crate::{Error, Init, Result};

const FORMAT: &str = "embtable-dynamic-checkpoint";
const VERSION: &str = "1";
const NAME: &str = "dynamic";
/// The most a saved counter (clock, statistics, uses of a row) may hold,
/// as for the optimizers' step counters: so far below `u64::MAX` that
/// counting on from it cannot overflow.
const MAX_COUNT: u64 = i64::MAX as u64;

impl DynamicTable {
    /// Writes the table (without optimizer state) to `path` atomically;
    /// [`load`](Self::load) gives it back bit for bit.
    ///
    /// # Errors
    /// [`Error::Io`] if writing fails; `path` is unchanged then.
    ///
    /// # Examples
    /// ```
    /// use embtable::dynamic::{DynamicConfig, DynamicTable};
    /// use embtable::Frozen;
    /// let mut table = DynamicTable::new(4, DynamicConfig::default())?;
    /// table.translate(&[3u64, 1 << 40], &mut Frozen)?;
    /// let path = std::env::temp_dir().join("embtable-doc-dynamic-table.safetensors");
    /// table.save(&path)?;
    /// let loaded = DynamicTable::load(&path)?;
    /// assert_eq!(loaded.get(1u64 << 40), table.get(1u64 << 40));
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save(self, None, path.as_ref())
    }

    /// Reads a table written by [`save`](Self::save) (or by
    /// [`DynamicEmbedding::save`], leaving out the optimizer state).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`Error::Format`] (line 0)
    /// naming what is wrong with it; [`Error::Alloc`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        load(path.as_ref()).map(|(table, _)| table)
    }
}

impl<O: SparseOptimizer> DynamicEmbedding<O> {
    /// Writes the layer to `path` atomically: the table (keys, rows,
    /// counters, recency, sighting counts, change log) and the whole
    /// optimizer state. [`load`](Self::load) gives it back; training then
    /// resumes bit for bit.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `grad`) if a gradient is pending
    /// ([`step`](Self::step) or [`clear_grad`](Self::clear_grad) first);
    /// [`Error::ShapeMismatch`] if the optimizer's state is not the
    /// table's shape; [`Error::Io`]. `path` is unchanged on error.
    ///
    /// # Examples
    /// ```
    /// use embtable::dynamic::{DynamicConfig, DynamicEmbedding, DynamicTable};
    /// use embtable::Adagrad;
    /// let mut layer = DynamicEmbedding::new(DynamicTable::new(4, DynamicConfig::default())?, Adagrad::default())?;
    /// let out = layer.forward(&[7u64, 9])?;
    /// layer.backward(&[7u64, 9], &vec![0.5; out.len()])?;
    /// layer.step()?;
    /// let path = std::env::temp_dir().join("embtable-doc-dynamic-layer.safetensors");
    /// layer.save(&path)?;
    /// let mut resumed = DynamicEmbedding::load(&path, Adagrad::default())?;
    /// assert_eq!(resumed.forward(&[9u64, 7])?, layer.forward(&[9u64, 7])?);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        if !self.grad().is_empty() {
            return Err(Error::InvalidConfig {
                field: "grad",
                reason: format!(
                    "a gradient for {} is pending, which a checkpoint would lose; call step() \
                     or clear_grad() first",
                    crate::error::count(self.grad().len(), "row")
                ),
            });
        }
        let state = self.optimizer().state();
        check_state(&state, self.table().weights())?;
        save(self.table(), Some((&state, self.max_norm())), path.as_ref())
    }

    /// Reads a layer written by [`save`](Self::save), loading the saved
    /// optimizer state (config included) into `optimizer`, which must be
    /// of the saved kind.
    ///
    /// # Errors
    /// As [`DynamicTable::load`]; the errors of
    /// [`SparseOptimizer::load_state`] (field `kind` for another kind of
    /// optimizer); [`Error::InvalidConfig`] (field `optimizer`) for a file
    /// saved without optimizer state.
    pub fn load(path: impl AsRef<Path>, mut optimizer: O) -> Result<Self> {
        let (table, state) = load(path.as_ref())?;
        let Some((state, max_norm)) = state else {
            return Err(Error::InvalidConfig {
                field: "optimizer",
                reason: "the file holds a table saved without optimizer state; use \
                         DynamicTable::load and DynamicEmbedding::new"
                    .into(),
            });
        };
        optimizer.load_state(state)?;
        let mut layer = Self::new(table, optimizer)?;
        layer.set_max_norm(max_norm)?;
        Ok(layer)
    }
}

/// A layer's optimizer state and `max_norm`.
type LayerState<T> = (T, Option<f32>);

fn save(
    table: &DynamicTable,
    layer: Option<LayerState<&OptimizerState>>,
    path: &Path,
) -> Result<()> {
    let dim = table.dim();
    let rows: Vec<u64> = table
        .meta
        .iter()
        .flat_map(|m| [m.key, m.count, m.call, m.step])
        .collect();
    let order = table.order.live_rows(&table.meta);
    let pending: Vec<u64> = table
        .pending
        .in_order()
        .into_iter()
        .flat_map(|(key, s)| [key, u64::from(s.count), s.call])
        .collect();
    let key = |k: &str| format!("{NAME}.{k}");
    let mut tensors = vec![
        Tensor {
            name: key("weight"),
            shape: vec![table.weights.rows(), dim],
            data: Data::Table(&table.weights),
        },
        Tensor {
            name: key("rows"),
            shape: vec![table.meta.len(), 4],
            data: Data::U64(&rows),
        },
        Tensor {
            name: key("free"),
            shape: vec![table.free.len()],
            data: Data::U32(&table.free),
        },
        Tensor {
            name: key("order"),
            shape: vec![order.len()],
            data: Data::U32(&order),
        },
        Tensor {
            name: key("pending"),
            shape: vec![pending.len() / 3, 3],
            data: Data::U64(&pending),
        },
    ];
    if let Some(log) = &table.changes {
        tensors.push(Tensor {
            name: key("changed"),
            shape: vec![log.rows.len()],
            data: Data::U32(&log.rows),
        });
        tensors.push(Tensor {
            name: key("evicted"),
            shape: vec![log.evicted_keys.len()],
            data: Data::U64(&log.evicted_keys),
        });
        tensors.push(Tensor {
            name: key("evicted_values"),
            shape: vec![log.evicted_keys.len(), dim],
            data: Data::F32(&log.evicted_values),
        });
    }
    let s = table.stats;
    let mut metadata = vec![
        ("embtable.format".to_owned(), FORMAT.to_owned()),
        ("embtable.version".to_owned(), VERSION.to_owned()),
        (key("config"), encode_config(&table.config, dim)),
        (
            key("clock"),
            format!("step={},call={}", table.step, table.call),
        ),
        (
            key("stats"),
            format!(
                "lookups={},admitted={},evicted={},expired={},refused={},grown={}",
                s.lookups, s.admitted, s.evicted, s.expired, s.refused, s.grown
            ),
        ),
        (key("state_bytes"), table.state_bytes.to_string()),
    ];
    if let Some((state, max_norm)) = layer {
        plan_state(NAME, state, &mut metadata, &mut tensors);
        let max_norm = max_norm.map_or("none".to_owned(), |m| format!("{m:?}"));
        metadata.push((key("max_norm"), max_norm));
    }
    let plan = Plan::new(Some(metadata), tensors)?;
    write_atomic(path, |out| plan.write(out))
}

fn load(path: &Path) -> Result<(DynamicTable, Option<LayerState<OptimizerState>>)> {
    let bytes = std::fs::read(path).map_err(|e| read_error(path, e))?;
    let file = Parsed::parse(&bytes)?;
    match file.meta("embtable.format") {
        Some(FORMAT) => {}
        other => {
            return Err(bad(format!(
                "not an embtable dynamic checkpoint: embtable.format is {other:?}, not {FORMAT:?}"
            )));
        }
    }
    let version = file.require("embtable.version")?;
    if version != VERSION {
        return Err(bad(format!(
            "dynamic checkpoint version {version:?} is not supported; this embtable reads {VERSION}"
        )));
    }
    let mut used = BTreeSet::new();
    let mut reader = Reader {
        file: &file,
        used: &mut used,
    };
    let config_key = format!("{NAME}.config");
    let (config, dim) = decode_config(file.require(&config_key)?)
        .ok_or_else(|| bad(format!("{config_key} is not a valid dynamic table config")))?;
    let (weights_info, weights_data) = reader.tensor("weight")?;
    let weight_name = format!("{NAME}.weight");
    let (rows, saved_dim) = matrix_shape(&weight_name, &weights_info.shape)?;
    if saved_dim != dim {
        return Err(bad(format!(
            "{weight_name} has {saved_dim} columns; {config_key} says {dim}"
        )));
    }
    check_dtype(&weight_name, weights_info, Dtype::F32)?;
    let weights = table_from_bytes(&weight_name, rows, dim, weights_data, 4, |b| {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    })?;
    let (step, call) = decode_pair(file.require(&format!("{NAME}.clock"))?, "step", "call")
        .ok_or_else(|| bad(format!("{NAME}.clock is not step=S,call=C")))?;
    let stats = decode_stats(file.require(&format!("{NAME}.stats"))?)
        .ok_or_else(|| bad(format!("{NAME}.stats is malformed")))?;
    // Counters the next call adds to: one at their limit would overflow.
    let Stats {
        lookups,
        admitted,
        evicted,
        expired,
        refused,
        grown,
    } = stats;
    let counters = [
        step, call, lookups, admitted, evicted, expired, refused, grown,
    ];
    if let Some(&count) = counters.iter().find(|&&c| c > MAX_COUNT) {
        return Err(bad(format!(
            "{NAME}.clock or {NAME}.stats holds {count}, above the limit {MAX_COUNT}"
        )));
    }
    let state_bytes_key = format!("{NAME}.state_bytes");
    let state_bytes: usize = file
        .require(&state_bytes_key)?
        .parse()
        .map_err(|_| bad(format!("{state_bytes_key} is not a byte count")))?;

    // Rows and their bookkeeping.
    let meta_values = reader.u64s("rows", &[rows, 4])?;
    let meta: Vec<RowMeta> = meta_values
        .chunks_exact(4)
        .map(|m| RowMeta {
            key: m[0],
            count: m[1],
            call: m[2],
            step: m[3],
        })
        .collect();
    if meta[DEFAULT_ROW as usize].occupied() {
        return Err(bad(format!(
            "{NAME}.rows: row 0 is the default row, not a key's"
        )));
    }
    if let Some(r) = meta.iter().position(|m| m.count > MAX_COUNT) {
        return Err(bad(format!(
            "{NAME}.rows: row {r} was used {} times, above the limit {MAX_COUNT}",
            meta[r].count
        )));
    }
    if let Some(r) = meta.iter().position(|m| m.call > call || m.step > step) {
        return Err(bad(format!(
            "{NAME}.rows: row {r} was last used in call {} of step {}, after the clock's \
             call {call} of step {step}",
            meta[r].call, meta[r].step
        )));
    }
    let keys = meta.iter().filter(|m| m.occupied()).count();
    let limit = row_limit(&config, dim, state_bytes).map_err(|e| bad(e.to_string()))?;
    if keys > limit || rows > limit + 1 {
        return Err(bad(format!(
            "{NAME}.rows: {rows} rows holding {keys} keys, beyond the capacity of {limit} keys"
        )));
    }
    let mut map = KeyMap::default();
    map.reserve(keys)?;
    for (r, m) in meta.iter().enumerate().filter(|(_, m)| m.occupied()) {
        if map.get(m.key).is_some() {
            return Err(bad(format!(
                "{NAME}.rows: key {} is held by two rows",
                m.key
            )));
        }
        map.insert(m.key, r as u32);
    }
    let free = reader.u32s("free", None)?;
    let mut seen = vec![false; rows];
    seen[DEFAULT_ROW as usize] = true;
    for &r in &free {
        let r = r as usize;
        if r >= rows || seen[r] || meta[r].occupied() {
            return Err(bad(format!(
                "{NAME}.free: row {r} is not a free row of the {rows}, or is listed twice"
            )));
        }
        seen[r] = true;
    }
    if free.len() + keys + 1 != rows {
        return Err(bad(format!(
            "{NAME}.free lists {} rows; {rows} rows less the default row and {keys} keys' \
             leave {}",
            free.len(),
            rows - 1 - keys
        )));
    }
    let order_rows = reader.u32s("order", Some(keys))?;
    let mut in_order = vec![false; rows];
    for &r in &order_rows {
        let r = r as usize;
        if r >= rows || !meta[r].occupied() || in_order[r] {
            return Err(bad(format!(
                "{NAME}.order: row {r} holds no key, or is listed twice"
            )));
        }
        in_order[r] = true;
    }
    let order = Order::from_rows(config.eviction, &order_rows, &meta);

    // Sighting counts.
    let pending_values = reader.u64s("pending", &[usize::MAX, 3])?;
    let mut pending_keys = BTreeSet::new();
    let mut sightings = Vec::with_capacity(pending_values.len() / 3);
    for p in pending_values.chunks_exact(3) {
        let (key, count, last) = (p[0], p[1], p[2]);
        if count == 0 || count > u64::from(u32::MAX) || last > call {
            return Err(bad(format!(
                "{NAME}.pending: key {key} has {count} sightings, the last in call {last}"
            )));
        }
        if map.get(key).is_some() || !pending_keys.insert(key) {
            return Err(bad(format!(
                "{NAME}.pending: key {key} has a row, or is listed twice"
            )));
        }
        sightings.push((
            key,
            Sighting {
                count: count as u32,
                call: last,
            },
        ));
    }
    if sightings.len() > limit
        || (!sightings.is_empty() && !matches!(config.admission, Admission::AfterSightings(_)))
    {
        return Err(bad(format!(
            "{NAME}.pending: {} keys counted, for admission {:?} and a capacity of {limit}",
            sightings.len(),
            config.admission
        )));
    }
    let pending = Pending::from_order(sightings);

    // The change log.
    let changes = if config.track_changes {
        let changed = reader.u32s("changed", None)?;
        let mut log = ChangeLog::default();
        log.reserve_rows(rows)?;
        log.listed.resize(rows, false);
        for &r in &changed {
            if r as usize >= rows || log.listed[r as usize] {
                return Err(bad(format!(
                    "{NAME}.changed: row {r} is not one of the {rows}, or is listed twice"
                )));
            }
            log.mark([r as usize]);
        }
        log.evicted_keys = reader.u64s("evicted", &[usize::MAX])?;
        let values = reader.tensor("evicted_values")?;
        let name = format!("{NAME}.evicted_values");
        check_dtype(&name, values.0, Dtype::F32)?;
        if values.0.shape != [log.evicted_keys.len(), dim] {
            return Err(bad(format!(
                "{name} has shape {:?}; expected [{}, {dim}]",
                values.0.shape,
                log.evicted_keys.len()
            )));
        }
        log.evicted_values = values
            .1
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Some(log)
    } else {
        None
    };

    let state = match file.meta(&format!("{NAME}.optim.kind")) {
        Some(kind) => {
            let state = file.state(NAME, kind, &weights, reader.used)?;
            let key = format!("{NAME}.max_norm");
            let max_norm = match file.require(&key)? {
                "none" => None,
                text => Some(
                    text.parse::<f32>()
                        .ok()
                        .filter(|m| m.is_finite() && *m > 0.0)
                        .ok_or_else(|| bad(format!("{key} is {text:?}, not none or a norm")))?,
                ),
            };
            Some((state, max_norm))
        }
        None => None,
    };
    let mut unknown: Vec<String> = file
        .tensor_names()
        .into_iter()
        .filter(|t| !used.contains(t))
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        unknown.truncate(10);
        return Err(bad(format!("unexpected tensors {unknown:?}")));
    }
    let default = weights.row(DEFAULT_ROW as usize).to_vec();
    let mut table = DynamicTable::new(dim, config).map_err(|e| bad(e.to_string()))?;
    table.weights = weights;
    table.default = default;
    table.map = map;
    table.meta = meta;
    table.free = free;
    table.order = order;
    table.pending = pending;
    table.step = step;
    table.call = call;
    table.limit = limit;
    table.state_bytes = state_bytes;
    table.stats = stats;
    table.changes = changes;
    Ok((table, state))
}

/// Reads the tensors of a dynamic checkpoint, noting which were read.
struct Reader<'f, 'b> {
    file: &'f Parsed<'b>,
    used: &'f mut BTreeSet<String>,
}

impl<'b> Reader<'_, 'b> {
    fn tensor(&mut self, name: &str) -> Result<(&safetensors::tensor::TensorInfo, &'b [u8])> {
        let full = format!("{NAME}.{name}");
        let found = self.file.get(&full)?;
        self.used.insert(full);
        Ok(found)
    }

    /// A `U64` tensor of `shape` (`usize::MAX` for any length).
    fn u64s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u64>> {
        let (info, data) = self.tensor(name)?;
        let full = format!("{NAME}.{name}");
        check_dtype(&full, info, Dtype::U64)?;
        let fits = info.shape.len() == shape.len()
            && info
                .shape
                .iter()
                .zip(shape)
                .all(|(&got, &want)| want == usize::MAX || got == want);
        if !fits {
            return Err(bad(format!(
                "tensor {full:?} has shape {:?}; expected {shape:?} (MAX: any)",
                info.shape
            )));
        }
        Ok(data
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect())
    }

    /// A 1-D `U32` tensor, of `len` values if given.
    fn u32s(&mut self, name: &str, len: Option<usize>) -> Result<Vec<u32>> {
        let (info, data) = self.tensor(name)?;
        let full = format!("{NAME}.{name}");
        check_dtype(&full, info, Dtype::U32)?;
        match (&info.shape[..], len) {
            (&[n], Some(want)) if n != want => Err(bad(format!(
                "tensor {full:?} holds {n} rows; expected {want}"
            ))),
            ([_], _) => Ok(data
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            (shape, _) => Err(bad(format!(
                "tensor {full:?} has shape {shape:?}; expected [n]"
            ))),
        }
    }
}

fn encode_config(c: &DynamicConfig, dim: usize) -> String {
    let init = match c.init {
        Init::Uniform { low, high } => format!("uniform:{low:?}:{high:?}"),
        Init::Normal { mean, std } => format!("normal:{mean:?}:{std:?}"),
        Init::TruncatedNormal { mean, std } => format!("truncated_normal:{mean:?}:{std:?}"),
        Init::Zeros => "zeros".to_owned(),
        Init::Constant(v) => format!("constant:{v:?}"),
    };
    let admission = match c.admission {
        Admission::Always => "always".to_owned(),
        Admission::AfterSightings(n) => format!("after_sightings:{n}"),
        Admission::Probability { p, seed } => format!("probability:{p:?}:{seed}"),
        Admission::ReadOnly => "read_only".to_owned(),
    };
    let eviction = match c.eviction {
        Eviction::Lru => "lru".to_owned(),
        Eviction::Lfu => "lfu".to_owned(),
        Eviction::Ttl { steps } => format!("ttl:{steps}"),
    };
    let capacity = match c.capacity {
        Capacity::Unbounded => "unbounded".to_owned(),
        Capacity::Rows(n) => format!("rows:{n}"),
        Capacity::Bytes(n) => format!("bytes:{n}"),
    };
    format!(
        "dim={dim},init={init},seed={},admission={admission},eviction={eviction},\
         capacity={capacity},track_changes={}",
        c.seed, c.track_changes as u8
    )
}

/// The config and dim back from [`encode_config`]'s text.
fn decode_config(text: &str) -> Option<(DynamicConfig, usize)> {
    let mut config = DynamicConfig::default();
    let mut dim = None;
    let mut fields = 0;
    for pair in text.split(',') {
        let (field, value) = pair.split_once('=')?;
        let parts: Vec<&str> = value.split(':').collect();
        let f32s = |i: usize| parts.get(i)?.parse::<f32>().ok();
        match (field, parts.as_slice()) {
            ("dim", [n]) => dim = Some(n.parse().ok()?),
            ("init", ["uniform", ..]) => {
                config.init = Init::Uniform {
                    low: f32s(1)?,
                    high: f32s(2)?,
                }
            }
            ("init", ["normal", ..]) => {
                config.init = Init::Normal {
                    mean: f32s(1)?,
                    std: f32s(2)?,
                }
            }
            ("init", ["truncated_normal", ..]) => {
                config.init = Init::TruncatedNormal {
                    mean: f32s(1)?,
                    std: f32s(2)?,
                }
            }
            ("init", ["zeros"]) => config.init = Init::Zeros,
            ("init", ["constant", v]) => config.init = Init::Constant(v.parse().ok()?),
            ("seed", [n]) => config.seed = n.parse().ok()?,
            ("admission", ["always"]) => config.admission = Admission::Always,
            ("admission", ["after_sightings", n]) => {
                config.admission = Admission::AfterSightings(n.parse().ok()?)
            }
            ("admission", ["probability", p, seed]) => {
                config.admission = Admission::Probability {
                    p: p.parse().ok()?,
                    seed: seed.parse().ok()?,
                }
            }
            ("admission", ["read_only"]) => config.admission = Admission::ReadOnly,
            ("eviction", ["lru"]) => config.eviction = Eviction::Lru,
            ("eviction", ["lfu"]) => config.eviction = Eviction::Lfu,
            ("eviction", ["ttl", n]) => {
                config.eviction = Eviction::Ttl {
                    steps: n.parse().ok()?,
                }
            }
            ("capacity", ["unbounded"]) => config.capacity = Capacity::Unbounded,
            ("capacity", ["rows", n]) => config.capacity = Capacity::Rows(n.parse().ok()?),
            ("capacity", ["bytes", n]) => config.capacity = Capacity::Bytes(n.parse().ok()?),
            ("track_changes", ["0"]) => config.track_changes = false,
            ("track_changes", ["1"]) => config.track_changes = true,
            _ => return None,
        }
        fields += 1;
    }
    (fields == 7).then_some((config, dim?))
}

/// `a=X,b=Y` as `(X, Y)`.
fn decode_pair(text: &str, a: &str, b: &str) -> Option<(u64, u64)> {
    let (first, second) = text.split_once(',')?;
    Some((
        first.strip_prefix(a)?.strip_prefix('=')?.parse().ok()?,
        second.strip_prefix(b)?.strip_prefix('=')?.parse().ok()?,
    ))
}

fn decode_stats(text: &str) -> Option<Stats> {
    let names = [
        "lookups", "admitted", "evicted", "expired", "refused", "grown",
    ];
    let values: Vec<u64> = text
        .split(',')
        .zip(names)
        .map(|(pair, name)| pair.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        .collect::<Option<_>>()?;
    let [lookups, admitted, evicted, expired, refused, grown] = values.try_into().ok()?;
    (text.split(',').count() == names.len()).then_some(Stats {
        lookups,
        admitted,
        evicted,
        expired,
        refused,
        grown,
    })
}
