//! `cast_weights`: sets the storage type of matmul and embedding weights, and of the stacked
//! expert matrices of `moe` ops, to the `--dtype` the user chose. Norm weights, biases, routers
//! and MLA's `kv_b` stay f32: they are small and their precision matters.
//!
//! It changes types only; the data is converted (round to nearest even) when the plan is written.

use super::{PassCtx, PassError};
use ir::{Graph, Op, ValueDef};

pub fn run(graph: &mut Graph, ctx: &PassCtx) -> Result<(), PassError> {
    let mut matrices = vec![];
    for node in graph.topo_order() {
        let data = graph.node(node);
        match data.op {
            Op::MatMul => matrices.push(data.inputs[1]),
            Op::Embedding => matrices.push(data.inputs[0]),
            // The stacked expert matrices (the last two operands); router and bias stay f32.
            Op::Moe { .. } => matrices.extend(data.inputs.iter().rev().take(2).copied()),
            _ => {}
        }
    }
    for w in matrices {
        if matches!(graph.value(w).def, ValueDef::Weight { .. }) {
            graph.value_mut(w).ty.dtype = ctx.weight_dtype;
        }
    }
    Ok(())
}
