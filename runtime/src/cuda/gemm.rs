//! Dense matmuls of many tokens on tensor cores, through cuBLAS: prefill and large decode
//! batches. The warp-per-row kernel of `kernels/cuda/matmul.cu` reads each weight once per 4
//! tokens and multiplies on the FMA units: the right trade for a decode step, which is bound by
//! reading the weights, and 70x behind a GEMM on a 2,048-token prompt (docs/PERF.md). From the
//! pass size the plan records for each matmul (`code_abi::CudaDispatch`, chosen by fdc with
//! `kernels::cuda::gemm_from_tokens`) it goes to cuBLAS instead.
//!
//! bf16 and f16 weights multiply activations rounded to the weights' type (`gemm_input_*` in
//! the plan's module), accumulating in f32, as HF transformers computes in bf16; f32 weights
//! multiply the f32 activations as they are, in f32 (no TF32). Quantized weights (8, 4, 2-bit
//! and e4m3 codes) are formed whole and exactly as f32 (`dequantize_q*_f32`) into a buffer for the
//! largest of them, then multiplied in f32 (f16 moved the quantized goldens past 1e-3): forming
//! the weight costs a write and a read of four bytes per weight, which only a pass of many tokens
//! repays, so fdc sets their threshold higher. cuBLAS is loaded at run time like the driver;
//! without it the engine keeps the row kernels for every pass and says so once.

use super::{ptr, GpuModule, QuantArgs};
use crate::error::RuntimeError;
use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use ir_types::{CodeFormat, DType};

/// cuBLAS's scratch, given to it up front so that it never allocates inside a captured graph.
const WORKSPACE_BYTES: usize = 32 << 20;

/// The cuBLAS handle on the engine's stream, its workspace, and the 16-bit activation buffer.
pub struct Gemm {
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    /// A pass's activations rounded to 16 bits: `max_tokens * max_k` values.
    input: CudaSlice<u16>,
    max_input: usize,
    to_bf16: CudaFunction,
    to_f16: CudaFunction,
    /// `add_f32`, which adds a bias row to every output row (a zero stride repeats it).
    add: CudaFunction,
    /// `dequantize_q{8,4,2}_f32` and the f32 matrix they write: quantized weights are formed
    /// whole for each GEMM (None: the plan has no quantized matmul, or its module predates
    /// these kernels).
    dequantize: Option<Dequantize>,
}

struct Dequantize {
    q8: CudaFunction,
    q4: CudaFunction,
    q2: CudaFunction,
    /// None for a module without FP8 codes (compiled for an architecture without them).
    e4m3: Option<CudaFunction>,
    /// 4-bit codes in the tile layout (`kernels::cuda::TILE_DEQUANTIZE`); None for a module
    /// without them (a plan compiled before the layout).
    q4_tiles: Option<CudaFunction>,
    weights: CudaSlice<f32>,
}

impl Dequantize {
    /// The kernel forming weights of these codes in their layout.
    fn function(&self, q: &QuantArgs) -> Option<&CudaFunction> {
        match q.codes {
            CodeFormat::Int(4) if q.tiles => self.q4_tiles.as_ref(),
            CodeFormat::Int(8) => Some(&self.q8),
            CodeFormat::Int(4) => Some(&self.q4),
            CodeFormat::Int(2) => Some(&self.q2),
            CodeFormat::Fp8E4M3 => self.e4m3.as_ref(),
            CodeFormat::Int(_) => None,
        }
    }
}

/// One matmul `out[t, n] = x[t, k] . w[n, k]` on device addresses; `w` row-major in `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct GemmArgs {
    pub x: u64,
    pub x_stride: i32,
    pub w: u64,
    pub dtype: DType,
    pub k: i32,
    pub n: i32,
    pub t: i32,
    pub out: u64,
    pub out_stride: i32,
    /// f32 `[n]`, or 0 (null) for none.
    pub bias: u64,
}

impl Gemm {
    /// cuBLAS on `gpu`'s stream with room for passes of `max_tokens` tokens of up to `max_k`
    /// inputs; `Err` says why not (no cuBLAS library, or a plan compiled before the module had
    /// the conversion kernels).
    pub fn new(
        gpu: &GpuModule,
        max_tokens: usize,
        max_k: usize,
        max_quant_weight: usize,
    ) -> Result<Gemm, String> {
        // SAFETY: only tries to open the library by its known names.
        if !unsafe { sys::is_culib_present() } {
            return Err("no cuBLAS library (libcublas) on the library path".into());
        }
        let function = |name: &str| {
            gpu.module
                .load_function(name)
                .map_err(|_| format!("the plan's module has no {name} (compiled by an older fdc)"))
        };
        let (to_bf16, to_f16) = (function("gemm_input_bf16")?, function("gemm_input_f16")?);
        let add = function("add_f32")?;
        let blas = CudaBlas::new(gpu.stream.clone()).map_err(|e| format!("cuBLAS: {e}"))?;
        let s = &gpu.stream;
        let workspace = s
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| format!("cuBLAS workspace: {e}"))?;
        // SAFETY: the workspace is a live allocation of this context of the size given, kept
        // as long as the handle (both dropped with this struct).
        unsafe {
            sys::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr(&workspace, s) as *mut _,
                WORKSPACE_BYTES,
            )
        }
        .result()
        .map_err(|e| format!("cuBLAS workspace: {e}"))?;
        let max_input = (max_tokens * max_k).max(1);
        let input = s
            .alloc_zeros::<u16>(max_input)
            .map_err(|e| format!("GEMM input buffer: {e}"))?;
        let dequantize = if max_quant_weight == 0 {
            None
        } else {
            match (
                function("dequantize_q8_f32"),
                function("dequantize_q4_f32"),
                function("dequantize_q2_f32"),
            ) {
                (Ok(q8), Ok(q4), Ok(q2)) => Some(Dequantize {
                    q8,
                    q4,
                    q2,
                    e4m3: function("dequantize_e4m3_f32").ok(),
                    q4_tiles: function(kernels::cuda::TILE_DEQUANTIZE).ok(),
                    weights: s
                        .alloc_zeros::<f32>(max_quant_weight)
                        .map_err(|e| format!("GEMM weight buffer: {e}"))?,
                }),
                _ => None,
            }
        };
        Ok(Gemm {
            dequantize,
            blas,
            _workspace: workspace,
            input,
            max_input,
            to_bf16,
            to_f16,
            add,
        })
    }

    /// Whether a quantized weight of these codes can take the GEMM.
    pub fn dequantizes(&self, q: &QuantArgs) -> bool {
        self.dequantize
            .as_ref()
            .is_some_and(|d| d.function(q).is_some())
    }

    /// Queues a matmul whose weight `a.w` holds quantized codes (`q`): the weight formed whole
    /// as f32 (exactly), then the f32 GEMM over it.
    pub fn run_quantized(
        &self,
        stream: &CudaStream,
        a: &GemmArgs,
        q: &QuantArgs,
    ) -> Result<(), RuntimeError> {
        let fail = |e: &dyn std::fmt::Display| {
            RuntimeError::Cuda(format!(
                "GEMM {}x{} over {} tokens (forming the weight): {e}",
                a.n, a.k, a.t
            ))
        };
        let d = self
            .dequantize
            .as_ref()
            .ok_or_else(|| fail(&"no dequantizing kernels"))?;
        let function = d
            .function(q)
            .ok_or_else(|| fail(&format!("no GEMM for codes {:?}", q.codes)))?;
        if a.n as usize * a.k as usize > d.weights.len() {
            return Err(fail(&"more than the buffer planned for"));
        }
        let weights = ptr(&d.weights, stream);
        let config = LaunchConfig {
            grid_dim: (a.n as u32, (a.k as u32).div_ceil(256), 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(function);
        launch
            .arg(&a.w)
            .arg(&a.k)
            .arg(&q.group)
            .arg(&q.scales)
            .arg(&q.mins)
            .arg(&weights);
        // SAFETY: `dequantize_q*_f32(codes, k, group, scales, mins, out)`: the weight's section
        // holds the codes, scales and minimums of an [n, k] matrix (checked at plan load), and
        // the buffer holds n * k values (checked above).
        unsafe { launch.launch(config) }.map_err(|e| fail(&e))?;
        self.run(
            stream,
            &GemmArgs {
                w: weights,
                dtype: DType::F32,
                ..*a
            },
        )
    }

    /// Queues the matmul, then its bias, on the stream.
    pub fn run(&self, stream: &CudaStream, a: &GemmArgs) -> Result<(), RuntimeError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            RuntimeError::Cuda(format!(
                "GEMM {}x{} over {} tokens ({what}): {e}",
                a.n, a.k, a.t
            ))
        };
        let (data_type, b, ldb) = match a.dtype {
            DType::F32 => (sys::cudaDataType::CUDA_R_32F, a.x, a.x_stride),
            DType::BF16 | DType::F16 => {
                let len = a.t as usize * a.k as usize;
                if len > self.max_input {
                    return Err(fail("input", &"more than the buffer planned for"));
                }
                let (convert, data_type) = if a.dtype == DType::BF16 {
                    (&self.to_bf16, sys::cudaDataType::CUDA_R_16BF)
                } else {
                    (&self.to_f16, sys::cudaDataType::CUDA_R_16F)
                };
                let input = ptr(&self.input, stream);
                let config = LaunchConfig {
                    grid_dim: ((a.k as u32).div_ceil(256), a.t as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut launch = stream.launch_builder(convert);
                launch.arg(&a.x).arg(&a.x_stride).arg(&a.k).arg(&input);
                // SAFETY: the arguments match `gemm_input_*` in matmul.cu; `x` covers t rows of
                // k values (the engine's bounds-checked view) and `input` holds t * k (checked
                // above).
                unsafe { launch.launch(config) }.map_err(|e| fail("rounding the input", &e))?;
                (data_type, input, a.k)
            }
            other => return Err(fail("weights", &format!("no GEMM for {other}"))),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major, as cuBLAS sees it: out^T [n x t] = (w^T)^T [n x k] . x^T [k x t], where
        // row-major w [n, k] is column-major w^T [k x n] (lda k), x rows are columns (ldb),
        // and out's rows are columns of out^T (ldc = its row stride).
        // SAFETY: every pointer is a device allocation of this context covering the extents
        // given (the engine's views are bounds-checked, the weight is [n, k] of `dtype`), and
        // alpha/beta are host values (cuBLAS's default pointer mode).
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                a.n,
                a.t,
                a.k,
                &alpha as *const f32 as *const _,
                a.w as *const _,
                data_type,
                a.k,
                b as *const _,
                data_type,
                ldb,
                &beta as *const f32 as *const _,
                a.out as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                a.out_stride,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| fail("cuBLAS", &e))?;
        if a.bias == 0 {
            return Ok(());
        }
        let config = LaunchConfig {
            grid_dim: ((a.n as u32).div_ceil(256), a.t as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&self.add);
        launch
            .arg(&a.out)
            .arg(&a.out_stride)
            .arg(&a.bias)
            .arg(&0i32)
            .arg(&a.n)
            .arg(&a.out)
            .arg(&a.out_stride);
        // SAFETY: `add_f32`'s arguments: out (t rows of n at out_stride) plus the bias row
        // repeated (stride 0), written in place, each element read before it is written by the
        // same thread.
        unsafe { launch.launch(config) }
            .map(drop)
            .map_err(|e| fail("bias", &e))
    }
}
