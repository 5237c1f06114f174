//! `PlanError`, the one error type of the crate: everything that can go wrong writing, opening,
//! verifying or decoding a `.fdp` plan.
//!
//! Each message is one line that says what is wrong and what to do about it (which section, which
//! format version, re-copy or recompile), because these errors reach users of `fdc` and `fdrt`
//! verbatim.

use std::path::PathBuf;

/// Why a plan could not be written, opened, verified or decoded.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The operating system refused a read, write, map or rename.
    #[error("cannot access plan file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the plan magic.
    #[error("{} is not an fdc plan (bad magic); expected a .fdp file written by fdc compile", path.display())]
    NotAPlan { path: PathBuf },

    /// The plan was written by a newer `fdc` than this reader understands.
    #[error("plan format version {found} is newer than this fdrt supports ({supported}): upgrade fdrt, or recompile the model with a matching fdc")]
    NewerVersion { found: u32, supported: u32 },

    /// The plan was written by an older `fdc` than this reader understands.
    #[error("plan format version {found} is older than the oldest this fdrt reads ({supported}): recompile the model with a matching fdc")]
    OlderVersion { found: u32, supported: u32 },

    /// The file is shorter than its header (or the header's recorded length) says it must be.
    #[error(
        "plan is truncated: expected {expected} bytes, file has {actual}; re-copy or recompile it"
    )]
    Truncated { expected: u64, actual: u64 },

    /// The header's own checksum failed, or a checksummed field holds an impossible value.
    #[error("plan header is corrupt ({reason}); re-copy or recompile the plan")]
    HeaderCorrupt { reason: String },

    /// The section table's checksum failed, or the table does not parse.
    #[error("plan section table is corrupt ({reason}); re-copy or recompile the plan")]
    TableCorrupt { reason: String },

    /// A section table entry points outside the data area of the file.
    #[error("section '{name}' (offset {offset}, {len} bytes) lies outside the plan's data area; the plan file is corrupt; re-copy or recompile it")]
    SectionOutOfBounds { name: String, offset: u64, len: u64 },

    /// A section's bytes do not hash to the checksum recorded in the table.
    #[error("section '{section}' failed its checksum: the plan file is corrupt; re-copy or recompile it")]
    ChecksumMismatch { section: String },

    /// Alignment padding between regions holds non-zero bytes.
    #[error("plan has a non-zero padding byte at offset {offset}: the plan file is corrupt; re-copy or recompile it")]
    CorruptPadding { offset: u64 },

    /// A section that the caller requires is not in the plan.
    #[error("plan has no section '{name}': recompile the model with a matching fdc")]
    MissingSection { name: String },

    /// Two sections share a name (writing), or the table lists a name twice (reading).
    #[error("section '{name}' appears twice: section names in a plan must be unique")]
    DuplicateSection { name: String },

    /// A section name cannot be stored (empty, too long, or contains control characters).
    #[error("section name {name:?} is invalid ({reason}): use 1 to 1024 bytes of printable UTF-8")]
    InvalidSectionName { name: String, reason: &'static str },

    /// A value could not be serialized for a codec section.
    #[error("value could not be encoded for the plan ({message}): fix the value or its serde attributes")]
    Encode { message: String },

    /// A codec section's bytes do not decode as the expected type.
    #[error("section '{section}' could not be decoded ({message}): recompile the plan with a matching fdc")]
    Decode { section: String, message: String },

    /// Bytes cannot be viewed as a slice of numbers in place.
    #[error("cannot view plan bytes in place: {what}")]
    Misaligned { what: String },
}

impl PlanError {
    /// An `Io` error about `path`: saves spelling out the struct at every `map_err`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PlanError {
        let path = path.into();
        move |source| PlanError::Io { path, source }
    }
}
