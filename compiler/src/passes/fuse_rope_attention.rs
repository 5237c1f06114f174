//! `fuse_rope_attention` (GPU targets: CUDA and DCU): `attention(rope(q), rope(k), v, positions)` becomes
//! `attention(q, k, v, positions) {rope}`, which rotates k as it writes the KV cache and q as it
//! loads it (`kernels/cuda/attention.cu`).
//!
//! Identity: the rope ops rotate each head's pairs `(i, i + D/2)` by the angle of the token's
//! position from the same tables the attention kernels read, so rotating inside the attention
//! kernels computes the same values and saves two launches and two intermediates per layer (a
//! decode step's launches cost microseconds each against a few of work). It fires only when both
//! rope ops take the attention's own positions, match its head counts, and have no other reader;
//! on CPU targets it does nothing (their rope kernels are generated and fused there already).

use super::{PassCtx, PassError};
use ir::{Graph, NodeId, Op, ValueId};

pub fn run(graph: &mut Graph, ctx: &PassCtx) -> Result<(), PassError> {
    if !crate::targets::info(ctx.target).codegen.gpu_module() {
        return Ok(());
    }
    for attention in graph.topo_order() {
        if !graph.contains_node(attention) {
            continue;
        }
        let node = graph.node(attention);
        let Op::Attention {
            layer,
            n_heads,
            n_kv_heads,
            head_dim,
            scale,
            rope: false,
        } = node.op
        else {
            continue;
        };
        let inputs = node.inputs.clone();
        let [q, k, v, positions] = inputs[..] else {
            continue;
        };
        let (Some((rope_q, q)), Some((rope_k, k))) = (
            rotated(graph, attention, q, n_heads, head_dim, positions),
            rotated(graph, attention, k, n_kv_heads, head_dim, positions),
        ) else {
            continue;
        };
        let op = Op::Attention {
            layer,
            n_heads,
            n_kv_heads,
            head_dim,
            scale,
            rope: true,
        };
        let out = graph.node(attention).outputs[0];
        // The layer's attention is replaced, not added to: remove the old node first so the
        // graph never holds two attentions of one layer.
        graph.remove_node(attention);
        let fused = graph
            .add_node1(op, &[q, k, v, positions])
            .map_err(|e| PassError::Failed {
                pass: "fuse_rope_attention",
                message: e.to_string(),
            })?;
        graph.replace_all_uses(out, fused);
        graph.remove_node(rope_q);
        graph.remove_node(rope_k);
    }
    graph.remove_dead_nodes();
    Ok(())
}

/// If `value` is `rope(x, positions)` over `heads` heads of `head_dim`, read by `attention` alone:
/// the rope node and `x`.
fn rotated(
    graph: &Graph,
    attention: NodeId,
    value: ValueId,
    heads: usize,
    head_dim: usize,
    positions: ValueId,
) -> Option<(NodeId, ValueId)> {
    let rope = graph.producer(value)?;
    let node = graph.node(rope);
    let fits =
        matches!(node.op, Op::Rope { n_heads, head_dim: d } if n_heads == heads && d == head_dim);
    if !fits
        || node.inputs.get(1) != Some(&positions)
        || graph.users(value) != [attention]
        || graph.is_output(value)
    {
        return None;
    }
    Some((rope, node.inputs[0]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::{CpuIsa, DType, Target};

    /// The CUDA case of `compiler/tests/passes/fuse_rope_attention` on a CPU target: unchanged.
    #[test]
    fn a_cpu_target_keeps_its_rope_ops() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/passes/fuse_rope_attention/rotated_q_and_k.fdir"
        );
        let text = std::fs::read_to_string(path).expect("the case");
        let mut graph = ir::text::parse(&text).expect("parses");
        let before = ir::text::print(&graph);
        let ctx = PassCtx {
            target: Target::Cpu(CpuIsa::Avx2),
            weight_dtype: DType::F32,
            quant: Default::default(),
        };
        run(&mut graph, &ctx).expect("runs");
        assert_eq!(ir::text::print(&graph), before);
    }
}
