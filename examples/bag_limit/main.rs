//! What W4's pooled sum (16,384 bags of 32 random rows of a 1M × 128 f32
//! table) can reach on this machine: variants of the bag-sum loop and raw
//! row-reading loops, timed interleaved in one process so that their
//! ratios share the load.
//!
//! ```sh
//! cargo run --release --example bag_limit -- --threads 1,2 --rounds 15
//! cargo run --release --example bag_limit -- --set focus
//! ```
//!
//! Every job runs once per round, the rounds one after the other (after a
//! warm-up round), so that a change of load hits all jobs alike. Each line
//! is `<job> threads=<N> median_ms=<x> cpu_ms=<c> gb_s=<g> vs_base=<r>
//! cpu_vs_base=<q>`: the medians over the rounds of the wall time, of the
//! CPU time of the process (user + system), the rate of the 268 MB of rows
//! read, and of the ratios of wall and CPU time to `base`'s in the same
//! round. `library` is embtable's `pooled_lookup` (`Pooling::Sum`), which
//! now does what `lines1` does (the first line of each row prefetched 16
//! rows ahead into L2).
//!
//! The bag-sum variants (`variants::Plan`) change one thing each from
//! `base`, which is the library's AVX2 sum as it was (and the `workloads`
//! example's bare loop until then): the software-prefetch distance (`d0`:
//! none … `d64`), how many of a row's 8 lines are prefetched (`lines4`,
//! `lines2`, `lines1`), the prefetch hint (`t0`, `t2`, `nta`; base is
//! `t1`), two or four bags' rows read in turn (`bags2`, `bags4`), 8
//! accumulators and two walks over each bag (`acc8`), non-temporal output
//! stores (`nt-store`), and the table on 4 KiB pages (`4k-…`; the others read a table advised as huge
//! pages, as embtable allocates it). The raw loops read whole rows without
//! summing them: `chase-N` as N dependent chains (one row in flight per
//! chain: `chase-1` is the latency of a random row, and the rate as N grows
//! shows how many rows the core keeps in flight on its own), `touch-dN`
//! independently with every line prefetched N rows ahead.
//!
//! Several threads split the bags (the ids, for the raw loops) into equal
//! contiguous halves, as embtable's pooled lookup does.

#[cfg(target_arch = "x86_64")]
mod limit;
#[cfg(target_arch = "x86_64")]
mod variants;

#[cfg(target_arch = "x86_64")]
fn main() -> std::process::ExitCode {
    limit::main()
}

#[cfg(not(target_arch = "x86_64"))]
fn main() -> std::process::ExitCode {
    eprintln!("error: bag_limit times AVX2 loops: x86-64 only");
    std::process::ExitCode::FAILURE
}
