//! `ir-types` owns the vocabulary every crate shares: element types, quantization schemes, op
//! kinds and targets. `ir` re-exports it as `ir::types`.
//!
//! It is a crate of its own so that `runtime`, `kernels` and `artifacts` can name these types
//! without building the graph IR or its graph library; a tidy test checks that they never reach
//! for `ir` itself. Only these small enums derive `Serialize`; the graph types never do.
//! Tests sit at the bottom of this file.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }

    pub fn parse(text: &str) -> Option<DType> {
        Some(match text {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "i32" => DType::I32,
            "i64" => DType::I64,
            "u8" => DType::U8,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a weight is quantized, and whether the matmuls that read it quantize their activations.
/// `None` means stored plainly in its dtype. `WnAm` stores n-bit integer codes with a scale per
/// group of K (and a minimum when asymmetric); A16 keeps activations in float, A8 quantizes each
/// token's activations to int8 (one scale per token, computed at run time). `Fp8` stores e4m3
/// codes with a scale per output row and rounds each token's activations to e4m3 likewise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum QuantScheme {
    None,
    W8A16,
    W4A16,
    W2A16,
    W8A8,
    W4A8,
    Fp8,
}

/// Element format of a quantized weight's codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CodeFormat {
    /// Unsigned integer codes of this many bits (8, 4 or 2).
    Int(u8),
    /// FP8 e4m3 (1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no infinities).
    Fp8E4M3,
}

impl CodeFormat {
    /// Bits per code.
    pub fn bits(self) -> u32 {
        match self {
            CodeFormat::Int(b) => b as u32,
            CodeFormat::Fp8E4M3 => 8,
        }
    }
}

/// How a matmul treats its activations under a scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ActQuant {
    /// Activations stay f32.
    None,
    /// Each token row is scaled by `max|x| / 127` and rounded to integers in [-127, 127].
    Int8PerToken,
    /// Each token row is scaled by `max|x| / 448` and rounded to the nearest e4m3 value.
    Fp8PerToken,
}

impl QuantScheme {
    pub const ALL: &'static [QuantScheme] = &[
        QuantScheme::None,
        QuantScheme::W8A16,
        QuantScheme::W4A16,
        QuantScheme::W2A16,
        QuantScheme::W8A8,
        QuantScheme::W4A8,
        QuantScheme::Fp8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuantScheme::None => "none",
            QuantScheme::W8A16 => "w8a16",
            QuantScheme::W4A16 => "w4a16",
            QuantScheme::W2A16 => "w2a16",
            QuantScheme::W8A8 => "w8a8",
            QuantScheme::W4A8 => "w4a8",
            QuantScheme::Fp8 => "fp8",
        }
    }

    pub fn parse(text: &str) -> Option<QuantScheme> {
        QuantScheme::ALL.iter().copied().find(|q| q.name() == text)
    }

    /// The weight code format; `None` for unquantized weights.
    pub fn code_format(self) -> Option<CodeFormat> {
        Some(match self {
            QuantScheme::None => return None,
            QuantScheme::W8A16 | QuantScheme::W8A8 => CodeFormat::Int(8),
            QuantScheme::W4A16 | QuantScheme::W4A8 => CodeFormat::Int(4),
            QuantScheme::W2A16 => CodeFormat::Int(2),
            QuantScheme::Fp8 => CodeFormat::Fp8E4M3,
        })
    }

    pub fn act_quant(self) -> ActQuant {
        match self {
            QuantScheme::W8A8 | QuantScheme::W4A8 => ActQuant::Int8PerToken,
            QuantScheme::Fp8 => ActQuant::Fp8PerToken,
            _ => ActQuant::None,
        }
    }

    /// Whether the scheme may store a minimum per group (integer codes only).
    pub fn allows_asymmetric(self) -> bool {
        matches!(self.code_format(), Some(CodeFormat::Int(_)))
    }
}
impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Instruction-set level of a CPU target, from the most portable up.
/// Ordered so that `a <= b` means code for `a` runs on a machine that has `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CpuIsa {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 F/BW/DQ/VL plus AVX2 and FMA.
    Avx512,
}

impl CpuIsa {
    pub fn name(self) -> &'static str {
        match self {
            CpuIsa::Portable => "portable",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Avx512 => "avx512",
        }
    }

    pub fn parse(text: &str) -> Option<CpuIsa> {
        Some(match text {
            "portable" => CpuIsa::Portable,
            "avx2" => CpuIsa::Avx2,
            "avx512" => CpuIsa::Avx512,
            _ => return None,
        })
    }

    /// The best level this machine supports, by run-time feature detection.
    pub fn detect() -> CpuIsa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return CpuIsa::Avx512;
            }
            // F16C (half conversions) came with or before AVX2 on every x86 CPU.
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return CpuIsa::Avx2;
            }
        }
        CpuIsa::Portable
    }
}

/// An NVIDIA GPU architecture a plan's CUDA kernels are compiled for (its compute capability).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CudaArch {
    /// Ampere (A100): compute capability 8.0.
    Sm80,
    /// Ada (L4, L40S, RTX 4090): 8.9, the first with FP8 tensor cores.
    Sm89,
    /// Hopper (H100, H200): 9.0.
    Sm90,
}

impl CudaArch {
    pub const ALL: [CudaArch; 3] = [CudaArch::Sm80, CudaArch::Sm89, CudaArch::Sm90];

    /// `sm80`, `sm89`, `sm90`.
    pub fn name(self) -> &'static str {
        match self {
            CudaArch::Sm80 => "sm80",
            CudaArch::Sm89 => "sm89",
            CudaArch::Sm90 => "sm90",
        }
    }

    pub fn parse(text: &str) -> Option<CudaArch> {
        CudaArch::ALL.into_iter().find(|a| a.name() == text)
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(self) -> (u32, u32) {
        match self {
            CudaArch::Sm80 => (8, 0),
            CudaArch::Sm89 => (8, 9),
            CudaArch::Sm90 => (9, 0),
        }
    }

    /// The architecture whose code runs on a device of compute capability `major.minor`: only
    /// an exact match, since a cubin runs only on its own major version and the plan's kernel
    /// choices are made per architecture.
    pub fn of_device(major: u32, minor: u32) -> Option<CudaArch> {
        CudaArch::ALL
            .into_iter()
            .find(|a| a.compute_capability() == (major, minor))
    }
}

/// An AMD GPU architecture a plan's HIP kernels are compiled for, by its LLVM processor name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HipArch {
    /// gfx906 (Vega 20): Hygon's DCUs (Z100 class) and AMD's MI50 / MI60; 64-wide wavefronts,
    /// int8 and f16 dot-product instructions, no matrix cores.
    Gfx906,
}

impl HipArch {
    pub const ALL: [HipArch; 1] = [HipArch::Gfx906];

    /// `gfx906`: the name HIP compilers take (`--offload-arch`).
    pub fn name(self) -> &'static str {
        match self {
            HipArch::Gfx906 => "gfx906",
        }
    }

    pub fn parse(text: &str) -> Option<HipArch> {
        HipArch::ALL.into_iter().find(|a| a.name() == text)
    }

    /// Threads that execute together (a wavefront).
    pub fn wavefront(self) -> u32 {
        match self {
            HipArch::Gfx906 => 64,
        }
    }
}

/// Hardware a plan is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    Cpu(CpuIsa),
    Cuda(CudaArch),
    /// Hygon DCUs through HIP.
    Dcu(HipArch),
}

impl Target {
    /// Every target, in the order `fdc targets` lists them.
    pub const ALL: [Target; 7] = [
        Target::Cpu(CpuIsa::Avx512),
        Target::Cpu(CpuIsa::Avx2),
        Target::Cpu(CpuIsa::Portable),
        Target::Cuda(CudaArch::Sm80),
        Target::Cuda(CudaArch::Sm89),
        Target::Cuda(CudaArch::Sm90),
        Target::Dcu(HipArch::Gfx906),
    ];

    /// Canonical spelling, used in plans, kernel keys and `fdc inspect`: `cpu-avx512`,
    /// `cpu-avx2`, `cpu-portable`, `cuda-sm80`, `cuda-sm89`, `cuda-sm90`, `dcu-gfx906`. (The
    /// command line also takes aliases: the compiler's target table.)
    pub fn name(self) -> String {
        match self {
            Target::Cpu(isa) => format!("cpu-{}", isa.name()),
            Target::Cuda(arch) => format!("cuda-{}", arch.name()),
            Target::Dcu(arch) => format!("dcu-{}", arch.name()),
        }
    }

    /// Parses a canonical spelling ([`Target::name`]), or `cpu`: the build host's best level.
    pub fn parse(text: &str) -> Option<Target> {
        if text == "cpu" {
            return Some(Target::Cpu(CpuIsa::detect()));
        }
        Target::ALL.into_iter().find(|t| t.name() == text)
    }

    /// The CPU instruction set of a CPU target.
    pub fn cpu_isa(self) -> Option<CpuIsa> {
        match self {
            Target::Cpu(isa) => Some(isa),
            Target::Cuda(_) | Target::Dcu(_) => None,
        }
    }

    /// The suffix of this target's kernel ids: the CPU ISA level (`avx2`) or the GPU
    /// architecture (`sm90`, `gfx906`).
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            Target::Cpu(isa) => isa.name(),
            Target::Cuda(arch) => arch.name(),
            Target::Dcu(arch) => arch.name(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// How a mixture-of-experts router turns its logits into expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MoeRouting {
    /// Softmax over all experts (Mixtral, Qwen3-MoE, ERNIE 4.5).
    Softmax,
    /// An independent sigmoid per expert.
    Sigmoid,
    /// Sigmoid scores with group-limited selection (DeepSeek-V3's `n_group`, `topk_group`): the
    /// experts are cut into `groups` equal groups, each group is ranked by the sum of its two
    /// best selection keys, and experts are picked only from the `top_groups` best groups.
    SigmoidGrouped { groups: u32, top_groups: u32 },
}

impl MoeRouting {
    pub fn name(self) -> &'static str {
        match self {
            MoeRouting::Softmax => "softmax",
            MoeRouting::Sigmoid => "sigmoid",
            MoeRouting::SigmoidGrouped { .. } => "sigmoid_grouped",
        }
    }

    /// Why group-limited routing cannot pick `top_k` of `experts` experts, if it cannot: the
    /// groups must split the experts evenly, hold two experts each (a group's rank is its best
    /// two), and the kept groups must hold at least `top_k` experts.
    pub fn group_error(self, experts: usize, top_k: usize) -> Option<String> {
        let MoeRouting::SigmoidGrouped { groups, top_groups } = self else {
            return None;
        };
        let (groups, top_groups) = (groups as usize, top_groups as usize);
        if groups == 0 || !experts.is_multiple_of(groups) || experts / groups < 2 {
            return Some(format!(
                "{groups} groups do not split {experts} experts into groups of two or more"
            ));
        }
        if top_groups == 0 || top_groups > groups || top_groups * (experts / groups) < top_k {
            return Some(format!(
                "the best {top_groups} of {groups} groups cannot hold {top_k} picked experts"
            ));
        }
        None
    }

    /// The routings without parameters, from their names (`sigmoid_grouped` takes its group
    /// counts from elsewhere: see `ir::Op::Moe`'s text form).
    pub fn parse(text: &str) -> Option<MoeRouting> {
        [MoeRouting::Softmax, MoeRouting::Sigmoid]
            .into_iter()
            .find(|r| r.name() == text)
    }
}

impl fmt::Display for MoeRouting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kinds of operation, as keys of the kernel registry. The graph's `Op` (with attributes)
/// lives in `ir::op`; each `Op` maps to exactly one `OpKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OpKind {
    /// Rows of a table picked by token id.
    Embedding,
    /// `y = x * rsqrt(mean(x^2) + eps) * w`, over groups of a row.
    RmsNorm,
    /// Fused `s = x + d; y = rms_norm(s)`, both outputs kept.
    AddRmsNorm,
    /// `y = x @ w^T (+ b)`.
    MatMul,
    /// Elementwise `a + b`.
    Add,
    /// Elementwise `a * b`.
    Mul,
    /// Elementwise `x * sigmoid(x)`.
    Silu,
    /// Fused `silu(g) * u` over a `[g | u]` row.
    SiluMul,
    /// Rotary position embedding, rotate-half layout.
    Rope,
    /// Causal self-attention that appends to and reads from the KV cache.
    Attention,
    /// Multi-head latent attention (DeepSeek-V3): the KV cache holds one compressed latent per
    /// token, and attention runs on it with the key and value up-projections absorbed.
    MlaAttention,
    /// Picks the rows whose logits are wanted.
    GatherRows,
    /// Mixture of experts: route each token to its top-k experts, run their SwiGLU MLPs, and
    /// sum the results weighted by the routing weights.
    Moe,
}

impl OpKind {
    pub const ALL: &'static [OpKind] = &[
        OpKind::Embedding,
        OpKind::RmsNorm,
        OpKind::AddRmsNorm,
        OpKind::MatMul,
        OpKind::Add,
        OpKind::Mul,
        OpKind::Silu,
        OpKind::SiluMul,
        OpKind::Rope,
        OpKind::Attention,
        OpKind::GatherRows,
        OpKind::Moe,
        OpKind::MlaAttention,
    ];

    /// Snake-case spelling, used in the IR text form and in kernel names.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::RmsNorm => "rms_norm",
            OpKind::AddRmsNorm => "add_rms_norm",
            OpKind::MatMul => "matmul",
            OpKind::Add => "add",
            OpKind::Mul => "mul",
            OpKind::Silu => "silu",
            OpKind::SiluMul => "silu_mul",
            OpKind::Rope => "rope",
            OpKind::Attention => "attention",
            OpKind::GatherRows => "gather_rows",
            OpKind::Moe => "moe",
            OpKind::MlaAttention => "mla_attention",
        }
    }

    pub fn parse(text: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|k| k.name() == text)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for &k in OpKind::ALL {
            assert_eq!(OpKind::parse(k.name()), Some(k));
        }
        for d in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I32,
            DType::I64,
            DType::U8,
        ] {
            assert_eq!(DType::parse(d.name()), Some(d));
        }
        for isa in [CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512] {
            assert_eq!(
                Target::parse(&Target::Cpu(isa).name()),
                Some(Target::Cpu(isa))
            );
        }
        for arch in CudaArch::ALL {
            let target = Target::Cuda(arch);
            assert_eq!(Target::parse(&target.name()), Some(target));
            let (major, minor) = arch.compute_capability();
            assert_eq!(CudaArch::of_device(major, minor), Some(arch));
        }
        assert_eq!(
            Target::parse("cuda-sm90"),
            Some(Target::Cuda(CudaArch::Sm90))
        );
        assert_eq!(CudaArch::of_device(8, 6), None);
        assert_eq!(Target::parse("cuda-sm75"), None);
        assert_eq!(Target::parse("gpu"), None);
        assert_eq!(
            Target::parse("dcu-gfx906"),
            Some(Target::Dcu(HipArch::Gfx906))
        );
        for target in Target::ALL {
            assert_eq!(Target::parse(&target.name()), Some(target));
        }
        for r in [MoeRouting::Softmax, MoeRouting::Sigmoid] {
            assert_eq!(MoeRouting::parse(r.name()), Some(r));
        }
        assert_eq!(MoeRouting::parse("top1"), None);
        for &q in QuantScheme::ALL {
            assert_eq!(QuantScheme::parse(q.name()), Some(q));
        }
        assert_eq!(QuantScheme::parse("w3a16"), None);
    }

    #[test]
    fn isa_order_means_compatibility() {
        assert!(CpuIsa::Portable < CpuIsa::Avx2 && CpuIsa::Avx2 < CpuIsa::Avx512);
    }
}
