//! Finite inputs, however large or small, give finite weights and states,
//! and every state an optimizer reaches saves, loads back bit for bit and
//! resumes. (Issue 18: a gradient of 1e20 made an Adagrad accumulator
//! infinite; the checkpoint saved, then refused to load.)
//!
//! A step whose summed gradient overflowed is the one finite input the
//! optimizers refuse: it is `Err(NonFinite)` with nothing written.

mod common;

use common::Scratch;
use common::optim::any_cfg;
use embtable::{EmbeddingTable, Error, OptimizerState, SparseGrad, SparseOptimizer, io};
use proptest::prelude::*;

/// Finite values from subnormals to `±f32::MAX`.
fn extreme() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        Just(f32::MAX),
        Just(-f32::MAX),
        Just(1e-45f32),
        Just(-f32::MIN_POSITIVE),
        (-40i32..=38, -1.0f32..1.0).prop_map(|(e, m)| m * 10f32.powi(e)),
    ]
}

/// Every bit of a table and a state: equal states are equal bit for bit,
/// signs of zeros included.
fn bits(table: &EmbeddingTable, state: &OptimizerState) -> (Vec<u32>, Vec<Vec<u32>>, u64) {
    let arrays = state
        .arrays
        .iter()
        .map(|a| a.values.iter().map(|x| x.to_bits()).collect())
        .collect();
    let weights = table.to_vec().iter().map(|x| x.to_bits()).collect();
    (weights, arrays, state.steps)
}

fn all_finite(table: &EmbeddingTable, opt: &dyn SparseOptimizer) -> bool {
    table.to_vec().iter().all(|x| x.is_finite())
        && opt
            .state()
            .arrays
            .iter()
            .all(|a| a.values.iter().all(|x| x.is_finite()))
}

/// A batch: ids (taken modulo the rows) and their gradient values (the
/// first `ids × dim` are used).
type Batch = (Vec<u32>, Vec<f32>);

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn finite_inputs_give_states_that_save_load_and_resume(
        cfg in any_cfg(),
        rows in 1usize..6,
        dim in 1usize..20,
        weights in proptest::collection::vec(extreme(), 6 * 20),
        batches in proptest::collection::vec(
            (
                proptest::collection::vec(0u32..6, 0..5),
                proptest::collection::vec(extreme(), 4 * 20),
            ),
            1..6,
        ),
        last in (proptest::collection::vec(0u32..6, 1..5), proptest::collection::vec(extreme(), 4 * 20)),
    ) {
        let what = format!("{cfg:?}");
        let mut table = EmbeddingTable::from_rows(rows, dim, &weights[..rows * dim]).unwrap();
        let mut opt = cfg.optimizer();
        let grad_of = |(ids, values): &Batch| {
            let ids: Vec<u32> = ids.iter().map(|&i| i % rows as u32).collect();
            let mut grad = SparseGrad::new(dim);
            grad.accumulate_lookup(&ids, &values[..ids.len() * dim]).unwrap();
            grad
        };
        for batch in &batches {
            let grad = grad_of(batch);
            let before = bits(&table, &opt.state());
            match opt.step(&mut table, &grad) {
                Ok(()) => {}
                // Two values summed past f32::MAX: refused, nothing written.
                Err(Error::NonFinite { .. }) => {
                    prop_assert!(grad.as_padded().iter().any(|x| !x.is_finite()), "{}", what);
                    prop_assert_eq!(bits(&table, &opt.state()), before, "{}", what);
                }
                Err(e) => prop_assert!(false, "{}: {}", what, e),
            }
            prop_assert!(all_finite(&table, opt.as_ref()), "{}", what);
        }
        let state = opt.state();

        // The state loads into a fresh optimizer as it is.
        let mut fresh = cfg.optimizer();
        fresh.load_state(state.clone()).unwrap();
        prop_assert_eq!(bits(&table, &fresh.state()), bits(&table, &state), "{}", what);

        // Through a checkpoint file, then one more step on each: the same bits.
        let dir = Scratch::new("finite-states");
        let path = dir.path("ckpt.safetensors");
        io::save_checkpoint(&path, &table, opt.as_ref()).unwrap();
        let mut loaded = cfg.optimizer();
        let mut loaded_table = io::load_checkpoint(&path, &mut loaded).unwrap();
        prop_assert_eq!(bits(&loaded_table, &loaded.state()), bits(&table, &state), "{}", what);
        let grad = grad_of(&last);
        let a = opt.step(&mut table, &grad).map_err(|e| e.to_string());
        let b = loaded.step(&mut loaded_table, &grad).map_err(|e| e.to_string());
        prop_assert_eq!(a, b, "{}", what);
        opt.flush(&mut table).unwrap();
        loaded.flush(&mut loaded_table).unwrap();
        prop_assert_eq!(
            bits(&loaded_table, &loaded.state()),
            bits(&table, &opt.state()),
            "{}",
            what
        );
        prop_assert!(all_finite(&table, opt.as_ref()), "{}", what);
    }
}
