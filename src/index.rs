//! Row ids: the integer types a batch of ids may be given in.

use crate::{Error, Result};

mod sealed {
    pub trait Sealed {}
}

/// An integer type usable as a row id: `u32`, `u64`, `usize`, `i32`, `i64`.
///
/// The trait is sealed: the hot loops trust [`Index::row`] after validation,
/// so only the implementations here, whose conversion is checked, exist.
pub trait Index: Copy + Send + Sync + sealed::Sealed + 'static {
    /// The row this id names, or `None` if it is negative or does not fit a `usize`.
    fn row(self) -> Option<usize>;
    /// The id widened without loss, for error messages.
    fn widen(self) -> i128;
}

macro_rules! impl_index {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Index for $t {
            #[inline(always)]
            fn row(self) -> Option<usize> {
                usize::try_from(self).ok()
            }
            #[inline(always)]
            fn widen(self) -> i128 {
                self as i128
            }
        }
    )*};
}
impl_index!(u32, u64, usize, i32, i64);

/// Checks that every id of a batch names a row below `rows`.
///
/// Returns the first offending id as [`Error::IndexOutOfRange`]. After this
/// returns `Ok`, `id.row().unwrap_unchecked() < rows` holds for every id.
pub(crate) fn validate_ids<I: Index>(ids: &[I], rows: usize) -> Result<()> {
    // One branch-free pass: `fold` over a flag lets the compiler vectorise the
    // common all-valid case; the position is searched only once a bad id exists.
    let all_ok = ids
        .iter()
        .fold(true, |ok, &id| ok & id.row().is_some_and(|r| r < rows));
    if all_ok {
        return Ok(());
    }
    let position = ids
        .iter()
        .position(|&id| id.row().is_none_or(|r| r >= rows))
        .expect("a bad id exists");
    Err(Error::IndexOutOfRange {
        position,
        index: ids[position].widen(),
        rows,
    })
}

/// The row of an id already checked by [`validate_ids`].
///
/// # Safety
/// `id.row()` must be `Some`.
#[inline(always)]
pub(crate) unsafe fn row_unchecked<I: Index>(id: I) -> usize {
    debug_assert!(id.row().is_some());
    // SAFETY: the caller validated the id, so the conversion succeeds.
    unsafe { id.row().unwrap_unchecked() }
}
