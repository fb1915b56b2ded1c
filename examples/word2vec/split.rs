//! A table whose rows are split by owner: row `w` lives in part `w mod n`
//! at row `w / n`, each part an [`EmbeddingTable`] of its own, so that `n`
//! threads can step the parts at the same time, each with its own
//! optimizer, without sharing a row. Interleaving the ids balances the
//! parts: the corpus numbers words by frequency, so every part gets as
//! many frequent words as the others.
//!
//! A sparse optimizer updates each row from that row's gradient and state
//! alone, so stepping the parts gives the same vectors as stepping the
//! whole table: the split is invisible in the results.

use embtable::{EmbeddingTable, Result};

/// A table split row by row over `parts().len()` parts.
#[derive(Clone, Debug)]
pub struct SplitTable {
    parts: Vec<EmbeddingTable>,
}

impl SplitTable {
    /// `table`'s rows dealt over `parts` parts (at least one, at most one
    /// a row: a table has rows).
    ///
    /// # Errors
    /// As [`EmbeddingTable::zeros`] (memory).
    pub fn new(table: EmbeddingTable, parts: usize) -> Result<Self> {
        let n = parts.clamp(1, table.rows().max(1));
        let parts = (0..n)
            .map(|p| {
                let mut part = EmbeddingTable::zeros((table.rows() - p).div_ceil(n), table.dim())?;
                for (row, w) in (p..table.rows()).step_by(n).enumerate() {
                    part.row_mut(row).copy_from_slice(table.row(w));
                }
                Ok(part)
            })
            .collect::<Result<_>>()?;
        Ok(SplitTable { parts })
    }

    /// The parts, part `p` holding rows `p, p + n, p + 2n, …`.
    pub fn parts(&self) -> &[EmbeddingTable] {
        &self.parts
    }

    /// The parts, to step them.
    pub fn parts_mut(&mut self) -> &mut [EmbeddingTable] {
        &mut self.parts
    }

    /// Row `w` of the whole table.
    #[inline]
    pub fn row(&self, w: usize) -> &[f32] {
        let n = self.parts.len();
        self.parts[w % n].row(w / n)
    }

    /// Rows of the whole table.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(EmbeddingTable::rows).sum()
    }

    /// The whole table's values, row-major.
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<f32> {
        (0..self.rows())
            .flat_map(|w| self.row(w).iter().copied())
            .collect()
    }

    /// The whole table, put back together.
    ///
    /// # Errors
    /// As [`EmbeddingTable::zeros`] (memory).
    pub fn to_table(&self) -> Result<EmbeddingTable> {
        let mut table = EmbeddingTable::zeros(self.rows(), self.parts[0].dim())?;
        for w in 0..self.rows() {
            table.row_mut(w).copy_from_slice(self.row(w));
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embtable::Init;

    #[test]
    fn splitting_and_joining_keeps_every_row_in_place() {
        let table = EmbeddingTable::new(
            11,
            3,
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
            1,
        )
        .unwrap();
        for (asked, n) in [(0, 1), (1, 1), (2, 2), (3, 3), (11, 11), (12, 11)] {
            let split = SplitTable::new(table.clone(), asked).unwrap();
            assert_eq!(split.parts().len(), n);
            assert_eq!(split.rows(), 11);
            for w in 0..11 {
                assert_eq!(split.row(w), table.row(w), "{n} parts, row {w}");
                assert_eq!(split.parts()[w % n].row(w / n), table.row(w));
            }
            assert_eq!(split.to_table().unwrap().to_vec(), table.to_vec());
        }
    }
}
