//! A cancelled task's running LLM call is aborted promptly, against a real redis-server, the real
//! binaries and the mock LLM: `DELETE /v1/tasks/{id}` publishes the id on the queue's cancel
//! channel and the worker drops the run's request at once (the mock sees its client go away);
//! a cancel the channel never carried is found by the worker's poll of its runs' records; a run
//! whose token moved on while its task still runs is left to the fencing as before.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentq_tests::{assert_no_panic, log_tails, metric, task_key, MockConfig, Stack, Worker};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// The mock answers after this long, unless the worker hangs up first.
const SLOW: &str = "[[sleep:20000]]";

fn series(status: &str) -> String {
    format!("agentq_tasks_total{{queue=\"default\",status=\"{status}\"}}")
}

/// `GET /_mock/calls` of the stack's mock.
async fn mock_calls(s: &Stack) -> Result<Value> {
    let root = s.llm_url.trim_end_matches("/v1");
    Ok(s.http
        .get(format!("{root}/_mock/calls"))
        .send()
        .await?
        .json()
        .await?)
}

async fn aborted(s: &Stack) -> Result<u64> {
    mock_calls(s).await?["aborted"]
        .as_u64()
        .context("/_mock/calls has a numeric \"aborted\"")
}

/// Waits until the mock has received `n` calls of `prompt`.
async fn calls_reach(s: &Stack, prompt: &str, n: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.mock.calls(prompt) < n {
        if Instant::now() > deadline {
            bail!("{prompt:?} never reached call {n}\n{}", log_tails(s));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// How long after `since` the mock counted `n` aborted calls; fails past `limit`.
async fn aborted_within(s: &Stack, n: u64, since: Instant, limit: Duration) -> Result<Duration> {
    loop {
        if aborted(s).await? >= n {
            return Ok(since.elapsed());
        }
        if since.elapsed() > limit {
            bail!(
                "the mock saw {} aborted calls {limit:?} after the cancel, wanted {n}\n{}",
                aborted(s).await?,
                log_tails(s)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until no worker's in-flight list holds `id`: a cancel leaves the owner's list to the
/// owner, which drops its copy when it aborts the run.
async fn out_of_every_inflight_list(s: &Stack, id: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut c = s.redis.conn()?;
        let lists: Vec<String> = redis::cmd("KEYS")
            .arg("agentq:{default}:inflight:*")
            .query(&mut c)?;
        let mut holders = Vec::new();
        for l in lists {
            let ids: Vec<String> = redis::cmd("LRANGE").arg(&l).arg(0).arg(-1).query(&mut c)?;
            if ids.iter().any(|i| i == id) {
                holders.push(l);
            }
        }
        if holders.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{id} is still in {holders:?} 3 s after its run was aborted\n{}",
            log_tails(s)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn record(s: &Stack, id: &str) -> Result<HashMap<String, String>> {
    Ok(redis::cmd("HGETALL")
        .arg(task_key(id))
        .query(&mut s.redis.conn()?)?)
}

async fn tasks_metric(w: &Worker, status: &str) -> Result<f64> {
    Ok(metric(&w.metrics().await?, &series(status)))
}

/// A worker whose LLM calls may last long enough (the harness's 5 s would end the call first).
async fn start_worker(s: &mut Stack, poll_ms: &str) -> Result<Worker> {
    s.start_worker(&[
        ("AGENTQ_LLM_TIMEOUT_SECS", "60"),
        ("WORKER_CONCURRENCY", "1"),
        ("AGENTQ_CANCEL_POLL_MS", poll_ms),
    ])
    .await
}

/// [`start_worker`] with a 30 s heartbeat: its orphan sweep (every third of it, an id seen twice)
/// cannot take an id out of its in-flight list within a test's few seconds, so only the worker's
/// own drop after an abort can.
async fn start_worker_slow_sweep(s: &mut Stack, poll_ms: &str) -> Result<Worker> {
    s.start_worker(&[
        ("AGENTQ_LLM_TIMEOUT_SECS", "60"),
        ("WORKER_CONCURRENCY", "1"),
        ("AGENTQ_CANCEL_POLL_MS", poll_ms),
        ("AGENTQ_HEARTBEAT_SECS", "30"),
    ])
    .await
}

/// DELETE during a 20 s call: the worker hangs up within 3 s (the poll is a minute away, so the
/// cancel channel did it), writes nothing but drops the id from its in-flight list, counts the run
/// `cancelled`, and its only slot is free for the next task at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_tasks_llm_call_is_aborted_at_once() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = start_worker_slow_sweep(&mut s, "60000").await?;
    let p = format!("cancel me mid-call {SLOW}");
    let id = s.submit(&p).await?;
    calls_reach(&s, &p, 1).await?;
    ensure!(aborted(&s).await? == 0);

    let r = s
        .http
        .delete(format!("{}/v1/tasks/{id}", s.api_url))
        .send()
        .await?;
    let cancelled_at = Instant::now();
    ensure!(r.status() == 200, "DELETE answered {}", r.status());
    let took = aborted_within(&s, 1, cancelled_at, Duration::from_secs(3)).await?;
    println!("the mock saw the call aborted {took:?} after the cancel");

    let t = s.task(&id).await?;
    assert_eq!(t["status"], "cancelled", "{t}");
    assert_eq!(t["result"], Value::Null, "{t}");
    let rec = record(&s, &id)?;
    assert_eq!(rec.get("status").map(String::as_str), Some("cancelled"));
    assert!(!rec.contains_key("result"), "no result written: {rec:?}");
    assert!(!rec.contains_key("token"), "{rec:?}");
    assert_eq!(s.mock.calls(&p), 1);
    assert_eq!(mock_calls(&s).await?["total"], 1);
    let calls = mock_calls(&s).await?;
    assert_eq!(calls["aborted"], 1, "{calls}");

    // the run ended without a report: counted once as cancelled, and said so
    let deadline = Instant::now() + Duration::from_secs(5);
    while tasks_metric(&w, "cancelled").await? < 1.0 {
        ensure!(
            Instant::now() < deadline,
            "no cancelled run counted\n{}",
            w.proc.tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        w.proc.log_text().contains("run aborted: task cancelled"),
        "{}",
        w.proc.tail()
    );
    out_of_every_inflight_list(&s, &id).await?;

    // a second later nothing has changed: no late write, no second call
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        record(&s, &id)?,
        rec,
        "the record stays as the cancel left it"
    );
    assert_eq!(s.mock.calls(&p), 1);
    assert_eq!(aborted(&s).await?, 1);
    assert_eq!(tasks_metric(&w, "cancelled").await?, 1.0);
    for status in ["succeeded", "failed", "retried", "fenced", "duplicate"] {
        assert_eq!(tasks_metric(&w, status).await?, 0.0, "{status}");
    }

    // the worker's only slot is free again: the next task runs now, not when the 20 s are up
    let next = s.submit("right after the cancel").await?;
    let done = s.wait_final(&[next], Duration::from_secs(5)).await?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_no_panic(&s);
    Ok(())
}

/// A cancel that reached the record but never the channel (as if published while the worker's
/// subscription was reconnecting): written straight into Redis, with no PUBLISH. The worker's poll
/// (every 300 ms) finds the record final, hangs up within its period and drops the id from its
/// in-flight list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_channel_missed_is_found_by_the_poll() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = start_worker_slow_sweep(&mut s, "300").await?;
    let p = format!("cancelled behind the channel's back {SLOW}");
    let id = s.submit(&p).await?;
    calls_reach(&s, &p, 1).await?;
    let mut c = s.redis.conn()?;
    redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(task_key(&id))
        .arg("status")
        .arg("cancelled")
        .ignore()
        .cmd("HDEL")
        .arg(task_key(&id))
        .arg("token")
        .ignore()
        .query::<()>(&mut c)?;
    let cancelled_at = Instant::now();
    // 300 ms of poll period, plus the poll's round trip and the mock noticing the hang-up
    let took = aborted_within(&s, 1, cancelled_at, Duration::from_millis(1500)).await?;
    println!("the poll aborted the call {took:?} after the record was cancelled");
    out_of_every_inflight_list(&s, &id).await?;

    let rec = record(&s, &id)?;
    assert_eq!(rec.get("status").map(String::as_str), Some("cancelled"));
    assert!(!rec.contains_key("result"), "{rec:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(record(&s, &id)?, rec, "no report was written");
    assert_eq!(s.mock.calls(&p), 1);
    assert_eq!(aborted(&s).await?, 1);
    assert_eq!(tasks_metric(&w, "cancelled").await?, 1.0);
    assert_no_panic(&s);
    Ok(())
}

/// The poll aborts only for a record that is gone or final: a run whose token moved on while its
/// task is still running (a stale run, recovered by another worker) keeps its call, and its late
/// report is refused by the fencing as before (`stale`, `fenced` 1), nothing else written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_token_moved_on_is_fenced_not_aborted() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = start_worker(&mut s, "100").await?;
    let p = "taken over while running [[sleep:2000]]";
    let id = s.submit(p).await?;
    calls_reach(&s, p, 1).await?;
    let mut c = s.redis.conn()?;
    redis::cmd("HSET")
        .arg(task_key(&id))
        .arg("token")
        .arg("999")
        .query::<()>(&mut c)?;
    // many polls go by while the call runs; none aborts it
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(aborted(&s).await?, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tasks_metric(&w, "fenced").await? < 1.0 {
        ensure!(
            Instant::now() < deadline,
            "the stale run was not fenced\n{}",
            w.proc.tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rec = record(&s, &id)?;
    assert_eq!(rec.get("status").map(String::as_str), Some("running"));
    assert_eq!(rec.get("token").map(String::as_str), Some("999"));
    assert_eq!(rec.get("fenced").map(String::as_str), Some("1"));
    assert!(!rec.contains_key("result"), "{rec:?}");
    assert_eq!(aborted(&s).await?, 0);
    assert_eq!(s.mock.calls(p), 1);
    assert_eq!(tasks_metric(&w, "cancelled").await?, 0.0);
    assert_no_panic(&s);
    Ok(())
}

/// An aborted call gives back what it held at once: with an upstream that allows one call at a
/// time and a budget that holds one call's worst case, the next task's call goes out right after
/// the cancel, not when the lease and the hold would expire (the LLM timeout, a minute, later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_call_gives_back_its_lease_and_holds_at_once() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    let upstreams = s.logs.path().join("upstreams.json");
    std::fs::write(
        &upstreams,
        serde_json::json!({"upstreams": [{
            "name": "solo",
            "base_url": s.llm_url,
            "api_key": "env:OPENAI_API_KEY",
            "models": ["mock-gpt"],
            "limits": {"concurrency": 1},
        }]})
        .to_string(),
    )?;
    s.env.insert(
        "AGENTQ_UPSTREAMS".into(),
        upstreams.to_string_lossy().into_owned(),
    );
    // $0.001 a token, 10 output tokens: a call holds about 2 cents, the budget fits one hold
    s.env.insert(
        "AGENTQ_PRICES".into(),
        r#"{"mock-gpt": {"prompt": 1000, "completion": 1000}}"#.into(),
    );
    s.env.insert("AGENTQ_MAX_TOKENS".into(), "10".into());
    s.start_api(&[]).await?;
    let r = s
        .http
        .put(format!("{}/v1/budgets/global", s.api_url))
        .json(&serde_json::json!({"limit_usd": 0.03, "window": "1h"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "PUT budget: {}", r.status());
    let _w = s
        .start_worker(&[
            ("AGENTQ_LLM_TIMEOUT_SECS", "60"),
            ("WORKER_CONCURRENCY", "4"),
            ("AGENTQ_CANCEL_POLL_MS", "60000"),
        ])
        .await?;
    let slow = format!("hold it {SLOW}");
    let id = s.submit(&slow).await?;
    calls_reach(&s, &slow, 1).await?;
    let next = "next in line";
    let next_id = s
        .submit_json(&serde_json::json!({"prompt": next, "on_budget": "wait"}))
        .await?;
    // while the slow call holds the lease and the budget, the next one waits
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(s.mock.calls(next) == 0, "the limits did not hold");
    let r = s
        .http
        .delete(format!("{}/v1/tasks/{id}", s.api_url))
        .send()
        .await?;
    ensure!(r.status() == 200, "DELETE answered {}", r.status());
    let cancelled_at = Instant::now();
    aborted_within(&s, 1, cancelled_at, Duration::from_secs(3)).await?;
    let t = s
        .wait_final(&[next_id], Duration::from_secs(10))
        .await?
        .remove(0);
    ensure!(t["status"] == "succeeded", "{t}");
    let took = cancelled_at.elapsed();
    ensure!(
        took < Duration::from_secs(8),
        "the next call waited {took:?}: the aborted call's lease or hold was not given back"
    );
    assert_no_panic(&s);
    Ok(())
}
