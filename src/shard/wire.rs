//! Errors as bytes, so that the rank where a collective call failed can
//! send its error to every rank ([`super::agree`]).
//!
//! Plain bytes, without MPI, so that the round trip is tested in every
//! build; only the sharded table (feature `mpi`) sends them.
#![cfg_attr(not(feature = "mpi"), allow(dead_code))]

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::Error;

/// Bytes of `err`: a tag, then its fields (integers little-endian, strings
/// length-prefixed). Only for [`decode`] on another rank of the same build.
pub(crate) fn encode(err: &Error) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    match err {
        Error::IndexOutOfRange {
            position,
            index,
            rows,
        } => {
            w.u8(0);
            w.usize(*position);
            w.bytes(&index.to_le_bytes());
            w.usize(*rows);
        }
        Error::ShapeMismatch {
            what,
            expected,
            got,
        } => {
            w.u8(1);
            w.str(what);
            w.usize(*expected);
            w.usize(*got);
        }
        Error::NonFinite {
            what,
            position,
            value,
        } => {
            w.u8(2);
            w.str(what);
            w.usize(*position);
            w.bytes(&value.to_bits().to_le_bytes());
        }
        Error::InvalidConfig { field, reason } => {
            w.u8(3);
            w.str(field);
            w.str(reason);
        }
        Error::InvalidOffsets {
            position,
            value,
            reason,
        } => {
            w.u8(4);
            w.usize(*position);
            w.usize(*value);
            w.str(reason);
        }
        Error::Alloc { what, bytes } => {
            w.u8(5);
            w.str(what);
            w.usize(*bytes);
        }
        Error::Io { context, source } => {
            w.u8(6);
            w.str(context);
            w.str(&source.to_string());
        }
        Error::Format { line, reason } => {
            w.u8(7);
            w.usize(*line);
            w.str(reason);
        }
        Error::Rank { rank, source } => {
            w.u8(8);
            w.usize(*rank);
            w.bytes(&encode(source));
        }
    }
    w.0
}

/// The error [`encode`] wrote. An I/O error comes back with its message
/// and kind `Other`.
///
/// # Panics
/// If `bytes` were not written by [`encode`] (a bug, never input).
pub(crate) fn decode(bytes: &[u8]) -> Error {
    let mut r = Reader(bytes);
    match r.u8() {
        0 => Error::IndexOutOfRange {
            position: r.usize(),
            index: i128::from_le_bytes(r.take(16).try_into().expect("16 bytes")),
            rows: r.usize(),
        },
        1 => Error::ShapeMismatch {
            what: intern(r.str()),
            expected: r.usize(),
            got: r.usize(),
        },
        2 => Error::NonFinite {
            what: intern(r.str()),
            position: r.usize(),
            value: f32::from_bits(u32::from_le_bytes(r.take(4).try_into().expect("4 bytes"))),
        },
        3 => Error::InvalidConfig {
            field: intern(r.str()),
            reason: r.str().to_owned(),
        },
        4 => Error::InvalidOffsets {
            position: r.usize(),
            value: r.usize(),
            reason: intern(r.str()),
        },
        5 => Error::Alloc {
            what: intern(r.str()),
            bytes: r.usize(),
        },
        6 => Error::Io {
            context: r.str().to_owned(),
            source: std::io::Error::other(r.str().to_owned()),
        },
        7 => Error::Format {
            line: r.usize(),
            reason: r.str().to_owned(),
        },
        8 => Error::Rank {
            rank: r.usize(),
            source: Box::new(decode(r.0)),
        },
        tag => panic!("error tag {tag} was not written by encode"),
    }
}

/// The `&'static str` fields of [`Error`] (which name a buffer or a
/// config field) are a small fixed set of literals in the crate: an error
/// from another rank gets a copy of its text, leaked once per distinct
/// text, never once per error.
fn intern(s: &str) -> &'static str {
    static TEXTS: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut texts = TEXTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&known) = texts.get(s) {
        return known;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    texts.insert(leaked);
    leaked
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    fn usize(&mut self, x: usize) {
        self.0.extend_from_slice(&(x as u64).to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.usize(s.len());
        self.bytes(s.as_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn usize(&mut self) -> usize {
        u64::from_le_bytes(self.take(8).try_into().expect("8 bytes")) as usize
    }
    fn str(&mut self) -> &'a str {
        let n = self.usize();
        std::str::from_utf8(self.take(n)).expect("encode wrote UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_round_trips_with_the_same_message() {
        let errors = [
            Error::IndexOutOfRange {
                position: 3,
                index: -7,
                rows: 10,
            },
            Error::ShapeMismatch {
                what: "gradient length (ids * dim)",
                expected: 8,
                got: 6,
            },
            Error::NonFinite {
                what: "gradient",
                position: 5,
                value: f32::NAN,
            },
            Error::InvalidConfig {
                field: "lr",
                reason: "-1 is negative".into(),
            },
            Error::InvalidOffsets {
                position: 1,
                value: 9,
                reason: "offsets must not decrease",
            },
            Error::Alloc {
                what: "table",
                bytes: usize::MAX,
            },
            Error::Io {
                context: "writing x".into(),
                source: std::io::Error::other("disk full"),
            },
            Error::Format {
                line: 0,
                reason: "bad".into(),
            },
            Error::Rank {
                rank: 2,
                source: Box::new(Error::Format {
                    line: 1,
                    reason: "inner".into(),
                }),
            },
        ];
        for err in &errors {
            let back = decode(&encode(err));
            assert_eq!(back.to_string(), err.to_string());
            assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(err));
        }
        assert!(std::ptr::eq(intern("gradient"), intern("gradient")));
    }
}
