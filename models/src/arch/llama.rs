//! Llama family: Llama 2 and 3, SmolLM, TinyLlama.
//!
//! - Pre-norm decoder, RMSNorm, SwiGLU MLP, no biases.
//! - Grouped-query attention (`num_key_value_heads <= num_attention_heads`).
//! - RoPE in rotate-half layout; Llama 3's `llama3` frequency scaling comes from the config.
//! - Embeddings tied to the LM head or not, per config.
//!
//! Reference: HF transformers `models/llama/modeling_llama.py`.

use super::decoder::{build_decoder, DecoderVariant};
use crate::{ModelConfig, ModelError, TensorSource};
use ir::Graph;

pub fn build(
    name: &str,
    config: &ModelConfig,
    tensors: &dyn TensorSource,
) -> Result<Graph, ModelError> {
    let variant = DecoderVariant {
        qkv_bias: config.attention_bias,
        qk_norm: false,
        rope_interleaved: false,
    };
    build_decoder(name, config, tensors, variant)
}
