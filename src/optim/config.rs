//! Config checks and the field-by-field encoding of configs in
//! [`OptimizerState`](super::OptimizerState).

use super::{EpsPlacement, Semantics};
use crate::{Error, Result};

fn invalid(field: &'static str, reason: String) -> Error {
    Error::InvalidConfig { field, reason }
}

/// A learning rate: positive and finite.
pub(crate) fn positive(field: &'static str, v: f32) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be positive and finite, got {v}"),
        ))
    }
}

/// A decay or momentum factor: in `[0, 1)`.
pub(crate) fn unit(field: &'static str, v: f32) -> Result<()> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(field, format!("must be in [0, 1), got {v}")))
    }
}

/// An accumulator start or a weight decay: `>= 0` and finite.
pub(crate) fn non_negative(field: &'static str, v: f32) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be non-negative and finite, got {v}"),
        ))
    }
}

/// Named config values, as stored in an `OptimizerState`.
pub(crate) struct Fields<'a> {
    kind: &'static str,
    fields: &'a [(String, f64)],
}

impl<'a> Fields<'a> {
    /// Checks that `fields` holds exactly the names in `known`, once each.
    pub(crate) fn new(
        kind: &'static str,
        fields: &'a [(String, f64)],
        known: &[&'static str],
    ) -> Result<Self> {
        for (i, (name, _)) in fields.iter().enumerate() {
            if !known.contains(&name.as_str()) {
                return Err(invalid(
                    "config",
                    format!("{kind} has no config field {name:?}"),
                ));
            }
            if fields[..i].iter().any(|(n, _)| n == name) {
                return Err(invalid(
                    "config",
                    format!("config field {name:?} appears twice"),
                ));
            }
        }
        Ok(Self { kind, fields })
    }

    fn get(&self, name: &'static str) -> Result<f64> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
            .ok_or_else(|| invalid(name, format!("missing from the saved {} config", self.kind)))
    }

    /// An `f32` field (the saved `f64` must convert exactly, or be NaN).
    pub(crate) fn f32(&self, name: &'static str) -> Result<f32> {
        let v = self.get(name)?;
        let x = v as f32;
        if x as f64 == v || v.is_nan() {
            Ok(x)
        } else {
            Err(invalid(name, format!("{v} is not an f32 value")))
        }
    }

    /// A field holding one of `0..n`.
    pub(crate) fn choice(&self, name: &'static str, n: usize) -> Result<usize> {
        let v = self.get(name)?;
        if v >= 0.0 && v < n as f64 && v.fract() == 0.0 {
            Ok(v as usize)
        } else {
            Err(invalid(
                name,
                format!("{v} is not one of 0..{n} (the saved encoding)"),
            ))
        }
    }

    /// A boolean field: `0` or `1`.
    pub(crate) fn bool(&self, name: &'static str) -> Result<bool> {
        Ok(self.choice(name, 2)? == 1)
    }

    /// An [`EpsPlacement`] field.
    pub(crate) fn eps_placement(&self, name: &'static str) -> Result<EpsPlacement> {
        Ok(match self.choice(name, 2)? {
            0 => EpsPlacement::InsideSqrt,
            _ => EpsPlacement::OutsideSqrt,
        })
    }

    /// A [`Semantics`] field.
    pub(crate) fn semantics(&self, name: &'static str) -> Result<Semantics> {
        Ok(match self.choice(name, 2)? {
            0 => Semantics::Lazy,
            _ => Semantics::DenseExact,
        })
    }
}

/// The saved encoding of an [`EpsPlacement`].
pub(crate) fn eps_code(e: EpsPlacement) -> f64 {
    match e {
        EpsPlacement::InsideSqrt => 0.0,
        EpsPlacement::OutsideSqrt => 1.0,
    }
}

/// The saved encoding of a [`Semantics`].
pub(crate) fn semantics_code(s: Semantics) -> f64 {
    match s {
        Semantics::Lazy => 0.0,
        Semantics::DenseExact => 1.0,
    }
}

/// The saved encoding of a boolean.
pub(crate) fn bool_code(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// `(name, value)` pairs for an `OptimizerState`.
pub(crate) fn named(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    pairs.iter().map(|&(n, v)| (n.to_owned(), v)).collect()
}
