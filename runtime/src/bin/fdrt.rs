//! `fdrt`: the command line of the runtime. Argument parsing only; the work is in the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use runtime::chat::{ChatMessage, ChatTemplate};
use runtime::generate::{generate, GenerateOptions};
use runtime::sampler::SamplingParams;
use runtime::tokenizer::TextTokenizer;
use runtime::{Engine, EngineOptions, LoadedPlan};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    /// Tokens per forward pass; longer prompts are processed in chunks.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
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
    /// Measure batch-1 prefill and decode throughput.
    Bench {
        plan: PathBuf,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
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

fn load(plan: &Path, args: &RunArgs) -> Result<Engine> {
    load_with_slots(plan, args, 1)
}

/// Loads a plan into an engine with `max_num_seqs` sequence slots.
fn load_with_slots(plan: &Path, args: &RunArgs, max_num_seqs: usize) -> Result<Engine> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up worker threads")?;
    }
    let loaded = LoadedPlan::load(plan).with_context(|| format!("loading {}", plan.display()))?;
    let max_context = args
        .max_context
        .min(loaded.manifest.model.max_position_embeddings.max(1) as usize);
    let options = EngineOptions {
        max_context,
        max_batch_tokens: args.max_batch_tokens,
        max_num_seqs,
    };
    Ok(Engine::new(loaded, options)?)
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
            ignore_eos,
            json,
            run,
        } => {
            let mut engine = load(&plan, &run)?;
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
                        tok.encode_raw(&render_chat(&engine, system, &text)?)?
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
                },
                stop_token_ids: vec![],
                ignore_eos,
            };
            let start = Instant::now();
            let out = if json || tokenizer.is_none() {
                let out = generate(&mut engine, &prompt_ids, &options, |_| {})?;
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
                let out = generate(&mut engine, &prompt_ids, &options, |id| {
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
        Command::Bench {
            plan,
            prompt_tokens,
            decode_tokens,
            repeats,
            json,
            run,
        } => {
            let mut engine = load(&plan, &run)?;
            let r = runtime::bench::run(&mut engine, prompt_tokens, decode_tokens, repeats)?;
            let threads = rayon::current_num_threads();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "engine": "fdrt",
                        "plan": plan.display().to_string(),
                        "target": engine.plan().manifest.target.name(),
                        "dtype": engine.plan().manifest.weight_dtype.name(),
                        "threads": threads,
                        "prefill_tokens": r.prefill_tokens,
                        "prefill_tok_s": r.prefill_tok_s,
                        "decode_tokens": r.decode_tokens,
                        "decode_tok_s": r.decode_tok_s,
                    })
                );
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

fn render_chat(engine: &Engine, system: Option<String>, user: &str) -> Result<String> {
    let info = engine
        .plan()
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
