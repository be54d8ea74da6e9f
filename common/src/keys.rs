//! Every Redis key agentq uses is built here, and nowhere else.
//!
//! Layout: `<prefix>:{<queue>}:<name>`. The `{<queue>}` part is a Redis Cluster hash tag, so every
//! key of one queue (its lists, sets and task records) hashes to the same slot and one Lua script
//! may touch all of them. Task ids carry their queue (`<queue>.<uuid>`) so a task's key can be
//! found from its id alone.

use std::fmt;

/// Longest queue name accepted; keeps keys and metric labels short.
pub const MAX_QUEUE_LEN: usize = 64;
/// Most entries a queue's `recent` index keeps (the newest; `enqueue.lua` and `wf.lua` trim it in
/// the step that adds one, and hard-code the same number). About 160 bytes of Redis memory each
/// (1.6 MB when full).
pub const RECENT_CAP: usize = 10_000;

/// Why a queue name or task id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("queue name must be 1 to 64 characters of [A-Za-z0-9_-]")]
    BadQueue,
    #[error("task id must look like <queue>.<uuid>")]
    BadTaskId,
}

/// Checks a queue name: it lands in Redis keys, URLs and metric labels, so the alphabet is small.
pub fn validate_queue(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_QUEUE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::BadQueue)
    }
}

/// A task id: `<queue>.<uuid v7>`. Time-ordered, unique, and it names its queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskId {
    queue: String,
    uuid: uuid::Uuid,
}

impl TaskId {
    pub fn generate(queue: &str) -> Result<Self, NameError> {
        validate_queue(queue)?;
        Ok(Self {
            queue: queue.to_owned(),
            uuid: uuid::Uuid::now_v7(),
        })
    }

    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (queue, uuid) = s.rsplit_once('.').ok_or(NameError::BadTaskId)?;
        validate_queue(queue).map_err(|_| NameError::BadTaskId)?;
        let uuid = uuid::Uuid::try_parse(uuid).map_err(|_| NameError::BadTaskId)?;
        Ok(Self {
            queue: queue.to_owned(),
            uuid,
        })
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.queue, self.uuid.hyphenated())
    }
}

/// Key builder for one queue under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    base: String,
}

impl Keys {
    /// `queue` must already be valid (see [`validate_queue`]).
    pub fn new(prefix: &str, queue: &str) -> Self {
        Self {
            base: format!("{prefix}:{{{queue}}}"),
        }
    }

    /// LIST of tickets ([`TICKET`]), one per task id waiting in any tenant's line
    /// ([`Self::tenant_pending`]), so its LLEN is the queue's pending work: the key KEDA's redis
    /// scaler watches (`listName`) and the one a worker's blocking wait (BLMOVE) watches.
    /// `fetch.lua` spends each ticket on the tenant whose turn it is (`common/src/queue/fair.lua`).
    pub fn pending(&self) -> String {
        format!("{}:pending", self.base)
    }

    /// LIST of one tenant's task ids waiting to run in this queue: LPUSH at the back, RPUSH at the
    /// head (give-backs, parked turns), taken from the right: FIFO within the tenant.
    pub fn tenant_pending(&self, tenant: &str) -> String {
        format!("{}{tenant}", self.tenant_pending_prefix())
    }

    /// The line of a task's tenant as its record names it: `None` (or "") is the default
    /// tenant's (records of the default tenant carry no `tenant` field).
    pub fn line(&self, tenant: Option<&str>) -> String {
        match tenant {
            Some(t) if !t.is_empty() => self.tenant_pending(t),
            _ => self.tenant_pending(crate::tenant::DEFAULT_TENANT),
        }
    }

    /// `tenant_pending(t)` without the tenant.
    pub fn tenant_pending_prefix(&self) -> String {
        format!("{}:pending:", self.base)
    }

    /// LIST of the tenants whose line ([`Self::tenant_pending`]) is not empty, each once, in turn
    /// order (the head, at the left, is served next).
    pub fn ring(&self) -> String {
        format!("{}:ring", self.base)
    }

    /// HASH tenant → turns the ring's head tenant has taken in its current visit (only tenants
    /// of weight above 1 have a field, and only mid-visit).
    pub fn turns(&self) -> String {
        format!("{}:turns", self.base)
    }

    /// HASH tenant → the tenant's runs in flight in this queue (started by `fetch.lua`, counted
    /// off by whichever script removes the run's token), for `max_running`.
    pub fn running(&self) -> String {
        format!("{}:running", self.base)
    }

    /// HASH of the tenants' admission in this queue: `w:<tenant>` weight, `p:<tenant>` most
    /// pending, `r:<tenant>` most running (absent: weight 1, no cap). Written by the api.
    pub fn tenants(&self) -> String {
        format!("{}:tenants", self.base)
    }

    /// ZSET of task ids being run (member id, score = start time in ms). Its ZCARD is the queue's
    /// in-flight count, which KEDA's second trigger reads.
    pub fn active(&self) -> String {
        format!("{}:active", self.base)
    }

    /// ZSET of task ids waiting for a retry (score = due time in ms).
    pub fn delayed(&self) -> String {
        format!("{}:delayed", self.base)
    }

    /// ZSET of the queue's newest tasks for `GET /v1/tasks` (the web console's task search):
    /// member `<task id>~<tenant>~<agent id>` (tenant and agent empty when absent), all scores
    /// 0, so it sorts by id, and a UUID v7 id sorts by creation time. Written and capped at
    /// [`RECENT_CAP`] by the scripts that create tasks (`enqueue.lua`, workflow nodes).
    pub fn recent(&self) -> String {
        format!("{}:recent", self.base)
    }

    /// ZSET of dead-lettered task ids (score = time of death in ms).
    pub fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }

    /// SET of worker ids that registered on this queue (pruned when a dead worker is recovered).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.base)
    }

    /// STRING with a TTL: present while the worker is alive.
    pub fn heartbeat(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.base)
    }

    /// LIST of the task ids one worker has taken (its reliable-fetch in-flight list).
    pub fn inflight(&self, worker_id: &str) -> String {
        format!("{}:inflight:{worker_id}", self.base)
    }

    /// HASH with one task's record.
    pub fn task(&self, id: &TaskId) -> String {
        format!("{}{id}", self.task_prefix())
    }

    /// STREAM of one task's events (SSE, `GET /v1/tasks/{id}/events`): `<task key>:events`,
    /// written by the scripts that change the task (`queue/events.lua`).
    pub fn task_events(&self, id: &TaskId) -> String {
        format!("{}:events", self.task(id))
    }

    /// STREAM of one workflow's events: its status and its nodes' status changes.
    pub fn workflow_events(&self, id: &str) -> String {
        format!("{}:events", self.workflow(id))
    }

    /// The record key of an id as read off one of this queue's lists, valid or not (a malformed
    /// id is still dead-lettered through its key). The key starts with this queue's hash tag, so
    /// it is in the queue's slot whatever the id holds.
    pub fn task_raw(&self, id: &str) -> String {
        format!("{}:task:{id}", self.base)
    }

    /// `task_events` of an id as read off a list or given by a worker (see [`Self::task_raw`]).
    pub fn task_events_raw(&self, id: &str) -> String {
        format!("{}:task:{id}:events", self.base)
    }

    /// Scripts build task keys from ids they read off lists; they get this prefix to do it.
    pub fn task_prefix(&self) -> String {
        format!("{}:task:", self.base)
    }

    /// STRING mapping an `Idempotency-Key` to the task id it created.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.base)
    }

    /// ZSET of task ids the flow limiter parked (score = when the limit allows them, in ms):
    /// outside `pending`, so the workers and KEDA see only work that can run now.
    pub fn throttled(&self) -> String {
        format!("{}:throttled", self.base)
    }

    /// ZSET of task ids waiting for a client's tool outputs (status `requires_action`; score =
    /// when the outputs are due, in ms): outside `pending` and `active`, so they hold no worker
    /// and KEDA does not count them.
    pub fn waiting(&self) -> String {
        format!("{}:waiting", self.base)
    }

    /// LIST of an agent's tasks that are not final, in enqueue order: only the head may run.
    pub fn lane(&self, agent_id: &str) -> String {
        format!("{}{agent_id}", self.lane_prefix())
    }

    /// `lane(a)` without the agent id, for the sweep that walks every lane.
    pub fn lane_prefix(&self) -> String {
        format!("{}:lane:", self.base)
    }

    /// SET of the agents whose lane holds a task.
    pub fn lanes(&self) -> String {
        format!("{}:lanes", self.base)
    }

    /// `<prefix>:{<queue>}:`: the start of every key of the queue, for scripts that build the
    /// keys of records they reach through another record (workflow nodes).
    pub fn base(&self) -> String {
        format!("{}:", self.base)
    }

    /// HASH with one workflow's state (its nodes, their states, counters and outputs; see
    /// `common/src/graph/wf.lua`). A workflow id looks like a task id: `<queue>.<uuid>`.
    pub fn workflow(&self, id: &str) -> String {
        format!("{}:wf:{id}", self.base)
    }

    /// STRING mapping a `POST /v1/workflows` `Idempotency-Key` to the workflow it created.
    pub fn workflow_idempotency(&self, key: &str) -> String {
        format!("{}:wfidem:{key}", self.base)
    }

    /// LIST of an agent's recent messages (JSON), newest last.
    pub fn memory(&self, agent_id: &str) -> String {
        format!("{}:memory:{agent_id}", self.base)
    }

    /// HASH with one batch of the Batch API (`POST /v1/batches`): its OpenAI fields, the fan-out
    /// cursor, the request counts the queue scripts keep (`events.lua`), the finalizer's file ids.
    /// In the batch queue's slot, so one script fans a chunk of lines out as tasks.
    pub fn batch(&self, id: &str) -> String {
        format!("{}:batch:{id}", self.base)
    }

    /// LIST of a batch's task ids in input order (line i of the input file is element i).
    pub fn batch_tasks(&self, id: &str) -> String {
        format!("{}:tasks", self.batch(id))
    }

    /// STRING with a TTL: the api replica driving a batch (fan-out, cancel, finalize) holds it.
    pub fn batch_lease(&self, id: &str) -> String {
        format!("{}:lease", self.batch(id))
    }

    /// Pub/sub channel (not a key: nothing is stored) on which `cancel.lua` publishes the id of a
    /// task it took away from a running run, so the worker running it aborts the run's LLM call.
    pub fn cancels(&self) -> String {
        format!("{}:cancels", self.base)
    }
}

/// The element of a queue's `pending` list: one per task id waiting in a tenant's line. Never a
/// task id (ids are `<queue>.<uuid>`).
pub const TICKET: &str = "~";

/// SET of queue names that have seen a task, for the api's queue-depth gauges.
/// Written with single commands only (it is not in any queue's slot).
pub fn queues_registry(prefix: &str) -> String {
    format!("{prefix}:queues")
}

/// HASH with one file of the Batch API (`POST /v1/files`): OpenAI's file object fields, its
/// `status` (`uploading` until every line is stored), `lines`, and `charged` (bytes counted in
/// [`files_bytes`]). The `{<file id>}` hash tag keeps a file's keys in one slot.
pub fn file_meta(prefix: &str, id: &str) -> String {
    format!("{prefix}:file:{{{id}}}")
}

/// LIST of a file's JSONL lines, in order, without their newlines.
pub fn file_lines(prefix: &str, id: &str) -> String {
    format!("{}:lines", file_meta(prefix, id))
}

/// SET of the batches reading a file (its input): the file is not deleted while one is live.
pub fn file_users(prefix: &str, id: &str) -> String {
    format!("{}:users", file_meta(prefix, id))
}

/// ZSET of stored files (member id, score = created ms), for `GET /v1/files`. Single commands only.
pub fn files_index(prefix: &str) -> String {
    format!("{prefix}:files")
}

/// ZSET of files the api's loop must look at (score = when, ms): a file's expiry, or for an
/// upload in progress the time it counts as abandoned. Single commands only.
pub fn files_gc(prefix: &str) -> String {
    format!("{prefix}:files:gc")
}

/// STRING: the bytes every stored file is charged (`AGENTQ_FILES_MAX_TOTAL_BYTES` bounds it).
pub fn files_bytes(prefix: &str) -> String {
    format!("{prefix}:files:bytes")
}

/// HASH of each file's charge (file id -> bytes) in the same slot as [`files_bytes`] (its hash
/// tag is that key's whole name; the `<prefix>:files:` start keeps it under the api's ACL
/// pattern), so the total and the charges change together in one script
/// (`common/src/batch/file_charge.lua`) and a crash cannot leave them apart.
pub fn files_charges(prefix: &str) -> String {
    format!("{prefix}:files:charges:{{{}}}", files_bytes(prefix))
}

/// ZSET of batches with a record (member id, score = created ms), for `GET /v1/batches`.
pub fn batches_index(prefix: &str) -> String {
    format!("{prefix}:batches")
}

/// ZSET of batches not ended yet (score = created ms): walked by the api's loop, and its size is
/// what `AGENTQ_BATCHES_MAX` bounds.
pub fn batches_live(prefix: &str) -> String {
    format!("{prefix}:batches:live")
}

/// ZSET of ended batches by when their record expires (ms), to prune [`batches_index`].
pub fn batches_gc(prefix: &str) -> String {
    format!("{prefix}:batches:gc")
}

/// HASH with the flow limiter's state for a whole upstream (sliding-minute buckets and sums).
/// The `{<upstream>}` hash tag puts every limiter key of one upstream in one cluster slot.
pub fn limiter_upstream(prefix: &str, upstream: &str) -> String {
    format!("{prefix}:limiter:{{{upstream}}}")
}

/// HASH with the flow limiter's state for one model on an upstream: its window, the fleet-wide
/// block after a 429 (`blocked_until`) and limits learned from the upstream's headers.
pub fn limiter_model(prefix: &str, upstream: &str, model: &str) -> String {
    format!("{prefix}:limiter:{{{upstream}}}:model:{model}")
}

/// ZSET of concurrency leases of a limiter scope (member = lease id, score = expiry in ms).
pub fn limiter_leases(scope_key: &str) -> String {
    format!("{scope_key}:leases")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_files_charges_share_the_totals_slot() {
        use redis::cluster_routing::Slot;
        let (total, charges) = (files_bytes("agentq"), files_charges("agentq"));
        assert_eq!(charges, "agentq:files:charges:{agentq:files:bytes}");
        let slot = |k: &str| Slot::for_key(k.as_bytes());
        assert_eq!(slot(&total), slot(&charges));
        assert_ne!(slot(&total), slot(&file_meta("agentq", "file-abc")));
    }

    #[test]
    fn key_layout_is_stable() {
        let k = Keys::new("agentq", "default");
        assert_eq!(k.pending(), "agentq:{default}:pending");
        assert_eq!(k.tenant_pending("acme"), "agentq:{default}:pending:acme");
        assert_eq!(k.tenant_pending_prefix(), "agentq:{default}:pending:");
        assert_eq!(k.ring(), "agentq:{default}:ring");
        assert_eq!(k.turns(), "agentq:{default}:turns");
        assert_eq!(k.running(), "agentq:{default}:running");
        assert_eq!(k.tenants(), "agentq:{default}:tenants");
        // the scripts derive these from the pending key: `<base>pending` minus 7 characters
        assert_eq!(k.base(), &k.pending()[..k.pending().len() - 7]);
        assert_eq!(k.active(), "agentq:{default}:active");
        assert_eq!(k.delayed(), "agentq:{default}:delayed");
        assert_eq!(k.dead(), "agentq:{default}:dead");
        assert_eq!(k.workers(), "agentq:{default}:workers");
        assert_eq!(k.heartbeat("w1"), "agentq:{default}:worker:w1");
        assert_eq!(k.inflight("w1"), "agentq:{default}:inflight:w1");
        assert_eq!(k.memory("a"), "agentq:{default}:memory:a");
        assert_eq!(k.throttled(), "agentq:{default}:throttled");
        assert_eq!(k.waiting(), "agentq:{default}:waiting");
        assert_eq!(k.lane("a"), "agentq:{default}:lane:a");
        assert_eq!(k.lanes(), "agentq:{default}:lanes");
        assert_eq!(k.base(), "agentq:{default}:");
        assert_eq!(k.workflow("default.x"), "agentq:{default}:wf:default.x");
        assert_eq!(k.workflow_idempotency("k"), "agentq:{default}:wfidem:k");
        assert_eq!(k.cancels(), "agentq:{default}:cancels");
        assert_eq!(k.batch("batch_x"), "agentq:{default}:batch:batch_x");
        assert_eq!(
            k.batch_tasks("batch_x"),
            "agentq:{default}:batch:batch_x:tasks"
        );
        assert_eq!(
            k.batch_lease("batch_x"),
            "agentq:{default}:batch:batch_x:lease"
        );
        assert_eq!(file_meta("agentq", "file-1"), "agentq:file:{file-1}");
        assert_eq!(file_lines("agentq", "file-1"), "agentq:file:{file-1}:lines");
        assert_eq!(file_users("agentq", "file-1"), "agentq:file:{file-1}:users");
        assert_eq!(
            limiter_upstream("agentq", "openai"),
            "agentq:limiter:{openai}"
        );
        assert_eq!(
            limiter_model("agentq", "openai", "gpt-4o"),
            "agentq:limiter:{openai}:model:gpt-4o"
        );
        assert_eq!(
            limiter_leases("agentq:limiter:{openai}"),
            "agentq:limiter:{openai}:leases"
        );
        let id = TaskId::parse("default.0192f3a4-5b6c-7d8e-9f00-112233445566").expect("valid id");
        assert_eq!(
            k.task(&id),
            "agentq:{default}:task:default.0192f3a4-5b6c-7d8e-9f00-112233445566"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(validate_queue("").is_err());
        assert!(validate_queue("a.b").is_err());
        assert!(validate_queue("a}b").is_err());
        assert!(validate_queue(&"x".repeat(65)).is_err());
        assert!(TaskId::parse("nodot").is_err());
        assert!(TaskId::parse("q.not-a-uuid").is_err());
        assert!(TaskId::parse(".0192f3a4-5b6c-7d8e-9f00-112233445566").is_err());
    }

    proptest! {
        #[test]
        fn task_ids_round_trip(queue in "[A-Za-z0-9_-]{1,64}") {
            let id = TaskId::generate(&queue).expect("valid queue");
            let parsed = TaskId::parse(&id.to_string()).expect("own ids parse");
            prop_assert_eq!(parsed.queue(), queue.as_str());
            prop_assert_eq!(parsed, id);
        }

        #[test]
        fn parse_never_panics(s in ".{0,100}") {
            let _ = TaskId::parse(&s);
        }
    }
}
