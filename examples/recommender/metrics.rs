//! Ranking metrics on held-out interactions: recall@k and NDCG@k over all
//! items, with each user's training items excluded from the ranking.
//!
//! For a user with held-out items `H` and top-`k` list `T` (best first):
//!
//! * `recall@k = |T ∩ H| / |H|` (with one held-out item: the hit rate),
//! * `NDCG@k = DCG / IDCG`, `DCG = Σ_{r: T[r] ∈ H} 1 / log₂(r + 2)` over
//!   0-based ranks `r`, `IDCG` the same for a perfect list
//!   (`Σ_{r < min(k, |H|)} 1 / log₂(r + 2)`).
//!
//! Both are averaged over users.

use rayon::prelude::*;

/// The `k` best items by score, best first; `exclude` are never returned,
/// nor are NaN scores. Equal scores rank the lower item id first.
pub fn top_k(scores: &[f32], exclude: &[u32], k: usize) -> Vec<u32> {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    let mut excluded = exclude.to_vec();
    excluded.sort_unstable();
    for (i, &s) in scores.iter().enumerate() {
        // Items arrive in increasing id, so on equal scores the earlier stays ahead.
        let better = best.len() < k || best.last().is_some_and(|&(worst, _)| s > worst);
        if k == 0 || !better || s.is_nan() || excluded.binary_search(&(i as u32)).is_ok() {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b >= s);
        best.insert(at, (s, i as u32));
        best.truncate(k);
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// `(recall@k, NDCG@k)` of one user's top-`k` list against its held-out items.
pub fn recall_ndcg(top: &[u32], held: &[u32]) -> (f64, f64) {
    if held.is_empty() {
        return (0.0, 0.0);
    }
    let gain = |r: usize| 1.0 / ((r + 2) as f64).log2();
    let mut hits = 0;
    let mut dcg = 0.0;
    for (r, item) in top.iter().enumerate() {
        if held.contains(item) {
            hits += 1;
            dcg += gain(r);
        }
    }
    let idcg: f64 = (0..top.len().min(held.len())).map(gain).sum();
    let ndcg = if idcg > 0.0 { dcg / idcg } else { 0.0 };
    (hits as f64 / held.len() as f64, ndcg)
}

/// Averaged metrics over a set of users.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Mean recall@k.
    pub recall: f64,
    /// Mean NDCG@k.
    pub ndcg: f64,
    /// Users evaluated.
    pub users: usize,
}

/// Users scored together, so each item row is read once per block.
pub const USER_BLOCK: usize = 32;

/// Evaluates `users` in parallel. `score_block(block, out)` writes the
/// scores of every item (`items` of them) for each user of `block`, row by
/// row; `exclude(u)` are `u`'s training items and `held(u)` its held-out
/// items.
pub fn evaluate<E: AsRef<[u32]>>(
    users: &[usize],
    items: usize,
    k: usize,
    score_block: impl Fn(&[usize], &mut [f32]) + Sync,
    exclude: impl Fn(usize) -> E + Sync,
    held: impl Fn(usize) -> Vec<u32> + Sync,
) -> Metrics {
    let (recall, ndcg) = users
        .par_chunks(USER_BLOCK)
        .map_init(Vec::new, |scores, block| {
            scores.resize(block.len() * items, 0.0);
            score_block(block, scores);
            block
                .iter()
                .zip(scores.chunks_exact(items))
                .map(|(&u, s)| recall_ndcg(&top_k(s, exclude(u).as_ref(), k), &held(u)))
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let n = users.len().max(1) as f64;
    Metrics {
        recall: recall / n,
        ndcg: ndcg / n,
        users: users.len(),
    }
}

/// Evaluates `users` against one `ranking` of all items shared by every
/// user (best first): each user's top `k` are the first `k` items of the
/// ranking that are not among `exclude(u)`. Equal to [`evaluate`] with
/// scores that order the items as `ranking` does, in `O(k + |exclude|)`
/// per user instead of `O(items)`.
pub fn evaluate_ranking<E: AsRef<[u32]>>(
    users: &[usize],
    ranking: &[u32],
    k: usize,
    exclude: impl Fn(usize) -> E + Sync,
    held: impl Fn(usize) -> Vec<u32> + Sync,
) -> Metrics {
    let (recall, ndcg) = users
        .par_iter()
        .map(|&u| {
            let mut excluded = exclude(u).as_ref().to_vec();
            excluded.sort_unstable();
            let top: Vec<u32> = ranking
                .iter()
                .copied()
                .filter(|i| excluded.binary_search(i).is_err())
                .take(k)
                .collect();
            recall_ndcg(&top, &held(u))
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let n = users.len().max(1) as f64;
    Metrics {
        recall: recall / n,
        ndcg: ndcg / n,
        users: users.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_excludes_breaks_ties_by_id_and_skips_nan() {
        let scores = [0.1, 0.9, 0.5, 0.9, f32::NAN, 0.2, 0.5];
        assert_eq!(top_k(&scores, &[], 3), [1, 3, 2]);
        assert_eq!(top_k(&scores, &[3, 1], 3), [2, 6, 5]);
        assert_eq!(top_k(&scores, &[], 0), Vec::<u32>::new());
        assert_eq!(top_k(&scores, &[], 100).len(), 6); // NaN left out
        assert_eq!(top_k(&[f32::NEG_INFINITY, 1.0], &[], 2), [1, 0]);
    }

    #[test]
    fn recall_and_ndcg_exact_values() {
        // One held-out item at rank 0, 1, 9, and outside the list.
        let top: Vec<u32> = (0..10).collect();
        assert_eq!(recall_ndcg(&top, &[0]), (1.0, 1.0));
        let (r, n) = recall_ndcg(&top, &[1]);
        assert_eq!(r, 1.0);
        assert!((n - 1.0 / 3f64.log2()).abs() < 1e-15); // 0.6309…
        let (r, n) = recall_ndcg(&top, &[9]);
        assert_eq!(r, 1.0);
        assert!((n - 1.0 / 11f64.log2()).abs() < 1e-15); // 0.2890…
        assert_eq!(recall_ndcg(&top, &[10]), (0.0, 0.0));
        // Two held-out items, one found at rank 1: recall 1/2,
        // NDCG = (1/log₂3) / (1 + 1/log₂3) = 0.3869…
        let (r, n) = recall_ndcg(&top, &[1, 42]);
        assert_eq!(r, 0.5);
        let g = 1.0 / 3f64.log2();
        assert!((n - g / (1.0 + g)).abs() < 1e-15);
        assert!((n - 0.386_852_807_234_541_5).abs() < 1e-12);
    }

    #[test]
    fn evaluate_averages_over_users() {
        // 3 items; user u prefers item u (score 1), except user 2's
        // preferred item is excluded as a training item.
        let users = [0usize, 1, 2];
        let score = |block: &[usize], out: &mut [f32]| {
            for (b, &u) in block.iter().enumerate() {
                for i in 0..3 {
                    out[b * 3 + i] = if i == u { 1.0 } else { 0.0 };
                }
            }
        };
        let train: [Vec<u32>; 3] = [vec![], vec![], vec![2]];
        // Held out: user 0 → item 0 (rank 0), user 1 → item 0 (rank 1: item 1 wins),
        // user 2 → item 1 (rank 1 after item 0: ties by id).
        let held = |u: usize| vec![[0u32, 0, 1][u]];
        let m = evaluate(&users, 3, 1, score, |u| &train[u], held);
        assert_eq!(m.users, 3);
        assert!((m.recall - 1.0 / 3.0).abs() < 1e-15);
        assert!((m.ndcg - 1.0 / 3.0).abs() < 1e-15);
        let m = evaluate(&users, 3, 2, score, |u| &train[u], held);
        assert!((m.recall - 1.0).abs() < 1e-15);
        assert!((m.ndcg - (1.0 + 2.0 / 3f64.log2()) / 3.0).abs() < 1e-15);
    }

    /// A shared ranking gives what `evaluate` gives with the scores that
    /// order items the same way, ties included.
    #[test]
    fn ranking_evaluation_equals_scoring_evaluation() {
        let scores = [3.0f32, 1.0, 3.0, 0.0, 2.0, 2.0, 5.0];
        let ranking = [6u32, 0, 2, 4, 5, 1, 3];
        let users: Vec<usize> = (0..7).collect();
        let train: Vec<Vec<u32>> = (0..7u32).map(|u| vec![u, (u + 3) % 7]).collect();
        let held = |u: usize| vec![((u + 1) % 7) as u32];
        for k in [1, 2, 3, 10] {
            let a = evaluate(
                &users,
                7,
                k,
                |block, out| {
                    for row in out.chunks_exact_mut(7).take(block.len()) {
                        row.copy_from_slice(&scores);
                    }
                },
                |u| &train[u],
                held,
            );
            let b = evaluate_ranking(&users, &ranking, k, |u| &train[u], held);
            assert!((a.recall - b.recall).abs() < 1e-12 && (a.ndcg - b.ndcg).abs() < 1e-12);
            assert!(k == 1 || a.recall > 0.0);
        }
    }
}
