//! gensim's `KeyedVectors` queries on embtable vectors: the same words and
//! scores as the definitions (unit vectors, cosine, input words left out),
//! the same bits on every tier and thread count.

mod common;

use common::each_config;
use embtable::io::Pretrained;
use embtable::{EmbeddingTable, Error, Init, Vocab};
use proptest::prelude::*;

/// Cosine in f64, the obvious way.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

fn vectors(rows: usize, dim: usize, seed: u64) -> Pretrained {
    let words: Vec<String> = (0..rows).map(|i| format!("w{i}")).collect();
    let table = EmbeddingTable::new(
        rows,
        dim,
        Init::Normal {
            mean: 0.0,
            std: 1.0,
        },
        seed,
    )
    .unwrap();
    Pretrained::new(Vocab::from_words(words).unwrap(), table).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn most_similar_ranks_by_cosine_and_leaves_the_query_out(
        rows in 3usize..=300,
        dim in 1usize..=70,
        seed in 0u64..1000,
        topn in 0usize..=12,
    ) {
        let v = vectors(rows, dim, seed);
        let (a, b, c) = (0, rows / 2, rows - 1);
        let words = [format!("w{a}"), format!("w{b}"), format!("w{c}")];
        let positive = [words[0].as_str(), words[2].as_str()];
        let negative = [words[1].as_str()];
        let results = each_config(|| v.most_similar(&positive, &negative, topn).unwrap()
            .into_iter().map(|(w, s)| (w.to_string(), s.to_bits())).collect::<Vec<_>>());
        for (tier, threads, got) in &results {
            prop_assert_eq!(got, &results[0].2, "{} x{}", tier, threads);
        }
        // The definition: sum of unit vectors, cosine with every other row.
        let unit = |w: &str| v.unit_vector(w).unwrap();
        let query: Vec<f32> = (0..dim)
            .map(|k| unit(&words[0])[k] + unit(&words[2])[k] - unit(&words[1])[k])
            .collect();
        if query.iter().all(|&x| x == 0.0) {
            return Ok(());
        }
        let asked = [a, b, c];
        let mut want: Vec<(usize, f64)> = (0..rows)
            .filter(|r| !asked.contains(r))
            .map(|r| (r, cosine(v.table.row(r), &query)))
            .collect();
        want.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
        let got = &results[0].2;
        prop_assert_eq!(got.len(), topn.min(want.len()));
        for (k, (word, bits)) in got.iter().enumerate() {
            let score = f32::from_bits(*bits) as f64;
            prop_assert!((score - want[k].1).abs() < 1e-5, "rank {}: {} vs {}", k, score, want[k].1);
            // Same word, unless two scores are within rounding of each other.
            if *word != format!("w{}", want[k].0) {
                let r: usize = word[1..].parse().unwrap();
                let theirs = cosine(v.table.row(r), &query);
                prop_assert!((theirs - want[k].1).abs() < 1e-5, "rank {}: {} vs w{}", k, word, want[k].0);
            }
        }
    }
}

#[test]
fn king_minus_man_plus_woman_is_queen() {
    // Vectors built from three features: royal, male, female, plus noise words.
    let mut words = vec!["king", "man", "woman", "queen", "prince", "apple", "car"];
    let mut values = vec![
        1.0, 1.0, 0.0, 0.1, // king
        0.0, 1.0, 0.0, 0.0, // man
        0.0, 0.0, 1.0, 0.0, // woman
        1.0, 0.0, 1.0, 0.1, // queen
        0.8, 0.9, 0.0, 0.3, // prince
        -1.0, 0.1, 0.1, 1.0, // apple
        0.0, -1.0, -1.0, 1.0, // car
    ];
    words.push("zero");
    values.extend([0.0; 4]);
    let v = Pretrained::new(
        Vocab::from_words(words.iter().copied()).unwrap(),
        EmbeddingTable::from_rows(words.len(), 4, &values).unwrap(),
    )
    .unwrap();
    let best = v.most_similar(&["king", "woman"], &["man"], 3).unwrap();
    assert_eq!(best[0].0, "queen");
    assert!(
        best.iter()
            .all(|(w, _)| !["king", "woman", "man"].contains(w))
    );
    assert!(best.windows(2).all(|p| p[0].1 >= p[1].1));

    assert_eq!(v.most_similar(&["king"], &[], 1).unwrap()[0].0, "prince");
    assert_eq!(
        v.most_similar_to_given("king", &["apple", "queen", "prince"])
            .unwrap(),
        "prince"
    );
    assert!(
        (v.similarity("king", "prince").unwrap() as f64
            - cosine(v.vector("king").unwrap(), v.vector("prince").unwrap()))
        .abs()
            < 1e-6
    );
    assert_eq!(v.similarity("zero", "king").unwrap(), 0.0);
    assert_eq!(
        v.similar_by_vector(&[0.0, 0.0, 1.0, 0.0], 1).unwrap()[0].0,
        "woman"
    );

    // Unit-normalising every vector changes no answer.
    let mut unit = v.clone();
    unit.unit_normalize_all();
    let n = unit
        .vector("prince")
        .unwrap()
        .iter()
        .map(|x| x * x)
        .sum::<f32>();
    assert!((n - 1.0).abs() < 1e-6);
    assert_eq!(
        unit.most_similar(&["king", "woman"], &["man"], 3)
            .unwrap()
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        best.iter().map(|p| p.0).collect::<Vec<_>>()
    );
}

#[test]
fn bad_queries_name_what_is_wrong() {
    let v = vectors(10, 4, 1);
    let err = v.most_similar(&["w1", "nope"], &[], 3).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "positive",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("\"nope\""), "{err}");
    let err = v.most_similar(&[], &["nada"], 3).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "negative",
                ..
            }
        ),
        "{err}"
    );
    let err = v.most_similar(&[], &[], 3).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "query", .. }),
        "{err}"
    );
    let err = v.most_similar(&["w1"], &["w1"], 3).unwrap_err();
    assert!(err.to_string().contains("all zeros"), "{err}");
    assert!(v.similar_by_vector(&[1.0, 2.0], 3).is_err());
    let err = v
        .similar_by_vector(&[1.0, f32::NAN, 0.0, 0.0], 3)
        .unwrap_err();
    assert!(matches!(err, Error::NonFinite { position: 1, .. }), "{err}");
    assert!(v.most_similar_to_given("w1", &[]).is_err());
    assert!(v.similarity("w1", "w99").is_err());
    assert_eq!(v.unit_vector("w99"), None);
    // Asking for more than there is gives all the others.
    assert_eq!(v.most_similar(&["w1"], &[], 100).unwrap().len(), 9);
}

#[test]
fn rows_with_nan_are_never_returned_and_ties_go_to_the_lower_row() {
    let table =
        EmbeddingTable::from_rows(4, 2, &[1.0, 0.0, f32::NAN, 0.0, 2.0, 0.0, 3.0, 0.0]).unwrap();
    let best = table.most_similar_rows(&[1.0, 0.0], 4, &[]).unwrap();
    assert_eq!(best.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 2, 3]);
    assert!(best.iter().all(|p| p.1 == 1.0));
}
