//! Text vector files cut short: a cut inside the last number used to load
//! silently with a shorter number (`0.123` read as `0.12`).

use embtable::io::{self, Word2VecFormat};
use embtable::{EmbeddingTable, Error, Init, Vocab};

mod common;
use common::Scratch;

#[test]
fn a_text_file_cut_inside_its_last_number_is_an_error() {
    let dir = Scratch::new("cut");
    let vocab = Vocab::from_words(["a", "b", "c"]).unwrap();
    let table = EmbeddingTable::new(3, 4, Init::default(), 9).unwrap();
    let path = dir.path("full.txt");
    io::write_word2vec(&path, &vocab, &table, Word2VecFormat::Text).unwrap();
    let full = std::fs::read(&path).unwrap();
    let body_start = full.iter().position(|&b| b == b'\n').unwrap() + 1;
    type Reader = fn(&std::path::Path) -> embtable::Result<io::Pretrained>;
    let readers: [(&str, usize, Reader); 3] = [
        ("word2vec", 0, |p| {
            io::read_word2vec(p, Word2VecFormat::Text)
        }),
        ("fasttext", 0, |p| io::read_fasttext_vec(p)),
        ("glove", body_start, |p| io::read_glove(p)),
    ];
    for (name, skip, read) in readers {
        let file = &full[skip..];
        let last_line = file[..file.len() - 1]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        // Whole: reads back. Cut by one to four bytes (the newline, then
        // digits of the last value): refused, naming the last line.
        assert_eq!(read(&dir.write(name, file)).unwrap().table, table);
        for cut in 1..=4 {
            let path = dir.write(name, &file[..file.len() - cut]);
            let err = read(&path).unwrap_err();
            assert!(
                matches!(err, Error::Format { line, .. } if line == last_line),
                "{name} cut by {cut}: {err}"
            );
            assert!(err.to_string().contains("cut short"), "{err}");
        }
        // A complete file whose last line lacks only its newline is refused
        // too (nothing tells it from a cut one), with the way out.
        let err = read(&dir.write(name, &file[..file.len() - 1])).unwrap_err();
        assert!(err.to_string().contains("end it with a newline"), "{err}");
    }
}

#[test]
fn a_last_line_of_blanks_without_a_newline_is_fine() {
    let dir = Scratch::new("blank-end");
    let path = dir.write("g.txt", "a 1 2\nb 3 4\n  \t");
    assert_eq!(
        io::read_glove(&path).unwrap().table.to_vec(),
        [1., 2., 3., 4.]
    );
    let path = dir.write("w.txt", "2 2\na 1 2\r\nb 3 4\r\n");
    let p = io::read_word2vec(&path, Word2VecFormat::Text).unwrap();
    assert_eq!(p.table.to_vec(), [1., 2., 3., 4.]);
}
