//! Whole-architecture snapshots: the IR text of each tiny checkpoint under `tests/golden/tiny`
//! as its builder makes it (`architectures__<arch>_built.snap`) and after every rewrite pass
//! (`architectures__<arch>_lowered.snap`). A change to a builder or to a pass shows up here as a
//! diff of the whole model, layer by layer.
//!
//! The passes run for an AVX2 target with f32 weights, so the snapshots do not depend on the
//! machine that runs the tests.

use compiler::compile::{lower, Lowered};
use compiler::passes::PassCtx;
use ir::{CpuIsa, DType, Op, Target};
use std::path::PathBuf;

fn checkpoint_dir(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests/golden/tiny")
        .join(arch)
}

fn op_count(graph: &ir::Graph, pred: &dyn Fn(&Op) -> bool) -> usize {
    graph
        .topo_order()
        .into_iter()
        .filter(|&n| pred(&graph.node(n).op))
        .count()
}

fn check_arch(arch: &str) {
    let dir = checkpoint_dir(arch);
    let ckpt = models::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let built = models::arch::build_graph(arch, &ckpt.config, &*ckpt.tensors)
        .unwrap_or_else(|e| panic!("{arch}: building the graph: {e}"));
    ir::verify::verify(&built).unwrap_or_else(|e| panic!("{arch} as built: {e}"));

    let ctx = PassCtx {
        target: Target::Cpu(CpuIsa::Avx2),
        weight_dtype: DType::F32,
        quant: Default::default(),
    };
    let Lowered { graph: lowered, .. } =
        lower(&dir, &ctx).unwrap_or_else(|e| panic!("{arch}: lowering: {e}"));
    ir::verify::verify(&lowered).unwrap_or_else(|e| panic!("{arch} lowered: {e}"));

    // What the snapshots must show, checked here too so that a careless snapshot update cannot
    // hide a lost fusion. Per layer: qkv and gate-up each become one matmul (7 matmuls become 4,
    // plus the logits matmul), silu * mul becomes one silu_mul, and both residual adds fuse with
    // the norm that follows, except the last one, which feeds `gather_rows` rather than a norm.
    let layers = ckpt.config.num_hidden_layers;
    assert_eq!(
        op_count(&built, &|op| *op == Op::MatMul),
        7 * layers + 1,
        "{arch}: matmuls as built"
    );
    assert_eq!(
        op_count(&built, &|op| matches!(
            op,
            Op::SiluMul | Op::AddRmsNorm { .. } | Op::Split { .. }
        )),
        0
    );
    assert_eq!(
        op_count(&lowered, &|op| *op == Op::MatMul),
        4 * layers + 1,
        "{arch}: matmuls lowered"
    );
    assert_eq!(
        op_count(&lowered, &|op| matches!(op, Op::Split { .. })),
        layers,
        "{arch}: one qkv split per layer"
    );
    assert_eq!(
        op_count(&lowered, &|op| *op == Op::SiluMul),
        layers,
        "{arch}: one silu_mul per layer"
    );
    assert_eq!(
        op_count(&lowered, &|op| matches!(op, Op::Silu | Op::Mul)),
        0,
        "{arch}: silu/mul left over"
    );
    assert_eq!(
        op_count(&lowered, &|op| matches!(op, Op::AddRmsNorm { .. })),
        2 * layers - 1,
        "{arch}: add_rms_norm"
    );
    assert_eq!(
        op_count(&lowered, &|op| *op == Op::Add),
        1,
        "{arch}: only the last residual add stays unfused"
    );

    insta::assert_snapshot!(format!("{arch}_built"), ir::text::print(&built));
    insta::assert_snapshot!(format!("{arch}_lowered"), ir::text::print(&lowered));
}

/// A mixture-of-experts checkpoint: its sparse layers are one `moe` op each, with the experts'
/// weights stacked, and survive every pass; the attention half fuses as in the dense families.
fn check_moe_arch(arch: &str) {
    let dir = checkpoint_dir(arch);
    let ckpt = models::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let moe = ckpt
        .config
        .moe
        .clone()
        .expect("a mixture-of-experts config");
    let built = models::arch::build_graph(arch, &ckpt.config, &*ckpt.tensors)
        .unwrap_or_else(|e| panic!("{arch}: building the graph: {e}"));
    ir::verify::verify(&built).unwrap_or_else(|e| panic!("{arch} as built: {e}"));
    let ctx = PassCtx {
        target: Target::Cpu(CpuIsa::Avx2),
        weight_dtype: DType::F32,
        quant: Default::default(),
    };
    let Lowered { graph: lowered, .. } =
        lower(&dir, &ctx).unwrap_or_else(|e| panic!("{arch}: lowering: {e}"));
    ir::verify::verify(&lowered).unwrap_or_else(|e| panic!("{arch} lowered: {e}"));

    let layers = ckpt.config.num_hidden_layers;
    let sparse = moe.sparse_layers.iter().filter(|&&s| s).count();
    let dense = layers - sparse;
    let shared = usize::from(moe.num_shared_experts > 0) * sparse;
    let is_moe = |op: &Op| {
        matches!(op, Op::Moe { experts, top_k, .. }
            if *experts == moe.num_experts && *top_k == moe.num_experts_per_tok)
    };
    for graph in [&built, &lowered] {
        assert_eq!(
            op_count(graph, &is_moe),
            sparse,
            "{arch}: one moe per sparse layer"
        );
    }
    // Per layer 4 attention matmuls as built, 2 after the qkv fusion; 3 per dense MLP (gate-up
    // fused: 2); the logits matmul.
    assert_eq!(
        op_count(&built, &|op| *op == Op::MatMul),
        4 * layers + 3 * (dense + shared) + 1,
        "{arch}: matmuls as built"
    );
    assert_eq!(
        op_count(&lowered, &|op| *op == Op::MatMul),
        2 * layers + 2 * (dense + shared) + 1,
        "{arch}: matmuls lowered"
    );
    assert_eq!(
        op_count(&lowered, &|op| *op == Op::SiluMul),
        dense + shared,
        "{arch}: one silu_mul per dense MLP"
    );
    let stacked = lowered
        .weights()
        .into_iter()
        .filter(|&v| {
            matches!(&lowered.value(v).def,
                ir::ValueDef::Weight { expr: ir::WeightExpr::Stack(parts), .. }
                    if parts.len() == moe.num_experts)
        })
        .count();
    assert_eq!(
        stacked,
        2 * sparse,
        "{arch}: gate-up and down stacked per sparse layer"
    );

    insta::assert_snapshot!(format!("{arch}_built"), ir::text::print(&built));
    insta::assert_snapshot!(format!("{arch}_lowered"), ir::text::print(&lowered));
}

#[test]
fn qwen3_moe() {
    check_moe_arch("qwen3_moe");
}

#[test]
fn mixtral() {
    check_moe_arch("mixtral");
}

#[test]
fn llama() {
    check_arch("llama");
}

#[test]
fn llama3_rope() {
    check_arch("llama3_rope");
}

#[test]
fn qwen2() {
    check_arch("qwen2");
}

#[test]
fn qwen3() {
    check_arch("qwen3");
}

#[test]
fn ernie4_5_moe() {
    check_moe_arch("ernie4_5_moe");
}
