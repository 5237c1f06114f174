//! `ir` owns the graph IR the compiler works on (`graph`, `op`, `shape`, `verify`, `text`) and
//! re-exports the vocabulary every crate shares (`types`: dtypes, quant schemes, op kinds,
//! targets), which lives in its own crate `ir-types` (`ir/types/`).
//!
//! It depends on no workspace crate but `ir-types` and knows nothing of checkpoints, kernels, plans or
//! devices. `petgraph` is an implementation detail of `graph`: passes speak of `NodeId` and
//! `ValueId` only. The runtime, kernels and artifacts depend on `ir-types` only, never on this crate.
//! Tests sit beside the code; graph snapshots of whole models live in `compiler/tests/passes`.

pub mod graph;
pub mod op;
pub mod shape;
pub mod text;
pub mod verify;

/// The shared vocabulary, from its own crate so the runtime can use it without the graph.
pub use ir_types as types;

pub use graph::{
    Graph, GraphError, InputKind, NodeId, ValueDef, ValueId, WeightExpr, OUTPUT_HIDDEN,
    OUTPUT_LOGITS, OUTPUT_MTP_HIDDEN, OUTPUT_MTP_LOGITS,
};
pub use op::Op;
pub use shape::{Dim, Shape, TensorType};
pub use types::{
    ActQuant, CodeFormat, CpuIsa, CudaArch, DType, HipArch, MoeRouting, OpKind, QuantScheme, Target,
};
