//! Tests of the `agentq-mock-llm` binary: startup line, config errors, SIGTERM.

// Panicking on unexpected test data is exactly what a test should do.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_agentq-mock-llm");

fn command() -> Command {
    let mut cmd = Command::new(BIN);
    // Keep the developer's environment from leaking into the assertions.
    for var in [
        "MOCK_LLM_LISTEN",
        "MOCK_LLM_LATENCY_MS",
        "MOCK_LLM_ERROR_RATE",
        "MOCK_LLM_API_KEY",
        "MOCK_LLM_RECORD",
        "MOCK_LLM_RPM",
        "MOCK_LLM_TPM",
        "MOCK_RPM",
        "MOCK_TPM",
        "MOCK_LLM_STREAM_RATE",
        "MOCK_STREAM_RATE",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("agentq-mock-llm did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

#[tokio::test]
async fn prints_listening_line_serves_and_stops_on_sigterm() {
    let mut child = command()
        .env("MOCK_LLM_LISTEN", "127.0.0.1:0")
        .env("MOCK_LLM_API_KEY", "")
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();

    let base = line
        .strip_prefix("agentq-mock-llm listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim_end()
        .to_owned();
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"),
        "{base}"
    );
    let port: u16 = base["http://127.0.0.1:".len()..base.len() - 3]
        .parse()
        .unwrap();
    assert_ne!(port, 0, "the real bound port is printed");

    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{base}/chat/completions"))
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hi");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_with_timeout(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr: {}", stderr_of(&mut child));

    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "exactly one line on stdout");
}

#[test]
fn bad_latency_exits_64_naming_the_variable() {
    let mut child = command()
        .env("MOCK_LLM_LISTEN", "127.0.0.1:0")
        .env("MOCK_LLM_LATENCY_MS", "soon")
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(64));
    assert!(stderr_of(&mut child).contains("MOCK_LLM_LATENCY_MS"));
}

#[test]
fn other_bad_values_exit_64_too() {
    for (var, value) in [
        ("MOCK_LLM_ERROR_RATE", "1.5"),
        ("MOCK_LLM_LISTEN", "not an address"),
        ("MOCK_LLM_RECORD", "maybe"),
        ("MOCK_LLM_RPM", "lots"),
        ("MOCK_TPM", "-5"),
        ("MOCK_LLM_STREAM_RATE", "fast"),
        ("MOCK_STREAM_RATE", "2.5"),
    ] {
        let mut child = command().env(var, value).spawn().unwrap();
        let status = wait_with_timeout(&mut child, Duration::from_secs(10));
        assert_eq!(status.code(), Some(64), "{var}={value}");
        assert!(stderr_of(&mut child).contains(var), "{var}");
    }
}

#[test]
fn bad_quota_flag_exits_64_naming_the_flag() {
    let mut child = command()
        .args(["--listen", "127.0.0.1:0", "--rpm=1.5"])
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(64));
    assert!(stderr_of(&mut child).contains("--rpm"));
}

/// `--rpm` beats `MOCK_RPM`; `MOCK_TPM` (the short alias) is read too; so
/// does `--stream-rate` beat `MOCK_STREAM_RATE`.
#[tokio::test]
async fn quota_from_flags_and_env() {
    let mut child = command()
        .env("MOCK_RPM", "9")
        .env("MOCK_TPM", "1000")
        .env("MOCK_STREAM_RATE", "7")
        .args(["--listen", "127.0.0.1:0", "--rpm", "2", "--stream-rate=25"])
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let base = line
        .strip_prefix("agentq-mock-llm listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim_end()
        .to_owned();
    let root = base.trim_end_matches("/v1");

    let client = reqwest::Client::new();
    let config: serde_json::Value = client
        .get(format!("{root}/_mock/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["rpm"], 2);
    assert_eq!(config["tpm"], 1000);
    assert_eq!(config["stream_rate"], 25);

    let mut statuses = Vec::new();
    for _ in 0..3 {
        let resp = client
            .post(format!("{base}/chat/completions"))
            .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let h = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(h("x-ratelimit-limit-requests").as_deref(), Some("2"));
        assert_eq!(h("x-ratelimit-limit-tokens").as_deref(), Some("1000"));
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    let quota: serde_json::Value = client
        .get(format!("{root}/_mock/quota"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(quota["quota_rejections"], 1);
    assert_eq!(quota["requests"], 2);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_with_timeout(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr: {}", stderr_of(&mut child));
}
