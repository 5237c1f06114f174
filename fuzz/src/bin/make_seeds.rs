//! Writes the seed corpora of the fuzz targets (`fuzz/seeds/<target>/`), checked in so that
//! every run starts from valid inputs: small containers and section bytes taken from a compiled
//! tiny plan and one of its parts, a hand-assembled GGUF and safetensors file a few hundred
//! bytes long, snapshot part names, chat messages and request bodies. HF configs are copied by
//! `scripts/fuzz-seeds.sh`, which also compiles the plans this reads.
//!
//! Usage: `make_seeds SEEDS_DIR PLAN.fdp PARTS_PLAN.fdp PART0.fdw V2_PLAN.fdp`

// Built with the targets' coverage instrumentation, so it links libFuzzer's runtime too (not its
// `main`: this program has its own).
extern crate libfuzzer_sys;

use artifacts::parts::{PARTS_SECTION, PART_SECTION};
use artifacts::schema::section;
use artifacts::{PlanFile, PlanWriter, SectionKind, OLDEST_FORMAT_VERSION};
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [seeds, plan, parts_plan, part0, v2_plan] = args.as_slice() else {
        return Err(
            "usage: make_seeds SEEDS_DIR PLAN.fdp PARTS_PLAN.fdp PART0.fdw V2_PLAN.fdp".into(),
        );
    };
    let plan = PlanFile::open(plan)?;
    let parts_plan = PlanFile::open(parts_plan)?;
    let part0 = PlanFile::open(part0)?;
    let v2_plan = PlanFile::open(v2_plan)?;
    let manifest = plan.require_section(section::MANIFEST)?;
    let program = plan.require_section(section::PROGRAM)?;
    let parts_table = parts_plan.require_section(PARTS_SECTION)?;
    let part_header = part0.require_section(PART_SECTION)?;

    // fdp_container: whole small containers.
    let dir = target_dir(seeds, "fdp_container")?;
    let scratch = std::env::temp_dir().join(format!("make-seeds-{}.fdp", std::process::id()));
    let mut writer = PlanWriter::create(&scratch)?;
    writer.add_section(section::MANIFEST, SectionKind::Manifest, manifest)?;
    writer.add_section(section::PROGRAM, SectionKind::Program, program)?;
    writer.finish()?;
    std::fs::rename(&scratch, dir.join("plan-manifest-program"))?;
    let mut writer = PlanWriter::create(&scratch)?;
    writer.add_section(PART_SECTION, SectionKind::Other, part_header)?;
    writer.add_section("weight.norm", SectionKind::Weights, &[0u8; 64])?;
    writer.finish()?;
    std::fs::rename(&scratch, dir.join("part-file"))?;

    // fdp_sections: the first byte picks the format version (0 is the oldest).
    let dir = target_dir(seeds, "fdp_sections")?;
    let current = (plan.format_version() - OLDEST_FORMAT_VERSION) as u8;
    let v2 = (v2_plan.format_version() - OLDEST_FORMAT_VERSION) as u8;
    let v2_manifest = v2_plan.require_section(section::MANIFEST)?;
    write(&dir, "manifest-current", &[&[current], manifest].concat())?;
    write(&dir, "manifest-v2", &[&[v2], v2_manifest].concat())?;
    write(&dir, "program", &[&[current], program].concat())?;
    write(&dir, "parts-table", &[&[current], parts_table].concat())?;
    write(&dir, "part-header", &[&[current], part_header].concat())?;

    let dir = target_dir(seeds, "part_file_name")?;
    write(&dir, "plain", b"model.tp0.step-1200.part0.fdw")?;
    write(&dir, "dotted-name", b"smollm2.q4.tp3.run_7-a.part12.fdw")?;

    write(&target_dir(seeds, "gguf")?, "tiny-llama", &tiny_gguf())?;
    write(
        &target_dir(seeds, "safetensors_header")?,
        "two-tensors",
        &tiny_safetensors(),
    )?;

    let dir = target_dir(seeds, "chat_template")?;
    write(
        &dir,
        "smollm2-two-turns",
        b"\x80\x01What is 2+2?\x00\x024\x00\x01And 3+3?",
    )?;
    write(&dir, "llama3-system", b"\x01\x00You are terse.\x00\x01hi")?;
    write(
        &dir,
        "qwen-json",
        b"\x02\x01/json {\"a\": 1}\x00\x05{{ 7*7 }}",
    )?;

    let dir = target_dir(seeds, "openai_bodies")?;
    let bodies: [(&str, &str); 6] = [
        (
            "chat",
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0.7,"top_p":0.9,"stop":["\n"],"stream":true,"stream_options":{"include_usage":true},"logprobs":true,"top_logprobs":2}"#,
        ),
        (
            "chat-parts",
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_completion_tokens":4,"n":2,"seed":7,"presence_penalty":0.5,"repetition_penalty":1.1}"#,
        ),
        (
            "completion-text",
            r#"{"model":"m","prompt":"Once upon","max_tokens":16,"top_k":40,"min_p":0.05,"logprobs":3,"stop_token_ids":[2],"ignore_eos":true}"#,
        ),
        (
            "completion-ids",
            r#"{"prompt":[[1,2,3],[4,5]],"max_tokens":2,"return_token_ids":true,"echo":false}"#,
        ),
        (
            "completion-bad",
            r#"{"prompt":"x","max_tokens":-3,"temperature":"hot","n":1000}"#,
        ),
        (
            "update-weights",
            r#"{"dir":"snapshots","snapshot_id":"step-1200","rank":0}"#,
        ),
    ];
    for (name, body) in bodies {
        write(&dir, name, body.as_bytes())?;
    }
    Ok(())
}

fn target_dir(seeds: &Path, target: &str) -> Result<PathBuf> {
    let dir = seeds.join(target);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    Ok(std::fs::write(dir.join(name), bytes)?)
}

/// GGUF building blocks, little-endian as the format is.
struct Gguf(Vec<u8>);

impl Gguf {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    /// A key with a u32 value (value type 4).
    fn key_u32(&mut self, key: &str, v: u32) {
        self.string(key);
        self.u32(4);
        self.u32(v);
    }
    /// A key with an f32 value (value type 6).
    fn key_f32(&mut self, key: &str, v: f32) {
        self.string(key);
        self.u32(6);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A key with a string value (value type 8).
    fn key_str(&mut self, key: &str, v: &str) {
        self.string(key);
        self.u32(8);
        self.string(v);
    }
    /// A key with an array of strings (value type 9 of type 8).
    fn key_strs(&mut self, key: &str, items: &[&str]) {
        self.string(key);
        self.u32(9);
        self.u32(8);
        self.u64(items.len() as u64);
        for item in items {
            self.string(item);
        }
    }
}

/// A one-layer llama GGUF (version 3): the config keys, a four-token vocabulary, and two
/// tensors (an f32 norm and a Q8_0 embedding) so that tensor reading is reached.
fn tiny_gguf() -> Vec<u8> {
    let hidden = 32u64;
    let vocab = 4u64;
    let mut g = Gguf(Vec::new());
    g.0.extend_from_slice(b"GGUF");
    g.u32(3);
    g.u64(2); // tensors
    g.u64(11); // metadata keys
    g.key_str("general.architecture", "llama");
    g.key_u32("llama.embedding_length", hidden as u32);
    g.key_u32("llama.block_count", 1);
    g.key_u32("llama.feed_forward_length", 64);
    g.key_u32("llama.attention.head_count", 4);
    g.key_u32("llama.attention.head_count_kv", 2);
    g.key_u32("llama.context_length", 128);
    g.key_f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    g.key_f32("llama.rope.freq_base", 10000.0);
    g.key_strs("tokenizer.ggml.tokens", &["<s>", "</s>", "a", "b"]);
    g.key_u32("tokenizer.ggml.eos_token_id", 1);
    // Tensor table: name, dims, ggml type, offset in the data section.
    g.string("output_norm.weight");
    g.u32(1);
    g.u64(hidden);
    g.u32(0); // F32
    g.u64(0);
    g.string("token_embd.weight");
    g.u32(2);
    g.u64(hidden);
    g.u64(vocab);
    g.u32(8); // Q8_0: blocks of 32 values, an f16 scale and 32 int8
    g.u64(hidden * 4);
    while g.0.len() % 32 != 0 {
        g.0.push(0);
    }
    for i in 0..hidden {
        g.0.extend_from_slice(&(1.0 + i as f32 / 64.0).to_le_bytes());
    }
    for row in 0..vocab {
        g.0.extend_from_slice(&0x2c00u16.to_le_bytes()); // f16 0.0625
        for i in 0..hidden {
            g.0.push(((row * 7 + i) % 256) as u8);
        }
    }
    g.0
}

/// A safetensors file with an f32 and a bf16 tensor and a metadata entry.
fn tiny_safetensors() -> Vec<u8> {
    let header = r#"{"__metadata__":{"format":"pt"},"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"lm_head.weight":{"dtype":"BF16","shape":[2,4],"data_offsets":[16,32]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for v in [1.0f32, 0.5, -2.0, 0.25] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for i in 0..8u16 {
        bytes.extend_from_slice(&(0x3f80 + i).to_le_bytes());
    }
    bytes
}
