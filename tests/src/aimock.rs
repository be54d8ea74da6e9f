//! Harness for aimock (npm `@copilotkit/aimock` 1.43.0), a third-party OpenAI-compatible mock
//! server: the wire tests (`tests/wire_aimock.rs`) point the real worker at it.
//!
//! aimock is installed into `tests/peers/aimock/node_modules` by `tests/peers/aimock/install.sh`
//! (`npm ci` from the lock file). [`Aimock::start`] writes the fixtures to a temp dir, runs its
//! `llmock` CLI (`dist/cli.js`) on a free port with `--validate-on-load`, waits for `/ready` and
//! kills it on drop. Every call it answered is read back from its request journal
//! (`GET /__aimock/journal`), with aimock's own timestamps.
//!
//! Fixture format (JSON, `{"fixtures": [{"match": {...}, "response": {...}}]}`), as far as the
//! tests use it:
//! - `match.userMessage`: substring of the last user message (first fixture that matches wins);
//!   `match.sequenceIndex: n`: only the n-th (0-based) match of the fixtures sharing the same
//!   other match fields, so `[500, 503, 200]` is three fixtures with indexes 0, 1, 2.
//! - `response.content` (+ `finishReason`, `usage`, `model`, `id` overrides): a chat completion;
//!   `finishReason` is sent verbatim, `""` included.
//! - `response.toolCalls: [{id, name, arguments}]`: `content: null` and those tool calls;
//!   `toolCalls: []` gives a reply with no content, no refusal and no tool calls.
//! - `response.error: {message, type, code}` + `status`: that status with `{"error": {...}}` as
//!   the body, `status: 200` included. On a 429 aimock always adds `Retry-After` (`retryAfter`,
//!   default 1, written with JavaScript's `String(n)`, so `1e300` goes out as `1e+300`) and a fixed
//!   set of `x-ratelimit-*` headers (`remaining-requests: 0`, `reset-requests: 1s`,
//!   `reset-tokens: 6m0s`, ...). No other custom headers, no raw bodies on the chat endpoint, and
//!   `message.refusal` is always `null`.
//! - A request no fixture matches gets 404 `no_fixture_match`; [`Call::matched`] tells them apart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{free_port, Proc};

/// The command that installs aimock, for error messages.
pub const INSTALL: &str = "bash tests/peers/aimock/install.sh";

/// `tests/peers/aimock`: package.json, package-lock.json, install.sh and node_modules.
pub fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/aimock")
}

/// The `llmock` CLI script, or an error naming the install script.
pub fn cli() -> Result<PathBuf> {
    let cli = peer_dir().join("node_modules/@copilotkit/aimock/dist/cli.js");
    if !cli.exists() {
        bail!(
            "aimock is not installed ({} is missing): run `{INSTALL}` (needs Node >= 20.15 and \
             npm) from the repository root",
            cli.display()
        );
    }
    if Command::new("node").arg("--version").output().is_err() {
        bail!("`node` is not on PATH: aimock needs Node >= 20.15 (see `{INSTALL}`)");
    }
    Ok(cli)
}

// ---- fixture builders ----

/// `{"match": {"userMessage": prompt}, "response": response}`.
pub fn on(prompt: &str, response: Value) -> Value {
    json!({ "match": { "userMessage": prompt }, "response": response })
}

/// One answer per call, in order: the n-th call of `prompt` gets `responses[n]`; calls after
/// the last one match nothing (404 `no_fixture_match`).
pub fn sequence(prompt: &str, responses: &[Value]) -> Vec<Value> {
    responses
        .iter()
        .enumerate()
        .map(|(i, r)| json!({ "match": { "userMessage": prompt, "sequenceIndex": i }, "response": r }))
        .collect()
}

/// A plain text reply.
pub fn text(content: &str) -> Value {
    json!({ "content": content })
}

/// An error reply: HTTP `status` with body `{"error": {"message", "type"}}`.
pub fn error(status: u16, kind: &str, message: &str) -> Value {
    json!({ "error": { "message": message, "type": kind }, "status": status })
}

/// A 429 whose `Retry-After` header is `String(retry_after)` in JavaScript (plus aimock's fixed
/// `x-ratelimit-*` headers).
pub fn rate_limited(retry_after: f64, message: &str) -> Value {
    json!({
        "error": { "message": message, "type": "rate_limit_error", "code": "rate_limit_exceeded" },
        "status": 429,
        "retryAfter": retry_after,
    })
}

/// One chat-completions call as aimock's journal recorded it.
#[derive(Debug, Clone)]
pub struct Call {
    /// aimock's clock (Unix ms) when it handled the request.
    pub at_ms: i64,
    /// The status aimock answered with.
    pub status: u16,
    /// The last user message of the request.
    pub prompt: String,
    /// False when no fixture matched (aimock answered 404 `no_fixture_match`).
    pub matched: bool,
    /// The request body as received.
    pub body: Value,
    /// The request headers (lower-case names); aimock's journal replaces the value of credential
    /// headers (`authorization`, `x-api-key`, ...) with `[REDACTED]`.
    pub headers: Value,
}

/// A running aimock server, killed on drop.
pub struct Aimock {
    pub url: String,
    /// The inbound key aimock was told to require (`AIMOCK_API_KEYS`), sent on journal reads.
    api_key: Option<String>,
    proc: Proc,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Aimock {
    /// Writes `fixtures` to a temp dir and starts aimock on them; its log goes to
    /// `log_dir/aimock-<port>.log` (pass the stack's log dir so `log_tails` shows it).
    pub async fn start(fixtures: &[Value], log_dir: &Path) -> Result<Self> {
        Self::start_with(fixtures, log_dir, None).await
    }

    /// Like [`Aimock::start`]; with `api_key`, aimock answers 401 to any call whose credential
    /// (`Authorization: Bearer ...`) is missing or is not exactly that key.
    pub async fn start_with(
        fixtures: &[Value],
        log_dir: &Path,
        api_key: Option<&str>,
    ) -> Result<Self> {
        let cli = cli()?;
        check_prompts_distinct(fixtures)?;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("fixtures.json");
        std::fs::write(
            &file,
            serde_json::to_vec_pretty(&json!({ "fixtures": fixtures }))?,
        )?;
        let port = free_port();
        let mut cmd = Command::new("node");
        cmd.arg(&cli)
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .arg("--fixtures")
            .arg(&file)
            .args(["--validate-on-load", "--log-level", "info"])
            .args(["--journal-max", "0"]);
        if let Some(key) = api_key {
            cmd.env("AIMOCK_API_KEYS", key);
        }
        let mut proc = Proc::spawn(&format!("aimock-{port}"), &mut cmd, log_dir)?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{url}/ready")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(status) = proc.try_exit() {
                bail!(
                    "aimock exited ({status}) before it was ready:\n{}",
                    proc.tail()
                );
            }
            if Instant::now() > deadline {
                bail!("aimock not ready on {url} after 20 s:\n{}", proc.tail());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(Self {
            url,
            api_key: api_key.map(str::to_owned),
            proc,
            _dir: dir,
            http,
        })
    }

    /// What to put in the worker's `OPENAI_BASE_URL`.
    pub fn openai_base_url(&self) -> String {
        format!("{}/v1", self.url)
    }

    /// aimock's log so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// Every chat-completions call so far, oldest first.
    pub async fn calls(&self) -> Result<Vec<Call>> {
        let mut req = self.http.get(format!(
            "{}/__aimock/journal?path=/v1/chat/completions",
            self.url
        ));
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let r = req.send().await?;
        if !r.status().is_success() {
            bail!("GET /__aimock/journal: {}", r.status());
        }
        let entries: Vec<Value> = r.json().await.context("journal is not a JSON array")?;
        let mut calls: Vec<Call> = entries.iter().map(call_of).collect();
        calls.sort_by_key(|c| c.at_ms);
        Ok(calls)
    }

    /// The calls whose last user message is exactly `prompt`, oldest first.
    pub async fn calls_of(&self, prompt: &str) -> Result<Vec<Call>> {
        Ok(self
            .calls()
            .await?
            .into_iter()
            .filter(|c| c.prompt == prompt)
            .collect())
    }
}

fn call_of(e: &Value) -> Call {
    let body = e["body"].clone();
    let prompt = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    Call {
        at_ms: e["timestamp"].as_i64().unwrap_or_default(),
        status: e["response"]["status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or_default(),
        prompt,
        matched: !e["response"]["fixture"].is_null(),
        body,
        headers: e["headers"].clone(),
    }
}

/// `userMessage` is a substring match and the first fixture wins: refuse fixture sets where one
/// prompt contains another, which would route calls to the wrong fixture.
fn check_prompts_distinct(fixtures: &[Value]) -> Result<()> {
    let prompts: Vec<&str> = fixtures
        .iter()
        .filter_map(|f| f["match"]["userMessage"].as_str())
        .collect();
    for a in &prompts {
        for b in &prompts {
            if a != b && b.contains(a) {
                bail!("fixture prompt {a:?} is a substring of {b:?}: aimock would mix them up");
            }
        }
    }
    Ok(())
}
