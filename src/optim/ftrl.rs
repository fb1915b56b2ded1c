//! FTRL-Proximal, with Keras 3's arguments and formulas.

use super::Semantics;
use super::config::{self, Visit};
use super::engine::{
    Config, Core, GradRow, Missed, RowSet, Rule, StateSpec, map_vectors, saturate, saturate_up,
};
use crate::kernels::Simd;
use crate::{Error, Result};

/// The settings of [`Ftrl`], named as Keras 3 names them. `Default` is
/// Keras 3's (= [`keras`](Self::keras)).
///
/// # Examples
/// ```
/// use embtable::{FtrlConfig, Semantics};
/// let keras = FtrlConfig::default();
/// assert_eq!((keras.lr, keras.learning_rate_power, keras.initial_accumulator_value), (1e-3, -0.5, 0.1));
/// assert_eq!(keras.semantics, Semantics::DenseExact);
/// assert!(FtrlConfig { learning_rate_power: 0.5, ..keras }.validate().is_err());
/// // With nothing to keep the denominator positive, a lane that never had a
/// // gradient would get 0 / 0:
/// assert!(FtrlConfig { initial_accumulator_value: 0.0, ..keras }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FtrlConfig {
    /// Learning rate η, `> 0`. Keras: 0.001.
    pub lr: f32,
    /// The power `p <= 0`: a lane's rate is `η / n^(−p)`, shrinking as its
    /// accumulator `n` grows; 0 keeps it fixed. Keras: −0.5.
    pub learning_rate_power: f32,
    /// Starting value `>= 0` of every accumulator `n`. Keras: 0.1.
    pub initial_accumulator_value: f32,
    /// L1 strength `>= 0`: lanes whose `|z|` stays below it are exactly 0. Keras: 0.
    pub l1_regularization_strength: f32,
    /// L2 strength `>= 0`. Keras: 0.
    pub l2_regularization_strength: f32,
    /// L2 shrinkage `>= 0`, added to the gradient as `2·λₛ·w` (it is not
    /// in the accumulator). Keras: 0.
    pub l2_shrinkage_regularization_strength: f32,
    /// β `>= 0` of the per-lane rate `(β + √n)/η`: adds `β/η` to the
    /// denominator. Keras: 0.
    pub beta: f32,
    /// What happens to rows absent from a batch. Keras recomputes every
    /// weight from its accumulators at every step, so under
    /// [`Semantics::DenseExact`] a row that never had a gradient is set by
    /// the formula (to 0 with the defaults) and, with L2 shrinkage, keeps
    /// shrinking; [`Semantics::Lazy`] (TensorFlow's sparse FTRL) leaves it.
    pub semantics: Semantics,
}

impl Default for FtrlConfig {
    fn default() -> Self {
        Self::keras()
    }
}

impl FtrlConfig {
    /// Keras 3's `Ftrl()`: lr 0.001, learning-rate power −0.5, accumulators
    /// from 0.1, no regularisation, β 0, dense-exact.
    pub fn keras() -> Self {
        Self {
            lr: 1e-3,
            learning_rate_power: -0.5,
            initial_accumulator_value: 0.1,
            l1_regularization_strength: 0.0,
            l2_regularization_strength: 0.0,
            l2_shrinkage_regularization_strength: 0.0,
            beta: 0.0,
            semantics: Semantics::DenseExact,
        }
    }

    /// Keras' formulas and defaults with [`Semantics::Lazy`]: what
    /// TensorFlow's `ResourceSparseApplyFtrlV2` computes, rows absent from
    /// a batch untouched.
    pub fn keras_lazy() -> Self {
        Self {
            semantics: Semantics::Lazy,
            ..Self::keras()
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field and its value if `lr` is
    /// not positive and finite, `learning_rate_power` is positive or not
    /// finite, another field is negative or not finite, or
    /// `initial_accumulator_value`, `l2_regularization_strength` and `beta`
    /// are all 0 with a negative power (the denominator of a lane that has
    /// only seen zero gradients would be 0; Keras gives NaN there).
    pub fn validate(&self) -> Result<()> {
        config::positive("lr", self.lr)?;
        let p = self.learning_rate_power;
        if !(p.is_finite() && p <= 0.0) {
            return Err(Error::InvalidConfig {
                field: "learning_rate_power",
                reason: format!("must be negative or zero, got {p}"),
            });
        }
        config::non_negative("initial_accumulator_value", self.initial_accumulator_value)?;
        config::non_negative(
            "l1_regularization_strength",
            self.l1_regularization_strength,
        )?;
        config::non_negative(
            "l2_regularization_strength",
            self.l2_regularization_strength,
        )?;
        config::non_negative(
            "l2_shrinkage_regularization_strength",
            self.l2_shrinkage_regularization_strength,
        )?;
        config::non_negative("beta", self.beta)?;
        if p < 0.0
            && self.initial_accumulator_value == 0.0
            && self.l2_regularization_strength == 0.0
            && self.beta == 0.0
        {
            return Err(Error::InvalidConfig {
                field: "initial_accumulator_value",
                reason: "must be positive when l2_regularization_strength and beta are 0, got 0"
                    .into(),
            });
        }
        Ok(())
    }
}

/// FTRL-Proximal over the rows of a sparse gradient ([`FtrlConfig`]), as
/// Keras 3 computes it: with `p = learning_rate_power`, `λ₁`, `λ₂`, `λₛ`
/// the regularisation strengths, for each lane:
///
/// ```text
/// g' = g + 2·λₛ·w
/// n' = n + g²                                     "accumulator"
/// z += g' − (n'^(−p) − n^(−p)) / η · w             "linear"
/// w = (clip(z, −λ₁, λ₁) − z) / max(n'^(−p)/η + 2·(λ₂ + β/(2η)), f32::MIN_POSITIVE)
/// n = n'
/// ```
///
/// With the default `p = −0.5` the power is a square root (as the torch
/// backend computes it); other powers use `f32::powf` lane by lane.
///
/// State: `"accumulator"` (from `initial_accumulator_value`) and
/// `"linear"` (from 0), `rows × dim`.
///
/// Under [`Semantics::DenseExact`] the weight of a row absent from a step
/// is set from its `z` and `n` (which a zero gradient leaves as they are),
/// so a row that missed steps is brought current by replaying the last of
/// them; with L2 shrinkage its `z` keeps moving and every missed step is
/// replayed.
///
/// # Examples
/// ```
/// use embtable::{EmbeddingTable, Ftrl, FtrlConfig, SparseGrad, SparseOptimizer};
/// let mut table = EmbeddingTable::from_rows(2, 1, &[0.5, 0.5])?;
/// let mut grad = SparseGrad::new(1);
/// grad.accumulate_lookup(&[0u32], &[0.3])?;
/// let mut ftrl = Ftrl::new(FtrlConfig { lr: 0.1, ..FtrlConfig::keras() });
/// ftrl.step(&mut table, &grad)?;
/// // n' = 0.19; z = 0.3 − (√0.19 − √0.1)/0.1·0.5; w = −z/(√0.19/0.1)
/// let z = 0.3 - (0.19f32.sqrt() - 0.1f32.sqrt()) / 0.1 * 0.5;
/// assert!((table.row(0)[0] - (-z / (0.19f32.sqrt() / 0.1))).abs() < 1e-6);
/// ftrl.flush(&mut table)?;
/// assert_eq!(table.row(1), &[0.0]); // dense: set by the formula, not kept
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Ftrl {
    config: FtrlConfig,
    core: Core,
}

super::sparse_optimizer!(Ftrl, FtrlConfig);

impl Config for FtrlConfig {
    type Rule = FtrlRule;
    const KIND: &'static str = "ftrl";

    fn fields(&mut self, v: &mut impl Visit) {
        v.f32("lr", &mut self.lr);
        v.f32("learning_rate_power", &mut self.learning_rate_power);
        v.f32(
            "initial_accumulator_value",
            &mut self.initial_accumulator_value,
        );
        v.f32(
            "l1_regularization_strength",
            &mut self.l1_regularization_strength,
        );
        v.f32(
            "l2_regularization_strength",
            &mut self.l2_regularization_strength,
        );
        v.f32(
            "l2_shrinkage_regularization_strength",
            &mut self.l2_shrinkage_regularization_strength,
        );
        v.f32("beta", &mut self.beta);
        v.choice("semantics", &mut self.semantics);
    }

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> FtrlRule {
        let n0 = self.initial_accumulator_value;
        FtrlRule {
            power: -self.learning_rate_power,
            l1: self.l1_regularization_strength,
            l2: self.l2_regularization_strength,
            // Keras multiplies in Python (double), then rounds.
            shrinkage: (2.0 * self.l2_shrinkage_regularization_strength as f64) as f32,
            beta: self.beta,
            arrays: [
                StateSpec::at_least("accumulator", n0, 0.0),
                StateSpec::signed("linear"),
            ],
        }
    }

    fn lr_mut(&mut self) -> &mut f32 {
        &mut self.lr
    }

    fn semantics(&self) -> Semantics {
        self.semantics
    }
}

/// [`FtrlConfig`] as its rule.
pub(crate) struct FtrlRule {
    /// `−learning_rate_power`.
    power: f32,
    l1: f32,
    l2: f32,
    /// `2·λₛ`.
    shrinkage: f32,
    beta: f32,
    arrays: [StateSpec; 2],
}

/// The scalars of one FTRL step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FtrlStep {
    lr: f32,
    /// `2·(λ₂ + β/(2η))`, in `f32` as Keras computes it.
    two_l2: f32,
}

impl Rule for FtrlRule {
    type Step = FtrlStep;

    fn arrays(&self) -> &[StateSpec] {
        &self.arrays
    }

    fn missed(&self) -> Missed {
        if self.shrinkage == 0.0 {
            Missed::Replay(Some(1))
        } else {
            Missed::Replay(None)
        }
    }

    fn step(&self, _t: u64, lr: f32) -> FtrlStep {
        let l2 = self.l2 + self.beta / (2.0 * lr);
        FtrlStep {
            lr,
            two_l2: 2.0 * l2,
        }
    }

    #[inline(always)]
    fn update<S: Simd>(
        &self,
        s: S,
        step: &FtrlStep,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
        _dim: usize,
    ) {
        if self.power == 0.5 {
            self.body::<S, true>(s, step, rows, g);
        } else {
            self.body::<S, false>(s, step, rows, g);
        }
    }
}

impl FtrlRule {
    /// The update of [`Ftrl`]'s docs; `SQRT`: the power is 1/2.
    #[inline(always)]
    fn body<S: Simd, const SQRT: bool>(
        &self,
        s: S,
        step: &FtrlStep,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
    ) {
        let lr = s.splat(step.lr);
        let two_l2 = s.splat(step.two_l2);
        let shrinkage = s.splat(self.shrinkage);
        let (l1, minus_l1) = (s.splat(self.l1), s.splat(-self.l1));
        let power = self.power;
        // The denominator is kept at least the smallest normal float: the
        // pad lanes (n = 0) would otherwise compute 0 / 0 when λ₂ = β = 0.
        let tiny = s.splat(f32::MIN_POSITIVE);
        let pow = |x: S::V| {
            if SQRT {
                s.sqrt(x)
            } else {
                powf_lanes(s, x, power)
            }
        };
        map_vectors(
            s,
            rows.take::<3>(),
            g,
            #[inline(always)]
            |[w, n, z], gv| {
                let g2 = s.add(gv, s.mul(shrinkage, w));
                let n_new = saturate_up(s, s.add(n, s.mul(gv, gv)));
                let p_new = pow(n_new);
                let sigma = s.div(s.sub(p_new, pow(n)), lr);
                let z = saturate(s, s.add(z, s.sub(g2, s.mul(sigma, w))));
                let q = s.max(s.add(s.div(p_new, lr), two_l2), tiny);
                let clipped = s.min(s.max(z, minus_l1), l1);
                [saturate(s, s.div(s.sub(clipped, z), q)), n_new, z]
            },
        );
    }
}

/// `x^p` lane by lane with `f32::powf`, the same in every tier.
#[inline(always)]
fn powf_lanes<S: Simd>(s: S, x: S::V, p: f32) -> S::V {
    let mut lanes = [0.0f32; 16];
    s.store(x, &mut lanes);
    for x in &mut lanes[..S::N] {
        *x = x.powf(p);
    }
    s.load(&lanes)
}
