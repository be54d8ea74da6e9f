//! The queue operations, each one Redis round trip (a Lua script or a pipeline).
//! The state changes themselves live in the Lua scripts beside this file
//! (`common/src/queue/*.lua`); see docs/architecture.md.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, RedisResult, Script};

use crate::keys::{Keys, TaskId};
use crate::redis_conn::Redis;
use crate::script::declared;
use crate::task::{NewTask, StartedTask, TaskView};
use crate::time::now_ms;

mod complete_batch;
mod dead;
mod declare;
pub(crate) use declare::{workflow as declare_workflow, Declared};
mod enqueue;
mod group;
mod recent;
mod steps;
pub use complete_batch::{BatchSettings, CompleteBatcher, Completion, MemoryWrite};
pub use enqueue::{EnqueueItem, ReplicaWait, ITEMS_PER_CALL};
pub use group::{GroupCommit, GroupConfig, SizeObserver};
pub use recent::{RecentFilter, RecentPage, TaskSummary, MAX_SCAN as RECENT_MAX_SCAN};
pub use steps::{Resumed, Suspend, PENDING_FIELD, TRANSCRIPT_FIELD};

struct Scripts {
    enqueue: Script,
    fetch: Script,
    complete: Script,
    fail: Script,
    promote: Script,
    usage: Script,
    recover: Script,
    cancel: Script,
    redrive: Script,
    give_back: Script,
    emit: Script,
    follow: Script,
}

// Every script that queues an id, takes one out of pending work or ends a run goes through the
// tenants' lines, the ring and the run counts of fair.lua (prepended: a Redis script cannot import
// another); wf.lua uses it too, so it comes first.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    enqueue: declared(concat!(
        include_str!("fair.lua"),
        include_str!("enqueue_item.lua"),
        include_str!("enqueue.lua")
    )),
    // Every script that can make a task final ends with the workflow step of wf.lua.
    fetch: Script::new(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("../graph/wf.lua"),
        include_str!("fetch.lua")
    )),
    // Both reports share the ownership check of fence.lua.
    complete: Script::new(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("../graph/wf.lua"),
        include_str!("fence.lua"),
        include_str!("complete.lua")
    )),
    fail: Script::new(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("../graph/wf.lua"),
        include_str!("fence.lua"),
        include_str!("fail.lua")
    )),
    promote: declared(concat!(
        include_str!("fair.lua"),
        include_str!("promote.lua")
    )),
    usage: declared(include_str!("usage.lua")),
    recover: declared(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("recover.lua")
    )),
    cancel: declared(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("../graph/wf.lua"),
        include_str!("cancel.lua")
    )),
    redrive: declared(concat!(
        include_str!("fair.lua"),
        include_str!("redrive.lua")
    )),
    give_back: declared(concat!(
        include_str!("fair.lua"),
        include_str!("return.lua")
    )),
    emit: declared(concat!(
        include_str!("events.lua"),
        include_str!("emit.lua")
    )),
    follow: declared(concat!(
        include_str!("events.lua"),
        include_str!("follow.lua")
    )),
});

/// How many times a script that declares a workflow's keys reads the workflow again when a plan
/// spawned children between the read and the script (each spawn is one node's end: a handful in a
/// row is already far-fetched).
pub(crate) const REREADS: usize = 5;

/// The answer of a script that declared a workflow's keys when the workflow had changed since
/// they were read: nothing was written.
pub(crate) const REREAD: &str = "reread";

/// A script's last answer after at most [`REREADS`] reads: an error when the workflow never held
/// still (the api answers 503), else the answer.
pub(crate) fn after_rereads(out: String) -> RedisResult<String> {
    if out == REREAD {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "the workflow kept changing while it was read; try again",
        )));
    }
    Ok(out)
}

/// Counts of one queue, as `GET /v1/queues/{queue}` shows them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct QueueStats {
    pub queue: String,
    /// The Redis list KEDA's redis scaler must watch; `pending` is its LLEN.
    pub list_key: String,
    /// The sorted set of running tasks; `inflight` is its ZCARD (KEDA's second trigger).
    pub active_key: String,
    pub pending: u64,
    pub inflight: u64,
    pub retrying: u64,
    /// Tasks the flow limiter parked until their turn (`throttled` ZSET), outside `pending`.
    pub throttled: u64,
    /// Tasks waiting for a client's tool outputs (`waiting` ZSET): no worker holds them.
    #[serde(default)]
    pub requires_action: u64,
    pub dead: u64,
    pub workers: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Created,
    /// The idempotency key had already created this task.
    Existing,
    /// Nothing was written: the tenant already has `max_pending` tasks waiting in the queue
    /// (`Admission::max_pending`); `pending` is how many.
    OverQuota {
        pending: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled,
    NotFound,
    /// The task had already finished with this status.
    AlreadyFinished(crate::task::Status),
}

/// How a failed run is recorded (see `fail.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    Transient,
    RateLimited,
    Permanent,
    GiveBack,
    /// The flow limiter could not admit the call: park until the given time (attempt uncounted).
    Throttled,
}

impl FailMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::RateLimited => "rate_limited",
            Self::Permanent => "permanent",
            Self::GiveBack => "giveback",
            Self::Throttled => "throttled",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadTask {
    pub id: String,
    pub died_at: String,
    pub error: Option<String>,
    pub attempts: u32,
    /// The tenant that owns the task; absent for the default tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Agent memory to append when a task succeeds.
pub struct MemoryAppend<'a> {
    pub agent_id: &'a str,
    pub messages: Vec<String>,
    pub keep: usize,
    pub ttl: Duration,
}

/// What a workflow node's success carries to `wf.lua`: its output for the dependents' templates
/// and, for a plan node, the children to spawn (JSON, see `wf_final`).
#[derive(Debug, Clone, Default)]
pub struct NodeDone {
    pub output: String,
    pub children: Option<String>,
}

/// The end of a run's streamed answer that is not on the task's event stream yet: `complete.lua`
/// appends it with the result, in the same step (see `events.lua`).
#[derive(Debug, Clone, Default)]
pub struct StreamRest {
    pub text: String,
    /// The run's step number (the deltas' `step`).
    pub step: u32,
    /// A batch of deltas whose write got no answer (number, text): it may have landed or not,
    /// and `complete.lua` writes its text before `text` only if it did not (no gap, no twice).
    pub unacked: Option<(u64, String)>,
}

/// One event a run appends to its task's stream with [`Broker::emit`]: a `delta`'s data is the
/// text itself, any other event's its JSON.
#[derive(Debug, Clone)]
pub struct RunEvent {
    pub kind: &'static str,
    pub data: String,
}

/// One LLM call's usage, added to its task's counters (the record's `usage` field,
/// `prompt|completion|cached|calls|cost nano-dollars`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageAdd {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub cost_nanos: i64,
}

impl UsageAdd {
    /// The form the recording scripts take (`complete.lua`, `suspend.lua`):
    /// `prompt|completion|cached|cost`, or `''` for a call with no usage.
    pub(crate) fn script_arg(u: Option<&Self>) -> String {
        u.map_or(String::new(), |u| {
            format!(
                "{}|{}|{}|{}",
                u.prompt,
                u.completion,
                u.cached,
                u.cost_nanos.max(0)
            )
        })
    }
}

/// What one promotion pass did: how many ids it moved to pending, and when the next retry or
/// parked task is due (ms since the epoch), if any is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promoted {
    pub moved: u64,
    pub next_due_ms: Option<i64>,
}

/// What one [`Broker::fetch`] did.
#[derive(Debug, Default)]
pub struct Fetched {
    /// The runs started, in the order taken.
    pub started: Vec<StartedTask>,
    /// Tickets were handed back because every tenant with pending work is at its
    /// `max_running` in the queue.
    pub capped: bool,
}

/// Most tenants [`Broker::oldest_pending_age`] looks at (the ring's first ones).
pub const OLDEST_AGE_TENANTS: isize = 1000;

/// The queue client shared by api and worker: a Redis handle and the key prefix.
#[derive(Clone)]
pub struct Broker {
    redis: Redis,
    /// Shared, so that cloning the broker (once per request in the api's state) does not allocate.
    prefix: std::sync::Arc<str>,
    /// Enqueues wait for replicas (`AGENTQ_ENQUEUE_REPLICAS`) on a connection of their own.
    durable: Option<std::sync::Arc<(Redis, ReplicaWait)>>,
}

impl Broker {
    pub fn new(redis: Redis, prefix: impl Into<String>) -> Self {
        Self {
            redis,
            prefix: prefix.into().into(),
            durable: None,
        }
    }

    /// Enqueues are written on `writes` and acknowledged only once `wait` replicas have them.
    /// A connection of their own: `WAIT` blocks the connection it is sent on until the replicas
    /// answer (up to its timeout while one is down), and reads must not queue behind it.
    pub fn with_replica_wait(mut self, writes: Redis, wait: ReplicaWait) -> Self {
        self.durable = Some(std::sync::Arc::new((writes, wait)));
        self
    }

    pub fn keys(&self, queue: &str) -> Keys {
        Keys::new(&self.prefix, queue)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Writes the record and queues the id in its tenant's line (`task.payload.tenant`) in one
    /// script. With an idempotency key, a second call returns the first task's id and writes
    /// nothing. A tenant that already has its `max_pending` tasks waiting in the queue gets
    /// [`Enqueued::OverQuota`] (after the idempotency check) and nothing is written.
    pub async fn enqueue(
        &self,
        task: &NewTask,
        idempotency_key: Option<&str>,
        ttl: Duration,
    ) -> RedisResult<(String, Enqueued)> {
        let keys = self.keys(&task.queue);
        let id = TaskId::generate(&task.queue).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "bad queue", e.to_string()))
        })?;
        let payload = serde_json::to_string(&task.payload).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "payload", e.to_string()))
        })?;
        let mut inv = SCRIPTS.enqueue.prepare_invoke();
        inv.key(keys.task(&id)).key(keys.pending());
        if let Some(k) = idempotency_key {
            inv.key(keys.idempotency(k));
        }
        // lanes are per tenant: two tenants' agents of one name never wait on each other
        let agent_key = task.payload.agent_key();
        let agent = agent_key.as_deref();
        if let Some(a) = agent {
            inv.key(keys.lane(a)).key(keys.lanes());
        }
        // what enqueue_item.lua reaches from the queue's base: declared like the rest
        let tenant = crate::tenant::non_default(task.payload.tenant.as_deref());
        inv.key(keys.line(tenant))
            .key(keys.ring())
            .key(keys.tenants())
            .key(keys.recent());
        inv.arg(id.to_string())
            .arg(&task.queue)
            .arg(now_ms())
            .arg(task.max_attempts)
            .arg(payload)
            .arg(ttl.as_secs().max(1))
            .arg(if idempotency_key.is_some() { "1" } else { "0" })
            .arg(if agent.is_some() { "1" } else { "0" })
            .arg(agent.unwrap_or(""))
            .arg(tenant.unwrap_or(""));
        let mut conn = self.write_conn().await?;
        let (code, value): (i64, String) = inv.invoke_async(&mut conn).await?;
        self.replicated(&mut conn, &keys.pending()).await?;
        Ok(match code {
            1 => (value, Enqueued::Created),
            2 => (
                id.to_string(),
                Enqueued::OverQuota {
                    pending: value.parse().unwrap_or(0),
                },
            ),
            _ => (value, Enqueued::Existing),
        })
    }

    /// Copies a tenant's admission into the queue's `tenants` hash (its slot), where
    /// `enqueue.lua` reads `max_pending` and `fetch.lua` the weight and `max_running`: present
    /// fields are set, caps that are `None` removed. The weight is clamped to 1..=100.
    pub async fn set_admission(
        &self,
        queue: &str,
        tenant: &str,
        a: &crate::tenant::Admission,
    ) -> RedisResult<()> {
        let key = self.keys(queue).tenants();
        let weight = a.weight.clamp(1, crate::tenant::MAX_WEIGHT);
        let mut set: Vec<(String, String)> = vec![(format!("w:{tenant}"), weight.to_string())];
        let mut del: Vec<String> = Vec::new();
        for (field, cap) in [("p", a.max_pending), ("r", a.max_running)] {
            match cap {
                Some(n) => set.push((format!("{field}:{tenant}"), n.to_string())),
                None => del.push(format!("{field}:{tenant}")),
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic().hset_multiple(&key, &set).ignore();
        if !del.is_empty() {
            pipe.hdel(&key, del).ignore();
        }
        let mut conn = self.redis.conn().await?;
        pipe.query_async(&mut conn).await
    }

    /// Removes a tenant's admission from the queue (it schedules with weight 1 and no caps, as
    /// a tenant never configured). Its run counts stay: runs in flight still end.
    pub async fn clear_admission(&self, queue: &str, tenant: &str) -> RedisResult<()> {
        let key = self.keys(queue).tenants();
        let mut conn = self.redis.conn().await?;
        conn.hdel(
            key,
            &[
                format!("w:{tenant}"),
                format!("p:{tenant}"),
                format!("r:{tenant}"),
            ],
        )
        .await
    }

    pub async fn get(&self, id: &TaskId) -> RedisResult<Option<TaskView>> {
        let key = self.keys(id.queue()).task(id);
        let mut conn = self.redis.conn().await?;
        let h: HashMap<String, String> = conn.hgetall(key).await?;
        if h.is_empty() {
            return Ok(None);
        }
        Ok(Some(TaskView::from_hash(id, &h)))
    }

    /// [`Self::get`] with what `?include=` asks for: the transcript of the task's steps
    /// (`steps`) and the request it runs (`input`), from the same one read.
    pub async fn get_including(
        &self,
        id: &TaskId,
        steps: bool,
        input: bool,
    ) -> RedisResult<Option<TaskView>> {
        let key = self.keys(id.queue()).task(id);
        let mut conn = self.redis.conn().await?;
        let h: HashMap<String, String> = conn.hgetall(key).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let mut view = TaskView::from_hash(id, &h);
        if steps {
            view = view.with_transcript(&h);
        }
        if input {
            view = view.with_input(&h);
        }
        Ok(Some(view))
    }

    pub async fn cancel(&self, id: &TaskId, ttl: Duration) -> RedisResult<CancelOutcome> {
        let keys = self.keys(id.queue());
        let mut conn = self.redis.conn().await?;
        let ids = [id.to_string()];
        // The record is read first for the keys it names (tenant, batch, workflow); a node's
        // whole workflow is declared, and read again if a plan spawned children in between.
        let mut out = String::from(REREAD);
        for _ in 0..REREADS {
            let route = declare::routes(&mut conn, &keys, &ids)
                .await?
                .into_iter()
                .next()
                .unwrap_or_default();
            let mut declared = Declared::default();
            declared
                .key(keys.line(route.tenant.as_deref()))
                .key(keys.line(None))
                .key(keys.ring())
                .key(keys.turns())
                .key(keys.running());
            if let Some(b) = &route.batch {
                declared.key(b.clone());
            }
            let nodes = match &route.wf {
                Some(wf) => declare::workflow(&mut conn, &keys, wf, &mut declared).await?,
                None => String::new(),
            };
            let mut inv = SCRIPTS.cancel.prepare_invoke();
            inv.key(keys.task(id))
                .key(keys.pending())
                .key(keys.delayed())
                .key(keys.active())
                .key(keys.throttled())
                .key(keys.waiting())
                .key(keys.task_events(id));
            declared.to(&mut inv);
            out = inv
                .arg(&ids[0])
                .arg(now_ms())
                .arg(ttl.as_secs().max(1))
                .arg(keys.cancels())
                .arg(nodes)
                .invoke_async(&mut conn)
                .await?;
            if out != REREAD {
                break;
            }
        }
        Ok(match after_rereads(out)?.as_str() {
            "ok" => CancelOutcome::Cancelled,
            "missing" => CancelOutcome::NotFound,
            other => match crate::task::Status::parse(other) {
                Some(s) => CancelOutcome::AlreadyFinished(s),
                None => CancelOutcome::NotFound,
            },
        })
    }

    pub async fn stats(&self, queue: &str) -> RedisResult<QueueStats> {
        let keys = self.keys(queue);
        let mut conn = self.redis.conn().await?;
        let (pending, inflight, retrying, throttled, dead, workers, requires_action): (
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
        ) = redis::pipe()
            .llen(keys.pending())
            .zcard(keys.active())
            .zcard(keys.delayed())
            .zcard(keys.throttled())
            .zcard(keys.dead())
            .scard(keys.workers())
            .zcard(keys.waiting())
            .query_async(&mut conn)
            .await?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            list_key: keys.pending(),
            active_key: keys.active(),
            pending,
            inflight,
            retrying,
            throttled,
            dead,
            workers,
            requires_action,
        })
    }

    /// Age in seconds of the oldest task at the head of a tenant's line (the next each tenant
    /// runs), 0 if nothing is pending. At most [`OLDEST_AGE_TENANTS`] tenants of the ring are
    /// looked at (three round trips in all); an id left in `pending` itself from before tickets
    /// existed counts too.
    pub async fn oldest_pending_age(&self, queue: &str) -> RedisResult<f64> {
        let keys = self.keys(queue);
        let mut conn = self.redis.conn().await?;
        let (ring, legacy): (Vec<String>, Option<String>) = redis::pipe()
            .lrange(keys.ring(), 0, OLDEST_AGE_TENANTS - 1)
            .lindex(keys.pending(), -1)
            .query_async(&mut conn)
            .await?;
        let mut heads: Vec<TaskId> = legacy
            .filter(|h| h != crate::keys::TICKET)
            .and_then(|h| TaskId::parse(&h).ok())
            .into_iter()
            .collect();
        if !ring.is_empty() {
            let mut pipe = redis::pipe();
            for t in &ring {
                pipe.lindex(keys.tenant_pending(t), -1);
            }
            let ids: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
            heads.extend(
                ids.into_iter()
                    .flatten()
                    .filter_map(|h| TaskId::parse(&h).ok()),
            );
        }
        if heads.is_empty() {
            return Ok(0.0);
        }
        let mut pipe = redis::pipe();
        for id in &heads {
            pipe.hget(keys.task(id), "created_at");
        }
        let created: Vec<Option<i64>> = pipe.query_async(&mut conn).await?;
        let now = now_ms();
        Ok(created
            .into_iter()
            .flatten()
            .map(|c| ((now - c).max(0) as f64) / 1000.0)
            .fold(0.0, f64::max))
    }

    /// Moves up to `limit` dead tasks back to pending with fresh attempts.
    /// Returns (redriven, dropped because their record was gone).
    pub async fn redrive(&self, queue: &str, limit: usize) -> RedisResult<(u64, u64)> {
        let keys = self.keys(queue);
        let mut conn = self.redis.conn().await?;
        let ids: Vec<String> = conn
            .zrange(keys.dead(), 0, (limit.max(1) - 1) as isize)
            .await?;
        self.redrive_these(&keys, &mut conn, &ids).await
    }

    /// `redrive.lua` for `ids`, with the keys their records name declared.
    async fn redrive_these(
        &self,
        keys: &Keys,
        conn: &mut crate::redis_conn::Conn,
        ids: &[String],
    ) -> RedisResult<(u64, u64)> {
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let routes = declare::routes(conn, keys, ids).await?;
        let mut declared = declare::Declared::default();
        for (id, route) in ids.iter().zip(&routes) {
            declared.task(keys, id, route);
        }
        declared.key(keys.ring());
        let mut inv = SCRIPTS.redrive.prepare_invoke();
        inv.key(keys.dead()).key(keys.pending());
        declared.to(&mut inv);
        for id in ids {
            inv.arg(id);
        }
        inv.invoke_async(conn).await
    }

    /// Adds a declared queue to the registry set (`agentq:queues`).
    pub async fn register_queue(&self, queue: &str) -> RedisResult<()> {
        let mut conn = self.redis.conn().await?;
        conn.sadd(crate::keys::queues_registry(&self.prefix), queue)
            .await
    }

    pub async fn known_queues(&self) -> RedisResult<Vec<String>> {
        let mut conn = self.redis.conn().await?;
        conn.smembers(crate::keys::queues_registry(&self.prefix))
            .await
    }

    // ---- worker side ----

    /// Blocks up to `timeout` for one pending ticket (or an id queued before tickets existed)
    /// and moves it into the worker's in-flight list; pass what it returns to [`Self::fetch`] as
    /// `claimed`. `blocking` must be a connection reserved for blocking commands.
    pub async fn wait_for_task(
        &self,
        blocking: &Redis,
        keys: &Keys,
        worker_id: &str,
        timeout: Duration,
    ) -> RedisResult<Option<String>> {
        let mut conn = blocking.conn().await?;
        redis::cmd("BLMOVE")
            .arg(keys.pending())
            .arg(keys.inflight(worker_id))
            .arg("RIGHT")
            .arg("LEFT")
            .arg(timeout.as_secs_f64())
            .query_async(&mut conn)
            .await
    }

    /// Takes up to `n` more pending tasks (plus `claimed`, already moved by [`Self::wait_for_task`])
    /// and marks them running, choosing across tenants by the queue's weighted round robin
    /// (`fetch.lua`). The caller must hold a concurrency permit for each one it may get.
    /// [`Fetched::capped`] says tickets were handed back because every tenant with pending work
    /// is at its `max_running`: the caller should then wait a little (a run ending) instead of
    /// blocking on `pending`, whose tickets would wake it at once.
    ///
    /// The same script registers the worker (`workers` and its heartbeat key), so a worker that
    /// holds tasks is always one that recovery can find.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch(
        &self,
        keys: &Keys,
        worker_id: &str,
        n: usize,
        claimed: Option<&str>,
        ttl: Duration,
        heartbeat: Duration,
    ) -> RedisResult<Fetched> {
        let mut conn = self.redis.conn().await?;
        let flat: Vec<redis::Value> = SCRIPTS
            .fetch
            .key(keys.pending())
            .key(keys.inflight(worker_id))
            .key(keys.active())
            .key(keys.dead())
            .key(keys.workers())
            .key(keys.heartbeat(worker_id))
            .arg(keys.task_prefix())
            .arg(n)
            .arg(now_ms())
            .arg(worker_id)
            .arg(claimed.unwrap_or(""))
            .arg(ttl.as_secs().max(1))
            .arg(heartbeat.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        let Some((flag, runs)) = flat.split_first() else {
            return Ok(Fetched::default());
        };
        let capped = redis::from_redis_value_ref::<i64>(flag)? == 1;
        let mut out = Vec::with_capacity(runs.len() / 7);
        for chunk in runs.chunks_exact(7) {
            let id: String = redis::from_redis_value_ref(&chunk[0])?;
            let attempt: u32 = redis::from_redis_value_ref(&chunk[1])?;
            let payload: String = redis::from_redis_value_ref(&chunk[2])?;
            let limited: u32 = redis::from_redis_value_ref(&chunk[3])?;
            let created: i64 = redis::from_redis_value_ref(&chunk[4])?;
            let token: String = redis::from_redis_value_ref(&chunk[5])?;
            let mut started = StartedTask::new(id, token, attempt, payload, limited, created);
            started.turn_at_ms = redis::from_redis_value_ref(&chunk[6]).unwrap_or(0);
            out.push(started);
        }
        Ok(Fetched {
            started: out,
            capped,
        })
    }

    /// Records a success, fenced by the run's token. Returns the script's verdict: "ok", or why the
    /// result was dropped ("stale", "cancelled", ...; see `complete.lua`).
    #[allow(clippy::too_many_arguments)]
    pub async fn complete(
        &self,
        keys: &Keys,
        worker_id: &str,
        id: &str,
        token: &str,
        result_json: &str,
        ttl: Duration,
        memory: Option<&MemoryAppend<'_>>,
        usage: Option<&UsageAdd>,
        node: Option<&NodeDone>,
        rest: &StreamRest,
    ) -> RedisResult<String> {
        let mut conn = self.redis.conn().await?;
        let mut inv = SCRIPTS.complete.prepare_invoke();
        inv.key(keys.task_raw(id))
            .key(keys.inflight(worker_id))
            .key(keys.active())
            .key(keys.running());
        if let Some(m) = memory {
            inv.key(keys.memory(m.agent_id));
        }
        inv.arg(id)
            .arg(token)
            .arg(now_ms())
            .arg(result_json)
            .arg(ttl.as_secs().max(1));
        let (keep, mttl) = memory.map_or((1, 1), |m| (m.keep.max(1), m.ttl.as_secs().max(1)));
        inv.arg(keep).arg(mttl).arg(UsageAdd::script_arg(usage));
        match node {
            Some(n) => inv
                .arg("1")
                .arg(&n.output)
                .arg(n.children.as_deref().unwrap_or("")),
            None => inv.arg("").arg("").arg(""),
        };
        inv.arg(&rest.text).arg(rest.step);
        match &rest.unacked {
            Some((batch, text)) => inv.arg(*batch).arg(text),
            None => inv.arg("").arg(""),
        };
        if let Some(m) = memory {
            for msg in &m.messages {
                inv.arg(msg);
            }
        }
        inv.invoke_async(&mut conn).await
    }

    /// Appends a run's events to its task's stream (`emit.lua`), only while the run owns the
    /// task. `batch` numbers the run's calls from 1: a resend of a batch already written writes
    /// nothing. Returns `ok`, `stale` or `missing`.
    pub async fn emit(
        &self,
        keys: &Keys,
        id: &str,
        token: &str,
        batch: u64,
        step: u32,
        events: &[RunEvent],
    ) -> RedisResult<String> {
        let mut conn = self.redis.conn().await?;
        let mut inv = SCRIPTS.emit.prepare_invoke();
        inv.key(keys.task_raw(id))
            .key(keys.task_events_raw(id))
            .arg(token)
            .arg(batch)
            .arg(step);
        for e in events {
            inv.arg(e.kind).arg(&e.data);
        }
        inv.invoke_async(&mut conn).await
    }

    /// A client follows a task: its event stream is turned on and holds, from here, every event
    /// of the task from its start (`follow.lua`; events.lua, "Streams on demand"). False when
    /// the record is gone.
    pub async fn follow(&self, keys: &Keys, id: &crate::keys::TaskId) -> RedisResult<bool> {
        let mut conn = self.redis.conn().await?;
        let mut inv = SCRIPTS.follow.prepare_invoke();
        inv.key(keys.task(id)).key(keys.task_events(id));
        let found: i64 = inv.invoke_async(&mut conn).await?;
        Ok(found == 1)
    }

    /// Records a failed run (or gives it back), fenced by the run's token. `id` is the raw id from
    /// the in-flight list: a malformed one is still dead-lettered as poison.
    #[allow(clippy::too_many_arguments)]
    pub async fn fail(
        &self,
        keys: &Keys,
        worker_id: &str,
        id: &str,
        token: &str,
        mode: FailMode,
        error: &str,
        retry_in: Duration,
        ttl: Duration,
        max_rate_limited: u32,
    ) -> RedisResult<String> {
        // saturating: the caller clamps delays, but a u128 must never wrap into the past
        let delay = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX);
        let run = (keys, worker_id, id, token);
        self.fail_script(run, mode, error, delay, ttl, max_rate_limited)
            .await
    }

    /// Parks a run the flow limiter could not admit (`fail.lua` mode `throttled`), fenced by the
    /// run's token: the task goes back to `queued`, attempt uncounted, into the throttled set
    /// until `eligible_at_ms`. Returns the verdict like [`Self::fail`].
    pub async fn park(
        &self,
        keys: &Keys,
        worker_id: &str,
        id: &str,
        token: &str,
        eligible_at_ms: i64,
        ttl: Duration,
    ) -> RedisResult<String> {
        let at = u64::try_from(eligible_at_ms).unwrap_or(0);
        let run = (keys, worker_id, id, token);
        self.fail_script(run, FailMode::Throttled, "", at, ttl, 1)
            .await
    }

    /// `fail.lua` for one run: `time` is the retry delay in ms, or for `throttled` the absolute
    /// time the task's turn comes.
    async fn fail_script(
        &self,
        (keys, worker_id, id, token): (&Keys, &str, &str, &str),
        mode: FailMode,
        error: &str,
        time: u64,
        ttl: Duration,
        max_rate_limited: u32,
    ) -> RedisResult<String> {
        let mut conn = self.redis.conn().await?;
        SCRIPTS
            .fail
            .key(keys.task_raw(id))
            .key(keys.inflight(worker_id))
            .key(keys.active())
            .key(keys.delayed())
            .key(keys.dead())
            .key(keys.pending())
            .key(keys.throttled())
            .key(keys.running())
            .arg(id)
            .arg(token)
            .arg(now_ms())
            .arg(mode.as_str())
            .arg(error)
            .arg(time)
            .arg(ttl.as_secs().max(1))
            .arg(max_rate_limited)
            .invoke_async(&mut conn)
            .await
    }

    /// Moves due retries and parked tasks whose turn came to pending.
    pub async fn promote_due(&self, keys: &Keys, limit: usize) -> RedisResult<Promoted> {
        self.promote_due_by(keys, limit, Duration::ZERO).await
    }

    /// [`Self::promote_due`] for work due at least `lag` ago: a backstop that moves only what the
    /// workers' own promotion (at each turn) left behind, so it never moves a second's turns at
    /// once while workers run.
    pub async fn promote_due_by(
        &self,
        keys: &Keys,
        limit: usize,
        lag: Duration,
    ) -> RedisResult<Promoted> {
        let mut conn = self.redis.conn().await?;
        let lag = i64::try_from(lag.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms().saturating_sub(lag);
        let limit = limit.max(1);
        // what is due, and when the first entry of either set is: the script is called only when
        // something is due, with the ids it may move and the keys they reach declared
        type First = Vec<(String, f64)>;
        let (delayed, throttled, first_delayed, first_throttled): (
            Vec<String>,
            Vec<String>,
            First,
            First,
        ) = redis::pipe()
            .cmd("ZRANGEBYSCORE")
            .arg(keys.delayed())
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .cmd("ZRANGEBYSCORE")
            .arg(keys.throttled())
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .cmd("ZRANGE")
            .arg(keys.delayed())
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(keys.throttled())
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        if delayed.is_empty() && throttled.is_empty() {
            let next = first_delayed
                .iter()
                .chain(&first_throttled)
                .map(|(_, at)| *at as i64)
                .min();
            return Ok(Promoted {
                moved: 0,
                next_due_ms: next,
            });
        }
        let ids: Vec<String> = delayed.iter().chain(&throttled).cloned().collect();
        let routes = declare::routes(&mut conn, keys, &ids).await?;
        let mut declared = declare::Declared::default();
        for (id, route) in ids.iter().zip(&routes) {
            declared.task(keys, id, route);
        }
        declared.key(keys.ring());
        let mut inv = SCRIPTS.promote.prepare_invoke();
        inv.key(keys.delayed())
            .key(keys.pending())
            .key(keys.throttled());
        declared.to(&mut inv);
        inv.arg(now).arg(delayed.len());
        for id in &ids {
            inv.arg(id);
        }
        let (moved, next): (u64, i64) = inv.invoke_async(&mut conn).await?;
        Ok(Promoted {
            moved,
            next_due_ms: (next >= 0).then_some(next),
        })
    }

    /// Adds one call's usage to the task's record (`usage.lua`). Not fenced: money spent by a run
    /// that lost the task was still spent.
    pub async fn add_usage(&self, keys: &Keys, id: &str, u: &UsageAdd) -> RedisResult<()> {
        let mut conn = self.redis.conn().await?;
        let _: Option<String> = SCRIPTS
            .usage
            .key(keys.task_raw(id))
            .arg(u.prompt)
            .arg(u.completion)
            .arg(u.cached)
            .arg(u.cost_nanos.max(0))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// A task's usage so far: (prompt + completion tokens, cost in nano-dollars).
    pub async fn task_usage(&self, keys: &Keys, id: &str) -> RedisResult<(u64, i64)> {
        let mut conn = self.redis.conn().await?;
        let raw: Option<String> = redis::cmd("HGET")
            .arg(keys.task_raw(id))
            .arg(crate::task::USAGE_FIELD)
            .query_async(&mut conn)
            .await?;
        let (u, cost) = crate::task::parse_usage(raw.as_deref().unwrap_or(""));
        Ok((u.total_tokens, cost))
    }

    /// Refreshes this worker's heartbeat and registration.
    pub async fn heartbeat(&self, keys: &Keys, worker_id: &str, ttl: Duration) -> RedisResult<()> {
        let mut conn = self.redis.conn().await?;
        redis::pipe()
            .set_ex(keys.heartbeat(worker_id), now_ms(), ttl.as_secs().max(1))
            .ignore()
            .sadd(keys.workers(), worker_id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    }

    /// Removes this worker's heartbeat and registration after a clean drain.
    pub async fn deregister(&self, keys: &Keys, worker_id: &str) -> RedisResult<()> {
        let mut conn = self.redis.conn().await?;
        redis::pipe()
            .del(keys.heartbeat(worker_id))
            .ignore()
            .srem(keys.workers(), worker_id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    }

    /// Puts an id this worker moved but never ran back at the head of pending (`return.lua`):
    /// only if it really was in the worker's in-flight list, and, for a running task, only if the
    /// run is this worker's (`token`, or any of its runs when `None`: a fetch whose reply was lost).
    /// Returns "queued", "dropped" or "absent".
    pub async fn return_unstarted(
        &self,
        keys: &Keys,
        worker_id: &str,
        id: &str,
        token: Option<&str>,
    ) -> RedisResult<String> {
        let mut conn = self.redis.conn().await?;
        // the tenant's line the id goes back to (a ticket goes back to pending alone)
        let mut declared = declare::Declared::default();
        if id != crate::keys::TICKET {
            let ids = [id.to_string()];
            let routes = declare::routes(&mut conn, keys, &ids).await?;
            let route = routes.into_iter().next().unwrap_or_default();
            declared
                .key(keys.line(route.tenant.as_deref()))
                .key(keys.line(None))
                .key(keys.ring())
                .key(keys.running());
        }
        let mut inv = SCRIPTS.give_back.prepare_invoke();
        inv.key(keys.task_raw(id))
            .key(keys.inflight(worker_id))
            .key(keys.pending())
            .key(keys.active());
        declared.to(&mut inv);
        inv.arg(id)
            .arg(worker_id)
            .arg(token.unwrap_or(""))
            .invoke_async(&mut conn)
            .await
    }

    /// Drops one copy of `id` from this worker's own in-flight list: its run was aborted because
    /// the task is final (cancelled, or finished by another run) or its record is gone. A cancel
    /// leaves the owner's list to the owner (cancel.lua).
    pub async fn forget(&self, keys: &Keys, worker_id: &str, id: &str) -> RedisResult<()> {
        let mut conn = self.redis.conn().await?;
        conn.lrem(keys.inflight(worker_id), -1, id).await
    }

    /// The `status` of each task record (`None` for a record that is gone), in the order of
    /// `ids`: one pipelined round trip, for the worker's poll of the runs it executes. Only the
    /// status: the poll decides on it alone, and at 1000 runs in flight every byte of the reply
    /// is allocated every poll.
    pub async fn run_states(&self, keys: &Keys, ids: &[&str]) -> RedisResult<Vec<Option<String>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGET").arg(keys.task_raw(id)).arg("status");
        }
        let mut conn = self.redis.conn().await?;
        pipe.query_async(&mut conn).await
    }

    /// Ids still in this worker's in-flight list; a ticket ([`crate::keys::TICKET`]) there is one
    /// a blocking wait moved and no fetch spent (yet): [`Self::return_unstarted`] puts it back.
    pub async fn inflight_ids(&self, keys: &Keys, worker_id: &str) -> RedisResult<Vec<String>> {
        let mut conn = self.redis.conn().await?;
        conn.lrange(keys.inflight(worker_id), 0, -1).await
    }

    /// Finds workers whose heartbeat expired and gives their in-flight tasks back to pending.
    /// Returns (worker id, tasks recovered) for each worker recovered.
    pub async fn recover_lost_workers(
        &self,
        keys: &Keys,
        self_id: &str,
    ) -> RedisResult<Vec<(String, u64)>> {
        let mut conn = self.redis.conn().await?;
        let workers: Vec<String> = conn.smembers(keys.workers()).await?;
        let mut recovered = Vec::new();
        for w in workers.into_iter().filter(|w| w != self_id) {
            // the list is read first, so the keys its ids reach are declared; the script refuses
            // (-2) a list that changed since, and it is read again (only a worker that came back
            // to life changes it, and then the heartbeat answers -1)
            for _ in 0..3 {
                let alive: bool = conn.exists(keys.heartbeat(&w)).await?;
                if alive {
                    break;
                }
                let ids: Vec<String> = conn.lrange(keys.inflight(&w), 0, -1).await?;
                let tasks: Vec<String> = ids
                    .iter()
                    .filter(|id| id.as_str() != crate::keys::TICKET)
                    .cloned()
                    .collect();
                let routes = declare::routes(&mut conn, keys, &tasks).await?;
                let mut declared = declare::Declared::default();
                for (id, route) in tasks.iter().zip(&routes) {
                    declared.task(keys, id, route);
                }
                declared.key(keys.ring()).key(keys.running());
                let mut inv = SCRIPTS.recover.prepare_invoke();
                inv.key(keys.heartbeat(&w))
                    .key(keys.inflight(&w))
                    .key(keys.pending())
                    .key(keys.workers())
                    .key(keys.active());
                declared.to(&mut inv);
                inv.arg(&w);
                for id in &ids {
                    inv.arg(id);
                }
                let n: i64 = inv.invoke_async(&mut conn).await?;
                if n >= 0 {
                    recovered.push((w, n as u64));
                    break;
                }
                if n == -1 {
                    break;
                }
            }
        }
        Ok(recovered)
    }

    /// The agent's recent messages (JSON strings), oldest first.
    pub async fn memory(
        &self,
        keys: &Keys,
        agent_id: &str,
        keep: usize,
    ) -> RedisResult<Vec<String>> {
        if keep == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.redis.conn().await?;
        conn.lrange(keys.memory(agent_id), -(keep as isize), -1)
            .await
    }
}
