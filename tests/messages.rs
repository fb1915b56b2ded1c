//! Messages that count things agree in number: "1 row", never "1 rows",
//! for every error (and panic) whose count can be one.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use common::Scratch;
use embtable::io::{self, Word2VecFormat};
use embtable::{Bags, EmbeddingTable, Sgd, SparseGrad, SparseOptimizer, Tensor};

/// The panic message of `f`.
fn panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("panics");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Each message says one thing in the singular, and the same message
/// with another count says it in the plural.
fn singular(message: impl ToString, one: &str) {
    let message = message.to_string();
    assert!(message.contains(one), "{message:?} lacks {one:?}");
    assert!(!message.contains(&format!("{one}s")), "{message:?}");
}

#[test]
fn errors_count_one_thing_in_the_singular() {
    let one_row = EmbeddingTable::zeros(1, 1).unwrap();
    singular(one_row.lookup_vec(&[3u32]).unwrap_err(), "a table of 1 row");
    let three = EmbeddingTable::zeros(3, 1).unwrap();
    singular(three.lookup_vec(&[3u32]).unwrap_err(), "3 rows");

    singular(Bags::fixed(&[1u32], 2).unwrap_err(), "1 id cannot");
    singular(Bags::fixed(&[1u32, 2, 3], 2).unwrap_err(), "3 ids cannot");

    singular(
        Tensor::from_rows(&[vec![1u32, 2], vec![3]]).unwrap_err(),
        "row 1 holds 1 value and",
    );

    let dir = Scratch::new("messages");
    // A text vector file of dimension 1 with a line of two values.
    let text = dir.write("dim1.txt", "2 1\na 0.5\nb 0.5 0.25\n");
    singular(
        io::read_word2vec(&text, Word2VecFormat::Text).unwrap_err(),
        "expected 1 value after word",
    );
    // A file whose header declares two vectors and holds one.
    let short = dir.write("short.txt", "2 1\na 0.5\n");
    singular(
        io::read_word2vec(&short, Word2VecFormat::Text).unwrap_err(),
        "ends after 1 vector,",
    );
    // A binary file too short for its one vector of one value.
    let binary = dir.write("short.bin", b"1 1\na");
    let e = io::read_word2vec(&binary, Word2VecFormat::Binary)
        .unwrap_err()
        .to_string();
    singular(&e, "a vector of 1 value needs");
    singular(&e, "1 byte left");
    // An .npy file with one byte after the data of its one row.
    let npy = dir.path("one.npy");
    io::save_npy(&npy, &one_row).unwrap();
    let mut bytes = std::fs::read(&npy).unwrap();
    bytes.push(0);
    std::fs::write(&npy, bytes).unwrap();
    let e = io::load_npy(&npy).unwrap_err();
    singular(&e, "1 byte after the data of the 1 row the shape");

    // An optimizer state that has taken one step but has no table shape.
    let mut state = Sgd::default().state();
    state.steps = 1;
    state.shape = None;
    let e = Sgd::default().load_state(state).unwrap_err();
    singular(&e, "got 1 step and 0 arrays");
}

#[test]
fn panics_count_one_thing_in_the_singular() {
    let table = EmbeddingTable::zeros(1, 2).unwrap();
    singular(
        panic_message(|| {
            let _ = table.row(1);
        }),
        "out of range for 1 row",
    );
    let mut table = table;
    singular(
        panic_message(|| {
            let _ = table.row_mut(4);
        }),
        "out of range for 1 row",
    );
    let table = EmbeddingTable::zeros(1, 2).unwrap();
    singular(
        panic_message(|| {
            let _ = table.cosine(0, 1);
        }),
        "out of range for 1 row",
    );

    let mut grad = SparseGrad::new(2);
    grad.accumulate_lookup(&[0u32], &[1.0, 1.0]).unwrap();
    singular(
        panic_message(|| {
            let _ = grad.row_grad(1);
        }),
        "out of range for 1 row",
    );
    let mut two = SparseGrad::new(1);
    two.accumulate_lookup(&[3u32], &[1.0]).unwrap();
    singular(
        panic_message(|| {
            let _ = two.to_dense(1);
        }),
        "the table has 1 row",
    );

    let bags = Bags::fixed(&[0u32, 1], 2).unwrap();
    singular(
        panic_message(|| {
            let _ = bags.range(1);
        }),
        "out of range for 1 bag",
    );
}
