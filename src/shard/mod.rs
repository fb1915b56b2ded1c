//! Tables split row-wise over the ranks of an MPI communicator.
//!
//! Recommender tables outgrow one machine long before their models do.
//! TorchRec's answer, row-wise sharding, is what this module does: every
//! rank holds whole rows of the table, and their optimizer state, in the
//! ordinary layout of this crate (an [`EmbeddingTable`](crate::EmbeddingTable)
//! and any [`SparseOptimizer`](crate::SparseOptimizer) per rank), and ids
//! and rows move between ranks with MPI's all-to-all collectives.
//!
//! - [`ShardLayout`] and [`Sharding`]: which rank holds which row (by
//!   range or by `id mod world`). Plain arithmetic, always available.
//! - `ShardedTable` (feature `mpi`): lookups, pooled lookups, backward and
//!   optimizer steps over MPI (rsmpi over the system's MPI library), bit
//!   for bit equal to one process running the ranks' batches
//!   concatenated; errors on any rank reach every rank; checkpoints with
//!   one file per rank that load on any number of ranks.
//! - [`load_sharded_checkpoint`]: such a checkpoint into one ordinary
//!   table and optimizer, in one process without MPI.
//!
//! # Bytes moved per step
//!
//! For a rank with `n` ids of `dim` floats (ids sent as 8 bytes), about
//! `(world − 1) / world` of everything goes to other ranks when ids fall
//! evenly: a lookup sends `8n` bytes of ids and `4·n·dim` of rows back; a
//! backward `8n + 4·n·dim`. A pooled lookup pooled on the owners sends
//! `12n` (ids and coefficients) plus 8 bytes and `4·dim` per (bag, owner)
//! pair, and its backward the same. The README's cost model works these
//! out for a cluster and compares them with TorchRec.

mod checkpoint;
mod layout;
mod wire;

#[cfg(feature = "mpi")]
mod agree;
#[cfg(feature = "mpi")]
mod exchange;
#[cfg(feature = "mpi")]
mod table;

pub use checkpoint::{load_sharded_checkpoint, shard_file_name};
#[cfg(feature = "mpi")]
pub use exchange::Traffic;
pub use layout::{ShardLayout, Sharding};
#[cfg(feature = "mpi")]
pub use table::{PoolOn, ShardedTable};
