//! `GET /v1/queues`: every declared queue with its counts (as `GET /v1/queues/{queue}`) and the
//! tasks created in the last minute, so a dashboard needs one request, not one per queue. Counts
//! are the queue's, whoever asks (as the single-queue route); no record is read.

use agentq_common::time::now_ms;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::routes::deadline;
use crate::AppState;

pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let since = now_ms() - 60_000;
    let mut out = Vec::with_capacity(state.config.queues.len());
    // declared queues only: a short, fixed list (AGENTQ_QUEUES)
    for q in &state.config.queues {
        let stats = deadline(state.broker.stats(q)).await?;
        let created = deadline(state.broker.created_since(q, since)).await?;
        let mut v = serde_json::to_value(stats).unwrap_or_else(|_| json!({"queue": q}));
        v["created_last_minute"] = json!(created);
        out.push(v);
    }
    Ok(Json(json!({ "queues": out, "default_queue": state.config.default_queue })).into_response())
}
