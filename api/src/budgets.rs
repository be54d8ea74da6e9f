//! `/v1/budgets/{scope}` (PUT, GET, DELETE), `GET /v1/budgets` and `GET /v1/usage`: dollar
//! budgets the workers enforce before every LLM call (`common/src/flow/budget.rs`), and the spend
//! report by agent, queue or model.

use agentq_common::flow::budget::{parse_window, validate_scope, BudgetBody, MAX_BUDGETS};
use agentq_common::time::now_ms;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::routes::{deadline, json_body};
use crate::AppState;

fn scope_of(scope: &str) -> Result<(), ApiError> {
    validate_scope(scope).map_err(|e| ApiError::invalid(e.field, e.message))
}

pub async fn put(
    State(state): State<AppState>,
    Path(scope): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    scope_of(&scope)?;
    let req: BudgetBody = json_body(&headers, body)?;
    let budget = req
        .validate(&scope)
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    let created = deadline(state.budgets.put(&budget)).await?.map_err(|e| {
        ApiError::new(StatusCode::CONFLICT, "too_many_budgets", e.message).field(e.field)
    })?;
    let view = deadline(state.budgets.view_of(&budget, now_ms())).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

pub async fn get(
    State(state): State<AppState>,
    Path(scope): Path<String>,
) -> Result<Response, ApiError> {
    scope_of(&scope)?;
    match deadline(state.budgets.view(&scope, now_ms())).await? {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::not_found("budget")),
    }
}

pub async fn delete(
    State(state): State<AppState>,
    Path(scope): Path<String>,
) -> Result<Response, ApiError> {
    scope_of(&scope)?;
    if deadline(state.budgets.delete(&scope)).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("budget"))
    }
}

pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let all = deadline(state.budgets.all()).await?;
    let now = now_ms();
    let mut views = Vec::with_capacity(all.len().min(MAX_BUDGETS));
    for b in &all {
        views.push(deadline(state.budgets.view_of(b, now)).await?);
    }
    Ok(Json(json!({ "budgets": views })).into_response())
}

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    group_by: Option<String>,
    window: Option<String>,
}

pub async fn usage(
    State(state): State<AppState>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let group_by = q.group_by.unwrap_or_else(|| "model".to_owned());
    if !matches!(group_by.as_str(), "agent" | "queue" | "model") {
        return Err(ApiError::invalid(
            "group_by",
            "must be agent, queue or model",
        ));
    }
    let window = q.window.unwrap_or_else(|| "1h".to_owned());
    let secs = parse_window(&window).ok_or_else(|| {
        ApiError::invalid(
            "window",
            "must be a whole number of minutes, hours or days (e.g. 15m, 1h, 7d), from 1m to 30d",
        )
    })?;
    let rows = deadline(state.budgets.usage(&group_by, secs, now_ms())).await?;
    let total: f64 = rows.iter().map(|r| r.cost_usd).sum();
    Ok(Json(json!({
        "group_by": group_by,
        "window": window,
        "total_cost_usd": total,
        "groups": rows,
    }))
    .into_response())
}

/// Refreshes the budget gauges for `/metrics`.
pub async fn refresh_gauges(state: &AppState) -> Result<(), redis::RedisError> {
    let all = state.budgets.all().await?;
    let m = &state.metrics;
    m.budget_limit.reset();
    m.budget_spent.reset();
    m.budget_reserved.reset();
    let now = now_ms();
    for b in &all {
        let v = state.budgets.view_of(b, now).await?;
        m.budget_limit
            .with_label_values(&[&b.scope])
            .set(v.limit_usd);
        m.budget_spent
            .with_label_values(&[&b.scope])
            .set(v.spent_usd);
        m.budget_reserved
            .with_label_values(&[&b.scope])
            .set(v.reserved_usd);
    }
    Ok(())
}
