//! Harness for the LiteLLM proxy (PyPI `litellm[proxy]`, pinned in
//! `tests/peers/litellm/requirements.txt`), a third-party OpenAI-compatible peer the wire tests
//! (`tests/tests/wire_litellm.rs`) put between the worker and the LLM.
//!
//! [`LiteLlm::start`] writes the given config (JSON, which YAML reads as-is) into a temp dir, runs
//! `litellm --config <it> --port <free port>` from the repo-local venv `tests/peers/.venv-litellm`
//! (made by `tests/peers/litellm/install.sh`) with a clean environment, waits for
//! `/health/readiness`, and kills it on drop. Its log (uvicorn's access lines included) goes to
//! `<log_dir>/litellm.log`, so a [`crate::Stack`]'s `log_tails` shows it when given `s.logs`.
//!
//! Nothing it runs reaches the network: the model cost map, Anthropic beta headers, blog posts and
//! policy templates are the copies bundled in the wheel (`LITELLM_LOCAL_*`), `--telemetry False`,
//! no database, and the tokenizers are the ones shipped in the wheel. Startup is dominated by Python imports: about 12 s on an idle
//! 2-core machine (`python -X importtime`: `litellm.proxy.proxy_server` alone is ~12 s of CPU),
//! longer when tests start several at once; [`LiteLlm::startup`] says how long it took.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{free_port, Proc};

/// The script that makes the venv, named in every "not installed" error.
pub const INSTALL_SCRIPT: &str = "tests/peers/litellm/install.sh";

/// How long the proxy may take to answer `/health/readiness`: ~12 s idle, several times that when
/// nextest starts a few of them and the binaries on 2 cores.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// `tests/peers/` in this checkout.
fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The venv `install.sh` makes.
pub fn venv() -> PathBuf {
    peers_dir().join(".venv-litellm")
}

/// The LiteLLM version `requirements.txt` pins (`litellm[proxy]==X`).
pub fn pinned_version() -> Result<String> {
    let req = peers_dir().join("litellm/requirements.txt");
    let text = std::fs::read_to_string(&req).with_context(|| format!("read {}", req.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("litellm[proxy]=="))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no litellm[proxy]==VERSION line in {}", req.display()))
}

/// The `litellm` executable, after checking the venv holds the pinned version (a cheap look at
/// its `litellm-X.dist-info`, no Python started). The error says to run [`INSTALL_SCRIPT`].
pub fn executable() -> Result<PathBuf> {
    let venv = venv();
    let exe = venv.join("bin/litellm");
    let fix = format!("run `bash {INSTALL_SCRIPT}` (from the repo root) to install it");
    if !exe.exists() {
        bail!(
            "the LiteLLM proxy is not installed: {} is missing; {fix}",
            exe.display()
        );
    }
    let want = pinned_version()?;
    let dist = format!("litellm-{want}.dist-info");
    let found = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|py| py.path().join("site-packages").join(&dist).is_dir());
    if !found {
        bail!(
            "{} does not hold litellm {want} (requirements.txt changed since it was made); {fix}",
            venv.display()
        );
    }
    Ok(exe)
}

/// A running LiteLLM proxy, killed on drop.
pub struct LiteLlm {
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// How long it took from spawn to a 200 from `/health/readiness`.
    pub startup: Duration,
    pub proc: Proc,
    /// Holds `config.yaml`.
    pub dir: tempfile::TempDir,
}

impl LiteLlm {
    /// Starts the proxy with `config` (the whole config file: `model_list`, `litellm_settings`,
    /// `router_settings`, `general_settings`) and waits until it is ready. Its log is
    /// `<log_dir>/litellm.log`.
    pub async fn start(config: &Value, log_dir: &Path) -> Result<Self> {
        let exe = executable()?;
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("config.yaml");
        // JSON is YAML: no YAML writer needed.
        std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)?;
        let port = free_port();
        let mut cmd = Command::new(&exe);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(port.to_string())
            .args(["--telemetry", "False"])
            .current_dir(dir.path())
            .env_clear()
            // the venv's bin first; a clean environment otherwise: no OPENAI_API_KEY, no proxies
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/bin:/usr/bin:/bin",
                    exe.parent().map(Path::display).expect("bin dir")
                ),
            )
            .env("HOME", dir.path())
            .env("NO_PROXY", "*")
            .env("PYTHONUNBUFFERED", "1")
            // the copies bundled in the wheel instead of downloads from GitHub
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True")
            .env("LITELLM_LOCAL_BLOG_POSTS", "True")
            .env("LITELLM_LOCAL_POLICY_TEMPLATES", "True")
            .env("LITELLM_DONT_SHOW_FEEDBACK_BOX", "True")
            .env("LITELLM_LOG", "WARNING");
        let t0 = Instant::now();
        let mut proc = Proc::spawn("litellm", &mut cmd, log_dir)?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let ready = format!("{url}/health/readiness");
        loop {
            if let Ok(r) = http.get(&ready).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(status) = proc.try_exit() {
                bail!(
                    "litellm exited with {status} before it was ready; its log:\n{}",
                    proc.tail()
                );
            }
            if t0.elapsed() > READY_TIMEOUT {
                bail!(
                    "litellm not ready on {url} after {READY_TIMEOUT:?}; its log:\n{}",
                    proc.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let startup = t0.elapsed();
        eprintln!("litellm ready on port {port} after {startup:.1?}");
        Ok(Self {
            port,
            url,
            startup,
            proc,
            dir,
        })
    }

    /// What the worker's `OPENAI_BASE_URL` should be: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.url)
    }

    /// Chat-completion requests LiteLLM answered so far, by HTTP status, from uvicorn's access
    /// log lines (`"POST /v1/chat/completions HTTP/1.1" 429`). Every request the worker made,
    /// whether LiteLLM answered it itself or relayed the upstream's answer.
    pub fn chat_statuses(&self) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for line in self.proc.log_text().lines() {
            let Some(rest) = line
                .split_once("\"POST /v1/chat/completions HTTP/1.1\" ")
                .map(|(_, r)| r)
            else {
                continue;
            };
            if let Some(code) = rest.get(..3).and_then(|c| c.parse().ok()) {
                *out.entry(code).or_insert(0) += 1;
            }
        }
        out
    }

    /// Waits (up to 5 s) until [`LiteLlm::chat_statuses`] equals `want`, since uvicorn writes an
    /// access line just after the answer it logs; returns the last counts either way.
    pub async fn settled_chat_statuses(&self, want: &BTreeMap<u16, u64>) -> BTreeMap<u16, u64> {
        self.chat_statuses_when(|got| got == want).await
    }

    /// Waits (up to 5 s) until `done` holds for [`LiteLlm::chat_statuses`]; returns the last
    /// counts either way.
    pub async fn chat_statuses_when(
        &self,
        done: impl Fn(&BTreeMap<u16, u64>) -> bool,
    ) -> BTreeMap<u16, u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.chat_statuses();
            if done(&got) || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One answer from the proxy, as [`LiteLlm::chat`] saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Answer {
    /// Headers whose name starts with any of `prefixes` (lowercase).
    pub fn headers_starting(&self, prefixes: &[&str]) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .cloned()
            .collect()
    }
}

impl LiteLlm {
    /// POSTs one chat completion straight to the proxy (no worker): for probes of its wire and to
    /// warm it up (its first call of a provider imports code and can take a second or more).
    pub async fn chat(&self, key: &str, model: &str, prompt: &str) -> Result<Answer> {
        let r = reqwest::Client::new()
            .post(format!("{}/chat/completions", self.base_url()))
            .bearer_auth(key)
            .timeout(Duration::from_secs(30))
            .json(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 64,
            }))
            .send()
            .await?;
        let status = r.status().as_u16();
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = r.json().await.unwrap_or(Value::Null);
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}
