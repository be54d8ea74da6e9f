//! Issue 13 (cost control) end to end: usage and cost on every task, budgets over HTTP, their
//! enforcement before each LLM call by real workers (fail and wait), the per-task caps, and the
//! usage report; with a private redis-server, the api and worker binaries and the mock LLM.
//!
//! Prices are set so that a mock token costs a tenth of a cent: the mock's usage is the words of
//! the messages (prompt) and 1 + the words of the prompt (completion), so every cost below can be
//! worked out by hand. The worker sends `max_tokens` 10, so a call's worst case is the prompt's
//! estimate (a byte-count heuristic, never below the mock's word count) plus 10 tokens.

use std::time::{Duration, Instant};

use agentq_tests::{assert_no_panic, log_tails, metric, task_key, MockConfig, Stack, Worker};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// Dollars per million tokens: $0.001 a token.
const PRICES: &str = r#"{"m": {"prompt": 1000, "completion": 1000}}"#;
const TOKEN_USD: f64 = 0.001;
const EPS: f64 = 1e-9;

async fn stack(mock: MockConfig) -> Result<Stack> {
    let mut s = Stack::new(mock).await?;
    s.env.insert("AGENTQ_MODEL".into(), "m".into());
    s.env.insert("AGENTQ_PRICES".into(), PRICES.into());
    s.env.insert("AGENTQ_MAX_TOKENS".into(), "10".into());
    // every task is its own conversation: an agent's memory would grow its prompts
    s.env.insert("AGENTQ_MEMORY_MESSAGES".into(), "0".into());
    s.start_api(&[]).await?;
    Ok(s)
}

async fn put_budget(s: &Stack, scope: &str, body: &Value) -> Result<(u16, Value)> {
    let r = s
        .http
        .put(format!("{}/v1/budgets/{scope}", s.api_url))
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn budget(s: &Stack, scope: &str) -> Result<Value> {
    let (status, v) = s.get_json(&format!("/v1/budgets/{scope}")).await?;
    ensure!(status == 200, "GET budget {scope}: {status} {v}");
    Ok(v)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn total_cost(tasks: &[Value]) -> f64 {
    tasks
        .iter()
        .map(|t| t["cost"].as_f64().unwrap_or(0.0))
        .sum()
}

/// A one-message call's hold: the worker's prompt estimate (a token per 3 bytes, 3 per message
/// plus the role, 3 to prime the reply) and the output cap of 10, at $0.001 a token.
fn worst_case(prompt: &str) -> f64 {
    ((prompt.len() as f64 / 3.0).ceil() + 4.0 + 3.0 + 10.0) * TOKEN_USD
}

/// What the mock charges for a one-message prompt: its words, and 1 + its words.
fn mock_cost(prompt: &str) -> f64 {
    let w = prompt.split_whitespace().count() as f64;
    (w + 1.0 + w) * TOKEN_USD
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_budgets_get_a_422_naming_the_field_and_change_nothing() -> Result<()> {
    let s = stack(MockConfig::default()).await?;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "global",
            json!({"limit_usd": -1, "window": "1h"}),
            "limit_usd",
        ),
        (
            "global",
            json!({"limit_usd": 0, "window": "1h"}),
            "limit_usd",
        ),
        (
            "global",
            json!({"limit_usd": "5", "window": "1h"}),
            "limit_usd",
        ),
        ("global", json!({"window": "1h"}), "limit_usd"),
        ("global", json!({"limit_usd": 5, "window": "2y"}), "window"),
        ("global", json!({"limit_usd": 5, "window": "30s"}), "window"),
        ("global", json!({"limit_usd": 5, "window": "31d"}), "window"),
        ("global", json!({"limit_usd": 5}), "window"),
        (
            "global",
            json!({"limit_usd": 5, "window": "1h", "mode": "monthly"}),
            "mode",
        ),
        (
            "global",
            json!({"limit_usd": 5, "window": "1h", "limt": 1}),
            "limt",
        ),
        ("team:a", json!({"limit_usd": 5, "window": "1h"}), "scope"),
        (
            "agent:a%20b",
            json!({"limit_usd": 5, "window": "1h"}),
            "scope",
        ),
        (
            "queue:a.b",
            json!({"limit_usd": 5, "window": "1h"}),
            "scope",
        ),
    ];
    for (scope, body, field) in &cases {
        let (status, v) = put_budget(&s, scope, body).await?;
        assert_eq!(status, 422, "{scope} {body}: {v}");
        assert_eq!(v["error"]["field"], *field, "{scope} {body}: {v}");
    }
    let (status, v) = s.get_json("/v1/budgets").await?;
    assert_eq!((status, v["budgets"].clone()), (200, json!([])), "{v}");
    for scope in ["global", "agent:a", "queue:default", "model:m"] {
        let (status, _) = s.get_json(&format!("/v1/budgets/{scope}")).await?;
        assert_eq!(status, 404, "{scope}");
    }
    // created, then replaced; a bad replacement leaves the first
    let (status, v) = put_budget(&s, "agent:a", &json!({"limit_usd": 5, "window": "60m"})).await?;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (
            v["limit_usd"].clone(),
            v["window"].clone(),
            v["mode"].clone()
        ),
        (json!(5.0), json!("1h"), json!("rolling")),
        "{v}"
    );
    assert_eq!((f(&v["spent_usd"]), f(&v["remaining_usd"])), (0.0, 5.0));
    let (status, v) = put_budget(
        &s,
        "agent:a",
        &json!({"limit_usd": 7.5, "window": "1d", "mode": "calendar"}),
    )
    .await?;
    assert_eq!(status, 200, "{v}");
    let (status, _) = put_budget(&s, "agent:a", &json!({"limit_usd": -2, "window": "1d"})).await?;
    assert_eq!(status, 422);
    let v = budget(&s, "agent:a").await?;
    assert_eq!(
        (f(&v["limit_usd"]), v["window"].clone(), v["mode"].clone()),
        (7.5, json!("1d"), json!("calendar")),
        "{v}"
    );
    let r = s
        .http
        .delete(format!("{}/v1/budgets/agent:a", s.api_url))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 204);
    let r = s
        .http
        .delete(format!("{}/v1/budgets/agent:a", s.api_url))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 404);
    // the task body's caps are checked like every field
    for (body, field) in [
        (json!({"prompt": "x", "max_cost_usd": 0}), "max_cost_usd"),
        (json!({"prompt": "x", "max_cost_usd": -1}), "max_cost_usd"),
        (
            json!({"prompt": "x", "max_total_tokens": 0}),
            "max_total_tokens",
        ),
        (
            json!({"prompt": "x", "max_total_tokens": 1.5}),
            "max_total_tokens",
        ),
        (json!({"prompt": "x", "on_budget": "retry"}), "on_budget"),
    ] {
        let (status, v) = s.post(&body).await?;
        assert_eq!(
            (status, v["error"]["field"].clone()),
            (422, json!(field)),
            "{body}: {v}"
        );
    }
    // usage report arguments
    for (q, field) in [("group_by=team", "group_by"), ("window=0m", "window")] {
        let (status, v) = s.get_json(&format!("/v1/usage?{q}")).await?;
        assert_eq!(
            (status, v["error"]["field"].clone()),
            (422, json!(field)),
            "{q}: {v}"
        );
    }
    Ok(())
}

/// An agent whose every result enqueues a follow-up (the loop that burns a weekend's quota)
/// is stopped by its budget: the call that would pass it is not made, the task fails with
/// `budget_exceeded` and is dead-lettered, and what was spent stays within the limit plus at
/// most one call's reservation (here: within the limit, the reservation being a true bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_agent_is_stopped_at_its_budget() -> Result<()> {
    let mut s = stack(MockConfig::default()).await?;
    let limit = 0.1;
    let (status, v) = put_budget(
        &s,
        "agent:runaway",
        &json!({"limit_usd": limit, "window": "1h"}),
    )
    .await?;
    assert_eq!(status, 201, "{v}");
    let _w = s.start_worker(&[]).await?;
    let mut done = Vec::new();
    let mut stopped = None;
    for step in 0..100 {
        let id = s
            .submit_json(
                &json!({"prompt": format!("step {step:03} of the loop"), "agent_id": "runaway"}),
            )
            .await?;
        let t = s
            .wait_final(std::slice::from_ref(&id), Duration::from_secs(20))
            .await?;
        let t = t.into_iter().next().context("one task")?;
        if t["status"] == "succeeded" {
            done.push(t);
            continue;
        }
        stopped = Some(t);
        break;
    }
    let stopped = stopped.context("the loop was never stopped")?;
    assert_eq!(stopped["status"], "failed", "{stopped}");
    assert_eq!(stopped["error_code"], "budget_exceeded", "{stopped}");
    assert_eq!(stopped["attempts"], 1, "not retried: {stopped}");
    assert!(
        stopped.get("usage").is_none() && stopped.get("cost").is_none(),
        "no call: {stopped}"
    );
    let dead = s.dead("default").await?;
    assert!(
        dead.iter().any(|d| d["id"] == stopped["id"]),
        "dead-lettered: {dead:?}"
    );
    // every call but the refused one was made, and each task's cost is its call's
    assert_eq!(s.mock.total_calls(), done.len() as u64);
    for t in &done {
        let want = mock_cost(
            t["result"]["content"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("echo: "),
        );
        assert!((f(&t["cost"]) - want).abs() < EPS, "{t}");
        assert_eq!(t["usage"]["calls"], 1, "{t}");
    }
    let spent = total_cost(&done);
    let b = budget(&s, "agent:runaway").await?;
    println!(
        "runaway: {} calls, spent ${spent:.6} of ${limit}; budget {b}",
        done.len()
    );
    assert!((f(&b["spent_usd"]) - spent).abs() < EPS, "{b}");
    assert!(f(&b["reserved_usd"]).abs() < EPS, "no hold left: {b}");
    assert!(spent <= limit + EPS, "overspent: ${spent} of ${limit}");
    // stopped for real: the next call would have passed the limit
    let next = mock_cost("step 000 of the loop");
    assert!(
        spent + next > limit - 0.02,
        "stopped early: ${spent} of ${limit}"
    );
    // the usage report saw the same spend (workers write its counts every second)
    let deadline = Instant::now() + Duration::from_secs(5);
    let (u, row) = loop {
        let (_, u) = s.get_json("/v1/usage?group_by=agent&window=1h").await?;
        let row = u["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|r| r["key"] == "runaway"))
            .cloned()
            .unwrap_or(Value::Null);
        if row["calls"] == done.len() as u64 || Instant::now() > deadline {
            break (u, row);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(row["calls"], done.len() as u64, "{u}");
    assert!((f(&row["cost_usd"]) - spent).abs() < EPS, "{u}");
    assert!((f(&u["total_cost_usd"]) - spent).abs() < EPS, "{u}");
    let (_, by_model) = s.get_json("/v1/usage?group_by=model&window=1h").await?;
    assert_eq!(by_model["groups"][0]["key"], "m", "{by_model}");
    assert_eq!(
        by_model["groups"][0]["prompt_tokens"]
            .as_u64()
            .map(|p| p > 0),
        Some(true),
        "{by_model}"
    );
    assert_no_panic(&s);
    Ok(())
}

/// Three workers of 64 slots race 200 tasks against a budget worth about 20 calls: they cannot
/// jointly pass it, because every call is held against it before it is made (one script for
/// the check and the hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_cannot_jointly_overspend() -> Result<()> {
    let mut s = stack(MockConfig::default()).await?;
    s.mock.set_latency(Duration::from_millis(300));
    let limit = 0.1;
    let (status, _) =
        put_budget(&s, "global", &json!({"limit_usd": limit, "window": "1h"})).await?;
    assert_eq!(status, 201);
    let mut workers: Vec<Worker> = Vec::new();
    for _ in 0..3 {
        workers.push(s.start_worker(&[("AGENTQ_CONCURRENCY", "64")]).await?);
    }
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(s.submit(&format!("race {i:03}")).await?);
    }
    let done = s.wait_final(&ids, Duration::from_secs(60)).await?;
    let ok: Vec<&Value> = done.iter().filter(|t| t["status"] == "succeeded").collect();
    let refused = done
        .iter()
        .filter(|t| t["status"] == "failed" && t["error_code"] == "budget_exceeded")
        .count();
    assert_eq!(
        ok.len() + refused,
        ids.len(),
        "every task succeeded or was refused"
    );
    assert_eq!(
        s.mock.total_calls(),
        ok.len() as u64,
        "a refused call is never made"
    );
    let spent = total_cost(&done);
    let b = budget(&s, "global").await?;
    println!(
        "race: {} succeeded, {refused} refused, spent ${spent:.6} of ${limit}: {b}",
        ok.len()
    );
    assert!(!ok.is_empty());
    assert!(spent <= limit + EPS, "overspent: ${spent} of ${limit}");
    // and used: a call refused only because others were in flight waits for them to settle,
    // so tasks fail only once settled spend leaves no room for one more worst case ($0.02)
    assert!(
        spent > limit - 0.02 + EPS,
        "stopped early: ${spent} of ${limit}"
    );
    assert!((f(&b["spent_usd"]) - spent).abs() < EPS, "{b}");
    assert!(f(&b["reserved_usd"]).abs() < EPS, "{b}");
    let mut refusals = 0.0;
    for w in &workers {
        refusals += metric(
            &w.metrics().await?,
            "agentq_budget_refusals_total{scope=\"global\"}",
        );
    }
    // every refused task was refused at least once; those that waited for holds, more often
    assert!(
        refusals >= refused as f64,
        "{refusals} refusals for {refused} refused tasks"
    );
    assert_no_panic(&s);
    Ok(())
}

/// The hold is the call's worst case; once the call reports its usage the budget keeps only
/// what it cost: the rest is free again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_refunds_the_unused_part_of_the_hold() -> Result<()> {
    let mut s = stack(MockConfig::default()).await?;
    s.mock.set_latency(Duration::from_millis(1500));
    let (status, _) = put_budget(
        &s,
        "queue:default",
        &json!({"limit_usd": 1, "window": "10m"}),
    )
    .await?;
    assert_eq!(status, 201);
    let _w = s.start_worker(&[]).await?;
    let prompt = "refund me";
    let id = s.submit(prompt).await?;
    // while the call runs, its worst case is held
    let deadline = Instant::now() + Duration::from_secs(5);
    let held = loop {
        let b = budget(&s, "queue:default").await?;
        if f(&b["reserved_usd"]) > 0.0 {
            break b;
        }
        ensure!(Instant::now() < deadline, "no hold seen: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t = s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(10))
        .await?;
    let t = &t[0];
    let cost = f(&t["cost"]);
    assert!((cost - mock_cost(prompt)).abs() < EPS, "{t}");
    let reserved = f(&held["reserved_usd"]);
    println!("held ${reserved:.6} for a call that cost ${cost:.6}");
    assert!(
        (reserved - worst_case(prompt)).abs() < EPS,
        "the hold is the worst case: {held}"
    );
    assert!(reserved > cost);
    assert_eq!(f(&held["spent_usd"]), 0.0, "{held}");
    let b = budget(&s, "queue:default").await?;
    assert!((f(&b["spent_usd"]) - cost).abs() < EPS, "{b}");
    assert!(f(&b["reserved_usd"]).abs() < EPS, "{b}");
    assert!((f(&b["remaining_usd"]) - (1.0 - cost)).abs() < EPS, "{b}");
    assert_eq!(
        t["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "cached_tokens": 0, "calls": 1})
    );
    s.mock.set_latency(Duration::ZERO);
    // a failed call is refunded: a 500, then the retry's answer, costs only the answer
    let failed_once = "[[fail:500:1]] then fine";
    let t = s.submit(failed_once).await?;
    let t = s
        .wait_final(std::slice::from_ref(&t), Duration::from_secs(10))
        .await?;
    let t = &t[0];
    assert_eq!(
        (t["status"].clone(), t["attempts"].clone()),
        (json!("succeeded"), json!(2)),
        "{t}"
    );
    assert!(
        (f(&t["cost"]) - mock_cost(failed_once)).abs() < EPS,
        "only the answer: {t}"
    );
    assert_eq!(t["usage"]["calls"], 1, "{t}");
    let b = budget(&s, "queue:default").await?;
    assert!(
        (f(&b["spent_usd"]) - (cost + mock_cost(failed_once))).abs() < EPS,
        "{b}"
    );
    // an answer with no usage is charged its whole hold (billed, amount unknown); the task's own
    // record has no usage to show
    let silent = s.submit("[[reply:no_usage]] silent").await?;
    let silent = s
        .wait_final(std::slice::from_ref(&silent), Duration::from_secs(10))
        .await?;
    assert_eq!(silent[0]["status"], "succeeded", "{}", silent[0]);
    assert!(silent[0].get("usage").is_none(), "{}", silent[0]);
    let after = budget(&s, "queue:default").await?;
    let charged = f(&after["spent_usd"]) - f(&b["spent_usd"]);
    let hold = worst_case("[[reply:no_usage]] silent");
    assert!(
        (charged - hold).abs() < EPS,
        "charged ${charged}, its hold was ${hold}: {after}"
    );
    // cached prompt tokens are kept where the upstream reports them
    let cached = s.submit("[[reply:cached]] from the cache please").await?;
    let cached = s
        .wait_final(std::slice::from_ref(&cached), Duration::from_secs(10))
        .await?;
    assert_eq!(cached[0]["usage"]["cached_tokens"], 3, "{}", cached[0]);
    assert!(f(&budget(&s, "queue:default").await?["reserved_usd"]).abs() < EPS);
    assert_no_panic(&s);
    Ok(())
}

/// `on_budget: wait`: a call the budget refuses parks the task outside `pending` (no attempt
/// used) until enough spend leaves the window; then it runs. A rolling 1m window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_resumes_when_the_window_rolls() -> Result<()> {
    let mut s = stack(MockConfig::default()).await?;
    let prompt = "wait for the window";
    // room for one call (its worst case is about 17 tokens), not two
    let limit = 0.025;
    let (status, _) = put_budget(
        &s,
        "agent:patient",
        &json!({"limit_usd": limit, "window": "1m"}),
    )
    .await?;
    assert_eq!(status, 201);
    let _w = s.start_worker(&[]).await?;
    let body = json!({"prompt": prompt, "agent_id": "patient", "on_budget": "wait"});
    let first = s.submit_json(&body).await?;
    let t1 = s
        .wait_final(std::slice::from_ref(&first), Duration::from_secs(10))
        .await?;
    assert_eq!(t1[0]["status"], "succeeded", "{}", t1[0]);
    let second = s.submit_json(&body).await?;
    // parked, not failed, no attempt used, the call not made
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = s.task(&second).await?;
    assert_eq!(t["status"], "queued", "{t}\n{}", log_tails(&s));
    assert!(t["throttled"].as_u64().unwrap_or(0) >= 1, "{t}");
    assert_eq!(t["attempts"], 0, "{t}");
    assert_eq!(s.mock.total_calls(), 1);
    let q = s.queue("default").await?;
    assert_eq!(
        (q["pending"].clone(), q["throttled"].clone()),
        (json!(0), json!(1)),
        "{q}"
    );
    let t2 = s
        .wait_final(std::slice::from_ref(&second), Duration::from_secs(90))
        .await?;
    let t2 = &t2[0];
    assert_eq!(t2["status"], "succeeded", "{t2}");
    assert_eq!(s.mock.total_calls(), 2);
    let mut c = s.redis.conn()?;
    let finished_1: i64 = redis::cmd("HGET")
        .arg(task_key(&first))
        .arg("finished_at")
        .query(&mut c)?;
    let started_2: i64 = redis::cmd("HGET")
        .arg(task_key(&second))
        .arg("started_at")
        .query(&mut c)?;
    let waited = started_2 - finished_1;
    println!("the second call ran {waited} ms after the first finished");
    // the first call's spend left the rolling minute (in 1 s buckets) before the second ran
    assert!(
        waited >= 59_000,
        "ran {waited} ms after the first, inside its window"
    );
    assert!(waited < 75_000, "waited {waited} ms");
    assert_no_panic(&s);
    Ok(())
}

/// `max_total_tokens` and `max_cost_usd` bound one task over all its attempts and steps: a call
/// that could pass them is not made, and the task fails with `budget_exceeded` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_task_caps_stop_a_task_before_the_call_that_would_pass_them() -> Result<()> {
    let mut s = stack(MockConfig::default()).await?;
    let prompt = "a capped task";
    // one call fits: a worst case of about 15 tokens ($0.015)
    let fits = json!({"prompt": prompt, "max_total_tokens": 40, "max_cost_usd": 0.04});
    let ok = s.submit_json(&fits).await?;
    // no call fits
    let tight_tokens = s
        .submit_json(&json!({"prompt": prompt, "max_total_tokens": 8}))
        .await?;
    let tight_cost = s
        .submit_json(&json!({"prompt": prompt, "max_cost_usd": 0.008}))
        .await?;
    // the cap counts every attempt: a first call that comes back empty (usage reported, the task
    // failed) used 9 of this task's 30 tokens; redriven, its next call's worst case (28) no
    // longer fits
    let empty = "a capped task [[reply:empty:1]]";
    let spent_before = s
        .submit_json(&json!({"prompt": empty, "max_total_tokens": 30}))
        .await?;
    let _w = s.start_worker(&[]).await?;
    let first = s
        .wait_final(std::slice::from_ref(&spent_before), Duration::from_secs(10))
        .await?;
    assert_eq!(first[0]["status"], "failed", "{}", first[0]);
    assert!(
        first[0].get("error_code").is_none(),
        "an empty answer, not a budget: {}",
        first[0]
    );
    assert_eq!(first[0]["usage"]["total_tokens"], 9, "{}", first[0]);
    let (status, v) = s.redrive("default", None).await?;
    assert_eq!(status, 200, "{v}");
    let ids = [ok, tight_tokens, tight_cost, spent_before];
    let done = s.wait_final(&ids, Duration::from_secs(10)).await?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert!(
        (f(&done[0]["cost"]) - mock_cost(prompt)).abs() < EPS,
        "{}",
        done[0]
    );
    for t in &done[1..] {
        assert_eq!(
            (
                t["status"].clone(),
                t["error_code"].clone(),
                t["attempts"].clone()
            ),
            (json!("failed"), json!("budget_exceeded"), json!(1)),
            "{t}"
        );
    }
    let error = |i: usize| done[i]["error"].as_str().unwrap_or("").to_owned();
    assert!(error(1).contains("max_total_tokens"), "{}", done[1]);
    assert!(error(2).contains("max_cost_usd"), "{}", done[2]);
    assert!(error(3).contains("used 9 tokens"), "{}", done[3]);
    // the earlier usage is still on the record, nothing added
    assert_eq!(done[3]["usage"]["total_tokens"], 9, "{}", done[3]);
    assert!((f(&done[3]["cost"]) - 0.009).abs() < EPS, "{}", done[3]);
    assert_eq!(
        s.mock.total_calls(),
        2,
        "the task that fits, and the empty answer"
    );
    assert_no_panic(&s);
    let _ = log_tails;
    Ok(())
}

/// The budget scripts against a real `redis-server` with the clock in the test's hands (the
/// scripts take "now" as an argument): windows roll and reset exactly as documented, a refusal
/// names the time it lifts, an expired hold stops counting, and a resent settlement charges once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_roll_and_reset_on_time_and_holds_settle_once() -> Result<()> {
    use agentq_common::flow::budget::{Budget, BudgetBody};
    use agentq_common::flow::{Budgets, Charge, Hold};
    let redis = agentq_tests::RedisServer::start()?;
    let url = secrecy::SecretString::from(redis.url());
    let b = Budgets::new(agentq_common::Redis::open(&url)?, "agentq");
    let put = |scope: &str, v: Value| -> Result<Budget> {
        let body: BudgetBody = serde_json::from_value(v)?;
        body.validate(scope).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let hour = 3_600_000i64;
    let t0 = 1_800_000_000_000i64 - 1_800_000_000_000 % hour + 10 * 60_000; // 10 min past an hour
    let ttl = Duration::from_secs(30);
    let scopes = |s: &str| vec![s.to_owned()];
    let usd = |n: i64| n as f64 / 1e9;
    // rolling hour, $1: a $0.60 call settles at t0; $0.50 more does not fit until it leaves
    let rolling = put("global", json!({"limit_usd": 1, "window": "1h"}))?;
    b.put(&rolling).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let g = scopes("global");
    assert_eq!(
        b.reserve(&g, "a", 700_000_000, ttl, t0).await?,
        Hold::Held(g.clone())
    );
    b.settle(
        &Charge {
            hold_id: "a",
            scopes: &g,
            cost_nanos: 600_000_000,
        },
        t0,
    )
    .await?;
    // resent: the hold is gone, nothing more is charged
    assert_eq!(
        b.settle(
            &Charge {
                hold_id: "a",
                scopes: &g,
                cost_nanos: 600_000_000
            },
            t0
        )
        .await?,
        0
    );
    let v = b.view_of(&rolling, t0).await?;
    assert_eq!((v.spent_usd, v.reserved_usd), (0.6, 0.0));
    let Hold::Wait {
        eligible_at_ms,
        holds_only,
        ..
    } = b.reserve(&g, "b", 500_000_000, ttl, t0 + 1000).await?
    else {
        bail!("a call past the limit was held");
    };
    assert!(!holds_only);
    // 1 m buckets, 61 kept: the t0 bucket leaves the window 61 minutes after it began
    let bucket_start = t0 - t0 % 60_000;
    assert_eq!(eligible_at_ms, bucket_start + 61 * 60_000);
    assert!(matches!(
        b.reserve(&g, "b", 500_000_000, ttl, eligible_at_ms - 1)
            .await?,
        Hold::Wait { .. }
    ));
    assert_eq!(
        b.reserve(&g, "b", 500_000_000, ttl, eligible_at_ms).await?,
        Hold::Held(g.clone())
    );
    // an open hold counts against others until it settles or expires (its worker died)
    let Hold::Wait { holds_only, .. } = b
        .reserve(&g, "c", 600_000_000, ttl, eligible_at_ms + 1)
        .await?
    else {
        bail!("a call past the held amount was held");
    };
    assert!(holds_only, "only the open hold is in the way");
    let after_expiry = eligible_at_ms + ttl.as_millis() as i64 + 1;
    assert_eq!(
        b.reserve(&g, "c", 600_000_000, ttl, after_expiry).await?,
        Hold::Held(g.clone())
    );
    // a call larger than the whole limit is refused for good
    assert!(matches!(
        b.reserve(&g, "d", 1_000_000_001, ttl, after_expiry).await?,
        Hold::TooLarge { .. }
    ));
    // calendar hour, $1: spend at 10 past resets on the hour, not an hour later
    let cal = put(
        "model:m",
        json!({"limit_usd": 1, "window": "1h", "mode": "calendar"}),
    )?;
    b.put(&cal).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let m = scopes("model:m");
    assert_eq!(
        b.reserve(&m, "e", 900_000_000, ttl, t0).await?,
        Hold::Held(m.clone())
    );
    b.settle(
        &Charge {
            hold_id: "e",
            scopes: &m,
            cost_nanos: 900_000_000,
        },
        t0,
    )
    .await?;
    let next_hour = t0 - t0 % hour + hour;
    let Hold::Wait {
        eligible_at_ms,
        scope,
        limit_nanos,
        spent_nanos,
        ..
    } = b.reserve(&m, "f", 200_000_000, ttl, t0 + 60_000).await?
    else {
        bail!("held past a calendar budget");
    };
    assert_eq!(
        (
            eligible_at_ms,
            scope.as_str(),
            usd(limit_nanos),
            usd(spent_nanos)
        ),
        (next_hour, "model:m", 1.0, 0.9)
    );
    assert_eq!(
        b.reserve(&m, "f", 200_000_000, ttl, next_hour).await?,
        Hold::Held(m.clone())
    );
    assert_eq!(b.view_of(&cal, next_hour).await?.spent_usd, 0.0);
    // several budgets at once: the hold goes on all of them or none
    let both = vec!["global".to_owned(), "model:m".to_owned()];
    let now = next_hour + 1000;
    let before = (b.view_of(&rolling, now).await?, b.view_of(&cal, now).await?);
    assert!(matches!(
        b.reserve(&both, "g", 900_000_000, ttl, now).await?,
        Hold::Wait { .. }
    ));
    let after = (b.view_of(&rolling, now).await?, b.view_of(&cal, now).await?);
    assert_eq!(
        (before.0.reserved_usd, before.1.reserved_usd),
        (after.0.reserved_usd, after.1.reserved_usd),
        "a refusal holds nothing anywhere"
    );
    // a deleted budget binds nothing and leaves no keys
    assert!(b.delete("model:m").await?);
    let mut c = redis.conn()?;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("agentq:{budgets}:*:model:m")
        .query(&mut c)?;
    assert_eq!(left, Vec::<String>::new());
    Ok(())
}

/// An upstream's own `prices` (`AGENTQ_UPSTREAMS`) override `AGENTQ_PRICES` for its models: the
/// task's cost, the hold and the budget all use them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_prices_override_the_price_table() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("upstreams.json");
    let url = s.llm_url.clone();
    std::fs::write(
        &file,
        serde_json::to_string(&json!({"upstreams": [{"name": "priced", "base_url": url,
            "models": ["m"], "prices": {"m": {"prompt": 2000, "completion": 4000}}}]}))?,
    )?;
    s.env
        .insert("AGENTQ_UPSTREAMS".into(), file.display().to_string());
    s.env.insert("AGENTQ_MODEL".into(), "m".into());
    s.env.insert("AGENTQ_PRICES".into(), PRICES.into());
    s.env.insert("AGENTQ_MAX_TOKENS".into(), "10".into());
    s.start_api(&[]).await?;
    let (status, _) = put_budget(&s, "model:m", &json!({"limit_usd": 1, "window": "1h"})).await?;
    assert_eq!(status, 201);
    let w = s.start_worker(&[]).await?;
    let id = s.submit("two words").await?;
    let t = s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(10))
        .await?;
    // 2 prompt tokens at $0.002 and 3 completion tokens at $0.004 (the table would say $0.005)
    assert!((f(&t[0]["cost"]) - 0.016).abs() < EPS, "{}", t[0]);
    let b = budget(&s, "model:m").await?;
    assert!((f(&b["spent_usd"]) - 0.016).abs() < EPS, "{b}");
    let m = w.metrics().await?;
    assert!(
        (metric(&m, "agentq_llm_cost_dollars_total{model=\"m\"}") - 0.016).abs() < EPS,
        "{m}"
    );
    assert_no_panic(&s);
    Ok(())
}
