//! `GET /v1/tasks`: the newest tasks of a queue, filtered by status and agent, a page at a time
//! (the web console's task search; `common/src/queue/recent.rs`). A tenant sees only its own tasks,
//! the admin everyone's, like every other read.

use agentq_common::keys::TaskId;
use agentq_common::queue::RecentFilter;
use agentq_common::task::{valid_name, Status};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::{deadline, undeclared};
use crate::AppState;

/// Most tasks one page holds.
pub const MAX_PAGE: usize = 200;
const DEFAULT_PAGE: usize = 50;

/// Every parameter as text, so a bad value is a 422 naming its own field (not a generic
/// query-string error).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    queue: Option<String>,
    status: Option<String>,
    agent: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let queue = q
        .queue
        .unwrap_or_else(|| state.config.default_queue.clone());
    if !state.config.declares(&queue) {
        return Err(undeclared(&queue));
    }
    // an empty value is refused like any other that names nothing (the console leaves a blank
    // filter out of the query)
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "status",
                "must be one of queued, running, retrying, requires_action, succeeded, failed, cancelled",
            )
        })?),
    };
    let agent = match q.agent.as_deref() {
        None => None,
        Some(a) if valid_name(a) => Some(a),
        Some(_) => {
            return Err(ApiError::invalid(
                "agent",
                "must be 1 to 128 characters of [A-Za-z0-9_.:/-]",
            ))
        }
    };
    let limit = match q.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("must be a number from 1 to {MAX_PAGE}"),
                ))
            }
        },
    };
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(c) => match TaskId::parse(c) {
            Ok(id) if id.queue() == queue => Some(id.to_string()),
            _ => {
                return Err(ApiError::invalid(
                    "cursor",
                    "must be the next_cursor of an earlier page of this queue",
                ))
            }
        },
    };
    let filter = RecentFilter {
        owner: if caller.is_admin() {
            None
        } else {
            Some(caller.tenant())
        },
        agent,
        status,
    };
    let page = deadline(
        state
            .broker
            .recent_tasks(&queue, &filter, cursor.as_deref(), limit),
    )
    .await?;
    Ok(Json(json!({
        "queue": queue,
        "tasks": page.tasks,
        "next_cursor": page.next_cursor,
    }))
    .into_response())
}
