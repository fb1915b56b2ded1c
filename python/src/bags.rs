//! PyTorch's pooled-lookup inputs as the library's CSR [`embtable::Bags`]:
//! 1-D ids with `offsets` (one start per bag, or with the total appended
//! when `include_last_offset`), or 2-D ids of fixed-size bags; optional
//! `per_sample_weights` of the ids' shape; the pooling by PyTorch's name.

use embtable::Pooling;
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{self, Ids};
use crate::errors::value_error;

/// A pooling by its PyTorch name (`"sqrtn"` is TensorFlow's).
pub fn pooling(mode: &str) -> PyResult<Pooling> {
    match mode {
        "sum" => Ok(Pooling::Sum),
        "mean" => Ok(Pooling::Mean),
        "max" => Ok(Pooling::Max),
        "sqrtn" => Ok(Pooling::SqrtN),
        _ => Err(value_error(format!(
            "mode must be \"sum\", \"mean\", \"max\" or \"sqrtn\", got {mode:?}"
        ))),
    }
}

/// The arguments of a pooled lookup, converted.
pub struct BagArgs<'py> {
    ids: Ids<'py>,
    /// CSR offsets: `bags + 1` entries.
    offsets: Vec<usize>,
    weights: Option<PyReadonlyArrayDyn<'py, f32>>,
    pub pooling: Pooling,
}

/// Borrowed view of [`BagArgs`] that can cross into a call without the GIL.
#[derive(Clone, Copy)]
pub struct BagView<'a> {
    pub ids: &'a [i64],
    pub offsets: &'a [usize],
    pub weights: Option<&'a [f32]>,
    pub pooling: Pooling,
}

/// Evaluates `$body` (an `embtable::Result`) with `$bags` bound to the
/// `embtable::Bags` of a [`BagView`].
macro_rules! with_bags {
    ($view:expr, |$bags:ident| $body:expr) => {{
        let view: $crate::bags::BagView<'_> = $view;
        match embtable::Bags::new(view.ids, view.offsets, view.weights) {
            Ok($bags) => $body,
            Err(e) => Err(e),
        }
    }};
}
pub(crate) use with_bags;

impl<'py> BagArgs<'py> {
    /// Converts and checks the arguments' shapes (ids and weights are checked
    /// against the table by the library).
    pub fn new(
        ids: &Bound<'py, PyAny>,
        offsets: Option<&Bound<'py, PyAny>>,
        per_sample_weights: Option<&Bound<'py, PyAny>>,
        mode: &str,
        include_last_offset: bool,
    ) -> PyResult<Self> {
        let pooling = pooling(mode)?;
        let ids = arrays::ids(ids, "input")?;
        let n = ids.len();
        let offsets = match (ids.shape(), offsets) {
            (&[bags, bag_len], None) => (0..=bags).map(|b| b * bag_len).collect(),
            ([_, _], Some(_)) => {
                return Err(value_error(
                    "offsets must be None when input is 2-D (each row is one bag)",
                ));
            }
            ([_], None) => {
                return Err(value_error(
                    "offsets is required when input is 1-D (give one start per bag)",
                ));
            }
            ([_], Some(offsets)) => {
                let mut offsets = arrays::offsets(offsets)?;
                if include_last_offset {
                    match offsets.last() {
                        None => {
                            return Err(value_error(
                                "offsets is empty; with include_last_offset=True it needs at \
                                 least the final total",
                            ));
                        }
                        Some(&last) if last != n => {
                            return Err(value_error(format!(
                                "offset {last} at position {} (the last) must equal the number \
                                 of ids, {n}, with include_last_offset=True",
                                offsets.len() - 1
                            )));
                        }
                        Some(_) => {}
                    }
                } else {
                    if offsets.is_empty() && n > 0 {
                        return Err(value_error(format!(
                            "offsets is empty, so there are no bags, but input holds {n} ids"
                        )));
                    }
                    offsets.push(n);
                }
                offsets
            }
            (shape, _) => {
                return Err(value_error(format!(
                    "input must be 1-D (with offsets) or 2-D (one bag per row), got shape {}",
                    arrays::tuple(shape)
                )));
            }
        };
        let weights = match per_sample_weights {
            None => None,
            Some(w) if w.is_none() => None,
            Some(w) => {
                let w = arrays::floats(w, "per_sample_weights")?;
                if w.shape() != ids.shape() {
                    return Err(value_error(format!(
                        "per_sample_weights has shape {}, but input has shape {}",
                        arrays::tuple(w.shape()),
                        arrays::tuple(ids.shape())
                    )));
                }
                Some(w)
            }
        };
        Ok(Self {
            ids,
            offsets,
            weights,
            pooling,
        })
    }

    /// Number of bags.
    pub fn bags(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn view(&self) -> BagView<'_> {
        BagView {
            ids: self.ids.slice(),
            offsets: &self.offsets,
            weights: self
                .weights
                .as_ref()
                .map(|w| w.as_slice().expect("weights are C-contiguous")),
            pooling: self.pooling,
        }
    }
}
