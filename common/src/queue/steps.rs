//! The steps of an agent run. A step whose server-side (MCP) tools ran is recorded by
//! `step.lua` and the run goes on. A step that waits for a client: a model reply asking for client-side tools
//! suspends the task (`suspend.lua`: status `requires_action`, no worker slot held), the client's
//! outputs resume it (`resume.lua`), and outputs that never come fail it (`tool_timeout.lua`).
//! Each step is appended to the task's `transcript` (messages as JSON, one per line) in the same
//! script that records it, so a later run continues from there and repeats no call already made.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, RedisResult, Script};

use super::declare::Declared;
use super::{Broker, UsageAdd};
use crate::keys::Keys;
use crate::redis_conn::Conn;
use crate::script::declared;
use crate::time::now_ms;

struct Scripts {
    lane_release: Script,
    step: Script,
    suspend: Script,
    resume: Script,
    tool_timeout: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    step: declared(concat!(
        include_str!("events.lua"),
        include_str!("usage_add.lua"),
        include_str!("step.lua")
    )),
    // fair.lua: a queued id goes to its tenant's line, and an ended run is counted off (see mod.rs)
    lane_release: declared(concat!(
        include_str!("fair.lua"),
        include_str!("lane.lua"),
        include_str!("lane_release.lua")
    )),
    suspend: declared(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("fence.lua"),
        include_str!("usage_add.lua"),
        include_str!("suspend.lua")
    )),
    resume: declared(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("resume.lua")
    )),
    tool_timeout: declared(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("../graph/wf.lua"),
        include_str!("tool_timeout.lua")
    )),
});

/// The task hash field holding the steps' messages (JSON, one per line).
pub const TRANSCRIPT_FIELD: &str = "transcript";
/// The task hash field holding the tool calls a `requires_action` task waits for (JSON array).
pub const PENDING_FIELD: &str = "pending_tool_calls";

/// A step that waits for the client: what `suspend.lua` records.
pub struct Suspend<'a> {
    /// The step's messages (the assistant's reply with its tool calls), JSON each.
    pub messages: &'a [String],
    /// The calls the client must answer (JSON array, as the task view shows them).
    pub pending: &'a str,
    /// When the outputs are due (ms since the epoch).
    pub due_ms: i64,
    pub usage: Option<&'a UsageAdd>,
}

/// What submitting tool outputs did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    Queued,
    Missing,
    /// Another submission answered these calls first.
    Changed,
    /// The task is not waiting for tool outputs; its status.
    NotWaiting(String),
}

/// How many entries of a lane [`Broker::lane_release`] reads at once, and how many times it
/// reads before leaving the rest to the next release or sweep.
const LANE_READ: usize = 32;
const LANE_READS: usize = 8;

/// The keys a script reaches through one task's record (its stream, its tenant's line, its
/// workflow's), read first (declare.rs).
async fn declared_task(conn: &mut Conn, keys: &Keys, id: &str) -> RedisResult<Declared> {
    let ids = [id.to_string()];
    let route = super::declare::routes(conn, keys, &ids)
        .await?
        .into_iter()
        .next()
        .unwrap_or_default();
    let mut declared = Declared::default();
    declared.task(keys, id, &route);
    Ok(declared)
}

impl Broker {
    /// Records a step of a run that goes on (server-side tools ran), fenced by the run's token.
    /// Returns `ok`, or why nothing was written (`stale`, `cancelled`, ...; see `step.lua`).
    pub async fn step(
        &self,
        keys: &Keys,
        id: &str,
        token: &str,
        messages: &[String],
        usage: Option<&UsageAdd>,
    ) -> RedisResult<String> {
        let mut conn = self.redis.conn().await?;
        SCRIPTS
            .step
            .key(keys.task_raw(id))
            .key(keys.task_events_raw(id))
            .arg(token)
            .arg(messages.join("\n"))
            .arg(UsageAdd::script_arg(usage))
            .invoke_async(&mut conn)
            .await
    }

    /// Records a step that waits for client-side tools, fenced by the run's token. Returns the
    /// verdict: `requires_action`, or why nothing was written (see `fence.lua`).
    pub async fn suspend(
        &self,
        keys: &Keys,
        worker_id: &str,
        id: &str,
        token: &str,
        step: &Suspend<'_>,
    ) -> RedisResult<String> {
        let mut conn = self.redis.conn().await?;
        // the task's stream, and its workflow's when it is a node (the status event goes there)
        let declared = declared_task(&mut conn, keys, id).await?;
        let mut inv = SCRIPTS.suspend.prepare_invoke();
        inv.key(keys.task_raw(id))
            .key(keys.inflight(worker_id))
            .key(keys.active())
            .key(keys.waiting())
            .key(keys.running());
        declared.to(&mut inv);
        inv.arg(id)
            .arg(token)
            .arg(now_ms())
            .arg(step.messages.join("\n"))
            .arg(step.pending)
            .arg(step.due_ms)
            .arg(UsageAdd::script_arg(step.usage))
            .invoke_async(&mut conn)
            .await
    }

    /// A task's transcript: the messages of its recorded steps, oldest first (lines that do not
    /// parse are skipped: a half-broken record must still run).
    pub async fn transcript(&self, keys: &Keys, id: &str) -> RedisResult<Vec<String>> {
        let mut conn = self.redis.conn().await?;
        let raw: Option<String> = redis::cmd("HGET")
            .arg(keys.task_raw(id))
            .arg(TRANSCRIPT_FIELD)
            .query_async(&mut conn)
            .await?;
        Ok(raw
            .map(|r| r.lines().map(str::to_owned).collect())
            .unwrap_or_default())
    }

    /// The status and pending tool calls of a task, for checking submitted outputs.
    pub async fn pending_tool_calls(
        &self,
        keys: &Keys,
        id: &str,
    ) -> RedisResult<(Option<String>, Option<String>)> {
        let mut conn = self.redis.conn().await?;
        redis::cmd("HMGET")
            .arg(keys.task_raw(id))
            .arg("status")
            .arg(PENDING_FIELD)
            .query_async(&mut conn)
            .await
    }

    /// Appends the client's tool outputs and queues the task again, if it still waits for
    /// exactly the calls `pending` names.
    pub async fn resume(
        &self,
        keys: &Keys,
        id: &str,
        pending: &str,
        messages: &[String],
    ) -> RedisResult<Resumed> {
        let mut conn = self.redis.conn().await?;
        // its tenant's line (it is queued again), its stream and its workflow's
        let mut declared = declared_task(&mut conn, keys, id).await?;
        declared.key(keys.ring());
        let mut inv = SCRIPTS.resume.prepare_invoke();
        inv.key(keys.task_raw(id))
            .key(keys.waiting())
            .key(keys.pending());
        declared.to(&mut inv);
        let out: String = inv
            .arg(id)
            .arg(pending)
            .arg(messages.join("\n"))
            .invoke_async(&mut conn)
            .await?;
        Ok(match out.as_str() {
            "ok" => Resumed::Queued,
            "missing" => Resumed::Missing,
            "changed" => Resumed::Changed,
            other => Resumed::NotWaiting(other.to_owned()),
        })
    }

    /// Moves an agent's lane on after one of its tasks became final: its next task may run.
    pub async fn lane_release(&self, keys: &Keys, agent_id: &str) -> RedisResult<()> {
        let mut conn = self.redis.conn().await?;
        // The script walks the lane from its head, dropping final tasks, up to the first live
        // one; it reaches each head's record and tenant line, so the caller reads the lane's
        // first entries and their routes first. A lane longer in final tasks than one read, or
        // changed since, answers 2 and is read again.
        for _ in 0..LANE_READS {
            let ids: Vec<String> = conn
                .lrange(keys.lane(agent_id), 0, LANE_READ as isize - 1)
                .await?;
            let routes = super::declare::routes(&mut conn, keys, &ids).await?;
            let mut declared = Declared::default();
            for (id, route) in ids.iter().zip(&routes) {
                declared.task(keys, id, route);
            }
            declared.key(keys.ring());
            let mut inv = SCRIPTS.lane_release.prepare_invoke();
            inv.key(keys.lane(agent_id))
                .key(keys.pending())
                .key(keys.lanes());
            declared.to(&mut inv);
            inv.arg(agent_id);
            for id in &ids {
                inv.arg(id);
            }
            let left: i64 = inv.invoke_async(&mut conn).await?;
            if left != 2 {
                break;
            }
        }
        Ok(())
    }

    /// One step of the lanes backstop: moves on up to about `count` lanes from `cursor`; returns
    /// the next cursor (0 when a pass over every lane is done).
    pub async fn lane_sweep(&self, keys: &Keys, cursor: u64, count: usize) -> RedisResult<u64> {
        let mut conn = self.redis.conn().await?;
        let (next, agents): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(keys.lanes())
            .arg(cursor)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await?;
        if agents.is_empty() {
            return Ok(next);
        }
        // Most lanes need nothing: their head is live and already runnable. Their heads and
        // those heads' records are read in two pipelined round trips, and only a lane that is
        // empty, or whose head is final, gone or not yet runnable, is released.
        let mut pipe = redis::pipe();
        for agent in &agents {
            pipe.cmd("LINDEX").arg(keys.lane(agent)).arg(0);
        }
        let heads: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
        let mut pipe = redis::pipe();
        for head in heads.iter().flatten() {
            pipe.cmd("HMGET")
                .arg(keys.task_raw(head))
                .arg("status")
                .arg("lane_ready");
        }
        let states: Vec<(Option<String>, Option<String>)> = if heads.iter().any(Option::is_some) {
            pipe.query_async(&mut conn).await?
        } else {
            Vec::new()
        };
        let mut states = states.into_iter();
        for (agent, head) in agents.iter().zip(&heads) {
            let stuck = match head {
                None => true,
                Some(_) => match states.next() {
                    Some((Some(status), ready)) => {
                        matches!(status.as_str(), "succeeded" | "failed" | "cancelled")
                            || ready.is_none()
                    }
                    _ => true,
                },
            };
            if stuck {
                self.lane_release(keys, agent).await?;
            }
        }
        Ok(next)
    }

    /// Fails the tasks whose tool outputs are overdue; returns how many.
    pub async fn expire_tool_waits(
        &self,
        keys: &Keys,
        ttl: Duration,
        limit: usize,
    ) -> RedisResult<u64> {
        let mut conn = self.redis.conn().await?;
        let now = now_ms();
        // the due ids and what their records name are read first (declare.rs)
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys.waiting())
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await?;
        if due.is_empty() {
            return Ok(0);
        }
        let routes = super::declare::routes(&mut conn, keys, &due).await?;
        let mut declared = Declared::default();
        let mut snapshots: std::collections::HashMap<String, String> = Default::default();
        for (id, route) in due.iter().zip(&routes) {
            declared.task(keys, id, route);
            if let Some(wf) = &route.wf {
                if !snapshots.contains_key(wf) {
                    let nodes =
                        super::declare::workflow(&mut conn, keys, wf, &mut declared).await?;
                    snapshots.insert(wf.clone(), nodes);
                }
            }
        }
        let mut inv = SCRIPTS.tool_timeout.prepare_invoke();
        inv.key(keys.waiting()).key(keys.dead());
        declared.to(&mut inv);
        inv.arg(now).arg(ttl.as_secs().max(1));
        for (id, route) in due.iter().zip(&routes) {
            let nodes = route
                .wf
                .as_ref()
                .and_then(|wf| snapshots.get(wf))
                .map_or("", String::as_str);
            inv.arg(id).arg(nodes);
        }
        inv.invoke_async(&mut conn).await
    }
}
