//! # embtable
//!
//! Fast, sparse and provably right embedding tables for NLP and recommender
//! training on the CPU: the layer that dominates their memory and time.
//!
//! * [`Embedding`]: the layer users of Keras' `Embedding` and PyTorch's
//!   `nn.Embedding` expect: a table, its optimizer and its sparse gradient,
//!   with padding rows, out-of-range policies ([`OutOfRange`]), frozen
//!   tables, `max_norm` as Keras or PyTorch apply it ([`EmbeddingOptions`]),
//!   n-d batches ([`Tensor`]), pooled bags, pretrained vectors
//!   ([`Embedding::from_pretrained`], [`Embedding::from_vectors`]) and
//!   options that change after it is built.
//! * [`EmbeddingTable`]: one flat, 64-byte aligned `f32` allocation with
//!   parallel, SIMD lookups ([`EmbeddingTable::lookup`]) and pooled lookups
//!   ([`EmbeddingTable::pooled_lookup`] over [`Bags`] with a [`Pooling`]:
//!   PyTorch `EmbeddingBag`, TensorFlow `embedding_lookup_sparse`).
//! * [`SparseGrad`]: the gradient of a lookup, kept sparse and coalesced
//!   (duplicate ids summed) from backward to the optimizer.
//! * [`optim`]: [`Sgd`], [`RmsProp`], [`Adagrad`] and [`RowWiseAdagrad`]
//!   behind the [`SparseOptimizer`] trait, updating only the rows in the
//!   batch, with Keras 3's formulas and defaults (and PyTorch presets),
//!   [`Semantics::Lazy`] or [`Semantics::DenseExact`].
//! * [`dynamic`]: tables keyed by any 64-bit id (hashed user and item
//!   ids, no vocabulary), with admission of new keys, LRU / LFU / TTL
//!   eviction under a capacity in rows or bytes, checkpoints and an
//!   incremental export; [`EmbeddingLayer`] is the calls its layer shares
//!   with [`Embedding`].
//! * [`io`]: word2vec, GloVe and fastText vectors (with gensim's
//!   `most_similar` and friends on [`io::Pretrained`]), `.npy`,
//!   safetensors, and checkpoints that include the optimizer state.
//! * [`shard`]: one table split row-wise over the ranks of an MPI job
//!   (feature `mpi`), equal bit for bit to one process on the ranks'
//!   batches together, with checkpoints that load on any number of ranks.
//!
//! Everything is proven equal to the dense formulation, a one-hot matrix
//! times the table, by property tests over random shapes, for every kernel
//! tier and thread count. `docs/COMING_FROM.md` in the repository maps the
//! calls of Keras, PyTorch and gensim to embtable's.
//!
//! ## Example
//!
//! A layer, a forward pass over a `(batch, seq_len)` batch, the backward
//! pass and an Adagrad step that touches only the rows in the batch:
//!
//! ```
//! use embtable::{Adagrad, Embedding, EmbeddingTable, Init, Tensor};
//!
//! // keras.layers.Embedding(10_000, 64): Keras' initialiser, seed 42.
//! let table = EmbeddingTable::new(10_000, 64, Init::default(), 42)?;
//! let untouched = table.row(18).to_vec();
//! let mut layer = Embedding::new(table, Adagrad::default());
//!
//! // Two sequences of three ids (any of u32, u64, usize, i32, i64).
//! let ids = Tensor::from_rows(&[[17i64, 4, 17], [9_999, 0, 0]])?;
//! let out = layer.forward_nd(&ids)?;
//! assert_eq!(out.shape(), &[2, 3, 64]);
//! assert_eq!(out.at(&[1, 0]), layer.table().row(9_999));
//!
//! // Backward: the gradient of the output, from your model, becomes a
//! // sparse gradient with one row per distinct id (17's two rows summed).
//! let grad_out = Tensor::new(vec![0.01; out.len()], out.shape())?;
//! layer.backward_nd(&ids, &grad_out)?;
//! assert_eq!(layer.grad().rows(), &[17, 4, 9_999, 0]);
//! layer.step()?;
//! assert_ne!(layer.table().row(17), out.at(&[0, 0]));
//! assert_eq!(layer.table().row(18), untouched); // rows outside the batch stay
//! # Ok::<(), embtable::Error>(())
//! ```
//!
//! The same without the layer: [`EmbeddingTable::lookup`],
//! [`SparseGrad::accumulate_lookup`], then [`SparseOptimizer::step`].
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
//! bandwidth; the repository's `workloads` crate (bench support, not part
//! of this library) generates them bit-exactly.
#![deny(missing_docs)]

mod aligned;
pub mod dynamic;
mod error;
mod grad;
mod grouping;
mod index;
mod init;
pub mod io;
pub mod kernels;
mod layer;
mod layers;
pub mod optim;
mod parallel;
pub mod phases;
pub mod pool;
pub mod shard;
mod similar;
mod table;
mod tensor;
mod weight_grad;

pub use aligned::AlignedBuf;
pub use error::{Error, Result};
pub use grad::SparseGrad;
pub use index::Index;
pub use init::Init;
pub use io::Vocab;
pub use layer::{Embedding, EmbeddingOptions, Frozen, MaxNormAt, OutOfRange};
pub use layers::EmbeddingLayer;
pub use optim::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamStyle, AdamW, AdamWConfig, EpsPlacement, Ftrl,
    FtrlConfig, OptimizerState, RmsProp, RmsPropConfig, RowGradients, RowWiseAdagrad,
    RowWiseAdagradConfig, Semantics, Sgd, SgdConfig, SgdStyle, SparseOptimizer, StateArray,
};
pub use pool::{Bags, Pooling};
pub use table::EmbeddingTable;
pub use tensor::Tensor;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
