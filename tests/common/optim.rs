//! The optimizers' dense reference, shared by the optimizer tests: plain
//! dense optimizers over full matrices, one loop per formula, fed the
//! dense gradient `onehot(ids)ᵀ · G` every step. Each formula is written
//! with the operations, in the order, that the documentation of the
//! optimizer gives, so results that the design promises bitwise are
//! compared bitwise.

use embtable::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamStyle, AdamW, AdamWConfig, EmbeddingTable,
    EpsPlacement, Ftrl, FtrlConfig, OptimizerState, RmsProp, RmsPropConfig, RowWiseAdagrad,
    RowWiseAdagradConfig, Semantics, Sgd, SgdConfig, SgdStyle, SparseGrad, SparseOptimizer,
};
use proptest::prelude::*;
use workloads::values;

use super::{assert_bits_eq, matmul, onehot, transpose};

/// Relative tolerance where results are not promised bitwise (the linear
/// catch-up rounds once where the dense optimizer rounds once per step).
pub const REL: f32 = 1e-5;

// ---------------------------------------------------------------- configs

/// One optimizer configuration under test.
#[derive(Clone, Copy, Debug)]
pub enum Cfg {
    Sgd(SgdConfig),
    RmsProp(RmsPropConfig),
    Adagrad(AdagradConfig),
    RowWise(RowWiseAdagradConfig),
    Adam(AdamConfig),
    AdamW(AdamWConfig),
    Ftrl(FtrlConfig),
}

impl Cfg {
    pub fn optimizer(&self) -> Box<dyn SparseOptimizer + Send> {
        match *self {
            Cfg::Sgd(c) => Box::new(Sgd::new(c)),
            Cfg::RmsProp(c) => Box::new(RmsProp::new(c)),
            Cfg::Adagrad(c) => Box::new(Adagrad::new(c)),
            Cfg::RowWise(c) => Box::new(RowWiseAdagrad::new(c)),
            Cfg::Adam(c) => Box::new(Adam::new(c)),
            Cfg::AdamW(c) => Box::new(AdamW::new(c)),
            Cfg::Ftrl(c) => Box::new(Ftrl::new(c)),
        }
    }

    pub fn lr(&self) -> f32 {
        match *self {
            Cfg::Sgd(c) => c.lr,
            Cfg::RmsProp(c) => c.lr,
            Cfg::Adagrad(c) => c.lr,
            Cfg::RowWise(c) => c.lr,
            Cfg::Adam(c) => c.lr,
            Cfg::AdamW(c) => c.lr,
            Cfg::Ftrl(c) => c.lr,
        }
    }

    pub fn dense_exact(&self) -> bool {
        let s = match *self {
            Cfg::Sgd(c) => c.semantics,
            Cfg::RmsProp(c) => c.semantics,
            Cfg::Adagrad(c) => c.semantics,
            Cfg::RowWise(_) => Semantics::Lazy,
            Cfg::Adam(c) => c.semantics,
            Cfg::AdamW(c) => c.semantics,
            Cfg::Ftrl(c) => c.semantics,
        };
        s == Semantics::DenseExact
    }

    /// Whether rows catch up missed steps with a linear map's power, which
    /// rounds differently from stepping (SGD with momentum or weight decay,
    /// RMSprop without weight decay, under DenseExact): such results are
    /// compared within [`REL`], every other one bitwise.
    pub fn linear_catch_up(&self) -> bool {
        self.dense_exact()
            && match *self {
                Cfg::Sgd(c) => c.momentum > 0.0 || c.weight_decay > 0.0,
                Cfg::RmsProp(c) => c.weight_decay == 0.0,
                _ => false,
            }
    }
}

pub fn semantics() -> impl Strategy<Value = Semantics> {
    prop_oneof![Just(Semantics::Lazy), Just(Semantics::DenseExact)]
}

pub fn placement() -> impl Strategy<Value = EpsPlacement> {
    prop_oneof![
        Just(EpsPlacement::InsideSqrt),
        Just(EpsPlacement::OutsideSqrt)
    ]
}

/// Off half of the time, else in `range`.
pub fn maybe(range: std::ops::Range<f32>) -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), range]
}

pub fn epsilon() -> impl Strategy<Value = f32> {
    (-8i32..=-2).prop_map(|e| 10f32.powi(e))
}

pub fn sgd() -> impl Strategy<Value = Cfg> {
    (
        0.001f32..0.2,
        maybe(0.1..0.95),
        any::<bool>(),
        maybe(0.001..1.0),
        semantics(),
        prop_oneof![Just(SgdStyle::Keras), Just(SgdStyle::Torch)],
    )
        .prop_map(|(lr, momentum, nesterov, weight_decay, semantics, style)| {
            Cfg::Sgd(SgdConfig {
                lr,
                momentum,
                nesterov,
                weight_decay,
                semantics,
                style,
            })
        })
}

// Adaptive optimizers move every weight by about lr whatever the gradient's
// scale; lr stays small next to the weights (in [-1, 1]) so that rounding
// differences of the update stay below `assert_close`'s absolute floor
// where a weight cancels to near zero.
pub fn rmsprop() -> impl Strategy<Value = Cfg> {
    (
        (0.001f32..0.05, 0.5f32..0.99, maybe(0.1..0.95), epsilon()),
        (any::<bool>(), placement(), maybe(0.001..0.5), semantics()),
    )
        .prop_map(
            |((lr, rho, momentum, epsilon), (centered, eps_placement, weight_decay, semantics))| {
                Cfg::RmsProp(RmsPropConfig {
                    lr,
                    rho,
                    momentum,
                    epsilon,
                    centered,
                    eps_placement,
                    weight_decay,
                    semantics,
                })
            },
        )
}

pub fn adagrad() -> impl Strategy<Value = Cfg> {
    (
        (0.001f32..0.05, maybe(0.01..1.0), epsilon(), placement()),
        (maybe(0.001..0.5), maybe(0.001..0.5), semantics()),
    )
        .prop_map(
            |(
                (lr, initial_accumulator_value, epsilon, eps_placement),
                (lr_decay, weight_decay, semantics),
            )| {
                Cfg::Adagrad(AdagradConfig {
                    lr,
                    initial_accumulator_value,
                    epsilon,
                    eps_placement,
                    lr_decay,
                    weight_decay,
                    semantics,
                })
            },
        )
}

pub fn rowwise() -> impl Strategy<Value = Cfg> {
    (0.001f32..0.05, maybe(0.01..1.0), epsilon()).prop_map(
        |(lr, initial_accumulator_value, epsilon)| {
            Cfg::RowWise(RowWiseAdagradConfig {
                lr,
                initial_accumulator_value,
                epsilon,
            })
        },
    )
}

pub fn adam_style() -> impl Strategy<Value = AdamStyle> {
    prop_oneof![
        Just(AdamStyle::Keras),
        Just(AdamStyle::Torch),
        Just(AdamStyle::TorchSparse)
    ]
}

/// Adam's and AdamW's common fields: (lr, β₁, β₂, ε, amsgrad, λ, style, semantics).
#[allow(clippy::type_complexity)]
fn adam_fields() -> impl Strategy<Value = (f32, f64, f64, f32, bool, f32, AdamStyle, Semantics)> {
    (
        (
            0.001f32..0.05,
            prop_oneof![Just(0.9f64), 0.0f64..0.99],
            prop_oneof![Just(0.999f64), 0.5f64..0.9999],
            epsilon(),
        ),
        (any::<bool>(), maybe(0.001..0.5), adam_style(), semantics()),
    )
        .prop_map(|((a, b, c, d), (e, f, g, h))| (a, b, c, d, e, f, g, h))
}

pub fn adam() -> impl Strategy<Value = Cfg> {
    adam_fields().prop_map(
        |(lr, beta_1, beta_2, epsilon, amsgrad, weight_decay, style, semantics)| {
            Cfg::Adam(AdamConfig {
                lr,
                beta_1,
                beta_2,
                epsilon,
                amsgrad,
                weight_decay,
                style,
                semantics,
            })
        },
    )
}

pub fn adamw() -> impl Strategy<Value = Cfg> {
    adam_fields().prop_map(
        |(lr, beta_1, beta_2, epsilon, amsgrad, weight_decay, style, semantics)| {
            Cfg::AdamW(AdamWConfig {
                lr,
                beta_1,
                beta_2,
                epsilon,
                amsgrad,
                weight_decay,
                style,
                semantics,
            })
        },
    )
}

pub fn ftrl() -> impl Strategy<Value = Cfg> {
    (
        (
            0.01f32..0.5,
            prop_oneof![Just(-0.5f32), Just(0.0f32), -1.0f32..0.0],
            0.01f32..1.0,
            maybe(0.001..0.2),
        ),
        (
            maybe(0.001..0.5),
            maybe(0.001..0.5),
            maybe(0.01..1.0),
            semantics(),
        ),
    )
        .prop_map(
            |(
                (lr, learning_rate_power, initial_accumulator_value, l1),
                (l2, l2_shrinkage, beta, semantics),
            )| {
                Cfg::Ftrl(FtrlConfig {
                    lr,
                    learning_rate_power,
                    initial_accumulator_value,
                    l1_regularization_strength: l1,
                    l2_regularization_strength: l2,
                    l2_shrinkage_regularization_strength: l2_shrinkage,
                    beta,
                    semantics,
                })
            },
        )
}

/// Every optimizer, any settings.
pub fn any_cfg() -> impl Strategy<Value = Cfg> {
    prop_oneof![
        sgd(),
        rmsprop(),
        adagrad(),
        rowwise(),
        adam(),
        adamw(),
        ftrl()
    ]
}

// ---------------------------------------------------------------- the dense reference

/// `x` saturated to `±f32::MAX` as every update stores it (`max` then
/// `min`, with the second operand winning unless the comparison holds).
pub fn sat(x: f32) -> f32 {
    let x = if x > f32::MIN { x } else { f32::MIN };
    if x < f32::MAX { x } else { f32::MAX }
}

/// `x` (never negative) capped at `f32::MAX`.
pub fn sat_up(x: f32) -> f32 {
    if x < f32::MAX { x } else { f32::MAX }
}

/// A dense optimizer: the weights and every state array as full
/// `rows × dim` matrices (row-wise Adagrad: `rows`), updated with plain loops.
pub struct Dense {
    pub cfg: Cfg,
    pub dim: usize,
    /// Named state arrays, as the sparse optimizers export them.
    pub arrays: Vec<(&'static str, Vec<f32>)>,
}

impl Dense {
    pub fn new(cfg: Cfg, rows: usize, dim: usize) -> Self {
        let full = |init: f32| vec![init; rows * dim];
        let adam = |amsgrad: bool| {
            let mut a = vec![("momentum", full(0.0)), ("velocity", full(0.0))];
            if amsgrad {
                a.push(("velocity_hat", full(0.0)));
            }
            a
        };
        let arrays = match cfg {
            Cfg::Sgd(c) if c.momentum > 0.0 => vec![("momentum", full(0.0))],
            Cfg::Sgd(_) => vec![],
            Cfg::RmsProp(c) => {
                let mut a = vec![("square_avg", full(0.0))];
                if c.centered {
                    a.push(("grad_avg", full(0.0)));
                }
                if c.momentum > 0.0 {
                    a.push(("momentum", full(0.0)));
                }
                a
            }
            Cfg::Adagrad(c) => vec![("accumulator", full(c.initial_accumulator_value))],
            Cfg::RowWise(c) => vec![("accumulator", vec![c.initial_accumulator_value; rows])],
            Cfg::Adam(c) => adam(c.amsgrad),
            Cfg::AdamW(c) => adam(c.amsgrad),
            Cfg::Ftrl(c) => vec![
                ("accumulator", full(c.initial_accumulator_value)),
                ("linear", full(0.0)),
            ],
        };
        Self { cfg, dim, arrays }
    }

    pub fn array(&mut self, name: &str) -> &mut Vec<f32> {
        &mut self.arrays.iter_mut().find(|(n, _)| *n == name).unwrap().1
    }

    fn take(&mut self, name: &str) -> Vec<f32> {
        std::mem::take(self.array(name))
    }

    /// Step `t` (from 1) at learning rate `lr` with the dense gradient `g`,
    /// on the rows where `active`.
    pub fn step(&mut self, w: &mut [f32], g: &[f32], active: &[bool], t: u64, lr: f32) {
        let dim = self.dim;
        let elems: Vec<usize> = (0..w.len()).filter(|i| active[i / dim]).collect();
        match self.cfg {
            Cfg::Sgd(c) => self.sgd(c, w, g, &elems, lr),
            Cfg::RmsProp(c) => self.rmsprop(c, w, g, &elems, lr),
            Cfg::Adagrad(c) => {
                let clr = if c.lr_decay == 0.0 {
                    lr
                } else {
                    (lr as f64 / (1.0 + (t - 1) as f64 * c.lr_decay as f64)) as f32
                };
                let a = self.array("accumulator");
                for &i in &elems {
                    let gi = g[i] + c.weight_decay * w[i];
                    a[i] = sat_up(a[i] + gi * gi);
                    let den = match c.eps_placement {
                        EpsPlacement::InsideSqrt => (a[i] + c.epsilon).sqrt(),
                        EpsPlacement::OutsideSqrt => a[i].sqrt() + c.epsilon,
                    };
                    w[i] = sat(w[i] - clr * gi / den);
                }
            }
            Cfg::RowWise(c) => {
                let h = self.array("accumulator");
                for (r, _) in active.iter().enumerate().filter(|(_, a)| **a) {
                    let row = r * dim..(r + 1) * dim;
                    // Column j into partial sum j mod 16, then pairwise.
                    let mut p = [0.0f32; 16];
                    for (j, &x) in g[row.clone()].iter().enumerate() {
                        p[j % 16] += x * x;
                    }
                    let mut half = 8;
                    while half > 0 {
                        for i in 0..half {
                            p[i] += p[i + half];
                        }
                        half /= 2;
                    }
                    h[r] = sat_up(h[r] + p[0] / dim as f32);
                    let factor = lr / (h[r].sqrt() + c.epsilon);
                    for i in row {
                        w[i] = sat(w[i] - factor * g[i]);
                    }
                }
            }
            Cfg::Adam(c) => {
                let parts = (c.beta_1, c.beta_2, c.epsilon, c.amsgrad, c.style);
                let decoupled = c.style == AdamStyle::Keras;
                self.adam(parts, c.weight_decay, decoupled, w, g, &elems, t, lr)
            }
            Cfg::AdamW(c) => {
                let parts = (c.beta_1, c.beta_2, c.epsilon, c.amsgrad, c.style);
                self.adam(parts, c.weight_decay, true, w, g, &elems, t, lr)
            }
            Cfg::Ftrl(c) => self.ftrl(c, w, g, &elems, lr),
        }
    }

    fn sgd(&mut self, c: SgdConfig, w: &mut [f32], g: &[f32], elems: &[usize], lr: f32) {
        let (mu, wd) = (c.momentum, c.weight_decay);
        let mut v = if mu > 0.0 {
            self.take("momentum")
        } else {
            vec![]
        };
        for &i in elems {
            match c.style {
                SgdStyle::Keras => {
                    if lr * wd != 0.0 {
                        w[i] -= w[i] * (lr * wd); // decoupled decay
                    }
                    if mu > 0.0 {
                        v[i] = sat(v[i] * mu - g[i] * lr);
                        if c.nesterov {
                            w[i] = sat(w[i] + (v[i] * mu - g[i] * lr));
                        } else {
                            w[i] = sat(w[i] + v[i]);
                        }
                    } else {
                        w[i] = sat(w[i] - g[i] * lr);
                    }
                }
                SgdStyle::Torch => {
                    let mut d = g[i];
                    if wd != 0.0 {
                        d += wd * w[i]; // coupled decay
                    }
                    if mu > 0.0 {
                        v[i] = sat(v[i] * mu + d);
                        d = if c.nesterov { d + mu * v[i] } else { v[i] };
                    }
                    w[i] = sat(w[i] - lr * d);
                }
            }
        }
        if mu > 0.0 {
            *self.array("momentum") = v;
        }
    }

    fn rmsprop(&mut self, c: RmsPropConfig, w: &mut [f32], g: &[f32], elems: &[usize], lr: f32) {
        let (rho, mu, eps) = (c.rho, c.momentum, c.epsilon);
        let mut s = self.take("square_avg");
        let mut m = if c.centered {
            self.take("grad_avg")
        } else {
            vec![]
        };
        let mut b = if mu > 0.0 {
            self.take("momentum")
        } else {
            vec![]
        };
        for &i in elems {
            let gi = g[i] + c.weight_decay * w[i];
            s[i] = sat_up(rho * s[i] + (1.0 - rho) * (gi * gi));
            let d = if c.centered {
                m[i] = sat(rho * m[i] + (1.0 - rho) * gi);
                let d = s[i] - m[i] * m[i];
                if d > 0.0 { d } else { 0.0 }
            } else {
                s[i]
            };
            let den = match c.eps_placement {
                EpsPlacement::InsideSqrt => (d + eps).sqrt(),
                EpsPlacement::OutsideSqrt => d.sqrt() + eps,
            };
            let delta = lr * gi / den;
            if mu > 0.0 {
                b[i] = sat(mu * b[i] + delta);
                w[i] = sat(w[i] - b[i]);
            } else {
                w[i] = sat(w[i] - delta);
            }
        }
        *self.array("square_avg") = s;
        if c.centered {
            *self.array("grad_avg") = m;
        }
        if mu > 0.0 {
            *self.array("momentum") = b;
        }
    }

    /// Adam as `AdamStyle`'s table gives it.
    #[allow(clippy::too_many_arguments)]
    fn adam(
        &mut self,
        (beta_1, beta_2, eps, amsgrad, style): (f64, f64, f32, bool, AdamStyle),
        wd: f32,
        decoupled: bool,
        w: &mut [f32],
        g: &[f32],
        elems: &[usize],
        t: u64,
        lr: f32,
    ) {
        let (c1, c2) = ((1.0 - beta_1) as f32, (1.0 - beta_2) as f32);
        let (mut m, mut v) = (self.take("momentum"), self.take("velocity"));
        let mut vh = if amsgrad {
            self.take("velocity_hat")
        } else {
            vec![]
        };
        let bias = |beta: f64| 1.0 - beta.powf(t as f64);
        for &i in elems {
            let (mut wi, mut gi) = (w[i], g[i]);
            match style {
                AdamStyle::Keras => {
                    let d = if decoupled { wd } else { 0.0 };
                    wi = wi - wi * d * lr;
                }
                _ => {
                    if decoupled {
                        wi *= (1.0 - lr as f64 * wd as f64) as f32;
                    } else {
                        gi += wd * wi;
                    }
                }
            }
            if style == AdamStyle::Torch {
                m[i] = sat(m[i] + c1 * (gi - m[i]));
                v[i] = sat_up(v[i] * beta_2 as f32 + c2 * gi * gi);
            } else {
                m[i] = sat(m[i] + (gi - m[i]) * c1);
                v[i] = sat_up(v[i] + (gi * gi - v[i]) * c2);
            }
            let vv = if amsgrad {
                vh[i] = vh[i].max(v[i]);
                vh[i]
            } else {
                v[i]
            };
            wi = match style {
                AdamStyle::Keras => {
                    let (tf, b1, b2) = (t as f32, beta_1 as f32, beta_2 as f32);
                    let alpha = lr * (1.0 - b2.powf(tf)).sqrt() / (1.0 - b1.powf(tf));
                    wi - m[i] * alpha / (vv.sqrt() + eps)
                }
                AdamStyle::Torch => {
                    let step_size = (lr as f64 / bias(beta_1)) as f32;
                    let root = bias(beta_2).powf(0.5) as f32;
                    wi - step_size * (m[i] / (vv.sqrt() / root + eps))
                }
                AdamStyle::TorchSparse => {
                    let step_size = (lr as f64 * bias(beta_2).sqrt() / bias(beta_1)) as f32;
                    wi - step_size * (m[i] / (vv.sqrt() + eps))
                }
            };
            w[i] = sat(wi);
        }
        *self.array("momentum") = m;
        *self.array("velocity") = v;
        if amsgrad {
            *self.array("velocity_hat") = vh;
        }
    }

    /// FTRL as Keras 3 computes it.
    fn ftrl(&mut self, c: FtrlConfig, w: &mut [f32], g: &[f32], elems: &[usize], lr: f32) {
        let (mut n, mut z) = (self.take("accumulator"), self.take("linear"));
        let p = -c.learning_rate_power;
        let pow = |x: f32| if p == 0.5 { x.sqrt() } else { x.powf(p) };
        let shrinkage = (2.0 * c.l2_shrinkage_regularization_strength as f64) as f32;
        let two_l2 = 2.0 * (c.l2_regularization_strength + c.beta / (2.0 * lr));
        let l1 = c.l1_regularization_strength;
        for &i in elems {
            let g2 = g[i] + shrinkage * w[i];
            let n_new = sat_up(n[i] + g[i] * g[i]);
            let sigma = (pow(n_new) - pow(n[i])) / lr;
            z[i] = sat(z[i] + (g2 - sigma * w[i]));
            let q = (pow(n_new) / lr + two_l2).max(f32::MIN_POSITIVE);
            let clipped = z[i].max(-l1).min(l1);
            w[i] = sat((clipped - z[i]) / q);
            n[i] = n_new;
        }
        *self.array("accumulator") = n;
        *self.array("linear") = z;
    }
}

// ---------------------------------------------------------------- runs

/// A random run: a table and a few steps, each a batch of ids drawn from a
/// window of the rows (duplicates are common; rows past the window miss
/// the step) with gradients drawn from a seed, and the learning rate
/// scaled by a factor before some steps.
#[derive(Clone, Debug)]
pub struct Run {
    pub rows: usize,
    pub dim: usize,
    pub seed: u64,
    pub steps: Vec<(Vec<usize>, u64)>,
    /// Before step `t`, `set_lr(config lr · lr_scale[t])` if `Some`.
    pub lr_scale: Vec<Option<f32>>,
}

pub fn run(
    rows: std::ops::RangeInclusive<usize>,
    dims: std::ops::RangeInclusive<usize>,
    steps: std::ops::RangeInclusive<usize>,
    max_batch: usize,
) -> impl Strategy<Value = Run> {
    (rows, dims, any::<u64>()).prop_flat_map(move |(rows, dim, seed)| {
        let step = (1..=rows, 0..=max_batch, any::<u64>())
            .prop_flat_map(|(w, n, seed)| (proptest::collection::vec(0..w, n), Just(seed)));
        proptest::collection::vec(step, steps.clone()).prop_map(move |steps| Run {
            rows,
            dim,
            seed,
            lr_scale: vec![None; steps.len()],
            steps,
        })
    })
}

/// [`run`] with the learning rate changed (scaled by 0.25 to 1) before a
/// third of the steps.
pub fn run_with_lr_changes(
    rows: std::ops::RangeInclusive<usize>,
    dims: std::ops::RangeInclusive<usize>,
    steps: std::ops::RangeInclusive<usize>,
    max_batch: usize,
) -> impl Strategy<Value = Run> {
    run(rows, dims, steps, max_batch).prop_flat_map(|run| {
        let n = run.steps.len();
        let change = prop_oneof![2 => Just(None), 1 => (0.25f32..1.0).prop_map(Some)];
        proptest::collection::vec(change, n).prop_map(move |lr_scale| Run {
            lr_scale,
            ..run.clone()
        })
    })
}

impl Run {
    pub fn table(&self) -> EmbeddingTable {
        let init = values(self.seed, self.rows * self.dim, -1.0, 1.0);
        EmbeddingTable::from_rows(self.rows, self.dim, &init).unwrap()
    }

    /// The gradient of step `t`'s lookup output (`ids × dim`).
    pub fn grad_out(&self, t: usize) -> Vec<f32> {
        let (ids, seed) = &self.steps[t];
        values(*seed, ids.len() * self.dim, -1.0, 1.0)
    }

    /// Step `t`'s sparse gradient, alternating u32 and i64 ids.
    pub fn sparse_grad(&self, t: usize) -> SparseGrad {
        let ids = &self.steps[t].0;
        let mut grad = SparseGrad::new(self.dim);
        if t.is_multiple_of(2) {
            let ids: Vec<u32> = ids.iter().map(|&r| r as u32).collect();
            grad.accumulate_lookup(&ids, &self.grad_out(t)).unwrap();
        } else {
            let ids: Vec<i64> = ids.iter().map(|&r| r as i64).collect();
            grad.accumulate_lookup(&ids, &self.grad_out(t)).unwrap();
        }
        grad
    }

    /// Step `t`'s dense gradient, `onehot(ids)ᵀ · G`.
    pub fn dense_grad(&self, t: usize) -> Vec<f32> {
        let ids = &self.steps[t].0;
        let n = ids.len();
        let ot = transpose(&onehot(ids, self.rows), n, self.rows);
        matmul(&ot, &self.grad_out(t), self.rows, n, self.dim)
    }

    pub fn touched(&self, t: usize) -> Vec<bool> {
        let mut touched = vec![false; self.rows];
        for &r in &self.steps[t].0 {
            touched[r] = true;
        }
        touched
    }

    /// The learning rate of step `t` given the config's `base` rate.
    pub fn lr_at(&self, base: f32, t: usize) -> f32 {
        self.lr_scale[..=t]
            .iter()
            .rev()
            .find_map(|s| *s)
            .map_or(base, |s| base * s)
    }

    /// Runs every step sparse and dense, checking after each step; flushes
    /// at the end and checks every row.
    pub fn check_against_dense(&self, cfg: Cfg) {
        let mut table = self.table();
        let mut w = table.to_vec();
        let mut opt = cfg.optimizer();
        let mut dense = Dense::new(cfg, self.rows, self.dim);
        let all = vec![true; self.rows];
        for t in 0..self.steps.len() {
            let lr = self.lr_at(cfg.lr(), t);
            if self.lr_scale[t].is_some() {
                opt.set_lr(lr).unwrap();
            }
            let touched = self.touched(t);
            let (before_w, before_state) = (table.to_vec(), opt.state());
            opt.step(&mut table, &self.sparse_grad(t)).unwrap();
            let active = if cfg.dense_exact() { &all } else { &touched };
            dense.step(&mut w, &self.dense_grad(t), active, t as u64 + 1, lr);
            let after = opt.state();
            assert_eq!(after.steps, t as u64 + 1);
            let what = format!("step {t}");
            compare(
                self,
                cfg,
                &table.to_vec(),
                &w,
                &after,
                &dense,
                &touched,
                &what,
            );
            if !cfg.dense_exact() {
                assert_rows_unchanged(self, &before_w, &table.to_vec(), &touched, "weights");
                for (b, a) in before_state.arrays.iter().zip(&after.arrays) {
                    assert_rows_unchanged(self, &b.values, &a.values, &touched, b.name.as_str());
                }
            }
        }
        opt.flush(&mut table).unwrap();
        let state = opt.state();
        compare(
            self,
            cfg,
            &table.to_vec(),
            &w,
            &state,
            &dense,
            &all,
            "after flush",
        );
        if opt.has_lagging_rows() {
            assert!(state.last_step.iter().all(|&l| l == state.steps));
        } else {
            assert!(state.last_step.is_empty());
        }
        assert!(state.lr_history.is_empty(), "flush forgets earlier rates");
    }
}

/// Compares the rows where `which` of the sparse result with the dense
/// one: bitwise, or within [`REL`] after a linear catch-up.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    run: &Run,
    cfg: Cfg,
    table: &[f32],
    w: &[f32],
    state: &OptimizerState,
    dense: &Dense,
    which: &[bool],
    what: &str,
) {
    let pick = |values: &[f32]| -> Vec<f32> {
        let width = values.len() / run.rows;
        values
            .chunks(width.max(1))
            .zip(which)
            .filter(|(_, w)| **w)
            .flat_map(|(row, _)| row.to_vec())
            .collect()
    };
    let check = |got: &[f32], want: &[f32], what: &str| {
        if cfg.linear_catch_up() {
            assert_close_scaled(got, want, what);
        } else {
            assert_bits_eq(got, want, &format!("{cfg:?}: {what}"));
        }
    };
    check(&pick(table), &pick(w), &format!("weights, {what}"));
    let names: Vec<&str> = state.arrays.iter().map(|a| a.name.as_str()).collect();
    let want: Vec<&str> = dense.arrays.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, want, "state arrays");
    for (got, (name, values)) in state.arrays.iter().zip(&dense.arrays) {
        let shape = if let Cfg::RowWise(_) = dense.cfg {
            vec![run.rows]
        } else {
            vec![run.rows, run.dim]
        };
        assert_eq!(got.shape, shape, "{name} shape");
        check(
            &pick(&got.values),
            &pick(values),
            &format!("{name}, {what}"),
        );
    }
}

/// [`super::assert_close`] at relative [`REL`], where values that cancel
/// to below a tenth of their array's largest magnitude are compared
/// relative to that tenth: a weight that momentum or an adaptive step
/// brought near zero carries the rounding of the (larger) terms that
/// cancelled, and the dense reference rounds once per step where the
/// catch-up rounds once. Everywhere else the bound is element-wise.
#[track_caller]
pub fn assert_close_scaled(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let floor = want.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 10.0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        // As `assert_close`, with |w| raised to the floor.
        let tol = REL * w.abs().max(floor).max(1e-6) + 1e-7;
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

/// Rows not in `touched` are bitwise the same.
#[track_caller]
pub fn assert_rows_unchanged(
    run: &Run,
    before: &[f32],
    after: &[f32],
    touched: &[bool],
    what: &str,
) {
    let width = before.len() / run.rows;
    for (r, (b, a)) in before.chunks(width).zip(after.chunks(width)).enumerate() {
        if !touched[r] {
            assert_bits_eq(a, b, &format!("untouched row {r} of {what}"));
        }
    }
}

// ---------------------------------------------------------------- fixed cases

pub fn example_run() -> Run {
    Run {
        rows: 30,
        dim: 21,
        seed: 7,
        steps: (0..8)
            .map(|t| {
                (
                    (0..12).map(|j| (j * 7 + t * 3) % (10 + t)).collect(),
                    t as u64,
                )
            })
            .collect(),
        lr_scale: vec![None; 8],
    }
}

/// One configuration of each optimizer, with its options on.
pub fn every_kind() -> Vec<Cfg> {
    let dense = Semantics::DenseExact;
    vec![
        Cfg::Sgd(SgdConfig {
            momentum: 0.9,
            weight_decay: 0.1,
            semantics: dense,
            ..SgdConfig::default()
        }),
        Cfg::Sgd(SgdConfig {
            momentum: 0.5,
            nesterov: true,
            weight_decay: 0.3,
            semantics: Semantics::Lazy,
            ..SgdConfig::torch()
        }),
        Cfg::RmsProp(RmsPropConfig {
            momentum: 0.8,
            centered: true,
            semantics: dense,
            ..RmsPropConfig::torch()
        }),
        Cfg::RmsProp(RmsPropConfig {
            weight_decay: 0.05,
            ..RmsPropConfig::keras()
        }),
        Cfg::Adagrad(AdagradConfig::default()),
        Cfg::Adagrad(AdagradConfig {
            lr_decay: 0.1,
            weight_decay: 0.02,
            ..AdagradConfig::torch()
        }),
        Cfg::RowWise(RowWiseAdagradConfig::default()),
        Cfg::Adam(AdamConfig {
            lr: 0.01,
            amsgrad: true,
            weight_decay: 0.01,
            ..AdamConfig::keras()
        }),
        Cfg::Adam(AdamConfig {
            lr: 0.01,
            weight_decay: 0.01,
            ..AdamConfig::torch()
        }),
        Cfg::Adam(AdamConfig {
            lr: 0.01,
            ..AdamConfig::torch_sparse()
        }),
        Cfg::AdamW(AdamWConfig {
            lr: 0.01,
            amsgrad: true,
            ..AdamWConfig::torch()
        }),
        Cfg::Ftrl(FtrlConfig {
            lr: 0.1,
            l1_regularization_strength: 0.01,
            l2_shrinkage_regularization_strength: 0.05,
            ..FtrlConfig::keras()
        }),
        Cfg::Ftrl(FtrlConfig {
            lr: 0.1,
            learning_rate_power: -0.3,
            beta: 0.5,
            ..FtrlConfig::keras_lazy()
        }),
    ]
}

/// A concrete optimizer of the kind `Cfg` names, for the generic
/// `step_lookup` (which a `dyn SparseOptimizer` does not have).
pub enum Concrete {
    Sgd(Sgd),
    RmsProp(RmsProp),
    Adagrad(Adagrad),
    RowWise(RowWiseAdagrad),
    Adam(Adam),
    AdamW(AdamW),
    Ftrl(Ftrl),
}

impl Concrete {
    pub fn new(cfg: Cfg) -> Self {
        match cfg {
            Cfg::Sgd(c) => Concrete::Sgd(Sgd::new(c)),
            Cfg::RmsProp(c) => Concrete::RmsProp(RmsProp::new(c)),
            Cfg::Adagrad(c) => Concrete::Adagrad(Adagrad::new(c)),
            Cfg::RowWise(c) => Concrete::RowWise(RowWiseAdagrad::new(c)),
            Cfg::Adam(c) => Concrete::Adam(Adam::new(c)),
            Cfg::AdamW(c) => Concrete::AdamW(AdamW::new(c)),
            Cfg::Ftrl(c) => Concrete::Ftrl(Ftrl::new(c)),
        }
    }

    pub fn get(&mut self) -> &mut dyn SparseOptimizer {
        match self {
            Concrete::Sgd(o) => o,
            Concrete::RmsProp(o) => o,
            Concrete::Adagrad(o) => o,
            Concrete::RowWise(o) => o,
            Concrete::Adam(o) => o,
            Concrete::AdamW(o) => o,
            Concrete::Ftrl(o) => o,
        }
    }

    pub fn step_lookup<I: embtable::Index>(
        &mut self,
        table: &mut EmbeddingTable,
        ids: &[I],
        grad_out: &[f32],
    ) -> embtable::Result<()> {
        match self {
            Concrete::Sgd(o) => o.step_lookup(table, ids, grad_out),
            Concrete::RmsProp(o) => o.step_lookup(table, ids, grad_out),
            Concrete::Adagrad(o) => o.step_lookup(table, ids, grad_out),
            Concrete::RowWise(o) => o.step_lookup(table, ids, grad_out),
            Concrete::Adam(o) => o.step_lookup(table, ids, grad_out),
            Concrete::AdamW(o) => o.step_lookup(table, ids, grad_out),
            Concrete::Ftrl(o) => o.step_lookup(table, ids, grad_out),
        }
    }

    pub fn step_lookup_finite<I: embtable::Index>(
        &mut self,
        table: &mut EmbeddingTable,
        ids: &[I],
        grad_out: &[f32],
    ) -> embtable::Result<()> {
        match self {
            Concrete::Sgd(o) => o.step_lookup_finite(table, ids, grad_out),
            Concrete::RmsProp(o) => o.step_lookup_finite(table, ids, grad_out),
            Concrete::Adagrad(o) => o.step_lookup_finite(table, ids, grad_out),
            Concrete::RowWise(o) => o.step_lookup_finite(table, ids, grad_out),
            Concrete::Adam(o) => o.step_lookup_finite(table, ids, grad_out),
            Concrete::AdamW(o) => o.step_lookup_finite(table, ids, grad_out),
            Concrete::Ftrl(o) => o.step_lookup_finite(table, ids, grad_out),
        }
    }
}

// ---------------------------------------------------------------- "nothing written"

/// The weights (padded) and the optimizer state.
pub fn snapshot(table: &EmbeddingTable, opt: &dyn SparseOptimizer) -> (Vec<f32>, OptimizerState) {
    (table.as_padded().to_vec(), opt.state())
}

#[track_caller]
pub fn assert_same(
    table: &EmbeddingTable,
    opt: &dyn SparseOptimizer,
    before: &(Vec<f32>, OptimizerState),
    what: &str,
) {
    let now = snapshot(table, opt);
    assert_bits_eq(&now.0, &before.0, what);
    assert_state_eq(&now.1, &before.1, what);
}

/// Equality of states, with config values compared bitwise (a bad config may hold NaN).
#[track_caller]
pub fn assert_state_eq(got: &OptimizerState, want: &OptimizerState, what: &str) {
    let bits = |s: &OptimizerState| -> Vec<(String, u64)> {
        s.config
            .iter()
            .map(|(n, v)| (n.clone(), v.to_bits()))
            .collect()
    };
    assert_eq!(bits(got), bits(want), "{what}: config");
    let strip = |s: &OptimizerState| OptimizerState {
        config: vec![],
        ..s.clone()
    };
    assert_eq!(strip(got), strip(want), "{what}");
}

/// Bitwise equality of states (config values, arrays and all; NaN too).
#[track_caller]
pub fn assert_state_bits(got: &OptimizerState, want: &OptimizerState, what: &str) {
    assert_eq!(got.arrays.len(), want.arrays.len(), "{what}: arrays");
    for (a, b) in got.arrays.iter().zip(&want.arrays) {
        assert_eq!((&a.name, &a.shape), (&b.name, &b.shape), "{what}");
        assert_bits_eq(&a.values, &b.values, &format!("{} {what}", a.name));
    }
    let strip = |s: &OptimizerState| OptimizerState {
        arrays: vec![],
        ..s.clone()
    };
    assert_state_eq(&strip(got), &strip(want), what);
}
