//! Which rank owns which row: the row-wise split of a table over ranks.

use crate::{Error, Result};

/// How the rows of a sharded table are split over the ranks.
///
/// Both are TorchRec's row-wise sharding in spirit: every rank holds whole
/// rows (all `dim` columns) and their optimizer state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Sharding {
    /// Contiguous blocks: rank `k` of `world` holds rows
    /// `k * rows / world .. (k + 1) * rows / world` (rounded down), so the
    /// blocks differ by at most one row. Keeps ids that are close together
    /// (a vocabulary sorted by frequency, a range of items) on one rank.
    #[default]
    Range,
    /// Round robin: rank `k` holds the rows `r` with `r % world == k`, as
    /// local row `r / world`. Spreads the hot low ids of a frequency-sorted
    /// vocabulary over every rank.
    Modulo,
}

impl Sharding {
    /// The name a checkpoint stores: `"range"` or `"modulo"`.
    pub fn name(self) -> &'static str {
        match self {
            Sharding::Range => "range",
            Sharding::Modulo => "modulo",
        }
    }

    /// The sharding a checkpoint names, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "range" => Some(Sharding::Range),
            "modulo" => Some(Sharding::Modulo),
            _ => None,
        }
    }
}

/// A table of `rows × dim` split over `world` ranks by a [`Sharding`]:
/// which rank owns a row, and where the row sits in that rank's shard.
///
/// Pure arithmetic, without MPI: the sharded table, its checkpoints and a
/// single process that loads them all use it.
///
/// # Examples
/// ```
/// use embtable::shard::{ShardLayout, Sharding};
/// let range = ShardLayout::new(10, 4, 3, Sharding::Range)?;
/// assert_eq!([range.shard_rows(0), range.shard_rows(1), range.shard_rows(2)], [3, 3, 4]);
/// assert_eq!(range.locate(4), (1, 1)); // rank 1 holds rows 3..6
/// let modulo = ShardLayout::new(10, 4, 3, Sharding::Modulo)?;
/// assert_eq!(modulo.locate(4), (1, 1)); // 4 % 3 == 1, 4 / 3 == 1
/// assert_eq!(modulo.global(2, 2), 8); // local row 2 of rank 2: 2 * 3 + 2
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    rows: usize,
    dim: usize,
    world: usize,
    sharding: Sharding,
    /// `(rows + 1) * world` fits a `u64`, so `locate` divides in 64 bits.
    narrow: bool,
}

impl ShardLayout {
    /// The layout of a `rows × dim` table over `world` ranks.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `world` or `dim` is zero, or `rows` is
    /// below `world` (every rank must hold at least one row).
    pub fn new(rows: usize, dim: usize, world: usize, sharding: Sharding) -> Result<Self> {
        if world == 0 {
            return Err(Error::InvalidConfig {
                field: "world",
                reason: "a sharded table needs at least one rank (got 0)".into(),
            });
        }
        if dim == 0 {
            return Err(Error::InvalidConfig {
                field: "dim",
                reason: "a table needs at least one column".into(),
            });
        }
        if rows < world {
            return Err(Error::InvalidConfig {
                field: "rows",
                reason: format!(
                    "{rows} rows cannot be split over {world} ranks: every rank needs at least one row"
                ),
            });
        }
        let narrow = (rows as u128 + 1) * (world as u128) <= u64::MAX as u128;
        Ok(Self {
            rows,
            dim,
            world,
            sharding,
            narrow,
        })
    }

    /// Rows of the whole table.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of every row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Ranks the table is split over.
    pub fn world(&self) -> usize {
        self.world
    }

    /// How the rows are split.
    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// The first row of rank `k`'s block under [`Sharding::Range`]
    /// (`rows` for `k == world`).
    fn start(&self, k: usize) -> usize {
        (k as u128 * self.rows as u128 / self.world as u128) as usize
    }

    /// Rows held by rank `rank`.
    ///
    /// # Panics
    /// If `rank >= world()`.
    #[track_caller]
    pub fn shard_rows(&self, rank: usize) -> usize {
        assert!(
            rank < self.world,
            "rank {rank} out of range for a world of {}",
            self.world
        );
        match self.sharding {
            Sharding::Range => self.start(rank + 1) - self.start(rank),
            Sharding::Modulo => self.rows / self.world + usize::from(rank < self.rows % self.world),
        }
    }

    /// `(rank, local row)` of global row `row`: the rank that holds it and
    /// its index in that rank's shard.
    ///
    /// # Panics
    /// If `row >= rows()` (in debug builds; the result is meaningless then).
    #[inline]
    pub fn locate(&self, row: usize) -> (usize, usize) {
        debug_assert!(
            row < self.rows,
            "row {row} out of range for {} rows",
            self.rows
        );
        match self.sharding {
            Sharding::Modulo => (row % self.world, row / self.world),
            Sharding::Range => {
                // start(k) <= row  <=>  k * rows < (row + 1) * world, so the
                // owner is the largest such k: ((row + 1) * world - 1) / rows.
                let rank = if self.narrow {
                    (((row as u64 + 1) * self.world as u64 - 1) / self.rows as u64) as usize
                } else {
                    (((row as u128 + 1) * self.world as u128 - 1) / self.rows as u128) as usize
                };
                (rank, row - self.start(rank))
            }
        }
    }

    /// The global row of local row `local` of rank `rank`.
    ///
    /// # Panics
    /// If `rank >= world()` or `local >= shard_rows(rank)`.
    #[track_caller]
    pub fn global(&self, rank: usize, local: usize) -> usize {
        let held = self.shard_rows(rank);
        assert!(
            local < held,
            "local row {local} out of range for rank {rank}'s {held} rows"
        );
        match self.sharding {
            Sharding::Range => self.start(rank) + local,
            Sharding::Modulo => local * self.world + rank,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `locate` and `global` are inverse bijections, and every rank's rows
    /// are what the docs say, for every small shape.
    #[test]
    fn locate_and_global_agree_with_the_definitions() {
        for sharding in [Sharding::Range, Sharding::Modulo] {
            for world in 1..=7 {
                for rows in world..=40 {
                    let layout = ShardLayout::new(rows, 3, world, sharding).unwrap();
                    let mut seen = vec![0usize; world];
                    for row in 0..rows {
                        let (rank, local) = layout.locate(row);
                        let expected_rank = match sharding {
                            Sharding::Range => (0..world)
                                .find(|&k| {
                                    (k * rows / world..(k + 1) * rows / world).contains(&row)
                                })
                                .unwrap(),
                            Sharding::Modulo => row % world,
                        };
                        assert_eq!(
                            rank, expected_rank,
                            "{sharding:?} rows {rows} world {world} row {row}"
                        );
                        assert_eq!(local, seen[rank], "rows of a rank are in increasing order");
                        seen[rank] += 1;
                        assert_eq!(layout.global(rank, local), row);
                    }
                    for (rank, &n) in seen.iter().enumerate() {
                        assert_eq!(layout.shard_rows(rank), n);
                        assert!(n >= 1);
                    }
                }
            }
        }
    }

    #[test]
    fn wide_tables_locate_without_overflow() {
        let rows = usize::MAX / 2;
        let layout = ShardLayout::new(rows, 1, 3, Sharding::Range).unwrap();
        for row in [0, rows / 3, rows / 3 + 1, rows - 1] {
            let (rank, local) = layout.locate(row);
            assert_eq!(layout.global(rank, local), row);
        }
    }

    #[test]
    fn bad_layouts_are_refused_naming_the_value() {
        let err = ShardLayout::new(2, 4, 3, Sharding::Range).unwrap_err();
        assert!(
            err.to_string()
                .contains("2 rows cannot be split over 3 ranks"),
            "{err}"
        );
        assert!(ShardLayout::new(2, 4, 0, Sharding::Range).is_err());
        assert!(ShardLayout::new(2, 0, 1, Sharding::Modulo).is_err());
        assert_eq!(
            Sharding::from_name(Sharding::Modulo.name()),
            Some(Sharding::Modulo)
        );
        assert_eq!(Sharding::from_name("rows"), None);
    }
}
