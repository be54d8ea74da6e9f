//! Manager → workers: the plan a `plan` node's model must answer with, and the children the
//! workflow spawns from it.
//!
//! The documented form (a Markdown code fence around it is allowed):
//! `{"subtasks": [{"prompt": "...", "model": "...", "agent_id": "...", "tools": ["server" or
//! "server__tool", ...]}, ...]}`: 1 to the node's `max_children` subtasks; `prompt` is required,
//! the rest optional; other fields are ignored. A child runs on the plan node's model unless it
//! names another one the upstreams serve, and may use only MCP tools the plan node itself enabled:
//! a model cannot grant itself more than the workflow's author did.

use serde_json::Value;

use crate::mcp::McpUse;
use crate::task::{valid_name, Message, Payload};

/// Longest prompt of one subtask.
pub const MAX_PROMPT_BYTES: usize = 32 * 1024;

/// One subtask of a plan, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subtask {
    pub prompt: String,
    pub model: Option<String>,
    pub agent_id: Option<String>,
    pub tools: Vec<String>,
}

/// Reads a plan node's output. The error says what is wrong, by JSON path.
pub fn parse(output: &str, max_children: u32) -> Result<Vec<Subtask>, String> {
    let v: Value = serde_json::from_str(super::template::strip_fence(output)).map_err(|e| {
        format!("the plan is not JSON ({e}); expected {{\"subtasks\": [{{\"prompt\": ...}}]}}")
    })?;
    let Some(list) = v.get("subtasks") else {
        return Err("the plan has no \"subtasks\" array".to_owned());
    };
    let Some(list) = list.as_array() else {
        return Err("the plan's \"subtasks\" is not an array".to_owned());
    };
    if list.is_empty() {
        return Err("the plan's \"subtasks\" is empty".to_owned());
    }
    if list.len() > max_children as usize {
        return Err(format!(
            "the plan has {} subtasks, more than max_children {max_children}",
            list.len()
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let at = |f: &str| format!("subtasks[{i}].{f}");
        let Some(obj) = s.as_object() else {
            return Err(format!("subtasks[{i}] is not an object"));
        };
        let prompt = match obj.get("prompt") {
            Some(Value::String(p)) if !p.trim().is_empty() && p.len() <= MAX_PROMPT_BYTES => {
                p.clone()
            }
            Some(Value::String(p)) if !p.trim().is_empty() => {
                return Err(format!(
                    "{} is longer than {MAX_PROMPT_BYTES} bytes",
                    at("prompt")
                ))
            }
            _ => return Err(format!("{} must be a non-empty string", at("prompt"))),
        };
        let name = |f: &str| -> Result<Option<String>, String> {
            match obj.get(f) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if valid_name(s) => Ok(Some(s.clone())),
                Some(_) => Err(format!(
                    "{} must be 1 to 128 characters of [A-Za-z0-9_.:/-]",
                    at(f)
                )),
            }
        };
        let model = name("model")?;
        let agent_id = name("agent_id")?;
        let tools = match obj.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => {
                let mut t = Vec::with_capacity(a.len());
                for (j, x) in a.iter().enumerate() {
                    match x.as_str() {
                        Some(s) if !s.is_empty() && s.len() <= 128 => t.push(s.to_owned()),
                        _ => return Err(format!("subtasks[{i}].tools[{j}] must be a tool name")),
                    }
                }
                t
            }
            Some(_) => return Err(format!("{} must be an array of tool names", at("tools"))),
        };
        out.push(Subtask {
            prompt,
            model,
            agent_id,
            tools,
        });
    }
    Ok(out)
}

/// The MCP servers (and tools) a child asks for, within what the plan node enabled: `server`
/// takes whatever the plan node had of it, `server__tool` that one tool.
fn child_mcp(i: usize, tools: &[String], allowed: &[McpUse]) -> Result<Vec<McpUse>, String> {
    let mut out: Vec<McpUse> = Vec::new();
    for (j, t) in tools.iter().enumerate() {
        let (server, tool) = match t.split_once("__") {
            Some((s, tool)) => (s, Some(tool)),
            None => (t.as_str(), None),
        };
        let Some(grant) = allowed.iter().find(|u| u.server == server) else {
            return Err(format!(
                "subtasks[{i}].tools[{j}] ({t:?}) is not a tool of an MCP server the plan node enabled"
            ));
        };
        if let (Some(tool), Some(only)) = (tool, &grant.tools) {
            if !only.iter().any(|o| o == tool) {
                return Err(format!(
                    "subtasks[{i}].tools[{j}] ({t:?}) is not among the plan node's tools of {server:?}"
                ));
            }
        }
        match out.iter_mut().find(|u| u.server == server) {
            Some(u) => {
                // a whole server already, or one more tool of it
                if let (Some(list), Some(tool)) = (u.tools.as_mut(), tool) {
                    if !list.iter().any(|x| x == tool) {
                        list.push(tool.to_owned());
                    }
                } else if tool.is_none() {
                    u.tools = grant.tools.clone();
                }
            }
            None => out.push(McpUse {
                server: server.to_owned(),
                tools: match tool {
                    Some(tool) => Some(vec![tool.to_owned()]),
                    None => grant.tools.clone(),
                },
            }),
        }
    }
    Ok(out)
}

/// The children's task payloads. `serves` says whether an upstream serves a model.
pub fn children(
    plan: &Payload,
    subtasks: &[Subtask],
    serves: impl Fn(&str) -> bool,
) -> Result<Vec<Payload>, String> {
    let mut out = Vec::with_capacity(subtasks.len());
    for (i, s) in subtasks.iter().enumerate() {
        if let Some(m) = &s.model {
            if !serves(m) {
                return Err(format!(
                    "subtasks[{i}].model ({m:?}) is not served by any upstream"
                ));
            }
        }
        let mcp = child_mcp(i, &s.tools, &plan.mcp)?;
        out.push(Payload {
            messages: vec![Message::user(s.prompt.clone())],
            model: s.model.clone().or_else(|| plan.model.clone()),
            fallback_models: if s.model.is_some() {
                Vec::new()
            } else {
                plan.fallback_models.clone()
            },
            agent_id: s.agent_id.clone(),
            metadata: None,
            max_cost_usd: None,
            max_total_tokens: None,
            on_budget: plan.on_budget,
            params: Default::default(),
            max_steps: plan.max_steps,
            tool_timeout_secs: None,
            mcp,
            workflow: None,
            chat_completion: false,
            // a plan's children belong to the plan's tenant
            tenant: plan.tenant.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_form() {
        let p = parse(
            "```json\n{\"subtasks\": [{\"prompt\": \"a\"}, {\"prompt\": \"b\", \"model\": \"m2\", \"agent_id\": \"x\", \"tools\": [\"everything__echo\"], \"why\": \"ignored\"}]}\n```",
            5,
        )
        .expect("valid");
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].model.as_deref(), Some("m2"));
        assert_eq!(p[1].tools, vec!["everything__echo".to_owned()]);
    }

    #[test]
    fn says_what_is_wrong() {
        let cases = [
            ("not json", "not JSON"),
            ("{\"tasks\": []}", "no \"subtasks\""),
            ("{\"subtasks\": {}}", "not an array"),
            ("{\"subtasks\": []}", "empty"),
            (
                "{\"subtasks\": [{\"prompt\": \"a\"}, {\"prompt\": \"b\"}, {\"prompt\": \"c\"}]}",
                "more than max_children 2",
            ),
            ("{\"subtasks\": [{\"prompt\": \"\"}]}", "subtasks[0].prompt"),
            ("{\"subtasks\": [1]}", "subtasks[0] is not an object"),
            (
                "{\"subtasks\": [{\"prompt\": \"a\", \"model\": \"bad model\"}]}",
                "subtasks[0].model",
            ),
            (
                "{\"subtasks\": [{\"prompt\": \"a\", \"tools\": [3]}]}",
                "subtasks[0].tools[0]",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text, 2).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn children_get_no_tool_the_plan_did_not_have() {
        let plan = Payload {
            messages: vec![Message::user("plan")],
            model: Some("m1".into()),
            fallback_models: vec!["m3".into()],
            agent_id: None,
            metadata: None,
            max_cost_usd: None,
            max_total_tokens: None,
            on_budget: Default::default(),
            params: Default::default(),
            max_steps: None,
            tool_timeout_secs: None,
            mcp: vec![
                McpUse {
                    server: "everything".into(),
                    tools: Some(vec!["echo".into(), "add".into()]),
                },
                McpUse {
                    server: "files".into(),
                    tools: None,
                },
            ],
            workflow: None,
            chat_completion: false,
            tenant: None,
        };
        let sub = |tools: &[&str], model: Option<&str>| Subtask {
            prompt: "p".into(),
            model: model.map(str::to_owned),
            agent_id: None,
            tools: tools.iter().map(|t| (*t).to_owned()).collect(),
        };
        let kids = children(
            &plan,
            &[
                sub(&["everything__echo", "files"], None),
                sub(&["everything"], Some("m2")),
            ],
            |m| m != "nope",
        )
        .expect("allowed");
        assert_eq!(kids[0].model.as_deref(), Some("m1"));
        assert_eq!(kids[0].fallback_models, vec!["m3".to_owned()]);
        assert_eq!(kids[0].mcp[0].tools, Some(vec!["echo".to_owned()]));
        assert_eq!(kids[0].mcp[1].tools, None);
        assert_eq!(kids[1].model.as_deref(), Some("m2"));
        assert!(kids[1].fallback_models.is_empty());
        assert_eq!(
            kids[1].mcp[0].tools,
            Some(vec!["echo".to_owned(), "add".to_owned()])
        );
        for bad in [
            sub(&["other"], None),
            sub(&["everything__rm"], None),
            sub(&[], Some("nope")),
        ] {
            assert!(
                children(&plan, std::slice::from_ref(&bad), |m| m != "nope").is_err(),
                "{bad:?}"
            );
        }
    }
}
