//! GGUF files (versions 2 and 3): the header, metadata, tensor table and data section, read
//! from a memory map; exact dequantization of the block formats this crate supports; GGUF to
//! HF tensor naming and layout (including undoing llama.cpp's Q/K row permutation for `llama`);
//! and the model config and tokenizer built from the metadata.
//!
//! Hand-written rather than taken from a crate: the format is small and stable, and what is
//! needed here (lazy per-tensor dequantization into HF layout) is a few hundred lines, where a
//! GGUF crate would bring a large dependency for little.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::checkpoint::{
    map_file, Checkpoint, QuantBlocks, SourceFile, StoredType, TensorInfo, TensorSource,
};
use crate::config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
use crate::error::ModelError;
use crate::tokenizer::{byte_level_bpe_json, GgufBpeVocab, TokenizerSpec};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; nothing real nests deeper than this.
const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an integer, whatever its integer width.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as f64. An f32 is widened through its shortest decimal form, so an epsilon
    /// written as 1e-5 comes back as 1e-5 rather than 9.99999974e-6.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(format!("{v}").parse().unwrap_or(f64::from(v))),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// "u32", "string", "array of 3 string", for error messages.
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F64(_) => "f64".into(),
            GgufValue::Array(a) => match a.first() {
                Some(v) => format!("array of {} {}", a.len(), v.type_name()),
                None => "empty array".into(),
            },
        }
    }
}

/// One entry of the tensor table, as the file gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml's `ne`: innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

/// ggml's name for a type id, for messages ("q5_0", "iq2_xs"); unknown ids are "type N".
pub fn ggml_type_name(ggml_type: u32) -> String {
    let name = match ggml_type {
        0 => "f32",
        1 => "f16",
        2 => "q4_0",
        3 => "q4_1",
        6 => "q5_0",
        7 => "q5_1",
        8 => "q8_0",
        9 => "q8_1",
        10 => "q2_K",
        11 => "q3_K",
        12 => "q4_K",
        13 => "q5_K",
        14 => "q6_K",
        15 => "q8_K",
        16 => "iq2_xxs",
        17 => "iq2_xs",
        18 => "iq3_xxs",
        19 => "iq1_s",
        20 => "iq4_nl",
        21 => "iq3_s",
        22 => "iq2_s",
        23 => "iq4_xs",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        29 => "iq1_m",
        30 => "bf16",
        34 => "tq1_0",
        35 => "tq2_0",
        39 => "mxfp4",
        other => return format!("type {other}"),
    };
    name.to_string()
}

/// The ggml type ids this crate dequantizes.
pub fn stored_type_of_ggml(ggml_type: u32) -> Option<StoredType> {
    Some(match ggml_type {
        0 => StoredType::F32,
        1 => StoredType::F16,
        2 => StoredType::Q4_0,
        3 => StoredType::Q4_1,
        8 => StoredType::Q8_0,
        12 => StoredType::Q4_K,
        14 => StoredType::Q6_K,
        30 => StoredType::BF16,
        _ => return None,
    })
}

/// A parsed GGUF file: metadata and tensor table, with the mapped bytes for tensor data.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// Bounds-checked little-endian reads over the mapped file.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    file: &'a Path,
}

/// "metadata value KEY", formatted only when an error needs it: the token and merge arrays
/// hold a hundred thousand values.
#[derive(Clone, Copy)]
struct ValueOf<'k>(&'k str);

impl fmt::Display for ValueOf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "metadata value {}", self.0)
    }
}

/// What a read is for, in an error message.
trait What: fmt::Display + Copy {}
impl<T: fmt::Display + Copy> What for T {}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: impl What) -> Result<&'a [u8], ModelError> {
        let end = (self.pos as u64).saturating_add(n);
        if end > self.data.len() as u64 {
            return Err(ModelError::Truncated {
                file: self.file.to_path_buf(),
                what: what.to_string(),
                needed: end,
                len: self.data.len() as u64,
            });
        }
        let start = self.pos;
        self.pos = end as usize;
        Ok(&self.data[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: impl What) -> Result<[u8; N], ModelError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: impl What) -> Result<u32, ModelError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl What) -> Result<u64, ModelError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn corrupt(&self, reason: String) -> ModelError {
        ModelError::CorruptGguf {
            file: self.file.to_path_buf(),
            offset: self.pos as u64,
            reason,
        }
    }

    /// A length-prefixed string. Keys and tensor names must be UTF-8; values are read lossily
    /// so one odd string elsewhere in the metadata does not make the file unreadable.
    fn string(&mut self, what: impl What, strict: bool) -> Result<String, ModelError> {
        let len = self.u64(what)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) if !strict => Ok(String::from_utf8_lossy(bytes).into_owned()),
            Err(_) => Err(ModelError::CorruptGguf {
                file: self.file.to_path_buf(),
                offset: start as u64,
                reason: format!("{what} is not UTF-8"),
            }),
        }
    }

    fn value(&mut self, value_type: u32, key: &str, depth: usize) -> Result<GgufValue, ModelError> {
        let what = ValueOf(key);
        Ok(match value_type {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => {
                let [b] = self.array(what)?;
                GgufValue::Bool(b != 0)
            }
            8 => GgufValue::String(self.string(what, false)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let element_type = self.u32(what)?;
                let count = self.u64(what)?;
                let min_size = match element_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(
                            self.corrupt(format!("{what}: unknown array element type {other}"))
                        )
                    }
                };
                // Every element takes at least min_size bytes, so a count the rest of the file
                // cannot hold is corrupt; checking first keeps a bad count from allocating.
                let remaining = (self.data.len() - self.pos) as u64;
                if count > remaining / min_size {
                    return Err(ModelError::Truncated {
                        file: self.file.to_path_buf(),
                        what: format!("{what} ({count} elements)"),
                        needed: (self.pos as u64).saturating_add(count.saturating_mul(min_size)),
                        len: self.data.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(element_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(self.corrupt(format!("{what}: unknown value type {other}"))),
        })
    }
}

/// Everything before the tensor data.
struct Header {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
}

impl Header {
    fn parse(data: &[u8], path: &Path) -> Result<Self, ModelError> {
        let mut r = Reader {
            data,
            pos: 0,
            file: path,
        };
        let magic: [u8; 4] = match data.get(..4) {
            Some(m) => [m[0], m[1], m[2], m[3]],
            None => {
                return Err(ModelError::Truncated {
                    file: path.to_path_buf(),
                    what: "the GGUF magic".to_string(),
                    needed: 4,
                    len: data.len() as u64,
                })
            }
        };
        if &magic != MAGIC {
            let found = magic
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ");
            return Err(ModelError::BadMagic {
                file: path.to_path_buf(),
                found: format!("bytes {found}"),
            });
        }
        r.pos = 4;
        let version = r.u32("the GGUF version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::UnsupportedGgufVersion {
                file: path.to_path_buf(),
                version,
            });
        }
        let tensor_count = r.u64("the tensor count")?;
        let kv_count = r.u64("the metadata count")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string("a metadata key", true)?;
            let value_type = r.u32(&format!("the type of metadata key {key}"))?;
            let value = r.value(value_type, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.corrupt(format!("metadata key {key} appears twice")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i128() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= u32::MAX as i128 => {
                    a as u64
                }
                _ => {
                    return Err(r.corrupt(format!(
                        "general.alignment must be a power of two, found {v:?}"
                    )))
                }
            },
        };

        // Each entry takes at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes.
        let remaining = (data.len() - r.pos) as u64;
        if tensor_count > remaining / 24 {
            return Err(ModelError::Truncated {
                file: path.to_path_buf(),
                what: format!("the tensor table ({tensor_count} tensors)"),
                needed: (r.pos as u64).saturating_add(tensor_count.saturating_mul(24)),
                len: data.len() as u64,
            });
        }
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = r.string("a tensor name", true)?;
            let what = format!("the table entry of tensor {name}");
            let n_dims = r.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.corrupt(format!(
                    "tensor {name} has {n_dims} dimensions; expected 1 to {MAX_DIMS}"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64(&what))
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32(&what)?;
            let offset = r.u64(&what)?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;

        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(r.corrupt(format!("tensor {} appears twice", t.name)));
            }
            let Some(stored) = stored_type_of_ggml(t.ggml_type) else {
                return Err(ModelError::UnsupportedTensorType {
                    tensor: t.name.clone(),
                    ggml_type: ggml_type_name(t.ggml_type),
                });
            };
            let bytes = byte_len(&t.dims, stored).map_err(|reason| ModelError::CorruptGguf {
                file: path.to_path_buf(),
                offset: data_offset,
                reason: format!("tensor {}: {reason}", t.name),
            })?;
            if t.offset % alignment != 0 {
                return Err(ModelError::CorruptGguf {
                    file: path.to_path_buf(),
                    offset: data_offset,
                    reason: format!(
                        "tensor {} starts at offset {}, not a multiple of the alignment {}",
                        t.name, t.offset, alignment
                    ),
                });
            }
            let end = data_offset.saturating_add(t.offset).saturating_add(bytes);
            if end > data.len() as u64 {
                return Err(ModelError::Truncated {
                    file: path.to_path_buf(),
                    what: format!("the data of tensor {}", t.name),
                    needed: end,
                    len: data.len() as u64,
                });
            }
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }
}

impl GgufFile {
    /// Maps the file and parses everything but the tensor data. Every tensor's type must be one
    /// this crate dequantizes and its data must lie inside the file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let map = map_file(path)?;
        let header = Header::parse(&map, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The stored bytes of a tensor (blocks exactly as in the file).
    pub fn tensor_bytes(&self, tensor: &GgufTensorInfo) -> Result<&[u8], ModelError> {
        let corrupt = |reason: String| ModelError::CorruptGguf {
            file: self.path.clone(),
            offset: self.data_offset.saturating_add(tensor.offset),
            reason,
        };
        let stored = stored_type_of_ggml(tensor.ggml_type).ok_or_else(|| {
            ModelError::UnsupportedTensorType {
                tensor: tensor.name.clone(),
                ggml_type: ggml_type_name(tensor.ggml_type),
            }
        })?;
        let len = byte_len(&tensor.dims, stored).map_err(&corrupt)?;
        let start = self.data_offset.saturating_add(tensor.offset);
        usize::try_from(start)
            .ok()
            .zip(usize::try_from(start.saturating_add(len)).ok())
            .and_then(|(s, e)| self.map.get(s..e))
            .ok_or_else(|| corrupt(format!("tensor {} lies outside the file", tensor.name)))
    }

    fn key_error(&self, key: &str, value: &GgufValue, expected: &str) -> ModelError {
        ModelError::MetadataType {
            file: self.path.clone(),
            key: key.to_string(),
            found: value.type_name(),
            expected: expected.to_string(),
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingMetadata {
            file: self.path.clone(),
            key: key.to_string(),
        }
    }

    /// An optional non-negative integer key.
    pub fn usize_key(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.get(key)
            .map(|v| {
                v.as_i128()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.key_error(key, v, "a non-negative integer"))
            })
            .transpose()
    }

    fn required_usize(&self, key: &str) -> Result<usize, ModelError> {
        self.usize_key(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn f64_key(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.key_error(key, v, "a number")))
            .transpose()
    }

    pub fn str_key(&self, key: &str) -> Result<Option<&str>, ModelError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.key_error(key, v, "a string")))
            .transpose()
    }

    pub fn bool_key(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.key_error(key, v, "a bool")))
            .transpose()
    }

    fn token_id_key(&self, key: &str) -> Result<Option<u32>, ModelError> {
        self.get(key)
            .map(|v| {
                v.as_i128()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| self.key_error(key, v, "a token id"))
            })
            .transpose()
    }

    fn string_array_key(&self, key: &str) -> Result<Option<Vec<&str>>, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.key_error(key, v, "an array of strings"))?;
        items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| self.key_error(key, v, "an array of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }

    /// The model config from `general.architecture` and `{arch}.*` keys.
    pub fn model_config(&self) -> Result<ModelConfig, ModelError> {
        let arch_name = self
            .str_key("general.architecture")?
            .ok_or_else(|| self.missing("general.architecture"))?;
        let architecture = Architecture::from_gguf(arch_name).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                found: format!("gguf:{arch_name}"),
                supported: Architecture::supported_names(),
            }
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let invalid = |field: String, reason: String| ModelError::InvalidConfig {
            file: self.path.clone(),
            field,
            reason,
        };

        let hidden_size = self.required_usize(&key("embedding_length"))?;
        let num_attention_heads = self.required_usize(&key("attention.head_count"))?;
        let num_key_value_heads = self
            .usize_key(&key("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        let head_dim = match self.usize_key(&key("attention.key_length"))? {
            Some(d) => d,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(invalid(
                        key("embedding_length"),
                        format!("{hidden_size} is not a multiple of the head count {num_attention_heads}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if let Some(rot) = self.usize_key(&key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(invalid(
                    key("rope.dimension_count"),
                    format!("partial rotary embedding ({rot} of {head_dim} dimensions) is not supported"),
                ));
            }
        }

        let rope = self.rope_config(arch_name)?;
        let vocab_size = match self.string_array_key("tokenizer.ggml.tokens")? {
            Some(tokens) => tokens.len(),
            None => match self.usize_key(&key("vocab_size"))? {
                Some(n) => n,
                None => self
                    .tensors
                    .iter()
                    .find(|t| t.name == "token_embd.weight")
                    .and_then(|t| t.dims.get(1))
                    .and_then(|&n| usize::try_from(n).ok())
                    .ok_or_else(|| self.missing("tokenizer.ggml.tokens"))?,
            },
        };

        let mut eos_token_ids = Vec::new();
        for k in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = self.token_id_key(k)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }

        let config = ModelConfig {
            architecture,
            source_architecture: format!("gguf:{arch_name}"),
            vocab_size,
            hidden_size,
            intermediate_size: self.required_usize(&key("feed_forward_length"))?,
            num_hidden_layers: self.required_usize(&key("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self
                .f64_key(&key("attention.layer_norm_rms_epsilon"))?
                .ok_or_else(|| self.missing(&key("attention.layer_norm_rms_epsilon")))?,
            rope,
            max_position_embeddings: self.required_usize(&key("context_length"))?,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            attention_bias: architecture == Architecture::Qwen2
                || self.has_tensor("blk.0.attn_q.bias"),
            qk_norm: architecture == Architecture::Qwen3
                || self.has_tensor("blk.0.attn_q_norm.weight"),
            bos_token_id: self.token_id_key("tokenizer.ggml.bos_token_id")?,
            eos_token_ids,
            moe: None,
            mla: None,
            mtp: None,
        };
        config.validate(&self.path)?;
        Ok(config)
    }

    fn rope_config(&self, arch: &str) -> Result<RopeConfig, ModelError> {
        let theta = self
            .f64_key(&format!("{arch}.rope.freq_base"))?
            .unwrap_or(10000.0);
        let unsupported = |rope_type: &str| ModelError::UnsupportedRope {
            file: self.path.clone(),
            rope_type: rope_type.to_string(),
        };
        // llama.cpp's converter stores Llama 3.1 style scaling as per-frequency factors in a
        // tensor rather than as parameters; they cannot be turned back into RopeScaling::Llama3.
        if self.has_tensor("rope_freqs.weight") {
            return Err(unsupported("per-frequency factors (rope_freqs.weight)"));
        }
        let factor_key = format!("{arch}.rope.scaling.factor");
        let scaling = match self.str_key(&format!("{arch}.rope.scaling.type"))? {
            None | Some("none") => match self.f64_key(&format!("{arch}.rope.scale_linear"))? {
                // Older files give linear scaling as rope.scale_linear alone.
                Some(factor) if factor != 1.0 => RopeScaling::Linear { factor },
                _ => RopeScaling::None,
            },
            Some("linear") => RopeScaling::Linear {
                factor: self
                    .f64_key(&factor_key)?
                    .ok_or_else(|| self.missing(&factor_key))?,
            },
            Some(other) => return Err(unsupported(other)),
        };
        Ok(RopeConfig { theta, scaling })
    }

    /// The tokenizer described by `tokenizer.ggml.*`: None when the file has none; an error
    /// when it has one this crate cannot build.
    pub fn tokenizer(&self) -> Result<Option<TokenizerSpec>, ModelError> {
        let Some(model) = self.str_key("tokenizer.ggml.model")? else {
            return Ok(None);
        };
        if model != "gpt2" {
            return Err(ModelError::UnsupportedTokenizer {
                model: model.to_string(),
            });
        }
        let tokens = self
            .string_array_key("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.missing("tokenizer.ggml.tokens"))?;
        let merges = self
            .string_array_key("tokenizer.ggml.merges")?
            .ok_or_else(|| self.missing("tokenizer.ggml.merges"))?;
        let token_types = match self.get("tokenizer.ggml.token_type") {
            None => None,
            Some(v) => {
                let items = v.as_array().ok_or_else(|| {
                    self.key_error("tokenizer.ggml.token_type", v, "an array of integers")
                })?;
                Some(
                    items
                        .iter()
                        .map(|t| {
                            t.as_i128()
                                .and_then(|n| i64::try_from(n).ok())
                                .ok_or_else(|| {
                                    self.key_error(
                                        "tokenizer.ggml.token_type",
                                        v,
                                        "an array of integers",
                                    )
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
        };
        let vocab = GgufBpeVocab {
            tokens,
            token_types,
            merges,
            pre: self.str_key("tokenizer.ggml.pre")?.unwrap_or("default"),
            bos_id: self.token_id_key("tokenizer.ggml.bos_token_id")?,
            eos_id: self.token_id_key("tokenizer.ggml.eos_token_id")?,
            add_bos: self.bool_key("tokenizer.ggml.add_bos_token")?,
            add_eos: self.bool_key("tokenizer.ggml.add_eos_token")?,
        };
        let tokenizer_json = byte_level_bpe_json(&vocab, &self.path)?;
        let token = |id: Option<u32>| {
            id.and_then(|id| vocab.tokens.get(id as usize))
                .map(|t| t.to_string())
        };
        Ok(Some(TokenizerSpec {
            tokenizer_json,
            chat_template: self.str_key("tokenizer.chat_template")?.map(str::to_string),
            bos_token: token(vocab.bos_id),
            eos_token: token(vocab.eos_id),
        }))
    }
}

/// Bytes a tensor of this shape and type occupies; an error for shapes that do not fit the
/// block size or overflow.
fn byte_len(dims: &[u64], stored: StoredType) -> Result<u64, String> {
    // An empty dimension would let the others be anything while the tensor takes no bytes, and
    // readers size buffers from them (a Q/K row order of `rows` entries, say).
    if dims.contains(&0) {
        return Err(format!("shape {dims:?} has an empty dimension"));
    }
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {dims:?} overflows"))?;
    let block = stored.block_elements() as u64;
    let inner = dims.first().copied().unwrap_or(1);
    if inner % block != 0 {
        return Err(format!(
            "innermost dimension {inner} is not a multiple of the {stored} block size {block}"
        ));
    }
    (elements / block)
        .checked_mul(stored.block_bytes() as u64)
        .ok_or_else(|| format!("shape {dims:?} overflows"))
}

/// HF name for a GGUF tensor name of the llama/qwen families; None for names outside the map.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf_part = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{suffix}"))
}

/// Undoes llama.cpp's converter permutation of Q/K projection rows. The converter regroups
/// each head's rows so that rope can rotate adjacent pairs: HF row `h*d + t*(d/2) + i` is
/// stored as row `h*d + 2*i + t` (d the head dim, t in {0, 1}). `data` holds `rows * cols`
/// values row-major; None when `rows` is not a multiple of `2 * n_heads` or the length is off.
pub fn unpermute_qk_rows(data: &[f32], cols: usize, n_heads: usize) -> Option<Vec<f32>> {
    if cols == 0 || data.len() % cols != 0 {
        return None;
    }
    let order = qk_stored_rows(data.len() / cols, n_heads)?;
    let mut out = Vec::with_capacity(data.len());
    for stored in order {
        out.extend_from_slice(&data[stored * cols..(stored + 1) * cols]);
    }
    Some(out)
}

/// For each HF row of a permuted Q/K projection of `rows` rows, the row llama.cpp stored it at
/// (see [`unpermute_qk_rows`]); None when `rows` is not a multiple of `2 * n_heads`.
pub fn qk_stored_rows(rows: usize, n_heads: usize) -> Option<Vec<usize>> {
    if n_heads == 0 || rows % (2 * n_heads) != 0 {
        return None;
    }
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut order = vec![0; rows];
    for h in 0..n_heads {
        for i in 0..half {
            for t in 0..2 {
                order[h * head_dim + t * half + i] = h * head_dim + 2 * i + t;
            }
        }
    }
    Some(order)
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Dequantizes `bytes` of `stored` blocks into `out`, exactly as ggml's reference
/// (`dequantize_row_*`) does it: same operations, same order, in f32.
/// `bytes` must hold exactly `out.len()` elements.
pub fn dequantize(stored: StoredType, bytes: &[u8], out: &mut [f32]) -> Result<(), ModelError> {
    let block = stored.block_elements();
    let block_bytes = stored.block_bytes();
    if out.len() % block != 0 || bytes.len() != out.len() / block * block_bytes {
        return Err(ModelError::DequantLength {
            stored,
            bytes: bytes.len(),
            elements: out.len(),
        });
    }
    let blocks = bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(block));
    match stored {
        StoredType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        StoredType::F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        StoredType::BF16 => {
            for (b, y) in blocks {
                y[0] = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        StoredType::Q8_0 => {
            for (b, y) in blocks {
                let d = f16_at(b, 0);
                for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                    *y = (q as i8) as f32 * d;
                }
            }
        }
        StoredType::Q4_0 => {
            for (b, y) in blocks {
                let d = f16_at(b, 0);
                let (lo, hi) = y.split_at_mut(16);
                for (j, &q) in b[2..18].iter().enumerate() {
                    lo[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        StoredType::Q4_1 => {
            for (b, y) in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let (lo, hi) = y.split_at_mut(16);
                for (j, &q) in b[4..20].iter().enumerate() {
                    lo[j] = (q & 0x0F) as f32 * d + m;
                    hi[j] = (q >> 4) as f32 * d + m;
                }
            }
        }
        StoredType::Q4_K => {
            for (b, y) in blocks {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                // Four groups of 64 outputs; each uses 32 bytes of qs, low nibbles for the first
                // 32 outputs (sub-block 2g) and high nibbles for the next 32 (sub-block 2g+1).
                for g in 0..4 {
                    let (sc1, m1) = q4k_scale_min(scales, 2 * g);
                    let (sc2, m2) = q4k_scale_min(scales, 2 * g + 1);
                    let d1 = d * sc1 as f32;
                    let min1 = dmin * m1 as f32;
                    let d2 = d * sc2 as f32;
                    let min2 = dmin * m2 as f32;
                    let q = &qs[32 * g..32 * g + 32];
                    let y = &mut y[64 * g..64 * g + 64];
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0x0F) as f32 - min1;
                        y[32 + l] = d2 * (q[l] >> 4) as f32 - min2;
                    }
                }
            }
        }
        StoredType::Q6_K => {
            for (b, y) in blocks {
                let ql_all = &b[0..128];
                let qh_all = &b[128..192];
                let sc_all = &b[192..208];
                let d = f16_at(b, 208);
                // Two halves of 128 outputs, each with 64 bytes of low nibbles, 32 bytes of
                // high bit pairs and 8 scales (one per 16 outputs).
                for n in 0..2 {
                    let ql = &ql_all[64 * n..64 * n + 64];
                    let qh = &qh_all[32 * n..32 * n + 32];
                    let sc = &sc_all[8 * n..8 * n + 8];
                    let y = &mut y[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Scale and min of Q4_K sub-block `j` (0..8), packed as 6-bit values in 12 bytes: sub-blocks
/// 0-3 in the low six bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 in the nibbles
/// of bytes 8-11 with their top two bits in the high bits of bytes 0-7.
fn q4k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// One tensor as the TensorSource exposes it.
#[derive(Debug, Clone)]
struct Entry {
    /// Index into `GgufFile::tensors`.
    index: usize,
    /// HF order: ggml's dims reversed.
    shape: Vec<usize>,
    stored: StoredType,
    /// Heads whose rows llama.cpp permuted (Q and K of `llama`), to undo on load.
    unpermute_heads: Option<usize>,
}

/// A GGUF file's tensors in HF naming and layout.
pub struct GgufTensors {
    file: GgufFile,
    entries: BTreeMap<String, Entry>,
}

impl GgufTensors {
    /// Indexes `file`'s tensors under HF names. `config` gives the head counts for undoing the
    /// Q/K permutation of `llama` files. Names outside the llama/qwen map keep their GGUF name.
    pub fn new(file: GgufFile, config: &ModelConfig) -> Result<Self, ModelError> {
        let permuted = file.str_key("general.architecture")? == Some("llama");
        let mut entries = BTreeMap::new();
        for (index, t) in file.tensors.iter().enumerate() {
            let corrupt = |reason: String| ModelError::CorruptGguf {
                file: file.path.clone(),
                offset: file.data_offset,
                reason,
            };
            // Types were checked when the file was parsed.
            let stored = stored_type_of_ggml(t.ggml_type).ok_or_else(|| {
                ModelError::UnsupportedTensorType {
                    tensor: t.name.clone(),
                    ggml_type: ggml_type_name(t.ggml_type),
                }
            })?;
            let shape = t
                .dims
                .iter()
                .rev()
                .map(|&d| {
                    usize::try_from(d)
                        .map_err(|_| corrupt(format!("tensor {} is too large", t.name)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let hf_name = hf_tensor_name(&t.name).unwrap_or_else(|| t.name.clone());
            let unpermute_heads = if !permuted {
                None
            } else if hf_name.ends_with("self_attn.q_proj.weight")
                || hf_name.ends_with("self_attn.q_proj.bias")
            {
                Some(config.num_attention_heads)
            } else if hf_name.ends_with("self_attn.k_proj.weight")
                || hf_name.ends_with("self_attn.k_proj.bias")
            {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            if let Some(heads) = unpermute_heads {
                let rows = shape[0];
                if rows % (2 * heads) != 0 {
                    return Err(corrupt(format!(
                        "tensor {} has {rows} rows, not a whole number of {heads} heads of even size",
                        t.name
                    )));
                }
            }
            let entry = Entry {
                index,
                shape,
                stored,
                unpermute_heads,
            };
            if entries.insert(hf_name.clone(), entry).is_some() {
                return Err(corrupt(format!("two tensors map to {hf_name}")));
            }
        }
        Ok(GgufTensors { file, entries })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl TensorSource for GgufTensors {
    fn load_blocks(&self, name: &str) -> Result<Option<QuantBlocks>, ModelError> {
        let Some(entry) = self.entries.get(name) else {
            return Err(ModelError::TensorNotFound {
                name: name.to_string(),
            });
        };
        let (StoredType::Q8_0 | StoredType::Q4_0 | StoredType::Q4_1) = entry.stored else {
            return Ok(None);
        };
        let [rows, cols] = entry.shape[..] else {
            return Ok(None);
        };
        let tensor = &self.file.tensors[entry.index];
        let bytes = self.file.tensor_bytes(tensor)?;
        let block_bytes = entry.stored.block_bytes();
        if cols % 32 != 0 || bytes.len() != rows * cols / 32 * block_bytes {
            return Ok(None);
        }
        let order = match entry.unpermute_heads {
            None => (0..rows).collect(),
            Some(heads) => qk_stored_rows(rows, heads).ok_or_else(|| ModelError::CorruptGguf {
                file: self.file.path.clone(),
                offset: self.file.data_offset.saturating_add(tensor.offset),
                reason: format!("tensor {} does not split into {heads} heads", tensor.name),
            })?,
        };
        let half_at =
            |b: &[u8], at: usize| half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]));
        let blocks_per_row = cols / 32;
        let mut out = QuantBlocks {
            stored: entry.stored,
            rows,
            cols,
            codes: Vec::with_capacity(rows * cols),
            scales: Vec::with_capacity(rows * blocks_per_row),
            mins: vec![],
        };
        for stored_row in order {
            let row =
                &bytes[stored_row * blocks_per_row * block_bytes..][..blocks_per_row * block_bytes];
            for b in row.chunks_exact(block_bytes) {
                out.scales.push(half_at(b, 0));
                match entry.stored {
                    StoredType::Q8_0 => out
                        .codes
                        .extend(b[2..34].iter().map(|&q| (q as i8 as i16 + 128) as u8)),
                    StoredType::Q4_0 => {
                        out.codes.extend(b[2..18].iter().map(|&q| q & 0x0f));
                        out.codes.extend(b[2..18].iter().map(|&q| q >> 4));
                    }
                    _ => {
                        out.mins.push(half_at(b, 2));
                        out.codes.extend(b[4..20].iter().map(|&q| q & 0x0f));
                        out.codes.extend(b[4..20].iter().map(|&q| q >> 4));
                    }
                }
            }
        }
        Ok(Some(out))
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.entries.get(name).map(|e| TensorInfo {
            shape: e.shape.clone(),
            stored: e.stored,
        })
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::TensorNotFound {
                name: name.to_string(),
            })?;
        let tensor = &self.file.tensors[entry.index];
        let bytes = self.file.tensor_bytes(tensor)?;
        let elements: usize = entry.shape.iter().product();
        let mut out = vec![0.0f32; elements];
        dequantize(entry.stored, bytes, &mut out)?;
        match entry.unpermute_heads {
            None => Ok(out),
            Some(heads) => {
                let cols = if entry.shape.len() == 1 {
                    1
                } else {
                    elements / entry.shape[0].max(1)
                };
                unpermute_qk_rows(&out, cols, heads).ok_or_else(|| ModelError::CorruptGguf {
                    file: self.file.path.clone(),
                    offset: self.file.data_offset.saturating_add(tensor.offset),
                    reason: format!("tensor {} does not split into {heads} heads", tensor.name),
                })
            }
        }
    }
}

/// Opens a GGUF file as a checkpoint. A tokenizer this crate cannot build leaves `tokenizer`
/// None with the reason in `tokenizer_note`; everything else wrong with the file is an error.
pub(crate) fn open_gguf(path: &Path) -> Result<Checkpoint, ModelError> {
    let file = GgufFile::open(path)?;
    let config = file.model_config()?;
    let (tokenizer, tokenizer_note) = match file.tokenizer() {
        Ok(Some(t)) => (Some(t), None),
        Ok(None) => (None, Some("the GGUF metadata has no tokenizer".to_string())),
        Err(e) => (None, Some(e.to_string())),
    };
    let sources = vec![SourceFile::of_bytes(path, &file.map)];
    let tensors = GgufTensors::new(file, &config)?;
    Ok(Checkpoint {
        config,
        tensors: Box::new(tensors),
        tokenizer,
        tokenizer_note,
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::open;
    use crate::testing::{smollm2_gguf_path, workspace_root, ScratchDir};
    use std::str::FromStr;

    /// Writes GGUF v3 files for tests: metadata, then tensors at aligned offsets.
    struct GgufBuilder {
        version: u32,
        alignment: usize,
        metadata: Vec<(String, GgufValue)>,
        /// name, ggml dims (innermost first), ggml type, data
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl GgufBuilder {
        fn new() -> Self {
            GgufBuilder {
                version: 3,
                alignment: 32,
                metadata: Vec::new(),
                tensors: Vec::new(),
            }
        }

        fn kv(mut self, key: &str, value: GgufValue) -> Self {
            self.metadata.push((key.to_string(), value));
            self
        }

        fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> Self {
            self.tensors
                .push((name.to_string(), dims.to_vec(), ggml_type, data));
            self
        }

        fn type_id(v: &GgufValue) -> u32 {
            match v {
                GgufValue::U8(_) => 0,
                GgufValue::I8(_) => 1,
                GgufValue::U16(_) => 2,
                GgufValue::I16(_) => 3,
                GgufValue::U32(_) => 4,
                GgufValue::I32(_) => 5,
                GgufValue::F32(_) => 6,
                GgufValue::Bool(_) => 7,
                GgufValue::String(_) => 8,
                GgufValue::Array(_) => 9,
                GgufValue::U64(_) => 10,
                GgufValue::I64(_) => 11,
                GgufValue::F64(_) => 12,
            }
        }

        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }

        fn value(out: &mut Vec<u8>, v: &GgufValue) {
            match v {
                GgufValue::U8(x) => out.extend(x.to_le_bytes()),
                GgufValue::I8(x) => out.extend(x.to_le_bytes()),
                GgufValue::U16(x) => out.extend(x.to_le_bytes()),
                GgufValue::I16(x) => out.extend(x.to_le_bytes()),
                GgufValue::U32(x) => out.extend(x.to_le_bytes()),
                GgufValue::I32(x) => out.extend(x.to_le_bytes()),
                GgufValue::F32(x) => out.extend(x.to_le_bytes()),
                GgufValue::Bool(x) => out.push(*x as u8),
                GgufValue::String(s) => Self::string(out, s),
                GgufValue::Array(items) => {
                    out.extend(items.first().map_or(0, Self::type_id).to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for item in items {
                        Self::value(out, item);
                    }
                }
                GgufValue::U64(x) => out.extend(x.to_le_bytes()),
                GgufValue::I64(x) => out.extend(x.to_le_bytes()),
                GgufValue::F64(x) => out.extend(x.to_le_bytes()),
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let pad = |out: &mut Vec<u8>| out.resize(out.len().next_multiple_of(self.alignment), 0);
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.metadata.len() as u64).to_le_bytes());
            for (key, value) in &self.metadata {
                Self::string(&mut out, key);
                out.extend(Self::type_id(value).to_le_bytes());
                Self::value(&mut out, value);
            }
            let mut offset = 0usize;
            for (name, dims, ty, data) in &self.tensors {
                Self::string(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(ty.to_le_bytes());
                out.extend((offset as u64).to_le_bytes());
                offset = (offset + data.len()).next_multiple_of(self.alignment);
            }
            pad(&mut out);
            for (_, _, _, data) in &self.tensors {
                out.extend(data);
                pad(&mut out);
            }
            out
        }

        fn write(&self, dir: &Path, name: &str) -> PathBuf {
            let path = dir.join(name);
            std::fs::write(&path, self.bytes()).unwrap();
            path
        }
    }

    fn s(v: &str) -> GgufValue {
        GgufValue::String(v.to_string())
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn dequant(stored: StoredType, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        dequantize(stored, bytes, &mut out).unwrap();
        out
    }

    // f16 bit patterns used as block scales below.
    const F16_QUARTER: [u8; 2] = 0x3400u16.to_le_bytes();
    const F16_HALF: [u8; 2] = 0x3800u16.to_le_bytes();
    const F16_TWO: [u8; 2] = 0x4000u16.to_le_bytes();
    const F16_MINUS_ONE: [u8; 2] = 0xBC00u16.to_le_bytes();

    /// qs bytes whose low nibble counts up and high nibble counts down: byte j = j | (15-j) << 4.
    fn updown_nibbles() -> Vec<u8> {
        (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
    }

    #[test]
    fn plain_float_types_decode_exactly() {
        let f16_bits: [u16; 4] = [0x3C00, 0xC000, 0x7BFF, 0x0001];
        let bytes: Vec<u8> = f16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        assert_eq!(
            dequant(StoredType::F16, &bytes, 4),
            [1.0, -2.0, 65504.0, 2f32.powi(-24)]
        );
        let bf16_bits: [u16; 3] = [0x3F80, 0xC040, 0x4049];
        let bytes: Vec<u8> = bf16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        assert_eq!(dequant(StoredType::BF16, &bytes, 3), [1.0, -3.0, 3.140625]);
        assert_eq!(
            dequant(StoredType::F32, &f32_bytes(&[1.5, -0.0]), 2),
            [1.5, -0.0]
        );
    }

    #[test]
    fn q8_0_block_is_scale_times_int8() {
        let qs: Vec<i8> = [-128i8, -1, 0, 1, 127]
            .into_iter()
            .chain((0..27).map(|j| j - 13))
            .collect();
        let mut block = F16_HALF.to_vec();
        block.extend(qs.iter().map(|&q| q as u8));
        let got = dequant(StoredType::Q8_0, &block, 32);
        assert_eq!(&got[..5], &[-64.0, -0.5, 0.0, 0.5, 63.5]);
        let expected: Vec<f32> = qs.iter().map(|&q| q as f32 * 0.5).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn q4_0_block_is_scale_times_nibble_minus_8() {
        let mut block = F16_TWO.to_vec();
        block.extend(updown_nibbles());
        let got = dequant(StoredType::Q4_0, &block, 32);
        // Outputs 0..16 are the low nibbles 0..15, outputs 16..32 the high nibbles 15..0.
        let expected: Vec<f32> = (0..16)
            .map(|j| (j - 8) as f32 * 2.0)
            .chain((0..16).map(|j| (7 - j) as f32 * 2.0))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(
            (got[0], got[15], got[16], got[31]),
            (-16.0, 14.0, 14.0, -16.0)
        );
    }

    #[test]
    fn q4_1_block_is_scale_times_nibble_plus_min() {
        let mut block = F16_QUARTER.to_vec();
        block.extend(F16_MINUS_ONE);
        block.extend(updown_nibbles());
        let got = dequant(StoredType::Q4_1, &block, 32);
        let expected: Vec<f32> = (0..16)
            .map(|j| j as f32 * 0.25 - 1.0)
            .chain((0..16).map(|j| (15 - j) as f32 * 0.25 - 1.0))
            .collect();
        assert_eq!(got, expected);
        assert_eq!((got[0], got[15], got[16]), (-1.0, 2.75, 2.75));
    }

    #[test]
    fn q4_k_block_uses_packed_six_bit_scales_and_mins() {
        let sc: [u8; 8] = [1, 2, 3, 4, 17, 33, 50, 63];
        let mn: [u8; 8] = [0, 1, 2, 3, 20, 36, 5, 63];
        // Packing: bytes 0-3 scales 0-3 (low 6 bits) + top bits of scales 4-7; bytes 4-7 mins
        // 0-3 + top bits of mins 4-7; bytes 8-11 low nibbles of scales 4-7 | mins 4-7 << 4.
        let mut scales = [0u8; 12];
        for j in 0..4 {
            scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            scales[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            scales[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        let qs: Vec<u8> = (0..128)
            .map(|i| ((i % 16) | ((15 - i % 16) << 4)) as u8)
            .collect();
        let mut block = F16_HALF.to_vec(); // d
        block.extend(F16_QUARTER); // dmin
        block.extend(scales);
        block.extend(&qs);
        let got = dequant(StoredType::Q4_K, &block, 256);
        // Sub-block s covers outputs 32s..32s+32 and reads qs[32*(s/2)..][..32], low nibbles
        // when s is even, high when odd.
        let expected: Vec<f32> = (0..256)
            .map(|e| {
                let (sub, r) = (e / 32, e % 32);
                let q = qs[32 * (sub / 2) + r];
                let nibble = if sub % 2 == 0 { q & 0x0F } else { q >> 4 };
                0.5 * sc[sub] as f32 * nibble as f32 - 0.25 * mn[sub] as f32
            })
            .collect();
        assert_eq!(got, expected);
        assert_eq!(
            (got[0], got[40], got[130], got[255]),
            (0.0, 6.75, 12.0, -15.75)
        );
    }

    #[test]
    fn q6_k_block_combines_low_nibbles_high_pairs_and_signed_scales() {
        let sc: [i8; 16] = [
            1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -16,
        ];
        let q6 = |e: usize| ((e * 7 + 3) % 64) as u8;
        // Layout: output e = 128n + 32k + l (k the quarter, l < 32) keeps its low 4 bits in
        // ql[64n + l + 32*(k%2)] (low nibble for k < 2, high for k >= 2), its high 2 bits in
        // qh[32n + l] at bit 2k, and uses scale sc[8n + l/16 + 2k].
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for e in 0..256 {
            let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let q = q6(e);
            let ql_index = 64 * n + l + 32 * (k % 2);
            ql[ql_index] |= if k < 2 { q & 0x0F } else { (q & 0x0F) << 4 };
            qh[32 * n + l] |= (q >> 4) << (2 * k);
        }
        let mut block = ql.to_vec();
        block.extend(qh);
        block.extend(sc.iter().map(|&v| v as u8));
        block.extend(F16_HALF);
        let got = dequant(StoredType::Q6_K, &block, 256);
        let expected: Vec<f32> = (0..256)
            .map(|e| {
                let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
                0.5 * sc[8 * n + l / 16 + 2 * k] as f32 * (q6(e) as i32 - 32) as f32
            })
            .collect();
        assert_eq!(got, expected);
        assert_eq!((got[0], got[200]), (-14.5, 175.5));
    }

    #[test]
    fn dequantize_rejects_mismatched_lengths() {
        let mut out = vec![0.0; 32];
        for (stored, bytes) in [
            (StoredType::Q8_0, 33),
            (StoredType::Q4_1, 40),
            (StoredType::F32, 127),
        ] {
            let err = dequantize(stored, &vec![0; bytes], &mut out).unwrap_err();
            assert!(
                matches!(err, ModelError::DequantLength { .. }),
                "{stored}: {err}"
            );
        }
        let err = dequantize(StoredType::Q6_K, &[0; 210], &mut out).unwrap_err();
        assert!(err.to_string().contains("q6_K"), "{err}");
    }

    /// llama.cpp's converter permutation, written as its reshape: rows viewed as
    /// [heads, 2, head_dim/2] and the last two axes swapped.
    fn permute_rows(hf: &[f32], cols: usize, heads: usize) -> Vec<f32> {
        let rows = hf.len() / cols;
        let half = rows / heads / 2;
        let mut out = Vec::with_capacity(hf.len());
        for h in 0..heads {
            for i in 0..half {
                for t in 0..2 {
                    let src = (h * 2 + t) * half + i;
                    out.extend_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_undoes_the_converter_permutation() {
        // One column so each value is its stored row index: head_dim 4, two heads.
        let stored: Vec<f32> = (0..8).map(|r| r as f32).collect();
        assert_eq!(
            unpermute_qk_rows(&stored, 1, 2).unwrap(),
            [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
        // head_dim 6, one head: stored rows are HF rows 0,3,1,4,2,5.
        let stored: Vec<f32> = (0..6).map(|r| r as f32).collect();
        assert_eq!(
            unpermute_qk_rows(&stored, 1, 1).unwrap(),
            [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]
        );
        assert_eq!(
            permute_rows(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 1, 1),
            [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );

        // Round trips on a 24 x 3 matrix for head counts leaving head_dim >= 4 (at head_dim 2 the
        // permutation is the identity).
        let matrix: Vec<f32> = (0..72).map(|v| v as f32 * 0.5 - 3.0).collect();
        for heads in [1, 2, 3, 4, 6] {
            let permuted = permute_rows(&matrix, 3, heads);
            assert_ne!(permuted, matrix, "{heads} heads");
            assert_eq!(
                unpermute_qk_rows(&permuted, 3, heads).unwrap(),
                matrix,
                "{heads} heads"
            );
            assert_eq!(
                permute_rows(&unpermute_qk_rows(&matrix, 3, heads).unwrap(), 3, heads),
                matrix
            );
        }
        assert!(unpermute_qk_rows(&matrix, 3, 5).is_none());
        assert!(unpermute_qk_rows(&matrix, 7, 1).is_none());
        assert!(unpermute_qk_rows(&matrix, 0, 1).is_none());
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        let cases = [
            ("token_embd.weight", Some("model.embed_tokens.weight")),
            ("output_norm.weight", Some("model.norm.weight")),
            ("output.weight", Some("lm_head.weight")),
            (
                "blk.0.attn_norm.weight",
                Some("model.layers.0.input_layernorm.weight"),
            ),
            (
                "blk.12.attn_q.weight",
                Some("model.layers.12.self_attn.q_proj.weight"),
            ),
            (
                "blk.3.attn_k.bias",
                Some("model.layers.3.self_attn.k_proj.bias"),
            ),
            (
                "blk.3.attn_v.weight",
                Some("model.layers.3.self_attn.v_proj.weight"),
            ),
            (
                "blk.3.attn_output.weight",
                Some("model.layers.3.self_attn.o_proj.weight"),
            ),
            (
                "blk.1.attn_q_norm.weight",
                Some("model.layers.1.self_attn.q_norm.weight"),
            ),
            (
                "blk.1.attn_k_norm.weight",
                Some("model.layers.1.self_attn.k_norm.weight"),
            ),
            (
                "blk.7.ffn_norm.weight",
                Some("model.layers.7.post_attention_layernorm.weight"),
            ),
            (
                "blk.7.ffn_gate.weight",
                Some("model.layers.7.mlp.gate_proj.weight"),
            ),
            (
                "blk.7.ffn_up.weight",
                Some("model.layers.7.mlp.up_proj.weight"),
            ),
            (
                "blk.7.ffn_down.weight",
                Some("model.layers.7.mlp.down_proj.weight"),
            ),
            ("blk.x.ffn_down.weight", None),
            ("blk.7.ffn_down.scale", None),
            ("blk.7.ffn_gate_exps.weight", None),
            ("rope_freqs.weight", None),
        ];
        for (gguf, hf) in cases {
            assert_eq!(hf_tensor_name(gguf).as_deref(), hf, "{gguf}");
        }
    }

    fn tiny_dir(arch: &str) -> PathBuf {
        workspace_root().join("tests/golden/tiny").join(arch)
    }

    /// The GGUF name llama.cpp's converter gives an HF tensor name.
    fn gguf_name_for(hf: &str) -> String {
        let top = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = top.iter().find(|(h, _)| *h == hf) {
            return g.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (layer, rest) = rest.split_once('.').unwrap();
        let parts = [
            ("input_layernorm.", "attn_norm."),
            ("post_attention_layernorm.", "ffn_norm."),
            ("self_attn.q_proj.", "attn_q."),
            ("self_attn.k_proj.", "attn_k."),
            ("self_attn.v_proj.", "attn_v."),
            ("self_attn.o_proj.", "attn_output."),
            ("self_attn.q_norm.", "attn_q_norm."),
            ("self_attn.k_norm.", "attn_k_norm."),
            ("mlp.gate_proj.", "ffn_gate."),
            ("mlp.up_proj.", "ffn_up."),
            ("mlp.down_proj.", "ffn_down."),
        ];
        let (h, g) = parts.iter().find(|(h, _)| rest.starts_with(h)).unwrap();
        format!("blk.{layer}.{g}{}", &rest[h.len()..])
    }

    /// Converts a tiny HF checkpoint to GGUF the way llama.cpp does (names, reversed dims,
    /// Q/K permutation for llama), storing MLP weights as f16 and the rest as f32.
    fn convert_tiny(arch_dir: &str, gguf_arch: &str, dir: &Path) -> (PathBuf, Checkpoint) {
        let hf = open(&tiny_dir(arch_dir)).unwrap();
        let c = &hf.config;
        let key = |k: &str| format!("{gguf_arch}.{k}");
        let mut b = GgufBuilder::new()
            .kv("general.architecture", s(gguf_arch))
            .kv("general.alignment", GgufValue::U32(64))
            .kv(
                &key("embedding_length"),
                GgufValue::U32(c.hidden_size as u32),
            )
            .kv(
                &key("block_count"),
                GgufValue::U32(c.num_hidden_layers as u32),
            )
            .kv(
                &key("feed_forward_length"),
                GgufValue::U32(c.intermediate_size as u32),
            )
            .kv(
                &key("attention.head_count"),
                GgufValue::U32(c.num_attention_heads as u32),
            )
            .kv(
                &key("attention.head_count_kv"),
                GgufValue::U32(c.num_key_value_heads as u32),
            )
            .kv(
                &key("attention.key_length"),
                GgufValue::U32(c.head_dim as u32),
            )
            .kv(
                &key("attention.layer_norm_rms_epsilon"),
                GgufValue::F32(c.rms_norm_eps as f32),
            )
            .kv(&key("rope.freq_base"), GgufValue::F32(c.rope.theta as f32))
            .kv(
                &key("rope.dimension_count"),
                GgufValue::U32(c.head_dim as u32),
            )
            .kv(
                &key("context_length"),
                GgufValue::U32(c.max_position_embeddings as u32),
            )
            .kv("tokenizer.ggml.model", s("llama"))
            .kv(
                "tokenizer.ggml.tokens",
                GgufValue::Array((0..c.vocab_size).map(|i| s(&format!("t{i}"))).collect()),
            )
            .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
        b.alignment = 64;
        for name in hf.tensors.names() {
            let info = hf.tensors.info(&name).unwrap();
            let mut data = hf.tensors.load_f32(&name).unwrap();
            if gguf_arch == "llama" {
                let cols = if info.shape.len() == 2 {
                    info.shape[1]
                } else {
                    1
                };
                if name.contains("q_proj") {
                    data = permute_rows(&data, cols, c.num_attention_heads);
                } else if name.contains("k_proj") {
                    data = permute_rows(&data, cols, c.num_key_value_heads);
                }
            }
            let dims: Vec<u64> = info.shape.iter().rev().map(|&d| d as u64).collect();
            let (ty, bytes) = if name.contains(".mlp.") {
                (
                    1,
                    data.iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                        .collect(),
                )
            } else {
                (0, f32_bytes(&data))
            };
            b = b.tensor(&gguf_name_for(&name), &dims, ty, bytes);
        }
        (b.write(dir, &format!("{arch_dir}.gguf")), hf)
    }

    #[test]
    fn converted_tiny_checkpoints_read_back_as_hf() {
        let scratch = ScratchDir::new("gguf-roundtrip");
        for (arch_dir, gguf_arch) in [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")] {
            let (path, hf) = convert_tiny(arch_dir, gguf_arch, scratch.path());
            let gguf = open(&path).unwrap();

            let mut expected_config = hf.config.clone();
            expected_config.source_architecture = format!("gguf:{gguf_arch}");
            assert_eq!(gguf.config, expected_config, "{arch_dir}");

            assert_eq!(gguf.tensors.names(), hf.tensors.names(), "{arch_dir}");
            for name in hf.tensors.names() {
                let want = hf.tensors.info(&name).unwrap();
                let got = gguf.tensors.info(&name).unwrap();
                assert_eq!(got.shape, want.shape, "{arch_dir} {name}");
                let original = hf.tensors.load_f32(&name).unwrap();
                let loaded = gguf.tensors.load_f32(&name).unwrap();
                if name.contains(".mlp.") {
                    assert_eq!(got.stored, StoredType::F16, "{name}");
                    let rounded: Vec<f32> = original
                        .iter()
                        .map(|v| half::f16::from_f32(*v).to_f32())
                        .collect();
                    assert_eq!(loaded, rounded, "{arch_dir} {name}");
                } else {
                    assert_eq!(got.stored, StoredType::F32, "{name}");
                    assert_eq!(loaded, original, "{arch_dir} {name}");
                }
            }

            // The "llama" (SentencePiece) tokenizer is reported, not fatal.
            assert!(gguf.tokenizer.is_none());
            let note = gguf.tokenizer_note.clone().unwrap();
            assert_eq!(
                note,
                "unsupported tokenizer model llama; supported: gpt2 (byte-level BPE)"
            );
            let err = gguf.require_tokenizer().unwrap_err();
            assert!(
                err.to_string().contains(&format!("{arch_dir}.gguf"))
                    && err.to_string().contains(&note),
                "{err}"
            );
            assert_eq!(gguf.sources.len(), 1);
            assert_eq!(gguf.sources[0].name, format!("{arch_dir}.gguf"));
            assert_eq!(
                gguf.sources[0].bytes,
                std::fs::metadata(&path).unwrap().len()
            );
        }
    }

    /// The smallest GGUF `open` accepts: llama metadata and one f32 tensor.
    fn minimal(arch: &str) -> GgufBuilder {
        GgufBuilder::new()
            .kv("general.architecture", s(arch))
            .kv(&format!("{arch}.embedding_length"), GgufValue::U32(8))
            .kv(&format!("{arch}.block_count"), GgufValue::U32(1))
            .kv(&format!("{arch}.feed_forward_length"), GgufValue::U32(16))
            .kv(&format!("{arch}.attention.head_count"), GgufValue::U32(2))
            .kv(
                &format!("{arch}.attention.layer_norm_rms_epsilon"),
                GgufValue::F32(1e-6),
            )
            .kv(&format!("{arch}.context_length"), GgufValue::U64(128))
            .kv(&format!("{arch}.vocab_size"), GgufValue::I32(4))
            .tensor("token_embd.weight", &[8, 4], 0, f32_bytes(&[0.25; 32]))
    }

    #[test]
    fn metadata_values_of_every_type_round_trip() {
        let values = [
            ("a.u8", GgufValue::U8(200)),
            ("a.i8", GgufValue::I8(-5)),
            ("a.u16", GgufValue::U16(60000)),
            ("a.i16", GgufValue::I16(-30000)),
            ("a.u32", GgufValue::U32(4_000_000_000)),
            ("a.i32", GgufValue::I32(-2_000_000_000)),
            ("a.f32", GgufValue::F32(1.5)),
            ("a.bool", GgufValue::Bool(true)),
            ("a.string", s("héllo")),
            ("a.u64", GgufValue::U64(u64::MAX)),
            ("a.i64", GgufValue::I64(i64::MIN)),
            ("a.f64", GgufValue::F64(-2.25)),
            ("a.array", GgufValue::Array(vec![s("x"), s(""), s("z z")])),
            (
                "a.nested",
                GgufValue::Array(vec![
                    GgufValue::Array(vec![GgufValue::I16(1), GgufValue::I16(-1)]),
                    GgufValue::Array(vec![GgufValue::I16(7)]),
                ]),
            ),
            ("a.empty", GgufValue::Array(vec![])),
        ];
        let mut b = minimal("llama");
        for (k, v) in &values {
            b = b.kv(k, v.clone());
        }
        let scratch = ScratchDir::new("gguf-values");
        let file = GgufFile::open(&b.write(scratch.path(), "values.gguf")).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(file.alignment, 32);
        assert_eq!(file.data_offset % 32, 0);
        for (k, v) in &values {
            assert_eq!(file.get(k), Some(v), "{k}");
        }
        assert_eq!(file.get("a.f32").unwrap().as_f64(), Some(1.5));
        // An f32 epsilon widens to the decimal it was written as.
        assert_eq!(GgufValue::F32(1e-5).as_f64(), Some(1e-5));
        let err = file.str_key("a.u8").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "GGUF metadata key a.u8 in {} is u8, expected a string",
                file.path().display()
            )
        );
        let config = file.model_config().unwrap();
        assert_eq!(
            (
                config.vocab_size,
                config.head_dim,
                config.num_key_value_heads
            ),
            (4, 4, 2)
        );
        assert_eq!(config.max_position_embeddings, 128);
        assert!(config.tie_word_embeddings);
    }

    #[test]
    fn rope_metadata_variants() {
        let scratch = ScratchDir::new("gguf-rope");
        let cases: [(GgufBuilder, Result<RopeScaling, &str>); 5] = [
            (minimal("llama"), Ok(RopeScaling::None)),
            (
                minimal("llama")
                    .kv("llama.rope.scaling.type", s("linear"))
                    .kv("llama.rope.scaling.factor", GgufValue::F32(4.0)),
                Ok(RopeScaling::Linear { factor: 4.0 }),
            ),
            (
                minimal("llama").kv("llama.rope.scale_linear", GgufValue::F32(2.0)),
                Ok(RopeScaling::Linear { factor: 2.0 }),
            ),
            (
                minimal("llama").kv("llama.rope.scaling.type", s("yarn")),
                Err("yarn"),
            ),
            (
                minimal("llama").tensor("rope_freqs.weight", &[2], 0, f32_bytes(&[1.0, 8.0])),
                Err("rope_freqs.weight"),
            ),
        ];
        for (i, (builder, expected)) in cases.into_iter().enumerate() {
            let path = builder.write(scratch.path(), &format!("rope{i}.gguf"));
            match (open(&path), expected) {
                (Ok(c), Ok(scaling)) => {
                    assert_eq!(c.config.rope.scaling, scaling, "case {i}");
                    assert_eq!(c.config.rope.theta, 10000.0, "case {i}");
                }
                (Err(ModelError::UnsupportedRope { rope_type, .. }), Err(what)) => {
                    assert!(rope_type.contains(what), "case {i}: {rope_type}")
                }
                (other, _) => panic!("case {i}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() {
        let scratch = ScratchDir::new("gguf-bad");
        let dir = scratch.path();

        // Unsupported ggml type, found when the file is opened.
        let q5 = minimal("llama")
            .tensor("blk.0.attn_q.weight", &[32, 2], 6, vec![0; 44])
            .write(dir, "q5.gguf");
        let err = open(&q5).unwrap_err();
        assert!(
            matches!(&err, ModelError::UnsupportedTensorType { tensor, ggml_type } if tensor == "blk.0.attn_q.weight" && ggml_type == "q5_0"),
            "{err}"
        );
        assert!(
            err.to_string().contains("blk.0.attn_q.weight") && err.to_string().contains("q5_0"),
            "{err}"
        );
        let unknown = minimal("llama")
            .tensor("x", &[4], 99, vec![0; 16])
            .write(dir, "t99.gguf");
        assert!(open(&unknown).unwrap_err().to_string().contains("type 99"));
        // Found by the `gguf` fuzz target: an empty dimension made a Q8_0 projection of no bytes
        // with 2^60 rows, and reading it sized a row order from the rows.
        let empty = minimal("llama")
            .tensor("blk.0.attn_q.weight", &[0, 1 << 60], 8, vec![])
            .write(dir, "empty-dim.gguf");
        let err = open(&empty).unwrap_err().to_string();
        assert!(err.contains("empty dimension"), "{err}");

        // Unsupported architecture.
        let phi = minimal("phi3").write(dir, "phi3.gguf");
        let err = open(&phi).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported architecture gguf:phi3; supported: llama, qwen2, qwen3"
        );

        // Bad magic, unsupported version.
        let mut bytes = minimal("llama").bytes();
        bytes[..4].copy_from_slice(b"GGML");
        std::fs::write(dir.join("magic.gguf"), &bytes).unwrap();
        let err = open(&dir.join("magic.gguf")).unwrap_err();
        assert!(matches!(err, ModelError::BadMagic { .. }), "{err}");
        assert!(
            err.to_string().contains("47 47 4d 4c") && err.to_string().contains("magic.gguf"),
            "{err}"
        );
        let mut old = minimal("llama");
        old.version = 1;
        let err = open(&old.write(dir, "v1.gguf")).unwrap_err();
        assert!(
            matches!(err, ModelError::UnsupportedGgufVersion { version: 1, .. }),
            "{err}"
        );

        // Missing key, wrongly typed key.
        let mut no_eps = minimal("llama");
        no_eps.metadata.retain(|(k, _)| !k.ends_with("epsilon"));
        let err = open(&no_eps.write(dir, "noeps.gguf")).unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingMetadata { key, .. } if key == "llama.attention.layer_norm_rms_epsilon"),
            "{err}"
        );
        let mut bad_type = minimal("llama");
        bad_type.metadata[1].1 = s("576");
        let err = open(&bad_type.write(dir, "badtype.gguf")).unwrap_err();
        assert!(
            matches!(&err, ModelError::MetadataType { key, .. } if key == "llama.embedding_length"),
            "{err}"
        );

        // A tensor table entry pointing past the end, and a misaligned one.
        let mut past_end = minimal("llama").bytes();
        past_end.truncate(past_end.len() - 4);
        std::fs::write(dir.join("short.gguf"), &past_end).unwrap();
        let err = open(&dir.join("short.gguf")).unwrap_err();
        assert!(
            matches!(&err, ModelError::Truncated { what, .. } if what.contains("token_embd.weight")),
            "{err}"
        );
        let mut misaligned = minimal("llama").bytes();
        let name_at = misaligned
            .windows(17)
            .position(|w| w == b"token_embd.weight")
            .unwrap();
        // The offset field follows the name, n_dims, two dims and the type.
        let offset_at = name_at + 17 + 4 + 16 + 4;
        misaligned[offset_at..offset_at + 8].copy_from_slice(&4u64.to_le_bytes());
        std::fs::write(dir.join("misaligned.gguf"), &misaligned).unwrap();
        let err = open(&dir.join("misaligned.gguf")).unwrap_err();
        assert!(
            matches!(&err, ModelError::CorruptGguf { reason, .. } if reason.contains("alignment")),
            "{err}"
        );

        // An absurd array length fails without allocating it.
        let mut huge = minimal("llama")
            .kv("z.array", GgufValue::Array(vec![GgufValue::U64(1)]))
            .bytes();
        let count_at = huge.windows(7).position(|w| w == b"z.array").unwrap() + 7 + 4 + 4;
        huge[count_at..count_at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        std::fs::write(dir.join("huge.gguf"), &huge).unwrap();
        let err = open(&dir.join("huge.gguf")).unwrap_err();
        assert!(matches!(err, ModelError::Truncated { .. }), "{err}");

        // Every prefix of a valid file is an error, never a panic.
        let full = minimal("llama")
            .kv("k", GgufValue::Array(vec![s("a"), s("b")]))
            .bytes();
        let cut_path = dir.join("cut.gguf");
        for cut in 0..full.len() {
            std::fs::write(&cut_path, &full[..cut]).unwrap();
            assert!(open(&cut_path).is_err(), "prefix of {cut} bytes opened");
        }
        std::fs::write(&cut_path, &full).unwrap();
        assert!(open(&cut_path).is_ok());

        // A missing file.
        let missing = dir.join("absent.gguf");
        assert!(matches!(open(&missing), Err(ModelError::NotFound { path }) if path == missing));
    }

    #[test]
    fn truncated_real_file_is_an_error() {
        let full = std::fs::read(smollm2_gguf_path()).unwrap();
        let scratch = ScratchDir::new("gguf-truncated");
        let path = scratch.path().join("head.gguf");
        std::fs::write(&path, &full[..1000]).unwrap();
        let err = open(&path).unwrap_err();
        assert!(
            matches!(&err, ModelError::Truncated { len: 1000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("head.gguf"), "{err}");
    }

    #[test]
    fn smollm2_config_and_tensors() {
        let ckpt = open(&smollm2_gguf_path()).unwrap();
        let c = &ckpt.config;
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.source_architecture, "gguf:llama");
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers
            ),
            (49152, 576, 1536, 30)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (9, 3, 64)
        );
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(
            c.rope,
            RopeConfig {
                theta: 100000.0,
                scaling: RopeScaling::None
            }
        );
        assert_eq!(c.max_position_embeddings, 8192);
        assert!(c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.as_slice()),
            (Some(1), &[2u32][..])
        );

        let names = ckpt.tensors.names();
        assert_eq!(names.len(), 30 * 9 + 2);
        assert!(!names.iter().any(|n| n == "lm_head.weight"));
        let shapes = [
            (
                "model.embed_tokens.weight",
                vec![49152, 576],
                StoredType::Q8_0,
            ),
            ("model.norm.weight", vec![576], StoredType::F32),
            ("input_layernorm.weight", vec![576], StoredType::F32),
            (
                "post_attention_layernorm.weight",
                vec![576],
                StoredType::F32,
            ),
            ("self_attn.q_proj.weight", vec![576, 576], StoredType::Q4_1),
            ("self_attn.k_proj.weight", vec![192, 576], StoredType::Q4_1),
            ("self_attn.v_proj.weight", vec![192, 576], StoredType::Q4_1),
            ("self_attn.o_proj.weight", vec![576, 576], StoredType::Q4_1),
            ("mlp.gate_proj.weight", vec![1536, 576], StoredType::Q4_1),
            ("mlp.up_proj.weight", vec![1536, 576], StoredType::Q4_1),
            ("mlp.down_proj.weight", vec![576, 1536], StoredType::Q4_1),
        ];
        for (name, shape, stored) in shapes {
            let layers: Vec<String> = if name.starts_with("model.") {
                vec![name.to_string()]
            } else {
                (0..30)
                    .map(|l| format!("model.layers.{l}.{name}"))
                    .collect()
            };
            for full in layers {
                let info = ckpt
                    .tensors
                    .info(&full)
                    .unwrap_or_else(|| panic!("no {full}"));
                assert_eq!(
                    (info.shape.clone(), info.stored),
                    (shape.clone(), stored),
                    "{full}"
                );
            }
        }

        let start = std::time::Instant::now();
        let embedding = ckpt.tensors.load_f32("model.embed_tokens.weight").unwrap();
        let elapsed = start.elapsed();
        assert_eq!(embedding.len(), 49152 * 576);
        assert!(embedding.iter().all(|v| v.is_finite()));
        assert!(embedding.iter().any(|v| *v != 0.0));
        // Generous bound for a loaded two-core machine; it takes tens of milliseconds.
        assert!(
            elapsed.as_secs_f64() < 3.0,
            "embedding dequantization took {elapsed:?}"
        );
    }

    #[test]
    fn smollm2_q4_1_blocks_and_qk_rows_match_the_raw_file() {
        let path = smollm2_gguf_path();
        let file = GgufFile::open(&path).unwrap();
        let config = file.model_config().unwrap();
        let raw = |name: &str| {
            let t = file
                .tensors
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .clone();
            file.tensor_bytes(&t).unwrap().to_vec()
        };
        // Decode the first Q4_1 block of ffn_down by hand: d, m, then 16 bytes of nibbles.
        let down = raw("blk.0.ffn_down.weight");
        let d = half::f16::from_le_bytes([down[0], down[1]]).to_f32();
        let m = half::f16::from_le_bytes([down[2], down[3]]).to_f32();
        let mut first_block = [0.0f32; 32];
        for j in 0..16 {
            first_block[j] = (down[4 + j] & 15) as f32 * d + m;
            first_block[j + 16] = (down[4 + j] >> 4) as f32 * d + m;
        }
        let tensors = GgufTensors::new(GgufFile::open(&path).unwrap(), &config).unwrap();
        let loaded = tensors
            .load_f32("model.layers.0.mlp.down_proj.weight")
            .unwrap();
        assert_eq!(&loaded[..32], &first_block);

        // q_proj rows come back in HF order: HF row h*64 + t*32 + i is stored row h*64 + 2i + t.
        let cols = 576;
        let mut stored = vec![0.0f32; 576 * cols];
        dequantize(StoredType::Q4_1, &raw("blk.0.attn_q.weight"), &mut stored).unwrap();
        let q = tensors
            .load_f32("model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        for (h, t, i) in [(0, 0, 0), (0, 1, 0), (0, 0, 5), (4, 1, 31), (8, 1, 17)] {
            let hf_row = h * 64 + t * 32 + i;
            let stored_row = h * 64 + 2 * i + t;
            assert_eq!(
                &q[hf_row * cols..][..cols],
                &stored[stored_row * cols..][..cols],
                "head {h} t {t} i {i}"
            );
        }
        assert_ne!(q, stored);
        // v_proj is not permuted.
        let mut v = vec![0.0f32; 192 * cols];
        dequantize(StoredType::Q4_1, &raw("blk.0.attn_v.weight"), &mut v).unwrap();
        assert_eq!(
            tensors
                .load_f32("model.layers.0.self_attn.v_proj.weight")
                .unwrap(),
            v
        );
    }

    #[test]
    fn smollm2_tokenizer_matches_the_golden_prompt_ids() {
        let ckpt = open(&smollm2_gguf_path()).unwrap();
        assert!(ckpt.tokenizer_note.is_none());
        let spec = ckpt.require_tokenizer().unwrap();
        assert_eq!(spec.bos_token.as_deref(), Some("<|im_start|>"));
        assert_eq!(spec.eos_token.as_deref(), Some("<|im_end|>"));
        let template = spec.chat_template.as_deref().unwrap();
        assert!(template.contains("<|im_start|>"), "{template}");

        let tokenizer = tokenizers::Tokenizer::from_str(&spec.tokenizer_json).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), 49152);
        let golden_path = workspace_root().join("tests/golden/smollm2/golden.json");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(golden_path).unwrap()).unwrap();
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() >= 4);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let text = case["text"].as_str().unwrap();
            let expected: Vec<u32> = case["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let encoding = tokenizer.encode(text, true).unwrap();
            assert_eq!(encoding.get_ids(), expected.as_slice(), "{name}");
            assert_eq!(tokenizer.decode(&expected, false).unwrap(), text, "{name}");
        }
    }
}
