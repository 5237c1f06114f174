//! Speculative decoding against plain decoding on one plan, through the scheduler as `fdrt
//! serve` runs it: a task that copies from its context (correcting a supplied text) and free
//! chat, each request alone (batch 1), greedy, the two configurations alternated so that a busy
//! machine slows both alike. Prints decode tokens/s per request and configuration, and the
//! acceptance of the proposals. A `draft` configuration loads its draft plan from `"model"`.
//!
//! ```text
//! cargo run --release -p runtime --example spec_bench -- PLAN [--rounds N] [--max-tokens N] \
//!     [--speculative-config JSON]
//! ```

use runtime::chat::{ChatMessage, ChatTemplate};
use runtime::sampler::SamplingParams;
use runtime::scheduler::{Event, RequestParams, Scheduler, SchedulerConfig};
use runtime::speculative::{SpeculativeConfig, SpeculativeMethod};
use runtime::tokenizer::TextTokenizer;
use runtime::{Engine, EngineOptions, LoadedPlan};
use std::time::Instant;

const DOCUMENT: &str =
    "The lighthouse stood at the edge of the cliff for more then two hundred years. \
Every night its keeper climbed the hundred and twelve steps to light the lamp, and every morning \
he climbed them again to put it out. Ships that passed the point in the dark relied on the beam to \
find the harbour, and in all those years only one ship was lost on the rocks below, on a night \
when fog was so thick that the light could not be seen from the water. The last keeper retired \
in 1986, when the lamp was made automatic, and the cottage beside the tower became a small museum \
about the history of the coast and the people who lived there.";

fn tasks() -> Vec<(&'static str, String)> {
    vec![
        (
            "copy: correct a text",
            format!("Correct the spelling mistakes in this text and write it out again in full:\n\n{DOCUMENT}"),
        ),
        (
            "copy: repeat a text",
            format!("Repeat the following text exactly, word for word:\n\n{DOCUMENT}"),
        ),
        ("chat: a story", "Write a short story about a robot who learns to paint.".into()),
        ("chat: an explanation", "Explain how a rainbow forms, in simple terms.".into()),
    ]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let plan_path = args.next().ok_or("usage: spec_bench PLAN [options]")?;
    let (mut rounds, mut max_tokens) = (3usize, 200usize);
    let mut config = r#"{"method": "ngram"}"#.to_string();
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--rounds" => rounds = value.parse()?,
            "--max-tokens" => max_tokens = value.parse()?,
            "--speculative-config" => config = value,
            _ => return Err(format!("unknown option {arg}").into()),
        }
    }
    let speculative = SpeculativeConfig::parse(&config)?;
    let plan = LoadedPlan::load(std::path::Path::new(&plan_path))?;
    let tokenizer =
        TextTokenizer::from_json(plan.tokenizer_json().ok_or("the plan has no tokenizer")?)?;
    let info = plan
        .manifest
        .tokenizer
        .clone()
        .ok_or("the plan has no tokenizer")?;
    let template = ChatTemplate::new(
        info.chat_template
            .as_deref()
            .ok_or("the plan has no chat template")?,
        info.bos_token.clone(),
        info.eos_token.clone(),
    )?;
    let prompts: Vec<(&str, Vec<u32>)> = tasks()
        .into_iter()
        .map(|(name, text)| {
            let rendered = template.render(&[ChatMessage::new("user", text)], true)?;
            Ok((name, tokenizer.encode(&rendered)?))
        })
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    let options = EngineOptions {
        max_context: 2048,
        max_batch_tokens: 512,
        max_num_seqs: 1,
        ..EngineOptions::default()
    };
    let load = |path: &std::path::Path| -> Result<Engine, Box<dyn std::error::Error>> {
        Ok(Engine::new(LoadedPlan::load(path)?, options.clone())?)
    };
    let start = |spec: Option<SpeculativeConfig>| -> Result<Scheduler, Box<dyn std::error::Error>> {
        let draft: Option<Box<dyn runtime::batch_engine::BatchEngine>> =
            match spec.as_ref().map(|c| &c.method) {
                Some(SpeculativeMethod::Draft { model }) => Some(Box::new(load(model)?)),
                _ => None,
            };
        Ok(Scheduler::start_speculative(
            Box::new(load(std::path::Path::new(&plan_path))?),
            draft,
            SchedulerConfig {
                max_num_seqs: 1,
                max_waiting: 4,
                prefix_caching: false,
                speculative: spec,
            },
        ))
    };
    let plain = start(None)?;
    let spec = start(Some(speculative))?;
    println!(
        "plan {plan_path}, speculative config {config}, {rounds} rounds, up to {max_tokens} tokens"
    );
    println!("| task | tokens | plain decode tok/s | speculative decode tok/s | speedup | accepted / proposed |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, prompt) in &prompts {
        let (mut plain_rates, mut spec_rates) = (vec![], vec![]);
        let mut tokens = 0;
        let before = spec.stats().speculative;
        for _ in 0..rounds {
            for (s, rates) in [(&plain, &mut plain_rates), (&spec, &mut spec_rates)] {
                let (n, rate) = run(s, prompt, max_tokens)?;
                tokens = n;
                rates.push(rate);
            }
        }
        let after = spec.stats().speculative;
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (p, s) = (median(&mut plain_rates), median(&mut spec_rates));
        println!(
            "| {name} | {tokens} | {p:.1} | {s:.1} | {:.2}x | {} / {} |",
            s / p,
            after.accepted_tokens - before.accepted_tokens,
            after.draft_tokens - before.draft_tokens,
        );
    }
    Ok(())
}

/// One greedy request alone: the tokens it produced and its decode rate (tokens after the first,
/// over the time after the first).
fn run(
    s: &Scheduler,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<(usize, f64), Box<dyn std::error::Error>> {
    let params = RequestParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        ignore_eos: false,
        logprobs: None,
        speculative: true,
    };
    let mut stream = s.submit(prompt.to_vec(), params)?;
    let mut first = None;
    let mut count = 0usize;
    loop {
        match stream.next_blocking().ok_or("the stream ended early")? {
            Event::Token(_) => {
                count += 1;
                first.get_or_insert_with(Instant::now);
            }
            Event::Done { .. } => break,
            Event::Failed(e) => return Err(e.into()),
        }
    }
    let first = first.ok_or("no token")?;
    Ok((count, (count - 1) as f64 / first.elapsed().as_secs_f64()))
}
