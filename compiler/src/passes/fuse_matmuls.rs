//! `fuse_matmuls`: matmuls that read the same activation become one matmul over the row-wise
//! concatenation of their weights, followed by a `split` into the original results.
//!
//! Identity: `[x @ A^T | x @ B^T] = x @ [A; B]^T`, and likewise for the biases. This is how the
//! q, k and v projections become one QKV matmul and gate and up become one gate-up matmul: one
//! pass over the activation, one launch, larger N for the kernel.
//! It fuses only matmuls whose weights are plain weights of the same dtype and whose bias is
//! present on all or none; it does not touch the weights' data (the concatenation is a lazy
//! `WeightExpr`, materialized when the plan is written).

use super::{PassCtx, PassError};
use ir::{Dim, Graph, NodeId, Op, TensorType, ValueDef, ValueId, WeightExpr};
use std::collections::BTreeMap;

pub fn run(graph: &mut Graph, _ctx: &PassCtx) -> Result<(), PassError> {
    let mut groups: BTreeMap<ValueId, Vec<NodeId>> = BTreeMap::new();
    for node in graph.topo_order() {
        let data = graph.node(node);
        if data.op == Op::MatMul && data.inputs[1..].iter().all(|&w| is_weight(graph, w)) {
            groups.entry(data.inputs[0]).or_default().push(node);
        }
    }
    for (x, nodes) in groups {
        // Fuse the largest run that agrees on dtype and bias-ness with the first.
        let first = graph.node(nodes[0]).clone();
        let members: Vec<NodeId> = nodes
            .into_iter()
            .filter(|&n| {
                let d = graph.node(n);
                d.inputs.len() == first.inputs.len()
                    && graph.ty(d.inputs[1]).dtype == graph.ty(first.inputs[1]).dtype
            })
            .collect();
        if members.len() < 2 {
            continue;
        }
        fuse(graph, x, &members)?;
    }
    Ok(())
}

fn is_weight(graph: &Graph, v: ValueId) -> bool {
    matches!(graph.value(v).def, ValueDef::Weight { .. })
}

fn weight_parts(graph: &Graph, v: ValueId) -> (String, WeightExpr) {
    match &graph.value(v).def {
        ValueDef::Weight { name, expr } => (name.clone(), expr.clone()),
        _ => unreachable!("checked by is_weight"),
    }
}

/// `a.b.q_proj.weight`, `a.b.k_proj.weight` -> `a.b.q_proj+k_proj.weight`
fn fused_name(names: &[String]) -> String {
    let prefix_len = names[0].rfind('.').map(|_| {
        let first = &names[0];
        let mut end = 0;
        for (i, c) in first.char_indices() {
            if c == '.' && names.iter().all(|n| n.len() > i && n[..=i] == first[..=i]) {
                end = i + 1;
            }
        }
        end
    });
    let prefix_len = prefix_len.unwrap_or(0);
    let suffix = names[0]
        .rsplit_once('.')
        .map(|(_, s)| format!(".{s}"))
        .unwrap_or_default();
    let middles: Vec<&str> = names
        .iter()
        .map(|n| {
            n[prefix_len..]
                .strip_suffix(suffix.as_str())
                .unwrap_or(&n[prefix_len..])
        })
        .collect();
    format!("{}{}{}", &names[0][..prefix_len], middles.join("+"), suffix)
}

fn concat_weight(graph: &mut Graph, parts: &[ValueId]) -> ValueId {
    let (names, exprs): (Vec<String>, Vec<WeightExpr>) =
        parts.iter().map(|&w| weight_parts(graph, w)).unzip();
    let first = graph.ty(parts[0]).clone();
    let rows: usize = parts
        .iter()
        .map(|&w| graph.ty(w).shape.0[0].as_const().unwrap_or(0))
        .sum();
    let mut dims = first.shape.0.clone();
    dims[0] = Dim::Const(rows);
    let ty = TensorType {
        dtype: first.dtype,
        shape: ir::Shape(dims),
    };
    graph.add_weight(fused_name(&names), ty, WeightExpr::ConcatRows(exprs))
}

fn fuse(graph: &mut Graph, x: ValueId, members: &[NodeId]) -> Result<(), PassError> {
    let failed = |e: ir::GraphError| PassError::Failed {
        pass: "fuse_matmuls",
        message: e.to_string(),
    };
    let datas: Vec<_> = members.iter().map(|&n| graph.node(n).clone()).collect();
    let weights: Vec<ValueId> = datas.iter().map(|d| d.inputs[1]).collect();
    let mut operands = vec![x, concat_weight(graph, &weights)];
    if datas[0].inputs.len() == 3 {
        let biases: Vec<ValueId> = datas.iter().map(|d| d.inputs[2]).collect();
        operands.push(concat_weight(graph, &biases));
    }
    let fused = graph.add_node1(Op::MatMul, &operands).map_err(failed)?;
    let sizes: Vec<usize> = datas
        .iter()
        .map(|d| graph.ty(d.outputs[0]).shape.last_const().unwrap_or(0))
        .collect();
    let parts = graph
        .add_node(Op::Split { sizes }, &[fused])
        .map_err(failed)?;
    for (data, part) in datas.iter().zip(parts) {
        graph.replace_all_uses(data.outputs[0], part);
    }
    for &n in members {
        graph.remove_node(n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fused_name;

    #[test]
    fn fused_names_keep_the_common_prefix() {
        let names: Vec<String> = [
            "m.l.0.attn.q_proj.weight",
            "m.l.0.attn.k_proj.weight",
            "m.l.0.attn.v_proj.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(fused_name(&names), "m.l.0.attn.q_proj+k_proj+v_proj.weight");
        let biases = vec!["a.q.bias".to_string(), "a.k.bias".to_string()];
        assert_eq!(fused_name(&biases), "a.q+k.bias");
    }
}
