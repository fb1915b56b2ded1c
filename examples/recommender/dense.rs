//! The dense maths of a batch, written once over embtable's [`Simd`] trait
//! and run with the best instruction set of the CPU through
//! [`kernels::dispatch`], in parallel over rows with rayon.
//!
//! Everything the model needs is one product `C = A · B` of row-major
//! matrices (`A` is `n × l`, `B` is `l × m`, `C` is `n × m`):
//!
//! | product | `A` | `B` | `C` |
//! |---|---|---|---|
//! | scores of the negatives | user vectors `U` (`batch × dim`) | `Nᵀ` (`dim × K`) | `batch × K` |
//! | gradient of the user vectors | coefficients `P` (`batch × K`) | negatives `N` (`K × dim`) | `batch × dim` |
//! | gradient of the negatives | `Pᵀ` (`K × batch`) | `U` (`batch × dim`) | `K × dim` |
//! | evaluation | user vectors (`users × dim`) | item table`ᵀ` (`dim × items`) | `users × items` |
//!
//! The kernel keeps a tile of `C`, four rows by two vectors, in registers
//! and streams `B` row by row: `C[i, j..j+2N] += A[i, p] · B[p, j..j+2N]`
//! for every `p` and each of the four rows `i`: one load of `B` serves four
//! rows, eight independent sums hide the latency of the adds, and there
//! are no horizontal sums. Columns are taken in tiles so that a tile of `B`
//! stays in cache while every row of `A` passes over it.

use embtable::kernels::{self, Kernel, Simd};
use rayon::prelude::*;

/// Columns of `B` per tile: `l × 512` floats of `B` (64 KiB for `l = 32`)
/// stay in the L2 cache while the rows of `A` pass.
const COL_TILE: usize = 512;

/// Rows of `A` held in registers at once (the micro-tile is
/// `ROWS × 2` vectors: 8 independent sums, 11 registers, so it fits
/// AVX2's 16 as well as AVX-512's 32).
const ROWS: usize = 4;

/// How `A` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `A` is `n × l`, row-major.
    RowMajor,
    /// `A` is given as its transpose, `l × n` row-major (so `C = Aᵀ · B`
    /// for the matrix as stored).
    Transposed,
}

/// `C = A · B` for `A` (`n × l`, stored as `layout` says), row-major `B`
/// (`l × m`) and `C` (`n × m`); `n` is `c.len() / m`.
///
/// Parallel over blocks of rows of `C`. Each element is
/// `((0 + a₀b₀) + a₁b₁) + …` in `f32`, summed over `p` in order, with no
/// fused multiply-add: the result is the same for every thread count and
/// every kernel tier, bit for bit.
///
/// # Panics
/// If the lengths do not match.
pub fn matmul(a: &[f32], layout: Layout, b: &[f32], l: usize, m: usize, c: &mut [f32]) {
    assert_eq!(b.len(), l * m, "b is l × m");
    let n = c.len().checked_div(m).unwrap_or(0);
    assert_eq!(c.len(), n * m, "c is n × m");
    assert_eq!(a.len(), n * l, "a is n × l");
    if n == 0 || m == 0 {
        return;
    }
    if l == 0 {
        c.fill(0.0);
        return;
    }
    // Element (i, p) of A is a[i * rs + p * cs].
    let (rs, cs) = match layout {
        Layout::RowMajor => (l, 1),
        Layout::Transposed => (1, n),
    };
    let tier = kernels::current();
    let tasks = if n * l * m < 1 << 16 {
        1
    } else {
        4 * rayon::current_num_threads()
    };
    let rows_per_task = n.div_ceil(tasks).next_multiple_of(ROWS);
    c.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(t, c)| {
            let a = MatA {
                a,
                rs,
                cs,
                first: t * rows_per_task,
                l,
            };
            kernels::dispatch(tier, MatMul { a, b, m, c });
        });
}

/// `b = aᵀ` for row-major `a` (`n × m`): `b` is `m × n`.
pub fn transpose(a: &[f32], n: usize, m: usize) -> Vec<f32> {
    assert_eq!(a.len(), n * m);
    let mut b = vec![0.0; n * m];
    if n == 0 || m == 0 {
        return b;
    }
    b.par_chunks_mut(n).enumerate().for_each(|(j, row)| {
        for (i, x) in row.iter_mut().enumerate() {
            *x = a[i * m + j];
        }
    });
    b
}

/// The rows of `A` a task reads: row `first + i`, column `p` is
/// `a[(first + i) * rs + p * cs]`.
#[derive(Clone, Copy)]
struct MatA<'a> {
    a: &'a [f32],
    rs: usize,
    cs: usize,
    first: usize,
    l: usize,
}

impl MatA<'_> {
    #[inline(always)]
    fn at(&self, i: usize, p: usize) -> f32 {
        self.a[(self.first + i) * self.rs + p * self.cs]
    }
}

/// One task of [`matmul`]: its rows of `A` times `B` into its rows `c`.
struct MatMul<'a> {
    a: MatA<'a>,
    b: &'a [f32],
    m: usize,
    c: &'a mut [f32],
}

impl Kernel for MatMul<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let MatMul { a, b, m, c } = self;
        let rows = c.len() / m;
        for j0 in (0..m).step_by(COL_TILE) {
            let j1 = (j0 + COL_TILE).min(m);
            let mut i = 0;
            while i + ROWS <= rows {
                tile_row::<S, ROWS>(s, a, i, b, m, j0, j1, c);
                i += ROWS;
            }
            while i < rows {
                tile_row::<S, 1>(s, a, i, b, m, j0, j1, c);
                i += 1;
            }
        }
    }
}

/// Rows `i..i + R` of `C`, columns `j0..j1`: two vectors at a time, then
/// one, then a partial one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_row<S: Simd, const R: usize>(
    s: S,
    a: MatA<'_>,
    i: usize,
    b: &[f32],
    m: usize,
    j0: usize,
    j1: usize,
    c: &mut [f32],
) {
    let mut j = j0;
    while j + 2 * S::N <= j1 {
        micro::<S, R, 2>(s, a, i, b, m, j, 2 * S::N, c);
        j += 2 * S::N;
    }
    while j < j1 {
        let w = S::N.min(j1 - j);
        micro::<S, R, 1>(s, a, i, b, m, j, w, c);
        j += w;
    }
}

/// The micro-kernel: `C[i..i+R, j..j+width] = A[i..i+R, :] · B[:, j..j+width]`
/// with `R × V` vector sums in registers. `width` is `V × N`, or less than
/// `N` when `V == 1` (a partial vector).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn micro<S: Simd, const R: usize, const V: usize>(
    s: S,
    a: MatA<'_>,
    i: usize,
    b: &[f32],
    m: usize,
    j: usize,
    width: usize,
    c: &mut [f32],
) {
    let full = width == V * S::N;
    let z = s.splat(0.0);
    let mut acc = [[z; V]; R];
    for p in 0..a.l {
        let brow = &b[p * m + j..][..width];
        let mut bv = [z; V];
        for (v, bv) in bv.iter_mut().enumerate() {
            *bv = if full {
                s.load(&brow[v * S::N..])
            } else {
                s.load_partial(brow)
            };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = s.splat(a.at(i + r, p));
            for (acc, bv) in acc.iter_mut().zip(&bv) {
                *acc = s.add(*acc, s.mul(x, *bv));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let crow = &mut c[(i + r) * m + j..][..width];
        for (v, acc) in acc.iter().enumerate() {
            if full {
                s.store(*acc, &mut crow[v * S::N..]);
            } else {
                s.store_partial(*acc, crow);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use embtable::kernels::Tier;

    fn naive(a: &[f32], b: &[f32], n: usize, l: usize, m: usize) -> Vec<f32> {
        let mut c = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                let mut sum = 0.0f32;
                for p in 0..l {
                    sum += a[i * l + p] * b[p * m + j];
                }
                c[i * m + j] = sum;
            }
        }
        c
    }

    /// Every tier and shape (tails included) equals the naive triple loop
    /// bit for bit: same products, same order of sums.
    #[test]
    fn matmul_equals_naive_on_every_tier() {
        let mut rng = Rng::new(3);
        for (n, l, m) in [
            (1, 1, 1),
            (3, 5, 7),
            (17, 32, 65),
            (40, 9, 600),
            (2, 0, 3),
            (0, 4, 4),
            (9, 300, 33),
            (300, 20, 1030),
        ] {
            let a: Vec<f32> = (0..n * l).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..l * m).map(|_| rng.normal() as f32).collect();
            let want = naive(&a, &b, n, l, m);
            for tier in Tier::available() {
                let mut c = vec![f32::NAN; n * m];
                kernels::with_tier(tier, || matmul(&a, Layout::RowMajor, &b, l, m, &mut c));
                assert_eq!(c, want, "{tier:?} n {n} l {l} m {m}");
                let at = transpose(&a, n, l);
                let mut c = vec![f32::NAN; n * m];
                kernels::with_tier(tier, || matmul(&at, Layout::Transposed, &b, l, m, &mut c));
                assert_eq!(c, want, "{tier:?} transposed n {n} l {l} m {m}");
            }
        }
        let t = transpose(&[1., 2., 3., 4., 5., 6.], 2, 3);
        assert_eq!(t, [1., 4., 2., 5., 3., 6.]);
    }
}
