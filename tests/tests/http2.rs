//! The worker's HTTP to LLM upstreams (`AGENTQ_LLM_HTTP`, `AGENTQ_LLM_HTTP2_STREAMS`), against
//! the real binaries and the mock LLM, which answers HTTP/1.1 and h2c on one port and counts the
//! connections it accepted and the requests that came over HTTP/2.
//!
//! - `auto` (the default) keeps plain `http://` upstreams on HTTP/1.1; `http2` carries every call
//!   over HTTP/2, spread over concurrency ÷ streams connections.
//! - Over TLS, `auto` takes HTTP/2 when the server offers it in ALPN (as OpenAI's endpoints do),
//!   with the same spread; `http1` never offers it.
//! - The failures of one call (a 5xx, a reset stream, a hang past the timeout) stay that call's
//!   on a shared connection, and count as on HTTP/1.1.
//! - An upstream killed with every call in flight on two connections: each call fails once and
//!   runs once more on the restarted upstream, exactly.

use std::process::Command;
use std::time::{Duration, Instant};

use agentq_tests::{
    assert_recover, bin, free_port, llm_series, metric, tls_files, MockConfig, Proc, Stack,
};
use anyhow::{bail, Context};
use serde_json::Value;

/// The mock as a process of its own (so it can be killed), on `port`.
fn mock_process(s: &Stack, name: &str, port: u16, args: &[&str]) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin("agentq-mock-llm"));
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(args);
    Proc::spawn(name, &mut cmd, s.logs.path())
}

async fn mock_calls(s: &Stack, port: u16) -> anyhow::Result<Value> {
    let url = format!("http://127.0.0.1:{port}/_mock/calls");
    Ok(s.http
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn wait_mock(s: &Stack, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if mock_calls(s, port).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the mock on port {port} never answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_carries_the_calls_over_concurrency_over_streams_connections() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let port = free_port();
    let _mock = mock_process(
        &s,
        "mock",
        port,
        &["--latency-ms", "300", "--h2-max-streams", "8"],
    )?;
    wait_mock(&s, port).await?;
    let llm = format!("http://127.0.0.1:{port}/v1");

    // 1. auto, the default: a plain http:// upstream is spoken to in HTTP/1.1
    let mut w = s
        .start_worker(&[("OPENAI_BASE_URL", &llm), ("WORKER_CONCURRENCY", "32")])
        .await?;
    let mut ids = Vec::new();
    for i in 0..16 {
        ids.push(s.submit(&format!("auto {i}")).await?);
    }
    for t in s.wait_final(&ids, Duration::from_secs(30)).await? {
        assert_eq!(t["status"], "succeeded", "{t}");
    }
    let v = mock_calls(&s, port).await?;
    assert_eq!(v["total"], 16, "{v}");
    assert_eq!(
        v["http2_requests"], 0,
        "auto stays on HTTP/1.1 without TLS: {v}"
    );
    w.proc.sigterm();
    w.proc.wait_exit(Duration::from_secs(20))?;
    s.http
        .post(format!("http://127.0.0.1:{port}/_mock/reset"))
        .send()
        .await?
        .error_for_status()?;

    // 2. http2 with 8 streams a connection and 32 calls at once: 4 connections, each call once
    let _w = s
        .start_worker(&[
            ("OPENAI_BASE_URL", &llm),
            ("WORKER_CONCURRENCY", "32"),
            ("AGENTQ_LLM_HTTP", "http2"),
            ("AGENTQ_LLM_HTTP2_STREAMS", "8"),
        ])
        .await?;
    let mut ids = Vec::new();
    for i in 0..96 {
        ids.push(s.submit(&format!("h2 {i}")).await?);
    }
    let done = s.wait_final(&ids, Duration::from_secs(60)).await?;
    for (i, t) in done.iter().enumerate() {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 1, "{t}");
        assert_eq!(t["result"]["content"], format!("echo: h2 {i}"), "{t}");
    }
    let v = mock_calls(&s, port).await?;
    assert_eq!(v["total"], 96, "{v}");
    for i in 0..96 {
        assert_eq!(v["by_prompt"][format!("h2 {i}")], 1, "{v}");
    }
    assert_eq!(v["http2_requests"], 96, "every call over HTTP/2: {v}");
    assert_eq!(
        v["http2_connections"], 4,
        "32 calls at 8 a connection take 4 connections, kept for the whole run: {v}"
    );
    Ok(())
}

/// The per-call failures of failures.rs, over HTTP/2: a 5xx, a reset stream (`[[drop]]`) and a
/// hang past the call's timeout each fail only their own call on the shared connection, count
/// as an attempt, and are retried; the other calls on the connection are not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_calls_failure_stays_its_own_on_a_shared_connection() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s
        .start_worker(&[
            ("AGENTQ_LLM_TIMEOUT_SECS", "1"),
            ("WORKER_CONCURRENCY", "8"),
            ("AGENTQ_LLM_HTTP", "http2"),
        ])
        .await?;
    let cases = [
        ("h2 recovers 500 [[fail:500:2]]", 2),
        ("h2 recovers 503 [[fail:503:1]]", 1),
        ("h2 recovers hang [[hang:1]]", 1),
        ("h2 recovers drop [[drop:2]]", 2),
        ("h2 plain a", 0),
        ("h2 plain b", 0),
    ];
    assert_recover(&s, &cases).await?;
    assert_eq!(
        s.mock.http2_requests(),
        s.mock.total_calls(),
        "every call over HTTP/2"
    );
    // one worker at concurrency 8 (≤ 100 streams): one connection, never replaced, since
    // neither a reset stream nor a timed-out one closes it
    assert_eq!(s.mock.http2_connections(), 1);
    Ok(())
}

/// The upstream dies with 16 calls in flight over two HTTP/2 connections: every call fails
/// (counted as an attempt), and after the upstream is back each task runs exactly once more.
/// A retry may land in the instant the port is closed (full jitter from 0): refused, it is one
/// more attempt, and one more `connection_error`, so the accounting stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_mid_calls_fails_each_stream_once() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let port = free_port();
    let mut first = mock_process(&s, "mock-1", port, &["--latency-ms", "30000"])?;
    wait_mock(&s, port).await?;
    let llm = format!("http://127.0.0.1:{port}/v1");
    let w = s
        .start_worker(&[
            ("OPENAI_BASE_URL", &llm),
            ("WORKER_CONCURRENCY", "16"),
            ("AGENTQ_LLM_HTTP", "http2"),
            ("AGENTQ_LLM_HTTP2_STREAMS", "8"),
            ("AGENTQ_LLM_TIMEOUT_SECS", "60"),
            // the restart below takes milliseconds; retries mostly come after it
            ("AGENTQ_RETRY_BASE_MS", "1500"),
            ("AGENTQ_RETRY_MAX_MS", "1500"),
        ])
        .await?;
    let mut ids = Vec::new();
    for i in 0..16 {
        ids.push(s.submit(&format!("killed {i}")).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = mock_calls(&s, port).await?;
        if v["total"] == 16 {
            assert_eq!(v["http2_connections"], 2, "16 calls at 8 a connection: {v}");
            assert_eq!(v["http2_requests"], 16, "{v}");
            break;
        }
        if Instant::now() > deadline {
            bail!("16 calls never in flight: {v}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.sigkill();
    let _second = mock_process(&s, "mock-2", port, &[])?;
    wait_mock(&s, port).await?;
    let done = s
        .wait_final(&ids, Duration::from_secs(30))
        .await
        .context("after the upstream's restart")?;
    let failed = metric(
        &w.metrics().await?,
        &llm_series("mock-gpt", "connection_error"),
    );
    let refused = failed - 16.0;
    assert!(
        refused >= 0.0,
        "each stream of the killed upstream failed: {failed}"
    );
    let mut attempts = 0;
    for t in &done {
        assert_eq!(t["status"], "succeeded", "{t}");
        let n = t["attempts"].as_u64().context("attempts")?;
        assert!(n >= 2, "one failed call, then one that answered: {t}");
        attempts += n;
    }
    assert_eq!(
        attempts as f64,
        32.0 + refused,
        "16 killed calls, 16 answered ones and {refused} refused while the port was closed"
    );
    let v = mock_calls(&s, port).await?;
    assert_eq!(v["total"], 16, "each task once on the new upstream: {v}");
    for i in 0..16 {
        assert_eq!(v["by_prompt"][format!("killed {i}")], 1, "{v}");
    }
    Ok(())
}

/// An HTTPS upstream offering h2 and http/1.1 in ALPN (the mock with a certificate of a private
/// CA, trusted through `SSL_CERT_FILE`): the default `auto` negotiates HTTP/2 and spreads the
/// calls over concurrency ÷ streams connections; `http1` stays on HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_takes_http2_where_a_tls_upstream_offers_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let files = tls_files(dir.path())?;
    let tls = agentq_mock_llm::tls_config(
        std::path::Path::new(&files.cert),
        std::path::Path::new(&files.key),
    )
    .map_err(anyhow::Error::msg)?;
    let mut s = Stack::new(MockConfig {
        latency: Duration::from_millis(300),
        tls: Some(tls),
        ..MockConfig::default()
    })
    .await?;
    assert!(s.llm_url.starts_with("https://"), "{}", s.llm_url);
    s.env.insert("SSL_CERT_FILE".into(), files.ca.clone());
    s.start_api(&[]).await?;

    let mut w = s
        .start_worker(&[("WORKER_CONCURRENCY", "16"), ("AGENTQ_LLM_HTTP", "http1")])
        .await?;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(s.submit(&format!("tls h1 {i}")).await?);
    }
    for t in s.wait_final(&ids, Duration::from_secs(30)).await? {
        assert_eq!(t["status"], "succeeded", "{t}");
    }
    assert_eq!(s.mock.total_calls(), 8);
    assert_eq!(s.mock.http2_requests(), 0, "http1 never offers HTTP/2");
    w.proc.sigterm();
    w.proc.wait_exit(Duration::from_secs(20))?;
    s.mock.reset();

    let _w = s
        .start_worker(&[
            ("WORKER_CONCURRENCY", "16"),
            ("AGENTQ_LLM_HTTP2_STREAMS", "8"),
        ])
        .await?;
    // One call per lane first. In auto mode a lane cannot share a connection before ALPN has said
    // h2, so calls that reach a lane still connecting each open their own connection (hyper pools
    // the extra one too). The second call is taken while the first is in flight, so it takes the
    // other lane; after these two each lane holds one pooled HTTP/2 connection for the burst.
    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(s.submit(&format!("tls warm {i}")).await?);
    }
    for t in s.wait_final(&ids, Duration::from_secs(30)).await? {
        assert_eq!(t["status"], "succeeded", "{t}");
    }
    assert_eq!(s.mock.http2_connections(), 2, "one connection per lane");
    let mut ids = Vec::new();
    for i in 0..48 {
        ids.push(s.submit(&format!("tls auto {i}")).await?);
    }
    for t in s.wait_final(&ids, Duration::from_secs(30)).await? {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 1, "{t}");
    }
    assert_eq!(s.mock.total_calls(), 50);
    assert_eq!(
        s.mock.http2_requests(),
        50,
        "auto took the HTTP/2 the server offered"
    );
    assert_eq!(
        s.mock.http2_connections(),
        2,
        "16 calls at 8 a connection, on the lanes' pooled connections"
    );
    Ok(())
}
