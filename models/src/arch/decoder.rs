//! The pre-norm decoder stack the Llama-like families share, emitted in its plain (unfused) form:
//! the compiler's passes do the fusing.
//!
//! Shapes: `T` tokens, `R` logit rows, `C` hidden size, `H`/`KV` heads, `D` head dim, `I`
//! intermediate size, `V` vocabulary.
//!
//! ```text
//! x = embedding(embed_tokens, token_ids)                      [T, C]
//! per layer:  h = rms_norm(x);  q, k, v = h @ Wq, Wk, Wv (+ b)
//!             (qk_norm) q, k = rms_norm per head
//!             q, k = rope(q), rope(k);  a = attention(q, k, v)
//!             x = x + a @ Wo
//!             h = rms_norm(x);  x = x + (silu(h @ Wg) * (h @ Wu)) @ Wd
//! logits = rms_norm(gather_rows(x)) @ lm_head                  [R, V]
//! ```
//! Rows are gathered before the final norm: the norm is per row, so only the rows whose logits
//! are wanted need it.

use crate::{ModelConfig, ModelError, TensorSource};
use ir::{DType, Dim, Graph, GraphError, InputKind, Op, TensorType, ValueId, WeightExpr};

/// What distinguishes one family's decoder from another's.
#[derive(Clone, Copy, Debug)]
pub struct DecoderVariant {
    pub qkv_bias: bool,
    pub qk_norm: bool,
}

struct Builder<'a> {
    graph: Graph,
    tensors: &'a dyn TensorSource,
}

impl Builder<'_> {
    /// Declares checkpoint tensor `name` as a weight, checking its shape.
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<ValueId, ModelError> {
        let info = self
            .tensors
            .info(name)
            .ok_or_else(|| ModelError::TensorNotFound {
                name: name.to_string(),
            })?;
        if info.shape != shape {
            return Err(ModelError::ShapeMismatch {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Const(d)).collect();
        Ok(self.graph.add_weight(
            name,
            TensorType::new(DType::F32, &dims),
            WeightExpr::Tensor(name.to_string()),
        ))
    }

    fn node(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, ModelError> {
        self.graph.add_node1(op, inputs).map_err(graph_bug)
    }

    fn linear(
        &mut self,
        x: ValueId,
        prefix: &str,
        n: usize,
        k: usize,
        bias: bool,
    ) -> Result<ValueId, ModelError> {
        let w = self.weight(&format!("{prefix}.weight"), &[n, k])?;
        if bias {
            let b = self.weight(&format!("{prefix}.bias"), &[n])?;
            self.node(Op::MatMul, &[x, w, b])
        } else {
            self.node(Op::MatMul, &[x, w])
        }
    }
}

/// A builder that produces an ill-typed graph has a bug; say so instead of blaming the checkpoint.
fn graph_bug(e: GraphError) -> ModelError {
    ModelError::GraphBuild {
        message: e.to_string(),
    }
}

pub fn build_decoder(
    name: &str,
    cfg: &ModelConfig,
    tensors: &dyn TensorSource,
    variant: DecoderVariant,
) -> Result<Graph, ModelError> {
    let (c, d, h, kv, i, v) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let eps = cfg.rms_norm_eps as f32;
    let mut b = Builder {
        graph: Graph::new(name),
        tensors,
    };
    let ids = b.graph.add_input(
        InputKind::TokenIds,
        TensorType::new(DType::I32, &[Dim::Tokens]),
    );
    let positions = b.graph.add_input(
        InputKind::Positions,
        TensorType::new(DType::I32, &[Dim::Tokens]),
    );
    let rows = b.graph.add_input(
        InputKind::LogitRows,
        TensorType::new(DType::I32, &[Dim::LogitRows]),
    );
    b.graph.add_constant("rope_inv_freq", cfg.rope.inv_freq(d));

    let embed = b.weight("model.embed_tokens.weight", &[v, c])?;
    let mut x = b.node(Op::Embedding, &[embed, ids])?;
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        let w = b.weight(&format!("{p}.input_layernorm.weight"), &[c])?;
        let hn = b.node(Op::RmsNorm { eps, group: c }, &[x, w])?;
        let mut q = b.linear(
            hn,
            &format!("{p}.self_attn.q_proj"),
            h * d,
            c,
            variant.qkv_bias,
        )?;
        let mut k = b.linear(
            hn,
            &format!("{p}.self_attn.k_proj"),
            kv * d,
            c,
            variant.qkv_bias,
        )?;
        let val = b.linear(
            hn,
            &format!("{p}.self_attn.v_proj"),
            kv * d,
            c,
            variant.qkv_bias,
        )?;
        if variant.qk_norm {
            let qn = b.weight(&format!("{p}.self_attn.q_norm.weight"), &[d])?;
            let kn = b.weight(&format!("{p}.self_attn.k_norm.weight"), &[d])?;
            q = b.node(Op::RmsNorm { eps, group: d }, &[q, qn])?;
            k = b.node(Op::RmsNorm { eps, group: d }, &[k, kn])?;
        }
        let q = b.node(
            Op::Rope {
                n_heads: h,
                head_dim: d,
            },
            &[q, positions],
        )?;
        let k = b.node(
            Op::Rope {
                n_heads: kv,
                head_dim: d,
            },
            &[k, positions],
        )?;
        let scale = 1.0 / (d as f32).sqrt();
        let attn = Op::Attention {
            layer,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: d,
            scale,
        };
        let a = b.node(attn, &[q, k, val, positions])?;
        let o = b.linear(a, &format!("{p}.self_attn.o_proj"), c, h * d, false)?;
        x = b.node(Op::Add, &[x, o])?;

        let w = b.weight(&format!("{p}.post_attention_layernorm.weight"), &[c])?;
        let hn = b.node(Op::RmsNorm { eps, group: c }, &[x, w])?;
        let gate = b.linear(hn, &format!("{p}.mlp.gate_proj"), i, c, false)?;
        let up = b.linear(hn, &format!("{p}.mlp.up_proj"), i, c, false)?;
        let act = b.node(Op::Silu, &[gate])?;
        let m = b.node(Op::Mul, &[act, up])?;
        let down = b.linear(m, &format!("{p}.mlp.down_proj"), c, i, false)?;
        x = b.node(Op::Add, &[x, down])?;
    }
    let picked = b.node(Op::GatherRows, &[x, rows])?;
    let w = b.weight("model.norm.weight", &[c])?;
    let normed = b.node(Op::RmsNorm { eps, group: c }, &[picked, w])?;
    let head = if cfg.tie_word_embeddings {
        embed
    } else {
        b.weight("lm_head.weight", &[v, c])?
    };
    let logits = b.node(Op::MatMul, &[normed, head])?;
    b.graph.set_output("logits", logits);
    Ok(b.graph)
}
