//! The HTTP side of prefill/decode disaggregation (`crate::disagg` has the protocol and how
//! the blocks travel).
//!
//! A decode instance (`--role decode`) takes a request's prompt blocks from the prefill instance
//! that the request's `x-fdrt-kv-source` header names (the router sets it), before it submits
//! the request; only addresses given with `--kv-source` are ever connected to, so a client cannot
//! point the server at a host of its choosing. A failed transfer is logged and counted
//! (`fdrt:kv_transfer_failures_total`), and the request then computes its whole prompt here.
//! `GET /v1/kv_transfer` tells a router an instance's role, plan and transfer port.

use crate::disagg::transfer::{self, Identity, Timeouts};
use crate::disagg::wire::plan_hex;
use crate::disagg::Role;
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
    pub timeouts: Timeouts,
}

impl Default for DisaggConfig {
    fn default() -> Self {
        DisaggConfig {
            role: Role::Mixed,
            kv_transfer_port: None,
            kv_sources: vec![],
            timeouts: Timeouts::default(),
        }
    }
}

/// `GET /v1/kv_transfer`.
pub(crate) async fn describe(State(state): State<Arc<AppState>>) -> Response {
    let d = &state.config.disagg;
    let role = match d.role {
        Role::Mixed => "mixed",
        Role::Prefill => "prefill",
        Role::Decode => "decode",
    };
    Json(serde_json::json!({
        "role": role,
        "plan": plan_hex(&state.kv_identity.plan),
        "block_size": state.kv_identity.block_size,
        "kv_transfer_port": d.kv_transfer_port,
    }))
    .into_response()
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
    if d.role != Role::Decode || !d.kv_sources.iter().any(|s| s == source) {
        return Err(ApiError::bad_request(format!(
            "{KV_SOURCE_HEADER}: {source:?} is not a prefill instance this server takes KV blocks from (fdrt serve --role decode --kv-source HOST:PORT)"
        )));
    }
    for prompt in prompts {
        let start = Instant::now();
        match pull(state, source, prompt, d.timeouts).await {
            Ok(0) => {}
            Ok(blocks) => state.metrics.kv_received(
                blocks,
                blocks * state.kv_identity.block_bytes,
                start.elapsed(),
            ),
            Err(e) => {
                tracing::warn!(source, error = %e, "KV transfer failed; computing the prompt here");
                state.metrics.kv_transfer_failed();
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
    timeouts: Timeouts,
) -> Result<usize, String> {
    let block_size = state.kv_identity.block_size;
    // The last prompt token is computed here for its logits, and with it its block.
    let blocks = prompt.len().saturating_sub(1) / block_size;
    if blocks == 0 {
        return Ok(0);
    }
    let prefix = prompt[..blocks * block_size].to_vec();
    let held = state
        .scheduler
        .cached_blocks(prefix.clone())
        .await
        .map_err(|e| e.to_string())?;
    if held == blocks {
        return Ok(0);
    }
    let fetched = transfer::fetch_prefix(source, &state.kv_identity, prefix, held, timeouts)
        .await
        .map_err(|e| e.to_string())?;
    let arrived = fetched.blocks.len();
    state.scheduler.write_cached_blocks(fetched).await?;
    Ok(arrived)
}

/// What a transfer peer of this plan must share with it.
pub(crate) fn identity(plan: &crate::plan::LoadedPlan, block_size: usize) -> Identity {
    Identity {
        plan: plan.identity(),
        block_size,
        block_bytes: plan.manifest.kv.bytes_per_token as usize * block_size,
    }
}
