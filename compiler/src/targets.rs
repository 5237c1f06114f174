//! The target table: every piece of hardware fdc compiles for, in one place, with what it can do.
//! `fdc targets` prints it ([`table`]), `--target` is resolved through it ([`resolve`]: names
//! and aliases), and every decision of the compiler that depends on the hardware reads a field
//! of [`TargetInfo`] (which code generator, whether kernels come from one GPU module, which
//! quantization schemes run) instead of testing which target it is.
//!
//! The kernel registry (`kernels::registry`) holds the kernels themselves, keyed by target; a
//! test checks that the two agree (a scheme is listed here exactly when the registry has its
//! matmul for the target). `docs/TARGETS.md` explains the columns and how to add a target.

use ir::{CpuIsa, CudaArch, DType, HipArch, QuantScheme, Target};
use std::fmt::Write;

/// How a target's kernels become code in the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeGen {
    /// Library kernels compiled into fdrt for the ISA, plus x86-64 code cranelift generates
    /// into the plan.
    Cranelift(CpuIsa),
    /// `kernels/cuda/` compiled by NVRTC into one CUDA module (cubin and PTX) in the plan.
    Nvrtc(CudaArch),
    /// The same sources compiled by a HIP compiler into one AMD GPU code object in the plan.
    Hipcc(HipArch),
}

impl CodeGen {
    /// Whether the plan's kernels are one GPU module built from `kernels/cuda/` (the CUDA and
    /// DCU targets): their matmuls fold norms in one-token passes and their attention rotates
    /// q and k itself.
    pub fn gpu_module(self) -> bool {
        !matches!(self, CodeGen::Cranelift(_))
    }

    pub fn name(self) -> &'static str {
        match self {
            CodeGen::Cranelift(_) => "cranelift + library",
            CodeGen::Nvrtc(_) => "NVRTC (CUDA C)",
            CodeGen::Hipcc(_) => "hipcc (HIP C)",
        }
    }
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct TargetInfo {
    pub target: Target,
    /// Other spellings `--target` accepts.
    pub aliases: &'static [&'static str],
    /// The instruction set or GPU architecture, and the devices that have it.
    pub hardware: &'static str,
    /// The width the kernels are written for: SIMD lanes, a warp, a wavefront.
    pub lanes: &'static str,
    /// Weight storage types the kernels read (activations are f32 everywhere).
    pub weight_dtypes: &'static [DType],
    /// Quantization schemes with kernels on this target, and how each is lowered.
    pub quants: &'static [(QuantScheme, &'static str)],
    /// Matrix units and the shapes they take, or what stands in for them.
    pub matrix_units: &'static str,
    /// Memory per device.
    pub memory: &'static str,
    pub codegen: CodeGen,
    /// Whether 4-bit symmetric W4A16 matrices that fit (`kernels::cuda::tiles_fit`) can be
    /// stored in the tile layout of the tensor-core matmul (`WeightLayout::QuantTiles`, with
    /// `fdc compile --quant-tiles`).
    pub quant_tiles: bool,
    /// What has run on real hardware and what has only been compiled.
    pub verified: &'static str,
}

impl TargetInfo {
    /// Whether the target has kernels for `scheme` (`none` always).
    pub fn runs(&self, scheme: QuantScheme) -> bool {
        scheme == QuantScheme::None || self.quants.iter().any(|(q, _)| *q == scheme)
    }
}

const WEIGHT_TYPES: &[DType] = &[DType::F32, DType::BF16, DType::F16];

/// The integer schemes on the CPU: one lowering per ISA level.
macro_rules! cpu_quants {
    ($int8:literal, $f32:literal) => {
        &[
            (QuantScheme::W8A16, $f32),
            (QuantScheme::W4A16, $f32),
            (QuantScheme::W2A16, $f32),
            (QuantScheme::W8A8, $int8),
            (QuantScheme::W4A8, $int8),
            (
                QuantScheme::Fp8,
                "e4m3 codes widened to f32, activations on the e4m3 grid",
            ),
        ]
    };
}

const CUDA_INT_QUANTS: [(QuantScheme, &str); 5] = [
    (QuantScheme::W8A16, "codes unpacked in registers, f32 FMAs"),
    (
        QuantScheme::W4A16,
        "codes unpacked in registers, f32 FMAs; with --quant-tiles, symmetric codes in 16-row \
         tiles with K and groups multiples of 64 on tensor cores (mma.m16n8k16 bf16, the \
         activations split into three bf16: exact products, f32 sums; about 3% slower than the \
         panels in an 8B decode step on an H100, so not the default)",
    ),
    (QuantScheme::W2A16, "codes unpacked in registers, f32 FMAs"),
    (
        QuantScheme::W8A8,
        "activations on the int8 grid, products exact in f32 FMAs",
    ),
    (
        QuantScheme::W4A8,
        "int4 codes against int8-grid activations, products exact in f32 FMAs",
    ),
];

const CUDA_QUANTS_FP8: [(QuantScheme, &str); 6] = [
    CUDA_INT_QUANTS[0],
    CUDA_INT_QUANTS[1],
    CUDA_INT_QUANTS[2],
    CUDA_INT_QUANTS[3],
    CUDA_INT_QUANTS[4],
    (
        QuantScheme::Fp8,
        "e4m3 codes converted by the hardware (cvt.e4m3x2), activations on the e4m3 grid",
    ),
];

const CUDA_VERIFIED: &str =
    "compiled only: the same module as sm90, which runs on an H100; no device of this kind here";

/// Every target, in the order of [`Target::ALL`].
pub static TARGETS: [TargetInfo; 7] = [
    TargetInfo {
        target: Target::Cpu(CpuIsa::Avx512),
        aliases: &["cpu-x86-64-v4", "x86-64-v4"],
        hardware: "x86-64 with AVX-512 F/BW/DQ/VL, FMA, F16C (x86-64-v4)",
        lanes: "16 f32 per vector",
        weight_dtypes: WEIGHT_TYPES,
        quants: cpu_quants!(
            "int8 pairs summed exactly in i32 (vpmaddwd, 512-bit)",
            "codes unpacked in registers, f32 FMAs (512-bit)"
        ),
        matrix_units: "none (no AMX); 512-bit FMA",
        memory: "host RAM",
        codegen: CodeGen::Cranelift(CpuIsa::Avx512),
        quant_tiles: false,
        verified: "runs: the whole test suite and the goldens on the development machines",
    },
    TargetInfo {
        target: Target::Cpu(CpuIsa::Avx2),
        aliases: &["cpu-x86-64-v3", "x86-64-v3"],
        hardware: "x86-64 with AVX2, FMA, F16C (x86-64-v3)",
        lanes: "8 f32 per vector",
        weight_dtypes: WEIGHT_TYPES,
        quants: cpu_quants!(
            "int8 pairs summed exactly in i32 (vpmaddwd, 256-bit)",
            "codes unpacked in registers, f32 FMAs (256-bit)"
        ),
        matrix_units: "none; 256-bit FMA",
        memory: "host RAM",
        codegen: CodeGen::Cranelift(CpuIsa::Avx2),
        quant_tiles: false,
        verified: "runs: the test suite's kernel and golden tests at this level",
    },
    TargetInfo {
        target: Target::Cpu(CpuIsa::Portable),
        aliases: &["cpu-generic"],
        hardware: "any CPU Rust compiles for (scalar code the compiler may vectorize)",
        lanes: "1 (auto-vectorized)",
        weight_dtypes: WEIGHT_TYPES,
        quants: cpu_quants!(
            "int8 products summed exactly in i32",
            "codes unpacked, f32 multiply-adds"
        ),
        matrix_units: "none",
        memory: "host RAM",
        codegen: CodeGen::Cranelift(CpuIsa::Portable),
        quant_tiles: false,
        verified: "runs: the test suite's kernel and golden tests at this level",
    },
    TargetInfo {
        target: Target::Cuda(CudaArch::Sm80),
        aliases: &["sm80", "ampere", "a100"],
        hardware: "NVIDIA compute capability 8.0 (A100)",
        lanes: "warps of 32",
        weight_dtypes: WEIGHT_TYPES,
        quants: &CUDA_INT_QUANTS,
        matrix_units: "mma.m16n8k16 f16/bf16 -> f32, m16n8k8 tf32, m16n8k32 s8 -> s32 \
                       (through cuBLAS for prefill GEMMs)",
        memory: "40 or 80 GB HBM2e",
        codegen: CodeGen::Nvrtc(CudaArch::Sm80),
        quant_tiles: true,
        verified: CUDA_VERIFIED,
    },
    TargetInfo {
        target: Target::Cuda(CudaArch::Sm89),
        aliases: &["sm89", "ada", "l40s"],
        hardware: "NVIDIA compute capability 8.9 (L4, L40S, RTX 4090)",
        lanes: "warps of 32",
        weight_dtypes: WEIGHT_TYPES,
        quants: &CUDA_QUANTS_FP8,
        matrix_units: "mma.m16n8k16 f16/bf16, m16n8k32 s8 and e4m3/e5m2 -> f32 \
                       (through cuBLAS for prefill GEMMs)",
        memory: "24 or 48 GB GDDR6",
        codegen: CodeGen::Nvrtc(CudaArch::Sm89),
        quant_tiles: true,
        verified: CUDA_VERIFIED,
    },
    TargetInfo {
        target: Target::Cuda(CudaArch::Sm90),
        aliases: &["sm90", "hopper", "h100", "h200"],
        hardware: "NVIDIA compute capability 9.0 (H100, H200)",
        lanes: "warps of 32",
        weight_dtypes: WEIGHT_TYPES,
        quants: &CUDA_QUANTS_FP8,
        matrix_units: "wgmma.m64nNk16 f16/bf16, m64nNk32 s8 and e4m3 (through cuBLAS for \
                       prefill GEMMs); mma.m16n8k16 as on sm80",
        memory: "80 GB HBM3 (H100), 141 GB HBM3e (H200)",
        codegen: CodeGen::Nvrtc(CudaArch::Sm90),
        quant_tiles: true,
        verified: "runs: the GPU test suite and every benchmark in docs/PERF.md, on H100s",
    },
    TargetInfo {
        target: Target::Dcu(HipArch::Gfx906),
        aliases: &["dcu", "hip-gfx906", "gfx906"],
        hardware: "Hygon DCU (Z100 class) and AMD MI50/MI60: AMD gfx906 through HIP",
        lanes: "wavefronts of 64 (the kernels' 32-lane warps run in pairs)",
        weight_dtypes: WEIGHT_TYPES,
        quants: &[
            CUDA_INT_QUANTS[0],
            (QuantScheme::W4A16, "codes unpacked in registers, f32 FMAs"),
            CUDA_INT_QUANTS[2],
            CUDA_INT_QUANTS[3],
            (
                QuantScheme::W4A8,
                "int4 codes against int8 activations by the int8 dot-product instruction \
                 (v_dot4_i32_i8), exact in i32",
            ),
        ],
        matrix_units: "none (no matrix cores on gfx906); dot products v_dot4_i32_i8, \
                       v_dot2_f32_f16",
        memory: "32 GB HBM2 (Z100), 16 or 32 GB (MI50, MI60)",
        codegen: CodeGen::Hipcc(HipArch::Gfx906),
        quant_tiles: false,
        verified: "compiled only: every kernel is built into each DCU plan and checked in CI; \
                   nothing has run on a DCU (none here)",
    },
];

/// The row of `target`.
pub fn info(target: Target) -> &'static TargetInfo {
    TARGETS
        .iter()
        .find(|t| t.target == target)
        .expect("every Target has a row in TARGETS (checked by a test)")
}

/// Why `--target` was refused.
#[derive(Debug, thiserror::Error)]
#[error("unknown target {given:?}; the targets are: {known} (`fdc targets` describes them)")]
pub struct UnknownTarget {
    pub given: String,
    pub known: String,
}

/// The target `--target text` means: a canonical name, an alias, or `cpu` (this machine's
/// best CPU level).
pub fn resolve(text: &str) -> Result<Target, UnknownTarget> {
    if let Some(target) = Target::parse(text) {
        return Ok(target);
    }
    TARGETS
        .iter()
        .find(|t| t.aliases.contains(&text))
        .map(|t| t.target)
        .ok_or_else(|| UnknownTarget {
            given: text.to_string(),
            known: std::iter::once("cpu".to_string())
                .chain(TARGETS.iter().map(|t| t.target.name()))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The targets that run `scheme`, for errors that suggest one.
pub fn targets_running(scheme: QuantScheme) -> Vec<String> {
    TARGETS
        .iter()
        .filter(|t| t.runs(scheme))
        .map(|t| t.target.name())
        .collect()
}

/// The schemes `target` runs (`none` first), for errors.
pub fn schemes_on(target: Target) -> Vec<&'static str> {
    QuantScheme::ALL
        .iter()
        .filter(|&&q| info(target).runs(q))
        .map(|q| q.name())
        .collect()
}

/// Why `--quant scheme` cannot be compiled for `target`, naming what would work: the schemes
/// the target runs and the targets that run the scheme.
pub fn check_scheme(target: Target, scheme: QuantScheme) -> Result<(), String> {
    if info(target).runs(scheme) {
        return Ok(());
    }
    Err(format!(
        "target {target} cannot run --quant {scheme}; it runs: {}; {scheme} runs on: {}",
        schemes_on(target).join(", "),
        targets_running(scheme).join(", ")
    ))
}

/// The table as `fdc targets` prints it: a summary line per target, then each one's details.
pub fn table() -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<13} {:<25} {:<20} {:<32} verified",
        "target", "aliases", "codegen", "quant"
    );
    for t in &TARGETS {
        let quants: Vec<&str> = t.quants.iter().map(|(q, _)| q.name()).collect();
        let verified = t.verified.split(':').next().unwrap_or(t.verified);
        let _ = writeln!(
            out,
            "{:<13} {:<25} {:<20} {:<32} {}",
            t.target.name(),
            t.aliases.join(","),
            t.codegen.name(),
            quants.join(","),
            verified
        );
    }
    for t in &TARGETS {
        let _ = writeln!(out, "\n{}", t.target.name());
        let dtypes: Vec<&str> = t.weight_dtypes.iter().map(|d| d.name()).collect();
        for (field, value) in [
            ("hardware", t.hardware.to_string()),
            ("lanes", t.lanes.to_string()),
            ("weights", dtypes.join(", ")),
            ("matrix units", t.matrix_units.to_string()),
            ("memory", t.memory.to_string()),
            ("codegen", t.codegen.name().to_string()),
            ("verified", t.verified.to_string()),
        ] {
            let _ = writeln!(out, "  {field:<13} {value}");
        }
        for (q, how) in t.quants {
            let _ = writeln!(out, "  {:<13} {how}", q.name());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::OpKind;
    use kernels::registry::{self, KernelKey};

    #[test]
    fn every_target_has_one_row_in_order() {
        assert_eq!(TARGETS.len(), Target::ALL.len());
        for (row, target) in TARGETS.iter().zip(Target::ALL) {
            assert_eq!(row.target, target);
            assert_eq!(info(target).target, target);
        }
    }

    /// The table's schemes are the registry's: a scheme is listed for a target exactly when the
    /// registry has its matmul, embedding and experts there.
    #[test]
    fn the_table_and_the_registry_agree_on_schemes() {
        for t in &TARGETS {
            for &scheme in QuantScheme::ALL.iter().filter(|&&q| q != QuantScheme::None) {
                for op in [OpKind::MatMul, OpKind::Embedding, OpKind::Moe] {
                    let kernels = registry::lookup(&KernelKey {
                        op,
                        dtype: DType::U8,
                        quant: scheme,
                        target: t.target,
                    });
                    assert_eq!(
                        !kernels.is_empty(),
                        t.runs(scheme),
                        "{} {scheme} {op}",
                        t.target
                    );
                }
            }
        }
    }

    #[test]
    fn names_and_aliases_resolve_and_nothing_else_does() {
        let mut seen = std::collections::HashSet::new();
        for t in &TARGETS {
            assert_eq!(resolve(&t.target.name()).unwrap(), t.target);
            for alias in t.aliases {
                assert!(seen.insert(*alias), "alias {alias} twice");
                assert!(
                    Target::parse(alias).is_none(),
                    "{alias} is a canonical name"
                );
                assert_eq!(resolve(alias).unwrap(), t.target);
            }
        }
        assert_eq!(resolve("dcu").unwrap(), Target::Dcu(HipArch::Gfx906));
        assert_eq!(resolve("cpu-x86-64-v3").unwrap(), Target::Cpu(CpuIsa::Avx2));
        assert!(matches!(resolve("cpu").unwrap(), Target::Cpu(_)));
        let err = resolve("tpu-v5").unwrap_err().to_string();
        assert!(err.contains("\"tpu-v5\""), "{err}");
        for t in &TARGETS {
            assert!(err.contains(&t.target.name()), "{err}");
        }
    }

    #[test]
    fn fp8_is_refused_on_the_dcu_and_the_error_names_the_alternatives() {
        let err = check_scheme(Target::Dcu(HipArch::Gfx906), QuantScheme::Fp8).unwrap_err();
        assert!(err.contains("cannot run --quant fp8"), "{err}");
        assert!(err.contains("it runs: none, w8a16"), "{err}");
        assert!(err.contains("fp8 runs on: cpu-avx512"), "{err}");
        assert!(err.contains("cuda-sm90"), "{err}");
        assert!(check_scheme(Target::Dcu(HipArch::Gfx906), QuantScheme::W4A8).is_ok());
        assert!(check_scheme(Target::Cuda(CudaArch::Sm80), QuantScheme::Fp8).is_err());
    }

    #[test]
    fn the_printed_table_has_every_target_and_its_details() {
        let text = table();
        for t in &TARGETS {
            assert!(text.contains(&format!("\n{}\n", t.target.name())), "{text}");
        }
        assert!(text.contains("wavefronts of 64"));
        assert!(text.contains("v_dot4_i32_i8"));
    }
}
