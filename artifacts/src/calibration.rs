//! `calibration`: the statistics file `fdrt calibrate` writes and `fdc compile --calibration`
//! reads (`docs/QUANTIZATION.md`), the way `llama-imatrix` feeds `llama-quantize --imatrix`.
//!
//! For each matmul weight of the plan it ran, by the weight's name in the plan (fused weights
//! such as `q_proj+k_proj+v_proj` read one input and have one entry), the file holds the Gram
//! matrix of the weight's inputs over the calibration tokens, `G = sum_t x_t x_t^T` (`[K, K]`,
//! accumulated in f64, stored as its upper triangle in f32), and the largest `|x|` per input
//! channel. GPTQ's Hessian is `2 G`.
//!
//! Layout: the magic `FDCALIB\0`, a little-endian u32 format version, the BLAKE3 hash of the
//! payload, then the payload: [`Calibration`] in bincode 2 (`codec`'s configuration). The file
//! is read whole (statistics of a 135M-parameter model are about 200 MB).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// First bytes of a calibration file.
pub const CALIBRATION_MAGIC: [u8; 8] = *b"FDCALIB\0";
/// Version of the layout above and of [`Calibration`].
pub const CALIBRATION_VERSION: u32 = 1;

/// Input statistics of a model's matmuls over a calibration text.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The model's name in the plan the statistics came from.
    pub model: String,
    /// Tokens of text run through the model.
    pub tokens: u64,
    /// BLAKE3 of the calibration text, lower-case hex.
    pub text_blake3: String,
    /// One entry per matmul weight, in program order.
    pub inputs: Vec<InputStats>,
}

/// The inputs one matmul weight saw.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct InputStats {
    /// The weight's name in the plan (`model.layers.0.mlp.gate_proj+up_proj.weight`).
    pub weight: String,
    /// Input features (the weight's K).
    pub k: u64,
    /// Input rows summed (tokens, counted once per matmul call that saw them).
    pub rows: u64,
    /// Upper triangle of `sum_t x_t x_t^T`, row by row: `G[i][i..K]` for `i` in `0..K`,
    /// `K (K + 1) / 2` values.
    pub gram_upper: Vec<f32>,
    /// `max_t |x_t[i]|` per input channel (`K` values).
    pub abs_max: Vec<f32>,
}

impl InputStats {
    /// The full symmetric Gram matrix, `[K, K]` row-major, in f64.
    pub fn gram(&self) -> Vec<f64> {
        let k = self.k as usize;
        let mut g = vec![0f64; k * k];
        let mut at = 0;
        for i in 0..k {
            for j in i..k {
                let v = self.gram_upper.get(at).copied().unwrap_or(0.0) as f64;
                g[i * k + j] = v;
                g[j * k + i] = v;
                at += 1;
            }
        }
        g
    }
}

/// The statistics are hundreds of megabytes of numbers: debug output shows their shape only.
impl std::fmt::Debug for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calibration")
            .field("model", &self.model)
            .field("tokens", &self.tokens)
            .field("text_blake3", &self.text_blake3)
            .field("inputs", &self.inputs.len())
            .finish()
    }
}

/// Why a calibration file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("cannot access calibration file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a calibration file (bad magic); write one with fdrt calibrate", path.display())]
    NotCalibration { path: PathBuf },
    #[error("{} has calibration format version {found}, this build reads {CALIBRATION_VERSION}: run fdrt calibrate again", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{} failed its checksum: the file is corrupt; run fdrt calibrate again", path.display())]
    Checksum { path: PathBuf },
    #[error("{} could not be decoded ({message}); run fdrt calibrate again", path.display())]
    Decode { path: PathBuf, message: String },
    #[error("{}: statistics of {weight} have {found} values, K = {k} needs {expected}", path.display())]
    Shape {
        path: PathBuf,
        weight: String,
        k: u64,
        found: usize,
        expected: usize,
    },
}

const HEADER_LEN: usize = 8 + 4 + 32;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

impl Calibration {
    /// Writes the file (to a temporary name, then renamed, like plans).
    pub fn write(&self, path: &Path) -> Result<(), CalibrationError> {
        let io = |source| CalibrationError::Io {
            path: path.to_path_buf(),
            source,
        };
        let payload = bincode::serde::encode_to_vec(self, config()).map_err(|e| {
            CalibrationError::Decode {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&CALIBRATION_MAGIC);
        bytes.extend_from_slice(&CALIBRATION_VERSION.to_le_bytes());
        bytes.extend_from_slice(blake3::hash(&payload).as_bytes());
        bytes.extend_from_slice(&payload);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads and checks a file: magic, version, checksum, and every entry's sizes against its K.
    pub fn read(path: &Path) -> Result<Calibration, CalibrationError> {
        let bytes = std::fs::read(path).map_err(|source| CalibrationError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    fn from_bytes(bytes: &[u8], path: &Path) -> Result<Calibration, CalibrationError> {
        let path = || path.to_path_buf();
        if bytes.len() < HEADER_LEN || bytes[..8] != CALIBRATION_MAGIC {
            return Err(CalibrationError::NotCalibration { path: path() });
        }
        let found = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if found != CALIBRATION_VERSION {
            return Err(CalibrationError::Version {
                path: path(),
                found,
            });
        }
        let payload = &bytes[HEADER_LEN..];
        if blake3::hash(payload).as_bytes() != &bytes[12..HEADER_LEN] {
            return Err(CalibrationError::Checksum { path: path() });
        }
        let (calibration, read): (Calibration, usize) =
            bincode::serde::decode_from_slice(payload, config()).map_err(|e| {
                CalibrationError::Decode {
                    path: path(),
                    message: e.to_string(),
                }
            })?;
        if read != payload.len() {
            return Err(CalibrationError::Decode {
                path: path(),
                message: format!("{} trailing bytes", payload.len() - read),
            });
        }
        for input in &calibration.inputs {
            let k = input.k as usize;
            for (found, expected) in [
                (input.gram_upper.len(), k * (k + 1) / 2),
                (input.abs_max.len(), k),
            ] {
                if found != expected {
                    return Err(CalibrationError::Shape {
                        path: path(),
                        weight: input.weight.clone(),
                        k: input.k,
                        found,
                        expected,
                    });
                }
            }
        }
        Ok(calibration)
    }

    /// The statistics of the weight named `weight`, if any.
    pub fn input(&self, weight: &str) -> Option<&InputStats> {
        self.inputs.iter().find(|i| i.weight == weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Calibration {
        Calibration {
            model: "tiny".into(),
            tokens: 3,
            text_blake3: "00".into(),
            inputs: vec![InputStats {
                weight: "w".into(),
                k: 2,
                rows: 3,
                gram_upper: vec![1.0, 2.0, 5.0],
                abs_max: vec![1.0, 2.0],
            }],
        }
    }

    #[test]
    fn round_trip_and_full_gram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.calib");
        sample().write(&path).unwrap();
        let back = Calibration::read(&path).unwrap();
        assert!(back == sample());
        assert_eq!(back.inputs[0].gram(), vec![1.0, 2.0, 2.0, 5.0]);
    }

    #[test]
    fn damaged_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.calib");
        sample().write(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut version = good.clone();
        version[8] = 9;
        let mut short = sample();
        short.inputs[0].gram_upper.pop();
        let cases: [(&str, Vec<u8>, &str); 4] = [
            (
                "not ours",
                b"FDP plan bytes, not statistics of any kind".to_vec(),
                "bad magic",
            ),
            ("flipped", flipped, "checksum"),
            ("version", version, "version 9"),
            (
                "short",
                {
                    short.write(&path).unwrap();
                    std::fs::read(&path).unwrap()
                },
                "K = 2 needs 3",
            ),
        ];
        for (label, bytes, needle) in cases {
            let err = Calibration::from_bytes(&bytes, &path)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{label}: {err}");
        }
    }
}
