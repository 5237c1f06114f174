//! `code_abi` owns the contract between the machine code `fdc` generates ahead of time and the
//! `fdrt` code that calls it: the function-pointer type of every generated kernel, what each
//! argument means, and where in a plan's code section a function may start.
//!
//! Every function in a plan's code section is position-independent x86-64 code with the System V
//! (`extern "C"`) calling convention, has no relocations and calls nothing. A function works on
//! `rows` consecutive rows of row-major `f32` matrices; each `*_stride` is the distance between two
//! rows in `f32` elements (not bytes). The runtime splits the rows of one operation into chunks and
//! calls the function once per chunk, possibly from several threads at once, so a function keeps
//! no state between calls.
//!
//! A generated function is specialized: the shape arguments (`cols`, `group`, `eps`, `n_heads`,
//! `head_dim`) are fixed when the code is generated. They stay in the signatures so that every
//! kernel of one kind has the same type and the runtime can pass what the plan recorded; the code
//! may ignore them. Calling a function with shape arguments other than those it was generated for
//! is a caller bug, not something the code detects.

/// The code symbol of a CUDA plan's module compiled for its architecture (an ELF cubin), which
/// fdrt loads through the driver. A CUDA plan's code section holds this and [`CUDA_PTX`] and no
/// CPU functions.
pub const CUDA_CUBIN: &str = "cuda.cubin";
/// The code symbol of a CUDA plan's module as PTX for its virtual architecture (text).
pub const CUDA_PTX: &str = "cuda.ptx";
/// The code symbol of a DCU plan's module: an AMD GPU code object (ELF) for its gfx
/// architecture, which fdrt's HIP backend loads. A DCU plan's code section holds this, then
/// the [`CUDA_DISPATCH`] and [`CUDA_DECODE_FOLDS`] records (the same kernels, the same rules).
pub const DCU_CODE_OBJECT: &str = "dcu.code_object";
/// The code symbol of a CUDA plan's [`CudaDispatch`] (bincode, through `codec`). Plans written
/// before it have none; fdrt then applies the rule of `kernels::cuda::gemm_from_tokens`.
pub const CUDA_DISPATCH: &str = "cuda.dispatch";

/// The code symbol of a CUDA plan's [`CudaDecodeFolds`] (bincode, through `codec`). Plans
/// written before it have none, and fold nothing.
pub const CUDA_DECODE_FOLDS: &str = "cuda.decode_folds";

/// Which kernel serves each step of a CUDA plan at which pass size, as fdc chose it for the
/// target. A step's registry kernel (`Step::kernel`) serves passes below its threshold; from
/// the threshold on, a matmul runs as a tensor-core GEMM through cuBLAS (quantized weights
/// formed whole in f32 first) when fdrt finds cuBLAS, and on its registry kernel otherwise;
/// attention runs on its tiled prefill kernel when prompt chunks make up enough of the pass.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CudaDispatch {
    /// One entry per step of the program, in order: the pass size in tokens from which the
    /// step runs as a GEMM, or `None` (not a matmul, or never).
    pub gemm_from_tokens: Vec<Option<u32>>,
    /// Attention: the share of a pass's tokens (percent) that must be in prompt chunks for the
    /// tiled prefill kernel to serve it instead of the split decode kernel; `None`: the split
    /// kernel always.
    pub prefill_attention_from_percent: Option<u32>,
}

impl CudaDispatch {
    /// The table for `program`: each matmul's threshold by its weight's stored type
    /// (`gemm_from`), every other step none. fdc writes it; fdrt rebuilds it for plans written
    /// before the table existed.
    pub fn for_program(
        program: &crate::schema::Program,
        weights: &[crate::schema::WeightInfo],
        gemm_from: impl Fn(ir_types::DType) -> Option<u32>,
        prefill_attention_from_percent: Option<u32>,
    ) -> CudaDispatch {
        let gemm_from_tokens = program
            .steps
            .iter()
            .map(|step| match &step.launch {
                crate::schema::Launch::MatMul { w, .. } => weights
                    .get(w.0 as usize)
                    .and_then(|info| gemm_from(info.dtype)),
                _ => None,
            })
            .collect();
        CudaDispatch {
            gemm_from_tokens,
            prefill_attention_from_percent,
        }
    }
}

/// The add-and-RMS-norms of a CUDA plan that passes of one token (decode steps of one
/// sequence) do inside the matmuls around them: the matmul before the norm (its producer) adds
/// the residual and writes the sum, the sum times the norm's weight and per block the sum of
/// squares; each matmul reading the norm's output (its consumers) sums those up and scales its
/// outputs by 1 / rms. The norm itself is not launched. Passes of several tokens run the steps
/// as they are. (The kernels: `FdFold` in `kernels/cuda/common.cuh`.)
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CudaDecodeFolds {
    pub norms: Vec<NormFold>,
}

/// One folded `AddRmsNorm` step, by step indices.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NormFold {
    pub norm: u32,
    /// The matmul just before the norm, whose output is the norm's `d` and nothing else's.
    pub producer: u32,
    /// The matmuls reading the norm's `normed_out`, every reader of it.
    pub consumers: Vec<u32>,
}

impl CudaDecodeFolds {
    /// The folds `program` allows: every `AddRmsNorm` whose step before is a matmul producing
    /// its `d` (read by nothing else) and whose `normed_out` is read by matmuls alone (at least
    /// one), each of them `foldable` (a kernel with fold variants, A16 or plain weights), none
    /// folded twice, with no view the producer's early writes could spoil: the sum and normed
    /// rows must not overlap the producer's input, and the sum must not overlap the residual
    /// unless it is the residual itself.
    pub fn for_program(
        program: &crate::schema::Program,
        foldable: impl Fn(&crate::schema::Step) -> bool,
    ) -> CudaDecodeFolds {
        use crate::schema::{Launch, Rows};
        let steps = &program.steps;
        let mut taken = vec![false; steps.len()];
        let mut norms = vec![];
        for (i, step) in steps.iter().enumerate() {
            let Launch::AddRmsNorm {
                x,
                d,
                sum_out,
                normed_out,
                ..
            } = step.launch
            else {
                continue;
            };
            let Some(p) = i.checked_sub(1) else { continue };
            let Launch::MatMul {
                x: px, out: pout, ..
            } = steps[p].launch
            else {
                continue;
            };
            let views = [x, d, sum_out, normed_out, px, pout];
            if taken[p]
                || pout != d
                || !foldable(&steps[p])
                || views.iter().any(|a| a.rows != Rows::Tokens)
            {
                continue;
            }
            let spoils = |a: &crate::schema::Act| a.overlaps(&px);
            // The producer reads the residual x and never writes d, so x must not be d.
            if spoils(&sum_out)
                || spoils(&normed_out)
                || (sum_out != x && sum_out.overlaps(&x))
                || x.overlaps(&d)
            {
                continue;
            }
            // Readers of `d` and of `normed_out` until each is written again.
            let readers = |view: crate::schema::Act, from: usize| {
                let mut found = vec![];
                for (j, later) in steps.iter().enumerate().skip(from) {
                    let (reads, writes, _) = later.launch.operands();
                    if reads.iter().any(|r| r.overlaps(&view)) {
                        found.push(j);
                    }
                    if writes.iter().any(|w| w.overlaps(&view)) {
                        break;
                    }
                }
                found
            };
            if !readers(d, i + 1).is_empty() {
                continue;
            }
            let consumers = readers(normed_out, i + 1);
            let fits = |&j: &usize| {
                !taken[j]
                    && matches!(steps[j].launch, Launch::MatMul { x, .. } if x == normed_out)
                    && foldable(&steps[j])
            };
            if consumers.is_empty() || !consumers.iter().all(fits) {
                continue;
            }
            taken[p] = true;
            for &j in &consumers {
                taken[j] = true;
            }
            norms.push(NormFold {
                norm: i as u32,
                producer: p as u32,
                consumers: consumers.into_iter().map(|j| j as u32).collect(),
            });
        }
        CudaDecodeFolds { norms }
    }
}

/// Every function entry in a code section starts at a multiple of this many bytes from the start
/// of the section. Generated code addresses its constant pool relative to its own entry and
/// assumes the pool's alignment (16 bytes for vector constants) holds in memory; the loader maps
/// the section page-aligned, so aligned offsets keep that promise with room to spare.
pub const ENTRY_ALIGN: usize = 64;

/// RMS normalization with a learned scale, per group of columns.
///
/// For every row `r < rows` each row of `cols` elements is split into `cols / group` groups of
/// `group` consecutive elements (`group == cols` for a plain norm, `group == head_dim` for a
/// per-head q/k norm). For element `j` of a group `g` (`j` counted inside the group):
///
/// `out[r][g*group + j] = x[r][g*group + j] / sqrt(mean over the group of x^2 + eps) * w[j]`
///
/// `w` holds `group` elements. `x` and `out` may be the same buffer (same rows, same stride).
pub type RmsNormFn = unsafe extern "C" fn(
    x: *const f32,
    x_stride: u64,
    w: *const f32,
    out: *mut f32,
    out_stride: u64,
    rows: u64,
    cols: u64,
    group: u64,
    eps: f32,
);

/// Residual add fused with the following RMS norm (`group == cols`).
///
/// For every row `r < rows` and column `j < cols`: `s = x[r][j] + d[r][j]`,
/// `sum_out[r][j] = s`, and `normed_out[r][j] = s / sqrt(mean_j(s^2) + eps) * w[j]`.
///
/// `sum_out` may be the same buffer as `x` or `d` (an in-place residual update); `normed_out`
/// must not overlap `x` or `d`.
pub type AddRmsNormFn = unsafe extern "C" fn(
    x: *const f32,
    x_stride: u64,
    d: *const f32,
    d_stride: u64,
    w: *const f32,
    sum_out: *mut f32,
    sum_stride: u64,
    normed_out: *mut f32,
    normed_stride: u64,
    rows: u64,
    cols: u64,
    eps: f32,
);

/// SwiGLU activation on a fused gate/up projection.
///
/// Each input row holds `2 * cols` elements, `[g(0..cols) | u(0..cols)]`. For every row `r < rows`
/// and `j < cols`: `out[r][j] = g[j] * sigmoid(g[j]) * u[j]`.
pub type SiluMulFn = unsafe extern "C" fn(
    gu: *const f32,
    gu_stride: u64,
    out: *mut f32,
    out_stride: u64,
    rows: u64,
    cols: u64,
);

/// Rotary position embedding, rotate-half layout (as in Hugging Face Llama).
///
/// Each row holds `n_heads` heads of `head_dim = D` elements. For row `r < rows` at position
/// `p = positions[r]`, every head, and `i < D/2`, with `c = cos[p*D/2 + i]` and
/// `s = sin[p*D/2 + i]`:
///
/// `out[i] = x[i]*c - x[i + D/2]*s` and `out[i + D/2] = x[i + D/2]*c + x[i]*s`.
///
/// `cos` and `sin` are tables of `D/2` elements per position; the caller guarantees every
/// position is inside them (the code does not check). `x` and `out` may be the same buffer.
pub type RopeFn = unsafe extern "C" fn(
    x: *const f32,
    x_stride: u64,
    out: *mut f32,
    out_stride: u64,
    rows: u64,
    n_heads: u64,
    head_dim: u64,
    positions: *const u32,
    cos: *const f32,
    sin: *const f32,
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Act, Buffer, Launch, Program, Rows, Step, WeightRef};

    fn view(offset_cols: u64, cols: u64) -> Act {
        Act {
            buffer: Buffer::Arena { offset_cols },
            rows: Rows::Tokens,
            col: 0,
            cols,
            stride: cols,
        }
    }

    fn step(launch: Launch) -> Step {
        Step {
            kernel: String::new(),
            code: None,
            launch,
        }
    }

    fn matmul(x: Act, out: Act) -> Step {
        step(Launch::MatMul {
            x,
            w: WeightRef(0),
            bias: None,
            out,
        })
    }

    /// o-projection -> add_rms_norm -> gate/up, with the arena regions given.
    fn layer(residual: Act, attn: Act, d: Act, sum: Act, normed: Act) -> Vec<Step> {
        vec![
            matmul(attn, d),
            step(Launch::AddRmsNorm {
                x: residual,
                d,
                w: WeightRef(1),
                eps: 1e-5,
                sum_out: sum,
                normed_out: normed,
            }),
            matmul(normed, view(500, 16)),
        ]
    }

    fn folds(steps: Vec<Step>) -> CudaDecodeFolds {
        let program = Program {
            steps,
            logits_cols: 0,
        };
        CudaDecodeFolds::for_program(&program, |_| true)
    }

    #[test]
    fn a_norm_between_two_matmuls_folds_when_nothing_it_writes_early_is_still_read() {
        let (residual, attn, d, sum, normed) = (
            view(0, 8),
            view(8, 8),
            view(16, 8),
            view(24, 8),
            view(32, 8),
        );
        let found = folds(layer(residual, attn, d, sum, normed));
        assert_eq!(
            found.norms,
            vec![NormFold {
                norm: 1,
                producer: 0,
                consumers: vec![2]
            }]
        );
        // The sum in the columns the producer reads: its blocks would write them while others
        // still read.
        assert!(folds(layer(residual, attn, d, attn, normed))
            .norms
            .is_empty());
        assert!(folds(layer(residual, attn, d, sum, attn)).norms.is_empty());
        // The residual in d's columns, which a folded producer never writes.
        assert!(folds(layer(d, attn, d, sum, normed)).norms.is_empty());
        // d read again later: the folded producer does not write it.
        let mut steps = layer(residual, attn, d, sum, normed);
        steps.push(matmul(d, view(600, 4)));
        assert!(folds(steps).norms.is_empty());
        // The norm's output read by something other than a matmul.
        let mut steps = layer(residual, attn, d, sum, normed);
        steps.push(step(Launch::SiluMul {
            gu: normed,
            out: view(700, 4),
        }));
        assert!(folds(steps).norms.is_empty());
        // No foldable kernel: nothing.
        let program = Program {
            steps: layer(residual, attn, d, sum, normed),
            logits_cols: 0,
        };
        assert!(CudaDecodeFolds::for_program(&program, |_| false)
            .norms
            .is_empty());
    }
}
