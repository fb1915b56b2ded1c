//! SIMD kernels, chosen once at run time, and the control over which tier
//! runs them.
//!
//! Public here is what a user controls or builds on: the [`Tier`] in use
//! ([`current`], [`default_tier`], [`tier_from_env`], [`with_tier`]), and the
//! interface that runs a loop of the user's own on the tier embtable chose
//! ([`Kernel`], [`Simd`], [`dispatch`]): the dense maths of a model beside
//! its tables, as the examples' word2vec trainer and recommender matrix
//! product do. The kernels themselves, the tier tokens and the prefetch
//! helpers are the crate's own.
//!
//! Every operation is written once, as a generic `#[inline(always)]` body over
//! the [`Simd`] trait, and run through [`dispatch`], which instantiates the body
//! inside a thin `#[target_feature]` wrapper for the chosen [`Tier`]:
//!
//! | tier | vector | where |
//! |---|---|---|
//! | [`Tier::Avx512`] | 16 × f32 (`__m512`) | x86-64 with AVX-512F |
//! | [`Tier::Avx2`] | 8 × f32 (`__m256`) | x86-64 with AVX2 and FMA |
//! | [`Tier::Portable`] | 8 × f32 (`wide::f32x8`) | any target; SSE2/NEON pairs |
//! | [`Tier::Scalar`] | 1 × f32 | any target: the fallback and the test oracle |
//!
//! The best tier the CPU supports is detected on first use and cached. The
//! environment variable `EMBTABLE_TIER` (`scalar`, `portable`, `avx2`,
//! `avx512`) overrides that process-wide, and [`with_tier`] overrides it for
//! the calls made inside a closure, which is how tests and benches cover
//! every tier. A misspelt `EMBTABLE_TIER`, or a tier this CPU lacks, falls
//! back to the best tier with one line on standard error
//! ([`default_tier`]); [`tier_from_env`] reports it as an `Err`.
//!
//! **Every tier gives bitwise identical results.** Kernels only use IEEE
//! operations that round the same in every width (add, sub, mul, div, sqrt,
//! max, min) and never fuse a multiply and an add (no FMA contraction), and lane
//! `i` of a row is always computed from lane `i` of the inputs, so the
//! vector width cannot change the order of any sum.

mod ops;
mod portable;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use std::cell::Cell;
use std::sync::OnceLock;

pub(crate) use ops::{add_scaled, copy_row, copy_row_streaming, scale};

/// Vectors a row kernel holds in registers at once, its loads issued
/// together: 8 is a 128-float row with AVX-512 and leaves registers free for
/// the loads on every tier. Kernels work in fully unrolled blocks of 8, 4, 2
/// and 1 vectors; a loop of one vector at a time kept far fewer row misses
/// in flight (W1 25-40% slower, W4 30% slower).
pub(crate) const BLOCK_VECTORS: usize = 8;
pub(crate) use portable::Portable;
pub(crate) use scalar::Scalar;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::{Avx2, Avx512};

/// An instruction-set tier of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// One float at a time: the fallback and the reference the others are tested against.
    Scalar,
    /// `wide::f32x8`: portable SIMD at the target's baseline features.
    Portable,
    /// AVX2 + FMA, 8 lanes (x86-64). FMA is required but never fused into
    /// results, so this tier stays bitwise equal to the others.
    Avx2,
    /// AVX-512F, 16 lanes (x86-64).
    Avx512,
}

impl Tier {
    /// Every tier, slowest first.
    pub const ALL: [Tier; 4] = [Tier::Scalar, Tier::Portable, Tier::Avx2, Tier::Avx512];

    /// Whether this CPU can run the tier.
    pub fn is_available(self) -> bool {
        match self {
            Tier::Scalar | Tier::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => Avx2::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => Avx512::detect().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            Tier::Avx2 | Tier::Avx512 => false,
        }
    }

    /// The tiers this CPU can run, slowest first.
    pub fn available() -> Vec<Tier> {
        Tier::ALL.into_iter().filter(|t| t.is_available()).collect()
    }

    /// The fastest tier this CPU can run.
    pub fn best() -> Tier {
        *Tier::available()
            .last()
            .expect("scalar is always available")
    }

    /// The tier's name as `EMBTABLE_TIER` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Portable => "portable",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
        }
    }

    /// Parses a name as `EMBTABLE_TIER` spells it.
    pub fn from_name(name: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == name.trim())
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

static DEFAULT_TIER: OnceLock<Tier> = OnceLock::new();

thread_local! {
    static FORCED_TIER: Cell<Option<Tier>> = const { Cell::new(None) };
}

/// The process-wide tier: `EMBTABLE_TIER` if set to an available tier, else the best.
///
/// Read once, on first use. An `EMBTABLE_TIER` that names no tier, or a
/// tier this CPU cannot run, is not a reason to stop a training run: the
/// best tier is used instead, and one line on standard error says so.
/// A bench or test that must measure the tier it asked for calls
/// [`tier_from_env`], which returns that mistake as an `Err`.
pub fn default_tier() -> Tier {
    *DEFAULT_TIER.get_or_init(|| match tier_from_env() {
        Ok(tier) => tier.unwrap_or_else(Tier::best),
        Err(e) => {
            let best = Tier::best();
            eprintln!("embtable: {e}; using the best tier this CPU runs, {best}");
            best
        }
    })
}

/// The tier `EMBTABLE_TIER` asks for, or `None` if it is unset or empty.
///
/// # Errors
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig) (field
/// `EMBTABLE_TIER`) if it names no tier, or a tier this CPU cannot run.
///
/// # Examples
/// ```
/// use embtable::kernels::{self, Tier};
/// // Unset here (or set by whoever runs this): either way not a panic.
/// match kernels::tier_from_env() {
///     Ok(Some(tier)) => assert!(tier.is_available()),
///     Ok(None) => assert_eq!(kernels::default_tier(), Tier::best()),
///     Err(e) => assert!(e.to_string().contains("EMBTABLE_TIER"), "{e}"),
/// }
/// ```
pub fn tier_from_env() -> crate::Result<Option<Tier>> {
    match std::env::var("EMBTABLE_TIER") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(name)) => Err(tier_error(format!(
            "{name:?} is not a tier (not even valid unicode)"
        ))),
        Ok(name) => parse_tier(&name, Tier::is_available),
    }
}

/// `name` as a tier `available` says the CPU runs; `None` if empty.
fn parse_tier(name: &str, available: impl Fn(Tier) -> bool) -> crate::Result<Option<Tier>> {
    if name.trim().is_empty() {
        return Ok(None);
    }
    let Some(tier) = Tier::from_name(name) else {
        let names: Vec<&str> = Tier::ALL.iter().map(|t| t.name()).collect();
        return Err(tier_error(format!(
            "{name:?} is not a tier; the tiers are {}",
            names.join(", ")
        )));
    };
    if !available(tier) {
        let runs: Vec<&str> = Tier::ALL
            .into_iter()
            .filter(|&t| available(t))
            .map(Tier::name)
            .collect();
        return Err(tier_error(format!(
            "{name:?}: this CPU cannot run that tier; it runs {}",
            runs.join(", ")
        )));
    }
    Ok(Some(tier))
}

fn tier_error(reason: String) -> crate::Error {
    crate::Error::InvalidConfig {
        field: "EMBTABLE_TIER",
        reason,
    }
}

/// The tier that operations started on this thread use now.
///
/// Operations read it once, on the calling thread, and hand it to their
/// worker threads, so one call never mixes tiers.
pub fn current() -> Tier {
    FORCED_TIER.with(Cell::get).unwrap_or_else(default_tier)
}

/// Runs `f` with every operation it starts on this thread using `tier`.
///
/// When combining with a rayon pool, call this inside `pool.install`, since
/// the override belongs to the thread that starts the operation.
///
/// # Panics
/// If this CPU cannot run `tier`.
pub fn with_tier<R>(tier: Tier, f: impl FnOnce() -> R) -> R {
    assert!(
        tier.is_available(),
        "tier {tier} is not available on this CPU"
    );
    struct Restore(Option<Tier>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED_TIER.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(FORCED_TIER.with(|t| t.replace(Some(tier))));
    f()
}

/// A vector instruction set, as a zero-sized token.
///
/// A [`Kernel`] receives the token of the tier [`dispatch`] runs it on;
/// there is no other way to get one, so a token is only ever held on a CPU
/// that runs its tier, which is what makes the safe methods sound. The
/// trait is sealed: the four tiers are embtable's. Methods are
/// `#[inline(always)]`, so inside a `#[target_feature]` wrapper they compile
/// to single instructions.
pub trait Simd: sealed::Sealed + Copy + Send + Sync + 'static {
    /// A vector of `N` floats.
    type V: Copy;
    /// Floats per vector. Divides 16, so every row stride is whole vectors.
    const N: usize;
    /// The tier this token belongs to.
    const TIER: Tier;

    /// All lanes `x`.
    fn splat(self, x: f32) -> Self::V;
    /// Loads `N` floats from `src[..N]`.
    ///
    /// # Panics
    /// If `src.len() < N`.
    fn load(self, src: &[f32]) -> Self::V;
    /// Stores `N` floats into `dst[..N]`.
    ///
    /// # Panics
    /// If `dst.len() < N`.
    fn store(self, v: Self::V, dst: &mut [f32]);
    /// Loads the first `min(src.len(), N)` floats of `src` (kernels pass
    /// fewer than `N`, the tail of a row); the other lanes are zero.
    fn load_partial(self, src: &[f32]) -> Self::V;
    /// Stores the first `min(dst.len(), N)` lanes into `dst`; the rest of
    /// `dst` is left as it was.
    fn store_partial(self, v: Self::V, dst: &mut [f32]);
    /// Stores `N` floats into `dst[..N]`, bypassing the caches where the
    /// tier has non-temporal stores (the default is [`store`](Self::store)).
    /// Call [`fence`](Self::fence) before the data is handed to another thread.
    ///
    /// # Panics
    /// If `dst.len() < N` or `dst` is not aligned to `N * 4` bytes.
    #[inline(always)]
    fn stream(self, v: Self::V, dst: &mut [f32]) {
        self.store(v, dst);
    }
    /// Orders earlier [`stream`](Self::stream) stores before later stores.
    #[inline(always)]
    fn fence(self) {}
    /// Lane-wise `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a - b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a * b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a / b`.
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise square root.
    fn sqrt(self, a: Self::V) -> Self::V;
    /// Lane-wise `if a > b { a } else { b }` (so a NaN in `a` yields `b`,
    /// a NaN in `b` yields `b`, and `max(-0, +0) == +0`), as `maxps` does.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `if a < b { a } else { b }` (a NaN in either yields `b`),
    /// as `minps` does.
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
}

/// Keeps [`Simd`] to embtable's four tokens.
mod sealed {
    /// Implemented by the tier tokens only.
    pub trait Sealed {}
    impl Sealed for super::Scalar {}
    impl Sealed for super::Portable {}
    #[cfg(target_arch = "x86_64")]
    impl Sealed for super::Avx2 {}
    #[cfg(target_arch = "x86_64")]
    impl Sealed for super::Avx512 {}
}

/// An operation with one generic body for every tier.
///
/// Implementations must mark `run` `#[inline(always)]`: that is what makes
/// the body compile with the tier's instructions inside [`dispatch`].
pub trait Kernel {
    /// What the operation returns.
    type Output;
    /// Runs the body with the tier's token.
    fn run<S: Simd>(self, simd: S) -> Self::Output;
}

/// Runs `kernel` with the instructions of `tier`.
///
/// # Panics
/// If this CPU cannot run `tier` (tiers come from [`current`], which only
/// yields available ones).
#[inline]
pub fn dispatch<K: Kernel>(tier: Tier, kernel: K) -> K::Output {
    match tier {
        Tier::Scalar => kernel.run(Scalar),
        Tier::Portable => kernel.run(Portable),
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => x86_64::run_avx2(kernel, Avx2::detect().expect("AVX2 tier detected")),
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => {
            x86_64::run_avx512(kernel, Avx512::detect().expect("AVX-512 tier detected"))
        }
        #[cfg(not(target_arch = "x86_64"))]
        Tier::Avx2 | Tier::Avx512 => panic!("tier {tier} is not available on this CPU"),
    }
}

/// A size of work, in floats, at which an operation goes parallel (or the
/// size of its tasks): `floats`, divided by 1024 under Miri, whose
/// interpreter is thousands of times slower, so that its runs reach the
/// parallel paths at sizes it can afford. Results never depend on these
/// sizes.
pub(crate) const fn parallel_size(floats: usize) -> usize {
    if cfg!(miri) { floats >> 10 } else { floats }
}

/// Asks the CPU to start loading the cache line at `p` into all cache levels.
///
/// A hint only: it never faults, whatever `p` is.
#[inline(always)]
pub(crate) fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: prefetch is a hint that cannot fault, even on an invalid
        // address, and SSE is part of the x86-64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Calls `f` with a pointer into every 64-byte cache line that the `len`
/// floats from `p` touch, first to last.
#[inline(always)]
fn for_each_line(p: *const f32, len: usize, mut f: impl FnMut(*const f32)) {
    if len == 0 {
        return;
    }
    const LINE: usize = crate::aligned::LANES_PER_LINE * size_of::<f32>();
    // Start at the line holding `p`; stop past the one holding the last float.
    let head = p as usize % LINE;
    let end = head + len * size_of::<f32>();
    let mut off = 0;
    while off < end {
        f(p.cast::<u8>().wrapping_sub(head).wrapping_add(off).cast());
        off += LINE;
    }
}

/// Asks the CPU to start loading the cache line at `p` into the L2 cache
/// (`prefetcht1`), not L1.
///
/// For rows needed several rows from now: the L1's few miss buffers stay
/// free for the loads in progress, so more rows can be in flight. On the
/// 2-core Zen 4 of WORKLOADS.md this made the W4 pooled lookup about 25%
/// faster than [`prefetch`] at the same distance. A hint only: it never
/// faults, whatever `p` is.
#[inline(always)]
pub(crate) fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        // SAFETY: prefetch is a hint that cannot fault, even on an invalid
        // address, and SSE is part of the x86-64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetches every cache line of the `len` floats from `p` into L2 (see
/// [`prefetch_l2`]). `p` need not start a cache line: a row of a caller's
/// buffer often does not, and then spans one line more than its length
/// suggests.
#[inline(always)]
pub(crate) fn prefetch_row_l2(p: *const f32, len: usize) {
    for_each_line(p, len, prefetch_l2);
}

/// Prefetches `len.div_ceil(16)` cache lines from `p` into L2: every line
/// of a row that starts a line. A row that does not (a gradient row in a
/// caller's `Vec`) has its last line left to the next row's prefetch or to
/// the hardware prefetcher.
///
/// Unrolled eight lines at a time: in the W5 update this was 2.4 ms (12%)
/// faster than [`prefetch_row_l2`], whose loop also fetches that last line.
#[inline(always)]
pub(crate) fn prefetch_lines_l2(p: *const f32, len: usize) {
    const LINE: usize = crate::aligned::LANES_PER_LINE;
    const UNROLL: usize = 8;
    let mut at = 0;
    while at + UNROLL * LINE <= len {
        for line in 0..UNROLL {
            prefetch_l2(p.wrapping_add(at + line * LINE));
        }
        at += UNROLL * LINE;
    }
    while at < len {
        prefetch_l2(p.wrapping_add(at));
        at += LINE;
    }
}

/// Floats of a row per software prefetch in [`prefetch_row_heads_l2`]:
/// 512 bytes, eight cache lines.
const HEAD_EVERY: usize = 8 * crate::aligned::LANES_PER_LINE;

/// Prefetches into L2 the first cache line of every 512 bytes of the `len`
/// floats from `p`: the first line alone of a row of up to 128 floats.
///
/// For rows read whole soon after, in full, line by line. One prefetch
/// starts the row's page walk and DRAM access; the hardware prefetchers and
/// the demand loads bring the other lines, without the miss buffers that a
/// software prefetch of every line holds in the meantime. Measured on the
/// 2-core Zen 3 (KVM) with the `bag_limit` example, W4's bag sum ran
/// 7-15% faster with one prefetched line a row than with all eight, at 8
/// to 24 rows ahead. A hint only: it never faults, whatever `p` is.
#[inline(always)]
pub(crate) fn prefetch_row_heads_l2(p: *const f32, len: usize) {
    let mut at = 0;
    while at < len {
        prefetch_l2(p.wrapping_add(at));
        at += HEAD_EVERY;
    }
}

/// Whether rows read whole are prefetched by their first line alone
/// ([`prefetch_row_heads_l2`]) rather than line by line
/// ([`prefetch_lines_l2`]).
///
/// Only on AMD CPUs, where it was measured: Intel's adjacent-line and
/// streamer prefetchers work differently, and the all-lines prefetch is what
/// earlier runs on a Xeon measured. Read once; callers read it once per call.
pub(crate) fn row_heads_suffice() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| {
        // Miri runs no inline assembly, which `__cpuid` is.
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            // cpuid leaf 0 is available on every x86-64 CPU; it returns the
            // vendor string in ebx, edx, ecx.
            let id = std::arch::x86_64::__cpuid(0);
            let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect();
            vendor == b"AuthenticAMD"
        }
        #[cfg(not(all(target_arch = "x86_64", not(miri))))]
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for tier in Tier::available() {
            check_partial(tier, |p| dispatch(tier, p));
        }
        // The tokens' own methods, called outside `dispatch` as the crate may.
        check_partial(Tier::Scalar, |p| p.run(Scalar));
        check_partial(Tier::Portable, |p| p.run(Portable));
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(avx2) = Avx2::detect() {
                check_partial(Tier::Avx2, |p| p.run(avx2));
            }
            if let Some(avx512) = Avx512::detect() {
                check_partial(Tier::Avx512, |p| p.run(avx512));
            }
        }
    }

    /// The lines `for_each_line` visits, as byte offsets from `base`.
    fn lines(base: *const f32, start: usize, len: usize) -> Vec<usize> {
        let mut seen = Vec::new();
        for_each_line(base.wrapping_add(start), len, |p| {
            seen.push(p as usize - base as usize)
        });
        seen
    }

    #[test]
    fn tier_names_parse_or_say_what_is_wrong() {
        let all = |_: Tier| true;
        let no_avx512 = |t: Tier| t != Tier::Avx512;
        assert_eq!(parse_tier(" avx2\n", all).unwrap(), Some(Tier::Avx2));
        assert_eq!(parse_tier("", all).unwrap(), None);
        assert_eq!(parse_tier("  ", all).unwrap(), None);
        let err = parse_tier("sse9", all).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid EMBTABLE_TIER: \"sse9\" is not a tier; the tiers are scalar, portable, avx2, avx512"
        );
        let err = parse_tier("avx512", no_avx512).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid EMBTABLE_TIER: \"avx512\": this CPU cannot run that tier; \
             it runs scalar, portable, avx2"
        );
    }

    #[test]
    fn every_line_a_row_touches_is_visited() {
        let buf = crate::AlignedBuf::zeroed(64, "test").unwrap();
        let base = buf.as_ptr();
        assert_eq!(lines(base, 0, 32), [0, 64]);
        // 32 floats from float 4 (byte 16) touch three lines.
        assert_eq!(lines(base, 4, 32), [0, 64, 128]);
        assert_eq!(lines(base, 15, 2), [0, 64]);
        assert_eq!(lines(base, 16, 1), [64]);
        assert!(lines(base, 3, 0).is_empty());
    }
}
