//! One graph builder per architecture family. Each file opens with what is distinctive about its
//! family; the decoder stack they share is in `decoder.rs`.
//!
//! A builder reads only the config and tensor *metadata*: weights enter the graph as handles
//! (`WeightExpr::Tensor`), and their shapes are checked against the config here, so a checkpoint
//! that does not match its config fails before any data is read.

mod decoder;
pub mod deepseek_v3;
pub mod ernie4_5_moe;
pub mod llama;
pub mod mixtral;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;

use crate::{Architecture, ModelConfig, ModelError, TensorSource};
use ir::Graph;

/// Builds the graph for `config`, checking every tensor it uses against `tensors`.
pub fn build_graph(
    name: &str,
    config: &ModelConfig,
    tensors: &dyn TensorSource,
) -> Result<Graph, ModelError> {
    match config.architecture {
        Architecture::Llama => llama::build(name, config, tensors),
        Architecture::Qwen2 => qwen2::build(name, config, tensors),
        Architecture::Qwen3 => qwen3::build(name, config, tensors),
        Architecture::Qwen3Moe => qwen3_moe::build(name, config, tensors),
        Architecture::Mixtral => mixtral::build(name, config, tensors),
        Architecture::Ernie45Moe => ernie4_5_moe::build(name, config, tensors),
        Architecture::DeepseekV3 => deepseek_v3::build(name, config, tensors),
    }
}
