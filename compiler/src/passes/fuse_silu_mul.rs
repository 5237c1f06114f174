//! `fuse_silu_mul`: `mul(silu(g), u)`, where `g` and `u` are the two halves of one `split`,
//! becomes `silu_mul` over the unsplit `[g | u]` rows.
//!
//! Identity: `silu(gu[:, :I]) * gu[:, I:]` is elementwise over the two halves, so one pass over
//! the gate-up result replaces two launches and an intermediate. It fires only after
//! `fuse_matmuls` has produced the gate-up split, and only when `silu(g)` has no other reader.

use super::{PassCtx, PassError};
use ir::{Graph, Op};

pub fn run(graph: &mut Graph, _ctx: &PassCtx) -> Result<(), PassError> {
    for mul in graph.topo_order() {
        if !graph.contains_node(mul) || graph.node(mul).op != Op::Mul {
            continue;
        }
        let (act, up) = (graph.node(mul).inputs[0], graph.node(mul).inputs[1]);
        let Some(silu) = graph
            .producer(act)
            .filter(|&n| graph.node(n).op == Op::Silu)
        else {
            continue;
        };
        let gate = graph.node(silu).inputs[0];
        let (Some(split_g), Some(split_u)) = (graph.producer(gate), graph.producer(up)) else {
            continue;
        };
        let split = graph.node(split_g);
        let halves =
            matches!(&split.op, Op::Split { sizes } if sizes.len() == 2 && sizes[0] == sizes[1]);
        if split_g != split_u
            || !halves
            || split.outputs != [gate, up]
            || graph.users(act) != [mul]
            || graph.is_output(act)
        {
            continue;
        }
        let gu = split.inputs[0];
        let fused = graph
            .add_node1(Op::SiluMul, &[gu])
            .map_err(|e| PassError::Failed {
                pass: "fuse_silu_mul",
                message: e.to_string(),
            })?;
        graph.replace_all_uses(graph.node(mul).outputs[0], fused);
        graph.remove_node(mul);
        graph.remove_node(silu);
    }
    graph.remove_dead_nodes();
    Ok(())
}
