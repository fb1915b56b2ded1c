//! RMSprop, plain or centred, with optional momentum.

use super::config::{self, Visit};
use super::engine::{
    Config, Core, GradRow, Missed, RowSet, Rule, StateSpec, map_vectors, saturate, saturate_up,
};
use super::linear::Map;
use super::{EpsPlacement, Semantics};
use crate::Result;
use crate::kernels::Simd;

/// The settings of [`RmsProp`]. `Default` is Keras 3's (= [`keras`](Self::keras)).
///
/// # Examples
/// ```
/// use embtable::{EpsPlacement, RmsPropConfig};
/// use embtable::Semantics;
/// let keras = RmsPropConfig::default();
/// assert_eq!((keras.lr, keras.rho, keras.epsilon), (1e-3, 0.9, 1e-7));
/// assert_eq!(keras.semantics, Semantics::DenseExact);
/// let torch = RmsPropConfig::torch();
/// assert_eq!((torch.lr, torch.rho, torch.eps_placement), (1e-2, 0.99, EpsPlacement::OutsideSqrt));
/// assert!(RmsPropConfig { rho: 1.0, ..keras }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsPropConfig {
    /// Learning rate η, `> 0`. Keras: 0.001.
    pub lr: f32,
    /// Decay ρ of the moving averages, in `[0, 1)` (PyTorch's `alpha`). Keras: 0.9.
    pub rho: f32,
    /// Momentum μ in `[0, 1)`; 0 keeps no momentum state. Keras: 0.
    pub momentum: f32,
    /// ε, `> 0`, placed as [`eps_placement`](Self::eps_placement) says. Keras: 1e-7.
    pub epsilon: f32,
    /// Divide by the centred second moment `s − m²` (keeps the mean gradient `m`).
    pub centered: bool,
    /// `√(d + ε)` (Keras) or `√d + ε` (PyTorch).
    pub eps_placement: EpsPlacement,
    /// Weight decay λ `>= 0`, PyTorch's coupled form: the gradient becomes
    /// `g + λ·w` before anything else. 0: none. (Keras' `weight_decay`
    /// argument is decoupled, `w −= ηλ·w`; [`AdamW`](crate::AdamW) has it.)
    pub weight_decay: f32,
    /// What happens to rows absent from a batch (the moving averages and
    /// the momentum change them under [`Semantics::DenseExact`], and weight
    /// decay gives them a gradient).
    pub semantics: Semantics,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        Self::keras()
    }
}

impl RmsPropConfig {
    /// Keras 3's defaults: lr 0.001, ρ 0.9, no momentum, ε 1e-7 inside the
    /// root, not centred, no weight decay, dense-exact (Keras' dense RMSprop
    /// decays every row's averages at every step).
    pub fn keras() -> Self {
        Self {
            lr: 1e-3,
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-7,
            centered: false,
            eps_placement: EpsPlacement::InsideSqrt,
            weight_decay: 0.0,
            semantics: Semantics::DenseExact,
        }
    }

    /// Keras' formulas and defaults with [`Semantics::Lazy`]: what
    /// TensorFlow's sparse `ResourceSparseApplyRMSProp` computes, rows
    /// absent from a batch untouched.
    pub fn keras_lazy() -> Self {
        Self {
            semantics: Semantics::Lazy,
            ..Self::keras()
        }
    }

    /// PyTorch's defaults: lr 0.01, ρ (`alpha`) 0.99, no momentum, ε 1e-8
    /// outside the root, not centred, no weight decay, dense-exact (PyTorch's
    /// RMSprop takes dense gradients only).
    pub fn torch() -> Self {
        Self {
            lr: 1e-2,
            rho: 0.99,
            epsilon: 1e-8,
            eps_placement: EpsPlacement::OutsideSqrt,
            ..Self::keras()
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the
    /// field and its value if `lr` or `epsilon` is not positive and finite,
    /// `rho` or `momentum` is outside `[0, 1)`, or `weight_decay` is
    /// negative or not finite.
    pub fn validate(&self) -> Result<()> {
        config::positive("lr", self.lr)?;
        config::unit("rho", self.rho)?;
        config::unit("momentum", self.momentum)?;
        config::positive("epsilon", self.epsilon)?;
        config::non_negative("weight_decay", self.weight_decay)
    }
}

/// RMSprop over the rows of a sparse gradient ([`RmsPropConfig`]).
///
/// For a row with summed gradient `g` (η lr, ρ rho, μ momentum):
///
/// ```text
/// weight decay: g = g + λ·w
/// s = ρ·s + (1−ρ)·g²                       "square_avg"
/// centred: m = ρ·m + (1−ρ)·g; d = max(s − m², 0)   "grad_avg"
/// else:    d = s
/// Δ = η·g / √(d + ε)     (EpsPlacement::OutsideSqrt: η·g / (√d + ε))
/// momentum: b = μ·b + Δ; w −= b            "momentum"
/// else:     w −= Δ
/// ```
///
/// This is Keras 3's RMSprop (and TensorFlow's `ApplyRMSProp`). PyTorch
/// keeps `η` out of its momentum buffer (`b' = μ·b' + g/(√d+ε); w −= η·b'`):
/// with a constant learning rate that is the same update, and our `b` is
/// `η·b'` (after [`set_lr`](crate::SparseOptimizer::set_lr) the two differ
/// by the old rate in the buffer).
///
/// The centred variance `s − m²` is never negative in exact arithmetic,
/// but rounding can make it so when the gradient barely varies; Keras and
/// PyTorch then take the root of a negative number and store NaN. Here it
/// is clamped at 0, so the result is finite (the same as theirs whenever
/// theirs is).
///
/// State: `"square_avg"`, then `"grad_avg"` if centred, then `"momentum"`
/// if `momentum > 0`, each `rows × dim`, zero at the start.
///
/// # Examples
/// ```
/// use embtable::{EmbeddingTable, RmsProp, RmsPropConfig, SparseGrad, SparseOptimizer};
/// let mut table = EmbeddingTable::from_rows(2, 1, &[1., 1.])?;
/// let mut grad = SparseGrad::new(1);
/// grad.accumulate_lookup(&[0u32], &[2.0])?;
/// let mut opt = RmsProp::new(RmsPropConfig { lr: 0.1, rho: 0.75, ..RmsPropConfig::default() });
/// opt.step(&mut table, &grad)?;
/// // s = 0.25 · 4 = 1, so w = 1 − 0.1 · 2 / √(1 + 1e-7)
/// assert!((table.row(0)[0] - 0.8).abs() < 1e-6);
/// assert_eq!(table.row(1), &[1.0]);
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct RmsProp {
    config: RmsPropConfig,
    core: Core,
}

super::sparse_optimizer!(RmsProp, RmsPropConfig);

/// [`RmsPropConfig`] as its rule.
pub(crate) struct RmsPropRule {
    rho: f32,
    /// `1 − ρ`.
    one_minus_rho: f32,
    momentum: f32,
    epsilon: f32,
    weight_decay: f32,
    centered: bool,
    outside: bool,
    arrays: &'static [StateSpec],
}

impl Config for RmsPropConfig {
    type Rule = RmsPropRule;
    const KIND: &'static str = "rmsprop";
    const ADDED: &'static [(&'static str, f64)] = &[("weight_decay", 0.0)];

    fn fields(&mut self, v: &mut impl Visit) {
        v.f32("lr", &mut self.lr);
        v.f32("rho", &mut self.rho);
        v.f32("momentum", &mut self.momentum);
        v.f32("epsilon", &mut self.epsilon);
        v.choice("centered", &mut self.centered);
        v.choice("eps_placement", &mut self.eps_placement);
        v.f32("weight_decay", &mut self.weight_decay);
        v.choice("semantics", &mut self.semantics);
    }

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> RmsPropRule {
        const S: StateSpec = StateSpec::at_least("square_avg", 0.0, 0.0);
        const M: StateSpec = StateSpec::signed("grad_avg");
        const B: StateSpec = StateSpec::signed("momentum");
        RmsPropRule {
            rho: self.rho,
            one_minus_rho: 1.0 - self.rho,
            momentum: self.momentum,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            centered: self.centered,
            outside: self.eps_placement == EpsPlacement::OutsideSqrt,
            arrays: match (self.centered, self.momentum > 0.0) {
                (false, false) => &[S],
                (true, false) => &[S, M],
                (false, true) => &[S, B],
                (true, true) => &[S, M, B],
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

impl Rule for RmsPropRule {
    /// The learning rate.
    type Step = f32;

    fn arrays(&self) -> &[StateSpec] {
        self.arrays
    }

    /// Weight decay gives an absent row the gradient `λ·w`, which the
    /// square root makes non-linear: replayed. Otherwise a linear map.
    fn missed(&self) -> Missed {
        if self.weight_decay > 0.0 {
            Missed::Replay(None)
        } else {
            Missed::Linear
        }
    }

    fn step(&self, _t: u64, lr: f32) -> f32 {
        lr
    }

    /// With `g = 0`: `s ← ρs`, `m ← ρm`, `Δ = 0`, so `b ← μb` and
    /// `w ← w − μb` (without momentum `w` stays).
    fn zero_grad_map(&self, _lr: f32) -> Map {
        let n = 1 + self.arrays.len();
        let mut map = Map::identity(n);
        let rho = self.rho as f64;
        map.set(1, 1, rho);
        if self.centered {
            map.set(2, 2, rho);
        }
        if self.momentum > 0.0 {
            let mu = self.momentum as f64;
            let b = n - 1;
            map.set(b, b, mu);
            map.set(0, b, -mu);
        }
        map
    }

    #[inline(always)]
    fn update<S: Simd>(&self, s: S, lr: &f32, rows: RowSet<'_>, g: &impl GradRow<S>, _dim: usize) {
        let lr = *lr;
        match (self.centered, self.momentum > 0.0) {
            (false, false) => self.body::<S, false, false>(s, lr, rows, g),
            (false, true) => self.body::<S, false, true>(s, lr, rows, g),
            (true, false) => self.body::<S, true, false>(s, lr, rows, g),
            (true, true) => self.body::<S, true, true>(s, lr, rows, g),
        }
    }
}

impl RmsPropRule {
    /// The update of [`RmsProp`]'s docs.
    #[inline(always)]
    fn body<S: Simd, const CENTERED: bool, const MOMENTUM: bool>(
        &self,
        s: S,
        lr: f32,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
    ) {
        // The arrays after `square_avg` are [grad_avg][momentum], each if enabled.
        let z = s.splat(0.0);
        let lane = Lane::<S, CENTERED, MOMENTUM>::new(self, s, lr);
        match (CENTERED, MOMENTUM) {
            (false, false) => map_vectors(
                s,
                rows.take::<2>(),
                g,
                #[inline(always)]
                |[w, q], gv| {
                    let [w, q, _, _] = lane.apply([w, q, z, z], gv);
                    [w, q]
                },
            ),
            (true, false) => map_vectors(
                s,
                rows.take::<3>(),
                g,
                #[inline(always)]
                |[w, q, m], gv| {
                    let [w, q, m, _] = lane.apply([w, q, m, z], gv);
                    [w, q, m]
                },
            ),
            (false, true) => map_vectors(
                s,
                rows.take::<3>(),
                g,
                #[inline(always)]
                |[w, q, b], gv| {
                    let [w, q, _, b] = lane.apply([w, q, z, b], gv);
                    [w, q, b]
                },
            ),
            (true, true) => map_vectors(
                s,
                rows.take::<4>(),
                g,
                #[inline(always)]
                |x, gv| lane.apply(x, gv),
            ),
        }
    }
}

/// [`RmsPropRule`]'s update of one vector, its scalars splatted.
///
/// A method rather than a closure shared by the four arms: a closure bound
/// with `let` cannot be marked `#[inline(always)]`, and left out of line,
/// outside the tier's `#[target_feature]` body, its every vector operation
/// became a call (W5 RMSprop step 5x slower).
struct Lane<S: Simd, const CENTERED: bool, const MOMENTUM: bool> {
    s: S,
    lr: S::V,
    rho: S::V,
    one_minus_rho: S::V,
    momentum: S::V,
    /// ε under the root (`InsideSqrt`) or 0.
    eps_in: S::V,
    /// ε after the root (`OutsideSqrt`) or 0.
    eps_out: S::V,
    weight_decay: S::V,
}

impl<S: Simd, const CENTERED: bool, const MOMENTUM: bool> Lane<S, CENTERED, MOMENTUM> {
    #[inline(always)]
    fn new(rule: &RmsPropRule, s: S, lr: f32) -> Self {
        Self {
            s,
            lr: s.splat(lr),
            rho: s.splat(rule.rho),
            one_minus_rho: s.splat(rule.one_minus_rho),
            momentum: s.splat(rule.momentum),
            eps_in: s.splat(if rule.outside { 0.0 } else { rule.epsilon }),
            eps_out: s.splat(if rule.outside { rule.epsilon } else { 0.0 }),
            weight_decay: s.splat(rule.weight_decay),
        }
    }

    /// `(w, square_avg, grad_avg, momentum)` after a step with gradient
    /// `g`; the last two are passed through unless enabled.
    ///
    /// Weight decay is added to the gradient, and ε both under and after the
    /// root (one of them 0), whatever the settings: `g + 0·w` is `g` bit for
    /// bit (`w` is finite and `g` never `-0.0`), as are `d + 0` and
    /// `√x + 0` (`d`, `√x` are never `-0.0`); a compiled body per setting
    /// would double the bodies for each.
    #[inline(always)]
    fn apply(&self, [w, sq, m, b]: [S::V; 4], g: S::V) -> [S::V; 4] {
        let s = self.s;
        let (rho, omr) = (self.rho, self.one_minus_rho);
        let g = s.add(g, s.mul(self.weight_decay, w));
        let sq = saturate_up(s, s.add(s.mul(rho, sq), s.mul(omr, s.mul(g, g))));
        let (m, d) = if CENTERED {
            let m = saturate(s, s.add(s.mul(rho, m), s.mul(omr, g)));
            (m, s.max(s.sub(sq, s.mul(m, m)), s.splat(0.0)))
        } else {
            (m, sq)
        };
        let den = s.add(s.sqrt(s.add(d, self.eps_in)), self.eps_out);
        let delta = s.div(s.mul(self.lr, g), den);
        if MOMENTUM {
            let b = saturate(s, s.add(s.mul(self.momentum, b), delta));
            [saturate(s, s.sub(w, b)), sq, m, b]
        } else {
            [saturate(s, s.sub(w, delta)), sq, m, b]
        }
    }
}
