//! Pooled lookups: each bag of ids reduced to one row (PyTorch's
//! `EmbeddingBag`, TensorFlow's `embedding_lookup_sparse` with a combiner,
//! FBGEMM's pooled table-batched embeddings), and their gradients.
//!
//! # The contract
//!
//! A batch of bags is given in CSR form ([`Bags`]): bag `b` holds the ids
//! `ids[offsets[b]..offsets[b + 1]]` and, optionally, one per-sample weight
//! per id. Write `e_j` for the table row of id `j` of a bag and `w_j` for its
//! weight (`1` without weights). Every pooling except [`Pooling::Max`] is a
//! weighted sum `Σ c_j · e_j` with one coefficient `c_j` per position:
//!
//! | pooling | normaliser `d` | coefficient `c_j` | result |
//! |---|---|---|---|
//! | [`Pooling::Sum`] | `1` | `w_j` | `Σ w_j e_j` |
//! | [`Pooling::Mean`] | `Σ w_j` | `w_j / d` | `Σ w_j e_j / Σ w_j` |
//! | [`Pooling::SqrtN`] | `√(Σ w_j²)` | `w_j / d` | `Σ w_j e_j / √(Σ w_j²)` |
//! | [`Pooling::Max`] | — | — | `max_j e_j`, per lane |
//!
//! **Empty bags give a zero row, never NaN**, and so does every bag whose
//! normaliser is zero (Mean with weights summing to exactly zero, SqrtN with
//! all weights zero). Max takes no weights.
//!
//! The gradient routes each bag's output gradient `g_b` back with the same
//! coefficients: row `ids[j]` receives `c_j · g_b`. For Max, lane `l` of
//! `g_b` goes to the id that won lane `l` in the forward pass.
//!
//! # Numeric behaviour (exact, on every tier and thread count)
//!
//! - `d` is computed in `f64`, summing `w_j` (Mean) or `w_j²` (SqrtN, every
//!   square exact in `f64`) in bag order; without weights it is `L`
//!   or `√L` for a bag of `L` ids. No `f32` overflow can occur there.
//! - `c_j = (w_j / d)` computed in `f64` and rounded once to `f32` (so Sum's
//!   coefficients are the weights themselves). When `d == 0` the bag's row
//!   is zero and its ids get no gradient. A coefficient too large for
//!   `f32` (only with Mean, when the weights of a bag nearly cancel) is an
//!   error.
//! - The row is `((0 + c_0·e_0) + c_1·e_1) + …` in `f32`, in bag order, each
//!   product rounded before its sum (never a fused multiply-add). This is
//!   exactly the dense `B · (onehot(ids) · W)` with in-order sums, where
//!   `B[b, j] = c_j`. A bag of one id with `c = 1` (Sum, Mean and SqrtN
//!   without weights) returns its row exactly.
//! - Max starts from the bag's first row and takes, lane by lane,
//!   `if x > acc { x } else { acc }`: of equal values the first is kept (so
//!   the gradient goes to the first occurrence of the maximum), a NaN in a
//!   later row is skipped and a NaN in the first row stays.
//! - The gradient of row `r` is `Σ c_j · g_b(j)` over the positions `j` with
//!   `ids[j] == r`, summed in batch order (as
//!   [`SparseGrad::accumulate_lookup`] sums): exactly
//!   `onehot(ids)ᵀ · (Bᵀ · G)` with in-order sums. Every id of the batch
//!   gets a slot in the gradient, even one whose contribution is zero (a
//!   zero weight, or a max that it won in no lane).
//!
//! Bags are computed in parallel above a size threshold, each bag by one
//! thread in bag order, so the result never depends on the thread count.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use rayon::prelude::*;

use crate::grad::{Contribution, check_finite};
use crate::index::{Index, row_unchecked, validate_ids};
use crate::kernels::{self, BLOCK_VECTORS, Kernel, Simd, Tier};
use crate::parallel::PARALLEL_MIN_FLOATS;
use crate::table::prefetch_distance;
use crate::{EmbeddingTable, Error, Result, SparseGrad};

/// Floats of rows read per parallel task: large enough to amortise
/// scheduling, small enough that two threads finish together.
const TASK_FLOATS: usize = kernels::parallel_size(1 << 16);

/// How the rows of a bag are reduced to one row.
///
/// See the [module documentation](self) for the exact definitions. The
/// default is [`Mean`](Pooling::Mean), the default of both PyTorch's
/// `EmbeddingBag` and TensorFlow's `embedding_lookup_sparse`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Pooling {
    /// `Σ w_j e_j` (PyTorch `mode="sum"`, TF `combiner="sum"`).
    Sum,
    /// `Σ w_j e_j / Σ w_j` (PyTorch `mode="mean"`, TF `combiner="mean"`).
    #[default]
    Mean,
    /// `Σ w_j e_j / √(Σ w_j²)` (TF `combiner="sqrtn"`).
    SqrtN,
    /// The largest value of each lane over the bag (PyTorch `mode="max"`).
    /// Takes no weights.
    Max,
}

/// A batch of bags of ids in CSR form, with optional per-sample weights.
///
/// Bag `b` is `ids[offsets[b]..offsets[b + 1]]`; `offsets` has one entry
/// more than there are bags, starts at 0, never decreases and ends at
/// `ids.len()` (PyTorch's `offsets` with `include_last_offset=True`; its
/// default, one start per bag, goes through [`Bags::from_starts`]). Bags
/// may be empty and may repeat ids. A `Bags` is checked once when it is
/// built and borrows its ids and weights.
#[derive(Clone)]
pub struct Bags<'a, I> {
    ids: &'a [I],
    offsets: Cow<'a, [usize]>,
    weights: Option<&'a [f32]>,
}

impl<I: Index> fmt::Debug for Bags<'_, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bags")
            .field("ids", &IdsDebug(self.ids))
            .field("offsets", &self.offsets)
            .field("weights", &self.weights)
            .finish()
    }
}

/// Prints ids through [`Index::widen`], so `Bags` is `Debug` for every `Index`.
struct IdsDebug<'a, I>(&'a [I]);

impl<I: Index> fmt::Debug for IdsDebug<'_, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|id| id.widen()))
            .finish()
    }
}

impl<'a, I: Index> Bags<'a, I> {
    /// Bags from CSR offsets: bag `b` is `ids[offsets[b]..offsets[b + 1]]`,
    /// with `weights[j]` the weight of `ids[j]`.
    ///
    /// Ids are checked against a table when the bags are used.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `offsets` is empty (it needs `bags + 1`
    /// entries) or `weights` is not one per id; [`Error::InvalidOffsets`]
    /// naming the first offset that is beyond `ids.len()`, smaller than the
    /// one before it, a first offset that is not 0, or a last one that is
    /// not `ids.len()`; [`Error::NonFinite`] naming the first NaN or
    /// infinite weight.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Bags, EmbeddingTable, Pooling};
    /// // Three bags: {2, 0}, {} and {1, 1, 2}.
    /// let ids = [2u32, 0, 1, 1, 2];
    /// let bags = Bags::new(&ids, &[0, 2, 2, 5], None)?;
    /// assert_eq!(bags.len(), 3);
    /// assert_eq!(bags.bag(2), &[1, 1, 2]);
    ///
    /// let table = EmbeddingTable::from_rows(3, 2, &[0., 1., 2., 3., 4., 5.])?;
    /// let out = table.pooled_lookup_vec(&bags, Pooling::Sum)?;
    /// assert_eq!(out, [4., 6., 0., 0., 8., 11.]);
    ///
    /// // Offsets must end at ids.len().
    /// assert!(Bags::new(&ids, &[0, 2, 4], None).is_err());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn new(ids: &'a [I], offsets: &'a [usize], weights: Option<&'a [f32]>) -> Result<Self> {
        check_offsets(offsets, ids.len())?;
        check_weights(weights, ids.len())?;
        Ok(Self {
            ids,
            offsets: Cow::Borrowed(offsets),
            weights,
        })
    }

    /// Bags from PyTorch's `offsets` as `EmbeddingBag` takes them by
    /// default (`include_last_offset=False`): one entry per bag, the
    /// position of its first id, without the trailing total that
    /// [`new`](Self::new) takes. Bag `b` is `ids[starts[b]..starts[b + 1]]`,
    /// the last bag running to the end of `ids`.
    ///
    /// # Errors
    /// [`Error::InvalidOffsets`] naming the first start that is not 0 at
    /// position 0, beyond `ids.len()` or smaller than the one before it;
    /// [`Error::ShapeMismatch`] if `starts` is empty while `ids` is not
    /// (those ids would belong to no bag); as [`new`](Self::new) for the
    /// weights.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Bags, EmbeddingTable, Pooling};
    /// // torch: EmbeddingBag(...)(input=[2, 0, 1, 1, 2], offsets=[0, 2, 2])
    /// let ids = [2u32, 0, 1, 1, 2];
    /// let bags = Bags::from_starts(&ids, &[0, 2, 2], None)?;
    /// assert_eq!(bags.offsets(), &[0, 2, 2, 5]); // {2, 0}, {}, {1, 1, 2}
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn from_starts(ids: &'a [I], starts: &[usize], weights: Option<&'a [f32]>) -> Result<Self> {
        if starts.is_empty() && !ids.is_empty() {
            return Err(Error::ShapeMismatch {
                what: "bag starts (one per bag; none only without ids)",
                expected: 1,
                got: 0,
            });
        }
        let mut offsets = Vec::with_capacity(starts.len() + 1);
        offsets.extend_from_slice(starts);
        offsets.push(ids.len());
        // The total appended breaks no rule on its own: a start beyond it
        // is reported first, at its own position.
        check_offsets(&offsets, ids.len())?;
        check_weights(weights, ids.len())?;
        Ok(Self {
            ids,
            offsets: Cow::Owned(offsets),
            weights,
        })
    }

    /// Bags from their lengths (FBGEMM's `lengths`, a ragged tensor's row
    /// lengths): bag `b` holds the next `lengths[b]` ids.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if the lengths do not add up to `ids.len()`
    /// or `weights` is not one per id; [`Error::NonFinite`] naming the first
    /// NaN or infinite weight.
    ///
    /// # Examples
    /// ```
    /// use embtable::Bags;
    /// let bags = Bags::from_lengths(&[7u32, 8, 9], &[2, 0, 1], None)?;
    /// assert_eq!(bags.offsets(), &[0, 2, 2, 3]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn from_lengths(
        ids: &'a [I],
        lengths: &[usize],
        weights: Option<&'a [f32]>,
    ) -> Result<Self> {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0usize);
        let mut total = 0usize;
        for &len in lengths {
            total = total.saturating_add(len);
            offsets.push(total);
        }
        if total != ids.len() {
            return Err(Error::ShapeMismatch {
                what: "sum of bag lengths (number of ids)",
                expected: ids.len(),
                got: total,
            });
        }
        check_weights(weights, ids.len())?;
        Ok(Self {
            ids,
            offsets: Cow::Owned(offsets),
            weights,
        })
    }

    /// Bags of `bag_len` consecutive ids each: the 2-D `(bags, bag_len)`
    /// input of PyTorch's `EmbeddingBag` and W4 of the benchmarks.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `bag_len` is zero or `ids.len()` is not a
    /// multiple of it.
    ///
    /// # Examples
    /// ```
    /// use embtable::Bags;
    /// let bags = Bags::fixed(&[4i64, 5, 6, 7, 8, 9], 3)?;
    /// assert_eq!((bags.len(), bags.offsets()), (2, &[0, 3, 6][..]));
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn fixed(ids: &'a [I], bag_len: usize) -> Result<Self> {
        Ok(Self {
            ids,
            offsets: Cow::Owned(fixed_offsets(ids.len(), bag_len)?),
            weights: None,
        })
    }

    /// Bags of `bag_len` consecutive ids each, `weights[j]` the weight of `ids[j]`.
    ///
    /// # Errors
    /// As [`fixed`](Self::fixed), and as [`new`](Self::new) for the weights.
    pub fn fixed_weighted(ids: &'a [I], weights: &'a [f32], bag_len: usize) -> Result<Self> {
        let offsets = fixed_offsets(ids.len(), bag_len)?;
        check_weights(Some(weights), ids.len())?;
        Ok(Self {
            ids,
            offsets: Cow::Owned(offsets),
            weights: Some(weights),
        })
    }

    /// Number of bags.
    #[inline]
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether there are no bags (a batch of empty bags is not empty).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every id of every bag, bag after bag.
    #[inline]
    pub fn ids(&self) -> &'a [I] {
        self.ids
    }

    /// The CSR offsets, `len() + 1` entries.
    #[inline]
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The per-sample weights, one per id, if any.
    #[inline]
    pub fn weights(&self) -> Option<&'a [f32]> {
        self.weights
    }

    /// The positions in [`ids`](Self::ids) of bag `b`.
    ///
    /// # Panics
    /// If `b >= len()`.
    #[inline]
    #[track_caller]
    pub fn range(&self, b: usize) -> Range<usize> {
        assert!(
            b < self.len(),
            "bag {b} out of range for {}",
            crate::error::count(self.len(), "bag")
        );
        self.offsets[b]..self.offsets[b + 1]
    }

    /// The ids of bag `b`.
    ///
    /// # Panics
    /// If `b >= len()`.
    #[inline]
    #[track_caller]
    pub fn bag(&self, b: usize) -> &'a [I] {
        &self.ids[self.range(b)]
    }

    /// The weights of bag `b`, if the bags are weighted.
    ///
    /// # Panics
    /// If `b >= len()`.
    #[inline]
    #[track_caller]
    pub fn bag_weights(&self, b: usize) -> Option<&'a [f32]> {
        let range = self.range(b);
        self.weights.map(|w| &w[range])
    }
}

/// The coefficient `c_j` of every position (module docs), for every
/// pooling but Max.
pub(crate) fn coefficients<I: Index>(bags: &Bags<'_, I>, pooling: Pooling) -> Vec<f32> {
    let mut coef = vec![0.0; bags.ids.len()];
    for window in bags.offsets.windows(2) {
        let range = window[0]..window[1];
        let w = bags.weights.map(|w| &w[range.clone()]);
        let d = normaliser(pooling, range.len(), w);
        for (k, c) in coef[range].iter_mut().enumerate() {
            *c = coefficient(w.map_or(1.0, |w| w[k]), d);
        }
    }
    coef
}

/// `Err` naming the first offset that breaks the CSR rules.
fn check_offsets(offsets: &[usize], ids: usize) -> Result<()> {
    let Some((&last, _)) = offsets.split_last() else {
        return Err(Error::ShapeMismatch {
            what: "offsets length (bags + 1, at least 1)",
            expected: 1,
            got: 0,
        });
    };
    if offsets[0] != 0 {
        return Err(Error::InvalidOffsets {
            position: 0,
            value: offsets[0],
            reason: "the first offset must be 0",
        });
    }
    for (position, pair) in offsets.windows(2).enumerate() {
        let (value, position) = (pair[1], position + 1);
        if value > ids {
            return Err(Error::InvalidOffsets {
                position,
                value,
                reason: "offsets must not exceed the number of ids",
            });
        }
        if value < pair[0] {
            return Err(Error::InvalidOffsets {
                position,
                value,
                reason: "offsets must not decrease",
            });
        }
    }
    if last != ids {
        return Err(Error::InvalidOffsets {
            position: offsets.len() - 1,
            value: last,
            reason: "the last offset must equal the number of ids (offsets hold one \
                     entry per bag plus that total; for one start per bag, PyTorch's \
                     include_last_offset=False, use Bags::from_starts)",
        });
    }
    Ok(())
}

/// `Err` unless `weights` (if any) holds one finite weight per id.
fn check_weights(weights: Option<&[f32]>, ids: usize) -> Result<()> {
    let Some(weights) = weights else {
        return Ok(());
    };
    if weights.len() != ids {
        return Err(Error::ShapeMismatch {
            what: "bag weights length (one per id)",
            expected: ids,
            got: weights.len(),
        });
    }
    check_finite("bag weight", weights)
}

/// The offsets of bags of `bag_len` ids each.
fn fixed_offsets(ids: usize, bag_len: usize) -> Result<Vec<usize>> {
    if bag_len == 0 {
        return Err(Error::InvalidConfig {
            field: "bag_len",
            reason: "bags of a fixed length need at least one id each (got 0)".into(),
        });
    }
    if !ids.is_multiple_of(bag_len) {
        return Err(Error::InvalidConfig {
            field: "bag_len",
            reason: format!(
                "{} cannot be split into bags of {bag_len}",
                crate::error::count(ids, "id")
            ),
        });
    }
    Ok((0..=ids / bag_len).map(|b| b * bag_len).collect())
}

/// The normaliser `d` of a bag of `len` ids (module docs): `1`, `Σ w`, or
/// `√Σ w²`, in `f64` and bag order.
#[inline]
fn normaliser(pooling: Pooling, len: usize, weights: Option<&[f32]>) -> f64 {
    match (pooling, weights) {
        (Pooling::Sum | Pooling::Max, _) => 1.0,
        (Pooling::Mean, None) => len as f64,
        (Pooling::Mean, Some(w)) => w.iter().fold(0.0, |d, &w| d + f64::from(w)),
        (Pooling::SqrtN, None) => (len as f64).sqrt(),
        (Pooling::SqrtN, Some(w)) => w
            .iter()
            .fold(0.0, |d, &w| d + f64::from(w) * f64::from(w))
            .sqrt(),
    }
}

/// The coefficient of a position of weight `w` in a bag of normaliser `d`:
/// `w / d` rounded once to `f32`, and 0 in a bag whose normaliser is 0.
#[inline]
fn coefficient(w: f32, d: f64) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        (f64::from(w) / d) as f32
    }
}

/// `Err` for Max pooling of weighted bags.
pub(crate) fn check_max_weights<I: Index>(bags: &Bags<'_, I>, pooling: Pooling) -> Result<()> {
    if pooling == Pooling::Max && bags.weights.is_some() {
        return Err(Error::InvalidConfig {
            field: "pooling",
            reason: "max pooling takes no per-sample weights (the bags have weights)".into(),
        });
    }
    Ok(())
}

/// `Err` naming the first coefficient that overflows `f32`. Only weighted
/// Mean can overflow (when a bag's weights nearly cancel): unweighted
/// coefficients are 1, 1/L or 1/√L, Sum's are the weights (checked finite
/// by the `Bags` constructors) and SqrtN's are at most 1 in magnitude.
pub(crate) fn check_coefficients<I: Index>(bags: &Bags<'_, I>, pooling: Pooling) -> Result<()> {
    let (Some(weights), Pooling::Mean) = (bags.weights, pooling) else {
        return Ok(());
    };
    for window in bags.offsets.windows(2) {
        let w = &weights[window[0]..window[1]];
        let d = normaliser(pooling, w.len(), Some(w));
        if let Some(k) = w.iter().position(|&w| !coefficient(w, d).is_finite()) {
            let position = window[0] + k;
            return Err(Error::NonFinite {
                what: "bag coefficient (weight / normaliser: the bag's weights nearly cancel)",
                position,
                value: coefficient(weights[position], d),
            });
        }
    }
    Ok(())
}

impl EmbeddingTable {
    /// Reduces each bag of ids to one row: `out[b * dim..][..dim]` is the
    /// pooling of the rows of bag `b` (PyTorch's `EmbeddingBag`, TF's
    /// `embedding_lookup_sparse`).
    ///
    /// See the [`pool`](crate::pool) module docs for the exact arithmetic.
    /// Empty bags (and bags whose Mean/SqrtN normaliser is zero) give zero
    /// rows. Every id is checked before anything is written. Bags run in
    /// parallel above a size threshold; the result is bitwise the same for
    /// every thread count and kernel tier.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `out.len() != bags.len() * dim`;
    /// [`Error::InvalidConfig`] for [`Pooling::Max`] with weighted bags;
    /// [`Error::IndexOutOfRange`] naming the position in `bags.ids()` of the
    /// first id that is negative or `>= rows`; [`Error::NonFinite`] if a
    /// Mean coefficient overflows `f32`. On error `out` is untouched.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Bags, EmbeddingTable, Pooling};
    /// let table = EmbeddingTable::from_rows(3, 2, &[1., 0., 3., 2., 5., -4.])?;
    /// let ids = [0i64, 1, 2, 1];
    /// let bags = Bags::new(&ids, &[0, 2, 2, 4], None)?; // {0, 1}, {}, {2, 1}
    /// let mut out = vec![0.0; 3 * 2];
    ///
    /// table.pooled_lookup(&bags, Pooling::Mean, &mut out)?;
    /// assert_eq!(out, [2., 1., 0., 0., 4., -1.]); // the empty bag is zero
    ///
    /// table.pooled_lookup(&bags, Pooling::Max, &mut out)?;
    /// assert_eq!(out, [3., 2., 0., 0., 5., 2.]);
    ///
    /// let weights = [1.0, 3.0, 0.5, 2.0];
    /// let weighted = Bags::new(&ids, &[0, 2, 2, 4], Some(&weights))?;
    /// table.pooled_lookup(&weighted, Pooling::Sum, &mut out)?;
    /// assert_eq!(out, [10., 6., 0., 0., 8.5, 2.]);
    /// assert!(table.pooled_lookup(&weighted, Pooling::Max, &mut out).is_err());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn pooled_lookup<I: Index>(
        &self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()> {
        let expected = bags.len().saturating_mul(self.dim());
        Error::check_len(
            "pooled lookup output length (bags * dim)",
            expected,
            out.len(),
        )?;
        self.check_pooled(bags, pooling)?;
        // SAFETY: ids validated against `rows` and out's length checked just above.
        unsafe { self.pool_unchecked(kernels::current(), bags, pooling, out) };
        Ok(())
    }

    /// [`pooled_lookup`](Self::pooled_lookup) into a new vector of
    /// `bags.len() * dim` floats.
    ///
    /// # Errors
    /// As [`pooled_lookup`](Self::pooled_lookup).
    pub fn pooled_lookup_vec<I: Index>(
        &self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
    ) -> Result<Vec<f32>> {
        self.check_pooled(bags, pooling)?;
        let len = Error::checked_product(bags.len(), self.dim(), "pooled lookup output")?;
        let mut out = vec![0.0; len];
        // SAFETY: ids validated against `rows` just above; out has bags * dim floats.
        unsafe { self.pool_unchecked(kernels::current(), bags, pooling, &mut out) };
        Ok(out)
    }

    /// Everything a pooled lookup checks besides the output length.
    pub(crate) fn check_pooled<I: Index>(
        &self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
    ) -> Result<()> {
        check_max_weights(bags, pooling)?;
        validate_ids(bags.ids, self.rows())?;
        check_coefficients(bags, pooling)
    }

    /// The pooled lookup behind `pooled_lookup`, parallel over bags above a
    /// threshold.
    ///
    /// # Safety
    /// Every id names a row `< rows`, `out.len() == bags.len() * dim`, and
    /// `check_pooled(bags, pooling)` passed.
    pub(crate) unsafe fn pool_unchecked<I: Index>(
        &self,
        tier: Tier,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) {
        let dim = self.dim();
        debug_assert_eq!(out.len(), bags.len() * dim);
        let offsets = bags.offsets();
        let run = |first_bag: usize, out: &mut [f32]| {
            let count = out.len() / dim;
            kernels::dispatch(
                tier,
                PoolBags {
                    table: self,
                    ids: bags.ids,
                    offsets: &offsets[first_bag..=first_bag + count],
                    weights: bags.weights,
                    pooling,
                    out,
                },
            )
        };
        let work = bags
            .ids
            .len()
            .saturating_add(bags.len())
            .saturating_mul(dim);
        if work < PARALLEL_MIN_FLOATS {
            run(0, out);
        } else {
            // Tasks of whole bags, about TASK_FLOATS floats of rows each;
            // every bag is computed by one task, so the thread count cannot
            // change its bits. Output chunks are disjoint.
            let mean_len = (bags.ids.len() / bags.len()).max(1);
            let bags_per_task = (TASK_FLOATS / mean_len.saturating_mul(dim)).max(1);
            out.par_chunks_mut(bags_per_task * dim)
                .enumerate()
                .for_each(|(task, out)| run(task * bags_per_task, out));
        }
    }
}

/// Pools consecutive bags into consecutive `dim`-float rows of `out`.
///
/// A bag's rows are reduced a block of columns at a time, the block's
/// accumulators held in registers ([`reduce_block`]) and stored straight
/// into the bag's output row:
///
/// ```text
/// for each bag b:                     (ids ids[offsets[b]..offsets[b+1]])
///     d = normaliser(bag)             (Max: none)
///     if the bag is empty or d == 0: out_b = 0; next
///     for each block of columns:
///         acc = 0                     (Max: acc = e_first)
///         for j in the bag:
///             (first block) prefetch the row of ids[j + ahead]
///                           into L2 (its first line on AMD)
///             acc += c_j * e_j        (Sum without weights: acc += e_j;
///                                      Max: acc = max(e_j, acc))
///         out_b[block] = acc
/// ```
///
/// Invariants: every id was validated against `table.rows`; `offsets` is
/// this task's slice of valid CSR offsets (`out.len() / dim + 1` entries,
/// indexing the whole `ids` and `weights`); `check_pooled` passed.
struct PoolBags<'a, I> {
    table: &'a EmbeddingTable,
    ids: &'a [I],
    offsets: &'a [usize],
    weights: Option<&'a [f32]>,
    pooling: Pooling,
    out: &'a mut [f32],
}

impl<I: Index> Kernel for PoolBags<'_, I> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let PoolBags {
            table,
            ids,
            offsets,
            weights,
            pooling,
            out,
        } = self;
        let (dim, stride) = (table.dim(), table.stride());
        let base = table.as_padded().as_ptr();
        let ahead = prefetch_distance(stride);
        let heads_only = kernels::row_heads_suffice();
        let prefetch = |id: I| {
            // SAFETY: every id was validated (struct invariant).
            let row = base.wrapping_add(unsafe { row_unchecked(id) } * stride);
            if heads_only {
                kernels::prefetch_row_heads_l2(row, dim);
            } else {
                kernels::prefetch_lines_l2(row, dim);
            }
        };
        let rows = Rows {
            base,
            stride,
            ids,
            ahead,
            prefetch: &prefetch,
        };
        // Start the task's first rows together rather than one miss at a
        // time; `Rows::get` then keeps `ahead` rows in flight.
        let (start, end) = (offsets[0], offsets[offsets.len() - 1]);
        ids[start..end.min(start + ahead)]
            .iter()
            .copied()
            .for_each(prefetch);
        for (b, dst) in out.chunks_exact_mut(dim).enumerate() {
            let bag = offsets[b]..offsets[b + 1];
            if bag.is_empty() {
                dst.fill(0.0);
                continue;
            }
            if pooling == Pooling::Max {
                reduce_row(s, bag, &rows, |_| 0.0, Fold::Max, dst);
                continue;
            }
            let w = weights.map(|w| &w[bag.clone()]);
            let d = normaliser(pooling, bag.len(), w);
            if d == 0.0 {
                dst.fill(0.0);
                continue;
            }
            let unit = coefficient(1.0, d);
            match w {
                // `1 * e == e` bit for bit (NaN, infinities and -0 included),
                // so the multiply by a unit coefficient can go.
                None if unit == 1.0 => reduce_row(s, bag, &rows, |_| 1.0, Fold::Sum, dst),
                None => reduce_row(s, bag, &rows, |_| unit, Fold::Scaled, dst),
                Some(w) => {
                    let lo = bag.start;
                    let coef = |j: usize| coefficient(w[j - lo], d);
                    reduce_row(s, bag, &rows, coef, Fold::Scaled, dst)
                }
            }
        }
    }
}

/// The padded table rows of a task's ids, prefetching `ahead` positions on.
struct Rows<'a, I, P> {
    base: *const f32,
    stride: usize,
    ids: &'a [I],
    ahead: usize,
    prefetch: &'a P,
}

impl<I: Index, P: Fn(I)> Rows<'_, I, P> {
    /// The padded row of position `j`, after prefetching (when asked) the
    /// row `ahead` positions on (its first line of every 512 bytes), past
    /// this task's ids too, into L2.
    #[inline(always)]
    fn get(&self, j: usize, prefetch: bool) -> *const f32 {
        if prefetch && let Some(&next) = self.ids.get(j + self.ahead) {
            (self.prefetch)(next);
        }
        // SAFETY: j < ids.len() (the bags index `ids`), and the id was
        // validated (PoolBags invariant), so r < rows and the row's
        // `stride` floats lie in the table's rows * stride buffer.
        unsafe {
            let r = row_unchecked(*self.ids.get_unchecked(j));
            self.base.add(r * self.stride)
        }
    }
}

/// How [`reduce_block`] folds a bag's rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// `acc = 0; acc += e_j`: a sum whose coefficients are all 1.
    Sum,
    /// `acc = 0; acc += c_j * e_j`, each product rounded before its sum.
    Scaled,
    /// `acc = e_first; acc = max(e_j, acc)`, as [`Simd::max`] breaks ties.
    Max,
}

/// Accumulator vectors [`reduce_row`] keeps in registers per pass over a
/// bag, by tier and fold.
///
/// AVX2 has 16 `ymm` registers: a plain sum (`vaddps` from memory) holds a
/// whole 128-float row in all 16 and walks the bag's rows once, as FBGEMM's
/// AVX2 kernel does. With this, direct stores to the output and no multiply
/// by 1, W4-sum went from 39.8 to 32.4 ms of CPU on one thread of the 2-core
/// Zen 3 (torch's `embedding_bag` 39.2 in the same run); the walk count
/// alone was within noise there. A scaled sum needs two more (the coefficient and the
/// product) and Max one (`maxps` keeps its second operand, the
/// accumulator, so the row must be loaded first), so with 16 they spill,
/// and they keep 8 and walk the bag twice for such a row. The AVX-512 tier
/// keeps [`BLOCK_VECTORS`] (8 × 16 floats: one pass for a 128-float row),
/// as tuned on a Zen 4; no AVX-512 machine was at hand to re-measure it.
const fn block_vectors(tier: Tier, fold: Fold) -> usize {
    match (tier, fold) {
        (Tier::Avx2, Fold::Sum) => 16,
        _ => BLOCK_VECTORS,
    }
}

/// Reduces the bag's rows into `dst` (`dim` floats), a block of up to
/// [`block_vectors`] vectors of columns at a time.
///
/// Only the first block prefetches, since later blocks read rows already
/// fetched.
#[inline(always)]
fn reduce_row<S: Simd, I: Index, P: Fn(I)>(
    s: S,
    bag: Range<usize>,
    rows: &Rows<'_, I, P>,
    coef: impl Fn(usize) -> f32 + Copy,
    fold: Fold,
    dst: &mut [f32],
) {
    // Vectors covering `dim`: whole vectors of the padded row (the stride
    // is a multiple of 16 floats, and `S::N` divides 16).
    let vectors = dst.len().div_ceil(S::N);
    let most = block_vectors(S::TIER, fold);
    let mut done = 0;
    while done < vectors {
        let (first, col) = (done == 0, done * S::N);
        let bag = bag.clone();
        done += match vectors - done {
            n if n >= 16 && most >= 16 => {
                reduce_block::<S, I, P, 16>(s, bag, rows, coef, fold, first, col, dst)
            }
            n if n >= 8 => reduce_block::<S, I, P, 8>(s, bag, rows, coef, fold, first, col, dst),
            n if n >= 4 => reduce_block::<S, I, P, 4>(s, bag, rows, coef, fold, first, col, dst),
            n if n >= 2 => reduce_block::<S, I, P, 2>(s, bag, rows, coef, fold, first, col, dst),
            _ => reduce_block::<S, I, P, 1>(s, bag, rows, coef, fold, first, col, dst),
        };
    }
}

/// Reduces columns `col..col + V * S::N` of the bag's padded rows with the
/// accumulators in registers, stores the ones below `dst.len()` into `dst`
/// (the pad columns are computed and dropped), and returns `V`.
///
/// Lane by lane this is the order of the module's contract: sums start at
/// zero and add `c_j * e_j` (or `e_j`) in bag order; Max starts from the
/// first row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn reduce_block<S: Simd, I: Index, P: Fn(I), const V: usize>(
    s: S,
    bag: Range<usize>,
    rows: &Rows<'_, I, P>,
    coef: impl Fn(usize) -> f32,
    fold: Fold,
    prefetch: bool,
    col: usize,
    dst: &mut [f32],
) -> usize {
    // SAFETY: `col + V * S::N` floats lie within the padded row (reduce_row
    // only asks for vectors covering `dim`, and the stride is whole vectors).
    let load = |row: *const f32, v: usize| unsafe {
        s.load(std::slice::from_raw_parts(row.add(col + v * S::N), S::N))
    };
    let (mut acc, rest) = match fold {
        Fold::Sum | Fold::Scaled => ([s.splat(0.0); V], bag),
        Fold::Max => {
            let first = rows.get(bag.start, prefetch);
            (
                std::array::from_fn(|v| load(first, v)),
                bag.start + 1..bag.end,
            )
        }
    };
    for j in rest {
        let row = rows.get(j, prefetch);
        match fold {
            Fold::Sum => {
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = s.add(*acc, load(row, v));
                }
            }
            Fold::Scaled => {
                let c = s.splat(coef(j));
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = s.add(*acc, s.mul(c, load(row, v)));
                }
            }
            Fold::Max => {
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = s.max(load(row, v), *acc);
                }
            }
        }
    }
    let dim = dst.len();
    for (v, acc) in acc.into_iter().enumerate() {
        let at = col + v * S::N;
        if at + S::N <= dim {
            s.store(acc, &mut dst[at..at + S::N]);
        } else if at < dim {
            s.store_partial(acc, &mut dst[at..]);
        }
    }
    V
}

impl SparseGrad {
    /// Adds the gradient of [`pooled_lookup`](EmbeddingTable::pooled_lookup)
    /// given `grad_out`, the gradient of its output (`bags.len() * dim`
    /// floats, row-major).
    ///
    /// Row `ids[j]` of bag `b` gets `c_j · grad_out[b]` with the forward's
    /// coefficients (Sum `w_j`, Mean `w_j / Σw`, SqrtN `w_j / √Σw²`); for
    /// [`Pooling::Max`], lane `l` of `grad_out[b]` goes to the id that holds
    /// the maximum of lane `l` in bag `b` (the first one, on ties), found
    /// again from `table`, which must be the table of the forward pass.
    /// Duplicates are summed in batch order, as
    /// [`accumulate_lookup`](Self::accumulate_lookup) sums them; empty bags
    /// contribute nothing. Calls add up until [`clear`](Self::clear).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if this gradient's `dim` is not the table's
    /// or `grad_out.len() != bags.len() * dim`; [`Error::NonFinite`] for a
    /// NaN or infinite gradient value (or an overflowing coefficient);
    /// [`Error::InvalidConfig`] for [`Pooling::Max`] with weighted bags;
    /// [`Error::IndexOutOfRange`] for an id that is negative or beyond the
    /// table. On error nothing is accumulated.
    ///
    /// # Examples
    /// ```
    /// use embtable::{Bags, EmbeddingTable, Pooling, SparseGrad};
    /// let table = EmbeddingTable::from_rows(3, 2, &[1., 0., 3., 2., 5., -4.])?;
    /// let ids = [0u32, 1, 2, 1];
    /// let bags = Bags::new(&ids, &[0, 2, 4], None)?; // {0, 1}, {2, 1}
    /// let grad_out = [2., 4., 10., 10.];
    ///
    /// let mut grad = SparseGrad::for_table(&table);
    /// grad.accumulate_pooled(&table, &bags, Pooling::Mean, &grad_out)?;
    /// assert_eq!(grad.to_dense(3), [1., 2., 6., 7., 5., 5.]); // row 1: 1,2 + 5,5
    ///
    /// grad.clear();
    /// grad.accumulate_pooled(&table, &bags, Pooling::Max, &grad_out)?;
    /// // Bag 0's max (3, 2) is row 1; bag 1's is 5 from row 2, then 2 from row 1.
    /// assert_eq!(grad.to_dense(3), [0., 0., 2., 14., 10., 0.]);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn accumulate_pooled<I: Index>(
        &mut self,
        table: &EmbeddingTable,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
    ) -> Result<()> {
        let dim = table.dim();
        if self.dim() != dim {
            return Err(Error::ShapeMismatch {
                what: "gradient dim (the table's dim)",
                expected: dim,
                got: self.dim(),
            });
        }
        let expected = bags.len().saturating_mul(dim);
        Error::check_len(
            "pooled gradient length (bags * dim)",
            expected,
            grad_out.len(),
        )?;
        check_finite("gradient", grad_out)?;
        table.check_pooled(bags, pooling)?;
        self.validate(bags.ids)?;

        let tier = kernels::current();
        let mut bag_of = vec![0; bags.ids.len()];
        for (b, w) in bags.offsets.windows(2).enumerate() {
            bag_of[w[0]..w[1]].fill(b);
        }
        if pooling != Pooling::Max {
            let coef = coefficients(bags, pooling);
            let scaled = Scaled {
                grad_out,
                dim,
                bag_of: &bag_of,
                coef: &coef,
            };
            // SAFETY: ids validated against the table and this gradient above.
            unsafe { self.accumulate_unchecked(tier, bags.ids, &scaled) };
        } else {
            // SAFETY: ids validated against the table's rows above.
            let winner = unsafe { max_winners(table, bags) };
            let route = MaxRoute {
                grad_out,
                dim,
                bag_of: &bag_of,
                winner: &winner,
            };
            // SAFETY: ids validated against the table and this gradient above.
            unsafe { self.accumulate_unchecked(tier, bags.ids, &route) };
        }
        Ok(())
    }
}

/// Position `j` adds `coef[j] · grad_out[bag_of[j]]`.
struct Scaled<'a> {
    grad_out: &'a [f32],
    dim: usize,
    bag_of: &'a [usize],
    coef: &'a [f32],
}

impl Contribution for Scaled<'_> {
    #[inline(always)]
    fn add<S: Simd>(&self, s: S, j: usize, row: &mut [f32]) {
        let g = &self.grad_out[self.bag_of[j] * self.dim..][..self.dim];
        kernels::add_scaled(s, row, g, self.coef[j]);
    }
}

/// Position `j` adds lane `l` of `grad_out[bag_of[j]]` where it won lane `l`.
struct MaxRoute<'a> {
    grad_out: &'a [f32],
    dim: usize,
    bag_of: &'a [usize],
    /// `winner[b * dim + l]`: the position that holds bag `b`'s max of lane `l`.
    winner: &'a [usize],
}

impl Contribution for MaxRoute<'_> {
    #[inline(always)]
    fn add<S: Simd>(&self, _s: S, j: usize, row: &mut [f32]) {
        let b = self.bag_of[j];
        let g = &self.grad_out[b * self.dim..][..self.dim];
        let winner = &self.winner[b * self.dim..][..self.dim];
        for ((acc, &g), &w) in row.iter_mut().zip(g).zip(winner) {
            if w == j {
                *acc += g;
            }
        }
    }
}

/// For every bag and lane, the position whose row holds the bag's maximum
/// of that lane, found with the forward pass's rule (start from the first
/// row; a later row wins only where it is strictly greater). Empty bags get
/// `usize::MAX`, which no position equals.
///
/// # Safety
/// Every id of `bags` was validated against `table.rows()`.
unsafe fn max_winners<I: Index>(table: &EmbeddingTable, bags: &Bags<'_, I>) -> Vec<usize> {
    let dim = table.dim();
    let mut winner = vec![usize::MAX; bags.len() * dim];
    let find = |first_bag: usize, winner: &mut [usize], acc: &mut [f32]| {
        for (b, win) in winner.chunks_exact_mut(dim).enumerate() {
            let range = bags.range(first_bag + b);
            // SAFETY: every id was validated (caller), so each row exists.
            let row = |j: usize| unsafe { table.row_unchecked(row_unchecked(bags.ids[j])) };
            let Some(first) = range.clone().next() else {
                continue;
            };
            acc.copy_from_slice(row(first));
            win.fill(first);
            for j in range.skip(1) {
                for ((a, w), &x) in acc.iter_mut().zip(win.iter_mut()).zip(row(j)) {
                    if x > *a {
                        *a = x;
                        *w = j;
                    }
                }
            }
        }
    };
    let work = bags
        .ids
        .len()
        .saturating_add(bags.len())
        .saturating_mul(dim);
    if work < PARALLEL_MIN_FLOATS {
        find(0, &mut winner, &mut vec![0.0; dim]);
    } else {
        // Tasks own disjoint chunks of whole bags.
        let mean_len = (bags.ids.len() / bags.len()).max(1);
        let bags_per_task = (TASK_FLOATS / mean_len.saturating_mul(dim)).max(1);
        winner
            .par_chunks_mut(bags_per_task * dim)
            .enumerate()
            .for_each_init(
                || vec![0.0; dim],
                |acc, (task, winner)| find(task * bags_per_task, winner, acc),
            );
    }
    winner
}
