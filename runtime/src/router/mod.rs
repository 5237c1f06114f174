//! `fdrt router`: the OpenAI-compatible front door of disaggregated serving. Each generation
//! request goes to a decode instance (`fdrt serve --role decode`), which streams the answer
//! back through the router, with a header naming the prefill instance (`--role prefill`) whose
//! KV transfer port it takes the prompt's blocks from (`crate::disagg` says how).
//!
//! Placement: among the healthy instances of a role, the one that a hash of the request's
//! leading text prefers (rendezvous hashing, so requests sharing a prefix meet the same prefix
//! caches while the set of instances stays the same), unless it has more requests outstanding
//! than the least busy one plus [`LOAD_SLACK`], in which case the least busy one.
//!
//! Failures: instances are checked on `/health` every `health_interval`; one that fails is out
//! of rotation until it answers again. A decode instance that cannot be reached, or that fails
//! before its answer is complete, is marked unhealthy and the request goes to the next one (a
//! streamed answer can be retried only until its first bytes have gone to the client; after
//! that the stream ends with an error event). With no prefill instance healthy, decode instances
//! compute prompts themselves; with no decode instance healthy, requests get 503. Every wait on
//! an instance is bounded by `upstream_timeout`.

mod policy;

pub use policy::Targets;
use policy::{pick_switch, LatencyWindow, Load, Part};

use crate::server::admin::ROLE_PATH;
use crate::server::disagg::KV_SOURCE_HEADER;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests outstanding beyond the least busy instance that the preferred one may have and
/// still be chosen: prefix affinity is worth a little queueing, not a lot.
pub const LOAD_SLACK: usize = 4;

#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// `host:port` of each prefill instance's HTTP server.
    pub prefill: Vec<String>,
    /// `host:port` of each decode instance's HTTP server.
    pub decode: Vec<String>,
    /// Sent to the instances as `Authorization: Bearer` for the router's own calls (health,
    /// description); clients' own Authorization headers are passed through.
    pub api_key: Option<String>,
    pub health_interval: Duration,
    /// How long to wait at start for every instance to describe itself.
    pub startup_timeout: Duration,
    /// How long any one wait on an instance may take: connecting, its response head, each
    /// piece of a streamed body.
    pub upstream_timeout: Duration,
    pub max_body_bytes: usize,
    /// Switch instances between prefill and decode as their queues call for
    /// ([`Router::check_health`] says when).
    pub auto_roles: bool,
    /// The least time between two switches the router asks for.
    pub role_cooldown: Duration,
    /// Latency targets the role policy moves instances for (`policy` says how).
    pub targets: Targets,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            prefill: vec![],
            decode: vec![],
            api_key: None,
            health_interval: Duration::from_secs(1),
            startup_timeout: Duration::from_secs(120),
            upstream_timeout: Duration::from_secs(300),
            max_body_bytes: 4 << 20,
            auto_roles: false,
            role_cooldown: Duration::from_secs(30),
            targets: Targets::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("the router needs at least one --decode instance")]
    NoDecode,
    #[error("instance {address}: {message}")]
    Instance { address: String, message: String },
    #[error("the instances run different plans or block sizes: {0}")]
    Mismatch(String),
}

#[derive(Debug)]
struct Instance {
    address: String,
    /// What it last said of itself (`GET /v1/kv_transfer`).
    view: Mutex<View>,
    healthy: AtomicBool,
    outstanding: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
}

/// An instance's role and load as it last described them.
#[derive(Clone, Debug, Default)]
struct View {
    role: String,
    /// A role switch is under way: no new work until it is done.
    switching: bool,
    /// Its KV transfer address, as decode instances reach it (prefill instances).
    kv_address: Option<String>,
    can_prefill: bool,
    can_decode: bool,
    /// The prefill instances' transfer addresses it takes blocks from (`--kv-source`).
    kv_sources: Vec<String>,
    /// Its scheduler's running and waiting requests.
    queue: u64,
}

impl Instance {
    fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Its scheduler's running and waiting requests, as it last said (without cloning the
    /// whole view: placement reads it for every comparison).
    fn queue(&self) -> u64 {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).queue
    }

    fn serves(&self, part: Part) -> bool {
        let v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        !v.switching
            && match part {
                Part::Prefill => v.role == "prefill",
                Part::Decode => v.role == "decode" || v.role == "mixed",
            }
    }
}

/// Holds one request against an instance's outstanding count.
struct Outstanding(Arc<Instance>);

impl Outstanding {
    fn new(instance: &Arc<Instance>) -> Self {
        instance.outstanding.fetch_add(1, Ordering::SeqCst);
        instance.requests.fetch_add(1, Ordering::Relaxed);
        Outstanding(instance.clone())
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Router {
    instances: Vec<Arc<Instance>>,
    config: RouterConfig,
    plan: String,
    /// Role switches the router asked for, and when it last did.
    switches: AtomicU64,
    last_switch: Mutex<Option<Instant>>,
    /// Streamed answers' first-token and per-token times, for the target rule and `/metrics`.
    latencies: Mutex<LatencyWindow>,
}

/// What `GET /v1/kv_transfer` of an instance says.
struct Description {
    view: View,
    plan: String,
    block_size: u64,
}

impl Router {
    /// Asks every instance what it is (retrying until `startup_timeout`, so instances may
    /// still be loading), and checks that they fit together: `--prefill` instances have the
    /// prefill role, `--decode` ones the decode (or mixed) role, all run the same plan with the
    /// same block size. Roles may change later (`POST /admin/v1/role` on an instance, or
    /// `auto_roles`): the health checks follow them.
    pub async fn connect(config: RouterConfig) -> Result<Arc<Router>, RouterError> {
        if config.decode.is_empty() {
            return Err(RouterError::NoDecode);
        }
        let deadline = Instant::now() + config.startup_timeout;
        let mut plans = vec![];
        let mut instances = vec![];
        for (address, want) in config
            .prefill
            .iter()
            .map(|a| (a, Part::Prefill))
            .chain(config.decode.iter().map(|a| (a, Part::Decode)))
        {
            let d = loop {
                match describe(address, config.api_key.as_deref(), config.upstream_timeout).await {
                    Ok(d) => break d,
                    Err(message) if Instant::now() >= deadline => {
                        return Err(RouterError::Instance {
                            address: address.clone(),
                            message,
                        })
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            let instance = Arc::new(Instance {
                address: address.clone(),
                view: Mutex::new(d.view.clone()),
                healthy: AtomicBool::new(true),
                outstanding: AtomicUsize::new(0),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            });
            if !instance.serves(want) {
                let flag = if want == Part::Prefill {
                    "prefill"
                } else {
                    "decode"
                };
                return Err(RouterError::Instance {
                    address: address.clone(),
                    message: format!(
                        "it runs --role {}, where --{flag} needs --role {flag}",
                        d.view.role
                    ),
                });
            }
            plans.push((address.clone(), d.plan, d.block_size));
            instances.push(instance);
        }
        // Every decode instance must take blocks from every prefill instance, by the address
        // the router will name (the prefill instance's host as given here, its transfer port).
        for p in instances.iter().filter(|i| i.serves(Part::Prefill)) {
            let Some(kv) = p.view().kv_address else {
                continue;
            };
            for d in instances.iter().filter(|i| i.view().role == "decode") {
                let sources = d.view().kv_sources;
                if !sources.contains(&kv) {
                    return Err(RouterError::Mismatch(format!(
                        "decode instance {} does not take KV blocks from {kv}, the prefill instance {} (its --kv-source list: {}); give it --kv-source {kv}, or name the prefill instance by the host its --kv-source uses",
                        d.address,
                        p.address,
                        if sources.is_empty() { "empty".to_string() } else { sources.join(", ") }
                    )));
                }
            }
        }
        let (_, plan, block_size) = plans[0].clone();
        if let Some((address, other_plan, other_block)) = plans
            .iter()
            .find(|(_, p, b)| *p != plan || *b != block_size)
        {
            return Err(RouterError::Mismatch(format!(
                "{} runs plan {plan} with blocks of {block_size}, {address} plan {other_plan} with blocks of {other_block}",
                plans[0].0
            )));
        }
        Ok(Arc::new(Router {
            instances,
            config,
            plan,
            switches: AtomicU64::new(0),
            last_switch: Mutex::new(None),
            latencies: Mutex::new(LatencyWindow::default()),
        }))
    }

    /// The plan every instance runs (its identity, hex).
    pub fn plan(&self) -> &str {
        &self.plan
    }

    fn serving(&self, part: Part) -> Vec<Arc<Instance>> {
        self.instances
            .iter()
            .filter(|i| i.serves(part))
            .cloned()
            .collect()
    }

    fn latencies(&self) -> std::sync::MutexGuard<'_, LatencyWindow> {
        self.latencies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The router's HTTP routes.
    pub fn app(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/v1/chat/completions", post(forward))
            .route("/v1/completions", post(forward))
            .route("/v1/models", get(forward))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(|| async {
                error(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint")
            })
            .layer(axum::extract::DefaultBodyLimit::max(
                self.config.max_body_bytes,
            ))
            .with_state(self.clone())
    }

    /// Every `health_interval`, forever: what each instance says of itself (its role may have
    /// changed; an instance that does not answer is out of rotation), then the role policy
    /// when `auto_roles` is on.
    pub async fn check_health(self: Arc<Self>) {
        loop {
            let wait = self.config.health_interval.max(Duration::from_millis(500));
            let checks = self.instances.iter().map(|i| {
                let (i, key) = (i.clone(), self.config.api_key.clone());
                let plan = self.plan.clone();
                async move {
                    let ok = match describe(&i.address, key.as_deref(), wait).await {
                        Ok(d) if d.plan == plan => {
                            *i.view.lock().unwrap_or_else(|e| e.into_inner()) = d.view;
                            true
                        }
                        Ok(d) => {
                            tracing::warn!(address = %i.address, plan = %d.plan, "the instance now runs another plan");
                            false
                        }
                        Err(_) => false,
                    };
                    if i.healthy.swap(ok, Ordering::SeqCst) != ok {
                        tracing::warn!(address = %i.address, healthy = ok, "instance health changed");
                    }
                }
            });
            futures_util::future::join_all(checks).await;
            if self.config.auto_roles {
                self.balance_roles().await;
            }
            tokio::time::sleep(self.config.health_interval).await;
        }
    }

    /// The role policy (`policy` says how): at most one switch per `role_cooldown`; the
    /// instance asked switches once its work in flight drains.
    async fn balance_roles(&self) {
        {
            let last = self.last_switch.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.config.role_cooldown) {
                return;
            }
        }
        let healthy = |part| -> Vec<Arc<Instance>> {
            self.serving(part)
                .into_iter()
                .filter(|i| i.healthy.load(Ordering::SeqCst))
                .collect()
        };
        let (prefill, decode) = (healthy(Part::Prefill), healthy(Part::Decode));
        let load = |set: &[Arc<Instance>], to: Part| -> Vec<Load> {
            set.iter()
                .map(|i| {
                    let v = i.view();
                    Load {
                        queue: v.queue,
                        can_switch: v.role != "mixed"
                            && if to == Part::Prefill {
                                v.can_prefill
                            } else {
                                v.can_decode
                            },
                    }
                })
                .collect()
        };
        let observed = self.latencies().observed(Instant::now());
        let Some((to, index)) = pick_switch(
            &load(&prefill, Part::Decode),
            &load(&decode, Part::Prefill),
            self.config.targets,
            observed,
        ) else {
            return;
        };
        let mover = if to == Part::Prefill {
            &decode[index]
        } else {
            &prefill[index]
        };
        let mean = |set: &[Arc<Instance>]| {
            set.iter().map(|i| i.queue() as f64).sum::<f64>() / set.len().max(1) as f64
        };
        let (p, d) = (mean(&prefill), mean(&decode));
        let role = if to == Part::Prefill {
            "prefill"
        } else {
            "decode"
        };
        let body = Bytes::from(json!({ "role": role }).to_string());
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let wait = self.config.health_interval.max(Duration::from_millis(500));
        let key = self.config.api_key.as_deref();
        let asked = Instant::now();
        match call(
            &mover.address,
            key,
            Method::POST,
            ROLE_PATH,
            headers,
            body,
            wait,
        )
        .await
        {
            Ok((200, _, _)) => {
                tracing::info!(
                    address = %mover.address, role, prefill_queue = p, decode_queue = d,
                    ttft_ms = observed.ttft.map(|t| t.as_secs_f64() * 1e3),
                    tpot_ms = observed.tpot.map(|t| t.as_secs_f64() * 1e3),
                    "asked an instance to switch roles"
                );
                mover
                    .view
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .switching = true;
                self.switches.fetch_add(1, Ordering::Relaxed);
                *self.last_switch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                // The next decision reads answers given after this switch, not before it.
                self.latencies().forget_before(asked);
            }
            Ok((status, _, _)) => {
                tracing::warn!(address = %mover.address, status, "a role switch was refused")
            }
            Err(e) => tracing::warn!(address = %mover.address, error = %e, "a role switch failed"),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes (health checks included), with
/// the connection limits of `fdrt serve` (at most 512 connections, 30 s for a request head,
/// 60 s for a write that makes no progress).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Arc<Router>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let health = tokio::spawn(router.clone().check_health());
    let defaults = crate::server::ServerConfig::default();
    let limits = crate::server::connections::ConnectionLimits {
        max_connections: defaults.max_connections,
        header_read_timeout: defaults.header_read_timeout,
        write_timeout: defaults.write_timeout,
    };
    crate::server::connections::serve_connections(listener, router.app(), limits, shutdown).await;
    health.abort();
    Ok(())
}

fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

async fn describe(address: &str, key: Option<&str>, wait: Duration) -> Result<Description, String> {
    let (status, _, body) = call(
        address,
        key,
        Method::GET,
        "/v1/kv_transfer",
        HeaderMap::new(),
        Bytes::new(),
        wait,
    )
    .await
    .map_err(|e| e.to_string())?;
    let body = collect(body, wait).await?;
    if status != 200 {
        return Err(format!(
            "GET /v1/kv_transfer answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| format!("GET /v1/kv_transfer: {e}"))?;
    let port = v["kv_transfer_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok());
    let role = v["role"].as_str().unwrap_or_default().to_string();
    Ok(Description {
        view: View {
            kv_address: port
                .filter(|_| role == "prefill")
                .map(|port| format!("{}:{port}", host_of(address))),
            role,
            switching: !v["switching_to"].is_null(),
            can_prefill: v["can_prefill"].as_bool().unwrap_or(false),
            can_decode: v["can_decode"].as_bool().unwrap_or(false),
            kv_sources: v["kv_sources"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            queue: v["running"].as_u64().unwrap_or(0) + v["waiting"].as_u64().unwrap_or(0),
        },
        plan: v["plan"].as_str().unwrap_or_default().to_string(),
        block_size: v["block_size"].as_u64().unwrap_or_default(),
    })
}

/// Why a call to an instance gave no response head.
#[derive(Debug)]
enum CallError {
    /// It did not answer in time (it may still be working).
    Timeout(Duration),
    /// No connection, or it broke before the head.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout(waited) => write!(f, "no answer within {waited:?}"),
            CallError::Failed(why) => f.write_str(why),
        }
    }
}

/// One HTTP/1 request to an instance; the response's status, headers and body.
async fn call(
    address: &str,
    key: Option<&str>,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
    wait: Duration,
) -> Result<(u16, HeaderMap, hyper::body::Incoming), CallError> {
    let send = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        stream.set_nodelay(true).ok();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder().method(method).uri(path);
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        request = request.header(header::HOST, address);
        if let (Some(key), false) = (key, headers.contains_key(header::AUTHORIZATION)) {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        Ok((parts.status.as_u16(), parts.headers, body))
    };
    tokio::time::timeout(wait, send)
        .await
        .map_err(|_| CallError::Timeout(wait))?
        .map_err(CallError::Failed)
}

async fn collect(body: hyper::body::Incoming, wait: Duration) -> Result<Vec<u8>, String> {
    tokio::time::timeout(wait, body.collect())
        .await
        .map_err(|_| format!("the body did not arrive within {wait:?}"))?
        .map(|b| b.to_bytes().to_vec())
        .map_err(|e| e.to_string())
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

/// The text a request's placement hashes: its prompt's (or first messages') leading characters.
fn affinity_key(body: &[u8]) -> Vec<u8> {
    const LEADING: usize = 512;
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return vec![];
    };
    let text = if let Some(messages) = v.get("messages") {
        messages.to_string()
    } else {
        v.get("prompt").map(Value::to_string).unwrap_or_default()
    };
    text.bytes().take(LEADING).collect()
}

/// Healthy instances in the order to try them: the one the key prefers first unless it is
/// more than [`LOAD_SLACK`] busier than the least busy, then by load.
fn order(instances: &[Arc<Instance>], key: &[u8]) -> Vec<Arc<Instance>> {
    let mut healthy: Vec<Arc<Instance>> = instances
        .iter()
        .filter(|i| i.healthy.load(Ordering::SeqCst))
        .cloned()
        .collect();
    let weight = |i: &Instance| {
        let mut h = blake3::Hasher::new();
        h.update(i.address.as_bytes());
        h.update(key);
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or([0; 8]))
    };
    // Load: what the router has in flight there, plus the queue it last reported (work from
    // elsewhere, and a prefill instance's transfers, which the router does not see).
    let load = |i: &Instance| i.outstanding.load(Ordering::SeqCst) + i.queue() as usize;
    healthy.sort_by_key(|i| load(i));
    let least = healthy.first().map_or(0, |i| load(i));
    if let Some(preferred) = healthy
        .iter()
        .filter(|i| load(i) <= least + LOAD_SLACK)
        .max_by_key(|i| weight(i))
        .cloned()
    {
        healthy.retain(|i| !Arc::ptr_eq(i, &preferred));
        healthy.insert(0, preferred);
    }
    healthy
}

/// Forwards a client's request to a decode instance (with a prefill instance named for its
/// prompt blocks) and its answer back.
async fn forward(State(router): State<Arc<Router>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let body = match axum::body::to_bytes(body, router.config.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is too large or broke off",
            )
        }
    };
    let key = affinity_key(&body);
    let stream = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("stream").and_then(Value::as_bool))
        .unwrap_or(false);
    let mut headers = HeaderMap::new();
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = parts.headers.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    // The prefill instance for the prompt's blocks, held against its load while the request
    // runs (its transfer happens before the decode instance's answer begins).
    let prefill = (parts.method == Method::POST)
        .then(|| {
            order(&router.serving(Part::Prefill), &key)
                .into_iter()
                .next()
        })
        .flatten();
    let _prefill_held = prefill.as_ref().map(Outstanding::new);
    let kv_source = prefill.as_ref().and_then(|p| p.view().kv_address);
    let wait = router.config.upstream_timeout;
    let mut last_error = "no decode instance is healthy".to_string();
    for decode in order(&router.serving(Part::Decode), &key) {
        let held = Outstanding::new(&decode);
        let mut headers = headers.clone();
        let view = decode.view();
        // Only a decode instance takes blocks, and only from a source it was given: another
        // computes the prompt itself.
        if let Some(kv) = &kv_source {
            if view.role == "decode" && view.kv_sources.contains(kv) {
                if let Ok(value) = HeaderValue::from_str(kv) {
                    headers.insert(KV_SOURCE_HEADER, value);
                }
            }
        }
        let answer = call(
            &decode.address,
            None,
            parts.method.clone(),
            &path,
            headers,
            body.clone(),
            wait,
        )
        .await;
        let (status, response_headers, upstream) = match answer {
            Ok(answer) => answer,
            // Slow is not dead: a long prompt's transfer and prefill come before the answer's
            // head. No retry (the request may still be running there) and no verdict.
            Err(CallError::Timeout(waited)) => {
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!(
                        "decode instance {} did not answer within {waited:?} (--upstream-timeout)",
                        decode.address
                    ),
                )
            }
            Err(CallError::Failed(e)) => {
                last_error = format!("decode instance {}: {e}", decode.address);
                fail(&decode, &last_error);
                continue;
            }
        };
        let mut response = Response::builder().status(status);
        if let Some(ct) = response_headers.get(header::CONTENT_TYPE) {
            response = response.header(header::CONTENT_TYPE, ct);
        }
        if stream && status == 200 {
            // From here on the client has its answer's head: no retry, an error event instead.
            let timing = StreamTiming::new(router.clone(), started);
            let body = streamed(upstream, wait, held, decode.clone(), timing);
            return response.body(body).unwrap_or_else(|_| {
                error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "bad upstream response",
                )
            });
        }
        match collect(upstream, wait).await {
            Ok(bytes) => {
                drop(held);
                return response.body(Body::from(bytes)).unwrap_or_else(|_| {
                    error(
                        StatusCode::BAD_GATEWAY,
                        "api_error",
                        "bad upstream response",
                    )
                });
            }
            Err(e) if e.starts_with("the body did not arrive") => {
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!(
                        "decode instance {}: {e} (--upstream-timeout)",
                        decode.address
                    ),
                )
            }
            Err(e) => {
                last_error = format!("decode instance {} failed mid-answer: {e}", decode.address);
                fail(&decode, &last_error);
            }
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        format!("no decode instance could serve the request: {last_error}"),
    )
}

fn fail(instance: &Instance, why: &str) {
    tracing::warn!(address = %instance.address, error = why, "taking the instance out of rotation");
    instance.failures.fetch_add(1, Ordering::Relaxed);
    instance.healthy.store(false, Ordering::SeqCst);
}

/// A streamed answer passed through piece by piece; if the instance fails or stalls, one last
/// server-sent event says so and the stream ends. Its first-token and per-token times go to the
/// router's latency window.
fn streamed(
    upstream: hyper::body::Incoming,
    wait: Duration,
    held: Outstanding,
    instance: Arc<Instance>,
    timing: StreamTiming,
) -> Body {
    // Whether the last bytes forwarded ended an event: an error event must not be glued onto
    // half of one.
    let state = (Some(upstream), held, true, timing);
    let pieces =
        futures_util::stream::unfold(state, move |(upstream, held, at_boundary, mut timing)| {
            let instance = instance.clone();
            async move {
                let mut body = upstream?;
                let why = loop {
                    match tokio::time::timeout(wait, body.frame()).await {
                        Ok(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                timing.saw(&data);
                                let boundary = data.ends_with(b"\n\n");
                                let next = (Some(body), held, boundary, timing);
                                return Some((Ok::<Bytes, std::io::Error>(data), next));
                            }
                        }
                        Ok(None) => {
                            timing.finished();
                            return None;
                        }
                        Ok(Some(Err(e))) => break e.to_string(),
                        Err(_) => break format!("no output for {wait:?}"),
                    }
                };
                fail(&instance, &why);
                let event = stream_error(&instance.address, &why, at_boundary);
                Some((Ok(event), (None, held, true, timing)))
            }
        });
    Body::from_stream(pieces.boxed())
}

/// What a streamed answer tells the role policy: when its first token came (time to first
/// token, from the request's arrival at the router) and the mean gap between its tokens after
/// that (time per output token). Tokens are the events whose first choice carries text (a chat
/// stream's opening role-only event, the finish and usage events do not count); the events are
/// read whole, however the bytes were split.
struct StreamTiming {
    router: Arc<Router>,
    started: Instant,
    /// The bytes of an event not yet complete.
    pending: Vec<u8>,
    first: Option<Instant>,
    last: Instant,
    tokens: u32,
    /// Whether the answer's time per output token went to the window already.
    timed: bool,
}

/// The most bytes of one event the timing waits for; a longer one is not timed.
const MAX_EVENT_BYTES: usize = 1 << 16;

impl StreamTiming {
    fn new(router: Arc<Router>, started: Instant) -> StreamTiming {
        StreamTiming {
            router,
            started,
            pending: Vec::new(),
            first: None,
            last: started,
            tokens: 0,
            timed: false,
        }
    }

    fn saw(&mut self, data: &[u8]) {
        let now = Instant::now();
        self.pending.extend_from_slice(data);
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event = &self.pending[..end];
            let token = carries_a_token(event);
            let done = event.trim_ascii() == b"data: [DONE]";
            self.pending.drain(..end + 2);
            if done {
                // Timed here, before `[DONE]` goes out: a client may close the connection as
                // soon as it reads it, and then the upstream's end is never polled.
                self.finished();
                continue;
            }
            if token {
                if self.first.is_none() {
                    self.first = Some(now);
                    self.router.latencies().first_token(now, now - self.started);
                }
                self.tokens += 1;
                self.last = now;
            }
        }
        if self.pending.len() > MAX_EVENT_BYTES {
            self.pending.clear();
        }
    }

    /// The stream ended normally (its `[DONE]`, or the upstream's end); only the first call
    /// records.
    fn finished(&mut self) {
        if std::mem::replace(&mut self.timed, true) {
            return;
        }
        if let Some(first) = self.first.filter(|_| self.tokens >= 2) {
            let per_token = (self.last - first) / (self.tokens - 1);
            self.router
                .latencies()
                .per_output_token(self.last, per_token);
        }
    }
}

/// Whether a server-sent event's first choice carries generated text (completions' `text`,
/// chat's `delta.content`) or token ids (`token_ids`, when the request asked for them: a token
/// that ends inside a character has no text of its own yet).
fn carries_a_token(event: &[u8]) -> bool {
    let Some(payload) = event.strip_prefix(b"data: ") else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<Value>(payload.trim_ascii()) else {
        return false; // `[DONE]`, or not JSON
    };
    let Some(choices) = v["choices"].as_array() else {
        return false;
    };
    choices.iter().any(|c| {
        c["index"].as_u64().unwrap_or(0) == 0
            && ([&c["text"], &c["delta"]["content"]]
                .iter()
                .any(|t| t.as_str().is_some_and(|t| !t.is_empty()))
                || c["token_ids"].as_array().is_some_and(|ids| !ids.is_empty()))
    })
}

/// The last event of a stream whose decode instance failed (after a blank line, to end a
/// half-forwarded event first, unless `at_boundary`).
fn stream_error(address: &str, why: &str, at_boundary: bool) -> Bytes {
    let event = json!({"error": {"message": format!("the decode instance {address} failed during the stream: {why}"), "type": "api_error", "param": null, "code": null}});
    let end = if at_boundary { "" } else { "\n\n" };
    Bytes::from(format!("{end}data: {event}\n\ndata: [DONE]\n\n"))
}

async fn health(State(router): State<Arc<Router>>) -> Response {
    if router
        .serving(Part::Decode)
        .iter()
        .any(|d| d.healthy.load(Ordering::SeqCst))
    {
        Json(json!({"status": "ok"})).into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "no decode instance is healthy",
        )
    }
}

async fn metrics(State(router): State<Arc<Router>>) -> Response {
    let mut out = String::new();
    type Field = fn(&Instance) -> u64;
    let fields: [(&str, &str, &str, Field); 5] = [
        (
            "fdrt_router:instance_healthy",
            "gauge",
            "1 while the instance is in rotation.",
            |i| i.healthy.load(Ordering::SeqCst) as u64,
        ),
        (
            "fdrt_router:instance_outstanding_requests",
            "gauge",
            "Requests the router has in flight at the instance.",
            |i| i.outstanding.load(Ordering::SeqCst) as u64,
        ),
        (
            "fdrt_router:instance_queue_length",
            "gauge",
            "Requests running and waiting in the instance's scheduler, as it last said.",
            |i| i.queue(),
        ),
        (
            "fdrt_router:instance_requests_total",
            "counter",
            "Requests the router sent to the instance.",
            |i| i.requests.load(Ordering::Relaxed),
        ),
        (
            "fdrt_router:instance_failures_total",
            "counter",
            "Times the instance failed a request and was taken out of rotation.",
            |i| i.failures.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in fields {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for i in &router.instances {
            let v = i.view();
            let _ = writeln!(
                out,
                "{name}{{role=\"{}\",address=\"{}\"}} {}",
                if v.switching {
                    "switching"
                } else {
                    v.role.as_str()
                },
                i.address,
                value(i)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP fdrt_router:queue_length Requests running and waiting in the schedulers of the instances of a role.\n# TYPE fdrt_router:queue_length gauge"
    );
    for (role, part) in [("prefill", Part::Prefill), ("decode", Part::Decode)] {
        let queue: u64 = router.serving(part).iter().map(|i| i.queue()).sum();
        let _ = writeln!(out, "fdrt_router:queue_length{{role=\"{role}\"}} {queue}");
    }
    let _ = writeln!(
        out,
        "# HELP fdrt_router:role_switches_total Role switches the router asked instances for.\n# TYPE fdrt_router:role_switches_total counter\nfdrt_router:role_switches_total {}",
        router.switches.load(Ordering::Relaxed)
    );
    let observed = router.latencies().observed(Instant::now());
    for (name, help, value) in [
        ("fdrt_router:time_to_first_token_seconds_mean", "Mean time to first token of the streamed answers of the last 30 s, from arrival at the router (transfer and queues included); absent with fewer than 8.", observed.ttft),
        ("fdrt_router:time_per_output_token_seconds_mean", "Mean time per output token after the first of the streamed answers of the last 30 s; absent with fewer than 8.", observed.tpot),
    ] {
        if let Some(value) = value {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", value.as_secs_f64());
        }
    }
    let _ = writeln!(out, "# HELP fdrt_router:plan_info The plan every instance runs.\n# TYPE fdrt_router:plan_info gauge\nfdrt_router:plan_info{{plan=\"{}\"}} 1", router.plan);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::carries_a_token;

    #[test]
    fn only_events_with_text_in_their_first_choice_are_tokens() {
        let event = |json: &str| format!("data: {json}\n\n").into_bytes();
        for (json, token) in [
            (
                r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#,
                false,
            ),
            (
                r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
                true,
            ),
            (
                r#"{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}"#,
                false,
            ),
            (r#"{"choices":[{"index":0,"text":" the"}]}"#, true),
            (r#"{"choices":[{"index":1,"text":" the"}]}"#, false),
            (
                r#"{"choices":[{"index":0,"text":"","token_ids":[7]}]}"#,
                true,
            ),
            (r#"{"choices":[],"usage":{"completion_tokens":3}}"#, false),
            ("[DONE]", false),
            ("not json", false),
        ] {
            assert_eq!(carries_a_token(&event(json)), token, "{json}");
        }
        assert!(!carries_a_token(b": keep-alive\n\n"));
    }
}
