//! Quantized plans of SmolLM2-135M-Instruct (from its Q4_1 GGUF): the GGUF pass-through keeps
//! the checkpoint's exact weights, and each scheme's perplexity stays within the bound
//! `docs/QUANTIZATION.md` promises, relative to the unquantized plan (the GGUF dequantized to
//! f32); where plain rounding misses the bound, with the calibration (GPTQ, activation smoothing)
//! of `tests/data/calibration.txt`. The accuracy tests use the first `SLICE_TOKENS` tokens of
//! the evaluation text to stay fast; the table in the doc uses the whole text. The reference
//! plan's scores and the calibration statistics are computed once and kept under the target
//! directory, keyed by the reference plan's identity, so each test pays only for its own plan.

mod common;

use artifacts::calibration::{Calibration, InputStats};
use common::*;
use compiler::passes::quantize_weights::{CalibrationRef, GroupSize, QuantOptions};
use compiler::CompileOptions;
use ir::{DType, QuantScheme, Target};
use kernels::cpu::quant::reference::dequantize;
use runtime::eval::TokenScores;
use runtime::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Tokens of the evaluation text the tests score: two 512-token windows.
const SLICE_TOKENS: usize = 1024;

fn compile_quant(name: &str, quant: QuantOptions) -> PathBuf {
    let out = scratch_path(&format!("smollm2-{name}.fdp"));
    let options = CompileOptions {
        target: Target::parse("cpu").expect("cpu"),
        weight_dtype: DType::F32,
        quant,
        progress: false,
    };
    compiler::compile(&smollm2_gguf(), &out, &options)
        .unwrap_or_else(|e| panic!("compiling {name}: {e}"));
    out
}

fn scheme(scheme: QuantScheme) -> QuantOptions {
    QuantOptions {
        scheme,
        ..Default::default()
    }
}

#[test]
fn gguf_blocks_pass_through_bit_for_bit() {
    let plan_path = compile_quant("w4a16-passthrough", scheme(QuantScheme::W4A16));
    let plan = runtime::LoadedPlan::load(&plan_path).expect("plan");
    let checkpoint = models::open(&smollm2_gguf()).expect("gguf");
    let mut checked = 0;
    for (i, info) in plan.manifest.weights.iter().enumerate() {
        let Some(q) = &info.quant else { continue };
        assert!(q.from_checkpoint, "{} was re-quantized", info.name);
        let w = plan
            .quant_weight(artifacts::schema::WeightRef(i as u32))
            .expect("quantized view");
        let got = dequantize(&w);
        // The weight's checkpoint tensors, rows concatenated as the fused weights are.
        let parts: Vec<String> = if info.name.contains('+') {
            // `model.layers.0.self_attn.q_proj+k_proj+v_proj.weight`: the parts' rows in order.
            let base = &info.name[..info.name.rfind('.').unwrap()];
            let (head, fused) = base.rsplit_once('.').unwrap();
            fused
                .split('+')
                .map(|p| format!("{head}.{p}.weight"))
                .collect()
        } else {
            vec![info.name.clone()]
        };
        let mut want = vec![];
        for p in &parts {
            want.extend(checkpoint.tensors.load_f32(p).expect("tensor"));
        }
        assert_eq!(got.len(), want.len(), "{}", info.name);
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits() && !(**a == 0.0 && **b == 0.0))
            .count();
        assert_eq!(
            differ, 0,
            "{}: {differ} weights differ from the GGUF",
            info.name
        );
        checked += 1;
    }
    // 30 layers x (QKV, O, gate+up, down) at w4a16 from Q4_1, and the tied Q8_0 table at w8a16.
    assert_eq!(checked, 30 * 4 + 1);
}

fn tokenize(plan: &Path, file: &str) -> Vec<u32> {
    let loaded = runtime::LoadedPlan::load(plan).expect("plan");
    let tokenizer =
        TextTokenizer::from_json(loaded.tokenizer_json().expect("tokenizer")).expect("tokenizer");
    let text = std::fs::read_to_string(workspace().join(file)).expect(file);
    tokenizer.encode_raw(&text).expect("ids")
}

fn slice_ids(plan: &Path) -> Vec<u32> {
    let mut ids = tokenize(plan, "tests/data/coriolanus.txt");
    assert!(ids.len() >= 4000, "the text has {} tokens", ids.len());
    ids.truncate(SLICE_TOKENS);
    ids
}

fn eval_options() -> runtime::EngineOptions {
    runtime::EngineOptions {
        max_context: 512,
        max_batch_tokens: 512,
        max_num_seqs: 1,
        ..runtime::EngineOptions::default()
    }
}

/// A file under the target directory named after the unquantized plan's identity, so that a
/// changed compiler or checkpoint never reuses it.
fn cache_file(reference: &Path, what: &str) -> PathBuf {
    let plan = runtime::LoadedPlan::load(reference).expect("plan");
    let id: String = plan.identity()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("quant-{what}-{id}"))
}

/// The unquantized plan's scores on the slice: computed once per test process, and kept in a
/// file under the target directory (the reference pass costs as much as the plan under test).
fn reference_scores() -> &'static TokenScores {
    static SCORES: OnceLock<TokenScores> = OnceLock::new();
    SCORES.get_or_init(|| {
        let reference = compiled(&smollm2_gguf(), DType::F32);
        let file = cache_file(&reference, "scores.json");
        if let Some(scores) = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<(Vec<f64>, Vec<u32>)>(&b).ok())
        {
            return TokenScores {
                logprob: scores.0,
                top1: scores.1,
            };
        }
        let ids = slice_ids(&reference);
        let mut engine = engine_with(&reference, eval_options());
        let scores = runtime::eval::score(&mut engine, &ids, 512).expect("reference scores");
        let json = serde_json::to_vec(&(&scores.logprob, &scores.top1)).expect("json");
        std::fs::write(&file, json).expect("writing the reference scores");
        scores
    })
}

/// GPTQ statistics of the unquantized plan over `tests/data/calibration.txt` (`fdrt calibrate`):
/// computed once per test process and kept in a file under the target directory.
fn calibration() -> CalibrationRef {
    static STATS: OnceLock<CalibrationRef> = OnceLock::new();
    STATS
        .get_or_init(|| {
            let reference = compiled(&smollm2_gguf(), DType::F32);
            let file = cache_file(&reference, "calibration.calib");
            let stats = match Calibration::read(&file) {
                Ok(stats) => stats,
                Err(_) => {
                    let ids = tokenize(&reference, "tests/data/calibration.txt");
                    let text = std::fs::read(workspace().join("tests/data/calibration.txt"))
                        .expect("the calibration text");
                    let hash = blake3::hash(&text).to_hex().to_string();
                    let mut engine = engine_with(&reference, eval_options());
                    let stats = runtime::calibrate::calibrate(&mut engine, &ids, 512, &hash)
                        .expect("calibration");
                    stats.write(&file).expect("writing the calibration");
                    stats
                }
            };
            CalibrationRef(Arc::new(stats))
        })
        .clone()
}

/// Perplexity of the `scheme` plan over the slice, relative to the unquantized plan's, must be
/// below `1 + bound`.
fn check_perplexity(name: &str, quant: QuantOptions, bound: f64) {
    let ratio = perplexity_ratio(name, quant);
    assert!(
        ratio < 1.0 + bound,
        "{name}: perplexity is {:.2}% above the unquantized plan's, more than {:.0}%",
        100.0 * (ratio - 1.0),
        100.0 * bound
    );
}

/// Perplexity of the `quant` plan over the slice divided by the unquantized plan's.
fn perplexity_ratio(name: &str, quant: QuantOptions) -> f64 {
    let reference = reference_scores();
    let plan = compile_quant(name, quant);
    let ids = slice_ids(&plan);
    let mut engine = engine_with(&plan, eval_options());
    let scores = runtime::eval::score(&mut engine, &ids, 512).expect("scores");
    let ratio = scores.perplexity() / reference.perplexity();
    println!(
        "{name}: perplexity {:.4} vs {:.4} unquantized ({:+.2}%), top-1 {:.2}%",
        scores.perplexity(),
        reference.perplexity(),
        100.0 * (ratio - 1.0),
        100.0 * scores.top1_agreement(reference)
    );
    ratio
}

fn calibrated(quant: QuantOptions) -> QuantOptions {
    QuantOptions {
        calibration: Some(calibration()),
        ..quant
    }
}

#[test]
fn w8a16_perplexity_within_1_percent() {
    check_perplexity("w8a16", scheme(QuantScheme::W8A16), 0.01);
}

#[test]
fn w8a8_calibrated_perplexity_within_3_percent() {
    // Per-token int8 activations cost +3.45% on this slice by plain rounding; activation
    // smoothing and GPTQ with the calibration text bring it to +1.9% (docs/QUANTIZATION.md).
    check_perplexity("w8a8", calibrated(scheme(QuantScheme::W8A8)), 0.03);
}

#[test]
fn fp8_calibrated_perplexity_within_3_percent() {
    // e4m3 weights and per-token e4m3 activations: +4.58% on this slice by plain rounding,
    // +1.9% with activation smoothing and GPTQ.
    check_perplexity("fp8", calibrated(scheme(QuantScheme::Fp8)), 0.03);
}

#[test]
fn w4a16_group_32_perplexity_within_8_percent() {
    // The default: SmolLM2's Q4_1 blocks kept as they are (group 32).
    check_perplexity("w4a16", scheme(QuantScheme::W4A16), 0.08);
}

#[test]
#[ignore = "about 3 minutes of CPU (fitting 2 million groups); run with --ignored"]
fn w4a16_requantized_at_group_64_misses_the_8_percent_bound() {
    // FIXME: re-quantizing the file's 4-bit weights to 4 bits in groups of 64 (group 128 does not
    // divide SmolLM2's K of 576) rounds them a second time: +22% perplexity on this slice with the
    // calibration-free fit, and GPTQ with the calibration text only brings the whole text from
    // +20.8% to +19.1% (docs/QUANTIZATION.md). The W4A16 bound is met by keeping the file's blocks
    // (`w4a16_group_32_perplexity_within_8_percent`). This asserts the re-quantized state; when
    // it gets within 8%, this fails and becomes `check_perplexity(.., 0.08)`.
    let quant = QuantOptions {
        group: Some(GroupSize::Elements(64)),
        ..scheme(QuantScheme::W4A16)
    };
    let ratio = perplexity_ratio("w4a16-g64", quant);
    assert!(
        (1.08..1.35).contains(&ratio),
        "w4a16 group 64 perplexity ratio {ratio}"
    );
}

#[test]
fn group_size_applies_to_the_schemes_weights_not_the_table() {
    // The tied table defaults to w8a16 in its own default groups, so its Q8_0 blocks are kept;
    // the layers' weights take the group size asked for.
    let quant = QuantOptions {
        group: Some(GroupSize::Elements(64)),
        ..scheme(QuantScheme::W8A16)
    };
    let plan = runtime::LoadedPlan::load(&compile_quant("w8a16-g64", quant)).expect("plan");
    let quant_of = |name: &str| {
        let info = plan.manifest.weights.iter().find(|w| w.name == name);
        info.and_then(|w| w.quant)
            .unwrap_or_else(|| panic!("{name} is not quantized"))
    };
    let table = quant_of("model.embed_tokens.weight");
    assert!(table.from_checkpoint, "the table was re-quantized");
    assert_eq!(table.group, 32);
    let down = quant_of("model.layers.0.mlp.down_proj.weight");
    assert!(!down.from_checkpoint);
    assert_eq!(down.group, 64);
}

#[test]
fn w4a8_perplexity_within_10_percent() {
    check_perplexity("w4a8", scheme(QuantScheme::W4A8), 0.10);
}

#[test]
fn a_group_that_does_not_divide_k_names_the_weight() {
    let out = scratch_path("bad-group.fdp");
    let options = CompileOptions {
        target: Target::parse("cpu").expect("cpu"),
        weight_dtype: DType::F32,
        quant: QuantOptions {
            group: Some(GroupSize::Elements(100)),
            ..scheme(QuantScheme::W4A16)
        },
        progress: false,
    };
    let err = compiler::compile(&smollm2_gguf(), &out, &options)
        .expect_err("group 100 does not divide 576")
        .to_string();
    assert!(
        err.contains("weight model.") && err.contains("group size 100 does not divide"),
        "{err}"
    );
}

/// Statistics for one weight, all zero: enough to check names and K.
fn stats_for(weight: &str, k: usize) -> InputStats {
    InputStats {
        weight: weight.to_string(),
        k: k as u64,
        rows: 1,
        gram_upper: vec![0.0; k * (k + 1) / 2],
        abs_max: vec![0.0; k],
    }
}

#[test]
fn calibration_that_does_not_match_the_model_is_refused_naming_the_weight() {
    let cases = [
        (
            stats_for("model.layers.0.mlp.fc1.weight", 576),
            "statistics for weight model.layers.0.mlp.fc1.weight, which",
        ),
        (
            stats_for("model.layers.0.mlp.down_proj.weight", 576),
            "weight model.layers.0.mlp.down_proj.weight has shape",
        ),
    ];
    for (stats, needle) in cases {
        let calibration = Calibration {
            model: "other".into(),
            tokens: 1,
            text_blake3: String::new(),
            inputs: vec![stats],
        };
        let options = CompileOptions {
            target: Target::parse("cpu").expect("cpu"),
            weight_dtype: DType::F32,
            quant: QuantOptions {
                calibration: Some(CalibrationRef(Arc::new(calibration))),
                ..scheme(QuantScheme::W4A16)
            },
            progress: false,
        };
        let err = compiler::compile(&smollm2_gguf(), &scratch_path("bad-calib.fdp"), &options)
            .expect_err("statistics of another model")
            .to_string();
        assert!(
            err.contains("calibration statistics do not match the model") && err.contains(needle),
            "{err}"
        );
    }
}

#[test]
fn calibrate_then_compile_with_gptq_on_the_tiny_model() {
    // The whole flow on a 3-layer model: statistics for every matmul (3 x (QKV, O, gate/up,
    // down) and the untied lm_head), GPTQ for each, named by `fdc inspect`; smoothing for w8a8.
    let reference = compiled(&golden("tiny/llama"), DType::F32);
    let mut engine = engine(&reference);
    let vocab = engine.vocab_size() as u32;
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7 + 3) % vocab).collect();
    let stats = runtime::calibrate::calibrate(&mut engine, &ids, 64, "ids").expect("calibrate");
    assert_eq!(stats.tokens, 300);
    assert_eq!(stats.inputs.len(), 13, "{stats:?}");
    assert!(stats
        .inputs
        .iter()
        .all(|i| i.rows == 300 || i.weight.starts_with("lm_head")));
    let file = scratch_path("tiny.calib");
    stats.write(&file).expect("write");
    let stats = CalibrationRef(Arc::new(Calibration::read(&file).expect("read")));
    for (scheme_name, group, smoothed) in [
        (QuantScheme::W4A16, 16, false),
        (QuantScheme::W8A8, 32, true),
    ] {
        let out = scratch_path(&format!("tiny-{scheme_name}-gptq.fdp"));
        let options = CompileOptions {
            target: Target::parse("cpu").expect("cpu"),
            weight_dtype: DType::F32,
            quant: QuantOptions {
                group: Some(GroupSize::Elements(group)),
                calibration: Some(stats.clone()),
                ..scheme(scheme_name)
            },
            progress: false,
        };
        compiler::compile(&golden("tiny/llama"), &out, &options).expect("compile");
        let text = compiler::inspect::inspect(&out, &[]).expect("inspect");
        assert!(text.contains("GPTQ-calibrated"), "{text}");
        assert!(text.contains("13 weights quantized by GPTQ"), "{text}");
        assert_eq!(text.contains("smooth_alpha=0.5"), smoothed, "{text}");
        // The plan runs (its accuracy is what the SmolLM2 tests measure).
        let logits = engine_with(&out, Default::default())
            .prefill(&ids[..32], true)
            .expect("quantized");
        assert_eq!(logits.len(), 32 * vocab as usize);
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}
