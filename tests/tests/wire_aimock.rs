//! Issue 11, proved against a server nobody here wrote: aimock (npm `@copilotkit/aimock` 1.43.0,
//! installed by `tests/peers/aimock/install.sh`), with the real redis-server, agentq-api and
//! agentq-worker. Each test scripts aimock with fixtures, points the worker's `OPENAI_BASE_URL`
//! at it and asserts the final task records and the exact calls aimock's request journal saw
//! (status by status, with aimock's timestamps for the waits).
//!
//! What aimock cannot express, and what stands in for it:
//! - a refusal (`content: null`, `refusal: "..."`): aimock always sends `refusal: null`, so the
//!   refusal case is not tested here (the in-process mock's `[[reply:refusal]]` sends one);
//! - a 429 with only `Retry-After`: aimock adds fixed `x-ratelimit-*` headers to every 429
//!   (`remaining-requests: 0`, `reset-requests: 1s`, `reset-tokens: 6m0s`), so `Retry-After: 0`
//!   is tested as it arrives, with those next to it: the worker must skip the 0 and still wait.
//!   A rate limit with no usable header at all is a 200 whose body is a `rate_limit_error`.

use std::time::Duration;

use agentq_tests::aimock::{self, on, rate_limited, sequence, text, Aimock, Call};
use agentq_tests::{
    assert_no_panic, llm_series, log_tails, metric, submit_max, MockConfig, Stack, Worker,
};
use anyhow::Context;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// Redis, aimock with `fixtures`, the api and one worker whose LLM is aimock.
async fn start(
    fixtures: Vec<Value>,
    worker_env: &[(&str, &str)],
) -> anyhow::Result<(Stack, Aimock, Worker)> {
    let mut s = Stack::new(MockConfig::default()).await?;
    let am = Aimock::start(&fixtures, s.logs.path()).await?;
    s.env
        .insert("OPENAI_BASE_URL".to_owned(), am.openai_base_url());
    s.start_api(&[]).await?;
    let w = s.start_worker(worker_env).await?;
    Ok((s, am, w))
}

/// Waits for every task to be final; on a timeout the error carries every process's log tail.
async fn finals(s: &Stack, ids: &[String]) -> anyhow::Result<Vec<Value>> {
    s.wait_final(ids, WAIT)
        .await
        .with_context(|| format!("logs:\n{}", log_tails(s)))
}

fn statuses(calls: &[Call]) -> Vec<u16> {
    calls.iter().map(|c| c.status).collect()
}

/// Milliseconds between consecutive calls, on aimock's clock.
fn gaps(calls: &[Call]) -> Vec<i64> {
    calls.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect()
}

/// Every call aimock saw was answered by a fixture (none fell through to its 404 no-match).
async fn assert_all_matched(s: &Stack, am: &Aimock) -> anyhow::Result<()> {
    let calls = am.calls().await?;
    let stray: Vec<String> = calls
        .iter()
        .filter(|c| !c.matched)
        .map(|c| c.prompt.clone())
        .collect();
    assert!(
        stray.is_empty(),
        "calls no fixture matched: {stray:?}\n{}",
        log_tails(s)
    );
    Ok(())
}

/// Sum of `agentq_llm_tokens_total` for the model and kind (`prompt` / `completion`), whatever
/// the kind label is called.
fn tokens(m: &str, kind: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with("agentq_llm_tokens_total{"))
        .filter(|l| l.contains("model=\"mock-gpt\"") && l.contains(&format!("=\"{kind}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---- a. 429 with Retry-After, then success ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_waits_for_retry_after_then_succeeds_without_using_an_attempt() -> anyhow::Result<()>
{
    // Retry-After: 2. aimock also sends x-ratelimit-reset-requests: 1s and -tokens: 6m0s (both
    // limits at 0), later in the reader's order: a retry 2-2.4 s later (plus scheduling) proves
    // Retry-After is the one honoured (the reset headers would give 1-1.2 s or 4-5 s).
    let p = "aimock a: rate limited once, Retry-After 2";
    let fixtures = sequence(
        p,
        &[
            rate_limited(2.0, "Rate limit reached for requests"),
            text("answer after the wait"),
        ],
    );
    let (s, am, w) = start(fixtures, &[("AGENTQ_RETRY_MAX_MS", "5000")]).await?;
    let id = s.submit(p).await?;
    let t = finals(&s, &[id]).await?.remove(0);
    let calls = am.calls_of(p).await?;
    let why = || format!("{t}\ncalls {:?}\n{}", statuses(&calls), log_tails(&s));
    assert_eq!(t["status"], "succeeded", "{}", why());
    assert_eq!(t["result"]["content"], "answer after the wait", "{}", why());
    assert_eq!(t["rate_limited"], 1, "{}", why());
    assert_eq!(t["attempts"], 1, "a 429 does not use an attempt: {}", why());
    assert!(
        t["error"].is_null(),
        "a success clears the error: {}",
        why()
    );
    assert_eq!(statuses(&calls), [429, 200], "{}", why());
    let gap = gaps(&calls)[0];
    eprintln!("Retry-After: 2 -> retry {gap} ms after the 429");
    // the hint, jittered upward by at most 20%, plus the worker's 250 ms retry promotion
    assert!(
        (2000..=2400 + 1000).contains(&gap),
        "Retry-After: 2 not honoured: the retry came {gap} ms after the 429\n{}",
        why()
    );
    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "rate_limited")),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, &llm_series("mock-gpt", "ok")), 1.0, "{m}");
    assert_all_matched(&s, &am).await?;
    assert_no_panic(&s);
    Ok(())
}

// ---- b. absurd and zero Retry-After ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_and_zero_retry_after_are_clamped_and_never_hot_loop() -> anyhow::Result<()> {
    const MAX_MS: i64 = 1500;
    let huge = "aimock b: Retry-After 1e+300 once";
    let zero = "aimock b: Retry-After 0 forever";
    let mut fixtures = sequence(
        huge,
        &[
            rate_limited(1e300, "absurd hint"),
            text("answer after a clamped wait"),
        ],
    );
    fixtures.push(on(zero, rate_limited(0.0, "zero hint")));
    let (s, am, w) = start(
        fixtures,
        &[
            ("AGENTQ_RETRY_BASE_MS", "100"),
            ("AGENTQ_RETRY_MAX_MS", "1500"),
            ("AGENTQ_MAX_RATE_LIMITED", "3"),
        ],
    )
    .await?;
    // each on a model of its own: a 429 blocks its model for the whole fleet (flow control), and
    // this test measures each task's own wait
    let a = s
        .submit_json(&serde_json::json!({"prompt": huge, "model": "mock-gpt"}))
        .await?;
    let b = s
        .submit_json(&serde_json::json!({"prompt": zero, "model": "mock-gpt-zero"}))
        .await?;
    let done = finals(&s, &[a, b.clone()]).await?;
    let (huge_calls, zero_calls) = (am.calls_of(huge).await?, am.calls_of(zero).await?);
    let why = |t: &Value, c: &[Call]| {
        format!(
            "{t}\ncalls {:?} gaps {:?} ms\n{}",
            statuses(c),
            gaps(c),
            log_tails(&s)
        )
    };

    // Retry-After: 1e+300 is a (huge) number of seconds: no overflow panic, the wait is the
    // cap, spread downward by at most a fifth there (the operator's ceiling wins).
    let t = &done[0];
    assert_eq!(t["status"], "succeeded", "{}", why(t, &huge_calls));
    assert_eq!(t["rate_limited"], 1, "{}", why(t, &huge_calls));
    assert_eq!(t["attempts"], 1, "{}", why(t, &huge_calls));
    assert_eq!(statuses(&huge_calls), [429, 200], "{}", why(t, &huge_calls));
    let gap = gaps(&huge_calls)[0];
    eprintln!("Retry-After: 1e+300 -> retry {gap} ms after the 429");
    eprintln!(
        "Retry-After: 0 -> gaps {:?} ms between the 429s",
        gaps(&zero_calls)
    );
    assert!(
        (MAX_MS * 4 / 5..=MAX_MS + 1000).contains(&gap),
        "Retry-After: 1e+300 must wait about AGENTQ_RETRY_MAX_MS ({MAX_MS} ms), waited {gap} ms\n{}",
        why(t, &huge_calls)
    );

    // Retry-After: 0 counts as no header; the next usable ones aimock sends are
    // x-ratelimit-reset-requests: 1s and -tokens: 6m0s, both limits at 0 (the worker takes the
    // longer, clamped to the cap; the shorter would be 1 s): every retry waits >= 1 s, no hot loop.
    let t = &done[1];
    assert_eq!(t["status"], "failed", "{}", why(t, &zero_calls));
    assert_eq!(t["rate_limited"], 3, "{}", why(t, &zero_calls));
    assert_eq!(
        statuses(&zero_calls),
        [429, 429, 429],
        "{}",
        why(t, &zero_calls)
    );
    for gap in gaps(&zero_calls) {
        assert!(
            (1000..=MAX_MS + 1000).contains(&gap),
            "Retry-After: 0 (with x-ratelimit-reset-*: 1s / 6m0s) retried after {gap} ms\n{}",
            why(t, &zero_calls)
        );
    }
    let error = t["error"].as_str().unwrap_or_default();
    assert!(error.contains("429"), "{}", why(t, &zero_calls));
    let dead = s.dead("default").await?;
    assert!(
        dead.iter().any(|d| d["id"] == b.as_str()),
        "dead-lettered at AGENTQ_MAX_RATE_LIMITED: {dead:?}"
    );

    let m = w.metrics().await?;
    // one 429 on mock-gpt, three on the other model (counted as `other`)
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "rate_limited"))
            + metric(&m, &llm_series("other", "rate_limited")),
        4.0,
        "{m}"
    );
    let health = reqwest::get(format!("{}/healthz", w.probe)).await?;
    assert!(health.status().is_success(), "worker still healthy");
    assert_all_matched(&s, &am).await?;
    assert_no_panic(&s);
    Ok(())
}

// ---- c. finish reasons, tool-only and empty replies ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_finish_reasons_are_kept_verbatim_and_an_empty_reply_fails_once() -> anyhow::Result<()>
{
    let usage = json!({ "prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14 });
    let reasons = ["eos_token", "", "length", "content_filter"];
    let prompts: Vec<String> = reasons
        .iter()
        .map(|r| format!("aimock c: finish_reason [{r}]"))
        .collect();
    let mut fixtures: Vec<Value> = reasons
        .iter()
        .zip(&prompts)
        .map(|(r, p)| {
            on(
                p,
                json!({ "content": format!("text ending with [{r}]"), "finishReason": r, "usage": usage }),
            )
        })
        .collect();
    let tool = "aimock c: tool call only";
    fixtures.push(on(
        tool,
        json!({
            "toolCalls": [{ "id": "call_weather_1", "name": "get_weather", "arguments": { "city": "Paris" } }],
            "usage": usage,
        }),
    ));
    // content null, refusal null, tool_calls []: nothing to keep
    let empty = "aimock c: nothing in the reply";
    fixtures.push(on(
        empty,
        json!({ "toolCalls": [], "finishReason": "length", "usage": { "prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7 } }),
    ));
    let (s, am, w) = start(fixtures, &[]).await?;

    let mut ids = Vec::new();
    for p in prompts.iter().map(String::as_str).chain([tool, empty]) {
        ids.push(submit_max(&s, p, 3).await?);
    }
    let done = finals(&s, &ids).await?;
    let all = am.calls().await?;
    let why = |t: &Value| format!("{t}\n{}", log_tails(&s));
    for p in prompts.iter().map(String::as_str).chain([tool, empty]) {
        let n = all.iter().filter(|c| c.prompt == p).count();
        assert_eq!(n, 1, "{p}: exactly one call\n{}", log_tails(&s));
    }

    for ((r, p), t) in reasons.iter().zip(&prompts).zip(&done) {
        assert_eq!(t["status"], "succeeded", "{p}: {}", why(t));
        assert_eq!(t["attempts"], 1, "{p}: {}", why(t));
        let res = &t["result"];
        assert_eq!(res["finish_reason"], *r, "{p}: kept verbatim: {}", why(t));
        assert_eq!(
            res["content"],
            format!("text ending with [{r}]"),
            "{}",
            why(t)
        );
        assert_eq!(res["model"], "mock-gpt", "{}", why(t));
        assert_eq!(res["usage"]["prompt_tokens"], 11, "{}", why(t));
        assert_eq!(res["usage"]["completion_tokens"], 3, "{}", why(t));
        assert_eq!(res["usage"]["total_tokens"], 14, "{}", why(t));
        for absent in ["refusal", "tool_calls"] {
            assert!(
                res.get(absent).is_none(),
                "{p}: {absent} not sent: {}",
                why(t)
            );
        }
        for absent in ["cached_tokens", "reasoning_tokens"] {
            assert!(
                res["usage"].get(absent).is_none(),
                "{p}: {absent} not sent: {}",
                why(t)
            );
        }
    }

    let t = &done[reasons.len()];
    assert_eq!(
        t["status"],
        "succeeded",
        "a tool-only reply is a result: {}",
        why(t)
    );
    let res = &t["result"];
    assert_eq!(res["content"], "", "{}", why(t));
    assert_eq!(res["finish_reason"], "tool_calls", "{}", why(t));
    assert_eq!(
        res["tool_calls"],
        json!([{
            "id": "call_weather_1",
            "type": "function",
            "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" }
        }]),
        "tool calls kept as sent: {}",
        why(t)
    );

    let t = &done[reasons.len() + 1];
    assert_eq!(t["status"], "failed", "{}", why(t));
    assert_eq!(t["attempts"], 1, "permanent at once: {}", why(t));
    let error = t["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no content") && error.contains("length"),
        "the error names the empty reply and its finish_reason: {}",
        why(t)
    );
    assert!(t["result"].is_null(), "{}", why(t));

    let m = w.metrics().await?;
    assert_eq!(metric(&m, &llm_series("mock-gpt", "ok")), 5.0, "{m}");
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "empty_response")),
        1.0,
        "{m}"
    );
    // every 200 with usage is counted, the empty one included
    assert_eq!(tokens(&m, "prompt"), 5.0 * 11.0 + 7.0, "{m}");
    assert_eq!(tokens(&m, "completion"), 5.0 * 3.0, "{m}");
    assert_all_matched(&s, &am).await?;
    assert_no_panic(&s);
    Ok(())
}

// ---- d. 5xx sequences ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_use_attempts_then_succeed_or_dead_letter() -> anyhow::Result<()> {
    let recovers = "aimock d: 500 then 503 then 200";
    let broken = "aimock d: 503 every time";
    let mut fixtures = sequence(
        recovers,
        &[
            aimock::error(
                500,
                "server_error",
                "The server had an error processing your request",
            ),
            aimock::error(503, "server_error", "The engine is currently overloaded"),
            text("third time lucky"),
        ],
    );
    fixtures.push(on(
        broken,
        aimock::error(503, "server_error", "Service Unavailable: backend melted"),
    ));
    let (s, am, w) = start(fixtures, &[]).await?;
    let a = submit_max(&s, recovers, 3).await?;
    let b = submit_max(&s, broken, 3).await?;
    let done = finals(&s, &[a, b.clone()]).await?;
    let (ca, cb) = (am.calls_of(recovers).await?, am.calls_of(broken).await?);
    let why = |t: &Value, c: &[Call]| format!("{t}\ncalls {:?}\n{}", statuses(c), log_tails(&s));

    let t = &done[0];
    assert_eq!(t["status"], "succeeded", "{}", why(t, &ca));
    assert_eq!(t["attempts"], 3, "{}", why(t, &ca));
    assert_eq!(t["rate_limited"], 0, "{}", why(t, &ca));
    assert_eq!(
        t["result"]["content"],
        "third time lucky",
        "{}",
        why(t, &ca)
    );
    assert!(t["error"].is_null(), "{}", why(t, &ca));
    assert_eq!(statuses(&ca), [500, 503, 200], "{}", why(t, &ca));

    let t = &done[1];
    assert_eq!(t["status"], "failed", "{}", why(t, &cb));
    assert_eq!(t["attempts"], 3, "{}", why(t, &cb));
    assert_eq!(
        statuses(&cb),
        [503, 503, 503],
        "one call per attempt: {}",
        why(t, &cb)
    );
    let error = t["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("backend melted"),
        "the server's message is kept: {}",
        why(t, &cb)
    );
    let dead = s.dead("default").await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["id"], b.as_str());

    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "server_error")),
        5.0,
        "{m}"
    );
    assert_eq!(metric(&m, &llm_series("mock-gpt", "ok")), 1.0, "{m}");
    assert_all_matched(&s, &am).await?;
    assert_no_panic(&s);
    Ok(())
}

// ---- e. 4xx ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_fail_after_one_call_with_the_servers_message() -> anyhow::Result<()> {
    let cases = [
        (
            400,
            "invalid_request_error",
            "Invalid value for 'temperature': 7 is too high",
        ),
        (
            401,
            "authentication_error",
            "Incorrect API key provided: sk-te***ret",
        ),
        (
            404,
            "not_found_error",
            "The model 'mock-gpt' does not exist or you do not have access",
        ),
        (
            422,
            "invalid_request_error",
            "Unprocessable: messages[0].content must be a string",
        ),
    ];
    let prompts: Vec<String> = cases
        .iter()
        .map(|(code, ..)| format!("aimock e: answered [{code}]"))
        .collect();
    let fixtures: Vec<Value> = cases
        .iter()
        .zip(&prompts)
        .map(|((code, kind, msg), p)| on(p, aimock::error(*code, kind, msg)))
        .collect();
    let (s, am, w) = start(fixtures, &[]).await?;
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(submit_max(&s, p, 5).await?);
    }
    let done = finals(&s, &ids).await?;
    let dead = s.dead("default").await?;
    for (((code, _, msg), p), (id, t)) in cases.iter().zip(&prompts).zip(ids.iter().zip(&done)) {
        let calls = am.calls_of(p).await?;
        let why = format!("{t}\ncalls {:?}\n{}", statuses(&calls), log_tails(&s));
        assert_eq!(t["status"], "failed", "{why}");
        assert_eq!(t["attempts"], 1, "{why}");
        assert_eq!(statuses(&calls), [*code], "exactly one call: {why}");
        let error = t["error"].as_str().unwrap_or_default();
        assert!(error.contains(msg), "the server's message is kept: {why}");
        assert!(
            dead.iter().any(|d| d["id"] == id.as_str()),
            "{p} not dead: {dead:?}"
        );
    }
    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "client_error")),
        4.0,
        "{m}"
    );
    assert_all_matched(&s, &am).await?;
    assert_no_panic(&s);
    Ok(())
}

// ---- f. a 200 whose body is an error object ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_carrying_an_error_object_is_classified_by_its_content() -> anyhow::Result<()> {
    let flaky = "aimock f: 200 error once then an answer";
    let down = "aimock f: 200 error every time";
    let limited = "aimock f: 200 rate-limit error once";
    let invalid = "aimock f: 200 invalid-request error";
    let overloaded = |msg: &str| aimock::error(200, "server_error", msg);
    let mut fixtures = sequence(
        flaky,
        &[
            overloaded("upstream provider overloaded, try again"),
            text("recovered"),
        ],
    );
    fixtures.push(on(down, overloaded("upstream provider still down")));
    fixtures.extend(sequence(
        limited,
        &[
            json!({
                "error": { "message": "Rate limit reached for gpt-x in organization org-1", "type": "rate_limit_error", "code": "rate_limit_exceeded" },
                "status": 200,
            }),
            text("after the limit"),
        ],
    ));
    fixtures.push(on(
        invalid,
        aimock::error(
            200,
            "invalid_request_error",
            "Invalid 'messages': empty array",
        ),
    ));
    let (s, am, w) = start(fixtures, &[]).await?;
    let ids = vec![
        submit_max(&s, flaky, 3).await?,
        submit_max(&s, down, 2).await?,
        submit_max(&s, limited, 3).await?,
        submit_max(&s, invalid, 3).await?,
    ];
    let done = finals(&s, &ids).await?;
    let mut calls = Vec::new();
    for p in [flaky, down, limited, invalid] {
        calls.push(am.calls_of(p).await?);
    }
    let why = |i: usize| {
        format!(
            "{}\ncalls {:?}\n{}",
            done[i],
            statuses(&calls[i]),
            log_tails(&s)
        )
    };

    // transient: uses an attempt, retried
    assert_eq!(done[0]["status"], "succeeded", "{}", why(0));
    assert_eq!(done[0]["attempts"], 2, "{}", why(0));
    assert_eq!(done[0]["result"]["content"], "recovered", "{}", why(0));
    assert_eq!(statuses(&calls[0]), [200, 200], "{}", why(0));

    assert_eq!(done[1]["status"], "failed", "{}", why(1));
    assert_eq!(done[1]["attempts"], 2, "{}", why(1));
    assert_eq!(statuses(&calls[1]), [200, 200], "{}", why(1));
    let error = done[1]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("upstream provider still down"),
        "the server's message, not a parse error: {}",
        why(1)
    );

    // rate-limit words: rate limited, no attempt used
    assert_eq!(done[2]["status"], "succeeded", "{}", why(2));
    assert_eq!(done[2]["rate_limited"], 1, "{}", why(2));
    assert_eq!(done[2]["attempts"], 1, "{}", why(2));
    assert_eq!(statuses(&calls[2]), [200, 200], "{}", why(2));

    // invalid_request_error: permanent, one call
    assert_eq!(done[3]["status"], "failed", "{}", why(3));
    assert_eq!(done[3]["attempts"], 1, "{}", why(3));
    assert_eq!(statuses(&calls[3]), [200], "{}", why(3));
    let error = done[3]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("Invalid 'messages': empty array"),
        "{}",
        why(3)
    );

    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "upstream_error")),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "rate_limited")),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "client_error")),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, &llm_series("mock-gpt", "ok")), 2.0, "{m}");
    assert_all_matched(&s, &am).await?;
    assert_no_panic(&s);
    Ok(())
}

// ---- the request on the wire ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_carries_the_output_cap_and_a_bearer_key_only_when_set() -> anyhow::Result<()> {
    let keyed = "aimock wire: default worker";
    let keyless = "aimock wire: no key, max_completion_tokens";
    let mut s = Stack::new(MockConfig::default()).await?;
    // aimock with AIMOCK_API_KEYS answers 401 unless the credential is exactly this key (its
    // journal redacts the header's value, so the key itself is proved by the 200)
    let authed = Aimock::start_with(
        &[on(keyed, text("one"))],
        s.logs.path(),
        Some("sk-test-secret"),
    )
    .await?;
    let open = Aimock::start(&[on(keyless, text("two"))], s.logs.path()).await?;
    s.start_api(&[]).await?;

    let base = authed.openai_base_url();
    let mut w = s.start_worker(&[("OPENAI_BASE_URL", &base)]).await?;
    let id = s.submit(keyed).await?;
    let t = finals(&s, &[id]).await?.remove(0);
    assert_eq!(
        t["status"],
        "succeeded",
        "the key was accepted: {t}\n{}",
        log_tails(&s)
    );
    w.proc.sigterm();
    w.proc.wait_exit(Duration::from_secs(15))?;

    let base = open.openai_base_url();
    let _w2 = s
        .start_worker(&[
            ("OPENAI_BASE_URL", &base),
            ("OPENAI_API_KEY", ""),
            ("AGENTQ_MAX_TOKENS", "256"),
            ("AGENTQ_MAX_TOKENS_PARAM", "max_completion_tokens"),
        ])
        .await?;
    let id = s.submit(keyless).await?;
    let t = finals(&s, &[id]).await?.remove(0);
    assert_eq!(t["status"], "succeeded", "{t}\n{}", log_tails(&s));

    let calls = authed.calls().await?;
    assert_eq!(calls.len(), 1, "{calls:?}");
    let a = &calls[0];
    assert_eq!(a.prompt, keyed);
    assert_eq!(a.body["model"], "mock-gpt", "{:?}", a.body);
    assert_eq!(
        a.body["messages"],
        json!([{ "role": "user", "content": keyed }]),
        "{:?}",
        a.body
    );
    assert_eq!(a.body["max_tokens"], 4096, "default cap: {:?}", a.body);
    assert!(
        a.body.get("max_completion_tokens").is_none(),
        "{:?}",
        a.body
    );

    let calls = open.calls().await?;
    assert_eq!(calls.len(), 1, "{calls:?}");
    let b = &calls[0];
    assert_eq!(b.prompt, keyless);
    assert_eq!(b.body["max_completion_tokens"], 256, "{:?}", b.body);
    assert!(b.body.get("max_tokens").is_none(), "{:?}", b.body);
    assert!(
        b.headers.get("authorization").is_none(),
        "no Authorization header without a key: {:?}",
        b.headers
    );
    assert_no_panic(&s);
    Ok(())
}
