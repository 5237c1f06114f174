//! CUDA plans without a GPU: what `fdc compile --target cuda-*` writes (the module NVRTC built,
//! the kernels chosen, the weights' layout), and the clear errors for what a CUDA target cannot
//! do yet. These need NVRTC (scripts/fetch-nvrtc.sh) but no GPU, so CI runs them.

mod common;

use compiler::codegen::cuda::available_for_test;
use compiler::CompileOptions;
use ir::{CudaArch, DType, QuantScheme, Target};
use kernels::registry::{self, KernelSource};
use runtime::{Engine, EngineOptions, LoadedPlan, RuntimeError};
use std::path::PathBuf;

fn compile(model: &str, target: Target, quant: QuantScheme) -> Result<PathBuf, String> {
    let out = common::scratch_path(&format!(
        "{}-{}-{quant}.fdp",
        model.replace('/', "-"),
        target.name()
    ));
    let mut options = CompileOptions {
        target,
        weight_dtype: DType::BF16,
        quant: Default::default(),
        progress: false,
    };
    options.quant.scheme = quant;
    compiler::compile(&common::golden(model), &out, &options)
        .map(|_| out)
        .map_err(|e| e.to_string())
}

#[test]
fn a_cuda_plan_carries_its_module_cuda_kernels_and_row_major_weights() {
    if !available_for_test("a_cuda_plan_carries_its_module_cuda_kernels_and_row_major_weights") {
        return;
    }
    for arch in [CudaArch::Sm80, CudaArch::Sm90] {
        let target = Target::Cuda(arch);
        let path = compile("tiny/llama", target, QuantScheme::None).expect("compiles");
        let plan = LoadedPlan::load(&path).expect("loads without a GPU");
        assert_eq!(plan.manifest.target, target);
        let cubin = plan
            .code_symbol(artifacts::code_abi::CUDA_CUBIN)
            .expect("cubin");
        assert_eq!(&cubin[..4], b"\x7fELF");
        let ptx = String::from_utf8_lossy(
            plan.code_symbol(artifacts::code_abi::CUDA_PTX)
                .expect("ptx"),
        )
        .into_owned();
        let (major, minor) = arch.compute_capability();
        assert!(ptx.contains(&format!(".target sm_{major}{minor}")));
        for step in &plan.program.steps {
            let entry = registry::by_name(&step.kernel).expect("a registry kernel");
            assert_eq!(entry.source, KernelSource::Cuda, "{}", step.kernel);
            assert_eq!(entry.key.target, target, "{}", step.kernel);
            assert!(step.code.is_none());
        }
        assert!(plan
            .manifest
            .weights
            .iter()
            .all(|w| w.layout == artifacts::schema::WeightLayout::RowMajor));
        let report = compiler::inspect::inspect(&path, &[]).expect("inspects");
        assert!(report.contains("CUDA module"), "{report}");
        assert!(
            report.contains(&format!("matmul_bf16_{}", arch.name())),
            "{report}"
        );
    }
}

#[test]
fn the_cpu_engine_refuses_a_cuda_plan_saying_what_to_do() {
    if !available_for_test("the_cpu_engine_refuses_a_cuda_plan_saying_what_to_do") {
        return;
    }
    let path = compile(
        "tiny/llama",
        Target::Cuda(CudaArch::Sm90),
        QuantScheme::None,
    )
    .unwrap();
    let plan = LoadedPlan::load(&path).unwrap();
    match Engine::new(plan, EngineOptions::default()) {
        Err(e @ RuntimeError::CudaPlan { .. }) => {
            let message = e.to_string();
            assert!(message.contains("cuda-sm90"), "{message}");
            assert!(message.contains("--target cpu"), "{message}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a CPU engine ran a CUDA plan"),
    }
}

#[test]
fn what_a_cuda_target_cannot_compile_is_refused_naming_what_it_can() {
    // Both refusals come before any CUDA code is built: no NVRTC needed.
    let target = Target::Cuda(CudaArch::Sm90);
    let err = compile("tiny/llama", target, QuantScheme::W4A16).unwrap_err();
    assert!(
        err.contains("cuda-sm90 cannot run --quant w4a16; it runs: none"),
        "{err}"
    );
    let err = compile("tiny/mixtral", target, QuantScheme::None).unwrap_err();
    assert!(err.contains("no kernel for moe"), "{err}");
    assert!(err.contains("cuda-sm90 has kernels for:"), "{err}");
    assert!(err.contains("attention"), "{err}");
}
