//! ERNIE 4.5 MoE.
//!
//! - The Llama decoder with q/k/v/o biases only if `use_bias`, and RoPE on interleaved pairs
//!   `(2i, 2i + 1)` rather than halves: the q and k rows are deinterleaved per head when the
//!   plan is written, which leaves attention unchanged and lets the rotate-half kernel run it.
//! - Mixture-of-experts MLPs in layers `moe_layer_start_index..=moe_layer_end_index` (-1: the
//!   last layer) whose index + 1 is a multiple of `moe_layer_interval`; dense MLPs elsewhere.
//! - Routing: softmax over `moe_num_experts` router logits; the top `moe_k` are picked by
//!   softmax + `moe_statics.e_score_correction_bias` (stored `[1, E]`), but weighted by the
//!   plain softmax, renormalized by `max(sum, moe_norm_min)`.
//! - `moe_num_shared_experts` shared experts, one dense MLP of `moe_intermediate_size` times
//!   their number, added to the routed output (`mlp.shared_experts`).
//!
//! Reference: HF transformers `models/ernie4_5_moe/modeling_ernie4_5_moe.py` (and
//! `models/ernie4_5/modeling_ernie4_5.py` for the rotary embedding).

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
        rope_interleaved: true,
    };
    let names = MoeNames {
        block: "mlp",
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
        bias: Some("moe_statics.e_score_correction_bias"),
        shared: Some("shared_experts"),
    };
    build_moe_decoder(name, config, tensors, variant, names)
}
