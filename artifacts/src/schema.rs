//! The plan's schema: the manifest (what the model is, what the plan needs) and the program (the
//! ordered kernel launches the runtime replays at every step).
//!
//! These types are the API boundary between `fdc` and `fdrt`. They are built by explicit
//! conversion from the compiler's graph, never derived from it, so IR refactors cannot change
//! shipped plans. Changing any type here changes the format: bump `FORMAT_VERSION`.
//!
//! Activations are f32 matrices `[rows, cols]` whose rows are `T` (tokens of the step) or `R`
//! (rows whose logits are wanted). They live in one arena planned per token: a buffer of `cols`
//! columns at `offset_cols` occupies elements `[offset_cols * T, (offset_cols + cols) * T)`, so the
//! plan holds for every `T` up to the runtime's token budget.

use ir_types::{CodeFormat, DType, MoeRouting, QuantScheme, Target};
use serde::{Deserialize, Serialize};

/// Section names inside the `.fdp` container.
pub mod section {
    pub const MANIFEST: &str = "manifest";
    pub const PROGRAM: &str = "program";
    pub const CODE: &str = "code";
    pub const TOKENIZER: &str = "tokenizer.json";
    /// A multi-token-prediction module's program ([`super::MtpProgram`]), when the model has one.
    pub const MTP: &str = "mtp";
    /// Weight sections are named `weight:<plan weight name>`.
    pub fn weight(name: &str) -> String {
        format!("weight:{name}")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub model: ModelInfo,
    pub target: Target,
    /// Storage type of matmul and embedding weights (norms and biases stay f32).
    pub weight_dtype: DType,
    pub weights: Vec<WeightInfo>,
    pub tokenizer: Option<TokenizerInfo>,
    pub kv: KvInfo,
    /// RoPE inverse frequencies, `head_dim / 2` values, computed by the compiler in f64.
    pub rope_inv_freq: Vec<f64>,
    pub memory: MemoryPlan,
    /// Generated functions inside the `code` section.
    pub code: Vec<CodeSymbol>,
    pub provenance: Provenance,
}

/// Decodes the manifest section of a file of format `version`. Versions 2 and 3 wrote weights
/// without `quant` (nothing was quantized then); they read through [`ManifestV3`].
pub fn decode_manifest(bytes: &[u8], version: u32) -> Result<Manifest, crate::PlanError> {
    if version >= 4 {
        return crate::codec::decode(section::MANIFEST, bytes);
    }
    let old: ManifestV3 = crate::codec::decode(section::MANIFEST, bytes)?;
    Ok(Manifest {
        model: old.model,
        target: old.target,
        weight_dtype: old.weight_dtype,
        weights: old
            .weights
            .into_iter()
            .map(|w| WeightInfo {
                name: w.name,
                dtype: w.dtype,
                shape: w.shape,
                layout: w.layout,
                quant: None,
            })
            .collect(),
        tokenizer: old.tokenizer,
        kv: old.kv,
        rope_inv_freq: old.rope_inv_freq,
        memory: old.memory,
        code: old.code,
        provenance: old.provenance,
    })
}

/// The manifest of format versions 2 and 3, field for field, kept only to read them.
#[derive(Deserialize)]
struct ManifestV3 {
    model: ModelInfo,
    target: Target,
    weight_dtype: DType,
    weights: Vec<WeightInfoV3>,
    tokenizer: Option<TokenizerInfo>,
    kv: KvInfo,
    rope_inv_freq: Vec<f64>,
    memory: MemoryPlan,
    code: Vec<CodeSymbol>,
    provenance: Provenance,
}

#[derive(Deserialize)]
struct WeightInfoV3 {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    layout: WeightLayout,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// Architecture family as the compiler names it (`llama`, `qwen2`, `qwen3`).
    pub architecture: String,
    /// What the checkpoint said (`LlamaForCausalLM`, `gguf:llama`).
    pub source_architecture: String,
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub max_position_embeddings: u64,
    pub parameter_count: u64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightInfo {
    pub name: String,
    pub dtype: DType,
    /// `[N, K]` for matrices, `[N]` for vectors: the logical shape, whatever the layout.
    pub shape: Vec<u64>,
    /// How the section's elements are ordered.
    pub layout: WeightLayout,
    /// For a quantized weight (`dtype` u8, panel layout): its format and where its scales are.
    pub quant: Option<QuantInfo>,
}

/// A quantized weight (`kernels::cpu::quant`): the section holds the packed codes, then at
/// `scales_offset` the f16 scales, then at `mins_offset` the f16 minimums (asymmetric only), each
/// part starting at a multiple of 64 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantInfo {
    /// The scheme the compiler chose for this weight (it decides the matmul's activations).
    pub scheme: QuantScheme,
    pub codes: CodeFormat,
    /// K elements per scale (K itself for one scale per row).
    pub group: u64,
    pub asymmetric: bool,
    /// Byte offsets inside the weight's section.
    pub scales_offset: u64,
    pub mins_offset: u64,
    /// Whether the codes and scales were copied from the checkpoint's own quantized blocks
    /// (GGUF Q4_0, Q4_1, Q8_0) rather than quantized by the compiler.
    pub from_checkpoint: bool,
}

/// Storage order of a weight section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightLayout {
    /// `w[n, k]` at `n * K + k` (vectors are always row-major).
    RowMajor,
    /// The matmul kernels' panels (`kernels::cpu::PackedLayout`): `ceil(N / panel)` panels of
    /// `panel` rows, the last padded with zero rows, each stored k-major (for each k, the
    /// `panel` values of its rows). The section holds `ceil(N / panel) * panel * K` elements.
    Panels { panel: u32 },
    /// 4-bit symmetric codes of a CUDA plan in the tile layout of the tensor-core matmul
    /// (`kernels::cuda::tiles_from_panels` and `kernels/cuda/quant.cu` say it in full): for each
    /// 16 rows and 64 k, each lane's 16 bytes in the order of the mma's fragments. The scales
    /// follow as in `Panels { panel: 8 }`, and the section has that layout's size.
    QuantTiles,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvInfo {
    pub num_layers: u64,
    /// Heads and width of a cached row: K and V each have `num_kv_heads * head_dim` values per
    /// token and layer; a latent cache (`Program::has_latent_kv`) has one row of `head_dim`
    /// values (`num_kv_heads` 1) and no V.
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub dtype: DType,
    /// K and V (or the latent) of every layer for one token.
    pub bytes_per_token: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// Arena width: the arena holds `arena_cols * T` f32 values.
    pub arena_cols: u64,
    /// Sum of all buffer widths, for the report: what a plan without reuse would need.
    pub unplanned_cols: u64,
    pub buffers: Vec<BufferInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferInfo {
    pub name: String,
    pub offset_cols: u64,
    pub cols: u64,
    /// Steps (indices into the program) of definition and last use.
    pub first_step: u32,
    pub last_step: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CodeSymbol {
    pub name: String,
    pub offset: u64,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub compiler_version: String,
    pub sources: Vec<SourceInfo>,
    /// The compile options that shaped the plan, as `key=value`.
    pub options: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub name: String,
    pub bytes: u64,
    pub blake3: String,
}

// ---- program ------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub steps: Vec<Step>,
    /// Width of the logits output `[R, vocab]`.
    pub logits_cols: u64,
}

/// The program of a multi-token-prediction module (DeepSeek-V3's MTP), section `mtp`: it
/// proposes the token after next for speculative decoding. A pass of it takes each token's
/// successor as its token id, at the token's own position, and the main model's final hidden
/// state of that position, which the runtime copies from `main_hidden` after a pass of the main
/// program to `hidden_in` before a pass of this one. Its attention has a KV slot of its own
/// (`KvInfo::num_layers` counts it). It shares the manifest's weights, code and arena.
/// A plan without the section is a plan without a module; runtimes that do not know the section
/// run the main program as before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MtpProgram {
    pub program: Program,
    /// `[T, C]`: every token's final hidden state (normed), left by the main program.
    pub main_hidden: Act,
    /// `[T, C]`: the hidden states the module reads.
    pub hidden_in: Act,
    /// `[T, C]`: the module's own final hidden state, which takes the place of the main
    /// model's when proposals are chained.
    pub hidden_out: Act,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Registry name of the kernel (`matmul_bf16_avx512`), shown by `fdc inspect`.
    pub kernel: String,
    /// For generated kernels: the index into `Manifest::code`.
    pub code: Option<u32>,
    pub launch: Launch,
}

/// Row count of an activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rows {
    Tokens,
    LogitRows,
}

/// Where an activation lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Buffer {
    /// The arena, at this per-token column offset.
    Arena { offset_cols: u64 },
    /// The logits output `[R, logits_cols]`.
    Logits,
}

/// A `[rows, cols]` f32 matrix view: column `col` onward of a buffer whose rows are `stride` wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Act {
    pub buffer: Buffer,
    pub rows: Rows,
    pub col: u64,
    pub cols: u64,
    pub stride: u64,
}

/// Index into `Manifest::weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightRef(pub u32);

/// One kernel launch. Token ids, positions and logit rows are the step's inputs, supplied by the
/// runtime; everything else is named here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Launch {
    Embedding {
        table: WeightRef,
        out: Act,
    },
    RmsNorm {
        x: Act,
        w: WeightRef,
        eps: f32,
        group: u64,
        out: Act,
    },
    AddRmsNorm {
        x: Act,
        d: Act,
        w: WeightRef,
        eps: f32,
        sum_out: Act,
        normed_out: Act,
    },
    MatMul {
        x: Act,
        w: WeightRef,
        bias: Option<WeightRef>,
        out: Act,
    },
    Add {
        a: Act,
        b: Act,
        out: Act,
    },
    Mul {
        a: Act,
        b: Act,
        out: Act,
    },
    Silu {
        x: Act,
        out: Act,
    },
    SiluMul {
        gu: Act,
        out: Act,
    },
    Rope {
        x: Act,
        n_heads: u64,
        head_dim: u64,
        out: Act,
    },
    Attention {
        q: Act,
        k: Act,
        v: Act,
        layer: u64,
        n_heads: u64,
        n_kv_heads: u64,
        head_dim: u64,
        scale: f32,
        out: Act,
    },
    GatherRows {
        x: Act,
        out: Act,
    },
    /// Mixture of experts, `out[T, C]` from `x[T, C]`: route each token to its `top_k` experts,
    /// run their SwiGLU MLPs and sum them weighted. `gate_up` `[E, 2I, C]` and `down`
    /// `[E, C, I]` are stacked row-major, one contiguous block per expert; `bias` (`[E]`) only
    /// selects experts.
    Moe {
        x: Act,
        router: WeightRef,
        bias: Option<WeightRef>,
        gate_up: WeightRef,
        down: WeightRef,
        experts: u64,
        top_k: u64,
        routing: MoeRouting,
        normalize: bool,
        scaling: f32,
        out: Act,
    },
    /// Multi-head latent attention, `out[T, H*V]`: rotates the rope parts of `q` (`[T, H*(N+P)]`)
    /// and `k_rope` (`[T, P]`), appends `[latent | k_rope]` (`L + P` values) to layer `layer` of
    /// the KV cache, which then holds that row per position instead of keys and values, and
    /// attends with `kv_b` (`[H*(N+V), L]`, row-major) absorbed (the IR's `mla_attention` op).
    MlaAttention {
        q: Act,
        latent: Act,
        k_rope: Act,
        kv_b: WeightRef,
        layer: u64,
        n_heads: u64,
        nope_dim: u64,
        rope_dim: u64,
        v_dim: u64,
        kv_lora: u64,
        scale: f32,
        rope_interleaved: bool,
        out: Act,
    },
    /// `Attention` whose `q` and `k` arrive unrotated: the kernel applies rotate-half RoPE (the
    /// runtime's tables) to k as it writes the cache and to q as it loads it (the IR's
    /// `attention` with `rope`; CUDA plans). Appended last so older programs still decode.
    AttentionRope {
        q: Act,
        k: Act,
        v: Act,
        layer: u64,
        n_heads: u64,
        n_kv_heads: u64,
        head_dim: u64,
        scale: f32,
        out: Act,
    },
}

impl Launch {
    /// (activations read, activations written, weights used) of a launch.
    pub fn operands(&self) -> (Vec<Act>, Vec<Act>, Vec<WeightRef>) {
        match *self {
            Launch::Embedding { table, out } => (vec![], vec![out], vec![table]),
            Launch::RmsNorm { x, w, out, .. } => (vec![x], vec![out], vec![w]),
            Launch::AddRmsNorm {
                x,
                d,
                w,
                sum_out,
                normed_out,
                ..
            } => (vec![x, d], vec![sum_out, normed_out], vec![w]),
            Launch::MatMul { x, w, bias, out } => (
                vec![x],
                vec![out],
                [Some(w), bias].into_iter().flatten().collect(),
            ),
            Launch::Add { a, b, out } | Launch::Mul { a, b, out } => {
                (vec![a, b], vec![out], vec![])
            }
            Launch::Silu { x, out }
            | Launch::Rope { x, out, .. }
            | Launch::GatherRows { x, out } => (vec![x], vec![out], vec![]),
            Launch::SiluMul { gu, out } => (vec![gu], vec![out], vec![]),
            Launch::Attention { q, k, v, out, .. } | Launch::AttentionRope { q, k, v, out, .. } => {
                (vec![q, k, v], vec![out], vec![])
            }
            Launch::MlaAttention {
                q,
                latent,
                k_rope,
                kv_b,
                out,
                ..
            } => (vec![q, latent, k_rope], vec![out], vec![kv_b]),
            Launch::Moe {
                x,
                router,
                bias,
                gate_up,
                down,
                out,
                ..
            } => (
                vec![x],
                vec![out],
                [Some(router), bias, Some(gate_up), Some(down)]
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
        }
    }
}
impl Act {
    /// Whether two views share any of a token row's columns, for any number of rows: the
    /// arena's regions by their per-token column ranges; the logits with themselves.
    pub fn overlaps(&self, other: &Act) -> bool {
        match (self.buffer, other.buffer) {
            (Buffer::Arena { offset_cols: x }, Buffer::Arena { offset_cols: y }) => {
                x < y + other.stride && y < x + self.stride
            }
            (Buffer::Logits, Buffer::Logits) => true,
            _ => false,
        }
    }
}

impl Program {
    /// The KV cache holds one latent row per position and layer (multi-head latent attention)
    /// rather than keys and values: its layers are attended by `MlaAttention` launches.
    pub fn has_latent_kv(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.launch, Launch::MlaAttention { .. }))
    }
}
