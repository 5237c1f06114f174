//! Qwen2 and Qwen2.5.
//!
//! - The Llama decoder plus biases on the q, k and v projections (none on o).
//! - Embeddings usually tied to the LM head for the small sizes.
//!
//! Reference: HF transformers `models/qwen2/modeling_qwen2.py`.

use super::decoder::{build_decoder, DecoderVariant};
use crate::{ModelConfig, ModelError, TensorSource};
use ir::Graph;

pub fn build(
    name: &str,
    config: &ModelConfig,
    tensors: &dyn TensorSource,
) -> Result<Graph, ModelError> {
    build_decoder(
        name,
        config,
        tensors,
        DecoderVariant {
            qkv_bias: true,
            qk_norm: false,
            rope_interleaved: false,
        },
    )
}
