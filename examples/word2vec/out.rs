//! Standard output that survives its reader going away.
//!
//! `word2vec … | head -3` closes the pipe after three lines; `println!`
//! would then panic. [`Out`] instead stops printing and lets the run finish
//! (the vectors are still written). Any other write error is returned.

use std::fmt;
use std::io::{self, Write};

/// A line writer that goes quiet once the reader has closed the pipe.
pub struct Out<W: Write> {
    writer: W,
    closed: bool,
}

impl Out<io::Stdout> {
    /// Standard output.
    pub fn stdout() -> Self {
        Out::new(io::stdout())
    }
}

impl<W: Write> Out<W> {
    /// Lines to `writer`.
    pub fn new(writer: W) -> Self {
        Out {
            writer,
            closed: false,
        }
    }

    /// The writer (tests read what was written).
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.writer
    }

    /// Writes `args` and a newline, and flushes (progress bars write to
    /// the terminal in between).
    ///
    /// # Errors
    /// Write errors other than a closed pipe.
    pub fn line(&mut self, args: fmt::Arguments<'_>) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let result = self
            .writer
            .write_fmt(format_args!("{args}\n"))
            .and_then(|()| self.writer.flush());
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other,
        }
    }
}

/// `say!(out, "format", args…)`: a line to an [`Out`], `?` on the result.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        $out.line(format_args!($($arg)*))?
    };
}
pub(crate) use say;

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `room` bytes, then fails every write with `kind`.
    struct Pipe {
        got: Vec<u8>,
        room: usize,
        kind: io::ErrorKind,
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.got.len() + buf.len() > self.room {
                return Err(io::Error::from(self.kind));
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_silences_the_rest_and_other_errors_surface() {
        let pipe = Pipe {
            got: Vec::new(),
            room: 8,
            kind: io::ErrorKind::BrokenPipe,
        };
        let mut out = Out::new(pipe);
        out.line(format_args!("one {}", 1)).unwrap();
        out.line(format_args!("two {}", 2)).unwrap();
        out.line(format_args!("three")).unwrap();
        assert!(out.closed);
        assert_eq!(out.writer.got, b"one 1\n");

        let full = Pipe {
            got: Vec::new(),
            room: 0,
            kind: io::ErrorKind::StorageFull,
        };
        let mut out = Out::new(full);
        let err = out.line(format_args!("x")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    }
}
