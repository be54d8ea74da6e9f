//! agentq-worker: takes tasks off one queue and runs them against an OpenAI-compatible LLM.
//!
//! Loop: take a concurrency permit, then (and only then) move task ids from the pending list into
//! this worker's in-flight list (reliable fetch, `fetch.lua`), run each in its own tokio task, and
//! record the outcome (`complete.lua` / `fail.lua`). Beside it, a maintenance loop keeps the
//! heartbeat, promotes due retries and recovers the tasks of workers whose heartbeat expired.
//!
//! Failure policy: an LLM failure is classified once (transient, rate-limited, permanent) and
//! becomes a retry, a dead letter or a wait; a Redis failure is retried with backoff until it
//! works, because a result already paid for must not be dropped. SIGTERM drains: no new fetches,
//! in-flight tasks get `AGENTQ_DRAIN_TIMEOUT_SECS`, the rest are given back uncounted, exit 0.

mod llm;
mod probe;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq_common::backoff::full_jitter;
use agentq_common::broker::{FailMode, MemoryAppend};
use agentq_common::config::WorkerConfig;
use agentq_common::keys::{Keys, TaskId};
use agentq_common::metrics::WorkerMetrics;
use agentq_common::task::{Message, Payload, Role, StartedTask};
use agentq_common::time::now_ms;
use agentq_common::{Broker, Redis};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use llm::{parse_retry_after, Llm, LlmFailure};

/// How long one blocking wait for work lasts; also the longest a drain waits for the fetch loop.
const BLOCK: Duration = Duration::from_secs(1);
/// How often due retries are moved to pending.
const PROMOTE_EVERY: Duration = Duration::from_millis(250);
/// How long give-backs may take after the drain deadline.
const GIVE_BACK_GRACE: Duration = Duration::from_secs(5);

struct Worker {
    id: String,
    cfg: WorkerConfig,
    keys: Keys,
    broker: Broker,
    blocking: Redis,
    llm: Llm,
    metrics: WorkerMetrics,
    permits: Arc<Semaphore>,
    draining: AtomicBool,
    /// Ids this process holds (started or being started), to tell orphans in its in-flight list.
    held: Mutex<HashSet<String>>,
}

/// Runs a worker until `shutdown` resolves, then drains. `listener` serves the probes and metrics.
pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = WorkerMetrics::new();
    let redis = Redis::open(&config.common.redis_url)?;
    let blocking = Redis::with_response_timeout(
        &config.common.redis_url,
        Some(BLOCK + agentq_common::redis_conn::RESPONSE_TIMEOUT),
    )?;
    let llm = Llm::new(
        &config.openai_base_url,
        &config.openai_api_key,
        config.llm_timeout,
        metrics.clone(),
        config.prices.clone(),
    )?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    let id = format!("{}-{}", sanitize(&host), uuid::Uuid::new_v4().simple());
    metrics.concurrency.set(config.concurrency as i64);
    let worker = Arc::new(Worker {
        keys: Keys::new(&config.common.key_prefix, &config.queue),
        broker: Broker::new(redis, config.common.key_prefix.clone()),
        blocking,
        llm,
        metrics,
        permits: Arc::new(Semaphore::new(config.concurrency)),
        draining: AtomicBool::new(false),
        held: Mutex::new(HashSet::new()),
        id,
        cfg: config,
    });
    tracing::info!(
        worker.id = %worker.id,
        queue = %worker.cfg.queue,
        concurrency = worker.cfg.concurrency,
        redis = %worker.cfg.common.redis_display(),
        llm = %agentq_common::config::redact_url(&worker.cfg.openai_base_url),
        listen = %listener.local_addr()?,
        "agentq-worker starting"
    );

    let probe_stop = CancellationToken::new();
    let probe = tokio::spawn(probe::serve(listener, worker.clone(), probe_stop.clone()));

    let stop_fetching = CancellationToken::new();
    let stop_maintenance = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let tracker = TaskTracker::new();

    let maintenance = tokio::spawn(worker.clone().maintain(stop_maintenance.clone()));
    let fetcher = tokio::spawn(worker.clone().fetch_loop(
        stop_fetching.clone(),
        tracker.clone(),
        hard_stop.clone(),
    ));

    shutdown.await;
    worker.draining.store(true, Ordering::SeqCst);
    worker.metrics.draining.set(1);
    stop_fetching.cancel();
    let _ = fetcher.await;
    tracker.close();
    let in_flight = tracker.len();
    tracing::info!(
        in_flight,
        timeout_s = worker.cfg.drain_timeout.as_secs(),
        "draining"
    );
    if tokio::time::timeout(worker.cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tracker.len(),
            "drain timeout reached; giving unfinished tasks back without counting the attempt"
        );
        hard_stop.cancel();
        if tokio::time::timeout(GIVE_BACK_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("give-backs did not finish; heartbeat expiry will recover those tasks");
        }
    }
    // Maintenance stops first: a heartbeat after the deregistration would register the worker
    // again, and an orphan sweep racing the release could push an id to pending twice.
    stop_maintenance.cancel();
    let _ = maintenance.await;
    worker.release_leftovers().await;
    probe_stop.cancel();
    let _ = probe.await;
    tracing::info!("agentq-worker stopped");
    Ok(())
}

fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(63)
        .collect()
}

/// Keeps `agentq_active_tasks` true even when a task future is dropped mid-way.
struct ActiveGuard<'a>(&'a WorkerMetrics);

impl<'a> ActiveGuard<'a> {
    fn new(m: &'a WorkerMetrics) -> Self {
        m.active.inc();
        Self(m)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.dec();
    }
}

/// Waits `d`, or less if `stop` fires. Returns false when stopped.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

impl Worker {
    fn ttl(&self) -> Duration {
        self.cfg.common.result_ttl
    }

    fn hold(&self, id: &str) {
        if let Ok(mut h) = self.held.lock() {
            h.insert(id.to_owned());
        }
    }

    fn release(&self, id: &str) {
        if let Ok(mut h) = self.held.lock() {
            h.remove(id);
        }
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    async fn fetch_loop(
        self: Arc<Self>,
        stop: CancellationToken,
        tracker: TaskTracker,
        hard: CancellationToken,
    ) {
        let mut errors: u32 = 0;
        loop {
            // A permit first: the worker never takes a task it cannot start now.
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                p = self.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let mut permits = vec![first];
            while permits.len() < self.cfg.fetch_batch {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let fetched = match self
                .broker
                .fetch(&self.keys, &self.id, permits.len(), None, self.ttl())
                .await
            {
                Ok(v) if v.is_empty() => {
                    permits.truncate(1);
                    // The blocking wait is never cancelled half-way, so an id it moved is never lost.
                    match self
                        .broker
                        .wait_for_task(&self.blocking, &self.keys, &self.id, BLOCK)
                        .await
                    {
                        Ok(None) => Ok(Vec::new()),
                        Ok(Some(id)) if stop.is_cancelled() => {
                            self.give_back_unstarted(&id).await;
                            break;
                        }
                        Ok(Some(id)) => {
                            self.hold(&id);
                            let r = self
                                .broker
                                .fetch(&self.keys, &self.id, 0, Some(&id), self.ttl())
                                .await;
                            // a skipped id (finished, cancelled, poison) is no longer ours to hold
                            if !matches!(&r, Ok(v) if v.iter().any(|t| t.id == id)) {
                                self.release(&id);
                            }
                            r
                        }
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            let started = match fetched {
                Ok(v) => {
                    errors = 0;
                    v
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    if errors == 1 || errors.is_multiple_of(30) {
                        tracing::warn!(error = %e, consecutive = errors, "fetch failed; retrying");
                    }
                    drop(permits);
                    let wait = full_jitter(
                        errors.min(6),
                        Duration::from_millis(100),
                        Duration::from_secs(3),
                    );
                    if !pause(wait, &stop).await {
                        break;
                    }
                    continue;
                }
            };
            for (task, permit) in started.into_iter().zip(permits) {
                self.hold(&task.id);
                let me = self.clone();
                let hard = hard.clone();
                tracker.spawn(async move {
                    let id = task.id.clone();
                    let attempt = task.attempt;
                    tokio::select! {
                        _ = me.process(task) => {}
                        _ = hard.cancelled() => me.give_back(&id, attempt).await,
                    }
                    me.release(&id);
                    drop(permit);
                });
            }
        }
        tracing::info!("fetching stopped");
    }

    async fn process(&self, task: StartedTask) {
        let _active = ActiveGuard::new(&self.metrics);
        let started = Instant::now();
        let queue = self.cfg.queue.as_str();
        if task.attempt == 1 && task.rate_limited == 0 && task.created_at_ms > 0 {
            let waited = (task.fetched_at_ms - task.created_at_ms).max(0) as f64 / 1000.0;
            self.metrics
                .queue_wait
                .with_label_values(&[queue])
                .observe(waited);
        }
        let Ok(id) = TaskId::parse(&task.id) else {
            self.bury(&task.id, "poison: malformed task id").await;
            return;
        };
        let payload: Payload = match serde_json::from_str(&task.payload) {
            Ok(p) => p,
            Err(e) => {
                self.bury(&task.id, &format!("poison: payload does not parse: {e}"))
                    .await;
                return;
            }
        };
        if payload.messages.is_empty() {
            self.bury(&task.id, "poison: payload has no messages").await;
            return;
        }
        let model = payload
            .model
            .clone()
            .unwrap_or_else(|| self.cfg.model.clone());
        let history = match &payload.agent_id {
            Some(agent) => match self
                .broker
                .memory(&self.keys, agent, self.cfg.memory_messages)
                .await
            {
                Ok(h) => h,
                Err(e) => {
                    let failure = LlmFailure::Transient {
                        outcome: "memory",
                        message: format!("agent memory unavailable: {e}"),
                    };
                    self.record_failure(&id, task.attempt, &failure, started)
                        .await;
                    return;
                }
            },
            None => Vec::new(),
        };
        let mut messages: Vec<Message> = history
            .iter()
            .filter_map(|m| serde_json::from_str(m).ok())
            .collect();
        messages.extend(payload.messages.iter().cloned());

        match self.llm.chat(&model, &messages).await {
            Ok(result) => {
                let result_json = serde_json::to_string(&result).unwrap_or_default();
                let memory = payload.agent_id.as_deref().map(|agent| {
                    let mut exchange: Vec<String> = payload
                        .messages
                        .iter()
                        .filter(|m| m.role != Role::System)
                        .filter_map(|m| serde_json::to_string(m).ok())
                        .collect();
                    let reply = Message {
                        role: Role::Assistant,
                        content: result.content.clone(),
                    };
                    exchange.extend(serde_json::to_string(&reply).ok());
                    MemoryAppend {
                        agent_id: agent,
                        messages: exchange,
                        keep: self.cfg.memory_messages,
                        ttl: self.cfg.memory_ttl,
                    }
                });
                let memory = memory.filter(|_| self.cfg.memory_messages > 0);
                let verdict = self
                    .persist("complete", || {
                        self.broker.complete(
                            &self.keys,
                            &self.id,
                            &id,
                            &result_json,
                            self.ttl(),
                            memory.as_ref(),
                        )
                    })
                    .await;
                let status = match verdict.as_str() {
                    "ok" => "succeeded",
                    "cancelled" => "cancelled",
                    _ => "duplicate",
                };
                self.metrics.tasks.with_label_values(&[queue, status]).inc();
                self.metrics
                    .task_duration
                    .with_label_values(&[queue])
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(task.id = %id, attempt = task.attempt, status, "task finished");
            }
            Err(failure) => {
                self.record_failure(&id, task.attempt, &failure, started)
                    .await
            }
        }
    }

    async fn record_failure(
        &self,
        id: &TaskId,
        attempt: u32,
        failure: &LlmFailure,
        started: Instant,
    ) {
        let (mode, delay) = match failure {
            LlmFailure::Transient { .. } => (
                FailMode::Transient,
                full_jitter(attempt, self.cfg.retry_base, self.cfg.retry_max),
            ),
            LlmFailure::RateLimited { retry_after, .. } => (
                FailMode::RateLimited,
                retry_after.unwrap_or_else(|| {
                    full_jitter(attempt, self.cfg.retry_base, self.cfg.retry_max)
                }),
            ),
            LlmFailure::Permanent { .. } => (FailMode::Permanent, Duration::ZERO),
        };
        let verdict: String = self
            .persist("fail", || {
                self.broker.fail(
                    &self.keys,
                    &self.id,
                    id,
                    mode,
                    failure.message(),
                    delay,
                    self.ttl(),
                    self.cfg.max_rate_limited,
                )
            })
            .await;
        let status = match (verdict.as_str(), mode) {
            ("retrying", FailMode::RateLimited) => "rate_limited",
            ("retrying", _) => "retried",
            ("failed", _) => "failed",
            ("cancelled", _) => "cancelled",
            _ => "duplicate",
        };
        let queue = self.cfg.queue.as_str();
        self.metrics.tasks.with_label_values(&[queue, status]).inc();
        self.metrics
            .task_duration
            .with_label_values(&[queue])
            .observe(started.elapsed().as_secs_f64());
        tracing::warn!(
            task.id = %id,
            attempt,
            outcome = failure.outcome(),
            retry_in_ms = delay.as_millis() as u64,
            status,
            error = failure.message(),
            "task run failed"
        );
    }

    async fn bury(&self, raw_id: &str, reason: &str) {
        tracing::warn!(task.id = raw_id, reason, "dead-lettering poison task");
        self.persist("bury", || {
            self.broker
                .bury_poison(&self.keys, &self.id, raw_id, reason, self.ttl())
        })
        .await;
        self.metrics
            .tasks
            .with_label_values(&[self.cfg.queue.as_str(), "failed"])
            .inc();
    }

    /// Drain deadline: the run is abandoned and the task goes back to pending, attempt uncounted.
    async fn give_back(&self, raw_id: &str, attempt: u32) {
        let Ok(id) = TaskId::parse(raw_id) else {
            self.give_back_unstarted(raw_id).await;
            return;
        };
        let r = tokio::time::timeout(
            GIVE_BACK_GRACE,
            self.broker.fail(
                &self.keys,
                &self.id,
                &id,
                FailMode::GiveBack,
                "",
                Duration::ZERO,
                self.ttl(),
                self.cfg.max_rate_limited,
            ),
        )
        .await;
        match r {
            Ok(Ok(_)) => {
                self.metrics
                    .tasks
                    .with_label_values(&[self.cfg.queue.as_str(), "given_back"])
                    .inc();
                tracing::info!(task.id = raw_id, attempt, "given back to the queue");
            }
            Ok(Err(e)) => {
                tracing::warn!(task.id = raw_id, error = %e, "give-back failed; heartbeat expiry will recover it")
            }
            Err(_) => tracing::warn!(
                task.id = raw_id,
                "give-back timed out; heartbeat expiry will recover it"
            ),
        }
    }

    async fn give_back_unstarted(&self, id: &str) {
        if let Err(e) = self.broker.return_unstarted(&self.keys, &self.id, id).await {
            tracing::warn!(task.id = id, error = %e, "could not return task; heartbeat expiry will recover it");
        }
    }

    /// Retries a Redis write until it succeeds: the outcome of an LLM call (already paid for) is
    /// never dropped because Redis blinked. Only the drain deadline (which drops this future) ends it.
    async fn persist<T, F, Fut>(&self, what: &'static str, mut op: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut tries: u32 = 0;
        loop {
            match op().await {
                Ok(v) => return v,
                Err(e) => {
                    tries = tries.saturating_add(1);
                    if tries == 1 || tries.is_multiple_of(20) {
                        tracing::warn!(op = what, tries, error = %e, "redis write failed; retrying");
                    }
                    tokio::time::sleep(full_jitter(
                        tries.min(6),
                        Duration::from_millis(100),
                        Duration::from_secs(3),
                    ))
                    .await;
                }
            }
        }
    }

    /// After the drain: ids still in this worker's in-flight list go back to pending; the worker
    /// deregisters only when that list is empty, so anything left is recovered by the others.
    async fn release_leftovers(&self) {
        let left = match self.broker.inflight_ids(&self.keys, &self.id).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read in-flight list; heartbeat expiry will recover it");
                return;
            }
        };
        for id in &left {
            self.give_back_unstarted(id).await;
        }
        match self.broker.inflight_ids(&self.keys, &self.id).await {
            Ok(ids) if ids.is_empty() => {
                if let Err(e) = self.broker.deregister(&self.keys, &self.id).await {
                    tracing::warn!(error = %e, "deregistration failed; the heartbeat will expire");
                }
            }
            _ => {
                tracing::warn!("in-flight list not empty; leaving it for recovery by other workers")
            }
        }
    }

    /// Heartbeat, retry promotion, recovery of lost workers and of this worker's orphaned ids.
    async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let beat_every = (self.cfg.heartbeat / 3).max(Duration::from_millis(200));
        let recover_every = (self.cfg.heartbeat / 2).max(Duration::from_millis(500));
        let mut next_beat = Instant::now();
        let mut next_recover = Instant::now();
        let mut suspects: HashMap<String, u32> = HashMap::new();
        loop {
            let now = Instant::now();
            if now >= next_beat {
                next_beat = now + beat_every;
                match self
                    .broker
                    .heartbeat(&self.keys, &self.id, self.cfg.heartbeat)
                    .await
                {
                    Ok(()) => self.sweep_orphans(&mut suspects).await,
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
            if now >= next_recover {
                next_recover = now + recover_every;
                match self.broker.recover_lost_workers(&self.keys, &self.id).await {
                    Ok(found) => {
                        for (w, n) in found {
                            tracing::warn!(lost_worker = %w, tasks = n, "recovered tasks of a lost worker");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "recovery scan failed"),
                }
            }
            match self.broker.promote_due(&self.keys, 1000).await {
                Ok(n) if n > 0 => tracing::debug!(moved = n, "promoted due retries"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "promotion failed"),
            }
            if !pause(PROMOTE_EVERY, &stop).await {
                break;
            }
        }
    }

    /// An id in this worker's in-flight list that it does not hold (a fetch whose reply was lost)
    /// is returned to pending once it has been seen orphaned on two sweeps in a row.
    async fn sweep_orphans(&self, suspects: &mut HashMap<String, u32>) {
        let Ok(ids) = self.broker.inflight_ids(&self.keys, &self.id).await else {
            return;
        };
        let held = self.held.lock().map(|h| h.clone()).unwrap_or_default();
        let orphans: HashSet<String> = ids.into_iter().filter(|id| !held.contains(id)).collect();
        suspects.retain(|id, _| orphans.contains(id));
        for id in orphans {
            let seen = suspects.entry(id.clone()).or_insert(0);
            *seen += 1;
            if *seen >= 2 {
                tracing::warn!(task.id = %id, "returning an orphaned in-flight id to pending");
                self.give_back_unstarted(&id).await;
                suspects.remove(&id);
            }
        }
    }
}

/// Time in ms; re-exported for tests that inspect task timestamps.
pub fn now() -> i64 {
    now_ms()
}
