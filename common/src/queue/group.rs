//! Group commit for single enqueues: concurrent `POST /v1/tasks` requests are written by one
//! `enqueue_many.lua` call instead of one script call each, and every request is still answered
//! only after its own write landed (it waits on its item's reply).
//!
//! Why: with one script call per task, Redis's per-call cost (EVALSHA's dispatch, one reply, one
//! wake-up of the api's connection task per reply) bounds HTTP enqueue; a database meets the same
//! wall with one fsync per commit and groups commits. The window is adaptive, with no timer:
//! a writer takes whatever requests are waiting when it is free. While `in_flight` calls are out,
//! new requests gather; when the api is idle a request is written at once, alone, so it pays no
//! added latency (a tokio timer could not wait less than a millisecond anyway). Under load the
//! writer first yields once to the runtime, so handlers already runnable (their bodies parsed in
//! the same wake-up) join the group: that is the "tens of µs" the group waits, and only then.

use std::sync::Arc;
use std::time::Duration;

use redis::RedisResult;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::enqueue::EnqueueItem;
use super::{Broker, Enqueued};

/// Settings of the group commit (the api's `AGENTQ_ENQUEUE_GROUP_*` variables).
#[derive(Debug, Clone, Copy)]
pub struct GroupConfig {
    /// Most requests written by one call.
    pub max_items: usize,
    /// Most group calls out at once; a request arriving while they are all out waits for one to
    /// come back, with the others that arrive meanwhile.
    pub in_flight: usize,
    /// Most requests waiting to be grouped; beyond it a request waits for room (backpressure,
    /// never an unbounded buffer).
    pub queue_depth: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            max_items: 64,
            in_flight: 2,
            queue_depth: 4096,
        }
    }
}

type Reply = RedisResult<(String, Enqueued)>;

struct Request {
    item: EnqueueItem,
    reply: oneshot::Sender<Reply>,
}

/// Observes each group's size (a histogram in the api's metrics).
pub type SizeObserver = Arc<dyn Fn(usize) + Send + Sync>;

/// The handle requests enqueue through; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Request>,
}

impl GroupCommit {
    /// Starts the writer task (on the current tokio runtime). `ttl` is the idempotency keys'
    /// lifetime, as for a single enqueue.
    pub fn start(
        broker: Broker,
        config: GroupConfig,
        ttl: Duration,
        observe: Option<SizeObserver>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        tokio::spawn(writer(broker, config, ttl, rx, observe));
        Self { tx }
    }

    /// Enqueues one task in the next group and waits for its write. The outcome is the same as
    /// [`Broker::enqueue`]'s. Dropping the future before it resolves does not take the task
    /// back: once handed over it is written, as a request whose client went away would be.
    pub async fn enqueue(&self, item: EnqueueItem) -> Reply {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { item, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

fn closed() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, "the group commit writer stopped"))
}

async fn writer(
    broker: Broker,
    config: GroupConfig,
    ttl: Duration,
    mut rx: mpsc::Receiver<Request>,
    observe: Option<SizeObserver>,
) {
    let slots = Arc::new(Semaphore::new(config.in_flight.max(1)));
    let max = config.max_items.max(1);
    let mut busy = false;
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut group = Vec::with_capacity(max.min(64));
        group.push(first);
        if busy {
            // Under load, let the handlers that are already runnable hand their requests over.
            tokio::task::yield_now().await;
        }
        while group.len() < max {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        busy = group.len() > 1 || slots.available_permits() == 0;
        if let Some(o) = &observe {
            o(group.len());
        }
        let broker = broker.clone();
        tokio::spawn(async move {
            write(&broker, group, ttl).await;
            drop(permit);
        });
    }
}

/// Writes one group: its requests split by queue (a script's keys are one queue's), each
/// queue's part as one `enqueue_many` call, and every request answered.
async fn write(broker: &Broker, group: Vec<Request>, ttl: Duration) {
    let mut by_queue: Vec<(String, Vec<Request>)> = Vec::new();
    for r in group {
        match by_queue.iter_mut().find(|(q, _)| *q == r.item.task.queue) {
            Some((_, v)) => v.push(r),
            None => by_queue.push((r.item.task.queue.clone(), vec![r])),
        }
    }
    let calls = by_queue.into_iter().map(|(queue, requests)| async move {
        let (items, replies): (Vec<EnqueueItem>, Vec<oneshot::Sender<Reply>>) =
            requests.into_iter().map(|r| (r.item, r.reply)).unzip();
        match broker.enqueue_many(&queue, &items, ttl).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(copy_error(&e)));
                }
            }
        }
    });
    futures::future::join_all(calls).await;
}

/// The same failure for every request of a failed group (RedisError is not Clone); its kind
/// decides the caller's answer (503), its text only the log.
fn copy_error(e: &redis::RedisError) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "group enqueue failed",
        format!("{:?}: {}", e.kind(), e),
    ))
}
