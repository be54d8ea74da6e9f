//! Issue 18's tokens, isolation and submission quotas, against the real api (auth on), worker,
//! redis-server and mock LLM: no/bad/revoked/expired token → 401, another tenant's records → 404
//! exactly like missing ones, per-tenant idempotency keys and agent memory, quotas → 429 with
//! nothing written, failed attempts limited per source, and no token in any log or Redis value.

use std::time::Duration;

use agentq_tests::{MockConfig, Stack, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

async fn api_metrics(s: &Stack) -> anyhow::Result<String> {
    Ok(s.http
        .get(format!("{}/metrics", s.api_url))
        .send()
        .await?
        .text()
        .await?)
}

fn err_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn auth_on_without_an_admin_token_exits_64_and_never_echoes_a_secret() -> anyhow::Result<()> {
    for (auth, token) in [
        (None, None),
        (Some("on"), None),
        (Some("on"), Some("hunter2-short")),
    ] {
        let mut cmd = std::process::Command::new(agentq_tests::bin("agentq-api"));
        cmd.env_clear()
            .env("AGENTQ_LISTEN", "127.0.0.1:0")
            .env("REDIS_URL", "redis://127.0.0.1:1");
        if let Some(a) = auth {
            cmd.env("AGENTQ_AUTH", a);
        }
        if let Some(t) = token {
            cmd.env("AGENTQ_ADMIN_TOKEN", t);
        }
        let out = cmd.output()?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(64), "{auth:?} {token:?}: {text}");
        assert!(text.contains("AGENTQ_ADMIN_TOKEN"), "{text}");
        assert!(!text.contains("hunter2"), "the secret was echoed: {text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_authenticate_expire_and_revoke() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    let _w = s.start_worker(&[]).await?;

    // no token, a malformed one, a well-formed unknown one: 401 with a JSON error
    let (st, v) = s.post(&json!({"prompt": "x"})).await?;
    assert_eq!((st, err_code(&v)), (401, "unauthorized"), "{v}");
    for bad in [
        "nonsense",
        "agentq_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let (st, v) = s
            .send_as(bad, Method::GET, "/v1/queues/default", None)
            .await?;
        assert_eq!((st, err_code(&v)), (401, "unauthorized"), "{v}");
    }
    // health, readiness, metrics and the OpenAPI document stay open
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let r = s.http.get(format!("{}{path}", s.api_url)).send().await?;
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }

    // the admin makes a tenant and a token, shown once
    let (st, v) = s
        .send_as(
            ADMIN_TOKEN,
            Method::POST,
            "/v1/admin/tenants",
            Some(&json!({"id": "acme", "weight": 2})),
        )
        .await?;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["weight"], 2);
    let (st, v) = s
        .send_as(
            ADMIN_TOKEN,
            Method::POST,
            "/v1/admin/tenants",
            Some(&json!({"id": "acme"})),
        )
        .await?;
    assert_eq!((st, v["error"]["field"].as_str()), (409, Some("id")), "{v}");
    for (body, field) in [
        (json!({"id": "Not OK"}), "id"),
        (json!({"id": "default"}), "id"),
        (json!({"id": "x", "weight": 0}), "weight"),
        (
            json!({"id": "x", "quotas": {"max_pending": 0}}),
            "quotas.max_pending",
        ),
        (
            json!({"id": "x", "quotas": {"enqueue_rate": -1}}),
            "quotas.enqueue_rate",
        ),
        (json!({"id": "x", "colour": "red"}), "colour"),
    ] {
        let (st, v) = s
            .send_as(ADMIN_TOKEN, Method::POST, "/v1/admin/tenants", Some(&body))
            .await?;
        assert_eq!(
            (st, v["error"]["field"].as_str()),
            (422, Some(field)),
            "{body}: {v}"
        );
    }
    let (st, made) = s
        .send_as(
            ADMIN_TOKEN,
            Method::POST,
            "/v1/admin/tenants/acme/tokens",
            Some(&json!({})),
        )
        .await?;
    assert_eq!(st, 201, "{made}");
    let token = made["token"].as_str().unwrap_or_default().to_owned();
    let token_id = made["token_id"].as_str().unwrap_or_default().to_owned();
    assert!(token.starts_with("agentq_") && token.contains(&token_id));

    // the tenant enqueues and reads its own task; admin routes are not for it
    let (st, v) = s
        .send_as(
            &token,
            Method::POST,
            "/v1/tasks",
            Some(&json!({"prompt": "hello"})),
        )
        .await?;
    assert_eq!(st, 202, "{v}");
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    let (st, t) = s
        .send_as(&token, Method::GET, &format!("/v1/tasks/{id}"), None)
        .await?;
    assert_eq!((st, t["tenant"].as_str()), (200, Some("acme")), "{t}");
    let (st, v) = s
        .send_as(&token, Method::GET, "/v1/admin/tenants", None)
        .await?;
    assert_eq!((st, err_code(&v)), (403, "forbidden"), "{v}");
    s.wait_final_as(&token, &id).await?;

    // the token list shows ids and times, never a secret; Redis holds only the digest
    let (st, v) = s
        .send_as(
            ADMIN_TOKEN,
            Method::GET,
            "/v1/admin/tenants/acme/tokens",
            None,
        )
        .await?;
    assert_eq!(st, 200);
    assert_eq!(v["data"][0]["token_id"], json!(token_id));
    assert!(!v.to_string().contains(&token[token.len() - 20..]), "{v}");
    // the secret follows the id's `_`; a base64url secret may hold `_` itself, so the last `_`
    // would leave a few characters that any binary dump can hold by chance
    let secret = token
        .strip_prefix(&format!("agentq_{token_id}_"))
        .unwrap_or_default();
    assert!(secret.len() >= 40, "{token}");
    let mut conn = s.redis.conn()?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn)?;
    for k in &keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(k).query(&mut conn)?;
        let raw = String::from_utf8_lossy(&dump.unwrap_or_default()).into_owned();
        assert!(!raw.contains(secret), "{k} holds the token's secret");
        assert!(!raw.contains(ADMIN_TOKEN), "{k} holds the admin token");
    }

    // an expiring token works, then is refused once expired
    let (_, short) = s
        .send_as(
            ADMIN_TOKEN,
            Method::POST,
            "/v1/admin/tenants/acme/tokens",
            Some(&json!({"expires_in_secs": 1})),
        )
        .await?;
    let short = short["token"].as_str().unwrap_or_default().to_owned();
    let (st, _) = s
        .send_as(&short, Method::GET, &format!("/v1/tasks/{id}"), None)
        .await?;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (st, v) = s
        .send_as(&short, Method::GET, &format!("/v1/tasks/{id}"), None)
        .await?;
    assert_eq!(st, 401, "an expired token: {v}");

    // revoked: refused at once
    let (st, _) = s
        .send_as(
            ADMIN_TOKEN,
            Method::DELETE,
            &format!("/v1/admin/tenants/acme/tokens/{token_id}"),
            None,
        )
        .await?;
    assert_eq!(st, 204);
    let (st, v) = s
        .send_as(&token, Method::GET, &format!("/v1/tasks/{id}"), None)
        .await?;
    assert_eq!((st, err_code(&v)), (401, "unauthorized"), "{v}");
    let (st, _) = s
        .send_as(
            ADMIN_TOKEN,
            Method::DELETE,
            &format!("/v1/admin/tenants/acme/tokens/{token_id}"),
            None,
        )
        .await?;
    assert_eq!(st, 404, "revoking twice");

    // a deleted tenant's tokens die with it
    let t2 = s.tenant(&json!({"id": "gone"})).await?;
    let (st, _) = s
        .send_as(&t2, Method::GET, "/v1/queues/default", None)
        .await?;
    assert_eq!(st, 200);
    let (st, _) = s
        .send_as(ADMIN_TOKEN, Method::DELETE, "/v1/admin/tenants/gone", None)
        .await?;
    assert_eq!(st, 204);
    let (st, _) = s
        .send_as(&t2, Method::GET, "/v1/queues/default", None)
        .await?;
    assert_eq!(st, 401);

    // no token ever reaches a log line
    let logs = s.all_logs();
    for secret in [token.as_str(), short.as_str(), t2.as_str(), ADMIN_TOKEN] {
        assert!(!logs.contains(secret), "a token is in the logs");
    }
    let metrics = api_metrics(&s).await?;
    assert!(agentq_tests::metric(&metrics, "agentq_auth_failures_total") >= 6.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_limited_per_source() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[("AGENTQ_AUTH_FAIL_LIMIT", "3")]).await?;
    let good = s.tenant(&json!({"id": "acme"})).await?;
    for _ in 0..3 {
        let (st, _) = s
            .send_as(
                "agentq_0123456789abcdef_guess",
                Method::GET,
                "/v1/queues/default",
                None,
            )
            .await?;
        assert_eq!(st, 401);
    }
    let r = s
        .http
        .get(format!("{}/v1/queues/default", s.api_url))
        .bearer_auth("agentq_0123456789abcdef_guess")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 429);
    let wait: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    let v: Value = r.json().await?;
    assert_eq!(err_code(&v), "too_many_auth_failures");
    // while blocked, even a valid token from this source is refused: guessing learns nothing
    let (st, _) = s
        .send_as(&good, Method::GET, "/v1/queues/default", None)
        .await?;
    assert_eq!(st, 429);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_records() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig {
        record: true,
        ..Default::default()
    })
    .await?;
    s.start_api_auth(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let a = s.tenant(&json!({"id": "a"})).await?;
    let b = s.tenant(&json!({"id": "b"})).await?;
    let post = |tok: &str, body: Value| {
        let tok = tok.to_owned();
        let s = &s;
        async move {
            let (st, v) = s
                .send_as(&tok, Method::POST, "/v1/tasks", Some(&body))
                .await?;
            anyhow::ensure!(st == 202, "POST /v1/tasks: {st} {v}");
            Ok::<String, anyhow::Error>(v["id"].as_str().unwrap_or_default().to_owned())
        }
    };

    // A: a task with agent memory, a dead letter, a workflow, a task waiting for tool outputs
    let mem = post(&a, json!({"prompt": "my name is Ada", "agent_id": "bot"})).await?;
    let dead = post(
        &a,
        json!({"prompt": "refused [[fail:400]]", "max_attempts": 1}),
    )
    .await?;
    s.wait_final_as(&a, &mem).await?;
    s.wait_final_as(&a, &dead).await?;
    let (st, wf) = s
        .send_as(
            &a,
            Method::POST,
            "/v1/workflows",
            Some(&json!({"nodes": [{"id": "n1", "prompt": "one"}]})),
        )
        .await?;
    assert_eq!(st, 202, "{wf}");
    let wf = wf["id"].as_str().unwrap_or_default().to_owned();

    // B: every one of A's ids answers exactly like a missing one
    let missing = "default.01a20936-5193-76dc-9284-680e3300c0dd";
    for id in [mem.as_str(), dead.as_str(), missing] {
        for (m, path) in [
            (Method::GET, format!("/v1/tasks/{id}")),
            (Method::DELETE, format!("/v1/tasks/{id}")),
            (Method::GET, format!("/v1/tasks/{id}/events")),
        ] {
            let (st, v) = s.send_as(&b, m.clone(), &path, None).await?;
            assert_eq!((st, err_code(&v)), (404, "not_found"), "{m} {path}: {v}");
        }
        let (st, v) = s
            .send_as(
                &b,
                Method::POST,
                &format!("/v1/tasks/{id}/tool_outputs"),
                Some(&json!({"tool_outputs": [{"tool_call_id": "c", "output": "x"}]})),
            )
            .await?;
        assert_eq!((st, err_code(&v)), (404, "not_found"), "tool_outputs: {v}");
    }
    for m in [Method::GET, Method::DELETE] {
        let (st, v) = s
            .send_as(&b, m, &format!("/v1/workflows/{wf}"), None)
            .await?;
        assert_eq!(st, 404, "{v}");
    }
    let (st, _) = s
        .send_as(&b, Method::GET, &format!("/v1/workflows/{wf}/events"), None)
        .await?;
    assert_eq!(st, 404);

    // dead letters: B sees none and cannot redrive A's, by count or by id
    let (_, v) = s
        .send_as(&b, Method::GET, "/v1/queues/default/dead", None)
        .await?;
    assert_eq!(v["tasks"], json!([]), "{v}");
    let (st, v) = s
        .send_as(&b, Method::POST, "/v1/queues/default/dead/redrive", None)
        .await?;
    assert_eq!((st, v["redriven"].as_u64()), (200, Some(0)), "{v}");
    let (st, v) = s
        .send_as(
            &b,
            Method::POST,
            "/v1/queues/default/dead/redrive",
            Some(&json!({"ids": [dead]})),
        )
        .await?;
    assert_eq!((st, v["redriven"].as_u64()), (200, Some(0)), "{v}");
    let (_, t) = s
        .send_as(&a, Method::GET, &format!("/v1/tasks/{dead}"), None)
        .await?;
    assert_eq!(t["status"], "failed", "B's redrive moved A's task: {t}");
    // A sees and redrives its own, by id
    let (_, v) = s
        .send_as(&a, Method::GET, "/v1/queues/default/dead", None)
        .await?;
    assert_eq!(v["tasks"][0]["id"], json!(dead), "{v}");
    assert_eq!(v["tasks"][0]["tenant"], "a");
    let (st, v) = s
        .send_as(
            &a,
            Method::POST,
            "/v1/queues/default/dead/redrive",
            Some(&json!({"ids": [dead]})),
        )
        .await?;
    assert_eq!((st, v["redriven"].as_u64()), (200, Some(1)), "{v}");

    // idempotency keys are per tenant: the same key gives each tenant its own task
    let keyed = |tok: &str| {
        s.http
            .post(format!("{}/v1/tasks", s.api_url))
            .bearer_auth(tok)
            .header("idempotency-key", "order-1")
            .json(&json!({"prompt": "charge order 1"}))
            .send()
    };
    let ida: Value = keyed(&a).await?.json().await?;
    let idb: Value = keyed(&b).await?.json().await?;
    let ida2: Value = keyed(&a).await?.json().await?;
    assert_ne!(ida["id"], idb["id"]);
    assert_eq!(ida["id"], ida2["id"]);

    // agent memory is per tenant: B's "bot" never hears A's "bot"
    let ask = post(&b, json!({"prompt": "what is my name?", "agent_id": "bot"})).await?;
    s.wait_final_as(&b, &ask).await?;
    let seen = s
        .mock
        .requests()
        .into_iter()
        .find(|r| r.to_string().contains("what is my name?"))
        .unwrap_or_default();
    assert!(
        !seen.to_string().contains("Ada"),
        "B's agent saw A's memory: {seen}"
    );

    // the admin sees everything
    for id in [&mem, &ask] {
        let (st, _) = s
            .send_as(ADMIN_TOKEN, Method::GET, &format!("/v1/tasks/{id}"), None)
            .await?;
        assert_eq!(st, 200);
    }
    let (st, v) = s
        .send_as(
            ADMIN_TOKEN,
            Method::GET,
            &format!("/v1/workflows/{wf}"),
            None,
        )
        .await?;
    assert_eq!(st, 200, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_rate_quota_refuses_with_retry_after_and_writes_nothing() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    let t = s
        .tenant(&json!({"id": "slow", "quotas": {"enqueue_rate": 0.5, "enqueue_burst": 2}}))
        .await?;
    let before: u64 = s.redis.dbsize()?;
    let mut codes = Vec::new();
    let mut retry_after = None;
    for i in 0..3 {
        let r = s
            .http
            .post(format!("{}/v1/tasks", s.api_url))
            .bearer_auth(&t)
            .json(&json!({"prompt": format!("p{i}")}))
            .send()
            .await?;
        codes.push(r.status().as_u16());
        if r.status().as_u16() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let v: Value = r.json().await?;
            assert_eq!(err_code(&v), "quota_exceeded", "{v}");
        }
    }
    assert_eq!(codes, vec![202, 202, 429]);
    assert!(matches!(retry_after, Some(1..=2)), "{retry_after:?}");
    let (_, q) = s
        .send_as(ADMIN_TOKEN, Method::GET, "/v1/queues/default", None)
        .await?;
    assert_eq!(q["pending"], 2, "the refused task was written: {q}");
    // two tasks (record + events) and the rate key: nothing of the refused one
    assert!(s.redis.dbsize()? <= before + 8);
    let m = api_metrics(&s).await?;
    assert_eq!(
        agentq_tests::metric(&m, "agentq_quota_refusals_total{quota=\"enqueue_rate\"}"),
        1.0
    );
    // after the interval the tenant may submit again
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (st, v) = s
        .send_as(
            &t,
            Method::POST,
            "/v1/tasks",
            Some(&json!({"prompt": "later"})),
        )
        .await?;
    assert_eq!(st, 202, "{v}");
    Ok(())
}
