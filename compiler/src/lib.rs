//! `compiler` is `fdc`: it runs the passes over the graph, selects kernels for a target, plans
//! activation memory, generates CPU code with cranelift, and writes the plan.
//!
//! It never depends on `runtime`: the two meet only in the `.fdp` format. The pipeline's entry
//! point is `compile::compile`; the pass order is `passes::run_pipeline`. Pass tests are IR text
//! snapshots under `compiler/tests/passes/`.

pub mod codegen;
pub mod compile;
pub mod gptq;
pub mod inspect;
pub mod passes;
pub mod quantize;
pub mod smooth;
pub mod targets;
pub mod timing;

pub use compile::{compile, compile_to, CompileError, CompileOptions, CompileReport, WeightOutput};
