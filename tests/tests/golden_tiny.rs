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
    // The goldens' continuations never end early: HF generated them with EOS suppressed until
    // the last token (`min_new_tokens`), so where HF's top token would have been EOS it took the
    // runner-up. `generate` must agree with them before the first EOS it picks, and greedy with
    // EOS masked must reproduce them entirely.
    let eos = engine.plan().manifest.model.eos_token_ids.clone();
    let want = &greedy[prompt.len()..];
    let until_eos = out
        .tokens
        .iter()
        .position(|t| eos.contains(t))
        .unwrap_or(out.tokens.len());
    assert_eq!(
        out.tokens[..until_eos.min(want.len())],
        want[..until_eos.min(want.len())],
        "{arch}: greedy continuation differs from HF"
    );
    engine.reset();
    let mut tokens = prompt.clone();
    let mut next = engine.prefill(&prompt, false).expect("prefill").to_vec();
    for _ in 0..want.len() {
        for &e in &eos {
            if let Some(l) = next.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let token = argmax(&next);
        tokens.push(token);
        next = engine.forward_last(&[token]).expect("decode").to_vec();
    }
    assert_eq!(
        tokens[prompt.len()..],
        *want,
        "{arch}: greedy continuation with EOS suppressed differs from HF"
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

#[test]
fn qwen3_moe_experts_and_dense_first_layer() {
    check_arch("qwen3_moe");
}

#[test]
fn mixtral_experts_in_every_layer() {
    check_arch("mixtral");
}

#[test]
fn ernie4_5_moe_shared_experts_biased_routing_interleaved_rope() {
    check_arch("ernie4_5_moe");
}

#[test]
fn deepseek_v3_latent_attention_grouped_sigmoid_routing_dense_first_layer() {
    check_arch("deepseek_v3");
}

// YaRN goldens written by `scripts/golden-tiny.py` (transformers 5.23, float64).

#[test]
fn deepseek_v3_yarn_attention_factor_and_mscale_all_dim() {
    check_arch("deepseek_v3_yarn");
}

#[test]
fn qwen2_yarn_default_betas_plain_attention() {
    check_arch("qwen2_yarn");
}

/// A sliding window shorter than the context caps the plan's context at the window: up to it,
/// sliding-window attention is causal attention, so the golden's first `window` rows hold, and a
/// longer sequence is refused rather than computed without the window.
#[test]
fn mixtral_sliding_window_caps_the_context() {
    const WINDOW: usize = 16;
    let golden_dir = golden("tiny/mixtral");
    let dir = scratch_path("mixtral-window");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        golden_dir.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut config = read_json(&golden_dir.join("config.json"));
    config["sliding_window"] = WINDOW.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let plan = compiled(&dir, DType::F32);
    let mut engine = engine(&plan);
    let manifest = &engine.plan().manifest;
    assert_eq!(manifest.model.max_position_embeddings, WINDOW as u64);
    assert_eq!(engine.options().max_context, WINDOW);

    let golden_logits = read_tensor(&golden_dir.join("golden.safetensors"), "logits");
    let vocab = golden_logits.shape[1];
    let input_ids = ids(&read_json(&golden_dir.join("golden.json"))["input_ids"]);
    let logits = engine.prefill(&input_ids[..WINDOW], true).expect("forward");
    check_logits(
        "mixtral, window 16",
        &logits,
        &golden_logits.data[..WINDOW * vocab],
        vocab,
        1e-3,
    );
    engine.reset();
    assert!(matches!(
        engine.prefill(&input_ids[..WINDOW + 1], false),
        Err(runtime::RuntimeError::ContextFull { .. })
    ));
}

/// `fdc inspect` on the mixture-of-experts plans: experts, top-k and routing per sparse layer,
/// shared experts, and the expert bytes in all and per token; nothing of the kind for a dense
/// model.
#[test]
fn inspect_describes_the_experts() {
    let section = |arch: &str| {
        let plan = compiled(&golden(&format!("tiny/{arch}")), DType::F32);
        let text = compiler::inspect::inspect(&plan, &[]).expect("inspect");
        match text.find("\nmixture of experts") {
            Some(start) => {
                let rest = &text[start + 1..];
                rest[..rest.find("\n\n").unwrap_or(rest.len())].to_string()
            }
            None => String::new(),
        }
    };
    assert_eq!(section("llama"), "");
    // DeepSeek-V3: per sparse layer, 8 experts of gate+up [64, 64] and down [64, 32] in f32,
    // 8 x 24576 = 196608 bytes, 2 of them (49152) active; the shared expert's 24576 bytes.
    assert_eq!(
        section("deepseek_v3"),
        "mixture of experts (2 of 3 layers sparse)
  2 layer(s): 8 experts, top-2, sigmoid_grouped routing (best 1 of 2 groups), selection bias, weights renormalized, scaled x2.5
  shared experts: 1 per sparse layer (4 weights, 49152 bytes), run on every token
  routed expert weights: 393216 bytes in all, 98304 bytes active per token
  weights read per token: 575872 of 870784 bytes (66.1%; dense weights counted whole)"
    );
    // Mixtral: 4 experts of gate+up [256, 64] and down [64, 128] in each of 3 layers.
    assert_eq!(
        section("mixtral"),
        "mixture of experts (3 of 3 layers sparse)
  3 layer(s): 4 experts, top-2, softmax routing, weights renormalized
  shared experts: none
  routed expert weights: 1179648 bytes in all, 589824 bytes active per token
  weights read per token: 905984 of 1495808 bytes (60.6%; dense weights counted whole)"
    );
    assert!(
        section("ernie4_5_moe")
            .contains("selection bias, weights renormalized\n  shared experts: 1 per sparse layer"),
        "{}",
        section("ernie4_5_moe")
    );
}
