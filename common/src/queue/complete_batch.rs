//! Completions recorded in groups: one `complete_many.lua` call for many runs' results
//! (docs/architecture.md, "The protocol", Complete).
//!
//! Why: during a drain each result was its own `EVALSHA` of `complete.lua` (a call, a reply, a
//! round trip and a wake-up on both sides per task). The worker's runs hand their result to a
//! [`CompleteBatcher`] and wait for their own verdict; a flusher takes whatever is waiting (up to
//! a count and a byte size) and writes it with one script call, in which every item passes
//! `complete.lua`'s fence on its own. While calls are in flight (at most [`MAX_IN_FLIGHT`]) the
//! next group gathers, so the groups grow with the load and an idle worker's single result goes
//! at once (no wait unless one is configured).
//!
//! Measured (loadtest/bench/README.md, "Batched completion"), the call itself was the smaller
//! part: most of Redis's time per result is the commands inside the script. So a plain result
//! (the drain's) also takes fewer of them: its id leaves `active` and its run is counted off
//! `running` with one command for the whole group. Any other result (agent memory, a workflow
//! node, a stream batch left unanswered) runs `complete.lua`'s own body inside the group.
//!
//! Nothing changes for crash safety: a run releases its slot only after its own verdict came
//! back, so a worker that dies before the call leaves the run in its in-flight list, recovered as
//! before; a call whose reply was lost is resent item by item, and each item's fence answers with
//! the verdict it already got.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::{ErrorKind, RedisError, RedisResult, Script};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{NodeDone, StreamRest, UsageAdd};
use crate::keys::Keys;
use crate::time::now_ms;
use crate::Broker;

// complete.lua as a function of its own KEYS and ARGV (parameters of that name shadow the
// script's globals), so the batch runs exactly the single report's body for each item: one copy
// of the rules, and a change to complete.lua is a change to both.
static COMPLETE_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("events.lua"),
        include_str!("fair.lua"),
        include_str!("../graph/wf.lua"),
        include_str!("fence.lua"),
        "local function complete_one(KEYS, ARGV)\n",
        include_str!("complete.lua"),
        "\nend\n",
        include_str!("complete_many.lua")
    ))
});

/// Most bytes of results one call carries (past the first item): a group of large answers is
/// split, so one reply of Redis never holds many megabytes and a call stays short.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Group calls in flight at once: while one is inside Redis the next is already on its way, so
/// a result waits behind at most one call, and the groups still grow with the load (a group
/// gathers while both are busy).
const MAX_IN_FLIGHT: usize = 2;

/// An agent's memory to append with a result (owned: it waits in the batcher's queue).
#[derive(Debug, Clone)]
pub struct MemoryWrite {
    /// The memory's key (`Payload::agent_key`: `<tenant>~<agent>` for a tenant's agent).
    pub agent_key: String,
    /// The exchange, one JSON message each.
    pub messages: Vec<String>,
    pub keep: usize,
    pub ttl: Duration,
}

/// One run's success, as [`super::Broker::complete`] takes it, owned.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub id: String,
    pub token: String,
    pub result_json: String,
    pub memory: Option<MemoryWrite>,
    pub usage: Option<UsageAdd>,
    pub node: Option<NodeDone>,
    pub rest: StreamRest,
}

impl Completion {
    /// The bytes it adds to a call, roughly (for [`MAX_BATCH_BYTES`]).
    fn size(&self) -> usize {
        self.result_json.len()
            + self.rest.text.len()
            + self.rest.unacked.as_ref().map_or(0, |(_, t)| t.len())
            + self
                .memory
                .as_ref()
                .map_or(0, |m| m.messages.iter().map(String::len).sum())
            + self.node.as_ref().map_or(0, |n| {
                n.output.len() + n.children.as_ref().map_or(0, String::len)
            })
    }

    /// A plain result (complete_many.lua's 'p' item): no memory, no workflow node, no stream
    /// batch left unanswered. The drain's every task is one.
    fn is_plain(&self) -> bool {
        self.memory.is_none() && self.node.is_none() && self.rest.unacked.is_none()
    }

    /// This item's arguments of complete_many.lua: a plain item's six, or complete.lua's ARGV
    /// in its order (see the header of complete.lua and [`super::Broker::complete`]) after the
    /// memory flag and their count.
    fn push_args(&self, inv: &mut redis::ScriptInvocation<'_>, now: i64, ttl: u64) {
        if self.is_plain() {
            inv.arg("p")
                .arg(&self.id)
                .arg(&self.token)
                .arg(&self.result_json)
                .arg(UsageAdd::script_arg(self.usage.as_ref()))
                .arg(&self.rest.text)
                .arg(self.rest.step);
            return;
        }
        let messages = self.memory.as_ref().map_or(&[][..], |m| &m.messages[..]);
        inv.arg("f")
            .arg(if self.memory.is_some() { "1" } else { "0" })
            .arg(15 + messages.len());
        inv.arg(&self.id)
            .arg(&self.token)
            .arg(now)
            .arg(&self.result_json)
            .arg(ttl);
        let (keep, mttl) = self
            .memory
            .as_ref()
            .map_or((1, 1), |m| (m.keep.max(1), m.ttl.as_secs().max(1)));
        inv.arg(keep)
            .arg(mttl)
            .arg(UsageAdd::script_arg(self.usage.as_ref()));
        match &self.node {
            Some(n) => inv
                .arg("1")
                .arg(&n.output)
                .arg(n.children.as_deref().unwrap_or("")),
            None => inv.arg("").arg("").arg(""),
        };
        inv.arg(&self.rest.text).arg(self.rest.step);
        match &self.rest.unacked {
            Some((batch, text)) => inv.arg(*batch).arg(text),
            None => inv.arg("").arg(""),
        };
        for m in messages {
            inv.arg(m);
        }
    }
}

impl Broker {
    /// Records many successes in one script call (`complete_many.lua`), each fenced by its own
    /// run's token exactly as [`Self::complete`]. Returns one answer per item, in order: the
    /// verdict (`ok`, or why that result was dropped: `stale`, `cancelled`, ...), or an error for
    /// an item whose script body failed. An `Err` of the whole call says nothing about any item:
    /// resend them (each item's fence answers a resend with the verdict it got).
    pub async fn complete_many(
        &self,
        keys: &Keys,
        worker_id: &str,
        items: &[&Completion],
        ttl: Duration,
    ) -> RedisResult<Vec<RedisResult<String>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = COMPLETE_MANY.prepare_invoke();
        inv.key(keys.inflight(worker_id))
            .key(keys.active())
            .key(keys.running());
        for c in items {
            inv.key(keys.task_raw(&c.id));
            if let Some(m) = &c.memory {
                inv.key(keys.memory(&m.agent_key));
            }
        }
        let (now, ttl) = (now_ms(), ttl.as_secs().max(1));
        inv.arg(items.len()).arg(now).arg(ttl);
        for c in items {
            c.push_args(&mut inv, now, ttl);
        }
        let mut conn = self.redis().conn().await?;
        let answers: Vec<String> = inv.invoke_async(&mut conn).await?;
        if answers.len() != items.len() {
            return Err(RedisError::from((
                ErrorKind::Client,
                "complete_many answered for a different number of items",
                format!("{} items, {} answers", items.len(), answers.len()),
            )));
        }
        Ok(answers
            .into_iter()
            .map(|a| match a.strip_prefix('!') {
                Some(e) => Err(RedisError::from((
                    ErrorKind::Client,
                    "complete.lua failed for this item",
                    e.to_owned(),
                ))),
                None => Ok(a),
            })
            .collect())
    }
}

/// Settings of a [`CompleteBatcher`].
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most results one call writes.
    pub max_items: usize,
    /// How long the first result of a group may wait for more before the call goes (zero: only
    /// what gathered while the previous call was in flight goes with it).
    pub max_wait: Duration,
}

struct Job {
    item: Arc<Completion>,
    reply: oneshot::Sender<RedisResult<String>>,
}

/// The worker's completion batcher: runs hand it their success and wait for their own verdict
/// (see the module's doc). Cheap to share; the flusher stops when the batcher is dropped.
pub struct CompleteBatcher {
    tx: mpsc::UnboundedSender<Job>,
    broker: Broker,
    keys: Keys,
    worker_id: String,
    ttl: Duration,
}

impl CompleteBatcher {
    /// Starts the flusher on the current tokio runtime. `ttl` is the result TTL.
    pub fn spawn(
        broker: Broker,
        keys: Keys,
        worker_id: String,
        ttl: Duration,
        settings: BatchSettings,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let flusher = Flusher {
            broker: broker.clone(),
            keys: keys.clone(),
            worker_id: worker_id.clone(),
            ttl,
            max_items: settings.max_items.max(1),
            max_wait: settings.max_wait,
        };
        tokio::spawn(flusher.run(rx));
        Self {
            tx,
            broker,
            keys,
            worker_id,
            ttl,
        }
    }

    /// Records one success with the next group and returns its own verdict (as
    /// [`Broker::complete`]). An `Err` means the write may or may not have landed: resend it.
    pub async fn complete(&self, item: Arc<Completion>) -> RedisResult<String> {
        let (reply, verdict) = oneshot::channel();
        let job = Job {
            item: item.clone(),
            reply,
        };
        if self.tx.send(job).is_err() {
            // the flusher is gone (its task ended with the runtime, or panicked): write alone
            return self.alone(&item).await;
        }
        match verdict.await {
            Ok(v) => v,
            // the flusher dropped the job without an answer (a panic): the write may have
            // landed; the caller resends, and the fence answers a resend
            Err(_) => Err(RedisError::from((
                ErrorKind::Client,
                "completion batcher stopped before answering",
            ))),
        }
    }

    async fn alone(&self, item: &Completion) -> RedisResult<String> {
        let mut answers = self
            .broker
            .complete_many(&self.keys, &self.worker_id, &[item], self.ttl)
            .await?;
        answers.pop().unwrap_or_else(|| {
            Err(RedisError::from((
                ErrorKind::Client,
                "complete_many gave no answer",
            )))
        })
    }
}

struct Flusher {
    broker: Broker,
    keys: Keys,
    worker_id: String,
    ttl: Duration,
    max_items: usize,
    max_wait: Duration,
}

impl Flusher {
    /// Gathers a group, waits for a call slot (gathering on meanwhile), sends it, repeats.
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let me = Arc::new(self);
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        while let Some(first) = rx.recv().await {
            let mut jobs: Vec<Job> = Vec::with_capacity(me.max_items);
            let mut bytes = first.item.size();
            jobs.push(first);
            me.take_waiting(&mut rx, &mut jobs, &mut bytes);
            if me.room(&jobs, bytes) && !me.max_wait.is_zero() {
                let until = tokio::time::Instant::now() + me.max_wait;
                while me.room(&jobs, bytes) {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(j)) => {
                            bytes += j.item.size();
                            jobs.push(j);
                        }
                        _ => break,
                    }
                }
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            // what arrived while both slots were busy goes too
            me.take_waiting(&mut rx, &mut jobs, &mut bytes);
            let flusher = me.clone();
            tokio::spawn(async move {
                flusher.flush(&mut jobs).await;
                drop(slot);
            });
        }
    }

    fn room(&self, jobs: &[Job], bytes: usize) -> bool {
        jobs.len() < self.max_items && bytes < MAX_BATCH_BYTES
    }

    /// Adds what is waiting in the channel now, as far as the group has room.
    fn take_waiting(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Job>,
        jobs: &mut Vec<Job>,
        bytes: &mut usize,
    ) {
        while self.room(jobs, *bytes) {
            match rx.try_recv() {
                Ok(j) => {
                    *bytes += j.item.size();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
    }

    /// One call for the group; every job gets its own answer (or the call's error).
    async fn flush(&self, jobs: &mut Vec<Job>) {
        let items: Vec<&Completion> = jobs.iter().map(|j| &*j.item).collect();
        let answers = self
            .broker
            .complete_many(&self.keys, &self.worker_id, &items, self.ttl)
            .await;
        drop(items);
        tracing::debug!(items = jobs.len(), "completions written");
        match answers {
            Ok(answers) => {
                for (job, answer) in jobs.drain(..).zip(answers) {
                    // a run that stopped waiting (its task ended) needs no answer
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
