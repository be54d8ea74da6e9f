//! Issue 15, workflows end to end with a private redis-server, the api and worker binaries and
//! the mock LLM: a chain passes outputs, a fan-out of 50 joins all 50, a plan spawns children
//! and a join, each failure policy, cascading cancel aborts the calls in flight, a worker killed
//! mid-workflow costs only the calls it had in flight, bad graphs are refused with nothing
//! written, a workflow's max_cost_usd holds, and a 1,000-node fan-out's bookkeeping stays under
//! 1 ms of Redis time per node.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentq_tests::{assert_no_panic, log_tails, MockConfig, Stack};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

fn recording() -> MockConfig {
    MockConfig {
        record: true,
        ..MockConfig::default()
    }
}

async fn post_workflow(s: &Stack, body: &Value) -> Result<(u16, Value)> {
    let r = s
        .http
        .post(format!("{}/v1/workflows", s.api_url))
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn submit(s: &Stack, body: &Value) -> Result<String> {
    let (status, v) = post_workflow(s, body).await?;
    ensure!(status == 202, "POST /v1/workflows answered {status}: {v}");
    ensure!(v["status"] == "running", "{v}");
    v["id"].as_str().map(str::to_owned).context("no id")
}

/// `DELETE` of an api path; returns the status.
async fn delete(s: &Stack, path: &str) -> Result<u16> {
    let r = s.http.delete(format!("{}{path}", s.api_url)).send().await?;
    Ok(r.status().as_u16())
}

async fn workflow(s: &Stack, id: &str) -> Result<Value> {
    let (status, v) = s.get_json(&format!("/v1/workflows/{id}")).await?;
    ensure!(status == 200, "GET workflow {id}: {status} {v}");
    Ok(v)
}

async fn wait_workflow(s: &Stack, id: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = workflow(s, id).await?;
        if v["status"] != "running" {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!(
                "workflow {id} still running after {timeout:?}: {v}\n{}",
                log_tails(s)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn nodes(v: &Value) -> HashMap<String, Value> {
    v["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| (n["id"].as_str().unwrap_or("").to_owned(), n.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// A timestamp field of a task's record, in ms (the views' RFC 3339 strings do not sort).
fn ms(s: &Stack, task_id: &Value, field: &str) -> Result<i64> {
    let id = task_id.as_str().context("task id")?;
    let v: Option<i64> = redis::cmd("HGET")
        .arg(agentq_tests::task_key(id))
        .arg(field)
        .query(&mut s.redis.conn()?)?;
    v.with_context(|| format!("{field} of {id}"))
}

/// The prompts the mock answered, with their call counts (recording on).
fn prompts_seen(s: &Stack) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in s.mock.request_records() {
        *out.entry(r.prompt).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_passes_outputs_and_fields() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let id = submit(
        &s,
        &json!({
            "metadata": {"run": "chain"},
            "nodes": [
                {"id": "research", "prompt": "research tides [[say:{\"topic\": \"tides\", \"facts\": [\"moon\", 2]}]]"},
                {"id": "write", "depends_on": ["research"],
                 "prompt": "write about {{nodes.research.output.topic}} with {{ nodes.research.output.facts.0 }}"},
                {"id": "edit", "depends_on": ["write"], "messages": [
                    {"role": "system", "content": "you edit"},
                    {"role": "user", "content": [{"type": "text", "text": "edit ({{nodes.write.status}}): {{nodes.write.output}}"}]}
                ]}
            ]
        }),
    )
    .await?;
    let v = wait_workflow(&s, &id, Duration::from_secs(20)).await?;
    ensure!(v["status"] == "succeeded", "{v}");
    ensure!(v["metadata"]["run"] == "chain", "{v}");
    let n = nodes(&v);
    ensure!(
        n["research"]["output"] == "{\"topic\": \"tides\", \"facts\": [\"moon\", 2]}",
        "{v}"
    );
    ensure!(
        n["write"]["output"] == "echo: write about tides with moon",
        "{v}"
    );
    ensure!(
        n["edit"]["output"] == "echo: edit (succeeded): echo: write about tides with moon",
        "{v}"
    );
    ensure!(n["edit"]["depends_on"] == json!(["write"]), "{v}");
    // one call per node, each with the rendered text (the system message untouched)
    let seen = prompts_seen(&s);
    ensure!(
        seen.len() == 3 && seen.values().all(|c| *c == 1),
        "{seen:?}"
    );
    let edit = s.request_bodies("edit (succeeded): echo: write about tides with moon");
    ensure!(edit.len() == 1, "{seen:?}");
    ensure!(
        edit[0]["messages"][0]["content"] == "you edit",
        "{}",
        edit[0]
    );
    // usage and cost add up over the nodes; each node's task links back
    let calls: u64 = v["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .map(|n| n["usage"]["calls"].as_u64().unwrap_or(0))
        .sum();
    ensure!(calls == 3 && v["usage"]["calls"] == 3, "{v}");
    let tokens: u64 = v["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .map(|n| n["usage"]["total_tokens"].as_u64().unwrap_or(0))
        .sum();
    ensure!(v["usage"]["total_tokens"] == tokens && tokens > 0, "{v}");
    let task = s
        .task(n["write"]["task_id"].as_str().context("task id")?)
        .await?;
    ensure!(task["workflow"]["workflow_id"] == id.as_str(), "{task}");
    ensure!(task["workflow"]["node"] == "write", "{task}");
    // the dependent ran only after its parent was final
    ensure!(
        ms(&s, &n["write"]["task_id"], "started_at")?
            >= ms(&s, &n["research"]["task_id"], "finished_at")?,
        "{v}"
    );
    // the same Idempotency-Key gives the same workflow back, and writes nothing
    let again = |key: &'static str| {
        s.http
            .post(format!("{}/v1/workflows", s.api_url))
            .header("idempotency-key", key)
            .json(&json!({"nodes": [{"id": "once", "prompt": "only once"}]}))
            .send()
    };
    let first: Value = again("wf-key-1").await?.json().await?;
    let r = again("wf-key-1").await?;
    ensure!(
        r.headers().get("idempotent-replayed").is_some(),
        "{:?}",
        r.headers()
    );
    let second: Value = r.json().await?;
    ensure!(first["id"] == second["id"], "{first} {second}");
    let done = wait_workflow(
        &s,
        first["id"].as_str().context("id")?,
        Duration::from_secs(10),
    )
    .await?;
    ensure!(done["status"] == "succeeded", "{done}");
    ensure!(
        s.mock.calls("only once") == 1,
        "{}",
        s.mock.calls("only once")
    );
    // a finished workflow cannot be cancelled
    let status = delete(&s, &format!("/v1/workflows/{id}")).await?;
    ensure!(status == 409, "{status}");
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_of_50_joins_all_50() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "16")]).await?;
    // the parts finish in a scattered order
    s.mock.set_latency(Duration::from_millis(30));
    let mut list: Vec<Value> = (0..50)
        .map(|i| json!({"id": format!("part{i}"), "prompt": format!("part {i}")}))
        .collect();
    let parents: Vec<String> = (0..50).map(|i| format!("part{i}")).collect();
    list.push(json!({"id": "join", "depends_on": parents, "prompt": "combine {{parents}}"}));
    let id = submit(&s, &json!({"nodes": list})).await?;
    let v = wait_workflow(&s, &id, Duration::from_secs(30)).await?;
    ensure!(v["status"] == "succeeded", "{v}");
    let joined: Vec<_> = s
        .mock
        .request_records()
        .into_iter()
        .filter(|r| r.prompt.starts_with("combine "))
        .collect();
    ensure!(joined.len() == 1, "the join ran {} times", joined.len());
    let seen: Value = serde_json::from_str(&joined[0].prompt["combine ".len()..])?;
    let seen = seen.as_object().context("object")?;
    ensure!(seen.len() == 50, "{seen:?}");
    for i in 0..50 {
        let want = format!("echo: part {i}");
        ensure!(
            seen[&format!("part{i}")] == want.as_str(),
            "part{i}: {seen:?}"
        );
    }
    let counts = prompts_seen(&s);
    ensure!(
        counts.len() == 51 && counts.values().all(|c| *c == 1),
        "{counts:?}"
    );
    // the join started after the last part finished
    let n = nodes(&v);
    let join = ms(&s, &n["join"]["task_id"], "started_at")?;
    for i in 0..50 {
        let part = ms(&s, &n[&format!("part{i}")]["task_id"], "finished_at")?;
        ensure!(
            join >= part,
            "part{i} finished at {part}, the join started at {join}"
        );
    }
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_spawns_children_and_a_join_and_a_bad_plan_fails_its_node() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "8")]).await?;
    let plan = r#"[[say:{"subtasks": [{"prompt": "child one"}, {"prompt": "child two", "model": "mock-gpt"}, {"prompt": "child three", "agent_id": "helper"}]}]]"#;
    let good = submit(
        &s,
        &json!({"nodes": [
            {"id": "plan", "kind": "plan", "max_children": 3, "prompt": format!("break it down {plan}")},
            {"id": "join", "depends_on": ["plan"], "prompt": "summary {{parents}}"}
        ]}),
    )
    .await?;
    let bad = submit(
        &s,
        &json!({"nodes": [
            {"id": "plan", "kind": "plan", "max_children": 2, "prompt": format!("too many {plan}")},
            {"id": "join", "depends_on": ["plan"], "prompt": "never {{parents}}"}
        ]}),
    )
    .await?;
    let not_json = submit(
        &s,
        &json!({"nodes": [
            {"id": "plan", "kind": "plan", "prompt": "no plan at all"},
            {"id": "join", "depends_on": ["plan"], "prompt": "never either {{parents}}"}
        ]}),
    )
    .await?;
    let v = wait_workflow(&s, &good, Duration::from_secs(20)).await?;
    ensure!(v["status"] == "succeeded", "{v}");
    let n = nodes(&v);
    ensure!(n.len() == 5, "{v}");
    ensure!(n["plan"]["kind"] == "plan", "{v}");
    for (i, p) in ["child one", "child two", "child three"].iter().enumerate() {
        let c = &n[&format!("plan.{}", i + 1)];
        ensure!(c["status"] == "succeeded", "{v}");
        ensure!(c["output"] == format!("echo: {p}").as_str(), "{v}");
        ensure!(c["spawned_by"] == "plan", "{v}");
    }
    let child3 = s
        .task(n["plan.3"]["task_id"].as_str().context("id")?)
        .await?;
    ensure!(child3["agent_id"] == "helper", "{child3}");
    let joined: Vec<_> = s
        .mock
        .request_records()
        .into_iter()
        .filter(|r| r.prompt.starts_with("summary "))
        .collect();
    ensure!(joined.len() == 1, "{}", joined.len());
    let seen: Value = serde_json::from_str(&joined[0].prompt["summary ".len()..])?;
    ensure!(seen["plan.1"] == "echo: child one", "{seen}");
    ensure!(seen["plan.2"] == "echo: child two", "{seen}");
    ensure!(seen["plan.3"] == "echo: child three", "{seen}");
    ensure!(
        seen["plan"]
            .as_str()
            .is_some_and(|p| p.contains("subtasks")),
        "{seen}"
    );

    for (id, want) in [(&bad, "more than max_children 2"), (&not_json, "not JSON")] {
        let v = wait_workflow(&s, id, Duration::from_secs(20)).await?;
        ensure!(v["status"] == "failed", "{v}");
        let n = nodes(&v);
        ensure!(n.len() == 2, "no child spawned: {v}");
        ensure!(n["plan"]["status"] == "failed", "{v}");
        let e = n["plan"]["error"].as_str().unwrap_or("");
        ensure!(e.starts_with("invalid_plan: ") && e.contains(want), "{v}");
        ensure!(n["join"]["status"] == "cancelled", "{v}");
        ensure!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("node plan failed")),
            "{v}"
        );
        let task = s.task(n["plan"]["task_id"].as_str().context("id")?).await?;
        ensure!(task["error_code"] == "invalid_plan", "{task}");
        ensure!(task["attempts"] == 1, "not retried: {task}");
        ensure!(
            task["usage"]["calls"] == 1,
            "the plan's call counted: {task}"
        );
    }
    let counts = prompts_seen(&s);
    ensure!(
        !counts.keys().any(|p| p.starts_with("never")),
        "a join after an invalid plan ran: {counts:?}"
    );
    ensure!(counts.values().all(|c| *c == 1), "{counts:?}");
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_policy_does_what_it_says() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "8")]).await?;
    // fail_workflow (the default): the sibling running a long call is cancelled and its call
    // dropped, the dependent never runs
    let failing = submit(
        &s,
        &json!({"nodes": [
            {"id": "slow", "prompt": "slow sibling [[sleep:20000]]"},
            {"id": "bad", "prompt": "bad one [[sleep:300]][[fail:400]]"},
            {"id": "after", "depends_on": ["bad", "slow"], "prompt": "after bad {{nodes.bad.output}}"}
        ]}),
    )
    .await?;
    // continue: the dependent runs and sees the failure
    let cont = submit(
        &s,
        &json!({"nodes": [
            {"id": "a", "prompt": "flaky a [[fail:400]]", "on_failure": "continue"},
            {"id": "b", "depends_on": ["a"], "prompt": "b saw {{nodes.a.status}} [{{nodes.a.output}}] {{parents}}"}
        ]}),
    )
    .await?;
    // skip: every descendant is skipped, the rest goes on
    let skip = submit(
        &s,
        &json!({"nodes": [
            {"id": "a", "prompt": "skipper a [[fail:400]]", "on_failure": "skip"},
            {"id": "b", "depends_on": ["a"], "prompt": "skipped b {{nodes.a.output}}"},
            {"id": "c", "depends_on": ["b"], "prompt": "skipped c {{nodes.b.output}}"},
            {"id": "other", "prompt": "independent"},
            {"id": "last", "depends_on": ["other"], "prompt": "last {{nodes.other.output}}"}
        ]}),
    )
    .await?;

    let v = wait_workflow(&s, &failing, Duration::from_secs(15)).await?;
    ensure!(v["status"] == "failed", "{v}");
    let e = v["error"].as_str().unwrap_or("");
    ensure!(e.starts_with("node bad failed"), "{v}");
    let n = nodes(&v);
    ensure!(n["bad"]["status"] == "failed", "{v}");
    ensure!(n["slow"]["status"] == "cancelled", "{v}");
    ensure!(n["after"]["status"] == "cancelled", "{v}");
    let slow = s.task(n["slow"]["task_id"].as_str().context("id")?).await?;
    ensure!(
        slow["status"] == "cancelled" && slow["result"].is_null(),
        "{slow}"
    );
    // the slow call was dropped, not waited for
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.mock.aborted() < 1 {
        ensure!(
            Instant::now() < deadline,
            "the sibling's call was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let v = wait_workflow(&s, &cont, Duration::from_secs(15)).await?;
    ensure!(v["status"] == "succeeded", "{v}");
    let n = nodes(&v);
    ensure!(
        n["a"]["status"] == "failed" && n["b"]["status"] == "succeeded",
        "{v}"
    );
    ensure!(
        n["b"]["output"] == "echo: b saw failed [] {\"a\":null}",
        "{v}"
    );

    let v = wait_workflow(&s, &skip, Duration::from_secs(15)).await?;
    ensure!(v["status"] == "succeeded", "{v}");
    let n = nodes(&v);
    ensure!(n["a"]["status"] == "failed", "{v}");
    ensure!(
        n["b"]["status"] == "skipped" && n["c"]["status"] == "skipped",
        "{v}"
    );
    ensure!(
        n["c"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("node a failed")),
        "{v}"
    );
    ensure!(n["last"]["output"] == "echo: last echo: independent", "{v}");
    let b = s.task(n["b"]["task_id"].as_str().context("id")?).await?;
    ensure!(b["status"] == "cancelled" && b["attempts"] == 0, "{b}");

    let counts = prompts_seen(&s);
    for never in ["after bad", "skipped b", "skipped c"] {
        ensure!(
            !counts.keys().any(|p| p.starts_with(never)),
            "{never} ran: {counts:?}"
        );
    }
    ensure!(counts.values().all(|c| *c == 1), "{counts:?}");
    ensure!(s.mock.aborted() == 1, "{}", s.mock.aborted());
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_workflow_drops_its_calls_in_flight() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w = s
        .start_worker(&[
            ("WORKER_CONCURRENCY", "4"),
            ("AGENTQ_LLM_TIMEOUT_SECS", "60"),
        ])
        .await?;
    let id = submit(
        &s,
        &json!({"nodes": [
            {"id": "a", "prompt": "long a [[sleep:30000]]"},
            {"id": "b", "prompt": "long b [[sleep:30000]]"},
            {"id": "c", "depends_on": ["a", "b"], "prompt": "never c {{parents}}"}
        ]}),
    )
    .await?;
    s.wait_calls("long a [[sleep:30000]]", 1, Duration::from_secs(10))
        .await?;
    s.wait_calls("long b [[sleep:30000]]", 1, Duration::from_secs(10))
        .await?;
    let status = delete(&s, &format!("/v1/workflows/{id}")).await?;
    ensure!(status == 200, "{status}");
    let cancelled_at = Instant::now();
    while s.mock.aborted() < 2 {
        ensure!(
            cancelled_at.elapsed() < Duration::from_secs(3),
            "calls dropped: {} of 2\n{}",
            s.mock.aborted(),
            log_tails(&s)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = workflow(&s, &id).await?;
    ensure!(v["status"] == "cancelled", "{v}");
    ensure!(v["error"] == "cancelled by request", "{v}");
    let n = nodes(&v);
    for node in ["a", "b", "c"] {
        ensure!(n[node]["status"] == "cancelled", "{node}: {v}");
    }
    // nothing is written afterwards
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in ["a", "b", "c"] {
        let t = s.task(n[node]["task_id"].as_str().context("id")?).await?;
        ensure!(t["status"] == "cancelled" && t["result"].is_null(), "{t}");
    }
    let counts = prompts_seen(&s);
    ensure!(
        counts.len() == 2 && counts.values().all(|c| *c == 1),
        "{counts:?}"
    );
    let q = s.queue("default").await?;
    ensure!(q["inflight"] == 0, "{q}");
    // a node cancelled on its own (DELETE /v1/tasks/{id}) is a failure of that node: with
    // `continue`, its dependent runs and sees it
    let one = submit(
        &s,
        &json!({"nodes": [
            {"id": "a", "prompt": "long one [[sleep:30000]]", "on_failure": "continue"},
            {"id": "b", "depends_on": ["a"], "prompt": "b saw {{nodes.a.status}}: {{nodes.a.error}}"}
        ]}),
    )
    .await?;
    s.wait_calls("long one [[sleep:30000]]", 1, Duration::from_secs(10))
        .await?;
    let a = nodes(&workflow(&s, &one).await?)["a"]["task_id"]
        .as_str()
        .context("id")?
        .to_owned();
    let status = delete(&s, &format!("/v1/tasks/{a}")).await?;
    ensure!(status == 200, "{status}");
    let v = wait_workflow(&s, &one, Duration::from_secs(10)).await?;
    ensure!(v["status"] == "succeeded", "{v}");
    let n = nodes(&v);
    ensure!(n["a"]["status"] == "cancelled", "{v}");
    ensure!(
        n["b"]["output"] == "echo: b saw cancelled: cancelled by request",
        "{v}"
    );
    ensure!(s.mock.aborted() == 3, "{}", s.mock.aborted());
    // cancelling again: 409
    let status = delete(&s, &format!("/v1/workflows/{id}")).await?;
    ensure!(status == 409, "{status}");
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_workflow_costs_only_its_calls_in_flight() -> Result<()> {
    let mut s = Stack::new(MockConfig {
        record: true,
        journal: true,
        ..MockConfig::default()
    })
    .await?;
    s.start_api(&[]).await?;
    let mut first = s.start_worker(&[("WORKER_CONCURRENCY", "3")]).await?;
    // every call takes 2.5 s, so the three in flight are still in flight at the kill
    s.mock.set_latency(Duration::from_millis(2500));
    let mut list: Vec<Value> = vec![json!({"id": "root", "prompt": "root step"})];
    for i in 0..6 {
        list.push(json!({"id": format!("w{i}"), "depends_on": ["root"], "prompt": format!("work {i} on {{{{nodes.root.output}}}}")}));
    }
    list.push(json!({"id": "join", "depends_on": ["w0", "w1", "w2", "w3", "w4", "w5"], "prompt": "join {{parents}}"}));
    let id = submit(&s, &json!({"nodes": list})).await?;
    // three calls in flight on the first worker, then it dies
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.mock.arrivals().len() < 4 {
        ensure!(Instant::now() < deadline, "calls never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.proc.sigkill();
    let _second = s.start_worker(&[("WORKER_CONCURRENCY", "3")]).await?;
    let v = wait_workflow(&s, &id, Duration::from_secs(40)).await?;
    ensure!(v["status"] == "succeeded", "{v}");
    let counts = prompts_seen(&s);
    ensure!(counts.len() == 8, "{counts:?}");
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c == 2).collect();
    ensure!(
        twice.len() == 3 && counts.values().all(|c| *c <= 2),
        "only the three interrupted calls are made again: {counts:?}"
    );
    ensure!(
        twice.iter().all(|(p, _)| p.starts_with("work ")),
        "{twice:?}"
    );
    ensure!(
        counts
            .iter()
            .any(|(p, c)| p.starts_with("join ") && *c == 1),
        "{counts:?}"
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_graphs_are_refused_with_nothing_written() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"id": format!("n{i}"), "prompt": "x"}))
        .collect();
    let cases = [
        (
            json!({"nodes": [{"id": "a", "depends_on": ["b"], "prompt": "x"}, {"id": "b", "depends_on": ["a"], "prompt": "y"}]}),
            "nodes[0].depends_on",
        ),
        (
            json!({"nodes": [{"id": "a", "depends_on": ["ghost"], "prompt": "x"}]}),
            "nodes[0].depends_on[0]",
        ),
        (
            json!({"nodes": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]}),
            "nodes[1].id",
        ),
        (
            json!({"nodes": [{"id": "a", "prompt": "x"}, {"id": "b", "depends_on": ["a"], "prompt": "{{nodes.c.output}}"}]}),
            "nodes[1].prompt",
        ),
        (
            json!({"nodes": [{"id": "a", "prompt": "{{ nodes.a.output "}]}),
            "nodes[0].prompt",
        ),
        (
            json!({"nodes": [{"id": "a", "prompt": "x", "queue": "elsewhere"}]}),
            "nodes[0].queue",
        ),
        (
            json!({"nodes": [{"id": "a", "messages": []}]}),
            "nodes[0].messages",
        ),
        (
            json!({"nodes": [{"id": "a", "prompt": "x", "model": "no such model!"}]}),
            "nodes[0].model",
        ),
        (json!({"nodes": too_many}), "nodes"),
        (
            json!({"nodes": [{"id": "a", "prompt": "x"}], "extra": 1}),
            "extra",
        ),
        (json!({"nodes": "a"}), "nodes"),
    ];
    for (body, field) in cases {
        let (status, v) = post_workflow(&s, &body).await?;
        ensure!(status == 422, "{status} {v} for {body}");
        ensure!(v["error"]["field"] == field, "want {field}: {v}");
    }
    let mut conn = s.redis.conn()?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("agentq:*").query(&mut conn)?;
    ensure!(
        keys.iter().all(|k| !k.contains(":task:")
            && !k.contains(":wf:")
            && !k.ends_with(":pending")
            && !k.contains(":pending:")),
        "written: {keys:?}"
    );
    for path in [
        "/v1/workflows/default.0192f3a4-5b6c-7d8e-9f00-112233445566",
        "/v1/workflows/nonsense",
    ] {
        let (status, v) = s.get_json(path).await?;
        ensure!(
            status == 404 && v["error"]["code"] == "not_found",
            "{status} {v}"
        );
        let status = delete(&s, path).await?;
        ensure!(status == 404, "{status}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflows_max_cost_caps_the_whole_run() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.env.insert("AGENTQ_MODEL".into(), "m".into());
    s.env.insert(
        "AGENTQ_PRICES".into(),
        r#"{"m": {"prompt": 1000, "completion": 1000}}"#.into(),
    );
    s.env.insert("AGENTQ_MAX_TOKENS".into(), "10".into());
    s.env.insert("AGENTQ_MEMORY_MESSAGES".into(), "0".into());
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "4")]).await?;
    // each call costs about $0.007 and holds about $0.015: $0.05 pays for a few, never all 12
    let list: Vec<Value> = (0..12)
        .map(|i| json!({"id": format!("n{i}"), "prompt": format!("cost {i} [[sleep:100]]"), "on_failure": "continue"}))
        .collect();
    let id = submit(&s, &json!({"nodes": list, "max_cost_usd": 0.05})).await?;
    let v = wait_workflow(&s, &id, Duration::from_secs(20)).await?;
    ensure!(v["status"] == "succeeded", "{v}");
    ensure!(v["max_cost_usd"] == 0.05, "{v}");
    let cost = v["cost"].as_f64().context("cost")?;
    ensure!(cost > 0.0 && cost <= 0.05 + 1e-9, "the cap held: {v}");
    let n = nodes(&v);
    let ok = n.values().filter(|x| x["status"] == "succeeded").count();
    let refused: Vec<_> = n
        .values()
        .filter(|x| {
            x["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("budget_exceeded: workflow"))
        })
        .collect();
    ensure!(
        ok >= 2 && !refused.is_empty() && ok + refused.len() == 12,
        "{v}"
    );
    ensure!(
        s.mock.request_records().len() == ok,
        "one call per node that ran: {v}"
    );
    assert_no_panic(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_node_fan_out_costs_redis_under_a_millisecond_a_node() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[("WORKER_CONCURRENCY", "64")]).await?;
    let mut list: Vec<Value> = vec![json!({"id": "root", "prompt": "fan"})];
    let parents: Vec<String> = (0..998).map(|i| format!("n{i}")).collect();
    for p in &parents {
        list.push(json!({"id": p, "depends_on": ["root"], "prompt": format!("leaf {p}")}));
    }
    list.push(json!({"id": "join", "depends_on": parents, "prompt": "count {{parents}}"}));
    let mut conn = s.redis.conn()?;
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut conn)?;
    let started = Instant::now();
    let id = submit(&s, &json!({"nodes": list})).await?;
    let key = format!("agentq:{{default}}:wf:{id}");
    // polled with one HGET, so the test's own reads cost Redis next to nothing
    loop {
        let status: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("status")
            .query(&mut conn)?;
        if status.as_deref() != Some("running") {
            ensure!(status.as_deref() == Some("succeeded"), "{status:?}");
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "still running\n{}",
            log_tails(&s)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut conn)?;
    let usec: f64 = info
        .lines()
        .filter_map(|l| l.split("usec=").nth(1))
        .filter_map(|r| r.split(',').next())
        .filter_map(|u| u.parse::<f64>().ok())
        .sum();
    let per_node = usec / 1000.0;
    eprintln!(
        "1000-node fan-out: {:.1} s, Redis busy {:.1} ms in all, {per_node:.1} us a node (tasks included)",
        started.elapsed().as_secs_f64(),
        usec / 1000.0
    );
    ensure!(per_node < 1000.0, "{per_node} us of Redis time a node");
    let v = workflow(&s, &id).await?;
    ensure!(v["nodes"].as_array().map(Vec::len) == Some(1000), "nodes");
    ensure!(v["usage"]["calls"] == 1000, "{}", v["usage"]);
    ensure!(s.mock.total_calls() == 1000, "{}", s.mock.total_calls());
    assert_no_panic(&s);
    Ok(())
}
