//! `plan_memory`: places every activation in one arena by liveness, so buffers whose lifetimes
//! do not overlap share memory.
//!
//! Widths are planned per token: a buffer `[T, cols]` at column offset `o` occupies elements
//! `[o * T, (o + cols) * T)`, which stays disjoint from its neighbours for every `T`, so one plan
//! serves every batch size up to the runtime's token budget. `split` results are views into their
//! input (no memory of their own; they keep it alive). The logits outputs go to their own buffer,
//! not the arena; the other outputs (hidden states the runtime reads after a pass) stay in the
//! arena and live to the end of the program, and the `hidden` input (which the runtime writes
//! before a pass of the multi-token-prediction module) takes arena memory from that program's
//! first step (`Constraints::hidden_input_from`). Allocation is first-fit over a free list in program order, which
//! is simple and, for the straight-line decoder, within a few columns of the peak live width.
//! It does not reorder the program.

use super::PassError;
use artifacts::schema::{Act, Buffer, BufferInfo, Rows};
use ir::{Dim, Graph, InputKind, NodeId, Op, ValueDef, ValueId};
use std::collections::HashMap;

pub struct MemoryPlan {
    pub locations: HashMap<ValueId, Act>,
    pub arena_cols: u64,
    pub unplanned_cols: u64,
    pub buffers: Vec<BufferInfo>,
}

fn rows_of(graph: &Graph, v: ValueId) -> Rows {
    match graph.ty(v).shape.0.first() {
        Some(Dim::LogitRows) => Rows::LogitRows,
        _ => Rows::Tokens,
    }
}

fn cols_of(graph: &Graph, v: ValueId) -> u64 {
    graph.ty(v).shape.last_const().unwrap_or(0) as u64
}

/// The value that owns the memory `v` lives in, and `v`'s column offset inside it.
fn root_of(graph: &Graph, v: ValueId) -> (ValueId, u64) {
    match graph.value(v).def {
        ValueDef::Node { node, index } => match &graph.node(node).op {
            Op::Split { sizes } => {
                let (root, col) = root_of(graph, graph.node(node).inputs[0]);
                (root, col + sizes[..index].iter().sum::<usize>() as u64)
            }
            _ => (v, 0),
        },
        _ => (v, 0),
    }
}

/// What the memory plan must allow for besides each step's own inputs and outputs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Constraints {
    /// A matmul whose next step is an `add_rms_norm` of its output keeps its input alive
    /// through that norm, so that the norm's outputs never take the input's memory: on CUDA a
    /// pass of one token runs the two as one kernel (`CudaDecodeFolds`), whose blocks write the
    /// norm's outputs while others still read the matmul's input.
    pub fold_norms_into_matmuls: bool,
    /// The step from which the `hidden` input must be in place: the runtime writes it before
    /// the multi-token-prediction module's first step, so it is live from there, not only from
    /// its first reader.
    pub hidden_input_from: usize,
}

/// `launches` is the program order: `graph.topo_order()` without the view ops.
pub fn run(
    graph: &Graph,
    launches: &[NodeId],
    constraints: Constraints,
) -> Result<MemoryPlan, PassError> {
    let in_arena = |v: ValueId| {
        matches!(
            graph.value(v).def,
            ValueDef::Node { .. } | ValueDef::Input(InputKind::Hidden)
        )
    };
    let mut last_use: HashMap<ValueId, usize> = HashMap::new();
    for (step, &node) in launches.iter().enumerate() {
        for &v in &graph.node(node).inputs {
            if in_arena(v) {
                last_use.insert(root_of(graph, v).0, step);
            }
        }
    }
    // Logits go to their own buffer; the other outputs are read after the whole program.
    let outputs: Vec<ValueId> = graph
        .outputs()
        .iter()
        .filter(|(name, _)| is_logits(name))
        .map(|(_, v)| *v)
        .collect();
    for (name, v) in graph.outputs() {
        if !is_logits(name) {
            last_use.insert(root_of(graph, *v).0, launches.len());
        }
    }
    if constraints.fold_norms_into_matmuls {
        for (step, pair) in launches.windows(2).enumerate() {
            let (matmul, norm) = (graph.node(pair[0]), graph.node(pair[1]));
            let feeds = matches!(matmul.op, Op::MatMul)
                && matches!(norm.op, Op::AddRmsNorm { .. })
                && norm.inputs.iter().any(|v| matmul.outputs.contains(v));
            if !feeds {
                continue;
            }
            if let Some(&x) = matmul.inputs.first() {
                if let ValueDef::Node { .. } = graph.value(x).def {
                    let root = root_of(graph, x).0;
                    let last = last_use.entry(root).or_insert(step + 1);
                    *last = (*last).max(step + 1);
                }
            }
        }
    }
    let mut free: Vec<(u64, u64)> = vec![]; // sorted, disjoint [start, end) column ranges
    let mut arena_cols = 0u64;
    let mut unplanned_cols = 0u64;
    let mut roots: HashMap<ValueId, (u64, u64)> = HashMap::new(); // root -> (offset, cols)
    let mut buffers = vec![];
    for (step, &node) in launches.iter().enumerate() {
        // The hidden input is placed before its program's first step's outputs.
        let hidden_input = graph
            .input(InputKind::Hidden)
            .filter(|v| step == constraints.hidden_input_from && last_use.contains_key(v));
        let new_values: Vec<ValueId> = hidden_input
            .into_iter()
            .chain(graph.node(node).outputs.iter().copied())
            .collect();
        for v in new_values {
            if outputs.contains(&v) {
                continue;
            }
            let cols = cols_of(graph, v);
            unplanned_cols += cols;
            let offset = match free.iter().position(|&(s, e)| e - s >= cols) {
                Some(i) => {
                    let (s, e) = free[i];
                    if e - s == cols {
                        free.remove(i);
                    } else {
                        free[i] = (s + cols, e);
                    }
                    s
                }
                None => {
                    let s = arena_cols;
                    arena_cols += cols;
                    s
                }
            };
            roots.insert(v, (offset, cols));
            buffers.push(BufferInfo {
                name: format!("{v}"),
                offset_cols: offset,
                cols,
                first_step: step as u32,
                last_step: (*last_use.get(&v).unwrap_or(&step)).min(launches.len() - 1) as u32,
            });
        }
        // Release what dies here (after allocating this step's outputs, which must not alias
        // this step's inputs), including outputs nobody reads.
        let dying: Vec<ValueId> = roots
            .keys()
            .copied()
            .filter(|r| last_use.get(r).is_none_or(|&u| u <= step))
            .collect();
        for r in dying {
            let (offset, cols) = roots.remove(&r).expect("listed above");
            release(&mut free, offset, cols);
        }
    }
    let mut locations = HashMap::new();
    for v in graph.value_ids() {
        if !in_arena(v) || !graph.is_live(v) || !roots_seen(&buffers, v, graph) {
            continue;
        }
        let (root, col) = root_of(graph, v);
        let act = if outputs.contains(&root) {
            let cols = cols_of(graph, root);
            Act {
                buffer: Buffer::Logits,
                rows: rows_of(graph, v),
                col,
                cols: cols_of(graph, v),
                stride: cols,
            }
        } else {
            let info = buffers
                .iter()
                .find(|b| b.name == format!("{root}"))
                .ok_or_else(|| PassError::Failed {
                    pass: "plan_memory",
                    message: format!("{v} has no buffer"),
                })?;
            Act {
                buffer: Buffer::Arena {
                    offset_cols: info.offset_cols,
                },
                rows: rows_of(graph, v),
                col,
                cols: cols_of(graph, v),
                stride: info.cols,
            }
        };
        locations.insert(v, act);
    }
    Ok(MemoryPlan {
        locations,
        arena_cols,
        unplanned_cols,
        buffers,
    })
}

/// Whether graph output `name` is a logits output (the logits buffer, not the arena).
fn is_logits(name: &str) -> bool {
    name == ir::OUTPUT_LOGITS || name == ir::OUTPUT_MTP_LOGITS
}

/// Whether `v`'s memory was planned (an input no step reads has none).
fn roots_seen(buffers: &[BufferInfo], v: ValueId, graph: &Graph) -> bool {
    match graph.value(v).def {
        ValueDef::Input(_) => buffers.iter().any(|b| b.name == format!("{v}")),
        _ => true,
    }
}

/// Returns `[offset, offset + cols)` to the free list, merging neighbours.
fn release(free: &mut Vec<(u64, u64)>, offset: u64, cols: u64) {
    if cols == 0 {
        return;
    }
    let i = free.partition_point(|&(s, _)| s < offset);
    free.insert(i, (offset, offset + cols));
    if i + 1 < free.len() && free[i].1 == free[i + 1].0 {
        free[i].1 = free[i + 1].1;
        free.remove(i + 1);
    }
    if i > 0 && free[i - 1].1 == free[i].0 {
        free[i - 1].1 = free[i].1;
        free.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::release;

    #[test]
    fn released_ranges_merge_with_neighbours() {
        let mut free = vec![(0, 4), (10, 12)];
        release(&mut free, 4, 6);
        assert_eq!(free, vec![(0, 12)]);
        release(&mut free, 20, 5);
        assert_eq!(free, vec![(0, 12), (20, 25)]);
    }
}
