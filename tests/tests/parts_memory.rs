//! Peak resident memory of loading a plan in parts: at most its largest part plus
//! `LOAD_CONSTANT_BYTES`; the same plan as one file is bounded too, since verification drops
//! each section's pages once hashed. A small
//! synthetic Llama (about 40 MB in 4 MB parts) keeps this fast; the 470 MB measurement in 50 MB
//! parts is `examples/parts_load_memory.rs`, with its numbers in docs/PERF.md. One test in this
//! binary, so that no other test allocates while it measures.

mod common;

use common::load_memory::{largest_part, measure_load, LOAD_CONSTANT_BYTES};
use common::synthetic::LlamaShape;
use common::*;
use compiler::{CompileOptions, WeightOutput};
use ir::{DType, Target};

#[test]
fn loading_in_parts_stays_within_one_part_plus_a_constant() {
    let shape = LlamaShape {
        hidden: 256,
        intermediate: 1024,
        layers: 8,
        vocab: 4096,
        heads: 8,
        kv_heads: 8,
    };
    let model = scratch_path("synthetic");
    shape.write_checkpoint(&model);
    let options = CompileOptions {
        target: Target::parse("cpu").expect("cpu"),
        weight_dtype: DType::F32,
        progress: false,
        quant: Default::default(),
    };
    let single = scratch_path("single.fdp");
    let parts_dir = scratch_path("parts");
    std::fs::create_dir_all(&parts_dir).unwrap();
    let parts = parts_dir.join("synthetic.fdp");
    compiler::compile_to(&model, &single, &options, &WeightOutput::InPlan).unwrap();
    let part_size = 4 << 20;
    compiler::compile_to(&model, &parts, &options, &WeightOutput::Parts { part_size }).unwrap();

    let largest = largest_part(&parts);
    let whole = std::fs::metadata(&single).unwrap().len();
    let in_parts = measure_load(&parts);
    let one_file = measure_load(&single);
    println!(
        "plan of {whole} bytes: one file added {} bytes at peak, parts (largest {largest}) added {}",
        one_file.added(),
        in_parts.added()
    );
    assert!(
        in_parts.added() <= largest + LOAD_CONSTANT_BYTES,
        "loading in parts added {} bytes, more than the largest part {largest} + {LOAD_CONSTANT_BYTES}",
        in_parts.added()
    );
    // Verifying a single-file plan reads all of it, but drops each section's pages once hashed
    // (it used to keep the whole file resident).
    assert!(
        one_file.added() <= whole / 4,
        "the one-file load added {} of {whole} bytes",
        one_file.added()
    );
}
