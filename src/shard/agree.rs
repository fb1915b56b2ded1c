//! Errors that reach every rank: a collective operation checks its input
//! on each rank, then the ranks agree, in one collective, on whether any
//! failed and which did first, before anything is written.
//!
//! The first failing rank (the lowest) sends its error to every rank as
//! bytes ([`encode`], [`decode`]), so every rank returns the same
//! [`Error::Rank`] naming that rank, the position and the value.

use std::collections::BTreeSet;
use std::sync::Mutex;

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

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

// ------------------------------------------------------------ wire format

/// Bytes of `err`: a tag, then its fields (integers little-endian, strings
/// length-prefixed). Only for [`decode`] on another rank of the same build.
pub(crate) fn encode(err: &Error) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    match err {
        Error::IndexOutOfRange {
            position,
            index,
            rows,
        } => {
            w.u8(0);
            w.usize(*position);
            w.bytes(&index.to_le_bytes());
            w.usize(*rows);
        }
        Error::ShapeMismatch {
            what,
            expected,
            got,
        } => {
            w.u8(1);
            w.str(what);
            w.usize(*expected);
            w.usize(*got);
        }
        Error::NonFinite {
            what,
            position,
            value,
        } => {
            w.u8(2);
            w.str(what);
            w.usize(*position);
            w.bytes(&value.to_bits().to_le_bytes());
        }
        Error::InvalidConfig { field, reason } => {
            w.u8(3);
            w.str(field);
            w.str(reason);
        }
        Error::InvalidOffsets {
            position,
            value,
            reason,
        } => {
            w.u8(4);
            w.usize(*position);
            w.usize(*value);
            w.str(reason);
        }
        Error::Alloc { what, bytes } => {
            w.u8(5);
            w.str(what);
            w.usize(*bytes);
        }
        Error::Io { context, source } => {
            w.u8(6);
            w.str(context);
            w.str(&source.to_string());
        }
        Error::Format { line, reason } => {
            w.u8(7);
            w.usize(*line);
            w.str(reason);
        }
        Error::Rank { rank, source } => {
            w.u8(8);
            w.usize(*rank);
            w.bytes(&encode(source));
        }
    }
    w.0
}

/// The error [`encode`] wrote. An I/O error comes back with its message
/// and kind `Other`.
///
/// # Panics
/// If `bytes` were not written by [`encode`] (a bug, never input).
pub(crate) fn decode(bytes: &[u8]) -> Error {
    let mut r = Reader(bytes);
    match r.u8() {
        0 => Error::IndexOutOfRange {
            position: r.usize(),
            index: i128::from_le_bytes(r.take(16).try_into().expect("16 bytes")),
            rows: r.usize(),
        },
        1 => Error::ShapeMismatch {
            what: intern(r.str()),
            expected: r.usize(),
            got: r.usize(),
        },
        2 => Error::NonFinite {
            what: intern(r.str()),
            position: r.usize(),
            value: f32::from_bits(u32::from_le_bytes(r.take(4).try_into().expect("4 bytes"))),
        },
        3 => Error::InvalidConfig {
            field: intern(r.str()),
            reason: r.str().to_owned(),
        },
        4 => Error::InvalidOffsets {
            position: r.usize(),
            value: r.usize(),
            reason: intern(r.str()),
        },
        5 => Error::Alloc {
            what: intern(r.str()),
            bytes: r.usize(),
        },
        6 => Error::Io {
            context: r.str().to_owned(),
            source: std::io::Error::other(r.str().to_owned()),
        },
        7 => Error::Format {
            line: r.usize(),
            reason: r.str().to_owned(),
        },
        8 => Error::Rank {
            rank: r.usize(),
            source: Box::new(decode(r.0)),
        },
        tag => panic!("error tag {tag} was not written by encode"),
    }
}

/// The `&'static str` fields of [`Error`] (which name a buffer or a
/// config field) are a small fixed set of literals in the crate: an error
/// from another rank gets a copy of its text, leaked once per distinct
/// text, never once per error.
fn intern(s: &str) -> &'static str {
    static TEXTS: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut texts = TEXTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&known) = texts.get(s) {
        return known;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    texts.insert(leaked);
    leaked
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    fn usize(&mut self, x: usize) {
        self.0.extend_from_slice(&(x as u64).to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.usize(s.len());
        self.bytes(s.as_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn usize(&mut self) -> usize {
        u64::from_le_bytes(self.take(8).try_into().expect("8 bytes")) as usize
    }
    fn str(&mut self) -> &'a str {
        let n = self.usize();
        std::str::from_utf8(self.take(n)).expect("encode wrote UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_round_trips_with_the_same_message() {
        let errors = [
            Error::IndexOutOfRange {
                position: 3,
                index: -7,
                rows: 10,
            },
            Error::ShapeMismatch {
                what: "gradient length (ids * dim)",
                expected: 8,
                got: 6,
            },
            Error::NonFinite {
                what: "gradient",
                position: 5,
                value: f32::NAN,
            },
            Error::InvalidConfig {
                field: "lr",
                reason: "-1 is negative".into(),
            },
            Error::InvalidOffsets {
                position: 1,
                value: 9,
                reason: "offsets must not decrease",
            },
            Error::Alloc {
                what: "table",
                bytes: usize::MAX,
            },
            Error::Io {
                context: "writing x".into(),
                source: std::io::Error::other("disk full"),
            },
            Error::Format {
                line: 0,
                reason: "bad".into(),
            },
            Error::Rank {
                rank: 2,
                source: Box::new(Error::Format {
                    line: 1,
                    reason: "inner".into(),
                }),
            },
        ];
        for err in &errors {
            let back = decode(&encode(err));
            assert_eq!(back.to_string(), err.to_string());
            assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(err));
        }
        assert!(std::ptr::eq(intern("gradient"), intern("gradient")));
    }
}
