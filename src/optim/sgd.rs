//! Stochastic gradient descent, with momentum, Nesterov momentum and weight
//! decay, in the Keras 3 or the PyTorch formulation.

use super::Semantics;
use super::config::{self, Choice, Visit};
use super::engine::{
    Config, Core, GradRow, Missed, RowSet, Rule, StateSpec, map_vectors, saturate,
};
use super::linear::Map;
use crate::Result;
use crate::kernels::Simd;

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

impl Choice for SgdStyle {
    const ALL: &'static [Self] = &[SgdStyle::Keras, SgdStyle::Torch];
    fn same(self, other: Self) -> bool {
        self == other
    }
}

/// The settings of [`Sgd`]. `Default` is Keras 3's (= [`keras`](Self::keras)).
///
/// # Examples
/// ```
/// use embtable::{Semantics, SgdConfig, SgdStyle};
/// let cfg = SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, ..SgdConfig::default() };
/// assert_eq!((cfg.style, cfg.semantics), (SgdStyle::Keras, Semantics::DenseExact));
/// assert!(cfg.validate().is_ok());
/// assert!(SgdConfig { momentum: 1.0, ..cfg }.validate().is_err());
/// assert_eq!(SgdConfig::torch().lr, 1e-3);
/// assert_eq!(SgdConfig::keras_lazy().semantics, Semantics::Lazy);
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
    /// What happens to rows absent from a batch: momentum and weight decay
    /// move them under [`Semantics::DenseExact`] (without either, both
    /// semantics agree and cost the same).
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
    /// Keras 3's defaults: lr 0.01, no momentum, no weight decay, Keras
    /// style, dense-exact (what Keras' dense SGD computes: with momentum or
    /// weight decay, rows absent from a batch still move).
    pub fn keras() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            semantics: Semantics::DenseExact,
            style: SgdStyle::Keras,
        }
    }

    /// Keras' formulas and defaults with [`Semantics::Lazy`]: what
    /// TensorFlow's sparse ops (`ResourceSparseApplyKerasMomentum`, tf.keras 2
    /// on `IndexedSlices`) compute, rows absent from a batch untouched.
    pub fn keras_lazy() -> Self {
        Self {
            semantics: Semantics::Lazy,
            ..Self::keras()
        }
    }

    /// PyTorch's defaults: lr 1e-3, no momentum, no weight decay, Torch style
    /// (`b = μb + g; w −= η·b`, coupled weight decay), dense-exact: PyTorch's
    /// SGD keeps a momentum buffer for every row it ever touched and adds it
    /// at every step, even from a sparse gradient, and weight decay makes
    /// the gradient dense.
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
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the field and its value if `lr` is
    /// not positive and finite, `momentum` is outside `[0, 1)`,
    /// `weight_decay` is negative or not finite, or `lr * weight_decay >= 1`
    /// (a decay step would flip the sign of the weights).
    pub fn validate(&self) -> Result<()> {
        config::positive("lr", self.lr)?;
        config::unit("momentum", self.momentum)?;
        config::non_negative("weight_decay", self.weight_decay)?;
        config::decay_below_one(self.lr, self.weight_decay)
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

super::sparse_optimizer!(Sgd, SgdConfig);

/// [`SgdConfig`] as its rule.
pub(crate) struct SgdRule {
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
    style: SgdStyle,
    arrays: &'static [StateSpec],
}

/// The scalars of one SGD step.
#[derive(Clone, Copy)]
pub(crate) struct SgdStep {
    lr: f32,
    /// `lr * weight_decay`: the decoupled (Keras) decay factor.
    decay: f32,
}

impl Config for SgdConfig {
    type Rule = SgdRule;
    const KIND: &'static str = "sgd";

    fn fields(&mut self, v: &mut impl Visit) {
        v.f32("lr", &mut self.lr);
        v.f32("momentum", &mut self.momentum);
        v.choice("nesterov", &mut self.nesterov);
        v.f32("weight_decay", &mut self.weight_decay);
        v.choice("semantics", &mut self.semantics);
        v.choice("style", &mut self.style);
    }

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> SgdRule {
        const MOMENTUM: StateSpec = StateSpec::signed("momentum");
        SgdRule {
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            style: self.style,
            arrays: if self.momentum > 0.0 {
                &[MOMENTUM]
            } else {
                &[]
            },
        }
    }

    fn lr_mut(&mut self) -> &mut f32 {
        &mut self.lr
    }

    fn semantics(&self) -> Semantics {
        self.semantics
    }
}

impl Rule for SgdRule {
    type Step = SgdStep;

    fn arrays(&self) -> &[StateSpec] {
        self.arrays
    }

    fn missed(&self) -> Missed {
        if self.arrays.is_empty() && self.weight_decay == 0.0 {
            Missed::Nothing
        } else {
            Missed::Linear
        }
    }

    fn step(&self, _t: u64, lr: f32) -> SgdStep {
        SgdStep {
            lr,
            decay: lr * self.weight_decay,
        }
    }

    /// With `g = 0` (η lr, μ momentum, λ weight decay, δ = ηλ as rounded):
    /// Keras `w ← (1−δ)w + μv` (Nesterov `+ μ²v`), `v ← μv`;
    /// Torch `w ← (1−ηλ)w − ημb` (Nesterov `(1−ηλ(1+μ))w − ημ²b`), `b ← λw + μb`.
    fn zero_grad_map(&self, lr: f32) -> Map {
        let (mu, wd) = (self.momentum as f64, self.weight_decay as f64);
        let decay = (lr * self.weight_decay) as f64;
        let lr = lr as f64;
        let mut map = Map::identity(1 + self.arrays.len());
        let has_momentum = !self.arrays.is_empty();
        match self.style {
            SgdStyle::Keras => {
                map.set(0, 0, 1.0 - decay);
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
    fn update<S: Simd>(
        &self,
        s: S,
        step: &SgdStep,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
        _dim: usize,
    ) {
        use SgdStyle::{Keras, Torch};
        let momentum = !self.arrays.is_empty();
        let decay = match self.style {
            Keras => step.decay != 0.0,
            Torch => self.weight_decay != 0.0,
        };
        // One loop per combination of settings: a branch on a setting inside
        // the loop kept fewer row misses in flight (W5 SGD step 3 ms slower).
        match (self.style, momentum, self.nesterov, decay) {
            (Keras, false, _, false) => self.keras::<S, false, false, false>(s, step, rows, g),
            (Keras, false, _, true) => self.keras::<S, false, false, true>(s, step, rows, g),
            (Keras, true, false, false) => self.keras::<S, true, false, false>(s, step, rows, g),
            (Keras, true, false, true) => self.keras::<S, true, false, true>(s, step, rows, g),
            (Keras, true, true, false) => self.keras::<S, true, true, false>(s, step, rows, g),
            (Keras, true, true, true) => self.keras::<S, true, true, true>(s, step, rows, g),
            (Torch, false, _, false) => self.torch::<S, false, false, false>(s, step, rows, g),
            (Torch, false, _, true) => self.torch::<S, false, false, true>(s, step, rows, g),
            (Torch, true, false, false) => self.torch::<S, true, false, false>(s, step, rows, g),
            (Torch, true, false, true) => self.torch::<S, true, false, true>(s, step, rows, g),
            (Torch, true, true, false) => self.torch::<S, true, true, false>(s, step, rows, g),
            (Torch, true, true, true) => self.torch::<S, true, true, true>(s, step, rows, g),
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
        step: &SgdStep,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
    ) {
        let (lr, mu, decay) = (
            s.splat(step.lr),
            s.splat(self.momentum),
            s.splat(step.decay),
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
                    return [saturate(s, s.sub(wv, step)), vv];
                }
                let vv = saturate(s, s.sub(s.mul(vv, mu), step));
                if NESTEROV {
                    [saturate(s, s.add(wv, s.sub(s.mul(vv, mu), step))), vv]
                } else {
                    [saturate(s, s.add(wv, vv)), vv]
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
        step: &SgdStep,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
    ) {
        let (lr, mu, wd) = (
            s.splat(step.lr),
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
                    bv = saturate(s, s.add(s.mul(bv, mu), d));
                    d = if NESTEROV {
                        s.add(d, s.mul(mu, bv))
                    } else {
                        bv
                    };
                }
                [saturate(s, s.sub(wv, s.mul(lr, d))), bv]
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
                Err(crate::Error::InvalidConfig { field, .. }) => assert_eq!(field, want),
                other => panic!("{cfg:?}: {other:?}"),
            }
        }
    }
}
