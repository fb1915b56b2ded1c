//! RMSprop, plain or centred, with optional momentum.

use super::config::{self, Fields, bool_code, eps_code, named, semantics_code};
use super::engine::{Config, Core, GradRow, RowSet, Rule, map_vectors};
use super::linear::Map;
use super::{EpsPlacement, Semantics};
use crate::Result;
use crate::kernels::Simd;

/// The settings of [`RmsProp`]. `Default` is Keras 3's (= [`keras`](Self::keras)).
///
/// # Examples
/// ```
/// use embtable::{EpsPlacement, RmsPropConfig};
/// let keras = RmsPropConfig::default();
/// assert_eq!((keras.lr, keras.rho, keras.epsilon), (1e-3, 0.9, 1e-7));
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
    /// What happens to rows absent from a batch (the moving averages and
    /// the momentum change them under [`Semantics::DenseExact`]).
    pub semantics: Semantics,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        Self::keras()
    }
}

impl RmsPropConfig {
    /// Keras 3's defaults: lr 0.001, ρ 0.9, no momentum, ε 1e-7 inside the
    /// root, not centred, lazy.
    pub fn keras() -> Self {
        Self {
            lr: 1e-3,
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-7,
            centered: false,
            eps_placement: EpsPlacement::InsideSqrt,
            semantics: Semantics::Lazy,
        }
    }

    /// PyTorch's defaults: lr 0.01, ρ (`alpha`) 0.99, no momentum, ε 1e-8
    /// outside the root, not centred, lazy.
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
    /// or `rho` or `momentum` is outside `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        config::positive("lr", self.lr)?;
        config::unit("rho", self.rho)?;
        config::unit("momentum", self.momentum)?;
        config::positive("epsilon", self.epsilon)
    }
}

/// RMSprop over the rows of a sparse gradient ([`RmsPropConfig`]).
///
/// For a row with summed gradient `g` (η lr, ρ rho, μ momentum):
///
/// ```text
/// s = ρ·s + (1−ρ)·g²                       "square_avg"
/// centred: m = ρ·m + (1−ρ)·g; d = s − m²   "grad_avg"
/// else:    d = s
/// Δ = η·g / √(d + ε)     (EpsPlacement::OutsideSqrt: η·g / (√d + ε))
/// momentum: b = μ·b + Δ; w −= b            "momentum"
/// else:     w −= Δ
/// ```
///
/// This is Keras 3's RMSprop (and TensorFlow's `ApplyRMSProp`). PyTorch
/// keeps `η` out of its momentum buffer (`b' = μ·b' + g/(√d+ε); w −= η·b'`):
/// with a constant learning rate that is the same update, and our `b` is
/// `η·b'`.
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

impl RmsProp {
    /// An optimizer with `config` (checked on every step).
    pub fn new(config: RmsPropConfig) -> Self {
        Self {
            config,
            core: Core::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &RmsPropConfig {
        &self.config
    }
}

super::sparse_optimizer_impl!(RmsProp);

/// [`RmsPropConfig`] with its scalars precomputed.
pub(crate) struct RmsPropRule {
    lr: f32,
    rho: f32,
    /// `1 − ρ`.
    one_minus_rho: f32,
    momentum: f32,
    epsilon: f32,
    centered: bool,
    outside: bool,
    dense_exact: bool,
    arrays: &'static [(&'static str, f32)],
}

impl Config for RmsPropConfig {
    type Rule = RmsPropRule;
    const KIND: &'static str = "rmsprop";
    const FIELDS: &'static [&'static str] = &[
        "lr",
        "rho",
        "momentum",
        "epsilon",
        "centered",
        "eps_placement",
        "semantics",
    ];

    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn rule(&self) -> RmsPropRule {
        const S: (&str, f32) = ("square_avg", 0.0);
        const M: (&str, f32) = ("grad_avg", 0.0);
        const B: (&str, f32) = ("momentum", 0.0);
        RmsPropRule {
            lr: self.lr,
            rho: self.rho,
            one_minus_rho: 1.0 - self.rho,
            momentum: self.momentum,
            epsilon: self.epsilon,
            centered: self.centered,
            outside: self.eps_placement == EpsPlacement::OutsideSqrt,
            dense_exact: self.semantics == Semantics::DenseExact,
            arrays: match (self.centered, self.momentum > 0.0) {
                (false, false) => &[S],
                (true, false) => &[S, M],
                (false, true) => &[S, B],
                (true, true) => &[S, M, B],
            },
        }
    }

    fn to_fields(&self) -> Vec<(String, f64)> {
        named(&[
            ("lr", self.lr as f64),
            ("rho", self.rho as f64),
            ("momentum", self.momentum as f64),
            ("epsilon", self.epsilon as f64),
            ("centered", bool_code(self.centered)),
            ("eps_placement", eps_code(self.eps_placement)),
            ("semantics", semantics_code(self.semantics)),
        ])
    }

    fn from_fields(f: &Fields<'_>) -> Result<Self> {
        Ok(Self {
            lr: f.f32("lr")?,
            rho: f.f32("rho")?,
            momentum: f.f32("momentum")?,
            epsilon: f.f32("epsilon")?,
            centered: f.bool("centered")?,
            eps_placement: f.eps_placement("eps_placement")?,
            semantics: f.semantics("semantics")?,
        })
    }
}

impl Rule for RmsPropRule {
    fn arrays(&self) -> &[(&'static str, f32)] {
        self.arrays
    }

    fn dense_exact(&self) -> bool {
        self.dense_exact
    }

    /// With `g = 0`: `s ← ρs`, `m ← ρm`, `Δ = 0`, so `b ← μb` and
    /// `w ← w − μb` (without momentum `w` stays).
    fn zero_grad_map(&self) -> Map {
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
    fn update<S: Simd>(&self, s: S, rows: RowSet<'_>, g: &impl GradRow<S>, _dim: usize) {
        match (self.centered, self.momentum > 0.0, self.outside) {
            (false, false, false) => self.body::<S, false, false, false>(s, rows, g),
            (false, false, true) => self.body::<S, false, false, true>(s, rows, g),
            (false, true, false) => self.body::<S, false, true, false>(s, rows, g),
            (false, true, true) => self.body::<S, false, true, true>(s, rows, g),
            (true, false, false) => self.body::<S, true, false, false>(s, rows, g),
            (true, false, true) => self.body::<S, true, false, true>(s, rows, g),
            (true, true, false) => self.body::<S, true, true, false>(s, rows, g),
            (true, true, true) => self.body::<S, true, true, true>(s, rows, g),
        }
    }
}

impl RmsPropRule {
    /// The update of [`RmsProp`]'s docs.
    #[inline(always)]
    fn body<S: Simd, const CENTERED: bool, const MOMENTUM: bool, const OUTSIDE: bool>(
        &self,
        s: S,
        rows: RowSet<'_>,
        g: &impl GradRow<S>,
    ) {
        // The arrays after `square_avg` are [grad_avg][momentum], each if enabled.
        let z = s.splat(0.0);
        let lane = Lane::<S, CENTERED, MOMENTUM, OUTSIDE>::new(self, s);
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
struct Lane<S: Simd, const CENTERED: bool, const MOMENTUM: bool, const OUTSIDE: bool> {
    s: S,
    lr: S::V,
    rho: S::V,
    one_minus_rho: S::V,
    momentum: S::V,
    epsilon: S::V,
}

impl<S: Simd, const CENTERED: bool, const MOMENTUM: bool, const OUTSIDE: bool>
    Lane<S, CENTERED, MOMENTUM, OUTSIDE>
{
    #[inline(always)]
    fn new(rule: &RmsPropRule, s: S) -> Self {
        Self {
            s,
            lr: s.splat(rule.lr),
            rho: s.splat(rule.rho),
            one_minus_rho: s.splat(rule.one_minus_rho),
            momentum: s.splat(rule.momentum),
            epsilon: s.splat(rule.epsilon),
        }
    }

    /// `(w, square_avg, grad_avg, momentum)` after a step with gradient
    /// `g`; the last two are passed through unless enabled.
    #[inline(always)]
    fn apply(&self, [w, sq, m, b]: [S::V; 4], g: S::V) -> [S::V; 4] {
        let s = self.s;
        let (rho, omr) = (self.rho, self.one_minus_rho);
        let sq = s.add(s.mul(rho, sq), s.mul(omr, s.mul(g, g)));
        let (m, d) = if CENTERED {
            let m = s.add(s.mul(rho, m), s.mul(omr, g));
            (m, s.sub(sq, s.mul(m, m)))
        } else {
            (m, sq)
        };
        let den = if OUTSIDE {
            s.add(s.sqrt(d), self.epsilon)
        } else {
            s.sqrt(s.add(d, self.epsilon))
        };
        let delta = s.div(s.mul(self.lr, g), den);
        if MOMENTUM {
            let b = s.add(s.mul(self.momentum, b), delta);
            [s.sub(w, b), sq, m, b]
        } else {
            [s.sub(w, delta), sq, m, b]
        }
    }
}
