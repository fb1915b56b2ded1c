//! `Vocab`: words in row order, and a hash index from word to row.

use std::fmt;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::{Error, Result};

/// A vocabulary: distinct words, each naming one row of a table.
///
/// Word `i` names row `i`: the words are kept in insertion order (the order
/// of the file they were read from), and [`get`](Self::get) maps a word back
/// to its row through a hash index. Each word is stored once; the index
/// holds only row numbers (a `hashbrown` table keyed by the words' hashes).
///
/// # Examples
/// ```
/// use embtable::Vocab;
/// let mut vocab = Vocab::from_words(["the", "king"])?;
/// assert_eq!(vocab.push("queen")?, 2);
/// assert_eq!(vocab.get("king"), Some(1));
/// assert_eq!(vocab.get("pawn"), None);
/// assert_eq!(vocab.words(), ["the", "king", "queen"]);
/// assert!(vocab.push("the").is_err()); // words are distinct
/// # Ok::<(), embtable::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct Vocab {
    words: Vec<String>,
    index: HashTable<usize>,
    hasher: DefaultHashBuilder,
}

impl Vocab {
    /// An empty vocabulary.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty vocabulary with room for `n` words.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            words: Vec::with_capacity(n),
            index: HashTable::with_capacity(n),
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// A vocabulary of `words`, word `i` naming row `i`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first word that repeats an earlier
    /// one (a repeated word would shift every later row).
    ///
    /// # Examples
    /// ```
    /// use embtable::Vocab;
    /// let vocab = Vocab::from_words(vec!["a".to_string(), "b".to_string()])?;
    /// assert_eq!(vocab.len(), 2);
    /// assert!(Vocab::from_words(["a", "b", "a"]).is_err());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn from_words<I, S>(words: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let words = words.into_iter();
        let mut vocab = Self::with_capacity(words.size_hint().0);
        for word in words {
            vocab.push(word)?;
        }
        Ok(vocab)
    }

    /// Appends `word`, naming the next row, and returns that row.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `word` is already present (the vocabulary
    /// is then unchanged).
    ///
    /// # Examples
    /// ```
    /// use embtable::Vocab;
    /// let mut vocab = Vocab::new();
    /// assert_eq!(vocab.push("to")?, 0);
    /// assert_eq!(vocab.push("be")?, 1);
    /// assert!(vocab.push("to").is_err());
    /// assert_eq!(vocab.len(), 2);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn push(&mut self, word: impl Into<String>) -> Result<usize> {
        let word = word.into();
        match self.get(&word) {
            Some(row) => Err(Error::InvalidConfig {
                field: "word",
                reason: format!(
                    "{word:?} is already in the vocabulary (row {row}); words must be distinct"
                ),
            }),
            None => Ok(self.push_new(word)),
        }
    }

    /// Appends a word known to be absent and returns its row.
    pub(crate) fn push_new(&mut self, word: String) -> usize {
        debug_assert!(self.get(&word).is_none());
        let row = self.words.len();
        let hash = self.hasher.hash_one(word.as_str());
        let (words, hasher) = (&self.words, &self.hasher);
        self.index
            .insert_unique(hash, row, |&r| hasher.hash_one(words[r].as_str()));
        self.words.push(word);
        row
    }

    /// The row of `word`, if present.
    ///
    /// # Examples
    /// ```
    /// use embtable::Vocab;
    /// let vocab = Vocab::from_words(["東京", "naïve"])?;
    /// assert_eq!(vocab.get("naïve"), Some(1));
    /// assert_eq!(vocab.get("naive"), None);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn get(&self, word: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(word);
        self.index.find(hash, |&r| self.words[r] == word).copied()
    }

    /// Whether `word` is present.
    pub fn contains(&self, word: &str) -> bool {
        self.get(word).is_some()
    }

    /// Number of words (= rows named).
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether there are no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// All words, word `i` naming row `i`.
    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// The word naming row `i`, if `i < len()`.
    ///
    /// # Examples
    /// ```
    /// use embtable::Vocab;
    /// let vocab = Vocab::from_words(["a", "b"])?;
    /// assert_eq!(vocab.word(1), Some("b"));
    /// assert_eq!(vocab.word(2), None);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn word(&self, i: usize) -> Option<&str> {
        self.words.get(i).map(String::as_str)
    }

    /// `(word, row)` pairs in row order: the order of Keras'
    /// `word_index.items()` and gensim's `key_to_index.items()`, and of the
    /// pairs [`Pretrained::table_for`](crate::io::Pretrained::table_for)
    /// takes, so a vocabulary can be passed there as it is (`&vocab` is an
    /// iterator of the same pairs).
    ///
    /// # Examples
    /// ```
    /// use embtable::Vocab;
    /// let vocab = Vocab::from_words(["the", "cat"])?;
    /// assert_eq!(vocab.iter().collect::<Vec<_>>(), [("the", 0), ("cat", 1)]);
    /// for (word, row) in &vocab {
    ///     assert_eq!(vocab.get(word), Some(row));
    /// }
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, usize)> + '_ {
        self.into_iter()
    }

    /// The words, word `i` naming row `i`.
    pub fn into_words(self) -> Vec<String> {
        self.words
    }
}

impl fmt::Debug for Vocab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        let mut list = f.debug_list();
        list.entries(self.words.iter().take(SHOWN));
        if self.words.len() > SHOWN {
            list.entry(&format_args!("... {} words in all", self.words.len()));
        }
        list.finish()
    }
}

impl<'a> IntoIterator for &'a Vocab {
    type Item = (&'a str, usize);
    type IntoIter = std::iter::Map<
        std::iter::Enumerate<std::slice::Iter<'a, String>>,
        fn((usize, &'a String)) -> (&'a str, usize),
    >;

    /// [`Vocab::iter`]: `(word, row)` pairs in row order.
    fn into_iter(self) -> Self::IntoIter {
        self.words
            .iter()
            .enumerate()
            .map(|(row, w)| (w.as_str(), row))
    }
}

/// Two vocabularies are equal when they hold the same words in the same order.
impl PartialEq for Vocab {
    fn eq(&self, other: &Self) -> bool {
        self.words == other.words
    }
}

impl Eq for Vocab {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_words_map_back_to_their_rows() {
        let words: Vec<String> = (0..10_000).map(|i| format!("w{i}")).collect();
        let vocab = Vocab::from_words(words.iter().cloned()).unwrap();
        for (i, w) in words.iter().enumerate() {
            assert_eq!(vocab.get(w), Some(i));
            assert_eq!(vocab.word(i), Some(w.as_str()));
        }
        assert_eq!(vocab.get("w10000"), None);
        assert_eq!(vocab.clone(), vocab);
    }

    #[test]
    fn duplicate_push_leaves_vocab_unchanged() {
        let mut vocab = Vocab::from_words(["a", "b"]).unwrap();
        let err = vocab.push("a").unwrap_err();
        assert!(err.to_string().contains("\"a\""), "{err}");
        assert_eq!(vocab.words(), ["a", "b"]);
        assert_eq!(vocab.push("c").unwrap(), 2);
    }
}
