//! The OpenAI-compatible front door (`POST /v1/chat/completions`, `GET /v1/models`) driven by
//! the official SDKs (Python `openai` from tests/peers/litellm's venv, Node `openai` from
//! tests/peers/openai-node), against a real redis-server, the real binaries and the mock LLM.
//! Each test checks what the SDK got back, the task record behind it, and the mock's exact call
//! count for the prompt: a request is one task, the fleet's retries are the only retries (the
//! SDK is told not to add its own), a client that hangs up leaves its task alone unless asked.

use std::time::{Duration, Instant};

use agentq_tests::{assert_no_panic, log_tails, metric, sdk, task_key, MockConfig, Stack};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

const PY: &str = "chat.py";

async fn stack(env: &[(&str, &str)]) -> Result<Stack> {
    let mut s = Stack::new(MockConfig {
        stream_rate: 200,
        record: true,
        ..MockConfig::default()
    })
    .await?;
    for (k, v) in env {
        s.env.insert((*k).into(), (*v).into());
    }
    Ok(s)
}

async fn py(s: &Stack, scenario: &str, env: &[(&str, &str)]) -> Result<Value> {
    sdk::run(PY, &[scenario], &s.api_url, env)
        .await
        .with_context(|| log_tails(s))
}

/// The task ids the api holds (records only, not their event streams).
fn task_count(s: &Stack) -> Result<usize> {
    let mut c = s.redis.conn()?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("agentq:*:task:*").query(&mut c)?;
    Ok(keys.iter().filter(|k| !k.ends_with(":events")).count())
}

/// The text of one attempt as its task's event stream holds it.
fn attempt_text(s: &Stack, id: &str, attempt: u64) -> Result<String> {
    let mut c = s.redis.conn()?;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("{}:events", task_key(id)))
        .arg("-")
        .arg("+")
        .query(&mut c)?;
    let mut text = String::new();
    for (_, fields) in entries {
        let kind = fields
            .iter()
            .find(|(k, _)| k == "e")
            .map(|(_, v)| v.as_str());
        let data: Value = fields
            .iter()
            .find(|(k, _)| k == "d")
            .and_then(|(_, v)| serde_json::from_str(v).ok())
            .unwrap_or(Value::Null);
        if kind == Some("delta") && data["attempt"] == attempt {
            text.push_str(data["text"].as_str().unwrap_or_default());
        }
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_gets_completions_tool_calls_streams_and_models() -> Result<()> {
    let mut s = stack(&[]).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;

    let r = py(&s, "plain", &[]).await?;
    let id = r["task_id"].as_str().context("task id")?.to_owned();
    let t = s.task(&id).await?;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 1, "{t}");
    assert_eq!(t["result"]["content"], r["content"], "{t}");
    assert_eq!(t["metadata"]["origin"], "sdk-test", "{t}");
    assert_eq!(s.mock.calls("sdk plain hello"), 1);
    // what the worker sent: the SDK's parameters, passed on
    let body = &s.request_bodies("sdk plain hello");
    ensure!(body.is_empty() || body[0]["max_tokens"] == 50, "{body:?}");

    // tool calls come back as the answer; nothing waits for tool outputs
    let r = py(&s, "tools", &[]).await?;
    let t = s.task(r["task_id"].as_str().context("id")?).await?;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["result"]["finish_reason"], "tool_calls", "{t}");

    // streamed: the chunks add up to the task's result, sent as they were made
    let prompt = "sdk streams a long answer word by word so that it arrives in many separate \
                  pieces over the wire [[stream_rate:40]]";
    let r = py(&s, "stream", &[("PROMPT", prompt)]).await?;
    let t = s.task(r["task_id"].as_str().context("id")?).await?;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(r["text"], t["result"]["content"], "{r} vs {t}");
    assert!(r["chunks"].as_u64() > Some(4), "{r}");
    assert_eq!(s.mock.calls(prompt), 1);

    let r = py(&s, "models", &[]).await?;
    assert_eq!(r["ids"], json!(["mock-gpt"]), "{r}");
    let m = s
        .http
        .get(format!("{}/metrics", s.api_url))
        .send()
        .await?
        .text()
        .await?;
    let series = |mode: &str| {
        metric(
            &m,
            &format!("agentq_chat_completions_total{{mode=\"{mode}\",outcome=\"succeeded\"}}"),
        )
    };
    assert_eq!(series("wait"), 2.0, "{m}");
    assert_eq!(series("stream"), 1.0, "{m}");
    assert_no_panic(&s);
    Ok(())
}

/// Every error is the SDK exception class for its status, names its parameter, and nothing is
/// sent twice: validation errors write nothing; a request the upstream refuses reaches it once;
/// one that keeps failing reaches it `max_attempts` times, not `max_attempts` times the SDK's
/// own retries (`x-should-retry: false`); a budget refuses before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_errors_have_openai_classes_and_no_retry_storm() -> Result<()> {
    let mut s = stack(&[]).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("upstreams.json");
    std::fs::write(
        &file,
        serde_json::to_string(
            &json!({"upstreams": [{"name": "mock", "base_url": s.llm_url, "models": ["mock-gpt"]}]}),
        )?,
    )?;
    s.env
        .insert("AGENTQ_UPSTREAMS".into(), file.display().to_string());
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let r = py(&s, "errors", &[]).await?;
    let check = |name: &str, class: &str, status: u64, param: Option<&str>| {
        let e = &r[name];
        assert_eq!(e["class"], class, "{name}: {e}");
        assert_eq!(e["status"], status, "{name}: {e}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{name}: {e}");
        }
    };
    check(
        "unsupported",
        "BadRequestError",
        400,
        Some("frequency_penalty"),
    );
    check("bad_role", "BadRequestError", 400, Some("messages[0].role"));
    check("n", "BadRequestError", 400, Some("n"));
    check("unknown_model", "NotFoundError", 404, Some("model"));
    assert_eq!(r["unknown_model"]["code"], "model_not_found");
    check(
        "unknown_queue",
        "UnprocessableEntityError",
        422,
        Some("X-Agentq-Queue"),
    );
    check("too_large", "APIStatusError", 413, None);
    check("upstream_400", "BadRequestError", 400, None);
    check("upstream_500", "InternalServerError", 502, None);
    check("budget", "RateLimitError", 429, None);
    assert_eq!(r["budget"]["code"], "budget_exceeded");
    for name in ["upstream_400", "upstream_500", "budget"] {
        assert_eq!(r[name]["should_retry"], "false", "{name}: {}", r[name]);
    }
    check("model_404", "NotFoundError", 404, None);
    // exact upstream calls: once for the refusal, max_attempts for the failure, none over budget
    assert_eq!(s.mock.calls("sdk refused [[fail:400]]"), 1);
    assert_eq!(s.mock.calls("sdk broken [[fail:500]]"), 2);
    assert_eq!(s.mock.calls("sdk over budget"), 0);
    // and exactly three tasks: the refused requests wrote nothing
    assert_eq!(task_count(&s)?, 3);
    assert_no_panic(&s);
    Ok(())
}

/// A streamed attempt that fails after some text is retried, and the client's text is the
/// answer once (the new attempt repeats what was sent and goes on from it). When the new
/// attempt says something else, the stream ends with an error naming the task rather than a
/// mix of two answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_stream_continues_the_same_answer_or_says_it_diverged() -> Result<()> {
    let mut s = stack(&[]).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let prompt = "sdk stream fails midway then the retry says it all again [[stream_rate:20]] \
                  [[midfail:8:1]]";
    let r = py(&s, "stream", &[("PROMPT", prompt)]).await?;
    let id = r["task_id"].as_str().context("id")?.to_owned();
    let t = s.task(&id).await?;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 2, "{t}");
    assert_eq!(r["text"], t["result"]["content"], "{r} vs {t}");
    assert_eq!(s.mock.calls(prompt), 2);
    // the first attempt's text did go out before it failed
    let first = attempt_text(&s, &id, 1)?;
    assert!(!first.is_empty(), "attempt 1 streamed nothing");
    assert!(r["text"].as_str().is_some_and(|t| t.starts_with(&first)));

    // the same within one attempt: the model fails mid-stream and its fallback answers
    let prompt = "sdk stream falls back to another model [[stream_rate:20]] [[midfail:6:1]]";
    let r = py(&s, "stream", &[("PROMPT", prompt), ("FALLBACK", "mock-b")]).await?;
    let id = r["task_id"].as_str().context("id")?.to_owned();
    let t = s.task(&id).await?;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 1, "{t}");
    assert_eq!(t["result"]["model"], "mock-b", "{t}");
    assert_eq!(r["text"], t["result"]["content"], "{r} vs {t}");
    assert_eq!(s.mock.calls(prompt), 2);
    assert!(!attempt_text(&s, &id, 1)?.is_empty());

    // the retry answers with a refusal instead (the first call streams its text as `parts`):
    // the text already sent is void
    let prompt = "sdk stream diverges [[stream_rate:20]] [[midfail:6:1]] [[reply:parts:1]] \
                  [[reply:refusal:2]]";
    let body = json!({"model": "mock-gpt", "stream": true,
        "messages": [{"role": "user", "content": prompt}]});
    let text = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.api_url))
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await?
        .text()
        .await?;
    let last = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .next_back()
        .context("no data")?;
    let err: Value = serde_json::from_str(last).with_context(|| text.clone())?;
    assert_eq!(err["error"]["code"], "stream_diverged", "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!(s.mock.calls(prompt), 2);
    assert_no_panic(&s);
    Ok(())
}

/// A task that outlives the wait: 202 with its id and where to look (a stream ends with a
/// `wait_timeout` error instead), and the task runs on to its end, called once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_past_its_limit_answers_202_with_the_task_and_the_task_runs_on() -> Result<()> {
    let mut s = stack(&[]).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let http = reqwest::Client::new();
    let prompt = "sdk slow one [[sleep:2500]]";
    let r = http
        .post(format!("{}/v1/chat/completions", s.api_url))
        .header("x-agentq-wait-secs", "1")
        .json(&json!({"model": "mock-gpt", "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 202);
    let id = r
        .headers()
        .get("x-agentq-task-id")
        .and_then(|v| v.to_str().ok())
        .context("task id header")?
        .to_owned();
    let location = r.headers().get("location").cloned();
    let body: Value = r.json().await?;
    assert_eq!(body["id"], id.as_str(), "{body}");
    assert_eq!(body["object"], "agentq.task", "{body}");
    assert_eq!(
        location.as_ref().and_then(|v| v.to_str().ok()),
        Some(format!("/v1/tasks/{id}").as_str())
    );
    let t = s.wait_final(&[id], Duration::from_secs(20)).await?;
    assert_eq!(t[0]["status"], "succeeded", "{}", t[0]);
    assert_eq!(s.mock.calls(prompt), 1);

    let prompt = "sdk slow stream [[sleep:2500]]";
    let text = http
        .post(format!("{}/v1/chat/completions", s.api_url))
        .header("x-agentq-wait-secs", "1")
        .json(&json!({"model": "mock-gpt", "stream": true,
            "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await?
        .text()
        .await?;
    assert!(text.contains("\"wait_timeout\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");

    // bad wait header: refused before anything is written
    let before = task_count(&s)?;
    let r = http
        .post(format!("{}/v1/chat/completions", s.api_url))
        .header("x-agentq-wait-secs", "soon")
        .json(&json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    let e: Value = r.json().await?;
    assert_eq!(e["error"]["param"], "X-Agentq-Wait-Secs", "{e}");
    assert_eq!(task_count(&s)?, before);
    assert_no_panic(&s);
    Ok(())
}

/// The SDK gives up (its timeout) while the task runs: the task is not cancelled and ends on
/// its own, called once; with `X-Agentq-Cancel-On-Disconnect: true` it is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_leaves_its_task_running_unless_asked() -> Result<()> {
    let mut s = stack(&[]).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let find = |s: &Stack, prompt: &str| -> Result<String> {
        let mut c = s.redis.conn()?;
        let keys: Vec<String> = redis::cmd("KEYS").arg("agentq:*:task:*").query(&mut c)?;
        for k in keys.iter().filter(|k| !k.ends_with(":events")) {
            let payload: Option<String> = redis::cmd("HGET").arg(k).arg("payload").query(&mut c)?;
            if payload.is_some_and(|p| p.contains(prompt)) {
                return Ok(k.rsplit(":task:").next().unwrap_or_default().to_owned());
            }
        }
        anyhow::bail!("no task for {prompt}")
    };
    let prompt = "sdk hangs up [[sleep:2000]]";
    let r = py(&s, "hangup", &[("PROMPT", prompt)]).await?;
    assert_eq!(r["timed_out"], true);
    let id = find(&s, prompt)?;
    let t = s.wait_final(&[id], Duration::from_secs(20)).await?;
    assert_eq!(t[0]["status"], "succeeded", "{}", t[0]);
    assert_eq!(s.mock.calls(prompt), 1);

    let prompt = "sdk hangs up and cancels [[sleep:3000]]";
    let r = py(&s, "hangup", &[("PROMPT", prompt), ("CANCEL", "true")]).await?;
    assert_eq!(r["timed_out"], true);
    let id = find(&s, prompt)?;
    let t = s.wait_final(&[id], Duration::from_secs(20)).await?;
    assert_eq!(t[0]["status"], "cancelled", "{}", t[0]);
    assert!(s.mock.calls(prompt) <= 1);
    assert_no_panic(&s);
    Ok(())
}

/// The Node SDK: a call waited for, one streamed, one refused with `BadRequestError`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sdk_gets_a_completion_and_a_stream() -> Result<()> {
    let mut s = stack(&[]).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let r = sdk::run("chat.mjs", &[], &s.api_url, &[])
        .await
        .with_context(|| log_tails(&s))?;
    let t = s.task(r["task_id"].as_str().context("id")?).await?;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(s.mock.calls("node sdk hello"), 1);
    assert_eq!(
        r["text"], "echo: node sdk streams these few words [[stream_rate:100]]",
        "{r}"
    );
    assert_eq!(r["refused"]["status"], 400, "{r}");
    assert_no_panic(&s);
    Ok(())
}

/// The same `Idempotency-Key` twice is one task and one call; Redis gone is a 503 in OpenAI's
/// shape (retryable), within the api's deadline, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_resends_are_one_task_and_redis_down_is_a_503() -> Result<()> {
    let mut s = stack(&[]).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let http = reqwest::Client::new();
    let prompt = "sdk idempotent";
    let body = json!({"model": "mock-gpt", "messages": [{"role": "user", "content": prompt}]});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = http
            .post(format!("{}/v1/chat/completions", s.api_url))
            .header("idempotency-key", "chat-key-1")
            .json(&body)
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 200);
        ids.push(
            r.headers()
                .get("x-agentq-task-id")
                .and_then(|v| v.to_str().ok())
                .context("id")?
                .to_owned(),
        );
        let c: Value = r.json().await?;
        assert_eq!(
            c["choices"][0]["message"]["content"],
            "echo: sdk idempotent"
        );
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(s.mock.calls(prompt), 1);

    // an agent's chat completions: the client sends the whole conversation, and the model gets
    // exactly that (no agent memory added before it), one call at a time
    for (i, turn) in ["sdk agent turn one", "sdk agent turn two"]
        .iter()
        .enumerate()
    {
        let mut messages = vec![json!({"role": "user", "content": "sdk agent turn one"})];
        if i == 1 {
            messages.push(json!({"role": "assistant", "content": "echo: sdk agent turn one"}));
            messages.push(json!({"role": "user", "content": turn}));
        }
        let r = http
            .post(format!("{}/v1/chat/completions", s.api_url))
            .header("x-agentq-agent-id", "support-bot")
            .json(&json!({"model": "mock-gpt", "messages": messages}))
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 200);
        let sent = s.request_bodies(turn);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["messages"], json!(messages), "{}", sent[0]);
    }

    s.redis.kill();
    let started = Instant::now();
    let r = http
        .post(format!("{}/v1/chat/completions", s.api_url))
        .json(&body)
        .timeout(Duration::from_secs(20))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 503);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        r.headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let e: Value = r.json().await?;
    assert_eq!(e["error"]["type"], "server_error", "{e}");
    assert_no_panic(&s);
    Ok(())
}
