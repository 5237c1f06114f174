//! `ir` owns the vocabulary every crate shares (`types`: dtypes, quant schemes, op kinds, targets)
//! and the graph IR the compiler works on (`graph`, `op`, `shape`, `verify`, `text`).
//!
//! It depends on no other workspace crate and knows nothing of checkpoints, kernels, plans or
//! devices. `petgraph` is an implementation detail of `graph`: passes speak of `NodeId` and
//! `ValueId` only. The runtime may use `types` and nothing else from here.
//! Tests sit beside the code; graph snapshots of whole models live in `compiler/tests/passes`.

pub mod graph;
pub mod op;
pub mod shape;
pub mod text;
pub mod types;
pub mod verify;

pub use graph::{Graph, GraphError, InputKind, NodeId, ValueDef, ValueId, WeightExpr};
pub use op::Op;
pub use shape::{Dim, Shape, TensorType};
pub use types::{CpuIsa, DType, OpKind, QuantScheme, Target};
