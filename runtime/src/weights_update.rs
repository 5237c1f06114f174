//! Live weight updates: a reinforcement-learning loop replaces a serving plan's weights with a
//! new snapshot of the same structure, many times a day, without restarting the server.
//!
//! The snapshot's part files (`NAME.tp{rank}.{snapshot_id}.part{N}.fdw`, written by
//! `fdc compile --weights-only`) are loaded and verified beside the weights in service, on a
//! blocking thread, one part at a time (see `weights`): every section's checksum, every part
//! present once, and the structure equal to the running plan's (weight names, shapes, storage
//! types, layouts). Only then are they handed to the engine thread, which switches at a step
//! boundary (`Scheduler::swap_weights`): no forward pass mixes old and new weights, running
//! requests continue with the next step on the new weights (their KV entries so far came from
//! the old ones, as in any RL rollout server that updates in flight), and the prefix cache is
//! invalidated at the switch. On any error nothing is switched: the old weights stay in service
//! and the error is returned.
//!
//! The HTTP endpoint is `server::admin`; `fdrt update-weights` calls it.

use crate::error::RuntimeError;
use crate::scheduler::Scheduler;
use crate::weights::WeightStore;
use artifacts::parts::SnapshotTag;
use artifacts::schema::Manifest;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What to load: the snapshot `snapshot_id` for `rank` from the part files in `dir` (a
/// directory on the server's machine).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateWeightsRequest {
    pub dir: PathBuf,
    pub snapshot_id: String,
    #[serde(default)]
    pub rank: u32,
}

/// What an update did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateWeightsReport {
    pub snapshot_id: String,
    pub rank: u32,
    /// Part files loaded.
    pub parts: usize,
    pub weights: usize,
    /// Loading and verifying the parts, then waiting for the step boundary.
    pub load_ms: f64,
    pub switch_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The snapshot does not load or does not match the plan; the old weights stay in service.
    #[error(transparent)]
    Load(#[from] RuntimeError),
    #[error("the engine has stopped (the server is shutting down); the weights were not switched")]
    EngineStopped,
}

/// Loads `request`'s snapshot against `manifest` (the plan in service), then switches the
/// scheduler's engine to it at the next step boundary. Returns once the new weights serve.
pub async fn update_weights(
    scheduler: &Scheduler,
    manifest: Arc<Manifest>,
    request: UpdateWeightsRequest,
) -> Result<UpdateWeightsReport, UpdateError> {
    let start = Instant::now();
    let tag = SnapshotTag {
        id: request.snapshot_id.clone(),
        rank: request.rank,
    };
    let dir = request.dir.clone();
    let weights = manifest.weights.len();
    let store =
        tokio::task::spawn_blocking(move || WeightStore::load_snapshot(&dir, &tag, &manifest))
            .await
            .map_err(|_| UpdateError::EngineStopped)??;
    let parts = store.file_count();
    let loaded = start.elapsed();
    let switched = scheduler
        .swap_weights(store, request.snapshot_id.clone())
        .map_err(|_| UpdateError::EngineStopped)?;
    switched.await.map_err(|_| UpdateError::EngineStopped)??;
    Ok(UpdateWeightsReport {
        snapshot_id: request.snapshot_id,
        rank: request.rank,
        parts,
        weights,
        load_ms: loaded.as_secs_f64() * 1e3,
        switch_ms: (start.elapsed() - loaded).as_secs_f64() * 1e3,
    })
}
