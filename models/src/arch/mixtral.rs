//! Mixtral.
//!
//! - The Llama decoder (Mistral's, without a sliding window here) with a mixture-of-experts MLP
//!   in every layer: `block_sparse_moe`.
//! - Routing: softmax over `num_local_experts` router logits, top `num_experts_per_tok`, weights
//!   always renormalized to sum to 1. No shared experts, no router bias.
//! - Expert tensors are named `w1` (gate), `w3` (up) and `w2` (down).
//!
//! Reference: HF transformers `models/mixtral/modeling_mixtral.py`.

use super::decoder::{build_moe_decoder, DecoderVariant, MoeNames};
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
    let names = MoeNames {
        block: "block_sparse_moe",
        gate: "w1",
        up: "w3",
        down: "w2",
        bias: None,
        shared: None,
    };
    build_moe_decoder(name, config, tensors, variant, names)
}
