//! The variants of W4's bag sum that `bag_limit` times, and the two raw
//! row-reading loops (dependent chains, prefetched touches) that show what
//! the memory system gives a core.
//!
//! Every bag-sum variant computes `out[b] = ((0 + e_0) + e_1) + …` in bag
//! order, as embtable's `Pooling::Sum` does, so each is bitwise equal to
//! the library (the tests check it); they differ only in what they ask the
//! memory system for and when. Rows are 128 floats (W4's), one 64-byte
//! aligned row every 128 floats; bags hold `bag` ids each.

use std::arch::x86_64::*;

/// Floats per row (W4's dim, with no padding).
pub const DIM: usize = 128;
/// Floats per 64-byte cache line.
const LINE: usize = 16;

/// Which cache levels a software prefetch fills (`_mm_prefetch`'s hint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    T0,
    T1,
    T2,
    Nta,
}

/// How one bag-sum variant walks the bags and what it prefetches.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Rows ahead, in the order rows are read, that are prefetched; 0: no
    /// software prefetch at all.
    pub distance: usize,
    /// Lines of a prefetched row: every `line_step`-th of its 8 (1: all 8,
    /// 2: 4, 8: the first only), the rest left to the hardware.
    pub line_step: usize,
    pub hint: Hint,
    /// Bags whose rows are read in turn (1, 2 or 4): bag a's row j, bag
    /// b's row j, …, then row j + 1.
    pub interleave: usize,
    /// `ymm` accumulators per bag in one walk over its rows: 16 (the whole
    /// row, one walk), 8 (two walks) or 4 (four; interleave 4 only).
    pub vectors: usize,
    /// Non-temporal stores of the output rows.
    pub stream: bool,
    /// Rows ahead at which the lines that `line_step` skips are prefetched
    /// too (0: never): the first line far ahead, the rest nearer.
    pub rest_distance: usize,
}

impl Plan {
    /// The library's AVX2 sum and the bare loop: 16 rows ahead, all lines,
    /// into L2, one bag at a time, one walk.
    pub const BASE: Plan = Plan {
        distance: 16,
        line_step: 1,
        hint: Hint::T1,
        interleave: 1,
        vectors: 16,
        stream: false,
        rest_distance: 0,
    };
}

/// Whether this CPU runs the variants (AVX2).
pub fn supported() -> bool {
    is_x86_feature_detected!("avx2")
}

/// `out[b] = Σ table[ids[b * bag + j]]` for every bag, as `plan` says.
///
/// # Panics
/// Without AVX2, if an id is not a row of `table`, if `ids` is not whole
/// bags, `out` not one row per bag, the bag count not a multiple of
/// `plan.interleave`, or the plan not one of those described on [`Plan`];
/// with `plan.stream`, if `out` is not 32-byte aligned.
pub fn bag_sum(table: &[f32], ids: &[i64], bag: usize, plan: Plan, out: &mut [f32]) {
    assert!(supported(), "the variants need AVX2");
    check_ids(table, ids);
    assert!(bag > 0 && ids.len().is_multiple_of(bag));
    let bags = ids.len() / bag;
    assert_eq!(out.len(), bags * DIM);
    assert!(bags.is_multiple_of(plan.interleave));
    assert!((1..=8).contains(&plan.line_step));
    assert!(!plan.stream || (out.as_ptr() as usize).is_multiple_of(32));
    macro_rules! with_hint {
        ($k:literal, $v:literal) => {
            // SAFETY: AVX2 was detected, every id names a row of `table`
            // (checked), and the shapes were checked above.
            unsafe {
                match plan.hint {
                    Hint::T0 => sum::<_MM_HINT_T0, $k, $v>(table, ids, bag, plan, out),
                    Hint::T1 => sum::<_MM_HINT_T1, $k, $v>(table, ids, bag, plan, out),
                    Hint::T2 => sum::<_MM_HINT_T2, $k, $v>(table, ids, bag, plan, out),
                    Hint::Nta => sum::<_MM_HINT_NTA, $k, $v>(table, ids, bag, plan, out),
                }
            }
        };
    }
    match (plan.interleave, plan.vectors) {
        (1, 16) => with_hint!(1, 16),
        (1, 8) => with_hint!(1, 8),
        (2, 8) => with_hint!(2, 8),
        (4, 4) => with_hint!(4, 4),
        other => panic!("no variant walks (interleave, vectors) = {other:?}"),
    }
}

/// Panics unless every id names a whole row of `table`.
fn check_ids(table: &[f32], ids: &[i64]) {
    let rows = table.len() / DIM;
    assert!(
        ids.iter().all(|&id| id >= 0 && (id as usize) < rows),
        "an id beyond the table"
    );
}

/// Where the software prefetch is in the order rows are read: group `g` of
/// `K` bags, row `j` of each, bag `k` of the group.
struct Cursor<const K: usize> {
    g: usize,
    j: usize,
    k: usize,
}

impl<const K: usize> Cursor<K> {
    /// The position in `ids` of the cursor's row; then moves on one row.
    #[inline(always)]
    fn next(&mut self, bag: usize) -> usize {
        let pos = (self.g * K + self.k) * bag + self.j;
        self.k += 1;
        if self.k == K {
            self.k = 0;
            self.j += 1;
            if self.j == bag {
                self.j = 0;
                self.g += 1;
            }
        }
        pos
    }
}

/// Prefetches every `step`-th line of the row of `id` (if any).
#[inline(always)]
fn prefetch_row<const H: i32>(table: *const f32, id: Option<&i64>, step: usize) {
    prefetch_lines::<H>(table, id, step, |_| true);
}

/// Prefetches the lines of the row of `id` (if any) that `step` skips.
#[inline(always)]
fn prefetch_rest<const H: i32>(table: *const f32, id: Option<&i64>, step: usize) {
    prefetch_lines::<H>(table, id, 1, |line| !line.is_multiple_of(step));
}

/// Prefetches every `step`-th line of the row of `id` (if any) that `take`
/// accepts (by line number).
#[inline(always)]
fn prefetch_lines<const H: i32>(
    table: *const f32,
    id: Option<&i64>,
    step: usize,
    take: impl Fn(usize) -> bool,
) {
    if let Some(&id) = id {
        let row = table.wrapping_add(id as usize * DIM);
        let mut at = 0;
        while at < DIM {
            if !take(at / LINE) {
                at += step * LINE;
                continue;
            }
            // SAFETY: a prefetch is a hint that never faults, whatever the
            // address, and SSE is part of the x86-64 baseline.
            unsafe { _mm_prefetch::<H>(row.wrapping_add(at).cast()) };
            at += step * LINE;
        }
    }
}

/// [`bag_sum`] for `K` bags at a time with `V` accumulators each.
///
/// # Safety
/// AVX2 is available, every id is a row of `table`, `ids` is whole bags of
/// `bag`, `out` one row per bag, the bags a multiple of `K`, and `out`
/// 32-byte aligned if `plan.stream`.
#[target_feature(enable = "avx2")]
unsafe fn sum<const H: i32, const K: usize, const V: usize>(
    table: &[f32],
    ids: &[i64],
    bag: usize,
    plan: Plan,
    out: &mut [f32],
) {
    let base = table.as_ptr();
    let walks = DIM / (8 * V);
    let groups = ids.len() / bag / K;
    let prefetch = plan.distance > 0;
    let mut cursor = Cursor::<K> { g: 0, j: 0, k: 0 };
    let mut rest = Cursor::<K> { g: 0, j: 0, k: 0 };
    let prefetch_rest_too = prefetch && plan.rest_distance > 0;
    if prefetch {
        for _ in 0..plan.distance {
            let at = cursor.next(bag);
            prefetch_row::<H>(base, ids.get(at), plan.line_step);
        }
    }
    if prefetch_rest_too {
        for _ in 0..plan.rest_distance {
            let at = rest.next(bag);
            prefetch_rest::<H>(base, ids.get(at), plan.line_step);
        }
    }
    for g in 0..groups {
        for walk in 0..walks {
            let col = walk * 8 * V;
            let mut acc = [[_mm256_setzero_ps(); V]; K];
            for j in 0..bag {
                for (k, acc) in acc.iter_mut().enumerate() {
                    if prefetch && walk == 0 {
                        let at = cursor.next(bag);
                        prefetch_row::<H>(base, ids.get(at), plan.line_step);
                        if prefetch_rest_too {
                            let at = rest.next(bag);
                            prefetch_rest::<H>(base, ids.get(at), plan.line_step);
                        }
                    }
                    let id = ids[(g * K + k) * bag + j] as usize;
                    // SAFETY: the id names a row (caller), and col + 8 * V <= DIM.
                    let row = unsafe { base.add(id * DIM + col) };
                    for (v, a) in acc.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *a = _mm256_add_ps(*a, unsafe { _mm256_loadu_ps(row.add(8 * v)) });
                    }
                }
            }
            for (k, acc) in acc.iter().enumerate() {
                let dst = &mut out[(g * K + k) * DIM + col..][..8 * V];
                for (v, &a) in acc.iter().enumerate() {
                    let p = dst[8 * v..][..8].as_mut_ptr();
                    if plan.stream {
                        // SAFETY: 8 floats of `dst`, 32-byte aligned (caller).
                        unsafe { _mm256_stream_ps(p, a) };
                    } else {
                        // SAFETY: 8 floats of `dst`.
                        unsafe { _mm256_storeu_ps(p, a) };
                    }
                }
            }
        }
    }
    if plan.stream {
        _mm_sfence();
    }
}

/// The first 32 bits of every line of a row, added up: all 8 lines of the
/// row read with 8 loads and no vector work.
///
/// # Safety
/// `row` points at `DIM` readable floats.
#[inline(always)]
unsafe fn touch(row: *const f32) -> u32 {
    let row = row.cast::<u32>();
    let mut sum = 0u32;
    for line in 0..DIM / LINE {
        // SAFETY: inside the row (caller).
        sum = sum.wrapping_add(unsafe { row.add(line * LINE).read() });
    }
    sum
}

/// Reads every line of the rows of `ids` in turn, every `line_step`-th
/// line of each row prefetched (`T0`) `distance` rows ahead (0: none);
/// returns a sum of the lines' first words, so no read can be skipped.
///
/// # Panics
/// If an id is not a row of `table`.
pub fn touch_rows(table: &[f32], ids: &[i64], distance: usize, line_step: usize) -> u32 {
    check_ids(table, ids);
    let base = table.as_ptr();
    let mut sum = 0u32;
    for (i, &id) in ids.iter().enumerate() {
        if distance > 0 {
            prefetch_row::<_MM_HINT_T0>(base, ids.get(i + distance), line_step);
        }
        // SAFETY: the id names a row (checked).
        sum = sum.wrapping_add(unsafe { touch(base.add(id as usize * DIM)) });
    }
    sum
}

/// Reads the rows of `ids` as `chains` dependent chains: chain `c` reads
/// the rows at positions `c, c + chains, …`, and each row's address
/// depends on the data of the chain's previous row (through a multiply by
/// a zero the compiler cannot see), so a chain has one row (8 lines) in
/// flight at a time and `chains` chains at most `chains` rows. With one
/// chain this is the latency of a random row. Returns the chains' sums.
///
/// # Panics
/// If `chains` is not in 1..=32 or an id is not a row of `table`.
pub fn chase_rows(table: &[f32], ids: &[i64], chains: usize) -> u32 {
    assert!((1..=32).contains(&chains));
    check_ids(table, ids);
    let (base, rows) = (table.as_ptr(), table.len() / DIM);
    let zero = std::hint::black_box(0usize);
    let mut last = [0u32; 32];
    let steps = ids.len() / chains;
    for step in 0..steps {
        for (c, last) in last[..chains].iter_mut().enumerate() {
            let dependency = (*last as usize).wrapping_mul(zero);
            let id = (ids[step * chains + c] as usize).wrapping_add(dependency);
            // SAFETY: clamped to a row of the table (and `zero` is 0, so
            // `id` is the id of `ids`, checked to be a row).
            *last = unsafe { touch(base.add(id.min(rows - 1) * DIM)) };
        }
    }
    last.iter().fold(0u32, |a, &b| a.wrapping_add(b))
}
