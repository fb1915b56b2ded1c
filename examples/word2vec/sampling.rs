//! What skip-gram draws and evaluates millions of times a second, each in
//! constant time: negatives ([`Alias`]), the subsampling coin ([`Keep`]) and
//! the logistic function with its log ([`Logistic`]).

use crate::rng::Rng;

/// Draws word ids with probability proportional to fixed weights in O(1)
/// (Walker's alias method, Vose's construction).
///
/// Every id gets a bucket of equal probability `1/n`; bucket `i` keeps id `i`
/// with probability `keep[i]` and otherwise gives its `alias[i]`. One 64-bit
/// draw picks the bucket (high bits) and flips the coin (low 32 bits).
/// Memory is 8 bytes a word, where word2vec's unigram table takes 400 MB.
#[derive(Clone, Debug)]
pub struct Alias {
    /// `keep[i]` scaled to `2³²`, saturated (`u32::MAX` keeps always).
    keep: Vec<u32>,
    alias: Vec<u32>,
}

impl Alias {
    /// A sampler for `weights` (non-negative, finite, not all zero).
    ///
    /// # Panics
    /// If the weights are empty, all zero, or more than `u32::MAX`.
    pub fn new(weights: &[f64]) -> Self {
        let n = weights.len();
        assert!(n > 0 && n <= u32::MAX as usize, "1..=u32::MAX weights");
        let total: f64 = weights.iter().sum();
        assert!(total > 0.0, "weights must not all be zero");
        // Scaled so that the mean bucket holds exactly 1.
        let mut p: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| p[i] < 1.0);
        // Fill each under-full bucket from an over-full one.
        while let Some(&l) = large.last() {
            let Some(s) = small.pop() else { break };
            alias[s] = l as u32;
            p[l] -= 1.0 - p[s];
            if p[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // What is left is full up to rounding.
        for i in large.into_iter().chain(small) {
            p[i] = 1.0;
        }
        let keep = p
            .iter()
            .map(|&x| (x * 4_294_967_296.0).min(u32::MAX as f64) as u32)
            .collect();
        Alias { keep, alias }
    }

    /// One id.
    #[inline(always)]
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let x = rng.next_u64();
        let bucket = ((x >> 32) * self.keep.len() as u64) >> 32;
        // `bucket < len` since `x >> 32 < 2³²`.
        let bucket = bucket as usize;
        if (x as u32) < self.keep[bucket] {
            bucket as u32
        } else {
            self.alias[bucket]
        }
    }
}

/// Word2vec's subsampling of frequent words: a word of frequency `f` is kept
/// with probability `(√(f/t) + 1) · t/f`, capped at 1, so that very frequent
/// words ("the", "of") stop crowding out the rest.
#[derive(Clone, Debug)]
pub struct Keep {
    /// Probability scaled to `2³²`; `u64` so that 1 is `2³²` and always wins.
    threshold: Vec<u64>,
}

impl Keep {
    /// Thresholds for words of `counts` with threshold `t` (0: keep all).
    pub fn new(counts: &[u64], t: f64) -> Self {
        let total: u64 = counts.iter().sum();
        let threshold = counts
            .iter()
            .map(|&c| {
                let f = c as f64 / total.max(1) as f64;
                let p = if t > 0.0 && f > 0.0 {
                    (((f / t).sqrt() + 1.0) * t / f).min(1.0)
                } else {
                    1.0
                };
                (p * 4_294_967_296.0) as u64
            })
            .collect();
        Keep { threshold }
    }

    /// The probability that `word` is kept.
    #[cfg(test)]
    pub fn probability(&self, word: u32) -> f64 {
        self.threshold[word as usize] as f64 / 4_294_967_296.0
    }

    /// Whether to keep this occurrence of `word` (one 32-bit draw).
    #[inline(always)]
    pub fn keep(&self, word: u32, rng: &mut Rng) -> bool {
        (rng.next_u64() >> 32) < self.threshold[word as usize]
    }
}

/// `σ(x) = 1/(1 + e^−x)` and `softplus(x) = ln(1 + eˣ) = −ln σ(−x)`, read
/// from tables with linear interpolation on `[−RANGE, RANGE]` (error below
/// 1e-5) and computed exactly outside it. Two `exp` and a `ln` per target
/// cost more than the target's vector work at dimension 100.
#[derive(Clone, Debug)]
pub struct Logistic {
    /// `(σ, softplus)` at `−RANGE + i/STEPS_PER_UNIT`.
    table: Vec<(f32, f32)>,
}

impl Logistic {
    const RANGE: f32 = 8.0;
    const STEPS_PER_UNIT: f32 = 128.0;

    /// Fills the tables.
    pub fn new() -> Self {
        let n = (2.0 * Self::RANGE * Self::STEPS_PER_UNIT) as usize;
        let table = (0..=n + 1)
            .map(|i| {
                let x = f64::from(-Self::RANGE) + i as f64 / f64::from(Self::STEPS_PER_UNIT);
                let sigma = 1.0 / (1.0 + (-x).exp());
                let softplus = x.max(0.0) + (-x.abs()).exp().ln_1p();
                (sigma as f32, softplus as f32)
            })
            .collect();
        Logistic { table }
    }

    /// `(σ(x), softplus(x))`.
    #[inline(always)]
    pub fn eval(&self, x: f32) -> (f32, f32) {
        let t = (x + Self::RANGE) * Self::STEPS_PER_UNIT;
        // `!(t < …)` also sends NaN to the exact branch.
        if t >= 0.0 && t < (self.table.len() - 2) as f32 {
            let i = t as usize;
            let frac = t - i as f32;
            let (s0, p0) = self.table[i];
            let (s1, p1) = self.table[i + 1];
            (s0 + frac * (s1 - s0), p0 + frac * (p1 - p0))
        } else {
            let sigma = 1.0 / (1.0 + (-x).exp());
            (sigma, x.max(0.0) + (-x.abs()).exp().ln_1p())
        }
    }
}

impl Default for Logistic {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_follows_the_weights() {
        let weights = [1.0, 0.0, 3.0, 0.5, 2.5];
        let alias = Alias::new(&weights);
        let mut rng = Rng::new(3);
        let mut counts = [0u32; 5];
        let draws = 700_000;
        for _ in 0..draws {
            counts[alias.sample(&mut rng) as usize] += 1;
        }
        assert_eq!(counts[1], 0, "{counts:?}");
        for (c, w) in counts.iter().zip(weights) {
            let expected = w / 7.0 * draws as f64;
            // Five standard deviations of a binomial count.
            let sd = (expected * (1.0 - w / 7.0)).sqrt();
            assert!((*c as f64 - expected).abs() <= 5.0 * sd + 1.0, "{counts:?}");
        }
        // One weight: always that id.
        let one = Alias::new(&[2.0]);
        assert!((0..100).all(|_| one.sample(&mut rng) == 0));
    }

    #[test]
    fn keep_probabilities_are_word2vecs() {
        // Frequencies 0.5, 0.3, 0.2 and t = 0.01.
        let keep = Keep::new(&[50, 30, 20], 0.01);
        for (w, f) in [(0u32, 0.5f64), (1, 0.3), (2, 0.2)] {
            let p = ((f / 0.01).sqrt() + 1.0) * 0.01 / f;
            assert!((keep.probability(w) - p).abs() < 1e-9);
        }
        let all = Keep::new(&[50, 30, 20], 0.0);
        let mut rng = Rng::new(1);
        assert!((0..1000).all(|_| all.keep(0, &mut rng)));
        let rare = Keep::new(&[1_000_000, 1], 1e-3);
        assert_eq!(rare.probability(1), 1.0);
        let kept = (0..100_000).filter(|_| keep.keep(0, &mut rng)).count();
        let p = keep.probability(0);
        assert!((kept as f64 / 1e5 - p).abs() < 0.01, "{kept} vs {p}");
    }

    #[test]
    fn logistic_matches_the_exact_functions() {
        let l = Logistic::new();
        let mut x = -12.0f32;
        while x <= 12.0 {
            let (s, p) = l.eval(x);
            let xd = f64::from(x);
            let sigma = 1.0 / (1.0 + (-xd).exp());
            let softplus = xd.max(0.0) + (-xd.abs()).exp().ln_1p();
            assert!(
                (f64::from(s) - sigma).abs() < 1e-5,
                "σ({x}) = {s} vs {sigma}"
            );
            assert!(
                (f64::from(p) - softplus).abs() < 1e-5 * (1.0 + softplus),
                "softplus({x}) = {p} vs {softplus}"
            );
            x += 0.0371;
        }
        assert_eq!(l.eval(200.0), (1.0, 200.0));
        assert_eq!(l.eval(-200.0).0, 0.0);
    }
}
