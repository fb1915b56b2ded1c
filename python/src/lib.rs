//! `embtable._embtable`: the compiled half of the `embtable` Python package.
//!
//! This crate only converts and delegates: NumPy arrays and Python values
//! in, the library's calls, NumPy arrays and Python exceptions out. Long
//! calls release the GIL and run on embtable's thread pool ([`threads`]).
//! The PyTorch and Keras glue is pure Python (`embtable/torch.py`,
//! `embtable/keras.py`).

use pyo3::prelude::*;

mod arrays;
mod bags;
mod errors;
mod grad;
mod io;
mod layer;
mod optim;
mod outputs;
mod schedule;
mod table;
mod threads;

/// Fast, sparse embedding tables (see the `embtable` package).
#[pymodule]
fn _embtable(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<table::Table>()?;
    m.add_class::<grad::Grad>()?;
    m.add_class::<layer::Layer>()?;
    m.add_class::<io::Vocab>()?;
    m.add_class::<io::Pretrained>()?;
    m.add_class::<io::LoadedCheckpoint>()?;
    m.add_class::<schedule::ExponentialDecay>()?;
    m.add_class::<schedule::StepLr>()?;
    optim::register(m)?;
    m.add_function(wrap_pyfunction!(optim::optimizer_from_state_dict, m)?)?;
    m.add_function(wrap_pyfunction!(threads::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads::native_seconds, m)?)?;
    for f in [
        wrap_pyfunction!(io::read_word2vec, m)?,
        wrap_pyfunction!(io::read_fasttext_vec, m)?,
        wrap_pyfunction!(io::read_glove, m)?,
        wrap_pyfunction!(io::write_word2vec, m)?,
        wrap_pyfunction!(io::write_glove, m)?,
        wrap_pyfunction!(io::save_npy, m)?,
        wrap_pyfunction!(io::load_npy, m)?,
        wrap_pyfunction!(io::save_table_safetensors, m)?,
        wrap_pyfunction!(io::load_table_safetensors, m)?,
        wrap_pyfunction!(io::save_checkpoint, m)?,
        wrap_pyfunction!(io::load_checkpoint, m)?,
    ] {
        m.add_function(f)?;
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
