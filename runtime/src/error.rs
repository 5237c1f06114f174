//! `RuntimeError`: everything `fdrt` can report about a plan, a request or a run, one line each.

use crate::chat::ChatError;
use crate::code::CodeError;
use crate::sampler::SamplerError;
use crate::tokenizer::TokenizerError;
use artifacts::PlanError;
use kernels::KernelError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    // ---- the plan ----
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("plan is for {plan_target} but this CPU supports only up to cpu-{machine}: recompile with `fdc compile --target cpu` on this machine (or --target cpu-{machine})")]
    UnsupportedTarget {
        plan_target: String,
        machine: String,
    },
    #[error("plan is for {plan_target}: the CPU engine cannot run it, and of fdrt's commands only `generate` and `bench` run CUDA plans so far; for the others compile for a CPU target with `fdc compile --target cpu`")]
    CudaPlan { plan_target: String },
    #[error("plan is for {plan_target} (a Hygon DCU): this fdrt has no DCU engine yet, only the plan's checks; docs/TARGETS.md says what runs where. To serve on this machine compile for a CPU target with `fdc compile --target cpu`")]
    DcuPlan { plan_target: String },
    /// The HIP runtime, device or a DCU plan's code object on it (the `hip` feature).
    #[error("HIP: {0}")]
    Hip(String),
    #[error("plan is for {plan_target} but the GPU is {device}: recompile with `fdc compile --target {device_target}`")]
    WrongGpu {
        plan_target: String,
        device: String,
        device_target: String,
    },
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    #[error("generated code: {0}")]
    Code(#[from] CodeError),

    // ---- weight parts and snapshots ----
    #[error("weight part {part} is missing: expected {expected}")]
    MissingPart { part: String, expected: String },
    #[error("weight part {part}: {source}")]
    PartFile {
        part: String,
        #[source]
        source: PlanError,
    },
    #[error("weight part {part}: {reason}")]
    Part { part: String, reason: String },
    #[error("weight snapshot: {0}")]
    Snapshot(String),

    // ---- a run ----
    #[error("step {step} ({kernel}): {source}")]
    Kernel {
        step: usize,
        kernel: String,
        source: KernelError,
    },
    #[error("the sequence needs {needed} positions but the KV cache holds {capacity}; raise --max-context (the model allows {model_max})")]
    ContextFull {
        needed: usize,
        capacity: usize,
        model_max: usize,
    },
    #[error("KV cache block table: {0}")]
    KvBlocks(String),
    #[error("token id {id} is out of range: the vocabulary has {vocab} tokens")]
    BadTokenId { id: u32, vocab: usize },
    #[error("empty input: at least one token id is needed")]
    EmptyInput,
    #[error("this plan has no multi-token-prediction module: compile a checkpoint with MTP weights (DeepSeek-V3's num_nextn_predict_layers) or use another speculative method")]
    NoMtpModule,
    #[error("{0} is not supported on this engine yet")]
    Unsupported(&'static str),

    // ---- text ----
    #[error("this plan has no tokenizer (compiled from a checkpoint without one): pass token ids instead")]
    NoTokenizer,
    #[error(
        "this plan has no chat template: drop --chat or compile from a checkpoint that has one"
    )]
    NoChatTemplate,
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Sampler(#[from] SamplerError),
}
