//! One run of one task, in two steps: *execute* (read the payload and the agent's memory, call the
//! LLM; cancelled by the drain's hard stop) and *report* (write the outcome with the run's token;
//! retried through Redis outages, never cancelled half-way). A panic anywhere in the run is caught
//! here and reported like a transient failure, so no id is ever stranded.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use agentq_common::backoff;
use agentq_common::queue::{FailMode, MemoryAppend};
use agentq_common::task::{Message, Payload, Role, StartedTask};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::{LlmFailure, Worker};

/// What a run's execute step ended with; the report step writes it.
enum Outcome {
    Success {
        result_json: String,
        agent_id: Option<String>,
        exchange: Vec<String>,
        /// The answering call's usage, written with the result.
        usage: Option<agentq_common::queue::UsageAdd>,
    },
    Failure(LlmFailure),
    /// The record cannot be run at all: dead-letter it now, never call the LLM.
    Poison(String),
    /// The drain deadline cut the run short: back to pending, attempt uncounted.
    GiveBack,
    /// The flow limiter could not admit a call on any of the task's models: park the task until
    /// this time (ms), attempt uncounted.
    Throttled(i64),
}

/// Keeps `agentq_active_tasks` true even when a run is dropped or panics.
struct ActiveGuard<'a>(&'a agentq_common::metrics::WorkerMetrics);

impl<'a> ActiveGuard<'a> {
    fn new(m: &'a agentq_common::metrics::WorkerMetrics) -> Self {
        m.active.inc();
        Self(m)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.dec();
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

impl Worker {
    /// Runs the task; a panic becomes a transient failure of this run (its token still fences it).
    pub(crate) async fn run_guarded(&self, task: StartedTask, hard: &CancellationToken) {
        let id = task.id.clone();
        let token = task.token.clone();
        let attempt = task.attempt;
        let rate_limited = task.rate_limited;
        let started = Instant::now();
        if let Err(p) = AssertUnwindSafe(self.run(task, hard)).catch_unwind().await {
            let message = format!(
                "worker panicked while running the task: {}",
                panic_message(&*p)
            );
            tracing::error!(task.id = %id, attempt, error = %message, "run panicked");
            let failure = LlmFailure::Transient {
                outcome: "panic",
                message,
            };
            self.report(
                &id,
                &token,
                (attempt, rate_limited),
                Outcome::Failure(failure),
                started,
                hard,
            )
            .await;
        }
    }

    async fn run(&self, task: StartedTask, hard: &CancellationToken) {
        let _active = ActiveGuard::new(&self.metrics);
        let started = Instant::now();
        if task.attempt == 1 && task.rate_limited == 0 && task.created_at_ms > 0 {
            let waited = (task.fetched_at_ms - task.created_at_ms).max(0) as f64 / 1000.0;
            self.metrics
                .queue_wait
                .with_label_values(&[self.cfg.queue.as_str()])
                .observe(waited);
        }
        // biased, the run first: an answer that arrives with the hard stop is kept, not given back
        let outcome = tokio::select! {
            biased;
            o = self.execute(&task) => o,
            _ = hard.cancelled() => Outcome::GiveBack,
        };
        self.report(
            &task.id,
            &task.token,
            (task.attempt, task.rate_limited),
            outcome,
            started,
            hard,
        )
        .await;
    }

    async fn execute(&self, task: &StartedTask) -> Outcome {
        if agentq_common::keys::TaskId::parse(&task.id).is_err() {
            return Outcome::Poison("poison: malformed task id".to_owned());
        }
        let payload: Payload = match serde_json::from_str(&task.payload) {
            Ok(p) => p,
            Err(e) => return Outcome::Poison(format!("poison: payload does not parse: {e}")),
        };
        if payload.messages.is_empty() {
            return Outcome::Poison("poison: payload has no messages".to_owned());
        }
        let mut models = Vec::with_capacity(1 + payload.fallback_models.len());
        models.push(
            payload
                .model
                .clone()
                .unwrap_or_else(|| self.cfg.model.clone()),
        );
        models.extend(payload.fallback_models.iter().cloned());
        let history = match &payload.agent_id {
            Some(agent) => match self
                .broker
                .memory(&self.keys, agent, self.cfg.memory_messages)
                .await
            {
                Ok(h) => h,
                Err(e) => {
                    return Outcome::Failure(LlmFailure::Transient {
                        outcome: "memory",
                        message: format!("agent memory unavailable: {e}"),
                    })
                }
            },
            None => Vec::new(),
        };
        let mut messages: Vec<Message> = history
            .iter()
            .filter_map(|m| serde_json::from_str(m).ok())
            .collect();
        messages.extend(payload.messages.iter().cloned());

        match self
            .call_with_flow(task, &models, &messages, &payload)
            .await
        {
            crate::flow::Flow::Throttled(at) => Outcome::Throttled(at),
            crate::flow::Flow::Answered(result, usage) => {
                let result_json = serde_json::to_string(&result).unwrap_or_default();
                let mut exchange = Vec::new();
                if payload.agent_id.is_some() && self.cfg.memory_messages > 0 {
                    exchange.extend(
                        payload
                            .messages
                            .iter()
                            .filter(|m| m.role != Role::System)
                            .filter_map(|m| serde_json::to_string(m).ok()),
                    );
                    let reply = Message {
                        role: Role::Assistant,
                        content: result.content,
                    };
                    exchange.extend(serde_json::to_string(&reply).ok());
                }
                Outcome::Success {
                    result_json,
                    agent_id: payload.agent_id,
                    exchange,
                    usage,
                }
            }
            crate::flow::Flow::Failed(failure) => Outcome::Failure(failure),
        }
    }

    /// Writes the outcome with the run's token. A resend after a lost reply gets the first
    /// verdict back (the scripts remember it), so metrics count each real event once.
    /// `counts` is the run's attempt number and the task's 429s before this run.
    async fn report(
        &self,
        id: &str,
        token: &str,
        counts: (u32, u32),
        outcome: Outcome,
        started: Instant,
        hard: &CancellationToken,
    ) {
        let attempt = counts.0;
        let (mode, delay, error, what) = match &outcome {
            Outcome::Success {
                result_json,
                agent_id,
                exchange,
                usage,
            } => {
                let memory = agent_id
                    .as_deref()
                    .filter(|_| !exchange.is_empty())
                    .map(|agent| MemoryAppend {
                        agent_id: agent,
                        messages: exchange.clone(),
                        keep: self.cfg.memory_messages,
                        ttl: self.cfg.memory_ttl,
                    });
                let verdict = self
                    .persist("complete", hard, || {
                        self.broker.complete(
                            &self.keys,
                            &self.id,
                            id,
                            token,
                            result_json,
                            self.ttl(),
                            memory.as_ref(),
                            usage.as_ref(),
                        )
                    })
                    .await;
                if verdict.as_deref().is_some_and(|v| v != "ok") {
                    // not this run's write: its call was still paid for
                    self.add_task_usage(id, usage.as_ref()).await;
                }
                let status = |v: &str| match v {
                    "ok" => "succeeded",
                    "cancelled" => "cancelled",
                    "stale" => "fenced",
                    _ => "duplicate",
                };
                self.finish(id, token, attempt, verdict, status, started);
                return;
            }
            Outcome::Failure(f) => {
                let (mode, delay) = self.retry_plan(f, counts);
                (mode, delay, f.message().to_owned(), f.outcome())
            }
            Outcome::Poison(reason) => {
                tracing::warn!(task.id = %id, reason = %reason, "dead-lettering poison task");
                (
                    FailMode::Permanent,
                    Duration::ZERO,
                    reason.clone(),
                    "poison",
                )
            }
            Outcome::GiveBack => (FailMode::GiveBack, Duration::ZERO, String::new(), "drain"),
            Outcome::Throttled(at) => {
                let at = *at;
                let verdict = self
                    .persist("park", hard, || {
                        self.broker
                            .park(&self.keys, &self.id, id, token, at, self.ttl())
                    })
                    .await;
                let status = |v: &str| match v {
                    "queued" => "throttled",
                    "cancelled" => "cancelled",
                    "stale" => "fenced",
                    _ => "duplicate",
                };
                if let Some(v) = self.finish(id, token, attempt, verdict, status, started) {
                    tracing::debug!(
                        task.id = %id,
                        verdict = %v,
                        wait_ms = (at - agentq_common::time::now_ms()).max(0),
                        "parked until the flow limiter allows the call"
                    );
                }
                return;
            }
        };
        let verdict = self
            .persist("fail", hard, || {
                self.broker.fail(
                    &self.keys,
                    &self.id,
                    id,
                    token,
                    mode,
                    &error,
                    delay,
                    self.ttl(),
                    self.cfg.max_rate_limited,
                )
            })
            .await;
        let status = |v: &str| match (v, mode) {
            ("retrying", FailMode::RateLimited) => "rate_limited",
            ("retrying", _) => "retried",
            ("queued", FailMode::GiveBack) => "given_back",
            ("failed", _) => "failed",
            ("cancelled", _) => "cancelled",
            ("stale", _) => "fenced",
            _ => "duplicate",
        };
        let Some(verdict) = self.finish(id, token, attempt, verdict, status, started) else {
            return;
        };
        let status = status(&verdict);
        if mode == FailMode::GiveBack {
            tracing::info!(task.id = %id, attempt, verdict = %verdict, "given back to the queue");
        } else {
            tracing::warn!(
                task.id = %id,
                attempt,
                outcome = what,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                status,
                error = %error,
                "task run failed"
            );
        }
    }

    /// Mode and delay for a failed run. Every delay is capped by `AGENTQ_RETRY_MAX_MS`, including
    /// a server's rate-limit hint, so no answer can park a task for longer than the operator
    /// allows. A 429 backs off on the task's own count of 429s (the attempt number does not move
    /// for them), so a limit that lasts is met with growing waits, not a burst.
    fn retry_plan(
        &self,
        f: &LlmFailure,
        (attempt, rate_limited): (u32, u32),
    ) -> (FailMode, Duration) {
        let (base, max) = (self.cfg.retry_base, self.cfg.retry_max);
        match f {
            LlmFailure::Transient { .. } => (
                FailMode::Transient,
                backoff::full_jitter(attempt, base, max),
            ),
            LlmFailure::RateLimited { retry_after, .. } => (
                FailMode::RateLimited,
                backoff::rate_limited(*retry_after, rate_limited.saturating_add(1), base, max),
            ),
            LlmFailure::Permanent { .. } => (FailMode::Permanent, Duration::ZERO),
        }
    }

    /// Counts and logs a report's verdict (`None`: the report never landed, so the run is
    /// abandoned to the give-back at exit). Returns the verdict for further logging.
    fn finish(
        &self,
        id: &str,
        token: &str,
        attempt: u32,
        verdict: Option<String>,
        status: impl Fn(&str) -> &'static str,
        started: Instant,
    ) -> Option<String> {
        let Some(verdict) = verdict else {
            self.abandon(id, token);
            return None;
        };
        let status = status(&verdict);
        self.count(status, started);
        tracing::debug!(task.id = %id, attempt, verdict = %verdict, status, "task finished");
        Some(verdict)
    }

    fn count(&self, status: &str, started: Instant) {
        let queue = self.cfg.queue.as_str();
        self.metrics.tasks.with_label_values(&[queue, status]).inc();
        self.metrics
            .task_duration
            .with_label_values(&[queue])
            .observe(started.elapsed().as_secs_f64());
    }

    /// A report that could not be written in the drain's grace: given back at exit, with its token.
    fn abandon(&self, id: &str, token: &str) {
        tracing::warn!(
            task.id = id,
            "could not record the run before the drain ended; giving it back at exit"
        );
        if let Ok(mut a) = self.abandoned.lock() {
            a.insert(id.to_owned(), token.to_owned());
        }
    }

    /// Gives a run back to pending with its token (`fail.lua` giveback), once, with a bound.
    pub(crate) async fn give_back_run(&self, id: &str, token: &str) {
        let r = tokio::time::timeout(
            crate::GIVE_BACK_GRACE,
            self.broker.fail(
                &self.keys,
                &self.id,
                id,
                token,
                FailMode::GiveBack,
                "",
                Duration::ZERO,
                self.ttl(),
                self.cfg.max_rate_limited,
            ),
        )
        .await;
        match r {
            Ok(Ok(verdict)) => {
                tracing::info!(task.id = id, verdict = %verdict, "given back to the queue")
            }
            // Unconfirmed, not failed: a reply lost to a timeout may still have landed. Either way
            // the token makes whichever of this and a recovery comes second a no-op.
            Ok(Err(e)) => tracing::warn!(
                task.id = id,
                error = %e,
                "give-back unconfirmed; if it did not land, heartbeat expiry recovers the task"
            ),
            Err(_) => tracing::warn!(
                task.id = id,
                "give-back unconfirmed (no reply in time); if it did not land, heartbeat expiry recovers the task"
            ),
        }
    }
}
