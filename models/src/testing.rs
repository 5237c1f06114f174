//! Helpers for tests in this crate and downstream ones: where the workspace and its test data
//! are, where the SmolLM2 GGUF is expected, and a self-removing scratch directory. Not used by
//! the readers themselves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF: `$FDC_SMOLLM2_GGUF` when set, else
/// `<workspace>/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
///
/// Panics when the file is missing: this is a test-setup helper, and the message says how to
/// fetch the file.
pub fn smollm2_gguf_path() -> PathBuf {
    let path = match std::env::var_os("FDC_SMOLLM2_GGUF") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if !path.is_file() {
        panic!(
            "SmolLM2 GGUF not found at {}: run scripts/fetch-model.sh first",
            path.display()
        );
    }
    path
}

/// A fresh directory under the system temp dir, removed (best effort) when dropped.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<temp>/fdc-<label>-<pid>-<n>`; panics if it cannot (test setup only).
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fdc-{label}-{}-{n}", std::process::id()));
        // A leftover from a crashed run with the same pid would otherwise leak into this one.
        let _ = std::fs::remove_dir_all(&path);
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("cannot create scratch dir {}: {e}", path.display());
        }
        ScratchDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
