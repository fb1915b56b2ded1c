//! Dynamic checkpoints: a layer saved mid-training and loaded in a fresh
//! process resumes bit for bit (weights, optimizer state, keys, counters,
//! recency, sighting counts, change log) under every policy; corrupt
//! files are refused naming what is wrong.

mod common;

use common::{Scratch, assert_bits_eq};
use embtable::dynamic::{
    Admission, Capacity, DynamicConfig, DynamicEmbedding, DynamicTable, Eviction,
};
use embtable::{
    Adam, AdamConfig, Bags, EmbeddingTable, Error, Pooling, RmsProp, RmsPropConfig, Semantics,
    SparseOptimizer, io,
};
use workloads::{uniform, values};

type Layer = DynamicEmbedding<Box<dyn SparseOptimizer>>;

fn keys(t: u64) -> Vec<i64> {
    uniform(t + 100, 400, 900)
        .into_iter()
        .map(|k| k * 7_919 - 3_000_000)
        .collect()
}

/// Step `t`: a plain and a pooled pass; returns the outputs. With
/// `save_after_forward`, the layer is saved between the forward passes and
/// the backward passes (no gradient is pending then).
fn train_step(layer: &mut Layer, t: u64, save_after_forward: Option<&std::path::Path>) -> Vec<f32> {
    let ids = keys(t);
    let dim = layer.dim();
    let out = layer.forward(&ids).unwrap();
    let bags = Bags::fixed(&ids[..300], 3).unwrap();
    let mut pooled = vec![0.0; bags.len() * dim];
    layer
        .forward_pooled(&bags, Pooling::Sum, &mut pooled)
        .unwrap();
    if let Some(path) = save_after_forward {
        layer.save(path).unwrap();
    }
    layer
        .backward(&ids, &values(t, out.len(), -1.0, 1.0))
        .unwrap();
    layer.backward_pooled(&bags, Pooling::Sum, &pooled).unwrap();
    layer.step().unwrap();
    [out, pooled].concat()
}

/// Makes a fresh optimizer of one kind.
type MakeOptimizer = fn() -> Box<dyn SparseOptimizer>;

fn layers() -> Vec<(&'static str, DynamicConfig, MakeOptimizer)> {
    let base = DynamicConfig {
        capacity: Capacity::Rows(500),
        track_changes: true,
        seed: 11,
        ..Default::default()
    };
    let rmsprop: MakeOptimizer = || {
        Box::new(RmsProp::new(RmsPropConfig {
            momentum: 0.5,
            centered: true,
            semantics: Semantics::DenseExact,
            ..RmsPropConfig::keras()
        }))
    };
    let adam: MakeOptimizer = || Box::new(Adam::new(AdamConfig::keras()));
    vec![
        (
            "sightings + lru",
            DynamicConfig {
                admission: Admission::AfterSightings(2),
                ..base
            },
            rmsprop,
        ),
        (
            "probability + lfu",
            DynamicConfig {
                admission: Admission::Probability { p: 0.5, seed: 3 },
                eviction: Eviction::Lfu,
                ..base
            },
            adam,
        ),
        (
            "ttl, bytes",
            DynamicConfig {
                eviction: Eviction::Ttl { steps: 2 },
                capacity: Capacity::Bytes(200_000),
                ..base
            },
            rmsprop,
        ),
    ]
}

#[test]
fn a_loaded_layer_resumes_bit_for_bit() {
    let scratch = Scratch::new("dynamic-resume");
    for (name, config, optimizer) in layers() {
        for mid_step in [false, true] {
            let path = scratch.path(&format!("{}-{mid_step}.safetensors", name.replace(' ', "")));
            let table = DynamicTable::new(12, config).unwrap();
            let mut layer: Layer = DynamicEmbedding::new(table, optimizer()).unwrap();
            if name.starts_with("sightings") {
                layer.set_max_norm(Some(0.5)).unwrap();
            }
            for t in 0..6 {
                train_step(&mut layer, t, None);
            }
            if !mid_step {
                layer.save(&path).unwrap();
            }
            let mut outputs = Vec::new();
            for t in 6..12 {
                let save = (mid_step && t == 6).then_some(path.as_path());
                outputs.push(train_step(&mut layer, t, save));
            }
            let mut resumed: Layer = DynamicEmbedding::load(&path, optimizer()).unwrap();
            for t in 6..12 {
                let out = if mid_step && t == 6 {
                    // The forward passes of step 6 happened before the save.
                    let ids = keys(t);
                    let dim = resumed.dim();
                    let bags = Bags::fixed(&ids[..300], 3).unwrap();
                    let pooled = &outputs[0][ids.len() * dim..];
                    resumed
                        .backward(&ids, &values(t, ids.len() * dim, -1.0, 1.0))
                        .unwrap();
                    resumed
                        .backward_pooled(&bags, Pooling::Sum, pooled)
                        .unwrap();
                    resumed.step().unwrap();
                    outputs[0].clone()
                } else {
                    train_step(&mut resumed, t, None)
                };
                assert_bits_eq(&out, &outputs[t as usize - 6], &format!("{name}: step {t}"));
            }
            let (a, b) = (layer.table(), resumed.table());
            assert_eq!(a.weights(), b.weights(), "{name}");
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            assert_eq!((a.stats(), a.steps()), (b.stats(), b.steps()), "{name}");
            assert!(
                a.stats().evicted + a.stats().expired > 0,
                "{name}: {:?}",
                a.stats()
            );
            assert_eq!(
                layer.optimizer().state(),
                resumed.optimizer().state(),
                "{name}"
            );
            assert_eq!(
                layer.export_changes().unwrap(),
                resumed.export_changes().unwrap()
            );
            assert_eq!(layer.table().capacity(), resumed.table().capacity());
            assert_eq!(layer.max_norm(), resumed.max_norm());
        }
    }
}

#[test]
fn saving_refuses_a_pending_gradient_and_loading_a_frozen_file_needs_no_optimizer() {
    let scratch = Scratch::new("dynamic-pending");
    let path = scratch.path("t.safetensors");
    let mut layer: Layer = DynamicEmbedding::new(
        DynamicTable::new(3, DynamicConfig::default()).unwrap(),
        Box::new(Adam::new(AdamConfig::keras())) as Box<dyn SparseOptimizer>,
    )
    .unwrap();
    layer.forward(&[1u64]).unwrap();
    layer.backward(&[1u64], &[1.0; 3]).unwrap();
    assert!(matches!(
        layer.save(&path),
        Err(Error::InvalidConfig { field: "grad", .. })
    ));
    assert!(!path.exists());
    layer.step().unwrap();
    layer.table().save(&path).unwrap();
    let table = DynamicTable::load(&path).unwrap();
    assert_eq!(table.get(1u64), layer.table().get(1u64));
    let err = DynamicEmbedding::load(&path, Adam::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "optimizer",
                ..
            }
        ),
        "{err}"
    );
    layer.save(&path).unwrap();
    // A refused save over an existing checkpoint leaves it as it was.
    let saved = std::fs::read(&path).unwrap();
    layer.forward(&[2u64]).unwrap();
    layer.backward(&[2u64], &[1.0; 3]).unwrap();
    assert!(layer.save(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), saved);
    let err = DynamicEmbedding::load(&path, RmsProp::default()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "kind", .. }),
        "{err}"
    );
}

/// Where tensor `name`'s bytes start in a safetensors file.
fn tensor_start(bytes: &[u8], name: &str) -> usize {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    let entry = &header[header.find(&format!("\"{name}\"")).unwrap()..];
    let offsets = &entry[entry.find("data_offsets\":[").unwrap() + 15..];
    let start: usize = offsets[..offsets.find(',').unwrap()].parse().unwrap();
    8 + header_len + start
}

#[test]
fn corrupt_files_are_refused_naming_the_problem() {
    let scratch = Scratch::new("dynamic-corrupt");
    let path = scratch.path("t.safetensors");
    let mut table = DynamicTable::new(2, DynamicConfig::default()).unwrap();
    table
        .translate(&[10u64, 20, 30], &mut embtable::Frozen)
        .unwrap();
    table.save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let format_error = |bytes: &[u8]| {
        let p = scratch.write("bad.safetensors", bytes);
        match DynamicTable::load(&p) {
            Err(Error::Format { line: 0, reason }) => reason,
            other => panic!("{other:?}"),
        }
    };
    assert!(format_error(&good[..good.len() - 3]).contains("safetensors"));
    // Row 2 takes row 1's key.
    let rows = tensor_start(&good, "dynamic.rows");
    let mut twice = good.clone();
    twice.copy_within(rows + 32..rows + 40, rows + 64);
    assert!(format_error(&twice).contains("two rows"));
    // Row 1 is also on the free list.
    let free = tensor_start(&good, "dynamic.free");
    let mut both = good.clone();
    both[free..free + 4].copy_from_slice(&1u32.to_le_bytes());
    assert!(format_error(&both).contains("dynamic.free"));
    // Row 1 used in a call after the clock's.
    let mut future = good.clone();
    future[rows + 48..rows + 56].copy_from_slice(&99u64.to_le_bytes());
    assert!(format_error(&future).contains("after the clock"));
    // A fixed table's checkpoint is not a dynamic one.
    io::save_table_safetensors(&path, "weight", &EmbeddingTable::zeros(2, 2).unwrap()).unwrap();
    assert!(matches!(
        DynamicTable::load(&path),
        Err(Error::Format { .. })
    ));
}

/// `bytes` (a safetensors file) with metadata `key` set to `value`; the
/// header's length, in the first 8 bytes, follows.
fn with_metadata(bytes: &[u8], key: &str, value: &str) -> Vec<u8> {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + len]).unwrap();
    let field = format!("\"{key}\":\"");
    let start = header.find(&field).unwrap() + field.len();
    let end = start + header[start..].find('"').unwrap();
    let header = format!("{}{value}{}", &header[..start], &header[end..]);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(&bytes[8 + len..]);
    out
}

/// Issue 18 for the dynamic table: a counter the next call adds to (the
/// clock, the statistics, a row's uses) saved at `u64::MAX` would
/// overflow on that call (a panic with overflow checks, a wrapped clock
/// without), so loading refuses it, as the optimizers refuse such a step
/// counter.
#[test]
fn counters_the_next_call_would_overflow_are_refused() {
    let scratch = Scratch::new("dynamic-counters");
    let path = scratch.path("t.safetensors");
    let mut table = DynamicTable::new(2, DynamicConfig::default()).unwrap();
    table
        .translate(&[10u64, 20, 30], &mut embtable::Frozen)
        .unwrap();
    table.advance(&mut embtable::Frozen).unwrap();
    table.save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let max = u64::MAX;
    let huge = [
        ("dynamic.clock", format!("step={max},call=1")),
        ("dynamic.clock", format!("step=1,call={max}")),
        (
            "dynamic.stats",
            format!("lookups={max},admitted=3,evicted=0,expired=0,refused=0,grown=0"),
        ),
    ];
    for (key, value) in huge {
        let p = scratch.write("bad.safetensors", with_metadata(&good, key, &value));
        match DynamicTable::load(&p) {
            Err(Error::Format { line: 0, reason }) => {
                assert!(
                    reason.contains("above the limit"),
                    "{key}={value}: {reason}"
                )
            }
            other => panic!("{key}={value}: {other:?}"),
        }
    }
    // A row used u64::MAX times.
    let rows = tensor_start(&good, "dynamic.rows");
    let mut used = good.clone();
    used[rows + 40..rows + 48].copy_from_slice(&max.to_le_bytes());
    let p = scratch.write("bad.safetensors", used);
    match DynamicTable::load(&p) {
        Err(Error::Format { line: 0, reason }) => {
            assert!(reason.contains("above the limit"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The values as saved load: the edit itself keeps the file valid.
    let p = scratch.write(
        "ok.safetensors",
        with_metadata(&good, "dynamic.clock", "step=1,call=1"),
    );
    DynamicTable::load(&p).unwrap();
}
