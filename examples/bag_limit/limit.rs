//! The benchmark itself (x86-64 only: the variants are AVX2 loops).

use std::process::ExitCode;
use std::time::Instant;

use crate::variants::{self, DIM, Hint, Plan};
use embtable::{AlignedBuf, Bags, EmbeddingTable, Init, Pooling};
use workloads::{BAG_LEN, BAGS, BIG_ROWS, cpu_ms, median};

/// One timed loop over the whole batch, on `threads` threads.
enum Job {
    /// embtable's `pooled_lookup` with `Pooling::Sum`, on a rayon pool of
    /// the job's threads.
    Library,
    Sum {
        plan: Plan,
        small_pages: bool,
    },
    Chase(usize),
    Touch {
        distance: usize,
        line_step: usize,
    },
}

/// The grid of prefetch distances, lines per row and hints (`--set grid`),
/// `base` first.
fn grid() -> Vec<(String, Job)> {
    let base = Plan::BASE;
    let mut jobs = vec![(
        "base".to_string(),
        Job::Sum {
            plan: base,
            small_pages: false,
        },
    )];
    for (hint_name, hint) in [("t0", Hint::T0), ("t1", Hint::T1)] {
        for line_step in [1, 2, 4, 8] {
            for distance in [8, 16, 24, 32, 48] {
                let plan = Plan {
                    distance,
                    line_step,
                    hint,
                    ..base
                };
                let name = format!("{hint_name}-lines{}-d{distance}", 8 / line_step);
                let small_pages = false;
                jobs.push((name, Job::Sum { plan, small_pages }));
            }
        }
    }
    jobs
}

/// The most promising variants of the grid, and the first line of each
/// row prefetched far ahead with the rest nearer (`--set focus`), `base`
/// first.
fn focus() -> Vec<(String, Job)> {
    let base = Plan::BASE;
    let sum = |name: String, plan: Plan| {
        let small_pages = false;
        (name, Job::Sum { plan, small_pages })
    };
    let mut jobs = vec![sum("base".into(), base), ("library".into(), Job::Library)];
    for (hint_name, hint) in [("t0", Hint::T0), ("t1", Hint::T1)] {
        for (line_step, distance) in [(8, 4), (8, 8), (8, 12), (8, 16), (4, 8), (4, 16)] {
            let plan = Plan {
                distance,
                line_step,
                hint,
                ..base
            };
            let lines = 8 / line_step;
            jobs.push(sum(format!("{hint_name}-lines{lines}-d{distance}"), plan));
        }
    }
    // The two walks of a scaled sum (mean, weights) with each prefetch.
    for (line_step, lines) in [(1, 8), (8, 1)] {
        let plan = Plan {
            vectors: 8,
            line_step,
            ..base
        };
        jobs.push(sum(format!("acc8-lines{lines}"), plan));
    }
    for (distance, rest_distance) in [(16, 4), (16, 8), (24, 8)] {
        let plan = Plan {
            distance,
            line_step: 8,
            rest_distance,
            ..base
        };
        jobs.push(sum(
            format!("t1-first-d{distance}-rest-d{rest_distance}"),
            plan,
        ));
    }
    jobs
}

/// The variants, `base` first.
fn jobs() -> Vec<(String, Job)> {
    let base = Plan::BASE;
    let sum = |name: &str, plan: Plan| {
        (
            name.to_string(),
            Job::Sum {
                plan,
                small_pages: false,
            },
        )
    };
    let mut jobs = vec![sum("base", base), ("library".to_string(), Job::Library)];
    for distance in [0, 2, 4, 8, 24, 32, 64] {
        jobs.push(sum(&format!("d{distance}"), Plan { distance, ..base }));
    }
    for (name, line_step) in [("lines4", 2), ("lines2", 4), ("lines1", 8)] {
        jobs.push(sum(name, Plan { line_step, ..base }));
    }
    for (name, hint) in [("t0", Hint::T0), ("t2", Hint::T2), ("nta", Hint::Nta)] {
        jobs.push(sum(name, Plan { hint, ..base }));
    }
    jobs.push(sum(
        "bags2",
        Plan {
            interleave: 2,
            vectors: 8,
            ..base
        },
    ));
    jobs.push(sum(
        "bags4",
        Plan {
            interleave: 4,
            vectors: 4,
            ..base
        },
    ));
    jobs.push(sum("acc8", Plan { vectors: 8, ..base }));
    jobs.push(sum(
        "nt-store",
        Plan {
            stream: true,
            ..base
        },
    ));
    for (name, distance) in [("4k-base", 16), ("4k-d32", 32)] {
        jobs.push((
            name.to_string(),
            Job::Sum {
                plan: Plan { distance, ..base },
                small_pages: true,
            },
        ));
    }
    for chains in [1, 2, 4, 8, 16, 32] {
        jobs.push((format!("chase-{chains}"), Job::Chase(chains)));
    }
    for (distance, line_step) in [(0, 1), (16, 1), (32, 1), (16, 8)] {
        let lines = 8 / line_step;
        let name = format!("touch-lines{lines}-d{distance}");
        jobs.push((
            name,
            Job::Touch {
                distance,
                line_step,
            },
        ));
    }
    jobs
}

/// The inputs every job reads.
struct Inputs {
    table: EmbeddingTable,
    small_pages: SmallPages,
    ids: Vec<i64>,
}

impl Inputs {
    fn huge_table(&self) -> &[f32] {
        self.table.as_padded()
    }
}

/// A copy of the table on 4 KiB pages (advised against huge pages).
struct SmallPages {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone, like a Box<[f32]>.
unsafe impl Send for SmallPages {}
// SAFETY: shared access only reads (`as_slice`), like a Box<[f32]>.
unsafe impl Sync for SmallPages {}

impl SmallPages {
    fn copy_of(values: &[f32]) -> SmallPages {
        let bytes = std::mem::size_of_val(values);
        // SAFETY: a fresh private anonymous mapping; its result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of the 4 KiB-page table");
        // SAFETY: the range is the mapping just made.
        let advised = unsafe { libc::madvise(ptr, bytes, libc::MADV_NOHUGEPAGE) };
        assert_eq!(advised, 0, "madvise(MADV_NOHUGEPAGE)");
        let pages = SmallPages {
            ptr: ptr.cast(),
            len: values.len(),
        };
        // SAFETY: the mapping holds `len` floats, zeroed, page aligned, and
        // only this value refers to it.
        unsafe { std::slice::from_raw_parts_mut(pages.ptr, pages.len) }.copy_from_slice(values);
        pages
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: the mapping holds `len` initialised floats for as long as
        // `self` lives, and is written only in `copy_of`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for SmallPages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `copy_of`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len * size_of::<f32>()) };
    }
}

/// Runs `job` once over the whole batch on `threads` threads, into `out`.
fn run(job: &Job, inputs: &Inputs, threads: usize, out: &mut [f32]) -> u32 {
    match *job {
        Job::Library => {
            let bags = Bags::fixed(&inputs.ids, BAG_LEN).expect("bags");
            let table = &inputs.table;
            table
                .pooled_lookup(&bags, Pooling::Sum, out)
                .expect("pooled lookup");
            0
        }
        Job::Sum { plan, small_pages } => {
            let table = if small_pages {
                inputs.small_pages.as_slice()
            } else {
                inputs.huge_table()
            };
            // Whole groups of four bags per thread, so every interleave fits.
            let bags_per_thread = (BAGS / 4).div_ceil(threads) * 4;
            std::thread::scope(|scope| {
                for (ids, out) in inputs
                    .ids
                    .chunks(bags_per_thread * BAG_LEN)
                    .zip(out.chunks_mut(bags_per_thread * DIM))
                {
                    scope.spawn(move || variants::bag_sum(table, ids, BAG_LEN, plan, out));
                }
            });
            0
        }
        Job::Chase(chains) => split(&inputs.ids, threads, |ids| {
            variants::chase_rows(inputs.huge_table(), ids, chains)
        }),
        Job::Touch {
            distance,
            line_step,
        } => split(&inputs.ids, threads, |ids| {
            variants::touch_rows(inputs.huge_table(), ids, distance, line_step)
        }),
    }
}

/// `f` over `threads` equal contiguous parts of `ids`, in parallel.
fn split(ids: &[i64], threads: usize, f: impl Fn(&[i64]) -> u32 + Sync) -> u32 {
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = ids
            .chunks(ids.len().div_ceil(threads))
            .map(|ids| scope.spawn(move || f(ids)))
            .collect();
        parts
            .into_iter()
            .map(|p| p.join().expect("worker"))
            .fold(0, u32::wrapping_add)
    })
}

/// The process's memory on huge pages, as the kernel reports it.
fn anon_huge_pages() -> String {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .map(|l| l["AnonHugePages:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The load average, as the kernel reports it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Which variants to time.
#[derive(Clone, Copy)]
enum Set {
    Limit,
    Grid,
    Focus,
}

struct Args {
    set: Set,
    threads: Vec<usize>,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        set: Set::Limit,
        threads: vec![1],
        rounds: 15,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("{flag} {value}: not a positive integer"))
        };
        match flag.as_str() {
            "--threads" => {
                parsed.threads = value.split(',').map(number).collect::<Result<_, _>>()?
            }
            "--rounds" => parsed.rounds = number(&value)?,
            "--set" => match value.as_str() {
                "limit" => parsed.set = Set::Limit,
                "grid" => parsed.set = Set::Grid,
                "focus" => parsed.set = Set::Focus,
                _ => return Err(format!("--set {value}: limit, grid or focus")),
            },
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(parsed)
}

pub fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "error: {e}\nusage: bag_limit [--set limit|grid|focus] [--threads N[,N...]] [--rounds K]"
            );
            return ExitCode::FAILURE;
        }
    };
    if !variants::supported() {
        eprintln!("error: the variants need AVX2");
        return ExitCode::FAILURE;
    }
    let table = EmbeddingTable::new(BIG_ROWS, DIM, Init::default(), 7).expect("table");
    let small_pages = SmallPages::copy_of(table.as_padded());
    let inputs = Inputs {
        table,
        small_pages,
        ids: workloads::uniform(4, BAGS * BAG_LEN, BIG_ROWS),
    };
    let mut out = AlignedBuf::zeroed(BAGS * DIM, "output").expect("output");
    let jobs = match args.set {
        Set::Limit => jobs(),
        Set::Grid => grid(),
        Set::Focus => focus(),
    };
    let row_bytes = (inputs.ids.len() * DIM * size_of::<f32>()) as f64;
    println!(
        "# AnonHugePages {} (the 512 MB table; its 4 KiB-page copy adds none), load {}",
        anon_huge_pages(),
        load_average()
    );
    for &threads in &args.threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        // Every job once per round, the rounds in a row: a change of load
        // hits every job alike, and each job's time is compared with
        // base's of the same round.
        let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); jobs.len()];
        for round in 0..=args.rounds {
            for ((_, job), times) in jobs.iter().zip(&mut times) {
                let (start, start_cpu) = (Instant::now(), cpu_ms());
                let sum = pool.install(|| run(job, &inputs, threads, out.as_mut_slice()));
                std::hint::black_box(sum);
                if round > 0 {
                    // Round 0 warms up: page faults, caches, thread wake-up.
                    times.push((start.elapsed().as_secs_f64() * 1e3, cpu_ms() - start_cpu));
                }
            }
        }
        for ((name, _), job_times) in jobs.iter().zip(&times) {
            let pick =
                |f: &dyn Fn(usize) -> f64| median(&mut (0..args.rounds).map(f).collect::<Vec<_>>());
            let wall = pick(&|r| job_times[r].0);
            let cpu = pick(&|r| job_times[r].1);
            let vs_base = pick(&|r| job_times[r].0 / times[0][r].0);
            let cpu_vs_base = pick(&|r| job_times[r].1 / times[0][r].1);
            println!(
                "{name:<20} threads={threads} median_ms={wall:.2} cpu_ms={cpu:.2} \
                 gb_s={:.2} vs_base={vs_base:.3} cpu_vs_base={cpu_vs_base:.3}",
                row_bytes / wall / 1e6,
            );
        }
        println!("# load {}", load_average());
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bag-sum variant is the library's `Pooling::Sum`, bit for bit:
    /// the same rows summed in the same order, only fetched differently.
    /// 24 bags of 5 (a prefetch distance past a bag and past the end, and
    /// a bag count that every interleave divides), on both tables.
    #[test]
    fn every_variant_computes_the_bag_sums() {
        if !variants::supported() {
            return;
        }
        let rows = 300;
        let values = workloads::values(9, rows * DIM, -1.0, 1.0);
        let table = EmbeddingTable::from_rows(rows, DIM, &values).unwrap();
        let small_pages = SmallPages::copy_of(table.as_padded());
        let (bags, bag) = (24, 5);
        let ids = workloads::uniform(3, bags * bag, rows);
        let expected = table
            .pooled_lookup_vec(&Bags::fixed(&ids, bag).unwrap(), Pooling::Sum)
            .unwrap();
        assert!(expected.iter().any(|&x| x != 0.0));
        for (name, job) in jobs().into_iter().chain(grid()).chain(focus()) {
            let Job::Sum {
                plan,
                small_pages: small,
            } = job
            else {
                continue;
            };
            let values = if small {
                small_pages.as_slice()
            } else {
                table.as_padded()
            };
            let mut out = AlignedBuf::zeroed(bags * DIM, "out").unwrap();
            variants::bag_sum(values, &ids, bag, plan, out.as_mut_slice());
            assert_eq!(out.as_slice(), &expected[..], "{name}");
        }
    }

    /// The raw loops read the rows they are given: their sums of the lines'
    /// first words agree with each other for every chain count and distance.
    #[test]
    fn the_raw_loops_read_every_row() {
        let rows = 64;
        let values = workloads::values(8, rows * DIM, -1.0, 1.0);
        let ids = workloads::uniform(6, 32 * 5, rows);
        let word = |id: i64, line: usize| values[id as usize * DIM + line * 16].to_bits();
        let row_sum = |id: i64| (0..8).fold(0u32, |s, l| s.wrapping_add(word(id, l)));
        let all = ids.iter().fold(0u32, |s, &id| s.wrapping_add(row_sum(id)));
        for distance in [0, 1, 16, 1000] {
            for line_step in [1, 8] {
                assert_eq!(
                    variants::touch_rows(&values, &ids, distance, line_step),
                    all
                );
            }
        }
        // A chain returns its last row's sum: with one chain, the last id's.
        let last = *ids.last().unwrap();
        assert_eq!(variants::chase_rows(&values, &ids, 1), row_sum(last));
        let tails = |chains: usize| {
            ids[ids.len() - chains..]
                .iter()
                .fold(0u32, |s, &id| s.wrapping_add(row_sum(id)))
        };
        for chains in [2, 4, 8, 16, 32] {
            assert_eq!(variants::chase_rows(&values, &ids, chains), tails(chains));
        }
    }
}
