//! Chat completions under chaos: a few dozen streamed `POST /v1/chat/completions` calls made while
//! workers are SIGKILLed, frozen and drained and Redis is frozen or killed, their answers scripted
//! to fail mid-stream, be cut, or be refused. A client does what the README tells it to: it resends
//! with the same `Idempotency-Key` after a 503 or a stream the server closed, and reads the stream
//! again from the start. The invariants (docs/architecture.md, "OpenAI-compatible front door"):
//! - a stream that ends with `[DONE]` carries exactly its task's `result.content`, and the task
//!   succeeded: no text of a failed attempt, nothing twice, nothing missing;
//! - a stream never ends `stream_diverged`: the mock answers a prompt the same way every time, so a
//!   retried attempt always repeats what was sent;
//! - a stream that ends with the task's own error belongs to a task that failed or was cancelled;
//! - every acknowledged call is one task (resends included), which reaches a final state.

use std::time::{Duration, Instant};

use anyhow::Result;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::PREFIX;

pub struct ChatSpec {
    pub n: usize,
    pub prompt: String,
    pub send_at: Duration,
}

/// How a call's last stream ended.
#[derive(Debug, Default, Clone)]
pub enum Ending {
    #[default]
    Nothing,
    /// `[DONE]` after this text.
    Done(String),
    /// An error object with this code (or type, when it has no code) and its status in the
    /// message's words.
    Error(String),
}

#[derive(Debug, Default)]
pub struct ChatSub {
    pub n: usize,
    pub id: Option<String>,
    pub ending: Ending,
    pub tries: u32,
    pub problems: Vec<String>,
}

/// One streamed call per 40 tasks of the main plan, spread like them.
pub fn plan(seed: u64, secs: u64, tasks: usize) -> Vec<ChatSpec> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0c4a_7c0b);
    let count = (tasks / 40).max(5);
    let span = Duration::from_secs(secs).mul_f64(0.9);
    (0..count)
        .map(|n| {
            let mut prompt = format!(
                "chaos {seed} chat {n}: a streamed answer of a dozen words or so [[stream_rate:{}]]",
                rng.random_range(10..=60u32)
            );
            let fault = match rng.random_range(0..100u32) {
                0..35 => String::new(),
                35..55 => format!("[[midfail:{}:1]]", rng.random_range(1..=8u32)),
                55..70 => format!("[[cut:{}:1]]", rng.random_range(1..=8u32)),
                70..80 => format!("[[fail:503:{}]]", rng.random_range(1..=2u32)),
                80..90 => "[[fail:429:1]]".to_owned(),
                _ => "[[fail:400]]".to_owned(),
            };
            if !fault.is_empty() {
                prompt.push(' ');
                prompt.push_str(&fault);
            }
            ChatSpec {
                n,
                prompt,
                send_at: span.mul_f64(n as f64 / count as f64),
            }
        })
        .collect()
}

/// What one connection got: the task id (from the header), and how its stream ended.
async fn once(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    body: &Value,
) -> Result<(u16, Option<String>, Ending)> {
    let r = http
        .post(format!("{api}/v1/chat/completions"))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get("x-agentq-task-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if status != 200 {
        return Ok((status, id, Ending::Nothing));
    }
    let mut events = r.bytes_stream().eventsource();
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        if ev.data == "[DONE]" {
            return Ok((status, id, Ending::Done(text)));
        }
        let v: Value = serde_json::from_str(&ev.data)?;
        if v["error"].is_object() {
            let code = v["error"]["code"]
                .as_str()
                .or(v["error"]["type"].as_str())
                .unwrap_or("unknown")
                .to_owned();
            return Ok((status, id, Ending::Error(code)));
        }
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    Ok((status, id, Ending::Nothing))
}

/// Makes the call until a stream ends with `[DONE]` or the task's own error, resending with the
/// same key after a 503, a dropped connection or a stream the server closed.
pub async fn submit(
    http: reqwest::Client,
    api: String,
    seed: u64,
    spec: &ChatSpec,
    give_up: Instant,
) -> ChatSub {
    let mut sub = ChatSub {
        n: spec.n,
        ..ChatSub::default()
    };
    let body = json!({
        "model": "mock-gpt",
        "stream": true,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_attempts": 4,
    });
    let key = format!("chaos-chat-{seed}-{}", spec.n);
    loop {
        sub.tries += 1;
        // an error (a dropped connection) is the same as no end: send it again
        if let Ok((_, id, ending)) = once(&http, &api, &key, &body).await {
            if let Some(id) = id {
                if sub.id.as_ref().is_some_and(|had| *had != id) {
                    sub.problems.push(format!(
                        "chat {}: a resend with the same key got another task ({:?} then {id})",
                        spec.n, sub.id
                    ));
                }
                sub.id = Some(id);
            }
            match ending {
                // the server closed it (Redis away under its replay): read it again
                Ending::Error(code) if code == "stream_closed" => {}
                Ending::Nothing => {}
                other => {
                    sub.ending = other;
                    return sub;
                }
            }
        }
        if Instant::now() > give_up {
            sub.problems.push(format!(
                "chat {}: no stream reached its end after {} tries",
                spec.n, sub.tries
            ));
            return sub;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The invariants above, against the records; `subs` were all made and their tasks are final.
pub async fn check(client: &redis::Client, subs: &[ChatSub]) -> Result<Vec<String>> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut out = Vec::new();
    for sub in subs {
        out.extend(sub.problems.iter().cloned());
        let Some(id) = sub.id.as_deref() else {
            continue;
        };
        let (status, result): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(format!("{PREFIX}task:{id}"))
            .arg("status")
            .arg("result")
            .query_async(&mut conn)
            .await?;
        let status = status.unwrap_or_default();
        let content = result
            .and_then(|r| serde_json::from_str::<Value>(&r).ok())
            .and_then(|r| r["content"].as_str().map(str::to_owned));
        match &sub.ending {
            Ending::Done(text) => {
                if status != "succeeded" || content.as_deref() != Some(text.as_str()) {
                    out.push(format!(
                        "chat {} ({id}): the stream ended [DONE] with {text:?}, the task is {status} with {content:?}",
                        sub.n
                    ));
                }
            }
            Ending::Error(code) if code == "stream_diverged" => out.push(format!(
                "chat {} ({id}): stream_diverged, though every attempt of a mock prompt says the same",
                sub.n
            )),
            // still running when the wait ran out: it runs on, and ends like any task
            Ending::Error(code) if code == "wait_timeout" => {}
            Ending::Error(code) => {
                if status != "failed" && status != "cancelled" {
                    out.push(format!(
                        "chat {} ({id}): the stream ended with the task's error {code:?}, the task is {status}",
                        sub.n
                    ));
                }
            }
            Ending::Nothing => {}
        }
    }
    Ok(out)
}
