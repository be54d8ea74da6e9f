//! The chat-completions request a task carries: its messages (text, content parts, assistant tool
//! calls and tool results) and the parameters passed through to the model (sampling, output cap,
//! stop sequences, response format, tools).
//!
//! The types serialize exactly as OpenAI's wire format, so what the API validated is what the
//! worker sends. They are our own rather than async-openai's request types because a task body
//! refuses unknown fields (a typo must not pass silently) and every mistake must name its field;
//! the worker converts them to async-openai's types when it builds the request.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::task::FieldError;

/// Most tools a task may declare (OpenAI's own limit).
pub const MAX_TOOLS: usize = 128;
/// Most tool calls one assistant message may carry.
pub const MAX_TOOL_CALLS: usize = 128;
/// Most content parts in one message.
pub const MAX_PARTS: usize = 64;
/// Most stop sequences (OpenAI's own limit).
pub const MAX_STOP: usize = 4;
/// Longest stop sequence, `user` value, tool call id, in bytes.
pub const MAX_SHORT_TEXT: usize = 256;
/// Longest tool or response-format description, in bytes.
pub const MAX_DESCRIPTION: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    /// OpenAI's newer name for system instructions to reasoning models.
    Developer,
    User,
    Assistant,
    /// The result of a tool call, answering the assistant message that asked for it.
    Tool,
}

/// One chat message. `content` is a string or an array of content parts; an assistant message
/// may carry `tool_calls` instead of content; a `tool` message answers one call by its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// Serialized first: `complete.lua` recognizes a stored `tool` message by its prefix.
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message of plain text.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(Content::Text(content.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::text(Role::User, content)
    }

    /// The message's text: the string, or its text parts joined by newlines (images carry none).
    pub fn text_content(&self) -> Cow<'_, str> {
        match &self.content {
            None => Cow::Borrowed(""),
            Some(Content::Text(s)) => Cow::Borrowed(s),
            Some(Content::Parts(parts)) => {
                let texts: Vec<&str> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::Text { text } => Some(text.as_str()),
                        Part::ImageUrl { .. } => None,
                    })
                    .collect();
                Cow::Owned(texts.join("\n"))
            }
        }
    }

    /// Bytes the model reads from this message besides its text (tool call names and
    /// arguments, the answered call's id), for estimating prompt tokens.
    pub fn extra_len(&self) -> usize {
        let calls = self.tool_calls.as_deref().unwrap_or_default();
        calls
            .iter()
            .map(|c| c.id.len() + c.function.name.len() + c.function.arguments.len())
            .sum::<usize>()
            + self.tool_call_id.as_deref().map_or(0, str::len)
    }
}

/// A message's content: a string, or content parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// Hand-written so a mistake reads "expected a string or an array of content parts" rather
/// than serde's "did not match any variant of untagged enum".
impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Content, E> {
                Ok(Content::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(p) = seq.next_element::<Part>()? {
                    if parts.len() == MAX_PARTS {
                        return Err(de::Error::custom(format!(
                            "at most {MAX_PARTS} content parts"
                        )));
                    }
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

/// One content part: text, or an image by URL (`https://...` or a `data:` URL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<ImageDetail>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageDetail {
    Auto,
    Low,
    High,
}

/// The only kind of tool (and tool call) chat completions has that agentq passes on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunctionKind {
    #[default]
    Function,
}

/// A call the model asked for, as it appears on an assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: FunctionKind,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text, as the model wrote it (not necessarily valid JSON: models make mistakes).
    pub arguments: String,
}

/// The function calls of a reply's `tool_calls` as a server sent them, read leniently (servers
/// add fields of their own, such as `index`); `None` when there are none.
pub fn tool_calls_from_wire(v: &Value) -> Option<Vec<ToolCall>> {
    let calls: Vec<ToolCall> = v
        .as_array()?
        .iter()
        .filter_map(|c| {
            let f = c.get("function")?;
            Some(ToolCall {
                id: c.get("id")?.as_str()?.to_owned(),
                kind: FunctionKind::Function,
                function: FunctionCall {
                    name: f.get("name")?.as_str()?.to_owned(),
                    arguments: match f.get("arguments") {
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    },
                },
            })
        })
        .collect();
    (!calls.is_empty()).then_some(calls)
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema object describing the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `none`, `auto`, `required`, or one named function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Named {
        #[serde(rename = "type")]
        kind: FunctionKind,
        function: NamedFunction,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoiceMode {
    None,
    Auto,
    Required,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    pub name: String,
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Named {
            #[serde(rename = "type")]
            kind: FunctionKind,
            function: NamedFunction,
        }
        match Value::deserialize(d)? {
            Value::String(s) => ToolChoiceMode::deserialize(Value::String(s))
                .map(ToolChoice::Mode)
                .map_err(|_| {
                    de::Error::custom(
                        "expected \"none\", \"auto\", \"required\" or a named function",
                    )
                }),
            v @ Value::Object(_) => Named::deserialize(v)
                .map(|n| ToolChoice::Named {
                    kind: n.kind,
                    function: n.function,
                })
                .map_err(|e| {
                    de::Error::custom(format!(
                        "expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}: {e}"
                    ))
                }),
            _ => Err(de::Error::custom(
                "expected \"none\", \"auto\", \"required\" or a named function",
            )),
        }
    }
}

/// `response_format`: free text, any JSON object, or JSON matching a schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    // empty struct variants, not unit ones: serde lets a unit variant ignore extra fields
    Text {},
    JsonObject {},
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `stop`: one sequence or up to four.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Stop::One(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(de::Error::custom("stop sequences must be strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Stop::Many),
            _ => Err(de::Error::custom(
                "expected a string or an array of strings",
            )),
        }
    }
}

impl Stop {
    pub fn sequences(&self) -> &[String] {
        match self {
            Stop::One(s) => std::slice::from_ref(s),
            Stop::Many(v) => v,
        }
    }
}

/// The chat-completions parameters of a task, sent with each of its model calls as given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// The output cap of each call, under the name the task used (`max_tokens` is what most
    /// OpenAI-compatible servers read; OpenAI's reasoning models want `max_completion_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ChatParams {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The task's own output cap, if it set one.
    pub fn output_cap(&self) -> Option<u32> {
        self.max_tokens.or(self.max_completion_tokens)
    }

    /// Checks every parameter; the error names the field at fault. `mcp`: the servers the task
    /// enables, whose tools `tool_choice` may name too (`<server>__<tool>`).
    pub fn validate(&self, mcp: &[crate::mcp::McpUse]) -> Result<(), FieldError> {
        if let Some(t) = self.temperature {
            if !t.is_finite() || !(0.0..=2.0).contains(&t) {
                return Err(FieldError::new("temperature", "must be between 0 and 2"));
            }
        }
        if let Some(p) = self.top_p {
            if !p.is_finite() || !(0.0..=1.0).contains(&p) {
                return Err(FieldError::new("top_p", "must be between 0 and 1"));
            }
        }
        if self.max_tokens == Some(0) {
            return Err(FieldError::new("max_tokens", "must be at least 1"));
        }
        if self.max_completion_tokens == Some(0) {
            return Err(FieldError::new(
                "max_completion_tokens",
                "must be at least 1",
            ));
        }
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(FieldError::new(
                "max_completion_tokens",
                "give max_tokens or max_completion_tokens, not both",
            ));
        }
        if let Some(stop) = &self.stop {
            let seqs = stop.sequences();
            if seqs.is_empty() || seqs.len() > MAX_STOP {
                return Err(FieldError::new(
                    "stop",
                    format!("1 to {MAX_STOP} stop sequences"),
                ));
            }
            for (i, s) in seqs.iter().enumerate() {
                let field = match stop {
                    Stop::One(_) => "stop".to_owned(),
                    Stop::Many(_) => format!("stop[{i}]"),
                };
                if s.is_empty() || s.len() > MAX_SHORT_TEXT {
                    return Err(FieldError::new(
                        &field,
                        format!("must be 1 to {MAX_SHORT_TEXT} bytes"),
                    ));
                }
            }
        }
        if let Some(u) = &self.user {
            if u.is_empty() || u.len() > MAX_SHORT_TEXT {
                return Err(FieldError::new(
                    "user",
                    format!("must be 1 to {MAX_SHORT_TEXT} bytes"),
                ));
            }
        }
        if let Some(ResponseFormat::JsonSchema { json_schema }) = &self.response_format {
            if !valid_function_name(&json_schema.name) {
                return Err(FieldError::new(
                    "response_format.json_schema.name",
                    "must be 1 to 64 characters of [A-Za-z0-9_-]",
                ));
            }
            if json_schema
                .description
                .as_ref()
                .is_some_and(|d| d.len() > MAX_DESCRIPTION)
            {
                return Err(FieldError::new(
                    "response_format.json_schema.description",
                    format!("at most {MAX_DESCRIPTION} bytes"),
                ));
            }
        }
        let tools = self.tools.as_deref().unwrap_or_default();
        if self.tools.is_some() && (tools.is_empty() || tools.len() > MAX_TOOLS) {
            return Err(FieldError::new("tools", format!("1 to {MAX_TOOLS} tools")));
        }
        for (i, t) in tools.iter().enumerate() {
            if !valid_function_name(&t.function.name) {
                return Err(FieldError::new(
                    &format!("tools[{i}].function.name"),
                    "must be 1 to 64 characters of [A-Za-z0-9_-]",
                ));
            }
            if tools[..i]
                .iter()
                .any(|o| o.function.name == t.function.name)
            {
                return Err(FieldError::new(
                    &format!("tools[{i}].function.name"),
                    format!("{:?} is declared twice", t.function.name),
                ));
            }
            if t.function
                .description
                .as_ref()
                .is_some_and(|d| d.len() > MAX_DESCRIPTION)
            {
                return Err(FieldError::new(
                    &format!("tools[{i}].function.description"),
                    format!("at most {MAX_DESCRIPTION} bytes"),
                ));
            }
        }
        match &self.tool_choice {
            Some(ToolChoice::Mode(ToolChoiceMode::Required)) if tools.is_empty() && mcp.is_empty() => {
                return Err(FieldError::new(
                    "tool_choice",
                    "\"required\" needs tools to choose from",
                ))
            }
            Some(ToolChoice::Named { function, .. })
                if !tools.iter().any(|t| t.function.name == function.name)
                    && !function
                        .name
                        .split_once(crate::mcp::TOOL_SEPARATOR)
                        .is_some_and(|(server, _)| mcp.iter().any(|u| u.server == server)) =>
            {
                return Err(FieldError::new(
                    "tool_choice.function.name",
                    format!(
                        "{:?} is not one of the task's tools (or <server>__<tool> of an enabled MCP server)",
                        function.name
                    ),
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// A function (tool) name as OpenAI accepts it.
pub fn valid_function_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn blank(s: &str) -> bool {
    s.trim().is_empty()
}

/// Checks a task's messages: each role's own rules, and the order providers insist on: an
/// assistant message with `tool_calls` is followed at once by one `tool` message per call, and a
/// `tool` message answers a call of that assistant message. Errors name `messages[i]...`.
pub fn validate_messages(messages: &[Message]) -> Result<(), FieldError> {
    // the calls of the last assistant tool_calls message not answered yet
    let mut open: Vec<&str> = Vec::new();
    let mut opened_at = 0usize;
    for (i, m) in messages.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}]{f}");
        if let Some(n) = &m.name {
            if m.role == Role::Tool || !valid_function_name(n) {
                return Err(FieldError::new(
                    &at(".name"),
                    "must be 1 to 64 characters of [A-Za-z0-9_-], and tool messages take none",
                ));
            }
        }
        if m.role != Role::Tool && !open.is_empty() {
            return Err(FieldError::new(
                &at(""),
                format!(
                    "messages[{opened_at}] asked for tool calls {open:?}: a tool message answering each must come next"
                ),
            ));
        }
        if m.role != Role::Assistant && m.tool_calls.is_some() {
            return Err(FieldError::new(
                &at(".tool_calls"),
                "only assistant messages carry tool calls",
            ));
        }
        if m.role != Role::Tool && m.tool_call_id.is_some() {
            return Err(FieldError::new(
                &at(".tool_call_id"),
                "only tool messages answer a tool call",
            ));
        }
        match m.role {
            Role::System | Role::Developer | Role::Tool => {
                match &m.content {
                    None => return Err(FieldError::new(&at(".content"), "is required")),
                    Some(Content::Text(s)) if blank(s) => {
                        return Err(FieldError::new(&at(".content"), "must not be empty"))
                    }
                    Some(Content::Parts(parts)) => check_parts(parts, &at(".content"), false)?,
                    Some(Content::Text(_)) => {}
                }
                if m.role == Role::Tool {
                    let Some(id) = m.tool_call_id.as_deref() else {
                        return Err(FieldError::new(
                            &at(".tool_call_id"),
                            "a tool message names the call it answers",
                        ));
                    };
                    let Some(k) = open.iter().position(|c| *c == id) else {
                        return Err(FieldError::new(
                            &at(".tool_call_id"),
                            format!(
                                "{id:?} does not answer a call of the assistant message just before"
                            ),
                        ));
                    };
                    open.remove(k);
                }
            }
            Role::User => match &m.content {
                None => return Err(FieldError::new(&at(".content"), "is required")),
                Some(Content::Text(s)) if blank(s) => {
                    return Err(FieldError::new(&at(".content"), "must not be empty"))
                }
                Some(Content::Parts(parts)) => check_parts(parts, &at(".content"), true)?,
                Some(Content::Text(_)) => {}
            },
            Role::Assistant => {
                let calls = m.tool_calls.as_deref().unwrap_or_default();
                match &m.content {
                    None if calls.is_empty() => {
                        return Err(FieldError::new(
                            &at(".content"),
                            "an assistant message needs content or tool_calls",
                        ))
                    }
                    Some(Content::Text(s)) if blank(s) && calls.is_empty() => {
                        return Err(FieldError::new(&at(".content"), "must not be empty"))
                    }
                    Some(Content::Parts(parts)) => check_parts(parts, &at(".content"), false)?,
                    _ => {}
                }
                if m.tool_calls.is_some() && (calls.is_empty() || calls.len() > MAX_TOOL_CALLS) {
                    return Err(FieldError::new(
                        &at(".tool_calls"),
                        format!("1 to {MAX_TOOL_CALLS} tool calls"),
                    ));
                }
                for (k, c) in calls.iter().enumerate() {
                    if c.id.is_empty() || c.id.len() > MAX_SHORT_TEXT {
                        return Err(FieldError::new(
                            &at(&format!(".tool_calls[{k}].id")),
                            format!("must be 1 to {MAX_SHORT_TEXT} bytes"),
                        ));
                    }
                    if calls[..k].iter().any(|o| o.id == c.id) {
                        return Err(FieldError::new(
                            &at(&format!(".tool_calls[{k}].id")),
                            format!("{:?} is used twice", c.id),
                        ));
                    }
                    if !valid_function_name(&c.function.name) {
                        return Err(FieldError::new(
                            &at(&format!(".tool_calls[{k}].function.name")),
                            "must be 1 to 64 characters of [A-Za-z0-9_-]",
                        ));
                    }
                }
                open = calls.iter().map(|c| c.id.as_str()).collect();
                opened_at = i;
            }
        }
    }
    if !open.is_empty() {
        return Err(FieldError::new(
            &format!("messages[{opened_at}].tool_calls"),
            format!("calls {open:?} have no tool message answering them"),
        ));
    }
    Ok(())
}

fn check_parts(parts: &[Part], field: &str, images: bool) -> Result<(), FieldError> {
    if parts.is_empty() {
        return Err(FieldError::new(
            field,
            "must hold at least one content part",
        ));
    }
    for (k, p) in parts.iter().enumerate() {
        match p {
            Part::Text { text } if blank(text) => {
                return Err(FieldError::new(
                    &format!("{field}[{k}].text"),
                    "must not be empty",
                ))
            }
            Part::Text { .. } => {}
            Part::ImageUrl { image_url } => {
                if !images {
                    return Err(FieldError::new(
                        &format!("{field}[{k}]"),
                        "only user messages take image parts",
                    ));
                }
                let u = image_url.url.as_str();
                if !(u.starts_with("https://")
                    || u.starts_with("http://")
                    || u.starts_with("data:"))
                {
                    return Err(FieldError::new(
                        &format!("{field}[{k}].image_url.url"),
                        "must be an http(s) URL or a data: URL",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The calls of the last assistant `tool_calls` message that no `tool` message after it answers
/// (a step still waiting for results), in the order they were made.
pub fn unanswered_calls(messages: &[Message]) -> Vec<ToolCall> {
    let Some(at) = messages
        .iter()
        .rposition(|m| m.role == Role::Assistant && m.tool_calls.is_some())
    else {
        return Vec::new();
    };
    let answered: Vec<&str> = messages[at + 1..]
        .iter()
        .filter(|m| m.role == Role::Tool)
        .filter_map(|m| m.tool_call_id.as_deref())
        .collect();
    messages[at]
        .tool_calls
        .iter()
        .flatten()
        .filter(|c| !answered.contains(&c.id.as_str()))
        .cloned()
        .collect()
}

/// What remains of an agent's stored memory once every piece a provider would refuse is gone:
/// trimming keeps the newest messages, so it can cut an exchange in two (an assistant's
/// `tool_calls` without the results after it, or results whose call was trimmed away). The
/// history starts at its first user message, and a tool-call group stays only whole.
pub fn repair_history(messages: Vec<Message>) -> Vec<Message> {
    let Some(first_user) = messages.iter().position(|m| m.role == Role::User) else {
        return Vec::new();
    };
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() - first_user);
    let mut rest = messages.into_iter().skip(first_user).peekable();
    while let Some(m) = rest.next() {
        match m.role {
            // a result whose call is not just before it
            Role::Tool => continue,
            Role::Assistant if m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) => {
                let mut open: Vec<String> = m
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|c| c.id.clone())
                    .collect();
                let mut results = Vec::new();
                while let Some(next) = rest.next_if(|n| n.role == Role::Tool) {
                    if let Some(k) = open
                        .iter()
                        .position(|id| Some(id.as_str()) == next.tool_call_id.as_deref())
                    {
                        open.remove(k);
                        results.push(next);
                    }
                }
                if open.is_empty() {
                    out.push(m);
                    out.extend(results);
                } else if m.content.as_ref().is_some_and(|c| match c {
                    Content::Text(s) => !blank(s),
                    Content::Parts(p) => !p.is_empty(),
                }) {
                    // the words stay; the unanswered calls go
                    out.push(Message {
                        tool_calls: None,
                        ..m
                    });
                }
            }
            _ => out.push(m),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msgs(v: Value) -> Vec<Message> {
        serde_json::from_value(v).expect("messages parse")
    }

    fn call(id: &str) -> Value {
        json!({"id": id, "type": "function", "function": {"name": "add", "arguments": "{}"}})
    }

    #[test]
    fn a_whole_tool_exchange_is_valid() {
        let m = msgs(json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "add"}, {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
            {"role": "assistant", "content": null, "tool_calls": [call("a"), call("b")]},
            {"role": "tool", "tool_call_id": "b", "content": "2"},
            {"role": "tool", "tool_call_id": "a", "content": "1"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "thanks"}
        ]));
        validate_messages(&m).expect("valid");
        // and it serializes back to the wire shape it came from
        let back = serde_json::to_value(&m).expect("serializes");
        assert_eq!(back[2]["tool_calls"][0]["type"], "function");
        assert_eq!(back[1]["content"][1]["image_url"]["detail"], "low");
        assert!(back[2].get("content").is_none());
    }

    #[test]
    fn order_mistakes_name_the_message() {
        let cases = [
            (
                json!([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "a", "content": "1"}]),
                "messages[1].tool_call_id",
            ),
            (
                json!([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("a")]}]),
                "messages[1].tool_calls",
            ),
            (
                json!([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("a")]}, {"role": "user", "content": "y"}]),
                "messages[2]",
            ),
            (
                json!([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("a"), call("a")]}]),
                "messages[1].tool_calls[1].id",
            ),
            (
                json!([{"role": "user", "content": "x", "tool_calls": [call("a")]}]),
                "messages[0].tool_calls",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]),
                "messages[0].content[0].image_url.url",
            ),
            (
                json!([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}, {"role": "user", "content": "x"}]),
                "messages[0].content[0]",
            ),
            (
                json!([{"role": "user", "content": "x"}, {"role": "assistant"}]),
                "messages[1].content",
            ),
        ];
        for (v, field) in cases {
            let err = validate_messages(&msgs(v.clone())).expect_err(&v.to_string());
            assert_eq!(err.field, field, "{v}: {err}");
        }
    }

    #[test]
    fn unknown_fields_and_shapes_are_refused() {
        for bad in [
            json!([{"role": "user", "content": "x", "colour": 1}]),
            json!([{"role": "user", "content": 5}]),
            json!([{"role": "user", "content": [{"type": "video", "url": "x"}]}]),
            json!([{"role": "wizard", "content": "x"}]),
            json!([{"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}]),
        ] {
            assert!(
                serde_json::from_value::<Vec<Message>>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        // the tagged shapes refuse extra fields too, unit variants included
        for bad in [
            json!({"response_format": {"type": "text", "extra": 1}}),
            json!({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}),
            json!({"tool_choice": {"type": "function", "function": {"name": "f"}, "x": 1}}),
            json!({"tools": [{"type": "function", "function": {"name": "f"}, "x": 1}]}),
            json!({"stop": 5}),
        ] {
            assert!(
                serde_json::from_value::<ChatParams>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn params_name_their_field() {
        let p = |v: Value| -> ChatParams { serde_json::from_value(v).expect("parses") };
        let cases = [
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"top_p": -0.1}), "top_p"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_tokens": 5, "max_completion_tokens": 5}),
                "max_completion_tokens",
            ),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": ["a", ""]}), "stop[1]"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice.function.name",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": ""}}}),
                "response_format.json_schema.name",
            ),
        ];
        for (v, field) in cases {
            let err = p(v.clone()).validate(&[]).expect_err(&v.to_string());
            assert_eq!(err.field, field, "{v}");
        }
        let ok = p(json!({
            "temperature": 0.2, "top_p": 1, "max_tokens": 64, "stop": "END", "seed": -3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "add"}},
            "parallel_tool_calls": false, "user": "u-1"
        }));
        ok.validate(&[]).expect("valid");
        assert_eq!(ok.output_cap(), Some(64));
    }

    #[test]
    fn repair_keeps_only_whole_exchanges() {
        // trimming cut the assistant's tool_calls message: its results are orphans
        let cut = msgs(json!([
            {"role": "tool", "tool_call_id": "a", "content": "1"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "tool_calls": [call("b"), call("c")]},
            {"role": "tool", "tool_call_id": "b", "content": "2"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "thinking", "tool_calls": [call("d")]},
            {"role": "user", "content": "last"},
            {"role": "assistant", "tool_calls": [call("e")]},
            {"role": "tool", "tool_call_id": "e", "content": "5"},
            {"role": "assistant", "content": "5!"}
        ]));
        let fixed = repair_history(cut);
        validate_messages(&fixed).expect("repaired history is valid");
        let roles: Vec<Role> = fixed.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::User,
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::Assistant
            ]
        );
        assert_eq!(fixed[2].text_content(), "thinking");
        assert!(fixed[2].tool_calls.is_none());
    }

    #[test]
    fn a_tool_message_serializes_role_first() {
        let m = Message {
            role: Role::Tool,
            tool_call_id: Some("c".into()),
            ..Message::user("r")
        };
        let json = serde_json::to_string(&m).expect("serializes");
        assert!(json.starts_with(r#"{"role":"tool","#), "{json}");
    }

    #[test]
    fn old_records_still_parse() {
        let m: Message =
            serde_json::from_str(r#"{"role":"user","content":"hi"}"#).expect("old shape");
        assert_eq!(m, Message::user("hi"));
        assert_eq!(
            serde_json::to_string(&m).expect("serializes"),
            r#"{"role":"user","content":"hi"}"#
        );
    }
}
