//! Enqueueing a group of tasks of one queue with few script calls (`enqueue_many.lua`): the
//! items of `POST /v1/tasks/batch`, and the api's group commit of concurrent `POST /v1/tasks`
//! ([`super::GroupCommit`]). Each item is decided on its own, exactly as a single enqueue
//! (`enqueue_item.lua` is the one step both run).

use std::sync::LazyLock;
use std::time::Duration;

use redis::{RedisResult, Script};

use super::{Broker, Enqueued};
use crate::keys::TaskId;
use crate::script::declared;
use crate::task::NewTask;
use crate::time::now_ms;

/// Items per script call. A call blocks Redis for its whole run (about 4 µs per item here), so a
/// 1,000-task batch goes as several calls sent back to back on the one connection (pipelined),
/// which keeps other clients' commands from waiting behind one long script while the per-call
/// cost (EVALSHA's dispatch, the reply) is still spread over many items.
pub const ITEMS_PER_CALL: usize = 100;

static ENQUEUE_MANY: LazyLock<Script> = LazyLock::new(|| {
    declared(concat!(
        include_str!("fair.lua"),
        include_str!("enqueue_item.lua"),
        include_str!("enqueue_many.lua")
    ))
});

/// Replicas an acknowledged enqueue waits for (`AGENTQ_ENQUEUE_REPLICAS`,
/// `AGENTQ_ENQUEUE_REPLICA_TIMEOUT_MS`): with Redis's asynchronous replication, a master lost
/// right after it answered takes unreplicated writes with it; `WAIT` after the write closes that
/// window for what the api acknowledges (see README "Redis Cluster" for what it does not cover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaWait {
    pub replicas: u32,
    pub timeout: Duration,
}

/// One task of a group: the validated task and its idempotency key (already scoped to its
/// tenant, as `tenant::idempotency_key` makes it).
#[derive(Debug, Clone)]
pub struct EnqueueItem {
    pub task: NewTask,
    pub idempotency_key: Option<String>,
}

impl Broker {
    /// Enqueues `items`, all of `queue`, in order, with `ITEMS_PER_CALL` items per script call and
    /// the calls sent together. Returns each item's id and outcome in the items' order. An error
    /// means some calls may have landed and others not (each item is still all or nothing):
    /// items with an idempotency key can be sent again safely.
    pub async fn enqueue_many(
        &self,
        queue: &str,
        items: &[EnqueueItem],
        ttl: Duration,
    ) -> RedisResult<Vec<(String, Enqueued)>> {
        let created = now_ms();
        let mut ids = Vec::with_capacity(items.len());
        for _ in items {
            let id = TaskId::generate(queue).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Client, "bad queue", e.to_string()))
            })?;
            ids.push(id.to_string());
        }
        let mut calls = Vec::with_capacity(items.len().div_ceil(ITEMS_PER_CALL));
        for (chunk, chunk_ids) in items.chunks(ITEMS_PER_CALL).zip(ids.chunks(ITEMS_PER_CALL)) {
            calls.push(self.enqueue_call(queue, chunk, chunk_ids, created, ttl)?);
        }
        let mut conn = self.write_conn().await?;
        // The multiplexed connection writes concurrent calls back to back: one round trip's wait
        // for all of them.
        let replies = futures::future::try_join_all(calls.iter().map(|inv| {
            let mut conn = conn.clone();
            async move { inv.invoke_async::<Vec<redis::Value>>(&mut conn).await }
        }))
        .await?;
        // one WAIT for the whole group: it covers every write sent on the connection before it
        self.replicated(&mut conn, &self.keys(queue).pending())
            .await?;
        let mut out = Vec::with_capacity(items.len());
        let mut ids = ids.into_iter();
        for (reply, chunk) in replies.iter().zip(items.chunks(ITEMS_PER_CALL)) {
            let Some((codes, values)) = reply.split_first() else {
                return Err(unexpected());
            };
            let codes: String = redis::from_redis_value_ref(codes)?;
            if codes.len() != chunk.len() {
                return Err(unexpected());
            }
            let mut values = values.iter();
            let mut value = || -> RedisResult<String> {
                Ok(redis::from_redis_value_ref(
                    values.next().ok_or_else(unexpected)?,
                )?)
            };
            for code in codes.bytes() {
                let id = ids.next().ok_or_else(unexpected)?;
                out.push(match code {
                    b'1' => (id, Enqueued::Created),
                    b'2' => (
                        id,
                        Enqueued::OverQuota {
                            pending: value()?.parse().unwrap_or(0),
                        },
                    ),
                    _ => (value()?, Enqueued::Existing),
                });
            }
        }
        Ok(out)
    }

    /// The connection enqueues are written on: the replica-waiting one when there is one.
    pub(crate) async fn write_conn(&self) -> RedisResult<crate::redis_conn::Conn> {
        match &self.durable {
            Some(d) => d.0.conn().await,
            None => self.redis.conn().await,
        }
    }

    /// With a replica wait configured: `WAIT` on `conn` (which carried the write) at the node of
    /// `key`; fewer replicas than asked within the timeout is an error, so the api answers 503
    /// and the client resends (with its Idempotency-Key, the same task). The write itself stays:
    /// it may still reach the replica, and it runs unless its master is lost first.
    pub(crate) async fn replicated(
        &self,
        conn: &mut crate::redis_conn::Conn,
        key: &str,
    ) -> RedisResult<()> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        let wait = d.1;
        let acked = conn.wait_replicas(key, wait.replicas, wait.timeout).await?;
        if acked < wait.replicas {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "enqueue not acknowledged by enough replicas",
                format!(
                    "{acked} of {} within {} ms",
                    wait.replicas,
                    wait.timeout.as_millis()
                ),
            )));
        }
        Ok(())
    }

    fn enqueue_call(
        &self,
        queue: &str,
        items: &[EnqueueItem],
        ids: &[String],
        created: i64,
        ttl: Duration,
    ) -> RedisResult<redis::ScriptInvocation<'static>> {
        let keys = self.keys(queue);
        // The usual max_attempts and tenant (the first item's) ride once in the header; an item
        // that differs, or has an idempotency key or an agent, carries its own (enqueue_many.lua).
        let usual = items.first().map(|i| {
            (
                i.task.max_attempts,
                crate::tenant::non_default(i.task.payload.tenant.as_deref()).unwrap_or(""),
            )
        });
        let (usual_attempts, usual_tenant) = usual.unwrap_or((1, ""));
        fn tenant_of(item: &EnqueueItem) -> Option<&str> {
            crate::tenant::non_default(item.task.payload.tenant.as_deref())
        }
        // lanes are per tenant: two tenants' agents of one name never wait on each other
        let agent_keys: Vec<_> = items.iter().map(|i| i.task.payload.agent_key()).collect();
        let usual: Vec<bool> = items
            .iter()
            .zip(&agent_keys)
            .map(|(item, agent_key)| {
                item.task.max_attempts == usual_attempts
                    && tenant_of(item).unwrap_or("") == usual_tenant
                    && item.idempotency_key.is_none()
                    && agent_key.is_none()
            })
            .collect();
        let flags: String = usual.iter().map(|&u| if u { '0' } else { '1' }).collect();
        let mut inv = ENQUEUE_MANY.prepare_invoke();
        inv.key(keys.pending()).key(keys.lanes());
        inv.arg(queue)
            .arg(created)
            .arg(ttl.as_secs().max(1))
            .arg(usual_attempts)
            .arg(usual_tenant)
            .arg(flags);
        let task_prefix = keys.task_prefix();
        for (((item, id), agent_key), usual) in items.iter().zip(ids).zip(&agent_keys).zip(usual) {
            let payload = serde_json::to_string(&item.task.payload).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Client, "payload", e.to_string()))
            })?;
            inv.key(format!("{task_prefix}{id}"));
            inv.arg(id.as_str()).arg(payload);
            if usual {
                continue;
            }
            if let Some(k) = &item.idempotency_key {
                inv.key(keys.idempotency(k));
            }
            if let Some(a) = agent_key.as_deref() {
                inv.key(keys.lane(a));
            }
            inv.arg(item.task.max_attempts)
                .arg(if item.idempotency_key.is_some() {
                    "1"
                } else {
                    "0"
                })
                .arg(agent_key.as_deref().unwrap_or(""))
                .arg(tenant_of(item).unwrap_or(""));
        }
        // what enqueue_item.lua reaches from the queue's base, after the items' keys (the script
        // reads those in order and never counts KEYS): each tenant's line once, the ring,
        // `tenants` and `recent`
        let mut lines: Vec<&str> = items.iter().map(|i| tenant_of(i).unwrap_or("")).collect();
        lines.sort_unstable();
        lines.dedup();
        for t in lines {
            inv.key(keys.line(Some(t)));
        }
        inv.key(keys.ring()).key(keys.tenants()).key(keys.recent());
        Ok(inv)
    }
}

fn unexpected() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "enqueue_many's answer does not match its items",
    ))
}
