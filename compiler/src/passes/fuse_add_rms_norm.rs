//! `fuse_add_rms_norm`: a residual `s = add(x, d)` whose sum feeds a full-row `rms_norm(s)`
//! becomes one `add_rms_norm(x, d, w) -> (s, y)`.
//!
//! Identity: the norm needs the whole sum row anyway, so computing it while the row is in
//! registers saves one read of `s`. Both results stay available (the sum is the next residual).
//! Per-head norms (`group < cols`) and norms of other values are left alone.

use super::{PassCtx, PassError};
use ir::{Graph, Op};

pub fn run(graph: &mut Graph, _ctx: &PassCtx) -> Result<(), PassError> {
    for add in graph.topo_order() {
        if !graph.contains_node(add) || graph.node(add).op != Op::Add {
            continue;
        }
        let sum = graph.node(add).outputs[0];
        let cols = graph.ty(sum).shape.last_const();
        let norm = graph.users(sum).into_iter().find(|&n| {
            let node = graph.node(n);
            matches!(node.op, Op::RmsNorm { group, .. } if Some(group) == cols)
                && node.inputs[0] == sum
        });
        let Some(norm) = norm else { continue };
        let Op::RmsNorm { eps, .. } = graph.node(norm).op else {
            continue;
        };
        let (x, d) = (graph.node(add).inputs[0], graph.node(add).inputs[1]);
        let w = graph.node(norm).inputs[1];
        let normed = graph.node(norm).outputs[0];
        let outs = graph
            .add_node(Op::AddRmsNorm { eps }, &[x, d, w])
            .map_err(|e| PassError::Failed {
                pass: "fuse_add_rms_norm",
                message: e.to_string(),
            })?;
        graph.replace_all_uses(sum, outs[0]);
        graph.replace_all_uses(normed, outs[1]);
        graph.remove_node(norm);
        graph.remove_node(add);
    }
    Ok(())
}
