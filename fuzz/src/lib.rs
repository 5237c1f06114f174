//! Helpers shared by the fuzz targets in `fuzz_targets/`: the readers under test that take a
//! path get the fuzzer's bytes through a scratch file, and the chat target decodes its input
//! into messages. Nothing here is used outside fuzzing; seeds are written by `make_seeds`.

use models::checkpoint::TensorSource;
use std::path::{Path, PathBuf};

/// Larger tensors are checked for bounds when opened but not converted, to keep executions fast.
const MAX_LOADED_ELEMENTS: usize = 1 << 16;

/// Converts every small tensor of `tensors` to f32 (and reads its blocks as stored), as the
/// compiler would: conversion must give values or an error, whatever the file claimed.
pub fn load_small_tensors(tensors: &dyn TensorSource) {
    for name in tensors.names() {
        let small = tensors
            .info(&name)
            .is_some_and(|info| info.num_elements() <= MAX_LOADED_ELEMENTS);
        if small {
            let _ = tensors.load_f32(&name);
            let _ = tensors.load_blocks(&name);
        }
    }
}

/// A file under the temporary directory, private to this process (libFuzzer's `-fork` and
/// `-jobs` run several), rewritten for each input.
pub fn scratch_path(label: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fdc-fuzz-{label}-{}", std::process::id()))
}

/// Writes `data` to the scratch file `label` and calls `read` with its path. Readers that map
/// files are given a real file, as they will be in use.
pub fn with_file<T>(label: &str, data: &[u8], read: impl FnOnce(&Path) -> T) -> T {
    let path = scratch_path(label);
    // A failed write is the machine's fault, not the reader's: stop loudly rather than fuzz
    // a stale file.
    if let Err(e) = std::fs::write(&path, data) {
        panic!("cannot write the scratch file {}: {e}", path.display());
    }
    read(&path)
}

/// Roles a fuzzed message may take: those templates know, and ones they must refuse or pass.
const ROLES: &[&str] = &["system", "user", "assistant", "tool", "", "{{ 7*7 }}"];

/// Messages from fuzzer bytes: `\0` separates messages, the first byte of each picks its role,
/// the rest (lossy UTF-8) is its content.
pub fn chat_messages(data: &[u8]) -> Vec<runtime::chat::ChatMessage> {
    data.split(|&b| b == 0)
        .map(|part| {
            let (role, content) = match part.split_first() {
                Some((&r, rest)) => (ROLES[r as usize % ROLES.len()], rest),
                None => ("user", part),
            };
            runtime::chat::ChatMessage::new(role, String::from_utf8_lossy(content))
        })
        .collect()
}
