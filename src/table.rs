//! `EmbeddingTable`: rows of `f32` in one aligned allocation, and lookups.

use rayon::prelude::*;

use crate::aligned::{AlignedBuf, SendPtr, padded_len};
use crate::index::{Index, row_unchecked, validate_ids};
use crate::kernels::{self, Kernel, Simd, Tier};
use crate::parallel::PARALLEL_MIN_FLOATS;
use crate::{Error, Init, Result};

/// Output floats per parallel task: large enough to amortise scheduling,
/// small enough that two threads finish together.
const TASK_FLOATS: usize = kernels::parallel_size(1 << 16);

/// Bytes of rows that gathers keep prefetching ahead of the row in use.
///
/// Random rows come from DRAM at ~100 ns, so many must be in flight at once;
/// a distance in bytes rather than rows keeps small rows from running dry
/// and large ones from flooding the miss queues. Measured on the 2-core
/// Zen 4 (medians, one / two threads): 8 KiB against 2 KiB gave W1-d32
/// 2.4 vs 3.3 ms, W1 13.4 vs 14.8 and 6.5 vs 7.5 ms; 4 to 16 KiB were
/// within noise, and W1-d512 did not move between 4 and 8 rows.
const PREFETCH_BYTES: usize = 8 << 10;

/// Rows to prefetch ahead in a gather over rows of `stride` floats.
pub(crate) fn prefetch_distance(stride: usize) -> usize {
    (PREFETCH_BYTES / (stride * size_of::<f32>()).max(1)).clamp(4, 64)
}

/// An embedding table: `rows` vectors of `dim` floats.
///
/// Stored as one 64-byte aligned allocation of `rows * stride` floats, where
/// `stride` is `dim` rounded up to a multiple of 16 and the pad lanes are
/// zero (see [`stride`](Self::stride)).
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingTable {
    data: AlignedBuf,
    rows: usize,
    dim: usize,
    stride: usize,
}

impl EmbeddingTable {
    /// A table of `rows × dim` values drawn by `init` from `seed`.
    ///
    /// The same `(init, seed)` gives the same table on every run and every
    /// thread count; large tables are filled in parallel.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `rows` or `dim` is zero or `init` is
    /// invalid; [`Error::Alloc`] if the table does not fit in memory.
    ///
    /// # Examples
    /// ```
    /// use embtable::{EmbeddingTable, Init};
    /// let table = EmbeddingTable::new(1000, 64, Init::default(), 42)?;
    /// assert_eq!((table.rows(), table.dim()), (1000, 64));
    /// assert!(table.row(3).iter().all(|&x| (-0.05..0.05).contains(&x)));
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn new(rows: usize, dim: usize, init: Init, seed: u64) -> Result<Self> {
        init.validate()?;
        let mut table = Self::zeros(rows, dim)?;
        if init != Init::Zeros {
            table
                .data
                .as_mut_slice()
                .par_chunks_mut(table.stride)
                .with_min_len(256)
                .enumerate()
                .for_each(|(r, row)| init.fill_row(seed, r, &mut row[..dim]));
        }
        Ok(table)
    }

    /// A table of zeros.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn zeros(rows: usize, dim: usize) -> Result<Self> {
        if rows == 0 {
            return Err(Error::InvalidConfig {
                field: "rows",
                reason: "a table needs at least one row".into(),
            });
        }
        if dim == 0 {
            return Err(Error::InvalidConfig {
                field: "dim",
                reason: "a table needs at least one column".into(),
            });
        }
        let (stride, len) = padded_len(rows, dim, "table")?;
        let data = AlignedBuf::zeroed(len, "table")?;
        Ok(Self {
            data,
            rows,
            dim,
            stride,
        })
    }

    /// A table holding `values`, row-major `rows × dim`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `rows` or `dim` is zero;
    /// [`Error::ShapeMismatch`] if `values.len() != rows * dim`.
    ///
    /// # Examples
    /// ```
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::from_rows(3, 2, &[0., 1., 2., 3., 4., 5.])?;
    /// assert_eq!(table.row(1), &[2., 3.]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn from_rows(rows: usize, dim: usize, values: &[f32]) -> Result<Self> {
        let expected = rows.saturating_mul(dim);
        if rows != 0 && dim != 0 && values.len() != expected {
            return Err(Error::ShapeMismatch {
                what: "from_rows values (rows * dim)",
                expected,
                got: values.len(),
            });
        }
        let mut table = Self::zeros(rows, dim)?;
        let stride = table.stride;
        table
            .data
            .as_mut_slice()
            .par_chunks_mut(stride)
            .zip(values.par_chunks(dim))
            .with_min_len(256)
            .for_each(|(row, src)| row[..dim].copy_from_slice(src));
        Ok(table)
    }

    /// Number of rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Floats per row.
    #[inline]
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Distance between rows in floats: `dim` rounded up to a multiple of 16.
    #[inline]
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Row `i`.
    ///
    /// # Panics
    /// If `i >= rows()`.
    #[inline]
    #[track_caller]
    pub fn row(&self, i: usize) -> &[f32] {
        assert!(
            i < self.rows,
            "row {i} out of range for {}",
            crate::error::count(self.rows, "row")
        );
        &self.data.as_slice()[i * self.stride..][..self.dim]
    }

    /// Row `i`, mutably (only its `dim` values; the padding stays zero).
    ///
    /// # Panics
    /// If `i >= rows()`.
    #[inline]
    #[track_caller]
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(
            i < self.rows,
            "row {i} out of range for {}",
            crate::error::count(self.rows, "row")
        );
        let (stride, dim) = (self.stride, self.dim);
        &mut self.data.as_mut_slice()[i * stride..][..dim]
    }

    /// Row `i` without a bounds check.
    ///
    /// # Safety
    /// `i < self.rows()`.
    #[inline]
    pub unsafe fn row_unchecked(&self, i: usize) -> &[f32] {
        debug_assert!(i < self.rows);
        // SAFETY: i < rows (caller), so the row lies inside the buffer.
        unsafe {
            self.data
                .as_slice()
                .get_unchecked(i * self.stride..i * self.stride + self.dim)
        }
    }

    /// The whole storage: `rows * stride` floats, pad lanes included.
    ///
    /// It has no safe mutable twin: the pad lanes are zero and safe code
    /// cannot change that (rows are written through
    /// [`row_mut`](Self::row_mut), raw access is [`as_mut_ptr`](Self::as_mut_ptr)).
    ///
    /// ```compile_fail
    /// let mut table = embtable::EmbeddingTable::zeros(1, 3).unwrap();
    /// table.as_padded_mut()[5] = 1.0; // a pad lane: not reachable
    /// ```
    #[inline]
    pub fn as_padded(&self) -> &[f32] {
        self.data.as_slice()
    }

    /// The whole storage, mutably, for the crate's own writers, which keep
    /// the pad lanes zero. Users write rows through [`row_mut`](Self::row_mut),
    /// which cannot reach the pad lanes.
    #[inline]
    pub(crate) fn as_padded_mut(&mut self) -> &mut [f32] {
        self.data.as_mut_slice()
    }

    /// A pointer to the first float of the storage, for code that must
    /// address the rows itself (a NumPy array over the table, say): row `i`
    /// starts `i * stride()` floats in, its `dim()` values followed by
    /// `stride() - dim()` pad lanes. Valid until the table is moved,
    /// dropped or next borrowed.
    ///
    /// Writing through it is `unsafe` code's business: it must write row
    /// values only. The pad lanes must stay zero, since kernels read whole
    /// strides (a non-zero pad lane would change norms, similarities and
    /// pooled `Max` results); safe code cannot reach them.
    ///
    /// # Examples
    /// ```
    /// use embtable::EmbeddingTable;
    /// let mut table = EmbeddingTable::zeros(3, 2)?;
    /// let (stride, ptr) = (table.stride(), table.as_mut_ptr());
    /// // SAFETY: row 2, lane 1 is inside the storage and is a value lane.
    /// unsafe { *ptr.add(2 * stride + 1) = 7.0 };
    /// assert_eq!(table.row(2), &[0.0, 7.0]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    #[inline]
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.data.as_mut_slice().as_mut_ptr()
    }

    /// A dense row-major copy, `rows * dim` floats.
    pub fn to_vec(&self) -> Vec<f32> {
        // rows * dim <= rows * stride, whose bytes fit (checked at creation).
        let mut out = vec![0.0; self.rows * self.dim];
        out.par_chunks_mut(self.dim)
            .zip(self.data.as_slice().par_chunks(self.stride))
            .with_min_len(256)
            .for_each(|(dst, row)| dst.copy_from_slice(&row[..self.dim]));
        out
    }

    /// Copies row `ids[j]` to `out[j * dim..][..dim]` for every `j`: Keras'
    /// `Embedding` and PyTorch's `nn.Embedding` forward pass.
    ///
    /// Every id is checked before anything is written. Parallel above a size
    /// threshold; the result is the same for every thread count and tier (a
    /// lookup is a copy).
    ///
    /// An output of 16 MiB or more whose rows all start on a cache line (a
    /// 64-byte aligned `out`, such as an [`AlignedBuf`], and `dim` a multiple
    /// of 16) is written with non-temporal stores, which skip reading each
    /// output line before overwriting it and leave the caches to the table:
    /// on W1 of `WORKLOADS.md` that made two threads 1.4x faster. A
    /// `Vec<f32>` is only 16-byte aligned, so it takes regular stores.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `out.len() != ids.len() * dim`;
    /// [`Error::IndexOutOfRange`] naming the first id that is negative or
    /// `>= rows`. On error `out` is untouched.
    ///
    /// # Examples
    /// ```
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::from_rows(3, 2, &[0., 1., 2., 3., 4., 5.])?;
    /// let mut out = vec![0.0; 3 * 2];
    /// table.lookup(&[2u32, 0, 2], &mut out)?;
    /// assert_eq!(out, [4., 5., 0., 1., 4., 5.]);
    /// assert!(table.lookup(&[1i64, -1, 0], &mut out).is_err());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn lookup<I: Index>(&self, ids: &[I], out: &mut [f32]) -> Result<()> {
        let expected = ids.len().saturating_mul(self.dim);
        Error::check_len("lookup output length (ids * dim)", expected, out.len())?;
        validate_ids(ids, self.rows)?;
        // SAFETY: every id was validated against `rows` just above.
        unsafe { self.gather_unchecked(kernels::current(), ids, out) };
        Ok(())
    }

    /// [`lookup`](Self::lookup) into a new vector of `ids.len() * dim` floats.
    ///
    /// # Errors
    /// As [`lookup`](Self::lookup); [`Error::Alloc`] if `ids.len() * dim`
    /// floats overflow.
    pub fn lookup_vec<I: Index>(&self, ids: &[I]) -> Result<Vec<f32>> {
        validate_ids(ids, self.rows)?;
        let mut out = vec![0.0; Error::checked_product(ids.len(), self.dim, "lookup output")?];
        // SAFETY: every id was validated against `rows` just above.
        unsafe { self.gather_unchecked(kernels::current(), ids, &mut out) };
        Ok(out)
    }

    /// Rescales each row in `ids` whose L2 norm exceeds `max_norm` to norm
    /// `max_norm`, as PyTorch's `max_norm` and Keras' `MaxNorm` constraint:
    /// `row *= max_norm / (norm + 1e-7)`. Rows within the bound are
    /// untouched, rows named twice are rescaled once, other rows never.
    ///
    /// The norm is summed in `f64` over four interleaved partial sums in a
    /// fixed order, so it is the same for every tier and thread count.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless `max_norm` is finite and positive;
    /// [`Error::IndexOutOfRange`] for a bad id. Nothing is written on error.
    ///
    /// # Examples
    /// ```
    /// use embtable::EmbeddingTable;
    /// let mut table = EmbeddingTable::from_rows(2, 2, &[3., 4., 0.3, 0.4])?;
    /// table.renorm_rows(&[0u32, 1], 1.0)?;
    /// assert!((table.row(0)[0] - 0.6).abs() < 1e-6); // norm 5 -> 1
    /// assert_eq!(table.row(1), &[0.3, 0.4]);         // norm 0.5: untouched
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn renorm_rows<I: Index>(&mut self, ids: &[I], max_norm: f32) -> Result<()> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(Error::InvalidConfig {
                field: "max_norm",
                reason: format!("{max_norm} is not a finite positive number"),
            });
        }
        validate_ids(ids, self.rows)?;
        let mut rows: Vec<usize> = ids
            .iter()
            // SAFETY: every id was validated just above.
            .map(|&id| unsafe { row_unchecked(id) })
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let tier = kernels::current();
        let (dim, stride) = (self.dim, self.stride);
        let base = SendPtr(self.data.as_mut_ptr());
        rows.par_iter().with_min_len(256).for_each(|&r| {
            // SAFETY: r < rows (validated) and `rows` holds each row once, so
            // this task is the only one touching row r's `dim` floats.
            let row = unsafe { std::slice::from_raw_parts_mut(base.get().add(r * stride), dim) };
            let norm = l2_norm(row);
            if norm > max_norm as f64 {
                let factor = (max_norm as f64 / (norm + 1e-7)) as f32;
                kernels::dispatch(tier, Scale { row, factor });
            }
        });
        Ok(())
    }

    /// The gather behind `lookup`, parallel above a threshold.
    ///
    /// # Safety
    /// Every id names a row `< rows`, and `out.len() == ids.len() * dim`.
    pub(crate) unsafe fn gather_unchecked<I: Index>(&self, tier: Tier, ids: &[I], out: &mut [f32]) {
        debug_assert_eq!(out.len(), ids.len() * self.dim);
        let stream = streams_output(out, self.dim);
        let gather = |first: usize, out: &mut [f32]| {
            kernels::dispatch(
                tier,
                Gather {
                    table: self,
                    ids,
                    first,
                    out,
                    stream,
                },
            )
        };
        if out.len() < PARALLEL_MIN_FLOATS {
            gather(0, out);
        } else {
            let ids_per_task = (TASK_FLOATS / self.dim).max(1);
            out.par_chunks_mut(ids_per_task * self.dim)
                .enumerate()
                .for_each(|(task, out)| gather(task * ids_per_task, out));
        }
    }
}

impl EmbeddingTable {
    /// The rows of `ids` into `out` on the calling thread, with streaming
    /// stores if `stream` (as [`streams_output`] decides for the whole
    /// output this is part of): one task of a gather whose ids come from
    /// elsewhere (a dynamic table's keys, translated in the same task).
    ///
    /// # Safety
    /// Every id names a row `< rows`, and `out.len() == ids.len() * dim`.
    pub(crate) unsafe fn gather_serial<I: Index>(
        &self,
        tier: Tier,
        ids: &[I],
        out: &mut [f32],
        stream: bool,
    ) {
        debug_assert_eq!(out.len(), ids.len() * self.dim);
        kernels::dispatch(
            tier,
            Gather {
                table: self,
                ids,
                first: 0,
                out,
                stream,
            },
        )
    }
}

/// Outputs of at least this many bytes are written with non-temporal
/// stores: far larger than a core's share of the L3, they would only evict
/// the table's rows, and streaming skips reading each line before it is
/// overwritten. Measured on W1 (128 MB out): 12.1 vs 12.4 ms on one
/// thread, 7.6 vs 10.4 ms on two.
const STREAM_MIN_BYTES: usize = 16 << 20;

/// Whether a lookup streams `out`: large enough, and every row starts on a
/// cache line, so each line is written whole by one non-temporal store.
/// (Partial lines mixed with streamed ones were 2-3x slower on W2.)
pub(crate) fn streams_output(out: &[f32], dim: usize) -> bool {
    const LINE: usize = crate::aligned::LANES_PER_LINE * size_of::<f32>();
    size_of_val(out) >= STREAM_MIN_BYTES
        && (out.as_ptr() as usize).is_multiple_of(LINE)
        && (dim * size_of::<f32>()).is_multiple_of(LINE)
}

/// The L2 norm in `f64`, from four partial sums of lanes `k mod 4`.
fn l2_norm(row: &[f32]) -> f64 {
    let mut partial = [0.0f64; 4];
    for chunk in row.chunks(4) {
        for (p, &x) in partial.iter_mut().zip(chunk) {
            *p += x as f64 * x as f64;
        }
    }
    ((partial[0] + partial[1]) + (partial[2] + partial[3])).sqrt()
}

/// `row *= factor`.
struct Scale<'a> {
    row: &'a mut [f32],
    factor: f32,
}

impl Kernel for Scale<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        kernels::scale(s, self.row, self.factor);
    }
}

/// Copies the rows of `ids[first..first + out.len() / dim]` into consecutive
/// `dim`-float slots of `out`, prefetching rows [`prefetch_distance`] ids
/// ahead (past this task's ids too, into the next task's) so several DRAM
/// fetches are in flight at once.
///
/// With `stream`, rows are written with non-temporal stores
/// ([`streams_output`]) and fenced before the task ends.
///
/// Invariant: every id was validated against `table.rows`; `out` holds whole
/// rows for ids from `first` on.
struct Gather<'a, I> {
    table: &'a EmbeddingTable,
    ids: &'a [I],
    first: usize,
    out: &'a mut [f32],
    stream: bool,
}

impl<I: Index> Kernel for Gather<'_, I> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let Gather {
            table,
            ids,
            first,
            out,
            stream,
        } = self;
        let (dim, stride) = (table.dim, table.stride);
        let base = table.data.as_ptr();
        let prefetch = |id: I| {
            // SAFETY: validated id (struct invariant).
            let r = unsafe { row_unchecked(id) };
            kernels::prefetch_row_l2(base.wrapping_add(r * stride), dim);
        };
        // Start the task's first rows together rather than one miss at a time.
        let mine = &ids[first..first + out.len() / dim];
        let ahead = prefetch_distance(stride);
        mine.iter().take(ahead).copied().for_each(prefetch);
        let upcoming = ids.get(first + ahead..).unwrap_or_default();
        for (k, (&id, dst)) in mine.iter().zip(out.chunks_exact_mut(dim)).enumerate() {
            if let Some(&ahead) = upcoming.get(k) {
                prefetch(ahead);
            }
            // SAFETY: validated id (struct invariant), so the row is in the table.
            let src = unsafe { table.row_unchecked(row_unchecked(id)) };
            if stream {
                kernels::copy_row_streaming(s, src, dst);
            } else {
                kernels::copy_row(s, src, dst);
            }
        }
        if stream {
            s.fence();
        }
    }
}
