//! Quantized mixture-of-experts experts on the CPU: the tiny MoE goldens compiled with only their
//! stacked experts quantized compute what the same model computes with those experts' quantized
//! values written back into the checkpoint as plain f32 (the plan's codes, scales and minimums
//! dequantized, per expert and projection): so each expert's slice of the stacked codes is the
//! expert the router picked, in the checkpoint's row order. Plus the compile-time refusals.

mod common;

use artifacts::schema::WeightRef;
use common::synthetic::rewritten_copy;
use common::*;
use compiler::passes::quantize_weights::QuantOptions;
use compiler::CompileOptions;
use ir::{DType, QuantScheme, Target};
use kernels::cpu::reference::dequantize_quant;
use runtime::LoadedPlan;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `scheme` on the experts only: everything else stays f32, so the two plans differ in the
/// experts alone.
fn experts_only(scheme: QuantScheme) -> QuantOptions {
    QuantOptions {
        scheme,
        overrides: vec![("*".into(), QuantScheme::None), ("experts".into(), scheme)],
        ..Default::default()
    }
}

fn compile(model: &Path, out: &Path, target: &str, quant: QuantOptions) -> Result<(), String> {
    let options = CompileOptions {
        target: Target::parse(target).expect("target"),
        weight_dtype: DType::F32,
        quant,
        progress: false,
    };
    compiler::compile(model, out, &options)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A copy of checkpoint `from` in `to` whose expert tensors hold the values `plan`'s quantized
/// stacked experts decode to. A stacked weight `{block}.experts.{gate}+{up}.weight` is
/// `[E, 2I, C]` with expert e's gate rows then its up rows; `{block}.experts.{down}.weight` is
/// `[E, C, I]`.
fn dequantized_checkpoint(from: &Path, plan: &LoadedPlan, to: &Path) -> usize {
    let mut replaced: HashMap<String, Vec<f32>> = HashMap::new();
    for (i, info) in plan.manifest.weights.iter().enumerate() {
        if info.quant.is_none() {
            continue;
        }
        let stacked = info
            .name
            .strip_suffix(".weight")
            .and_then(|n| n.rsplit_once(".experts."))
            .unwrap_or_else(|| panic!("{} is quantized but not experts", info.name));
        let (block, projs) = stacked;
        let values = dequantize_quant(&plan.quant_weight(WeightRef(i as u32)).expect("view"));
        let [e, rows, cols] = info.shape[..] else {
            panic!("{} is not [E, R, K]: {:?}", info.name, info.shape)
        };
        let parts: Vec<&str> = projs.split('+').collect();
        let per_part = rows as usize / parts.len();
        let expert_len = (rows * cols) as usize;
        for x in 0..e as usize {
            for (j, part) in parts.iter().enumerate() {
                let start = x * expert_len + j * per_part * cols as usize;
                replaced.insert(
                    format!("{block}.experts.{x}.{part}.weight"),
                    values[start..start + per_part * cols as usize].to_vec(),
                );
            }
        }
    }
    let mut used = 0;
    rewritten_copy(from, to, |name, original, out| match replaced.get(name) {
        Some(v) => {
            out.copy_from_slice(v);
            used += 1;
        }
        None => out.copy_from_slice(original),
    });
    assert_eq!(
        used,
        replaced.len(),
        "every expert tensor is in the checkpoint"
    );
    used
}

/// Compiles `arch`'s golden with `scheme` on its experts, checks that exactly the experts are
/// quantized, and returns the largest logit difference (relative to the largest logit) from the
/// plan of the dequantized checkpoint over the golden prompt, and whether the greedy tokens at
/// every position are the same.
fn experts_against_their_values(arch: &str, scheme: QuantScheme) -> (f32, bool) {
    let dir = golden(&format!("tiny/{arch}"));
    let label = format!("{arch} {scheme}");
    let quantized = scratch_path(&format!("{arch}-experts-{scheme}.fdp"));
    compile(&dir, &quantized, "cpu", experts_only(scheme)).expect("compiling");
    let plan = LoadedPlan::load(&quantized).expect("loading");
    let mut experts = 0;
    for info in &plan.manifest.weights {
        let is_experts = info.name.contains(".experts.") && info.shape.len() == 3;
        let q = info.quant.map(|q| q.scheme);
        assert_eq!(
            q,
            is_experts.then_some(scheme),
            "{label}: {} quantization",
            info.name
        );
        experts += usize::from(is_experts);
    }
    assert!(experts >= 2, "{label}: {experts} stacked experts weights");
    let reference_dir = scratch_path(&format!("{arch}-experts-{scheme}-dequantized"));
    let tensors = dequantized_checkpoint(&dir, &plan, &reference_dir);
    println!("{label}: {experts} stacked weights, {tensors} expert tensors written back");
    let reference = scratch_path(&format!("{arch}-experts-{scheme}-dequantized.fdp"));
    compile(&reference_dir, &reference, "cpu", QuantOptions::default()).expect("compiling");

    let json = read_json(&dir.join("golden.json"));
    let input_ids = ids(&json["input_ids"]);
    let vocab = plan.manifest.model.vocab_size as usize;
    drop(plan);
    let got = engine(&quantized)
        .prefill(&input_ids, true)
        .expect("forward")
        .to_vec();
    let want = engine(&reference)
        .prefill(&input_ids, true)
        .expect("forward")
        .to_vec();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let greedy = |l: &[f32]| l.chunks(vocab).map(argmax).collect::<Vec<_>>();
    let same = greedy(&got) == greedy(&want);
    println!(
        "{label}: logits {:.2e} of the largest from the dequantized model's, greedy tokens {}",
        diff / scale,
        if same { "equal" } else { "differ" }
    );
    (diff / scale, same)
}

/// The A16 schemes round activations to 16 bits per block of 32 values (a relative error of
/// 2^-16): the quantized model must compute its dequantized values to the golden tolerance,
/// with the same greedy token at every position.
#[test]
fn a16_experts_compute_their_dequantized_values() {
    for (arch, scheme) in [
        ("qwen3_moe", QuantScheme::W4A16),
        ("mixtral", QuantScheme::W8A16),
        ("deepseek_v3", QuantScheme::W4A16),
        ("ernie4_5_moe", QuantScheme::W2A16),
    ] {
        let (error, same_tokens) = experts_against_their_values(arch, scheme);
        assert!(error <= 1e-3, "{arch} {scheme}: {error:.2e}");
        assert!(same_tokens, "{arch} {scheme}: greedy tokens differ");
    }
}

/// The A8 and FP8 schemes also round each token's activations before the experts' matmuls (to
/// 255 levels of its largest value, or to e4m3's 3 mantissa bits), so they differ from the
/// dequantized weights by that rounding: at most four of the grid's relative steps (1/127 and
/// 2^-4) here, where a misplaced expert or row gives an error of the order of the logits. And by
/// at least a fraction of it: experts run without the rounding would land within the A16
/// schemes' 1e-4. (The random tiny models' top logits are close: the rounding can change a
/// greedy token.)
#[test]
fn a8_and_fp8_experts_stay_near_their_dequantized_values() {
    for (arch, scheme, step) in [
        ("qwen3_moe", QuantScheme::W8A8, 1.0 / 127.0),
        ("deepseek_v3", QuantScheme::W4A8, 1.0 / 127.0),
        ("mixtral", QuantScheme::W4A8, 1.0 / 127.0),
        ("ernie4_5_moe", QuantScheme::Fp8, 1.0 / 16.0),
        ("mixtral", QuantScheme::Fp8, 1.0 / 16.0),
    ] {
        let (error, _) = experts_against_their_values(arch, scheme);
        assert!(error <= 4.0 * step, "{arch} {scheme}: {error:.2e}");
        assert!(
            error >= step / 16.0,
            "{arch} {scheme}: {error:.2e}, activations not rounded?"
        );
    }
}

/// A checkpoint of the tiny Qwen3-MoE config with another expert width, written by `fdc synth`.
fn qwen3_moe_with_experts_of(inter: usize) -> PathBuf {
    let dir = scratch_path(&format!("qwen3_moe-inter-{inter}"));
    let mut config = read_json(&golden("tiny/qwen3_moe").join("config.json"));
    config["moe_intermediate_size"] = inter.into();
    let config_path = scratch_path(&format!("qwen3_moe-inter-{inter}.json"));
    std::fs::write(&config_path, config.to_string()).expect("config");
    models::synth::synthesize(&config_path, &dir, 5, false).expect("synthesizing");
    dir
}

#[test]
fn experts_that_split_a_panel_are_refused_naming_the_way_out() {
    // I = 20: an expert's 40 gate-up rows are not whole panels of the AVX-512 layout's 32.
    let dir = qwen3_moe_with_experts_of(20);
    let out = scratch_path("qwen3_moe-inter-20.fdp");
    let err =
        compile(&dir, &out, "cpu-avx512", experts_only(QuantScheme::W8A16)).expect_err("refused");
    assert!(
        err.contains("40 rows are not whole panels of 32 rows")
            && err.contains("--quant-override experts=none"),
        "{err}"
    );
    // The way out the message names compiles.
    let mut options = experts_only(QuantScheme::W8A16);
    options
        .overrides
        .push(("experts".into(), QuantScheme::None));
    compile(&dir, &out, "cpu-avx512", options).expect("experts unquantized");
}

#[test]
fn a_layers_experts_under_two_schemes_are_refused() {
    let dir = golden("tiny/qwen3_moe");
    let out = scratch_path("qwen3_moe-mixed-experts.fdp");
    let mut options = experts_only(QuantScheme::W4A16);
    options
        .overrides
        .push(("down_proj".into(), QuantScheme::W8A16));
    let err = compile(&dir, &out, "cpu", options).expect_err("refused");
    assert!(
        err.contains("the experts of one layer take one scheme")
            && err.contains("experts.gate_proj+up_proj.weight is w4a16")
            && err.contains("experts.down_proj.weight is w8a16"),
        "{err}"
    );
}
