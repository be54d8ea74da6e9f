//! One run of one task, in two steps: *execute* (read the payload and the agent's memory, call the
//! LLM; cancelled by the drain's hard stop) and *report* (write the outcome with the run's token;
//! retried through Redis outages, never cancelled half-way). A panic anywhere in the run is caught
//! here and reported like a transient failure, so no id is ever stranded.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use agentq_common::backoff;
use agentq_common::queue::{Completion, FailMode, MemoryAppend, MemoryWrite};
use agentq_common::task::{Message, Payload, Role, StartedTask};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::{LlmFailure, Worker};

/// What a run's execute step ended with; the report step writes it.
pub(crate) enum Outcome {
    Success {
        result_json: String,
        /// The key of the agent's memory (`Payload::agent_key`: `<tenant>~<agent>` for a
        /// tenant's agent), appended to with the result.
        agent_id: Option<String>,
        exchange: Vec<String>,
        /// The answering call's usage, written with the result.
        usage: Option<agentq_common::queue::UsageAdd>,
        /// For a workflow's node: its output and a plan's children, for `wf.lua`.
        node: Option<Box<agentq_common::queue::NodeDone>>,
        /// The answer's text not on the event stream yet (`complete.lua` appends it).
        rest: agentq_common::queue::StreamRest,
    },
    Failure(LlmFailure),
    /// The record cannot be run at all: dead-letter it now, never call the LLM.
    Poison(String),
    /// The drain deadline cut the run short: back to pending, attempt uncounted.
    GiveBack,
    /// The flow limiter could not admit a call on any of the task's models: park the task until
    /// this time (ms), attempt uncounted.
    Throttled(i64),
    /// The model asked for client-side tools: record the step and wait for the client's outputs
    /// (`requires_action`), holding no slot.
    Suspend {
        /// The step's messages (the assistant's reply with its calls), JSON each.
        messages: Vec<String>,
        /// The calls the client must answer (JSON array).
        pending: String,
        due_ms: i64,
        usage: Option<agentq_common::queue::UsageAdd>,
    },
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

/// The lane name of a task's agent (namespaced by its tenant, `tenant::agent_key`), read only
/// when the payload names an agent (most do not, and a second full parse per task would show
/// in the worker's cost per task).
fn agent_of(payload: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct AgentOnly {
        agent_id: Option<String>,
        tenant: Option<String>,
    }
    if !payload.contains("\"agent_id\"") {
        return None;
    }
    serde_json::from_str::<AgentOnly>(payload)
        .ok()
        .and_then(|a| {
            a.agent_id
                .map(|id| agentq_common::tenant::agent_key(a.tenant.as_deref(), &id).into_owned())
        })
}

/// When a task's tool outputs are due, from now.
fn due(payload: &Payload) -> i64 {
    let timeout = i64::try_from(payload.tool_timeout().as_millis()).unwrap_or(i64::MAX);
    agentq_common::time::now_ms().saturating_add(timeout)
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
        // Registered for the execute step only: a cancel (heard on the cancel channel, or found
        // by the poll) aborts it, never the report. Unregistered on drop, also on a panic.
        let registered = self.register_run(&task.id, &task.token);
        // biased, the run first: an answer that arrives with the hard stop (or a cancel) is
        // reported (a cancelled task's report writes nothing), not given back
        let outcome = tokio::select! {
            biased;
            o = self.execute(&task) => Some(o),
            // Dropping the execute future closes the LLM request's connection (the upstream
            // stops generating) and ends any MCP tool call. No report: the task is final (or its
            // record gone) and its token cleared, so there is nothing left for this run to write
            // but to drop its copy of the id from this worker's in-flight list (below).
            _ = registered.aborted() => None,
            _ = hard.cancelled() => Some(Outcome::GiveBack),
        };
        drop(registered);
        match outcome {
            Some(outcome) => {
                self.report(
                    &task.id,
                    &task.token,
                    (task.attempt, task.rate_limited),
                    outcome,
                    started,
                    hard,
                )
                .await
            }
            None => {
                self.count("cancelled", started);
                tracing::info!(task.id = %task.id, attempt = task.attempt, "run aborted: task cancelled");
                // a copy left behind (Redis away now) is found by the orphan sweep, which gives
                // it back through return.lua: a final task's copy is dropped there
                if let Err(e) = self.broker.forget(&self.keys, &self.id, &task.id).await {
                    tracing::warn!(task.id = %task.id, error = %e, "could not drop the cancelled task from the in-flight list; the orphan sweep will");
                }
            }
        }
        // An agent's next task may run once this one is final. Idempotent and cheap when the
        // task is not final yet (a retry, a park, a wait for tool outputs); a release lost here
        // (a crash, Redis away) is made by the api's lane sweep.
        if let Some(agent) = agent_of(&task.payload) {
            if let Err(e) = Box::pin(self.broker.lane_release(&self.keys, &agent)).await {
                tracing::warn!(task.id = %task.id, error = %e, "lane release failed; the sweep will make it");
            }
        }
    }

    async fn execute(&self, task: &StartedTask) -> Outcome {
        if agentq_common::keys::TaskId::parse(&task.id).is_err() {
            return Outcome::Poison("poison: malformed task id".to_owned());
        }
        let mut payload: Payload = match serde_json::from_str(&task.payload) {
            Ok(p) => p,
            Err(e) => return Outcome::Poison(format!("poison: payload does not parse: {e}")),
        };
        if payload.messages.is_empty() {
            return Outcome::Poison("poison: payload has no messages".to_owned());
        }
        // a workflow node reads its parents' results (all final: it runs only after them)
        if payload.workflow.as_ref().is_some_and(|w| w.templated) {
            if let Err(o) = Box::pin(self.render_templates(&mut payload)).await {
                return o;
            }
        }
        let mut models = Vec::with_capacity(1 + payload.fallback_models.len());
        models.push(
            payload
                .model
                .clone()
                .unwrap_or_else(|| self.cfg.model.clone()),
        );
        models.extend(payload.fallback_models.iter().cloned());
        // the agent's memory is its tenant's: `<tenant>~<agent>` (two tenants' agents of one name
        // never read each other's)
        let memory_key = payload
            .memory_agent()
            .map(|agent| agentq_common::tenant::agent_key(payload.tenant.as_deref(), agent));
        let history = match memory_key.as_deref() {
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
        // whole exchanges only: trimming may have cut a tool-call group in two
        let mut messages: Vec<Message> = agentq_common::chat::repair_history(
            history
                .iter()
                .filter_map(|m| serde_json::from_str(m).ok())
                .collect(),
        );
        messages.extend(payload.messages.iter().cloned());
        // A task with tools may be a conversation under way: the steps recorded so far (tool
        // calls and their results) continue it, and no call already recorded is made again.
        let tool_task = payload.uses_tools();
        let mut transcript: Vec<Message> = if tool_task {
            // boxed, like every await only tool tasks reach: a run's future is allocated per
            // task, and its size is that of its largest await (1000 runs in flight)
            match Box::pin(self.broker.transcript(&self.keys, &task.id)).await {
                Ok(lines) => lines
                    .iter()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect(),
                Err(e) => {
                    return Outcome::Failure(LlmFailure::Transient {
                        outcome: "memory",
                        message: format!("task transcript unavailable: {e}"),
                    })
                }
            }
        } else {
            Vec::new()
        };
        // A step still waiting for the client's results (a task redriven after its tool outputs
        // timed out): wait for them again rather than call the model with a split conversation.
        let open = agentq_common::chat::unanswered_calls(&transcript);
        if !open.is_empty() {
            return Outcome::Suspend {
                messages: Vec::new(),
                pending: serde_json::to_string(&open).unwrap_or_else(|_| "[]".to_owned()),
                due_ms: due(&payload),
                usage: None,
            };
        }
        // The MCP tools the task enabled, offered beside its own.
        let mcp_tools = if payload.mcp.is_empty() {
            Vec::new()
        } else {
            match Box::pin(self.mcp.tools_for(&payload.mcp)).await {
                Ok(t) => t,
                Err(message) => {
                    return Outcome::Failure(LlmFailure::Transient {
                        outcome: "mcp",
                        message,
                    })
                }
            }
        };
        // boxed: a Payload inline would add its size to every run's future
        let with_mcp: Option<Box<Payload>> = (!mcp_tools.is_empty()).then(|| {
            let mut p = Box::new(payload.clone());
            p.params
                .tools
                .get_or_insert_with(Vec::new)
                .extend(mcp_tools.iter().map(|t| t.function.clone()));
            p
        });
        let offered: &Payload = with_mcp.as_deref().unwrap_or(&payload);
        messages.extend(transcript.iter().cloned());
        let mut steps_done = transcript
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count() as u32;
        // boxed: it lives across the run's awaits, and the run future is allocated per task
        let mut events = Box::new(crate::emitter::Emitter::new(
            &self.broker,
            &self.keys,
            &task.id,
            &task.token,
            task.attempt,
            steps_done,
            self.cfg.stream_flush,
            self.cfg.stream_flush_bytes,
        ));

        loop {
            let flow = self
                .call_with_flow(task, &models, &messages, offered, &mut events)
                .await;
            let (result, usage) = match flow {
                crate::flow::Flow::Throttled(at) => return Outcome::Throttled(at),
                crate::flow::Flow::Failed(failure) => return Outcome::Failure(failure),
                crate::flow::Flow::Answered(result, usage) => (result, usage),
            };
            let calls = if tool_task {
                result
                    .tool_calls
                    .as_ref()
                    .and_then(agentq_common::chat::tool_calls_from_wire)
            } else {
                None
            };
            let Some(calls) = calls else {
                let rest = events.rest().await;
                let out = self.answered(task, &payload, &transcript, result, usage, rest);
                if matches!(out, Outcome::Failure(_)) {
                    // an invalid plan: the reply was paid for
                    Box::pin(self.add_task_usage(&task.id, usage.as_ref())).await;
                }
                return out;
            };
            let max = payload.max_steps();
            if steps_done + 1 >= max {
                // the reply was paid for, though it ends the task: no client should run tools
                // whose results no model call would read
                Box::pin(self.add_task_usage(&task.id, usage.as_ref())).await;
                return Outcome::Failure(LlmFailure::Permanent {
                    outcome: "max_steps",
                    message: format!(
                        "{}: the model still asked for tools at step {} of max_steps {max}",
                        agentq_common::task::MAX_STEPS,
                        steps_done + 1
                    ),
                });
            }
            // The task's own tools are the client's to run; every other call is answered here:
            // by its MCP server, or as an unknown tool.
            let is_client = |name: &str| {
                payload
                    .params
                    .tools
                    .iter()
                    .flatten()
                    .any(|t| t.function.name == name)
            };
            let client: Vec<agentq_common::chat::ToolCall> = calls
                .iter()
                .filter(|c| is_client(&c.function.name))
                .cloned()
                .collect();
            // the step's text (if any) first, then what the model asked for
            events
                .event(
                    "tool_call",
                    serde_json::json!({ "step": steps_done, "tool_calls": &calls }).to_string(),
                )
                .await;
            let server_results = Box::pin(futures::future::join_all(
                calls
                    .iter()
                    .filter(|c| !is_client(&c.function.name))
                    .map(|c| Box::pin(self.run_server_tool(&mcp_tools, c))),
            ))
            .await;
            let mut step = vec![Message {
                content: (!result.content.is_empty())
                    .then(|| agentq_common::chat::Content::Text(result.content.clone())),
                tool_calls: Some(calls),
                ..Message::text(Role::Assistant, "")
            }];
            if !server_results.is_empty() {
                let results: Vec<serde_json::Value> = server_results
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "tool_call_id": m.tool_call_id,
                            "content": m.content,
                        })
                    })
                    .collect();
                events
                    .event(
                        "tool_result",
                        serde_json::json!({ "step": steps_done, "results": results }).to_string(),
                    )
                    .await;
            }
            step.extend(server_results);
            let step_json: Vec<String> = step
                .iter()
                .filter_map(|m| serde_json::to_string(m).ok())
                .collect();
            if !client.is_empty() {
                return Outcome::Suspend {
                    messages: step_json,
                    pending: serde_json::to_string(&client).unwrap_or_else(|_| "[]".to_owned()),
                    due_ms: due(&payload),
                    usage,
                };
            }
            match Box::pin(self.broker.step(
                &self.keys,
                &task.id,
                &task.token,
                &step_json,
                usage.as_ref(),
            ))
            .await
            {
                Ok(v) if v == "ok" => {}
                verdict => {
                    // not recorded: the call was still paid for; the report that follows is
                    // refused by the fence (or retried) and says what became of the task
                    Box::pin(self.add_task_usage(&task.id, usage.as_ref())).await;
                    let why = match verdict {
                        Ok(v) => format!("the step was not recorded: {v}"),
                        Err(e) => format!("the step could not be recorded: {e}"),
                    };
                    return Outcome::Failure(LlmFailure::Transient {
                        outcome: "checkpoint",
                        message: why,
                    });
                }
            }
            steps_done += 1;
            events.next_step(steps_done).await;
            messages.extend(step.iter().cloned());
            transcript.extend(step);
        }
    }

    /// One server-side tool call: its MCP server's answer, or an error the model reads.
    async fn run_server_tool(
        &self,
        mcp_tools: &[crate::tools::mcp::McpTool],
        call: &agentq_common::chat::ToolCall,
    ) -> Message {
        let text = match mcp_tools
            .iter()
            .find(|t| t.function.function.name == call.function.name)
        {
            Some(tool) => {
                let started = Instant::now();
                let text = self.mcp.call(tool, &call.function.arguments).await;
                let outcome = if text.starts_with("error:") {
                    "error"
                } else {
                    "ok"
                };
                self.metrics
                    .mcp_calls
                    .with_label_values(&[tool.server.as_str(), outcome])
                    .inc();
                tracing::debug!(
                    server = %tool.server,
                    tool = %tool.name,
                    outcome,
                    took_ms = started.elapsed().as_millis() as u64,
                    "mcp tool call"
                );
                text
            }
            None => format!(
                "error: there is no tool named {:?}; the tools offered are the only ones",
                call.function.name
            ),
        };
        Message {
            role: Role::Tool,
            content: Some(agentq_common::chat::Content::Text(if text.is_empty() {
                "(no output)".to_owned()
            } else {
                text
            })),
            name: None,
            tool_calls: None,
            tool_call_id: Some(call.id.clone()),
        }
    }

    /// The model's final answer: the result, and the exchange for the agent's memory (the
    /// task's messages, every step, the answer).
    fn answered(
        &self,
        task: &StartedTask,
        payload: &Payload,
        transcript: &[Message],
        result: agentq_common::task::TaskResult,
        usage: Option<agentq_common::queue::UsageAdd>,
        rest: agentq_common::queue::StreamRest,
    ) -> Outcome {
        let node = match payload.workflow.as_deref() {
            Some(n) => match self.node_done(task, payload, n, &result.content) {
                Ok(done) => Some(Box::new(done)),
                Err(message) => {
                    // the plan's reply was paid for, though it ends the node
                    return Outcome::Failure(LlmFailure::Permanent {
                        outcome: "invalid_plan",
                        message,
                    });
                }
            },
            None => None,
        };
        let result_json = serde_json::to_string(&result).unwrap_or_default();
        let mut exchange = Vec::new();
        if payload.memory_agent().is_some() && self.cfg.memory_messages > 0 {
            exchange.extend(
                payload
                    .messages
                    .iter()
                    .chain(transcript.iter())
                    .filter(|m| !matches!(m.role, Role::System | Role::Developer))
                    .filter_map(|m| serde_json::to_string(m).ok()),
            );
            // the reply as the model gave it, tool calls included (a group whose results never
            // come is dropped when the memory is read)
            let tool_calls = result
                .tool_calls
                .as_ref()
                .and_then(agentq_common::chat::tool_calls_from_wire);
            if !result.content.is_empty() || tool_calls.is_some() {
                let reply = Message {
                    content: (!result.content.is_empty())
                        .then_some(agentq_common::chat::Content::Text(result.content)),
                    tool_calls,
                    ..Message::text(Role::Assistant, "")
                };
                exchange.extend(serde_json::to_string(&reply).ok());
            }
        }
        Outcome::Success {
            result_json,
            // the memory's key, namespaced like the read in `execute`
            agent_id: payload.agent_key().map(std::borrow::Cow::into_owned),
            exchange,
            usage,
            node,
            rest,
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
        let outcome = match outcome {
            Outcome::Success {
                result_json,
                agent_id,
                exchange,
                usage,
                node,
                rest,
            } => {
                let done = Completion {
                    id: id.to_owned(),
                    token: token.to_owned(),
                    result_json,
                    memory: agent_id.filter(|_| !exchange.is_empty()).map(|agent_key| {
                        MemoryWrite {
                            agent_key,
                            messages: exchange,
                            keep: self.cfg.memory_messages,
                            ttl: self.cfg.memory_ttl,
                        }
                    }),
                    usage,
                    node: node.map(|n| *n),
                    rest,
                };
                self.report_success(done, attempt, started, hard).await;
                return;
            }
            other => other,
        };
        let (mode, delay, error, what) = match &outcome {
            Outcome::Success { .. } => unreachable!("a success is reported above"),
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
            Outcome::Suspend {
                messages,
                pending,
                due_ms,
                usage,
            } => {
                let step = agentq_common::queue::Suspend {
                    messages,
                    pending,
                    due_ms: *due_ms,
                    usage: usage.as_ref(),
                };
                let verdict = Box::pin(self.persist("suspend", hard, || {
                    self.broker.suspend(&self.keys, &self.id, id, token, &step)
                }))
                .await;
                if verdict.as_deref().is_some_and(|v| v != "requires_action") {
                    // not this run's write: its call was still paid for
                    self.add_task_usage(id, usage.as_ref()).await;
                }
                let status = |v: &str| match v {
                    "requires_action" => "requires_action",
                    "cancelled" => "cancelled",
                    "stale" => "fenced",
                    _ => "duplicate",
                };
                self.finish(id, token, attempt, verdict, status, started);
                return;
            }
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

    /// Writes a success with the run's token: with the next group of results when batching is on
    /// (`complete_many.lua`, each item fenced alone), else with its own `complete.lua` call.
    async fn report_success(
        &self,
        done: Completion,
        attempt: u32,
        started: Instant,
        hard: &CancellationToken,
    ) {
        // shared with the batcher's queue; a resend after an error sends it again
        let done = std::sync::Arc::new(done);
        let (id, token, usage) = (done.id.as_str(), done.token.as_str(), done.usage);
        let verdict = match &self.completer {
            Some(batcher) => {
                self.persist("complete", hard, || batcher.complete(done.clone()))
                    .await
            }
            None => {
                let memory = done.memory.as_ref().map(|m| MemoryAppend {
                    agent_id: &m.agent_key,
                    messages: m.messages.clone(),
                    keep: m.keep,
                    ttl: m.ttl,
                });
                self.persist("complete", hard, || {
                    self.broker.complete(
                        &self.keys,
                        &self.id,
                        id,
                        token,
                        &done.result_json,
                        self.ttl(),
                        memory.as_ref(),
                        usage.as_ref(),
                        done.node.as_ref(),
                        &done.rest,
                    )
                })
                .await
            }
        };
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
