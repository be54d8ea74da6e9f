//! Issue 3's end-to-end guarantees, each against a real redis-server, the real binaries and the
//! mock LLM: throughput without loss or duplicates, idempotency, cancel, agent memory, SIGKILL
//! recovery, SIGTERM drain, and bad requests that write nothing.

use std::time::{Duration, Instant};

use agentq_tests::{MockConfig, Stack};
use serde_json::json;

fn prompts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_tasks_succeed_with_one_llm_call_each() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w1 = s.start_worker(&[("WORKER_CONCURRENCY", "16")]).await?;
    let _w2 = s.start_worker(&[("WORKER_CONCURRENCY", "16")]).await?;
    let ps = prompts("bulk", 300);
    let mut ids = Vec::new();
    for p in &ps {
        ids.push(s.submit(p).await?);
    }
    let done = s.wait_final(&ids, Duration::from_secs(60)).await?;
    for (p, t) in ps.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 1, "{t}");
        assert_eq!(t["result"]["content"], format!("echo: {p}"));
        assert_eq!(t["result"]["model"], "mock-gpt");
        assert!(t["result"]["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 0);
        assert!(
            t["created_at"].is_string()
                && t["started_at"].is_string()
                && t["finished_at"].is_string()
        );
        assert_eq!(s.mock.calls(p), 1, "{p} reached the LLM more than once");
    }
    assert_eq!(s.mock.total_calls(), 300);
    let q = s.queue("default").await?;
    assert_eq!(q["list_key"], "agentq:{default}:pending");
    assert_eq!(
        (
            q["pending"].as_u64(),
            q["inflight"].as_u64(),
            q["dead"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(q["workers"], 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_task() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let post = |key: &'static str| {
        s.http
            .post(format!("{}/v1/tasks", s.api_url))
            .header("Idempotency-Key", key)
            .json(&json!({"prompt": "only once"}))
            .send()
    };
    let a = post("order-42").await?;
    assert_eq!(a.status(), 202);
    let loc = a
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let a: serde_json::Value = a.json().await?;
    let b: serde_json::Value = post("order-42").await?.json().await?;
    assert_eq!(a["id"], b["id"]);
    assert_eq!(
        loc,
        Some(format!(
            "/v1/tasks/{}",
            a["id"].as_str().unwrap_or_default()
        ))
    );
    let c: serde_json::Value = post("order-43").await?.json().await?;
    assert_ne!(a["id"], c["id"]);
    assert_eq!(
        s.queue("default").await?["pending"],
        2,
        "a replay must not enqueue"
    );
    let _w = s.start_worker(&[]).await?;
    let ids = [
        a["id"].as_str().unwrap_or_default().to_owned(),
        c["id"].as_str().unwrap_or_default().to_owned(),
    ];
    s.wait_final(&ids, Duration::from_secs(20)).await?;
    assert_eq!(s.mock.calls("only once"), 2, "one call per distinct task");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_task_is_never_run() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let id = s.submit("cancel me").await?;
    let keep = s.submit("keep me").await?;
    let r = s
        .http
        .delete(format!("{}/v1/tasks/{id}", s.api_url))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let _w = s.start_worker(&[]).await?;
    let done = s
        .wait_final(&[id.clone(), keep], Duration::from_secs(20))
        .await?;
    assert_eq!(done[0]["status"], "cancelled");
    assert_eq!(done[1]["status"], "succeeded");
    assert_eq!(s.mock.calls("cancel me"), 0);
    let again = s
        .http
        .delete(format!("{}/v1/tasks/{id}", s.api_url))
        .send()
        .await?;
    assert_eq!(again.status(), 409);
    let missing = s
        .http
        .delete(format!(
            "{}/v1/tasks/default.0192f3a4-5b6c-7d8e-9f00-112233445566",
            s.api_url
        ))
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_memory_reaches_the_llm() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig {
        record: true,
        ..Default::default()
    })
    .await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let first = s
        .submit_json(&json!({"prompt": "my name is Ada", "agent_id": "agent-7"}))
        .await?;
    s.wait_final(&[first], Duration::from_secs(20)).await?;
    let second = s
        .submit_json(&json!({"prompt": "what is my name?", "agent_id": "agent-7"}))
        .await?;
    s.wait_final(&[second], Duration::from_secs(20)).await?;
    let other = s
        .submit_json(&json!({"prompt": "who am I?", "agent_id": "agent-8"}))
        .await?;
    s.wait_final(&[other], Duration::from_secs(20)).await?;

    let reqs = s.mock.requests();
    let find = |needle: &str| {
        reqs.iter()
            .find(|r| {
                r["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .map(|m| m["content"] == needle)
                    .unwrap_or(false)
            })
            .cloned()
    };
    let second_req = find("what is my name?").expect("second request recorded");
    let contents: Vec<&str> = second_req["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x["content"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        contents,
        vec!["my name is Ada", "echo: my name is Ada", "what is my name?"]
    );
    let roles: Vec<&str> = second_req["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x["role"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(roles, vec!["user", "assistant", "user"]);
    let other_req = find("who am I?").expect("third request recorded");
    assert_eq!(
        other_req["messages"].as_array().map(Vec::len),
        Some(1),
        "memory is per agent"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_task_loses_nothing() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let mut victim = s.start_worker(&[("WORKER_CONCURRENCY", "4")]).await?;
    let ps: Vec<String> = (0..4).map(|i| format!("slow-{i} [[sleep:3000]]")).collect();
    let mut ids = Vec::new();
    for p in &ps {
        ids.push(s.submit(p).await?);
    }
    for id in &ids {
        s.wait_for(id, Duration::from_secs(10), |t| t["status"] == "running")
            .await?;
    }
    victim.proc.sigkill();
    assert_eq!(
        s.queue("default").await?["inflight"],
        4,
        "killed worker's tasks still count as in flight"
    );
    let _rescuer = s.start_worker(&[]).await?;
    let done = s.wait_final(&ids, Duration::from_secs(30)).await?;
    for (p, t) in ps.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 2, "the lost run counts as an attempt: {t}");
        assert_eq!(
            s.mock.calls(p),
            2,
            "one call by the dead worker, one by the rescuer"
        );
    }
    let q = s.queue("default").await?;
    assert_eq!(
        q["workers"], 1,
        "the dead worker is deregistered by recovery"
    );
    assert_eq!(q["inflight"], 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_tasks_finish() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let mut w = s.start_worker(&[("WORKER_CONCURRENCY", "8")]).await?;
    let ps: Vec<String> = (0..8)
        .map(|i| format!("drain-{i} [[sleep:1500]]"))
        .collect();
    let mut ids = Vec::new();
    for p in &ps {
        ids.push(s.submit(p).await?);
    }
    for id in &ids {
        s.wait_for(id, Duration::from_secs(10), |t| t["status"] == "running")
            .await?;
    }
    let later = s.submit("submitted after SIGTERM").await?;
    w.proc.sigterm();
    // readiness flips at once so Kubernetes stops routing to the pod
    let t0 = Instant::now();
    let mut saw_not_ready = false;
    while t0.elapsed() < Duration::from_secs(1) {
        match s.http.get(format!("{}/readyz", w.probe)).send().await {
            Ok(r) if r.status() == 503 => {
                saw_not_ready = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(saw_not_ready, "readyz must answer 503 while draining");
    let status = w.proc.wait_exit(Duration::from_secs(15))?;
    assert!(status.success(), "exit {status:?}\n{}", w.proc.tail());
    let done = s.wait_final(&ids, Duration::from_secs(1)).await?;
    for t in &done {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 1);
    }
    assert_eq!(
        s.task(&later).await?["status"],
        "queued",
        "nothing is fetched after SIGTERM"
    );
    let q = s.queue("default").await?;
    assert_eq!(
        (
            q["workers"].as_u64(),
            q["inflight"].as_u64(),
            q["pending"].as_u64()
        ),
        (Some(0), Some(0), Some(1))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_back_what_cannot_finish_in_time() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let mut w = s
        .start_worker(&[
            ("WORKER_CONCURRENCY", "3"),
            ("AGENTQ_DRAIN_TIMEOUT_SECS", "1"),
            ("AGENTQ_LLM_TIMEOUT_SECS", "30"),
        ])
        .await?;
    let ps: Vec<String> = (0..3).map(|i| format!("too-slow-{i} [[hang:1]]")).collect();
    let mut ids = Vec::new();
    for p in &ps {
        ids.push(s.submit(p).await?);
    }
    for id in &ids {
        s.wait_for(id, Duration::from_secs(10), |t| t["status"] == "running")
            .await?;
    }
    let t0 = Instant::now();
    w.proc.sigterm();
    let status = w.proc.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "exit {status:?}\n{}", w.proc.tail());
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "drain took {:?}",
        t0.elapsed()
    );
    for id in &ids {
        let t = s.task(id).await?;
        assert_eq!(t["status"], "queued", "{t}");
        assert_eq!(t["attempts"], 0, "a given-back run is not counted: {t}");
    }
    assert_eq!(s.queue("default").await?["pending"], 3);
    let _next = s.start_worker(&[]).await?;
    let done = s.wait_final(&ids, Duration::from_secs(20)).await?;
    for t in &done {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 1, "{t}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_4xx_naming_the_field_and_write_nothing() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let url = format!("{}/v1/tasks", s.api_url);
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        (
            "application/json",
            b"{\"prompt\": \"x\"".to_vec(),
            "",
            400,
            "body",
        ),
        ("application/json", b"[1,2]".to_vec(), "", 422, "body"),
        ("application/json", b"{}".to_vec(), "", 422, "prompt"),
        (
            "application/json",
            b"{\"prompt\": \"\"}".to_vec(),
            "",
            422,
            "prompt",
        ),
        (
            "application/json",
            b"{\"prompt\": 7}".to_vec(),
            "",
            422,
            "prompt",
        ),
        (
            "application/json",
            b"{\"prompt\": \"x\", \"colour\": 1}".to_vec(),
            "",
            422,
            "colour",
        ),
        (
            "application/json",
            b"{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}".to_vec(),
            "",
            422,
            "messages[0].role",
        ),
        (
            "application/json",
            b"{\"prompt\": \"x\", \"max_attempts\": 100000}".to_vec(),
            "",
            422,
            "max_attempts",
        ),
        (
            "application/json",
            b"{\"prompt\": \"x\", \"max_attempts\": -1}".to_vec(),
            "",
            422,
            "max_attempts",
        ),
        (
            "application/json",
            b"{\"prompt\": \"x\", \"metadata\": [1]}".to_vec(),
            "",
            422,
            "metadata",
        ),
        (
            "application/json",
            b"{\"prompt\": \"x\", \"queue\": \"a b\"}".to_vec(),
            "",
            422,
            "queue",
        ),
        (
            "application/json",
            b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
            "",
            400,
            "prompt",
        ),
        (
            "text/plain",
            b"{\"prompt\": \"x\"}".to_vec(),
            "",
            415,
            "Content-Type",
        ),
        (
            "application/json",
            b"{\"prompt\": \"x\"}".to_vec(),
            "has space",
            400,
            "Idempotency-Key",
        ),
    ];
    for (ctype, body, idem, want, field) in cases {
        let mut req = s
            .http
            .post(&url)
            .header("content-type", ctype)
            .body(body.clone());
        if !idem.is_empty() {
            req = req.header("Idempotency-Key", idem);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await?;
        let shown = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, want, "{shown}: {v}");
        assert_eq!(v["error"]["field"], field, "{shown}: {v}");
        assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{v}"
        );
    }
    let huge = json!({"prompt": "x".repeat(300 * 1024)});
    let r = s.http.post(&url).json(&huge).send().await?;
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await?;
    assert_eq!(v["error"]["code"], "payload_too_large");
    assert_eq!(
        s.redis.dbsize()?,
        0,
        "a rejected request must create nothing in Redis"
    );
    let (status, v) = s.get_json("/v1/tasks/not-an-id").await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = s.get_json("/v1/queues/bad%20name").await?;
    assert_eq!(status, 422);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_answer() -> anyhow::Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let w = s.start_worker(&[]).await?;
    let id = s.submit("metered").await?;
    s.wait_final(&[id], Duration::from_secs(20)).await?;
    assert_eq!(s.get_json("/readyz").await?.0, 200);
    let api_metrics = s
        .http
        .get(format!("{}/metrics", s.api_url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        api_metrics.contains("agentq_tasks_enqueued_total{queue=\"default\"} 1"),
        "{api_metrics}"
    );
    assert!(api_metrics.contains("agentq_queue_depth{queue=\"default\",state=\"pending\"} 0"));
    let wm = s
        .http
        .get(format!("{}/metrics", w.probe))
        .send()
        .await?
        .text()
        .await?;
    for needle in [
        "agentq_tasks_total{queue=\"default\",status=\"succeeded\"} 1",
        "agentq_llm_requests_total{model=\"mock-gpt\",outcome=\"ok\"} 1",
        "agentq_llm_tokens_total{direction=\"prompt\",model=\"mock-gpt\"}",
        "agentq_llm_cost_dollars_total{model=\"mock-gpt\"}",
        "agentq_task_duration_seconds_count{queue=\"default\"} 1",
        "agentq_worker_draining 0",
        "agentq_active_tasks 0",
    ] {
        assert!(
            wm.contains(needle),
            "{needle} missing from worker metrics:\n{wm}"
        );
    }
    assert!(!wm.contains("sk-test-secret") && !api_metrics.contains("sk-test-secret"));
    let spec = s.get_json("/openapi.json").await?.1;
    for path in [
        "/v1/tasks",
        "/v1/tasks/{id}",
        "/v1/queues/{queue}",
        "/v1/queues/{queue}/dead",
        "/v1/queues/{queue}/dead/redrive",
        "/v1/budgets",
        "/v1/budgets/{scope}",
        "/v1/usage",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from openapi.json"
        );
    }
    // the served document names this deployment's declared queues (AGENTQ_QUEUES, default "default")
    assert_eq!(
        spec["components"]["schemas"]["CreateTask"]["properties"]["queue"]["enum"],
        serde_json::json!(["default", null])
    );
    assert_eq!(
        spec["paths"]["/v1/queues/{queue}"]["get"]["parameters"][0]["schema"]["enum"],
        serde_json::json!(["default"])
    );
    Ok(())
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() -> anyhow::Result<()> {
    for binary in ["agentq-api", "agentq-worker"] {
        for (var, value) in [
            ("WORKER_CONCURRENCY", "many"),
            ("WORKER_THREADS", "0"),
            ("WORKER_THREADS", "lots"),
            ("AGENTQ_LOG_FORMAT", "xml"),
            ("REDIS_URL", "mysql://u:hunter2@x"),
        ] {
            if binary == "agentq-api" && var.starts_with("WORKER_") {
                continue;
            }
            let out = std::process::Command::new(agentq_tests::bin(binary))
                .env(var, value)
                .env("AGENTQ_LISTEN", "127.0.0.1:0")
                .output()?;
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{binary} {var}={value}: {text}"
            );
            assert!(
                text.contains(var),
                "{binary}: message must name {var}: {text}"
            );
            assert!(
                !text.contains("hunter2"),
                "{binary} leaked a password: {text}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_protected_tls_redis_works_and_the_password_stays_out_of_logs(
) -> anyhow::Result<()> {
    // a private CA and a server certificate it signed, as a real deployment has
    let certs = tempfile::tempdir()?;
    let agentq_tests::TlsFiles { ca, cert, key } = agentq_tests::tls_files(certs.path())?;
    let tls_port = agentq_tests::free_port().to_string();
    let password = "s3cr3t-redis-pw";
    let redis = agentq_tests::RedisServer::start_with(
        false,
        &[
            "--requirepass",
            password,
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    )?;
    let mut s = Stack::with_redis(redis, MockConfig::default()).await?;
    // rediss:// with the server's certificate trusted through the standard SSL_CERT_FILE variable
    s.env.insert(
        "REDIS_URL".into(),
        format!("rediss://:{password}@127.0.0.1:{tls_port}/0"),
    );
    s.env.insert("SSL_CERT_FILE".into(), ca.clone());
    s.start_api(&[]).await?;
    let w = s.start_worker(&[]).await?;
    assert_eq!(
        s.get_json("/readyz").await?.0,
        200,
        "api must reach Redis over TLS"
    );
    let id = s.submit("over tls").await?;
    let done = s.wait_final(&[id], Duration::from_secs(20)).await?;
    assert_eq!(done[0]["status"], "succeeded");
    // a wrong password is a 503, not a crash, and is not echoed either
    let mut bad = Stack::with_redis(
        agentq_tests::RedisServer::start_with(false, &["--requirepass", password])?,
        MockConfig::default(),
    )
    .await?;
    let port = bad.redis.port;
    bad.env.insert(
        "REDIS_URL".into(),
        format!("redis://:wrong-pw-123@127.0.0.1:{port}/0"),
    );
    bad.start_api(&[]).await?;
    assert_eq!(bad.post(&json!({"prompt": "x"})).await?.0, 503);
    let logs = [
        s.api.as_ref().map(|p| p.tail()),
        Some(w.proc.tail()),
        bad.api.as_ref().map(|p| p.tail()),
    ];
    for log in logs.into_iter().flatten() {
        assert!(
            !log.contains(password)
                && !log.contains("wrong-pw-123")
                && !log.contains("sk-test-secret"),
            "secret in log:\n{log}"
        );
    }
    Ok(())
}

/// The check every test runs under (common/src/script.rs): in a debug build a script made with
/// `script::declared` fails on the first command whose key is not in its `KEYS`, before that
/// command runs; keys it was given pass, whatever their place in the command (DEL's every
/// argument, LMOVE's second), and commands with no key (PUBLISH, TIME) pass too. A release
/// build has no check, so this test exists only in a debug one.
#[cfg(debug_assertions)]
#[test]
fn a_script_touching_a_key_it_was_not_given_fails_in_a_debug_build() -> anyhow::Result<()> {
    let r = agentq_tests::RedisServer::start()?;
    let mut c = r.conn()?;
    let script = agentq_common::script::declared(
        "redis.call('SET', KEYS[1], 'a') \
         redis.call('RPUSH', KEYS[2], 'x') \
         redis.call('LMOVE', KEYS[2], KEYS[1] .. ':list', 'LEFT', 'RIGHT') \
         redis.call('DEL', KEYS[3], KEYS[1] .. ':list') \
         redis.call('PUBLISH', 'news', 'x') \
         redis.call('TIME') \
         if ARGV[1] ~= '' then redis.call(ARGV[1], ARGV[2], ARGV[3]) end \
         return redis.sha1hex('a')",
    );
    // one hash tag: the cluster sweep runs this on a one-node cluster too
    let given = ["{t}k", "{t}l", "{t}m", "{t}k:list"];
    let ok: String = script
        .key(&given[..])
        .arg("")
        .arg("")
        .arg("")
        .invoke(&mut c)?;
    assert_eq!(ok, "86f7e437faa5a7fce15d1ddcb9eaeaea377667b8");
    // undeclared as the first key of a command, as a later key of DEL, and through pcall
    for (cmd, a, b) in [("SET", "{t}other", "1"), ("DEL", "{t}k", "{t}other")] {
        let err = script
            .key(&given[..])
            .arg(cmd)
            .arg(a)
            .arg(b)
            .invoke::<String>(&mut c)
            .expect_err("an undeclared key must fail the script");
        assert!(err.to_string().contains("undeclared key {t}other"), "{err}");
    }
    let exists: bool = redis::cmd("EXISTS").arg("{t}other").query(&mut c)?;
    assert!(!exists, "the refused command did not run");
    let pcall = agentq_common::script::declared("return redis.pcall('GET', '{t}elsewhere')");
    let err = pcall
        .key("{t}k")
        .invoke::<Option<String>>(&mut c)
        .expect_err("pcall checks its key too");
    assert!(
        err.to_string().contains("undeclared key {t}elsewhere"),
        "{err}"
    );
    Ok(())
}
