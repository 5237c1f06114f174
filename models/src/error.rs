//! The crate's one error type, `ModelError`: everything that can go wrong while reading a
//! checkpoint (a missing or corrupt file, an unsupported architecture, dtype, quantization or
//! tokenizer). Each variant carries the file, tensor or key it is about, so a message alone is
//! enough to find the problem.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no such file or directory: {}", .path.display())]
    NotFound { path: PathBuf },

    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "cannot tell the checkpoint format of {}: expected an HF checkpoint directory or a file ending in .gguf",
        .path.display()
    )]
    UnknownFormat { path: PathBuf },

    #[error("{} has no {file}", .dir.display())]
    MissingFile { dir: PathBuf, file: String },

    #[error("{} has no weights: expected model.safetensors or model.safetensors.index.json{hint}", .dir.display())]
    MissingWeights { dir: PathBuf, hint: String },

    #[error("invalid JSON in {}: {source}", .file.display())]
    Json {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid config in {}: {field}: {reason}", .file.display())]
    InvalidConfig {
        file: PathBuf,
        field: String,
        reason: String,
    },

    #[error("unsupported architecture {found}; supported: {supported}")]
    UnsupportedArchitecture { found: String, supported: String },

    #[error("unsupported rope type {rope_type} in {}; supported: default, linear, llama3, yarn", .file.display())]
    UnsupportedRope { file: PathBuf, rope_type: String },

    #[error("invalid safetensors file {}: {reason}", .file.display())]
    InvalidSafetensors { file: PathBuf, reason: String },

    #[error("invalid shard index {}: {reason}", .file.display())]
    InvalidIndex { file: PathBuf, reason: String },

    #[error("tensor {tensor} in {} has dtype {dtype}; supported: F32, F16, BF16", .file.display())]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("no tensor named {name}")]
    TensorNotFound { name: String },

    #[error("{} is not a GGUF file: it starts with {found}, expected GGUF", .file.display())]
    BadMagic { file: PathBuf, found: String },

    #[error("{} has GGUF version {version}; supported: 2, 3", .file.display())]
    UnsupportedGgufVersion { file: PathBuf, version: u32 },

    #[error("truncated file {}: {what} needs {needed} bytes but the file has {len}", .file.display())]
    Truncated {
        file: PathBuf,
        what: String,
        needed: u64,
        len: u64,
    },

    #[error("corrupt GGUF file {} at byte {offset}: {reason}", .file.display())]
    CorruptGguf {
        file: PathBuf,
        offset: u64,
        reason: String,
    },

    #[error("GGUF file {} lacks metadata key {key}", .file.display())]
    MissingMetadata { file: PathBuf, key: String },

    #[error("GGUF metadata key {key} in {} is {found}, expected {expected}", .file.display())]
    MetadataType {
        file: PathBuf,
        key: String,
        found: String,
        expected: String,
    },

    #[error(
        "tensor {tensor} has unsupported ggml type {ggml_type}; supported: f32, f16, bf16, q8_0, q4_0, q4_1, q4_K, q6_K"
    )]
    UnsupportedTensorType { tensor: String, ggml_type: String },

    #[error("{bytes} bytes of {stored} blocks cannot hold exactly {elements} elements")]
    DequantLength {
        stored: crate::checkpoint::StoredType,
        bytes: usize,
        elements: usize,
    },

    #[error("unsupported tokenizer model {model}; supported: gpt2 (byte-level BPE)")]
    UnsupportedTokenizer { model: String },

    #[error(
        "unsupported pre-tokenizer {pre} for a byte-level BPE tokenizer; supported: {supported}"
    )]
    UnsupportedPreTokenizer { pre: String, supported: String },

    #[error("invalid tokenizer in {}: {reason}", .file.display())]
    InvalidTokenizer { file: PathBuf, reason: String },

    #[error("{checkpoint} has no usable tokenizer: {reason}")]
    TokenizerUnavailable { checkpoint: String, reason: String },

    #[error("tensor {tensor} has shape {found:?} but the config implies {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("building the graph failed (a bug in the builder, not in the checkpoint): {message}")]
    GraphBuild { message: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::NotFound { path }
        } else {
            ModelError::Io { path, source }
        }
    }
}
