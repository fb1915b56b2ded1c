//! `Tensor`: a row-major n-d array, so that a `batch × seq_len` (or any
//! n-d) batch of ids goes into a layer and comes out with its shape.

use crate::{Error, Result};

/// A row-major (C order) n-d array: a shape and its values, as a NumPy
/// array or a `torch.Tensor` holds them.
///
/// The ids of an n-d batch go into [`Embedding::forward_nd`], which returns
/// a tensor of shape `ids.shape() + [dim]`, as Keras' and PyTorch's
/// embeddings do; [`Embedding::mask_nd`] gives a mask of the ids' shape.
/// With the `ndarray` feature, tensors convert to and from
/// `ndarray::ArrayD`.
///
/// [`Embedding::forward_nd`]: crate::Embedding::forward_nd
/// [`Embedding::mask_nd`]: crate::Embedding::mask_nd
///
/// # Examples
/// ```
/// use embtable::Tensor;
/// // Two sequences of three ids, padded with 0.
/// let ids = Tensor::from_rows(&[[4i64, 2, 0], [7, 0, 0]])?;
/// assert_eq!(ids.shape(), &[2, 3]);
/// assert_eq!(ids.at(&[1]), &[7, 0, 0]);
/// assert_eq!(ids.as_slice(), &[4, 2, 0, 7, 0, 0]);
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

impl<T> Tensor<T> {
    /// A tensor of `shape` holding `data` in row-major order. A shape of
    /// no axes is a scalar (one value).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `data.len()` is not the product of
    /// `shape` (or that product overflows).
    ///
    /// # Examples
    /// ```
    /// use embtable::Tensor;
    /// let t = Tensor::new(vec![1u32, 2, 3, 4, 5, 6], [2, 3])?;
    /// assert_eq!(t.at(&[1, 2]), &[6]);
    /// assert!(Tensor::new(vec![1u32, 2, 3], [2, 2]).is_err());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn new(data: Vec<T>, shape: impl Into<Vec<usize>>) -> Result<Self> {
        let shape = shape.into();
        let len = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX);
        Error::check_len("tensor values (product of the shape)", len, data.len())?;
        Ok(Self { shape, data })
    }

    /// The length of each axis, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of axes.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Number of values (the product of the shape).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor holds no values (some axis is 0).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The values, row-major.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }

    /// The values, row-major, mutably (the shape stays).
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// The values, row-major.
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }

    /// The values at a leading `index`: with `index` of length `k`, the
    /// `shape[k..]` block there, row-major. `out.at(&[b, t])` is the
    /// embedding of the `t`-th id of sequence `b`; a full index gives one
    /// value.
    ///
    /// # Panics
    /// If `index` has more entries than the tensor has axes, or one is out
    /// of range for its axis.
    #[track_caller]
    pub fn at(&self, index: &[usize]) -> &[T] {
        assert!(
            index.len() <= self.shape.len(),
            "index {index:?} has more entries than the {} axes of shape {:?}",
            self.shape.len(),
            self.shape
        );
        let mut start = 0;
        for (axis, (&i, &n)) in index.iter().zip(&self.shape).enumerate() {
            assert!(
                i < n,
                "index {i} is out of range for axis {axis} of shape {:?}",
                self.shape
            );
            start = start * n + i;
        }
        let block: usize = self.shape[index.len()..].iter().product();
        &self.data[start * block..][..block]
    }
}

impl<T: Clone> Tensor<T> {
    /// A 2-D tensor of `rows.len()` rows, each as long as the first: a
    /// batch of sequences padded to one length.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first row whose length differs
    /// from the first row's.
    ///
    /// # Examples
    /// ```
    /// use embtable::Tensor;
    /// let batch = vec![vec![1i64, 2], vec![3, 4], vec![5, 6]];
    /// assert_eq!(Tensor::from_rows(&batch)?.shape(), &[3, 2]);
    /// assert!(Tensor::from_rows(&[vec![1i64, 2], vec![3]]).is_err());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn from_rows<R: AsRef<[T]>>(rows: &[R]) -> Result<Self> {
        let width = rows.first().map_or(0, |r| r.as_ref().len());
        let mut data = Vec::with_capacity(rows.len() * width);
        for (k, row) in rows.iter().enumerate() {
            let row = row.as_ref();
            if row.len() != width {
                return Err(Error::InvalidConfig {
                    field: "rows",
                    reason: format!(
                        "row {k} holds {} and row 0 holds {width}; pad the rows to \
                         one length",
                        crate::error::count(row.len(), "value")
                    ),
                });
            }
            data.extend_from_slice(row);
        }
        Ok(Self {
            shape: vec![rows.len(), width],
            data,
        })
    }
}

/// A 1-D tensor of the values.
impl<T> From<Vec<T>> for Tensor<T> {
    fn from(data: Vec<T>) -> Self {
        Self {
            shape: vec![data.len()],
            data,
        }
    }
}

#[cfg(feature = "ndarray")]
mod interop {
    use ndarray::{ArrayD, IxDyn, ShapeBuilder};

    use super::Tensor;
    use crate::{Error, Result};

    /// The tensor as an `ndarray::ArrayD` of the same shape (no copy).
    impl<T> From<Tensor<T>> for ArrayD<T> {
        fn from(t: Tensor<T>) -> Self {
            ArrayD::from_shape_vec(IxDyn(&t.shape).strides(row_major(&t.shape)), t.data)
                .expect("a tensor's values fill its shape")
        }
    }

    /// Row-major strides of `shape`.
    fn row_major(shape: &[usize]) -> IxDyn {
        let mut strides = vec![0; shape.len()];
        let mut step = 1;
        for (s, &n) in strides.iter_mut().zip(shape).rev() {
            *s = step;
            step *= n;
        }
        IxDyn(&strides)
    }

    impl<T: Clone> Tensor<T> {
        /// A tensor holding the values of any `ndarray` array or view, in
        /// logical (row-major) order whatever its memory layout.
        ///
        /// # Examples
        /// ```
        /// use embtable::Tensor;
        /// let a = ndarray::array![[1i64, 2, 3], [4, 5, 6]];
        /// let t = Tensor::from_array(a.t()); // a transposed view
        /// assert_eq!((t.shape(), t.as_slice()), (&[3, 2][..], &[1, 4, 2, 5, 3, 6][..]));
        /// ```
        pub fn from_array<S, D>(array: ndarray::ArrayBase<S, D>) -> Self
        where
            S: ndarray::Data<Elem = T>,
            D: ndarray::Dimension,
        {
            let shape = array.shape().to_vec();
            let data = match array.as_slice() {
                Some(slice) => slice.to_vec(),
                None => array.iter().cloned().collect(),
            };
            Self { shape, data }
        }

        /// The tensor as an `ndarray` array of dimension `D`.
        ///
        /// # Errors
        /// [`Error::ShapeMismatch`] (what: `array rank`) if `D` is a fixed
        /// dimension other than the tensor's number of axes.
        pub fn into_array<D: ndarray::Dimension>(self) -> Result<ndarray::Array<T, D>> {
            let ndim = self.ndim();
            ArrayD::from(self)
                .into_dimensionality::<D>()
                .map_err(|_| Error::ShapeMismatch {
                    what: "array rank",
                    expected: D::NDIM.unwrap_or(ndim),
                    got: ndim,
                })
        }
    }

    impl crate::EmbeddingTable {
        /// A table holding a `(rows, dim)` array or view, in logical order
        /// whatever its layout (feature `ndarray`).
        ///
        /// # Errors
        /// As [`EmbeddingTable::from_rows`](crate::EmbeddingTable::from_rows).
        ///
        /// # Examples
        /// ```
        /// use embtable::EmbeddingTable;
        /// let weights = ndarray::array![[0.0f32, 1.0], [2.0, 3.0], [4.0, 5.0]];
        /// let table = EmbeddingTable::from_array(&weights)?;
        /// assert_eq!(table.row(2), &[4.0, 5.0]);
        /// assert_eq!(table.to_array(), weights);
        /// # Ok::<(), embtable::Error>(())
        /// ```
        pub fn from_array<S: ndarray::Data<Elem = f32>>(
            array: &ndarray::ArrayBase<S, ndarray::Ix2>,
        ) -> Result<Self> {
            let (rows, dim) = array.dim();
            let values = Tensor::from_array(array.view()).into_vec();
            Self::from_rows(rows, dim, &values)
        }

        /// The table as a `(rows, dim)` array (a copy; feature `ndarray`).
        pub fn to_array(&self) -> ndarray::Array2<f32> {
            ndarray::Array2::from_shape_vec((self.rows(), self.dim()), self.to_vec())
                .expect("rows * dim values")
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_through_ndarray() {
            let t = Tensor::new((0..24).collect::<Vec<i32>>(), [2, 3, 4]).unwrap();
            let a: ArrayD<i32> = t.clone().into();
            assert_eq!(a[[1, 2, 3]], 23);
            assert_eq!(Tensor::from_array(a.view()), t);
            assert!(t.clone().into_array::<ndarray::Ix2>().is_err());
            assert_eq!(t.into_array::<ndarray::Ix3>().unwrap()[[1, 0, 2]], 14);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_indexes_leading_axes() {
        let t = Tensor::new((0..24).collect::<Vec<u32>>(), [2, 3, 4]).unwrap();
        assert_eq!(t.at(&[]), t.as_slice());
        assert_eq!(t.at(&[1]), &(12..24).collect::<Vec<u32>>()[..]);
        assert_eq!(t.at(&[1, 2]), &[20, 21, 22, 23]);
        assert_eq!(t.at(&[0, 1, 3]), &[7]);
        let scalar = Tensor::new(vec![5.0f32], []).unwrap();
        assert_eq!((scalar.ndim(), scalar.at(&[])), (0, &[5.0][..]));
    }

    #[test]
    #[should_panic(expected = "out of range for axis 1")]
    fn at_checks_each_axis() {
        let t = Tensor::new(vec![0u8; 6], [2, 3]).unwrap();
        let _ = t.at(&[1, 3]);
    }

    #[test]
    fn shapes_must_fill() {
        assert!(Tensor::new(vec![0u8; 5], [2, 3]).is_err());
        assert!(Tensor::new(vec![0u8; 0], [usize::MAX, 2]).is_err());
        assert!(Tensor::new(vec![0u8; 0], [0, 7]).unwrap().is_empty());
    }
}
