//! Issue 4's failure semantics, each against a real redis-server, the real binaries and the mock
//! LLM: every failure path ends in a known state (succeeded, failed and dead-lettered with its
//! error, or still queued), loses no acknowledged task, and calls the LLM exactly as often as the
//! policy says (asserted with the mock's per-prompt call counters).

use std::time::{Duration, Instant};

use agentq_common::keys::TaskId;
use agentq_tests::{
    assert_no_panic, assert_recover, llm_series, log_tails, metric, signal, submit_max, task_key,
    MockConfig, MockLlm, RedisServer, Stack, Worker,
};
use anyhow::{bail, Context};
use serde_json::{json, Value};

const PENDING: &str = "agentq:{default}:pending";
const WORKERS: &str = "agentq:{default}:workers";

fn series(status: &str) -> String {
    format!("agentq_tasks_total{{queue=\"default\",status=\"{status}\"}}")
}

/// The entry for `id` in a dead list.
fn dead_entry<'a>(dead: &'a [Value], id: &str) -> Option<&'a Value> {
    dead.iter().find(|d| d["id"] == id)
}

/// The moment the mock has seen `n` calls of `prompt` (polled every 5 ms).
async fn when_calls_reach(
    mock: &MockLlm,
    prompt: &str,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if mock.calls(prompt) >= n {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "{prompt:?}: {} calls after {timeout:?}, wanted {n}",
                mock.calls(prompt)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls until `cond` holds (it may fail transiently, e.g. while Redis is away).
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(true) = cond().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not true after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Submits, retrying while the api answers 503 (what a client told `Retry-After: 1` does).
async fn submit_when_available(s: &Stack, prompt: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, v) = s.post(&json!({"prompt": prompt})).await?;
        match status {
            202 => {
                return v["id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("202 without id")
            }
            503 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            _ => bail!("POST answered {status}: {v}"),
        }
    }
}

// ---- 1. transient LLM errors ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_llm_errors_are_retried_up_to_max_attempts_then_dead_lettered(
) -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = s
        .start_worker(&[
            ("AGENTQ_LLM_TIMEOUT_SECS", "1"),
            ("WORKER_CONCURRENCY", "8"),
        ])
        .await?;
    // (prompt, max_attempts, what the kept error must say)
    let cases = [
        ("transient 500 [[fail:500:*]]", 3, "llm answered 500"),
        ("transient 502 [[fail:502:*]]", 3, "llm answered 502"),
        ("transient 503 [[fail:503:*]]", 3, "llm answered 503"),
        ("transient hang [[hang]]", 2, "timed out"),
        ("transient drop [[drop]]", 3, "llm request failed"),
    ];
    let mut ids = Vec::new();
    for (p, max, _) in &cases {
        ids.push(submit_max(&s, p, *max).await?);
    }
    let done = s.wait_final(&ids, Duration::from_secs(30)).await?;
    let dead = s.dead("default").await?;
    for ((p, max, err), (id, t)) in cases.iter().zip(ids.iter().zip(&done)) {
        assert_eq!(t["status"], "failed", "{p}: {t}");
        assert_eq!(t["attempts"], *max, "{p}: {t}");
        assert_eq!(
            s.mock.calls(p),
            u64::from(*max),
            "{p}: one call per attempt"
        );
        let error = t["error"].as_str().unwrap_or_default();
        assert!(error.contains(err), "{p}: last error kept: {t}");
        let d = dead_entry(&dead, id).with_context(|| format!("{p} not in dead list"))?;
        assert_eq!(d["error"], t["error"], "{d}");
        assert_eq!(d["attempts"], *max, "{d}");
    }
    assert_eq!(dead.len(), cases.len());
    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "server_error")),
        9.0,
        "{m}"
    );
    assert_eq!(metric(&m, &llm_series("mock-gpt", "timeout")), 2.0, "{m}");
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "connection_error")),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, &series("retried")),
        9.0,
        "every attempt but the last went through the retry path"
    );
    assert_eq!(metric(&m, &series("failed")), 5.0);
    let q = s.queue("default").await?;
    assert_eq!(
        (
            q["pending"].as_u64(),
            q["inflight"].as_u64(),
            q["retrying"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_llm_errors_then_success_count_every_attempt() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s
        .start_worker(&[
            ("AGENTQ_LLM_TIMEOUT_SECS", "1"),
            ("WORKER_CONCURRENCY", "8"),
        ])
        .await?;
    // (prompt, failures before the success)
    let cases = [
        ("recovers 500 [[fail:500:2]]", 2),
        ("recovers 503 [[fail:503:1]]", 1),
        ("recovers 502 then 500 [[fail:502:1]][[fail:500:2]]", 2),
        ("recovers hang [[hang:1]]", 1),
        ("recovers drop [[drop:2]]", 2),
    ];
    assert_recover(&s, &cases).await?;
    assert!(s.dead("default").await?.is_empty());
    Ok(())
}

// ---- 2. 429 and Retry-After ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_calls_wait_for_retry_after_in_seconds_and_as_a_date() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    // Retry-After is capped by AGENTQ_RETRY_MAX_MS (500 ms in the base env): allow the 2 s here.
    let _w = s.start_worker(&[("AGENTQ_RETRY_MAX_MS", "10000")]).await?;
    let secs = "retry-after seconds [[fail:429:1:2]]";
    let date = "retry-after date [[fail:429:1:date:2]]";
    // Each on a model of its own: a 429 blocks its model for the whole fleet (flow control), so
    // on one model the second task's first call could wait out the first one's Retry-After.
    let a = s
        .submit_json(&serde_json::json!({"prompt": secs, "model": "mock-gpt"}))
        .await?;
    let b = s
        .submit_json(&serde_json::json!({"prompt": date, "model": "mock-gpt-date"}))
        .await?;
    let (a1, b1) = tokio::join!(
        when_calls_reach(&s.mock, secs, 1, Duration::from_secs(10)),
        when_calls_reach(&s.mock, date, 1, Duration::from_secs(10))
    );
    a1?;
    b1?;
    // When the first runs started, on the worker's clock (Unix ms, set by fetch before the call);
    // the retry's fetch overwrites it, so read it now.
    let mut c = s.redis.conn()?;
    let started = |c: &mut redis::Connection, id: &str| -> anyhow::Result<i64> {
        Ok(redis::cmd("HGET")
            .arg(task_key(id))
            .arg("started_at")
            .query(c)?)
    };
    let (sa, sb) = (started(&mut c, &a)?, started(&mut c, &b)?);
    let at = sa.max(sb) + 1500 - agentq_common::time::now_ms();
    tokio::time::sleep(Duration::from_millis(at.max(0) as u64)).await;
    assert_eq!(s.mock.calls(secs), 1, "called again before Retry-After: 2");
    assert_eq!(
        s.mock.calls(date),
        1,
        "called again before the Retry-After date"
    );
    let t = s.task(&a).await?;
    assert_eq!(t["status"], "retrying", "{t}");
    assert_eq!(t["rate_limited"], 1, "{t}");
    assert!(
        t["error"].as_str().unwrap_or_default().contains("429"),
        "{t}"
    );
    let done = s
        .wait_final(&[a.clone(), b.clone()], Duration::from_secs(10))
        .await?;
    for (p, t) in [secs, date].iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 1, "a 429 does not count as an attempt: {t}");
        assert_eq!(t["rate_limited"], 1, "{t}");
        assert_eq!(s.mock.calls(p), 2);
    }
    // the retry started at least 2 s after the first run, and not much later either
    for (what, id, first) in [("seconds", &a, sa), ("date", &b, sb)] {
        let gap = started(&mut c, id)? - first;
        assert!(
            (2000..4000).contains(&gap),
            "Retry-After ({what}) not honoured: retry started {gap} ms after the first run"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting_does_not_use_up_attempts() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let limited = "limited thrice [[fail:429:3:0]]";
    let broken = "broken once [[fail:503:1]]";
    let a = submit_max(&s, limited, 1).await?;
    let b = submit_max(&s, broken, 1).await?;
    let done = s.wait_final(&[a, b], Duration::from_secs(20)).await?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(done[0]["attempts"], 1);
    assert_eq!(done[0]["rate_limited"], 3);
    assert_eq!(s.mock.calls(limited), 4);
    // the same budget with a transient error instead: one call and it is over
    assert_eq!(done[1]["status"], "failed", "{}", done[1]);
    assert_eq!(s.mock.calls(broken), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_rate_limiting_ends_at_max_rate_limited() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _capped = s.start_worker(&[("AGENTQ_MAX_RATE_LIMITED", "3")]).await?;
    let forever = "rate limited forever [[fail:429:*:0]]";
    let twice = "rate limited twice [[fail:429:2:0]]";
    let a = s.submit(forever).await?;
    let b = s.submit(twice).await?;
    let done = s
        .wait_final(&[a.clone(), b], Duration::from_secs(20))
        .await?;
    assert_eq!(done[0]["status"], "failed", "{}", done[0]);
    assert_eq!(done[0]["rate_limited"], 3);
    assert_eq!(s.mock.calls(forever), 3, "the cap ends it after 3 calls");
    let error = done[0]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("rate limited 3 times"), "{error}");
    assert!(error.contains("429"), "{error}");
    let dead = s.dead("default").await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], a.as_str());
    assert_eq!(done[1]["status"], "succeeded", "under the cap: {}", done[1]);
    assert_eq!(s.mock.calls(twice), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_max_rate_limited_is_20() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let forever = "default cap [[fail:429:*:0]]";
    let id = submit_max(&s, forever, 1).await?;
    let done = s.wait_final(&[id], Duration::from_secs(30)).await?;
    assert_eq!(done[0]["status"], "failed", "{}", done[0]);
    assert_eq!(done[0]["rate_limited"], 20);
    assert_eq!(s.mock.calls(forever), 20);
    Ok(())
}

// ---- 3. permanent errors ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_llm_errors_fail_at_once_after_one_call() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = s.start_worker(&[]).await?;
    let codes = [400, 401, 403, 404, 422];
    let prompts: Vec<String> = codes
        .iter()
        .map(|c| format!("permanent {c} [[fail:{c}:*]]"))
        .collect();
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(submit_max(&s, p, 5).await?);
    }
    let done = s.wait_final(&ids, Duration::from_secs(20)).await?;
    let dead = s.dead("default").await?;
    for ((code, p), (id, t)) in codes.iter().zip(&prompts).zip(ids.iter().zip(&done)) {
        assert_eq!(t["status"], "failed", "{t}");
        assert_eq!(t["attempts"], 1, "{t}");
        assert_eq!(s.mock.calls(p), 1, "{p}: exactly one LLM call");
        let error = t["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with(&format!("llm answered {code}: "))
                && error.contains("scripted failure"),
            "{t}"
        );
        assert!(dead_entry(&dead, id).is_some(), "{p} not dead-lettered");
    }
    let m = w.metrics().await?;
    assert_eq!(metric(&m, &series("retried")), 0.0, "{m}");
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "client_error")),
        5.0,
        "{m}"
    );
    Ok(())
}

// ---- 4. poison payloads ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_tasks_are_dead_lettered_and_the_worker_keeps_going() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let mut c = s.redis.conn()?;
    let now = agentq_common::time::now_ms().to_string();
    let mut put = |id: &str, payload: Option<&str>| -> anyhow::Result<()> {
        if let Some(payload) = payload {
            redis::cmd("HSET")
                .arg(task_key(id))
                .arg(&[
                    ("queue", "default"),
                    ("status", "queued"),
                    ("attempts", "0"),
                    ("max_attempts", "5"),
                    ("payload", payload),
                    ("created_at", now.as_str()),
                ])
                .query::<()>(&mut c)?;
        }
        redis::cmd("LPUSH")
            .arg(PENDING)
            .arg(id)
            .query::<()>(&mut c)?;
        Ok(())
    };
    let new_id = || TaskId::generate("default").map(|t| t.to_string());
    let bad_id_prompt = "a fine prompt under a malformed id";
    // (id, reason the dead list must give)
    let poison = [
        (
            new_id()?,
            Some("this is not JSON {"),
            "poison: payload does not parse",
        ),
        (
            new_id()?,
            Some(r#"{"messages": "hello"}"#),
            "poison: payload does not parse",
        ),
        (
            new_id()?,
            Some(r#"{"messages": []}"#),
            "poison: payload has no messages",
        ),
        (new_id()?, None, "poison: task record missing"),
        (
            "not-a-task-id".to_owned(),
            None,
            "poison: task record missing",
        ),
        (
            "default.not-a-uuid".to_owned(),
            Some(
                r#"{"messages": [{"role": "user", "content": "a fine prompt under a malformed id"}]}"#,
            ),
            "poison: malformed task id",
        ),
    ];
    for (id, payload, _) in &poison {
        put(id, *payload)?;
    }
    let good = s.submit("submitted after the poison").await?;
    let w = s.start_worker(&[]).await?;
    let done = s.wait_final(&[good], Duration::from_secs(20)).await?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(s.mock.calls("submitted after the poison"), 1);
    assert_eq!(
        s.mock.calls(bad_id_prompt),
        0,
        "a malformed id is never run"
    );
    assert_eq!(s.mock.total_calls(), 1, "no poison reached the LLM");
    let dead = s.dead("default").await?;
    for (id, _, reason) in &poison {
        let d =
            dead_entry(&dead, id).with_context(|| format!("{id} not dead-lettered: {dead:?}"))?;
        assert!(
            d["error"].as_str().unwrap_or_default().starts_with(reason),
            "{id}: {d}"
        );
    }
    assert_eq!(dead.len(), poison.len());
    for (id, _, reason) in poison.iter().filter(|(id, ..)| TaskId::parse(id).is_ok()) {
        let t = s.task(id).await?;
        assert_eq!(t["status"], "failed", "{t}");
        assert!(
            t["error"].as_str().unwrap_or_default().starts_with(reason),
            "{t}"
        );
    }
    let q = s.queue("default").await?;
    assert_eq!(
        (q["pending"].as_u64(), q["inflight"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );
    assert_eq!(
        s.http
            .get(format!("{}/readyz", w.probe))
            .send()
            .await?
            .status(),
        200
    );
    // and it still takes work
    let later = s.submit("after the poison was buried").await?;
    let done = s.wait_final(&[later], Duration::from_secs(20)).await?;
    assert_eq!(done[0]["status"], "succeeded");
    assert_no_panic(&s);
    Ok(())
}

// ---- 5. recovered duplicates of finished tasks ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovered_duplicates_of_finished_tasks_are_dropped_unrun() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let cancelled_p = "dup: cancelled before it ran";
    let cancelled = s.submit(cancelled_p).await?;
    let r = s
        .http
        .delete(format!("{}/v1/tasks/{cancelled}", s.api_url))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let _w = s.start_worker(&[]).await?;
    let ok_p = "dup: succeeded once";
    let failed_p = "dup: failed once [[fail:400:*]]";
    let ok = s.submit(ok_p).await?;
    let failed = s.submit(failed_p).await?;
    let ids = [ok.clone(), failed.clone(), cancelled.clone()];
    let before = s.wait_final(&ids, Duration::from_secs(20)).await?;
    assert_eq!(
        [
            &before[0]["status"],
            &before[1]["status"],
            &before[2]["status"]
        ],
        ["succeeded", "failed", "cancelled"]
    );

    // The same ids come back: once straight onto pending (a replayed push), and through a lost
    // worker's in-flight list (registered, no heartbeat), which recovery moves back to pending.
    let mut c = s.redis.conn()?;
    redis::cmd("LPUSH")
        .arg(PENDING)
        .arg(&ok)
        .query::<()>(&mut c)?;
    let ghost = "ghost-worker";
    let ghost_inflight = format!("agentq:{{default}}:inflight:{ghost}");
    redis::cmd("SADD")
        .arg(WORKERS)
        .arg(ghost)
        .query::<()>(&mut c)?;
    redis::cmd("RPUSH")
        .arg(&ghost_inflight)
        .arg(&ids[..])
        .query::<()>(&mut c)?;
    let client = s.redis.client()?;
    eventually(
        "ghost recovered and its ids consumed",
        Duration::from_secs(15),
        || {
            let client = client.clone();
            let ghost_inflight = ghost_inflight.clone();
            async move {
                let mut c = client.get_connection()?;
                let (inflight, pending, member): (u64, u64, bool) = redis::pipe()
                    .llen(&ghost_inflight)
                    .llen(PENDING)
                    .sismember(WORKERS, ghost)
                    .query(&mut c)?;
                Ok(inflight == 0 && pending == 0 && !member)
            }
        },
    )
    .await?;
    // give a (wrong) second run time to show up
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        s.mock.calls(ok_p),
        1,
        "a finished task must not be run again"
    );
    assert_eq!(
        s.mock.calls(failed_p),
        1,
        "a dead task must not be run again"
    );
    assert_eq!(
        s.mock.calls(cancelled_p),
        0,
        "a cancelled task must never run"
    );
    for (id, was) in ids.iter().zip(&before) {
        let now = s.task(id).await?;
        assert_eq!(&now, was, "a dropped duplicate must leave the record alone");
    }
    let q = s.queue("default").await?;
    assert_eq!(
        (
            q["pending"].as_u64(),
            q["inflight"].as_u64(),
            q["dead"].as_u64(),
            q["workers"].as_u64()
        ),
        (Some(0), Some(0), Some(1), Some(1)),
        "{q}"
    );
    Ok(())
}

// ---- 6. SIGTERM / SIGINT ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_default_drain_exits_well_inside_the_grace_period() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    // an empty value means "use the built-in default" (100 s)
    let mut w = s
        .start_worker(&[
            ("AGENTQ_DRAIN_TIMEOUT_SECS", ""),
            ("WORKER_CONCURRENCY", "4"),
        ])
        .await?;
    let ps: Vec<String> = (0..4)
        .map(|i| format!("short-{i} [[sleep:1500]]"))
        .collect();
    let mut ids = Vec::new();
    for p in &ps {
        ids.push(s.submit(p).await?);
    }
    for id in &ids {
        s.wait_for(id, Duration::from_secs(10), |t| t["status"] == "running")
            .await?;
    }
    let t0 = Instant::now();
    w.proc.sigterm();
    let status = w.proc.wait_exit(Duration::from_secs(30))?;
    let took = t0.elapsed();
    assert!(status.success(), "exit {status:?}\n{}", w.proc.tail());
    // Kubernetes' default terminationGracePeriodSeconds is 30: a drain that only waits for
    // 1.5 s calls must be over in a few seconds, not wait for its 100 s budget.
    assert!(took < Duration::from_secs(5), "drain took {took:?}");
    let log = w.proc.log_text();
    assert!(
        log.contains("timeout_s=100"),
        "default drain not in effect:\n{log}"
    );
    let done = s.wait_final(&ids, Duration::from_secs(1)).await?;
    for (p, t) in ps.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 1);
        assert_eq!(s.mock.calls(p), 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_too_and_both_binaries_exit_0() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let mut w = s.start_worker(&[]).await?;
    let p = "interrupted [[sleep:1500]]";
    let id = s.submit(p).await?;
    s.wait_for(&id, Duration::from_secs(10), |t| t["status"] == "running")
        .await?;
    signal(w.proc.pid(), "INT");
    let status = w.proc.wait_exit(Duration::from_secs(15))?;
    assert_eq!(status.code(), Some(0), "{}", w.proc.tail());
    let t = s.task(&id).await?;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(s.mock.calls(p), 1);
    let api = s.api.as_mut().context("api running")?;
    signal(api.pid(), "INT");
    let status = api.wait_exit(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0), "{}", api.tail());
    Ok(())
}

// ---- 7. Redis outage and Redis refusing writes ----

async fn timed_get(s: &Stack, path: &str) -> anyhow::Result<(u16, Value, Duration)> {
    let t = Instant::now();
    let (status, v) = s.get_json(path).await?;
    Ok((status, v, t.elapsed()))
}

fn assert_unavailable(what: &str, status: u16, v: &Value, took: Duration) {
    assert_eq!(status, 503, "{what}: {v}");
    assert_eq!(v["error"]["code"], "unavailable", "{what}: {v}");
    assert!(v["error"]["message"].is_string(), "{what}: {v}");
    assert!(took < Duration::from_secs(5), "{what} took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_loses_no_acknowledged_task_and_the_api_answers_503() -> anyhow::Result<()> {
    let redis = RedisServer::start_with(true, &[])?;
    let mut s = Stack::with_redis(redis, MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w1 = s.start_worker(&[("WORKER_CONCURRENCY", "2")]).await?;
    let w2 = s.start_worker(&[("WORKER_CONCURRENCY", "2")]).await?;
    let mut acked: Vec<(String, String)> = Vec::new();
    // 4 will be mid-call when Redis dies, 4 wait in pending
    for i in 0..8 {
        let p = format!("before the outage {i} [[sleep:3000]]");
        acked.push((s.submit(&p).await?, p));
    }
    eventually("4 tasks in flight", Duration::from_secs(10), || async {
        Ok(s.queue("default").await?["inflight"] == 4)
    })
    .await?;
    s.redis.kill();
    let down = Instant::now();
    let calls_at_kill = s.mock.total_calls();
    assert!(calls_at_kill >= 4, "{calls_at_kill}");

    let t = Instant::now();
    let (status, v) = s.post(&json!({"prompt": "during the outage"})).await?;
    assert_unavailable("POST /v1/tasks", status, &v, t.elapsed());
    let id0 = acked[0].0.clone();
    for path in [
        format!("/v1/tasks/{id0}"),
        "/v1/queues/default".to_owned(),
        "/v1/queues/default/dead".to_owned(),
    ] {
        let (status, v, took) = timed_get(&s, &path).await?;
        assert_unavailable(&path, status, &v, took);
    }
    let t = Instant::now();
    let r = s
        .http
        .delete(format!("{}/v1/tasks/{id0}", s.api_url))
        .send()
        .await?;
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").cloned();
    assert_unavailable(
        "DELETE /v1/tasks/{id}",
        status,
        &r.json().await?,
        t.elapsed(),
    );
    assert!(
        retry_after.is_some(),
        "a 503 tells the client when to retry"
    );
    let (status, _, took) = timed_get(&s, "/readyz").await?;
    assert_eq!(status, 503, "api readyz while Redis is down");
    assert!(took < Duration::from_secs(5), "readyz took {took:?}");
    let r = s.http.get(format!("{}/readyz", w1.probe)).send().await?;
    assert_eq!(r.status(), 503, "worker readyz while Redis is down");

    // stay down until the in-flight calls have returned (3 s) and their writes have failed
    tokio::time::sleep_until((down + Duration::from_secs(4)).into()).await;
    assert_eq!(
        s.mock.total_calls(),
        calls_at_kill,
        "no new LLM calls while Redis is down, and the running ones are not repeated"
    );
    s.redis.resume()?;

    for i in 0..3 {
        let p = format!("after the outage {i}");
        acked.push((
            submit_when_available(&s, &p)
                .await
                .with_context(|| log_tails(&s))?,
            p,
        ));
    }
    let ids: Vec<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    let done = s
        .wait_final(&ids, Duration::from_secs(45))
        .await
        .with_context(|| log_tails(&s))?;
    for ((_, p), t) in acked.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{p}: {t}");
        assert_eq!(t["result"]["content"], format!("echo: {p}"));
    }
    // A duplicate run may still be on its LLM call when the first result lands: wait until every
    // call made has reported (as the one write, or as a dropped duplicate).
    let outcomes = || async {
        let (m1, m2) = (w1.metrics().await?, w2.metrics().await?);
        let written = metric(&m1, &series("succeeded")) + metric(&m2, &series("succeeded"));
        let dropped = metric(&m1, &series("duplicate")) + metric(&m2, &series("duplicate"));
        anyhow::Ok((written as u64, dropped as u64))
    };
    let calls = || acked.iter().map(|(_, p)| s.mock.calls(p)).sum::<u64>();
    let reported = eventually("every call reported", Duration::from_secs(15), || async {
        let (written, dropped) = outcomes().await?;
        Ok(written + dropped == calls())
    })
    .await;
    let (written, dropped) = outcomes().await?;
    reported
        .with_context(|| format!("{written} written + {dropped} dropped vs {} calls", calls()))?;
    assert_eq!(
        written as usize,
        acked.len(),
        "every result written exactly once"
    );
    for (_, p) in &acked {
        let n = s.mock.calls(p);
        // at least once; a second run only when recovery beat the owner's heartbeat after the restart
        assert!((1..=2).contains(&n), "{p}: {n} calls");
    }
    let q = s.queue("default").await?;
    assert_eq!(
        (
            q["pending"].as_u64(),
            q["inflight"].as_u64(),
            q["dead"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{q}"
    );
    assert_eq!(s.get_json("/readyz").await?.0, 200);
    assert!(
        s.all_logs().contains("redis write failed; retrying"),
        "results were held and their writes retried"
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_gets_503_in_time_and_a_keyed_retry_runs_once() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let running = "mid-call when Redis froze [[sleep:1500]]";
    let id = s.submit(running).await?;
    s.wait_for(&id, Duration::from_secs(10), |t| t["status"] == "running")
        .await?;
    // SIGSTOP: the socket stays open and nothing answers, unlike a crash
    let pid = s.redis.pid().context("redis running")?;
    signal(pid, "STOP");
    let keyed = |key: &'static str| {
        s.http
            .post(format!("{}/v1/tasks", s.api_url))
            .header("Idempotency-Key", key)
            .json(&json!({"prompt": "submitted while Redis froze"}))
            .send()
    };
    let path = format!("/v1/tasks/{id}");
    let t = Instant::now();
    let (post, get, ready) = tokio::join!(
        keyed("frozen-1"),
        timed_get(&s, &path),
        timed_get(&s, "/readyz")
    );
    let post = post?;
    let status = post.status().as_u16();
    let took = t.elapsed();
    assert_unavailable("POST while frozen", status, &post.json().await?, took);
    let (status, v, took) = get?;
    assert_unavailable("GET while frozen", status, &v, took);
    let (status, _, took) = ready?;
    assert_eq!(status, 503);
    assert!(took < Duration::from_secs(5), "readyz took {took:?}");
    signal(pid, "CONT");
    // The 503 cannot say whether the frozen enqueue will still happen (its bytes were sent), so
    // the client retries with the same key: whichever way it went, there is one task.
    let deadline = Instant::now() + Duration::from_secs(15);
    let again = loop {
        let r = keyed("frozen-1").await?;
        if r.status() == 202 {
            let v: Value = r.json().await?;
            break v["id"].as_str().context("id")?.to_owned();
        }
        assert_eq!(r.status(), 503);
        if Instant::now() > deadline {
            bail!("api never recovered");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let done = s
        .wait_final(&[id, again], Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(done[1]["status"], "succeeded", "{}", done[1]);
    assert_eq!(s.mock.calls(running), 1, "the held result was written once");
    eventually("queue drained", Duration::from_secs(10), || async {
        let q = s.queue("default").await?;
        Ok(q["pending"] == 0 && q["inflight"] == 0)
    })
    .await?;
    assert_eq!(s.mock.calls("submitted while Redis froze"), 1);
    assert_no_panic(&s);
    Ok(())
}

/// Writes junk keys until Redis refuses even a tiny write with OOM; returns how many it wrote.
/// (A big value can be refused only for its own size, so it ends with 1-byte values.)
fn fill_until_oom(client: redis::Client) -> anyhow::Result<usize> {
    let mut c = client.get_connection()?;
    let mut n = 0;
    for size in [1024, 64, 1] {
        let junk = "x".repeat(size);
        loop {
            match redis::cmd("SET")
                .arg(format!("junk:{n}"))
                .arg(&junk)
                .query::<()>(&mut c)
            {
                Ok(()) => n += 1,
                Err(e) if e.to_string().contains("OOM") => break,
                Err(e) => return Err(e.into()),
            }
            if n > 100_000 {
                bail!("maxmemory never reached");
            }
        }
    }
    // Right at the limit, memory that comes and goes (client buffers) can let one more write
    // through; pull the limit 64 KiB under what is used now so Redis stays full until the junk goes.
    let used = used_memory(&mut c)?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used.saturating_sub(64 * 1024))
        .query::<()>(&mut c)?;
    Ok(n)
}

/// `used_memory` from `INFO memory`: the bytes Redis counts against `maxmemory`.
fn used_memory(c: &mut redis::Connection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query(c)?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("used_memory in INFO")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_gets_503_and_paid_results_still_land() -> anyhow::Result<()> {
    let redis = RedisServer::start_with(
        false,
        &["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"],
    )?;
    let mut s = Stack::with_redis(redis, MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let p = "in flight when Redis fills up [[sleep:1500]]";
    let id = s.submit(p).await?;
    s.wait_for(&id, Duration::from_secs(10), |t| t["status"] == "running")
        .await?;
    let client = s.redis.client()?;
    let junk = tokio::task::spawn_blocking(move || fill_until_oom(client)).await??;
    for _ in 0..3 {
        let t = Instant::now();
        let (status, v) = s.post(&json!({"prompt": "while Redis is full"})).await?;
        assert_unavailable("POST /v1/tasks at maxmemory", status, &v, t.elapsed());
    }
    assert_eq!(
        s.task(&id).await?["status"],
        "running",
        "reads are still served"
    );
    // The result write (complete.lua) starts with LREM, which Redis lets through at maxmemory, and
    // a script that has written once runs to its end: the paid-for result lands even now.
    let done = s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(15))
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(done[0]["attempts"], 1);
    assert_eq!(s.mock.calls(p), 1);
    assert_eq!(
        s.post(&json!({"prompt": "still full"})).await?.0,
        503,
        "Redis still refuses new tasks"
    );
    let mut c = s.redis.conn()?;
    let keys: Vec<String> = (0..junk).map(|i| format!("junk:{i}")).collect();
    for chunk in keys.chunks(500) {
        redis::cmd("DEL").arg(chunk).query::<()>(&mut c)?;
    }
    // Deleting the junk alone does not make room: Redis already uses ~1.95 of its 2 MiB here, so
    // the fill takes only ~100 KiB (91 keys in one run), and right after the DEL `used_memory` was
    // still 2.10 MB, over the lowered limit, falling below it only as Redis trimmed idle clients'
    // buffers over seconds (8 s and then refilled at once on a loaded CI machine: a failed run).
    // An operator makes room for good, so the limit the fill lowered goes back up too: to its
    // first value, and at least 1 MiB above what is used now.
    let used = used_memory(&mut c)?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg((2u64 << 20).max(used + (1 << 20)))
        .query::<()>(&mut c)?;
    let after = submit_when_available(&s, "after Redis has room again")
        .await
        .with_context(|| log_tails(&s))?;
    let done = s
        .wait_final(&[after], Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(s.mock.calls("after Redis has room again"), 1);
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refusing_writes_the_worker_keeps_its_result_until_it_lands() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = s.start_worker(&[]).await?;
    let p = "result held while Redis refuses writes [[sleep:2000]]";
    let id = s.submit(p).await?;
    s.wait_for(&id, Duration::from_secs(10), |t| t["status"] == "running")
        .await?;
    // With no replica attached, min-replicas-to-write makes Redis refuse every write (NOREPLICAS),
    // inside scripts too, while reads go on: a primary cut off from its replicas.
    let mut c = s.redis.conn()?;
    redis::cmd("CONFIG")
        .arg(&["SET", "min-replicas-to-write", "1"])
        .query::<()>(&mut c)?;
    let t = Instant::now();
    let (status, v) = s
        .post(&json!({"prompt": "while writes are refused"}))
        .await?;
    assert_unavailable("POST /v1/tasks without writes", status, &v, t.elapsed());
    when_calls_reach(&s.mock, p, 1, Duration::from_secs(5)).await?;
    // the call returns after 2 s; give the worker 1.5 s more of refused writes
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let t = s.task(&id).await?;
    assert_eq!(
        t["status"], "running",
        "the result cannot be written yet: {t}"
    );
    assert!(
        w.proc.log_text().contains("redis write failed; retrying"),
        "the worker retries the write:\n{}",
        w.proc.tail()
    );
    redis::cmd("CONFIG")
        .arg(&["SET", "min-replicas-to-write", "0"])
        .query::<()>(&mut c)?;
    let done = s
        .wait_final(&[id], Duration::from_secs(15))
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(done[0]["attempts"], 1);
    assert_eq!(done[0]["result"]["content"], format!("echo: {p}"));
    assert_eq!(
        s.mock.calls(p),
        1,
        "the held result was written, not recomputed"
    );
    let m = w.metrics().await?;
    assert_eq!(metric(&m, &series("succeeded")), 1.0, "{m}");
    let after = submit_when_available(&s, "after writes are back")
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(
        s.wait_final(&[after], Duration::from_secs(20))
            .await
            .with_context(|| log_tails(&s))?[0]["status"],
        "succeeded"
    );
    assert_no_panic(&s);
    Ok(())
}

// ---- 8. bad input at the API ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_bad_requests_get_a_4xx_json_error_and_write_nothing() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let json_ct = Some("application/json");
    let ok_body = br#"{"prompt": "x"}"#.to_vec();
    let deep = format!(
        r#"{{"prompt": "x", "metadata": {{"a": {}1{}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let long_key = "k".repeat(256);
    let none: &[(&str, &[u8])] = &[];
    // (what, content type, body, extra headers, status, error field; "x*" = starts with "x")
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        Vec<u8>,
        Vec<(&'a str, &'a [u8])>,
        u16,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "invalid UTF-8 in a key",
            json_ct,
            b"{\"pro\xffmpt\": \"x\"}".to_vec(),
            none.to_vec(),
            400,
            "body",
        ),
        (
            "invalid UTF-8 between tokens",
            json_ct,
            b"{\"prompt\": \"x\", \xff}".to_vec(),
            none.to_vec(),
            400,
            "body",
        ),
        (
            "overlong UTF-8 in a string",
            json_ct,
            b"{\"prompt\": \"\xc0\xaf\"}".to_vec(),
            none.to_vec(),
            400,
            "prompt",
        ),
        (
            "UTF-16 surrogate in a string",
            json_ct,
            b"{\"prompt\": \"\xed\xa0\x80\"}".to_vec(),
            none.to_vec(),
            400,
            "prompt",
        ),
        (
            "lone surrogate escape",
            json_ct,
            br#"{"prompt": "\ud800"}"#.to_vec(),
            none.to_vec(),
            400,
            "prompt",
        ),
        (
            "UTF-8 BOM",
            json_ct,
            b"\xef\xbb\xbf{\"prompt\": \"x\"}".to_vec(),
            none.to_vec(),
            422,
            "body",
        ),
        (
            "empty body",
            json_ct,
            Vec::new(),
            none.to_vec(),
            400,
            "body",
        ),
        (
            "null body",
            json_ct,
            b"null".to_vec(),
            none.to_vec(),
            422,
            "body",
        ),
        (
            "nesting past the parser's limit",
            json_ct,
            deep.into_bytes(),
            none.to_vec(),
            400,
            "metadata.a[0]*",
        ),
        (
            "duplicate field",
            json_ct,
            br#"{"prompt": "a", "prompt": "b"}"#.to_vec(),
            none.to_vec(),
            422,
            "prompt",
        ),
        (
            "max_attempts above u32",
            json_ct,
            br#"{"prompt": "x", "max_attempts": 4294967296}"#.to_vec(),
            none.to_vec(),
            422,
            "max_attempts",
        ),
        (
            "max_attempts above u64",
            json_ct,
            br#"{"prompt": "x", "max_attempts": 18446744073709551616}"#.to_vec(),
            none.to_vec(),
            422,
            "max_attempts",
        ),
        (
            "max_attempts 1e300",
            json_ct,
            br#"{"prompt": "x", "max_attempts": 1e300}"#.to_vec(),
            none.to_vec(),
            422,
            "max_attempts",
        ),
        (
            "max_attempts 101",
            json_ct,
            br#"{"prompt": "x", "max_attempts": 101}"#.to_vec(),
            none.to_vec(),
            422,
            "max_attempts",
        ),
        (
            "max_attempts 2.5",
            json_ct,
            br#"{"prompt": "x", "max_attempts": 2.5}"#.to_vec(),
            none.to_vec(),
            422,
            "max_attempts",
        ),
        (
            "max_attempts 0",
            json_ct,
            br#"{"prompt": "x", "max_attempts": 0}"#.to_vec(),
            none.to_vec(),
            422,
            "max_attempts",
        ),
        (
            "max_attempts as a string",
            json_ct,
            br#"{"prompt": "x", "max_attempts": "3"}"#.to_vec(),
            none.to_vec(),
            422,
            "max_attempts",
        ),
        (
            "Idempotency-Key of 256 chars",
            json_ct,
            ok_body.clone(),
            vec![("Idempotency-Key", long_key.as_bytes())],
            400,
            "Idempotency-Key",
        ),
        (
            "non-ASCII Idempotency-Key",
            json_ct,
            ok_body.clone(),
            vec![("Idempotency-Key", "schlüssel".as_bytes())],
            400,
            "Idempotency-Key",
        ),
        (
            "Latin-1 Idempotency-Key",
            json_ct,
            ok_body.clone(),
            vec![("Idempotency-Key", b"cl\xe9")],
            400,
            "Idempotency-Key",
        ),
        (
            "empty Idempotency-Key",
            json_ct,
            ok_body.clone(),
            vec![("Idempotency-Key", b"")],
            400,
            "Idempotency-Key",
        ),
        (
            "Idempotency-Key with a tab",
            json_ct,
            ok_body.clone(),
            vec![("Idempotency-Key", b"a\tb")],
            400,
            "Idempotency-Key",
        ),
        (
            "no Content-Type",
            None,
            ok_body.clone(),
            none.to_vec(),
            415,
            "Content-Type",
        ),
        (
            "XML Content-Type",
            Some("application/xml"),
            ok_body.clone(),
            none.to_vec(),
            415,
            "Content-Type",
        ),
        (
            "form Content-Type",
            Some("application/x-www-form-urlencoded"),
            ok_body.clone(),
            none.to_vec(),
            415,
            "Content-Type",
        ),
        (
            "multipart Content-Type",
            Some("multipart/form-data; boundary=x"),
            ok_body.clone(),
            none.to_vec(),
            415,
            "Content-Type",
        ),
        (
            "JSON-ish Content-Type",
            Some("application/jsonl"),
            ok_body.clone(),
            none.to_vec(),
            415,
            "Content-Type",
        ),
        (
            "text/json",
            Some("text/json"),
            ok_body.clone(),
            none.to_vec(),
            415,
            "Content-Type",
        ),
    ];
    for (what, ct, body, headers, want, field) in cases {
        let (status, v) = s.post_raw(ct, body, &headers).await?;
        assert_eq!(status, want, "{what}: {v}");
        let got = v["error"]["field"].as_str().unwrap_or_default();
        match field.strip_suffix('*') {
            Some(prefix) => assert!(got.starts_with(prefix), "{what}: {v}"),
            None => assert_eq!(got, field, "{what}: {v}"),
        }
        assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{what}: {v}"
        );
    }
    assert_eq!(
        s.redis.dbsize()?,
        0,
        "a rejected request must create nothing in Redis"
    );
    assert_eq!(s.get_json("/healthz").await?.0, 200, "the api survived");
    // the limits themselves are accepted
    let key = "k".repeat(255);
    let (status, v) = s
        .post_raw(
            json_ct,
            br#"{"prompt": "x", "max_attempts": 100}"#.to_vec(),
            &[("Idempotency-Key", key.as_bytes())],
        )
        .await?;
    assert_eq!(status, 202, "{v}");
    let (status, v) = s
        .post_raw(Some("application/json; charset=utf-8"), ok_body, none)
        .await?;
    assert_eq!(status, 202, "{v}");
    // as api/openapi.json says: 3.0 is the integer 3, and null is the same as leaving a field out
    let (status, v) = s
        .post(&json!({"prompt": "x", "max_attempts": 3.0, "messages": null, "model": null, "metadata": null}))
        .await?;
    assert_eq!(status, 202, "{v}");
    let t = s.task(v["id"].as_str().unwrap_or_default()).await?;
    assert_eq!(t["max_attempts"], 3, "{t}");
    assert_no_panic(&s);
    Ok(())
}

// ---- 9. dead letters over HTTP ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_redriven_over_http() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let first = "dies once [[fail:400:1]]";
    let second = "dies once too [[fail:422:1]]";
    let a = s.submit(first).await?;
    let done = s
        .wait_final(std::slice::from_ref(&a), Duration::from_secs(20))
        .await?;
    assert_eq!(done[0]["status"], "failed");
    let b = s.submit(second).await?;
    s.wait_final(std::slice::from_ref(&b), Duration::from_secs(20))
        .await?;
    // a dead entry whose record is gone (expired) is dropped by a redrive, not resurrected
    let orphan = TaskId::generate("default")?.to_string();
    let mut c = s.redis.conn()?;
    redis::cmd("ZADD")
        .arg("agentq:{default}:dead")
        .arg(1)
        .arg(&orphan)
        .query::<()>(&mut c)?;

    let dead = s.dead("default").await?;
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert_eq!(dead[0]["id"], b.as_str(), "newest first");
    let da = dead_entry(&dead, &a).context("first not listed")?;
    assert!(
        da["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("llm answered 400"),
        "{da}"
    );
    assert_eq!(da["attempts"], 1);
    assert!(da["died_at"].is_string());
    let (status, v) = s.get_json("/v1/queues/default/dead?limit=1").await?;
    assert_eq!(
        (status, v["tasks"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );
    for bad in ["?limit=0", "?limit=1001", "?limit=x", "?colour=red"] {
        let (status, v) = s.get_json(&format!("/v1/queues/default/dead{bad}")).await?;
        assert_eq!(status, 422, "{bad}: {v}");
    }

    // oldest first: the orphan (score 1) and the first task
    let (status, v) = s.redrive("default", Some(2)).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["redriven"].as_u64(), v["dropped"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    let done = s
        .wait_final(std::slice::from_ref(&a), Duration::from_secs(20))
        .await?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(done[0]["attempts"], 1, "a redrive starts a fresh count");
    assert!(done[0]["error"].is_null());
    assert_eq!(s.mock.calls(first), 2);
    let dead = s.dead("default").await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], b.as_str());

    let (status, v) = s.redrive("default", None).await?;
    assert_eq!((status, v["redriven"].as_u64()), (200, Some(1)), "{v}");
    let done = s.wait_final(&[b], Duration::from_secs(20)).await?;
    assert_eq!(done[0]["status"], "succeeded");
    assert_eq!(s.mock.calls(second), 2);
    assert!(s.dead("default").await?.is_empty());
    let (status, v) = s.redrive("default", None).await?;
    assert_eq!((status, v["redriven"].as_u64()), (200, Some(0)), "{v}");
    assert_eq!(s.queue("default").await?["dead"], 0);
    Ok(())
}

// ---- 10. timeouts ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_llm_call_times_out_and_frees_its_permit() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w: Worker = s
        .start_worker(&[
            ("WORKER_CONCURRENCY", "1"),
            ("AGENTQ_LLM_TIMEOUT_SECS", "1"),
        ])
        .await?;
    let hang = "hangs forever [[hang]]";
    let next = "runs after the hang";
    let a = submit_max(&s, hang, 1).await?;
    let b = s.submit(next).await?;
    when_calls_reach(&s.mock, hang, 1, Duration::from_secs(10)).await?;
    let t = s.task(&b).await?;
    assert_eq!(
        t["status"], "queued",
        "one permit: the next task waits: {t}"
    );
    let t = s
        .wait_for(&a, Duration::from_secs(10), |t| t["status"] == "failed")
        .await?;
    let done = s
        .wait_final(std::slice::from_ref(&b), Duration::from_secs(10))
        .await?;
    // the worker's own clock (Unix ms in the records): fetch → timeout → failure written
    let mut c = s.redis.conn()?;
    let ms = |c: &mut redis::Connection, id: &str, field: &str| -> anyhow::Result<i64> {
        Ok(redis::cmd("HGET").arg(task_key(id)).arg(field).query(c)?)
    };
    let took = ms(&mut c, &a, "finished_at")? - ms(&mut c, &a, "started_at")?;
    assert!(
        (1000..2500).contains(&took),
        "AGENTQ_LLM_TIMEOUT_SECS=1 should end the call after 1 s, took {took} ms"
    );
    assert!(
        ms(&mut c, &b, "started_at")? >= ms(&mut c, &a, "finished_at")?,
        "the next task started only when the hanging one let go of the permit"
    );
    assert!(
        t["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{t}"
    );
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(s.mock.calls(hang), 1);
    assert_eq!(s.mock.calls(next), 1);
    let m = w.metrics().await?;
    assert_eq!(metric(&m, "agentq_active_tasks"), 0.0, "{m}");
    Ok(())
}
