//! Times the ahead-of-time generated kernels of `compiler::codegen` against the library kernels of
//! `kernels::cpu` on SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 query and 3 key/value
//! heads of 64), one token and a 512-token prompt.
//!
//! Both sides run on one thread (the library inside a one-thread rayon pool), warm, and each time
//! is the best of several batches of calls, so the table compares code rather than scheduling.
//!
//! `cargo run --release -p tests --example codegen_vs_library`

use std::hint::black_box;
use std::time::Instant;

use artifacts::code_abi::{AddRmsNormFn, RmsNormFn, RopeFn, SiluMulFn};
use compiler::codegen::{generate, symbol_name, KernelSpec};
use ir::CpuIsa;
use runtime::code::CodeImage;

/// Errors cross from the rayon worker back to `main`.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

const HIDDEN: usize = 576;
const INTERMEDIATE: usize = 1536;
const HEAD_DIM: usize = 64;
const Q_HEADS: usize = 9;
const KV_HEADS: usize = 3;
const EPS: f32 = 1e-5;
const ROW_COUNTS: [usize; 2] = [1, 512];
/// Positions the RoPE tables cover (SmolLM2's context is 8192; more only costs memory here).
const TABLE_POSITIONS: usize = 2048;
/// Batches timed per measurement; the best one counts.
const BATCHES: usize = 15;
/// Each batch runs at least this long, so short calls are not lost in timer resolution.
const BATCH_NANOS: u128 = 2_000_000;

fn main() -> Result<(), BoxError> {
    let isa = CpuIsa::detect();
    if isa == CpuIsa::Portable {
        println!("skipped: CPU lacks AVX2, there is no generated code to time");
        return Ok(());
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    println!("isa: {}, one thread, best of {BATCHES} batches", isa.name());
    println!(
        "{:<32} {:>5} {:>14} {:>12} {:>7}",
        "kernel", "rows", "generated ns", "library ns", "ratio"
    );
    pool.install(|| run_all(isa))
}

fn run_all(isa: CpuIsa) -> Result<(), BoxError> {
    let specs = [
        KernelSpec::RmsNorm {
            cols: HIDDEN,
            group: HIDDEN,
            eps: EPS,
        },
        KernelSpec::AddRmsNorm {
            cols: HIDDEN,
            eps: EPS,
        },
        KernelSpec::SiluMul { cols: INTERMEDIATE },
        KernelSpec::Rope {
            n_heads: Q_HEADS,
            head_dim: HEAD_DIM,
        },
        KernelSpec::Rope {
            n_heads: KV_HEADS,
            head_dim: HEAD_DIM,
        },
    ];
    for spec in specs {
        let code = generate(&spec, isa)?;
        let image = CodeImage::load(&code.bytes)?;
        for rows in ROW_COUNTS {
            let (generated, library) = time_pair(&image, spec, isa, rows)?;
            println!(
                "{:<32} {:>5} {:>14.0} {:>12.0} {:>7.2}",
                symbol_name(&spec, isa),
                rows,
                generated,
                library,
                generated / library
            );
        }
    }
    Ok(())
}

/// Deterministic inputs in `[-scale, scale)`.
fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Nanoseconds per call of `call`: the best over [`BATCHES`] batches, after one warm-up batch.
fn best_nanos(mut call: impl FnMut()) -> f64 {
    let mut calls_per_batch = 1usize;
    // Grow the batch until it is long enough to time; this also warms caches and predictors.
    loop {
        let start = Instant::now();
        for _ in 0..calls_per_batch {
            call();
        }
        if start.elapsed().as_nanos() >= BATCH_NANOS {
            break;
        }
        calls_per_batch *= 2;
    }
    (0..BATCHES)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls_per_batch {
                call();
            }
            start.elapsed().as_nanos() as f64 / calls_per_batch as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// (generated, library) nanoseconds per call of `spec` over `rows` rows.
fn time_pair(
    image: &CodeImage,
    spec: KernelSpec,
    isa: CpuIsa,
    rows: usize,
) -> Result<(f64, f64), BoxError> {
    let result = match spec {
        KernelSpec::RmsNorm { cols, group, eps } => {
            // SAFETY: the image holds one function, generated for `RmsNormFn`.
            let function: RmsNormFn = unsafe { image.entry(0)? };
            let x = values(rows * cols, 1, 3.0);
            let w = values(group, 2, 1.0);
            let mut out = vec![0.0f32; rows * cols];
            let generated = best_nanos(|| {
                // SAFETY: `x` and `out` hold `rows` rows of `cols`, `w` holds `group`.
                unsafe {
                    function(
                        black_box(x.as_ptr()),
                        cols as u64,
                        w.as_ptr(),
                        black_box(out.as_mut_ptr()),
                        cols as u64,
                        rows as u64,
                        cols as u64,
                        group as u64,
                        eps,
                    )
                }
            });
            let mut library_call = || {
                kernels::cpu::rms_norm(
                    isa,
                    black_box(&x),
                    cols,
                    rows,
                    cols,
                    group,
                    &w,
                    eps,
                    black_box(&mut out),
                    cols,
                )
            };
            library_call()?;
            let library = best_nanos(|| {
                black_box(library_call()).ok();
            });
            (generated, library)
        }
        KernelSpec::AddRmsNorm { cols, eps } => {
            // SAFETY: the image holds one function, generated for `AddRmsNormFn`.
            let function: AddRmsNormFn = unsafe { image.entry(0)? };
            let x = values(rows * cols, 3, 2.0);
            let d = values(rows * cols, 4, 2.0);
            let w = values(cols, 5, 1.0);
            let mut sum = vec![0.0f32; rows * cols];
            let mut normed = vec![0.0f32; rows * cols];
            let generated = best_nanos(|| {
                // SAFETY: every matrix holds `rows` rows of `cols`, `w` holds `cols`.
                unsafe {
                    function(
                        black_box(x.as_ptr()),
                        cols as u64,
                        d.as_ptr(),
                        cols as u64,
                        w.as_ptr(),
                        black_box(sum.as_mut_ptr()),
                        cols as u64,
                        black_box(normed.as_mut_ptr()),
                        cols as u64,
                        rows as u64,
                        cols as u64,
                        eps,
                    )
                }
            });
            let mut library_call = || {
                kernels::cpu::add_rms_norm(
                    isa,
                    black_box(&x),
                    cols,
                    &d,
                    cols,
                    rows,
                    cols,
                    &w,
                    eps,
                    black_box(&mut sum),
                    cols,
                    black_box(&mut normed),
                    cols,
                )
            };
            library_call()?;
            let library = best_nanos(|| {
                black_box(library_call()).ok();
            });
            (generated, library)
        }
        KernelSpec::SiluMul { cols } => {
            // SAFETY: the image holds one function, generated for `SiluMulFn`.
            let function: SiluMulFn = unsafe { image.entry(0)? };
            let gu = values(rows * 2 * cols, 6, 6.0);
            let mut out = vec![0.0f32; rows * cols];
            let generated = best_nanos(|| {
                // SAFETY: `gu` holds `rows` rows of `2 * cols`, `out` `rows` rows of `cols`.
                unsafe {
                    function(
                        black_box(gu.as_ptr()),
                        (2 * cols) as u64,
                        black_box(out.as_mut_ptr()),
                        cols as u64,
                        rows as u64,
                        cols as u64,
                    )
                }
            });
            let mut library_call = || {
                kernels::cpu::silu_mul(
                    isa,
                    black_box(&gu),
                    2 * cols,
                    rows,
                    cols,
                    black_box(&mut out),
                    cols,
                )
            };
            library_call()?;
            let library = best_nanos(|| {
                black_box(library_call()).ok();
            });
            (generated, library)
        }
        KernelSpec::Rope { n_heads, head_dim } => {
            // SAFETY: the image holds one function, generated for `RopeFn`.
            let function: RopeFn = unsafe { image.entry(0)? };
            let cols = n_heads * head_dim;
            let half = head_dim / 2;
            let x = values(rows * cols, 7, 2.0);
            let cos = values(TABLE_POSITIONS * half, 8, 1.0);
            let sin = values(TABLE_POSITIONS * half, 9, 1.0);
            // A decode step sits late in the context; a prompt covers consecutive positions.
            let positions: Vec<u32> = (0..rows)
                .map(|r| ((TABLE_POSITIONS - rows + r) % TABLE_POSITIONS) as u32)
                .collect();
            let mut out = vec![0.0f32; rows * cols];
            let generated = best_nanos(|| {
                // SAFETY: `x`/`out` hold `rows` rows of `cols`; positions are inside the tables.
                unsafe {
                    function(
                        black_box(x.as_ptr()),
                        cols as u64,
                        black_box(out.as_mut_ptr()),
                        cols as u64,
                        rows as u64,
                        n_heads as u64,
                        head_dim as u64,
                        positions.as_ptr(),
                        cos.as_ptr(),
                        sin.as_ptr(),
                    )
                }
            });
            let mut library_call = || {
                kernels::cpu::rope(
                    isa,
                    black_box(&x),
                    cols,
                    rows,
                    n_heads,
                    head_dim,
                    &positions,
                    &cos,
                    &sin,
                    half,
                    black_box(&mut out),
                    cols,
                )
            };
            library_call()?;
            let library = best_nanos(|| {
                black_box(library_call()).ok();
            });
            (generated, library)
        }
    };
    Ok(result)
}
