//! `GET /v1/upstreams`: the upstreams this deployment routes to, their limits, and what the
//! fleet-wide limiter holds for each right now (the current minute's use, leases, blocks,
//! limits learned from the upstream's headers). Keys are never shown; base URLs lose any
//! credentials they carry.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::routes::deadline;
use crate::AppState;

pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let upstreams = deadline(state.limiter.snapshot(&state.config.upstreams)).await?;
    Ok(Json(json!({ "upstreams": upstreams })).into_response())
}
