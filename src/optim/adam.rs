//! Adam, with Keras 3's or PyTorch's formulas (dense `torch.optim.Adam` or
//! `torch.optim.SparseAdam`), `amsgrad`, lazy or dense-exact.

use super::Semantics;
use super::config::{self, Choice, Visit};
use super::engine::{
    Config, Core, GradRow, Missed, RowSet, Rule, StateSpec, map_vectors, saturate, saturate_up,
};
use crate::Result;
use crate::kernels::Simd;

/// Whose Adam formulas [`Adam`] and [`AdamW`](crate::AdamW) follow. All
/// three are the same update in exact arithmetic except for where ε goes
/// and how weight decay enters; they round differently.
///
/// With `g` the gradient, `t` the step (from 1), `β₁ᵗ` and `β₂ᵗ` the bias
/// corrections' powers:
///
/// | | `Keras` | `Torch` (`torch.optim.Adam`) | `TorchSparse` (`SparseAdam`) |
/// |---|---|---|---|
/// | `m` | `m + (g − m)·(1 − β₁)` | `m + (1 − β₁)·(g − m)` | as Keras |
/// | `v` | `v + (g² − v)·(1 − β₂)` | `β₂·v + (1 − β₂)·g·g` | as Keras |
/// | update | `w −= m·α / (√v + ε)`, `α = η·√(1 − β₂ᵗ) / (1 − β₁ᵗ)` | `w −= η/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)` | `w −= α · m / (√v + ε)` |
/// | powers `β₁ᵗ, β₂ᵗ` | `f32` (Keras casts β and t to float32) | `f64` | `f64` |
/// | `weight_decay` ([`Adam`]) | decoupled: `w −= (w·λ)·η` first | coupled: `g += λ·w` | coupled (an extension: `SparseAdam` has none) |
/// | `weight_decay` ([`AdamW`](crate::AdamW)) | as `Adam`'s | decoupled: `w ← w·(1 − ηλ)` first | as `Torch` |
///
/// So PyTorch's dense Adam adds ε to the *bias-corrected* `√v̂` (ε is in
/// effect `ε·√(1 − β₂ᵗ)` in Keras' terms), while Keras and `SparseAdam` add
/// it to `√v`; early in training, with small gradients, the two differ by
/// far more than rounding. With `amsgrad`, `v` in the update is the
/// running maximum of `v` (state `"velocity_hat"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AdamStyle {
    /// Keras 3 (`keras.optimizers.Adam`, `AdamW`).
    #[default]
    Keras,
    /// PyTorch's dense `torch.optim.Adam` / `AdamW` (single-tensor path).
    Torch,
    /// PyTorch's `torch.optim.SparseAdam`.
    TorchSparse,
}

impl Choice for AdamStyle {
    const ALL: &'static [Self] = &[AdamStyle::Keras, AdamStyle::Torch, AdamStyle::TorchSparse];
    fn same(self, other: Self) -> bool {
        self == other
    }
}

/// The settings of [`Adam`]. `Default` is Keras 3's (= [`keras`](Self::keras)).
///
/// `beta_1` and `beta_2` are `f64`: `1 − β` loses three or four of an
/// `f32`'s digits (`1 − 0.999f32` is `0.00099998713`), and both frameworks
/// take β as a double (Keras computes `1 − β` in Python and rounds the
/// result; PyTorch computes the bias corrections in double).
///
/// # Examples
/// ```
/// use embtable::{AdamConfig, AdamStyle, Semantics};
/// let keras = AdamConfig::default();
/// assert_eq!((keras.lr, keras.beta_1, keras.beta_2, keras.epsilon), (1e-3, 0.9, 0.999, 1e-7));
/// assert_eq!((keras.style, keras.semantics), (AdamStyle::Keras, Semantics::DenseExact));
/// let sparse = AdamConfig::torch_sparse();
/// assert_eq!((sparse.epsilon, sparse.semantics), (1e-8, Semantics::Lazy));
/// assert!(AdamConfig { beta_2: 1.0, ..keras }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate η, `> 0`. Keras and PyTorch: 0.001.
    pub lr: f32,
    /// Decay β₁ of the first moment, in `[0, 1)`. 0.9.
    pub beta_1: f64,
    /// Decay β₂ of the second moment, in `[0, 1)`. 0.999.
    pub beta_2: f64,
    /// ε, `> 0`, placed as [`style`](Self::style) says. Keras: 1e-7, PyTorch: 1e-8.
    pub epsilon: f32,
    /// Divide by the running maximum of the second moment (AMSGrad).
    pub amsgrad: bool,
    /// Weight decay λ `>= 0`, decoupled or coupled as [`AdamStyle`] says. 0: none.
    pub weight_decay: f32,
    /// Keras' or PyTorch's formulas.
    pub style: AdamStyle,
    /// What happens to rows absent from a batch: under
    /// [`Semantics::DenseExact`] their moments decay and their weights keep
    /// moving (the first moment is not zero), as dense Adam moves them;
    /// under [`Semantics::Lazy`] they stay as they are (`SparseAdam`,
    /// TensorFlow's `LazyAdam`).
    pub semantics: Semantics,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self::keras()
    }
}

impl AdamConfig {
    /// Keras 3's `Adam()`: lr 0.001, β (0.9, 0.999), ε 1e-7, no AMSGrad,
    /// no weight decay, Keras formulas, dense-exact.
    pub fn keras() -> Self {
        Self {
            lr: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            amsgrad: false,
            weight_decay: 0.0,
            style: AdamStyle::Keras,
            semantics: Semantics::DenseExact,
        }
    }

    /// Keras' formulas and defaults with [`Semantics::Lazy`]: TensorFlow
    /// Addons' `LazyAdam` (rows absent from a batch untouched).
    pub fn keras_lazy() -> Self {
        Self {
            semantics: Semantics::Lazy,
            ..Self::keras()
        }
    }

    /// `torch.optim.Adam()` on a dense embedding: lr 0.001, β (0.9, 0.999),
    /// ε 1e-8 added to the bias-corrected root, no AMSGrad, no weight decay
    /// (coupled when set), dense-exact.
    pub fn torch() -> Self {
        Self {
            epsilon: 1e-8,
            style: AdamStyle::Torch,
            ..Self::keras()
        }
    }

    /// `torch.optim.SparseAdam()` on a sparse embedding: lr 0.001, β (0.9,
    /// 0.999), ε 1e-8 not bias-corrected, lazy.
    pub fn torch_sparse() -> Self {
        Self {
            epsilon: 1e-8,
            style: AdamStyle::TorchSparse,
            semantics: Semantics::Lazy,
            ..Self::keras()
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the
    /// field and its value if `lr` or `epsilon` is not positive and finite,
    /// `beta_1` or `beta_2` is outside `[0, 1)` (NaN included), or
    /// `weight_decay` is negative or not finite, or decoupled with
    /// `lr * weight_decay >= 1`.
    pub fn validate(&self) -> Result<()> {
        check(
            self.lr,
            self.beta_1,
            self.beta_2,
            self.epsilon,
            self.weight_decay,
            self.style == AdamStyle::Keras,
        )
    }
}

/// The checks of [`AdamConfig::validate`] and `AdamWConfig::validate`.
pub(crate) fn check(
    lr: f32,
    beta_1: f64,
    beta_2: f64,
    epsilon: f32,
    weight_decay: f32,
    decoupled: bool,
) -> Result<()> {
    config::positive("lr", lr)?;
    config::unit64("beta_1", beta_1)?;
    config::unit64("beta_2", beta_2)?;
    config::positive("epsilon", epsilon)?;
    config::non_negative("weight_decay", weight_decay)?;
    if decoupled {
        config::decay_below_one(lr, weight_decay)?;
    }
    Ok(())
}

/// Adam over the rows of a sparse gradient ([`AdamConfig`], [`AdamStyle`]).
///
/// For a row with summed gradient `g` at step `t` (the optimizer's step
/// count, from 1, as every framework counts it):
///
/// ```text
/// m = β₁·m + (1 − β₁)·g                   "momentum"
/// v = β₂·v + (1 − β₂)·g²                  "velocity"
/// amsgrad: v̂ = max(v̂, v)                  "velocity_hat"
/// w −= η·√(1 − β₂ᵗ)/(1 − β₁ᵗ) · m / (√v̂ + ε)
/// ```
///
/// rounded as [`AdamStyle`] says, with its weight decay.
///
/// State: `"momentum"`, `"velocity"` (and `"velocity_hat"` with
/// `amsgrad`), `rows × dim`, zero at the start.
///
/// # Dense-exact Adam
///
/// A step with a zero gradient still moves a weight (`m` is not zero) and
/// is not linear (`√v`), so there is no closed form for the steps a row
/// missed. Under [`Semantics::DenseExact`] a row that missed `k` steps
/// replays them, each with its own step's bias correction and learning
/// rate and a zero gradient, when it is next touched (or flushed): the
/// result is bitwise what dense Adam computes. The cost is `k` row updates
/// for that row, what dense Adam spends on it anyway, but paid only for
/// rows that come back; [`flush`](crate::SparseOptimizer::flush) replays
/// every lagging row.
///
/// # Examples
/// ```
/// use embtable::{Adam, AdamConfig, EmbeddingTable, SparseGrad, SparseOptimizer};
/// let mut table = EmbeddingTable::from_rows(2, 1, &[1., 1.])?;
/// let mut grad = SparseGrad::new(1);
/// grad.accumulate_lookup(&[0u32], &[0.5])?;
/// let mut adam = Adam::new(AdamConfig::torch_sparse());
/// adam.step(&mut table, &grad)?;
/// // Step 1: m = 0.05, v = 0.00025, m̂/√v̂ = 1: w moves by about lr.
/// assert!((table.row(0)[0] - 0.999).abs() < 1e-6);
/// assert_eq!(table.row(1), &[1.0]); // lazy: untouched
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Adam {
    config: AdamConfig,
    core: Core,
}

super::sparse_optimizer!(Adam, AdamConfig);

impl Config for AdamConfig {
    type Rule = AdamRule;
    const KIND: &'static str = "adam";

    fn fields(&mut self, v: &mut impl Visit) {
        v.f32("lr", &mut self.lr);
        v.f64("beta_1", &mut self.beta_1);
        v.f64("beta_2", &mut self.beta_2);
        v.f32("epsilon", &mut self.epsilon);
        v.choice("amsgrad", &mut self.amsgrad);
        v.f32("weight_decay", &mut self.weight_decay);
        v.choice("style", &mut self.style);
        v.choice("semantics", &mut self.semantics);
    }

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> AdamRule {
        AdamRule::new(self, self.style == AdamStyle::Keras)
    }

    fn lr_mut(&mut self) -> &mut f32 {
        &mut self.lr
    }

    fn semantics(&self) -> Semantics {
        self.semantics
    }
}

/// The fields [`AdamRule`] is made of: [`AdamConfig`]'s, and
/// `AdamWConfig`'s.
pub(crate) trait AdamFields {
    fn parts(&self) -> (f64, f64, f32, bool, f32, AdamStyle);
}

impl AdamFields for AdamConfig {
    fn parts(&self) -> (f64, f64, f32, bool, f32, AdamStyle) {
        (
            self.beta_1,
            self.beta_2,
            self.epsilon,
            self.amsgrad,
            self.weight_decay,
            self.style,
        )
    }
}

/// Adam's (and AdamW's) config as its rule.
pub(crate) struct AdamRule {
    beta_1: f64,
    beta_2: f64,
    /// `1 − β₁` and `1 − β₂`, computed in `f64` and rounded, as both
    /// frameworks compute them.
    one_minus_beta_1: f32,
    one_minus_beta_2: f32,
    epsilon: f32,
    amsgrad: bool,
    weight_decay: f32,
    /// Weight decay on the weight (`w ← …` before the update), not the gradient.
    decoupled: bool,
    style: AdamStyle,
}

impl AdamRule {
    /// The rule of `config`, with weight decay `decoupled` or coupled.
    pub(crate) fn new(config: &impl AdamFields, decoupled: bool) -> Self {
        let (beta_1, beta_2, epsilon, amsgrad, weight_decay, style) = config.parts();
        Self {
            beta_1,
            beta_2,
            one_minus_beta_1: (1.0 - beta_1) as f32,
            one_minus_beta_2: (1.0 - beta_2) as f32,
            epsilon,
            amsgrad,
            weight_decay,
            decoupled,
            style,
        }
    }
}

/// The scalars of one Adam step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamStep {
    /// Keras: `α = η·√(1 − β₂ᵗ)/(1 − β₁ᵗ)`; `TorchSparse` the same in
    /// `f64`; `Torch`: `η/(1 − β₁ᵗ)`.
    alpha: f32,
    /// `Torch`: `√(1 − β₂ᵗ)`.
    root_bias_2: f32,
    /// Keras' decoupled decay multiplies `w·λ` by the step's `η`.
    lr: f32,
    /// Torch's decoupled decay: `1 − ηλ`; 1 otherwise.
    keep: f32,
    /// The coupled decay added to the gradient: `λ`; 0 otherwise.
    couple: f32,
    /// Keras' decoupled decay: `λ`; 0 otherwise.
    shrink: f32,
}

impl Rule for AdamRule {
    type Step = AdamStep;

    fn arrays(&self) -> &[StateSpec] {
        const M: StateSpec = StateSpec::signed("momentum");
        const V: StateSpec = StateSpec::at_least("velocity", 0.0, 0.0);
        const V_HAT: StateSpec = StateSpec::at_least("velocity_hat", 0.0, 0.0);
        if self.amsgrad {
            &[M, V, V_HAT]
        } else {
            &[M, V]
        }
    }

    fn missed(&self) -> Missed {
        Missed::Replay(None)
    }

    fn step(&self, t: u64, lr: f32) -> AdamStep {
        let wd = self.weight_decay;
        let (alpha, root_bias_2) = match self.style {
            AdamStyle::Keras => {
                // Keras: `power(cast(β, float32), cast(t, float32))` and the
                // rest in float32 (a float64 power differs by ~1e-4 relative).
                let t = t as f32;
                let p1 = (self.beta_1 as f32).powf(t);
                let p2 = (self.beta_2 as f32).powf(t);
                (lr * (1.0 - p2).sqrt() / (1.0 - p1), 1.0)
            }
            AdamStyle::Torch | AdamStyle::TorchSparse => {
                // Python's `β ** t`: the C library's `pow` in double.
                let t = t as f64;
                let bias_1 = 1.0 - self.beta_1.powf(t);
                let bias_2 = 1.0 - self.beta_2.powf(t);
                if self.style == AdamStyle::Torch {
                    ((lr as f64 / bias_1) as f32, bias_2.powf(0.5) as f32)
                } else {
                    ((lr as f64 * bias_2.sqrt() / bias_1) as f32, 1.0)
                }
            }
        };
        let keras = self.style == AdamStyle::Keras;
        AdamStep {
            alpha,
            root_bias_2,
            lr,
            keep: if self.decoupled && !keras {
                (1.0 - lr as f64 * wd as f64) as f32
            } else {
                1.0
            },
            couple: if self.decoupled { 0.0 } else { wd },
            shrink: if self.decoupled && keras { wd } else { 0.0 },
        }
    }

    #[inline(always)]
    fn update<S: Simd>(
        &self,
        s: S,
        step: &AdamStep,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
        _dim: usize,
    ) {
        let lane = Lane::new(self, step, s);
        match (self.style, self.amsgrad) {
            (AdamStyle::Keras, false) => lane.run::<{ KERAS }, false>(rows, g),
            (AdamStyle::Keras, true) => lane.run::<{ KERAS }, true>(rows, g),
            (AdamStyle::Torch, false) => lane.run::<{ TORCH }, false>(rows, g),
            (AdamStyle::Torch, true) => lane.run::<{ TORCH }, true>(rows, g),
            (AdamStyle::TorchSparse, false) => lane.run::<{ SPARSE }, false>(rows, g),
            (AdamStyle::TorchSparse, true) => lane.run::<{ SPARSE }, true>(rows, g),
        }
    }
}

/// [`AdamStyle`] as a const parameter.
const KERAS: u8 = 0;
const TORCH: u8 = 1;
const SPARSE: u8 = 2;

/// One Adam step's scalars, splatted. Weight decay is applied whatever its
/// value (`g + 0·w`, `w·1` and `w − (w·0)·η` leave `g` and `w` as they
/// are): a branch per setting would double the compiled bodies.
struct Lane<S: Simd> {
    s: S,
    c1: S::V,
    c2: S::V,
    beta_2: S::V,
    epsilon: S::V,
    alpha: S::V,
    root_bias_2: S::V,
    lr: S::V,
    keep: S::V,
    couple: S::V,
    shrink: S::V,
}

impl<S: Simd> Lane<S> {
    #[inline(always)]
    fn new(rule: &AdamRule, step: &AdamStep, s: S) -> Self {
        Self {
            s,
            c1: s.splat(rule.one_minus_beta_1),
            c2: s.splat(rule.one_minus_beta_2),
            beta_2: s.splat(rule.beta_2 as f32),
            epsilon: s.splat(rule.epsilon),
            alpha: s.splat(step.alpha),
            root_bias_2: s.splat(step.root_bias_2),
            lr: s.splat(step.lr),
            keep: s.splat(step.keep),
            couple: s.splat(step.couple),
            shrink: s.splat(step.shrink),
        }
    }

    /// `(w, m, v[, v̂])` after a step with gradient `g`.
    #[inline(always)]
    fn apply<const STYLE: u8, const AMSGRAD: bool>(
        &self,
        [w, m, v, vh]: [S::V; 4],
        g: S::V,
    ) -> [S::V; 4] {
        let s = self.s;
        let (w, g) = if STYLE == KERAS {
            (s.sub(w, s.mul(s.mul(w, self.shrink), self.lr)), g)
        } else {
            (s.mul(w, self.keep), s.add(g, s.mul(self.couple, w)))
        };
        let (m, v) = if STYLE == TORCH {
            let m = s.add(m, s.mul(self.c1, s.sub(g, m)));
            let v = s.add(s.mul(v, self.beta_2), s.mul(s.mul(self.c2, g), g));
            (m, v)
        } else {
            let m = s.add(m, s.mul(s.sub(g, m), self.c1));
            let v = s.add(v, s.mul(s.sub(s.mul(g, g), v), self.c2));
            (m, v)
        };
        let (m, v) = (saturate(s, m), saturate_up(s, v));
        let vh = if AMSGRAD { s.max(vh, v) } else { v };
        let root = s.sqrt(vh);
        let w = match STYLE {
            KERAS => s.sub(w, s.div(s.mul(m, self.alpha), s.add(root, self.epsilon))),
            TORCH => {
                let den = s.add(s.div(root, self.root_bias_2), self.epsilon);
                s.sub(w, s.mul(self.alpha, s.div(m, den)))
            }
            _ => s.sub(w, s.mul(self.alpha, s.div(m, s.add(root, self.epsilon)))),
        };
        [saturate(s, w), m, v, vh]
    }

    #[inline(always)]
    fn run<const STYLE: u8, const AMSGRAD: bool>(&self, rows: RowSet<'_>, g: &impl GradRow<S>) {
        let z = self.s.splat(0.0);
        if AMSGRAD {
            map_vectors(
                self.s,
                rows.take::<4>(),
                g,
                #[inline(always)]
                |x, gv| self.apply::<STYLE, true>(x, gv),
            );
        } else {
            map_vectors(
                self.s,
                rows.take::<3>(),
                g,
                #[inline(always)]
                |[w, m, v], gv| {
                    let [w, m, v, _] = self.apply::<STYLE, false>([w, m, v, z], gv);
                    [w, m, v]
                },
            );
        }
    }
}
