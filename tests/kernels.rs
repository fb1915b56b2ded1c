//! The public kernel API: a user's own kernel on every tier, and what
//! `EMBTABLE_TIER` does when it names no tier this CPU runs.

use std::process::Command;

use embtable::EmbeddingTable;
use embtable::kernels::{self, Kernel, Simd, Tier};

mod common;

/// A loop of the user's own, run on every tier through the public
/// interface: `Σ xᵢ·yᵢ` in lanes of `S::N`, reduced in a fixed order of
/// 16 partial sums so that every tier gives the same bits.
struct Dot<'a>(&'a [f32], &'a [f32]);

impl Kernel for Dot<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<S: Simd>(self, s: S) -> f32 {
        let mut lanes = [0.0f32; 16];
        for (x, y) in self.0.chunks(16).zip(self.1.chunks(16)) {
            for start in (0..x.len()).step_by(S::N) {
                let end = (start + S::N).min(x.len());
                let v = s.mul(
                    s.load_partial(&x[start..end]),
                    s.load_partial(&y[start..end]),
                );
                let mut out = [0.0f32; 16];
                s.store(v, &mut out[..]);
                for (acc, p) in lanes[start..end].iter_mut().zip(&out) {
                    *acc += p;
                }
            }
        }
        lanes.iter().sum()
    }
}

#[test]
fn a_user_kernel_runs_on_every_tier_with_the_same_bits() {
    let x: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin()).collect();
    let y: Vec<f32> = (0..70).map(|i| (i as f32 * 0.11).cos()).collect();
    let scalar = kernels::dispatch(Tier::Scalar, Dot(&x, &y));
    let naive: f64 = x.iter().zip(&y).map(|(a, b)| f64::from(a * b)).sum();
    assert!(
        (f64::from(scalar) - naive).abs() < 1e-5,
        "{scalar} vs {naive}"
    );
    for tier in common::tiers() {
        let got = kernels::dispatch(tier, Dot(&x, &y));
        assert_eq!(got.to_bits(), scalar.to_bits(), "{tier}");
        // with_tier makes the tier current for the calls inside it.
        assert_eq!(kernels::with_tier(tier, kernels::current), tier);
    }
}

/// The child of `a_bad_embtable_tier_falls_back_to_the_best_tier`, and a
/// test of its own: whatever `EMBTABLE_TIER` holds, the first operation
/// runs on the tier `tier_from_env` names (the best when it is unset or
/// names no tier this CPU runs) and gives the right answer.
#[test]
fn lookups_work_whatever_embtable_tier_holds() {
    let expected = match kernels::tier_from_env() {
        Ok(Some(tier)) => tier,
        Ok(None) | Err(_) => Tier::best(),
    };
    let table = EmbeddingTable::from_rows(3, 2, &[0., 1., 2., 3., 4., 5.]).unwrap();
    assert_eq!(table.lookup_vec(&[2u32, 0]).unwrap(), [4., 5., 0., 1.]);
    assert_eq!(kernels::default_tier(), expected);
    assert_eq!(kernels::current(), expected);
}

#[test]
fn a_bad_embtable_tier_falls_back_to_the_best_tier() {
    let exe = std::env::current_exe().unwrap();
    let mut values = vec!["bogus".to_string(), "AVX512 ".to_string()];
    // A tier this CPU lacks, if there is one (none on an AVX-512 machine).
    values.extend(
        Tier::ALL
            .into_iter()
            .filter(|t| !t.is_available())
            .map(|t| t.name().to_string()),
    );
    for value in values {
        let out = Command::new(&exe)
            .args([
                "lookups_work_whatever_embtable_tier_holds",
                "--exact",
                "--nocapture",
            ])
            .env("EMBTABLE_TIER", &value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "EMBTABLE_TIER={value:?}: {stderr}");
        // One line naming the variable, the value and the tier used.
        let report = format!("invalid EMBTABLE_TIER: {value:?}");
        let fallback = format!("using the best tier this CPU runs, {}", Tier::best());
        assert!(
            stderr.contains(&report) && stderr.contains(&fallback),
            "EMBTABLE_TIER={value:?} should be reported: {stderr}"
        );
    }
}
