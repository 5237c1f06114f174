//! Decode folds: in a pass of one token, the plan's add-and-RMS-norms run inside the matmuls
//! around them (`code_abi::CudaDecodeFolds`, chosen by fdc; the kernels' side is `FdFold` in
//! `kernels/cuda/common.cuh`). Here the plan's record is checked against its program, each
//! step's part resolved to its kernel, and the producers' partial sums given a place.

use crate::error::RuntimeError;
use crate::plan::LoadedPlan;
use artifacts::code_abi::{self, CudaDecodeFolds};
use artifacts::schema::Launch;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream};
use kernels::registry;
use std::sync::Arc;

/// Rows of a matmul's output per block, in both the quantized and the plain single-token
/// kernels (the tile kernels take `QUANT_TILE_ROWS`): a producer writes one partial sum per
/// block.
const ROWS_PER_BLOCK: u64 = super::QUANT_MATMUL_ROWS as u64;
const _: () = assert!(super::QUANT_MATMUL_ROWS == super::PLAIN_MATMUL_ROWS);

/// What a step does in a pass of one token.
pub(super) enum FoldRole {
    /// Runs as it is.
    Unchanged,
    /// A folded norm: not launched.
    Norm,
    /// The matmul before a folded norm (step `norm`): its fold kernel writes the norm's sum and
    /// weighted sum, and its blocks' sums of squares at `partials` (a device address).
    Producer {
        function: CudaFunction,
        norm: usize,
        partials: u64,
    },
    /// A matmul reading a folded norm's output: its fold kernel scales by 1 / rms from the
    /// `n_partials` sums at `partials`.
    Consumer {
        function: CudaFunction,
        partials: u64,
        n_partials: u32,
        cols: u64,
        eps: f32,
    },
}

pub(super) struct DecodeFolds {
    pub roles: Vec<FoldRole>,
    /// One region of partial sums per fold. Held for its device addresses in `roles`.
    _partials: CudaSlice<f32>,
}

impl DecodeFolds {
    /// The plan's folds resolved; None for a plan without any (or written before them).
    /// `gemm_from`: per step, the pass size from which it runs as a GEMM (the plan's
    /// `CudaDispatch`), which must leave passes of one token to the row kernels.
    pub fn load(
        plan: &LoadedPlan,
        module: &Arc<CudaModule>,
        stream: &Arc<CudaStream>,
        gemm_from: &[Option<u32>],
    ) -> Result<Option<DecodeFolds>, RuntimeError> {
        let Some(bytes) = plan.code_symbol(code_abi::CUDA_DECODE_FOLDS) else {
            return Ok(None);
        };
        let folds: CudaDecodeFolds = artifacts::codec::decode(code_abi::CUDA_DECODE_FOLDS, bytes)?;
        if folds.norms.is_empty() {
            return Ok(None);
        }
        let steps = &plan.program.steps;
        let bad = |why: String| RuntimeError::InvalidPlan(format!("decode folds: {why}"));
        // Blocks of the step's single-token kernel: one partial sum each.
        let blocks = |i: u32, n: u64| {
            let rows = match steps.get(i as usize) {
                Some(step) if super::reads_tiles(plan, step) => {
                    u64::from(kernels::cuda::QUANT_TILE_ROWS)
                }
                _ => ROWS_PER_BLOCK,
            };
            n.div_ceil(rows)
        };
        // A folded matmul's fold kernel must be what serves a pass of one token.
        let matmul_n = |i: u32| match steps.get(i as usize).map(|s| &s.launch) {
            Some(Launch::MatMul { out, .. })
                if gemm_from
                    .get(i as usize)
                    .copied()
                    .flatten()
                    .is_none_or(|t| t > 1) =>
            {
                Ok(out.cols)
            }
            _ => Err(bad(format!(
                "step {i} is not a matmul that runs on its row kernel for one token"
            ))),
        };
        let per_fold = folds
            .norms
            .iter()
            .map(|f| matmul_n(f.producer).map(|n| blocks(f.producer, n)))
            .try_fold(1u64, |most, n| n.map(|n| most.max(n)))?;
        let partials = stream
            .alloc_zeros::<f32>((per_fold as usize) * folds.norms.len())
            .map_err(|e| RuntimeError::Cuda(format!("allocating the decode folds' sums: {e}")))?;
        let base = super::ptr(&partials, stream);
        let function = |step: u32, which: usize| {
            let kernel = &steps[step as usize].kernel;
            let names = if super::reads_tiles(plan, &steps[step as usize]) {
                Some(kernels::cuda::TILE_FOLD_FUNCTIONS)
            } else {
                registry::by_name(kernel).and_then(kernels::cuda::fold_functions)
            };
            let name = names
                .map(|names| names[which])
                .ok_or_else(|| bad(format!("{kernel} (step {step}) has no fold kernels")))?;
            module
                .load_function(name)
                .map_err(|e| bad(format!("the module has no {name}: {e}")))
        };
        let mut roles: Vec<FoldRole> = steps.iter().map(|_| FoldRole::Unchanged).collect();
        for (index, fold) in folds.norms.iter().enumerate() {
            let Some(Launch::AddRmsNorm {
                normed_out, eps, ..
            }) = steps.get(fold.norm as usize).map(|s| &s.launch)
            else {
                return Err(bad(format!("step {} is not an add_rms_norm", fold.norm)));
            };
            // The producer writes the norm's rows early: it must be the step just before, and
            // as wide.
            let n = matmul_n(fold.producer)?;
            if fold.producer + 1 != fold.norm || n != normed_out.cols {
                return Err(bad(format!(
                    "step {} cannot produce step {}'s norm",
                    fold.producer, fold.norm
                )));
            }
            let partials = base + (index as u64) * per_fold * 4;
            let n_partials = blocks(fold.producer, n) as u32;
            let mut assign = |step: u32, role: FoldRole| match roles.get_mut(step as usize) {
                Some(slot @ FoldRole::Unchanged) => {
                    *slot = role;
                    Ok(())
                }
                _ => Err(bad(format!(
                    "step {step} is folded twice or does not exist"
                ))),
            };
            assign(fold.norm, FoldRole::Norm)?;
            assign(
                fold.producer,
                FoldRole::Producer {
                    function: function(fold.producer, 0)?,
                    norm: fold.norm as usize,
                    partials,
                },
            )?;
            for &c in &fold.consumers {
                match steps.get(c as usize).map(|s| &s.launch) {
                    Some(Launch::MatMul { x, .. }) if x == normed_out => {
                        matmul_n(c)?;
                    }
                    _ => {
                        return Err(bad(format!(
                            "step {c} does not read step {}'s norm",
                            fold.norm
                        )))
                    }
                }
                assign(
                    c,
                    FoldRole::Consumer {
                        function: function(c, 1)?,
                        partials,
                        n_partials,
                        cols: normed_out.cols,
                        eps: *eps,
                    },
                )?;
            }
        }
        Ok(Some(DecodeFolds {
            roles,
            _partials: partials,
        }))
    }
}
