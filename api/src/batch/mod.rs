//! The OpenAI Batch API (docs/architecture.md, "Batch API"): files (`files.rs`: JSONL uploads
//! streamed line by line into Redis, validated as they come) and batches (`batches.rs`: one task
//! per line on the batch queue, request counts kept by the queue scripts, output and error files
//! written when every request is final). Errors are OpenAI's (`OaiError`). The loop in `run`
//! (one per api replica, beside the promoter) resumes what a replica left half done: fan-out,
//! cancels, expiry, finalization, and deletes expired files.

pub mod batches;
pub mod files;

use std::time::Duration;

use axum::http::StatusCode;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::openai::OaiError;
use crate::AppState;

/// How often the loop looks at live batches.
const EVERY: Duration = Duration::from_secs(1);
/// How often it collects expired files and batches' index entries.
const GC_EVERY: Duration = Duration::from_secs(10);

/// A Redis call under the api's deadline, its failure as OpenAI's 503.
pub(crate) async fn dl<T>(
    fut: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, OaiError> {
    crate::routes::deadline(fut).await.map_err(OaiError::from)
}

pub(crate) fn now_secs() -> i64 {
    agentq_common::time::now_ms() / 1000
}

/// `limit` and `after` of OpenAI's list endpoints (plus `purpose` for files).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<String>,
    after: Option<String>,
    purpose: Option<String>,
    order: Option<String>,
}

/// Most items one page of a list holds.
const MAX_LIMIT: usize = 1000;

impl ListQuery {
    /// The page size: `default` when not given, else 1 to 1000.
    fn limit(&self, default: usize) -> Result<usize, OaiError> {
        match self.limit.as_deref() {
            None => Ok(default),
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(OaiError::invalid(
                    "limit",
                    format!("limit must be an integer between 1 and {MAX_LIMIT}"),
                )),
            },
        }
    }

    /// Newest first (`desc`, the default) or oldest first.
    fn newest_first(&self) -> Result<bool, OaiError> {
        match self.order.as_deref() {
            None | Some("desc") => Ok(true),
            Some("asc") => Ok(false),
            Some(_) => Err(OaiError::invalid("order", "order must be asc or desc")),
        }
    }
}

pub(crate) fn query(
    q: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ListQuery, OaiError> {
    q.map(|axum::extract::Query(q)| q)
        .map_err(|e| OaiError::new(StatusCode::BAD_REQUEST, e.body_text()).code("invalid_query"))
}

/// One page of a ZSET index by score (created time), after the member `after`: the ids and
/// whether more follow. Single-key commands only (the indexes are global keys).
pub(crate) async fn page_of(
    state: &AppState,
    index: &str,
    after: Option<&str>,
    limit: usize,
    newest_first: bool,
) -> Result<(Vec<String>, bool), OaiError> {
    let mut conn = dl(state.broker.redis().conn()).await?;
    let start: isize = match after {
        None => 0,
        Some(a) => {
            let rank: Option<isize> =
                dl(redis::cmd(if newest_first { "ZREVRANK" } else { "ZRANK" })
                    .arg(index)
                    .arg(a)
                    .query_async(&mut conn))
                .await?;
            match rank {
                Some(r) => r + 1,
                // an id that is gone (deleted, expired): nothing after it can be placed
                None => return Ok((Vec::new(), false)),
            }
        }
    };
    let stop = start + limit as isize; // one more than asked: is there a next page?
    let mut ids: Vec<String> = dl(
        redis::cmd(if newest_first { "ZREVRANGE" } else { "ZRANGE" })
            .arg(index)
            .arg(start)
            .arg(stop)
            .query_async(&mut conn),
    )
    .await?;
    let more = ids.len() > limit;
    ids.truncate(limit);
    Ok((ids, more))
}

/// OpenAI's list shape: `{object: "list", data, first_id, last_id, has_more}`.
pub(crate) fn list_page(data: Vec<serde_json::Value>, more: bool) -> axum::response::Response {
    use axum::response::IntoResponse;
    let first = data.first().map(|d| d["id"].clone()).unwrap_or_default();
    let last = data.last().map(|d| d["id"].clone()).unwrap_or_default();
    axum::Json(serde_json::json!({
        "object": "list",
        "data": data,
        "first_id": first,
        "last_id": last,
        "has_more": more,
    }))
    .into_response()
}

/// The loop of every api replica: drives the live batches that need it and collects what
/// expired. Ends with `stop`.
pub async fn run(state: AppState, stop: CancellationToken) {
    let mut last_gc = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        if let Err(e) = batches::tick(&state).await {
            tracing::debug!(error = %e.message, "batch loop failed; next round retries");
        }
        if last_gc.elapsed() >= GC_EVERY {
            last_gc = tokio::time::Instant::now();
            if let Err(e) = files::gc(&state).await {
                tracing::debug!(error = %e.message, "file collection failed; next round retries");
            }
            if let Err(e) = batches::gc(&state).await {
                tracing::debug!(error = %e.message, "batch index collection failed; next round retries");
            }
        }
    }
}
