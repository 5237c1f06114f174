//! SmolLM2-135M-Instruct from its Q4_1 GGUF against the float64 reference over the same
//! dequantized weights: tokenizer ids, prompt logits and teacher-forced greedy tokens, with f32
//! weights (tolerance 1e-3) and bf16 weights (2e-2, greedy checked where the margin exceeds 0.1).

mod common;

use common::*;
use ir::DType;
use runtime::tokenizer::TextTokenizer;

struct Case {
    name: String,
    text: String,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    margins: Vec<f64>,
}

fn cases() -> Vec<Case> {
    let json = read_json(&golden("smollm2/golden.json"));
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            text: c["text"].as_str().expect("text").to_string(),
            prompt: ids(&c["prompt_ids"]),
            greedy: ids(&c["greedy_ids"]),
            margins: c["top1_margin"]
                .as_array()
                .expect("margins")
                .iter()
                .map(|m| m.as_f64().unwrap_or(0.0))
                .collect(),
        })
        .collect()
}

/// Prompt logits within `tolerance`, and teacher-forced greedy agreement wherever the golden
/// top-1 margin exceeds `min_margin`.
fn check_plan(dtype: DType, tolerance: f32, min_margin: f64) {
    let plan = compiled(&smollm2_gguf(), dtype);
    let mut engine = engine(&plan);
    let vocab = engine.vocab_size();
    let golden_file = golden("smollm2/logits.safetensors");
    for case in cases() {
        let label = format!("{} {dtype}", case.name);
        let mut sequence = case.prompt.clone();
        sequence.extend(&case.greedy);
        engine.reset();
        let logits = engine.prefill(&sequence, true).expect("forward");
        let want = read_tensor(&golden_file, &format!("{}.prompt_logits", case.name));
        check_logits(
            &label,
            &logits[..case.prompt.len() * vocab],
            &want.data,
            vocab,
            tolerance,
        );
        let mut checked = 0;
        for (i, &next) in case.greedy.iter().enumerate() {
            if case.margins[i] <= min_margin {
                continue;
            }
            let row = case.prompt.len() - 1 + i;
            let got = argmax(&logits[row * vocab..][..vocab]);
            assert_eq!(
                got, next,
                "{label}: greedy token {i} (margin {:.3})",
                case.margins[i]
            );
            checked += 1;
        }
        println!(
            "{label}: {checked} of {} greedy tokens checked, all equal",
            case.greedy.len()
        );
    }
}

#[test]
fn f32_weights_match_the_reference() {
    check_plan(DType::F32, 1e-3, 1e-3);
}

#[test]
fn bf16_weights_match_within_bf16_noise() {
    check_plan(DType::BF16, 2e-2, 0.1);
}

#[test]
fn tokenizer_from_the_plan_matches_the_reference_ids() {
    let plan = runtime::LoadedPlan::load(&compiled(&smollm2_gguf(), DType::F32)).expect("plan");
    let tokenizer =
        TextTokenizer::from_json(plan.tokenizer_json().expect("a tokenizer")).expect("tokenizer");
    for case in cases() {
        assert_eq!(
            tokenizer.encode(&case.text).expect("encode"),
            case.prompt,
            "{}",
            case.name
        );
    }
}

#[test]
fn chat_template_from_the_plan_renders_the_reference_prompt() {
    let plan = runtime::LoadedPlan::load(&compiled(&smollm2_gguf(), DType::F32)).expect("plan");
    let info = plan.manifest.tokenizer.clone().expect("tokenizer info");
    let template = runtime::chat::ChatTemplate::new(
        info.chat_template.as_deref().expect("a chat template"),
        info.bos_token,
        info.eos_token,
    )
    .expect("template");
    let text = template
        .render(
            &[runtime::chat::ChatMessage::new(
                "user",
                "What is the capital of France?",
            )],
            true,
        )
        .expect("render");
    let case = cases()
        .into_iter()
        .find(|c| c.name == "chat_capital")
        .expect("chat case");
    assert_eq!(text, case.text);
}
