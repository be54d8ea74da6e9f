//! Server-Sent Events: `GET /v1/tasks/{id}/events` and `GET /v1/workflows/{id}/events`
//! (docs/architecture.md, "Streaming").
//!
//! The events are the task's (or workflow's) Redis Stream, written by the queue's scripts and the
//! worker (`common/src/queue/events.lua`); the SSE `id` is the stream entry id, so `Last-Event-ID`
//! resumes exactly after the last event a client got, with no gap and no duplicate.
//!
//! A connection first replays the stream with `XRANGE` pages on the shared connection, then joins
//! the [`Hub`]: one task per api process that reads every live stream with one `XREAD BLOCK` on a
//! connection of its own, for all clients at once (not a blocked connection per client), and
//! hands each client its entries through a bounded queue. A client whose queue is full (it reads
//! slower than its task writes) is closed cleanly rather than buffered without bound: it
//! reconnects with `Last-Event-ID` and replays what it missed.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentq_common::keys::TaskId;
use agentq_common::task::Status;
use agentq_common::Redis;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::routes::deadline;
use crate::AppState;

/// Entries per `XRANGE` page of a replay and per stream per `XREAD`.
const PAGE: usize = 256;
/// How long the hub's `XREAD` blocks when nothing comes (a new client wakes it at once).
const BLOCK: Duration = Duration::from_secs(2);
/// The shortest time between two `XREAD`s while entries keep coming: each names every live
/// stream, so with thousands of streams reading on every new entry would cost Redis far more
/// than the entries; a few ms more latency on text already batched by 50 ms is nothing.
const READ_GAP: Duration = Duration::from_millis(10);
/// Cluster mode: how long the hub waits between reads when nothing came (see `read_cluster`).
const CLUSTER_POLL: Duration = Duration::from_millis(50);
/// Comment lines that keep idle connections (and the proxies on their way) open.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// A stream entry id, `<ms>-<seq>`: ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct EntryId(u64, u64);

impl EntryId {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One event as a client gets it (an SSE event, or a comment line); the SSE routes send it as
/// it is, the chat-completions front door reads it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Ev {
    pub id: Option<String>,
    pub name: Option<String>,
    pub data: String,
    /// A comment line instead of an event (`CLOSED`: the server ended the stream early).
    pub comment: Option<&'static str>,
}

impl Ev {
    fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    fn event(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    fn data(mut self, data: impl Into<String>) -> Self {
        self.data = data.into();
        self
    }

    fn comment(mut self, c: &'static str) -> Self {
        self.comment = Some(c);
        self
    }

    /// The event's name (`delta`, `status`, `done`, `error`...); `None` for a comment.
    pub(crate) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

impl From<Ev> for Event {
    fn from(e: Ev) -> Self {
        if let Some(c) = e.comment {
            return Event::default().comment(c);
        }
        // the wire order stays `id:`, `event:`, `data:` (axum writes fields as they are set):
        // a parser reading line by line sees the name before the data
        let mut out = Event::default();
        if let Some(id) = e.id {
            out = out.id(id);
        }
        if let Some(n) = e.name {
            out = out.event(n);
        }
        out.data(e.data)
    }
}

/// One event as stored: entry id, name (`e`) and JSON data (`d`).
#[derive(Debug)]
pub(crate) struct Entry {
    id: EntryId,
    kind: String,
    data: String,
}

impl Entry {
    fn terminal(&self) -> bool {
        matches!(self.kind.as_str(), "final" | "done" | "error")
    }

    /// A task's `final` entry that says `succeeded`: its `done` event carries the record's result.
    fn wants_result(&self) -> bool {
        self.kind == "final"
            && serde_json::from_str::<serde_json::Value>(&self.data)
                .is_ok_and(|d| d["status"] == "succeeded")
    }

    /// The SSE events of this entry, from its sub-event `from` on. Two kinds of entry stand for
    /// several events (one entry costs Redis less than several on every task's path):
    /// `started` is `status` (running) and `attempt_started`; `final` is the last `delta`, the
    /// `usage`, the `status` and `done` (with `result`, the record's) or `error`. The last event
    /// of an entry has the entry id as its SSE id, the ones before it `<entry id>.<k>`, so
    /// `Last-Event-ID` resumes even between the events of one entry.
    fn events(&self, from: usize, result: Option<&str>) -> Vec<Ev> {
        let parts = self.parts(result);
        let n = parts.len();
        parts
            .into_iter()
            .enumerate()
            .skip(from)
            .map(|(k, (name, data))| {
                let id = if k + 1 == n {
                    self.id.to_string()
                } else {
                    format!("{}.{k}", self.id)
                };
                Ev::default().id(id).event(name).data(data)
            })
            .collect()
    }

    fn parts(&self, result: Option<&str>) -> Vec<(String, String)> {
        let parsed = || serde_json::from_str::<serde_json::Value>(&self.data).ok();
        match self.kind.as_str() {
            "started" => {
                let Some(d) = parsed() else {
                    return vec![(self.kind.clone(), self.data.clone())];
                };
                vec![
                    (
                        "status".to_owned(),
                        serde_json::json!({"status": "running", "attempt": d["attempt"]})
                            .to_string(),
                    ),
                    ("attempt_started".to_owned(), self.data.clone()),
                ]
            }
            "final" => {
                let Some(d) = parsed() else {
                    return vec![(self.kind.clone(), self.data.clone())];
                };
                let status = d["status"].clone();
                let mut out = Vec::with_capacity(4);
                if d["delta"].is_object() {
                    out.push(("delta".to_owned(), d["delta"].to_string()));
                }
                if d["usage"].is_object() {
                    out.push(("usage".to_owned(), d["usage"].to_string()));
                }
                out.push((
                    "status".to_owned(),
                    serde_json::json!({ "status": status }).to_string(),
                ));
                if status == "succeeded" {
                    let result = result
                        .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
                        .unwrap_or(serde_json::Value::Null);
                    out.push((
                        "done".to_owned(),
                        serde_json::json!({ "status": status, "result": result }).to_string(),
                    ));
                } else {
                    let error = serde_json::json!({ "status": status, "error": d["error"] });
                    out.push(("error".to_owned(), with_error_code(&error.to_string())));
                }
                out
            }
            "error" => vec![(self.kind.clone(), with_error_code(&self.data))],
            _ => vec![(self.kind.clone(), self.data.clone())],
        }
    }
}

/// Where a client is: after a whole entry (`sub` None), or after sub-event `sub` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    id: EntryId,
    sub: Option<usize>,
}

impl Cursor {
    /// A `Last-Event-ID`: `<ms>-<seq>` or `<ms>-<seq>.<k>`, digits only (1–19, 1–19, 1–9 of
    /// them: what the OpenAPI document says, and what fits the integers they are read into).
    fn parse(s: &str) -> Option<Self> {
        let digits = |p: &str, max: usize| {
            !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
        };
        let (id, k) = match s.split_once('.') {
            Some((id, k)) => (id, Some(k)),
            None => (s, None),
        };
        let (ms, seq) = id.split_once('-')?;
        if !digits(ms, 19) || !digits(seq, 19) || !k.is_none_or(|k| digits(k, 9)) {
            return None;
        }
        match k {
            Some(k) => Some(Self {
                id: EntryId::parse(id)?,
                sub: Some(k.parse().ok()?),
            }),
            None => Some(Self {
                id: EntryId::parse(s)?,
                sub: None,
            }),
        }
    }
}

/// An `error` event names its `error_code` as `GET /v1/tasks/{id}` does (from the error's
/// prefix); the scripts store only the text.
fn with_error_code(data: &str) -> String {
    let Ok(serde_json::Value::Object(mut o)) = serde_json::from_str::<serde_json::Value>(data)
    else {
        return data.to_owned();
    };
    let code = o
        .get("error")
        .and_then(serde_json::Value::as_str)
        .and_then(agentq_common::task::error_code)
        .or_else(|| {
            (o.get("status").and_then(serde_json::Value::as_str) == Some("cancelled"))
                .then(|| "cancelled".to_owned())
        });
    if let Some(code) = code {
        o.insert("error_code".to_owned(), serde_json::Value::String(code));
    }
    serde_json::Value::Object(o).to_string()
}

/// Reads an `XRANGE` reply (or one stream's part of an `XREAD` reply): `[[id, [field, value,
/// ...]], ...]`. Entries that do not have that shape are skipped.
fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = EntryId::parse(&text(pair.first()?)?)?;
            let Value::Array(fields) = pair.get(1)? else {
                return None;
            };
            let (mut kind, mut data) = (None, None);
            for kv in fields.chunks(2) {
                match (kv.first().and_then(text).as_deref(), kv.get(1)) {
                    (Some("e"), Some(v)) => kind = text(v),
                    (Some("d"), Some(v)) => data = text(v),
                    _ => {}
                }
            }
            Some(Entry {
                id,
                kind: kind?,
                data: data?,
            })
        })
        .collect()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Reads an `XREAD` reply: `[[key, entries], ...]` (RESP2) or a map (RESP3); nil on timeout.
fn streams(v: Value) -> Vec<(String, Vec<Entry>)> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|i| match i {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let e = kv.pop()?;
                    let k = kv.pop()?;
                    Some((k, e))
                }
                _ => None,
            })
            .collect(),
        Value::Map(kv) => kv,
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, e)| Some((text(&k)?, entries(&e))))
        .collect()
}

/// A client's place in the hub: its stream, the last entry it got and its queue.
struct Join {
    key: String,
    cursor: EntryId,
    tx: mpsc::Sender<Arc<Entry>>,
}

struct Sub {
    cursor: EntryId,
    tx: mpsc::Sender<Arc<Entry>>,
}

/// The api's one reader of live streams (see the module doc).
#[derive(Clone)]
pub struct Hub {
    joins: mpsc::Sender<Join>,
    shared: Arc<HubShared>,
}

struct HubShared {
    /// The hub connection's `CLIENT ID` (0 before it is known): `CLIENT UNBLOCK` wakes its
    /// `XREAD` when a client joins, so a new stream does not wait for the block to time out.
    client_id: AtomicI64,
    /// The hub is inside `XREAD` now (one wake per block is enough).
    blocked: AtomicBool,
    /// Cluster mode: wakes the hub's pause between reads when a client joins.
    joined: tokio::sync::Notify,
    /// Streams being served (the `AGENTQ_MAX_STREAMS` count).
    open: AtomicUsize,
    max: usize,
    buffer: usize,
    stop: CancellationToken,
}

impl Hub {
    /// Starts the hub's task; it ends when `stop` is cancelled, and so does every stream.
    pub fn start(
        target: &agentq_common::redis_conn::RedisTarget,
        max: usize,
        buffer: usize,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        // a connection of its own: its replies may take the whole block
        let redis = Redis::connect(
            target,
            Some(BLOCK + agentq_common::redis_conn::RESPONSE_TIMEOUT),
        )?;
        let (joins, rx) = mpsc::channel(1024);
        let shared = Arc::new(HubShared {
            client_id: AtomicI64::new(0),
            blocked: AtomicBool::new(false),
            joined: tokio::sync::Notify::new(),
            open: AtomicUsize::new(0),
            max,
            buffer,
            stop,
        });
        tokio::spawn(hub_loop(redis, rx, shared.clone()));
        Ok(Self { joins, shared })
    }
}

async fn hub_loop(redis: Redis, mut joins: mpsc::Receiver<Join>, shared: Arc<HubShared>) {
    let mut subs: HashMap<String, Vec<Sub>> = HashMap::new();
    let mut known_id = false;
    loop {
        while let Ok(j) = joins.try_recv() {
            add(&mut subs, j);
        }
        subs.retain(|_, v| {
            v.retain(|s| !s.tx.is_closed());
            !v.is_empty()
        });
        if subs.is_empty() {
            tokio::select! {
                j = joins.recv() => match j {
                    Some(j) => add(&mut subs, j),
                    None => return,
                },
                _ = shared.stop.cancelled() => return,
            }
            continue;
        }
        let mut conn = match redis.conn().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "event hub: redis unavailable");
                if pause(&shared.stop).await {
                    return;
                }
                continue;
            }
        };
        if redis.is_cluster() {
            match read_cluster(&mut conn, &subs).await {
                Ok(got) => {
                    let busy = !got.is_empty();
                    deliver(&mut subs, got);
                    let wait = if busy { READ_GAP } else { CLUSTER_POLL };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shared.joined.notified() => {}
                        _ = shared.stop.cancelled() => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event hub: XREAD failed");
                    if pause(&shared.stop).await {
                        return;
                    }
                }
            }
            continue;
        }
        if !known_id {
            match redis::cmd("CLIENT")
                .arg("ID")
                .query_async::<i64>(&mut conn)
                .await
            {
                Ok(id) => {
                    shared.client_id.store(id, Ordering::Relaxed);
                    known_id = true;
                }
                Err(e) => tracing::debug!(error = %e, "event hub: no client id"),
            }
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(PAGE)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS");
        let keys: Vec<&String> = subs.keys().collect();
        for k in &keys {
            cmd.arg(k.as_str());
        }
        for k in &keys {
            let min = subs[*k].iter().map(|s| s.cursor).min().unwrap_or_default();
            cmd.arg(min.to_string());
        }
        shared.blocked.store(true, Ordering::Release);
        let started = tokio::time::Instant::now();
        let reply = tokio::select! {
            r = cmd.query_async::<Value>(&mut conn) => r,
            _ = shared.stop.cancelled() => return,
        };
        shared.blocked.store(false, Ordering::Release);
        match reply {
            Ok(v) => {
                let got = streams(v);
                let busy = !got.is_empty();
                deliver(&mut subs, got);
                if busy {
                    tokio::select! {
                        _ = tokio::time::sleep_until(started + READ_GAP) => {}
                        _ = shared.stop.cancelled() => return,
                    }
                }
            }
            // CLIENT UNBLOCK makes the XREAD return nil, never an error; an error is Redis
            // trouble, after which the connection may be a new one with a new id
            Err(e) => {
                tracing::warn!(error = %e, "event hub: XREAD failed");
                known_id = false;
                if pause(&shared.stop).await {
                    return;
                }
            }
        }
    }
}

/// Cluster mode's read: an `XREAD` names keys of one slot only, and a blocking one holds its
/// node's connection (every other read to that node would wait behind it), so the hub reads each
/// slot's streams with a non-blocking `XREAD`, all slots at once, and pauses [`CLUSTER_POLL`] when
/// nothing came (a client joining wakes it). A stream's key carries its queue's hash tag, so a
/// group is a queue: a read per queue with live clients, 20 a second at most.
async fn read_cluster(
    conn: &mut agentq_common::redis_conn::Conn,
    subs: &HashMap<String, Vec<Sub>>,
) -> redis::RedisResult<Vec<(String, Vec<Entry>)>> {
    let mut groups: HashMap<&str, Vec<&String>> = HashMap::new();
    for k in subs.keys() {
        groups.entry(hash_tag(k)).or_default().push(k);
    }
    let reads = groups.into_values().map(|keys| {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(PAGE).arg("STREAMS");
        for k in &keys {
            cmd.arg(k.as_str());
        }
        for k in &keys {
            let min = subs[*k].iter().map(|s| s.cursor).min().unwrap_or_default();
            cmd.arg(min.to_string());
        }
        let mut conn = conn.clone();
        async move { cmd.query_async::<Value>(&mut conn).await }
    });
    let mut got = Vec::new();
    for v in futures::future::try_join_all(reads).await? {
        got.extend(streams(v));
    }
    Ok(got)
}

/// A key's hash tag (what Redis Cluster hashes): the text inside its first `{...}` when that is
/// not empty, else the whole key.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// Waits a moment after Redis trouble; true when the hub is stopping.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(500)) => false,
        _ = stop.cancelled() => true,
    }
}

fn add(subs: &mut HashMap<String, Vec<Sub>>, j: Join) {
    subs.entry(j.key).or_default().push(Sub {
        cursor: j.cursor,
        tx: j.tx,
    });
}

fn deliver(subs: &mut HashMap<String, Vec<Sub>>, got: Vec<(String, Vec<Entry>)>) {
    for (key, list) in got {
        let Some(v) = subs.get_mut(&key) else {
            continue;
        };
        for e in list {
            let e = Arc::new(e);
            v.retain_mut(|s| {
                if e.id <= s.cursor {
                    return true;
                }
                match s.tx.try_send(e.clone()) {
                    Ok(()) => {
                        s.cursor = e.id;
                        // the stream ends with its terminal event: the client is done
                        !e.terminal()
                    }
                    // full: a client slower than its task; dropping its sender ends its
                    // response cleanly, and it resumes with Last-Event-ID
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::debug!(stream = %key, "event stream client too slow; closing it");
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
        if v.is_empty() {
            subs.remove(&key);
        }
    }
}

/// What a stream is of.
enum Of {
    Task(TaskId),
    Workflow(TaskId),
}

enum Phase {
    Replay,
    Live(mpsc::Receiver<Arc<Entry>>),
    Done,
}

/// One client's stream: its replay, then its place in the hub.
pub(crate) struct Feed {
    state: AppState,
    of: Of,
    key: String,
    /// The last event sent (or the client's `Last-Event-ID`); `None` = from the start.
    cursor: Option<Cursor>,
    out: VecDeque<Ev>,
    phase: Phase,
    /// Entries sent on this connection.
    sent: usize,
    /// Dropped by the hub as too slow, read on from the cursor instead of ending (a reader
    /// inside the api, which has no `Last-Event-ID` to reconnect with).
    rejoin: bool,
    /// This connection turned the task's stream on (`follow.lua`): done once, before its replay.
    followed: bool,
    _slot: Slot,
}

/// Holds one of the `AGENTQ_MAX_STREAMS` places while a stream is open.
pub(crate) struct Slot {
    shared: Arc<HubShared>,
    gauge: prometheus::IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

const CLOSED: &str = "closed by the server; reconnect with Last-Event-ID to resume";

impl Feed {
    pub(crate) async fn next(&mut self) -> Option<Ev> {
        loop {
            if let Some(e) = self.out.pop_front() {
                return Some(e);
            }
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Live(rx) => {
                    let got = tokio::select! {
                        e = rx.recv() => e,
                        _ = self.state.hub.shared.stop.cancelled() => None,
                    };
                    match got {
                        Some(e) => {
                            if e.terminal() {
                                self.phase = Phase::Done;
                            }
                            self.cursor = Some(Cursor {
                                id: e.id,
                                sub: None,
                            });
                            let result = if e.wants_result() {
                                self.result().await
                            } else {
                                None
                            };
                            self.out.extend(e.events(0, result.as_deref()));
                        }
                        // dropped as slow: a reader inside the api reads on from its cursor
                        // (replay, then a new place) where an SSE client would reconnect
                        None if self.rejoin && !self.state.hub.shared.stop.is_cancelled() => {
                            self.phase = Phase::Replay;
                        }
                        None => {
                            self.phase = Phase::Done;
                            return Some(Ev::default().comment(CLOSED));
                        }
                    }
                }
                Phase::Replay => {
                    if let Err(e) = self.replay().await {
                        tracing::warn!(error = %e, "event stream replay failed");
                        self.phase = Phase::Done;
                        return Some(Ev::default().comment(CLOSED));
                    }
                }
            }
        }
    }

    /// The task's result, for its `done` event (`None` once the record is gone).
    async fn result(&self) -> Option<String> {
        let Of::Task(id) = &self.of else {
            return None;
        };
        let key = self.state.broker.keys(id.queue()).task(id);
        let mut conn = self.state.broker.redis().conn().await.ok()?;
        redis::cmd("HGET")
            .arg(key)
            .arg("result")
            .query_async::<Option<String>>(&mut conn)
            .await
            .ok()
            .flatten()
    }

    /// Entries after the cursor, one page; true when the page was full (more may follow).
    async fn page(&mut self) -> redis::RedisResult<(bool, bool)> {
        // a cursor inside an entry reads that entry again, from the event after it
        let start = match self.cursor {
            Some(Cursor { id, sub: Some(_) }) => id.to_string(),
            Some(Cursor { id, sub: None }) => format!("({id}"),
            None => "-".to_owned(),
        };
        let mut conn = self.state.broker.redis().conn().await?;
        let v: Value = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut conn)
            .await?;
        let list = entries(&v);
        let full = list.len() >= PAGE;
        let mut terminal = false;
        for e in list {
            let from = match self.cursor {
                Some(Cursor { id, sub: Some(k) }) if id == e.id => k + 1,
                _ => 0,
            };
            self.cursor = Some(Cursor {
                id: e.id,
                sub: None,
            });
            self.sent += 1;
            let result = if e.wants_result() {
                self.result().await
            } else {
                None
            };
            self.out.extend(e.events(from, result.as_deref()));
            if e.terminal() {
                terminal = true;
                break;
            }
        }
        Ok((full && !terminal, terminal))
    }

    async fn replay(&mut self) -> redis::RedisResult<()> {
        if !self.followed {
            // A task's stream is written only once someone follows it (events.lua, "Streams on
            // demand"): this turns it on, with the entries of what happened before, so the
            // replay below reads the task's whole story. A record that is gone reads as today.
            if let Of::Task(id) = &self.of {
                let keys = self.state.broker.keys(id.queue());
                self.state.broker.follow(&keys, id).await?;
            }
            self.followed = true;
        }
        let (more, terminal) = self.page().await?;
        if terminal {
            self.phase = Phase::Done;
            return Ok(());
        }
        if more {
            return Ok(());
        }
        // Caught up. A final task (or workflow) gets what was written since, and its stream
        // ends; a live one joins the hub from here (entries written meanwhile come from there).
        let snapshot = self.snapshot().await?;
        let Some((status, fields)) = snapshot else {
            // the record expired while the client read: nothing more will come
            self.phase = Phase::Done;
            return Ok(());
        };
        if is_final(&status) {
            let (_, terminal) = self.page().await?;
            if !terminal && !self.ended_before().await? {
                // the stream expired or was never written (a task from before streams existed):
                // the record says how it ended
                self.out.push_back(
                    Ev::default()
                        .event("status")
                        .data(serde_json::json!({ "status": status }).to_string()),
                );
                self.out.push_back(self.terminal_from(&status, &fields));
            }
            self.phase = Phase::Done;
            return Ok(());
        }
        if self.cursor.is_none() && self.sent == 0 {
            // nothing happened yet (a task waiting in its queue): its status, with no id, so a
            // resume still starts from the beginning
            self.out.push_back(
                Ev::default()
                    .event("status")
                    .data(serde_json::json!({ "status": status }).to_string()),
            );
        }
        let (tx, rx) = mpsc::channel(self.state.hub.shared.buffer);
        let join = Join {
            key: self.key.clone(),
            cursor: self.cursor.map(|c| c.id).unwrap_or_default(),
            tx,
        };
        if self.state.hub.joins.send(join).await.is_err() {
            self.phase = Phase::Done;
            self.out.push_back(Ev::default().comment(CLOSED));
            return Ok(());
        }
        self.wake_hub().await;
        self.phase = Phase::Live(rx);
        Ok(())
    }

    /// `CLIENT UNBLOCK` the hub's `XREAD`, so it reads the new stream now.
    async fn wake_hub(&self) {
        let shared = &self.state.hub.shared;
        // cluster mode's hub never blocks in Redis; it pauses between reads (read_cluster)
        shared.joined.notify_one();
        let id = shared.client_id.load(Ordering::Relaxed);
        if id == 0 || !shared.blocked.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Ok(mut conn) = self.state.broker.redis().conn().await {
            let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(id)
                .query_async(&mut conn)
                .await;
        }
    }

    /// True when the stream's last entry is terminal (a client resuming after the end).
    async fn ended_before(&self) -> redis::RedisResult<bool> {
        let mut conn = self.state.broker.redis().conn().await?;
        let v: Value = redis::cmd("XREVRANGE")
            .arg(&self.key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        Ok(entries(&v).first().is_some_and(Entry::terminal))
    }

    /// The record's status and the fields a terminal event is made of; `None` when it is gone.
    async fn snapshot(&self) -> redis::RedisResult<Option<(String, Vec<Option<String>>)>> {
        let (key, fields): (String, &[&str]) = match &self.of {
            Of::Task(id) => (
                self.state.broker.keys(id.queue()).task(id),
                &["status", "result", "error"],
            ),
            Of::Workflow(id) => (
                self.state.broker.keys(id.queue()).workflow(&id.to_string()),
                &["status", "error"],
            ),
        };
        let mut conn = self.state.broker.redis().conn().await?;
        let mut v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(key)
            .arg(fields)
            .query_async(&mut conn)
            .await?;
        if v.is_empty() {
            return Ok(None);
        }
        let status = v.remove(0);
        Ok(status.map(|s| (s, v)))
    }

    fn terminal_from(&self, status: &str, fields: &[Option<String>]) -> Ev {
        match (&self.of, status) {
            (Of::Task(_), "succeeded") => {
                let result = fields
                    .first()
                    .cloned()
                    .flatten()
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
                    .unwrap_or(serde_json::Value::Null);
                Ev::default()
                    .event("done")
                    .data(serde_json::json!({ "status": status, "result": result }).to_string())
            }
            (Of::Workflow(_), "succeeded") => Ev::default()
                .event("done")
                .data(serde_json::json!({ "status": status }).to_string()),
            (of, _) => {
                let error = match of {
                    Of::Task(_) => fields.get(1),
                    Of::Workflow(_) => fields.first(),
                }
                .cloned()
                .flatten()
                .unwrap_or_else(|| status.to_owned());
                Ev::default().event("error").data(with_error_code(
                    &serde_json::json!({ "status": status, "error": error }).to_string(),
                ))
            }
        }
    }
}

fn is_final(status: &str) -> bool {
    Status::parse(status).is_some_and(Status::is_final)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    last_event_id: Option<String>,
}

/// `Last-Event-ID` (the header an EventSource sends when it reconnects) or `?last_event_id=`.
fn cursor(
    headers: &HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Option<Cursor>, ApiError> {
    let from_query = match query {
        Ok(Query(q)) => q.last_event_id,
        Err(_) => {
            return Err(ApiError::invalid(
                "last_event_id",
                "the only query parameter is last_event_id",
            ))
        }
    };
    let bad = |field: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "Last-Event-ID must be an event id this stream sent (<ms>-<seq> or <ms>-<seq>.<k>)",
        )
        .field(field)
    };
    // Each one given is checked, even when the header wins: present but empty, or anything
    // else that is not an id, is refused (the document's pattern).
    let query = match from_query {
        Some(q) => Some(Cursor::parse(&q).ok_or_else(|| bad("last_event_id"))?),
        None => None,
    };
    let header = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| Cursor::parse(s.trim()))
                .ok_or_else(|| bad("Last-Event-ID"))?,
        ),
        None => None,
    };
    Ok(header.or(query))
}

/// `GET /v1/tasks/{id}/events`
pub async fn task_events(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    Path(raw): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = crate::routes::parse_id(&raw)?;
    let cursor = cursor(&headers, query)?;
    let keys = state.broker.keys(id.queue());
    owned(&state, &caller, &keys.task(&id), "task").await?;
    let key = keys.task_events(&id);
    serve(state, Of::Task(id), key, cursor)
}

/// `GET /v1/workflows/{id}/events`
pub async fn workflow_events(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
    Path(raw): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = TaskId::parse(&raw).map_err(|_| ApiError::not_found("workflow"))?;
    let cursor = cursor(&headers, query)?;
    let keys = state.broker.keys(id.queue());
    owned(&state, &caller, &keys.workflow(&id.to_string()), "workflow").await?;
    let key = keys.workflow_events(&id.to_string());
    serve(state, Of::Workflow(id), key, cursor)
}

/// 404 unless the record at `key` (a task or workflow hash) exists and the caller sees it (its
/// `tenant` field; another tenant's record answers like a missing one).
pub(crate) async fn owned(
    state: &AppState,
    caller: &crate::auth::Caller,
    key: &str,
    what: &str,
) -> Result<(), ApiError> {
    let (exists, tenant): (bool, Option<String>) = deadline(async {
        let mut conn = state.broker.redis().conn().await?;
        redis::pipe()
            .exists(key)
            .hget(key, "tenant")
            .query_async(&mut conn)
            .await
    })
    .await?;
    if exists && caller.sees(tenant.as_deref()) {
        Ok(())
    } else {
        Err(ApiError::not_found(what))
    }
}

/// One of the `AGENTQ_MAX_STREAMS` places, or `None` when all are taken (counted in
/// `agentq_sse_refused_total`).
pub(crate) fn take_slot(state: &AppState) -> Option<Slot> {
    let shared = state.hub.shared.clone();
    // the place is taken before the check, so two racing requests cannot both get the last one
    if shared.open.fetch_add(1, Ordering::Relaxed) >= shared.max {
        shared.open.fetch_sub(1, Ordering::Relaxed);
        state.metrics.sse_refused.inc();
        return None;
    }
    state.metrics.sse_streams.inc();
    Some(Slot {
        shared,
        gauge: state.metrics.sse_streams.clone(),
    })
}

pub(crate) fn too_many_streams(state: &AppState) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_streams",
        format!(
            "this api process serves at most {} event streams (AGENTQ_MAX_STREAMS); retry later or on another replica",
            state.hub.shared.max
        ),
    )
}

/// A task's events from the start, for a reader inside the api (the chat-completions front
/// door): the same replay and hub place as `GET /v1/tasks/{id}/events`, holding `slot`.
pub(crate) fn task_feed(state: AppState, id: TaskId, slot: Slot) -> Feed {
    let key = state.broker.keys(id.queue()).task_events(&id);
    Feed {
        state,
        of: Of::Task(id),
        key,
        cursor: None,
        out: VecDeque::new(),
        phase: Phase::Replay,
        sent: 0,
        rejoin: true,
        followed: false,
        _slot: slot,
    }
}

fn serve(
    state: AppState,
    of: Of,
    key: String,
    cursor: Option<Cursor>,
) -> Result<Response, ApiError> {
    let Some(slot) = take_slot(&state) else {
        let mut r = too_many_streams(&state).into_response();
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return Ok(r);
    };
    let feed = Feed {
        state,
        of,
        key,
        cursor,
        out: VecDeque::new(),
        phase: Phase::Replay,
        sent: 0,
        rejoin: false,
        followed: false,
        _slot: slot,
    };
    let stream = futures::stream::unfold(feed, |mut f| async move {
        f.next()
            .await
            .map(|e| (Ok::<_, Infallible>(Event::from(e)), f))
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
        .into_response();
    // proxies (nginx) must pass events on as they come
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_like_redis() {
        let a = EntryId::parse("1700000000000-5").expect("id");
        let b = EntryId::parse("1700000000000-12").expect("id");
        let c = EntryId::parse("1700000000001-0").expect("id");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        for bad in ["", "1", "a-b", "1-", "-1", "1-2-3"] {
            assert!(EntryId::parse(bad).is_none(), "{bad}");
        }
    }

    fn entry(seq: u64, kind: &str) -> Entry {
        Entry {
            id: EntryId(1, seq),
            kind: kind.to_owned(),
            data: "{}".to_owned(),
        }
    }

    /// A client whose queue is full is dropped (its response ends, it resumes with
    /// Last-Event-ID); the others get every entry past their own cursor; a terminal entry ends
    /// a client's place.
    #[test]
    fn slow_clients_are_dropped_and_each_client_reads_from_its_cursor() {
        let (fast_tx, mut fast) = mpsc::channel(16);
        let (slow_tx, mut slow) = mpsc::channel(1);
        let (late_tx, mut late) = mpsc::channel(16);
        let mut subs = HashMap::new();
        for (cursor, tx) in [(0, fast_tx), (0, slow_tx), (2, late_tx)] {
            add(
                &mut subs,
                Join {
                    key: "k".to_owned(),
                    cursor: EntryId(1, cursor),
                    tx,
                },
            );
        }
        deliver(
            &mut subs,
            vec![(
                "k".to_owned(),
                vec![entry(1, "delta"), entry(2, "delta"), entry(3, "delta")],
            )],
        );
        assert_eq!(subs["k"].len(), 2, "the slow client lost its place");
        let got = |rx: &mut mpsc::Receiver<Arc<Entry>>| {
            let mut v = Vec::new();
            while let Ok(e) = rx.try_recv() {
                v.push(e.id.1);
            }
            v
        };
        assert_eq!(got(&mut fast), [1, 2, 3]);
        assert_eq!(got(&mut late), [3]);
        assert_eq!(got(&mut slow), [1]);
        assert!(
            slow.try_recv().is_err() && slow.is_closed(),
            "its queue is closed"
        );
        deliver(&mut subs, vec![("k".to_owned(), vec![entry(4, "done")])]);
        assert!(subs.is_empty(), "the terminal event ends every place");
        assert_eq!(got(&mut fast), [4]);
    }

    /// What a client reads of an entry: name, id and data of each event.
    fn read(e: &Entry, from: usize, result: Option<&str>) -> Vec<String> {
        e.events(from, result)
            .into_iter()
            // an axum Event's Debug holds its wire form, id included
            .map(|ev| format!("{ev:?}"))
            .collect()
    }

    #[test]
    fn one_entry_stands_for_several_events_each_resumable() {
        let started = Entry {
            id: EntryId(5, 1),
            kind: "started".to_owned(),
            data: r#"{"attempt":2,"run":7}"#.to_owned(),
        };
        let parts = started.parts(None);
        assert_eq!(parts[0].0, "status");
        assert_eq!(parts[0].1, r#"{"attempt":2,"status":"running"}"#);
        assert_eq!(
            parts[1],
            ("attempt_started".to_owned(), started.data.clone())
        );
        let fin = Entry {
            id: EntryId(9, 0),
            kind: "final".to_owned(),
            data: r#"{"status":"succeeded","usage":{"calls":1},"delta":{"text":"end","attempt":2,"seq":4,"step":0}}"#
                .to_owned(),
        };
        assert!(fin.terminal() && fin.wants_result());
        let names: Vec<String> = fin
            .parts(Some(r#"{"content":"the end"}"#))
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(names, ["delta", "usage", "status", "done"]);
        let done = &fin.parts(Some(r#"{"content":"the end"}"#))[3].1;
        assert_eq!(
            done,
            r#"{"result":{"content":"the end"},"status":"succeeded"}"#
        );
        // ids: <entry>.<k> for all but the last, which has the entry id; a resume inside the
        // entry gets the rest only
        let all = read(&fin, 0, None);
        assert_eq!(all.len(), 4);
        assert!(
            all[0].contains("9-0.0") && all[2].contains("9-0.2"),
            "{all:?}"
        );
        assert!(
            all[3].contains("9-0") && !all[3].contains("9-0.3"),
            "{all:?}"
        );
        assert_eq!(read(&fin, 2, None).len(), 2);
        let failed = Entry {
            id: EntryId(9, 1),
            kind: "final".to_owned(),
            data: r#"{"status":"cancelled","error":"cancelled by request"}"#.to_owned(),
        };
        assert!(!failed.wants_result());
        let parts = failed.parts(None);
        assert_eq!(parts.len(), 2);
        let err: serde_json::Value = serde_json::from_str(&parts[1].1).expect("json");
        assert_eq!(parts[1].0, "error");
        assert_eq!(err["error_code"], "cancelled");
        assert_eq!(
            Cursor::parse("9-0.2"),
            Some(Cursor {
                id: EntryId(9, 0),
                sub: Some(2)
            })
        );
        assert_eq!(Cursor::parse("9-0").map(|c| c.sub), Some(None));
        for bad in [
            "9-0.",
            "9-0.x",
            "9.0",
            "x",
            "+9-0",
            "9-+0",
            "12345678901234567890-0",
            "9-0.1234567890",
            "",
        ] {
            assert!(Cursor::parse(bad).is_none(), "{bad}");
        }
    }

    /// The wire order is `id`, `event`, `data`, as before events were built apart from axum's
    /// type: a client reading line by line (the demo's) sees the name before its data.
    #[test]
    fn events_keep_their_wire_order() {
        let ev = Ev::default().id("1-0").event("status").data("{}");
        let wire = format!("{:?}", Event::from(ev));
        let (i, e, d) = (
            wire.find("id: 1-0"),
            wire.find("event: status"),
            wire.find("data: {}"),
        );
        assert!(i < e && e < d && i.is_some(), "{wire}");
        let c = format!("{:?}", Event::from(Ev::default().comment(CLOSED)));
        assert!(c.contains(CLOSED) && !c.contains("data:"), "{c}");
    }

    #[test]
    fn error_events_name_their_code() {
        let d = with_error_code(r#"{"status":"cancelled","error":"cancelled by request"}"#);
        let v: serde_json::Value = serde_json::from_str(&d).expect("json");
        assert_eq!(v["error_code"], "cancelled");
        // not JSON: passed on as it is
        assert_eq!(with_error_code("x"), "x");
    }

    #[test]
    fn hash_tags_are_what_the_cluster_hashes() {
        assert_eq!(hash_tag("agentq:{default}:task:1:events"), "default");
        assert_eq!(hash_tag("agentq:{}:x"), "agentq:{}:x");
        assert_eq!(hash_tag("plain"), "plain");
        assert_eq!(hash_tag("a{b"), "a{b");
        assert_eq!(hash_tag("a{b}{c}"), "b");
    }

    #[test]
    fn xread_replies_are_read_in_both_protocols() {
        let entry = |id: &str, e: &str, d: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"e".to_vec()),
                    Value::BulkString(e.as_bytes().to_vec()),
                    Value::BulkString(b"d".to_vec()),
                    Value::BulkString(d.as_bytes().to_vec()),
                ]),
            ])
        };
        let list = Value::Array(vec![
            entry("1-1", "delta", "{}"),
            entry("1-2", "done", "{}"),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"k".to_vec()),
            list.clone(),
        ])]);
        let got = streams(resp2);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.len(), 2);
        assert!(got[0].1[1].terminal());
        let resp3 = Value::Map(vec![(Value::BulkString(b"k".to_vec()), list)]);
        assert_eq!(streams(resp3)[0].1[0].id, EntryId(1, 2 - 1));
        assert!(streams(Value::Nil).is_empty());
    }
}
