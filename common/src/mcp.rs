//! The MCP servers an operator declares (`AGENTQ_MCP_SERVERS`) and the ones a task enables.
//!
//! `AGENTQ_MCP_SERVERS` is a JSON object `{"<name>": {"url": "<Streamable HTTP endpoint>",
//! "headers": {"<Header>": "env:<VAR>"}}}`. A header value `env:VAR` is read from the environment
//! (secrets stay in secrets); any other value is sent as written. Tasks name servers only by these
//! names: no URL from a request is ever dialled. The api reads the names (to refuse undeclared
//! ones); only the worker resolves headers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Env};
use crate::task::FieldError;

pub const ENV_MCP_SERVERS: &str = "AGENTQ_MCP_SERVERS";
/// Most servers the operator may declare, and most a task may enable.
pub const MAX_SERVERS: usize = 32;
/// Most tool names a task's filter for one server may list.
pub const MAX_TOOL_FILTER: usize = 128;
/// What separates a server's name from its tool's in the function name the model sees:
/// `<server>__<tool>`.
pub const TOOL_SEPARATOR: &str = "__";

/// One declared server, headers resolved (or, for the api, left out).
#[derive(Clone, PartialEq, Eq)]
pub struct McpServer {
    pub url: String,
    /// Header name and value; values may be secrets: never logged, never in `Debug`.
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("url", &crate::config::redact_url(&self.url))
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Declared {
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// The declared servers, by name.
#[derive(Debug, Clone, Default)]
pub struct McpServers(pub BTreeMap<String, McpServer>);

/// A server name: it becomes part of function names the model sees (`<server>__<tool>`).
pub fn valid_server_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl McpServers {
    /// Parses `AGENTQ_MCP_SERVERS`. `resolve`: read `env:VAR` header values (the worker); the
    /// api passes false and keeps no header at all.
    pub fn from_env(env: &dyn Env, resolve: bool) -> Result<Self, ConfigError> {
        let bad = |message: String| ConfigError {
            var: ENV_MCP_SERVERS,
            message,
        };
        let Some(raw) = env.get(ENV_MCP_SERVERS).filter(|r| !r.trim().is_empty()) else {
            return Ok(Self::default());
        };
        let declared: BTreeMap<String, Declared> = serde_json::from_str(&raw)
            .map_err(|e| bad(format!("not a JSON object of servers: {e}")))?;
        if declared.len() > MAX_SERVERS {
            return Err(bad(format!("at most {MAX_SERVERS} servers")));
        }
        let mut servers = BTreeMap::new();
        for (name, d) in declared {
            if !valid_server_name(&name) {
                return Err(bad(format!(
                    "server name {name:?} must be 1 to 32 characters of [A-Za-z0-9-]"
                )));
            }
            if !(d.url.starts_with("http://") || d.url.starts_with("https://")) {
                return Err(bad(format!("{name}: url must be http:// or https://")));
            }
            let mut headers = Vec::new();
            if resolve {
                for (h, v) in d.headers {
                    let value = match v.strip_prefix("env:") {
                        Some(var) => env.get(var).ok_or_else(|| {
                            bad(format!("{name}: header {h} names {var}, which is not set"))
                        })?,
                        None => v,
                    };
                    if reqwest_header_ok(&h, &value).is_err() {
                        // the value is never echoed: it may be a secret
                        return Err(bad(format!("{name}: header {h} is not a valid header")));
                    }
                    headers.push((h, value));
                }
            }
            servers.insert(
                name,
                McpServer {
                    url: d.url,
                    headers,
                },
            );
        }
        Ok(Self(servers))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&McpServer> {
        self.0.get(name)
    }
}

/// A header name and value as HTTP allows them (visible ASCII; token characters in the name).
fn reqwest_header_ok(name: &str, value: &str) -> Result<(), ()> {
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    let value_ok = value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
    if name_ok && value_ok {
        Ok(())
    } else {
        Err(())
    }
}

/// A server a task enables: its name, or `{"server", "tools"}` to offer only some of its tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct McpUse {
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for McpUse {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            server: String,
            #[serde(default)]
            tools: Option<Vec<String>>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Name(String),
            Full(Full),
        }
        match Either::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a server name or {\"server\": name, \"tools\": [tool names]}",
            )
        })? {
            Either::Name(server) => Ok(Self {
                server,
                tools: None,
            }),
            Either::Full(f) => Ok(Self {
                server: f.server,
                tools: f.tools,
            }),
        }
    }
}

/// Checks a task's `mcp` list against the declared servers.
pub fn validate_uses(uses: &[McpUse], declared: &McpServers) -> Result<(), FieldError> {
    if uses.len() > MAX_SERVERS {
        return Err(FieldError::new(
            "mcp",
            format!("at most {MAX_SERVERS} servers"),
        ));
    }
    for (i, u) in uses.iter().enumerate() {
        if declared.get(&u.server).is_none() {
            return Err(FieldError::new(
                &format!("mcp[{i}]"),
                format!(
                    "{:?} is not a declared MCP server (AGENTQ_MCP_SERVERS)",
                    u.server
                ),
            ));
        }
        if uses[..i].iter().any(|o| o.server == u.server) {
            return Err(FieldError::new(
                &format!("mcp[{i}]"),
                format!("{:?} is enabled twice", u.server),
            ));
        }
        if let Some(tools) = &u.tools {
            if tools.is_empty() || tools.len() > MAX_TOOL_FILTER {
                return Err(FieldError::new(
                    &format!("mcp[{i}].tools"),
                    format!("1 to {MAX_TOOL_FILTER} tool names"),
                ));
            }
            if let Some(k) = tools.iter().position(|t| t.is_empty() || t.len() > 128) {
                return Err(FieldError::new(
                    &format!("mcp[{i}].tools[{k}]"),
                    "must be 1 to 128 bytes",
                ));
            }
        }
    }
    Ok(())
}

/// The function name the model sees for `tool` of `server`, or `None` when it cannot be one
/// (OpenAI's names are `[A-Za-z0-9_-]{1,64}`): other characters become `_`.
pub fn function_name(server: &str, tool: &str) -> Option<String> {
    let cleaned: String = tool
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("{server}{TOOL_SEPARATOR}{cleaned}");
    (name.len() <= 64 && !cleaned.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn servers_resolve_env_headers_and_never_show_them() {
        let e = env(&[
            (
                ENV_MCP_SERVERS,
                r#"{"search": {"url": "http://s:1/mcp", "headers": {"Authorization": "env:TOKEN", "X-Team": "a"}}}"#,
            ),
            ("TOKEN", "Bearer sekrit"),
        ]);
        let s = McpServers::from_env(&e, true).expect("valid");
        let search = s.get("search").expect("declared");
        assert!(search
            .headers
            .contains(&("Authorization".into(), "Bearer sekrit".into())));
        assert!(!format!("{s:?}").contains("sekrit"));
        // the api keeps names only
        let api = McpServers::from_env(&e, false).expect("valid");
        assert!(api.get("search").expect("declared").headers.is_empty());
    }

    #[test]
    fn bad_declarations_name_the_variable_and_hide_values() {
        for raw in [
            r#"{"a b": {"url": "http://x"}}"#,
            r#"{"a": {"url": "ftp://x"}}"#,
            r#"{"a": {"url": "http://x", "headers": {"H": "env:MISSING"}}}"#,
            r#"{"a": {"url": "http://x", "colour": 1}}"#,
            r#"{"a": {"url": "http://x", "headers": {"H": "bad\nvalue-sekrit"}}}"#,
            "[1]",
        ] {
            let err = McpServers::from_env(&env(&[(ENV_MCP_SERVERS, raw)]), true).expect_err(raw);
            assert_eq!(err.var, ENV_MCP_SERVERS);
            assert!(!err.message.contains("sekrit"), "{}", err.message);
        }
    }

    #[test]
    fn uses_and_function_names() {
        let e = env(&[(
            ENV_MCP_SERVERS,
            r#"{"everything": {"url": "http://x/mcp"}}"#,
        )]);
        let declared = McpServers::from_env(&e, false).expect("valid");
        let uses: Vec<McpUse> = serde_json::from_str(r#"["everything"]"#).expect("a name");
        validate_uses(&uses, &declared).expect("declared");
        let uses: Vec<McpUse> =
            serde_json::from_str(r#"[{"server": "everything", "tools": ["echo"]}]"#)
                .expect("a filter");
        assert_eq!(uses[0].tools.as_deref(), Some(&["echo".to_owned()][..]));
        let uses: Vec<McpUse> = serde_json::from_str(r#"["nope"]"#).expect("a name");
        assert_eq!(
            validate_uses(&uses, &declared)
                .expect_err("undeclared")
                .field,
            "mcp[0]"
        );
        assert!(serde_json::from_str::<Vec<McpUse>>(r#"[{"server": "x", "y": 1}]"#).is_err());
        assert_eq!(
            function_name("everything", "get-sum").as_deref(),
            Some("everything__get-sum")
        );
        assert_eq!(
            function_name("fs", "read.file").as_deref(),
            Some("fs__read_file")
        );
        assert_eq!(function_name("fs", &"x".repeat(80)), None);
    }
}
