//! The all-to-all(v) exchanges of a sharded table, and the bytes they move.

use mpi::Count;
use mpi::datatype::{MutView, Partition, PartitionMut, UserDatatype, View};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::{Error, Result};

/// Bytes a rank has sent to other ranks (its own share, which stays in
/// the process, is not counted): what would cross the network on a cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes of ids, bag lengths and coefficients sent to owners.
    pub ids: u64,
    /// Bytes of rows (looked-up or pooled rows, gradients) sent.
    pub rows: u64,
    /// All-to-all exchanges taken part in (agreements not counted).
    pub exchanges: u64,
}

impl Traffic {
    /// All bytes sent.
    pub fn bytes(&self) -> u64 {
        self.ids + self.rows
    }
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, rhs: Traffic) -> Traffic {
        Traffic {
            ids: self.ids - rhs.ids,
            rows: self.rows - rhs.rows,
            exchanges: self.exchanges - rhs.exchanges,
        }
    }
}

/// The largest number of ids one rank may send in one call, so that what
/// any rank receives from all of them still fits MPI's `int` counts.
pub(crate) fn max_batch(world: usize) -> usize {
    i32::MAX as usize / world
}

/// `Err` unless a batch of `n` ids fits [`max_batch`].
pub(crate) fn check_batch(n: usize, world: usize) -> Result<()> {
    if n > max_batch(world) {
        return Err(Error::InvalidConfig {
            field: "batch",
            reason: format!(
                "{n} ids in one call exceed the {} a rank of {world} may send; split the batch",
                max_batch(world)
            ),
        });
    }
    Ok(())
}

/// Displacements of consecutive parts of `counts` items, as MPI counts.
/// Totals were bounded by [`check_batch`], so each fits an `int`.
fn displs(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect()
}

fn to_counts(counts: &[usize]) -> Vec<Count> {
    counts
        .iter()
        .map(|&c| Count::try_from(c).expect("counts are bounded by check_batch"))
        .collect()
}

/// One communicator with its byte counter.
pub(crate) struct Exchange<'a> {
    pub comm: &'a SimpleCommunicator,
    pub traffic: &'a mut Traffic,
}

impl Exchange<'_> {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    /// Sends `send` (part `k`, of `send_counts[k]` items, to rank `k`) and
    /// returns what every rank sent this one, in rank order.
    pub fn items<T: Equivalence + Copy + Default>(
        &mut self,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Vec<T> {
        let me = self.rank();
        let others: usize = send_counts
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != me)
            .map(|(_, &c)| c)
            .sum();
        self.traffic.ids += (others * size_of::<T>()) as u64;
        self.traffic.exchanges += 1;
        let (sc, rc) = (to_counts(send_counts), to_counts(recv_counts));
        let (sd, rd) = (displs(&sc), displs(&rc));
        let mut recv = vec![T::default(); recv_counts.iter().sum()];
        let send_part = Partition::new(send, &sc[..], &sd[..]);
        let mut recv_part = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
        self.comm
            .all_to_all_varcount_into(&send_part, &mut recv_part);
        recv
    }

    /// [`items`](Self::items) for rows of `dim` floats: the counts are
    /// rows, sent as one MPI datatype of `dim` floats, so a count is a row.
    /// `recv` is resized to what arrives, keeping its allocation: buffers
    /// of many megabytes reused from call to call cost no page faults.
    pub fn rows(
        &mut self,
        send: &[f32],
        dim: usize,
        send_counts: &[usize],
        recv_counts: &[usize],
        recv: &mut Vec<f32>,
    ) {
        let me = self.rank();
        let others: usize = send_counts
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != me)
            .map(|(_, &c)| c)
            .sum();
        self.traffic.rows += (others * dim * size_of::<f32>()) as u64;
        self.traffic.exchanges += 1;
        let recv_rows: usize = recv_counts.iter().sum();
        recv.clear();
        recv.resize(recv_rows * dim, 0.0);
        let row = UserDatatype::contiguous(
            Count::try_from(dim).expect("dim fits an MPI count (checked at creation)"),
            &f32::equivalent_datatype(),
        );
        let (sc, rc) = (to_counts(send_counts), to_counts(recv_counts));
        let (sd, rd) = (displs(&sc), displs(&rc));
        let send_rows = Count::try_from(send.len() / dim).expect("bounded by check_batch");
        let recv_rows = Count::try_from(recv_rows).expect("bounded by check_batch");
        // SAFETY: `row` is `dim` contiguous f32s, and `send` holds
        // `send_rows * dim` f32s (`recv` `recv_rows * dim`), so the views
        // cover exactly the buffers, with no padding.
        let send_view = unsafe { View::with_count_and_datatype(send, send_rows, &row) };
        // SAFETY: as above, for the receive buffer.
        let mut recv_view =
            unsafe { MutView::with_count_and_datatype(&mut recv[..], recv_rows, &row) };
        let send_part = Partition::new(&send_view, &sc[..], &sd[..]);
        let mut recv_part = PartitionMut::new(&mut recv_view, &rc[..], &rd[..]);
        self.comm
            .all_to_all_varcount_into(&send_part, &mut recv_part);
    }
}
