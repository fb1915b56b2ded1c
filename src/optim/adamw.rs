//! AdamW: Adam with decoupled weight decay, Keras 3's or PyTorch's.

use super::Semantics;
use super::adam::{self, AdamFields, AdamRule, AdamStyle};
use super::config::Visit;
use super::engine::{Config, Core};
use crate::Result;

/// The settings of [`AdamW`]. `Default` is Keras 3's (= [`keras`](Self::keras)).
///
/// The fields are [`AdamConfig`](crate::AdamConfig)'s; the weight decay is
/// always decoupled from the gradient (see [`AdamStyle`] for the formulas).
///
/// # Examples
/// ```
/// use embtable::{AdamStyle, AdamWConfig};
/// let keras = AdamWConfig::default();
/// assert_eq!((keras.lr, keras.weight_decay, keras.epsilon), (1e-3, 0.004, 1e-7));
/// let torch = AdamWConfig::torch();
/// assert_eq!((torch.weight_decay, torch.epsilon, torch.style), (1e-2, 1e-8, AdamStyle::Torch));
/// assert!(AdamWConfig { lr: 10.0, weight_decay: 0.5, ..torch }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
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
    /// Weight decay λ, `>= 0` with `lr * weight_decay < 1`: each step first
    /// shrinks the weights, `w −= (w·λ)·η` (Keras) or `w ← w·(1 − ηλ)`
    /// (PyTorch). Keras: 0.004, PyTorch: 0.01.
    pub weight_decay: f32,
    /// Keras' or PyTorch's formulas.
    pub style: AdamStyle,
    /// What happens to rows absent from a batch: under
    /// [`Semantics::DenseExact`] they decay and keep moving, as in the
    /// dense optimizers.
    pub semantics: Semantics,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self::keras()
    }
}

impl AdamWConfig {
    /// Keras 3's `AdamW()`: lr 0.001, weight decay 0.004, β (0.9, 0.999),
    /// ε 1e-7, no AMSGrad, Keras formulas, dense-exact.
    pub fn keras() -> Self {
        Self {
            lr: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            amsgrad: false,
            weight_decay: 0.004,
            style: AdamStyle::Keras,
            semantics: Semantics::DenseExact,
        }
    }

    /// Keras' formulas and defaults with [`Semantics::Lazy`]: rows absent
    /// from a batch are not decayed or moved.
    pub fn keras_lazy() -> Self {
        Self {
            semantics: Semantics::Lazy,
            ..Self::keras()
        }
    }

    /// `torch.optim.AdamW()` on a dense embedding: lr 0.001, weight decay
    /// 0.01, β (0.9, 0.999), ε 1e-8 added to the bias-corrected root, no
    /// AMSGrad, dense-exact.
    pub fn torch() -> Self {
        Self {
            epsilon: 1e-8,
            weight_decay: 0.01,
            style: AdamStyle::Torch,
            ..Self::keras()
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the
    /// field and its value if `lr` or `epsilon` is not positive and finite,
    /// `beta_1` or `beta_2` is outside `[0, 1)`, or `weight_decay` is
    /// negative, not finite, or `lr * weight_decay >= 1`.
    pub fn validate(&self) -> Result<()> {
        adam::check(
            self.lr,
            self.beta_1,
            self.beta_2,
            self.epsilon,
            self.weight_decay,
            true,
        )
    }
}

/// AdamW over the rows of a sparse gradient ([`AdamWConfig`]): Adam (see
/// [`Adam`](crate::Adam), whose docs also say how dense-exact rows catch
/// up) whose weight decay shrinks the weights before each step instead of
/// entering the gradient.
///
/// State: `"momentum"`, `"velocity"` (and `"velocity_hat"` with
/// `amsgrad`), `rows × dim`, zero at the start.
///
/// # Examples
/// ```
/// use embtable::{AdamW, AdamWConfig, EmbeddingTable, SparseGrad, SparseOptimizer};
/// let mut table = EmbeddingTable::from_rows(2, 1, &[1., 1.])?;
/// let mut grad = SparseGrad::new(1);
/// grad.accumulate_lookup(&[0u32], &[0.5])?;
/// let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.5, ..AdamWConfig::torch() });
/// opt.step(&mut table, &grad)?;
/// // Row 0: decayed by 1 − 0.001·0.5, then moved by about lr.
/// assert!((table.row(0)[0] - (0.9995 - 0.001)).abs() < 1e-6);
/// // Row 1 had no gradient, but dense AdamW decays it too.
/// opt.flush(&mut table)?;
/// assert!((table.row(1)[0] - 0.9995).abs() < 1e-7);
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct AdamW {
    config: AdamWConfig,
    core: Core,
}

super::sparse_optimizer!(AdamW, AdamWConfig);

impl AdamFields for AdamWConfig {
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

impl Config for AdamWConfig {
    type Rule = AdamRule;
    const KIND: &'static str = "adamw";

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
        AdamRule::new(self, true)
    }

    fn lr_mut(&mut self) -> &mut f32 {
        &mut self.lr
    }

    fn semantics(&self) -> Semantics {
        self.semantics
    }
}
