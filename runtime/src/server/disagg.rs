//! The HTTP side of prefill/decode disaggregation (`crate::disagg` has the protocol and how
//! the blocks travel).
//!
//! A decode instance (`--role decode`) takes a request's prompt blocks from the prefill instance
//! that the request's `x-fdrt-kv-source` header names (the router sets it), before it submits
//! the request; only addresses given with `--kv-source` are ever connected to, so a client cannot
//! point the server at a host of its choosing. A failed transfer is logged and counted
//! (`fdrt:kv_transfer_failures_total`), and the request then computes its whole prompt here.
//! `GET /v1/kv_transfer` tells a router an instance's role, plan and transfer port;
//! `POST /admin/v1/role` (with the API key) moves an instance between roles once its work in
//! flight drains.

use crate::disagg::transfer::{self, Identity};
use crate::disagg::wire::plan_hex;
use crate::disagg::{Role, TransferPath};
use crate::server::errors::ApiError;
use crate::server::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;
use std::time::Instant;

/// The request header naming the prefill instance (its KV transfer `host:port`).
pub const KV_SOURCE_HEADER: &str = "x-fdrt-kv-source";

/// An instance's part in disaggregated serving (`fdrt serve --role ...`).
#[derive(Clone, Debug)]
pub struct DisaggConfig {
    pub role: Role,
    /// `--role prefill`: the port its KV transfers are served on.
    pub kv_transfer_port: Option<u16>,
    /// `--role decode`: the prefill instances' transfer addresses it may take blocks from.
    pub kv_sources: Vec<String>,
    /// `--role decode`: prompts shorter than this are computed here, without a transfer (a
    /// short prompt queued behind long ones on a busy prefill instance waits longer than it
    /// takes to compute).
    pub min_transfer_tokens: usize,
    /// Timeouts, the transfer key, shared memory on one host.
    pub transfer: transfer::Options,
}

impl Default for DisaggConfig {
    fn default() -> Self {
        DisaggConfig {
            role: Role::Mixed,
            kv_transfer_port: None,
            kv_sources: vec![],
            min_transfer_tokens: 0,
            transfer: transfer::Options::default(),
        }
    }
}

/// `GET /v1/kv_transfer`.
pub(crate) async fn describe(State(state): State<Arc<AppState>>) -> Response {
    let d = &state.config.disagg;
    let identity = state.disagg.identity();
    let role = state.disagg.role();
    let stats = state.scheduler.stats();
    Json(serde_json::json!({
        "role": role_name(role.current),
        "switching_to": role.pending.map(role_name),
        "plan": plan_hex(&identity.plan),
        "block_size": identity.block_size,
        "kv_transfer_port": d.kv_transfer_port,
        "can_prefill": d.kv_transfer_port.is_some(),
        "can_decode": !d.kv_sources.is_empty(),
        "kv_sources": d.kv_sources,
        "running": stats.running,
        "waiting": stats.waiting,
    }))
    .into_response()
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Mixed => "mixed",
        Role::Prefill => "prefill",
        Role::Decode => "decode",
    }
}

/// What `POST /admin/v1/role` takes.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    pub role: String,
}

/// `POST /admin/v1/role`: moves the instance to another role once its work in flight (HTTP
/// requests and KV transfers) drains; answers at once with the status. An instance can take
/// the prefill role only with a KV transfer port, the decode role only with `--kv-source`.
pub(crate) async fn switch_role(
    State(state): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let request: RoleRequest = super::routes::parse_body(&state, body)?;
    let d = &state.config.disagg;
    let role = match request.role.as_str() {
        "mixed" => Role::Mixed,
        "prefill" if d.kv_transfer_port.is_some() => Role::Prefill,
        "decode" if !d.kv_sources.is_empty() => Role::Decode,
        "prefill" => {
            return Err(ApiError::invalid("role", "this instance has no KV transfer port: start it with --kv-transfer-port to let it prefill for others"))
        }
        "decode" => {
            return Err(ApiError::invalid("role", "this instance has no --kv-source: start it with one to let it take KV blocks"))
        }
        other => {
            return Err(ApiError::invalid("role", format!("unknown role {other:?}: one of mixed, prefill, decode")))
        }
    };
    let status = state.disagg.request_role(role);
    if status.pending.is_some() {
        tracing::info!(
            from = role_name(status.current),
            to = request.role,
            "role switch requested; waiting for work in flight to drain"
        );
        let state = state.clone();
        tokio::spawn(async move {
            // Work in flight: HTTP generation requests and KV transfers. New ones still arrive
            // (a router stops sending once it sees the switch); the switch waits for a moment
            // with none.
            loop {
                if state.disagg.role().pending.is_none() {
                    return; // cancelled
                }
                if state.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
                    && state.disagg.active_transfers() == 0
                {
                    if let Some(role) = state.disagg.finish_switch() {
                        tracing::info!(role = role_name(role), "role switched");
                    }
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
    }
    let status = state.disagg.role();
    Ok(Json(serde_json::json!({
        "role": role_name(status.current),
        "switching_to": status.pending.map(role_name),
    }))
    .into_response())
}

/// Before a decode instance submits `prompts`: their leading full blocks from the prefill
/// instance the request names, as far as this instance's prefix cache lacks them. Refuses
/// (400) a source not given with `--kv-source`; any other failure leaves the prompt to be
/// computed here.
pub(crate) async fn pull_prompt_blocks(
    state: &AppState,
    headers: &HeaderMap,
    prompts: &[Vec<u32>],
) -> Result<(), ApiError> {
    let Some(source) = headers.get(KV_SOURCE_HEADER) else {
        return Ok(());
    };
    let d = &state.config.disagg;
    let source = source.to_str().unwrap_or_default();
    if !d.kv_sources.iter().any(|s| s == source) {
        return Err(ApiError::bad_request(format!(
            "{KV_SOURCE_HEADER}: {source:?} is not a prefill instance this server takes KV blocks from (fdrt serve --role decode --kv-source HOST:PORT)"
        )));
    }
    if state.disagg.role().current != Role::Decode {
        // Switched away from decoding since the router looked: compute the prompt here.
        return Ok(());
    }
    for prompt in prompts {
        let start = Instant::now();
        match pull(state, source, prompt, &d.transfer).await {
            Ok(0) => {}
            Ok(blocks) => state.disagg.counters.received(
                blocks,
                blocks * state.disagg.identity().block_bytes,
                start.elapsed(),
            ),
            Err(e) => {
                tracing::warn!(source, error = %e, "KV transfer failed; computing the prompt here");
                state.disagg.counters.receive_failed();
            }
        }
    }
    Ok(())
}

/// One prompt's blocks; returns how many arrived.
async fn pull(
    state: &AppState,
    source: &str,
    prompt: &[u32],
    options: &transfer::Options,
) -> Result<usize, String> {
    let me = state.disagg.identity();
    if prompt.len() < state.config.disagg.min_transfer_tokens {
        return Ok(0);
    }
    // The last prompt token is computed here for its logits, and with it its block.
    let blocks = prompt.len().saturating_sub(1) / me.block_size;
    if blocks == 0 {
        return Ok(0);
    }
    let prefix = prompt[..blocks * me.block_size].to_vec();
    let _pull = state.disagg.pull_started().await;
    let held = state
        .scheduler
        .cached_blocks(prefix.clone())
        .await
        .map_err(|e| e.to_string())?;
    if held.blocks >= blocks {
        return Ok(0);
    }
    let fetched = transfer::fetch_prefix(source, &me, prefix, held, options)
        .await
        .map_err(|e| e.to_string())?;
    let arrived = fetched.blocks.len();
    let counters = &state.disagg.counters;
    let by_path = match fetched.path {
        TransferPath::SharedMemory => Some(&counters.received_shared_blocks),
        TransferPath::Device => Some(&counters.received_device_blocks),
        TransferPath::Socket => None,
    };
    if let Some(counter) = by_path {
        counter.fetch_add(arrived as u64, std::sync::atomic::Ordering::Relaxed);
    }
    state.scheduler.write_cached_blocks(fetched).await?;
    Ok(arrived)
}

/// What a transfer peer of this plan must share with it (the plan's own weights).
pub fn identity(plan: &crate::plan::LoadedPlan, block_size: usize) -> Identity {
    Identity {
        plan: plan.identity(),
        block_size,
        block_bytes: plan.manifest.kv.bytes_per_token as usize * block_size,
    }
}
