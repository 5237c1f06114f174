//! DCU plans without a DCU: what `fdc compile --target dcu` writes (one gfx906 code object that
//! defines every kernel the program launches, the DCU's own W4A8 kernel), what `fdc inspect`
//! says of it, and the clear refusals (FP8 at compile time, running it in this fdrt). These need
//! a HIP compiler (Debian's `hipcc`; CI installs it) but no GPU. Nothing here executes a DCU
//! kernel: docs/TARGETS.md says what was compiled and what never ran.

mod common;

use compiler::codegen::hip::{available_for_test, kernels_of};
use compiler::CompileOptions;
use ir::{DType, HipArch, QuantScheme, Target};
use kernels::registry::{self, KernelSource};
use runtime::{LoadedPlan, RuntimeError};
use std::path::{Path, PathBuf};

const DCU: Target = Target::Dcu(HipArch::Gfx906);

fn compile(model: &Path, quant: QuantScheme) -> Result<PathBuf, String> {
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = common::scratch_path(&format!("dcu-{name}-{quant}.fdp"));
    let mut options = CompileOptions {
        target: DCU,
        weight_dtype: DType::BF16,
        quant: Default::default(),
        progress: false,
    };
    options.quant.scheme = quant;
    compiler::compile(model, &out, &options)
        .map(|_| out)
        .map_err(|e| e.to_string())
}

/// Every step's kernel is a DCU kernel of the registry, and every function it launches is in
/// the plan's code object.
fn check_plan(label: &str, path: &Path) -> LoadedPlan {
    let plan = LoadedPlan::load(path).unwrap_or_else(|e| panic!("{label}: loads: {e}"));
    assert_eq!(plan.manifest.target, DCU);
    let object = plan
        .code_symbol(artifacts::code_abi::DCU_CODE_OBJECT)
        .expect("the code object");
    let defined = kernels_of(object, HipArch::Gfx906).expect("an AMD GPU code object");
    for step in &plan.program.steps {
        let entry = registry::by_name(&step.kernel).expect("a registry kernel");
        assert_eq!(entry.source, KernelSource::Hip, "{label}: {}", step.kernel);
        assert_eq!(entry.key.target, DCU, "{label}: {}", step.kernel);
        let folds = kernels::cuda::fold_functions(entry);
        for function in kernels::cuda::functions(entry)
            .iter()
            .chain(folds.iter().flatten())
        {
            assert!(
                defined.iter().any(|d| d == function),
                "{label}: {} launches {function}, not in the code object",
                step.kernel
            );
        }
    }
    plan
}

#[test]
fn w4a8_dcu_plans_of_every_tiny_golden_and_smollm2_compile_every_kernel_for_gfx906() {
    if !available_for_test("w4a8_dcu_plans_compile_every_kernel_for_gfx906") {
        return;
    }
    let mut models: Vec<(String, PathBuf)> = [
        "llama",
        "llama3_rope",
        "qwen2",
        "qwen2_yarn",
        "qwen3",
        "qwen3_moe",
        "mixtral",
        "ernie4_5_moe",
        "deepseek_v3",
        "deepseek_v3_yarn",
    ]
    .iter()
    .map(|m| (m.to_string(), common::golden(&format!("tiny/{m}"))))
    .collect();
    models.push(("smollm2".into(), common::smollm2_gguf()));
    for (label, model) in &models {
        let path = compile(model, QuantScheme::W4A8).unwrap_or_else(|e| panic!("{label}: {e}"));
        let plan = check_plan(label, &path);
        let kernels = common::step_kernels(&plan);
        // The DCU's W4A8 matmul (int8 dot products) serves the layers' matmuls.
        assert!(
            kernels.contains(&"matmul_w4a8_gfx906"),
            "{label}: {kernels:?}"
        );
        // `fdc inspect` names the code object and the kernels compiled into it.
        let text = compiler::inspect::inspect(&path, &[]).expect("inspects");
        assert!(text.contains("DCU module"), "{label}: {text}");
        assert!(
            text.contains("kernels compiled for gfx906: ") && text.contains("matmul_q4_a8_one"),
            "{label}: {text}"
        );
        assert!(text.contains("matmul_w4a8_gfx906"), "{label}: {text}");
    }
}

#[test]
fn a_dense_dcu_plan_takes_the_dcu_kernels_and_this_fdrt_refuses_to_run_it() {
    if !available_for_test("a_dense_dcu_plan_takes_the_dcu_kernels") {
        return;
    }
    let path = compile(&common::golden("tiny/llama"), QuantScheme::None).expect("compiles");
    let plan = check_plan("tiny/llama", &path);
    // RoPE is fused into attention as on CUDA: the same kernel sources.
    assert!(plan
        .program
        .steps
        .iter()
        .all(|s| s.kernel != "rope_f32_gfx906"));
    let err = match runtime::Engine::new(plan, runtime::EngineOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("the CPU engine ran a DCU plan"),
    };
    assert!(matches!(err, RuntimeError::DcuPlan { .. }), "{err}");
    assert!(err.to_string().contains("dcu-gfx906"), "{err}");
}

/// Refusals at compile time need no HIP compiler: they come before code generation.
#[test]
fn fp8_on_the_dcu_is_refused_naming_what_would_work() {
    let err = compile(&common::golden("tiny/llama"), QuantScheme::Fp8).unwrap_err();
    assert!(err.contains("dcu-gfx906"), "{err}");
    assert!(err.contains("cannot run --quant fp8"), "{err}");
    assert!(
        err.contains("it runs: none, w8a16, w4a16, w2a16, w8a8, w4a8"),
        "{err}"
    );
    assert!(
        err.contains("fp8 runs on: ") && err.contains("cuda-sm90"),
        "{err}"
    );
}
