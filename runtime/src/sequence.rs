//! One sequence's forward passes, whatever runs them: the CPU [`Engine`] or the GPU
//! [`crate::cuda::GpuEngine`]. `fdrt generate` and `fdrt bench` drive either through this.

use crate::cuda::GpuEngine;
use crate::engine::{Engine, Logits};
use crate::error::RuntimeError;
use crate::plan::LoadedPlan;
use crate::sampler::argmax;

pub trait OneSequence {
    fn plan(&self) -> &LoadedPlan;
    /// Forgets the sequence.
    fn reset(&mut self);
    /// Positions the sequence holds.
    fn seq_len(&self) -> usize;
    /// Positions the sequence may hold.
    fn max_context(&self) -> usize;
    /// Appends `tokens` (in passes of the engine's token budget) and returns the logits of the
    /// last one.
    fn append(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError>;
    /// Appends `tokens` like [`OneSequence::append`] and returns only the most likely next
    /// token (greedy decoding), which an engine may pick without bringing the logits back.
    fn append_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        Ok(argmax(&self.append(tokens)?))
    }
}

impl OneSequence for Engine {
    fn plan(&self) -> &LoadedPlan {
        Engine::plan(self)
    }
    fn reset(&mut self) {
        Engine::reset(self)
    }
    fn seq_len(&self) -> usize {
        Engine::seq_len(self)
    }
    fn max_context(&self) -> usize {
        self.options().max_context
    }
    fn append(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        self.prefill(tokens, false)
    }
}

impl OneSequence for GpuEngine {
    fn plan(&self) -> &LoadedPlan {
        GpuEngine::plan(self)
    }
    fn reset(&mut self) {
        GpuEngine::reset(self)
    }
    fn seq_len(&self) -> usize {
        GpuEngine::seq_len(self)
    }
    fn max_context(&self) -> usize {
        GpuEngine::max_context(self)
    }
    fn append(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        let mut logits = vec![];
        for part in tokens.chunks(self.max_batch_tokens()) {
            logits = self.forward(part, false)?;
        }
        Ok(logits)
    }
    /// The pick is made on the device and only its id is copied back (the path of a greedy
    /// request in `fdrt serve`), not the vocabulary's row of logits.
    fn append_greedy(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        let parts: Vec<&[u32]> = tokens.chunks(self.max_batch_tokens()).collect();
        let (last, before) = parts.split_last().ok_or(RuntimeError::EmptyInput)?;
        // The parts before the last only fill the cache: no logits come back for them.
        for part in before {
            self.solo_pass(part, Logits::None)?;
        }
        self.forward_greedy(last)
    }
}
