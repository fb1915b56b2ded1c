//! `ndarray` interop (feature `ndarray`): n-d id arrays and views into a
//! layer, arrays out, tables to and from `Array2`.
#![cfg(feature = "ndarray")]

use embtable::{Embedding, EmbeddingTable, Error, Init, Sgd, SgdConfig, Tensor};
use ndarray::{Array2, Array3, Axis, array, s};

#[test]
fn a_view_of_ids_goes_in_and_an_array_comes_out() {
    let table = EmbeddingTable::new(100, 4, Init::default(), 2).unwrap();
    let mut layer = Embedding::new(table, Sgd::default());
    let ids = Array2::from_shape_fn((6, 5), |(b, t)| ((b * 7 + t * 3) % 100) as i64);
    // A strided view: every other sequence, transposed.
    let view = ids.slice(s![..;2, ..]).reversed_axes();
    let out = layer.forward_array(&view).unwrap();
    assert_eq!(out.shape(), &[5, 3, 4]);
    for t in 0..5 {
        for b in 0..3 {
            let id = ids[[2 * b, t]] as usize;
            assert_eq!(out.slice(s![t, b, ..]).to_vec(), layer.table().row(id));
        }
    }
    let mask = layer.mask_array(&view);
    assert_eq!(mask.shape(), view.shape());
    assert_eq!(mask[[0, 0]], ids[[0, 0]] != 0);

    let grad = Array3::<f32>::ones((5, 3, 4));
    layer.backward_array(&view, &grad).unwrap();
    layer.step().unwrap();
    let err = layer
        .backward_array(&view, &grad.index_axis(Axis(0), 0).insert_axis(Axis(0)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                expected: 5,
                got: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn tables_and_tensors_convert() {
    let weights = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
    let table = EmbeddingTable::from_array(&weights.t()).unwrap_or_else(|_| unreachable!());
    assert_eq!((table.rows(), table.dim()), (2, 3));
    assert_eq!(table.row(1), &[2.0, 4.0, 6.0]);
    let mut layer = Embedding::new(
        EmbeddingTable::from_array(&weights).unwrap(),
        Sgd::new(SgdConfig {
            lr: 1.0,
            ..Default::default()
        }),
    );
    let ids = Tensor::from_array(array![[2i64, 0]]);
    let out: ndarray::ArrayD<f32> = layer.forward_nd(&ids).unwrap().into();
    assert_eq!(out, array![[[5.0f32, 6.0], [1.0, 2.0]]].into_dyn());
    assert_eq!(layer.table().to_array(), weights);
}
