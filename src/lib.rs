//! # embtable
//!
//! Fast, sparse and provably right embedding tables for NLP and recommender
//! training on the CPU: the layer that dominates their memory and time.
//!
//! * [`EmbeddingTable`]: one flat, 64-byte aligned `f32` allocation with
//!   parallel, SIMD lookups ([`EmbeddingTable::lookup`], Keras `Embedding`,
//!   PyTorch `nn.Embedding`) and pooled lookups
//!   ([`EmbeddingTable::pooled_lookup`] over [`Bags`] with a [`Pooling`]:
//!   PyTorch `EmbeddingBag`, TensorFlow `embedding_lookup_sparse`).
//! * [`SparseGrad`]: the gradient of a lookup, kept sparse and coalesced
//!   (duplicate ids summed) from backward to the optimizer.
//! * [`optim`]: [`Sgd`], [`RmsProp`], [`Adagrad`] and [`RowWiseAdagrad`]
//!   behind the [`SparseOptimizer`] trait, updating only the rows in the
//!   batch, with Keras 3's formulas and defaults (and PyTorch presets),
//!   [`Semantics::Lazy`] or [`Semantics::DenseExact`].
//! * [`Embedding`]: a table, its optimizer and its gradient as one layer,
//!   with padding rows, out-of-range policies ([`OutOfRange`]), frozen
//!   tables and `max_norm` ([`EmbeddingOptions`]).
//! * [`io`]: word2vec, GloVe and fastText vectors, `.npy`, and
//!   checkpoints that include the optimizer state.
//!
//! Everything is proven equal to the dense formulation, a one-hot matrix
//! times the table, by property tests over random shapes, for every kernel
//! tier and thread count.
//!
//! ## Example
//!
//! ```
//! use embtable::{EmbeddingTable, Init, SparseGrad};
//!
//! // 10,000 rows of 64 floats, Keras' default initialiser, seed 42.
//! let table = EmbeddingTable::new(10_000, 64, Init::default(), 42)?;
//!
//! // Forward: a batch of ids (any of u32, u64, usize, i32, i64).
//! let ids: Vec<i64> = vec![17, 4, 17, 9_999];
//! let out = table.lookup_vec(&ids)?; // 4 × 64 floats, row-major
//! assert_eq!(&out[..64], table.row(17));
//!
//! // Backward: the gradient of the output becomes a sparse gradient with
//! // one row per distinct id (row 17 gets the sum of its two rows).
//! let grad_out = vec![0.01f32; out.len()];
//! let mut grad = SparseGrad::for_table(&table);
//! grad.accumulate_lookup(&ids, &grad_out)?;
//! assert_eq!(grad.rows(), &[17, 4, 9_999]);
//! assert_eq!(grad.row_grad(0)[0], 0.02);
//! # Ok::<(), embtable::Error>(())
//! ```
//!
//! ## Data layout
//!
//! A table of `rows × dim` is one allocation of `rows * stride` floats, where
//! `stride` is `dim` rounded up to 16 floats (one cache line); the pad lanes
//! are zero. The buffer is 64-byte aligned (2 MiB aligned and advised as
//! transparent huge pages from 32 MiB on Linux), so every row starts on a
//! cache line and kernels work on whole strides. Optimizer state uses the
//! same layout, so a row of weights and its row of state share one index.
//! Offsets are `usize`: tables beyond 2³¹ elements work. Lookup outputs and
//! gradients are dense row-major `n × dim` slices, as in NumPy or PyTorch.
//!
//! ## Errors
//!
//! Input is validated once per batch, before anything is written: an id out
//! of range, a length mismatch, a NaN in a gradient returns an [`Error`]
//! naming the position and the value, and leaves tables, state and output
//! buffers exactly as they were. The hot loops then run unchecked.
//!
//! ## Portability and performance
//!
//! Kernels come in four tiers ([`kernels::Tier`]): AVX-512F and AVX2+FMA on
//! x86-64, portable SIMD (`wide`) everywhere, and a scalar oracle. The best
//! tier the CPU runs is detected once and cached, so the default build is
//! fast everywhere and `-C target-cpu=native` is not needed (it only lets the
//! compiler use newer instructions in the non-kernel code). `EMBTABLE_TIER`
//! forces a tier process-wide and [`kernels::with_tier`] for one call. All
//! tiers give bitwise identical results: kernels never fuse multiply and add
//! and never reorder a sum.
//!
//! Lookups are memory-bound. Large batches run in parallel on rayon's pool
//! (install a pool to choose the thread count); upcoming rows are prefetched
//! so several DRAM fetches are in flight; the hot loop has no bounds checks.
//! Results never depend on the thread count. The benchmarks in `benches/`
//! measure the workloads of `WORKLOADS.md` against the machine's memory
//! bandwidth; [`workloads`] generates them bit-exactly.
#![deny(missing_docs)]

pub mod aligned;
mod error;
mod grad;
mod index;
mod init;
pub mod io;
pub mod kernels;
mod layer;
pub mod optim;
pub mod pool;
mod table;
mod weight_grad;
pub mod workloads;

pub use aligned::AlignedBuf;
pub use error::{Error, Result};
pub use grad::SparseGrad;
pub use index::Index;
pub use init::Init;
pub use io::Vocab;
pub use layer::{Embedding, EmbeddingOptions, OutOfRange};
pub use optim::{
    Adagrad, AdagradConfig, EpsPlacement, OptimizerState, RmsProp, RmsPropConfig, RowWiseAdagrad,
    RowWiseAdagradConfig, Semantics, Sgd, SgdConfig, SgdStyle, SparseOptimizer, StateArray,
};
pub use pool::{Bags, Pooling};
pub use table::EmbeddingTable;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
