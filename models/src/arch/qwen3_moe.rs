//! Qwen3-MoE.
//!
//! - The Qwen3 decoder (per-head q/k RMSNorm before RoPE, explicit `head_dim`) with
//!   mixture-of-experts MLPs in the sparse layers: every layer whose index is not in
//!   `mlp_only_layers` and is a multiple of `decoder_sparse_step` (counting from 1).
//! - Routing: softmax over `num_experts` router logits, top `num_experts_per_tok`, weights
//!   renormalized to sum to 1 only if `norm_topk_prob`. No shared experts, no router bias.
//! - Tensors: `mlp.gate` (the router), `mlp.experts.{e}.{gate,up,down}_proj`.
//!
//! Reference: HF transformers `models/qwen3_moe/modeling_qwen3_moe.py`.

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
        qk_norm: true,
        rope_interleaved: false,
    };
    let names = MoeNames {
        block: "mlp",
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
        bias: None,
        shared: None,
    };
    build_moe_decoder(name, config, tensors, variant, names)
}
