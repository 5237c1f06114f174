//! Pass tests as text in, text out: each `passes/<pass>/<case>.fdir` is an IR text graph; the
//! test parses it, runs that one pass, verifies the result and snapshots its text
//! (`snapshots/passes__<pass>@<case>.fdir.snap`). Every case opens with a comment saying what
//! the pass must do to it, including cases where it must leave the graph alone.
//!
//! To add a case, drop a `.fdir` file into the pass's directory, run
//! `INSTA_UPDATE=always cargo test -p compiler --test passes`, and read the new snapshot before
//! keeping it.

use compiler::passes::{PassCtx, REWRITES};
use ir::{CpuIsa, DType, Target};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/passes")
}

/// The weight dtype a pass's cases run with: bf16 where the pass is about weight types, so the
/// snapshots show a change; f32 (the activation type, a no-op for casts) everywhere else.
fn weight_dtype(pass: &str) -> DType {
    if pass == "cast_weights" {
        DType::BF16
    } else {
        DType::F32
    }
}

/// The target a pass's cases compile for: CUDA for the passes that only rewrite CUDA graphs.
fn target(pass: &str) -> Target {
    if pass == "fuse_rope_attention" {
        Target::Cuda(ir::CudaArch::Sm90)
    } else {
        Target::Cpu(CpuIsa::Avx2)
    }
}

fn run_case(pass_name: &str, path: &Path) -> String {
    let (_, pass) = REWRITES
        .iter()
        .find(|(name, _)| *name == pass_name)
        .unwrap_or_else(|| panic!("{pass_name} is not a rewrite pass of the pipeline"));
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut graph = ir::text::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ir::verify::verify(&graph)
        .unwrap_or_else(|e| panic!("{} (before {pass_name}): {e}", path.display()));
    let ctx = PassCtx {
        target: target(pass_name),
        weight_dtype: weight_dtype(pass_name),
        quant: Default::default(),
    };
    pass(&mut graph, &ctx).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ir::verify::verify(&graph)
        .unwrap_or_else(|e| panic!("{} (after {pass_name}): {e}", path.display()));
    let printed = ir::text::print(&graph);
    let reparsed = ir::text::parse(&printed)
        .unwrap_or_else(|e| panic!("{}: output does not parse: {e}", path.display()));
    assert_eq!(
        ir::text::print(&reparsed),
        printed,
        "{}: the output text does not round-trip",
        path.display()
    );
    printed
}

/// Runs every case of one pass's directory against its snapshot.
fn check_pass(pass_name: &str) {
    insta::glob!(&format!("passes/{pass_name}/*.fdir"), |path| {
        insta::assert_snapshot!(pass_name, run_case(pass_name, path));
    });
}

#[test]
fn canonicalize() {
    check_pass("canonicalize");
}

#[test]
fn fuse_matmuls() {
    check_pass("fuse_matmuls");
}

#[test]
fn fuse_rope_attention() {
    check_pass("fuse_rope_attention");
}

#[test]
fn fuse_silu_mul() {
    check_pass("fuse_silu_mul");
}

#[test]
fn fuse_add_rms_norm() {
    check_pass("fuse_add_rms_norm");
}

#[test]
fn cast_weights() {
    check_pass("cast_weights");
}

/// The case directories are exactly the pipeline's rewrite passes, each with at least two cases,
/// so a new pass cannot land without text tests and a renamed one cannot orphan its cases.
#[test]
fn every_rewrite_pass_has_cases() {
    let pipeline: BTreeSet<&str> = REWRITES.iter().map(|(name, _)| *name).collect();
    let mut dirs = BTreeSet::new();
    for entry in std::fs::read_dir(cases_dir()).expect("compiler/tests/passes exists") {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 name")
            .to_string();
        let cases = std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "fdir"))
            })
            .count();
        assert!(
            cases >= 2,
            "passes/{name} has {cases} .fdir cases; every pass needs at least two"
        );
        dirs.insert(name);
    }
    let dirs: BTreeSet<&str> = dirs.iter().map(String::as_str).collect();
    assert_eq!(
        dirs, pipeline,
        "case directories under compiler/tests/passes vs passes::REWRITES"
    );
}
