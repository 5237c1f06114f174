//! DeepSeek-V3.
//!
//! - Multi-head latent attention: q through a low-rank bottleneck (`q_a_proj`, RMSNorm
//!   `q_a_layernorm`, `q_b_proj`; a plain `q_proj` when `q_lora_rank` is null); one latent of
//!   `kv_lora_rank` per token plus a shared rope key of `qk_rope_head_dim` from
//!   `kv_a_proj_with_mqa`, the latent RMSNormed (`kv_a_layernorm`) and up-projected per head by
//!   `kv_b_proj` into `qk_nope_head_dim` key and `v_head_dim` value dims. RoPE (interleaved pairs
//!   when `rope_interleave`) touches only the rope parts; the softmax scale is
//!   `(qk_nope_head_dim + qk_rope_head_dim)^-1/2`. The KV cache keeps only the latent and the
//!   rotated rope key, and attention runs on them with `kv_b_proj` absorbed.
//! - Dense MLPs in the first `first_k_dense_replace` layers, mixture-of-experts MLPs after.
//! - Routing: a sigmoid per expert; selection by score + `gate.e_score_correction_bias`, limited
//!   to the best `topk_group` of `n_group` expert groups (a group ranked by its two best); the
//!   picked experts weighted by their plain scores, renormalized if `norm_topk_prob`, times
//!   `routed_scaling_factor`.
//! - `n_shared_experts` shared experts as one dense MLP (`mlp.shared_experts`) added to the
//!   routed output.
//! - The multi-token-prediction layers (`num_nextn_predict_layers`) are not part of the model's
//!   forward pass and are not read.
//!
//! Reference: HF transformers `models/deepseek_v3/modeling_deepseek_v3.py`.

use super::decoder::{build_moe_decoder, DecoderVariant, MoeNames};
use crate::{ModelConfig, ModelError, TensorSource};
use ir::Graph;

pub fn build(
    name: &str,
    config: &ModelConfig,
    tensors: &dyn TensorSource,
) -> Result<Graph, ModelError> {
    // The attention is MLA (`config.mla`); these apply to the standard attention only.
    let variant = DecoderVariant {
        qkv_bias: false,
        qk_norm: false,
        rope_interleaved: false,
    };
    let names = MoeNames {
        block: "mlp",
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
        bias: Some("gate.e_score_correction_bias"),
        shared: Some("shared_experts"),
    };
    build_moe_decoder(name, config, tensors, variant, names)
}
