//! Speculative decoding through the scheduler: with n-gram proposals, greedy outputs are token
//! for token those of decoding one token per step, on every tiny golden and SmolLM2, one
//! request at a time and eight at once; proposals are actually made and accepted (else the
//! comparison would prove nothing); stops, token limits, sampled requests and the per-request
//! opt-out behave; likewise a draft plan and DeepSeek-V3's MTP module (the module itself is
//! checked against a float64 reference in `mtp.rs`). That rejection sampling keeps the
//! distribution is tested in `runtime::sampler` (chi-square).

mod common;

use common::*;
use ir::DType;
use runtime::sampler::SamplingParams;
use runtime::scheduler::{Event, RequestParams, Scheduler, SchedulerConfig, Stats};
use runtime::speculative::SpeculativeConfig;
use runtime::EngineOptions;
use std::path::Path;

fn scheduler(plan: &Path, max_num_seqs: usize, speculative: Option<&str>) -> Scheduler {
    scheduler_with_draft(plan, None, max_num_seqs, speculative)
}

/// With `draft` as the draft model of a `draft` configuration.
fn scheduler_with_draft(
    plan: &Path,
    draft: Option<&Path>,
    max_num_seqs: usize,
    speculative: Option<&str>,
) -> Scheduler {
    let options = EngineOptions {
        max_context: 512,
        max_batch_tokens: 64,
        max_num_seqs,
        ..EngineOptions::default()
    };
    let draft = draft.map(|d| {
        Box::new(engine_with(d, options.clone())) as Box<dyn runtime::batch_engine::BatchEngine>
    });
    Scheduler::start_speculative(
        Box::new(engine_with(plan, options)),
        draft,
        SchedulerConfig {
            max_num_seqs,
            max_waiting: 64,
            prefix_caching: true,
            speculative: speculative.map(|json| SpeculativeConfig::parse(json).expect("config")),
        },
    )
}

fn greedy(max_tokens: usize) -> RequestParams {
    greedy_request(max_tokens)
}

/// Every request submitted at once (the scheduler batches up to its slots), then collected.
fn run_all(s: &Scheduler, requests: &[(Vec<u32>, RequestParams)]) -> Vec<(Vec<u32>, Event)> {
    run_requests(s, requests, false)
}

/// Runs `requests` (each asking for `tokens` tokens) to completion and checks that each
/// produced them all and that some proposal was accepted; the stats once idle.
fn all_complete_with_acceptances(
    s: &Scheduler,
    requests: &[(Vec<u32>, RequestParams)],
    tokens: usize,
) -> Stats {
    for (got, last) in run_all(s, requests) {
        assert_eq!(got.len(), tokens);
        assert!(
            matches!(last, Event::Done { completion_tokens, .. } if completion_tokens == tokens)
        );
    }
    let stats = wait_idle(s);
    assert!(
        stats.speculative.accepted_tokens > 0,
        "{:?}",
        stats.speculative
    );
    stats
}

/// Prompts that invite copying (a repeated phrase) and that do not, inside every tiny vocabulary.
fn tiny_prompts() -> Vec<Vec<u32>> {
    let phrase: Vec<u32> = vec![17, 42, 99, 5, 23, 8];
    let mut repeated = vec![3];
    for _ in 0..4 {
        repeated.extend(&phrase);
    }
    let varied: Vec<u32> = (0..21u32).map(|i| (i * 7919 + 11) % 250 + 3).collect();
    let counting: Vec<u32> = (10..40).collect();
    vec![repeated, varied, counting, vec![7, 7, 7, 7], phrase]
}

/// Greedy outputs with and without `config`, one request at a time and all at once.
fn assert_same_outputs(
    label: &str,
    plan: &Path,
    draft: Option<&Path>,
    prompts: &[Vec<u32>],
    config: &str,
    tokens: usize,
) -> Stats {
    let requests: Vec<(Vec<u32>, RequestParams)> = prompts
        .iter()
        .map(|p| (p.clone(), greedy(tokens)))
        .collect();
    let plain = scheduler(plan, 1, None);
    let want = run_requests(&plain, &requests, true);
    let mut stats = Stats::default();
    for slots in [1, 8] {
        let s = scheduler_with_draft(plan, draft, slots, Some(config));
        let got = run_requests(&s, &requests, slots == 1);
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                got, want,
                "{label}, {slots} slots, prompt {i}: speculative output differs"
            );
        }
        let st = wait_idle(&s);
        assert_eq!(st.kv_blocks_used, 0, "{label}: blocks still held");
        assert_eq!(
            st.speculative.draft_blocks_held, 0,
            "{label}: draft blocks still held"
        );
        stats.speculative.drafts += st.speculative.drafts;
        stats.speculative.draft_tokens += st.speculative.draft_tokens;
        stats.speculative.accepted_tokens += st.speculative.accepted_tokens;
        stats.steps += st.steps;
    }
    stats
}

#[test]
fn greedy_outputs_are_unchanged_on_every_tiny_golden() {
    for model in TINY_GOLDENS {
        let plan = compiled(&golden(model), DType::F32);
        for config in [
            r#"{"method": "ngram", "num_speculative_tokens": 4}"#,
            r#"{"method": "ngram", "num_speculative_tokens": 7, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#,
        ] {
            let stats = assert_same_outputs(model, &plan, None, &tiny_prompts(), config, 40);
            let spec = &stats.speculative;
            eprintln!(
                "{model} {config}: {} proposals, {} tokens proposed, {} accepted",
                spec.drafts, spec.draft_tokens, spec.accepted_tokens
            );
            assert!(
                spec.drafts > 0 && spec.accepted_tokens > 0,
                "{model}: nothing was proposed and accepted: {spec:?}"
            );
        }
    }
}

#[test]
fn greedy_outputs_are_unchanged_on_smollm2() {
    let plan = compiled(&smollm2_gguf(), DType::F32);
    let mut prompts: Vec<Vec<u32>> = smollm2_cases().into_iter().map(|c| c.prompt).collect();
    // A text written twice: the model goes on copying it, which n-grams predict.
    let mut twice = prompts[0].clone();
    twice.extend(prompts[0].clone());
    twice.extend(&prompts[0][..prompts[0].len() / 2]);
    prompts.push(twice);
    let stats = assert_same_outputs(
        "smollm2",
        &plan,
        None,
        &prompts,
        r#"{"method": "ngram"}"#,
        32,
    );
    let spec = &stats.speculative;
    eprintln!(
        "smollm2: {} proposals, {} tokens proposed, {} accepted",
        spec.drafts, spec.draft_tokens, spec.accepted_tokens
    );
    assert!(spec.accepted_tokens > 0, "nothing accepted: {spec:?}");
}

#[test]
fn stops_and_token_limits_cut_an_accepted_run_where_plain_decoding_would() {
    let plan = compiled(&golden("tiny/llama"), DType::F32);
    let prompt = tiny_prompts().remove(0);
    let plain = scheduler(&plan, 1, None);
    let (full, _) = run_all(&plain, &[(prompt.clone(), greedy(40))]).remove(0);
    let config = r#"{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 1}"#;
    // Stop at a token that comes late in the output, and limits of every length below 12.
    let stop = full[full.len() / 2];
    let mut requests = vec![(
        prompt.clone(),
        RequestParams {
            stop_token_ids: vec![stop],
            ..greedy(40)
        },
    )];
    for max_tokens in 1..12 {
        requests.push((prompt.clone(), greedy(max_tokens)));
    }
    let want = run_requests(&plain, &requests, true);
    let s = scheduler(&plan, 4, Some(config));
    let got = run_all(&s, &requests);
    assert_eq!(got, want);
    let first_stop = full.iter().position(|&t| t == stop).expect("in the output");
    assert_eq!(got[0].0.len(), first_stop + 1, "stops at the first {stop}");
    assert!(wait_idle(&s).speculative.accepted_tokens > 0);
}

#[test]
fn sampled_requests_and_opted_out_requests_run_and_are_counted_apart() {
    let plan = compiled(&golden("tiny/llama"), DType::F32);
    let prompt = tiny_prompts().remove(0);
    let s = scheduler(
        &plan,
        4,
        Some(r#"{"method": "ngram", "prompt_lookup_min": 1}"#),
    );
    // Opted out: nothing is proposed.
    let opted_out = RequestParams {
        speculative: false,
        ..greedy(30)
    };
    let (tokens, last) = run_all(&s, &[(prompt.clone(), opted_out)]).remove(0);
    assert_eq!(tokens.len(), 30);
    assert!(matches!(
        last,
        Event::Done {
            completion_tokens: 30,
            ..
        }
    ));
    assert_eq!(wait_idle(&s).speculative.drafts, 0);
    // Sampled, with penalties and log-probabilities: every token is reported once, with its
    // log-probability, and proposals were verified.
    let sampled = RequestParams {
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: Some(0.95),
            seed: Some(11),
            frequency_penalty: 0.1,
            ..SamplingParams::greedy()
        },
        logprobs: Some(2),
        ..greedy(40)
    };
    let mut stream = s.submit(prompt.clone(), sampled).expect("submit");
    let mut count = 0;
    loop {
        match stream.next_blocking().expect("an event") {
            Event::Token(t) => {
                assert!(t.logprob.is_some_and(|l| l <= 0.0) && t.top_logprobs.len() == 2);
                count += 1;
            }
            Event::Done {
                completion_tokens, ..
            } => {
                assert_eq!(completion_tokens, count);
                break;
            }
            Event::Failed(e) => panic!("failed: {e}"),
        }
    }
    assert_eq!(count, 40);
    let stats = wait_idle(&s);
    assert!(stats.speculative.drafts > 0, "{:?}", stats.speculative);
    assert_eq!(stats.kv_blocks_used, 0);
}

/// The `draft` method: the same model in bf16 proposes for its f32 plan (same vocabulary,
/// slightly different numbers, so most proposals stand and some do not), and an unrelated tiny
/// model of the same vocabulary proposes (nearly everything rejected, so the draft's cache is
/// rolled back at almost every step, and the sequence soon proposes only now and then).
#[test]
fn a_draft_model_leaves_greedy_outputs_unchanged() {
    let pairs = [
        ("tiny/llama", "tiny/llama", true),
        ("tiny/qwen3_moe", "tiny/qwen3_moe", true),
        ("tiny/deepseek_v3", "tiny/deepseek_v3", true),
        ("tiny/llama", "tiny/qwen2", false),
        ("tiny/mixtral", "tiny/deepseek_v3", false),
    ];
    for (model, draft_model, same) in pairs {
        let plan = compiled(&golden(model), DType::F32);
        let draft = compiled(&golden(draft_model), DType::BF16);
        let config =
            r#"{"method": "draft", "model": "unused-here.fdp", "num_speculative_tokens": 3}"#;
        let label = format!("{model} drafted by {draft_model}");
        let stats = assert_same_outputs(&label, &plan, Some(&draft), &tiny_prompts(), config, 40);
        let spec = &stats.speculative;
        eprintln!(
            "{label}: {} proposals, {} tokens proposed, {} accepted",
            spec.drafts, spec.draft_tokens, spec.accepted_tokens
        );
        assert!(spec.drafts > 0, "{label}: nothing proposed");
        if same {
            assert!(
                spec.accepted_tokens > 0,
                "{label}: nothing accepted: {spec:?}"
            );
        } else {
            assert!(
                spec.accepted_tokens < spec.draft_tokens / 2,
                "{label}: {spec:?}"
            );
            // Rejected proposals pause proposing (1, 3, 7, 15 steps): of the 400 decode steps
            // (5 prompts of 40 tokens, twice) far fewer than half propose.
            assert!(spec.drafts < 150, "{label}: no back-off: {spec:?}");
        }
    }
    let plan = compiled(&smollm2_gguf(), DType::F32);
    let draft = compiled(&smollm2_gguf(), DType::BF16);
    let prompts: Vec<Vec<u32>> = smollm2_cases().into_iter().map(|c| c.prompt).collect();
    let stats = assert_same_outputs(
        "smollm2",
        &plan,
        Some(&draft),
        &prompts,
        r#"{"method": "draft", "model": "unused-here.fdp"}"#,
        24,
    );
    assert!(
        stats.speculative.accepted_tokens > 0,
        "{:?}",
        stats.speculative
    );
}

#[test]
fn sampled_requests_verify_a_draft_models_proposals() {
    let plan = compiled(&golden("tiny/llama"), DType::F32);
    let draft = compiled(&golden("tiny/llama"), DType::BF16);
    let s = scheduler_with_draft(
        &plan,
        Some(&draft),
        4,
        Some(r#"{"method": "draft", "model": "unused-here.fdp"}"#),
    );
    let sampled = RequestParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: Some(40),
            seed: Some(5),
            repetition_penalty: 1.1,
            ..SamplingParams::greedy()
        },
        ..greedy(48)
    };
    let requests: Vec<_> = tiny_prompts()
        .into_iter()
        .map(|p| (p, sampled.clone()))
        .collect();
    let stats = all_complete_with_acceptances(&s, &requests, 48);
    assert_eq!(
        (stats.kv_blocks_used, stats.speculative.draft_blocks_held),
        (0, 0)
    );
}

/// A KV pool smaller than the request: proposals near its end would need positions past the
/// pool, so they are dropped there, and the request still ends where it ends without
/// speculation (not earlier, and with no proposed token counted).
#[test]
fn proposals_that_would_overflow_the_pool_are_dropped_not_fatal() {
    let plan = compiled(&golden("tiny/llama"), DType::F32);
    let draft = compiled(&golden("tiny/llama"), DType::BF16);
    let options = EngineOptions {
        max_context: 512,
        max_batch_tokens: 64,
        max_num_seqs: 1,
        block_size: 16,
        kv_blocks: Some(4),
    };
    let start = |config: Option<&str>, draft: Option<&Path>| {
        // The draft's own pool is larger: only the target's pool limits the proposals.
        let draft_options = EngineOptions {
            kv_blocks: Some(8),
            ..options.clone()
        };
        let draft = draft.map(|d| {
            Box::new(engine_with(d, draft_options)) as Box<dyn runtime::batch_engine::BatchEngine>
        });
        Scheduler::start_speculative(
            Box::new(engine_with(&plan, options.clone())),
            draft,
            SchedulerConfig {
                max_num_seqs: 1,
                max_waiting: 4,
                prefix_caching: false,
                speculative: config.map(|c| SpeculativeConfig::parse(c).expect("config")),
            },
        )
    };
    // 50 prompt tokens and up to 30 generated: the 64 positions of the pool end it first.
    let prompt: Vec<u32> = tiny_prompts()[0].iter().cycle().take(50).copied().collect();
    let request = [(prompt, greedy(30))];
    let (want, last) = run_all(&start(None, None), &request).remove(0);
    assert!(
        (10..30).contains(&want.len()),
        "{} tokens, {last:?}",
        want.len()
    );
    for (config, d) in [
        (
            r#"{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 1}"#,
            None,
        ),
        (
            r#"{"method": "draft", "model": "unused-here.fdp", "num_speculative_tokens": 8}"#,
            Some(draft.as_path()),
        ),
    ] {
        let s = start(Some(config), d);
        let got = run_all(&s, &request).remove(0);
        assert_eq!(got, (want.clone(), last.clone()), "{config}");
        assert!(
            wait_idle(&s).speculative.drafts > 0,
            "{config}: nothing proposed"
        );
    }
}

#[test]
fn the_mtp_module_leaves_greedy_outputs_unchanged() {
    let plan = compiled(&deepseek_mtp_checkpoint(), DType::F32);
    let loaded = runtime::LoadedPlan::load(&plan).expect("loading");
    assert!(loaded.mtp.is_some(), "the plan has no prediction module");
    for config in [
        r#"{"method": "mtp", "num_speculative_tokens": 1}"#,
        r#"{"method": "mtp", "num_speculative_tokens": 3}"#,
    ] {
        let stats =
            assert_same_outputs("deepseek_v3 mtp", &plan, None, &tiny_prompts(), config, 40);
        let spec = &stats.speculative;
        eprintln!(
            "mtp {config}: {} proposals of {} tokens, {} accepted, {} steps",
            spec.drafts, spec.draft_tokens, spec.accepted_tokens, stats.steps
        );
        assert!(spec.draft_tokens > 0, "{config}: nothing was proposed");
    }
    // A plan without a module refuses the method rather than proposing nothing.
    let plain = compiled(&golden("tiny/deepseek_v3"), DType::F32);
    assert!(runtime::LoadedPlan::load(&plain)
        .expect("loading")
        .mtp
        .is_none());
}

/// Sampled requests draw the module's proposals from its own distribution and verify them by
/// rejection sampling; with random weights its greedy proposals are always rejected, but sampled
/// ones are accepted often enough to count (every accepted token went through
/// `verify_proposal`). An opted-out request runs beside them.
#[test]
fn sampled_requests_verify_the_mtp_modules_proposals() {
    let plan = compiled(&deepseek_mtp_checkpoint(), DType::F32);
    let s = scheduler(
        &plan,
        4,
        Some(r#"{"method": "mtp", "num_speculative_tokens": 2}"#),
    );
    let sampled = RequestParams {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            repetition_penalty: 1.1,
            ..SamplingParams::greedy()
        },
        ..greedy(48)
    };
    let mut requests: Vec<_> = tiny_prompts()
        .into_iter()
        .map(|p| (p, sampled.clone()))
        .collect();
    requests.push((
        vec![4, 5, 6],
        RequestParams {
            speculative: false,
            ..sampled.clone()
        },
    ));
    let stats = all_complete_with_acceptances(&s, &requests, 48);
    eprintln!("{:?}", stats.speculative);
    assert_eq!(stats.kv_blocks_used, 0);
}

/// A prompt served again comes from the prefix cache, and the module's rows of the KV blocks
/// with it: blocks are shared only once the module has written its rows in them, whoever
/// computed them (a request that opted out, one that ended in the pass that filled them). The
/// rows are the proof: a sampled request's output depends on its proposals, so it must be the
/// same after any such warm-up as in a cold run; greedy outputs must equal plain decoding's.
#[test]
fn the_mtp_module_carries_on_from_a_cached_prefix() {
    let plan = compiled(&deepseek_mtp_checkpoint(), DType::F32);
    let prompt: Vec<u32> = (0..150u32).map(|i| (i * 37 + 5) % 300 + 3).collect();
    let longer: Vec<u32> = prompt.iter().copied().chain([17, 18, 19]).collect();
    let mtp = r#"{"method": "mtp", "num_speculative_tokens": 2}"#;
    let requests: Vec<(Vec<u32>, RequestParams)> = [prompt.clone(), prompt.clone(), longer]
        .into_iter()
        .map(|p| (p, greedy(24)))
        .collect();
    let want = run_requests(&scheduler(&plan, 1, None), &requests, true);
    let s = scheduler(&plan, 1, Some(mtp));
    assert_eq!(run_requests(&s, &requests, true), want);
    let stats = wait_idle(&s);
    assert!(stats.prefix_cache_hit_tokens >= 128, "{stats:?}");
    assert!(stats.speculative.draft_tokens > 0);

    let sampled = RequestParams {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            ..SamplingParams::greedy()
        },
        ..greedy(24)
    };
    let request = (prompt.clone(), sampled);
    // A budget that takes the whole prompt in one pass.
    let mtp_scheduler = || {
        let options = EngineOptions {
            max_context: 512,
            max_batch_tokens: 256,
            max_num_seqs: 1,
            ..EngineOptions::default()
        };
        Scheduler::start(
            Box::new(engine_with(&plan, options)),
            SchedulerConfig {
                max_num_seqs: 1,
                max_waiting: 8,
                prefix_caching: true,
                speculative: Some(SpeculativeConfig::parse(mtp).expect("config")),
            },
        )
    };
    let cold = run_requests(&mtp_scheduler(), std::slice::from_ref(&request), true);
    let warm_ups = [
        RequestParams {
            speculative: false,
            ..greedy(2)
        },
        greedy(1),
    ];
    for warm_up in warm_ups {
        let s = mtp_scheduler();
        run_requests(&s, &[(prompt.clone(), warm_up.clone())], true);
        let warm = run_requests(&s, std::slice::from_ref(&request), true);
        assert_eq!(warm, cold, "after a warm-up of {warm_up:?}");
        assert!(wait_idle(&s).prefix_cache_hit_tokens >= 128 || warm_up.max_tokens == 1);
    }
}
