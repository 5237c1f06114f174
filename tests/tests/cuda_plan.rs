//! CUDA plans without a GPU: what `fdc compile --target cuda-*` writes (the module NVRTC built,
//! the kernels chosen, the weights' layout), and the clear errors for what a CUDA target cannot
//! do yet. These need NVRTC (scripts/fetch-nvrtc.sh) but no GPU, so CI runs them.

mod common;

use artifacts::schema::{Launch, WeightLayout as PlanLayout};
use compiler::codegen::cuda::available_for_test;
use compiler::CompileOptions;
use ir::{CudaArch, DType, QuantScheme, Target};
use kernels::registry::{self, KernelSource};
use runtime::{Engine, EngineOptions, LoadedPlan, RuntimeError};
use std::path::PathBuf;

fn compile(model: &str, target: Target, quant: QuantScheme) -> Result<PathBuf, String> {
    compile_with(model, target, quant, None)
}

/// `compile` with a group size for the quantized weights.
fn compile_with(
    model: &str,
    target: Target,
    quant: QuantScheme,
    group: Option<usize>,
) -> Result<PathBuf, String> {
    let out = common::scratch_path(&format!(
        "{}-{}-{quant}-{group:?}.fdp",
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
    options.quant.group = group.map(compiler::passes::quantize_weights::GroupSize::Elements);
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
        // RoPE is fused into attention (`fuse_rope_attention`): no rope launch is left.
        assert!(
            plan.program
                .steps
                .iter()
                .all(|s| !s.kernel.starts_with("rope_")),
            "a rope launch in a CUDA plan"
        );
        assert!(plan
            .program
            .steps
            .iter()
            .any(|s| matches!(s.launch, artifacts::schema::Launch::AttentionRope { .. })));
        // The plan says which steps run as tensor-core GEMMs from which pass size: every bf16
        // matmul from 16 tokens, nothing else; `fdc inspect` shows it by shape.
        let dispatch: artifacts::code_abi::CudaDispatch = artifacts::codec::decode(
            artifacts::code_abi::CUDA_DISPATCH,
            plan.code_symbol(artifacts::code_abi::CUDA_DISPATCH)
                .expect("a dispatch table"),
        )
        .expect("decodes");
        assert_eq!(dispatch.gemm_from_tokens.len(), plan.program.steps.len());
        assert_eq!(dispatch.prefill_attention_from_percent, Some(50));
        for (step, gemm) in plan.program.steps.iter().zip(&dispatch.gemm_from_tokens) {
            let matmul = matches!(step.launch, artifacts::schema::Launch::MatMul { .. });
            assert_eq!(*gemm, matmul.then_some(16), "{}", step.kernel);
        }
        let report = compiler::inspect::inspect(&path, &[]).expect("inspects");
        assert!(report.contains("CUDA module"), "{report}");
        assert!(
            report.contains("tiled prefill kernel for passes with 50% or more"),
            "{report}"
        );
        let matmul = format!("matmul_bf16_{}", arch.name());
        assert!(
            report
                .lines()
                .any(|l| l.contains(&matmul) && l.contains("cuBLAS GEMM from 16 tokens")),
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
    // FP8 needs FP8 hardware (sm89, sm90).
    let err = compile("tiny/llama", Target::Cuda(CudaArch::Sm80), QuantScheme::Fp8).unwrap_err();
    assert!(
        err.contains(
            "cuda-sm80 cannot run --quant fp8; it runs: none, w8a16, w4a16, w2a16, w8a8, w4a8"
        ),
        "{err}"
    );
    // The quantized CUDA kernels take groups of whole 16-k spans.
    let err = compile_with("tiny/llama", target, QuantScheme::W4A16, Some(8)).unwrap_err();
    assert!(err.contains("multiples of 16 (group 8)"), "{err}");
}

/// Mixtures of experts and latent attention take CUDA kernels too: every step of the four MoE
/// tiny goldens is a kernel of the target, the experts and the latent cache as the CPU has them.
#[test]
fn moe_and_latent_attention_plans_take_cuda_kernels() {
    if !available_for_test("moe_and_latent_attention_plans_take_cuda_kernels") {
        return;
    }
    let target = Target::Cuda(CudaArch::Sm90);
    for model in [
        "tiny/qwen3_moe",
        "tiny/mixtral",
        "tiny/ernie4_5_moe",
        "tiny/deepseek_v3",
    ] {
        let path = compile(model, target, QuantScheme::None).expect("compiles");
        let plan = LoadedPlan::load(&path).expect("loads without a GPU");
        let kernels = common::step_kernels(&plan);
        assert!(kernels.contains(&"moe_f32_sm90"), "{model}: {kernels:?}");
        for step in &plan.program.steps {
            let entry = registry::by_name(&step.kernel).expect("a registry kernel");
            assert_eq!(entry.source, KernelSource::Cuda, "{model}: {}", step.kernel);
        }
        if model == "tiny/deepseek_v3" {
            assert!(kernels.contains(&"mla_attention_f32_sm90"), "{kernels:?}");
            assert!(plan.program.has_latent_kv());
        }
    }
}

/// Quantized experts on CUDA: stacked `[E, R, K]` codes in panels of 8 rows (each expert whole
/// panels), the scheme's experts kernel, and the module defines every function it launches.
#[test]
fn quantized_experts_take_the_schemes_cuda_kernel_in_panels_of_8() {
    if !available_for_test("quantized_experts_take_the_schemes_cuda_kernel_in_panels_of_8") {
        return;
    }
    let target = Target::Cuda(CudaArch::Sm90);
    for (model, scheme) in [
        ("tiny/qwen3_moe", QuantScheme::W4A16),
        ("tiny/deepseek_v3", QuantScheme::W8A8),
        ("tiny/ernie4_5_moe", QuantScheme::Fp8),
    ] {
        let path = compile(model, target, scheme).expect("compiles");
        let plan = LoadedPlan::load(&path).expect("loads without a GPU");
        let want = format!("moe_{}_sm90", scheme.name());
        let mut experts = 0;
        for step in &plan.program.steps {
            let Launch::Moe { gate_up, down, .. } = &step.launch else {
                continue;
            };
            assert_eq!(step.kernel, want, "{model}");
            for w in [gate_up, down] {
                let info = &plan.manifest.weights[w.0 as usize];
                assert_eq!(info.shape.len(), 3, "{model}: {}", info.name);
                assert_eq!(
                    info.layout,
                    PlanLayout::Panels { panel: 8 },
                    "{}",
                    info.name
                );
                assert_eq!(info.quant.map(|q| q.scheme), Some(scheme), "{}", info.name);
                experts += 1;
            }
            let entry = registry::by_name(&step.kernel).expect("a registry kernel");
            let ptx = String::from_utf8_lossy(
                plan.code_symbol(artifacts::code_abi::CUDA_PTX)
                    .expect("ptx"),
            );
            for name in kernels::cuda::functions(entry) {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{model}: {name} missing"
                );
            }
        }
        assert!(experts >= 4, "{model}: {experts} stacked experts weights");
    }
}

/// A CUDA plan whose experts' weights disagree with their launch (as a hand edit of the
/// manifest would make them) is refused before anything reaches a device: the kernels index the
/// weights by the launch's sizes.
#[test]
fn experts_whose_weights_disagree_with_their_launch_are_refused_before_the_device() {
    if !available_for_test(
        "experts_whose_weights_disagree_with_their_launch_are_refused_before_the_device",
    ) {
        return;
    }
    let path = compile(
        "tiny/qwen3_moe",
        Target::Cuda(CudaArch::Sm90),
        QuantScheme::W4A16,
    )
    .expect("compiles");
    let down = |plan: &LoadedPlan| {
        plan.program
            .steps
            .iter()
            .find_map(|s| match &s.launch {
                Launch::Moe { down, .. } => Some(down.0 as usize),
                _ => None,
            })
            .expect("a mixture")
    };
    type Edit = fn(&mut artifacts::schema::WeightInfo);
    let edits: [(&str, Edit); 3] = [
        ("[8, 64, 16]", |w| w.shape[2] /= 2),
        ("panels of 8 rows", |w| {
            w.layout = PlanLayout::Panels { panel: 16 }
        }),
        ("the scheme's codes", |w| {
            if let Some(q) = w.quant.as_mut() {
                q.codes = ir::CodeFormat::Int(2);
            }
        }),
    ];
    for (want, edit) in edits {
        let mut plan = LoadedPlan::load(&path).expect("loads");
        let index = down(&plan);
        edit(&mut plan.manifest.weights[index]);
        let err = runtime::cuda::GpuEngine::new(plan, 0, EngineOptions::default())
            .err()
            .expect("refused");
        assert!(
            matches!(err, RuntimeError::InvalidPlan(_)) && err.to_string().contains(want),
            "{want}: {err}"
        );
    }
}

#[test]
fn a_quantized_cuda_plan_keeps_codes_in_panels_of_8_and_picks_the_schemes_kernels() {
    if !available_for_test(
        "a_quantized_cuda_plan_keeps_codes_in_panels_of_8_and_picks_the_schemes_kernels",
    ) {
        return;
    }
    use ir::CodeFormat::{Fp8E4M3, Int};
    for (scheme, codes) in [
        (QuantScheme::W8A16, Int(8)),
        (QuantScheme::W4A16, Int(4)),
        (QuantScheme::W2A16, Int(2)),
        (QuantScheme::W8A8, Int(8)),
        (QuantScheme::W4A8, Int(4)),
        (QuantScheme::Fp8, Fp8E4M3),
    ] {
        let path = compile("tiny/llama", Target::Cuda(CudaArch::Sm90), scheme).expect("compiles");
        let plan = LoadedPlan::load(&path).expect("loads without a GPU");
        let mut quantized = 0;
        for w in &plan.manifest.weights {
            match &w.quant {
                Some(q) => {
                    quantized += 1;
                    assert_eq!(
                        w.layout,
                        artifacts::schema::WeightLayout::Panels { panel: 8 },
                        "{}",
                        w.name
                    );
                    // Tables (the embedding and lm_head) default to 8 bits under any scheme.
                    let table = w.name.contains("embed") || w.name.starts_with("lm_head");
                    let want = if table { Int(8) } else { codes };
                    assert_eq!(q.codes, want, "{}", w.name);
                }
                None => assert_eq!(w.layout, artifacts::schema::WeightLayout::RowMajor),
            }
        }
        assert!(quantized >= 7, "{scheme}: {quantized} quantized weights");
        let kernels = common::step_kernels(&plan);
        assert!(
            kernels.contains(&format!("matmul_{scheme}_sm90").as_str()),
            "{kernels:?}"
        );
        // The tiny llama's embedding table is read by the embedding alone: it stays bf16.
        assert!(kernels.contains(&"embedding_bf16_sm90"), "{kernels:?}");
        // `fdc inspect` says which kernel serves each matmul shape: the tiny llama's
        // gate/up projection is [2 x 128, 64], its LM head (8 bits under any scheme) [320, 64].
        let report = compiler::inspect::inspect(&path, &[]).expect("inspects");
        let section = report
            .split("matmuls by shape")
            .nth(1)
            .unwrap_or_else(|| panic!("no matmul shapes in\n{report}"));
        let line = |kernel: &str, shape: &str| {
            section
                .lines()
                .any(|l| l.contains(kernel) && l.contains(shape))
        };
        // Quantized weights take the GEMM (formed in f32) from 64 tokens.
        let quantized = format!("matmul_{scheme}_sm90");
        assert!(
            section.lines().any(|l| l.contains(&quantized)
                && l.contains("256 x 64")
                && l.contains("cuBLAS GEMM from 64 tokens")),
            "{section}"
        );
        assert!(line("matmul_w8a16_sm90", "320 x 64"), "{section}");
    }
}

/// W4A16 with symmetric groups of 64 and `--quant-tiles`: every matmul weight of a CUDA plan goes into the tile
/// layout of the tensor-core matmul, the codes the panels' moved (`tiles_from_panels`), the
/// scales where the panels keep them; the tables stay 8-bit panels.
#[test]
fn symmetric_w4a16_matmul_weights_of_a_cuda_plan_are_stored_in_tiles() {
    if !available_for_test("symmetric_w4a16_matmul_weights_of_a_cuda_plan_are_stored_in_tiles") {
        return;
    }
    let compile_sym = |target: Target, name: &str, tiles: bool| {
        let out = common::scratch_path(name);
        let mut options = CompileOptions {
            target,
            weight_dtype: DType::F32,
            quant: Default::default(),
            progress: false,
        };
        options.quant.scheme = QuantScheme::W4A16;
        options.quant.group = Some(compiler::passes::quantize_weights::GroupSize::Elements(64));
        options.quant.asymmetric = Some(false);
        options.quant.tiles = tiles;
        compiler::compile(&common::golden("tiny/llama"), &out, &options).expect("compiles");
        LoadedPlan::load(&out).expect("loads without a GPU")
    };
    let cuda = compile_sym(Target::Cuda(CudaArch::Sm90), "tiles-llama-sm90.fdp", true);
    let cpu = compile_sym(
        Target::Cpu(ir::CpuIsa::Portable),
        "tiles-llama-cpu.fdp",
        true,
    );
    let mut tiled = 0;
    for (i, (w, c)) in cuda
        .manifest
        .weights
        .iter()
        .zip(&cpu.manifest.weights)
        .enumerate()
    {
        let Some(q) = &w.quant else { continue };
        if q.codes != ir::CodeFormat::Int(4) {
            assert_eq!(w.layout, PlanLayout::Panels { panel: 8 }, "{}", w.name);
            continue;
        }
        tiled += 1;
        assert_eq!(w.layout, PlanLayout::QuantTiles, "{}", w.name);
        // The same codes as the CPU's (same rows and k), in another order; the same scales.
        let (rows, cols) = (w.shape[0] as usize, w.shape[1] as usize);
        let code = |bytes: &[u8], panel: usize, row: usize, k: usize| {
            let (p, j) = (row / panel, row % panel);
            let bytes_per_k = panel / 2;
            (bytes[(p * cols + k) * bytes_per_k + j % bytes_per_k] >> (4 * (j / bytes_per_k))) & 15
        };
        let PlanLayout::Panels { panel } = c.layout else {
            panic!("{}: the CPU plan keeps panels", w.name)
        };
        let cpu_codes = cpu.weight_bytes(artifacts::schema::WeightRef(i as u32));
        let cuda_bytes = cuda.weight_bytes(artifacts::schema::WeightRef(i as u32));
        let panels_again = {
            // Back from tiles by the fragment rule `tiles_from_panels` documents.
            let mut v = vec![0u8; rows * cols / 2];
            for row in 0..rows {
                for k in 0..cols {
                    let (tile, r16) = (row / 16, row % 16);
                    let (g, half) = (r16 % 8, r16 / 8);
                    let (chunk, wd, kin) = (k / 64, (k % 64) / 16, k % 16);
                    let nibble = half | ((kin / 8) << 1) | ((kin % 2) << 2);
                    let word = ((tile * (cols / 64) + chunk) * 32 + g * 4 + (kin % 8) / 2) * 4 + wd;
                    let c = (cuda_bytes[word * 4 + nibble / 2] >> (4 * (nibble % 2))) & 15;
                    let j = row % 8;
                    v[((row / 8) * cols + k) * 4 + j % 4] |= c << (4 * (j / 4));
                }
            }
            v
        };
        for row in 0..rows {
            for k in 0..cols {
                assert_eq!(
                    code(&panels_again, 8, row, k),
                    code(cpu_codes, panel as usize, row, k),
                    "{} row {row} k {k}",
                    w.name
                );
            }
        }
        let scales = q.scales_offset as usize;
        assert_eq!(
            cuda_bytes.len(),
            scales + rows * (cols / 64) * 2,
            "{}",
            w.name
        );
    }
    assert!(tiled >= 7, "{tiled} weights in tiles");
    // `fdc inspect` says which weights are in tiles and which kernels read them.
    let report = compiler::inspect::inspect(&common::scratch_path("tiles-llama-sm90.fdp"), &[])
        .expect("inspects");
    assert!(
        report.contains("symmetric) in tensor-core tiles")
            && report.contains("in tiles: tensor-core row kernels (matmul_q4t_one, matmul_q4t)"),
        "{report}"
    );
    // A plan whose tiles another kernel would read (the 8-bit head's matmul, the embedding)
    // is refused before the device.
    for table in ["lm_head", "embed"] {
        let mut plan =
            LoadedPlan::load(&common::scratch_path("tiles-llama-sm90.fdp")).expect("loads");
        let w = plan
            .manifest
            .weights
            .iter_mut()
            .find(|w| w.name.contains(table))
            .expect("the table");
        w.layout = PlanLayout::QuantTiles;
        let err = runtime::cuda::GpuEngine::new(plan, 0, EngineOptions::default())
            .err()
            .expect("refused");
        assert!(
            matches!(err, RuntimeError::InvalidPlan(_)) && err.to_string().contains("tile layout"),
            "{table}: {err}"
        );
    }
    // Without --quant-tiles (the default: the tiles measured slower in the decode step): panels.
    let plan = compile_sym(Target::Cuda(CudaArch::Sm90), "panels-llama-sm90.fdp", false);
    assert!(plan
        .manifest
        .weights
        .iter()
        .all(|w| w.layout != PlanLayout::QuantTiles));
}

#[test]
fn a_tied_table_on_cuda_is_read_by_the_quantized_embedding() {
    if !available_for_test("a_tied_table_on_cuda_is_read_by_the_quantized_embedding") {
        return;
    }
    let path = compile(
        "tiny/qwen2",
        Target::Cuda(CudaArch::Sm90),
        QuantScheme::W4A16,
    )
    .expect("compiles");
    let plan = LoadedPlan::load(&path).expect("loads without a GPU");
    let kernels = common::step_kernels(&plan);
    assert_eq!(
        kernels.first(),
        Some(&"embedding_w8a16_sm90"),
        "{kernels:?}"
    );
    assert_eq!(kernels.last(), Some(&"matmul_w8a16_sm90"), "{kernels:?}");
    assert!(kernels.contains(&"matmul_w4a16_sm90"), "{kernels:?}");
}

#[test]
fn a_quantized_cuda_plan_from_before_format_8_is_refused_with_a_fix() {
    if !available_for_test("a_quantized_cuda_plan_from_before_format_8_is_refused_with_a_fix") {
        return;
    }
    // Format 8 gave the quantized CUDA matmuls the rows' activation scales: an older plan's
    // module would be called with the wrong arguments, so it must be refused before any launch.
    let target = Target::Cuda(CudaArch::Sm90);
    let stamped = |quant: QuantScheme, version: u32| {
        // Group 32 is the default; naming it gives this test plan files of its own.
        let path = compile_with("tiny/llama", target, quant, Some(32)).expect("compiles");
        let mut bytes = std::fs::read(&path).expect("reads");
        // The header as `artifacts::container` lays it out (pinned by its frozen-layout test):
        // the version at bytes 8..12, a blake3 of the first 72 bytes at 72..104.
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        let checksum = blake3::hash(&bytes[..72]);
        bytes[72..104].copy_from_slice(checksum.as_bytes());
        let old = path.with_extension(format!("v{version}.fdp"));
        std::fs::write(&old, bytes).expect("writes");
        LoadedPlan::load(&old)
    };
    let err = stamped(QuantScheme::W4A16, 7).err().expect("refused");
    let message = err.to_string();
    assert!(
        message.contains("format 7") && message.contains("recompile"),
        "{message}"
    );
    // Unquantized CUDA plans of format 7 read as before.
    assert!(stamped(QuantScheme::None, 7).is_ok());
}

/// A CUDA plan's decode folds.
fn decode_folds(plan: &LoadedPlan) -> artifacts::code_abi::CudaDecodeFolds {
    artifacts::codec::decode(
        artifacts::code_abi::CUDA_DECODE_FOLDS,
        plan.code_symbol(artifacts::code_abi::CUDA_DECODE_FOLDS)
            .expect("a decode-folds record"),
    )
    .expect("decodes")
}

#[test]
fn one_token_passes_fold_the_norms_between_matmuls_where_the_kernels_can() {
    if !available_for_test("one_token_passes_fold_the_norms_between_matmuls_where_the_kernels_can")
    {
        return;
    }
    use artifacts::schema::Launch;
    let target = Target::Cuda(CudaArch::Sm90);
    for (model, quant) in [
        ("tiny/llama", QuantScheme::None),
        ("tiny/llama", QuantScheme::W4A16),
        ("tiny/qwen2", QuantScheme::W8A16),
    ] {
        let path = compile(model, target, quant).expect("compiles");
        let plan = LoadedPlan::load(&path).expect("loads");
        let steps = &plan.program.steps;
        let folds = decode_folds(&plan);
        let norms = steps
            .iter()
            .filter(|s| matches!(s.launch, Launch::AddRmsNorm { .. }))
            .count();
        // Every add_rms_norm: two per layer, less one (the final norm follows a plain add,
        // since the logit rows are gathered between the two).
        assert!(norms > 0);
        assert_eq!(folds.norms.len(), norms, "{model} {quant}");
        for fold in &folds.norms {
            let (norm, producer) = (fold.norm as usize, fold.producer as usize);
            let Launch::AddRmsNorm { d, normed_out, .. } = steps[norm].launch else {
                panic!("{model}: step {norm} is not a norm");
            };
            assert_eq!(producer + 1, norm);
            assert!(matches!(steps[producer].launch, Launch::MatMul { out, .. } if out == d));
            assert!(!fold.consumers.is_empty());
            for &c in &fold.consumers {
                assert!(
                    matches!(steps[c as usize].launch, Launch::MatMul { x, .. } if x == normed_out)
                );
            }
        }
        let report = compiler::inspect::inspect(&path, &[]).expect("inspects");
        assert!(
            report.contains(&format!("decode folds: {norms} of the add_rms_norm")),
            "{report}"
        );
    }
    // A8 activations are quantized before the matmul, which has no fold kernels.
    let path = compile("tiny/llama", target, QuantScheme::W8A8).expect("compiles");
    let plan = LoadedPlan::load(&path).expect("loads");
    assert!(decode_folds(&plan).norms.is_empty());
}
