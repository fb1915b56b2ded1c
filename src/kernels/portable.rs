//! The portable tier: `wide::f32x8`, which compiles to the target's baseline
//! vector instructions (two SSE2 registers on x86-64, NEON on AArch64).

use wide::f32x8;

use super::{Simd, Tier};

/// Token of the portable tier (always available).
#[derive(Clone, Copy, Debug, Default)]
pub struct Portable;

impl Simd for Portable {
    type V = f32x8;
    const N: usize = 8;
    const TIER: Tier = Tier::Portable;

    #[inline(always)]
    fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }
    #[inline(always)]
    fn load(self, src: &[f32]) -> f32x8 {
        let lanes: [f32; 8] = src[..8].try_into().expect("8 floats");
        f32x8::from(lanes)
    }
    #[inline(always)]
    fn store(self, v: f32x8, dst: &mut [f32]) {
        dst[..8].copy_from_slice(&v.to_array());
    }
    #[inline(always)]
    fn load_partial(self, src: &[f32]) -> f32x8 {
        let mut lanes = [0.0; 8];
        let n = src.len().min(8);
        lanes[..n].copy_from_slice(&src[..n]);
        f32x8::from(lanes)
    }
    #[inline(always)]
    fn store_partial(self, v: f32x8, dst: &mut [f32]) {
        let n = dst.len().min(8);
        dst[..n].copy_from_slice(&v.to_array()[..n]);
    }
    #[inline(always)]
    fn add(self, a: f32x8, b: f32x8) -> f32x8 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32x8, b: f32x8) -> f32x8 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32x8, b: f32x8) -> f32x8 {
        a * b
    }
    #[inline(always)]
    fn div(self, a: f32x8, b: f32x8) -> f32x8 {
        a / b
    }
    #[inline(always)]
    fn sqrt(self, a: f32x8) -> f32x8 {
        a.sqrt()
    }
    #[inline(always)]
    fn max(self, a: f32x8, b: f32x8) -> f32x8 {
        // An explicit select, so NaN and signed-zero cases match the other tiers.
        a.simd_gt(b).select(a, b)
    }
    #[inline(always)]
    fn min(self, a: f32x8, b: f32x8) -> f32x8 {
        a.simd_lt(b).select(a, b)
    }
}
