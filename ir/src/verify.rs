//! The verifier. Its checks are the IR's invariants:
//!
//! 1. Every node's operands exist, and its output types are what the op table infers from them.
//! 2. Each value has one definition: an input, a weight, or one output slot of one live node.
//! 3. The graph is acyclic: `topo_order` reaches every node.
//! 4. Each input kind appears at most once; weights have constant shapes.
//! 5. A graph with `rope` (or `mla_attention`) nodes carries a `rope_inv_freq` constant of
//!    `head_dim / 2` (`rope_dim / 2`) values.
//! 6. Each attention layer index appears once (it names one slot of the KV cache).
//! 7. Every graph output is defined.
//!
//! A verifier error is always a compiler bug (in a builder or a pass), never a user error: the
//! compiler runs the verifier after every pass in debug and test builds.

use crate::graph::{Graph, ValueDef};
use crate::op::Op;
use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IR verifier (a compiler bug): {0}")]
pub struct VerifyError(pub String);

pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let fail = |msg: String| Err(VerifyError(msg));
    let order = graph.topo_order();
    if order.len() != graph.node_count() {
        return fail(format!(
            "graph has a cycle: {} of {} nodes ordered",
            order.len(),
            graph.node_count()
        ));
    }
    let mut inputs_seen = HashSet::new();
    for v in graph.value_ids() {
        match &graph.value(v).def {
            ValueDef::Input(kind) => {
                if !inputs_seen.insert(*kind) {
                    return fail(format!("input {} declared twice", kind.name()));
                }
            }
            ValueDef::Weight { name, .. } => {
                if graph.ty(v).shape.const_elements().is_none() {
                    return fail(format!(
                        "weight {name} has a symbolic shape {}",
                        graph.ty(v)
                    ));
                }
            }
            ValueDef::Node { .. } => {}
        }
    }
    let mut layers = HashSet::new();
    for node_id in order {
        let node = graph.node(node_id);
        for &v in &node.inputs {
            let Some(data) = graph.try_value(v) else {
                return fail(format!("{node_id} reads unknown value {v}"));
            };
            if let ValueDef::Node { node: producer, .. } = data.def {
                if !graph.is_live(v) {
                    return fail(format!(
                        "{node_id} reads {v} whose producer {producer} was removed"
                    ));
                }
            }
        }
        let types: Vec<_> = node.inputs.iter().map(|&v| graph.ty(v)).collect();
        let inferred = node
            .op
            .infer(&types)
            .map_err(|e| VerifyError(format!("{node_id} {}: {}", node.op.name(), e.0)))?;
        let declared: Vec<_> = node.outputs.iter().map(|&v| graph.ty(v).clone()).collect();
        if inferred != declared {
            return fail(format!(
                "{node_id} {}: outputs typed {declared:?}, op table says {inferred:?}",
                node.op.name()
            ));
        }
        for (i, &v) in node.outputs.iter().enumerate() {
            if graph.value(v).def
                != (ValueDef::Node {
                    node: node_id,
                    index: i,
                })
            {
                return fail(format!(
                    "{v} is listed as output {i} of {node_id} but defined elsewhere"
                ));
            }
        }
        match &node.op {
            Op::Rope { head_dim, .. }
            | Op::MlaAttention {
                rope_dim: head_dim, ..
            } => match graph.constant("rope_inv_freq") {
                Some(c) if c.values.len() == head_dim / 2 => {}
                Some(c) => {
                    return fail(format!(
                        "rope_inv_freq has {} values, rope needs {}",
                        c.values.len(),
                        head_dim / 2
                    ))
                }
                None => return fail("rope without a rope_inv_freq constant".into()),
            },
            _ => {}
        }
        if let Op::Attention { layer, .. } | Op::MlaAttention { layer, .. } = &node.op {
            if !layers.insert(*layer) {
                return fail(format!("attention layer {layer} appears twice"));
            }
        }
    }
    for (name, v) in graph.outputs() {
        match graph.try_value(*v).map(|d| &d.def) {
            None => return fail(format!("output {name} is an unknown value")),
            Some(ValueDef::Node { node, .. }) if !graph.is_live(*v) => {
                return fail(format!("output {name} comes from removed {node}"))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::parse;

    const ROPE_GRAPH: &str = "graph g {
  input %v0: i32[T] = positions
  const rope_inv_freq = [1.0]
  weight %v1: f32[4, 4] = @w
  input %v9: i32[T] = token_ids
  %v2: f32[T, 4] = embedding(%v1, %v9)
  %v3: f32[T, 4] = rope(%v2, %v0) {n_heads=2, head_dim=2}
  output x = %v3
}";

    #[test]
    fn a_well_formed_graph_verifies() {
        verify(&parse(ROPE_GRAPH).unwrap()).unwrap();
    }

    #[test]
    fn rope_needs_its_table() {
        let text = ROPE_GRAPH.replace("[1.0]", "[1.0, 2.0]");
        let err = verify(&parse(&text).unwrap()).unwrap_err();
        assert!(err.0.contains("rope_inv_freq has 2 values"), "{err}");
    }

    #[test]
    fn removed_producers_are_caught() {
        let mut g = parse(ROPE_GRAPH).unwrap();
        let order = g.topo_order();
        g.remove_node(order[0]);
        let err = verify(&g).unwrap_err();
        assert!(err.0.contains("was removed"), "{err}");
    }
}
