//! The public kernel API: partial loads and stores of any length on every
//! tier, and what `EMBTABLE_TIER` does when it names no tier this CPU runs.

use std::process::Command;

use embtable::EmbeddingTable;
use embtable::kernels::{self, Kernel, Simd, Tier};

mod common;

/// Loads `src` partially, stores the vector whole into `whole` and
/// partially into `partial`.
struct Partial<'a> {
    src: &'a [f32],
    whole: &'a mut [f32; 16],
    partial: &'a mut [f32],
}

impl Kernel for Partial<'_> {
    type Output = usize;
    #[inline(always)]
    fn run<S: Simd>(self, s: S) -> usize {
        let v = s.load_partial(self.src);
        s.store(v, &mut self.whole[..]);
        s.store_partial(v, self.partial);
        S::N
    }
}

/// `load_partial` takes the first `min(len, N)` floats and zeros the other
/// lanes; `store_partial` writes the first `min(len, N)` and nothing else.
/// (AVX-512's mask was `(1 << len) - 1`: a shift overflow from 32 floats on.)
fn check_partial(tier: Tier, run: impl Fn(Partial<'_>) -> usize) {
    let src: Vec<f32> = (1..=48).map(|x| x as f32).collect();
    for len in 0..=48 {
        let mut whole = [-1.0; 16];
        let mut partial = vec![-1.0; len];
        let n = run(Partial {
            src: &src[..len],
            whole: &mut whole,
            partial: &mut partial,
        });
        let k = len.min(n);
        assert_eq!(&whole[..k], &src[..k], "{tier} load {len}");
        assert!(whole[k..n].iter().all(|&x| x == 0.0), "{tier} load {len}");
        assert_eq!(&partial[..k], &src[..k], "{tier} store {len}");
        assert!(
            partial[k..].iter().all(|&x| x == -1.0),
            "{tier} store {len}"
        );
    }
}

#[test]
fn partial_loads_and_stores_take_any_length_on_every_tier() {
    for tier in common::tiers() {
        check_partial(tier, |p| kernels::dispatch(tier, p));
    }
    // The tokens' own methods, called outside `dispatch` as a user may.
    check_partial(Tier::Scalar, |p| p.run(kernels::Scalar));
    check_partial(Tier::Portable, |p| p.run(kernels::Portable));
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(avx2) = kernels::Avx2::detect() {
            check_partial(Tier::Avx2, |p| p.run(avx2));
        }
        if let Some(avx512) = kernels::Avx512::detect() {
            check_partial(Tier::Avx512, |p| p.run(avx512));
        }
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
