//! agentq-worker: takes tasks off one queue and runs them against an OpenAI-compatible LLM.
//!
//! Loop: take a concurrency permit, then (and only then) move task ids from the pending list into
//! this worker's in-flight list (reliable fetch, `fetch.lua`), which starts a *run* of each with a
//! fencing token; run each in its own tokio task (`run.rs`) and report the outcome with the token
//! (`complete.lua` / `fail.lua`), so a run that no longer owns its task writes nothing. Successes
//! are written in groups (`complete_many.lua`, each item fenced on its own) by the completion
//! batcher (`agentq_common::queue::CompleteBatcher`); each run still waits for its own verdict
//! before it releases its slot. Beside it,
//! the heartbeat keeps its own timer and connection, and a maintenance loop promotes due retries,
//! recovers the tasks of workers whose heartbeat expired and returns orphaned ids
//! (`maintenance.rs`). A cancel aborts the run it concerns at once: `cancel.lua` publishes the id
//! on the queue's cancel channel, which a subscriber here listens to, and a poll of the running
//! runs' records (`AGENTQ_CANCEL_POLL_MS`) catches what the channel missed (see [`Running`]).
//!
//! Failure policy: an LLM failure is classified once (transient, rate-limited, permanent) and
//! becomes a retry, a dead letter or a wait; a Redis failure is retried with backoff until it
//! works, because a result already paid for must not be dropped. SIGTERM drains: no new fetches,
//! in-flight tasks get `AGENTQ_DRAIN_TIMEOUT_SECS`, the rest are given back uncounted, exit 0.

mod budget;
mod emitter;
mod flow;
mod graph;
mod llm;
mod maintenance;
mod probe;
mod run;
mod tools;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq_common::backoff::full_jitter;
use agentq_common::config::{ConfigError, WorkerConfig};
use agentq_common::keys::Keys;
use agentq_common::metrics::WorkerMetrics;
use agentq_common::queue::{BatchSettings, CompleteBatcher};
use agentq_common::task::StartedTask;
use agentq_common::time::now_ms;
use agentq_common::{Broker, Redis};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use llm::{parse_go_duration, parse_retry_after, Llm, LlmFailure, LlmSettings};

/// How long one blocking wait for work lasts; also the longest a drain waits for the fetch loop.
const BLOCK: Duration = Duration::from_secs(1);
/// How long the fetch loop waits before asking again when every tenant with pending work is at
/// its `max_running` (`fetch.lua` handed the tickets back): unless a run of its own ends first.
/// The tickets are still in `pending`, so a blocking wait would return at once: without this
/// pause a worker would spin on them until another worker's run of that tenant ended.
const CAPPED_PAUSE: Duration = Duration::from_millis(200);
/// How long reports and give-backs may still take after the drain deadline.
const GIVE_BACK_GRACE: Duration = Duration::from_secs(5);

/// `WORKER_COMPLETE_BATCH`: most results one `complete_many.lua` call writes (1: every result
/// is its own `complete.lua` call, as before batching).
pub const ENV_COMPLETE_BATCH: &str = "WORKER_COMPLETE_BATCH";
/// `WORKER_COMPLETE_WAIT_MS`: how long a result may wait for others before its group is written
/// (0: only the results that gathered while the previous call was in flight go with it).
pub const ENV_COMPLETE_WAIT_MS: &str = "WORKER_COMPLETE_WAIT_MS";
pub const DEFAULT_COMPLETE_BATCH: usize = 64;
pub const DEFAULT_COMPLETE_WAIT_MS: u64 = 0;

/// The completion batcher's settings from the environment; `None` when batching is off
/// (`WORKER_COMPLETE_BATCH=1`). A bad value is a [`ConfigError`] naming the variable.
pub fn complete_batch_settings(
    env: &dyn agentq_common::config::Env,
) -> Result<Option<BatchSettings>, ConfigError> {
    fn ranged(
        env: &dyn agentq_common::config::Env,
        var: &'static str,
        default: u64,
        (min, max): (u64, u64),
    ) -> Result<u64, ConfigError> {
        let Some(raw) = env.get(var).filter(|v| !v.trim().is_empty()) else {
            return Ok(default);
        };
        let v: u64 = raw.trim().parse().map_err(|e| ConfigError {
            var,
            message: format!("{e} (got {raw:?})"),
        })?;
        if v < min || v > max {
            return Err(ConfigError {
                var,
                message: format!("must be between {min} and {max} (got {v})"),
            });
        }
        Ok(v)
    }
    let max_items = ranged(
        env,
        ENV_COMPLETE_BATCH,
        DEFAULT_COMPLETE_BATCH as u64,
        (1, 1000),
    )?;
    let wait = ranged(
        env,
        ENV_COMPLETE_WAIT_MS,
        DEFAULT_COMPLETE_WAIT_MS,
        (0, 10_000),
    )?;
    Ok((max_items > 1).then(|| BatchSettings {
        max_items: usize::try_from(max_items).unwrap_or(DEFAULT_COMPLETE_BATCH),
        max_wait: Duration::from_millis(wait),
    }))
}

/// Learned (rpm, tpm) of one upstream and model, and when this worker last told Redis.
type Learned = ((u64, u64), Instant);

struct Worker {
    id: String,
    cfg: WorkerConfig,
    keys: Keys,
    broker: Broker,
    blocking: Redis,
    /// One LLM client per upstream, by upstream name.
    llms: HashMap<String, Llm>,
    /// The fleet-wide flow limiter (`common/src/flow`).
    limiter: agentq_common::flow::Limiter,
    /// Budgets and the scopes that have one (`budget.rs`).
    budget: budget::BudgetState,
    /// The declared MCP servers' sessions and tool lists (`tools/mcp.rs`).
    mcp: tools::mcp::McpHub,
    /// Limits this process already told the limiter it learned, by (upstream, model): a reply's
    /// headers repeat them, Redis needs to hear each change once.
    learned: Mutex<HashMap<(String, String), Learned>>,
    metrics: WorkerMetrics,
    permits: Arc<Semaphore>,
    draining: AtomicBool,
    /// Ids this process holds (being started or running), counted: the orphan sweep returns only
    /// ids nobody here holds, and two holds of one id must not end with one release.
    held: Mutex<HashMap<String, u32>>,
    /// Fetch operations (a `fetch.lua` call, or a blocking wait and the fetch after it) started
    /// and finished. The sweep calls an id an orphan only once every operation that could have
    /// moved it has finished, so a slow fetch reply is never mistaken for a lost one.
    fetches_started: AtomicU64,
    fetches_finished: AtomicU64,
    /// Runs whose report could not be written before the drain's grace ran out: id → token.
    /// At exit they are given back with their token (the LLM was called, so as a give-back).
    abandoned: Mutex<HashMap<String, String>>,
    /// Since when every heartbeat has reached Redis in time (None while they fail). Recovery of
    /// other workers waits for a full heartbeat TTL of this, so after a Redis freeze or restart
    /// (when every heartbeat key may have expired at once) live workers beat again before anyone
    /// is declared lost.
    healthy_since: Mutex<Option<Instant>>,
    /// The runs executing now, each with the token that aborts it when its task is cancelled.
    running: Running,
    /// Wakes the cancel poll at once (after the cancel channel was resubscribed: whatever was
    /// published while it was away is found by the poll).
    poll_cancels_now: tokio::sync::Notify,
    /// Wakes the fetch loop when a run of this worker ends, while it waits out a fetch that found
    /// every tenant with work at its `max_running` ([`CAPPED_PAUSE`]).
    run_ended: tokio::sync::Notify,
    /// Writes successes in groups (`complete_many.lua`); `None`: each with its own `complete.lua`
    /// call (`WORKER_COMPLETE_BATCH=1`).
    completer: Option<CompleteBatcher>,
}

/// What one [`Worker::fetch_some`] gave the fetch loop.
struct FetchOutcome {
    started: Vec<StartedTask>,
    /// The loop must stop: the blocking wait returned after the stop began.
    stop: bool,
    /// Nothing started because every tenant with work is at its `max_running`.
    capped: bool,
}

/// Runs a worker until `shutdown` resolves, then drains. `listener` serves the probes and metrics.
pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // parsed here, beside the worker code it tunes; a bad value exits like any bad configuration
    let complete_batch = match complete_batch_settings(&agentq_common::config::ProcessEnv) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(variable = e.var, error = %e, "bad configuration");
            eprintln!("agentq-worker: {e}");
            std::process::exit(agentq_common::config::EXIT_CONFIG);
        }
    };
    let metrics = WorkerMetrics::new();
    let target = config.common.redis_target();
    let redis = Redis::open_target(&target)?;
    let blocking = Redis::connect(
        &target,
        Some(BLOCK + agentq_common::redis_conn::RESPONSE_TIMEOUT),
    )?;
    // Its own connection: a heartbeat never queues behind a slow script or a big reply.
    let beat_conn = Redis::open_target(&target)?;
    let known_models: std::collections::HashSet<String> = config
        .upstreams
        .list
        .iter()
        .flat_map(|u| u.models.iter().cloned())
        .collect();
    let known_models = Arc::new(known_models);
    let mut llms = HashMap::new();
    for u in &config.upstreams.list {
        let llm = Llm::new(
            LlmSettings {
                base_url: &u.base_url,
                api_key: &u.api_key,
                timeout: config.llm_timeout,
                // the upstream's own prices over AGENTQ_PRICES (the cost metric and budgets agree)
                prices: {
                    let mut p = config.prices.clone();
                    p.extend(u.prices.iter().map(|(m, v)| (m.clone(), *v)));
                    p
                },
                default_model: &config.model,
                max_response_bytes: config.max_response_bytes,
                max_tokens: config.max_tokens,
                max_tokens_param: config.max_tokens_param,
                known_models: known_models.clone(),
                http: config.llm_http,
                http2_streams: config.llm_http2_streams,
                concurrency: config.concurrency,
            },
            metrics.clone(),
        )?;
        tracing::info!(
            upstream = %u.name,
            http = ?config.llm_http,
            connections_for_http2 = llm.lanes(),
            "llm upstream"
        );
        llms.insert(u.name.clone(), llm);
    }
    // A tokenizer is built (a quarter of a second, some 50 MiB) only for configured models that
    // have one and a tokens-per-minute limit, and then off the first task's clock.
    for model in config.upstreams.list.iter().flat_map(|u| {
        u.models
            .iter()
            .filter(move |m| u.limits.tpm.is_some() || u.limits_for(m).tpm.is_some())
            .filter(|m| llm::tokens::has_tokenizer(m))
            .cloned()
    }) {
        tokio::task::spawn_blocking(move || llm::tokens::warm_up(&model));
    }
    let limiter = agentq_common::flow::Limiter::new(redis.clone(), &config.common.key_prefix)
        .with_grants(config.limiter_grants);
    let budgets = agentq_common::flow::Budgets::new(redis.clone(), &config.common.key_prefix);
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    let id = format!("{}-{}", sanitize(&host), uuid::Uuid::new_v4().simple());
    metrics.concurrency.set(config.concurrency as i64);
    let keys = Keys::new(&config.common.key_prefix, &config.queue);
    let broker = Broker::new(redis.clone(), config.common.key_prefix.clone());
    let completer = complete_batch.map(|settings| {
        CompleteBatcher::spawn(
            broker.clone(),
            keys.clone(),
            id.clone(),
            config.common.result_ttl,
            settings,
        )
    });
    let worker = Arc::new(Worker {
        keys,
        broker,
        completer,
        blocking,
        llms,
        limiter,
        budget: budget::BudgetState::new(budgets),
        mcp: tools::mcp::McpHub::new(
            config.mcp.clone(),
            config.mcp_timeout,
            config.mcp_max_result_bytes,
        ),
        learned: Mutex::new(HashMap::new()),
        metrics,
        permits: Arc::new(Semaphore::new(config.concurrency)),
        draining: AtomicBool::new(false),
        held: Mutex::new(HashMap::new()),
        fetches_started: AtomicU64::new(0),
        fetches_finished: AtomicU64::new(0),
        abandoned: Mutex::new(HashMap::new()),
        healthy_since: Mutex::new(None),
        running: Running::default(),
        poll_cancels_now: tokio::sync::Notify::new(),
        run_ended: tokio::sync::Notify::new(),
        id,
        cfg: config,
    });
    tracing::info!(
        worker.id = %worker.id,
        queue = %worker.cfg.queue,
        concurrency = worker.cfg.concurrency,
        complete_batch = complete_batch.map_or(1, |s| s.max_items),
        complete_wait_ms = complete_batch.map_or(0, |s| s.max_wait.as_millis() as u64),
        redis = %worker.cfg.common.redis_display(),
        upstreams = %worker
            .cfg
            .upstreams
            .list
            .iter()
            .map(|u| format!("{}={}", u.name, agentq_common::config::redact_url(&u.base_url)))
            .collect::<Vec<_>>()
            .join(","),
        listen = %listener.local_addr()?,
        "agentq-worker starting"
    );
    if !worker.cfg.common.redis_cluster_nodes.is_empty() {
        tracing::info!("cluster mode: REDIS_CLUSTER_NODES is set, so REDIS_URL is ignored");
    }

    let probe_stop = CancellationToken::new();
    let probe = tokio::spawn(probe::serve(listener, worker.clone(), probe_stop.clone()));

    let stop_fetching = CancellationToken::new();
    let stop_maintenance = CancellationToken::new();
    let stop_beating = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let tracker = TaskTracker::new();

    let heartbeat = tokio::spawn(worker.clone().beat(beat_conn, stop_beating.clone()));
    let maintenance = tokio::spawn(worker.clone().maintain(stop_maintenance.clone()));
    // the budgets are read before the first fetch, so a budget set before start binds at once
    let budgets_read = CancellationToken::new();
    let budget_watch = tokio::spawn(
        worker
            .clone()
            .watch_budgets(stop_maintenance.clone(), budgets_read.clone()),
    );
    // A cancelled task's run is aborted: on the cancel channel's message, else by the poll.
    let cancel_listener = tokio::spawn(
        worker
            .clone()
            .listen_for_cancels(redis, stop_maintenance.clone()),
    );
    let cancel_poll = tokio::spawn(worker.clone().poll_cancels(stop_maintenance.clone()));
    let _ = tokio::time::timeout(Duration::from_secs(2), budgets_read.cancelled()).await;
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
        // Reports stop retrying GIVE_BACK_GRACE after the hard stop; a little more for the last one.
        let _ =
            tokio::time::timeout(GIVE_BACK_GRACE + Duration::from_secs(1), tracker.wait()).await;
    }
    // The sweep stops before the leftovers are released (both would return the same ids).
    stop_maintenance.cancel();
    let _ = maintenance.await;
    let _ = budget_watch.await;
    let _ = cancel_listener.await;
    let _ = cancel_poll.await;
    let empty = worker.release_leftovers().await;
    // The heartbeat stops only now: while ids were still in the list, the worker had to look alive.
    stop_beating.cancel();
    let _ = heartbeat.await;
    if empty {
        if let Err(e) = worker.broker.deregister(&worker.keys, &worker.id).await {
            tracing::warn!(error = %e, "deregistration failed; the heartbeat will expire");
        }
    } else {
        tracing::warn!("in-flight list not empty; leaving it for recovery by other workers");
    }
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

/// Waits `d`, or less if `stop` fires. Returns false when stopped.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// One hold of an id in [`Worker::held`], released on drop (also when a run panics).
struct Hold<'a> {
    worker: &'a Worker,
    id: String,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if let Ok(mut h) = self.worker.held.lock() {
            if let Some(n) = h.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    h.remove(&self.id);
                }
            }
        }
    }
}

/// Marks a fetch operation finished when dropped, whichever way the operation ends.
struct FetchOp<'a>(&'a AtomicU64);

impl Drop for FetchOp<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// How long a cancel heard for an id no run here holds is remembered: the channel may deliver it
/// before the run it concerns registered (its fetch reply still on the way, which takes at most a
/// blocking wait and a reply timeout). A cancelled task never runs again, so a match is always
/// right to abort.
const EARLY_CANCEL_TTL: Duration = Duration::from_secs(10);
/// At most this many such cancels are remembered (every worker of a queue hears all its cancels);
/// past it the poll still finds them.
const EARLY_CANCEL_CAP: usize = 4096;
/// Task records the cancel poll reads per round trip.
const CANCEL_POLL_BATCH: usize = 128;
/// How often the cancel channel's connection is checked with a PING: one that died without a
/// reset (a vanished peer) would otherwise just look quiet.
const CANCEL_PING_EVERY: Duration = Duration::from_secs(15);

/// The runs this process is executing, by task id, each with its run's token and the
/// [`CancellationToken`] that aborts it (`run()` races its execute step against it). A run is
/// registered for its execute step only; [`RunGuard`] removes it, also when the run panics.
#[derive(Default)]
struct Running {
    inner: Mutex<RunningInner>,
}

#[derive(Default)]
struct RunningInner {
    /// Source of [`RunEntry::serial`].
    serial: u64,
    /// Task id → its runs here (one, save for a stale copy of a recovered task).
    runs: HashMap<String, Vec<RunEntry>>,
    /// Cancels heard for ids no run here held, and when (see [`EARLY_CANCEL_TTL`]).
    early: HashMap<String, Instant>,
}

struct RunEntry {
    serial: u64,
    token: String,
    abort: CancellationToken,
}

/// A registered run, one of [`Running::snapshot`]'s rows: (task id, serial, the run's token).
type RunRow = (String, u64, String);

/// One registered run; leaves the registry when dropped.
pub(crate) struct RunGuard<'a> {
    running: &'a Running,
    id: String,
    serial: u64,
    abort: CancellationToken,
}

impl RunGuard<'_> {
    /// Resolves once the run's task was cancelled (or finished elsewhere): the run must stop.
    pub(crate) fn aborted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.abort.cancelled()
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.running.lock();
        if let Some(runs) = inner.runs.get_mut(&self.id) {
            runs.retain(|r| r.serial != self.serial);
            if runs.is_empty() {
                inner.runs.remove(&self.id);
            }
        }
    }
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunningInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a run of `id`; aborted at once when a cancel of `id` was heard just before.
    fn register(&self, id: &str, token: &str) -> RunGuard<'_> {
        let abort = CancellationToken::new();
        let mut inner = self.lock();
        inner.serial += 1;
        let serial = inner.serial;
        if inner
            .early
            .remove(id)
            .is_some_and(|at| at.elapsed() < EARLY_CANCEL_TTL)
        {
            abort.cancel();
        }
        inner.runs.entry(id.to_owned()).or_default().push(RunEntry {
            serial,
            token: token.to_owned(),
            abort: abort.clone(),
        });
        drop(inner);
        RunGuard {
            running: self,
            id: id.to_owned(),
            serial,
            abort,
        }
    }

    /// A cancel of `id` heard on the channel: aborts every run of it here and returns how many.
    /// When none is registered (yet), the id is remembered for a run that registers late.
    fn cancel(&self, id: &str) -> usize {
        let mut inner = self.lock();
        if let Some(runs) = inner.runs.get(id) {
            for r in runs {
                r.abort.cancel();
            }
            return runs.len();
        }
        if inner.early.len() >= EARLY_CANCEL_CAP {
            inner.early.retain(|_, at| at.elapsed() < EARLY_CANCEL_TTL);
        }
        if inner.early.len() < EARLY_CANCEL_CAP {
            inner.early.insert(id.to_owned(), Instant::now());
        }
        0
    }

    /// Aborts one run (by its serial); false when it is gone.
    fn abort(&self, id: &str, serial: u64) -> bool {
        let inner = self.lock();
        match inner
            .runs
            .get(id)
            .and_then(|runs| runs.iter().find(|r| r.serial == serial))
        {
            Some(r) => {
                r.abort.cancel();
                true
            }
            None => false,
        }
    }

    /// The runs registered now and not aborted yet.
    fn snapshot(&self) -> Vec<RunRow> {
        let inner = self.lock();
        inner
            .runs
            .iter()
            .flat_map(|(id, runs)| {
                runs.iter()
                    .filter(|r| !r.abort.is_cancelled())
                    .map(move |r| (id.clone(), r.serial, r.token.clone()))
            })
            .collect()
    }
}

/// Whether the poll aborts a run, given its record's `status`: when the record is gone or the
/// task is final (cancelled, or finished by another run). Never for a status that is still
/// running or retrying, whatever the token: a stale run keeps today's fencing (its report is
/// refused and counted as `fenced`).
fn poll_aborts(status: Option<&str>) -> bool {
    match status {
        None => true,
        Some(s) => matches!(s, "succeeded" | "failed" | "cancelled"),
    }
}

impl Worker {
    fn ttl(&self) -> Duration {
        self.cfg.common.result_ttl
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Takes ids: first whatever is pending (up to the permits held), else one blocking wait.
    /// Returns the runs started; each is held (see [`Worker::held`]) before the operation ends.
    /// The blocking wait moves a ticket (one per pending id, `common/src/queue/fair.lua`), and the
    /// fetch after it spends that ticket on the tenant whose turn it is.
    async fn fetch_some(
        &self,
        n: usize,
        stop: &CancellationToken,
    ) -> redis::RedisResult<FetchOutcome> {
        self.fetches_started.fetch_add(1, Ordering::SeqCst);
        let _op = FetchOp(&self.fetches_finished);
        let hb = self.cfg.heartbeat;
        let fetched = self
            .broker
            .fetch(&self.keys, &self.id, n, None, self.ttl(), hb)
            .await?;
        if !fetched.started.is_empty() || fetched.capped {
            // capped: the tickets are still pending, so a blocking wait would return at once
            self.hold_all(&fetched.started);
            return Ok(FetchOutcome {
                started: fetched.started,
                stop: false,
                capped: fetched.capped,
            });
        }
        // The blocking wait is never cancelled half-way, so what it moved is never lost.
        let Some(id) = self
            .broker
            .wait_for_task(&self.blocking, &self.keys, &self.id, BLOCK)
            .await?
        else {
            return Ok(FetchOutcome {
                started: Vec::new(),
                stop: false,
                capped: false,
            });
        };
        if stop.is_cancelled() {
            self.give_back_unstarted(&id, None).await;
            return Ok(FetchOutcome {
                started: Vec::new(),
                stop: true,
                capped: false,
            });
        }
        let fetched = self
            .broker
            .fetch(&self.keys, &self.id, 0, Some(&id), self.ttl(), hb)
            .await?;
        self.hold_all(&fetched.started);
        Ok(FetchOutcome {
            started: fetched.started,
            stop: false,
            capped: fetched.capped,
        })
    }

    /// Holds are taken here and handed over to the runs (see `fetch_loop`); counting them now
    /// keeps the sweep from seeing a started run unheld.
    fn hold_all(&self, started: &[StartedTask]) {
        if let Ok(mut h) = self.held.lock() {
            for t in started {
                *h.entry(t.id.clone()).or_insert(0) += 1;
            }
        }
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
            // A group of results (complete_many.lua) ends many runs at once: their tasks are
            // woken together, so let them release their slots before counting the free ones,
            // and one fetch takes work for all of them instead of one fetch per slot.
            tokio::task::yield_now().await;
            while permits.len() < self.cfg.fetch_batch {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let started = match self.fetch_some(permits.len(), &stop).await {
                Ok(FetchOutcome { stop: true, .. }) => break,
                Ok(FetchOutcome {
                    started, capped, ..
                }) => {
                    errors = 0;
                    if started.is_empty() && capped {
                        // Every tenant with work is at its max_running: wait for a run of this
                        // worker to end (which may free its tenant), or a little while (a run
                        // elsewhere may end), instead of spinning on the tickets.
                        drop(permits);
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = self.run_ended.notified() => {}
                            _ = tokio::time::sleep(CAPPED_PAUSE) => {}
                        }
                        continue;
                    }
                    started
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
                let me = self.clone();
                let hard = hard.clone();
                tracker.spawn(async move {
                    // the hold taken by fetch_some, now owned by this run
                    let hold = Hold {
                        worker: &me,
                        id: task.id.clone(),
                    };
                    // Boxed: a run's future holds every step's state (7,176 bytes in a
                    // release build, under tokio's 16 KiB threshold for boxing it itself),
                    // which tokio would otherwise copy whole as the task moves into its
                    // cell and again when the output replaces it: ~2 % of the worker's CPU
                    // in a 0 ms drain (loadtest/bench/README.md, "A run's future, boxed").
                    Box::pin(me.run_guarded(task, &hard)).await;
                    drop(hold);
                    drop(permit);
                    me.run_ended.notify_waiters();
                });
            }
        }
        tracing::info!("fetching stopped");
    }

    /// Gives an id back to pending unrun (`return.lua`): only if it is still in this worker's list.
    async fn give_back_unstarted(&self, id: &str, token: Option<&str>) {
        match self
            .broker
            .return_unstarted(&self.keys, &self.id, id, token)
            .await
        {
            Ok(verdict) => tracing::debug!(task.id = id, verdict, "returned unstarted"),
            Err(e) => {
                tracing::warn!(task.id = id, error = %e, "could not return task; heartbeat expiry will recover it")
            }
        }
    }

    /// After the drain: ids still in this worker's in-flight list go back to pending (abandoned
    /// runs as give-backs, with their token). True when the list is empty afterwards, so the worker
    /// may deregister; otherwise the others recover what is left once the heartbeat expires.
    async fn release_leftovers(&self) -> bool {
        let left = match self.broker.inflight_ids(&self.keys, &self.id).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read in-flight list; heartbeat expiry will recover it");
                return false;
            }
        };
        let abandoned = self
            .abandoned
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default();
        // A run still going after the grace (its report stuck behind a slow Redis) may have called
        // the LLM: returning its id tokenless would uncount that attempt. It is left in the list,
        // so the worker stays registered and recovery takes it over, counted.
        let still_held: HashSet<String> = self
            .held
            .lock()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default();
        for id in &left {
            match abandoned.get(id) {
                Some(token) => self.give_back_run(id, token).await,
                None if still_held.contains(id) => {
                    tracing::warn!(task.id = %id, "a run still holds this id at exit; leaving it to recovery")
                }
                None => self.give_back_unstarted(id, None).await,
            }
        }
        matches!(self.broker.inflight_ids(&self.keys, &self.id).await, Ok(ids) if ids.is_empty())
    }

    /// Retries a Redis write until it succeeds: the outcome of an LLM call (already paid for) is
    /// never dropped because Redis blinked. After a hard stop it gives up `GIVE_BACK_GRACE` later
    /// (None): the run is then left to the give-back at exit or to recovery, and the token keeps
    /// whichever of them lands second from writing anything.
    async fn persist<T, F, Fut>(
        &self,
        what: &'static str,
        hard: &CancellationToken,
        mut op: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut tries: u32 = 0;
        let mut give_up_at: Option<Instant> = None;
        loop {
            if hard.is_cancelled() {
                let at = *give_up_at.get_or_insert_with(|| Instant::now() + GIVE_BACK_GRACE);
                if Instant::now() >= at {
                    return None;
                }
            }
            match op().await {
                Ok(v) => return Some(v),
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
}

impl Worker {
    /// Registers a run for its execute step (see [`Running`]).
    pub(crate) fn register_run(&self, id: &str, token: &str) -> RunGuard<'_> {
        self.running.register(id, token)
    }

    /// Listens on the queue's cancel channel (`cancel.lua` publishes a running task's id there)
    /// and aborts the matching run. The pub/sub connection does not reconnect by itself: when it
    /// drops (or stops answering PINGs) it is made again with backoff, warning once per outage,
    /// and the poll then runs at once for whatever was published meanwhile.
    async fn listen_for_cancels(self: Arc<Self>, redis: Redis, stop: CancellationToken) {
        use futures::StreamExt;
        let channel = self.keys.cancels();
        let mut failures: u32 = 0;
        loop {
            let subscribed = tokio::select! {
                _ = stop.cancelled() => return,
                r = async {
                    let mut ps = redis.pubsub().await?;
                    ps.subscribe(&channel).await?;
                    redis::RedisResult::Ok(ps)
                } => r,
            };
            let lost = match subscribed {
                Ok(ps) => {
                    if failures > 0 {
                        tracing::info!(channel = %channel, "cancel channel subscribed again");
                        self.poll_cancels_now.notify_one();
                    }
                    failures = 0;
                    let (mut sink, mut messages) = ps.split();
                    let mut ping = tokio::time::interval(CANCEL_PING_EVERY);
                    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    ping.tick().await;
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            m = messages.next() => match m {
                                Some(m) => {
                                    let Ok(id) = m.get_payload::<String>() else { continue };
                                    let n = self.running.cancel(&id);
                                    if n > 0 {
                                        tracing::debug!(task.id = %id, runs = n, "cancel heard; aborting the run");
                                    }
                                }
                                None => break "the connection closed".to_owned(),
                            },
                            _ = ping.tick() => {
                                match tokio::time::timeout(
                                    agentq_common::redis_conn::RESPONSE_TIMEOUT,
                                    sink.ping::<redis::Value>(),
                                ).await {
                                    Ok(Ok(_)) => {}
                                    Ok(Err(e)) => break e.to_string(),
                                    Err(_) => break "no answer to PING".to_owned(),
                                }
                            }
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            failures = failures.saturating_add(1);
            if failures == 1 {
                tracing::warn!(
                    channel = %channel,
                    error = %lost,
                    "cancel channel lost; subscribing again (meanwhile the poll aborts cancelled runs)"
                );
            }
            let wait = full_jitter(
                failures.min(6),
                Duration::from_millis(100),
                Duration::from_secs(3),
            );
            if !pause(wait, &stop).await {
                return;
            }
        }
    }

    /// The backstop of the cancel channel: every `AGENTQ_CANCEL_POLL_MS`, reads the `status` and
    /// `token` of every registered run's record (pipelined) and aborts a run whose record is gone
    /// or whose task is final ([`poll_aborts`]). Reads nothing while no run is registered.
    async fn poll_cancels(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.cancel_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.poll_cancels_now.notified() => {}
            }
            let runs = self.running.snapshot();
            for batch in runs.chunks(CANCEL_POLL_BATCH) {
                let ids: Vec<&str> = batch.iter().map(|(id, _, _)| id.as_str()).collect();
                let states = match self.broker.run_states(&self.keys, &ids).await {
                    Ok(s) => s,
                    Err(e) => {
                        // Redis away: nothing is aborted on a guess; the next tick tries again
                        tracing::debug!(error = %e, "cancel poll failed");
                        break;
                    }
                };
                for ((id, serial, token), status) in batch.iter().zip(states) {
                    if poll_aborts(status.as_deref()) && self.running.abort(id, *serial) {
                        tracing::debug!(
                            task.id = %id,
                            status = status.as_deref().unwrap_or("<record gone>"),
                            run_token = %token,
                            "the task is final or gone; aborting the run"
                        );
                    }
                }
            }
        }
    }
}

/// Time in ms; re-exported for tests that inspect task timestamps.
pub fn now() -> i64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_batch_settings_default_on_and_refuse_bad_values() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let s = complete_batch_settings(&env(&[]))
            .expect("defaults")
            .expect("on by default");
        assert_eq!(s.max_items, DEFAULT_COMPLETE_BATCH);
        assert_eq!(s.max_wait, Duration::from_millis(DEFAULT_COMPLETE_WAIT_MS));
        let s = complete_batch_settings(&env(&[
            (ENV_COMPLETE_BATCH, "16"),
            (ENV_COMPLETE_WAIT_MS, " 3 "),
        ]))
        .expect("valid")
        .expect("on");
        assert_eq!((s.max_items, s.max_wait), (16, Duration::from_millis(3)));
        // 1: every result on its own, as before batching
        assert!(complete_batch_settings(&env(&[(ENV_COMPLETE_BATCH, "1")]))
            .expect("valid")
            .is_none());
        for (var, bad) in [
            (ENV_COMPLETE_BATCH, "0"),
            (ENV_COMPLETE_BATCH, "1001"),
            (ENV_COMPLETE_BATCH, "many"),
            (ENV_COMPLETE_WAIT_MS, "-1"),
            (ENV_COMPLETE_WAIT_MS, "10001"),
        ] {
            let e = complete_batch_settings(&env(&[(var, bad)])).expect_err(bad);
            assert_eq!(e.var, var, "{bad}");
        }
    }

    #[test]
    fn a_cancel_aborts_every_run_of_its_id_and_only_those() {
        let running = Running::default();
        let a = running.register("q.a", "1");
        let stale = running.register("q.a", "2");
        let b = running.register("q.b", "1");
        assert_eq!(running.snapshot().len(), 3);
        assert_eq!(running.cancel("q.a"), 2);
        assert!(a.abort.is_cancelled() && stale.abort.is_cancelled());
        assert!(!b.abort.is_cancelled());
        // aborted runs are no longer polled
        let rows = running.snapshot();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].0.as_str(), rows[0].2.as_str()), ("q.b", "1"));
        drop((a, stale, b));
        assert!(running.snapshot().is_empty());
        assert!(
            running.lock().runs.is_empty(),
            "guards unregister their runs"
        );
    }

    #[test]
    fn the_poll_aborts_one_run_by_its_serial() {
        let running = Running::default();
        let old = running.register("q.a", "1");
        let new = running.register("q.a", "2");
        assert!(running.abort("q.a", new.serial));
        assert!(new.abort.is_cancelled() && !old.abort.is_cancelled());
        let serial = old.serial;
        drop(old);
        assert!(!running.abort("q.a", serial), "an ended run is gone");
    }

    #[test]
    fn a_cancel_heard_before_its_run_registered_aborts_it_at_once() {
        let running = Running::default();
        assert_eq!(running.cancel("q.early"), 0);
        let run = running.register("q.early", "1");
        assert!(run.abort.is_cancelled());
        // remembered once: another id, or the same id again, starts clean
        let other = running.register("q.other", "1");
        assert!(!other.abort.is_cancelled());
        drop(run);
        let again = running.register("q.early", "2");
        assert!(!again.abort.is_cancelled());
    }

    #[test]
    fn remembered_cancels_are_bounded() {
        let running = Running::default();
        for i in 0..(EARLY_CANCEL_CAP + 100) {
            running.cancel(&format!("q.{i}"));
        }
        assert_eq!(running.lock().early.len(), EARLY_CANCEL_CAP);
        // stale entries are pruned to make room
        for at in running.lock().early.values_mut() {
            *at = at.checked_sub(EARLY_CANCEL_TTL).expect("uptime > 10 s");
        }
        running.cancel("q.late");
        let inner = running.lock();
        assert_eq!(inner.early.len(), 1);
        assert!(inner.early.contains_key("q.late"));
    }

    #[test]
    fn only_a_gone_or_final_record_aborts_a_run() {
        assert!(poll_aborts(None));
        for s in ["succeeded", "failed", "cancelled"] {
            assert!(poll_aborts(Some(s)), "{s}");
        }
        // still running (perhaps under another run's token) or between attempts: fencing decides
        for s in ["running", "retrying", "queued", "requires_action"] {
            assert!(!poll_aborts(Some(s)), "{s}");
        }
    }

    #[tokio::test]
    async fn a_guard_dropped_by_a_panic_unregisters_its_run() {
        let running = Arc::new(Running::default());
        let r = running.clone();
        let joined = tokio::spawn(async move {
            let _run = r.register("q.a", "1");
            panic!("run panicked");
        })
        .await;
        assert!(joined.is_err());
        assert!(running.snapshot().is_empty());
    }
}
