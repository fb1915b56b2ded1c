//! What changed since the last export: for a serving store that mirrors
//! the table (see [`DynamicTable::export_changes`](super::DynamicTable::export_changes)).

use crate::{Error, Result};

/// Rows changed and keys evicted since the last export.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ChangeLog {
    /// Rows changed since the last export, in the order of their first
    /// change; a row may since have been freed or given to another key.
    pub(crate) rows: Vec<u32>,
    /// Per row of the storage: whether it is in `rows`.
    pub(crate) listed: Vec<bool>,
    /// Keys evicted (or expired) since the last export, in order, with
    /// their rows' values at that moment.
    pub(crate) evicted_keys: Vec<u64>,
    pub(crate) evicted_values: Vec<f32>,
}

impl ChangeLog {
    /// Makes room to track `rows` rows of storage.
    pub(crate) fn reserve_rows(&mut self, rows: usize) -> Result<()> {
        let more = rows.saturating_sub(self.listed.len());
        self.listed
            .try_reserve_exact(more)
            .map_err(|_| Error::Alloc {
                what: "dynamic table change log",
                bytes: more,
            })?;
        self.rows.try_reserve_exact(more).map_err(|_| Error::Alloc {
            what: "dynamic table change log",
            bytes: more.saturating_mul(4),
        })
    }

    /// Records that `rows` changed.
    pub(crate) fn mark(&mut self, rows: impl IntoIterator<Item = usize>) {
        for r in rows {
            if r >= self.listed.len() {
                self.listed.resize(r + 1, false);
            }
            if !self.listed[r] {
                self.listed[r] = true;
                self.rows.push(r as u32);
            }
        }
    }

    /// Records that `key` lost its row, which held `values`.
    pub(crate) fn evicted(&mut self, key: u64, values: &[f32]) {
        self.evicted_keys.push(key);
        self.evicted_values.extend_from_slice(values);
    }

    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.rows.capacity() * size_of::<u32>()
            + self.listed.capacity()
            + self.evicted_keys.capacity() * size_of::<u64>()
            + self.evicted_values.capacity() * size_of::<f32>()
    }
}

/// What a serving store needs to mirror a dynamic table since the last
/// export: apply `evicted` first (delete those keys), then `updated`
/// (insert or overwrite). A key evicted and admitted again in between is
/// in both, with its new row in `updated`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// Keys whose row was created or changed, in the order of their first
    /// change.
    pub updated: Vec<u64>,
    /// Their rows, `updated.len() * dim` floats, row-major.
    pub updated_values: Vec<f32>,
    /// Keys that lost their row (evicted, or expired under a TTL), in order.
    pub evicted: Vec<u64>,
    /// The values their rows held then, `evicted.len() * dim` floats.
    pub evicted_values: Vec<f32>,
}

impl super::DynamicTable {
    /// The rows created or changed (with their keys and values) and the
    /// keys evicted since the last export, for a serving store that
    /// mirrors the table; the next export starts from here. Rows are
    /// exported as stored: under `DenseExact`, a
    /// [`DynamicEmbedding`](super::DynamicEmbedding)'s
    /// [`export_changes`](super::DynamicEmbedding::export_changes) brings
    /// them current first.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `track_changes`) if the table was
    /// built without [`DynamicConfig::track_changes`](super::DynamicConfig::track_changes).
    ///
    /// # Examples
    /// ```
    /// use embtable::dynamic::{DynamicConfig, DynamicTable};
    /// use embtable::Frozen;
    /// let mut table = DynamicTable::new(2, DynamicConfig { track_changes: true, ..Default::default() })?;
    /// table.translate(&[7u64, 8, 7], &mut Frozen)?;
    /// let changes = table.export_changes()?;
    /// assert_eq!(changes.updated, [7, 8]);
    /// assert_eq!(&changes.updated_values[..2], table.get(7u64).unwrap());
    /// assert!(table.export_changes()?.updated.is_empty()); // nothing new since
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn export_changes(&mut self) -> Result<Changes> {
        let Some(log) = &mut self.changes else {
            return Err(Error::InvalidConfig {
                field: "track_changes",
                reason: "false: the table keeps no change log to export; build it with \
                         track_changes: true"
                    .into(),
            });
        };
        let mut changes = Changes::default();
        for &r in &log.rows {
            let r = r as usize;
            log.listed[r] = false;
            let m = self.meta[r];
            if m.occupied() {
                changes.updated.push(m.key);
                changes
                    .updated_values
                    .extend_from_slice(self.weights.row(r));
            }
        }
        log.rows.clear();
        changes.evicted = std::mem::take(&mut log.evicted_keys);
        changes.evicted_values = std::mem::take(&mut log.evicted_values);
        Ok(changes)
    }
}
