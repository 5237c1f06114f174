//! The token loop for one sequence: prefill the prompt, then sample one token per step until an
//! end-of-sequence token, a stop, the token limit or the context limit.

use crate::error::RuntimeError;
use crate::sampler::{Sampler, SamplingParams};
use crate::sequence::OneSequence;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the plan's end-of-sequence tokens (and these extra ids).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token was produced (it is included in the output).
    Stop,
    /// `max_new_tokens` or the context was reached.
    Length,
}

impl FinishReason {
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Generates after `prompt`, calling `on_token` with each new token as soon as it is sampled.
/// The engine's sequence is reset first.
pub fn generate(
    engine: &mut dyn OneSequence,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, RuntimeError> {
    options.sampling.validate()?;
    let mut sampler = Sampler::new(options.sampling)?;
    sampler.observe_prompt(prompt);
    let mut stops = options.stop_token_ids.clone();
    if !options.ignore_eos {
        stops.extend(engine.plan().manifest.model.eos_token_ids.iter().copied());
    }
    let capacity = engine.max_context();
    if prompt.len() > capacity {
        return Err(RuntimeError::ContextFull {
            needed: prompt.len(),
            capacity,
            model_max: engine.plan().manifest.model.max_position_embeddings as usize,
        });
    }
    engine.reset();
    let mut logits = engine.append(prompt)?;
    let mut tokens = vec![];
    loop {
        if tokens.len() >= options.max_new_tokens {
            return Ok(Generation {
                tokens,
                finish_reason: FinishReason::Length,
            });
        }
        let next = sampler.sample(&logits);
        tokens.push(next);
        on_token(next);
        if stops.contains(&next) {
            return Ok(Generation {
                tokens,
                finish_reason: FinishReason::Stop,
            });
        }
        if tokens.len() >= options.max_new_tokens || engine.seq_len() + 1 > capacity {
            return Ok(Generation {
                tokens,
                finish_reason: FinishReason::Length,
            });
        }
        logits = engine.append(&[next])?;
    }
}
