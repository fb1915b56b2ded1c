//! # embtable
//!
//! Fast, sparse and provably right embedding tables for NLP and recommender
//! training on the CPU.
//!
//! TODO(crate docs)
#![deny(missing_docs)]

pub mod aligned;
mod error;
mod grad;
mod index;
mod init;
pub mod kernels;
pub mod pool;
mod table;
pub mod workloads;

pub use aligned::AlignedBuf;
pub use error::{Error, Result};
pub use grad::SparseGrad;
pub use index::Index;
pub use init::Init;
pub use pool::{Bags, Pooling};
pub use table::EmbeddingTable;
