//! Qwen3 (dense).
//!
//! - The Llama decoder plus a per-head RMSNorm on q and k (`q_norm`, `k_norm`, weight `[D]`),
//!   applied before RoPE.
//! - An explicit `head_dim` that need not equal `hidden_size / num_attention_heads`.
//! - No q/k/v biases unless `attention_bias` says so.
//!
//! Reference: HF transformers `models/qwen3/modeling_qwen3.py`.

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
        qk_norm: true,
        rope_interleaved: false,
    };
    build_decoder(name, config, tensors, variant)
}
