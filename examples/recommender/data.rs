//! Interaction data: a generated data set with planted structure, or a file
//! of real interactions (`csv.rs`), split per user in time order into
//! training items, one validation item and one test item.
//!
//! # The split
//!
//! Each user's interactions, oldest first: the last one is the user's test
//! item, the one before it the validation item, the rest are for training
//! (leave-one-out, as SASRec and RecBole evaluate). A user with two
//! interactions has a test item and no validation item; a user with one is
//! only trained on. Training never sees a validation or test item; early
//! stopping watches the validation items, and only the final report uses
//! the test items, with the validation item added to the user's history
//! (it happened before the test item).
//!
//! # The generated data set
//!
//! Items have a Zipf-distributed popularity (the item of popularity rank
//! `r` has weight `1 / (r + 1)^alpha`) and one hidden topic each. Every user
//! has a hidden taste: a mix of a few topics. A user's interactions are
//! drawn one after another: with probability `pop_share` an item from the
//! global popularity distribution, otherwise an item from one topic, drawn
//! by popularity among that topic's items; the topic is the previous
//! interaction's with probability `stickiness` (interests come in runs, so
//! recent history is informative) and else drawn from the user's mix. A
//! user never interacts with one item twice. Everything is a pure function
//! of the seed (each user draws from its own stream), whatever the thread
//! count.
//!
//! A model has to discover the topics from co-occurrence alone; the
//! most-popular baseline knows only the popularity.

use std::borrow::Cow;
use std::collections::HashSet;

use rayon::prelude::*;

use crate::rng::{Rng, Weighted, mix};

/// Which held-out items an evaluation scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The validation items, from the training items alone: what early
    /// stopping watches.
    Validation,
    /// The test items, from the training items and the validation item:
    /// the final report.
    Test,
}

/// Interactions split for training, validation and test (see the
/// [module docs](self)).
///
/// User `u`'s training items, oldest first, are
/// `train_items[train_offsets[u]..train_offsets[u + 1]]`; its validation
/// and test items are `valid[u]` and `test[u]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Number of users (dense ids `0..users`).
    pub users: usize,
    /// Number of items (dense ids `0..items`).
    pub items: usize,
    /// CSR offsets into `train_items`, `users + 1` of them.
    pub train_offsets: Vec<usize>,
    /// Every user's training items in time order, concatenated.
    pub train_items: Vec<u32>,
    /// The validation item of each user (`None` below three interactions).
    pub valid: Vec<Option<u32>>,
    /// The test item of each user (`None` below two interactions).
    pub test: Vec<Option<u32>>,
    /// The id in the file of each dense user id (the number, for generated data).
    pub user_ids: Vec<String>,
    /// The id in the file of each dense item id (the number, for generated data).
    pub item_ids: Vec<String>,
}

impl Dataset {
    /// User `u`'s training items, oldest first.
    pub fn history(&self, u: usize) -> &[u32] {
        &self.train_items[self.train_offsets[u]..self.train_offsets[u + 1]]
    }

    /// What the model knows of user `u` when it predicts the held-out item
    /// of `split`, oldest first: the training items, and for the test the
    /// validation item after them.
    pub fn known(&self, u: usize, split: Split) -> Cow<'_, [u32]> {
        match (split, self.valid[u]) {
            (Split::Test, Some(v)) => {
                let mut items = self.history(u).to_vec();
                items.push(v);
                Cow::Owned(items)
            }
            _ => Cow::Borrowed(self.history(u)),
        }
    }

    /// User `u`'s held-out item of `split`.
    pub fn held(&self, u: usize, split: Split) -> Option<u32> {
        match split {
            Split::Validation => self.valid[u],
            Split::Test => self.test[u],
        }
    }

    /// The users with a held-out item of `split`.
    pub fn eval_users(&self, split: Split) -> Vec<usize> {
        (0..self.users)
            .filter(|&u| self.held(u, split).is_some())
            .collect()
    }

    /// The user of each training interaction (`train_items.len()` entries).
    pub fn owners(&self) -> Vec<u32> {
        let mut owner = Vec::with_capacity(self.train_items.len());
        for u in 0..self.users {
            owner.resize(self.train_offsets[u + 1], u as u32);
        }
        owner
    }

    /// Number of training interactions.
    pub fn train_len(&self) -> usize {
        self.train_items.len()
    }

    /// How often each item occurs among what is known before `split`'s
    /// held-out items (training items, and for the test the validation
    /// items too): the most-popular baseline.
    pub fn item_counts(&self, split: Split) -> Vec<u32> {
        let mut counts = vec![0u32; self.items];
        for &i in &self.train_items {
            counts[i as usize] += 1;
        }
        if split == Split::Test {
            for &i in self.valid.iter().flatten() {
                counts[i as usize] += 1;
            }
        }
        counts
    }

    /// A 64-bit fingerprint of the split, to check that a checkpoint is
    /// resumed on the data it was trained on.
    pub fn fingerprint(&self) -> u64 {
        let mut h = mix(self.users as u64) ^ mix(self.items as u64 + 1);
        let mut feed = |x: u64| h = mix(h.rotate_left(5) ^ x);
        for &o in &self.train_offsets {
            feed(o as u64);
        }
        for &i in &self.train_items {
            feed(i as u64);
        }
        for held in [&self.valid, &self.test] {
            for t in held {
                feed(t.map_or(u64::MAX, u64::from));
            }
        }
        h
    }

    /// Builds the split from per-user sequences in time order: the last
    /// item of each sequence of two or more is the test item, the one
    /// before it, in a sequence of three or more, the validation item.
    /// Ids in the file are the dense ids' numbers.
    pub fn from_sequences(items: usize, mut seqs: Vec<Vec<u32>>) -> Dataset {
        let users = seqs.len();
        let (mut valid, mut test) = (Vec::with_capacity(users), Vec::with_capacity(users));
        for seq in &mut seqs {
            test.push(if seq.len() >= 2 { seq.pop() } else { None });
            valid.push(if seq.len() >= 2 { seq.pop() } else { None });
        }
        let mut train_offsets = Vec::with_capacity(users + 1);
        train_offsets.push(0);
        let mut train_items = Vec::with_capacity(seqs.iter().map(Vec::len).sum());
        for seq in &seqs {
            train_items.extend_from_slice(seq);
            train_offsets.push(train_items.len());
        }
        Dataset {
            users,
            items,
            train_offsets,
            train_items,
            valid,
            test,
            user_ids: (0..users).map(|u| u.to_string()).collect(),
            item_ids: (0..items).map(|i| i.to_string()).collect(),
        }
    }
}

/// For a sequence without timestamps: moves a random item to the end (the
/// test item) and another random one before it (the validation item), so
/// that [`Dataset::from_sequences`] holds out random items, not the last
/// ones of the file.
pub fn hold_out_at_random(seq: &mut Vec<u32>, rng: &mut Rng) {
    for place in 0..2.min(seq.len().saturating_sub(1)) {
        // place 0 picks among all items, place 1 among those before the test item.
        let end = seq.len() - place;
        let k = rng.below(end);
        let item = seq.remove(k);
        seq.insert(end - 1, item);
    }
}

/// The shape of a generated data set (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenConfig {
    /// Number of users.
    pub users: usize,
    /// Number of items.
    pub items: usize,
    /// Number of hidden topics.
    pub topics: usize,
    /// Topics in each user's taste.
    pub topics_per_user: usize,
    /// Zipf exponent of item popularity.
    pub alpha: f64,
    /// Share of interactions drawn from global popularity alone.
    pub pop_share: f64,
    /// Probability that an interaction keeps the previous one's topic.
    pub stickiness: f64,
    /// Fewest interactions of a user.
    pub min_len: usize,
    /// Mean number of interactions beyond `min_len` (geometric).
    pub mean_extra: f64,
    /// Most interactions of a user.
    pub max_len: usize,
}

impl Default for GenConfig {
    /// The demo's data set: 20,000 users, 50,000 items, 200 topics, about
    /// 700,000 interactions.
    fn default() -> Self {
        GenConfig {
            users: 20_000,
            items: 50_000,
            topics: 200,
            topics_per_user: 3,
            alpha: 1.0,
            pop_share: 0.2,
            stickiness: 0.5,
            min_len: 10,
            mean_extra: 25.0,
            max_len: 200,
        }
    }
}

#[cfg(test)]
impl GenConfig {
    /// A small data set for tests: 600 users, 1,000 items, 10 topics.
    pub fn tiny() -> Self {
        GenConfig {
            users: 600,
            items: 1_000,
            topics: 10,
            topics_per_user: 2,
            ..GenConfig::default()
        }
    }
}

/// Generates the data set described in the [module docs](self) from `seed`.
///
/// # Panics
/// If a size is zero or a probability is outside `[0, 1]`.
pub fn generate(cfg: &GenConfig, seed: u64) -> Dataset {
    assert!(cfg.users > 0 && cfg.items > 0 && cfg.topics > 0 && cfg.topics_per_user > 0);
    assert!((0.0..=1.0).contains(&cfg.pop_share) && (0.0..=1.0).contains(&cfg.stickiness));
    assert!(cfg.min_len <= cfg.max_len && cfg.max_len < cfg.items);

    // Item popularity: a random permutation of Zipf ranks, so that popular
    // items are spread over the id range and over the topics.
    let mut rng = Rng::derive(seed, &[0]);
    let mut rank: Vec<usize> = (0..cfg.items).collect();
    rng.shuffle(&mut rank);
    let weight = |i: usize| 1.0 / ((rank[i] + 1) as f64).powf(cfg.alpha);
    let popular = Weighted::new((0..cfg.items).map(weight));

    // Hidden item factors: one topic per item.
    let topic_of: Vec<usize> = (0..cfg.items).map(|_| rng.below(cfg.topics)).collect();
    let mut members = vec![Vec::new(); cfg.topics];
    for (i, &t) in topic_of.iter().enumerate() {
        members[t].push(i as u32);
    }
    let in_topic: Vec<Option<Weighted>> = members
        .iter()
        .map(|m| (!m.is_empty()).then(|| Weighted::new(m.iter().map(|&i| weight(i as usize)))))
        .collect();

    let seqs: Vec<Vec<u32>> = (0..cfg.users)
        .into_par_iter()
        .map(|u| {
            let mut rng = Rng::derive(seed, &[1, u as u64]);
            // Hidden user factors: a few topics with random weights.
            let taste: Vec<usize> = (0..cfg.topics_per_user)
                .map(|_| rng.below(cfg.topics))
                .collect();
            let mix = Weighted::new((0..taste.len()).map(|_| -(1.0 - rng.f64()).ln()));
            let extra = (-(1.0 - rng.f64()).ln() * cfg.mean_extra) as usize;
            let len = (cfg.min_len + extra).min(cfg.max_len);

            let mut seen = HashSet::with_capacity(len);
            let mut seq = Vec::with_capacity(len);
            let mut topic = taste[mix.sample(&mut rng)];
            let mut tries = 0;
            while seq.len() < len && tries < 50 * len {
                tries += 1;
                if rng.f64() >= cfg.stickiness {
                    topic = taste[mix.sample(&mut rng)];
                }
                let item = match &in_topic[topic] {
                    Some(w) if rng.f64() >= cfg.pop_share => members[topic][w.sample(&mut rng)],
                    _ => popular.sample(&mut rng) as u32,
                };
                if seen.insert(item) {
                    seq.push(item);
                }
            }
            seq
        })
        .collect();
    Dataset::from_sequences(cfg.items, seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_planted() {
        let cfg = GenConfig::tiny();
        let a = generate(&cfg, 5);
        let b = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| generate(&cfg, 5));
        assert_eq!(a, b, "same seed, any thread count: same data");
        assert_ne!(a.fingerprint(), generate(&cfg, 6).fingerprint());

        assert_eq!((a.users, a.items), (cfg.users, cfg.items));
        assert_eq!(a.train_offsets.len(), a.users + 1);
        for u in 0..a.users {
            let h = a.history(u);
            // Every generated user has a validation and a test item.
            let (v, t) = (a.valid[u].unwrap(), a.test[u].unwrap());
            assert!((cfg.min_len..=cfg.max_len).contains(&(h.len() + 2)));
            // No repeats: the held-out items are not among the training items.
            let set: HashSet<u32> = h.iter().copied().collect();
            assert_eq!(set.len(), h.len());
            assert!(!set.contains(&v) && !set.contains(&t) && v != t);
        }
        // Popularity is skewed: the top 1% of items hold far more than 1%.
        let mut counts = a.item_counts(Split::Validation);
        counts.sort_unstable_by(|x, y| y.cmp(x));
        let top: u32 = counts[..cfg.items / 100].iter().sum();
        assert!(top as f64 > 0.05 * a.train_len() as f64);
    }

    /// Leave-one-out: the last item is the test item, the one before it
    /// the validation item; what the model knows grows by the validation
    /// item for the test; short sequences hold out less.
    #[test]
    fn split_holds_out_the_last_two_items() {
        let d = Dataset::from_sequences(
            6,
            vec![vec![0, 1, 2, 3], vec![4, 5], vec![5], vec![2, 0, 1]],
        );
        assert_eq!(d.history(0), &[0, 1]);
        assert_eq!((d.valid[0], d.test[0]), (Some(2), Some(3)));
        assert_eq!(d.history(1), &[4]);
        assert_eq!((d.valid[1], d.test[1]), (None, Some(5)));
        assert_eq!(d.history(2), &[5]);
        assert_eq!((d.valid[2], d.test[2]), (None, None));
        assert_eq!(
            (d.history(3), d.valid[3], d.test[3]),
            (&[2][..], Some(0), Some(1))
        );

        assert_eq!(&*d.known(0, Split::Validation), &[0, 1]);
        assert_eq!(&*d.known(0, Split::Test), &[0, 1, 2]);
        assert_eq!(&*d.known(1, Split::Test), &[4]);
        assert_eq!(d.held(0, Split::Validation), Some(2));
        assert_eq!(d.held(0, Split::Test), Some(3));
        assert_eq!(d.eval_users(Split::Validation), [0, 3]);
        assert_eq!(d.eval_users(Split::Test), [0, 1, 3]);
        assert_eq!(d.owners(), [0, 0, 1, 2, 3]);
        // Popularity before the validation items: training only; before the
        // test items: the validation items too.
        assert_eq!(d.item_counts(Split::Validation), [1, 1, 1, 0, 1, 1]);
        assert_eq!(d.item_counts(Split::Test), [2, 1, 2, 0, 1, 1]);
        assert_eq!(d.user_ids[3], "3");

        let mut other = d.clone();
        other.valid[3] = Some(4);
        assert_ne!(
            d.fingerprint(),
            other.fingerprint(),
            "the validation items count"
        );
    }

    /// Without times, two random items are held out: every item is as
    /// likely, the validation item differs from the test item, and the
    /// training items keep their order.
    #[test]
    fn random_hold_out_draws_every_item() {
        let mut tested = [0usize; 5];
        let mut validated = [0usize; 5];
        for draw in 0..5_000 {
            let mut seq: Vec<u32> = (0..5).collect();
            hold_out_at_random(&mut seq, &mut Rng::derive(9, &[draw]));
            let (v, t) = (seq[3], seq[4]);
            assert_ne!(v, t);
            assert!(seq[..3].windows(2).all(|w| w[0] < w[1]), "{seq:?}");
            tested[t as usize] += 1;
            validated[v as usize] += 1;
        }
        for n in tested.iter().chain(&validated) {
            assert!((850..=1150).contains(n), "{tested:?} {validated:?}");
        }
        let mut two = vec![7, 8];
        hold_out_at_random(&mut two, &mut Rng::new(1));
        assert!(two == [7, 8] || two == [8, 7]);
        let mut one = vec![7];
        hold_out_at_random(&mut one, &mut Rng::new(1));
        assert_eq!(one, [7]);
    }
}
