//! `fdrt serve` end to end: the server runs in-process on a loopback port (port 0), and these
//! tests talk to it over HTTP as any OpenAI client would.
//!
//! The tiny Llama plan has no tokenizer: it is driven with token-id prompts, and its greedy
//! output must equal the HF transformers golden. SmolLM2 (bf16) covers text: chat through the
//! plan's template, streaming, stop strings, logprobs and seeded sampling, each compared with
//! what the library produces directly. Errors, overload, authentication, client disconnects,
//! draining and 64 concurrent streams are checked against the scheduler's own statistics.

mod common;

use common::http::*;
use common::*;
use ir::DType;
use runtime::chat::{ChatMessage, ChatTemplate};
use runtime::generate::{generate, GenerateOptions};
use runtime::sampler::SamplingParams;
use runtime::server::{Server, ServerConfig};
use runtime::tokenizer::TextTokenizer;
use runtime::EngineOptions;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn tiny_plan() -> PathBuf {
    compiled(&golden("tiny/llama"), DType::F32)
}

fn smollm2_plan() -> PathBuf {
    compiled(&smollm2_gguf(), DType::BF16)
}

/// The tiny model's golden prompt and its 20-token greedy continuation (HF transformers).
fn tiny_golden() -> (Vec<u32>, Vec<u32>) {
    let json = read_json(&golden("tiny/llama/golden.json"));
    let prompt = ids(&json["prompt_ids"]);
    let greedy = ids(&json["greedy_ids"]);
    (prompt.clone(), greedy[prompt.len()..].to_vec())
}

/// A server on a loopback port, stopped by [`TestServer::shutdown`].
struct TestServer {
    base: String,
    server: Server,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), runtime::server::ServerError>>,
    client: reqwest::Client,
}

fn options(max_context: usize, max_num_seqs: usize) -> EngineOptions {
    EngineOptions {
        max_context,
        max_batch_tokens: 64,
        max_num_seqs,
        ..EngineOptions::default()
    }
}

async fn start(plan: &Path, engine: EngineOptions, config: ServerConfig) -> TestServer {
    let config = ServerConfig {
        max_num_seqs: engine.max_num_seqs,
        ..config
    };
    let server = Server::new(Box::new(engine_with(plan, engine)), config).expect("server starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let base = format!("http://{}", listener.local_addr().expect("bound address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runtime::server::serve(
        listener,
        server.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client");
    TestServer {
        base,
        server,
        stop: Some(stop),
        task,
        client,
    }
}

impl TestServer {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        read_json_response(response).await
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await.1
    }

    /// Sends a streaming request and returns its `data:` payloads, `[DONE]` included.
    async fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let response = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 200, "streaming request refused");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "content type {content_type}"
        );
        let mut events = SseReader::new(response);
        let mut out = vec![];
        while let Some(data) = events.next().await {
            out.push(data);
        }
        assert_eq!(
            out.last().map(String::as_str),
            Some("[DONE]"),
            "stream must end with [DONE]: {out:?}"
        );
        out
    }

    /// Waits (up to `limit`) until the scheduler holds nothing.
    async fn wait_idle(&self, limit: Duration) -> runtime::scheduler::Stats {
        let start = Instant::now();
        loop {
            let stats = self.server.stats();
            if (stats.running == 0 && stats.waiting == 0 && stats.kv_tokens_used == 0)
                || start.elapsed() > limit
            {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(60), self.task).await;
        result
            .expect("the server stops")
            .expect("the server task")
            .expect("serve returns Ok");
    }
}

/// The chunks of a stream as JSON, without the final `[DONE]`.
fn chunks(events: &[String]) -> Vec<Value> {
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str(e).unwrap_or_else(|err| panic!("chunk is not JSON ({err}): {e}"))
        })
        .collect()
}

fn error_of(body: &Value) -> (&str, Option<&str>, &str) {
    let e = &body["error"];
    (
        e["type"]
            .as_str()
            .unwrap_or_else(|| panic!("not an OpenAI error body: {body}")),
        e["param"].as_str(),
        e["message"].as_str().expect("an error message"),
    )
}

// ---- the tiny plan: token ids in, token ids out ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_completion_matches_the_golden_greedy_output() {
    let (prompt, want) = tiny_golden();
    let s = start(&tiny_plan(), options(256, 2), ServerConfig::default()).await;
    let (status, body) = s
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": want.len(), "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-")),
        "{body}"
    );
    assert!(
        body["created"].as_u64().is_some_and(|t| t > 1_600_000_000),
        "{body}"
    );
    assert_eq!(body["model"], s.server.model_name());
    let choice = &body["choices"][0];
    assert_eq!(
        token_ids(choice),
        want,
        "greedy tokens differ from HF transformers"
    );
    assert_eq!(choice["text"], "", "no tokenizer, no text");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": prompt.len(), "completion_tokens": want.len(), "total_tokens": prompt.len() + want.len()})
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_streams_several_prompts_and_choices_with_usage() {
    let (prompt, want) = tiny_golden();
    let short = prompt[..6].to_vec();
    let s = start(&tiny_plan(), options(256, 4), ServerConfig::default()).await;
    // The single-request output of the shorter prompt, to compare its choices with.
    let (_, body) = s
        .post(
            "/v1/completions",
            json!({"prompt": short, "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    let want_short = token_ids(&body["choices"][0]);
    assert_eq!(want_short.len(), 8);

    let events = s
        .stream(
            "/v1/completions",
            json!({"prompt": [prompt, short], "n": 2, "max_tokens": 8, "temperature": 0, "ignore_eos": true,
                   "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    let chunks = chunks(&events);
    let mut got: Vec<Vec<u32>> = vec![vec![]; 4];
    let mut finish: Vec<Option<String>> = vec![None; 4];
    for chunk in &chunks[..chunks.len() - 1] {
        assert_eq!(chunk["object"], "text_completion");
        assert!(
            chunk["usage"].is_null(),
            "usage only on the last chunk: {chunk}"
        );
        for c in chunk["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            assert!(finish[i].is_none(), "choice {i} continued after finishing");
            got[i].extend(token_ids(c));
            if let Some(reason) = c["finish_reason"].as_str() {
                finish[i] = Some(reason.to_string());
            }
        }
    }
    // Choice p * n + j is the j-th choice of prompt p.
    assert_eq!(
        got,
        vec![
            want[..8].to_vec(),
            want[..8].to_vec(),
            want_short.clone(),
            want_short
        ]
    );
    assert!(
        finish.iter().all(|f| f.as_deref() == Some("length")),
        "{finish:?}"
    );
    let last = chunks.last().expect("a usage chunk");
    assert_eq!(last["choices"], json!([]));
    let prompt_tokens = prompt.len() + 6;
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 32, "total_tokens": prompt_tokens + 32})
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_refuses_bad_requests_with_openai_errors() {
    let (prompt, _) = tiny_golden();
    let config = ServerConfig {
        max_body_bytes: 4096,
        served_model_name: Some("tiny".into()),
        ..ServerConfig::default()
    };
    let s = start(&tiny_plan(), options(64, 2), config).await;
    let long: Vec<u32> = (0..100).map(|i| 3 + i % 300).collect();
    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (
            json!({"prompt": "hello"}),
            400,
            Some("prompt"),
            "no tokenizer",
        ),
        (
            json!({"prompt": prompt, "temperature": -1}),
            400,
            Some("temperature"),
            "got -1",
        ),
        (
            json!({"prompt": prompt, "max_tokens": 0}),
            400,
            Some("max_tokens"),
            "at least 1",
        ),
        (
            json!({"prompt": prompt, "top_p": 2}),
            400,
            Some("top_p"),
            "(0, 1]",
        ),
        (
            json!({"prompt": long}),
            400,
            Some("prompt"),
            "100 tokens but the model's context holds 64",
        ),
        (
            json!({"prompt": prompt, "max_tokens": 60}),
            400,
            Some("max_tokens"),
            "prompt has 12 and max_tokens asks for 60 more (72 in all)",
        ),
        (
            json!({"prompt": [1, 2, 320]}),
            400,
            Some("prompt"),
            "token id 320 is out of range",
        ),
        (
            json!({"prompt": prompt, "model": "gpt-4"}),
            404,
            Some("model"),
            "`gpt-4` does not exist",
        ),
        (
            json!({"prompt": prompt, "presence_penalty": 3}),
            400,
            Some("presence_penalty"),
            "presence_penalty must be in [-2, 2], got 3",
        ),
        (
            json!({"prompt": prompt, "stop": "x"}),
            400,
            Some("stop"),
            "no tokenizer",
        ),
        (json!({"prompt": []}), 400, Some("prompt"), "empty"),
        (
            json!({"max_tokens": 3}),
            400,
            None,
            "missing field `prompt`",
        ),
    ];
    for (body, status, param, message) in cases {
        let (got, response) = s.post("/v1/completions", body.clone()).await;
        assert_eq!(got, status, "{body}: {response}");
        let (kind, got_param, got_message) = error_of(&response);
        assert_eq!(kind, "invalid_request_error", "{body}");
        assert_eq!(got_param, param, "{body}: {response}");
        assert!(
            got_message.contains(message),
            "{body}: message {got_message:?} lacks {message:?}"
        );
    }
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).2.contains("no tokenizer"), "{body}");

    // Malformed JSON, an oversized body, an unknown path: OpenAI bodies all the same.
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .header("content-type", "application/json")
        .body("{\"prompt\": [1,")
        .send()
        .await
        .unwrap();
    let (status, body) = read_json_response(response).await;
    assert_eq!(status, 400);
    assert!(error_of(&body).2.contains("not valid JSON"), "{body}");
    let big = json!({"prompt": vec![5u32; 3000]});
    let (status, body) = s.post("/v1/completions", big).await;
    assert_eq!(status, 413, "{body}");
    assert!(error_of(&body).2.contains("4096 bytes"), "{body}");
    let (status, text) = s.get("/v1/nothing").await;
    assert_eq!(status, 404);
    assert!(
        serde_json::from_str::<Value>(&text).is_ok_and(|v| v["error"]["message"].is_string()),
        "{text}"
    );

    // None of that reached the scheduler.
    assert_eq!(s.server.stats().steps, 0);
    let metrics = s.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "fdrt:http_requests_total{route=\"/v1/completions\",status=\"400\"}"
        ),
        12.0
    );
    assert_eq!(
        metric(
            &metrics,
            "fdrt:http_requests_total{route=\"/v1/completions\",status=\"404\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "fdrt:http_requests_total{route=\"/v1/completions\",status=\"413\"}"
        ),
        1.0
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let (prompt, want) = tiny_golden();
    let config = ServerConfig {
        served_model_name: Some("tiny-llama".into()),
        ..ServerConfig::default()
    };
    let s = start(&tiny_plan(), options(128, 2), config).await;
    let (status, text) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-llama");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], 128);
    assert_eq!(s.get("/v1/models/tiny-llama").await.0, 200);
    assert_eq!(s.get("/v1/models/other").await.0, 404);
    let (status, text) = s.get("/health").await;
    assert_eq!((status, text.as_str()), (200, "{\"status\":\"ok\"}"));

    let before = s.metrics().await;
    assert_eq!(metric(&before, "fdrt:generation_tokens_total{"), 0.0);
    let body = json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    for _ in 0..2 {
        let (status, response) = s.post("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "{response}");
        assert_eq!(token_ids(&response["choices"][0]), want[..5]);
    }
    let after = s.metrics().await;
    let model = "model_name=\"tiny-llama\"";
    assert_eq!(
        metric(&after, &format!("fdrt:prompt_tokens_total{{{model}}}")),
        2.0 * prompt.len() as f64
    );
    assert_eq!(
        metric(&after, &format!("fdrt:generation_tokens_total{{{model}}}")),
        10.0
    );
    assert_eq!(
        metric(
            &after,
            &format!("fdrt:request_success_total{{{model},finished_reason=\"length\"}}")
        ),
        2.0
    );
    assert_eq!(
        metric(
            &after,
            &format!("fdrt:time_to_first_token_seconds_count{{{model}}}")
        ),
        2.0
    );
    assert_eq!(
        metric(
            &after,
            &format!("fdrt:time_per_output_token_seconds_count{{{model}}}")
        ),
        2.0
    );
    assert_eq!(
        metric(
            &after,
            &format!("fdrt:e2e_request_latency_seconds_count{{{model}}}")
        ),
        2.0
    );
    assert_eq!(
        metric(
            &after,
            &format!("fdrt:inter_token_latency_seconds_count{{{model}}}")
        ),
        8.0
    );
    assert_eq!(
        metric(&after, &format!("fdrt:num_requests_running{{{model}}}")),
        0.0
    );
    assert_eq!(
        metric(&after, &format!("fdrt:num_requests_waiting{{{model}}}")),
        0.0
    );
    assert_eq!(
        metric(&after, &format!("fdrt:kv_cache_used_tokens{{{model}}}")),
        0.0
    );
    assert_eq!(
        metric(&after, &format!("fdrt:kv_cache_capacity_tokens{{{model}}}")),
        256.0
    );
    assert_eq!(
        metric(
            &after,
            "fdrt:http_requests_total{route=\"/v1/completions\",status=\"200\"}"
        ),
        2.0
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_the_v1_endpoints() {
    let (prompt, _) = tiny_golden();
    let config = ServerConfig {
        api_key: Some("sekret".into()),
        ..ServerConfig::default()
    };
    let s = start(&tiny_plan(), options(64, 1), config).await;
    let body = json!({"prompt": prompt, "max_tokens": 2});
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("sekret"),
        Some("Basic sekret"),
    ] {
        let mut request = s.client.post(s.url("/v1/completions")).json(&body);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let (status, response) = read_json_response(request.send().await.unwrap()).await;
        assert_eq!(status, 401, "{auth:?}: {response}");
        assert_eq!(error_of(&response).0, "authentication_error");
    }
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        s.client
            .get(s.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        s.client
            .get(s.url("/v1/models"))
            .bearer_auth("sekret")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // The liveness probe stays open; metrics need the key (tests/tests/server_security.rs).
    assert_eq!(s.get("/health").await.0, 200);
    assert_eq!(s.get("/metrics").await.0, 401);
    s.shutdown().await;
}

/// Greedy output of each request on its own, then of 64 concurrent streams: they must agree.
async fn concurrent_streams_match_single_requests(
    s: &TestServer,
    path: &str,
    requests: Vec<Value>,
) {
    let tokens_of = |events: &[String]| -> (Vec<u32>, String) {
        let mut ids = vec![];
        let mut text = String::new();
        for c in chunks(events) {
            for choice in c["choices"].as_array().into_iter().flatten() {
                ids.extend(token_ids(choice));
                text.push_str(
                    choice["text"]
                        .as_str()
                        .or(choice["delta"]["content"].as_str())
                        .unwrap_or(""),
                );
            }
        }
        (ids, text)
    };
    let mut single = vec![];
    for body in &requests {
        single.push(tokens_of(&s.stream(path, body.clone()).await));
    }
    let steps_before = s.server.stats().steps;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let body = requests[i % requests.len()].clone();
        let (client, url) = (s.client.clone(), s.url(path));
        tasks.spawn(async move {
            let response = client.post(url).json(&body).send().await.expect("request");
            assert_eq!(response.status().as_u16(), 200);
            let mut reader = SseReader::new(response);
            let mut events = vec![];
            while let Some(e) = reader.next().await {
                events.push(e);
            }
            (i, events)
        });
    }
    let mut mismatches = vec![];
    let mut completed = 0;
    while let Some(result) = tasks.join_next().await {
        let (i, events) = result.expect("client task");
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "stream {i} did not complete"
        );
        completed += 1;
        let got = tokens_of(&events);
        if got != single[i % requests.len()] {
            mismatches.push(format!(
                "request {i}: batched {:?} vs alone {:?}",
                got,
                single[i % requests.len()]
            ));
        }
    }
    assert_eq!(completed, 64);
    let stats = s.wait_idle(Duration::from_secs(10)).await;
    assert_eq!(
        (stats.running, stats.waiting, stats.kv_tokens_used),
        (0, 0, 0),
        "{stats:?}"
    );
    // Decoding was batched: far fewer forward passes than tokens generated.
    let generated: usize = (0..64).map(|i| single[i % requests.len()].0.len()).sum();
    let steps = (stats.steps - steps_before) as usize;
    assert!(
        steps * 4 < generated,
        "{steps} steps for {generated} tokens: the streams did not share passes"
    );
    let metrics = s.metrics().await;
    let model = format!("model_name=\"{}\"", s.server.model_name());
    assert_eq!(
        metric(&metrics, &format!("fdrt:num_requests_running{{{model}}}")),
        0.0
    );
    assert_eq!(
        metric(&metrics, &format!("fdrt:kv_cache_used_tokens{{{model}}}")),
        0.0
    );
    assert_eq!(
        metric(&metrics, &format!("fdrt:kv_cache_usage_perc{{{model}}}")),
        0.0
    );
    assert!(
        mismatches.is_empty(),
        "greedy output depends on the batch (not batch invariant) in {} of 64 streams:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_64_concurrent_streams_equal_single_requests() {
    let (prompt, _) = tiny_golden();
    let s = start(
        &tiny_plan(),
        options(256, 16),
        ServerConfig {
            max_waiting: 64,
            ..ServerConfig::default()
        },
    )
    .await;
    let requests: Vec<Value> = (0..8)
        .map(|k| {
            let p: Vec<u32> = prompt.iter().map(|&t| (t + 37 * k) % 320).collect();
            json!({"prompt": p[..4 + k as usize].to_vec(), "max_tokens": 16 + k, "temperature": 0, "ignore_eos": true, "stream": true})
        })
        .collect();
    concurrent_streams_match_single_requests(&s, "/v1/completions", requests).await;
    s.shutdown().await;
}

// ---- SmolLM2: text ----

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Greedy text of a chat prompt, computed with the library directly: template, tokenizer,
/// `generate`, decode (the end-of-sequence token is not text).
fn direct_chat_greedy(plan: &Path, question: &str, max_tokens: usize) -> (usize, Vec<u32>, String) {
    let mut engine = engine_with(plan, options(512, 1));
    let info = engine
        .plan()
        .manifest
        .tokenizer
        .clone()
        .expect("tokenizer info");
    let tokenizer =
        TextTokenizer::from_json(engine.plan().tokenizer_json().expect("tokenizer")).unwrap();
    let template = ChatTemplate::new(
        info.chat_template.as_deref().expect("template"),
        info.bos_token,
        info.eos_token,
    )
    .unwrap();
    let text = template
        .render(&[ChatMessage::new("user", question)], true)
        .unwrap();
    let prompt = tokenizer.encode_raw(&text).unwrap();
    let eos = engine.plan().manifest.model.eos_token_ids.clone();
    let options = GenerateOptions {
        max_new_tokens: max_tokens,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        ignore_eos: false,
    };
    let out = generate(&mut engine, &prompt, &options, |_| {}).unwrap();
    let content: Vec<u32> = out
        .tokens
        .iter()
        .copied()
        .filter(|t| !eos.contains(t))
        .collect();
    (
        prompt.len(),
        out.tokens,
        tokenizer.decode(&content).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_chat_streaming_and_stop_strings() {
    let plan = smollm2_plan();
    let question = "What is the capital of France?";
    let (prompt_tokens, tokens, want) = direct_chat_greedy(&plan, question, 24);
    let s = start(&plan, options(512, 2), ServerConfig::default()).await;
    let request = json!({"model": s.server.model_name(), "messages": user(question), "max_tokens": 24, "temperature": 0});
    let (status, body) = s.post("/v1/chat/completions", request.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        want.as_str(),
        "server text differs from the library's"
    );
    let finish = if tokens.len() < 24 { "stop" } else { "length" };
    assert_eq!(choice["finish_reason"], finish);
    assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], tokens.len());
    assert!(
        choice.get("token_ids").is_none(),
        "token ids only when asked"
    );

    // Streaming: a role chunk, content deltas that add up to the same text, a finish chunk.
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let events = chunks(&s.stream("/v1/chat/completions", streaming.clone()).await);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(events
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == events[0]["id"]));
    let text: String = events
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        finish
    );

    // A stop string in the middle of that answer: the text ends right before it.
    let cut = want
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= want.len() / 2)
        .expect("a long enough answer");
    let stop: String = want[cut..].chars().take(3).collect();
    let expected = &want[..want.find(&stop).unwrap()];
    let mut stopped = request.clone();
    stopped["stop"] = json!(["@@never@@", stop]);
    let (status, body) = s.post("/v1/chat/completions", stopped.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"], expected,
        "stop {stop:?}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() < tokens.len() as u64);
    stopped["stream"] = json!(true);
    let events = chunks(&s.stream("/v1/chat/completions", stopped).await);
    let text: String = events
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected, "streamed text with stop {stop:?}");
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    let stats = s.wait_idle(Duration::from_secs(5)).await;
    assert_eq!(
        (stats.running, stats.kv_tokens_used),
        (0, 0),
        "a stop string cancels the request"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_logprobs_and_seeded_sampling() {
    let plan = smollm2_plan();
    let s = start(&plan, options(512, 2), ServerConfig::default()).await;
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": user("Name a color."), "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs content");
    assert!(!content.is_empty());
    let mut joined = String::new();
    for entry in content {
        let top = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3, "{entry}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]),
            "alternatives best first: {lps:?}"
        );
        // Greedy: the chosen token is the best alternative.
        assert_eq!(entry["token"], top[0]["token"], "{entry}");
        assert_eq!(entry["logprob"].as_f64(), Some(lps[0]));
        assert!(lps[0] <= 0.0 && lps[0] > -50.0);
        let token = entry["token"].as_str().unwrap();
        assert_eq!(entry["bytes"], json!(token.as_bytes()));
        joined.push_str(token);
    }
    assert_eq!(
        joined,
        body["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // Legacy completions logprobs: one entry per generated token.
    let (status, body) = s
        .post("/v1/completions", json!({"prompt": "The sky is", "max_tokens": 5, "temperature": 0, "logprobs": 2, "ignore_eos": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert!(lp["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_object().is_some_and(|m| !m.is_empty() && m.len() <= 2)));
    assert_eq!(lp["text_offset"][0], 0);

    // Seeds: the same seed reproduces a sampled answer, another seed gives another one.
    let sampled = |seed: i64| {
        json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.5, "seed": seed,
               "ignore_eos": true, "return_token_ids": true})
    };
    let (_, a) = s.post("/v1/completions", sampled(42)).await;
    let (_, b) = s.post("/v1/completions", sampled(42)).await;
    let (_, c) = s.post("/v1/completions", sampled(7)).await;
    let (a, b, c) = (
        token_ids(&a["choices"][0]),
        token_ids(&b["choices"][0]),
        token_ids(&c["choices"][0]),
    );
    assert_eq!(a.len(), 16);
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "another seed, other tokens");
    // n = 2 with a seed: two different samples, both reproducible.
    let mut two = sampled(42);
    two["n"] = json!(2);
    let (_, d) = s.post("/v1/completions", two.clone()).await;
    let (_, e) = s.post("/v1/completions", two).await;
    assert_eq!(
        token_ids(&d["choices"][0]),
        a,
        "choice 0 uses the seed itself"
    );
    assert_ne!(token_ids(&d["choices"][1]), a);
    assert_eq!(d["choices"], e["choices"]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_queue_full_and_disconnects_free_everything() {
    let plan = smollm2_plan();
    let s = start(
        &plan,
        options(512, 1),
        ServerConfig {
            max_waiting: 1,
            ..ServerConfig::default()
        },
    )
    .await;
    let long = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 300, "temperature": 0, "ignore_eos": true, "stream": true});
    // A runs, B waits for A's slot; C finds the queue full.
    let a = s
        .client
        .post(s.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut a = SseReader::new(a);
    let first = a.next().await.expect("a first chunk");
    assert!(first.contains("\"text\""), "{first}");
    let b = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": user("hi"), "max_tokens": 300, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(b.status().as_u16(), 200);
    // The engine thread publishes its queue after each step.
    let start = Instant::now();
    while (s.server.stats().running, s.server.stats().waiting) != (1, 1) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            s.server.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, body) = s
        .post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_of(&body).0, "rate_limit_error");

    // Both clients go away: their requests are cancelled, and nothing stays allocated.
    let dropped = Instant::now();
    drop(a);
    drop(b);
    let stats = s.wait_idle(Duration::from_secs(10)).await;
    assert_eq!(
        (stats.running, stats.waiting, stats.kv_tokens_used),
        (0, 0, 0),
        "{stats:?}"
    );
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "cancellation took {:?}",
        dropped.elapsed()
    );
    let metrics = s.metrics().await;
    let model = format!("model_name=\"{}\"", s.server.model_name());
    assert!(
        metric(
            &metrics,
            &format!("fdrt:generation_tokens_total{{{model}}}")
        ) < 300.0,
        "A ran to the end"
    );
    // The aborts are recorded once the choice tasks notice.
    let start = Instant::now();
    while metric(
        &s.metrics().await,
        &format!("fdrt:request_success_total{{{model},finished_reason=\"abort\"}}"),
    ) < 2.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "aborts not counted:\n{}",
            s.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server still serves.
    let (status, _) = s
        .post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_drain_finishes_running_requests_and_refuses_new_ones() {
    let plan = smollm2_plan();
    let s = start(
        &plan,
        options(512, 2),
        ServerConfig {
            drain_timeout: Duration::from_secs(30),
            ..ServerConfig::default()
        },
    )
    .await;
    let body = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 20, "temperature": 0, "ignore_eos": true, "stream": true});
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    reader.next().await.expect("a first chunk");
    s.server.begin_drain();
    let (status, refused) = s
        .post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(s.get("/health").await.0, 503);
    let mut rest = vec![];
    while let Some(e) = reader.next().await {
        rest.push(e);
    }
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let finish = chunks(&rest).last().unwrap()["choices"][0]["finish_reason"].clone();
    assert_eq!(finish, "length", "the running request finished");
    s.shutdown().await;

    // With a short deadline, a long request is cut off with an error event.
    let config = ServerConfig {
        drain_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let mut s = start(&plan, options(512, 2), config).await;
    let mut long = body.clone();
    long["max_tokens"] = json!(400);
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    reader.next().await.expect("a first chunk");
    let stopped = Instant::now();
    let _ = s.stop.take().expect("not stopped yet").send(());
    let mut rest = vec![];
    while let Some(e) = reader.next().await {
        rest.push(e);
    }
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        stopped.elapsed()
    );
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert!(error_of(&error).2.contains("shut down"), "{error}");
    let server = s.server.clone();
    s.shutdown().await;
    let stats = server.stats();
    assert_eq!((stats.running, stats.kv_tokens_used), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_64_concurrent_streams_equal_single_requests() {
    let plan = smollm2_plan();
    let s = start(
        &plan,
        options(256, 16),
        ServerConfig {
            max_waiting: 64,
            ..ServerConfig::default()
        },
    )
    .await;
    let questions = [
        "What is the capital of France?",
        "Say hello.",
        "What is 2 + 2?",
        "Name a fruit.",
        "Who wrote Hamlet?",
        "What color is the sky?",
        "Give me a number.",
        "Translate 'cat' to French.",
    ];
    let requests: Vec<Value> = questions
        .iter()
        .map(|q| json!({"messages": user(q), "max_tokens": 10, "temperature": 0, "stream": true, "return_token_ids": true}))
        .collect();
    concurrent_streams_match_single_requests(&s, "/v1/chat/completions", requests).await;
    s.shutdown().await;
}

// ---- security review (docs/RELIABILITY.md lists what each test covers) ----

/// Sends `request` (raw HTTP/1.1) on a fresh connection and returns what came back before the
/// server closed it or a second passed: a status line, or nothing if the server hung up first.
async fn raw_exchange(base: &str, request: Vec<u8>) -> String {
    let address = base.trim_start_matches("http://").to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // The server may answer and close before taking everything: a failed write is fine.
        let _ = stream.write_all(&request);
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    })
    .await
    .expect("raw exchange")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_v1_need_the_key_and_keys_must_match_exactly() {
    let config = ServerConfig {
        api_key: Some("sekret-key".into()),
        ..ServerConfig::default()
    };
    let s = start(&tiny_plan(), options(64, 1), config).await;
    let status_of = |path: &'static str, auth: Option<&'static str>| {
        let mut request = s.client.get(s.url(path));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        async move { request.send().await.expect("request").status().as_u16() }
    };
    for path in ["/metrics", "/v1/models"] {
        for auth in [
            None,
            Some("Bearer "),
            Some("Bearer sekret"),
            Some("Bearer sekret-key2"),
            Some("Bearer sekret-kez"),
            Some("Bearer SEKRET-KEY"),
            Some("bearer sekret-key"),
            Some("sekret-key"),
        ] {
            assert_eq!(status_of(path, auth).await, 401, "{path} with {auth:?}");
        }
        assert_eq!(
            status_of(path, Some("Bearer sekret-key")).await,
            200,
            "{path}"
        );
    }
    let metrics = s
        .client
        .get(s.url("/metrics"))
        .bearer_auth("sekret-key")
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(metrics.contains("fdrt:num_requests_running"), "{metrics}");
    assert_eq!(status_of("/health", None).await, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_chunked_bodies_are_refused() {
    let config = ServerConfig {
        max_body_bytes: 4096,
        ..ServerConfig::default()
    };
    let s = start(&tiny_plan(), options(64, 1), config).await;
    // A megabyte of headers: the HTTP layer refuses it (431) or hangs up; never a 2xx.
    let mut request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 1 << 20));
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let reply = raw_exchange(&s.base, request).await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{}",
        &reply[..reply.len().min(200)]
    );
    // A chunked body (no Content-Length) past the limit: 413 with an OpenAI error body.
    let mut request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    let chunk = vec![b' '; 1024];
    for _ in 0..8 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let reply = raw_exchange(&s.base, request).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("\"error\""), "{reply}");
    // The server is still serving.
    assert_eq!(s.get("/health").await.0, 200);
    s.shutdown().await;
}

/// Connects to the test server and plays one stalling client: sends `head` a byte at a time with
/// `gap` between bytes (all at once when `gap` is zero), then waits for the server to hang up.
/// Returns how long after connecting the server hung up, or `None` if it had not within 10 s.
async fn stall(base: String, head: &'static [u8], gap: Duration) -> Option<Duration> {
    let address = base.trim_start_matches("http://").to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let connected = Instant::now();
        let mut stream = std::net::TcpStream::connect(&address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut writer = stream.try_clone().expect("a second handle");
        std::thread::spawn(move || {
            if gap.is_zero() {
                let _ = writer.write_all(head);
            } else {
                for byte in head {
                    // Fails once the server has hung up: the trickle is over then.
                    if writer.write_all(&[*byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(gap);
                }
            }
        });
        let mut reply = Vec::new();
        match stream.read_to_end(&mut reply) {
            // A reset is a hang-up too (the server closed with bytes of ours unread).
            Ok(_) => Some(connected.elapsed()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(connected.elapsed()),
            Err(_) => None,
        }
    })
    .await
    .expect("stalling client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stalling_in_their_request_head_are_dropped_while_others_are_served() {
    let header_read_timeout = Duration::from_millis(500);
    let config = ServerConfig {
        header_read_timeout,
        ..ServerConfig::default()
    };
    let s = start(&tiny_plan(), options(256, 1), config).await;
    let base = s.base.clone();
    // Half a request line; nothing at all; a whole head sent a byte every 100 ms (slowloris: it
    // would take about 5 s, so it is cut off partway even though bytes keep arriving).
    let stalled = [
        tokio::spawn(stall(base.clone(), b"GET /health HTT", Duration::ZERO)),
        tokio::spawn(stall(base.clone(), b"", Duration::ZERO)),
        tokio::spawn(stall(
            base,
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_millis(100),
        )),
    ];
    // Meanwhile others are served, each on a new connection (a kept-alive one would itself be
    // closed by the server between requests: the timeout covers waiting for the next head).
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("HTTP client");
    let (prompt, expected) = tiny_golden();
    for _ in 0..3 {
        let health = client.get(s.url("/health")).send().await.expect("health");
        assert_eq!(health.status().as_u16(), 200);
        let response = client
            .post(s.url("/v1/completions"))
            .json(&json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true}))
            .send()
            .await
            .expect("completion");
        let (status, body) = read_json_response(response).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(token_ids(&body["choices"][0]), expected[..4], "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (client_idx, client) in stalled.into_iter().enumerate() {
        let hung_up_after = client.await.expect("stalling client task");
        let hung_up_after = hung_up_after
            .unwrap_or_else(|| panic!("stalling client {client_idx} still connected after 10 s"));
        assert!(
            hung_up_after >= header_read_timeout,
            "client {client_idx} dropped after {hung_up_after:?}, before the timeout"
        );
    }
    assert_eq!(s.get("/health").await.0, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    use std::io::{Read, Write};
    // The default header timeout (30 s) is far longer than this test: only a client hanging up
    // frees a slot here.
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let s = start(&tiny_plan(), options(256, 1), config).await;
    let address = s.base.trim_start_matches("http://").to_string();
    let connect = || std::net::TcpStream::connect(&address).expect("connect");
    // Two silent connections take both slots (the kernel queues connections in order, so they
    // are accepted before any later one).
    let first = connect();
    let second = connect();
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut waiting = connect();
    waiting.write_all(request).expect("request");
    waiting
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let (mut waiting, early) = tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        let early = waiting.read(&mut byte);
        (waiting, early)
    })
    .await
    .expect("read");
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "served beyond the limit: {early:?}"
    );
    // A slot frees: the waiting connection is served, well before any header timeout.
    drop(first);
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let reply = tokio::task::spawn_blocking(move || {
        let mut reply = Vec::new();
        waiting.read_to_end(&mut reply).map(|_| reply)
    })
    .await
    .expect("read")
    .expect("served once a slot was free");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // With one slot left, eight requests at once are served one connection at a time, all of
    // them.
    let replies: Vec<_> = (0..8)
        .map(|_| {
            let base = s.base.clone();
            tokio::spawn(async move { raw_exchange(&base, request.to_vec()).await })
        })
        .collect();
    for reply in replies {
        let reply = reply.await.expect("client task");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
    drop(second);
    let (prompt, expected) = tiny_golden();
    let (status, body) = s
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(token_ids(&body["choices"][0]), expected[..4], "{body}");
    s.shutdown().await;
}

/// A client that sends its head promptly, then trickles its body (within the size limit), gets
/// 408 once the body deadline passes and is hung up on, while the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_past_the_deadline_gets_408() {
    let body_read_timeout = Duration::from_millis(500);
    let config = ServerConfig {
        body_read_timeout,
        ..ServerConfig::default()
    };
    let s = start(&tiny_plan(), options(256, 1), config).await;
    let address = s.base.trim_start_matches("http://").to_string();
    let (reply, waited) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let body = br#"{"prompt": [1, 2, 3], "max_tokens": 2}"#;
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = Instant::now();
        stream.write_all(head.as_bytes()).expect("head");
        let mut writer = stream.try_clone().expect("a second handle");
        // A byte every 100 ms: the body would take about 4 s.
        std::thread::spawn(move || {
            for byte in body {
                if writer.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        (String::from_utf8_lossy(&reply).into_owned(), sent.elapsed())
    })
    .await
    .expect("trickling client");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    assert!(waited >= body_read_timeout, "answered after {waited:?}");
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    // A prompt body is still read and served.
    let (status, body) = s
        .post(
            "/v1/completions",
            json!({"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    s.shutdown().await;
}
