//! Stochastic gradient descent, with momentum, Nesterov momentum and weight
//! decay, in the Keras 3 or the PyTorch formulation.

use super::Semantics;
use super::config::{self, Fields, bool_code, named, semantics_code};
use super::engine::{Config, Core, GradRow, RowSet, Rule, map_vectors};
use super::linear::Map;
use crate::kernels::Simd;
use crate::{Error, Result};

/// Which framework's SGD formulas [`Sgd`] follows. Both give the same
/// weights up to rounding, except with weight decay and momentum together.
///
/// With gradient `g`, learning rate η, momentum μ and weight decay λ:
///
/// | | `Keras` (Keras 3) | `Torch` (PyTorch, dampening 0) |
/// |---|---|---|
/// | weight decay | decoupled, first: `w −= ηλ·w` | coupled, in the gradient: `g += λ·w` |
/// | no momentum | `w −= η·g` | `w −= η·g` |
/// | momentum | `v = μ·v − η·g; w += v` | `b = μ·b + g; w −= η·b` |
/// | Nesterov | `v = μ·v − η·g; w += μ·v − η·g` | `b = μ·b + g; w −= η·(g + μ·b)` |
///
/// The state array `"momentum"` holds `v` (Keras) or `b` (Torch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SgdStyle {
    /// Keras 3 (`keras.optimizers.SGD`).
    #[default]
    Keras,
    /// PyTorch (`torch.optim.SGD` with `dampening=0`).
    Torch,
}

/// The settings of [`Sgd`]. `Default` is Keras 3's (= [`keras`](Self::keras)).
///
/// # Examples
/// ```
/// use embtable::{Semantics, SgdConfig, SgdStyle};
/// let cfg = SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, ..SgdConfig::default() };
/// assert_eq!(cfg.style, SgdStyle::Keras);
/// assert!(cfg.validate().is_ok());
/// assert!(SgdConfig { momentum: 1.0, ..cfg }.validate().is_err());
/// assert_eq!(SgdConfig::torch().lr, 1e-3);
/// # let _ = Semantics::Lazy;
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate η, `> 0`. Keras: 0.01.
    pub lr: f32,
    /// Momentum μ in `[0, 1)`; 0 keeps no momentum state. Keras: 0.
    pub momentum: f32,
    /// Nesterov momentum (see [`SgdStyle`]); nothing changes when `momentum` is 0.
    pub nesterov: bool,
    /// Weight decay λ, `>= 0` with `lr * weight_decay < 1`; decoupled or
    /// coupled as [`style`](Self::style) says. Keras: 0 (none).
    pub weight_decay: f32,
    /// What happens to rows absent from a batch (momentum and weight decay
    /// change them under [`Semantics::DenseExact`]).
    pub semantics: Semantics,
    /// Keras' or PyTorch's formulas.
    pub style: SgdStyle,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self::keras()
    }
}

impl SgdConfig {
    /// Keras 3's defaults: lr 0.01, no momentum, no weight decay, Keras style, lazy.
    pub fn keras() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            semantics: Semantics::Lazy,
            style: SgdStyle::Keras,
        }
    }

    /// PyTorch's defaults: lr 1e-3, no momentum, no weight decay, Torch style
    /// (`b = μb + g; w −= η·b`, coupled weight decay), lazy.
    pub fn torch() -> Self {
        Self {
            lr: 1e-3,
            style: SgdStyle::Torch,
            ..Self::keras()
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field and its value if `lr` is
    /// not positive and finite, `momentum` is outside `[0, 1)`,
    /// `weight_decay` is negative or not finite, or `lr * weight_decay >= 1`
    /// (a decay step would flip the sign of the weights).
    pub fn validate(&self) -> Result<()> {
        config::positive("lr", self.lr)?;
        config::unit("momentum", self.momentum)?;
        config::non_negative("weight_decay", self.weight_decay)?;
        let decay = self.lr as f64 * self.weight_decay as f64;
        if decay >= 1.0 {
            return Err(Error::InvalidConfig {
                field: "weight_decay",
                reason: format!(
                    "lr * weight_decay must be below 1, got {} * {} = {decay}",
                    self.lr, self.weight_decay
                ),
            });
        }
        Ok(())
    }
}

/// SGD over the rows of a sparse gradient, with optional momentum, Nesterov
/// momentum and weight decay ([`SgdConfig`], [`SgdStyle`]).
///
/// State: `"momentum"` (`rows × dim`) when `momentum > 0`, else none.
/// Under [`Semantics::DenseExact`] an absent row still decays and keeps
/// moving with its momentum, exactly as dense SGD would move it.
///
/// # Examples
/// ```
/// use embtable::{EmbeddingTable, SparseGrad, SparseOptimizer, Sgd, SgdConfig};
/// let mut table = EmbeddingTable::from_rows(2, 2, &[1., 1., 1., 1.])?;
/// let mut grad = SparseGrad::new(2);
/// grad.accumulate_lookup(&[1u32], &[10., -10.])?;
/// let mut sgd = Sgd::new(SgdConfig { lr: 0.1, ..SgdConfig::default() });
/// sgd.step(&mut table, &grad)?;
/// assert_eq!(table.to_vec(), [1., 1., 0., 2.]);
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Sgd {
    config: SgdConfig,
    core: Core,
}

impl Sgd {
    /// An optimizer with `config` (checked on every step).
    pub fn new(config: SgdConfig) -> Self {
        Self {
            config,
            core: Core::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

super::sparse_optimizer_impl!(Sgd);

/// [`SgdConfig`] with its scalars precomputed.
pub(crate) struct SgdRule {
    lr: f32,
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
    /// `lr * weight_decay`: the decoupled (Keras) decay factor.
    decay: f32,
    style: SgdStyle,
    dense_exact: bool,
    arrays: &'static [(&'static str, f32)],
}

impl Config for SgdConfig {
    type Rule = SgdRule;
    const KIND: &'static str = "sgd";
    const FIELDS: &'static [&'static str] = &[
        "lr",
        "momentum",
        "nesterov",
        "weight_decay",
        "semantics",
        "style",
    ];

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> SgdRule {
        SgdRule {
            lr: self.lr,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            decay: self.lr * self.weight_decay,
            style: self.style,
            dense_exact: self.semantics == Semantics::DenseExact,
            arrays: if self.momentum > 0.0 {
                &[("momentum", 0.0)]
            } else {
                &[]
            },
        }
    }

    fn to_fields(&self) -> Vec<(String, f64)> {
        named(&[
            ("lr", self.lr as f64),
            ("momentum", self.momentum as f64),
            ("nesterov", bool_code(self.nesterov)),
            ("weight_decay", self.weight_decay as f64),
            ("semantics", semantics_code(self.semantics)),
            (
                "style",
                match self.style {
                    SgdStyle::Keras => 0.0,
                    SgdStyle::Torch => 1.0,
                },
            ),
        ])
    }

    fn from_fields(f: &Fields<'_>) -> Result<Self> {
        Ok(Self {
            lr: f.f32("lr")?,
            momentum: f.f32("momentum")?,
            nesterov: f.bool("nesterov")?,
            weight_decay: f.f32("weight_decay")?,
            semantics: f.semantics("semantics")?,
            style: match f.choice("style", 2)? {
                0 => SgdStyle::Keras,
                _ => SgdStyle::Torch,
            },
        })
    }
}

impl Rule for SgdRule {
    fn arrays(&self) -> &[(&'static str, f32)] {
        self.arrays
    }

    fn dense_exact(&self) -> bool {
        self.dense_exact
    }

    /// With `g = 0` (η lr, μ momentum, λ weight decay, δ = ηλ as rounded):
    /// Keras `w ← (1−δ)w + μv` (Nesterov `+ μ²v`), `v ← μv`;
    /// Torch `w ← (1−ηλ)w − ημb` (Nesterov `(1−ηλ(1+μ))w − ημ²b`), `b ← λw + μb`.
    fn zero_grad_map(&self) -> Map {
        let (lr, mu, wd) = (
            self.lr as f64,
            self.momentum as f64,
            self.weight_decay as f64,
        );
        let mut map = Map::identity(1 + self.arrays.len());
        let has_momentum = !self.arrays.is_empty();
        match self.style {
            SgdStyle::Keras => {
                map.set(0, 0, 1.0 - self.decay as f64);
                if has_momentum {
                    map.set(0, 1, if self.nesterov { mu * mu } else { mu });
                    map.set(1, 1, mu);
                }
            }
            SgdStyle::Torch => {
                if has_momentum {
                    if self.nesterov {
                        map.set(0, 0, 1.0 - lr * wd * (1.0 + mu));
                        map.set(0, 1, -lr * mu * mu);
                    } else {
                        map.set(0, 0, 1.0 - lr * wd);
                        map.set(0, 1, -lr * mu);
                    }
                    map.set(1, 0, wd);
                    map.set(1, 1, mu);
                } else {
                    map.set(0, 0, 1.0 - lr * wd);
                }
            }
        }
        map
    }

    #[inline(always)]
    fn update<S: Simd>(&self, s: S, rows: RowSet<'_>, g: &impl GradRow<S>, _dim: usize) {
        use SgdStyle::{Keras, Torch};
        let momentum = !self.arrays.is_empty();
        let decay = match self.style {
            Keras => self.decay != 0.0,
            Torch => self.weight_decay != 0.0,
        };
        // One loop per combination of settings: a branch on a setting inside
        // the loop kept fewer row misses in flight (W5 SGD step 3 ms slower).
        match (self.style, momentum, self.nesterov, decay) {
            (Keras, false, _, false) => self.keras::<S, false, false, false>(s, rows, g),
            (Keras, false, _, true) => self.keras::<S, false, false, true>(s, rows, g),
            (Keras, true, false, false) => self.keras::<S, true, false, false>(s, rows, g),
            (Keras, true, false, true) => self.keras::<S, true, false, true>(s, rows, g),
            (Keras, true, true, false) => self.keras::<S, true, true, false>(s, rows, g),
            (Keras, true, true, true) => self.keras::<S, true, true, true>(s, rows, g),
            (Torch, false, _, false) => self.torch::<S, false, false, false>(s, rows, g),
            (Torch, false, _, true) => self.torch::<S, false, false, true>(s, rows, g),
            (Torch, true, false, false) => self.torch::<S, true, false, false>(s, rows, g),
            (Torch, true, false, true) => self.torch::<S, true, false, true>(s, rows, g),
            (Torch, true, true, false) => self.torch::<S, true, true, false>(s, rows, g),
            (Torch, true, true, true) => self.torch::<S, true, true, true>(s, rows, g),
        }
    }
}

impl SgdRule {
    /// Keras: `w −= δ·w` (if δ ≠ 0); then `w −= g·η`, or
    /// `v = v·μ − g·η; w += v` (Nesterov: `w += v·μ − g·η`).
    #[inline(always)]
    fn keras<S: Simd, const MOMENTUM: bool, const NESTEROV: bool, const DECAY: bool>(
        &self,
        s: S,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
    ) {
        let (lr, mu, decay) = (
            s.splat(self.lr),
            s.splat(self.momentum),
            s.splat(self.decay),
        );
        with_momentum::<S, MOMENTUM>(
            s,
            rows,
            g,
            #[inline(always)]
            |mut wv, vv, gv| {
                if DECAY {
                    wv = s.sub(wv, s.mul(wv, decay));
                }
                let step = s.mul(gv, lr);
                if !MOMENTUM {
                    return [s.sub(wv, step), vv];
                }
                let vv = s.sub(s.mul(vv, mu), step);
                if NESTEROV {
                    [s.add(wv, s.sub(s.mul(vv, mu), step)), vv]
                } else {
                    [s.add(wv, vv), vv]
                }
            },
        );
    }

    /// Torch: `d = g + λ·w` (if λ ≠ 0); `b = b·μ + d` and `d = b`
    /// (Nesterov: `d = d + μ·b`); `w −= η·d`.
    #[inline(always)]
    fn torch<S: Simd, const MOMENTUM: bool, const NESTEROV: bool, const DECAY: bool>(
        &self,
        s: S,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
    ) {
        let (lr, mu, wd) = (
            s.splat(self.lr),
            s.splat(self.momentum),
            s.splat(self.weight_decay),
        );
        with_momentum::<S, MOMENTUM>(
            s,
            rows,
            g,
            #[inline(always)]
            |wv, mut bv, mut d| {
                if DECAY {
                    d = s.add(d, s.mul(wd, wv));
                }
                if MOMENTUM {
                    bv = s.add(s.mul(bv, mu), d);
                    d = if NESTEROV {
                        s.add(d, s.mul(mu, bv))
                    } else {
                        bv
                    };
                }
                [s.sub(wv, s.mul(lr, d)), bv]
            },
        );
    }
}

/// Maps every vector of the row through `lane(w, v, g) -> [w, v]`, where
/// `v` is the momentum row's vector with `MOMENTUM` (stored back), else
/// zero (and the returned one dropped).
#[inline(always)]
fn with_momentum<S: Simd, const MOMENTUM: bool>(
    s: S,
    rows: RowSet<'_>,
    g: &impl GradRow<S>,
    lane: impl Fn(S::V, S::V, S::V) -> [S::V; 2],
) {
    if MOMENTUM {
        map_vectors(
            s,
            rows.take::<2>(),
            g,
            #[inline(always)]
            |[wv, vv], gv| lane(wv, vv, gv),
        );
    } else {
        let zero = s.splat(0.0);
        map_vectors(
            s,
            rows.take::<1>(),
            g,
            #[inline(always)]
            |[wv], gv| [lane(wv, zero, gv)[0]],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        let k = SgdConfig::keras();
        assert_eq!(
            (k.lr, k.momentum, k.nesterov, k.weight_decay),
            (0.01, 0.0, false, 0.0)
        );
        assert_eq!(SgdConfig::default(), k);
        let t = SgdConfig::torch();
        assert_eq!((t.lr, t.style), (1e-3, SgdStyle::Torch));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = [
            (
                SgdConfig {
                    lr: 0.0,
                    ..Default::default()
                },
                "lr",
            ),
            (
                SgdConfig {
                    lr: f32::NAN,
                    ..Default::default()
                },
                "lr",
            ),
            (
                SgdConfig {
                    momentum: -0.1,
                    ..Default::default()
                },
                "momentum",
            ),
            (
                SgdConfig {
                    momentum: f32::NAN,
                    ..Default::default()
                },
                "momentum",
            ),
            (
                SgdConfig {
                    weight_decay: -1.0,
                    ..Default::default()
                },
                "weight_decay",
            ),
            (
                SgdConfig {
                    lr: 1.0,
                    weight_decay: 1.0,
                    ..Default::default()
                },
                "weight_decay",
            ),
        ];
        for (cfg, want) in bad {
            match cfg.validate() {
                Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, want),
                other => panic!("{cfg:?}: {other:?}"),
            }
        }
    }
}
