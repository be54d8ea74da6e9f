//! Issue 11's wire cases against the in-process mock LLM, which speaks each of them on demand
//! (`[[fail:429:…]]` header forms, `[[reply:KIND]]` shapes): every rate-limit header users meet is
//! honoured end to end, waits without a hint grow with the task's 429s, the reply shapes real
//! servers send become results (or a named failure), and the request carries the output cap and no
//! empty bearer. The same cases against third-party servers are in `wire_litellm.rs` and
//! `wire_aimock.rs`.

use std::collections::HashMap;
use std::time::Duration;

use agentq_mock_llm::CallOutcome;
use agentq_tests::{
    assert_no_panic, llm_series, log_tails, metric, submit_max, task_key, MockConfig, Stack,
};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

fn journaled() -> MockConfig {
    MockConfig {
        journal: true,
        record: true,
        ..MockConfig::default()
    }
}

/// Start instants of every journaled call of `prompt`, in call order.
fn call_starts(s: &Stack, prompt: &str) -> Vec<(u64, std::time::Instant, CallOutcome)> {
    let mut calls: Vec<_> = s
        .mock
        .journal()
        .into_iter()
        .filter(|c| c.prompt == prompt)
        .map(|c| (c.call, c.start, c.outcome))
        .collect();
    calls.sort_by_key(|c| c.0);
    calls
}

/// The sum of every series of `name` whose labels include all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn field(c: &mut redis::Connection, id: &str, name: &str) -> Result<i64> {
    let v: Option<i64> = redis::cmd("HGET").arg(task_key(id)).arg(name).query(c)?;
    Ok(v.unwrap_or(0))
}

/// Each header form: the retry comes no earlier than the hint, and not much later (the hint is
/// spread upward by at most a fifth, then promoted within 250 ms and fetched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rate_limit_header_form_is_honoured() -> Result<()> {
    let mut s = Stack::new(journaled()).await?;
    s.start_api(&[]).await?;
    let _w = s
        .start_worker(&[
            ("AGENTQ_RETRY_BASE_MS", "50"),
            ("AGENTQ_RETRY_MAX_MS", "10000"),
        ])
        .await?;
    // (marker, least wait in ms, most wait in ms)
    let cases: &[(&str, u64, u64)] = &[
        ("[[fail:429:1:ms:1500]]", 1500, 2900),
        ("[[fail:429:1:reset:1500ms]]", 1500, 2900),
        ("[[fail:429:1:reset_tokens:1.5s]]", 1500, 2900),
        ("[[fail:429:1:litellm:1.5]]", 1500, 2900),
        // an RFC 3339 instant 2 s ahead, rounded up to the second: 2–3 s
        ("[[fail:429:1:anthropic:2]]", 1900, 4500),
        // retry-after-ms wins over a reset header that says 6 minutes
        ("[[fail:429:1:reset:6m0s:ms:1200]]", 1200, 2700),
        // Retry-After: 0 is no hint: the first backoff is at most 50 ms here
        ("[[fail:429:1:raw:0]]", 0, 900),
        // garbage is no hint either
        ("[[fail:429:1:raw:soon]]", 0, 900),
    ];
    let mut ids = Vec::new();
    // Each case on a model of its own: a 429 blocks its model for the whole fleet (flow
    // control), and these cases measure each task's own wait, not each other's blocks.
    for (i, (marker, _, _)) in cases.iter().enumerate() {
        ids.push(
            s.submit_json(&serde_json::json!({"prompt": format!("hint {marker}"), "model": format!("hint-{i}")}))
                .await?,
        );
    }
    let done = s
        .wait_final(&ids, Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    let mut c = s.redis.conn()?;
    for (((marker, least, most), id), t) in cases.iter().zip(&ids).zip(&done) {
        let prompt = format!("hint {marker}");
        assert_eq!(t["status"], "succeeded", "{marker}: {t}");
        assert_eq!(t["rate_limited"], 1, "{marker}: {t}");
        assert_eq!(t["attempts"], 1, "a 429 uses no attempt: {marker}: {t}");
        assert_eq!(field(&mut c, id, "runs")?, 2, "{marker}");
        let calls = call_starts(&s, &prompt);
        ensure!(
            calls.len() == 2,
            "{marker}: one 429 and one success, got {calls:?}"
        );
        assert_eq!(calls[0].2, CallOutcome::Status(429), "{marker}");
        assert_eq!(calls[1].2, CallOutcome::Status(200), "{marker}");
        let gap = calls[1].1 - calls[0].1;
        let gap_ms = gap.as_millis() as u64;
        assert!(
            (*least..*most).contains(&gap_ms),
            "{marker}: retried {gap_ms} ms after the 429, wanted {least}..{most}"
        );
        println!("wire: {marker}: retried after {gap_ms} ms");
    }
    assert_no_panic(&s);
    Ok(())
}

/// Bare 429s (no header): the wait grows with the task's count of 429s, so the cap spans real
/// time. Ten tasks each get six 429s; the sixth wait is drawn from [0, 1.6 s], the first from
/// [0, 50 ms]. Before the fix every wait came from the first attempt's range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_without_a_hint_grow_with_the_count_of_429s() -> Result<()> {
    let mut s = Stack::new(journaled()).await?;
    s.start_api(&[]).await?;
    let w = s
        .start_worker(&[
            ("AGENTQ_RETRY_BASE_MS", "50"),
            ("AGENTQ_RETRY_MAX_MS", "2000"),
            ("AGENTQ_LOG_FORMAT", "json"),
        ])
        .await?;
    let prompts: Vec<String> = (0..10)
        .map(|i| format!("bare {i} [[fail:429:6]]"))
        .collect();
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(s.submit(p).await?);
    }
    let done = s
        .wait_final(&ids, Duration::from_secs(40))
        .await
        .with_context(|| log_tails(&s))?;
    // The waits the worker chose after each 429, from its "task run failed" lines. The gaps
    // between calls are no measure of them: every 429 also blocks the model for the whole fleet
    // (flow control), so with ten tasks at it a retry often waits behind the others' blocks and
    // turns, and a first gap measured anywhere from 0.25 to 2 s. The waits themselves must grow
    // with the task's count of 429s, and every gap must be at least its wait.
    let mut waits: HashMap<String, Vec<f64>> = HashMap::new();
    for line in w.proc.log_text().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["message"] == "task run failed" && v["status"] == "rate_limited" {
            if let (Some(id), Some(ms)) = (v["task.id"].as_str(), v["retry_in_ms"].as_f64()) {
                waits.entry(id.to_owned()).or_default().push(ms);
            }
        }
    }
    let (mut first, mut sixth) = (Vec::new(), Vec::new());
    for ((p, id), t) in prompts.iter().zip(&ids).zip(&done) {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["rate_limited"], 6, "{t}");
        assert_eq!(t["attempts"], 1, "{t}");
        let calls = call_starts(&s, p);
        assert_eq!(calls.len(), 7, "six 429s and one success: {calls:?}");
        let w = waits.get(id).cloned().unwrap_or_default();
        assert_eq!(w.len(), 6, "{id}: the worker logged waits {w:?}");
        for (n, wait) in w.iter().enumerate() {
            // full jitter on the nth 429: 5 ms (base / 10) up to 50 ms × 2^(n-1), capped at 2 s
            let cap = (50.0 * f64::from(1u32 << n)).min(2000.0);
            assert!(
                (5.0..=cap).contains(wait),
                "{id}: wait {wait} ms after 429 #{} is outside 5..={cap}",
                n + 1
            );
            let gap = (calls[n + 1].1 - calls[n].1).as_secs_f64() * 1000.0;
            assert!(
                gap + 2.0 >= *wait,
                "{id}: called again {gap:.0} ms after 429 #{}, before its wait of {wait} ms",
                n + 1
            );
        }
        first.push(w[0]);
        sixth.push(w[5]);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (m1, m6) = (mean(&first), mean(&sixth));
    println!("wire: mean wait chosen after the 1st 429 {m1:.0} ms, after the 6th {m6:.0} ms");
    // expected: m1 ≈ 27 ms, m6 ≈ 800 ms (sd of a mean of ten ≈ 146 ms)
    assert!(
        m6 > m1 + 300.0,
        "waits did not grow: after the 1st 429 {m1:.0} ms, after the 6th {m6:.0} ms"
    );
    let text = w.metrics().await?;
    assert_eq!(metric(&text, &llm_series("mock-gpt", "rate_limited")), 60.0);
    assert_eq!(metric(&text, &llm_series("mock-gpt", "ok")), 10.0);
    assert_no_panic(&s);
    Ok(())
}

/// The reply shapes real servers send: each a result with the fields kept, in one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_shapes_of_real_servers_become_results() -> Result<()> {
    let mut s = Stack::new(journaled()).await?;
    s.start_api(&[]).await?;
    let w = s.start_worker(&[]).await?;
    let kinds = [
        "tool_calls",
        "refusal",
        "groq",
        "sparse",
        "no_usage",
        "cached",
        "parts",
    ];
    let prompts: Vec<String> = kinds
        .iter()
        .map(|k| format!("shape {k} [[reply:{k}]]"))
        .collect();
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(s.submit(p).await?);
    }
    let done = s
        .wait_final(&ids, Duration::from_secs(15))
        .await
        .with_context(|| log_tails(&s))?;
    let echo = |p: &str| format!("echo: {p}");
    for ((kind, p), t) in kinds.iter().zip(&prompts).zip(&done) {
        assert_eq!(t["status"], "succeeded", "{kind}: {t}");
        assert_eq!(t["attempts"], 1, "{kind}: {t}");
        assert_eq!(s.mock.calls(p), 1, "{kind}");
        let r = &t["result"];
        let u = &r["usage"];
        match *kind {
            "tool_calls" => {
                assert_eq!(r["content"], "", "{r}");
                assert_eq!(r["finish_reason"], "tool_calls", "{r}");
                let call = &r["tool_calls"][0];
                assert_eq!(call["type"], "function", "{r}");
                assert_eq!(call["function"]["name"], "get_weather", "{r}");
                assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#, "{r}");
            }
            "refusal" => {
                assert_eq!(r["content"], "", "{r}");
                assert_eq!(r["refusal"], "I can't help with that.", "{r}");
                assert_eq!(r["finish_reason"], "stop", "{r}");
            }
            "groq" => {
                assert_eq!(r["content"], echo(p), "{r}");
                assert_eq!(r["finish_reason"], "stop", "{r}");
            }
            "sparse" => {
                assert_eq!(r["content"], echo(p), "{r}");
                assert_eq!(r["finish_reason"], "eos_token", "{r}");
                // model: null → the model asked for; no total_tokens → computed
                assert_eq!(r["model"], "mock-gpt", "{r}");
                assert_eq!(
                    u["total_tokens"].as_u64(),
                    Some(
                        u["prompt_tokens"].as_u64().unwrap_or(0)
                            + u["completion_tokens"].as_u64().unwrap_or(0)
                    ),
                    "{r}"
                );
                assert!(u["prompt_tokens"].as_u64() > Some(0), "{r}");
            }
            "no_usage" => {
                assert_eq!(r["content"], echo(p), "{r}");
                assert_eq!(
                    u,
                    &json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}),
                    "{r}"
                );
            }
            "cached" => {
                assert_eq!(u["cached_tokens"], 3, "{r}");
                assert_eq!(u["reasoning_tokens"], 2, "{r}");
            }
            "parts" => assert_eq!(r["content"], echo(p), "{r}"),
            _ => unreachable!(),
        }
        for absent in ["refusal", "tool_calls"] {
            if !kind.starts_with(absent) {
                assert!(
                    r.get(absent).is_none(),
                    "{kind}: {absent} must be absent: {r}"
                );
            }
        }
    }
    let text = w.metrics().await?;
    assert_eq!(metric(&text, &llm_series("mock-gpt", "ok")), 7.0);
    assert_no_panic(&s);
    Ok(())
}

/// Replies that carry nothing usable, and errors inside a 200: named, classified, exact calls;
/// the empty reply's tokens are still counted (they were paid for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_replies_and_errors_in_a_200_are_named_and_classified() -> Result<()> {
    let mut s = Stack::new(journaled()).await?;
    s.start_api(&[]).await?;
    let w = s.start_worker(&[]).await?;
    let empty = "nothing [[reply:empty]]";
    let empty_id = submit_max(&s, empty, 3).await?;
    let [t] = &s
        .wait_final(std::slice::from_ref(&empty_id), Duration::from_secs(10))
        .await?[..]
    else {
        unreachable!()
    };
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["attempts"], 1, "permanent: one call: {t}");
    let e = t["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("no content") && e.contains("finish_reason: length"),
        "{t}"
    );
    assert_eq!(s.mock.calls(empty), 1);
    let text = w.metrics().await?;
    assert_eq!(
        metric(&text, &llm_series("mock-gpt", "empty_response")),
        1.0
    );
    let paid = metric_sum(&text, "agentq_llm_tokens_total", &["direction=\"prompt\""]);
    assert!(
        paid > 0.0,
        "the empty reply's tokens were not counted:\n{text}"
    );
    let dead = s.dead("default").await?;
    assert!(
        dead.iter().any(|d| d["id"] == empty_id.as_str()),
        "{dead:?}"
    );

    let once = "overloaded once [[reply:error200:1]]";
    let always = "overloaded always [[reply:error200]]";
    let limited = "rate limited in a 200 [[reply:error200_rate:1]]";
    let ids = vec![
        submit_max(&s, once, 3).await?,
        submit_max(&s, always, 2).await?,
        submit_max(&s, limited, 3).await?,
    ];
    let done = s
        .wait_final(&ids, Duration::from_secs(15))
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(
        done[0]["attempts"], 2,
        "transient: a second attempt: {}",
        done[0]
    );
    assert_eq!(s.mock.calls(once), 2);
    assert_eq!(done[1]["status"], "failed", "{}", done[1]);
    assert_eq!(done[1]["attempts"], 2, "{}", done[1]);
    assert_eq!(s.mock.calls(always), 2);
    assert!(
        done[1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("upstream overloaded"),
        "the server's message is kept: {}",
        done[1]
    );
    assert_eq!(done[2]["status"], "succeeded", "{}", done[2]);
    assert_eq!(
        (done[2]["attempts"].clone(), done[2]["rate_limited"].clone()),
        (json!(1), json!(1)),
        "{}",
        done[2]
    );
    assert_eq!(s.mock.calls(limited), 2);
    let text = w.metrics().await?;
    assert_eq!(
        metric(&text, &llm_series("mock-gpt", "upstream_error")),
        3.0
    );
    assert_eq!(metric(&text, &llm_series("mock-gpt", "rate_limited")), 1.0);
    assert_no_panic(&s);
    Ok(())
}

/// The request: `max_tokens` from AGENTQ_MAX_TOKENS on every call (or under the other name, or
/// none), and no `Authorization` header at all without a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_the_output_cap_and_no_empty_bearer() -> Result<()> {
    let mut s = Stack::new(journaled()).await?;
    s.start_api(&[]).await?;
    // (worker env, prompt, expected Authorization, max_tokens, max_completion_tokens)
    type Case<'a> = (
        &'a [(&'a str, &'a str)],
        &'a str,
        Option<&'a str>,
        Option<u64>,
        Option<u64>,
    );
    let cases: [Case<'_>; 4] = [
        (&[("OPENAI_API_KEY", "")], "no key", None, Some(4096), None),
        (
            &[("AGENTQ_MAX_TOKENS", "77")],
            "with key",
            Some("Bearer sk-test-secret"),
            Some(77),
            None,
        ),
        (
            &[
                ("AGENTQ_MAX_TOKENS", "300"),
                ("AGENTQ_MAX_TOKENS_PARAM", "max_completion_tokens"),
            ],
            "reasoning model",
            Some("Bearer sk-test-secret"),
            None,
            Some(300),
        ),
        (
            &[("AGENTQ_MAX_TOKENS", "0")],
            "no cap",
            Some("Bearer sk-test-secret"),
            None,
            None,
        ),
    ];
    for (env, prompt, auth, max_tokens, max_completion) in cases {
        let mut w = s.start_worker(env).await?;
        let id = s.submit(prompt).await?;
        let t = &s.wait_final(&[id], Duration::from_secs(10)).await?[0];
        assert_eq!(t["status"], "succeeded", "{prompt}: {t}");
        w.proc.sigterm();
        w.proc.wait_exit(Duration::from_secs(10))?;
        let records: Vec<_> = s
            .mock
            .request_records()
            .into_iter()
            .filter(|r| r.prompt == prompt)
            .collect();
        assert_eq!(records.len(), 1, "{prompt}");
        let r = &records[0];
        assert_eq!(r.authorization.as_deref(), auth, "{prompt}");
        assert_eq!(r.max_tokens, max_tokens, "{prompt}: {}", r.body);
        assert_eq!(
            r.max_completion_tokens, max_completion,
            "{prompt}: {}",
            r.body
        );
        let keys: Vec<&String> = r
            .body
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        // streamed (AGENTQ_STREAM=on, the default), with the usage chunk asked for
        let mut want = vec!["messages", "model", "stream", "stream_options"];
        assert_eq!(r.body["stream"], true, "{prompt}: {}", r.body);
        assert_eq!(
            r.body["stream_options"],
            serde_json::json!({"include_usage": true}),
            "{prompt}: {}",
            r.body
        );
        want.extend(max_tokens.map(|_| "max_tokens"));
        want.extend(max_completion.map(|_| "max_completion_tokens"));
        want.sort_unstable();
        let mut got: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        got.sort_unstable();
        assert_eq!(
            got, want,
            "{prompt}: only what was asked for is sent: {}",
            r.body
        );
        assert_eq!(
            r.body["messages"],
            Value::from(vec![json!({"role": "user", "content": prompt})]),
            "{prompt}"
        );
    }
    assert_no_panic(&s);
    Ok(())
}
