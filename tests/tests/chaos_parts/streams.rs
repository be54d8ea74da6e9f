//! Event streams under chaos: every task the chaos test acknowledged is followed (its stream is
//! written on demand) and checked against the invariants of its event stream
//! (docs/architecture.md, "Streaming"), whatever the faults did
//! (workers SIGKILLed or frozen mid-stream, Redis killed and restarted from its AOF, drains):
//! - a final task's stream ends with exactly one terminal entry (`final`, which the api sends as
//!   the last delta, usage, status and `done` / `error`), which agrees with its status, and the
//!   stream expires with the record;
//! - after an `attempt_started` of attempt k, every delta up to the next one is of attempt k (a
//!   fenced, stale run never writes one);
//! - a succeeded task's deltas after its last `attempt_started` add up to its result's content
//!   (no gap, no piece twice, nothing of another attempt);
//! - `seq` only grows.

use std::collections::HashMap;

use agentq_common::keys::TaskId;
use agentq_common::Broker;
use anyhow::Result;
use redis::Value as RValue;
use serde_json::Value;

use super::PREFIX;

/// One stream entry: (event name, data).
type Entry = (String, Value);

fn text(v: &RValue) -> Option<String> {
    match v {
        RValue::BulkString(b) => String::from_utf8(b.clone()).ok(),
        RValue::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn entries(v: &RValue) -> Vec<Entry> {
    let RValue::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let RValue::Array(pair) = item else {
                return None;
            };
            let RValue::Array(fields) = pair.get(1)? else {
                return None;
            };
            let (mut e, mut d) = (None, None);
            for kv in fields.chunks(2) {
                match (
                    kv.first().and_then(text).as_deref(),
                    kv.get(1).and_then(text),
                ) {
                    (Some("e"), Some(v)) => e = Some(v),
                    (Some("d"), Some(v)) => d = serde_json::from_str(&v).ok(),
                    _ => {}
                }
            }
            Some((e?, d?))
        })
        .collect()
}

/// The stored entries as the deltas and run starts they hold: a `final` entry's last text
/// becomes a `delta` before it, `started` (a run's start) reads as `attempt_started`.
fn flatten(stored: &[Entry]) -> Vec<Entry> {
    let mut out = Vec::with_capacity(stored.len() + 1);
    for (e, d) in stored {
        match e.as_str() {
            "final" if d["delta"].is_object() => {
                out.push(("delta".to_owned(), d["delta"].clone()));
                out.push((e.clone(), d.clone()));
            }
            "started" => out.push(("attempt_started".to_owned(), d.clone())),
            _ => out.push((e.clone(), d.clone())),
        }
    }
    out
}

/// The violations of one task's stream (its stored entries); `record` is its HGETALL.
pub fn violations_of(
    id: &str,
    record: &HashMap<String, String>,
    stored: &[Entry],
    ttl: i64,
) -> Vec<String> {
    let mut out = Vec::new();
    let status = record.get("status").map_or("", String::as_str);
    if !matches!(status, "succeeded" | "failed" | "cancelled") {
        return out;
    }
    let events = &flatten(stored)[..];
    let terminals: Vec<&Entry> = events.iter().filter(|(e, _)| e == "final").collect();
    if terminals.len() != 1 {
        out.push(format!(
            "stream of {id} ({status}) has {} terminal events: {:?}",
            terminals.len(),
            events.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>()
        ));
        return out;
    }
    let last = &events[events.len() - 1];
    let agrees = last.0 == "final" && last.1["status"] == status;
    if !agrees {
        out.push(format!(
            "stream of {id} ends with {last:?} but the task is {status}"
        ));
    }
    if ttl <= 0 {
        out.push(format!("stream of {id} ({status}) has no TTL ({ttl})"));
    }
    let mut attempt: Option<u64> = None;
    let mut seq = 0u64;
    for (e, d) in events {
        match e.as_str() {
            "attempt_started" => attempt = d["attempt"].as_u64(),
            "delta" => {
                let a = d["attempt"].as_u64();
                if a != attempt {
                    out.push(format!(
                        "stream of {id}: a delta of attempt {a:?} after attempt_started {attempt:?}"
                    ));
                }
                let s = d["seq"].as_u64().unwrap_or(0);
                if s <= seq {
                    out.push(format!("stream of {id}: delta seq {s} after {seq}"));
                }
                seq = s;
            }
            _ => {}
        }
    }
    if status == "succeeded" {
        let from = events
            .iter()
            .rposition(|(e, _)| e == "attempt_started")
            .map_or(0, |i| i + 1);
        let kept: String = events[from..]
            .iter()
            .filter(|(e, _)| e == "delta")
            .map(|(_, d)| d["text"].as_str().unwrap_or_default())
            .collect();
        let result: Value = record
            .get("result")
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or(Value::Null);
        let content = result["content"].as_str().unwrap_or_default();
        if kept != content {
            out.push(format!(
                "stream of {id}: the deltas after the last attempt_started say {kept:?}, the result {content:?}"
            ));
        }
    }
    out
}

/// Follows every task (streams are written on demand: a task nobody followed has none until
/// then, and `follow.lua` writes its story so far), then reads each stream and record and checks
/// them; returns the violations.
pub async fn check(client: &redis::Client, broker: &Broker, ids: &[String]) -> Result<Vec<String>> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut out = Vec::new();
    for id in ids {
        let tid = TaskId::parse(id)?;
        broker.follow(&broker.keys(tid.queue()), &tid).await?;
    }
    for chunk in ids.chunks(200) {
        let mut pipe = redis::pipe();
        for id in chunk {
            let key = format!("{PREFIX}task:{id}");
            pipe.cmd("HGETALL").arg(&key);
            pipe.cmd("XRANGE")
                .arg(format!("{key}:events"))
                .arg("-")
                .arg("+");
            pipe.cmd("TTL").arg(format!("{key}:events"));
        }
        let replies: Vec<RValue> = pipe.query_async(&mut conn).await?;
        for (id, r) in chunk.iter().zip(replies.chunks(3)) {
            let record: HashMap<String, String> = redis::from_redis_value(r[0].clone())?;
            let ttl: i64 = redis::from_redis_value(r[2].clone())?;
            out.extend(violations_of(id, &record, &entries(&r[1]), ttl));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(status: &str, content: &str) -> HashMap<String, String> {
        HashMap::from([
            ("status".to_owned(), status.to_owned()),
            ("result".to_owned(), json!({"content": content}).to_string()),
        ])
    }

    fn ev(e: &str, d: Value) -> Entry {
        (e.to_owned(), d)
    }

    fn good() -> Vec<Entry> {
        vec![
            ev("started", json!({"attempt": 1})),
            ev("delta", json!({"text": "ec", "attempt": 1, "seq": 1})),
            ev("status", json!({"status": "retrying"})),
            ev("started", json!({"attempt": 2})),
            ev("delta", json!({"text": "echo", "attempt": 2, "seq": 2})),
            ev("delta", json!({"text": ": ", "attempt": 2, "seq": 3})),
            ev(
                "final",
                json!({"status": "succeeded", "delta": {"text": "x", "attempt": 2, "seq": 4}}),
            ),
        ]
    }

    #[test]
    fn a_good_stream_passes_and_each_fault_is_named() {
        assert!(violations_of("t", &rec("succeeded", "echo: x"), &good(), 10).is_empty());
        // a piece twice, a piece missing
        let mut twice = good();
        twice.insert(
            5,
            ev("delta", json!({"text": "echo", "attempt": 2, "seq": 3})),
        );
        assert!(!violations_of("t", &rec("succeeded", "echo: x"), &twice, 10).is_empty());
        let mut gap = good();
        gap.remove(5);
        assert!(!violations_of("t", &rec("succeeded", "echo: x"), &gap, 10).is_empty());
        // a stale run's delta after the new attempt
        let mut stale = good();
        stale.insert(5, ev("delta", json!({"text": "", "attempt": 1, "seq": 3})));
        assert!(!violations_of("t", &rec("succeeded", "echo: x"), &stale, 10).is_empty());
        // two terminal entries, none, the wrong one, no TTL
        let mut two = good();
        two.push(ev("final", json!({"status": "failed"})));
        assert!(!violations_of("t", &rec("succeeded", "echo: x"), &two, 10).is_empty());
        assert!(!violations_of("t", &rec("succeeded", "echo: x"), &good()[..6], 10).is_empty());
        assert!(!violations_of("t", &rec("failed", ""), &good(), 10).is_empty());
        assert!(!violations_of("t", &rec("succeeded", "echo: x"), &good(), -1).is_empty());
        // a task not final is not checked
        assert!(violations_of("t", &rec("running", ""), &[], -1).is_empty());
    }
}
