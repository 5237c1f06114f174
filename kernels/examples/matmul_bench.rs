//! Matmul throughput on SmolLM2-135M shapes: decode (T = 1, reported as GB/s of weights streamed)
//! and prefill (T = 512, reported as GFLOP/s), for f32, bf16 and f16 weights.
//!
//! Weights are in the panel layout of the ISA, as the compiler writes them, unless
//! `--layout row-major` asks for the row-major paths.
//!
//! Decode is timed twice: "hot" repeats one matrix (which then sits in the last-level cache) and
//! "cold" cycles through copies totalling 256 MB, as a real model's weights (which exceed the
//! cache) are read in a decode step.
//!
//! A third section times the row-major algorithms and the panel path for T from 1 to 128 on one
//! shape, which is how the crossover row count of `MatmulPath::Auto` was chosen.
//!
//! `cargo run --release -p kernels --example matmul_bench [-- --isa avx2|avx512|portable] [--only decode|prefill|crossover] [--layout panels|row-major]`

use half::{bf16, f16};
use ir_types::CpuIsa;
use kernels::cpu::{self, MatmulPath, PackedLayout, Weight, WeightData, WeightLayout};
use std::time::Duration;

mod common;
use common::best_time;

/// Most timed runs per measurement.
const MAX_RUNS: usize = 1000;

/// A copy of `v` starting on a 64-byte boundary, as weight sections of a plan do (they are
/// page-aligned): `(buffer, offset)`, the copy being `buffer[offset..][..v.len()]`.
fn aligned<T: Copy + Default>(v: &[T]) -> (Vec<T>, usize) {
    let spare = 64 / std::mem::size_of::<T>();
    let mut buf = vec![T::default(); v.len() + spare];
    let off = buf.as_ptr().align_offset(64).min(spare);
    buf[off..][..v.len()].copy_from_slice(v);
    (buf, off)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let isa = flag("--isa")
        .map(|s| CpuIsa::parse(&s).expect("isa: portable, avx2 or avx512"))
        .unwrap_or_else(CpuIsa::detect);
    let only = flag("--only");
    let ran = cpu::runnable_isa(isa);
    let panels = WeightLayout::Panels(PackedLayout::for_isa(ran));
    let layout = match flag("--layout").as_deref() {
        None | Some("panels") => panels,
        Some("row-major") => WeightLayout::RowMajor,
        Some(other) => panic!("--layout {other}: panels or row-major"),
    };
    println!(
        "isa asked {} ran {}, {} threads, {layout:?}",
        isa.name(),
        ran.name(),
        rayon::current_num_threads()
    );
    // `w` (row-major `[n, k]`) in `layout`.
    let store = |layout: WeightLayout, w: &[f32], n: usize, k: usize| -> Vec<f32> {
        match layout {
            WeightLayout::RowMajor => w.to_vec(),
            WeightLayout::Panels(p) => p.pack(w, n, k).unwrap(),
        }
    };
    let half_of = |w: &[f32]| -> (Vec<bf16>, Vec<f16>) {
        (
            w.iter().map(|&v| bf16::from_f32(v)).collect(),
            w.iter().map(|&v| f16::from_f32(v)).collect(),
        )
    };

    let mut seed = 1u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let largest = 1536 * 49152;
    let raw: Vec<f32> = (0..largest).map(|_| rand()).collect();
    let x: Vec<f32> = (0..512 * 1536).map(|_| rand()).collect();
    let mut out = vec![0f32; 512 * 49152];

    // (K, N) of the model's projections: q/o, k/v, gate/up (fused), down, lm_head.
    let shapes = [
        (576, 576),
        (576, 192),
        (576, 1536),
        (576, 3072),
        (1536, 576),
        (576, 49152),
    ];
    for (name, t) in [("decode", 1usize), ("prefill", 512)] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        println!("\n{name} T={t}");
        if t == 1 {
            println!(
                "{:>6} {:>6} {:>5} {:>10} {:>9} {:>9} {:>10} {:>9}",
                "K", "N", "dtype", "hot", "GFLOP/s", "GB/s", "cold", "GB/s"
            );
        } else {
            println!(
                "{:>6} {:>6} {:>5} {:>10} {:>9} {:>9}",
                "K", "N", "dtype", "time", "GFLOP/s", "GB/s"
            );
        }
        for &(k, n) in &shapes {
            let wf = store(layout, &raw[..n * k], n, k);
            let (wb, wh) = half_of(&wf);
            let len = wf.len();
            let (af, ab, ah) = (aligned(&wf), aligned(&wb), aligned(&wh));
            for dtype in ["f32", "bf16", "f16"] {
                let data = match dtype {
                    "f32" => WeightData::F32(&af.0[af.1..][..len]),
                    "bf16" => WeightData::BF16(&ab.0[ab.1..][..len]),
                    _ => WeightData::F16(&ah.0[ah.1..][..len]),
                };
                let w = Weight {
                    data,
                    rows: n,
                    cols: k,
                    layout,
                };
                let budget = Duration::from_millis(if t == 1 { 300 } else { 1500 });
                let time = best_time(budget, MAX_RUNS, || {
                    cpu::matmul(isa, &x, k, t, &w, None, &mut out, n).unwrap()
                });
                let secs = time.as_secs_f64();
                let flops = 2.0 * (t * n * k) as f64;
                let bytes = (n * k * data.dtype().size_bytes()) as f64;
                let line = format!(
                    "{k:>6} {n:>6} {dtype:>5} {:>8.3}ms {:>9.1} {:>9.2}",
                    secs * 1e3,
                    flops / secs / 1e9,
                    bytes / secs / 1e9
                );
                if t > 1 {
                    println!("{line}");
                    continue;
                }
                // Cold: copies of the matrix filling 256 MB, visited in turn.
                let copies = ((256usize << 20) / bytes as usize).max(1);
                let mut next = 0;
                let cold = match dtype {
                    "f32" => {
                        let (pool, off) = aligned(&wf.repeat(copies));
                        best_time(budget, MAX_RUNS, || {
                            let w = Weight {
                                data: WeightData::F32(&pool[off + next * len..][..len]),
                                rows: n,
                                cols: k,
                                layout,
                            };
                            next = (next + 1) % copies;
                            cpu::matmul(isa, &x, k, t, &w, None, &mut out, n).unwrap()
                        })
                    }
                    "bf16" => {
                        let (pool, off) = aligned(&wb.repeat(copies));
                        best_time(budget, MAX_RUNS, || {
                            let w = Weight {
                                data: WeightData::BF16(&pool[off + next * len..][..len]),
                                rows: n,
                                cols: k,
                                layout,
                            };
                            next = (next + 1) % copies;
                            cpu::matmul(isa, &x, k, t, &w, None, &mut out, n).unwrap()
                        })
                    }
                    _ => {
                        let (pool, off) = aligned(&wh.repeat(copies));
                        best_time(budget, MAX_RUNS, || {
                            let w = Weight {
                                data: WeightData::F16(&pool[off + next * len..][..len]),
                                rows: n,
                                cols: k,
                                layout,
                            };
                            next = (next + 1) % copies;
                            cpu::matmul(isa, &x, k, t, &w, None, &mut out, n).unwrap()
                        })
                    }
                };
                let cold = cold.as_secs_f64();
                println!("{line} {:>8.3}ms {:>9.2}", cold * 1e3, bytes / cold / 1e9);
            }
        }
    }

    if only.as_deref().is_none_or(|o| o == "crossover") {
        let (k, n) = (576, 1536);
        println!("\ncrossover K={k} N={n}: time per call, row-major streamed and packed, panels");
        println!(
            "{:>5} {:>5} {:>10} {:>10} {:>10}",
            "T", "dtype", "streamed", "packed", "panels"
        );
        let wf = raw[..n * k].to_vec();
        let (wb, _) = half_of(&wf);
        let pf = store(panels, &wf, n, k);
        let (pb, _) = half_of(&pf);
        let (wf, wb, pf, pb) = (aligned(&wf), aligned(&wb), aligned(&pf), aligned(&pb));
        let (len, plen) = (n * k, panels.len(n, k));
        for t in [1, 2, 4, 6, 8, 12, 16, 24, 32, 64, 128] {
            for dtype in ["f32", "bf16"] {
                let (data, packed) = if dtype == "f32" {
                    (
                        WeightData::F32(&wf.0[wf.1..][..len]),
                        WeightData::F32(&pf.0[pf.1..][..plen]),
                    )
                } else {
                    (
                        WeightData::BF16(&wb.0[wb.1..][..len]),
                        WeightData::BF16(&pb.0[pb.1..][..plen]),
                    )
                };
                let w = Weight::row_major(data, n, k);
                let wp = Weight {
                    data: packed,
                    layout: panels,
                    ..w
                };
                let budget = Duration::from_millis(300);
                let mut time = |path, w: &Weight| {
                    best_time(budget, MAX_RUNS, || {
                        cpu::matmul_with_path(isa, path, &x, k, t, w, None, &mut out, n).unwrap()
                    })
                    .as_secs_f64()
                };
                let streamed = time(MatmulPath::Streamed, &w);
                let packed = time(MatmulPath::Packed, &w);
                let on_panels = time(MatmulPath::Auto, &wp);
                println!(
                    "{t:>5} {dtype:>5} {:>8.3}ms {:>8.3}ms {:>8.3}ms",
                    streamed * 1e3,
                    packed * 1e3,
                    on_panels * 1e3
                );
            }
        }
    }
}
