//! The x86-64 tiers: AVX2 (+FMA) with 8 lanes and AVX-512F with 16.
//!
//! Tokens are created only by `detect`, after the CPU reported the features;
//! every `unsafe` block below relies on that one invariant.

use std::arch::x86_64::*;

use super::{Kernel, Simd, Tier};

/// Token of the AVX2 tier: proof that this CPU has AVX2 and FMA.
#[derive(Clone, Copy, Debug)]
pub struct Avx2(());

impl Avx2 {
    /// The token, if this CPU has AVX2 and FMA.
    pub fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Avx2(()))
    }
}

/// Token of the AVX-512 tier: proof that this CPU has AVX-512F.
#[derive(Clone, Copy, Debug)]
pub struct Avx512(());

impl Avx512 {
    /// The token, if this CPU has AVX-512F.
    pub fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx512f").then_some(Avx512(()))
    }
}

#[target_feature(enable = "avx2,fma")]
fn run_avx2_features<K: Kernel>(kernel: K, simd: Avx2) -> K::Output {
    kernel.run(simd)
}

#[target_feature(enable = "avx512f")]
fn run_avx512_features<K: Kernel>(kernel: K, simd: Avx512) -> K::Output {
    kernel.run(simd)
}

/// Runs the kernel body compiled for AVX2.
#[inline]
pub(super) fn run_avx2<K: Kernel>(kernel: K, simd: Avx2) -> K::Output {
    // SAFETY: the token proves the CPU has AVX2 and FMA.
    unsafe { run_avx2_features(kernel, simd) }
}

/// Runs the kernel body compiled for AVX-512F.
#[inline]
pub(super) fn run_avx512<K: Kernel>(kernel: K, simd: Avx512) -> K::Output {
    // SAFETY: the token proves the CPU has AVX-512F.
    unsafe { run_avx512_features(kernel, simd) }
}

// In both impls, every `unsafe` block calls an intrinsic of the token's own
// feature set; the token exists only where detection found it.
impl Simd for Avx2 {
    type V = __m256;
    const N: usize = 8;
    const TIER: Tier = Tier::Avx2;

    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        // SAFETY: the Avx2 token proves AVX is available.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    fn load(self, src: &[f32]) -> __m256 {
        assert!(src.len() >= 8);
        // SAFETY: 8 floats are readable (asserted); AVX is available (token).
        unsafe { _mm256_loadu_ps(src.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, v: __m256, dst: &mut [f32]) {
        assert!(dst.len() >= 8);
        // SAFETY: 8 floats are writable (asserted); AVX is available (token).
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn stream(self, v: __m256, dst: &mut [f32]) {
        assert!(dst.len() >= 8 && (dst.as_ptr() as usize).is_multiple_of(32));
        // SAFETY: 8 floats are writable and the address is aligned
        // (asserted); the token proves the feature is available.
        unsafe { _mm256_stream_ps(dst.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn fence(self) {
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { _mm_sfence() }
    }
    #[inline(always)]
    fn load_partial(self, src: &[f32]) -> __m256 {
        let mut lanes = [0.0f32; 8];
        let n = src.len().min(8);
        lanes[..n].copy_from_slice(&src[..n]);
        self.load(&lanes)
    }
    #[inline(always)]
    fn store_partial(self, v: __m256, dst: &mut [f32]) {
        let mut lanes = [0.0f32; 8];
        self.store(v, &mut lanes);
        let n = dst.len().min(8);
        dst[..n].copy_from_slice(&lanes[..n]);
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the Avx2 token proves AVX is available.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the Avx2 token proves AVX is available.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the Avx2 token proves AVX is available.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the Avx2 token proves AVX is available.
        unsafe { _mm256_div_ps(a, b) }
    }
    #[inline(always)]
    fn sqrt(self, a: __m256) -> __m256 {
        // SAFETY: the Avx2 token proves AVX is available.
        unsafe { _mm256_sqrt_ps(a) }
    }
    #[inline(always)]
    fn max(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the Avx2 token proves AVX is available. `maxps` returns its
        // second operand unless `a > b`, the rule every tier follows.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    fn min(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the Avx2 token proves AVX is available. `minps` returns its
        // second operand unless `a < b`, the rule every tier follows.
        unsafe { _mm256_min_ps(a, b) }
    }
}

impl Simd for Avx512 {
    type V = __m512;
    const N: usize = 16;
    const TIER: Tier = Tier::Avx512;

    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        // SAFETY: the Avx512 token proves AVX-512F is available.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn load(self, src: &[f32]) -> __m512 {
        assert!(src.len() >= 16);
        // SAFETY: 16 floats are readable (asserted); AVX-512F is available.
        unsafe { _mm512_loadu_ps(src.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, v: __m512, dst: &mut [f32]) {
        assert!(dst.len() >= 16);
        // SAFETY: 16 floats are writable (asserted); AVX-512F is available.
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn stream(self, v: __m512, dst: &mut [f32]) {
        assert!(dst.len() >= 16 && (dst.as_ptr() as usize).is_multiple_of(64));
        // SAFETY: 16 floats are writable and the address is aligned
        // (asserted); the token proves the feature is available.
        unsafe { _mm512_stream_ps(dst.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn fence(self) {
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { _mm_sfence() }
    }
    #[inline(always)]
    fn load_partial(self, src: &[f32]) -> __m512 {
        let mask = lane_mask(src.len());
        // SAFETY: masked-off lanes are never read (and cannot fault); the
        // mask covers the first `min(src.len(), 16)` floats, all readable.
        unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr()) }
    }
    #[inline(always)]
    fn store_partial(self, v: __m512, dst: &mut [f32]) {
        let mask = lane_mask(dst.len());
        // SAFETY: only the first `min(dst.len(), 16)` lanes, all inside
        // `dst`, are in the mask and written.
        unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, v) }
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the Avx512 token proves AVX-512F is available.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the Avx512 token proves AVX-512F is available.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the Avx512 token proves AVX-512F is available.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the Avx512 token proves AVX-512F is available.
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    fn sqrt(self, a: __m512) -> __m512 {
        // SAFETY: the Avx512 token proves AVX-512F is available.
        unsafe { _mm512_sqrt_ps(a) }
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the Avx512 token proves AVX-512F is available. `vmaxps`
        // returns its second operand unless `a > b`, as every tier does.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn min(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the Avx512 token proves AVX-512F is available. `vminps`
        // returns its second operand unless `a < b`, as every tier does.
        unsafe { _mm512_min_ps(a, b) }
    }
}

/// A mask of the low `min(n, 16)` lanes. (A shift by `n` itself would
/// overflow from `n = 32` on.)
#[inline(always)]
fn lane_mask(n: usize) -> __mmask16 {
    u16::MAX.checked_shr(16 - n.min(16) as u32).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::lane_mask;

    /// The AVX-512 partial load and store are exactly as correct as their
    /// mask, and the mask is plain integer arithmetic: tested here on every
    /// x86-64 CPU, with or without AVX-512 (the loads themselves run in
    /// `kernels::tests` where the CPU has it). Lane `i` is in the mask iff
    /// `i < min(n, 16)`; lengths of 32 and more once overflowed the shift.
    #[test]
    fn lane_mask_holds_the_first_min_n_16_lanes_for_every_length() {
        let lengths = (0..=80).chain([127, 128, 1 << 20, usize::MAX - 1, usize::MAX]);
        for n in lengths {
            let mask = lane_mask(n);
            for lane in 0..16 {
                assert_eq!(
                    mask >> lane & 1 == 1,
                    lane < n.min(16),
                    "n {n}, lane {lane}"
                );
            }
        }
    }
}
