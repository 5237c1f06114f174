//! What the scheduler steps: an engine that runs one forward pass over a batch of sequences,
//! each through its own KV block table. The CPU [`Engine`] and the GPU
//! [`crate::cuda::GpuEngine`] both are one, so `fdrt serve` runs either plan the same way.

use crate::cuda::ipc::{DeviceLink, DeviceRegion};
use crate::cuda::GpuEngine;
use crate::engine::{Engine, EngineOptions, SeqChunk};
use crate::error::RuntimeError;
use crate::plan::LoadedPlan;
use crate::weights::WeightStore;

/// What a pass gives back.
pub struct PassOutput<'a> {
    /// The logits of the `Last` and `All` chunks, `[R, vocab]`, in chunk order.
    pub logits: &'a [f32],
    /// The tokens picked for the `Logits::Greedy` chunks, in chunk order: the first position
    /// of the largest logit, as `sampler::argmax` picks it.
    pub greedy_ids: &'a [u32],
    /// Every token's final hidden state, `[T, C]` in the pass's token order, when the engine
    /// keeps them ([`BatchEngine::keep_hidden`]); empty otherwise.
    pub hidden: &'a [f32],
}

/// What a pass of the multi-token-prediction module gives back.
pub struct MtpOutput<'a> {
    /// As [`PassOutput::logits`].
    pub logits: &'a [f32],
    /// The module's own final hidden states, `[T, C]` in the pass's token order.
    pub hidden: &'a [f32],
}

pub trait BatchEngine: Send {
    fn plan(&self) -> &LoadedPlan;
    /// The options in force (context, token budget, KV blocks), after the engine's own limits.
    fn options(&self) -> &EngineOptions;
    /// Columns of a logits row.
    fn vocab_size(&self) -> usize;
    /// Blocks in the KV pool.
    fn kv_blocks(&self) -> usize;
    /// One forward pass over `chunks` (see [`Engine::forward_batch`]).
    fn pass(&mut self, chunks: &[SeqChunk]) -> Result<PassOutput<'_>, RuntimeError>;
    /// Serves the next pass from `weights` (same structure, checked by the caller) and returns
    /// the previous ones. On an error the previous weights stay in service.
    fn replace_weights(&mut self, weights: WeightStore) -> Result<WeightStore, RuntimeError>;
    /// Whether this engine runs the plan's multi-token-prediction module ([`BatchEngine::mtp_pass`]).
    fn runs_mtp(&self) -> bool {
        false
    }
    /// Makes passes return every token's final hidden state ([`PassOutput::hidden`]).
    fn keep_hidden(&mut self, _on: bool) {}
    /// Writes KV block `block`'s bytes, every layer ([`crate::kv_cache::KvPool::read_block`]'s
    /// form), into `out` (exactly a block long): what a prefill instance sends a decode instance.
    fn read_kv_block(&self, _block: u32, _out: &mut [u8]) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(
            "moving KV blocks between instances",
        ))
    }
    /// Writes KV block `block` from bytes in [`BatchEngine::read_kv_block`]'s form.
    fn write_kv_block(&mut self, _block: u32, _bytes: &[u8]) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(
            "moving KV blocks between instances",
        ))
    }
    /// The device of a GPU engine, for KV transfers through device memory.
    fn device_link(&self) -> Option<DeviceLink> {
        None
    }
    /// Copies KV block `block` into block `i` of a device region, in
    /// [`BatchEngine::read_kv_block`]'s form.
    fn read_kv_block_to_device(
        &self,
        _block: u32,
        _region: &DeviceRegion,
        _i: usize,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(
            "moving KV blocks through device memory",
        ))
    }
    /// Writes KV block `block` from block `i` of a device region.
    fn write_kv_block_from_device(
        &mut self,
        _block: u32,
        _region: &DeviceRegion,
        _i: usize,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(
            "moving KV blocks through device memory",
        ))
    }
    /// One pass of the multi-token-prediction module (see [`Engine::forward_mtp`]).
    fn mtp_pass(
        &mut self,
        _chunks: &[SeqChunk],
        _hidden: &[f32],
    ) -> Result<MtpOutput<'_>, RuntimeError> {
        Err(RuntimeError::Unsupported(
            "the multi-token-prediction module",
        ))
    }
}

impl BatchEngine for Engine {
    fn plan(&self) -> &LoadedPlan {
        Engine::plan(self)
    }
    fn options(&self) -> &EngineOptions {
        Engine::options(self)
    }
    fn vocab_size(&self) -> usize {
        Engine::vocab_size(self)
    }
    fn kv_blocks(&self) -> usize {
        self.kv_pool().num_blocks()
    }
    fn pass(&mut self, chunks: &[SeqChunk]) -> Result<PassOutput<'_>, RuntimeError> {
        let len = Engine::forward_batch(self, chunks)?.len();
        Ok(PassOutput {
            logits: &self.last_logits()[..len],
            greedy_ids: self.greedy_ids(),
            hidden: self.hidden_rows(),
        })
    }
    fn replace_weights(&mut self, weights: WeightStore) -> Result<WeightStore, RuntimeError> {
        Ok(Engine::replace_weights(self, weights))
    }
    fn runs_mtp(&self) -> bool {
        self.plan().mtp.is_some()
    }
    fn keep_hidden(&mut self, on: bool) {
        Engine::keep_hidden(self, on)
    }
    fn read_kv_block(&self, block: u32, out: &mut [u8]) -> Result<(), RuntimeError> {
        self.kv_pool()
            .read_block(block, out)
            .map_err(|e| RuntimeError::KvBlocks(e.to_string()))
    }
    fn write_kv_block(&mut self, block: u32, bytes: &[u8]) -> Result<(), RuntimeError> {
        self.kv_pool_mut()
            .write_block(block, bytes)
            .map_err(|e| RuntimeError::KvBlocks(e.to_string()))
    }
    fn mtp_pass(
        &mut self,
        chunks: &[SeqChunk],
        hidden: &[f32],
    ) -> Result<MtpOutput<'_>, RuntimeError> {
        let len = Engine::forward_mtp(self, chunks, hidden)?.len();
        Ok(MtpOutput {
            logits: &self.last_logits()[..len],
            hidden: self.mtp_hidden_rows(),
        })
    }
}

impl BatchEngine for GpuEngine {
    fn plan(&self) -> &LoadedPlan {
        GpuEngine::plan(self)
    }
    fn options(&self) -> &EngineOptions {
        GpuEngine::options(self)
    }
    fn vocab_size(&self) -> usize {
        self.plan().program.logits_cols as usize
    }
    fn kv_blocks(&self) -> usize {
        GpuEngine::kv_blocks(self)
    }
    fn pass(&mut self, chunks: &[SeqChunk]) -> Result<PassOutput<'_>, RuntimeError> {
        GpuEngine::pass(self, chunks)
    }
    fn replace_weights(&mut self, weights: WeightStore) -> Result<WeightStore, RuntimeError> {
        GpuEngine::replace_weights(self, weights)
    }
    fn read_kv_block(&self, block: u32, out: &mut [u8]) -> Result<(), RuntimeError> {
        GpuEngine::read_kv_block(self, block, out)
    }
    fn write_kv_block(&mut self, block: u32, bytes: &[u8]) -> Result<(), RuntimeError> {
        GpuEngine::write_kv_block(self, block, bytes)
    }
    fn device_link(&self) -> Option<DeviceLink> {
        Some(GpuEngine::device_link(self))
    }
    fn read_kv_block_to_device(
        &self,
        block: u32,
        region: &DeviceRegion,
        i: usize,
    ) -> Result<(), RuntimeError> {
        GpuEngine::read_kv_block_to_device(self, block, region, i)
    }
    fn write_kv_block_from_device(
        &mut self,
        block: u32,
        region: &DeviceRegion,
        i: usize,
    ) -> Result<(), RuntimeError> {
        GpuEngine::write_kv_block_from_device(self, block, region, i)
    }
}
