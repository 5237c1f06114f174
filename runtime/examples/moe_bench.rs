//! Mixture-of-experts benchmark: a plan with MoE layers (`scripts/bench-moe.sh` compiles one from
//! `fdc synth` of a Qwen3-30B-A3B-shaped config at reduced depth), fused against unfused.
//!
//! - The whole model through the engine, MoE fused as compiled: decode at batch 1 and 32 (32
//!   sequences, one token each per pass) and prefill, in tokens/s.
//! - The first MoE layer alone, on the plan's weights: the fused op (tokens grouped by expert,
//!   each expert's weights read once per step) against the unfused per-expert graph (every
//!   expert's MLP over every token, weighted by its routing weight, zero where not picked), at
//!   T = 1, 32 and 512 tokens. The bound is the weight bytes a step must read (the distinct
//!   experts the step's tokens picked, or all of them unfused) over the memory bandwidth this run
//!   measures.
//!
//! Usage: `cargo run --release -p runtime --example moe_bench -- PLAN [REPEATS]`.

use artifacts::schema::Launch;
use kernels::cpu::{self, Experts, MoeParams, Weight};
use rayon::prelude::*;
use runtime::{Engine, EngineOptions, LoadedPlan, Logits, SeqChunk};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let plan_path = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: moe_bench PLAN [REPEATS]"))?;
    let repeats: usize = args.get(2).map_or(Ok(3), |r| r.parse())?;
    let bandwidth = measure_bandwidth(repeats);
    println!(
        "memory bandwidth (read, all threads): {:.1} GB/s",
        bandwidth / 1e9
    );

    let context = 1024;
    let options = EngineOptions {
        max_context: context,
        max_batch_tokens: 512,
        max_num_seqs: 32,
        block_size: 64,
        kv_blocks: None,
    };
    let mut engine = Engine::new(LoadedPlan::load(plan_path.as_ref())?, options)?;
    let vocab = engine.plan().manifest.model.vocab_size as u32;
    let ids = |n: usize, seed: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 7919) >> 7) % vocab)
            .collect()
    };

    // Prefill: 512 tokens in one pass.
    let prompt = ids(512, 1);
    let prefill = best_of(repeats, || {
        engine.reset();
        engine.prefill(&prompt, false)?;
        Ok(())
    })?;
    println!("model prefill 512:   {:8.1} tok/s (fused)", 512.0 / prefill);

    // Decode at batch 1: 16 steps after an 8-token prompt.
    let steps = 16;
    let decode1 = best_of(repeats, || {
        engine.reset();
        engine.prefill(&prompt[..8], false)?;
        for &t in &prompt[8..8 + steps] {
            engine.forward_last(&[t])?;
        }
        Ok(())
    })?;
    // The timing includes the 8-token prefill; subtract it, measured alone.
    let warm8 = best_of(repeats, || {
        engine.reset();
        engine.prefill(&prompt[..8], false)?;
        Ok(())
    })?;
    println!(
        "model decode b=1:    {:8.1} tok/s (fused)",
        steps as f64 / (decode1 - warm8)
    );

    // Decode at batch 32: 32 sequences of 8 prompt tokens, then 8 steps of one token each.
    let seqs = 32;
    let per_seq = context / 64;
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..seqs).map(|s| ids(8, s as u32 + 2)).collect();
    let batch_steps = 8;
    let mut best32 = f64::MAX;
    for _ in 0..repeats {
        let chunks: Vec<SeqChunk> = (0..seqs)
            .map(|s| SeqChunk {
                blocks: &tables[s],
                start: 0,
                tokens: &prompts[s],
                logits: Logits::None,
            })
            .collect();
        engine.forward_batch(&chunks)?;
        let start = Instant::now();
        for step in 0..batch_steps {
            let chunks: Vec<SeqChunk> = (0..seqs)
                .map(|s| SeqChunk {
                    blocks: &tables[s],
                    start: 8 + step,
                    tokens: &prompts[s][step..step + 1],
                    logits: Logits::Last,
                })
                .collect();
            engine.forward_batch(&chunks)?;
        }
        best32 = best32.min(start.elapsed().as_secs_f64());
    }
    println!(
        "model decode b=32:   {:8.1} tok/s (fused)",
        (seqs * batch_steps) as f64 / best32
    );

    // The first MoE layer alone, fused against unfused.
    let plan = engine.plan();
    let Some(Launch::Moe {
        router,
        bias,
        gate_up,
        down,
        experts,
        top_k,
        routing,
        normalize,
        scaling,
        x,
        ..
    }) = plan
        .program
        .steps
        .iter()
        .map(|s| &s.launch)
        .find(|l| matches!(l, Launch::Moe { .. }))
    else {
        anyhow::bail!("the plan has no MoE layer");
    };
    let params = MoeParams {
        experts: *experts as usize,
        top_k: *top_k as usize,
        routing: *routing,
        normalize: *normalize,
        scaling: *scaling,
    };
    let (router, gate_up, down) = (
        plan.weight(*router),
        plan.experts(*gate_up),
        plan.experts(*down),
    );
    let bias = bias.map(|b| plan.vector(b));
    let c = x.cols as usize;
    let e = params.experts;
    let i = gate_up.rows() / (2 * e);
    let expert_bytes = gate_up.expert_bytes(2 * i) + down.expert_bytes(c);
    let stored = match &gate_up {
        Experts::Plain(w) => format!("{:?}", w.data.dtype()),
        Experts::Quant(w, act) => format!("{:?} g{} {act:?}", w.format.codes, w.format.group),
    };
    println!(
        "moe layer: {e} experts, top {}, C {c}, I {i}, {:?}, {:.2} MB per expert, {stored} weights",
        params.top_k,
        params.routing,
        expert_bytes as f64 / 1e6,
    );
    let isa = plan
        .manifest
        .target
        .cpu_isa()
        .ok_or_else(|| anyhow::anyhow!("the MoE benchmark runs CPU plans only"))?;
    println!("| T | fused tok/s | unfused tok/s | experts read (fused) | fused bound tok/s | unfused bound tok/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for t in [1usize, 32, 512] {
        let input: Vec<f32> = (0..t * c)
            .map(|k| ((k as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            .collect();
        let mut out = vec![0.0f32; t * c];
        let fused = best_of(repeats, || {
            cpu::moe(
                isa, &input, c, t, &router, bias, &gate_up, &down, &params, &mut out, c,
            )
            .map_err(anyhow::Error::from)
        })?;
        let fused_out = out.clone();
        let unfused = best_of(repeats, || {
            moe_unfused(
                isa, &input, t, &router, bias, &gate_up, &down, &params, &mut out,
            )
        })?;
        let diff = fused_out
            .iter()
            .zip(&out)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let scale = fused_out.iter().fold(0.0f32, |m, a| m.max(a.abs()));
        anyhow::ensure!(
            diff <= 1e-4 * scale.max(1e-6),
            "fused and unfused differ by {diff} (scale {scale}) at T={t}"
        );
        let used = experts_used(isa, &input, t, &router, bias, &params)?;
        let bound =
            |n_experts: usize| t as f64 / (n_experts as f64 * expert_bytes as f64 / bandwidth);
        println!(
            "| {t} | {:.1} | {:.1} | {used} of {e} | {:.1} | {:.1} |",
            t as f64 / fused,
            t as f64 / unfused,
            bound(used),
            bound(e)
        );
    }
    Ok(())
}

fn best_of(repeats: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Per token, its routing weight for every expert (0 where not picked).
fn routing_weights(
    isa: ir_types::CpuIsa,
    x: &[f32],
    t: usize,
    router: &Weight,
    bias: Option<&[f32]>,
    params: &MoeParams,
) -> anyhow::Result<Vec<f32>> {
    let e = params.experts;
    let mut logits = vec![0.0f32; t * e];
    cpu::matmul(isa, x, router.cols, t, router, None, &mut logits, e)?;
    let mut weights = vec![0.0f32; t * e];
    for (token, row) in logits.chunks_exact(e).enumerate() {
        for (expert, w) in cpu::moe_route(row, bias, params) {
            weights[token * e + expert] = w;
        }
    }
    Ok(weights)
}

fn experts_used(
    isa: ir_types::CpuIsa,
    x: &[f32],
    t: usize,
    router: &Weight,
    bias: Option<&[f32]>,
    params: &MoeParams,
) -> anyhow::Result<usize> {
    let weights = routing_weights(isa, x, t, router, bias, params)?;
    let e = params.experts;
    Ok((0..e)
        .filter(|&x| (0..t).any(|token| weights[token * e + x] != 0.0))
        .count())
}

/// The per-expert graph: every expert's SwiGLU MLP over all `t` tokens, each output row scaled
/// by the token's routing weight for that expert (zero where it was not picked) and summed.
#[allow(clippy::too_many_arguments)]
fn moe_unfused(
    isa: ir_types::CpuIsa,
    x: &[f32],
    t: usize,
    router: &Weight,
    bias: Option<&[f32]>,
    gate_up: &Experts,
    down: &Experts,
    params: &MoeParams,
    out: &mut [f32],
) -> anyhow::Result<()> {
    let (c, e) = (router.cols, params.experts);
    let i = gate_up.rows() / (2 * e);
    let weights = routing_weights(isa, x, t, router, bias, params)?;
    out.fill(0.0);
    let (mut gu, mut act, mut y) = (vec![0.0; t * 2 * i], vec![0.0; t * i], vec![0.0; t * c]);
    for expert_idx in 0..e {
        gate_up
            .expert(expert_idx, 2 * i)?
            .matmul(isa, x, c, t, &mut gu, 2 * i)?;
        cpu::silu_mul(isa, &gu, 2 * i, t, i, &mut act, i)?;
        down.expert(expert_idx, c)?
            .matmul(isa, &act, i, t, &mut y, c)?;
        for token in 0..t {
            let w = weights[token * e + expert_idx];
            for (o, v) in out[token * c..][..c].iter_mut().zip(&y[token * c..][..c]) {
                *o += w * v;
            }
        }
    }
    Ok(())
}

/// Read bandwidth: the best of `repeats` parallel reductions over 1 GiB. The reduction is a
/// wrapping integer sum, which vectorizes (an f32 sum is one serial chain and measures the adder).
fn measure_bandwidth(repeats: usize) -> f64 {
    let data = vec![1u32; 1 << 28];
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let sum = data
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u32, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u32::wrapping_add);
        std::hint::black_box(sum);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (data.len() * 4) as f64 / best
}
