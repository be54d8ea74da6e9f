//! Issue 10, "Run ownership: fence every write with a per-run token": one test per numbered case
//! of the issue, each reproducing the fault with real processes (a private redis-server frozen
//! with SIGSTOP, workers frozen or killed, a Redis link with latency, a stub LLM sending what the
//! mock cannot) and asserting the exact LLM spend (per-prompt call counters) and the exact final
//! records, read straight from Redis (`token`, `runs`, `attempts`, `rate_limited`, `given_back`,
//! `recovered`, `fenced`) as well as over HTTP. The protocol under test is in docs/architecture.md.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq_common::keys::{TaskId, TICKET};
use agentq_common::time::now_ms;
use agentq_tests::fair::{fair_violations, pending_ids, push_pending};
use agentq_tests::{
    assert_no_panic, llm_series, log_tails, metric, signal, submit_max, task_key, MockConfig,
    MockLlm, Stack, Worker,
};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PENDING: &str = "agentq:{default}:pending";
/// The default tenant's line of pending ids (`pending` holds one ticket per id).
const DEFAULT_LINE: &str = "agentq:{default}:pending:default";
const ACTIVE: &str = "agentq:{default}:active";
const DELAYED: &str = "agentq:{default}:delayed";
const DEAD: &str = "agentq:{default}:dead";
const WORKERS: &str = "agentq:{default}:workers";
const TASK_PREFIX: &str = "agentq:{default}:task:";
const INFLIGHT_PREFIX: &str = "agentq:{default}:inflight:";

/// Worker logs as JSON objects with the per-run "task finished" lines (DEBUG) in them.
const JSON_LOGS: [(&str, &str); 2] = [
    ("AGENTQ_LOG_FORMAT", "json"),
    ("RUST_LOG", "info,agentq_worker=debug"),
];

fn inflight_key(worker: &str) -> String {
    format!("{INFLIGHT_PREFIX}{worker}")
}

fn heartbeat_key(worker: &str) -> String {
    format!("agentq:{{default}}:worker:{worker}")
}

fn with<'a>(a: &[(&'a str, &'a str)], b: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    a.iter().chain(b).copied().collect()
}

// ---- reading the records and the lists straight from Redis ----

/// A task record as HGETALL returns it.
#[derive(Debug, Clone, PartialEq)]
struct Rec(HashMap<String, String>);

impl Rec {
    fn get(&self, field: &str) -> Option<&str> {
        self.0.get(field).map(String::as_str)
    }

    fn status(&self) -> &str {
        self.get("status").unwrap_or("<no record>")
    }

    /// A counter field; absent means 0 (the scripts create counters on first use). A value that
    /// is not a number shows up as u64::MAX so that no assertion can pass on it by accident.
    fn n(&self, field: &str) -> u64 {
        self.0
            .get(field)
            .map_or(0, |v| v.parse().unwrap_or(u64::MAX))
    }
}

impl std::fmt::Display for Rec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut fields: Vec<(&String, &String)> = self
            .0
            .iter()
            .filter(|(k, _)| *k != "payload" && *k != "result")
            .collect();
        fields.sort();
        write!(f, "{fields:?}")
    }
}

fn rec(c: &mut redis::Connection, id: &str) -> Result<Rec> {
    Ok(Rec(redis::cmd("HGETALL").arg(task_key(id)).query(c)?))
}

/// Asserts counter fields of a record, naming the case and the whole record on failure.
fn assert_fields(what: &str, r: &Rec, want: &[(&str, u64)]) {
    for (field, n) in want {
        assert_eq!(r.n(field), *n, "{what}: `{field}` in {r}");
    }
}

fn lrange(c: &mut redis::Connection, key: &str) -> Result<Vec<String>> {
    Ok(redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query(c)?)
}

fn zrange(c: &mut redis::Connection, key: &str) -> Result<Vec<String>> {
    Ok(redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).query(c)?)
}

fn keys(c: &mut redis::Connection, pattern: &str) -> Result<Vec<String>> {
    Ok(redis::cmd("KEYS").arg(pattern).query(c)?)
}

/// Every place each id sits in, one entry per copy: "pending", "delayed", "dead" or an in-flight
/// list's key.
fn places(c: &mut redis::Connection) -> Result<HashMap<String, Vec<String>>> {
    let mut at: HashMap<String, Vec<String>> = HashMap::new();
    for id in pending_ids(c)? {
        at.entry(id).or_default().push("pending".to_owned());
    }
    for (key, name) in [(DELAYED, "delayed"), (DEAD, "dead")] {
        for id in zrange(c, key)? {
            at.entry(id).or_default().push(name.to_owned());
        }
    }
    for list in keys(c, &format!("{INFLIGHT_PREFIX}*"))? {
        // a ticket a blocking wait moved is no id (fair_violations counts it)
        for id in lrange(c, &list)?.into_iter().filter(|e| e != TICKET) {
            at.entry(id).or_default().push(list.clone());
        }
    }
    Ok(at)
}

/// The protocol's invariants, checked when nothing is moving: every id in at most one of pending
/// (counting duplicates), delayed, an in-flight list (counting duplicates) and dead; `active` is
/// exactly the set of running tasks; a running task sits in its own worker's in-flight list; a
/// failed one is in dead; a finished one nowhere else; a queued or retrying one where it can be
/// taken from.
fn check_invariants(c: &mut redis::Connection) -> Result<()> {
    let at = places(c)?;
    let twice: Vec<_> = at.iter().filter(|(_, p)| p.len() > 1).collect();
    ensure!(twice.is_empty(), "ids in more than one place: {twice:?}");
    let active: HashSet<String> = zrange(c, ACTIVE)?.into_iter().collect();
    let mut running = HashSet::new();
    // records only: a task's event stream sits beside it as `<record key>:events`
    for key in keys(c, &format!("{TASK_PREFIX}*"))?
        .into_iter()
        .filter(|k| !k.ends_with(":events"))
    {
        let id = key.trim_start_matches(TASK_PREFIX).to_owned();
        let (status, worker): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("status")
            .arg("worker")
            .query(c)?;
        let place: Vec<&str> = at
            .get(&id)
            .map(|p| p.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let ok = match status.as_deref() {
            Some("running") => {
                running.insert(id.clone());
                place == [inflight_key(worker.as_deref().unwrap_or_default()).as_str()]
            }
            Some("failed") => place == ["dead"],
            Some("succeeded" | "cancelled") => place.is_empty(),
            Some("queued") => {
                place.len() == 1 && (place[0] == "pending" || place[0].starts_with(INFLIGHT_PREFIX))
            }
            Some("retrying") => place == ["delayed"] || place == ["pending"],
            _ => false,
        };
        ensure!(
            ok,
            "{id} is {status:?} (worker {worker:?}) but sits in {place:?}"
        );
    }
    ensure!(
        active == running,
        "active {active:?} is not the set of running tasks {running:?}"
    );
    let fair = fair_violations(c, true)?;
    ensure!(fair.is_empty(), "fair scheduling's invariants: {fair:?}");
    Ok(())
}

// ---- worker logs ----

/// The "task finished" lines a worker logged for `id`, one per run it reported.
fn finished_lines(w: &Worker, id: &str) -> Vec<Value> {
    w.proc
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "task finished")
        .filter(|v| {
            // flattened as the spec says; nested under "fields" is accepted too
            let field = v.get("task.id").or_else(|| v["fields"].get("task.id"));
            field.and_then(Value::as_str) == Some(id)
        })
        .collect()
}

/// The verdicts (ok, stale, cancelled, retrying, …) of the runs a worker reported for `id`.
fn verdicts(w: &Worker, id: &str) -> Vec<String> {
    finished_lines(w, id)
        .iter()
        .map(|v| {
            v.get("verdict")
                .or_else(|| v["fields"].get("verdict"))
                .and_then(Value::as_str)
                .unwrap_or("<none>")
                .to_owned()
        })
        .collect()
}

// ---- waiting ----

/// Polls `cond` every `every` until it holds; errors from `cond` count as "not yet".
async fn poll<F>(what: &str, timeout: Duration, every: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = cond();
        if let Ok(true) = last {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not true after {timeout:?} (last: {last:?})");
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until the mock has seen `n` calls of `prompt` (polled every 2 ms).
async fn calls_reach(mock: &MockLlm, prompt: &str, n: u64) -> Result<()> {
    poll(
        &format!("{prompt:?} reaches {n} calls"),
        Duration::from_secs(15),
        Duration::from_millis(2),
        || Ok(mock.calls(prompt) >= n),
    )
    .await
}

async fn worker_metric(w: &Worker, series: &str) -> f64 {
    w.metrics().await.map_or(-1.0, |m| metric(&m, series))
}

/// Runs a worker has reported, whatever the verdict (the sum of `agentq_tasks_total`).
async fn reports(w: &Worker) -> f64 {
    w.metrics().await.map_or(-1.0, |m| {
        m.lines()
            .filter(|l| l.starts_with("agentq_tasks_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    })
}

/// Polls a worker's metrics (its probe server needs no Redis) until `series` reaches `n`.
async fn metric_reaches(w: &Worker, series: &str, n: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = worker_metric(w, series).await;
        if v >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{series} is {v}, never reached {n}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Series in the api's /metrics (comment lines aside).
async fn api_metric_lines(s: &Stack) -> Result<usize> {
    let text = s
        .http
        .get(format!("{}/metrics", s.api_url))
        .send()
        .await?
        .text()
        .await?;
    Ok(text.lines().filter(|l| !l.starts_with('#')).count())
}

/// Series in a worker's /metrics (comment lines aside).
async fn worker_metric_lines(w: &Worker) -> Result<usize> {
    Ok(w.metrics()
        .await?
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count())
}

/// Runs one task through a 500 and a success, so fail.lua and complete.lua are in Redis's script
/// cache: a script first sent while Redis is frozen goes out as EVALSHA, comes back NOSCRIPT
/// after its caller gave up, and never runs, which would hide the replayed reports under test.
async fn warm_up_scripts(s: &Stack) -> Result<()> {
    let id = s.submit("warm-up [[fail:500:1]]").await?;
    let done = s.wait_final(&[id], Duration::from_secs(15)).await?;
    ensure!(done[0]["status"] == "succeeded", "warm-up: {}", done[0]);
    Ok(())
}

// ---- a stub LLM for what the mock cannot send ----

/// One answer of the stub LLM.
#[derive(Clone)]
enum Reply {
    /// A complete response with a Content-Length.
    Whole {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// A chunked body of `fill` bytes that never ends (until the client goes away, or 30 s).
    Endless { status: u16, fill: u8 },
}

type Plan = dyn Fn(&str, usize) -> Reply + Send + Sync;

/// A raw HTTP/1.1 server on a free port answering `POST …/chat/completions` with whatever the
/// plan says for (prompt, 1-based call number); counts and timestamps calls per prompt.
struct Stub {
    url: String,
    calls: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
}

impl Stub {
    async fn spawn(plan: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1", listener.local_addr()?);
        let calls: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
        let plan: Arc<Plan> = Arc::new(plan);
        let counters = calls.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (plan, counters) = (plan.clone(), counters.clone());
                tokio::spawn(async move {
                    let _ = stub_answer(stream, &*plan, &counters).await;
                });
            }
        });
        Ok(Self { url, calls })
    }

    fn times(&self, prompt: &str) -> Vec<Instant> {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.get(prompt).cloned().unwrap_or_default()
    }

    fn calls(&self, prompt: &str) -> usize {
        self.times(prompt).len()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn stub_answer(
    mut stream: TcpStream,
    plan: &Plan,
    calls: &Mutex<HashMap<String, Vec<Instant>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
    let prompt = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let call = {
        let mut calls = calls.lock().unwrap_or_else(|p| p.into_inner());
        let times = calls.entry(prompt.clone()).or_default();
        times.push(Instant::now());
        times.len()
    };
    match plan(&prompt, call) {
        Reply::Whole {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} Stub\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&body).await?;
            stream.shutdown().await
        }
        Reply::Endless { status, fill } => {
            let head = format!(
                "HTTP/1.1 {status} Stub\r\ncontent-type: application/json\r\n\
                 transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            const PIECE: usize = 64 * 1024;
            let mut piece = format!("{PIECE:x}\r\n").into_bytes();
            piece.extend(std::iter::repeat_n(fill, PIECE));
            piece.extend_from_slice(b"\r\n");
            // ~64 MB/s: a client that reads it all piles up hundreds of MB within its timeout
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until {
                match tokio::time::timeout(Duration::from_secs(5), stream.write_all(&piece)).await {
                    Ok(Ok(())) => {}
                    // the client closed the connection, or stopped reading without closing it
                    _ => return Ok(()),
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        }
    }
}

/// A valid chat completion carrying `content`.
fn completion(content: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": "stub-model",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
            "logprobs": null
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    }))
    .unwrap_or_default()
}

fn ok_reply(content: &str) -> Reply {
    Reply::Whole {
        status: 200,
        headers: Vec::new(),
        body: completion(content),
    }
}

// ---- a Redis link with latency ----

/// A TCP proxy to Redis that holds every chunk of replies for `delay` before passing it on: Redis
/// a couple of milliseconds away, as across zones. Returns the proxy's port.
async fn slow_link(redis_port: u16, delay: Duration) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    return;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                    let _ = to_server.shutdown().await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match from_server.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    tokio::time::sleep(delay).await;
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                requests.abort();
            });
        }
    });
    Ok(port)
}

// ---- 1. lost replies must not replay a report ----

/// Redis freezes while three runs report (a 429, a 503 and a success). Each report's reply is lost
/// to the 3 s response timeout and the worker sends it again; when Redis wakes, every copy runs.
/// Before the fix each copy of the 429 counted again (rate_limited 3) and re-queued a task whose
/// next run had already started. Now a copy of an accepted report returns the first verdict and
/// moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_lost_in_a_redis_freeze_do_not_replay_a_report() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    // Exactly as many permits as tasks: no fetch is in flight during the freeze, so a fetch whose
    // reply is lost cannot add a run of its own and `runs` stays exact.
    let w = s
        .start_worker(&with(&JSON_LOGS, &[("WORKER_CONCURRENCY", "3")]))
        .await?;
    warm_up_scripts(&s).await?;
    let limited = "429 while Redis froze [[sleep:1500]][[fail:429:1:0]]";
    let broken = "503 while Redis froze [[sleep:1500]][[fail:503:1]]";
    let fine = "success while Redis froze [[sleep:1500]]";
    let prompts = [limited, broken, fine];
    let mut ids = Vec::new();
    for p in prompts {
        ids.push(submit_max(&s, p, 2).await?);
    }
    for p in prompts {
        calls_reach(&s.mock, p, 1).await?;
    }
    let redis_pid = s.redis.pid().context("redis running")?;
    signal(redis_pid, "STOP");
    // The three answers come back 1.5 s after the calls (counted in the worker's own metrics,
    // warm-up included) and their reports go out into the frozen Redis.
    metric_reaches(&w, &llm_series("mock-gpt", "rate_limited"), 1.0).await?;
    metric_reaches(&w, &llm_series("mock-gpt", "server_error"), 2.0).await?;
    metric_reaches(&w, &llm_series("mock-gpt", "ok"), 2.0).await?;
    let reported = Instant::now();
    // Each reply times out after 3 s and the report is resent after a short backoff: stay frozen
    // until a second copy of every report is queued behind the first.
    tokio::time::sleep_until((reported + Duration::from_millis(4500)).into()).await;
    signal(redis_pid, "CONT");

    let done = s
        .wait_final(&ids, Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    for t in &done {
        assert_eq!(t["status"], "succeeded", "{t}");
    }
    let mut c = s.redis.conn()?;
    let r = rec(&mut c, &ids[0])?;
    assert_fields(
        "429 reported twice",
        &r,
        &[
            ("rate_limited", 1),
            ("attempts", 1),
            ("runs", 2),
            ("fenced", 0),
            ("given_back", 0),
            ("recovered", 0),
        ],
    );
    assert_eq!(s.mock.calls(limited), 2, "one 429, one success");
    let r = rec(&mut c, &ids[1])?;
    assert_fields(
        "503 reported twice",
        &r,
        &[
            ("rate_limited", 0),
            ("attempts", 2),
            ("runs", 2),
            ("fenced", 0),
        ],
    );
    assert_eq!(s.mock.calls(broken), 2, "one 503, one success");
    let r = rec(&mut c, &ids[2])?;
    assert_fields(
        "success reported twice",
        &r,
        &[("attempts", 1), ("runs", 1), ("fenced", 0)],
    );
    assert_eq!(s.mock.calls(fine), 1);
    for id in &ids {
        let r = rec(&mut c, id)?;
        assert_eq!(r.get("token"), None, "a finished task has no run: {r}");
    }
    // one line per run, whatever the number of copies; exactly one write of each result
    assert_eq!(verdicts(&w, &ids[0]), ["retrying", "ok"]);
    assert_eq!(verdicts(&w, &ids[1]), ["retrying", "ok"]);
    assert_eq!(verdicts(&w, &ids[2]), ["ok"]);
    check_invariants(&mut c)?;
    let q = s.queue("default").await?;
    assert_eq!(
        (
            q["pending"].as_u64(),
            q["inflight"].as_u64(),
            q["retrying"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{q}"
    );
    assert_no_panic(&s);
    Ok(())
}

// ---- 2. a stale owner is fenced ----

/// Worker A stalls (SIGSTOP) mid-call past its 3 s heartbeat; B recovers both tasks and reruns
/// them; A wakes during B's runs and reports its old answers, a 503 and a 400. Before the fix the
/// 503 moved the task, still running on B, to retrying (a third run), and the 400 buried it so
/// B's success was dropped. Now A's reports are refused (`fenced` 1) and B's results stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_is_fenced_and_the_rescuers_result_stands() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    // The LLM timeout outlasts A's stall, so A reports the answers it got, not a timeout.
    let env = with(
        &JSON_LOGS,
        &[
            ("AGENTQ_HEARTBEAT_SECS", "3"),
            ("AGENTQ_LLM_TIMEOUT_SECS", "30"),
            ("WORKER_CONCURRENCY", "2"),
        ],
    );
    let a = s.start_worker(&env).await?;
    let transient = "stale 503 [[sleep:2000]][[fail:503:1]]";
    let permanent = "stale 400 [[sleep:2000]][[fail:400:1]]";
    let ids = [s.submit(transient).await?, s.submit(permanent).await?];
    calls_reach(&s.mock, transient, 1).await?;
    calls_reach(&s.mock, permanent, 1).await?;
    let mut c = s.redis.conn()?;
    let a_id = rec(&mut c, &ids[0])?
        .get("worker")
        .context("running task names its worker")?
        .to_owned();
    assert_eq!(rec(&mut c, &ids[1])?.get("worker"), Some(a_id.as_str()));
    signal(a.proc.pid(), "STOP");
    let b = s.start_worker(&env).await?;
    poll(
        "B recovered both tasks and is running them",
        Duration::from_secs(20),
        Duration::from_millis(10),
        || {
            let mut ok = true;
            for id in &ids {
                let r = rec(&mut c, id)?;
                ok &= r.status() == "running" && r.get("worker") != Some(a_id.as_str());
            }
            Ok(ok)
        },
    )
    .await
    .with_context(|| log_tails(&s))?;
    calls_reach(&s.mock, transient, 2).await?;
    calls_reach(&s.mock, permanent, 2).await?;
    // A wakes while B's calls (2 s) are still going and reports with its old token at once.
    signal(a.proc.pid(), "CONT");
    // Every LLM call ends in exactly one report (counted in agentq_tasks_total by the worker that
    // made it): wait until A's two late ones and B's two are in, and any further run too.
    let all_reported = || async {
        let reported = reports(&a).await + reports(&b).await;
        let calls = s.mock.calls(transient) + s.mock.calls(permanent);
        reported == calls as f64 && reports(&a).await >= 2.0
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !all_reported().await {
        if Instant::now() > deadline {
            bail!("not every call was reported\n{}", log_tails(&s));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = s
        .wait_final(&ids, Duration::from_secs(15))
        .await
        .with_context(|| log_tails(&s))?;
    let b_id = rec(&mut c, &ids[0])?
        .get("worker")
        .unwrap_or_default()
        .to_owned();
    for ((p, id), t) in [transient, permanent].iter().zip(&ids).zip(&done) {
        assert_eq!(t["status"], "succeeded", "B's result stands: {t}");
        assert_eq!(t["result"]["content"], format!("echo: {p}"), "{t}");
        assert_eq!(s.mock.calls(p), 2, "{p}: A's call and B's, no third run");
        let r = rec(&mut c, id)?;
        assert_fields(
            p,
            &r,
            &[
                ("fenced", 1),
                ("recovered", 1),
                ("runs", 2),
                ("attempts", 2),
                ("rate_limited", 0),
                ("given_back", 0),
            ],
        );
        assert_eq!(r.get("token"), None, "{r}");
        assert_eq!(r.get("worker"), Some(b_id.as_str()), "{r}");
        assert_eq!(verdicts(&a, id), ["stale"], "A's report of {p}");
        assert_eq!(verdicts(&b, id), ["ok"], "B's report of {p}");
    }
    assert_ne!(b_id, a_id);
    check_invariants(&mut c)?;
    assert_eq!(zrange(&mut c, DELAYED)?, Vec::<String>::new());
    assert_no_panic(&s);
    Ok(())
}

// ---- 3. drain deadline during a Redis stall ----

/// Redis freezes just as a run's 503 comes back; the worker is told to stop, its 1 s drain
/// deadline drops the run while its fail.lua waits in the frozen Redis, and it gives the task
/// back. Before the fix both writes landed when Redis woke: the id sat in pending and delayed,
/// attempts went to 0 after a paid run, and the worker said "give-back failed" though it had
/// landed. Now the run's own report wins, the give-back (same run) changes nothing, the id is in
/// one place and the task ends with exactly one more call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_deadline_during_a_redis_stall_leaves_the_task_in_one_place() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    // One permit: no fetch is in flight during the freeze (one landing late could start a run
    // whose reply nobody reads).
    let mut w1 = s
        .start_worker(&[
            ("AGENTQ_DRAIN_TIMEOUT_SECS", "1"),
            ("WORKER_CONCURRENCY", "1"),
        ])
        .await?;
    warm_up_scripts(&s).await?;
    let p = "paid, then stalled [[sleep:1000]][[fail:503:1]]";
    let id = submit_max(&s, p, 3).await?;
    calls_reach(&s.mock, p, 1).await?;
    let redis_pid = s.redis.pid().context("redis running")?;
    signal(redis_pid, "STOP");
    // the warm-up's 500 and now this 503: the report is on its way into the frozen Redis
    metric_reaches(&w1, &llm_series("mock-gpt", "server_error"), 2.0).await?;
    w1.proc.sigterm();
    let termed = Instant::now();
    // 1 s of drain, then the deadline; the give-back's reply times out 3 s later
    tokio::time::sleep_until((termed + Duration::from_secs(5)).into()).await;
    signal(redis_pid, "CONT");
    let status = w1.proc.wait_exit(Duration::from_secs(20))?;
    assert!(status.success(), "exit {status:?}\n{}", w1.proc.tail());
    let log = w1.proc.log_text();
    assert!(
        !log.contains("give-back failed"),
        "the worker must not report a failed give-back that landed:\n{}",
        w1.proc.tail()
    );

    let mut c = s.redis.conn()?;
    let r = rec(&mut c, &id)?;
    assert_eq!(
        r.status(),
        "retrying",
        "the run's own 503 report stands: {r}"
    );
    assert_fields(
        "after the stalled drain",
        &r,
        &[
            ("attempts", 1),
            ("runs", 1),
            ("given_back", 0),
            ("fenced", 0),
            ("recovered", 0),
        ],
    );
    assert_eq!(r.get("token"), None, "{r}");
    assert!(
        r.get("error").unwrap_or_default().contains("503"),
        "the paid run's error is kept: {r}"
    );
    check_invariants(&mut c)?;
    assert_eq!(s.mock.calls(p), 1);

    let _w2 = s.start_worker(&[]).await?;
    let done = s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    let r = rec(&mut c, &id)?;
    assert_fields(
        "finished by the next worker",
        &r,
        &[
            ("attempts", 2),
            ("runs", 2),
            ("given_back", 0),
            ("fenced", 0),
        ],
    );
    assert_eq!(s.mock.calls(p), 2, "the 503 and one success");
    check_invariants(&mut c)?;
    assert_no_panic(&s);
    Ok(())
}

// ---- 4. Retry-After values the mock cannot send ----

/// A stub LLM answers each prompt's first call with a 429 carrying an odd Retry-After, then a
/// completion. Before the fix `1e20` panicked in Duration::from_secs_f64 (the task stayed running
/// until the process exited) and a year was obeyed as is. Now big values are clamped to
/// AGENTQ_RETRY_MAX_MS (1 s here), garbage means "absent" (backoff), nothing panics, and every
/// task is retried once and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_retry_after_values_are_clamped_or_ignored_and_never_panic() -> Result<()> {
    let stub = Stub::spawn(|prompt, call| {
        let value = prompt.strip_prefix("retry-after ").unwrap_or_default();
        if call == 1 {
            Reply::Whole {
                status: 429,
                headers: vec![("retry-after", value.to_owned())],
                body: br#"{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}"#.to_vec(),
            }
        } else {
            ok_reply(&format!("fine after {value}"))
        }
    })
    .await?;
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = s
        .start_worker(&[
            ("OPENAI_BASE_URL", stub.url.as_str()),
            ("AGENTQ_RETRY_MAX_MS", "1000"),
            ("WORKER_CONCURRENCY", "16"),
        ])
        .await?;
    // (Retry-After, clamped to the cap rather than ignored)
    let cases = [
        ("31536000", true),                      // one year
        ("18446744073709551615", true),          // u64::MAX seconds: overflowed i64 ms
        ("Fri, 31 Dec 9999 23:59:59 GMT", true), // a date millennia ahead
        ("1e20", false),                         // panicked; clamped or ignored, either is fine
        ("99999999999999999999999", false),      // beyond u64
        ("soon", false),                         // garbage
        ("-5", false),                           // garbage
        ("NaN", false),                          // garbage
    ];
    let prompts: Vec<String> = cases
        .iter()
        .map(|(v, _)| format!("retry-after {v}"))
        .collect();
    let mut ids = Vec::new();
    // Each case on a model of its own: a 429 blocks its model for the whole fleet (flow
    // control), and these cases measure each task's own wait, not each other's blocks.
    for (i, p) in prompts.iter().enumerate() {
        ids.push(
            s.submit_json(&serde_json::json!({"prompt": p, "model": format!("odd-{i}")}))
                .await?,
        );
    }
    let done = s
        .wait_final(&ids, Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    let mut c = s.redis.conn()?;
    for (((value, clamped), p), (id, t)) in cases.iter().zip(&prompts).zip(ids.iter().zip(&done)) {
        assert_eq!(t["status"], "succeeded", "Retry-After {value:?}: {t}");
        assert_eq!(t["result"]["content"], format!("fine after {value}"), "{t}");
        let r = rec(&mut c, id)?;
        assert_fields(
            value,
            &r,
            &[
                ("rate_limited", 1),
                ("attempts", 1),
                ("runs", 2),
                ("fenced", 0),
            ],
        );
        let times = stub.times(p);
        assert_eq!(
            times.len(),
            2,
            "Retry-After {value:?}: one 429, one success"
        );
        let gap = times[1] - times[0];
        // the retry is due after the wait, then promoted (every 250 ms) and fetched; a clamped
        // wait is spread over the top fifth below the cap so waiters do not wake together
        if *clamped {
            assert!(
                gap >= Duration::from_millis(790) && gap < Duration::from_millis(3000),
                "Retry-After {value:?} must wait AGENTQ_RETRY_MAX_MS (1 s), waited {gap:?}"
            );
        } else {
            assert!(
                gap < Duration::from_millis(3000),
                "Retry-After {value:?}: waited {gap:?}, more than the 1 s cap"
            );
        }
        if ["soon", "-5", "NaN"].contains(value) {
            // absent: backoff, which is at most 50 ms for a first retry here
            assert!(
                gap < Duration::from_millis(900),
                "garbage Retry-After {value:?} must be ignored, waited {gap:?}"
            );
        }
    }
    assert_eq!(
        s.http
            .get(format!("{}/healthz", w.probe))
            .send()
            .await?
            .status(),
        200
    );
    check_invariants(&mut c)?;
    assert_no_panic(&s);
    Ok(())
}

// ---- 5. duplicate ids never run twice ----

/// The same id is pushed onto pending twice: once before any worker runs (both copies are taken
/// in one fetch) and once while its run is in progress (taken by the blocking wait). Before the
/// fix each copy started a run, and when one finished the other was no longer "held", so the
/// orphan sweep pushed a running id back to pending. Now a copy of a running task is dropped
/// unstarted: one run, one call, and every list ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_on_pending_run_once_and_leave_the_lists_clean() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let mut c = s.redis.conn()?;
    let before = "pushed twice before the worker starts [[sleep:1500]]";
    let during = "pushed again while it runs [[sleep:1500]]";
    let x = s.submit(before).await?;
    push_pending(&mut c, &x)?;
    assert_eq!(pending_ids(&mut c)?, [x.clone(), x.clone()]);
    let w = s.start_worker(&[("WORKER_CONCURRENCY", "4")]).await?;
    let y = s.submit(during).await?;
    calls_reach(&s.mock, during, 1).await?;
    push_pending(&mut c, &y)?;
    poll(
        "the second copy of y was taken",
        Duration::from_secs(5),
        Duration::from_millis(5),
        || Ok(pending_ids(&mut c)?.is_empty()),
    )
    .await?;
    let ids = [x.clone(), y.clone()];
    let done = s
        .wait_final(&ids, Duration::from_secs(15))
        .await
        .with_context(|| log_tails(&s))?;
    let worker = rec(&mut c, &x)?
        .get("worker")
        .unwrap_or_default()
        .to_owned();
    poll(
        "the queue is quiet",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            Ok(pending_ids(&mut c)?.is_empty()
                && zrange(&mut c, ACTIVE)?.is_empty()
                && lrange(&mut c, &inflight_key(&worker))?.is_empty())
        },
    )
    .await?;
    // Two orphan sweeps (one per heartbeat third, 2 s heartbeat) would bring back a copy the
    // worker let go of: wait that long for anything to come back.
    let records: Vec<Rec> = ids
        .iter()
        .map(|id| rec(&mut c, id))
        .collect::<Result<_>>()?;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for ((p, id), (t, was)) in [before, during]
        .iter()
        .zip(&ids)
        .zip(done.iter().zip(&records))
    {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(s.mock.calls(p), 1, "{p}: a duplicate copy must not run");
        let r = rec(&mut c, id)?;
        assert_fields(p, &r, &[("runs", 1), ("attempts", 1), ("fenced", 0)]);
        assert_eq!(&r, was, "{p}: the record must not change afterwards");
    }
    assert_eq!(pending_ids(&mut c)?, Vec::<String>::new());
    assert_eq!(zrange(&mut c, ACTIVE)?, Vec::<String>::new());
    assert_eq!(
        lrange(&mut c, &inflight_key(&worker))?,
        Vec::<String>::new()
    );
    check_invariants(&mut c)?;
    assert_eq!(worker_metric(&w, "agentq_active_tasks").await, 0.0);
    assert_no_panic(&s);
    Ok(())
}

// ---- 6. the heartbeat outlives a slow maintenance pass ----

/// Redis is 2 ms away (a proxy delays every reply) and 2,000 other workers are registered and
/// alive, so one recovery pass over them takes over 4 s, twice the heartbeat TTL. Before the fix
/// the heartbeat shared one sequential loop with that pass, lapsed, and the live worker's task
/// was recovered and run again. Now the heartbeat has its own timer and connection: it never
/// lapses and the task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_maintenance_pass_never_lets_a_live_heartbeat_lapse() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let mut c = s.redis.conn()?;
    let mut pipe = redis::pipe();
    for i in 0..2000 {
        let fake = format!("fake-{i}");
        pipe.cmd("SET")
            .arg(heartbeat_key(&fake))
            .arg(1)
            .arg("EX")
            .arg(600)
            .ignore();
        pipe.cmd("SADD").arg(WORKERS).arg(&fake).ignore();
    }
    pipe.query::<()>(&mut c)?;
    let link = slow_link(s.redis.port, Duration::from_millis(2)).await?;
    let url = format!("redis://127.0.0.1:{link}");
    let env = [("REDIS_URL", url.as_str()), ("AGENTQ_HEARTBEAT_SECS", "2")];
    let _a = s.start_worker(&env).await?;
    let _b = s.start_worker(&env).await?;
    let real = |c: &mut redis::Connection| -> Result<Vec<String>> {
        let all: Vec<String> = redis::cmd("SMEMBERS").arg(WORKERS).query(c)?;
        Ok(all
            .into_iter()
            .filter(|w| w.starts_with("worker-"))
            .collect())
    };
    poll(
        "both workers registered",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(real(&mut c)?.len() == 2),
    )
    .await?;
    let live = real(&mut c)?;
    let p = "outlives a maintenance pass [[sleep:4500]]";
    let id = s.submit(p).await?;
    // Watch both heartbeats for the whole run: a pass of over 4 s against a 2 s TTL opens a gap of
    // seconds in every cycle of the old loop, so this window cannot miss it.
    let mut lapses: Vec<(String, Duration)> = Vec::new();
    let t0 = Instant::now();
    loop {
        for w in &live {
            let alive: bool = redis::cmd("EXISTS").arg(heartbeat_key(w)).query(&mut c)?;
            if !alive {
                lapses.push((w.clone(), t0.elapsed()));
            }
        }
        let r = rec(&mut c, &id)?;
        if matches!(r.status(), "succeeded" | "failed" | "cancelled") {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("task never finished: {r}\n{}", log_tails(&s));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        lapses.is_empty(),
        "a live worker's heartbeat lapsed (worker, time since submit): {:?}",
        &lapses[..lapses.len().min(10)]
    );
    let r = rec(&mut c, &id)?;
    assert_eq!(r.status(), "succeeded", "{r}");
    assert_fields(
        "live owner",
        &r,
        &[
            ("recovered", 0),
            ("runs", 1),
            ("attempts", 1),
            ("fenced", 0),
        ],
    );
    assert_eq!(
        s.mock.calls(p),
        1,
        "the live worker's task must not be rerun"
    );
    assert_no_panic(&s);
    Ok(())
}

// ---- 7. a worker killed right after its fetch is recovered ----

/// Recovery has just written worker A off (removed from `workers`, heartbeat gone, as after a
/// stall) while A is in fact alive; A's next fetch takes a task and A is SIGKILLed mid-call,
/// long before its next heartbeat. Before the fix nothing registered A again, so nobody ever
/// recovered the task: it stayed `running` forever. Now the fetch registers A itself (SADD and a
/// heartbeat with TTL), the heartbeat expires, and B recovers and reruns the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_right_after_its_fetch_is_still_recovered() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    // a 3 s heartbeat beats every second: the whole kill sequence fits between two beats
    let mut a = s.start_worker(&[("AGENTQ_HEARTBEAT_SECS", "3")]).await?;
    let mut c = s.redis.conn()?;
    poll(
        "A registered",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || Ok(redis::cmd("SCARD").arg(WORKERS).query::<u64>(&mut c)? == 1),
    )
    .await?;
    let members: Vec<String> = redis::cmd("SMEMBERS").arg(WORKERS).query(&mut c)?;
    let a_id = members.first().context("A in workers")?.clone();
    let hb = heartbeat_key(&a_id);
    // catch one of A's beats (the key's TTL jumps back up), then act right away
    let mut last: i64 = redis::cmd("PTTL").arg(&hb).query(&mut c)?;
    poll(
        "one of A's heartbeats",
        Duration::from_secs(5),
        Duration::from_millis(2),
        || {
            let now: i64 = redis::cmd("PTTL").arg(&hb).query(&mut c)?;
            let beat = now > last + 200;
            last = now;
            Ok(beat)
        },
    )
    .await?;
    let beat = Instant::now();
    redis::pipe()
        .cmd("SREM")
        .arg(WORKERS)
        .arg(&a_id)
        .ignore()
        .cmd("DEL")
        .arg(&hb)
        .ignore()
        .query::<()>(&mut c)?;
    let p = "fetched just before a SIGKILL [[sleep:1500]]";
    let id = s.submit(p).await?;
    calls_reach(&s.mock, p, 1).await?;
    a.proc.sigkill();
    let killed_after = beat.elapsed();
    let r = rec(&mut c, &id)?;
    assert_eq!(r.status(), "running", "{r}");
    assert_eq!(r.get("worker"), Some(a_id.as_str()), "{r}");
    assert_eq!(
        lrange(&mut c, &inflight_key(&a_id))?,
        std::slice::from_ref(&id)
    );
    let registered: bool = redis::cmd("SISMEMBER")
        .arg(WORKERS)
        .arg(&a_id)
        .query(&mut c)?;
    assert!(
        registered,
        "A's fetch must register A ({killed_after:?} after its last heartbeat, none since)"
    );
    let ttl: i64 = redis::cmd("PTTL").arg(&hb).query(&mut c)?;
    assert!(
        ttl > 0 && ttl <= 3000,
        "the fetch leaves a heartbeat with A's TTL (3 s), got {ttl} ms"
    );

    let b = s.start_worker(&[]).await?;
    let done = s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    let r = rec(&mut c, &id)?;
    assert_fields(
        "recovered after SIGKILL",
        &r,
        &[
            ("recovered", 1),
            ("runs", 2),
            ("attempts", 2),
            ("fenced", 0),
        ],
    );
    assert!(
        r.get("worker").is_some_and(|w| w.starts_with("worker-2-")),
        "B ran it: {r}"
    );
    assert_eq!(s.mock.calls(p), 2, "A's call and B's");
    let still: bool = redis::cmd("SISMEMBER")
        .arg(WORKERS)
        .arg(&a_id)
        .query(&mut c)?;
    assert!(!still, "recovery deregisters A");
    assert_eq!(lrange(&mut c, &inflight_key(&a_id))?, Vec::<String>::new());
    check_invariants(&mut c)?;
    drop(b);
    assert_no_panic(&s);
    Ok(())
}

// ---- 8. bounded queues and model labels ----

/// 300 POSTs naming random queues, and 300 tasks naming random models. Before the fix every queue
/// was created (300 members in the queues set, ~1,900 /metrics lines) and every model became a
/// metric label. Now only AGENTQ_QUEUES exist: another queue is a 422 naming `queue` that writes
/// nothing, and its routes are 404; unknown models are reported as model="other", so neither
/// /metrics grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_queues_are_refused_and_model_labels_stay_bounded() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[("AGENTQ_QUEUES", "default,alpha")]).await?;
    let mut c = s.redis.conn()?;
    let stamp = now_ms();
    let sr = &s;
    let refuse = |i: usize| {
        let q = format!("q{i}x{stamp}");
        async move {
            let (status, v) = sr.post(&json!({"prompt": "hi", "queue": q})).await?;
            assert_eq!(status, 422, "queue {q}: {v}");
            assert_eq!(v["error"]["field"], "queue", "{v}");
            let (status, v) = sr.get_json(&format!("/v1/queues/{q}")).await?;
            assert_eq!(status, 404, "stats of undeclared queue {q}: {v}");
            anyhow::Ok(())
        }
    };
    let mut keys_before = keys(&mut c, "*")?;
    keys_before.sort();
    // the first refusal and scrape create their own series (a 422, a 404, GET /metrics)
    refuse(0).await?;
    api_metric_lines(&s).await?;
    let lines_before = api_metric_lines(&s).await?;
    for i in 1..300 {
        refuse(i).await?;
    }
    let mut keys_after = keys(&mut c, "*")?;
    keys_after.sort();
    assert_eq!(keys_after, keys_before, "a refused task writes nothing");
    let queues: Vec<String> = redis::cmd("SMEMBERS").arg("agentq:queues").query(&mut c)?;
    assert!(
        queues.iter().all(|q| q == "default" || q == "alpha"),
        "only declared queues are known: {queues:?}"
    );
    assert_eq!(
        api_metric_lines(&s).await?,
        lines_before,
        "300 undeclared queues must not add api metric series"
    );
    let (status, v) = s
        .post(&json!({"prompt": "declared", "queue": "alpha"}))
        .await?;
    assert_eq!(status, 202, "{v}");
    assert_eq!(s.queue("alpha").await?["pending"], 1);

    let w = s.start_worker(&[("WORKER_CONCURRENCY", "64")]).await?;
    // first the configured model, a priced one and a few random ones, then 295 more random ones
    let mut ids = vec![
        s.submit("configured model").await?,
        s.submit_json(&json!({"prompt": "priced model", "model": "gpt-4o"}))
            .await?,
    ];
    let random = |i: usize| format!("model-{i}-{stamp}");
    for i in 0..5 {
        ids.push(
            s.submit_json(&json!({"prompt": format!("random model {i}"), "model": random(i)}))
                .await?,
        );
    }
    s.wait_final(&ids, Duration::from_secs(20)).await?;
    worker_metric_lines(&w).await?;
    let worker_before = worker_metric_lines(&w).await?;
    let mut more = Vec::new();
    for i in 5..300 {
        more.push(
            s.submit_json(&json!({"prompt": format!("random model {i}"), "model": random(i)}))
                .await?,
        );
    }
    let done = s.wait_final(&more, Duration::from_secs(60)).await?;
    assert!(done.iter().all(|t| t["status"] == "succeeded"));
    let m = w.metrics().await?;
    assert_eq!(
        worker_metric_lines(&w).await?,
        worker_before,
        "295 more model names must not add worker metric series"
    );
    assert!(
        !m.contains(&format!("-{stamp}\"")),
        "a client's model name became a label"
    );
    assert_eq!(metric(&m, &llm_series("other", "ok")), 300.0, "{m}");
    assert_eq!(metric(&m, &llm_series("mock-gpt", "ok")), 1.0, "{m}");
    assert_eq!(metric(&m, &llm_series("gpt-4o", "ok")), 1.0, "{m}");
    assert_no_panic(&s);
    Ok(())
}

// ---- 9. cancel and orphan returns keep `active` true ----

/// A running task is cancelled; then an id whose fetch reply was lost (running, in `active`, in
/// the worker's in-flight list, not held by the process) is returned by the orphan sweep. Before
/// the fix both ids stayed in `active`, so `inflight` and KEDA's second trigger counted work
/// nobody was doing. Now `active` is exact at once, and the cancelled run is aborted (its LLM
/// call dropped, see `cancel.rs`) and writes nothing: no report at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_orphan_returns_keep_the_active_set_exact() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = s
        .start_worker(&with(&JSON_LOGS, &[("WORKER_CONCURRENCY", "1")]))
        .await?;
    let mut c = s.redis.conn()?;
    let p = "cancelled mid-call [[sleep:1500]]";
    let id = s.submit(p).await?;
    calls_reach(&s.mock, p, 1).await?;
    let worker = rec(&mut c, &id)?
        .get("worker")
        .unwrap_or_default()
        .to_owned();
    let r = s
        .http
        .delete(format!("{}/v1/tasks/{id}", s.api_url))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let q = s.queue("default").await?;
    assert_eq!(q["inflight"], 0, "the in-flight gauge drops at once: {q}");
    assert_eq!(zrange(&mut c, ACTIVE)?, Vec::<String>::new());
    assert_eq!(
        lrange(&mut c, &inflight_key(&worker))?,
        Vec::<String>::new()
    );
    let cancelled = rec(&mut c, &id)?;
    assert_eq!(cancelled.status(), "cancelled", "{cancelled}");
    assert_eq!(cancelled.get("token"), None, "{cancelled}");
    check_invariants(&mut c)?;
    poll(
        "the worker aborted its cancelled run",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(w.proc.log_text().contains("run aborted: task cancelled")),
    )
    .await
    .with_context(|| w.proc.tail())?;
    // the aborted run reports nothing: the record stays as the cancel left it
    assert_eq!(verdicts(&w, &id), Vec::<String>::new());
    assert_eq!(
        rec(&mut c, &id)?,
        cancelled,
        "nothing written after the cancel"
    );
    assert_eq!(s.mock.calls(p), 1);

    // Keep the worker's only permit busy, then leave what a fetch with a lost reply leaves: a
    // running record of this worker, in `active` and in its in-flight list.
    let blocker = "keeps the permit [[sleep:4000]]";
    let b = s.submit(blocker).await?;
    calls_reach(&s.mock, blocker, 1).await?;
    let orphan = TaskId::generate("default")?.to_string();
    let now = now_ms();
    let payload = json!({"messages": [{"role": "user", "content": "orphaned by a lost reply"}]});
    redis::cmd("HSET")
        .arg(task_key(&orphan))
        .arg(&[
            ("queue", "default".to_owned()),
            ("status", "running".to_owned()),
            ("attempts", "1".to_owned()),
            ("runs", "1".to_owned()),
            ("token", "1".to_owned()),
            ("rate_limited", "0".to_owned()),
            ("max_attempts", "5".to_owned()),
            ("payload", payload.to_string()),
            ("created_at", now.to_string()),
            ("started_at", now.to_string()),
            ("worker", worker.clone()),
        ])
        .query::<()>(&mut c)?;
    redis::pipe()
        .atomic()
        .cmd("ZADD")
        .arg(ACTIVE)
        .arg(now)
        .arg(&orphan)
        .ignore()
        .cmd("LPUSH")
        .arg(inflight_key(&worker))
        .arg(&orphan)
        .ignore()
        .query::<()>(&mut c)?;
    // Watch it until it is done: whenever it waits in pending it must be out of `active`.
    let mut seen_pending = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (pos, score, status, token): (
            Option<i64>,
            Option<f64>,
            Option<String>,
            Option<String>,
        ) = redis::pipe()
            .atomic()
            .cmd("LPOS")
            .arg(DEFAULT_LINE)
            .arg(&orphan)
            .cmd("ZSCORE")
            .arg(ACTIVE)
            .arg(&orphan)
            .cmd("HGET")
            .arg(task_key(&orphan))
            .arg("status")
            .cmd("HGET")
            .arg(task_key(&orphan))
            .arg("token")
            .query(&mut c)?;
        if pos.is_some() {
            seen_pending = true;
            assert_eq!(
                score, None,
                "an orphan returned to pending is not in flight"
            );
            assert_eq!(status.as_deref(), Some("queued"));
            assert_eq!(token, None);
        }
        if status.as_deref() == Some("succeeded") {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "orphan never finished: {}\n{}",
                rec(&mut c, &orphan)?,
                w.proc.tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen_pending,
        "the orphan went back to pending while the permit was busy"
    );
    let r = rec(&mut c, &orphan)?;
    assert_fields(
        "returned orphan",
        &r,
        &[
            ("attempts", 1),
            ("runs", 2),
            ("recovered", 0),
            ("fenced", 0),
        ],
    );
    assert_eq!(s.mock.calls("orphaned by a lost reply"), 1);
    s.wait_final(&[b], Duration::from_secs(10)).await?;
    check_invariants(&mut c)?;
    assert_eq!(s.queue("default").await?["inflight"], 0);
    assert_no_panic(&s);
    Ok(())
}

// ---- 10. LLM response bodies are bounded ----

/// A stub LLM sends a 4 MiB chat completion, an endless 200 body, an endless 500 body (once
/// with no retry left, once followed by a success) and a 512 KiB completion, with
/// AGENTQ_MAX_RESPONSE_BYTES at 1 MiB. Before the fix every body was read whole: the big
/// completion succeeded, the endless ones were read until the LLM timeout (10 s) into hundreds of
/// MB. Now a body over the limit fails the run as permanent after one call with an error naming
/// the variable, an error body is read only up to a small bound (transient, truncated error),
/// answers under the limit succeed and the worker stays up and small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_response_bodies_are_bounded() -> Result<()> {
    let stub = Stub::spawn(|prompt, call| match prompt {
        "too big" => ok_reply(&"x".repeat(4 << 20)),
        "endless 200" => Reply::Endless {
            status: 200,
            fill: b'x',
        },
        "endless 500, no retry left" => Reply::Endless {
            status: 500,
            fill: b'E',
        },
        "endless 500, then fine" if call == 1 => Reply::Endless {
            status: 500,
            fill: b'E',
        },
        "under the limit" => ok_reply(&"u".repeat(512 << 10)),
        _ => ok_reply("fine"),
    })
    .await?;
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = s
        .start_worker(&[
            ("OPENAI_BASE_URL", stub.url.as_str()),
            ("AGENTQ_MAX_RESPONSE_BYTES", "1048576"),
            ("AGENTQ_LLM_TIMEOUT_SECS", "10"),
        ])
        .await?;
    let too_big = s.submit("too big").await?;
    let endless = s.submit("endless 200").await?;
    let dies = submit_max(&s, "endless 500, no retry left", 1).await?;
    let retried = submit_max(&s, "endless 500, then fine", 2).await?;
    let under = s.submit("under the limit").await?;
    let ids = [too_big, endless, dies, retried, under];
    let done = s
        .wait_final(&ids, Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    let mut c = s.redis.conn()?;
    let took = |c: &mut redis::Connection, id: &str| -> Result<i64> {
        let r = rec(c, id)?;
        let ms = |f: &str| r.get(f).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
        Ok(ms("finished_at") - ms("started_at"))
    };
    for (i, what) in [(0, "too big"), (1, "endless 200")] {
        let t = &done[i];
        assert_eq!(t["status"], "failed", "{what}: {t}");
        assert_eq!(t["attempts"], 1, "{what}: permanent, no retry: {t}");
        assert_eq!(stub.calls(what), 1, "{what}");
        let error = t["error"].as_str().unwrap_or_default();
        assert!(error.contains("AGENTQ_MAX_RESPONSE_BYTES"), "{what}: {t}");
        let ms = took(&mut c, &ids[i])?;
        assert!(
            ms < 3000,
            "{what}: the body is not read to the end ({ms} ms)"
        );
    }
    let t = &done[2];
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(stub.calls("endless 500, no retry left"), 1);
    let error = t["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("llm answered 500: EEEE") && error.len() < 4096,
        "a transient 500 with a truncated body: {} bytes: {}",
        error.len(),
        error.chars().take(200).collect::<String>()
    );
    let ms = took(&mut c, &ids[2])?;
    assert!(ms < 3000, "the error body is not read to the end ({ms} ms)");
    let t = &done[3];
    assert_eq!(t["status"], "succeeded", "the 500 is transient: {t}");
    assert_eq!(t["attempts"], 2, "{t}");
    assert_eq!(stub.calls("endless 500, then fine"), 2);
    let t = &done[4];
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(
        t["result"]["content"].as_str().map(str::len),
        Some(512 << 10)
    );
    assert_eq!(stub.calls("under the limit"), 1);
    let dead = s.dead("default").await?;
    assert_eq!(dead.len(), 3, "{dead:?}");
    // the worker stays up, takes work, and never held a whole endless body
    let next = s.submit("after the big bodies").await?;
    let done = s.wait_final(&[next], Duration::from_secs(10)).await?;
    assert_eq!(done[0]["status"], "succeeded");
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.proc.pid()))?;
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc status")?;
    assert!(
        peak_kib < 256 * 1024,
        "worker peak RSS {peak_kib} KiB: a body was read whole"
    );
    check_invariants(&mut c)?;
    assert_no_panic(&s);
    Ok(())
}

// ---- 11. every bury trims the dead set ----

/// With AGENTQ_RESULT_TTL_SECS=60, dead entries two minutes old are planted before each of three
/// burials: a task whose attempts were used up by a SIGKILLed worker (fetch buries it when it is
/// recovered), an id with no record, and a payload that does not parse. Before the fix only
/// fail.lua trimmed the dead set, so these paths let it grow forever. Now each burial trims what
/// is older than the TTL and keeps what is younger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bury_path_trims_old_dead_letters() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    let ttl = [("AGENTQ_RESULT_TTL_SECS", "60")];
    s.start_api(&ttl).await?;
    let mut c = s.redis.conn()?;
    let plant = |c: &mut redis::Connection, age_ms: i64| -> Result<String> {
        let id = TaskId::generate("default")?.to_string();
        redis::cmd("ZADD")
            .arg(DEAD)
            .arg(now_ms() - age_ms)
            .arg(&id)
            .query::<()>(c)?;
        Ok(id)
    };
    let in_dead = |c: &mut redis::Connection, id: &str| -> Result<bool> {
        Ok(redis::cmd("ZSCORE")
            .arg(DEAD)
            .arg(id)
            .query::<Option<f64>>(c)?
            .is_some())
    };
    let young = plant(&mut c, 30_000)?;

    // 1. exhausted: the only attempt was spent by a worker that died mid-call
    let mut victim = s.start_worker(&ttl).await?;
    let p = "one attempt, spent by a dead worker [[sleep:3000]]";
    let exhausted = submit_max(&s, p, 1).await?;
    calls_reach(&s.mock, p, 1).await?;
    victim.proc.sigkill();
    let old = plant(&mut c, 120_000)?;
    let _w = s.start_worker(&ttl).await?;
    let done = s
        .wait_final(std::slice::from_ref(&exhausted), Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    assert_eq!(done[0]["status"], "failed", "{}", done[0]);
    assert!(
        done[0]["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("attempts exhausted"),
        "{}",
        done[0]
    );
    assert_eq!(s.mock.calls(p), 1, "never run again");
    assert!(in_dead(&mut c, &exhausted)?);
    assert!(
        !in_dead(&mut c, &old)?,
        "the exhaustion bury trims old dead letters"
    );

    // 2. poison: an id with no record
    let old = plant(&mut c, 120_000)?;
    let ghost = TaskId::generate("default")?.to_string();
    redis::cmd("LPUSH")
        .arg(PENDING)
        .arg(&ghost)
        .query::<()>(&mut c)?;
    poll(
        "the id with no record is buried",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || in_dead(&mut c, &ghost),
    )
    .await?;
    assert!(
        !in_dead(&mut c, &old)?,
        "the poison bury (no record) trims old dead letters"
    );

    // 3. poison: a payload that does not parse
    let old = plant(&mut c, 120_000)?;
    let bad = TaskId::generate("default")?.to_string();
    redis::cmd("HSET")
        .arg(task_key(&bad))
        .arg(&[
            ("queue", "default"),
            ("status", "queued"),
            ("attempts", "0"),
            ("max_attempts", "5"),
            ("payload", "this is not JSON {"),
            ("created_at", "0"),
        ])
        .query::<()>(&mut c)?;
    redis::cmd("LPUSH")
        .arg(PENDING)
        .arg(&bad)
        .query::<()>(&mut c)?;
    poll(
        "the unparsable payload is buried",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || in_dead(&mut c, &bad),
    )
    .await?;
    assert!(
        !in_dead(&mut c, &old)?,
        "the poison bury (payload) trims old dead letters"
    );
    assert!(
        in_dead(&mut c, &young)?,
        "entries younger than the TTL are kept"
    );
    assert_eq!(s.mock.total_calls(), 1, "no poison reached the LLM");
    let r = rec(&mut c, &bad)?;
    assert_eq!(r.status(), "failed", "{r}");
    assert_no_panic(&s);
    Ok(())
}
