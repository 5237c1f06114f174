//! The kernel registry: one explicit, ordered table of every kernel the compiler may select, keyed
//! by `(OpKind, DType, QuantScheme, Target)`. `fdc kernels --list` prints it with [`table`].
//!
//! A kernel id spells its key: `{op}_{dtype}_{isa}` for library kernels (`matmul_bf16_avx512`),
//! `{op}_{quant}_{isa}` for kernels of quantized weights (`matmul_w4a16_avx2`, whose weights are
//! u8 codes with f16 scales: `kernels::cpu::quant`) and `{op}_{dtype}_gen_{isa}` for generated
//! ones (`add_rms_norm_f32_gen_avx512`). The dtype is
//! the weight's for matmul and embedding and `f32` (the activations') for everything else.
//! Library kernels of an ISA use only that ISA's instructions; generated kernels are machine code
//! that fdc emits into the plan, so only targets that fdc generates for (AVX2, AVX-512) have them.
//! CUDA kernels (`{op}_{dtype}_{arch}`, `matmul_bf16_sm90`; quantized `{op}_{scheme}_{arch}`,
//! `matmul_w4a16_sm90`) are CUDA C in `kernels/cuda/`, which
//! fdc compiles with NVRTC into the plan's module for the target architecture ([`crate::cuda`]).

use ir_types::{CpuIsa, CudaArch, DType, HipArch, OpKind, QuantScheme, Target};
use std::fmt;

/// What a kernel is selected by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelKey {
    pub op: OpKind,
    /// The weight's dtype for `MatMul` and `Embedding`, otherwise `F32`.
    pub dtype: DType,
    pub quant: QuantScheme,
    pub target: Target,
}

/// Where a kernel's code comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSource {
    /// Compiled into this crate (`kernels::cpu`).
    Library,
    /// Emitted by fdc's code generator into the plan.
    Generated,
    /// CUDA C from `kernels/cuda/`, compiled by fdc into the plan's CUDA module.
    Cuda,
    /// The same CUDA C sources compiled by fdc with a HIP compiler into the plan's code object
    /// (`kernels::cuda::hip_module_source` adapts them).
    Hip,
}

impl KernelSource {
    pub fn name(self) -> &'static str {
        match self {
            KernelSource::Library => "library",
            KernelSource::Generated => "generated",
            KernelSource::Cuda => "cuda",
            KernelSource::Hip => "hip",
        }
    }
}

/// A kernel's stable name, which spells its key (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct KernelId(pub &'static str);

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// One row of the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    pub id: KernelId,
    pub key: KernelKey,
    pub source: KernelSource,
    pub doc: &'static str,
}

impl KernelEntry {
    /// The suffix of the kernel's id: its CPU ISA level (`avx2`) or GPU architecture (`sm90`).
    pub fn target_suffix(&self) -> &'static str {
        self.key.target.kernel_suffix()
    }
}

impl fmt::Display for KernelEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<28} {:<12} {:<5} {:<5} {:<13} {:<9} {}",
            self.id.0,
            self.key.op.name(),
            self.key.dtype.name(),
            self.key.quant.name(),
            self.key.target.name(),
            self.source.name(),
            self.doc
        )
    }
}

/// Every kernel, library kernels of each ISA first (portable, AVX2, AVX-512), then generated ones.
pub fn entries() -> &'static [KernelEntry] {
    ENTRIES
}

/// Every kernel with exactly this key, library before generated.
pub fn lookup(key: &KernelKey) -> Vec<&'static KernelEntry> {
    ENTRIES.iter().filter(|e| e.key == *key).collect()
}

/// The kernel called `name`.
pub fn by_name(name: &str) -> Option<&'static KernelEntry> {
    ENTRIES.iter().find(|e| e.id.0 == name)
}

/// The registry as an aligned text table with a header line, one kernel per line.
pub fn table() -> String {
    let mut text = format!(
        "{:<28} {:<12} {:<5} {:<5} {:<13} {:<9} {}\n",
        "id", "op", "dtype", "quant", "target", "source", "doc"
    );
    for entry in ENTRIES {
        text.push_str(&entry.to_string());
        text.push('\n');
    }
    text
}

const MATMUL_DOC: &str = "out[T,N] = x[T,K] @ w[N,K]^T (+ bias), f32 accumulate";
const EMBEDDING_DOC: &str = "out[T,H] = table[ids[T]] widened to f32";
const RMS_NORM_DOC: &str = "per-group x * rsqrt(mean(x^2) + eps) * w";
const ADD_RMS_NORM_DOC: &str = "s = x + d; s and rms_norm(s)";
const ADD_DOC: &str = "a + b";
const MUL_DOC: &str = "a * b";
const SILU_DOC: &str = "x * sigmoid(x)";
const SILU_MUL_DOC: &str = "silu(g) * u over [g | u] rows";
const ROPE_DOC: &str = "rotary embedding, rotate-half layout";
const ATTENTION_DOC: &str = "causal GQA attention, appends to the KV cache";
const GATHER_ROWS_DOC: &str = "out[T] = x[rows[T]]";
const MATMUL_QUANT_DOC: &str =
    "out[T,N] = act(x)[T,K] @ dequant(w)[N,K]^T (+ bias), codes unpacked in registers";
const EMBEDDING_QUANT_DOC: &str = "out[T,H] = dequant(table)[ids[T]]";
const MOE_DOC: &str = "top-k routed SwiGLU experts, grouped by expert, stacked weights";
const MOE_QUANT_DOC: &str =
    "top-k routed SwiGLU experts, grouped by expert, stacked quantized weights";
const MLA_DOC: &str = "multi-head latent attention on a latent KV cache, projections absorbed";

macro_rules! entry {
    ($id:expr, $op:ident, $dtype:ident, $isa:ident, $source:ident, $doc:expr) => {
        entry!($id, $op, $dtype, None, $isa, $source, $doc)
    };
    ($id:expr, $op:ident, $dtype:ident, $quant:ident, $isa:ident, $source:ident, $doc:expr) => {
        KernelEntry {
            id: KernelId($id),
            key: KernelKey {
                op: OpKind::$op,
                dtype: DType::$dtype,
                quant: QuantScheme::$quant,
                target: Target::Cpu(CpuIsa::$isa),
            },
            source: KernelSource::$source,
            doc: $doc,
        }
    };
}

/// The library kernels of one ISA; `$isa_name` is the id suffix.
macro_rules! library_kernels {
    ($isa:ident, $isa_name:literal) => {
        [
            entry!(
                concat!("embedding_f32_", $isa_name),
                Embedding,
                F32,
                $isa,
                Library,
                EMBEDDING_DOC
            ),
            entry!(
                concat!("embedding_bf16_", $isa_name),
                Embedding,
                BF16,
                $isa,
                Library,
                EMBEDDING_DOC
            ),
            entry!(
                concat!("embedding_f16_", $isa_name),
                Embedding,
                F16,
                $isa,
                Library,
                EMBEDDING_DOC
            ),
            entry!(
                concat!("rms_norm_f32_", $isa_name),
                RmsNorm,
                F32,
                $isa,
                Library,
                RMS_NORM_DOC
            ),
            entry!(
                concat!("add_rms_norm_f32_", $isa_name),
                AddRmsNorm,
                F32,
                $isa,
                Library,
                ADD_RMS_NORM_DOC
            ),
            entry!(
                concat!("matmul_f32_", $isa_name),
                MatMul,
                F32,
                $isa,
                Library,
                MATMUL_DOC
            ),
            entry!(
                concat!("matmul_bf16_", $isa_name),
                MatMul,
                BF16,
                $isa,
                Library,
                MATMUL_DOC
            ),
            entry!(
                concat!("matmul_f16_", $isa_name),
                MatMul,
                F16,
                $isa,
                Library,
                MATMUL_DOC
            ),
            entry!(
                concat!("add_f32_", $isa_name),
                Add,
                F32,
                $isa,
                Library,
                ADD_DOC
            ),
            entry!(
                concat!("mul_f32_", $isa_name),
                Mul,
                F32,
                $isa,
                Library,
                MUL_DOC
            ),
            entry!(
                concat!("silu_f32_", $isa_name),
                Silu,
                F32,
                $isa,
                Library,
                SILU_DOC
            ),
            entry!(
                concat!("silu_mul_f32_", $isa_name),
                SiluMul,
                F32,
                $isa,
                Library,
                SILU_MUL_DOC
            ),
            entry!(
                concat!("rope_f32_", $isa_name),
                Rope,
                F32,
                $isa,
                Library,
                ROPE_DOC
            ),
            entry!(
                concat!("attention_f32_", $isa_name),
                Attention,
                F32,
                $isa,
                Library,
                ATTENTION_DOC
            ),
            entry!(
                concat!("gather_rows_f32_", $isa_name),
                GatherRows,
                F32,
                $isa,
                Library,
                GATHER_ROWS_DOC
            ),
            entry!(
                concat!("moe_f32_", $isa_name),
                Moe,
                F32,
                $isa,
                Library,
                MOE_DOC
            ),
            entry!(
                concat!("mla_attention_f32_", $isa_name),
                MlaAttention,
                F32,
                $isa,
                Library,
                MLA_DOC
            ),
        ]
    };
}

/// The matmul, embedding and experts of one quantization scheme on one ISA.
macro_rules! quant_ops {
    ($quant:ident, $quant_name:literal, $isa:ident, $isa_name:literal) => {
        [
            entry!(
                concat!("matmul_", $quant_name, "_", $isa_name),
                MatMul,
                U8,
                $quant,
                $isa,
                Library,
                MATMUL_QUANT_DOC
            ),
            entry!(
                concat!("embedding_", $quant_name, "_", $isa_name),
                Embedding,
                U8,
                $quant,
                $isa,
                Library,
                EMBEDDING_QUANT_DOC
            ),
            entry!(
                concat!("moe_", $quant_name, "_", $isa_name),
                Moe,
                U8,
                $quant,
                $isa,
                Library,
                MOE_QUANT_DOC
            ),
        ]
    };
}

/// The kernels of quantized weights on one ISA: every scheme's matmul, embedding and experts.
macro_rules! quant_kernels {
    ($isa:ident, $isa_name:literal) => {{
        let pairs = [
            quant_ops!(W8A16, "w8a16", $isa, $isa_name),
            quant_ops!(W4A16, "w4a16", $isa, $isa_name),
            quant_ops!(W2A16, "w2a16", $isa, $isa_name),
            quant_ops!(W8A8, "w8a8", $isa, $isa_name),
            quant_ops!(W4A8, "w4a8", $isa, $isa_name),
            quant_ops!(Fp8, "fp8", $isa, $isa_name),
        ];
        let mut all = [pairs[0][0]; QUANT_PER_ISA];
        let mut i = 0;
        while i < QUANT_PER_ISA {
            all[i] = pairs[i / 3][i % 3];
            i += 1;
        }
        all
    }};
}

/// The kernels fdc generates for one ISA.
macro_rules! generated_kernels {
    ($isa:ident, $isa_name:literal) => {
        [
            entry!(
                concat!("rms_norm_f32_gen_", $isa_name),
                RmsNorm,
                F32,
                $isa,
                Generated,
                RMS_NORM_DOC
            ),
            entry!(
                concat!("add_rms_norm_f32_gen_", $isa_name),
                AddRmsNorm,
                F32,
                $isa,
                Generated,
                ADD_RMS_NORM_DOC
            ),
            entry!(
                concat!("silu_mul_f32_gen_", $isa_name),
                SiluMul,
                F32,
                $isa,
                Generated,
                SILU_MUL_DOC
            ),
            entry!(
                concat!("rope_f32_gen_", $isa_name),
                Rope,
                F32,
                $isa,
                Generated,
                ROPE_DOC
            ),
        ]
    };
}

/// One GPU kernel of `kernels/cuda/` on one target (CUDA, or HIP for the DCU).
macro_rules! gpu_entry {
    ($id:expr, $op:ident, $dtype:ident, $target:expr, $source:ident, $doc:expr) => {
        KernelEntry {
            id: KernelId($id),
            key: KernelKey {
                op: OpKind::$op,
                dtype: DType::$dtype,
                quant: QuantScheme::None,
                target: $target,
            },
            source: KernelSource::$source,
            doc: $doc,
        }
    };
}

/// The GPU kernels of one target: the ops of dense models, f32/bf16/f16 weights, and the
/// mixture-of-experts and latent-attention ops (keyed f32 like their CPU twins; the runtime picks
/// the function for each weight's storage type).
macro_rules! gpu_kernels {
    ($target:expr, $source:ident, $arch_name:literal) => {
        [
            gpu_entry!(
                concat!("embedding_f32_", $arch_name),
                Embedding,
                F32,
                $target,
                $source,
                EMBEDDING_DOC
            ),
            gpu_entry!(
                concat!("embedding_bf16_", $arch_name),
                Embedding,
                BF16,
                $target,
                $source,
                EMBEDDING_DOC
            ),
            gpu_entry!(
                concat!("embedding_f16_", $arch_name),
                Embedding,
                F16,
                $target,
                $source,
                EMBEDDING_DOC
            ),
            gpu_entry!(
                concat!("rms_norm_f32_", $arch_name),
                RmsNorm,
                F32,
                $target,
                $source,
                RMS_NORM_DOC
            ),
            gpu_entry!(
                concat!("add_rms_norm_f32_", $arch_name),
                AddRmsNorm,
                F32,
                $target,
                $source,
                ADD_RMS_NORM_DOC
            ),
            gpu_entry!(
                concat!("matmul_f32_", $arch_name),
                MatMul,
                F32,
                $target,
                $source,
                MATMUL_DOC
            ),
            gpu_entry!(
                concat!("matmul_bf16_", $arch_name),
                MatMul,
                BF16,
                $target,
                $source,
                MATMUL_DOC
            ),
            gpu_entry!(
                concat!("matmul_f16_", $arch_name),
                MatMul,
                F16,
                $target,
                $source,
                MATMUL_DOC
            ),
            gpu_entry!(
                concat!("add_f32_", $arch_name),
                Add,
                F32,
                $target,
                $source,
                ADD_DOC
            ),
            gpu_entry!(
                concat!("mul_f32_", $arch_name),
                Mul,
                F32,
                $target,
                $source,
                MUL_DOC
            ),
            gpu_entry!(
                concat!("silu_f32_", $arch_name),
                Silu,
                F32,
                $target,
                $source,
                SILU_DOC
            ),
            gpu_entry!(
                concat!("silu_mul_f32_", $arch_name),
                SiluMul,
                F32,
                $target,
                $source,
                SILU_MUL_DOC
            ),
            gpu_entry!(
                concat!("rope_f32_", $arch_name),
                Rope,
                F32,
                $target,
                $source,
                ROPE_DOC
            ),
            gpu_entry!(
                concat!("attention_f32_", $arch_name),
                Attention,
                F32,
                $target,
                $source,
                ATTENTION_DOC
            ),
            gpu_entry!(
                concat!("gather_rows_f32_", $arch_name),
                GatherRows,
                F32,
                $target,
                $source,
                GATHER_ROWS_DOC
            ),
            gpu_entry!(
                concat!("moe_f32_", $arch_name),
                Moe,
                F32,
                $target,
                $source,
                MOE_DOC
            ),
            gpu_entry!(
                concat!("mla_attention_f32_", $arch_name),
                MlaAttention,
                F32,
                $target,
                $source,
                MLA_DOC
            ),
        ]
    };
}

/// One quantized GPU kernel (weights dequantized in the kernel) on one target.
macro_rules! gpu_quant_entry {
    ($id:expr, $op:ident, $quant:ident, $target:expr, $source:ident, $doc:expr) => {
        KernelEntry {
            id: KernelId($id),
            key: KernelKey {
                op: OpKind::$op,
                dtype: DType::U8,
                quant: QuantScheme::$quant,
                target: $target,
            },
            source: KernelSource::$source,
            doc: $doc,
        }
    };
}

/// The matmul, embedding and experts of one quantized scheme on one GPU target.
macro_rules! gpu_quant_ops {
    ($quant:ident, $quant_name:literal, $target:expr, $source:ident, $arch_name:literal) => {
        [
            gpu_quant_entry!(
                concat!("matmul_", $quant_name, "_", $arch_name),
                MatMul,
                $quant,
                $target,
                $source,
                MATMUL_QUANT_DOC
            ),
            gpu_quant_entry!(
                concat!("embedding_", $quant_name, "_", $arch_name),
                Embedding,
                $quant,
                $target,
                $source,
                EMBEDDING_QUANT_DOC
            ),
            gpu_quant_entry!(
                concat!("moe_", $quant_name, "_", $arch_name),
                Moe,
                $quant,
                $target,
                $source,
                MOE_QUANT_DOC
            ),
        ]
    };
}

/// The GPU kernels of quantized weights on one target: every integer scheme's matmul,
/// embedding and experts (the A8 ones quantize each token's activations first).
macro_rules! gpu_quant_kernels {
    ($target:expr, $source:ident, $arch_name:literal) => {{
        let pairs = [
            gpu_quant_ops!(W8A16, "w8a16", $target, $source, $arch_name),
            gpu_quant_ops!(W4A16, "w4a16", $target, $source, $arch_name),
            gpu_quant_ops!(W2A16, "w2a16", $target, $source, $arch_name),
            gpu_quant_ops!(W8A8, "w8a8", $target, $source, $arch_name),
            gpu_quant_ops!(W4A8, "w4a8", $target, $source, $arch_name),
        ];
        let mut all = [pairs[0][0]; CUDA_QUANT_PER_ARCH];
        let mut i = 0;
        while i < CUDA_QUANT_PER_ARCH {
            all[i] = pairs[i / 3][i % 3];
            i += 1;
        }
        all
    }};
}

const LIBRARY_PER_ISA: usize = 17;
const GENERATED_PER_ISA: usize = 4;
const QUANT_PER_ISA: usize = 18;
const CUDA_PER_ARCH: usize = 17;
const CUDA_QUANT_PER_ARCH: usize = 15;
/// FP8 runs on the architectures with FP8 hardware (sm89, sm90) only.
const CUDA_FP8_ARCHS: usize = 2;
const COUNT: usize = 3 * LIBRARY_PER_ISA
    + 3 * QUANT_PER_ISA
    + 2 * GENERATED_PER_ISA
    + (CudaArch::ALL.len() + HipArch::ALL.len()) * (CUDA_PER_ARCH + CUDA_QUANT_PER_ARCH)
    + CUDA_FP8_ARCHS * 3;

const SM80: Target = Target::Cuda(CudaArch::Sm80);
const SM89: Target = Target::Cuda(CudaArch::Sm89);
const SM90: Target = Target::Cuda(CudaArch::Sm90);
const GFX906: Target = Target::Dcu(HipArch::Gfx906);

const ENTRIES: &[KernelEntry] = &{
    let parts: [&[KernelEntry]; 18] = [
        &library_kernels!(Portable, "portable"),
        &library_kernels!(Avx2, "avx2"),
        &library_kernels!(Avx512, "avx512"),
        &quant_kernels!(Portable, "portable"),
        &quant_kernels!(Avx2, "avx2"),
        &quant_kernels!(Avx512, "avx512"),
        &generated_kernels!(Avx2, "avx2"),
        &generated_kernels!(Avx512, "avx512"),
        &gpu_kernels!(SM80, Cuda, "sm80"),
        &gpu_kernels!(SM89, Cuda, "sm89"),
        &gpu_kernels!(SM90, Cuda, "sm90"),
        &gpu_quant_kernels!(SM80, Cuda, "sm80"),
        &gpu_quant_kernels!(SM89, Cuda, "sm89"),
        &gpu_quant_kernels!(SM90, Cuda, "sm90"),
        &gpu_quant_ops!(Fp8, "fp8", SM89, Cuda, "sm89"),
        &gpu_quant_ops!(Fp8, "fp8", SM90, Cuda, "sm90"),
        // The same sources built by a HIP compiler; no FP8 (gfx906 has no FP8 instructions).
        &gpu_kernels!(GFX906, Hip, "gfx906"),
        &gpu_quant_kernels!(GFX906, Hip, "gfx906"),
    ];
    let mut all = [parts[0][0]; COUNT];
    let (mut n, mut p) = (0, 0);
    while p < parts.len() {
        let mut i = 0;
        while i < parts[p].len() {
            all[n] = parts[p][i];
            n += 1;
            i += 1;
        }
        p += 1;
    }
    assert!(n == COUNT);
    all
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const ISAS: [CpuIsa; 3] = [CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512];

    fn key(op: OpKind, dtype: DType, isa: CpuIsa) -> KernelKey {
        KernelKey {
            op,
            dtype,
            quant: QuantScheme::None,
            target: Target::Cpu(isa),
        }
    }

    #[test]
    fn ids_are_unique_and_spell_their_keys() {
        let mut seen = HashSet::new();
        for e in entries() {
            assert!(seen.insert(e.id), "duplicate {}", e.id);
            let gen = if e.source == KernelSource::Generated {
                "gen_"
            } else {
                ""
            };
            let spelled = if e.key.quant == QuantScheme::None {
                e.key.dtype.name()
            } else {
                e.key.quant.name()
            };
            let want = format!(
                "{}_{}_{}{}",
                e.key.op.name(),
                spelled,
                gen,
                e.target_suffix()
            );
            assert_eq!(e.id.0, want);
            assert_eq!(by_name(e.id.0), Some(e));
        }
        assert_eq!(by_name("matmul_q4_avx512"), None);
    }

    #[test]
    fn every_op_has_a_library_kernel_on_every_isa() {
        for isa in ISAS {
            for &op in OpKind::ALL {
                let dtypes: &[DType] = match op {
                    OpKind::MatMul | OpKind::Embedding => &[DType::F32, DType::BF16, DType::F16],
                    _ => &[DType::F32],
                };
                for &dtype in dtypes {
                    let found = lookup(&key(op, dtype, isa));
                    let library: Vec<_> = found
                        .iter()
                        .filter(|e| e.source == KernelSource::Library)
                        .collect();
                    assert_eq!(library.len(), 1, "{op} {dtype} {isa:?}");
                }
            }
            assert!(lookup(&key(OpKind::Add, DType::BF16, isa)).is_empty());
        }
    }

    #[test]
    fn generated_kernels_exist_only_where_fdc_emits_them() {
        let generated_ops = [
            OpKind::RmsNorm,
            OpKind::AddRmsNorm,
            OpKind::SiluMul,
            OpKind::Rope,
        ];
        for isa in ISAS {
            for &op in OpKind::ALL {
                let found = lookup(&key(op, DType::F32, isa));
                let gen: Vec<_> = found
                    .iter()
                    .filter(|e| e.source == KernelSource::Generated)
                    .collect();
                let expected = usize::from(isa != CpuIsa::Portable && generated_ops.contains(&op));
                assert_eq!(gen.len(), expected, "{op} {isa:?}");
                // Library first, so a caller that takes the first candidate gets compiled code.
                assert_eq!(found[0].source, KernelSource::Library);
            }
        }
        assert_eq!(
            by_name("add_rms_norm_f32_gen_avx512").unwrap().source,
            KernelSource::Generated
        );
        assert_eq!(
            entries().len(),
            3 * 17 + 3 * 18 + 2 * 4 + 4 * (17 + 15) + 2 * 3
        );
    }

    #[test]
    fn cuda_runs_every_scheme_and_fp8_only_with_fp8_hardware() {
        for arch in CudaArch::ALL {
            for &quant in QuantScheme::ALL.iter().filter(|&&q| q != QuantScheme::None) {
                for op in [OpKind::MatMul, OpKind::Embedding, OpKind::Moe] {
                    let found = lookup(&KernelKey {
                        op,
                        dtype: DType::U8,
                        quant,
                        target: Target::Cuda(arch),
                    });
                    let want = quant != QuantScheme::Fp8 || arch != CudaArch::Sm80;
                    assert_eq!(found.len(), usize::from(want), "{op} {quant} {arch:?}");
                }
            }
        }
    }

    #[test]
    fn every_quant_scheme_has_a_matmul_an_embedding_and_experts_on_every_isa() {
        for isa in ISAS {
            for &quant in QuantScheme::ALL.iter().filter(|&&q| q != QuantScheme::None) {
                for op in [OpKind::MatMul, OpKind::Embedding, OpKind::Moe] {
                    let key = KernelKey {
                        op,
                        dtype: DType::U8,
                        quant,
                        target: Target::Cpu(isa),
                    };
                    assert_eq!(lookup(&key).len(), 1, "{op} {quant} {isa:?}");
                }
            }
        }
        assert!(by_name("matmul_w4a16_avx2").is_some());
    }

    #[test]
    fn every_op_has_a_cuda_kernel_on_every_arch() {
        for arch in CudaArch::ALL {
            for &op in OpKind::ALL {
                let dtypes: &[DType] = match op {
                    OpKind::MatMul | OpKind::Embedding => &[DType::F32, DType::BF16, DType::F16],
                    _ => &[DType::F32],
                };
                for &dtype in dtypes {
                    let found = lookup(&KernelKey {
                        op,
                        dtype,
                        quant: QuantScheme::None,
                        target: Target::Cuda(arch),
                    });
                    assert_eq!(found.len(), 1, "{op} {dtype} {arch:?}");
                    assert!(found.iter().all(|e| e.source == KernelSource::Cuda));
                }
            }
        }
        assert!(by_name("matmul_bf16_sm90").is_some());
    }

    #[test]
    fn table_lists_every_kernel_once() {
        let text = table();
        assert_eq!(text.lines().count(), entries().len() + 1);
        assert!(text.lines().any(|l| l.starts_with("matmul_bf16_avx512 ")
            && l.contains("cpu-avx512")
            && l.contains("library")));
    }
}
