//! Adagrad, element-wise.

use super::config::{self, Visit};
use super::engine::{
    Config, Core, GradRow, Missed, RowSet, Rule, StateSpec, map_vectors, saturate, saturate_up,
};
use super::{EpsPlacement, Semantics};
use crate::Result;
use crate::kernels::Simd;

/// The settings of [`Adagrad`]. `Default` is Keras 3's (= [`keras`](Self::keras)).
///
/// Without weight decay Adagrad leaves rows without gradient unchanged, so
/// both [`Semantics`] agree and cost the same; with weight decay a dense
/// gradient moves every row.
///
/// # Examples
/// ```
/// use embtable::{AdagradConfig, EpsPlacement};
/// let keras = AdagradConfig::default();
/// assert_eq!((keras.lr, keras.initial_accumulator_value, keras.epsilon), (1e-3, 0.1, 1e-7));
/// let torch = AdagradConfig::torch();
/// assert_eq!(torch.eps_placement, EpsPlacement::OutsideSqrt);
/// assert!(AdagradConfig { epsilon: 0.0, ..torch }.validate().is_err());
/// let decayed = AdagradConfig { lr_decay: 0.01, weight_decay: 1e-4, ..torch };
/// assert!(decayed.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradConfig {
    /// Learning rate η, `> 0`. Keras: 0.001.
    pub lr: f32,
    /// Starting value of every accumulator, `>= 0`. Keras: 0.1.
    pub initial_accumulator_value: f32,
    /// ε, `> 0`, placed as [`eps_placement`](Self::eps_placement) says. Keras: 1e-7.
    pub epsilon: f32,
    /// `√(a + ε)` (Keras) or `√a + ε` (PyTorch, FBGEMM).
    pub eps_placement: EpsPlacement,
    /// PyTorch's `lr_decay` `>= 0`: step `t` (from 1) uses the rate
    /// `η / (1 + (t − 1)·lr_decay)`, computed in `f64` as PyTorch does and
    /// rounded to `f32`. 0: a constant rate.
    pub lr_decay: f32,
    /// Weight decay λ `>= 0`, PyTorch's coupled form: the gradient becomes
    /// `g + λ·w`. 0: none.
    pub weight_decay: f32,
    /// What happens to rows absent from a batch: with weight decay, their
    /// gradient is `λ·w` under [`Semantics::DenseExact`] (PyTorch refuses
    /// weight decay on sparse gradients, so its Adagrad is dense then).
    pub semantics: Semantics,
}

impl Default for AdagradConfig {
    fn default() -> Self {
        Self::keras()
    }
}

impl AdagradConfig {
    /// Keras 3's defaults: lr 0.001, accumulators from 0.1, ε 1e-7 inside
    /// the root, no decay, dense-exact.
    pub fn keras() -> Self {
        Self {
            lr: 1e-3,
            initial_accumulator_value: 0.1,
            epsilon: 1e-7,
            eps_placement: EpsPlacement::InsideSqrt,
            lr_decay: 0.0,
            weight_decay: 0.0,
            semantics: Semantics::DenseExact,
        }
    }

    /// PyTorch's defaults: lr 0.01, accumulators from 0, ε 1e-10 outside the
    /// root, no decay, dense-exact (what PyTorch computes whenever the two
    /// semantics differ: with weight decay, which needs a dense gradient).
    pub fn torch() -> Self {
        Self {
            lr: 1e-2,
            initial_accumulator_value: 0.0,
            epsilon: 1e-10,
            eps_placement: EpsPlacement::OutsideSqrt,
            lr_decay: 0.0,
            weight_decay: 0.0,
            semantics: Semantics::DenseExact,
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the
    /// field and its value if `lr` or `epsilon` is not positive and finite,
    /// or `initial_accumulator_value`, `lr_decay` or `weight_decay` is
    /// negative or not finite.
    pub fn validate(&self) -> Result<()> {
        config::positive("lr", self.lr)?;
        config::non_negative("initial_accumulator_value", self.initial_accumulator_value)?;
        config::positive("epsilon", self.epsilon)?;
        config::non_negative("lr_decay", self.lr_decay)?;
        config::non_negative("weight_decay", self.weight_decay)
    }
}

/// Adagrad over the rows of a sparse gradient ([`AdagradConfig`]).
///
/// For a row with summed gradient `g` (duplicates summed first, so the
/// accumulator grows by `(Σg)²`):
///
/// ```text
/// weight decay: g = g + λ·w
/// ηₜ = η / (1 + (t − 1)·lr_decay)   (step t, from 1)
/// a += g²                        "accumulator"
/// w −= ηₜ·g / √(a + ε)           (EpsPlacement::OutsideSqrt: ηₜ·g / (√a + ε))
/// ```
///
/// This is Keras 3's Adagrad; with [`AdagradConfig::torch`] it is PyTorch's
/// (sparse) Adagrad and FBGEMM's `EXACT_ADAGRAD`, which compute
/// `w − η·(g / (√a + ε))`: the same up to one rounding.
///
/// State: `"accumulator"`, `rows × dim`, starting at `initial_accumulator_value`.
///
/// # Examples
/// ```
/// use embtable::{Adagrad, AdagradConfig, EmbeddingTable, SparseGrad, SparseOptimizer};
/// let mut table = EmbeddingTable::from_rows(1, 2, &[1., 1.])?;
/// let mut grad = SparseGrad::new(2);
/// grad.accumulate_lookup(&[0u32], &[3., -4.])?;
/// let mut opt = Adagrad::new(AdagradConfig { lr: 0.5, ..AdagradConfig::torch() });
/// opt.step(&mut table, &grad)?;
/// // a = (9, 16): w = 1 − 0.5 · (3/3, −4/4)
/// assert_eq!(table.row(0), &[0.5, 1.5]);
/// assert_eq!(opt.state().arrays[0].values, [9., 16.]);
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Adagrad {
    config: AdagradConfig,
    core: Core,
}

super::sparse_optimizer!(Adagrad, AdagradConfig);

/// [`AdagradConfig`] as its rule.
pub(crate) struct AdagradRule {
    epsilon: f32,
    lr_decay: f32,
    weight_decay: f32,
    outside: bool,
    arrays: [StateSpec; 1],
}

impl Config for AdagradConfig {
    type Rule = AdagradRule;
    const KIND: &'static str = "adagrad";
    // Without weight decay both semantics agree: an older state means either.
    const ADDED: &'static [(&'static str, f64)] =
        &[("lr_decay", 0.0), ("weight_decay", 0.0), ("semantics", 0.0)];

    fn fields(&mut self, v: &mut impl Visit) {
        v.f32("lr", &mut self.lr);
        v.f32(
            "initial_accumulator_value",
            &mut self.initial_accumulator_value,
        );
        v.f32("epsilon", &mut self.epsilon);
        v.choice("eps_placement", &mut self.eps_placement);
        v.f32("lr_decay", &mut self.lr_decay);
        v.f32("weight_decay", &mut self.weight_decay);
        v.choice("semantics", &mut self.semantics);
    }

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> AdagradRule {
        let a0 = self.initial_accumulator_value;
        AdagradRule {
            epsilon: self.epsilon,
            lr_decay: self.lr_decay,
            weight_decay: self.weight_decay,
            outside: self.eps_placement == EpsPlacement::OutsideSqrt,
            arrays: [StateSpec::at_least("accumulator", a0, 0.0)],
        }
    }

    fn lr_mut(&mut self) -> &mut f32 {
        &mut self.lr
    }

    fn semantics(&self) -> Semantics {
        self.semantics
    }
}

impl Rule for AdagradRule {
    /// The step's learning rate ηₜ.
    type Step = f32;

    fn arrays(&self) -> &[StateSpec] {
        &self.arrays
    }

    /// Weight decay gives an absent row the gradient `λ·w`: replayed
    /// (the square root makes it non-linear). Without it nothing moves.
    fn missed(&self) -> Missed {
        if self.weight_decay > 0.0 {
            Missed::Replay(None)
        } else {
            Missed::Nothing
        }
    }

    fn step(&self, t: u64, lr: f32) -> f32 {
        if self.lr_decay == 0.0 {
            return lr;
        }
        (lr as f64 / (1.0 + (t - 1) as f64 * self.lr_decay as f64)) as f32
    }

    #[inline(always)]
    fn update<S: Simd>(&self, s: S, lr: &f32, rows: RowSet<'_>, g: &impl GradRow<S>, _dim: usize) {
        self.body(s, *lr, rows, g);
    }
}

impl AdagradRule {
    /// `g += λ·w; a += g²; w −= ηₜ·g / (√(a + ε_in) + ε_out)`.
    ///
    /// Weight decay is added, and ε both under and after the root (one of
    /// them 0), whatever the settings: `g + 0·w` is `g` bit for bit (`w` is
    /// finite and `g` never `-0.0`), as are `a + 0` and `√a + 0` (never
    /// `-0.0`); a compiled body per setting would double the bodies.
    #[inline(always)]
    fn body<S: Simd>(&self, s: S, lr: f32, rows: RowSet<'_>, g: &impl GradRow<S>) {
        let (lr, wd) = (s.splat(lr), s.splat(self.weight_decay));
        let (inside, outside) = if self.outside {
            (0.0, self.epsilon)
        } else {
            (self.epsilon, 0.0)
        };
        let (eps_in, eps_out) = (s.splat(inside), s.splat(outside));
        map_vectors(
            s,
            rows.take::<2>(),
            g,
            #[inline(always)]
            |[wv, av], gv| {
                let gv = s.add(gv, s.mul(wd, wv));
                let av = saturate_up(s, s.add(av, s.mul(gv, gv)));
                let den = s.add(s.sqrt(s.add(av, eps_in)), eps_out);
                [saturate(s, s.sub(wv, s.div(s.mul(lr, gv), den))), av]
            },
        );
    }
}
