//! `/v1/budgets/{scope}` (PUT, GET, DELETE), `GET /v1/budgets` and `GET /v1/usage`: dollar
//! budgets the workers enforce before every LLM call (`common/src/flow/budget.rs`), and the spend
//! report by agent, queue, model or tenant.
//!
//! Per tenant: a tenant names plain scopes (`global`, `queue:<q>`, `agent:<a>`, `model:<m>`) and
//! acts on its own budgets, stored as `<tenant>~<scope>` and shown as it wrote them; it may read
//! its spend quota `tenant:<id>` (set by the admin through the tenant's `quotas.budget`) but not
//! change it, and never sees the operator's or another tenant's budgets (404, exactly as a budget
//! that does not exist). The admin (and everyone with auth off) sees and manages every budget
//! under its stored name.

use agentq_common::flow::budget::{
    parse_window, split_tenant_scope, tenant_scope, validate_plain_scope, validate_scope,
    BudgetBody, BudgetView, UsageView, MAX_BUDGETS,
};
use agentq_common::time::now_ms;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::{deadline, json_body};
use crate::AppState;

/// What a request does with a budget: a tenant may read its quota but change only its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// Where the budget the caller names as `scope` is stored, or why the caller may not name it.
fn stored_scope(caller: &Caller, scope: &str, access: Access) -> Result<String, ApiError> {
    let Some(tenant) = caller.tenant() else {
        validate_scope(scope).map_err(|e| ApiError::invalid(e.field, e.message))?;
        return Ok(scope.to_owned());
    };
    if scope.starts_with("tenant:") || scope.contains('~') {
        // the tenant's own quota is readable; any other quota, or a name in some tenant's
        // namespace, is not there for this caller (reads) or not its to change (writes)
        return match access {
            Access::Read if scope.strip_prefix("tenant:") == Some(tenant) => Ok(scope.to_owned()),
            Access::Read => Err(ApiError::not_found("budget")),
            Access::Write => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a tenant's budgets are global, queue:<name>, agent:<agent_id> or model:<model>; \
                 tenant:<id> is the tenant's quota, set by the admin",
            )
            .field("scope")),
        };
    }
    validate_plain_scope(scope).map_err(|e| ApiError::invalid(e.field, e.message))?;
    Ok(tenant_scope(tenant, scope))
}

/// `v` as the caller names it: a tenant's own budgets without their namespace.
fn shown(caller: &Caller, mut v: BudgetView) -> BudgetView {
    if let Some(tenant) = caller.tenant() {
        if let Some((t, inner)) = split_tenant_scope(&v.scope) {
            if t == tenant {
                v.scope = inner.to_owned();
            }
        }
    }
    v
}

/// Whether the caller sees the budget stored under `scope`.
fn visible(caller: &Caller, scope: &str) -> bool {
    match caller.tenant() {
        None => true,
        Some(t) => {
            split_tenant_scope(scope).is_some_and(|(owner, _)| owner == t)
                || scope.strip_prefix("tenant:") == Some(t)
        }
    }
}

pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path(scope): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let stored = stored_scope(&caller, &scope, Access::Write)?;
    let req: BudgetBody = json_body(&headers, body)?;
    let budget = req
        .validate(&stored)
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    if let Some(id) = stored.strip_prefix("tenant:") {
        // one quota per tenant that exists: the admin cannot grow the table past the tenant count
        if state.auth.tenants.get(&state, id).await?.is_none() {
            return Err(ApiError::not_found("tenant").field("scope"));
        }
    }
    let created = deadline(state.budgets.put(&budget)).await?.map_err(|e| {
        ApiError::new(StatusCode::CONFLICT, "too_many_budgets", e.message).field(e.field)
    })?;
    let view = deadline(state.budgets.view_of(&budget, now_ms())).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(shown(&caller, view))).into_response())
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(scope): Path<String>,
) -> Result<Response, ApiError> {
    let stored = stored_scope(&caller, &scope, Access::Read)?;
    match deadline(state.budgets.view(&stored, now_ms())).await? {
        Some(v) => Ok(Json(shown(&caller, v)).into_response()),
        None => Err(ApiError::not_found("budget")),
    }
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(scope): Path<String>,
) -> Result<Response, ApiError> {
    let stored = stored_scope(&caller, &scope, Access::Write)?;
    if deadline(state.budgets.delete(&stored)).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("budget"))
    }
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let all = deadline(state.budgets.all()).await?;
    let now = now_ms();
    let mut views = Vec::with_capacity(all.len().min(MAX_BUDGETS));
    for b in all.iter().filter(|b| visible(&caller, &b.scope)) {
        views.push(shown(
            &caller,
            deadline(state.budgets.view_of(b, now)).await?,
        ));
    }
    // a tenant's names lost their namespace: sort them as it sees them
    views.sort_by(|a, b| a.scope.cmp(&b.scope));
    Ok(Json(json!({ "budgets": views })).into_response())
}

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    group_by: Option<String>,
    window: Option<String>,
}

pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let group_by = q.group_by.unwrap_or_else(|| "model".to_owned());
    let view = match caller.tenant() {
        None => UsageView::Fleet,
        Some(t) => UsageView::Tenant(t),
    };
    match (group_by.as_str(), view) {
        ("agent" | "queue" | "model", _) | ("tenant", UsageView::Fleet) => {}
        ("tenant", UsageView::Tenant(_)) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "group_by tenant is the admin's: a tenant's report covers its own calls only",
            )
            .field("group_by"))
        }
        _ => {
            return Err(ApiError::invalid(
                "group_by",
                "must be agent, queue, model or tenant",
            ))
        }
    }
    let window = q.window.unwrap_or_else(|| "1h".to_owned());
    let secs = parse_window(&window).ok_or_else(|| {
        ApiError::invalid(
            "window",
            "must be a whole number of minutes, hours or days (e.g. 15m, 1h, 7d), from 1m to 30d",
        )
    })?;
    let rows = deadline(state.budgets.usage(view, &group_by, secs, now_ms())).await?;
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
