//! The task model: what a client submits, what is stored in Redis, and what the API shows.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::keys::{validate_queue, TaskId};
use crate::time::{format_ms, now_ms};

pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
pub const MAX_MESSAGES: usize = 1000;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_NAME_LEN: usize = 128;
/// Most models a task may fall back to after its own.
pub const MAX_FALLBACK_MODELS: usize = 4;
/// Model calls of one task's tool loop when the task does not say.
pub const DEFAULT_MAX_STEPS: u32 = 8;
/// The highest `AGENTQ_MAX_STEPS_CAP` may go.
pub const MAX_STEPS_LIMIT: u32 = 1000;
/// How long a task waits for client tool outputs when it does not say (1 h).
pub const DEFAULT_TOOL_TIMEOUT_SECS: u32 = 3600;
/// The longest a task may wait for client tool outputs (7 days).
pub const MAX_TOOL_TIMEOUT_SECS: u32 = 7 * 24 * 3600;
/// The prefix of a task's `error` when its tool outputs never came; `error_code` `tool_timeout`.
pub const TOOL_TIMEOUT: &str = "tool_timeout";
/// The prefix of a task's `error` when its model still wanted tools at `max_steps`.
pub const MAX_STEPS: &str = "max_steps";
/// The prefix of a plan node's `error` when its answer was not a valid plan.
pub const INVALID_PLAN: &str = "invalid_plan";
/// The prefix of a workflow node's `error` when a template could not be filled.
pub const TEMPLATE: &str = "template";

use crate::chat::{ChatParams, ResponseFormat, Stop, Tool, ToolChoice};
pub use crate::chat::{Message, Role};

/// The body of `POST /v1/tasks`. Unknown fields are refused so typos do not pass silently.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub model: Option<String>,
    /// Models to try, in order, when the model's upstream is blocked, over its limits or failing.
    pub fallback_models: Option<Vec<String>>,
    pub agent_id: Option<String>,
    pub queue: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    pub max_attempts: Option<u32>,
    pub metadata: Option<Map<String, Value>>,
    /// Most the task may cost, in dollars, over all its attempts and steps.
    pub max_cost_usd: Option<f64>,
    /// Most tokens (prompt + completion) the task may use over all its attempts and steps.
    #[serde(default, deserialize_with = "whole_number")]
    pub max_total_tokens: Option<u32>,
    /// What a call refused by a budget does: `fail` (default) or `wait`.
    pub on_budget: Option<OnBudget>,
    // The chat-completions parameters, passed through to every model call of the task.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "whole_number")]
    pub max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "whole_number")]
    pub max_completion_tokens: Option<u32>,
    pub stop: Option<Stop>,
    #[serde(default, deserialize_with = "whole_i64")]
    pub seed: Option<i64>,
    pub response_format: Option<ResponseFormat>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub user: Option<String>,
    /// Most model calls of the task's tool loop (default 8, at most `AGENTQ_MAX_STEPS_CAP`).
    #[serde(default, deserialize_with = "whole_number")]
    pub max_steps: Option<u32>,
    /// How long the task waits for client tool outputs before it fails (default 1 h).
    #[serde(default, deserialize_with = "whole_number")]
    pub tool_timeout_secs: Option<u32>,
    /// MCP servers (declared in `AGENTQ_MCP_SERVERS`) whose tools the model is offered.
    pub mcp: Option<Vec<crate::mcp::McpUse>>,
    /// An item of `POST /v1/tasks/batch` only: its idempotency key (a single task takes the
    /// `Idempotency-Key` header; elsewhere this field is refused by name, see
    /// [`CreateTask::refuse_idempotency_field`]).
    pub idempotency_key: Option<String>,
}

impl CreateTask {
    /// 422 naming `idempotency_key` where the body's field has no meaning (a single task, a
    /// workflow node): it belongs to batch items.
    pub fn refuse_idempotency_field(&self, instead: &str) -> Result<(), FieldError> {
        match self.idempotency_key {
            Some(_) => Err(FieldError::new(
                "idempotency_key",
                format!("only an item of POST /v1/tasks/batch takes this field; {instead}"),
            )),
            None => Ok(()),
        }
    }
}

/// What a task does when a budget refuses its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBudget {
    /// `failed` with error code `budget_exceeded`, not retried, listed with the dead letters.
    #[default]
    Fail,
    /// Parked outside `pending` until the budget's window frees enough.
    Wait,
}

/// The prefix of a task's `error` when a budget or a per-task cap stopped it; `error_code` in
/// the task's view.
pub const BUDGET_EXCEEDED: &str = "budget_exceeded";
/// The largest `max_cost_usd` a task takes.
pub const MAX_TASK_COST_USD: f64 = 1e6;

/// A JSON number with no fractional part, as JSON Schema's `integer` (and the OpenAPI document)
/// defines it: `3` and `3.0` are the same number. Out of range or fractional is an error.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(f))
            .map(|f| f as u64)
    });
    whole
        .and_then(|w| u32::try_from(w).ok())
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected a whole number between 0 and {}, got {n}",
                u32::MAX
            ))
        })
}

/// A JSON integer (`seed`), `3.0` included, within i64.
fn whole_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    n.as_i64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (-9.2e18..=9.2e18).contains(f))
                .map(|f| f as i64)
        })
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("expected a whole number, got {n}")))
}

/// A client mistake, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// What the worker needs to run a task; stored as JSON in the task hash's `payload` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "is_fail")]
    pub on_budget: OnBudget,
    /// The chat-completions parameters sent with each model call.
    #[serde(default, skip_serializing_if = "ChatParams::is_empty")]
    pub params: ChatParams,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_timeout_secs: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp: Vec<crate::mcp::McpUse>,
    /// The workflow node this task is (set by `POST /v1/workflows`, never by a task body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<Box<crate::graph::NodeRef>>,
    /// An OpenAI chat completion (set by the front door, `/v1/chat/completions` and batches,
    /// never by a task body), with its semantics: the model's tool calls are the answer
    /// (`result.tool_calls`, `finish_reason` `tool_calls`) instead of a tool loop that suspends
    /// for the client's outputs, and the client owns the conversation (it sends the whole of it
    /// each time), so no agent memory is read or written: `agent_id` still orders the agent's
    /// tasks and counts their spend.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chat_completion: bool,
    /// The tenant the task belongs to (set by the api from the caller's token, never by a task
    /// body); absent for the default tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Payload {
    /// Whether the task runs a tool loop: it declared tools, or enabled MCP servers, and is not
    /// a chat completion (whose tool calls are its answer).
    pub fn uses_tools(&self) -> bool {
        !self.chat_completion && (self.params.tools.is_some() || !self.mcp.is_empty())
    }

    /// The agent whose memory the task reads and extends: none for a chat completion.
    pub fn memory_agent(&self) -> Option<&str> {
        self.agent_id.as_deref().filter(|_| !self.chat_completion)
    }

    /// The tenant's id, [`crate::tenant::DEFAULT_TENANT`] when the task has none.
    pub fn tenant(&self) -> &str {
        self.tenant
            .as_deref()
            .unwrap_or(crate::tenant::DEFAULT_TENANT)
    }

    /// The name of the agent's lane and memory keys: namespaced by the tenant (see
    /// [`crate::tenant::agent_key`]).
    pub fn agent_key(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.agent_id
            .as_deref()
            .map(|a| crate::tenant::agent_key(self.tenant.as_deref(), a))
    }

    pub fn max_steps(&self) -> u32 {
        self.max_steps.unwrap_or(DEFAULT_MAX_STEPS)
    }

    pub fn tool_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(
            self.tool_timeout_secs.unwrap_or(DEFAULT_TOOL_TIMEOUT_SECS),
        ))
    }
}

fn is_fail(o: &OnBudget) -> bool {
    *o == OnBudget::Fail
}

impl NewTask {
    /// Checks the task's `mcp` servers against the declared ones (`AGENTQ_MCP_SERVERS`).
    pub fn check_mcp(&self, declared: &crate::mcp::McpServers) -> Result<(), FieldError> {
        crate::mcp::validate_uses(&self.payload.mcp, declared)
    }

    /// Checks `max_steps` against the operator's cap (`AGENTQ_MAX_STEPS_CAP`).
    pub fn check_steps(&self, cap: u32) -> Result<(), FieldError> {
        match self.payload.max_steps {
            Some(n) if n > cap => Err(FieldError::new(
                "max_steps",
                format!("must be between 1 and {cap} (AGENTQ_MAX_STEPS_CAP)"),
            )),
            _ => Ok(()),
        }
    }

    /// Checks that every model the task names is served (`AGENTQ_UPSTREAMS`); the implicit
    /// upstream serves any. A task that could never run is refused now, not dead-lettered later.
    pub fn check_models(&self, upstreams: &crate::flow::Upstreams) -> Result<(), FieldError> {
        if let Some(m) = &self.payload.model {
            if !upstreams.serves(m) {
                return Err(FieldError::new(
                    "model",
                    format!("{m:?} is not served by any upstream (see GET /v1/upstreams)"),
                ));
            }
        }
        for (i, m) in self.payload.fallback_models.iter().enumerate() {
            if !upstreams.serves(m) {
                return Err(FieldError::new(
                    &format!("fallback_models[{i}]"),
                    format!("{m:?} is not served by any upstream (see GET /v1/upstreams)"),
                ));
            }
        }
        Ok(())
    }
}

/// A validated submission, ready to enqueue.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub queue: String,
    pub max_attempts: u32,
    pub payload: Payload,
}

/// `metadata`: any JSON object, up to [`MAX_METADATA_BYTES`] serialized.
pub fn check_metadata(meta: Option<&Map<String, Value>>) -> Result<(), FieldError> {
    let size = meta.map_or(0, |m| serde_json::to_vec(m).map_or(usize::MAX, |v| v.len()));
    if size > MAX_METADATA_BYTES {
        return Err(FieldError::new(
            "metadata",
            format!("must serialize to at most {MAX_METADATA_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// `max_cost_usd`: dollars above 0, at most `max`.
pub fn check_cost_cap(cap: Option<f64>, max: f64) -> Result<(), FieldError> {
    match cap {
        Some(c) if !c.is_finite() || c <= 0.0 || c > max => Err(FieldError::new(
            "max_cost_usd",
            format!("must be a number of dollars above 0 and at most {max}"),
        )),
        _ => Ok(()),
    }
}

/// A model or agent name: it lands in Redis keys and (for configured models) metric labels.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'))
}

impl CreateTask {
    /// Checks every field and builds the task. `default_queue` and `default_max_attempts` come
    /// from configuration.
    pub fn validate(
        self,
        default_queue: &str,
        default_max_attempts: u32,
    ) -> Result<NewTask, FieldError> {
        let messages = match (self.prompt, self.messages) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "prompt",
                    "give either prompt or messages, not both",
                ))
            }
            (None, None) => {
                return Err(FieldError::new(
                    "prompt",
                    "a prompt (string) or messages (array) is required",
                ))
            }
            (Some(prompt), None) => {
                if prompt.trim().is_empty() {
                    return Err(FieldError::new("prompt", "must not be empty"));
                }
                vec![Message::user(prompt)]
            }
            (None, Some(messages)) => {
                if messages.is_empty() {
                    return Err(FieldError::new(
                        "messages",
                        "must hold at least one message",
                    ));
                }
                if messages.len() > MAX_MESSAGES {
                    return Err(FieldError::new(
                        "messages",
                        format!("at most {MAX_MESSAGES} messages"),
                    ));
                }
                crate::chat::validate_messages(&messages)?;
                if !messages.iter().any(|m| m.role == Role::User) {
                    return Err(FieldError::new(
                        "messages",
                        "must hold at least one user message",
                    ));
                }
                messages
            }
        };
        if let Some(model) = &self.model {
            if !valid_name(model) {
                return Err(FieldError::new(
                    "model",
                    "must be 1 to 128 characters of [A-Za-z0-9_.:/-]",
                ));
            }
        }
        let listed = self.fallback_models.unwrap_or_default();
        if listed.len() > MAX_FALLBACK_MODELS {
            return Err(FieldError::new(
                "fallback_models",
                format!("at most {MAX_FALLBACK_MODELS} models"),
            ));
        }
        let mut fallback_models: Vec<String> = Vec::with_capacity(listed.len());
        for (i, m) in listed.into_iter().enumerate() {
            if !valid_name(&m) {
                return Err(FieldError::new(
                    &format!("fallback_models[{i}]"),
                    "must be 1 to 128 characters of [A-Za-z0-9_.:/-]",
                ));
            }
            // a model already in line would only be tried twice: kept once, in its first place
            if self.model.as_deref() != Some(m.as_str()) && !fallback_models.contains(&m) {
                fallback_models.push(m);
            }
        }
        if let Some(agent) = &self.agent_id {
            if !valid_name(agent) {
                return Err(FieldError::new(
                    "agent_id",
                    "must be 1 to 128 characters of [A-Za-z0-9_.:/-]",
                ));
            }
        }
        let queue = self.queue.unwrap_or_else(|| default_queue.to_owned());
        if validate_queue(&queue).is_err() {
            return Err(FieldError::new(
                "queue",
                "must be 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        let max_attempts = self.max_attempts.unwrap_or(default_max_attempts);
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
            return Err(FieldError::new(
                "max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
            ));
        }
        check_metadata(self.metadata.as_ref())?;
        check_cost_cap(self.max_cost_usd, MAX_TASK_COST_USD)?;
        if self.max_total_tokens == Some(0) {
            return Err(FieldError::new("max_total_tokens", "must be at least 1"));
        }
        let params = ChatParams {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_tokens,
            max_completion_tokens: self.max_completion_tokens,
            stop: self.stop,
            seed: self.seed,
            response_format: self.response_format,
            tools: self.tools,
            tool_choice: self.tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            user: self.user,
        };
        let mcp = self.mcp.unwrap_or_default();
        params.validate(&mcp)?;
        if let Some(n) = self.max_steps {
            if !(1..=MAX_STEPS_LIMIT).contains(&n) {
                return Err(FieldError::new(
                    "max_steps",
                    format!("must be between 1 and {MAX_STEPS_LIMIT}"),
                ));
            }
        }
        if let Some(n) = self.tool_timeout_secs {
            if !(1..=MAX_TOOL_TIMEOUT_SECS).contains(&n) {
                return Err(FieldError::new(
                    "tool_timeout_secs",
                    format!("must be between 1 and {MAX_TOOL_TIMEOUT_SECS}"),
                ));
            }
        }
        Ok(NewTask {
            queue,
            max_attempts,
            payload: Payload {
                messages,
                model: self.model,
                fallback_models,
                agent_id: self.agent_id,
                metadata: self.metadata,
                max_cost_usd: self.max_cost_usd,
                max_total_tokens: self.max_total_tokens,
                on_budget: self.on_budget.unwrap_or_default(),
                params,
                max_steps: self.max_steps,
                tool_timeout_secs: self.tool_timeout_secs,
                mcp,
                workflow: None,
                chat_completion: false,
                tenant: None,
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Retrying,
    /// Waiting for the client's tool outputs (`POST /v1/tasks/{id}/tool_outputs`).
    RequiresAction,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "retrying" => Self::Retrying,
            "requires_action" => Self::RequiresAction,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::RequiresAction => "requires_action",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Token usage as the server reported it. Fields added after the first release are optional on
/// read, so records written by an older worker still parse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// The server's total, or prompt + completion when it sent none.
    #[serde(default)]
    pub total_tokens: u32,
    /// Prompt tokens served from the provider's cache (`prompt_tokens_details.cached_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
    /// Completion tokens spent on hidden reasoning (`completion_tokens_details.reasoning_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u32>,
}

/// A successful run's output, stored as JSON in the task hash's `result` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The reply's text; empty when the model answered only with tool calls or a refusal.
    pub content: String,
    pub model: String,
    pub usage: Usage,
    /// Why generation stopped, verbatim (`stop`, `length`, `tool_calls`, `content_filter`, or
    /// whatever the server says: unknown values are kept, not rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The model's refusal text (OpenAI's `message.refusal`), kept instead of failing the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// The tool calls the model asked for, exactly as the server sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// The upstream that answered (`AGENTQ_UPSTREAMS` name; `default` for the implicit one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Models tried before the one that answered, and why each was passed over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<Fallback>,
}

/// A model a run moved on from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub model: String,
    pub upstream: String,
    /// `blocked`, `rpm`, `tpm`, `concurrency`, `too_large`, `rate_limited`, or the failed call's
    /// outcome (`server_error`, `timeout`, `connection_error`, ...).
    pub reason: String,
}

/// A task's usage over all its calls (`usage` in `GET /v1/tasks/{id}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens the upstreams served from their cache, where they reported it.
    pub cached_tokens: u64,
    /// LLM calls that reported usage.
    pub calls: u64,
}

/// The task hash field holding its usage: `prompt|completion|cached|calls|cost` (cost in
/// nano-dollars), summed over every call (`complete.lua`, `usage.lua`).
pub const USAGE_FIELD: &str = "usage";

/// Parses the `usage` field: the usage, and the cost in nano-dollars. Missing or malformed parts
/// count as 0 (a half-broken record must still be inspectable).
pub fn parse_usage(raw: &str) -> (TaskUsage, i64) {
    let mut n = raw.split('|').map(|v| v.parse::<i64>().unwrap_or(0).max(0));
    let mut next = || n.next().unwrap_or(0);
    let (p, c, cached, calls, cost) = (next(), next(), next(), next(), next());
    let u = TaskUsage {
        prompt_tokens: p as u64,
        completion_tokens: c as u64,
        total_tokens: (p as u64).saturating_add(c as u64),
        cached_tokens: cached as u64,
        calls: calls as u64,
    };
    (u, cost)
}

/// `GET /v1/tasks/{id}`: the task as clients see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    pub queue: String,
    pub status: Status,
    pub attempts: u32,
    pub max_attempts: u32,
    pub rate_limited: u32,
    /// How many times the flow limiter parked the task until its turn (never counts an attempt).
    #[serde(default)]
    pub throttled: u32,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub result: Option<TaskResult>,
    pub error: Option<String>,
    /// `budget_exceeded` when a budget or the task's own cap stopped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Tokens of every LLM call the task made, summed over its attempts and steps (failed and
    /// fenced-out calls included: they were paid for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TaskUsage>,
    /// What those calls cost in dollars, at the price table's prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// Model replies the task recorded: each tool round, and the final answer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub steps: u32,
    /// With status `requires_action`: the tool calls the client must answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_action: Option<RequiredAction>,
    /// With `?include=steps`: the messages of every step, oldest first (tool calls, tool results,
    /// the final answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript: Option<Vec<Message>>,
    /// With `?include=input`: the request the task runs, as the api stored it: a task body's
    /// fields (`messages`, a body's `prompt` turned into a user message; the chat parameters at
    /// the top level), for a console or a client that wants to see what was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// For a workflow's node: the workflow and the node's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowLink>,
    /// The tenant that owns the task; absent for the default tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// The workflow a task belongs to (`GET /v1/workflows/{workflow_id}`), and which node it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkflowLink {
    pub workflow_id: String,
    pub node: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a `requires_action` task waits for (the shape of OpenAI's Assistants runs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequiredAction {
    /// Always `submit_tool_outputs`.
    #[serde(rename = "type")]
    pub kind: String,
    pub submit_tool_outputs: SubmitToolOutputs,
    /// When the task fails if the outputs have not come (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitToolOutputs {
    pub tool_calls: Vec<crate::chat::ToolCall>,
}

/// The `error_code` of a task's error, from its prefix.
pub fn error_code(error: &str) -> Option<String> {
    [
        BUDGET_EXCEEDED,
        TOOL_TIMEOUT,
        MAX_STEPS,
        INVALID_PLAN,
        TEMPLATE,
    ]
    .into_iter()
    .find(|code| {
        error
            .strip_prefix(code)
            .is_some_and(|rest| rest.starts_with(':'))
    })
    .map(str::to_owned)
}

impl TaskView {
    /// The messages of the task's steps: its transcript, then the final answer when it succeeded.
    pub fn with_transcript(mut self, h: &HashMap<String, String>) -> Self {
        let mut messages: Vec<Message> = h
            .get(crate::queue::TRANSCRIPT_FIELD)
            .map(|t| {
                t.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(r) = self
            .result
            .as_ref()
            .filter(|_| self.status == Status::Succeeded)
        {
            let tool_calls = r
                .tool_calls
                .as_ref()
                .and_then(crate::chat::tool_calls_from_wire);
            if !r.content.is_empty() || tool_calls.is_some() {
                messages.push(Message {
                    content: (!r.content.is_empty())
                        .then(|| crate::chat::Content::Text(r.content.clone())),
                    tool_calls,
                    ..Message::text(Role::Assistant, "")
                });
            }
        }
        self.transcript = Some(messages);
        self
    }

    /// The task's stored request (see [`Self::input`]). The fields the api sets itself and never
    /// takes from a body (`tenant`, `workflow`, `chat_completion`) are left out: they are shown
    /// elsewhere in the view, or are the api's own bookkeeping. A payload that does not parse
    /// leaves `input` absent, like the other unreadable fields of [`Self::from_hash`].
    pub fn with_input(mut self, h: &HashMap<String, String>) -> Self {
        if let Some(Value::Object(mut m)) = h
            .get("payload")
            .and_then(|p| serde_json::from_str::<Value>(p).ok())
        {
            for internal in ["tenant", "workflow", "chat_completion"] {
                m.remove(internal);
            }
            // the chat parameters are stored together but sent in a task body at its top level
            // (`temperature`, `tools`, ...): shown where the body had them
            if let Some(Value::Object(params)) = m.remove("params") {
                for (k, v) in params {
                    m.entry(k).or_insert(v);
                }
            }
            self.input = Some(Value::Object(m));
        }
        self
    }

    /// Builds the view from the task hash (HGETALL). Fields that do not parse are shown as absent
    /// rather than failing the read: a half-broken record must still be inspectable.
    pub fn from_hash(id: &TaskId, h: &HashMap<String, String>) -> Self {
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
        let ts = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok()).map(format_ms);
        let payload: Option<Payload> = h.get("payload").and_then(|p| serde_json::from_str(p).ok());
        Self {
            id: id.to_string(),
            queue: id.queue().to_owned(),
            status: h
                .get("status")
                .and_then(|s| Status::parse(s))
                .unwrap_or(Status::Failed),
            attempts: num("attempts"),
            max_attempts: num("max_attempts"),
            rate_limited: num("rate_limited"),
            throttled: num("throttled"),
            created_at: ts("created_at"),
            started_at: ts("started_at"),
            finished_at: ts("finished_at"),
            result: h.get("result").and_then(|r| serde_json::from_str(r).ok()),
            error: h.get("error").filter(|e| !e.is_empty()).cloned(),
            error_code: h.get("error").and_then(|e| error_code(e)),
            usage: h
                .get(USAGE_FIELD)
                .map(|raw| parse_usage(raw).0)
                .filter(|u| u.calls > 0),
            cost: h
                .get(USAGE_FIELD)
                .map(|raw| parse_usage(raw))
                .filter(|(u, _)| u.calls > 0)
                .map(|(_, n)| n as f64 / 1e9),
            agent_id: payload.as_ref().and_then(|p| p.agent_id.clone()),
            workflow: payload
                .as_ref()
                .and_then(|p| p.workflow.as_ref())
                .map(|w| WorkflowLink {
                    workflow_id: w.workflow.clone(),
                    node: w.node.clone(),
                }),
            tenant: payload.as_ref().and_then(|p| p.tenant.clone()),
            metadata: payload.and_then(|p| p.metadata),
            steps: num("steps")
                + u32::from(h.get("status").map(String::as_str) == Some("succeeded")),
            required_action: h
                .get(crate::queue::PENDING_FIELD)
                .filter(|_| h.get("status").map(String::as_str) == Some("requires_action"))
                .map(|p| RequiredAction {
                    kind: "submit_tool_outputs".to_owned(),
                    submit_tool_outputs: SubmitToolOutputs {
                        tool_calls: serde_json::from_str(p).unwrap_or_default(),
                    },
                    expires_at: ts("waiting_until"),
                }),
            transcript: None,
            input: None,
        }
    }
}

/// A task the worker has started (one entry of `fetch.lua`'s reply).
#[derive(Debug, Clone)]
pub struct StartedTask {
    pub id: String,
    /// The run's fencing token, minted by `fetch.lua`: every write this run makes carries it, and
    /// Redis refuses it once the run no longer owns the task (recovered, cancelled, reported).
    pub token: String,
    pub attempt: u32,
    pub payload: String,
    pub rate_limited: u32,
    pub created_at_ms: i64,
    pub fetched_at_ms: i64,
    /// The turn the flow limiter gave the task when it parked it (ms; 0: not parked): the run
    /// comes back as the holder of that turn, ahead of the line (`reserve.lua`).
    pub turn_at_ms: i64,
}

impl StartedTask {
    pub fn new(
        id: String,
        token: String,
        attempt: u32,
        payload: String,
        rate_limited: u32,
        created_at_ms: i64,
    ) -> Self {
        Self {
            id,
            token,
            attempt,
            payload,
            rate_limited,
            created_at_ms,
            fetched_at_ms: now_ms(),
            turn_at_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(v: Value) -> Result<NewTask, FieldError> {
        let c: CreateTask =
            serde_json::from_value(v).map_err(|e| FieldError::new("body", e.to_string()))?;
        c.validate("default", 5)
    }

    #[test]
    fn prompt_becomes_one_user_message() {
        let t = create(serde_json::json!({"prompt": "hi"})).expect("valid");
        assert_eq!(t.queue, "default");
        assert_eq!(t.max_attempts, 5);
        assert_eq!(t.payload.messages, vec![Message::user("hi")]);
    }

    #[test]
    fn each_mistake_names_its_field() {
        let cases = [
            (serde_json::json!({}), "prompt"),
            (serde_json::json!({"prompt": "  "}), "prompt"),
            (
                serde_json::json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
                "prompt",
            ),
            (serde_json::json!({"messages": []}), "messages"),
            (
                serde_json::json!({"messages": [{"role": "user", "content": ""}]}),
                "messages[0].content",
            ),
            (
                serde_json::json!({"messages": [{"role": "system", "content": "x"}]}),
                "messages",
            ),
            (
                serde_json::json!({"prompt": "a", "queue": "no spaces"}),
                "queue",
            ),
            (
                serde_json::json!({"prompt": "a", "max_attempts": 0}),
                "max_attempts",
            ),
            (
                serde_json::json!({"prompt": "a", "max_attempts": 101}),
                "max_attempts",
            ),
            (serde_json::json!({"prompt": "a", "model": ""}), "model"),
            (
                serde_json::json!({"prompt": "a", "agent_id": "a b"}),
                "agent_id",
            ),
        ];
        for (body, field) in cases {
            let err = create(body.clone()).expect_err(&body.to_string());
            assert_eq!(err.field, field, "{body}");
        }
    }

    #[test]
    fn max_attempts_is_any_whole_json_number() {
        let t = create(serde_json::json!({"prompt": "a", "max_attempts": 3.0})).expect("3.0 is 3");
        assert_eq!(t.max_attempts, 3);
        for bad in [
            serde_json::json!(2.5),
            serde_json::json!(-1),
            serde_json::json!(4_294_967_296_u64),
            serde_json::json!(1e300),
            serde_json::json!("3"),
        ] {
            let body = serde_json::json!({"prompt": "a", "max_attempts": bad});
            assert!(create(body.clone()).is_err(), "{body}");
        }
    }

    #[test]
    fn view_survives_a_broken_record() {
        let id = TaskId::generate("default").expect("valid");
        let mut h = HashMap::new();
        h.insert("status".to_owned(), "succeeded".to_owned());
        h.insert("result".to_owned(), "{not json".to_owned());
        h.insert("attempts".to_owned(), "x".to_owned());
        let v = TaskView::from_hash(&id, &h);
        assert_eq!(v.status, Status::Succeeded);
        assert_eq!(v.attempts, 0);
        assert!(v.result.is_none());
    }
}
