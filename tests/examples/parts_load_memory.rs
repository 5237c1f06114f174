//! Peak resident memory while loading a large plan: the same synthetic Llama (f32, about 470 MB
//! of weights, no weight above 34 MB) compiled as one file and in 50 MB parts, each load
//! measured in this process with VmHWM reset just before it (see `common/load_memory.rs`).
//! Fails if the load in parts adds more than its largest part plus `LOAD_CONSTANT_BYTES`.
//! Too heavy for the test suite (it writes and compiles about 1.4 GB); numbers go in
//! docs/PERF.md.
//!
//! ```text
//! cargo run -p tests --example parts_load_memory [WORK_DIR]
//! ```

#[path = "../tests/common/load_memory.rs"]
mod load_memory;
#[path = "../tests/common/synthetic.rs"]
mod synthetic;

use compiler::{CompileOptions, WeightOutput};
use ir::{DType, Target};
use load_memory::{largest_part, measure_load, shipped_bytes, LOAD_CONSTANT_BYTES};
use std::path::PathBuf;

const PART_SIZE: u64 = 50_000_000;

fn main() {
    let work = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("fdc-parts-load-memory"));
    let shape = synthetic::LlamaShape {
        hidden: 1024,
        intermediate: 4096,
        layers: 6,
        vocab: 8192,
        heads: 16,
        kv_heads: 16,
    };
    let model = work.join("model");
    shape.write_checkpoint(&model);
    let options = CompileOptions {
        target: Target::parse("cpu").expect("cpu"),
        weight_dtype: DType::F32,
        progress: false,
        quant: Default::default(),
    };
    let single = work.join("single/synthetic.fdp");
    let parts = work.join("parts/synthetic.fdp");
    for (out, weights) in [
        (&single, WeightOutput::InPlan),
        (
            &parts,
            WeightOutput::Parts {
                part_size: PART_SIZE,
            },
        ),
    ] {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        compiler::compile_to(&model, out, &options, &weights).expect("compiles");
    }
    let mb = |b: u64| b as f64 / 1e6;
    let largest = largest_part(&parts);
    println!(
        "plan: {:.1} MB as one file, {:.1} MB as plan + parts (largest part {:.1} MB)",
        mb(shipped_bytes(&single)),
        mb(shipped_bytes(&parts)),
        mb(largest)
    );
    println!(
        "| load | RSS before (MB) | peak VmHWM (MB) | added by the load (MB) | load time (s) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let mut worst_parts = 0;
    // Alternated, three times each: the machine is shared.
    for round in 0..3 {
        for (label, plan) in [("one file", &single), ("50 MB parts", &parts)] {
            let m = measure_load(plan);
            if plan == &parts {
                worst_parts = worst_parts.max(m.added());
            }
            println!(
                "| {label} (round {}) | {:.1} | {:.1} | {:.1} | {:.2} |",
                round + 1,
                mb(m.before),
                mb(m.peak),
                mb(m.added()),
                m.seconds
            );
        }
    }
    let bound = largest + LOAD_CONSTANT_BYTES;
    println!(
        "bound for parts: largest part {:.1} MB + constant {:.1} MB = {:.1} MB; worst measured {:.1} MB",
        mb(largest),
        mb(LOAD_CONSTANT_BYTES),
        mb(bound),
        mb(worst_parts)
    );
    assert!(worst_parts <= bound, "loading in parts exceeded its bound");
}
