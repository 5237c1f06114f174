//! HF `config.json` parsing (`ModelConfig::from_hf_json`) on arbitrary text: every
//! architecture, both rope styles, MoE fields. Any input must give a config or an error, never
//! a panic; a config that parses also gives its rotary frequencies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use models::config::ModelConfig;
use std::path::Path;

/// Head dimensions beyond this are refused by no reader but would make `inv_freq` slow.
const MAX_HEAD_DIM: usize = 1 << 12;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ModelConfig::from_hf_json(text, Path::new("config.json")) {
        if config.head_dim <= MAX_HEAD_DIM {
            let _ = config.rope.inv_freq(config.head_dim);
        }
    }
});
