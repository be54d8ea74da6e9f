//! Server-side tools over MCP (the official Rust SDK, `rmcp`, Streamable HTTP transport).
//!
//! One client session per declared server, opened on first use and kept; a session that fails is
//! dropped and opened again on the next use. Tool lists are cached per server for a minute. Every
//! call is bounded in time (`AGENTQ_MCP_TIMEOUT_SECS`) and in the size of what the model is given
//! (`AGENTQ_MCP_MAX_RESULT_BYTES`); a failing, slow or unknown tool becomes a tool result that
//! says so, for the model to read, never a failure of the task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentq_common::chat::{FunctionDef, FunctionKind, Tool};
use agentq_common::mcp::{function_name, McpServers, McpUse};
use rmcp::model::{CallToolRequestParams, ContentBlock};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use tokio::sync::Mutex;

type Session = Arc<RunningService<RoleClient, ()>>;

/// How long a server's tool list is reused before it is listed again.
const TOOLS_TTL: Duration = Duration::from_secs(60);

/// A tool the model may call, and where it lives.
#[derive(Debug, Clone)]
pub struct McpTool {
    pub server: String,
    /// The tool's own name on its server.
    pub name: String,
    /// What the model sees: a function named `<server>__<tool>`.
    pub function: Tool,
}

struct Listed {
    at: Instant,
    tools: Vec<rmcp::model::Tool>,
}

pub struct McpHub {
    servers: McpServers,
    timeout: Duration,
    max_result_bytes: usize,
    sessions: Mutex<HashMap<String, Session>>,
    listed: Mutex<HashMap<String, Listed>>,
}

impl McpHub {
    pub fn new(servers: McpServers, timeout: Duration, max_result_bytes: usize) -> Self {
        Self {
            servers,
            timeout,
            max_result_bytes,
            sessions: Mutex::new(HashMap::new()),
            listed: Mutex::new(HashMap::new()),
        }
    }

    async fn session(&self, server: &str) -> Result<Session, String> {
        if let Some(s) = self.sessions.lock().await.get(server) {
            if !s.is_transport_closed() {
                return Ok(s.clone());
            }
        }
        let Some(decl) = self.servers.get(server) else {
            return Err(format!("MCP server {server:?} is not declared"));
        };
        let mut headers = HashMap::new();
        for (k, v) in &decl.headers {
            let (Ok(name), Ok(mut value)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) else {
                return Err(format!("MCP server {server:?}: header {k} is not valid"));
            };
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut config = StreamableHttpClientTransportConfig::with_uri(decl.url.as_str());
        config.custom_headers = headers;
        let transport = StreamableHttpClientTransport::from_config(config);
        let session = tokio::time::timeout(self.timeout, ().serve(transport))
            .await
            .map_err(|_| {
                format!(
                    "MCP server {server:?} did not answer within {:?}",
                    self.timeout
                )
            })?
            .map_err(|e| format!("MCP server {server:?} could not be reached: {e}"))?;
        let session = Arc::new(session);
        self.sessions
            .lock()
            .await
            .insert(server.to_owned(), session.clone());
        Ok(session)
    }

    async fn forget(&self, server: &str) {
        self.sessions.lock().await.remove(server);
        self.listed.lock().await.remove(server);
    }

    /// The tools of one server (cached for a minute).
    async fn server_tools(&self, server: &str) -> Result<Vec<rmcp::model::Tool>, String> {
        if let Some(l) = self.listed.lock().await.get(server) {
            if l.at.elapsed() < TOOLS_TTL {
                return Ok(l.tools.clone());
            }
        }
        let session = self.session(server).await?;
        let tools = match tokio::time::timeout(self.timeout, session.list_all_tools()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                self.forget(server).await;
                return Err(format!(
                    "MCP server {server:?} could not list its tools: {e}"
                ));
            }
            Err(_) => {
                self.forget(server).await;
                return Err(format!(
                    "MCP server {server:?} did not list its tools within {:?}",
                    self.timeout
                ));
            }
        };
        self.listed.lock().await.insert(
            server.to_owned(),
            Listed {
                at: Instant::now(),
                tools: tools.clone(),
            },
        );
        Ok(tools)
    }

    /// The tools a task enabled, as functions the model is offered. An error (a server that
    /// cannot be reached or listed) fails the run as transient: without its tools the model
    /// would answer a different question.
    pub async fn tools_for(&self, uses: &[McpUse]) -> Result<Vec<McpTool>, String> {
        let mut out = Vec::new();
        for u in uses {
            for t in self.server_tools(&u.server).await? {
                if u.tools
                    .as_ref()
                    .is_some_and(|only| !only.iter().any(|n| *n == t.name))
                {
                    continue;
                }
                let Some(name) = function_name(&u.server, &t.name) else {
                    tracing::debug!(server = %u.server, tool = %t.name, "tool name too long to offer");
                    continue;
                };
                out.push(McpTool {
                    server: u.server.clone(),
                    name: t.name.to_string(),
                    function: Tool {
                        kind: FunctionKind::Function,
                        function: FunctionDef {
                            name,
                            description: t
                                .description
                                .as_ref()
                                .map(|d| truncate(d.to_string(), 4096)),
                            parameters: Some((*t.input_schema).clone()),
                            strict: None,
                        },
                    },
                });
            }
        }
        Ok(out)
    }

    /// Calls one tool; the result (or what went wrong) as the text the model reads.
    pub async fn call(&self, tool: &McpTool, arguments: &str) -> String {
        let args = if arguments.trim().is_empty() {
            serde_json::Map::new()
        } else {
            match serde_json::from_str::<serde_json::Value>(arguments) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => {
                    return format!(
                        "error: the arguments of {} must be a JSON object",
                        tool.function.function.name
                    )
                }
            }
        };
        let session = match self.session(&tool.server).await {
            Ok(s) => s,
            Err(e) => return format!("error: {e}"),
        };
        let mut params = CallToolRequestParams::new(tool.name.clone());
        params.arguments = Some(args);
        let result = match tokio::time::timeout(self.timeout, session.call_tool(params)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.forget(&tool.server).await;
                return format!("error: the tool call failed: {e}");
            }
            Err(_) => {
                return format!(
                    "error: the tool did not answer within {}s",
                    self.timeout.as_secs()
                )
            }
        };
        let mut text = String::new();
        for block in &result.content {
            if !text.is_empty() {
                text.push('\n');
            }
            match block {
                ContentBlock::Text(t) => text.push_str(&t.text),
                other => text.push_str(&serde_json::to_string(other).unwrap_or_default()),
            }
            if text.len() > self.max_result_bytes {
                break;
            }
        }
        if text.is_empty() {
            if let Some(s) = &result.structured_content {
                text = s.to_string();
            }
        }
        if result.is_error == Some(true) {
            text = format!("error: {text}");
        }
        truncate(text, self.max_result_bytes)
    }
}

/// At most `max` bytes, cut at a character boundary, saying how much was left out.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let total = s.len();
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push_str(&format!(" [truncated: {total} bytes in all]"));
    s
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn results_are_cut_at_a_char_boundary_and_say_so() {
        assert_eq!(truncate("short".into(), 10), "short");
        let cut = truncate("ééééé".into(), 3);
        assert_eq!(cut, "é [truncated: 10 bytes in all]");
    }
}
