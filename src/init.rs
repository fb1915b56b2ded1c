//! Initialisers: how a new table's values are drawn.
//!
//! Every value is a pure function of `(seed, row, lane)`: row `r` draws from
//! its own SplitMix64 stream seeded from `(seed, r)`. The same seed therefore
//! gives the same table on every run, machine and thread count, and large
//! tables are filled in parallel. (The streams are not those of Keras or
//! PyTorch, so values differ from theirs; the distributions are the same.)

use crate::{Error, Result};

/// How the values of a new table are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Uniform in `[low, high)`; Keras' `"uniform"` default is `-0.05..0.05`.
    Uniform {
        /// Inclusive lower bound.
        low: f32,
        /// Exclusive upper bound.
        high: f32,
    },
    /// Normal with the given mean and standard deviation (PyTorch's
    /// `nn.Embedding` default is `Normal { mean: 0.0, std: 1.0 }`).
    Normal {
        /// Mean.
        mean: f32,
        /// Standard deviation, `>= 0`.
        std: f32,
    },
    /// Normal, with values beyond two standard deviations re-drawn (Keras'
    /// `TruncatedNormal`; the spread is not rescaled).
    TruncatedNormal {
        /// Mean.
        mean: f32,
        /// Standard deviation of the untruncated normal, `>= 0`.
        std: f32,
    },
    /// All zeros.
    Zeros,
    /// Every value the same.
    Constant(f32),
}

impl Default for Init {
    /// Keras' `Embedding` default: `Uniform { low: -0.05, high: 0.05 }`.
    fn default() -> Self {
        Init::Uniform {
            low: -0.05,
            high: 0.05,
        }
    }
}

impl Init {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for non-finite parameters, `low >= high`, a
    /// negative standard deviation, or a mean and standard deviation that
    /// could draw a value beyond `f32::MAX` (|z| reaches 8.6 for `Normal`,
    /// 2 for `TruncatedNormal`).
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(Error::InvalidConfig { field, reason });
        let finite = |field, x: f32| {
            if x.is_finite() {
                Ok(())
            } else {
                bad(field, format!("{x} is not finite"))
            }
        };
        match *self {
            Init::Uniform { low, high } => {
                finite("low", low)?;
                finite("high", high)?;
                if low >= high {
                    return bad("low", format!("low {low} must be below high {high}"));
                }
                finite("high - low", high - low)
            }
            Init::Normal { mean, std } | Init::TruncatedNormal { mean, std } => {
                finite("mean", mean)?;
                finite("std", std)?;
                if std < 0.0 {
                    return bad("std", format!("{std} is negative"));
                }
                // Every draw must be a finite f32: |z| is at most 2
                // (truncated) or MAX_NORMAL_DRAW.
                let z = match *self {
                    Init::TruncatedNormal { .. } => 2.0,
                    _ => MAX_NORMAL_DRAW,
                };
                if mean.abs() as f64 + z * std as f64 >= f32::MAX as f64 {
                    return bad(
                        "std",
                        format!("mean {mean} and std {std} can draw values beyond f32::MAX"),
                    );
                }
                Ok(())
            }
            Init::Zeros => Ok(()),
            Init::Constant(c) => finite("constant", c),
        }
    }

    /// Fills `row` (the first `dim` floats of row `index`) from `seed`.
    pub(crate) fn fill_row(&self, seed: u64, index: usize, row: &mut [f32]) {
        self.fill_key_row(seed, index as u64, row)
    }

    /// Fills `row` from `seed` and a 64-bit `key`: row `index` of a table
    /// is the row of key `index`, so a dynamic table's row for key `k`
    /// starts as row `k` of a fixed table with the same `Init` and seed.
    pub(crate) fn fill_key_row(&self, seed: u64, key: u64, row: &mut [f32]) {
        let mut rng = SplitMix64::for_row(seed, key);
        match *self {
            Init::Uniform { low, high } => {
                for x in row {
                    *x = loop {
                        let v = low + (high - low) * rng.unit_f32();
                        // Rounding can land on `high` itself; the range is half-open.
                        if v < high {
                            break v;
                        }
                    };
                }
            }
            Init::Normal { mean, std } => {
                for x in row {
                    *x = (mean as f64 + std as f64 * rng.standard_normal()) as f32;
                }
            }
            Init::TruncatedNormal { mean, std } => {
                for x in row {
                    let z = loop {
                        let z = rng.standard_normal();
                        if z.abs() <= 2.0 {
                            break z;
                        }
                    };
                    *x = (mean as f64 + std as f64 * z) as f32;
                }
            }
            Init::Zeros => row.fill(0.0),
            Init::Constant(c) => row.fill(c),
        }
    }
}

/// The largest `|z|` [`SplitMix64::standard_normal`] can return:
/// `sqrt(-2 ln 2⁻⁵³) ≈ 8.57`, from the smallest `u1` it draws, rounded up.
const MAX_NORMAL_DRAW: f64 = 8.6;

/// SplitMix64 (Steele, Lea and Flood 2014): tiny, fast, and good enough to
/// draw initial weights.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    /// An independent stream for one row of a table.
    fn for_row(seed: u64, row: u64) -> Self {
        Self(mix(seed ^ mix(row.wrapping_add(GOLDEN_GAMMA))))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    /// Uniform in `[0, 1)` with 24 random bits: every value is exact.
    pub(crate) fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub(crate) fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by the Box–Muller transform (one value per two draws).
    fn standard_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit_f64(); // in (0, 1]: ln is finite
        let u2 = self.unit_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// The SplitMix64 output function.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_parameters_are_rejected() {
        for init in [
            Init::Uniform {
                low: 1.0,
                high: 1.0,
            },
            Init::Uniform {
                low: f32::NAN,
                high: 1.0,
            },
            Init::Uniform {
                low: -f32::MAX,
                high: f32::MAX,
            },
            Init::Normal {
                mean: 0.0,
                std: -1.0,
            },
            Init::TruncatedNormal {
                mean: f32::INFINITY,
                std: 1.0,
            },
            Init::Constant(f32::NAN),
        ] {
            assert!(
                matches!(init.validate(), Err(Error::InvalidConfig { .. })),
                "{init:?}"
            );
        }
        Init::default().validate().unwrap();
    }

    #[test]
    fn normal_moments_are_right() {
        let mut row = vec![0.0; 200_000];
        Init::Normal {
            mean: 1.0,
            std: 2.0,
        }
        .fill_row(7, 0, &mut row);
        let n = row.len() as f64;
        let mean = row.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.02, "std {}", var.sqrt());
    }
}
