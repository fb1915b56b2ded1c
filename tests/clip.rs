//! Gradient clipping on a `SparseGrad` against the same operation on the
//! dense gradient `onehot(ids)ᵀ · G`, bitwise, for every thread count; bad
//! arguments and overflowed sums refused with nothing changed.

mod common;

use common::{assert_bits_eq, each_config, matmul, onehot, transpose};
use embtable::{Error, SparseGrad};
use proptest::prelude::*;
use workloads::values;

/// A lookup's gradient: `rows × dim` table, ids, and the output gradient.
#[derive(Clone, Debug)]
struct Case {
    rows: usize,
    dim: usize,
    ids: Vec<usize>,
    seed: u64,
    scale: f32,
}

fn case(max_ids: usize) -> impl Strategy<Value = Case> {
    (
        1usize..=200,
        1usize..=70,
        any::<u64>(),
        prop_oneof![Just(1.0f32), Just(100.0f32)],
    )
        .prop_flat_map(move |(rows, dim, seed, scale)| {
            proptest::collection::vec(0..rows, 0..=max_ids).prop_map(move |ids| Case {
                rows,
                dim,
                ids,
                seed,
                scale,
            })
        })
}

impl Case {
    fn grad_out(&self) -> Vec<f32> {
        values(
            self.seed,
            self.ids.len() * self.dim,
            -self.scale,
            self.scale,
        )
    }

    fn sparse(&self) -> SparseGrad {
        let mut grad = SparseGrad::new(self.dim);
        let ids: Vec<u32> = self.ids.iter().map(|&r| r as u32).collect();
        grad.accumulate_lookup(&ids, &self.grad_out()).unwrap();
        grad
    }

    fn dense(&self) -> Vec<f32> {
        let n = self.ids.len();
        let ot = transpose(&onehot(&self.ids, self.rows), n, self.rows);
        matmul(&ot, &self.grad_out(), self.rows, n, self.dim)
    }
}

/// `Σ x²` of a row in `f64`, lane order.
fn squares(row: &[f32]) -> f64 {
    row.iter().map(|&x| x as f64 * x as f64).sum()
}

/// The dense gradient's norm: rows in order, each in lane order.
fn dense_norm_squared(dense: &[f32], dim: usize) -> f64 {
    dense.chunks(dim).map(squares).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn clip_by_value_equals_dense(c in case(300), max in 0.01f32..2.0) {
        let want: Vec<f32> = c.dense().iter().map(|x| x.max(-max).min(max)).collect();
        for (tier, threads, got) in each_config(|| {
            let mut g = c.sparse();
            g.clip_by_value(max).unwrap();
            g.to_dense(c.rows)
        }) {
            assert_bits_eq(&got, &want, &format!("{tier}/{threads}"));
        }
    }

    #[test]
    fn clip_by_row_norm_equals_dense(c in case(300), max in 0.01f32..5.0) {
        let mut want = c.dense();
        for row in want.chunks_mut(c.dim) {
            let norm = squares(row).sqrt();
            if norm > max as f64 {
                let scale = (max as f64 / norm) as f32;
                row.iter_mut().for_each(|x| *x *= scale);
            }
        }
        for (tier, threads, got) in each_config(|| {
            let mut g = c.sparse();
            g.clip_by_row_norm(max).unwrap();
            g.to_dense(c.rows)
        }) {
            assert_bits_eq(&got, &want, &format!("{tier}/{threads}"));
        }
    }

    /// The norm does not depend on the order rows were accumulated in:
    /// the sum runs over rows in increasing order, as the dense one does.
    #[test]
    fn clip_by_global_norm_equals_dense(c in case(300), max in 0.01f32..50.0, other in 0.0f32..20.0) {
        let mut want = c.dense();
        let own = dense_norm_squared(&want, c.dim);
        let norm = (own + other as f64 * other as f64).sqrt();
        if norm > max as f64 {
            let scale = (max as f64 / norm) as f32;
            want.iter_mut().for_each(|x| *x *= scale);
        }
        for (tier, threads, (got, got_norm, own_norm)) in each_config(|| {
            let mut g = c.sparse();
            let own_norm = g.norm().unwrap();
            let n = g.clip_by_global_norm(max, other).unwrap();
            (g.to_dense(c.rows), n, own_norm)
        }) {
            let what = format!("{tier}/{threads}");
            assert_bits_eq(&got, &want, &what);
            prop_assert_eq!(got_norm, norm as f32);
            prop_assert_eq!(own_norm, own.sqrt() as f32);
        }
    }
}

#[test]
fn clipping_refuses_bad_arguments_and_overflowed_sums() {
    let mut grad = SparseGrad::new(3);
    grad.accumulate_lookup(&[1u32, 4], &[1.0, 2.0, 3.0, -4.0, 5.0, 6.0])
        .unwrap();
    let before = grad.as_padded().to_vec();
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        for result in [
            grad.clip_by_value(bad),
            grad.clip_by_row_norm(bad),
            grad.clip_by_global_norm(bad, 0.0).map(|_| ()),
        ] {
            assert!(matches!(result, Err(Error::InvalidConfig { .. })), "{bad}");
        }
        if bad != 0.0 {
            assert!(matches!(
                grad.clip_by_global_norm(1.0, bad),
                Err(Error::InvalidConfig {
                    field: "other_norm",
                    ..
                })
            ));
        }
    }
    assert_bits_eq(grad.as_padded(), &before, "unchanged");

    // Two finite values whose sum overflows: refused, as a step refuses it.
    let mut overflow = SparseGrad::new(2);
    overflow
        .accumulate_lookup(&[0u32, 0], &[3e38, 1.0, 3e38, 1.0])
        .unwrap();
    let before = overflow.as_padded().to_vec();
    assert!(matches!(
        overflow.clip_by_value(1.0),
        Err(Error::NonFinite { position: 0, .. })
    ));
    assert!(matches!(
        overflow.clip_by_row_norm(1.0),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        overflow.clip_by_global_norm(1.0, 0.0),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(overflow.norm(), Err(Error::NonFinite { .. })));
    assert_bits_eq(overflow.as_padded(), &before, "unchanged");
}

/// Within the bounds, nothing changes at all (not even by rounding).
#[test]
fn gradients_within_the_bounds_are_left_bit_for_bit() {
    let mut grad = SparseGrad::new(4);
    grad.accumulate_lookup(&[2u32, 9, 2], &values(3, 12, -0.3, 0.3))
        .unwrap();
    let before = grad.as_padded().to_vec();
    grad.clip_by_value(1.0).unwrap();
    grad.clip_by_row_norm(10.0).unwrap();
    let norm = grad.clip_by_global_norm(10.0, 1.0).unwrap();
    assert!(norm < 10.0 && norm > 1.0);
    assert_bits_eq(grad.as_padded(), &before, "unchanged");
}
