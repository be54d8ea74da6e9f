//! `/v1/workflows`: submit a graph of tasks, read its state, cancel it (`common/src/graph`).

use agentq_common::graph::{CreateWorkflow, WorkflowCancel, MAX_NODES};
use agentq_common::keys::TaskId;
use agentq_common::queue::Enqueued;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::{deadline, idempotency_key, json_body, register_queue, undeclared};
use crate::AppState;

fn parse_workflow_id(raw: &str) -> Result<TaskId, ApiError> {
    TaskId::parse(raw).map_err(|_| ApiError::not_found("workflow"))
}

/// `POST /v1/workflows`: every node and the graph are checked first (422 naming the node and
/// field, nothing written); then the workflow and all its node tasks are written in one script
/// and the nodes without parents are queued.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let idem = idempotency_key(&headers)?
        .map(|k| agentq_common::tenant::idempotency_key(caller.tenant(), &k).into_owned());
    let req: CreateWorkflow = json_body(&headers, body)?;
    let mut wf = req
        .validate(
            &state.config.default_queue,
            state.config.common.max_attempts,
        )
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    if !state.config.declares(&wf.queue) {
        return Err(undeclared(&wf.queue));
    }
    for (i, n) in wf.nodes.iter().enumerate() {
        let at = |e: agentq_common::task::FieldError| {
            ApiError::invalid(format!("nodes[{i}].{}", e.field), e.message)
        };
        n.task.check_models(&state.config.upstreams).map_err(at)?;
        n.task.check_steps(state.config.max_steps_cap).map_err(at)?;
        n.task.check_mcp(&state.config.mcp).map_err(at)?;
    }
    debug_assert!(wf.nodes.len() <= MAX_NODES);
    // every node (and the plans' children, which inherit it) belongs to the caller's tenant
    for n in &mut wf.nodes {
        n.task.payload.tenant = caller.tenant().map(str::to_owned);
    }
    crate::tenants::admit(&state, &caller).await?;
    let ttl = state.config.common.result_ttl;
    let (id, outcome) = deadline(state.broker.create_workflow(&wf, idem.as_deref(), ttl)).await?;
    let status = match outcome {
        Enqueued::Created => {
            state
                .metrics
                .enqueued
                .with_label_values(&[&wf.queue])
                .inc_by(wf.nodes.len() as u64);
            register_queue(&state, &wf.queue).await;
            tracing::info!(workflow = %id, nodes = wf.nodes.len(), "workflow accepted");
            "running".to_owned()
        }
        Enqueued::OverQuota { pending } => {
            return Err(crate::routes::over_pending(&state, pending))
        }
        Enqueued::Existing => {
            let current = match TaskId::parse(&id) {
                Ok(wid) => deadline(state.broker.workflow(&wid))
                    .await?
                    .map(|v| v.status),
                Err(_) => None,
            };
            current
                .map_or("running", agentq_common::graph::WorkflowStatus::as_str)
                .to_owned()
        }
    };
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": status})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/workflows/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if outcome == Enqueued::Existing {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// `GET /v1/workflows/{id}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_workflow_id(&raw)?;
    owner_check(&state, &caller, &id).await?;
    match deadline(state.broker.workflow(&id)).await? {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::not_found("workflow")),
    }
}

/// `DELETE /v1/workflows/{id}`: every node not final is cancelled; workers running one drop
/// its call (the `cancels` channel).
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_workflow_id(&raw)?;
    owner_check(&state, &caller, &id).await?;
    match deadline(
        state
            .broker
            .cancel_workflow(&id, state.config.common.result_ttl),
    )
    .await?
    {
        WorkflowCancel::Cancelled => {
            Ok(Json(json!({"id": raw, "status": "cancelled"})).into_response())
        }
        WorkflowCancel::NotFound => Err(ApiError::not_found("workflow")),
        WorkflowCancel::AlreadyFinished(s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("workflow already {}", s.as_str()),
        )
        .field("id")),
    }
}

/// 404 unless the workflow exists and belongs to the caller's tenant (the admin sees all).
async fn owner_check(state: &AppState, caller: &Caller, id: &TaskId) -> Result<(), ApiError> {
    let key = state.broker.keys(id.queue()).workflow(&id.to_string());
    crate::events::owned(state, caller, &key, "workflow").await
}
