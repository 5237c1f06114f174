//! The HTTP request bodies of every endpoint, without a socket: the same bytes are read as a
//! chat completions body, a completions body, a weight update body and a role switch body, and
//! whatever parses is validated as the handlers do (`spec`, `chat_messages`, `prompts`). Every
//! bad body must give an OpenAI error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::server::disagg::RoleRequest;
use runtime::server::openai::{ChatCompletionRequest, CompletionRequest};
use runtime::weights_update::UpdateWeightsRequest;

/// SmolLM2's vocabulary, which bounds token ids in prompts and `stop_token_ids`.
const VOCAB: usize = 49152;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<ChatCompletionRequest>(data) {
        if let Err(e) = request.spec(VOCAB) {
            let _ = e.body();
        }
        let _ = request.chat_messages();
    }
    if let Ok(request) = serde_json::from_slice::<CompletionRequest>(data) {
        if let Err(e) = request.spec(VOCAB) {
            let _ = e.body();
        }
        let _ = request.prompts();
    }
    let _ = serde_json::from_slice::<UpdateWeightsRequest>(data);
    let _ = serde_json::from_slice::<RoleRequest>(data);
});
