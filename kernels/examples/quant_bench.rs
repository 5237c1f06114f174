//! Quantized matmul throughput on SmolLM2-135M shapes: decode (T = 1, weights cycled through
//! copies totalling 256 MB so they come from memory, as in a real decode step) and prefill
//! (T = 512), for each code format, beside the dense bf16 panel matmul in the same run.
//!
//! `cargo run --release -p kernels --example quant_bench [-- --isa avx2|avx512|portable]`

use half::{bf16, f16};
use ir_types::{ActQuant, CodeFormat, CpuIsa};
use kernels::cpu::{self, PackedLayout, QuantFormat, QuantMatrix, QuantWeight, Weight};
use kernels::cpu::{WeightData, WeightLayout};
use std::time::Duration;

mod common;
use common::best_time;

/// Most timed runs per measurement.
const MAX_RUNS: usize = 1000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let isa = args
        .iter()
        .position(|a| a == "--isa")
        .and_then(|i| args.get(i + 1))
        .map(|s| CpuIsa::parse(s).expect("isa: portable, avx2 or avx512"))
        .unwrap_or_else(CpuIsa::detect);
    let ran = cpu::runnable_isa(isa);
    let layout = PackedLayout::for_isa(ran);
    println!(
        "isa {}, {} threads, panels of {}",
        ran.name(),
        rayon::current_num_threads(),
        layout.panel()
    );
    let mut seed = 1u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let x: Vec<f32> = (0..512 * 1536)
        .map(|_| next() as f32 / u32::MAX as f32 - 0.25)
        .collect();
    let mut out = vec![0f32; 512 * 3072];
    let formats = [
        ("w4 g32 asym", CodeFormat::Int(4), 32, true),
        ("w8 g32 sym", CodeFormat::Int(8), 32, false),
        ("w2 g32 asym", CodeFormat::Int(2), 32, true),
        ("fp8 channel", CodeFormat::Fp8E4M3, 0, false),
    ];
    println!(
        "{:>5} {:>5} {:<12} {:>12} {:>8} {:>14} {:>9}",
        "K", "N", "weights", "decode", "GB/s", "prefill 512", "GFLOP/s"
    );
    for (k, n) in [(576, 960), (576, 576), (576, 3072), (1536, 576)] {
        for &(name, codes, group, asymmetric) in &formats {
            let format = QuantFormat {
                codes,
                group: if group == 0 { k } else { group },
                asymmetric,
            };
            let groups = n * format.groups(k);
            let m = QuantMatrix {
                format,
                rows: n,
                cols: k,
                codes: (0..n * k)
                    .map(|_| match codes {
                        CodeFormat::Fp8E4M3 => (next() % 126) as u8,
                        _ => (next() % (1 << codes.bits())) as u8,
                    })
                    .collect(),
                scales: (0..groups).map(|_| f16::from_f32(0.01)).collect(),
                mins: if asymmetric {
                    (0..groups).map(|_| f16::from_f32(-0.05)).collect()
                } else {
                    vec![]
                },
            };
            let packed = m.pack(layout).unwrap();
            let bytes = packed.codes.len() + 2 * (packed.scales.len() + packed.mins.len());
            let copies = ((256usize << 20) / bytes).max(1);
            let pool: Vec<_> = (0..copies).map(|_| packed.clone()).collect();
            let weight = |p: usize| QuantWeight {
                format,
                layout,
                rows: n,
                cols: k,
                codes: &pool[p].codes,
                scales: &pool[p].scales,
                mins: &pool[p].mins,
            };
            let mut turn = 0;
            let decode = best_time(Duration::from_millis(300), MAX_RUNS, || {
                turn = (turn + 1) % copies;
                cpu::matmul_quant(
                    isa,
                    ActQuant::None,
                    &x,
                    k,
                    1,
                    &weight(turn),
                    None,
                    &mut out,
                    n,
                )
                .unwrap()
            });
            let prefill = best_time(Duration::from_millis(1000), MAX_RUNS, || {
                cpu::matmul_quant(
                    isa,
                    ActQuant::None,
                    &x,
                    k,
                    512,
                    &weight(0),
                    None,
                    &mut out,
                    n,
                )
                .unwrap()
            });
            println!(
                "{k:>5} {n:>5} {name:<12} {:>10.1}us {:>8.2} {:>12.2}ms {:>9.1}",
                decode.as_secs_f64() * 1e6,
                bytes as f64 / decode.as_secs_f64() / 1e9,
                prefill.as_secs_f64() * 1e3,
                2.0 * (512 * n * k) as f64 / prefill.as_secs_f64() / 1e9
            );
        }
        // The dense bf16 panel matmul on the same shape.
        let dense: Vec<f32> = (0..n * k)
            .map(|_| next() as f32 / u32::MAX as f32)
            .collect();
        let panels = layout.pack(&dense, n, k).unwrap();
        let half: Vec<bf16> = panels.iter().map(|&v| bf16::from_f32(v)).collect();
        let copies = ((256usize << 20) / (2 * half.len())).max(1);
        let pool = half.repeat(copies);
        let w = |c: usize| Weight {
            data: WeightData::BF16(&pool[c * half.len()..][..half.len()]),
            rows: n,
            cols: k,
            layout: WeightLayout::Panels(layout),
        };
        let mut turn = 0;
        let decode = best_time(Duration::from_millis(300), MAX_RUNS, || {
            turn = (turn + 1) % copies;
            cpu::matmul(isa, &x, k, 1, &w(turn), None, &mut out, n).unwrap()
        });
        let prefill = best_time(Duration::from_millis(1000), MAX_RUNS, || {
            cpu::matmul(isa, &x, k, 512, &w(0), None, &mut out, n).unwrap()
        });
        println!(
            "{k:>5} {n:>5} {:<12} {:>10.1}us {:>8.2} {:>12.2}ms {:>9.1}",
            "bf16 dense",
            decode.as_secs_f64() * 1e6,
            (2 * n * k) as f64 / decode.as_secs_f64() / 1e9,
            prefill.as_secs_f64() * 1e3,
            2.0 * (512 * n * k) as f64 / prefill.as_secs_f64() / 1e9
        );
    }
}
