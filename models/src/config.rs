//! Model hyperparameters: `ModelConfig`, the architecture it describes, and its rotary embedding
//! (`RopeConfig`, including HF's `llama3` frequency scaling). Parses an HF `config.json` in both
//! the older (`rope_theta` + `rope_scaling`) and the transformers 5 (`rope_parameters`) styles;
//! the GGUF reader fills the same struct from its metadata.

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::ModelError;

/// A supported decoder-only architecture family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    /// Qwen3 with mixture-of-experts MLPs (`Qwen3MoeForCausalLM`).
    Qwen3Moe,
    Mixtral,
    /// ERNIE 4.5 with mixture-of-experts MLPs and shared experts (`Ernie4_5_MoeForCausalLM`).
    Ernie45Moe,
    /// DeepSeek-V3: multi-head latent attention and group-limited sigmoid-routed experts
    /// (`DeepseekV3ForCausalLM`).
    DeepseekV3,
}

impl Architecture {
    pub const ALL: [Architecture; 7] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Qwen3Moe,
        Architecture::Mixtral,
        Architecture::Ernie45Moe,
        Architecture::DeepseekV3,
    ];

    /// The families read from GGUF files (the mixture-of-experts ones are read from HF
    /// directories only).
    pub const GGUF: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    /// Short lowercase name: "llama", "qwen2", "qwen3".
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Mixtral => "mixtral",
            Architecture::Ernie45Moe => "ernie4_5_moe",
            Architecture::DeepseekV3 => "deepseek_v3",
        }
    }

    /// The transformers class a checkpoint of this family names in `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Ernie45Moe => "Ernie4_5_MoeForCausalLM",
            Architecture::DeepseekV3 => "DeepseekV3ForCausalLM",
        }
    }

    pub fn from_hf_class(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_class() == class)
    }

    /// From a config's `model_type` (used when `architectures` is absent).
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" | "smollm" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            "qwen3" => Some(Architecture::Qwen3),
            "qwen3_moe" => Some(Architecture::Qwen3Moe),
            "mixtral" => Some(Architecture::Mixtral),
            "ernie4_5_moe" => Some(Architecture::Ernie45Moe),
            "deepseek_v3" => Some(Architecture::DeepseekV3),
            _ => None,
        }
    }

    /// From GGUF's `general.architecture`.
    pub fn from_gguf(arch: &str) -> Option<Self> {
        Self::GGUF.into_iter().find(|a| a.name() == arch)
    }

    /// "LlamaForCausalLM, Qwen2ForCausalLM, ...", for error messages.
    pub fn supported_hf_classes() -> String {
        Self::ALL.map(Architecture::hf_class).join(", ")
    }

    /// "llama, qwen2, qwen3", for error messages about GGUF files.
    pub fn supported_names() -> String {
        Self::GGUF.map(Architecture::name).join(", ")
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently, every frequency divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's band-wise scaling: long wavelengths divided by `factor`, short ones kept,
    /// a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (DeepSeek-V3, Qwen2.5 long context): frequencies that turn fewer than `beta_slow`
    /// times over the original context divided by `factor`, those that turn more than
    /// `beta_fast` times kept, a linear ramp over the dimensions between; and the rotated
    /// vectors multiplied by an attention factor (see [`RopeConfig::attention_factor`]).
    Yarn(Yarn),
}

/// The parameters of YaRN scaling, as HF's `rope_parameters` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// 0 when absent. With `mscale_all_dim` it sets the default attention factor; DeepSeek-V3's
    /// attention also multiplies its softmax scale by `mscale(factor, mscale_all_dim)^2`.
    pub mscale: f64,
    pub mscale_all_dim: f64,
    /// An explicit attention factor, overriding the one derived from `factor` and the mscales.
    pub attention_factor: Option<f64>,
    /// The correction range's ends are rounded outwards to whole dimensions (HF's default).
    pub truncate: bool,
}

/// YaRN's magnitude correction for a context stretched by `scale`.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Inverse frequencies with HF semantics (including `llama3` and `yarn` scaling), computed
    /// in f64, length `head_dim / 2`: entry i rotates the pair (i, i + head_dim/2) (rotate-half).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let dim = head_dim as f64;
        let yarn_ramp = match self.scaling {
            RopeScaling::Yarn(yarn) => Some(yarn.correction_range(self.theta, head_dim)),
            _ => None,
        };
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / self.theta.powf((2 * i) as f64 / dim);
                match self.scaling {
                    RopeScaling::None => freq,
                    RopeScaling::Yarn(yarn) => {
                        let (low, high) = yarn_ramp.unwrap_or((0.0, 0.0));
                        // HF widens an empty range to avoid dividing by zero.
                        let high = if low == high { high + 0.001 } else { high };
                        // 0 keeps the frequency (extrapolation), 1 divides it (interpolation).
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        freq / yarn.factor * ramp + freq * (1.0 - ramp)
                    }
                    RopeScaling::Linear { factor } => freq / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: original,
                    } => {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < original / high_freq_factor {
                            freq
                        } else if wavelen > original / low_freq_factor {
                            freq / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    }
                }
            })
            .collect()
    }

    /// What HF multiplies the rotary cos and sin tables by, so every rotated q and k: YaRN's
    /// attention factor (an explicit `attention_factor`, else `mscale(factor, mscale) /
    /// mscale(factor, mscale_all_dim)` when both are given, else `mscale(factor, 1)`); 1 for
    /// the other scalings.
    pub fn attention_factor(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn(yarn) => match yarn.attention_factor {
                Some(f) => f,
                None if yarn.mscale != 0.0 && yarn.mscale_all_dim != 0.0 => {
                    yarn_mscale(yarn.factor, yarn.mscale)
                        / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
                }
                None => yarn_mscale(yarn.factor, 1.0),
            },
            _ => 1.0,
        }
    }

    /// What DeepSeek-V3's attention multiplies its softmax scale by under YaRN with a
    /// nonzero `mscale_all_dim`: `mscale(factor, mscale_all_dim)^2`; 1 otherwise.
    pub fn latent_attention_mscale(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn(yarn) if yarn.mscale_all_dim != 0.0 => {
                yarn_mscale(yarn.factor, yarn.mscale_all_dim).powi(2)
            }
            _ => 1.0,
        }
    }
}

impl Yarn {
    /// The dimension range `(low, high)` over which YaRN's ramp goes from keeping frequencies
    /// to dividing them: where a frequency turns `beta_fast`, then `beta_slow` times over the
    /// original context.
    fn correction_range(&self, theta: f64, head_dim: usize) -> (f64, f64) {
        let dim = head_dim as f64;
        let original = self.original_max_position_embeddings;
        let dim_of = |rotations: f64| {
            dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (dim_of(self.beta_fast), dim_of(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        (low.max(0.0), high.min(dim - 1.0))
    }
}

/// The mixture-of-experts part of a config: which layers are sparse and how they route.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts per sparse layer.
    pub num_experts: usize,
    /// Experts each token is routed to (top-k).
    pub num_experts_per_tok: usize,
    /// Routing weights of the picked experts are divided by their sum.
    pub norm_topk_prob: bool,
    /// Intermediate size of one routed expert.
    pub moe_intermediate_size: usize,
    /// Per layer: sparse (experts) or dense (the ordinary MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
    pub routing: ir::MoeRouting,
    /// The router has a per-expert bias added to the scores for selection only
    /// (ERNIE's `moe_statics.e_score_correction_bias`).
    pub score_correction_bias: bool,
    /// Shared experts, run on every token beside the routed ones, as one dense MLP of
    /// `shared_intermediate_size` (0 when there are none).
    pub num_shared_experts: usize,
    pub shared_intermediate_size: usize,
    /// Multiplies the routing weights.
    pub routed_scaling_factor: f64,
}

/// Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank
/// bottleneck, keys and values up-projected from one shared latent per token, and a separate
/// rope part of every query and key head.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query bottleneck (`q_a_proj`, `q_a_layernorm`, `q_b_proj`); `None`: a plain
    /// `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Width of the cached latent.
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// RoPE rotates pairs `(2i, 2i + 1)` of the rope parts.
    pub rope_interleave: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// What the checkpoint said: "LlamaForCausalLM", or "gguf:llama".
    pub source_architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Explicit `head_dim` when the checkpoint gives one (Qwen3), else hidden / heads.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (always for Qwen2).
    pub attention_bias: bool,
    /// Per-head RMSNorm on q and k before rope (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Mixture-of-experts layers, for the MoE families.
    pub moe: Option<MoeConfig>,
    /// Multi-head latent attention, for DeepSeek-V3 (whose `head_dim` is then the rope part's).
    pub mla: Option<MlaConfig>,
    /// Multi-token-prediction modules after the layers (DeepSeek-V3's
    /// `num_nextn_predict_layers`), for speculative decoding; `None` when the config has none.
    pub mtp: Option<MtpConfig>,
}

/// DeepSeek-V3's multi-token prediction: `layers` modules stored as decoder layers
/// `num_hidden_layers..num_hidden_layers + layers`, each a full decoder layer behind a projection
/// of the next token's embedding and the previous hidden state (`models::arch::decoder`).
#[derive(Debug, Clone, PartialEq)]
pub struct MtpConfig {
    pub layers: usize,
    /// The modules' MLPs are mixtures of experts (their layer index is past
    /// `first_k_dense_replace`), as the sparse layers of the model are.
    pub sparse: bool,
}

impl ModelConfig {
    /// Reads and parses an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parses the text of an HF `config.json`; `file` only names it in errors.
    pub fn from_hf_json(text: &str, file: &Path) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ModelError::Json {
            file: file.to_path_buf(),
            source,
        })?;
        let Some(obj) = value.as_object() else {
            return Err(invalid(file, "(top level)", "expected a JSON object"));
        };
        let fields = Fields { obj, file };

        let (architecture, source_architecture) = fields.architecture()?;
        let defaults = HfDefaults::of(architecture);

        let hidden_size = fields.usize("hidden_size")?.unwrap_or(defaults.hidden_size);
        let num_attention_heads = fields
            .usize("num_attention_heads")?
            .unwrap_or(defaults.num_attention_heads);
        // HF: a missing (or null) num_key_value_heads means multi-head attention.
        let num_key_value_heads = fields
            .usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let mla = fields.mla(architecture)?;
        let head_dim = match fields.usize("head_dim")? {
            // Rope runs on the rope part of each head only: its width is the rope head dim.
            _ if mla.is_some() => mla.as_ref().map_or(0, |m| m.qk_rope_head_dim),
            Some(d) => d,
            None => match defaults.head_dim {
                Some(d) => d,
                None => {
                    if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                        return Err(invalid(
                            file,
                            "hidden_size",
                            &format!(
                                "{hidden_size} is not a multiple of num_attention_heads {num_attention_heads} and no head_dim is given"
                            ),
                        ));
                    }
                    hidden_size / num_attention_heads
                }
            },
        };

        let attention_bias = match architecture {
            // Qwen2's attention always has q/k/v biases; its config has no switch for them.
            Architecture::Qwen2 => true,
            Architecture::Llama
            | Architecture::Qwen3
            | Architecture::Qwen3Moe
            | Architecture::Mixtral
            | Architecture::DeepseekV3 => fields.bool("attention_bias")?.unwrap_or(false),
            Architecture::Ernie45Moe => fields.bool("use_bias")?.unwrap_or(false),
        };

        let bos_token_id = match obj.get("bos_token_id") {
            None => defaults.bos_token_id,
            Some(v) => fields.token_ids("bos_token_id", v)?.first().copied(),
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            None => defaults.eos_token_id.into_iter().collect(),
            Some(v) => fields.token_ids("eos_token_id", v)?,
        };

        let num_hidden_layers = fields
            .usize("num_hidden_layers")?
            .unwrap_or(defaults.num_hidden_layers);
        // Per-layer tables are sized from this before `validate` runs.
        check_layer_count(num_hidden_layers, file)?;
        let intermediate_size = fields
            .usize("intermediate_size")?
            .unwrap_or(defaults.intermediate_size);
        let moe = fields.moe(architecture, num_hidden_layers, intermediate_size)?;
        let max_position_embeddings = fields
            .usize("max_position_embeddings")?
            .unwrap_or(defaults.max_position_embeddings);
        // Read before the sliding window caps the context: HF's YaRN and llama3 scaling default
        // their original context to the configured one.
        let rope = fields.rope(defaults.rope_theta, max_position_embeddings)?;
        // Sliding-window attention (Mistral, some Mixtral and Qwen2 configs) sees only the last
        // `sliding_window` positions. Up to the window it is plain causal attention, so capping
        // the context at the window serves such a model exactly (and longer sequences are
        // refused rather than computed wrongly). `use_sliding_window: false` switches it off.
        let sliding_window = match fields.bool("use_sliding_window")? {
            Some(false) => None,
            _ => fields.usize("sliding_window")?.filter(|&w| w > 0),
        };
        let max_position_embeddings = match sliding_window {
            Some(window) => window.min(max_position_embeddings),
            None => max_position_embeddings,
        };
        let config = ModelConfig {
            architecture,
            source_architecture,
            vocab_size: fields.usize("vocab_size")?.unwrap_or(defaults.vocab_size),
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: fields.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope,
            max_position_embeddings,
            tie_word_embeddings: fields.bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Qwen3Moe),
            bos_token_id,
            eos_token_ids,
            mtp: fields.mtp(architecture, num_hidden_layers, moe.is_some())?,
            moe,
            mla,
        };
        config.validate(file)?;
        Ok(config)
    }

    /// Checks the invariants graph builders rely on; `file` names the source in errors.
    pub(crate) fn validate(&self, file: &Path) -> Result<(), ModelError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(file, field, "must be positive"));
            }
        }
        check_layer_count(self.num_hidden_layers, file)?;
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(invalid(
                file,
                "num_key_value_heads",
                &format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(invalid(
                file,
                "head_dim",
                &format!("{} is odd; rotary embedding needs pairs", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid(file, "rms_norm_eps", "must be a positive number"));
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 0.0) {
            return Err(invalid(file, "rope_theta", "must be a positive number"));
        }
        match self.rope.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(invalid(file, "rope factor", "must be a positive number"));
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let all_positive = [
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                ]
                .iter()
                .all(|v| v.is_finite() && *v > 0.0);
                if !all_positive || high_freq_factor <= low_freq_factor {
                    return Err(invalid(
                        file,
                        "rope llama3 scaling",
                        "factors must be positive with high_freq_factor > low_freq_factor",
                    ));
                }
            }
            RopeScaling::Yarn(yarn) => {
                let positive = [
                    yarn.factor,
                    yarn.original_max_position_embeddings,
                    yarn.beta_fast,
                    yarn.beta_slow,
                ]
                .iter()
                .all(|v| v.is_finite() && *v > 0.0);
                let finite = [yarn.mscale, yarn.mscale_all_dim]
                    .iter()
                    .chain(&yarn.attention_factor)
                    .all(|v| v.is_finite());
                if !positive || !finite {
                    return Err(invalid(
                        file,
                        "rope yarn scaling",
                        "factor, original_max_position_embeddings, beta_fast and beta_slow must be positive, mscale, mscale_all_dim and attention_factor finite",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Far above any published model (DeepSeek-V3 has 61 layers, Llama-3.1-405B 126); a bound so
/// that a corrupt count is an error rather than a huge allocation.
const MAX_HIDDEN_LAYERS: usize = 1 << 14;

fn check_layer_count(layers: usize, file: &Path) -> Result<(), ModelError> {
    if layers > MAX_HIDDEN_LAYERS {
        return Err(invalid(
            file,
            "num_hidden_layers",
            &format!("{layers} is more than the {MAX_HIDDEN_LAYERS} layers a model may have"),
        ));
    }
    Ok(())
}

fn invalid(file: &Path, field: &str, reason: &str) -> ModelError {
    ModelError::InvalidConfig {
        file: file.to_path_buf(),
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// transformers' defaults for fields a config may leave out (the config classes' constructor
/// defaults), so a sparse config means what it means to HF.
struct HfDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    /// The config class's `default_theta`, used when neither `rope_theta` nor
    /// `rope_parameters.rope_theta` is given.
    rope_theta: f64,
}

impl HfDefaults {
    fn of(architecture: Architecture) -> Self {
        match architecture {
            Architecture::Llama => HfDefaults {
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 11008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                head_dim: None,
                max_position_embeddings: 2048,
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                rope_theta: 10000.0,
            },
            Architecture::Qwen3Moe => HfDefaults {
                vocab_size: 151936,
                hidden_size: 2048,
                intermediate_size: 6144,
                num_hidden_layers: 24,
                num_attention_heads: 32,
                head_dim: None,
                max_position_embeddings: 32768,
                bos_token_id: None,
                eos_token_id: None,
                rope_theta: 10000.0,
            },
            Architecture::Mixtral => HfDefaults {
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                head_dim: None,
                max_position_embeddings: 4096 * 32,
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                rope_theta: 1e6,
            },
            Architecture::Ernie45Moe => HfDefaults {
                vocab_size: 103424,
                hidden_size: 2560,
                intermediate_size: 12288,
                num_hidden_layers: 28,
                num_attention_heads: 20,
                head_dim: None,
                max_position_embeddings: 131072,
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                rope_theta: 500000.0,
            },
            Architecture::DeepseekV3 => HfDefaults {
                vocab_size: 129280,
                hidden_size: 7168,
                intermediate_size: 18432,
                num_hidden_layers: 61,
                num_attention_heads: 128,
                head_dim: None,
                max_position_embeddings: 4096,
                bos_token_id: Some(0),
                eos_token_id: Some(1),
                rope_theta: 10000.0,
            },
            Architecture::Qwen2 | Architecture::Qwen3 => HfDefaults {
                vocab_size: 151936,
                hidden_size: 4096,
                intermediate_size: 22016,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                head_dim: (architecture == Architecture::Qwen3).then_some(128),
                max_position_embeddings: 32768,
                bos_token_id: None,
                eos_token_id: None,
                rope_theta: 10000.0,
            },
        }
    }
}

/// Typed access to a JSON object's fields with errors that name the file and field.
/// A field that is present but `null` reads as absent, as it does in transformers.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a Path,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.get(key)
            .map(|v| json_usize(v).ok_or_else(|| self.wrong(key, v, "a non-negative integer")))
            .transpose()
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(key, v, "a number")))
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.wrong(key, v, "true or false"))
            })
            .transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.wrong(key, v, "a string")))
            .transpose()
    }

    fn wrong(&self, key: &str, found: &Value, expected: &str) -> ModelError {
        let mut shown = found.to_string();
        if shown.len() > 60 {
            // Cut on a character boundary: the value may hold any text.
            let cut = (0..=57)
                .rev()
                .find(|&i| shown.is_char_boundary(i))
                .unwrap_or(0);
            shown.truncate(cut);
            shown.push_str("...");
        }
        invalid(
            self.file,
            key,
            &format!("expected {expected}, found {shown}"),
        )
    }

    /// A token id field: an integer, a list of integers, or null (none).
    fn token_ids(&self, key: &str, value: &Value) -> Result<Vec<u32>, ModelError> {
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| self.wrong(key, value, "a token id or a list of token ids"))
        };
        match value {
            Value::Null => Ok(Vec::new()),
            Value::Array(items) => items.iter().map(one).collect(),
            v => Ok(vec![one(v)?]),
        }
    }

    fn architecture(&self) -> Result<(Architecture, String), ModelError> {
        if let Some(list) = self.get("architectures") {
            let found = list
                .as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .ok_or_else(|| self.wrong("architectures", list, "a list of class names"))?;
            return Architecture::from_hf_class(found)
                .map(|a| (a, found.to_string()))
                .ok_or_else(|| ModelError::UnsupportedArchitecture {
                    found: found.to_string(),
                    supported: Architecture::supported_hf_classes(),
                });
        }
        match self.str("model_type")? {
            Some(model_type) => Architecture::from_model_type(model_type)
                .map(|a| (a, model_type.to_string()))
                .ok_or_else(|| ModelError::UnsupportedArchitecture {
                    found: format!("model_type {model_type}"),
                    supported: Architecture::supported_hf_classes(),
                }),
            None => Err(invalid(
                self.file,
                "architectures",
                "missing, and no model_type either",
            )),
        }
    }

    /// An integer that may be negative (`moe_layer_end_index: -1`).
    fn i64(&self, key: &str) -> Result<Option<i64>, ModelError> {
        self.get(key)
            .map(|v| v.as_i64().ok_or_else(|| self.wrong(key, v, "an integer")))
            .transpose()
    }

    /// The shared experts' intermediate size, `shared` experts of `moe_intermediate_size`
    /// each, refused when it does not fit a `usize` (a corrupt config, not an overflow).
    fn shared_width(
        &self,
        shared: usize,
        moe_intermediate_size: usize,
    ) -> Result<usize, ModelError> {
        shared.checked_mul(moe_intermediate_size).ok_or_else(|| {
            invalid(
                self.file,
                "moe_intermediate_size",
                &format!("{shared} shared experts of {moe_intermediate_size} do not fit a size"),
            )
        })
    }

    /// A list of layer indices (`mlp_only_layers`).
    fn usize_list(&self, key: &str) -> Result<Vec<usize>, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(vec![]);
        };
        v.as_array()
            .and_then(|items| items.iter().map(json_usize).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.wrong(key, v, "a list of layer indices"))
    }

    /// The mixture-of-experts description of the MoE families, with transformers' defaults
    /// for absent fields; `None` for the dense families.
    fn moe(
        &self,
        architecture: Architecture,
        layers: usize,
        intermediate_size: usize,
    ) -> Result<Option<MoeConfig>, ModelError> {
        let usize_or = |key: &str, default: usize| -> Result<usize, ModelError> {
            Ok(self.usize(key)?.unwrap_or(default))
        };
        let moe = match architecture {
            Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => return Ok(None),
            Architecture::DeepseekV3 => {
                let num_experts = usize_or("n_routed_experts", 256)?;
                let moe_intermediate_size = usize_or("moe_intermediate_size", 2048)?;
                let shared = usize_or("n_shared_experts", 1)?;
                let first_dense = usize_or("first_k_dense_replace", 3)?;
                let groups = usize_or("n_group", 8)?;
                let top_groups = usize_or("topk_group", 4)?;
                let group_count = |key: &str, n: usize| {
                    u32::try_from(n).map_err(|_| invalid(self.file, key, "is too large"))
                };
                let routing = if groups > 1 {
                    ir::MoeRouting::SigmoidGrouped {
                        groups: group_count("n_group", groups)?,
                        top_groups: group_count("topk_group", top_groups)?,
                    }
                } else {
                    ir::MoeRouting::Sigmoid
                };
                let top_k = usize_or("num_experts_per_tok", 8)?;
                if let Some(why) = routing.group_error(num_experts, top_k) {
                    return Err(invalid(self.file, "n_group", &why));
                }
                MoeConfig {
                    num_experts,
                    num_experts_per_tok: top_k,
                    norm_topk_prob: self.bool("norm_topk_prob")?.unwrap_or(true),
                    moe_intermediate_size,
                    sparse_layers: (0..layers).map(|l| l >= first_dense).collect(),
                    routing,
                    score_correction_bias: true,
                    num_shared_experts: shared,
                    shared_intermediate_size: self.shared_width(shared, moe_intermediate_size)?,
                    routed_scaling_factor: self.f64("routed_scaling_factor")?.unwrap_or(2.5),
                }
            }
            Architecture::Qwen3Moe => {
                // transformers 5 writes `num_local_experts`, older configs `num_experts`.
                let num_experts = match self.usize("num_experts")? {
                    Some(n) => n,
                    None => usize_or("num_local_experts", 128)?,
                };
                let step = usize_or("decoder_sparse_step", 1)?;
                let dense = self.usize_list("mlp_only_layers")?;
                MoeConfig {
                    num_experts,
                    num_experts_per_tok: usize_or("num_experts_per_tok", 8)?,
                    norm_topk_prob: self.bool("norm_topk_prob")?.unwrap_or(false),
                    moe_intermediate_size: usize_or("moe_intermediate_size", 768)?,
                    sparse_layers: (0..layers)
                        .map(|l| {
                            !dense.contains(&l)
                                && num_experts > 0
                                && step > 0
                                && (l + 1) % step == 0
                        })
                        .collect(),
                    routing: ir::MoeRouting::Softmax,
                    score_correction_bias: false,
                    num_shared_experts: 0,
                    shared_intermediate_size: 0,
                    routed_scaling_factor: 1.0,
                }
            }
            Architecture::Mixtral => MoeConfig {
                num_experts: usize_or("num_local_experts", 8)?,
                num_experts_per_tok: usize_or("num_experts_per_tok", 2)?,
                norm_topk_prob: true,
                moe_intermediate_size: intermediate_size,
                sparse_layers: vec![true; layers],
                routing: ir::MoeRouting::Softmax,
                score_correction_bias: false,
                num_shared_experts: 0,
                shared_intermediate_size: 0,
                routed_scaling_factor: 1.0,
            },
            Architecture::Ernie45Moe => {
                let moe_intermediate_size = usize_or("moe_intermediate_size", 1536)?;
                let shared = usize_or("moe_num_shared_experts", 2)?;
                let start = self.i64("moe_layer_start_index")?.unwrap_or(1);
                // HF: an end index of -1 means the last layer.
                let end = match self.i64("moe_layer_end_index")?.unwrap_or(-1) {
                    -1 => layers as i64 - 1,
                    e => e,
                };
                let interval = self.i64("moe_layer_interval")?.unwrap_or(1);
                if interval <= 0 {
                    return Err(invalid(self.file, "moe_layer_interval", "must be positive"));
                }
                MoeConfig {
                    num_experts: usize_or("moe_num_experts", 64)?,
                    num_experts_per_tok: usize_or("moe_k", 6)?,
                    norm_topk_prob: true,
                    moe_intermediate_size,
                    sparse_layers: (0..layers as i64)
                        .map(|l| (l + 1) % interval == 0 && l >= start && l <= end)
                        .collect(),
                    routing: ir::MoeRouting::Softmax,
                    score_correction_bias: true,
                    num_shared_experts: shared,
                    shared_intermediate_size: self.shared_width(shared, moe_intermediate_size)?,
                    routed_scaling_factor: 1.0,
                }
            }
        };
        if moe.num_experts == 0
            || moe.num_experts_per_tok == 0
            || moe.num_experts_per_tok > moe.num_experts
        {
            return Err(invalid(
                self.file,
                "num_experts_per_tok",
                &format!(
                    "{} experts per token of {} experts",
                    moe.num_experts_per_tok, moe.num_experts
                ),
            ));
        }
        if moe.moe_intermediate_size == 0 {
            return Err(invalid(
                self.file,
                "moe_intermediate_size",
                "must be positive",
            ));
        }
        Ok(Some(moe))
    }

    /// DeepSeek-V3's multi-token-prediction modules; `None` for the other families and when
    /// `num_nextn_predict_layers` is absent or 0.
    fn mtp(
        &self,
        architecture: Architecture,
        layers: usize,
        has_moe: bool,
    ) -> Result<Option<MtpConfig>, ModelError> {
        if architecture != Architecture::DeepseekV3 {
            return Ok(None);
        }
        let count = self.usize("num_nextn_predict_layers")?.unwrap_or(0);
        if count == 0 {
            return Ok(None);
        }
        check_layer_count(layers + count, self.file)?;
        let first_dense = self.usize("first_k_dense_replace")?.unwrap_or(3);
        Ok(Some(MtpConfig {
            layers: count,
            sparse: has_moe && layers >= first_dense,
        }))
    }

    /// The multi-head latent attention of DeepSeek-V3, with transformers' defaults; `None` for
    /// the other families.
    fn mla(&self, architecture: Architecture) -> Result<Option<MlaConfig>, ModelError> {
        if architecture != Architecture::DeepseekV3 {
            return Ok(None);
        }
        let usize_or = |key: &str, default: usize| -> Result<usize, ModelError> {
            Ok(self.usize(key)?.unwrap_or(default))
        };
        // An explicit null means no query bottleneck; an absent field takes the default.
        let q_lora_rank = match self.obj.get("q_lora_rank") {
            Some(Value::Null) => None,
            _ => Some(usize_or("q_lora_rank", 1536)?),
        };
        let mla = MlaConfig {
            q_lora_rank,
            kv_lora_rank: usize_or("kv_lora_rank", 512)?,
            qk_nope_head_dim: usize_or("qk_nope_head_dim", 128)?,
            qk_rope_head_dim: usize_or("qk_rope_head_dim", 64)?,
            v_head_dim: usize_or("v_head_dim", 128)?,
            rope_interleave: self.bool("rope_interleave")?.unwrap_or(true),
        };
        for (field, value) in [
            ("q_lora_rank", mla.q_lora_rank.unwrap_or(1)),
            ("kv_lora_rank", mla.kv_lora_rank),
            ("qk_rope_head_dim", mla.qk_rope_head_dim),
            ("v_head_dim", mla.v_head_dim),
        ] {
            if value == 0 {
                return Err(invalid(self.file, field, "must be positive"));
            }
        }
        Ok(Some(mla))
    }

    /// Rope from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older),
    /// with HF's defaults: `default_theta` for a missing theta, the configured context
    /// (`max_position_embeddings`) for a missing original context.
    fn rope(
        &self,
        default_theta: f64,
        max_position_embeddings: usize,
    ) -> Result<RopeConfig, ModelError> {
        let nested = |key: &str| -> Result<Option<&Map<String, Value>>, ModelError> {
            self.get(key)
                .map(|v| v.as_object().ok_or_else(|| self.wrong(key, v, "an object")))
                .transpose()
        };
        let parameters = nested("rope_parameters")?;
        let scaling = match parameters {
            Some(p) => Some(p),
            None => nested("rope_scaling")?,
        };
        let theta = match parameters.map(|p| Fields {
            obj: p,
            file: self.file,
        }) {
            Some(p) if p.get("rope_theta").is_some() => p.f64("rope_theta")?,
            _ => self.f64("rope_theta")?,
        }
        .unwrap_or(default_theta);

        let Some(scaling) = scaling else {
            return Ok(RopeConfig {
                theta,
                scaling: RopeScaling::None,
            });
        };
        let s = Fields {
            obj: scaling,
            file: self.file,
        };
        let rope_type = match s.str("rope_type")? {
            Some(t) => Some(t),
            None => s.str("type")?,
        }
        .unwrap_or("default");
        let required = |key: &str| -> Result<f64, ModelError> {
            s.f64(key)?.ok_or_else(|| {
                invalid(
                    self.file,
                    key,
                    &format!("required by rope type {rope_type}"),
                )
            })
        };
        // HF: a top-level `original_max_position_embeddings` (Phi-3 style) wins over the one in
        // the rope parameters; without either, the configured context is the original one.
        let original = || -> Result<f64, ModelError> {
            Ok(match self.f64("original_max_position_embeddings")? {
                Some(v) => v,
                None => s
                    .f64("original_max_position_embeddings")?
                    .unwrap_or(max_position_embeddings as f64),
            })
        };
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: original()?,
            },
            "yarn" => RopeScaling::Yarn(Yarn {
                factor: required("factor")?,
                original_max_position_embeddings: original()?,
                // HF reads these with `or`: 0 and null both take the default.
                beta_fast: s.f64("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: s.f64("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                mscale: s.f64("mscale")?.unwrap_or(0.0),
                mscale_all_dim: s.f64("mscale_all_dim")?.unwrap_or(0.0),
                attention_factor: s.f64("attention_factor")?,
                truncate: s.bool("truncate")?.unwrap_or(true),
            }),
            other => {
                return Err(ModelError::UnsupportedRope {
                    file: self.file.to_path_buf(),
                    rope_type: other.to_string(),
                })
            }
        };
        Ok(RopeConfig { theta, scaling })
    }
}

/// A non-negative integer, also accepting an integral float such as `64.0` (some exporters
/// write every number as a float).
fn json_usize(v: &Value) -> Option<usize> {
    if let Some(n) = v.as_u64() {
        return usize::try_from(n).ok();
    }
    let f = v.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f <= u32::MAX as f64).then_some(f as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn golden_config(arch: &str) -> PathBuf {
        crate::testing::workspace_root()
            .join("tests/golden/tiny")
            .join(arch)
            .join("config.json")
    }

    fn parse(text: &str) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_hf_json(text, Path::new("config.json"))
    }

    #[test]
    fn tiny_moe_configs_parse_their_expert_fields() {
        let read = |arch: &str| ModelConfig::from_hf_file(&golden_config(arch)).unwrap();
        let c = read("qwen3_moe");
        assert_eq!(c.architecture, Architecture::Qwen3Moe);
        assert!(c.qk_norm);
        assert_eq!(
            c.moe,
            Some(MoeConfig {
                num_experts: 8,
                num_experts_per_tok: 2,
                norm_topk_prob: true,
                moe_intermediate_size: 32,
                // mlp_only_layers: [0]
                sparse_layers: vec![false, true, true],
                routing: ir::MoeRouting::Softmax,
                score_correction_bias: false,
                num_shared_experts: 0,
                shared_intermediate_size: 0,
                routed_scaling_factor: 1.0,
            })
        );
        let c = read("mixtral");
        assert_eq!(c.architecture, Architecture::Mixtral);
        let moe = c.moe.unwrap();
        assert_eq!((moe.num_experts, moe.num_experts_per_tok), (4, 2));
        assert_eq!(moe.moe_intermediate_size, 128);
        assert_eq!(moe.sparse_layers, vec![true; 3]);
        assert!(moe.norm_topk_prob && !moe.score_correction_bias);
        let c = read("ernie4_5_moe");
        assert_eq!(c.architecture, Architecture::Ernie45Moe);
        assert!(!c.attention_bias && !c.qk_norm);
        let moe = c.moe.unwrap();
        assert_eq!((moe.num_experts, moe.num_experts_per_tok), (8, 2));
        // start 1, end 2, interval 1
        assert_eq!(moe.sparse_layers, vec![false, true, true]);
        assert!(moe.score_correction_bias && moe.norm_topk_prob);
        assert_eq!(
            (moe.num_shared_experts, moe.shared_intermediate_size),
            (1, 32)
        );

        // Sparse-layer rules: decoder_sparse_step counts from 1; ERNIE's end index -1 is the
        // last layer, and the interval applies to index + 1.
        let c = parse(
            r#"{"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 4,
            "num_experts": 4, "num_experts_per_tok": 1, "decoder_sparse_step": 2}"#,
        )
        .unwrap();
        assert_eq!(c.moe.unwrap().sparse_layers, vec![false, true, false, true]);
        let c = parse(
            r#"{"architectures": ["Ernie4_5_MoeForCausalLM"], "num_hidden_layers": 5,
            "moe_num_experts": 4, "moe_k": 2, "moe_layer_interval": 2}"#,
        )
        .unwrap();
        assert_eq!(
            c.moe.unwrap().sparse_layers,
            vec![false, true, false, true, false]
        );
        let err = parse(
            r#"{"architectures": ["MixtralForCausalLM"], "num_local_experts": 2,
            "num_experts_per_tok": 3}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidConfig { field, .. } if field == "num_experts_per_tok"),
            "{err}"
        );
    }

    #[test]
    fn deepseek_v3_config_parses_its_latent_attention_and_routing() {
        let c = ModelConfig::from_hf_file(&golden_config("deepseek_v3")).unwrap();
        assert_eq!(c.architecture, Architecture::DeepseekV3);
        assert_eq!(
            c.mla,
            Some(MlaConfig {
                q_lora_rank: Some(32),
                kv_lora_rank: 16,
                qk_nope_head_dim: 16,
                qk_rope_head_dim: 8,
                v_head_dim: 16,
                rope_interleave: true,
            })
        );
        // Rope runs on the rope part of each head.
        assert_eq!(c.head_dim, 8);
        let moe = c.moe.unwrap();
        assert_eq!(moe.sparse_layers, vec![false, true, true]);
        assert_eq!(
            moe.routing,
            ir::MoeRouting::SigmoidGrouped {
                groups: 2,
                top_groups: 1
            }
        );
        assert_eq!((moe.num_experts, moe.num_experts_per_tok), (8, 2));
        assert_eq!(moe.shared_intermediate_size, 32);
        assert_eq!(moe.routed_scaling_factor, 2.5);
        assert!(moe.norm_topk_prob && moe.score_correction_bias);

        let text = std::fs::read_to_string(golden_config("deepseek_v3")).unwrap();
        let no_q_lora = text.replace(r#""q_lora_rank": 32"#, r#""q_lora_rank": null"#);
        assert_eq!(parse(&no_q_lora).unwrap().mla.unwrap().q_lora_rank, None);
        let bad_groups = text.replace(r#""n_group": 2"#, r#""n_group": 3"#);
        let err = parse(&bad_groups).unwrap_err().to_string();
        assert!(
            err.contains("n_group") && err.contains("do not split 8"),
            "{err}"
        );
    }

    #[test]
    fn tiny_golden_configs_parse_to_expected_values() {
        struct Expected {
            dir: &'static str,
            architecture: Architecture,
            class: &'static str,
            head_dim: usize,
            theta: f64,
            scaling: RopeScaling,
            tie: bool,
            attention_bias: bool,
            qk_norm: bool,
        }
        let cases = [
            Expected {
                dir: "llama",
                architecture: Architecture::Llama,
                class: "LlamaForCausalLM",
                head_dim: 16,
                theta: 10000.0,
                scaling: RopeScaling::None,
                tie: false,
                attention_bias: false,
                qk_norm: false,
            },
            Expected {
                dir: "llama3_rope",
                architecture: Architecture::Llama,
                class: "LlamaForCausalLM",
                head_dim: 16,
                theta: 500000.0,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 64.0,
                },
                tie: false,
                attention_bias: false,
                qk_norm: false,
            },
            Expected {
                dir: "qwen2",
                architecture: Architecture::Qwen2,
                class: "Qwen2ForCausalLM",
                head_dim: 16,
                theta: 10000.0,
                scaling: RopeScaling::None,
                tie: true,
                attention_bias: true,
                qk_norm: false,
            },
            Expected {
                dir: "qwen3",
                architecture: Architecture::Qwen3,
                class: "Qwen3ForCausalLM",
                head_dim: 32,
                theta: 10000.0,
                scaling: RopeScaling::None,
                tie: false,
                attention_bias: false,
                qk_norm: true,
            },
        ];
        for case in cases {
            let c = ModelConfig::from_hf_file(&golden_config(case.dir)).unwrap();
            assert_eq!(c.architecture, case.architecture, "{}", case.dir);
            assert_eq!(c.source_architecture, case.class, "{}", case.dir);
            assert_eq!(
                (
                    c.vocab_size,
                    c.hidden_size,
                    c.intermediate_size,
                    c.num_hidden_layers
                ),
                (320, 64, 128, 3),
                "{}",
                case.dir
            );
            assert_eq!(
                (c.num_attention_heads, c.num_key_value_heads),
                (4, 2),
                "{}",
                case.dir
            );
            assert_eq!(c.head_dim, case.head_dim, "{}", case.dir);
            assert_eq!(c.rms_norm_eps, 1e-5, "{}", case.dir);
            assert_eq!(c.rope.theta, case.theta, "{}", case.dir);
            assert_eq!(c.rope.scaling, case.scaling, "{}", case.dir);
            assert_eq!(c.max_position_embeddings, 512, "{}", case.dir);
            assert_eq!(c.tie_word_embeddings, case.tie, "{}", case.dir);
            assert_eq!(c.attention_bias, case.attention_bias, "{}", case.dir);
            assert_eq!(c.qk_norm, case.qk_norm, "{}", case.dir);
            assert_eq!(c.bos_token_id, Some(1), "{}", case.dir);
            assert_eq!(c.eos_token_ids, vec![2], "{}", case.dir);
        }
    }

    /// Found by the `hf_config` fuzz target: a long wrong value with a multi-byte character
    /// where the message cuts it panicked instead of being reported.
    #[test]
    fn long_wrong_values_with_any_characters_are_reported() {
        for filler in ["a", "é", "\u{1333}", "😀"] {
            for pad in 0..4 {
                let value = format!("{}{}", "x".repeat(50 + pad), filler.repeat(8));
                let text = format!(r#"{{"architectures": [["{value}"]], "vocab_size": 320}}"#);
                match parse(&text) {
                    Err(ModelError::InvalidConfig { reason, .. }) => {
                        assert!(reason.ends_with("..."), "{reason}")
                    }
                    other => panic!("{filler:?} {pad}: {other:?}"),
                }
            }
        }
    }

    /// Found by the `hf_config` fuzz target: a MoE config's per-layer table was allocated from
    /// an absurd layer count before anything refused it.
    #[test]
    fn an_absurd_layer_count_is_refused_before_allocating() {
        let text =
            r#"{"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 55555277777777640}"#;
        match parse(text) {
            Err(ModelError::InvalidConfig { field, .. }) => assert_eq!(field, "num_hidden_layers"),
            other => panic!("{other:?}"),
        }
    }

    /// Found by the `hf_config` fuzz target (a 12-minute run): the shared experts' width
    /// overflowed (a panic in builds with overflow checks).
    #[test]
    fn shared_experts_too_wide_for_a_size_are_refused() {
        let text =
            r#"{"model_type": "ernie4_5_moe", "moe_intermediate_size": 9999999999999999184}"#;
        match parse(text) {
            Err(ModelError::InvalidConfig { field, .. }) => {
                assert_eq!(field, "moe_intermediate_size")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_sliding_window_caps_the_context_unless_switched_off() {
        let config = |extra: &str| {
            parse(&format!(
                r#"{{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                    "num_local_experts": 2, "num_experts_per_tok": 1,
                    "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 32768{extra}}}"#
            ))
            .unwrap()
            .max_position_embeddings
        };
        assert_eq!(config(""), 32768);
        assert_eq!(config(r#", "sliding_window": 4096"#), 4096);
        assert_eq!(config(r#", "sliding_window": null"#), 32768);
        assert_eq!(config(r#", "sliding_window": 65536"#), 32768);
        assert_eq!(
            config(r#", "sliding_window": 4096, "use_sliding_window": false"#),
            32768
        );
    }

    #[test]
    fn old_style_rope_fields_and_eos_list() {
        // Shaped like a Llama 3.1 config from transformers 4.x.
        let text = r#"{
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": true,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]
        }"#;
        let c = parse(text).unwrap();
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.rope.theta, 500000.0);
        assert_eq!(
            c.rope.scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            }
        );
        assert!(c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, Some(128000));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    }

    #[test]
    fn rope_scaling_variants() {
        let base =
            r#""architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4"#;
        let cases: [(&str, Option<RopeScaling>); 7] = [
            (
                r#""rope_scaling": {"type": "linear", "factor": 2.0}"#,
                Some(RopeScaling::Linear { factor: 2.0 }),
            ),
            (
                r#""rope_scaling": {"rope_type": "linear", "factor": 4}"#,
                Some(RopeScaling::Linear { factor: 4.0 }),
            ),
            (r#""rope_scaling": null"#, Some(RopeScaling::None)),
            (
                r#""rope_scaling": {"rope_type": "default"}"#,
                Some(RopeScaling::None),
            ),
            (
                r#""rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 1e6}"#,
                Some(RopeScaling::Linear { factor: 3.0 }),
            ),
            (
                r#""rope_scaling": {"type": "dynamic", "factor": 2.0}"#,
                None,
            ),
            (
                r#""rope_parameters": {"rope_type": "longrope", "factor": 4.0}"#,
                None,
            ),
        ];
        for (fields, expected) in cases {
            let result = parse(&format!("{{{base}, {fields}}}"));
            match (result, expected) {
                (Ok(c), Some(scaling)) => assert_eq!(c.rope.scaling, scaling, "{fields}"),
                (Err(ModelError::UnsupportedRope { rope_type, .. }), None) => {
                    assert!(fields.contains(&format!("\"{rope_type}\"")), "{fields}")
                }
                (other, _) => panic!("{fields}: unexpected {other:?}"),
            }
        }
        let c = parse(&format!(
            r#"{{{base}, "rope_parameters": {{"rope_type": "default", "rope_theta": 1000000.0}}}}"#
        ))
        .unwrap();
        assert_eq!(c.rope.theta, 1e6);
    }

    #[test]
    fn yarn_parameters_take_hf_defaults() {
        // Shaped like DeepSeek-V3's own config (older style, `type`).
        let c = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "num_attention_heads": 4, "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
              "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.rope.scaling,
            RopeScaling::Yarn(Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
                attention_factor: None,
                truncate: true,
            })
        );
        // Equal mscales cancel in the attention factor; the softmax correction remains.
        assert_eq!(c.rope.attention_factor(), 1.0);
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((c.rope.latent_attention_mscale() - m * m).abs() < 1e-12);

        // Qwen2.5 style: only factor and original given; betas 32 and 1, attention factor
        // mscale(factor) = 0.1 ln(4) + 1. Without an original context, the configured one.
        let c = parse(
            r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
            "num_attention_heads": 4, "max_position_embeddings": 2048,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
        )
        .unwrap();
        let RopeScaling::Yarn(yarn) = c.rope.scaling else {
            panic!("{:?}", c.rope.scaling)
        };
        assert_eq!(
            (
                yarn.beta_fast,
                yarn.beta_slow,
                yarn.mscale,
                yarn.mscale_all_dim
            ),
            (32.0, 1.0, 0.0, 0.0)
        );
        assert_eq!(yarn.original_max_position_embeddings, 2048.0);
        assert!((c.rope.attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        assert_eq!(c.rope.latent_attention_mscale(), 1.0);

        // An explicit attention factor wins; a factor is required.
        let c = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "yarn",
            "factor": 8.0, "original_max_position_embeddings": 8192, "attention_factor": 0.5}}"#,
        )
        .unwrap();
        assert_eq!(c.rope.attention_factor(), 0.5);
        let err = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "yarn"}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidConfig { field, .. } if field == "factor"),
            "{err}"
        );
        let err = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "yarn",
            "factor": 4.0, "beta_fast": -1}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("rope yarn scaling"), "{err}");
    }

    #[test]
    fn inv_freq_yarn_matches_transformers() {
        // The rotary tables transformers 5.23 builds for the yarn goldens (inv_freq in f32).
        // deepseek_v3_yarn: rope dim 8, theta 1e4, factor 4, original 32, betas 4 and 0.5:
        // the correction range is dims [0, 2], so index 1 sits halfway on the ramp.
        let rope = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Yarn(Yarn {
                factor: 4.0,
                original_max_position_embeddings: 32.0,
                beta_fast: 4.0,
                beta_slow: 0.5,
                mscale: 2.0,
                mscale_all_dim: 0.5,
                attention_factor: None,
                truncate: true,
            }),
        };
        let hf = [1.0, 0.0625, 0.0024999999441206455, 0.0002500000118743628];
        for (i, (got, want)) in rope.inv_freq(8).iter().zip(hf).enumerate() {
            assert!((got - want).abs() <= 1e-7 * want, "{i}: {got} vs {want}");
        }
        assert!((rope.attention_factor() - 1.1944648761087142).abs() < 1e-12);
        // HF's softmax scale 0.23340248099017752 = 24^-1/2 * this.
        let scale = rope.latent_attention_mscale() / 24f64.sqrt();
        assert!((scale - 0.23340248099017752).abs() < 1e-12, "{scale}");

        // qwen2_yarn: head dim 16 at the defaults (betas 32 and 1).
        let rope = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Yarn(Yarn {
                factor: 4.0,
                original_max_position_embeddings: 32.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 0.0,
                mscale_all_dim: 0.0,
                attention_factor: None,
                truncate: true,
            }),
        };
        let hf = [
            1.0,
            0.19764235615730286,
            0.02500000037252903,
            0.007905694656074047,
            0.0024999999441206455,
            0.0007905694656074047,
            0.0002500000118743628,
            7.905694656074047e-05,
        ];
        for (i, (got, want)) in rope.inv_freq(16).iter().zip(hf).enumerate() {
            assert!((got - want).abs() <= 1e-7 * want, "{i}: {got} vs {want}");
        }
        assert!((rope.attention_factor() - 1.138629436111989).abs() < 1e-12);
    }

    #[test]
    fn missing_rope_theta_takes_the_architectures_default() {
        // transformers' `default_theta`: 1e4 for most, 1e6 for Mixtral, 5e5 for ERNIE 4.5.
        let cases = [
            (r#""LlamaForCausalLM""#, "", 10000.0),
            (r#""Qwen2ForCausalLM""#, "", 10000.0),
            (r#""Qwen3ForCausalLM""#, "", 10000.0),
            (
                r#""Qwen3MoeForCausalLM""#,
                r#", "num_experts": 2, "num_experts_per_tok": 1"#,
                10000.0,
            ),
            (
                r#""MixtralForCausalLM""#,
                r#", "num_local_experts": 2, "num_experts_per_tok": 1"#,
                1e6,
            ),
            (
                r#""Ernie4_5_MoeForCausalLM""#,
                r#", "moe_num_experts": 2, "moe_k": 1"#,
                500000.0,
            ),
            (
                r#""DeepseekV3ForCausalLM""#,
                r#", "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1"#,
                10000.0,
            ),
        ];
        for (class, extra, theta) in cases {
            let base = format!(
                r#""architectures": [{class}], "hidden_size": 64, "num_attention_heads": 4{extra}"#
            );
            let c = parse(&format!("{{{base}}}")).unwrap();
            assert_eq!(c.rope.theta, theta, "{class}");
            assert_eq!(c.rope.scaling, RopeScaling::None, "{class}");
            // A rope dict without a theta takes the same default.
            let c = parse(&format!(
                r#"{{{base}, "rope_parameters": {{"rope_type": "linear", "factor": 2.0}}}}"#
            ))
            .unwrap();
            assert_eq!(c.rope.theta, theta, "{class} with rope_parameters");
        }
    }

    #[test]
    fn llama3_scaling_needs_all_its_fields() {
        let text = r#"{"architectures": ["LlamaForCausalLM"],
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}"#;
        let err = parse(text).unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidConfig { field, .. } if field == "high_freq_factor"),
            "{err}"
        );
    }

    #[test]
    fn missing_fields_take_hf_defaults() {
        let c = parse(r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 128, "num_attention_heads": 8}"#)
            .unwrap();
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(
            c.rope,
            RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None
            }
        );
        assert_eq!(c.vocab_size, 151936);
        assert_eq!(c.max_position_embeddings, 32768);
        assert!(c.attention_bias);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, None);
        assert!(c.eos_token_ids.is_empty());

        let c = parse(r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4}"#)
            .unwrap();
        assert_eq!(c.head_dim, 128);
        assert!(c.qk_norm);
        assert!(!c.attention_bias);

        let c = parse(r#"{"architectures": ["LlamaForCausalLM"], "num_key_value_heads": null, "bos_token_id": null}"#)
            .unwrap();
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (32, 32, 128)
        );
        assert_eq!(c.bos_token_id, None);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn model_type_is_used_without_architectures() {
        let cases = [
            ("llama", Architecture::Llama),
            ("smollm", Architecture::Llama),
            ("qwen2", Architecture::Qwen2),
            ("qwen3", Architecture::Qwen3),
        ];
        for (model_type, expected) in cases {
            let c = parse(&format!(
                r#"{{"model_type": "{model_type}", "hidden_size": 64, "num_attention_heads": 4}}"#
            ))
            .unwrap();
            assert_eq!(c.architecture, expected);
            assert_eq!(c.source_architecture, model_type);
        }
    }

    #[test]
    fn unsupported_architecture_names_found_and_supported() {
        let err = parse(r#"{"architectures": ["GPT2LMHeadModel"]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM, Ernie4_5_MoeForCausalLM, DeepseekV3ForCausalLM"
        );
        let err = parse(r#"{"model_type": "mistral"}"#).unwrap_err();
        assert!(err.to_string().contains("model_type mistral"), "{err}");
    }

    #[test]
    fn malformed_configs_name_the_file_and_field() {
        let err = parse("{not json").unwrap_err();
        assert!(matches!(err, ModelError::Json { .. }));
        assert!(
            err.to_string().starts_with("invalid JSON in config.json"),
            "{err}"
        );

        let cases = [
            (
                r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": "big"}"#,
                "hidden_size",
            ),
            (
                r#"{"architectures": ["LlamaForCausalLM"], "num_key_value_heads": 3}"#,
                "num_key_value_heads",
            ),
            (
                r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 100, "num_attention_heads": 3}"#,
                "hidden_size",
            ),
            (
                r#"{"architectures": ["LlamaForCausalLM"], "eos_token_id": [1, -2]}"#,
                "eos_token_id",
            ),
            (r#"{"architectures": "LlamaForCausalLM"}"#, "architectures"),
            (r#"{"vocab_size": 10}"#, "architectures"),
            (r#"[1, 2]"#, "(top level)"),
        ];
        for (text, expected_field) in cases {
            match parse(text) {
                Err(ModelError::InvalidConfig { field, file, .. }) => {
                    assert_eq!(field, expected_field, "{text}");
                    assert_eq!(file, Path::new("config.json"));
                }
                other => panic!("{text}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn missing_config_file_is_not_found() {
        let path = Path::new("no-such-dir/config.json");
        let err = ModelConfig::from_hf_file(path).unwrap_err();
        assert!(
            matches!(&err, ModelError::NotFound { path: p } if p == path),
            "{err}"
        );
    }

    #[test]
    fn inv_freq_plain_and_linear() {
        let plain = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::None,
        };
        let f = plain.inv_freq(8);
        // 10000^(-0/8), 10000^(-2/8), 10000^(-4/8), 10000^(-6/8)
        let expected = [1.0, 0.1, 0.01, 0.001];
        assert_eq!(f.len(), 4);
        for (got, want) in f.iter().zip(expected) {
            assert!(
                (got - want).abs() <= 1e-15 * want.max(1e-3),
                "{got} vs {want}"
            );
        }
        let linear = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Linear { factor: 4.0 },
        };
        for (got, want) in linear.inv_freq(8).iter().zip(expected) {
            assert!((got - want / 4.0).abs() <= 1e-15, "{got} vs {}", want / 4.0);
        }
    }

    #[test]
    fn inv_freq_llama3_matches_hand_computation() {
        // theta 5e5, head_dim 16, factor 8, low 1, high 4, original 64: wavelengths under
        // 64/4 = 16 keep their frequency, over 64/1 = 64 are divided by 8, between are blended.
        // Index 0: wavelen 2*pi = 6.28 < 16, kept: 1.
        // Index 1: freq 5e5^(-1/8) = 0.193922744748686, wavelen 32.4005 in [16, 64]:
        //   smooth = (64/32.40045573469106 - 1) / 3 = 0.325170..., freq*((1-smooth)/8 + smooth).
        // Index 2..: wavelen >= 167 > 64, freq / 8.
        let rope = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        };
        let expected = [
            1.0,
            0.0794030091792082,
            0.03760603093086393 / 8.0,
            0.007292664737217109 / 8.0,
            0.001414213562373095 / 8.0,
            0.0002742481756762073 / 8.0,
            5.318295896944988e-05 / 8.0,
            1.031338537721246e-05 / 8.0,
        ];
        let got = rope.inv_freq(16);
        assert_eq!(got.len(), 8);
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!((g - e).abs() <= 1e-12 * e, "index {i}: {g} vs {e}");
        }
    }
}
