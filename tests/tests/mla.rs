//! Multi-head latent attention end to end (the tiny DeepSeek-V3): the KV cache holds only the
//! latent and the rope key of each position, `(kv_lora_rank + qk_rope_head_dim) x 4 bytes x
//! layers` per token, in the manifest, in the engine's pool and in `fdc inspect`; and the
//! scheduler's prefix cache serves latent blocks as it serves keys and values. (Its logits
//! against HF are checked in `golden_tiny.rs`, its paging in `paged_kv.rs`.)

mod common;

use common::*;
use ir::DType;
use runtime::sampler::SamplingParams;
use runtime::scheduler::{Event, RequestParams, Scheduler, SchedulerConfig};
use runtime::EngineOptions;

#[test]
fn the_cache_holds_the_latent_only() {
    let dir = golden("tiny/deepseek_v3");
    let config = read_json(&dir.join("config.json"));
    let field = |key: &str| config[key].as_u64().expect("an integer field") as usize;
    let per_token =
        (field("kv_lora_rank") + field("qk_rope_head_dim")) * 4 * field("num_hidden_layers");
    // Keys and values of every head would be 2 x heads x (nope + rope or v) per layer.
    assert_eq!(per_token, (16 + 8) * 4 * 3);

    let plan = compiled(&dir, DType::F32);
    let text = compiler::inspect::inspect(&plan, &[]).expect("inspect");
    assert!(
        text.contains(&format!(
            "kv cache    {per_token} bytes per token (3 layers x latent 24"
        )),
        "{text}"
    );
    let block_size = 16;
    let engine = engine_with(
        &plan,
        EngineOptions {
            max_context: 64,
            block_size,
            kv_blocks: Some(4),
            ..EngineOptions::default()
        },
    );
    assert_eq!(engine.plan().manifest.kv.bytes_per_token, per_token as u64);
    assert_eq!(engine.kv_pool().bytes_per_block(), per_token * block_size);
    assert_eq!(engine.kv_pool().bytes(), 4 * per_token * block_size);
}

/// Greedy tokens of one request.
fn run_request(s: &Scheduler, prompt: &[u32]) -> Vec<u32> {
    let params = RequestParams {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        ignore_eos: true,
        logprobs: None,
        speculative: true,
    };
    let mut stream = s.submit(prompt.to_vec(), params).expect("submit");
    let mut tokens = vec![];
    loop {
        match stream.next_blocking().expect("a stream ends with Done") {
            Event::Token(t) => tokens.push(t.id),
            Event::Done { .. } => return tokens,
            other => panic!("request failed: {other:?}"),
        }
    }
}

#[test]
fn a_cached_latent_prefix_is_reused() {
    let plan = compiled(&golden("tiny/deepseek_v3"), DType::F32);
    let options = EngineOptions {
        max_context: 128,
        max_batch_tokens: 64,
        max_num_seqs: 2,
        block_size: 16,
        kv_blocks: Some(16),
    };
    let s = Scheduler::start(
        Box::new(engine_with(&plan, options)),
        SchedulerConfig {
            max_num_seqs: 2,
            max_waiting: 4,
            prefix_caching: true,
            speculative: None,
        },
    );
    let prompt: Vec<u32> = (0..40u32).map(|i| 3 + (i * 37) % 300).collect();
    let first = run_request(&s, &prompt);
    let second = run_request(&s, &prompt);
    let stats = s.stats();
    // The second request found the prompt's two full blocks in the cache.
    assert_eq!(stats.prefix_cache_hit_tokens, 32, "{stats:?}");
    assert_eq!(first, second);
}
