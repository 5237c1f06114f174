//! `select_kernels`: picks one registry kernel for every launching node, by
//! `(op, weight dtype, quant scheme, target)`; quantized weights (matmul, embedding table,
//! mixture-of-experts experts) key it by their scheme and u8 codes.
//!
//! Among the candidates it prefers a generated (cranelift, specialized per shape) kernel only for
//! the ops where `docs/PERF.md` measured it faster than the library kernel (`GENERATED_WINS`);
//! otherwise the library kernel. A node with no candidate is an error naming the key: the target
//! cannot run this model. It does not change the graph.

use super::quantize_weights::QuantPlan;
use super::{PassCtx, PassError};
use ir::{DType, Graph, NodeId, Op, OpKind, QuantScheme};
use kernels::registry::{self, KernelEntry, KernelKey, KernelSource};
use std::collections::HashMap;

/// Ops whose generated kernel beat the library kernel on SmolLM2's shapes (docs/PERF.md,
/// "Generated vs library kernels"). Update it when the measurements change.
pub const GENERATED_WINS: &[OpKind] = &[OpKind::AddRmsNorm, OpKind::RmsNorm, OpKind::Rope];

pub type Selection = HashMap<NodeId, &'static KernelEntry>;

/// The dtype part of a node's registry key: the weight's storage type for ops that read a
/// weight matrix, f32 (the activation type) for everything else.
pub fn key_dtype(graph: &Graph, node: NodeId) -> DType {
    let data = graph.node(node);
    match data.op {
        Op::MatMul => graph.ty(data.inputs[1]).dtype,
        Op::Embedding => graph.ty(data.inputs[0]).dtype,
        _ => DType::F32,
    }
}

pub fn run(graph: &Graph, ctx: &PassCtx) -> Result<Selection, PassError> {
    run_quantized(graph, ctx, &QuantPlan::new())
}

/// [`run`] for a graph some of whose weights `quant` stores quantized: their matmuls and
/// embeddings take the kernels of their scheme, keyed by u8 codes.
pub fn run_quantized(
    graph: &Graph,
    ctx: &PassCtx,
    quant: &QuantPlan,
) -> Result<Selection, PassError> {
    let mut selection = Selection::new();
    for node in graph.topo_order() {
        let Some(op) = graph.node(node).op.kind() else {
            continue;
        };
        let data = graph.node(node);
        // The weight whose scheme keys the kernel; a mixture's two stacked experts share one
        // (`quantize_weights` checks it).
        let weight = match data.op {
            Op::MatMul => data.inputs.get(1),
            Op::Embedding => data.inputs.first(),
            Op::Moe { .. } => data.inputs.len().checked_sub(2).map(|i| &data.inputs[i]),
            _ => None,
        };
        let key = match weight.and_then(|w| quant.get(w)) {
            Some(q) => KernelKey {
                op,
                dtype: DType::U8,
                quant: q.scheme,
                target: ctx.target,
            },
            None => KernelKey {
                op,
                dtype: key_dtype(graph, node),
                quant: QuantScheme::None,
                target: ctx.target,
            },
        };
        let candidates = registry::lookup(&key);
        let wants_generated = GENERATED_WINS.contains(&op);
        let chosen = candidates
            .iter()
            .find(|e| (e.source == KernelSource::Generated) == wants_generated)
            .or_else(|| candidates.first())
            .copied()
            .ok_or_else(|| PassError::Failed {
                pass: "select_kernels",
                message: format!(
                    "no kernel for {} with {} weights ({}) on {}; {}; `fdc kernels --list` shows \
                     every kernel",
                    op,
                    key.dtype,
                    key.quant,
                    ctx.target,
                    what_the_target_runs(ctx.target, key.quant != QuantScheme::None)
                ),
            })?;
        selection.insert(node, chosen);
    }
    Ok(selection)
}

/// For errors: the quantization schemes (`schemes`) or the ops a target has kernels for.
fn what_the_target_runs(target: ir::Target, schemes: bool) -> String {
    if schemes {
        let names = crate::targets::schemes_on(target);
        return format!("{target} runs the schemes: {}", names.join(", "));
    }
    let mut ops: Vec<&str> = vec![];
    for e in registry::entries()
        .iter()
        .filter(|e| e.key.target == target)
    {
        if !ops.contains(&e.key.op.name()) {
            ops.push(e.key.op.name());
        }
    }
    format!("{target} has kernels for: {}", ops.join(", "))
}
