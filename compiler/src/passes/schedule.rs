//! `schedule`: turns the graph, the kernel selection and the memory plan into the plan's linear
//! program, one `Launch` per node in `launches` order (views launch nothing).
//!
//! It decides nothing itself: every choice was made by an earlier pass. It only converts IR
//! entities into the plan's schema (activations into `Act`s, weights into `WeightRef`s), which
//! keeps the plan format independent of the IR.

use super::plan_memory::MemoryPlan;
use super::select_kernels::Selection;
use super::PassError;
use artifacts::schema::{Act, Launch, Program, Step, WeightRef};
use ir::{Graph, NodeId, Op, ValueId};
use std::collections::HashMap;

pub struct ScheduleInput<'a> {
    pub graph: &'a Graph,
    pub launches: &'a [NodeId],
    pub selection: &'a Selection,
    pub memory: &'a MemoryPlan,
    /// Weight value -> index into the manifest's weight list.
    pub weight_index: &'a HashMap<ValueId, u32>,
    /// Node -> index into the manifest's code symbols, for generated kernels.
    pub code_index: &'a HashMap<NodeId, u32>,
}

pub fn run(input: &ScheduleInput) -> Result<Program, PassError> {
    let fail = |message: String| PassError::Failed {
        pass: "schedule",
        message,
    };
    let act = |v: ValueId| -> Result<Act, PassError> {
        input
            .memory
            .locations
            .get(&v)
            .copied()
            .ok_or_else(|| fail(format!("{v} has no location")))
    };
    let weight = |v: ValueId| -> Result<WeightRef, PassError> {
        input
            .weight_index
            .get(&v)
            .map(|&i| WeightRef(i))
            .ok_or_else(|| fail(format!("{v} is not a weight")))
    };
    let mut steps = Vec::with_capacity(input.launches.len());
    for &node in input.launches {
        let data = input.graph.node(node);
        let ins = &data.inputs;
        let out = || act(data.outputs[0]);
        let launch = match &data.op {
            Op::Embedding => Launch::Embedding {
                table: weight(ins[0])?,
                out: out()?,
            },
            Op::RmsNorm { eps, group } => Launch::RmsNorm {
                x: act(ins[0])?,
                w: weight(ins[1])?,
                eps: *eps,
                group: *group as u64,
                out: out()?,
            },
            Op::AddRmsNorm { eps } => Launch::AddRmsNorm {
                x: act(ins[0])?,
                d: act(ins[1])?,
                w: weight(ins[2])?,
                eps: *eps,
                sum_out: act(data.outputs[0])?,
                normed_out: act(data.outputs[1])?,
            },
            Op::MatMul => Launch::MatMul {
                x: act(ins[0])?,
                w: weight(ins[1])?,
                bias: ins.get(2).map(|&b| weight(b)).transpose()?,
                out: out()?,
            },
            Op::Add => Launch::Add {
                a: act(ins[0])?,
                b: act(ins[1])?,
                out: out()?,
            },
            Op::Mul => Launch::Mul {
                a: act(ins[0])?,
                b: act(ins[1])?,
                out: out()?,
            },
            Op::Silu => Launch::Silu {
                x: act(ins[0])?,
                out: out()?,
            },
            Op::SiluMul => Launch::SiluMul {
                gu: act(ins[0])?,
                out: out()?,
            },
            Op::Rope { n_heads, head_dim } => Launch::Rope {
                x: act(ins[0])?,
                n_heads: *n_heads as u64,
                head_dim: *head_dim as u64,
                out: out()?,
            },
            Op::Attention {
                layer,
                n_heads,
                n_kv_heads,
                head_dim,
                scale,
                rope,
            } => {
                let (q, k, v, out) = (act(ins[0])?, act(ins[1])?, act(ins[2])?, out()?);
                let (layer, n_heads, n_kv_heads, head_dim, scale) = (
                    *layer as u64,
                    *n_heads as u64,
                    *n_kv_heads as u64,
                    *head_dim as u64,
                    *scale,
                );
                // Two launch kinds rather than a flag: plans of format 6 decode unchanged.
                if *rope {
                    Launch::AttentionRope {
                        q,
                        k,
                        v,
                        layer,
                        n_heads,
                        n_kv_heads,
                        head_dim,
                        scale,
                        out,
                    }
                } else {
                    Launch::Attention {
                        q,
                        k,
                        v,
                        layer,
                        n_heads,
                        n_kv_heads,
                        head_dim,
                        scale,
                        out,
                    }
                }
            }
            Op::MlaAttention {
                layer,
                n_heads,
                nope_dim,
                rope_dim,
                v_dim,
                kv_lora,
                scale,
                rope_interleaved,
            } => Launch::MlaAttention {
                q: act(ins[0])?,
                latent: act(ins[1])?,
                k_rope: act(ins[2])?,
                kv_b: weight(ins[3])?,
                layer: *layer as u64,
                n_heads: *n_heads as u64,
                nope_dim: *nope_dim as u64,
                rope_dim: *rope_dim as u64,
                v_dim: *v_dim as u64,
                kv_lora: *kv_lora as u64,
                scale: *scale,
                rope_interleaved: *rope_interleaved,
                out: out()?,
            },
            Op::GatherRows => Launch::GatherRows {
                x: act(ins[0])?,
                out: out()?,
            },
            Op::Moe {
                experts,
                top_k,
                routing,
                normalize,
                scaling,
            } => {
                let biased = ins.len() == 5;
                Launch::Moe {
                    x: act(ins[0])?,
                    router: weight(ins[1])?,
                    bias: biased.then(|| weight(ins[2])).transpose()?,
                    gate_up: weight(ins[ins.len() - 2])?,
                    down: weight(ins[ins.len() - 1])?,
                    experts: *experts as u64,
                    top_k: *top_k as u64,
                    routing: *routing,
                    normalize: *normalize,
                    scaling: *scaling,
                    out: out()?,
                }
            }
            Op::Split { .. } => return Err(fail(format!("{node} is a view and launches nothing"))),
        };
        let kernel = input
            .selection
            .get(&node)
            .ok_or_else(|| fail(format!("{node} has no kernel")))?;
        steps.push(Step {
            kernel: kernel.id.0.to_string(),
            code: input.code_index.get(&node).copied(),
            launch,
        });
    }
    let logits_cols = input
        .graph
        .outputs()
        .iter()
        .find(|(name, _)| name == "logits")
        .and_then(|(_, v)| input.graph.ty(*v).shape.last_const())
        .ok_or_else(|| fail("the graph has no logits output".into()))? as u64;
    Ok(Program { steps, logits_cols })
}
