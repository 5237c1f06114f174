//! `fdrt`: the command line of the runtime. Argument parsing only; the work is in the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use runtime::chat::{ChatMessage, ChatTemplate};
use runtime::generate::{generate, GenerateOptions};
use runtime::sampler::SamplingParams;
use runtime::sequence::OneSequence;
use runtime::server::bench::BenchOptions;
use runtime::server::{Server, ServerConfig};
use runtime::tokenizer::TextTokenizer;
use runtime::{BatchEngine, Engine, EngineOptions, LoadedPlan};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "fdrt", version, about = "Run a .fdp plan compiled by fdc")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Positions the KV cache holds (prompt + generated tokens).
    #[arg(long, default_value_t = 4096)]
    max_context: usize,
    /// Tokens per forward pass (the step's token budget); longer prompts are processed in
    /// chunks (chunked prefill). Set it to --max-context to prefill whole prompts at once.
    #[arg(long, alias = "max-num-batched-tokens", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Positions per KV cache block.
    #[arg(long, default_value_t = runtime::engine::DEFAULT_BLOCK_SIZE as u32, value_parser = clap::value_parser!(u32).range(1..=4096) )]
    block_size: u32,
    /// KV cache pool size in bytes (suffixes KiB, MiB, GiB, KB, MB, GB allowed); default: room
    /// for every sequence (--max-num-seqs) at full --max-context.
    #[arg(long, value_parser = artifacts::units::parse_bytes)]
    kv_cache_memory: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text (streamed to stdout) or token ids (--json).
    Generate {
        plan: PathBuf,
        /// The prompt text.
        #[arg(long, conflicts_with = "ids")]
        prompt: Option<String>,
        /// The prompt as comma-separated token ids.
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<u32>>,
        /// Wrap the prompt as a user message in the plan's chat template.
        #[arg(long)]
        chat: bool,
        /// A system message for --chat.
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// 0 means greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long)]
        min_p: Option<f32>,
        #[arg(long)]
        seed: Option<u64>,
        /// Subtracted once from each generated token's logit (-2 to 2).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        presence_penalty: f32,
        /// Subtracted from a generated token's logit per occurrence (-2 to 2).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        frequency_penalty: f32,
        /// Divides positive and multiplies negative logits of seen tokens (1 is off).
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        /// Do not stop at the end-of-sequence token.
        #[arg(long)]
        ignore_eos: bool,
        /// Print one JSON object with the prompt and generated token ids instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Write the next-token logits after each prefix of --ids to a safetensors file.
    Logits {
        plan: PathBuf,
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Perplexity of the plan on a text file, and with --reference the KL divergence and top-1
    /// agreement of its next-token distributions against another plan's.
    Eval {
        plan: PathBuf,
        /// The text (UTF-8), tokenized with the plan's tokenizer.
        #[arg(long)]
        text: PathBuf,
        /// A plan to compare with (the unquantized model).
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Tokens per window; each window starts from an empty cache.
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Use only the first N tokens of the text.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run an unquantized plan over a calibration text and write, for each matmul weight, the
    /// statistics of its inputs (for `fdc compile --calibration`, GPTQ).
    Calibrate {
        plan: PathBuf,
        /// The calibration text (UTF-8), tokenized with the plan's tokenizer.
        #[arg(long)]
        text: PathBuf,
        /// Where to write the statistics (`model.calib`).
        #[arg(short, long)]
        output: PathBuf,
        /// Tokens per window; each window starts from an empty cache.
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Use only the first N tokens of the text.
        #[arg(long)]
        max_tokens: Option<usize>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Serve the plan over an OpenAI-compatible HTTP API with continuous batching.
    Serve {
        plan: PathBuf,
        /// Address to listen on; use 0.0.0.0 to accept connections from other machines.
        #[arg(long, default_value = runtime::server::DEFAULT_HOST)]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Require `Authorization: Bearer KEY` on /v1 endpoints, /metrics and the admin
        /// endpoints (default: the FDRT_API_KEY environment variable, if set).
        #[arg(long, env = "FDRT_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Sequences decoded together at most.
        #[arg(long, default_value_t = 8)]
        max_num_seqs: usize,
        /// Requests waiting to run at most; more are refused with 429.
        #[arg(long, default_value_t = 256)]
        max_waiting: usize,
        /// Do not reuse the KV blocks of earlier requests that share a prefix.
        #[arg(long)]
        no_prefix_caching: bool,
        /// Speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4,
        /// "prompt_lookup_max": 4, "prompt_lookup_min": 2} (the defaults), or {"method":
        /// "draft", "model": "DRAFT.fdp"} (a smaller plan, same tokenizer). Greedy outputs are
        /// unchanged, sampled ones keep their distribution; requests may opt out with
        /// "speculative": false.
        #[arg(long)]
        speculative_config: Option<String>,
        /// The model name clients send (default: the plan's model name).
        #[arg(long)]
        served_model_name: Option<String>,
        /// Seconds running requests may take to finish after SIGTERM or Ctrl-C.
        #[arg(long, default_value_t = 30.0)]
        drain_timeout: f64,
        /// Largest request body accepted, in bytes.
        #[arg(long, default_value_t = 4 << 20)]
        max_body_bytes: usize,
        /// Connections open at once at most; more wait in the listen backlog until one closes.
        #[arg(long, default_value_t = runtime::server::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Seconds a client may take to send a request head (on a new connection, or on a
        /// kept-alive one after its last response) before the connection is closed.
        #[arg(long, default_value_t = 30.0)]
        header_read_timeout: f64,
        /// Seconds a client may take to send a request body in full after its head (408 past
        /// it).
        #[arg(long, default_value_t = 30.0)]
        body_read_timeout: f64,
        /// Seconds a write to a client may make no progress (it stopped reading its response)
        /// before the connection is closed and its request cancelled.
        #[arg(long, default_value_t = 60.0)]
        write_timeout: f64,
        /// Prefill/decode disaggregation: `prefill` also serves its prompts' KV blocks to
        /// decode instances on --kv-transfer-port; `decode` takes a request's prompt blocks from
        /// the prefill instance the router names (one of --kv-source); `mixed` does both jobs
        /// itself.
        #[arg(long, value_enum, default_value = "mixed")]
        role: runtime::disagg::Role,
        /// The port KV transfers to decode instances are served on (on --host) while the
        /// instance has the prefill role; needed by `--role prefill`, and by any instance that
        /// may switch to it.
        #[arg(long)]
        kv_transfer_port: Option<u16>,
        /// A prefill instance's KV transfer address (HOST:PORT) this instance may take blocks
        /// from while it has the decode role; repeat for each. Needed by `--role decode`, and by
        /// any instance that may switch to it.
        #[arg(long)]
        kv_source: Vec<String>,
        /// As a decode instance, compute prompts shorter than this many tokens here instead of
        /// taking their blocks from a prefill instance.
        #[arg(long, default_value_t = 0)]
        kv_transfer_min_tokens: usize,
        /// A file holding a secret (at least 16 bytes) that every prefill and decode instance of
        /// one deployment is given: transfers between instances that do not both hold it are
        /// refused. Without it, keep the transfer ports on a trusted network.
        #[arg(long, env = "FDRT_KV_TRANSFER_KEY_FILE")]
        kv_transfer_key_file: Option<PathBuf>,
        /// As a decode instance, always take blocks over the socket, even from a prefill
        /// instance on the same host (which otherwise writes them into shared memory).
        #[arg(long)]
        no_kv_shared_memory: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// The front door of disaggregated serving: an OpenAI-compatible server that sends each
    /// request to a decode instance, naming a prefill instance for its prompt's KV blocks.
    Router {
        /// host:port of a prefill instance's HTTP server (`fdrt serve --role prefill`); repeat
        /// for each.
        #[arg(long)]
        prefill: Vec<String>,
        /// host:port of a decode instance's HTTP server (`fdrt serve --role decode`); repeat
        /// for each.
        #[arg(long, required = true)]
        decode: Vec<String>,
        #[arg(long, default_value = runtime::server::DEFAULT_HOST)]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Key for the router's own calls to the instances (health, description); clients'
        /// Authorization headers are passed through as they are.
        #[arg(long, env = "FDRT_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Seconds between health checks of every instance.
        #[arg(long, default_value_t = 1.0)]
        health_interval: f64,
        /// Seconds any one wait on an instance may take (connecting, its answer's head, each
        /// piece of a streamed answer).
        #[arg(long, default_value_t = 300.0)]
        upstream_timeout: f64,
        /// Move instances between prefill and decode as their queues call for: when one role's
        /// instances hold on average more than twice the other's requests (plus 4), the least
        /// busy instance of the other role that can switch is asked to (`POST
        /// /admin/v1/role`; the router then needs the instances' --api-key).
        #[arg(long)]
        auto_roles: bool,
        /// Seconds between two role switches of --auto-roles at least.
        #[arg(long, default_value_t = 30.0)]
        role_cooldown: f64,
        /// With --auto-roles: a time-to-first-token target (milliseconds, mean of the streamed
        /// answers of the last 30 s as the router sees them). Missed while the TPOT target is
        /// met (or unset), a decode instance is moved to prefill.
        #[arg(long, requires = "auto_roles")]
        ttft_target_ms: Option<f64>,
        /// With --auto-roles: a time-per-output-token target (milliseconds, same window).
        /// Missed while the TTFT target is met (or unset), a prefill instance is moved to decode.
        #[arg(long, requires = "auto_roles")]
        tpot_target_ms: Option<f64>,
    },
    /// Load-test a running server: concurrent streaming completions with random token prompts;
    /// prints throughput and TTFT / TPOT / inter-token latency percentiles.
    BenchServe {
        /// host:port of the server.
        #[arg(long, default_value = "127.0.0.1:8000")]
        address: String,
        /// Model name to request (default: the server's, from /v1/models).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, env = "FDRT_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Clients sending requests at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Requests in all.
        #[arg(long, default_value_t = 16)]
        requests: usize,
        /// Mean prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        input_len: usize,
        /// Mean output length in tokens.
        #[arg(long, default_value_t = 64)]
        output_len: usize,
        /// Lengths are drawn uniformly within this fraction of the means.
        #[arg(long, default_value_t = 0.25)]
        range_ratio: f64,
        /// Prompt token ids are drawn from LOW..HIGH.
        #[arg(long, default_value = "1000..20000")]
        token_range: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Start every prompt with the same this many tokens (a shared system prompt).
        #[arg(long, default_value_t = 0)]
        shared_prefix_len: usize,
        /// Also send one request with a prompt this long (and one output token) ...
        #[arg(long)]
        long_prompt_len: Option<usize>,
        /// ... this many seconds after the start, and report the other streams' inter-token
        /// latency while it is admitted.
        #[arg(long, default_value_t = 5.0)]
        long_prompt_after: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running server to load a weight snapshot (`fdc compile --weights-only`) and switch
    /// to it at a step boundary; the server must run with --api-key.
    UpdateWeights {
        /// host:port of the server.
        #[arg(long, default_value = "127.0.0.1:8000")]
        address: String,
        #[arg(long, env = "FDRT_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Directory holding NAME.tp{rank}.{snapshot_id}.part{N}.fdw, as the server sees it
        /// (a relative path is made absolute here).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        snapshot_id: String,
        #[arg(long, default_value_t = 0)]
        rank: u32,
    },
    /// Measure batch-1 prefill and decode throughput (with --batch: the decode throughput of
    /// that many sequences stepping together).
    Bench {
        plan: PathBuf,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Sequences decoding together, one token each per forward pass (8-token prompts; no
        /// prefill measured).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run: RunArgs,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("fdrt: error: {e:#}");
        std::process::exit(1);
    }
}

/// The text of `file` and its first `max_tokens` token ids by the plan's tokenizer.
fn text_ids(engine: &Engine, file: &Path, max_tokens: Option<usize>) -> Result<(String, Vec<u32>)> {
    let tokenizer = TextTokenizer::from_json(
        engine
            .plan()
            .tokenizer_json()
            .context("the plan has no tokenizer")?,
    )?;
    let body =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut ids = tokenizer.encode_raw(&body)?;
    if let Some(n) = max_tokens {
        ids.truncate(n);
    }
    Ok((body, ids))
}

fn load(plan: &Path, args: &RunArgs) -> Result<Engine> {
    load_with_slots(plan, args, 1)
}

/// A plan in the engine of its target.
enum TargetEngine {
    Cpu(Box<Engine>),
    Gpu(Box<runtime::cuda::GpuEngine>),
}

/// Loads a plan with `max_num_seqs` sequence slots: on the GPU (device 0) for a CUDA plan, else
/// on the CPU.
fn load_for_target(plan: &Path, args: &RunArgs, max_num_seqs: usize) -> Result<TargetEngine> {
    let loaded = LoadedPlan::load(plan).with_context(|| format!("loading {}", plan.display()))?;
    Ok(match loaded.manifest.target {
        ir_types::Target::Cuda(_) => {
            let options = engine_options(&loaded, args, max_num_seqs)?;
            TargetEngine::Gpu(Box::new(
                runtime::cuda::GpuEngine::new(loaded, 0, options)
                    .context("starting the GPU engine")?,
            ))
        }
        ir_types::Target::Cpu(_) => {
            TargetEngine::Cpu(Box::new(engine_for(loaded, args, max_num_seqs)?))
        }
        ir_types::Target::Dcu(_) => {
            // With the HIP backend, what can be checked on this machine is checked first, so
            // a missing library or device, or a code object the device refuses, is named.
            #[cfg(feature = "hip")]
            {
                let checked = runtime::hip::check_plan(&loaded, 0)
                    .context("checking the DCU plan against this machine's HIP runtime")?;
                eprintln!(
                    "the plan's code object loads on device 0 of this machine's {} DCUs ({} \
                     kernel functions resolved)",
                    checked.devices, checked.functions
                );
            }
            return Err(runtime::RuntimeError::DcuPlan {
                plan_target: loaded.manifest.target.name(),
            }
            .into());
        }
    })
}

/// Loads a plan for one sequence, on its target's engine.
fn load_one_sequence(plan: &Path, args: &RunArgs) -> Result<Box<dyn OneSequence>> {
    Ok(match load_for_target(plan, args, 1)? {
        TargetEngine::Cpu(e) => e,
        TargetEngine::Gpu(e) => e,
    })
}

/// Loads a plan into the engine the scheduler steps, on its target's engine.
fn load_batch_engine(
    plan: &Path,
    args: &RunArgs,
    max_num_seqs: usize,
) -> Result<Box<dyn BatchEngine>> {
    Ok(match load_for_target(plan, args, max_num_seqs)? {
        TargetEngine::Cpu(e) => e,
        TargetEngine::Gpu(e) => e,
    })
}

/// Loads a plan into a CPU engine with `max_num_seqs` sequence slots.
fn load_with_slots(plan: &Path, args: &RunArgs, max_num_seqs: usize) -> Result<Engine> {
    let loaded = LoadedPlan::load(plan).with_context(|| format!("loading {}", plan.display()))?;
    engine_for(loaded, args, max_num_seqs)
}

/// The CPU engine for a loaded plan, with the thread count and KV cache the arguments ask for.
fn engine_for(loaded: LoadedPlan, args: &RunArgs, max_num_seqs: usize) -> Result<Engine> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up worker threads")?;
    }
    let options = engine_options(&loaded, args, max_num_seqs)?;
    Ok(Engine::new(loaded, options)?)
}

/// The engine options the arguments ask for: context, token budget, KV block size and pool.
fn engine_options(
    loaded: &LoadedPlan,
    args: &RunArgs,
    max_num_seqs: usize,
) -> Result<EngineOptions> {
    let max_context = args
        .max_context
        .min(loaded.manifest.model.max_position_embeddings.max(1) as usize);
    let block_size = args.block_size as usize;
    let kv_blocks = match args.kv_cache_memory {
        None => None,
        Some(bytes) => {
            let per_block = loaded.manifest.kv.bytes_per_token * block_size as u64;
            let blocks = bytes / per_block.max(1);
            if blocks == 0 {
                bail!(
                    "--kv-cache-memory {bytes} holds no KV block: one block of {block_size} positions takes {per_block} bytes"
                );
            }
            Some(blocks as usize)
        }
    };
    Ok(EngineOptions {
        max_context,
        max_batch_tokens: args.max_batch_tokens,
        max_num_seqs,
        block_size,
        kv_blocks,
    })
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Generate {
            plan,
            prompt,
            ids,
            chat,
            system,
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            ignore_eos,
            json,
            run,
        } => {
            let mut engine = load_one_sequence(&plan, &run)?;
            let tokenizer = match engine.plan().tokenizer_json() {
                Some(j) => Some(TextTokenizer::from_json(j)?),
                None => None,
            };
            let prompt_ids = match (prompt, ids) {
                (_, Some(ids)) => ids,
                (Some(text), None) => {
                    let tok = tokenizer
                        .as_ref()
                        .ok_or(runtime::RuntimeError::NoTokenizer)?;
                    if chat {
                        // A rendered template already holds every special token it wants (as
                        // HF's apply_chat_template does): add none on top.
                        tok.encode_raw(&render_chat(engine.plan(), system, &text)?)?
                    } else {
                        tok.encode(&text)?
                    }
                }
                (None, None) => bail!("give a prompt with --prompt TEXT or --ids 1,2,3"),
            };
            let options = GenerateOptions {
                max_new_tokens: max_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed,
                    presence_penalty,
                    frequency_penalty,
                    repetition_penalty,
                },
                stop_token_ids: vec![],
                ignore_eos,
            };
            let start = Instant::now();
            let out = if json || tokenizer.is_none() {
                let out = generate(engine.as_mut(), &prompt_ids, &options, |_| {})?;
                let value = serde_json::json!({
                    "prompt_ids": prompt_ids,
                    "generated_ids": out.tokens,
                    "finish_reason": out.finish_reason.name(),
                });
                println!("{value}");
                out
            } else {
                let tok = tokenizer
                    .as_ref()
                    .ok_or(runtime::RuntimeError::NoTokenizer)?;
                let mut stream = tok.stream_decoder();
                let mut stdout = std::io::stdout();
                let mut failure = None;
                let out = generate(engine.as_mut(), &prompt_ids, &options, |id| {
                    match stream.push(id) {
                        Ok(text) => {
                            let _ = stdout.write_all(text.as_bytes());
                            let _ = stdout.flush();
                        }
                        Err(e) => failure = Some(e),
                    }
                })?;
                if let Some(e) = failure {
                    return Err(e.into());
                }
                println!();
                out
            };
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "[{} prompt tokens, {} generated, finish: {}, {:.1} tokens/s overall]",
                prompt_ids.len(),
                out.tokens.len(),
                out.finish_reason.name(),
                out.tokens.len() as f64 / secs
            );
        }
        Command::Logits {
            plan,
            ids,
            out,
            run,
        } => {
            let mut engine = load(&plan, &run)?;
            let logits = engine.prefill(&ids, true)?;
            let vocab = engine.vocab_size();
            let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![ids.len(), vocab],
                &bytes,
            )
            .context("building the logits tensor")?;
            safetensors::serialize_to_file([("logits", view)], None, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote logits [{}, {}] to {}",
                ids.len(),
                vocab,
                out.display()
            );
        }
        Command::Calibrate {
            plan,
            text,
            output,
            window,
            max_tokens,
            run,
        } => {
            let mut engine = load(
                &plan,
                &RunArgs {
                    max_batch_tokens: run.max_batch_tokens.max(window),
                    ..run
                },
            )?;
            if engine
                .plan()
                .manifest
                .weights
                .iter()
                .any(|w| w.quant.is_some())
            {
                bail!(
                    "{} has quantized weights: calibrate the unquantized plan (fdc compile without --quant)",
                    plan.display()
                );
            }
            let (body, ids) = text_ids(&engine, &text, max_tokens)?;
            if ids.is_empty() {
                bail!("{} has no tokens", text.display());
            }
            let started = Instant::now();
            let hash = blake3::hash(body.as_bytes()).to_hex().to_string();
            let stats = runtime::calibrate::calibrate(&mut engine, &ids, window, &hash)?;
            stats
                .write(&output)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "{} tokens in {:.1} s: statistics of {} matmul inputs written to {}",
                ids.len(),
                started.elapsed().as_secs_f64(),
                stats.inputs.len(),
                output.display()
            );
        }
        Command::Eval {
            plan,
            text,
            reference,
            window,
            max_tokens,
            json,
            run,
        } => {
            let mut engine = load(&plan, &run)?;
            let (_, ids) = text_ids(&engine, &text, max_tokens)?;
            let mut reference = match &reference {
                Some(p) => Some(load(
                    p,
                    &RunArgs {
                        threads: None,
                        ..run.clone()
                    },
                )?),
                None => None,
            };
            let r = runtime::eval::evaluate(&mut engine, reference.as_mut(), &ids, window)?;
            if json {
                let mut v = serde_json::json!({
                    "plan": plan.display().to_string(),
                    "text": text.display().to_string(),
                    "tokens": ids.len(),
                    "window": window,
                    "predictions": r.predictions,
                    "perplexity": r.perplexity,
                });
                if let Some(c) = &r.reference {
                    v["reference_perplexity"] = c.reference_perplexity.into();
                    v["mean_kl"] = c.mean_kl.into();
                    v["top1_agreement"] = c.top1_agreement.into();
                }
                println!("{v}");
            } else {
                print!(
                    "{} tokens, {} predictions: perplexity {:.4}",
                    ids.len(),
                    r.predictions,
                    r.perplexity
                );
                if let Some(c) = &r.reference {
                    print!(
                        "; reference perplexity {:.4}, mean KL {:.5} nats, top-1 agreement {:.2}%",
                        c.reference_perplexity,
                        c.mean_kl,
                        100.0 * c.top1_agreement
                    );
                }
                println!();
            }
        }
        Command::Serve {
            plan,
            host,
            port,
            api_key,
            max_num_seqs,
            max_waiting,
            no_prefix_caching,
            speculative_config,
            served_model_name,
            drain_timeout,
            max_body_bytes,
            max_connections,
            header_read_timeout,
            body_read_timeout,
            write_timeout,
            role,
            kv_transfer_port,
            kv_source,
            kv_transfer_min_tokens,
            kv_transfer_key_file,
            no_kv_shared_memory,
            run,
        } => {
            init_logging();
            check_role(role, kv_transfer_port, &kv_source, !no_prefix_caching)?;
            let key = kv_transfer_key_file
                .map(|path| {
                    let secret = std::fs::read(&path).with_context(|| {
                        format!("reading the KV transfer key {}", path.display())
                    })?;
                    runtime::disagg::transfer::TransferKey::from_secret(&secret)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
                })
                .transpose()?;
            let transfer = runtime::disagg::transfer::Options {
                shared_memory: !no_kv_shared_memory,
                key,
                ..Default::default()
            };
            let drain_timeout = seconds("--drain-timeout", drain_timeout, 0.0)?;
            // Zero would close every connection before its request arrives.
            let header_read_timeout = seconds("--header-read-timeout", header_read_timeout, 0.001)?;
            let body_read_timeout = seconds("--body-read-timeout", body_read_timeout, 0.001)?;
            let write_timeout = seconds("--write-timeout", write_timeout, 0.001)?;
            let speculative = speculative_config
                .as_deref()
                .map(runtime::speculative::SpeculativeConfig::parse)
                .transpose()
                .context("--speculative-config")?;
            if max_connections == 0 {
                bail!("--max-connections must be at least 1");
            }
            // Bound before the server is built, so that it reports the port actually taken
            // (`--kv-transfer-port 0` picks a free one).
            let transfers = kv_transfer_port
                .map(|port| {
                    let listener = std::net::TcpListener::bind((host.as_str(), port))
                        .with_context(|| format!("listening for KV transfers on {host}:{port}"))?;
                    listener.set_nonblocking(true)?;
                    anyhow::Ok(listener)
                })
                .transpose()?;
            let kv_transfer_port = match &transfers {
                Some(l) => Some(l.local_addr()?.port()),
                None => None,
            };
            let engine = load_batch_engine(&plan, &run, max_num_seqs.max(1))?;
            log_loaded(&plan, engine.as_ref());
            // A GPU instance moves blocks to and from other GPU instances on its host through
            // device memory.
            let transfer = runtime::disagg::transfer::Options {
                device: engine.device_link(),
                ..transfer
            };
            let config = ServerConfig {
                served_model_name,
                api_key,
                max_num_seqs,
                max_waiting,
                prefix_caching: !no_prefix_caching,
                max_body_bytes,
                drain_timeout,
                max_connections,
                header_read_timeout,
                body_read_timeout,
                write_timeout,
                speculative,
                disagg: runtime::server::disagg::DisaggConfig {
                    role,
                    kv_transfer_port,
                    kv_sources: kv_source,
                    min_transfer_tokens: kv_transfer_min_tokens,
                    transfer: transfer.clone(),
                },
            };
            let draft = match config.speculative.as_ref().map(|c| &c.method) {
                Some(runtime::speculative::SpeculativeMethod::Draft { model }) => {
                    let draft = load_batch_engine(model, &run, max_num_seqs.max(1))
                        .with_context(|| format!("loading the draft plan {}", model.display()))?;
                    if draft.vocab_size() != engine.vocab_size() {
                        bail!(
                            "the draft plan {} has a vocabulary of {} tokens, the served plan {}: they must share a tokenizer",
                            model.display(),
                            draft.vocab_size(),
                            engine.vocab_size()
                        );
                    }
                    Some(draft)
                }
                Some(runtime::speculative::SpeculativeMethod::Mtp) if !engine.runs_mtp() => {
                    if engine.plan().mtp.is_none() {
                        return Err(runtime::RuntimeError::NoMtpModule.into());
                    }
                    bail!("the mtp speculative method runs on CPU plans only so far: the GPU engine does not run the plan's prediction module yet");
                }
                _ => None,
            };
            let server = Server::with_draft(engine, draft, config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                // The engine's own threads do the heavy work; HTTP needs few.
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                    .await
                    .with_context(|| format!("listening on {host}:{port}"))?;
                let address = listener.local_addr()?;
                if let Some(transfers) = transfers {
                    let transfers = tokio::net::TcpListener::from_std(transfers)?;
                    tracing::info!(
                        "serving KV transfers to decode instances at {}",
                        transfers.local_addr()?
                    );
                    tokio::spawn(runtime::disagg::transfer::serve(
                        transfers,
                        server.scheduler().clone(),
                        server.instance_state(),
                        transfer,
                    ));
                }
                tracing::info!(
                    "serving `{}` at http://{address}/v1 (OpenAI API){}",
                    server.model_name(),
                    if server.has_api_key() {
                        ", API key required"
                    } else {
                        ""
                    }
                );
                runtime::server::serve(listener, server, shutdown_signal()).await?;
                tracing::info!("stopped");
                anyhow::Ok(())
            })?;
        }
        Command::Router {
            prefill,
            decode,
            host,
            port,
            api_key,
            health_interval,
            upstream_timeout,
            auto_roles,
            role_cooldown,
            ttft_target_ms,
            tpot_target_ms,
        } => {
            init_logging();
            let target = |flag: &str, ms: Option<f64>| -> Result<Option<Duration>> {
                match ms {
                    Some(ms) if !(ms.is_finite() && ms > 0.0 && ms < 1e9) => {
                        bail!("{flag} must be a positive number of milliseconds")
                    }
                    ms => Ok(ms.map(|ms| Duration::from_secs_f64(ms / 1e3))),
                }
            };
            let targets = runtime::router::Targets {
                ttft: target("--ttft-target-ms", ttft_target_ms)?,
                tpot: target("--tpot-target-ms", tpot_target_ms)?,
            };
            let config = runtime::router::RouterConfig {
                prefill,
                decode,
                api_key,
                health_interval: seconds("--health-interval", health_interval, 0.01)?,
                upstream_timeout: seconds("--upstream-timeout", upstream_timeout, 0.01)?,
                auto_roles,
                role_cooldown: seconds("--role-cooldown", role_cooldown, 0.0)?,
                targets,
                ..Default::default()
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async move {
                let router = runtime::router::Router::connect(config).await?;
                let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                    .await
                    .with_context(|| format!("listening on {host}:{port}"))?;
                tracing::info!(
                    "routing at http://{}/v1 (plan {})",
                    listener.local_addr()?,
                    router.plan()
                );
                runtime::router::serve(listener, router, shutdown_signal()).await?;
                anyhow::Ok(())
            })?;
        }
        Command::BenchServe {
            address,
            model,
            api_key,
            concurrency,
            requests,
            input_len,
            output_len,
            range_ratio,
            token_range,
            seed,
            shared_prefix_len,
            long_prompt_len,
            long_prompt_after,
            json,
        } => {
            let (low, high) = token_range
                .split_once("..")
                .and_then(|(l, h)| Some((l.trim().parse().ok()?, h.trim().parse().ok()?)))
                .context("--token-range must look like 1000..20000")?;
            let options = BenchOptions {
                address,
                model,
                api_key,
                concurrency,
                requests,
                input_len,
                output_len,
                range_ratio,
                token_range: (low, high),
                seed,
                shared_prefix_len,
                long_prompt: long_prompt_len.map(|len| (len, long_prompt_after)),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let report = runtime.block_on(runtime::server::bench::run(options))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            if report.completed == 0 {
                bail!("no request completed");
            }
        }
        Command::UpdateWeights {
            address,
            api_key,
            dir,
            snapshot_id,
            rank,
        } => {
            let dir = std::path::absolute(&dir)
                .with_context(|| format!("resolving {}", dir.display()))?;
            let request = runtime::weights_update::UpdateWeightsRequest {
                dir,
                snapshot_id,
                rank,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let report = runtime.block_on(runtime::server::admin::request_update(
                &address,
                api_key.as_deref(),
                &request,
            ))?;
            println!(
                "switched to snapshot {} rank {}: {} parts, {} weights, loaded in {:.0} ms, switched {:.0} ms later",
                report.snapshot_id,
                report.rank,
                report.parts,
                report.weights,
                report.load_ms,
                report.switch_ms
            );
        }
        Command::Bench {
            plan,
            prompt_tokens,
            decode_tokens,
            repeats,
            batch,
            json,
            run,
        } => {
            if batch > 1 {
                let mut engine = load_batch_engine(&plan, &run, batch)?;
                let r = runtime::bench::run_batch(engine.as_mut(), batch, decode_tokens, repeats)?;
                let m = &engine.plan().manifest;
                if json {
                    let mut report = bench_json_head(&plan, m);
                    report["batch"] = r.batch.into();
                    report["decode_tokens"] = r.decode_tokens.into();
                    report["decode_tok_s"] = r.decode_tok_s.into();
                    report["step_ms"] = r.step_ms.into();
                    println!("{report}");
                } else {
                    println!(
                        "decode batch {}, {} tokens each: {:.1} tokens/s, {:.2} ms per step ({}, {})",
                        r.batch, r.decode_tokens, r.decode_tok_s, r.step_ms, m.target, m.weight_dtype
                    );
                }
                return Ok(());
            }
            let mut engine = load_one_sequence(&plan, &run)?;
            let target = engine.plan().manifest.target;
            let r = runtime::bench::run(engine.as_mut(), prompt_tokens, decode_tokens, repeats)?;
            let threads = match target {
                ir_types::Target::Cuda(_) | ir_types::Target::Dcu(_) => 0,
                ir_types::Target::Cpu(_) => rayon::current_num_threads(),
            };
            if json {
                let mut report = bench_json_head(&plan, &engine.plan().manifest);
                report["threads"] = threads.into();
                report["prefill_tokens"] = r.prefill_tokens.into();
                report["prefill_tok_s"] = r.prefill_tok_s.into();
                report["decode_tokens"] = r.decode_tokens.into();
                report["decode_tok_s"] = r.decode_tok_s.into();
                println!("{report}");
            } else {
                println!(
                    "prefill {} tokens: {:.1} tokens/s; decode {} tokens: {:.1} tokens/s ({} threads, {}, {})",
                    r.prefill_tokens,
                    r.prefill_tok_s,
                    r.decode_tokens,
                    r.decode_tok_s,
                    threads,
                    engine.plan().manifest.target,
                    engine.plan().manifest.weight_dtype
                );
            }
        }
    }
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A flag's number of seconds as a duration: finite, at least `least`, and small enough to be
/// one (`Duration::from_secs_f64` panics on what it cannot hold).
fn seconds(flag: &str, value: f64, least: f64) -> Result<Duration> {
    if !(value.is_finite() && value >= least) {
        bail!("{flag} must be a number of seconds >= {least}");
    }
    Duration::try_from_secs_f64(value).with_context(|| format!("{flag} {value} s is too long"))
}

/// Says what was loaded and the memory it reserved.
/// What every `fdrt bench --json` report starts with: the engine and the plan measured.
fn bench_json_head(plan: &Path, m: &artifacts::schema::Manifest) -> serde_json::Value {
    serde_json::json!({
        "engine": "fdrt",
        "plan": plan.display().to_string(),
        "target": m.target.name(),
        "dtype": m.weight_dtype.name(),
    })
}

fn log_loaded(plan: &Path, engine: &dyn BatchEngine) {
    let m = &engine.plan().manifest;
    let options = engine.options();
    let kv_tokens = engine.kv_blocks() * options.block_size;
    let kv_bytes = kv_tokens as u64 * m.kv.bytes_per_token;
    let arena_bytes = m.memory.arena_cols * options.max_batch_tokens as u64 * 4;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    tracing::info!(
        "loaded {} ({}): {} ({:.1} M parameters), {} weights, target {}, tokenizer {}",
        plan.display(),
        m.model.architecture,
        m.model.name,
        m.model.parameter_count as f64 / 1e6,
        m.weight_dtype,
        m.target,
        if engine.plan().tokenizer_json().is_some() {
            "yes"
        } else {
            "no"
        },
    );
    let weights = engine.plan().weights();
    if weights.file_count() > 1 {
        tracing::info!(
            "weights from {} part files, verified and loaded one at a time",
            weights.file_count()
        );
    }
    tracing::info!(
        "reserved: KV cache {:.1} MiB ({} blocks of {} positions = {} tokens at {} bytes each, {:.1} full contexts of {}; committed as used), arena {:.1} MiB ({} tokens per pass), {} worker threads",
        mib(kv_bytes),
        engine.kv_blocks(),
        options.block_size,
        kv_tokens,
        m.kv.bytes_per_token,
        kv_tokens as f64 / options.max_context as f64,
        options.max_context,
        mib(arena_bytes),
        options.max_batch_tokens,
        rayon::current_num_threads(),
    );
}

/// `fdrt serve`'s disaggregation flags fit its `--role`.
fn check_role(
    role: runtime::disagg::Role,
    kv_transfer_port: Option<u16>,
    kv_sources: &[String],
    prefix_caching: bool,
) -> Result<()> {
    use runtime::disagg::Role;
    if role != Role::Mixed && !prefix_caching {
        bail!("--role prefill and --role decode move KV blocks through the prefix cache: drop --no-prefix-caching");
    }
    match role {
        Role::Prefill if kv_transfer_port.is_none() => {
            bail!("--role prefill needs --kv-transfer-port PORT, where decode instances fetch KV blocks")
        }
        Role::Decode if kv_sources.is_empty() => {
            bail!("--role decode needs --kv-source HOST:PORT for each prefill instance it may take KV blocks from")
        }
        // Either flag on another role makes the instance able to switch to that role later
        // (POST /admin/v1/role).
        _ => Ok(()),
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

fn render_chat(plan: &LoadedPlan, system: Option<String>, user: &str) -> Result<String> {
    let info = plan
        .manifest
        .tokenizer
        .as_ref()
        .ok_or(runtime::RuntimeError::NoTokenizer)?;
    let source = info
        .chat_template
        .as_deref()
        .ok_or(runtime::RuntimeError::NoChatTemplate)?;
    let template = ChatTemplate::new(source, info.bos_token.clone(), info.eos_token.clone())?;
    let mut messages = vec![];
    if let Some(s) = system {
        messages.push(ChatMessage::new("system", s));
    }
    messages.push(ChatMessage::new("user", user));
    Ok(template.render(&messages, true)?)
}
