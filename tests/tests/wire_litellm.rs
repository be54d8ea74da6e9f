//! Issue 11, proved against the LiteLLM proxy (PyPI `litellm[proxy]==1.81.16`, installed by
//! `tests/peers/litellm/install.sh`) between the real agentq-worker and the LLM, with the real
//! redis-server and agentq-api. LiteLLM either answers itself (its rpm limiter, `mock_response`
//! models, its error injection) or relays to the in-process mock LLM (scripted with markers).
//!
//! Call counts are exact: the mock's per-prompt counters for what LiteLLM forwarded, the worker's
//! `agentq_llm_requests_total{model,outcome}` for every call it made, and LiteLLM's own access
//! log (status by status) for what it answered. LiteLLM's retries are off (`num_retries: 0`;
//! its default is 2, so every 429/5xx/408 the upstream sent would be 3 upstream calls, with its
//! own backoff, behind one worker call), so one worker call is one upstream call at most.
//!
//! What LiteLLM 1.81.16 does on the wire, as these tests pin it:
//! - its rpm limiter (per-deployment `rpm` with `routing_strategy: usage-based-routing-v2`; a
//!   calendar-minute window, no database) answers 429 with `llm_provider-retry-after: 60` and no
//!   other rate-limit header; only `rpm - 1` requests pass per minute when they come one at a time;
//! - relaying an upstream 429 it drops every upstream header (`Retry-After`, `retry-after-ms`,
//!   `x-ratelimit-*`, even `llm_provider-retry-after`): the 429 arrives with no hint at all;
//! - relaying a 200 it rewrites the body: `message.refusal` moves to
//!   `message.provider_specific_fields.refusal`, a missing `usage` becomes zeros, a missing
//!   `total_tokens` becomes 0, `finish_reason: "eos_token"` becomes `"stop"`, content as an array
//!   of parts or a 200 carrying an error object becomes its own 500.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentq_tests::litellm::LiteLlm;
use agentq_tests::{assert_no_panic, llm_series, log_tails, metric, MockConfig, Stack, Worker};
use anyhow::Context;
use serde_json::{json, Value};

/// The worker's `OPENAI_API_KEY`: LiteLLM's master key (no database: the only key it knows).
const KEY: &str = "sk-agentq-litellm-master";
/// What LiteLLM sends upstream; the mock refuses anything else, so a call reaching it proves
/// LiteLLM, not the worker, made it.
const UPSTREAM_KEY: &str = "sk-upstream-only-litellm-knows";

/// A deployment that forwards to the in-process mock LLM.
fn upstream(name: &str, s: &Stack, extra: Value) -> Value {
    let mut params = json!({
        "model": "openai/mock-gpt",
        "api_base": s.llm_url,
        "api_key": UPSTREAM_KEY,
    });
    merge(&mut params, extra);
    json!({ "model_name": name, "litellm_params": params })
}

/// A deployment LiteLLM answers itself (`mock_response`, `mock_timeout`, ...).
fn canned(name: &str, extra: Value) -> Value {
    let mut params = json!({ "model": format!("openai/{name}"), "api_key": "sk-unused" });
    merge(&mut params, extra);
    json!({ "model_name": name, "litellm_params": params })
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), extra) {
        a.extend(b);
    }
}

/// Redis, the mock LLM (requiring [`UPSTREAM_KEY`]), LiteLLM with the `models` (built from the
/// stack, for the mock's URL) and `router_settings`, the api, and one worker whose LLM is
/// LiteLLM. `warm` lists (model, prompt) pairs LiteLLM is called with once before the worker
/// starts: its first call of a provider imports code and can take seconds on a busy machine.
async fn start(
    models: impl FnOnce(&Stack) -> Vec<Value>,
    router: Value,
    warm: &[(&str, &str)],
    worker_env: &[(&str, &str)],
) -> anyhow::Result<(Stack, LiteLlm, Worker)> {
    let mut s = Stack::new(MockConfig {
        api_key: Some(UPSTREAM_KEY.to_owned()),
        record: true,
        ..MockConfig::default()
    })
    .await?;
    let config = json!({
        "model_list": models(&s),
        "litellm_settings": { "num_retries": 0 },
        "router_settings": router,
        "general_settings": { "master_key": KEY },
    });
    let ll = LiteLlm::start(&config, s.logs.path()).await?;
    for (model, prompt) in warm {
        let a = ll.chat(KEY, model, prompt).await?;
        anyhow::ensure!(
            a.status == 200,
            "warm-up call of {model}: {a:?}\n{}",
            ll.proc.tail()
        );
    }
    s.env.insert("OPENAI_BASE_URL".to_owned(), ll.base_url());
    s.env.insert("OPENAI_API_KEY".to_owned(), KEY.to_owned());
    // The worker labels its metrics with configured models only (others are `other`): price
    // every LiteLLM model group, at 0.
    let prices: serde_json::Map<String, Value> = config["model_list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["model_name"].as_str())
        .map(|name| (name.to_owned(), json!({"prompt": 0.0, "completion": 0.0})))
        .collect();
    s.env.insert(
        "AGENTQ_PRICES".to_owned(),
        Value::Object(prices).to_string(),
    );
    s.start_api(&[]).await?;
    let w = s.start_worker(worker_env).await?;
    Ok((s, ll, w))
}

/// POSTs a task for `model` with `max_attempts`.
async fn submit(s: &Stack, model: &str, prompt: &str, max_attempts: u32) -> anyhow::Result<String> {
    s.submit_json(&json!({"prompt": prompt, "model": model, "max_attempts": max_attempts}))
        .await
}

/// Waits for every task to be final; on a timeout the error carries every process's log tail.
async fn finals(s: &Stack, ids: &[String], wait: Duration) -> anyhow::Result<Vec<Value>> {
    s.wait_final(ids, wait)
        .await
        .with_context(|| format!("logs:\n{}", log_tails(s)))
}

/// `agentq_llm_tokens_total` for the model and kind (`prompt` / `completion`), whatever the kind
/// label is called.
fn tokens(m: &str, model: &str, kind: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with("agentq_llm_tokens_total{"))
        .filter(|l| {
            l.contains(&format!("model=\"{model}\"")) && l.contains(&format!("=\"{kind}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The mock's usage for an echo of `prompt`: words of the prompt (at least 1), words of
/// `"echo: <prompt>"`.
fn echo_usage(prompt: &str) -> (u64, u64) {
    let words = prompt.split_whitespace().count() as u64;
    (words.max(1), words + 1)
}

fn counts(pairs: &[(u16, u64)]) -> BTreeMap<u16, u64> {
    pairs.iter().copied().filter(|(_, n)| *n > 0).collect()
}

async fn assert_in_dead_list(s: &Stack, ids: &[&String]) -> anyhow::Result<()> {
    let dead = s.dead("default").await?;
    for id in ids {
        assert!(
            dead.iter().any(|d| d["id"] == id.as_str()),
            "{id} not dead-lettered: {dead:?}"
        );
    }
    assert_eq!(dead.len(), ids.len(), "dead list: {dead:?}");
    Ok(())
}

// ---- a. LiteLLM's own rpm limit ----

/// LiteLLM's rpm limiter answers 429 with only `llm_provider-retry-after: 60`. The worker reads
/// that header (clamped to AGENTQ_RETRY_MAX_MS = 1 s here), keeps every task alive until the
/// limiter's minute rolls over, and each task reaches the upstream exactly once.
///
/// The window is LiteLLM's calendar minute, so this test lasts until the next minute starts:
/// up to about a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_litellm_rpm_limit_429s_are_waited_out_and_every_task_completes() -> anyhow::Result<()> {
    // 5 per minute, 1 of them the warm-up: 6 tasks cannot all pass in one minute, and what is
    // left (at most 3: LiteLLM lets `rpm - 1` through when calls come one at a time, `rpm` when
    // they race) passes in the next.
    const RPM: u64 = 5;
    const TASKS: usize = 6;
    const MAX_MS: u64 = 1000;
    let warm = "rpm warm-up";
    let (s, ll, w) = start(
        |s| vec![upstream("limited", s, json!({ "rpm": RPM }))],
        json!({ "routing_strategy": "usage-based-routing-v2" }),
        &[("limited", warm)],
        &[
            ("AGENTQ_RETRY_MAX_MS", "1000"),
            ("AGENTQ_MAX_RATE_LIMITED", "200"),
            ("WORKER_CONCURRENCY", "8"),
        ],
    )
    .await?;
    // Not in the last seconds of a minute: the tasks must meet the limit before it resets.
    let sec = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() % 60.0;
    if sec > 55.0 {
        tokio::time::sleep(Duration::from_secs_f64(60.5 - sec)).await;
    }
    let prompts: Vec<String> = (0..TASKS)
        .map(|i| format!("rpm limited task {i}"))
        .collect();
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(submit(&s, "limited", p, 3).await?);
    }
    let done = finals(&s, &ids, Duration::from_secs(100)).await?;
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    let why = |t: &Value| format!("{t}\n{}", log_tails(&s));

    let mut limited = 0;
    for (p, t) in prompts.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{p}: {}", why(t));
        assert_eq!(
            t["attempts"],
            1,
            "a 429 does not use an attempt: {}",
            why(t)
        );
        assert_eq!(t["result"]["content"], format!("echo: {p}"), "{}", why(t));
        assert!(t["error"].is_null(), "{}", why(t));
        assert_eq!(s.mock.calls(p), 1, "{p}: one upstream call per task");
        let n = t["rate_limited"].as_u64().unwrap_or(u64::MAX);
        // Each wait is the 60 s hint clamped to 1 s and jittered up to 1.2 s: never under 1 s.
        // (Full jitter below 1 s would fit about twice as many 429s in the same time.)
        assert!(
            n <= elapsed_ms / MAX_MS + 1,
            "{p}: {n} 429s in {elapsed_ms} ms: waits shorter than the clamped \
             llm_provider-retry-after ({MAX_MS} ms)\n{}",
            why(t)
        );
        limited += n;
    }
    eprintln!("{TASKS} tasks, rpm {RPM}: {limited} 429s from LiteLLM, all done in {elapsed_ms} ms");
    assert!(limited > 0, "LiteLLM never rate limited: {done:?}");
    assert!(s.dead("default").await?.is_empty(), "none dead");

    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, &llm_series("limited", "ok")),
        TASKS as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, &llm_series("limited", "rate_limited")),
        limited as f64,
        "one rate_limited call per 429 recorded on the tasks\n{m}"
    );
    let want = counts(&[(200, TASKS as u64 + 1), (429, limited)]);
    let got = ll.settled_chat_statuses(&want).await;
    assert_eq!(got, want, "LiteLLM's access log\n{}", log_tails(&s));
    assert_eq!(
        s.mock.total_calls(),
        TASKS as u64 + 1,
        "LiteLLM's own 429s never reach the upstream"
    );
    assert_no_panic(&s);
    Ok(())
}

// ---- b. an upstream 429 relayed by LiteLLM ----

/// LiteLLM relays the mock's 429 with none of its headers; the worker falls back to its own
/// growing backoff, finishes a task after its N 429s and dead-letters one at
/// AGENTQ_MAX_RATE_LIMITED (3 here). A 200 carrying a rate-limit error object comes out of
/// LiteLLM as a 429 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_relayed_upstream_429s_lose_their_headers_and_count_toward_the_cap() -> anyhow::Result<()>
{
    let (s, ll, w) = start(
        |s| vec![upstream("mock-gpt", s, json!({}))],
        json!({}),
        &[("mock-gpt", "warm up")],
        &[
            ("AGENTQ_MAX_RATE_LIMITED", "3"),
            ("AGENTQ_MAX_TOKENS", "321"),
        ],
    )
    .await?;

    // The wire, probed by hand: the mock sends four rate-limit headers, LiteLLM relays none.
    let hints = [
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-",
        "llm_provider-",
        "anthropic-",
    ];
    let direct = "probe: straight to the mock [[fail:429:1:5:ms:700:reset:6m0s:litellm:3]]";
    let r = reqwest::Client::new()
        .post(format!("{}/chat/completions", s.llm_url))
        .bearer_auth(UPSTREAM_KEY)
        .json(&json!({"model": "mock-gpt", "messages": [{"role": "user", "content": direct}]}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 429);
    let sent: Vec<&str> = [
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-requests",
        "llm_provider-retry-after",
    ]
    .into_iter()
    .filter(|h| r.headers().contains_key(*h))
    .collect();
    assert_eq!(
        sent.len(),
        4,
        "the mock sends every hint: {:?}",
        r.headers()
    );
    let relayed = "probe: through LiteLLM [[fail:429:1:5:ms:700:reset:6m0s:litellm:3]]";
    let a = ll.chat(KEY, "mock-gpt", relayed).await?;
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(
        a.headers_starting(&hints),
        Vec::<(String, String)>::new(),
        "LiteLLM relays no rate-limit header: {a:?}"
    );
    assert_eq!(a.body["error"]["code"], "429", "{a:?}");
    assert_eq!(a.body["error"]["type"], "throttling_error", "{a:?}");
    assert_eq!(s.mock.calls(relayed), 1, "num_retries 0: one upstream call");

    let twice = "relayed 429 twice, upstream said Retry-After 1 [[fail:429:2:1]]";
    let forever = "relayed 429 forever [[fail:429:*:ms:700]]";
    let rate200 = "a 200 with a rate-limit error object, once [[reply:error200_rate:1]]";
    let ids = [
        submit(&s, "mock-gpt", twice, 3).await?,
        submit(&s, "mock-gpt", forever, 3).await?,
        submit(&s, "mock-gpt", rate200, 3).await?,
    ];
    let t0 = Instant::now();
    let done = finals(&s, &ids, Duration::from_secs(30)).await?;
    let why = |t: &Value| format!("{t}\n{}", log_tails(&s));

    let t = &done[0];
    assert_eq!(t["status"], "succeeded", "{}", why(t));
    assert_eq!(t["rate_limited"], 2, "{}", why(t));
    assert_eq!(t["attempts"], 1, "{}", why(t));
    assert_eq!(
        t["result"]["content"],
        format!("echo: {twice}"),
        "{}",
        why(t)
    );
    assert_eq!(s.mock.calls(twice), 3, "2 429s, then the answer");
    eprintln!(
        "two relayed 429s (upstream Retry-After: 1, dropped by LiteLLM): done after {:?}",
        t0.elapsed()
    );

    let t = &done[1];
    assert_eq!(t["status"], "failed", "{}", why(t));
    assert_eq!(t["rate_limited"], 3, "{}", why(t));
    assert_eq!(s.mock.calls(forever), 3, "the cap ends it after 3 calls");
    let error = t["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("rate limited 3 times"), "{}", why(t));
    assert!(error.contains("429"), "{}", why(t));
    assert!(
        error.contains("Rate limit reached"),
        "LiteLLM's message kept: {}",
        why(t)
    );

    let t = &done[2];
    assert_eq!(t["status"], "succeeded", "{}", why(t));
    assert_eq!(t["rate_limited"], 1, "{}", why(t));
    assert_eq!(t["attempts"], 1, "{}", why(t));
    assert_eq!(s.mock.calls(rate200), 2, "{}", why(t));
    assert_in_dead_list(&s, &[&ids[1]]).await?;
    // What reached the upstream: LiteLLM's own key, and the worker's output cap passed on.
    let records: Vec<_> = s
        .mock
        .request_records()
        .into_iter()
        .filter(|r| [twice, forever, rate200].contains(&r.prompt.as_str()))
        .collect();
    assert_eq!(records.len(), 3 + 3 + 2, "{records:?}");
    for r in &records {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {UPSTREAM_KEY}").as_str()),
            "{r:?}"
        );
        assert_eq!(r.max_tokens, Some(321), "AGENTQ_MAX_TOKENS relayed: {r:?}");
    }

    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "rate_limited")),
        6.0,
        "2 + 3 + 1\n{m}"
    );
    assert_eq!(metric(&m, &llm_series("mock-gpt", "ok")), 2.0, "{m}");
    // warm-up + 2 answers; the probe + 6 429s
    let want = counts(&[(200, 3), (429, 7)]);
    let got = ll.settled_chat_statuses(&want).await;
    assert_eq!(got, want, "LiteLLM's access log\n{}", log_tails(&s));
    assert_no_panic(&s);
    Ok(())
}

// ---- c. reply bodies: LiteLLM's mock_response models, and the mock's shapes relayed ----

/// `mock_response` bodies LiteLLM serves itself (a tool call, no usage, Groq's extra fields)
/// and the mock's reply shapes as LiteLLM rewrites them: every task completes with exactly the
/// fields it should, in one call (a refusal too, though LiteLLM moves it out of
/// `message.refusal`); an empty reply fails at once and names its finish reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_tool_calls_missing_usage_and_groq_bodies_complete_with_their_fields(
) -> anyhow::Result<()> {
    let tool_calls = json!([{
        "id": "call_1",
        "type": "function",
        "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" },
    }]);
    let tool_body = json!({
        "id": "chatcmpl-tool", "object": "chat.completion", "created": 1_700_000_000,
        "model": "tool-model",
        "choices": [{ "index": 0, "finish_reason": "tool_calls",
            "message": { "role": "assistant", "content": null, "tool_calls": tool_calls } }],
        "usage": { "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18 },
    });
    let no_usage_body = json!({
        "id": "chatcmpl-nu", "object": "chat.completion", "created": 1_700_000_000,
        "model": "nousage-model",
        "choices": [{ "index": 0, "finish_reason": "stop",
            "message": { "role": "assistant", "content": "no usage here" } }],
    });
    let groq_body = json!({
        "id": "chatcmpl-groq", "object": "chat.completion", "created": 1_700_000_000,
        "model": "llama-3.1-8b-instant", "service_tier": "on_demand",
        "system_fingerprint": "fp_abc", "x_groq": { "id": "req_01" }, "usage_breakdown": null,
        "choices": [{ "index": 0, "finish_reason": "stop", "logprobs": null,
            "message": { "role": "assistant", "content": "groq says hi" } }],
        "usage": { "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
            "queue_time": 0.01, "prompt_time": 0.002, "completion_time": 0.003, "total_time": 0.005 },
    });
    let (s, ll, w) = start(
        |s| {
            vec![
                canned("tool", json!({ "mock_response": tool_body })),
                canned("nousage", json!({ "mock_response": no_usage_body })),
                canned("groq", json!({ "mock_response": groq_body })),
                upstream("mock-gpt", s, json!({})),
            ]
        },
        json!({}),
        &[("mock-gpt", "warm up"), ("groq", "warm up")],
        &[
            ("AGENTQ_MAX_TOKENS", "777"),
            ("AGENTQ_MAX_TOKENS_PARAM", "max_completion_tokens"),
            // the non-streamed bodies as LiteLLM rewrites them (its `mock_response` deployments
            // cannot stream in 1.81.16: a 500 "'async for' requires an object with __aiter__
            // method"); streaming through LiteLLM is `f_streamed_answers_...`
            ("AGENTQ_STREAM", "off"),
        ],
    )
    .await?;

    // LiteLLM serving the body itself
    let own = [
        (
            "tool",
            json!({
                "content": "", "model": "tool", "finish_reason": "tool_calls",
                "tool_calls": tool_calls,
                "usage": { "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18 },
            }),
        ),
        (
            "nousage",
            json!({
                "content": "no usage here", "model": "nousage", "finish_reason": "stop",
                "usage": { "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 },
            }),
        ),
        (
            "groq",
            json!({
                "content": "groq says hi", "model": "groq", "finish_reason": "stop",
                "usage": { "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15 },
            }),
        ),
    ];
    // the mock's shapes, relayed: (marker, expected result or None for a failure)
    let relayed_tool = "relayed tool call [[reply:tool_calls]]";
    let relayed_ok = [
        "relayed groq body [[reply:groq]]",
        "relayed sparse body [[reply:sparse]]",
        "relayed usage details [[reply:cached]]",
        "relayed body without usage [[reply:no_usage]]",
    ];
    let refusal = "relayed refusal [[reply:refusal]]";
    let empty = "relayed empty reply [[reply:empty]]";

    let mut ids = Vec::new();
    for (model, _) in &own {
        ids.push(submit(&s, model, &format!("ask {model}"), 3).await?);
    }
    for p in [relayed_tool]
        .iter()
        .chain(&relayed_ok)
        .chain(&[refusal, empty])
    {
        ids.push(submit(&s, "mock-gpt", p, 3).await?);
    }
    let done = finals(&s, &ids, Duration::from_secs(30)).await?;
    let why = |t: &Value| format!("{t}\n{}", log_tails(&s));
    let mut done = done.iter();

    for (model, want) in &own {
        let t = done.next().context("record")?;
        assert_eq!(t["status"], "succeeded", "{model}: {}", why(t));
        assert_eq!(t["attempts"], 1, "{model}: {}", why(t));
        // the whole result, plus the upstream that answered (the implicit one here)
        let mut want = want.clone();
        want["upstream"] = json!("default");
        assert_eq!(t["result"], want, "{model}: the whole result: {}", why(t));
    }

    let t = done.next().context("record")?;
    let (p, c) = echo_usage(relayed_tool);
    assert_eq!(t["status"], "succeeded", "{}", why(t));
    let res = &t["result"];
    let call = &res["tool_calls"][0];
    assert!(
        call["id"]
            .as_str()
            .unwrap_or_default()
            .starts_with("call_mock_"),
        "{}",
        why(t)
    );
    assert_eq!(
        res["tool_calls"].as_array().map(Vec::len),
        Some(1),
        "{}",
        why(t)
    );
    assert_eq!(call["type"], "function", "{}", why(t));
    assert_eq!(
        call["function"],
        json!({"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}),
        "{}",
        why(t)
    );
    let mut rest = res.clone();
    rest.as_object_mut().map(|o| o.remove("tool_calls"));
    assert_eq!(
        rest,
        json!({ "content": "", "model": "mock-gpt", "finish_reason": "tool_calls",
            "upstream": "default",
            "usage": { "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c } }),
        "{}",
        why(t)
    );

    // What LiteLLM makes of each shape: Groq's extras dropped by the worker; the sparse body's
    // "eos_token" becomes "stop" and its missing total_tokens becomes 0 (LiteLLM's, not a sum),
    // which the worker reads as absent and sums; usage details kept; a body without usage gets
    // LiteLLM's zeros.
    let mut tokens_sent = (p, c);
    for prompt in &relayed_ok {
        let t = done.next().context("record")?;
        let (p, c) = echo_usage(prompt);
        let usage = match *prompt {
            x if x.contains("sparse") => {
                json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
            }
            x if x.contains("cached") => json!({"prompt_tokens": p, "completion_tokens": c,
                "total_tokens": p + c, "cached_tokens": 3, "reasoning_tokens": 2}),
            x if x.contains("no_usage") => {
                json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
            }
            _ => json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}),
        };
        if !prompt.contains("no_usage") {
            tokens_sent.0 += p;
            tokens_sent.1 += c;
        }
        assert_eq!(t["status"], "succeeded", "{prompt}: {}", why(t));
        assert_eq!(t["attempts"], 1, "{prompt}: {}", why(t));
        assert_eq!(
            t["result"],
            json!({ "content": format!("echo: {prompt}"), "model": "mock-gpt",
                "finish_reason": "stop", "upstream": "default", "usage": usage }),
            "{prompt}: {}",
            why(t)
        );
    }
    // The refusal arrives under message.provider_specific_fields (LiteLLM moved it there) and is
    // kept all the same.
    let t = done.next().context("record")?;
    let (p, c) = echo_usage(refusal);
    tokens_sent.0 += p;
    tokens_sent.1 += c;
    assert_eq!(t["status"], "succeeded", "{}", why(t));
    assert_eq!(t["attempts"], 1, "{}", why(t));
    assert_eq!(
        t["result"],
        json!({ "content": "", "model": "mock-gpt", "finish_reason": "stop",
            "refusal": "I can't help with that.", "upstream": "default",
            "usage": { "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c } }),
        "{}",
        why(t)
    );
    let t = done.next().context("record")?;
    let (p, c) = echo_usage(empty);
    tokens_sent.0 += p;
    tokens_sent.1 += c;
    assert_eq!(t["status"], "failed", "{}", why(t));
    assert_eq!(t["attempts"], 1, "permanent at once: {}", why(t));
    let error = t["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no content") && error.contains("length"),
        "the error names the empty reply and its finish_reason: {}",
        why(t)
    );
    assert!(t["result"].is_null(), "{}", why(t));
    for p in [relayed_tool]
        .iter()
        .chain(&relayed_ok)
        .chain(&[refusal, empty])
    {
        assert_eq!(s.mock.calls(p), 1, "{p}: one call");
    }
    assert_in_dead_list(&s, &[&ids[ids.len() - 1]]).await?;
    // AGENTQ_MAX_TOKENS_PARAM=max_completion_tokens reaches the upstream under that name
    let records: Vec<_> = s
        .mock
        .request_records()
        .into_iter()
        .filter(|r| r.prompt != "warm up")
        .collect();
    assert_eq!(records.len(), 7, "{records:?}");
    for r in &records {
        assert_eq!(
            (r.max_completion_tokens, r.max_tokens),
            (Some(777), None),
            "{r:?}"
        );
    }

    let m = w.metrics().await?;
    for model in ["tool", "nousage", "groq"] {
        assert_eq!(metric(&m, &llm_series(model, "ok")), 1.0, "{model}\n{m}");
    }
    assert_eq!(metric(&m, &llm_series("mock-gpt", "ok")), 6.0, "{m}");
    assert_eq!(
        metric(&m, &llm_series("mock-gpt", "empty_response")),
        1.0,
        "{m}"
    );
    assert_eq!(
        (
            tokens(&m, "tool", "prompt"),
            tokens(&m, "tool", "completion")
        ),
        (11.0, 7.0),
        "{m}"
    );
    assert_eq!(
        (
            tokens(&m, "groq", "prompt"),
            tokens(&m, "groq", "completion")
        ),
        (12.0, 3.0),
        "{m}"
    );
    assert_eq!(
        (
            tokens(&m, "nousage", "prompt"),
            tokens(&m, "nousage", "completion")
        ),
        (0.0, 0.0),
        "no usage, nothing counted\n{m}"
    );
    // every relayed 200 carried usage (LiteLLM's zeros for the one without), failures included
    assert_eq!(
        (
            tokens(&m, "mock-gpt", "prompt"),
            tokens(&m, "mock-gpt", "completion")
        ),
        (tokens_sent.0 as f64, tokens_sent.1 as f64),
        "{m}"
    );
    let want = counts(&[(200, 2 + 3 + 7)]);
    let got = ll.settled_chat_statuses(&want).await;
    assert_eq!(got, want, "LiteLLM's access log\n{}", log_tails(&s));
    assert_no_panic(&s);
    Ok(())
}

// ---- d. LiteLLM's error injection, its own failures, and relayed errors ----

/// 5xx, 408 and timeouts from LiteLLM's error injection (`mock_response:
/// litellm.InternalServerError`, `mock_timeout`, `mock_delay` past the worker's timeout), an
/// unreachable upstream, a 400 and a 429 it makes up, and upstream errors it relays (503, 502
/// once, 408, 400) or turns into its own 500 (a 200 carrying an error object, content as an
/// array of parts): transient ones use every attempt then dead-letter, permanent ones fail
/// after one call, with exact counts from the worker's metrics, the mock and LiteLLM's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_injected_5xx_408_and_timeouts_use_every_attempt_then_dead_letter() -> anyhow::Result<()>
{
    let closed = agentq_tests::free_port();
    let (s, ll, w) = start(
        |s| {
            vec![
                canned(
                    "ise",
                    json!({ "mock_response": "litellm.InternalServerError" }),
                ),
                canned(
                    "timeout408",
                    json!({ "mock_timeout": true, "timeout": 0.1 }),
                ),
                canned(
                    "slow",
                    json!({ "mock_response": "too late", "mock_delay": 8 }),
                ),
                canned(
                    "ctx",
                    json!({ "mock_response": "litellm.ContextWindowExceededError" }),
                ),
                canned("rl", json!({ "mock_response": "litellm.RateLimitError" })),
                canned("warm", json!({ "mock_response": "warm" })),
                json!({ "model_name": "down", "litellm_params": {
                    "model": "openai/down",
                    "api_base": format!("http://127.0.0.1:{closed}/v1"),
                    "api_key": "sk-unused",
                } }),
                upstream("mock-gpt", s, json!({})),
            ]
        },
        json!({}),
        &[("mock-gpt", "warm up"), ("warm", "warm up")],
        &[
            ("AGENTQ_LLM_TIMEOUT_SECS", "3"),
            ("AGENTQ_MAX_RATE_LIMITED", "4"),
            ("WORKER_CONCURRENCY", "16"),
            // LiteLLM's canned failures as it answers non-streamed calls (streamed, a relayed
            // error object becomes a 503 MidStreamFallbackError instead of its 500)
            ("AGENTQ_STREAM", "off"),
        ],
    )
    .await?;

    struct Case {
        model: &'static str,
        prompt: &'static str,
        max: u32,
        status: &'static str,
        attempts: u64,
        /// what the kept error must contain
        error: &'static [&'static str],
    }
    let case = |model, prompt, max, status, attempts, error| Case {
        model,
        prompt,
        max,
        status,
        attempts,
        error,
    };
    let cases = [
        case(
            "ise",
            "injected 500",
            3,
            "failed",
            3,
            &["llm answered 500", "this is a mock internal server error"][..],
        ),
        case(
            "timeout408",
            "injected 408",
            2,
            "failed",
            2,
            &["llm answered 408", "This is a mock timeout error"][..],
        ),
        case(
            "slow",
            "answer after the worker's timeout",
            2,
            "failed",
            2,
            &["timed out"][..],
        ),
        case(
            "down",
            "upstream unreachable",
            2,
            "failed",
            2,
            &["llm answered 500", "Connection error"][..],
        ),
        case(
            "ctx",
            "injected context window error",
            3,
            "failed",
            1,
            &["llm answered 400", "context window exceeded"][..],
        ),
        case(
            "mock-gpt",
            "relayed 503 [[fail:503:*]]",
            2,
            "failed",
            2,
            &["llm answered 503", "scripted failure 503"][..],
        ),
        case(
            "mock-gpt",
            "relayed 502 once [[fail:502:1]]",
            3,
            "succeeded",
            2,
            &[][..],
        ),
        case(
            "mock-gpt",
            "relayed 408 [[fail:408:*]]",
            2,
            "failed",
            2,
            &["llm answered 408"][..],
        ),
        case(
            "mock-gpt",
            "relayed 400 [[fail:400]]",
            3,
            "failed",
            1,
            &["llm answered 400"][..],
        ),
        case(
            "mock-gpt",
            "a 200 carrying an error object [[reply:error200]]",
            2,
            "failed",
            2,
            &["llm answered 500"][..],
        ),
        case(
            "mock-gpt",
            "content as parts [[reply:parts]]",
            2,
            "failed",
            2,
            &["llm answered 500", "Invalid response object"][..],
        ),
    ];
    let rl_prompt = "injected 429";
    let mut ids = Vec::new();
    for c in &cases {
        ids.push(submit(&s, c.model, c.prompt, c.max).await?);
    }
    let rl_id = submit(&s, "rl", rl_prompt, 3).await?;
    let mut all = ids.clone();
    all.push(rl_id.clone());
    let done = finals(&s, &all, Duration::from_secs(60)).await?;
    let why = |t: &Value| format!("{t}\n{}", log_tails(&s));

    for (c, t) in cases.iter().zip(&done) {
        let what = format!("{} / {:?}", c.model, c.prompt);
        assert_eq!(t["status"], c.status, "{what}: {}", why(t));
        assert_eq!(t["attempts"], c.attempts, "{what}: {}", why(t));
        assert_eq!(t["rate_limited"], 0, "{what}: {}", why(t));
        let error = t["error"].as_str().unwrap_or_default();
        for part in c.error {
            assert!(
                error.contains(part),
                "{what}: error should say {part:?}: {}",
                why(t)
            );
        }
        if c.status == "succeeded" {
            assert_eq!(
                t["result"]["content"],
                format!("echo: {}", c.prompt),
                "{}",
                why(t)
            );
            assert!(t["error"].is_null(), "{}", why(t));
        }
        if c.model == "mock-gpt" {
            assert_eq!(
                s.mock.calls(c.prompt),
                c.attempts,
                "{what}: one upstream call per attempt"
            );
        }
    }
    let t = &done[cases.len()];
    assert_eq!(t["status"], "failed", "{}", why(t));
    assert_eq!(t["rate_limited"], 4, "{}", why(t));
    let error = t["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("rate limited 4 times"), "{}", why(t));
    assert!(
        error.contains("this is a mock rate limit error"),
        "{}",
        why(t)
    );
    let dead: Vec<&String> = cases
        .iter()
        .zip(&ids)
        .filter(|(c, _)| c.status == "failed")
        .map(|(_, id)| id)
        .chain([&rl_id])
        .collect();
    assert_in_dead_list(&s, &dead).await?;

    let m = w.metrics().await?;
    let want = [
        ("ise", "server_error", 3.0),
        ("timeout408", "timeout", 2.0),
        ("slow", "timeout", 2.0),
        ("down", "server_error", 2.0),
        ("ctx", "client_error", 1.0),
        ("rl", "rate_limited", 4.0),
        // 503 x2, 502 x1, error object x2, parts x2
        ("mock-gpt", "server_error", 7.0),
        ("mock-gpt", "timeout", 2.0),
        ("mock-gpt", "client_error", 1.0),
        ("mock-gpt", "ok", 1.0),
    ];
    for (model, outcome, n) in want {
        assert_eq!(
            metric(&m, &llm_series(model, outcome)),
            n,
            "{model} {outcome}\n{m}"
        );
    }
    let total: f64 = m
        .lines()
        .filter(|l| l.starts_with("agentq_llm_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let expected: f64 = want.iter().map(|(_, _, n)| n).sum();
    assert_eq!(total, expected, "no other call\n{m}");

    // LiteLLM's log: every status it answered. Its late 200s for "slow" (the worker gave up
    // after 3 s, LiteLLM answers after 8 s) may or may not be logged yet: 200 is checked apart.
    let want = counts(&[
        (500, 3 + 2 + 2 + 2),
        (408, 2 + 2),
        (400, 1 + 1),
        (429, 4),
        (503, 2),
        (502, 1),
    ]);
    let errors_of = |all: &BTreeMap<u16, u64>| -> BTreeMap<u16, u64> {
        all.iter()
            .filter(|(k, _)| **k != 200)
            .map(|(k, v)| (*k, *v))
            .collect()
    };
    let got = ll.chat_statuses_when(|all| errors_of(all) == want).await;
    assert_eq!(
        errors_of(&got),
        want,
        "LiteLLM's access log\n{}",
        log_tails(&s)
    );
    let ok = got.get(&200).copied().unwrap_or(0);
    // 2 warm-ups and the 502 retry; plus up to the 2 late answers for "slow"
    assert!(
        (3..=5).contains(&ok),
        "LiteLLM logged {ok} 200s\n{}",
        log_tails(&s)
    );
    assert_no_panic(&s);
    Ok(())
}

/// Streaming through LiteLLM: the worker's `stream: true` call relayed to the mock, which streams
/// OpenAI chunks at 200 tokens/s; a client follows the task over SSE. The text it keeps is the
/// result, LiteLLM's usage chunk is counted, and a stream that breaks mid-answer upstream (an
/// error event after 5 chunks, relayed however LiteLLM relays it) is retried: 2 calls, the result
/// is the second attempt's text only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_streamed_answers_through_litellm_add_up_and_a_broken_stream_is_retried(
) -> anyhow::Result<()> {
    use agentq_tests::sse;
    let (s, _ll, _w) = start(
        |s| vec![upstream("mock-gpt", s, json!({}))],
        json!({}),
        &[("mock-gpt", "warm up")],
        &[],
    )
    .await?;
    let words: String = (0..40).map(|i| format!("s{i} ")).collect();
    let plain = format!("{words}[[stream_rate:200]]");
    let broken = format!("{words}[[stream_rate:200]] [[midfail:5:1]]");
    let ids = [
        submit(&s, "mock-gpt", &plain, 2).await?,
        submit(&s, "mock-gpt", &broken, 2).await?,
    ];
    let mut seen = Vec::new();
    for id in &ids {
        seen.push(sse::read(&s.api_url, &format!("/v1/tasks/{id}/events"), None, None).await?);
    }
    let done = finals(&s, &ids, Duration::from_secs(30)).await?;
    for ((t, events), prompt) in done.iter().zip(&seen).zip([&plain, &broken]) {
        assert_eq!(t["status"], "succeeded", "{t}\n{}", log_tails(&s));
        let content = t["result"]["content"].as_str().unwrap_or_default();
        assert!(content.starts_with("echo: s0 s1"), "{t}");
        assert_eq!(sse::kept_text(events), content, "{:?}", sse::names(events));
        assert_eq!(sse::names(events).last(), Some(&"done"));
        // LiteLLM passed the stream and the usage chunk on
        assert!(t["usage"]["completion_tokens"].as_u64() > Some(0), "{t}");
        let bodies = s.request_bodies(prompt);
        assert!(
            bodies.iter().all(|b| b["stream"] == true),
            "LiteLLM streamed from the mock: {bodies:?}"
        );
    }
    assert_eq!(done[0]["attempts"], 1, "{}", done[0]);
    assert_eq!(s.mock.calls(&plain), 1);
    assert_eq!(done[1]["attempts"], 2, "{}", done[1]);
    assert_eq!(s.mock.calls(&broken), 2, "one broken stream, one whole");
    let restarted = seen[1]
        .iter()
        .any(|e| e.event == "attempt_started" && e.data["attempt"] == 2);
    assert!(restarted, "{:?}", sse::names(&seen[1]));
    assert_no_panic(&s);
    Ok(())
}
