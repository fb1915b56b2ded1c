//! `ShardedTable`: one table split row-wise over the ranks of an MPI
//! communicator, each rank an ordinary [`EmbeddingTable`] and optimizer.

use std::path::Path;

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use rayon::prelude::*;

use super::agree::{agree, exchange_counts};
use super::checkpoint::{read_shard, write_shard};
use super::exchange::{Exchange, Traffic, check_batch};
use super::{ShardLayout, Sharding};
use crate::index::validate_ids;
use crate::pool::{check_coefficients, check_max_weights, coefficients};
use crate::{Bags, EmbeddingTable, Error, Index, Init, Pooling, Result, SparseGrad, SparseOptimizer};

/// Where a sharded pooled lookup pools each bag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PoolOn {
    /// Each owner pools its part of every bag and sends back one row per
    /// bag it holds ids of; the caller adds the owners' rows in rank
    /// order: TorchRec's row-wise sharding. Moves one row per (bag,
    /// owner) instead of one per id. A bag whose ids all live on one rank
    /// (every bag, on one rank) is pooled bit for bit as
    /// [`EmbeddingTable::pooled_lookup`] pools it; a bag spread over ranks
    /// gets the same sum taken in another order (its rounding may differ
    /// in the last bits). [`Pooling::Max`] always pools on the caller.
    #[default]
    Owner,
    /// Owners send every row back and the caller pools: bit for bit
    /// [`EmbeddingTable::pooled_lookup`] for every bag, at one row per id.
    Caller,
}

/// An embedding table of `rows × dim` split row-wise over the ranks of an
/// MPI communicator ([`ShardLayout`]): each rank holds its rows in an
/// ordinary [`EmbeddingTable`] (its shard) and their state in an ordinary
/// [`SparseOptimizer`], so every optimizer, semantics and kernel of the
/// crate serves it unchanged.
///
/// Every method except the accessors is **collective**: all ranks of the
/// communicator call it, in the same order, each with its own batch of
/// ids of any rows. A lookup sends the ids to their owners with an
/// all-to-all, the owners gather the rows with
/// [`EmbeddingTable::lookup`], and a second all-to-all brings them back in
/// the caller's order. [`backward`](Self::backward) sends the output
/// gradients to the owners, which add them to their [`SparseGrad`] in rank
/// order; [`step`](Self::step) applies the owners' optimizers.
///
/// # Equal to one process, bit for bit
///
/// Call the ranks' batches, concatenated in rank order, the global batch.
/// Each owner sums a row's gradients in that order, as one process
/// summing the global batch would, so after any number of steps the
/// table and the optimizer state are bit for bit those of one process
/// running the global batches (for every optimizer, both semantics, any
/// number of ranks). Lookups are copies, so they are bitwise too, and so
/// are pooled lookups pooled on the caller ([`PoolOn`]).
///
/// # Errors reach every rank
///
/// Each operation first checks its input on every rank, then the ranks
/// agree (in the collective that exchanges the counts) before anything is
/// sent or written: an error on any rank makes the call return, on every
/// rank, the same [`Error::Rank`] naming the first failing rank and, in
/// its source, the position and value. Nothing has been written then, on
/// any rank, and no rank is left waiting in a collective.
///
/// # Examples
/// Run with `mpirun -np 4 ...`; each rank looks up and trains its own ids:
/// ```no_run
/// use embtable::shard::{ShardedTable, Sharding};
/// use embtable::{Adagrad, Init};
///
/// let universe = mpi::initialize().expect("MPI initialises once");
/// let world = universe.world();
/// let mut table = ShardedTable::new(
///     &world, 1_000_000, 64, Sharding::Range, Init::default(), 42, Adagrad::default(),
/// )?;
/// let ids = [17i64, 999_999, 17];
/// let out = table.lookup_vec(&ids)?;          // rows of any rank
/// table.backward(&ids, &vec![0.01; out.len()])?;
/// table.step()?;                              // every owner updates its rows
/// # Ok::<(), embtable::Error>(())
/// ```
pub struct ShardedTable<O> {
    comm: SimpleCommunicator,
    layout: ShardLayout,
    rank: usize,
    shard: EmbeddingTable,
    optimizer: O,
    grad: SparseGrad,
    pool_on: PoolOn,
    traffic: Traffic,
}

impl<O: std::fmt::Debug> std::fmt::Debug for ShardedTable<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedTable")
            .field("layout", &self.layout)
            .field("rank", &self.rank)
            .field("shard", &self.shard)
            .field("optimizer", &self.optimizer)
            .field("pool_on", &self.pool_on)
            .field("traffic", &self.traffic)
            .finish_non_exhaustive()
    }
}

/// The positions of a caller's batch grouped by owner, in batch order
/// within each owner.
struct Plan {
    /// Ids sent to each rank.
    counts: Vec<usize>,
    /// `order[k]`: the position of the `k`-th id sent.
    order: Vec<usize>,
    /// `local[k]`: the owner's row of the `k`-th id sent.
    local: Vec<u64>,
}

impl Plan {
    /// Groups validated `ids` by owner (a stable counting sort).
    fn new<I: Index>(layout: &ShardLayout, ids: &[I]) -> Plan {
        let world = layout.world();
        let located: Vec<(usize, usize)> = ids
            .iter()
            .map(|id| layout.locate(id.row().expect("ids were validated")))
            .collect();
        let mut counts = vec![0usize; world];
        for &(owner, _) in &located {
            counts[owner] += 1;
        }
        let mut next: Vec<usize> = counts
            .iter()
            .scan(0, |at, &c| {
                let start = *at;
                *at += c;
                Some(start)
            })
            .collect();
        let mut order = vec![0; ids.len()];
        let mut local = vec![0u64; ids.len()];
        for (position, &(owner, row)) in located.iter().enumerate() {
            let k = next[owner];
            next[owner] += 1;
            order[k] = position;
            local[k] = row as u64;
        }
        Plan {
            counts,
            order,
            local,
        }
    }

    fn counts64(&self) -> Vec<u64> {
        self.counts.iter().map(|&c| c as u64).collect()
    }
}

/// A caller's bags split into sub-bags, one per (bag, owner) pair with ids
/// there: what each owner pools (or routes the gradient of). Sub-bags of one
/// owner are in bag order, their ids in bag order.
struct SubBags {
    /// Ids and sub-bags sent to each rank: `(ids, sub_bags)`.
    counts: Vec<(usize, usize)>,
    /// Owners' rows of the ids, grouped by owner.
    local: Vec<u64>,
    /// The coefficient of each id (its bag's, as one process computes it).
    coef: Vec<f32>,
    /// Length of each sub-bag, grouped by owner.
    lens: Vec<u64>,
    /// The caller's bag of each sub-bag, grouped by owner.
    bag_of: Vec<usize>,
}

impl SubBags {
    /// Splits validated `bags` with the coefficients `coef` of its positions.
    fn new<I: Index>(layout: &ShardLayout, bags: &Bags<'_, I>, coef: &[f32]) -> SubBags {
        let world = layout.world();
        let mut local = vec![Vec::new(); world];
        let mut coefs = vec![Vec::new(); world];
        let mut lens: Vec<Vec<u64>> = vec![Vec::new(); world];
        let mut bag_of = vec![Vec::new(); world];
        let ids = bags.ids();
        for b in 0..bags.len() {
            for j in bags.range(b) {
                let (owner, row) = layout.locate(ids[j].row().expect("ids were validated"));
                if bag_of[owner].last() != Some(&b) {
                    bag_of[owner].push(b);
                    lens[owner].push(0);
                }
                *lens[owner].last_mut().expect("pushed above") += 1;
                local[owner].push(row as u64);
                coefs[owner].push(coef[j]);
            }
        }
        SubBags {
            counts: (0..world).map(|k| (local[k].len(), lens[k].len())).collect(),
            local: local.concat(),
            coef: coefs.concat(),
            lens: lens.concat(),
            bag_of: bag_of.concat(),
        }
    }

    fn counts64(&self) -> Vec<u64> {
        self.counts
            .iter()
            .flat_map(|&(ids, bags)| [ids as u64, bags as u64])
            .collect()
    }
}

/// What an owner received of a split batch of bags: the ids, coefficients
/// and offsets of every caller's sub-bags, in rank order.
struct Received {
    local: Vec<u64>,
    coef: Vec<f32>,
    offsets: Vec<usize>,
    /// Sub-bags received from each rank.
    bag_counts: Vec<usize>,
}

/// `(ids, sub-bags)` counts of each rank from [`exchange_counts`] with `per = 2`.
fn split_pairs(counts: &[u64]) -> (Vec<usize>, Vec<usize>) {
    counts.chunks_exact(2).map(|c| (c[0] as usize, c[1] as usize)).unzip()
}

impl<O: SparseOptimizer> ShardedTable<O> {
    /// A table of `rows × dim` split over the ranks of `comm` by
    /// `sharding`, drawn by `init` from `seed`: row `r` holds the values it
    /// has in `EmbeddingTable::new(rows, dim, init, seed)`, bit for bit,
    /// whatever the number of ranks. Each rank's shard is trained by its
    /// `optimizer` (give every rank the same config). The table keeps a
    /// duplicate of `comm`, so its messages never mix with the caller's.
    /// Collective.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad `init`, `dim` or optimizer config,
    /// or fewer rows than ranks; [`Error::ShapeMismatch`] for an optimizer
    /// already bound to another table; [`Error::Alloc`]. An error on any
    /// rank is returned on every rank as [`Error::Rank`].
    pub fn new(
        comm: &impl Communicator,
        rows: usize,
        dim: usize,
        sharding: Sharding,
        init: Init,
        seed: u64,
        optimizer: O,
    ) -> Result<Self> {
        let comm = comm.duplicate();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        let local = (|| {
            let layout = ShardLayout::new(rows, dim, world, sharding)?;
            init.validate()?;
            let mut shard = EmbeddingTable::zeros(layout.shard_rows(rank), dim)?;
            if init != Init::Zeros {
                let stride = shard.stride();
                shard
                    .as_padded_mut()
                    .par_chunks_mut(stride)
                    .with_min_len(256)
                    .enumerate()
                    .for_each(|(l, row)| init.fill_row(seed, layout.global(rank, l), &mut row[..dim]));
            }
            Ok((layout, shard))
        })();
        Self::assemble(comm, local, optimizer)
    }

    /// `table`, which every rank passes whole, split over the ranks of
    /// `comm` by `sharding`: each rank keeps its rows. Collective.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_table(
        comm: &impl Communicator,
        table: &EmbeddingTable,
        sharding: Sharding,
        optimizer: O,
    ) -> Result<Self> {
        let comm = comm.duplicate();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        let local = (|| {
            let layout = ShardLayout::new(table.rows(), table.dim(), world, sharding)?;
            let mut shard = EmbeddingTable::zeros(layout.shard_rows(rank), table.dim())?;
            for l in 0..shard.rows() {
                shard.row_mut(l).copy_from_slice(table.row(layout.global(rank, l)));
            }
            Ok((layout, shard))
        })();
        Self::assemble(comm, local, optimizer)
    }

    /// Loads a checkpoint saved by [`save`](Self::save) on any number of
    /// ranks, split over the ranks of `comm` by `sharding` (which may
    /// differ from the saved one): rows and optimizer state are bit for bit
    /// the saved ones, and training resumes as it would have. Each rank
    /// reads every shard file once and keeps its rows. Collective.
    ///
    /// # Errors
    /// As [`load_sharded_checkpoint`](super::load_sharded_checkpoint), and
    /// [`Error::InvalidConfig`] if the table has fewer rows than `comm` has
    /// ranks; on every rank as [`Error::Rank`].
    pub fn load(
        comm: &impl Communicator,
        dir: impl AsRef<Path>,
        sharding: Sharding,
        mut optimizer: O,
    ) -> Result<Self> {
        let comm = comm.duplicate();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        let local = (|| {
            let (layout, shard, state) = read_shard(dir.as_ref(), sharding, world, rank)?;
            let state = state.ok_or_else(|| Error::InvalidConfig {
                field: "optimizer",
                reason: format!(
                    "the checkpoint in {} holds no optimizer state",
                    dir.as_ref().display()
                ),
            })?;
            optimizer.load_state(state)?;
            Ok((layout, shard))
        })();
        Self::assemble(comm, local, optimizer)
    }

    /// The table of this rank's `local` outcome, once every rank agrees
    /// that every rank's was `Ok`.
    fn assemble(
        comm: SimpleCommunicator,
        local: Result<(ShardLayout, EmbeddingTable)>,
        mut optimizer: O,
    ) -> Result<Self> {
        let local = local.and_then(|(layout, mut shard)| {
            if i32::try_from(layout.dim()).is_err() {
                return Err(Error::InvalidConfig {
                    field: "dim",
                    reason: format!("{} columns exceed MPI's int counts", layout.dim()),
                });
            }
            // Checks the config (and that any state fits this shard):
            // nothing lags before a step, so nothing is written.
            optimizer.flush(&mut shard)?;
            Ok((layout, shard))
        });
        let (layout, shard) = match local {
            Ok(parts) => {
                agree(&comm, Ok(()))?;
                parts
            }
            Err(err) => return Err(agree(&comm, Err(err)).expect_err("this rank failed")),
        };
        Ok(Self {
            rank: comm.rank() as usize,
            grad: SparseGrad::for_table(&shard),
            comm,
            layout,
            shard,
            optimizer,
            pool_on: PoolOn::default(),
            traffic: Traffic::default(),
        })
    }

    // ------------------------------------------------------------ accessors

    /// Rows of the whole table.
    pub fn rows(&self) -> usize {
        self.layout.rows()
    }

    /// Columns of every row.
    pub fn dim(&self) -> usize {
        self.layout.dim()
    }

    /// How the rows are split over the ranks.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// This rank's index in the communicator.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The rows this rank holds, in local order (local row `l` is global
    /// row `layout().global(rank(), l)`).
    pub fn shard(&self) -> &EmbeddingTable {
        &self.shard
    }

    /// This rank's optimizer, with the state of this rank's rows.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// This rank's optimizer, mutably: a change of rate or schedule must be
    /// made on every rank alike for the ranks to stay one table.
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    /// The gradient of this rank's rows accumulated since the last step,
    /// from every rank's [`backward`](Self::backward) calls (local rows).
    pub fn grad(&self) -> &SparseGrad {
        &self.grad
    }

    /// Where pooled lookups pool (see [`PoolOn`]; default [`PoolOn::Owner`]).
    pub fn pool_on(&self) -> PoolOn {
        self.pool_on
    }

    /// Sets where pooled lookups pool; set it alike on every rank.
    pub fn set_pool_on(&mut self, pool_on: PoolOn) {
        self.pool_on = pool_on;
    }

    /// Bytes this rank has sent to other ranks so far (see [`Traffic`]).
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    // -------------------------------------------------------------- lookups

    /// Copies row `ids[j]` of the whole table to `out[j * dim..][..dim]`,
    /// whichever rank holds it. Under
    /// [`Semantics::DenseExact`](crate::Semantics::DenseExact) the owners
    /// first bring the rows current, as [`Embedding`](crate::Embedding)
    /// does. Collective.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `out.len() != ids.len() * dim`;
    /// [`Error::IndexOutOfRange`] for an id that is negative or `>= rows`;
    /// [`Error::InvalidConfig`] for a batch too large for MPI's counts. An
    /// error on any rank is returned on every rank as [`Error::Rank`], and
    /// no `out` is written.
    pub fn lookup<I: Index>(&mut self, ids: &[I], out: &mut [f32]) -> Result<()> {
        let dim = self.dim();
        let local = (|| {
            Error::check_len(
                "lookup output length (ids * dim)",
                ids.len().saturating_mul(dim),
                out.len(),
            )?;
            validate_ids(ids, self.rows())?;
            check_batch(ids.len(), self.layout.world())?;
            Ok(Plan::new(&self.layout, ids))
        })();
        let (plan, rows) = self.gather(local)?;
        for (k, &position) in plan.order.iter().enumerate() {
            out[position * dim..][..dim].copy_from_slice(&rows[k * dim..][..dim]);
        }
        Ok(())
    }

    /// [`lookup`](Self::lookup) into a new vector of `ids.len() * dim` floats.
    ///
    /// # Errors
    /// As [`lookup`](Self::lookup).
    pub fn lookup_vec<I: Index>(&mut self, ids: &[I]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; ids.len().saturating_mul(self.dim())];
        self.lookup(ids, &mut out)?;
        Ok(out)
    }

    /// The rows of a plan's ids, in the plan's order: ids to the owners,
    /// rows back. Agrees on `local` first and on the owners' work last.
    fn gather(&mut self, local: Result<Plan>) -> Result<(Plan, Vec<f32>)> {
        let (plan, counts) = match local {
            Ok(plan) => {
                let counts = plan.counts64();
                (Some(plan), Ok(counts))
            }
            Err(err) => (None, Err(err)),
        };
        let recv: Vec<usize> = exchange_counts(&self.comm, 1, counts)?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let plan = plan.expect("every rank agreed that its plan exists");
        let dim = self.dim();
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let wanted: Vec<u64> = ex.items(&plan.local, &plan.counts, &recv);
        let served = (|| {
            self.catch_up(&wanted)?;
            self.shard.lookup_vec(&wanted)
        })();
        let (rows, served) = match served {
            Ok(rows) => (rows, Ok(())),
            Err(err) => (vec![0.0; wanted.len() * dim], Err(err)),
        };
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let back = ex.rows(&rows, dim, &recv, &plan.counts);
        agree(&self.comm, served)?;
        Ok((plan, back))
    }

    /// Brings local `rows` current before they are read (DenseExact).
    fn catch_up(&mut self, rows: &[u64]) -> Result<()> {
        if self.optimizer.has_lagging_rows() {
            let rows: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
            self.optimizer.catch_up(&mut self.shard, &rows)?;
        }
        Ok(())
    }

    /// Reduces each bag of ids of the whole table to one row, as
    /// [`EmbeddingTable::pooled_lookup`] does: pooled on the owners or on
    /// the caller as [`pool_on`](Self::pool_on) says (see [`PoolOn`] for
    /// the bits and the bytes of each). Collective.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `out.len() != bags.len() * dim`;
    /// [`Error::InvalidConfig`] for [`Pooling::Max`] with weighted bags;
    /// [`Error::IndexOutOfRange`] naming the position in `bags.ids()`;
    /// [`Error::NonFinite`] if a Mean coefficient overflows. An error on
    /// any rank is returned on every rank as [`Error::Rank`], and no `out`
    /// is written.
    pub fn pooled_lookup<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        out: &mut [f32],
    ) -> Result<()> {
        let dim = self.dim();
        let checked = (|| {
            Error::check_len(
                "pooled lookup output length (bags * dim)",
                bags.len().saturating_mul(dim),
                out.len(),
            )?;
            check_max_weights(bags, pooling)?;
            validate_ids(bags.ids(), self.rows())?;
            check_coefficients(bags, pooling)?;
            check_batch(bags.ids().len(), self.layout.world())
        })();
        if self.pool_on == PoolOn::Caller || pooling == Pooling::Max {
            let (plan, rows) = self.gather(checked.map(|()| Plan::new(&self.layout, bags.ids())))?;
            return pool_gathered(&plan, &rows, dim, bags, pooling, out);
        }
        let local = checked.map(|()| SubBags::new(&self.layout, bags, &coefficients(bags, pooling)));
        let (sub, received) = self.send_sub_bags(local)?;
        let served = (|| {
            self.catch_up(&received.local)?;
            let owned = Bags::new(&received.local, &received.offsets, Some(&received.coef))?;
            self.shard.pooled_lookup_vec(&owned, Pooling::Sum)
        })();
        let (partial, served) = match served {
            Ok(rows) => (rows, Ok(())),
            Err(err) => (vec![0.0; (received.offsets.len() - 1) * dim], Err(err)),
        };
        let mine: Vec<usize> = sub.counts.iter().map(|c| c.1).collect();
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let back = ex.rows(&partial, dim, &received.bag_counts, &mine);
        agree(&self.comm, served)?;
        // The owners' partial rows of each bag, added in rank order (the
        // sub-bags arrive grouped by owner, owners in rank order).
        out.fill(0.0);
        for (s, &b) in sub.bag_of.iter().enumerate() {
            let acc = &mut out[b * dim..][..dim];
            for (a, &x) in acc.iter_mut().zip(&back[s * dim..][..dim]) {
                *a += x;
            }
        }
        Ok(())
    }

    /// Sends a split batch of bags to the owners (after agreeing on
    /// `local`): ids, coefficients and sub-bag lengths.
    fn send_sub_bags(&mut self, local: Result<SubBags>) -> Result<(SubBags, Received)> {
        let (sub, counts) = match local {
            Ok(sub) => {
                let counts = sub.counts64();
                (Some(sub), Ok(counts))
            }
            Err(err) => (None, Err(err)),
        };
        let (recv_ids, recv_bags) = split_pairs(&exchange_counts(&self.comm, 2, counts)?);
        let sub = sub.expect("every rank agreed that its split exists");
        let (send_ids, send_bags): (Vec<usize>, Vec<usize>) = sub.counts.iter().copied().unzip();
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let local = ex.items(&sub.local, &send_ids, &recv_ids);
        let coef = ex.items(&sub.coef, &send_ids, &recv_ids);
        let lens = ex.items(&sub.lens, &send_bags, &recv_bags);
        let offsets = std::iter::once(0)
            .chain(lens.iter().scan(0usize, |at, &n| {
                *at += n as usize;
                Some(*at)
            }))
            .collect();
        Ok((
            sub,
            Received {
                local,
                coef,
                offsets,
                bag_counts: recv_bags,
            },
        ))
    }

    // ------------------------------------------------------------- training

    /// Adds the gradient of [`lookup`](Self::lookup)`(ids)` given
    /// `grad_out`, the gradient of its output, to the owners' pending
    /// gradients (as [`SparseGrad::accumulate_lookup`]): each owner adds
    /// the rows it receives in rank order, each rank's in batch order.
    /// Calls add up until [`step`](Self::step). Collective.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `grad_out.len() != ids.len() * dim`;
    /// [`Error::NonFinite`] for a NaN or infinite gradient value;
    /// [`Error::IndexOutOfRange`] for a bad id. On every rank as
    /// [`Error::Rank`]; nothing is accumulated anywhere then.
    pub fn backward<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()> {
        let dim = self.dim();
        let local = (|| {
            Error::check_len(
                "gradient length (ids * dim)",
                ids.len().saturating_mul(dim),
                grad_out.len(),
            )?;
            crate::grad::check_finite("gradient", grad_out)?;
            validate_ids(ids, self.rows())?;
            check_batch(ids.len(), self.layout.world())?;
            Ok(Plan::new(&self.layout, ids))
        })();
        self.scatter_grads(local, |position| &grad_out[position * dim..][..dim])
    }

    /// Sends one gradient row per id of a plan to its owner, which adds them
    /// to its pending gradient in rank order.
    fn scatter_grads<'g>(
        &mut self,
        local: Result<Plan>,
        row_of: impl Fn(usize) -> &'g [f32],
    ) -> Result<()> {
        let (plan, counts) = match local {
            Ok(plan) => {
                let counts = plan.counts64();
                (Some(plan), Ok(counts))
            }
            Err(err) => (None, Err(err)),
        };
        let recv: Vec<usize> = exchange_counts(&self.comm, 1, counts)?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let plan = plan.expect("every rank agreed that its plan exists");
        let dim = self.dim();
        let mut send = Vec::with_capacity(plan.order.len() * dim);
        for &position in &plan.order {
            send.extend_from_slice(row_of(position));
        }
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let rows = ex.items(&plan.local, &plan.counts, &recv);
        let grads = ex.rows(&send, dim, &plan.counts, &recv);
        let added = self.grad.accumulate_lookup(&rows, &grads);
        agree(&self.comm, added)
    }

    /// Adds the gradient of [`pooled_lookup`](Self::pooled_lookup) given
    /// `grad_out` (`bags.len() * dim` floats), as
    /// [`SparseGrad::accumulate_pooled`] would on the whole table: each
    /// owner routes every bag's gradient to its ids with the bag's
    /// coefficients (sent with the bag, so only one gradient row per
    /// (bag, owner) moves). For [`Pooling::Max`] the caller first looks the
    /// bags' rows up to find the winners, then sends each id its lanes.
    /// Either way every row's sum is taken in the global batch's order, so
    /// steps stay bit for bit those of one process. Collective.
    ///
    /// # Errors
    /// As [`SparseGrad::accumulate_pooled`], on every rank as
    /// [`Error::Rank`]; nothing is accumulated anywhere then.
    pub fn backward_pooled<I: Index>(
        &mut self,
        bags: &Bags<'_, I>,
        pooling: Pooling,
        grad_out: &[f32],
    ) -> Result<()> {
        let dim = self.dim();
        let checked = (|| {
            Error::check_len(
                "pooled gradient length (bags * dim)",
                bags.len().saturating_mul(dim),
                grad_out.len(),
            )?;
            crate::grad::check_finite("gradient", grad_out)?;
            check_max_weights(bags, pooling)?;
            validate_ids(bags.ids(), self.rows())?;
            check_coefficients(bags, pooling)?;
            check_batch(bags.ids().len(), self.layout.world())
        })();
        if pooling == Pooling::Max {
            let (plan, rows) = self.gather(checked.map(|()| Plan::new(&self.layout, bags.ids())))?;
            let routed = route_max(&plan, &rows, dim, bags, grad_out);
            let plan = Plan::new(&self.layout, bags.ids());
            return self.scatter_grads(Ok(plan), |position| &routed[position * dim..][..dim]);
        }
        let local = checked.map(|()| SubBags::new(&self.layout, bags, &coefficients(bags, pooling)));
        let (sub, received) = self.send_sub_bags(local)?;
        let mut send = Vec::with_capacity(sub.bag_of.len() * dim);
        for &b in &sub.bag_of {
            send.extend_from_slice(&grad_out[b * dim..][..dim]);
        }
        let mine: Vec<usize> = sub.counts.iter().map(|c| c.1).collect();
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let grads = ex.rows(&send, dim, &mine, &received.bag_counts);
        // Each id gets coefficient × its bag's gradient: Sum with the
        // coefficients as weights computes exactly that product.
        let added = Bags::new(&received.local, &received.offsets, Some(&received.coef))
            .and_then(|owned| self.grad.accumulate_pooled(&self.shard, &owned, Pooling::Sum, &grads));
        agree(&self.comm, added)
    }

    /// Applies every owner's optimizer to its rows with the gradient
    /// accumulated since the last step, then clears it. An empty gradient
    /// is a step too, as for [`SparseOptimizer::step`]. Collective.
    ///
    /// # Errors
    /// [`Error::NonFinite`] if a summed gradient overflowed (`position` is
    /// `global row * dim + column`); the optimizer's errors. On every rank
    /// as [`Error::Rank`], and no rank has stepped (the one exception: the
    /// optimizer state is allocated on the first step, and if that
    /// allocation fails on one rank the others have stepped).
    pub fn step(&mut self) -> Result<()> {
        let dim = self.dim();
        let checked = self
            .grad
            .as_padded()
            .chunks_exact(self.grad.stride().max(1))
            .enumerate()
            .find_map(|(slot, row)| {
                let column = row[..dim].iter().position(|x| !x.is_finite())?;
                let global = self.layout.global(self.rank, self.grad.rows()[slot]);
                Some(Error::NonFinite {
                    what: "summed gradient (position: row * dim + column; a sum of finite gradients overflowed)",
                    position: global * dim + column,
                    value: row[column],
                })
            })
            .map_or(Ok(()), Err);
        agree(&self.comm, checked)?;
        let stepped = self.optimizer.step(&mut self.shard, &self.grad);
        if stepped.is_ok() {
            self.grad.clear();
        }
        agree(&self.comm, stepped)
    }

    /// [`backward`](Self::backward) then [`step`](Self::step).
    ///
    /// # Errors
    /// As those two; on error nothing is written anywhere.
    pub fn step_lookup<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()> {
        self.backward(ids, grad_out)?;
        self.step()
    }

    /// Forgets the gradient accumulated since the last step, on this rank's
    /// rows (call it on every rank, as the gradient comes from all).
    pub fn clear_grad(&mut self) {
        self.grad.clear();
    }

    /// Brings every row current on every rank (see
    /// [`SparseOptimizer::flush`]). Collective.
    ///
    /// # Errors
    /// The optimizer's, on every rank as [`Error::Rank`].
    pub fn flush(&mut self) -> Result<()> {
        let flushed = self.optimizer.flush(&mut self.shard);
        agree(&self.comm, flushed)
    }

    // ---------------------------------------------------------- whole table

    /// The whole table, gathered on every rank (for evaluation and tests of
    /// tables that fit one process). Rows as stored: call
    /// [`flush`](Self::flush) first under `DenseExact` for current rows.
    /// Collective.
    ///
    /// # Errors
    /// [`Error::Alloc`] if the table does not fit, on every rank as
    /// [`Error::Rank`].
    pub fn gather_table(&mut self) -> Result<EmbeddingTable> {
        let (dim, world) = (self.dim(), self.layout.world());
        let local = EmbeddingTable::zeros(self.rows(), dim);
        let (mut whole, ok) = match local {
            Ok(t) => (Some(t), Ok(())),
            Err(e) => (None, Err(e)),
        };
        agree(&self.comm, ok)?;
        let counts: Vec<usize> = (0..world).map(|k| self.layout.shard_rows(k)).collect();
        // Every rank sends its shard to every rank: an all-to-all whose
        // parts are all the same.
        let mine = self.shard.to_vec();
        let mut send = Vec::with_capacity(mine.len() * world);
        for _ in 0..world {
            send.extend_from_slice(&mine);
        }
        let send_counts = vec![self.shard.rows(); world];
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let all = ex.rows(&send, dim, &send_counts, &counts);
        let whole_ref = whole.as_mut().expect("every rank allocated");
        let mut at = 0;
        for (k, &n) in counts.iter().enumerate() {
            for l in 0..n {
                whole_ref
                    .row_mut(self.layout.global(k, l))
                    .copy_from_slice(&all[at * dim..][..dim]);
                at += 1;
            }
        }
        Ok(whole.expect("allocated"))
    }

    /// Saves the table and its optimizer state to the directory `dir`
    /// (created if missing), each rank its own shard file, atomically (see
    /// [`load_sharded_checkpoint`](super::load_sharded_checkpoint) for the
    /// files). The files of one save share an id, so a directory whose
    /// save was interrupted between ranks is refused when loaded, never
    /// mixed. Collective.
    ///
    /// # Errors
    /// [`Error::Io`] if a directory or file cannot be written;
    /// checkpoint validation errors; on every rank as [`Error::Rank`].
    pub fn save(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        // One id for the save, from rank 0's clock and process id.
        let mut id = 0u64;
        if self.rank == 0 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            id = nanos ^ (u64::from(std::process::id()) << 40);
        }
        self.comm.process_at_rank(0).broadcast_into(&mut id);
        let created = std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("creating the checkpoint directory {}", dir.display()),
            source,
        });
        agree(&self.comm, created)?;
        let written = write_shard(
            dir,
            &self.layout,
            self.rank,
            &format!("{id:016x}"),
            &self.shard,
            &self.optimizer,
        );
        agree(&self.comm, written)
    }
}

/// Pools bags from their rows gathered in `plan`'s order, on the caller,
/// with [`EmbeddingTable::pooled_lookup`] itself: the rows, put back in
/// position order, become a table whose row `j` is position `j`'s row.
fn pool_gathered<I: Index>(
    plan: &Plan,
    rows: &[f32],
    dim: usize,
    bags: &Bags<'_, I>,
    pooling: Pooling,
    out: &mut [f32],
) -> Result<()> {
    let n = plan.order.len();
    if n == 0 {
        out.fill(0.0); // only empty bags
        return Ok(());
    }
    let mut by_position = vec![0.0; n * dim];
    for (k, &position) in plan.order.iter().enumerate() {
        by_position[position * dim..][..dim].copy_from_slice(&rows[k * dim..][..dim]);
    }
    let table = EmbeddingTable::from_rows(n, dim, &by_position)?;
    let positions: Vec<u64> = (0..n as u64).collect();
    let local = Bags::new(&positions, bags.offsets(), bags.weights())?;
    table.pooled_lookup(&local, pooling, out)
}

/// The Max gradient of each position (`ids.len() * dim` floats): lane `l`
/// of bag `b`'s gradient for the position that holds the bag's maximum of
/// lane `l` (the first such, as the forward pass and
/// [`SparseGrad::accumulate_pooled`] choose it), zero elsewhere.
fn route_max<I: Index>(
    plan: &Plan,
    rows: &[f32],
    dim: usize,
    bags: &Bags<'_, I>,
    grad_out: &[f32],
) -> Vec<f32> {
    let n = plan.order.len();
    let mut slot_of = vec![0; n];
    for (k, &position) in plan.order.iter().enumerate() {
        slot_of[position] = k;
    }
    let row = |j: usize| &rows[slot_of[j] * dim..][..dim];
    let mut routed = vec![0.0; n * dim];
    let (mut best, mut winner) = (vec![0.0f32; dim], vec![0usize; dim]);
    for b in 0..bags.len() {
        let range = bags.range(b);
        let Some(first) = range.clone().next() else {
            continue;
        };
        best.copy_from_slice(row(first));
        winner.fill(first);
        for j in range.skip(1) {
            for ((a, w), &x) in best.iter_mut().zip(winner.iter_mut()).zip(row(j)) {
                if x > *a {
                    *a = x;
                    *w = j;
                }
            }
        }
        for (l, &j) in winner.iter().enumerate() {
            routed[j * dim + l] = grad_out[b * dim + l];
        }
    }
    routed
}
