//! The safetensors reader on arbitrary files: the length-prefixed JSON header, every tensor's
//! dtype, shape and byte range (`SafetensorsTensors::open_files`), and small tensors converted
//! to f32. Any input must give tensors or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use models::safetensors_dir::SafetensorsTensors;

fuzz_target!(|data: &[u8]| {
    fdc_fuzz::with_file("safetensors", data, |path| {
        let Ok(tensors) = SafetensorsTensors::open_files(&[path.to_path_buf()]) else {
            return;
        };
        fdc_fuzz::load_small_tensors(&tensors);
    });
});
