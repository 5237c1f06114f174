//! Random-weight checkpoints for any supported config (`fdc synth`): benchmarks and tests at
//! realistic shapes without downloading a model.
//!
//! The tensors are exactly those the architecture's graph builder reads, found by running the
//! builder against a source that answers every question with the shape the builder expects, so
//! the list can never drift from what `fdc compile` needs. Values are seeded and small: matrices
//! uniform in `±sqrt(3 / cols) / 2` (activations keep about half their scale through a layer),
//! norm weights 1, biases 0. Tensors are generated one at a time as the file is written, so
//! memory stays at one tensor however large the model.

use crate::checkpoint::{StoredType, TensorInfo, TensorSource};
use crate::{ModelConfig, ModelError};
use half::bf16;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a synthesized checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSummary {
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    pub weights_file: PathBuf,
}

/// A source with no data that records what the builder asks for, in order.
struct ExpectedTensors {
    seen: Mutex<Vec<(String, Vec<usize>)>>,
}

impl TensorSource for ExpectedTensors {
    fn names(&self) -> Vec<String> {
        vec![]
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        let seen = self.seen.lock().ok()?;
        seen.iter()
            .find(|(n, _)| n == name)
            .map(|(_, shape)| TensorInfo {
                shape: shape.clone(),
                stored: StoredType::F32,
            })
    }

    fn info_expecting(&self, name: &str, shape: &[usize]) -> Option<TensorInfo> {
        if let Ok(mut seen) = self.seen.lock() {
            if !seen.iter().any(|(n, _)| n == name) {
                seen.push((name.to_string(), shape.to_vec()));
            }
        }
        Some(TensorInfo {
            shape: shape.to_vec(),
            stored: StoredType::F32,
        })
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        Err(ModelError::TensorNotFound {
            name: name.to_string(),
        })
    }
}

/// Every tensor (name, shape) the builder of `config` reads, in the order it reads them.
pub fn expected_tensors(config: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    let source = ExpectedTensors {
        seen: Mutex::new(vec![]),
    };
    crate::arch::build_graph("synth", config, &source)?;
    Ok(source.seen.into_inner().unwrap_or_default())
}

/// One tensor, generated when the writer asks for its bytes.
struct RandomTensor {
    shape: Vec<usize>,
    dtype: Dtype,
    seed: u64,
    kind: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    Ones,
    Zeros,
    Uniform(f32),
}

impl RandomTensor {
    fn values(&self) -> impl Iterator<Item = f32> + '_ {
        let mut state = self.seed;
        let len: usize = self.shape.iter().product();
        (0..len).map(move |_| match self.kind {
            Fill::Ones => 1.0,
            Fill::Zeros => 0.0,
            Fill::Uniform(bound) => (unit(&mut state) * 2.0 - 1.0) * bound,
        })
    }
}

/// splitmix64 (a tiny, well-known mixer; no dependency for a seeded stream), as a float in
/// [0, 1) from the top 24 bits.
fn unit(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

impl View for RandomTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut bytes = Vec::with_capacity(self.data_len());
        match self.dtype {
            Dtype::BF16 => {
                for v in self.values() {
                    bytes.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
            }
            _ => {
                for v in self.values() {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        let size = if self.dtype == Dtype::BF16 { 2 } else { 4 };
        self.shape.iter().product::<usize>() * size
    }
}

/// Writes `config.json` (a copy of `config_path`) and `model.safetensors` with random weights
/// for it into `out_dir`, matrices in bf16 if `bf16`, else f32; vectors are always f32.
pub fn synthesize(
    config_path: &Path,
    out_dir: &Path,
    seed: u64,
    bf16: bool,
) -> Result<SynthSummary, ModelError> {
    let config = ModelConfig::from_hf_file(config_path)?;
    let tensors = expected_tensors(&config)?;
    std::fs::create_dir_all(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
    let config_out = out_dir.join("config.json");
    std::fs::copy(config_path, &config_out).map_err(|e| ModelError::io(&config_out, e))?;
    let mut parameters = 0u64;
    let mut bytes = 0u64;
    let mut views = Vec::with_capacity(tensors.len());
    for (index, (name, shape)) in tensors.iter().enumerate() {
        let matrix = shape.len() >= 2;
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let kind = if matrix {
            Fill::Uniform((3.0 / cols as f32).sqrt() * 0.5)
        } else if name.ends_with("norm.weight") {
            Fill::Ones
        } else {
            Fill::Zeros
        };
        let tensor = RandomTensor {
            shape: shape.clone(),
            dtype: if matrix && bf16 {
                Dtype::BF16
            } else {
                Dtype::F32
            },
            seed: seed ^ (index as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
            kind,
        };
        parameters += shape.iter().product::<usize>() as u64;
        bytes += tensor.data_len() as u64;
        views.push((name.clone(), tensor));
    }
    let weights_file = out_dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &weights_file).map_err(|e| {
        ModelError::InvalidSafetensors {
            file: weights_file.clone(),
            reason: e.to_string(),
        }
    })?;
    Ok(SynthSummary {
        tensors: tensors.len(),
        parameters,
        bytes,
        weights_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthesized_checkpoint_has_every_tensor_the_builder_reads() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/tiny");
        let out = tempfile::tempdir().unwrap();
        for arch in ["llama", "qwen3_moe", "deepseek_v3"] {
            let dir = out.path().join(arch);
            let summary = synthesize(
                &golden.join(arch).join("config.json"),
                &dir,
                7,
                arch == "qwen3_moe",
            )
            .unwrap();
            let checkpoint = crate::checkpoint::open(&dir).unwrap();
            assert_eq!(checkpoint.tensors.names().len(), summary.tensors, "{arch}");
            crate::arch::build_graph(arch, &checkpoint.config, checkpoint.tensors.as_ref())
                .unwrap();
            let first = &checkpoint.tensors.names()[0];
            let values = checkpoint.tensors.load_f32(first).unwrap();
            assert!(values.iter().all(|v| v.is_finite() && v.abs() <= 1.0));
        }
    }
}
