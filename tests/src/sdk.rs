//! The official OpenAI SDKs as clients: the Python `openai` package from the venv of
//! `tests/peers/litellm/install.sh` (LiteLLM pins it) and the Node `openai` package from
//! `tests/peers/openai-node/install.sh`, running the scripts in `tests/sdk/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Runs `tests/sdk/<script>` with `args` and `env` (plus `AGENTQ_BASE_URL` = `<api>/v1`) and
/// returns the JSON of its last stdout line; a non-zero exit is an error carrying its stderr
/// (the assertion that failed).
pub async fn run(
    script: &str,
    args: &[&str],
    api_url: &str,
    env: &[(&str, &str)],
) -> Result<Value> {
    let path = tests_dir().join("sdk").join(script);
    let (exe, install) = if script.ends_with(".py") {
        (
            crate::litellm::venv().join("bin/python"),
            "bash tests/peers/litellm/install.sh",
        )
    } else {
        (
            PathBuf::from("node"),
            "bash tests/peers/openai-node/install.sh",
        )
    };
    if script.ends_with(".mjs")
        && !tests_dir()
            .join("peers/openai-node/node_modules/openai/package.json")
            .exists()
    {
        bail!("the openai Node SDK is not installed: run `{install}`");
    }
    if script.ends_with(".py") && !exe.exists() {
        bail!("the openai Python SDK is not installed: run `{install}`");
    }
    let mut cmd = tokio::process::Command::new(&exe);
    cmd.arg(&path)
        .args(args)
        .env("AGENTQ_BASE_URL", format!("{api_url}/v1"))
        // the SDKs must not pick up a real key or proxy from the environment
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env("NO_PROXY", "*")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .with_context(|| format!("{script} {args:?} ran past 120 s"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{script} {args:?} failed ({}):\n{stderr}\n{stdout}",
            out.status
        );
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{script} printed {stdout:?} ({stderr})"))
}
