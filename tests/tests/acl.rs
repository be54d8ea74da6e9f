//! The Redis ACL users of the chart (`deploy/helm/agentq/files/redis-users.acl`), proven with the
//! real binaries: a redis-server loads the users rendered from that file (prefix and password
//! hashes substituted here as the chart substitutes them), the api and a worker run as those users
//! through every kind of work (tasks, retries, a dead letter and its redrive, a cancel carried by
//! pub/sub, event streams over XREAD, a client-side tool, an agent's memory, a workflow, budgets,
//! the chat front door, a batch with its files), and Redis's ACL LOG must stay empty but for the
//! one refusal the api expects. Then each user is shown what it may not do: the worker cannot
//! read a tenant or a token, nobody may FLUSHALL, CONFIG or KEYS, and KEDA's user only counts.
//! The same over TLS with a private CA (`rediss://`, `AGENTQ_REDIS_CA_FILE`), and a static check
//! that every command the code names is granted to some user.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentq_tests::{assert_no_panic, log_tails, MockConfig, RedisServer, Stack};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

const API_USER: &str = "agentq-api";
const WORKER_USER: &str = "agentq-worker";
const KEDA_USER: &str = "agentq-keda";
const API_PASSWORD: &str = "apiPw0123456789abcdefghijklmnopq";
const WORKER_PASSWORD: &str = "workerPw0123456789abcdefghijklmn";
const KEDA_PASSWORD: &str = "kedaPw0123456789abcdefghijklmnop";

/// The chart's source of truth for the ACL users.
fn acl_source() -> Result<String> {
    let path = repo_root().join("deploy/helm/agentq/files/redis-users.acl");
    std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// SHA-256 (hex) of `s`, as the chart's `sha256sum` computes it (coreutils here).
fn sha256_hex(s: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("sha256sum")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(s.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .context("no hash")?
        .to_owned())
}

/// The users as the chart renders them (templates/_helpers.tpl, `agentq.redisAcl.render`): comment
/// lines dropped, continuation lines joined, every placeholder substituted. One user per line.
fn render(source: &str, vars: &[(&str, &str)]) -> Result<String> {
    let mut lines: Vec<String> = Vec::new();
    for line in source.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let last = lines
                .last_mut()
                .context("a continuation line opens the file")?;
            last.push(' ');
            last.push_str(line.trim());
        } else {
            lines.push(line.trim().to_owned());
        }
    }
    let mut out = String::new();
    for line in lines {
        let mut l = line;
        for (k, v) in vars {
            l = l.replace(&format!("${{{k}}}"), v);
        }
        ensure!(!l.contains("${"), "a placeholder is left: {l}");
        // an empty ${SELECT} leaves two spaces
        let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push_str(&l);
        out.push('\n');
    }
    Ok(out)
}

/// The rendered users for `prefix`, with this test's passwords and names (`suffix` appended to
/// each name, so two renders can live in one server).
fn users(prefix: &str, suffix: &str) -> Result<String> {
    let api = format!("{API_USER}{suffix}");
    let worker = format!("{WORKER_USER}{suffix}");
    let keda = format!("{KEDA_USER}{suffix}");
    render(
        &acl_source()?,
        &[
            ("PREFIX", prefix),
            ("API_USER", &api),
            ("WORKER_USER", &worker),
            ("KEDA_USER", &keda),
            ("API_PASSWORD_SHA256", &sha256_hex(API_PASSWORD)?),
            ("WORKER_PASSWORD_SHA256", &sha256_hex(WORKER_PASSWORD)?),
            ("KEDA_PASSWORD_SHA256", &sha256_hex(KEDA_PASSWORD)?),
            ("SELECT", ""),
        ],
    )
}

/// A redis-server whose users are the test's own admin (`default`, for assertions) and the
/// rendered ones, loaded from an ACL file as an operator's Redis would (`aclfile` + `ACL LOAD`).
fn redis_with_users(extra: &[&str], dir: &Path) -> Result<RedisServer> {
    let acl = dir.join("users.acl");
    std::fs::write(
        &acl,
        format!(
            "user default on nopass ~* &* +@all\n{}",
            users("agentq", "")?
        ),
    )?;
    let acl = acl.to_string_lossy().into_owned();
    let mut args = vec!["--aclfile", acl.as_str()];
    args.extend_from_slice(extra);
    RedisServer::start_with(false, &args)
}

fn url(scheme: &str, user: &str, password: &str, port: u16) -> String {
    format!("{scheme}://{user}:{password}@127.0.0.1:{port}/0")
}

/// A connection as one of the users (plain TCP).
fn conn_as(r: &RedisServer, user: &str, password: &str) -> Result<redis::Connection> {
    Ok(redis::Client::open(url("redis", user, password, r.port))?.get_connection()?)
}

/// The error code of a command run as a user; None when it succeeded.
fn refusal(c: &mut redis::Connection, args: &[&str]) -> Option<String> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query::<redis::Value>(c) {
        Ok(_) => None,
        Err(e) => Some(e.code().unwrap_or("?").to_owned()),
    }
}

/// `ACL DRYRUN user args...`: "OK" when the user may run it, else Redis's reason.
fn dryrun(r: &RedisServer, user: &str, args: &[&str]) -> Result<String> {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("DRYRUN").arg(user);
    for a in args {
        cmd.arg(*a);
    }
    Ok(cmd.query::<String>(&mut r.conn()?)?)
}

/// Redis's ACL LOG, one `reason context object username` line per entry.
fn acl_log(r: &RedisServer) -> Result<Vec<String>> {
    let entries: Vec<HashMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .arg(1000)
        .query(&mut r.conn()?)?;
    let text = |e: &HashMap<String, redis::Value>, k: &str| -> String {
        match e.get(k) {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::SimpleString(s)) => s.clone(),
            Some(v) => format!("{v:?}"),
            None => String::new(),
        }
    };
    Ok(entries
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}",
                text(e, "reason"),
                text(e, "context"),
                text(e, "object"),
                text(e, "username")
            )
        })
        .collect())
}

/// Every entry but the api's one expected refusal (`CONFIG GET stream-node-max-bytes`, a check
/// it makes once at start and skips when refused).
fn unexpected_refusals(r: &RedisServer) -> Result<Vec<String>> {
    Ok(acl_log(r)?
        .into_iter()
        .filter(|l| l != &format!("command toplevel config|get {API_USER}"))
        .collect())
}

async fn post(s: &Stack, path: &str, body: &Value) -> Result<(u16, Value)> {
    let r = s
        .http
        .post(format!("{}{path}", s.api_url))
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn request(s: &Stack, method: reqwest::Method, path: &str) -> Result<u16> {
    Ok(s.http
        .request(method, format!("{}{path}", s.api_url))
        .send()
        .await?
        .status()
        .as_u16())
}

/// `GET /_mock/calls`'s count of calls whose client hung up.
async fn aborted(s: &Stack) -> Result<u64> {
    let root = s.llm_url.trim_end_matches("/v1");
    let v: Value = s
        .http
        .get(format!("{root}/_mock/calls"))
        .send()
        .await?
        .json()
        .await?;
    v["aborted"].as_u64().context("aborted count")
}

async fn until(
    what: &str,
    s: &Stack,
    timeout: Duration,
    mut ok: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok().await? {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {timeout:?}\n{}", log_tails(s));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A task over the event stream: SSE from the start to its `done`.
async fn streamed(s: &Stack, id: &str) -> Result<()> {
    let events =
        agentq_tests::sse::read(&s.api_url, &format!("/v1/tasks/{id}/events"), None, None).await?;
    let names = agentq_tests::sse::names(&events);
    ensure!(names.last() == Some(&"done"), "events of {id}: {names:?}");
    ensure!(
        names.contains(&"attempt_started"),
        "events of {id}: {names:?}"
    );
    Ok(())
}

const BOUNDARY: &str = "agentq-acl-test-boundary";

async fn upload(s: &Stack, jsonl: &str) -> Result<String> {
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{BOUNDARY}--\r\n"
    );
    let r = s
        .http
        .post(format!("{}/v1/files", s.api_url))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    ensure!(status == 200, "upload answered {status}: {v}");
    v["id"].as_str().map(str::to_owned).context("no file id")
}

/// The api's and the worker's work of every kind, through the api.
async fn every_kind_of_work(s: &Stack) -> Result<()> {
    // budgets: a global one the worker's calls reserve and settle against
    let r = s
        .http
        .put(format!("{}/v1/budgets/global", s.api_url))
        .json(&json!({"limit_usd": 5, "window": "1h", "mode": "rolling"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "PUT budget: {}", r.status());

    // a task, its event stream (the api's XREAD hub), and an idempotent resend
    let r = s
        .http
        .post(format!("{}/v1/tasks", s.api_url))
        .header("idempotency-key", "acl-once")
        .json(&json!({"prompt": "hello as an acl user"}))
        .send()
        .await?;
    ensure!(r.status() == 202, "POST task: {}", r.status());
    let id = r.json::<Value>().await?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    streamed(s, &id).await?;
    let again = s
        .http
        .post(format!("{}/v1/tasks", s.api_url))
        .header("idempotency-key", "acl-once")
        .json(&json!({"prompt": "hello as an acl user"}))
        .send()
        .await?;
    ensure!(
        again.json::<Value>().await?["id"] == id.as_str(),
        "idempotent resend"
    );

    // a retry (a 500, then success), and a dead letter (500 twice with 2 attempts) redriven
    let retried = s.submit("retry me [[fail:500:1]]").await?;
    let dead = s
        .submit_json(&json!({"prompt": "dead then redriven [[fail:500:2]]", "max_attempts": 2}))
        .await?;
    let done = s
        .wait_final(&[retried.clone(), dead.clone()], Duration::from_secs(20))
        .await?;
    ensure!(
        done[0]["status"] == "succeeded" && done[0]["attempts"] == 2,
        "{}",
        done[0]
    );
    ensure!(done[1]["status"] == "failed", "{}", done[1]);
    let dead_list = s.dead("default").await?;
    ensure!(
        dead_list.iter().any(|d| d["id"] == dead.as_str()),
        "{dead_list:?}"
    );
    let (status, v) = s.redrive("default", None).await?;
    ensure!(status == 200 && v["redriven"] == 1, "redrive: {status} {v}");
    let done = s
        .wait_for(&dead, Duration::from_secs(20), |t| {
            t["status"] == "succeeded"
        })
        .await?;
    ensure!(
        done["attempts"] == 1,
        "a redrive starts the attempts again: {done}"
    );

    // a cancel of a running call: the api's cancel.lua PUBLISHes, the worker's SUBSCRIBE hears it.
    // Its event stream stays open meanwhile, so the hub is blocked in XREAD when a second stream
    // joins, and wakes itself (CLIENT UNBLOCK of its own connection)
    let slow = "cancel me over pub/sub [[sleep:20000]]";
    let cancelled = s.submit(slow).await?;
    let api = s.api_url.clone();
    let path = format!("/v1/tasks/{cancelled}/events");
    let open_stream =
        tokio::spawn(async move { agentq_tests::sse::read(&api, &path, None, None).await });
    until("the slow call", s, Duration::from_secs(10), async || {
        Ok(s.mock.calls(slow) >= 1)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let joined = s
        .submit("a stream joins a blocked hub [[sleep:500]]")
        .await?;
    streamed(s, &joined).await?;
    let status = request(
        s,
        reqwest::Method::DELETE,
        &format!("/v1/tasks/{cancelled}"),
    )
    .await?;
    ensure!(status == 200, "DELETE task: {status}");
    until("the call's abort", s, Duration::from_secs(3), async || {
        Ok(aborted(s).await? >= 1)
    })
    .await?;
    ensure!(s.task(&cancelled).await?["status"] == "cancelled");
    let events = open_stream.await??;
    let names = agentq_tests::sse::names(&events);
    ensure!(
        names.last() == Some(&"error"),
        "the cancelled task's stream: {names:?}"
    );

    // an agent with memory and a client-side tool: requires_action, outputs, resume
    let tools = json!([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]);
    let tool_task = s
        .submit_json(&json!({"agent_id": "acl-agent", "tools": tools,
                             "prompt": r#"sum [[call:add:{"a":2,"b":3}]]"#}))
        .await?;
    s.wait_for(&tool_task, Duration::from_secs(15), |t| {
        t["status"] == "requires_action"
    })
    .await?;
    let (status, v) = post(
        s,
        &format!("/v1/tasks/{tool_task}/tool_outputs"),
        &json!({"tool_outputs": [{"tool_call_id": "call_1_0", "output": "5"}]}),
    )
    .await?;
    ensure!(status == 202, "tool outputs: {status} {v}");
    let follow_up = s
        .submit_json(&json!({"agent_id": "acl-agent", "prompt": "and now?"}))
        .await?;
    let done = s
        .wait_final(
            &[tool_task.clone(), follow_up.clone()],
            Duration::from_secs(20),
        )
        .await?;
    ensure!(done.iter().all(|t| t["status"] == "succeeded"), "{done:?}");

    // a workflow: a chain of two nodes, the second templated from the first
    let (status, v) = post(
        s,
        "/v1/workflows",
        &json!({"nodes": [
            {"id": "a", "prompt": "first node"},
            {"id": "b", "depends_on": ["a"], "prompt": "after {{nodes.a.output}}"}
        ]}),
    )
    .await?;
    ensure!(status == 202, "POST workflow: {status} {v}");
    let wf = v["id"].as_str().context("workflow id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let wf_view = loop {
        let (status, v) = s.get_json(&format!("/v1/workflows/{wf}")).await?;
        ensure!(status == 200, "GET workflow: {status} {v}");
        if v["status"] != "running" {
            break v;
        }
        ensure!(Instant::now() < deadline, "workflow still running: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(wf_view["status"] == "succeeded", "{wf_view}");
    // a workflow cancelled while its node's call runs
    let (status, v) = post(
        s,
        "/v1/workflows",
        &json!({"nodes": [{"id": "slow", "prompt": "slow node [[sleep:20000]]"},
                          {"id": "never", "depends_on": ["slow"], "prompt": "never runs"}]}),
    )
    .await?;
    ensure!(status == 202, "POST workflow: {status} {v}");
    let slow_wf = v["id"].as_str().context("workflow id")?.to_owned();
    until(
        "the slow node's call",
        s,
        Duration::from_secs(10),
        async || Ok(s.mock.calls("slow node [[sleep:20000]]") >= 1),
    )
    .await?;
    let status = request(
        s,
        reqwest::Method::DELETE,
        &format!("/v1/workflows/{slow_wf}"),
    )
    .await?;
    ensure!(status == 200, "DELETE workflow: {status}");
    let (_, v) = s.get_json(&format!("/v1/workflows/{slow_wf}")).await?;
    ensure!(v["status"] == "cancelled", "{v}");

    // the OpenAI-compatible front door waits for its task over the event streams
    let (status, v) = post(
        s,
        "/v1/chat/completions",
        &json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "front door"}]}),
    )
    .await?;
    ensure!(
        status == 200 && v["object"] == "chat.completion",
        "{status} {v}"
    );

    // a batch: a file uploaded line by line, fanned out, finalized into an output file
    let lines: String = (0..3)
        .map(|i| {
            format!(
                "{}\n",
                json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "mock-gpt", "messages": [{"role": "user", "content": format!("batch line {i}")}]}})
            )
        })
        .collect();
    let file = upload(s, &lines).await?;
    let (status, b) = post(
        s,
        "/v1/batches",
        &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await?;
    ensure!(status == 200, "POST batch: {status} {b}");
    let batch = b["id"].as_str().context("batch id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        let (status, b) = s.get_json(&format!("/v1/batches/{batch}")).await?;
        ensure!(status == 200, "GET batch: {status} {b}");
        if b["status"] == "completed" {
            break b;
        }
        ensure!(
            Instant::now() < deadline,
            "batch not completed: {b}\n{}",
            log_tails(s)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(b["request_counts"]["completed"] == 3, "{b}");
    let out = b["output_file_id"].as_str().context("output file")?;
    let r = s
        .http
        .get(format!("{}/v1/files/{out}/content", s.api_url))
        .send()
        .await?;
    ensure!(
        r.status() == 200 && r.text().await?.lines().count() == 3,
        "output file"
    );
    // list pages after a given id (ZRANK / ZREVRANK of the global indexes)
    for path in [
        format!("/v1/files?limit=1&after={file}"),
        format!("/v1/batches?limit=1&after={batch}"),
    ] {
        let (status, v) = s.get_json(&path).await?;
        ensure!(status == 200, "GET {path}: {status} {v}");
    }
    let status = request(s, reqwest::Method::DELETE, &format!("/v1/files/{out}")).await?;
    ensure!(status == 200, "DELETE output file: {status}");
    // a batch cancelled while its calls run
    let slow_lines: String = (0..2)
        .map(|i| {
            format!(
                "{}\n",
                json!({"custom_id": format!("s{i}"), "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "mock-gpt", "messages": [{"role": "user", "content": format!("slow batch line {i} [[sleep:20000]]")}]}})
            )
        })
        .collect();
    let slow_file = upload(s, &slow_lines).await?;
    let (status, b) = post(
        s,
        "/v1/batches",
        &json!({"input_file_id": slow_file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await?;
    ensure!(status == 200, "POST batch: {status} {b}");
    let slow_batch = b["id"].as_str().context("batch id")?.to_owned();
    until(
        "the slow batch's calls",
        s,
        Duration::from_secs(10),
        async || Ok(s.mock.calls("slow batch line 0 [[sleep:20000]]") >= 1),
    )
    .await?;
    let (status, v) = post(s, &format!("/v1/batches/{slow_batch}/cancel"), &json!({})).await?;
    ensure!(status == 200, "cancel batch: {status} {v}");
    until("the batch's end", s, Duration::from_secs(15), async || {
        Ok(s.get_json(&format!("/v1/batches/{slow_batch}")).await?.1["status"] == "cancelled")
    })
    .await?;

    // the read side: queue counts, upstreams (SCAN of the limiter keys), budgets and usage
    for path in [
        "/v1/queues/default",
        "/v1/queues/default/dead",
        "/v1/upstreams",
        "/v1/budgets",
        "/v1/budgets/global",
        "/v1/usage?group_by=model&window=1h",
        "/v1/models",
    ] {
        let (status, v) = s.get_json(path).await?;
        ensure!(status == 200, "GET {path}: {status} {v}");
    }
    let (_, budget) = s.get_json("/v1/budgets/global").await?;
    ensure!(
        budget["reserved_usd"] == 0.0,
        "every hold settled: {budget}"
    );
    // a budget is deleted with its counters in one MULTI/EXEC
    let status = request(s, reqwest::Method::DELETE, "/v1/budgets/global").await?;
    ensure!(status == 204, "DELETE budget: {status}");

    Ok(())
}

/// Everything a deployment does, by the api and a worker connected as their ACL users; the ACL
/// LOG then holds no refusal but the api's expected one; then what each user may not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_worker_do_everything_as_their_acl_users_and_nothing_more() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = redis_with_users(&[], dir.path())?;
    let port = redis.port;
    let mut s = Stack::with_redis(
        redis,
        MockConfig {
            record: true,
            ..MockConfig::default()
        },
    )
    .await?;
    let api_url = url("redis", API_USER, API_PASSWORD, port);
    let worker_url = url("redis", WORKER_USER, WORKER_PASSWORD, port);
    s.start_api(&[("REDIS_URL", &api_url), ("AGENTQ_AUTH", "off")])
        .await?;
    let worker_env = [
        ("REDIS_URL", worker_url.as_str()),
        ("WORKER_CONCURRENCY", "8"),
        ("AGENTQ_LLM_TIMEOUT_SECS", "60"),
        // a minute: only the cancel channel (pub/sub) can abort the calls below in time
        ("AGENTQ_CANCEL_POLL_MS", "60000"),
    ];
    let mut w = s.start_worker(&worker_env).await?;
    ensure!(
        s.get_json("/readyz").await?.0 == 200,
        "api not ready\n{}",
        log_tails(&s)
    );
    let worker_ready = s
        .http
        .get(format!("{}/readyz", w.probe))
        .send()
        .await?
        .status();
    ensure!(
        worker_ready == 200,
        "worker not ready: {worker_ready}\n{}",
        log_tails(&s)
    );
    for (user, pw) in [(API_USER, API_PASSWORD), (WORKER_USER, WORKER_PASSWORD)] {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut s.redis.conn()?)?;
        ensure!(
            clients.contains(&format!("user={user} ")),
            "no connection of {user}:\n{clients}"
        );
        ensure!(conn_as(&s.redis, user, pw).is_ok());
    }

    if let Err(e) = every_kind_of_work(&s).await {
        bail!(
            "{e:#}\nACL LOG (a refused command is missing from files/redis-users.acl):\n{}",
            acl_log(&s.redis)?.join("\n")
        );
    }

    // a worker killed mid-call: a second one recovers its task (recover.lua) and runs it; then
    // a drain: the second worker deregisters and exits 0
    let lost = "lost with its worker [[sleep:2000]]";
    let lost_id = s.submit(lost).await?;
    until(
        "the call of the lost task",
        &s,
        Duration::from_secs(10),
        async || Ok(s.mock.calls(lost) >= 1),
    )
    .await?;
    w.proc.sigkill();
    let mut w2 = s.start_worker(&worker_env).await?;
    let recovered = s
        .wait_for(&lost_id, Duration::from_secs(30), |t| {
            t["status"] == "succeeded"
        })
        .await;
    if let Err(e) = recovered {
        bail!("{e:#}\nACL LOG:\n{}", acl_log(&s.redis)?.join("\n"));
    }
    w2.proc.sigterm();
    let exit = w2.proc.wait_exit(Duration::from_secs(20))?;
    ensure!(exit.success(), "worker exit {exit:?}\n{}", w2.proc.tail());

    let refused = unexpected_refusals(&s.redis)?;
    ensure!(
        refused.is_empty(),
        "commands refused to agentq's users (add them to files/redis-users.acl):\n{}\n{}",
        refused.join("\n"),
        log_tails(&s)
    );
    ensure!(
        acl_log(&s.redis)?.len() <= 1,
        "the api refused at most its one check: {:?}",
        acl_log(&s.redis)?
    );
    assert_no_panic(&s);

    // ---- what each user may not do ----
    let r = &s.redis;
    let mut worker = conn_as(r, WORKER_USER, WORKER_PASSWORD)?;
    let mut api = conn_as(r, API_USER, API_PASSWORD)?;
    let mut keda = conn_as(r, KEDA_USER, KEDA_PASSWORD)?;
    for args in [
        &["GET", "agentq:token:x"][..],
        &["HGETALL", "agentq:tenant:{a}"],
        &["SMEMBERS", "agentq:tenant:{a}:tokens"],
        &["SMEMBERS", "agentq:tenants"],
        &["GET", "agentq:authfail:127.0.0.1"],
        &["ZRANGE", "agentq:files", "0", "-1"],
        &["SMEMBERS", "agentq:queues"],
        &["LLEN", "other:{default}:pending"],
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["CONFIG", "GET", "*"],
        &["KEYS", "*"],
        &["ACL", "LIST"],
        &["SCRIPT", "FLUSH"],
        &["EVAL", "return 1", "0"],
        &["CLIENT", "KILL", "TYPE", "normal"],
        &["SHUTDOWN", "NOSAVE"],
    ] {
        ensure!(
            refusal(&mut worker, args).as_deref() == Some("NOPERM"),
            "the worker may {args:?}"
        );
    }
    for args in [
        &["FLUSHALL"][..],
        &["FLUSHDB"],
        &["CONFIG", "GET", "*"],
        &["CONFIG", "SET", "maxmemory", "1"],
        &["KEYS", "*"],
        &["ACL", "LIST"],
        &["EVAL", "return 1", "0"],
        &["SCRIPT", "FLUSH"],
        &["CLIENT", "KILL", "TYPE", "normal"],
        &["MONITOR"],
        &["SHUTDOWN", "NOSAVE"],
        &["GET", "other:{default}:pending"],
    ] {
        ensure!(
            refusal(&mut api, args).as_deref() == Some("NOPERM"),
            "the api may {args:?}"
        );
    }
    // DEBUG is off in Redis 7 whoever asks (ERR before any ACL check): ACL DRYRUN judges it
    for user in [API_USER, WORKER_USER, KEDA_USER] {
        ensure!(
            dryrun(r, user, &["DEBUG", "SLEEP", "0"])? != "OK",
            "{user} may DEBUG"
        );
    }
    // the tenancy keys are the api's: granted to it (ACL DRYRUN: checked, not run)
    for args in [
        &["HGETALL", "agentq:tenant:{a}"][..],
        &["SMEMBERS", "agentq:tenant:{a}:tokens"],
        &["GET", "agentq:tenant:{a}:rate"],
        &["SADD", "agentq:tenants", "a"],
        &["HSET", "agentq:token:x", "tenant", "a"],
        &["INCRBY", "agentq:authfail:127.0.0.1", "1"],
        &["HGETALL", "agentq:{default}:tenants"],
    ] {
        ensure!(
            dryrun(r, API_USER, args)? == "OK",
            "the api may not {args:?}"
        );
    }
    // the per-queue keys of fair scheduling are both the api's and the worker's
    for args in [
        &["HGET", "agentq:{default}:tenants", "w:a"][..],
        &["LLEN", "agentq:{default}:pending:a"],
        &["LPUSH", "agentq:{default}:ring", "a"],
        &["HINCRBY", "agentq:{default}:running", "a", "1"],
        &["PUBLISH", "agentq:{default}:cancels", "x"],
    ] {
        ensure!(
            dryrun(r, API_USER, args)? == "OK",
            "the api may not {args:?}"
        );
        ensure!(
            dryrun(r, WORKER_USER, args)? == "OK",
            "the worker may not {args:?}"
        );
    }
    ensure!(
        dryrun(r, WORKER_USER, &["PUBLISH", "agentq:{default}:other", "x"])? != "OK",
        "channels beyond the cancel channels"
    );
    // KEDA's user runs KEDA's own script on the two trigger keys, and nothing else
    let keda_script = "local t = redis.call('type', KEYS[1]).ok \
        if t == 'zset' then return redis.call('zcard', KEYS[1]) \
        elseif t == 'set' then return redis.call('scard', KEYS[1]) \
        elseif t == 'hash' then return redis.call('hlen', KEYS[1]) \
        elseif t == 'list' or t == 'none' then return redis.call('llen', KEYS[1]) \
        else return redis.error_reply('ERR unsupported key type: ' .. t) end";
    for key in ["agentq:{default}:pending", "agentq:{default}:active"] {
        let n: i64 = redis::cmd("EVAL")
            .arg(keda_script)
            .arg(1)
            .arg(key)
            .query(&mut keda)
            .with_context(|| format!("KEDA's script on {key}"))?;
        ensure!(n == 0, "{key}: {n}");
    }
    ensure!(refusal(&mut keda, &["PING"]).is_none());
    for args in [
        &[
            "EVAL",
            "return redis.call('rpush', KEYS[1], 'x')",
            "1",
            "agentq:{default}:pending",
        ][..],
        &[
            "EVAL",
            "return redis.call('llen', KEYS[1])",
            "1",
            "agentq:{default}:dead",
        ],
        &["HGETALL", "agentq:{default}:task:x"],
        &["LRANGE", "agentq:{default}:pending", "0", "-1"],
        &["FLUSHALL"],
        &["CONFIG", "GET", "*"],
    ] {
        ensure!(
            matches!(
                refusal(&mut keda, args).as_deref(),
                Some("NOPERM") | Some("ERR")
            ),
            "KEDA's user may {args:?}"
        );
    }
    Ok(())
}

/// With tokens on, the api manages tenants and tokens (its global tenancy keys), counts failed
/// authentications, and tenants' tasks go through the fair fetch (per-tenant lines, the ring, the
/// running counts, each tenant's admission in the queue's hash), all as the ACL users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_tokens_and_fair_scheduling_as_the_acl_users() -> Result<()> {
    use agentq_tests::ADMIN_TOKEN;
    use reqwest::Method;
    let dir = tempfile::tempdir()?;
    let redis = redis_with_users(&[], dir.path())?;
    let port = redis.port;
    let mut s = Stack::with_redis(redis, MockConfig::default()).await?;
    let api_url = url("redis", API_USER, API_PASSWORD, port);
    let worker_url = url("redis", WORKER_USER, WORKER_PASSWORD, port);
    s.start_api_auth(&[("REDIS_URL", &api_url)]).await?;
    let _w = s.start_worker(&[("REDIS_URL", &worker_url)]).await?;
    let work = async {
        let acme = s
            .tenant(
                &json!({"id": "acme", "weight": 2, "quotas": {"max_pending": 100,
                "max_running": 5, "enqueue_rate": 50, "budget": {"limit_usd": 5, "window": "1d"}}}),
            )
            .await?;
        let beta = s.tenant(&json!({"id": "beta"})).await?;
        let (st, v) = s
            .send_as(
                ADMIN_TOKEN,
                Method::POST,
                "/v1/admin/tenants/acme/tokens",
                Some(&json!({"expires_in_secs": 3600})),
            )
            .await?;
        ensure!(st == 201, "an expiring token: {st} {v}");
        let (short, short_id) = (
            v["token"].as_str().context("token")?.to_owned(),
            v["token_id"].as_str().context("token_id")?.to_owned(),
        );
        // both tenants' tasks, through the fair fetch
        let mut ids = Vec::new();
        for (token, prompt) in [
            (&acme, "acme task 1"),
            (&beta, "beta task"),
            (&acme, "acme task 2"),
        ] {
            let (st, v) = s
                .send_as(
                    token,
                    Method::POST,
                    "/v1/tasks",
                    Some(&json!({"prompt": prompt})),
                )
                .await?;
            ensure!(st == 202, "POST as a tenant: {st} {v}");
            ids.push((token.clone(), v["id"].as_str().context("id")?.to_owned()));
        }
        for (token, id) in &ids {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (st, v) = s
                    .send_as(token, Method::GET, &format!("/v1/tasks/{id}"), None)
                    .await?;
                ensure!(st == 200, "GET own task: {st} {v}");
                if v["status"] == "succeeded" {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "task {id} not done: {v}\n{}",
                    log_tails(&s)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // another tenant's task is not there; a bad token is refused and counted
        let (st, _) = s
            .send_as(&beta, Method::GET, &format!("/v1/tasks/{}", ids[0].1), None)
            .await?;
        ensure!(st == 404, "another tenant's task: {st}");
        let (st, _) = s
            .send_as(
                "agentq_0123456789abcdef_nope",
                Method::GET,
                "/v1/queues/default",
                None,
            )
            .await?;
        ensure!(st == 401, "a bad token: {st}");
        // the admin's views; revoke a token; delete a tenant
        for path in [
            "/v1/admin/tenants",
            "/v1/admin/tenants/acme",
            "/v1/admin/tenants/acme/tokens",
        ] {
            let (st, v) = s.send_as(ADMIN_TOKEN, Method::GET, path, None).await?;
            ensure!(st == 200, "GET {path}: {st} {v}");
        }
        let (st, v) = s
            .send_as(
                ADMIN_TOKEN,
                Method::PATCH,
                "/v1/admin/tenants/acme",
                Some(&json!({"weight": 3})),
            )
            .await?;
        ensure!(st == 200, "PATCH tenant: {st} {v}");
        let path = format!("/v1/admin/tenants/acme/tokens/{short_id}");
        let (st, _) = s.send_as(ADMIN_TOKEN, Method::DELETE, &path, None).await?;
        ensure!(st == 204, "revoke: {st}");
        let (st, _) = s
            .send_as(&short, Method::GET, "/v1/queues/default", None)
            .await?;
        ensure!(st == 401, "a revoked token: {st}");
        let (st, _) = s
            .send_as(ADMIN_TOKEN, Method::DELETE, "/v1/admin/tenants/beta", None)
            .await?;
        ensure!(st == 204, "DELETE tenant: {st}");
        let (st, _) = s
            .send_as(&beta, Method::GET, "/v1/queues/default", None)
            .await?;
        ensure!(st == 401, "a deleted tenant's token: {st}");
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = work.await {
        bail!(
            "{e:#}\nACL LOG (a refused command is missing from files/redis-users.acl):\n{}",
            acl_log(&s.redis)?.join("\n")
        );
    }
    let refused = unexpected_refusals(&s.redis)?;
    ensure!(
        refused.is_empty(),
        "commands refused to agentq's users (add them to files/redis-users.acl):\n{}\n{}",
        refused.join("\n"),
        log_tails(&s)
    );
    // the keys tenancy wrote are there, and the worker may not read the global ones
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("agentq:t*")
        .query(&mut s.redis.conn()?)?;
    ensure!(
        keys.iter().any(|k| k.starts_with("agentq:token:"))
            && keys.iter().any(|k| k.starts_with("agentq:tenant:{acme}")),
        "tenancy keys: {keys:?}"
    );
    let mut worker = conn_as(&s.redis, WORKER_USER, WORKER_PASSWORD)?;
    for k in keys {
        ensure!(
            refusal(&mut worker, &["TYPE", &k]).as_deref() == Some("NOPERM")
                && refusal(&mut worker, &["HGETALL", &k]).as_deref() == Some("NOPERM"),
            "the worker may touch {k}"
        );
    }
    assert_no_panic(&s);
    Ok(())
}

/// The users bound every key to the rendered prefix: rendered for another prefix and loaded with
/// `ACL SETUSER` (the way to add them to a running Redis), they may use that prefix's keys and
/// channels and not `agentq`'s.
#[test]
fn the_prefix_is_substituted_into_every_pattern() -> Result<()> {
    let r = RedisServer::start()?;
    let mut c = r.conn()?;
    for line in users("team-a", "-a")?.lines() {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER");
        for w in line.split_whitespace().skip(1) {
            cmd.arg(w);
        }
        let _: () = cmd
            .query(&mut c)
            .with_context(|| format!("ACL SETUSER {line}"))?;
    }
    for user in [format!("{API_USER}-a"), format!("{WORKER_USER}-a")] {
        for (args, ok) in [
            (&["LLEN", "team-a:{default}:pending"][..], true),
            (&["HGET", "team-a:limiter:{openai}", "rsum"], true),
            (&["PUBLISH", "team-a:{q}:cancels", "x"], true),
            (&["LLEN", "agentq:{default}:pending"], false),
            (&["HGET", "agentq:limiter:{openai}", "rsum"], false),
            (&["PUBLISH", "agentq:{q}:cancels", "x"], false),
        ] {
            let got = dryrun(&r, &user, args)?;
            ensure!((got == "OK") == ok, "{user} {args:?}: {got}");
        }
    }
    ensure!(dryrun(&r, &format!("{API_USER}-a"), &["GET", "team-a:token:x"])? == "OK");
    ensure!(dryrun(&r, &format!("{API_USER}-a"), &["GET", "agentq:token:x"])? != "OK");
    ensure!(
        dryrun(
            &r,
            &format!("{KEDA_USER}-a"),
            &["LLEN", "team-a:{q}:pending"]
        )? == "OK"
    );
    ensure!(
        dryrun(
            &r,
            &format!("{KEDA_USER}-a"),
            &["LLEN", "agentq:{q}:pending"]
        )? != "OK"
    );
    Ok(())
}

/// The same users over TLS: the api and a worker connect with `rediss://user:password@` and trust
/// the server through `AGENTQ_REDIS_CA_FILE` (a private CA; the system roots would refuse it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_users_over_tls_with_a_private_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agentq_tests::TlsFiles { ca, cert, key } = agentq_tests::tls_files(dir.path())?;
    let tls_port = agentq_tests::free_port();
    let tls_port_s = tls_port.to_string();
    let redis = redis_with_users(
        &[
            "--tls-port",
            &tls_port_s,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
        dir.path(),
    )?;
    let mut s = Stack::with_redis(redis, MockConfig::default()).await?;
    let api_url = url("rediss", API_USER, API_PASSWORD, tls_port);
    let worker_url = url("rediss", WORKER_USER, WORKER_PASSWORD, tls_port);
    s.start_api(&[
        ("REDIS_URL", &api_url),
        ("AGENTQ_AUTH", "off"),
        ("AGENTQ_REDIS_CA_FILE", &ca),
    ])
    .await?;
    let _w = s
        .start_worker(&[
            ("REDIS_URL", &worker_url),
            ("AGENTQ_REDIS_CA_FILE", &ca),
            ("AGENTQ_LLM_TIMEOUT_SECS", "60"),
            ("AGENTQ_CANCEL_POLL_MS", "60000"),
        ])
        .await?;
    ensure!(
        s.get_json("/readyz").await?.0 == 200,
        "api over TLS\n{}",
        log_tails(&s)
    );
    let id = s.submit("over tls as an acl user").await?;
    streamed(&s, &id).await?;
    let slow = "cancel over tls [[sleep:20000]]";
    let cancelled = s.submit(slow).await?;
    until("the slow call", &s, Duration::from_secs(10), async || {
        Ok(s.mock.calls(slow) >= 1)
    })
    .await?;
    ensure!(
        request(
            &s,
            reqwest::Method::DELETE,
            &format!("/v1/tasks/{cancelled}")
        )
        .await?
            == 200
    );
    until("the call's abort", &s, Duration::from_secs(3), async || {
        Ok(aborted(&s).await? >= 1)
    })
    .await?;
    // every agentq connection is TLS: the plain port saw only the test's own (default user)
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut s.redis.conn()?)?;
    for line in clients.lines().filter(|l| l.contains("user=agentq-")) {
        ensure!(
            line.contains(&format!("laddr=127.0.0.1:{tls_port}")),
            "not over TLS: {line}"
        );
    }
    ensure!(clients.contains("user=agentq-worker"), "{clients}");
    let refused = unexpected_refusals(&s.redis)?;
    ensure!(
        refused.is_empty(),
        "refused over TLS:\n{}",
        refused.join("\n")
    );

    // without the CA the api cannot connect (its readiness says so) and says nothing of the password
    let mut other = Stack::with_redis(RedisServer::start()?, MockConfig::default()).await?;
    other
        .start_api(&[("REDIS_URL", &api_url), ("AGENTQ_AUTH", "off")])
        .await?;
    ensure!(
        other.get_json("/readyz").await?.0 == 503,
        "an unknown CA must not be trusted"
    );
    let log = other.api.as_ref().map(|a| a.log_text()).unwrap_or_default();
    ensure!(!log.contains(API_PASSWORD), "password in the log:\n{log}");
    assert_no_panic(&s);
    Ok(())
}

/// Every command the code names (Lua `redis.call`s, `redis::cmd("...")` in Rust) is granted to a
/// user that may send it; a new command fails here before it fails in a cluster. (Typed calls
/// like `conn.hget` are covered by the end-to-end test above.)
#[test]
fn every_command_the_code_names_is_granted() -> Result<()> {
    let text = render(
        &acl_source()?,
        &[
            ("PREFIX", "agentq"),
            ("API_USER", "api"),
            ("WORKER_USER", "worker"),
            ("KEDA_USER", "keda"),
            ("API_PASSWORD_SHA256", "0"),
            ("WORKER_PASSWORD_SHA256", "0"),
            ("KEDA_PASSWORD_SHA256", "0"),
            ("SELECT", ""),
        ],
    )?;
    let granted: HashMap<String, BTreeSet<String>> = text
        .lines()
        .map(|l| {
            let mut words = l.split_whitespace().skip(1);
            let user = words.next().unwrap_or_default().to_owned();
            let cmds = words
                .filter_map(|w| w.strip_prefix('+'))
                .map(|c| c.to_ascii_uppercase())
                .filter(|c| !c.starts_with('@'))
                .collect();
            (user, cmds)
        })
        .collect();
    let both: BTreeSet<String> = granted["api"].union(&granted["worker"]).cloned().collect();
    let mut missing = Vec::new();
    let root = repo_root();
    let mut files = Vec::new();
    for dir in ["common/src", "api/src", "worker/src"] {
        walk(&root.join(dir), &mut files)?;
    }
    let call = regex_lite("redis.call(", "redis.pcall(");
    for f in &files {
        let src = std::fs::read_to_string(f)?;
        let rel = f
            .strip_prefix(&root)
            .unwrap_or(f)
            .to_string_lossy()
            .into_owned();
        let wanted: &BTreeSet<String> = if rel.starts_with("api/") {
            &granted["api"]
        } else if rel.starts_with("worker/") {
            &granted["worker"]
        } else {
            &both
        };
        let mut names = Vec::new();
        if rel.ends_with(".lua") {
            names.extend(call(&src));
        } else if rel.ends_with(".rs") {
            names.extend(rust_cmds(&src));
        }
        for name in names {
            // the api's CONFIG GET is refused on purpose (see files/redis-users.acl)
            if name == "CONFIG" && rel == "api/src/lib.rs" {
                continue;
            }
            let ok =
                wanted.contains(&name) || wanted.iter().any(|g| g.starts_with(&format!("{name}|")));
            if !ok {
                missing.push(format!("{rel}: {name}"));
            }
        }
    }
    missing.sort();
    missing.dedup();
    ensure!(
        missing.is_empty(),
        "commands the code sends that no user of files/redis-users.acl may run:\n{}",
        missing.join("\n")
    );
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// The command names after `redis.call(` / `redis.pcall(` in Lua: `('NAME'` or `("NAME"`.
fn regex_lite(a: &'static str, b: &'static str) -> impl Fn(&str) -> Vec<String> {
    move |src: &str| {
        let mut out = Vec::new();
        for pat in [a, b] {
            for (i, _) in src.match_indices(pat) {
                let rest = src[i + pat.len()..].trim_start();
                let Some(q) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') else {
                    continue;
                };
                if let Some(end) = rest[1..].find(q) {
                    out.push(rest[1..=end].to_ascii_uppercase());
                }
            }
        }
        out
    }
}

/// The command names of `cmd("NAME")` in Rust (`redis::cmd`, `pipe.cmd`), upper case only.
fn rust_cmds(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in src.match_indices("cmd(\"") {
        let rest = &src[i + 5..];
        if let Some(end) = rest.find('"') {
            let name = &rest[..end];
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                out.push(name.to_owned());
            }
        }
    }
    out
}
