//! `fdrt bench`: batch-1 prefill and decode throughput of a plan, measured the way the
//! llama.cpp comparison script measures it (best of several runs, warm, fixed token counts).

use crate::engine::Engine;
use crate::error::RuntimeError;
use crate::plan::LoadedPlan;
use crate::sampler::argmax;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchResult {
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tokens: usize,
    pub decode_tok_s: f64,
}

/// One sequence's forward passes, whatever runs them (the CPU engine or the GPU one).
pub trait OneSequence {
    fn plan(&self) -> &LoadedPlan;
    /// Forgets the sequence.
    fn reset(&mut self);
    /// Appends `tokens` to the sequence and returns the logits of the last one.
    fn last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError>;
}

impl OneSequence for Engine {
    fn plan(&self) -> &LoadedPlan {
        Engine::plan(self)
    }
    fn reset(&mut self) {
        Engine::reset(self)
    }
    fn last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        self.forward_last(tokens).map(|l| l.to_vec())
    }
}

impl OneSequence for crate::cuda::GpuEngine {
    fn plan(&self) -> &LoadedPlan {
        crate::cuda::GpuEngine::plan(self)
    }
    fn reset(&mut self) {
        crate::cuda::GpuEngine::reset(self)
    }
    fn last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        self.forward(tokens, false)
    }
}

/// Prefill of `prefill_tokens` tokens and `decode_tokens` greedy single-token steps after a
/// short prompt, each the best of `repeats` runs. Token ids are a fixed pseudo-random sequence.
/// A prefill longer than the engine's pass budget runs in chunks of `chunk` tokens.
pub fn run(
    engine: &mut dyn OneSequence,
    chunk: usize,
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
        for part in prompt.chunks(chunk.max(1)) {
            engine.last_logits(part)?;
        }
        best_prefill = best_prefill.min(start.elapsed().as_secs_f64());
    }
    let mut best_decode = f64::MAX;
    for _ in 0..repeats.max(1) {
        engine.reset();
        let mut logits = engine.last_logits(&prompt[..prompt.len().min(8)])?;
        let start = Instant::now();
        for _ in 0..decode_tokens {
            let next = argmax(&logits);
            logits = engine.last_logits(&[next])?;
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
