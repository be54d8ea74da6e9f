//! `POST /v1/tasks/{id}/tool_outputs`: a client answers the tool calls a `requires_action` task
//! waits for, and the task is queued again to continue its conversation.

use agentq_common::chat::{Content, Message, Role, ToolCall};
use agentq_common::queue::Resumed;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::routes::{deadline, json_body, parse_id};
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ToolOutputs {
    tool_outputs: Vec<ToolOutput>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolOutput {
    tool_call_id: String,
    output: String,
}

pub(crate) async fn submit_tool_outputs(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    crate::routes::check_task(&state, &caller, &id).await?;
    let req: ToolOutputs = json_body(&headers, body)?;
    let keys = state.broker.keys(id.queue());
    let (status, pending) =
        deadline(state.broker.pending_tool_calls(&keys, &id.to_string())).await?;
    let Some(status) = status else {
        return Err(ApiError::not_found("task"));
    };
    let (Some(pending), "requires_action") = (pending, status.as_str()) else {
        return Err(not_waiting(&status));
    };
    let calls: Vec<ToolCall> = serde_json::from_str(&pending).unwrap_or_default();
    let messages = answer(&calls, &req.tool_outputs)?;
    match deadline(
        state
            .broker
            .resume(&keys, &id.to_string(), &pending, &messages),
    )
    .await?
    {
        Resumed::Queued => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": raw, "status": "queued"})),
        )
            .into_response()),
        Resumed::Missing => Err(ApiError::not_found("task")),
        Resumed::Changed => Err(not_waiting("queued")),
        Resumed::NotWaiting(s) => Err(not_waiting(&s)),
    }
}

fn not_waiting(status: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_waiting",
        format!("the task is {status}, not waiting for tool outputs"),
    )
    .field("id")
}

/// The tool messages answering `calls`, in the calls' order: each call answered exactly once,
/// no output for a call the task does not wait for.
fn answer(calls: &[ToolCall], outputs: &[ToolOutput]) -> Result<Vec<String>, ApiError> {
    for (i, o) in outputs.iter().enumerate() {
        if !calls.iter().any(|c| c.id == o.tool_call_id) {
            return Err(ApiError::invalid(
                format!("tool_outputs[{i}].tool_call_id"),
                format!("{:?} is not a call the task waits for", o.tool_call_id),
            ));
        }
        if outputs[..i]
            .iter()
            .any(|p| p.tool_call_id == o.tool_call_id)
        {
            return Err(ApiError::invalid(
                format!("tool_outputs[{i}].tool_call_id"),
                format!("{:?} is answered twice", o.tool_call_id),
            ));
        }
    }
    let missing: Vec<&str> = calls
        .iter()
        .filter(|c| !outputs.iter().any(|o| o.tool_call_id == c.id))
        .map(|c| c.id.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::invalid(
            "tool_outputs",
            format!("every call needs an output; missing: {missing:?}"),
        ));
    }
    Ok(calls
        .iter()
        .filter_map(|c| {
            let o = outputs.iter().find(|o| o.tool_call_id == c.id)?;
            // an empty output is a valid answer, but providers refuse empty content
            let text = if o.output.is_empty() {
                "(no output)".to_owned()
            } else {
                o.output.clone()
            };
            serde_json::to_string(&Message {
                role: Role::Tool,
                content: Some(Content::Text(text)),
                name: None,
                tool_calls: None,
                tool_call_id: Some(c.id.clone()),
            })
            .ok()
        })
        .collect())
}
