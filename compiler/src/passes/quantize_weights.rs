//! `quantize_weights`: decides how every matmul weight is stored: unquantized in `--dtype`, or in
//! one of the quantization schemes with its group size and symmetry (`--quant`, `--group-size`,
//! `--quant-asym`/`--quant-sym`, `--quant-override PATTERN=SCHEME`).
//!
//! Matrices read by matmuls (and possibly by an embedding: tied tables) and the stacked experts
//! of mixture-of-experts layers (`[E, R, K]`, quantized as one `[E * R, K]` matrix whose groups
//! never cross a row, so each expert is quantized as it would be alone) are quantized; norms,
//! biases and routers stay as they are. An expert's R rows must be whole panels of the target's
//! packed layout (each expert is then a contiguous slice the kernels read as a matrix of its
//! own), and a layer's gate-up and down experts take one scheme (one kernel serves the layer).
//!
//! A table read by an embedding and the `lm_head` default to `w8a16` under any other scheme, as
//! is usual (their error reaches every token's logits), in that scheme's own default groups (32,
//! symmetric: a GGUF's Q8_0 table is kept bit for bit): `--group-size` and the symmetry flags are
//! for the chosen scheme's weights. An override names them to change that. It is an analysis:
//! it does not change the graph; the weight writer quantizes the data and `select_kernels` reads
//! the result.
//!
//! Errors: a scheme the target has no kernel for lists the schemes it has; a group size that
//! does not divide a weight's K names the weight; so do experts that split a panel, and a
//! layer's experts under two schemes.

use super::{PassCtx, PassError};
use crate::targets::CodeGen;
use artifacts::calibration::Calibration;
use ir::{CodeFormat, Graph, Op, QuantScheme, ValueDef, ValueId};
use kernels::cpu::{PackedLayout, QuantFormat};
use std::collections::HashMap;
use std::sync::Arc;

/// Group size on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupSize {
    /// One scale per output row.
    Channel,
    Elements(usize),
}

/// The user's quantization choices.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantOptions {
    pub scheme: QuantScheme,
    /// None: the scheme's default (32 for integer codes, per channel for fp8).
    pub group: Option<GroupSize>,
    /// None: the scheme's default (asymmetric for 4 and 2 bits, symmetric for 8 bits and fp8).
    pub asymmetric: Option<bool>,
    /// `(pattern, scheme)`, later entries winning; see [`name_matches`].
    pub overrides: Vec<(String, QuantScheme)>,
    /// Plain rounding for asymmetric groups instead of the fitted ranges (`crate::quantize`).
    pub round_to_nearest: bool,
    /// Input statistics (`fdc compile --calibration`): every weight quantized by the compiler
    /// that has them is quantized by GPTQ (`crate::gptq`).
    pub calibration: Option<CalibrationRef>,
    /// SmoothQuant's migration strength for the schemes that quantize activations, with
    /// `calibration` (`crate::smooth`); 0 turns smoothing off.
    pub smooth_alpha: f32,
    /// Store the W4A16 matmul weights that fit in the tile layout of the CUDA tensor-core
    /// matmul (`fdc compile --quant-tiles`; `kernels::cuda::tiles_fit`). Off by default until
    /// the tile kernels have run on a GPU (docs/GPU.md).
    pub tiles: bool,
}

/// Shared calibration statistics; two are equal when they are the same file read once.
#[derive(Clone, Debug)]
pub struct CalibrationRef(pub Arc<Calibration>);

impl PartialEq for CalibrationRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for CalibrationRef {}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            scheme: QuantScheme::None,
            group: None,
            asymmetric: None,
            overrides: vec![],
            round_to_nearest: false,
            calibration: None,
            smooth_alpha: DEFAULT_SMOOTH_ALPHA,
            tiles: false,
        }
    }
}

/// SmoothQuant's usual migration strength.
pub const DEFAULT_SMOOTH_ALPHA: f32 = 0.5;

/// How one weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightQuant {
    pub scheme: QuantScheme,
    pub format: QuantFormat,
    /// Set by the compiler when the checkpoint's own blocks are copied (GGUF pass-through).
    pub from_checkpoint: bool,
}

/// The quantized weights; weights absent are stored unquantized.
pub type QuantPlan = HashMap<ValueId, WeightQuant>;

pub fn run(graph: &Graph, ctx: &PassCtx) -> Result<QuantPlan, PassError> {
    let options = &ctx.quant;
    let mut plan = QuantPlan::new();
    let fail = |message: String| PassError::Failed {
        pass: "quantize_weights",
        message,
    };
    for w in graph.weights() {
        let ValueDef::Weight { name, .. } = &graph.value(w).def else {
            continue;
        };
        let users = graph.users(w);
        let by_matmul = |n: &ir::NodeId| {
            let node = graph.node(*n);
            matches!(node.op, Op::MatMul) && node.inputs.get(1) == Some(&w)
        };
        let by_embedding = |n: &ir::NodeId| {
            let node = graph.node(*n);
            matches!(node.op, Op::Embedding) && node.inputs.first() == Some(&w)
        };
        let ty = graph.ty(w);
        let matrix = ty.shape.0.len() == 2
            && users.iter().any(by_matmul)
            && users.iter().all(|n| by_matmul(n) || by_embedding(n));
        let experts = ty.shape.0.len() == 3
            && !users.is_empty()
            && users.iter().all(|&n| reads_as_experts(graph, n, w));
        if !matrix && !experts {
            continue;
        }
        let table = users.iter().any(by_embedding) || name.starts_with("lm_head");
        let mut scheme = match options.scheme {
            QuantScheme::None => QuantScheme::None,
            _ if table => QuantScheme::W8A16,
            s => s,
        };
        // A table's default scheme takes that scheme's default groups and symmetry.
        let mut table_default = table;
        for (pattern, s) in &options.overrides {
            if name_matches(pattern, name) {
                scheme = *s;
                table_default = false;
            }
        }
        let (group_option, asymmetric_option) = if table_default {
            (None, None)
        } else {
            (options.group, options.asymmetric)
        };
        if scheme == QuantScheme::None {
            continue;
        }
        check_target(scheme, ctx).map_err(fail)?;
        let Some(codes) = scheme.code_format() else {
            continue;
        };
        let k = ty.shape.last_const().unwrap_or(0);
        if experts {
            let rows = ty.shape.0[1].as_const().unwrap_or(0);
            let panel = quant_panel(ctx.target);
            if !rows.is_multiple_of(panel) {
                return Err(fail(format!(
                    "experts {name} {ty} under {scheme}: an expert's {rows} rows are not whole \
                     panels of {panel} rows, which quantized experts need on {}; keep them \
                     unquantized with --quant-override experts=none",
                    ctx.target
                )));
            }
        }
        let group = match group_option {
            Some(GroupSize::Elements(g)) => g,
            Some(GroupSize::Channel) => k,
            None if codes == CodeFormat::Fp8E4M3 => k,
            None => 32,
        };
        let asymmetric = scheme.allows_asymmetric()
            && asymmetric_option.unwrap_or(matches!(codes, CodeFormat::Int(4 | 2)));
        let format = QuantFormat {
            codes,
            group,
            asymmetric,
        };
        format
            .check(k)
            .map_err(|m| fail(format!("weight {name} {ty} under {scheme}: {m}")))?;
        if crate::targets::info(ctx.target).codegen.gpu_module() {
            let multiple = kernels::cuda::QUANT_K_MULTIPLE;
            if !k.is_multiple_of(multiple) || !group.is_multiple_of(multiple) {
                return Err(fail(format!(
                    "weight {name} {ty} under {scheme}: the GPU kernels need K and the group \
                     size to be multiples of {multiple} (group {group})"
                )));
            }
        }
        plan.insert(
            w,
            WeightQuant {
                scheme,
                format,
                from_checkpoint: false,
            },
        );
    }
    check_experts_agree(graph, &plan).map_err(fail)?;
    Ok(plan)
}

/// The stacked experts `[gate_up, down]` node `n` reads, if `n` is a mixture-of-experts op (its
/// operands end with them).
fn expert_weights(graph: &Graph, n: ir::NodeId) -> Option<[ValueId; 2]> {
    let node = graph.node(n);
    if !matches!(node.op, Op::Moe { .. }) {
        return None;
    }
    match node.inputs[..] {
        [.., gate_up, down] => Some([gate_up, down]),
        _ => None,
    }
}

/// Whether node `n` reads `w` as one of its stacked experts, and in no other role.
fn reads_as_experts(graph: &Graph, n: ir::NodeId, w: ValueId) -> bool {
    let Some(experts) = expert_weights(graph, n) else {
        return false;
    };
    let reads = graph.node(n).inputs.iter().filter(|&&i| i == w).count();
    experts.contains(&w) && reads == 1
}

/// Rows per panel of quantized weights on `target` (`weight_layouts` in compile.rs packs them).
fn quant_panel(target: ir::Target) -> usize {
    match crate::targets::info(target).codegen {
        CodeGen::Cranelift(isa) => PackedLayout::for_isa(isa).panel(),
        CodeGen::Nvrtc(_) | CodeGen::Hipcc(_) => PackedLayout::CUDA_QUANT.panel(),
    }
}

/// A layer's gate-up and down experts must share a scheme (none included): one kernel of the
/// registry serves the layer.
fn check_experts_agree(graph: &Graph, plan: &QuantPlan) -> Result<(), String> {
    for n in graph.topo_order() {
        let Some([gate_up, down]) = expert_weights(graph, n) else {
            continue;
        };
        let scheme = |w: ValueId| plan.get(&w).map_or(QuantScheme::None, |q| q.scheme);
        if scheme(gate_up) != scheme(down) {
            let name = |w: ValueId| match &graph.value(w).def {
                ValueDef::Weight { name, .. } => name.clone(),
                _ => format!("{w:?}"),
            };
            return Err(format!(
                "the experts of one layer take one scheme: {} is {}, {} is {}; give both the \
                 same --quant-override",
                name(gate_up),
                scheme(gate_up),
                name(down),
                scheme(down)
            ));
        }
    }
    Ok(())
}

/// Whether the target has a matmul for `scheme`; if not, the message lists the ones it has.
fn check_target(scheme: QuantScheme, ctx: &PassCtx) -> Result<(), String> {
    crate::targets::check_scheme(ctx.target, scheme)
}

/// Whether `pattern` (`*` matches any run of characters) matches the whole of `name` or a part of
/// it between dots: `lm_head` matches `lm_head.weight`, `embed*` matches
/// `model.embed_tokens.weight`, `*mlp*` matches every MLP weight. Hand-written: ten lines do
/// not justify a glob crate, and this matches whole dotted segments, which globs do not.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let starts = std::iter::once(0).chain(name.match_indices('.').map(|(i, _)| i + 1));
    let starts: Vec<usize> = starts.collect();
    starts.iter().any(|&s| {
        let rest = &name[s..];
        let ends = rest
            .match_indices('.')
            .map(|(i, _)| i)
            .chain(std::iter::once(rest.len()));
        ends.into_iter()
            .any(|e| glob(pattern.as_bytes(), &rest.as_bytes()[..e]))
    })
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((&c, rest)) => s.first() == Some(&c) && glob(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_dotted_segments() {
        let cases = [
            ("lm_head", "lm_head.weight", true),
            ("embed*", "model.embed_tokens.weight", true),
            ("*mlp*", "model.layers.3.mlp.gate_proj+up_proj.weight", true),
            ("layers.0.*", "model.layers.0.self_attn.o_proj.weight", true),
            (
                "layers.0.*",
                "model.layers.10.self_attn.o_proj.weight",
                false,
            ),
            ("head", "lm_head.weight", false),
            ("model.norm.weight", "model.norm.weight", true),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(name_matches(pattern, name), want, "{pattern} {name}");
        }
    }
}
