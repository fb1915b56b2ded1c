//! Row operations shared by lookups, pooling and optimizers.
//!
//! Each takes a [`Simd`] token and slices of any length: whole vectors first,
//! then one partial vector for the tail (rows in padded layout have none).
//! Lane `i` of the result depends only on lane `i` of the inputs, so every
//! tier produces the same bits.

use super::{BLOCK_VECTORS, Simd};

/// Runs `body(range)` over `0..len` in steps of `S::N`, then once on the tail.
///
/// `body` gets the start of the chunk and whether it is a whole vector.
#[inline(always)]
fn for_chunks<S: Simd>(len: usize, mut body: impl FnMut(usize, bool)) {
    let whole = len - len % S::N;
    let mut i = 0;
    while i < whole {
        body(i, true);
        i += S::N;
    }
    if whole < len {
        body(whole, false);
    }
}

/// `dst = src` (equal lengths).
#[inline(always)]
pub fn copy_row<S: Simd>(s: S, src: &[f32], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    let len = dst.len().min(src.len());
    let whole = len - len % S::N;
    copy_vectors(s, &src[..whole], &mut dst[..whole], false);
    if whole < len {
        s.store_partial(s.load_partial(&src[whole..len]), &mut dst[whole..len]);
    }
}

/// `dst = src` (equal lengths), with non-temporal stores for the vectors of
/// `dst` that are whole and aligned, regular stores for the rest.
///
/// For outputs larger than the caches: streaming skips the read of each
/// destination line before it is overwritten. The caller must
/// [`Simd::fence`] before handing `dst` to another thread.
#[inline(always)]
pub fn copy_row_streaming<S: Simd>(s: S, src: &[f32], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    let len = dst.len().min(src.len());
    let misalign = dst.as_ptr() as usize % (S::N * 4) / 4;
    let head = ((S::N - misalign) % S::N).min(len);
    if head > 0 {
        s.store_partial(s.load_partial(&src[..head]), &mut dst[..head]);
    }
    let whole = head + (len - head) / S::N * S::N;
    copy_vectors(s, &src[head..whole], &mut dst[head..whole], true);
    if whole < len {
        s.store_partial(s.load_partial(&src[whole..len]), &mut dst[whole..len]);
    }
}

/// `dst = src` for lengths that are whole vectors, in fully unrolled blocks
/// of up to [`BLOCK_VECTORS`] vectors; `stream` stores them non-temporally
/// (`dst` aligned to the vector width).
///
/// A loop of one load and one store per vector was measured 25-40% slower
/// on W1 than the same copy unrolled: the row's loads then wait on each
/// other's loop control instead of all issuing at once.
#[inline(always)]
fn copy_vectors<S: Simd>(s: S, src: &[f32], dst: &mut [f32], stream: bool) {
    debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(S::N));
    let vectors = dst.len().min(src.len()) / S::N;
    let mut done = 0;
    while done < vectors {
        let (src, dst) = (&src[done * S::N..], &mut dst[done * S::N..]);
        done += match vectors - done {
            n if n >= BLOCK_VECTORS => copy_block::<S, BLOCK_VECTORS>(s, src, dst, stream),
            n if n >= 4 => copy_block::<S, 4>(s, src, dst, stream),
            n if n >= 2 => copy_block::<S, 2>(s, src, dst, stream),
            _ => copy_block::<S, 1>(s, src, dst, stream),
        };
    }
}

/// Copies the first `V` vectors of `src` to `dst` and returns `V`.
#[inline(always)]
fn copy_block<S: Simd, const V: usize>(s: S, src: &[f32], dst: &mut [f32], stream: bool) -> usize {
    let (src, dst) = (&src[..V * S::N], &mut dst[..V * S::N]);
    let block: [S::V; V] = std::array::from_fn(|v| s.load(&src[v * S::N..]));
    for (v, x) in block.into_iter().enumerate() {
        if stream {
            s.stream(x, &mut dst[v * S::N..]);
        } else {
            s.store(x, &mut dst[v * S::N..]);
        }
    }
    V
}

/// `acc += a * x` (equal lengths; the product is rounded before the sum).
#[inline(always)]
pub fn add_scaled<S: Simd>(s: S, acc: &mut [f32], x: &[f32], a: f32) {
    debug_assert_eq!(acc.len(), x.len());
    let len = acc.len().min(x.len());
    let av = s.splat(a);
    for_chunks::<S>(
        len,
        #[inline(always)]
        |i, whole| {
            if whole {
                let v = s.add(s.load(&acc[i..]), s.mul(av, s.load(&x[i..])));
                s.store(v, &mut acc[i..]);
            } else {
                let v = s.add(
                    s.load_partial(&acc[i..len]),
                    s.mul(av, s.load_partial(&x[i..len])),
                );
                s.store_partial(v, &mut acc[i..len]);
            }
        },
    );
}

/// `x *= a`.
#[inline(always)]
pub fn scale<S: Simd>(s: S, x: &mut [f32], a: f32) {
    let len = x.len();
    let av = s.splat(a);
    for_chunks::<S>(
        len,
        #[inline(always)]
        |i, whole| {
            if whole {
                let v = s.mul(s.load(&x[i..]), av);
                s.store(v, &mut x[i..]);
            } else {
                let v = s.mul(s.load_partial(&x[i..len]), av);
                s.store_partial(v, &mut x[i..len]);
            }
        },
    );
}
