//! A float64 reference of DeepSeek-V3 (HF transformers' `modeling_deepseek_v3.py`) and of its
//! multi-token-prediction module, written from the definitions with plain loops: it shares no
//! code with the compiler or the runtime, so that it can judge them. Only for tiny checkpoints.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

pub struct DeepseekF64 {
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: the query is one projection, `self_attn.q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_interleave: bool,
    pub first_k_dense_replace: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub n_shared_experts: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub tie_word_embeddings: bool,
    pub num_nextn_predict_layers: usize,
    /// Every tensor of the checkpoint by name: its shape and values (row-major).
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl DeepseekF64 {
    /// Reads `dir/config.json` and every tensor of `dir/model.safetensors` (f32, bf16, f16 or
    /// f64 on disk) into f64.
    pub fn load(dir: &Path) -> DeepseekF64 {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .unwrap_or_else(|e| panic!("reading {}/config.json: {e}", dir.display()));
        let config: serde_json::Value = serde_json::from_str(&text).expect("valid config.json");
        let int = |key: &str| -> usize {
            config[key]
                .as_u64()
                .unwrap_or_else(|| panic!("config.json: {key} is not an integer"))
                as usize
        };
        let int_or = |key: &str, default: usize| -> usize {
            config[key].as_u64().map_or(default, |v| v as usize)
        };
        let float_or = |key: &str, default: f64| config[key].as_f64().unwrap_or(default);
        let bool_or = |key: &str, default: bool| config[key].as_bool().unwrap_or(default);

        // Only unscaled RoPE: YaRN would change the frequencies and the softmax scale.
        let mut rope_theta = config["rope_theta"].as_f64();
        for key in ["rope_parameters", "rope_scaling"] {
            let p = &config[key];
            if p.is_null() {
                continue;
            }
            let kind = p["rope_type"]
                .as_str()
                .or(p["type"].as_str())
                .unwrap_or("default");
            assert_eq!(kind, "default", "{key}: only default RoPE is supported");
            if let Some(t) = p["rope_theta"].as_f64() {
                rope_theta = Some(t);
            }
        }

        let bytes = std::fs::read(dir.join("model.safetensors"))
            .unwrap_or_else(|e| panic!("reading {}/model.safetensors: {e}", dir.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                safetensors::Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }

        DeepseekF64 {
            hidden_size: int("hidden_size"),
            vocab_size: int("vocab_size"),
            num_hidden_layers: int("num_hidden_layers"),
            num_attention_heads: int("num_attention_heads"),
            q_lora_rank: config["q_lora_rank"].as_u64().map(|v| v as usize),
            kv_lora_rank: int("kv_lora_rank"),
            qk_nope_head_dim: int("qk_nope_head_dim"),
            qk_rope_head_dim: int("qk_rope_head_dim"),
            v_head_dim: int("v_head_dim"),
            rms_norm_eps: float_or("rms_norm_eps", 1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            // HF's DeepseekV3Config defaults.
            rope_interleave: bool_or("rope_interleave", true),
            first_k_dense_replace: int_or("first_k_dense_replace", 3),
            n_routed_experts: int("n_routed_experts"),
            num_experts_per_tok: int("num_experts_per_tok"),
            n_group: int_or("n_group", 8),
            topk_group: int_or("topk_group", 4),
            norm_topk_prob: bool_or("norm_topk_prob", true),
            routed_scaling_factor: float_or("routed_scaling_factor", 2.5),
            n_shared_experts: int_or("n_shared_experts", 1),
            intermediate_size: int("intermediate_size"),
            moe_intermediate_size: int("moe_intermediate_size"),
            tie_word_embeddings: bool_or("tie_word_embeddings", false),
            num_nextn_predict_layers: int_or("num_nextn_predict_layers", 0),
            tensors,
        }
    }

    /// The main model over `tokens` at positions 0..n (full causal attention, no cache): per
    /// position, the final-normed hidden state (`model.norm`'s output, the head's input) and
    /// the logits.
    pub fn forward(&self, tokens: &[u32]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| self.embedding(t)).collect();
        for l in 0..self.num_hidden_layers {
            self.decoder_layer(l, &mut xs);
        }
        let norm = self.t("model.norm.weight");
        let hidden: Vec<Vec<f64>> = xs.iter().map(|x| self.rmsnorm(x, norm)).collect();
        let logits = hidden.iter().map(|h| self.lm_head(h)).collect();
        (hidden, logits)
    }

    /// The MTP module (layer `num_hidden_layers`) over positions 0..n: position i takes
    /// `tokens[i]` (in use: the sequence's token at i+1) and `hidden[i]` (the main model's
    /// normed hidden state at i). Returns per position the module's normed output hidden
    /// (`shared_head.norm`) and its logits through the main model's head.
    pub fn mtp(&self, tokens: &[u32], hidden: &[Vec<f64>]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        assert_eq!(tokens.len(), hidden.len(), "one hidden state per token");
        let l = self.num_hidden_layers;
        let p = format!("model.layers.{l}");
        let enorm = self.t(&format!("{p}.enorm.weight"));
        let hnorm = self.t(&format!("{p}.hnorm.weight"));
        let eh_proj = self.t(&format!("{p}.eh_proj.weight"));
        let mut xs: Vec<Vec<f64>> = tokens
            .iter()
            .zip(hidden)
            .map(|(&t, h)| {
                assert_eq!(h.len(), self.hidden_size, "hidden state size");
                // The embedding half first: eh_proj's columns 0..C take it, C..2C the hidden.
                let mut cat = self.rmsnorm(&self.embedding(t), enorm);
                cat.extend(self.rmsnorm(h, hnorm));
                linear(eh_proj, &cat)
            })
            .collect();
        self.decoder_layer(l, &mut xs);
        let norm = self.t(&format!("{p}.shared_head.norm.weight"));
        let out: Vec<Vec<f64>> = xs.iter().map(|x| self.rmsnorm(x, norm)).collect();
        let logits = out.iter().map(|h| self.lm_head(h)).collect();
        (out, logits)
    }

    /// A tensor's values; panics naming it when the checkpoint lacks it.
    pub fn t(&self, name: &str) -> &[f64] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("the checkpoint has no tensor {name}"))
            .1
    }

    fn embedding(&self, token: u32) -> Vec<f64> {
        let c = self.hidden_size;
        let table = self.t("model.embed_tokens.weight");
        let t = token as usize;
        assert!(t < table.len() / c, "token {t} outside the vocabulary");
        table[t * c..(t + 1) * c].to_vec()
    }

    fn lm_head(&self, h: &[f64]) -> Vec<f64> {
        let name = if self.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        linear(self.t(name), h)
    }

    fn rmsnorm(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        rmsnorm(x, w, self.rms_norm_eps)
    }

    /// Rotates `x` (one head's rope part) to position `pos`. Interleaved: pairs (2i, 2i+1),
    /// which is what HF's permute-then-rotate-half computes up to an order of the dimensions
    /// shared by query and key (so the same dot products). Otherwise pairs (i, i + d/2).
    fn rope(&self, x: &mut [f64], pos: usize) {
        let d = x.len();
        for i in 0..d / 2 {
            let freq = self.rope_theta.powf(-((2 * i) as f64) / d as f64);
            let (sin, cos) = (pos as f64 * freq).sin_cos();
            let (a, b) = if self.rope_interleave {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + d / 2)
            };
            let (xa, xb) = (x[a], x[b]);
            x[a] = xa * cos - xb * sin;
            x[b] = xb * cos + xa * sin;
        }
    }

    /// One pre-norm decoder layer over every position of `xs` (the residual stream), in place.
    fn decoder_layer(&self, l: usize, xs: &mut [Vec<f64>]) {
        let p = format!("model.layers.{l}");
        let ln = self.t(&format!("{p}.input_layernorm.weight"));
        let hs: Vec<Vec<f64>> = xs.iter().map(|x| self.rmsnorm(x, ln)).collect();
        let attn = self.attention(&p, &hs);
        for (x, o) in xs.iter_mut().zip(&attn) {
            add(x, o);
        }
        let ln = self.t(&format!("{p}.post_attention_layernorm.weight"));
        for x in xs.iter_mut() {
            let h = self.rmsnorm(x, ln);
            let m = if l < self.first_k_dense_replace {
                self.mlp(&format!("{p}.mlp"), &h)
            } else {
                self.moe(&p, &h)
            };
            add(x, &m);
        }
    }

    /// Multi-head latent attention, causal, over positions 0..n, computed naively: keys and
    /// values expanded from the latent per head (no weight absorption).
    fn attention(&self, p: &str, hs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let (nh, nope, rope, vd) = (
            self.num_attention_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
        );
        let qk = nope + rope;
        let lora = self.kv_lora_rank;
        let (mut qs, mut k_ropes, mut kvs) = (vec![], vec![], vec![]);
        for (pos, h) in hs.iter().enumerate() {
            let mut q = match self.q_lora_rank {
                Some(_) => {
                    let a = linear(self.t(&format!("{p}.self_attn.q_a_proj.weight")), h);
                    let norm = self.t(&format!("{p}.self_attn.q_a_layernorm.weight"));
                    let a = rmsnorm(&a, norm, LATENT_NORM_EPS);
                    linear(self.t(&format!("{p}.self_attn.q_b_proj.weight")), &a)
                }
                None => linear(self.t(&format!("{p}.self_attn.q_proj.weight")), h),
            };
            assert_eq!(q.len(), nh * qk, "{p}: query size");
            for head in 0..nh {
                self.rope(&mut q[head * qk + nope..(head + 1) * qk], pos);
            }
            let ckv = linear(
                self.t(&format!("{p}.self_attn.kv_a_proj_with_mqa.weight")),
                h,
            );
            assert_eq!(ckv.len(), lora + rope, "{p}: kv_a_proj_with_mqa size");
            let norm = self.t(&format!("{p}.self_attn.kv_a_layernorm.weight"));
            let latent = rmsnorm(&ckv[..lora], norm, LATENT_NORM_EPS);
            let mut k_rope = ckv[lora..].to_vec();
            self.rope(&mut k_rope, pos);
            // Per head [k_nope | v].
            let kv = linear(self.t(&format!("{p}.self_attn.kv_b_proj.weight")), &latent);
            assert_eq!(kv.len(), nh * (nope + vd), "{p}: kv_b_proj size");
            qs.push(q);
            k_ropes.push(k_rope);
            kvs.push(kv);
        }
        let scale = 1.0 / (qk as f64).sqrt();
        let o_proj = self.t(&format!("{p}.self_attn.o_proj.weight"));
        (0..hs.len())
            .map(|i| {
                let mut o = vec![0.0; nh * vd];
                for head in 0..nh {
                    let q = &qs[i][head * qk..(head + 1) * qk];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let k_nope = &kvs[j][head * (nope + vd)..][..nope];
                            (dot(&q[..nope], k_nope) + dot(&q[nope..], &k_ropes[j])) * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = exps.iter().sum();
                    let out = &mut o[head * vd..(head + 1) * vd];
                    for (j, e) in exps.iter().enumerate() {
                        let v = &kvs[j][head * (nope + vd) + nope..][..vd];
                        for (acc, v) in out.iter_mut().zip(v) {
                            *acc += e / total * v;
                        }
                    }
                }
                linear(o_proj, &o)
            })
            .collect()
    }

    /// A SwiGLU MLP whose projections sit under `prefix` (`…mlp`, `…mlp.experts.{e}`,
    /// `…mlp.shared_experts`).
    fn mlp(&self, prefix: &str, h: &[f64]) -> Vec<f64> {
        let g = linear(self.t(&format!("{prefix}.gate_proj.weight")), h);
        let u = linear(self.t(&format!("{prefix}.up_proj.weight")), h);
        let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
        linear(self.t(&format!("{prefix}.down_proj.weight")), &a)
    }

    /// The experts chosen for `h` and their weights, as HF's DeepseekV3MoE routes them.
    pub fn route(&self, p: &str, h: &[f64]) -> Vec<(usize, f64)> {
        let n = self.n_routed_experts;
        let scores: Vec<f64> = linear(self.t(&format!("{p}.mlp.gate.weight")), h)
            .into_iter()
            .map(|z| 1.0 / (1.0 + (-z).exp()))
            .collect();
        assert_eq!(scores.len(), n, "{p}: router size");
        let bias_name = format!("{p}.mlp.gate.e_score_correction_bias");
        let choice: Vec<f64> = match self.tensors.get(&bias_name) {
            Some((_, b)) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
            None => scores.clone(),
        };
        // A group's score: the sum of its two best choice scores.
        let per_group = n / self.n_group;
        let group_scores: Vec<f64> = choice
            .chunks(per_group)
            .map(|g| {
                let mut g = g.to_vec();
                g.sort_by(|a, b| b.total_cmp(a));
                g.iter().take(2).sum()
            })
            .collect();
        let kept = top_indices(&group_scores, self.topk_group);
        // HF fills the dropped groups' scores with 0.0 (not -inf) before the expert top-k.
        let masked: Vec<f64> = (0..n)
            .map(|e| {
                if kept.contains(&(e / per_group)) {
                    choice[e]
                } else {
                    0.0
                }
            })
            .collect();
        let picked = top_indices(&masked, self.num_experts_per_tok);
        // Weights from the unbiased scores; HF adds 1e-20 to the denominator.
        let mut weights: Vec<f64> = picked.iter().map(|&e| scores[e]).collect();
        if self.norm_topk_prob {
            let total: f64 = weights.iter().sum::<f64>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= total);
        }
        picked
            .into_iter()
            .zip(weights)
            .map(|(e, w)| (e, w * self.routed_scaling_factor))
            .collect()
    }

    fn moe(&self, p: &str, h: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.hidden_size];
        for (e, w) in self.route(p, h) {
            let y = self.mlp(&format!("{p}.mlp.experts.{e}"), h);
            for (o, y) in out.iter_mut().zip(&y) {
                *o += w * y;
            }
        }
        if self.n_shared_experts > 0 {
            add(&mut out, &self.mlp(&format!("{p}.mlp.shared_experts"), h));
        }
        out
    }
}

/// The epsilon of `q_a_layernorm` and `kv_a_layernorm`: HF builds them as
/// `DeepseekV3RMSNorm(rank)`, whose default is 1e-6, whatever `rms_norm_eps` says (so does
/// DeepSeek's own inference code). With `rms_norm_eps` there (1e-5 in the tiny golden) the
/// logits move by about 3e-5 of their largest value.
pub const LATENT_NORM_EPS: f64 = 1e-6;

/// `x * w / sqrt(mean(x^2) + eps)`.
pub fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    assert_eq!(x.len(), w.len(), "norm size");
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// `w @ x` for `w` of shape [out, x.len()], row-major.
fn linear(w: &[f64], x: &[f64]) -> Vec<f64> {
    assert!(
        !x.is_empty() && w.len().is_multiple_of(x.len()),
        "a weight of {} values cannot take {} inputs",
        w.len(),
        x.len()
    );
    w.chunks_exact(x.len()).map(|row| dot(row, x)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

fn add(x: &mut [f64], y: &[f64]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// The indices of the `k` largest values, largest first; ties go to the lower index.
fn top_indices(values: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    // A stable sort keeps equal values in index order.
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order.truncate(k);
    order
}
