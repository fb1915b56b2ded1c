//! Filling the rows of admitted keys with their initial values.
//!
//! A key's row starts as `Init::fill_key_row` draws it (row `k` of a fixed
//! table for key `k`). Drawn one float at a time, 128 floats of the default
//! uniform init cost about as much as the rest of a key's translation, and
//! each store to a row long out of the caches (a victim's) first waits for
//! the line to be read. For the uniform init on AVX2, eight draws of
//! SplitMix64 are made at once in 64-bit lanes and whole cache lines are
//! stored non-temporally: the same values, bit for bit (the tests draw every
//! row both ways), without the wait or the read. Other inits, and other
//! CPUs, draw one at a time.
//!
//! A fused step that updates the admitted rows draws each right before its
//! update instead ([`Filler::fill_cached`]), with ordinary stores: the row
//! is then in L1 for the update, and crosses memory once rather than
//! being written out here and read back by the step.

use crate::Init;
use crate::init::mix;
use crate::kernels::{self, Tier};

/// How rows are filled, chosen once per batch of admissions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Filler {
    init: Init,
    seed: u64,
    /// Whether the AVX2 uniform fill runs (the CPU has it, the tier in use
    /// allows it, and the init is uniform).
    wide: bool,
}

impl Filler {
    pub(crate) fn new(init: Init, seed: u64) -> Self {
        let tier = kernels::current();
        let wide = cfg!(target_arch = "x86_64")
            && matches!(tier, Tier::Avx2 | Tier::Avx512)
            && matches!(init, Init::Uniform { .. });
        Self { init, seed, wide }
    }

    /// Fills `row`, one whole padded row of the storage (64-byte aligned,
    /// its pad lanes `dim..` zero), with `key`'s initial values; the pads
    /// stay zero. Call [`finish`](Self::finish) before the rows are read by
    /// another thread.
    pub(crate) fn fill(&self, key: u64, row: &mut [f32], dim: usize) {
        self.draw::<true>(key, row, dim);
    }

    /// [`fill`](Self::fill) with ordinary stores, for a row about to be
    /// read by this thread: it stays in the caches, and no
    /// [`finish`](Self::finish) is needed.
    pub(crate) fn fill_cached(&self, key: u64, row: &mut [f32], dim: usize) {
        self.draw::<false>(key, row, dim);
    }

    #[inline(always)]
    fn draw<const STREAM: bool>(&self, key: u64, row: &mut [f32], dim: usize) {
        debug_assert!(dim <= row.len() && row.len().is_multiple_of(16));
        debug_assert!((row.as_ptr() as usize).is_multiple_of(64));
        #[cfg(target_arch = "x86_64")]
        if self.wide
            && let Init::Uniform { low, high } = self.init
        {
            // SAFETY: `wide` is set only when the tier in use is AVX2 or
            // AVX-512, so this CPU has AVX2; `row` is whole 64-byte lines
            // at a 64-byte boundary, as `fill_uniform_avx2` needs.
            if unsafe { fill_uniform_avx2::<STREAM>(self.seed, key, low, high, row, dim) } {
                return;
            }
        }
        self.init.fill_key_row(self.seed, key, &mut row[..dim]);
    }

    /// Orders the non-temporal stores of [`fill`](Self::fill) before any
    /// later store of this thread (the rows are then read by others).
    pub(crate) fn finish(&self) {
        #[cfg(target_arch = "x86_64")]
        if self.wide {
            // SAFETY: SSE is part of the x86-64 baseline.
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
    }
}

/// `Init::Uniform`'s row for `key`, eight draws at a time, stored
/// non-temporally if `STREAM`; the lanes from `dim` on get zeros. Returns
/// `false`, leaving `row` partly written, if a draw rounds to `high`:
/// uniform draws that again, one at a time, which shifts the rest of the
/// row's stream (about once in 2²⁴ draws for the default bounds).
///
/// The draws match `SplitMix64::unit_f32`: the stream of key `k` starts at
/// `mix(seed ^ mix(k + γ))` and draw `i` is `mix(s + (i + 1)γ) >> 40`.
/// SplitMix64's last step, `z ^ (z >> 31)`, leaves bits 40 and up alone,
/// so it is skipped. Then `low + (high - low) * (u * 2⁻²⁴)` with the
/// scalar code's roundings (no fused multiply-add), computed as
/// `low + ((high - low) * 2⁻²⁴) * u`: when that scaling is exact (else this
/// returns `false` at once), the product is the same real number, rounded
/// once.
///
/// # Safety
/// The CPU has AVX2; `row` starts at a 32-byte boundary and its length is
/// a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_uniform_avx2<const STREAM: bool>(
    seed: u64,
    key: u64,
    low: f32,
    high: f32,
    row: &mut [f32],
    dim: usize,
) -> bool {
    use std::arch::x86_64::*;

    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    // `z * c` in each 64-bit lane, wrapping: the low halves' full product,
    // plus the cross products' low halves (one 32-bit multiply of `z` by
    // `c` with its halves swapped) in the high half.
    let mul64 = |z: __m256i, c_lo: __m256i, c_swapped: __m256i| {
        let low = _mm256_mul_epu32(z, c_lo);
        let cross = _mm256_mullo_epi32(z, c_swapped);
        let cross = _mm256_add_epi32(cross, _mm256_srli_epi64::<32>(cross));
        _mm256_add_epi64(low, _mm256_slli_epi64::<32>(cross))
    };
    let halves = |c: u64| {
        (
            _mm256_set1_epi64x(c as u32 as i64),
            _mm256_set1_epi64x(c.rotate_left(32) as i64),
        )
    };
    let (c1_lo, c1_swapped) = halves(0xBF58_476D_1CE4_E5B9);
    let (c2_lo, c2_swapped) = halves(0x94D0_49BB_1331_11EB);
    // SplitMix64's output for the states in `s`, but its last step.
    let mixed = |s: __m256i| {
        let z = _mm256_xor_si256(s, _mm256_srli_epi64::<30>(s));
        let z = mul64(z, c1_lo, c1_swapped);
        let z = _mm256_xor_si256(z, _mm256_srli_epi64::<27>(z));
        mul64(z, c2_lo, c2_swapped)
    };
    let start = mix(seed ^ mix(key.wrapping_add(GAMMA)));
    let lane = |i: u64| start.wrapping_add(GAMMA.wrapping_mul(i)) as i64;
    // The odd draws in `odd`'s lanes, the even ones in `even`'s: the 32-bit
    // lanes of (odd >> 40) blended with (even >> 8) are the eight in order.
    let mut odd = _mm256_set_epi64x(lane(7), lane(5), lane(3), lane(1));
    let mut even = _mm256_set_epi64x(lane(8), lane(6), lane(4), lane(2));
    let step = _mm256_set1_epi64x(GAMMA.wrapping_mul(8) as i64);
    let range = high - low;
    let scaled = range * (1.0 / (1u64 << 24) as f32);
    if scaled * (1u64 << 24) as f32 != range {
        return false; // a range below 2⁻¹⁰²: not worth a path of its own
    }
    let scaled = _mm256_set1_ps(scaled);
    let (low_v, high_v) = (_mm256_set1_ps(low), _mm256_set1_ps(high));
    let mut draw = || {
        let (a, b) = (mixed(odd), mixed(even));
        odd = _mm256_add_epi64(odd, step);
        even = _mm256_add_epi64(even, step);
        let draws = _mm256_blend_epi32::<0b1010_1010>(
            _mm256_srli_epi64::<40>(a),
            _mm256_srli_epi64::<8>(b),
        );
        // Exact: a 24-bit integer.
        let unit = _mm256_cvtepi32_ps(draws);
        _mm256_add_ps(low_v, _mm256_mul_ps(scaled, unit))
    };
    let out = row.as_mut_ptr();
    let store = |at: usize, v: __m256| {
        // SAFETY: `at + 8 <= row.len()` (a multiple of 8) and `out + at`
        // is 32-byte aligned, as the caller promises.
        unsafe {
            if STREAM {
                _mm256_stream_ps(out.add(at), v);
            } else {
                _mm256_store_ps(out.add(at), v);
            }
        }
    };
    let mut rejected = _mm256_setzero_ps();
    let whole = dim / 8 * 8;
    for at in (0..whole).step_by(8) {
        let v = draw();
        rejected = _mm256_or_ps(rejected, _mm256_cmp_ps::<_CMP_NLT_UQ>(v, high_v));
        store(at, v);
    }
    if whole < dim {
        // Lanes from `dim` on are pads: zero, never a rejected draw.
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let live = _mm256_cmpgt_epi32(_mm256_set1_epi32((dim - whole) as i32), lanes);
        let live = _mm256_castsi256_ps(live);
        let v = _mm256_and_ps(draw(), live);
        let over = _mm256_cmp_ps::<_CMP_NLT_UQ>(v, high_v);
        rejected = _mm256_or_ps(rejected, _mm256_and_ps(over, live));
        store(whole, v);
    }
    for at in (dim.next_multiple_of(8)..row.len()).step_by(8) {
        store(at, _mm256_setzero_ps());
    }
    _mm256_movemask_ps(rejected) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aligned::AlignedBuf;

    /// Every row of `init` drawn by the filler, streamed or not, equals
    /// `fill_key_row`'s, pads zero, for each tier this CPU has.
    fn agrees(init: Init, dims: &[usize], keys: u64) {
        for tier in Tier::available() {
            kernels::with_tier(tier, || {
                for &dim in dims {
                    let stride = dim.next_multiple_of(16);
                    let mut buf = AlignedBuf::zeroed(stride, "row").unwrap();
                    let filler = Filler::new(init, 0x5eed ^ dim as u64);
                    for key in 0..2 * keys {
                        let (stream, key) = (key % 2 == 0, mix(key / 2).rotate_left(dim as u32));
                        let row = buf.as_mut_slice();
                        row[..dim].fill(f32::NAN); // the pads are zero, as in the storage
                        if stream {
                            filler.fill(key, row, dim);
                            filler.finish();
                        } else {
                            filler.fill_cached(key, row, dim);
                        }
                        let mut want = vec![0.0; dim];
                        init.fill_key_row(0x5eed ^ dim as u64, key, &mut want);
                        let got = &buf.as_slice()[..dim];
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{tier} {init:?} dim {dim} key {key} stream {stream}");
                        assert!(buf.as_slice()[dim..].iter().all(|&x| x == 0.0));
                    }
                }
            });
        }
    }

    #[test]
    fn rows_are_fill_key_rows_bit_for_bit() {
        let dims = [1, 5, 8, 9, 16, 17, 33, 64, 70, 128];
        agrees(Init::default(), &dims, 300);
        agrees(
            Init::Uniform {
                low: -3.0,
                high: 1e-3,
            },
            &dims,
            100,
        );
        agrees(
            Init::Normal {
                mean: 0.5,
                std: 2.0,
            },
            &[7, 128],
            20,
        );
    }

    #[test]
    fn a_range_too_small_to_scale_exactly_is_drawn_one_at_a_time() {
        agrees(
            Init::Uniform {
                low: 0.0,
                high: 1e-35,
            },
            &[16, 128],
            20,
        );
    }

    #[test]
    fn draws_that_round_to_high_are_drawn_again() {
        // The floats near 1e8 are 8 apart: about half the draws round to
        // `high` and are drawn again, which shifts the rest of the row.
        agrees(
            Init::Uniform {
                low: 1e8,
                high: 1e8 + 8.0,
            },
            &[3, 16, 128],
            50,
        );
    }
}
