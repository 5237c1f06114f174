//! Checkpoints written by the tests themselves: a Llama of any size with pseudo-random weights
//! (for load-memory measurements), and a perturbed copy of a checkpoint (same structure, new
//! values: the shape of a weight snapshot in a reinforcement-learning loop).
//!
//! The safetensors file is written by hand, one tensor at a time, rather than with
//! `safetensors::serialize_to_file`, which needs every tensor in memory at once: a 470 MB
//! checkpoint would then double the memory the measurement is about.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

/// The dimensions of a synthetic Llama.
#[derive(Clone, Copy, Debug)]
pub struct LlamaShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl LlamaShape {
    /// Tensor names and shapes, as an HF Llama checkpoint has them.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, d) = (self.hidden, self.intermediate, self.hidden / self.heads);
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![self.vocab, h]),
            ("model.norm.weight".to_string(), vec![h]),
            ("lm_head.weight".to_string(), vec![self.vocab, h]),
        ];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
                (
                    format!("{p}.self_attn.k_proj.weight"),
                    vec![self.kv_heads * d, h],
                ),
                (
                    format!("{p}.self_attn.v_proj.weight"),
                    vec![self.kv_heads * d, h],
                ),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            ]);
        }
        out
    }

    /// Writes `config.json` and `model.safetensors` (f32) into `dir`.
    pub fn write_checkpoint(&self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("checkpoint directory");
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
        });
        std::fs::write(dir.join("config.json"), config.to_string()).expect("config.json");
        let tensors = self.tensors();
        write_safetensors(
            &dir.join("model.safetensors"),
            &tensors,
            |index, name, out| {
                if name.ends_with("norm.weight") {
                    out.fill(1.0);
                } else {
                    let mut state = 0x9e37_79b9u32 ^ (index as u32).wrapping_mul(0x85eb_ca6b);
                    for v in out.iter_mut() {
                        // xorshift32: cheap, deterministic values in [-0.02, 0.02).
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        *v = (state as f32 / u32::MAX as f32 - 0.5) * 0.04;
                    }
                }
            },
        );
    }
}

/// Writes an f32 safetensors file: `tensors` in order, each filled by `fill(index, name, out)`
/// into a buffer of its size, so that only one tensor is in memory at a time.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    mut fill: impl FnMut(usize, &str, &mut [f32]),
) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string();
    // The data must start 8-byte aligned.
    while !(header.len() + 8).is_multiple_of(8) {
        header.push(' ');
    }
    let file = std::fs::File::create(path).expect("safetensors file");
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    out.write_all(header.as_bytes()).unwrap();
    let mut buffer = vec![];
    for (index, (name, shape)) in tensors.iter().enumerate() {
        buffer.clear();
        buffer.resize(shape.iter().product(), 0.0f32);
        fill(index, name, &mut buffer);
        for v in &buffer {
            out.write_all(&v.to_le_bytes()).unwrap();
        }
    }
    out.flush().unwrap();
}

/// Copies the checkpoint directory `from` to `to` with every weight `w` replaced by
/// `w * scale + offset * sin(i)` (element `i`): same names and shapes, other values.
pub fn perturbed_copy(from: &Path, to: &Path, scale: f32, offset: f32) {
    rewritten_copy(from, to, |_, original, out| {
        for (i, (v, &w)) in out.iter_mut().zip(original).enumerate() {
            *v = w * scale + offset * (i as f32).sin();
        }
    });
}

/// Copies the f32 checkpoint directory `from` (its config and `model.safetensors`) to `to`,
/// each tensor's values written by `rewrite(name, original, out)`: same names and shapes.
pub fn rewritten_copy(from: &Path, to: &Path, mut rewrite: impl FnMut(&str, &[f32], &mut [f32])) {
    std::fs::create_dir_all(to).expect("checkpoint directory");
    std::fs::copy(from.join("config.json"), to.join("config.json")).expect("copy config");
    let bytes = std::fs::read(from.join("model.safetensors")).expect("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let tensors: Vec<(String, Vec<usize>)> = names
        .iter()
        .map(|n| (n.clone(), st.tensor(n).expect("tensor").shape().to_vec()))
        .collect();
    let mut original = vec![];
    write_safetensors(&to.join("model.safetensors"), &tensors, |_, name, out| {
        let view = st.tensor(name).expect("tensor");
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        original.clear();
        original.extend(
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        rewrite(name, &original, out);
    });
}
