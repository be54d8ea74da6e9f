//! A run's model call under flow control: for the task's model, then each of its
//! `fallback_models`, route to the upstream that serves it, reserve the call with the fleet-wide
//! limiter, call, and settle the reservation to what the upstream reported. What the upstream
//! says about its limits (a 429's reset, a limit lower than configured, a limit with nothing
//! left) is shared with the whole fleet through the limiter. See docs/architecture.md, "Flow
//! control".

use std::time::Duration;

use agentq_common::flow::budget::{cost_nanos, scope_shown_to, scopes_of, usd};
use agentq_common::flow::{
    Admission, Charge, Estimate, Hold, Line, Reservation, Route, Settlement,
};
use agentq_common::graph::CapHold;
use agentq_common::queue::UsageAdd;
use agentq_common::task::{
    Fallback, Message, OnBudget, Payload, StartedTask, TaskResult, BUDGET_EXCEEDED,
};
use agentq_common::time::now_ms;

use crate::llm::{tokens, Call};
use crate::{LlmFailure, Worker};

/// What the flow step ended with.
pub(crate) enum Flow {
    /// The answer, and the answering call's usage for the task's counters (written with the
    /// result by `complete.lua`).
    Answered(TaskResult, Option<UsageAdd>),
    Failed(LlmFailure),
    /// No model could be called now: park the task until this time (ms since the epoch).
    Throttled(i64),
}

/// How long past the LLM timeout a concurrency lease may outlive its call: a worker killed
/// mid-call holds its slot no longer than this.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// How long a node waits when its workflow's `max_cost_usd` is held by other nodes' calls.
const WORKFLOW_CAP_WAIT_MS: i64 = 500;

/// How often a worker repeats a learned limit that has not changed (`learn.lua` keeps one for an
/// hour after it was last told).
const RETELL: Duration = Duration::from_secs(600);

impl Worker {
    pub(crate) async fn call_with_flow(
        &self,
        task: &StartedTask,
        models: &[String],
        messages: &[Message],
        payload: &Payload,
        events: &mut crate::emitter::Emitter<'_>,
    ) -> Flow {
        let implicit = self.cfg.upstreams.implicit;
        // the task's own caps need what it used so far (all attempts, all steps)
        let capped = payload.max_cost_usd.is_some() || payload.max_total_tokens.is_some();
        let used_so_far = if capped {
            match self.broker.task_usage(&self.keys, &task.id).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(error = %e, "task usage unavailable; parking the task");
                    return Flow::Throttled(now_ms() + 1000);
                }
            }
        } else {
            (0, 0)
        };
        // the most a call can write: the task's own cap, else the operator's, else the
        // limiter's assumption for uncapped calls
        let output = payload
            .params
            .output_cap()
            .unwrap_or(if self.cfg.max_tokens > 0 {
                self.cfg.max_tokens
            } else {
                self.cfg.limiter_output_tokens
            });
        // tool definitions are part of the prompt the model reads
        let tools_tokens = payload.params.tools.as_ref().map_or(0, |t| {
            serde_json::to_vec(t).map_or(0, |b| (b.len() as u64).div_ceil(3))
        });
        let output_and_tools = u64::from(output) + tools_tokens;
        let mut fallbacks: Vec<Fallback> = Vec::new();
        let mut eligible: Option<i64> = None;
        let mut failure: Option<LlmFailure> = None;
        // a budget's refusal: parked until this time (on_budget wait), or this failure (fail)
        let mut budget_wait: Option<i64> = None;
        let mut budget_failure: Option<LlmFailure> = None;
        for (i, model) in models.iter().enumerate() {
            let last = i + 1 == models.len();
            let Some(route) = self.cfg.upstreams.route(model) else {
                // the file changed since the task was accepted
                let message = format!("model {model:?} is not served by any upstream");
                fallbacks.push(skipped(model, "", "unrouted"));
                failure.get_or_insert(LlmFailure::Permanent {
                    outcome: "client_error",
                    message,
                });
                continue;
            };
            let Some(llm) = self.llms.get(&route.upstream.name) else {
                continue;
            };
            let (up, label) = (route.upstream.name.as_str(), llm.label(model));
            // The heuristic (one token per 3 bytes) costs nothing; the real tokenizer only where a
            // tpm limit is configured, and only for a call Redis decides (one admitted from a
            // grant is far from every limit: its estimate only sizes what is settled after).
            let exact = tpm_configured(&route);
            let quick = tokens::prompt_tokens(model, messages, false) + output_and_tools;
            let estimate = Estimate {
                quick,
                exact: || {
                    if exact {
                        tokens::prompt_tokens(model, messages, true) + output_and_tools
                    } else {
                        quick
                    }
                },
            };
            let lease = format!("{}:{}:{i}", task.id, task.token);
            let line = match (last, task.turn_at_ms > 0) {
                (false, _) => Line::Probe,
                (true, false) => Line::Join,
                (true, true) => Line::Turn,
            };
            // Budgets first: their worst case is the prompt's estimate plus the output cap at
            // the model's prices. A model with no price costs nothing and no budget binds it.
            let worst_tokens = quick;
            // the upstream's own price for the model, else AGENTQ_PRICES
            let price = route
                .upstream
                .prices
                .get(model)
                .or_else(|| self.cfg.prices.get(model))
                .copied();
            let worst = price.map_or(0, |p| {
                cost_nanos(
                    worst_tokens.saturating_sub(u64::from(output)),
                    u64::from(output),
                    p,
                )
            });
            if let Some(why) = over_task_cap(payload, used_so_far, worst_tokens, worst) {
                self.metrics
                    .budget_refusals
                    .with_label_values(&["task"])
                    .inc();
                fallbacks.push(skipped(model, up, "task_budget"));
                failure.get_or_insert(LlmFailure::Permanent {
                    outcome: BUDGET_EXCEEDED,
                    message: format!("{BUDGET_EXCEEDED}: {why}"),
                });
                continue;
            }
            let scopes = if self.budget.any() {
                // a tenant's call: the fleet-wide limits, its quota and its own budgets
                self.budget.applying(scopes_of(
                    payload.tenant.as_deref(),
                    &self.cfg.queue,
                    payload.agent_id.as_deref(),
                    model,
                ))
            } else {
                Vec::new()
            };
            let held: Vec<String> = if scopes.is_empty() {
                Vec::new()
            } else {
                match self
                    .budget
                    .budgets
                    .reserve(
                        &scopes,
                        &lease,
                        worst,
                        self.cfg.llm_timeout + LEASE_MARGIN,
                        now_ms(),
                    )
                    .await
                {
                    Ok(Hold::Held(h)) => h,
                    Ok(Hold::Wait {
                        scope,
                        eligible_at_ms,
                        limit_nanos,
                        spent_nanos,
                        held_nanos,
                        holds_only,
                    }) => {
                        self.metrics
                            .budget_refusals
                            .with_label_values(&[&scope])
                            .inc();
                        fallbacks.push(skipped(model, up, "budget"));
                        // a tenant reads its own budgets under the names it gave them
                        let scope = scope_shown_to(payload.tenant.as_deref(), &scope);
                        if payload.on_budget == OnBudget::Wait || holds_only {
                            budget_wait = Some(
                                budget_wait.map_or(eligible_at_ms, |e: i64| e.min(eligible_at_ms)),
                            );
                        } else {
                            budget_failure.get_or_insert(LlmFailure::Permanent {
                                outcome: BUDGET_EXCEEDED,
                                message: format!(
                                    "{BUDGET_EXCEEDED}: budget {scope} (${:.6}) has ${:.6} spent and ${:.6} in flight; this call may cost up to ${:.6}",
                                    usd(limit_nanos), usd(spent_nanos), usd(held_nanos), usd(worst)
                                ),
                            });
                        }
                        continue;
                    }
                    Ok(Hold::TooLarge { scope, limit_nanos }) => {
                        self.metrics
                            .budget_refusals
                            .with_label_values(&[&scope])
                            .inc();
                        fallbacks.push(skipped(model, up, "budget"));
                        let scope = scope_shown_to(payload.tenant.as_deref(), &scope);
                        budget_failure.get_or_insert(LlmFailure::Permanent {
                            outcome: BUDGET_EXCEEDED,
                            message: format!(
                                "{BUDGET_EXCEEDED}: this call may cost up to ${:.6}, more than budget {scope}'s whole ${:.6}",
                                usd(worst), usd(limit_nanos)
                            ),
                        });
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "budgets unavailable; parking the task");
                        eligible = Some(now_ms() + 1000);
                        continue;
                    }
                }
            };
            let mut charge_base = ChargeBase {
                task_id: &task.id,
                hold: &lease,
                scopes: &held,
                tenant: payload.tenant.as_deref(),
                agent: payload.agent_id.as_deref(),
                model,
                price,
                worst,
                workflow: None,
            };
            // a workflow's max_cost_usd: the same hold, against every node's calls in flight
            if let Some(node) = payload.workflow.as_deref().filter(|n| n.capped) {
                let hold = Box::pin(self.broker.workflow_hold(
                    &self.cfg.queue,
                    &node.workflow,
                    &lease,
                    worst,
                    self.cfg.llm_timeout + LEASE_MARGIN,
                ))
                .await;
                match hold {
                    Ok(CapHold::Held) => charge_base.workflow = Some(&node.workflow),
                    Ok(CapHold::Refused { cap, spent, held }) => {
                        let _ = self.charge(&charge_base, None, false).await;
                        self.metrics
                            .budget_refusals
                            .with_label_values(&["workflow"])
                            .inc();
                        fallbacks.push(skipped(model, up, "workflow_budget"));
                        if spent.saturating_add(worst) <= cap {
                            // only the other nodes' calls in flight are in the way: they settle
                            // (usually below their worst case) within a call's time
                            let at = now_ms() + WORKFLOW_CAP_WAIT_MS;
                            budget_wait = Some(budget_wait.map_or(at, |e: i64| e.min(at)));
                            continue;
                        }
                        budget_failure.get_or_insert(LlmFailure::Permanent {
                            outcome: BUDGET_EXCEEDED,
                            message: format!(
                                "{BUDGET_EXCEEDED}: workflow {} max_cost_usd ${:.6} has ${:.6} spent and ${:.6} in flight; this call may cost up to ${:.6}",
                                node.workflow, usd(cap), usd(spent), usd(held), usd(worst)
                            ),
                        });
                        continue;
                    }
                    Err(e) => {
                        let _ = self.charge(&charge_base, None, false).await;
                        tracing::warn!(error = %e, "workflow cost cap unavailable; parking the task");
                        eligible = Some(now_ms() + 1000);
                        continue;
                    }
                }
            }
            let admission = self
                .limiter
                .reserve_estimated(
                    &route,
                    implicit,
                    estimate,
                    &lease,
                    self.cfg.llm_timeout + LEASE_MARGIN,
                    line,
                )
                .await;
            if !matches!(admission, Ok(Admission::Admitted(_))) {
                // not called: the hold goes back whole
                let _ = self.charge(&charge_base, None, false).await;
            }
            let reservation = match admission {
                Ok(Admission::Admitted(r)) => r,
                Ok(Admission::Wait {
                    eligible_at_ms,
                    reason,
                    ..
                }) => {
                    self.metrics
                        .limiter_throttled
                        .with_label_values(&[up, label, reason.as_str()])
                        .inc();
                    eligible = Some(eligible.map_or(eligible_at_ms, |e| e.min(eligible_at_ms)));
                    fallbacks.push(skipped(model, up, reason.as_str()));
                    continue;
                }
                Ok(Admission::TooLarge { tpm }) => {
                    self.metrics
                        .limiter_throttled
                        .with_label_values(&[up, label, "too_large"])
                        .inc();
                    fallbacks.push(skipped(model, up, "too_large"));
                    // rare: counted again for the message
                    let estimate = tokens::prompt_tokens(model, messages, exact) + output_and_tools;
                    failure.get_or_insert(LlmFailure::Permanent {
                        outcome: "too_large",
                        message: format!(
                            "the call needs about {estimate} tokens (prompt + output cap), more than the {tpm} tokens per minute {up}/{model} allows"
                        ),
                    });
                    continue;
                }
                Err(e) => {
                    // Redis is away: not the task's fault, so no attempt is used; the park is
                    // written once Redis answers again.
                    tracing::warn!(error = %e, "flow limiter unavailable; parking the task");
                    eligible = Some(now_ms() + 1000);
                    continue;
                }
            };
            self.metrics
                .limiter_admitted
                .with_label_values(&[up, label])
                .inc();
            if reservation.from_grant() {
                self.metrics
                    .limiter_granted
                    .with_label_values(&[up, label])
                    .inc();
            }
            self.metrics
                .limiter_tokens_reserved
                .with_label_values(&[up, label])
                .inc_by(reservation.tokens);
            // dropped mid-call (a cancel's abort, the drain's hard stop), the guard gives back
            // the lease and the holds now rather than when they expire
            let mut in_flight = InFlight {
                worker: self,
                reservation: &reservation,
                charge: &charge_base,
                started: std::time::Instant::now(),
                armed: true,
            };
            // a fallback after a call whose text already went out tells clients to drop it
            events.begin_call(model).await;
            let call = if self.cfg.stream {
                llm.chat_streamed(model, messages, &payload.params, events)
                    .await
            } else {
                let call = llm.chat(model, messages, &payload.params).await;
                if let Ok(r) = &call.result {
                    // not streamed: the whole text at once, so the stream still says it
                    crate::llm::DeltaSink::push(&mut *events, &r.content).await;
                }
                call
            };
            in_flight.armed = false;
            if call.result.is_err() {
                events.call_failed();
            }
            self.settle(&route, label, &reservation, &call).await;
            let usage = self.charge(&charge_base, Some(&call), true).await;
            if usage.is_some() && call.result.is_err() {
                // a failed call that reported usage was paid for: counted now (an answer's
                // usage is written with the result)
                self.add_task_usage(&task.id, usage.as_ref()).await;
            }
            match call.result {
                Ok(mut result) => {
                    result.upstream = Some(up.to_owned());
                    for f in &fallbacks {
                        if !f.upstream.is_empty() {
                            self.metrics
                                .limiter_fallbacks
                                .with_label_values(&[&f.upstream, self.label_any(&f.model)])
                                .inc();
                        }
                    }
                    result.fallbacks = fallbacks;
                    return Flow::Answered(result, usage);
                }
                Err(f @ LlmFailure::Permanent { .. }) => return Flow::Failed(f),
                Err(f) => {
                    fallbacks.push(skipped(model, up, f.outcome()));
                    // a transient failure outranks a 429 (it uses an attempt), which outranks
                    // what the limiter said (a 429 is the upstream's own word)
                    let replace = matches!(
                        (&failure, &f),
                        (None | Some(LlmFailure::Permanent { .. }), _)
                            | (
                                Some(LlmFailure::RateLimited { .. }),
                                LlmFailure::Transient { .. }
                            )
                    );
                    if replace {
                        failure = Some(f);
                    }
                }
            }
        }
        // A budget that refused is the answer unless a call failed in a way that uses an attempt
        // (that failure's retry comes back to the budget anyway).
        if !matches!(
            failure,
            Some(LlmFailure::Transient { .. } | LlmFailure::RateLimited { .. })
        ) {
            if let Some(f) = budget_failure {
                if eligible.is_none() {
                    return Flow::Failed(f);
                }
            }
            if let Some(at) = budget_wait {
                eligible = Some(eligible.map_or(at, |e| e.min(at)));
            }
        }
        match failure {
            Some(f @ (LlmFailure::Transient { .. } | LlmFailure::RateLimited { .. })) => {
                Flow::Failed(f)
            }
            other => match (eligible, other) {
                (Some(at), _) => Flow::Throttled(at),
                (None, Some(f)) => Flow::Failed(f),
                (None, None) => Flow::Failed(LlmFailure::Permanent {
                    outcome: "client_error",
                    message: "no upstream serves the task's models".to_owned(),
                }),
            },
        }
    }

    /// Releases a call's budget hold, charging what it cost, and (`called`) counts the call in
    /// the usage report, the per-agent metric and the `agent_call` log line. An answer without
    /// usage is charged its whole worst case (the provider billed it, for an unknown amount); a
    /// failure without usage is refunded. Returns the call's usage for the task's counters.
    async fn charge(
        &self,
        c: &ChargeBase<'_>,
        call: Option<&Call>,
        called: bool,
    ) -> Option<UsageAdd> {
        let usage = call.and_then(|call| call.usage).map(|u| UsageAdd {
            prompt: u64::from(u.prompt_tokens),
            completion: u64::from(u.completion_tokens),
            cached: u64::from(u.cached_tokens.unwrap_or(0)),
            cost_nanos: c.price.map_or(0, |p| {
                cost_nanos(
                    u64::from(u.prompt_tokens),
                    u64::from(u.completion_tokens),
                    p,
                )
            }),
        });
        let cost = match (call, usage) {
            (_, Some(u)) => u.cost_nanos,
            // an answer from a server that reports no usage: its cost is unknown, so the hold is
            // kept whole (never less than it may have cost)
            (Some(call), None) if call.result.is_ok() => c.worst,
            // a failed call without usage is refunded: errors are not billed
            _ => 0,
        };
        if !c.scopes.is_empty() {
            let charge = Charge {
                hold_id: c.hold,
                scopes: c.scopes,
                cost_nanos: cost,
            };
            if let Err(e) = self.budget.budgets.settle(&charge, now_ms()).await {
                tracing::warn!(error = %e, "could not settle a budget hold; it expires with the call's timeout");
            }
        }
        if let Some(wf) = c.workflow {
            // boxed: only workflow nodes with a cap get here, and an inline script call would
            // grow every run's future (1000 in flight) by its size
            let settled =
                Box::pin(
                    self.broker
                        .workflow_settle(&self.cfg.queue, wf, c.hold, c.worst, cost),
                )
                .await;
            if let Err(e) = settled {
                tracing::warn!(error = %e, "could not settle a workflow's cost hold; it expires with the call's timeout");
            }
        }
        if !called {
            return None;
        }
        let (prompt, completion) = usage.map_or((0, 0), |u| (u.prompt, u.completion));
        if let Ok(mut batch) = self.budget.usage.lock() {
            batch.count(
                now_ms(),
                c.tenant,
                c.agent,
                &self.cfg.queue,
                c.model,
                prompt,
                completion,
                cost,
            );
        }
        if cost > 0 {
            if let Some(agent) = c.agent {
                // namespaced: two tenants' agents of one name are two series
                let key = agentq_common::tenant::agent_key(c.tenant, agent);
                self.metrics
                    .agent_cost
                    .with_label_values(&[self.budget.agent_label(&key)])
                    .inc_by(usd(cost));
            }
        }
        if let Some(call) = call {
            // its own target, so `RUST_LOG=info,agent_call=off` drops it (it is the one line
            // per call at info)
            tracing::info!(
                target: "agent_call",
                model = c.model,
                task.id = c.task_id,
                agent_id = c.agent.unwrap_or(""),
                tenant = c.tenant.unwrap_or(agentq_common::tenant::DEFAULT_TENANT),
                prompt_tokens = prompt,
                completion_tokens = completion,
                cached_tokens = usage.map_or(0, |u| u.cached),
                cost_usd = usd(cost),
                duration_ms = u64::try_from(call.latency.as_millis()).unwrap_or(u64::MAX),
                ok = call.result.is_ok(),
                "agent_call"
            );
        }
        usage
    }

    /// Adds a call's usage to the task's record (`usage.lua`: whichever run made the call).
    pub(crate) async fn add_task_usage(&self, id: &str, usage: Option<&UsageAdd>) {
        let Some(u) = usage else {
            return;
        };
        if let Err(e) = self.broker.add_usage(&self.keys, id, u).await {
            tracing::warn!(task.id = id, error = %e, "could not add the call's usage to the task");
        }
    }

    fn label_any<'a>(&self, model: &'a str) -> &'a str {
        self.llms
            .values()
            .next()
            .map_or("other", |l| l.label(model))
    }

    /// Settles the reservation to the reported usage, and shares what the upstream said about
    /// its limits: a 429 blocks the model for the whole fleet until its reset (or the base delay
    /// when it gave none), a limit with nothing left blocks it until that limit resets, and a
    /// limit lower than configured is learned. Limiter errors are logged, never fatal: a lost
    /// settlement leaves the window conservative for at most a minute, and the lease expires.
    async fn settle(&self, route: &Route<'_>, label: &str, reservation: &Reservation, call: &Call) {
        let up = route.upstream.name.as_str();
        let rate_limited = matches!(call.result, Err(LlmFailure::RateLimited { .. }));
        let used = call
            .usage
            .map(|u| u64::from(u.prompt_tokens) + u64::from(u.completion_tokens));
        let settlement = Settlement {
            used_tokens: used,
            // a 429 was not served, and the provider does not count its tokens
            not_served: rate_limited || !call.reached,
            latency: call.latency,
        };
        let settled = match (used, settlement.not_served) {
            (Some(u), _) => u,
            (None, true) => 0,
            (None, false) => reservation.tokens,
        };
        self.metrics
            .limiter_tokens_used
            .with_label_values(&[up, label])
            .inc_by(settled);
        if let Err(e) = self.limiter.reconcile(reservation, settlement).await {
            tracing::warn!(error = %e, "could not settle a flow reservation; it ages out");
        }
        // A 429 says how long in its own words (the header reader's choice, the same wait the task
        // takes); without any, nobody knows when the limit lifts, so the fleet pauses for the base
        // delay only, while this task backs off on its own count of 429s. A reply that got
        // through but says a limit has nothing left blocks until that limit resets.
        let block_for = match &call.result {
            Err(LlmFailure::RateLimited { retry_after, .. }) => {
                Some(agentq_common::backoff::fleet_block(
                    *retry_after,
                    self.cfg.retry_base,
                    self.cfg.retry_max,
                ))
            }
            // Where limits are configured the limiter already holds the fleet at them, and a
            // reply saying the provider's window is full says nothing new; blocking on it would
            // stop the whole line at once and release it at once. Where nothing is configured,
            // it is the only warning before a 429.
            _ if unconfigured(route) => call.reported.exhausted_for,
            _ => None,
        };
        let block_for = block_for.map(|d| d.min(self.cfg.retry_max));
        // What already binds this model's calls: its own limit or its upstream's, the lower. A
        // reported limit not below that can never refuse a call the limiter admits; learned, it
        // would only open a second window counting the same calls (twice the limiter's work),
        // whose refusals tie with the upstream's.
        let (own, shared) = (route.model_limits, route.upstream.limits);
        let binding = |m: Option<u64>, u: Option<u64>| match (m, u) {
            (Some(m), Some(u)) => Some(m.min(u)),
            (m, u) => m.or(u),
        };
        let lower = |reported: Option<u64>, conf: Option<u64>| match (reported, conf) {
            (Some(r), Some(c)) if r < c => r,
            (Some(r), None) => r,
            _ => 0,
        };
        let learned = (
            lower(call.reported.limit_requests, binding(own.rpm, shared.rpm)),
            lower(call.reported.limit_tokens, binding(own.tpm, shared.tpm)),
        );
        // Told again when it changes, and every RETELL: Redis trusts a learned limit for an hour.
        let news = learned != (0, 0)
            && self
                .learned
                .lock()
                .map(|mut m| {
                    let key = (up.to_owned(), route.model.to_owned());
                    match m.get(&key) {
                        Some((l, at)) if *l == learned && at.elapsed() < RETELL => false,
                        _ => {
                            m.insert(key, (learned, std::time::Instant::now()));
                            true
                        }
                    }
                })
                .unwrap_or(true);
        if block_for.is_none() && !news {
            return;
        }
        let until = block_for.map_or(0, |d| now_ms() + d.as_millis() as i64);
        match self
            .limiter
            .learn(
                route,
                self.cfg.upstreams.implicit,
                until,
                learned.0,
                learned.1,
            )
            .await
        {
            Ok(_) => {
                if let Some(d) = block_for {
                    self.metrics
                        .limiter_blocked_seconds
                        .with_label_values(&[up, label])
                        .inc_by(d.as_secs_f64());
                    tracing::info!(
                        upstream = up,
                        model = route.model,
                        block_ms = d.as_millis() as u64,
                        "upstream says its limit is reached; blocking it for the whole fleet"
                    );
                }
            }
            Err(e) => {
                if let Ok(mut m) = self.learned.lock() {
                    m.remove(&(up.to_owned(), route.model.to_owned()));
                }
                tracing::warn!(error = %e, "could not share the upstream's limits with the fleet");
            }
        }
    }
}

/// A tokens-per-minute limit is configured for the model or its upstream: only there does the
/// prompt's exact token count matter before the call.
pub(crate) fn tpm_configured(route: &Route<'_>) -> bool {
    route.model_limits.tpm.is_some() || route.upstream.limits.tpm.is_some()
}

/// No rpm or tpm configured for the model or its upstream.
fn unconfigured(route: &Route<'_>) -> bool {
    let (m, u) = (route.model_limits, route.upstream.limits);
    m.rpm.is_none() && m.tpm.is_none() && u.rpm.is_none() && u.tpm.is_none()
}

fn skipped(model: &str, upstream: &str, reason: &str) -> Fallback {
    Fallback {
        model: model.to_owned(),
        upstream: upstream.to_owned(),
        reason: reason.to_owned(),
    }
}

/// An admitted call in flight. Dropped while armed (the run was dropped mid-call), it releases the
/// call's limiter lease (its reserved tokens stay counted: the provider may have served the
/// request) and refunds its budget and workflow holds, on a task of its own: a cancelled task's
/// slot and money come back at once instead of after the LLM timeout.
struct InFlight<'a> {
    worker: &'a Worker,
    reservation: &'a agentq_common::flow::Reservation,
    charge: &'a ChargeBase<'a>,
    started: std::time::Instant,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let limiter = self.worker.limiter.clone();
        let budgets = self.worker.budget.budgets.clone();
        let broker = self.worker.broker.clone();
        let queue = self.worker.cfg.queue.clone();
        let reservation = self.reservation.clone();
        let hold = self.charge.hold.to_owned();
        let scopes = self.charge.scopes.to_vec();
        let workflow = self.charge.workflow.map(str::to_owned);
        let worst = self.charge.worst;
        let latency = self.started.elapsed();
        rt.spawn(async move {
            let settled = Settlement {
                used_tokens: None,
                not_served: false,
                latency,
            };
            if let Err(e) = limiter.reconcile(&reservation, settled).await {
                tracing::debug!(error = %e, "an aborted call's lease was not released; it ages out");
            }
            if !scopes.is_empty() {
                let charge = Charge {
                    hold_id: &hold,
                    scopes: &scopes,
                    cost_nanos: 0,
                };
                if let Err(e) = budgets.settle(&charge, now_ms()).await {
                    tracing::debug!(error = %e, "an aborted call's budget hold was not refunded; it expires");
                }
            }
            if let Some(wf) = workflow {
                if let Err(e) = broker.workflow_settle(&queue, &wf, &hold, worst, 0).await {
                    tracing::debug!(error = %e, "an aborted call's workflow hold was not refunded; it expires");
                }
            }
        });
    }
}

/// A call's budget hold, for [`Worker::charge`].
struct ChargeBase<'a> {
    task_id: &'a str,
    hold: &'a str,
    scopes: &'a [String],
    /// The task's tenant (`None`: the default), for the usage report and the agent label.
    tenant: Option<&'a str>,
    agent: Option<&'a str>,
    model: &'a str,
    /// The model's price at this upstream (none: it costs nothing).
    price: Option<agentq_common::config::Price>,
    /// The hold's amount (nano-dollars).
    worst: i64,
    /// The workflow whose `max_cost_usd` holds the same amount, if one does.
    workflow: Option<&'a str>,
}

/// Why the task's own caps refuse a call that may use `tokens` and cost `cost` (nano-dollars)
/// on top of what the task used so far, if they do.
fn over_task_cap(
    payload: &Payload,
    (used_tokens, used_cost): (u64, i64),
    tokens: u64,
    cost: i64,
) -> Option<String> {
    if let Some(max) = payload.max_total_tokens {
        if used_tokens.saturating_add(tokens) > u64::from(max) {
            return Some(format!(
                "the task used {used_tokens} tokens of its max_total_tokens {max}; this call may use up to {tokens} more"
            ));
        }
    }
    if let Some(max) = payload.max_cost_usd {
        if usd(used_cost.saturating_add(cost)) > max {
            return Some(format!(
                "the task cost ${:.6} of its max_cost_usd ${max}; this call may cost up to ${:.6} more",
                usd(used_cost),
                usd(cost)
            ));
        }
    }
    None
}
