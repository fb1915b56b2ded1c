//! Interaction data: a generated data set with planted structure, or a CSV
//! of real interactions (MovieLens' `ratings.csv` layout), turned into
//! per-user training sequences and one held-out item per user.
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

use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt;
use std::io::BufRead;

use rayon::prelude::*;

use crate::rng::{Rng, Weighted, mix};

/// Interactions split for training and evaluation.
///
/// User `u`'s training items, oldest first, are
/// `train_items[train_offsets[u]..train_offsets[u + 1]]`; its held-out item
/// (the most recent one, or a random one when there are no timestamps) is
/// `test[u]`, `None` for users with fewer than two interactions.
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
    /// The held-out item of each user.
    pub test: Vec<Option<u32>>,
    /// The raw id of each dense user id (identity for generated data).
    pub user_ids: Vec<u64>,
    /// The raw id of each dense item id (identity for generated data).
    pub item_ids: Vec<u64>,
}

impl Dataset {
    /// User `u`'s training items, oldest first.
    pub fn history(&self, u: usize) -> &[u32] {
        &self.train_items[self.train_offsets[u]..self.train_offsets[u + 1]]
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

    /// Users with a held-out item.
    pub fn test_users(&self) -> Vec<usize> {
        (0..self.users)
            .filter(|&u| self.test[u].is_some())
            .collect()
    }

    /// How often each item occurs in training (the most-popular baseline).
    pub fn item_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.items];
        for &i in &self.train_items {
            counts[i as usize] += 1;
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
        for t in &self.test {
            feed(t.map_or(u64::MAX, u64::from));
        }
        h
    }

    /// Builds the split from per-user sequences in time order: the last
    /// item of each sequence with at least two items is held out.
    fn from_sequences(items: usize, mut seqs: Vec<Vec<u32>>) -> Dataset {
        let users = seqs.len();
        let mut test = Vec::with_capacity(users);
        for seq in &mut seqs {
            test.push(if seq.len() >= 2 { seq.pop() } else { None });
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
            test,
            user_ids: (0..users as u64).collect(),
            item_ids: (0..items as u64).collect(),
        }
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

/// A malformed interactions file: the 1-based line and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvError {
    /// 1-based line number (0 when the problem is not one line's).
    pub line: usize,
    /// What is wrong, naming the offending text.
    pub reason: String,
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for CsvError {}

/// Options for reading interactions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CsvOptions {
    /// Keep only interactions rated at least this (needs a rating column).
    pub min_rating: Option<f32>,
}

/// Reads interactions `user,item[,rating[,timestamp]]`, one per line, and
/// splits them into a [`Dataset`].
///
/// * Fields are separated by `,`, a tab or `::` (MovieLens 1M's
///   `ratings.dat`), chosen from the first line. Spaces around fields and
///   `\r\n` line ends are fine; blank lines are skipped.
/// * The first line is a header if its user field is not an integer
///   (`userId,movieId,rating,timestamp`).
/// * User and item ids are non-negative integers, mapped to dense ids in
///   order of first appearance. The rating is a number; the timestamp a
///   number (seconds, or anything that sorts in time order). Every line
///   has as many fields as the first data line.
/// * Each user's interactions are put in timestamp order (file order
///   without timestamps, or for equal timestamps); a repeated
///   `(user, item)` keeps its first occurrence. The most recent
///   interaction of every user with at least two is held out, or, without
///   timestamps, a random one drawn from `seed`.
///
/// # Errors
/// A [`CsvError`] naming the line for a wrong field count, an id that is
/// not an integer, a rating or timestamp that is not a number; for read
/// failures; and when no interaction is left.
pub fn read_interactions(
    reader: impl BufRead,
    opts: CsvOptions,
    seed: u64,
) -> Result<Dataset, CsvError> {
    let mut users: HashMap<u64, u32> = HashMap::new();
    let mut items: HashMap<u64, u32> = HashMap::new();
    let mut user_ids = Vec::new();
    let mut item_ids = Vec::new();
    // (dense user, dense item, timestamp) per kept line, in file order.
    let mut records: Vec<(u32, u32, f64)> = Vec::new();
    let mut sep: Option<&'static str> = None;
    let mut columns: Option<usize> = None;

    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let err = |reason: String| CsvError {
            line: line_no,
            reason,
        };
        let line = line.map_err(|e| err(format!("cannot read: {e}")))?;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let sep = *sep.get_or_insert_with(|| {
            if line.contains("::") {
                "::"
            } else if line.contains(',') {
                ","
            } else {
                "\t"
            }
        });
        let fields: Vec<&str> = line.split(sep).map(str::trim).collect();
        if !(2..=4).contains(&fields.len()) {
            return Err(err(format!(
                "expected 2 to 4 fields `user,item[,rating[,timestamp]]`, found {} in `{line}`",
                fields.len()
            )));
        }
        if columns.is_none() && records.is_empty() && fields[0].parse::<u64>().is_err() {
            // A header line: remember nothing but its presence.
            if opts.min_rating.is_some() && fields.len() < 3 {
                return Err(err(
                    "--min-rating needs a rating column, the header has none".into(),
                ));
            }
            columns = Some(fields.len());
            continue;
        }
        let expected = *columns.get_or_insert(fields.len());
        if fields.len() != expected {
            return Err(err(format!(
                "expected {expected} fields like the first line, found {} in `{line}`",
                fields.len()
            )));
        }
        let id = |what: &str, s: &str| {
            s.parse::<u64>()
                .map_err(|_| err(format!("{what} id `{s}` is not a non-negative integer")))
        };
        let user = id("user", fields[0])?;
        let item = id("item", fields[1])?;
        let number = |what: &str, s: &str| match s.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => Err(err(format!("{what} `{s}` is not a finite number"))),
        };
        let rating = fields.get(2).map(|s| number("rating", s)).transpose()?;
        let time = fields.get(3).map(|s| number("timestamp", s)).transpose()?;
        match (opts.min_rating, rating) {
            (Some(_), None) => {
                return Err(err("--min-rating needs a rating column".into()));
            }
            (Some(min), Some(r)) if r < f64::from(min) => continue,
            _ => {}
        }
        let next = user_ids.len() as u32;
        let u = *users.entry(user).or_insert_with(|| {
            user_ids.push(user);
            next
        });
        let next = item_ids.len() as u32;
        let i = *items.entry(item).or_insert_with(|| {
            item_ids.push(item);
            next
        });
        records.push((u, i, time.unwrap_or(0.0)));
    }
    if records.is_empty() {
        return Err(CsvError {
            line: 0,
            reason: "no interactions found".into(),
        });
    }
    let has_time = columns == Some(4);

    // Group by user (a stable counting sort keeps file order), then order
    // each user's interactions by time (stable) and drop repeats.
    let mut start = vec![0usize; user_ids.len() + 1];
    for &(u, _, _) in &records {
        start[u as usize + 1] += 1;
    }
    for u in 0..user_ids.len() {
        start[u + 1] += start[u];
    }
    let mut grouped = vec![(0u32, 0.0f64); records.len()];
    let mut fill = start.clone();
    for &(u, i, t) in &records {
        grouped[fill[u as usize]] = (i, t);
        fill[u as usize] += 1;
    }
    drop(records);
    let seqs: Vec<Vec<u32>> = (0..user_ids.len())
        .into_par_iter()
        .map(|u| {
            let mut xs = grouped[start[u]..start[u + 1]].to_vec();
            xs.sort_by(|a, b| a.1.total_cmp(&b.1)); // stable
            let mut seen = HashSet::with_capacity(xs.len());
            let mut seq: Vec<u32> = xs.iter().map(|x| x.0).filter(|&i| seen.insert(i)).collect();
            if !has_time && seq.len() >= 2 {
                // Hold out a random interaction: move it to the end.
                let k = Rng::derive(seed, &[2, u as u64]).below(seq.len());
                let held = seq.remove(k);
                seq.push(held);
            }
            seq
        })
        .collect();
    let mut data = Dataset::from_sequences(item_ids.len(), seqs);
    data.user_ids = user_ids;
    data.item_ids = item_ids;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Dataset, CsvError> {
        read_interactions(text.as_bytes(), CsvOptions::default(), 1)
    }

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
            let n = h.len() + usize::from(a.test[u].is_some());
            assert!((cfg.min_len..=cfg.max_len).contains(&n));
            // No repeats, and the held-out item is not among the training items.
            let set: HashSet<u32> = h.iter().copied().collect();
            assert_eq!(set.len(), h.len());
            assert!(!a.test[u].is_some_and(|t| set.contains(&t)));
        }
        // Popularity is skewed: the top 1% of items hold far more than 1%.
        let mut counts = a.item_counts();
        counts.sort_unstable_by(|x, y| y.cmp(x));
        let top: u32 = counts[..cfg.items / 100].iter().sum();
        assert!(top as f64 > 0.05 * a.train_len() as f64);
    }

    #[test]
    fn csv_with_header_and_four_columns_holds_out_the_latest() {
        let text = "userId,movieId,rating,timestamp\r\n\
                    10,500,4.0,300\n\
                    10,501,3.5,100\n\
                    \n\
                    20,500,5,50\n\
                    10,502,1,200\n";
        let d = read(text).unwrap();
        assert_eq!((d.users, d.items), (2, 3));
        assert_eq!(d.user_ids, [10, 20]);
        assert_eq!(d.item_ids, [500, 501, 502]);
        // User 10 in time order: 501 (t=100), 502 (200), 500 (300, held out).
        assert_eq!(d.history(0), &[1, 2]);
        assert_eq!(d.test, [Some(0), None]);
        assert_eq!(d.history(1), &[0]);
    }

    #[test]
    fn csv_without_header_in_two_and_three_columns() {
        let d = read("1,2\n1,3\n1,2\n2,3\n").unwrap();
        assert_eq!((d.users, d.items), (2, 2));
        // User 1 has items 2 and 3 (the repeat of 2 is dropped); one is held out.
        assert_eq!(d.history(0).len() + 1, 2);
        assert!(d.test[0].is_some());
        let d = read("7\t8\t1.5\n7\t9\t2\n").unwrap();
        assert_eq!((d.users, d.items), (1, 2));
        let d = read("1::1193::5::978300760\n1::661::3::978302109\n").unwrap();
        assert_eq!(d.history(0), &[0]);
        assert_eq!(d.test[0], Some(1));
    }

    #[test]
    fn csv_min_rating_filters() {
        let opts = CsvOptions {
            min_rating: Some(4.0),
        };
        let d = read_interactions("1,2,5\n1,3,2\n1,4,4\n".as_bytes(), opts, 0).unwrap();
        assert_eq!(d.item_ids, [2, 4]);
        let e = read_interactions("1,2\n".as_bytes(), opts, 0).unwrap_err();
        assert_eq!(e.line, 1);
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let cases = [
            ("1,2\n1,x\n", 2, "item id `x`"),
            ("user,item\n1,2\n-3,4\n", 3, "user id `-3`"),
            ("1,2,3.5\n1,2\n", 2, "expected 3 fields"),
            ("1,2,3,4,5\n", 1, "found 5"),
            ("1\n", 1, "found 1"),
            ("1,2,good\n", 1, "rating `good`"),
            ("1,2,3,yesterday\n", 1, "timestamp `yesterday`"),
            ("1,2,nan\n", 1, "rating `nan`"),
        ];
        for (text, line, needle) in cases {
            let e = read(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")));
        }
        assert_eq!(read("").unwrap_err().line, 0);
        assert_eq!(read("user,item\n").unwrap_err().line, 0);
    }
}
