//! `fdrt serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.
//!
//! The engine runs on the scheduler's own thread; HTTP handlers are async and only validate,
//! tokenize, submit and then await their requests' events, so a slow client never stalls a
//! step and a step never blocks a handler. Each choice of a request is one scheduler request,
//! followed by a small task that decodes its tokens to text, applies stop strings and forwards
//! the result; when the client goes away the task ends, which drops the request's stream and so
//! cancels it in the scheduler.
//!
//! Layout: `openai` (request bodies and their validation), `routes` (endpoints, SSE),
//! `generation` (submission and the per-choice tasks), `errors` (OpenAI error bodies),
//! `metrics` (Prometheus text), `bench` (the load generator behind `fdrt bench-serve`), `admin`
//! (operator endpoints: the live weight update, with a key only), `connections` (accepting
//! connections: their limit and the header read timeout).
//!
//! Shutdown: when the shutdown future given to [`serve`] completes, the server drains: new
//! requests get 503, running ones may finish until the drain timeout, after which they are
//! aborted; then the listener closes.

pub mod admin;
pub mod bench;
pub(crate) mod connections;
pub mod disagg;
pub mod errors;
mod generation;
pub mod metrics;
pub mod openai;
mod routes;

use crate::batch_engine::BatchEngine;
use crate::chat::{ChatError, ChatTemplate};
use crate::scheduler::{Scheduler, SchedulerConfig, Stats};
use crate::tokenizer::{TextTokenizer, TokenizerError};
use artifacts::schema::Manifest;
use metrics::Metrics;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The address `fdrt serve` listens on unless told otherwise: loopback, so that a server is
/// reachable from other machines only when its operator says so (`--host 0.0.0.0`).
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// Connections open at once unless told otherwise: FastDeploy's default for its similar
/// `--max-concurrency`, and far more than a CPU server decodes at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// How a server behaves, beyond the engine it runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The name clients use in `model`; defaults to the plan's model name.
    pub served_model_name: Option<String>,
    /// When set, `/v1/*`, `/metrics` and the admin endpoints require `Authorization: Bearer
    /// <key>`; `/health` stays open for probes.
    pub api_key: Option<String>,
    /// Sequences decoded together at most.
    pub max_num_seqs: usize,
    /// Requests waiting to run at most; beyond it, requests get 429.
    pub max_waiting: usize,
    /// Reuse the KV blocks of earlier requests with the same prefix (`--no-prefix-caching`
    /// turns it off).
    pub prefix_caching: bool,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long running requests may continue after shutdown begins.
    pub drain_timeout: Duration,
    /// Connections open at once at most; beyond it, new connections wait in the listen backlog
    /// until one closes (`connections` says why they wait rather than being refused).
    pub max_connections: usize,
    /// How long a client may take to send a request head, counted from when the server starts
    /// waiting for one (a new connection, or a kept-alive one after its last response); past
    /// it the connection is closed, so idle and slow clients cannot hold connections forever.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body in full, counted from when its head
    /// arrived (408 past it): a body trickled within the size limit cannot hold a connection.
    pub body_read_timeout: Duration,
    /// How long a write to a client may make no progress (it reads nothing of its response)
    /// before its connection is closed and its request cancelled.
    pub write_timeout: Duration,
    /// Speculative decoding (`--speculative-config`); `None` decodes one token per step.
    pub speculative: Option<crate::speculative::SpeculativeConfig>,
    /// Prefill/decode disaggregation: this instance's role and peers.
    pub disagg: disagg::DisaggConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            served_model_name: None,
            api_key: None,
            max_num_seqs: 8,
            max_waiting: 256,
            prefix_caching: true,
            max_body_bytes: 4 << 20,
            drain_timeout: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            speculative: None,
            disagg: disagg::DisaggConfig::default(),
        }
    }
}

/// What can stop a server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the plan's tokenizer does not load: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("the plan's chat template does not compile: {0}")]
    ChatTemplate(#[from] ChatError),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything the handlers share.
pub(crate) struct AppState {
    scheduler: Scheduler,
    model_name: String,
    /// Unix time the server started, reported as the model's `created`.
    created: u64,
    tokenizer: Option<TextTokenizer>,
    chat_template: Option<ChatTemplate>,
    eos_token_ids: Vec<u32>,
    vocab: usize,
    context: usize,
    config: ServerConfig,
    metrics: Metrics,
    /// Set when shutdown begins: new generation requests get 503.
    draining: AtomicBool,
    /// Set when the drain deadline passes: every choice task ends its request.
    abort: tokio::sync::watch::Sender<bool>,
    /// Generation requests whose response is not finished yet.
    in_flight: AtomicUsize,
    next_id: AtomicU64,
    /// Makes response ids unique across restarts.
    id_prefix: u64,
    /// The plan in service, which a weight snapshot must match.
    manifest: Arc<Manifest>,
    /// Held by the weight update in progress: updates run one at a time.
    weights_update: tokio::sync::Mutex<()>,
    /// Its part in disaggregated serving: identity, role, transfer counters (shared with its
    /// KV transfer server).
    disagg: Arc<crate::disagg::InstanceState>,
}

impl AppState {
    /// A fresh response id such as `chatcmpl-18c0f3a2b4d5e6f7-1a`.
    fn response_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:x}", self.id_prefix)
    }
}

/// A server ready to be served: the scheduler is started, the tokenizer and chat template are
/// loaded. Clone it freely; clones share everything.
#[derive(Clone)]
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    /// Starts the scheduler on `engine`.
    pub fn new(engine: Box<dyn BatchEngine>, config: ServerConfig) -> Result<Server, ServerError> {
        Server::with_draft(engine, None, config)
    }

    /// As [`Server::new`], with the draft model of the `draft` speculative method.
    pub fn with_draft(
        engine: Box<dyn BatchEngine>,
        draft: Option<Box<dyn BatchEngine>>,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        let plan = engine.plan();
        let model_name = config
            .served_model_name
            .clone()
            .unwrap_or_else(|| plan.manifest.model.name.clone());
        let tokenizer = plan
            .tokenizer_json()
            .map(TextTokenizer::from_json)
            .transpose()?;
        let chat_template = match &plan.manifest.tokenizer {
            Some(info) => match &info.chat_template {
                Some(source) => Some(ChatTemplate::new(
                    source,
                    info.bos_token.clone(),
                    info.eos_token.clone(),
                )?),
                None => None,
            },
            None => None,
        };
        let eos_token_ids = plan.manifest.model.eos_token_ids.clone();
        let manifest = Arc::new(plan.manifest.clone());
        let vocab = engine.vocab_size();
        let instance = Arc::new(crate::disagg::InstanceState::new(
            disagg::identity(plan, engine.options().block_size),
            config.disagg.role,
        ));
        let scheduler = Scheduler::start_speculative(
            engine,
            draft,
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_waiting: config.max_waiting,
                prefix_caching: config.prefix_caching,
                speculative: config.speculative.clone(),
            },
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let state = AppState {
            context: scheduler.max_context(),
            scheduler,
            metrics: Metrics::new(&model_name),
            model_name,
            created: now.as_secs(),
            tokenizer,
            chat_template,
            eos_token_ids,
            vocab,
            config,
            draining: AtomicBool::new(false),
            abort: tokio::sync::watch::Sender::new(false),
            in_flight: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            id_prefix: now.as_nanos() as u64,
            manifest,
            weights_update: tokio::sync::Mutex::new(()),
            disagg: instance,
        };
        Ok(Server {
            state: Arc::new(state),
        })
    }

    pub fn model_name(&self) -> &str {
        &self.state.model_name
    }

    /// Whether `/v1` endpoints require a key (the key itself is never exposed).
    pub fn has_api_key(&self) -> bool {
        self.state.config.api_key.is_some()
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.state.scheduler
    }

    /// Its part in disaggregated serving, which its KV transfer server (`--role prefill`)
    /// shares.
    pub fn instance_state(&self) -> Arc<crate::disagg::InstanceState> {
        self.state.disagg.clone()
    }

    pub fn stats(&self) -> Stats {
        self.state.scheduler.stats()
    }

    /// The HTTP routes, for serving on a listener of the caller's choice.
    pub fn router(&self) -> axum::Router {
        routes::router(self.state.clone())
    }

    /// Generation requests whose responses are still being produced.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Begins draining: new generation requests get 503 and the scheduler admits no more.
    pub fn begin_drain(&self) {
        self.state.draining.store(true, Ordering::SeqCst);
        self.state.scheduler.drain();
    }

    /// Ends every request still running (their clients see an error).
    pub fn abort_all(&self) {
        self.state.abort.send_replace(true);
    }
}

/// Serves `server` on `listener` until `shutdown` completes, then drains: requests arriving
/// after that get 503, running ones have `drain_timeout` to finish before they are aborted, and
/// the function returns once every connection is closed. The engine thread is stopped last.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Server,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let drainer = server.clone();
    tokio::spawn(async move {
        shutdown.await;
        drain(&drainer).await;
        let _ = closed_tx.send(());
    });
    let limits = connections::ConnectionLimits {
        max_connections: server.state.config.max_connections,
        header_read_timeout: server.state.config.header_read_timeout,
        write_timeout: server.state.config.write_timeout,
    };
    connections::serve_connections(listener, server.router(), limits, async move {
        let _ = closed_rx.await;
    })
    .await;
    // Everything has finished or been aborted: stop the engine thread.
    let scheduler = server.state.scheduler.clone();
    tokio::task::spawn_blocking(move || scheduler.join(Duration::from_secs(5)))
        .await
        .ok();
    Ok(())
}

/// Stops admitting requests and waits for the running ones, aborting them at the deadline.
async fn drain(server: &Server) {
    let timeout = server.state.config.drain_timeout;
    tracing::info!(
        in_flight = server.in_flight(),
        timeout_s = timeout.as_secs_f64(),
        "shutting down: draining requests"
    );
    server.begin_drain();
    let deadline = Instant::now() + timeout;
    while server.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if server.in_flight() > 0 {
        tracing::warn!(
            in_flight = server.in_flight(),
            "drain timeout passed: aborting the requests still running"
        );
        server.abort_all();
        // Aborted tasks end at their next event check; give their responses a moment to flush.
        let grace = Instant::now() + Duration::from_secs(2);
        while server.in_flight() > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tracing::info!("drained");
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_address_is_loopback() {
        let address: std::net::IpAddr = super::DEFAULT_HOST.parse().expect("an IP address");
        assert!(address.is_loopback());
    }
}
