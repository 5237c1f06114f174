//! SmolLM2-135M-Instruct from its Q4_1 GGUF against the float64 reference over the same
//! dequantized weights: tokenizer ids, prompt logits and teacher-forced greedy tokens, with f32
//! weights (tolerance 1e-3) and bf16 weights (2e-2, greedy checked where the margin exceeds 0.1).

mod common;

use common::*;
use ir::DType;
use runtime::tokenizer::TextTokenizer;

/// Prompt logits within `tolerance`, and teacher-forced greedy agreement wherever the golden
/// top-1 margin exceeds `min_margin`.
fn check_plan(dtype: DType, tolerance: f32, min_margin: f64) {
    let plan = compiled(&smollm2_gguf(), dtype);
    let mut engine = engine(&plan);
    let vocab = engine.vocab_size();
    check_smollm2(
        &dtype.to_string(),
        vocab,
        tolerance,
        min_margin,
        |sequence| {
            engine.reset();
            engine.prefill(sequence, true).expect("forward")
        },
    );
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
    for case in smollm2_cases() {
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
    let case = smollm2_cases()
        .into_iter()
        .find(|c| c.name == "chat_capital")
        .expect("chat case");
    assert_eq!(text, case.text);
}
