//! Pretrained vectors and `.npy`: the fixtures written by the real tools
//! (scripts/make_fixtures.py: gensim, NumPy, and the C/C++ tools' print
//! formats), round trips, malformed files and fuzzing.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use common::{Scratch, fixture};

use embtable::io::{
    self, Coverage, Pretrained, ReadOptions, TableOptions, UnicodeErrors, Word2VecFormat,
};
use embtable::{EmbeddingTable, Error, Init, Vocab};
use proptest::prelude::*;

// ---------------------------------------------------------------- helpers

/// What gensim / NumPy read from a fixture.
struct Expected {
    words: Vec<String>,
    rows: usize,
    dim: usize,
    bits: Vec<u32>,
}

fn expected(name: &str) -> Expected {
    let text = fs::read_to_string(fixture("expected.txt")).unwrap();
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    while let Some(line) = lines.next() {
        let head: Vec<&str> = line.split(' ').collect();
        assert_eq!(head[0], "file", "{line}");
        let (rows, dim): (usize, usize) = (head[2].parse().unwrap(), head[3].parse().unwrap());
        let mut e = Expected {
            words: Vec::new(),
            rows,
            dim,
            bits: Vec::new(),
        };
        for _ in 0..rows {
            let mut parts = lines.next().unwrap().split(' ');
            e.words.push(parts.next().unwrap().to_string());
            e.bits
                .extend(parts.map(|h| u32::from_str_radix(h, 16).unwrap()));
        }
        assert_eq!(e.bits.len(), rows * dim);
        if head[1] == name {
            return e;
        }
    }
    panic!("{name} is not in expected.txt");
}

fn bits(table: &EmbeddingTable) -> Vec<u32> {
    table.to_vec().iter().map(|x| x.to_bits()).collect()
}

fn assert_matches_tools(name: &str, pretrained: &Pretrained) {
    let e = expected(name);
    assert_eq!(pretrained.vocab.words(), e.words, "{name}");
    assert_eq!(
        (pretrained.table.rows(), pretrained.table.dim()),
        (e.rows, e.dim),
        "{name}"
    );
    assert_eq!(bits(&pretrained.table), e.bits, "{name}");
}

/// Asserts `result` is a format error at `line` whose reason contains `needle`.
#[track_caller]
fn assert_format<T: std::fmt::Debug>(result: Result<T, Error>, line: usize, needle: &str) {
    match result {
        Err(Error::Format { line: got, reason }) => {
            assert_eq!(got, line, "wrong line; reason: {reason}");
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            );
        }
        other => panic!("expected a format error at line {line}, got {other:?}"),
    }
}

fn read_w2v_text(p: &Path) -> Result<Pretrained, Error> {
    io::read_word2vec(p, Word2VecFormat::Text)
}

fn read_w2v_bin(p: &Path) -> Result<Pretrained, Error> {
    io::read_word2vec(p, Word2VecFormat::Binary)
}

// ------------------------------------------------- files the tools wrote

#[test]
fn reads_gensim_word2vec_text() {
    let p = read_w2v_text(&fixture("w2v.txt")).unwrap();
    assert_matches_tools("w2v.txt", &p);
    assert_eq!(p.vocab.get("東京"), Some(4));
    assert_eq!(p.vector("naïve").unwrap().len(), 6);
}

#[test]
fn reads_gensim_word2vec_binary() {
    assert_matches_tools("w2v.bin", &read_w2v_bin(&fixture("w2v.bin")).unwrap());
}

#[test]
fn reads_c_tool_binary_with_newlines_after_vectors() {
    let p = read_w2v_bin(&fixture("w2v_ctool.bin")).unwrap();
    assert_matches_tools("w2v_ctool.bin", &p);
    // Same data as gensim's file.
    assert_eq!(p, read_w2v_bin(&fixture("w2v.bin")).unwrap());
}

#[test]
fn reads_glove_as_printed_by_glove_c() {
    let p = io::read_glove(fixture("glove.txt")).unwrap();
    assert_matches_tools("glove.txt", &p);
}

#[test]
fn reads_fasttext_vec_with_trailing_spaces() {
    let p = io::read_fasttext_vec(fixture("fasttext.vec")).unwrap();
    assert_matches_tools("fasttext.vec", &p);
    assert_eq!(p, read_w2v_text(&fixture("fasttext.vec")).unwrap());
}

#[test]
fn repeated_words_keep_the_first_as_gensim_does() {
    let path = fixture("w2v_dups.txt");
    let (p, report) =
        io::read_word2vec_with(&path, Word2VecFormat::Text, &ReadOptions::default()).unwrap();
    assert_matches_tools("w2v_dups.txt", &p);
    assert_eq!(p.table.rows(), 3);
    assert_eq!((report.declared, report.records), (Some(4), 4));
    assert_eq!(report.duplicates.len(), 1);
    let d = &report.duplicates[0];
    assert_eq!((d.word.as_str(), d.line, d.first_row), ("the", 4, 0));
}

#[test]
fn invalid_utf8_is_an_error_or_replaced_as_gensim_does() {
    let path = fixture("w2v_badutf8.bin");
    assert_format(read_w2v_bin(&path), 3, "UTF-8");
    let options = ReadOptions {
        unicode_errors: UnicodeErrors::Replace,
        ..Default::default()
    };
    let (p, report) = io::read_word2vec_with(&path, Word2VecFormat::Binary, &options).unwrap();
    assert_matches_tools("w2v_badutf8.bin", &p);
    assert_eq!(report.replaced_words, [3]);
}

#[test]
fn reads_numpy_npy_files() {
    for name in [
        "table.npy",
        "table_fortran.npy",
        "table_v2.npy",
        "table_v3.npy",
        "table_be.npy",
        "table_f8.npy",
    ] {
        let table = io::load_npy(fixture(name)).unwrap();
        let e = expected(name);
        assert_eq!((table.rows(), table.dim()), (e.rows, e.dim), "{name}");
        assert_eq!(bits(&table), e.bits, "{name}");
    }
}

#[test]
fn writers_match_the_tools_byte_for_byte() {
    let dir = Scratch::new("io-bytes");
    let p = read_w2v_bin(&fixture("w2v.bin")).unwrap();
    let out = dir.path("w2v.bin");
    io::write_word2vec(&out, &p.vocab, &p.table, Word2VecFormat::Binary).unwrap();
    assert_eq!(
        fs::read(&out).unwrap(),
        fs::read(fixture("w2v.bin")).unwrap()
    );

    let table = io::load_npy(fixture("table.npy")).unwrap();
    let out = dir.path("table.npy");
    io::save_npy(&out, &table).unwrap();
    assert_eq!(
        fs::read(&out).unwrap(),
        fs::read(fixture("table.npy")).unwrap()
    );
}

#[test]
fn written_text_matches_gensim_values() {
    // Our text differs from gensim's in spelling ("1e-8" for "1e-08", "2"
    // for "2.0") but must read back to the same bits.
    let dir = Scratch::new("io-text-values");
    let p = read_w2v_text(&fixture("w2v.txt")).unwrap();
    let out = dir.path("w2v.txt");
    io::write_word2vec(&out, &p.vocab, &p.table, Word2VecFormat::Text).unwrap();
    let text = fs::read_to_string(&out).unwrap();
    assert!(
        text.starts_with("7 6\nthe 0.1 -0 1e-8 3.4028235e38 -1.5 2\n"),
        "{text}"
    );
    assert_matches_tools("w2v.txt", &read_w2v_text(&out).unwrap());

    let out = dir.path("glove.txt");
    io::write_glove(&out, &p.vocab, &p.table).unwrap();
    assert_matches_tools("w2v.txt", &io::read_glove(&out).unwrap());
}

// ------------------------------------------------------------ round trips

fn vocab_of(rows: usize) -> Vocab {
    // Some non-ASCII words, and words that look like numbers.
    Vocab::from_words((0..rows).map(|i| match i % 4 {
        0 => format!("w{i}"),
        1 => format!("ñ{i}東"),
        2 => format!("{i}"),
        _ => format!("-{i}.5e3"),
    }))
    .unwrap()
}

fn table_of(rows: usize, dim: usize, raw: &[u32], finite: bool) -> EmbeddingTable {
    let values: Vec<f32> = raw
        .iter()
        .cycle()
        .take(rows * dim)
        .map(|&b| {
            let x = f32::from_bits(b);
            if finite && !x.is_finite() { 0.5 } else { x }
        })
        .collect();
    EmbeddingTable::from_rows(rows, dim, &values).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn round_trips_are_exact(
        rows in 1usize..40,
        dim in 1usize..=49,
        raw in prop::collection::vec(any::<u32>(), 1..200),
    ) {
        let dir = Scratch::new("io-roundtrip");
        let vocab = vocab_of(rows);
        // Text is exact for every finite value (NaN has no payload in text).
        let finite = table_of(rows, dim, &raw, true);
        let any_bits = table_of(rows, dim, &raw, false);

        for (format, table) in [(Word2VecFormat::Text, &finite), (Word2VecFormat::Binary, &any_bits)] {
            let path = dir.path("v");
            io::write_word2vec(&path, &vocab, table, format).unwrap();
            let back = io::read_word2vec(&path, format).unwrap();
            prop_assert_eq!(&back.vocab, &vocab);
            prop_assert_eq!(bits(&back.table), bits(table));
        }
        let path = dir.path("glove");
        io::write_glove(&path, &vocab, &finite).unwrap();
        let back = io::read_glove(&path).unwrap();
        prop_assert_eq!(&back.vocab, &vocab);
        prop_assert_eq!(bits(&back.table), bits(&finite));

        let path = dir.path("t.npy");
        io::save_npy(&path, &any_bits).unwrap();
        let back = io::load_npy(&path).unwrap();
        prop_assert_eq!(back.stride(), any_bits.stride());
        prop_assert_eq!(bits(&back), bits(&any_bits));
        // Pad lanes stay zero.
        prop_assert!(back.as_padded().chunks(back.stride()).all(|r| r[dim..].iter().all(|&x| x.to_bits() == 0)));
    }
}

#[test]
fn npy_rows_beyond_one_read_chunk() {
    // 70k rows × 3: several read chunks, rows split across none of them.
    let dir = Scratch::new("io-npy-big");
    let table = EmbeddingTable::new(
        70_001,
        3,
        Init::Normal {
            mean: 0.0,
            std: 1.0,
        },
        9,
    )
    .unwrap();
    let path = dir.path("big.npy");
    io::save_npy(&path, &table).unwrap();
    assert_eq!(io::load_npy(&path).unwrap(), table);

    // The same array in Fortran order (column-major), as
    // np.save(p, np.asfortranarray(w)) writes it: columns span chunks.
    let mut bytes = fs::read(&path).unwrap();
    let header = b"'fortran_order': False";
    let at = bytes
        .windows(header.len())
        .position(|w| w == header)
        .unwrap();
    bytes.splice(
        at..at + header.len(),
        b"'fortran_order': True ".iter().copied(),
    );
    let data_start = 128;
    bytes.truncate(data_start);
    for j in 0..3 {
        for i in 0..table.rows() {
            bytes.extend_from_slice(&table.row(i)[j].to_le_bytes());
        }
    }
    let path = dir.write("big_f.npy", &bytes);
    assert_eq!(io::load_npy(&path).unwrap(), table);
}

// ---------------------------------------------------------------- limits

#[test]
fn limit_reads_only_the_first_vectors() {
    for (name, format) in [
        ("w2v.txt", Some(Word2VecFormat::Text)),
        ("w2v.bin", Some(Word2VecFormat::Binary)),
        ("w2v_ctool.bin", Some(Word2VecFormat::Binary)),
        ("glove.txt", None),
    ] {
        for limit in [1, 3, 7, 100] {
            let options = ReadOptions {
                limit: Some(limit),
                ..Default::default()
            };
            let (p, report) = match format {
                Some(f) => io::read_word2vec_with(fixture(name), f, &options),
                None => io::read_glove_with(fixture(name), &options),
            }
            .unwrap();
            let e = expected(name);
            let n = limit.min(7);
            assert_eq!(p.vocab.words(), &e.words[..n], "{name} {limit}");
            assert_eq!(bits(&p.table), &e.bits[..n * e.dim], "{name} {limit}");
            assert_eq!(report.records, n);
        }
    }
    let zero = ReadOptions {
        limit: Some(0),
        ..Default::default()
    };
    let err = io::read_glove_with(fixture("glove.txt"), &zero).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "limit", .. }),
        "{err}"
    );
}

#[test]
fn limit_stops_before_a_broken_tail() {
    let dir = Scratch::new("io-limit-tail");
    let path = dir.write("v.txt", "3 2\na 1 2\nb 3 4\nc oops 2\n");
    let options = ReadOptions {
        limit: Some(2),
        ..Default::default()
    };
    let (p, _) = io::read_word2vec_with(&path, Word2VecFormat::Text, &options).unwrap();
    assert_eq!(p.table.to_vec(), [1., 2., 3., 4.]);
    assert_format(read_w2v_text(&path), 4, "\"oops\"");
}

#[test]
fn words_with_spaces_are_read_on_request() {
    // As in glove.840B.300d.txt: ". . ." and "at name@domain.com" are words.
    let dir = Scratch::new("io-spaced");
    let glove = dir.write("g.txt", "the 1 2\n. . . 3 4\nat name@domain.com 5 6\n");
    let w2v = dir.write("w.txt", "3 2\nthe 1 2\n. . . 3 4\nat name@domain.com 5 6\n");
    assert_format(
        io::read_glove(&glove),
        2,
        "expected 2 values after word \".\", found 4",
    );
    assert_format(read_w2v_text(&w2v), 3, "found 4");
    let options = ReadOptions {
        words_with_spaces: true,
        ..Default::default()
    };
    let (g, _) = io::read_glove_with(&glove, &options).unwrap();
    let (w, _) = io::read_word2vec_with(&w2v, Word2VecFormat::Text, &options).unwrap();
    assert_eq!(g, w);
    assert_eq!(g.vocab.words(), ["the", ". . .", "at name@domain.com"]);
    assert_eq!(g.table.to_vec(), [1., 2., 3., 4., 5., 6.]);
    // Too few values is still an error.
    let short = dir.write("s.txt", "the 1 2\n. 3\n");
    assert_format(io::read_glove_with(&short, &options), 2, "found 1");
    let odd = dir.write("o.txt", "the 1 2\n. . 3\n");
    assert_format(
        io::read_glove_with(&odd, &options),
        2,
        "not a number: \".\"",
    );
}

// ---------------------------------------------------------- bad files

#[test]
fn malformed_text_files_name_the_line() {
    let dir = Scratch::new("io-bad-text");
    let w2v: &[(&[u8], usize, &str)] = &[
        (b"", 1, "empty"),
        (b"3\nA 1\n", 1, "header"),
        (b"3 x\n", 1, "header"),
        (b"-1 2\n", 1, "header"),
        (b"2 3 4\na 1 2\n", 1, "read_glove"),
        (b"the 0.1 0.2 0.3\n", 1, "read_glove"),
        (b"0 3\n", 1, "0 vectors"),
        (b"1 0\nabc\n", 1, "0 values"),
        (
            b"2 2\na 1 2\nb 1\n",
            3,
            "expected 2 values after word \"b\", found 1",
        ),
        (b"2 2\na 1 2\nb 1 2 3\n", 3, "found 3"),
        (
            b"2 2\na 1 2\n\nb 1 x2\n",
            4,
            "value 2 of word \"b\" is not a number: \"x2\"",
        ),
        (
            b"3 2\na 1 2\nb 1 2\n",
            4,
            "ends after 2 vectors, but its header declares 3",
        ),
        // No newline after the last line: it may have been cut inside a value.
        (b"3 2\na 1 2\nb 1 2", 3, "may have been cut short"),
        (b"2 2\na 1 2\nb\xff 1 2\n", 3, "UTF-8"),
        (b"2 2\na 1 2\nb 1 2\xff\n", 3, "not a number"),
        (b"9 50\na 1\n", 2, "first vector"),
    ];
    for &(text, line, needle) in w2v {
        let path = dir.write("bad.txt", text);
        assert_format(read_w2v_text(&path), line, needle);
    }
    let glove: &[(&[u8], usize, &str)] = &[
        (b"", 1, "no vectors"),
        (b"\n \n\t\n", 1, "no vectors"),
        (b"400000 300\nthe 1 2\n", 1, "word2vec header"),
        (b"\nonly\n", 2, "no values"),
        (
            b"a 1 2\nb 1 2\n\nc 1 2 3\n",
            4,
            "expected 2 values after word \"c\", found 3",
        ),
        (b"a 1 2\nb 1\n", 2, "found 1"),
        (b"a 1 2\nb 1 2,5\n", 2, "not a number: \"2,5\""),
        (b"a 1 2\n\xe6\x9d 1 2\n", 2, "UTF-8"),
    ];
    for &(text, line, needle) in glove {
        let path = dir.write("bad.glove", text);
        assert_format(io::read_glove(&path), line, needle);
    }
}

fn binary_file(records: &[(&[u8], &[f32])], dim: usize, declared: usize) -> Vec<u8> {
    let mut out = format!("{declared} {dim}\n").into_bytes();
    for (word, row) in records {
        out.extend_from_slice(word);
        out.push(b' ');
        out.extend(row.iter().flat_map(|x| x.to_le_bytes()));
    }
    out
}

#[test]
fn malformed_binary_files_name_the_record() {
    let dir = Scratch::new("io-bad-bin");
    let good = binary_file(&[(b"a", &[1., 2.]), (b"b", &[3., 4.])], 2, 2);
    let cases: Vec<(Vec<u8>, usize, &str)> = vec![
        (b"2 2 2\n".to_vec(), 1, "header"),
        // Cut inside the second vector.
        (
            good[..good.len() - 3].to_vec(),
            3,
            "cut short: 5 of 8 bytes",
        ),
        // Cut inside the second word.
        (
            good[..good.len() - 9].to_vec(),
            3,
            "ends inside the word \"b\"",
        ),
        // One vector fewer than declared.
        (
            binary_file(&[(b"a", &[1., 2.])], 2, 2),
            3,
            "ends after 1 vector, but its header declares 2",
        ),
        (
            binary_file(&[(b"a", &[1., 2.]), (b"\xff", &[3., 4.])], 2, 2),
            3,
            "UTF-8",
        ),
        // A record starting with a space has an empty word.
        (
            binary_file(&[(b"a", &[1., 2.]), (b"", &[3., 4.])], 2, 2),
            3,
            "empty word",
        ),
        // Too short for even one vector of the declared size.
        (b"5 1000\nab".to_vec(), 2, "first vector"),
    ];
    for (bytes, line, needle) in cases {
        let path = dir.write("bad.bin", &bytes);
        assert_format(read_w2v_bin(&path), line, needle);
    }
}

#[test]
fn malformed_npy_files_name_the_problem() {
    let dir = Scratch::new("io-bad-npy");
    let good = fs::read(fixture("table.npy")).unwrap(); // 7 × 6, 128-byte header
    let with_header = |dict: &str| {
        let mut h = dict.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out
    };
    let mut v9 = good.clone();
    v9[6] = 9;
    let mut extra = good.clone();
    extra.extend_from_slice(&[0; 4]);
    let cases: Vec<(Vec<u8>, usize, &str)> = vec![
        (b"".to_vec(), 1, "ends inside"),
        (b"PK\x03\x04 this is a zip".to_vec(), 1, "not a .npy file"),
        (v9, 1, "version 9.0"),
        (good[..9].to_vec(), 1, "ends inside the header length"),
        (good[..100].to_vec(), 1, "ends inside the header"),
        // 3 rows and 2 bytes of the 4th: the 4th row (line 5) is cut.
        (good[..128 + 3 * 24 + 2].to_vec(), 5, "cut short"),
        (extra, 9, "4 bytes after the data of the 7 rows"),
        (
            with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (7,), }"),
            1,
            "not 2-D",
        ),
        (
            with_header("{'descr': '<i8', 'fortran_order': False, 'shape': (7, 6), }"),
            1,
            "'<i8'",
        ),
        (
            with_header("{'descr': '<f4', 'shape': (7, 6), }"),
            1,
            "lacks",
        ),
        (
            with_header(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }",
            ),
            1,
            "too large",
        ),
    ];
    for (bytes, line, needle) in cases {
        let path = dir.write("bad.npy", &bytes);
        assert_format(io::load_npy(&path), line, needle);
    }
}

#[test]
fn missing_files_are_io_errors_naming_the_path() {
    let path = std::env::temp_dir().join("embtable-no-such-file.vec");
    for result in [
        read_w2v_text(&path).map(|_| ()),
        read_w2v_bin(&path).map(|_| ()),
        io::read_glove(&path).map(|_| ()),
        io::load_npy(&path).map(|_| ()),
    ] {
        match result {
            Err(Error::Io { context, source }) => {
                assert!(context.starts_with("reading "), "{context}");
                assert!(context.contains("embtable-no-such-file.vec"), "{context}");
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Error::Io, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------- writing

#[test]
fn writers_validate_before_touching_the_target() {
    let dir = Scratch::new("io-write-validate");
    let path = dir.write("keep.txt", "previous contents");
    let table = EmbeddingTable::zeros(2, 3).unwrap();
    let spaced = Vocab::from_words(["ok", "two words"]).unwrap();
    let short = Vocab::from_words(["one"]).unwrap();
    for format in [Word2VecFormat::Text, Word2VecFormat::Binary] {
        let err = io::write_word2vec(&path, &spaced, &table, format).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { field: "vocab", .. }),
            "{err}"
        );
        let err = io::write_word2vec(&path, &short, &table, format).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ShapeMismatch {
                    expected: 2,
                    got: 1,
                    ..
                }
            ),
            "{err}"
        );
    }
    assert!(io::write_glove(&path, &spaced, &table).is_err());
    assert_eq!(fs::read_to_string(&path).unwrap(), "previous contents");
    let names: Vec<_> = fs::read_dir(&dir.0).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file is left behind");
}

#[test]
fn writers_replace_existing_files_and_report_io_errors() {
    let dir = Scratch::new("io-write-replace");
    let path = dir.write("t.npy", "old");
    let table = EmbeddingTable::from_rows(1, 2, &[1.0, 2.0]).unwrap();
    io::save_npy(&path, &table).unwrap();
    assert_eq!(io::load_npy(&path).unwrap(), table);
    let names: Vec<_> = fs::read_dir(&dir.0).unwrap().collect();
    assert_eq!(names.len(), 1);

    let nowhere = dir.path("no/such/dir/t.npy");
    assert!(matches!(
        io::save_npy(&nowhere, &table),
        Err(Error::Io { .. })
    ));
}

// -------------------------------------------------------------- table_for

fn small_pretrained() -> Pretrained {
    Pretrained::new(
        Vocab::from_words(["the", "cat", "sat", "on"]).unwrap(),
        EmbeddingTable::from_rows(4, 2, &[1., 1., 2., 2., 3., 3., 4., 4.]).unwrap(),
    )
    .unwrap()
}

#[test]
fn table_for_a_keras_word_index() {
    let pretrained = small_pretrained();
    // Keras Tokenizer: 1-based, frequency order; 0 is padding.
    let word_index: HashMap<String, usize> = [("the", 1), ("mat", 2), ("cat", 3), ("zzz", 4)]
        .into_iter()
        .map(|(w, i)| (w.to_string(), i))
        .collect();
    let options = TableOptions {
        padding_idx: Some(0),
        ..Default::default()
    };
    let (table, coverage) = pretrained.table_for(&word_index, 6, &options).unwrap();
    assert_eq!(
        table.to_vec(),
        [0., 0., 1., 1., 0., 0., 2., 2., 0., 0., 0., 0.]
    );
    assert_eq!(
        coverage,
        Coverage {
            found: 2,
            missing: 2,
            first_missing: vec![(2, "mat".into()), (4, "zzz".into())],
            unnamed_rows: 1,
        }
    );
    assert_eq!(coverage.ratio(), 0.5);
}

#[test]
fn table_for_initialises_missing_rows_from_the_seed() {
    let pretrained = small_pretrained();
    let init = Init::Uniform {
        low: -0.05,
        high: 0.05,
    };
    let options = TableOptions {
        missing: init,
        seed: 11,
        padding_idx: Some(0),
    };
    // A TextVectorization vocabulary: "" is padding, "[UNK]" the OOV row.
    let vocabulary = ["", "[UNK]", "sat", "dog", "on"];
    let pairs = vocabulary.iter().enumerate().map(|(i, w)| (*w, i));
    let (table, coverage) = pretrained.table_for(pairs, 6, &options).unwrap();
    let reference = EmbeddingTable::new(6, 2, init, 11).unwrap();
    assert_eq!(table.row(0), [0.0, 0.0]);
    assert_eq!(table.row(1), reference.row(1));
    assert_eq!(table.row(2), [3.0, 3.0]);
    assert_eq!(table.row(3), reference.row(3));
    assert_eq!(table.row(4), [4.0, 4.0]);
    assert_eq!(table.row(5), reference.row(5)); // unnamed
    assert_eq!((coverage.found, coverage.missing), (2, 2)); // "" not counted
    assert_eq!(coverage.unnamed_rows, 1);
}

#[test]
fn table_for_keeps_the_lowest_missing_rows() {
    let pretrained = small_pretrained();
    let pairs: Vec<(String, usize)> = (0..100).rev().map(|i| (format!("x{i}"), i)).collect();
    let (_, coverage) = pretrained
        .table_for(pairs, 100, &TableOptions::default())
        .unwrap();
    assert_eq!(coverage.missing, 100);
    let rows: Vec<usize> = coverage.first_missing.iter().map(|(r, _)| *r).collect();
    assert_eq!(rows, (0..Coverage::SHOWN).collect::<Vec<_>>());
    assert_eq!(coverage.first_missing[3].1, "x3");
}

#[test]
fn table_for_rejects_bad_indices() {
    let pretrained = small_pretrained();
    let d = TableOptions::default();
    let err = pretrained.table_for([("cat", 5)], 5, &d).unwrap_err();
    assert!(err.to_string().contains("row 5"), "{err}");
    let err = pretrained.table_for([("dog", 9)], 5, &d).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "word_index",
                ..
            }
        ),
        "{err}"
    );
    let err = pretrained
        .table_for([("cat", 1), ("sat", 1)], 5, &d)
        .unwrap_err();
    assert!(err.to_string().contains("both map to row 1"), "{err}");
    let pad = TableOptions {
        padding_idx: Some(0),
        ..d
    };
    let err = pretrained.table_for([("the", 0)], 5, &pad).unwrap_err();
    assert!(err.to_string().contains("padding row 0"), "{err}");
    let err = pretrained
        .table_for(
            [("the", 1)],
            5,
            &TableOptions {
                padding_idx: Some(5),
                ..d
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "padding_idx",
                ..
            }
        ),
        "{err}"
    );
    assert!(pretrained.table_for([("the", 0)], 0, &d).is_err());
    // A word found and a word missing may share a row: the vector wins.
    let (t, _) = pretrained
        .table_for([("cat", 1), ("dog", 1)], 2, &d)
        .unwrap();
    assert_eq!(t.row(1), [2.0, 2.0]);
}

#[test]
fn pretrained_new_checks_lengths() {
    let err = Pretrained::new(
        Vocab::from_words(["a"]).unwrap(),
        EmbeddingTable::zeros(2, 2).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

// ------------------------------------------------------------------ fuzzing

/// Runs every reader on `bytes`; none may panic.
fn read_all_ways(dir: &Scratch, bytes: &[u8]) -> [bool; 5] {
    let path = dir.write("fuzz", bytes);
    let replace = ReadOptions {
        unicode_errors: UnicodeErrors::Replace,
        limit: None,
        words_with_spaces: true,
    };
    [
        read_w2v_text(&path).is_ok()
            | io::read_word2vec_with(&path, Word2VecFormat::Text, &replace).is_ok(),
        io::read_word2vec_with(&path, Word2VecFormat::Binary, &replace).is_ok(),
        io::read_glove_with(&path, &replace).is_ok(),
        io::load_npy(&path).is_ok(),
        read_w2v_bin(&path).is_ok(),
    ]
}

fn valid_files() -> Vec<(&'static str, Vec<u8>)> {
    [
        "w2v.txt",
        "w2v.bin",
        "w2v_ctool.bin",
        "glove.txt",
        "fasttext.vec",
        "table.npy",
        "table_fortran.npy",
    ]
    .into_iter()
    .map(|n| (n, fs::read(fixture(n)).unwrap()))
    .collect()
}

#[test]
fn every_prefix_of_a_valid_file_is_handled() {
    let dir = Scratch::new("io-prefixes");
    for (name, bytes) in valid_files() {
        for cut in 0..bytes.len() {
            let ok = read_all_ways(&dir, &bytes[..cut]);
            // Sized formats detect every cut.
            if name.ends_with(".npy") {
                assert!(!ok[3], "{name} cut at {cut} was accepted");
            }
            if name == "w2v.bin" {
                assert!(!ok[4], "{name} cut at {cut} was accepted");
            }
            if name == "w2v_ctool.bin" && cut < bytes.len() - 1 {
                assert!(!ok[4], "{name} cut at {cut} was accepted");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let dir = Scratch::new("io-fuzz-random");
        read_all_ways(&dir, &bytes);
        // Also behind plausible headers.
        for head in [&b"3 4\n"[..], b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"] {
            let mut with_head = head.to_vec();
            with_head.extend_from_slice(&bytes);
            read_all_ways(&dir, &with_head);
        }
    }

    #[test]
    fn mutated_valid_files_never_panic(
        file in 0usize..7,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let dir = Scratch::new("io-fuzz-mutate");
        let (_, mut bytes) = valid_files().swap_remove(file);
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        read_all_ways(&dir, &bytes);
    }
}
