//! Shared set-up for the end-to-end tests: where the goldens and the real model are, compiling a
//! model into a temporary plan once per test binary, and a logits comparison that prints what
//! differs.

#![allow(dead_code)]

pub mod deepseek_f64;
pub mod http;
pub mod load_memory;
pub mod random;
pub mod synthetic;

use compiler::CompileOptions;
use ir::{DType, Target};
use runtime::{Engine, EngineOptions, LoadedPlan};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Every tiny golden model (the dense ones, then the mixtures of experts and MLA).
pub const TINY_GOLDENS: [&str; 8] = [
    "tiny/llama",
    "tiny/llama3_rope",
    "tiny/qwen2",
    "tiny/qwen3",
    "tiny/qwen3_moe",
    "tiny/mixtral",
    "tiny/ernie4_5_moe",
    "tiny/deepseek_v3",
];

/// A greedy request of `max_tokens` tokens that ignores end-of-sequence tokens.
pub fn greedy_request(max_tokens: usize) -> runtime::scheduler::RequestParams {
    runtime::scheduler::RequestParams {
        max_tokens,
        sampling: runtime::sampler::SamplingParams::greedy(),
        stop_token_ids: vec![],
        ignore_eos: true,
        logprobs: None,
        speculative: true,
    }
}

/// A scheduler stream's tokens, and its last event.
pub fn collect_stream(
    mut stream: runtime::scheduler::RequestStream,
) -> (Vec<u32>, runtime::scheduler::Event) {
    let mut tokens = vec![];
    loop {
        match stream
            .next_blocking()
            .expect("a stream ends with Done or Failed")
        {
            runtime::scheduler::Event::Token(t) => tokens.push(t.id),
            last => return (tokens, last),
        }
    }
}

/// Every request through `s` with its tokens and last event: all submitted at once (the
/// scheduler batches them up to its slots), or each after the one before has finished.
pub fn run_requests(
    s: &runtime::scheduler::Scheduler,
    requests: &[(Vec<u32>, runtime::scheduler::RequestParams)],
    one_at_a_time: bool,
) -> Vec<(Vec<u32>, runtime::scheduler::Event)> {
    let submit = |(prompt, params): &(Vec<u32>, runtime::scheduler::RequestParams)| {
        s.submit(prompt.clone(), params.clone()).expect("submit")
    };
    if one_at_a_time {
        return requests.iter().map(|r| collect_stream(submit(r))).collect();
    }
    let streams: Vec<_> = requests.iter().map(submit).collect();
    streams.into_iter().map(collect_stream).collect()
}

/// The scheduler's stats once nothing runs or waits (or after 10 s).
pub fn wait_idle(s: &runtime::scheduler::Scheduler) -> runtime::scheduler::Stats {
    let start = std::time::Instant::now();
    loop {
        let stats = s.stats();
        if (stats.running == 0 && stats.waiting == 0)
            || start.elapsed() > std::time::Duration::from_secs(10)
        {
            return stats;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

pub fn golden(rel: &str) -> PathBuf {
    workspace().join("tests/golden").join(rel)
}

pub fn smollm2_gguf() -> PathBuf {
    models::testing::smollm2_gguf_path()
}

/// The test binary's scratch folder, under cargo's target directory and emptied when the binary
/// starts. A `TempDir` in a static is never dropped, so every run used to leave its plans behind
/// in the system's temporary folder (about a gigabyte per run of the suite).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "tests".into());
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("scratch-{binary}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

pub fn scratch_path(name: &str) -> PathBuf {
    scratch().join(name)
}

/// Compiles `model` for this machine's CPU with `dtype` weights, once per test binary.
pub fn compiled(model: &Path, dtype: DType) -> PathBuf {
    static DONE: OnceLock<Mutex<HashMap<(PathBuf, DType), PathBuf>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    let key = (model.to_path_buf(), dtype);
    if let Some(p) = done.get(&key) {
        return p.clone();
    }
    let stem = model
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let out = scratch_path(&format!("{stem}-{dtype}.fdp"));
    let options = CompileOptions {
        target: Target::parse("cpu").expect("cpu"),
        weight_dtype: dtype,
        quant: Default::default(),
        progress: false,
    };
    compiler::compile(model, &out, &options)
        .unwrap_or_else(|e| panic!("compiling {}: {e}", model.display()));
    done.insert(key, out.clone());
    out
}

pub fn engine(plan: &Path) -> Engine {
    engine_with(
        plan,
        EngineOptions {
            max_context: 1024,
            max_batch_tokens: 64,
            max_num_seqs: 1,
            ..EngineOptions::default()
        },
    )
}

/// The tiny llama (f32) with room for 4 sequences of 256 positions in 64 blocks of
/// `block_size`: the instances of the serving tests.
pub fn tiny_llama_engine(block_size: usize) -> Engine {
    engine_with(
        &compiled(&golden("tiny/llama"), DType::F32),
        EngineOptions {
            max_context: 256,
            max_batch_tokens: 64,
            max_num_seqs: 4,
            block_size,
            kv_blocks: Some(64),
        },
    )
}

pub fn engine_with(plan: &Path, options: EngineOptions) -> Engine {
    let loaded =
        LoadedPlan::load(plan).unwrap_or_else(|e| panic!("loading {}: {e}", plan.display()));
    Engine::new(loaded, options).expect("engine")
}

pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub fn read_tensor(file: &Path, name: &str) -> Tensor {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{} has no tensor {name}", file.display()));
    let data = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    Tensor {
        shape: t.shape().to_vec(),
        data,
    }
}

pub fn read_json(file: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an id list")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// `max |got - want| / max |want|` over each row of `[rows, cols]`; fails with the worst row,
/// its position and the first values side by side when above `tolerance`.
pub fn check_logits(label: &str, got: &[f32], want: &[f32], cols: usize, tolerance: f32) -> f32 {
    assert_eq!(
        got.len(),
        want.len(),
        "{label}: {} values, golden has {}",
        got.len(),
        want.len()
    );
    let mut worst = (0.0f32, 0usize);
    let mut over = vec![];
    for (row, (g, w)) in got.chunks(cols).zip(want.chunks(cols)).enumerate() {
        let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = diff / scale.max(f32::MIN_POSITIVE);
        if rel > tolerance {
            over.push(row);
        }
        if rel > worst.0 {
            worst = (rel, row);
        }
    }
    let (rel, row) = worst;
    println!("{label}: max relative logit difference {rel:.3e} (row {row})");
    if rel > tolerance {
        let g = &got[row * cols..][..6.min(cols)];
        let w = &want[row * cols..][..6.min(cols)];
        panic!("{label}: row {row} differs by {rel:.3e} relative (tolerance {tolerance:.0e}); rows over it: {over:?}\n  got    {g:?}\n  golden {w:?}");
    }
    rel
}

pub fn argmax(row: &[f32]) -> u32 {
    runtime::sampler::argmax(row)
}

/// One of SmolLM2's golden cases: a prompt and the reference's greedy continuation.
pub struct SmolCase {
    pub name: String,
    pub text: String,
    pub prompt: Vec<u32>,
    pub greedy: Vec<u32>,
    pub margins: Vec<f64>,
}

pub fn smollm2_cases() -> Vec<SmolCase> {
    let json = read_json(&golden("smollm2/golden.json"));
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| SmolCase {
            name: c["name"].as_str().expect("name").to_string(),
            text: c["text"].as_str().expect("text").to_string(),
            prompt: ids(&c["prompt_ids"]),
            greedy: ids(&c["greedy_ids"]),
            margins: c["top1_margin"]
                .as_array()
                .expect("margins")
                .iter()
                .map(|m| m.as_f64().unwrap_or(0.0))
                .collect(),
        })
        .collect()
}

/// SmolLM2 against its float64 reference, whatever engine `forward_all` drives (it runs a
/// fresh sequence and returns every position's logits): prompt logits within `tolerance`, and
/// teacher-forced greedy agreement wherever the golden top-1 margin exceeds `min_margin`.
pub fn check_smollm2(
    label: &str,
    vocab: usize,
    tolerance: f32,
    min_margin: f64,
    mut forward_all: impl FnMut(&[u32]) -> Vec<f32>,
) {
    let golden_file = golden("smollm2/logits.safetensors");
    for case in smollm2_cases() {
        let label = format!("{} {label}", case.name);
        let mut sequence = case.prompt.clone();
        sequence.extend(&case.greedy);
        let logits = forward_all(&sequence);
        let want = read_tensor(&golden_file, &format!("{}.prompt_logits", case.name));
        check_logits(
            &label,
            &logits[..case.prompt.len() * vocab],
            &want.data,
            vocab,
            tolerance,
        );
        let mut checked = 0;
        for (i, &next) in case.greedy.iter().enumerate() {
            if case.margins[i] <= min_margin {
                continue;
            }
            let row = case.prompt.len() - 1 + i;
            let got = argmax(&logits[row * vocab..][..vocab]);
            assert_eq!(
                got, next,
                "{label}: greedy token {i} (margin {:.3})",
                case.margins[i]
            );
            checked += 1;
        }
        println!(
            "{label}: {checked} of {} greedy tokens checked, all equal",
            case.greedy.len()
        );
    }
}

/// The tiny DeepSeek-V3 config with random weights for the model and for its
/// multi-token-prediction module (`fdc synth`: the golden checkpoint has no module weights),
/// written once per test binary.
pub fn deepseek_mtp_checkpoint() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_path("deepseek_v3-mtp");
        let config = golden("tiny/deepseek_v3").join("config.json");
        models::synth::synthesize(&config, &dir, 11, false).expect("synthesizing");
        dir
    })
    .clone()
}

/// The registry kernel of each step of `plan`, in program order.
pub fn step_kernels(plan: &runtime::LoadedPlan) -> Vec<&str> {
    plan.program
        .steps
        .iter()
        .map(|s| s.kernel.as_str())
        .collect()
}
