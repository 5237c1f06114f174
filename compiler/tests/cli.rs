//! `fdc` as a user runs it: every bad input is a one-line error and a non-zero exit code, and a
//! good compile is deterministic (the same input twice gives the same bytes).

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn tiny(arch: &str) -> PathBuf {
    workspace().join("tests/golden/tiny").join(arch)
}

/// Runs fdc; returns (success, stdout, stderr).
fn fdc(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fdc"))
        .args(args)
        .output()
        .expect("fdc runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// fdc must fail, without a panic, with every `expected` fragment in its message.
fn check_fails(args: &[&str], expected: &[&str]) {
    let (ok, _, err) = fdc(args);
    assert!(!ok, "fdc {args:?} should fail");
    assert!(!err.contains("panicked"), "fdc {args:?} panicked:\n{err}");
    for e in expected {
        assert!(
            err.contains(e),
            "fdc {args:?}: error should mention {e:?}, got:\n{err}"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn missing_model_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.fdp");
    check_fails(
        &["compile", "/no/such/model", "-o", out.to_str().unwrap()],
        &["/no/such/model"],
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    check_fails(
        &[
            "compile",
            empty.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &["config.json"],
    );
    assert!(!out.exists(), "a failed compile leaves no plan behind");
}

#[test]
fn unsupported_architecture_names_it_and_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gpt2");
    copy_dir(&tiny("llama"), &model);
    let config = std::fs::read_to_string(model.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel")
        .replace("\"llama\"", "\"gpt2\"");
    std::fs::write(model.join("config.json"), config).unwrap();
    let out = dir.path().join("x.fdp");
    check_fails(
        &[
            "compile",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &[
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "MixtralForCausalLM",
        ],
    );
}

#[test]
fn tensor_shape_that_contradicts_the_config_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("llama");
    copy_dir(&tiny("llama"), &model);
    let config = std::fs::read_to_string(model.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(model.join("config.json"), config).unwrap();
    let out = dir.path().join("x.fdp");
    check_fails(
        &[
            "compile",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &["mlp.gate_proj.weight", "[128, 64]", "[96, 64]"],
    );
}

/// A minimal GGUF v3 file: llama metadata and one tensor of ggml type `ggml_type` with `data`.
fn gguf_with_tensor(ggml_type: u32, elements: u64, data: &[u8]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // metadata entries
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // string
    string(&mut out, "llama");
    string(&mut out, "token_embd.weight");
    out.extend(1u32.to_le_bytes());
    out.extend(elements.to_le_bytes());
    out.extend(ggml_type.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(data);
    out
}

#[test]
fn unsupported_gguf_tensor_type_names_the_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("q5.gguf");
    // ggml type 6 is Q5_0: 32 values in 22 bytes.
    std::fs::write(&model, gguf_with_tensor(6, 32, &[0u8; 22])).unwrap();
    let out = dir.path().join("x.fdp");
    check_fails(
        &[
            "compile",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &["token_embd.weight", "q5_0"],
    );
}

#[test]
fn corrupt_gguf_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("bad.gguf");
    std::fs::write(&model, b"GGUF\x03\x00\x00\x00 truncated").unwrap();
    let out = dir.path().join("x.fdp");
    check_fails(
        &[
            "compile",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &["bad.gguf"],
    );
    std::fs::write(&model, b"not a gguf file at all, just text").unwrap();
    check_fails(
        &[
            "compile",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &["GGUF"],
    );
}

#[test]
fn bad_flags_list_the_choices() {
    let model = tiny("llama");
    check_fails(
        &["compile", model.to_str().unwrap(), "--target", "tpu"],
        &["tpu", "cpu-avx2", "dcu-gfx906", "fdc targets"],
    );
    // A scheme the target has no kernels for names the schemes it has and the targets that
    // have the scheme.
    check_fails(
        &[
            "compile",
            model.to_str().unwrap(),
            "--target",
            "cuda-sm80",
            "--quant",
            "fp8",
        ],
        &["cuda-sm80", "cannot run --quant fp8", "w4a8", "cuda-sm90"],
    );
    check_fails(
        &["compile", model.to_str().unwrap(), "--dtype", "f8"],
        &["f8", "bf16"],
    );
    // The tile layout is the CUDA targets'.
    check_fails(
        &[
            "compile",
            model.to_str().unwrap(),
            "--target",
            "dcu",
            "--quant-tiles",
        ],
        &["--quant-tiles", "dcu-gfx906", "CUDA"],
    );
    check_fails(&["inspect", "/no/such/plan.fdp"], &["/no/such/plan.fdp"]);
}

#[test]
fn compiling_twice_gives_identical_plans_and_inspect_describes_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny("qwen2");
    let (a, b) = (dir.path().join("a.fdp"), dir.path().join("b.fdp"));
    for out in [&a, &b] {
        let (ok, stdout, err) = fdc(&[
            "compile",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--target",
            "cpu-avx2",
            "--quiet",
        ]);
        assert!(ok, "compile failed: {err}");
        assert!(stdout.contains("wrote"), "{stdout}");
    }
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "two compiles of one model differ"
    );
    let (ok, report, err) = fdc(&["inspect", a.to_str().unwrap()]);
    assert!(ok, "{err}");
    for expected in [
        "qwen2",
        "cpu-avx2",
        "parameters",
        "matmul_f32_avx2",
        "memory plan",
        "model.safetensors",
        "blake3",
    ] {
        assert!(
            report.contains(expected),
            "inspect should mention {expected}:\n{report}"
        );
    }
}

#[test]
fn targets_prints_the_table_with_aliases_and_what_ran_on_hardware() {
    let (ok, table, _) = fdc(&["targets"]);
    assert!(ok);
    for expected in [
        "dcu-gfx906",
        "dcu,hip-gfx906",
        "wavefronts of 64",
        "cpu-x86-64-v4",
        "compiled only",
        "v_dot4_i32_i8",
    ] {
        assert!(table.contains(expected), "{expected}:\n{table}");
    }
}

#[test]
fn kernel_list_shows_the_registry() {
    let (ok, table, _) = fdc(&["kernels", "--list"]);
    assert!(ok);
    assert!(
        table.contains("matmul_bf16_avx512") && table.contains("rms_norm_f32_gen_avx2"),
        "{table}"
    );
}

#[test]
fn part_sizes_and_snapshot_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.fdp");
    let (model, out) = (tiny("llama"), out.to_str().unwrap().to_string());
    let model = model.to_str().unwrap();
    for size in ["0", "5XB", "MB", "3.5MB", "99999999999999999999GB"] {
        check_fails(
            &["compile", model, "-o", &out, "--part-size", size],
            &["--part-size", size],
        );
    }
    check_fails(
        &["compile", model, "-o", &out, "--weights-only"],
        &["--snapshot-id"],
    );
    check_fails(
        &[
            "compile",
            model,
            "-o",
            &out,
            "--weights-only",
            "--snapshot-id",
            "a.b",
        ],
        &["snapshot id", "'.'"],
    );
}

#[test]
fn a_plan_in_parts_and_a_snapshot_are_written_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sub/tiny.fdp");
    let (model, out) = (tiny("llama"), out.to_str().unwrap().to_string());
    let model = model.to_str().unwrap();
    let (ok, stdout, err) = fdc(&[
        "compile",
        model,
        "-o",
        &out,
        "--part-size",
        "64KiB",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("tiny.part0.fdw"), "{stdout}");
    let (ok, listing, err) = fdc(&["inspect", &out]);
    assert!(ok, "{err}");
    assert!(
        listing.contains("part files") && listing.contains("tiny.part1.fdw"),
        "{listing}"
    );
    let (ok, stdout, err) = fdc(&[
        "compile",
        model,
        "-o",
        &out,
        "--weights-only",
        "--snapshot-id",
        "34",
        "--rank",
        "12",
        "--part-size",
        "64KiB",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("tiny.tp12.34.part0.fdw"), "{stdout}");
    let part = dir.path().join("sub/tiny.tp12.34.part0.fdw");
    let (ok, listing, err) = fdc(&["inspect", part.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        listing.contains("snapshot \"34\" rank 12") && listing.contains("part 0 of"),
        "{listing}"
    );
    assert!(
        !stdout.contains("tiny.fdp ("),
        "a snapshot writes no plan: {stdout}"
    );
}
