//! Issue 18 (tenancy) for budgets and usage, end to end with auth on: a tenant's own budgets bind
//! only its calls (its agent `bot` is not another tenant's `bot`, and agents' memories are per
//! tenant too), a tenant's spend quota (`quotas.budget`, set by the admin) stops its tasks and
//! then its submissions, and tenants see and manage only their own budgets and usage while the
//! admin sees everything; with a private redis-server, the api and worker binaries and the mock.
//!
//! Prices as in `budgets.rs`: a mock token costs a tenth of a cent, the mock's usage is the words
//! of the messages (prompt) and 1 + the words of the prompt (completion), and the worker sends
//! `max_tokens` 10, so a call's hold is the prompt's estimate plus 10 tokens.

use std::time::{Duration, Instant};

use agentq_tests::{assert_no_panic, metric, MockConfig, Stack, ADMIN_TOKEN};
use anyhow::{bail, ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

const PRICES: &str = r#"{"m": {"prompt": 1000, "completion": 1000}}"#;
const TOKEN_USD: f64 = 0.001;
const EPS: f64 = 1e-9;

async fn stack(memory_messages: &str) -> Result<Stack> {
    let mut s = Stack::new(MockConfig {
        record: true,
        ..MockConfig::default()
    })
    .await?;
    s.env.insert("AGENTQ_MODEL".into(), "m".into());
    s.env.insert("AGENTQ_PRICES".into(), PRICES.into());
    s.env.insert("AGENTQ_MAX_TOKENS".into(), "10".into());
    s.env
        .insert("AGENTQ_MEMORY_MESSAGES".into(), memory_messages.into());
    s.start_api_auth(&[]).await?;
    Ok(s)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn field(v: &Value) -> &str {
    v["error"]["field"].as_str().unwrap_or("")
}

async fn submit_as(s: &Stack, token: &str, body: &Value) -> Result<String> {
    let (st, v) = s
        .send_as(token, Method::POST, "/v1/tasks", Some(body))
        .await?;
    ensure!(st == 202, "POST /v1/tasks answered {st}: {v}");
    v["id"]
        .as_str()
        .map(str::to_owned)
        .context("202 without an id")
}

/// `METHOD /v1/budgets/{scope}` as `token`.
async fn budget_as(
    s: &Stack,
    token: &str,
    method: Method,
    scope: &str,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    s.send_as(token, method, &format!("/v1/budgets/{scope}"), body)
        .await
}

/// The scopes `GET /v1/budgets` shows `token`, in order.
async fn listed(s: &Stack, token: &str) -> Result<Vec<String>> {
    let (st, v) = s.send_as(token, Method::GET, "/v1/budgets", None).await?;
    ensure!(st == 200, "GET /v1/budgets: {st} {v}");
    Ok(v["budgets"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|x| x["scope"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// A one-message call's hold: the worker's prompt estimate (a token per 3 bytes, 3 per message
/// plus the role, 3 to prime the reply) and the output cap of 10, at $0.001 a token.
fn worst_case(prompt: &str) -> f64 {
    ((prompt.len() as f64 / 3.0).ceil() + 4.0 + 3.0 + 10.0) * TOKEN_USD
}

/// `group_by` → {key: calls} of `GET /v1/usage` as `token`.
async fn usage_calls(
    s: &Stack,
    token: &str,
    group_by: &str,
) -> Result<(Value, Vec<(String, u64)>)> {
    let (st, v) = s
        .send_as(
            token,
            Method::GET,
            &format!("/v1/usage?group_by={group_by}&window=1h"),
            None,
        )
        .await?;
    ensure!(st == 200, "GET /v1/usage: {st} {v}");
    let mut rows: Vec<(String, u64)> = v["groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .map(|r| {
                    (
                        r["key"].as_str().unwrap_or("").to_owned(),
                        r["calls"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort();
    Ok((v, rows))
}

fn rows(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = pairs.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect();
    v.sort();
    v
}

/// Tenant A's `agent:bot` budget stops A's runaway agent (every result enqueues a follow-up)
/// at the call whose hold would pass it, with no overspend (the hold is a true bound here),
/// while tenant B's agent `bot` runs on: the operator's `agent:bot` does not bind tenants'
/// agents, A's budget is not B's, and neither are A's bot's memories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_agent_budget_stops_its_runaway_agent_and_not_another_tenants() -> Result<()> {
    let mut s = stack("4").await?;
    let a = s.tenant(&json!({"id": "a"})).await?;
    let b = s.tenant(&json!({"id": "b"})).await?;
    // the operator's agent:bot would refuse any call: it binds only the default tenant's bot
    let (st, v) = budget_as(
        &s,
        ADMIN_TOKEN,
        Method::PUT,
        "agent:bot",
        Some(&json!({"limit_usd": 0.000001, "window": "1h"})),
    )
    .await?;
    assert_eq!(st, 201, "{v}");
    let limit = 0.2;
    let (st, v) = budget_as(
        &s,
        &a,
        Method::PUT,
        "agent:bot",
        Some(&json!({"limit_usd": limit, "window": "1h"})),
    )
    .await?;
    assert_eq!((st, v["scope"].clone()), (201, json!("agent:bot")), "{v}");
    let (st, v) = budget_as(&s, ADMIN_TOKEN, Method::GET, "a~agent:bot", None).await?;
    assert_eq!((st, f(&v["limit_usd"])), (200, limit), "{v}");
    let w = s.start_worker(&[]).await?;

    // A's bot learns a name; B's bot of the same name must never hear it
    let intro = submit_as(
        &s,
        &a,
        &json!({"prompt": "my name is Ada", "agent_id": "bot"}),
    )
    .await?;
    let intro = s.wait_final_as(&a, &intro).await?;
    assert_eq!(intro["status"], "succeeded", "{intro}");
    let mut a_done = vec![intro];
    let mut b_done = Vec::new();
    let mut stopped = None;
    for step in 0..100 {
        let id = submit_as(
            &s,
            &a,
            &json!({"prompt": format!("step {step:03} of the loop"), "agent_id": "bot"}),
        )
        .await?;
        let t = s.wait_final_as(&a, &id).await?;
        // B's bot, interleaved, under no budget of B's
        let bid = submit_as(
            &s,
            &b,
            &json!({"prompt": format!("other {step:03} goes on"), "agent_id": "bot"}),
        )
        .await?;
        let bt = s.wait_final_as(&b, &bid).await?;
        assert_eq!(bt["status"], "succeeded", "B's bot was stopped: {bt}");
        b_done.push(bt);
        if t["status"] == "succeeded" {
            a_done.push(t);
            continue;
        }
        stopped = Some(t);
        break;
    }
    let stopped = stopped.context("A's loop was never stopped")?;
    assert_eq!(
        (
            stopped["status"].clone(),
            stopped["error_code"].clone(),
            stopped["attempts"].clone()
        ),
        (json!("failed"), json!("budget_exceeded"), json!(1)),
        "{stopped}"
    );
    assert!(stopped.get("cost").is_none(), "no call: {stopped}");
    let error = stopped["error"].as_str().unwrap_or("");
    assert!(
        error.contains("budget agent:bot "),
        "named as A named it: {stopped}"
    );
    // B's bot runs on after A's stopped
    for i in 0..3 {
        let bid = submit_as(
            &s,
            &b,
            &json!({"prompt": format!("still going {i}"), "agent_id": "bot"}),
        )
        .await?;
        let bt = s.wait_final_as(&b, &bid).await?;
        assert_eq!(bt["status"], "succeeded", "{bt}");
        b_done.push(bt);
    }
    // every call but the refused one was made
    assert_eq!(
        s.mock.total_calls(),
        (a_done.len() + b_done.len()) as u64,
        "mock calls"
    );
    let spent: f64 = a_done.iter().map(|t| f(&t["cost"])).sum();
    let (st, bud) = budget_as(&s, &a, Method::GET, "agent:bot", None).await?;
    assert_eq!(st, 200, "{bud}");
    println!(
        "tenant a's runaway bot: {} calls, ${spent:.6} of ${limit}; refused: {error}",
        a_done.len()
    );
    assert!((f(&bud["spent_usd"]) - spent).abs() < EPS, "{bud}");
    assert!(f(&bud["reserved_usd"]).abs() < EPS, "no hold left: {bud}");
    // the refused call's hold (its prompt carries the bot's memory) is in the message
    let hold: f64 = error
        .rsplit_once("may cost up to $")
        .and_then(|(_, x)| x.trim().parse().ok())
        .context("the refusal names the call's hold")?;
    assert!(spent <= limit + EPS, "overspent: ${spent} of ${limit}");
    assert!(
        spent + hold > limit,
        "stopped early: ${spent} + ${hold} fits ${limit}"
    );
    // the operator's agent:bot was held against by no tenant's call
    let (_, op) = budget_as(&s, ADMIN_TOKEN, Method::GET, "agent:bot", None).await?;
    assert_eq!(f(&op["spent_usd"]), 0.0, "{op}");
    // memories: A's bot recalled Ada, B's bot never heard of her
    let records = s.mock.request_records();
    let a_recalls = records
        .iter()
        .find(|r| r.prompt == "step 000 of the loop")
        .context("A's first step reached the mock")?;
    assert!(
        a_recalls.body.to_string().contains("Ada"),
        "A's bot forgot: {}",
        a_recalls.body
    );
    let b_calls: Vec<_> = records
        .iter()
        .filter(|r| r.prompt.starts_with("other ") || r.prompt.starts_with("still going"))
        .collect();
    assert_eq!(b_calls.len(), b_done.len());
    for r in &b_calls {
        assert!(
            !r.body.to_string().contains("Ada") && !r.body.to_string().contains("of the loop"),
            "B's bot saw A's memory: {}",
            r.body
        );
    }
    // B's own memory works: its later calls carry its earlier ones
    let later = b_calls
        .iter()
        .find(|r| r.prompt == "still going 0")
        .context("B's call after the loop")?;
    assert!(later.body.to_string().contains("goes on"), "{}", later.body);
    // the per-agent cost series are the tenants' agents, apart
    let m = w.metrics().await?;
    let series = |agent: &str| {
        metric(
            &m,
            &format!("agentq_agent_cost_dollars_total{{agent=\"{agent}\"}}"),
        )
    };
    assert!((series("a~bot") - spent).abs() < 1e-6, "{m}");
    assert!(series("b~bot") > 0.0 && series("bot") == 0.0, "{m}");
    assert_no_panic(&s);
    Ok(())
}

/// A tenant's spend quota (`quotas.budget`, budget `tenant:<id>`): the tenant reads it but cannot
/// change it; it stops the tenant's tasks (`budget_exceeded`, the call not made), and once it is
/// spent the api refuses the tenant's submissions with 429 before anything is written. Other
/// tenants are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_spend_quota_stops_its_tasks_and_then_its_submissions() -> Result<()> {
    let mut s = stack("0").await?;
    let limit = 0.035;
    let q = s
        .tenant(&json!({"id": "q", "quotas": {"budget": {"limit_usd": limit, "window": "1h"}}}))
        .await?;
    let other = s.tenant(&json!({"id": "r"})).await?;
    let (st, v) = budget_as(&s, ADMIN_TOKEN, Method::GET, "tenant:q", None).await?;
    assert_eq!((st, f(&v["limit_usd"])), (200, limit), "{v}");
    let (st, v) = budget_as(&s, &q, Method::GET, "tenant:q", None).await?;
    assert_eq!((st, v["scope"].clone()), (200, json!("tenant:q")), "{v}");
    for m in [Method::PUT, Method::DELETE] {
        let body = json!({"limit_usd": 100, "window": "1h"});
        let (st, v) = budget_as(&s, &q, m.clone(), "tenant:q", Some(&body)).await?;
        assert_eq!((st, field(&v)), (403, "scope"), "{m} {v}");
    }
    // 20 one-letter words: the hold (30 tokens, $0.030) fits the quota, but the mock answers
    // with 21 completion tokens, past the output cap of 10: the call costs $0.041 (overspend
    // by this call's underestimate, the documented bound), and nothing fits after it
    let words = |c: char| vec![c.to_string(); 20].join(" ");
    let (p1, p2) = (words('x'), words('y'));
    assert!(worst_case(&p1) <= limit && 2.0 * worst_case(&p1) > limit);
    let t1 = submit_as(&s, &q, &json!({"prompt": p1})).await?;
    let t2 = submit_as(&s, &q, &json!({"prompt": p2})).await?;
    let _w = s.start_worker(&[("AGENTQ_CONCURRENCY", "1")]).await?;
    let done = [
        s.wait_final_as(&q, &t1).await?,
        s.wait_final_as(&q, &t2).await?,
    ];
    let ok: Vec<&Value> = done.iter().filter(|t| t["status"] == "succeeded").collect();
    let refused: Vec<&Value> = done.iter().filter(|t| t["status"] == "failed").collect();
    assert_eq!((ok.len(), refused.len()), (1, 1), "{done:?}");
    assert_eq!(
        refused[0]["error_code"], "budget_exceeded",
        "{}",
        refused[0]
    );
    assert!(
        refused[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("tenant:q"),
        "{}",
        refused[0]
    );
    assert_eq!(s.mock.total_calls(), 1, "the refused call was not made");
    let cost = f(&ok[0]["cost"]);
    assert!((cost - 0.041).abs() < EPS, "{}", ok[0]);
    let (_, v) = budget_as(&s, &q, Method::GET, "tenant:q", None).await?;
    assert!((f(&v["spent_usd"]) - cost).abs() < EPS, "{v}");
    assert!(
        cost - limit <= worst_case(&p1) + EPS,
        "overspend past one call's hold"
    );
    // spent: the api refuses the next submission before writing anything
    let (_, before) = s
        .send_as(ADMIN_TOKEN, Method::GET, "/v1/queues/default", None)
        .await?;
    let r = s
        .http
        .post(format!("{}/v1/tasks", s.api_url))
        .bearer_auth(&q)
        .json(&json!({"prompt": "one more"}))
        .send()
        .await?;
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").cloned();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!((status, code(&v)), (429, "budget_exceeded"), "{v}");
    assert!(retry_after.is_some(), "429 without Retry-After");
    let (_, after) = s
        .send_as(ADMIN_TOKEN, Method::GET, "/v1/queues/default", None)
        .await?;
    assert_eq!(
        (before["pending"].clone(), before["dead"].clone()),
        (after["pending"].clone(), after["dead"].clone()),
        "written: {before} -> {after}"
    );
    // another tenant's tasks run
    let id = submit_as(&s, &other, &json!({"prompt": "unaffected"})).await?;
    let t = s.wait_final_as(&other, &id).await?;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(s.mock.total_calls(), 2);
    assert_no_panic(&s);
    Ok(())
}

/// Tenants see and manage only their own budgets (under the names they gave them) and usage;
/// the admin sees every budget under its stored name and the usage of the whole fleet, by
/// tenant too. The usage report's call counts match the mock's call log exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_and_manage_only_their_own_budgets_and_usage() -> Result<()> {
    let mut s = stack("0").await?;
    let a = s
        .tenant(&json!({"id": "a", "quotas": {"budget": {"limit_usd": 5, "window": "1d"}}}))
        .await?;
    let b = s.tenant(&json!({"id": "b"})).await?;
    let body = |usd: f64| json!({"limit_usd": usd, "window": "1h"});
    let put = |tok: &str, scope: &str, usd: f64| {
        let (tok, scope, body) = (tok.to_owned(), scope.to_owned(), body(usd));
        let s = &s;
        async move { budget_as(s, &tok, Method::PUT, &scope, Some(&body)).await }
    };
    let (st, v) = put(ADMIN_TOKEN, "global", 100.0).await?;
    assert_eq!(st, 201, "{v}");
    for (scope, usd) in [("agent:bot", 1.0), ("global", 2.0)] {
        let (st, v) = put(&b, scope, usd).await?;
        assert_eq!((st, v["scope"].clone()), (201, json!(scope)), "{v}");
    }
    // neither the operator's budgets nor B's are there for A
    for scope in ["agent:bot", "global"] {
        let (st, v) = budget_as(&s, &a, Method::GET, scope, None).await?;
        assert_eq!((st, code(&v)), (404, "not_found"), "{scope}: {v}");
    }
    // A's agent:bot is A's own: B's stays as it was
    let (st, v) = put(&a, "agent:bot", 3.0).await?;
    assert_eq!((st, v["scope"].clone()), (201, json!("agent:bot")), "{v}");
    let (_, v) = budget_as(&s, &b, Method::GET, "agent:bot", None).await?;
    assert_eq!(f(&v["limit_usd"]), 1.0, "{v}");
    // B's namespace and the tenant quotas: not A's to read (404, as if absent) or change (403)
    for scope in ["b~agent:bot", "b~global", "tenant:b", "b~agent:none"] {
        let (st, v) = budget_as(&s, &a, Method::GET, scope, None).await?;
        assert_eq!((st, code(&v)), (404, "not_found"), "GET {scope}: {v}");
        for m in [Method::PUT, Method::DELETE] {
            let (st, v) = budget_as(&s, &a, m.clone(), scope, Some(&body(9.0))).await?;
            assert_eq!((st, field(&v)), (403, "scope"), "{m} {scope}: {v}");
        }
    }
    for m in [Method::PUT, Method::DELETE] {
        let (st, v) = budget_as(&s, &a, m.clone(), "tenant:a", Some(&body(9.0))).await?;
        assert_eq!((st, field(&v)), (403, "scope"), "{m} tenant:a: {v}");
    }
    let (_, v) = budget_as(&s, &b, Method::GET, "agent:bot", None).await?;
    assert_eq!(f(&v["limit_usd"]), 1.0, "unchanged by A: {v}");
    let (_, v) = budget_as(&s, ADMIN_TOKEN, Method::GET, "tenant:b", None).await?;
    assert_eq!(code(&v), "not_found", "B has no quota: {v}");
    // a tenant's mistakes name the field like the admin's
    let (st, v) = put(&a, "team:x", 1.0).await?;
    assert_eq!((st, field(&v)), (422, "scope"), "{v}");
    let (st, v) = budget_as(
        &s,
        &a,
        Method::PUT,
        "agent:bot",
        Some(&json!({"limit_usd": -1, "window": "1h"})),
    )
    .await?;
    assert_eq!((st, field(&v)), (422, "limit_usd"), "{v}");
    // the lists: each tenant its own (its quota included), the admin every one as stored
    assert_eq!(listed(&s, &a).await?, ["agent:bot", "tenant:a"]);
    assert_eq!(listed(&s, &b).await?, ["agent:bot", "global"]);
    assert_eq!(
        listed(&s, ADMIN_TOKEN).await?,
        [
            "a~agent:bot",
            "b~agent:bot",
            "b~global",
            "global",
            "tenant:a"
        ]
    );
    // the admin manages tenants' budgets under their stored names; bad names are 422
    let (st, v) = put(ADMIN_TOKEN, "a~model:m", 4.0).await?;
    assert_eq!((st, v["scope"].clone()), (201, json!("a~model:m")), "{v}");
    let (st, v) = budget_as(&s, &a, Method::GET, "model:m", None).await?;
    assert_eq!((st, v["scope"].clone()), (200, json!("model:m")), "{v}");
    for scope in ["a~tenant:a", "a~b~global", "A~global"] {
        let (st, v) = put(ADMIN_TOKEN, scope, 1.0).await?;
        assert_eq!((st, field(&v)), (422, "scope"), "{scope}: {v}");
    }
    // a quota only for a tenant that exists
    let (st, v) = put(ADMIN_TOKEN, "tenant:nobody", 1.0).await?;
    assert_eq!(
        (st, code(&v), field(&v)),
        (404, "not_found", "scope"),
        "{v}"
    );
    // A deletes its own; B's stays
    let (st, _) = budget_as(&s, &a, Method::DELETE, "agent:bot", None).await?;
    assert_eq!(st, 204);
    let (st, _) = budget_as(&s, &a, Method::GET, "agent:bot", None).await?;
    assert_eq!(st, 404);
    let (st, _) = budget_as(&s, &b, Method::GET, "agent:bot", None).await?;
    assert_eq!(st, 200);
    // one tenant cannot fill the table: 100 budgets each (A holds model:m already)
    for i in 0..99 {
        let (st, v) = put(&a, &format!("agent:cap-{i}"), 1.0).await?;
        assert_eq!(st, 201, "budget {i}: {v}");
    }
    let (st, v) = put(&a, "agent:one-too-many", 1.0).await?;
    assert_eq!(
        (st, code(&v), field(&v)),
        (409, "too_many_budgets", "scope"),
        "{v}"
    );
    let (st, v) = put(&a, "agent:cap-0", 2.0).await?;
    assert_eq!(st, 200, "an existing one still changes: {v}");
    let (st, v) = put(&b, "agent:more", 1.0).await?;
    assert_eq!(st, 201, "B is not limited by A's: {v}");
    let (st, v) = put(ADMIN_TOKEN, "agent:ops", 1.0).await?;
    assert_eq!(st, 201, "nor the operator: {v}");

    // usage: each tenant sees its own calls only; the admin the fleet's, by tenant too
    let _w = s.start_worker(&[]).await?;
    let mut ids = Vec::new();
    for (tok, prompt, agent) in [
        (&a, "a-one", "bot"),
        (&a, "a-two", "bot"),
        (&a, "a-three", "helper"),
        (&b, "b-one", "bot"),
        (&b, "b-two", "bot"),
    ] {
        ids.push((
            tok.clone(),
            submit_as(&s, tok, &json!({"prompt": prompt, "agent_id": agent})).await?,
        ));
    }
    ids.push((
        ADMIN_TOKEN.to_owned(),
        submit_as(
            &s,
            ADMIN_TOKEN,
            &json!({"prompt": "op-one", "agent_id": "bot"}),
        )
        .await?,
    ));
    // (A, B, the admin's own)
    let mut costs = (0.0, 0.0, 0.0);
    for (tok, id) in &ids {
        let t = s.wait_final_as(tok, id).await?;
        assert_eq!(t["status"], "succeeded", "{t}");
        if *tok == a {
            costs.0 += f(&t["cost"]);
        } else if *tok == b {
            costs.1 += f(&t["cost"]);
        } else {
            costs.2 += f(&t["cost"]);
        }
    }
    // the mock's call log: exact counts per tenant
    let log = s.mock.request_records();
    let calls = |prefix: &str| log.iter().filter(|r| r.prompt.starts_with(prefix)).count() as u64;
    let (na, nb, nop) = (calls("a-"), calls("b-"), calls("op-"));
    assert_eq!((na, nb, nop), (3, 2, 1));
    // workers write the report's counts every second
    let want = rows(&[("a", na), ("b", nb), ("default", nop)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let by_tenant = loop {
        let (v, got) = usage_calls(&s, ADMIN_TOKEN, "tenant").await?;
        if got == want {
            break v;
        }
        if Instant::now() > deadline {
            bail!("admin group_by=tenant: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let tenant_cost = |k: &str| {
        by_tenant["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|r| r["key"] == k))
            .map_or(f64::NAN, |r| f(&r["cost_usd"]))
    };
    assert!((tenant_cost("a") - costs.0).abs() < EPS, "{by_tenant}");
    assert!((tenant_cost("b") - costs.1).abs() < EPS, "{by_tenant}");
    let (_, got) = usage_calls(&s, ADMIN_TOKEN, "agent").await?;
    assert_eq!(
        got,
        rows(&[("a~bot", 2), ("a~helper", 1), ("b~bot", 2), ("bot", 1)])
    );
    let (v, got) = usage_calls(&s, ADMIN_TOKEN, "model").await?;
    assert_eq!(got, rows(&[("m", na + nb + nop)]), "{v}");
    let (v, got) = usage_calls(&s, &a, "agent").await?;
    assert_eq!(got, rows(&[("bot", 2), ("helper", 1)]), "{v}");
    assert!((f(&v["total_cost_usd"]) - costs.0).abs() < EPS, "{v}");
    for (g, key) in [("queue", "default"), ("model", "m")] {
        let (v, got) = usage_calls(&s, &a, g).await?;
        assert_eq!(got, rows(&[(key, na)]), "A by {g}: {v}");
        let (v, got) = usage_calls(&s, &b, g).await?;
        assert_eq!(got, rows(&[(key, nb)]), "B by {g}: {v}");
    }
    let (v, got) = usage_calls(&s, &b, "agent").await?;
    assert_eq!(got, rows(&[("bot", nb)]), "{v}");
    assert!((f(&v["total_cost_usd"]) - costs.1).abs() < EPS, "{v}");
    let (st, v) = s
        .send_as(&a, Method::GET, "/v1/usage?group_by=tenant", None)
        .await?;
    assert_eq!((st, field(&v)), (403, "group_by"), "{v}");
    let (st, v) = s
        .send_as(ADMIN_TOKEN, Method::GET, "/v1/usage?group_by=team", None)
        .await?;
    assert_eq!((st, field(&v)), (422, "group_by"), "{v}");
    // the calls were held against the tenants' own budgets and quota, not each other's
    let (_, v) = budget_as(&s, &a, Method::GET, "tenant:a", None).await?;
    assert!((f(&v["spent_usd"]) - costs.0).abs() < EPS, "{v}");
    let (_, v) = budget_as(&s, &b, Method::GET, "global", None).await?;
    assert!((f(&v["spent_usd"]) - costs.1).abs() < EPS, "{v}");
    let (_, v) = budget_as(&s, ADMIN_TOKEN, Method::GET, "global", None).await?;
    assert!(
        (f(&v["spent_usd"]) - (costs.0 + costs.1 + costs.2)).abs() < EPS,
        "the operator's global binds every tenant's calls and its own: {v}"
    );
    assert_no_panic(&s);
    Ok(())
}

/// The caps and the refusal mark at the script level, against a real `redis-server`: one
/// tenant's namespace holds at most 100 budgets and all tenants' together 1000, apart from the
/// operator's 1000 (and the tenant quotas); a refusal for settled spend marks the budget until
/// the time it names, and a call that fits or a replaced budget clears the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_budget_caps_and_refusal_marks_in_the_scripts() -> Result<()> {
    use agentq_common::flow::budget::{
        Budget, BudgetBody, MAX_BUDGETS, MAX_TENANT_BUDGETS, MAX_TENANT_BUDGETS_TOTAL,
    };
    use agentq_common::flow::{Budgets, Charge, Hold};
    let redis = agentq_tests::RedisServer::start()?;
    let url = secrecy::SecretString::from(redis.url());
    let b = Budgets::new(agentq_common::Redis::open(&url)?, "agentq");
    let budget = |scope: &str, usd: f64| -> Result<Budget> {
        let body: BudgetBody = serde_json::from_value(json!({"limit_usd": usd, "window": "1h"}))?;
        body.validate(scope).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let put = |scope: String| {
        let b = b.clone();
        async move {
            let r = b.put(&budget(&scope, 1.0)?).await?;
            Ok::<_, anyhow::Error>(r.map_err(|e| e.message))
        }
    };
    for i in 0..MAX_TENANT_BUDGETS {
        assert_eq!(put(format!("t0~agent:a{i}")).await?, Ok(true), "{i}");
    }
    let full = put("t0~global".into()).await?;
    assert!(
        full.as_ref().is_err_and(|m| m.contains("per tenant")),
        "{full:?}"
    );
    assert_eq!(put("t0~agent:a0".into()).await?, Ok(false), "replaced");
    // other tenants fill the tenants' pool: then no tenant adds one
    let tenants = MAX_TENANT_BUDGETS_TOTAL / MAX_TENANT_BUDGETS;
    for t in 1..tenants {
        for i in 0..MAX_TENANT_BUDGETS {
            assert_eq!(put(format!("t{t}~agent:a{i}")).await?, Ok(true));
        }
    }
    let full = put("late~global".into()).await?;
    assert!(
        full.as_ref().is_err_and(|m| m.contains("over all tenants")),
        "{full:?}"
    );
    // the operator's own pool and the quotas are apart
    for i in 0..MAX_BUDGETS {
        assert_eq!(put(format!("agent:op{i}")).await?, Ok(true), "{i}");
    }
    let full = put("global".into()).await?;
    assert!(
        full.as_ref().is_err_and(|m| m.contains("1000 budgets")),
        "{full:?}"
    );
    assert_eq!(put("tenant:t0".into()).await?, Ok(true), "a quota");
    assert!(b.delete_tenant_budgets("t0").await? == MAX_TENANT_BUDGETS);
    assert_eq!(put("t0~global".into()).await?, Ok(true), "room again");

    // refusal marks on a tenant's quota ($1 an hour)
    let t0 = 1_800_000_000_000i64;
    let ttl = Duration::from_secs(30);
    let q = vec!["tenant:t1".to_owned()];
    let quota = budget("tenant:t1", 1.0)?;
    b.put(&quota).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(b.refusing("tenant:t1", t0).await?, None);
    assert_eq!(
        b.reserve(&q, "h1", 600_000_000, ttl, t0).await?,
        Hold::Held(q.clone())
    );
    // refused while the first is in flight: only holds are in the way, no mark
    assert!(matches!(
        b.reserve(&q, "h2", 600_000_000, ttl, t0).await?,
        Hold::Wait {
            holds_only: true,
            ..
        }
    ));
    assert_eq!(b.refusing("tenant:t1", t0).await?, None);
    b.settle(
        &Charge {
            hold_id: "h1",
            scopes: &q,
            cost_nanos: 600_000_000,
        },
        t0,
    )
    .await?;
    let Hold::Wait {
        eligible_at_ms,
        holds_only: false,
        ..
    } = b.reserve(&q, "h2", 600_000_000, ttl, t0 + 1).await?
    else {
        bail!("held past the settled spend");
    };
    assert_eq!(b.refusing("tenant:t1", t0 + 1).await?, Some(eligible_at_ms));
    assert_eq!(
        b.refusing("tenant:t1", eligible_at_ms).await?,
        None,
        "lifts on time"
    );
    // a smaller call that fits clears it
    assert_eq!(
        b.reserve(&q, "h3", 100_000_000, ttl, t0 + 2).await?,
        Hold::Held(q.clone())
    );
    assert_eq!(b.refusing("tenant:t1", t0 + 2).await?, None);
    // marked again, then a new limit clears it
    assert!(matches!(
        b.reserve(&q, "h4", 600_000_000, ttl, t0 + 3).await?,
        Hold::Wait {
            holds_only: false,
            ..
        }
    ));
    assert!(b.refusing("tenant:t1", t0 + 3).await?.is_some());
    b.put(&budget("tenant:t1", 5.0)?)
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(b.refusing("tenant:t1", t0 + 3).await?, None);
    Ok(())
}
