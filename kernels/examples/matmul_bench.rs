//! Matmul throughput on SmolLM2-135M shapes: decode (T = 1, reported as GB/s of weights streamed)
//! and prefill (T = 512, reported as GFLOP/s), for f32, bf16 and f16 weights.
//!
//! `cargo run --release -p kernels --example matmul_bench [-- --isa avx2|avx512|portable] [--only decode|prefill]`

use half::{bf16, f16};
use ir::CpuIsa;
use kernels::cpu::{self, Weight, WeightData};
use std::time::{Duration, Instant};

/// Best time of repeated runs (after one warm-up), stopping after about `budget`.
fn best_time(budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || (start.elapsed() < budget && runs < 1000) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let isa = flag("--isa").map(|s| CpuIsa::parse(&s).expect("isa: portable, avx2 or avx512")).unwrap_or_else(CpuIsa::detect);
    let only = flag("--only");
    let ran = cpu::runnable_isa(isa);
    println!("isa asked {} ran {}, {} threads", isa.name(), ran.name(), rayon::current_num_threads());

    let mut seed = 1u64;
    let mut rand = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let largest = 1536 * 49152;
    let wf: Vec<f32> = (0..largest).map(|_| rand()).collect();
    let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
    let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
    let x: Vec<f32> = (0..512 * 1536).map(|_| rand()).collect();
    let mut out = vec![0f32; 512 * 49152];

    // (K, N) of the model's projections: q/o, k/v, gate/up (fused), down, lm_head.
    let shapes = [(576, 576), (576, 192), (576, 1536), (576, 3072), (1536, 576), (576, 49152)];
    for (name, t) in [("decode", 1usize), ("prefill", 512)] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        println!("\n{name} T={t}");
        println!("{:>6} {:>6} {:>5} {:>10} {:>9} {:>9}", "K", "N", "dtype", "time", "GFLOP/s", "GB/s");
        for &(k, n) in &shapes {
            for dtype in ["f32", "bf16", "f16"] {
                let data = match dtype {
                    "f32" => WeightData::F32(&wf[..n * k]),
                    "bf16" => WeightData::BF16(&wb[..n * k]),
                    _ => WeightData::F16(&wh[..n * k]),
                };
                let w = Weight { data, rows: n, cols: k };
                let budget = Duration::from_millis(if t == 1 { 300 } else { 1500 });
                let time = best_time(budget, || cpu::matmul(isa, &x, k, t, &w, None, &mut out, n).unwrap());
                let secs = time.as_secs_f64();
                let flops = 2.0 * (t * n * k) as f64;
                let bytes = (n * k * data.dtype().size_bytes()) as f64;
                println!(
                    "{k:>6} {n:>6} {dtype:>5} {:>8.3}ms {:>9.1} {:>9.2}",
                    secs * 1e3,
                    flops / secs / 1e9,
                    bytes / secs / 1e9
                );
            }
        }
    }
}
