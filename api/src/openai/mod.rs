//! The OpenAI-compatible surface (docs/architecture.md, "OpenAI-compatible front door"):
//! `POST /v1/chat/completions` (a queued task the call waits for) and `GET /v1/models`; the
//! Batch API (files and batches) is `crate::batch`, speaking the same dialect with `OaiError`. Same process, port and queue as the rest of the api;
//! what differs is the dialect: OpenAI's request and response shapes, and its error shape
//! `{"error":{"message","type","param","code"}}` with the statuses its SDKs map to exception
//! classes (400 `BadRequestError`, 404 `NotFoundError`, 413, 422, 429 `RateLimitError`, 503...).

pub mod chat;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct OaiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `rate_limit_error`,
    /// `insufficient_quota`, `server_error`...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// `x-should-retry`, which the official SDKs obey before their own rules: `false` where a
    /// retry would enqueue the same work again (the fleet already retried it), `true` where
    /// nothing was written and a later try can succeed.
    pub should_retry: Option<bool>,
    pub retry_after: Option<u64>,
}

impl OaiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: kind_for(status),
            param: None,
            code: None,
            should_retry: None,
            retry_after: None,
        }
    }

    /// A request parameter at fault: 400, as OpenAI answers a bad value.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message).param(param)
    }

    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    pub fn code(mut self, c: impl Into<String>) -> Self {
        self.code = Some(c.into());
        self
    }

    pub fn kind(mut self, k: &'static str) -> Self {
        self.kind = k;
        self
    }

    pub fn should_retry(mut self, r: bool) -> Self {
        self.should_retry = Some(r);
        self
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

fn kind_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

impl From<ApiError> for OaiError {
    /// The native api's errors in OpenAI's words. A value at fault is a 400 (OpenAI's status
    /// for it; the native api says 422), its field the `param`; a 415 is a 400 too.
    fn from(e: ApiError) -> Self {
        let status = match e.status {
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                StatusCode::BAD_REQUEST
            }
            s => s,
        };
        let mut out = Self::new(status, e.message).code(e.code);
        out.param = e.field;
        out.retry_after = e.retry_after;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            out.retry_after = Some(1);
            out.should_retry = Some(true);
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            // a tenant quota refused it and nothing was written: a rate or pending quota frees
            // up by the Retry-After, a spent budget does not within an SDK's retries
            let spent = e.code == "budget_exceeded";
            out.should_retry = Some(!spent);
            if spent {
                out.kind = "insufficient_quota";
            }
        }
        out
    }
}

impl From<redis::RedisError> for OaiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        let h = resp.headers_mut();
        if let Some(r) = self.should_retry {
            h.insert(
                "x-should-retry",
                HeaderValue::from_static(if r { "true" } else { "false" }),
            );
        }
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                h.insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// The models this deployment serves: every model of every upstream (`AGENTQ_UPSTREAMS`), or
/// the default model of the implicit single upstream (which takes any model name besides).
fn models(state: &AppState) -> Vec<(String, String)> {
    let ups = &state.config.upstreams;
    let mut out: Vec<(String, String)> = Vec::new();
    for u in &ups.list {
        for m in &u.models {
            if !out.iter().any(|(have, _)| have == m) {
                out.push((m.clone(), u.name.clone()));
            }
        }
    }
    if out.is_empty() || !out.iter().any(|(m, _)| *m == ups.default_model) {
        let owner = ups
            .list
            .first()
            .map_or_else(|| "default".to_owned(), |u| u.name.clone());
        if ups.implicit || ups.serves(&ups.default_model) {
            out.insert(0, (ups.default_model.clone(), owner));
        }
    }
    out
}

fn model_object(id: &str, owner: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

/// `GET /v1/models`
pub async fn list_models(State(state): State<AppState>) -> Response {
    let data: Vec<serde_json::Value> = models(&state)
        .iter()
        .map(|(m, o)| model_object(m, o))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{model}`
pub async fn get_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, OaiError> {
    match models(&state).iter().find(|(m, _)| *m == model) {
        Some((m, o)) => Ok(Json(model_object(m, o)).into_response()),
        None => Err(model_not_found(&model)),
    }
}

pub(crate) fn model_not_found(model: &str) -> OaiError {
    // the name is the client's own, but bounded: it was checked against the name pattern or cut
    let shown: String = model.chars().take(128).collect();
    OaiError::new(
        StatusCode::NOT_FOUND,
        format!("The model `{shown}` does not exist or is not served by this deployment"),
    )
    .param("model")
    .code("model_not_found")
}
