//! Admin endpoints, for the operator rather than for clients: `POST
//! /admin/v1/update_weights`, a live weight update (see `weights_update`), and the client side
//! of it that `fdrt update-weights` runs; `POST /admin/v1/role`, a role switch in disaggregated
//! serving (`disagg`).
//!
//! Authentication: admin endpoints exist only when the server has an API key (`--api-key` or
//! `FDRT_API_KEY`) and require `Authorization: Bearer <key>`; without a key they answer 403.
//! An admin request names a directory on the server's machine, which a client request never
//! may, so there is deliberately no way to open them without a key. Updates run one at a time;
//! a second one waits for the first.

use crate::server::errors::ApiError;
use crate::server::AppState;
use crate::weights_update::{self, UpdateError, UpdateWeightsReport, UpdateWeightsRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use std::sync::Arc;

/// Path of the live weight update.
pub const UPDATE_WEIGHTS_PATH: &str = "/admin/v1/update_weights";
/// Path of the role switch (disaggregated serving).
pub const ROLE_PATH: &str = "/admin/v1/role";

pub(crate) fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route(UPDATE_WEIGHTS_PATH, post(update_weights))
        .route(ROLE_PATH, post(super::disagg::switch_role))
        .route_layer(middleware::from_fn_with_state(state, require_admin_key))
}

async fn require_admin_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = &state.config.api_key else {
        return ApiError {
            status: StatusCode::FORBIDDEN,
            message: "admin endpoints are disabled: start fdrt serve with --api-key (or FDRT_API_KEY) and send it as `Authorization: Bearer <key>`".into(),
            kind: "permission_error",
            param: None,
            code: Some("admin_disabled"),
        }
        .into_response();
    };
    if !super::routes::has_bearer_key(&request, key) {
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

async fn update_weights(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: UpdateWeightsRequest = super::routes::parse_body(&state, body)?;
    let _one_at_a_time = state.weights_update.lock().await;
    tracing::info!(
        dir = %request.dir.display(),
        snapshot_id = %request.snapshot_id,
        rank = request.rank,
        "live weight update: loading"
    );
    match weights_update::update_weights(&state.scheduler, state.manifest.clone(), request).await {
        Ok(report) => {
            tracing::info!(
                snapshot_id = %report.snapshot_id,
                parts = report.parts,
                load_ms = report.load_ms,
                switch_ms = report.switch_ms,
                "live weight update: switched"
            );
            Ok(Json(report).into_response())
        }
        Err(UpdateError::EngineStopped) => Err(ApiError::shutting_down()),
        Err(e @ UpdateError::Load(_)) => {
            tracing::warn!(error = %e, "live weight update refused; the old weights stay in service");
            Err(ApiError {
                code: Some("weight_update_failed"),
                ..ApiError::bad_request(format!("{e}; the weights in service are unchanged"))
            })
        }
    }
}

/// What `fdrt update-weights` sends: the update, to the server at `address` (`host:port`).
pub async fn request_update(
    address: &str,
    api_key: Option<&str>,
    request: &UpdateWeightsRequest,
) -> Result<UpdateWeightsReport, super::bench::BenchError> {
    let body = serde_json::to_value(request)
        .map_err(|e| super::bench::BenchError::Options(e.to_string()))?;
    let (status, response) =
        super::bench::send(address, api_key, "POST", UPDATE_WEIGHTS_PATH, Some(body)).await?;
    let text = response.text().await?;
    if status != 200 {
        return Err(super::bench::BenchError::Status { status, body: text });
    }
    serde_json::from_str(&text).map_err(|e| super::bench::BenchError::Protocol(e.to_string()))
}
