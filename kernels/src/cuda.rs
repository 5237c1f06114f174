//! The CUDA kernels: CUDA C sources in `kernels/cuda/`, assembled here into the one module a plan
//! carries. fdc compiles that module with NVRTC for the plan's architecture (cubin, plus PTX for
//! the record); fdrt only loads it through the driver API. The sources need no CUDA headers, so
//! NVRTC alone (the `nvidia-cuda-nvrtc` wheel) is enough to build them.
//!
//! Every kernel is the twin of a CPU kernel in [`crate::cpu`] with the same contract; the CPU
//! kernel's scalar reference is what GPU tests compare against.

use crate::registry::{KernelEntry, KernelSource};
use ir_types::OpKind;

const COMMON: &str = include_str!("../cuda/common.cuh");
const ROWWISE: &str = include_str!("../cuda/rowwise.cu");
const MATMUL: &str = include_str!("../cuda/matmul.cu");
const ATTENTION: &str = include_str!("../cuda/attention.cu");
const QUANT: &str = include_str!("../cuda/quant.cu");
// After matmul.cu: the experts' and the value projection's rows are read with its helpers.
const MOE: &str = include_str!("../cuda/moe.cu");
const MLA: &str = include_str!("../cuda/mla.cu");

/// What a plan's module is specialized to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Attention head dimension: even, at most 256.
    pub head_dim: u32,
}

impl ModuleSpec {
    /// Checks what the kernels can be built for.
    pub fn check(&self) -> Result<(), String> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > 256 {
            return Err(format!(
                "the CUDA attention kernel needs an even head dimension up to 256, the model has {}",
                self.head_dim
            ));
        }
        Ok(())
    }
}

/// The module's full source for `spec`: its constants, then every source file.
pub fn module_source(spec: &ModuleSpec) -> String {
    format!(
        "// Built by fdc for one plan.\n#define FD_HEAD_DIM {}\n\n{COMMON}\n{ROWWISE}\n{MATMUL}\n{ATTENTION}\n{QUANT}\n{MOE}\n{MLA}",
        spec.head_dim
    )
}

/// The same module for a HIP compiler (the DCU target): the HIP runtime header and `FD_HIP`
/// first, which select the few HIP forms in `common.cuh` (shuffles within 32-lane halves of a
/// 64-lane wavefront, half conversions without PTX) and the DCU's own kernels.
pub fn hip_module_source(spec: &ModuleSpec) -> String {
    format!(
        "#include <hip/hip_runtime.h>\n#define FD_HIP 1\n{}",
        module_source(spec)
    )
}

/// A mixture-of-experts launch's functions: routing, gate-up and down per (token, pick) row,
/// each for f32, bf16 and f16 weights (in that order, from [`MOE_ROUTE`], [`MOE_GATE_UP`],
/// [`MOE_DOWN`]), `silu_mul_f32` between gate-up and down, then what passes of several tokens
/// run instead of the per-row gate-up and down: the grouping by expert ([`MOE_GROUP`]), the
/// gather of the rows in that order, the tile kernel for each weight type ([`MOE_TILE`]) and
/// the combine ([`MOE_COMBINE`]).
pub const MOE_FUNCTIONS: [&str; 16] = [
    "moe_route_f32",
    "moe_route_bf16",
    "moe_route_f16",
    "moe_gate_up_f32",
    "moe_gate_up_bf16",
    "moe_gate_up_f16",
    "moe_down_f32",
    "moe_down_bf16",
    "moe_down_f16",
    "silu_mul_f32",
    "moe_group",
    "moe_gather_f32",
    "moe_tile_f32",
    "moe_tile_bf16",
    "moe_tile_f16",
    "moe_combine_f32",
];
pub const MOE_ROUTE: usize = 0;
pub const MOE_GATE_UP: usize = 3;
pub const MOE_DOWN: usize = 6;
pub const MOE_SILU_MUL: usize = 9;
pub const MOE_GROUP: usize = 10;
pub const MOE_GATHER: usize = 11;
pub const MOE_TILE: usize = 12;
pub const MOE_COMBINE: usize = 15;

/// A mixture of quantized experts' functions: the routing for f32, bf16 and f16 routers (from
/// [`MOE_ROUTE`]), then the scheme's per-row gate-up, `silu_mul_f32`, per-row down, the combine,
/// the grouping, the gather and the scheme's tile kernel (at [`MOE_QUANT_GATE_UP`] ...), then
/// for the A8 and FP8 schemes the activations' quantizer ([`MOE_QUANT_ACTIVATIONS`]).
macro_rules! moe_quant_functions {
    ($codes:literal $(, $quantize:literal)?) => {
        &[
            "moe_route_f32",
            "moe_route_bf16",
            "moe_route_f16",
            concat!("moe_gate_up_", $codes),
            "silu_mul_f32",
            concat!("moe_down_", $codes),
            "moe_combine_f32",
            "moe_group",
            "moe_gather_f32",
            concat!("moe_tile_", $codes),
            $($quantize,)?
        ]
    };
}
pub const MOE_QUANT_GATE_UP: usize = 3;
pub const MOE_QUANT_SILU_MUL: usize = 4;
pub const MOE_QUANT_DOWN: usize = 5;
pub const MOE_QUANT_COMBINE: usize = 6;
pub const MOE_QUANT_GROUP: usize = 7;
pub const MOE_QUANT_GATHER: usize = 8;
pub const MOE_QUANT_TILE: usize = 9;
pub const MOE_QUANT_ACTIVATIONS: usize = 10;

/// Quantized experts group a pass's rows by expert only from this many rows per expert on
/// average (`picks >= MOE_QUANT_GROUP_FROM * experts`): below it most tiles are partial, and
/// the quantized tile kernel's token block runs all its slots (measured on an H100 at
/// Qwen3-30B-A3B's shape, W4A16, decode at batch 32: 1.65 ms per step per row, 1.82 grouped;
/// docs/PERF.md). Plain experts group every pass of several tokens.
pub const MOE_QUANT_GROUP_FROM: usize = 4;

/// Output rows per block of the plain experts' row and tile kernels (`FD_MOE_ROWS`: a warp each).
pub const MOE_ROWS_PER_BLOCK: u32 = 8;

/// Rows of one expert a tile kernel reads its weights once for (`FD_MOE_TILE`): the grid of a
/// pass's tile launches holds every possible tile, `ceil(picks / MOE_TILE) + min(experts,
/// picks)`.
pub const MOE_TILE_ROWS: usize = 4;

/// A latent-attention launch's functions: the cache append, then the attention for f32, bf16
/// and f16 `kv_b` (from [`MLA_ATTENTION`]).
pub const MLA_FUNCTIONS: [&str; 4] = [
    "mla_append_f32",
    "mla_attention_f32",
    "mla_attention_bf16",
    "mla_attention_f16",
];
pub const MLA_ATTENTION: usize = 1;

/// The offset of a weight stored as `dtype` among a function's f32, bf16 and f16 variants.
pub fn dtype_variant(dtype: ir_types::DType) -> Option<usize> {
    match dtype {
        ir_types::DType::F32 => Some(0),
        ir_types::DType::BF16 => Some(1),
        ir_types::DType::F16 => Some(2),
        _ => None,
    }
}

/// The latent attention kernel's limits (`kernels/cuda/mla.cu`): latent rank, rope, no-rope
/// and value dims per head.
pub const MLA_MAX_LORA: u64 = 1024;
pub const MLA_MAX_ROPE: u64 = 128;
pub const MLA_MAX_HEAD: u64 = 256;

/// Experts a routing launch ranks at most (`kernels/cuda/moe.cu`).
pub const MOE_MAX_EXPERTS: u64 = 512;

/// Pass size (tokens) from which a matmul of plain (f32, bf16, f16) weights runs as a cuBLAS
/// GEMM on tensor cores rather than on `matmul_*`: below it the row kernel, which reads the
/// weights at the copy bandwidth, is as fast, since tensor cores only pay once a weight read
/// serves many tokens (measured on an H100, docs/PERF.md).
pub const GEMM_MIN_TOKENS: u32 = 16;

/// Pass size from which a matmul of quantized weights runs as a GEMM: its weight is formed whole
/// in f32 first, a write and a read of four bytes per weight that only many tokens repay.
pub const GEMM_MIN_TOKENS_QUANTIZED: u32 = 64;

/// The pass size from which a matmul with weights stored as `dtype` (U8 for quantized codes)
/// runs as a tensor-core GEMM on CUDA targets: what fdc records in a plan's `CudaDispatch`.
pub fn gemm_from_tokens(dtype: ir_types::DType) -> Option<u32> {
    use ir_types::DType;
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Some(GEMM_MIN_TOKENS),
        DType::U8 => Some(GEMM_MIN_TOKENS_QUANTIZED),
        _ => None,
    }
}

/// Share of a pass's tokens (percent) in prompt chunks from which attention runs on the tiled
/// prefill kernel (`attention_prefill_f32`: a tile of queries of one sequence shares each tile
/// of keys) rather than the split decode kernel (one query per block and chunk of positions).
pub const PREFILL_ATTENTION_FROM_PERCENT: u32 = 50;

/// K and group sizes the quantized CUDA kernels take must be multiples of this: a lane's span of
/// codes (up to 16 k) lies inside one group.
pub const QUANT_K_MULTIPLE: usize = 16;

/// The W4A16 matmul on tensor cores over the tile layout (`qmatmul_tiles` in `cuda/quant.cu`;
/// the plan's `WeightLayout::QuantTiles`), which a step whose weight has that layout launches in
/// place of its registry kernel's matmul functions: its kernel for several tokens, then its
/// kernel for one, as [`functions`] lists them.
pub const TILE_MATMUL_FUNCTIONS: [&str; 2] = ["matmul_q4t", "matmul_q4t_one"];
/// The decode-fold variants of `matmul_q4t_one`, as [`fold_functions`] gives them.
pub const TILE_FOLD_FUNCTIONS: [&str; 2] = ["matmul_q4t_one_add_norm", "matmul_q4t_one_rms"];
/// The tile layout's whole matrix as f32, for the GEMM (`dequantize_q4_f32`'s arguments).
pub const TILE_DEQUANTIZE: &str = "dequantize_q4t_f32";
/// Output rows per block of the tile kernels (`QTILE_ROWS`): an mma's 16 rows.
pub const QUANT_TILE_ROWS: u32 = 16;
/// Threads per block of `matmul_q4t` (`QTILE_WARPS` warps) and of the single-token kernels
/// (`QTILE_WARPS_ONE`).
pub const QUANT_TILE_THREADS: u32 = 32 * 4;
pub const QUANT_TILE_THREADS_ONE: u32 = 32 * 16;
/// K and the group of a tiled weight are multiples of this: a lane's 16 bytes of codes hold
/// four mmas' 64 k, all scaled by one group's scale.
pub const QUANT_TILE_K_MULTIPLE: usize = 64;

/// Whether a quantized `[rows, cols]` weight may be stored in the tile layout for the CUDA
/// matmul on tensor cores: 4-bit symmetric codes under an A16 scheme (activations read as f32),
/// whole tiles of rows, and K and the group multiples of [`QUANT_TILE_K_MULTIPLE`]. fdc stores
/// every such weight that only matmuls read in tiles on CUDA targets; fdrt checks it again.
pub fn tiles_fit(
    scheme: ir_types::QuantScheme,
    format: &crate::cpu::QuantFormat,
    rows: usize,
    cols: usize,
) -> bool {
    scheme == ir_types::QuantScheme::W4A16
        && format.codes == ir_types::CodeFormat::Int(4)
        && !format.asymmetric
        && rows > 0
        && rows.is_multiple_of(QUANT_TILE_ROWS as usize)
        && cols > 0
        && cols.is_multiple_of(QUANT_TILE_K_MULTIPLE)
        && format.group > 0
        && format.group.is_multiple_of(QUANT_TILE_K_MULTIPLE)
        && cols.is_multiple_of(format.group)
}

/// The 4-bit codes of a `[rows, cols]` matrix moved from the CUDA panels of 8 rows
/// (`PackedLayout::CUDA_QUANT`: for each panel and k, 4 bytes, row `j` of the panel in nibble
/// `j / 4` of byte `j % 4`) into the tile layout `qmatmul_tiles` reads (`cuda/quant.cu` says it
/// in full): per tile of 16 rows and chunk of 64 k, lane L's 16 bytes, word w for k 16w to
/// 16w + 15, nibble j the element (row g + 8 (j & 1), k 2t + 8 ((j >> 1) & 1) + (j >> 2)),
/// g = L / 4, t = L % 4. The same number of bytes; `tiles_fit` holds for the shape.
pub fn tiles_from_panels(panels: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    debug_assert_eq!(panels.len(), rows * cols / 2);
    let mut tiles = vec![0u8; panels.len()];
    let chunks = cols / 64;
    for row in 0..rows {
        let (panel, j) = (row / 8, row % 8);
        let (tile, r16) = (row / 16, row % 16);
        let (g, half) = (r16 % 8, r16 / 8);
        for k in 0..cols {
            let code = (panels[(panel * cols + k) * 4 + j % 4] >> (4 * (j / 4))) & 15;
            let (chunk, w, kin) = (k / 64, (k % 64) / 16, k % 16);
            let (high8, t, odd) = (kin / 8, (kin % 8) / 2, kin % 2);
            let nibble = half | (high8 << 1) | (odd << 2);
            let word = ((tile * chunks + chunk) * 32 + g * 4 + t) * 4 + w;
            tiles[word * 4 + nibble / 2] |= code << (4 * (nibble % 2));
        }
    }
    tiles
}

/// The module functions a GPU kernel of the registry (CUDA or HIP) launches, in launch order.
pub fn functions(entry: &KernelEntry) -> &'static [&'static str] {
    debug_assert!(matches!(
        entry.source,
        KernelSource::Cuda | KernelSource::Hip
    ));
    use ir_types::QuantScheme;
    match (entry.key.op, entry.key.quant) {
        // The DCU's W4A8: int8 dot products of codes and activations (`matmul_q4_a8` in
        // quant.cu, HIP only).
        (OpKind::MatMul, QuantScheme::W4A8) if entry.source == KernelSource::Hip => {
            return &["quantize_rows_i8_f32", "matmul_q4_a8", "matmul_q4_a8_one"]
        }
        // A quantized matmul ends with its kernel for passes of several tokens, then its
        // kernel for a single token.
        (OpKind::MatMul, QuantScheme::W8A16) => return &["matmul_q8", "matmul_q8_one"],
        (OpKind::MatMul, QuantScheme::W4A16) => return &["matmul_q4", "matmul_q4_one"],
        (OpKind::MatMul, QuantScheme::W2A16) => return &["matmul_q2", "matmul_q2_one"],
        // The A8 and FP8 schemes quantize the activations first, then the matmul reads them.
        (OpKind::MatMul, QuantScheme::W8A8) => {
            return &["quantize_rows_i8_f32", "matmul_q8", "matmul_q8_one"]
        }
        (OpKind::MatMul, QuantScheme::W4A8) => {
            return &["quantize_rows_i8_f32", "matmul_q4", "matmul_q4_one"]
        }
        (OpKind::MatMul, QuantScheme::Fp8) => {
            return &["quantize_rows_e4m3_f32", "matmul_e4m3", "matmul_e4m3_one"]
        }
        (OpKind::Moe, QuantScheme::W8A16) => return moe_quant_functions!("q8"),
        (OpKind::Moe, QuantScheme::W4A16) => return moe_quant_functions!("q4"),
        (OpKind::Moe, QuantScheme::W2A16) => return moe_quant_functions!("q2"),
        (OpKind::Moe, QuantScheme::W8A8) => {
            return moe_quant_functions!("q8", "quantize_rows_i8_f32")
        }
        (OpKind::Moe, QuantScheme::W4A8) => {
            return moe_quant_functions!("q4", "quantize_rows_i8_f32")
        }
        (OpKind::Moe, QuantScheme::Fp8) => {
            return moe_quant_functions!("e4m3", "quantize_rows_e4m3_f32")
        }
        (OpKind::Embedding, QuantScheme::W8A16 | QuantScheme::W8A8) => return &["embedding_q8"],
        (OpKind::Embedding, QuantScheme::W4A16 | QuantScheme::W4A8) => return &["embedding_q4"],
        (OpKind::Embedding, QuantScheme::W2A16) => return &["embedding_q2"],
        (OpKind::Embedding, QuantScheme::Fp8) => return &["embedding_e4m3"],
        _ => {}
    }
    match (entry.key.op, entry.key.dtype) {
        (OpKind::Embedding, ir_types::DType::BF16) => &["embedding_bf16"],
        (OpKind::Embedding, ir_types::DType::F16) => &["embedding_f16"],
        (OpKind::Embedding, _) => &["embedding_f32"],
        // A plain matmul: its kernel for several tokens, then its kernel for a single token.
        (OpKind::MatMul, ir_types::DType::BF16) => &["matmul_bf16", "matmul_bf16_one"],
        (OpKind::MatMul, ir_types::DType::F16) => &["matmul_f16", "matmul_f16_one"],
        (OpKind::MatMul, _) => &["matmul_f32", "matmul_f32_one"],
        (OpKind::RmsNorm, _) => &["rms_norm_f32"],
        (OpKind::AddRmsNorm, _) => &["add_rms_norm_f32"],
        (OpKind::Add, _) => &["add_f32"],
        (OpKind::Mul, _) => &["mul_f32"],
        (OpKind::Silu, _) => &["silu_f32"],
        (OpKind::SiluMul, _) => &["silu_mul_f32"],
        (OpKind::Rope, _) => &["rope_f32"],
        (OpKind::Attention, _) => &[
            "kv_append_f32",
            "attention_partial_f32",
            "attention_merge_f32",
        ],
        (OpKind::GatherRows, _) => &["gather_rows_f32"],
        // The variant for each weight's storage type, picked at launch (`MOE_FUNCTIONS`).
        (OpKind::Moe, _) => &MOE_FUNCTIONS,
        (OpKind::MlaAttention, _) => &MLA_FUNCTIONS,
    }
}

/// The decode-fold variants of a matmul kernel's single-token function (`FdFold` in
/// `cuda/common.cuh`): the producer's (`_add_norm`) and a consumer's (`_rms`); None for kernels
/// without them (the A8 and FP8 schemes, whose activations are quantized before the matmul).
pub fn fold_functions(entry: &KernelEntry) -> Option<[&'static str; 2]> {
    use ir_types::{DType, QuantScheme};
    if !matches!(entry.source, KernelSource::Cuda | KernelSource::Hip)
        || entry.key.op != OpKind::MatMul
    {
        return None;
    }
    Some(match (entry.key.quant, entry.key.dtype) {
        (QuantScheme::W8A16, _) => ["matmul_q8_one_add_norm", "matmul_q8_one_rms"],
        (QuantScheme::W4A16, _) => ["matmul_q4_one_add_norm", "matmul_q4_one_rms"],
        (QuantScheme::W2A16, _) => ["matmul_q2_one_add_norm", "matmul_q2_one_rms"],
        (QuantScheme::None, DType::BF16) => ["matmul_bf16_one_add_norm", "matmul_bf16_one_rms"],
        (QuantScheme::None, DType::F16) => ["matmul_f16_one_add_norm", "matmul_f16_one_rms"],
        (QuantScheme::None, DType::F32) => ["matmul_f32_one_add_norm", "matmul_f32_one_rms"],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::entries;

    #[test]
    fn every_function_a_gpu_kernel_launches_is_defined_in_the_module() {
        let cuda = module_source(&ModuleSpec { head_dim: 64 });
        let hip = hip_module_source(&ModuleSpec { head_dim: 64 });
        for entry in entries() {
            let source = match entry.source {
                KernelSource::Cuda => &cuda,
                KernelSource::Hip => &hip,
                _ => continue,
            };
            let names = functions(entry);
            assert!(!names.is_empty(), "{}", entry.id);
            for name in names {
                // `extern "C" __global__ void [__launch_bounds__(..)] name(`
                let defined = source
                    .split("extern \"C\" __global__ void")
                    .skip(1)
                    .any(|def| {
                        let def = def.trim_start();
                        let def = match def.strip_prefix("__launch_bounds__(") {
                            Some(rest) => rest.split_once(')').map_or("", |(_, r)| r).trim_start(),
                            None => def,
                        };
                        def.starts_with(&format!("{name}("))
                    });
                assert!(defined, "{} launches {name}", entry.id);
            }
            // A W4A16 matmul over tiles launches the tile kernels instead (CUDA only).
            if entry.source == KernelSource::Cuda
                && entry.key.op == OpKind::MatMul
                && entry.key.quant == ir_types::QuantScheme::W4A16
            {
                let tiles = TILE_MATMUL_FUNCTIONS.iter().chain(&TILE_FOLD_FUNCTIONS);
                for name in tiles.chain([&TILE_DEQUANTIZE]) {
                    assert!(
                        source.contains(&format!("{name}(const float* x"))
                            || source.contains(&format!("void {name}(")),
                        "{} has no {name}",
                        entry.id
                    );
                }
            }
            // The fold variants come from one macro per kernel family, named by the single-token
            // function they extend.
            for name in fold_functions(entry).into_iter().flatten() {
                let (base, _) = name.rsplit_once("_one_").expect("a fold variant's name");
                let family = format!("_FOLDS({base}_one, ");
                assert!(source.contains(&family), "{} has no {name}", entry.id);
                assert!(names
                    .last()
                    .is_some_and(|one| *one == format!("{base}_one")));
            }
        }
    }

    /// The tile layout read back by the mma's fragment rules (PTX `mma.m16n8k16`, 16-bit A:
    /// register r of lane (g, t) holds rows g + 8 (r & 1) and k 2t + 8 (r >> 1), two consecutive
    /// k, low half first; `fd_codes_bf16x2` takes register r from nibbles r and r + 4 of a word)
    /// gives back every code of the matrix.
    #[test]
    fn tiles_hold_each_code_where_the_mma_fragment_reads_it() {
        let (rows, cols) = (32, 128);
        let code = |row: usize, k: usize| ((row * 7 + k * 13 + row * k / 5) % 16) as u8;
        let mut panels = vec![0u8; rows * cols / 2];
        for row in 0..rows {
            let (panel, j) = (row / 8, row % 8);
            for k in 0..cols {
                panels[(panel * cols + k) * 4 + j % 4] |= code(row, k) << (4 * (j / 4));
            }
        }
        let tiles = tiles_from_panels(&panels, rows, cols);
        let mut seen = vec![false; rows * cols];
        for (piece, bytes) in tiles.chunks(16).enumerate() {
            let (lane, tile_chunk) = (piece % 32, piece / 32);
            let (tile, chunk) = (tile_chunk / (cols / 64), tile_chunk % (cols / 64));
            let (g, t) = (lane / 4, lane % 4);
            for w in 0..4 {
                let word = u32::from_le_bytes(bytes[4 * w..4 * w + 4].try_into().unwrap());
                for r in 0..4 {
                    for half in 0..2 {
                        let nibble = r + 4 * half;
                        let value = ((word >> (4 * nibble)) & 15) as u8;
                        let row = tile * 16 + g + 8 * (r & 1);
                        let k = chunk * 64 + w * 16 + 2 * t + 8 * (r >> 1) + half;
                        assert_eq!(value, code(row, k), "row {row}, k {k}");
                        seen[row * cols + k] = true;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s), "every code is read once");
    }

    /// A host model of one launch of `qmatmul_tiles` (`cuda/quant.cu`), statement for
    /// statement: the warps' chunks and slots, the activations' three bf16 pieces staged per
    /// lane, the codes unpacked by the kernel's constants (bf16 128 + v, then times 1 minus
    /// 136), each `mma.m16n8k16` formed from the 32 lanes' registers by the PTX fragment rules
    /// (A: rows g, g + 8, k 2t, 2t + 8; B: k 2t, 2t + 8, column g; D: row g, g + 8, columns 2t,
    /// 2t + 1), the chunk's scale, the lane pairs' sum and the warps' reduction. Its outputs
    /// must be the matrix product to f32 accuracy: an index or constant the kernel gets wrong
    /// here shows up as a wrong row or token. (The kernel itself runs in the GPU tests.)
    #[test]
    #[allow(clippy::needless_range_loop)] // indexed as the kernel indexes, to read side by side
    fn the_tile_kernels_walk_gives_the_matrix_product() {
        use half::{bf16, f16};
        struct Model {
            warps: usize,
            tokens_per_block: usize,
        }
        fn lop3_bf16(w: u32) -> [f32; 2] {
            let p = (w & 0x000f_000f) | 0x4300_4300;
            let (one, minus136) = (bf16::from_bits(0x3f80), bf16::from_bits(0xc308));
            [p as u16, (p >> 16) as u16].map(|h| {
                let v = bf16::from_bits(h).to_f32() * one.to_f32() + minus136.to_f32();
                bf16::from_f32(v).to_f32()
            })
        }
        fn split3(v: f32) -> [u16; 3] {
            let hi = bf16::from_f32(v);
            let r = v - hi.to_f32();
            let mid = bf16::from_f32(r);
            let lo = bf16::from_f32(r - mid.to_f32());
            [hi.to_bits(), mid.to_bits(), lo.to_bits()]
        }
        #[allow(clippy::too_many_arguments)]
        fn run(
            m: &Model,
            x: &[f32],
            t: usize,
            tiles: &[u32],
            k: usize,
            n: usize,
            group: usize,
            scales: &[f16],
        ) -> Vec<f32> {
            const UNIT: usize = 2;
            const SLOTS: usize = 4;
            let (chunks, groups) = (k / 64, k / group);
            let mmas = m.tokens_per_block.div_ceil(2);
            let mut out = vec![f32::NAN; t * n];
            for tile in 0..n / 16 {
                for t0 in (0..t).step_by(m.tokens_per_block) {
                    let tokens = (t - t0).min(m.tokens_per_block);
                    let mut reduced = vec![vec![[0f32; 16]; m.tokens_per_block]; m.warps];
                    for warp in 0..m.warps {
                        let mut acc = vec![vec![[0f32; 2]; mmas]; 32];
                        let mut c0 = warp * UNIT;
                        while c0 < chunks {
                            let chunk_of = |s: usize| c0 + (s / UNIT) * m.warps * UNIT + s % UNIT;
                            // Staging: lane L takes 8 k of slot L / 8.
                            let mut xs = vec![[[0u16; SLOTS * 64]; 3]; m.tokens_per_block];
                            for lane in 0..32 {
                                let (s, kk) = (lane / 8, (lane % 8) * 8);
                                let chunk = chunk_of(s);
                                for (tok, x_tok) in xs.iter_mut().enumerate() {
                                    for i in 0..8 {
                                        let v = if tok < tokens && chunk < chunks {
                                            x[(t0 + tok) * k + chunk * 64 + kk + i]
                                        } else {
                                            0.0
                                        };
                                        for (p, piece) in split3(v).into_iter().enumerate() {
                                            x_tok[p][s * 64 + kk + i] = piece;
                                        }
                                    }
                                }
                            }
                            for s in 0..SLOTS {
                                let chunk = chunk_of(s);
                                if chunk >= chunks {
                                    break;
                                }
                                let grp = chunk * 64 / group;
                                let mut d = vec![vec![[0f32; 4]; mmas]; 32];
                                for w in 0..4 {
                                    // Each lane's registers, then the mma over all 32.
                                    let a: Vec<[[f32; 2]; 4]> = (0..32)
                                        .map(|lane| {
                                            let word = tiles
                                                [((tile * chunks + chunk) * 32 + lane) * 4 + w];
                                            [0, 1, 2, 3].map(|j| lop3_bf16(word >> (4 * j)))
                                        })
                                        .collect();
                                    for mm in 0..mmas {
                                        let b: Vec<[[f32; 2]; 2]> = (0..32)
                                            .map(|lane| {
                                                let (g, tq) = (lane / 4, lane % 4);
                                                let (token, piece) = (2 * mm + g / 4, g % 4);
                                                let kb = s * 64 + w * 16 + 2 * tq;
                                                let at = |i: usize| {
                                                    if piece < 3 && token < m.tokens_per_block {
                                                        bf16::from_bits(xs[token][piece][i])
                                                            .to_f32()
                                                    } else {
                                                        0.0
                                                    }
                                                };
                                                [[at(kb), at(kb + 1)], [at(kb + 8), at(kb + 9)]]
                                            })
                                            .collect();
                                        let mut am = [[0f64; 16]; 16];
                                        let mut bm = [[0f64; 8]; 16];
                                        for lane in 0..32 {
                                            let (g, tq) = (lane / 4, lane % 4);
                                            for (r, reg) in a[lane].iter().enumerate() {
                                                for (h, v) in reg.iter().enumerate() {
                                                    am[g + 8 * (r & 1)]
                                                        [2 * tq + 8 * (r >> 1) + h] = *v as f64;
                                                }
                                            }
                                            for (r, reg) in b[lane].iter().enumerate() {
                                                for (h, v) in reg.iter().enumerate() {
                                                    bm[2 * tq + 8 * r + h][g] = *v as f64;
                                                }
                                            }
                                        }
                                        for (lane, dl) in d.iter_mut().enumerate() {
                                            let (g, tq) = (lane / 4, lane % 4);
                                            for (i, v) in dl[mm].iter_mut().enumerate() {
                                                let (row, col) = (g + 8 * (i / 2), 2 * tq + i % 2);
                                                let sum: f64 = (0..16)
                                                    .map(|kk| am[row][kk] * bm[kk][col])
                                                    .sum();
                                                *v = (*v as f64 + sum) as f32;
                                            }
                                        }
                                    }
                                }
                                for (lane, al) in acc.iter_mut().enumerate() {
                                    let g = lane / 4;
                                    let s0 = scales[((2 * tile) * groups + grp) * 8 + g].to_f32();
                                    let s1 =
                                        scales[((2 * tile + 1) * groups + grp) * 8 + g].to_f32();
                                    for mm in 0..mmas {
                                        al[mm][0] += s0 * (d[lane][mm][0] + d[lane][mm][1]);
                                        al[mm][1] += s1 * (d[lane][mm][2] + d[lane][mm][3]);
                                    }
                                }
                            }
                            c0 += m.warps * SLOTS;
                        }
                        for lane in 0..32 {
                            let (g, tq) = (lane / 4, lane % 4);
                            for mm in 0..mmas {
                                let token = 2 * mm + tq / 2;
                                if tq % 2 == 0 && token < m.tokens_per_block {
                                    reduced[warp][token][g] =
                                        acc[lane][mm][0] + acc[lane ^ 1][mm][0];
                                    reduced[warp][token][g + 8] =
                                        acc[lane][mm][1] + acc[lane ^ 1][mm][1];
                                }
                            }
                        }
                    }
                    for tok in 0..tokens {
                        for r in 0..16 {
                            let v: f32 = reduced.iter().map(|w| w[tok][r]).sum();
                            out[(t0 + tok) * n + tile * 16 + r] = v;
                        }
                    }
                }
            }
            out
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let n = 32;
        for (k, group) in [(1088, 64), (256, 128), (256, 256)] {
            let codes: Vec<u8> = (0..n * k).map(|_| (next() % 16) as u8).collect();
            let groups = k / group;
            let scales: Vec<f16> = (0..n * groups)
                .map(|_| f16::from_f32(0.01 + (next() % 1000) as f32 * 1e-5))
                .collect();
            // Scales in panels of 8 rows: (panel, group, row of the panel).
            let scale =
                |row: usize, c: usize| scales[((row / 8) * groups + c / group) * 8 + row % 8];
            let mut panels = vec![0u8; n * k / 2];
            for row in 0..n {
                let (panel, j) = (row / 8, row % 8);
                for c in 0..k {
                    panels[(panel * k + c) * 4 + j % 4] |= codes[row * k + c] << (4 * (j / 4));
                }
            }
            let tiles: Vec<u32> = tiles_from_panels(&panels, n, k)
                .chunks(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            for (model, t) in [
                (
                    Model {
                        warps: 16,
                        tokens_per_block: 1,
                    },
                    1,
                ),
                (
                    Model {
                        warps: 4,
                        tokens_per_block: 4,
                    },
                    7,
                ),
            ] {
                // Activations of mixed sizes, some far below and above 1.
                let x: Vec<f32> = (0..t * k)
                    .map(|_| {
                        let v = (next() % 20001) as f32 / 10000.0 - 1.0;
                        v * [1e-3f32, 1.0, 300.0][(next() % 3) as usize]
                    })
                    .collect();
                let got = run(&model, &x, t, &tiles, k, n, group, &scales);
                for tok in 0..t {
                    let want: Vec<f64> = (0..n)
                        .map(|row| {
                            (0..k)
                                .map(|c| {
                                    let w =
                                        (codes[row * k + c] as f64 - 8.0) * scale(row, c).to_f64();
                                    w * x[tok * k + c] as f64
                                })
                                .sum()
                        })
                        .collect();
                    let largest = want.iter().fold(0f64, |a, v| a.max(v.abs()));
                    for row in 0..n {
                        let err = (got[tok * n + row] as f64 - want[row]).abs() / largest;
                        assert!(
                            err < 1e-6,
                            "k {k} group {group} token {tok} row {row}: {err:e}"
                        );
                    }
                }
            }
        }
    }

    /// The launch side's sizes are the kernels' own: the tile count the runtime allocates and
    /// launches, the rows per block, the experts the routing ranks.
    #[test]
    fn the_experts_constants_match_the_kernels_defines() {
        let source = module_source(&ModuleSpec { head_dim: 64 });
        for define in [
            format!("#define FD_MOE_TILE {MOE_TILE_ROWS} "),
            format!("#define FD_MOE_ROWS {MOE_ROWS_PER_BLOCK}\n"),
            format!("#define FD_MOE_MAX_EXPERTS {MOE_MAX_EXPERTS}\n"),
            format!("#define QTILE_ROWS {QUANT_TILE_ROWS}\n"),
            format!("#define QTILE_WARPS_ONE {} ", QUANT_TILE_THREADS_ONE / 32),
            format!("#define QTILE_WARPS {} ", QUANT_TILE_THREADS / 32),
        ] {
            assert!(source.contains(&define), "{define:?} is not in the module");
        }
    }

    /// The DCU's W4A8 piece (`fd_qpiece_i8dot`, HIP only, never run on a DCU here) compiled for
    /// the CPU with its two intrinsics written out (`kernels/cuda/host/i8dot_check.cpp`): its
    /// byte transposes and dot products must give the plain sums of codes times activations.
    /// Needs a C++ compiler (`CXX`, c++, g++ or clang++); skipped with a message without one.
    #[test]
    fn the_dcu_w4a8_piece_sums_what_the_f32_path_sums() {
        let start = QUANT
            .find("template <int TOKENS>\n__device__ __forceinline__ void fd_qpiece_i8dot")
            .expect("fd_qpiece_i8dot in quant.cu");
        let len = QUANT[start..].find("\n#endif").expect("its #endif");
        let compiler = std::env::var("CXX")
            .ok()
            .into_iter()
            .chain(["c++", "g++", "clang++", "clang++-15"].map(String::from))
            .find(|c| {
                std::process::Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
        let Some(compiler) = compiler else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the_dcu_w4a8_piece_sums_what_the_f32_path_sums: no C++ compiler"
            );
            return;
        };
        let dir = std::env::temp_dir().join(format!("fd-i8dot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a work directory");
        std::fs::write(dir.join("i8dot_piece.inc"), &QUANT[start..start + len]).expect("write");
        std::fs::write(
            dir.join("check.cpp"),
            include_str!("../cuda/host/i8dot_check.cpp"),
        )
        .expect("write");
        let exe = dir.join("check");
        let built = std::process::Command::new(&compiler)
            .args(["-std=c++17", "-O1", "-o"])
            .arg(&exe)
            .arg(dir.join("check.cpp"))
            .output()
            .expect("runs the compiler");
        assert!(
            built.status.success(),
            "{compiler}: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let run = std::process::Command::new(&exe).output().expect("runs");
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success() && text.starts_with("ok "), "{text}");
    }

    #[test]
    fn head_dims_the_attention_kernel_cannot_take_are_refused() {
        for head_dim in [16, 64, 96, 128, 256] {
            assert!(ModuleSpec { head_dim }.check().is_ok());
        }
        for head_dim in [0, 47, 512] {
            assert!(ModuleSpec { head_dim }.check().is_err());
        }
        assert!(module_source(&ModuleSpec { head_dim: 128 }).contains("#define FD_HEAD_DIM 128\n"));
    }
}
