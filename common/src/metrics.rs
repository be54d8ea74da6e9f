//! Prometheus metrics. The names are a public interface (dashboards, alerts, KEDA triggers use
//! them): extend, never rename. Labels never hold task ids, prompts or secrets.

use prometheus::{
    exponential_buckets, CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

fn registry() -> Registry {
    let r = Registry::new();
    #[cfg(target_os = "linux")]
    {
        // process_cpu_seconds_total, process_resident_memory_bytes, ... for dashboards and benches
        let _ = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
    }
    r
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are fixed in this file, so registration only fails on a programming error caught by tests.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition"),
    )
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    reg(
        r,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .expect("static metric definition"),
    )
}

/// Seconds, from 1 ms to about 17 minutes.
fn duration_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 21).unwrap_or_default()
}

pub fn render(r: &Registry) -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&r.gather(), &mut buf) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    String::from_utf8(buf).unwrap_or_default()
}

#[derive(Clone)]
pub struct ApiMetrics {
    pub registry: Registry,
    /// agentq_tasks_enqueued_total{queue}
    pub enqueued: IntCounterVec,
    /// agentq_queue_depth{queue,state}, state in pending|inflight|retrying|throttled|dead; refreshed per scrape
    pub queue_depth: IntGaugeVec,
    /// agentq_queue_oldest_age_seconds{queue}: age of the next task to run
    pub oldest_age: GaugeVec,
    /// agentq_http_requests_total{method,route,status}
    pub http_requests: IntCounterVec,
    /// agentq_http_request_duration_seconds{method,route}
    pub http_duration: HistogramVec,
    /// agentq_budget_limit_dollars{scope}: each budget's limit; refreshed per scrape
    pub budget_limit: GaugeVec,
    /// agentq_budget_spent_dollars{scope}: settled spend in the budget's current window
    pub budget_spent: GaugeVec,
    /// agentq_budget_reserved_dollars{scope}: worst-case cost of the calls in flight against it
    pub budget_reserved: GaugeVec,
    /// agentq_sse_streams: event streams (SSE) this api process serves now
    pub sse_streams: IntGauge,
    /// agentq_sse_refused_total: event streams refused with 503 (`AGENTQ_MAX_STREAMS`)
    pub sse_refused: prometheus::IntCounter,
    /// agentq_chat_completions_total{mode,outcome}: `POST /v1/chat/completions` calls that got
    /// past validation, by `mode` (`wait`, `stream`) and how they ended: `succeeded`, `failed`,
    /// `cancelled`, `timeout` (answered 202 / a timeout chunk), `disconnected`, `diverged`,
    /// `closed` (the server stopped first), `refused` (no stream place)
    pub chat_completions: IntCounterVec,
    /// agentq_batches_total{status}: batches created (`created`) and ended (`completed`,
    /// `cancelled`, `expired`), counted by the replica that made the change
    pub batches: IntCounterVec,
    /// agentq_batch_requests_total{outcome}: requests of ended batches, by how they ended:
    /// `succeeded`, `failed`, `cancelled`, `expired`
    pub batch_requests: IntCounterVec,
    /// agentq_files_bytes: the bytes stored files are charged together (read at scrape)
    pub files_bytes: IntGauge,
    /// agentq_auth_failures_total: `/v1/*` requests refused 401 (no, bad, revoked or expired
    /// token); the source is in the log line, never a label
    pub auth_failures: prometheus::IntCounter,
    /// agentq_quota_refusals_total{quota}: submissions refused 429 by a tenant quota:
    /// `max_pending`, `enqueue_rate`, `budget`
    pub quota_refusals: IntCounterVec,
    /// agentq_enqueue_group_size{path}: tasks written by one enqueue script call: `single`
    /// (the group commit of concurrent `POST /v1/tasks`) or `batch` (`POST /v1/tasks/batch`)
    pub enqueue_group: HistogramVec,
}

fn budget_gauge(r: &Registry, name: &str, help: &str) -> GaugeVec {
    reg(
        r,
        GaugeVec::new(Opts::new(name, help), &["scope"]).expect("static metric definition"),
    )
}

impl ApiMetrics {
    pub fn new() -> Self {
        let r = registry();
        Self {
            enqueued: counter_vec(
                &r,
                "agentq_tasks_enqueued_total",
                "Tasks accepted and queued.",
                &["queue"],
            ),
            queue_depth: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "agentq_queue_depth",
                        "Tasks in each state of a queue, read from Redis at scrape time.",
                    ),
                    &["queue", "state"],
                )
                .expect("static metric definition"),
            ),
            oldest_age: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "agentq_queue_oldest_age_seconds",
                        "Age of the oldest pending task.",
                    ),
                    &["queue"],
                )
                .expect("static metric definition"),
            ),
            http_requests: counter_vec(
                &r,
                "agentq_http_requests_total",
                "HTTP requests served.",
                &["method", "route", "status"],
            ),
            http_duration: histogram_vec(
                &r,
                "agentq_http_request_duration_seconds",
                "HTTP request latency.",
                &["method", "route"],
                exponential_buckets(0.0001, 2.0, 18).unwrap_or_default(),
            ),
            budget_limit: budget_gauge(
                &r,
                "agentq_budget_limit_dollars",
                "Each budget's limit, read from Redis at scrape time.",
            ),
            budget_spent: budget_gauge(
                &r,
                "agentq_budget_spent_dollars",
                "Settled spend in each budget's current window, read from Redis at scrape time.",
            ),
            budget_reserved: budget_gauge(
                &r,
                "agentq_budget_reserved_dollars",
                "Worst-case cost of the calls in flight against each budget, read at scrape time.",
            ),
            sse_streams: reg(
                &r,
                IntGauge::new(
                    "agentq_sse_streams",
                    "Event streams (SSE) this api process serves now.",
                )
                .expect("static metric definition"),
            ),
            sse_refused: reg(
                &r,
                prometheus::IntCounter::new(
                    "agentq_sse_refused_total",
                    "Event streams refused with 503: the process serves AGENTQ_MAX_STREAMS already.",
                )
                .expect("static metric definition"),
            ),
            chat_completions: counter_vec(
                &r,
                "agentq_chat_completions_total",
                "Chat completions (POST /v1/chat/completions) by mode (wait, stream) and outcome.",
                &["mode", "outcome"],
            ),
            auth_failures: reg(
                &r,
                prometheus::IntCounter::new(
                    "agentq_auth_failures_total",
                    "Requests refused 401: no, bad, revoked or expired bearer token.",
                )
                .expect("static metric definition"),
            ),
            quota_refusals: counter_vec(
                &r,
                "agentq_quota_refusals_total",
                "Submissions refused 429 by a tenant quota (max_pending, enqueue_rate, budget).",
                &["quota"],
            ),
            enqueue_group: histogram_vec(
                &r,
                "agentq_enqueue_group_size",
                "Tasks written by one enqueue script call: path=single is the group commit of concurrent POST /v1/tasks, path=batch a part of POST /v1/tasks/batch.",
                &["path"],
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0],
            ),
            batches: counter_vec(
                &r,
                "agentq_batches_total",
                "Batches (Batch API) created and ended, by status.",
                &["status"],
            ),
            batch_requests: counter_vec(
                &r,
                "agentq_batch_requests_total",
                "Requests of ended batches, by outcome.",
                &["outcome"],
            ),
            files_bytes: reg(
                &r,
                IntGauge::new(
                    "agentq_files_bytes",
                    "Bytes stored files (Batch API) are charged together, read from Redis at scrape time.",
                )
                .expect("static metric definition"),
            ),
            registry: r,
        }
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    /// agentq_tasks_total{queue,status}: succeeded, failed, retried, rate_limited, cancelled,
    /// given_back, duplicate
    pub tasks: IntCounterVec,
    /// agentq_task_duration_seconds{queue}: from start of a run to its result being recorded
    pub task_duration: HistogramVec,
    /// agentq_active_tasks: tasks this worker is running now
    pub active: IntGauge,
    /// agentq_llm_requests_total{model,outcome}: ok, rate_limited, server_error, client_error,
    /// timeout, connection_error, bad_response
    pub llm_requests: IntCounterVec,
    /// agentq_llm_request_duration_seconds{model}
    pub llm_duration: HistogramVec,
    /// agentq_llm_tokens_total{model,direction}: prompt, completion
    pub llm_tokens: IntCounterVec,
    /// agentq_llm_cost_dollars_total{model}
    pub llm_cost: CounterVec,
    /// agentq_agent_cost_dollars_total{agent}: spend by agent id (the first 100 agents this
    /// process sees; later ones count as `other`)
    pub agent_cost: CounterVec,
    /// agentq_budget_refusals_total{scope}: LLM calls a budget (or `task` for a task's own cap)
    /// refused
    pub budget_refusals: IntCounterVec,
    /// agentq_worker_draining: 1 from SIGTERM until exit
    pub draining: IntGauge,
    /// agentq_worker_concurrency: the permit count, for utilisation panels
    pub concurrency: IntGauge,
    /// agentq_queue_wait_seconds{queue}: from enqueue (or retry due time) to a worker starting it
    pub queue_wait: HistogramVec,
    /// agentq_limiter_admitted_total{upstream,model}: calls the fleet-wide limiter let through
    pub limiter_admitted: IntCounterVec,
    /// agentq_limiter_granted_total{upstream,model}: of those, calls admitted from this worker's
    /// grant (a share of the limits taken for a route it calls many times a moment)
    pub limiter_granted: IntCounterVec,
    /// agentq_mcp_calls_total{server,outcome}: MCP tool calls (outcome ok or error); `server` is
    /// a name the operator declared, so the label stays bounded
    pub mcp_calls: IntCounterVec,
    /// agentq_limiter_throttled_total{upstream,model,reason}: calls it held back (rpm, tpm,
    /// concurrency, blocked, too_large)
    pub limiter_throttled: IntCounterVec,
    /// agentq_limiter_tokens_reserved_total{upstream,model}: tokens reserved before calls
    pub limiter_tokens_reserved: IntCounterVec,
    /// agentq_limiter_tokens_used_total{upstream,model}: tokens the reservations settled to
    pub limiter_tokens_used: IntCounterVec,
    /// agentq_limiter_blocked_seconds_total{upstream,model}: fleet-wide block this worker set
    /// after 429s
    pub limiter_blocked_seconds: CounterVec,
    /// agentq_limiter_fallbacks_total{upstream,model}: runs that moved on from this model
    pub limiter_fallbacks: IntCounterVec,
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let r = registry();
        let gauge = |name: &str, help: &str| {
            reg(
                &r,
                IntGauge::new(name, help).expect("static metric definition"),
            )
        };
        Self {
            tasks: counter_vec(
                &r,
                "agentq_tasks_total",
                "Task runs by outcome.",
                &["queue", "status"],
            ),
            task_duration: histogram_vec(
                &r,
                "agentq_task_duration_seconds",
                "Time from a run's start to its outcome.",
                &["queue"],
                duration_buckets(),
            ),
            active: gauge("agentq_active_tasks", "Tasks this worker is running."),
            llm_requests: counter_vec(
                &r,
                "agentq_llm_requests_total",
                "LLM calls by outcome.",
                &["model", "outcome"],
            ),
            llm_duration: histogram_vec(
                &r,
                "agentq_llm_request_duration_seconds",
                "LLM call latency.",
                &["model"],
                duration_buckets(),
            ),
            llm_tokens: counter_vec(
                &r,
                "agentq_llm_tokens_total",
                "LLM tokens used.",
                &["model", "direction"],
            ),
            llm_cost: reg(
                &r,
                CounterVec::new(
                    Opts::new(
                        "agentq_llm_cost_dollars_total",
                        "Estimated LLM spend from the price table.",
                    ),
                    &["model"],
                )
                .expect("static metric definition"),
            ),
            agent_cost: reg(
                &r,
                CounterVec::new(
                    Opts::new(
                        "agentq_agent_cost_dollars_total",
                        "Estimated LLM spend by agent id (first 100 agents per process, then other).",
                    ),
                    &["agent"],
                )
                .expect("static metric definition"),
            ),
            budget_refusals: counter_vec(
                &r,
                "agentq_budget_refusals_total",
                "LLM calls a budget refused (scope task: the task's own cap).",
                &["scope"],
            ),
            draining: gauge(
                "agentq_worker_draining",
                "1 while the worker drains after SIGTERM.",
            ),
            concurrency: gauge(
                "agentq_worker_concurrency",
                "Tasks this worker may run at once.",
            ),
            queue_wait: histogram_vec(
                &r,
                "agentq_queue_wait_seconds",
                "Time a task waited in the queue before a worker started it.",
                &["queue"],
                exponential_buckets(0.0001, 2.0, 24).unwrap_or_default(),
            ),
            limiter_admitted: counter_vec(
                &r,
                "agentq_limiter_admitted_total",
                "LLM calls the fleet-wide limiter admitted.",
                &["upstream", "model"],
            ),
            limiter_granted: counter_vec(
                &r,
                "agentq_limiter_granted_total",
                "LLM calls admitted from this worker's grant of the fleet's limits (part of agentq_limiter_admitted_total).",
                &["upstream", "model"],
            ),
            mcp_calls: counter_vec(
                &r,
                "agentq_mcp_calls_total",
                "MCP tool calls the worker made, by declared server and outcome (ok, error).",
                &["server", "outcome"],
            ),
            limiter_throttled: counter_vec(
                &r,
                "agentq_limiter_throttled_total",
                "LLM calls the fleet-wide limiter held back, by the limit that did it.",
                &["upstream", "model", "reason"],
            ),
            limiter_tokens_reserved: counter_vec(
                &r,
                "agentq_limiter_tokens_reserved_total",
                "Tokens reserved before LLM calls (estimated prompt + output cap).",
                &["upstream", "model"],
            ),
            limiter_tokens_used: counter_vec(
                &r,
                "agentq_limiter_tokens_used_total",
                "Tokens the reservations settled to after the calls.",
                &["upstream", "model"],
            ),
            limiter_blocked_seconds: reg(
                &r,
                CounterVec::new(
                    Opts::new(
                        "agentq_limiter_blocked_seconds_total",
                        "Seconds of fleet-wide block this worker set after an upstream's 429s.",
                    ),
                    &["upstream", "model"],
                )
                .expect("static metric definition"),
            ),
            limiter_fallbacks: counter_vec(
                &r,
                "agentq_limiter_fallbacks_total",
                "Runs that moved on from this upstream and model to a fallback model.",
                &["upstream", "model"],
            ),
            registry: r,
        }
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_exported() {
        let a = ApiMetrics::new();
        a.enqueued.with_label_values(&["q"]).inc();
        a.queue_depth.with_label_values(&["q", "pending"]).set(1);
        let w = WorkerMetrics::new();
        w.tasks.with_label_values(&["q", "succeeded"]).inc();
        w.task_duration.with_label_values(&["q"]).observe(0.1);
        w.llm_requests.with_label_values(&["m", "ok"]).inc();
        w.llm_duration.with_label_values(&["m"]).observe(0.1);
        w.llm_tokens.with_label_values(&["m", "prompt"]).inc();
        w.llm_cost.with_label_values(&["m"]).inc_by(0.5);
        w.limiter_admitted.with_label_values(&["u", "m"]).inc();
        w.limiter_granted.with_label_values(&["u", "m"]).inc();
        w.mcp_calls.with_label_values(&["s", "ok"]).inc();
        w.limiter_throttled
            .with_label_values(&["u", "m", "rpm"])
            .inc();
        w.limiter_tokens_reserved
            .with_label_values(&["u", "m"])
            .inc();
        w.limiter_tokens_used.with_label_values(&["u", "m"]).inc();
        w.limiter_blocked_seconds
            .with_label_values(&["u", "m"])
            .inc();
        w.limiter_fallbacks.with_label_values(&["u", "m"]).inc();
        let text = render(&a.registry) + &render(&w.registry);
        for name in [
            "agentq_tasks_enqueued_total",
            "agentq_queue_depth",
            "agentq_tasks_total",
            "agentq_task_duration_seconds",
            "agentq_active_tasks",
            "agentq_llm_requests_total",
            "agentq_llm_request_duration_seconds",
            "agentq_llm_tokens_total",
            "agentq_llm_cost_dollars_total",
            "agentq_worker_draining",
            "agentq_limiter_admitted_total",
            "agentq_limiter_granted_total",
            "agentq_limiter_throttled_total",
            "agentq_limiter_tokens_reserved_total",
            "agentq_limiter_tokens_used_total",
            "agentq_limiter_blocked_seconds_total",
            "agentq_limiter_fallbacks_total",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
