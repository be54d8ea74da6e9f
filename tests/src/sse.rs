//! An SSE client for the event streams (`GET /v1/tasks/{id}/events`), on `eventsource-stream`
//! (the parser async-openai uses), never a parser of ours.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;

/// One SSE event as a client saw it (`id` is empty for an event sent without one).
#[derive(Debug, Clone, PartialEq)]
pub struct Ev {
    pub id: String,
    pub event: String,
    pub data: Value,
}

/// Reads `api` + `path`'s events until the server ends the stream, or (with `stop_after`) drops
/// the connection after that many events. `last` is sent as `Last-Event-ID`. At most 45 s.
pub async fn read(
    api: &str,
    path: &str,
    last: Option<&str>,
    stop_after: Option<usize>,
) -> Result<Vec<Ev>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut req = client.get(format!("{api}{path}"));
    if let Some(l) = last {
        req = req.header("Last-Event-ID", l);
    }
    let r = req.send().await?;
    ensure!(
        r.status() == 200,
        "{path}: {} {}",
        r.status(),
        r.text().await?
    );
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    ensure!(ct.starts_with("text/event-stream"), "content-type {ct}");
    let mut events = r.bytes_stream().eventsource();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        if stop_after.is_some_and(|n| out.len() >= n) {
            return Ok(out);
        }
        let next = tokio::time::timeout_at(deadline, events.next())
            .await
            .with_context(|| format!("{path}: stream did not end; got {out:#?}"))?;
        match next {
            None => return Ok(out),
            Some(Err(e)) => bail!("{path}: {e}"),
            Some(Ok(e)) => {
                let data = serde_json::from_str(&e.data)
                    .with_context(|| format!("data of {:?} is JSON: {}", e.event, e.data))?;
                out.push(Ev {
                    id: e.id,
                    event: e.event,
                    data,
                })
            }
        }
    }
}

/// The text a client keeps: the `delta`s after the last `attempt_started`.
pub fn kept_text(events: &[Ev]) -> String {
    let from = events
        .iter()
        .rposition(|e| e.event == "attempt_started")
        .map_or(0, |i| i + 1);
    events[from..]
        .iter()
        .filter(|e| e.event == "delta")
        .map(|e| e.data["text"].as_str().unwrap_or_default())
        .collect()
}

/// The event names, in order.
pub fn names(events: &[Ev]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}
