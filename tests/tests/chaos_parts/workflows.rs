//! Workflows under chaos: a few dozen small graphs (3 to 7 nodes, random edges, every failure
//! policy, the same fault markers as the tasks) are submitted during the chaos phase, some are
//! cancelled, and at the end every one is checked against the invariants of the workflow state
//! machine (docs/architecture.md, "Workflows"):
//! - every acknowledged workflow ends, and every node of it is final (`open` is 0);
//! - a node's state agrees with its task's status;
//! - no node is called before each of its parents' tasks finished, and the parent statuses its
//!   template read were final ones;
//! - a skipped node is never called;
//! - `succeeded` means no `fail_workflow` node failed; `failed` names a `fail_workflow` node that did;
//! - a DELETE answered 200 ends the workflow `cancelled`.

use std::collections::HashMap;
use std::time::{Duration, Instant, UNIX_EPOCH};

use agentq_mock_llm::CallArrival;
use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::PREFIX;

pub struct WfSpec {
    pub w: usize,
    pub body: Value,
    pub send_at: Duration,
    pub cancel_after: Option<Duration>,
    /// node → its parents
    pub parents: HashMap<String, Vec<String>>,
    /// node → on_failure
    pub policy: HashMap<String, &'static str>,
}

/// The workflows of a seed, from their own random stream (the tasks of a seed stay the same).
pub fn plan(seed: u64, secs: u64, tasks: usize) -> Vec<WfSpec> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5746_4c4f_5753);
    let count = (tasks / 50).max(2);
    let span = Duration::from_secs(secs).mul_f64(0.8);
    (0..count)
        .map(|w| {
            let n = rng.random_range(3..=7usize);
            let mut nodes = Vec::with_capacity(n);
            let mut parents = HashMap::new();
            let mut policy = HashMap::new();
            for i in 0..n {
                let id = format!("n{i}");
                let mut ps: Vec<String> = Vec::new();
                if i > 0 && rng.random_bool(0.8) {
                    for _ in 0..rng.random_range(1..=2usize) {
                        let p = format!("n{}", rng.random_range(0..i));
                        if !ps.contains(&p) {
                            ps.push(p);
                        }
                    }
                }
                let on_failure = match rng.random_range(0..100u32) {
                    0..60 => "fail_workflow",
                    60..80 => "continue",
                    _ => "skip",
                };
                let marker = match rng.random_range(0..100u32) {
                    0..45 => String::new(),
                    45..60 => format!(
                        "[[fail:{}:{}]]",
                        if rng.random_bool(0.5) { 500 } else { 503 },
                        rng.random_range(1..=2u32)
                    ),
                    60..68 => format!("[[fail:429:{}]]", rng.random_range(1..=3u32)),
                    68..74 => "[[fail:400]]".to_owned(),
                    74..77 => "[[hang:1]]".to_owned(),
                    77..80 => "[[drop:1]]".to_owned(),
                    _ => format!("[[sleep:{}]]", rng.random_range(100..=1200u32)),
                };
                // the templates say which parent states the node was run with
                let reads: String = ps
                    .iter()
                    .map(|p| format!(" {p}={{{{nodes.{p}.status}}}}"))
                    .collect();
                nodes.push(json!({
                    "id": id,
                    "depends_on": ps,
                    "on_failure": on_failure,
                    "prompt": format!("{} {marker} |{reads}", prefix(seed, w, &id)),
                    "max_attempts": rng.random_range(2..=4u32),
                }));
                parents.insert(id.clone(), ps);
                policy.insert(id, on_failure);
            }
            WfSpec {
                w,
                body: json!({"nodes": nodes, "metadata": {"chaos": w}}),
                send_at: span.mul_f64(w as f64 / count as f64),
                cancel_after: rng
                    .random_bool(0.1)
                    .then(|| Duration::from_millis(rng.random_range(0..4000))),
                parents,
                policy,
            }
        })
        .collect()
}

/// A workflow node's prompt (checked here, not with the tasks').
pub fn is_node_prompt(p: &str) -> bool {
    p.split_whitespace().nth(2) == Some("wf")
}

fn prefix(seed: u64, w: usize, node: &str) -> String {
    format!("chaos {seed} wf {w} node {node}:")
}

#[derive(Debug, Default, Clone)]
pub struct WfSubmission {
    pub w: usize,
    pub id: Option<String>,
    pub posts: u32,
    /// A DELETE was answered 200.
    pub cancelled: bool,
    pub problems: Vec<String>,
}

/// POSTs one workflow until a 202 (same `Idempotency-Key` on every retry), then maybe cancels it.
pub async fn submit(
    http: reqwest::Client,
    api: String,
    seed: u64,
    spec: &WfSpec,
    give_up: Instant,
) -> WfSubmission {
    let mut sub = WfSubmission {
        w: spec.w,
        ..WfSubmission::default()
    };
    let key = format!("chaos-{seed}-wf-{}", spec.w);
    loop {
        sub.posts += 1;
        let reply = http
            .post(format!("{api}/v1/workflows"))
            .header("idempotency-key", &key)
            .json(&spec.body)
            .send()
            .await;
        if let Ok(r) = reply {
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            match status {
                202 => {
                    sub.id = v["id"].as_str().map(str::to_owned);
                    if sub.id.is_none() {
                        sub.problems
                            .push(format!("workflow {}: 202 without an id: {v}", spec.w));
                    }
                    break;
                }
                503 => {}
                _ => {
                    sub.problems.push(format!(
                        "workflow {}: POST /v1/workflows answered {status}: {v}",
                        spec.w
                    ));
                    if status < 500 {
                        break;
                    }
                }
            }
        }
        if Instant::now() > give_up {
            sub.problems.push(format!(
                "workflow {}: never acknowledged after {} POSTs",
                spec.w, sub.posts
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (Some(id), Some(after)) = (sub.id.clone(), spec.cancel_after) else {
        return sub;
    };
    tokio::time::sleep(after).await;
    for _ in 0..5 {
        match http.delete(format!("{api}/v1/workflows/{id}")).send().await {
            Ok(r) if r.status().as_u16() == 200 => {
                sub.cancelled = true;
                break;
            }
            Ok(r) if r.status().as_u16() == 409 => break,
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    sub
}

/// Waits until every workflow is closed; returns those that never were.
pub async fn wait_closed(
    client: &redis::Client,
    ids: &[String],
    limit: Duration,
) -> Result<Vec<String>> {
    let deadline = Instant::now() + limit;
    loop {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGET")
                .arg(format!("{PREFIX}wf:{id}"))
                .arg("status");
        }
        let st: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
        let open: Vec<String> = ids
            .iter()
            .zip(st)
            .filter(|(_, s)| s.as_deref() == Some("running") || s.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if open.is_empty() || Instant::now() > deadline {
            return Ok(open);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub struct WfReport {
    pub violations: Vec<String>,
    /// Every node task's id (they are task records beside the plain tasks').
    pub node_tasks: Vec<String>,
    /// Node tasks that ended `failed` (they are in the dead set).
    pub failed_tasks: Vec<String>,
    pub by_status: std::collections::BTreeMap<String, usize>,
    pub node_states: std::collections::BTreeMap<String, usize>,
}

type Record = HashMap<String, String>;

fn ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks every acknowledged workflow (see the module's list).
pub async fn check(
    client: &redis::Client,
    seed: u64,
    specs: &[WfSpec],
    subs: &[WfSubmission],
    arrivals: &[CallArrival],
) -> Result<WfReport> {
    let mut rep = WfReport {
        violations: Vec::new(),
        node_tasks: Vec::new(),
        failed_tasks: Vec::new(),
        by_status: Default::default(),
        node_states: Default::default(),
    };
    let mut conn = client.get_multiplexed_async_connection().await?;
    // no node of a workflow that was never acknowledged is ever called
    for sub in subs.iter().filter(|s| s.id.is_none()) {
        let pre = format!("chaos {seed} wf {} node ", sub.w);
        if let Some(a) = arrivals.iter().find(|a| a.prompt.starts_with(&pre)) {
            rep.violations.push(format!(
                "workflow {} was never acknowledged, yet its node was called: {:?}",
                sub.w, a.prompt
            ));
        }
    }
    for sub in subs {
        let Some(id) = sub.id.as_deref() else {
            continue;
        };
        let spec = &specs[sub.w];
        let h: Record = redis::cmd("HGETALL")
            .arg(format!("{PREFIX}wf:{id}"))
            .query_async(&mut conn)
            .await?;
        let mut tasks: HashMap<String, Record> = HashMap::new();
        for node in spec.parents.keys() {
            if let Some(tid) = h.get(&format!("t:{node}")) {
                let r: Record = redis::cmd("HGETALL")
                    .arg(format!("{PREFIX}task:{tid}"))
                    .query_async(&mut conn)
                    .await?;
                rep.node_tasks.push(tid.clone());
                if r.get("status").map(String::as_str) == Some("failed") {
                    rep.failed_tasks.push(tid.clone());
                }
                tasks.insert(node.clone(), r);
            }
        }
        *rep.by_status
            .entry(h.get("status").cloned().unwrap_or_default())
            .or_default() += 1;
        for node in spec.parents.keys() {
            let st = h.get(&format!("s:{node}")).cloned().unwrap_or_default();
            *rep.node_states.entry(st).or_default() += 1;
        }
        rep.violations.extend(
            check_one(seed, spec, sub.cancelled, &h, &tasks, arrivals)
                .into_iter()
                .map(|v| format!("workflow {} ({id}): {v}", sub.w)),
        );
    }
    Ok(rep)
}

/// The invariants of one closed workflow, from its hash, its nodes' task records and the mock's
/// arrivals. `cancelled`: a DELETE of it was answered 200.
pub fn check_one(
    seed: u64,
    spec: &WfSpec,
    cancelled: bool,
    h: &Record,
    tasks: &HashMap<String, Record>,
    arrivals: &[CallArrival],
) -> Vec<String> {
    let mut bad = Vec::new();
    let status = h.get("status").cloned().unwrap_or_default();
    if !matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
        bad.push(format!("not closed: status {status:?}"));
        return bad;
    }
    if h.get("open").map(String::as_str) != Some("0") {
        bad.push(format!("closed with open = {:?}", h.get("open")));
    }
    if cancelled && status != "cancelled" {
        bad.push(format!("DELETE answered 200 but it ended {status}"));
    }
    let state = |n: &str| h.get(&format!("s:{n}")).cloned().unwrap_or_default();
    let mut fail_workflow_failed: Vec<String> = Vec::new();
    let mut nodes: Vec<&String> = spec.parents.keys().collect();
    nodes.sort();
    for node in nodes {
        let Some(r) = tasks.get(node) else {
            bad.push(format!("node {node} has no task"));
            continue;
        };
        let s = state(node);
        let t = r.get("status").map_or("", String::as_str);
        let agrees = match s.as_str() {
            "succeeded" => t == "succeeded",
            "failed" => t == "failed",
            "cancelled" | "skipped" => t == "cancelled",
            _ => false,
        };
        if !agrees {
            bad.push(format!("node {node} is {s:?} but its task is {t:?}"));
        }
        if matches!(s.as_str(), "failed" | "cancelled") && spec.policy[node] == "fail_workflow" {
            fail_workflow_failed.push(node.clone());
        }
        // its calls: never before a parent finished, and reading only final parent states
        let pre = prefix(seed, spec.w, node);
        let calls: Vec<&CallArrival> = arrivals
            .iter()
            .filter(|a| a.prompt.starts_with(&pre))
            .collect();
        if s == "skipped" && !calls.is_empty() {
            bad.push(format!(
                "node {node} was skipped but called {} times",
                calls.len()
            ));
        }
        for p in &spec.parents[node] {
            let finished: i64 = tasks
                .get(p)
                .and_then(|pr| pr.get("finished_at"))
                .and_then(|f| f.parse().ok())
                .unwrap_or(i64::MAX);
            for c in &calls {
                if ms(c.at) + 1 < finished {
                    bad.push(format!(
                        "node {node} was called at {} ms, before its parent {p} finished at {finished} ms",
                        ms(c.at)
                    ));
                }
                let read = c
                    .prompt
                    .split(&format!(" {p}="))
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("");
                if !matches!(read, "succeeded" | "failed" | "cancelled") {
                    bad.push(format!("node {node} ran with parent {p} read as {read:?}"));
                }
            }
        }
    }
    match status.as_str() {
        "succeeded" if !fail_workflow_failed.is_empty() => bad.push(format!(
            "succeeded although fail_workflow nodes {fail_workflow_failed:?} did not"
        )),
        "failed" => {
            let err = h.get("error").map_or("", String::as_str);
            let named = fail_workflow_failed
                .iter()
                .any(|n| err.starts_with(&format!("node {n} ")));
            if !named {
                bad.push(format!(
                    "failed with error {err:?}, which names none of the fail_workflow nodes that failed {fail_workflow_failed:?}"
                ));
            }
        }
        _ => {}
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    /// n0 → n1 (continue) → n2 (skip), n0 → n3
    fn spec() -> WfSpec {
        let parents: HashMap<String, Vec<String>> = [
            ("n0", vec![]),
            ("n1", vec!["n0"]),
            ("n2", vec!["n1"]),
            ("n3", vec!["n0"]),
        ]
        .into_iter()
        .map(|(n, p)| (n.to_owned(), p.into_iter().map(str::to_owned).collect()))
        .collect();
        let policy = [
            ("n0", "fail_workflow"),
            ("n1", "continue"),
            ("n2", "skip"),
            ("n3", "fail_workflow"),
        ]
        .into_iter()
        .map(|(n, p)| (n.to_owned(), p))
        .collect();
        WfSpec {
            w: 7,
            body: Value::Null,
            send_at: Duration::ZERO,
            cancel_after: None,
            parents,
            policy,
        }
    }

    fn rec(pairs: &[(&str, &str)]) -> Record {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn call(prompt: &str, at_ms: u64) -> CallArrival {
        CallArrival {
            prompt: prompt.to_owned(),
            call: 1,
            start: Instant::now(),
            at: UNIX_EPOCH + Duration::from_millis(at_ms),
            rejected: None,
        }
    }

    /// A clean history: n0 ok at 100, n1 failed (continue) at 200, n3 ok at 150, n2 ran at 250.
    fn history() -> (Record, HashMap<String, Record>, Vec<CallArrival>) {
        let h = rec(&[
            ("status", "succeeded"),
            ("open", "0"),
            ("s:n0", "succeeded"),
            ("s:n1", "failed"),
            ("s:n2", "succeeded"),
            ("s:n3", "succeeded"),
        ]);
        let tasks: HashMap<String, Record> = [
            ("n0", "succeeded", "100"),
            ("n1", "failed", "200"),
            ("n2", "succeeded", "300"),
            ("n3", "succeeded", "150"),
        ]
        .into_iter()
        .map(|(n, s, f)| (n.to_owned(), rec(&[("status", s), ("finished_at", f)])))
        .collect();
        let calls = vec![
            call("chaos 1 wf 7 node n0:  |", 10),
            call("chaos 1 wf 7 node n1: [[fail:400]] | n0=succeeded", 120),
            call("chaos 1 wf 7 node n3:  | n0=succeeded", 101),
            call("chaos 1 wf 7 node n2:  | n1=failed", 250),
        ];
        (h, tasks, calls)
    }

    #[test]
    fn a_clean_history_passes() {
        let (h, tasks, calls) = history();
        assert_eq!(
            check_one(1, &spec(), false, &h, &tasks, &calls),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_breach_fires() {
        type Break =
            fn(&mut Record, &mut HashMap<String, Record>, &mut Vec<CallArrival>, &mut bool);
        let cases: [(&str, Break); 9] = [
            ("not closed", |h, _, _, _| {
                h.insert("status".into(), "running".into());
            }),
            ("open =", |h, _, _, _| {
                h.insert("open".into(), "1".into());
            }),
            ("DELETE answered 200", |_, _, _, c| *c = true),
            ("but its task is", |_, t, _, _| {
                t.get_mut("n3")
                    .expect("n3")
                    .insert("status".into(), "cancelled".into());
            }),
            ("before its parent n0 finished", |_, _, c, _| {
                c.push(call("chaos 1 wf 7 node n3:  | n0=succeeded", 50))
            }),
            ("read as \"running\"", |_, _, c, _| {
                c.push(call("chaos 1 wf 7 node n1:  | n0=running", 130))
            }),
            ("was skipped but called", |h, t, _, _| {
                h.insert("s:n2".into(), "skipped".into());
                t.get_mut("n2")
                    .expect("n2")
                    .insert("status".into(), "cancelled".into());
            }),
            ("succeeded although fail_workflow", |h, t, _, _| {
                h.insert("s:n3".into(), "failed".into());
                t.get_mut("n3")
                    .expect("n3")
                    .insert("status".into(), "failed".into());
            }),
            ("names none of the fail_workflow nodes", |h, _, _, _| {
                h.insert("status".into(), "failed".into());
                h.insert("error".into(), "node n1 failed".into());
            }),
        ];
        for (want, breakage) in cases {
            let (mut h, mut tasks, mut calls) = history();
            let mut cancelled = false;
            breakage(&mut h, &mut tasks, &mut calls, &mut cancelled);
            let v = check_one(1, &spec(), cancelled, &h, &tasks, &calls);
            assert!(v.iter().any(|x| x.contains(want)), "{want}: {v:?}");
        }
    }
}
