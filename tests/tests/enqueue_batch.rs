//! Issue 20's enqueue paths against a real redis-server, the real binaries and the mock LLM:
//! `POST /v1/tasks/batch` (each item checked and answered on its own, in order; idempotency keys
//! per item; tenant quotas; bad shapes that write nothing) and the group commit of concurrent
//! `POST /v1/tasks` (grouped while Redis is slow, each request answered after its own write;
//! 503 when Redis is frozen, and the writer goes on after).

use std::time::Duration;

use agentq_tests::{metric, MockConfig, Stack};
use serde_json::{json, Value};

async fn post_batch(s: &Stack, token: Option<&str>, body: &Value) -> anyhow::Result<(u16, Value)> {
    let mut req = s
        .http
        .post(format!("{}/v1/tasks/batch", s.api_url))
        .json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

fn task_keys(s: &Stack) -> anyhow::Result<usize> {
    let mut c = s.redis.conn()?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("agentq:*:task:*").query(&mut c)?;
    Ok(keys.iter().filter(|k| !k.ends_with(":events")).count())
}

fn ids_of(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_task_batch_answers_each_item_in_order_and_runs_each_accepted_once(
) -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    // 1000 items; a few refused, each for its own reason, at known places
    let mut tasks: Vec<Value> = (0..1000)
        .map(|i| json!({"prompt": format!("bulk-{i}")}))
        .collect();
    tasks[3] = json!({"prompt": ""});
    tasks[250] = json!({"prompt": "x", "bogus": 1});
    tasks[500] = json!({"prompt": "x", "queue": "nowhere"});
    tasks[750] = json!("not an object");
    tasks[998] = json!({"prompt": "x", "idempotency_key": ""});
    tasks[999] = json!({"prompt": "x", "max_attempts": 0});
    let refused = [
        (3, "prompt"),
        (250, "bogus"),
        (500, "queue"),
        (750, "body"),
        (998, "idempotency_key"),
        (999, "max_attempts"),
    ];
    let (st, v) = post_batch(&s, None, &json!({"tasks": tasks})).await?;
    assert_eq!(st, 202, "{v}");
    let items = v["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1000);
    for (i, field) in refused {
        assert_eq!(items[i]["error"]["field"], field, "item {i}: {}", items[i]);
        assert!(items[i]["error"]["status"].as_u64().unwrap_or(0) >= 400);
        assert!(items[i].get("id").is_none());
    }
    let accepted: Vec<usize> = (0..1000)
        .filter(|i| !refused.iter().any(|(r, _)| r == i))
        .collect();
    for &i in &accepted {
        assert_eq!(items[i]["status"], "queued", "item {i}: {}", items[i]);
    }
    let ids = ids_of(&items);
    assert_eq!(ids.len(), 994);
    // in the request's order: ids are UUID v7, so the accepted items' ids ascend
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    // refused items wrote nothing
    assert_eq!(task_keys(&s)?, 994);
    let q = s.queue("default").await?;
    assert_eq!(q["pending"], 994);

    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "64")]).await?;
    let done = s.wait_final(&ids, Duration::from_secs(90)).await?;
    for (&i, t) in accepted.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["result"]["content"], format!("echo: bulk-{i}"));
        assert_eq!(s.mock.calls(&format!("bulk-{i}")), 1);
    }
    assert_eq!(s.mock.total_calls(), 994);
    let m = s
        .http
        .get(format!("{}/metrics", s.api_url))
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(
        metric(&m, "agentq_tasks_enqueued_total{queue=\"default\"}"),
        994.0
    );
    // 994 items in 10 calls of at most 100
    assert_eq!(
        metric(&m, "agentq_enqueue_group_size_count{path=\"batch\"}"),
        10.0
    );
    agentq_tests::assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_items_idempotency_keys_make_a_resend_safe() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let body = json!({"tasks": [
        {"prompt": "idem-a", "idempotency_key": "a"},
        {"prompt": "idem-b", "idempotency_key": "b"},
        // the same key twice in one batch: the second is the first's task
        {"prompt": "idem-a again", "idempotency_key": "a"},
        {"prompt": "idem-c"},
        {"prompt": "idem-d", "agent_id": "bot", "idempotency_key": "d"},
    ]});
    let (st, first) = post_batch(&s, None, &body).await?;
    assert_eq!(st, 202, "{first}");
    let f = first["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(f[2]["id"], f[0]["id"]);
    assert_eq!(f[2]["idempotent_replayed"], true);
    assert!(f[0].get("idempotent_replayed").is_none());
    assert_ne!(f[0]["id"], f[1]["id"]);

    let _w = s.start_worker(&[]).await?;
    let unique: Vec<String> = vec![
        f[0]["id"].as_str().unwrap_or_default().to_owned(),
        f[1]["id"].as_str().unwrap_or_default().to_owned(),
        f[3]["id"].as_str().unwrap_or_default().to_owned(),
        f[4]["id"].as_str().unwrap_or_default().to_owned(),
    ];
    s.wait_final(&unique, Duration::from_secs(30)).await?;
    // a resend: keyed items are the same tasks, now with their current status; the unkeyed one
    // is a new task
    let (st, second) = post_batch(&s, None, &body).await?;
    assert_eq!(st, 202, "{second}");
    let g = second["tasks"].as_array().cloned().unwrap_or_default();
    for i in [0, 1, 2, 4] {
        assert_eq!(g[i]["id"], f[i]["id"], "item {i}");
        assert_eq!(g[i]["idempotent_replayed"], true);
        assert_eq!(g[i]["status"], "succeeded", "item {i}: {}", g[i]);
    }
    assert_ne!(g[3]["id"], f[3]["id"]);
    let new_id = g[3]["id"].as_str().unwrap_or_default().to_owned();
    s.wait_final(&[new_id], Duration::from_secs(30)).await?;
    assert_eq!(s.mock.calls("idem-a"), 1);
    assert_eq!(s.mock.calls("idem-a again"), 0);
    assert_eq!(s.mock.calls("idem-b"), 1);
    assert_eq!(s.mock.calls("idem-d"), 1);
    assert_eq!(s.mock.calls("idem-c"), 2);
    // the batch item's field is refused on a single task (the header is its way)
    let (st, v) = s
        .post(&json!({"prompt": "x", "idempotency_key": "z"}))
        .await?;
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (422, Some("idempotency_key"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batch_shapes_are_refused_whole_and_write_nothing() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let over: Vec<Value> = (0..1001)
        .map(|i| json!({"prompt": format!("o{i}")}))
        .collect();
    for (body, status, field) in [
        (json!({"tasks": []}), 422, "tasks"),
        (json!({}), 422, "tasks"),
        (json!({"tasks": over}), 422, "tasks"),
        (json!({"tasks": {"prompt": "x"}}), 422, "tasks"),
        (
            json!({"tasks": [{"prompt": "x"}], "extra": 1}),
            422,
            "extra",
        ),
        (json!([{"prompt": "x"}]), 422, "body"),
    ] {
        let (st, v) = post_batch(&s, None, &body).await?;
        assert_eq!(st, status, "{body:.80}: {v}");
        assert_eq!(v["error"]["field"], field, "{v}");
    }
    // not JSON; wrong content type; over the 8 MiB limit
    let url = format!("{}/v1/tasks/batch", s.api_url);
    let r = s
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"tasks\": [")
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .post(&url)
        .header("content-type", "text/plain")
        .body("{\"tasks\": [{\"prompt\": \"x\"}]}")
        .send()
        .await?;
    assert_eq!(r.status(), 415);
    let big = format!(
        "{{\"tasks\": [{{\"prompt\": \"{}\"}}]}}",
        "x".repeat(9 * 1024 * 1024)
    );
    // its own client: the api answers 413 before reading the rest and closes that connection
    let r = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await?;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["field"], "body");
    assert_eq!(task_keys(&s)?, 0);
    assert_eq!(s.queue("default").await?["pending"], 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas_count_each_task_of_a_batch() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    // max_pending 5: a batch of 8 gets 5 tasks and 3 refusals, each marked 429
    let capped = s
        .tenant(&json!({"id": "capped", "quotas": {"max_pending": 5}}))
        .await?;
    let tasks: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": format!("cap-{i}")}))
        .collect();
    let (st, v) = post_batch(&s, Some(&capped), &json!({"tasks": tasks})).await?;
    assert_eq!(st, 202, "{v}");
    let items = v["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(ids_of(&items[..5]).len(), 5);
    for t in &items[5..] {
        assert_eq!(t["error"]["code"], "quota_exceeded", "{t}");
        assert_eq!(t["error"]["status"], 429);
    }
    assert_eq!(task_keys(&s)?, 5);
    // the tasks are the tenant's: another tenant cannot see them
    let other = s.tenant(&json!({"id": "other"})).await?;
    let id = items[0]["id"].as_str().unwrap_or_default();
    let (st, _) = s
        .send_as(
            &other,
            reqwest::Method::GET,
            &format!("/v1/tasks/{id}"),
            None,
        )
        .await?;
    assert_eq!(st, 404);
    let (st, t) = s
        .send_as(
            &capped,
            reqwest::Method::GET,
            &format!("/v1/tasks/{id}"),
            None,
        )
        .await?;
    assert_eq!((st, t["status"].as_str()), (200, Some("queued")));

    // enqueue_rate with burst 10: a batch of 11 can never pass (422, split it); 10 pass; the
    // next task is over the rate (429, Retry-After) and nothing of it is written
    let slow = s
        .tenant(&json!({"id": "slow", "quotas": {"enqueue_rate": 0.1, "enqueue_burst": 10}}))
        .await?;
    let batch = |n: usize| json!({"tasks": (0..n).map(|i| json!({"prompt": format!("slow-{n}-{i}")})).collect::<Vec<_>>()});
    let (st, v) = post_batch(&s, Some(&slow), &batch(11)).await?;
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (422, Some("tasks")),
        "{v}"
    );
    let (st, v) = post_batch(&s, Some(&slow), &batch(10)).await?;
    assert_eq!(st, 202, "{v}");
    let r = s
        .http
        .post(format!("{}/v1/tasks/batch", s.api_url))
        .bearer_auth(&slow)
        .json(&batch(1))
        .send()
        .await?;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(task_keys(&s)?, 15);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_are_grouped_while_redis_is_slow_and_each_lands_once() -> anyhow::Result<()>
{
    let mut s = Stack::new(MockConfig::default()).await?;
    // one group call at a time: while it is out, every other request waits for the next group
    s.start_api(&[("AGENTQ_ENQUEUE_GROUP_INFLIGHT", "1")])
        .await?;
    // a first request registers the queue and loads the script
    s.submit("warm-up").await?;
    s.redis.freeze();
    let posts = (0..50).map(|i| {
        let s = &s;
        async move { s.post(&json!({"prompt": format!("group-{i}")})).await }
    });
    let all = futures::future::join_all(posts);
    let thaw = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        s.redis.thaw();
    };
    let (answers, ()) = tokio::join!(all, thaw);
    let mut ids = Vec::new();
    for a in answers {
        let (st, v) = a?;
        assert_eq!(st, 202, "{v}");
        ids.push(v["id"].as_str().unwrap_or_default().to_owned());
    }
    let m = s
        .http
        .get(format!("{}/metrics", s.api_url))
        .send()
        .await?
        .text()
        .await?;
    let groups = metric(&m, "agentq_enqueue_group_size_count{path=\"single\"}");
    let grouped = metric(&m, "agentq_enqueue_group_size_sum{path=\"single\"}");
    assert_eq!(grouped, 51.0);
    // the warm-up, the request that was out when Redis froze, and the rest in at most a few
    // groups (at most 64 per call)
    assert!(groups <= 5.0, "{groups} groups for 51 requests");
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "16")]).await?;
    let done = s.wait_final(&ids, Duration::from_secs(60)).await?;
    for (i, t) in done.iter().enumerate() {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(s.mock.calls(&format!("group-{i}")), 1);
    }
    assert_eq!(s.mock.total_calls(), 51);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_gets_503_for_every_grouped_request_and_the_writer_goes_on(
) -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    s.submit("before").await?;
    s.redis.freeze();
    let posts = (0..20).map(|i| {
        let s = &s;
        async move { s.post(&json!({"prompt": format!("frozen-{i}")})).await }
    });
    let frozen_batch = json!({"tasks": [{"prompt": "frozen-batch"}]});
    let batch = post_batch(&s, None, &frozen_batch);
    let (answers, b) = tokio::join!(futures::future::join_all(posts), batch);
    for a in answers {
        let (st, v) = a?;
        assert_eq!(st, 503, "{v}");
        assert_eq!(v["error"]["code"], "unavailable");
    }
    assert_eq!(b?.0, 503);
    s.redis.thaw();
    // the writer's calls came back (late); new requests are written as before
    let mut later = Vec::new();
    for i in 0..5 {
        later.push(s.submit(&format!("after-{i}")).await?);
    }
    let (st, v) = post_batch(&s, None, &json!({"tasks": [{"prompt": "after-batch"}]})).await?;
    assert_eq!(st, 202, "{v}");
    later.extend(ids_of(
        v["tasks"].as_array().map(Vec::as_slice).unwrap_or(&[]),
    ));
    let _w = s.start_worker(&[]).await?;
    let done = s.wait_final(&later, Duration::from_secs(30)).await?;
    assert!(done.iter().all(|t| t["status"] == "succeeded"));
    // a task the client got 503 for may have landed (its write was sent): at most once each
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..20 {
        assert!(s.mock.calls(&format!("frozen-{i}")) <= 1);
    }
    agentq_tests::assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_group_commit_single_posts_still_enqueue_and_replay() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[("AGENTQ_ENQUEUE_GROUP_MAX", "0")]).await?;
    let post = || {
        s.http
            .post(format!("{}/v1/tasks", s.api_url))
            .header("Idempotency-Key", "solo")
            .json(&json!({"prompt": "solo"}))
            .send()
    };
    let a: Value = post().await?.json().await?;
    let b = post().await?;
    assert_eq!(
        b.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let b: Value = b.json().await?;
    assert_eq!(a["id"], b["id"]);
    let _w = s.start_worker(&[]).await?;
    let id = a["id"].as_str().unwrap_or_default().to_owned();
    s.wait_final(&[id], Duration::from_secs(30)).await?;
    assert_eq!(s.mock.calls("solo"), 1);
    // a group size over the per-call maximum, or no call allowed out, is refused at start
    for (var, value) in [
        ("AGENTQ_ENQUEUE_GROUP_MAX", "101"),
        ("AGENTQ_ENQUEUE_GROUP_INFLIGHT", "0"),
    ] {
        let out = std::process::Command::new(agentq_tests::bin("agentq-api"))
            .env(var, value)
            .env("AGENTQ_AUTH", "off")
            .env("AGENTQ_LISTEN", "127.0.0.1:0")
            .output()?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(64), "{var}={value}: {text}");
        assert!(text.contains(var), "{text}");
    }
    Ok(())
}
