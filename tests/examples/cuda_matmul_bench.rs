//! Decode-shaped matmuls on the GPU: the plan module's matmul kernels (and, for experiments,
//! kernels from an extra CUDA file with the same signature) timed on Llama-3-8B's projection
//! shapes with weights cold in DRAM, as in a decode step. Prints GB/s of weights read next to
//! the device-to-device copy bandwidth measured in the same run (the roofline a decode step is
//! held to), and checks every variant's output against the module's kernel.
//!
//! ```text
//! cargo run --release -p tests --example cuda_matmul_bench -- [--extra FILE.cu] [--tokens T] \
//!     [--quant BITS [--group G] [--sym]] [FUNCTION:ROWS_PER_BLOCK:THREADS ...]
//! ```
//!
//! Each function takes the matmul kernels' arguments (`kernels/cuda/matmul.cu`); ROWS_PER_BLOCK
//! weight rows go to one block of THREADS threads, and each block takes 4 tokens; ROWS_PER_BLOCK
//! written `xB` launches B blocks per SM instead (the stream kernels, which walk their rows). The default is
//! the module's `matmul_bf16` (`matmul_bf16_one` for one token). With `--quant 8|4|2` the
//! weights are random codes in the layout of quantized CUDA plans (groups of G, default 32,
//! asymmetric below 8 bits unless `--sym`), the functions take the quantized matmul's arguments (`kernels/cuda/quant.cu`), and
//! the default is the module's `matmul_q{BITS}` (`matmul_q{BITS}_one` for one token).

#[path = "../tests/common/random.rs"]
mod random;

use compiler::codegen::cuda;
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::{CudaContext, CudaSlice, LaunchConfig, PushKernelArg};
use ir::CudaArch;
use runtime::cuda::device_arch;
use std::sync::Arc;

/// Llama-3-8B's projections as (name, K, N): fused QKV, output, fused gate/up, down, LM head.
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("gate_up", 4096, 28672),
    ("down", 14336, 4096),
    ("lm_head", 4096, 128256),
];

/// Weight copies cycled through so that every launch reads from DRAM, not the 50 MB L2.
const COLD_BYTES: usize = 1 << 30;

struct Variant {
    function: String,
    grid: Grid,
    threads: u32,
}

#[derive(Clone, Copy)]
enum Grid {
    RowsPerBlock(u32),
    BlocksPerSm(u32),
}

fn main() {
    let mut extra = None;
    let mut tokens = 1usize;
    let mut quant_bits: Option<u8> = None;
    let mut group = 32usize;
    let mut symmetric = false;
    let mut variants = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--extra" => extra = Some(args.next().expect("--extra FILE")),
            "--quant" => {
                quant_bits = Some(
                    args.next()
                        .and_then(|b| b.parse().ok())
                        .expect("--quant BITS"),
                )
            }
            "--group" => group = args.next().and_then(|g| g.parse().ok()).expect("--group G"),
            "--sym" => symmetric = true,
            "--tokens" => {
                tokens = args
                    .next()
                    .and_then(|t| t.parse().ok())
                    .expect("--tokens T")
            }
            spec => {
                let parts: Vec<&str> = spec.split(':').collect();
                let [function, rows, threads] = parts[..] else {
                    panic!("expected FUNCTION:ROWS_PER_BLOCK:THREADS, got {spec}")
                };
                let grid = match rows.strip_prefix('x') {
                    Some(b) => Grid::BlocksPerSm(b.parse().expect("blocks per SM")),
                    None => Grid::RowsPerBlock(rows.parse().expect("rows per block")),
                };
                variants.push(Variant {
                    function: function.to_string(),
                    grid,
                    threads: threads.parse().expect("threads"),
                });
            }
        }
    }
    let reference = match quant_bits {
        None => Variant {
            function: "matmul_bf16".into(),
            grid: Grid::RowsPerBlock(8),
            threads: 256,
        },
        Some(bits) => Variant {
            function: format!("matmul_q{bits}"),
            grid: Grid::RowsPerBlock(8),
            threads: runtime::cuda::QUANT_MATMUL_THREADS,
        },
    };
    if variants.is_empty() {
        // What a pass of this many tokens runs: the single-token kernel for one.
        let function = if tokens == 1 {
            format!("{}_one", reference.function)
        } else {
            reference.function.clone()
        };
        variants.push(Variant {
            function,
            ..reference
        });
    }
    let mut source = kernels::cuda::module_source(&kernels::cuda::ModuleSpec { head_dim: 128 });
    if let Some(path) = &extra {
        source.push_str(&std::fs::read_to_string(path).expect("reading the extra source"));
    }
    let Ok((name, arch)) = device_arch(0) else {
        // No device: the sources are still compiled, so that a variant's errors show here.
        cuda::compile(&source, CudaArch::Sm90).expect("compiling the module");
        println!("no CUDA device: the module compiled for sm_90, nothing timed");
        return;
    };
    let arch: CudaArch = arch.expect("a GPU fdc builds for");
    let module = cuda::compile(&source, arch).expect("compiling the module");
    let ctx = CudaContext::new(0).expect("context");
    let s = ctx.new_stream().expect("stream");
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(module.cubin.clone()))
        .expect("loading the module");
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .expect("SM count") as u32;
    println!("{name}, {sms} SMs, {tokens} token(s) per launch");

    let copy_gbs = copy_bandwidth(&ctx, &s);
    println!("device-to-device copy: {copy_gbs:.0} GB/s (bytes read plus written)");

    for (shape, k, n) in SHAPES {
        let weight = match quant_bits {
            None => WeightBytes::bf16(k, n),
            Some(bits) => WeightBytes::quantized(bits, k, n, group, !symmetric && bits < 8),
        };
        let bytes = weight.bytes.len();
        let copies = COLD_BYTES.div_ceil(bytes).max(2);
        // The same values at different addresses: the L2 caches by address.
        let weights: Vec<CudaSlice<u8>> = (0..copies)
            .map(|_| s.clone_htod(&weight.bytes).expect("weights"))
            .collect();
        let x_host: Vec<f32> = random::uniform(tokens * k, 99);
        let x = s.clone_htod(&x_host).expect("x");
        let mut want = None;
        for (i, v) in std::iter::once(&reference).chain(&variants).enumerate() {
            let Ok(f) = module.load_function(&v.function) else {
                println!("  {shape}: no function {}", v.function);
                continue;
            };
            let mut out = s.alloc_zeros::<f32>(tokens * n).expect("out");
            let launch = |w: &CudaSlice<u8>, out: &mut CudaSlice<f32>| {
                let (ki, ni, ti) = (k as i32, n as i32, tokens as i32);
                let base = {
                    let (p, _) = cudarc::driver::DevicePtr::device_ptr(w, &s);
                    p
                };
                let (group, scales, mins) = (
                    weight.group,
                    base + weight.scales_offset,
                    weight.mins_offset.map_or(0, |m| base + m),
                );
                let mut b = s.launch_builder(&f);
                b.arg(&x).arg(&ki).arg(w).arg(&ki).arg(&ni);
                if quant_bits.is_some() {
                    // ... then the rows' activation scales (none: A16).
                    b.arg(&group).arg(&scales).arg(&mins).arg(&0u64);
                }
                b.arg(&0u64).arg(&ti).arg(out).arg(&ni);
                let config = LaunchConfig {
                    grid_dim: match v.grid {
                        Grid::RowsPerBlock(rows) => {
                            ((n as u32).div_ceil(rows), (tokens as u32).div_ceil(4), 1)
                        }
                        Grid::BlocksPerSm(b) => ((b * sms).min((n as u32).div_ceil(8)), 1, 1),
                    },
                    block_dim: (v.threads, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments follow the matmul kernels' signature; every buffer is
                // sized for the shape.
                unsafe { b.launch(config) }.expect("launch");
            };
            launch(&weights[0], &mut out);
            let got = s.clone_dtoh(&out).expect("out");
            let diff = match &want {
                None => {
                    want = Some(got);
                    0.0
                }
                Some(w) => max_relative_difference(&got, w),
            };
            if i == 0 {
                continue; // the reference output only
            }
            let launches = 3 * copies;
            let start = ctx.new_event(Some(CU_EVENT_DEFAULT)).expect("event");
            let end = ctx.new_event(Some(CU_EVENT_DEFAULT)).expect("event");
            start.record(&s).expect("record");
            for i in 0..launches {
                launch(&weights[i % copies], &mut out);
            }
            end.record(&s).expect("record");
            let ms = start.elapsed_ms(&end).expect("elapsed") as f64 / launches as f64;
            let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
            println!(
                "  {shape:8} K {k:6} N {n:6}  {:28} {:8.1} us  {gbs:6.0} GB/s  {:4.0}% of copy  max diff {diff:.1e}",
                v.function,
                ms * 1e3,
                100.0 * gbs / copy_gbs,
            );
        }
    }
}

/// Bytes read plus written per second by a 1 GB device-to-device copy, best of five.
fn copy_bandwidth(ctx: &Arc<CudaContext>, s: &Arc<cudarc::driver::CudaStream>) -> f64 {
    let n = 1usize << 28;
    let src = s.alloc_zeros::<f32>(n).expect("copy source");
    let mut dst = s.alloc_zeros::<f32>(n).expect("copy target");
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = ctx.new_event(Some(CU_EVENT_DEFAULT)).expect("event");
        let end = ctx.new_event(Some(CU_EVENT_DEFAULT)).expect("event");
        start.record(s).expect("record");
        s.memcpy_dtod(&src, &mut dst).expect("copy");
        end.record(s).expect("record");
        best = best.min(start.elapsed_ms(&end).expect("elapsed") as f64);
    }
    2.0 * 4.0 * n as f64 / (best * 1e-3) / 1e9
}

/// A weight's bytes as a plan holds them, and where its scales are when quantized.
struct WeightBytes {
    bytes: Vec<u8>,
    group: i32,
    scales_offset: u64,
    mins_offset: Option<u64>,
}

impl WeightBytes {
    fn bf16(k: usize, n: usize) -> WeightBytes {
        let bytes = random::uniform(n * k, 7)
            .into_iter()
            .flat_map(|v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        WeightBytes {
            bytes,
            group: 0,
            scales_offset: 0,
            mins_offset: None,
        }
    }

    /// Random codes and scales, packed as the compiler packs them for CUDA.
    fn quantized(bits: u8, k: usize, n: usize, group: usize, asymmetric: bool) -> WeightBytes {
        use kernels::cpu::quant::{QuantBytes, QuantFormat, QuantMatrix};
        let format = QuantFormat {
            codes: ir::CodeFormat::Int(bits),
            group,
            asymmetric,
        };
        let groups = n * (k / group);
        let noise = random::uniform(n * k, 7);
        let matrix = QuantMatrix {
            format,
            rows: n,
            cols: k,
            codes: noise
                .iter()
                .map(|v| ((v + 1.0) * 0.5 * ((1u32 << bits) - 1) as f32) as u8)
                .collect(),
            scales: vec![half::f16::from_f32(0.01); groups],
            mins: if format.asymmetric {
                vec![half::f16::from_f32(-0.05); groups]
            } else {
                vec![]
            },
        };
        let layout = kernels::cpu::PackedLayout::CUDA_QUANT;
        let packed = matrix.pack(layout).expect("packs");
        let parts = QuantBytes::of(&format, layout, n, k);
        WeightBytes {
            bytes: parts.write(&packed),
            group: group as i32,
            scales_offset: parts.scales_offset as u64,
            mins_offset: format.asymmetric.then_some(parts.mins_offset as u64),
        }
    }
}

fn max_relative_difference(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs() / scale)
        .fold(0.0, f64::max)
}
