//! Plans as files: a compiled plan loads and round-trips its manifest; every kind of damage
//! (a flipped byte, a truncation, a foreign file, a newer format version, a target this CPU
//! cannot run) gives its own one-line error from the runtime, never a panic.

mod common;

use artifacts::schema::{section, Manifest};
use artifacts::{codec, PlanError, PlanFile, FORMAT_VERSION};
use common::*;
use ir::DType;
use runtime::{LoadedPlan, RuntimeError};
use std::path::{Path, PathBuf};

fn tiny_plan() -> PathBuf {
    compiled(&golden("tiny/llama"), DType::F32)
}

fn damaged(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(tiny_plan()).unwrap();
    edit(&mut bytes);
    let path = scratch_path(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn load_error(path: &Path) -> RuntimeError {
    match LoadedPlan::load(path) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e,
    }
}

#[test]
fn a_plan_round_trips_its_manifest() {
    let plan = PlanFile::open(tiny_plan()).expect("opens");
    let manifest: Manifest =
        codec::decode(section::MANIFEST, plan.section(section::MANIFEST).unwrap()).unwrap();
    assert_eq!(manifest.model.architecture, "llama");
    assert_eq!(manifest.model.num_layers, 3);
    assert_eq!(
        manifest.weights.len(),
        plan.sections()
            .filter(|s| s.name.starts_with("weight:"))
            .count()
    );
    let again = codec::encode(&manifest).unwrap();
    assert_eq!(
        again,
        plan.section(section::MANIFEST).unwrap(),
        "manifest encoding is stable"
    );
    LoadedPlan::load(&tiny_plan()).expect("the runtime accepts it");
}

#[test]
fn a_flipped_weight_byte_names_the_section() {
    let plan = PlanFile::open(tiny_plan()).unwrap();
    let weight = plan
        .sections()
        .find(|s| s.name.starts_with("weight:model.layers.1"))
        .expect("a layer-1 weight");
    let path = damaged("flipped.fdp", |b| b[weight.offset as usize + 17] ^= 0x40);
    let err = load_error(&path);
    assert!(
        matches!(err, RuntimeError::Plan(PlanError::ChecksumMismatch { .. })),
        "{err}"
    );
    assert!(err.to_string().contains(&weight.name), "{err}");
}

#[test]
fn truncation_is_reported_with_both_lengths() {
    let full = std::fs::metadata(tiny_plan()).unwrap().len();
    for keep in [10u64, 200, 5000, full / 2, full - 1] {
        let path = damaged(&format!("cut{keep}.fdp"), |b| b.truncate(keep as usize));
        let err = load_error(&path);
        assert!(
            matches!(
                err,
                RuntimeError::Plan(PlanError::Truncated { .. } | PlanError::NotAPlan { .. })
            ),
            "cut at {keep}: {err}"
        );
        if keep >= 200 {
            assert!(
                err.to_string().contains(&keep.to_string()),
                "cut at {keep}: {err}"
            );
        }
    }
}

#[test]
fn a_foreign_file_is_not_a_plan() {
    let path = scratch_path("foreign.fdp");
    std::fs::write(
        &path,
        std::fs::read(golden("tiny/llama/config.json")).unwrap(),
    )
    .unwrap();
    let err = load_error(&path);
    assert!(
        matches!(err, RuntimeError::Plan(PlanError::NotAPlan { .. })),
        "{err}"
    );
}

#[test]
fn a_newer_format_version_says_which() {
    let path = damaged("newer.fdp", |b| {
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes())
    });
    let err = load_error(&path).to_string();
    assert!(
        err.contains(&(FORMAT_VERSION + 1).to_string())
            && err.contains(&FORMAT_VERSION.to_string()),
        "{err}"
    );
}

#[test]
fn a_plan_for_a_wider_isa_than_this_cpu_is_refused_with_a_fix() {
    use ir::{CpuIsa, Target};
    if kernels::cpu::detected_isa() == CpuIsa::Avx512 {
        println!("skipped: this CPU runs every ISA the compiler targets");
        return;
    }
    let out = scratch_path("avx512.fdp");
    let options = compiler::CompileOptions {
        target: Target::Cpu(CpuIsa::Avx512),
        weight_dtype: DType::F32,
        quant: Default::default(),
        progress: false,
    };
    compiler::compile(&golden("tiny/llama"), &out, &options).unwrap();
    let err = load_error(&out);
    assert!(
        matches!(err, RuntimeError::UnsupportedTarget { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("cpu-avx512") && err.to_string().contains("recompile"),
        "{err}"
    );
}

#[test]
fn portable_plans_run_everywhere_and_agree_with_the_golden() {
    use ir::{CpuIsa, Target};
    let out = scratch_path("portable.fdp");
    let options = compiler::CompileOptions {
        target: Target::Cpu(CpuIsa::Portable),
        weight_dtype: DType::F32,
        quant: Default::default(),
        progress: false,
    };
    compiler::compile(&golden("tiny/qwen3"), &out, &options).unwrap();
    let mut engine = engine(&out);
    let json = read_json(&golden("tiny/qwen3/golden.json"));
    let want = read_tensor(&golden("tiny/qwen3/golden.safetensors"), "logits");
    let logits = engine.prefill(&ids(&json["input_ids"]), true).unwrap();
    check_logits("qwen3 portable", &logits, &want.data, want.shape[1], 1e-3);
}

#[test]
fn bad_requests_are_errors() {
    let mut engine = engine(&tiny_plan());
    assert!(matches!(
        engine.prefill(&[], true),
        Err(RuntimeError::EmptyInput)
    ));
    assert!(matches!(
        engine.prefill(&[1, 320], true),
        Err(RuntimeError::BadTokenId { id: 320, .. })
    ));
    let long: Vec<u32> = vec![1; 1025];
    assert!(matches!(
        engine.prefill(&long, false),
        Err(RuntimeError::ContextFull { .. })
    ));
}

/// `plan` with its manifest edited by `edit`, every other section copied as is.
fn with_manifest(plan: &Path, name: &str, edit: impl FnOnce(&mut Manifest)) -> PathBuf {
    let file = PlanFile::open(plan).unwrap();
    let mut manifest: Manifest =
        codec::decode(section::MANIFEST, file.section(section::MANIFEST).unwrap()).unwrap();
    edit(&mut manifest);
    let out = scratch_path(name);
    let mut writer = artifacts::PlanWriter::create(&out).unwrap();
    for s in file.sections() {
        let bytes = if s.name == section::MANIFEST {
            codec::encode(&manifest).unwrap()
        } else {
            file.section(&s.name).unwrap().to_vec()
        };
        writer.add_section(&s.name, s.kind, &bytes).unwrap();
    }
    writer.finish().unwrap();
    out
}

#[test]
fn matmul_weights_are_stored_in_panels_and_their_layout_is_checked_at_load() {
    use artifacts::schema::WeightLayout;
    let panel = kernels::cpu::PackedLayout::for_isa(kernels::cpu::detected_isa()).panel() as u32;
    // The untied llama keeps its embedding table row-major for the gather; the tied qwen2
    // packs it, since its one copy is also the output head.
    for (model, tied) in [("tiny/llama", false), ("tiny/qwen2", true)] {
        let plan = compiled(&golden(model), DType::F32);
        let file = PlanFile::open(&plan).unwrap();
        let manifest: Manifest =
            codec::decode(section::MANIFEST, file.section(section::MANIFEST).unwrap()).unwrap();
        for w in &manifest.weights {
            let want = if w.shape.len() == 1 || (w.name.contains("embed_tokens") && !tied) {
                WeightLayout::RowMajor
            } else {
                WeightLayout::Panels { panel }
            };
            assert_eq!(w.layout, want, "{model}: {} {:?}", w.name, w.shape);
        }
    }
    // A width the kernels cannot read, or panels on a vector, is refused with the weight's name.
    let plan = compiled(&golden("tiny/llama"), DType::F32);
    for (what, edit) in [
        (
            "width",
            (|w| w.shape.len() == 2) as fn(&artifacts::schema::WeightInfo) -> bool,
        ),
        ("vector", |w| w.shape.len() == 1),
    ] {
        let mut victim = String::new();
        let bad = with_manifest(&plan, &format!("bad-layout-{what}.fdp"), |m| {
            let w = m.weights.iter_mut().find(|w| edit(w)).unwrap();
            w.layout = WeightLayout::Panels { panel: 12 };
            victim = w.name.clone();
        });
        let err = load_error(&bad);
        assert!(matches!(err, RuntimeError::InvalidPlan(_)), "{what}: {err}");
        assert!(err.to_string().contains(&victim), "{what}: {err}");
    }
}
