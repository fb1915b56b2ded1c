//! The scalar tier: one float at a time. The fallback on every target and the
//! oracle the vector tiers are tested against.

use super::{Simd, Tier};

/// Token of the scalar tier (always available).
#[derive(Clone, Copy, Debug, Default)]
pub struct Scalar;

impl Simd for Scalar {
    type V = f32;
    const N: usize = 1;
    const TIER: Tier = Tier::Scalar;

    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn load(self, src: &[f32]) -> f32 {
        src[0]
    }
    #[inline(always)]
    fn store(self, v: f32, dst: &mut [f32]) {
        dst[0] = v;
    }
    #[inline(always)]
    fn load_partial(self, src: &[f32]) -> f32 {
        // Kernels pass an empty tail here (a vector is one float).
        src.first().copied().unwrap_or(0.0)
    }
    #[inline(always)]
    fn store_partial(self, v: f32, dst: &mut [f32]) {
        if let Some(x) = dst.first_mut() {
            *x = v;
        }
    }
    #[inline(always)]
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn div(self, a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    fn sqrt(self, a: f32) -> f32 {
        a.sqrt()
    }
    #[inline(always)]
    fn max(self, a: f32, b: f32) -> f32 {
        if a > b { a } else { b }
    }
    #[inline(always)]
    fn min(self, a: f32, b: f32) -> f32 {
        if a < b { a } else { b }
    }
}
