//! `fdrt bench`: batch-1 prefill and decode throughput of a plan, measured the way the
//! llama.cpp comparison script measures it (best of several runs, warm, fixed token counts).

use crate::error::RuntimeError;
use crate::sampler::argmax;
use crate::sequence::OneSequence;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchResult {
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tokens: usize,
    pub decode_tok_s: f64,
}

/// Prefill of `prefill_tokens` tokens and `decode_tokens` greedy single-token steps after a
/// short prompt, each the best of `repeats` runs. Token ids are a fixed pseudo-random sequence.
pub fn run(
    engine: &mut dyn OneSequence,
    prefill_tokens: usize,
    decode_tokens: usize,
    repeats: usize,
) -> Result<BenchResult, RuntimeError> {
    let vocab = engine.plan().manifest.model.vocab_size as u32;
    let prompt: Vec<u32> = (0..prefill_tokens as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab)
        .collect();
    let mut best_prefill = f64::MAX;
    for _ in 0..repeats.max(1) {
        engine.reset();
        let start = Instant::now();
        engine.append(&prompt)?;
        best_prefill = best_prefill.min(start.elapsed().as_secs_f64());
    }
    let mut best_decode = f64::MAX;
    for _ in 0..repeats.max(1) {
        engine.reset();
        let mut logits = engine.append(&prompt[..prompt.len().min(8)])?;
        let start = Instant::now();
        for _ in 0..decode_tokens {
            let next = argmax(&logits);
            logits = engine.append(&[next])?;
        }
        best_decode = best_decode.min(start.elapsed().as_secs_f64());
    }
    Ok(BenchResult {
        prefill_tokens,
        prefill_tok_s: prefill_tokens as f64 / best_prefill,
        decode_tokens,
        decode_tok_s: decode_tokens as f64 / best_decode,
    })
}
