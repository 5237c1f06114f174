//! The tiny random-weight checkpoints of each supported architecture, compiled with f32 weights,
//! against HF transformers' float64 outputs: logits at every position within 1e-3 of the
//! largest golden logit, and the 20-token greedy continuation identical.

mod common;

use common::*;
use ir::DType;
use runtime::generate::{generate, GenerateOptions};
use runtime::sampler::SamplingParams;

fn check_arch(arch: &str) {
    let dir = golden(&format!("tiny/{arch}"));
    let plan = compiled(&dir, DType::F32);
    let mut engine = engine(&plan);
    let golden_logits = read_tensor(&dir.join("golden.safetensors"), "logits");
    let json = read_json(&dir.join("golden.json"));
    let input_ids = ids(&json["input_ids"]);
    let vocab = golden_logits.shape[1];
    let logits = engine.prefill(&input_ids, true).expect("forward");
    check_logits(arch, &logits, &golden_logits.data, vocab, 1e-3);

    let prompt = ids(&json["prompt_ids"]);
    let greedy = ids(&json["greedy_ids"]);
    let options = GenerateOptions {
        max_new_tokens: greedy.len() - prompt.len(),
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        ignore_eos: true,
    };
    let out = generate(&mut engine, &prompt, &options, |_| {}).expect("generate");
    assert_eq!(
        out.tokens,
        greedy[prompt.len()..],
        "{arch}: greedy continuation differs from HF"
    );
}

#[test]
fn llama() {
    check_arch("llama");
}

#[test]
fn llama3_rope_scaling() {
    check_arch("llama3_rope");
}

#[test]
fn qwen2_biases_and_tied_embeddings() {
    check_arch("qwen2");
}

#[test]
fn qwen3_qk_norm_and_head_dim() {
    check_arch("qwen3");
}
