//! `runtime` is `fdrt`: it loads a `.fdp` plan, maps its code and weights, and runs its program on
//! the CPU: `plan` (load and check), `weights` (where the weights live: the plan, its part files
//! or a snapshot), `weights_update` (live weight updates), `engine` (the executor), `kv_cache`
//! (the paged KV memory) and `block_manager` (who holds which block, prefix caching), `generate`
//! (the token loop), `eval` and `calibrate` (perplexity, and the statistics GPTQ needs), plus text in and out (`tokenizer`, `chat`), `sampler`, the continuous-batching `scheduler`
//! and `server` (`fdrt serve`, an OpenAI-compatible HTTP front end to the scheduler).
//! `cuda` opens a CUDA device for a CUDA plan, refuses a plan built for another GPU, loads the
//! plan's module and runs its program (`GpuEngine`); `batch_engine` is what the scheduler steps,
//! either engine.
//!
//! It never depends on `compiler`, `models`, a code generator or `ir`'s graph: if it needed a graph,
//! the compiler would not have finished its job. Tests sit beside the code; end-to-end tests that
//! compile real models are in `tests/`.

pub mod batch_engine;
pub mod bench;
pub mod block_manager;
pub mod calibrate;
pub mod chat;
pub mod code;
pub mod cuda;
pub mod disagg;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
#[cfg(feature = "hip")]
pub mod hip;
pub mod kv_cache;
pub mod plan;
pub mod router;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod server;
pub mod speculative;
pub mod tokenizer;
pub mod weights;
pub mod weights_update;

pub use batch_engine::BatchEngine;
pub use engine::{Engine, EngineOptions, Logits, SeqChunk};
pub use error::RuntimeError;
pub use plan::LoadedPlan;
