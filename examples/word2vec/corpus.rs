//! Corpora, streamed: a text file (one sentence per line), a generated
//! corpus with planted word clusters, or sentences already in memory.
//!
//! Only the vocabulary stays in memory. A first pass counts the words; each
//! epoch then reads the corpus again, a batch of sentences at a time
//! ([`Reader`]). The reading thread only copies lines; the training workers
//! cut them into words ([`Tokenizer`]) and look the words up, in parallel.
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
//! ground truth of [`Corpus::clusters`]. Sentence `i` is drawn from its own
//! random stream, so any sentence can be made again without the others.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

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

/// How a line is cut into words.
///
/// By default at whitespace only, as word2vec does. `lowercase` folds case
/// (Unicode), `strip_punctuation` turns every character that is neither a
/// letter, a digit nor whitespace into a space, except an apostrophe or a
/// hyphen between two letters or digits (`don't`, `e-mail`) and a point or
/// a comma between two digits (`3.14`, `1,000`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokenizer {
    /// Fold case.
    pub lowercase: bool,
    /// Drop punctuation and symbols.
    pub strip_punctuation: bool,
}

impl Tokenizer {
    /// Calls `word` with each word of `line`; `buf` is scratch.
    pub fn for_each_word(&self, line: &str, buf: &mut String, mut word: impl FnMut(&str)) {
        if !self.lowercase && !self.strip_punctuation {
            line.split_whitespace().for_each(word);
            return;
        }
        buf.clear();
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            let next = chars.peek().copied().unwrap_or(' ');
            let keep = !self.strip_punctuation
                || c.is_alphanumeric()
                || c.is_whitespace()
                || match c {
                    '\'' | '’' | '-' => prev.is_alphanumeric() && next.is_alphanumeric(),
                    '.' | ',' => prev.is_ascii_digit() && next.is_ascii_digit(),
                    _ => false,
                };
            if !keep {
                buf.push(' ');
            } else if self.lowercase {
                buf.extend(c.to_lowercase());
            } else {
                buf.push(c);
            }
            prev = c;
        }
        buf.split_whitespace().for_each(&mut word);
    }
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

/// Where the sentences come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A text file, read again every epoch.
    Text {
        /// The file.
        path: PathBuf,
        /// How its lines become words.
        tokenizer: Tokenizer,
    },
    /// Sentences made from a seed when needed.
    Generated(Generator),
    /// Sentences of word ids held in memory (tests and `--bench`).
    Ids(Vec<Vec<u32>>),
}

/// A corpus: the vocabulary, sorted by decreasing count, and where to read
/// the sentences.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Words, most frequent first (id = rank).
    pub vocab: Vocab,
    /// How often each word occurs.
    pub counts: Vec<u64>,
    /// The planted topic of each word (generated corpora only; `None` for
    /// function words).
    pub clusters: Option<Vec<Option<usize>>>,
    /// Where the sentences come from.
    pub source: Source,
    /// Sentences (lines, for a file: empty ones included).
    pub sentences: u64,
}

impl Corpus {
    /// Occurrences of vocabulary words (word2vec's "train words").
    pub fn tokens(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// A reader of one pass over the sentences.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn reader(&self) -> Result<Reader<'_>, String> {
        let lines = match &self.source {
            Source::Text { path, .. } => Some(BufReader::with_capacity(
                1 << 20,
                File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?,
            )),
            _ => None,
        };
        Ok(Reader {
            corpus: self,
            next: 0,
            lines,
        })
    }

    /// Writes sentence `i` of `batch` into `ids` as vocabulary ids (words
    /// outside the vocabulary are left out); `buf` is scratch.
    pub fn sentence(&self, batch: &Batch, i: usize, buf: &mut String, ids: &mut Vec<u32>) {
        ids.clear();
        match &self.source {
            Source::Text { tokenizer, .. } => {
                let line = &batch.text[batch.ends[i]..batch.ends[i + 1]];
                tokenizer.for_each_word(line, buf, |w| {
                    if let Some(id) = self.vocab.get(w) {
                        ids.push(id as u32);
                    }
                });
            }
            Source::Generated(g) => g.sentence(batch.first + i as u64, ids),
            Source::Ids(sentences) => ids.extend_from_slice(&sentences[batch.first as usize + i]),
        }
    }

    /// A corpus of sentences of provisional ids into `words` (tests): counts, drops
    /// words seen fewer than `min_count` times, and renumbers the rest by
    /// decreasing count (ties: first seen first).
    #[cfg(test)]
    pub fn from_sentences(words: &[String], sentences: &[Vec<u32>], min_count: u64) -> Corpus {
        let mut counts = vec![0u64; words.len()];
        for &w in sentences.iter().flatten() {
            counts[w as usize] += 1;
        }
        let (vocab, counts, new_id) = rank(words, &counts, min_count);
        let ids = sentences
            .iter()
            .map(|s| {
                s.iter()
                    .map(|&w| new_id[w as usize])
                    .filter(|&w| w != u32::MAX)
                    .collect()
            })
            .collect();
        Corpus {
            vocab,
            counts,
            clusters: None,
            source: Source::Ids(ids),
            sentences: sentences.len() as u64,
        }
    }

    /// The same corpus with its sentences read into memory, as ids.
    ///
    /// # Errors
    /// As [`Reader::fill`].
    pub fn to_ids(&self) -> Result<Corpus, String> {
        let mut reader = self.reader()?;
        let (mut batch, mut buf, mut ids) = (Batch::default(), String::new(), Vec::new());
        let mut sentences = Vec::new();
        while reader.fill(&mut batch, 4096)? {
            for i in 0..batch.len() {
                self.sentence(&batch, i, &mut buf, &mut ids);
                sentences.push(ids.clone());
            }
        }
        Ok(Corpus {
            source: Source::Ids(sentences),
            ..self.clone()
        })
    }
}

/// Words of `words` with `counts >= min_count` (at least 1), by decreasing
/// count, ties in order: the vocabulary, its counts, and the new id of each
/// old one (`u32::MAX`: dropped).
fn rank(words: &[String], counts: &[u64], min_count: u64) -> (Vocab, Vec<u64>, Vec<u32>) {
    let mut order: Vec<usize> = (0..words.len())
        .filter(|&w| counts[w] >= min_count.max(1))
        .collect();
    order.sort_by_key(|&w| std::cmp::Reverse(counts[w])); // stable
    let mut new_id = vec![u32::MAX; words.len()];
    for (rank, &w) in order.iter().enumerate() {
        new_id[w] = rank as u32;
    }
    let vocab =
        Vocab::from_words(order.iter().map(|&w| words[w].as_str())).expect("words are distinct");
    (vocab, order.iter().map(|&w| counts[w]).collect(), new_id)
}

/// Counts the words of a text file (one sentence per line) and keeps those
/// seen at least `min_count` times; the sentences stay in the file.
///
/// # Errors
/// Read failures and invalid UTF-8, with the 1-based line number.
pub fn read_text(path: &Path, tokenizer: Tokenizer, min_count: u64) -> Result<Corpus, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let (counted, lines) = count_words(BufReader::new(file), tokenizer)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (words, counts): (Vec<String>, Vec<u64>) = counted.into_iter().unzip();
    let (vocab, counts, _) = rank(&words, &counts, min_count);
    if vocab.is_empty() {
        return Err(format!(
            "{}: no word occurs at least {min_count} times",
            path.display()
        ));
    }
    Ok(Corpus {
        vocab,
        counts,
        clusters: None,
        source: Source::Text {
            path: path.to_owned(),
            tokenizer,
        },
        sentences: lines,
    })
}

/// Every word of `reader` with its count, in order of first appearance, and
/// the number of lines.
fn count_words(
    mut reader: impl BufRead,
    tokenizer: Tokenizer,
) -> Result<(Vec<(String, u64)>, u64), String> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut words: Vec<(String, u64)> = Vec::new();
    let (mut line, mut buf) = (String::new(), String::new());
    let mut n = 0u64;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => n += 1,
            Err(e) => return Err(format!("line {}: {e}", n + 1)),
        }
        tokenizer.for_each_word(&line, &mut buf, |w| match index.get(w) {
            Some(&i) => words[i].1 += 1,
            None => {
                index.insert(w.to_owned(), words.len());
                words.push((w.to_owned(), 1));
            }
        });
    }
    Ok((words, n))
}

/// One pass over a corpus, a batch at a time.
#[derive(Debug)]
pub struct Reader<'a> {
    corpus: &'a Corpus,
    /// Index of the next sentence.
    next: u64,
    lines: Option<BufReader<File>>,
}

/// A run of consecutive sentences of the corpus. A file's lines are copied
/// in as text; other sources only need the index of the first.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Index of the first sentence in the pass.
    pub first: u64,
    len: usize,
    /// Lines of a text source, one after the other (newlines included).
    text: String,
    /// Line `i` is `text[ends[i]..ends[i + 1]]`; for sentences of ids,
    /// `ends[i]` counts the words before sentence `i` (for [`Batch::shard`]).
    ends: Vec<usize>,
}

impl Batch {
    /// The sentences of shard `k` of `shards`: consecutive runs of about
    /// equal size (in bytes for text, in words for ids, in sentences for a
    /// generated corpus), the same for any thread count. Every shard waits
    /// for the slowest, so sizes closer to the work balance the threads.
    pub fn shard(&self, k: usize, shards: usize) -> std::ops::Range<usize> {
        let start = |k: usize| {
            if k >= shards {
                self.len
            } else if self.ends.len() == self.len + 1 {
                let total = self.ends[self.len];
                let at = (total as u128 * k as u128 / shards as u128) as usize;
                self.ends.partition_point(|&e| e < at).min(self.len)
            } else {
                self.len * k / shards
            }
        };
        start(k)..start(k + 1)
    }

    /// Sentences in the batch.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Reader<'_> {
    /// Replaces `batch` with the next `n` sentences (fewer at the end);
    /// `false` when the pass is over.
    ///
    /// # Errors
    /// Read failures and invalid UTF-8, with the 1-based line number.
    pub fn fill(&mut self, batch: &mut Batch, n: usize) -> Result<bool, String> {
        batch.first = self.next;
        batch.text.clear();
        batch.ends.clear();
        batch.ends.push(0);
        let left = self.corpus.sentences - self.next;
        batch.len = match &mut self.lines {
            None => {
                let len = left.min(n as u64) as usize;
                if let Source::Ids(sentences) = &self.corpus.source {
                    let mut words = 0;
                    for s in &sentences[self.next as usize..][..len] {
                        words += s.len();
                        batch.ends.push(words);
                    }
                }
                len
            }
            Some(lines) => {
                let mut len = 0;
                while len < n {
                    match lines.read_line(&mut batch.text) {
                        Ok(0) => break,
                        Ok(_) => {
                            batch.ends.push(batch.text.len());
                            len += 1;
                        }
                        Err(e) => return Err(format!("line {}: {e}", self.next + len as u64 + 1)),
                    }
                }
                len
            }
        };
        self.next += batch.len as u64;
        Ok(batch.len > 0)
    }
}

/// Makes the sentences of a generated corpus.
#[derive(Clone, Debug)]
pub struct Generator {
    cfg: CorpusConfig,
    seed: u64,
    function: Weighted,
    in_topic: Weighted,
    /// Vocabulary id of each word in generation order (function words,
    /// then each topic's words).
    id: Vec<u32>,
}

impl Generator {
    /// Sentence `i`, as ids of generation order mapped through `self.id`.
    fn sentence(&self, i: u64, out: &mut Vec<u32>) {
        let cfg = &self.cfg;
        let mut rng = Rng::derive(self.seed, &[10, i]);
        let f = FUNCTION_WORDS.len();
        let topic_word = |t: usize, r: usize| self.id[f + t * cfg.words_per_topic + r];
        let topic = rng.below(cfg.topics);
        let len = cfg.len.0 + rng.below(cfg.len.1 - cfg.len.0 + 1);
        out.extend((0..len).map(|_| {
            let x = rng.f64();
            if x < cfg.function_share {
                self.id[self.function.sample(&mut rng)]
            } else if x < cfg.function_share + cfg.noise {
                topic_word(rng.below(cfg.topics), self.in_topic.sample(&mut rng))
            } else {
                topic_word(topic, self.in_topic.sample(&mut rng))
            }
        }));
    }
}

/// A generated corpus with planted clusters from `seed`. Counting its words
/// makes every sentence once; training makes them again.
///
/// # Panics
/// If `topics` is 0 or above 16, `words_per_topic` is 0, or `len` is empty.
pub fn generate(cfg: &CorpusConfig, seed: u64) -> Corpus {
    assert!((1..=TOPICS.len()).contains(&cfg.topics) && cfg.words_per_topic > 0);
    assert!(0 < cfg.len.0 && cfg.len.0 <= cfg.len.1);
    let mut words: Vec<String> = FUNCTION_WORDS.iter().map(|w| w.to_string()).collect();
    let mut topic_of = vec![None; FUNCTION_WORDS.len()];
    let width = (cfg.words_per_topic - 1).max(10).to_string().len();
    for (t, name) in TOPICS.iter().enumerate().take(cfg.topics) {
        for i in 0..cfg.words_per_topic {
            words.push(format!("{name}{i:0width$}"));
            topic_of.push(Some(t));
        }
    }
    let zipf = |n: usize| Weighted::new((0..n).map(|r| 1.0 / (r + 1) as f64));
    let mut generator = Generator {
        cfg: *cfg,
        seed,
        function: zipf(FUNCTION_WORDS.len()),
        in_topic: zipf(cfg.words_per_topic),
        id: (0..words.len() as u32).collect(),
    };
    let mut counts = vec![0u64; words.len()];
    let mut sentence = Vec::new();
    for i in 0..cfg.sentences as u64 {
        sentence.clear();
        generator.sentence(i, &mut sentence);
        for &w in &sentence {
            counts[w as usize] += 1;
        }
    }
    // Every word is kept, even one never drawn, so that ids stay dense.
    let counts: Vec<u64> = counts.iter().map(|&c| c.max(1)).collect();
    let (vocab, counts, new_id) = rank(&words, &counts, 1);
    generator.id = new_id;
    let mut clusters = vec![None; words.len()];
    for (w, t) in topic_of.into_iter().enumerate() {
        clusters[generator.id[w] as usize] = t;
    }
    Corpus {
        vocab,
        counts,
        clusters: Some(clusters),
        source: Source::Generated(generator),
        sentences: cfg.sentences as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sentence of one pass, read `batch` at a time.
    fn all_sentences(c: &Corpus, batch: usize) -> Vec<Vec<u32>> {
        let mut reader = c.reader().unwrap();
        let (mut b, mut buf, mut ids) = (Batch::default(), String::new(), Vec::new());
        let mut out = Vec::new();
        while reader.fill(&mut b, batch).unwrap() {
            for i in 0..b.len() {
                c.sentence(&b, i, &mut buf, &mut ids);
                out.push(ids.clone());
            }
        }
        out
    }

    /// A file under the temp dir with `text`, removed on drop.
    struct TempText(PathBuf);

    impl TempText {
        fn new(name: &str, text: &[u8]) -> Self {
            let path = std::env::temp_dir()
                .join(format!("embtable-w2v-{}-{name}.txt", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempText(path)
        }
    }

    impl Drop for TempText {
        fn drop(&mut self) {
            std::fs::remove_file(&self.0).ok();
        }
    }

    #[test]
    fn generated_corpus_is_deterministic_with_planted_clusters() {
        let cfg = CorpusConfig {
            sentences: 2_000,
            ..CorpusConfig::default()
        };
        let a = generate(&cfg, 1);
        let sentences = all_sentences(&a, 300);
        assert_eq!(sentences, all_sentences(&generate(&cfg, 1), 7));
        assert_ne!(sentences, all_sentences(&generate(&cfg, 2), 300));
        assert_eq!(sentences.len(), 2_000);
        // Sorted by count, function words on top, every word has a cluster entry.
        assert!(a.counts.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(a.vocab.word(0), Some("the"));
        let clusters = a.clusters.as_ref().unwrap();
        assert_eq!(clusters.len(), a.vocab.len());
        assert_eq!(clusters[a.vocab.get("fruit003").unwrap()], Some(1));
        assert_eq!(clusters[a.vocab.get("of").unwrap()], None);
        // The counts are those of the sentences the reader gives.
        let mut counts = vec![0u64; a.vocab.len()];
        for &w in sentences.iter().flatten() {
            counts[w as usize] += 1;
        }
        let seen: Vec<u64> = counts.iter().map(|&c| c.max(1)).collect();
        assert_eq!(seen, a.counts);
        let tokens = counts.iter().sum::<u64>() as usize;
        assert!(tokens >= 2_000 * cfg.len.0 && tokens <= 2_000 * cfg.len.1);
        // A sentence's words mostly come from one topic.
        let topics: Vec<usize> = sentences[0]
            .iter()
            .filter_map(|&w| clusters[w as usize])
            .collect();
        let top = (0..16)
            .map(|t| topics.iter().filter(|&&x| x == t).count())
            .max()
            .unwrap();
        assert!(top * 2 >= topics.len(), "{topics:?}");
    }

    /// Shards of sentences of ids hold about equal numbers of words, and
    /// together every sentence once.
    #[test]
    fn shards_of_ids_split_by_words() {
        let words: Vec<String> = ["a", "b"].map(String::from).into();
        let long = vec![0u32; 12];
        let sentences = [vec![long], vec![vec![1u32, 0]; 6]].concat();
        let c = Corpus::from_sentences(&words, &sentences, 1);
        let mut reader = c.reader().unwrap();
        let mut batch = Batch::default();
        assert!(reader.fill(&mut batch, 7).unwrap());
        // 24 words: the long sentence alone is half of them.
        assert_eq!(batch.shard(0, 2), 0..1);
        assert_eq!(batch.shard(1, 2), 1..7);
        let thirds: Vec<_> = (0..3).map(|k| batch.shard(k, 3)).collect();
        // A shard starts at the first sentence at or past its share of words.
        assert_eq!(thirds, [0..1, 1..3, 3..7]);
    }

    #[test]
    fn text_corpus_counts_sorts_drops_rare_words_and_streams() {
        let file = TempText::new("count", b"b a b\n\n  c b a \nd\n");
        let c = read_text(&file.0, Tokenizer::default(), 2).unwrap();
        assert_eq!(c.vocab.words(), ["b", "a"]);
        assert_eq!(c.counts, [3, 2]);
        assert_eq!(c.tokens(), 5);
        assert_eq!(c.clusters, None);
        // "d" is outside the vocabulary; empty lines stay as empty sentences.
        let expected = vec![vec![0, 1, 0], vec![], vec![0, 1], vec![]];
        assert_eq!(all_sentences(&c, 3), expected);
        assert_eq!(all_sentences(&c, 1), expected);
        match c.to_ids().unwrap().source {
            Source::Ids(s) => assert_eq!(s, expected),
            other => panic!("{other:?}"),
        }

        let file = TempText::new("rare", b"a b\n");
        assert!(read_text(&file.0, Tokenizer::default(), 2).is_err());
        let file = TempText::new("utf8", b"ok\n\xff\xfe\n");
        let err = read_text(&file.0, Tokenizer::default(), 1).unwrap_err();
        assert!(err.contains("line 2:"), "{err}");
    }

    #[test]
    fn tokenizer_lowercases_and_strips_punctuation_on_request() {
        let words = |t: Tokenizer, line: &str| {
            let mut out = Vec::new();
            t.for_each_word(line, &mut String::new(), |w| out.push(w.to_owned()));
            out
        };
        let line = "The cat's \"toy\"—a MOUSE, isn't it? Élan e-mail: 3.14, 1,000 x.y (ok).";
        assert_eq!(
            words(Tokenizer::default(), line),
            [
                "The",
                "cat's",
                "\"toy\"—a",
                "MOUSE,",
                "isn't",
                "it?",
                "Élan",
                "e-mail:",
                "3.14,",
                "1,000",
                "x.y",
                "(ok)."
            ]
        );
        let both = Tokenizer {
            lowercase: true,
            strip_punctuation: true,
        };
        assert_eq!(
            words(both, line),
            [
                "the", "cat's", "toy", "a", "mouse", "isn't", "it", "élan", "e-mail", "3.14",
                "1,000", "x", "y", "ok"
            ]
        );
        let lower = Tokenizer {
            lowercase: true,
            ..Tokenizer::default()
        };
        assert_eq!(words(lower, "ÉLAN, Ok"), ["élan,", "ok"]);
        let strip = Tokenizer {
            strip_punctuation: true,
            ..Tokenizer::default()
        };
        assert_eq!(words(strip, "ÉLAN, -Ok- 'x'"), ["ÉLAN", "Ok", "x"]);
        // A file read with the tokeniser counts the cleaned words.
        let file = TempText::new("tok", b"The cat. the CAT!\n");
        let c = read_text(&file.0, both, 1).unwrap();
        assert_eq!(c.vocab.words(), ["the", "cat"]);
        assert_eq!(all_sentences(&c, 10), [vec![0, 1, 0, 1]]);
    }
}
