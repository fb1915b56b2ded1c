//! Config checks, and configs' fields by name: each config lists its fields
//! once ([`Config::fields`](super::engine::Config::fields)), and the visitors
//! here turn that list into the names, the saved values of an
//! [`OptimizerState`](super::OptimizerState), and a config read back from them.

use super::{EpsPlacement, Semantics};
use crate::{Error, Result};

fn invalid(field: &'static str, reason: String) -> Error {
    Error::InvalidConfig { field, reason }
}

/// A learning rate or ε: positive and finite.
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
    unit64(field, v as f64)
}

/// A decay factor kept in `f64`: in `[0, 1)`.
pub(crate) fn unit64(field: &'static str, v: f64) -> Result<()> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(field, format!("must be in [0, 1), got {v}")))
    }
}

/// An accumulator start, a decay or a regularisation strength: `>= 0` and finite.
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

/// `lr * weight_decay < 1`: a decoupled decay step `w ← (1 − ηλ)·w` must
/// not flip the sign of the weights.
pub(crate) fn decay_below_one(lr: f32, weight_decay: f32) -> Result<()> {
    let decay = lr as f64 * weight_decay as f64;
    if decay < 1.0 {
        Ok(())
    } else {
        Err(invalid(
            "weight_decay",
            format!("lr * weight_decay must be below 1, got {lr} * {weight_decay} = {decay}"),
        ))
    }
}

/// A config field that holds one of a few choices, saved as `0..N`.
pub(crate) trait Choice: Copy + 'static {
    /// Every choice, in the order of their saved codes.
    const ALL: &'static [Self];
    /// Whether two choices are the same.
    fn same(self, other: Self) -> bool;
}

impl Choice for bool {
    const ALL: &'static [bool] = &[false, true];
    fn same(self, other: Self) -> bool {
        self == other
    }
}

impl Choice for EpsPlacement {
    const ALL: &'static [Self] = &[EpsPlacement::InsideSqrt, EpsPlacement::OutsideSqrt];
    fn same(self, other: Self) -> bool {
        self == other
    }
}

impl Choice for Semantics {
    const ALL: &'static [Self] = &[Semantics::Lazy, Semantics::DenseExact];
    fn same(self, other: Self) -> bool {
        self == other
    }
}

/// What a config's field list is walked with.
pub(crate) trait Visit {
    /// An `f32` field.
    fn f32(&mut self, name: &'static str, value: &mut f32);
    /// An `f64` field.
    fn f64(&mut self, name: &'static str, value: &mut f64);
    /// A choice (boolean or enum).
    fn choice<T: Choice>(&mut self, name: &'static str, value: &mut T);
}

/// Collects the field names.
#[derive(Default)]
pub(crate) struct Names(pub(crate) Vec<&'static str>);

impl Visit for Names {
    fn f32(&mut self, name: &'static str, _: &mut f32) {
        self.0.push(name);
    }
    fn f64(&mut self, name: &'static str, _: &mut f64) {
        self.0.push(name);
    }
    fn choice<T: Choice>(&mut self, name: &'static str, _: &mut T) {
        self.0.push(name);
    }
}

/// Collects `(name, value)` pairs as saved: an `f32` converts to `f64`
/// exactly; a choice is its index in [`Choice::ALL`].
#[derive(Default)]
pub(crate) struct Export(pub(crate) Vec<(String, f64)>);

impl Visit for Export {
    fn f32(&mut self, name: &'static str, value: &mut f32) {
        self.0.push((name.to_owned(), *value as f64));
    }
    fn f64(&mut self, name: &'static str, value: &mut f64) {
        self.0.push((name.to_owned(), *value));
    }
    fn choice<T: Choice>(&mut self, name: &'static str, value: &mut T) {
        let code = T::ALL.iter().position(|c| c.same(*value)).unwrap_or(0);
        self.0.push((name.to_owned(), code as f64));
    }
}

/// Sets each field from saved pairs, keeping the first error.
pub(crate) struct Import<'a> {
    kind: &'static str,
    saved: &'a [(String, f64)],
    /// Fields added after states were first saved, with the value an older
    /// state (without them) implies.
    added: &'static [(&'static str, f64)],
    pub(crate) error: Option<Error>,
}

impl<'a> Import<'a> {
    /// Reads `saved`, after checking that it names only fields in `known`,
    /// once each; fields in `added` may be missing.
    pub(crate) fn new(
        kind: &'static str,
        saved: &'a [(String, f64)],
        known: &[&'static str],
        added: &'static [(&'static str, f64)],
    ) -> Result<Self> {
        for (i, (name, _)) in saved.iter().enumerate() {
            if !known.contains(&name.as_str()) {
                return Err(invalid(
                    "config",
                    format!("{kind} has no config field {name:?}"),
                ));
            }
            if saved[..i].iter().any(|(n, _)| n == name) {
                return Err(invalid(
                    "config",
                    format!("config field {name:?} appears twice"),
                ));
            }
        }
        Ok(Self {
            kind,
            saved,
            added,
            error: None,
        })
    }

    fn get(&mut self, name: &'static str) -> Option<f64> {
        if self.error.is_some() {
            return None;
        }
        let found = self
            .saved
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
            .or_else(|| self.added.iter().find(|(n, _)| *n == name).map(|&(_, v)| v));
        if found.is_none() {
            self.error = Some(invalid(
                name,
                format!("missing from the saved {} config", self.kind),
            ));
        }
        found
    }

    fn fail(&mut self, name: &'static str, reason: String) {
        self.error.get_or_insert(invalid(name, reason));
    }
}

impl Visit for Import<'_> {
    fn f32(&mut self, name: &'static str, value: &mut f32) {
        let Some(v) = self.get(name) else { return };
        let x = v as f32;
        // The saved f64 must be an f32 (or NaN, which `check` then refuses).
        if x as f64 == v || v.is_nan() {
            *value = x;
        } else {
            self.fail(name, format!("{v} is not an f32 value"));
        }
    }
    fn f64(&mut self, name: &'static str, value: &mut f64) {
        if let Some(v) = self.get(name) {
            *value = v;
        }
    }
    fn choice<T: Choice>(&mut self, name: &'static str, value: &mut T) {
        let Some(v) = self.get(name) else { return };
        let n = T::ALL.len();
        if v >= 0.0 && v < n as f64 && v.fract() == 0.0 {
            *value = T::ALL[v as usize];
        } else {
            self.fail(
                name,
                format!("{v} is not one of 0..{n} (the saved encoding)"),
            );
        }
    }
}
