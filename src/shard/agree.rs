//! Errors that reach every rank: a collective operation checks its input
//! on each rank, then the ranks agree, in one collective, on whether any
//! failed and which did first, before anything is written.
//!
//! The first failing rank (the lowest) sends its error to every rank as
//! bytes ([`encode`](super::wire::encode)), so every rank returns the same
//! [`Error::Rank`] naming that rank, the position and the value.

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::wire::{decode, encode};
use super::{PoolOn, Sharding};
use crate::{Error, Pooling, Result};

/// Agrees on `local`, every rank's own outcome: `Ok` on every rank if every
/// rank's is `Ok`, else on every rank the first failing rank's error,
/// wrapped in [`Error::Rank`]. Collective: every rank must call it.
pub(crate) fn agree(comm: &SimpleCommunicator, local: Result<()>) -> Result<()> {
    let world = comm.size();
    let mine = if local.is_err() { comm.rank() } else { world };
    let mut first = world;
    comm.all_reduce_into(&mine, &mut first, SystemOperation::min());
    if first == world {
        return Ok(());
    }
    Err(share_error(comm, first as usize, local.err()))
}

/// Whether `mine` holds on every rank. Collective.
pub(crate) fn all(comm: &SimpleCommunicator, mine: bool) -> bool {
    let mut every = 0i32;
    comm.all_reduce_into(&i32::from(mine), &mut every, SystemOperation::min());
    every == 1
}

/// The collective call a rank is making, sent in the header of every call
/// so that ranks making different calls (another method, another pooling,
/// another `PoolOn`, another sharding) all fail with an error naming the
/// rank that differs, instead of waiting in mismatched collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    /// Creating or loading a table with this sharding.
    Create(Sharding),
    /// A lookup.
    Lookup,
    /// A pooled lookup with this pooling, pooled where `PoolOn` says.
    Pooled(Pooling, PoolOn),
    /// The gradient of a lookup.
    Backward,
    /// The gradient of a pooled lookup with this pooling.
    BackwardPooled(Pooling),
    /// An optimizer step.
    Step,
    /// A lookup's gradient and a step in one.
    StepLookup,
    /// Bringing every row current.
    Flush,
    /// Gathering the whole table.
    GatherTable,
    /// Saving a checkpoint.
    Save,
}

const POOLINGS: [Pooling; 4] = [Pooling::Sum, Pooling::Mean, Pooling::SqrtN, Pooling::Max];
const POOL_ONS: [PoolOn; 3] = [PoolOn::Auto, PoolOn::Owner, PoolOn::Caller];

impl Call {
    /// Every call, in code order.
    fn all() -> impl Iterator<Item = Call> {
        let fixed = [
            Call::Create(Sharding::Range),
            Call::Create(Sharding::Modulo),
            Call::Lookup,
            Call::Backward,
            Call::Step,
            Call::StepLookup,
            Call::Flush,
            Call::GatherTable,
            Call::Save,
        ];
        let pooled = POOLINGS
            .into_iter()
            .flat_map(|p| POOL_ONS.into_iter().map(move |o| Call::Pooled(p, o)));
        let backward = POOLINGS.into_iter().map(Call::BackwardPooled);
        fixed.into_iter().chain(pooled).chain(backward)
    }

    fn code(self) -> u64 {
        Call::all()
            .position(|c| c == self)
            .expect("every call is listed") as u64
    }

    fn from_code(code: u64) -> Option<Call> {
        Call::all().nth(usize::try_from(code).ok()?)
    }
}

/// What a rank sends every rank at the start of a call: two counts for
/// each destination (ids and bags, or rows and columns: the call decides)
/// and one number the ranks sum (a byte preference, see
/// [`Incoming::sum`]).
pub(crate) struct Outgoing {
    pub a: Vec<usize>,
    pub b: Vec<usize>,
    pub vote: i64,
}

impl Outgoing {
    /// No counts: a call that moves nothing through all-to-alls.
    pub fn none(world: usize) -> Self {
        Outgoing {
            a: vec![0; world],
            b: vec![0; world],
            vote: 0,
        }
    }

    /// One count per destination.
    pub fn counts(a: Vec<usize>) -> Self {
        Outgoing {
            b: vec![0; a.len()],
            a,
            vote: 0,
        }
    }
}

/// What every rank sent this one at the start of a call, in rank order.
pub(crate) struct Incoming {
    pub a: Vec<usize>,
    pub b: Vec<usize>,
    /// The ranks' votes added up: the same on every rank.
    pub sum: i128,
}

/// Starts a collective call: every rank sends every rank its [`Call`], its
/// counts for that destination and its vote, in one all-to-all, and the
/// ranks agree on the outcome there. A rank whose `local` is `Err` sends a
/// marker instead, so every rank learns which ranks failed and returns the
/// first one's error ([`Error::Rank`], as [`agree`]). Ranks making
/// different calls all return an [`Error::Rank`] naming the first rank
/// whose call differs from rank 0's. On success nothing has been decided
/// differently on any rank.
pub(crate) fn begin(
    comm: &SimpleCommunicator,
    call: Call,
    local: Result<Outgoing>,
) -> Result<Incoming> {
    const FAILED: u64 = u64::MAX;
    const PER: usize = 4;
    let world = comm.size() as usize;
    let send: Vec<u64> = match &local {
        Ok(out) => {
            debug_assert!(out.a.len() == world && out.b.len() == world);
            (0..world)
                .flat_map(|k| {
                    [
                        call.code(),
                        out.a[k] as u64,
                        out.b[k] as u64,
                        out.vote as u64,
                    ]
                })
                .collect()
        }
        Err(_) => vec![FAILED; PER * world],
    };
    let mut recv = vec![0u64; PER * world];
    comm.all_to_all_into(&send[..], &mut recv[..]);
    // Every rank receives every rank's code, so all see the same failures
    // and the same calls, and decide alike.
    let codes: Vec<u64> = recv.chunks_exact(PER).map(|c| c[0]).collect();
    if let Some(first) = codes.iter().position(|&c| c == FAILED) {
        return Err(share_error(comm, first, local.err()));
    }
    if let Some(other) = codes.iter().position(|&c| c != codes[0]) {
        let name = |code: u64| {
            Call::from_code(code).map_or_else(|| format!("call {code}"), |c| format!("{c:?}"))
        };
        return Err(Error::Rank {
            rank: other,
            source: Box::new(Error::InvalidConfig {
                field: "call",
                reason: format!(
                    "rank {other} called {} while rank 0 called {}: every rank must make the same \
                     calls, in the same order, with the same pooling, pool_on and sharding",
                    name(codes[other]),
                    name(codes[0])
                ),
            }),
        });
    }
    let mut incoming = Incoming {
        a: Vec::with_capacity(world),
        b: Vec::with_capacity(world),
        sum: 0,
    };
    for c in recv.chunks_exact(PER) {
        incoming.a.push(c[1] as usize);
        incoming.b.push(c[2] as usize);
        incoming.sum += i128::from(c[3] as i64);
    }
    Ok(incoming)
}

/// The error of rank `first`, sent from there to every rank: `mine` is this
/// rank's own error (`Some` on `first`).
fn share_error(comm: &SimpleCommunicator, first: usize, mine: Option<Error>) -> Error {
    let root = comm.process_at_rank(first as i32);
    let is_root = comm.rank() as usize == first;
    let mut bytes = match (&mine, is_root) {
        (Some(err), true) => encode(err),
        _ => Vec::new(),
    };
    let mut len = bytes.len() as u64;
    root.broadcast_into(&mut len);
    bytes.resize(len as usize, 0);
    root.broadcast_into(&mut bytes[..]);
    let source = match (mine, is_root) {
        (Some(err), true) => err,
        _ => decode(&bytes),
    };
    match source {
        // Already named (an error of a nested collective): keep one rank.
        Error::Rank { .. } => source,
        source => Error::Rank {
            rank: first,
            source: Box::new(source),
        },
    }
}
