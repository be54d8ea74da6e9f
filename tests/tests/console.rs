//! Issue 21's API additions and the console's serving, against the real api (auth on), worker,
//! redis-server and mock LLM: `GET /v1/tasks` is tenant-isolated, filtered, paged without gaps or
//! repeats and bounded per request; the recent-tasks index is capped by the enqueue step itself;
//! `GET /v1/queues` counts; `/ui` is open, holds no data and is served with a strict CSP and ETags.
//! The browser side is `tests/ui/console_test.py` (scripts/ui-test.sh).

use std::collections::HashSet;

use agentq_tests::{MockConfig, Stack, ADMIN_TOKEN};
use anyhow::{ensure, Context, Result};
use redis::Commands;
use reqwest::Method;
use serde_json::{json, Value};

async fn list(s: &Stack, token: &str, query: &str) -> Result<(u16, Value)> {
    s.send_as(token, Method::GET, &format!("/v1/tasks{query}"), None)
        .await
}

fn ids(v: &Value) -> Vec<String> {
    v["tasks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn submit_as(s: &Stack, token: &str, body: Value) -> Result<String> {
    let (st, v) = s
        .send_as(token, Method::POST, "/v1/tasks", Some(&body))
        .await?;
    ensure!(st == 202, "POST /v1/tasks answered {st}: {v}");
    v["id"].as_str().map(str::to_owned).context("no id")
}

/// Every page of a listing, following `next_cursor`; checks each page's order.
async fn all_pages(s: &Stack, token: &str, filter: &str, limit: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let q = match &cursor {
            Some(c) => format!("?limit={limit}{filter}&cursor={c}"),
            None => format!("?limit={limit}{filter}"),
        };
        let (st, v) = list(s, token, &q).await?;
        ensure!(st == 200, "{q}: {st} {v}");
        let page = ids(&v);
        ensure!(page.len() <= limit, "{q}: page of {} > {limit}", page.len());
        out.extend(page);
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(out),
        }
    }
    anyhow::bail!("more than 100 pages")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_listing_is_per_tenant_filtered_and_paged() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let acme = s.tenant(&json!({"id": "acme"})).await?;
    let globex = s.tenant(&json!({"id": "globex"})).await?;

    let mut acme_ids = Vec::new();
    for (prompt, agent) in [("a1", "x"), ("a2", "y"), ("a3", "x")] {
        acme_ids.push(submit_as(&s, &acme, json!({"prompt": prompt, "agent_id": agent})).await?);
    }
    // permanent failure: dead at once
    let acme_failed = submit_as(
        &s,
        &acme,
        json!({"prompt": "a4 [[fail:400]]", "max_attempts": 1}),
    )
    .await?;
    acme_ids.push(acme_failed.clone());
    let mut globex_ids = Vec::new();
    for prompt in ["g1", "g2"] {
        globex_ids.push(submit_as(&s, &globex, json!({"prompt": prompt, "agent_id": "x"})).await?);
    }
    let admin_id = submit_as(&s, ADMIN_TOKEN, json!({"prompt": "d1"})).await?;
    for id in acme_ids.iter() {
        s.wait_final_as(&acme, id).await?;
    }
    for id in globex_ids.iter() {
        s.wait_final_as(&globex, id).await?;
    }
    s.wait_final_as(ADMIN_TOKEN, &admin_id).await?;

    // each tenant sees exactly its own, newest (largest id) first
    let (st, v) = list(&s, &acme, "").await?;
    assert_eq!(st, 200, "{v}");
    let mut want = acme_ids.clone();
    want.sort();
    want.reverse();
    assert_eq!(ids(&v), want, "acme's listing: {v}");
    assert!(v["next_cursor"].is_null(), "{v}");
    for t in v["tasks"].as_array().context("tasks")? {
        assert_eq!(t["tenant"], "acme", "{t}");
    }
    let (_, v) = list(&s, &globex, "").await?;
    let got: HashSet<String> = ids(&v).into_iter().collect();
    assert_eq!(got, globex_ids.iter().cloned().collect(), "globex: {v}");
    // the admin sees everyone's
    let (_, v) = list(&s, ADMIN_TOKEN, "").await?;
    let got: HashSet<String> = ids(&v).into_iter().collect();
    let everyone: HashSet<String> = acme_ids
        .iter()
        .chain(&globex_ids)
        .chain([&admin_id])
        .cloned()
        .collect();
    assert_eq!(got, everyone, "admin: {v}");

    // filters: an agent name two tenants use shows each only its own
    let (_, v) = list(&s, &acme, "?agent=x").await?;
    let got: HashSet<String> = ids(&v).into_iter().collect();
    assert_eq!(
        got,
        HashSet::from([acme_ids[0].clone(), acme_ids[2].clone()]),
        "{v}"
    );
    let (_, v) = list(&s, ADMIN_TOKEN, "?agent=x").await?;
    assert_eq!(ids(&v).len(), 4, "admin, agent x: {v}");
    let (_, v) = list(&s, &acme, "?status=failed").await?;
    assert_eq!(ids(&v), vec![acme_failed.clone()], "{v}");
    assert!(
        v["tasks"][0]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{v}"
    );
    let (_, v) = list(&s, &acme, "?status=succeeded&agent=y").await?;
    assert_eq!(ids(&v), vec![acme_ids[1].clone()], "{v}");
    let (_, v) = list(&s, &globex, "?status=failed").await?;
    assert_eq!(ids(&v), Vec::<String>::new(), "{v}");

    // paging: pages of 2 cover everything once, in order
    let paged = all_pages(&s, &acme, "", 2).await?;
    assert_eq!(paged, want, "pages of 2");
    let paged = all_pages(&s, ADMIN_TOKEN, "", 3).await?;
    assert_eq!(paged.len(), everyone.len(), "{paged:?}");
    assert_eq!(paged.iter().cloned().collect::<HashSet<_>>(), everyone);
    let mut sorted = paged.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(paged, sorted, "newest first across pages");

    // bad input: 422 naming the field, nothing else
    for (q, field) in [
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?limit=ten", "limit"),
        ("?status=done", "status"),
        ("?status=", "status"),
        ("?agent=a%20b", "agent"),
        ("?cursor=nonsense", "cursor"),
        ("?queue=nope", "queue"),
        ("?colour=red", "query"),
    ] {
        let (st, v) = list(&s, &acme, q).await?;
        assert_eq!(st, 422, "{q}: {v}");
        assert_eq!(v["error"]["field"], field, "{q}: {v}");
    }
    // a cursor of another queue
    let (st, v) = list(
        &s,
        &acme,
        "?cursor=other.01a20936-5193-76dc-9284-680e3300c0dd",
    )
    .await?;
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (422, Some("cursor")),
        "{v}"
    );
    // without a token: 401, and nothing listed
    let r = s.http.get(format!("{}/v1/tasks", s.api_url)).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    let r = s
        .http
        .get(format!("{}/v1/queues", s.api_url))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);

    // a workflow's nodes are listed too, with their agent
    let (st, v) = s
        .send_as(
            &acme,
            Method::POST,
            "/v1/workflows",
            Some(&json!({"nodes": [
                {"id": "a", "prompt": "wf a", "agent_id": "planner"},
                {"id": "b", "prompt": "wf b", "depends_on": ["a"]}
            ]})),
        )
        .await?;
    assert_eq!(st, 202, "{v}");
    let wf = v["id"].as_str().context("workflow id")?.to_owned();
    let (_, v) = list(&s, &acme, "?agent=planner").await?;
    assert_eq!(ids(&v).len(), 1, "{v}");
    let (_, w) = s
        .send_as(&acme, Method::GET, &format!("/v1/workflows/{wf}"), None)
        .await?;
    assert_eq!(ids(&v)[0], w["nodes"][0]["task_id"], "{v} {w}");
    let (_, v) = list(&s, &globex, "?agent=planner").await?;
    assert_eq!(ids(&v).len(), 0, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_index_is_capped_in_the_enqueue_step_and_a_listing_is_bounded() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    // 10,000 entries older than any real id (and without records, like expired tasks)
    let key = "agentq:{default}:recent";
    let mut conn = s.redis.conn()?;
    let fake: Vec<(u8, String)> = (0..agentq_common::keys::RECENT_CAP)
        .map(|i| (0u8, format!("default.00000000-0000-7000-8000-{i:012}~~")))
        .collect();
    for chunk in fake.chunks(1000) {
        let _: () = conn.zadd_multiple(key, chunk)?;
    }
    let mut real = Vec::new();
    for p in ["r1", "r2", "r3"] {
        real.push(submit_as(&s, ADMIN_TOKEN, json!({"prompt": p})).await?);
    }
    let card: usize = conn.zcard(key)?;
    assert_eq!(card, agentq_common::keys::RECENT_CAP, "trimmed to the cap");
    let oldest: Vec<String> = conn.zrange(key, 0, 2)?;
    assert_eq!(
        oldest,
        (3..6)
            .map(|i| format!("default.00000000-0000-7000-8000-{i:012}~~"))
            .collect::<Vec<_>>(),
        "the oldest three went"
    );
    // a listing skips entries without a record, and stops after its scan bound with a cursor
    let (st, v) = list(&s, ADMIN_TOKEN, "?limit=50").await?;
    assert_eq!(st, 200, "{v}");
    let mut want = real.clone();
    want.sort();
    want.reverse();
    assert_eq!(ids(&v), want, "{v}");
    let cursor = v["next_cursor"]
        .as_str()
        .context("a cursor: the scan stopped early")?;
    assert!(cursor.starts_with("default.00000000-"), "{cursor}");
    // GET /v1/queues: the declared queues, the last minute's tasks
    let (st, q) = s
        .send_as(ADMIN_TOKEN, Method::GET, "/v1/queues", None)
        .await?;
    assert_eq!(st, 200, "{q}");
    assert_eq!(q["default_queue"], "default", "{q}");
    let d = &q["queues"][0];
    assert_eq!(d["queue"], "default", "{q}");
    assert_eq!(d["created_last_minute"], 3, "{q}");
    assert_eq!(d["pending"], 3, "no worker runs: {q}");
    assert_eq!(d["workers"], 0, "{q}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_open_static_and_served_with_a_strict_policy() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    for (path, ctype) in [
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/sse.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        // no token: the assets hold no data
        let r = s.http.get(format!("{}{path}", s.api_url)).send().await?;
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let h = r.headers().clone();
        let get = |k: &str| {
            h.get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        assert!(get("content-type").starts_with(ctype), "{path}: {h:?}");
        let csp = get("content-security-policy");
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "connect-src 'self'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        assert_eq!(get("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(get("x-frame-options"), "DENY", "{path}");
        assert!(get("set-cookie").is_empty(), "{path}: no cookie");
        let etag = get("etag");
        assert!(etag.starts_with('"') && etag.len() > 10, "{path}: {etag}");
        let body = r.text().await?;
        if ctype == "text/html" {
            // every script is a file of this origin: no inline script, no handler attribute
            assert!(
                body.contains(r#"<script type="module" src="/ui/app.js">"#),
                "{body}"
            );
            assert_eq!(body.matches("<script").count(), 1, "{body}");
            assert!(
                !body
                    .split_whitespace()
                    .any(|w| w.starts_with("on") && w.contains('=')),
                "an inline handler: {body}"
            );
        }
        if path == "/ui/app.js" {
            for sink in [
                ".innerHTML",
                ".outerHTML",
                "insertAdjacentHTML",
                "document.write",
            ] {
                assert!(
                    !body.contains(sink),
                    "app.js must build the DOM from text: {sink}"
                );
            }
        }
        // revalidation
        let r = s
            .http
            .get(format!("{}{path}", s.api_url))
            .header("if-none-match", &etag)
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 304, "{path}");
    }
    // the root leads to the console
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?
        .get(format!("{}/", s.api_url))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/ui");
    Ok(())
}

/// `?include=input` (the console's "Input" card): the owner reads the request its task runs, its
/// messages with the chat parameters at the top level as in the body, and none of the api's own
/// bookkeeping; another tenant gets the same 404 as for a missing task; a bad or repeated value
/// is a 422 naming `include`. `steps,input` gives both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_input_is_shown_to_its_owner_only() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let acme = s.tenant(&json!({"id": "acme"})).await?;
    let globex = s.tenant(&json!({"id": "globex"})).await?;
    let prompt = "<script>window.__xss=1</script> summarise";
    let id = submit_as(
        &s,
        &acme,
        json!({"messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": prompt}],
               "agent_id": "bot", "metadata": {"ticket": 7}, "temperature": 0.5}),
    )
    .await?;
    s.wait_final_as(&acme, &id).await?;

    let path = format!("/v1/tasks/{id}?include=input");
    let (st, v) = s.send_as(&acme, Method::GET, &path, None).await?;
    assert_eq!(st, 200, "{v}");
    let input = &v["input"];
    assert_eq!(input["messages"][0]["role"], "system", "{v}");
    assert_eq!(input["messages"][0]["content"], "be brief", "{v}");
    assert_eq!(input["messages"][1]["role"], "user", "{v}");
    assert_eq!(input["messages"][1]["content"], prompt, "{v}");
    assert_eq!(input["temperature"], 0.5, "{v}");
    assert_eq!(input["metadata"]["ticket"], 7, "{v}");
    assert_eq!(input["agent_id"], "bot", "{v}");
    for internal in ["tenant", "workflow", "chat_completion", "params"] {
        assert!(input.get(internal).is_none(), "{internal} leaked: {v}");
    }
    assert!(
        v.get("transcript").is_none(),
        "only what was asked for: {v}"
    );
    // without include, no input; both together
    let (_, plain) = s
        .send_as(&acme, Method::GET, &format!("/v1/tasks/{id}"), None)
        .await?;
    assert!(plain.get("input").is_none(), "{plain}");
    let (st, both) = s
        .send_as(
            &acme,
            Method::GET,
            &format!("/v1/tasks/{id}?include=steps,input"),
            None,
        )
        .await?;
    assert_eq!(st, 200, "{both}");
    assert!(both["input"]["messages"].is_array(), "{both}");
    assert!(both["transcript"].is_array(), "{both}");
    // the admin sees it; another tenant cannot tell it exists
    let (st, _) = s.send_as(ADMIN_TOKEN, Method::GET, &path, None).await?;
    assert_eq!(st, 200);
    let (st, other) = s.send_as(&globex, Method::GET, &path, None).await?;
    assert_eq!(st, 404, "{other}");
    let (_, missing) = s
        .send_as(
            &globex,
            Method::GET,
            "/v1/tasks/default.01900000-0000-7000-8000-000000000000?include=input",
            None,
        )
        .await?;
    assert_eq!(
        other, missing,
        "another tenant's task answers like a missing one"
    );
    for bad in ["inputs", "input,input", "steps,", ""] {
        let (st, e) = s
            .send_as(
                &acme,
                Method::GET,
                &format!("/v1/tasks/{id}?include={bad}"),
                None,
            )
            .await?;
        assert_eq!(st, 422, "include={bad}: {e}");
        assert_eq!(e["error"]["field"], "include", "include={bad}: {e}");
    }
    Ok(())
}
