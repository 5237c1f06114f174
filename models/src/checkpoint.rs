//! The reader-neutral view of a checkpoint: `Checkpoint` (config, lazily read tensors, tokenizer,
//! provenance), the `TensorSource` trait both readers implement, and `open`, which picks the
//! reader from the path (a directory is an HF checkpoint, a `.gguf` file is GGUF).

use std::fmt;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::tokenizer::TokenizerSpec;

/// Opens a checkpoint: a directory is read as an HF checkpoint (config.json + safetensors), a
/// file whose name ends in `.gguf` as GGUF. Tensors are not read until asked for.
pub fn open(path: &Path) -> Result<Checkpoint, ModelError> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        return crate::safetensors_dir::open_dir(path);
    }
    let is_gguf = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        return crate::gguf::open_gguf(path);
    }
    Err(ModelError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

pub struct Checkpoint {
    pub config: ModelConfig,
    pub tensors: Box<dyn TensorSource>,
    /// None when the checkpoint ships no tokenizer or one this crate cannot build yet
    /// (`tokenizer_note` then says why).
    pub tokenizer: Option<TokenizerSpec>,
    /// Why `tokenizer` is None, when there is something to say (e.g. an unsupported GGUF
    /// tokenizer model); None when a tokenizer was found.
    pub tokenizer_note: Option<String>,
    /// Every file read, for provenance.
    pub sources: Vec<SourceFile>,
}

impl Checkpoint {
    /// The tokenizer, or an error saying why there is none: for callers that cannot go on
    /// without one, while `open` itself succeeds for weight-only uses.
    pub fn require_tokenizer(&self) -> Result<&TokenizerSpec, ModelError> {
        // A GGUF checkpoint is its one file; an HF one is best named by its class.
        let checkpoint = match self.sources.first() {
            Some(s) if s.name.to_ascii_lowercase().ends_with(".gguf") => s.name.clone(),
            _ => format!("the {} checkpoint", self.config.source_architecture),
        };
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::TokenizerUnavailable {
                checkpoint,
                reason: self
                    .tokenizer_note
                    .clone()
                    .unwrap_or_else(|| "it ships no tokenizer".to_string()),
            })
    }
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("config", &self.config)
            .field(
                "tensors",
                &format_args!("{} tensors", self.tensors.names().len()),
            )
            .field(
                "tokenizer",
                &self.tokenizer.as_ref().map(|_| "TokenizerSpec"),
            )
            .field("tokenizer_note", &self.tokenizer_note)
            .field("sources", &self.sources)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// File name only, no directories.
    pub name: String,
    pub bytes: u64,
    /// BLAKE3 of the whole file, lowercase hex.
    pub blake3: String,
}

impl SourceFile {
    /// Describes a file already in memory (read or mapped); `path` supplies the name.
    pub fn of_bytes(path: &Path, data: &[u8]) -> Self {
        SourceFile {
            name: path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            bytes: data.len() as u64,
            blake3: blake3::hash(data).to_hex().to_string(),
        }
    }
}

/// Lazy access to a checkpoint's tensors in HF naming and layout.
pub trait TensorSource: Send + Sync {
    /// Tensor names in HF naming (model.layers.0.self_attn.q_proj.weight ...), sorted.
    fn names(&self) -> Vec<String>;
    /// Shape in HF order (a Linear weight is [out_features, in_features]) and the stored type.
    fn info(&self, name: &str) -> Option<TensorInfo>;
    /// What a graph builder that expects `name` to be of `shape` is told: by default the
    /// tensor's real info (which the builder then checks); a source that makes tensors up to
    /// order (`synth`) answers with the expected shape.
    fn info_expecting(&self, name: &str, shape: &[usize]) -> Option<TensorInfo> {
        let _ = shape;
        self.info(name)
    }
    /// The tensor as f32, dequantized exactly, in HF layout (for GGUF llama-family Q and K weights
    /// the llama.cpp row permutation is undone). Reads lazily from the mmap; never loads the whole file.
    fn load_f32(&self, name: &str) -> Result<Vec<f32>, ModelError>;
    /// The tensor's own quantized blocks, for sources that store them (GGUF Q8_0, Q4_0, Q4_1),
    /// rows in HF order like [`TensorSource::load_f32`]; None for any other storage.
    fn load_blocks(&self, name: &str) -> Result<Option<QuantBlocks>, ModelError> {
        let _ = name;
        Ok(None)
    }
}

/// A matrix `[rows, cols]` as a checkpoint's quantized blocks of 32 along a row, unpacked to one
/// code per element but otherwise untouched. With `d` and `m` the block's scale and minimum:
/// Q8_0 is `w = (code - 128) * d`, Q4_0 `w = (code - 8) * d`, Q4_1 `w = code * d + m`; these are
/// exactly the values [`TensorSource::load_f32`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantBlocks {
    pub stored: StoredType,
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]`.
    pub codes: Vec<u8>,
    /// `[rows, cols / 32]`.
    pub scales: Vec<half::f16>,
    /// `[rows, cols / 32]` for Q4_1, else empty.
    pub mins: Vec<half::f16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub stored: StoredType,
}

impl TensorInfo {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How a tensor's elements are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // ggml's names: Q4_K is not "Q4K"
pub enum StoredType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
}

impl StoredType {
    /// Elements per block along the innermost dimension (1 for plain floats).
    pub fn block_elements(self) -> usize {
        match self {
            StoredType::F32 | StoredType::F16 | StoredType::BF16 => 1,
            StoredType::Q8_0 | StoredType::Q4_0 | StoredType::Q4_1 => 32,
            StoredType::Q4_K | StoredType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            StoredType::F32 => 4,
            StoredType::F16 | StoredType::BF16 => 2,
            // f16 scale + 32 int8
            StoredType::Q8_0 => 34,
            // f16 scale + 32 nibbles
            StoredType::Q4_0 => 18,
            // f16 scale + f16 min + 32 nibbles
            StoredType::Q4_1 => 20,
            // f16 d + f16 dmin + 12 bytes of 6-bit scales/mins + 256 nibbles
            StoredType::Q4_K => 144,
            // 128 low nibbles + 64 bytes of high 2-bit pairs + 16 int8 scales + f16 d
            StoredType::Q6_K => 210,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_elements() > 1
    }
}

impl fmt::Display for StoredType {
    /// ggml's spelling: "f32", "bf16", "q4_1", "q4_K".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoredType::F32 => "f32",
            StoredType::F16 => "f16",
            StoredType::BF16 => "bf16",
            StoredType::Q8_0 => "q8_0",
            StoredType::Q4_0 => "q4_0",
            StoredType::Q4_1 => "q4_1",
            StoredType::Q4_K => "q4_K",
            StoredType::Q6_K => "q6_K",
        })
    }
}

/// Maps a whole file read-only.
pub(crate) fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only and private to this process. Checkpoints are not expected to be
    // rewritten while a compile reads them; if one is, reads see changed bytes (every offset is
    // still bounds-checked against the map's length, fixed at map time), not undefined layout.
    unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_type_names_and_block_sizes() {
        let cases = [
            (StoredType::F32, "f32", 1, 4),
            (StoredType::F16, "f16", 1, 2),
            (StoredType::BF16, "bf16", 1, 2),
            (StoredType::Q8_0, "q8_0", 32, 34),
            (StoredType::Q4_0, "q4_0", 32, 18),
            (StoredType::Q4_1, "q4_1", 32, 20),
            (StoredType::Q4_K, "q4_K", 256, 144),
            (StoredType::Q6_K, "q6_K", 256, 210),
        ];
        for (ty, name, elements, bytes) in cases {
            assert_eq!(ty.to_string(), name);
            assert_eq!(ty.block_elements(), elements, "{name}");
            assert_eq!(ty.block_bytes(), bytes, "{name}");
            assert_eq!(ty.is_quantized(), elements > 1, "{name}");
        }
    }

    #[test]
    fn open_rejects_missing_paths_and_unknown_files() {
        let scratch = crate::testing::ScratchDir::new("open-dispatch");
        let missing = scratch.path().join("nothing-here");
        assert!(matches!(open(&missing), Err(ModelError::NotFound { path }) if path == missing));

        let text = scratch.path().join("weights.bin");
        std::fs::write(&text, b"not a checkpoint").unwrap();
        let err = open(&text).unwrap_err();
        assert!(
            matches!(&err, ModelError::UnknownFormat { path } if path == &text),
            "{err}"
        );
        assert!(err.to_string().contains("weights.bin"), "{err}");
    }

    #[test]
    fn source_file_hashes_and_names() {
        let s = SourceFile::of_bytes(Path::new("some/dir/config.json"), b"abc");
        assert_eq!(s.name, "config.json");
        assert_eq!(s.bytes, 3);
        // BLAKE3("abc") from the BLAKE3 specification's test vectors.
        assert_eq!(
            s.blake3,
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
