//! Nearest neighbours by cosine similarity, as gensim's `KeyedVectors`
//! answers them: `most_similar` (positive and negative words),
//! `similar_by_vector`, `similarity`, `most_similar_to_given` and
//! unit-normalised vectors, on [`Pretrained`] vectors (read from a file, or
//! a trained table with its vocabulary), and the row-level query behind
//! them on any [`EmbeddingTable`].
//!
//! A query is one pass over the table: every row's dot product with the
//! query and its squared norm are summed together as the row streams by, so
//! the table is read once, in parallel chunks on all of rayon's threads,
//! each keeping its own best `k` rows, merged at the end. No norms are
//! cached, so the table may change between queries.
//!
//! Numbers: the dot product and the squared norm are summed in `f32` over
//! 16 partial sums (lane `j` of the row into partial `j mod 16`), reduced
//! in a fixed order, so a score is the same on every kernel tier and thread
//! count. The cosine is `dot / (‖row‖ · ‖query‖)` in `f64`, rounded once;
//! a row of zeros scores 0 (gensim would give NaN). Rows whose score is NaN
//! (a NaN in the row) are never returned. Ties are broken by the lower row.

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::aligned::LANES_PER_LINE;
use crate::io::Pretrained;
use crate::kernels::{self, Kernel, Simd};
use crate::{EmbeddingTable, Error, Result};

/// Rows scored per parallel task: about 1.2 MB of a 300-float table, enough
/// to amortise scheduling, small enough to balance two to sixteen threads.
const TASK_ROWS: usize = 1 << 10;

impl EmbeddingTable {
    /// The `k` rows most similar to `query` by cosine similarity, best
    /// first, as `(row, cosine)`, leaving out the rows in `exclude`. Fewer
    /// than `k` when the table has fewer rows left. One parallel pass over
    /// the table.
    ///
    /// Each row's dot product with the query and its squared norm are
    /// summed in `f32` over 16 partial sums in a fixed order, so a score has
    /// the same bits on every kernel tier and thread count; the cosine is
    /// `dot / (‖row‖ · ‖query‖)` in `f64`, rounded once. A row of zeros
    /// scores 0, a row holding a NaN is never returned, and ties go to the
    /// lower row.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `query.len() != dim`;
    /// [`Error::NonFinite`] naming the first NaN or infinite query value;
    /// [`Error::InvalidConfig`] (field `query`) if the query is all zeros,
    /// which has no direction.
    ///
    /// # Examples
    /// ```
    /// use embtable::EmbeddingTable;
    /// let table = EmbeddingTable::from_rows(4, 2, &[1., 0., 0., 1., 1., 1., -1., 0.])?;
    /// let best = table.most_similar_rows(&[2.0, 0.1], 2, &[])?;
    /// assert_eq!(best[0].0, 0);
    /// assert_eq!(best[1].0, 2);
    /// assert!((best[1].1 - (2.1 / (2f32.sqrt() * 4.01f32.sqrt()))).abs() < 1e-6);
    /// // Leaving row 0 out:
    /// assert_eq!(table.most_similar_rows(&[2.0, 0.1], 1, &[0])?[0].0, 2);
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn most_similar_rows(
        &self,
        query: &[f32],
        k: usize,
        exclude: &[usize],
    ) -> Result<Vec<(usize, f32)>> {
        let query = self.padded_query(query)?;
        let query_norm = f64::from(norm_squared(&query)).sqrt();
        let (rows, stride) = (self.rows(), self.stride());
        let keep = k.saturating_add(exclude.len());
        let tier = kernels::current();
        let table = self.as_padded();
        let best = (0..rows.div_ceil(TASK_ROWS))
            .into_par_iter()
            .map(|task| {
                let first = task * TASK_ROWS;
                let last = (first + TASK_ROWS).min(rows);
                let mut top = Top::new(keep);
                kernels::dispatch(
                    tier,
                    Score {
                        rows: &table[first * stride..last * stride],
                        stride,
                        query: &query,
                        each: |i: usize, dot: f32, sq: f32| {
                            top.offer(first + i, cosine(dot, sq, query_norm));
                        },
                    },
                );
                top
            })
            .reduce(|| Top::new(keep), Top::merge);
        Ok(best
            .into_sorted()
            .into_iter()
            .filter(|(r, _)| !exclude.contains(r))
            .take(k)
            .collect())
    }

    /// The cosine similarity of rows `a` and `b` (0 if either is all
    /// zeros), summed as [`most_similar_rows`](Self::most_similar_rows)
    /// sums it.
    ///
    /// # Panics
    /// If `a` or `b` is not below `rows()`.
    #[track_caller]
    pub fn cosine(&self, a: usize, b: usize) -> f32 {
        let (x, y) = (self.padded_row(a), self.padded_row(b));
        let (mut dot, mut sq) = (0.0, 0.0);
        kernels::dispatch(
            kernels::current(),
            Score {
                rows: x,
                stride: x.len(),
                query: y,
                each: |_, d, s| (dot, sq) = (d, s),
            },
        );
        cosine(dot, sq, f64::from(norm_squared(y)).sqrt())
    }

    /// Row `i` with its pad lanes.
    #[track_caller]
    fn padded_row(&self, i: usize) -> &[f32] {
        assert!(
            i < self.rows(),
            "row {i} out of range for {}",
            crate::error::count(self.rows(), "row")
        );
        &self.as_padded()[i * self.stride()..][..self.stride()]
    }

    /// `query` checked and padded with zeros to the stride.
    fn padded_query(&self, query: &[f32]) -> Result<Vec<f32>> {
        Error::check_len("query length (dim)", self.dim(), query.len())?;
        crate::grad::check_finite("query", query)?;
        if query.iter().all(|&x| x == 0.0) {
            return Err(Error::InvalidConfig {
                field: "query",
                reason: "the query vector is all zeros, which has no direction".into(),
            });
        }
        let mut padded = vec![0.0; self.stride()];
        padded[..query.len()].copy_from_slice(query);
        Ok(padded)
    }
}

/// `dot / (sqrt(sq) · query_norm)`, 0 for a zero row.
fn cosine(dot: f32, sq: f32, query_norm: f64) -> f32 {
    if sq == 0.0 {
        return 0.0;
    }
    (f64::from(dot) / (f64::from(sq).sqrt() * query_norm)) as f32
}

/// The squared norm of a padded vector, summed as [`Score`] sums it.
fn norm_squared(v: &[f32]) -> f32 {
    let mut sq = 0.0;
    kernels::dispatch(
        kernels::current(),
        Score {
            rows: v,
            stride: v.len(),
            query: v,
            each: |_, _, s| sq = s,
        },
    );
    sq
}

/// For each padded row of `rows` (`stride` floats apart), its dot product
/// with `query` and its squared norm, handed to `each(i, dot, sq)`.
///
/// Per row: 16 partial sums of each (lane `j` into partial `j mod 16`, as
/// `16 / N` vectors of the tier's width), then the 16 partials summed
/// pairwise in a fixed order; products are rounded before they are added.
struct Score<'a, F> {
    rows: &'a [f32],
    stride: usize,
    query: &'a [f32],
    each: F,
}

impl<F: FnMut(usize, f32, f32)> Kernel for Score<'_, F> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let Score {
            rows,
            stride,
            query,
            mut each,
        } = self;
        const P: usize = LANES_PER_LINE;
        let per_line = P / S::N;
        for (i, row) in rows.chunks_exact(stride).enumerate() {
            let mut dot = [s.splat(0.0); P];
            let mut sq = [s.splat(0.0); P];
            for (v, (x, q)) in row
                .chunks_exact(S::N)
                .zip(query.chunks_exact(S::N))
                .enumerate()
            {
                let (x, q) = (s.load(x), s.load(q));
                let p = v % per_line;
                dot[p] = s.add(dot[p], s.mul(x, q));
                sq[p] = s.add(sq[p], s.mul(x, x));
            }
            each(i, reduce(s, &dot), reduce(s, &sq));
        }
    }
}

/// The sum of the 16 partials held in the first `16 / N` vectors of `acc`,
/// pairwise in a fixed order.
#[inline(always)]
fn reduce<S: Simd>(s: S, acc: &[S::V; LANES_PER_LINE]) -> f32 {
    let mut p = [0.0f32; LANES_PER_LINE];
    for (q, a) in acc.iter().enumerate().take(LANES_PER_LINE / S::N) {
        s.store(*a, &mut p[q * S::N..]);
    }
    let mut half = LANES_PER_LINE / 2;
    while half > 0 {
        for i in 0..half {
            p[i] += p[i + half];
        }
        half /= 2;
    }
    p[0]
}

/// The best `k` (row, score) pairs seen: highest score first, ties to the
/// lower row, NaN scores never kept.
struct Top {
    k: usize,
    /// Sorted best first; at most `k` long.
    best: Vec<(usize, f32)>,
}

impl Top {
    fn new(k: usize) -> Self {
        Self {
            k,
            best: Vec::with_capacity(k.min(1 << 16) + 1),
        }
    }

    fn offer(&mut self, row: usize, score: f32) {
        if self.k == 0 || score.is_nan() {
            return;
        }
        if self.best.len() == self.k {
            let worst = self.best[self.k - 1];
            if better((row, score), worst) != Ordering::Less {
                return;
            }
            self.best.pop();
        }
        let at = self
            .best
            .partition_point(|&e| better(e, (row, score)) == Ordering::Less);
        self.best.insert(at, (row, score));
    }

    fn merge(mut self, other: Top) -> Top {
        for (row, score) in other.best {
            self.offer(row, score);
        }
        self
    }

    fn into_sorted(self) -> Vec<(usize, f32)> {
        self.best
    }
}

/// `Less` when `a` ranks before `b`: a higher score, or the same score and
/// a lower row.
fn better(a: (usize, f32), b: (usize, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

// ------------------------------------------------------------- word queries

impl Pretrained {
    /// The `topn` words most similar to the positive words minus the
    /// negative ones, best first, with their cosine similarity: gensim's
    /// `most_similar(positive=…, negative=…, topn=…)`, and the analogy
    /// "king − man + woman". The query is the sum of the words'
    /// unit-normalised vectors (negative ones subtracted), and the words
    /// asked about are left out of the answer, as gensim does.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `positive` or `negative`) naming a
    /// word not in the vocabulary; (field `query`) if both lists are empty
    /// or the words cancel out (a word whose vector is all zeros adds
    /// nothing, as in gensim).
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Pretrained;
    /// use embtable::{EmbeddingTable, Vocab};
    /// let vectors = Pretrained::new(
    ///     Vocab::from_words(["king", "man", "woman", "queen", "apple"])?,
    ///     EmbeddingTable::from_rows(5, 3, &[
    ///         1.0, 1.0, 0.0, // king: royal, male
    ///         0.0, 1.0, 0.0, // man
    ///         0.0, 0.0, 1.0, // woman
    ///         1.0, 0.0, 1.0, // queen: royal, female
    ///         -1.0, 0.2, 0.2, // apple
    ///     ])?,
    /// )?;
    /// let answer = vectors.most_similar(&["king", "woman"], &["man"], 1)?;
    /// assert_eq!(answer[0].0, "queen");
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn most_similar(
        &self,
        positive: &[&str],
        negative: &[&str],
        topn: usize,
    ) -> Result<Vec<(&str, f32)>> {
        let mut query = vec![0.0f32; self.dim()];
        let mut asked = Vec::with_capacity(positive.len() + negative.len());
        for (field, words, sign) in [("positive", positive, 1.0f32), ("negative", negative, -1.0)] {
            for word in words {
                let row = self.row_of(field, word)?;
                for (q, u) in query.iter_mut().zip(unit(self.table.row(row))) {
                    *q += sign * u;
                }
                asked.push(row);
            }
        }
        if asked.is_empty() {
            return Err(Error::InvalidConfig {
                field: "query",
                reason: "no positive and no negative words: nothing to compare with".into(),
            });
        }
        let best = self.table.most_similar_rows(&query, topn, &asked)?;
        Ok(self.named(best))
    }

    /// The `topn` words whose vectors are most similar to `vector`, best
    /// first: gensim's `similar_by_vector`. No word is left out.
    ///
    /// # Errors
    /// As [`EmbeddingTable::most_similar_rows`].
    pub fn similar_by_vector(&self, vector: &[f32], topn: usize) -> Result<Vec<(&str, f32)>> {
        let best = self.table.most_similar_rows(vector, topn, &[])?;
        Ok(self.named(best))
    }

    /// The cosine similarity of two words (0 if either vector is all
    /// zeros): gensim's `similarity`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `word`) naming a word not in the
    /// vocabulary.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Pretrained;
    /// use embtable::{EmbeddingTable, Vocab};
    /// let v = Pretrained::new(
    ///     Vocab::from_words(["a", "b", "c"])?,
    ///     EmbeddingTable::from_rows(3, 2, &[1., 0., 3., 0., 0., 2.])?,
    /// )?;
    /// assert_eq!(v.similarity("a", "b")?, 1.0);
    /// assert_eq!(v.similarity("a", "c")?, 0.0);
    /// assert!(v.similarity("a", "z").is_err());
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn similarity(&self, a: &str, b: &str) -> Result<f32> {
        let (a, b) = (self.row_of("word", a)?, self.row_of("word", b)?);
        Ok(self.table.cosine(a, b))
    }

    /// Of `candidates`, the word most similar to `word` (the first of
    /// equals): gensim's `most_similar_to_given`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `word` or `candidates`) naming a
    /// word not in the vocabulary, or if `candidates` is empty.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Pretrained;
    /// use embtable::{EmbeddingTable, Vocab};
    /// let v = Pretrained::new(
    ///     Vocab::from_words(["cat", "dog", "car"])?,
    ///     EmbeddingTable::from_rows(3, 2, &[1., 0.1, 0.9, 0.2, -0.1, 1.])?,
    /// )?;
    /// assert_eq!(v.most_similar_to_given("cat", &["car", "dog"])?, "dog");
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn most_similar_to_given<'w>(&self, word: &str, candidates: &[&'w str]) -> Result<&'w str> {
        let row = self.row_of("word", word)?;
        let mut best: Option<(&'w str, f32)> = None;
        for &candidate in candidates {
            let score = self
                .table
                .cosine(row, self.row_of("candidates", candidate)?);
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((candidate, score));
            }
        }
        best.map(|(w, _)| w).ok_or_else(|| Error::InvalidConfig {
            field: "candidates",
            reason: "no candidate words to choose from".into(),
        })
    }

    /// The vector of `word` scaled to unit L2 norm (all zeros stays all
    /// zeros): gensim's `get_vector(word, norm=True)`.
    pub fn unit_vector(&self, word: &str) -> Option<Vec<f32>> {
        let row = self.vocab.get(word)?;
        Some(unit(self.table.row(row)))
    }

    /// Scales every vector to unit L2 norm in place (rows of zeros stay
    /// zeros): gensim's `unit_normalize_all`. Queries give the same words
    /// after it; similarities become plain dot products.
    ///
    /// # Examples
    /// ```
    /// use embtable::io::Pretrained;
    /// use embtable::{EmbeddingTable, Vocab};
    /// let mut v = Pretrained::new(
    ///     Vocab::from_words(["a", "b"])?,
    ///     EmbeddingTable::from_rows(2, 2, &[3., 4., 0., 0.])?,
    /// )?;
    /// v.unit_normalize_all();
    /// assert_eq!(v.vector("a"), Some(&[0.6, 0.8][..]));
    /// assert_eq!(v.vector("b"), Some(&[0.0, 0.0][..]));
    /// # Ok::<(), embtable::Error>(())
    /// ```
    pub fn unit_normalize_all(&mut self) {
        let dim = self.table.dim();
        let stride = self.table.stride();
        self.table
            .as_padded_mut()
            .par_chunks_mut(stride)
            .with_min_len(256)
            .for_each(|row| {
                let u = unit(&row[..dim]);
                row[..dim].copy_from_slice(&u);
            });
    }

    /// The row of `word`, or an error naming it under `field`.
    fn row_of(&self, field: &'static str, word: &str) -> Result<usize> {
        self.vocab.get(word).ok_or_else(|| Error::InvalidConfig {
            field,
            reason: format!("word {word:?} is not in the vocabulary"),
        })
    }

    fn named(&self, best: Vec<(usize, f32)>) -> Vec<(&str, f32)> {
        best.into_iter()
            .map(|(r, s)| (self.vocab.word(r).unwrap_or_default(), s))
            .collect()
    }
}

/// `v / ‖v‖` (norm in `f64`); zeros stay zeros.
fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|&x| (f64::from(x) / norm) as f32).collect()
}
