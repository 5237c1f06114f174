//! HF checkpoint directories: config.json, weights in `model.safetensors` or in shards listed by
//! `model.safetensors.index.json`, and the tokenizer files. Each weight file is memory-mapped
//! and its header parsed by the `safetensors` crate; tensors are converted to f32 only when
//! asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use crate::checkpoint::{map_file, Checkpoint, SourceFile, StoredType, TensorInfo, TensorSource};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::tokenizer::read_hf_tokenizer;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Opens an HF checkpoint directory.
pub(crate) fn open_dir(dir: &Path) -> Result<Checkpoint, ModelError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(ModelError::MissingFile {
            dir: dir.to_path_buf(),
            file: "config.json".to_string(),
        });
    }
    let config_bytes = std::fs::read(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let config_text =
        std::str::from_utf8(&config_bytes).map_err(|_| ModelError::InvalidConfig {
            file: config_path.clone(),
            field: "(file)".to_string(),
            reason: "not UTF-8 text".to_string(),
        })?;
    let config = ModelConfig::from_hf_json(config_text, &config_path)?;
    let mut sources = vec![SourceFile::of_bytes(&config_path, &config_bytes)];

    let (tensors, weight_sources) = SafetensorsTensors::open_dir(dir)?;
    sources.extend(weight_sources);

    let tokenizer = read_hf_tokenizer(dir)?;
    sources.extend(tokenizer.sources);

    Ok(Checkpoint {
        config,
        tensors: Box::new(tensors),
        tokenizer: tokenizer.spec,
        tokenizer_note: tokenizer.note,
        sources,
    })
}

/// Where one tensor lives: which mapped file, which byte range, and how it is stored.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    start: usize,
    end: usize,
    shape: Vec<usize>,
    stored: StoredType,
}

/// The tensors of one or more safetensors files, mapped, indexed by name.
pub struct SafetensorsTensors {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: BTreeMap<String, Entry>,
}

impl SafetensorsTensors {
    /// The weights of an HF directory: the shard index when present, else model.safetensors.
    /// Also returns each weight file (and the index) for provenance.
    pub fn open_dir(dir: &Path) -> Result<(Self, Vec<SourceFile>), ModelError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            let index_bytes =
                std::fs::read(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let weight_map = parse_index(&index_bytes, &index_path)?;
            let shard_names: BTreeSet<&str> = weight_map.values().map(String::as_str).collect();
            let paths: Vec<PathBuf> = shard_names.iter().map(|n| dir.join(n)).collect();
            let tensors = Self::open_files(&paths)?;
            for (name, shard) in &weight_map {
                let found = tensors
                    .entries
                    .get(name)
                    .map(|e| tensors.paths[e.file].as_path());
                if found != Some(dir.join(shard).as_path()) {
                    return Err(ModelError::InvalidIndex {
                        file: index_path.clone(),
                        reason: format!(
                            "tensor {name} is listed in {shard} but that file does not hold it"
                        ),
                    });
                }
            }
            let mut sources = vec![SourceFile::of_bytes(&index_path, &index_bytes)];
            sources.extend(tensors.sources());
            return Ok((tensors, sources));
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            let tensors = Self::open_files(&[single])?;
            let sources = tensors.sources();
            return Ok((tensors, sources));
        }
        let hint = if dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists()
        {
            " (pytorch_model.bin is not supported; convert the checkpoint to safetensors)"
        } else {
            ""
        };
        Err(ModelError::MissingWeights {
            dir: dir.to_path_buf(),
            hint: hint.to_string(),
        })
    }

    /// Maps and indexes the given safetensors files. A tensor name in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (file_index, path) in paths.iter().enumerate() {
            let map = map_file(path)?;
            let invalid = |reason: String| ModelError::InvalidSafetensors {
                file: path.clone(),
                reason,
            };
            // read_metadata checks the header and that the offsets tile the data section and end
            // exactly at the end of the file, so a truncated file is rejected here.
            let (header_len, metadata) =
                SafeTensors::read_metadata(&map).map_err(|e| invalid(describe(&e)))?;
            let data_start = 8usize
                .checked_add(header_len)
                .ok_or_else(|| invalid("header length overflows".to_string()))?;
            // Sorted, so that of several bad tensors the same one is reported every time.
            let mut infos: Vec<_> = metadata.tensors().into_iter().collect();
            infos.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, info) in infos {
                let stored = match info.dtype {
                    Dtype::F32 => StoredType::F32,
                    Dtype::F16 => StoredType::F16,
                    Dtype::BF16 => StoredType::BF16,
                    other => {
                        return Err(ModelError::UnsupportedDtype {
                            file: path.clone(),
                            tensor: name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let (begin, end) = info.data_offsets;
                let range = data_start
                    .checked_add(begin)
                    .zip(data_start.checked_add(end))
                    .filter(|&(s, e)| s <= e && e <= map.len());
                let Some((start, end)) = range else {
                    return Err(invalid(format!("tensor {name} lies outside the file")));
                };
                let entry = Entry {
                    file: file_index,
                    start,
                    end,
                    shape: info.shape.clone(),
                    stored,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(invalid(format!(
                        "tensor {name} also appears in an earlier file"
                    )));
                }
            }
            maps.push(map);
        }
        Ok(SafetensorsTensors {
            paths: paths.to_vec(),
            maps,
            entries,
        })
    }

    fn sources(&self) -> Vec<SourceFile> {
        self.paths
            .iter()
            .zip(&self.maps)
            .map(|(path, map)| SourceFile::of_bytes(path, map))
            .collect()
    }
}

/// The `weight_map` of a shard index: tensor name -> shard file name.
fn parse_index(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, String>, ModelError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|source| ModelError::Json {
        file: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| ModelError::InvalidIndex {
        file: path.to_path_buf(),
        reason,
    };
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("no weight_map object".to_string()))?;
    let mut weight_map = BTreeMap::new();
    for (name, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| invalid(format!("weight_map entry {name} is not a file name")))?;
        // A shard is a file beside the index; anything with a directory part could point
        // anywhere.
        if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(invalid(format!(
                "weight_map entry {name} names {shard:?}, not a file in the same directory"
            )));
        }
        weight_map.insert(name.clone(), shard.to_string());
    }
    if weight_map.is_empty() {
        return Err(invalid("weight_map is empty".to_string()));
    }
    Ok(weight_map)
}

fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::InvalidHeaderLength => {
            format!("{e}: the file is not as long as its header says (truncated?)")
        }
        SafeTensorError::HeaderTooSmall => {
            format!("{e}: the file is shorter than the 8-byte header length")
        }
        _ => e.to_string(),
    }
}

impl TensorSource for SafetensorsTensors {
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
        let bytes = self
            .maps
            .get(entry.file)
            .and_then(|m| m.get(entry.start..entry.end));
        let Some(bytes) = bytes else {
            return Err(ModelError::InvalidSafetensors {
                file: self.paths.get(entry.file).cloned().unwrap_or_default(),
                reason: format!("tensor {name} lies outside the file"),
            });
        };
        Ok(match entry.stored {
            StoredType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            StoredType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            StoredType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    file: self.paths.get(entry.file).cloned().unwrap_or_default(),
                    tensor: name.to_string(),
                    dtype: other.to_string(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::open;
    use crate::testing::{workspace_root, ScratchDir};
    use safetensors::tensor::TensorView;

    fn tiny_dir(arch: &str) -> PathBuf {
        workspace_root().join("tests/golden/tiny").join(arch)
    }

    /// Every tensor of a checkpoint as (name, shape, f32 values).
    fn all_tensors(source: &dyn TensorSource) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        source
            .names()
            .into_iter()
            .map(|n| {
                let info = source.info(&n).unwrap();
                let data = source.load_f32(&n).unwrap();
                (n, info.shape, data)
            })
            .collect()
    }

    fn le_bytes<T: Copy, const N: usize>(values: &[T], to_bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|v| to_bytes(*v)).collect()
    }

    /// Writes `tensors` as one safetensors file.
    fn write_file(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, dtype, shape, bytes)| {
                (
                    n.clone(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn tiny_checkpoints_open_with_expected_tensors() {
        for arch in ["llama", "llama3_rope", "qwen2", "qwen3"] {
            let ckpt = open(&tiny_dir(arch)).unwrap();
            let names = ckpt.tensors.names();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "{arch}: names sorted");

            let layer0 = |suffix: &str| format!("model.layers.0.{suffix}");
            let head_dim = ckpt.config.head_dim;
            let expected_shapes = [
                ("model.embed_tokens.weight".to_string(), vec![320, 64]),
                ("model.norm.weight".to_string(), vec![64]),
                (layer0("self_attn.q_proj.weight"), vec![4 * head_dim, 64]),
                (layer0("self_attn.k_proj.weight"), vec![2 * head_dim, 64]),
                (layer0("self_attn.o_proj.weight"), vec![64, 4 * head_dim]),
                (layer0("mlp.gate_proj.weight"), vec![128, 64]),
                (layer0("mlp.down_proj.weight"), vec![64, 128]),
            ];
            for (name, shape) in expected_shapes {
                let info = ckpt
                    .tensors
                    .info(&name)
                    .unwrap_or_else(|| panic!("{arch}: no {name}"));
                assert_eq!(info.shape, shape, "{arch} {name}");
                assert_eq!(info.stored, StoredType::F32, "{arch} {name}");
                let data = ckpt.tensors.load_f32(&name).unwrap();
                assert_eq!(data.len(), info.num_elements(), "{arch} {name}");
                assert!(data.iter().all(|v| v.is_finite()), "{arch} {name}");
            }
            let has = |n: &str| names.iter().any(|x| x == n);
            assert_eq!(
                has("lm_head.weight"),
                !ckpt.config.tie_word_embeddings,
                "{arch}"
            );
            assert_eq!(
                has(&layer0("self_attn.q_proj.bias")),
                ckpt.config.attention_bias,
                "{arch}"
            );
            assert_eq!(
                has(&layer0("self_attn.q_norm.weight")),
                ckpt.config.qk_norm,
                "{arch}"
            );
            assert!(
                ckpt.tokenizer.is_none() && ckpt.tokenizer_note.is_none(),
                "{arch}"
            );

            let source_names: Vec<&str> = ckpt.sources.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(source_names, ["config.json", "model.safetensors"], "{arch}");
            let weights_len = std::fs::metadata(tiny_dir(arch).join("model.safetensors"))
                .unwrap()
                .len();
            assert_eq!(ckpt.sources[1].bytes, weights_len, "{arch}");
            assert_eq!(ckpt.sources[1].blake3.len(), 64, "{arch}");
            let err = ckpt.require_tokenizer().unwrap_err();
            assert!(err.to_string().contains("ships no tokenizer"), "{err}");
        }
    }

    #[test]
    fn f32_values_match_the_raw_file_bytes() {
        // Read one tensor's bytes straight from the file by its header offsets.
        let path = tiny_dir("llama").join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor("model.layers.1.mlp.up_proj.weight").unwrap();
        let expected: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let tensors = SafetensorsTensors::open_files(&[path]).unwrap();
        assert_eq!(
            tensors
                .load_f32("model.layers.1.mlp.up_proj.weight")
                .unwrap(),
            expected
        );
        assert!(matches!(
            tensors.load_f32("model.layers.9.mlp.up_proj.weight"),
            Err(ModelError::TensorNotFound { name }) if name == "model.layers.9.mlp.up_proj.weight"
        ));
        assert!(tensors.info("nope").is_none());
    }

    #[test]
    fn sharded_checkpoint_loads_identically() {
        let original = open(&tiny_dir("llama")).unwrap();
        let tensors = all_tensors(original.tensors.as_ref());

        let scratch = ScratchDir::new("sharded");
        let dir = scratch.path();
        std::fs::copy(
            tiny_dir("llama").join("config.json"),
            dir.join("config.json"),
        )
        .unwrap();
        let (first, second): (Vec<_>, Vec<_>) =
            tensors.iter().enumerate().partition(|(i, _)| i % 2 == 0);
        let mut weight_map = serde_json::Map::new();
        for (shard, part) in [
            ("model-00001-of-00002.safetensors", first),
            ("model-00002-of-00002.safetensors", second),
        ] {
            let owned: Vec<_> = part
                .iter()
                .map(|(_, (n, shape, data))| {
                    (
                        n.clone(),
                        Dtype::F32,
                        shape.clone(),
                        le_bytes(data, f32::to_le_bytes),
                    )
                })
                .collect();
            for (n, ..) in &owned {
                weight_map.insert(n.clone(), Value::String(shard.to_string()));
            }
            write_file(&dir.join(shard), &owned);
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();

        let sharded = open(dir).unwrap();
        assert_eq!(all_tensors(sharded.tensors.as_ref()), tensors);
        let source_names: Vec<&str> = sharded.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            source_names,
            [
                "config.json",
                INDEX_FILE,
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );

        // An index that puts a tensor in the wrong shard is caught.
        let mut wrong = index.clone();
        let first_name = tensors[0].0.clone();
        wrong["weight_map"][&first_name] =
            Value::String("model-00002-of-00002.safetensors".to_string());
        std::fs::write(dir.join(INDEX_FILE), wrong.to_string()).unwrap();
        let err = open(dir).unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidIndex { reason, .. } if reason.contains(&first_name)),
            "{err}"
        );

        // A shard outside the directory is refused.
        let mut escape = index.clone();
        escape["weight_map"][&first_name] = Value::String("../model.safetensors".to_string());
        std::fs::write(dir.join(INDEX_FILE), escape.to_string()).unwrap();
        assert!(matches!(open(dir), Err(ModelError::InvalidIndex { .. })));

        // A missing shard is named.
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        let err = open(dir).unwrap_err();
        assert!(
            err.to_string().contains("model-00002-of-00002.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn f16_and_bf16_copies_load_within_their_rounding() {
        let original = open(&tiny_dir("qwen3")).unwrap();
        let tensors = all_tensors(original.tensors.as_ref());
        type Round = fn(f32) -> (u16, f32);
        let kinds: [(Dtype, StoredType, Round, f32); 2] = [
            (
                Dtype::F16,
                StoredType::F16,
                |x| {
                    let h = half::f16::from_f32(x);
                    (h.to_bits(), h.to_f32())
                },
                2f32.powi(-11),
            ),
            (
                Dtype::BF16,
                StoredType::BF16,
                |x| {
                    let h = half::bf16::from_f32(x);
                    (h.to_bits(), h.to_f32())
                },
                2f32.powi(-8),
            ),
        ];
        for (dtype, stored, round, relative) in kinds {
            let scratch = ScratchDir::new("half-copy");
            let dir = scratch.path();
            std::fs::copy(
                tiny_dir("qwen3").join("config.json"),
                dir.join("config.json"),
            )
            .unwrap();
            let converted: Vec<_> = tensors
                .iter()
                .map(|(n, shape, data)| {
                    let bits: Vec<u16> = data.iter().map(|x| round(*x).0).collect();
                    (
                        n.clone(),
                        dtype,
                        shape.clone(),
                        le_bytes(&bits, u16::to_le_bytes),
                    )
                })
                .collect();
            write_file(&dir.join(SINGLE_FILE), &converted);
            let copy = open(dir).unwrap();
            for (name, shape, data) in &tensors {
                let info = copy.tensors.info(name).unwrap();
                assert_eq!((&info.shape, info.stored), (shape, stored), "{name}");
                let loaded = copy.tensors.load_f32(name).unwrap();
                assert_eq!(loaded.len(), data.len());
                for (x, y) in data.iter().zip(&loaded) {
                    // Exactly the rounded value, which is within half an ulp of the original.
                    assert_eq!(*y, round(*x).1, "{name} {dtype:?}");
                    assert!(
                        (x - y).abs() <= x.abs() * relative + 1e-7,
                        "{name} {dtype:?}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn unsupported_dtype_truncation_and_missing_files_are_errors() {
        let scratch = ScratchDir::new("st-errors");
        let dir = scratch.path();

        let ints = scratch.path().join("ints.safetensors");
        write_file(
            &ints,
            &[(
                "model.counts".to_string(),
                Dtype::I32,
                vec![2],
                le_bytes(&[1i32, 2], i32::to_le_bytes),
            )],
        );
        let err = SafetensorsTensors::open_files(std::slice::from_ref(&ints))
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(&err, ModelError::UnsupportedDtype { tensor, dtype, file } if tensor == "model.counts" && dtype == "I32" && file == &ints),
            "{err}"
        );

        let full = std::fs::read(tiny_dir("llama").join("model.safetensors")).unwrap();
        for cut in [0, 5, 100, full.len() / 2, full.len() - 1] {
            let truncated = dir.join("truncated.safetensors");
            std::fs::write(&truncated, &full[..cut]).unwrap();
            let err = SafetensorsTensors::open_files(std::slice::from_ref(&truncated))
                .map(|_| ())
                .unwrap_err();
            assert!(
                matches!(&err, ModelError::InvalidSafetensors { file, .. } if file == &truncated),
                "cut {cut}: {err}"
            );
        }

        // Directory errors: no config, unreadable config, no weights.
        let err = open(dir).unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingFile { file, .. } if file == "config.json"),
            "{err}"
        );
        std::fs::write(dir.join("config.json"), "{\"architectures\": [").unwrap();
        let err = open(dir).unwrap_err();
        assert!(
            matches!(&err, ModelError::Json { file, .. } if file.ends_with("config.json")),
            "{err}"
        );
        std::fs::copy(
            tiny_dir("llama").join("config.json"),
            dir.join("config.json"),
        )
        .unwrap();
        let err = open(dir).unwrap_err();
        assert!(matches!(err, ModelError::MissingWeights { .. }), "{err}");
        std::fs::write(dir.join("pytorch_model.bin"), b"").unwrap();
        let err = open(dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("pytorch_model.bin is not supported"),
            "{err}"
        );
        std::fs::write(dir.join(INDEX_FILE), "{\"weight_map\": {}}").unwrap();
        let err = open(dir).unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidIndex { reason, .. } if reason.contains("empty")),
            "{err}"
        );
    }
}
