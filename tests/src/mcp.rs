//! The reference MCP server, `@modelcontextprotocol/server-everything` from npm (installed by
//! `tests/peers/mcp/install.sh`), run in Streamable HTTP mode, behind a counting proxy in the
//! test process: the proxy forwards every request unchanged (SSE responses streamed) and records
//! each JSON-RPC method the worker sends and the headers it sent them with, so a test can count
//! the tool calls the server received exactly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures::TryStreamExt;

use crate::{free_port, Proc};

pub const INSTALL: &str = "bash tests/peers/mcp/install.sh";

fn entry() -> Result<PathBuf> {
    let entry = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    if !entry.exists() {
        bail!(
            "server-everything is not installed ({} is missing): run `{INSTALL}` from the \
             repository root",
            entry.display()
        );
    }
    Ok(entry)
}

/// One JSON-RPC request the server received: its method, the tool (for `tools/call`), and the
/// value of the header the test asked to watch.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub tool: Option<String>,
    pub header: Option<String>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    seen: Arc<Mutex<Vec<Seen>>>,
    watch: Option<String>,
}

pub struct McpServer {
    /// The proxy's endpoint, what `AGENTQ_MCP_SERVERS` should name.
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    _proc: Proc,
    _proxy: tokio::task::JoinHandle<()>,
}

impl McpServer {
    /// Starts server-everything on a free port and the counting proxy in front of it. `watch`:
    /// a request header whose value to record (to check the worker sends the declared headers).
    pub async fn start(log_dir: &Path, watch: Option<&str>) -> Result<Self> {
        let port = free_port();
        let mut cmd = Command::new("node");
        cmd.arg(entry()?)
            .arg("streamableHttp")
            .env("PORT", port.to_string());
        let mut proc = Proc::spawn(&format!("mcp-{port}"), &mut cmd, log_dir)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = proc.try_exit() {
                bail!("server-everything exited: {status}\n{}", proc.tail());
            }
            if Instant::now() > deadline {
                bail!("server-everything never listened\n{}", proc.tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = ProxyState {
            upstream: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            seen: seen.clone(),
            watch: watch.map(str::to_owned),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let proxy = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url: format!("http://{addr}/mcp"),
            seen,
            _proc: proc,
            _proxy: proxy,
        })
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The `tools/call` requests the server received, by tool name, in order.
    pub fn tool_calls(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "tools/call")
            .filter_map(|s| s.tool)
            .collect()
    }
}

async fn forward(State(st): State<ProxyState>, req: Request) -> Response {
    match forward_inner(&st, req).await {
        Ok(r) => r,
        Err(e) => Response::builder()
            .status(502)
            .body(Body::from(format!("proxy: {e:#}")))
            .unwrap_or_default(),
    }
}

async fn forward_inner(st: &ProxyState, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20).await?;
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
        let watched = st
            .watch
            .as_ref()
            .and_then(|h| parts.headers.get(h.as_str()))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let items = match v {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        };
        if let Ok(mut seen) = st.seen.lock() {
            for item in items {
                if let Some(method) = item["method"].as_str() {
                    seen.push(Seen {
                        method: method.to_owned(),
                        tool: item["params"]["name"].as_str().map(str::to_owned),
                        header: watched.clone(),
                    });
                }
            }
        }
    }
    let url = format!(
        "{}{}",
        st.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut out = st.http.request(parts.method.clone(), url).body(body);
    for (k, v) in &parts.headers {
        if k != axum::http::header::HOST && k != axum::http::header::CONTENT_LENGTH {
            out = out.header(k, v);
        }
    }
    let resp = out.send().await.context("upstream")?;
    let mut builder = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        if k != axum::http::header::CONTENT_LENGTH && k != axum::http::header::TRANSFER_ENCODING {
            builder = builder.header(k, v);
        }
    }
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    Ok(builder.body(Body::from_stream(stream))?)
}
