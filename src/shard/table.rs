//! `ShardedTable`: one table split row-wise over the ranks of an MPI
//! communicator, each rank an ordinary [`EmbeddingTable`] and optimizer.

use std::path::Path;

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use rayon::prelude::*;

use super::agree::{Call, Incoming, Outgoing, agree, all, begin};
use super::checkpoint::{commit_shard, read_shard, remove_other_saves, stage_shard};
use super::exchange::{Exchange, Traffic, check_batch};
use super::{ShardLayout, Sharding};
use crate::index::validate_ids;
use crate::pool::{check_coefficients, check_max_weights, coefficients};
use crate::{
    Bags, EmbeddingTable, Error, Index, Init, Pooling, Result, SparseGrad, SparseOptimizer,
};

/// Where a sharded pooled lookup pools each bag.
///
/// Either way the caller gets every bag pooled with the coefficients one
/// process uses; they differ in the bytes moved and in the order of the
/// additions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PoolOn {
    /// Per call, whichever of the two below moves fewer bytes between
    /// ranks, counted over all ranks (the ranks add up their counts in the
    /// all-to-all that starts every call, so they all choose alike), the
    /// owners on a tie. Bags of several ids pool on the owners, bags of one
    /// id on the caller; on one rank, where nothing moves, the owner is the
    /// caller and pools as [`EmbeddingTable::pooled_lookup`] does, bit for
    /// bit.
    #[default]
    Auto,
    /// Each owner pools its part of every bag and sends back one row per
    /// bag it holds ids of; the caller adds the owners' rows in rank
    /// order: TorchRec's row-wise sharding. Moves one row per (bag,
    /// owner) instead of one per id, plus 4 bytes of coefficient per id
    /// and 8 bytes of length per (bag, owner). A bag whose ids all live
    /// on one rank is pooled bit for bit as
    /// [`EmbeddingTable::pooled_lookup`] pools it; a bag spread over ranks
    /// gets the same sum taken in another order (its rounding may differ
    /// in the last bits). [`Pooling::Max`] always pools on the caller.
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
/// Each operation first checks its input on every rank. Its first
/// collective, one small all-to-all, carries each rank's call and counts,
/// or the news that its input failed, so the ranks agree before anything
/// is sent or written: an error on any rank makes the call return, on
/// every rank, the same [`Error::Rank`] naming the first failing rank and,
/// in its source, the position and value; ranks making different calls
/// (another method, pooling or [`PoolOn`]) all return an error naming the
/// first rank that differs from rank 0. Nothing has been written then, on
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
    /// Rows about to be sent, and rows received, kept from call to call.
    send: Vec<f32>,
    recv: Vec<f32>,
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
            counts: (0..world)
                .map(|k| (local[k].len(), lens[k].len()))
                .collect(),
            local: local.concat(),
            coef: coefs.concat(),
            lens: lens.concat(),
            bag_of: bag_of.concat(),
        }
    }

    fn id_counts(&self) -> Vec<usize> {
        self.counts.iter().map(|c| c.0).collect()
    }

    fn bag_counts(&self) -> Vec<usize> {
        self.counts.iter().map(|c| c.1).collect()
    }

    /// The header of a call that sends these sub-bags: ids and sub-bags
    /// per owner, and the vote for pooling on the owners: the bytes that
    /// pooling there moves between ranks, minus those that pooling on the
    /// caller moves, for this rank's bags (ids to the owners are 8 bytes
    /// either way; the owners need 4 more of coefficient per id and 8 of
    /// length per sub-bag, and send one row per sub-bag instead of one
    /// per id). Rank `me`'s own part never leaves the process.
    fn header(&self, dim: usize, me: usize) -> Outgoing {
        let row = 4 * dim as i128;
        let vote: i128 = self
            .counts
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != me)
            .map(|(_, &(ids, bags))| {
                let (ids, bags) = (ids as i128, bags as i128);
                4 * ids + 8 * bags + row * (bags - ids)
            })
            .sum();
        Outgoing {
            a: self.id_counts(),
            b: self.bag_counts(),
            vote: vote.clamp(i64::MIN.into(), i64::MAX.into()) as i64,
        }
    }
}

/// What an owner received of a split batch of bags: the ids, coefficients
/// and offsets of every caller's sub-bags, in rank order.
struct Received {
    local: Vec<u64>,
    coef: Vec<f32>,
    offsets: Vec<usize>,
}

/// `Ok(t)` and its header, or the error (with no header) to begin with.
fn split<T>(
    local: Result<T>,
    header: impl FnOnce(&T) -> Outgoing,
) -> (Option<T>, Result<Outgoing>) {
    match local {
        Ok(t) => {
            let out = header(&t);
            (Some(t), Ok(out))
        }
        Err(err) => (None, Err(err)),
    }
}

/// The checks of a pooled call, made before its ranks vote, then its bags
/// split by owner (`Ok`) or, when pooled on the caller, its ids grouped by
/// owner (`Err`).
fn checked_split<I: Index>(
    layout: &ShardLayout,
    rows: usize,
    bags: &Bags<'_, I>,
    pooling: Pooling,
    on_caller: bool,
) -> Result<std::result::Result<SubBags, Plan>> {
    check_max_weights(bags, pooling)?;
    validate_ids(bags.ids(), rows)?;
    check_coefficients(bags, pooling)?;
    check_batch(bags.ids().len(), layout.world())?;
    Ok(if on_caller {
        Err(Plan::new(layout, bags.ids()))
    } else {
        Ok(SubBags::new(layout, bags, &coefficients(bags, pooling)))
    })
}

/// The header announcing a [`checked_split`] result.
fn bags_header(split: &std::result::Result<SubBags, Plan>, dim: usize, me: usize) -> Outgoing {
    match split {
        Err(plan) => Outgoing::counts(plan.counts.clone()),
        Ok(sub) => sub.header(dim, me),
    }
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
    /// fewer rows than ranks, or ranks that disagree on `rows`, `dim` or
    /// `sharding`; [`Error::ShapeMismatch`] for an optimizer already bound
    /// to another table; [`Error::Alloc`]. An error on any rank is returned
    /// on every rank as [`Error::Rank`].
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
                    .for_each(|(l, row)| {
                        init.fill_row(seed, layout.global(rank, l), &mut row[..dim])
                    });
            }
            Ok((layout, shard))
        })();
        Self::assemble(comm, sharding, local, optimizer)
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
                shard
                    .row_mut(l)
                    .copy_from_slice(table.row(layout.global(rank, l)));
            }
            Ok((layout, shard))
        })();
        Self::assemble(comm, sharding, local, optimizer)
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
        Self::assemble(comm, sharding, local, optimizer)
    }

    /// The table of this rank's `local` outcome, once every rank agrees
    /// that every rank's was `Ok` and that all made the same table.
    fn assemble(
        comm: SimpleCommunicator,
        sharding: Sharding,
        local: Result<(ShardLayout, EmbeddingTable)>,
        mut optimizer: O,
    ) -> Result<Self> {
        let world = comm.size() as usize;
        let local = local.and_then(|(layout, mut shard)| {
            if i32::try_from(layout.dim()).is_err() {
                return Err(Error::InvalidConfig {
                    field: "dim",
                    reason: format!("{} columns exceed MPI's int counts", layout.dim()),
                });
            }
            // Checks the config and that any loaded state fits this shard,
            // bringing no row current (none is named).
            optimizer.catch_up(&mut shard, &[])?;
            Ok((layout, shard))
        });
        let (parts, header) = split(local, |(layout, _)| Outgoing {
            a: vec![layout.rows(); world],
            b: vec![layout.dim(); world],
            vote: 0,
        });
        let shapes = begin(&comm, Call::Create(sharding), header)?;
        for (what, values) in [("rows", &shapes.a), ("dim", &shapes.b)] {
            if let Some(other) = values.iter().position(|&v| v != values[0]) {
                return Err(Error::Rank {
                    rank: other,
                    source: Box::new(Error::InvalidConfig {
                        field: what,
                        reason: format!(
                            "rank {other} made a table of {} {what}, rank 0 of {}: every rank must make the same table",
                            values[other], values[0]
                        ),
                    }),
                });
            }
        }
        let (layout, shard) = parts.expect("every rank agreed that its shard exists");
        Ok(Self {
            rank: comm.rank() as usize,
            grad: SparseGrad::for_table(&shard),
            comm,
            layout,
            shard,
            optimizer,
            pool_on: PoolOn::default(),
            traffic: Traffic::default(),
            send: Vec::new(),
            recv: Vec::new(),
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
        let (plan, header) = split(local, |plan| Outgoing::counts(plan.counts.clone()));
        let incoming = begin(&self.comm, Call::Lookup, header)?;
        let plan = plan.expect("every rank agreed that its plan exists");
        self.fetch(&plan, &incoming.a)?;
        for (k, &position) in plan.order.iter().enumerate() {
            out[position * dim..][..dim].copy_from_slice(&self.recv[k * dim..][..dim]);
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

    /// The rows of a plan's ids, into `self.recv` in the plan's order: ids
    /// to the owners (`recv[k]` come from rank `k`), rows back. Agrees on
    /// the owners' work at the end.
    fn fetch(&mut self, plan: &Plan, recv: &[usize]) -> Result<()> {
        let dim = self.dim();
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let wanted: Vec<u64> = ex.items(&plan.local, &plan.counts, recv);
        self.send.clear();
        self.send.resize(wanted.len() * dim, 0.0);
        // On error nothing is written: zeros go back, and then the error.
        let served = self
            .catch_up(&wanted)
            .and_then(|()| self.shard.lookup(&wanted, &mut self.send));
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        ex.rows(&self.send, dim, recv, &plan.counts, &mut self.recv);
        agree(&self.comm, served)
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
        let (me, layout) = (self.rank, self.layout);
        let on_caller = self.pool_on == PoolOn::Caller || pooling == Pooling::Max;
        let local = (|| {
            Error::check_len(
                "pooled lookup output length (bags * dim)",
                bags.len().saturating_mul(dim),
                out.len(),
            )?;
            checked_split(&layout, self.rows(), bags, pooling, on_caller)
        })();
        let (split_bags, header) = split(local, |split| bags_header(split, dim, me));
        let incoming = begin(&self.comm, Call::Pooled(pooling, self.pool_on), header)?;
        let owners_pool = match self.pool_on {
            _ if on_caller => false,
            // A tie (one rank: nothing leaves the process either way)
            // pools on the owner, which reads each row once, in place.
            PoolOn::Auto => incoming.sum <= 0,
            PoolOn::Owner => true,
            PoolOn::Caller => false,
        };
        match split_bags.expect("every rank agreed that its split exists") {
            Ok(sub) if owners_pool => self.pool_on_owners(&sub, &incoming, out),
            _ => {
                // The ids go to the owners in the same order either way,
                // so the counts of the header serve.
                let plan = Plan::new(&layout, bags.ids());
                self.fetch(&plan, &incoming.a)?;
                pool_gathered(&plan, &self.recv, dim, bags, pooling, out)
            }
        }
    }

    /// Sends each owner its sub-bags (ids, coefficients, lengths), which
    /// it pools as weighted sums and sends back; adds each bag's parts in
    /// rank order into `out`.
    fn pool_on_owners(
        &mut self,
        sub: &SubBags,
        incoming: &Incoming,
        out: &mut [f32],
    ) -> Result<()> {
        let dim = self.dim();
        let received = self.send_sub_bags(sub, incoming);
        self.send.clear();
        self.send.resize((received.offsets.len() - 1) * dim, 0.0);
        // On error nothing is written: zeros go back, and then the error.
        let served = self.catch_up(&received.local).and_then(|()| {
            let owned = Bags::new(&received.local, &received.offsets, Some(&received.coef))?;
            self.shard
                .pooled_lookup(&owned, Pooling::Sum, &mut self.send)
        });
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        ex.rows(
            &self.send,
            dim,
            &incoming.b,
            &sub.bag_counts(),
            &mut self.recv,
        );
        agree(&self.comm, served)?;
        let back = &self.recv;
        // The sub-bags arrive grouped by owner, owners in rank order, so
        // each bag's parts are added in rank order.
        out.fill(0.0);
        for (s, &b) in sub.bag_of.iter().enumerate() {
            let acc = &mut out[b * dim..][..dim];
            for (a, &x) in acc.iter_mut().zip(&back[s * dim..][..dim]) {
                *a += x;
            }
        }
        Ok(())
    }

    /// Sends a split batch of bags to the owners: ids, coefficients and
    /// sub-bag lengths (`incoming` holds what each rank sends this one).
    fn send_sub_bags(&mut self, sub: &SubBags, incoming: &Incoming) -> Received {
        let (send_ids, send_bags) = (sub.id_counts(), sub.bag_counts());
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let local = ex.items(&sub.local, &send_ids, &incoming.a);
        let coef = ex.items(&sub.coef, &send_ids, &incoming.a);
        let lens = ex.items(&sub.lens, &send_bags, &incoming.b);
        let offsets = std::iter::once(0)
            .chain(lens.iter().scan(0usize, |at, &n| {
                *at += n as usize;
                Some(*at)
            }))
            .collect();
        Received {
            local,
            coef,
            offsets,
        }
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
        let (plan, header) = split(local, |plan| Outgoing::counts(plan.counts.clone()));
        let incoming = begin(&self.comm, Call::Backward, header)?;
        let plan = plan.expect("every rank agreed that its plan exists");
        self.send_grads(&plan, &incoming.a, |position| {
            &grad_out[position * dim..][..dim]
        })
    }

    /// Sends one gradient row per id of a plan to its owner (`recv[k]`
    /// come from rank `k`), which adds them to its pending gradient in
    /// rank order.
    fn send_grads<'g>(
        &mut self,
        plan: &Plan,
        recv: &[usize],
        row_of: impl Fn(usize) -> &'g [f32],
    ) -> Result<()> {
        let rows = self.send_rows(plan, recv, row_of);
        let added = self.grad.accumulate_lookup(&rows, &self.recv);
        agree(&self.comm, added)
    }

    /// Sends one row per id of a plan (`row_of(position)`) with the id to
    /// its owner (`recv[k]` come from rank `k`): returns the local rows of
    /// the ids received, whose rows are in `self.recv`, in rank order.
    fn send_rows<'g>(
        &mut self,
        plan: &Plan,
        recv: &[usize],
        row_of: impl Fn(usize) -> &'g [f32],
    ) -> Vec<u64> {
        let dim = self.dim();
        self.send.clear();
        for &position in &plan.order {
            self.send.extend_from_slice(row_of(position));
        }
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        let rows = ex.items(&plan.local, &plan.counts, recv);
        ex.rows(&self.send, dim, &plan.counts, recv, &mut self.recv);
        rows
    }

    /// Adds the gradient of [`pooled_lookup`](Self::pooled_lookup) given
    /// `grad_out` (`bags.len() * dim` floats), as
    /// [`SparseGrad::accumulate_pooled`] would on the whole table: each
    /// owner routes every bag's gradient to its ids with the bag's
    /// coefficients (sent with the bag, so only one gradient row per
    /// (bag, owner) moves, whatever [`PoolOn`] says). For [`Pooling::Max`]
    /// the caller first looks the bags' rows up to find the winners, then
    /// sends each id its lanes. Either way every row's sum is taken in the
    /// global batch's order, so steps stay bit for bit those of one
    /// process. Collective.
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
        let (me, layout) = (self.rank, self.layout);
        let local = (|| {
            Error::check_len(
                "pooled gradient length (bags * dim)",
                bags.len().saturating_mul(dim),
                grad_out.len(),
            )?;
            crate::grad::check_finite("gradient", grad_out)?;
            checked_split(&layout, self.rows(), bags, pooling, pooling == Pooling::Max)
        })();
        let (split_bags, header) = split(local, |split| bags_header(split, dim, me));
        let incoming = begin(&self.comm, Call::BackwardPooled(pooling), header)?;
        let sub = match split_bags.expect("every rank agreed that its split exists") {
            Err(plan) => {
                self.fetch(&plan, &incoming.a)?;
                let routed = route_max(&plan, &self.recv, dim, bags, grad_out);
                return self.send_grads(&plan, &incoming.a, |position| {
                    &routed[position * dim..][..dim]
                });
            }
            Ok(sub) => sub,
        };
        let received = self.send_sub_bags(&sub, &incoming);
        self.send.clear();
        for &b in &sub.bag_of {
            self.send.extend_from_slice(&grad_out[b * dim..][..dim]);
        }
        let mut ex = Exchange {
            comm: &self.comm,
            traffic: &mut self.traffic,
        };
        ex.rows(
            &self.send,
            dim,
            &sub.bag_counts(),
            &incoming.b,
            &mut self.recv,
        );
        // Each id gets coefficient × its bag's gradient: Sum with the
        // coefficients as weights computes exactly that product.
        let owned = Bags::new(&received.local, &received.offsets, Some(&received.coef));
        let added = owned.and_then(|owned| {
            let (grad, shard) = (&mut self.grad, &self.shard);
            grad.accumulate_pooled(shard, &owned, Pooling::Sum, &self.recv)
        });
        agree(&self.comm, added)
    }

    /// Applies every owner's optimizer to its rows with the gradient
    /// accumulated since the last step, then clears it. An empty gradient
    /// is a step too, as for [`SparseOptimizer::step`]. Collective.
    ///
    /// # Errors
    /// [`Error::NonFinite`] if a summed gradient overflowed (`position` is
    /// `global row * dim + column`); [`Error::InvalidConfig`] for an
    /// optimizer config made invalid on some rank. On every rank as
    /// [`Error::Rank`], and no rank has stepped (the one exception: the
    /// optimizer state is allocated on the first step, and if that
    /// allocation fails on one rank the others have stepped).
    pub fn step(&mut self) -> Result<()> {
        let dim = self.dim();
        let world = self.layout.world();
        // A sum of finite gradients may overflow: looked for unless the
        // gradient's own bound proves every sum finite.
        let overflowed = if self.grad.is_proven_finite() {
            None
        } else {
            self.grad
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
        };
        let checked = match overflowed {
            Some(err) => Err(err),
            // The config and the state's shape, checked without writing.
            None => self.optimizer.catch_up(&mut self.shard, &[]),
        };
        begin(
            &self.comm,
            Call::Step,
            checked.map(|()| Outgoing::none(world)),
        )?;
        let stepped = self.optimizer.step(&mut self.shard, &self.grad);
        if stepped.is_ok() {
            self.grad.clear();
        }
        agree(&self.comm, stepped)
    }

    /// [`backward`](Self::backward) then [`step`](Self::step), bit for
    /// bit, in one call: the fastest way to train a table whose gradient
    /// comes from one lookup per step. When no gradient is pending and the
    /// sums are provably finite (the ranks send the largest magnitude of
    /// their gradients in the call's first all-to-all), each owner applies
    /// [`SparseOptimizer::step_lookup`] to what it receives, which sums and
    /// updates each row in one pass; otherwise the owners accumulate and
    /// step as the two calls would. Collective.
    ///
    /// # Errors
    /// As those two; on every rank as [`Error::Rank`], and nothing is
    /// written anywhere then.
    pub fn step_lookup<I: Index>(&mut self, ids: &[I], grad_out: &[f32]) -> Result<()> {
        let (dim, world) = (self.dim(), self.layout.world());
        let local = (|| {
            Error::check_len(
                "gradient length (ids * dim)",
                ids.len().saturating_mul(dim),
                grad_out.len(),
            )?;
            let max_abs = crate::grad::max_abs_finite("gradient", grad_out)?;
            validate_ids(ids, self.rows())?;
            check_batch(ids.len(), world)?;
            // The config and the state's shape, checked without writing.
            self.optimizer.catch_up(&mut self.shard, &[])?;
            Ok((Plan::new(&self.layout, ids), max_abs))
        })();
        let (parts, header) = split(local, |(plan, max_abs)| Outgoing {
            a: plan.counts.clone(),
            b: vec![max_abs.to_bits() as usize; world],
            vote: 0,
        });
        let incoming = begin(&self.comm, Call::StepLookup, header)?;
        let (plan, _) = parts.expect("every rank agreed that its plan exists");
        let rows = self.send_rows(&plan, &incoming.a, |position| {
            &grad_out[position * dim..][..dim]
        });
        // Every sum this owner takes has at most `terms` terms of at most
        // the senders' largest magnitudes.
        let magnitude: f64 = incoming
            .a
            .iter()
            .zip(&incoming.b)
            .map(|(&n, &bits)| n as f64 * f64::from(f32::from_bits(bits as u32)))
            .sum();
        let terms = incoming.a.iter().sum::<usize>() as u64;
        let fusable = self.grad.is_empty() && crate::grad::sums_proven_finite(magnitude, terms);
        if all(&self.comm, fusable) {
            let stepped = self
                .optimizer
                .step_lookup(&mut self.shard, &rows, &self.recv);
            return agree(&self.comm, stepped);
        }
        let added = self.grad.accumulate_lookup(&rows, &self.recv);
        agree(&self.comm, added)?;
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
    /// The optimizer's, on every rank as [`Error::Rank`]; no rank has
    /// written then.
    pub fn flush(&mut self) -> Result<()> {
        let world = self.layout.world();
        let checked = self.optimizer.catch_up(&mut self.shard, &[]);
        begin(
            &self.comm,
            Call::Flush,
            checked.map(|()| Outgoing::none(world)),
        )?;
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
        let (whole, header) = split(EmbeddingTable::zeros(self.rows(), dim), |_| {
            Outgoing::none(world)
        });
        begin(&self.comm, Call::GatherTable, header)?;
        let mut whole = whole.expect("every rank allocated");
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
        let mut all = Vec::new();
        ex.rows(&send, dim, &send_counts, &counts, &mut all);
        let mut at = 0;
        for (k, &n) in counts.iter().enumerate() {
            for l in 0..n {
                whole
                    .row_mut(self.layout.global(k, l))
                    .copy_from_slice(&all[at * dim..][..dim]);
                at += 1;
            }
        }
        Ok(whole)
    }

    /// Saves the table and its optimizer state to the directory `dir`
    /// (created if missing), each rank its own shard file (see
    /// [`load_sharded_checkpoint`](super::load_sharded_checkpoint) for the
    /// files), in two phases: every rank first writes its file under a
    /// temporary name; only once every rank has succeeded does each
    /// rename its file into place. A save that fails on any rank leaves
    /// the previous checkpoint in `dir` as it was, on every rank. The
    /// files of one save share an id, so files of different saves are
    /// refused when loaded, never mixed; shard files of an earlier save by
    /// another number of ranks are removed once the new save is in place.
    /// Collective.
    ///
    /// # Errors
    /// [`Error::Io`] if a directory or file cannot be written, on every
    /// rank as [`Error::Rank`].
    pub fn save(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let world = self.layout.world();
        let created = std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("creating the checkpoint directory {}", dir.display()),
            source,
        });
        begin(
            &self.comm,
            Call::Save,
            created.map(|()| Outgoing::none(world)),
        )?;
        // One id for the save, from rank 0's clock and process id.
        let mut id = 0u64;
        if self.rank == 0 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            id = nanos ^ (u64::from(std::process::id()) << 40);
        }
        self.comm.process_at_rank(0).broadcast_into(&mut id);
        let id = format!("{id:016x}");
        let (staged, outcome) = match stage_shard(
            dir,
            &self.layout,
            self.rank,
            &id,
            &self.shard,
            &self.optimizer,
        ) {
            Ok(path) => (Some(path), Ok(())),
            Err(err) => (None, Err(err)),
        };
        if let Err(err) = agree(&self.comm, outcome) {
            if let Some(path) = staged {
                // Best effort: the save failed on another rank, and a
                // staged file is never loaded anyway.
                let _ = std::fs::remove_file(path);
            }
            return Err(err);
        }
        let staged = staged.expect("every rank agreed that its file is staged");
        agree(&self.comm, commit_shard(dir, &staged, self.rank, world))?;
        let removed = if self.rank == 0 {
            remove_other_saves(dir, world)
        } else {
            Ok(())
        };
        agree(&self.comm, removed)
    }
}

/// Pools bags from their rows gathered in `plan`'s order, on the caller,
/// with [`EmbeddingTable::pooled_lookup`] itself: the rows become a table,
/// and each position of a bag reads the row that arrived for it.
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
    // The rows as they arrived form a table; position `j` reads its slot.
    let table = EmbeddingTable::from_rows(n, dim, &rows[..n * dim])?;
    let mut slot_of = vec![0u64; n];
    for (k, &position) in plan.order.iter().enumerate() {
        slot_of[position] = k as u64;
    }
    let local = Bags::new(&slot_of, bags.offsets(), bags.weights())?;
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
