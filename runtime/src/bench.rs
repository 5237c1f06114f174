//! `fdrt bench`: batch-1 prefill and decode throughput of a plan, measured the way the
//! llama.cpp comparison script measures it (best of several runs, warm, fixed token counts), and
//! with `--batch` the decode throughput of many sequences stepping together.

use crate::batch_engine::BatchEngine;
use crate::engine::{Logits, SeqChunk};
use crate::error::RuntimeError;
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
        // Greedy picks as `fdrt serve` makes them for a greedy request: on a GPU the logits
        // stay on the device and only the picked id comes back.
        let mut next = engine.append_greedy(&prompt[..prompt.len().min(8)])?;
        let start = Instant::now();
        for _ in 0..decode_tokens {
            next = engine.append_greedy(&[next])?;
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

#[derive(Clone, Debug)]
pub struct BatchBenchResult {
    pub batch: usize,
    pub decode_tokens: usize,
    /// Tokens of all the sequences per second.
    pub decode_tok_s: f64,
    pub step_ms: f64,
}

/// `batch` sequences decoding together: an 8-token prompt each (one pass for all), then
/// `decode_tokens` passes of one token per sequence, each sequence's next token picked greedily
/// by the engine (`Logits::Greedy`, as the scheduler asks for greedy requests: on a GPU the
/// logits stay on the device). Best of `repeats` runs.
pub fn run_batch(
    engine: &mut dyn BatchEngine,
    batch: usize,
    decode_tokens: usize,
    repeats: usize,
) -> Result<BatchBenchResult, RuntimeError> {
    let batch = batch.max(1);
    let prompt_len = 8;
    let block_size = engine.options().block_size;
    let per_seq = (prompt_len + decode_tokens).div_ceil(block_size);
    if batch * per_seq > engine.kv_blocks() {
        return Err(RuntimeError::KvBlocks(format!(
            "{batch} sequences of {} positions need {} blocks of {block_size}, the pool has {}",
            prompt_len + decode_tokens,
            batch * per_seq,
            engine.kv_blocks()
        )));
    }
    let vocab = engine.plan().manifest.model.vocab_size as u32;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch as u32)
        .map(|s| {
            (0..prompt_len as u32)
                .map(|i| ((s * 131 + i).wrapping_mul(2654435761) >> 7) % vocab)
                .collect()
        })
        .collect();
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        // The prompts in as few passes as the token budget allows.
        let per_pass = (engine.options().max_batch_tokens / prompt_len).max(1);
        let mut next: Vec<u32> = Vec::with_capacity(batch);
        for first in (0..batch).step_by(per_pass) {
            let chunks: Vec<SeqChunk> = (first..(first + per_pass).min(batch))
                .map(|s| SeqChunk {
                    blocks: &tables[s],
                    start: 0,
                    tokens: &prompts[s],
                    logits: Logits::Greedy,
                })
                .collect();
            next.extend_from_slice(engine.pass(&chunks)?.greedy_ids);
        }
        let start = Instant::now();
        for step in 0..decode_tokens {
            let ids = next.clone();
            let chunks: Vec<SeqChunk> = (0..batch)
                .map(|s| SeqChunk {
                    blocks: &tables[s],
                    start: prompt_len + step,
                    tokens: std::slice::from_ref(&ids[s]),
                    logits: Logits::Greedy,
                })
                .collect();
            next = engine.pass(&chunks)?.greedy_ids.to_vec();
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(BatchBenchResult {
        batch,
        decode_tokens,
        decode_tok_s: (batch * decode_tokens) as f64 / best,
        step_ms: best * 1e3 / decode_tokens.max(1) as f64,
    })
}
