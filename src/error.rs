//! The one error type of the crate.

/// Everything that can go wrong in embtable.
///
/// Every variant carries what a caller needs to fix the call: the position in
/// the batch, the offending value, the expected shape. An operation that
/// returns `Err` has written nothing: tables, gradients, optimizer state and
/// output buffers are exactly as they were before the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An id at `position` of a batch is negative or not below the row count.
    #[error(
        "id {index} at position {position} is out of range for a table of {}",
        count(*.rows, "row")
    )]
    IndexOutOfRange {
        /// Position of the id in the batch.
        position: usize,
        /// The id itself, widened so that any `Index` type fits.
        index: i128,
        /// Number of rows of the table.
        rows: usize,
    },
    /// A buffer or argument has the wrong length or shape.
    #[error("{what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which buffer or dimension.
        what: &'static str,
        /// The length or size that was required.
        expected: usize,
        /// The length or size that was given.
        got: usize,
    },
    /// A NaN or infinite value where finite numbers are required.
    #[error("{what} at position {position} is not finite ({value})")]
    NonFinite {
        /// Which input held the value.
        what: &'static str,
        /// Flat position of the value in that input.
        position: usize,
        /// The value itself.
        value: f32,
    },
    /// A configuration field holds a value the operation cannot work with.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// The field, as named in the config struct.
        field: &'static str,
        /// Why the value is rejected, naming the value.
        reason: String,
    },
    /// Bag offsets are not a valid CSR offsets array.
    #[error("offset {value} at position {position} is invalid: {reason}")]
    InvalidOffsets {
        /// Position in the offsets array.
        position: usize,
        /// The offending offset.
        value: usize,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// The allocator could not provide memory for a table or state buffer.
    #[error("cannot allocate {bytes} bytes for {what}")]
    Alloc {
        /// What was being allocated.
        what: &'static str,
        /// Requested size in bytes (`usize::MAX` when the size itself overflows).
        bytes: usize,
    },
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file's content does not follow its format.
    #[error("line {line}: {reason}")]
    Format {
        /// 1-based line (text formats) or record number (binary formats).
        line: usize,
        /// What is wrong, naming the offending token.
        reason: String,
    },
    /// An operation of a sharded table ([`crate::shard`]) failed on rank
    /// `rank`: every rank of the communicator returns this same error.
    #[error("on rank {rank}: {source}")]
    Rank {
        /// The first rank (the lowest) on which the operation failed.
        rank: usize,
        /// What failed there, with its position and value.
        source: Box<Error>,
    },
}

/// `n` and `noun`, plural unless `n` is 1: "1 row", "3 rows". Every
/// message that counts something says it through here.
pub(crate) fn count(n: impl std::fmt::Display, noun: &str) -> String {
    let n = n.to_string();
    if n == "1" {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `Result` with embtable's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `a * b`, the length of a buffer about to be allocated, or
    /// `Err(Alloc)` naming `what` if the product overflows.
    pub(crate) fn checked_product(a: usize, b: usize, what: &'static str) -> Result<usize> {
        a.checked_mul(b).ok_or(Error::Alloc {
            what,
            bytes: usize::MAX,
        })
    }

    /// `Err(ShapeMismatch)` unless a length is the expected one.
    pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
        if got == expected {
            Ok(())
        } else {
            Err(Error::ShapeMismatch {
                what,
                expected,
                got,
            })
        }
    }
}
