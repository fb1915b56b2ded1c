//! A layer whose accumulated gradient overflowed: the step is refused with
//! nothing written, and the layer can go on once the gradient is dropped.

use embtable::{Adagrad, Embedding, EmbeddingTable, Error, Init, Sgd, SparseOptimizer};

fn check_recovers<O: SparseOptimizer + Clone>(optimizer: O) {
    let table = EmbeddingTable::new(4, 3, Init::default(), 5).unwrap();
    let mut layer = Embedding::new(table.clone(), optimizer.clone());
    // Each value is finite; row 1's two contributions sum to infinity.
    layer.backward(&[1u32, 1], &[3e38; 6]).unwrap();
    let err = layer.step().unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    assert_eq!(layer.table(), &table, "nothing written");
    // The gradient is kept for inspection, so the next step fails too...
    assert_eq!(layer.grad().rows(), &[1]);
    assert!(layer.grad().row_grad(0)[0].is_infinite());
    assert!(layer.step().is_err());
    // ... until it is dropped: then training goes on as if the bad batch
    // had never been seen.
    layer.clear_grad();
    assert!(layer.grad().is_empty());
    layer.step().unwrap();
    assert_eq!(layer.table(), &table, "an empty step changes nothing");
    let mut fresh = Embedding::new(table, optimizer);
    for l in [&mut layer, &mut fresh] {
        l.backward(&[1u32, 2], &[0.5; 6]).unwrap();
        l.step().unwrap();
    }
    assert_eq!(layer.table(), fresh.table());
    assert_ne!(
        layer.table().row(1),
        EmbeddingTable::new(4, 3, Init::default(), 5)
            .unwrap()
            .row(1)
    );
}

#[test]
fn a_step_whose_gradient_sums_overflow_is_refused_and_the_layer_recovers() {
    check_recovers(Sgd::default());
    check_recovers(Adagrad::default());
}
