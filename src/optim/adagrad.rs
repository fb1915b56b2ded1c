//! Adagrad, element-wise.

use super::EpsPlacement;
use super::config::{self, Fields, eps_code, named};
use super::engine::{Config, Core, GradRow, RowSet, Rule, map_vectors};
use crate::Result;
use crate::kernels::Simd;

/// The settings of [`Adagrad`]. `Default` is Keras 3's (= [`keras`](Self::keras)).
///
/// Adagrad leaves rows without gradient unchanged, so it has no
/// [`Semantics`](crate::Semantics) setting: lazy and dense-exact agree.
///
/// # Examples
/// ```
/// use embtable::{AdagradConfig, EpsPlacement};
/// let keras = AdagradConfig::default();
/// assert_eq!((keras.lr, keras.initial_accumulator_value, keras.epsilon), (1e-3, 0.1, 1e-7));
/// let torch = AdagradConfig::torch();
/// assert_eq!(torch.eps_placement, EpsPlacement::OutsideSqrt);
/// assert!(AdagradConfig { epsilon: 0.0, ..torch }.validate().is_err());
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
}

impl Default for AdagradConfig {
    fn default() -> Self {
        Self::keras()
    }
}

impl AdagradConfig {
    /// Keras 3's defaults: lr 0.001, accumulators from 0.1, ε 1e-7 inside the root.
    pub fn keras() -> Self {
        Self {
            lr: 1e-3,
            initial_accumulator_value: 0.1,
            epsilon: 1e-7,
            eps_placement: EpsPlacement::InsideSqrt,
        }
    }

    /// PyTorch's defaults: lr 0.01, accumulators from 0, ε 1e-10 outside the root.
    pub fn torch() -> Self {
        Self {
            lr: 1e-2,
            initial_accumulator_value: 0.0,
            epsilon: 1e-10,
            eps_placement: EpsPlacement::OutsideSqrt,
        }
    }

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

/// Adagrad over the rows of a sparse gradient ([`AdagradConfig`]).
///
/// For a row with summed gradient `g` (duplicates summed first, so the
/// accumulator grows by `(Σg)²`):
///
/// ```text
/// a += g²                       "accumulator"
/// w −= η·g / √(a + ε)           (EpsPlacement::OutsideSqrt: η·g / (√a + ε))
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

impl Adagrad {
    /// An optimizer with `config` (checked on every step).
    pub fn new(config: AdagradConfig) -> Self {
        Self {
            config,
            core: Core::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AdagradConfig {
        &self.config
    }
}

super::sparse_optimizer_impl!(Adagrad);

/// [`AdagradConfig`] ready to apply.
pub(crate) struct AdagradRule {
    lr: f32,
    epsilon: f32,
    outside: bool,
    arrays: [(&'static str, f32); 1],
}

impl Config for AdagradConfig {
    type Rule = AdagradRule;
    const KIND: &'static str = "adagrad";
    const FIELDS: &'static [&'static str] = &[
        "lr",
        "initial_accumulator_value",
        "epsilon",
        "eps_placement",
    ];

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> AdagradRule {
        AdagradRule {
            lr: self.lr,
            epsilon: self.epsilon,
            outside: self.eps_placement == EpsPlacement::OutsideSqrt,
            arrays: [("accumulator", self.initial_accumulator_value)],
        }
    }

    fn to_fields(&self) -> Vec<(String, f64)> {
        named(&[
            ("lr", self.lr as f64),
            (
                "initial_accumulator_value",
                self.initial_accumulator_value as f64,
            ),
            ("epsilon", self.epsilon as f64),
            ("eps_placement", eps_code(self.eps_placement)),
        ])
    }

    fn from_fields(f: &Fields<'_>) -> Result<Self> {
        Ok(Self {
            lr: f.f32("lr")?,
            initial_accumulator_value: f.f32("initial_accumulator_value")?,
            epsilon: f.f32("epsilon")?,
            eps_placement: f.eps_placement("eps_placement")?,
        })
    }
}

impl Rule for AdagradRule {
    fn arrays(&self) -> &[(&'static str, f32)] {
        &self.arrays
    }

    #[inline(always)]
    fn update<S: Simd>(&self, s: S, rows: RowSet<'_>, g: &impl GradRow<S>, _dim: usize) {
        if self.outside {
            self.body::<S, true>(s, rows, g);
        } else {
            self.body::<S, false>(s, rows, g);
        }
    }
}

impl AdagradRule {
    /// `a += g²; w −= η·g / den`.
    #[inline(always)]
    fn body<S: Simd, const OUTSIDE: bool>(&self, s: S, rows: RowSet<'_>, g: &impl GradRow<S>) {
        let (lr, eps) = (s.splat(self.lr), s.splat(self.epsilon));
        map_vectors(
            s,
            rows.take::<2>(),
            g,
            #[inline(always)]
            |[wv, av], gv| {
                let av = s.add(av, s.mul(gv, gv));
                let den = if OUTSIDE {
                    s.add(s.sqrt(av), eps)
                } else {
                    s.sqrt(s.add(av, eps))
                };
                [s.sub(wv, s.div(s.mul(lr, gv), den)), av]
            },
        );
    }
}
