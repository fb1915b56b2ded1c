//! The closed form of missed steps under `Semantics::DenseExact`.
//!
//! A step with a zero gradient maps each lane's tuple `x = (weight, state
//! arrays…)` linearly: `x ← M x`, with `M` a small fixed matrix of the
//! optimizer's config (at most 4 × 4). A row that missed `k` steps is
//! brought current with `x ← Mᵏ x`. `Mᵏ` is computed in `f64` by repeated
//! squaring (`O(log k)` products), then rounded to `f32` and applied to the
//! row with `f32` multiplies and adds. Entries that are exactly zero are
//! skipped, so a lane is never polluted by `0 · x` terms. When the learning
//! rate changed during the missed steps, `M` differs between the stretches
//! of steps with one rate, and the row gets the product of each stretch's
//! power, still computed in `f64` and rounded once.

use crate::kernels::Simd;

/// Largest tuple with a linear zero-gradient step: the weight and three
/// state arrays (centred RMSprop with momentum). Rules with more arrays
/// replay missed steps instead (see `engine::Missed`).
pub(crate) const MAX_TUPLE: usize = 4;

/// A zero-gradient step as an `n × n` matrix in `f64` (`n <= MAX_TUPLE`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Map {
    n: usize,
    m: [[f64; MAX_TUPLE]; MAX_TUPLE],
}

impl Map {
    /// The identity on tuples of `n` values.
    pub(crate) fn identity(n: usize) -> Self {
        debug_assert!((1..=MAX_TUPLE).contains(&n));
        let mut m = [[0.0; MAX_TUPLE]; MAX_TUPLE];
        for (i, row) in m.iter_mut().enumerate().take(n) {
            row[i] = 1.0;
        }
        Self { n, m }
    }

    /// Sets entry `(i, j)`: the weight of input `j` in output `i`.
    pub(crate) fn set(&mut self, i: usize, j: usize, value: f64) {
        debug_assert!(i < self.n && j < self.n);
        self.m[i][j] = value;
    }

    /// `self · other`: `other` first, then `self`.
    pub(crate) fn mul(&self, other: &Self) -> Self {
        let n = self.n;
        let mut out = Self {
            n,
            m: [[0.0; MAX_TUPLE]; MAX_TUPLE],
        };
        for i in 0..n {
            for j in 0..n {
                out.m[i][j] = (0..n).map(|p| self.m[i][p] * other.m[p][j]).sum();
            }
        }
        out
    }

    /// `selfᵏ` by repeated squaring, in `f64`.
    pub(crate) fn power(&self, mut k: u64) -> Self {
        let mut result = Self::identity(self.n);
        let mut base = *self;
        while k > 0 {
            if k & 1 == 1 {
                result = result.mul(&base);
            }
            k >>= 1;
            if k > 0 {
                base = base.mul(&base);
            }
        }
        result
    }

    /// The map rounded to `f32` coefficients, ready to apply to rows.
    pub(crate) fn coefs(&self) -> Coefs {
        let mut c = [[0.0f32; MAX_TUPLE]; MAX_TUPLE];
        for (ci, ri) in c.iter_mut().zip(&self.m) {
            for (cij, &rij) in ci.iter_mut().zip(ri) {
                *cij = rij as f32;
            }
        }
        Coefs { n: self.n, c }
    }
}

/// `Mᵏ` rounded to `f32`, ready to apply to rows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Coefs {
    n: usize,
    c: [[f32; MAX_TUPLE]; MAX_TUPLE],
}

impl Coefs {
    /// Applies the map to one row: `lanes[0]` is the weight row, `lanes[1..n]`
    /// the state rows, all of one length, a multiple of `S::N`.
    ///
    /// Output `i` is `Σⱼ c[i][j] · x[j]` over the non-zero `c[i][j]` in
    /// increasing `j` (no FMA), `+0` if there are none, saturated to
    /// `±f32::MAX` as every update is. Zero inputs give zero outputs, so pad
    /// lanes stay zero.
    #[inline(always)]
    pub(crate) fn apply<S: Simd>(&self, s: S, lanes: &mut [&mut [f32]; MAX_TUPLE]) {
        let n = self.n;
        let len = lanes[0].len();
        let splat: [[S::V; MAX_TUPLE]; MAX_TUPLE] =
            std::array::from_fn(|i| std::array::from_fn(|j| s.splat(self.c[i][j])));
        let mut at = 0;
        while at < len {
            let mut x = [s.splat(0.0); MAX_TUPLE];
            for (xj, lane) in x.iter_mut().zip(lanes.iter()).take(n) {
                *xj = s.load(&lane[at..]);
            }
            for ((lane, c), cv) in lanes.iter_mut().zip(&self.c).zip(&splat).take(n) {
                let mut acc: Option<S::V> = None;
                for ((&cij, &cvij), &xj) in c.iter().zip(cv).zip(&x).take(n) {
                    if cij != 0.0 {
                        let term = s.mul(cvij, xj);
                        acc = Some(match acc {
                            None => term,
                            Some(a) => s.add(a, term),
                        });
                    }
                }
                let out = acc.unwrap_or(s.splat(0.0));
                s.store(super::engine::saturate(s, out), &mut lane[at..]);
            }
            at += S::N;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Scalar;

    #[test]
    fn power_matches_repeated_application() {
        // Keras SGD with momentum and weight decay: (w, v) ← ((1−ηλ)w + μv, μv).
        let mut m = Map::identity(2);
        m.set(0, 0, 0.99);
        m.set(0, 1, 0.9);
        m.set(1, 1, 0.9);
        for k in [0u64, 1, 2, 3, 7, 20] {
            let (mut w, mut v) = (0.5f64, -0.25f64);
            for _ in 0..k {
                v *= 0.9;
                w = 0.99 * w + v;
            }
            let c = m.power(k).coefs();
            let mut wr = [0.5f32];
            let mut vr = [-0.25f32];
            let (mut e1, mut e2) = ([0f32; 0], [0f32; 0]);
            let mut lanes: [&mut [f32]; MAX_TUPLE] = [&mut wr, &mut vr, &mut e1, &mut e2];
            c.apply(Scalar, &mut lanes);
            assert!((wr[0] as f64 - w).abs() < 1e-6, "k={k}: {} vs {w}", wr[0]);
            assert!((vr[0] as f64 - v).abs() < 1e-6, "k={k}: {} vs {v}", vr[0]);
        }
    }
}
