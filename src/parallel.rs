//! When an operation splits its work across rayon's threads.

/// Below this many floats of work, an operation runs on the calling thread:
/// waking rayon's workers and handing them tasks costs more than the work
/// itself (32K floats, 128 KiB, take a few microseconds to read or write).
///
/// Each operation counts the floats it touches: a lookup its output, a
/// pooled lookup the rows it reads and writes, a gradient the floats it
/// accumulates, an optimizer step the floats of the rows it updates,
/// clipping the floats it scales. One threshold for all of them, so that
/// results never depend on which side of it a call falls (every parallel
/// path computes the serial path's bits) and tuning it is one edit.
///
/// Under Miri the threshold shrinks (see `kernels::parallel_size`), so
/// that its runs reach the parallel paths at sizes it can afford.
pub(crate) const PARALLEL_MIN_FLOATS: usize = crate::kernels::parallel_size(1 << 15);
