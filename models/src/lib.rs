//! `models` turns what users have (an HF checkpoint directory or a GGUF file) into an `ir` graph:
//! config parsing, lazy (mmap) checkpoint readers, tokenizer and chat-template extraction, and one
//! graph builder per architecture family.
//!
//! It knows nothing of kernels, targets, plans or the runtime: an architecture is a description of
//! a graph, not a choice of kernels. Tests sit beside each reader; end-to-end checks are in `tests/`.

pub mod arch;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod gguf;
pub mod safetensors_dir;
pub mod synth;
pub mod testing;
pub mod tokenizer;

pub use checkpoint::{
    open, Checkpoint, QuantBlocks, SourceFile, StoredType, TensorInfo, TensorSource,
};
pub use config::{
    Architecture, MlaConfig, ModelConfig, MoeConfig, MtpConfig, RopeConfig, RopeScaling, Yarn,
};
pub use error::ModelError;
pub use tokenizer::TokenizerSpec;
