//! Live task output over Server-Sent Events, against a real redis-server, the real binaries and
//! the mock LLM streaming OpenAI's chunk format. The client side is `eventsource-stream` (the SSE
//! parser async-openai uses), never a parser of ours: the full stream adds up to the result; a
//! client that disconnects anywhere and resumes with `Last-Event-ID` gets no gap and no
//! duplicate; a 5xx mid-stream and a SIGKILLed worker show as a new `attempt_started`, and the
//! result is the winning attempt's text only; a stale owner's deltas never appear; cancel ends the
//! stream; and the api's limits (streams, bad cursors) answer as documented.

use std::time::{Duration, Instant};

use agentq_tests::sse::{kept_text, names, read as read_at, Ev};
use agentq_tests::{assert_no_panic, log_tails, task_key, MockConfig, Stack};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

async fn read(
    s: &Stack,
    path: &str,
    last: Option<&str>,
    stop_after: Option<usize>,
) -> Result<Vec<Ev>> {
    read_at(&s.api_url, path, last, stop_after)
        .await
        .with_context(|| log_tails(s))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a client")
}

fn text_of(events: &[Ev], attempt: u64) -> String {
    events
        .iter()
        .filter(|e| e.event == "delta" && e.data["attempt"] == attempt)
        .map(|e| e.data["text"].as_str().unwrap_or_default())
        .collect()
}

/// Ids of events that have one, as the stream numbered them.
fn ids(events: &[Ev]) -> Vec<String> {
    events
        .iter()
        .filter(|e| !e.id.is_empty())
        .map(|e| e.id.clone())
        .collect()
}

/// An event id as a sortable key: `<ms>-<seq>` is an entry's last (or only) event, `<ms>-<seq>.<k>`
/// its event k before that.
fn id_key(id: &str) -> (u64, u64, u64) {
    let (entry, k) = match id.split_once('.') {
        Some((e, k)) => (e, k.parse().unwrap_or(0)),
        None => (id, u64::MAX),
    };
    let (a, b) = entry.split_once('-').unwrap_or(("0", "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0), k)
}

async fn stack(rate: u64) -> Result<Stack> {
    let mut s = Stack::new(MockConfig {
        stream_rate: rate,
        ..MockConfig::default()
    })
    .await?;
    s.start_api(&[]).await?;
    Ok(s)
}

/// A long prompt: the mock's answer echoes it, one token per word.
fn words(n: usize, tag: &str) -> String {
    (0..n).map(|i| format!("{tag}{i} ")).collect::<String>()
}

/// Follows a task from now until its stream ends, in the background.
fn follow(s: &Stack, id: &str) -> tokio::task::JoinHandle<Result<Vec<Ev>>> {
    let api = s.api_url.clone();
    let path = format!("/v1/tasks/{id}/events");
    tokio::spawn(async move { read_at(&api, &path, None, None).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_adds_up_to_the_result_and_replays_after_the_end() -> Result<()> {
    let mut s = stack(400).await?;
    let prompt = words(120, "w");
    let id = s.submit(&prompt).await?;
    // subscribed before any worker runs: the client waits with the task
    let reader = {
        let path = format!("/v1/tasks/{id}/events");
        let api = s.api_url.clone();
        tokio::spawn(async move { read_at(&api, &path, None, None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _w = s.start_worker(&[]).await?;
    let live = reader.await??;
    let task = s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(30))
        .await?;
    let result = task[0]["result"]["content"]
        .as_str()
        .context("content")?
        .to_owned();
    ensure!(result.starts_with("echo: w0 w1"), "{result}");

    let n = names(&live);
    ensure!(
        n.first() == Some(&"status") && live[0].data["status"] == "queued",
        "{n:?}"
    );
    ensure!(
        live[0].id.is_empty(),
        "the waiting status has no id: a resume starts at the start"
    );
    ensure!(n.last() == Some(&"done"), "{n:?}");
    let running = live
        .iter()
        .position(|e| e.event == "status" && e.data["status"] == "running")
        .context("a running status")?;
    ensure!(live[running].data["attempt"] == 1, "{:?}", live[running]);
    ensure!(live[running + 1].event == "attempt_started", "{n:?}");
    // batched: far fewer entries than the 120+ tokens the model sent
    let deltas = live.iter().filter(|e| e.event == "delta").count();
    ensure!(
        deltas >= 2,
        "the text came in pieces as it streamed ({deltas} deltas)"
    );
    ensure!(
        deltas < 60,
        "deltas are batched, not one per token ({deltas})"
    );
    ensure!(
        text_of(&live, 1) == result,
        "deltas {:?} != result {result:?}",
        text_of(&live, 1)
    );
    let seqs: Vec<u64> = live
        .iter()
        .filter(|e| e.event == "delta")
        .filter_map(|e| e.data["seq"].as_u64())
        .collect();
    ensure!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    let usage = live
        .iter()
        .find(|e| e.event == "usage")
        .context("a usage event")?;
    ensure!(
        usage.data["completion_tokens"].as_u64() > Some(100),
        "{usage:?}"
    );
    let done = live.last().context("events")?;
    ensure!(
        done.data["result"]["content"] == result.as_str(),
        "{done:?}"
    );
    let ids = ids(&live);
    ensure!(
        ids.windows(2).all(|w| id_key(&w[1]) > id_key(&w[0])),
        "ids increase: {ids:?}"
    );

    // after the end: the whole stream again, and it closes
    let replay = read(&s, &format!("/v1/tasks/{id}/events"), None, None).await?;
    ensure!(
        replay[..] == live[1..],
        "a replay is the stream, minus the waiting status"
    );
    // resuming after the last event: nothing more, closed at once
    let after = read(&s, &format!("/v1/tasks/{id}/events"), Some(&done.id), None).await?;
    ensure!(after.is_empty(), "{after:?}");
    // the stream expires with the record
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}:events", task_key(&id)))
        .query(&mut s.redis.conn()?)?;
    let rec: i64 = redis::cmd("TTL")
        .arg(task_key(&id))
        .query(&mut s.redis.conn()?)?;
    ensure!(
        ttl > 0 && (ttl - rec).abs() <= 1,
        "stream ttl {ttl}, record ttl {rec}"
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_resumes_anywhere_with_no_gap_and_no_duplicate() -> Result<()> {
    let mut s = stack(150).await?;
    let _w = s.start_worker(&[("AGENTQ_STREAM_FLUSH_MS", "20")]).await?;
    let prompt = words(150, "r");
    let id = s.submit(&prompt).await?;
    let path = format!("/v1/tasks/{id}/events");
    // a client that drops the connection every few events and resumes from the last id it got,
    // alternating the header and the query parameter
    let mut got: Vec<Ev> = Vec::new();
    let mut rng = 7u64;
    let mut rounds = 0;
    loop {
        rounds += 1;
        ensure!(rounds < 500, "never finished: {} events", got.len());
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let take = 1 + (rng >> 33) as usize % 4;
        let last = got
            .iter()
            .rev()
            .find(|e| !e.id.is_empty())
            .map(|e| e.id.clone());
        let part = if rounds % 2 == 0 {
            read(&s, &path, last.as_deref(), Some(take)).await?
        } else {
            let q = last.map_or(String::new(), |l| format!("?last_event_id={l}"));
            read(&s, &format!("{path}{q}"), None, Some(take)).await?
        };
        let end = part.iter().any(|e| e.event == "done");
        // the waiting status (no id) comes again on a fresh start; it is not an entry
        got.extend(part.into_iter().filter(|e| !e.id.is_empty()));
        if end {
            break;
        }
    }
    ensure!(
        rounds > 5,
        "the client really did resume ({rounds} connections)"
    );
    let full = read(&s, &path, None, None).await?;
    ensure!(
        ids(&got) == ids(&full),
        "resumed ids {:?}\nfull ids {:?}",
        ids(&got),
        ids(&full)
    );
    ensure!(got == full);
    let task = s.task(&id).await?;
    ensure!(kept_text(&got) == task["result"]["content"].as_str().unwrap_or_default());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_5xx_mid_stream_starts_a_new_attempt_and_only_the_winner_counts() -> Result<()> {
    let mut s = stack(300).await?;
    let _w = s.start_worker(&[("AGENTQ_STREAM_FLUSH_MS", "10")]).await?;
    let prompt = format!("{}[[midfail:30:1]]", words(60, "m"));
    let id = s.submit(&prompt).await?;
    let events = read(&s, &format!("/v1/tasks/{id}/events"), None, None).await?;
    let task = s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(20))
        .await?;
    ensure!(task[0]["status"] == "succeeded", "{}", task[0]);
    ensure!(task[0]["attempts"] == 2, "{}", task[0]);
    ensure!(
        s.mock.calls(&prompt) == 2,
        "calls {}",
        s.mock.calls(&prompt)
    );
    let result = task[0]["result"]["content"].as_str().context("content")?;
    let first = text_of(&events, 1);
    ensure!(
        !first.is_empty(),
        "attempt 1 streamed before it failed: {:?}",
        names(&events)
    );
    ensure!(
        result.starts_with(&first) && first.len() < result.len(),
        "{first:?}"
    );
    let n = names(&events);
    let retry = events
        .iter()
        .position(|e| e.event == "status" && e.data["status"] == "retrying")
        .with_context(|| format!("{n:?}"))?;
    let second = events
        .iter()
        .position(|e| e.event == "attempt_started" && e.data["attempt"] == 2)
        .with_context(|| format!("{n:?}"))?;
    ensure!(retry < second, "{n:?}");
    ensure!(
        text_of(&events, 2) == result,
        "attempt 2's text is the result"
    );
    ensure!(kept_text(&events) == result);
    ensure!(n.last() == Some(&"done"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_worker_mid_stream_is_seen_and_the_recovered_run_continues() -> Result<()> {
    let mut s = stack(40).await?;
    let mut w1 = s.start_worker(&[("AGENTQ_LLM_TIMEOUT_SECS", "30")]).await?;
    let prompt = words(80, "k");
    let id = s.submit(&prompt).await?;
    let path = format!("/v1/tasks/{id}/events");
    // read until some text of attempt 1 is out, then kill its worker
    let head = read(&s, &path, None, Some(6)).await?;
    ensure!(
        head.iter().any(|e| e.event == "delta"),
        "{:?}",
        names(&head)
    );
    w1.proc.sigkill();
    let _w2 = s.start_worker(&[("AGENTQ_LLM_TIMEOUT_SECS", "30")]).await?;
    let last = head.last().map(|e| e.id.clone()).context("an id")?;
    let tail = read(&s, &path, Some(&last), None).await?;
    let n = names(&tail);
    let recovered = tail
        .iter()
        .position(|e| e.event == "status" && e.data["reason"] == "recovered")
        .with_context(|| format!("the client sees the restart: {n:?}"))?;
    let restarted = tail
        .iter()
        .position(|e| e.event == "attempt_started" && e.data["attempt"] == 2)
        .with_context(|| format!("{n:?}"))?;
    ensure!(recovered < restarted, "{n:?}");
    let task = s.task(&id).await?;
    ensure!(task["status"] == "succeeded", "{task}");
    let result = task["result"]["content"].as_str().unwrap_or_default();
    let all: Vec<Ev> = head
        .into_iter()
        .filter(|e| !e.id.is_empty())
        .chain(tail)
        .collect();
    ensure!(
        kept_text(&all) == result,
        "the client's text is the recovered run's"
    );
    ensure!(text_of(&all, 2) == result);
    ensure!(
        s.mock.calls(&prompt) == 2,
        "calls {}",
        s.mock.calls(&prompt)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_owners_deltas_never_appear() -> Result<()> {
    let mut s = stack(40).await?;
    let w1 = s.start_worker(&[("AGENTQ_LLM_TIMEOUT_SECS", "30")]).await?;
    let prompt = words(60, "f");
    let id = s.submit(&prompt).await?;
    let path = format!("/v1/tasks/{id}/events");
    let head = read(&s, &path, None, Some(5)).await?;
    ensure!(
        head.iter().any(|e| e.event == "delta"),
        "{:?}",
        names(&head)
    );
    // stopped past its heartbeat: another worker recovers the task and runs it again
    w1.proc.freeze();
    let _w2 = s.start_worker(&[("AGENTQ_LLM_TIMEOUT_SECS", "30")]).await?;
    s.wait_for(&id, Duration::from_secs(20), |t| t["attempts"] == 2)
        .await?;
    // the stale owner wakes while the new run streams: whatever it writes is refused
    w1.proc.thaw();
    let task = s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(30))
        .await?;
    ensure!(task[0]["status"] == "succeeded", "{}", task[0]);
    let all = read(&s, &path, None, None).await?;
    let second = all
        .iter()
        .position(|e| e.event == "attempt_started" && e.data["attempt"] == 2)
        .with_context(|| format!("{:?}", names(&all)))?;
    let late: Vec<&Ev> = all[second..]
        .iter()
        .filter(|e| e.event == "delta" && e.data["attempt"] != 2)
        .collect();
    ensure!(
        late.is_empty(),
        "deltas of the fenced run after the new attempt: {late:?}"
    );
    ensure!(kept_text(&all) == task[0]["result"]["content"].as_str().unwrap_or_default());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_ends_the_stream() -> Result<()> {
    let mut s = stack(20).await?;
    let _w = s.start_worker(&[("AGENTQ_LLM_TIMEOUT_SECS", "30")]).await?;
    let id = s.submit(&words(200, "c")).await?;
    let reader = follow(&s, &id);
    s.wait_for(&id, Duration::from_secs(10), |t| t["status"] == "running")
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    s.cancel(&id).await?;
    let events = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .context("the stream ended after the cancel")???;
    ensure!(started.elapsed() < Duration::from_secs(5));
    let n = names(&events);
    ensure!(n.last() == Some(&"error"), "{n:?}");
    let err = events.last().context("events")?;
    ensure!(
        err.data["status"] == "cancelled" && err.data["error_code"] == "cancelled",
        "{err:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_bounds_streams_and_refuses_bad_cursors() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[("AGENTQ_MAX_STREAMS", "2")]).await?;
    let id = s.submit("waits, no worker runs").await?;
    let path = format!("{}/v1/tasks/{id}/events", s.api_url);
    let c = client();
    let a = c.get(&path).send().await?;
    let b = c.get(&path).send().await?;
    ensure!(a.status() == 200 && b.status() == 200);
    let third = c.get(&path).send().await?;
    ensure!(third.status() == 503, "{}", third.status());
    ensure!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await?;
    ensure!(body["error"]["code"] == "too_many_streams", "{body}");
    // a closed stream gives its place back (once the api sees the connection gone)
    drop(a);
    let mut refused = 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.get(&path).send().await?;
        if r.status() == 200 {
            break;
        }
        ensure!(r.status() == 503, "{}", r.status());
        refused += 1;
        ensure!(Instant::now() < deadline, "the place never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
    for (bad, field) in [
        ("last_event_id=abc", "last_event_id"),
        ("x=1", "last_event_id"),
    ] {
        let r = c.get(format!("{path}?{bad}")).send().await?;
        let status = r.status();
        let body: Value = r.json().await?;
        ensure!(status.is_client_error(), "{bad}: {status}");
        ensure!(body["error"]["field"] == field, "{bad}: {body}");
    }
    let r = c.get(&path).header("Last-Event-ID", "12").send().await?;
    ensure!(r.status() == 400, "{}", r.status());
    let missing = format!(
        "{}/v1/tasks/default.01900000-0000-7000-8000-000000000000/events",
        s.api_url
    );
    let r = c.get(&missing).send().await?;
    ensure!(r.status() == 404, "{}", r.status());
    let metrics = c
        .get(format!("{}/metrics", s.api_url))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains(&format!("agentq_sse_refused_total {refused}")),
        "{refused} refused: {metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workflow_streams_its_nodes_status() -> Result<()> {
    let mut s = stack(0).await?;
    let _w = s.start_worker(&[]).await?;
    let r = s
        .http
        .post(format!("{}/v1/workflows", s.api_url))
        .json(&json!({"nodes": [
            {"id": "a", "prompt": "first"},
            {"id": "b", "prompt": "then {{nodes.a.output}}", "depends_on": ["a"]}
        ]}))
        .send()
        .await?;
    ensure!(r.status() == 202, "{}", r.status());
    let wf: Value = r.json().await?;
    let wid = wf["id"].as_str().context("id")?.to_owned();
    let events = read(&s, &format!("/v1/workflows/{wid}/events"), None, None).await?;
    let n = names(&events);
    ensure!(n.last() == Some(&"done"), "{n:?}");
    let node = |id: &str, status: &str| {
        events
            .iter()
            .position(|e| e.event == "node" && e.data["node"] == id && e.data["status"] == status)
    };
    let order = [
        node("a", "running"),
        node("a", "succeeded"),
        node("b", "queued"),
        node("b", "running"),
        node("b", "succeeded"),
    ];
    ensure!(order.iter().all(Option::is_some), "{events:#?}");
    ensure!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    let b = &events[order[4].unwrap_or(0)];
    ensure!(b.data["task_id"]
        .as_str()
        .is_some_and(|t| t.starts_with("default.")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_streaming_off_the_text_comes_whole_with_the_result() -> Result<()> {
    let mut s = Stack::new(MockConfig {
        record: true,
        ..MockConfig::default()
    })
    .await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[("AGENTQ_STREAM", "off")]).await?;
    let prompt = words(30, "o");
    let id = s.submit(&prompt).await?;
    let events = read(&s, &format!("/v1/tasks/{id}/events"), None, None).await?;
    let task = s.task(&id).await?;
    let result = task["result"]["content"].as_str().unwrap_or_default();
    let deltas: Vec<&Ev> = events.iter().filter(|e| e.event == "delta").collect();
    ensure!(deltas.len() == 1, "one piece: {:?}", names(&events));
    ensure!(kept_text(&events) == result);
    ensure!(names(&events).last() == Some(&"done"));
    let sent = s.request_bodies(&prompt);
    ensure!(
        sent.len() == 1 && sent[0].get("stream").is_none(),
        "no stream asked for: {sent:?}"
    );
    Ok(())
}

/// An event as a follower at any moment reads it: its name and data, without what differs
/// between two runs of the same story (the answer's words, which echo each task's own prompt, and
/// the retry's clock time).
fn story(events: &[Ev]) -> Vec<(String, Value)> {
    events
        .iter()
        .filter(|e| !e.id.is_empty())
        .map(|e| {
            let mut d = e.data.clone();
            if let Some(o) = d.as_object_mut() {
                o.remove("text");
                o.remove("result");
                o.remove("retry_at");
            }
            (e.event.clone(), d)
        })
        .collect()
}

/// Streams are written on demand (events.lua, "Streams on demand"): a task nobody follows writes
/// no stream, and its first follower, whenever it comes (while queued, mid-run, or long after the
/// end), reads the same events as a client that followed from the start: a plain task, a 5xx
/// retried, a 429 retried (an attempt given back), a permanent failure, a task cancelled while
/// queued and one followed mid-run. Every one's kept text is its result, and the LLM was called
/// exactly as often for the late tasks as for the early ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_follower_reads_the_same_story_as_an_early_one() -> Result<()> {
    let mut s = stack(2000).await?;
    let stories = [
        ("plain", ""),
        ("retried", "[[fail:500:1]]"),
        ("refused", "[[fail:400]]"),
        ("slow", "[[sleep:1500]]"),
    ];
    let prompt = |tag: &str, how: &str| format!("{}{how}", words(12, tag));
    // early: followed while queued, before any worker runs
    let mut early = Vec::new();
    for (name, how) in stories {
        let id = s.submit(&prompt(&format!("e{name}"), how)).await?;
        let reader = follow(&s, &id);
        early.push((id, reader));
    }
    // cancelled while queued: one followed, one not
    let cancel_early = s.submit(&words(12, "ecancel")).await?;
    let reader = follow(&s, &cancel_early);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancel_late = s.submit(&words(12, "lcancel")).await?;
    for id in [&cancel_early, &cancel_late] {
        s.cancel(id).await?;
    }
    let _w = s
        .start_worker(&[
            ("AGENTQ_RETRY_BASE_MS", "50"),
            ("AGENTQ_RETRY_MAX_MS", "100"),
            ("AGENTQ_STREAM_FLUSH_MS", "5000"),
        ])
        .await?;
    // the early ones end first: a 429 blocks the model for the fleet a while (flow control), and
    // a late task meeting that block would be parked first, another story
    let mut pairs = Vec::new();
    for ((id, reader), (name, how)) in early.into_iter().zip(stories) {
        let e = tokio::time::timeout(Duration::from_secs(30), reader).await???;
        pairs.push((name, id, e, how));
    }
    // late: nobody follows until the end (the slow one: from the middle of its run)
    let mut late = Vec::new();
    for (name, how) in stories {
        late.push(s.submit(&prompt(&format!("l{name}"), how)).await?);
    }
    let slow = late[3].clone();
    s.wait_for(&slow, Duration::from_secs(20), |t| t["status"] == "running")
        .await?;
    let mut mid = Some(follow(&s, &slow));
    let finals = s.wait_final(&late, Duration::from_secs(30)).await?;
    ensure!(finals[0]["status"] == "succeeded", "{}", finals[0]);
    let written = redis::cmd("EXISTS")
        .arg(format!("{}:events", task_key(&late[0])))
        .query::<bool>(&mut s.redis.conn()?)?;
    ensure!(!written, "a plain task nobody followed wrote a stream");
    for ((name, early_id, early_events, how), late_id) in pairs.into_iter().zip(&late) {
        let late_events = if let (true, Some(m)) = (name == "slow", mid.take()) {
            tokio::time::timeout(Duration::from_secs(30), m).await???
        } else {
            read(&s, &format!("/v1/tasks/{late_id}/events"), None, None).await?
        };
        let (a, b) = (story(&early_events), story(&late_events));
        ensure!(a == b, "{name}: followed early {a:?}\nfollowed late {b:?}");
        for (id, events) in [(&early_id, &early_events), (late_id, &late_events)] {
            let t = s.task(id).await?;
            let result = t["result"]["content"].as_str().unwrap_or_default();
            ensure!(
                kept_text(events) == result,
                "{name}: {:?} vs {t}",
                names(events)
            );
        }
        let calls = |tag: &str| s.mock.calls(&prompt(tag, how));
        ensure!(
            calls(&format!("e{name}")) == calls(&format!("l{name}")),
            "{name}: calls {} early, {} late",
            calls(&format!("e{name}")),
            calls(&format!("l{name}"))
        );
        if name == "slow" {
            // the mid-run follower's task is the same story, so with the same end
            ensure!(names(&late_events).last() == Some(&"done"), "{name}");
        }
    }
    let a = tokio::time::timeout(Duration::from_secs(10), reader).await???;
    let b = read(&s, &format!("/v1/tasks/{cancel_late}/events"), None, None).await?;
    ensure!(
        story(&a) == story(&b),
        "cancelled: {:?}\n{:?}",
        story(&a),
        story(&b)
    );
    ensure!(names(&b).last() == Some(&"error"), "{:?}", names(&b));

    // a 429 retried (the attempt is given back before the retry): a 429 also blocks the model for
    // the whole fleet a while (flow control), so its two tasks run alone, one after the other
    let how = "[[fail:429:1]]";
    let early_id = s.submit(&prompt("elimited", how)).await?;
    let a = read(&s, &format!("/v1/tasks/{early_id}/events"), None, None).await?;
    let late_id = s.submit(&prompt("llimited", how)).await?;
    s.wait_final(std::slice::from_ref(&late_id), Duration::from_secs(30))
        .await?;
    let b = read(&s, &format!("/v1/tasks/{late_id}/events"), None, None).await?;
    ensure!(
        story(&a) == story(&b),
        "limited: {:?}\n{:?}",
        story(&a),
        story(&b)
    );
    ensure!(
        names(&b)
            .iter()
            .filter(|n| **n == "attempt_started")
            .count()
            == 2,
        "{:?}",
        names(&b)
    );
    for (id, events) in [(&early_id, &a), (&late_id, &b)] {
        let t = s.task(id).await?;
        let result = t["result"]["content"].as_str().unwrap_or_default();
        ensure!(
            kept_text(events) == result,
            "limited: {:?} vs {t}",
            names(events)
        );
    }
    ensure!(
        s.mock.calls(&prompt("elimited", how)) == 2 && s.mock.calls(&prompt("llimited", how)) == 2
    );
    assert_no_panic(&s);
    Ok(())
}
