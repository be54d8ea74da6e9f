//! The OpenAI Batch API (issue 17) end to end with a private redis-server, the api and worker
//! binaries and the mock LLM: uploads validated line by line with nothing left behind on error,
//! a batch with failing lines writing its output and error files in input order (each line one
//! LLM call), a cancel mid-way that settles with every request counted and nothing run after
//! it, an api SIGKILLed during fan-out and during finalization that still ends every line
//! exactly once, and the official `openai` Python SDK driving a 1,000-line batch.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use agentq_tests::{assert_no_panic, log_tails, MockConfig, Stack};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

const BOUNDARY: &str = "agentq-batch-test-boundary";

/// A multipart/form-data body with `purpose` and a `file` part (in that order unless
/// `file_first`).
fn multipart(purpose: Option<&str>, file: Option<&[u8]>, file_first: bool) -> Vec<u8> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    if let Some(p) = purpose {
        parts.push(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{p}\r\n"
            )
            .into_bytes(),
        );
    }
    if let Some(f) = file {
        let mut part = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
        )
        .into_bytes();
        part.extend_from_slice(f);
        part.extend_from_slice(b"\r\n");
        if file_first {
            parts.insert(0, part);
        } else {
            parts.push(part);
        }
    }
    let mut body = parts.concat();
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn upload_raw(s: &Stack, body: Vec<u8>) -> Result<(u16, Value)> {
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
    // a refusal may leave the body unread, so it must tell the client not to reuse the connection
    let close = r
        .headers()
        .get("connection")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    ensure!(
        status < 400 || close,
        "upload refused with {status} but without Connection: close"
    );
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn upload(s: &Stack, jsonl: &str) -> Result<String> {
    let (status, v) =
        upload_raw(s, multipart(Some("batch"), Some(jsonl.as_bytes()), false)).await?;
    ensure!(status == 200, "upload answered {status}: {v}");
    v["id"].as_str().map(str::to_owned).context("no file id")
}

fn request(custom_id: &str, prompt: &str) -> Value {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "mock-gpt", "messages": [{"role": "user", "content": prompt}]},
    })
}

fn jsonl(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

async fn post_json(s: &Stack, path: &str, body: &Value) -> Result<(u16, Value)> {
    let r = s
        .http
        .post(format!("{}{path}", s.api_url))
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn create_batch(s: &Stack, file: &str) -> Result<Value> {
    let (status, v) = post_json(
        s,
        "/v1/batches",
        &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await?;
    ensure!(status == 200, "POST /v1/batches answered {status}: {v}");
    Ok(v)
}

async fn wait_batch(s: &Stack, id: &str, timeout: Duration, until: &[&str]) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, v) = s.get_json(&format!("/v1/batches/{id}")).await?;
        ensure!(status == 200, "GET batch {id}: {status} {v}");
        if until.iter().any(|u| v["status"] == *u) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("batch {id} never reached {until:?}: {v}\n{}", log_tails(s));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A file's content, one JSON value per line.
async fn content(s: &Stack, file: &str) -> Result<Vec<Value>> {
    let r = s
        .http
        .get(format!("{}/v1/files/{file}/content", s.api_url))
        .send()
        .await?;
    ensure!(r.status().is_success(), "content of {file}: {}", r.status());
    let text = r.text().await?;
    text.lines()
        .map(|l| serde_json::from_str(l).context("a content line is not JSON"))
        .collect()
}

fn redis_conn(s: &Stack) -> Result<redis::Connection> {
    s.redis.conn()
}

/// No file key, index entry or charged byte is left.
fn no_file_state(s: &Stack) -> Result<()> {
    let mut c = redis_conn(s)?;
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("agentq:file*").query(&mut c)?;
    // the total itself stays (at 0)
    keys.retain(|k| k != "agentq:files:bytes");
    let bytes: Option<i64> = redis::cmd("GET").arg("agentq:files:bytes").query(&mut c)?;
    ensure!(
        keys.is_empty() && bytes.unwrap_or(0) == 0,
        "file state left behind: keys {keys:?}, bytes {bytes:?}"
    );
    Ok(())
}

/// Polls until nothing is left, for the cleanup of a failed upload (it runs in a task of its own).
async fn wait_no_file_state(s: &Stack) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match no_file_state(s) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_are_validated_line_by_line_and_leave_nothing_behind() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[("AGENTQ_FILE_MAX_BYTES", "8192")]).await?;
    let ok = |i: usize| request(&format!("r{i}"), &format!("p{i}"));
    let mut bad_body = ok(3);
    bad_body["body"]["temperature"] = json!("hot");
    let mut streamed = ok(2);
    streamed["body"]["stream"] = json!(true);
    let mut wrong_url = ok(2);
    wrong_url["url"] = json!("/v1/embeddings");
    let mut no_id = ok(2);
    no_id.as_object_mut().context("object")?.remove("custom_id");
    let mut extra = ok(2);
    extra["priority"] = json!(1);
    let cases: Vec<(String, u16, &str, Option<&str>)> = vec![
        (
            format!("{}\n\nnot json\n", ok(1)),
            400,
            "line 3: invalid JSON",
            None,
        ),
        (
            jsonl(&[ok(1), no_id]),
            400,
            "line 2: missing custom_id",
            Some("custom_id"),
        ),
        (
            jsonl(&[ok(1), ok(2), ok(3), ok(1)]),
            400,
            "line 4: duplicate custom_id",
            Some("custom_id"),
        ),
        (
            jsonl(&[ok(1), wrong_url]),
            400,
            "line 2: url must be",
            Some("url"),
        ),
        (
            jsonl(&[ok(1), ok(2), bad_body]),
            400,
            "line 3:",
            Some("body.temperature"),
        ),
        (
            jsonl(&[ok(1), streamed]),
            400,
            "line 2: batch requests cannot stream",
            Some("body.stream"),
        ),
        (
            jsonl(&[ok(1), extra]),
            400,
            "line 2: unknown key",
            Some("priority"),
        ),
        (
            (0..200).map(|i| format!("{}\n", ok(i))).collect(),
            413,
            "at most 8192 bytes",
            Some("file"),
        ),
    ];
    for (body, want, message, param) in &cases {
        let (status, v) =
            upload_raw(&s, multipart(Some("batch"), Some(body.as_bytes()), false)).await?;
        ensure!(
            status == *want,
            "wanted {want} for {message:?}, got {status}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap_or("");
        ensure!(
            msg.starts_with(message) || msg.contains(message),
            "message {msg:?}, wanted {message:?}"
        );
        ensure!(
            v["error"]["param"].as_str() == *param,
            "param {v}, wanted {param:?}"
        );
        ensure!(v["error"]["type"] == "invalid_request_error", "{v}");
        wait_no_file_state(&s).await?;
    }
    // the purpose after the file: the file is read (and stored) first, then refused and deleted
    let (status, v) = upload_raw(
        &s,
        multipart(Some("fine-tune"), Some(jsonl(&[ok(1)]).as_bytes()), true),
    )
    .await?;
    ensure!(
        status == 400 && v["error"]["param"] == "purpose",
        "{status} {v}"
    );
    wait_no_file_state(&s).await?;
    let (status, v) = upload_raw(&s, multipart(Some("batch"), None, false)).await?;
    ensure!(
        status == 400 && v["error"]["param"] == "file",
        "{status} {v}"
    );
    // a line past 1 MiB in a file the size limit allows; it ends the body, so the api has read
    // nearly all of it before it answers (no reset under a client still sending)
    s.start_api(&[("AGENTQ_FILE_MAX_BYTES", "2097152")]).await?;
    let long = format!("{}\n{}\n", ok(1), request("long", &"x".repeat(1024 * 1024)));
    let (status, v) =
        upload_raw(&s, multipart(Some("batch"), Some(long.as_bytes()), false)).await?;
    ensure!(
        status == 413 && v["error"]["code"] == "line_too_large",
        "{status} {v}"
    );
    ensure!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("line 2:")),
        "{v}"
    );
    wait_no_file_state(&s).await?;

    // a good file: its object, the list, its content (blank lines and \r dropped), delete
    let text = format!("{}\r\n\n{}\n", ok(1), ok(2));
    let id = upload(&s, &text).await?;
    let (status, f) = s.get_json(&format!("/v1/files/{id}")).await?;
    ensure!(status == 200, "{f}");
    ensure!(
        f["object"] == "file" && f["purpose"] == "batch" && f["status"] == "processed",
        "{f}"
    );
    ensure!(
        f["bytes"] == text.len() && f["filename"] == "in.jsonl",
        "{f}"
    );
    ensure!(
        f["expires_at"].as_i64().unwrap_or(0) > f["created_at"].as_i64().unwrap_or(0),
        "{f}"
    );
    let (_, list) = s.get_json("/v1/files?purpose=batch").await?;
    ensure!(
        list["object"] == "list" && list["data"][0]["id"] == id.as_str(),
        "{list}"
    );
    let (_, none) = s.get_json("/v1/files?purpose=batch_output").await?;
    ensure!(none["data"].as_array().is_some_and(Vec::is_empty), "{none}");
    let lines = content(&s, &id).await?;
    ensure!(lines == vec![ok(1), ok(2)], "{lines:?}");
    let r = s
        .http
        .delete(format!("{}/v1/files/{id}", s.api_url))
        .send()
        .await?;
    ensure!(r.status() == 200, "delete: {}", r.status());
    let v: Value = r.json().await?;
    ensure!(
        v == json!({"id": id, "object": "file", "deleted": true}),
        "{v}"
    );
    no_file_state(&s)?;
    let (status, _) = s.get_json(&format!("/v1/files/{id}")).await?;
    ensure!(status == 404);
    // batches over unknown files, endpoints and windows
    let (status, v) = post_json(&s, "/v1/batches", &json!({"input_file_id": id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await?;
    ensure!(
        status == 404 && v["error"]["param"] == "input_file_id",
        "{status} {v}"
    );
    let (status, v) = post_json(
        &s,
        "/v1/batches",
        &json!({"input_file_id": id, "endpoint": "/v1/embeddings", "completion_window": "24h"}),
    )
    .await?;
    ensure!(
        status == 400 && v["error"]["param"] == "endpoint",
        "{status} {v}"
    );
    let (status, v) = post_json(&s, "/v1/batches", &json!({"input_file_id": id, "endpoint": "/v1/chat/completions", "completion_window": "1h"})).await?;
    ensure!(
        status == 400 && v["error"]["param"] == "completion_window",
        "{status} {v}"
    );
    let (status, _) = s.get_json("/v1/batches/batch_nope").await?;
    ensure!(status == 404);
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_runs_each_line_once_and_writes_its_files_in_input_order() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[("AGENTQ_BATCH_CHUNK", "7")]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "16")]).await?;
    let failing: HashSet<usize> = [4, 11, 19].into();
    let prompt = |i: usize| {
        let fail = if failing.contains(&i) {
            " [[fail:400]]"
        } else {
            ""
        };
        format!("batch e2e line {i}{fail}")
    };
    let lines: Vec<Value> = (0..30)
        .map(|i| request(&format!("c{i}"), &prompt(i)))
        .collect();
    let file = upload(&s, &jsonl(&lines)).await?;
    let b = create_batch(&s, &file).await?;
    ensure!(
        b["object"] == "batch" && b["request_counts"]["total"] == 30,
        "{b}"
    );
    ensure!(
        b["expires_at"].as_i64() == b["created_at"].as_i64().map(|c| c + 86_400),
        "{b}"
    );
    let id = b["id"].as_str().context("id")?.to_owned();
    let b = wait_batch(&s, &id, Duration::from_secs(30), &["completed"]).await?;
    ensure!(
        b["request_counts"] == json!({"total": 30, "completed": 27, "failed": 3}),
        "{b}"
    );
    for k in ["in_progress_at", "finalizing_at", "completed_at"] {
        ensure!(b[k].is_i64(), "{k} not set: {b}");
    }
    let out = content(&s, b["output_file_id"].as_str().context("output file")?).await?;
    let err = content(&s, b["error_file_id"].as_str().context("error file")?).await?;
    let want_ok: Vec<String> = (0..30)
        .filter(|i| !failing.contains(i))
        .map(|i| format!("c{i}"))
        .collect();
    let got_ok: Vec<&str> = out.iter().filter_map(|o| o["custom_id"].as_str()).collect();
    ensure!(got_ok == want_ok, "output order {got_ok:?}");
    let got_err: Vec<&str> = err.iter().filter_map(|o| o["custom_id"].as_str()).collect();
    ensure!(
        got_err == vec!["c4", "c11", "c19"],
        "error file {got_err:?}"
    );
    for o in &out {
        let r = &o["response"];
        ensure!(r["status_code"] == 200 && o["error"].is_null(), "{o}");
        ensure!(
            o["id"]
                .as_str()
                .is_some_and(|i| i.starts_with("batch_req_")),
            "{o}"
        );
        ensure!(r["body"]["object"] == "chat.completion", "{o}");
        let task = r["request_id"].as_str().context("request_id")?;
        ensure!(
            r["body"]["id"] == format!("chatcmpl-{task}").as_str(),
            "{o}"
        );
        let text = r["body"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("");
        let n: usize = o["custom_id"]
            .as_str()
            .unwrap_or("c")
            .trim_start_matches('c')
            .parse()?;
        ensure!(text.contains(&prompt(n)), "line {n} answered {text:?}");
    }
    for e in &err {
        ensure!(e["response"]["status_code"] == 400, "{e}");
        ensure!(e["response"]["body"]["error"]["message"].is_string(), "{e}");
    }
    // every line was one LLM call, the failing ones too (a 400 is not retried)
    for i in 0..30 {
        ensure!(
            s.mock.calls(&prompt(i)) == 1,
            "line {i}: {} calls",
            s.mock.calls(&prompt(i))
        );
    }
    let (_, list) = s.get_json("/v1/batches?limit=1").await?;
    ensure!(
        list["data"][0]["id"] == id.as_str() && list["has_more"] == false,
        "{list}"
    );
    let (_, outs) = s.get_json("/v1/files?purpose=batch_output").await?;
    ensure!(outs["data"].as_array().map(Vec::len) == Some(2), "{outs}");
    // a finished batch cannot be cancelled; its input file can be deleted now
    let (status, v) = post_json(&s, &format!("/v1/batches/{id}/cancel"), &json!({})).await?;
    ensure!(status == 409, "{status} {v}");
    let r = s
        .http
        .delete(format!("{}/v1/files/{file}", s.api_url))
        .send()
        .await?;
    ensure!(r.status() == 200, "delete input: {}", r.status());
    let m = s
        .http
        .get(format!("{}/metrics", s.api_url))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        m.contains("agentq_batches_total{status=\"completed\"} 1"),
        "metrics:\n{m}"
    );
    ensure!(
        m.contains("agentq_batch_requests_total{outcome=\"failed\"} 3"),
        "metrics"
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_mid_way_counts_every_request_and_runs_nothing_after() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[("AGENTQ_BATCH_CHUNK", "5")]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "4")]).await?;
    let prompt = |i: usize| format!("slow line {i} [[sleep:1500]]");
    let lines: Vec<Value> = (0..40)
        .map(|i| request(&format!("s{i}"), &prompt(i)))
        .collect();
    let file = upload(&s, &jsonl(&lines)).await?;
    let b = create_batch(&s, &file).await?;
    let id = b["id"].as_str().context("id")?.to_owned();
    // a first wave has answered and a second is in flight
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.mock.total_calls() < 6 {
        ensure!(Instant::now() < deadline, "calls never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = post_json(&s, &format!("/v1/batches/{id}/cancel"), &json!({})).await?;
    ensure!(status == 200 && v["status"] == "cancelling", "{status} {v}");
    ensure!(v["cancelling_at"].is_i64(), "{v}");
    let b = wait_batch(&s, &id, Duration::from_secs(15), &["cancelled"]).await?;
    let calls = s.mock.total_calls();
    let c = &b["request_counts"];
    let done = c["completed"].as_u64().unwrap_or(0);
    let failed = c["failed"].as_u64().unwrap_or(0);
    ensure!(done + failed == 40 && done >= 4 && failed > 0, "{b}");
    ensure!(b["cancelled_at"].is_i64(), "{b}");
    let out = match b["output_file_id"].as_str() {
        Some(f) => content(&s, f).await?,
        None => Vec::new(),
    };
    let err = content(&s, b["error_file_id"].as_str().context("error file")?).await?;
    ensure!(
        out.len() as u64 == done && err.len() as u64 == failed,
        "{} + {} lines",
        out.len(),
        err.len()
    );
    ensure!(
        err.iter()
            .all(|e| e["error"]["code"] == "batch_cancelled" && e["response"].is_null()),
        "{err:?}"
    );
    let mut all: Vec<usize> = out
        .iter()
        .chain(&err)
        .filter_map(|l| {
            l["custom_id"]
                .as_str()?
                .trim_start_matches('s')
                .parse()
                .ok()
        })
        .collect();
    all.sort_unstable();
    ensure!(all == (0..40).collect::<Vec<_>>(), "custom_ids {all:?}");
    // nothing more reaches the LLM once the cancel settled; the aborted calls were dropped
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        s.mock.total_calls() == calls,
        "calls after cancel: {} then {}",
        calls,
        s.mock.total_calls()
    );
    ensure!(calls < 40, "every line ran: {calls}");
    let q = s.queue("default").await?;
    ensure!(q["inflight"] == 0 && q["retrying"] == 0, "{q}");
    assert_no_panic(&s);
    Ok(())
}

/// The batch's record straight from Redis (to see it between api processes).
fn batch_field(r: &agentq_tests::RedisServer, id: &str, field: &str) -> Result<Option<String>> {
    let mut c = r.conn()?;
    Ok(redis::cmd("HGET")
        .arg(format!("agentq:{{default}}:batch:{id}"))
        .arg(field)
        .query(&mut c)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_killed_during_fan_out_and_finalize_still_ends_every_line_once() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    // two lines per script: the fan-out and the files take many steps, so a kill lands mid-way
    let env = [("AGENTQ_BATCH_CHUNK", "2")];
    s.start_api(&env).await?;
    let n = 400;
    let prompt = |i: usize| format!("killed api line {i}");
    let lines: Vec<Value> = (0..n)
        .map(|i| request(&format!("k{i}"), &prompt(i)))
        .collect();
    let file = upload(&s, &jsonl(&lines)).await?;
    let b = create_batch(&s, &file).await?;
    let id = b["id"].as_str().context("id")?.to_owned();
    // kill the api once its fan-out has begun
    let cursor = || -> Result<u64> {
        Ok(batch_field(&s.redis, &id, "cursor")?
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while cursor()? == 0 {
        ensure!(Instant::now() < deadline, "the fan-out never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(api) = s.api.as_mut() {
        api.sigkill();
    }
    let at = cursor()?;
    eprintln!("api killed with {at} of {n} lines fanned out");
    ensure!(
        at > 0 && at < n as u64,
        "the kill did not land mid fan-out; nothing proven"
    );
    // another api resumes the fan-out once the dead one's lease lapses; a worker runs it
    s.start_api(&env).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "32")]).await?;
    // kill the next api once it has written part of the output file; a third one finishes
    let written = || -> Result<i64> {
        let mut c = s.redis.conn()?;
        let f: Option<String> = redis::cmd("HGET")
            .arg(format!("agentq:{{default}}:batch:{id}"))
            .arg("out_file")
            .query(&mut c)?;
        Ok(match f {
            Some(f) => redis::cmd("LLEN")
                .arg(format!("agentq:file:{{{f}}}:lines"))
                .query(&mut c)?,
            None => 0,
        })
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while written()? == 0 {
        ensure!(
            Instant::now() < deadline,
            "never finalizing: {:?}",
            batch_field(&s.redis, &id, "status")?
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(api) = s.api.as_mut() {
        api.sigkill();
    }
    let half = written()?;
    eprintln!("api killed while finalizing, {half} of {n} output lines written");
    ensure!(
        half < n as i64 && batch_field(&s.redis, &id, "status")?.as_deref() == Some("finalizing"),
        "the kill did not land mid finalization; nothing proven"
    );
    s.start_api(&env).await?;
    let b = wait_batch(&s, &id, Duration::from_secs(30), &["completed"]).await?;
    ensure!(
        b["request_counts"] == json!({"total": n, "completed": n, "failed": 0}),
        "{b}"
    );
    ensure!(
        b["error_file_id"].is_null(),
        "an empty error file is omitted: {b}"
    );
    let out = content(&s, b["output_file_id"].as_str().context("output")?).await?;
    let ids: Vec<String> = out
        .iter()
        .filter_map(|o| o["custom_id"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        ids == (0..n).map(|i| format!("k{i}")).collect::<Vec<_>>(),
        "output {} lines, not in order",
        ids.len()
    );
    let tasks: HashSet<&str> = out
        .iter()
        .filter_map(|o| o["response"]["request_id"].as_str())
        .collect();
    ensure!(tasks.len() == n, "{} distinct tasks", tasks.len());
    for i in 0..n {
        ensure!(
            s.mock.calls(&prompt(i)) == 1,
            "line {i}: {} calls",
            s.mock.calls(&prompt(i))
        );
    }
    // the batch's task list holds each line once; the files' byte count matches what is stored
    let mut c = redis_conn(&s)?;
    let list: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("agentq:{{default}}:batch:{id}:tasks"))
        .arg(0)
        .arg(-1)
        .query(&mut c)?;
    ensure!(
        list.len() == n && list.iter().collect::<HashSet<_>>().len() == n,
        "{} tasks listed",
        list.len()
    );
    let metas: Vec<String> = redis::cmd("KEYS").arg("agentq:file:{*}").query(&mut c)?;
    let ledger: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg("agentq:files:charges:{agentq:files:bytes}")
        .query(&mut c)?;
    let mut charged = 0i64;
    for m in &metas {
        let v: Option<i64> = redis::cmd("HGET").arg(m).arg("charged").query(&mut c)?;
        charged += v.unwrap_or(0);
        // the file's own count and its entry in the total's ledger agree
        let id = m.trim_start_matches("agentq:file:{").trim_end_matches('}');
        ensure!(
            ledger.get(id).copied() == v,
            "file {id}: charged {v:?}, ledger {:?}",
            ledger.get(id)
        );
    }
    let total: i64 = redis::cmd("GET").arg("agentq:files:bytes").query(&mut c)?;
    ensure!(
        metas.len() == 2 && total == charged && ledger.len() == 2,
        "{} files charged {charged}, total {total}, ledger {ledger:?}",
        metas.len()
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_sdk_runs_a_1000_line_batch() -> Result<()> {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/.venv-litellm/bin/python");
    ensure!(
        python.exists(),
        "{} missing: run `bash tests/peers/litellm/install.sh` (it installs the openai package)",
        python.display()
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/batch.py");
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "64")]).await?;
    let base = format!("{}/v1", s.api_url);
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "batch.py failed ({}):\n{stdout}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        log_tails(&s)
    );
    ensure!(
        stdout.contains("\"completed\": 996") && stdout.contains("\"failed\": 4"),
        "{stdout}"
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_past_its_window_expires_and_a_redrive_is_counted_once() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "2")]).await?;
    // expiry: the window is moved into the past under a running batch
    let slow = |i: usize| format!("expiring line {i} [[sleep:1500]]");
    let lines: Vec<Value> = (0..20)
        .map(|i| request(&format!("e{i}"), &slow(i)))
        .collect();
    let file = upload(&s, &jsonl(&lines)).await?;
    let b = create_batch(&s, &file).await?;
    let id = b["id"].as_str().context("id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.mock.total_calls() < 2 {
        ensure!(Instant::now() < deadline, "calls never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let mut c = s.redis.conn()?;
        let _: () = redis::cmd("HSET")
            .arg(format!("agentq:{{default}}:batch:{id}"))
            .arg("expires_at")
            .arg(1)
            .query(&mut c)?;
    }
    let b = wait_batch(&s, &id, Duration::from_secs(15), &["expired"]).await?;
    let c = &b["request_counts"];
    let (done, failed) = (
        c["completed"].as_u64().unwrap_or(0),
        c["failed"].as_u64().unwrap_or(0),
    );
    ensure!(
        done + failed == 20 && failed > 0 && b["expired_at"].is_i64(),
        "{b}"
    );
    let err = content(&s, b["error_file_id"].as_str().context("error file")?).await?;
    ensure!(err.len() as u64 == failed, "{} error lines", err.len());
    ensure!(
        err.iter().all(|e| e["error"]["code"] == "batch_expired"),
        "{err:?}"
    );

    // redrive: a request dead while its batch still runs is counted again, once
    let once = "redriven line [[fail:400:1]]";
    let hold = "holding line [[sleep:3000]]";
    let file = upload(&s, &jsonl(&[request("a", once), request("b", hold)])).await?;
    let b = create_batch(&s, &file).await?;
    let id = b["id"].as_str().context("id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = s.get_json(&format!("/v1/batches/{id}")).await?;
        if v["request_counts"]["failed"] == 1 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the failing line never counted: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = s.redrive("default", None).await?;
    ensure!(status == 200 && v["redriven"] == 1, "{status} {v}");
    let (_, v) = s.get_json(&format!("/v1/batches/{id}")).await?;
    ensure!(
        v["request_counts"]["failed"] == 0,
        "the redrive did not uncount: {v}"
    );
    let b = wait_batch(&s, &id, Duration::from_secs(15), &["completed"]).await?;
    ensure!(
        b["request_counts"] == json!({"total": 2, "completed": 2, "failed": 0}),
        "{b}"
    );
    ensure!(b["error_file_id"].is_null(), "{b}");
    ensure!(s.mock.calls(once) == 2 && s.mock.calls(hold) == 1, "calls");
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_in_progress_are_capped() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[("AGENTQ_BATCHES_MAX", "1")]).await?;
    let file = upload(&s, &jsonl(&[request("x", "capped [[sleep:200]]")])).await?;
    let first = create_batch(&s, &file).await?;
    let (status, v) = post_json(
        &s,
        "/v1/batches",
        &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await?;
    ensure!(
        status == 429 && v["error"]["type"] == "rate_limit_error",
        "{status} {v}"
    );
    // the refused one left nothing: once the first ends, a new one is taken
    let _w = s.start_worker(&[]).await?;
    let id = first["id"].as_str().context("id")?;
    wait_batch(&s, id, Duration::from_secs(15), &["completed"]).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, v) = post_json(
            &s,
            "/v1/batches",
            &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await?;
        if status == 200 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "still refused after the first ended: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_panic(&s);
    Ok(())
}

/// `POST /v1/files` as `token` (auth on); returns (status, body).
async fn upload_as(s: &Stack, token: &str, jsonl: &str) -> Result<(u16, Value)> {
    let r = s
        .http
        .post(format!("{}/v1/files", s.api_url))
        .bearer_auth(token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart(Some("batch"), Some(jsonl.as_bytes()), false))
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

fn batch_body(file: &str) -> Value {
    json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
}

fn hget(s: &Stack, key: &str, field: &str) -> Result<Option<String>> {
    let mut c = s.redis.conn()?;
    Ok(redis::cmd("HGET").arg(key).arg(field).query(&mut c)?)
}

fn zscore(s: &Stack, key: &str, member: &str) -> Result<Option<f64>> {
    let mut c = s.redis.conn()?;
    Ok(redis::cmd("ZSCORE").arg(key).arg(member).query(&mut c)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_files_and_batches_are_its_own_through_the_official_sdk() -> Result<()> {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/.venv-litellm/bin/python");
    ensure!(
        python.exists(),
        "{} missing: run `bash tests/peers/litellm/install.sh` (it installs the openai package)",
        python.display()
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/batch.py");
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "16")]).await?;
    let a = s.tenant(&json!({"id": "a"})).await?;
    let b = s.tenant(&json!({"id": "b"})).await?;
    // the official SDK, each tenant with its own token as api_key
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("--tenants")
        .arg(format!("{}/v1", s.api_url))
        .arg(&a)
        .arg(&b)
        .arg(agentq_tests::ADMIN_TOKEN)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "batch.py --tenants failed ({}):\n{stdout}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        log_tails(&s)
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .with_context(|| format!("summary: {stdout}"))?;
    let batch_a = summary["batch_a"].as_str().context("batch_a")?;
    let file_a = summary["file_a"].as_str().context("file_a")?;
    let output_a = summary["output_a"].as_str().context("output_a")?;
    let tasks: Vec<&str> = summary["tasks_a"]
        .as_array()
        .context("tasks_a")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(tasks.len() == 5, "{summary}");

    // the tasks of A's batch are A's: B gets 404, A and the admin see them, tenant "a"
    for t in &tasks {
        let path = format!("/v1/tasks/{t}");
        let (st, v) = s.send_as(&b, reqwest::Method::GET, &path, None).await?;
        ensure!(st == 404, "B reading A's batch task {t}: {st} {v}");
        let (st, v) = s.send_as(&a, reqwest::Method::GET, &path, None).await?;
        ensure!(
            st == 200 && v["tenant"] == "a" && v["status"] == "succeeded",
            "A reading its batch task {t}: {st} {v}"
        );
        let (st, v) = s
            .send_as(agentq_tests::ADMIN_TOKEN, reqwest::Method::GET, &path, None)
            .await?;
        ensure!(st == 200 && v["tenant"] == "a", "admin: {st} {v}");
        ensure!(
            hget(&s, &agentq_tests::task_key(t), "tenant")?.as_deref() == Some("a"),
            "task record {t} without its tenant"
        );
        let payload: Value = serde_json::from_str(
            &hget(&s, &agentq_tests::task_key(t), "payload")?.context("payload")?,
        )?;
        ensure!(payload["tenant"] == "a", "payload of {t}: {payload}");
    }
    // B's native calls on A's batch answer as for a batch that does not exist
    let missing = format!("batch_default.{}", "0".repeat(32));
    for id in [batch_a, missing.as_str()] {
        let (st, v) = s
            .send_as(&b, reqwest::Method::GET, &format!("/v1/batches/{id}"), None)
            .await?;
        ensure!(
            st == 404 && v["error"]["code"] == "batch_not_found",
            "{id}: {st} {v}"
        );
        let (st, v) = s
            .send_as(
                &b,
                reqwest::Method::POST,
                &format!("/v1/batches/{id}/cancel"),
                Some(&json!({})),
            )
            .await?;
        ensure!(
            st == 404 && v["error"]["code"] == "batch_not_found",
            "{id}: {st} {v}"
        );
    }
    let (st, v) = s
        .send_as(
            &b,
            reqwest::Method::POST,
            "/v1/batches",
            Some(&batch_body(file_a)),
        )
        .await?;
    ensure!(
        st == 404 && v["error"]["param"] == "input_file_id",
        "B batching A's file: {st} {v}"
    );
    // the records carry the tenant: the batch (whence the fan-out), the input and output files
    let batch_key = format!("agentq:{{default}}:batch:{batch_a}");
    ensure!(hget(&s, &batch_key, "tenant")?.as_deref() == Some("a"));
    ensure!(hget(&s, &format!("agentq:file:{{{file_a}}}"), "tenant")?.as_deref() == Some("a"));
    ensure!(hget(&s, &format!("agentq:file:{{{output_a}}}"), "tenant")?.as_deref() == Some("a"));
    ensure!(
        hget(
            &s,
            &format!(
                "agentq:{{default}}:batch:{}",
                summary["batch_b"].as_str().unwrap_or("")
            ),
            "tenant"
        )?
        .as_deref()
            == Some("b")
    );
    // the ended batch is collected from A's index too once its record's time is up
    let member = format!("{batch_a}~a");
    let deadline = Instant::now() + Duration::from_secs(5);
    while zscore(&s, "agentq:batches:gc", &member)?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "{member} never entered batches:gc"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(zscore(&s, "agentq:batches:tenant:a", batch_a)?.is_some());
    {
        let mut c = s.redis.conn()?;
        let _: i64 = redis::cmd("ZADD")
            .arg("agentq:batches:gc")
            .arg("XX")
            .arg(0)
            .arg(&member)
            .query(&mut c)?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while zscore(&s, "agentq:batches:tenant:a", batch_a)?.is_some()
        || zscore(&s, "agentq:batches", batch_a)?.is_some()
    {
        ensure!(
            Instant::now() < deadline,
            "the collection left {batch_a} in the indexes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(zscore(&s, "agentq:batches:gc", &member)?.is_none());
    let (st, v) = s
        .send_as(&a, reqwest::Method::GET, "/v1/batches", None)
        .await?;
    ensure!(
        st == 200 && v["data"].as_array().is_some_and(Vec::is_empty),
        "{st} {v}"
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_one_submission_against_its_tenants_quota() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api_auth(&[]).await?;
    let q = s
        .tenant(&json!({"id": "q", "quotas": {"enqueue_rate": 0.001, "enqueue_burst": 1}}))
        .await?;
    let other = s.tenant(&json!({"id": "other"})).await?;
    let (st, v) = upload_as(&s, &other, &jsonl(&[request("o", "other's line")])).await?;
    ensure!(st == 200, "{st} {v}");
    let others = v["id"].as_str().context("id")?.to_owned();
    // uploads are not submissions: two are fine
    let mut mine = Vec::new();
    for i in 0..2 {
        let (st, v) =
            upload_as(&s, &q, &jsonl(&[request("x", &format!("quota line {i}"))])).await?;
        ensure!(st == 200 && v["purpose"] == "batch", "{st} {v}");
        mine.push(v["id"].as_str().context("id")?.to_owned());
    }
    // another tenant's file: 404 before the quota is looked at, so it costs nothing
    let (st, v) = s
        .send_as(
            &q,
            reqwest::Method::POST,
            "/v1/batches",
            Some(&batch_body(&others)),
        )
        .await?;
    ensure!(
        st == 404 && v["error"]["code"] == "file_not_found",
        "{st} {v}"
    );
    let (st, v) = s
        .send_as(
            &q,
            reqwest::Method::POST,
            "/v1/batches",
            Some(&batch_body(&mine[0])),
        )
        .await?;
    ensure!(st == 200 && v["status"] == "validating", "{st} {v}");
    // the burst is spent: the next batch is refused in OpenAI's shape and writes nothing
    let r = s
        .http
        .post(format!("{}/v1/batches", s.api_url))
        .bearer_auth(&q)
        .json(&batch_body(&mine[1]))
        .send()
        .await?;
    let st = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<u64>().ok());
    let v: Value = r.json().await?;
    ensure!(
        st == 429 && v["error"]["type"] == "rate_limit_error" && retry_after.is_some_and(|s| s > 0),
        "{st} {retry_after:?} {v}"
    );
    let (_, list) = s
        .send_as(&q, reqwest::Method::GET, "/v1/batches", None)
        .await?;
    ensure!(list["data"].as_array().map(Vec::len) == Some(1), "{list}");
    let mut c = s.redis.conn()?;
    let live: i64 = redis::cmd("ZCARD")
        .arg("agentq:batches:live")
        .query(&mut c)?;
    let users: i64 = redis::cmd("SCARD")
        .arg(format!("agentq:file:{{{}}}:users", mine[1]))
        .query(&mut c)?;
    ensure!(
        live == 1 && users == 0,
        "live {live}, users of the refused file {users}"
    );
    // the other tenant sees none of it
    let (_, list) = s
        .send_as(&other, reqwest::Method::GET, "/v1/batches", None)
        .await?;
    ensure!(list["data"].as_array().is_some_and(Vec::is_empty), "{list}");
    let (_, files) = s
        .send_as(&other, reqwest::Method::GET, "/v1/files", None)
        .await?;
    let ids: Vec<&str> = files["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|f| f["id"].as_str()).collect())
        .unwrap_or_default();
    ensure!(ids == vec![others.as_str()], "{files}");
    assert_no_panic(&s);
    Ok(())
}
