//! Which keys get a row: the admission policies, and the sighting counts
//! of keys that do not have one yet.

use std::collections::VecDeque;

use hashbrown::HashMap;

use crate::init::mix;
use crate::{Error, Result};

/// When a key that has no row gets one.
///
/// Every policy decides from the stream of keys alone: the same calls give
/// the same rows whatever the thread count.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Admission {
    /// Every new key gets a row on its first lookup.
    #[default]
    Always,
    /// A key gets a row once it has been seen this many times without one
    /// (counting every position of every batch; a key seen that often
    /// within one batch gets its row in that batch), as TensorFlow
    /// Recommenders-Addons' frequency restriction and RecIS' admission
    /// hooks count. `AfterSightings(1)` is `Always`.
    ///
    /// The counts are kept for at most as many keys as the table may hold
    /// rows (all of them when the capacity is unbounded); a key seen when
    /// that many are counted takes the place of the one seen least
    /// recently, whose count starts again from zero.
    AfterSightings(u32),
    /// Each sighting of a key without a row gives it one with probability
    /// `p` (McMahan et al. 2013's "Poisson inclusion"): the coin of a key's
    /// `i`-th position (from 0) in call number `c` is a hash of the key,
    /// `seed`, `c` and `i`, so it is the same on every run and can be
    /// reproduced outside embtable. Calls are numbered from 1: each
    /// translation (a forward pass) is one, and so is a backward pass that
    /// names a key its step has not used yet. With `mix` SplitMix64's
    /// output function, `h = mix(mix(key ^ seed) ^ mix(c * 0x9E37_79B9_7F4A_7C15 ^ i))`
    /// (wrapping), the sighting admits the key when `(h >> 11) / 2⁵³ < p`.
    Probability {
        /// The chance of each sighting, in `(0, 1]`.
        p: f64,
        /// The seed of the coins.
        seed: u64,
    },
    /// No key gets a row: a table that serves only the keys it holds (a
    /// table loaded for inference, or frozen).
    ReadOnly,
}

impl Admission {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `admission`) for a sighting count of
    /// 0 or a probability outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidConfig {
                field: "admission",
                reason,
            })
        };
        match *self {
            Admission::AfterSightings(0) => {
                bad("AfterSightings(0): a key must be seen at least once".into())
            }
            Admission::Probability { p, .. } if !(p > 0.0 && p <= 1.0) => {
                bad(format!("probability {p} is not in (0, 1]"))
            }
            _ => Ok(()),
        }
    }

    /// Whether a key seen `occurrences` times in call `call`, after `seen`
    /// earlier sightings, gets a row now.
    pub(crate) fn admits(&self, key: u64, seen: u32, occurrences: u32, call: u64) -> bool {
        match *self {
            Admission::Always => true,
            Admission::AfterSightings(n) => seen.saturating_add(occurrences) >= n,
            Admission::Probability { p, seed } => {
                (0..occurrences).any(|i| coin(seed, key, call, i) < p)
            }
            Admission::ReadOnly => false,
        }
    }
}

/// Uniform in `[0, 1)`: the coin of sighting `i` of `key` in call `call`.
fn coin(seed: u64, key: u64, call: u64, i: u32) -> f64 {
    let h = mix(mix(key ^ seed) ^ mix(call.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(i)));
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A key without a row: how often it was seen, and in which call last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sighting {
    pub(crate) count: u32,
    pub(crate) call: u64,
}

/// The sighting counts of keys without a row (for
/// [`Admission::AfterSightings`]), at most `limit` keys, the one seen least
/// recently making way for a new one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pending {
    counts: HashMap<u64, Sighting>,
    /// `(call, key)` in the order keys were last seen; an entry is stale
    /// once its key was seen again (or admitted, or forgotten).
    order: VecDeque<(u64, u64)>,
}

impl Pending {
    /// How often `key` was seen without a row.
    pub(crate) fn seen(&self, key: u64) -> u32 {
        self.counts.get(&key).map_or(0, |s| s.count)
    }

    /// Counts `occurrences` more sightings of `key` in call `call`, keeping
    /// at most `limit` keys. Keys are counted in the order of their first
    /// position in the call; one seen earlier in this call is never
    /// forgotten for a later one (that key is then not counted).
    pub(crate) fn sight(&mut self, key: u64, occurrences: u32, call: u64, limit: usize) {
        if !self.counts.contains_key(&key) && self.counts.len() >= limit {
            match self.oldest() {
                Some((old, sighting)) if sighting.call < call => {
                    self.counts.remove(&old);
                }
                _ => return,
            }
        }
        let entry = self
            .counts
            .entry(key)
            .or_insert(Sighting { count: 0, call });
        entry.count = entry.count.saturating_add(occurrences);
        entry.call = call;
        self.order.push_back((call, key));
        self.compact();
    }

    /// Forgets `key` (it got a row).
    pub(crate) fn remove(&mut self, key: u64) {
        self.counts.remove(&key);
    }

    /// The key seen least recently and its sighting, dropping stale entries.
    fn oldest(&mut self) -> Option<(u64, Sighting)> {
        while let Some(&(call, key)) = self.order.front() {
            match self.counts.get(&key) {
                Some(&s) if s.call == call => return Some((key, s)),
                _ => {
                    self.order.pop_front();
                }
            }
        }
        None
    }

    /// Drops stale entries once they outnumber the live ones.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.counts.len() + 64 {
            let counts = &self.counts;
            self.order
                .retain(|&(call, key)| counts.get(&key).is_some_and(|s| s.call == call));
        }
    }

    /// The keys with their sightings, least recently seen first.
    pub(crate) fn in_order(&self) -> Vec<(u64, Sighting)> {
        self.order
            .iter()
            .filter_map(|&(call, key)| {
                let s = *self.counts.get(&key)?;
                (s.call == call).then_some((key, s))
            })
            .collect()
    }

    /// Counts restored from [`in_order`](Self::in_order)'s output.
    pub(crate) fn from_order(keys: impl IntoIterator<Item = (u64, Sighting)>) -> Self {
        let mut pending = Self::default();
        for (key, s) in keys {
            pending.counts.insert(key, s);
            pending.order.push_back((s.call, key));
        }
        pending
    }

    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.counts.allocation_size() + self.order.capacity() * size_of::<(u64, u64)>()
    }

    /// The most bytes counts of at most `limit` keys take: the map's
    /// buckets (a power of two, at most 8/7 full) and an order of at most
    /// `2 * limit + 65` entries, each allocation at most twice its length.
    pub(crate) fn max_bytes(limit: usize) -> usize {
        let buckets = limit
            .saturating_mul(8)
            .div_ceil(7)
            .max(4)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX);
        let map = buckets.saturating_mul(size_of::<(u64, Sighting)>() + 1) + 64;
        let order = limit.saturating_mul(2).saturating_add(65) * 2 * size_of::<(u64, u64)>();
        map.saturating_add(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_admits_about_p_of_first_sightings() {
        let admission = Admission::Probability { p: 0.25, seed: 9 };
        let admitted = (0..40_000u64)
            .filter(|&k| admission.admits(k, 0, 1, 1))
            .count();
        assert!((9_000..11_000).contains(&admitted), "{admitted}");
        // Two sightings: 1 - 0.75² = 0.4375.
        let twice = (0..40_000u64)
            .filter(|&k| admission.admits(k, 0, 2, 1))
            .count();
        assert!((16_500..18_500).contains(&twice), "{twice}");
        assert!(
            Admission::Probability { p: 0.0, seed: 1 }
                .validate()
                .is_err()
        );
        assert!(Admission::AfterSightings(0).validate().is_err());
    }

    #[test]
    fn pending_counts_forget_the_least_recently_seen_key() {
        let mut pending = Pending::default();
        pending.sight(1, 1, 1, 2);
        pending.sight(2, 1, 2, 2);
        pending.sight(1, 1, 3, 2); // 1 is now the most recent
        pending.sight(3, 1, 4, 2); // forgets 2
        assert_eq!(
            (pending.seen(1), pending.seen(2), pending.seen(3)),
            (2, 0, 1)
        );
        // Within one call, a key counted earlier in it is never forgotten.
        pending.sight(4, 1, 5, 2); // forgets 1 (seen in call 3)
        pending.sight(5, 1, 5, 2); // forgets 3 (call 4)
        pending.sight(6, 1, 5, 2); // would forget 4 (this call): not counted
        assert_eq!([1, 3, 4, 5, 6].map(|k| pending.seen(k)), [0, 0, 1, 1, 0]);
        let restored = Pending::from_order(pending.in_order());
        assert_eq!(restored.in_order(), pending.in_order());
    }
}
