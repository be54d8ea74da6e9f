//! The keys a script reaches through a task's record, declared in its `KEYS` (script.rs).
//!
//! Some scripts act on ids they find in a list or a set (due retries, a lost worker's in-flight
//! ids, dead tasks) and on keys those ids' records name: the tenant's line, the workflow, the
//! batch. Those fields are written when the task is created and never change, so the caller
//! reads them first (one pipelined `HMGET`), declares the keys they name, and passes the ids it
//! read; the script acts only on those ids, each still checked where it stands now. An id that
//! came after the read waits for the next call.

use std::collections::BTreeSet;

use redis::{RedisResult, ScriptInvocation};

use crate::keys::Keys;
use crate::redis_conn::Conn;

/// A task's fields that name other keys (absent: the default tenant, no workflow, no batch).
#[derive(Debug, Default, Clone)]
pub(crate) struct Route {
    pub tenant: Option<String>,
    pub wf: Option<String>,
    pub batch: Option<String>,
}

/// The routes of `ids` (a record that is gone reads as the default route), in order.
pub(crate) async fn routes(
    conn: &mut Conn,
    keys: &Keys,
    ids: &[String],
) -> RedisResult<Vec<Route>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HMGET")
            .arg(keys.task_raw(id))
            .arg("tenant")
            .arg("wf")
            .arg("batch");
    }
    let rows: Vec<(Option<String>, Option<String>, Option<String>)> =
        pipe.query_async(conn).await?;
    Ok(rows
        .into_iter()
        .map(|(tenant, wf, batch)| Route { tenant, wf, batch })
        .collect())
}

/// A set of keys to declare, each once.
#[derive(Default)]
pub(crate) struct Declared(BTreeSet<String>);

impl Declared {
    pub fn key(&mut self, k: String) -> &mut Self {
        self.0.insert(k);
        self
    }

    /// What a task's fair-queue moves reach: its record, its stream, its tenant's line, and the
    /// default tenant's line too (a record gone between the caller's read and the script reads
    /// as the default tenant's), plus its workflow's and its batch's keys when it has them.
    pub fn task(&mut self, keys: &Keys, id: &str, route: &Route) -> &mut Self {
        self.key(keys.task_raw(id))
            .key(keys.task_events_raw(id))
            .key(keys.line(route.tenant.as_deref()))
            .key(keys.line(None));
        if let Some(wf) = &route.wf {
            self.key(wf.clone()).key(format!("{wf}:events"));
        }
        if let Some(b) = &route.batch {
            self.key(b.clone());
        }
        self
    }

    /// Appends the keys to a script's `KEYS`, after the ones it reads by position.
    pub fn to(&self, inv: &mut ScriptInvocation<'_>) {
        for k in &self.0 {
            inv.key(k);
        }
    }
}

/// Declares what a workflow's bookkeeping (graph/wf.lua) may reach when one of its nodes ends or
/// the workflow is cancelled: the workflow's keys, every node's record and stream, the lanes of
/// the nodes' agents, the tenant's line, and the queue's lists a cancelled node leaves. Returns
/// the workflow's `nodes` as read: the script compares it with the field now and, when a plan
/// spawned children since, writes nothing and answers so (the caller reads again).
pub(crate) async fn workflow(
    conn: &mut Conn,
    keys: &Keys,
    wf: &str,
    d: &mut Declared,
) -> RedisResult<String> {
    let (nodes, tenant): (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(wf)
        .arg("nodes")
        .arg("tenant")
        .query_async(conn)
        .await?;
    let nodes = nodes.unwrap_or_default();
    let names: Vec<&str> = nodes.split_whitespace().collect();
    if !names.is_empty() {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(wf);
        for n in &names {
            cmd.arg(format!("t:{n}")).arg(format!("a:{n}"));
        }
        let fields: Vec<Option<String>> = cmd.query_async(conn).await?;
        for pair in fields.chunks(2) {
            if let Some(Some(task)) = pair.first() {
                d.key(keys.task_raw(task)).key(keys.task_events_raw(task));
            }
            if let Some(Some(agent)) = pair.get(1) {
                if !agent.is_empty() {
                    d.key(keys.lane(agent));
                }
            }
        }
    }
    d.key(wf.to_owned())
        .key(format!("{wf}:events"))
        .key(format!("{wf}:holds"))
        .key(keys.line(tenant.as_deref()))
        .key(keys.line(None))
        .key(keys.pending())
        .key(keys.ring())
        .key(keys.lanes())
        .key(keys.recent())
        .key(keys.running())
        .key(keys.delayed())
        .key(keys.active())
        .key(keys.throttled())
        .key(keys.waiting());
    Ok(nodes)
}
