//! The op table: every operation of the graph IR, its operands, attributes and shape rule, in one
//! place. The printer, the parser and the verifier all read from here.
//!
//! Shapes use the legend of `shape.rs` (`T` tokens, `R` logit rows) plus `H` heads, `KV` kv-heads,
//! `D` head dim, `K` input features, `N` output features, `I` intermediate size.
//! To add an op: a variant here, its arm in each `match` below, a kernel in `kernels`, and a test
//! (see docs/how-to/add-an-op.md).

use crate::shape::{Dim, TensorType};
use crate::types::{DType, MoeRouting, OpKind};
use std::fmt::Write as _;

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `(table[V, C], token_ids i32[T]) -> [T, C]`
    Embedding,
    /// `(x[T, C], w[G]) -> [T, C]`; each row normalized in groups of `group` (= C, or D per head).
    RmsNorm { eps: f32, group: usize },
    /// `(x[T, C], d[T, C], w[C]) -> (s[T, C], y[T, C])`: `s = x + d`, `y = rms_norm(s)`.
    AddRmsNorm { eps: f32 },
    /// `(x[T, K], w[N, K]) -> [T, N]`, or with a bias `(x, w, b[N])`.
    MatMul,
    /// `(a[T, C], b[T, C]) -> [T, C]`
    Add,
    /// `(a[T, C], b[T, C]) -> [T, C]`
    Mul,
    /// `(x[T, C]) -> [T, C]`
    Silu,
    /// `(gu[T, 2I]) -> [T, I]`: `silu(gu[:, :I]) * gu[:, I:]`.
    SiluMul,
    /// `(x[T, H*D], positions i32[T]) -> [T, H*D]`, rotate-half, frequencies from the graph's
    /// `rope_inv_freq` constant.
    Rope { n_heads: usize, head_dim: usize },
    /// `(q[T, H*D], k[T, KV*D], v[T, KV*D], positions i32[T]) -> [T, H*D]`: appends k, v to
    /// layer `layer` of the KV cache, then causal attention over everything cached. With `rope`,
    /// q and k arrive unrotated and the op applies `rope` to both first (the CUDA target fuses
    /// the rotation into the cache write and the query load: `fuse_rope_attention`).
    Attention {
        layer: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        scale: f32,
        rope: bool,
    },
    /// Multi-head latent attention (DeepSeek-V3), `L` the latent rank `kv_lora`, `N` `nope_dim`,
    /// `P` `rope_dim`, `V` `v_dim`:
    /// `(q[T, H*(N+P)], latent[T, L], k_rope[T, P], kv_b[H*(N+V), L], positions i32[T]) -> [T, H*V]`.
    /// Rotates the last `P` columns of every q head and `k_rope` by position (pairs `(2i, 2i+1)`
    /// if `rope_interleaved`, else rotate-half), appends `[latent | k_rope]` to layer `layer` of
    /// the KV cache, then attends causally with keys `[kv_b_k(h) @ latent | k_rope]` and values
    /// `kv_b_v(h) @ latent` (head h's rows of `kv_b`: N for keys, then V for values), computed on
    /// the latent: the key and value up-projections are absorbed into q and the output.
    MlaAttention {
        layer: usize,
        n_heads: usize,
        nope_dim: usize,
        rope_dim: usize,
        v_dim: usize,
        kv_lora: usize,
        scale: f32,
        rope_interleaved: bool,
    },
    /// `(x[T, C], rows i32[R]) -> [R, C]`
    GatherRows,
    /// `(x[T, sum(sizes)]) -> ([T, sizes0], [T, sizes1], ...)`: column views, no copy.
    Split { sizes: Vec<usize> },
    /// `(x[T, C], router[E, C], (bias f32[E],) gate_up[E, 2I, C], down[E, C, I]) -> [T, C]`:
    /// a mixture of `experts` SwiGLU MLPs as one op. Per token: scores = `routing`(x @ router^T);
    /// the `top_k` experts with the largest scores (+ bias, which only selects) are picked; their
    /// weights are their unbiased scores, divided by their sum if `normalize`, times `scaling`;
    /// out = sum over picked e of weight_e * (silu(x @ G_e^T) * (x @ U_e^T)) @ D_e^T, where
    /// `gate_up[e] = [G_e; U_e]`. Ties go to the lower expert index. With `sigmoid_grouped`
    /// routing the text form carries its `groups` and `top_groups` as attributes of their own.
    Moe {
        experts: usize,
        top_k: usize,
        routing: MoeRouting,
        normalize: bool,
        scaling: f32,
    },
}

/// Why an op's operands do not fit its shape rule. Always a bug in whoever built the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ShapeError> {
    Err(ShapeError(msg.into()))
}

fn rows_cols(t: &TensorType, what: &str) -> Result<(Dim, usize), ShapeError> {
    match t.shape.0.as_slice() {
        [rows, Dim::Const(cols)] => Ok((*rows, *cols)),
        _ => err(format!("{what} must be [rows, cols], got {t}")),
    }
}

fn want_dtype(t: &TensorType, dtype: DType, what: &str) -> Result<(), ShapeError> {
    if t.dtype == dtype {
        Ok(())
    } else {
        err(format!("{what} must be {dtype}, got {t}"))
    }
}

fn want_float_weight(t: &TensorType, what: &str) -> Result<(), ShapeError> {
    match t.dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        _ => err(format!("{what} must be a float tensor, got {t}")),
    }
}

fn want_vector(t: &TensorType, len: usize, what: &str) -> Result<(), ShapeError> {
    want_dtype(t, DType::F32, what)?;
    if t.shape.0 == [Dim::Const(len)] {
        Ok(())
    } else {
        err(format!("{what} must be f32[{len}], got {t}"))
    }
}

fn want_ids(t: &TensorType, rows: Dim, what: &str) -> Result<(), ShapeError> {
    if t.dtype == DType::I32 && t.shape.0 == [rows] {
        Ok(())
    } else {
        err(format!("{what} must be i32[{rows}], got {t}"))
    }
}

impl Op {
    /// The kernel-registry key of this op; `None` for ops that are views and launch nothing.
    pub fn kind(&self) -> Option<OpKind> {
        Some(match self {
            Op::Embedding => OpKind::Embedding,
            Op::RmsNorm { .. } => OpKind::RmsNorm,
            Op::AddRmsNorm { .. } => OpKind::AddRmsNorm,
            Op::MatMul => OpKind::MatMul,
            Op::Add => OpKind::Add,
            Op::Mul => OpKind::Mul,
            Op::Silu => OpKind::Silu,
            Op::SiluMul => OpKind::SiluMul,
            Op::Rope { .. } => OpKind::Rope,
            Op::Attention { .. } => OpKind::Attention,
            Op::MlaAttention { .. } => OpKind::MlaAttention,
            Op::GatherRows => OpKind::GatherRows,
            Op::Moe { .. } => OpKind::Moe,
            Op::Split { .. } => return None,
        })
    }

    /// Spelling in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Split { .. } => "split",
            other => other.kind().map(OpKind::name).unwrap_or("split"),
        }
    }

    /// Attributes as `key=value` pairs, in a fixed order, for the text form.
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        match self {
            Op::RmsNorm { eps, group } => {
                vec![("eps", fmt_f32(*eps)), ("group", group.to_string())]
            }
            Op::AddRmsNorm { eps } => vec![("eps", fmt_f32(*eps))],
            Op::Rope { n_heads, head_dim } => {
                vec![
                    ("n_heads", n_heads.to_string()),
                    ("head_dim", head_dim.to_string()),
                ]
            }
            Op::Attention {
                layer,
                n_heads,
                n_kv_heads,
                head_dim,
                scale,
                rope,
            } => {
                let mut attrs = vec![
                    ("layer", layer.to_string()),
                    ("n_heads", n_heads.to_string()),
                    ("n_kv_heads", n_kv_heads.to_string()),
                    ("head_dim", head_dim.to_string()),
                    ("scale", fmt_f32(*scale)),
                ];
                // Spelled only when set: most graphs rotate in their own rope ops.
                if *rope {
                    attrs.push(("rope", "true".to_string()));
                }
                attrs
            }
            Op::MlaAttention {
                layer,
                n_heads,
                nope_dim,
                rope_dim,
                v_dim,
                kv_lora,
                scale,
                rope_interleaved,
            } => vec![
                ("layer", layer.to_string()),
                ("n_heads", n_heads.to_string()),
                ("nope_dim", nope_dim.to_string()),
                ("rope_dim", rope_dim.to_string()),
                ("v_dim", v_dim.to_string()),
                ("kv_lora", kv_lora.to_string()),
                ("scale", fmt_f32(*scale)),
                ("rope_interleaved", rope_interleaved.to_string()),
            ],
            Op::Split { sizes } => {
                let mut text = String::from("[");
                for (i, s) in sizes.iter().enumerate() {
                    if i > 0 {
                        text.push_str(", ");
                    }
                    let _ = write!(text, "{s}");
                }
                text.push(']');
                vec![("sizes", text)]
            }
            Op::Moe {
                experts,
                top_k,
                routing,
                normalize,
                scaling,
            } => {
                let mut attrs = vec![
                    ("experts", experts.to_string()),
                    ("top_k", top_k.to_string()),
                    ("routing", routing.name().to_string()),
                    ("normalize", normalize.to_string()),
                    ("scaling", fmt_f32(*scaling)),
                ];
                if let MoeRouting::SigmoidGrouped { groups, top_groups } = routing {
                    attrs.push(("groups", groups.to_string()));
                    attrs.push(("top_groups", top_groups.to_string()));
                }
                attrs
            }
            Op::Embedding
            | Op::MatMul
            | Op::Add
            | Op::Mul
            | Op::Silu
            | Op::SiluMul
            | Op::GatherRows => {
                vec![]
            }
        }
    }

    /// Builds an op from its text spelling and attributes (the inverse of `name` + `attrs`).
    pub fn from_text(name: &str, attrs: &[(String, String)]) -> Result<Op, String> {
        let get = |key: &str| -> Result<&str, String> {
            attrs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("op {name} needs attribute {key}"))
        };
        let usize_attr = |key: &str| -> Result<usize, String> {
            get(key)?
                .parse()
                .map_err(|_| format!("attribute {key} of {name} must be an integer"))
        };
        let f32_attr = |key: &str| -> Result<f32, String> {
            get(key)?
                .parse()
                .map_err(|_| format!("attribute {key} of {name} must be a number"))
        };
        let bool_attr = |key: &str| -> Result<bool, String> {
            get(key)?
                .parse()
                .map_err(|_| format!("attribute {key} of {name} must be true or false"))
        };
        Ok(match name {
            "embedding" => Op::Embedding,
            "rms_norm" => Op::RmsNorm {
                eps: f32_attr("eps")?,
                group: usize_attr("group")?,
            },
            "add_rms_norm" => Op::AddRmsNorm {
                eps: f32_attr("eps")?,
            },
            "matmul" => Op::MatMul,
            "add" => Op::Add,
            "mul" => Op::Mul,
            "silu" => Op::Silu,
            "silu_mul" => Op::SiluMul,
            "rope" => Op::Rope {
                n_heads: usize_attr("n_heads")?,
                head_dim: usize_attr("head_dim")?,
            },
            "attention" => Op::Attention {
                layer: usize_attr("layer")?,
                n_heads: usize_attr("n_heads")?,
                n_kv_heads: usize_attr("n_kv_heads")?,
                head_dim: usize_attr("head_dim")?,
                scale: f32_attr("scale")?,
                rope: attrs.iter().any(|(k, _)| k == "rope") && bool_attr("rope")?,
            },
            "gather_rows" => Op::GatherRows,
            "mla_attention" => Op::MlaAttention {
                layer: usize_attr("layer")?,
                n_heads: usize_attr("n_heads")?,
                nope_dim: usize_attr("nope_dim")?,
                rope_dim: usize_attr("rope_dim")?,
                v_dim: usize_attr("v_dim")?,
                kv_lora: usize_attr("kv_lora")?,
                scale: f32_attr("scale")?,
                rope_interleaved: bool_attr("rope_interleaved")?,
            },
            "moe" => {
                let group_count = |key: &str| -> Result<u32, String> {
                    u32::try_from(usize_attr(key)?)
                        .map_err(|_| format!("attribute {key} of moe is too large"))
                };
                let routing = match get("routing")? {
                    "sigmoid_grouped" => MoeRouting::SigmoidGrouped {
                        groups: group_count("groups")?,
                        top_groups: group_count("top_groups")?,
                    },
                    other => MoeRouting::parse(other).ok_or_else(|| {
                        "moe routing must be softmax, sigmoid or sigmoid_grouped".to_string()
                    })?,
                };
                Op::Moe {
                    experts: usize_attr("experts")?,
                    top_k: usize_attr("top_k")?,
                    routing,
                    normalize: bool_attr("normalize")?,
                    scaling: f32_attr("scaling")?,
                }
            }
            "split" => {
                let list = get("sizes")?.trim();
                let inner = list
                    .strip_prefix('[')
                    .and_then(|s| s.strip_suffix(']'))
                    .ok_or_else(|| "split sizes must be a [list]".to_string())?;
                let sizes = inner
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|_| format!("bad split size {s:?}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Op::Split { sizes }
            }
            other => return Err(format!("unknown op {other}")),
        })
    }

    /// The shape rule: output types from input types, or why the inputs do not fit.
    pub fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, ShapeError> {
        let arity = |n: usize| -> Result<(), ShapeError> {
            if inputs.len() == n {
                Ok(())
            } else {
                err(format!(
                    "{} takes {n} operands, got {}",
                    self.name(),
                    inputs.len()
                ))
            }
        };
        let act = |i: usize, what: &str| -> Result<(Dim, usize), ShapeError> {
            want_dtype(inputs[i], DType::F32, what)?;
            rows_cols(inputs[i], what)
        };
        match self {
            Op::Embedding => {
                arity(2)?;
                want_float_weight(inputs[0], "embedding table")?;
                let cols = match inputs[0].shape.0.as_slice() {
                    [Dim::Const(_), Dim::Const(c)] => *c,
                    _ => return err(format!("embedding table must be [V, C], got {}", inputs[0])),
                };
                want_ids(inputs[1], Dim::Tokens, "token ids")?;
                Ok(vec![TensorType::act(Dim::Tokens, cols)])
            }
            Op::RmsNorm { group, .. } => {
                arity(2)?;
                let (rows, cols) = act(0, "rms_norm input")?;
                if *group == 0 || cols % group != 0 {
                    return err(format!(
                        "rms_norm group {group} does not divide {cols} columns"
                    ));
                }
                want_vector(inputs[1], *group, "rms_norm weight")?;
                Ok(vec![TensorType::act(rows, cols)])
            }
            Op::AddRmsNorm { .. } => {
                arity(3)?;
                let (rows, cols) = act(0, "add_rms_norm input")?;
                if act(1, "add_rms_norm addend")? != (rows, cols) {
                    return err(format!(
                        "add_rms_norm operands differ: {} vs {}",
                        inputs[0], inputs[1]
                    ));
                }
                want_vector(inputs[2], cols, "add_rms_norm weight")?;
                Ok(vec![
                    TensorType::act(rows, cols),
                    TensorType::act(rows, cols),
                ])
            }
            Op::MatMul => {
                if inputs.len() != 2 && inputs.len() != 3 {
                    return err(format!(
                        "matmul takes 2 or 3 operands, got {}",
                        inputs.len()
                    ));
                }
                let (rows, k) = act(0, "matmul input")?;
                want_float_weight(inputs[1], "matmul weight")?;
                let (n, wk) = match inputs[1].shape.0.as_slice() {
                    [Dim::Const(n), Dim::Const(wk)] => (*n, *wk),
                    _ => return err(format!("matmul weight must be [N, K], got {}", inputs[1])),
                };
                if wk != k {
                    return err(format!(
                        "matmul: input has {k} features, weight {} expects {wk}",
                        inputs[1]
                    ));
                }
                if let Some(bias) = inputs.get(2) {
                    want_vector(bias, n, "matmul bias")?;
                }
                Ok(vec![TensorType::act(rows, n)])
            }
            Op::Add | Op::Mul => {
                arity(2)?;
                let a = act(0, "left operand")?;
                if act(1, "right operand")? != a {
                    return err(format!(
                        "{} operands differ: {} vs {}",
                        self.name(),
                        inputs[0],
                        inputs[1]
                    ));
                }
                Ok(vec![TensorType::act(a.0, a.1)])
            }
            Op::Silu => {
                arity(1)?;
                let (rows, cols) = act(0, "silu input")?;
                Ok(vec![TensorType::act(rows, cols)])
            }
            Op::SiluMul => {
                arity(1)?;
                let (rows, cols) = act(0, "silu_mul input")?;
                if cols % 2 != 0 {
                    return err(format!(
                        "silu_mul input must have an even width, got {cols}"
                    ));
                }
                Ok(vec![TensorType::act(rows, cols / 2)])
            }
            Op::Rope { n_heads, head_dim } => {
                arity(2)?;
                let (rows, cols) = act(0, "rope input")?;
                if cols != n_heads * head_dim || head_dim % 2 != 0 {
                    return err(format!(
                        "rope over {n_heads} heads of {head_dim} does not fit {cols} columns"
                    ));
                }
                want_ids(inputs[1], rows, "positions")?;
                Ok(vec![TensorType::act(rows, cols)])
            }
            Op::Attention {
                n_heads,
                n_kv_heads,
                head_dim,
                ..
            } => {
                arity(4)?;
                let (rows, qc) = act(0, "attention q")?;
                let (_, kc) = act(1, "attention k")?;
                let (_, vc) = act(2, "attention v")?;
                if qc != n_heads * head_dim || kc != n_kv_heads * head_dim || vc != kc {
                    return err(format!(
                        "attention with {n_heads}/{n_kv_heads} heads of {head_dim} does not fit q {qc}, k {kc}, v {vc}"
                    ));
                }
                if *n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
                    return err(format!(
                        "{n_heads} heads are not a multiple of {n_kv_heads} kv heads"
                    ));
                }
                want_ids(inputs[3], rows, "positions")?;
                Ok(vec![TensorType::act(rows, qc)])
            }
            Op::MlaAttention {
                n_heads,
                nope_dim,
                rope_dim,
                v_dim,
                kv_lora,
                ..
            } => {
                arity(5)?;
                let (h, n, p, v, l) = (*n_heads, *nope_dim, *rope_dim, *v_dim, *kv_lora);
                let (rows, qc) = act(0, "mla q")?;
                let (_, lc) = act(1, "mla latent")?;
                let (_, pc) = act(2, "mla k_rope")?;
                if h == 0
                    || l == 0
                    || v == 0
                    || p % 2 != 0
                    || qc != h * (n + p)
                    || lc != l
                    || pc != p
                {
                    return err(format!(
                        "mla attention with {h} heads of {n}+{p} (values {v}, latent {l}) does not fit q {qc}, latent {lc}, k_rope {pc}"
                    ));
                }
                want_float_weight(inputs[3], "mla kv_b")?;
                if inputs[3].shape.0 != [Dim::Const(h * (n + v)), Dim::Const(l)] {
                    return err(format!(
                        "mla kv_b must be [{}, {l}], got {}",
                        h * (n + v),
                        inputs[3]
                    ));
                }
                want_ids(inputs[4], rows, "positions")?;
                Ok(vec![TensorType::act(rows, h * v)])
            }
            Op::GatherRows => {
                arity(2)?;
                let (_, cols) = act(0, "gather_rows input")?;
                want_ids(inputs[1], Dim::LogitRows, "row indices")?;
                Ok(vec![TensorType::act(Dim::LogitRows, cols)])
            }
            Op::Moe {
                experts,
                top_k,
                routing,
                ..
            } => {
                if inputs.len() != 4 && inputs.len() != 5 {
                    return err(format!("moe takes 4 or 5 operands, got {}", inputs.len()));
                }
                let (rows, c) = act(0, "moe input")?;
                let (e, top_k) = (*experts, *top_k);
                if e == 0 || top_k == 0 || top_k > e {
                    return err(format!("moe picks {top_k} of {e} experts"));
                }
                if let Some(why) = routing.group_error(e, top_k) {
                    return err(format!("moe routing: {why}"));
                }
                let dims = |t: &TensorType| -> Vec<usize> {
                    t.shape
                        .0
                        .iter()
                        .map(|d| d.as_const().unwrap_or(0))
                        .collect()
                };
                want_float_weight(inputs[1], "moe router")?;
                if dims(inputs[1]) != [e, c] {
                    return err(format!("moe router must be [{e}, {c}], got {}", inputs[1]));
                }
                if inputs.len() == 5 {
                    want_vector(inputs[2], e, "moe router bias")?;
                }
                let (gu, down) = (inputs[inputs.len() - 2], inputs[inputs.len() - 1]);
                want_float_weight(gu, "moe gate_up")?;
                want_float_weight(down, "moe down")?;
                let i = match dims(gu).as_slice() {
                    [ge, gi, gc] if *ge == e && *gc == c && *gi > 0 && gi % 2 == 0 => gi / 2,
                    _ => return err(format!("moe gate_up must be [{e}, 2I, {c}], got {gu}")),
                };
                if dims(down) != [e, c, i] {
                    return err(format!("moe down must be [{e}, {c}, {i}], got {down}"));
                }
                Ok(vec![TensorType::act(rows, c)])
            }
            Op::Split { sizes } => {
                arity(1)?;
                let (rows, cols) = act(0, "split input")?;
                if sizes.iter().sum::<usize>() != cols || sizes.contains(&0) {
                    return err(format!("split sizes {sizes:?} do not add up to {cols}"));
                }
                Ok(sizes.iter().map(|&s| TensorType::act(rows, s)).collect())
            }
        }
    }
}

/// Shortest text that parses back to the same `f32`.
pub fn fmt_f32(value: f32) -> String {
    format!("{value:?}")
}
