//! The crate's one error type: what a kernel reports instead of reading or writing out of bounds.

/// Why a kernel refused its arguments. Kernels check every length and index before touching
/// memory, so a bad plan ends in one of these rather than a crash or a silent wrong answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A buffer is too short for the rows, columns and stride it was given, or two sizes disagree.
    #[error("{kernel}: {what}")]
    Shape { kernel: &'static str, what: String },
    /// A row index (token id, gathered row) is past the end of its table.
    #[error("{kernel}: index {index} is out of range for {rows} rows")]
    IndexOutOfRange {
        kernel: &'static str,
        index: u32,
        rows: usize,
    },
    /// Attention was asked to write a position the KV cache has no room for, or positions that
    /// are not consecutive.
    #[error("attention: {what}")]
    Positions { what: String },
}

impl KernelError {
    pub(crate) fn shape(kernel: &'static str, what: impl Into<String>) -> KernelError {
        KernelError::Shape {
            kernel,
            what: what.into(),
        }
    }
}
