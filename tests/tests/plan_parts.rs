//! Plans in parts and weight snapshots, loaded by the runtime: a plan in parts gives the same
//! logits as the single-file plan; a single-file plan and a format version 2 plan (checked in,
//! written by the fdc of that version) still load; a missing, corrupted or foreign part, and a
//! snapshot that does not match the plan, are errors that name the part and what was expected.
//! Peak memory during a load is in `parts_memory.rs`; live updates are in `weights_update.rs`.

mod common;

use artifacts::parts::{PartsTable, SnapshotTag, PARTS_SECTION};
use artifacts::{codec, PlanFile, FORMAT_VERSION};
use common::*;
use compiler::{CompileOptions, WeightOutput};
use ir::{DType, Target};
use runtime::weights::WeightStore;
use runtime::{LoadedPlan, RuntimeError};
use std::path::{Path, PathBuf};

/// Tiny Llama weights are 256 B to 80 KB: 64 KiB parts give several parts of several weights.
const PART_SIZE: u64 = 64 << 10;

/// Compiles `model` as `DIR/tiny.fdp` in a fresh scratch directory `dir`, weights as `weights`.
fn compile_into(model: &Path, dir: &str, dtype: DType, weights: WeightOutput) -> PathBuf {
    let dir = scratch_path(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("tiny.fdp");
    let options = CompileOptions {
        target: Target::parse("cpu").expect("cpu"),
        weight_dtype: dtype,
        progress: false,
        quant: Default::default(),
    };
    compiler::compile_to(model, &out, &options, &weights)
        .unwrap_or_else(|e| panic!("compiling {}: {e}", model.display()));
    out
}

fn tiny_in_parts(dir: &str) -> PathBuf {
    compile_into(
        &golden("tiny/llama"),
        dir,
        DType::F32,
        WeightOutput::Parts {
            part_size: PART_SIZE,
        },
    )
}

fn parts_table(plan: &Path) -> PartsTable {
    let file = PlanFile::open(plan).unwrap();
    codec::decode(PARTS_SECTION, file.require_section(PARTS_SECTION).unwrap()).unwrap()
}

fn load_error(plan: &Path) -> String {
    match LoadedPlan::load(plan) {
        Ok(_) => panic!("{} should not load", plan.display()),
        Err(e) => e.to_string(),
    }
}

fn golden_prompt() -> Vec<u32> {
    ids(&read_json(&golden("tiny/llama/golden.json"))["input_ids"])
}

#[test]
fn a_plan_in_parts_gives_the_single_file_plans_logits() {
    let parts = tiny_in_parts("parts-logits");
    let single = compiled(&golden("tiny/llama"), DType::F32);
    let file = PlanFile::open(&parts).unwrap();
    assert_eq!(file.format_version(), FORMAT_VERSION);
    assert_eq!(
        file.sections()
            .filter(|s| s.name.starts_with("weight:"))
            .count(),
        0,
        "a plan in parts holds no weights itself"
    );
    let table = parts_table(&parts);
    assert!(table.parts.len() >= 3, "{} parts", table.parts.len());
    for (i, part) in table.parts.iter().enumerate() {
        assert_eq!(part.file, format!("tiny.part{i}.fdw"));
        let on_disk = std::fs::metadata(parts.with_file_name(&part.file))
            .unwrap()
            .len();
        assert_eq!(on_disk, part.bytes, "{}", part.file);
    }
    let loaded = LoadedPlan::load(&parts).unwrap();
    assert_eq!(loaded.weights().file_count(), table.parts.len());
    let prompt = golden_prompt();
    let want = engine(&single).prefill(&prompt, true).unwrap();
    let got = runtime::Engine::new(loaded, runtime::EngineOptions::default())
        .unwrap()
        .prefill(&prompt, true)
        .unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "a plan in parts must compute exactly what the single-file plan computes"
    );
}

#[test]
fn a_single_file_plan_loads_its_weights_from_the_plan() {
    let single = compiled(&golden("tiny/llama"), DType::F32);
    let file = PlanFile::open(&single).unwrap();
    assert!(file.section(PARTS_SECTION).is_none());
    let loaded = LoadedPlan::load(&single).unwrap();
    assert_eq!(loaded.weights().file_count(), 1);
    assert_eq!(loaded.weights().origin(), single.display().to_string());
}

/// `tests/data/tiny-llama-v2.fdp` was compiled from `tests/golden/tiny/llama` by the fdc that
/// wrote format version 2 (`fdc compile --target cpu-portable`), before plans had parts.
#[test]
fn a_format_version_2_plan_still_loads_and_matches_the_golden() {
    let v2 = workspace().join("tests/data/tiny-llama-v2.fdp");
    assert_eq!(PlanFile::open(&v2).unwrap().format_version(), 2);
    let json = read_json(&golden("tiny/llama/golden.json"));
    let golden_logits = read_tensor(&golden("tiny/llama/golden.safetensors"), "logits");
    let logits = engine(&v2).prefill(&ids(&json["input_ids"]), true).unwrap();
    check_logits(
        "format version 2 plan",
        &logits,
        &golden_logits.data,
        golden_logits.shape[1],
        1e-3,
    );
}

#[test]
fn a_missing_part_is_named_with_what_was_expected() {
    let plan = tiny_in_parts("parts-missing");
    let table = parts_table(&plan);
    std::fs::remove_file(plan.with_file_name("tiny.part2.fdw")).unwrap();
    let err = load_error(&plan);
    let expected = format!(
        "part 2 of {}, {} bytes",
        table.parts.len(),
        table.parts[2].bytes
    );
    assert!(
        err.contains("tiny.part2.fdw is missing") && err.contains(&expected),
        "{err}"
    );
}

#[test]
fn a_corrupted_part_names_the_part_and_the_section() {
    let plan = tiny_in_parts("parts-corrupt");
    let part = plan.with_file_name("tiny.part1.fdw");
    let weight = PlanFile::open(&part)
        .unwrap()
        .sections()
        .find(|s| s.name.starts_with("weight:"))
        .expect("a weight in part 1");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[weight.offset as usize + 5] ^= 0x20;
    std::fs::write(&part, bytes).unwrap();
    let err = load_error(&plan);
    assert!(
        err.contains("tiny.part1.fdw") && err.contains(&weight.name) && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn a_part_from_another_compile_is_refused() {
    let plan = tiny_in_parts("parts-foreign");
    let other = compile_into(
        &golden("tiny/llama"),
        "parts-foreign-bf16",
        DType::BF16,
        WeightOutput::Parts {
            part_size: PART_SIZE,
        },
    );
    std::fs::copy(
        other.with_file_name("tiny.part0.fdw"),
        plan.with_file_name("tiny.part0.fdw"),
    )
    .unwrap();
    let err = load_error(&plan);
    let want = &parts_table(&plan).parts[0];
    assert!(
        err.contains("tiny.part0.fdw") && err.contains(&want.checksum),
        "{err}"
    );
}

#[test]
fn a_part_of_a_plan_is_not_a_snapshot_and_a_snapshot_must_match_the_plan() {
    let plan = compiled(&golden("tiny/llama"), DType::F32);
    let manifest = LoadedPlan::load(&plan).unwrap().manifest;
    let tag = SnapshotTag {
        id: "7".into(),
        rank: 0,
    };
    let snapshot = |model: &str, dir: &str, dtype| {
        let out = compile_into(
            &golden(model),
            dir,
            dtype,
            WeightOutput::Snapshot {
                part_size: PART_SIZE,
                tag: tag.clone(),
            },
        );
        out.parent().unwrap().to_path_buf()
    };
    // Same model: loads, one store file per part.
    let good = snapshot("tiny/llama", "snapshot-good", DType::F32);
    assert!(!good.join("tiny.fdp").exists(), "a snapshot writes no plan");
    let store = WeightStore::load_snapshot(&good, &tag, &manifest).unwrap();
    assert!(store.file_count() >= 3);
    // Another rank or id finds nothing.
    for other in [
        SnapshotTag {
            id: "7".into(),
            rank: 1,
        },
        SnapshotTag {
            id: "70".into(),
            rank: 0,
        },
    ] {
        let err = WeightStore::load_snapshot(&good, &other, &manifest)
            .err()
            .expect("no such snapshot");
        assert!(err.to_string().contains("exactly one plan"), "{err}");
    }
    // Another architecture, and another storage type: the structure differs.
    for (model, dir, dtype) in [
        ("tiny/qwen2", "snapshot-qwen2", DType::F32),
        ("tiny/llama", "snapshot-bf16", DType::BF16),
    ] {
        let dir = snapshot(model, dir, dtype);
        let err = WeightStore::load_snapshot(&dir, &tag, &manifest)
            .err()
            .expect("a mismatched snapshot");
        assert!(
            matches!(err, RuntimeError::Part { .. })
                && err.to_string().contains("the plan's structure"),
            "{model} {dtype}: {err}"
        );
    }
    // A missing snapshot part is named.
    let missing = snapshot("tiny/llama", "snapshot-missing", DType::F32);
    std::fs::remove_file(missing.join("tiny.tp0.7.part1.fdw")).unwrap();
    let err = WeightStore::load_snapshot(&missing, &tag, &manifest)
        .err()
        .expect("a missing part");
    assert!(
        err.to_string().contains("tiny.tp0.7.part1.fdw is missing"),
        "{err}"
    );
}

#[test]
fn inspect_lists_the_parts() {
    let plan = tiny_in_parts("parts-inspect");
    let text = compiler::inspect::inspect(&plan, &[]).unwrap();
    let table = parts_table(&plan);
    assert!(
        text.contains(&format!("{} part files", table.parts.len())),
        "{text}"
    );
    for part in &table.parts {
        assert!(
            text.contains(&part.file) && text.contains(&part.checksum),
            "{text}"
        );
    }
}
