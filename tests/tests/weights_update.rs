//! Live weight updates end to end: a server on the tiny Llama (checkpoint X) switches to a
//! snapshot of a perturbed copy X' (same structure, other values) while streams are running.
//! The streams keep their tokens coming through the switch; afterwards the server's greedy
//! output equals a fresh server started on a plan of X'; an update that fails (a snapshot of
//! another structure, a missing directory) returns the error and leaves the weights serving.
//! Admin endpoints need the server's API key.

mod common;

use artifacts::parts::SnapshotTag;
use common::synthetic::perturbed_copy;
use common::*;
use compiler::{CompileOptions, WeightOutput};
use ir::{DType, Target};
use runtime::server::admin::{request_update, UPDATE_WEIGHTS_PATH};
use runtime::server::{Server, ServerConfig};
use runtime::weights_update::UpdateWeightsRequest;
use runtime::EngineOptions;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "admin-secret";
const STREAMS: usize = 4;
const STREAM_TOKENS: usize = 480;

struct Running {
    address: String,
    server: Server,
    client: reqwest::Client,
}

impl Running {
    async fn start(plan: &Path, api_key: Option<&str>) -> Running {
        let engine = engine_with(
            plan,
            EngineOptions {
                max_context: 512,
                max_batch_tokens: 64,
                max_num_seqs: STREAMS + 1,
                ..EngineOptions::default()
            },
        );
        let config = ServerConfig {
            api_key: api_key.map(str::to_string),
            max_num_seqs: STREAMS + 1,
            ..ServerConfig::default()
        };
        let server = Server::new(Box::new(engine), config).expect("server starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // The server runs until the test process ends.
        tokio::spawn(runtime::server::serve(
            listener,
            server.clone(),
            std::future::pending(),
        ));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Running {
            address,
            server,
            client,
        }
    }

    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("http://{}{path}", self.address))
            .json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status {status}: not JSON ({e}): {text}"));
        (status, value)
    }

    /// The greedy continuation of `prompt`, as token ids.
    async fn greedy(&self, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
        let (status, body) = self
            .post(
                "/v1/completions",
                Some(KEY),
                json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        ids(&body["choices"][0]["token_ids"])
    }

    /// The log-probability of the first greedy token after `prompt`: any difference in the KV
    /// it was computed from shows here, even where the choice of token does not change.
    async fn first_logprob(&self, prompt: &[u32]) -> f64 {
        let (status, body) = self
            .post(
                "/v1/completions",
                Some(KEY),
                json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 0}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["choices"][0]["logprobs"]["token_logprobs"][0]
            .as_f64()
            .unwrap_or_else(|| panic!("no logprob in {body}"))
    }
}

/// Streams a completion, counting its token chunks in `seen`; returns the token count and the
/// finish reason.
async fn stream(running: &Running, prompt: Vec<u32>, seen: Arc<AtomicUsize>) -> (usize, String) {
    let mut response = running
        .client
        .post(format!("http://{}/v1/completions", running.address))
        .bearer_auth(KEY)
        .json(
            &json!({"prompt": prompt, "max_tokens": STREAM_TOKENS, "temperature": 0,
                      "ignore_eos": true, "stream": true, "return_token_ids": true}),
        )
        .send()
        .await
        .expect("stream request");
    assert_eq!(response.status().as_u16(), 200);
    let (mut buffer, mut tokens, mut finish) = (String::new(), 0, String::new());
    while let Some(bytes) = response.chunk().await.expect("stream chunk") {
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).expect("chunk is JSON");
            assert!(chunk.get("error").is_none(), "stream failed: {chunk}");
            let choice = &chunk["choices"][0];
            let n = choice["token_ids"].as_array().map_or(0, Vec::len);
            tokens += n;
            seen.fetch_add(n, Ordering::SeqCst);
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = reason.to_string();
            }
        }
    }
    (tokens, finish)
}

fn snapshot(model: &Path, dir: &str, tag: &SnapshotTag) -> PathBuf {
    let dir = scratch_path(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let options = CompileOptions {
        target: Target::parse("cpu").expect("cpu"),
        weight_dtype: DType::F32,
        progress: false,
        quant: Default::default(),
    };
    let weights = WeightOutput::Snapshot {
        part_size: 64 << 10,
        tag: tag.clone(),
    };
    compiler::compile_to(model, &dir.join("llama.fdp"), &options, &weights)
        .unwrap_or_else(|e| panic!("snapshot of {}: {e}", model.display()));
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_update_switches_under_load_and_a_failed_one_changes_nothing() {
    let x = golden("tiny/llama");
    let x2 = scratch_path("llama-perturbed");
    perturbed_copy(&x, &x2, 0.9, 0.01);
    let tag = SnapshotTag {
        id: "step-1".into(),
        rank: 0,
    };
    let good = snapshot(&x2, "snapshot-x2", &tag);
    let other_structure = snapshot(&golden("tiny/qwen2"), "snapshot-qwen2", &tag);

    let a = Running::start(&compiled(&x, DType::F32), Some(KEY)).await;
    let fresh = Running::start(&compiled(&x2, DType::F32), Some(KEY)).await;
    let prompt = ids(&read_json(&golden("tiny/llama/golden.json"))["prompt_ids"]);
    let before = a.greedy(&prompt, 24).await;
    let want = fresh.greedy(&prompt, 24).await;
    // A prompt of more than two KV blocks (64 positions each), served once before the switch so
    // that its blocks sit in the prefix cache, computed with the old weights.
    let long: Vec<u32> = prompt.iter().copied().cycle().take(150).collect();
    let long_before = a.first_logprob(&long).await;
    let long_want = fresh.first_logprob(&long).await;
    assert_ne!(
        before, want,
        "the perturbation must change the greedy output"
    );

    // Streams run on the old weights; the update lands in the middle of them.
    let seen: Vec<Arc<AtomicUsize>> = (0..STREAMS).map(|_| Arc::default()).collect();
    let a = Arc::new(a);
    let tasks: Vec<_> = seen
        .iter()
        .map(|seen| {
            let (a, prompt, seen) = (a.clone(), prompt.clone(), seen.clone());
            tokio::spawn(async move { stream(&a, prompt, seen).await })
        })
        .collect();
    while seen.iter().any(|s| s.load(Ordering::SeqCst) < 8) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let request = UpdateWeightsRequest {
        dir: good.clone(),
        snapshot_id: tag.id.clone(),
        rank: 0,
    };
    let report = request_update(&a.address, Some(KEY), &request)
        .await
        .expect("the update succeeds");
    let at_switch: Vec<usize> = seen.iter().map(|s| s.load(Ordering::SeqCst)).collect();
    println!("switched: {report:?}; stream tokens at the switch: {at_switch:?} of {STREAM_TOKENS}");
    assert!(report.parts >= 3, "{report:?}");
    for task in tasks {
        let (tokens, finish) = task.await.unwrap();
        assert_eq!((tokens, finish.as_str()), (STREAM_TOKENS, "length"));
    }
    assert!(
        at_switch.iter().all(|&n| n < STREAM_TOKENS),
        "every stream was still running at the switch: {at_switch:?} of {STREAM_TOKENS}"
    );
    assert_eq!(
        a.greedy(&prompt, 24).await,
        want,
        "after the switch the server computes what a fresh server on the new weights does"
    );
    assert_ne!(long_before, long_want);
    assert_eq!(
        a.first_logprob(&long).await,
        long_want,
        "the prefix cache still served blocks computed with the old weights"
    );

    // Failed updates return the error and leave the new weights serving.
    let failures = [
        (other_structure.clone(), "step-1", "structure"),
        (scratch_path("no-such-dir"), "step-1", "cannot list"),
        (good.clone(), "step-2", "exactly one plan"),
        (good.clone(), "../x", "snapshot id"),
    ];
    for (dir, id, needle) in failures {
        let (status, body) = a
            .post(
                UPDATE_WEIGHTS_PATH,
                Some(KEY),
                json!({"dir": dir, "snapshot_id": id, "rank": 0}),
            )
            .await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "weight_update_failed", "{body}");
        assert!(
            message.contains(needle) && message.contains("unchanged"),
            "{needle}: {message}"
        );
        assert_eq!(a.greedy(&prompt, 24).await, want, "after a failed update");
    }
    // The engine thread publishes its statistics after the step that finished the last
    // request, so wait for it rather than read them at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.server.stats().running != 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.server.stats().running, 0, "nothing is left running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_the_servers_key() {
    let body = json!({"dir": "/", "snapshot_id": "1", "rank": 0});
    let plan = compiled(&golden("tiny/llama"), DType::F32);
    let keyless = Running::start(&plan, None).await;
    let (status, reply) = keyless.post(UPDATE_WEIGHTS_PATH, None, body.clone()).await;
    assert_eq!(status, 403, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--api-key"),
        "{reply}"
    );
    let keyed = Running::start(&plan, Some(KEY)).await;
    for key in [None, Some("wrong")] {
        let (status, reply) = keyed.post(UPDATE_WEIGHTS_PATH, key, body.clone()).await;
        assert_eq!(status, 401, "{key:?}: {reply}");
    }
    let (status, reply) = keyed
        .post(
            UPDATE_WEIGHTS_PATH,
            Some(KEY),
            json!({"dir": "/", "snapshot_id": "1", "path": 1}),
        )
        .await;
    assert_eq!(status, 400, "unknown fields are refused: {reply}");
}
