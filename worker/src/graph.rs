//! A workflow node's run: its templates are rendered from its parents' results before the first
//! call, and a plan node's answer becomes the children the workflow spawns (`common/src/graph`).
//! Everything else about a node's run is a plain task's.

use agentq_common::graph::{plan, template, Kind, NodeRef};
use agentq_common::keys::TaskId;
use agentq_common::queue::NodeDone;
use agentq_common::task::{Payload, StartedTask};

use crate::run::Outcome;
use crate::{LlmFailure, Worker};

impl Worker {
    /// Replaces the templates in the payload's messages with the parents' results. A template
    /// that cannot be filled (a field missing from a parent's JSON) fails the node for good:
    /// another attempt would read the same results.
    pub(crate) async fn render_templates(&self, payload: &mut Payload) -> Result<(), Outcome> {
        let Some(node) = payload.workflow.as_deref() else {
            return Ok(());
        };
        let inputs = self
            .broker
            .node_inputs(&self.cfg.queue, node)
            .await
            .map_err(|e| {
                Outcome::Failure(LlmFailure::Transient {
                    outcome: "memory",
                    message: format!("the parents' results are unavailable: {e}"),
                })
            })?;
        let fail = |message: String| {
            Outcome::Failure(LlmFailure::Permanent {
                outcome: "template",
                message: format!("template: {message}"),
            })
        };
        for m in &mut payload.messages {
            match &mut m.content {
                Some(agentq_common::chat::Content::Text(t)) => {
                    *t = fill(t, &inputs).map_err(fail)?;
                }
                Some(agentq_common::chat::Content::Parts(parts)) => {
                    for p in parts {
                        if let agentq_common::chat::Part::Text { text } = p {
                            *text = fill(text, &inputs).map_err(fail)?;
                        }
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    /// What the node's success carries to the workflow: its output, and for a plan node the
    /// children its answer asks for (checked here; an invalid plan fails the node).
    pub(crate) fn node_done(
        &self,
        task: &StartedTask,
        payload: &Payload,
        node: &NodeRef,
        output: &str,
    ) -> Result<NodeDone, String> {
        if node.kind != Kind::Plan {
            return Ok(NodeDone {
                output: output.to_owned(),
                children: None,
            });
        }
        let max = node
            .max_children
            .unwrap_or(agentq_common::graph::DEFAULT_MAX_CHILDREN);
        let invalid = |why: String| format!("invalid_plan: {why}");
        let subtasks = plan::parse(output, max).map_err(invalid)?;
        let payloads = plan::children(payload, &subtasks, |m| self.cfg.upstreams.serves(m))
            .map_err(invalid)?;
        let mut spawn = Vec::with_capacity(payloads.len());
        for (i, mut p) in payloads.into_iter().enumerate() {
            let child = format!("{}.{}", node.node, i + 1);
            p.workflow = Some(Box::new(NodeRef {
                workflow: node.workflow.clone(),
                node: child.clone(),
                parents: Vec::new(),
                kind: Kind::Task,
                max_children: None,
                templated: false,
                capped: node.capped,
            }));
            let id = TaskId::generate(&self.cfg.queue).map_err(|e| e.to_string())?;
            spawn.push(serde_json::json!({
                "n": child,
                "t": id.to_string(),
                "p": serde_json::to_string(&p).map_err(|e| e.to_string())?,
                "m": self.cfg.common.max_attempts,
                // the lane's name: per tenant, like every agent's lane
                "a": p.agent_key().as_deref().unwrap_or(""),
            }));
        }
        tracing::info!(task.id = %task.id, workflow = %node.workflow, node = %node.node, children = spawn.len(), "plan accepted");
        Ok(NodeDone {
            output: output.to_owned(),
            children: Some(serde_json::Value::Array(spawn).to_string()),
        })
    }
}

fn fill(
    text: &str,
    inputs: &std::collections::BTreeMap<String, template::NodeData>,
) -> Result<String, String> {
    if !template::has_templates(text) {
        return Ok(text.to_owned());
    }
    template::render(&template::parse(text)?, inputs)
}
