//! Kernel selection for every target and every quantization scheme, as snapshots: for a dense
//! model (tiny llama) and a mixture of experts with latent attention (tiny DeepSeek-V3), which
//! registry kernel each op gets, or the error that refuses the pair. A change to the target
//! table, the registry or the selection shows up as a diff of this table.
//!
//! Selection needs no code generation, so this runs without NVRTC or a HIP compiler.

use compiler::compile::{lower, Lowered};
use compiler::passes::quantize_weights::{self, QuantOptions};
use compiler::passes::{select_kernels, PassCtx};
use ir::{DType, QuantScheme, Target};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

fn checkpoint_dir(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests/golden/tiny")
        .join(arch)
}

/// `op: kernel xN` for each distinct pair, or the refusal.
fn selection(arch: &str, target: Target, scheme: QuantScheme) -> String {
    let ctx = PassCtx {
        target,
        weight_dtype: DType::BF16,
        quant: QuantOptions {
            scheme,
            ..Default::default()
        },
    };
    let dir = checkpoint_dir(arch);
    let Lowered { graph, .. } = match lower(&dir, &ctx) {
        Ok(l) => l,
        Err(e) => return format!("refused: {e}"),
    };
    let quant = match quantize_weights::run(&graph, &ctx) {
        Ok(q) => q,
        Err(e) => return format!("refused: {e}"),
    };
    let chosen = match select_kernels::run_quantized(&graph, &ctx, &quant) {
        Ok(s) => s,
        Err(e) => return format!("refused: {e}"),
    };
    let mut counts: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for (node, entry) in &chosen {
        let op = graph.node(*node).op.kind().map_or("?", |k| k.name());
        *counts.entry((op.to_string(), entry.id.0)).or_default() += 1;
    }
    counts
        .iter()
        .map(|((op, id), n)| format!("{op}: {id} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn table(arch: &str) -> String {
    let mut out = String::new();
    for target in Target::ALL {
        for &scheme in QuantScheme::ALL {
            let _ = writeln!(
                out,
                "{} {scheme}: {}",
                target.name(),
                selection(arch, target, scheme)
            );
        }
    }
    out
}

#[test]
fn kernel_selection_dense() {
    let text = table("llama");
    // What the snapshot must show, checked here so that a careless update cannot hide it: the
    // DCU's W4A8 matmul is its own kernel, FP8 is refused on the DCU and on sm80, and every
    // other pair selects.
    assert!(text.contains("dcu-gfx906 w4a8: ") && text.contains("matmul: matmul_w4a8_gfx906"));
    for refused in ["dcu-gfx906 fp8: refused", "cuda-sm80 fp8: refused"] {
        assert!(text.contains(refused), "{refused}\n{text}");
    }
    assert_eq!(text.matches("refused").count(), 2, "{text}");
    insta::assert_snapshot!(text);
}

#[test]
fn kernel_selection_experts_and_latent_attention() {
    let text = table("deepseek_v3");
    assert!(text.contains("moe: moe_w4a8_gfx906"), "{text}");
    assert!(
        text.contains("mla_attention: mla_attention_f32_gfx906"),
        "{text}"
    );
    assert_eq!(text.matches("refused").count(), 2, "{text}");
    insta::assert_snapshot!(text);
}
