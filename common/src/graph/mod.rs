//! Workflows: a graph of nodes, each a normal task (retries, limiter, budgets, fencing apply
//! unchanged), joined by `depends_on` edges with a failure policy on every node.
//!
//! The state lives in one hash per workflow, in its queue's slot (`<prefix>:{<queue>}:wf:<id>`),
//! next to the node tasks. Every node's task is written when the workflow is submitted
//! (`wf_create.lua`), but only the roots are pushed to pending; the others wait outside every
//! list with a counter of open parents. The scripts that make a task final (`complete.lua`,
//! `fail.lua`, `cancel.lua`, `fetch.lua`, `tool_timeout.lua`) end with the shared step of
//! `wf.lua`: record the node's outcome, apply its policy, count down its dependents and push the
//! ones whose last parent just finished — in the same script as the parent's own result, so no
//! worker waits for a parent and no crash can fall between "parent done" and "child queued".
//! docs/architecture.md ("Workflows") has the state machine and the policy table.

pub mod plan;
pub mod template;

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use redis::{RedisResult, Script};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::keys::{validate_queue, TaskId};
use crate::script::declared;
use crate::task::{
    check_cost_cap, check_metadata, parse_usage, CreateTask, FieldError, NewTask, TaskUsage,
};
use crate::time::{format_ms, now_ms};
use crate::Broker;

/// Most nodes a workflow may be submitted with.
pub const MAX_NODES: usize = 1000;
/// Children a plan node may spawn when it does not say (`max_children`).
pub const DEFAULT_MAX_CHILDREN: u32 = 10;
/// The most children one plan node may spawn.
pub const MAX_CHILDREN_LIMIT: u32 = 100;
/// The most children all plan nodes of a workflow may spawn together.
pub const MAX_SPAWNED: u32 = 1000;
/// The largest workflow-level `max_cost_usd`.
pub const MAX_WORKFLOW_COST_USD: f64 = 1e6;
/// Longest node id.
pub const MAX_NODE_ID_LEN: usize = 64;

/// A node id: it appears in templates, in the workflow hash's field names and in plan children's
/// ids (`<plan>.<n>`), so the alphabet is small and has no dot.
pub fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What a node's failure (failed, cancelled, dead-lettered) does to the rest of the workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The workflow fails: every node not yet final is cancelled, running calls aborted.
    #[default]
    FailWorkflow,
    /// Dependents run anyway and see the failure (`{{nodes.<id>.status}}`, `.error`).
    Continue,
    /// Every descendant is skipped; the rest of the workflow goes on.
    Skip,
}

impl OnFailure {
    /// The one-letter form `wf.lua` keeps per node.
    fn code(self) -> &'static str {
        match self {
            Self::FailWorkflow => "f",
            Self::Continue => "c",
            Self::Skip => "s",
        }
    }
}

/// A plain task, or a manager that plans the children the workflow then spawns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Task,
    Plan,
}

fn is_task(k: &Kind) -> bool {
    *k == Kind::Task
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Where a task sits in a workflow: stored in its payload, read by the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    /// The workflow's id.
    pub workflow: String,
    pub node: String,
    /// The node's parents (its `depends_on`), whose results its templates read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<String>,
    #[serde(default, skip_serializing_if = "is_task")]
    pub kind: Kind,
    /// For a plan node: the most children its plan may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_children: Option<u32>,
    /// Its messages hold templates (rendered before the first call).
    #[serde(default, skip_serializing_if = "is_false")]
    pub templated: bool,
    /// The workflow has a `max_cost_usd`: every call holds its worst case against it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub capped: bool,
}

/// The body of `POST /v1/workflows`, read loosely: each node is checked on its own so that an
/// error names it (`nodes[3].depends_on[0]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkflow {
    pub nodes: Vec<Value>,
    pub metadata: Option<Map<String, Value>>,
    /// Most the whole run may cost, in dollars, over every node's calls.
    pub max_cost_usd: Option<f64>,
    /// The queue every node runs on (the default queue when absent).
    pub queue: Option<String>,
}

/// A checked node, ready to write.
#[derive(Debug, Clone)]
pub struct ValidNode {
    pub id: String,
    pub depends_on: Vec<String>,
    pub on_failure: OnFailure,
    pub kind: Kind,
    pub max_children: Option<u32>,
    pub templated: bool,
    pub task: NewTask,
}

/// A checked workflow, ready to write.
#[derive(Debug, Clone)]
pub struct NewWorkflow {
    pub queue: String,
    pub nodes: Vec<ValidNode>,
    pub metadata: Option<Map<String, Value>>,
    pub max_cost_usd: Option<f64>,
}

/// The keys a node carries beside its task body.
const GRAPH_FIELDS: [&str; 5] = ["id", "depends_on", "on_failure", "kind", "max_children"];

impl CreateWorkflow {
    /// Checks every node and the graph: ids, dependencies, cycles, templates, sizes. Nothing is
    /// written unless all of it holds.
    pub fn validate(
        self,
        default_queue: &str,
        default_max_attempts: u32,
    ) -> Result<NewWorkflow, FieldError> {
        if self.nodes.is_empty() {
            return Err(FieldError::new("nodes", "must hold at least one node"));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(FieldError::new(
                "nodes",
                format!("at most {MAX_NODES} nodes"),
            ));
        }
        let queue = self.queue.unwrap_or_else(|| default_queue.to_owned());
        if validate_queue(&queue).is_err() {
            return Err(FieldError::new(
                "queue",
                "must be 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        check_metadata(self.metadata.as_ref())?;
        check_cost_cap(self.max_cost_usd, MAX_WORKFLOW_COST_USD)?;
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut spawned: u32 = 0;
        for (i, raw) in self.nodes.into_iter().enumerate() {
            let node = node_from(i, raw, &queue, default_max_attempts)?;
            if index.insert(node.id.clone(), i).is_some() {
                return Err(FieldError::new(
                    &format!("nodes[{i}].id"),
                    format!("{:?} is the id of an earlier node", node.id),
                ));
            }
            spawned = spawned.saturating_add(node.max_children.unwrap_or(0));
            nodes.push(node);
        }
        if spawned > MAX_SPAWNED {
            return Err(FieldError::new(
                "nodes",
                format!(
                    "the plan nodes' max_children add up to {spawned}, more than {MAX_SPAWNED}"
                ),
            ));
        }
        for (i, n) in nodes.iter().enumerate() {
            for (j, d) in n.depends_on.iter().enumerate() {
                if !index.contains_key(d) {
                    return Err(FieldError::new(
                        &format!("nodes[{i}].depends_on[{j}]"),
                        format!("no node has the id {d:?}"),
                    ));
                }
            }
        }
        if let Some(start) = first_in_cycle(&nodes, &index) {
            let path = cycle_path(&nodes, &index, start);
            // the error names a node on the cycle itself
            let i = path
                .first()
                .and_then(|id| index.get(id))
                .copied()
                .unwrap_or(start);
            return Err(FieldError::new(
                &format!("nodes[{i}].depends_on"),
                format!(
                    "the dependencies form a cycle (each depends on the next): {}",
                    path.join(" -> ")
                ),
            ));
        }
        Ok(NewWorkflow {
            queue,
            nodes,
            metadata: self.metadata,
            max_cost_usd: self.max_cost_usd,
        })
    }
}

/// One node: its graph fields, then the rest as a task body.
fn node_from(
    i: usize,
    raw: Value,
    queue: &str,
    default_max_attempts: u32,
) -> Result<ValidNode, FieldError> {
    let at = |f: &str| format!("nodes[{i}].{f}");
    let Value::Object(mut obj) = raw else {
        return Err(FieldError::new(&format!("nodes[{i}]"), "must be an object"));
    };
    let graph: Map<String, Value> = GRAPH_FIELDS
        .iter()
        .filter_map(|k| obj.remove(*k).map(|v| ((*k).to_owned(), v)))
        .collect();
    let id = match graph.get("id") {
        Some(Value::String(s)) if valid_node_id(s) => s.clone(),
        Some(_) => {
            return Err(FieldError::new(
                &at("id"),
                "must be 1 to 64 characters of [A-Za-z0-9_-]",
            ))
        }
        None => return Err(FieldError::new(&at("id"), "is required")),
    };
    let depends_on: Vec<String> = match graph.get("depends_on") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            let mut out: Vec<String> = Vec::with_capacity(a.len());
            for (j, d) in a.iter().enumerate() {
                match d {
                    Value::String(s) if valid_node_id(s) => {
                        if out.contains(s) {
                            return Err(FieldError::new(
                                &format!("nodes[{i}].depends_on[{j}]"),
                                format!("{s:?} is listed twice"),
                            ));
                        }
                        out.push(s.clone());
                    }
                    _ => {
                        return Err(FieldError::new(
                            &format!("nodes[{i}].depends_on[{j}]"),
                            "must be a node id (1 to 64 characters of [A-Za-z0-9_-])",
                        ))
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(FieldError::new(
                &at("depends_on"),
                "must be an array of node ids",
            ))
        }
    };
    let on_failure: OnFailure = match graph.get("on_failure") {
        None | Some(Value::Null) => OnFailure::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            FieldError::new(&at("on_failure"), "must be fail_workflow, continue or skip")
        })?,
    };
    let kind: Kind = match graph.get("kind") {
        None | Some(Value::Null) => Kind::Task,
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| FieldError::new(&at("kind"), "must be task or plan"))?,
    };
    let max_children = match (kind, graph.get("max_children")) {
        (_, None | Some(Value::Null)) => (kind == Kind::Plan).then_some(DEFAULT_MAX_CHILDREN),
        (Kind::Task, Some(_)) => {
            return Err(FieldError::new(
                &at("max_children"),
                "only a node of kind plan spawns children",
            ))
        }
        (Kind::Plan, Some(v)) => match v.as_u64() {
            Some(n) if (1..=u64::from(MAX_CHILDREN_LIMIT)).contains(&n) => Some(n as u32),
            _ => {
                return Err(FieldError::new(
                    &at("max_children"),
                    format!("must be a whole number between 1 and {MAX_CHILDREN_LIMIT}"),
                ))
            }
        },
    };
    if let Some(q) = obj.get("queue") {
        if q.as_str() != Some(queue) {
            return Err(FieldError::new(
                &at("queue"),
                format!("every node runs on the workflow's queue ({queue:?}): a node's result and its dependents' counters change in one atomic step, which needs one queue"),
            ));
        }
    }
    let used_prompt = obj.contains_key("prompt");
    let body: CreateTask = serde_json::from_value(Value::Object(obj)).map_err(|e| {
        FieldError::new(
            &format!("nodes[{i}]"),
            format!("not a valid task body: {e}"),
        )
    })?;
    body.refuse_idempotency_field("a workflow's nodes are created once with it")
        .map_err(|e| FieldError::new(&at(&e.field), e.message))?;
    let task = body
        .validate(queue, default_max_attempts)
        .map_err(|e| FieldError::new(&at(&e.field), e.message))?;
    // templates: only in message text, and only about the node's own parents
    let mut templated = false;
    for (k, m) in task.payload.messages.iter().enumerate() {
        let field = if used_prompt {
            at("prompt")
        } else {
            format!("nodes[{i}].messages[{k}].content")
        };
        for text in texts(m) {
            if !template::has_templates(text) {
                continue;
            }
            templated = true;
            let segments = template::parse(text).map_err(|e| FieldError::new(&field, e))?;
            for s in &segments {
                let template::Segment::Ref(e) = s else {
                    continue;
                };
                match e.node() {
                    Some(n) if !depends_on.iter().any(|d| d == n) => {
                        return Err(FieldError::new(
                            &field,
                            format!(
                            "a template reads node {n:?}, which is not in this node's depends_on"
                        ),
                        ))
                    }
                    None if depends_on.is_empty() => {
                        return Err(FieldError::new(
                            &field,
                            "{{parents}} in a node with no depends_on",
                        ))
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(ValidNode {
        id,
        depends_on,
        on_failure,
        kind,
        max_children,
        templated,
        task,
    })
}

/// The text pieces of a message a template may sit in.
pub fn texts(m: &crate::chat::Message) -> Vec<&str> {
    match &m.content {
        Some(crate::chat::Content::Text(t)) => vec![t.as_str()],
        Some(crate::chat::Content::Parts(parts)) => parts
            .iter()
            .filter_map(|p| match p {
                crate::chat::Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    }
}

/// Kahn's algorithm: for each node, how many of its parents never became free (all 0: no cycle).
fn unfreed(nodes: &[ValidNode], index: &HashMap<String, usize>) -> Vec<usize> {
    let mut open: Vec<usize> = nodes.iter().map(|n| n.depends_on.len()).collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for d in &n.depends_on {
            if let Some(&p) = index.get(d) {
                children[p].push(i);
            }
        }
    }
    let mut ready: Vec<usize> = (0..nodes.len()).filter(|&i| open[i] == 0).collect();
    while let Some(i) = ready.pop() {
        for &c in &children[i] {
            open[c] -= 1;
            if open[c] == 0 {
                ready.push(c);
            }
        }
    }
    open
}

/// The first node left over by Kahn's algorithm (it is on a cycle or after one), if any.
fn first_in_cycle(nodes: &[ValidNode], index: &HashMap<String, usize>) -> Option<usize> {
    unfreed(nodes, index).iter().position(|&o| o > 0)
}

/// A cycle, as node ids each depending on the next (first = last). Every node Kahn's algorithm
/// left over has a parent also left over, so walking from one to such a parent must come back to a
/// node already seen: linear in the graph's size.
fn cycle_path(nodes: &[ValidNode], index: &HashMap<String, usize>, start: usize) -> Vec<String> {
    let open = unfreed(nodes, index);
    let mut seen_at: HashMap<usize, usize> = HashMap::new();
    let mut walk: Vec<usize> = Vec::new();
    let mut at = start;
    while let std::collections::hash_map::Entry::Vacant(e) = seen_at.entry(at) {
        e.insert(walk.len());
        walk.push(at);
        match nodes[at]
            .depends_on
            .iter()
            .filter_map(|d| index.get(d).copied())
            .find(|&p| open[p] > 0)
        {
            Some(p) => at = p,
            None => return vec![nodes[start].id.clone()],
        }
    }
    let from = seen_at[&at];
    walk[from..]
        .iter()
        .chain(std::iter::once(&at))
        .map(|&i| nodes[i].id.clone())
        .collect()
}

/// Workflow status as `GET /v1/workflows/{id}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl WorkflowStatus {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One node in `GET /v1/workflows/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    /// `blocked` (parents not final yet), the task's own status while it is in line or running
    /// (`queued`, `running`, `retrying`, `requires_action`), or the node's final status:
    /// `succeeded`, `failed`, `cancelled`, `skipped`.
    pub status: String,
    pub task_id: String,
    /// The result's content, once the node succeeded.
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub usage: TaskUsage,
    pub cost: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "is_task")]
    pub kind: Kind,
    /// For a child a plan spawned: the plan node's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawned_by: Option<String>,
}

/// `GET /v1/workflows/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowView {
    pub id: String,
    pub queue: String,
    pub status: WorkflowStatus,
    pub created_at: Option<String>,
    pub finished_at: Option<String>,
    /// Why the workflow failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    pub nodes: Vec<NodeView>,
    /// Every node's usage, summed.
    pub usage: TaskUsage,
    /// Every node's cost, summed, in dollars.
    pub cost: f64,
}

// fair.lua before wf.lua: queued nodes go to their tenant's line (see queue/mod.rs)
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    declared(concat!(
        include_str!("../queue/events.lua"),
        include_str!("../queue/fair.lua"),
        include_str!("wf.lua"),
        include_str!("wf_create.lua")
    ))
});
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    declared(concat!(
        include_str!("../queue/events.lua"),
        include_str!("../queue/fair.lua"),
        include_str!("wf.lua"),
        include_str!("wf_cancel.lua")
    ))
});
static HOLD: LazyLock<Script> = LazyLock::new(|| declared(include_str!("wf_hold.lua")));
static SETTLE: LazyLock<Script> = LazyLock::new(|| declared(include_str!("wf_settle.lua")));

/// What a workflow's cost cap said to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapHold {
    /// Held (or the workflow has no cap).
    Held,
    /// Refused: the cap, what was spent and what is held by calls in flight (nano-dollars).
    Refused { cap: i64, spent: i64, held: i64 },
}

/// How `DELETE /v1/workflows/{id}` went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkflowCancel {
    Cancelled,
    NotFound,
    AlreadyFinished(WorkflowStatus),
}

impl Broker {
    /// Writes a workflow and all its node tasks in one script; the roots go to pending.
    /// Returns the workflow id.
    /// With an idempotency key, a second call returns the first workflow's id and writes
    /// nothing (`Enqueued::Existing`).
    pub async fn create_workflow(
        &self,
        wf: &NewWorkflow,
        idempotency_key: Option<&str>,
        ttl: std::time::Duration,
    ) -> RedisResult<(String, crate::queue::Enqueued)> {
        let keys = self.keys(&wf.queue);
        let id = TaskId::generate(&wf.queue).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "bad queue", e.to_string()))
        })?;
        let wf_id = id.to_string();
        let mut dependents: HashMap<&str, Vec<&str>> = HashMap::new();
        for n in &wf.nodes {
            for d in &n.depends_on {
                dependents
                    .entry(d.as_str())
                    .or_default()
                    .push(n.id.as_str());
            }
        }
        let capped = wf.max_cost_usd.is_some();
        let mut inv = CREATE.prepare_invoke();
        inv.key(keys.workflow(&wf_id)).key(keys.pending());
        if let Some(k) = idempotency_key {
            inv.key(keys.workflow_idempotency(k));
        }
        // every node belongs to the workflow's tenant: the api gives all nodes the caller's
        let tenant = wf
            .nodes
            .first()
            .and_then(|n| crate::tenant::non_default(n.task.payload.tenant.as_deref()));
        // what the writes reach besides: declared after the keys the script reads by position
        let mut declared = crate::queue::Declared::default();
        declared
            .key(keys.workflow_events(&wf_id))
            .key(keys.line(tenant))
            .key(keys.ring())
            .key(keys.lanes())
            .key(keys.recent());
        inv.arg(&wf_id)
            .arg(now_ms())
            .arg(
                wf.metadata
                    .as_ref()
                    .and_then(|m| serde_json::to_string(m).ok())
                    .unwrap_or_default(),
            )
            .arg(
                wf.max_cost_usd
                    .map(|c| crate::flow::budget::nanos_up(c).to_string())
                    .unwrap_or_default(),
            )
            .arg(ttl.as_secs().max(1))
            .arg(if idempotency_key.is_some() { "1" } else { "0" })
            .arg(&wf.queue)
            .arg(wf.nodes.len());
        for n in &wf.nodes {
            let task_id = TaskId::generate(&wf.queue).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Client, "bad queue", e.to_string()))
            })?;
            declared.key(keys.task(&task_id));
            if let Some(agent) = n.task.payload.agent_key() {
                declared.key(keys.lane(&agent));
            }
            let mut payload = n.task.payload.clone();
            payload.workflow = Some(Box::new(NodeRef {
                workflow: wf_id.clone(),
                node: n.id.clone(),
                parents: n.depends_on.clone(),
                kind: n.kind,
                max_children: n.max_children,
                templated: n.templated,
                capped,
            }));
            let payload = serde_json::to_string(&payload).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Client, "payload", e.to_string()))
            })?;
            inv.arg(&n.id)
                .arg(task_id.to_string())
                .arg(payload)
                .arg(n.task.max_attempts)
                .arg(n.depends_on.len())
                .arg(
                    dependents
                        .get(n.id.as_str())
                        .map_or(String::new(), |d| d.join(" ")),
                )
                .arg(n.on_failure.code())
                .arg(n.task.payload.agent_key().as_deref().unwrap_or(""))
                .arg(if n.kind == Kind::Plan { "plan" } else { "" })
                .arg(n.depends_on.join(" "));
        }
        inv.arg(tenant.unwrap_or(""));
        declared.to(&mut inv);
        let mut conn = self.write_conn().await?;
        let (created, id): (i64, String) = inv.invoke_async(&mut conn).await?;
        self.replicated(&mut conn, &keys.pending()).await?;
        Ok((
            id,
            if created == 1 {
                crate::queue::Enqueued::Created
            } else {
                crate::queue::Enqueued::Existing
            },
        ))
    }

    /// The workflow with every node's state, output, usage and cost.
    pub async fn workflow(&self, id: &TaskId) -> RedisResult<Option<WorkflowView>> {
        let keys = self.keys(id.queue());
        let mut conn = self.redis().conn().await?;
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys.workflow(&id.to_string()))
            .query_async(&mut conn)
            .await?;
        if h.is_empty() {
            return Ok(None);
        }
        let order: Vec<&str> = h
            .get("nodes")
            .map_or(Vec::new(), |n| n.split_whitespace().collect());
        // the live part: each node task's status and usage (a record may have expired: the
        // workflow's copy stands in)
        let mut pipe = redis::pipe();
        for n in &order {
            let tid = h.get(&format!("t:{n}")).map_or("", String::as_str);
            pipe.cmd("HMGET")
                .arg(keys.task_raw(tid))
                .arg("status")
                .arg(crate::task::USAGE_FIELD);
        }
        let live: Vec<(Option<String>, Option<String>)> = if order.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await?
        };
        let mut total = TaskUsage::default();
        let mut total_cost: i64 = 0;
        let mut nodes = Vec::with_capacity(order.len());
        for (n, (task_status, task_usage)) in order.iter().zip(live) {
            let field = |f: &str| h.get(&format!("{f}:{n}")).cloned();
            let state = field("s").unwrap_or_else(|| "blocked".to_owned());
            let status = if state == "queued" {
                task_status.unwrap_or(state)
            } else {
                state
            };
            let raw_usage = task_usage.or_else(|| field("u")).unwrap_or_default();
            let (usage, cost) = parse_usage(&raw_usage);
            total.prompt_tokens += usage.prompt_tokens;
            total.completion_tokens += usage.completion_tokens;
            total.total_tokens += usage.total_tokens;
            total.cached_tokens += usage.cached_tokens;
            total.calls += usage.calls;
            total_cost = total_cost.saturating_add(cost);
            nodes.push(NodeView {
                id: (*n).to_owned(),
                output: if status == "succeeded" {
                    field("o")
                } else {
                    None
                },
                error: field("e").filter(|e| !e.is_empty()),
                status,
                task_id: field("t").unwrap_or_default(),
                usage,
                cost: cost as f64 / 1e9,
                depends_on: field("par")
                    .map(|p| p.split_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default(),
                kind: if field("k").as_deref() == Some("plan") {
                    Kind::Plan
                } else {
                    Kind::Task
                },
                spawned_by: n.rsplit_once('.').map(|(p, _)| p.to_owned()),
            });
        }
        let ts = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok()).map(format_ms);
        Ok(Some(WorkflowView {
            id: id.to_string(),
            queue: id.queue().to_owned(),
            status: h
                .get("status")
                .and_then(|s| WorkflowStatus::parse(s))
                .unwrap_or(WorkflowStatus::Failed),
            created_at: ts("created_at"),
            finished_at: ts("finished_at"),
            error: h.get("error").filter(|e| !e.is_empty()).cloned(),
            metadata: h.get("metadata").and_then(|m| serde_json::from_str(m).ok()),
            max_cost_usd: h
                .get("max_cost")
                .and_then(|c| c.parse::<i64>().ok())
                .map(crate::flow::budget::usd),
            nodes,
            usage: total,
            cost: total_cost as f64 / 1e9,
        }))
    }

    /// Cancels a running workflow: every node not final is cancelled, and the workers running
    /// one are told to drop its call (`wf_cancel.lua`).
    pub async fn cancel_workflow(
        &self,
        id: &TaskId,
        ttl: std::time::Duration,
    ) -> RedisResult<WorkflowCancel> {
        let keys = self.keys(id.queue());
        let mut conn = self.redis().conn().await?;
        let wf = keys.workflow(&id.to_string());
        // the workflow is read first for the keys its end may reach, and again if a plan
        // spawned children in between
        let mut out = String::from(crate::queue::REREAD);
        for _ in 0..crate::queue::REREADS {
            let mut declared = crate::queue::Declared::default();
            let nodes =
                crate::queue::declare_workflow(&mut conn, &keys, &wf, &mut declared).await?;
            let mut inv = CANCEL.prepare_invoke();
            inv.key(&wf);
            declared.to(&mut inv);
            out = inv
                .arg(now_ms())
                .arg(ttl.as_secs().max(1))
                .arg(nodes)
                .invoke_async(&mut conn)
                .await?;
            if out != crate::queue::REREAD {
                break;
            }
        }
        Ok(match crate::queue::after_rereads(out)?.as_str() {
            "ok" => WorkflowCancel::Cancelled,
            "missing" => WorkflowCancel::NotFound,
            other => match WorkflowStatus::parse(other) {
                Some(s) => WorkflowCancel::AlreadyFinished(s),
                None => WorkflowCancel::NotFound,
            },
        })
    }

    /// What a node's templates read: each parent's final state, output and error, and for a
    /// plan parent its children's too.
    pub async fn node_inputs(
        &self,
        queue: &str,
        node: &NodeRef,
    ) -> RedisResult<BTreeMap<String, template::NodeData>> {
        let keys = self.keys(queue);
        let wf = keys.workflow(&node.workflow);
        let mut conn = self.redis().conn().await?;
        let mut ids: Vec<String> = node.parents.clone();
        // a plan parent's children are parents too (the node waited for them)
        let kids: Vec<Option<String>> = {
            let mut p = redis::pipe();
            for id in &node.parents {
                p.cmd("HGET").arg(&wf).arg(format!("c:{id}"));
            }
            p.query_async(&mut conn).await?
        };
        for k in kids.into_iter().flatten() {
            ids.extend(k.split_whitespace().map(str::to_owned));
        }
        let mut p = redis::pipe();
        for id in &ids {
            p.cmd("HMGET")
                .arg(&wf)
                .arg(format!("s:{id}"))
                .arg(format!("o:{id}"))
                .arg(format!("e:{id}"));
        }
        let rows: Vec<(Option<String>, Option<String>, Option<String>)> = if ids.is_empty() {
            Vec::new()
        } else {
            p.query_async(&mut conn).await?
        };
        Ok(ids
            .into_iter()
            .zip(rows)
            .map(|(id, (s, o, e))| {
                (
                    id,
                    template::NodeData {
                        status: s.unwrap_or_default(),
                        output: o.unwrap_or_default(),
                        error: e.unwrap_or_default(),
                    },
                )
            })
            .collect())
    }

    /// Holds a call's worst case against its workflow's `max_cost_usd` (`wf_hold.lua`), until
    /// [`Self::workflow_settle`] or `expires_in`.
    pub async fn workflow_hold(
        &self,
        queue: &str,
        workflow: &str,
        lease: &str,
        worst_nanos: i64,
        expires_in: std::time::Duration,
    ) -> RedisResult<CapHold> {
        let keys = self.keys(queue);
        let wf = keys.workflow(workflow);
        let now = now_ms();
        let mut conn = self.redis().conn().await?;
        let (ok, cap, spent, held): (i64, i64, i64, i64) = HOLD
            .key(&wf)
            .key(format!("{wf}:holds"))
            .arg(now)
            .arg(format!("{lease}|{}", worst_nanos.max(0)))
            .arg(worst_nanos.max(0))
            .arg(now.saturating_add(i64::try_from(expires_in.as_millis()).unwrap_or(i64::MAX)))
            .invoke_async(&mut conn)
            .await?;
        Ok(if ok == 1 {
            CapHold::Held
        } else {
            CapHold::Refused { cap, spent, held }
        })
    }

    /// Releases a call's hold and charges what it cost to its workflow (`wf_settle.lua`).
    pub async fn workflow_settle(
        &self,
        queue: &str,
        workflow: &str,
        lease: &str,
        worst_nanos: i64,
        cost_nanos: i64,
    ) -> RedisResult<()> {
        let keys = self.keys(queue);
        let wf = keys.workflow(workflow);
        let mut conn = self.redis().conn().await?;
        let _: i64 = SETTLE
            .key(&wf)
            .key(format!("{wf}:holds"))
            .arg(format!("{lease}|{}", worst_nanos.max(0)))
            .arg(cost_nanos.max(0))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wf(v: Value) -> Result<NewWorkflow, FieldError> {
        serde_json::from_value::<CreateWorkflow>(v)
            .expect("shape")
            .validate("default", 3)
    }

    #[test]
    fn a_chain_a_fan_out_and_a_plan_validate() {
        let w = wf(json!({"nodes": [
            {"id": "research", "prompt": "find"},
            {"id": "write", "depends_on": ["research"], "prompt": "use {{nodes.research.output}}"},
            {"id": "p", "kind": "plan", "max_children": 5, "prompt": "plan", "on_failure": "skip"},
            {"id": "join", "depends_on": ["p", "write"], "prompt": "all: {{parents}}", "on_failure": "continue"}
        ]}))
        .expect("valid");
        assert_eq!(w.nodes.len(), 4);
        assert!(w.nodes[1].templated && !w.nodes[0].templated);
        assert_eq!(w.nodes[2].max_children, Some(5));
        assert_eq!(w.nodes[2].on_failure, OnFailure::Skip);
        assert_eq!(w.queue, "default");
    }

    #[test]
    fn mistakes_name_the_node_and_field() {
        let cases = [
            (json!({"nodes": []}), "nodes"),
            (json!({"nodes": [{"prompt": "x"}]}), "nodes[0].id"),
            (
                json!({"nodes": [{"id": "a.b", "prompt": "x"}]}),
                "nodes[0].id",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]}),
                "nodes[1].id",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x", "depends_on": ["zz"]}]}),
                "nodes[0].depends_on[0]",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x", "depends_on": "b"}]}),
                "nodes[0].depends_on",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x", "on_failure": "retry"}]}),
                "nodes[0].on_failure",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x", "max_children": 3}]}),
                "nodes[0].max_children",
            ),
            (
                json!({"nodes": [{"id": "a", "kind": "plan", "prompt": "x", "max_children": 0}]}),
                "nodes[0].max_children",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x", "queue": "other"}]}),
                "nodes[0].queue",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x", "max_attempts": 0}]}),
                "nodes[0].max_attempts",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x", "bogus": 1}]}),
                "nodes[0]",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "{{nodes.b.output}}"}]}),
                "nodes[0].prompt",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "{{parents}}"}]}),
                "nodes[0].prompt",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x"}, {"id": "b", "depends_on": ["a"], "messages": [{"role": "user", "content": "{{ nodes.a.outptu }}"}]}]}),
                "nodes[1].messages[0].content",
            ),
            (
                json!({"nodes": [{"id": "a", "prompt": "x"}], "max_cost_usd": 0}),
                "max_cost_usd",
            ),
        ];
        for (body, field) in cases {
            let e = wf(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.field, field, "{body}: {}", e.message);
        }
        let too_many: Vec<Value> = (0..=MAX_NODES)
            .map(|i| json!({"id": format!("n{i}"), "prompt": "x"}))
            .collect();
        assert_eq!(
            wf(json!({"nodes": too_many})).expect_err("too many").field,
            "nodes"
        );
    }

    proptest::proptest! {
        /// Edges only to earlier nodes always make a valid graph; one more edge from a node to
        /// one of its descendants always makes a cycle, and the error names one on it.
        #[test]
        fn dags_pass_and_any_back_edge_is_a_cycle(
            n in 2usize..40,
            edges in proptest::collection::vec((0usize..40, 0usize..40), 0..80),
            back in (0usize..40, 0usize..40),
        ) {
            let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
            for (a, b) in edges {
                let (a, b) = (a % n, b % n);
                if b < a && !deps[a].contains(&b) {
                    deps[a].push(b);
                }
            }
            let body = |deps: &Vec<Vec<usize>>| json!({"nodes": deps.iter().enumerate().map(|(i, d)| json!({
                "id": format!("n{i}"),
                "depends_on": d.iter().map(|j| format!("n{j}")).collect::<Vec<_>>(),
                "prompt": "x",
            })).collect::<Vec<_>>()});
            proptest::prop_assert!(wf(body(&deps)).is_ok());
            // a descendant of `from` (following dependents), then the edge from -> descendant
            let from = back.0 % n;
            let mut reach = vec![from];
            let mut i = 0;
            while i < reach.len() {
                let at = reach[i];
                for (c, d) in deps.iter().enumerate() {
                    if d.contains(&at) && !reach.contains(&c) {
                        reach.push(c);
                    }
                }
                i += 1;
            }
            let to = reach[back.1 % reach.len()];
            if !deps[from].contains(&to) {
                deps[from].push(to);
                let e = wf(body(&deps)).expect_err("a cycle");
                proptest::prop_assert!(e.message.contains("cycle"), "{}", e);
                let path: Vec<&str> = e.message.rsplit(": ").next().unwrap_or("").split(" -> ").collect();
                proptest::prop_assert!(path.len() >= 2 && path.first() == path.last(), "{}", e);
                // each step of the reported path is a real dependency
                for w in path.windows(2) {
                    let a: usize = w[0][1..].parse().expect("id");
                    let b: usize = w[1][1..].parse().expect("id");
                    proptest::prop_assert!(deps[a].contains(&b), "{} -> {} in {}", w[0], w[1], e);
                }
            }
        }
    }

    #[test]
    fn cycles_are_named() {
        let e = wf(json!({"nodes": [
            {"id": "root", "prompt": "x"},
            {"id": "a", "depends_on": ["root", "c"], "prompt": "x"},
            {"id": "b", "depends_on": ["a"], "prompt": "x"},
            {"id": "c", "depends_on": ["b"], "prompt": "x"},
            {"id": "d", "depends_on": ["c"], "prompt": "x"}
        ]}))
        .expect_err("cycle");
        assert!(
            e.field.starts_with("nodes[") && e.field.ends_with("].depends_on"),
            "{e}"
        );
        assert!(e.message.contains("cycle"), "{e}");
        for n in ["a", "b", "c"] {
            assert!(e.message.contains(n), "{e}");
        }
        assert!(!e.message.contains("root"), "{e}");
        let selfish = wf(json!({"nodes": [{"id": "s", "depends_on": ["s"], "prompt": "x"}]}))
            .expect_err("self");
        assert_eq!(selfish.field, "nodes[0].depends_on");
        assert!(selfish.message.contains("s -> s"), "{selfish}");
    }
}
