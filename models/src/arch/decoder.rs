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
//!
//! In the sparse layers of a mixture-of-experts family the MLP is one `moe` op over the layer's
//! router and its experts' weights stacked (`[E, 2I, C]` gate-up, `[E, C, I]` down), plus, where
//! the family has shared experts, an ordinary MLP added to its output:
//! ```text
//!             h = rms_norm(x);  x = x + moe(h, router, (bias,) gate_up, down) (+ mlp(h))
//! ```
//! The builder emits the fused op itself rather than E small MLPs for a pass to fuse: routing is
//! data dependent (each token picks its experts at run time), which the per-expert ops cannot
//! express, so there is no faithful unfused form to start from.
//!
//! With multi-head latent attention (`cfg.mla`, DeepSeek-V3) the attention block is instead:
//! ```text
//!             q = (rms_norm(h @ Wqa) @ Wqb)  or  h @ Wq            [T, H*(N+P)]
//!             latent, k_rope = split(h @ Wkva);  latent = rms_norm(latent)
//!             a = mla_attention(q, latent, k_rope, Wkvb);  x = x + a @ Wo
//! ```
//!
//! A DeepSeek-V3 checkpoint with multi-token-prediction weights (`num_nextn_predict_layers`,
//! stored as layer `L` = `num_hidden_layers`) also gets its first module, which proposes the
//! token after next for speculative decoding. Its inputs are the tokens one position ahead
//! (`t[i+1]` at position `i`) and the main model's final hidden states `g` (after `model.norm`,
//! what the head reads: every row is then normed, not only the gathered ones):
//! ```text
//! u = [rms_norm(embedding(embed_tokens, t[i+1]), enorm); rms_norm(g[i], hnorm)] @ eh_proj
//! x = layer L (u)                                   (its own slot of the KV cache)
//! g' = rms_norm(x, shared_head.norm);  logits' = gather_rows(g') @ lm_head
//! ```
//! The embedding and the head are the main model's (the paper's "shared" ones; the copies a
//! DeepSeek-V3 checkpoint stores beside the module are not read). Chained for more tokens, `g'`
//! takes the place of `g`. The hidden state fed in is the one after the final norm, as vLLM and
//! SGLang feed it.

use crate::{ModelConfig, ModelError, TensorSource};
use ir::{
    DType, Dim, Graph, GraphError, InputKind, Op, TensorType, ValueId, WeightExpr, OUTPUT_HIDDEN,
    OUTPUT_LOGITS, OUTPUT_MTP_HIDDEN, OUTPUT_MTP_LOGITS,
};

/// The epsilon of multi-head latent attention's two bottleneck norms (`q_a_layernorm`,
/// `kv_a_layernorm`): HF builds them as `DeepseekV3RMSNorm(rank)` with the class's default,
/// whatever the config's `rms_norm_eps` (DeepSeek's own inference code does the same).
const LATENT_NORM_EPS: f32 = 1e-6;

/// Checkpoint tensor names of a family's sparse MLP block, under `model.layers.{l}.{block}`.
#[derive(Clone, Copy, Debug)]
pub struct MoeNames {
    /// The block's module: `mlp` or `block_sparse_moe`.
    pub block: &'static str,
    /// The expert projections under `experts.{e}`: gate, up, down (`gate_proj` or `w1`, ...).
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    /// The router's selection bias under the block, stored `[1, E]`, if the family has one.
    pub bias: Option<&'static str>,
    /// The shared experts' module under the block, if the family has them.
    pub shared: Option<&'static str>,
}

/// What distinguishes one family's decoder from another's.
#[derive(Clone, Copy, Debug)]
pub struct DecoderVariant {
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// RoPE rotates interleaved pairs `(2i, 2i + 1)` (ERNIE 4.5): the q and k projections' rows
    /// are reordered per head (`WeightExpr::Deinterleave`) so the rotate-half `rope` op applies.
    pub rope_interleaved: bool,
}

struct Builder<'a> {
    graph: Graph,
    tensors: &'a dyn TensorSource,
    variant: DecoderVariant,
    /// Where the sparse layers' tensors are, for a mixture-of-experts family.
    moe_names: Option<MoeNames>,
}

impl Builder<'_> {
    /// Declares checkpoint tensor `name` as a weight, checking its shape.
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<ValueId, ModelError> {
        let info =
            self.tensors
                .info_expecting(name, shape)
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

    /// Declares the stack of `parts` (each a list of checkpoint tensors concatenated by rows,
    /// each of `shape`) as one weight `[parts, rows, cols]` named `name`.
    fn stacked(
        &mut self,
        name: String,
        parts: &[Vec<String>],
        shape: &[usize; 2],
    ) -> Result<ValueId, ModelError> {
        let mut exprs = Vec::with_capacity(parts.len());
        for tensors in parts {
            let mut rows = Vec::with_capacity(tensors.len());
            for t in tensors {
                self.check_shape(t, shape)?;
                rows.push(WeightExpr::Tensor(t.clone()));
            }
            exprs.push(if rows.len() == 1 {
                rows.remove(0)
            } else {
                WeightExpr::ConcatRows(rows)
            });
        }
        let per_part = parts.first().map_or(0, Vec::len);
        let dims = [
            Dim::Const(parts.len()),
            Dim::Const(per_part * shape[0]),
            Dim::Const(shape[1]),
        ];
        Ok(self.graph.add_weight(
            name,
            TensorType::new(DType::F32, &dims),
            WeightExpr::Stack(exprs),
        ))
    }

    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<(), ModelError> {
        let info =
            self.tensors
                .info_expecting(name, shape)
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
        Ok(())
    }

    /// Checkpoint tensor `name` of `stored` shape, entering the graph as a vector of `len`.
    fn vector_weight(
        &mut self,
        name: &str,
        stored: &[usize],
        len: usize,
    ) -> Result<ValueId, ModelError> {
        self.check_shape(name, stored)?;
        Ok(self.graph.add_weight(
            name,
            TensorType::new(DType::F32, &[Dim::Const(len)]),
            WeightExpr::Tensor(name.to_string()),
        ))
    }

    /// `(silu(h @ Wg) * (h @ Wu)) @ Wd` of the MLP at `prefix`.
    fn mlp(
        &mut self,
        h: ValueId,
        prefix: &str,
        i: usize,
        c: usize,
        names: [&str; 3],
    ) -> Result<ValueId, ModelError> {
        let gate = self.linear(h, &format!("{prefix}.{}", names[0]), i, c, false)?;
        let up = self.linear(h, &format!("{prefix}.{}", names[1]), i, c, false)?;
        let act = self.node(Op::Silu, &[gate])?;
        let m = self.node(Op::Mul, &[act, up])?;
        self.linear(m, &format!("{prefix}.{}", names[2]), c, i, false)
    }

    /// The sparse MLP of layer prefix `p`: routed experts as one `moe` op, plus shared experts.
    fn sparse_mlp(
        &mut self,
        h: ValueId,
        p: &str,
        cfg: &ModelConfig,
        moe: &crate::MoeConfig,
        names: &MoeNames,
    ) -> Result<ValueId, ModelError> {
        let (c, e, i) = (cfg.hidden_size, moe.num_experts, moe.moe_intermediate_size);
        let block = format!("{p}.{}", names.block);
        let router = self.weight(&format!("{block}.gate.weight"), &[e, c])?;
        let mut inputs = vec![h, router];
        if let Some(bias) = names.bias {
            // ERNIE stores the bias `[1, E]`, DeepSeek-V3 `[E]`.
            let name = format!("{block}.{bias}");
            let stored = match self.tensors.info(&name) {
                Some(info) if info.shape.len() == 1 => vec![e],
                _ => vec![1, e],
            };
            inputs.push(self.vector_weight(&name, &stored, e)?);
        }
        let expert = |x: usize, proj: &str| format!("{block}.experts.{x}.{proj}.weight");
        let gate_up: Vec<Vec<String>> = (0..e)
            .map(|x| vec![expert(x, names.gate), expert(x, names.up)])
            .collect();
        let down: Vec<Vec<String>> = (0..e).map(|x| vec![expert(x, names.down)]).collect();
        let gu_name = format!("{block}.experts.{}+{}.weight", names.gate, names.up);
        inputs.push(self.stacked(gu_name, &gate_up, &[i, c])?);
        let down_name = format!("{block}.experts.{}.weight", names.down);
        inputs.push(self.stacked(down_name, &down, &[c, i])?);
        let op = Op::Moe {
            experts: e,
            top_k: moe.num_experts_per_tok,
            routing: moe.routing,
            normalize: moe.norm_topk_prob,
            scaling: moe.routed_scaling_factor as f32,
        };
        let routed = self.node(op, &inputs)?;
        match names.shared {
            Some(shared) if moe.num_shared_experts > 0 => {
                let s = self.mlp(
                    h,
                    &format!("{block}.{shared}"),
                    moe.shared_intermediate_size,
                    c,
                    ["gate_proj", "up_proj", "down_proj"],
                )?;
                self.node(Op::Add, &[routed, s])
            }
            _ => Ok(routed),
        }
    }

    /// A q or k projection of an interleaved-RoPE family, its rows (and bias) deinterleaved per
    /// head of `head_dim`.
    fn linear_deinterleaved(
        &mut self,
        x: ValueId,
        prefix: &str,
        n: usize,
        k: usize,
        bias: bool,
        head_dim: usize,
    ) -> Result<ValueId, ModelError> {
        let mut operands = vec![x];
        for (suffix, shape) in [("weight", vec![n, k]), ("bias", vec![n])] {
            if suffix == "bias" && !bias {
                continue;
            }
            let name = format!("{prefix}.{suffix}");
            self.check_shape(&name, &shape)?;
            let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Const(d)).collect();
            let expr = WeightExpr::Deinterleave {
                part: Box::new(WeightExpr::Tensor(name.clone())),
                head_dim,
                cols: shape.get(1).copied().unwrap_or(1),
            };
            operands.push(self.graph.add_weight(
                format!("{prefix}.deinterleaved.{suffix}"),
                TensorType::new(DType::F32, &dims),
                expr,
            ));
        }
        self.node(Op::MatMul, &operands)
    }

    /// Multi-head latent attention of layer prefix `p` (see `ir::Op::MlaAttention`): q through
    /// its bottleneck (or `q_proj`), the latent and rope key from `kv_a_proj_with_mqa`, the
    /// latent normed, then attention on the latent cache and `o_proj`.
    fn mla_attention(
        &mut self,
        h_in: ValueId,
        p: &str,
        layer: usize,
        cfg: &ModelConfig,
        mla: &crate::MlaConfig,
        positions: ValueId,
    ) -> Result<ValueId, ModelError> {
        let (c, h, bias) = (cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias);
        let eps = LATENT_NORM_EPS;
        let (n, r, v, l) = (
            mla.qk_nope_head_dim,
            mla.qk_rope_head_dim,
            mla.v_head_dim,
            mla.kv_lora_rank,
        );
        let attn = format!("{p}.self_attn");
        // YaRN's attention factor multiplies the rotated rope parts of q and k, so the rope half
        // of every score by its square: folded into the rope rows of q's projection (rope is
        // linear), the no-rope part left as it is.
        let rope_factor = cfg.rope.attention_factor().powi(2);
        let q = match mla.q_lora_rank {
            Some(rank) => {
                let qa = self.linear(h_in, &format!("{attn}.q_a_proj"), rank, c, bias)?;
                let w = self.weight(&format!("{attn}.q_a_layernorm.weight"), &[rank])?;
                let qa = self.node(Op::RmsNorm { eps, group: rank }, &[qa, w])?;
                let name = format!("{attn}.q_b_proj.weight");
                let wq = self.rope_scaled_weight(&name, [h, n, r], rank, rope_factor)?;
                self.node(Op::MatMul, &[qa, wq])?
            }
            None => {
                let name = format!("{attn}.q_proj.weight");
                let wq = self.rope_scaled_weight(&name, [h, n, r], c, rope_factor)?;
                self.node(Op::MatMul, &[h_in, wq])?
            }
        };
        let kv = self.linear(h_in, &format!("{attn}.kv_a_proj_with_mqa"), l + r, c, bias)?;
        let parts = self
            .graph
            .add_node(Op::Split { sizes: vec![l, r] }, &[kv])
            .map_err(graph_bug)?;
        let w = self.weight(&format!("{attn}.kv_a_layernorm.weight"), &[l])?;
        let latent = self.node(Op::RmsNorm { eps, group: l }, &[parts[0], w])?;
        let kv_b = self.weight(&format!("{attn}.kv_b_proj.weight"), &[h * (n + v), l])?;
        let op = Op::MlaAttention {
            layer,
            n_heads: h,
            nope_dim: n,
            rope_dim: r,
            v_dim: v,
            kv_lora: l,
            // DeepSeek-V3 under YaRN also sharpens the softmax by `mscale_all_dim`.
            scale: cfg.rope.latent_attention_mscale() as f32 / ((n + r) as f32).sqrt(),
            rope_interleaved: mla.rope_interleave,
        };
        let a = self.node(op, &[q, latent, parts[1], kv_b, positions])?;
        self.linear(a, &format!("{attn}.o_proj"), c, h * v, bias)
    }

    /// A query projection `[H*(N+P), k]` whose rope rows (the last P of every head) are
    /// multiplied by `factor`; the plain weight when the factor is 1.
    fn rope_scaled_weight(
        &mut self,
        name: &str,
        [h, n, r]: [usize; 3],
        k: usize,
        factor: f64,
    ) -> Result<ValueId, ModelError> {
        if factor == 1.0 {
            return self.weight(name, &[h * (n + r), k]);
        }
        self.check_shape(name, &[h * (n + r), k])?;
        let expr = WeightExpr::ScaleRows {
            part: Box::new(WeightExpr::Tensor(name.to_string())),
            period: n + r,
            start: n,
            len: r,
            cols: k,
            factor,
        };
        Ok(self.graph.add_weight(
            format!("{name}.rope_scaled"),
            TensorType::new(DType::F32, &[Dim::Const(h * (n + r)), Dim::Const(k)]),
            expr,
        ))
    }

    fn node(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, ModelError> {
        self.graph.add_node1(op, inputs).map_err(graph_bug)
    }

    /// `x + mlp(rms_norm(x))` of the layer at prefix `p`, its MLP a mixture of experts when
    /// `sparse`.
    fn feed_forward(
        &mut self,
        x: ValueId,
        p: &str,
        sparse: bool,
        cfg: &ModelConfig,
    ) -> Result<ValueId, ModelError> {
        let c = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        let w = self.weight(&format!("{p}.post_attention_layernorm.weight"), &[c])?;
        let hn = self.node(Op::RmsNorm { eps, group: c }, &[x, w])?;
        let down = match (&cfg.moe, self.moe_names) {
            (Some(moe), Some(names)) if sparse => self.sparse_mlp(hn, p, cfg, moe, &names)?,
            _ => self.mlp(
                hn,
                &format!("{p}.mlp"),
                cfg.intermediate_size,
                c,
                ["gate_proj", "up_proj", "down_proj"],
            )?,
        };
        self.node(Op::Add, &[x, down])
    }

    /// One decoder layer over the residual stream `x`: attention, then the MLP, each behind its
    /// RMSNorm and added back. Layer `layer` names its tensors and its slot of the KV cache.
    fn layer(
        &mut self,
        x: ValueId,
        layer: usize,
        sparse: bool,
        cfg: &ModelConfig,
        positions: ValueId,
    ) -> Result<ValueId, ModelError> {
        let variant = self.variant;
        let (c, d, h, kv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        let eps = cfg.rms_norm_eps as f32;
        let p = format!("model.layers.{layer}");
        let w = self.weight(&format!("{p}.input_layernorm.weight"), &[c])?;
        let hn = self.node(Op::RmsNorm { eps, group: c }, &[x, w])?;
        if let Some(mla) = &cfg.mla {
            let o = self.mla_attention(hn, &p, layer, cfg, mla, positions)?;
            let x = self.node(Op::Add, &[x, o])?;
            return self.feed_forward(x, &p, sparse, cfg);
        }
        let (q_name, k_name) = (
            format!("{p}.self_attn.q_proj"),
            format!("{p}.self_attn.k_proj"),
        );
        let (mut q, mut k) = if variant.rope_interleaved {
            (
                self.linear_deinterleaved(hn, &q_name, h * d, c, variant.qkv_bias, d)?,
                self.linear_deinterleaved(hn, &k_name, kv * d, c, variant.qkv_bias, d)?,
            )
        } else {
            (
                self.linear(hn, &q_name, h * d, c, variant.qkv_bias)?,
                self.linear(hn, &k_name, kv * d, c, variant.qkv_bias)?,
            )
        };
        let val = self.linear(
            hn,
            &format!("{p}.self_attn.v_proj"),
            kv * d,
            c,
            variant.qkv_bias,
        )?;
        if variant.qk_norm {
            let qn = self.weight(&format!("{p}.self_attn.q_norm.weight"), &[d])?;
            let kn = self.weight(&format!("{p}.self_attn.k_norm.weight"), &[d])?;
            q = self.node(Op::RmsNorm { eps, group: d }, &[q, qn])?;
            k = self.node(Op::RmsNorm { eps, group: d }, &[k, kn])?;
        }
        let q = self.node(
            Op::Rope {
                n_heads: h,
                head_dim: d,
            },
            &[q, positions],
        )?;
        let k = self.node(
            Op::Rope {
                n_heads: kv,
                head_dim: d,
            },
            &[k, positions],
        )?;
        // YaRN's attention factor multiplies every rotated q and k (HF scales the cos and sin
        // tables), so every score by its square.
        let scale = cfg.rope.attention_factor().powi(2) as f32 / (d as f32).sqrt();
        let attn = Op::Attention {
            layer,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: d,
            scale,
            rope: false,
        };
        let a = self.node(attn, &[q, k, val, positions])?;
        let o = self.linear(a, &format!("{p}.self_attn.o_proj"), c, h * d, false)?;
        let x = self.node(Op::Add, &[x, o])?;
        self.feed_forward(x, &p, sparse, cfg)
    }

    /// DeepSeek-V3's first multi-token-prediction module, stored as layer `layer` (the first
    /// past the model's), when the checkpoint has its weights; `None` when it has not (HF
    /// transformers' own checkpoints drop them). See the module doc for what it computes.
    fn mtp_module(
        &mut self,
        layer: usize,
        cfg: &ModelConfig,
        [ids, positions, rows, embed, head]: [ValueId; 5],
    ) -> Result<Option<[ValueId; 2]>, ModelError> {
        let Some(mtp) = &cfg.mtp else {
            return Ok(None);
        };
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
        let p = format!("model.layers.{layer}");
        let eh_name = format!("{p}.eh_proj.weight");
        if self.tensors.info_expecting(&eh_name, &[c, 2 * c]).is_none() {
            return Ok(None);
        }
        self.check_shape(&eh_name, &[c, 2 * c])?;
        let hidden = self.graph.add_input(
            InputKind::Hidden,
            TensorType::new(DType::F32, &[Dim::Tokens, Dim::Const(c)]),
        );
        let e = self.node(Op::Embedding, &[embed, ids])?;
        let w = self.weight(&format!("{p}.enorm.weight"), &[c])?;
        let e = self.node(Op::RmsNorm { eps, group: c }, &[e, w])?;
        let w = self.weight(&format!("{p}.hnorm.weight"), &[c])?;
        let h = self.node(Op::RmsNorm { eps, group: c }, &[hidden, w])?;
        // eh_proj [e; h] as two matmuls over its column halves, embedding first.
        let mut halves = [e, h];
        for (i, x) in halves.iter_mut().enumerate() {
            let w = self.graph.add_weight(
                format!("{p}.eh_proj.{}.weight", ["embed", "hidden"][i]),
                TensorType::new(DType::F32, &[Dim::Const(c), Dim::Const(c)]),
                WeightExpr::Columns {
                    part: Box::new(WeightExpr::Tensor(eh_name.clone())),
                    start: i * c,
                    len: c,
                    cols: 2 * c,
                },
            );
            *x = self.node(Op::MatMul, &[*x, w])?;
        }
        let x = self.node(Op::Add, &halves)?;
        let x = self.layer(x, layer, mtp.sparse, cfg, positions)?;
        let w = self.weight(&format!("{p}.shared_head.norm.weight"), &[c])?;
        let out = self.node(Op::RmsNorm { eps, group: c }, &[x, w])?;
        let picked = self.node(Op::GatherRows, &[out, rows])?;
        let logits = self.node(Op::MatMul, &[picked, head])?;
        Ok(Some([out, logits]))
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
    build(name, cfg, tensors, variant, None)
}

/// The decoder of a mixture-of-experts family: `cfg.moe` says which layers are sparse, `names`
/// where their tensors are.
pub fn build_moe_decoder(
    name: &str,
    cfg: &ModelConfig,
    tensors: &dyn TensorSource,
    variant: DecoderVariant,
    names: MoeNames,
) -> Result<Graph, ModelError> {
    build(name, cfg, tensors, variant, Some(names))
}

fn build(
    name: &str,
    cfg: &ModelConfig,
    tensors: &dyn TensorSource,
    variant: DecoderVariant,
    moe_names: Option<MoeNames>,
) -> Result<Graph, ModelError> {
    let (c, d, v) = (cfg.hidden_size, cfg.head_dim, cfg.vocab_size);
    let eps = cfg.rms_norm_eps as f32;
    let mut b = Builder {
        graph: Graph::new(name),
        tensors,
        variant,
        moe_names,
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
        let sparse = cfg
            .moe
            .as_ref()
            .is_some_and(|m| m.sparse_layers.get(layer) == Some(&true));
        x = b.layer(x, layer, sparse, cfg, positions)?;
    }
    let w = b.weight("model.norm.weight", &[c])?;
    let head = if cfg.tie_word_embeddings {
        embed
    } else {
        b.weight("lm_head.weight", &[v, c])?
    };
    let inputs = [ids, positions, rows, embed, head];
    let mtp = b.mtp_module(cfg.num_hidden_layers, cfg, inputs)?;
    let normed = match mtp {
        // The module reads every token's final hidden state, so all rows are normed.
        Some(_) => {
            let hidden = b.node(Op::RmsNorm { eps, group: c }, &[x, w])?;
            b.graph.set_output(OUTPUT_HIDDEN, hidden);
            b.node(Op::GatherRows, &[hidden, rows])?
        }
        None => {
            let picked = b.node(Op::GatherRows, &[x, rows])?;
            b.node(Op::RmsNorm { eps, group: c }, &[picked, w])?
        }
    };
    let logits = b.node(Op::MatMul, &[normed, head])?;
    b.graph.set_output(OUTPUT_LOGITS, logits);
    if let Some([hidden, logits]) = mtp {
        b.graph.set_output(OUTPUT_MTP_HIDDEN, hidden);
        b.graph.set_output(OUTPUT_MTP_LOGITS, logits);
    }
    Ok(b.graph)
}
