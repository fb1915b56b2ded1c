//! `AlignedBuf`: the one allocation behind a table or an optimizer state.
//!
//! Rows are stored `stride` floats apart, where `stride` is `dim` rounded up
//! to 16 floats (one 64-byte cache line). The buffer starts on a 64-byte
//! boundary, so every row does: a row never straddles more cache lines than
//! it must, and kernels may load and store whole strides with no tail loop.
//! The pad lanes `dim..stride` of every row are zero and stay zero: every
//! writer either writes whole strides computed from zero pads (and
//! `0 op 0` stays 0 in every update this crate does) or writes only `..dim`.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use rayon::prelude::*;

use crate::{Error, Result};

/// Floats per cache line: the row stride is a multiple of this.
pub const LANES_PER_LINE: usize = 16;

/// Buffers at least this large are aligned to 2 MiB and advised as huge
/// pages, which cuts TLB misses of random row access in large tables.
const HUGE_PAGE_THRESHOLD_BYTES: usize = 32 << 20;
pub(crate) const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Zeroing is split into chunks of this many floats so large buffers are
/// first touched in parallel (and so spread over the threads' memory nodes).
const ZERO_CHUNK: usize = 1 << 20;

/// The padded row stride for rows of `dim` floats, or `None` if it does
/// not fit a `usize`. Never wraps: a wrapped stride of 0 would let a table
/// of huge rows pass as an empty buffer.
#[inline]
pub const fn checked_stride(dim: usize) -> Option<usize> {
    dim.checked_next_multiple_of(LANES_PER_LINE)
}

/// The stride and the buffer length (`rows * stride` floats) of a padded
/// `rows × dim` buffer, checked so that its size in bytes fits too.
///
/// # Errors
/// [`Error::Alloc`] naming `what` (bytes `usize::MAX`) if the stride, the
/// length or the byte count overflows.
pub(crate) fn padded_len(rows: usize, dim: usize, what: &'static str) -> Result<(usize, usize)> {
    let too_large = || Error::Alloc {
        what,
        bytes: usize::MAX,
    };
    let stride = checked_stride(dim).ok_or_else(too_large)?;
    match rows.checked_mul(stride) {
        Some(len) if len.checked_mul(size_of::<f32>()).is_some() => Ok((stride, len)),
        _ => Err(too_large()),
    }
}

/// A zero-initialised, 64-byte aligned buffer of `f32`.
pub struct AlignedBuf {
    ptr: NonNull<f32>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<f32>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[f32]`, like a Vec<f32>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Alignment of every buffer, in bytes.
    pub const ALIGN: usize = 64;

    /// A buffer of `len` zeros.
    ///
    /// # Errors
    /// [`Error::Alloc`] if the size overflows or the allocator refuses, so a
    /// table too large for the machine is an `Err` rather than an abort.
    pub fn zeroed(len: usize, what: &'static str) -> Result<Self> {
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        let layout = Self::layout(len).ok_or(Error::Alloc {
            what,
            bytes: usize::MAX,
        })?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) } as *mut f32;
        let ptr = NonNull::new(raw).ok_or(Error::Alloc {
            what,
            bytes: layout.size(),
        })?;
        let buf = Self { ptr, len };
        if layout.align() == HUGE_PAGE_BYTES {
            advise_huge_pages(raw as *mut u8, layout.size());
        }
        buf.zero_fill();
        Ok(buf)
    }

    fn layout(len: usize) -> Option<Layout> {
        let bytes = len.checked_mul(size_of::<f32>())?;
        let align = if bytes >= HUGE_PAGE_THRESHOLD_BYTES {
            HUGE_PAGE_BYTES
        } else {
            Self::ALIGN
        };
        Layout::from_size_align(bytes, align).ok()
    }

    /// Writes zeros over the whole (possibly uninitialised) buffer, in parallel.
    fn zero_fill(&self) {
        let base = SendPtr(self.ptr.as_ptr());
        let len = self.len;
        (0..len.div_ceil(ZERO_CHUNK)).into_par_iter().for_each(|c| {
            let start = c * ZERO_CHUNK;
            let n = ZERO_CHUNK.min(len - start);
            // SAFETY: chunks `start..start + n` are disjoint and inside the
            // allocation of `len` floats; all-zero bytes are a valid f32.
            unsafe { base.get().add(start).write_bytes(0, n) };
        });
    }

    /// Number of floats.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no floats.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The floats.
    #[inline]
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: ptr is valid for len initialised floats (zeroed at creation)
        // and aligned; the borrow of self prevents mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The floats, mutably.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Pointer to the first float (64-byte aligned unless the buffer is empty).
    #[inline]
    pub fn as_ptr(&self) -> *const f32 {
        self.ptr.as_ptr()
    }

    /// Mutable pointer to the first float.
    #[inline]
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr.as_ptr()
    }

    /// A copy of this buffer.
    ///
    /// # Errors
    /// [`Error::Alloc`] if the copy cannot be allocated.
    pub fn try_clone(&self) -> Result<Self> {
        let mut copy = Self::zeroed(self.len, "buffer copy")?;
        copy.as_mut_slice().copy_from_slice(self.as_slice());
        Ok(copy)
    }
}

impl Clone for AlignedBuf {
    /// # Panics
    /// If the copy cannot be allocated (use [`AlignedBuf::try_clone`] to get an `Err`).
    fn clone(&self) -> Self {
        self.try_clone()
            .expect("out of memory cloning an AlignedBuf")
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            let layout = Self::layout(self.len).expect("layout was valid at allocation");
            // SAFETY: ptr was allocated by `alloc::alloc` with this same layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr() as *mut u8, layout) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

/// A raw pointer that may cross to rayon's threads: the code using it
/// guarantees that threads touch disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used for writes to disjoint ranges, as each use site states.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// Not under Miri, which has no `madvise`: the advice is only a hint.
#[cfg(all(target_os = "linux", not(miri)))]
pub(crate) fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    // SAFETY: the range lies within one live allocation of ours (callers
    // pass whole pages of it); MADV_HUGEPAGE only
    // changes how the kernel backs it, never its contents. Failure (no THP
    // support) is harmless, so the result is ignored.
    unsafe {
        libc::madvise(ptr as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
    }
}

#[cfg(any(not(target_os = "linux"), miri))]
pub(crate) fn advise_huge_pages(_ptr: *mut u8, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_rounds_to_cache_lines() {
        for (dim, stride) in [(1, 16), (16, 16), (17, 32), (70, 80), (0, 0)] {
            assert_eq!(checked_stride(dim), Some(stride));
        }
    }

    /// The dims whose stride would not fit a `usize` (it once wrapped to
    /// 0, and `EmbeddingTable::zeros(1, usize::MAX)` returned an empty
    /// buffer that `renorm_rows` then read out of bounds), and those just
    /// below.
    #[test]
    fn strides_never_wrap() {
        let huge = (0..40).map(|k| usize::MAX - k).chain([
            usize::MAX / 2,
            usize::MAX / 4 + 1,
            isize::MAX as usize / 4,
            1 << 60,
        ]);
        for dim in huge {
            match checked_stride(dim) {
                Some(stride) => assert!(
                    stride >= dim && stride.is_multiple_of(16) && stride - dim < 16,
                    "{dim}"
                ),
                None => assert!(dim > usize::MAX - 15, "{dim}"),
            }
        }
        assert_eq!(checked_stride(0), Some(0));
        assert_eq!(checked_stride(usize::MAX - 15), Some(usize::MAX - 15));
        assert_eq!(checked_stride(usize::MAX - 14), None);
    }

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for len in [1, 16, 1000, ZERO_CHUNK + 3] {
            let buf = AlignedBuf::zeroed(len, "test").unwrap();
            assert_eq!(buf.as_ptr() as usize % AlignedBuf::ALIGN, 0);
            assert!(buf.as_slice().iter().all(|&x| x.to_bits() == 0));
        }
        // Large enough for the 2 MiB path.
        let big = AlignedBuf::zeroed(HUGE_PAGE_THRESHOLD_BYTES / 4, "test").unwrap();
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
    }

    #[test]
    fn impossible_size_is_an_err() {
        let err = AlignedBuf::zeroed(usize::MAX / 2, "table").unwrap_err();
        assert!(matches!(err, Error::Alloc { what: "table", .. }), "{err}");
        let err = AlignedBuf::zeroed(1 << 60, "table").unwrap_err();
        assert!(matches!(err, Error::Alloc { .. }), "{err}");
    }
}
