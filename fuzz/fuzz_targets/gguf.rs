//! The GGUF reader on arbitrary files: header, metadata, tensor table (`GgufFile::open`), the
//! model config and tokenizer built from the metadata, and every small tensor dequantized into
//! HF layout. Any input must give a checkpoint or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use models::gguf::{GgufFile, GgufTensors};

fuzz_target!(|data: &[u8]| {
    fdc_fuzz::with_file("gguf", data, |path| {
        let Ok(file) = GgufFile::open(path) else {
            return;
        };
        for tensor in &file.tensors {
            let _ = file.tensor_bytes(tensor);
        }
        let _ = file.tokenizer();
        let Ok(config) = file.model_config() else {
            return;
        };
        let Ok(tensors) = GgufTensors::new(file, &config) else {
            return;
        };
        fdc_fuzz::load_small_tensors(&tensors);
    });
});
