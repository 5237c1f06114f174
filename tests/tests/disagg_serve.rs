//! Disaggregated serving end to end over loopback HTTP: `fdrt router` in front of prefill and
//! decode instances (`fdrt serve --role prefill|decode`), each instance on a tokio runtime of its
//! own, so that shutting that runtime down drops its listeners and connections at once, as a
//! killed process would. Answers through the router are token for token those of one mixed
//! instance (greedy and seeded, streamed and not), the moved KV blocks are used, and when an
//! instance dies every request still ends: completed elsewhere, or with a clear error.

mod common;

use common::http::*;
use common::*;
use runtime::disagg::Role;
use runtime::router::{Router, RouterConfig};
use runtime::server::disagg::DisaggConfig;
use runtime::server::{Server, ServerConfig};
use serde_json::{json, Value};
use std::time::Duration;

const BLOCK: usize = 16;

/// One instance (`fdrt serve`) on a runtime of its own.
struct Instance {
    runtime: Option<tokio::runtime::Runtime>,
    /// host:port of its HTTP server.
    http: String,
    /// host:port of its KV transfers (prefill instances).
    kv: Option<String>,
}

impl Instance {
    fn start(role: Role, kv_sources: Vec<String>) -> Instance {
        Instance::with(role, kv_sources, role == Role::Prefill, None)
    }

    /// An instance with a KV transfer port when `transfers` (so it may prefill for others),
    /// and an API key when given (so its admin endpoints exist).
    fn with(
        role: Role,
        kv_sources: Vec<String>,
        transfers: bool,
        api_key: Option<&str>,
    ) -> Instance {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let engine = tiny_llama_engine(BLOCK);
        let transfers = transfers.then(|| {
            runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .expect("bind")
        });
        let kv = transfers
            .as_ref()
            .map(|l| l.local_addr().expect("address").to_string());
        let config = ServerConfig {
            max_num_seqs: 4,
            api_key: api_key.map(str::to_string),
            disagg: DisaggConfig {
                role,
                kv_transfer_port: transfers
                    .as_ref()
                    .map(|l| l.local_addr().expect("address").port()),
                kv_sources,
                ..Default::default()
            },
            ..ServerConfig::default()
        };
        let server = Server::new(Box::new(engine), config).expect("server");
        if let Some(listener) = transfers {
            runtime.spawn(runtime::disagg::transfer::serve(
                listener,
                server.scheduler().clone(),
                server.instance_state(),
                Default::default(),
            ));
        }
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let http = listener.local_addr().expect("address").to_string();
        runtime.spawn(runtime::server::serve(
            listener,
            server,
            std::future::pending(),
        ));
        Instance {
            runtime: Some(runtime),
            http,
            kv,
        }
    }

    /// Drops its listeners, connections and requests at once.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    prefill: Vec<Instance>,
    decode: Vec<Instance>,
    router: String,
    router_runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

/// `fdrt router` on a loopback port of `rt`; its address.
fn start_router(rt: &tokio::runtime::Runtime, config: RouterConfig) -> String {
    let router = rt
        .block_on(Router::connect(config))
        .expect("the router connects");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    rt.spawn(runtime::router::serve(
        listener,
        router,
        std::future::pending(),
    ));
    address
}

fn cluster(prefill: usize, decode: usize, health_interval: Duration) -> Cluster {
    let prefill: Vec<Instance> = (0..prefill)
        .map(|_| Instance::start(Role::Prefill, vec![]))
        .collect();
    let sources: Vec<String> = prefill.iter().filter_map(|p| p.kv.clone()).collect();
    let decode: Vec<Instance> = (0..decode)
        .map(|_| Instance::start(Role::Decode, sources.clone()))
        .collect();
    let router_runtime = router_runtime();
    let config = RouterConfig {
        prefill: prefill.iter().map(|p| p.http.clone()).collect(),
        decode: decode.iter().map(|d| d.http.clone()).collect(),
        health_interval,
        upstream_timeout: Duration::from_secs(20),
        ..RouterConfig::default()
    };
    let address = start_router(&router_runtime, config);
    Cluster {
        prefill,
        decode,
        router: address,
        router_runtime,
        client: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
    }
}

impl Cluster {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.router_runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(120), f).await })
            .expect("no request may hang")
    }

    /// Sends `b` through the router and returns once the first prefill instance serves its
    /// transfer; the request's task.
    fn send_until_transferring(
        &self,
        b: &Value,
    ) -> tokio::task::JoinHandle<(u16, Vec<u32>, Value)> {
        let (client, router, b) = (self.client.clone(), self.router.clone(), b.clone());
        let request = self
            .router_runtime
            .spawn(async move { complete(&client, &router, &b).await });
        let p = &self.prefill[0].http;
        wait_for_metric(
            &self.router_runtime,
            &self.client,
            p,
            "fdrt:kv_transfers_active",
            1.0,
        );
        request
    }
}

/// The sample name of a router metric of one instance.
fn row(name: &str, role: &str, address: &str) -> String {
    format!("fdrt_router:{name}{{role=\"{role}\",address=\"{address}\"}}")
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (seed * 41 + i * 13) % 290)
        .collect()
}

fn body(prompt: &[u32], seed: Option<u64>, stream: bool) -> Value {
    let mut b = json!({"prompt": prompt, "max_tokens": 10, "ignore_eos": true, "stream": stream});
    match seed {
        Some(seed) => {
            b["temperature"] = json!(0.9);
            b["seed"] = json!(seed);
        }
        None => b["temperature"] = json!(0),
    }
    b
}

/// The answer's token ids (streamed or not) and its last event, from the server at `address`.
async fn complete(client: &reqwest::Client, address: &str, body: &Value) -> (u16, Vec<u32>, Value) {
    complete_with_key(client, address, body, None).await
}

/// [`complete`] with the API key `key`.
async fn complete_with_key(
    client: &reqwest::Client,
    address: &str,
    body: &Value,
    key: Option<&str>,
) -> (u16, Vec<u32>, Value) {
    let mut request = client
        .post(format!("http://{address}/v1/completions"))
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("request");
    if body["stream"] != json!(true) {
        let (status, v) = read_json_response(response).await;
        return (status, token_ids(&v["choices"][0]), v);
    }
    let status = response.status().as_u16();
    let (tokens, last) = stream_tokens(response).await;
    (status, tokens, last)
}

/// A streamed answer's token ids and its last chunk.
async fn stream_tokens(response: reqwest::Response) -> (Vec<u32>, Value) {
    let mut events = SseReader::new(response);
    let (mut tokens, mut last) = (vec![], Value::Null);
    while let Some(data) = events.next().await {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("a JSON chunk");
        if let Some(choice) = v["choices"].get(0) {
            tokens.extend(token_ids(choice));
        }
        last = v;
    }
    (tokens, last)
}

async fn metrics(client: &reqwest::Client, address: &str) -> String {
    client
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

#[test]
fn through_the_router_answers_are_a_mixed_instances_and_the_blocks_move() {
    let mixed = Instance::start(Role::Mixed, vec![]);
    let c = cluster(1, 1, Duration::from_secs(1));
    let cases: Vec<(Vec<u32>, Option<u64>, bool)> = vec![
        (prompt(1, 70), None, false),
        (prompt(2, 100), None, true),
        (prompt(3, 40), Some(7), false),
        (prompt(4, 33), Some(9), true),
        (prompt(5, 10), None, true), // shorter than a block: computed on the decode instance
    ];
    for (i, (p, seed, stream)) in cases.iter().enumerate() {
        let b = body(p, *seed, *stream);
        let (status, want, _) = c.block_on(complete(&c.client, &mixed.http, &b));
        assert_eq!(status, 200);
        let (status, got, last) = c.block_on(complete(&c.client, &c.router, &b));
        assert_eq!(status, 200, "case {i}: {last}");
        assert_eq!(got, want, "case {i}: through the router");
        assert_eq!(got.len(), 10);
    }
    let d = c.block_on(metrics(&c.client, &c.decode[0].http));
    // 70 -> 4 blocks, 100 -> 6, 40 -> 2, 33 -> 2 (the last prompt token stays on the decode side).
    assert_eq!(
        metric(&d, "fdrt:kv_transfer_received_blocks_total"),
        14.0,
        "{d}"
    );
    assert_eq!(metric(&d, "fdrt:kv_transfer_failures_total"), 0.0);
    assert!(metric(&d, "fdrt:prefix_cache_hits_total") >= 14.0 * BLOCK as f64);
    let r = c.block_on(metrics(&c.client, &c.router));
    assert!(
        r.contains("fdrt_router:instance_requests_total{role=\"decode\""),
        "{r}"
    );
    // The same prompt again: the decode instance holds its blocks, nothing moves.
    let b = body(&cases[0].0, None, false);
    c.block_on(complete(&c.client, &c.router, &b));
    let d = c.block_on(metrics(&c.client, &c.decode[0].http));
    assert_eq!(metric(&d, "fdrt:kv_transfer_received_blocks_total"), 14.0);
}

#[test]
fn two_of_each_give_a_mixed_instances_answers() {
    let mixed = Instance::start(Role::Mixed, vec![]);
    let c = cluster(2, 2, Duration::from_secs(1));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let b = body(
                &prompt(10 + i, 20 + 11 * i as usize),
                (i % 2 == 1).then_some(i as u64),
                i % 3 == 0,
            );
            let client = c.client.clone();
            let (router, mixed) = (c.router.clone(), mixed.http.clone());
            c.router_runtime.spawn(async move {
                let (_, want, _) = complete(&client, &mixed, &b).await;
                let (status, got, last) = complete(&client, &router, &b).await;
                (status, got, want, last)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, got, want, last) = c.block_on(h).expect("task");
        assert_eq!(status, 200, "request {i}: {last}");
        assert_eq!(got, want, "request {i}");
    }
    let (mut requests, mut moved) = (0.0, 0.0);
    let r = c.block_on(metrics(&c.client, &c.router));
    for d in &c.decode {
        requests += metric(&r, &row("instance_requests_total", "decode", &d.http));
        let m = c.block_on(metrics(&c.client, &d.http));
        moved += metric(&m, "fdrt:kv_transfer_received_blocks_total");
        assert_eq!(metric(&m, "fdrt:kv_transfer_failures_total"), 0.0);
    }
    assert_eq!(requests, 8.0);
    // Prompts of 20 + 11 i tokens: (len - 1) / 16 full blocks each moved.
    let want: usize = (0..8).map(|i| (20 + 11 * i - 1) / BLOCK).sum();
    assert_eq!(
        moved, want as f64,
        "every prompt's blocks came from a prefill instance"
    );
}

#[test]
fn a_dead_prefill_instance_leaves_the_decode_instance_computing_prompts() {
    let mixed = Instance::start(Role::Mixed, vec![]);
    let mut c = cluster(1, 1, Duration::from_secs(60)); // the router does not notice by itself
    c.prefill[0].kill();
    let b = body(&prompt(20, 90), None, false);
    let (_, want, _) = c.block_on(complete(&c.client, &mixed.http, &b));
    let (status, got, last) = c.block_on(complete(&c.client, &c.router, &b));
    assert_eq!(status, 200, "{last}");
    assert_eq!(got, want);
    let d = c.block_on(metrics(&c.client, &c.decode[0].http));
    assert_eq!(metric(&d, "fdrt:kv_transfer_received_blocks_total"), 0.0);
    // Either the decode instance tried the dead one, or the router's first health check (at
    // its start) had already taken it out of rotation.
    let r = c.block_on(metrics(&c.client, &c.router));
    let p = &c.prefill[0].http;
    let out_of_rotation = metric(&r, &row("instance_healthy", "prefill", p)) == 0.0;
    let tried = metric(&d, "fdrt:kv_transfer_failures_total") == 1.0;
    assert!(out_of_rotation || tried, "{d}\n{r}");
}

#[test]
fn a_dead_decode_instance_is_retried_elsewhere_or_ends_its_stream_with_an_error() {
    let mixed = Instance::start(Role::Mixed, vec![]);
    let mut c = cluster(1, 2, Duration::from_secs(60));
    // A long stream; kill whichever decode instance serves it after its first tokens.
    let mut long = body(&prompt(30, 50), None, true);
    long["max_tokens"] = json!(200);
    let response = c.block_on(
        c.client
            .post(format!("http://{}/v1/completions", c.router))
            .json(&long)
            .send(),
    );
    let response = response.expect("stream starts");
    assert_eq!(response.status().as_u16(), 200);
    let mut events = SseReader::new(response);
    let first = c.block_on(events.next()).expect("a first chunk");
    assert!(first.starts_with('{'), "{first}");
    let busy = c
        .decode
        .iter()
        .position(|d| {
            let r = c.block_on(metrics(&c.client, &c.router));
            metric(&r, &row("instance_outstanding_requests", "decode", &d.http)) == 1.0
        })
        .expect("one decode instance has the stream");
    c.decode[busy].kill();
    let mut rest = vec![];
    while let Some(data) = c.block_on(events.next()) {
        rest.push(data);
    }
    assert_eq!(
        rest.last().map(String::as_str),
        Some("[DONE]"),
        "the stream ends: {rest:?}"
    );
    let error = &rest[rest.len() - 2];
    assert!(
        error.contains("\"error\"") && error.contains("failed during the stream"),
        "{error}"
    );
    // The next requests go to the other instance, whether or not they would have preferred
    // the dead one, non-streamed and streamed; the router knows it is gone.
    for (i, stream) in [false, true, false].into_iter().enumerate() {
        let b = body(&prompt(40 + i as u32, 45), None, stream);
        let (_, want, _) = c.block_on(complete(&c.client, &mixed.http, &b));
        let (status, got, last) = c.block_on(complete(&c.client, &c.router, &b));
        assert_eq!(status, 200, "{last}");
        assert_eq!(got, want);
    }
    let r = c.block_on(metrics(&c.client, &c.router));
    let dead = &c.decode[busy].http;
    assert_eq!(metric(&r, &row("instance_healthy", "decode", dead)), 0.0);
    // With no decode instance left, a clear 503.
    let other = 1 - busy;
    c.decode[other].kill();
    let (status, _, v) = c.block_on(complete(
        &c.client,
        &c.router,
        &body(&prompt(50, 20), None, false),
    ));
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no decode instance")),
        "{v}"
    );
}

#[test]
fn a_decode_instance_takes_blocks_only_from_its_own_sources() {
    let mut d = Instance::start(Role::Decode, vec!["127.0.0.1:9".into()]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let b = body(&prompt(60, 40), None, false);
    let send = |source: &str| {
        rt.block_on(
            client
                .post(format!("http://{}/v1/completions", d.http))
                .header(runtime::server::disagg::KV_SOURCE_HEADER, source)
                .json(&b)
                .send(),
        )
        .expect("request")
    };
    let (status, v) = rt.block_on(read_json_response(send("10.1.2.3:5000")));
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--kv-source")),
        "{v}"
    );
    // Its own source, unreachable: the request is served all the same.
    let (status, v) = rt.block_on(read_json_response(send("127.0.0.1:9")));
    assert_eq!(status, 200, "{v}");
    assert_eq!(token_ids(&v["choices"][0]).len(), 10);
    let text = rt.block_on(metrics(&client, &d.http));
    assert_eq!(metric(&text, "fdrt:kv_transfer_failures_total"), 1.0);
    d.kill();
}

#[test]
fn an_instance_switches_roles_once_idle_and_the_router_follows() {
    const KEY: &str = "k";
    let mixed = Instance::start(Role::Mixed, vec![]);
    let (p, d1, d2) = switchable_trio(KEY);
    let rt = router_runtime();
    let router_address = start_router(&rt, trio_router(&p, &d1, &d2, KEY));
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let admin = |address: &str, body: Value, key: Option<&str>| {
        let mut request = client
            .post(format!("http://{address}/admin/v1/role"))
            .json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        rt.block_on(async { read_json_response(request.send().await.expect("request")).await })
    };
    // Refusals: no key, a role the instance cannot take, no such role.
    assert_eq!(admin(&p.http, json!({"role": "decode"}), None).0, 401);
    let (status, v) = admin(&p.http, json!({"role": "decode"}), Some(KEY));
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--kv-source")),
        "{v}"
    );
    assert_eq!(admin(&p.http, json!({"role": "chef"}), Some(KEY)).0, 400);
    // d1 moves to prefill; it is idle, so at once.
    let (status, v) = admin(&d1.http, json!({"role": "prefill"}), Some(KEY));
    assert_eq!(status, 200, "{v}");
    let describe = |address: &str| describe_instance(&rt, &client, address, KEY);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while describe(&d1.http)["role"] != "prefill" {
        assert!(std::time::Instant::now() < deadline, "d1 never switched");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The router follows: d1 is a prefill instance to it now.
    let as_prefill = row("instance_requests_total", "prefill", &d1.http);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = rt.block_on(async {
            client
                .get(format!("http://{router_address}/metrics"))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text")
        });
        if text.contains(&as_prefill) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the router did not follow:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Requests through the router: all to d2 now, and still a mixed instance's answers.
    for i in 0..4u32 {
        let b = body(&prompt(70 + i, 40 + 9 * i as usize), None, i % 2 == 0);
        let (_, want, _) = rt.block_on(complete(&client, &mixed.http, &b));
        let (status, got, _) =
            rt.block_on(complete_with_key(&client, &router_address, &b, Some(KEY)));
        assert_eq!(status, 200);
        assert_eq!(got, want, "request {i}");
    }
    let metrics_of = |address: &str| {
        rt.block_on(async {
            client
                .get(format!("http://{address}/metrics"))
                .bearer_auth(KEY)
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text")
        })
    };
    assert_eq!(
        metric(&metrics_of(&d1.http), "fdrt:role_switches_total"),
        1.0
    );
    let d2_metrics = metrics_of(&d2.http);
    assert!(
        metric(&d2_metrics, "fdrt:kv_transfer_received_blocks_total") > 0.0,
        "{d2_metrics}"
    );
    assert_eq!(metric(&d2_metrics, "fdrt:kv_transfer_failures_total"), 0.0);
}

/// A prefill instance and two decode instances, all with the API key `key`: d1 can also take
/// the prefill role (it has a transfer port), d2 takes blocks from both and cannot.
fn switchable_trio(key: &str) -> (Instance, Instance, Instance) {
    let p = Instance::with(Role::Prefill, vec![], true, Some(key));
    let d1 = Instance::with(
        Role::Decode,
        vec![p.kv.clone().expect("p's port")],
        true,
        Some(key),
    );
    let sources = vec![
        p.kv.clone().expect("p's port"),
        d1.kv.clone().expect("d1's port"),
    ];
    let d2 = Instance::with(Role::Decode, sources, false, Some(key));
    (p, d1, d2)
}

/// A router over [`switchable_trio`]'s instances, checking them every 50 ms.
fn trio_router(p: &Instance, d1: &Instance, d2: &Instance, key: &str) -> RouterConfig {
    RouterConfig {
        prefill: vec![p.http.clone()],
        decode: vec![d1.http.clone(), d2.http.clone()],
        api_key: Some(key.into()),
        health_interval: Duration::from_millis(50),
        upstream_timeout: Duration::from_secs(20),
        ..RouterConfig::default()
    }
}

fn router_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// What an instance says of itself (`GET /v1/kv_transfer`).
fn describe_instance(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    address: &str,
    key: &str,
) -> Value {
    rt.block_on(async {
        client
            .get(format!("http://{address}/v1/kv_transfer"))
            .bearer_auth(key)
            .send()
            .await
            .expect("describe")
            .json::<Value>()
            .await
            .expect("json")
    })
}

/// Keeps a prefill instance busy: `n` long requests straight to it, so that the prefill of a
/// transfer waits in its queue. Returns their tasks.
fn keep_busy(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    address: &str,
    n: u32,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let b = json!({"prompt": prompt(200 + i, 16), "max_tokens": 230, "temperature": 0, "ignore_eos": true});
            let (client, url) = (client.clone(), format!("http://{address}/v1/completions"));
            rt.spawn(async move {
                let _ = client.post(url).json(&b).send().await;
            })
        })
        .collect()
}

/// Waits until the server at `address` reports `name` at `at_least`.
fn wait_for_metric(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    address: &str,
    name: &str,
    at_least: f64,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = rt.block_on(metrics(client, address));
        if metric(&text, name) >= at_least {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never reached {at_least}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn instances_killed_during_a_transfer_lose_no_request() {
    let mixed = Instance::start(Role::Mixed, vec![]);
    let mut c = cluster(1, 2, Duration::from_secs(60));
    let b = body(&prompt(90, 120), None, false);
    let (_, want, _) = c.block_on(complete(&c.client, &mixed.http, &b));
    // The decode instance that has the request dies while the prefill instance, busy with
    // others, has its transfer queued: the router sends the request to the other one.
    let busy = keep_busy(&c.router_runtime, &c.client, &c.prefill[0].http, 40);
    let request = c.send_until_transferring(&b);
    let r = c.block_on(metrics(&c.client, &c.router));
    let first = (0..2)
        .find(|&i| {
            metric(
                &r,
                &row("instance_outstanding_requests", "decode", &c.decode[i].http),
            ) == 1.0
        })
        .expect("a decode instance has the request");
    c.decode[first].kill();
    let (status, got, last) = c.block_on(request).expect("task");
    assert_eq!(status, 200, "{last}");
    assert_eq!(got, want, "completed by the other decode instance");
    for task in busy {
        task.abort();
    }
    // The prefill instance dies while the survivor's transfer waits in its queue: the decode
    // instance computes the prompt itself.
    let survivor = 1 - first;
    let busy = keep_busy(&c.router_runtime, &c.client, &c.prefill[0].http, 40);
    let b = body(&prompt(91, 120), None, true);
    let (_, want, _) = c.block_on(complete(&c.client, &mixed.http, &b));
    let failures_before = metric(
        &c.block_on(metrics(&c.client, &c.decode[survivor].http)),
        "fdrt:kv_transfer_failures_total",
    );
    let request = c.send_until_transferring(&b);
    c.prefill[0].kill();
    let (status, got, last) = c.block_on(request).expect("task");
    assert_eq!(status, 200, "{last}");
    assert_eq!(got, want, "computed by the decode instance itself");
    let d = c.block_on(metrics(&c.client, &c.decode[survivor].http));
    assert_eq!(
        metric(&d, "fdrt:kv_transfer_failures_total"),
        failures_before + 1.0,
        "{d}"
    );
    for task in busy {
        task.abort();
    }
}

#[test]
fn the_router_refuses_a_decode_instance_that_would_not_take_the_prefill_instances_blocks() {
    let p = Instance::start(Role::Prefill, vec![]);
    // Its only source is some other address.
    let d = Instance::start(Role::Decode, vec!["127.0.0.1:9".into()]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let config = RouterConfig {
        prefill: vec![p.http.clone()],
        decode: vec![d.http.clone()],
        startup_timeout: Duration::from_secs(10),
        ..RouterConfig::default()
    };
    let Err(err) = rt.block_on(Router::connect(config)) else {
        panic!("the router started");
    };
    let message = err.to_string();
    let kv = p.kv.clone().expect("p's port");
    assert!(
        message.contains(&d.http) && message.contains(&format!("--kv-source {kv}")),
        "{message}"
    );
}

#[test]
fn a_missed_first_token_target_moves_a_decode_instance_to_prefill() {
    const KEY: &str = "k";
    let (p, d1, d2) = switchable_trio(KEY);
    let rt = router_runtime();
    // Idle, even queues: only the target rule can move anything, and every first token misses
    // a target of a nanosecond.
    let config = RouterConfig {
        auto_roles: true,
        role_cooldown: Duration::ZERO,
        targets: runtime::router::Targets {
            ttft: Some(Duration::from_nanos(1)),
            tpot: None,
        },
        ..trio_router(&p, &d1, &d2, KEY)
    };
    let router_address = start_router(&rt, config);
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let router_metrics = || rt.block_on(metrics(&client, &router_address));
    assert!(
        !router_metrics().contains("fdrt_router:time_to_first_token_seconds_mean"),
        "no mean before enough answers"
    );
    let streams = |first: u32| {
        for i in first..first + 8 {
            let b = body(&prompt(300 + i, 20 + 3 * i as usize), None, true);
            let (status, got, _) =
                rt.block_on(complete_with_key(&client, &router_address, &b, Some(KEY)));
            assert_eq!(status, 200);
            assert!(!got.is_empty());
        }
    };
    streams(0);
    let role = |address: &str| describe_instance(&rt, &client, address, KEY)["role"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while role(&d1.http) != "prefill" {
        assert!(
            std::time::Instant::now() < deadline,
            "d1 was never moved to prefill:\n{}",
            router_metrics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        metric(&router_metrics(), "fdrt_router:role_switches_total"),
        1.0
    );
    // The switch cleared the window; new answers fill it again, and still miss the target,
    // but the last decode instance stays one.
    streams(8);
    // The router times a stream when it forwards its `[DONE]`, before the client reads it (the
    // client here closes the connection there, without reading the body's end): the eighth
    // answer's sample is in already.
    let means = [
        "fdrt_router:time_to_first_token_seconds_mean",
        "fdrt_router:time_per_output_token_seconds_mean",
    ];
    let text = router_metrics();
    for name in means {
        assert!(
            text.contains(name),
            "no {name} after 8 more answers:\n{text}"
        );
    }
    for name in means {
        assert!(metric(&text, name) > 0.0, "{text}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(role(&d2.http), "decode");
    assert_eq!(
        metric(&router_metrics(), "fdrt_router:role_switches_total"),
        1.0
    );
}
