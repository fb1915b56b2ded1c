//! Corpora: a text file (one sentence per line, words separated by
//! whitespace), or a generated corpus with planted word clusters.
//!
//! # The generated corpus
//!
//! Words belong to hidden topics (`animal000`, `animal001`, … `fruit000`, …)
//! and a few function words (`the`, `of`, …) belong to none. Each sentence
//! picks one topic; each of its words is a function word with probability
//! `function_share`, a word of another random topic with probability
//! `noise`, and otherwise a word of the sentence's topic, drawn with Zipf
//! frequencies. Words of one topic therefore share contexts, and a good
//! embedding puts them next to each other: the planted clusters are the
//! ground truth of [`Corpus::clusters`].

use std::collections::HashMap;
use std::io::BufRead;

use embtable::Vocab;

use crate::rng::{Rng, Weighted};

/// Function words of the generated corpus: frequent, in every topic.
const FUNCTION_WORDS: [&str; 16] = [
    "the", "of", "and", "a", "to", "in", "is", "that", "it", "was", "for", "on", "with", "as",
    "at", "by",
];

/// Topic names of the generated corpus.
const TOPICS: [&str; 16] = [
    "animal", "fruit", "color", "city", "sport", "music", "tool", "weather", "body", "food",
    "vehicle", "job", "plant", "metal", "fabric", "game",
];

/// Sentences longer than this are cut (as word2vec does with long lines).
pub const MAX_SENTENCE: usize = 1000;

/// A corpus as word ids, with its vocabulary sorted by decreasing count.
#[derive(Clone, Debug, PartialEq)]
pub struct Corpus {
    /// Words, most frequent first (id = rank).
    pub vocab: Vocab,
    /// How often each word occurs.
    pub counts: Vec<u64>,
    /// Sentences of word ids.
    pub sentences: Vec<Vec<u32>>,
    /// The planted topic of each word (generated corpora only; `None` for
    /// function words).
    pub clusters: Option<Vec<Option<usize>>>,
}

impl Corpus {
    /// Total number of words.
    pub fn tokens(&self) -> usize {
        self.sentences.iter().map(Vec::len).sum()
    }

    /// Builds a corpus from sentences of provisional ids into `words`:
    /// counts, drops words seen fewer than `min_count` times, and renumbers
    /// the rest by decreasing count (ties: first seen first).
    fn finish(words: Vec<String>, sentences: Vec<Vec<u32>>, min_count: u64) -> Corpus {
        let mut counts = vec![0u64; words.len()];
        for s in &sentences {
            for &w in s {
                counts[w as usize] += 1;
            }
        }
        let mut order: Vec<usize> = (0..words.len())
            .filter(|&w| counts[w] >= min_count.max(1))
            .collect();
        order.sort_by_key(|&w| std::cmp::Reverse(counts[w])); // stable
        let mut new_id = vec![u32::MAX; words.len()];
        for (rank, &w) in order.iter().enumerate() {
            new_id[w] = rank as u32;
        }
        let sentences: Vec<Vec<u32>> = sentences
            .into_iter()
            .map(|s| {
                s.into_iter()
                    .map(|w| new_id[w as usize])
                    .filter(|&w| w != u32::MAX)
                    .collect::<Vec<_>>()
            })
            .filter(|s| !s.is_empty())
            .collect();
        let vocab = Vocab::from_words(order.iter().map(|&w| words[w].as_str()))
            .expect("words are distinct");
        Corpus {
            vocab,
            counts: order.iter().map(|&w| counts[w]).collect(),
            sentences,
            clusters: None,
        }
    }
}

/// Reads a corpus: one sentence per line, words separated by whitespace
/// (lines longer than [`MAX_SENTENCE`] words are cut into several
/// sentences); words seen fewer than `min_count` times are dropped.
///
/// # Errors
/// Read failures and invalid UTF-8, with the 1-based line number.
pub fn read_text(reader: impl BufRead, min_count: u64) -> Result<Corpus, String> {
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut words = Vec::new();
    let mut sentences = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| format!("line {}: {e}", n + 1))?;
        let mut sentence = Vec::new();
        for token in line.split_whitespace() {
            let next = words.len() as u32;
            let id = *ids.entry(token.to_owned()).or_insert_with(|| {
                words.push(token.to_owned());
                next
            });
            sentence.push(id);
            if sentence.len() == MAX_SENTENCE {
                sentences.push(std::mem::take(&mut sentence));
            }
        }
        if !sentence.is_empty() {
            sentences.push(sentence);
        }
    }
    let corpus = Corpus::finish(words, sentences, min_count);
    if corpus.vocab.is_empty() {
        return Err(format!("no word occurs at least {min_count} times"));
    }
    Ok(corpus)
}

/// The shape of a generated corpus (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CorpusConfig {
    /// Number of topics (at most 16).
    pub topics: usize,
    /// Words per topic.
    pub words_per_topic: usize,
    /// Number of sentences.
    pub sentences: usize,
    /// Shortest and longest sentence, in words.
    pub len: (usize, usize),
    /// Share of function words.
    pub function_share: f64,
    /// Share of words from another topic.
    pub noise: f64,
}

impl Default for CorpusConfig {
    /// 16 topics of 200 words, 30,000 sentences of 8–16 words (about
    /// 360,000 words), 30% function words, 20% words of other topics.
    fn default() -> Self {
        CorpusConfig {
            topics: 16,
            words_per_topic: 200,
            sentences: 30_000,
            len: (8, 16),
            function_share: 0.3,
            noise: 0.2,
        }
    }
}

/// Generates a corpus with planted clusters from `seed`.
///
/// # Panics
/// If `topics` is 0 or above 16, `words_per_topic` is 0, or `len` is empty.
pub fn generate(cfg: &CorpusConfig, seed: u64) -> Corpus {
    assert!((1..=TOPICS.len()).contains(&cfg.topics) && cfg.words_per_topic > 0);
    assert!(0 < cfg.len.0 && cfg.len.0 <= cfg.len.1);
    let f = FUNCTION_WORDS.len();
    let mut words: Vec<String> = FUNCTION_WORDS.iter().map(|w| w.to_string()).collect();
    let mut topic_of = vec![None; f];
    let width = (cfg.words_per_topic - 1).max(10).to_string().len();
    for (t, name) in TOPICS.iter().enumerate().take(cfg.topics) {
        for i in 0..cfg.words_per_topic {
            words.push(format!("{name}{i:0width$}"));
            topic_of.push(Some(t));
        }
    }
    let zipf = |n: usize| Weighted::new((0..n).map(|r| 1.0 / (r + 1) as f64));
    let function = zipf(f);
    let in_topic = zipf(cfg.words_per_topic);
    let topic_word = |t: usize, r: usize| (f + t * cfg.words_per_topic + r) as u32;

    let mut rng = Rng::derive(seed, &[10]);
    let mut sentences = Vec::with_capacity(cfg.sentences);
    for _ in 0..cfg.sentences {
        let topic = rng.below(cfg.topics);
        let len = cfg.len.0 + rng.below(cfg.len.1 - cfg.len.0 + 1);
        let sentence: Vec<u32> = (0..len)
            .map(|_| {
                let x = rng.f64();
                if x < cfg.function_share {
                    function.sample(&mut rng) as u32
                } else if x < cfg.function_share + cfg.noise {
                    topic_word(rng.below(cfg.topics), in_topic.sample(&mut rng))
                } else {
                    topic_word(topic, in_topic.sample(&mut rng))
                }
            })
            .collect();
        sentences.push(sentence);
    }
    let mut corpus = Corpus::finish(words.clone(), sentences, 1);
    let topic_by_word: HashMap<&str, Option<usize>> = words
        .iter()
        .map(String::as_str)
        .zip(topic_of.iter().copied())
        .collect();
    corpus.clusters = Some(
        corpus
            .vocab
            .words()
            .iter()
            .map(|w| topic_by_word[w.as_str()])
            .collect(),
    );
    corpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_corpus_is_deterministic_with_planted_clusters() {
        let cfg = CorpusConfig {
            sentences: 2_000,
            ..CorpusConfig::default()
        };
        let a = generate(&cfg, 1);
        assert_eq!(a, generate(&cfg, 1));
        assert_ne!(a.sentences, generate(&cfg, 2).sentences);
        // Sorted by count, function words on top, every word has a cluster entry.
        assert!(a.counts.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(a.vocab.word(0), Some("the"));
        let clusters = a.clusters.as_ref().unwrap();
        assert_eq!(clusters.len(), a.vocab.len());
        assert_eq!(clusters[a.vocab.get("fruit003").unwrap()], Some(1));
        assert_eq!(clusters[a.vocab.get("of").unwrap()], None);
        assert!(a.tokens() >= 2_000 * cfg.len.0 && a.tokens() <= 2_000 * cfg.len.1);
    }

    #[test]
    fn text_corpus_counts_sorts_and_drops_rare_words() {
        let text = "b a b\n\n  c b a \nd\n";
        let c = read_text(text.as_bytes(), 2).unwrap();
        assert_eq!(c.vocab.words(), ["b", "a"]);
        assert_eq!(c.counts, [3, 2]);
        // "d" was dropped, and with it the sentence that held only "d".
        assert_eq!(c.sentences, [vec![0, 1, 0], vec![0, 1]]);
        assert_eq!(c.clusters, None);

        let long = "w ".repeat(MAX_SENTENCE + 5);
        let c = read_text(long.as_bytes(), 1).unwrap();
        let lens: Vec<usize> = c.sentences.iter().map(Vec::len).collect();
        assert_eq!(lens, [MAX_SENTENCE, 5]);

        assert!(read_text("a b\n".as_bytes(), 2).is_err());
        let bad: &[u8] = b"ok\n\xff\xfe\n";
        assert!(read_text(bad, 1).unwrap_err().starts_with("line 2:"));
    }
}
