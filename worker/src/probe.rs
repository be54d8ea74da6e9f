//! The worker's probe and metrics server: `/healthz`, `/readyz` (503 while draining or when
//! Redis is unreachable, so Kubernetes stops counting the pod), `/metrics`.

use std::sync::Arc;

use agentq_common::metrics::render;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Worker;

pub(crate) async fn serve(listener: TcpListener, worker: Arc<Worker>, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(worker);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "probe server failed");
    }
}

async fn readyz(State(w): State<Arc<Worker>>) -> Response {
    if w.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    let up = tokio::time::timeout(std::time::Duration::from_secs(2), w.broker.redis().ping())
        .await
        .unwrap_or(false);
    if up {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "redis unreachable"})),
        )
            .into_response()
    }
}

async fn metrics(State(w): State<Arc<Worker>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&w.metrics.registry),
    )
        .into_response()
}
