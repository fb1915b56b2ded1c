//! Row-wise Adagrad (FBGEMM's `EXACT_ROWWISE_ADAGRAD`): one accumulator per row.

use super::Semantics;
use super::config::{self, Visit};
use super::engine::{
    Config, Core, GradRow, Missed, RowSet, Rule, StateSpec, map_vectors, saturate,
};
use crate::Result;
use crate::aligned::LANES_PER_LINE;
use crate::kernels::{BLOCK_VECTORS, Simd};

/// The settings of [`RowWiseAdagrad`]. `Default` is FBGEMM's
/// (`SplitTableBatchedEmbeddingBagsCodegen`: `learning_rate=0.01`,
/// `eps=1.0e-8`, optimizer state initialised to zeros).
///
/// # Examples
/// ```
/// use embtable::RowWiseAdagradConfig;
/// let cfg = RowWiseAdagradConfig::default();
/// assert_eq!((cfg.lr, cfg.initial_accumulator_value, cfg.epsilon), (0.01, 0.0, 1e-8));
/// assert!(RowWiseAdagradConfig { lr: -1.0, ..cfg }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowWiseAdagradConfig {
    /// Learning rate η, `> 0`. FBGEMM: 0.01.
    pub lr: f32,
    /// Starting value of every row's accumulator, `>= 0`. FBGEMM: 0.
    pub initial_accumulator_value: f32,
    /// ε, `> 0`, outside the root. FBGEMM: 1e-8.
    pub epsilon: f32,
}

impl Default for RowWiseAdagradConfig {
    fn default() -> Self {
        Self {
            lr: 0.01,
            initial_accumulator_value: 0.0,
            epsilon: 1e-8,
        }
    }
}

impl RowWiseAdagradConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the
    /// field and its value if `lr` or `epsilon` is not positive and finite,
    /// or `initial_accumulator_value` is negative or not finite.
    pub fn validate(&self) -> Result<()> {
        config::positive("lr", self.lr)?;
        config::non_negative("initial_accumulator_value", self.initial_accumulator_value)?;
        config::positive("epsilon", self.epsilon)
    }
}

/// Row-wise Adagrad over the rows of a sparse gradient
/// ([`RowWiseAdagradConfig`]): one accumulator per row instead of one per
/// value, which saves almost all of Adagrad's state memory.
///
/// For a row with summed gradient `g` of `dim` values:
///
/// ```text
/// h += (Σⱼ gⱼ²) / dim          "accumulator", one float per row
/// w −= (η / (√h + ε)) · g
/// ```
///
/// The sum of squares is taken in a fixed order whatever the vector width:
/// column `j` goes to partial sum `j mod 16`, and the 16 partial sums are
/// added pairwise (`p[i] += p[i+8]`, then `+4`, `+2`, `+1`). Every tier and
/// thread count therefore gives the same bits.
///
/// State: `"accumulator"`, shape `[rows]`.
///
/// # Examples
/// ```
/// use embtable::{EmbeddingTable, RowWiseAdagrad, RowWiseAdagradConfig, SparseGrad, SparseOptimizer};
/// let mut table = EmbeddingTable::from_rows(1, 2, &[1., 1.])?;
/// let mut grad = SparseGrad::new(2);
/// grad.accumulate_lookup(&[0u32], &[3., 5.])?;
/// let mut opt = RowWiseAdagrad::new(RowWiseAdagradConfig { lr: 1.0, ..Default::default() });
/// opt.step(&mut table, &grad)?;
/// // h = (9 + 25) / 2 = 17: w = 1 − g / √17
/// assert_eq!(opt.state().arrays[0].values, [17.0]);
/// assert!((table.row(0)[0] - (1.0 - 3.0 / 17f32.sqrt())).abs() < 1e-6);
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct RowWiseAdagrad {
    config: RowWiseAdagradConfig,
    core: Core,
}

super::sparse_optimizer!(RowWiseAdagrad, RowWiseAdagradConfig);

/// [`RowWiseAdagradConfig`] as its rule.
pub(crate) struct RowWiseAdagradRule {
    epsilon: f32,
    arrays: [StateSpec; 1],
}

impl Config for RowWiseAdagradConfig {
    type Rule = RowWiseAdagradRule;
    const KIND: &'static str = "rowwise_adagrad";

    fn fields(&mut self, v: &mut impl Visit) {
        v.f32("lr", &mut self.lr);
        v.f32(
            "initial_accumulator_value",
            &mut self.initial_accumulator_value,
        );
        v.f32("epsilon", &mut self.epsilon);
    }

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> RowWiseAdagradRule {
        let h0 = self.initial_accumulator_value;
        RowWiseAdagradRule {
            epsilon: self.epsilon,
            arrays: [StateSpec::at_least("accumulator", h0, 0.0)],
        }
    }

    fn lr_mut(&mut self) -> &mut f32 {
        &mut self.lr
    }

    fn semantics(&self) -> Semantics {
        Semantics::Lazy
    }
}

impl Rule for RowWiseAdagradRule {
    /// The learning rate.
    type Step = f32;

    fn arrays(&self) -> &[StateSpec] {
        &self.arrays
    }

    fn per_row(&self) -> bool {
        true
    }

    fn missed(&self) -> Missed {
        Missed::Nothing
    }

    fn step(&self, _t: u64, lr: f32) -> f32 {
        lr
    }

    #[inline(always)]
    fn update<S: Simd>(&self, s: S, lr: &f32, rows: RowSet<'_>, g: &impl GradRow<S>, dim: usize) {
        let [w, h] = rows.take::<2>();
        let sum = sum_of_squares(s, g, w.len());
        let acc = (h[0] + sum / dim as f32).min(f32::MAX);
        h[0] = acc;
        let factor = s.splat(lr / (acc.sqrt() + self.epsilon));
        map_vectors(
            s,
            [w],
            g,
            #[inline(always)]
            |[wv], gv| [saturate(s, s.sub(wv, s.mul(factor, gv)))],
        );
    }
}

/// `Σ g²` over a padded row of `len` floats, in an order that does not
/// depend on `S::N`: column `j` is added to partial sum `j mod 16` (columns
/// in increasing order), then the 16 partials are summed pairwise.
///
/// The gradient is read in unrolled blocks, as [`map_vectors`] reads it
/// (the W5 row-wise update 2% faster than one vector at a time).
#[inline(always)]
fn sum_of_squares<S: Simd>(s: S, g: &impl GradRow<S>, len: usize) -> f32 {
    const P: usize = LANES_PER_LINE;
    debug_assert_eq!(len % P, 0);
    // Vector q of `acc` holds partials q·N .. (q+1)·N; 16 / N of them are used.
    let mut acc = [s.splat(0.0); P];
    let vectors = len / S::N;
    let mut done = 0;
    while done < vectors {
        done += match vectors - done {
            BLOCK_VECTORS.. => add_squares::<S, BLOCK_VECTORS>(s, g, done, &mut acc),
            4.. => add_squares::<S, 4>(s, g, done, &mut acc),
            2.. => add_squares::<S, 2>(s, g, done, &mut acc),
            _ => add_squares::<S, 1>(s, g, done, &mut acc),
        };
    }
    let mut p = [0.0f32; P];
    for (q, a) in acc.iter().enumerate().take(P / S::N) {
        s.store(*a, &mut p[q * S::N..]);
    }
    let mut half = P / 2;
    while half > 0 {
        for i in 0..half {
            p[i] += p[i + half];
        }
        half /= 2;
    }
    p[0]
}

/// Adds the squares of the gradient's `V` vectors from vector `first` to
/// their partial sums in `acc` ([`sum_of_squares`]); returns `V`.
#[inline(always)]
fn add_squares<S: Simd, const V: usize>(
    s: S,
    g: &impl GradRow<S>,
    first: usize,
    acc: &mut [S::V; LANES_PER_LINE],
) -> usize {
    let per_line = LANES_PER_LINE / S::N;
    for (v, x) in g.block::<V>(s, first * S::N).into_iter().enumerate() {
        let q = (first + v) % per_line;
        acc[q] = s.add(acc[q], s.mul(x, x));
    }
    V
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{Kernel, Tier, dispatch};
    use crate::optim::engine::GradSum;

    struct Sum<'a>(&'a [f32]);
    impl Kernel for Sum<'_> {
        type Output = f32;
        #[inline(always)]
        fn run<S: Simd>(self, s: S) -> f32 {
            sum_of_squares(s, &GradSum::new(self.0, &[], self.0.len()), self.0.len())
        }
    }

    #[test]
    fn sum_of_squares_is_the_same_on_every_tier() {
        // Values of very different magnitudes, so a change of order would show.
        let g: Vec<f32> = (0..80)
            .map(|j| (j as f32 * 0.37).sin() * 10f32.powi(j % 7 - 3))
            .collect();
        let want = dispatch(Tier::Scalar, Sum(&g));
        let naive: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!((want as f64 - naive).abs() <= naive * 1e-6);
        for tier in Tier::available() {
            assert_eq!(dispatch(tier, Sum(&g)).to_bits(), want.to_bits(), "{tier}");
        }
    }
}
