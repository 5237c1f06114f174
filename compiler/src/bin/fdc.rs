//! `fdc`: the command line of the compiler. Argument parsing only; the work is in the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use compiler::passes::quantize_weights::{CalibrationRef, GroupSize, QuantOptions};
use compiler::passes::PassCtx;
use compiler::targets::CodeGen;
use compiler::{timing, CompileOptions, WeightOutput};
use ir::{DType, QuantScheme, Target};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "fdc",
    version,
    about = "Compile a language model ahead of time into a .fdp plan"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile an HF checkpoint directory or a GGUF file into a plan.
    Compile {
        /// HF model directory (config.json + safetensors) or a .gguf file.
        model: PathBuf,
        /// Where to write the plan (default: <model name>.fdp in the current directory).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Hardware target: cpu (this machine's best), cpu-avx512, cpu-avx2, cpu-portable, a
        /// CUDA GPU: cuda-sm80, cuda-sm89, cuda-sm90 (needs NVRTC: the nvidia-cuda-nvrtc
        /// wheel), or dcu (Hygon DCU, gfx906; needs a HIP compiler); `fdc targets` lists them
        /// with their aliases.
        #[arg(long, default_value = "cpu")]
        target: String,
        /// Storage type of matmul and embedding weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Quantize matmul weights: none, w8a16, w4a16, w2a16, w8a8, w4a8 or fp8.
        #[arg(long, default_value = "none")]
        quant: String,
        /// Elements per quantization scale along K: a number (32, 64, 128, ...) or `channel`
        /// (default: 32 for integer schemes, channel for fp8).
        #[arg(long)]
        group_size: Option<String>,
        /// Store a minimum per group (default for 4 and 2 bits).
        #[arg(long, conflicts_with = "quant_sym")]
        quant_asym: bool,
        /// Symmetric groups, no minimum (default for 8 bits and fp8).
        #[arg(long)]
        quant_sym: bool,
        /// Plain round-to-nearest for asymmetric groups instead of fitted ranges.
        #[arg(long)]
        quant_rtn: bool,
        /// CUDA targets: store W4A16 matmul weights with symmetric groups of a multiple of 64
        /// in the tile layout of the tensor-core matmul (off by default: about 3% slower than the
        /// panels in an 8B decode step on an H100).
        #[arg(long)]
        quant_tiles: bool,
        /// Per-weight scheme, `PATTERN=SCHEME` (`lm_head=w8a16`, `embed*=none`), repeatable;
        /// `*` matches anything, a pattern matches whole dot-separated parts of a name.
        #[arg(long, value_name = "PATTERN=SCHEME")]
        quant_override: Vec<String>,
        /// Input statistics written by `fdrt calibrate` from the unquantized plan of this model:
        /// every weight quantized here that has statistics is quantized by GPTQ.
        #[arg(long, value_name = "FILE")]
        calibration: Option<PathBuf>,
        /// With --calibration and a scheme that quantizes activations (w8a8, w4a8, fp8): how
        /// much of the activations' range SmoothQuant moves into the weights, 0 to 1 (0: off).
        #[arg(long, default_value_t = compiler::passes::quantize_weights::DEFAULT_SMOOTH_ALPHA)]
        smooth_alpha: f32,
        /// Print how long each phase took.
        #[arg(long)]
        timings: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Write the weights in part files NAME.part0.fdw, NAME.part1.fdw, ... of at most SIZE
        /// bytes each (a larger weight gets a part of its own): 50MB, 2GiB, 1000000.
        #[arg(long, value_name = "SIZE")]
        part_size: Option<String>,
        /// Write only the weights, as snapshot --snapshot-id for --rank of the plan -o names:
        /// NAME.tp{rank}.{id}.part{N}.fdw, for `fdrt update-weights` (parts of --part-size,
        /// default 1GiB).
        #[arg(long, requires = "snapshot_id")]
        weights_only: bool,
        /// Snapshot id: letters, digits, '-' and '_'.
        #[arg(long, requires = "weights_only")]
        snapshot_id: Option<String>,
        /// Tensor-parallel rank of the snapshot.
        #[arg(long, default_value_t = 0, requires = "weights_only")]
        rank: u32,
    },
    /// Describe a plan: model, target, sections, kernels, memory plan, provenance.
    Inspect {
        plan: PathBuf,
        /// Also say how many tokens a KV cache of this size holds (e.g. 24GiB).
        #[arg(long, value_parser = artifacts::units::parse_bytes)]
        kv_memory: Vec<u64>,
    },
    /// Print the IR of a model after the rewrite passes (or before them with --before).
    Ir {
        model: PathBuf,
        #[arg(long)]
        before: bool,
        #[arg(long, default_value = "cpu")]
        target: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Write a checkpoint with random weights for a config: DIR/config.json and
    /// DIR/model.safetensors, every tensor the architecture reads, seeded and small.
    Synth {
        /// An HF config.json of a supported architecture.
        config: PathBuf,
        /// The checkpoint directory to write.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Storage type of the matrices: f32 or bf16 (vectors are f32).
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// The target table: every target, its aliases, hardware, quantization schemes and how
    /// each is lowered, matrix units, memory, code generator, and what has run on hardware.
    Targets,
    /// The kernel registry.
    Kernels {
        /// List every kernel with its key.
        #[arg(long)]
        list: bool,
    },
}

fn parse_target(text: &str) -> Result<Target> {
    Ok(compiler::targets::resolve(text)?)
}

fn parse_dtype(text: &str) -> Result<DType> {
    match DType::parse(text) {
        Some(d @ (DType::F32 | DType::BF16 | DType::F16)) => Ok(d),
        _ => bail!("unknown --dtype {text:?}; supported: f32, bf16, f16"),
    }
}

fn parse_size(text: &str) -> Result<u64> {
    artifacts::units::parse_bytes(text).map_err(|e| anyhow::anyhow!("--part-size {e}"))
}

fn parse_scheme(text: &str) -> Result<QuantScheme> {
    match QuantScheme::parse(text) {
        Some(q) => Ok(q),
        None => bail!(
            "unknown quantization scheme {text:?}; supported: {}",
            QuantScheme::ALL
                .iter()
                .map(|q| q.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn parse_quant(
    scheme: &str,
    group_size: Option<&str>,
    asym: bool,
    sym: bool,
    rtn: bool,
    overrides: &[String],
) -> Result<QuantOptions> {
    let group = match group_size {
        None => None,
        Some("channel") => Some(GroupSize::Channel),
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n > 0 => Some(GroupSize::Elements(n)),
            _ => bail!("--group-size {n:?} is neither a positive number nor `channel`"),
        },
    };
    let scheme = parse_scheme(scheme)?;
    if asym && !scheme.allows_asymmetric() {
        bail!("--quant-asym: scheme {scheme} has no asymmetric form (integer schemes do)");
    }
    let overrides = overrides
        .iter()
        .map(|o| match o.split_once('=') {
            Some((pattern, s)) if !pattern.is_empty() => {
                Ok((pattern.to_string(), parse_scheme(s)?))
            }
            _ => bail!("--quant-override {o:?} is not PATTERN=SCHEME"),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(QuantOptions {
        scheme,
        group,
        asymmetric: if asym {
            Some(true)
        } else if sym {
            Some(false)
        } else {
            None
        },
        overrides,
        round_to_nearest: rtn,
        ..Default::default()
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("fdc: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Compile {
            model,
            output,
            target,
            dtype,
            quant,
            group_size,
            quant_asym,
            quant_sym,
            quant_rtn,
            quant_tiles,
            quant_override,
            calibration,
            smooth_alpha,
            timings,
            quiet,
            part_size,
            weights_only,
            snapshot_id,
            rank,
        } => {
            let part_size = part_size.as_deref().map(parse_size).transpose()?;
            let weights_to = match (snapshot_id, part_size) {
                (Some(id), part_size) if weights_only => {
                    artifacts::parts::check_snapshot_id(&id).map_err(anyhow::Error::msg)?;
                    WeightOutput::Snapshot {
                        part_size: part_size.unwrap_or(1 << 30),
                        tag: artifacts::parts::SnapshotTag { id, rank },
                    }
                }
                (_, Some(part_size)) => WeightOutput::Parts { part_size },
                _ => WeightOutput::InPlan,
            };
            let mut quant = parse_quant(
                &quant,
                group_size.as_deref(),
                quant_asym,
                quant_sym,
                quant_rtn,
                &quant_override,
            )?;
            if let Some(path) = calibration {
                if quant.scheme == QuantScheme::None && quant.overrides.is_empty() {
                    bail!("--calibration is for quantized plans: add --quant SCHEME");
                }
                let stats = artifacts::calibration::Calibration::read(&path)?;
                quant.calibration = Some(CalibrationRef(std::sync::Arc::new(stats)));
            }
            if !(0.0..=1.0).contains(&smooth_alpha) {
                bail!("--smooth-alpha {smooth_alpha} is not between 0 and 1");
            }
            quant.smooth_alpha = smooth_alpha;
            let target = parse_target(&target)?;
            if quant_tiles && !compiler::targets::info(target).quant_tiles {
                bail!("--quant-tiles: target {target} has no tile layout (the CUDA targets do)");
            }
            // The tiles hold W4A16 in symmetric groups of a multiple of 64: say so rather than
            // tile nothing.
            let tileable_group = match quant.group {
                Some(GroupSize::Elements(g)) => g % kernels::cuda::QUANT_TILE_K_MULTIPLE == 0,
                Some(GroupSize::Channel) => true,
                None => false,
            };
            let w4a16 = quant.scheme == QuantScheme::W4A16
                || quant
                    .overrides
                    .iter()
                    .any(|(_, s)| *s == QuantScheme::W4A16);
            if quant_tiles && !(w4a16 && quant.asymmetric == Some(false) && tileable_group) {
                bail!(
                    "--quant-tiles stores W4A16 weights in symmetric groups of a multiple of {}: \
                     add --quant w4a16 --quant-sym --group-size 64 (or 128, ..., channel)",
                    kernels::cuda::QUANT_TILE_K_MULTIPLE
                );
            }
            quant.tiles = quant_tiles;
            let options = CompileOptions {
                target,
                weight_dtype: parse_dtype(&dtype)?,
                quant,
                progress: !quiet,
            };
            let output = output.unwrap_or_else(|| {
                let stem = model
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or("model".into());
                PathBuf::from(format!("{stem}.fdp"))
            });
            if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let report = compiler::compile_to(&model, &output, &options, &weights_to)
                .with_context(|| format!("compiling {}", model.display()))?;
            let dir = output.parent().unwrap_or(std::path::Path::new(""));
            for part in &report.parts {
                println!(
                    "wrote {} ({:.1} MB)",
                    dir.join(&part.file).display(),
                    part.bytes as f64 / 1e6
                );
            }
            if matches!(weights_to, WeightOutput::Snapshot { .. }) {
                return Ok(());
            }
            let code = match compiler::targets::info(options.target).codegen {
                CodeGen::Cranelift(_) => {
                    format!("{} generated kernels", report.generated_kernels)
                }
                CodeGen::Nvrtc(_) => "one CUDA module".to_string(),
                CodeGen::Hipcc(arch) => format!("one {} code object", arch.name()),
            };
            println!(
                "wrote {} ({:.1} MB): {:.1} M parameters, {} launches per step, {code}, target {}, dtype {}, quant {}",
                report.output.display(),
                report.plan_bytes as f64 / 1e6,
                report.parameter_count as f64 / 1e6,
                report.steps,
                options.target,
                options.weight_dtype,
                options.quant.scheme
            );
            if timings {
                for (name, d) in timing::report() {
                    println!("  {name:<20} {:>9.1} ms", d.as_secs_f64() * 1e3);
                }
            }
        }
        Command::Synth {
            config,
            output,
            seed,
            dtype,
        } => {
            let bf16 = match parse_dtype(&dtype)? {
                DType::BF16 => true,
                DType::F32 => false,
                _ => bail!("fdc synth writes f32 or bf16 matrices, not {dtype}"),
            };
            let summary = models::synth::synthesize(&config, &output, seed, bf16)
                .with_context(|| format!("synthesizing a checkpoint for {}", config.display()))?;
            println!(
                "wrote {} ({} tensors, {:.1} M parameters, {:.1} MB)",
                summary.weights_file.display(),
                summary.tensors,
                summary.parameters as f64 / 1e6,
                summary.bytes as f64 / 1e6
            );
        }
        Command::Inspect { plan, kv_memory } => {
            print!(
                "{}",
                compiler::inspect::inspect(&plan, &kv_memory)
                    .with_context(|| format!("reading {}", plan.display()))?
            );
        }
        Command::Ir {
            model,
            before,
            target,
            dtype,
        } => {
            if before {
                let ckpt = models::open(&model)?;
                let name = model
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                let graph = models::arch::build_graph(&name, &ckpt.config, &*ckpt.tensors)?;
                print!("{}", ir::text::print(&graph));
            } else {
                let ctx = PassCtx {
                    target: parse_target(&target)?,
                    weight_dtype: parse_dtype(&dtype)?,
                    quant: Default::default(),
                };
                let lowered = compiler::compile::lower(&model, &ctx)?;
                print!("{}", ir::text::print(&lowered.graph));
            }
        }
        Command::Targets => print!("{}", compiler::targets::table()),
        Command::Kernels { .. } => print!("{}", kernels::registry::table()),
    }
    Ok(())
}
