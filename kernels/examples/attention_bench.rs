//! Attention timings on SmolLM2-135M shapes (H = 9, KV = 3, D = 64): prefill of 512 tokens
//! (GFLOP/s) and single-token decode against caches of growing length (GB/s of K/V read).
//!
//! `cargo run --release -p kernels --example attention_bench [-- --isa avx2|avx512|portable] [--only prefill|decode]`

use ir_types::CpuIsa;
use kernels::cpu::{self, KvLayerMut};
use std::time::Duration;

mod common;
use common::best_time;

/// Most timed runs per measurement.
const MAX_RUNS: usize = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let isa = args
        .iter()
        .position(|a| a == "--isa")
        .and_then(|i| args.get(i + 1))
        .map(|s| CpuIsa::parse(s).expect("isa: portable, avx2 or avx512"))
        .unwrap_or_else(CpuIsa::detect);
    println!(
        "isa asked {} ran {}, {} threads",
        isa.name(),
        cpu::runnable_isa(isa).name(),
        rayon::current_num_threads()
    );

    let (h, kv, d) = (9usize, 3usize, 64usize);
    let capacity = 4096;
    let mut seed = 7u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let mut cache_k: Vec<f32> = (0..capacity * kv * d).map(|_| rand()).collect();
    let mut cache_v: Vec<f32> = (0..capacity * kv * d).map(|_| rand()).collect();
    let t_max = 512;
    let q: Vec<f32> = (0..t_max * h * d).map(|_| rand()).collect();
    let k: Vec<f32> = (0..t_max * kv * d).map(|_| rand()).collect();
    let v: Vec<f32> = (0..t_max * kv * d).map(|_| rand()).collect();
    let mut out = vec![0f32; t_max * h * d];
    let scale = 1.0 / (d as f32).sqrt();

    let mut run = |t: usize, first: usize| {
        let positions: Vec<u32> = (first..first + t).map(|p| p as u32).collect();
        let mut cache = KvLayerMut::contiguous(&mut cache_k, &mut cache_v, capacity, kv, d);
        best_time(Duration::from_millis(500), MAX_RUNS, || {
            cpu::attention(
                isa,
                &q,
                h * d,
                &k,
                kv * d,
                &v,
                kv * d,
                t,
                &positions,
                h,
                kv,
                d,
                scale,
                &mut cache,
                &mut out,
                h * d,
            )
            .unwrap()
        })
    };

    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // Prefill also fills the cache, so the decode timings below read real keys and values.
    let secs = run(512, 0).as_secs_f64();
    let pairs: usize = (1..=512).sum();
    let flops = 4.0 * (h * d * pairs) as f64;
    if only.as_deref() != Some("decode") {
        println!(
            "prefill T=512: {:.3} ms, {:.1} GFLOP/s",
            secs * 1e3,
            flops / secs / 1e9
        );
    }
    if only.as_deref() == Some("prefill") {
        return;
    }
    for p in [127, 511, 2047, 4095] {
        let secs = run(1, p).as_secs_f64();
        let bytes = 2.0 * ((p + 1) * kv * d * 4) as f64;
        let flops = 4.0 * (h * d * (p + 1)) as f64;
        println!(
            "decode at position {p:>4}: {:.3} ms, {:.1} GB/s of K/V, {:.1} GFLOP/s",
            secs * 1e3,
            bytes / secs / 1e9,
            flops / secs / 1e9
        );
    }
}
