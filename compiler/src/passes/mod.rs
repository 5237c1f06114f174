//! The pass pipeline. Each pass is one file with one `pub fn run`, a plain function over the
//! graph whose doc says what it does and does not do. `run_pipeline` lists them in order and, in
//! debug and test builds, runs the verifier after each one.
//!
//! Passes that rewrite the graph: `canonicalize`, `fuse_matmuls`, `fuse_silu_mul`,
//! `fuse_add_rms_norm`, `fuse_rope_attention` (CUDA targets), `cast_weights`. Passes that analyse it for the plan: `quantize_weights`,
//! `select_kernels`,
//! `plan_memory`; `schedule` turns all of that into the plan's linear program.
//!
//! `FDC_DUMP=after:<pass>` (or `after:all`) prints the IR text after a pass to stderr.

pub mod canonicalize;
pub mod cast_weights;
pub mod fuse_add_rms_norm;
pub mod fuse_matmuls;
pub mod fuse_rope_attention;
pub mod fuse_silu_mul;
pub mod plan_memory;
pub mod quantize_weights;
pub mod schedule;
pub mod select_kernels;

use crate::timing;
use ir::{DType, Graph, Target};

/// What every pass may read: the choices the user made on the command line.
#[derive(Clone, Debug)]
pub struct PassCtx {
    pub target: Target,
    /// Storage type for matmul and embedding weights.
    pub weight_dtype: DType,
    /// Quantization of matmul weights (`quantize_weights`).
    pub quant: quantize_weights::QuantOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("after pass {pass}: {source}")]
    Verify {
        pass: &'static str,
        source: ir::verify::VerifyError,
    },
    #[error("pass {pass}: {message}")]
    Failed { pass: &'static str, message: String },
}

type GraphPass = fn(&mut Graph, &PassCtx) -> Result<(), PassError>;

/// The graph rewrites, in order.
pub const REWRITES: &[(&str, GraphPass)] = &[
    ("canonicalize", canonicalize::run),
    ("fuse_matmuls", fuse_matmuls::run),
    ("fuse_silu_mul", fuse_silu_mul::run),
    ("fuse_add_rms_norm", fuse_add_rms_norm::run),
    ("fuse_rope_attention", fuse_rope_attention::run),
    ("cast_weights", cast_weights::run),
];

/// Runs every rewrite in order, verifying after each in debug builds.
pub fn run_pipeline(graph: &mut Graph, ctx: &PassCtx) -> Result<(), PassError> {
    verify_after("builder", graph)?;
    for (name, pass) in REWRITES {
        let _t = timing::scope(name);
        pass(graph, ctx)?;
        verify_after(name, graph)?;
        dump_if_asked(name, graph);
    }
    Ok(())
}

fn verify_after(pass: &'static str, graph: &Graph) -> Result<(), PassError> {
    if cfg!(debug_assertions) {
        ir::verify::verify(graph).map_err(|source| PassError::Verify { pass, source })?;
    }
    Ok(())
}

fn dump_if_asked(pass: &str, graph: &Graph) {
    if let Ok(spec) = std::env::var("FDC_DUMP") {
        if spec
            .split(',')
            .any(|s| s == format!("after:{pass}") || s == "after:all")
        {
            eprintln!("// ---- IR after {pass} ----\n{}", ir::text::print(graph));
        }
    }
}
