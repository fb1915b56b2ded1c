//! The dynamic table: a dynamic table without eviction trains bit for bit
//! like a fixed table (key `k` ↔ row `k`), under every optimizer and both
//! semantics; admission and eviction agree with a plain `BTreeMap` model on
//! random streams; results do not depend on the thread count or kernel
//! tier; sighting counts stay under a byte capacity (the bound on 10⁷
//! distinct keys, measured, is `tests/dynamic_memory.rs`).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::optim::{Cfg, any_cfg};
use common::{assert_bits_eq, each_config};
use embtable::dynamic::{
    Admission, Capacity, DynamicConfig, DynamicEmbedding, DynamicTable, Eviction,
};
use embtable::{
    Adagrad, AdagradConfig, Bags, Embedding, EmbeddingTable, Error, Frozen, Init, Pooling,
    Semantics, Sgd, SgdConfig, SparseGrad, SparseOptimizer,
};
use proptest::prelude::*;
use workloads::values;

type Layer = DynamicEmbedding<Box<dyn SparseOptimizer + Send>>;

fn dynamic(dim: usize, config: DynamicConfig, cfg: &Cfg) -> Layer {
    DynamicEmbedding::new(DynamicTable::new(dim, config).unwrap(), cfg.optimizer()).unwrap()
}

// ------------------------------------------------- equal to the fixed table

/// A stream of batches of keys `0..keys`, each with a gradient seed.
#[derive(Clone, Debug)]
struct Stream {
    keys: usize,
    dim: usize,
    seed: u64,
    batches: Vec<(Vec<u64>, u64)>,
    pooled: bool,
}

fn stream(max_keys: usize, max_batch: usize, max_steps: usize) -> impl Strategy<Value = Stream> {
    (1..=max_keys, 1..=70usize, any::<u64>(), any::<bool>()).prop_flat_map(
        move |(keys, dim, seed, pooled)| {
            let batch = (
                proptest::collection::vec(0..keys as u64, 0..=max_batch),
                any::<u64>(),
            );
            proptest::collection::vec(batch, 1..=max_steps).prop_map(move |batches| Stream {
                keys,
                dim,
                seed,
                batches,
                pooled,
            })
        },
    )
}

/// Bags of at most 3 keys over `keys`, for the pooled variant.
fn offsets(n: usize, seed: u64) -> Vec<usize> {
    let mut offsets = vec![0];
    let mut at = 0;
    let mut s = seed;
    while at < n {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        at = (at + (s >> 62) as usize).min(n); // bags of 0 to 3 keys
        offsets.push(at);
    }
    offsets
}

/// Trains `fixed` (ids = keys) and `dynamic` side by side on `s`, checking
/// every forward output bitwise; returns nothing, panics on a difference.
fn train_side_by_side(
    s: &Stream,
    fixed: &mut Embedding<Box<dyn SparseOptimizer + Send>>,
    dynamic: &mut Layer,
) {
    let dim = s.dim;
    for (t, (keys, seed)) in s.batches.iter().enumerate() {
        if s.pooled {
            let offsets = offsets(keys.len(), *seed);
            let bags = Bags::new(keys, &offsets, None).unwrap();
            let pooling = [Pooling::Sum, Pooling::Mean, Pooling::SqrtN, Pooling::Max][t % 4];
            let mut want = vec![0.0; bags.len() * dim];
            let mut got = vec![0.0; bags.len() * dim];
            fixed.forward_pooled(&bags, pooling, &mut want).unwrap();
            dynamic.forward_pooled(&bags, pooling, &mut got).unwrap();
            assert_bits_eq(&got, &want, &format!("pooled forward of step {t}"));
            let g = values(*seed, bags.len() * dim, -1.0, 1.0);
            fixed.backward_pooled(&bags, pooling, &g).unwrap();
            dynamic.backward_pooled(&bags, pooling, &g).unwrap();
        } else {
            let want = fixed.forward(keys).unwrap();
            let got = dynamic.forward(keys).unwrap();
            assert_bits_eq(&got, &want, &format!("forward of step {t}"));
            let g = values(*seed, keys.len() * dim, -1.0, 1.0);
            fixed.backward(keys, &g).unwrap();
            dynamic.backward(keys, &g).unwrap();
        }
        fixed.step().unwrap();
        dynamic.step().unwrap();
    }
    fixed.flush().unwrap();
    dynamic.flush().unwrap();
}

/// Every key's row and optimizer state in `dynamic` equals row `key` of
/// `fixed`, bitwise; keys without a row were never trained.
fn assert_same_rows(
    s: &Stream,
    fixed: &Embedding<Box<dyn SparseOptimizer + Send>>,
    dynamic: &Layer,
) {
    let dim = s.dim;
    let (want, got) = (fixed.optimizer().state(), dynamic.optimizer().state());
    assert_eq!(got.steps, want.steps);
    let table = dynamic.table();
    for key in 0..s.keys as u64 {
        let k = key as usize;
        let Some(r) = table.row_of(key) else {
            assert_bits_eq(
                &table.initial_row(key),
                fixed.table().row(k),
                "untrained key",
            );
            continue;
        };
        assert_bits_eq(table.get(key).unwrap(), fixed.table().row(k), "row");
        for (a, b) in got.arrays.iter().zip(&want.arrays) {
            let w = if b.shape.len() == 2 { dim } else { 1 };
            assert_bits_eq(
                &a.values[r * w..][..w],
                &b.values[k * w..][..w],
                &format!("state {} of key {key}", a.name),
            );
        }
        if !want.last_step.is_empty() {
            assert_eq!(
                got.last_step[r], want.last_step[k],
                "last step of key {key}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Without eviction a dynamic table is a fixed table whose rows are
    /// created as keys arrive: every output, weight and state value is
    /// bitwise the fixed table's (key `k` ↔ row `k`), for every optimizer
    /// and setting, plain and pooled. Under `DenseExact`, where a row
    /// starts when its key arrives, every key arrives before the first
    /// step (as every row of a fixed table exists from the start).
    #[test]
    fn without_eviction_it_trains_like_the_fixed_table(cfg in any_cfg(), s in stream(60, 40, 8)) {
        let init = Init::Uniform { low: -1.0, high: 1.0 };
        let fixed_table = EmbeddingTable::new(s.keys, s.dim, init, s.seed).unwrap();
        let mut fixed = Embedding::new(fixed_table, cfg.optimizer());
        let config = DynamicConfig { init, seed: s.seed, ..Default::default() };
        let mut dynamic = dynamic(s.dim, config, &cfg);
        if cfg.dense_exact() {
            let every: Vec<u64> = (0..s.keys as u64).collect();
            fixed.forward(&every).unwrap();
            dynamic.forward(&every).unwrap();
        }
        train_side_by_side(&s, &mut fixed, &mut dynamic);
        assert_same_rows(&s, &fixed, &dynamic);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Evicting and reusing rows never touches another key: keys used in
    /// every step (so never evicted) end with the same rows and optimizer
    /// state, bitwise, in a table that evicts all the time as in one that
    /// never does.
    #[test]
    fn eviction_leaves_the_other_keys_alone(
        cfg in any_cfg(),
        dim in 1..40usize,
        hot in 1..20u64,
        room in 1..10usize,
        steps in proptest::collection::vec(proptest::collection::vec(0..1_000u64, 0..12), 1..12),
        seed in any::<u64>(),
    ) {
        let bounded = DynamicConfig {
            capacity: Capacity::Rows(hot as usize + room),
            seed,
            ..Default::default()
        };
        let unbounded = DynamicConfig { capacity: Capacity::Unbounded, ..bounded };
        let mut a = dynamic(dim, bounded, &cfg);
        let mut b = dynamic(dim, unbounded, &cfg);
        for (t, cold) in steps.iter().enumerate() {
            // The hot keys, then cold keys (1000 and up), some seen once.
            let keys: Vec<u64> = (0..hot).chain(cold.iter().map(|k| 1_000 + k)).collect();
            let g = values(t as u64, keys.len() * dim, -1.0, 1.0);
            for layer in [&mut a, &mut b] {
                layer.forward(&keys).unwrap();
                layer.backward(&keys, &g).unwrap();
                layer.step().unwrap();
            }
        }
        prop_assert!(a.table().len() <= hot as usize + room);
        let (sa, sb) = (a.optimizer().state(), b.optimizer().state());
        for key in 0..hot {
            let (ra, rb) = (a.table().row_of(key).unwrap(), b.table().row_of(key).unwrap());
            assert_bits_eq(a.table().get(key).unwrap(), b.table().get(key).unwrap(), "row");
            for (x, y) in sa.arrays.iter().zip(&sb.arrays) {
                let w = if x.shape.len() == 2 { dim } else { 1 };
                assert_bits_eq(&x.values[ra * w..][..w], &y.values[rb * w..][..w], &x.name);
            }
        }
    }
}

#[test]
fn step_lookup_is_translate_then_accumulate_then_step() {
    let dim = 24;
    let config = DynamicConfig {
        admission: Admission::AfterSightings(2),
        capacity: Capacity::Rows(40),
        ..Default::default()
    };
    let mut fused = DynamicTable::new(dim, config).unwrap();
    let mut split = fused.clone();
    let mut opt_fused = Adagrad::new(AdagradConfig::torch());
    let mut opt_split = opt_fused.clone();
    for t in 0..30u64 {
        // 45 distinct keys a batch (each twice), 90 in all, 40 rows.
        let keys: Vec<i64> = (0..90)
            .map(|j| ((j / 2 * 13 + t * 11) % 90) as i64 - 20)
            .collect();
        let g = values(t, keys.len() * dim, -1.0, 1.0);
        fused.step_lookup(&mut opt_fused, &keys, &g).unwrap();
        let rows = split.translate(&keys, &mut opt_split).unwrap();
        let mut grad = SparseGrad::new(dim);
        grad.accumulate_lookup(&rows, &g).unwrap();
        split.step(&mut opt_split, &mut grad).unwrap();
    }
    assert_eq!(fused.weights(), split.weights());
    assert_eq!(opt_fused.state(), opt_split.state());
    assert_eq!(fused.stats(), split.stats());
    let stats = fused.stats();
    assert!(stats.evicted > 0 && stats.refused > 0, "{stats:?}");
}

/// With every key admitted (no position dropped), the fused step checks the
/// gradient on another thread while the batch is translated, when there
/// is one: on every thread count and tier it trains as translate,
/// accumulate and step do, and a non-finite value is refused as the fixed
/// table refuses it, after the translation, with no row trained (the
/// admitted keys' rows drawn all the same, though the fused step draws
/// them otherwise). A value so large that the sums might overflow sends
/// the step to a stored gradient, after the admitted rows are drawn.
#[test]
fn step_lookup_trains_alike_on_every_thread_count() {
    let dim = 20;
    let config = DynamicConfig {
        capacity: Capacity::Rows(3_000),
        seed: 3,
        ..Default::default()
    };
    let run = || {
        let mut fused = DynamicTable::new(dim, config).unwrap();
        let mut split = fused.clone();
        let mut opt_fused = Adagrad::new(AdagradConfig::torch());
        let mut opt_split = opt_fused.clone();
        for t in 0..8u64 {
            // 5,000 positions over 4,000 keys a batch: repeats, new keys
            // and (from the second batch on) evictions.
            let keys: Vec<u64> = workloads::uniform(t, 5_000, 4_000)
                .into_iter()
                .map(|k| (k as u64 + 700 * t).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            let mut g = values(t, keys.len() * dim, -1.0, 1.0);
            if t == 6 {
                g[1_234 * dim + 3] = 1e36; // max |g| · 5,000 ids > f32::MAX
            }
            if t == 5 {
                g[4_321 * dim + 7] = f32::NAN;
                let err = fused.step_lookup(&mut opt_fused, &keys, &g).unwrap_err();
                let position = 4_321 * dim + 7;
                assert!(
                    matches!(err, Error::NonFinite { position: p, .. } if p == position),
                    "{err}"
                );
                split.translate(&keys, &mut opt_split).unwrap();
                assert_eq!(fused.weights(), split.weights(), "no row trained");
                assert_eq!(fused.steps(), split.steps(), "the step did not end");
                split.advance(&mut opt_split).unwrap();
                fused.advance(&mut opt_fused).unwrap();
                continue;
            }
            fused.step_lookup(&mut opt_fused, &keys, &g).unwrap();
            let rows = split.translate(&keys, &mut opt_split).unwrap();
            assert!(!rows.contains(&0), "every key admitted");
            let mut grad = SparseGrad::new(dim);
            grad.accumulate_lookup(&rows, &g).unwrap();
            split.step(&mut opt_split, &mut grad).unwrap();
        }
        assert_eq!(fused.weights(), split.weights());
        assert_eq!(opt_fused.state(), opt_split.state());
        assert_eq!(fused.stats(), split.stats());
        assert!(fused.stats().evicted > 0, "{:?}", fused.stats());
        (fused, opt_fused.state())
    };
    let runs = each_config(run);
    let (_, _, (first, first_state)) = &runs[0];
    for (tier, threads, (table, state)) in &runs[1..] {
        let what = format!("{tier:?} {threads} threads");
        assert_eq!(table.weights(), first.weights(), "{what}");
        assert_eq!(state, first_state, "{what}");
    }
}

/// On several threads the fused step groups the batch's positions while
/// the keys are admitted (a new key standing as a number until it has a
/// row), unless a key is refused or not admitted: on every thread count
/// and tier, with batches large enough for the sharded grouping, that
/// trains as translate, accumulate and step do, under an optimizer whose
/// rows lag (`DenseExact` momentum) and one that keeps state per row.
#[test]
fn step_lookup_grouped_beside_admission_trains_alike() {
    let dim = 12;
    let momentum = || {
        Box::new(Sgd::new(SgdConfig {
            momentum: 0.9,
            semantics: Semantics::DenseExact,
            ..SgdConfig::keras()
        })) as Box<dyn SparseOptimizer + Send>
    };
    let adagrad =
        || Box::new(Adagrad::new(AdagradConfig::torch())) as Box<dyn SparseOptimizer + Send>;
    for (name, make) in [
        ("momentum", &momentum as &(dyn Fn() -> _ + Sync)),
        ("adagrad", &adagrad),
    ] {
        for admission in [Admission::Always, Admission::AfterSightings(2)] {
            let config = DynamicConfig {
                admission,
                capacity: Capacity::Rows(3_000),
                seed: 9,
                ..Default::default()
            };
            let run = || {
                let mut fused = DynamicTable::new(dim, config).unwrap();
                let mut split = fused.clone();
                let (mut opt_fused, mut opt_split) = (make(), make());
                for t in 0..9u64 {
                    // 20,000 positions a batch over 2,500 keys (every one
                    // admitted), every third batch over 9,000 (refusals).
                    let keys = if t % 3 == 2 { 9_000 } else { 2_500 };
                    let batch: Vec<u64> = workloads::uniform(t, 20_000, keys)
                        .into_iter()
                        .map(|k| (k as u64 + 1_000 * t).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                        .collect();
                    let g = values(t, batch.len() * dim, -1.0, 1.0);
                    fused.step_lookup(&mut opt_fused, &batch, &g).unwrap();
                    let rows = split.translate(&batch, &mut opt_split).unwrap();
                    let mut grad = SparseGrad::new(dim);
                    grad.accumulate_lookup(&rows, &g).unwrap();
                    split.step(&mut opt_split, &mut grad).unwrap();
                }
                fused.flush(&mut opt_fused).unwrap();
                split.flush(&mut opt_split).unwrap();
                assert_eq!(fused.weights(), split.weights(), "{name} {admission:?}");
                assert_eq!(opt_fused.state(), opt_split.state(), "{name} {admission:?}");
                assert_eq!(fused.stats(), split.stats());
                let stats = *fused.stats();
                assert!(stats.evicted > 0 && stats.refused > 0, "{stats:?}");
                (fused, opt_fused.state())
            };
            let runs = each_config(run);
            let (_, _, (first, first_state)) = &runs[0];
            for (tier, threads, (table, state)) in &runs[1..] {
                let what = format!("{name} {admission:?} {tier:?} {threads} threads");
                assert_eq!(table.weights(), first.weights(), "{what}");
                assert_eq!(state, first_state, "{what}");
            }
        }
    }
}

// ------------------------------------------------- policies against a model

/// The reference: the table's policies on a `BTreeMap`, as the docs state
/// them, with every decision a search over all keys.
#[derive(Debug, Default)]
struct Model {
    admission: Option<Admission>,
    eviction: Option<Eviction>,
    limit: usize,
    /// key -> (count, call, step, use sequence)
    rows: BTreeMap<u64, (u64, u64, u64, u64)>,
    /// key -> (sightings, call of the last, sighting sequence)
    pending: BTreeMap<u64, (u32, u64, u64)>,
    call: u64,
    step: u64,
    seq: u64,
    evicted: Vec<u64>,
    refused: u64,
}

impl Model {
    fn translate(&mut self, keys: &[u64]) {
        self.call += 1;
        let (call, now) = (self.call, self.step);
        let mut news: Vec<(u64, u32)> = Vec::new();
        for &k in keys {
            if let Some(e) = self.rows.get_mut(&k) {
                if e.1 != call {
                    self.seq += 1;
                    (e.1, e.2, e.3) = (call, now, self.seq);
                }
                e.0 += 1;
            } else if let Some(n) = news.iter_mut().find(|n| n.0 == k) {
                n.1 += 1;
            } else {
                news.push((k, 1));
            }
        }
        // Every decision of a call uses the counts from before it.
        let admission = self.admission.unwrap();
        let decided: Vec<(u64, u32, bool)> = news
            .into_iter()
            .map(|(key, occ)| {
                let seen = self.pending.get(&key).map_or(0, |p| p.0);
                let admit = match admission {
                    Admission::Always => true,
                    Admission::AfterSightings(n) => seen + occ >= n,
                    Admission::ReadOnly => false,
                    Admission::Probability { p, seed } => {
                        (0..occ).any(|i| coin(seed, key, call, i) < p)
                    }
                };
                (key, occ, admit)
            })
            .collect();
        for (key, occ, admit) in decided {
            let counting = matches!(admission, Admission::AfterSightings(_));
            if admit && self.make_room(now) {
                self.pending.remove(&key);
                self.seq += 1;
                self.rows.insert(key, (occ as u64, call, now, self.seq));
            } else {
                if admit {
                    self.refused += 1;
                }
                if counting {
                    self.sight(key, occ, call);
                }
            }
        }
    }

    /// Whether there is room for one more key, evicting if the policy may.
    fn make_room(&mut self, now: u64) -> bool {
        if self.rows.len() < self.limit {
            return true;
        }
        let unpinned = self.rows.iter().filter(|(_, e)| e.2 < now);
        let victim = match self.eviction.unwrap() {
            Eviction::Lru => unpinned.min_by_key(|(_, e)| e.3).map(|(&k, _)| k),
            Eviction::Lfu => unpinned
                .min_by_key(|&(&k, e)| (e.0, e.1, k))
                .map(|(&k, _)| k),
            Eviction::Ttl { .. } => None,
        };
        let Some(victim) = victim else { return false };
        self.rows.remove(&victim);
        self.evicted.push(victim);
        true
    }

    fn sight(&mut self, key: u64, occ: u32, call: u64) {
        if !self.pending.contains_key(&key) && self.pending.len() >= self.limit {
            let (&oldest, &(_, last_call, _)) =
                self.pending.iter().min_by_key(|(_, p)| p.2).unwrap();
            if last_call >= call {
                return;
            }
            self.pending.remove(&oldest);
        }
        self.seq += 1;
        let e = self.pending.entry(key).or_insert((0, call, 0));
        (e.0, e.1, e.2) = (e.0 + occ, call, self.seq);
    }

    fn end_step(&mut self) {
        self.step += 1;
        if let Eviction::Ttl { steps } = self.eviction.unwrap()
            && let Some(before) = self.step.checked_sub(steps)
        {
            let mut expired: Vec<(u64, u64)> = self
                .rows
                .iter()
                .filter(|(_, e)| e.2 < before)
                .map(|(&k, e)| (e.3, k))
                .collect();
            expired.sort();
            for (_, k) in expired {
                self.rows.remove(&k);
                self.evicted.push(k);
            }
        }
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The coin of sighting `i` of `key` in call `call`, as
/// `Admission::Probability` documents it.
fn coin(seed: u64, key: u64, call: u64, i: u32) -> f64 {
    let h = mix(mix(key ^ seed) ^ mix(call.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(i)));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn policies() -> impl Strategy<Value = (Admission, Eviction, Capacity)> {
    let admission = prop_oneof![
        Just(Admission::Always),
        (1u32..4).prop_map(Admission::AfterSightings),
        (0.05f64..=1.0, any::<u64>()).prop_map(|(p, seed)| Admission::Probability { p, seed }),
        Just(Admission::ReadOnly),
    ];
    let eviction = prop_oneof![
        Just(Eviction::Lru),
        Just(Eviction::Lfu),
        (1u64..4).prop_map(|steps| Eviction::Ttl { steps }),
    ];
    let capacity = prop_oneof![
        (1usize..30).prop_map(Capacity::Rows),
        // Bytes for a few to a few dozen rows of 4 floats.
        (1_500usize..8_000).prop_map(Capacity::Bytes),
    ];
    (admission, eviction, capacity)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    /// Random streams (several calls per step, keys repeating) through
    /// every admission and eviction policy: after every call the keys with
    /// a row, which positions got one, the keys evicted (in order) and the
    /// admissions refused are the model's; every key keeps one row while
    /// it has it, and no row serves two keys.
    #[test]
    fn policies_match_the_reference_model(
        (admission, eviction, capacity) in policies(),
        steps in proptest::collection::vec(
            proptest::collection::vec(proptest::collection::vec(0u64..40, 0..25), 1..3),
            1..25,
        ),
    ) {
        let config = DynamicConfig { admission, eviction, capacity, track_changes: true, ..Default::default() };
        let mut table = match DynamicTable::new(4, config) {
            Ok(t) => t,
            Err(Error::InvalidConfig { field: "capacity", .. }) => return Ok(()), // too few bytes
            Err(e) => panic!("{e}"),
        };
        let mut model = Model {
            admission: Some(admission),
            eviction: Some(eviction),
            limit: table.capacity(),
            ..Model::default()
        };
        let mut rows_of: BTreeMap<u64, usize> = BTreeMap::new();
        let mut evicted = Vec::new();
        for calls in &steps {
            for keys in calls {
                let rows = table.translate(keys, &mut Frozen).unwrap();
                model.translate(keys);
                let have: BTreeSet<u64> = table.keys().map(|(k, _)| k).collect();
                let want: BTreeSet<u64> = model.rows.keys().copied().collect();
                prop_assert_eq!(&have, &want);
                for (&k, &r) in keys.iter().zip(&rows) {
                    prop_assert_eq!(r != 0, want.contains(&k), "key {}", k);
                }
                evicted.extend(table.export_changes().unwrap().evicted);
                // A key keeps its row while it has one; rows are not shared.
                rows_of.retain(|k, _| have.contains(k));
                for (k, r) in table.keys() {
                    prop_assert_eq!(*rows_of.entry(k).or_insert(r), r, "key {} moved", k);
                }
                let distinct: BTreeSet<usize> = rows_of.values().copied().collect();
                prop_assert_eq!(distinct.len(), rows_of.len());
                prop_assert!(table.len() <= table.capacity());
            }
            table.advance(&mut Frozen).unwrap();
            model.end_step();
            evicted.extend(table.export_changes().unwrap().evicted);
            let have: BTreeSet<u64> = table.keys().map(|(k, _)| k).collect();
            rows_of.retain(|k, _| have.contains(k));
            prop_assert_eq!(have, model.rows.keys().copied().collect::<BTreeSet<_>>());
        }
        prop_assert_eq!(&evicted, &model.evicted);
        prop_assert_eq!(table.stats().refused, model.refused);
        if let Capacity::Bytes(bytes) = capacity {
            prop_assert!(table.memory().bounded() <= bytes);
        }
    }
}

// ------------------------------------------------- threads and tiers

/// A run through every policy at once (sightings, LFU, a small capacity,
/// pooled and plain passes, a momentum optimizer under DenseExact) on
/// batches large enough for the parallel paths.
fn busy_run(eviction: Eviction) -> (DynamicTable, Vec<f32>) {
    let dim = 19;
    let config = DynamicConfig {
        admission: Admission::AfterSightings(2),
        eviction,
        capacity: Capacity::Rows(3_000),
        seed: 5,
        track_changes: true,
        ..Default::default()
    };
    let sgd = Sgd::new(SgdConfig {
        momentum: 0.9,
        semantics: Semantics::DenseExact,
        ..SgdConfig::keras()
    });
    let mut layer = DynamicEmbedding::new(DynamicTable::new(dim, config).unwrap(), sgd).unwrap();
    let mut outputs = Vec::new();
    for t in 0..12u64 {
        let keys: Vec<u64> = workloads::uniform(t, 20_000, 6_000)
            .into_iter()
            .map(|k| (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let out = layer.forward(&keys).unwrap();
        let g = values(t, out.len(), -1.0, 1.0);
        layer.backward(&keys, &g).unwrap();
        let bags = Bags::fixed(&keys[..9_000], 9).unwrap();
        let mut pooled = vec![0.0; bags.len() * dim];
        layer
            .forward_pooled(&bags, Pooling::Mean, &mut pooled)
            .unwrap();
        layer
            .backward_pooled(&bags, Pooling::Mean, &pooled)
            .unwrap();
        layer.step().unwrap();
        outputs.extend_from_slice(&out[..dim * 50]);
        outputs.extend_from_slice(&pooled[..dim * 50]);
    }
    layer.flush().unwrap();
    let changes = layer.export_changes().unwrap();
    outputs.extend(changes.updated_values);
    let (table, ..) = layer.into_parts();
    (table, outputs)
}

#[test]
fn results_do_not_depend_on_threads_or_tier() {
    for eviction in [Eviction::Lru, Eviction::Lfu, Eviction::Ttl { steps: 2 }] {
        let runs = each_config(|| busy_run(eviction));
        let (_, _, (first, first_out)) = &runs[0];
        assert!(
            first.stats().evicted + first.stats().expired > 0,
            "{eviction:?}"
        );
        for (tier, threads, (table, out)) in &runs[1..] {
            let what = format!("{eviction:?} {tier:?} {threads} threads");
            assert_eq!(table.weights(), first.weights(), "{what}");
            assert_eq!(
                table.keys().collect::<Vec<_>>(),
                first.keys().collect::<Vec<_>>(),
                "{what}"
            );
            assert_eq!(table.stats(), first.stats(), "{what}");
            assert_bits_eq(out, first_out, &what);
        }
    }
}

#[test]
fn a_keys_first_row_does_not_depend_on_arrival() {
    let config = DynamicConfig {
        seed: 77,
        ..Default::default()
    };
    let mut a = DynamicTable::new(33, config).unwrap();
    let mut b = DynamicTable::new(33, config).unwrap();
    let keys: Vec<u64> = (0..500).map(|k| k * 1_000_003).collect();
    a.translate(&keys, &mut Frozen).unwrap();
    for chunk in keys.rchunks(7) {
        b.translate(chunk, &mut Frozen).unwrap();
    }
    for &k in &keys {
        assert_bits_eq(a.get(k).unwrap(), b.get(k).unwrap(), "first row");
        assert_bits_eq(a.get(k).unwrap(), &a.initial_row(k), "initial row");
    }
    assert_ne!(a.row_of(keys[0]), b.row_of(keys[0])); // other rows, same values
}

// ------------------------------------------------- memory

// The bound on 10⁷ distinct keys, measured with a counting allocator, is
// in tests/dynamic_memory.rs.

#[test]
fn pending_counts_stay_under_the_bound() {
    // Keys seen once never get a row, but their counts must not pile up.
    let config = DynamicConfig {
        admission: Admission::AfterSightings(2),
        capacity: Capacity::Bytes(1 << 20),
        ..Default::default()
    };
    let mut table = DynamicTable::new(4, config).unwrap();
    for first in (0..2_000_000u64).step_by(10_000) {
        let keys: Vec<u64> = (first..first + 10_000).collect();
        table.translate(&keys, &mut Frozen).unwrap();
        table.advance(&mut Frozen).unwrap();
        assert!(table.memory().bounded() <= 1 << 20, "{:?}", table.memory());
    }
    assert!(table.is_empty());
}

// ------------------------------------------------- keys, defaults, errors

#[test]
fn any_index_type_is_a_key_and_negative_ids_are_keys() {
    let mut table = DynamicTable::new(3, DynamicConfig::default()).unwrap();
    table.translate(&[-1i64, 5], &mut Frozen).unwrap();
    assert_eq!(table.row_of(u64::MAX), table.row_of(-1i64));
    assert_eq!(table.row_of(5u32), table.row_of(5usize));
    assert_eq!(table.row_of(-1i32), table.row_of(-1i64));
    assert_eq!(table.len(), 2);
}

#[test]
fn unknown_keys_read_the_default_row_and_get_no_gradient() {
    let config = DynamicConfig {
        admission: Admission::ReadOnly,
        ..Default::default()
    };
    let mut table = DynamicTable::new(2, config).unwrap();
    table.set_default_row(&[0.5, -0.5]).unwrap();
    assert!(table.set_default_row(&[f32::NAN, 0.0]).is_err());
    assert!(table.set_default_row(&[1.0]).is_err());
    let mut layer = DynamicEmbedding::new(table, Sgd::default()).unwrap();
    assert_eq!(layer.forward(&[1u64, 2]).unwrap(), [0.5, -0.5, 0.5, -0.5]);
    layer.backward(&[1u64, 2], &[1.0; 4]).unwrap();
    assert!(layer.grad().is_empty());
    layer.step().unwrap();
    assert_eq!(layer.table().default_row(), &[0.5, -0.5]);
    assert_eq!(layer.table().weights().row(0), &[0.5, -0.5]);
    // Pooled: an unknown key counts in the mean; its share of the
    // gradient is dropped at the step.
    let bags = Bags::new(&[3u64, 4], &[0, 2], None).unwrap();
    let mut out = vec![0.0; 2];
    layer
        .forward_pooled(&bags, Pooling::Mean, &mut out)
        .unwrap();
    assert_eq!(out, [0.5, -0.5]);
    layer
        .backward_pooled(&bags, Pooling::Mean, &[1.0, 1.0])
        .unwrap();
    layer.step().unwrap();
    assert_eq!(layer.table().weights().row(0), &[0.5, -0.5]);
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    let bad = |config: DynamicConfig, dim: usize| match DynamicTable::new(dim, config) {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    let d = DynamicConfig::default();
    assert_eq!(bad(d, 0), "dim");
    assert_eq!(
        bad(
            DynamicConfig {
                capacity: Capacity::Rows(0),
                ..d
            },
            4
        ),
        "capacity"
    );
    assert_eq!(
        bad(
            DynamicConfig {
                capacity: Capacity::Bytes(100),
                ..d
            },
            4
        ),
        "capacity"
    );
    assert_eq!(
        bad(
            DynamicConfig {
                admission: Admission::AfterSightings(0),
                ..d
            },
            4
        ),
        "admission"
    );
    assert_eq!(
        bad(
            DynamicConfig {
                admission: Admission::Probability { p: 1.5, seed: 0 },
                ..d
            },
            4
        ),
        "admission"
    );
    assert_eq!(
        bad(
            DynamicConfig {
                eviction: Eviction::Ttl { steps: 0 },
                ..d
            },
            4
        ),
        "eviction"
    );
    assert_eq!(
        bad(
            DynamicConfig {
                init: Init::Uniform {
                    low: 1.0,
                    high: 0.0
                },
                ..d
            },
            4
        ),
        "low"
    );
    let table = DynamicTable::new(4, d).unwrap();
    let mut out = vec![0.0; 3];
    assert!(matches!(
        table.lookup(&[1u64], &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn a_byte_capacity_counts_the_optimizer_state() {
    let config = DynamicConfig {
        capacity: Capacity::Bytes(1 << 20),
        ..Default::default()
    };
    let bare = DynamicTable::new(64, config).unwrap();
    let sgd = DynamicEmbedding::new(bare.clone(), Sgd::default()).unwrap();
    let adagrad = DynamicEmbedding::new(bare.clone(), Adagrad::default()).unwrap();
    assert!(adagrad.table().capacity() < sgd.table().capacity());
    assert!(sgd.table().capacity() <= bare.capacity());
    // A full table cannot take on an optimizer whose state would not fit.
    let mut full = DynamicTable::new(64, config).unwrap();
    let keys: Vec<u64> = (0..full.capacity() as u64).collect();
    full.translate(&keys, &mut Frozen).unwrap();
    assert!(DynamicEmbedding::new(full, Adagrad::default()).is_err());
}

#[test]
fn probability_admission_is_deterministic_and_about_p() {
    let config = DynamicConfig {
        admission: Admission::Probability { p: 0.3, seed: 4 },
        ..Default::default()
    };
    let keys: Vec<u64> = (0..20_000).collect();
    let mut a = DynamicTable::new(1, config).unwrap();
    let mut b = DynamicTable::new(1, config).unwrap();
    a.translate(&keys, &mut Frozen).unwrap();
    b.translate(&keys, &mut Frozen).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!((5_400..6_600).contains(&a.len()), "{}", a.len());
    // Later sightings give the others their chance.
    a.translate(&keys, &mut Frozen).unwrap();
    assert!((9_600..10_800).contains(&a.len()), "{}", a.len()); // 1 - 0.7²
}

#[test]
fn evicted_rows_are_logged_with_their_values_and_changes_exported() {
    let config = DynamicConfig {
        capacity: Capacity::Rows(2),
        track_changes: true,
        ..Default::default()
    };
    let sgd = Sgd::new(SgdConfig {
        lr: 0.5,
        ..SgdConfig::keras()
    });
    let mut layer = DynamicEmbedding::new(DynamicTable::new(2, config).unwrap(), sgd).unwrap();
    layer.forward(&[1u64, 2]).unwrap();
    layer.backward(&[1u64, 2], &[1.0; 4]).unwrap();
    layer.step().unwrap();
    let trained = layer.table().get(1u64).unwrap().to_vec();
    let changes = layer.export_changes().unwrap();
    assert_eq!(changes.updated, [1, 2]);
    assert_eq!(&changes.updated_values[..2], &trained[..]);
    layer.forward(&[3u64]).unwrap(); // evicts 1, the least recently used
    let changes = layer.export_changes().unwrap();
    assert_eq!(
        (changes.evicted, changes.evicted_values),
        (vec![1], trained)
    );
    assert_eq!(changes.updated, [3]);
    assert_eq!(changes.updated_values, layer.table().initial_row(3u64));
}

/// A non-finite gradient is refused naming its position and value: the
/// layer's backward passes accumulate nothing and touch no key; the fused
/// `step_lookup` leaves the table as its translation alone would (the
/// forward half of the call: keys admitted, uses recorded), with no row
/// trained and the step not ended.
#[test]
fn non_finite_gradients_are_refused_and_nothing_trains() {
    let dim = 3;
    let config = DynamicConfig {
        capacity: Capacity::Rows(4),
        ..Default::default()
    };
    let mut layer =
        DynamicEmbedding::new(DynamicTable::new(dim, config).unwrap(), Sgd::default()).unwrap();
    let keys = [7u64, 8, 9];
    let out = layer.forward(&keys).unwrap();
    let before = layer.table().clone();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut g = vec![0.5; out.len()];
        g[4] = bad;
        let err = layer.backward(&keys, &g).unwrap_err();
        assert!(
            matches!(err, Error::NonFinite { position: 4, value, .. } if value.to_bits() == bad.to_bits()),
            "{err}"
        );
        assert!(err.to_string().contains('4'), "{err}");
        let bags = Bags::new(&[10u64, 11], &[0, 2], None).unwrap();
        let mut g = vec![0.5; dim];
        g[2] = bad;
        let err = layer.backward_pooled(&bags, Pooling::Sum, &g).unwrap_err();
        assert!(matches!(err, Error::NonFinite { position: 2, .. }), "{err}");
        assert!(layer.grad().is_empty());
        assert_eq!(layer.table().weights(), before.weights());
        assert_eq!(layer.table().stats(), before.stats());
        assert_eq!(
            layer.table().keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>()
        );
    }
    layer.step().unwrap();

    // The fused step: 7 and 8 known, 12 new (evicting 9).
    let (mut table, mut sgd, _) = layer.into_parts();
    let mut translated = table.clone();
    let mut sgd_translated = sgd.clone();
    let batch = [7u64, 12, 8];
    let mut g = vec![0.25; batch.len() * dim];
    g[7] = f32::NAN;
    let err = table.step_lookup(&mut sgd, &batch, &g).unwrap_err();
    assert!(matches!(err, Error::NonFinite { position: 7, .. }), "{err}");
    translated.translate(&batch, &mut sgd_translated).unwrap();
    assert_eq!(table.weights(), translated.weights(), "no row trained");
    assert_eq!(table.stats(), translated.stats());
    assert_eq!(table.steps(), translated.steps(), "the step did not end");
    assert_eq!(
        table.keys().collect::<Vec<_>>(),
        translated.keys().collect::<Vec<_>>()
    );
    assert_eq!(sgd.state(), sgd_translated.state());
}

/// An optimizer that trains as SGD until told to refuse to grow its state
/// (as a failed allocation would), to reach a translation's error path, or
/// to bring rows current (as an optimizer whose rows lag may fail to).
#[derive(Clone, Debug, Default)]
struct Refusing {
    sgd: Sgd,
    refuse: bool,
    refuse_catch_up: bool,
}

impl SparseOptimizer for Refusing {
    fn step(&mut self, table: &mut EmbeddingTable, grad: &SparseGrad) -> embtable::Result<()> {
        self.sgd.step(table, grad)
    }

    fn flush(&mut self, table: &mut EmbeddingTable) -> embtable::Result<()> {
        self.sgd.flush(table)
    }

    fn state(&self) -> embtable::optim::OptimizerState {
        self.sgd.state()
    }

    fn load_state(&mut self, state: embtable::optim::OptimizerState) -> embtable::Result<()> {
        self.sgd.load_state(state)
    }

    fn lr(&self) -> f32 {
        self.sgd.lr()
    }

    fn set_lr(&mut self, lr: f32) -> embtable::Result<()> {
        self.sgd.set_lr(lr)
    }

    fn set_schedule(&mut self, schedule: Option<std::sync::Arc<dyn embtable::optim::LrSchedule>>) {
        self.sgd.set_schedule(schedule)
    }

    fn steps(&self) -> u64 {
        self.sgd.steps()
    }

    fn has_lagging_rows(&self) -> bool {
        self.refuse_catch_up
    }

    fn catch_up(&mut self, _: &mut EmbeddingTable, rows: &[usize]) -> embtable::Result<()> {
        if self.refuse_catch_up && !rows.is_empty() {
            return Err(Error::InvalidConfig {
                field: "test optimizer",
                reason: format!("refuses to bring {} rows current", rows.len()),
            });
        }
        Ok(())
    }

    fn reset_rows(&mut self, table: &EmbeddingTable, rows: &[usize]) -> embtable::Result<()> {
        if self.refuse {
            return Err(Error::Alloc {
                what: "test optimizer state",
                bytes: table.rows(),
            });
        }
        self.sgd.reset_rows(table, rows)
    }
}

/// A translation that admits keys fails when the optimizer state cannot
/// grow, after the batch was probed and its new keys counted: the table is
/// as it was, byte for byte in its checkpoint (uses, recency, counts), and
/// goes on as a table that never tried, on every thread count, for a small
/// batch and for one probed in parallel tasks.
#[test]
fn a_translation_that_cannot_grow_changes_nothing() {
    let dir = common::Scratch::new("dynamic-refused-growth");
    let evictions = [Eviction::Lru, Eviction::Lfu, Eviction::Ttl { steps: 2 }];
    let runs = each_config(|| {
        let mut checked = 0;
        for (e, eviction) in evictions.into_iter().enumerate() {
            // Small batches, and one above the size probed in parallel.
            for (b, len) in [9usize, 5_000].into_iter().enumerate() {
                let config = DynamicConfig {
                    capacity: Capacity::Rows(3_000),
                    eviction,
                    ..Default::default()
                };
                let mut table = DynamicTable::new(4, config).unwrap();
                let mut opt = Refusing::default();
                let known: Vec<u64> = (0..2_000).map(|k| mix(k) % 2_500).collect();
                table.translate(&known, &mut opt).unwrap();
                table.advance(&mut opt).unwrap();
                table.translate(&known[..30], &mut opt).unwrap();
                let name = format!("{}-{e}-{b}", rayon::current_num_threads());
                let before = dir.path(&format!("{name}-before"));
                table.save(&before).unwrap();
                // Known keys (repeated) and new ones, in one batch.
                let batch: Vec<u64> = (0..len as u64)
                    .map(|i| {
                        if i % 3 == 0 {
                            10_000 + i
                        } else {
                            known[i as usize % 40]
                        }
                    })
                    .collect();
                opt.refuse = true;
                let err = table.translate(&batch, &mut opt).unwrap_err();
                assert!(matches!(err, Error::Alloc { .. }), "{err}");
                let after = dir.path(&format!("{name}-after"));
                table.save(&after).unwrap();
                assert!(
                    std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap(),
                    "{name}: the failed translation changed the table"
                );
                opt.refuse = false;
                let mut twin = DynamicTable::load(&before).unwrap();
                for round in 0..3u64 {
                    let more: Vec<u64> = batch.iter().map(|&k| k + round * 7).collect();
                    let rows = table.translate(&more, &mut opt).unwrap();
                    assert_eq!(rows, twin.translate(&more, &mut Frozen).unwrap(), "{name}");
                    table.advance(&mut opt).unwrap();
                    twin.advance(&mut Frozen).unwrap();
                }
                let (mine, theirs) = (
                    dir.path(&format!("{name}-mine")),
                    dir.path(&format!("{name}-twin")),
                );
                table.save(&mine).unwrap();
                twin.save(&theirs).unwrap();
                assert!(
                    std::fs::read(&mine).unwrap() == std::fs::read(&theirs).unwrap(),
                    "{name}: the table that failed went on unlike its twin"
                );
                checked += 1;
            }
        }
        checked
    });
    for (tier, threads, checked) in runs {
        assert_eq!(checked, 6, "{tier} {threads}");
    }
}

/// Ending a step whose TTL expires keys fails if their rows cannot be
/// brought current for the change log: the step does not end and no key
/// expires (the table saves the same bytes, the log exports the same
/// changes), and the next `advance` expires them as a table that never
/// failed does.
#[test]
fn an_expiry_that_cannot_catch_up_changes_nothing() {
    let dir = common::Scratch::new("dynamic-refused-expiry");
    let build = || {
        let config = DynamicConfig {
            eviction: Eviction::Ttl { steps: 2 },
            track_changes: true,
            ..Default::default()
        };
        let mut table = DynamicTable::new(4, config).unwrap();
        let mut opt = Refusing::default();
        let old: Vec<u64> = (0..300).map(mix).collect();
        table.translate(&old, &mut opt).unwrap();
        table.advance(&mut opt).unwrap();
        table.translate(&old[..100], &mut opt).unwrap();
        table.advance(&mut opt).unwrap();
        table
    };
    let (mut table, mut twin) = (build(), build());
    let mut opt = Refusing {
        refuse_catch_up: true,
        ..Default::default()
    };
    let (before, after) = (dir.path("before"), dir.path("after"));
    table.save(&before).unwrap();
    let err = table.advance(&mut opt).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "test optimizer",
                ..
            }
        ),
        "{err}"
    );
    table.save(&after).unwrap();
    assert!(
        std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap(),
        "the failed advance changed the table"
    );
    assert_eq!((table.steps(), table.len()), (twin.steps(), 300));
    opt.refuse_catch_up = false;
    table.advance(&mut opt).unwrap();
    twin.advance(&mut opt).unwrap();
    assert_eq!((table.len(), table.stats().expired), (100, 200));
    assert_eq!(
        table.export_changes().unwrap(),
        twin.export_changes().unwrap()
    );
    let (mine, theirs) = (dir.path("mine"), dir.path("twin"));
    table.save(&mine).unwrap();
    twin.save(&theirs).unwrap();
    assert!(
        std::fs::read(&mine).unwrap() == std::fs::read(&theirs).unwrap(),
        "the table that failed went on unlike its twin"
    );
}
