//! Readers allocate in proportion to what the input holds, never to what
//! a header or a line count claims: hostile files (a GloVe line of 1000
//! values then a million junk lines, a word2vec header promising millions
//! of vectors, an `.npy` shape read from a pipe, a sharded checkpoint
//! whose metadata claims a table its files cannot hold) cost a bounded
//! multiple of their bytes. Every reader is here: word2vec text and
//! binary, fastText `.vec`, GloVe, `.npy`, safetensors tables,
//! checkpoints, dynamic-table checkpoints and sharded checkpoints.
//!
//! A counting global allocator measures the peak of live heap bytes over
//! each read; it refuses any allocation past [`CEILING`], so a regression
//! fails the bound instead of exhausting the machine. The tests of this
//! binary run one at a time (they share the counters).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use embtable::dynamic::{Admission, Capacity, DynamicConfig, DynamicEmbedding, DynamicTable};
use embtable::io::{self, Checkpoint, Word2VecFormat};
use embtable::shard::{self, ShardLayout, Sharding};
use embtable::{Adagrad, EmbeddingTable, Init, SparseGrad, SparseOptimizer, Vocab};
use proptest::prelude::*;

mod common;
use common::Scratch;

/// Live heap bytes, their peak, and the largest allocation refused.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// No test here needs more; a reader that asks for more is refused.
const CEILING: usize = 1 << 30;

struct Counting;

impl Counting {
    /// Counts `size` more bytes, or refuses them past the ceiling.
    fn take(size: usize) -> bool {
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        if live > CEILING {
            LIVE.fetch_sub(size, Ordering::Relaxed);
            REFUSED.fetch_max(size, Ordering::Relaxed);
            return false;
        }
        PEAK.fetch_max(live, Ordering::Relaxed);
        true
    }
}

// SAFETY: every method forwards to `System` with the same arguments; the
// counters only decide whether to forward (a refusal returns null, which
// the contract allows).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::take(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as the caller promised for `layout`.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::take(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as the caller promised for `layout`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !Self::take(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as the caller promised for `ptr`, `layout` and `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > layout.size() {
                LIVE.fetch_sub(new_size - layout.size(), Ordering::Relaxed);
            }
        } else if new_size < layout.size() {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Held by each test for its whole run: measurements must not overlap.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What a read cost: the peak of live bytes above those live before it,
/// and the largest allocation refused (0 if none).
#[derive(Debug)]
struct Cost {
    peak: usize,
    refused: usize,
}

fn measure<R>(read: impl FnOnce() -> R) -> (R, Cost) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    REFUSED.store(0, Ordering::Relaxed);
    let result = read();
    let cost = Cost {
        peak: PEAK.load(Ordering::Relaxed).saturating_sub(before),
        refused: REFUSED.load(Ordering::Relaxed),
    };
    (result, cost)
}

/// Buffers every reader may hold whatever its input: a 1 MiB read buffer
/// (two for GloVe's counting pass), a batch of lines parsed in parallel
/// (4 MiB and its index), small bookkeeping.
const BASE: usize = 12 << 20;

/// The bound a read of `len` input bytes must stay within, when the input
/// can hold at most `records` records: buffers, a few times the bytes
/// read (a line, a batch, a pipe's data), and per record its row (at
/// least a 64-byte cache line), the doubling of a growing table, its
/// word and the vocabulary's index.
fn bound(len: usize, records: usize) -> usize {
    BASE + 4 * len + 320 * records
}

#[track_caller]
fn assert_within(cost: &Cost, len: usize, records: usize, what: &str) {
    assert_eq!(cost.refused, 0, "{what}: asked for {} bytes", cost.refused);
    let limit = bound(len, records);
    assert!(
        cost.peak <= limit,
        "{what}: peak {} bytes for {len} input bytes holding at most {records} records \
         (bound {limit})",
        cost.peak
    );
}

/// The input formats.
#[derive(Clone, Copy, Debug)]
enum Format {
    Word2VecText,
    Word2VecBinary,
    FastTextVec,
    Glove,
    Npy,
    Safetensors,
    Checkpoint,
    /// A [`DynamicEmbedding`] layer's file.
    Dynamic,
    /// The one file of a sharded checkpoint saved by one rank.
    Sharded,
}

const FORMATS: [Format; 9] = [
    Format::Word2VecText,
    Format::Word2VecBinary,
    Format::FastTextVec,
    Format::Glove,
    Format::Npy,
    Format::Safetensors,
    Format::Checkpoint,
    Format::Dynamic,
    Format::Sharded,
];

/// Rank 0's file of a one-rank save, named as a sharded checkpoint's
/// directory must hold it.
fn shard_name() -> String {
    shard::shard_file_name(0, 1)
}

/// Reads `path` as `format`, as `Ok(rows)` or the error's text.
fn read(format: Format, path: &std::path::Path) -> Result<usize, String> {
    let rows = match format {
        Format::Word2VecText => io::read_word2vec(path, Word2VecFormat::Text).map(|p| p.table),
        Format::Word2VecBinary => io::read_word2vec(path, Word2VecFormat::Binary).map(|p| p.table),
        Format::FastTextVec => io::read_fasttext_vec(path).map(|p| p.table),
        Format::Glove => io::read_glove(path).map(|p| p.table),
        Format::Npy => io::load_npy(path),
        Format::Safetensors => io::load_table_safetensors(path, "weight"),
        Format::Checkpoint => io::load_checkpoint(path, &mut Adagrad::default()),
        // Its keys (the table has a default row besides).
        Format::Dynamic => {
            return DynamicEmbedding::load(path, Adagrad::default())
                .map(|layer| layer.table().len())
                .map_err(|e| e.to_string());
        }
        Format::Sharded => {
            // A directory whose one shard file is `path` (a file or a pipe).
            let dir = path.with_extension("shards");
            std::fs::create_dir_all(&dir).unwrap();
            let link = dir.join(shard_name());
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(path, &link).unwrap();
            let table = shard::load_sharded_checkpoint(&dir, &mut Adagrad::default());
            std::fs::remove_dir_all(&dir).unwrap();
            table
        }
    };
    rows.map(|t| t.rows()).map_err(|e| e.to_string())
}

/// A valid file of `format` holding `rows × dim` vectors.
fn valid_file(format: Format, rows: usize, dim: usize, seed: u64) -> Vec<u8> {
    let dir = Scratch::new(&format!("valid-{seed}"));
    let path = dir.path("f");
    let table = EmbeddingTable::new(
        rows,
        dim,
        Init::Normal {
            mean: 0.0,
            std: 2.0,
        },
        seed,
    )
    .unwrap();
    let vocab = Vocab::from_words((0..rows).map(|r| format!("w{r}x{}", seed % 7))).unwrap();
    match format {
        Format::Word2VecText | Format::FastTextVec | Format::Glove => {
            io::write_word2vec(&path, &vocab, &table, Word2VecFormat::Text).unwrap();
        }
        Format::Word2VecBinary => {
            io::write_word2vec(&path, &vocab, &table, Word2VecFormat::Binary).unwrap();
        }
        Format::Npy => io::save_npy(&path, &table).unwrap(),
        Format::Safetensors => io::save_table_safetensors(&path, "weight", &table).unwrap(),
        Format::Checkpoint => {
            let mut table = table;
            let mut opt = Adagrad::default();
            let mut grad = SparseGrad::for_table(&table);
            grad.accumulate_lookup(&[0u32], &vec![0.5; dim]).unwrap();
            opt.step(&mut table, &grad).unwrap();
            io::save_checkpoint(&path, &table, &opt).unwrap();
        }
        Format::Dynamic => dynamic_layer(rows, dim, seed).save(&path).unwrap(),
        Format::Sharded => {
            let layout = ShardLayout::new(rows, dim, 1, Sharding::Range).unwrap();
            sharded_file(&table, &layout).save(&path).unwrap();
        }
    }
    let mut bytes = std::fs::read(&path).unwrap();
    if let Format::Glove = format {
        // GloVe is word2vec text without the header line.
        let end = bytes.iter().position(|&b| b == b'\n').unwrap();
        bytes.drain(..=end);
    }
    bytes
}

/// A trained dynamic layer holding `keys` keys of `dim` floats, with every
/// part a checkpoint can hold: free rows, sighting counts, a change log
/// with evicted keys and their values, Adagrad's state.
fn dynamic_layer(keys: usize, dim: usize, seed: u64) -> DynamicEmbedding<Adagrad> {
    let config = DynamicConfig {
        admission: Admission::AfterSightings(2),
        capacity: Capacity::Rows(keys),
        track_changes: true,
        seed,
        ..Default::default()
    };
    let table = DynamicTable::new(dim, config).unwrap();
    let mut layer = DynamicEmbedding::new(table, Adagrad::default()).unwrap();
    let twice = |first: u64| -> Vec<u64> {
        (first..first + keys as u64)
            .flat_map(|k| [k * 1_000_003; 2])
            .collect()
    };
    // The first keys, then as many others evicting them, then one sighting.
    for batch in [
        twice(seed),
        twice(seed + keys as u64),
        vec![seed + 2 * keys as u64],
    ] {
        let out = layer.forward(&batch).unwrap();
        layer.backward(&batch, &vec![0.5; out.len()]).unwrap();
        layer.step().unwrap();
    }
    assert_eq!(layer.table().len(), keys);
    layer
}

/// The dimension `bytes` declares (header, shape, first line), if any.
fn declared_dim(format: Format, bytes: &[u8]) -> Option<usize> {
    let first_line = bytes.split(|&b| b == b'\n').next()?;
    let text = String::from_utf8_lossy(first_line);
    let mut tokens = text.split([' ', '\t']).filter(|t| !t.is_empty());
    match format {
        Format::Word2VecText | Format::Word2VecBinary | Format::FastTextVec => {
            tokens.nth(1)?.trim().parse().ok()
        }
        Format::Glove => Some(tokens.count().checked_sub(1)?),
        Format::Npy => {
            let shape = text.split("'shape': (").nth(1)?;
            shape.split([',', ')']).nth(1)?.trim().parse().ok()
        }
        Format::Safetensors | Format::Checkpoint | Format::Dynamic | Format::Sharded => None,
    }
}

/// A one-rank sharded checkpoint's file of `table`, as `ShardedTable::save`
/// writes it, claiming the whole table's shape of `layout`.
fn sharded_file<'a>(table: &'a EmbeddingTable, layout: &ShardLayout) -> Checkpoint<'a> {
    Checkpoint::new()
        .with("embedding", table, &Adagrad::default())
        .with_metadata("shard.rows", layout.rows().to_string())
        .with_metadata("shard.dim", layout.dim().to_string())
        .with_metadata("shard.world", "1")
        .with_metadata("shard.rank", "0")
        .with_metadata("shard.sharding", layout.sharding().name())
        .with_metadata("shard.id", "io-memory")
}

/// Sets metadata `key` (a `user:` key) of the safetensors file `bytes` to
/// `value`, keeping the file otherwise valid (the header grows or shrinks,
/// its length in the first 8 bytes with it). Files too mangled to hold the
/// key are left alone.
fn set_metadata(bytes: &mut Vec<u8>, key: &str, value: u64) {
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    else {
        return;
    };
    let Some(header) = bytes.get(8..8usize.saturating_add(len)) else {
        return;
    };
    let header = String::from_utf8_lossy(header).into_owned();
    let field = format!("\"user:{key}\":\"");
    let Some(start) = header.find(&field).map(|at| at + field.len()) else {
        return;
    };
    let Some(end) = header[start..].find('"').map(|n| start + n) else {
        return;
    };
    let header = format!("{}{value}{}", &header[..start], &header[end..]);
    bytes.splice(
        ..8 + len,
        (header.len() as u64)
            .to_le_bytes()
            .into_iter()
            .chain(header.into_bytes()),
    );
}

/// At most how many records `bytes` can hold: text lines long enough for
/// the declared dimension, or the bytes over a record's least size.
fn max_records(format: Format, bytes: &[u8]) -> usize {
    let dim = declared_dim(format, bytes).unwrap_or(1).max(1);
    match format {
        Format::Word2VecText | Format::FastTextVec | Format::Glove => bytes
            .split(|&b| b == b'\n')
            .filter(|line| line.len() / 2 >= dim)
            .count(),
        Format::Word2VecBinary => bytes.len() / dim.saturating_mul(4).saturating_add(2) + 1,
        Format::Npy => bytes.len() / dim.saturating_mul(4) + 1,
        // A 2-byte (F16) value per row of one column at least.
        Format::Safetensors | Format::Checkpoint | Format::Dynamic | Format::Sharded => {
            bytes.len() / 2 + 1
        }
    }
}

/// A path that reads `bytes` through a pipe: no size to check up front.
/// Keep the returned guard until the read is over.
struct Pipe {
    path: PathBuf,
    reader: Option<std::io::PipeReader>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Pipe {
    fn new(bytes: Vec<u8>) -> Self {
        use std::os::fd::AsRawFd;
        let (reader, mut writer) = std::io::pipe().unwrap();
        let path = PathBuf::from(format!("/proc/self/fd/{}", reader.as_raw_fd()));
        let writer = std::thread::spawn(move || {
            // The reader may stop early (an error): then this write fails.
            let _ = writer.write_all(&bytes);
        });
        Pipe {
            path,
            reader: Some(reader),
            writer: Some(writer),
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        drop(self.reader.take());
        if let Some(w) = self.writer.take() {
            w.join().unwrap();
        }
    }
}

/// Reads `bytes` as a regular file and through a pipe, checking the bound
/// on both; returns the two outcomes.
fn check_both(format: Format, bytes: &[u8], what: &str) -> [Result<usize, String>; 2] {
    let dir = Scratch::new("hostile");
    let path = dir.write("f", bytes);
    let records = max_records(format, bytes);
    let (file, cost) = measure(|| read(format, &path));
    assert_within(
        &cost,
        bytes.len(),
        records,
        &format!("{what} ({format:?}, file)"),
    );
    if let Format::Sharded = format {
        // A sharded checkpoint is a directory of regular files, whose
        // sizes are checked before anything is allocated: a pipe among
        // them is refused as holding no bytes, which the file case above
        // already bounds.
        return [file.clone(), file];
    }
    let pipe = Pipe::new(bytes.to_vec());
    let (piped, cost) = measure(|| read(format, &pipe.path));
    drop(pipe);
    assert_within(
        &cost,
        bytes.len(),
        records,
        &format!("{what} ({format:?}, pipe)"),
    );
    [file, piped]
}

#[test]
fn glove_line_of_1000_values_then_a_million_junk_lines() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut bytes = b"the".to_vec();
    for v in 0..1000 {
        bytes.extend_from_slice(format!(" {v}").as_bytes());
    }
    bytes.push(b'\n');
    bytes.extend(b"x\n".repeat(1_000_000));
    for result in check_both(Format::Glove, &bytes, "glove bomb") {
        let err = result.unwrap_err();
        assert!(err.starts_with("line 2: expected 1000 values"), "{err}");
    }
}

#[test]
fn word2vec_header_promising_more_than_the_junk_after_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for header in ["3000000 1", "3000000 300"] {
        let mut bytes = format!("{header}\na").into_bytes();
        let dim: usize = header[8..].parse().unwrap();
        bytes.extend(" 0.5".repeat(dim).bytes());
        bytes.push(b'\n');
        bytes.extend(b"x\n".repeat(2_000_000));
        for result in check_both(Format::Word2VecText, &bytes, header) {
            let err = result.unwrap_err();
            let values = if dim == 1 { "value" } else { "values" };
            assert!(
                err.starts_with(&format!("line 3: expected {dim} {values}")),
                "{err}"
            );
        }
    }
    // Binary: the header asks for 3 million vectors of 300 floats.
    let mut bytes = b"3000000 300\na ".to_vec();
    bytes.extend([0u8; 1200]);
    bytes.extend(b"junk".repeat(100_000));
    for result in check_both(Format::Word2VecBinary, &bytes, "binary") {
        let err = result.unwrap_err();
        assert!(
            err.starts_with("line 3: the file ends inside the word"),
            "{err}"
        );
    }
}

#[test]
fn npy_shape_is_not_trusted_before_the_data_is_read() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("npy-shape");
    let path = dir.path("t.npy");
    io::save_npy(&path, &EmbeddingTable::zeros(2, 3).unwrap()).unwrap();
    let small = std::fs::read(&path).unwrap();
    let header = String::from_utf8_lossy(&small[10..128]).into_owned();
    let big = header.replace("(2, 3)", "(4000000, 64)");
    let mut bytes = small[..10].to_vec();
    bytes.extend(big.trim_end().as_bytes());
    bytes.resize(127, b' ');
    bytes.push(b'\n');
    bytes.extend([0u8; 24]);
    for result in check_both(Format::Npy, &bytes, "npy shape") {
        let err = result.unwrap_err();
        assert!(err.contains("cut short"), "{err}");
    }
}

#[test]
fn a_sharded_checkpoint_claiming_a_table_its_files_cannot_hold() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // 2 rows of 64 in the file; the metadata claims 10 million (2.6 GB).
    let table = EmbeddingTable::zeros(2, 64).unwrap();
    let claim = ShardLayout::new(10_000_000, 64, 1, Sharding::Range).unwrap();
    let dir = Scratch::new("sharded-claim");
    let path = dir.path("f");
    sharded_file(&table, &claim).save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let [result, _] = check_both(Format::Sharded, &bytes, "sharded claim");
    let err = result.unwrap_err();
    assert!(err.contains("cannot hold a 10000000x64 table"), "{err}");
}

/// Ways to make a valid file hostile.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the first line (header, first vector) by a claim of `count`
    /// vectors of `dim` values (npy: the shape).
    Claim { count: u64, dim: u64 },
    /// Append `lines` junk lines of `width` bytes.
    Junk { lines: usize, width: usize },
    /// Cut the file at this fraction of its length.
    Truncate(f64),
    /// Overwrite a byte.
    Flip { at: f64, byte: u8 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let big = prop_oneof![
        Just(1u64),
        1u64..100,
        Just(1 << 20),
        Just(1 << 40),
        Just(u64::MAX)
    ];
    prop_oneof![
        (big.clone(), big).prop_map(|(count, dim)| Mutation::Claim { count, dim }),
        (0usize..200_000, 0usize..4).prop_map(|(lines, width)| Mutation::Junk { lines, width }),
        (0.0f64..1.0).prop_map(Mutation::Truncate),
        (0.0f64..1.0, any::<u8>()).prop_map(|(at, byte)| Mutation::Flip { at, byte }),
    ]
}

fn apply(format: Format, bytes: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::Claim { count, dim } => match format {
            Format::Npy if bytes.len() < 128 => {}
            Format::Npy => {
                let text = String::from_utf8_lossy(&bytes[..128]).into_owned();
                if let Some(start) = text.find("'shape': (") {
                    let start = start + "'shape': (".len();
                    let end = start + text[start..].find(')').unwrap();
                    let claim = format!("{count}, {dim}");
                    if claim.len() <= 128 - end - 4 {
                        let mut header = text[..start].to_string() + &claim + &text[end..];
                        header.truncate(127);
                        while header.len() < 127 {
                            header.insert(header.len() - 1, ' ');
                        }
                        bytes[..127].copy_from_slice(&header.as_bytes()[..127]);
                    }
                }
            }
            Format::Word2VecText | Format::Word2VecBinary | Format::FastTextVec | Format::Glove => {
                let end = bytes
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(bytes.len());
                let claim = match format {
                    Format::Glove => format!("w{}", " 1".repeat(dim.min(5000) as usize)),
                    _ => format!("{count} {dim}"),
                };
                bytes.splice(..end, claim.into_bytes());
            }
            Format::Sharded if count % 2 == 0 => {
                // The whole table's shape in the metadata.
                set_metadata(bytes, "shard.rows", count);
                set_metadata(bytes, "shard.dim", dim);
            }
            Format::Safetensors | Format::Checkpoint | Format::Dynamic | Format::Sharded => {
                // The header's length, the first 8 bytes.
                if bytes.len() >= 8 {
                    bytes[..8].copy_from_slice(&count.to_le_bytes());
                }
            }
        },
        Mutation::Junk { lines, width } => {
            let mut line = vec![b'x'; width];
            line.push(b'\n');
            bytes.extend(line.repeat(lines));
        }
        Mutation::Truncate(at) => bytes.truncate((bytes.len() as f64 * at) as usize),
        Mutation::Flip { at, byte } => {
            if !bytes.is_empty() {
                let i = ((bytes.len() as f64 * at) as usize).min(bytes.len() - 1);
                bytes[i] = byte;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Any file, however mangled, read from disk or from a pipe, costs at
    /// most the bound: a few times its bytes, and per record it can hold a
    /// row and a word. And no input panics.
    #[test]
    fn hostile_files_cost_a_bounded_multiple_of_their_bytes(
        format in proptest::sample::select(FORMATS.to_vec()),
        rows in 1usize..40,
        dim in 1usize..40,
        seed in any::<u64>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut bytes = valid_file(format, rows, dim, seed);
        for m in &mutations {
            apply(format, &mut bytes, m);
        }
        let [file, piped] = check_both(format, &bytes, &format!("{mutations:?}"));
        // A pipe gives the same answer as the file (messages may name
        // different sizes), and a valid file still reads.
        prop_assert_eq!(file.is_ok(), piped.is_ok(), "{:?} vs {:?}", file, piped);
    }
}

#[test]
fn valid_files_stay_within_the_bound_too() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for format in FORMATS {
        for (rows, dim) in [(1, 1), (5000, 1), (300, 17), (50, 300)] {
            let bytes = valid_file(format, rows, dim, 7);
            for result in check_both(format, &bytes, "valid") {
                assert_eq!(result, Ok(rows), "{format:?} {rows}x{dim}");
            }
        }
    }
}
/// `bytes` (a safetensors file) with `from` replaced by `to` in its JSON
/// header, the header's length updated: a file whose header lies.
fn with_header_edit(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + len]).unwrap();
    assert!(header.contains(from), "{from} not in {header}");
    let header = header.replacen(from, to, 1);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&bytes[8 + len..]);
    out
}

#[test]
fn dynamic_checkpoint_headers_are_not_trusted() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let good = valid_file(Format::Dynamic, 50, 3, 9);
    let len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + len]).unwrap().to_owned();
    // The weight's shape as saved: the storage grew by doubling past 50 keys.
    let rows_shape = |name: &str| {
        let entry = &header[header.find(&format!("\"{name}\"")).unwrap()..];
        let shape = &entry[entry.find("\"shape\":[").unwrap() + 9..];
        shape[..shape.find(']').unwrap()].to_owned()
    };
    let weight = rows_shape("dynamic.weight");
    let cases = [
        // A config promising huge rows: the weight tensor does not hold them.
        (
            "dim=3,",
            "dim=1099511627776,",
            "dynamic.weight has 3 columns",
        ),
        // A capacity the rows held exceed.
        (
            "capacity=rows:50",
            "capacity=rows:10",
            "beyond the capacity of 10 keys",
        ),
        // Shapes claiming more than the data holds.
        (
            &format!("\"shape\":[{weight}]"),
            "\"shape\":[4294967295,3]",
            "safetensors",
        ),
        (
            &format!("\"shape\":[{}]", rows_shape("dynamic.pending")),
            "\"shape\":[1152921504606846975,3]",
            "safetensors",
        ),
        // Sighting counts for a table that counts none.
        (
            "admission=after_sightings:2",
            "admission=always",
            "dynamic.pending",
        ),
        // A clock before the rows' last use.
        ("step=3,", "step=0,", "after the clock"),
    ];
    for (from, to, want) in cases {
        let bytes = with_header_edit(&good, from, to);
        for result in check_both(Format::Dynamic, &bytes, to) {
            let err = result.unwrap_err();
            assert!(err.contains(want), "{to}: {err}");
        }
    }
    // The same file unedited still reads.
    for result in check_both(Format::Dynamic, &good, "unedited") {
        assert_eq!(result, Ok(50));
    }
}
